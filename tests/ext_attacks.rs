//! Attacks on the extensions (hello, remote cancel, deadlines, ping and
//! keepalive): a hostile peer on the control channel, cancels and deadlines
//! racing replies and shutdown, keepalive against live but slow peers, and
//! what a caller sees.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::{ms, unique_name, wait_for, within, Gate, RawPeer, Rng, ECHO};
use packetstream::{
    Config, Disconnect, Error, HandlerResult, Packet, PacketConnection, PacketKind, PayloadReader,
    Request, CONTROL_CHANNEL,
};

/// How long a step may take before the test calls it a hang.
const PATIENCE: Duration = Duration::from_secs(10);

/// Control request types, as the wire spec numbers them.
const HELLO: u64 = 0;
const PING: u64 = 1;
const CANCEL: u64 = 2;
const DEADLINE: u64 = 3;

/// Request types of the test services.
const HOLD: u64 = 10;
const WORK: u64 = 11;

/// `n` as a cs.binary `BSUInt`.
fn bsuint(mut n: u64) -> Vec<u8> {
    let mut out = vec![(n & 0x7f) as u8];
    n >>= 7;
    while n > 0 {
        out.insert(0, (n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out
}

/// The `BSUInt`s `values`, one after the other.
fn uints(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|&v| bsuint(v)).collect()
}

/// A DEADLINE's payload: BSUInt channel, BSUInt tag, UInt32BE milliseconds.
fn deadline_payload(channel: u64, tag: u64, ms: u32) -> Vec<u8> {
    let mut out = uints(&[channel, tag]);
    out.extend_from_slice(&ms.to_be_bytes());
    out
}

/// The channel, tag and milliseconds of a DEADLINE's payload.
fn read_deadline(payload: &[u8]) -> [u64; 3] {
    let mut reader = PayloadReader::new(payload);
    let fields = [
        reader.bs_uint().unwrap(),
        reader.bs_uint().unwrap(),
        u64::from(reader.u32::<packetstream::BigEndian>().unwrap()),
    ];
    assert!(reader.is_empty());
    fields
}

fn control_request(tag: u64, rq_type: u64, payload: Vec<u8>) -> Packet {
    Packet {
        channel: CONTROL_CHANNEL,
        tag,
        kind: PacketKind::Request { rq_type, flags: 0 },
        payload,
    }
}

fn control_response(tag: u64, ok: bool, payload: Vec<u8>) -> Packet {
    Packet {
        channel: CONTROL_CHANNEL,
        tag,
        kind: PacketKind::Response { ok, flags: 0 },
        payload,
    }
}

fn is_control_request(packet: &Packet, rq_type: u64) -> bool {
    packet.channel == CONTROL_CHANNEL
        && matches!(packet.kind, PacketKind::Request { rq_type: t, .. } if t == rq_type)
}

/// The `BSUInt`s of a control payload.
fn read_uints(payload: &[u8]) -> Vec<u64> {
    let mut reader = PayloadReader::new(payload);
    let mut out = Vec::new();
    while !reader.is_empty() {
        out.push(reader.bs_uint().unwrap());
    }
    out
}

/// A client and a server over a socketpair, with the given configs.
fn pair_with(client: Config, server: Config) -> (PacketConnection, PacketConnection) {
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(b, server).unwrap();
    let client = PacketConnection::from_unix_stream(a, client).unwrap();
    (client, server)
}

/// Waits until the hello has had its answer at `conn`, and returns it.
fn hello_done(conn: &PacketConnection) -> bool {
    let mut known = None;
    wait_for("the hello's answer", PATIENCE, || {
        known = conn.peer_extensions();
        known.is_some()
    });
    known.unwrap()
}

/// Closes both ends in order; each must end cleanly.
fn close_both(client: &PacketConnection, server: PacketConnection) {
    let closer = thread::spawn(move || server.close_timeout(PATIENCE));
    client.close_timeout(PATIENCE).expect("client close");
    within("the server's close", move || closer.join().unwrap()).expect("server close");
}

/// A raw peer that speaks to `config` with its extensions on: it reads the
/// connection's hello and answers it with `caps`.
fn raw_with_extensions(config: Config, caps: u64) -> (PacketConnection, RawPeer) {
    let (conn, mut peer) = RawPeer::speaking_to(config, PATIENCE);
    let hello = peer.recv_packet();
    assert!(is_control_request(&hello, HELLO), "{hello:?}");
    assert_eq!(read_uints(&hello.payload), [1, 7]);
    peer.send(&control_response(hello.tag, true, uints(&[1, caps])));
    wait_for("the hello's answer to be read", PATIENCE, || {
        conn.peer_extensions().is_some()
    });
    (conn, peer)
}

/// A handler for HOLD that waits up to `flags` milliseconds for a cancel
/// and says on `tx` (tag, cancelled); WORK counts itself in `ran` and
/// answers at once.
fn holding(
    tx: mpsc::Sender<(u64, bool)>,
    ran: Arc<AtomicU64>,
) -> impl Fn(Request) -> HandlerResult + Send + Sync + 'static {
    let tx = Mutex::new(tx);
    move |rq: Request| {
        if rq.rq_type == HOLD {
            let cancelled = rq.wait_cancelled(ms(rq.flags));
            let _ = tx.lock().unwrap().send((rq.tag, cancelled));
            if cancelled {
                return Err("cancelled".into());
            }
        } else {
            ran.fetch_add(1, Ordering::SeqCst);
        }
        Ok(rq.payload.into())
    }
}

// ---------------------------------------------------------------------------
// Log capture: records above debug level, with the thread that logged them.

struct Capture(Mutex<Vec<(String, log::Level, String)>>);

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let thread = thread::current().name().unwrap_or("").to_string();
            self.0
                .lock()
                .unwrap()
                .push((thread, record.level(), record.args().to_string()));
        }
    }

    fn flush(&self) {}
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(capture).unwrap();
        log::set_max_level(log::LevelFilter::Info);
        capture
    })
}

/// The records above debug level logged by threads of connection `name`.
fn logged_by(name: &str) -> Vec<(String, log::Level, String)> {
    let prefix = format!("{name}:");
    capture()
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(thread, _, _)| thread.starts_with(&prefix))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------
// Against an end of the base protocol.

#[test]
fn against_a_reference_like_peer_only_the_hello_differs_and_nothing_is_logged_above_debug() {
    capture();
    let name = unique_name("xr");
    let (conn, mut peer) = RawPeer::speaking_to(Config::default().name(&name), PATIENCE);
    let hello = peer.recv_packet();
    assert!(is_control_request(&hello, HELLO), "{hello:?}");
    // Dropped before the hello has its answer: no deadline, no cancel.
    drop(conn.submit_timeout(ECHO, 0, b"early", ms(60_000)).unwrap());
    let early = peer.recv_packet();
    assert_eq!((early.channel, &early.payload[..]), (0, &b"early"[..]));
    // The refusal, with the reference's text.
    peer.send(&control_response(
        hello.tag,
        false,
        format!("unknown channel {CONTROL_CHANNEL}").into_bytes(),
    ));
    wait_for("the refusal to be read", PATIENCE, || {
        conn.peer_extensions().is_some()
    });
    assert_eq!(conn.peer_extensions(), Some(false));
    // After it: no deadline and no cancel either; a ping still goes, and its
    // refusal is an answer.
    drop(conn.submit_timeout(ECHO, 0, b"late", ms(60_000)).unwrap());
    let conn = Arc::new(conn);
    let pinger = {
        let conn = Arc::clone(&conn);
        thread::spawn(move || conn.ping(PATIENCE))
    };
    let (skipped, ping) = peer.recv_until(|p| p.channel == CONTROL_CHANNEL);
    assert!(is_control_request(&ping, PING), "{ping:?}");
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    let late = &skipped[0];
    assert_eq!((late.channel, &late.payload[..]), (0, &b"late"[..]));
    peer.send(&control_response(
        ping.tag,
        false,
        format!("unknown channel {CONTROL_CHANNEL}").into_bytes(),
    ));
    within("the ping", move || pinger.join().unwrap()).expect("a refused ping is an answer");
    // Late answers to the two dropped requests are dropped quietly.
    peer.send(&common::response(early.tag, true, 0, b"early"));
    peer.send(&common::response(late.tag, true, 0, b"late"));
    let s = conn.stats();
    assert_eq!((s.requests_sent, s.pending), (2, 0));
    // Nothing above debug level from any of it.
    thread::sleep(ms(100));
    assert_eq!(logged_by(&name), []);
    conn.abort();
}

/// Control requests a hostile or future peer might send: malformed
/// payloads, huge values, duplicate and odd hellos, cancels and deadlines
/// for requests never sent, unknown types.
fn hostile_control_requests() -> Vec<(u64, Vec<u8>)> {
    vec![
        (HELLO, vec![]),
        (HELLO, vec![0x80]),
        (HELLO, vec![0xff; 11]),
        (HELLO, uints(&[0, 7])),
        (HELLO, uints(&[2, 7])),
        (HELLO, uints(&[1, u64::MAX])),
        (HELLO, uints(&[u64::MAX, 0])),
        (HELLO, uints(&[1, 7, 1, 2, 3])),
        (PING, vec![1, 2, 3]),
        (CANCEL, vec![]),
        (CANCEL, uints(&[0])),
        (CANCEL, vec![0xff; 11]),
        (CANCEL, uints(&[u64::MAX, u64::MAX])),
        (CANCEL, uints(&[0, 999])),
        (DEADLINE, vec![]),
        (DEADLINE, uints(&[0, 1])),
        (DEADLINE, uints(&[u64::MAX, u64::MAX, u64::MAX])),
        (DEADLINE, deadline_payload(0, 1000, u32::MAX)),
        (DEADLINE, deadline_payload(0, 1001, 0)),
        (4, vec![]),
        (99, uints(&[1, 2])),
        (u64::MAX - 1, vec![0xff; 3]),
    ]
}

#[test]
fn an_end_with_extensions_off_refuses_every_control_request_once_and_serves_on() {
    capture();
    let name = unique_name("xo");
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let (conn, mut peer) = RawPeer::with(Config::default().name(&name).handler(
        move |rq: Request| -> HandlerResult {
            let _ = tx
                .lock()
                .unwrap()
                .send((rq.tag, rq.time_left(), rq.is_cancelled()));
            Ok(rq.payload.into())
        },
    ));
    let hostile = hostile_control_requests();
    for (tag, (rq_type, payload)) in hostile.iter().enumerate() {
        peer.send(&control_request(tag as u64, *rq_type, payload.clone()));
    }
    // A real request, with a deadline and a cancel that must be ignored.
    peer.send(&control_request(100, DEADLINE, deadline_payload(0, 7, 0)));
    peer.request(7, ECHO, b"served");
    peer.send(&control_request(101, CANCEL, uints(&[0, 7])));
    let mut answered = HashMap::new();
    let mut echoed = false;
    while answered.len() < hostile.len() + 2 || !echoed {
        let packet = peer.recv_packet();
        match (packet.channel, packet.kind) {
            (CONTROL_CHANNEL, PacketKind::Response { ok, .. }) => {
                assert!(!ok, "an end without extensions answered ok: {packet:?}");
                assert!(
                    answered.insert(packet.tag, packet.payload).is_none(),
                    "control request {} answered twice",
                    packet.tag
                );
            }
            (0, PacketKind::Response { ok: true, .. }) => {
                assert_eq!((packet.tag, &packet.payload[..]), (7, &b"served"[..]));
                echoed = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), (7, None, false));
    let s = conn.stats();
    assert_eq!(
        (s.requests_received, s.replies_ok, s.in_progress),
        (1, 1, 0)
    );
    assert_eq!(conn.status().ended, None);
    assert_eq!(
        logged_by(&name),
        [],
        "refusing control requests logs nothing above debug"
    );
    conn.abort();
}

#[test]
fn a_hostile_peer_on_the_control_channel_gets_one_answer_per_request_and_breaks_nothing() {
    let name = unique_name("xh");
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let (conn, mut peer) = raw_with_extensions(
        Config::default()
            .name(&name)
            .handler(move |rq: Request| -> HandlerResult {
                let _ = tx.lock().unwrap().send((rq.tag, rq.time_left()));
                Ok(rq.payload.into())
            }),
        7,
    );
    let hostile = hostile_control_requests();
    // Control responses for tags this end never used, one of them a second
    // answer to its hello, with nonsense capabilities.
    peer.send(&control_response(0, true, uints(&[1, 0])));
    peer.send(&control_response(77, true, vec![]));
    peer.send(&control_response(78, false, vec![0xff; 40]));
    peer.send(&control_response(u64::MAX, true, vec![0x80]));
    for (tag, (rq_type, payload)) in hostile.iter().enumerate() {
        peer.send(&control_request(tag as u64, *rq_type, payload.clone()));
    }
    // A real request whose deadline is as far as a UInt32BE goes (49 days):
    // kept as at most a week.
    peer.send(&control_request(
        100,
        DEADLINE,
        deadline_payload(0, 5, u32::MAX),
    ));
    peer.request(5, ECHO, b"far");
    let mut answered: HashMap<u64, bool> = HashMap::new();
    let mut echoed = false;
    while answered.len() < hostile.len() + 1 || !echoed {
        let packet = peer.recv_packet();
        match (packet.channel, packet.kind) {
            (CONTROL_CHANNEL, PacketKind::Response { ok, .. }) => {
                assert!(
                    answered.insert(packet.tag, ok).is_none(),
                    "control request {} answered twice",
                    packet.tag
                );
            }
            (0, PacketKind::Response { ok: true, .. }) => {
                assert_eq!((packet.tag, &packet.payload[..]), (5, &b"far"[..]));
                echoed = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Malformed payloads and unknown types are refused, not taken.
    for (tag, (rq_type, payload)) in hostile.iter().enumerate() {
        let malformed = payload.first() == Some(&0xff) && payload.len() > 10
            || payload == &[0x80]
            || (payload.is_empty() && *rq_type != PING && *rq_type != 4);
        if malformed || *rq_type > DEADLINE {
            assert!(
                !answered[&(tag as u64)],
                "{rq_type} {payload:x?} answered ok"
            );
        }
    }
    let (tag, left) = rx.recv_timeout(PATIENCE).unwrap();
    assert_eq!(tag, 5);
    let week = Duration::from_secs(7 * 24 * 3600);
    let left = left.expect("the deadline was given");
    assert!(
        left <= week && left > week - Duration::from_secs(60),
        "{left:?}"
    );
    // Still open, and still speaking: this end's ping is answered.
    assert_eq!(conn.status().ended, None);
    let conn = Arc::new(conn);
    let pinger = {
        let conn = Arc::clone(&conn);
        thread::spawn(move || conn.ping(PATIENCE))
    };
    let (_, ping) = peer.recv_until(|p| is_control_request(p, PING));
    peer.send(&control_response(ping.tag, true, vec![]));
    within("the ping", move || pinger.join().unwrap()).unwrap();
    let s = conn.stats();
    assert_eq!((s.requests_received, s.in_progress), (1, 0));
    conn.abort();
}

// ---------------------------------------------------------------------------
// What a cancel and a deadline hold, and for how long.

/// The next response on channel 0, skipping control answers.
fn next_reply(peer: &mut RawPeer) -> Packet {
    peer.recv_until(|p| p.channel == 0).1
}

#[test]
fn cancels_and_deadlines_hold_only_for_the_request_they_name_and_never_for_a_later_one() {
    let (tx, rx) = mpsc::channel();
    let ran = Arc::new(AtomicU64::new(0));
    let (conn, mut peer) = raw_with_extensions(
        Config::default()
            .name(unique_name("xt"))
            .handler(holding(tx, Arc::clone(&ran))),
        7,
    );
    // A cancel before its request has arrived is ignored: the request runs
    // its 300 ms and is not cancelled.
    peer.send(&control_request(0, CANCEL, uints(&[0, 3])));
    peer.send(&common::request(3, HOLD, 300, b"a"));
    assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), (3, false));
    let reply = next_reply(&mut peer);
    assert_eq!((reply.tag, &reply.payload[..]), (3, &b"a"[..]));

    // A cancel while it runs stops it, and a second cancel after its reply
    // is ignored; then a new request under the same tag is not cancelled.
    // (Each reply is written a moment before its request is forgotten: a
    // tag is used again only once it is.)
    let settled = |conn: &PacketConnection| {
        wait_for("the request to be forgotten", PATIENCE, || {
            conn.stats().in_progress == 0
        })
    };
    settled(&conn);
    peer.send(&common::request(4, HOLD, 10_000, b"b"));
    wait_for("the handler to start", PATIENCE, || {
        let s = conn.stats();
        s.in_progress == 1 && s.requests_waiting == 0
    });
    peer.send(&control_request(1, CANCEL, uints(&[0, 4])));
    let reply = next_reply(&mut peer);
    assert!(
        matches!(reply.kind, PacketKind::Response { ok: false, .. }),
        "{reply:?}"
    );
    // Stopped by its handler (or, had the cancel come just before the
    // handler looked, not run).
    if reply.payload != b"cancelled before it ran" {
        assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), (4, true));
    }
    settled(&conn);
    peer.send(&control_request(2, CANCEL, uints(&[0, 4])));
    peer.send(&common::request(4, HOLD, 300, b"c"));
    assert_eq!(
        rx.recv_timeout(PATIENCE).unwrap(),
        (4, false),
        "a cancel outlived its request"
    );
    let reply = next_reply(&mut peer);
    assert_eq!((reply.tag, &reply.payload[..]), (4, &b"c"[..]));

    // A deadline of 0 ms: its request never runs; it is used up by it, so
    // the same tag again runs.
    peer.send(&control_request(3, DEADLINE, deadline_payload(0, 6, 0)));
    peer.send(&common::request(6, WORK, 0, b"d"));
    let reply = next_reply(&mut peer);
    assert_eq!(reply.tag, 6);
    assert!(matches!(reply.kind, PacketKind::Response { ok: false, .. }));
    assert_eq!(reply.payload, b"deadline passed before it ran");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    settled(&conn);
    peer.send(&common::request(6, WORK, 0, b"e"));
    let reply = next_reply(&mut peer);
    assert_eq!((reply.tag, &reply.payload[..]), (6, &b"e"[..]));
    assert_eq!(ran.load(Ordering::SeqCst), 1);

    // More than 1024 deadlines for requests that never come: all dropped,
    // and the connection serves on.
    for tag in 0..1100u64 {
        peer.send(&control_request(
            10 + tag,
            DEADLINE,
            deadline_payload(0, 10_000 + tag, 0),
        ));
    }
    peer.send(&common::request(10_000, WORK, 0, b"f"));
    let reply = next_reply(&mut peer);
    assert_eq!(reply.tag, 10_000);
    assert_eq!(conn.stats().in_progress, 0);
    conn.abort();
}

#[test]
fn a_peer_whose_hello_lacks_cancel_and_deadline_is_sent_neither() {
    // Capabilities 1: ping only.
    let (conn, mut peer) = raw_with_extensions(Config::default().name(unique_name("xc")), 1);
    assert_eq!(conn.peer_extensions(), Some(true));
    drop(conn.submit_timeout(ECHO, 0, b"x", ms(60_000)).unwrap());
    let conn = Arc::new(conn);
    let pinger = {
        let conn = Arc::clone(&conn);
        thread::spawn(move || conn.ping(PATIENCE))
    };
    let (skipped, ping) = peer.recv_until(|p| p.channel == CONTROL_CHANNEL);
    assert!(
        is_control_request(&ping, PING),
        "sent to a peer without it: {ping:?}"
    );
    assert_eq!(skipped.len(), 1);
    peer.send(&control_response(ping.tag, true, vec![]));
    within("the ping", move || pinger.join().unwrap()).unwrap();
    conn.abort();
}

// ---------------------------------------------------------------------------
// Floods.

#[test]
fn a_peer_that_floods_pings_and_never_reads_cannot_grow_the_outgoing_queue_without_bound() {
    const PINGS: u64 = 300_000;
    const BUDGET: u64 = 64 << 10;
    let (conn, peer) = RawPeer::speaking_to(
        Config::default()
            .name(unique_name("xf"))
            .max_queued_bytes(BUDGET as usize)
            .max_queued_packets(1024),
        PATIENCE,
    );
    let mut writer_stream = peer.stream.try_clone().unwrap();
    writer_stream.set_write_timeout(Some(ms(2000))).unwrap();
    let writer = thread::spawn(move || {
        let mut wire = Vec::new();
        for tag in 0..PINGS {
            control_request(tag, PING, vec![]).encode_into(&mut wire);
        }
        let len = wire.len();
        // Ends with an error if the connection stops reading, which is
        // what a bound looks like from here.
        (len, writer_stream.write_all(&wire).is_ok())
    });
    let (len, all_written) = within("the flood", move || writer.join().unwrap());
    // Let the receive thread catch up with what it has read.
    let mut last = conn.stats().packets_in;
    loop {
        thread::sleep(ms(200));
        let now = conn.stats().packets_in;
        if now == last {
            break;
        }
        last = now;
    }
    let s = conn.stats();
    common::report(format!(
        "{PINGS} pings ({} KiB) never read, budget {} KiB: written {all_written}, read {} packets; queued {} packets, {} KiB",
        len >> 10,
        BUDGET >> 10,
        s.packets_in,
        s.queued_packets,
        s.queued_bytes >> 10,
    ));
    assert!(
        s.queued_bytes <= 1 << 20,
        "{} KiB of answers queued for a peer that reads none, with a budget of {} KiB",
        s.queued_bytes >> 10,
        BUDGET >> 10
    );
    conn.abort();
    drop(peer);
}

// ---------------------------------------------------------------------------
// Deadlines at the caller.

#[test]
fn a_deadline_that_passes_while_its_request_waits_to_be_written_is_not_renewed_at_the_peer() {
    let (conn, mut peer) = raw_with_extensions(Config::default().name(unique_name("xw")), 7);
    // The peer reads nothing for now: 4 MiB fill the socket, the rest waits
    // in the outgoing queue, and the request with a deadline behind it.
    // (A plain `submit` of a large payload would write it on this thread,
    // blocking until the peer reads.)
    let big = conn
        .submit_timeout(ECHO, 0, &vec![0x42; 4 << 20], PATIENCE * 3)
        .unwrap();
    let quick = conn.submit_timeout(ECHO, 0, b"quick", ms(300)).unwrap();
    let err = quick.wait_timeout(PATIENCE).unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    let gave_up = Instant::now();
    // The caller has given up, and still holds the handle (to look at it
    // later, say). Only now does the peer read.
    thread::sleep(ms(500));
    let (skipped, request) = peer.recv_until(|p| p.channel == 0 && p.payload == b"quick");
    let read_at = Instant::now();
    let deadline = skipped
        .iter()
        .rev()
        .find(|p| is_control_request(p, DEADLINE))
        .expect("a deadline before the request");
    let fields = read_deadline(&deadline.payload);
    assert_eq!(&fields[..2], [0, request.tag]);
    // The peer starts its clock now: the caller's deadline passed
    // `read_at - gave_up` ago, so the peer must not be given more time.
    assert_eq!(
        fields[2],
        0,
        "the peer read a deadline of {} ms {:?} after the caller's had passed: it would run a \
         request its caller gave up on",
        fields[2],
        read_at - gave_up
    );
    drop((big, quick));
    conn.abort();
}

// ---------------------------------------------------------------------------
// Keepalive against live peers that are slow, and silent ones.

/// True once `conn` has begun to end, or has ended: its receive side gives
/// up before its send side is done.
fn ending(conn: &PacketConnection) -> bool {
    let status = conn.status();
    status.closing || status.ended.is_some()
}

/// Watches `conn` for `span`: fails if it begins to end.
fn stays_open(conn: &PacketConnection, span: Duration, why: &str) {
    let until = Instant::now() + span;
    while Instant::now() < until {
        assert!(!ending(conn), "{why}: {:?}", conn.status());
        thread::sleep(ms(10));
    }
}

#[test]
fn keepalive_spares_a_peer_whose_handler_is_busy_for_a_long_time() {
    let gate = Gate::new();
    let g = gate.clone();
    let (client, server) = pair_with(
        Config::default().name(unique_name("kb")).keepalive(ms(200)),
        Config::default()
            .name(unique_name("kB"))
            .handler(move |rq: Request| -> HandlerResult {
                g.pass();
                Ok(rq.payload.into())
            }),
    );
    let pending = client.submit(ECHO, 0, b"slow").unwrap();
    gate.wait_entered(1, PATIENCE);
    stays_open(
        &client,
        ms(1500),
        "a handler busy for 1.5 s looked like a dead peer",
    );
    gate.open();
    assert_eq!(pending.wait_timeout(PATIENCE).unwrap().payload, b"slow");
    close_both(&client, server);
}

#[test]
fn keepalive_spares_a_peer_whose_handler_queue_is_full() {
    // One handler thread and room for one request waiting: the third
    // request stops the peer's reading until the first is done.
    let gate = Gate::new();
    let g = gate.clone();
    let (client, server) = pair_with(
        Config::default().name(unique_name("kq")).keepalive(ms(200)),
        Config::default()
            .name(unique_name("kQ"))
            .handler_threads(1)
            .handler_queue(1)
            .handler(move |rq: Request| -> HandlerResult {
                g.pass();
                Ok(rq.payload.into())
            }),
    );
    let pending: Vec<_> = (0..4)
        .map(|_| client.submit(ECHO, 0, b"queued").unwrap())
        .collect();
    gate.wait_entered(1, PATIENCE);
    let quiet = Instant::now();
    let mut dropped = None;
    while quiet.elapsed() < ms(1500) && dropped.is_none() {
        thread::sleep(ms(10));
        dropped = ending(&client).then(|| client.status().ended);
    }
    gate.open();
    assert_eq!(
        dropped,
        None,
        "a live peer with a full handler queue was given up after {:?}",
        quiet.elapsed()
    );
    for p in pending {
        assert_eq!(p.wait_timeout(PATIENCE).unwrap().payload, b"queued");
    }
    close_both(&client, server);
}

#[test]
fn keepalive_spares_a_peer_with_a_long_packet_grace_either_way() {
    for (client_grace, server_grace) in [(ms(10), ms(5000)), (ms(5000), ms(10))] {
        let (client, server) = pair_with(
            Config::default()
                .name(unique_name("kg"))
                .packet_grace(client_grace)
                .keepalive(ms(200)),
            Config::default()
                .name(unique_name("kG"))
                .packet_grace(server_grace)
                .handler(common::echo),
        );
        stays_open(
            &client,
            ms(1200),
            &format!("grace {client_grace:?} here, {server_grace:?} at the peer"),
        );
        assert_eq!(server.status().ended, None);
        close_both(&client, server);
    }
}

#[test]
fn keepalive_spares_a_peer_that_sends_a_long_packet_slowly() {
    // The peer is in the middle of a packet, a few bytes at a time, for
    // longer than two keepalive periods: it cannot answer a ping until the
    // packet is done, but it is plainly there.
    let (conn, mut peer) = raw_with_extensions(
        Config::default()
            .name(unique_name("ks"))
            .keepalive(ms(200))
            .packet_timeout(PATIENCE)
            .handler(common::echo),
        7,
    );
    let mut wire = Vec::new();
    common::request(2, ECHO, 0, &[0x41; 400]).encode_into(&mut wire);
    for chunk in wire.chunks(20) {
        peer.send_bytes(chunk);
        thread::sleep(ms(50));
        assert_eq!(
            conn.status().ended,
            None,
            "dropped while the peer was sending"
        );
    }
    let (_, reply) = peer.recv_until(|p| p.channel == 0);
    assert_eq!(reply.payload.len(), 400);
    conn.abort();
}

#[test]
fn keepalive_spares_a_peer_that_reads_slowly() {
    // A peer on a slow link: it reads 32 KiB every 10 ms and answers every
    // ping as soon as it reads it. The 4 MiB take it over a second, more
    // than twice the keepalive; a ping waits behind them, so only the
    // progress of the write shows the peer is there. (The period leaves
    // room for a loaded machine's pauses between reads.)
    let (conn, peer) = raw_with_extensions(
        Config::default().name(unique_name("kr")).keepalive(ms(500)),
        7,
    );
    let mut reader = peer;
    let mut writer = reader.stream.try_clone().unwrap();
    let big = conn
        .submit_timeout(ECHO, 0, &vec![0x42; 4 << 20], PATIENCE * 3)
        .unwrap();
    let slow = thread::spawn(move || {
        use std::io::Read;
        let mut buf = Vec::new();
        let mut chunk = vec![0; 32 << 10];
        let mut pings = 0;
        let started = Instant::now();
        while started.elapsed() < ms(1500) {
            let n = match reader.stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut used = 0;
            while let Some((packet, n)) = Packet::decode(&buf[used..], u64::MAX).unwrap() {
                used += n;
                if is_control_request(&packet, PING) {
                    pings += 1;
                    let mut answer = Vec::new();
                    control_response(packet.tag, true, vec![]).encode_into(&mut answer);
                    writer.write_all(&answer).unwrap();
                }
            }
            buf.drain(..used);
            thread::sleep(ms(10));
        }
        pings
    });
    let started = Instant::now();
    let mut dropped = None;
    while started.elapsed() < ms(1500) && dropped.is_none() {
        thread::sleep(ms(10));
        dropped = ending(&conn).then(|| started.elapsed());
    }
    let pings = within("the slow reader", move || slow.join().unwrap());
    assert_eq!(
        dropped,
        None,
        "a peer reading 3 MiB/s was given up after {dropped:?} ({pings} pings answered); the \
         request it was reading: {:?}",
        big.try_wait()
    );
    conn.abort();
}

#[test]
fn keepalive_ends_a_silent_peer_even_while_this_end_is_stuck_writing() {
    // After the hello the peer neither reads nor writes: a host gone.
    let (conn, peer) = raw_with_extensions(
        Config::default().name(unique_name("kx")).keepalive(ms(100)),
        7,
    );
    let big = conn
        .submit_timeout(ECHO, 0, &vec![0x42; 4 << 20], PATIENCE * 3)
        .unwrap();
    let small = conn.submit(ECHO, 0, b"small").unwrap();
    // The requests fail: the receive side has given up.
    for p in [big, small] {
        let err = p.wait_timeout(PATIENCE).unwrap_err();
        assert!(
            matches!(err, Error::ConnectionLost(Disconnect::NoAnswer)),
            "{err:?}"
        );
    }
    // And the connection ends, though its send thread was in a write that
    // the gone peer will never take.
    let status = (0..(PATIENCE.as_millis() / 10))
        .map(|_| {
            thread::sleep(ms(10));
            conn.status()
        })
        .find(|status| status.ended.is_some())
        .unwrap_or_else(|| conn.status());
    assert_eq!(
        status.ended,
        Some(Disconnect::NoAnswer),
        "the connection never ended, so close and join wait for the peer: {status:?}"
    );
    let err = conn.close_timeout(PATIENCE).unwrap_err();
    assert!(
        matches!(err, Error::ConnectionLost(Disconnect::NoAnswer)),
        "{err:?}"
    );
    drop(peer);
}

#[test]
fn timeouts_too_long_for_an_instant_mean_no_limit_and_never_panic() {
    let (client, server) = pair_with(
        Config::default()
            .name(unique_name("km"))
            .keepalive(Duration::MAX)
            .idle_timeout(Duration::MAX)
            .packet_timeout(Duration::MAX)
            .stall_timeout(Duration::MAX),
        Config::default()
            .name(unique_name("kM"))
            .handler(common::echo)
            .keepalive(Duration::MAX),
    );
    assert!(hello_done(&client));
    client.ping(Duration::MAX).unwrap();
    let pending = client
        .submit_timeout(ECHO, 0, b"far", Duration::MAX)
        .unwrap();
    assert_eq!(pending.wait_timeout(Duration::MAX).unwrap().payload, b"far");
    assert_eq!(
        client
            .call_timeout(ECHO, 0, b"x", Duration::MAX)
            .unwrap()
            .payload,
        b"x"
    );
    stays_open(&client, ms(200), "no limit");
    close_both(&client, server);
}

#[test]
fn keepalive_and_idle_timeout_together() {
    // Both set on this end, the peer alive and quiet: the pings' answers
    // are traffic. Does this end's idle timeout still end the connection?
    let (client, server) = pair_with(
        Config::default()
            .name(unique_name("ki"))
            .keepalive(ms(100))
            .idle_timeout(ms(400)),
        Config::default()
            .name(unique_name("kI"))
            .handler(common::echo),
    );
    let started = Instant::now();
    let mut ended = None;
    while started.elapsed() < ms(2000) && ended.is_none() {
        thread::sleep(ms(10));
        ended = client.status().ended;
    }
    common::report(format!(
        "keepalive 100 ms and idle_timeout 400 ms, peer alive and quiet: after {:?}, {ended:?}",
        started.elapsed()
    ));
    assert_eq!(
        ended,
        Some(Disconnect::Idle),
        "the idle timeout never fired"
    );
    drop((client, server));
}

// ---------------------------------------------------------------------------
// After this end has ended its requests.

#[test]
fn after_end_requests_a_dropped_request_is_still_cancelled_and_the_peer_can_be_pinged() {
    let (tx, rx) = mpsc::channel();
    let (client, server) = pair_with(
        Config::default().name(unique_name("ec")),
        Config::default()
            .name(unique_name("eC"))
            .handler(holding(tx, Arc::default())),
    );
    assert!(hello_done(&client));
    let pending = client.submit(HOLD, 5_000, b"").unwrap();
    wait_for("the handler to start", PATIENCE, || {
        server.stats().in_progress == 1
    });
    // No more requests from here; the one in flight is given up, and the
    // peer is pinged: neither is a request of the application.
    client.end_requests();
    drop(pending);
    let ping = client.ping(PATIENCE);
    let (tag, cancelled) = rx.recv_timeout(PATIENCE).expect("the handler to end");
    assert!(
        cancelled && ping.is_ok(),
        "after end_requests: request {tag} ran its 5 s, the cancel not sent: {}; ping: {ping:?}",
        !cancelled
    );
    close_both(&client, server);
}

#[test]
fn keepalive_spares_a_slow_peer_after_this_end_has_ended_its_requests() {
    for closing in [true, false] {
        let gate = Gate::new();
        let g = gate.clone();
        let (client, server) = pair_with(
            Config::default().name(unique_name("ek")).keepalive(ms(150)),
            Config::default().name(unique_name("eK")).handler(
                move |rq: Request| -> HandlerResult {
                    g.pass();
                    Ok(rq.payload.into())
                },
            ),
        );
        assert!(hello_done(&client));
        let pending = client.submit(ECHO, 0, b"slow").unwrap();
        gate.wait_entered(1, PATIENCE);
        let client = Arc::new(client);
        // This end makes no more requests (and, closing, waits for the
        // peer's EOF); the peer works on for 1 s, alive.
        let closer = closing.then(|| {
            let client = Arc::clone(&client);
            thread::spawn(move || client.close_timeout(PATIENCE))
        });
        if !closing {
            client.end_requests();
        }
        thread::sleep(ms(1000));
        gate.open();
        let res = pending.wait_timeout(PATIENCE);
        let closed = closer.map(|closer| within("the close", move || closer.join().unwrap()));
        assert_eq!(
            res.as_ref()
                .map(|rsp| &rsp.payload[..])
                .map_err(|e| e.to_string()),
            Ok(&b"slow"[..]),
            "closing {closing}: a live peer was given up: {:?}",
            client.status()
        );
        if let Some(closed) = closed {
            closed.expect("the close");
        }
        let _ = client.close_timeout(PATIENCE);
        server.close_timeout(PATIENCE).unwrap();
    }
}

// ---------------------------------------------------------------------------
// What the caller sees.

#[test]
fn ping_is_sent_with_extensions_off_and_is_never_counted_as_a_request() {
    // With extensions off at this end: `ping`'s doc says it is sent all the
    // same (and `Error::ReservedChannel`'s doc says it is refused).
    let (client, server) = pair_with(
        Config::default().name(unique_name("po")).extensions(false),
        Config::default()
            .name(unique_name("pO"))
            .handler(common::echo),
    );
    assert_eq!(client.peer_extensions(), Some(false));
    client.ping(PATIENCE).expect("a ping with extensions off");
    // A ping waiting for its answer is not a pending request.
    let (conn, mut peer) = raw_with_extensions(Config::default().name(unique_name("pw")), 7);
    let conn = Arc::new(conn);
    let pinger = {
        let conn = Arc::clone(&conn);
        thread::spawn(move || conn.ping(PATIENCE))
    };
    let (_, ping) = peer.recv_until(|p| is_control_request(p, PING));
    let s = conn.stats();
    assert_eq!((s.requests_sent, s.pending), (0, 0));
    peer.send(&control_response(ping.tag, true, vec![]));
    within("the ping", move || pinger.join().unwrap()).unwrap();
    let s = server.stats();
    assert_eq!(
        (s.requests_received, s.replies_ok, s.replies_failed),
        (0, 0, 0)
    );
    conn.abort();
    close_both(&client, server);
}

#[test]
fn a_request_past_its_deadline_is_stopped_at_the_peer_though_its_handle_is_kept() {
    // EXTENSIONS.md: "deadline passes while the handler runs ... the caller
    // sees the reply if in time, else Error::Timeout and a CANCEL goes".
    let (tx, rx) = mpsc::channel();
    let (client, server) = pair_with(
        Config::default().name(unique_name("dk")),
        Config::default()
            .name(unique_name("dK"))
            .handler(holding(tx, Arc::default())),
    );
    assert!(hello_done(&client));
    let pending = client.submit_timeout(HOLD, 3_000, b"", ms(200)).unwrap();
    // Waits longer than the request's deadline: it ends at the deadline.
    let err = pending.wait_timeout(PATIENCE).unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(err.was_sent());
    // The handle is kept, to look at later; the peer's handler should have
    // been told to stop all the same.
    let (tag, cancelled) = rx.recv_timeout(PATIENCE).expect("the handler to end");
    assert!(
        cancelled,
        "request {tag} ran on past its deadline for its full 3 s: no cancel went at the deadline"
    );
    drop(pending);
    close_both(&client, server);
}

// ---------------------------------------------------------------------------
// Handlers that submit requests, inline handlers, and a server.

const OUTER: u64 = 20;

#[test]
fn a_cancel_reaches_through_a_handler_to_the_request_it_made_in_turn() {
    // The server's handler for OUTER asks the client in turn (HOLD), and
    // gives that up when OUTER is cancelled; the client's handler for the
    // inner request waits for a cancel.
    let (tx, rx) = mpsc::channel();
    let server_conn: Arc<OnceLock<std::sync::Weak<PacketConnection>>> = Arc::default();
    let sc = Arc::clone(&server_conn);
    let (a, b) = UnixStream::pair().unwrap();
    let server = Arc::new(
        PacketConnection::from_unix_stream(
            b,
            Config::default().name(unique_name("nS")).handler(
                move |rq: Request| -> HandlerResult {
                    let conn = sc.get().and_then(|weak| weak.upgrade()).ok_or("no conn")?;
                    let inner = conn.submit_timeout(HOLD, 5_000, b"", PATIENCE)?;
                    drop(conn);
                    loop {
                        if rq.wait_cancelled(ms(5)) {
                            drop(inner);
                            return Err("cancelled".into());
                        }
                        if inner.is_ready() {
                            return Ok(inner.wait()?.payload.into());
                        }
                    }
                },
            ),
        )
        .unwrap(),
    );
    server_conn.set(Arc::downgrade(&server)).unwrap();
    let client = PacketConnection::from_unix_stream(
        a,
        Config::default()
            .name(unique_name("nC"))
            .handler(holding(tx, Arc::default())),
    )
    .unwrap();
    assert!(hello_done(&client));
    assert!(hello_done(&server));
    // Dropped, three times, then given up by a timeout: each reaches the
    // inner handler.
    for _ in 0..3 {
        let outer = client.submit(OUTER, 0, b"").unwrap();
        wait_for("the inner request to reach the client", PATIENCE, || {
            client.stats().in_progress == 1
        });
        drop(outer);
        let (_, cancelled) = rx.recv_timeout(PATIENCE).expect("the inner handler to end");
        assert!(cancelled, "the inner request ran its 5 s");
        wait_for("both handlers to end", PATIENCE, || {
            client.stats().in_progress == 0 && server.stats().in_progress == 0
        });
    }
    let outer = client.submit_timeout(OUTER, 0, b"", ms(2000)).unwrap();
    wait_for("the inner request to reach the client", PATIENCE, || {
        client.stats().in_progress == 1
    });
    let err = outer.wait().unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    let (_, cancelled) = rx.recv_timeout(PATIENCE).expect("the inner handler to end");
    assert!(
        cancelled,
        "the inner request ran its 5 s after the outer one timed out"
    );
    wait_for("both handlers to end", PATIENCE, || {
        client.stats().in_progress == 0 && server.stats().in_progress == 0
    });
    assert_eq!((client.stats().pending, server.stats().pending), (0, 0));
    let server = Arc::try_unwrap(server).expect("the only handle");
    close_both(&client, server);
}

#[test]
fn an_inline_handler_keeps_deadlines_and_may_submit_and_drop_its_own_requests() {
    let ran = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&ran);
    let own: Arc<OnceLock<std::sync::Weak<PacketConnection>>> = Arc::default();
    let o = Arc::clone(&own);
    let (conn, mut peer) = RawPeer::speaking_to(
        Config::default().name(unique_name("il")).inline_handler(
            move |rq: Request| -> HandlerResult {
                r.fetch_add(1, Ordering::SeqCst);
                if rq.rq_type == OUTER {
                    // Asks the peer in turn, with a deadline, and gives it
                    // up at once: it never waits on its own connection.
                    let conn = o.get().and_then(|w| w.upgrade()).ok_or("no conn")?;
                    drop(conn.submit_timeout(ECHO, 0, b"inner", PATIENCE)?);
                }
                Ok(rq.payload.into())
            },
        ),
        PATIENCE,
    );
    let conn = Arc::new(conn);
    own.set(Arc::downgrade(&conn)).unwrap();
    let hello = peer.recv_packet();
    assert!(is_control_request(&hello, HELLO));
    peer.send(&control_response(hello.tag, true, uints(&[1, 7])));
    // A request whose deadline has passed is not run, inline either.
    peer.send(&control_request(0, DEADLINE, deadline_payload(0, 2, 0)));
    peer.request(2, ECHO, b"stale");
    let reply = next_reply(&mut peer);
    assert_eq!(reply.tag, 2);
    assert_eq!(reply.payload, b"deadline passed before it ran");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    // The handler's own request goes with its deadline, and its cancel.
    peer.request(3, OUTER, b"outer");
    let mut seen = Vec::new();
    loop {
        let packet = peer.recv_packet();
        let done = packet.channel == 0 && packet.tag == 3;
        seen.push(packet);
        if done {
            break;
        }
    }
    let kinds: Vec<_> = seen
        .iter()
        .map(|p| match (p.channel, p.kind) {
            (CONTROL_CHANNEL, PacketKind::Request { rq_type, .. }) => format!("control {rq_type}"),
            (0, PacketKind::Request { .. }) => "request".to_string(),
            (0, PacketKind::Response { ok, .. }) => format!("reply {ok}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        ["control 3", "request", "control 2", "reply true"],
        "{seen:?}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    conn.abort();
}

#[test]
fn a_server_cancels_queued_and_running_requests_of_many_clients_and_ignores_a_hostile_one() {
    const CLIENTS: usize = 8;
    let dir = std::env::temp_dir().join(format!(
        "ext-attacks-{}-{}",
        std::process::id(),
        unique_name("")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let (tx, rx) = mpsc::channel();
    let ran = Arc::new(AtomicU64::new(0));
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // Two shared handler threads for all: most held requests wait in the
    // queue when they are dropped.
    let server = packetstream::Server::serve_unix(
        listener,
        packetstream::ServerConfig::new(
            Config::default()
                .name(unique_name("sv"))
                .handler(holding(tx, Arc::clone(&ran))),
        )
        .handler_threads(2),
    )
    .unwrap();
    // A hostile client cancels every tag the others use, and floods the
    // control channel, without reading.
    let mut hostile = UnixStream::connect(&path).unwrap();
    hostile.set_write_timeout(Some(PATIENCE)).unwrap();
    let mut junk = Vec::new();
    for tag in 0..2000u64 {
        control_request(tag, CANCEL, uints(&[0, tag % 64])).encode_into(&mut junk);
        control_request(tag + 10_000, DEADLINE, deadline_payload(0, tag % 64, 0))
            .encode_into(&mut junk);
    }
    hostile.write_all(&junk).unwrap();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|idx| {
            let path = path.clone();
            thread::spawn(move || {
                let conn = PacketConnection::connect_unix(
                    &path,
                    Config::default().name(format!("sc{idx}-{}", unique_name(""))),
                )
                .unwrap();
                assert!(hello_done(&conn));
                let held: Vec<_> = (0..2)
                    .map(|_| conn.submit(HOLD, 10_000, b"held").unwrap())
                    .collect();
                thread::sleep(ms(200));
                drop(held);
                // The pool is free again for every client: the queued holds
                // never ran, the running ones stopped.
                for n in 0..20u64 {
                    let payload = n.to_be_bytes();
                    let rsp = conn
                        .call_timeout(WORK, 0, &payload, PATIENCE)
                        .expect("a plain request");
                    assert_eq!(rsp.payload, payload);
                }
                conn.ping(PATIENCE).unwrap();
                conn.close_timeout(PATIENCE).unwrap();
            })
        })
        .collect();
    for client in clients {
        within("a client", move || client.join().unwrap());
    }
    let mut held_runs = Vec::new();
    while let Ok(report) = rx.recv_timeout(ms(200)) {
        held_runs.push(report);
    }
    assert!(
        held_runs.iter().all(|&(_, cancelled)| cancelled),
        "a held request ran its 10 s: {held_runs:?}"
    );
    assert!(held_runs.len() <= 2 * CLIENTS);
    assert_eq!(ran.load(Ordering::SeqCst), 20 * CLIENTS as u64);
    drop(hostile);
    within("the server's stop", move || server.stop_timeout(PATIENCE)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Exactly one reply on the wire.

#[test]
fn every_request_gets_one_reply_on_the_wire_with_cancels_deadlines_erq_and_eof_racing() {
    const REQUESTS: u64 = 3000;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    common::report(format!("wire race seed {seed}"));
    let (conn, peer) = raw_with_extensions(
        Config::default()
            .name(unique_name("wr"))
            .handler_threads(2)
            .handler_queue(2)
            .handler(move |rq: Request| -> HandlerResult {
                // Works `flags` hundred microseconds, stopping at a cancel.
                if rq.wait_cancelled(Duration::from_micros(100 * rq.flags)) {
                    return Err("cancelled".into());
                }
                Ok(rq.payload.into())
            }),
        7,
    );
    let mut writer = peer.stream.try_clone().unwrap();
    let (control_sent_tx, control_sent) = mpsc::channel();
    let script = thread::spawn(move || {
        let mut rng = Rng::new(seed);
        let mut ctag = 0u64;
        let mut control = |wire: &mut Vec<u8>, rq_type: u64, payload: Vec<u8>| {
            control_request(ctag, rq_type, payload).encode_into(wire);
            ctag += 1;
        };
        let mut wire = Vec::new();
        for tag in 2..2 + REQUESTS {
            if rng.below(3) == 0 {
                control(
                    &mut wire,
                    DEADLINE,
                    deadline_payload(0, tag, rng.below(4) as u32),
                );
            }
            common::request(tag, WORK, rng.below(20), &tag.to_be_bytes()).encode_into(&mut wire);
            match rng.below(6) {
                0 => control(&mut wire, CANCEL, uints(&[0, tag])),
                1 => control(
                    &mut wire,
                    CANCEL,
                    uints(&[0, tag.saturating_sub(rng.below(8))]),
                ),
                2 => control(&mut wire, PING, vec![]),
                _ => {}
            }
            if rng.below(4) == 0 {
                writer.write_all(&wire).unwrap();
                wire.clear();
                thread::sleep(Duration::from_micros(rng.below(500)));
            }
        }
        // No more requests; control requests go on, then EOF.
        Packet::erq().encode_into(&mut wire);
        for tag in 0..200 {
            control(&mut wire, CANCEL, uints(&[0, 2 + REQUESTS - 1 - tag]));
            control(&mut wire, PING, vec![]);
        }
        control(&mut wire, HELLO, uints(&[1, 7]));
        Packet::eof().encode_into(&mut wire);
        writer.write_all(&wire).unwrap();
        control_sent_tx.send(ctag).unwrap();
    });
    let mut peer = peer;
    let mut replies: HashMap<u64, u32> = HashMap::new();
    let mut answers: HashMap<u64, u32> = HashMap::new();
    let (mut ok, mut refused) = (0, 0);
    while let Some(packet) = peer.recv() {
        match (packet.channel, packet.kind) {
            (
                0,
                PacketKind::Response {
                    ok: answered_ok, ..
                },
            ) => {
                *replies.entry(packet.tag).or_default() += 1;
                if answered_ok {
                    assert_eq!(packet.payload, packet.tag.to_be_bytes());
                    ok += 1;
                } else {
                    refused += 1;
                }
            }
            (CONTROL_CHANNEL, PacketKind::Response { .. }) => {
                *answers.entry(packet.tag).or_default() += 1;
            }
            (_, PacketKind::Control { .. }) if packet.is_eof() => break,
            (_, PacketKind::Control { .. }) => {} // Its ERQ.
            other => panic!("unexpected {other:?}"),
        }
    }
    within("the script", move || script.join().unwrap());
    let control_sent = control_sent.recv_timeout(PATIENCE).unwrap();
    common::report(format!(
        "{REQUESTS} requests, {control_sent} control requests: {ok} ok, {refused} not ok"
    ));
    let twice: Vec<_> = replies.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    let missing: Vec<_> = (2..2 + REQUESTS)
        .filter(|tag| !replies.contains_key(tag))
        .collect();
    assert!(missing.is_empty(), "never answered: {missing:?}");
    assert!(answers.values().all(|&n| n == 1));
    assert_eq!(
        answers.len() as u64,
        control_sent,
        "control requests unanswered"
    );
    within("the connection's end", {
        let conn = Arc::new(conn);
        move || conn.join()
    })
    .expect("an orderly end");
}

#[test]
fn a_cancel_is_not_lost_when_the_outgoing_queue_is_full() {
    // Config::max_queued_bytes: "Replies and control packets are never
    // held back by it."
    let (conn, mut peer) = raw_with_extensions(
        Config::default()
            .name(unique_name("fq"))
            .max_queued_bytes(64 << 10)
            .max_queued_packets(64),
        7,
    );
    // The peer reads nothing for now: fill the socket, then the queue, to
    // its last packet, until it stays full.
    let mut fillers = Vec::new();
    let mut size = 4 << 10;
    loop {
        match conn.try_submit(ECHO, 0, &vec![0x42; size]) {
            Ok(pending) => fillers.push(pending),
            Err(Error::WouldBlock) => {
                size = 1;
                thread::sleep(ms(100));
                match conn.try_submit(ECHO, 0, b"") {
                    Err(Error::WouldBlock) => break,
                    Ok(pending) => fillers.push(pending),
                    Err(e) => panic!("{e:?}"),
                }
            }
            Err(e) => panic!("{e:?}"),
        }
        assert!(fillers.len() < 10_000, "the queue never filled");
    }
    // The caller gives up on one while the queue is full.
    let dropped = fillers.pop().unwrap();
    let dropped_tag = dropped.tag();
    drop(dropped);
    // The peer reads everything that comes, until nothing more does.
    peer.stream.set_read_timeout(Some(ms(500))).unwrap();
    let mut controls = Vec::new();
    let mut requests = 0;
    while let Ok(Some(packet)) = peer.try_recv() {
        match (packet.channel, packet.kind) {
            (CONTROL_CHANNEL, PacketKind::Request { rq_type, .. }) => {
                controls.push((rq_type, read_uints(&packet.payload)))
            }
            (0, PacketKind::Request { .. }) => requests += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(requests, fillers.len() + 1, "every request came");
    assert!(
        controls.contains(&(CANCEL, vec![0, dropped_tag])),
        "request {dropped_tag} was given up with the outgoing queue full, and its cancel was \
         never sent (control packets seen: {controls:?})"
    );
    drop(fillers);
    conn.abort();
}

#[test]
fn cancels_and_deadlines_in_ordinary_use_log_no_warnings() {
    capture();
    let (tx, rx) = mpsc::channel();
    let server_name = unique_name("lw");
    let (client, server) = pair_with(
        Config::default().name(unique_name("lW")),
        Config::default()
            .name(&server_name)
            .handler_threads(1)
            .handler(holding(tx, Arc::default())),
    );
    assert!(hello_done(&client));
    // One request runs; behind it, one is dropped and one's deadline
    // passes in the queue: what a caller that gives up does.
    let first = client.submit(HOLD, 300, b"").unwrap();
    let dropped = client.submit(WORK, 0, b"").unwrap();
    let timed = client.submit_timeout(WORK, 0, b"", ms(50)).unwrap();
    wait_for("both to queue", PATIENCE, || {
        server.stats().requests_waiting == 2
    });
    drop(dropped);
    assert!(timed.wait().unwrap_err().is_timeout());
    assert!(!rx.recv_timeout(PATIENCE).unwrap().1);
    first.wait_timeout(PATIENCE).unwrap();
    wait_for("the refusals", PATIENCE, || {
        server.stats().replies_failed == 2
    });
    let noisy: Vec<_> = logged_by(&server_name)
        .into_iter()
        .filter(|(_, level, _)| *level <= log::Level::Warn)
        .collect();
    assert!(
        noisy.is_empty(),
        "a request given up by its caller is logged as a warning at the peer: {noisy:?}"
    );
    close_both(&client, server);
}

#[test]
fn wait_cancelled_waits_its_timeout_on_a_request_already_answered() {
    // A handler answers at once and goes on in the background with its
    // request, using `wait_cancelled` as its sleep, as the doc suggests.
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let (client, server) = pair_with(
        Config::default().name(unique_name("wc")),
        Config::default()
            .name(unique_name("wC"))
            .handler(move |rq: Request| -> HandlerResult {
                let tx = tx.lock().unwrap().clone();
                let rq = rq.clone();
                thread::spawn(move || {
                    // Let the reply go first.
                    thread::sleep(ms(100));
                    let started = Instant::now();
                    let cancelled = rq.wait_cancelled(ms(300));
                    let _ = tx.send((cancelled, started.elapsed()));
                });
                Ok(().into())
            }),
    );
    assert!(hello_done(&client));
    client.call_timeout(ECHO, 0, b"", PATIENCE).unwrap();
    let (cancelled, waited) = rx.recv_timeout(PATIENCE).unwrap();
    assert!(!cancelled);
    assert!(
        waited >= ms(250),
        "wait_cancelled(300 ms) returned after {waited:?}, not cancelled"
    );
    close_both(&client, server);
}
