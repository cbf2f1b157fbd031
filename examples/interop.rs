//! The interop service and checks of `python/README.md`, spoken over this
//! process's standard input (receive) and standard output (send), so that
//! it can face the reference peer `python/interop_peer.py` of
//! `cs.packetstream` 20240630, or another copy of itself.
//!
//! ```text
//! cargo run --example interop -- serve [--no-extensions]
//! cargo run --example interop -- client [--foreign-channel N] [--no-extensions]
//! ```
//!
//! - `serve` answers the interop service until the peer's EOF, finishes what
//!   is in progress, sends its own EOF and exits 0. Bad input from the peer
//!   ends it with an error on standard error and exit status 1.
//! - `client` runs the checks of `interop_peer.py client` against the server
//!   on the other end, closes the connection in order, prints
//!   `interop: N passed, M failed` and exits 0 only if all passed and the
//!   shutdown was clean. With `--foreign-channel N` it also sends a request
//!   on channel `N`, which the reference refuses: the refusal must come back
//!   as a not-ok response while the connection goes on. `INTEROP_SEED` fixes
//!   the random data.
//! - Both start with the crate's [extensions](packetstream::Config::extensions)
//!   on, as by default, unless `--no-extensions`. At the end each writes
//!   `peer extensions: yes|no|unknown` (what the peer's answer to the
//!   hello said) and `records logged above debug: N` (the library's log
//!   records at info level and above) to standard error.
//!
//! Standard output carries the packet stream, so everything human-readable
//! goes to standard error.

// Standard output is the packet stream: all messages go to standard error.
#![allow(clippy::print_stderr)]

use std::fmt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use packetstream::{
    Config, Error, HandlerResult, PacketConnection, PendingResponse, Reply, Request, Response,
};

// The interop service's request types, as the application sees them.
const ECHO_REVERSE: u64 = 0;
const ECHO: u64 = 1;
const FAIL: u64 = 2;
const TEXT: u64 = 3;
const FLAGS_ONLY: u64 = 4;
const NONE: u64 = 5;
const SLEEP: u64 = 6;

/// The longest a client waits for any one response, or for the shutdown.
const WAIT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let extensions = match args.iter().position(|a| a == "--no-extensions") {
        Some(at) => {
            args.remove(at);
            false
        }
        None => true,
    };
    if log::set_logger(&LOUD).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["serve"] => serve(extensions),
        ["client"] => client(None, extensions),
        ["client", "--foreign-channel", channel] => match channel.parse() {
            Ok(channel) if channel != 0 => client(Some(channel), extensions),
            _ => usage(),
        },
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: interop serve [--no-extensions] | \
         interop client [--foreign-channel N (not 0)] [--no-extensions]"
    );
    ExitCode::from(2)
}

/// Counts the library's log records at info level and above, and writes
/// them to standard error.
struct Loud(AtomicUsize);

static LOUD: Loud = Loud(AtomicUsize::new(0));

impl log::Log for Loud {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            self.0.fetch_add(1, Ordering::Relaxed);
            eprintln!("log: {} {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

/// The closing lines about the extensions and the log, for the test runner.
fn report_extensions(who: &str, conn: &PacketConnection) {
    let peer = match conn.peer_extensions() {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    eprintln!("interop {who}: peer extensions: {peer}");
    eprintln!(
        "interop {who}: records logged above debug: {}",
        LOUD.0.load(Ordering::Relaxed)
    );
}

/// The interop service, as `python/README.md` describes it.
fn handle(rq: Request) -> HandlerResult {
    match rq.rq_type {
        ECHO_REVERSE => {
            let mut payload = rq.payload;
            payload.reverse();
            Ok(Reply {
                flags: 0x11,
                payload,
            })
        }
        ECHO => Ok(Reply {
            flags: rq.flags,
            payload: rq.payload,
        }),
        FAIL => Err("requested failure".into()),
        TEXT => Ok(format!("len={}", rq.payload.len()).into()),
        FLAGS_ONLY => Ok((rq.payload.len() as u64).into()),
        NONE => Ok(().into()),
        SLEEP => {
            let millis: u64 = std::str::from_utf8(&rq.payload)?.parse()?;
            thread::sleep(Duration::from_millis(millis));
            Ok(Reply {
                flags: rq.flags,
                payload: rq.payload,
            })
        }
        other => Err(format!("unknown rq_type {other}").into()),
    }
}

fn serve(extensions: bool) -> ExitCode {
    let config = Config::default()
        .name("rs-serve")
        .handler(handle)
        .extensions(extensions);
    let conn = match PacketConnection::stdio(config) {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("interop serve: error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Returns once the peer has sent EOF, what was in progress is answered
    // and our own EOF is written; or once bad input has ended the stream.
    let res = conn.join();
    let stats = conn.stats();
    report_extensions("serve", &conn);
    match res {
        Ok(()) => {
            eprintln!(
                "interop serve: clean shutdown after {} requests",
                stats.requests_received
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "interop serve: error: connection failed after {} requests: {e}",
                stats.requests_received
            );
            ExitCode::FAILURE
        }
    }
}

/// How a request ended, as the checks compare it: the Python reference's
/// `(ok, flags, payload)`, or the error that prevented a response.
#[derive(PartialEq, Eq)]
enum Outcome {
    Ok(u64, Vec<u8>),
    NotOk(u64, Vec<u8>),
    Error(String),
}

impl From<Result<Response, Error>> for Outcome {
    fn from(res: Result<Response, Error>) -> Outcome {
        match res {
            Ok(rsp) => Outcome::Ok(rsp.flags, rsp.payload),
            Err(Error::Failed { flags, payload, .. }) => Outcome::NotOk(flags, payload),
            Err(e) => Outcome::Error(e.to_string()),
        }
    }
}

// By hand, so that a failed check on 1 MiB does not print 1 MiB.
impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, flags, payload) = match self {
            Outcome::Ok(flags, payload) => ("ok", flags, payload),
            Outcome::NotOk(flags, payload) => ("not ok", flags, payload),
            Outcome::Error(e) => return write!(f, "error: {e}"),
        };
        let shown = &payload[..payload.len().min(16)];
        write!(
            f,
            "{what} flags={flags:#x} payload[{}]={shown:02x?}",
            payload.len()
        )
    }
}

fn wait(pending: &PendingResponse) -> Outcome {
    pending.wait_timeout(WAIT).into()
}

fn call(conn: &PacketConnection, rq_type: u64, flags: u64, payload: &[u8]) -> Outcome {
    match conn.submit(rq_type, flags, payload) {
        Ok(pending) => wait(&pending),
        Err(e) => Outcome::Error(e.to_string()),
    }
}

#[derive(Default)]
struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn expect<T: PartialEq + fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        if got == want {
            self.passed += 1;
        } else {
            eprintln!("interop client: FAIL {what}: got {got:?} want {want:?}");
            self.failed.push(what.to_string());
        }
    }
}

/// A small xorshift generator: the checks need varied bytes and orders, not
/// good randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The checks of `interop_peer.py client`, in its order, and the
/// foreign-channel checks when asked for.
fn run_checks(
    conn: &PacketConnection,
    checks: &mut Checks,
    rng: &mut Rng,
    foreign_channel: Option<u64>,
) {
    let sizes = [0, 1, 127, 128, 16383, 16384, 65536, 1 << 20];
    // Flags as the request carries them; the response flags carry one bit
    // more on the wire.
    for flags in [0, 1, 0x55, 1 << 40] {
        for size in sizes {
            let chunk: Vec<u8> = (0..size.min(4096)).map(|_| rng.next() as u8).collect();
            let data: Vec<u8> = chunk.iter().copied().cycle().take(size).collect();
            let reversed: Vec<u8> = data.iter().rev().copied().collect();
            checks.expect(
                &format!("echo_reverse flags={flags} size={size}"),
                call(conn, ECHO_REVERSE, flags, &data),
                Outcome::Ok(0x11, reversed),
            );
        }
    }
    let all_flags = [
        0,
        1,
        127,
        128,
        1 << 32,
        (1 << 61) - 1,
        1 << 62,
        1 << 63,
        u64::MAX,
    ];
    for flags in all_flags {
        checks.expect(
            &format!("echo flags={flags}"),
            call(conn, ECHO, flags, b"f"),
            Outcome::Ok(flags, b"f".to_vec()),
        );
    }
    let failed = matches!(call(conn, FAIL, 0, b"boom"), Outcome::NotOk(..));
    checks.expect("fail gives not-ok", failed, true);
    checks.expect(
        "text",
        call(conn, TEXT, 0, b"abcd"),
        Outcome::Ok(0, b"len=4".to_vec()),
    );
    checks.expect(
        "flags only",
        call(conn, FLAGS_ONLY, 0, b"abc"),
        Outcome::Ok(3, Vec::new()),
    );
    checks.expect(
        "none",
        call(conn, NONE, 0, b"xyz"),
        Outcome::Ok(0, Vec::new()),
    );
    if let Some(channel) = foreign_channel {
        // The reference serves channel 0 only: the request must come back as
        // a not-ok response on its own channel, and the connection go on.
        let res = conn
            .submit_on(channel, ECHO, 0, b"x")
            .and_then(|pending| pending.wait_timeout(WAIT));
        let refused = match &res {
            Err(Error::Failed {
                channel: got_channel,
                ..
            }) => *got_channel == channel,
            _ => false,
        };
        if !refused {
            eprintln!("interop client: channel {channel} gave {res:?}");
        }
        checks.expect(
            &format!("request on channel {channel} refused as not-ok"),
            refused,
            true,
        );
        checks.expect(
            &format!("channel 0 still served after channel {channel}"),
            call(conn, ECHO, 9, b"after"),
            Outcome::Ok(9, b"after".to_vec()),
        );
    }
    // Out of order completion: replies must find their own requests.
    let mut pending = Vec::new();
    for idx in 0..200u64 {
        let delay = rng.below(20).to_string().into_bytes();
        let submitted = conn.submit(SLEEP, idx, &delay);
        pending.push((submitted, idx, delay));
    }
    for idx in (1..pending.len()).rev() {
        let other = rng.below(idx as u64 + 1) as usize;
        pending.swap(idx, other);
    }
    for (submitted, idx, delay) in pending {
        let got = match submitted {
            Ok(pending) => wait(&pending),
            Err(e) => Outcome::Error(e.to_string()),
        };
        checks.expect(&format!("sleep #{idx}"), got, Outcome::Ok(idx, delay));
    }
    // A pipelined burst: every request is sent before any reply is awaited.
    let burst: Vec<_> = (0..5000u64)
        .map(|idx| {
            let payload = format!("p{idx}").into_bytes();
            (conn.submit(ECHO, idx % 1024, &payload), idx, payload)
        })
        .collect();
    let mut n_bad = 0;
    for (submitted, idx, payload) in burst {
        let got = match submitted {
            Ok(pending) => wait(&pending),
            Err(e) => Outcome::Error(e.to_string()),
        };
        if got != Outcome::Ok(idx % 1024, payload) {
            if n_bad == 0 {
                eprintln!("interop client: burst #{idx} gave {got:?}");
            }
            n_bad += 1;
        }
    }
    checks.expect("pipelined burst of 5000: mismatches", n_bad, 0);
}

fn client(foreign_channel: Option<u64>, extensions: bool) -> ExitCode {
    let seed = match std::env::var("INTEROP_SEED") {
        Ok(seed) => match seed.parse() {
            Ok(seed) => seed,
            Err(_) => return usage(),
        },
        Err(_) => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ u64::from(std::process::id()) << 32
        }
    };
    // Xorshift must not start from 0.
    let mut rng = Rng(seed | 1);
    eprintln!("interop client: INTEROP_SEED={seed}");
    let config = Config::default().name("rs-client").extensions(extensions);
    let conn = match PacketConnection::stdio(config) {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("interop client: error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut checks = Checks::default();
    run_checks(&conn, &mut checks, &mut rng, foreign_channel);
    // ERQ, then EOF, then the peer's EOF: we never wait for the peer's EOF
    // before sending ours, since the reference waits for ours first.
    let closed = conn.close_timeout(WAIT);
    let elapsed = started.elapsed();
    let stats = conn.stats();
    eprintln!(
        "interop client: {} passed, {} failed in {:.2}s ({} requests, {} bytes out, {} bytes in)",
        checks.passed,
        checks.failed.len(),
        elapsed.as_secs_f64(),
        stats.requests_sent,
        stats.bytes_out,
        stats.bytes_in
    );
    if let Err(e) = &closed {
        eprintln!("interop client: error: shutdown failed: {e}");
    }
    report_extensions("client", &conn);
    // A plain closing line for test runners, as interop_peer.py prints it.
    eprintln!(
        "interop: {} passed, {} failed",
        checks.passed,
        checks.failed.len()
    );
    if checks.failed.is_empty() && closed.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
