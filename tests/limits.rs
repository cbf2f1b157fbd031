//! Bounded memory and liveness against peers that never read, send packets over the limit, go silent, sit idle or crawl.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    assert_threads_gone, bsuint, echo, isolated, ms, proc_status, report, request, serial, threads,
    threads_named, unique_name, wait_for, wire, within, RawPeer, ECHO, LIMIT,
};
use packetstream::{
    Config, Disconnect, Error, HandlerResult, Packet, PacketConnection, PacketKind, Request,
    Server, ServerConfig,
};

/// BIG: a reply of the payload's decimal number of bytes.
const BIG: u64 = 7;

fn big_replies(rq: Request) -> HandlerResult {
    let len: usize = std::str::from_utf8(&rq.payload)?.parse()?;
    Ok(vec![0x42; len].into())
}

// ---------------------------------------------------------------------------
// Memory.

#[test]
fn a_peer_that_never_reads_cannot_grow_memory_past_the_budget() {
    const TEST: &str = "a_peer_that_never_reads_cannot_grow_memory_past_the_budget";
    if !isolated(TEST, LIMIT * 4) {
        return;
    }
    const REQUESTS: u64 = 10_000;
    const REPLY: usize = 256 << 10;
    const BUDGET: u64 = 8 << 20;
    let (a, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(LIMIT)).unwrap();
    // Default settings: a budget of 8 MiB. The peer is scripted: no hello.
    let config = Config::default().handler(big_replies).extensions(false);
    let conn = PacketConnection::from_unix_stream(a, config).unwrap();
    let base = proc_status("VmRSS");
    let hwm_before = {
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        proc_status("VmHWM")
    };
    // 10,000 requests for 256 KiB replies, and nothing read.
    let mut writer = peer.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let mut bytes = Vec::new();
        for tag in 2..2 + REQUESTS {
            bytes.extend(wire(&request(tag, BIG, 0, REPLY.to_string().as_bytes())));
        }
        writer.write_all(&bytes)
    });
    within("the requests sent", move || sender.join().unwrap()).unwrap();
    wait_for("every request answered or refused", LIMIT, || {
        let stats = conn.stats();
        stats.replies_ok + stats.replies_failed == REQUESTS
    });
    let stats = conn.stats();
    let grown = proc_status("VmHWM").saturating_sub(hwm_before.max(base));
    report(format!(
        "peer that never reads, {REQUESTS} requests for {} KiB replies: peak RSS +{} KiB (budget {} KiB); {} replies queued ({} KiB), {} refused busy",
        REPLY >> 10,
        grown,
        BUDGET >> 10,
        stats.queued_replies,
        stats.queued_bytes >> 10,
        stats.busy_refusals
    ));
    assert!(
        grown <= (BUDGET + (16 << 20)) >> 10,
        "RSS grew by {grown} KiB"
    );
    assert!(stats.busy_refusals > 0);
    // The peer reads at last: every request ends once, ok or busy.
    let (mut ok, mut busy) = (0, 0);
    let mut tags = std::collections::BTreeSet::new();
    let reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = vec![0; 1 << 16];
        while ok + busy < REQUESTS {
            let n = peer.read(&mut chunk).expect("read in time");
            assert!(n > 0, "stream ended with {ok} ok and {busy} busy");
            buf.extend_from_slice(&chunk[..n]);
            let mut used = 0;
            while let Some((packet, n)) = Packet::decode(&buf[used..], 1 << 20).unwrap() {
                used += n;
                assert!(tags.insert(packet.tag), "tag {} answered twice", packet.tag);
                match packet.kind {
                    PacketKind::Response { ok: true, .. } => {
                        assert_eq!(packet.payload.len(), REPLY);
                        ok += 1;
                    }
                    PacketKind::Response { ok: false, flags } => {
                        assert_eq!(flags, packetstream::BUSY_FLAGS);
                        busy += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            buf.drain(..used);
        }
        (ok, busy)
    });
    let (ok, busy) = within("the peer reading", move || reader.join().unwrap());
    report(format!("then read: {ok} ok, {busy} busy"));
    assert_eq!(ok + busy, REQUESTS);
    conn.abort();
}

/// A request over `max_packet_len` is refused with "packet too large" and
/// its body skipped as it comes, never held: a 256 MiB body against a 1 MiB
/// limit raises peak memory by less than 16 MiB. The request after it is
/// answered, and the connection closes in order.
#[test]
fn an_oversize_request_is_refused_and_skipped_unbuffered_and_the_connection_goes_on() {
    const TEST: &str =
        "an_oversize_request_is_refused_and_skipped_unbuffered_and_the_connection_goes_on";
    if !isolated(TEST, LIMIT * 4) {
        return;
    }
    const BODY: usize = 256 << 20;
    let name = unique_name("ov");
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(&name)
            .max_packet_len(1 << 20)
            .handler(echo),
    );
    let hwm_before = proc_status("VmHWM");
    // The head of a request with a 256 MiB payload, then the payload in
    // 64 KiB pieces, then a small request.
    let head = wire(&request(5, ECHO, 0, b""));
    let prefix = bsuint((head.len() - 1 + BODY) as u128);
    let mut writer = peer.stream.try_clone().unwrap();
    let feeder = thread::spawn(move || {
        writer.write_all(&prefix)?;
        writer.write_all(&head[1..])?;
        let piece = vec![0x5a; 64 << 10];
        for _ in 0..BODY / piece.len() {
            writer.write_all(&piece)?;
        }
        writer.write_all(&wire(&request(6, ECHO, 0, b"after")))
    });
    let refusal = peer.recv_packet();
    assert_eq!(
        (refusal.tag, refusal.kind),
        (
            5,
            PacketKind::Response {
                ok: false,
                flags: 0
            }
        )
    );
    let reason = String::from_utf8(refusal.payload).unwrap();
    assert!(reason.starts_with("packet too large"), "{reason}");
    let reply = peer.recv_packet();
    assert_eq!((reply.tag, reply.payload.as_slice()), (6, &b"after"[..]));
    assert_eq!(reply.kind, PacketKind::Response { ok: true, flags: 0 });
    within("the peer's writes", move || feeder.join().unwrap()).unwrap();
    let grown = proc_status("VmHWM") - hwm_before;
    report(format!(
        "oversize: {} MiB request skipped; peak RSS grew {grown} kB",
        BODY >> 20
    ));
    assert!(grown < 16 * 1024, "peak RSS grew {grown} kB");
    let stats = conn.stats();
    assert_eq!(stats.requests_received, 2);
    assert!(stats.bytes_in > BODY as u64);
    // The connection still closes in order.
    peer.send(&Packet::eof());
    conn.close_timeout(LIMIT).expect("orderly close");
    assert_threads_gone(&name, LIMIT);
}

// ---------------------------------------------------------------------------
// Liveness timeouts. Each test writes and reads the raw peer's socket by
// hand.

fn ended(conn: &PacketConnection) -> Option<Disconnect> {
    conn.status().ended
}

#[test]
fn a_peer_silent_inside_a_packet_ends_the_connection_as_silent() {
    let (
        conn,
        RawPeer {
            stream: mut peer, ..
        },
    ) = RawPeer::with(
        Config::default()
            .name(unique_name("silent"))
            .packet_timeout(ms(300)),
    );
    let pending = conn.submit(1, 0, b"q").unwrap();
    // Half of a packet, then nothing.
    let bytes = wire(&request(2, 1, 0, &[7; 100]));
    peer.write_all(&bytes[..50]).unwrap();
    wait_for("the connection to end", LIMIT, || ended(&conn).is_some());
    assert_eq!(ended(&conn), Some(Disconnect::Silent));
    let res = pending.wait_timeout(LIMIT);
    assert!(
        matches!(
            res,
            Err(Error::ConnectionLost(Disconnect::Silent) | Error::Unsent(Disconnect::Silent))
        ),
        "{res:?}"
    );
    assert!(matches!(
        within("close", move || conn.close()),
        Err(Error::ConnectionLost(Disconnect::Silent))
    ));
}

#[test]
fn a_peer_that_pauses_between_packets_is_not_silent() {
    let (
        conn,
        RawPeer {
            stream: mut peer, ..
        },
    ) = RawPeer::with(
        Config::default()
            .name(unique_name("pause"))
            .packet_timeout(ms(200))
            .handler(common::echo),
    );
    // Whole packets with pauses longer than the packet timeout between them,
    // and one packet sent slowly, a byte at a time but never silent for long.
    for tag in 2..5 {
        peer.write_all(&wire(&request(tag, 1, 0, b"x"))).unwrap();
        thread::sleep(ms(400));
    }
    for byte in wire(&request(5, 1, 0, b"slow")) {
        peer.write_all(&[byte]).unwrap();
        thread::sleep(ms(50));
    }
    let mut got = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = [0; 4096];
    while got.len() < 4 {
        let n = peer.read(&mut chunk).expect("replies in time");
        buf.extend_from_slice(&chunk[..n]);
        while let Some((packet, n)) = Packet::decode(&buf, 1 << 20).unwrap() {
            buf.drain(..n);
            got.push(packet.tag);
        }
    }
    assert_eq!(got, [2, 3, 4, 5]);
    assert_eq!(ended(&conn), None);
    conn.abort();
}

/// The read timeouts are kept by the keeper thread, not by a timeout on the
/// socket's reads, which would arm a kernel timer at each read that blocks:
/// the socket keeps no read timeout, and a silent peer still ends the
/// connection.
#[test]
fn read_timeouts_are_kept_without_a_timeout_on_the_socket() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    let kept = a.try_clone().unwrap();
    let conn = PacketConnection::from_unix_stream(
        a,
        Config::default()
            .name(unique_name("notimer"))
            .packet_timeout(ms(200))
            .extensions(false),
    )
    .unwrap();
    assert_eq!(kept.read_timeout().unwrap(), None);
    // A length prefix, then nothing.
    peer.write_all(&[0x05]).unwrap();
    wait_for("the connection to end", LIMIT, || ended(&conn).is_some());
    assert_eq!(ended(&conn), Some(Disconnect::Silent));
    assert_eq!(kept.read_timeout().unwrap(), None);
    conn.abort();
}

#[test]
fn an_idle_connection_ends_as_idle_but_not_while_a_request_is_pending() {
    // Pending: the peer holds our request for twice the idle timeout, then
    // answers; the connection is not idle meanwhile.
    let (
        conn,
        RawPeer {
            stream: mut peer, ..
        },
    ) = RawPeer::with(
        Config::default()
            .name(unique_name("idle"))
            .idle_timeout(ms(300)),
    );
    let pending = conn.submit(1, 0, b"q").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0; 4096];
    let tag = loop {
        let n = peer.read(&mut chunk).unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if let Some((packet, _)) = Packet::decode(&buf, 1 << 20).unwrap() {
            break packet.tag;
        }
    };
    thread::sleep(ms(700));
    assert_eq!(ended(&conn), None, "idle while a request was pending");
    peer.write_all(&wire(&common::response(tag, true, 0, b"a")))
        .unwrap();
    assert_eq!(pending.wait_timeout(LIMIT).unwrap().payload, b"a");
    // Now nothing is pending and nothing comes.
    wait_for("the connection to end", LIMIT, || ended(&conn).is_some());
    assert_eq!(ended(&conn), Some(Disconnect::Idle));
    assert!(matches!(conn.submit(1, 0, b""), Err(Error::Closed)));
}

#[test]
fn a_peer_that_stops_reading_ends_the_connection_as_stalled() {
    let (conn, RawPeer { stream: peer, .. }) = RawPeer::with(
        Config::default()
            .name(unique_name("stall"))
            .stall_timeout(ms(300)),
    );
    // Requests until the socket is full and the writer stalls; nothing read.
    let mut pending = Vec::new();
    let payload = vec![1u8; 64 << 10];
    while ended(&conn).is_none() && pending.len() < 4096 {
        match conn.try_submit(1, 0, &payload) {
            Ok(p) => pending.push(p),
            Err(Error::WouldBlock) => thread::sleep(ms(20)),
            Err(e) => {
                assert!(matches!(e, Error::Closed), "{e:?}");
                break;
            }
        }
    }
    wait_for("the connection to end", LIMIT, || ended(&conn).is_some());
    assert_eq!(ended(&conn), Some(Disconnect::Stalled));
    for p in pending {
        let res = p.wait_timeout(LIMIT);
        assert!(
            matches!(
                res,
                Err(Error::ConnectionLost(Disconnect::Stalled) | Error::Unsent(Disconnect::Stalled))
            ),
            "{res:?}"
        );
    }
    drop(peer);
    assert!(matches!(
        within("close", move || conn.close()),
        Err(Error::ConnectionLost(Disconnect::Stalled))
    ));
}

#[test]
fn timeouts_set_on_pipes_are_not_enforced_and_break_nothing() {
    let (a_read, b_write) = std::io::pipe().unwrap();
    let (b_read, a_write) = std::io::pipe().unwrap();
    let timeouts = |config: Config| {
        config
            .packet_timeout(ms(50))
            .idle_timeout(ms(50))
            .stall_timeout(ms(50))
    };
    let a = PacketConnection::new(a_read, a_write, timeouts(Config::default())).unwrap();
    let b = PacketConnection::new(
        b_read,
        b_write,
        timeouts(Config::default()).handler(common::echo),
    )
    .unwrap();
    thread::sleep(ms(300));
    assert_eq!((ended(&a), ended(&b)), (None, None));
    assert_eq!(a.call_timeout(1, 0, b"hi", LIMIT).unwrap().payload, b"hi");
    within("closing both", move || {
        a.close().unwrap();
        b.join().unwrap();
    });
}

// ---------------------------------------------------------------------------
// Queue depths and the low-water mark.

#[test]
fn stats_show_the_queue_depths_and_wait_drained_waits_for_the_low_water_mark() {
    let (
        conn,
        RawPeer {
            stream: mut peer, ..
        },
    ) = RawPeer::with(
        Config::default()
            .name(unique_name("depth"))
            .max_queued_bytes(1 << 20)
            .low_queued_bytes(64 << 10),
    );
    let payload = vec![3u8; 32 << 10];
    let mut pending = Vec::new();
    // Fill to the high mark; the peer reads nothing.
    loop {
        match conn.try_submit(1, 0, &payload) {
            Ok(p) => pending.push(p),
            Err(Error::WouldBlock) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    let stats = conn.stats();
    assert!(
        stats.queued_bytes > 0 && stats.queued_packets > 0,
        "{stats:?}"
    );
    assert_eq!(stats.queued_replies, 0);
    assert!(matches!(
        conn.wait_drained(ms(100)),
        Err(Error::Timeout { .. })
    ));
    // The peer reads everything: the queue drains to the low mark.
    let reader = thread::spawn(move || {
        let mut chunk = vec![0; 1 << 16];
        let mut total = 0;
        while let Ok(n) = peer.read(&mut chunk) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    conn.wait_drained(LIMIT).unwrap();
    assert!(conn.stats().queued_bytes <= 64 << 10);
    drop(pending);
    conn.abort();
    within("the reader", move || reader.join().unwrap());
}

// ---------------------------------------------------------------------------
// A server under a slow-loris attack.

/// Calls of a well-behaved client for `secs`: their latencies.
fn good_client(addr: std::net::SocketAddr, secs: Duration) -> Vec<Duration> {
    let conn =
        PacketConnection::connect_tcp(addr, Config::default().name(unique_name("good"))).unwrap();
    let mut lat = Vec::new();
    let until = Instant::now() + secs;
    while Instant::now() < until {
        let t0 = Instant::now();
        conn.call_timeout(1, 0, b"ping", LIMIT).unwrap();
        lat.push(t0.elapsed());
    }
    conn.close_timeout(LIMIT).unwrap();
    lat
}

fn pct(lat: &mut [Duration], p: f64) -> Duration {
    lat.sort();
    lat[((lat.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn a_server_reclaims_slow_loris_clients_and_keeps_serving_the_others() {
    let _serial = serial();
    const LORIS: usize = 500;
    let packet_timeout = ms(3000);
    let name = unique_name("sl");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::serve_tcp(
        listener,
        ServerConfig::new(Config::default().name(&name).inline_handler(common::echo))
            .packet_timeout(packet_timeout),
    )
    .unwrap();
    let threads_before = threads();
    let rss_before = proc_status("VmRSS");

    let mut quiet = good_client(addr, ms(500));

    // 500 clients that connect, send half a packet and wait.
    let half = {
        let bytes = wire(&request(2, 1, 0, &[9; 200]));
        bytes[..100].to_vec()
    };
    let started = Instant::now();
    let loris: Vec<TcpStream> = (0..LORIS)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&half).unwrap();
            s
        })
        .collect();
    // The first may be reclaimed before the last is accepted.
    let (mut threads_peak, mut rss_peak, mut held) = (0, 0, 0);
    wait_for("every client accepted", LIMIT, || {
        threads_peak = threads_peak.max(threads());
        rss_peak = rss_peak.max(proc_status("VmRSS"));
        held = held.max(server.connections());
        server.accepted() > LORIS as u64
    });
    // Served meanwhile, then every loris reclaimed.
    let mut attacked = good_client(addr, ms(500));
    wait_for(
        "the stalled clients reclaimed",
        packet_timeout + LIMIT,
        || server.connections() == 0,
    );
    let reclaimed = started.elapsed();
    for mut s in loris {
        // Each saw the server end: ERQ and EOF, then the end of the stream.
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    report(format!(
        "slow loris: {LORIS} clients holding half a packet, at most {held} at once, all reclaimed {:.2} s after they came (packet timeout {packet_timeout:?}); threads {threads_before} -> {threads_peak}; RSS {rss_before} -> {rss_peak} kB; good client p50/p99 {:?}/{:?} alone, {:?}/{:?} under attack ({} and {} calls)",
        reclaimed.as_secs_f64(),
        pct(&mut quiet, 0.5),
        pct(&mut quiet, 0.99),
        pct(&mut attacked, 0.5),
        pct(&mut attacked, 0.99),
        quiet.len(),
        attacked.len(),
    ));
    // Bounded: two threads a connection, and the pool.
    assert!(
        threads_peak <= threads_before + 2 * LORIS as u64 + 16,
        "{threads_before} -> {threads_peak} threads"
    );
    assert!(!attacked.is_empty());
    within("stopping", move || server.stop_timeout(LIMIT).unwrap());
    wait_for("the server's threads to end", LIMIT, || {
        threads_named(&name).is_empty()
    });
}
