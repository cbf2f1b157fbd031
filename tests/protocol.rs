//! Protocol behaviour seen on the wire, against a scripted raw peer: tags, ERQ, EOF, bad packets, logging.

mod common;

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;

use common::*;
use packetstream::{Config, Disconnect, Error, Packet, PacketConnection, PacketKind};

/// Collects log records so tests can check what was logged.
struct Capture(Mutex<Vec<(log::Level, String)>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((record.level(), record.args().to_string()));
    }
    fn flush(&self) {}
}

fn logs() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(capture).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
        capture
    })
}

fn logged(level: log::Level, needle: &str) -> bool {
    logs()
        .0
        .lock()
        .unwrap()
        .iter()
        .any(|(l, msg)| *l == level && msg.contains(needle))
}

fn join_within(conn: PacketConnection) -> packetstream::Result<()> {
    within("join", move || conn.join())
}

#[test]
fn channel_0_tags_start_at_2_and_are_never_reused() {
    let (conn, mut peer) = RawPeer::with(Config::default());
    let mut tags = Vec::new();
    for round in 0..3u64 {
        let pending: Vec<_> = (0..3)
            .map(|_| conn.submit(ECHO, round, b"").unwrap())
            .collect();
        for _ in 0..3 {
            let (_, rq) = peer.recv_until(|p| matches!(p.kind, PacketKind::Request { .. }));
            tags.push(rq.tag);
            peer.send(&response(rq.tag, true, 0, b""));
        }
        for p in pending {
            p.wait_timeout(LIMIT).unwrap();
        }
    }
    assert_eq!(tags, (2..11).collect::<Vec<u64>>());
    let on_7: Vec<_> = (0..2)
        .map(|_| conn.submit_on(7, ECHO, 0, b"").unwrap().tag())
        .collect();
    assert_eq!(on_7, [0, 1]);
    conn.abort();
}

#[test]
fn a_request_after_the_peers_erq_is_refused() {
    let (conn, mut peer) = RawPeer::with(server_config("erq"));
    peer.send(&request(2, ECHO, 0, b"before"));
    let (_, rsp) = peer.recv_until(|p| p.tag == 2);
    assert_eq!(rsp.kind, PacketKind::Response { ok: true, flags: 0 });
    peer.send(&Packet::erq());
    peer.send(&request(3, ECHO, 0, b"after"));
    let (_, rsp) = peer.recv_until(|p| p.tag == 3);
    assert_eq!(
        rsp.kind,
        PacketKind::Response {
            ok: false,
            flags: 0
        }
    );
    assert_eq!(rsp.payload, b"requests no longer allowed");
    // Our own requests still work: ERQ only stops the peer's.
    let pending = conn.submit(ECHO, 0, b"ours").unwrap();
    let (_, rq) = peer.recv_until(|p| matches!(p.kind, PacketKind::Request { .. }));
    peer.send(&response(rq.tag, true, 5, b""));
    assert_eq!(pending.wait_timeout(LIMIT).unwrap().flags, 5);
    peer.send(&Packet::eof());
    join_within(conn).unwrap();
}

#[test]
fn a_duplicate_in_flight_tag_is_refused_and_the_first_still_gets_its_reply() {
    let (conn, mut peer) = RawPeer::with(server_config("dup"));
    peer.send(&request(7, SLEEP, 1, b"200"));
    peer.send(&request(7, ECHO, 2, b"second"));
    let first = peer.recv().unwrap();
    assert_eq!(
        (first.tag, first.kind),
        (
            7,
            PacketKind::Response {
                ok: false,
                flags: 0
            }
        )
    );
    assert_eq!(first.payload, b"channel 0: tag already in use: 7");
    let second = peer.recv().unwrap();
    assert_eq!(
        (second.tag, second.kind),
        (7, PacketKind::Response { ok: true, flags: 1 })
    );
    assert_eq!(second.payload, b"200");
    // Once answered, the tag may be used again by the peer.
    peer.send(&request(7, ECHO, 3, b"again"));
    assert_eq!(
        peer.recv().unwrap().kind,
        PacketKind::Response { ok: true, flags: 3 }
    );
    peer.send(&Packet::eof());
    join_within(conn).unwrap();
}

#[test]
fn a_response_to_an_unknown_tag_is_logged_and_dropped() {
    logs();
    let (conn, mut peer) = RawPeer::with(Config::default().name("unknown-tag"));
    peer.send(&response(999, true, 0, b"stray"));
    let pending = conn.submit(ECHO, 0, b"").unwrap();
    let (_, rq) = peer.recv_until(|p| matches!(p.kind, PacketKind::Request { .. }));
    peer.send(&response(rq.tag, true, 8, b"real"));
    assert_eq!(pending.wait_timeout(LIMIT).unwrap().payload, b"real");
    assert!(logged(
        log::Level::Warn,
        "unknown-tag: dropped response to unknown request 0:999"
    ));
    conn.abort();
}

#[test]
fn a_late_response_after_cancel_is_dropped_quietly() {
    logs();
    let (conn, mut peer) = RawPeer::with(Config::default().name("cancelled"));
    let pending = conn.submit(ECHO, 0, b"").unwrap();
    let tag = pending.tag();
    pending.cancel();
    let (_, rq) = peer.recv_until(|p| matches!(p.kind, PacketKind::Request { .. }));
    assert_eq!(rq.tag, tag);
    peer.send(&response(tag, true, 0, b"late"));
    // The connection goes on: the next request is answered.
    let next = conn.submit(ECHO, 0, b"").unwrap();
    let (_, rq) = peer.recv_until(|p| matches!(p.kind, PacketKind::Request { .. }));
    peer.send(&response(rq.tag, true, 4, b""));
    assert_eq!(next.wait_timeout(LIMIT).unwrap().flags, 4);
    assert_eq!(conn.stats().pending, 0, "the cancelled entry is gone");
    assert!(logged(
        log::Level::Debug,
        &format!("cancelled: dropped response to cancelled request 0:{tag}")
    ));
    assert!(!logged(log::Level::Warn, "cancelled: dropped"));
    conn.abort();
}

#[test]
fn a_control_packet_that_is_not_eof_or_erq_ends_receiving() {
    let (conn, mut peer) = RawPeer::with(server_config("control"));
    let pending = conn.submit(ECHO, 0, b"").unwrap();
    peer.send(&Packet {
        channel: 0,
        tag: 5,
        kind: PacketKind::Control { flags: 0 },
        payload: vec![],
    });
    // Lost if it was written before the bad packet came, unsent if not.
    let res = pending.wait_timeout(LIMIT);
    assert!(
        matches!(
            res,
            Err(Error::ConnectionLost(Disconnect::Protocol) | Error::Unsent(Disconnect::Protocol))
        ),
        "{res:?}"
    );
    // This end still closes in order: its EOF goes out.
    let (_, eof) = peer.recv_until(|p| p.is_eof());
    assert!(eof.is_eof());
    match join_within(conn) {
        Err(Error::Malformed { reason }) => {
            assert_eq!(reason, "control packet that is neither EOF nor ERQ")
        }
        other => panic!("{other:?}"),
    }
}

/// Pending requests, then `fault` from the peer: every request ends in
/// exactly one outcome, `want`, and `join` reports `check`.
fn every_pending_request_fails(
    fault: impl FnOnce(&mut RawPeer),
    want: Disconnect,
    check: impl FnOnce(packetstream::Result<()>),
) {
    let (conn, mut peer) = RawPeer::with(Config::default());
    let pending: Vec<_> = (0..5)
        .map(|i| conn.submit(ECHO, i, b"x").unwrap())
        .collect();
    // Answer the first one, so the fault lands mid-conversation.
    let (_, rq) = peer.recv_until(|p| matches!(p.kind, PacketKind::Request { .. }));
    peer.send(&response(rq.tag, true, 0, b""));
    fault(&mut peer);
    let mut outcomes = pending.into_iter().map(|p| p.wait_timeout(LIMIT));
    assert!(outcomes.next().unwrap().is_ok());
    for res in outcomes {
        match res {
            Err(Error::ConnectionLost(why)) => assert_eq!(why, want),
            other => panic!("{other:?}"),
        }
    }
    assert!(conn.submit(ECHO, 0, b"").is_err());
    check(join_within(conn));
}

#[test]
fn a_malformed_packet_fails_what_is_pending() {
    every_pending_request_fails(
        |peer| peer.send_bytes(&[0xff; 12]),
        Disconnect::Protocol,
        |res| assert!(matches!(res, Err(Error::Malformed { .. })), "{res:?}"),
    );
}

#[test]
fn a_truncated_packet_fails_what_is_pending() {
    every_pending_request_fails(
        |peer| {
            peer.send_bytes(&wire(&response(3, true, 0, &[1; 100]))[..50]);
            peer.stream.shutdown(Shutdown::Write).unwrap();
        },
        Disconnect::Protocol,
        |res| match res {
            Err(Error::Malformed { reason }) => assert_eq!(reason, "stream ended inside a packet"),
            other => panic!("{other:?}"),
        },
    );
}

#[test]
fn an_io_error_fails_what_is_pending() {
    /// Reads from the channel until told to fail.
    struct Failing(mpsc::Receiver<Vec<u8>>, Vec<u8>);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.1.is_empty() {
                match self.0.recv_timeout(LIMIT) {
                    Ok(bytes) => self.1 = bytes,
                    Err(_) => return Err(io::Error::other("injected")),
                }
            }
            let n = buf.len().min(self.1.len());
            buf[..n].copy_from_slice(&self.1[..n]);
            self.1.drain(..n);
            Ok(n)
        }
    }
    let (tx, rx) = mpsc::channel();
    let conn =
        PacketConnection::new(Failing(rx, Vec::new()), io::sink(), Config::default()).unwrap();
    let pending: Vec<_> = (0..3).map(|_| conn.submit(ECHO, 0, b"").unwrap()).collect();
    tx.send(wire(&response(2, true, 0, b"one"))).unwrap();
    drop(tx);
    let mut outcomes = pending.into_iter().map(|p| p.wait_timeout(LIMIT));
    assert_eq!(outcomes.next().unwrap().unwrap().payload, b"one");
    // Written or not yet, when the read failed.
    for res in outcomes {
        assert!(
            matches!(
                res,
                Err(Error::ConnectionLost(Disconnect::Io(io::ErrorKind::Other))
                    | Error::Unsent(Disconnect::Io(io::ErrorKind::Other)))
            ),
            "{res:?}"
        );
    }
    match join_within(conn) {
        Err(Error::Io(e)) => assert_eq!(e.to_string(), "injected"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn close_sends_erq_then_replies_then_eof_and_waits_for_the_peers_eof() {
    let (conn, mut peer) = RawPeer::with(server_config("order"));
    for tag in 2..5 {
        peer.send(&request(tag, SLEEP, tag, b"100"));
    }
    wait_for("three requests in progress", LIMIT, || {
        conn.stats().in_progress == 3
    });
    let conn = Arc::new(conn);
    let (done_tx, done_rx) = mpsc::channel();
    let closer = {
        let conn = Arc::clone(&conn);
        thread::spawn(move || done_tx.send(conn.close()).unwrap())
    };
    let erq = peer.recv().unwrap();
    assert!(erq.is_erq(), "{erq:?}");
    // Every request in progress is answered before EOF.
    let mut answered: Vec<_> = (0..3)
        .map(|_| {
            let reply = peer.recv().unwrap();
            assert_eq!(
                reply.kind,
                PacketKind::Response {
                    ok: true,
                    flags: reply.tag
                }
            );
            reply.tag
        })
        .collect();
    answered.sort_unstable();
    assert_eq!(answered, [2, 3, 4]);
    let eof = peer.recv().unwrap();
    assert!(eof.is_eof(), "{eof:?}");
    // Our EOF is out, but close waits for the peer's.
    assert!(
        done_rx.recv_timeout(ms(100)).is_err(),
        "close returned before the peer's EOF"
    );
    peer.send(&Packet::eof());
    done_rx
        .recv_timeout(LIMIT)
        .expect("close returns after the peer's EOF")
        .unwrap();
    closer.join().unwrap();
    assert_eq!(
        peer.recv(),
        None,
        "nothing after EOF, and the stream is closed"
    );
}

#[test]
fn after_the_peers_eof_a_server_answers_what_is_in_progress_then_sends_eof() {
    let (conn, mut peer) = RawPeer::with(server_config("drain"));
    for tag in 2..5 {
        peer.send(&request(tag, SLEEP, tag, b"50"));
    }
    peer.send(&Packet::eof());
    let mut answered = Vec::new();
    loop {
        let packet = peer.recv().expect("EOF comes last");
        if packet.is_eof() {
            break;
        }
        if let PacketKind::Response { ok: true, flags } = packet.kind {
            answered.push(flags);
        }
    }
    answered.sort();
    assert_eq!(answered, [2, 3, 4]);
    join_within(conn).unwrap();
}

#[test]
fn packets_are_logged_at_trace_level() {
    logs();
    let (conn, mut peer) = RawPeer::with(server_config("traced"));
    peer.send(&request(2, ECHO, 0x2a, b"hi"));
    peer.recv().unwrap();
    assert!(logged(
        log::Level::Trace,
        "<== request 0:2 rq_type=1 flags=0x2a len=2"
    ));
    assert!(logged(
        log::Level::Trace,
        "==> reply 0:2 ok=true flags=0x2a len=2"
    ));
    peer.send(&Packet::eof());
    join_within(conn).unwrap();
}
