//! Deadlines and blocking: every call that takes a deadline meets it and the
//! `try_*` calls never block, whatever the peer, the handlers or the kernel do,
//! on every transport; durations saturate; shutdown waits neither for stuck
//! handlers nor behind a stuck writer; a whole request is served at once;
//! replies get the same length limit as requests.

mod common;

use std::fmt::Debug;
use std::io::{self, PipeReader, PipeWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::child::{self, child_fixture, half_response, Mode};
use common::{
    body_len, echo, ms, pair, report, request, response, serial, threads_named, timed, unique_name,
    wait_for, wire, within, within_or, Gate, RawPeer, Running, Timed, DEADLINE, ECHO, HANG, HOLD,
    LIMIT, SLACK, SLEEP,
};
use packetstream::{
    Config, Error, HandlerResult, Packet, PacketConnection, PacketKind, PendingResponse, Reply,
    Request, Server, ServerConfig,
};

/// A call that must never block counts as blocked after this long.
const TRY_BOUND: Duration = Duration::from_secs(1);

/// A reply of `flags` bytes.
const BIG: u64 = 5;
/// A reply of flags `flags` and as many bytes as the payload's decimal text
/// says.
const SIZED: u64 = 7;

/// ECHO echoes, BIG replies with `flags` bytes, HOLD waits at `gate` and
/// then echoes, SIZED replies with the size and flags asked for.
fn gated_service(gate: Gate) -> impl Fn(Request) -> HandlerResult + Send + Sync + 'static {
    move |rq: Request| match rq.rq_type {
        BIG => Ok(Reply::payload(vec![0x5a; rq.flags as usize])),
        HOLD => {
            gate.pass();
            echo(rq)
        }
        SIZED => {
            let len: usize = std::str::from_utf8(&rq.payload)?.parse()?;
            Ok(Reply {
                flags: rq.flags,
                payload: vec![0x33; len],
            })
        }
        _ => echo(rq),
    }
}

/// The lines, at most ten of them, then how many more there were.
fn listed(lines: &[String]) -> String {
    let mut text = lines
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    if lines.len() > 10 {
        text.push_str(&format!("\n... and {} more", lines.len() - 10));
    }
    text
}

fn shown<T: Debug>(res: &T) -> String {
    let text = format!("{res:?}");
    if text.len() > 120 {
        format!("{}...", &text[..120])
    } else {
        text
    }
}

// ---------------------------------------------------------------------------
// The far end of a connection under test, over each transport.

child_fixture!();

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// `UnixStream::pair`, with `from_unix_stream`.
    SocketPair,
    /// Two `std::io::pipe`s, with `from_fds` (and `new` at the far end).
    Pipe,
    /// TCP over loopback, with `from_tcp_stream`.
    Tcp,
    /// A child process (this test binary again), over its standard input
    /// and output, with `new`.
    Child,
}

const TRANSPORTS: [Transport; 4] = [
    Transport::SocketPair,
    Transport::Pipe,
    Transport::Tcp,
    Transport::Child,
];

impl Transport {
    /// Bytes of requests that fill the transport's buffers many times over.
    fn fill(self) -> usize {
        match self {
            Transport::Tcp => 12 << 20,
            _ => 2 << 20,
        }
    }

    /// A payload that cannot be written in one go while the far end does
    /// not read.
    fn big(self) -> usize {
        match self {
            Transport::Tcp => 16 << 20,
            _ => 4 << 20,
        }
    }
}

/// What the far end of a link does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Far {
    /// Reads nothing and sends nothing.
    Idle,
    /// Sends the first half of a response to tag 2, then nothing, and reads
    /// nothing.
    HalfPacket,
    /// A connection of this crate whose handler never returns (until the
    /// test opens the link's gate).
    StuckServer,
    /// Sends one HOLD request, then closes its end.
    AskThenLeave,
}

/// The far end's raw stream.
enum RawEnd {
    Unix(UnixStream),
    Tcp(TcpStream),
    Pipe(PipeReader, PipeWriter),
}

impl RawEnd {
    fn write_all(&mut self, bytes: &[u8]) {
        match self {
            RawEnd::Unix(s) => s.write_all(bytes),
            RawEnd::Tcp(s) => s.write_all(bytes),
            RawEnd::Pipe(_, w) => w.write_all(bytes),
        }
        .unwrap();
    }

    fn into_conn(self, config: Config) -> PacketConnection {
        match self {
            RawEnd::Unix(s) => PacketConnection::from_unix_stream(s, config),
            RawEnd::Tcp(s) => PacketConnection::from_tcp_stream(s, config),
            RawEnd::Pipe(r, w) => PacketConnection::new(r, w, config),
        }
        .unwrap()
    }
}

/// What keeps the far end as it is.
enum FarEnd {
    Raw(RawEnd),
    Conn(PacketConnection),
    Child(Child),
    Gone,
}

/// A connection under test, and what is at the other end of its stream.
struct Link {
    what: String,
    conn: Arc<PacketConnection>,
    far: FarEnd,
    /// Opened when the link is cut: stuck handlers on either side then
    /// return.
    gate: Gate,
    /// Calls of the test still blocked on the connection.
    blocked: Vec<Running<()>>,
}

impl Link {
    fn new(transport: Transport, config: Config, far: Far, gate: Gate) -> Link {
        let what = format!("{transport:?}, far end {far:?}");
        let (conn, raw) = match transport {
            Transport::SocketPair => {
                let (a, b) = UnixStream::pair().unwrap();
                let conn = PacketConnection::from_unix_stream(a, config).unwrap();
                (conn, RawEnd::Unix(b))
            }
            Transport::Tcp => {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                let (b, _) = listener.accept().unwrap();
                let conn = PacketConnection::from_tcp_stream(a, config).unwrap();
                (conn, RawEnd::Tcp(b))
            }
            Transport::Pipe => {
                let (in_r, in_w) = io::pipe().unwrap();
                let (out_r, out_w) = io::pipe().unwrap();
                let conn =
                    PacketConnection::from_fds(OwnedFd::from(in_r), OwnedFd::from(out_w), config)
                        .unwrap();
                (conn, RawEnd::Pipe(out_r, in_w))
            }
            Transport::Child => {
                let mode = match far {
                    Far::Idle => Mode::Silent,
                    Far::HalfPacket => Mode::HalfPacket,
                    Far::StuckServer => Mode::Serve,
                    Far::AskThenLeave => Mode::AskThenExit,
                };
                let (child, conn) = child::connect(mode, config);
                return Link {
                    what,
                    conn: Arc::new(conn),
                    far: FarEnd::Child(child),
                    gate,
                    blocked: Vec::new(),
                };
            }
        };
        let mut raw = raw;
        let far = match far {
            Far::Idle => FarEnd::Raw(raw),
            Far::HalfPacket => {
                raw.write_all(&half_response());
                FarEnd::Raw(raw)
            }
            Far::StuckServer => {
                let config = Config::default()
                    .name(unique_name("far"))
                    .handler(gated_service(gate.clone()));
                FarEnd::Conn(raw.into_conn(config))
            }
            Far::AskThenLeave => {
                raw.write_all(&wire(&request(2, HOLD, 0, b"hold")));
                drop(raw);
                FarEnd::Gone
            }
        };
        Link {
            what,
            conn: Arc::new(conn),
            far,
            gate,
            blocked: Vec::new(),
        }
    }

    /// Starts a `submit` of `len` bytes on its own thread. The far end does
    /// not read, so whichever thread writes it is soon blocked in the kernel.
    fn block_a_writer(&mut self, len: usize) {
        let conn = Arc::clone(&self.conn);
        let payload = vec![0xb1; len];
        let call = timed(ms(150), move || {
            let _ = conn.submit(ECHO, 0, &payload);
        });
        if let Timed::Stuck(running) = call {
            self.blocked.push(running);
        }
    }

    /// Takes the far end away, so that whatever blocks on it returns: opens
    /// the gate, closes the raw stream, aborts the far connection, kills
    /// the child.
    fn cut(&mut self) {
        self.gate.open();
        match std::mem::replace(&mut self.far, FarEnd::Gone) {
            FarEnd::Raw(raw) => drop(raw),
            FarEnd::Conn(conn) => {
                conn.abort();
                let dropped = timed(LIMIT, move || drop(conn));
                assert!(
                    matches!(dropped, Timed::Done(..)),
                    "{}: far end hangs",
                    self.what
                );
            }
            FarEnd::Child(child) => {
                child::kill(child);
            }
            FarEnd::Gone => {}
        }
    }

    /// Cuts the far end, aborts the connection, joins what the test left
    /// blocked and drops the connection, each within `LIMIT`; then every
    /// thread of the connection must end.
    fn finish(mut self) {
        let threads = format!("{}:", self.conn.name());
        self.cut();
        self.conn.abort();
        for running in self.blocked.drain(..) {
            assert!(
                running.finish_within(LIMIT).is_some(),
                "{}: a blocked call did not return once the far end was gone",
                self.what
            );
        }
        let conn = self.conn;
        let dropped = timed(LIMIT, move || drop(conn));
        assert!(
            matches!(dropped, Timed::Done(..)),
            "{}: dropping the connection hangs",
            self.what
        );
        let what = format!("{}: every thread of the connection to end", self.what);
        wait_for(&what, LIMIT, || threads_named(&threads).is_empty());
    }
}

/// Runs `call`, which must end within `bound`. Past `bound` + [`HANG`] it
/// counts as hung: `unstick` runs, and the call is given the patience to
/// return. Returns how long it took (`None` if it hung) and its value, or
/// what became of it.
fn run_call<T: Debug + Send + 'static>(
    bound: Duration,
    call: impl FnOnce() -> T + Send + 'static,
    unstick: impl FnOnce(),
) -> (Option<Duration>, Result<T, String>) {
    match timed(bound + HANG, call) {
        Timed::Done(value, elapsed) => (Some(elapsed), Ok(value)),
        Timed::Stuck(running) => {
            unstick();
            match running.finish_within(LIMIT) {
                Some((value, elapsed)) => (
                    None,
                    Err(format!(
                        "hang: returned {} after {elapsed:?}, once unstuck",
                        shown(&value)
                    )),
                ),
                None => (None, Err("hang: still blocked once unstuck".to_string())),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The deadline matrix.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Condition {
    /// The peer reads nothing; this end has queued more than the
    /// transport holds.
    PeerNeverReads,
    /// The peer sent half a packet and then nothing.
    PeerSilentMidPacket,
    /// A handler never returns: the peer's (for a request of ours), or ours
    /// (for a close, whose peer then leaves).
    HandlerNeverReturns,
    /// A thread of this end is blocked in the kernel, writing a large
    /// request the peer does not read.
    WriterBlockedInKernel,
}

const CONDITIONS: [Condition; 4] = [
    Condition::PeerNeverReads,
    Condition::PeerSilentMidPacket,
    Condition::HandlerNeverReturns,
    Condition::WriterBlockedInKernel,
];

/// One call measured in one condition.
struct Cell {
    api: String,
    transport: String,
    condition: Condition,
    /// The call's deadline, if it takes one.
    deadline: Option<Duration>,
    elapsed: Option<Duration>,
    result: String,
    ok: bool,
}

impl Cell {
    fn line(&self) -> String {
        let elapsed = match self.elapsed {
            Some(e) => format!("{:>7.1} ms", e.as_secs_f64() * 1e3),
            None => "   hung   ".to_string(),
        };
        format!(
            "{} {:<28} {:<10} {:<22} {elapsed}  {}",
            if self.ok { "  " } else { "!!" },
            self.api,
            self.transport,
            format!("{:?}", self.condition),
            self.result
        )
    }
}

/// Prints the cells, and the overshoot past their deadline of those that
/// take one; fails the test with every cell that failed.
fn check_cells(title: &str, cells: &[Cell]) {
    report(format!("{title}:"));
    for cell in cells {
        report(cell.line());
    }
    let mut overshoots: Vec<f64> = cells
        .iter()
        .filter_map(|c| Some((c.elapsed?.as_secs_f64() - c.deadline?.as_secs_f64()) * 1e3))
        .collect();
    overshoots.sort_by(f64::total_cmp);
    if let (Some(max), Some(median)) = (overshoots.last(), overshoots.get(overshoots.len() / 2)) {
        report(format!(
            "{title}: overshoot past the deadline over {} calls that returned: max {max:.1} ms, median {median:.1} ms",
            overshoots.len()
        ));
    }
    let failed: Vec<String> = cells.iter().filter(|c| !c.ok).map(Cell::line).collect();
    assert!(
        failed.is_empty(),
        "{title}: {} of {} cells failed:\n{}",
        failed.len(),
        cells.len(),
        failed.join("\n")
    );
}

fn base_config(condition: Condition) -> Config {
    let config = Config::default()
        .name(unique_name("dl"))
        .max_queued_bytes(64 << 20);
    match condition {
        // Nothing is written before the call under test: it finds all of it
        // still queued.
        Condition::PeerNeverReads => config.packet_grace(Duration::from_secs(60)),
        _ => config,
    }
}

/// A link in `condition` and a request of this end that cannot be
/// answered.
fn requester(transport: Transport, condition: Condition) -> (Link, PendingResponse) {
    let gate = Gate::new();
    let config = base_config(condition);
    match condition {
        Condition::PeerNeverReads => {
            let link = Link::new(transport, config, Far::Idle, gate);
            let n = transport.fill() / 1024;
            let mut pending = None;
            for idx in 0..n {
                pending = Some(link.conn.submit(ECHO, idx as u64, &[0x11; 1024]).unwrap());
            }
            (link, pending.unwrap())
        }
        Condition::PeerSilentMidPacket => {
            let link = Link::new(transport, config, Far::HalfPacket, gate);
            let pending = link.conn.submit(ECHO, 0, b"answer me").unwrap();
            (link, pending)
        }
        Condition::HandlerNeverReturns => {
            let link = Link::new(transport, config, Far::StuckServer, gate.clone());
            let pending = link.conn.submit(HOLD, 0, b"hold").unwrap();
            if transport != Transport::Child {
                gate.wait_entered(1, LIMIT);
            }
            (link, pending)
        }
        Condition::WriterBlockedInKernel => {
            let mut link = Link::new(transport, config, Far::Idle, gate);
            link.block_a_writer(transport.big());
            let pending = link.conn.submit(ECHO, 0, b"small").unwrap();
            (link, pending)
        }
    }
}

fn wait_timeout_cell(transport: Transport, condition: Condition) -> Cell {
    let (mut link, pending) = requester(transport, condition);
    let (elapsed, res) = run_call(
        DEADLINE + SLACK,
        move || pending.wait_timeout(DEADLINE),
        || link.cut(),
    );
    let ok = elapsed.is_some_and(|e| e <= DEADLINE + SLACK)
        && matches!(res, Ok(Err(Error::Timeout { .. })));
    link.finish();
    Cell {
        api: format!("wait_timeout({DEADLINE:?})"),
        transport: format!("{transport:?}"),
        condition,
        deadline: Some(DEADLINE),
        elapsed,
        result: shown(&res),
        ok,
    }
}

fn close_timeout_cell(transport: Transport, condition: Condition) -> Cell {
    let mut link = match condition {
        Condition::HandlerNeverReturns => {
            // Our handler holds the peer's request for ever, and the peer
            // goes away.
            let gate = Gate::new();
            let config = base_config(condition).handler(gated_service(gate.clone()));
            let link = Link::new(transport, config, Far::AskThenLeave, gate.clone());
            gate.wait_entered(1, LIMIT);
            link
        }
        _ => requester(transport, condition).0,
    };
    let conn = Arc::clone(&link.conn);
    let (elapsed, res) = run_call(
        DEADLINE + SLACK,
        move || conn.close_timeout(DEADLINE),
        || link.cut(),
    );
    // Nothing here can close in order before the deadline.
    let ok = elapsed.is_some_and(|e| e <= DEADLINE + SLACK) && matches!(res, Ok(Err(_)));
    link.finish();
    Cell {
        api: format!("close_timeout({DEADLINE:?})"),
        transport: format!("{transport:?}"),
        condition,
        deadline: Some(DEADLINE),
        elapsed,
        result: shown(&res),
        ok,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listen {
    Unix,
    Tcp,
}

/// A server on a fresh listener, and the raw client of its one connection.
fn server_and_client(listen: Listen, config: Config) -> (Server, RawEnd, Option<PathBuf>) {
    let (server, client, path) = match listen {
        Listen::Unix => {
            let path = std::env::temp_dir().join(format!(
                "packetstream-{}-{}.sock",
                std::process::id(),
                unique_name("dl")
            ));
            let _ = std::fs::remove_file(&path);
            let server = Server::serve_unix(UnixListener::bind(&path).unwrap(), config).unwrap();
            let client = RawEnd::Unix(UnixStream::connect(&path).unwrap());
            (server, client, Some(path))
        }
        Listen::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let server = Server::serve_tcp(listener, config).unwrap();
            (server, RawEnd::Tcp(TcpStream::connect(addr).unwrap()), None)
        }
    };
    wait_for("the server to accept", LIMIT, || server.connections() == 1);
    (server, client, path)
}

fn stop_timeout_cell(listen: Listen, condition: Condition) -> Cell {
    let gate = Gate::new();
    let config = Config::default()
        .name(unique_name("sv"))
        .handler(gated_service(gate.clone()));
    let (server, mut client, path) = server_and_client(listen, config);
    match condition {
        Condition::PeerNeverReads => {
            // 64 replies of 128 KiB each, none of them read.
            let mut wire_bytes = Vec::new();
            for tag in 2..66 {
                request(tag, BIG, 128 << 10, &[0; 1024]).encode_into(&mut wire_bytes);
            }
            client.write_all(&wire_bytes);
            thread::sleep(ms(100));
        }
        Condition::PeerSilentMidPacket => {
            let mut bytes = wire(&request(2, ECHO, 0, &[0x44; 200]));
            bytes.truncate(bytes.len() / 2);
            client.write_all(&bytes);
        }
        Condition::HandlerNeverReturns => {
            client.write_all(&wire(&request(2, HOLD, 0, b"hold")));
            gate.wait_entered(1, LIMIT);
        }
        Condition::WriterBlockedInKernel => {
            client.write_all(&wire(&request(2, BIG, 16 << 20, b"")));
            thread::sleep(ms(100));
        }
    }
    let mut client = Some(client);
    if condition == Condition::HandlerNeverReturns {
        // The client goes away while its request is held.
        drop(client.take());
    }
    let (elapsed, res) = run_call(
        DEADLINE + SLACK,
        move || server.stop_timeout(DEADLINE),
        || {
            gate.open();
            drop(client.take());
        },
    );
    gate.open();
    drop(client);
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
    let ok = elapsed.is_some_and(|e| e <= DEADLINE + SLACK)
        && matches!(res, Ok(Err(Error::Timeout { .. })));
    Cell {
        api: format!("Server::stop_timeout({DEADLINE:?})"),
        transport: format!("{listen:?}"),
        condition,
        deadline: Some(DEADLINE),
        elapsed,
        result: shown(&res),
        ok,
    }
}

/// The `try_*` calls, side by side, on one link in `condition`: none may
/// block.
fn try_cells(transport: Transport, condition: Condition) -> Vec<Cell> {
    let (mut link, pending) = requester(transport, condition);
    type Outcome = (usize, Duration, String, bool);
    let (tx, rx) = mpsc::channel::<Outcome>();
    let calls: [(&str, usize, Option<u64>); 4] = [
        ("try_submit 100 B", 100, None),
        ("try_submit 1 MiB", 1 << 20, None),
        ("try_submit_on(3) 100 B", 100, Some(3)),
        ("try_submit_on(3) 1 MiB", 1 << 20, Some(3)),
    ];
    let mut names: Vec<&str> = calls.iter().map(|c| c.0).collect();
    names.push("try_wait");
    let mut handles = Vec::new();
    for (idx, &(_, size, channel)) in calls.iter().enumerate() {
        let (conn, tx) = (Arc::clone(&link.conn), tx.clone());
        handles.push(thread::spawn(move || {
            let payload = vec![0x22; size];
            let start = Instant::now();
            let res = match channel {
                None => conn.try_submit(ECHO, 0, &payload),
                Some(ch) => conn.try_submit_on(ch, ECHO, 0, &payload),
            };
            let elapsed = start.elapsed();
            let ok = matches!(res, Ok(_) | Err(Error::WouldBlock));
            let _ = tx.send((idx, elapsed, shown(&res.map(|_| ())), ok));
        }));
    }
    {
        let tx = tx.clone();
        let idx = calls.len();
        handles.push(thread::spawn(move || {
            let start = Instant::now();
            let res = pending.try_wait();
            let elapsed = start.elapsed();
            let ok = res.is_none();
            let _ = tx.send((idx, elapsed, shown(&res.map(|r| r.map(|_| ()))), ok));
        }));
    }
    drop(tx);
    let mut outcomes: Vec<Option<Outcome>> = vec![None; names.len()];
    let deadline = Instant::now() + TRY_BOUND + HANG;
    while outcomes.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(outcome) => {
                let idx = outcome.0;
                outcomes[idx] = Some(outcome);
            }
            Err(_) => break,
        }
    }
    let hung: Vec<usize> = (0..names.len())
        .filter(|&i| outcomes[i].is_none())
        .collect();
    let mut after_cut = vec![None; names.len()];
    if !hung.is_empty() {
        link.cut();
        let deadline = Instant::now() + LIMIT;
        for _ in &hung {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok((idx, elapsed, res, _)) = rx.recv_timeout(left) {
                after_cut[idx] = Some(format!(
                    "hang: returned {res} after {elapsed:?}, once unstuck"
                ));
            }
        }
    }
    let n_returned = outcomes.iter().flatten().count() + after_cut.iter().flatten().count();
    if n_returned == names.len() {
        for handle in handles {
            handle.join().unwrap();
        }
    }
    link.finish();
    names
        .iter()
        .enumerate()
        .map(|(idx, name)| {
            let (elapsed, result, ok) = match &outcomes[idx] {
                Some((_, elapsed, res, ok)) => {
                    (Some(*elapsed), res.clone(), *ok && *elapsed <= TRY_BOUND)
                }
                None => (
                    None,
                    after_cut[idx]
                        .clone()
                        .unwrap_or_else(|| "hang: still blocked once unstuck".to_string()),
                    false,
                ),
            };
            Cell {
                api: name.to_string(),
                transport: format!("{transport:?}"),
                condition,
                deadline: None,
                elapsed,
                result,
                ok,
            }
        })
        .collect()
}

#[test]
fn wait_timeout_meets_its_deadline_in_every_condition_on_every_transport() {
    let _serial = serial();
    let mut cells = Vec::new();
    for transport in TRANSPORTS {
        for condition in CONDITIONS {
            cells.push(wait_timeout_cell(transport, condition));
        }
    }
    check_cells("PendingResponse::wait_timeout", &cells);
}

#[test]
fn close_timeout_meets_its_deadline_in_every_condition_on_every_transport() {
    let _serial = serial();
    let mut cells = Vec::new();
    for transport in TRANSPORTS {
        for condition in CONDITIONS {
            cells.push(close_timeout_cell(transport, condition));
        }
    }
    check_cells("PacketConnection::close_timeout", &cells);
}

#[test]
fn server_stop_timeout_meets_its_deadline_in_every_condition_on_both_listeners() {
    let _serial = serial();
    let mut cells = Vec::new();
    for listen in [Listen::Unix, Listen::Tcp] {
        for condition in CONDITIONS {
            cells.push(stop_timeout_cell(listen, condition));
        }
    }
    check_cells("Server::stop_timeout", &cells);
}

#[test]
fn try_calls_never_block_in_any_condition_on_any_transport() {
    let _serial = serial();
    // No deadline to measure, only a generous bound: the transports run
    // side by side.
    let cells: Vec<Cell> = thread::scope(|s| {
        let runs: Vec<_> = TRANSPORTS
            .iter()
            .map(|&transport| {
                s.spawn(move || {
                    CONDITIONS
                        .iter()
                        .flat_map(|&condition| try_cells(transport, condition))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        runs.into_iter()
            .flat_map(|run| run.join().unwrap())
            .collect()
    });
    check_cells("try_submit, try_submit_on, try_wait", &cells);
}

// ---------------------------------------------------------------------------
// wait_timeout and a peer that does not read.

/// Queues 2,000 requests of 1 KiB to a peer that reads nothing, then waits
/// for one with a deadline.
fn wait_timeout_with_unread_queue(grace: Option<Duration>) -> (Option<Duration>, String) {
    let mut config = Config::default().name(unique_name("wt"));
    if let Some(grace) = grace {
        config = config.packet_grace(grace);
    }
    let (conn, peer) = RawPeer::with_patience(config, LIMIT);
    let conn = Arc::new(conn);
    let mut pending = None;
    for idx in 0..2000u64 {
        pending = Some(conn.submit(ECHO, idx, &[0x11; 1024]).unwrap());
    }
    let pending = pending.unwrap();
    let aborter = Arc::clone(&conn);
    let (elapsed, res) = run_call(
        DEADLINE + SLACK,
        move || pending.wait_timeout(DEADLINE),
        // Only an abort frees it.
        move || aborter.abort(),
    );
    conn.abort();
    drop(peer);
    let ok = elapsed.is_some_and(|e| e <= DEADLINE + SLACK)
        && matches!(res, Ok(Err(Error::Timeout { .. })));
    let line = format!("{elapsed:?}: {}", shown(&res));
    (ok.then_some(elapsed.unwrap()), line)
}

#[test]
fn wait_timeout_meets_its_deadline_when_the_peer_never_reads() {
    let _serial = serial();
    let mut failed = Vec::new();
    for grace in [None, Some(Duration::from_secs(60))] {
        let (met, line) = wait_timeout_with_unread_queue(grace);
        report(format!(
            "wait_timeout({DEADLINE:?}), 2,000 x 1 KiB unread, grace {grace:?}: {line}"
        ));
        if met.is_none() {
            failed.push(format!("packet grace {grace:?}: {line}"));
        }
    }
    assert!(
        failed.is_empty(),
        "wait_timeout({DEADLINE:?}) missed its deadline:\n{}",
        failed.join("\n")
    );
}

// ---------------------------------------------------------------------------
// close_timeout and Server::stop_timeout with a handler that does not return.

/// After an abort, `close_timeout` returns by its deadline, whatever it
/// returns, while a handler holds the raw peer's request.
#[test]
fn close_timeout_after_abort_does_not_wait_for_a_stuck_handler() {
    let _serial = serial();
    let gate = Gate::new();
    let name = unique_name("sh");
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(&name)
            .handler(gated_service(gate.clone())),
    );
    peer.request(2, HOLD, b"hold");
    gate.wait_entered(1, LIMIT);
    let conn = Arc::new(conn);
    conn.abort();
    let timeout = ms(500);
    let c = Arc::clone(&conn);
    let (elapsed, res) = run_call(
        timeout + SLACK,
        move || c.close_timeout(timeout),
        || gate.open(),
    );
    gate.open();
    drop(peer);
    common::assert_threads_gone(&name, LIMIT);
    report(format!(
        "close_timeout after abort, handler stuck: {elapsed:?}"
    ));
    assert!(
        elapsed.is_some_and(|e| e <= timeout + SLACK),
        "close_timeout({timeout:?}) took {elapsed:?} (None: hung until the handler was released) and returned {}",
        shown(&res)
    );
}

#[test]
fn server_stop_timeout_does_not_wait_for_a_stuck_handler() {
    let _serial = serial();
    let gate = Gate::new();
    let config = Config::default()
        .name(unique_name("ss"))
        .handler(gated_service(gate.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::serve_tcp(listener, config).unwrap();
    // A well-behaved client whose request the handler holds.
    let client = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    let pending = client.submit(HOLD, 0, b"hold").unwrap();
    gate.wait_entered(1, LIMIT);
    let timeout = ms(500);
    let (elapsed, res) = run_call(
        timeout + SLACK,
        move || server.stop_timeout(timeout),
        || gate.open(),
    );
    gate.open();
    let _ = pending.wait_timeout(LIMIT);
    let _ = client.close_timeout(LIMIT);
    report(format!(
        "stop_timeout({timeout:?}), handler stuck: {elapsed:?}, {}",
        shown(&res)
    ));
    assert!(
        elapsed.is_some_and(|e| e <= timeout + SLACK) && matches!(res, Ok(Err(Error::Timeout { .. }))),
        "stop_timeout({timeout:?}) took {elapsed:?} (None: hung until the handler was released) and returned {}",
        shown(&res)
    );
}

// ---------------------------------------------------------------------------
// try_submit never blocks.

#[test]
fn try_submit_never_blocks_on_a_peer_that_does_not_read() {
    let _serial = serial();
    for on_channel in [None, Some(3)] {
        let (conn, peer) = RawPeer::with_patience(Config::default().name(unique_name("ts")), LIMIT);
        let conn = Arc::new(conn);
        let peer = Arc::new(Mutex::new(Some(peer)));
        let mut results = Vec::new();
        // Ok while there is room in the queue, then WouldBlock: never a wait.
        for _ in 0..64 {
            let c = Arc::clone(&conn);
            let p = Arc::clone(&peer);
            let (elapsed, res) = run_call(
                TRY_BOUND,
                move || {
                    let payload = vec![0x22; 1 << 20];
                    match on_channel {
                        None => c.try_submit(ECHO, 0, &payload).map(drop),
                        Some(ch) => c.try_submit_on(ch, ECHO, 0, &payload).map(drop),
                    }
                },
                move || drop(p.lock().unwrap().take()),
            );
            let last = matches!(res, Ok(Err(Error::WouldBlock)));
            assert!(
                elapsed.is_some_and(|e| e <= TRY_BOUND) && matches!(res, Ok(Ok(()) | Err(Error::WouldBlock))),
                "try_submit{} of 1 MiB #{} to a peer that does not read: took {elapsed:?} (None: blocked until the peer went away), returned {}",
                if on_channel.is_some() { "_on" } else { "" },
                results.len() + 1,
                shown(&res)
            );
            results.push(res);
            if last {
                break;
            }
        }
        conn.abort();
        assert!(
            matches!(results.last(), Some(Ok(Err(Error::WouldBlock)))),
            "the queue never filled: {} calls",
            results.len()
        );
        report(format!(
            "try_submit{} of 1 MiB: {} Ok, then WouldBlock",
            if on_channel.is_some() { "_on" } else { "" },
            results.len() - 1
        ));
    }
}

// ---------------------------------------------------------------------------
// After an abort, nothing blocks behind a writer stuck in the kernel.

/// One call after an abort, run within `bound`.
struct Step {
    what: &'static str,
    bound: Duration,
    call: Box<dyn FnOnce() -> String + Send>,
}

/// Runs every step, each within its bound, and only then unsticks what
/// hung; fails with every step that blocked.
fn run_steps(steps: Vec<Step>, unstick: impl FnOnce()) {
    let mut hung = Vec::new();
    let mut failed = Vec::new();
    for step in steps {
        match timed(step.bound + HANG, step.call) {
            Timed::Done(res, elapsed) => {
                report(format!("after abort: {}: {elapsed:?}, {res}", step.what));
                if elapsed > step.bound {
                    failed.push(format!(
                        "{} took {elapsed:?} (bound {:?})",
                        step.what, step.bound
                    ));
                }
            }
            Timed::Stuck(running) => {
                failed.push(format!(
                    "{} blocks (still blocked after {:?})",
                    step.what,
                    step.bound + HANG
                ));
                hung.push(running);
            }
        }
    }
    unstick();
    for running in hung {
        running.finish_within(LIMIT);
    }
    assert!(failed.is_empty(), "after abort:\n{}", failed.join("\n"));
}

fn submit_fails_at_once(
    conn: &Arc<PacketConnection>,
    try_: bool,
) -> Box<dyn FnOnce() -> String + Send> {
    let conn = Arc::clone(conn);
    Box::new(move || {
        let res = if try_ {
            conn.try_submit(ECHO, 0, b"late")
        } else {
            conn.submit(ECHO, 0, b"late")
        };
        match res {
            Err(e) if e.is_disconnect() => format!("{e:?}"),
            other => panic!(
                "a submit after abort must fail: {}",
                shown(&other.map(drop))
            ),
        }
    })
}

fn steps_after_abort(conn: &Arc<PacketConnection>) -> Vec<Step> {
    let c = Arc::clone(conn);
    let c2 = Arc::clone(conn);
    vec![
        Step {
            what: "submit",
            bound: TRY_BOUND,
            call: submit_fails_at_once(conn, false),
        },
        Step {
            what: "try_submit",
            bound: TRY_BOUND,
            call: submit_fails_at_once(conn, true),
        },
        Step {
            what: "end_requests",
            bound: TRY_BOUND,
            call: Box::new(move || {
                c.end_requests();
                "returned".to_string()
            }),
        },
        Step {
            what: "close_timeout(200ms)",
            bound: DEADLINE + SLACK,
            call: Box::new(move || shown(&c2.close_timeout(DEADLINE))),
        },
    ]
}

/// A connection over pipes whose handler thread is blocked writing a reply
/// far larger than a pipe holds, to a peer that never reads it; then
/// aborted. Returns the connection, the pipe its replies go to (dropping it
/// unsticks the write) and the peer's end of the other pipe.
fn aborted_with_a_handler_blocked_on_a_pipe() -> (Arc<PacketConnection>, PipeReader, PipeWriter) {
    let (in_r, mut in_w) = io::pipe().unwrap();
    let (out_r, out_w) = io::pipe().unwrap();
    let conn = PacketConnection::from_fds(
        OwnedFd::from(in_r),
        OwnedFd::from(out_w),
        Config::default()
            .name(unique_name("ab"))
            .handler_threads(2)
            .handler(gated_service(Gate::new())),
    )
    .unwrap();
    let conn = Arc::new(conn);
    in_w.write_all(&wire(&request(2, BIG, 4 << 20, b"")))
        .unwrap();
    wait_for("the request to arrive", LIMIT, || {
        conn.stats().requests_received == 1
    });
    // Time for the handler to make its reply and for the write to block.
    thread::sleep(ms(200));
    conn.abort();
    thread::sleep(ms(50));
    (conn, out_r, in_w)
}

#[test]
fn after_abort_a_handler_blocked_writing_to_a_pipe_blocks_nothing() {
    let _serial = serial();
    let (conn, out_r, in_w) = aborted_with_a_handler_blocked_on_a_pipe();
    let reader = Mutex::new(Some(out_r));
    run_steps(steps_after_abort(&conn), || {
        drop(reader.lock().unwrap().take())
    });
    drop((conn, in_w));
}

#[test]
fn drop_after_abort_with_a_handler_blocked_writing_to_a_pipe_returns_at_once() {
    let _serial = serial();
    let (conn, out_r, in_w) = aborted_with_a_handler_blocked_on_a_pipe();
    let conn = Arc::try_unwrap(conn).expect("the test holds the only handle");
    let reader = Mutex::new(Some(out_r));
    let step = Step {
        what: "drop",
        bound: TRY_BOUND,
        call: Box::new(move || {
            drop(conn);
            "dropped".to_string()
        }),
    };
    run_steps(vec![step], || drop(reader.lock().unwrap().take()));
    drop(in_w);
}

/// A writer that blocks until its gate opens, then fails: a stream stuck
/// in a write, with no way to shut it down.
struct StuckWriter(Gate);

impl Write for StuckWriter {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        self.0.pass();
        Err(io::Error::new(io::ErrorKind::BrokenPipe, "writer released"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn after_abort_a_caller_blocked_in_any_writer_blocks_nothing() {
    let _serial = serial();
    let gate = Gate::new();
    let (in_r, in_w) = io::pipe().unwrap();
    let conn = Arc::new(
        PacketConnection::new(
            in_r,
            StuckWriter(gate.clone()),
            Config::default().name(unique_name("aw")),
        )
        .unwrap(),
    );
    let c = Arc::clone(&conn);
    let writer = timed(ms(100), move || {
        let _ = c.submit(ECHO, 0, &vec![0x33; 128 << 10]);
    });
    gate.wait_entered(1, LIMIT);
    conn.abort();
    thread::sleep(ms(50));
    let g = gate.clone();
    run_steps(steps_after_abort(&conn), move || g.open());
    gate.open();
    if let Timed::Stuck(running) = writer {
        assert!(
            running.finish_within(LIMIT).is_some(),
            "the blocked submit returns once its writer fails"
        );
    }
    drop(in_w);
    let dropped = timed(LIMIT, move || drop(conn));
    assert!(matches!(dropped, Timed::Done(..)), "drop hangs");
}

// ---------------------------------------------------------------------------
// Durations saturate.

#[test]
fn wait_timeout_of_duration_max_means_no_limit() {
    let (client, server) = pair();
    for timeout in [Duration::MAX, Duration::from_secs(u64::MAX)] {
        // Not answered yet: the wait has to sleep.
        let pending = client.submit(SLEEP, 0, b"50").unwrap();
        let res = within_or(
            "wait_timeout",
            LIMIT,
            move || pending.wait_timeout(timeout),
            || {},
        );
        assert_eq!(res.unwrap().payload, b"50");
        // Answered already.
        let pending = client.submit(ECHO, 0, b"now").unwrap();
        wait_for("the response", LIMIT, || pending.is_ready());
        let res = within_or(
            "wait_timeout",
            LIMIT,
            move || pending.wait_timeout(timeout),
            || {},
        );
        assert_eq!(res.unwrap().payload, b"now");
    }
    client.close_timeout(LIMIT).unwrap();
    server.close_timeout(LIMIT).unwrap();
}

#[test]
fn close_timeout_of_duration_max_means_no_limit() {
    let (client, server) = pair();
    assert_eq!(client.call(ECHO, 0, b"x").unwrap().payload, b"x");
    let client = Arc::new(client);
    let c = Arc::clone(&client);
    let res = within_or(
        "close_timeout(Duration::MAX)",
        LIMIT,
        move || c.close_timeout(Duration::MAX),
        || client.abort(),
    );
    res.unwrap();
    let res = within_or(
        "close_timeout(Duration::MAX)",
        LIMIT,
        move || server.close_timeout(Duration::MAX),
        || {},
    );
    res.unwrap();
}

#[test]
fn server_stop_timeout_of_duration_max_means_no_limit() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::serve_tcp(
        listener,
        Config::default().name(unique_name("sm")).handler(echo),
    )
    .unwrap();
    let client = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    assert_eq!(client.call(ECHO, 0, b"x").unwrap().payload, b"x");
    let res = within_or(
        "stop_timeout(Duration::MAX)",
        LIMIT,
        move || server.stop_timeout(Duration::MAX),
        || {},
    );
    res.unwrap();
    client.close_timeout(LIMIT).unwrap();
}

#[test]
fn packet_grace_of_duration_max_never_panics_and_close_returns() {
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(
        b,
        Config::default().name(unique_name("gs")).handler(echo),
    )
    .unwrap();
    let client = Arc::new(
        PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name(unique_name("gc"))
                .packet_grace(Duration::MAX),
        )
        .unwrap(),
    );
    // Queued, left for a while (the send thread sees it and waits the
    // grace), then waited for: the wait writes it.
    let pending = client.submit(ECHO, 0, b"queued").unwrap();
    thread::sleep(ms(50));
    assert_eq!(pending.wait_timeout(LIMIT).unwrap().payload, b"queued");
    assert_eq!(client.call(ECHO, 0, b"call").unwrap().payload, b"call");
    let c = Arc::clone(&client);
    let res = within_or(
        "close with packet_grace(Duration::MAX)",
        Duration::from_secs(5),
        move || c.close(),
        || {
            client.abort();
            server.abort();
        },
    );
    res.unwrap();
    within_or("server join", LIMIT, move || server.join(), || {}).unwrap();
}

// ---------------------------------------------------------------------------
// A whole request is served at once, whatever follows it.

#[test]
fn a_whole_request_is_answered_while_the_next_packet_is_incomplete() {
    const PATIENT: Duration = Duration::from_secs(5);
    #[derive(Clone, Copy, Debug)]
    enum Tail {
        HalfRequest,
        HalfResponse,
        OneByteOfALength,
    }
    let mut variants = Vec::new();
    for threads in [1, 4] {
        for tail in [
            Tail::HalfRequest,
            Tail::HalfResponse,
            Tail::OneByteOfALength,
        ] {
            variants.push((threads, tail));
        }
    }
    let is_reply_to =
        |tag| move |p: &Packet| p.tag == tag && matches!(p.kind, PacketKind::Response { .. });
    // Side by side: nothing here is timed, and each waits the patience on
    // failure.
    let failures: Vec<String> = thread::scope(|s| {
        let runs: Vec<_> = variants
            .iter()
            .map(|&(threads, tail)| {
                s.spawn(move || {
                    let (conn, mut peer) = RawPeer::with_patience(
                        Config::default()
                            .name(unique_name("hl"))
                            .handler_threads(threads)
                            .handler(echo),
                        PATIENT,
                    );
                    // One round trip first, so that the handler threads are
                    // started and idle.
                    peer.request(9, ECHO, b"warm up");
                    peer.recv_until(is_reply_to(9));
                    thread::sleep(ms(50));
                    let ours = conn.submit(ECHO, 0, b"ours").unwrap();
                    let next = match tail {
                        Tail::HalfRequest => wire(&request(3, ECHO, 0, &[0x55; 1000])),
                        Tail::HalfResponse => wire(&response(ours.tag(), true, 0, &[0x66; 1000])),
                        // 1000 bytes of payload: a two-byte length.
                        Tail::OneByteOfALength => wire(&request(3, ECHO, 0, &[0x77; 1000])),
                    };
                    let split = match tail {
                        Tail::OneByteOfALength => 1,
                        _ => next.len() / 2,
                    };
                    let mut bytes = wire(&request(2, ECHO, 0, b"first"));
                    bytes.extend_from_slice(&next[..split]);
                    peer.send_bytes(&bytes);
                    let first = loop {
                        match peer.try_recv() {
                            Ok(Some(p)) if is_reply_to(2)(&p) => break Ok(p),
                            Ok(Some(_)) => {}
                            Ok(None) => break Err("the stream ended".to_string()),
                            Err(e) => {
                                break Err(format!(
                                    "no reply to the whole request within {PATIENT:?} ({e})"
                                ))
                            }
                        }
                    };
                    let res = match first {
                        Ok(reply) if reply.payload == b"first" => Ok(()),
                        Ok(reply) => Err(format!("wrong reply {reply:?}")),
                        Err(e) => Err(e),
                    };
                    if res.is_ok() {
                        // The rest arrives, and is served too.
                        peer.send_bytes(&next[split..]);
                        match tail {
                            Tail::HalfResponse => {
                                assert_eq!(ours.wait_timeout(LIMIT).unwrap().payload.len(), 1000)
                            }
                            _ => assert_eq!(peer.recv_until(is_reply_to(3)).1.payload.len(), 1000),
                        }
                    }
                    conn.abort();
                    res.map_err(|e| format!("{threads} handler threads, then {tail:?}: {e}"))
                })
            })
            .collect();
        runs.into_iter()
            .filter_map(|run| run.join().unwrap().err())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Writes through until `budget` bytes have gone, then blocks until its
/// gate opens: a link that stalls in the middle of a large packet.
struct StallAfter {
    inner: UnixStream,
    budget: usize,
    written: Arc<AtomicUsize>,
    gate: Gate,
}

impl Write for StallAfter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let done = self.written.load(Ordering::SeqCst);
        let n = if done >= self.budget {
            self.gate.pass();
            buf.len()
        } else {
            buf.len().min(self.budget - done)
        };
        let n = self.inner.write(&buf[..n])?;
        self.written.fetch_add(n, Ordering::SeqCst);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn a_small_request_is_answered_before_a_large_one_behind_it_has_arrived() {
    const LARGE: usize = 4 << 20;
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(
        b,
        Config::default().name(unique_name("hs")).handler(echo),
    )
    .unwrap();
    let gate = Gate::new();
    let written = Arc::new(AtomicUsize::new(0));
    let link = StallAfter {
        inner: a.try_clone().unwrap(),
        budget: 1 << 20,
        written: Arc::clone(&written),
        gate: gate.clone(),
    };
    // A long grace: the small request waits in the queue, to go out with
    // the large one.
    let client = Arc::new(
        PacketConnection::new(
            a,
            link,
            Config::default()
                .name(unique_name("hc"))
                .packet_grace(Duration::from_secs(60)),
        )
        .unwrap(),
    );
    // One round trip first, so that the server's handler threads are started
    // and idle.
    assert_eq!(
        client.call(ECHO, 0, b"warm up").unwrap().payload,
        b"warm up"
    );
    thread::sleep(ms(50));
    let small = client.submit(ECHO, 0, b"small").unwrap();
    let c = Arc::clone(&client);
    let large_payload = vec![0x88; LARGE];
    let large = thread::spawn(move || {
        c.submit(ECHO, 0, &large_payload)
            .and_then(|p| p.wait_timeout(LIMIT))
            .map(|rsp| rsp.payload.len())
    });
    // The link stalls a quarter of the way into the large request, and only
    // then does this thread wait for the small one.
    gate.wait_entered(1, LIMIT);
    let res = small.wait_timeout(Duration::from_secs(5));
    let sent_then = written.load(Ordering::SeqCst);
    gate.open();
    let large = large.join().unwrap();
    let closed = client.close_timeout(LIMIT);
    let _ = server.close_timeout(LIMIT);
    match res {
        Ok(rsp) => assert_eq!(rsp.payload, b"small"),
        Err(e) => panic!(
            "no reply to the small request while the large one was {sent_then} bytes into its {LARGE}: {e:?}"
        ),
    }
    assert!(sent_then < LARGE, "the large request had gone out whole");
    assert_eq!(large.unwrap(), LARGE);
    closed.unwrap();
}

// ---------------------------------------------------------------------------
// Replies within the packet limit are sent.

const LIMIT_1K: u64 = 1024;

#[test]
fn every_accepted_request_gets_its_echo_under_a_small_packet_limit() {
    let (conn, mut peer) = RawPeer::with_patience(
        Config::default()
            .name(unique_name("lm"))
            .max_packet_len(LIMIT_1K)
            .handler(echo),
        LIMIT,
    );
    let mut wrong = Vec::new();
    let mut largest_accepted = 0;
    for (idx, len) in (940..=1030usize).enumerate() {
        let tag = 2 + idx as u64;
        let rq = request(tag, ECHO, 0, &vec![0x44; len]);
        let accepted = body_len(&rq) <= LIMIT_1K;
        peer.send(&rq);
        let reply = peer.recv_packet();
        assert_eq!(reply.tag, tag);
        let fine = if accepted {
            largest_accepted = largest_accepted.max(body_len(&rq));
            reply.kind == (PacketKind::Response { ok: true, flags: 0 })
                && reply.payload.len() == len
        } else {
            // Refused, for whatever reason the text gives.
            matches!(reply.kind, PacketKind::Response { ok: false, .. })
        };
        if !fine {
            wrong.push(format!(
                "echo of {len} bytes (request body {}): {:?} {:?}",
                body_len(&rq),
                reply.kind,
                String::from_utf8_lossy(&reply.payload[..reply.payload.len().min(60)])
            ));
        }
    }
    conn.abort();
    assert_eq!(largest_accepted, LIMIT_1K, "the boundary was not tried");
    assert!(
        wrong.is_empty(),
        "{} replies wrong:\n{}",
        wrong.len(),
        listed(&wrong)
    );
}

#[test]
fn a_reply_is_sent_if_and_only_if_its_encoded_body_fits_the_limit() {
    let (conn, mut peer) = RawPeer::with_patience(
        Config::default()
            .name(unique_name("lr"))
            .max_packet_len(LIMIT_1K)
            .handler(gated_service(Gate::new())),
        LIMIT,
    );
    let mut wrong = Vec::new();
    let mut fits_exactly = 0;
    for flags in [0, 0x7f, u64::MAX] {
        for len in 960..=1030usize {
            // Each request is answered before the next: tags may repeat.
            let tag = 2 + (len - 960) as u64;
            let rq = request(tag, SIZED, flags, len.to_string().as_bytes());
            let would = Packet {
                channel: 0,
                tag,
                kind: PacketKind::Response { ok: true, flags },
                payload: vec![0x33; len],
            };
            let fits = body_len(&would) <= LIMIT_1K;
            fits_exactly += usize::from(body_len(&would) == LIMIT_1K);
            peer.send(&rq);
            let reply = peer.recv_packet();
            assert_eq!(reply.tag, tag);
            if body_len(&reply) > LIMIT_1K {
                wrong.push(format!(
                    "reply of {} bytes sent over the limit",
                    body_len(&reply)
                ));
            }
            let ok = matches!(reply.kind, PacketKind::Response { ok: true, .. });
            if fits && !(ok && reply == would) {
                wrong.push(format!(
                    "reply of {len} bytes, flags {flags:#x} (body {}) fits but was refused: {:?}",
                    body_len(&would),
                    String::from_utf8_lossy(&reply.payload[..reply.payload.len().min(60)])
                ));
            }
            if !fits && ok {
                wrong.push(format!(
                    "reply of body {} sent ok over the limit",
                    body_len(&would)
                ));
            }
        }
    }
    conn.abort();
    assert_eq!(
        fits_exactly, 3,
        "the boundary was not tried for every flags value"
    );
    assert!(
        wrong.is_empty(),
        "{} replies wrong:\n{}",
        wrong.len(),
        listed(&wrong)
    );
}

#[test]
fn between_two_ends_every_request_within_the_limit_is_echoed() {
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(
        b,
        Config::default()
            .name(unique_name("ls"))
            .max_packet_len(LIMIT_1K)
            .handler(echo),
    )
    .unwrap();
    let client = PacketConnection::from_unix_stream(
        a,
        Config::default()
            .name(unique_name("lc"))
            .max_packet_len(LIMIT_1K),
    )
    .unwrap();
    let mut wrong = Vec::new();
    let mut largest_echoed = 0;
    for (idx, len) in (960..=1030usize).enumerate() {
        // The client's tags stay below 128 here, one byte each, whichever
        // it uses.
        let tag = 2 + idx as u64;
        let fits = body_len(&request(tag, ECHO, 0, &vec![0; len])) <= LIMIT_1K;
        let res = client
            .submit(ECHO, 0, &vec![0x44; len])
            .and_then(|p| p.wait_timeout(LIMIT));
        match (fits, res) {
            (true, Ok(rsp)) if rsp.payload.len() == len => largest_echoed = len,
            (false, Err(Error::TooLarge { .. })) => {}
            (fits, res) => wrong.push(format!(
                "{len} bytes (request fits: {fits}): {}",
                shown(&res.map(|r| r.payload.len()))
            )),
        }
    }
    client.close_timeout(LIMIT).unwrap();
    server.close_timeout(LIMIT).unwrap();
    assert!(
        wrong.is_empty(),
        "{} calls wrong:\n{}",
        wrong.len(),
        listed(&wrong)
    );
    assert!(largest_echoed > 1000, "largest echo {largest_echoed}");
}

// ---------------------------------------------------------------------------
// Server::stop drains every connection at once.

const CLIENTS: usize = 50;
/// The request each client has in progress when the stop begins.
const FIRST: u64 = 8;

struct StopRun {
    elapsed: Option<Duration>,
    result: String,
    /// Handler runs that began after the stop had.
    late: usize,
    /// Requests sent after the first one's reply: (ran, refused).
    again: (usize, usize),
    /// First requests that did not get their reply.
    unanswered: Vec<String>,
}

/// 50 clients, each with a request in progress in a 200 ms handler when
/// the stop begins; each sends more requests as soon as it has its reply,
/// until one is refused. `stop` is the call under test.
fn stop_with_busy_clients(
    listen: Listen,
    bound: Duration,
    stop: impl FnOnce(Server) -> packetstream::Result<()> + Send + 'static,
) -> StopRun {
    let gate = Gate::new();
    let stopping = Arc::new(AtomicBool::new(false));
    let late = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (gate, stopping, late) = (gate.clone(), Arc::clone(&stopping), Arc::clone(&late));
        move |rq: Request| -> HandlerResult {
            if stopping.load(Ordering::SeqCst) {
                late.fetch_add(1, Ordering::SeqCst);
            }
            if rq.rq_type == FIRST {
                gate.pass();
            }
            thread::sleep(ms(200));
            echo(rq)
        }
    };
    // One handler thread per client, so that every client has a request in
    // progress at once.
    let config = ServerConfig::new(Config::default().name(unique_name("st")).handler(handler))
        .handler_threads(CLIENTS);
    let (server, connect): (Server, Box<dyn Fn() -> PacketConnection + Sync>) = match listen {
        Listen::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let server = Server::serve_tcp(listener, config).unwrap();
            (
                server,
                Box::new(move || PacketConnection::connect_tcp(addr, Config::default()).unwrap()),
            )
        }
        Listen::Unix => {
            let path = std::env::temp_dir().join(format!(
                "packetstream-{}-{}.sock",
                std::process::id(),
                unique_name("st")
            ));
            let _ = std::fs::remove_file(&path);
            let server = Server::serve_unix(UnixListener::bind(&path).unwrap(), config).unwrap();
            (
                server,
                Box::new(move || PacketConnection::connect_unix(&path, Config::default()).unwrap()),
            )
        }
    };
    thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|idx| {
                let connect = &connect;
                s.spawn(move || {
                    let client = connect();
                    let first = client
                        .submit(FIRST, idx as u64, b"first")
                        .and_then(|p| p.wait_timeout(LIMIT));
                    let mut again = (0, 0);
                    let until = Instant::now() + Duration::from_secs(3);
                    while Instant::now() < until && again.0 < 50 {
                        let res = client
                            .submit(ECHO, idx as u64, b"again")
                            .and_then(|p| p.wait_timeout(LIMIT));
                        if res.is_ok() {
                            again.0 += 1;
                        } else {
                            again.1 += 1;
                            break;
                        }
                    }
                    let _ = client.close_timeout(LIMIT);
                    (first.map(drop), again)
                })
            })
            .collect();
        gate.wait_entered(CLIENTS, LIMIT);
        stopping.store(true, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        let stopper = thread::spawn(move || {
            let start = Instant::now();
            let res = stop(server);
            let _ = tx.send((start.elapsed(), shown(&res)));
        });
        // The handlers' 200 ms begin now, with the stop under way.
        gate.open();
        let (elapsed, result) = match rx.recv_timeout(bound + HANG) {
            Ok((elapsed, result)) => {
                stopper.join().unwrap();
                (Some(elapsed), result)
            }
            Err(_) => (None, format!("still running after {:?}", bound + HANG)),
        };
        let mut run = StopRun {
            elapsed,
            result,
            late: 0,
            again: (0, 0),
            unanswered: Vec::new(),
        };
        for (idx, client) in clients.into_iter().enumerate() {
            let (first, again) = client.join().unwrap();
            if let Err(e) = first {
                run.unanswered.push(format!("client {idx}: {e:?}"));
            }
            run.again.0 += again.0;
            run.again.1 += again.1;
        }
        run.late = late.load(Ordering::SeqCst);
        run
    })
}

#[test]
fn server_stop_timeout_drains_fifty_busy_clients_side_by_side_within_its_deadline() {
    let _serial = serial();
    let timeout = Duration::from_secs(2);
    let run = stop_with_busy_clients(Listen::Tcp, timeout + SLACK, move |server| {
        server.stop_timeout(timeout)
    });
    report(format!(
        "stop_timeout({timeout:?}), {CLIENTS} busy TCP clients: {:?}, {}; {} late handler runs; after the stop began {} requests ran, {} were refused",
        run.elapsed, run.result, run.late, run.again.0, run.again.1
    ));
    let mut failed = Vec::new();
    if run.elapsed.is_none_or(|e| e > timeout + SLACK) || run.result != "Ok(())" {
        failed.push(format!(
            "stop_timeout took {:?} and returned {}",
            run.elapsed, run.result
        ));
    }
    if run.late > 0 {
        failed.push(format!(
            "{} requests sent after the stop began were run",
            run.late
        ));
    }
    if !run.unanswered.is_empty() {
        failed.push(format!(
            "requests in progress not answered: {}",
            run.unanswered.join(", ")
        ));
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn server_stop_refuses_new_requests_and_drains_every_connection_at_once() {
    let _serial = serial();
    let run = stop_with_busy_clients(Listen::Unix, LIMIT, |server| {
        server.stop();
        Ok(())
    });
    report(format!(
        "stop(), {CLIENTS} busy Unix clients: {:?}, {}; {} late handler runs; after the stop began {} requests ran, {} were refused",
        run.elapsed, run.result, run.late, run.again.0, run.again.1
    ));
    let mut failed = Vec::new();
    if run.elapsed.is_none() || run.result != "Ok(())" {
        failed.push(format!(
            "stop took {:?} and returned {}",
            run.elapsed, run.result
        ));
    }
    if run.late > 0 {
        failed.push(format!(
            "{} requests sent after the stop began were run",
            run.late
        ));
    }
    if !run.unanswered.is_empty() {
        failed.push(format!(
            "requests in progress not answered: {}",
            run.unanswered.join(", ")
        ));
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// A caller reads the stream itself (the receive thread has lent it the
/// reader) and meets the peer's requests for this end's handler, whose one
/// thread is held and whose queue of one is full: the caller waits for
/// room, as the receive thread would. An abort then must let it go, its
/// request failed, though the handler is still held. (It stayed blocked
/// pushing into the full queue until the handler returned.)
#[test]
fn an_abort_lets_a_caller_go_that_waits_for_handler_room_while_it_reads() {
    let held = Gate::new();
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("roomwait"))
            .extensions(false)
            .handler_threads(1)
            .handler_queue(1)
            .handler({
                let held = held.clone();
                move |rq: Request| -> HandlerResult {
                    if rq.rq_type == HOLD {
                        held.pass();
                    }
                    Ok(rq.payload.into())
                }
            }),
    );
    let conn = Arc::new(conn);
    // A first call, answered: the receive thread lends its reader after it.
    let first = {
        let conn = Arc::clone(&conn);
        thread::spawn(move || conn.call(1, 0, b"first"))
    };
    let asked = peer.recv_packet();
    peer.send(&response(asked.tag, true, 0, b"first"));
    let first = within("the first call", move || first.join().unwrap());
    assert!(first.is_ok(), "{first:?}");
    let caller = {
        let conn = Arc::clone(&conn);
        thread::spawn(move || conn.call(1, 0, b"second"))
    };
    let asked = peer.recv_packet();
    // Requests that hold the one handler thread and fill its queue, read
    // by the caller as it reads for its own response.
    for tag in 0..6 {
        peer.request(tag, HOLD, b"hold");
    }
    wait_for("the caller to wait for room", LIMIT, || {
        conn.stats().requests_received >= 3
    });
    conn.abort();
    let second = within_or(
        "the call waiting for handler room after the abort",
        HANG,
        move || caller.join().unwrap(),
        || held.open(),
    );
    held.open();
    drop(asked);
    assert!(second.is_err(), "{second:?}");
}
