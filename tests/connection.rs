//! Connection behaviour between two ends of this crate: transports, concurrency, shutdown, flush policy.

mod common;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use common::child::{self, child_fixture, Mode};
use common::*;
use packetstream::{Config, Error, OnClose, PacketConnection, Request, Response};

const SIZES: [usize; 8] = [0, 1, 127, 128, 16383, 16384, 65536, 1 << 20];

fn payload(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Echoes every size from 0 to 1 MiB, with flags up to 2^64-1.
fn exercise_round_trips(client: &PacketConnection) {
    for (idx, &size) in SIZES.iter().enumerate() {
        let data = payload(size, idx as u8);
        let flags = u64::MAX >> idx;
        let rsp = client.call(ECHO, flags, &data).unwrap();
        assert_eq!(rsp.flags, flags, "size {size}");
        assert!(
            rsp.payload == data,
            "payload of size {size} came back changed"
        );
    }
}

/// The transports a pair of connections can run over in one process.
#[derive(Clone, Copy, Debug)]
enum Transport {
    Socketpair,
    Pipes,
    Tcp,
}

/// Two connected ends over `transport`.
fn connect(
    transport: Transport,
    left: Config,
    right: Config,
) -> (PacketConnection, PacketConnection) {
    match transport {
        Transport::Socketpair => pair_with(left, right),
        Transport::Pipes => {
            let (l_recv, r_send) = io::pipe().unwrap();
            let (r_recv, l_send) = io::pipe().unwrap();
            (
                PacketConnection::new(l_recv, l_send, left).unwrap(),
                PacketConnection::new(r_recv, r_send, right).unwrap(),
            )
        }
        Transport::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let connecting = thread::spawn(move || TcpStream::connect(addr).unwrap());
            let (accepted, _) = listener.accept().unwrap();
            (
                PacketConnection::from_tcp_stream(connecting.join().unwrap(), left).unwrap(),
                PacketConnection::from_tcp_stream(accepted, right).unwrap(),
            )
        }
    }
}

/// A client and an echo server over `transport`.
fn client_server(transport: Transport) -> (PacketConnection, PacketConnection) {
    connect(
        transport,
        Config::default().name("client"),
        server_config("server"),
    )
}

/// Ten threads each submit a thousand requests at once, then check every
/// reply.
fn ten_threads_submit_a_thousand_each(client: &Arc<PacketConnection>) {
    let threads: Vec<_> = (0..10u64)
        .map(|t| {
            let client = Arc::clone(client);
            thread::spawn(move || {
                let pending: Vec<_> = (0..1000u64)
                    .map(|i| {
                        let data = format!("{t}:{i}");
                        let flags = t << 32 | i;
                        (
                            client.submit(ECHO, flags, data.as_bytes()).unwrap(),
                            flags,
                            data,
                        )
                    })
                    .collect();
                for (p, flags, data) in pending {
                    let rsp = p.wait_timeout(LIMIT).unwrap();
                    assert_eq!((rsp.flags, rsp.payload), (flags, data.into_bytes()));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = client.stats();
    assert_eq!(
        (stats.responses_ok, stats.pending),
        (stats.requests_sent, 0)
    );
    assert!(stats.requests_sent >= 10_000);
}

/// Both ends pipeline requests at each other, then make synchronous calls,
/// then close at the same moment.
fn both_ends_issue_requests_at_the_same_time(transport: Transport) {
    let (left, right) = connect(transport, server_config("left"), server_config("right"));
    let (left, right) = (Arc::new(left), Arc::new(right));
    let run = |conn: Arc<PacketConnection>, seed: u64| {
        thread::spawn(move || {
            let pending: Vec<_> = (0..2000u64)
                .map(|i| conn.submit(ECHO, seed + i, b"x").unwrap())
                .collect();
            for (i, p) in pending.into_iter().enumerate() {
                assert_eq!(p.wait_timeout(LIMIT).unwrap().flags, seed + i as u64);
            }
            for i in 0..200u64 {
                assert_eq!(conn.call(ECHO, i, b"y").unwrap().flags, i);
            }
        })
    };
    let (l, r) = (run(Arc::clone(&left), 0), run(Arc::clone(&right), 1 << 40));
    l.join().unwrap();
    r.join().unwrap();
    assert_eq!(left.stats().requests_received, 2200);
    assert_eq!(right.stats().requests_received, 2200);
    // Both close at once: neither may wait for the other's EOF before
    // sending its own.
    close_both(&left, &right);
}

fn every_scenario(transport: Transport) {
    let (client, server) = client_server(transport);
    exercise_round_trips(&client);
    let client = Arc::new(client);
    ten_threads_submit_a_thousand_each(&client);
    close_both(&client, &server);
    both_ends_issue_requests_at_the_same_time(transport);
}

#[test]
fn round_trips_concurrency_and_two_way_traffic_over_a_socketpair() {
    every_scenario(Transport::Socketpair);
}

#[test]
fn round_trips_concurrency_and_two_way_traffic_over_pipes() {
    every_scenario(Transport::Pipes);
}

#[test]
fn round_trips_concurrency_and_two_way_traffic_over_tcp_loopback() {
    every_scenario(Transport::Tcp);
}

child_fixture!();

#[test]
fn round_trips_and_concurrency_with_a_child_process() {
    let mut child = child::spawn(Mode::Serve);
    child::skip_to_ready(&mut child);
    let client = PacketConnection::from_child(&mut child, Config::default()).unwrap();
    // The child only serves, so two-way traffic is covered by the
    // in-process transports.
    exercise_round_trips(&client);
    let client = Arc::new(client);
    ten_threads_submit_a_thousand_each(&client);
    let err = client.call(99, 0, b"").unwrap_err();
    assert!(matches!(err, Error::Failed { .. }), "{err:?}");
    client.close_timeout(LIMIT).unwrap();
    let status = child::reap(child);
    assert!(status.success(), "child exited with {status}");
}

#[test]
fn a_connection_without_handler_refuses_requests() {
    let (client, no_handler) = pair_with(Config::default(), Config::default());
    let err = client.call(ECHO, 0, b"").unwrap_err();
    assert!(matches!(err, Error::Failed { flags: 0, .. }), "{err:?}");
    assert_eq!(err.failure_reason().as_deref(), Some("no request handler"));
    close_both(&client, &no_handler);
}

#[test]
fn handler_errors_and_panics_become_not_ok_replies_and_the_connection_goes_on() {
    let gate = Gate::new();
    let held = gate.clone();
    let (client, server) = pair_with(
        Config::default().name("client"),
        Config::default()
            .name("server")
            .handler(move |rq: Request| match rq.rq_type {
                HOLD => {
                    held.pass();
                    echo(rq)
                }
                _ => service(rq),
            }),
    );
    let err = client
        .call_timeout(FAIL, 0, "bad thing: ünïcode".as_bytes(), LIMIT)
        .unwrap_err();
    assert_eq!(err.failure_reason().as_deref(), Some("bad thing: ünïcode"));
    // Each panic is a not-ok reply saying so, and the next request is
    // answered.
    for round in 0..10 {
        let err = client.call_timeout(PANIC, 0, b"", LIMIT).unwrap_err();
        let reason = err.failure_reason().expect("a not-ok reply");
        assert!(
            reason.contains("handler panicked: handler told to panic"),
            "{reason}"
        );
        let rsp = client.call_timeout(ECHO, round, b"fine", LIMIT).unwrap();
        assert_eq!((rsp.flags, rsp.payload.as_slice()), (round, &b"fine"[..]));
    }
    // All four handler threads are still there: four requests are held in
    // the handler at once.
    let pending: Vec<_> = (0..4)
        .map(|i| client.submit(HOLD, i, b"held").unwrap())
        .collect();
    gate.wait_entered(4, LIMIT);
    gate.open();
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.wait_timeout(LIMIT).unwrap().flags, i as u64);
    }
    assert_eq!(server.stats().replies_failed, 11);
    close_both(&client, &server);
}

#[test]
fn reply_shapes_and_typed_decoding() {
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(
        b,
        Config::default().handler(|rq: packetstream::Request| {
            Ok(match rq.rq_type {
                0 => ().into(),
                1 => 0x55u64.into(),
                2 => b"bytes".to_vec().into(),
                3 => "text".into(),
                4 => (7u64, b"both".to_vec()).into(),
                _ => vec![0xff, 0xfe].into(),
            })
        }),
    )
    .unwrap();
    let client = PacketConnection::from_unix_stream(a, Config::default()).unwrap();
    let get = |rq_type| client.call(rq_type, 0, b"").unwrap();
    assert_eq!(
        get(0),
        Response {
            flags: 0,
            payload: vec![]
        }
    );
    assert_eq!(
        get(1),
        Response {
            flags: 0x55,
            payload: vec![]
        }
    );
    assert_eq!(
        get(2),
        Response {
            flags: 0,
            payload: b"bytes".to_vec()
        }
    );
    assert_eq!(
        get(3),
        Response {
            flags: 0,
            payload: b"text".to_vec()
        }
    );
    assert_eq!(
        get(4),
        Response {
            flags: 7,
            payload: b"both".to_vec()
        }
    );
    assert_eq!(client.call_as::<String>(3, 0, b"").unwrap(), "text");
    assert_eq!(client.call_as::<u64>(1, 0, b"").unwrap(), 0x55);
    assert_eq!(
        client.call_as::<(u64, Vec<u8>)>(4, 0, b"").unwrap(),
        (7, b"both".to_vec())
    );
    assert!(matches!(
        client.call_as::<String>(5, 0, b""),
        Err(Error::Decode(_))
    ));
    close_both(&client, &server);
}

#[test]
fn every_channel_has_its_own_tag_sequence() {
    let (client, server) = pair();
    let mut seen = Vec::new();
    for channel in [0u64, 5, 1 << 40, u64::MAX] {
        let first = client.submit_on(channel, ECHO, channel, b"a").unwrap();
        let second = client.submit_on(channel, ECHO, channel, b"b").unwrap();
        let start = if channel == 0 { 2 } else { 0 };
        assert_eq!((first.tag(), second.tag()), (start, start + 1));
        assert_eq!(first.channel(), channel);
        seen.push((first, second));
    }
    // The same tag on several channels at once: each reply finds its own.
    for (first, second) in seen {
        let channel = first.channel();
        assert_eq!(
            first.wait_timeout(LIMIT).unwrap(),
            Response {
                flags: channel,
                payload: b"a".to_vec()
            }
        );
        assert_eq!(
            second.wait_timeout(LIMIT).unwrap(),
            Response {
                flags: channel,
                payload: b"b".to_vec()
            }
        );
    }
    assert_eq!(client.call_on(9, ECHO, 1, b"z").unwrap().payload, b"z");
    close_both(&client, &server);
}

#[test]
fn requests_after_end_requests_are_refused_locally() {
    let (client, server) = pair();
    client.end_requests();
    assert!(matches!(client.submit(ECHO, 0, b""), Err(Error::Closed)));
    // The server, told no more requests come, still works the other way.
    assert_eq!(
        server
            .call(ECHO, 3, b"")
            .map(|r| r.flags)
            .unwrap_err()
            .failure_reason()
            .as_deref(),
        Some("no request handler")
    );
    close_both(&client, &server);
}

#[test]
fn close_timeout_fails_what_is_pending_when_the_peer_stalls() {
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(
        b,
        Config::default().handler(move |_| {
            // Stall until released (or 30 s), like a stuck handler.
            let _ = release_rx.recv_timeout(LIMIT);
            Ok(().into())
        }),
    )
    .unwrap();
    let client = PacketConnection::from_unix_stream(a, Config::default()).unwrap();
    let pending: Vec<_> = (0..3)
        .map(|_| client.submit(ECHO, 0, b"").unwrap())
        .collect();
    let server = Arc::new(server);
    let stalled = Arc::clone(&server);
    wait_for("3 stalled requests in progress", LIMIT, || {
        stalled.stats().in_progress >= 3
    });
    let res = within("close_timeout", move || stalled.close_timeout(ms(200)));
    assert!(matches!(res, Err(Error::Timeout { .. })), "{res:?}");
    // The server's own requests: none. The client's wait on the stalled server
    // ends once the client closes with a deadline too.
    let res = within("client close_timeout", move || {
        let res = client.close_timeout(ms(200));
        (
            res,
            pending
                .into_iter()
                .map(|p| p.wait_timeout(LIMIT))
                .collect::<Vec<_>>(),
        )
    });
    // The client's close may succeed or see the aborted socket; it must not hang.
    let _ = res.0;
    for outcome in res.1 {
        assert!(
            matches!(outcome, Err(Error::ConnectionLost(_))),
            "{outcome:?}"
        );
    }
    drop(release_tx);
    drop(server);
}

#[test]
fn every_constructor_works() {
    // A single owned fd, and a borrowed one which stays open.
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_fd(OwnedFd::from(b), server_config("fd-server")).unwrap();
    let client = PacketConnection::from_borrowed_fd(a.as_fd(), Config::default()).unwrap();
    assert_eq!(client.call(ECHO, 1, b"fd").unwrap().payload, b"fd");
    close_both(&client, &server);
    // The caller's fd was duplicated, not closed: it is still a socket.
    assert!(a.local_addr().is_ok());

    // A pair of fds, from two pipes.
    let (c_recv, s_send) = io::pipe().unwrap();
    let (s_recv, c_send) = io::pipe().unwrap();
    let server = PacketConnection::from_fds(
        OwnedFd::from(s_recv),
        OwnedFd::from(s_send),
        server_config("fds"),
    )
    .unwrap();
    let client =
        PacketConnection::from_borrowed_fds(c_recv.as_fd(), c_send.as_fd(), Config::default())
            .unwrap();
    assert_eq!(client.call(ECHO, 2, b"fds").unwrap().flags, 2);
    drop((c_recv, c_send));
    close_both(&client, &server);

    // A connector with an on-close hook, run exactly once.
    let closed = Arc::new(AtomicUsize::new(0));
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(b, server_config("server")).unwrap();
    let hook_count = Arc::clone(&closed);
    let client = PacketConnection::connect_with(
        move || {
            let on_close: Option<OnClose> = Some(Box::new(move || {
                hook_count.fetch_add(1, Ordering::SeqCst);
            }));
            Ok((a.try_clone()?, a, on_close))
        },
        Config::default(),
    )
    .unwrap();
    assert_eq!(client.call(ECHO, 3, b"c").unwrap().flags, 3);
    assert_eq!(closed.load(Ordering::SeqCst), 0);
    close_both(&client, &server);
    assert_eq!(closed.load(Ordering::SeqCst), 1);
    let failing = PacketConnection::connect_with(
        || -> io::Result<(UnixStream, UnixStream, Option<OnClose>)> {
            Err(io::Error::other("no service"))
        },
        Config::default(),
    );
    assert!(matches!(failing, Err(Error::Io(_))));
}

/// A writer that counts write calls, over a real socket.
#[derive(Clone)]
struct CountingWriter {
    inner: Arc<Mutex<UnixStream>>,
    writes: Arc<AtomicUsize>,
}

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.lock().unwrap().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn counted(stream: UnixStream) -> (UnixStream, CountingWriter) {
    let writer = CountingWriter {
        inner: Arc::new(Mutex::new(stream.try_clone().unwrap())),
        writes: Arc::default(),
    };
    (stream, writer)
}

/// With a grace of an hour, anything that waited out the grace would hang;
/// `LIMIT` turns that into a failure.
#[test]
fn a_lone_call_never_waits_out_the_grace_and_takes_one_write_each_way() {
    let hour = std::time::Duration::from_secs(3600);
    let (a, b) = UnixStream::pair().unwrap();
    let (a, a_writer) = counted(a);
    let (b, b_writer) = counted(b);
    let (client_writes, server_writes) =
        (Arc::clone(&a_writer.writes), Arc::clone(&b_writer.writes));
    // Writes are counted exactly: no hello exchange at the start.
    let server = PacketConnection::new(
        b,
        b_writer,
        server_config("server").packet_grace(hour).extensions(false),
    )
    .unwrap();
    let client = Arc::new(
        PacketConnection::new(
            a,
            a_writer,
            Config::default().packet_grace(hour).extensions(false),
        )
        .unwrap(),
    );
    for round in 1..=5 {
        let c = Arc::clone(&client);
        let rsp = within("a call with an hour of grace", move || {
            c.call(ECHO, 9, b"ping").unwrap()
        });
        assert_eq!(rsp.payload, b"ping");
        assert_eq!(
            client_writes.load(Ordering::SeqCst),
            round,
            "client writes per call"
        );
        assert_eq!(
            server_writes.load(Ordering::SeqCst),
            round,
            "server writes per call"
        );
    }
    close_both(&client, &server);
}

#[test]
fn a_pipelined_burst_goes_out_in_one_write() {
    let hour = std::time::Duration::from_secs(3600);
    let (a, b) = UnixStream::pair().unwrap();
    let (a, a_writer) = counted(a);
    let client_writes = Arc::clone(&a_writer.writes);
    // Writes are counted exactly: no hello exchange at the start.
    let server =
        PacketConnection::from_unix_stream(b, server_config("server").extensions(false)).unwrap();
    let client = PacketConnection::new(
        a,
        a_writer,
        Config::default().packet_grace(hour).extensions(false),
    )
    .unwrap();
    let pending: Vec<_> = (0..1000)
        .map(|i| client.submit(ECHO, i, b"burst").unwrap())
        .collect();
    assert_eq!(
        client_writes.load(Ordering::SeqCst),
        0,
        "nothing written before anyone waits"
    );
    let pending = within("burst", move || {
        for (i, p) in pending.iter().enumerate() {
            assert_eq!(p.wait_timeout(LIMIT).unwrap().flags, i as u64);
        }
        pending
    });
    drop(pending);
    assert_eq!(
        client_writes.load(Ordering::SeqCst),
        1,
        "1000 requests in one write"
    );
    assert!(
        server.stats().writes < 100,
        "server replies batched: {:?}",
        server.stats()
    );
    close_both(&client, &server);
}

#[test]
fn default_grace_still_writes_an_unwaited_submit() {
    let (client, server) = pair();
    // Nobody waits on this one: the send thread writes it after the grace.
    let pending = client.submit(ECHO, 1, b"fire").unwrap();
    wait_for("the unwaited request to arrive", LIMIT, || {
        server.stats().requests_received > 0
    });
    assert_eq!(pending.wait_timeout(LIMIT).unwrap().flags, 1);
    close_both(&client, &server);
}

#[test]
fn connections_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PacketConnection>();
    assert_send_sync::<packetstream::PendingResponse>();
}

#[test]
fn threads_are_named_after_the_connection_and_all_end_on_close() {
    let (client, server) = pair_with(
        Config::default().name("tn-c"),
        server_config("tn-s").handler_threads(2),
    );
    // A thread names itself as it starts.
    wait_for("the threads to start", LIMIT, || {
        threads_named("tn-").len() >= 6
    });
    assert_eq!(threads_named("tn-c"), ["tn-c:recv", "tn-c:send"]);
    assert_eq!(
        threads_named("tn-s"),
        ["tn-s:handler0", "tn-s:handler1", "tn-s:recv", "tn-s:send"]
    );
    assert_eq!(client.name(), "tn-c");
    close_both(&client, &server);
    // `close` returns once every thread is past its work; the kernel may
    // show one a moment longer, as it exits.
    assert_threads_gone("tn-c", LIMIT);
    assert_threads_gone("tn-s", LIMIT);
}

/// The lease keeper, one thread for the whole process, starts when a
/// receive thread first lends its reader, takes the reader back once it has
/// rested unread for its lease (the peer's request is then read), and ends
/// once no reader has been lent for a while.
#[test]
fn the_lease_keeper_comes_with_a_lent_reader_and_goes_after() {
    if !isolated(
        "the_lease_keeper_comes_with_a_lent_reader_and_goes_after",
        LIMIT * 2,
    ) {
        return;
    }
    assert!(threads_named(KEEPER_THREAD).is_empty());
    let (client, server) = pair_with(server_config("lk-c"), server_config("lk-s"));
    // The response is delivered by the receive thread, which then lends its
    // reader to the next caller.
    assert_eq!(client.call(ECHO, 0, b"lend").unwrap().payload, b"lend");
    wait_for("the keeper to start", LIMIT, || {
        threads_named(KEEPER_THREAD).len() == 1
    });
    // Nobody calls: the keeper must hand the reader back for the peer's
    // request to be read.
    let rsp = server.call_timeout(ECHO, 0, b"back", LIMIT).unwrap();
    assert_eq!(rsp.payload, b"back");
    close_both(&client, &server);
    wait_for("the keeper to end", LIMIT, || {
        threads_named(KEEPER_THREAD).is_empty()
    });
}

#[test]
fn try_submit_would_block_on_a_full_queue_where_submit_waits() {
    let (a, mut b) = UnixStream::pair().unwrap();
    // The peer reads nothing yet, and the socket's buffer is full from the
    // start: the queue, which holds two small requests (and no hello),
    // cannot drain until the peer reads.
    a.set_write_timeout(Some(std::time::Duration::from_millis(20)))
        .unwrap();
    while (&a).write(&[0; 4096]).is_ok() {}
    a.set_write_timeout(None).unwrap();
    let hour = std::time::Duration::from_secs(3600);
    let client = PacketConnection::from_unix_stream(
        a,
        Config::default()
            .packet_grace(hour)
            .max_queued_packets(2)
            .extensions(false),
    )
    .unwrap();
    let first = client.try_submit(ECHO, 0, b"1").unwrap();
    let second = client.try_submit(ECHO, 0, b"2").unwrap();
    assert!(matches!(
        client.try_submit(ECHO, 0, b"3"),
        Err(Error::WouldBlock)
    ));
    assert!(matches!(
        client.try_submit_on(4, ECHO, 0, b"3"),
        Err(Error::WouldBlock)
    ));
    // A blocking submit makes room by writing the queue, then goes in,
    // once the peer reads.
    let reader = std::thread::spawn(move || {
        let mut sink = [0; 1 << 16];
        while matches!(b.read(&mut sink), Ok(1..)) {}
    });
    let third = within("submit on a full queue", {
        let client = Arc::new(client);
        let c = Arc::clone(&client);
        move || (c.submit(ECHO, 0, b"3").map(|p| p.tag()), client)
    });
    // The refused try_submit used up tag 4: tags are never reused.
    assert_eq!(third.0.unwrap(), second.tag() + 2);
    assert_eq!(third.1.stats().requests_sent, 3);
    drop((first, second));
    third.1.abort();
    within("the peer's reader", move || reader.join().unwrap());
}
