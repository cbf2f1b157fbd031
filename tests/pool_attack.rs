//! The handler pool: a request queued while the awake handler threads are
//! busy in slow handlers starts as soon as a thread is free, on a
//! connection's own pool and on a server's shared pool; nothing is lost
//! and every thread ends.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::thread;

use common::{ms, pair_with, threads_named, unique_name, wait_for, Gate, ECHO, HOLD, LIMIT};
use packetstream::{
    Config, HandlerResult, Packet, PacketConnection, Reply, Request, Server, ServerConfig,
};

/// HOLD waits at its gate (the payload's first byte picks the gate), ECHO
/// echoes.
fn gated(gates: Arc<Vec<Gate>>) -> impl Fn(Request) -> HandlerResult + Send + Sync + 'static {
    move |rq: Request| {
        if rq.rq_type == HOLD {
            gates[usize::from(rq.payload[0])].pass();
        }
        Ok(Reply {
            flags: rq.flags,
            payload: rq.payload,
        })
    }
}

fn quick_calls(client: &PacketConnection, n: usize, what: &str) {
    let pending: Vec<_> = (0..n)
        .map(|i| client.submit(ECHO, i as u64, &[9]).unwrap())
        .collect();
    for (i, p) in pending.into_iter().enumerate() {
        let rsp = p
            .wait_timeout(LIMIT)
            .unwrap_or_else(|e| panic!("{what}: quick request {i} behind held ones: {e}"));
        assert_eq!(rsp.flags, i as u64);
    }
}

#[test]
fn a_connections_pool_serves_quick_requests_while_all_but_one_thread_is_held() {
    for threads in [2usize, 3, 5] {
        let name = unique_name("pa");
        let gates: Arc<Vec<Gate>> = Arc::new((0..threads).map(|_| Gate::new()).collect());
        let (client, server) = pair_with(
            Config::default().name(format!("{name}c")),
            Config::default()
                .name(&name)
                .handler(gated(Arc::clone(&gates)))
                .handler_threads(threads),
        );
        // All but one thread held, each by its own gate, one at a time
        // with no other traffic between.
        let mut held = Vec::new();
        for g in 0..threads - 1 {
            held.push(client.submit(HOLD, 0, &[g as u8]).unwrap());
            gates[g].wait_entered(1, LIMIT);
            // A single quick request with nothing after it.
            quick_calls(&client, 1, &format!("{threads} threads, {} held", g + 1));
        }
        // A burst.
        quick_calls(&client, 200, &format!("{threads} threads, burst"));
        // The last thread held too: a quick one waits, and starts once one
        // gate opens while the others stay shut.
        held.push(client.submit(HOLD, 0, &[(threads - 1) as u8]).unwrap());
        gates[threads - 1].wait_entered(1, LIMIT);
        let quick = client.submit(ECHO, 7, b"q").unwrap();
        thread::sleep(ms(20));
        assert!(!quick.is_ready(), "every thread is held");
        gates[0].open();
        assert_eq!(quick.wait_timeout(LIMIT).unwrap().flags, 7);
        quick_calls(&client, 50, &format!("{threads} threads, one freed"));
        for g in gates.iter() {
            g.open();
        }
        for p in held {
            p.wait_timeout(LIMIT).unwrap();
        }
        common::close_both(&client, &server);
        wait_for("the pool's threads to end", LIMIT, || {
            threads_named(&format!("{name}:")).is_empty()
        });
    }
}

#[test]
fn a_servers_shared_pool_serves_other_clients_while_one_holds_threads() {
    let name = unique_name("ps");
    let gates: Arc<Vec<Gate>> = Arc::new((0..3).map(|_| Gate::new()).collect());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::serve_tcp(
        listener,
        ServerConfig::new(
            Config::default()
                .name(&name)
                .handler(gated(Arc::clone(&gates))),
        )
        .handler_threads(3),
    )
    .unwrap();
    let holder =
        PacketConnection::connect_tcp(addr, Config::default().name(format!("{name}h"))).unwrap();
    let clients: Vec<_> = (0..60)
        .map(|k| {
            PacketConnection::connect_tcp(addr, Config::default().name(format!("{name}c{k}")))
                .unwrap()
        })
        .collect();
    let mut held = Vec::new();
    for g in 0..2u8 {
        held.push(holder.submit(HOLD, 0, &[g]).unwrap());
        gates[usize::from(g)].wait_entered(1, LIMIT);
        // One quick request from one client, nothing else on the wire.
        quick_calls(&clients[usize::from(g)], 1, "one held");
    }
    // Many clients at once, each a burst, while two of three threads hold.
    thread::scope(|s| {
        for c in &clients {
            s.spawn(move || quick_calls(c, 20, "many clients"));
        }
    });
    // The third held too; one frees up.
    held.push(holder.submit(HOLD, 0, &[2]).unwrap());
    gates[2].wait_entered(1, LIMIT);
    let quick = clients[5].submit(ECHO, 3, b"q").unwrap();
    gates[1].open();
    assert_eq!(quick.wait_timeout(LIMIT).unwrap().flags, 3);
    for g in gates.iter() {
        g.open();
    }
    for p in held {
        p.wait_timeout(LIMIT).unwrap();
    }
    for c in &clients {
        c.close_timeout(LIMIT).unwrap();
    }
    holder.close_timeout(LIMIT).unwrap();
    server.stop_timeout(LIMIT).unwrap();
    wait_for("the server's threads to end", LIMIT, || {
        threads_named(&name).is_empty()
    });
}

/// A peer that sends many requests and reads nothing is refused as busy
/// once the replies owed reach the budget, each request answered once; once
/// it reads, it is served again.
#[test]
fn a_peer_that_stops_reading_is_refused_as_busy_and_served_again_once_it_reads() {
    use common::{request, RawPeer};
    use packetstream::{PacketKind, BUSY_FLAGS};
    const N: u64 = 3000;
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("budget"))
            .handler(|rq: Request| -> HandlerResult {
                Ok(vec![b'r'; 2048 + rq.payload.len()].into())
            })
            .handler_threads(4)
            .max_queued_bytes(4096),
    );
    let mut writer = peer.stream.try_clone().unwrap();
    let send = thread::spawn(move || {
        let mut bytes = Vec::new();
        for tag in 0..N {
            request(tag, ECHO, 0, b"").encode_into(&mut bytes);
        }
        use std::io::Write;
        writer.write_all(&bytes).unwrap();
        writer
    });
    wait_for("every request to be received", LIMIT, || {
        let s = conn.stats();
        s.requests_received == N && s.in_progress == 0
    });
    let stats = conn.stats();
    assert!(stats.busy_refusals > 0, "{stats:?}");
    assert!(
        conn.status().ended.is_none(),
        "cut off: {:?}",
        conn.status()
    );
    let mut seen = vec![0u32; N as usize];
    let (mut ok, mut busy) = (0, 0);
    for _ in 0..N {
        let p = peer.recv_packet();
        let PacketKind::Response { ok: is_ok, flags } = p.kind else {
            panic!("not a reply: {p:?}");
        };
        seen[p.tag as usize] += 1;
        if is_ok {
            ok += 1;
        } else {
            assert_eq!(
                flags,
                BUSY_FLAGS,
                "{:?}",
                String::from_utf8_lossy(&p.payload)
            );
            busy += 1;
        }
    }
    assert!(
        seen.iter().all(|&n| n == 1),
        "a request answered other than once"
    );
    assert!(busy > 0 && ok > 0, "ok {ok}, busy {busy}");
    let mut writer = send.join().unwrap();
    // Reading again: served again.
    for tag in N..N + 200 {
        use std::io::Write;
        writer
            .write_all(&common::wire(&request(tag, ECHO, 0, b"x")))
            .unwrap();
        let p = peer.recv_packet();
        assert_eq!(p.tag, tag);
        assert!(
            matches!(p.kind, PacketKind::Response { ok: true, .. }),
            "request {tag} after reading: {:?} {}",
            p.kind,
            String::from_utf8_lossy(&p.payload)
        );
    }
    peer.send(&Packet::eof());
    let closed = common::within_or("close", LIMIT, move || conn.close(), || {});
    assert!(closed.is_ok(), "{closed:?}");
}

/// A raw peer with the extensions: cancels of a running and of a queued
/// request, duplicates, a flood for unknown and answered tags, and a tag
/// reused after its cancelled request was answered.
#[test]
fn cancels_duplicated_flooded_and_for_reused_tags_each_request_answered_once() {
    use common::{bsuint, RawPeer};
    use packetstream::{PacketKind, CONTROL_CHANNEL};
    const CANCEL: u64 = 2;
    let ran: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let handler = {
        let ran = Arc::clone(&ran);
        move |rq: Request| -> HandlerResult {
            ran.lock().unwrap().push(rq.tag);
            if rq.rq_type == HOLD {
                if rq.wait_cancelled(LIMIT) {
                    assert!(rq.is_cancelled());
                    return Err("stopped".into());
                }
                return Err("never cancelled".into());
            }
            Ok(rq.payload.into())
        }
    };
    let (conn, mut peer) = RawPeer::speaking_to(
        Config::default()
            .name(unique_name("cxl"))
            .handler(handler)
            .handler_threads(1),
        LIMIT,
    );
    let mut control_tag = 0;
    let mut cancel = |peer: &mut RawPeer, tag: u64| {
        let mut payload = bsuint(0);
        payload.extend(bsuint(u128::from(tag)));
        peer.send(&Packet {
            channel: CONTROL_CHANNEL,
            tag: control_tag,
            kind: PacketKind::Request {
                rq_type: CANCEL,
                flags: 0,
            },
            payload,
        });
        control_tag += 1;
    };
    // The next reply on channel 0, counting the control replies before it.
    let mut control_replies = 0u64;
    let next_reply = |peer: &mut RawPeer, control_replies: &mut u64| loop {
        let p = peer.recv_packet();
        match p.kind {
            PacketKind::Response { ok, .. } if p.channel == 0 => return (p.tag, ok),
            PacketKind::Response { .. } => *control_replies += 1,
            _ => {}
        }
    };
    peer.request(1, HOLD, b"");
    wait_for("the hold to run", LIMIT, || {
        ran.lock().unwrap().contains(&1)
    });
    peer.request(2, ECHO, b"queued");
    wait_for("the queued one to arrive", LIMIT, || {
        conn.stats().requests_received == 2
    });
    // The queued one, cancelled twice: answered not ok without running.
    cancel(&mut peer, 2);
    cancel(&mut peer, 2);
    // The running one, cancelled three times.
    cancel(&mut peer, 1);
    cancel(&mut peer, 1);
    cancel(&mut peer, 1);
    let a = next_reply(&mut peer, &mut control_replies);
    let b = next_reply(&mut peer, &mut control_replies);
    let mut got = [a, b];
    got.sort();
    assert_eq!(got, [(1, false), (2, false)]);
    assert!(
        !ran.lock().unwrap().contains(&2),
        "a cancelled queued request ran"
    );
    // A flood of cancels for unknown tags and for the answered ones.
    for i in 0..20_000u64 {
        cancel(&mut peer, if i % 3 == 0 { 1 } else { 1_000_000 + i });
    }
    // Tags 1 and 2 reused: served, not taken for cancelled.
    peer.request(1, ECHO, b"again");
    peer.request(2, ECHO, b"again");
    let a = next_reply(&mut peer, &mut control_replies);
    let b = next_reply(&mut peer, &mut control_replies);
    let mut got = [a, b];
    got.sort();
    assert_eq!(
        got,
        [(1, true), (2, true)],
        "reused tags after a flood of cancels"
    );
    wait_for("nothing in progress", LIMIT, || {
        conn.stats().in_progress == 0
    });
    peer.send(&Packet::eof());
    // Read to EOF: nothing more on channel 0.
    let (rest, _) = peer.recv_until(|p| p.is_eof());
    for p in &rest {
        if let PacketKind::Response { .. } = p.kind {
            if p.channel == 0 {
                panic!("an extra reply: {p:?}");
            } else {
                control_replies += 1;
            }
        }
    }
    assert_eq!(control_replies, control_tag, "each cancel answered once");
    let closed = common::within_or("close", LIMIT, move || conn.close(), || {});
    assert!(closed.is_ok(), "{closed:?}");
}
