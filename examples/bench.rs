//! Measures this crate against a raw socketpair baseline, in the same run.
//!
//! ```text
//! cargo run --release --example bench              # full run, about a minute
//! cargo run --release --example bench -- --quick   # short run
//! cargo run --release --example bench -- --only w2:256 --secs 5   # one workload, for profiling
//! ```
//!
//! Every workload runs over `UnixStream::pair()` against an echo handler,
//! with the default `Config` (packet grace 10 ms, 4 handler threads):
//!
//! - W1: a lone `call()` with a 32 B payload, one after another. The raw
//!   baseline is two threads ping-ponging a length-prefixed 32 B message.
//! - W2: pipelined 32 B requests with a window of N in flight: submit until N
//!   are outstanding, then wait for the oldest and submit one more. The raw
//!   baseline keeps the same window: the submitting thread writes framed
//!   requests through a `BufWriter` (flushing only before it would wait), an
//!   echo thread reads them through a `BufReader` and answers through a
//!   `BufWriter`, and a reader thread takes the replies and opens the window.
//!   It is the ceiling for a pipeline of three threads with no per-request
//!   work: framing, batching and nothing else.
//! - W3: a `call()` echoing 1 MiB. MB/s counts the payload one way (1 MiB per
//!   round trip, 10^6 bytes to the MB), for both the crate and the raw
//!   ping-pong of 1 MiB.
//!
//! Each round of a workload runs the raw baseline and then the crate, so
//! both see the same machine load; the table shows medians over the rounds
//! and the crate's ratio to the raw figure. W2 is timed in steady state: from
//! the moment the first window has turned over until the end of the round,
//! before the window drains.
//!
//! Also reported, per request (client and server together, since both ends
//! live in this process): context switches, a proxy for thread hops, read
//! from `/proc/self/task/*/status`; socket writes (`Stats::writes`); and
//! heap allocations, counted by the global allocator in an untimed pass.
//! Peak RSS during W2 at 10,000 in flight is the `VmHWM` of
//! `/proc/self/status` after resetting it through `/proc/self/clear_refs`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::alloc::System;
use std::collections::VecDeque;
use std::fs;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use packetstream::{Config, PacketConnection, Reply, Request};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const ECHO: u64 = 1;
const SMALL: usize = 32;
const LARGE: usize = 1 << 20;
const WINDOWS: [usize; 5] = [1, 16, 256, 4096, 10_000];
/// The window the W2 targets refer to.
const W2_WINDOW: usize = 256;

// Targets from the issue, with default settings.
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
}

fn parse_args() -> Opts {
    let mut opts = Opts {
        rounds: 7,
        round: Duration::from_millis(300),
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => {
                opts.rounds = 3;
                opts.round = Duration::from_millis(100);
            }
            "--rounds" => {
                opts.rounds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--rounds N")
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
                        .expect("--only w1|w2:N|w3|raw-w1|raw-w2:N|raw-w3"),
                )
            }
            "--secs" => {
                // For profiling: one long round.
                let secs: f64 = args.next().and_then(|s| s.parse().ok()).expect("--secs S");
                opts.rounds = 1;
                opts.round = Duration::from_secs_f64(secs);
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
    let rss = peak_rss_w2(&opts, 10_000);
    let allocs = count_allocs();

    println!("| workload | raw baseline | packetstream | ratio | ctx sw/rq raw | ctx sw/rq crate | writes/rq crate |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
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
    println!();
    println!("Ratios: W1 is crate time / raw time (lower is better); W2 and W3 are crate rate / raw rate (higher is better).");
    println!(
        "Peak RSS during W2 with 10,000 in flight: {:.1} MiB (VmHWM; {:.1} MiB before the phase).",
        rss.1, rss.0
    );
    println!(
        "Heap allocations per request (both ends, untimed pass): W1 sync {:.2}, W2 pipelined (256) {:.2}; bytes allocated per request: {:.0} and {:.0}.",
        allocs.sync.0, allocs.pipelined.0, allocs.sync.1, allocs.pipelined.1
    );
    println!();

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
        let (a, b) = UnixStream::pair().expect("socketpair");
        let server = PacketConnection::from_unix_stream(
            b,
            Config::default().name("server").handler(|rq: Request| {
                Ok(Reply {
                    flags: rq.flags,
                    payload: rq.payload,
                })
            }),
        )
        .expect("server");
        let client = PacketConnection::from_unix_stream(a, Config::default().name("client"))
            .expect("client");
        Conn { client, server }
    }

    fn flushes(&self) -> u64 {
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
    let w0 = conn.map_or(0, Conn::flushes);
    let Span { value, n, ctx } = body();
    let writes = conn.map_or(0, Conn::flushes) - w0;
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
    let per_rq = |stats: stats_alloc::Stats| {
        (
            stats.allocations as f64 / n as f64,
            stats.bytes_allocated as f64 / n as f64,
        )
    };
    for _ in 0..1000 {
        conn.client.call(ECHO, 0, &payload).expect("call");
    }
    let region = Region::new(GLOBAL);
    for _ in 0..n {
        conn.client.call(ECHO, 0, &payload).expect("call");
    }
    let sync = per_rq(region.change());
    lib_pipeline(&conn, W2_WINDOW, Duration::from_millis(20));
    let mut queue = VecDeque::with_capacity(W2_WINDOW);
    let region = Region::new(GLOBAL);
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
    let pipelined = per_rq(region.change());
    conn.close();
    Allocs { sync, pipelined }
}

/// Runs one workload alone, for profilers: `w1`, `w2:N`, `w3`, or the same
/// with a `raw-` prefix.
fn run_only(opts: &Opts, only: &str) {
    let (raw, what) = match only.strip_prefix("raw-") {
        Some(rest) => (true, rest),
        None => (false, only),
    };
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
            "client: {} packets out, {} flushes; server: {} packets out, {} flushes",
            client.packets_out, client.writes, server.packets_out, server.writes
        );
    }
    if let Some(conn) = conn {
        conn.close();
    }
}
