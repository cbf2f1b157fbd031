//! The handler pool: a request queued while the awake handler threads are
//! busy in slow handlers starts as soon as a thread is free, on a
//! connection's own pool and on a server's shared pool; nothing is lost
//! and every thread ends.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::thread;

use common::{ms, pair_with, threads_named, unique_name, wait_for, Gate, ECHO, HOLD, LIMIT};
use packetstream::{Config, HandlerResult, PacketConnection, Reply, Request, Server, ServerConfig};

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
