//! Helpers shared by the integration tests.
// Each test binary uses some of these; `pub` items in a test-only module are fine.
#![allow(dead_code, unreachable_pub)]

pub mod child;

use std::fmt::Display;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use packetstream::{Config, HandlerResult, Packet, PacketConnection, PacketKind, Reply, Request};

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// True when `PACKETSTREAM_LONG` asks for the full-size variants.
pub fn long() -> bool {
    std::env::var_os("PACKETSTREAM_LONG").is_some_and(|v| v != "0")
}

/// Prints a figure to standard error, past the test harness's capture, so
/// that it shows in every run (and from a child copy of a test binary).
pub fn report(line: impl Display) {
    std::io::stderr()
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
}

/// The longest any single step of a test may take before it counts as a hang:
/// every blocking wait that should succeed gives up after this long.
pub const LIMIT: Duration = Duration::from_secs(30);

/// How long a call that should return at once, or by its bound, is given
/// past that before it counts as hung.
pub const HANG: Duration = Duration::from_secs(2);

/// The deadline the tests give to the calls that take one.
pub const DEADLINE: Duration = Duration::from_millis(200);

/// How far past its deadline a call may return, in a debug build: the
/// contract of every call that takes a deadline.
pub const SLACK: Duration = Duration::from_millis(100);

/// Runs `f` on its own thread and fails the test if it takes longer than
/// `LIMIT`. The thread is joined when it finishes in time.
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    within_or(what, LIMIT, f, || {})
}

/// Runs `f` on its own thread and returns its result, failing the test if
/// it takes longer than `patience`; `on_timeout` then runs first, to unstick
/// it. The thread is joined when it finishes in time, and a panic in it is
/// the test's panic.
pub fn within_or<T: Send + 'static>(
    what: &str,
    patience: Duration,
    f: impl FnOnce() -> T + Send + 'static,
    on_timeout: impl FnOnce(),
) -> T {
    match timed(patience, f) {
        Timed::Done(value, _) => value,
        Timed::Stuck(_) => {
            on_timeout();
            panic!("{what} did not finish within {patience:?}: hang");
        }
    }
}

/// What [`timed`] saw.
pub enum Timed<T> {
    /// `f` returned this value after this long (measured on its thread).
    Done(T, Duration),
    /// `f` had not returned when the patience ran out: it is still running.
    Stuck(Running<T>),
}

/// A call that [`timed`] gave up waiting for, still running on its thread.
pub struct Running<T> {
    rx: mpsc::Receiver<(T, Duration)>,
    handle: JoinHandle<()>,
}

impl<T> Running<T> {
    /// Waits at most `patience` more (after the caller has done what should
    /// unstick the call). Joins the thread and returns the value if it ended;
    /// `None` leaves it running.
    pub fn finish_within(self, patience: Duration) -> Option<(T, Duration)> {
        match self.rx.recv_timeout(patience) {
            Ok(value) => {
                let _ = self.handle.join();
                Some(value)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Err(panic) = self.handle.join() {
                    std::panic::resume_unwind(panic);
                }
                None
            }
            Err(mpsc::RecvTimeoutError::Timeout) => None,
        }
    }
}

/// Runs `f` on its own thread and waits at most `patience` for it. Returns
/// its value and how long it ran, or the running call: a hang is the
/// caller's to report and to unstick. A panic in `f` is the caller's panic.
pub fn timed<T: Send + 'static>(
    patience: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Timed<T> {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let start = Instant::now();
        let value = f();
        let _ = tx.send((value, start.elapsed()));
    });
    match rx.recv_timeout(patience) {
        Ok((value, elapsed)) => {
            handle.join().expect("finished thread joins");
            Timed::Done(value, elapsed)
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread sends before it ends"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => Timed::Stuck(Running { rx, handle }),
    }
}

/// A gate that threads wait at until the test opens it: a handler that
/// "never returns" for as long as the test needs, whose thread can still
/// end (and be joined) when the test is done. A wait gives up after
/// `LIMIT`, so that a gate left shut cannot hang a test run.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<GateState>, Condvar)>);

#[derive(Default)]
struct GateState {
    open: bool,
    entered: usize,
}

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts this thread in, then blocks until the gate is open.
    pub fn pass(&self) {
        let deadline = Instant::now() + LIMIT;
        let mut st = self.state();
        st.entered += 1;
        self.0 .1.notify_all();
        while !st.open {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = self
                .0
                 .1
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets every waiting thread, and every later one, through.
    pub fn open(&self) {
        self.state().open = true;
        self.0 .1.notify_all();
    }

    /// How many threads have reached the gate so far.
    pub fn entered(&self) -> usize {
        self.state().entered
    }

    /// Waits until `n` threads have reached the gate, failing the test after
    /// `patience`.
    pub fn wait_entered(&self, n: usize, patience: Duration) {
        let deadline = Instant::now() + patience;
        let mut st = self.state();
        while st.entered < n {
            let now = Instant::now();
            assert!(
                now < deadline,
                "{} of {n} threads reached the gate within {patience:?}",
                st.entered
            );
            st = self
                .0
                 .1
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The length of `packet`'s body on the wire: what a packet length limit
/// counts (the length prefix excluded).
pub fn body_len(packet: &Packet) -> u64 {
    let mut wire = Vec::new();
    packet.encode_into(&mut wire);
    let prefix = wire.iter().position(|b| b & 0x80 == 0).unwrap() + 1;
    (wire.len() - prefix) as u64
}

/// Polls `cond` until it holds, failing the test after `patience`.
pub fn wait_for(what: &str, patience: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {patience:?} waiting for {what}"
        );
        std::thread::sleep(ms(2));
    }
}

/// A lock that the tests of one binary which measure time or memory, or
/// load the machine most, take in turn, so that no other test of that
/// binary skews what they measure.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Joins `handles`, failing the test if one is still running after
/// `LIMIT`.
pub fn join_all<T>(what: &str, handles: Vec<JoinHandle<T>>) -> Vec<T> {
    wait_for(what, LIMIT, || handles.iter().all(|h| h.is_finished()));
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Set in the environment of a copy of a test binary that runs one test
/// alone; its value is the test's name.
const ISOLATED_ENV: &str = "PACKETSTREAM_ISOLATED";

/// For a test that measures the whole process (its memory, its threads):
/// true in a copy of this test binary that runs `test` alone, where the
/// test does its work. In the normal run, starts that copy, waits for it
/// to pass (killing it and failing after `patience`), and returns false:
/// the test then has nothing left to do.
pub fn isolated(test: &str, patience: Duration) -> bool {
    if std::env::var(ISOLATED_ENV).as_deref() == Ok(test) {
        return true;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(ISOLATED_ENV, test)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + patience;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{test} did not finish within {patience:?}");
        }
        std::thread::sleep(ms(20));
    };
    assert!(status.success(), "{test}: {status}");
    false
}

pub const ECHO: u64 = 1;
pub const FAIL: u64 = 2;
pub const SLEEP: u64 = 3;
pub const PANIC: u64 = 4;
/// Never answered: the child fixture's handler sleeps for `LIMIT`; a gated
/// service holds it at its gate.
pub const HOLD: u64 = 10;
/// The child fixture exits with status 3: at once, or, if the payload is a
/// path, once that file exists.
pub const EXIT: u64 = 11;
/// The child fixture answers, then closes its connection in order.
pub const QUIT: u64 = 12;

/// A handler that answers every request with its own flags and payload.
pub fn echo(rq: Request) -> HandlerResult {
    Ok(Reply {
        flags: rq.flags,
        payload: rq.payload,
    })
}

/// ECHO answers with the request's flags and payload; FAIL fails with the
/// payload as reason; SLEEP sleeps the payload's decimal milliseconds (a
/// fraction allowed), then echoes; PANIC panics.
pub fn service(rq: Request) -> HandlerResult {
    match rq.rq_type {
        ECHO => echo(rq),
        FAIL => Err(String::from_utf8(rq.payload)?.into()),
        SLEEP => {
            let millis: f64 = std::str::from_utf8(&rq.payload)?.parse()?;
            std::thread::sleep(Duration::from_secs_f64(millis / 1e3));
            echo(rq)
        }
        PANIC => panic!("handler told to panic"),
        other => Err(format!("unknown rq_type {other}").into()),
    }
}

pub fn server_config(name: &str) -> Config {
    Config::default().name(name).handler(service)
}

/// A client and a server with [`service`] over a socketpair.
pub fn pair() -> (PacketConnection, PacketConnection) {
    pair_with(Config::default().name("client"), server_config("server"))
}

/// A client and a server over a socketpair, with the given configs.
pub fn pair_with(client: Config, server: Config) -> (PacketConnection, PacketConnection) {
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(b, server).unwrap();
    let client = PacketConnection::from_unix_stream(a, client).unwrap();
    (client, server)
}

/// Closes two connected ends at once: each sends ERQ and EOF and waits for
/// the other's. Both must end in order within `LIMIT`.
pub fn close_both(a: &PacketConnection, b: &PacketConnection) {
    std::thread::scope(|s| {
        let other = s.spawn(|| b.close_timeout(LIMIT));
        a.close_timeout(LIMIT)
            .expect("the first end closes in order");
        other
            .join()
            .unwrap()
            .expect("the second end closes in order");
    });
}

/// A connection name no other test uses, short enough that its thread
/// names stay readable in `/proc` (which keeps 15 bytes of a name).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A small seeded generator (xorshift64*), for randomized tests that print
/// their seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A scripted peer on a raw socket: sends and receives packets by hand.
/// Every read and write has a timeout.
pub struct RawPeer {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl RawPeer {
    /// A connection with `config` and a raw peer on the other end, whose
    /// reads and writes fail after `LIMIT`.
    pub fn with(config: Config) -> (PacketConnection, RawPeer) {
        RawPeer::with_patience(config, LIMIT)
    }

    /// A connection with `config` and a raw peer on the other end, whose
    /// reads and writes fail after `patience`. The peer scripts the base
    /// protocol packet by packet, so the connection's extensions are off:
    /// no hello comes first.
    pub fn with_patience(config: Config, patience: Duration) -> (PacketConnection, RawPeer) {
        RawPeer::speaking_to(config.extensions(false), patience)
    }

    /// A connection with `config` as it is, extensions included, and a raw
    /// peer on the other end, whose reads and writes fail after `patience`.
    pub fn speaking_to(config: Config, patience: Duration) -> (PacketConnection, RawPeer) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(patience)).unwrap();
        b.set_write_timeout(Some(patience)).unwrap();
        let conn = PacketConnection::from_unix_stream(a, config).unwrap();
        (
            conn,
            RawPeer {
                stream: b,
                buf: Vec::new(),
            },
        )
    }

    pub fn send(&mut self, packet: &Packet) {
        let mut wire = Vec::new();
        packet.encode_into(&mut wire);
        self.stream.write_all(&wire).unwrap();
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends a request on channel 0 with flags 0.
    pub fn request(&mut self, tag: u64, rq_type: u64, payload: &[u8]) {
        self.send(&request(tag, rq_type, 0, payload));
    }

    /// The next `n` bytes as they came. Panics on a read timeout or at the
    /// end of the stream.
    pub fn recv_bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let mut chunk = [0u8; 4096];
            let got = self
                .stream
                .read(&mut chunk)
                .expect("raw peer read within the limit");
            assert!(got > 0, "stream ended with {} of {n} bytes", self.buf.len());
            self.buf.extend_from_slice(&chunk[..got]);
        }
        self.buf.drain(..n).collect()
    }

    /// The next packet, or `None` at the end of the stream. Panics on a read
    /// timeout.
    pub fn recv(&mut self) -> Option<Packet> {
        self.try_recv().expect("raw peer read within the limit")
    }

    /// The next packet, `None` at the end of the stream, or the read error
    /// (a timeout after the peer's patience).
    pub fn try_recv(&mut self) -> std::io::Result<Option<Packet>> {
        loop {
            if let Some((packet, used)) = Packet::decode(&self.buf, u64::MAX).unwrap() {
                self.buf.drain(..used);
                return Ok(Some(packet));
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                assert!(self.buf.is_empty(), "stream ended inside a packet");
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next packet. Panics at the end of the stream or on a read
    /// timeout.
    pub fn recv_packet(&mut self) -> Packet {
        self.recv().expect("a packet, not the end")
    }

    /// Receives until `pred` matches, returning the skipped packets too.
    pub fn recv_until(&mut self, pred: impl Fn(&Packet) -> bool) -> (Vec<Packet>, Packet) {
        let mut skipped = Vec::new();
        loop {
            let packet = self
                .recv()
                .expect("stream ended before the expected packet");
            if pred(&packet) {
                return (skipped, packet);
            }
            skipped.push(packet);
        }
    }
}

/// `value` as a BSUInt, the wire's varint, written out here rather than by
/// the crate: for fields the crate would never encode (too wide, or a
/// length that does not match the body).
pub fn bsuint(mut value: u128) -> Vec<u8> {
    let mut groups = vec![(value & 0x7f) as u8];
    value >>= 7;
    while value != 0 {
        groups.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    groups.reverse();
    groups
}

pub fn request(tag: u64, rq_type: u64, flags: u64, payload: &[u8]) -> Packet {
    Packet {
        channel: 0,
        tag,
        kind: PacketKind::Request { rq_type, flags },
        payload: payload.to_vec(),
    }
}

pub fn response(tag: u64, ok: bool, flags: u64, payload: &[u8]) -> Packet {
    Packet {
        channel: 0,
        tag,
        kind: PacketKind::Response { ok, flags },
        payload: payload.to_vec(),
    }
}

/// A control packet that is neither EOF nor ERQ: a protocol error.
pub fn bad_control() -> Packet {
    Packet {
        channel: 0,
        tag: 5,
        kind: PacketKind::Control { flags: 0 },
        payload: Vec::new(),
    }
}

/// `packet`'s bytes on the wire.
pub fn wire(packet: &Packet) -> Vec<u8> {
    let mut bytes = Vec::new();
    packet.encode_into(&mut bytes);
    bytes
}

/// The whole packets in `bytes`, and how many bytes of a partial packet
/// follow them.
pub fn decode_all(bytes: &[u8]) -> (Vec<Packet>, usize) {
    let mut packets = Vec::new();
    let mut pos = 0;
    while let Some((packet, used)) = Packet::decode(&bytes[pos..], u64::MAX).unwrap() {
        packets.push(packet);
        pos += used;
    }
    (packets, bytes.len() - pos)
}

/// A field of `/proc/self/status`, such as `Threads` or `VmRSS` (in kB).
pub fn proc_status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line[field.len() + 1..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The lease keeper's thread: one for the process, not a connection's.
pub const KEEPER_THREAD: &str = "ps:lease-keeper";

/// This process's threads, but for the lease keeper's, which comes and
/// goes with lent readers, whatever connection lent them.
pub fn threads() -> u64 {
    proc_status("Threads") - threads_named(KEEPER_THREAD).len() as u64
}

/// Threads of this process whose name starts with `prefix` (names are cut
/// to 15 bytes by the kernel), sorted.
pub fn threads_named(prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let comm = entry.unwrap().path().join("comm");
        if let Ok(name) = std::fs::read_to_string(comm) {
            let name = name.trim_end().to_string();
            if name.starts_with(prefix) {
                names.push(name);
            }
        }
    }
    names.sort();
    names
}

/// Waits until no thread of connection `name` (named `{name}:...`) is left,
/// failing the test after `patience`.
pub fn assert_threads_gone(name: &str, patience: Duration) {
    let prefix = format!("{name}:");
    let deadline = Instant::now() + patience;
    loop {
        let left = threads_named(&prefix);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "threads of {name} still running: {left:?}"
        );
        std::thread::sleep(ms(5));
    }
}
