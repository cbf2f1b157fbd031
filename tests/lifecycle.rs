//! How connections end and say so: a crash is not an EOF; requests never
//! written are told apart from requests lost; status and lifecycle hooks
//! through a connection's life, on every constructor; deadlines that name
//! their request; log lines that name their connection; and streams the
//! caller keeps, which outlive the connections run over them.

mod common;

use std::collections::BTreeSet;
use std::io::{self, Cursor, PipeReader, PipeWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use common::child::{self, child_fixture, Mode};
use common::{
    bad_control, decode_all, echo, join_all, ms, pair, report, serial, timed, unique_name,
    wait_for, wire, within, Gate, RawPeer, Timed, DEADLINE, ECHO, EXIT, FAIL, HANG, HOLD, LIMIT,
    QUIT, SLACK,
};
use packetstream::{
    impl_payload, Config, Disconnect, Dispatcher, Error, Fulfil, HandlerError, HandlerResult,
    OnClose, Packet, PacketConnection, PacketKind, PendingResponse, Request, RequestId,
    RequestType, Response,
};

/// Waits at the test's gate, then echoes.
const STUCK: u64 = 13;

fn request_tags(packets: &[Packet]) -> BTreeSet<u64> {
    packets
        .iter()
        .filter(|p| matches!(p.kind, PacketKind::Request { .. }))
        .map(|p| p.tag)
        .collect()
}

/// The outcome of a request, which must come within `LIMIT`.
fn outcome(pending: &PendingResponse) -> Result<Response, Error> {
    let res = pending.wait_timeout(LIMIT);
    if let Err(Error::Timeout { .. }) = res {
        panic!("request {} had no outcome within {LIMIT:?}", pending.tag());
    }
    res
}

/// The outcome of a request, once it has come, waited for without asking
/// for the queue to be written (as a wait with a deadline does).
fn settled(pending: &PendingResponse) -> Result<Response, Error> {
    wait_for("the request's outcome", LIMIT, || pending.is_ready());
    pending.try_wait().expect("ready")
}

/// Has the queue written now, and waits until a write has ended: what
/// was queued is on the wire.
fn flush(conn: &PacketConnection, pending: &PendingResponse) {
    let _ = pending.wait_timeout(Duration::ZERO);
    wait_for("the queue is written", LIMIT, || {
        conn.stats().queued_bytes == 0
    });
}

/// `close()`, which must return within the test's limit.
fn close(conn: &Arc<PacketConnection>) -> Result<(), Error> {
    let conn = Arc::clone(conn);
    within("close", move || conn.close())
}

/// What a connection's lifecycle hooks saw.
#[derive(Clone, Default)]
struct Hooks {
    ends: Arc<Mutex<Vec<Disconnect>>>,
    peer_erqs: Arc<AtomicUsize>,
}

impl Hooks {
    /// `config` with both hooks recording here.
    fn on(&self, config: Config) -> Config {
        let ends = Arc::clone(&self.ends);
        let peer_erqs = Arc::clone(&self.peer_erqs);
        config
            .on_end(move |why| ends.lock().unwrap().push(why))
            .on_peer_end_requests(move || {
                peer_erqs.fetch_add(1, Ordering::SeqCst);
            })
    }

    fn ends(&self) -> Vec<Disconnect> {
        self.ends.lock().unwrap().clone()
    }

    fn peer_erqs(&self) -> usize {
        self.peer_erqs.load(Ordering::SeqCst)
    }
}

/// How a test ends a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// The peer sends its EOF packet (or, for a connection of this crate at
    /// the far end, closes in order).
    PeerEof,
    /// The peer's stream ends without EOF: it is dropped, shut down for
    /// writing, or its process killed.
    StreamEnded,
    /// This end aborts.
    Abort,
    /// The peer sends a control packet that is neither EOF nor ERQ.
    Protocol,
}

const ENDINGS: [Ending; 4] = [
    Ending::PeerEof,
    Ending::StreamEnded,
    Ending::Abort,
    Ending::Protocol,
];

impl Ending {
    fn why(self) -> Disconnect {
        match self {
            Ending::PeerEof => Disconnect::PeerEof,
            Ending::StreamEnded => Disconnect::StreamEnded,
            Ending::Abort => Disconnect::Local,
            Ending::Protocol => Disconnect::Protocol,
        }
    }

    /// Ends `conn`, whose raw peer is `raw`, this way.
    fn end_raw(self, conn: &PacketConnection, raw: &mut UnixStream) {
        match self {
            Ending::PeerEof => raw.write_all(&wire(&Packet::eof())).unwrap(),
            Ending::StreamEnded => raw.shutdown(Shutdown::Write).unwrap(),
            Ending::Abort => conn.abort(),
            Ending::Protocol => raw.write_all(&wire(&bad_control())).unwrap(),
        }
    }
}

/// Everything a raw peer's socket receives, read on a thread of its own
/// until the end of the stream.
struct Wire {
    bytes: Arc<Mutex<Vec<u8>>>,
    handle: JoinHandle<()>,
}

impl Wire {
    fn record(mut stream: UnixStream) -> Wire {
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let handle = {
            let bytes = Arc::clone(&bytes);
            thread::spawn(move || {
                let mut chunk = vec![0u8; 64 << 10];
                while let Ok(n @ 1..) = stream.read(&mut chunk) {
                    bytes.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            })
        };
        Wire { bytes, handle }
    }

    /// The whole packets received so far.
    fn packets(&self) -> Vec<Packet> {
        decode_all(&self.bytes.lock().unwrap()).0
    }

    /// The tags of the requests received so far.
    fn request_tags(&self) -> BTreeSet<u64> {
        request_tags(&self.packets())
    }

    /// Waits for the end of the stream: the packets, and the length of a
    /// partial packet after them.
    fn finish(self) -> (Vec<Packet>, usize) {
        let handle = self.handle;
        wait_for("the end of the raw peer's stream", LIMIT, || {
            handle.is_finished()
        });
        handle.join().unwrap();
        decode_all(&self.bytes.lock().unwrap())
    }
}

// ---------------------------------------------------------------------------
// A copy of this test binary as the far end, over its standard input and
// output.

child_fixture!();

/// A child in `mode`, and a connection to it with `new` over its pipes.
fn start_child(mode: Mode, config: Config) -> (Child, Arc<PacketConnection>) {
    let (child, conn) = child::connect(mode, config);
    (child, Arc::new(conn))
}

fn temp_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "packetstream-lifecycle-{}-{}",
        std::process::id(),
        unique_name(what)
    ))
}

// ---------------------------------------------------------------------------
// A crash is not an EOF.

#[test]
fn a_killed_child_is_a_lost_stream_never_an_eof_and_close_says_so_every_time() {
    let _serial = serial();
    let mut findings = Vec::new();
    let mut probes = Vec::new();
    for round in 0..20 {
        let hooks = Hooks::default();
        let config = hooks.on(Config::default()
            .name(unique_name("killed"))
            .packet_grace(Duration::MAX));
        let (child, conn) = start_child(Mode::Serve, config);
        conn.call_timeout(ECHO, 0, b"serving?", LIMIT).unwrap();
        let held = conn.submit(HOLD, 0, b"").unwrap();
        flush(&conn, &held);
        // Even rounds queue requests that are never written: the grace
        // never runs out, and nobody waits for them.
        let queued: Vec<_> = if round % 2 == 0 {
            (0..3)
                .map(|_| conn.submit(ECHO, 0, b"queued").unwrap())
                .collect()
        } else {
            Vec::new()
        };
        assert!(!child::kill(child).success());
        if round % 2 == 1 {
            // Odd rounds write into the dead child's pipe at once, racing
            // the receive side's discovery of the end.
            let probe = Arc::clone(&conn);
            probes.push(within("a request after the kill", move || {
                probe.call(ECHO, 0, b"probe")
            }));
        }
        match settled(&held) {
            Err(Error::ConnectionLost(Disconnect::StreamEnded)) => {}
            other => findings.push(format!("round {round}: written: {other:?}")),
        }
        for pending in &queued {
            match settled(pending) {
                Err(Error::Unsent(Disconnect::StreamEnded)) => {}
                other => findings.push(format!("round {round}: queued: {other:?}")),
            }
        }
        // Twice: the outcome is the connection's, whenever it is asked.
        for call in 1..=2 {
            match close(&conn) {
                Err(Error::ConnectionLost(Disconnect::StreamEnded)) => {}
                other => findings.push(format!("round {round}: close #{call}: {other:?}")),
            }
        }
        let status = conn.status();
        if status.ended != Some(Disconnect::StreamEnded) {
            findings.push(format!("round {round}: status {status:?}"));
        }
        if hooks.ends() != [Disconnect::StreamEnded] {
            findings.push(format!("round {round}: on_end saw {:?}", hooks.ends()));
        }
        assert!(matches!(conn.submit(ECHO, 0, b""), Err(Error::Closed)));
    }
    // A request made after the kill is refused, never written, or lost
    // with the stream: never anything else.
    for (idx, probe) in probes.iter().enumerate() {
        match probe {
            Err(Error::Closed)
            | Err(Error::Unsent(Disconnect::StreamEnded))
            | Err(Error::ConnectionLost(Disconnect::StreamEnded)) => {}
            other => findings.push(format!("probe {idx}: {other:?}")),
        }
    }
    assert!(
        findings.is_empty(),
        "a killed child's ending varied:\n{}",
        findings.join("\n")
    );
}

#[test]
fn a_child_that_exits_mid_stream_is_a_lost_stream_not_an_eof() {
    let trigger = temp_path("exit");
    let hooks = Hooks::default();
    let config = hooks.on(Config::default()
        .name(unique_name("exits"))
        .packet_grace(Duration::MAX));
    let (child, conn) = start_child(Mode::Serve, config);
    conn.call_timeout(ECHO, 0, b"serving?", LIMIT).unwrap();
    // EXIT waits in the child's handler for the trigger.
    let exit = conn
        .submit(EXIT, 0, trigger.to_str().unwrap().as_bytes())
        .unwrap();
    flush(&conn, &exit);
    let queued: Vec<_> = (0..3)
        .map(|_| conn.submit(ECHO, 0, b"queued").unwrap())
        .collect();
    std::fs::write(&trigger, b"").unwrap();
    let status = child::reap(child);
    std::fs::remove_file(&trigger).unwrap();
    assert_eq!(status.code(), Some(3), "the child exits with status 3");

    match settled(&exit) {
        Err(err @ Error::ConnectionLost(Disconnect::StreamEnded)) => {
            assert!(err.was_sent());
            assert!(
                err.to_string().ends_with("stream ended without EOF"),
                "{err}"
            );
        }
        other => panic!("a request written to the child: {other:?}"),
    }
    for pending in &queued {
        match settled(pending) {
            Err(err @ Error::Unsent(Disconnect::StreamEnded)) => assert!(!err.was_sent()),
            other => panic!("a request never written: {other:?}"),
        }
    }
    assert_eq!(
        Disconnect::StreamEnded.to_string(),
        "stream ended without EOF"
    );
    for _ in 0..2 {
        assert!(matches!(
            close(&conn),
            Err(Error::ConnectionLost(Disconnect::StreamEnded))
        ));
    }
    assert_eq!(hooks.ends(), [Disconnect::StreamEnded]);
    assert_eq!(hooks.peer_erqs(), 0);
}

#[test]
fn a_child_that_never_serves_is_a_lost_stream_not_an_eof() {
    let _serial = serial();
    let mut findings = Vec::new();
    let mut seen = BTreeSet::new();
    for round in 0..10 {
        let hooks = Hooks::default();
        let config = hooks.on(Config::default().name(unique_name("mute")));
        let (child, conn) = start_child(Mode::ExitAtOnce, config);
        // Each wait has the request written now, while the child starts or
        // as it exits.
        for _ in 0..3 {
            let res = match conn.submit(ECHO, 0, b"anyone?") {
                Ok(pending) => outcome(&pending),
                Err(err) => Err(err),
            };
            match res {
                Err(Error::Closed) => {
                    seen.insert("Closed");
                }
                Err(Error::Unsent(Disconnect::StreamEnded)) => {
                    seen.insert("Unsent(StreamEnded)");
                }
                Err(Error::ConnectionLost(Disconnect::StreamEnded)) => {
                    seen.insert("ConnectionLost(StreamEnded)");
                }
                other => findings.push(format!("round {round}: a request: {other:?}")),
            }
        }
        for call in 1..=2 {
            match close(&conn) {
                Err(Error::ConnectionLost(Disconnect::StreamEnded)) => {}
                other => findings.push(format!("round {round}: close #{call}: {other:?}")),
            }
        }
        if hooks.ends() != [Disconnect::StreamEnded] {
            findings.push(format!("round {round}: on_end saw {:?}", hooks.ends()));
        }
        child::reap(child);
    }
    report(format!("a child that never serves: outcomes seen {seen:?}"));
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}

#[test]
fn a_child_that_closes_in_order_is_the_peers_eof() {
    let hooks = Hooks::default();
    let config = hooks.on(Config::default().name(unique_name("polite")));
    let (child, conn) = start_child(Mode::Serve, config);
    assert_eq!(
        conn.call_timeout(ECHO, 4, b"hello", LIMIT).unwrap().payload,
        b"hello"
    );
    // The child closes once it has answered QUIT: ERQ, the answer, EOF.
    conn.call_timeout(QUIT, 0, b"", LIMIT).unwrap();
    wait_for("the connection ends", LIMIT, || {
        conn.status().ended.is_some()
    });
    let status = conn.status();
    assert_eq!(status.ended, Some(Disconnect::PeerEof));
    assert!(status.peer_requests_ended && status.closing && status.requests_ended);
    assert!(matches!(conn.submit(ECHO, 0, b""), Err(Error::Closed)));
    for _ in 0..2 {
        close(&conn).expect("an orderly end");
    }
    assert_eq!(hooks.ends(), [Disconnect::PeerEof]);
    assert_eq!(hooks.peer_erqs(), 1);
    assert!(child::reap(child).success());
}

// ---------------------------------------------------------------------------
// Closed, Unsent, ConnectionLost: what was sent.

#[test]
fn submit_after_any_ending_is_refused_as_closed_and_sends_nothing() {
    // After close().
    let (client, server) = pair();
    client.call_timeout(ECHO, 0, b"hi", LIMIT).unwrap();
    client.close_timeout(LIMIT).unwrap();
    let err = client.submit(ECHO, 0, b"after close").unwrap_err();
    assert!(matches!(err, Error::Closed) && !err.was_sent(), "{err:?}");
    server.close_timeout(LIMIT).unwrap();

    for case in [
        "end_requests",
        "abort",
        "peer EOF",
        "stream ended",
        "protocol error",
    ] {
        let name = unique_name("closed");
        let (conn, mut peer) = RawPeer::with_patience(Config::default().name(&name), LIMIT);
        match case {
            "end_requests" => conn.end_requests(),
            "abort" => conn.abort(),
            "peer EOF" => peer.send(&Packet::eof()),
            "stream ended" => peer.stream.shutdown(Shutdown::Write).unwrap(),
            "protocol error" => peer.send(&bad_control()),
            _ => unreachable!(),
        }
        if !matches!(case, "end_requests" | "abort") {
            wait_for("the connection sees its peer's end", LIMIT, || {
                conn.status().ended.is_some()
            });
        }
        for res in [
            conn.submit(ECHO, 0, b"after").map(|_| ()),
            conn.try_submit(ECHO, 0, b"after").map(|_| ()),
            conn.submit_on(3, ECHO, 0, b"after").map(|_| ()),
            conn.call_timeout(ECHO, 0, b"after", LIMIT).map(|_| ()),
        ] {
            match res {
                Err(err @ Error::Closed) => assert!(!err.was_sent()),
                other => panic!("{case}: a request after the end: {other:?}"),
            }
        }
        assert_eq!(conn.stats().requests_sent, 0, "{case}");
        if case == "end_requests" {
            peer.send(&Packet::eof());
        }
        let _ = conn.close_timeout(LIMIT);
        // What reached the peer: control packets only, never a request.
        let mut packets = Vec::new();
        while let Ok(Some(packet)) = peer.try_recv() {
            packets.push(packet);
        }
        assert!(
            packets
                .iter()
                .all(|p| matches!(p.kind, PacketKind::Control { .. })),
            "{case}: the peer got {packets:?}"
        );
    }
}

#[test]
fn written_requests_are_lost_and_unwritten_ones_unsent_for_every_ending() {
    for ending in ENDINGS {
        let why = ending.why();
        let (a, b) = UnixStream::pair().unwrap();
        // The peer is scripted: no hello in the bytes it counts.
        let config = Config::default()
            .name(unique_name("phases"))
            .packet_grace(Duration::MAX)
            .extensions(false);
        let conn = PacketConnection::from_unix_stream(a, config).unwrap();
        let wire = Wire::record(b.try_clone().unwrap());
        let mut raw = b;

        let written: Vec<_> = (0..4)
            .map(|n| conn.submit(ECHO, n, b"written").unwrap())
            .collect();
        flush(&conn, &written[3]);
        wait_for("the peer has the four requests", LIMIT, || {
            wire.request_tags().len() == 4
        });
        // The grace never runs out and nobody waits: these stay queued.
        let unsent: Vec<_> = (0..4)
            .map(|n| conn.submit(ECHO, n, b"never written").unwrap())
            .collect();
        ending.end_raw(&conn, &mut raw);

        for pending in &written {
            match settled(pending) {
                Err(err @ Error::ConnectionLost(w)) if w == why => assert!(err.was_sent()),
                other => panic!("{ending:?}: a written request: {other:?}"),
            }
        }
        for pending in &unsent {
            match settled(pending) {
                Err(err @ Error::Unsent(w)) if w == why => assert!(!err.was_sent()),
                other => panic!("{ending:?}: a request never written: {other:?}"),
            }
        }
        let _ = conn.close_timeout(LIMIT);
        drop(conn);
        let (packets, _) = wire.finish();
        let on_wire = request_tags(&packets);
        for pending in &written {
            assert!(on_wire.contains(&pending.tag()), "{ending:?}");
        }
        for pending in &unsent {
            assert!(
                !on_wire.contains(&pending.tag()),
                "{ending:?}: request {} is Unsent, and the peer received it",
                pending.tag()
            );
        }
        drop(raw);
    }
}

#[test]
fn requests_queued_when_this_end_closes_and_the_peer_ends_are_not_unsent_if_written() {
    // This end's close has queued ERQ and EOF behind requests not yet
    // written (a large write is blocked: the peer does not read yet); then
    // the peer's EOF arrives. The requests are either dropped, and Unsent,
    // or written, and lost: never both.
    let (a, b) = UnixStream::pair().unwrap();
    let conn = Arc::new(
        PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name(unique_name("closing"))
                .packet_grace(Duration::MAX),
        )
        .unwrap(),
    );
    let writer = blocked_writer(&conn);
    let queued: Vec<_> = (0..3)
        .map(|n| conn.submit(ECHO, n, b"queued").unwrap())
        .collect();
    let closer = {
        let conn = Arc::clone(&conn);
        thread::spawn(move || conn.close_timeout(LIMIT))
    };
    wait_for("the close begins", LIMIT, || conn.status().closing);
    let mut raw = b;
    raw.write_all(&wire(&Packet::eof())).unwrap();
    let outcomes: Vec<_> = queued.iter().map(settled).collect();
    // Now the peer reads everything.
    let wire = Wire::record(raw.try_clone().unwrap());
    let closed = join_all("close", vec![closer]).pop().unwrap();
    join_all("the blocked writer", vec![writer]);
    drop(conn);
    drop(raw);
    let (packets, _) = wire.finish();
    let on_wire = request_tags(&packets);
    let mut findings = Vec::new();
    for (pending, res) in queued.iter().zip(&outcomes) {
        let sent = on_wire.contains(&pending.tag());
        match res {
            Err(Error::Unsent(Disconnect::PeerEof)) if !sent => {}
            Err(Error::ConnectionLost(Disconnect::PeerEof)) if sent => {}
            other => findings.push(format!(
                "request {}: {other:?}, and it {} on the wire",
                pending.tag(),
                if sent { "is" } else { "is not" }
            )),
        }
    }
    assert!(
        findings.is_empty(),
        "close gave {closed:?}\n{}",
        findings.join("\n")
    );
}

/// A request of [`submit_until_closed`]: its handle, and its outcome if an
/// early wait took it.
struct Submitted {
    pending: PendingResponse,
    early: Option<Result<Response, Error>>,
}

/// Submits until refused, some payloads large enough to be written straight
/// from the caller's slice, and asks for the queue to be written now and
/// then. Returns the requests, and any refusal other than `Closed`.
fn submit_until_closed(conn: &PacketConnection, seed: u64) -> (Vec<Submitted>, Vec<String>) {
    let big = vec![0x42u8; 70 << 10];
    let mut submitted = Vec::new();
    let mut odd = Vec::new();
    for n in 0..300u64 {
        let payload: &[u8] = if (n + seed).is_multiple_of(10) {
            &big
        } else {
            b"small"
        };
        match conn.submit(ECHO, n, payload) {
            Ok(pending) => {
                let mut early = None;
                if (n + seed) % 7 == 3 {
                    match pending.wait_timeout(Duration::ZERO) {
                        Err(Error::Timeout { .. }) => {}
                        res => early = Some(res),
                    }
                }
                submitted.push(Submitted { pending, early });
            }
            Err(Error::Closed) => break,
            Err(other) => {
                odd.push(format!("submit refused with {other:?}, not Closed"));
                break;
            }
        }
    }
    (submitted, odd)
}

#[test]
fn unsent_never_names_a_request_that_reached_the_wire_under_concurrent_submitters() {
    let _serial = serial();
    let mut findings = Vec::new();
    let (mut n_lost, mut n_unsent) = (0, 0);
    for ending in ENDINGS {
        let why = ending.why();
        for round in 0..5u64 {
            let (a, b) = UnixStream::pair().unwrap();
            let name = unique_name("race");
            let conn = Arc::new(
                PacketConnection::from_unix_stream(a, Config::default().name(&name)).unwrap(),
            );
            let wire = Wire::record(b.try_clone().unwrap());
            let mut raw = b;
            let submitters: Vec<_> = (0..3)
                .map(|idx| {
                    let conn = Arc::clone(&conn);
                    thread::Builder::new()
                        .name(format!("{name}-submit{idx}"))
                        .spawn(move || submit_until_closed(&conn, idx * 3 + round))
                        .unwrap()
                })
                .collect();
            thread::sleep(ms(2 + 4 * round));
            ending.end_raw(&conn, &mut raw);
            let results = join_all("the submitters", submitters);
            let _ = conn.close_timeout(LIMIT);
            let (packets, _) = wire.finish();
            let on_wire = request_tags(&packets);
            let erq_at = packets.iter().position(Packet::is_erq);
            let place = |tag: u64| {
                let at = packets
                    .iter()
                    .position(|p| p.tag == tag && matches!(p.kind, PacketKind::Request { .. }));
                format!("packet {at:?} of {}, ERQ at {erq_at:?}", packets.len())
            };
            for (submitted, odd) in &results {
                findings.extend(odd.iter().map(|o| format!("{ending:?}: {o}")));
                for Submitted { pending, early } in submitted {
                    let tag = pending.tag();
                    let res = match early {
                        Some(res) => format!("{res:?}"),
                        None => format!("{:?}", outcome(pending)),
                    };
                    if res == format!("{:?}", Err::<(), _>(Error::Unsent(why))) {
                        n_unsent += 1;
                        if on_wire.contains(&tag) {
                            findings.push(format!(
                                "{ending:?} round {round}: request {tag} is Unsent, \
                                 yet it is on the wire ({})",
                                place(tag)
                            ));
                        }
                    } else if res == format!("{:?}", Err::<(), _>(Error::ConnectionLost(why))) {
                        n_lost += 1;
                        // An abort may cut the write in progress short.
                        if ending != Ending::Abort && !on_wire.contains(&tag) {
                            findings.push(format!(
                                "{ending:?} round {round}: request {tag} is lost, \
                                 yet it never reached the wire"
                            ));
                        }
                    } else {
                        findings.push(format!("{ending:?} round {round}: request {tag}: {res}"));
                    }
                }
            }
            drop(raw);
        }
    }
    report(format!(
        "concurrent submitters: {n_lost} requests lost on the wire, {n_unsent} unsent"
    ));
    assert!(n_lost > 0 && n_unsent > 0, "both outcomes are exercised");
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}

// ---------------------------------------------------------------------------
// Status and hooks.

#[test]
fn status_follows_a_connection_from_open_to_its_end() {
    let hooks = Hooks::default();
    let (conn, mut peer) = RawPeer::with_patience(
        hooks.on(Config::default().name(unique_name("status"))),
        LIMIT,
    );
    let conn = Arc::new(conn);
    let status = conn.status();
    assert!(status.is_open(), "{status:?}");
    assert!(!status.requests_ended && !status.peer_requests_ended && !status.closing);
    assert_eq!(status.ended, None);

    conn.end_requests();
    let status = conn.status();
    assert!(status.requests_ended && !status.is_open(), "{status:?}");
    assert!(!status.peer_requests_ended && !status.closing && status.ended.is_none());
    assert!(peer.recv_packet().is_erq());

    peer.send(&Packet::erq());
    wait_for("the peer's ERQ is seen", LIMIT, || {
        conn.status().peer_requests_ended && hooks.peer_erqs() == 1
    });
    let status = conn.status();
    assert!(!status.closing && status.ended.is_none(), "{status:?}");

    // close() waits for the peer's EOF.
    let closer = {
        let conn = Arc::clone(&conn);
        thread::spawn(move || conn.close())
    };
    wait_for("the close begins", LIMIT, || conn.status().closing);
    assert!(peer.recv_packet().is_eof());
    let status = conn.status();
    assert!(
        status.closing && !status.is_open() && status.ended.is_none(),
        "{status:?}"
    );
    assert!(hooks.ends().is_empty());

    peer.send(&Packet::eof());
    join_all("close", vec![closer])
        .pop()
        .unwrap()
        .expect("an orderly close");
    let status = conn.status();
    assert_eq!(status.ended, Some(Disconnect::PeerEof));
    assert!(!status.is_open());
    assert_eq!(hooks.ends(), [Disconnect::PeerEof]);

    // Once set, the ending never changes.
    conn.abort();
    assert_eq!(conn.status().ended, Some(Disconnect::PeerEof));
    conn.close_timeout(LIMIT).expect("still the orderly end");
    assert_eq!(hooks.ends(), [Disconnect::PeerEof]);
    assert_eq!(hooks.peer_erqs(), 1);
}

#[test]
fn status_ends_with_each_reason_and_the_reason_never_changes() {
    for ending in ENDINGS {
        let hooks = Hooks::default();
        let (conn, mut peer) = RawPeer::with_patience(
            hooks.on(Config::default().name(unique_name("ending"))),
            LIMIT,
        );
        ending.end_raw(&conn, &mut peer.stream);
        wait_for("the connection ends", LIMIT, || {
            conn.status().ended.is_some()
        });
        let status = conn.status();
        assert_eq!(status.ended, Some(ending.why()), "{ending:?}");
        assert!(
            !status.is_open() && status.requests_ended && status.closing,
            "{ending:?}: {status:?}"
        );
        let res = conn.close_timeout(LIMIT);
        match (ending, &res) {
            (Ending::PeerEof, Ok(())) => {}
            (Ending::StreamEnded, Err(Error::ConnectionLost(Disconnect::StreamEnded))) => {}
            (Ending::Abort, Err(Error::ConnectionLost(Disconnect::Local))) => {}
            (Ending::Protocol, Err(Error::Malformed { .. })) => {}
            _ => panic!("{ending:?}: close gave {res:?}"),
        }
        conn.abort();
        assert_eq!(conn.status().ended, Some(ending.why()), "{ending:?}");
        assert_eq!(hooks.ends(), [ending.why()], "{ending:?}");
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ctor {
    New,
    FromUnixStream,
    FromTcpStream,
    FromFd,
    FromBorrowedFd,
    FromFds,
    FromBorrowedFds,
    FromChild,
    ConnectWith,
    ConnectTcp,
    ConnectUnix,
}

const CTORS: [Ctor; 11] = [
    Ctor::New,
    Ctor::FromUnixStream,
    Ctor::FromTcpStream,
    Ctor::FromFd,
    Ctor::FromBorrowedFd,
    Ctor::FromFds,
    Ctor::FromBorrowedFds,
    Ctor::FromChild,
    Ctor::ConnectWith,
    Ctor::ConnectTcp,
    Ctor::ConnectUnix,
];

/// The far end of a connection under test.
enum Far {
    Unix(UnixStream),
    Tcp(TcpStream),
    Pipes(PipeReader, PipeWriter),
    Child(Child),
}

impl Far {
    fn write_all(&mut self, bytes: &[u8]) {
        match self {
            Far::Unix(s) => s.write_all(bytes),
            Far::Tcp(s) => s.write_all(bytes),
            Far::Pipes(_, w) => w.write_all(bytes),
            Far::Child(_) => unreachable!("the child writes for itself"),
        }
        .unwrap();
    }

    /// A clone of the far socket, to read from.
    fn socket_reader(&self) -> Box<dyn Read + Send> {
        match self {
            Far::Unix(s) => Box::new(s.try_clone().unwrap()),
            Far::Tcp(s) => Box::new(s.try_clone().unwrap()),
            _ => unreachable!("not a socket"),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Far::Unix(s) => s.shutdown(Shutdown::Both),
            Far::Tcp(s) => s.shutdown(Shutdown::Both),
            _ => Ok(()),
        };
    }

    /// A connection of this crate at the far end, serving echo; the child
    /// serves with one of its own.
    fn serve(self) -> Result<PacketConnection, Child> {
        let config = Config::default().name(unique_name("far")).handler(echo);
        match self {
            Far::Unix(s) => Ok(PacketConnection::from_unix_stream(s, config).unwrap()),
            Far::Tcp(s) => Ok(PacketConnection::from_tcp_stream(s, config).unwrap()),
            Far::Pipes(r, w) => Ok(PacketConnection::new(r, w, config).unwrap()),
            Far::Child(child) => Err(child),
        }
    }

    /// Ends the far end's process, or drops its stream.
    fn vanish(self) {
        if let Far::Child(child) = self {
            child::kill(child);
        }
    }
}

/// A connection made with a given constructor, and what is at the far end.
struct Opened {
    conn: Arc<PacketConnection>,
    far: Far,
    /// Descriptors lent to a borrowing constructor, kept for the test's
    /// length.
    _lent: Vec<OwnedFd>,
    /// How many times connect_with's `on_close` ran.
    on_close_runs: Arc<AtomicUsize>,
    socket_path: Option<PathBuf>,
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (far, _) = listener.accept().unwrap();
    (near, far)
}

/// Opens a connection with `ctor`; a child plays the far end in
/// `child_mode`.
fn open(ctor: Ctor, child_mode: Mode, config: Config) -> Opened {
    let on_close_runs = Arc::new(AtomicUsize::new(0));
    let mut lent = Vec::new();
    let mut socket_path = None;
    let (conn, far) = match ctor {
        Ctor::New => {
            let (a, b) = UnixStream::pair().unwrap();
            let conn = PacketConnection::new(a.try_clone().unwrap(), a, config);
            (conn, Far::Unix(b))
        }
        Ctor::FromUnixStream => {
            let (a, b) = UnixStream::pair().unwrap();
            (PacketConnection::from_unix_stream(a, config), Far::Unix(b))
        }
        Ctor::FromTcpStream => {
            let (a, b) = tcp_pair();
            (PacketConnection::from_tcp_stream(a, config), Far::Tcp(b))
        }
        Ctor::FromFd => {
            let (a, b) = UnixStream::pair().unwrap();
            (
                PacketConnection::from_fd(OwnedFd::from(a), config),
                Far::Unix(b),
            )
        }
        Ctor::FromBorrowedFd => {
            let (a, b) = UnixStream::pair().unwrap();
            let conn = PacketConnection::from_borrowed_fd(a.as_fd(), config);
            lent.push(OwnedFd::from(a));
            (conn, Far::Unix(b))
        }
        Ctor::FromFds | Ctor::FromBorrowedFds => {
            let (in_r, in_w) = io::pipe().unwrap();
            let (out_r, out_w) = io::pipe().unwrap();
            let conn = if ctor == Ctor::FromFds {
                PacketConnection::from_fds(OwnedFd::from(in_r), OwnedFd::from(out_w), config)
            } else {
                let conn = PacketConnection::from_borrowed_fds(in_r.as_fd(), out_w.as_fd(), config);
                lent.push(OwnedFd::from(in_r));
                lent.push(OwnedFd::from(out_w));
                conn
            };
            (conn, Far::Pipes(out_r, in_w))
        }
        Ctor::FromChild => {
            let mut child = child::spawn(child_mode);
            child::skip_to_ready(&mut child);
            (
                PacketConnection::from_child(&mut child, config),
                Far::Child(child),
            )
        }
        Ctor::ConnectWith => {
            let (a, b) = UnixStream::pair().unwrap();
            let runs = Arc::clone(&on_close_runs);
            let conn = PacketConnection::connect_with(
                move || {
                    let shut = a.try_clone()?;
                    let on_close: Option<OnClose> = Some(Box::new(move || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = shut.shutdown(Shutdown::Both);
                    }));
                    Ok((a.try_clone()?, a, on_close))
                },
                config,
            );
            (conn, Far::Unix(b))
        }
        Ctor::ConnectTcp => {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let conn = PacketConnection::connect_tcp(listener.local_addr().unwrap(), config);
            let (b, _) = listener.accept().unwrap();
            (conn, Far::Tcp(b))
        }
        Ctor::ConnectUnix => {
            let path = temp_path("sock");
            let listener = UnixListener::bind(&path).unwrap();
            let conn = PacketConnection::connect_unix(&path, config);
            let (b, _) = listener.accept().unwrap();
            socket_path = Some(path);
            (conn, Far::Unix(b))
        }
    };
    Opened {
        conn: Arc::new(conn.unwrap()),
        far,
        _lent: lent,
        on_close_runs,
        socket_path,
    }
}

/// Ends a connection made with each constructor `ending`'s way, and checks
/// that `on_end` ran once with the reason, `on_peer_end_requests` ran as
/// often as the peer sent ERQ, and `close` says the same.
fn on_end_for_every_constructor(ending: Ending) {
    let _serial = serial();
    let mut findings = Vec::new();
    for ctor in CTORS {
        let hooks = Hooks::default();
        let child_mode = if ending == Ending::Protocol {
            Mode::ProtocolError
        } else {
            Mode::Serve
        };
        let config = hooks.on(Config::default().name(unique_name("ctor")));
        let Opened {
            conn,
            mut far,
            _lent,
            on_close_runs,
            socket_path,
        } = open(ctor, child_mode, config);
        let res = match ending {
            Ending::PeerEof => {
                let served = far.serve();
                let rsp = conn.call_timeout(ECHO, 9, b"hi", LIMIT).unwrap();
                assert_eq!((rsp.flags, rsp.payload.as_slice()), (9, &b"hi"[..]));
                let res = close(&conn);
                match served {
                    Ok(served) => served.close_timeout(LIMIT).unwrap(),
                    Err(child) => {
                        assert!(
                            child::reap(child).success(),
                            "{ctor:?}: the child ends in order"
                        )
                    }
                }
                res
            }
            Ending::StreamEnded => {
                far.vanish();
                close(&conn)
            }
            Ending::Abort => {
                conn.abort();
                // Without a socket to shut down, the receive side ends when
                // the stream does.
                far.vanish();
                close(&conn)
            }
            Ending::Protocol => {
                if !matches!(far, Far::Child(_)) {
                    far.write_all(&wire(&bad_control()));
                }
                let res = close(&conn);
                far.vanish();
                res
            }
        };
        let expected = matches!(
            (ending, &res),
            (Ending::PeerEof, Ok(()))
                | (
                    Ending::StreamEnded,
                    Err(Error::ConnectionLost(Disconnect::StreamEnded))
                )
                | (Ending::Abort, Err(Error::ConnectionLost(Disconnect::Local)))
                | (Ending::Protocol, Err(Error::Malformed { .. }))
        );
        if !expected {
            findings.push(format!("{ctor:?}: close gave {res:?}"));
        }
        if hooks.ends() != [ending.why()] {
            findings.push(format!("{ctor:?}: on_end saw {:?}", hooks.ends()));
        }
        let erqs = usize::from(ending == Ending::PeerEof);
        if hooks.peer_erqs() != erqs {
            findings.push(format!(
                "{ctor:?}: on_peer_end_requests ran {} times, not {erqs}",
                hooks.peer_erqs()
            ));
        }
        if ctor == Ctor::ConnectWith && on_close_runs.load(Ordering::SeqCst) != 1 {
            findings.push(format!(
                "connect_with's on_close ran {} times",
                on_close_runs.load(Ordering::SeqCst)
            ));
        }
        if let Some(path) = socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
    assert!(findings.is_empty(), "{ending:?}:\n{}", findings.join("\n"));
}

#[test]
fn on_end_runs_once_for_an_orderly_close_on_every_constructor() {
    on_end_for_every_constructor(Ending::PeerEof);
}

#[test]
fn on_end_runs_once_for_a_crash_on_every_constructor() {
    on_end_for_every_constructor(Ending::StreamEnded);
}

#[test]
fn on_end_runs_once_for_an_abort_on_every_constructor() {
    on_end_for_every_constructor(Ending::Abort);
}

#[test]
fn on_end_runs_once_for_a_protocol_error_on_every_constructor() {
    on_end_for_every_constructor(Ending::Protocol);
}

#[test]
fn on_peer_end_requests_runs_when_the_peers_erq_arrives_and_not_before() {
    let hooks = Hooks::default();
    let (conn, mut peer) = RawPeer::with_patience(
        hooks.on(Config::default().name(unique_name("erq")).handler(echo)),
        LIMIT,
    );
    // A request and its answer: no ERQ yet.
    peer.request(2, ECHO, b"one");
    let (_, reply) = peer.recv_until(|p| p.tag == 2);
    assert_eq!(reply.payload, b"one");
    assert_eq!(hooks.peer_erqs(), 0);
    assert!(!conn.status().peer_requests_ended);
    peer.send(&Packet::erq());
    wait_for("the hook runs", LIMIT, || hooks.peer_erqs() == 1);
    assert!(conn.status().peer_requests_ended);
    // A request after ERQ is refused; the hook does not run again.
    peer.request(3, ECHO, b"late");
    let (_, refusal) = peer.recv_until(|p| p.tag == 3);
    assert!(matches!(
        refusal.kind,
        PacketKind::Response { ok: false, .. }
    ));
    peer.send(&Packet::eof());
    conn.close_timeout(LIMIT).unwrap();
    assert_eq!(hooks.peer_erqs(), 1);
    assert_eq!(hooks.ends(), [Disconnect::PeerEof]);
}

#[test]
fn a_request_is_served_while_one_read_with_it_holds_a_handler() {
    // Two requests written together, read in one read: the first holds a
    // handler thread; the second must not wait behind it while the other
    // three handler threads sleep. (A slow request and a quick one sent
    // together, as any caller with requests in flight may.)
    let gate = Gate::new();
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(
        b,
        Config::default()
            .name(unique_name("pool"))
            .handler_threads(4)
            .handler(gated(gate.clone())),
    )
    .unwrap();
    let client = PacketConnection::from_unix_stream(
        a,
        Config::default()
            .name(unique_name("batch"))
            .packet_grace(Duration::MAX),
    )
    .unwrap();
    // A connection that has been serving a while: its handler threads are
    // idle, parked, not still starting.
    for _ in 0..3 {
        client.call_timeout(ECHO, 0, b"warm", LIMIT).unwrap();
    }
    thread::sleep(ms(50));
    let held = client.submit(STUCK, 0, b"").unwrap();
    let quick = client.submit(ECHO, 0, b"quick").unwrap();
    let res = quick.wait_timeout(HANG);
    gate.open();
    outcome(&held).unwrap();
    client.close_timeout(LIMIT).unwrap();
    server.close_timeout(LIMIT).unwrap();
    match res {
        Ok(rsp) => assert_eq!(rsp.payload, b"quick"),
        Err(err) => panic!(
            "the second request of a batch waited behind the first, held in a handler, \
             with three handler threads idle: {err}"
        ),
    }
}

// ---------------------------------------------------------------------------
// Deadlines that name their request.

/// STUCK waits at `gate`; everything else echoes.
fn gated(gate: Gate) -> impl Fn(Request) -> HandlerResult + Send + Sync + 'static {
    move |rq: Request| {
        if rq.rq_type == STUCK {
            gate.pass();
        }
        echo(rq)
    }
}

fn gated_pair(gate: &Gate) -> (PacketConnection, PacketConnection) {
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(
        b,
        Config::default()
            .name(unique_name("gated"))
            .handler(gated(gate.clone())),
    )
    .unwrap();
    let client =
        PacketConnection::from_unix_stream(a, Config::default().name(unique_name("asker")))
            .unwrap();
    (client, server)
}

/// Checks a timeout error names `id` and waited about `DEADLINE`.
fn check_timeout(err: &Error, id: RequestId) {
    let Error::Timeout { request, waited } = err else {
        panic!("expected a timeout, got {err:?}");
    };
    assert_eq!(*request, Some(id));
    assert!(
        *waited >= DEADLINE && *waited <= DEADLINE + SLACK,
        "waited {waited:?} for a deadline of {DEADLINE:?}"
    );
    let text = err.to_string();
    assert_eq!(
        text,
        format!(
            "request {}:{} (rq_type {}) timed out after {waited:?}",
            id.channel, id.tag, id.rq_type
        )
    );
    assert!(err.is_timeout() && err.was_sent());
}

#[test]
fn call_timeout_names_its_request_and_waits_about_its_deadline() {
    let _serial = serial();
    let gate = Gate::new();
    let (client, server) = gated_pair(&gate);
    assert_eq!(client.submit(ECHO, 0, b"").unwrap().tag(), 2);
    let started = Instant::now();
    let err = client
        .call_timeout(STUCK, 9, b"held", DEADLINE)
        .unwrap_err();
    assert!(
        started.elapsed() <= DEADLINE + SLACK,
        "{:?}",
        started.elapsed()
    );
    let id = |tag| RequestId {
        channel: 0,
        tag,
        rq_type: STUCK,
    };
    check_timeout(&err, id(3));

    // Among several in flight, a wait names the one it waited for.
    let held: Vec<_> = (0..3)
        .map(|_| client.submit(STUCK, 0, b"").unwrap())
        .collect();
    assert_eq!(held.iter().map(|p| p.tag()).collect::<Vec<_>>(), [4, 5, 6]);
    check_timeout(&held[1].wait_timeout(DEADLINE).unwrap_err(), id(5));

    // The call that timed out was given up; the waits that timed out were
    // not, and the connection goes on.
    gate.open();
    for pending in &held {
        outcome(pending).unwrap();
    }
    client.call_timeout(ECHO, 0, b"after", LIMIT).unwrap();
    wait_for("nothing is left pending", LIMIT, || {
        client.stats().pending == 0
    });
    client.close_timeout(LIMIT).unwrap();
    server.close_timeout(LIMIT).unwrap();
}

/// A typed request the gated server holds.
struct Stuck;
impl_payload!(Stuck);
impl RequestType for Stuck {
    const RQ_TYPE: u64 = STUCK;
    type Response = ();
}

#[test]
fn request_timeout_names_the_typed_request() {
    let _serial = serial();
    let gate = Gate::new();
    let (client, server) = gated_pair(&gate);
    let err = client.request_timeout(&Stuck, DEADLINE).unwrap_err();
    check_timeout(
        &err,
        RequestId {
            channel: 0,
            tag: 2,
            rq_type: STUCK,
        },
    );
    assert!(err.to_string().contains("(rq_type 13)"), "{err}");
    gate.open();
    client.close_timeout(LIMIT).unwrap();
    server.close_timeout(LIMIT).unwrap();
}

/// `call_timeout` on its own thread: its result and how long it took. The
/// call must return within `timeout + HANG`.
fn timed_call(
    conn: &Arc<PacketConnection>,
    timeout: Duration,
) -> (Result<Response, Error>, Duration) {
    let caller = Arc::clone(conn);
    match timed(timeout + HANG, move || {
        caller.call_timeout(ECHO, 0, b"small", timeout)
    }) {
        Timed::Done(res, took) => (res, took),
        Timed::Stuck(running) => {
            conn.abort();
            let _ = running.finish_within(LIMIT);
            panic!(
                "call_timeout({timeout:?}) was still blocked after {:?}",
                timeout + HANG
            );
        }
    }
}

/// Starts a submit of 4 MiB that the writing thread blocks in, the peer
/// never reading.
fn blocked_writer(conn: &Arc<PacketConnection>) -> JoinHandle<()> {
    let conn = Arc::clone(conn);
    let handle = thread::spawn(move || {
        let _ = conn.submit(ECHO, 0, &vec![1u8; 4 << 20]);
    });
    // Time to fill the socket's buffers; if the write is not blocked yet,
    // the call below meets a plainer case.
    thread::sleep(ms(100));
    handle
}

#[test]
fn call_timeout_meets_its_deadline_when_the_peer_never_reads() {
    let _serial = serial();
    let mut lines = Vec::new();

    // Nothing written yet.
    let (conn, peer) = RawPeer::with_patience(Config::default().name(unique_name("deaf")), LIMIT);
    let conn = Arc::new(conn);
    let (res, took) = timed_call(&conn, DEADLINE);
    assert!(res.unwrap_err().is_timeout());
    lines.push(format!("idle stream: {took:?}"));
    assert!(took <= DEADLINE + SLACK, "idle stream: {took:?}");

    // Another thread blocked writing a large request.
    let writer = blocked_writer(&conn);
    let (res, took) = timed_call(&conn, DEADLINE);
    assert!(res.unwrap_err().is_timeout());
    lines.push(format!("a writer blocked: {took:?}"));
    assert!(took <= DEADLINE + SLACK, "a writer blocked: {took:?}");
    conn.abort();
    join_all("the blocked writer", vec![writer]);
    drop(peer);

    // The outgoing queue full: nothing is sent.
    let (conn, peer) = RawPeer::with_patience(
        Config::default()
            .name(unique_name("full"))
            .max_queued_bytes(256 << 10),
        LIMIT,
    );
    let conn = Arc::new(conn);
    let writer = blocked_writer(&conn);
    for _ in 0..100 {
        if let Err(Error::WouldBlock) = conn.try_submit(ECHO, 0, &[2u8; 100 << 10]) {
            break;
        }
    }
    let (res, took) = timed_call(&conn, DEADLINE);
    assert!(matches!(res, Err(Error::WouldBlock)), "{res:?}");
    lines.push(format!("the queue full: {took:?}"));
    assert!(took <= DEADLINE + SLACK, "the queue full: {took:?}");
    conn.abort();
    join_all("the blocked writer", vec![writer]);
    drop(peer);
    report(format!(
        "call_timeout({DEADLINE:?}), the peer never reading: {}",
        lines.join(", ")
    ));
}

// ---------------------------------------------------------------------------
// Log lines name their connection.

/// A log line the recorder kept.
#[derive(Debug)]
struct LogLine {
    thread: Option<String>,
    level: log::Level,
    message: String,
}

/// The names of the connections of the logging test.
const LOG_NAMES: [&str; 4] = ["logA", "logB", "logC", "logD"];

static LOG_LINES: Mutex<Vec<LogLine>> = Mutex::new(Vec::new());
/// The logging test's own thread, whose lines are kept too.
static LOG_WATCHED: Mutex<Option<ThreadId>> = Mutex::new(None);

/// Keeps the crate's log lines from the threads of the logging test: those
/// of its connections, and its own.
struct Recorder;

impl log::Log for Recorder {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target().starts_with("packetstream")
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let current = thread::current();
        let conn_thread = current
            .name()
            .and_then(|name| name.split_once(':'))
            .is_some_and(|(conn, _)| LOG_NAMES.contains(&conn));
        let watched = *LOG_WATCHED.lock().unwrap() == Some(current.id());
        if conn_thread || watched {
            LOG_LINES.lock().unwrap().push(LogLine {
                thread: current.name().map(str::to_string),
                level: record.level(),
                message: record.args().to_string(),
            });
        }
    }

    fn flush(&self) {}
}

/// A typed request that logB's dispatcher serves.
struct Ping;
impl_payload!(Ping);
impl RequestType for Ping {
    const RQ_TYPE: u64 = 20;
    type Response = ();
}
impl Fulfil<()> for Ping {
    fn fulfil(self, _: &()) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[test]
fn every_log_line_names_its_connection() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Recorder).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
    *LOG_WATCHED.lock().unwrap() = Some(thread::current().id());

    // logA (a closure handler) and logB (a dispatcher).
    let (a, b) = UnixStream::pair().unwrap();
    let log_a = PacketConnection::from_unix_stream(
        a,
        Config::default()
            .name("logA")
            .handler(|rq: Request| -> HandlerResult {
                match rq.rq_type {
                    FAIL => Err("logA's handler says no".into()),
                    _ => echo(rq),
                }
            }),
    )
    .unwrap();
    let log_b = PacketConnection::from_unix_stream(
        b,
        Config::default()
            .name("logB")
            .handler(Dispatcher::new(()).route::<Ping>()),
    )
    .unwrap();
    // Requests and answers both ways, ok and not ok.
    log_a.request_timeout(&Ping, LIMIT).unwrap();
    log_b.call_timeout(ECHO, 0, b"b to a", LIMIT).unwrap();
    assert!(log_b.call_timeout(FAIL, 0, b"", LIMIT).is_err());
    assert!(log_a.call_timeout(77, 0, b"", LIMIT).is_err());
    // logC has no handler: it refuses logD's request.
    let (c, d) = UnixStream::pair().unwrap();
    let log_c = PacketConnection::from_unix_stream(c, Config::default().name("logC")).unwrap();
    let log_d = PacketConnection::from_unix_stream(d, Config::default().name("logD").handler(echo))
        .unwrap();
    log_c.call_timeout(ECHO, 0, b"c to d", LIMIT).unwrap();
    let refused = log_d.call_timeout(ECHO, 0, b"d to c", LIMIT).unwrap_err();
    assert_eq!(
        refused.failure_reason().as_deref(),
        Some("no request handler")
    );
    for conn in [&log_a, &log_c] {
        conn.close_timeout(LIMIT).unwrap();
    }
    for conn in [&log_b, &log_d] {
        conn.close_timeout(LIMIT).unwrap();
    }
    *LOG_WATCHED.lock().unwrap() = None;
    let lines = std::mem::take(&mut *LOG_LINES.lock().unwrap());

    let mut unnamed = Vec::new();
    for line in &lines {
        let thread_conn = line
            .thread
            .as_deref()
            .and_then(|name| name.split_once(':'))
            .map(|(conn, _)| conn);
        let named = match thread_conn {
            // A connection's thread speaks for that connection.
            Some(conn) => line.message.starts_with(&format!("{conn}: ")),
            None => LOG_NAMES
                .iter()
                .any(|conn| line.message.starts_with(&format!("{conn}: "))),
        };
        if !named {
            unnamed.push(format!(
                "[{}] {} on {:?}: {:?}",
                line.level,
                line.message,
                line.thread.as_deref().unwrap_or("?"),
                thread_conn
            ));
        }
    }
    // The scenario logged what it meant to.
    let has = |conn: &str, what: &str| {
        lines
            .iter()
            .any(|l| l.message.starts_with(&format!("{conn}: ")) && l.message.contains(what))
    };
    for (conn, what) in [
        ("logA", "==> request"),
        ("logB", "<== request"),
        ("logB", "==> reply"),
        ("logA", "<== response"),
        ("logA", "failed: logA's handler says no"),
        ("logC", "refusing request"),
        ("logA", "ended"),
        ("logD", "ended"),
    ] {
        assert!(
            has(conn, what),
            "no {conn} line with {what:?} among {} lines",
            lines.len()
        );
    }
    report(format!(
        "logging: {} lines from four connections",
        lines.len()
    ));
    assert!(
        unnamed.is_empty(),
        "{} of {} log lines do not name their connection:\n{}",
        unnamed.len(),
        lines.len(),
        unnamed.join("\n")
    );
}

// ---------------------------------------------------------------------------
// The caller's streams.

/// One end of a stream the test keeps, over which connections run one after
/// another.
enum Kept {
    Socket(UnixStream),
    Pipes(PipeReader, PipeWriter),
}

impl Kept {
    fn pair(socket: bool) -> (Kept, Kept) {
        if socket {
            let (a, b) = UnixStream::pair().unwrap();
            (Kept::Socket(a), Kept::Socket(b))
        } else {
            let (a_r, b_w) = io::pipe().unwrap();
            let (b_r, a_w) = io::pipe().unwrap();
            (Kept::Pipes(a_r, a_w), Kept::Pipes(b_r, b_w))
        }
    }

    /// A connection with `new` over clones of the kept stream, reading
    /// `unread` first.
    fn connect(&self, unread: Vec<u8>, config: Config) -> PacketConnection {
        match self {
            Kept::Socket(s) => PacketConnection::new(
                Cursor::new(unread).chain(s.try_clone().unwrap()),
                s.try_clone().unwrap(),
                config,
            ),
            Kept::Pipes(r, w) => PacketConnection::new(
                Cursor::new(unread).chain(r.try_clone().unwrap()),
                w.try_clone().unwrap(),
                config,
            ),
        }
        .unwrap()
    }

    /// A connection with `from_unix_stream` over a clone of the socket, or
    /// with `from_borrowed_fds` over the pipes.
    fn lend(&self, config: Config) -> PacketConnection {
        match self {
            Kept::Socket(s) => PacketConnection::from_unix_stream(s.try_clone().unwrap(), config),
            Kept::Pipes(r, w) => PacketConnection::from_borrowed_fds(r.as_fd(), w.as_fd(), config),
        }
        .unwrap()
    }

    /// Checks that the kept stream still carries bytes to `other`.
    fn still_carries(&mut self, other: &Kept) {
        const TEXT: &[u8] = b"still open";
        let mut reader: Box<dyn Read + Send> = match other {
            Kept::Socket(s) => Box::new(s.try_clone().unwrap()),
            Kept::Pipes(r, _) => Box::new(r.try_clone().unwrap()),
        };
        match self {
            Kept::Socket(s) => s.write_all(TEXT),
            Kept::Pipes(_, w) => w.write_all(TEXT),
        }
        .unwrap();
        let got = within("the kept stream carries bytes", move || {
            let mut buf = [0u8; TEXT.len()];
            reader.read_exact(&mut buf).map(|()| buf)
        });
        assert_eq!(got.unwrap(), TEXT);
    }
}

#[test]
fn three_connections_in_a_row_over_streams_the_caller_keeps() {
    for socket in [true, false] {
        let what = if socket { "socketpair" } else { "pipes" };
        let (mut near_kept, mut far_kept) = Kept::pair(socket);
        let mut far_unread = Vec::new();
        for round in 0..3u64 {
            let near = near_kept.lend(Config::default().name(unique_name("near")).handler(echo));
            let far = far_kept.connect(
                std::mem::take(&mut far_unread),
                Config::default().name(unique_name("far")).handler(echo),
            );
            let rsp = near
                .call_timeout(ECHO, round, b"near to far", LIMIT)
                .unwrap();
            assert_eq!(
                (rsp.flags, rsp.payload.as_slice()),
                (round, &b"near to far"[..])
            );
            let rsp = far
                .call_timeout(ECHO, round, b"far to near", LIMIT)
                .unwrap();
            assert_eq!(rsp.payload, b"far to near");
            near.close_timeout(LIMIT)
                .unwrap_or_else(|e| panic!("{what} round {round}: near close: {e:?}"));
            far.close_timeout(LIMIT)
                .unwrap_or_else(|e| panic!("{what} round {round}: far close: {e:?}"));
            // The near end cannot be given bytes back: none may be left.
            assert!(near.take_unread().is_empty(), "{what} round {round}");
            far_unread = far.take_unread();
        }
        near_kept.still_carries(&far_kept);
        far_kept.still_carries(&near_kept);
    }
}

#[test]
fn bytes_read_past_the_peers_eof_start_the_next_connection() {
    let (a, mut raw) = UnixStream::pair().unwrap();
    raw.set_read_timeout(Some(LIMIT)).unwrap();
    let kept = Kept::Socket(a);
    let first = kept.connect(
        Vec::new(),
        Config::default().name(unique_name("first")).handler(echo),
    );
    // EOF and the next connection's first request, whole, and the first
    // half of its second, in one write: read together.
    let next_first = wire(&common::request(2, ECHO, 0, b"next one"));
    let next_second = wire(&common::request(3, ECHO, 0, b"next two"));
    let half = next_second.len() / 2;
    let mut burst = wire(&Packet::eof());
    burst.extend_from_slice(&next_first);
    burst.extend_from_slice(&next_second[..half]);
    raw.write_all(&burst).unwrap();
    first.close_timeout(LIMIT).unwrap();
    let mut expected = next_first.clone();
    expected.extend_from_slice(&next_second[..half]);
    assert_eq!(first.take_unread(), expected);
    assert!(first.take_unread().is_empty(), "taken once");

    let next = kept.connect(
        expected,
        Config::default().name(unique_name("next")).handler(echo),
    );
    let wire = Wire::record(raw.try_clone().unwrap());
    raw.write_all(&next_second[half..]).unwrap();
    wait_for("the next connection answers both", LIMIT, || {
        let packets = wire.packets();
        [2, 3].iter().all(|tag| {
            packets
                .iter()
                .any(|p| p.tag == *tag && matches!(p.kind, PacketKind::Response { ok: true, .. }))
        })
    });
    raw.write_all(&common::wire(&Packet::eof())).unwrap();
    next.close_timeout(LIMIT).unwrap();
    drop(next);
    drop(kept);
    let (packets, partial) = wire.finish();
    assert_eq!(partial, 0);
    // Responses come in any order.
    let mut answers: Vec<_> = packets
        .iter()
        .filter(|p| matches!(p.kind, PacketKind::Response { .. }))
        .map(|p| (p.tag, p.payload.clone()))
        .collect();
    answers.sort();
    assert_eq!(
        answers,
        [(2, b"next one".to_vec()), (3, b"next two".to_vec())]
    );
}

/// How long the closing end's receive thread is held in its
/// `on_peer_end_requests` hook, while its peer ends and starts again.
const STALL: Duration = Duration::from_millis(50);

#[test]
fn no_request_is_lost_when_the_peers_next_connection_starts_at_once() {
    const ROUNDS: u64 = 12;
    const BURST: u64 = 5;
    for socket in [true, false] {
        let what = if socket { "socketpair" } else { "pipes" };
        let (a_kept, b_kept) = Kept::pair(socket);
        let stalls = Arc::new(AtomicUsize::new(0));
        // A starts each next connection as soon as its last has ended, and
        // writes at once.
        let a_config = || {
            Config::default()
                .name(unique_name("joiner"))
                .packet_grace(Duration::ZERO)
                .handler(echo)
        };
        // B closes first. Its receive thread is slow to come back from A's
        // ERQ, so that A's EOF and A's next requests arrive together.
        let b_config = || {
            let stalls = Arc::clone(&stalls);
            Config::default()
                .name(unique_name("closer"))
                .handler(echo)
                .on_peer_end_requests(move || {
                    stalls.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(STALL);
                })
        };
        let mut a = a_kept.connect(Vec::new(), a_config());
        let mut b = Arc::new(b_kept.connect(Vec::new(), b_config()));
        let mut pending: Vec<PendingResponse> = Vec::new();
        let mut read_ahead = 0;
        let mut unread_bytes = 0;
        for round in 0..ROUNDS {
            b.call_timeout(ECHO, round, b"b to a", LIMIT).unwrap();
            // A's requests from the start of its connection, answered by
            // B's next connection from the bytes it was handed.
            for p in pending.drain(..) {
                let rsp = outcome(&p)
                    .unwrap_or_else(|e| panic!("{what} round {round}: request {}: {e:?}", p.tag()));
                assert_eq!(rsp.payload, b"from the start");
            }
            a.end_requests();
            wait_for("B's receive thread is held", LIMIT, || {
                stalls.load(Ordering::SeqCst) as u64 == round + 1
            });
            let closer = {
                let b = Arc::clone(&b);
                thread::spawn(move || (b.close_timeout(LIMIT), b.take_unread()))
            };
            a.close_timeout(LIMIT)
                .unwrap_or_else(|e| panic!("{what} round {round}: A's close: {e:?}"));
            let a_unread = a.take_unread();
            a = a_kept.connect(a_unread, a_config());
            pending = (0..BURST)
                .map(|n| a.submit(ECHO, n, b"from the start").unwrap())
                .collect();
            let (res, b_unread) = join_all("B's close", vec![closer]).pop().unwrap();
            res.unwrap_or_else(|e| panic!("{what} round {round}: B's close: {e:?}"));
            if !b_unread.is_empty() {
                read_ahead += 1;
                unread_bytes += b_unread.len();
            }
            b = Arc::new(b_kept.connect(b_unread, b_config()));
        }
        for p in pending.drain(..) {
            assert_eq!(outcome(&p).unwrap().payload, b"from the start");
        }
        a.close_timeout(LIMIT).unwrap();
        b.close_timeout(LIMIT).unwrap();
        report(format!(
            "{what}: {read_ahead} of {ROUNDS} closes read past the peer's EOF \
             ({unread_bytes} bytes handed on)"
        ));
        assert!(read_ahead > 0, "{what}: no close read past the peer's EOF");
    }
}

/// Aborts the connection and checks that a read blocked at the far socket
/// ends, and that the connection ends by itself; a finding if not.
fn abort_unblocks_the_peer(ctor: Ctor) -> Option<String> {
    let hooks = Hooks::default();
    let opened = open(
        ctor,
        Mode::Serve,
        // No hello: the far end's read blocks until the abort.
        hooks.on(Config::default()
            .name(unique_name("abort"))
            .extensions(false)),
    );
    let mut reader = opened.far.socket_reader();
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut buf = [0u8; 64];
        let _ = tx.send(reader.read(&mut buf).map_err(|e| e.kind()));
    });
    // Let the read block first.
    thread::sleep(ms(20));
    opened.conn.abort();
    let finding = match rx.recv_timeout(HANG) {
        Ok(Ok(0) | Err(_)) => None,
        Ok(Ok(n)) => Some(format!("{ctor:?}: the peer read {n} bytes after the abort")),
        Err(_) => Some(format!(
            "{ctor:?}: the peer's blocked read did not end within {HANG:?} of the abort"
        )),
    };
    let ended = {
        let deadline = Instant::now() + HANG;
        while opened.conn.status().ended.is_none() && Instant::now() < deadline {
            thread::sleep(ms(2));
        }
        opened.conn.status().ended
    };
    // Unstick what is still blocked, then join.
    opened.far.shutdown();
    join_all("the peer's read", vec![handle]);
    let _ = opened.conn.close_timeout(LIMIT);
    if let Some(path) = &opened.socket_path {
        let _ = std::fs::remove_file(path);
    }
    let finding = match (finding, ended) {
        (None, Some(Disconnect::Local)) => None,
        (finding, ended) => Some(format!(
            "{}; the connection's own end {HANG:?} after the abort: {ended:?}",
            finding.unwrap_or_else(|| format!("{ctor:?}: the peer's read ended"))
        )),
    };
    finding
}

#[test]
fn abort_shuts_a_socket_down_so_a_blocked_peer_read_ends() {
    let findings: Vec<_> = [
        Ctor::FromUnixStream,
        Ctor::FromTcpStream,
        Ctor::ConnectUnix,
        Ctor::ConnectTcp,
        Ctor::ConnectWith,
    ]
    .into_iter()
    .filter_map(abort_unblocks_the_peer)
    .collect();
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}

#[test]
fn abort_shuts_down_a_socket_given_as_an_owned_file_descriptor() {
    // `from_fd` is the constructor for "one file descriptor used both ways
    // (a socket)"; abort "shuts the stream down where the transport allows
    // it (sockets)".
    if let Some(finding) = abort_unblocks_the_peer(Ctor::FromFd) {
        panic!("{finding}");
    }
}

/// The peer's request and its ERQ, read at once: the request's handler,
/// on the connection's pool, runs while the ERQ hook (which may take its
/// time, here until the handler has run) runs on the receive thread. It
/// waited for the hook to return, since the workers were woken only before
/// the next read.
#[test]
fn a_request_read_with_the_peers_erq_does_not_wait_for_the_erq_hook() {
    let (ran_tx, ran_rx) = mpsc::channel::<()>();
    let ran_tx = Mutex::new(ran_tx);
    let ran_rx = Mutex::new(ran_rx);
    let (seen_tx, seen_rx) = mpsc::channel::<bool>();
    let seen_tx = Mutex::new(seen_tx);
    let config = Config::default()
        .handler(move |rq: Request| {
            let _ = ran_tx.lock().unwrap().send(());
            echo(rq)
        })
        .on_peer_end_requests(move || {
            // Bounded: a handler that never runs fails the test, not hangs.
            let ran = ran_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10))
                .is_ok();
            let _ = seen_tx.lock().unwrap().send(ran);
        });
    let (conn, mut peer) = RawPeer::with(config);
    let mut bytes = wire(&common::request(3, ECHO, 0, b"before erq"));
    bytes.extend(wire(&Packet::erq()));
    peer.send_bytes(&bytes);
    let ran_during_hook = seen_rx.recv_timeout(LIMIT);
    let reply = peer.recv_packet();
    peer.send(&Packet::eof());
    let closed = close(&Arc::new(conn));
    assert_eq!(
        ran_during_hook,
        Ok(true),
        "the handler ran while the ERQ hook waited for it"
    );
    assert!(
        reply.tag == 3 && matches!(reply.kind, PacketKind::Response { ok: true, .. }),
        "{reply:?}"
    );
    assert!(closed.is_ok(), "{closed:?}");
}

/// A handler closes, or joins, its own connection: the call returns
/// `WouldBlock` at once, since the connection cannot end before the
/// handler returns, and the close it began ends in order once it has:
/// the peer gets its answer, then the end. On a pool and inline, on the
/// receive thread. (Both waited for ever.)
#[test]
fn close_or_join_in_a_handler_of_its_own_connection_returns_would_block() {
    for (inline, join) in [(false, false), (false, true), (true, false), (true, true)] {
        let me: Arc<std::sync::OnceLock<PacketConnection>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let handler = {
            let me = Arc::clone(&me);
            move |rq: Request| -> HandlerResult {
                if let Some(conn) = me.get() {
                    let res = if join { conn.join() } else { conn.close() };
                    let _ = tx.lock().unwrap().send(res);
                }
                echo(rq)
            }
        };
        let server_config = Config::default().name(unique_name("selfclose"));
        let server_config = if inline {
            server_config.inline_handler(handler)
        } else {
            server_config.handler_threads(2).handler(handler)
        };
        let (client, server) = common::pair_with(Config::default(), server_config);
        let _ = me.set(server);
        let called = timed(LIMIT, move || {
            let res = client.call_timeout(ECHO, 0, b"x", LIMIT);
            (res, client)
        });
        let in_handler = rx.recv_timeout(HANG);
        let (res, client) = match called {
            Timed::Done(done, _) => done,
            Timed::Stuck(_) => panic!("the call did not return"),
        };
        assert!(
            matches!(in_handler, Ok(Err(Error::WouldBlock))),
            "inline {inline}, join {join}: in the handler: {in_handler:?}"
        );
        assert!(
            res.is_ok(),
            "inline {inline}, join {join}: the call: {res:?}"
        );
        let closed = client.close_timeout(LIMIT);
        assert!(closed.is_ok(), "inline {inline}, join {join}: {closed:?}");
        let server = me.get().unwrap();
        if join {
            // join began nothing: the peer's end ends the connection.
            let _ = server.close_timeout(LIMIT);
        }
        let ended = server.join();
        assert!(ended.is_ok(), "inline {inline}, join {join}: {ended:?}");
    }
}
