//! A content-addressed block store served over packetstream, in the manner
//! of `cs.vt.stream`: ADD stores a block and returns its SHA-256, GET
//! fetches a block by hash, CONTAINS, LEN and FLUSH.
//!
//! ```text
//! blockstore serve ADDR [--stdin-stop] [--file PATH]
//!                                         serve on TCP host:port, or on a Unix
//!                                         socket if ADDR has a '/', until
//!                                         killed; with --stdin-stop, stop in
//!                                         order when standard input ends
//!                                         (Ctrl-D)
//! blockstore serve-stdio [--file PATH]    serve over standard input and output
//! blockstore client ADDR [LOAD]           run a load against a server
//! blockstore client-child [LOAD]          start `serve-stdio` as a child process
//!                                         and run the load over its pipes
//!
//! LOAD: --blocks N (10000)  --threads N (8)  --max-size BYTES (8192)
//!       --window N (64): requests each thread keeps in flight
//! ```
//!
//! With `--file`, blocks are appended to PATH (as BSData records) and FLUSH
//! writes them out; the file is read back at start.

// An example program reports to its user on the terminal.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::VecDeque;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use packetstream::{Config, Fulfil, PacketConnection, Result, Server, ServerConfig};

use self::service::{Add, BlockStore, Get, HashCode};

/// The block store service: its request types and its store.
pub mod service {
    use std::collections::hash_map::Entry;
    use std::collections::HashMap;
    use std::fmt;
    use std::fs::{File, OpenOptions};
    use std::io::{self, BufWriter, Read, Write};
    use std::path::Path;

    use parking_lot::{Mutex, RwLock};
    use sha2::{Digest, Sha256};

    use packetstream::{
        impl_payload, Dispatcher, Error, Failure, Fulfil, HandlerError, PayloadReader,
        PayloadWrite, RequestType,
    };

    /// ADD: store a block, return its hash.
    pub const ADD: u64 = 0;
    /// GET: fetch a block by hash.
    pub const GET: u64 = 1;
    /// CONTAINS: is a block with this hash stored?
    pub const CONTAINS: u64 = 2;
    /// LEN: how many blocks are stored.
    pub const LEN: u64 = 3;
    /// FLUSH: write stored blocks out to the backing file.
    pub const FLUSH: u64 = 4;

    /// Flags of the not-ok reply to an ADD of a block over the size limit.
    pub const TOO_LARGE: u64 = 0x1;

    /// A SHA-256 hash: on the wire, its 32 raw bytes. As a response, the
    /// same 32 bytes in the payload (`impl_payload!` makes it a reply).
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HashCode(pub [u8; 32]);
    impl_payload!(HashCode(0));

    impl HashCode {
        /// The hash of `data`.
        pub fn of(data: &[u8]) -> HashCode {
            HashCode(Sha256::digest(data).into())
        }
    }

    impl fmt::Debug for HashCode {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
        }
    }

    /// ADD data: store a block; the response is its hash.
    #[derive(Debug)]
    pub struct Add {
        /// The block.
        pub data: Vec<u8>,
    }
    impl_payload!(Add { data });
    impl RequestType for Add {
        const RQ_TYPE: u64 = ADD;
        type Response = HashCode;
    }
    impl Fulfil<BlockStore> for Add {
        fn fulfil(self, store: &BlockStore) -> Result<HashCode, HandlerError> {
            store.add(self.data)
        }
    }

    /// GET hash: the block, or `None` if it is not stored.
    #[derive(Debug)]
    pub struct Get(pub HashCode);
    impl_payload!(Get(0));
    impl RequestType for Get {
        const RQ_TYPE: u64 = GET;
        type Response = Option<Vec<u8>>;
    }
    impl Fulfil<BlockStore> for Get {
        fn fulfil(self, store: &BlockStore) -> Result<Option<Vec<u8>>, HandlerError> {
            Ok(store.get(&self.0))
        }
    }

    /// CONTAINS hash: whether the block is stored.
    #[derive(Debug)]
    pub struct Contains(pub HashCode);
    impl_payload!(Contains(0));
    impl RequestType for Contains {
        const RQ_TYPE: u64 = CONTAINS;
        type Response = bool;
    }
    impl Fulfil<BlockStore> for Contains {
        fn fulfil(self, store: &BlockStore) -> Result<bool, HandlerError> {
            Ok(store.blocks.read().contains_key(&self.0))
        }
    }

    /// LEN: the number of blocks stored, in the reply's flags.
    #[derive(Debug)]
    pub struct Len;
    impl_payload!(Len);
    impl RequestType for Len {
        const RQ_TYPE: u64 = LEN;
        type Response = u64;
    }
    impl Fulfil<BlockStore> for Len {
        fn fulfil(self, store: &BlockStore) -> Result<u64, HandlerError> {
            Ok(store.blocks.read().len() as u64)
        }
    }

    /// FLUSH: write the stored blocks out to the backing file, if any.
    #[derive(Debug)]
    pub struct Flush;
    impl_payload!(Flush);
    impl RequestType for Flush {
        const RQ_TYPE: u64 = FLUSH;
        type Response = ();
    }
    impl Fulfil<BlockStore> for Flush {
        fn fulfil(self, store: &BlockStore) -> Result<(), HandlerError> {
            Ok(store.flush()?)
        }
    }

    /// The store: blocks in memory by hash, and optionally an append-only
    /// file of BSData records behind them.
    #[derive(Default)]
    pub struct BlockStore {
        blocks: RwLock<HashMap<HashCode, Vec<u8>>>,
        file: Option<Mutex<BufWriter<File>>>,
        max_block: Option<usize>,
    }

    impl BlockStore {
        /// An empty store in memory.
        pub fn new() -> BlockStore {
            BlockStore::default()
        }

        /// A store backed by the file at `path`, whose blocks are read in.
        pub fn open(path: &Path) -> io::Result<BlockStore> {
            let mut file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(path)?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            let mut blocks = HashMap::new();
            let mut r = PayloadReader::new(&bytes);
            while !r.is_empty() {
                let data = r.bs_data().map_err(io::Error::other)?;
                blocks.insert(HashCode::of(data), data.to_vec());
            }
            Ok(BlockStore {
                blocks: RwLock::new(blocks),
                file: Some(Mutex::new(BufWriter::new(file))),
                max_block: None,
            })
        }

        /// Refuses blocks longer than `max` bytes.
        pub fn max_block(mut self, max: usize) -> BlockStore {
            self.max_block = Some(max);
            self
        }

        /// A dispatcher serving every request type against this store.
        pub fn dispatcher(self) -> Dispatcher<BlockStore> {
            Dispatcher::new(self)
                .route::<Add>()
                .route::<Get>()
                .route::<Contains>()
                .route::<Len>()
                .route::<Flush>()
        }

        fn add(&self, data: Vec<u8>) -> Result<HashCode, HandlerError> {
            if let Some(max) = self.max_block.filter(|&max| data.len() > max) {
                let reason = format!("block of {} bytes exceeds limit of {max}", data.len());
                return Err(Failure::new(TOO_LARGE, reason).into());
            }
            let hash = HashCode::of(&data);
            if self.blocks.read().contains_key(&hash) {
                return Ok(hash);
            }
            if let Entry::Vacant(slot) = self.blocks.write().entry(hash) {
                if let Some(file) = &self.file {
                    let mut record = Vec::with_capacity(data.len() + 10);
                    record.put_bs_data(&data);
                    file.lock().write_all(&record)?;
                }
                slot.insert(data);
            }
            Ok(hash)
        }

        fn get(&self, hash: &HashCode) -> Option<Vec<u8>> {
            self.blocks.read().get(hash).cloned()
        }

        fn flush(&self) -> io::Result<()> {
            if let Some(file) = &self.file {
                let mut file = file.lock();
                file.flush()?;
                file.get_ref().sync_data()?;
            }
            Ok(())
        }
    }

    impl fmt::Debug for BlockStore {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("BlockStore")
                .field("blocks", &self.blocks.read().len())
                .field("file", &self.file.is_some())
                .finish()
        }
    }

    /// The error a typed call gives for a not-ok reply, as text, for
    /// reports.
    pub fn describe(err: &Error) -> String {
        match err {
            Error::Failed { flags, .. } => format!(
                "refused (flags {flags:#x}): {}",
                err.failure_reason().unwrap_or_default()
            ),
            other => other.to_string(),
        }
    }
}

/// How long a client waits for any one response before giving up.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Block `idx` of a load: a size in `0..=max_size` and pseudo-random
/// content, both fixed by `idx`.
pub fn block(idx: u64, max_size: usize) -> Vec<u8> {
    let mut state = idx.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let len = (next() % (max_size as u64 + 1)) as usize;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        data.extend_from_slice(&next().to_le_bytes());
    }
    data.truncate(len);
    data
}

/// Stores `blocks` with up to `window` requests in flight, and returns
/// their hashes in order.
pub fn put_all(
    conn: &PacketConnection,
    blocks: &[Vec<u8>],
    window: usize,
) -> Result<Vec<HashCode>> {
    let mut in_flight = VecDeque::with_capacity(window);
    let mut hashes = Vec::with_capacity(blocks.len());
    for data in blocks {
        if in_flight.len() == window {
            let pending: packetstream::PendingRequest<Add> = in_flight.pop_front().expect("full");
            hashes.push(pending.wait_timeout(RESPONSE_TIMEOUT)?);
        }
        in_flight.push_back(conn.submit_request(&Add { data: data.clone() })?);
    }
    for pending in in_flight {
        hashes.push(pending.wait_timeout(RESPONSE_TIMEOUT)?);
    }
    Ok(hashes)
}

/// Fetches the blocks of `hashes` with up to `window` requests in flight,
/// in order; `None` for a block not stored.
pub fn get_all(
    conn: &PacketConnection,
    hashes: &[HashCode],
    window: usize,
) -> Result<Vec<Option<Vec<u8>>>> {
    let mut in_flight = VecDeque::with_capacity(window);
    let mut blocks = Vec::with_capacity(hashes.len());
    for hash in hashes {
        if in_flight.len() == window {
            let pending: packetstream::PendingRequest<Get> = in_flight.pop_front().expect("full");
            blocks.push(pending.wait_timeout(RESPONSE_TIMEOUT)?);
        }
        in_flight.push_back(conn.submit_request(&Get(*hash))?);
    }
    for pending in in_flight {
        blocks.push(pending.wait_timeout(RESPONSE_TIMEOUT)?);
    }
    Ok(blocks)
}

/// The load a client runs.
#[derive(Clone, Copy, Debug)]
struct Load {
    blocks: u64,
    threads: usize,
    max_size: usize,
    window: usize,
}

/// Runs `load` over `conns`, thread `i` using `conns[i % conns.len()]`:
/// stores every block and checks its hash, then fetches every block (each
/// thread another thread's share) and checks every byte. Reports rates.
fn run_load(conns: &[PacketConnection], load: Load) -> std::result::Result<(), String> {
    let shares: Vec<Vec<u64>> = (0..load.threads)
        .map(|t| {
            (0..load.blocks)
                .filter(|i| i % load.threads as u64 == t as u64)
                .collect()
        })
        .collect();
    let total_bytes: usize = (0..load.blocks)
        .map(|i| block(i, load.max_size).len())
        .sum();

    let started = Instant::now();
    let hashes: Vec<Vec<HashCode>> = thread::scope(|s| {
        let workers: Vec<_> = shares
            .iter()
            .enumerate()
            .map(|(t, share)| {
                let conn = &conns[t % conns.len()];
                s.spawn(move || -> std::result::Result<Vec<HashCode>, String> {
                    let blocks: Vec<Vec<u8>> =
                        share.iter().map(|&i| block(i, load.max_size)).collect();
                    let hashes =
                        put_all(conn, &blocks, load.window).map_err(|e| service::describe(&e))?;
                    for (data, hash) in blocks.iter().zip(&hashes) {
                        if HashCode::of(data) != *hash {
                            return Err(format!(
                                "ADD returned {hash:?}, expected {:?}",
                                HashCode::of(data)
                            ));
                        }
                    }
                    Ok(hashes)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a load thread panicked"))
            .collect::<std::result::Result<_, _>>()
    })?;
    let put_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    thread::scope(|s| {
        let workers: Vec<_> = (0..load.threads)
            .map(|t| {
                let conn = &conns[t % conns.len()];
                let other = (t + 1) % load.threads;
                let (share, hashes) = (&shares[other], &hashes[other]);
                s.spawn(move || -> std::result::Result<(), String> {
                    let got =
                        get_all(conn, hashes, load.window).map_err(|e| service::describe(&e))?;
                    for (&i, data) in share.iter().zip(got) {
                        if data.as_deref() != Some(block(i, load.max_size).as_slice()) {
                            return Err(format!("GET of block {i} returned other bytes"));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a load thread panicked"))
    })?;
    let get_secs = started.elapsed().as_secs_f64();

    let n_stored = conns[0]
        .request(&service::Len)
        .map_err(|e| service::describe(&e))?;
    conns[0]
        .request(&service::Flush)
        .map_err(|e| service::describe(&e))?;
    let mb = total_bytes as f64 / 1e6;
    let n = load.blocks as f64;
    println!(
        "put {} blocks ({mb:.1} MB) in {put_secs:.2} s: {:.0} blocks/s, {:.1} MB/s",
        load.blocks,
        n / put_secs,
        mb / put_secs
    );
    println!(
        "get {} blocks ({mb:.1} MB) in {get_secs:.2} s: {:.0} blocks/s, {:.1} MB/s",
        load.blocks,
        n / get_secs,
        mb / get_secs
    );
    println!("every byte checked; the store now holds {n_stored} blocks");
    Ok(())
}

fn parse_load(args: &[String]) -> std::result::Result<Load, String> {
    let mut load = Load {
        blocks: 10_000,
        threads: 8,
        max_size: 8192,
        window: 64,
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |_| format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--blocks" => load.blocks = value.parse().map_err(bad)?,
            "--threads" => load.threads = value.parse::<usize>().map_err(bad)?.max(1),
            "--max-size" => load.max_size = value.parse().map_err(bad)?,
            "--window" => load.window = value.parse::<usize>().map_err(bad)?.max(1),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(load)
}

fn open_store(args: &[String]) -> std::result::Result<BlockStore, String> {
    match args {
        [] => Ok(BlockStore::new()),
        [flag, path] if flag == "--file" => {
            BlockStore::open(path.as_ref()).map_err(|e| format!("cannot open {path}: {e}"))
        }
        _ => Err(format!("unexpected arguments {args:?}")),
    }
}

/// Serves until the process is killed, or with `stdin_stop` until standard
/// input ends: a server under `nohup`, a service manager or a script's `&`
/// has `/dev/null` there, and must not stop at once.
fn serve(addr: &str, store: BlockStore, stdin_stop: bool) -> std::result::Result<(), String> {
    let dispatcher = Arc::new(store.dispatcher());
    let config = ServerConfig::new(
        Config::default()
            .name("blockstore")
            .shared_handler(dispatcher.clone()),
    );
    let server = if addr.contains('/') {
        let listener = std::os::unix::net::UnixListener::bind(addr).map_err(|e| e.to_string())?;
        Server::serve_unix(listener, config)
    } else {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| e.to_string())?;
        Server::serve_tcp(listener, config)
    }
    .map_err(|e| e.to_string())?;
    if !stdin_stop {
        eprintln!("blockstore: serving on {addr} until killed; FLUSH to save stored blocks");
        loop {
            thread::park();
        }
    }
    eprintln!("blockstore: serving on {addr}; end standard input (Ctrl-D) to stop");
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink()).map_err(|e| e.to_string())?;
    eprintln!("blockstore: stopping");
    server.stop();
    if addr.contains('/') {
        let _ = std::fs::remove_file(addr);
    }
    // Write out what the last clients stored.
    service::Flush
        .fulfil(dispatcher.context())
        .map_err(|e| e.to_string())
}

fn serve_stdio(store: BlockStore) -> std::result::Result<(), String> {
    // Standard output carries packets: everything else goes to stderr.
    let conn = PacketConnection::stdio(
        Config::default()
            .name("blockstore")
            .handler(store.dispatcher()),
    )
    .map_err(|e| e.to_string())?;
    conn.join().map_err(|e| e.to_string())
}

fn client_child(load: Load) -> std::result::Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("serve-stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    eprintln!("blockstore: started server process {}", child.id());
    let conn = PacketConnection::from_child(&mut child, Config::default().name("client"))
        .map_err(|e| e.to_string())?;
    let res = run_load(std::slice::from_ref(&conn), load);
    let closed = conn.close_timeout(RESPONSE_TIMEOUT);
    let status = child.wait().map_err(|e| e.to_string())?;
    res?;
    closed.map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("server process ended with {status}"));
    }
    Ok(())
}

fn client(addr: &str, load: Load) -> std::result::Result<(), String> {
    let conns = (0..load.threads)
        .map(|t| {
            let config = Config::default().name(format!("client{t}"));
            if addr.contains('/') {
                PacketConnection::connect_unix(addr, config)
            } else {
                PacketConnection::connect_tcp(addr, config)
            }
        })
        .collect::<Result<Vec<_>>>()
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let res = run_load(&conns, load);
    for conn in &conns {
        conn.close_timeout(RESPONSE_TIMEOUT)
            .map_err(|e| e.to_string())?;
    }
    res
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", addr, "--stdin-stop", ..] => {
            open_store(&args[3..]).and_then(|store| serve(addr, store, true))
        }
        ["serve", addr, ..] => open_store(&args[2..]).and_then(|store| serve(addr, store, false)),
        ["serve-stdio", ..] => open_store(&args[1..]).and_then(serve_stdio),
        ["client", addr, ..] => parse_load(&args[2..]).and_then(|load| client(addr, load)),
        ["client-child", ..] => parse_load(&args[1..]).and_then(client_child),
        _ => Err(
            "usage: blockstore serve ADDR [--stdin-stop] [--file PATH] | serve-stdio [--file PATH] \
                  | client ADDR [LOAD] | client-child [LOAD]"
                .to_string(),
        ),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("blockstore: {msg}");
            ExitCode::FAILURE
        }
    }
}
