//! The extensions to the base protocol: the hello, remote cancel, deadlines,
//! ping and keepalive; their bytes on the wire; how they degrade against an
//! end without them; and that every request still ends exactly once on both
//! ends when cancels and deadlines race the replies.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    close_both, ms, pair_with, report, unique_name, wait_for, within, Gate, RawPeer, Rng, ECHO,
    LIMIT,
};
use packetstream::{
    Config, Disconnect, Error, HandlerResult, Packet, PacketConnection, PacketKind, Request,
    CONTROL_CHANNEL,
};

/// Request types of the test service.
const HOLD: u64 = 10;
const WORK: u64 = 11;

/// Waits until the hello has had its answer at `conn`.
fn hello_done(conn: &PacketConnection) -> bool {
    let mut known = None;
    wait_for("the hello's answer", LIMIT, || {
        known = conn.peer_extensions();
        known.is_some()
    });
    known.unwrap()
}

// ---------------------------------------------------------------------------
// The hello.

#[test]
fn the_hello_turns_extensions_on_between_two_ends_and_is_not_counted_as_a_request() {
    let (client, server) = pair_with(
        Config::default().name(unique_name("hc")),
        Config::default()
            .name(unique_name("hs"))
            .handler(common::echo),
    );
    assert_eq!(client.call(ECHO, 3, b"hi").unwrap().flags, 3);
    assert!(hello_done(&client));
    assert!(hello_done(&server));
    // Two hellos and their answers went by, beside the call.
    wait_for("the client's answer to the server's hello", LIMIT, || {
        client.stats().packets_out >= 3
    });
    let (c, s) = (client.stats(), server.stats());
    assert_eq!(c.packets_out, 3, "hello, hello's answer, the call");
    assert_eq!((c.requests_sent, c.responses_ok, c.pending), (1, 1, 0));
    assert_eq!(
        (s.requests_received, s.replies_ok, s.replies_failed),
        (1, 1, 0)
    );
    close_both(&client, &server);
}

#[test]
fn an_end_with_extensions_off_refuses_the_hello_and_nothing_else_changes() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sn = Arc::clone(&seen);
    let (client, server) = pair_with(
        Config::default().name(unique_name("oc")),
        Config::default()
            .name(unique_name("os"))
            .extensions(false)
            .handler(move |rq: Request| -> HandlerResult {
                // Without extensions: no cancel, no deadline.
                let cancelled = rq.wait_cancelled(ms(300));
                sn.lock().unwrap().push((cancelled, rq.time_left()));
                Ok(().into())
            }),
    );
    assert!(!hello_done(&client));
    assert!(!hello_done(&server));
    let pending = client
        .submit_timeout(HOLD, 0, b"", Duration::from_secs(60))
        .unwrap();
    wait_for("the handler to start", LIMIT, || {
        server.stats().in_progress == 1
    });
    drop(pending);
    wait_for("the handler to end", LIMIT, || {
        seen.lock().unwrap().len() == 1
    });
    assert_eq!(*seen.lock().unwrap(), [(false, None)]);
    // The ping is refused, and is an answer all the same.
    client.ping(LIMIT).unwrap();
    let s = server.stats();
    assert_eq!((s.requests_received, s.replies_failed), (1, 0));
    close_both(&client, &server);
}

#[test]
fn a_request_on_the_control_channel_is_refused_and_nothing_is_sent() {
    let (client, server) = pair_with(
        Config::default().name(unique_name("rc")),
        Config::default()
            .name(unique_name("rs"))
            .handler(common::echo),
    );
    let err = client.submit_on(CONTROL_CHANNEL, ECHO, 0, b"").unwrap_err();
    assert!(
        matches!(err, Error::ReservedChannel(CONTROL_CHANNEL)),
        "{err:?}"
    );
    assert!(!err.was_sent());
    let err = client.call_on(CONTROL_CHANNEL, ECHO, 0, b"").unwrap_err();
    assert!(matches!(err, Error::ReservedChannel(_)), "{err:?}");
    assert_eq!(client.stats().requests_sent, 0);
    close_both(&client, &server);
}

// ---------------------------------------------------------------------------
// Remote cancel.

/// A handler for HOLD that waits up to `flags` milliseconds for a cancel
/// and says on `tx` whether it came and how long it waited; WORK counts
/// itself in `ran` and answers at once.
fn holding(
    tx: mpsc::Sender<(u64, bool, Duration)>,
    ran: Arc<AtomicU64>,
) -> impl Fn(Request) -> HandlerResult + Send + Sync + 'static {
    let tx = Mutex::new(tx);
    move |rq: Request| {
        match rq.rq_type {
            HOLD => {
                let started = Instant::now();
                let cancelled = rq.wait_cancelled(ms(rq.flags));
                let _ = tx
                    .lock()
                    .unwrap()
                    .send((rq.tag, cancelled, started.elapsed()));
                if cancelled {
                    return Err("cancelled".into());
                }
            }
            _ => {
                ran.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(rq.payload.into())
    }
}

#[test]
fn a_dropped_request_stops_its_10_s_handler_at_once() {
    let (tx, rx) = mpsc::channel();
    let (client, server) = pair_with(
        Config::default().name(unique_name("cc")),
        Config::default()
            .name(unique_name("cs"))
            .handler(holding(tx, Arc::default())),
    );
    assert!(hello_done(&client));
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let pending = client.submit(HOLD, 10_000, b"").unwrap();
        wait_for("the handler to start", LIMIT, || {
            let s = server.stats();
            s.in_progress == 1 && s.requests_waiting == 0
        });
        let dropped = Instant::now();
        drop(pending);
        let (tag, cancelled, _) = rx.recv_timeout(LIMIT).expect("the handler to stop");
        latencies.push(dropped.elapsed());
        assert!(cancelled, "request {tag} ran its 10 s");
        wait_for("the reply", LIMIT, || server.stats().in_progress == 0);
    }
    latencies.sort();
    report(format!(
        "remote cancel of a 10 s handler, 20 times: stopped after median {:?}, max {:?}",
        latencies[10], latencies[19]
    ));
    // The replies to the cancelled requests came back and were dropped.
    let s = server.stats();
    assert_eq!((s.replies_ok, s.replies_failed), (0, 20));
    assert_eq!(client.stats().pending, 0);
    close_both(&client, &server);
}

#[test]
fn a_handler_waiting_for_a_cancel_is_released_when_its_answer_can_no_longer_be_sent() {
    // The client vanishes (its abort cuts the socket), then, on a second
    // pair, the serving end aborts: either way the handler's 120 s wait
    // ends at once, and the serving end's join does not wait it out.
    for serving_end_aborts in [false, true] {
        let (tx, rx) = mpsc::channel();
        let (started_tx, started) = mpsc::channel();
        let started_tx = Mutex::new(started_tx);
        let hold = holding(tx, Arc::default());
        let (client, server) = pair_with(
            Config::default().name(unique_name("vc")),
            Config::default()
                .name(unique_name("vs"))
                .handler(move |rq: Request| {
                    let _ = started_tx.lock().unwrap().send(());
                    hold(rq)
                }),
        );
        assert!(hello_done(&client));
        let pending = client.submit(HOLD, 120_000, b"").unwrap();
        // Running, not only taken in: after this end's abort, a request
        // still waiting for a handler thread does not run.
        started.recv_timeout(LIMIT).expect("the handler to start");
        if serving_end_aborts {
            server.abort();
        } else {
            client.abort();
        }
        let (_, cancelled, waited) = rx.recv_timeout(LIMIT).expect("the handler to stop");
        assert!(cancelled, "the wait ran out after {waited:?}");
        assert!(pending.wait_timeout(LIMIT).is_err());
        // A join that waited for the handler would take 120 s.
        let _ = within("the serving end's join", move || server.join());
        client.abort();
    }
}

#[test]
fn seven_dropped_requests_of_eight_do_not_run_and_close_does_not_wait_for_them() {
    // One handler thread: the first request runs, the others queue.
    let (tx, rx) = mpsc::channel();
    let ran = Arc::new(AtomicU64::new(0));
    let (client, server) = pair_with(
        Config::default().name(unique_name("7c")),
        Config::default()
            .name(unique_name("7s"))
            .handler_threads(1)
            .handler(holding(tx, Arc::clone(&ran))),
    );
    assert!(hello_done(&client));
    let first = client.submit(HOLD, 10_000, b"").unwrap();
    let queued: Vec<_> = (0..6)
        .map(|_| client.submit(WORK, 0, b"").unwrap())
        .collect();
    let kept = client.submit(WORK, 0, b"kept").unwrap();
    wait_for("the first to run and the rest to queue", LIMIT, || {
        let s = server.stats();
        s.in_progress == 8 && s.requests_waiting == 7
    });
    // The queued ones first: their cancels are read before the first ends.
    drop(queued);
    drop(first);
    let (_, cancelled, _) = rx.recv_timeout(LIMIT).expect("the first to stop");
    assert!(cancelled);
    assert_eq!(kept.wait_timeout(LIMIT).unwrap().payload, b"kept");
    assert_eq!(ran.load(Ordering::SeqCst), 1, "only the kept request ran");
    let s = server.stats();
    assert_eq!((s.replies_ok, s.replies_failed), (1, 7));
    let started = Instant::now();
    close_both(&client, &server);
    report(format!(
        "close after 7 of 8 requests dropped: {:?}",
        started.elapsed()
    ));
}

#[test]
fn a_cancel_that_loses_the_race_to_the_reply_changes_nothing() {
    // The reply is on its way when the cancel goes: the client drops the
    // reply, the server finds nothing to cancel, and both go on.
    let (client, server) = pair_with(
        Config::default().name(unique_name("lc")),
        Config::default()
            .name(unique_name("ls"))
            .handler(common::echo),
    );
    assert!(hello_done(&client));
    for round in 0..200u64 {
        let pending = client.submit(ECHO, round, b"").unwrap();
        wait_for("the reply to be sent", LIMIT, || {
            server.stats().replies_ok == round + 1
        });
        drop(pending);
    }
    assert_eq!(client.call(ECHO, 7, b"after").unwrap().payload, b"after");
    let (c, s) = (client.stats(), server.stats());
    assert_eq!(
        (s.requests_received, s.replies_ok, s.replies_failed),
        (201, 201, 0)
    );
    assert_eq!(c.pending, 0);
    assert_eq!(s.in_progress, 0);
    close_both(&client, &server);
}

// ---------------------------------------------------------------------------
// Deadlines.

#[test]
fn ten_thousand_requests_whose_1_ms_deadline_passed_in_the_queue_never_run() {
    const STALE: u64 = 10_000;
    const LIVE: u64 = 100;
    let gate = Gate::new();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let (g, r) = (gate.clone(), Arc::clone(&ran));
    // Room for every request and its deadline in the client's queue.
    let (client, server) = pair_with(
        Config::default()
            .name(unique_name("dc"))
            .max_queued_packets(4 * STALE as usize),
        Config::default()
            .name(unique_name("ds"))
            .handler_threads(1)
            .handler_queue(2 * STALE as usize)
            .handler(move |rq: Request| -> HandlerResult {
                if rq.rq_type == HOLD {
                    g.pass();
                } else {
                    r.lock().unwrap().push((rq.flags, rq.time_left()));
                }
                Ok(().into())
            }),
    );
    assert!(hello_done(&client));
    let hold = client.submit(HOLD, 0, b"").unwrap();
    gate.wait_entered(1, LIMIT);
    // The only handler thread is held: 10,000 requests with 1 ms deadlines
    // queue behind it, one live request with a minute to go in every 100.
    let mut stale = Vec::new();
    let mut live = Vec::new();
    for n in 0..STALE {
        stale.push(client.submit_timeout(WORK, n, b"", ms(1)).unwrap());
        if n % (STALE / LIVE) == 0 {
            live.push(
                client
                    .submit_timeout(WORK, STALE + n, b"", Duration::from_secs(60))
                    .unwrap(),
            );
        }
    }
    wait_for("every request to arrive", LIMIT * 3, || {
        server.stats().requests_received == 1 + STALE + LIVE
    });
    // Every 1 ms deadline has passed; the handler thread is let go.
    thread::sleep(ms(10));
    gate.open();
    hold.wait_timeout(LIMIT).unwrap();
    // The caller's wait ends at the deadline, or, if the refusal is in
    // already, with it.
    let (mut timeouts, mut refusals) = (0, 0);
    for pending in stale {
        match pending.wait() {
            Err(Error::Timeout { .. }) => timeouts += 1,
            Err(e @ Error::Failed { .. }) => {
                let reason = e.failure_reason().unwrap();
                assert!(reason.ends_with("before it ran"), "{reason}");
                refusals += 1;
            }
            other => panic!("a stale request: {other:?}"),
        }
    }
    assert_eq!(timeouts + refusals, STALE);
    for pending in live {
        pending.wait_timeout(LIMIT).unwrap();
    }
    let ran = ran.lock().unwrap().clone();
    let mut ids: Vec<u64> = ran.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    let want: Vec<u64> = (0..STALE)
        .filter(|n| n % (STALE / LIVE) == 0)
        .map(|n| STALE + n)
        .collect();
    assert_eq!(ids, want, "the handler ran exactly the live requests");
    assert!(ran
        .iter()
        .all(|(_, left)| left.is_some_and(|left| left > Duration::from_secs(30))));
    wait_for("every request answered", LIMIT, || {
        server.stats().in_progress == 0
    });
    let s = server.stats();
    assert_eq!(s.replies_ok, 1 + LIVE);
    assert_eq!(s.replies_failed, STALE, "each stale request refused once");
    report(format!(
        "{STALE} requests with 1 ms deadlines behind a held handler: the caller saw {timeouts} time out and {refusals} refused; the server refused {} unrun, and ran the {} live ones",
        s.replies_failed,
        ran.len()
    ));
    close_both(&client, &server);
}

#[test]
fn a_handler_reads_the_time_left_and_plain_requests_have_none() {
    let (client, server) = pair_with(
        Config::default().name(unique_name("tc")),
        Config::default()
            .name(unique_name("ts"))
            .handler(|rq: Request| -> HandlerResult {
                let left = rq.time_left().map_or(u64::MAX, |d| d.as_millis() as u64);
                Ok(left.into())
            }),
    );
    assert!(hello_done(&client));
    let left = client
        .call_timeout(ECHO, 0, b"", Duration::from_secs(20))
        .unwrap()
        .flags;
    assert!(left > 10_000 && left <= 20_000, "{left} ms left");
    assert_eq!(client.call(ECHO, 0, b"").unwrap().flags, u64::MAX);
    close_both(&client, &server);
}

// ---------------------------------------------------------------------------
// Races, with random timing.

#[test]
fn cancels_and_deadlines_racing_replies_end_every_request_exactly_once() {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 500;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    report(format!("race seed {seed}"));
    let handled = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&handled);
    let (client, server) = pair_with(
        Config::default().name(unique_name("xc")),
        Config::default()
            .name(unique_name("xs"))
            .handler_threads(3)
            .handler(move |rq: Request| -> HandlerResult {
                h.fetch_add(1, Ordering::SeqCst);
                // Works for `flags` microseconds, stopping at a cancel.
                if rq.wait_cancelled(Duration::from_micros(rq.flags)) {
                    return Err("cancelled".into());
                }
                Ok(rq.payload.into())
            }),
    );
    assert!(hello_done(&client));
    let client = Arc::new(client);
    let outcomes = Arc::new(Mutex::new([0u64; 5]));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let client = Arc::clone(&client);
            let outcomes = Arc::clone(&outcomes);
            thread::spawn(move || {
                let mut rng = Rng::new(seed.wrapping_mul(t + 1));
                for n in 0..PER_THREAD {
                    let work = rng.below(3000);
                    let wait = Duration::from_micros(rng.below(3000));
                    let payload = (t * PER_THREAD + n).to_be_bytes();
                    let kind = rng.below(3);
                    let slot = match kind {
                        // A deadline, which may pass anywhere on the way,
                        // even before there is room to queue it.
                        0 => match client
                            .submit_timeout(WORK, work, &payload, wait)
                            .and_then(|pending| pending.wait())
                        {
                            Ok(rsp) => {
                                assert_eq!(rsp.payload, payload);
                                0
                            }
                            Err(Error::Timeout { .. } | Error::WouldBlock) => 1,
                            Err(e @ Error::Failed { .. }) => {
                                let reason = e.failure_reason().unwrap();
                                assert!(
                                    reason.contains("deadline") || reason.contains("cancel"),
                                    "{reason}"
                                );
                                2
                            }
                            Err(e) => panic!("{e:?}"),
                        },
                        // A cancel after a random wait, the reply perhaps
                        // already in.
                        1 => {
                            let pending = client.submit(WORK, work, &payload).unwrap();
                            thread::sleep(wait);
                            drop(pending);
                            3
                        }
                        // Plain: always answered.
                        _ => {
                            let rsp = client
                                .submit(WORK, work, &payload)
                                .unwrap()
                                .wait_timeout(LIMIT)
                                .unwrap();
                            assert_eq!(rsp.payload, payload);
                            4
                        }
                    };
                    outcomes.lock().unwrap()[slot] += 1;
                }
            })
        })
        .collect();
    for worker in workers {
        within("a worker", move || worker.join()).unwrap();
    }
    let total = THREADS * PER_THREAD;
    let outcomes = *outcomes.lock().unwrap();
    assert_eq!(outcomes.iter().sum::<u64>(), total);
    // Every request arrived and was answered once, run or refused.
    wait_for("every request answered", LIMIT, || {
        let s = server.stats();
        s.requests_received == total && s.in_progress == 0
    });
    let s = server.stats();
    assert_eq!(s.replies_ok + s.replies_failed, total);
    assert!(handled.load(Ordering::SeqCst) <= total);
    assert_eq!(client.stats().pending, 0);
    report(format!(
        "{total} racing requests: deadline ok {}, timed out {}, refused {}; dropped {}; plain {}; server ran {} and refused {} unrun",
        outcomes[0],
        outcomes[1],
        outcomes[2],
        outcomes[3],
        outcomes[4],
        handled.load(Ordering::SeqCst),
        total - handled.load(Ordering::SeqCst)
    ));
    close_both(&client, &server);
}

// ---------------------------------------------------------------------------
// Ping and keepalive.

#[test]
fn ping_is_answered_by_any_peer_and_times_out_against_a_silent_one() {
    let (client, server) = pair_with(
        Config::default().name(unique_name("pc")),
        Config::default().name(unique_name("ps")),
    );
    let rtt = client.ping(LIMIT).unwrap();
    assert!(rtt < LIMIT);
    assert_eq!(client.stats().requests_sent, 0, "a ping is no request");
    close_both(&client, &server);
    assert!(matches!(client.ping(LIMIT), Err(Error::Closed)));

    // A raw peer that reads and never answers.
    let (conn, mut peer) = RawPeer::with(Config::default().name(unique_name("pq")));
    let err = conn.ping(ms(100)).unwrap_err();
    match &err {
        Error::Timeout {
            request: Some(id), ..
        } => assert_eq!((id.channel, id.rq_type), (CONTROL_CHANNEL, 1)),
        other => panic!("{other:?}"),
    }
    let ping = peer.recv_packet();
    assert_eq!(ping.channel, CONTROL_CHANNEL);
    assert!(matches!(ping.kind, PacketKind::Request { rq_type: 1, .. }));
    // Its late answer is dropped quietly.
    peer.send(&Packet {
        channel: CONTROL_CHANNEL,
        tag: ping.tag,
        kind: PacketKind::Response { ok: true, flags: 0 },
        payload: Vec::new(),
    });
    assert_eq!(conn.status().ended, None);
    conn.abort();
}

#[test]
fn keepalive_ends_a_connection_whose_peer_answers_nothing() {
    let (conn, mut peer) =
        RawPeer::with(Config::default().name(unique_name("ka")).keepalive(ms(100)));
    wait_for("the connection to end", LIMIT, || {
        conn.status().ended.is_some()
    });
    assert_eq!(conn.status().ended, Some(Disconnect::NoAnswer));
    // It had pinged before it gave up.
    let ping = peer.recv_packet();
    assert_eq!(ping.channel, CONTROL_CHANNEL);
    assert!(matches!(ping.kind, PacketKind::Request { rq_type: 1, .. }));
    let err = conn.close().unwrap_err();
    assert!(
        matches!(err, Error::ConnectionLost(Disconnect::NoAnswer)),
        "{err:?}"
    );
}

#[test]
fn keepalive_keeps_a_quiet_connection_to_a_live_peer() {
    let (client, server) = pair_with(
        Config::default().name(unique_name("kc")).keepalive(ms(30)),
        Config::default()
            .name(unique_name("ks"))
            .handler(common::echo)
            .keepalive(ms(30)),
    );
    // Quiet for ten keepalive periods: pinged, answered, still open.
    let quiet_until = Instant::now() + ms(300);
    while Instant::now() < quiet_until {
        thread::sleep(ms(10));
        assert_eq!(client.status().ended, None);
        assert_eq!(server.status().ended, None);
    }
    assert!(client.stats().packets_out > 0, "pings went");
    assert_eq!(client.call(ECHO, 1, b"still").unwrap().payload, b"still");
    close_both(&client, &server);
}

// ---------------------------------------------------------------------------
// The bytes on the wire, and a hostile peer on the control channel.

/// `hex` as bytes: pairs of hex digits, spaces ignored.
fn bytes(hex: &str) -> Vec<u8> {
    let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

#[test]
fn control_packets_have_the_bytes_of_the_wire_spec() {
    // The control channel, 0xFFFF_FFFF, is the BSUInt 8f ff ff ff 7f.
    let (conn, mut peer) = RawPeer::speaking_to(Config::default().name(unique_name("wv")), LIMIT);
    // Hello: length 10; tag 0; header 03 (request, has channel); channel;
    // rq_type 0 + 1; payload BSUInt version 1, BSUInt capabilities 7.
    assert_eq!(peer.recv_bytes(11), bytes("0a 00 03 8fffffff7f 01 01 07"));
    // Its answer, as a peer of this crate sends it: ok, capabilities 7.
    // Header 05: flags 0, ok bit 1, shifted past the two low bits; has
    // channel.
    peer.send_bytes(&bytes("09 00 05 8fffffff7f 01 07"));
    assert!(hello_done(&conn));

    // A request with a deadline of 1.5 s: first the deadline, tag 1 of the
    // control channel, rq_type 3 + 1, payload BSUInt channel 0, tag 2,
    // UInt32BE milliseconds left as it is written (1500, 00 00 05 dc, less
    // any time it waited to be written); then the request itself on
    // channel 0.
    let pending = conn
        .submit_timeout(7, 0, b"x", Duration::from_millis(1500))
        .unwrap();
    let _ = pending.wait_timeout(Duration::ZERO);
    let deadline = peer.recv_bytes(15);
    assert_eq!(deadline[..11], bytes("0e 01 03 8fffffff7f 04 00 02"));
    let ms = u32::from_be_bytes(deadline[11..].try_into().unwrap());
    assert!((1000..=1500).contains(&ms), "{ms} ms left");
    assert_eq!(peer.recv_bytes(5), bytes("04 02 02 08 78"));
    // Dropped unanswered: a cancel, tag 2, rq_type 2 + 1, payload channel
    // 0, tag 2.
    drop(pending);
    assert_eq!(peer.recv_bytes(11), bytes("0a 02 03 8fffffff7f 03 00 02"));

    // The peer's ping, tag 0 of its control channel, rq_type 1 + 1, is
    // answered ok and empty.
    peer.send_bytes(&bytes("08 00 03 8fffffff7f 02"));
    assert_eq!(peer.recv_bytes(8), bytes("07 00 05 8fffffff7f"));
    // A cancel of nothing in progress, and a deadline for a request that
    // never comes: each answered ok and empty.
    peer.send_bytes(&bytes("0a 01 03 8fffffff7f 03 00 63"));
    assert_eq!(peer.recv_bytes(8), bytes("07 01 05 8fffffff7f"));
    peer.send_bytes(&bytes("0e 02 03 8fffffff7f 04 00 63 00000001"));
    assert_eq!(peer.recv_bytes(8), bytes("07 02 05 8fffffff7f"));
    // An unknown control request and a truncated payload: not ok (header
    // 01: flags 0, ok bit 0, has channel), with a reason.
    for (tag, rq_type_plus_1, payload) in [(3u8, 0x0a_u8, &[][..]), (4, 0x03, &[0x80][..])] {
        let mut packet = vec![tag, 0x03, 0x8f, 0xff, 0xff, 0xff, 0x7f, rq_type_plus_1];
        packet.extend_from_slice(payload);
        packet.insert(0, packet.len() as u8);
        peer.send_bytes(&packet);
        let answer = peer.recv_packet();
        assert_eq!(
            (answer.channel, answer.tag),
            (CONTROL_CHANNEL, u64::from(tag))
        );
        assert!(
            matches!(
                answer.kind,
                PacketKind::Response {
                    ok: false,
                    flags: 0
                }
            ),
            "{answer:?}"
        );
        assert!(!answer.payload.is_empty());
    }
    assert_eq!(conn.status().ended, None);
    assert_eq!(
        conn.stats().requests_received,
        0,
        "control requests are not counted"
    );
    conn.abort();
}

#[test]
fn a_flood_of_control_requests_holds_no_memory_and_the_connection_goes_on() {
    let served = Arc::new(AtomicUsize::new(0));
    let s = Arc::clone(&served);
    let (conn, mut peer) = RawPeer::speaking_to(
        Config::default()
            .name(unique_name("fl"))
            .handler(move |rq: Request| -> HandlerResult {
                s.fetch_add(1, Ordering::SeqCst);
                Ok(rq.payload.into())
            }),
        LIMIT,
    );
    const FLOOD: u64 = 50_000;
    let writer_stream = peer.stream.try_clone().unwrap();
    let writer = thread::spawn(move || {
        use std::io::Write;
        let mut stream = writer_stream;
        let mut wire = Vec::new();
        for tag in 0..FLOOD {
            // Cancels of nothing and deadlines for requests that never
            // come, alternately, with tags that do not repeat.
            let (rq_type, mut payload) = if tag % 2 == 0 {
                (2, vec![0x00])
            } else {
                (3, vec![0x00])
            };
            // Targets on channel 0 from tag 1000 on: never a real request.
            payload.extend_from_slice(&common::bsuint(u128::from(tag + 1000)));
            if rq_type == 3 {
                // UInt32BE milliseconds.
                payload.extend_from_slice(&127u32.to_be_bytes());
            }
            Packet {
                channel: CONTROL_CHANNEL,
                tag,
                kind: PacketKind::Request { rq_type, flags: 0 },
                payload,
            }
            .encode_into(&mut wire);
        }
        // Then a real request, tag 5 on channel 0, with its deadline far
        // off.
        common::request(5, ECHO, 0, b"after").encode_into(&mut wire);
        stream.write_all(&wire)
    });
    // Every control request is answered; the real one is served.
    let mut answers = 0;
    let mut echoed = false;
    while answers < FLOOD || !echoed {
        let packet = peer.recv_packet();
        match (packet.channel, packet.kind) {
            (CONTROL_CHANNEL, PacketKind::Response { ok: true, .. }) => answers += 1,
            (0, PacketKind::Response { ok: true, .. }) => {
                assert_eq!(packet.payload, b"after");
                echoed = true;
            }
            (CONTROL_CHANNEL, PacketKind::Request { .. }) => {} // Its hello.
            other => panic!("{other:?}"),
        }
    }
    within("the writer", move || writer.join().unwrap()).unwrap();
    assert_eq!(served.load(Ordering::SeqCst), 1);
    assert_eq!(conn.status().ended, None);
    assert_eq!(conn.stats().in_progress, 0);
    conn.abort();
}
