//! A typed record service, written here with [`RequestType`] and
//! `impl_payload!`, and in Python with the reference's `BaseRequest` over
//! cs.binary's `BinaryMultiValue` (`python/typed_service.py`), type for
//! type and field for field. Each side serves the other's client.
//!
//! ```text
//! cargo run --example typed_service              # a client and a server in this process
//! cargo run --example typed_service -- serve     # serve over standard input and output
//! cargo run --example typed_service -- client    # run the checks against a server there
//! ```
//!
//! - `serve` answers the records service until the peer's EOF, then exits
//!   0 (1 if the connection failed).
//! - `client` sends every request type with records whose fields sit at
//!   their edges, checks each answer, closes the connection in order, prints
//!   `typed: N passed, M failed` on standard error and exits 0 only if all
//!   passed.
//!
//! Over standard input and output, standard output carries the packet
//! stream, so everything human-readable goes to standard error.
//!
//! The request types, as the application numbers them:
//!
//! | rq_type | request | payload | response |
//! |---|---|---|---|
//! | 0 | STORE | a [`Record`](service::Record) | its index, a `UInt32LE` |
//! | 1 | FETCH | an index, a `UInt32LE` | the `Record` stored there; not ok if none |
//! | 2 | SUMMARISE | a `Record` | a [`Summary`](service::Summary) of its values |
//! | 3 | ECHO | a `Record` | the `Record`, decoded and encoded again |
//! | 4 | NAMES | nothing | a [`NameList`](service::NameList) of the stored records' names |
//!
//! [`RequestType`]: packetstream::RequestType

// Over stdio, standard output is the packet stream: messages go to standard
// error. The local run prints its result to standard output.
#![allow(clippy::print_stderr, clippy::print_stdout)]

use std::fmt;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use packetstream::{Config, Error, PacketConnection, Payload, RequestType, Result};

use self::service::{records, summarise, Echo, Fetch, Names, Records, Store, Summarise, STORE};

/// The service: its types, its request types and how they are fulfilled.
pub mod service {
    use std::sync::Mutex;

    use packetstream::{
        impl_payload, BSData, BSSFloat, BSString, BSUInt, BinaryUTF8NUL, Dispatcher, Float64BE,
        Float64LE, Fulfil, HandlerError, Int16LE, Int32BE, Int32LE, RequestType, UInt16LE,
        UInt32BE, UInt32LE, UInt64BE, UInt64LE, UInt8,
    };

    /// STORE: keep a record; the response is its index.
    pub const STORE: u64 = 0;
    /// FETCH: the record stored at an index.
    pub const FETCH: u64 = 1;
    /// SUMMARISE: the summary of a record.
    pub const SUMMARISE: u64 = 2;
    /// ECHO: the record, decoded and encoded again.
    pub const ECHO: u64 = 3;
    /// NAMES: the names of the stored records, in order.
    pub const NAMES: u64 = 4;

    /// A record: one field of each kind, in the order the wire carries
    /// them. In Python:
    ///
    /// ```text
    /// Record = BinaryMultiValue('Record', dict(
    ///     id=UInt32BE, kind=UInt8, offset=Int16LE, delta=Int32BE,
    ///     stamp=UInt64LE, temperature=Float64BE, ratio=BSSFloat,
    ///     name=BSString, label=BinaryUTF8NUL, blob=BSData, count=BSUInt,
    ///     samples=counted_list(Int32LE)))
    /// ```
    #[derive(Clone, Debug, PartialEq)]
    pub struct Record {
        /// `UInt32BE`
        pub id: u32,
        /// `UInt8`
        pub kind: u8,
        /// `Int16LE`
        pub offset: i16,
        /// `Int32BE`
        pub delta: i32,
        /// `UInt64LE`
        pub stamp: u64,
        /// `Float64BE`
        pub temperature: f64,
        /// `BSSFloat`
        pub ratio: f64,
        /// `BSString`
        pub name: String,
        /// `BinaryUTF8NUL`
        pub label: BinaryUTF8NUL,
        /// `BSData`
        pub blob: Vec<u8>,
        /// `BSUInt`
        pub count: u64,
        /// a counted list of `Int32LE`
        pub samples: Vec<i32>,
    }
    impl_payload!(Record {
        id as UInt32BE,
        kind as UInt8,
        offset as Int16LE,
        delta as Int32BE,
        stamp as UInt64LE,
        temperature as Float64BE,
        ratio as BSSFloat,
        name as BSString,
        label,
        blob as BSData,
        count as BSUInt,
        samples as Vec<Int32LE>,
    });

    /// What SUMMARISE computes from a record's values. Its encodings differ
    /// from the record's, so that a byte order mistaken the same way on both
    /// sides cannot cancel out.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Summary {
        /// `id + 1`, a `UInt64BE`
        pub id_next: u64,
        /// `-offset`, an `Int32LE`
        pub offset_negated: i32,
        /// `temperature * 2`, a `Float64LE`
        pub temperature_doubled: f64,
        /// `ratio / 2`, a `BSSFloat`
        pub ratio_halved: f64,
        /// `name` with its characters reversed, a `BSString`
        pub name_reversed: String,
        /// the length of `label` in UTF-8, a `UInt16LE`
        pub label_len: u16,
        /// the sum of `blob`'s bytes, a `UInt32BE`
        pub blob_sum: u32,
        /// `samples` sorted, a counted list of `Int32BE`
        pub samples_sorted: Vec<i32>,
    }
    impl_payload!(Summary {
        id_next as UInt64BE,
        offset_negated as Int32LE,
        temperature_doubled as Float64LE,
        ratio_halved as BSSFloat,
        name_reversed as BSString,
        label_len as UInt16LE,
        blob_sum as UInt32BE,
        samples_sorted as Vec<Int32BE>,
    });

    /// The summary of `rec`, or why its values do not fit one.
    pub fn summarise(rec: &Record) -> Result<Summary, String> {
        let label_len = u16::try_from(rec.label.as_str().len())
            .map_err(|_| format!("label of {} bytes", rec.label.as_str().len()))?;
        let blob_sum: u64 = rec.blob.iter().map(|&b| u64::from(b)).sum();
        let blob_sum = u32::try_from(blob_sum).map_err(|_| format!("blob sums to {blob_sum}"))?;
        let mut samples_sorted = rec.samples.clone();
        samples_sorted.sort_unstable();
        Ok(Summary {
            id_next: u64::from(rec.id) + 1,
            offset_negated: -i32::from(rec.offset),
            temperature_doubled: rec.temperature * 2.0,
            ratio_halved: rec.ratio / 2.0,
            name_reversed: rec.name.chars().rev().collect(),
            label_len,
            blob_sum,
            samples_sorted,
        })
    }

    /// The names of the stored records. In Python,
    /// `BinaryMultiValue('NameList', dict(names=counted_list(BSString)))`.
    #[derive(Clone, Debug, PartialEq)]
    pub struct NameList {
        /// a counted list of `BSString`
        pub names: Vec<String>,
    }
    impl_payload!(NameList {
        names as Vec<BSString>
    });

    /// STORE: keep a record; the response is its index.
    #[derive(Debug)]
    pub struct Store(pub Record);
    impl_payload!(Store(0));
    impl RequestType for Store {
        const RQ_TYPE: u64 = STORE;
        type Response = UInt32LE;
    }

    /// FETCH: the record stored at an index.
    #[derive(Debug)]
    pub struct Fetch {
        /// `UInt32LE`
        pub index: u32,
    }
    impl_payload!(Fetch { index as UInt32LE });
    impl RequestType for Fetch {
        const RQ_TYPE: u64 = FETCH;
        type Response = Record;
    }

    /// SUMMARISE: the summary of a record.
    #[derive(Debug)]
    pub struct Summarise(pub Record);
    impl_payload!(Summarise(0));
    impl RequestType for Summarise {
        const RQ_TYPE: u64 = SUMMARISE;
        type Response = Summary;
    }

    /// ECHO: the record, decoded and encoded again.
    #[derive(Debug)]
    pub struct Echo(pub Record);
    impl_payload!(Echo(0));
    impl RequestType for Echo {
        const RQ_TYPE: u64 = ECHO;
        type Response = Record;
    }

    /// NAMES: the names of the stored records, in order.
    #[derive(Debug)]
    pub struct Names;
    impl_payload!(Names);
    impl RequestType for Names {
        const RQ_TYPE: u64 = NAMES;
        type Response = NameList;
    }

    /// The context requests are fulfilled against: the stored records.
    #[derive(Debug, Default)]
    pub struct Records(Mutex<Vec<Record>>);

    impl Records {
        /// A dispatcher serving every request type against a new, empty
        /// store.
        pub fn dispatcher() -> Dispatcher<Records> {
            Dispatcher::new(Records::default())
                .route::<Store>()
                .route::<Fetch>()
                .route::<Summarise>()
                .route::<Echo>()
                .route::<Names>()
        }

        fn records(&self) -> std::sync::MutexGuard<'_, Vec<Record>> {
            // A handler that panicked holding the lock left the records
            // whole: every change is a single push.
            self.0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }
    }

    impl Fulfil<Records> for Store {
        fn fulfil(self, ctx: &Records) -> Result<UInt32LE, HandlerError> {
            let mut records = ctx.records();
            let index = u32::try_from(records.len()).map_err(|_| "the store is full")?;
            records.push(self.0);
            Ok(UInt32LE(index))
        }
    }

    impl Fulfil<Records> for Fetch {
        fn fulfil(self, ctx: &Records) -> Result<Record, HandlerError> {
            let records = ctx.records();
            let rec = usize::try_from(self.index)
                .ok()
                .and_then(|idx| records.get(idx));
            match rec {
                Some(rec) => Ok(rec.clone()),
                None => Err(format!("no record at index {}", self.index).into()),
            }
        }
    }

    impl Fulfil<Records> for Summarise {
        fn fulfil(self, _: &Records) -> Result<Summary, HandlerError> {
            Ok(summarise(&self.0)?)
        }
    }

    impl Fulfil<Records> for Echo {
        fn fulfil(self, _: &Records) -> Result<Record, HandlerError> {
            Ok(self.0)
        }
    }

    impl Fulfil<Records> for Names {
        fn fulfil(self, ctx: &Records) -> Result<NameList, HandlerError> {
            let names = ctx.records().iter().map(|rec| rec.name.clone()).collect();
            Ok(NameList { names })
        }
    }

    fn label(text: &str) -> BinaryUTF8NUL {
        BinaryUTF8NUL::new(text).expect("labels hold no NUL")
    }

    /// The records the client sends: every field at its edges. The same
    /// list as `records()` in `python/typed_service.py`.
    pub fn records() -> Vec<Record> {
        vec![
            Record {
                id: 0,
                kind: 0,
                offset: 0,
                delta: 0,
                stamp: 0,
                temperature: 0.0,
                ratio: 0.0,
                name: String::new(),
                label: label(""),
                blob: Vec::new(),
                count: 0,
                samples: Vec::new(),
            },
            Record {
                id: u32::MAX,
                kind: u8::MAX,
                offset: i16::MAX,
                delta: i32::MAX,
                stamp: u64::MAX,
                temperature: f64::MAX,
                ratio: 1e16,
                name: "n".repeat(200),
                label: label(&"l".repeat(130)),
                blob: (0..=255).collect(),
                count: u64::MAX,
                samples: vec![i32::MAX; 3],
            },
            Record {
                id: 1,
                kind: 1,
                offset: i16::MIN,
                delta: i32::MIN,
                stamp: 1,
                temperature: f64::NEG_INFINITY,
                ratio: -0.0,
                name: "min".into(),
                label: label("-"),
                blob: vec![0],
                count: 127,
                samples: vec![i32::MIN, -1, 0, 1],
            },
            Record {
                id: 0x0102_0304,
                kind: 0x7f,
                offset: 0x0102,
                delta: 0x0102_0304,
                stamp: 0x0102_0304_0506_0708,
                temperature: -273.15,
                ratio: 0.1,
                name: "żółw 🐢".into(),
                label: label("ünïcödé"),
                blob: vec![1, 2, 3],
                count: 128,
                samples: (-64..66).collect(),
            },
            Record {
                id: 7,
                kind: 2,
                offset: -1,
                delta: -7,
                stamp: 1 << 63,
                temperature: f64::INFINITY,
                ratio: f64::NAN,
                name: "nan".into(),
                label: label("nan"),
                blob: b"nan".to_vec(),
                count: 16384,
                samples: vec![7],
            },
            Record {
                id: 8,
                kind: 3,
                offset: 300,
                delta: 70000,
                stamp: 1 << 32,
                temperature: 5e-324,
                ratio: 1e-5,
                name: "small".into(),
                label: label("tiny"),
                blob: vec![0; 1000],
                count: 1 << 32,
                samples: vec![3, 1, 2],
            },
            Record {
                id: 9,
                kind: 4,
                offset: -300,
                delta: -70000,
                stamp: 1 << 40,
                temperature: 1.0 / 3.0,
                ratio: 123456.789,
                name: "third".into(),
                label: label(""),
                blob: vec![b'x'; 128],
                count: 1,
                samples: vec![0; 128],
            },
        ]
    }
}

/// The longest the client waits for any one response, or for the shutdown.
const WAIT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => local(),
        ["serve"] => serve(),
        ["client"] => client(),
        _ => {
            eprintln!("usage: typed_service [serve | client]");
            ExitCode::from(2)
        }
    }
}

/// A client and a server in this process, over a socket pair.
fn local() -> ExitCode {
    let res = (|| -> Result<Checks> {
        let (a, b) = UnixStream::pair()?;
        let server_config = Config::default()
            .name("typed-server")
            .handler(Records::dispatcher());
        let server = PacketConnection::from_unix_stream(b, server_config)?;
        let client = PacketConnection::from_unix_stream(a, Config::default().name("typed-client"))?;
        let mut checks = Checks::default();
        run_checks(&client, &mut checks);
        client.close_timeout(WAIT)?;
        server.join()?;
        Ok(checks)
    })();
    match res {
        Ok(checks) => {
            println!("typed: {} passed, {} failed", checks.passed, checks.failed);
            if checks.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("typed: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve() -> ExitCode {
    let config = Config::default()
        .name("rs-typed-serve")
        .handler(Records::dispatcher());
    let conn = match PacketConnection::stdio(config) {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("typed_service serve: error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Returns once the peer has sent EOF, what was in progress is answered
    // and our own EOF is written.
    match conn.join() {
        Ok(()) => {
            eprintln!(
                "typed_service serve: clean shutdown after {} requests",
                conn.stats().requests_received
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("typed_service serve: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn client() -> ExitCode {
    let conn = match PacketConnection::stdio(Config::default().name("rs-typed-client")) {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("typed_service client: error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut checks = Checks::default();
    run_checks(&conn, &mut checks);
    let closed = conn.close_timeout(WAIT);
    if let Err(e) = &closed {
        eprintln!("typed_service client: error: shutdown failed: {e}");
    }
    // A plain closing line for test runners, as typed_service.py prints it.
    eprintln!("typed: {} passed, {} failed", checks.passed, checks.failed);
    if checks.failed == 0 && closed.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[derive(Default)]
struct Checks {
    passed: usize,
    failed: usize,
}

impl Checks {
    fn expect<T: PartialEq + fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        if got == want {
            self.passed += 1;
        } else {
            let (got, want) = (format!("{got:?}"), format!("{want:?}"));
            eprintln!(
                "typed_service client: FAIL {what}: got {:.300} want {:.300}",
                got, want
            );
            self.failed += 1;
        }
    }

    /// Expects `got` to be a value with the same encoding as `want`: the
    /// same value, with NaN equal to itself.
    fn expect_same<T: Payload + fmt::Debug>(&mut self, what: &str, got: Result<T>, want: &T) {
        let got = got.map(|value| (value.to_bytes(), format!("{value:?}")));
        let want = (want.to_bytes(), format!("{want:?}"));
        match got {
            Ok(got) => self.expect(what, Encoded(got), Encoded(want)),
            Err(e) => self.expect(what, Err(e.to_string()), Ok(want.1)),
        }
    }
}

/// A value's encoding, compared by its bytes and shown by its `Debug`.
struct Encoded((Vec<u8>, String));

impl PartialEq for Encoded {
    fn eq(&self, other: &Encoded) -> bool {
        self.0 .0 == other.0 .0
    }
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0 .1)
    }
}

/// Sends `rq` and waits for its typed response, at most [`WAIT`].
fn ask<R: RequestType>(conn: &PacketConnection, rq: &R) -> Result<R::Response> {
    conn.submit_request(rq)?.wait_timeout(WAIT)
}

/// What either client checks, one check per line of the Python client's
/// `run_checks`: 4 for each record, then 3.
fn run_checks(conn: &PacketConnection, checks: &mut Checks) {
    let recs = records();
    for (idx, rec) in recs.iter().enumerate() {
        let got = ask(conn, &Echo(rec.clone()));
        checks.expect_same(&format!("echo #{idx}"), got, rec);
        let want = summarise(rec).expect("the records have summaries");
        let got = ask(conn, &Summarise(rec.clone()));
        checks.expect_same(&format!("summarise #{idx}"), got, &want);
        let got = ask(conn, &Store(rec.clone())).map(u32::from);
        checks.expect(&format!("store #{idx}"), got.ok(), u32::try_from(idx).ok());
    }
    for (idx, rec) in recs.iter().enumerate() {
        let index = u32::try_from(idx).expect("a few records");
        let got = ask(conn, &Fetch { index });
        checks.expect_same(&format!("fetch #{idx}"), got, rec);
    }
    let names = ask(conn, &Names).map(|list| list.names);
    let want: Vec<String> = recs.iter().map(|rec| rec.name.clone()).collect();
    checks.expect("names", names.ok(), Some(want));
    let index = u32::try_from(recs.len()).expect("a few records");
    let past_end = ask(conn, &Fetch { index });
    checks.expect(
        "fetch past the end fails",
        matches!(past_end, Err(Error::Failed { .. })),
        true,
    );
    // A STORE whose record ends after its first byte must be refused.
    let truncated = conn
        .submit(STORE, 0, b"\0")
        .and_then(|pending| pending.wait_timeout(WAIT));
    checks.expect(
        "truncated store is refused",
        matches!(truncated, Err(Error::Failed { .. })),
        true,
    );
}
