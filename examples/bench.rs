//! Measures this crate against a raw baseline, in the same run.
//!
//! ```text
//! cargo run --release --example bench              # full run, about 80 s
//! cargo run --release --example bench -- --quick   # short run, without the many-clients workloads
//! cargo run --release --example bench -- --many    # the many-clients workloads alone
//! cargo run --release --example bench -- --no-many # the full run without them
//! cargo run --release --example bench -- --only hol   # head-of-line delay behind 256 MiB
//! cargo run --release --example bench -- --only w2:256 --secs 5   # one workload, for profiling
//! cargo run --release --example bench -- --only raw-many:1000     # one many-clients run, 3 s
//! cargo run --release --example bench -- --only many:70 --max-connections 64 --secs 2
//! cargo run --release --example bench -- --only ext   # W1 and W2 with extensions on and off
//! ```
//!
//! `--only` takes `w1`, `w2:N`, `w3`, `hol`, `ext` or `many:N`, or one of
//! them with a `raw-` prefix for its raw baseline; or `many-server:N` (the
//! crate's server, with clients that speak its wire format with no
//! library) or `many-clients:N` (the crate's clients, with such a server),
//! to see which side of a many-clients run costs what. `--rounds N` and
//! `--round-ms MS` set the rounds of W1 to W3 (7 of 300 ms);
//! `--many-rounds N` the rounds at 200 clients (3). `--max-connections M`
//! sets the crate server's limit in the many-clients workloads (default:
//! the number of clients), to see what clients past the limit get.
//!
//! What each workload and its raw baseline do, how they are timed, and the
//! figures of the last measured run are in PERFORMANCE.md.

#![allow(clippy::print_stdout, clippy::print_stderr)]
// The counting allocator below is the one `unsafe` code of the project:
// the library forbids it (`#![forbid(unsafe_code)]` in src/lib.rs).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::fs;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use packetstream::{
    Config, Packet, PacketConnection, PacketKind, Reply, Request, Server, ServerConfig,
};

/// The system allocator, counting allocations only while the allocation
/// pass runs. A counter updated on every allocation of the timed runs would
/// move its cache line between the cores on every request of the crate
/// (the raw baselines allocate nothing per request), and the timings would
/// measure the counter: with 200 clients, about 1 µs per call.
struct CountingAlloc;

/// Whether allocations are counted now.
static COUNTING: AtomicBool = AtomicBool::new(false);
/// Allocations, and bytes allocated, while counting.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES_ALLOCATED: AtomicU64 = AtomicU64::new(0);

impl CountingAlloc {
    fn count(bytes: usize) {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            BYTES_ALLOCATED.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

// SAFETY: every method passes its arguments unchanged to `System`, whose
// implementation is sound, so each keeps `GlobalAlloc`'s contract exactly as
// far as its caller does; the counting beside it touches only atomics and
// never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        // SAFETY: the caller's layout, as `GlobalAlloc::alloc` requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        // SAFETY: the caller's layout, as `GlobalAlloc::alloc_zeroed` requires.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator, with
        // this layout, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && COUNTING.load(Ordering::Relaxed) {
            BYTES_ALLOCATED.fetch_add((new_size - layout.size()) as u64, Ordering::Relaxed);
        }
        // SAFETY: `ptr` came from `System` through this allocator with
        // `layout`, and `new_size` is valid for it, as the caller guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Allocations and bytes allocated while `f` runs, on every thread.
fn counting_allocs(f: impl FnOnce()) -> (u64, u64) {
    let (a0, b0) = (
        ALLOCATIONS.load(Ordering::SeqCst),
        BYTES_ALLOCATED.load(Ordering::SeqCst),
    );
    COUNTING.store(true, Ordering::SeqCst);
    f();
    COUNTING.store(false, Ordering::SeqCst);
    (
        ALLOCATIONS.load(Ordering::SeqCst) - a0,
        BYTES_ALLOCATED.load(Ordering::SeqCst) - b0,
    )
}

const ECHO: u64 = 1;
const SMALL: usize = 32;
const LARGE: usize = 1 << 20;
const WINDOWS: [usize; 5] = [1, 16, 256, 4096, 10_000];
/// The window the W2 targets refer to.
const W2_WINDOW: usize = 256;

// The performance targets, with default settings: each is printed as PASS
// or MISS at the end of a full run.
const W1_MAX_RATIO: f64 = 2.0;
const W1_MAX_US: f64 = 37.6;
const W2_MIN_RPS: f64 = 1_000_000.0;
const W2_MIN_SHARE: f64 = 0.20;
const W3_MIN_SHARE: f64 = 0.70;
const W2_MAX_GROWTH: f64 = 1.5;
const RSS_MAX_MIB: f64 = 64.0;

struct Opts {
    rounds: usize,
    /// How long one round of one system runs.
    round: Duration,
    only: Option<String>,
    /// Run the many-clients workloads alone.
    many_only: bool,
    /// Leave the many-clients workloads out.
    skip_many: bool,
    /// How long each many-clients run is measured, after its warm-up.
    many_secs: Duration,
    /// Rounds of the 200-clients workload, raw and crate alternately; the
    /// 1,000-clients workload runs once.
    many_rounds: usize,
    /// The crate server's `max_connections` in the many-clients workloads.
    /// Default: the number of clients.
    max_connections: Option<usize>,
}

fn parse_args() -> Opts {
    let mut opts = Opts {
        rounds: 7,
        round: Duration::from_millis(300),
        only: None,
        many_only: false,
        skip_many: false,
        many_secs: Duration::from_secs(3),
        many_rounds: 3,
        max_connections: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => {
                opts.rounds = 3;
                opts.round = Duration::from_millis(100);
                opts.skip_many = true;
                opts.many_secs = Duration::from_secs(1);
                opts.many_rounds = 1;
            }
            "--many" => opts.many_only = true,
            "--no-many" => opts.skip_many = true,
            "--max-connections" => {
                opts.max_connections = Some(
                    args.next()
                        .and_then(|s| s.parse().ok())
                        .expect("--max-connections N"),
                )
            }
            "--rounds" => {
                opts.rounds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--rounds N")
            }
            "--many-rounds" => {
                opts.many_rounds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--many-rounds N")
            }
            "--round-ms" => {
                let ms = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--round-ms MS");
                opts.round = Duration::from_millis(ms);
            }
            "--only" => {
                opts.only = Some(
                    args.next()
                        .expect("--only w1|w2:N|w3|hol|many:N|many-server:N|many-clients:N|raw-w1|raw-w2:N|raw-w3|raw-many:N"),
                )
            }
            "--secs" => {
                // For profiling: one long round.
                let secs: f64 = args.next().and_then(|s| s.parse().ok()).expect("--secs S");
                opts.rounds = 1;
                opts.round = Duration::from_secs_f64(secs);
                opts.many_secs = opts.round;
            }
            "--bench" => {} // passed by `cargo bench`
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    opts
}

fn main() {
    let opts = parse_args();
    watchdog(Duration::from_secs(600));
    if let Some(only) = &opts.only {
        run_only(&opts, only);
        return;
    }
    let started = Instant::now();
    if opts.many_only {
        println!(
            "packetstream bench, many clients: {} CPUs, default Config (grace 10 ms, 4 handler threads)",
            thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("Load average at start: {}", loadavg());
        println!();
        let many = bench_many(&opts);
        print_table_head();
        print_many_rows(&many);
        println!();
        print_many_details(&opts, &many);
        println!(
            "Total time: {:.1} s; load average at end: {}",
            started.elapsed().as_secs_f64(),
            loadavg()
        );
        return;
    }
    println!(
        "packetstream bench: {} rounds of {} ms per system, {} CPUs, default Config (grace 10 ms, 4 handler threads)",
        opts.rounds,
        opts.round.as_millis(),
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("Load average at start: {}", loadavg());
    println!();

    let mut verdicts = Vec::new();
    let w1 = bench_w1(&opts);
    let w2 = bench_w2(&opts);
    let w3 = bench_w3(&opts);
    let (ext_w1, ext_w2) = bench_extensions(&opts);
    let rss = peak_rss_w2(&opts, 10_000);
    let allocs = count_allocs();
    let many = if opts.skip_many {
        Vec::new()
    } else {
        bench_many(&opts)
    };

    print_table_head();
    println!(
        "| W1 sync call, 32 B | {:.1} µs | {:.1} µs | {:.2}× | {:.2} | {:.2} | {:.2} |",
        w1.raw.value,
        w1.lib.value,
        w1.lib.value / w1.raw.value,
        w1.raw.ctx_per_rq,
        w1.lib.ctx_per_rq,
        w1.lib.writes_per_rq
    );
    for (window, m) in &w2 {
        println!(
            "| W2 pipelined, {window} in flight, 32 B | {} req/s ({:.0} ns/rq) | {} req/s ({:.0} ns/rq) | {:.2} | {:.3} | {:.3} | {:.3} |",
            fmt_rate(m.raw.value),
            1e9 / m.raw.value,
            fmt_rate(m.lib.value),
            1e9 / m.lib.value,
            m.lib.value / m.raw.value,
            m.raw.ctx_per_rq,
            m.lib.ctx_per_rq,
            m.lib.writes_per_rq
        );
    }
    println!(
        "| W3 echo 1 MiB (one way) | {:.0} MB/s | {:.0} MB/s | {:.2} | {:.1} | {:.1} | {:.1} |",
        w3.raw.value,
        w3.lib.value,
        w3.lib.value / w3.raw.value,
        w3.raw.ctx_per_rq,
        w3.lib.ctx_per_rq,
        w3.lib.writes_per_rq
    );
    print_many_rows(&many);
    println!();
    println!("Ratios: W1 is crate time / raw time (lower is better); W2 and W3 are crate rate / raw rate (higher is better).");
    print_extensions(&ext_w1, &ext_w2);
    println!(
        "Peak RSS during W2 with 10,000 in flight: {:.1} MiB (VmHWM; {:.1} MiB before the phase).",
        rss.1, rss.0
    );
    println!(
        "Heap allocations per request (both ends, untimed pass): W1 sync {:.2}, W2 pipelined (256) {:.2}; bytes allocated per request: {:.0} and {:.0}.",
        allocs.sync.0, allocs.pipelined.0, allocs.sync.1, allocs.pipelined.1
    );
    println!();
    if many.is_empty() {
        println!("Many-clients workloads left out (run them with --many).");
        println!();
    } else {
        print_many_details(&opts, &many);
    }

    let w1_ratio = w1.lib.value / w1.raw.value;
    verdicts.push((
        format!("W1 ≤ {W1_MAX_RATIO}× raw ping-pong: {w1_ratio:.2}×"),
        w1_ratio <= W1_MAX_RATIO,
    ));
    verdicts.push((
        format!("W1 faster than {W1_MAX_US} µs: {:.1} µs", w1.lib.value),
        w1.lib.value < W1_MAX_US,
    ));
    let at = |window: usize| {
        &w2.iter()
            .find(|(w, _)| *w == window)
            .expect("window measured")
            .1
    };
    let w2t = at(W2_WINDOW);
    verdicts.push((
        format!(
            "W2 (256) ≥ 1,000,000 req/s: {} req/s",
            fmt_rate(w2t.lib.value)
        ),
        w2t.lib.value >= W2_MIN_RPS,
    ));
    let share = w2t.lib.value / w2t.raw.value;
    verdicts.push((
        format!(
            "W2 (256) ≥ {:.0}% of raw pipeline: {:.1}%",
            W2_MIN_SHARE * 100.0,
            share * 100.0
        ),
        share >= W2_MIN_SHARE,
    ));
    let w3_share = w3.lib.value / w3.raw.value;
    verdicts.push((
        format!(
            "W3 ≥ {:.0}% of raw bandwidth: {:.1}%",
            W3_MIN_SHARE * 100.0,
            w3_share * 100.0
        ),
        w3_share >= W3_MIN_SHARE,
    ));
    let growth = (1.0 / at(10_000).lib.value) / (1.0 / w2t.lib.value);
    verdicts.push((
        format!("W2 cost per request at 10,000 in flight ≤ {W2_MAX_GROWTH}× the cost at 256: {growth:.2}×"),
        growth <= W2_MAX_GROWTH,
    ));
    verdicts.push((
        format!(
            "Peak RSS during W2 at 10,000 in flight < {RSS_MAX_MIB} MiB: {:.1} MiB",
            rss.1
        ),
        rss.1 < RSS_MAX_MIB,
    ));
    for (what, pass) in &verdicts {
        println!("{} {what}", if *pass { "PASS" } else { "MISS" });
    }
    println!();
    println!(
        "Total time: {:.1} s; load average at end: {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}

/// Ends the process if the bench hangs.
fn watchdog(limit: Duration) {
    thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            thread::sleep(limit);
            eprintln!("bench: still running after {limit:?}; giving up");
            std::process::exit(3);
        })
        .expect("spawn watchdog");
}

/// The first three fields of `/proc/loadavg`: other work on the machine
/// skews every figure, raw ones included.
fn loadavg() -> String {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt_rate(rps: f64) -> String {
    if rps >= 1e6 {
        format!("{:.2} M", rps / 1e6)
    } else if rps >= 1e3 {
        format!("{:.1} k", rps / 1e3)
    } else {
        format!("{rps:.0}")
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------
// Measurement plumbing.

/// One round of one system: its figure and what it cost per request.
#[derive(Clone, Copy, Default)]
struct Sample {
    value: f64,
    ctx_per_rq: f64,
    writes_per_rq: f64,
}

/// Medians over the rounds of the raw baseline and of the crate.
#[derive(Default)]
struct Pair {
    raw: Sample,
    lib: Sample,
}

fn median_sample(samples: &[Sample]) -> Sample {
    Sample {
        value: median(samples.iter().map(|s| s.value).collect()),
        ctx_per_rq: median(samples.iter().map(|s| s.ctx_per_rq).collect()),
        writes_per_rq: median(samples.iter().map(|s| s.writes_per_rq).collect()),
    }
}

/// Context switches, voluntary and not, of every thread of this process.
fn ctx_switches() -> u64 {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(rest) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += rest.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// A connected pair: an echo server and a client, default settings.
struct Conn {
    client: PacketConnection,
    server: PacketConnection,
}

impl Conn {
    fn new() -> Conn {
        Conn::with_extensions(true)
    }

    /// A pair with the extensions on (the default) or off at both ends.
    fn with_extensions(on: bool) -> Conn {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let server = PacketConnection::from_unix_stream(
            b,
            Config::default()
                .name("server")
                .extensions(on)
                .handler(|rq: Request| {
                    Ok(Reply {
                        flags: rq.flags,
                        payload: rq.payload,
                    })
                }),
        )
        .expect("server");
        let client =
            PacketConnection::from_unix_stream(a, Config::default().name("client").extensions(on))
                .expect("client");
        Conn { client, server }
    }

    fn writes(&self) -> u64 {
        self.client.stats().writes + self.server.stats().writes
    }

    fn close(self) {
        self.client.close().expect("client close");
        self.server.join().expect("server join");
    }
}

/// What a workload measured over its timed span.
/// Measures a pipeline in steady state: from the moment the first window
/// has turned over, for at least `round` and four windows of requests.
struct SteadyState {
    window: u64,
    round: Duration,
    /// When the span started, requests done then, context switches then.
    start: Option<(Instant, u64, u64)>,
}

impl SteadyState {
    fn new(window: usize, round: Duration) -> SteadyState {
        SteadyState {
            window: window as u64,
            round,
            start: None,
        }
    }

    /// Notes that `done` requests have completed; returns the span once it
    /// is long enough.
    fn tick(&mut self, done: u64) -> Option<Span> {
        match self.start {
            None if done >= self.window => {
                self.start = Some((Instant::now(), done, ctx_switches()));
                None
            }
            Some((t0, d0, ctx0)) if done - d0 >= 4 * self.window && t0.elapsed() >= self.round => {
                Some(Span {
                    value: (done - d0) as f64 / t0.elapsed().as_secs_f64(),
                    n: done - d0,
                    ctx: ctx_switches() - ctx0,
                })
            }
            _ => None,
        }
    }
}

struct Span {
    /// Its figure: seconds per request, or requests per second.
    value: f64,
    /// Requests in the span.
    n: u64,
    /// Context switches in the span, every thread of the process.
    ctx: u64,
}

/// Runs `body` and returns its figure with the per-request costs.
fn sample(conn: Option<&Conn>, body: impl FnOnce() -> Span) -> Sample {
    let w0 = conn.map_or(0, Conn::writes);
    let Span { value, n, ctx } = body();
    let writes = conn.map_or(0, Conn::writes) - w0;
    Sample {
        value,
        ctx_per_rq: ctx as f64 / n as f64,
        writes_per_rq: writes as f64 / n as f64,
    }
}

// ---------------------------------------------------------------------------
// The raw baseline: u32 length-prefixed frames over a socketpair.

/// An echo server thread on `stream`: reads frames through a `BufReader`,
/// answers each through a `BufWriter`, and flushes when it has no more input
/// buffered. Ends at EOF.
fn raw_echo_server(stream: UnixStream) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::with_capacity(64 << 10, stream.try_clone().expect("clone"));
        let mut w = BufWriter::with_capacity(64 << 10, stream);
        let mut buf = Vec::new();
        loop {
            let mut len = [0u8; 4];
            if r.read_exact(&mut len).is_err() {
                return;
            }
            let n = u32::from_le_bytes(len) as usize;
            buf.resize(n, 0);
            r.read_exact(&mut buf).expect("frame body");
            w.write_all(&len).expect("write");
            w.write_all(&buf).expect("write");
            if r.buffer().is_empty() {
                w.flush().expect("flush");
            }
        }
    })
}

fn frame(payload_len: usize) -> Vec<u8> {
    let mut f = (payload_len as u32).to_le_bytes().to_vec();
    f.extend(std::iter::repeat_n(0xa5, payload_len));
    f
}

fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).expect("reply head");
    buf.resize(u32::from_le_bytes(len) as usize, 0);
    r.read_exact(buf).expect("reply body");
}

/// Raw ping-pong: the calling thread writes a frame and reads the echo.
/// Returns (seconds per round trip, round trips).
fn raw_pingpong(payload_len: usize, round: Duration) -> Span {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let server = raw_echo_server(b);
    let out = frame(payload_len);
    let mut w = a.try_clone().expect("clone");
    let mut r = BufReader::with_capacity(64 << 10, a);
    let mut buf = Vec::new();
    for _ in 0..10 {
        w.write_all(&out).expect("write");
        read_frame(&mut r, &mut buf);
    }
    let ctx0 = ctx_switches();
    let t0 = Instant::now();
    let mut n = 0u64;
    while n < 20 || t0.elapsed() < round {
        w.write_all(&out).expect("write");
        read_frame(&mut r, &mut buf);
        n += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    let ctx = ctx_switches() - ctx0;
    assert_eq!(buf.len(), payload_len);
    drop(w);
    drop(r);
    server.join().expect("raw server");
    Span {
        value: secs / n as f64,
        n,
        ctx,
    }
}

/// The window shared by the raw submitter and the raw reply reader.
struct RawWindow {
    completed: AtomicU64,
    waiting: AtomicBool,
    lock: Mutex<()>,
    opened: Condvar,
}

/// Raw pipeline with `window` requests in flight. Returns (requests per
/// second, requests) over the steady-state span.
fn raw_pipeline(window: usize, round: Duration) -> Span {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let server = raw_echo_server(b);
    let shared = Arc::new(RawWindow {
        completed: AtomicU64::new(0),
        waiting: AtomicBool::new(false),
        lock: Mutex::new(()),
        opened: Condvar::new(),
    });
    // The reader takes replies until the server, seeing our write side
    // shut, closes the socket.
    let reader = {
        let shared = Arc::clone(&shared);
        let mut r = BufReader::with_capacity(64 << 10, a.try_clone().expect("clone"));
        thread::spawn(move || {
            let mut len = [0u8; 4];
            let mut buf = Vec::new();
            while r.read_exact(&mut len).is_ok() {
                buf.resize(u32::from_le_bytes(len) as usize, 0);
                r.read_exact(&mut buf).expect("reply body");
                shared.completed.fetch_add(1, Ordering::SeqCst);
                if shared.waiting.load(Ordering::SeqCst) {
                    let _guard = shared.lock.lock().expect("lock");
                    shared.opened.notify_one();
                }
            }
        })
    };
    let out = frame(SMALL);
    let mut w = BufWriter::with_capacity(64 << 10, a);
    let mut sent = 0u64;
    let mut steady = SteadyState::new(window, round);
    let result = loop {
        if sent - shared.completed.load(Ordering::SeqCst) >= window as u64 {
            w.flush().expect("flush");
            let mut guard = shared.lock.lock().expect("lock");
            shared.waiting.store(true, Ordering::SeqCst);
            while sent - shared.completed.load(Ordering::SeqCst) >= window as u64 {
                guard = shared.opened.wait(guard).expect("wait");
            }
            shared.waiting.store(false, Ordering::SeqCst);
            drop(guard);
        }
        w.write_all(&out).expect("write");
        sent += 1;
        if sent.is_multiple_of(64) {
            if let Some(span) = steady.tick(shared.completed.load(Ordering::SeqCst)) {
                break span;
            }
        }
    };
    w.flush().expect("flush");
    w.get_ref().shutdown(Shutdown::Write).expect("shutdown");
    server.join().expect("raw server");
    reader.join().expect("raw reader");
    assert_eq!(shared.completed.load(Ordering::SeqCst), sent);
    result
}

// ---------------------------------------------------------------------------
// The crate's workloads.

/// Sync calls. Returns (seconds per call, calls).
fn lib_calls(conn: &Conn, payload_len: usize, round: Duration) -> Span {
    let payload = vec![0xa5u8; payload_len];
    let ctx0 = ctx_switches();
    let t0 = Instant::now();
    let mut n = 0u64;
    while n < 20 || t0.elapsed() < round {
        let rsp = conn.client.call(ECHO, 0, &payload).expect("call");
        assert_eq!(rsp.payload.len(), payload_len);
        n += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    Span {
        value: secs / n as f64,
        n,
        ctx: ctx_switches() - ctx0,
    }
}

/// Pipelined requests, `window` in flight. Returns (requests per second,
/// requests) over the steady-state span.
fn lib_pipeline(conn: &Conn, window: usize, round: Duration) -> Span {
    let payload = [0xa5u8; SMALL];
    let mut queue = VecDeque::with_capacity(window);
    let mut done = 0u64;
    let mut steady = SteadyState::new(window, round);
    let result = loop {
        while queue.len() < window {
            queue.push_back(conn.client.submit(ECHO, 0, &payload).expect("submit"));
        }
        let pending = queue.pop_front().expect("window not empty");
        let rsp = pending.wait().expect("response");
        debug_assert_eq!(rsp.payload.len(), SMALL);
        done += 1;
        if done.is_multiple_of(64) || window < 64 {
            if let Some(span) = steady.tick(done) {
                break span;
            }
        }
    };
    for pending in queue {
        pending.wait().expect("response");
    }
    result
}

// ---------------------------------------------------------------------------
// The workloads, raw and crate round by round.

fn bench_w1(opts: &Opts) -> Pair {
    eprint!("W1 ");
    let conn = Conn::new();
    lib_calls(&conn, SMALL, Duration::from_millis(50));
    let (mut raw, mut lib) = (Vec::new(), Vec::new());
    for _ in 0..opts.rounds {
        raw.push(sample(None, || {
            let span = raw_pingpong(SMALL, opts.round);
            let secs = span.value;
            Span {
                value: secs * 1e6,
                ..span
            }
        }));
        lib.push(sample(Some(&conn), || {
            let span = lib_calls(&conn, SMALL, opts.round);
            let secs = span.value;
            Span {
                value: secs * 1e6,
                ..span
            }
        }));
        eprint!(".");
    }
    finish(conn, &raw, &lib)
}

fn bench_w2(opts: &Opts) -> Vec<(usize, Pair)> {
    let conn = Conn::new();
    let mut out = Vec::new();
    for window in WINDOWS {
        eprint!("W2 {window} ");
        lib_pipeline(&conn, window, Duration::from_millis(30));
        let (mut raw, mut lib) = (Vec::new(), Vec::new());
        for _ in 0..opts.rounds {
            raw.push(sample(None, || raw_pipeline(window, opts.round)));
            lib.push(sample(Some(&conn), || {
                lib_pipeline(&conn, window, opts.round)
            }));
            eprint!(".");
        }
        eprintln!();
        out.push((
            window,
            Pair {
                raw: median_sample(&raw),
                lib: median_sample(&lib),
            },
        ));
    }
    conn.close();
    out
}

/// W1 and W2 (256) with the extensions off (as `raw`) and on (as `lib`),
/// round by round: what the extensions cost when nothing uses them.
fn bench_extensions(opts: &Opts) -> (Pair, Pair) {
    eprint!("extensions off/on ");
    let (off, on) = (Conn::with_extensions(false), Conn::with_extensions(true));
    for conn in [&off, &on] {
        lib_calls(conn, SMALL, Duration::from_millis(50));
        lib_pipeline(conn, W2_WINDOW, Duration::from_millis(30));
    }
    let micros = |span: Span| Span {
        value: span.value * 1e6,
        ..span
    };
    let (mut w1, mut w2) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for _ in 0..opts.rounds {
        for (at, conn) in [&off, &on].into_iter().enumerate() {
            w1[at].push(sample(Some(conn), || {
                micros(lib_calls(conn, SMALL, opts.round))
            }));
            w2[at].push(sample(Some(conn), || {
                lib_pipeline(conn, W2_WINDOW, opts.round)
            }));
        }
        eprint!(".");
    }
    eprintln!();
    off.close();
    on.close();
    let pair = |samples: &[Vec<Sample>; 2]| Pair {
        raw: median_sample(&samples[0]),
        lib: median_sample(&samples[1]),
    };
    (pair(&w1), pair(&w2))
}

fn print_extensions(w1: &Pair, w2: &Pair) {
    println!(
        "Extensions unused, on (the default) against off, same run: W1 {:.1} µs against {:.1} µs ({:.3}×, lower is better); W2 (256) {} against {} req/s ({:.3}×, higher is better).",
        w1.lib.value,
        w1.raw.value,
        w1.lib.value / w1.raw.value,
        fmt_rate(w2.lib.value),
        fmt_rate(w2.raw.value),
        w2.lib.value / w2.raw.value
    );
}

fn bench_w3(opts: &Opts) -> Pair {
    eprint!("W3 ");
    let conn = Conn::new();
    lib_calls(&conn, LARGE, Duration::from_millis(50));
    let mb_per_s = |span: Span| Span {
        value: LARGE as f64 / span.value / 1e6,
        ..span
    };
    let (mut raw, mut lib) = (Vec::new(), Vec::new());
    for _ in 0..opts.rounds {
        raw.push(sample(None, || mb_per_s(raw_pingpong(LARGE, opts.round))));
        lib.push(sample(Some(&conn), || {
            mb_per_s(lib_calls(&conn, LARGE, opts.round))
        }));
        eprint!(".");
    }
    finish(conn, &raw, &lib)
}

/// Ends a workload: closes its connection and takes the medians.
fn finish(conn: Conn, raw: &[Sample], lib: &[Sample]) -> Pair {
    conn.close();
    eprintln!();
    Pair {
        raw: median_sample(raw),
        lib: median_sample(lib),
    }
}

fn status_kib(field: &str) -> f64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(f64::NAN)
}

/// Peak RSS in MiB during W2 at `window` in flight: (RSS before, peak).
fn peak_rss_w2(opts: &Opts, window: usize) -> (f64, f64) {
    eprintln!("RSS at {window}");
    let conn = Conn::new();
    let before = status_kib("VmRSS:") / 1024.0;
    if let Err(e) = fs::write("/proc/self/clear_refs", "5") {
        eprintln!("cannot reset the RSS high-water mark: {e}");
    }
    for _ in 0..2 {
        lib_pipeline(&conn, window, opts.round);
    }
    let peak = status_kib("VmHWM:") / 1024.0;
    conn.close();
    (before, peak)
}

struct Allocs {
    /// (allocations, bytes) per request.
    sync: (f64, f64),
    pipelined: (f64, f64),
}

/// Counts heap allocations per request in steady state, untimed.
fn count_allocs() -> Allocs {
    eprintln!("allocations");
    let conn = Conn::new();
    let payload = [0xa5u8; SMALL];
    let n = 20_000u64;
    let per_rq =
        |(allocations, bytes): (u64, u64)| (allocations as f64 / n as f64, bytes as f64 / n as f64);
    for _ in 0..1000 {
        conn.client.call(ECHO, 0, &payload).expect("call");
    }
    let sync = per_rq(counting_allocs(|| {
        for _ in 0..n {
            conn.client.call(ECHO, 0, &payload).expect("call");
        }
    }));
    lib_pipeline(&conn, W2_WINDOW, Duration::from_millis(20));
    let mut queue = VecDeque::with_capacity(W2_WINDOW);
    let pipelined = per_rq(counting_allocs(|| {
        for _ in 0..n {
            if queue.len() == W2_WINDOW {
                let pending: packetstream::PendingResponse = queue.pop_front().expect("full");
                pending.wait().expect("response");
            }
            queue.push_back(conn.client.submit(ECHO, 0, &payload).expect("submit"));
        }
        for pending in queue.drain(..) {
            pending.wait().expect("response");
        }
    }));
    conn.close();
    Allocs { sync, pipelined }
}

/// Head-of-line: a 32 B request followed at once, on the same connection,
/// by a 256 MiB one, as one write from the caller; reports how long the
/// small request's answer takes, against the same request alone.
/// `--rounds` sets the number of samples.
fn head_of_line(opts: &Opts) {
    const BIG: usize = 256 << 20;
    const SMALL_RQ: u64 = 1;
    const BIG_RQ: u64 = 2;
    let (a, b) = UnixStream::pair().expect("socketpair");
    let server = PacketConnection::from_unix_stream(
        b,
        Config::default()
            .name("hol-server")
            .max_packet_len(BIG as u64 + 64)
            .handler(|rq: Request| match rq.rq_type {
                SMALL_RQ => Ok(rq.payload.into()),
                _ => Ok(().into()),
            }),
    )
    .expect("server");
    let client = Arc::new(
        PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name("hol-client")
                .max_packet_len(BIG as u64 + 64)
                .max_queued_bytes(2 * BIG),
        )
        .expect("client"),
    );
    let big = vec![7u8; BIG];
    let samples = opts.rounds.max(30);
    let (mut alone, mut behind) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let t0 = Instant::now();
        client.call(SMALL_RQ, 0, &[1; SMALL]).expect("small alone");
        alone.push(t0.elapsed());
        // The small request is queued; the big one's submit writes it, its
        // own head and its payload in one go, from this thread, while
        // another thread waits for the small one's answer.
        let t0 = Instant::now();
        let small = client.submit(SMALL_RQ, 0, &[1; SMALL]).expect("small");
        let waiter = thread::spawn(move || {
            small
                .wait_timeout(Duration::from_secs(60))
                .expect("small behind");
            t0.elapsed()
        });
        let big_rq = client.submit(BIG_RQ, 0, &big).expect("big");
        behind.push(waiter.join().expect("waiter"));
        big_rq.wait_timeout(Duration::from_secs(60)).expect("big");
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    println!(
        "hol: a 32 B request alone: median {:?}, p99 {:?}; with a 256 MiB request right behind it: median {:?}, p99 {:?} ({samples} samples each)",
        pct(&mut alone, 0.5),
        pct(&mut alone, 0.99),
        pct(&mut behind, 0.5),
        pct(&mut behind, 0.99)
    );
    drop(client);
    let _ = server.close_timeout(Duration::from_secs(60));
}

/// Runs one workload alone, for profilers: `w1`, `w2:N`, `w3`, `hol`,
/// `many:N`, or the same with a `raw-` prefix.
fn run_only(opts: &Opts, only: &str) {
    let (raw, what) = match only.strip_prefix("raw-") {
        Some(rest) => (true, rest),
        None => (false, only),
    };
    let many = match what.split_once(':') {
        Some(("many", clients)) => Some((if raw { Mix::Raw } else { Mix::Lib }, clients)),
        Some(("many-server", clients)) if !raw => Some((Mix::LibServer, clients)),
        Some(("many-clients", clients)) if !raw => Some((Mix::LibClients, clients)),
        _ => None,
    };
    if let Some((mix, clients)) = many {
        let clients: usize = clients.parse().expect("many:N");
        let max_connections = opts.max_connections.unwrap_or(clients);
        let t0 = Instant::now();
        let load = loadavg();
        match run_many(mix, clients, max_connections, opts.many_secs) {
            Ok(run) => {
                println!(
                    "{only}: {} req/s, p50 {}, p99 {}, {} calls measured in {:.1} s",
                    fmt_rate(run.rps),
                    fmt_us(run.p50_us),
                    fmt_us(run.p99_us),
                    run.calls,
                    opts.many_secs.as_secs_f64()
                );
                println!(
                    "threads: {} of the server, {} in all; VmRSS {:.1} MiB mid-run, VmHWM {:.1} MiB",
                    run.server_threads, run.all_threads, run.rss_mib, run.hwm_mib
                );
                println!(
                    "clients connected in {:.2} s; {} with no call measured; longest call {:.1} ms; {:.1} s in all; load average {load} at start, {} at end",
                    run.connect_secs,
                    run.idle_clients,
                    run.longest.as_secs_f64() * 1e3,
                    t0.elapsed().as_secs_f64(),
                    loadavg()
                );
            }
            Err(e) => {
                println!("{only}: failed: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if what == "hol" {
        head_of_line(opts);
        return;
    }
    if what == "ext" {
        let (w1, w2) = bench_extensions(opts);
        print_extensions(&w1, &w2);
        return;
    }
    let conn = (!raw).then(Conn::new);
    let t0 = Instant::now();
    let (value, unit, n) = match what.split_once(':') {
        Some(("w2", window)) => {
            let window: usize = window.parse().expect("w2:N");
            let Span { value: rps, n, .. } = match &conn {
                Some(conn) => lib_pipeline(conn, window, opts.round),
                None => raw_pipeline(window, opts.round),
            };
            (rps, "req/s", n)
        }
        _ if what == "w1" || what == "w3" => {
            let len = if what == "w1" { SMALL } else { LARGE };
            let Span { value: secs, n, .. } = match &conn {
                Some(conn) => lib_calls(conn, len, opts.round),
                None => raw_pingpong(len, opts.round),
            };
            (secs * 1e6, "µs/call", n)
        }
        _ => {
            eprintln!("unknown workload {only}");
            std::process::exit(2);
        }
    };
    let stats = conn.as_ref().map(|c| (c.client.stats(), c.server.stats()));
    println!(
        "{only}: {value:.2} {unit}, {n} requests measured, {:.2} s in all",
        t0.elapsed().as_secs_f64()
    );
    if let Some((client, server)) = stats {
        println!(
            "client: {} packets out, {} writes; server: {} packets out, {} writes",
            client.packets_out, client.writes, server.packets_out, server.writes
        );
    }
    if let Some(conn) = conn {
        conn.close();
    }
}

// ---------------------------------------------------------------------------
// Many clients: N TCP clients on loopback against one server, each a closed
// loop of sync calls.

/// Client counts of the many-clients workload.
const MANY_CLIENTS: [usize; 2] = [200, 1000];
/// Stack size of the bench's client threads and of the raw server's
/// threads, thousands of which run at once.
const MANY_STACK: usize = 64 << 10;
/// Calls made in the first part of a run are not measured.
const MANY_WARMUP: Duration = Duration::from_millis(500);
/// How long connecting every client may take before the bench gives up.
const MANY_CONNECT_LIMIT: Duration = Duration::from_secs(30);
/// How long every client, and then the server, may take to end after the
/// run before the bench gives up.
const MANY_END_LIMIT: Duration = Duration::from_secs(10);
/// Client threads started whose connection the server has not accepted
/// yet, at most: keeps the listener's backlog (128) from overflowing, which
/// would hold a connect up for a SYN retransmit (1 s).
const MANY_UNACCEPTED: usize = 64;
/// The servers' names, which prefix the names of their threads.
const RAW_SERVER: &str = "raw";
const LIB_SERVER: &str = "many";

/// What one system measured with N clients.
struct ManyRun {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Calls measured: begun after the warm-up, ended before the run did.
    calls: u64,
    /// The server's threads (accept thread included) and all the process's
    /// threads, counted just before the start.
    server_threads: usize,
    all_threads: usize,
    /// VmRSS halfway through the run, and VmHWM at its end (reset before
    /// the server starts), in MiB.
    rss_mib: f64,
    hwm_mib: f64,
    /// From starting the server until it served every client.
    connect_secs: f64,
    /// Clients that completed no call in the measured span.
    idle_clients: usize,
    /// The longest call of any client, measured or not.
    longest: Duration,
}

/// Call durations in log buckets, 16 to each power of two of nanoseconds:
/// a percentile read from it (a bucket's midpoint) is within 3.2%.
struct Histogram {
    counts: Vec<u32>,
}

const HIST_SUB_BITS: u32 = 4;
/// Durations are clamped below 2^40 ns, about 18 minutes.
const HIST_MAX_BITS: u32 = 40;
const HIST_BUCKETS: usize = ((HIST_MAX_BITS - HIST_SUB_BITS + 1) as usize) << HIST_SUB_BITS;

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: vec![0; HIST_BUCKETS],
        }
    }

    fn record(&mut self, d: Duration) {
        let ns = (d.as_nanos() as u64).min((1 << HIST_MAX_BITS) - 1);
        let idx = if ns < 1 << HIST_SUB_BITS {
            ns as usize
        } else {
            let exp = 63 - ns.leading_zeros();
            let group = (exp - HIST_SUB_BITS + 1) as usize;
            let sub = (ns >> (exp - HIST_SUB_BITS)) as usize - (1 << HIST_SUB_BITS);
            (group << HIST_SUB_BITS) + sub
        };
        self.counts[idx] += 1;
    }

    /// The middle of bucket `idx`, in nanoseconds.
    fn bucket_mid(idx: usize) -> f64 {
        let group = idx >> HIST_SUB_BITS;
        if group == 0 {
            return idx as f64;
        }
        let sub = (idx & ((1 << HIST_SUB_BITS) - 1)) as u64;
        let low = ((1 << HIST_SUB_BITS) + sub) << (group - 1);
        low as f64 + (1u64 << (group - 1)) as f64 / 2.0
    }

    /// The `q` quantile of the merged counts, in microseconds.
    fn quantile_us(merged: &[u64], q: f64) -> f64 {
        let total: u64 = merged.iter().sum();
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (idx, &count) in merged.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Histogram::bucket_mid(idx) / 1e3;
            }
        }
        f64::NAN
    }
}

/// One client of the workload: makes a call, and ends its connection.
trait ManyClient {
    fn call(&mut self) -> Result<(), String>;
    fn finish(self) -> Result<(), String>;
}

/// A raw client: writes a frame, reads the echo.
struct RawClient {
    stream: BufReader<TcpStream>,
    frame: Vec<u8>,
    buf: Vec<u8>,
}

impl RawClient {
    fn connect(addr: SocketAddr) -> Result<RawClient, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        Ok(RawClient {
            stream: BufReader::with_capacity(4096, stream),
            frame: frame(SMALL),
            buf: Vec::with_capacity(SMALL),
        })
    }
}

impl ManyClient for RawClient {
    fn call(&mut self) -> Result<(), String> {
        let mut w: &TcpStream = self.stream.get_ref();
        w.write_all(&self.frame)
            .map_err(|e| format!("write: {e}"))?;
        let mut len = [0u8; 4];
        self.stream
            .read_exact(&mut len)
            .map_err(|e| format!("reply head: {e}"))?;
        self.buf.resize(u32::from_le_bytes(len) as usize, 0);
        self.stream
            .read_exact(&mut self.buf)
            .map_err(|e| format!("reply body: {e}"))?;
        if self.buf.len() != SMALL {
            return Err(format!("echo of {} bytes, not {SMALL}", self.buf.len()));
        }
        Ok(())
    }

    fn finish(self) -> Result<(), String> {
        Ok(())
    }
}

/// A client that speaks the crate's wire format with no library: it writes
/// one prepared request packet (channel 0, one tag: each is answered before
/// the next is sent) and reads packets until the response, skipping the
/// server's hello and anything else.
struct WireClient {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl WireClient {
    fn connect(addr: SocketAddr) -> Result<WireClient, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let mut request = Vec::new();
        Packet {
            channel: 0,
            tag: 1,
            kind: PacketKind::Request {
                rq_type: ECHO,
                flags: 0,
            },
            payload: vec![0xa5; SMALL],
        }
        .encode_into(&mut request);
        Ok(WireClient {
            stream,
            request,
            buf: Vec::with_capacity(4096),
        })
    }
}

impl ManyClient for WireClient {
    fn call(&mut self) -> Result<(), String> {
        (&self.stream)
            .write_all(&self.request)
            .map_err(|e| format!("write: {e}"))?;
        loop {
            while let Some((packet, used)) =
                Packet::decode(&self.buf, 1 << 20).map_err(|e| format!("decode: {e}"))?
            {
                self.buf.drain(..used);
                if let (0, PacketKind::Response { ok, .. }) = (packet.channel, packet.kind) {
                    if !ok || packet.payload.len() != SMALL {
                        return Err(format!("bad echo: ok {ok}, {} bytes", packet.payload.len()));
                    }
                    return Ok(());
                }
            }
            let mut chunk = [0u8; 4096];
            match (&self.stream).read(&mut chunk) {
                Ok(0) => return Err("the server ended the stream".to_string()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    fn finish(self) -> Result<(), String> {
        Ok(())
    }
}

/// Serves the crate's wire format with no library: answers each request on
/// channel 0 with its echo, ignores the rest (the client's hello goes
/// unanswered, which the client does not wait for), and answers the
/// client's EOF with its own.
fn wire_tcp_echo(stream: &TcpStream) {
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    loop {
        out.clear();
        while let Ok(Some((packet, used))) = Packet::decode(&buf, 1 << 20) {
            buf.drain(..used);
            if packet.is_eof() {
                Packet::eof().encode_into(&mut out);
                let _ = (&*stream).write_all(&out);
                return;
            }
            if let (0, PacketKind::Request { flags, .. }) = (packet.channel, packet.kind) {
                Packet {
                    channel: 0,
                    tag: packet.tag,
                    kind: PacketKind::Response { ok: true, flags },
                    payload: packet.payload,
                }
                .encode_into(&mut out);
            }
        }
        if !out.is_empty() && (&*stream).write_all(&out).is_err() {
            return;
        }
        let mut chunk = [0u8; 4096];
        match (&*stream).read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

impl ManyClient for PacketConnection {
    fn call(&mut self) -> Result<(), String> {
        let rsp =
            PacketConnection::call(self, ECHO, 0, &[0xa5; SMALL]).map_err(|e| e.to_string())?;
        if rsp.payload.len() != SMALL {
            return Err(format!("echo of {} bytes, not {SMALL}", rsp.payload.len()));
        }
        Ok(())
    }

    fn finish(self) -> Result<(), String> {
        self.close_timeout(MANY_END_LIMIT)
            .map_err(|e| format!("close: {e}"))
    }
}

/// The raw server: an accept thread, and one thread per connection that
/// reads a frame and writes its echo, with blocking I/O.
struct RawServer {
    addr: SocketAddr,
    shared: Arc<RawServerShared>,
    acceptor: JoinHandle<()>,
}

struct RawServerShared {
    stopping: AtomicBool,
    accepted: AtomicU64,
    /// A clone of each accepted stream, to shut it down on a forced stop,
    /// and the thread serving it.
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

impl RawServer {
    fn start(listener: TcpListener, echo: fn(&TcpStream)) -> Result<RawServer, String> {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shared = Arc::new(RawServerShared {
            stopping: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("{RAW_SERVER}:accept"))
                .spawn(move || raw_accept_loop(&listener, &shared, echo))
                .map_err(|e| format!("cannot spawn the raw accept thread: {e}"))?
        };
        Ok(RawServer {
            addr,
            shared,
            acceptor,
        })
    }
}

fn raw_accept_loop(listener: &TcpListener, shared: &RawServerShared, echo: fn(&TcpStream)) {
    loop {
        let stream = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("raw server: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let id = shared.accepted.fetch_add(1, Ordering::SeqCst) + 1;
        let clone = match stream.set_nodelay(true).and_then(|()| stream.try_clone()) {
            Ok(clone) => clone,
            Err(e) => {
                eprintln!("raw server: client #{id}: {e}");
                continue;
            }
        };
        // A client whose thread cannot be spawned sees its stream closed.
        match thread::Builder::new()
            .name(format!("{RAW_SERVER}#{id}"))
            .stack_size(MANY_STACK)
            .spawn(move || echo(&stream))
        {
            Ok(handle) => shared.conns.lock().expect("lock").push((clone, handle)),
            Err(e) => eprintln!("raw server: cannot spawn a thread for client #{id}: {e}"),
        }
    }
}

/// Echoes u32-length-prefixed frames until EOF or an error: one buffered
/// read and one write per frame.
fn raw_tcp_echo(stream: &TcpStream) {
    let mut r = BufReader::with_capacity(4096, stream);
    let mut w = stream;
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if r.read_exact(&mut len).is_err() {
            return;
        }
        buf.clear();
        buf.extend_from_slice(&len);
        buf.resize(4 + u32::from_le_bytes(len) as usize, 0);
        if r.read_exact(&mut buf[4..]).is_err() || w.write_all(&buf).is_err() {
            return;
        }
    }
}

/// The server of a run, raw or the crate's.
enum ManyServer {
    Raw(RawServer),
    Lib(Server),
}

impl ManyServer {
    fn accepted(&self) -> usize {
        match self {
            ManyServer::Raw(server) => server.shared.accepted.load(Ordering::SeqCst) as usize,
            ManyServer::Lib(server) => server.accepted() as usize,
        }
    }

    /// Connections the server has started serving: a thread of the raw
    /// server's, or a connection of the crate's with its threads.
    fn served(&self) -> usize {
        match self {
            ManyServer::Raw(server) => server.shared.conns.lock().expect("lock").len(),
            ManyServer::Lib(server) => server.connections(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            ManyServer::Raw(_) => RAW_SERVER,
            ManyServer::Lib(_) => LIB_SERVER,
        }
    }

    /// Stops the server once its clients have gone; with `force`, cuts
    /// the connections that remain.
    fn stop(self, force: bool) -> Result<(), String> {
        match self {
            ManyServer::Lib(server) => {
                let limit = if force {
                    Duration::from_millis(100)
                } else {
                    MANY_END_LIMIT
                };
                server
                    .stop_timeout(limit)
                    .map_err(|e| format!("server stop: {e}"))
            }
            ManyServer::Raw(server) => {
                let deadline = Instant::now() + MANY_END_LIMIT;
                server.shared.stopping.store(true, Ordering::SeqCst);
                // Wakes the accept thread out of `accept`.
                let _ = TcpStream::connect_timeout(&server.addr, Duration::from_secs(1));
                let conns = std::mem::take(&mut *server.shared.conns.lock().expect("lock"));
                if force {
                    for (stream, _) in &conns {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
                let mut handles: Vec<JoinHandle<()>> = conns.into_iter().map(|(_, h)| h).collect();
                handles.push(server.acceptor);
                let left = join_until(handles, deadline);
                if left == 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "{left} raw server threads still running {MANY_END_LIMIT:?} after the clients ended"
                    ))
                }
            }
        }
    }
}

/// Joins the threads that end by `deadline`; returns how many did not
/// (they are left running).
fn join_until(handles: Vec<JoinHandle<()>>, deadline: Instant) -> usize {
    while Instant::now() < deadline && !handles.iter().all(JoinHandle::is_finished) {
        thread::sleep(Duration::from_millis(5));
    }
    let mut left = 0;
    for handle in handles {
        if handle.is_finished() {
            if handle.join().is_err() {
                eprintln!("a thread of the many-clients workload panicked");
            }
        } else {
            left += 1;
        }
    }
    left
}

/// Starts every client at once: `None` until the run starts, then the
/// start of the measured span and the end of the run, or `Some(None)` when
/// the run is called off.
#[derive(Default)]
struct Gate {
    go: Mutex<Option<Option<(Instant, Instant)>>>,
    opened: Condvar,
}

impl Gate {
    fn open(&self, go: Option<(Instant, Instant)>) {
        *self.go.lock().expect("lock") = Some(go);
        self.opened.notify_all();
    }

    /// Waits for the gate to open, at most `limit`: `None` if the run is
    /// called off or the gate stays shut.
    fn wait(&self, limit: Duration) -> Option<(Instant, Instant)> {
        let deadline = Instant::now() + limit;
        let mut go = self.go.lock().expect("lock");
        loop {
            if let Some(go) = *go {
                return go;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            go = self.opened.wait_timeout(go, left).expect("lock").0;
        }
    }
}

/// What a client thread tells the bench.
enum ManyMsg {
    Connected,
    ConnectFailed(usize, String),
    Done(usize, Result<Tally, String>),
}

/// One client's calls.
struct Tally {
    hist: Histogram,
    calls: u64,
    longest: Duration,
}

/// A client thread: connects, waits at the gate, calls in a closed loop
/// until the end of the run, recording the calls of the measured span, and
/// ends its connection.
fn many_client<C: ManyClient>(
    idx: usize,
    connect: impl FnOnce() -> Result<C, String>,
    gate: &Gate,
    tx: &mpsc::Sender<ManyMsg>,
) {
    let mut client = match connect() {
        Ok(client) => client,
        Err(e) => {
            let _ = tx.send(ManyMsg::ConnectFailed(idx, e));
            return;
        }
    };
    let _ = tx.send(ManyMsg::Connected);
    let mut tally = Tally {
        hist: Histogram::new(),
        calls: 0,
        longest: Duration::ZERO,
    };
    let res = match gate.wait(2 * MANY_CONNECT_LIMIT) {
        None => Ok(()),
        Some((warm, stop)) => loop {
            let t0 = Instant::now();
            if t0 >= stop {
                break Ok(());
            }
            if let Err(e) = client.call() {
                break Err(e);
            }
            let t1 = Instant::now();
            let took = t1 - t0;
            tally.longest = tally.longest.max(took);
            if t0 >= warm && t1 <= stop {
                tally.hist.record(took);
                tally.calls += 1;
            }
        },
    };
    let res = res.and(client.finish());
    let _ = tx.send(ManyMsg::Done(idx, res.map(|()| tally)));
}

/// Threads of this process whose name starts with `{server}#` or is
/// `{server}:accept`, and all threads of the process.
fn count_threads(server: &str) -> (usize, usize) {
    let conn_prefix = format!("{server}#");
    let accept = format!("{server}:accept");
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return (0, 0);
    };
    let (mut ours, mut all) = (0, 0);
    for task in tasks.flatten() {
        all += 1;
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim_end();
        if comm.starts_with(&conn_prefix) || comm == accept {
            ours += 1;
        }
    }
    (ours, all)
}

fn sleep_until(t: Instant) {
    thread::sleep(t.saturating_duration_since(Instant::now()));
}

/// Runs `clients` clients against the raw server or the crate's (whose
/// `max_connections` is `max_connections`) for `secs` after a warm-up.
/// Which side of a many-clients run is the crate's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// Neither: the raw baseline, u32-length-prefixed frames.
    Raw,
    /// Both: the crate's server and clients.
    Lib,
    /// The crate's server; clients that write a request packet and read
    /// packets until the response, with no library (`many-server:N`).
    LibServer,
    /// The crate's clients; a thread-per-connection server that reads
    /// packets and writes each request's echo, with no library
    /// (`many-clients:N`).
    LibClients,
}

fn run_many(
    mix: Mix,
    clients: usize,
    max_connections: usize,
    secs: Duration,
) -> Result<ManyRun, String> {
    let started = Instant::now();
    if let Err(e) = fs::write("/proc/self/clear_refs", "5") {
        eprintln!("cannot reset the RSS high-water mark: {e}");
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let server = if mix == Mix::Raw {
        ManyServer::Raw(RawServer::start(listener, raw_tcp_echo)?)
    } else if mix == Mix::LibClients {
        ManyServer::Raw(RawServer::start(listener, wire_tcp_echo)?)
    } else {
        let echo = |rq: Request| {
            Ok(Reply {
                flags: rq.flags,
                payload: rq.payload,
            })
        };
        // An echo is the cheap handler that runs best inline, as the raw
        // server's does; PACKETSTREAM_BENCH_POOL=1 runs it on the pool.
        let config = Config::default().name(LIB_SERVER);
        let config = if std::env::var_os("PACKETSTREAM_BENCH_POOL").is_some() {
            config.handler(echo)
        } else {
            config.inline_handler(echo)
        };
        let server = Server::serve_tcp(
            listener,
            ServerConfig::new(config).max_connections(max_connections),
        )
        .map_err(|e| format!("serve: {e}"))?;
        ManyServer::Lib(server)
    };

    let gate = Arc::new(Gate::default());
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::with_capacity(clients);
    let mut connected = 0;
    let mut failure = None;
    let connect_deadline = started + MANY_CONNECT_LIMIT;
    let note = |msg: ManyMsg, connected: &mut usize, failure: &mut Option<String>| match msg {
        ManyMsg::Connected => *connected += 1,
        ManyMsg::ConnectFailed(idx, e) => {
            failure.get_or_insert(format!("client {idx}: {e}"));
        }
        ManyMsg::Done(..) => {}
    };
    for idx in 0..clients {
        while handles.len() >= server.accepted() + MANY_UNACCEPTED && failure.is_none() {
            if Instant::now() >= connect_deadline {
                failure = Some(format!(
                    "{} client threads started, {} connections accepted by the server after {MANY_CONNECT_LIMIT:?}",
                    handles.len(),
                    server.accepted()
                ));
                break;
            }
            if let Ok(msg) = rx.recv_timeout(Duration::from_millis(1)) {
                note(msg, &mut connected, &mut failure);
            }
        }
        if failure.is_some() {
            break;
        }
        let (gate, tx) = (Arc::clone(&gate), tx.clone());
        let spawned = thread::Builder::new()
            .name(format!("client{idx}"))
            .stack_size(MANY_STACK);
        let spawned = if mix == Mix::Raw {
            spawned.spawn(move || many_client(idx, || RawClient::connect(addr), &gate, &tx))
        } else if mix == Mix::LibServer {
            spawned.spawn(move || many_client(idx, || WireClient::connect(addr), &gate, &tx))
        } else {
            spawned.spawn(move || {
                let connect = || {
                    PacketConnection::connect_tcp(
                        addr,
                        Config::default().name(format!("client{idx}")),
                    )
                    .map_err(|e| e.to_string())
                };
                many_client(idx, connect, &gate, &tx)
            })
        };
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                failure = Some(format!(
                    "cannot spawn client thread {idx} of {clients}: {e}"
                ));
                break;
            }
        }
    }
    drop(tx);
    while failure.is_none() && connected < clients {
        match rx.recv_timeout(connect_deadline.saturating_duration_since(Instant::now())) {
            Ok(msg) => note(msg, &mut connected, &mut failure),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                failure = Some(format!(
                    "{connected} of {clients} clients connected after {MANY_CONNECT_LIMIT:?}"
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                failure = Some(format!(
                    "{connected} of {clients} clients connected, and every client thread has ended"
                ));
            }
        }
    }
    // The run starts once the server serves every client it will take: a
    // client still in the listener's backlog when the calls start may wait
    // seconds to be accepted, the accept thread starved of CPU by the
    // clients already calling.
    let to_serve = clients.min(max_connections);
    while failure.is_none() && server.served() < to_serve {
        if Instant::now() >= connect_deadline {
            failure = Some(format!(
                "{} of {clients} clients served after {MANY_CONNECT_LIMIT:?}",
                server.served()
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
    let connect_secs = started.elapsed().as_secs_f64();

    let mut measured = None;
    if failure.is_none() {
        // The threads are counted before the start: reading thousands of
        // files in /proc takes the main thread a while, which would take
        // CPU from the run. Every thread of the run exists by now.
        let (server_threads, all_threads) = count_threads(server.name());
        let warm = Instant::now() + MANY_WARMUP;
        let stop = warm + secs;
        gate.open(Some((warm, stop)));
        sleep_until(warm + secs / 2);
        let rss_mib = status_kib("VmRSS:") / 1024.0;
        sleep_until(stop);
        let hwm_mib = status_kib("VmHWM:") / 1024.0;
        measured = Some((server_threads, all_threads, rss_mib, hwm_mib));
    } else {
        gate.open(None);
    }

    // Every client ends by itself once the run is over.
    let end_deadline = Instant::now() + MANY_END_LIMIT;
    let left = join_until(handles, end_deadline);
    let stop_res = if left > 0 {
        failure.get_or_insert(format!(
            "{left} of {clients} clients still running {MANY_END_LIMIT:?} after the end of the run"
        ));
        // Cutting the server's connections ends the calls still waiting;
        // those clients are left to end by themselves.
        server.stop(true)
    } else {
        server.stop(false)
    };

    let mut merged = vec![0u64; HIST_BUCKETS];
    let (mut calls, mut idle_clients, mut longest) = (0u64, 0, Duration::ZERO);
    let (mut failed, mut first_error) = (0, None);
    for msg in rx.try_iter() {
        match msg {
            ManyMsg::Done(_, Ok(tally)) => {
                for (m, c) in merged.iter_mut().zip(&tally.hist.counts) {
                    *m += u64::from(*c);
                }
                calls += tally.calls;
                idle_clients += usize::from(tally.calls == 0);
                longest = longest.max(tally.longest);
            }
            ManyMsg::Done(idx, Err(e)) => {
                failed += 1;
                first_error.get_or_insert(format!("client {idx}: {e}"));
            }
            msg => note(msg, &mut connected, &mut failure),
        }
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    if let Some(e) = first_error {
        return Err(format!("{failed} of {clients} clients failed; {e}"));
    }
    stop_res?;
    let (server_threads, all_threads, rss_mib, hwm_mib) =
        measured.expect("measured when nothing failed");
    Ok(ManyRun {
        rps: calls as f64 / secs.as_secs_f64(),
        p50_us: Histogram::quantile_us(&merged, 0.50),
        p99_us: Histogram::quantile_us(&merged, 0.99),
        calls,
        server_threads,
        all_threads,
        rss_mib,
        hwm_mib,
        connect_secs,
        idle_clients,
        longest,
    })
}

/// One client count: the raw runs and the crate's, alternately, and the
/// median of each.
struct ManyPair {
    clients: usize,
    raw: Result<ManyRun, String>,
    lib: Result<ManyRun, String>,
    /// Each round's crate / raw req/s, when there was more than one.
    round_ratios: Vec<f64>,
}

fn bench_many(opts: &Opts) -> Vec<ManyPair> {
    MANY_CLIENTS
        .iter()
        .map(|&clients| {
            eprint!("many {clients} ");
            let rounds = if clients == MANY_CLIENTS[0] {
                opts.many_rounds.max(1)
            } else {
                1
            };
            let max_connections = opts.max_connections.unwrap_or(clients);
            let (mut raws, mut libs) = (Vec::new(), Vec::new());
            let mut round_ratios = Vec::new();
            for _ in 0..rounds {
                let raw = run_many(Mix::Raw, clients, clients, opts.many_secs);
                eprint!(".");
                let lib = run_many(Mix::Lib, clients, max_connections, opts.many_secs);
                eprint!(".");
                if let (Ok(raw), Ok(lib)) = (&raw, &lib) {
                    round_ratios.push(lib.rps / raw.rps);
                }
                raws.push(raw);
                libs.push(lib);
            }
            eprintln!();
            if rounds == 1 {
                round_ratios.clear();
            }
            ManyPair {
                clients,
                raw: median_run(raws),
                lib: median_run(libs),
                round_ratios,
            }
        })
        .collect()
}

/// The run with the median req/s, with the median p50 and p99 of all the
/// rounds; the first failure if any round failed.
fn median_run(runs: Vec<Result<ManyRun, String>>) -> Result<ManyRun, String> {
    let mut runs = runs.into_iter().collect::<Result<Vec<_>, _>>()?;
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let p50 = median(runs.iter().map(|run| run.p50_us).collect());
    let p99 = median(runs.iter().map(|run| run.p99_us).collect());
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let mid = runs.len() / 2;
    let mut run = runs.swap_remove(mid);
    run.p50_us = p50;
    run.p99_us = p99;
    Ok(run)
}

fn print_table_head() {
    println!("| workload | raw baseline | packetstream | ratio | ctx sw/rq raw | ctx sw/rq crate | writes/rq crate |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// The many-clients rows of the main table: req/s and p99, ratio of req/s.
fn print_many_rows(many: &[ManyPair]) {
    for pair in many {
        let cell = |run: &Result<ManyRun, String>| match run {
            Ok(run) => format!("{} req/s, p99 {}", fmt_rate(run.rps), fmt_us(run.p99_us)),
            Err(_) => "failed".to_string(),
        };
        let ratio = match (&pair.raw, &pair.lib) {
            (Ok(raw), Ok(lib)) => format!("{:.2}", lib.rps / raw.rps),
            _ => "–".to_string(),
        };
        println!(
            "| {} TCP clients (many:{}), sync call 32 B | {} | {} | {ratio} | – | – | – |",
            pair.clients,
            pair.clients,
            cell(&pair.raw),
            cell(&pair.lib)
        );
    }
}

/// The many-clients table (latency, threads, memory) and the ratio line.
fn print_many_details(opts: &Opts, many: &[ManyPair]) {
    println!(
        "Many clients on TCP loopback, each a closed loop of sync 32 B calls, measured for {:.1} s after {:.1} s of warm-up; {} rounds at {} clients, raw and crate alternately, median req/s, p50 and p99 (threads and memory from the median round):",
        opts.many_secs.as_secs_f64(),
        MANY_WARMUP.as_secs_f64(),
        opts.many_rounds.max(1),
        MANY_CLIENTS[0]
    );
    println!("| clients | system | req/s | p50 | p99 | server threads | threads in all | VmRSS mid-run | VmHWM | connect |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut notes = Vec::new();
    for pair in many {
        for (system, run) in [("raw", &pair.raw), ("packetstream", &pair.lib)] {
            match run {
                Ok(run) => {
                    println!(
                        "| {} | {system} | {} | {} | {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.2} s |",
                        pair.clients,
                        fmt_rate(run.rps),
                        fmt_us(run.p50_us),
                        fmt_us(run.p99_us),
                        run.server_threads,
                        run.all_threads,
                        run.rss_mib,
                        run.hwm_mib,
                        run.connect_secs
                    );
                    if run.idle_clients > 0 {
                        notes.push(format!(
                            "{system} with {} clients: {} clients completed no call in the measured span; the longest call took {:.1} ms",
                            pair.clients,
                            run.idle_clients,
                            run.longest.as_secs_f64() * 1e3
                        ));
                    }
                }
                Err(e) => {
                    println!("| {} | {system} | failed | | | | | | | |", pair.clients);
                    notes.push(format!(
                        "{system} with {} clients failed: {e}",
                        pair.clients
                    ));
                }
            }
        }
    }
    let ratios: Vec<String> = many
        .iter()
        .filter_map(|pair| match (&pair.raw, &pair.lib) {
            (Ok(raw), Ok(lib)) => Some(format!(
                "req/s {:.2} and p99 {:.2}× at {} clients",
                lib.rps / raw.rps,
                lib.p99_us / raw.p99_us,
                pair.clients
            )),
            _ => None,
        })
        .collect();
    println!();
    println!("Many clients, crate / raw: {}.", ratios.join("; "));
    for pair in many.iter().filter(|pair| !pair.round_ratios.is_empty()) {
        let each: Vec<String> = pair
            .round_ratios
            .iter()
            .map(|ratio| format!("{ratio:.2}"))
            .collect();
        println!(
            "Crate / raw req/s in each round at {} clients: {}.",
            pair.clients,
            each.join(", ")
        );
    }
    for note in notes {
        println!("{note}");
    }
    println!();
}
