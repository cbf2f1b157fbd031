//! The keeper thread (`ps:lease-keeper`): lent readers recalled, and the
//! read timeouts (packet, idle, keepalive) kept from the reader's stamps by
//! shutting the socket's reading down, against hostile peers and unlucky
//! users. The peer is judged only while this end waits in a read: a slow
//! inline handler, a full handler queue or a lent reader at rest is not the
//! peer's silence; idleness is judged whatever the reader does, and only
//! the application's packets count against it. Every blocking wait has a
//! bound; every thread is joined.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    bsuint, ms, request, response, threads_named, unique_name, wait_for, wire, within, Gate,
    RawPeer, KEEPER_THREAD,
};
use packetstream::{
    Config, Disconnect, Error, HandlerResult, Packet, PacketConnection, PacketKind, Request,
    Server, ServerConfig, CONTROL_CHANNEL,
};

const PATIENCE: Duration = Duration::from_secs(10);

fn ended(conn: &PacketConnection) -> Option<Disconnect> {
    conn.status().ended
}

/// Watches `conn` for `span`; returns how it ended if it did.
fn ends_within(conn: &PacketConnection, span: Duration) -> Option<Disconnect> {
    let until = Instant::now() + span;
    while Instant::now() < until {
        if let Some(why) = ended(conn) {
            return Some(why);
        }
        thread::sleep(ms(10));
    }
    ended(conn)
}

fn pair_with(client: Config, server: Config) -> (PacketConnection, PacketConnection) {
    common::pair_with(client, server)
}

fn lost_with(res: &Result<packetstream::Response, Error>, why: Disconnect) -> bool {
    matches!(res, Err(Error::ConnectionLost(w) | Error::Unsent(w)) if *w == why)
}

// ---------------------------------------------------------------------------
// This end not reading (busy with its own work) is not the peer's silence.

/// An inline handler that runs longer than the packet timeout: the request
/// arrived whole, the peer is waiting for the answer, nothing is "silent
/// inside a packet", though the packet just taken leaves the reader's last
/// read long ago.
#[test]
fn inline_handler_slower_than_packet_timeout_is_not_taken_for_a_silent_peer() {
    let (client, server) = pair_with(
        Config::default().name(unique_name("ihc")),
        Config::default()
            .name(unique_name("ihs"))
            .packet_timeout(ms(150))
            .inline_handler(|rq: Request| -> HandlerResult {
                thread::sleep(ms(700));
                Ok(rq.payload.into())
            }),
    );
    let res = within("the call", {
        let p = client.submit(1, 0, b"slow").unwrap();
        move || p.wait_timeout(PATIENCE)
    });
    // The connection should go on: a second call, and a look after it.
    let again = client.call_timeout(1, 0, b"fast?", PATIENCE);
    let server_end = ends_within(&server, ms(300));
    client.abort();
    server.abort();
    assert!(
        res.is_ok() && server_end.is_none(),
        "a whole request served by a slow inline handler: {res:?}, then {again:?}; \
         server ended {server_end:?}"
    );
}

/// The receive thread stops reading while its handler queue is full (the
/// backpressure on the peer). The peer is not silent inside a packet: the
/// packets it sent have all been read whole.
#[test]
fn a_full_handler_queue_is_not_taken_for_a_silent_peer() {
    full_handler_queue_for(|config| config.packet_timeout(ms(150)), ms(800));
}

/// The same with keepalive: this end, not reading while its queue is full,
/// cannot hear the peer's answers, and must not give the live peer up as
/// `NoAnswer`.
#[test]
fn a_full_handler_queue_is_not_taken_for_a_peer_that_does_not_answer() {
    full_handler_queue_for(|config| config.keepalive(ms(150)), ms(1200));
}

/// A server with one handler thread and a queue of one, its read timeouts
/// set by `timeouts`, holds its handler for `hold` under four requests (the
/// handler holds the first, one waits in the queue, the receive thread
/// waits for room with the third): every request is answered and the
/// server does not end.
fn full_handler_queue_for(timeouts: impl FnOnce(Config) -> Config, hold: Duration) {
    let gate = Gate::new();
    let g = gate.clone();
    let server_config = Config::default()
        .name(unique_name("fqs"))
        .handler_threads(1)
        .handler_queue(1)
        .handler(move |rq: Request| -> HandlerResult {
            g.pass();
            Ok(rq.payload.into())
        });
    let (client, server) = pair_with(
        Config::default().name(unique_name("fqc")),
        timeouts(server_config),
    );
    let pending: Vec<_> = (0..4)
        .map(|_| client.submit(1, 0, b"queued").unwrap())
        .collect();
    gate.wait_entered(1, PATIENCE);
    thread::sleep(hold);
    gate.open();
    let results: Vec<_> = pending
        .into_iter()
        .map(|p| p.wait_timeout(PATIENCE))
        .collect();
    let server_end = ends_within(&server, ms(300));
    client.abort();
    server.abort();
    assert!(
        results.iter().all(|r| r.is_ok()) && server_end.is_none(),
        "server gave up on a peer while its own handler queue was full: \
         server ended {server_end:?}, calls {results:?}"
    );
}

/// A lent reader rests unread for up to its lease (50 ms once calls come
/// quickly) after the response it last read: a short packet timeout must
/// not end the idle, healthy connection as `Silent`.
#[test]
fn a_lent_reader_at_rest_is_not_taken_for_a_silent_peer() {
    let (client, server) = pair_with(
        Config::default()
            .name(unique_name("lrc"))
            .packet_timeout(ms(25))
            .extensions(false),
        Config::default()
            .name(unique_name("lrs"))
            .handler(common::echo)
            .extensions(false),
    );
    let mut ok = 0;
    for _ in 0..50 {
        if client.call(1, 0, b"x").is_ok() {
            ok += 1;
        }
    }
    // Nothing more is sent: no packet is begun by anyone.
    let client_end = ends_within(&client, ms(500));
    client.abort();
    server.abort();
    assert_eq!(ok, 50);
    assert_eq!(
        client_end, None,
        "a connection between packets ended with a packet timeout"
    );
}

// ---------------------------------------------------------------------------
// Slow loris and silent peers.

/// Half a response to the call a caller is reading for itself (the reader
/// lent to it): the keeper shuts the reading down under the caller, which
/// ends with `Silent`; every pending request is answered once.
#[test]
fn half_a_response_under_a_caller_holding_the_lent_reader_ends_as_silent() {
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("hlr"))
            .packet_timeout(ms(200)),
    );
    let conn = Arc::new(conn);
    // A first call, answered whole: the reader is then lent.
    let c = Arc::clone(&conn);
    let first = thread::spawn(move || c.call(1, 0, b"a"));
    let rq = peer.recv_packet();
    peer.send(&response(rq.tag, true, 0, b"A"));
    assert!(first.join().unwrap().is_ok());
    // Others pending, not read for by anyone.
    let others: Vec<_> = (0..3).map(|_| conn.submit(1, 0, b"o").unwrap()).collect();
    let c = Arc::clone(&conn);
    let (tx, rx) = mpsc::channel();
    let caller = thread::spawn(move || tx.send(c.call(1, 0, b"b")).unwrap());
    let mut tags = Vec::new();
    while tags.len() < 4 {
        tags.push(peer.recv_packet().tag);
    }
    let last = *tags.last().unwrap();
    let half = wire(&response(last, true, 0, &[9; 64]));
    peer.send_bytes(&half[..20]);
    let res = rx.recv_timeout(PATIENCE).expect("the caller returns");
    caller.join().unwrap();
    assert!(lost_with(&res, Disconnect::Silent), "{res:?}");
    for p in others {
        let r = p.wait_timeout(PATIENCE);
        assert!(lost_with(&r, Disconnect::Silent), "{r:?}");
    }
    wait_for("the connection to end", PATIENCE, || ended(&conn).is_some());
    assert_eq!(ended(&conn), Some(Disconnect::Silent));
    let res = within("close", move || conn.close());
    assert!(
        matches!(res, Err(Error::ConnectionLost(Disconnect::Silent))),
        "{res:?}"
    );
}

/// A peer that trickles a packet, a byte at a time, each well inside the
/// packet timeout, is not silent: the packet gets through.
#[test]
fn a_peer_trickling_inside_the_packet_timeout_is_not_silent() {
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("tri"))
            .packet_timeout(ms(250))
            .handler(common::echo),
    );
    let bytes = wire(&request(7, 1, 0, b"trickle"));
    for b in &bytes {
        peer.send_bytes(&[*b]);
        thread::sleep(ms(130));
    }
    let got = peer.recv_packet();
    assert_eq!((got.tag, got.payload.as_slice()), (7, &b"trickle"[..]));
    assert_eq!(ended(&conn), None);
    conn.abort();
}

/// A peer silent for ever, with an idle timeout and a keepalive: the
/// connection ends by one of them, and close returns.
#[test]
fn a_peer_silent_for_ever_is_ended_by_idle_or_keepalive() {
    let (conn, peer) = RawPeer::with(
        Config::default()
            .name(unique_name("sfe"))
            .idle_timeout(ms(400))
            .keepalive(ms(150)),
    );
    let why = ends_within(&conn, PATIENCE);
    assert!(
        matches!(why, Some(Disconnect::NoAnswer | Disconnect::Idle)),
        "{why:?}"
    );
    let res = within("close", move || conn.close());
    assert!(res.is_err());
    drop(peer);
}

/// close() while the keeper shuts the reading down for half a packet: both
/// end, close returns, the threads go.
#[test]
fn close_racing_the_keepers_interrupt_returns() {
    for i in 0..10 {
        let name = unique_name("crk");
        let (conn, mut peer) =
            RawPeer::with(Config::default().name(&name).packet_timeout(ms(40 + 7 * i)));
        let pending = conn.submit(1, 0, b"q").unwrap();
        let _ = peer.recv_packet();
        peer.send_bytes(&wire(&request(3, 1, 0, &[1; 40]))[..10]);
        thread::sleep(ms(30 + 5 * i));
        let res = within("close", move || conn.close_timeout(PATIENCE));
        assert!(
            !matches!(res, Err(Error::Timeout { .. })),
            "close ran into its deadline: {res:?}"
        );
        let r = pending.wait_timeout(PATIENCE);
        assert!(r.is_err(), "{r:?}");
        common::assert_threads_gone(&name, PATIENCE);
        drop(peer);
    }
}

/// The same over TCP loopback: the keeper's `shutdown(SHUT_RD)` wakes a read
/// blocked on a TCP socket too.
#[test]
fn half_a_packet_over_tcp_ends_as_silent() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = thread::spawn(move || listener.accept().unwrap().0);
    let sock = std::net::TcpStream::connect(addr).unwrap();
    let mut peer = acceptor.join().unwrap();
    peer.set_read_timeout(Some(PATIENCE)).unwrap();
    let conn = PacketConnection::from_tcp_stream(
        sock,
        Config::default()
            .name(unique_name("tcp"))
            .packet_timeout(ms(200))
            .extensions(false),
    )
    .unwrap();
    let p = conn.submit(1, 0, b"q").unwrap();
    peer.write_all(&wire(&request(2, 1, 0, &[5; 50]))[..7])
        .unwrap();
    let why = ends_within(&conn, PATIENCE);
    assert_eq!(why, Some(Disconnect::Silent));
    let r = p.wait_timeout(PATIENCE);
    assert!(lost_with(&r, Disconnect::Silent), "{r:?}");
    conn.abort();
}

/// A timeout over a socket given as a raw descriptor (`from_fd`) is kept,
/// as on any socket.
#[test]
fn packet_timeout_on_a_socket_given_by_fd_is_enforced() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    let fd: OwnedFd = a.into();
    let conn = PacketConnection::from_fd(
        fd,
        Config::default()
            .name(unique_name("rfd"))
            .packet_timeout(ms(150))
            .extensions(false),
    )
    .unwrap();
    let p = conn.submit(1, 0, b"q").unwrap();
    peer.write_all(&wire(&request(2, 1, 0, &[5; 50]))[..7])
        .unwrap();
    let why = ends_within(&conn, ms(1500));
    conn.abort();
    let _ = p.wait_timeout(PATIENCE);
    assert_eq!(
        why,
        Some(Disconnect::Silent),
        "half a packet on a socket fd was never timed out"
    );
}

/// Generic `Read`/`Write` halves (here the two halves of a socket, handed
/// over as plain streams) with timeouts: nothing is enforced, nothing
/// breaks, abort ends it.
#[test]
fn timeouts_on_generic_halves_break_nothing() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    let r = a.try_clone().unwrap();
    let name = unique_name("gen");
    let conn = PacketConnection::new(
        r,
        a,
        Config::default()
            .name(&name)
            .packet_timeout(ms(50))
            .idle_timeout(ms(50))
            .extensions(false)
            .handler(common::echo),
    )
    .unwrap();
    peer.set_read_timeout(Some(PATIENCE)).unwrap();
    peer.write_all(&wire(&request(1, 1, 0, b"x"))).unwrap();
    thread::sleep(ms(300));
    assert_eq!(ended(&conn), None);
    let mut buf = [0u8; 64];
    let n = peer.read(&mut buf).unwrap();
    assert!(n > 0);
    conn.abort();
    // abort cannot interrupt the generic reader: closing the peer ends it.
    drop(peer);
    common::assert_threads_gone(&name, PATIENCE);
}

// ---------------------------------------------------------------------------
// Lent readers: calls racing the recall, deadlines, drop and close.

/// Calls with and without deadlines, try_wait and is_ready, spaced around
/// the lease, while the peer sends its own requests now and then: every
/// call is answered, every request of the peer too.
#[test]
fn calls_racing_the_lease_recall_with_deadlines_and_peer_requests() {
    let served = Arc::new(AtomicUsize::new(0));
    let s = Arc::clone(&served);
    let (client, server) = pair_with(
        Config::default()
            .name(unique_name("rcc"))
            .packet_timeout(ms(2000))
            .idle_timeout(ms(5000))
            .handler(move |rq: Request| -> HandlerResult {
                s.fetch_add(1, Ordering::SeqCst);
                Ok(rq.payload.into())
            }),
        Config::default()
            .name(unique_name("rcs"))
            .handler(common::service),
    );
    let client = Arc::new(client);
    let server = Arc::new(server);
    let srv = Arc::clone(&server);
    let peer_requests = thread::spawn(move || {
        let mut n = 0;
        for i in 0..40u64 {
            thread::sleep(ms(i % 7 * 4));
            let r = srv.call_timeout(1, 0, b"p", PATIENCE);
            assert!(r.is_ok(), "peer request {i}: {r:?}");
            n += 1;
        }
        n
    });
    let mut rng = common::Rng::new(0x5eed);
    for i in 0..300u64 {
        let pause = rng.below(70);
        if pause > 0 {
            thread::sleep(ms(pause));
        }
        let res = match rng.below(4) {
            0 => client.call(1, 0, b"c"),
            1 => client.call_timeout(1, 0, b"c", PATIENCE),
            2 => {
                let p = client.submit(1, 0, b"c").unwrap();
                let _ = p.is_ready();
                p.wait_timeout(PATIENCE)
            }
            _ => {
                let p = client.submit(1, 0, b"c").unwrap();
                // A short deadline that may run out, then a wait that reads.
                match p.wait_timeout(ms(rng.below(3))) {
                    Err(Error::Timeout { .. }) => p.wait_timeout(PATIENCE),
                    other => other,
                }
            }
        };
        assert!(res.is_ok(), "call {i}: {res:?}");
    }
    let n = within("peer requests", move || peer_requests.join().unwrap());
    assert_eq!(n, 40);
    assert_eq!(served.load(Ordering::SeqCst), 40);
    assert_eq!(ended(&client), None);
    client.abort();
    server.abort();
}

/// A request of the peer's after the last call is read and answered within
/// a lease and a look, many times over, with a deadline on the peer's side.
#[test]
fn a_peer_request_after_the_last_call_is_read_soon() {
    let (client, server) = pair_with(
        Config::default()
            .name(unique_name("prc"))
            .handler(common::echo),
        Config::default()
            .name(unique_name("prs"))
            .handler(common::echo),
    );
    for i in 0..30 {
        assert!(client.call(1, 0, b"c").is_ok());
        let r = server.call_timeout(1, 0, b"s", ms(1500));
        assert!(r.is_ok(), "round {i}: {r:?}");
    }
    client.abort();
    server.abort();
}

/// A pending response outlives its connection, which is dropped while a
/// thread reads for it with the lent reader; the peer answers later, then
/// ends. The reader goes back, the call is answered, the threads end.
#[test]
fn dropping_the_connection_while_a_caller_holds_the_lent_reader() {
    let name = unique_name("dlr");
    let (conn, mut peer) = RawPeer::with(Config::default().name(&name));
    // Lend the reader.
    let p = conn.submit(1, 0, b"a").unwrap();
    let rq = peer.recv_packet();
    peer.send(&response(rq.tag, true, 0, b"A"));
    assert!(p.wait_timeout(PATIENCE).is_ok());
    let p = conn.submit(1, 0, b"b").unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || tx.send(p.wait()).unwrap());
    let rq = peer.recv_packet();
    thread::sleep(ms(50));
    drop(conn);
    let (_, erq) = peer.recv_until(|pk| pk.is_erq());
    assert!(erq.is_erq());
    peer.send(&response(rq.tag, true, 0, b"B"));
    let res = rx.recv_timeout(PATIENCE).expect("the waiter returns");
    waiter.join().unwrap();
    assert_eq!(res.unwrap().payload, b"B");
    let (_, eof) = peer.recv_until(|pk| pk.is_eof());
    assert!(eof.is_eof());
    peer.send(&Packet::eof());
    common::assert_threads_gone(&name, PATIENCE);
}

// ---------------------------------------------------------------------------
// The keeper thread's life, with many connections. Run alone in a copy of
// this binary: the keeper is one thread for the whole process.

fn keeper_threads() -> usize {
    threads_named(KEEPER_THREAD).len()
}

/// Voluntary context switches of the keeper thread, if it runs.
fn keeper_switches() -> Option<u64> {
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = entry.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() == KEEPER_THREAD {
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let line = status
                .lines()
                .find(|l| l.starts_with("voluntary_ctxt_switches"))?;
            return line.split_whitespace().nth(1)?.parse().ok();
        }
    }
    None
}

/// 300 connections with different timeouts, made and ended quickly: a third
/// get half a packet (each ends as `Silent`), a third are aborted, a third
/// dropped with their peer gone. Then the keeper ends (it holds nothing
/// stale), and starts again for a new connection, whose timeout it keeps
/// even when it was sleeping for a long look of another.
#[test]
fn three_hundred_connections_come_and_go_and_the_keeper_ends_and_restarts() {
    if !common::isolated(
        "three_hundred_connections_come_and_go_and_the_keeper_ends_and_restarts",
        Duration::from_secs(120),
    ) {
        return;
    }
    assert_eq!(keeper_threads(), 0);
    let mut silent = Vec::new();
    let mut names = Vec::new();
    for i in 0..300u64 {
        let name = format!("k{i}");
        names.push(name.clone());
        let mut config = Config::default()
            .name(&name)
            .extensions(false)
            .packet_timeout(ms(50 + i * 7));
        if i % 2 == 0 {
            config = config.idle_timeout(ms(10_000 + i));
        }
        if i % 5 == 0 {
            config = config.keepalive(ms(3_000 + i));
        }
        let (a, mut peer) = UnixStream::pair().unwrap();
        peer.set_write_timeout(Some(PATIENCE)).unwrap();
        let conn = PacketConnection::from_unix_stream(a, config).unwrap();
        match i % 3 {
            0 => {
                peer.write_all(&wire(&request(1, 1, 0, &[0; 30]))[..5])
                    .unwrap();
                silent.push((conn, peer));
            }
            1 => {
                conn.abort();
                drop(conn);
                drop(peer);
            }
            _ => {
                drop(conn);
                drop(peer);
            }
        }
    }
    assert!(keeper_threads() <= 1);
    wait_for(
        "the half packets to time out",
        Duration::from_secs(20),
        || silent.iter().all(|(c, _)| ended(c).is_some()),
    );
    for (conn, _) in &silent {
        assert_eq!(ended(conn), Some(Disconnect::Silent), "{}", conn.name());
    }
    drop(silent);
    for name in &names {
        common::assert_threads_gone(name, PATIENCE);
    }
    wait_for("the keeper to end", PATIENCE, || keeper_threads() == 0);

    // It starts again; a connection with a long look (1 s) first, then one
    // with a short timeout, registered while the keeper sleeps for the first.
    let (a, _peer_a) = UnixStream::pair().unwrap();
    let long = PacketConnection::from_unix_stream(
        a,
        Config::default()
            .name("klong")
            .extensions(false)
            .idle_timeout(Duration::from_secs(60)),
    )
    .unwrap();
    wait_for("the keeper to start", PATIENCE, || keeper_threads() == 1);
    thread::sleep(ms(100));
    let (b, mut peer_b) = UnixStream::pair().unwrap();
    let short = PacketConnection::from_unix_stream(
        b,
        Config::default()
            .name("kshort")
            .extensions(false)
            .packet_timeout(ms(60)),
    )
    .unwrap();
    peer_b
        .write_all(&wire(&request(1, 1, 0, &[0; 30]))[..5])
        .unwrap();
    let started = Instant::now();
    wait_for("the short timeout", PATIENCE, || ended(&short).is_some());
    assert_eq!(ended(&short), Some(Disconnect::Silent));
    // Its looks come every 15 ms, the other's every second: reported, not
    // asserted (the machine's load decides how late it runs).
    common::report(format!(
        "a 60 ms packet timeout registered while the keeper slept for a 1 s look ran out after {:?}",
        started.elapsed()
    ));
    assert_eq!(keeper_threads(), 1);
    short.abort();
    long.abort();
    wait_for("the keeper to end again", PATIENCE, || {
        keeper_threads() == 0
    });
}

/// How often the keeper wakes for connections that only have long timeouts
/// (a server's defaults: idle 10 min, packet 30 s: a look a second each).
#[test]
fn the_keeper_wakes_rarely_for_long_timeouts() {
    if !common::isolated(
        "the_keeper_wakes_rarely_for_long_timeouts",
        Duration::from_secs(60),
    ) {
        return;
    }
    let mut conns = Vec::new();
    for i in 0..200 {
        let (a, peer) = UnixStream::pair().unwrap();
        let conn = PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name(format!("w{i}"))
                .extensions(false)
                .packet_timeout(Duration::from_secs(30))
                .idle_timeout(Duration::from_secs(600)),
        )
        .unwrap();
        conns.push((conn, peer));
        thread::sleep(ms(3));
    }
    thread::sleep(ms(1500));
    let before = keeper_switches().expect("the keeper runs");
    thread::sleep(ms(2000));
    let after = keeper_switches().expect("the keeper runs");
    let per_second = (after - before) / 2;
    common::report(format!(
        "keeper wake-ups a second, 200 connections with 1 s looks: {per_second}"
    ));
    for (conn, _) in &conns {
        conn.abort();
    }
    // Each connection looks once a second, on a 320 ms grid: the 200
    // connections' looks share about 3 wake-ups a second (on a 5 ms grid
    // they fell on up to 200 different steps: 128 a second were measured).
    // Wake-ups do not grow with the machine's load, only with the looks.
    assert!(per_second < 20, "{per_second}");
}

/// A quiet connection with a short keepalive, between two live ends of
/// this crate: every ping is answered at once. An answer read before the
/// ping is stamped would count as heard before the ping, and the live peer
/// be given up as `NoAnswer` one period later: the ping is stamped before it
/// goes. Busy threads make the keeper lose its CPU to the threads it wakes,
/// as on a loaded machine.
#[test]
fn keepalive_does_not_give_up_a_peer_that_answers_every_ping() {
    let _serial = common::serial();
    let (client, server) = pair_with(
        Config::default().name(unique_name("kpc")).keepalive(ms(60)),
        Config::default()
            .name(unique_name("kps"))
            .handler(common::echo),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(31).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    let client_end = ends_within(&client, Duration::from_secs(8));
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    let pings = server.stats();
    client.abort();
    server.abort();
    assert_eq!(
        client_end, None,
        "a peer answering every ping was given up (server stats {pings:?})"
    );
}

/// A `Server` whose shared handler pool is busy: a client pipelines more
/// requests than its quota, so its receive thread waits for room, longer
/// than the packet timeout. Every request is answered (the client sent
/// every packet whole), and the client is not dropped as `Silent`.
#[test]
fn a_server_under_backpressure_keeps_a_client_that_sent_whole_packets() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (why_tx, why_rx) = mpsc::channel();
    let why_tx = Mutex::new(why_tx);
    let server = Server::serve_tcp(
        listener,
        ServerConfig::new(
            Config::default()
                .name(unique_name("bps"))
                .handler_queue(2)
                .handler(|rq: Request| -> HandlerResult {
                    thread::sleep(ms(60));
                    Ok(rq.payload.into())
                }),
        )
        .handler_threads(1)
        .packet_timeout(ms(200))
        .on_close(move |_, why| {
            let _ = why_tx.lock().unwrap().send(why);
        }),
    )
    .unwrap();
    let client =
        PacketConnection::connect_tcp(addr, Config::default().name(unique_name("bpc"))).unwrap();
    let pending: Vec<_> = (0..20)
        .map(|_| client.submit(1, 0, b"work").unwrap())
        .collect();
    let results: Vec<_> = pending
        .into_iter()
        .map(|p| p.wait_timeout(PATIENCE))
        .collect();
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    let n_failed = failed.len();
    let first = failed.first().map(|r| format!("{r:?}"));
    let server_end = why_rx.recv_timeout(ms(300)).ok();
    client.abort();
    within("stop", move || server.stop_timeout(PATIENCE)).ok();
    assert_eq!(
        n_failed, 0,
        "{n_failed} of 20 whole requests lost under backpressure: {first:?}; \
         the server ended the client with {server_end:?}"
    );
}

/// A slow-loris peer that never finishes a packet, one byte well inside
/// the packet timeout each time: `idle_timeout` ("no packet of the
/// application received") ends the connection, inside a packet too.
#[test]
fn a_trickling_peer_that_never_finishes_a_packet_is_ended_by_the_idle_timeout() {
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("lor"))
            .packet_timeout(ms(300))
            .idle_timeout(ms(400)),
    );
    // A packet of 1000 bytes announced; a byte every 100 ms.
    let bytes = wire(&request(2, 1, 0, &[3; 1000]));
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < ms(2500) && ended(&conn).is_none() {
        if peer.stream.write_all(&bytes[sent..sent + 1]).is_err() {
            break;
        }
        sent += 1;
        thread::sleep(ms(100));
    }
    let why = ended(&conn);
    conn.abort();
    assert!(
        why.is_some(),
        "a peer holding a packet open for {:?} ({sent} bytes) outlived an idle timeout of 400 ms",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Idleness hidden behind this end's own work, or behind packets that are not
// the application's, and its siblings.

/// A response on the reserved channel to a request never made.
fn control_response(tag: u64) -> Packet {
    Packet {
        channel: CONTROL_CHANNEL,
        tag,
        kind: PacketKind::Response { ok: true, flags: 0 },
        payload: Vec::new(),
    }
}

/// A ping request on the reserved channel.
fn control_ping(tag: u64) -> Packet {
    Packet {
        channel: CONTROL_CHANNEL,
        tag,
        kind: PacketKind::Request {
            rq_type: 1,
            flags: 0,
        },
        payload: Vec::new(),
    }
}

/// Reads and discards everything from `stream` until it ends or fails.
fn drain(mut stream: impl Read + Send + 'static) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut total = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    })
}

/// Reads `chunk` bytes from `stream` every `every` until it ends or fails,
/// decoding the packets: returns how many came, and where among them the
/// reply to the application's request (channel 0, tag 0) was.
fn slow_reader(
    mut stream: impl Read + Send + 'static,
    chunk: usize,
    every: Duration,
) -> thread::JoinHandle<(u64, Option<u64>)> {
    thread::spawn(move || {
        let (mut count, mut reply_at) = (0u64, None);
        let mut buf = Vec::new();
        let mut piece = vec![0u8; chunk];
        loop {
            match stream.read(&mut piece) {
                Ok(0) | Err(_) => return (count, reply_at),
                Ok(n) => buf.extend_from_slice(&piece[..n]),
            }
            while let Ok(Some((packet, used))) = Packet::decode(&buf, u64::MAX) {
                buf.drain(..used);
                count += 1;
                if packet.channel == 0 && packet.tag == 0 {
                    reply_at = Some(count);
                }
            }
            thread::sleep(every);
        }
    })
}

/// Writes `make(i)` every `every` until `stop`, a failed write, or `span`.
fn feed(
    mut stream: impl Write + Send + 'static,
    stop: Arc<AtomicBool>,
    every: Duration,
    span: Duration,
    make: impl Fn(u64) -> Vec<u8> + Send + 'static,
) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let started = Instant::now();
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) && started.elapsed() < span {
            if stream.write_all(&make(i)).is_err() {
                break;
            }
            i += 1;
            if !every.is_zero() {
                thread::sleep(every);
            }
        }
        i
    })
}

// ---------------------------------------------------------------------------
// Idleness is judged whatever the reader does.

/// Both ends of this crate, quiet. This end has a keepalive and an idle
/// timeout: the pings and their answers are not the application's traffic
/// (Config::keepalive: "they keep no connection from idle_timeout, at
/// either end"), so the idle timeout must still end the connection, though
/// after each answer (a response) the receive thread lends its reader,
/// which rests unread for a while.
#[test]
fn keepalive_answers_keep_no_connection_from_its_idle_timeout() {
    let (client, server) = common::pair_with(
        Config::default()
            .name(unique_name("rka"))
            .keepalive(ms(40))
            .idle_timeout(ms(200)),
        Config::default()
            .name(unique_name("rkA"))
            .handler(common::echo),
    );
    let why = ends_within(&client, Duration::from_secs(5));
    let pinged = client.stats();
    client.abort();
    server.abort();
    assert_eq!(
        why,
        Some(Disconnect::Idle),
        "idle 200 ms, keepalive 40 ms, nothing of the application for 5 s: \
         still open ({pinged:?})"
    );
}

/// The same with ordinary periods (keepalive 100 ms, idle 400 ms) and a
/// peer that answers each ping 20 ms later, as over a network, so that the
/// keeper's looks find the reader lent, at rest.
#[test]
fn keepalive_answers_after_a_round_trip_keep_no_connection_from_its_idle_timeout() {
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("rkr"))
            .keepalive(ms(100))
            .idle_timeout(ms(400)),
    );
    let answerer = thread::spawn(move || {
        let mut answered = 0u32;
        while let Ok(Some(packet)) = peer.try_recv() {
            if packet.channel == CONTROL_CHANNEL
                && matches!(packet.kind, PacketKind::Request { .. })
            {
                thread::sleep(ms(20));
                if peer
                    .stream
                    .write_all(&wire(&control_response(packet.tag)))
                    .is_err()
                {
                    break;
                }
                answered += 1;
            }
        }
        answered
    });
    let why = ends_within(&conn, Duration::from_secs(5));
    conn.abort();
    let answered = within("the answerer", move || answerer.join().unwrap());
    assert_eq!(
        why,
        Some(Disconnect::Idle),
        "idle 400 ms, keepalive 100 ms, {answered} pings answered after 20 ms, \
         nothing of the application for 5 s: still open"
    );
}

/// A hostile peer tries to hold a connection with an idle timeout open for
/// ever by sending, every few milliseconds, a tiny response on the reserved
/// channel to a request never made: no packet of the application, though
/// each makes the receive thread lend its reader.
#[test]
fn unsolicited_control_responses_hold_no_connection_past_its_idle_timeout() {
    let (conn, peer) = RawPeer::with(
        Config::default()
            .name(unique_name("rcr"))
            .idle_timeout(ms(300))
            .handler(common::echo),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(
        peer.stream.try_clone().unwrap(),
        Arc::clone(&stop),
        ms(5),
        Duration::from_secs(6),
        |i| wire(&control_response(1_000_000 + i)),
    );
    let why = ends_within(&conn, Duration::from_secs(5));
    stop.store(true, Ordering::SeqCst);
    let sent = within("the feeder", move || feeder.join().unwrap());
    conn.abort();
    assert_eq!(
        why,
        Some(Disconnect::Idle),
        "idle 300 ms; {sent} control responses and nothing of the application in 5 s: \
         still open"
    );
}

/// The same against a `Server` (idle timeout set short), over TCP, where a
/// socket whose reading is shut down still hands over what arrives: a
/// client that sends nothing of the application is reclaimed.
#[test]
fn a_server_reclaims_a_client_sending_only_control_responses() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (why_tx, why_rx) = mpsc::channel();
    let why_tx = Mutex::new(why_tx);
    let server = Server::serve_tcp(
        listener,
        ServerConfig::new(
            Config::default()
                .name(unique_name("rsv"))
                .handler(common::echo),
        )
        .idle_timeout(ms(300))
        .on_close(move |_, why| {
            let _ = why_tx.lock().unwrap().send(why);
        }),
    )
    .unwrap();
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    let drainer = drain(stream.try_clone().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(
        stream.try_clone().unwrap(),
        Arc::clone(&stop),
        ms(5),
        Duration::from_secs(6),
        |i| wire(&control_response(1_000_000 + i)),
    );
    let why = why_rx.recv_timeout(Duration::from_secs(5)).ok();
    stop.store(true, Ordering::SeqCst);
    let sent = within("the feeder", move || feeder.join().unwrap());
    let _ = stream.shutdown(Shutdown::Both);
    within("the drainer", move || drainer.join().unwrap());
    within("stop", move || server.stop_timeout(PATIENCE)).ok();
    assert_eq!(
        why,
        Some(Disconnect::Idle),
        "server idle 300 ms; the client sent {sent} control responses and nothing else \
         in 5 s: not reclaimed"
    );
}

/// A peer that floods pings (control requests, answered on the receive
/// thread) keeps the reader parsing, not reading, most of the time; the
/// idle timeout still runs out.
#[test]
fn a_flood_of_pings_holds_no_connection_past_its_idle_timeout() {
    let (conn, peer) = RawPeer::with(
        Config::default()
            .name(unique_name("rpf"))
            .idle_timeout(ms(300))
            .handler(common::echo),
    );
    let drainer = drain(peer.stream.try_clone().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let batch: Vec<u8> = (0..2000).flat_map(|i| wire(&control_ping(i))).collect();
    let feeder = feed(
        peer.stream.try_clone().unwrap(),
        Arc::clone(&stop),
        Duration::ZERO,
        Duration::from_secs(6),
        move |_| batch.clone(),
    );
    let why = ends_within(&conn, Duration::from_secs(5));
    stop.store(true, Ordering::SeqCst);
    let batches = within("the feeder", move || feeder.join().unwrap());
    conn.abort();
    let _ = peer.stream.shutdown(Shutdown::Both);
    within("the drainer", move || drainer.join().unwrap());
    assert_eq!(
        why,
        Some(Disconnect::Idle),
        "idle 300 ms; {batches} batches of 2000 pings, nothing of the application in 5 s: \
         still open"
    );
}

/// One request of the application amid a flood of pings, whose answers the
/// peer reads slowly: only the writes that take the application's reply
/// count as the peer taking the application's packets. The answers to the
/// pings queued with the reply, after it, do not hold the connection open:
/// it ends as idle while many of them are still unwritten.
#[test]
fn one_request_amid_a_ping_flood_read_slowly_holds_no_connection_past_its_idle_timeout() {
    // Pings before the request, and after it: the answers after the reply
    // take the slow reader about 4.5 s, far past the idle timeout. The
    // reader takes 8 KiB a time: a writer blocked on a full Unix socket is
    // woken only once most of its buffer has been read, which must take
    // well under the idle timeout, since nothing shows the peer reading
    // meanwhile.
    const BEFORE: u64 = 40_000;
    const AFTER: u64 = 3 * BEFORE;
    let (conn, peer) = RawPeer::with(
        Config::default()
            .name(unique_name("rpa"))
            .idle_timeout(ms(1000))
            .handler(common::echo),
    );
    let slow = slow_reader(peer.stream.try_clone().unwrap(), 8192, ms(10));
    let mut burst: Vec<u8> = (1..=BEFORE).flat_map(|i| wire(&control_ping(i))).collect();
    burst.extend(wire(&request(0, 1, 0, b"the application's")));
    burst.extend((BEFORE + 1..=BEFORE + AFTER).flat_map(|i| wire(&control_ping(i))));
    let mut writer = peer.stream.try_clone().unwrap();
    // Its write may fail once the connection has ended, which may come
    // before all the pings after the request are read.
    let feeder = thread::spawn(move || {
        let _ = writer.write_all(&burst);
    });
    let why = ends_within(&conn, Duration::from_secs(12));
    conn.abort();
    let _ = peer.stream.shutdown(Shutdown::Both);
    within("the feeder", move || feeder.join().unwrap());
    let (answers, reply_at) = within("the slow reader", move || slow.join().unwrap());
    assert_eq!(why, Some(Disconnect::Idle), "idle 1 s");
    let reply_at = reply_at.expect("the application's reply never came");
    assert!(
        answers < BEFORE + AFTER + 1,
        "idle 1 s: the reply came as answer {reply_at}, and the connection stayed open \
         until all {answers} answers were written"
    );
}

/// ERQ is a control packet (PacketKind::Control), not a packet of the
/// application; the peer may say it once. A peer that repeats it every
/// 100 ms must not hold a connection with a 300 ms idle timeout.
#[test]
fn a_repeated_erq_holds_no_connection_past_its_idle_timeout() {
    let (conn, peer) = RawPeer::with(
        Config::default()
            .name(unique_name("rer"))
            .idle_timeout(ms(300))
            .handler(common::echo),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(
        peer.stream.try_clone().unwrap(),
        Arc::clone(&stop),
        ms(100),
        Duration::from_secs(4),
        |_| wire(&Packet::erq()),
    );
    let why = ends_within(&conn, Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let sent = within("the feeder", move || feeder.join().unwrap());
    conn.abort();
    assert_eq!(
        why,
        Some(Disconnect::Idle),
        "idle 300 ms; {sent} ERQs and nothing else in 3 s: still open"
    );
}

// ---------------------------------------------------------------------------
// What held up.

/// A request of the peer's whose handler runs for longer than the idle
/// timeout is in progress: the connection is not idle meanwhile, and the
/// call is answered.
#[test]
fn a_slow_handler_longer_than_the_idle_timeout_is_not_idle() {
    let (client, server) = common::pair_with(
        Config::default().name(unique_name("rsc")),
        Config::default()
            .name(unique_name("rss"))
            .idle_timeout(ms(150))
            .handler(|rq: Request| -> HandlerResult {
                thread::sleep(ms(900));
                Ok(rq.payload.into())
            }),
    );
    let res = client.call_timeout(1, 0, b"slow", PATIENCE);
    let server_end = ended(&server);
    // Then idle: the server ends it.
    let later = ends_within(&server, PATIENCE);
    client.abort();
    server.abort();
    assert!(
        res.as_ref().is_ok_and(|r| r.payload == b"slow") && server_end.is_none(),
        "{res:?}, server ended {server_end:?}"
    );
    assert_eq!(later, Some(Disconnect::Idle));
}

/// An oversize request is refused at once and skipped; a peer that then
/// goes silent inside it is ended as `Silent`.
#[test]
fn silence_inside_a_skipped_oversize_packet_ends_as_silent() {
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("rov"))
            .max_packet_len(100)
            .packet_timeout(ms(200))
            .handler(common::echo),
    );
    let head = wire(&request(5, 1, 0, b""));
    let prefix = bsuint((head.len() - 1 + 10_000) as u128);
    peer.send_bytes(&prefix);
    peer.send_bytes(&head[1..]);
    peer.send_bytes(&[7; 500]);
    let refusal = peer.recv_packet();
    assert_eq!(refusal.tag, 5);
    assert!(matches!(
        refusal.kind,
        PacketKind::Response { ok: false, .. }
    ));
    let why = ends_within(&conn, PATIENCE);
    conn.abort();
    assert_eq!(why, Some(Disconnect::Silent));
}

/// Keepalive against a peer that reads every byte this end writes but
/// never sends one: this end keeps submitting, its writes never fill the
/// stream (so they prove nothing), and the peer is given up as
/// `NoAnswer`. Every request ends once, with that loss.
#[test]
fn keepalive_gives_up_a_peer_that_reads_all_and_never_answers() {
    let (conn, peer) = RawPeer::with(
        Config::default()
            .name(unique_name("rna"))
            .keepalive(ms(100)),
    );
    let drainer = drain(peer.stream.try_clone().unwrap());
    let conn = Arc::new(conn);
    let mut pending = Vec::new();
    let started = Instant::now();
    while ended(&conn).is_none() && started.elapsed() < Duration::from_secs(5) {
        match conn.submit(1, 0, &[1; 512]) {
            Ok(p) => pending.push(p),
            Err(_) => break,
        }
        thread::sleep(ms(10));
    }
    let why = ends_within(&conn, PATIENCE);
    let outcomes: Vec<_> = pending
        .into_iter()
        .map(|p| p.wait_timeout(PATIENCE))
        .collect();
    conn.abort();
    let _ = peer.stream.shutdown(Shutdown::Both);
    within("the drainer", move || drainer.join().unwrap());
    assert_eq!(why, Some(Disconnect::NoAnswer));
    assert!(!outcomes.is_empty());
    for res in &outcomes {
        assert!(
            matches!(
                res,
                Err(Error::ConnectionLost(Disconnect::NoAnswer)
                    | Error::Unsent(Disconnect::NoAnswer))
            ),
            "{res:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Users.

/// A client with a keepalive calls a server of this crate whose inline
/// handler takes longer than the keepalive period: the server reads
/// nothing meanwhile, so it cannot answer the ping, and the client takes it
/// for gone, as `Config::keepalive` says. The call fails once, with
/// `NoAnswer`.
#[test]
fn a_peers_inline_handler_slower_than_the_keepalive_is_taken_for_gone() {
    let (client, server) = common::pair_with(
        Config::default()
            .name(unique_name("rih"))
            .keepalive(ms(100)),
        Config::default()
            .name(unique_name("riH"))
            .inline_handler(|rq: Request| -> HandlerResult {
                thread::sleep(ms(700));
                Ok(rq.payload.into())
            }),
    );
    let res = client.call_timeout(1, 0, b"slow", PATIENCE);
    let client_end = ends_within(&client, PATIENCE);
    client.abort();
    server.abort();
    assert!(
        lost_with(&res, Disconnect::NoAnswer) && client_end == Some(Disconnect::NoAnswer),
        "a peer busy in its inline handler for 700 ms, keepalive 100 ms: {res:?}, \
         the client ended {client_end:?}"
    );
}

/// A server (idle timeout 300 ms) answers a request with a 4 MiB reply,
/// which the client reads steadily but slowly (a slow link): nothing is
/// pending either way, but the peer taking the reply is activity, and the
/// download is not cut as `Idle`.
#[test]
fn a_slow_download_of_a_large_reply_is_not_cut_as_idle() {
    slow_download_is_not_cut_as_idle(4 << 20, 1);
}

/// As above, with 64 requests sent at once answered with replies of
/// 48 KiB each: under 64 KiB, so copied into the server's batches.
#[test]
fn a_slow_download_of_many_medium_replies_is_not_cut_as_idle() {
    slow_download_is_not_cut_as_idle(48 << 10, 64);
}

/// `count` requests sent at once to a server (idle timeout 300 ms) that
/// answers each with `len` bytes, read 64 KiB every 30 ms.
fn slow_download_is_not_cut_as_idle(len: usize, count: u64) {
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("sdl"))
            .idle_timeout(ms(300))
            .max_queued_bytes(16 << 20)
            .handler(move |_rq: Request| -> HandlerResult { Ok(vec![7u8; len].into()) }),
    );
    for tag in 0..count {
        peer.request(tag, 1, b"");
    }
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut answered = 0;
    let started = Instant::now();
    while answered < count {
        while let Some((packet, used)) = Packet::decode(&buf, u64::MAX).unwrap() {
            buf.drain(..used);
            assert_eq!(packet.payload.len(), len, "a reply of tag {}", packet.tag);
            answered += 1;
        }
        if answered == count {
            break;
        }
        match peer.stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        assert!(started.elapsed() < PATIENCE * 2, "download hung");
        thread::sleep(ms(30));
    }
    let why = ended(&conn);
    conn.abort();
    assert!(
        answered == count,
        "replies of {len} bytes read steadily for {:?} were cut after {answered} of {count} \
         (and {} bytes); the server ended {why:?}",
        started.elapsed(),
        buf.len()
    );
}

// ---------------------------------------------------------------------------
// Packets that only look like the application's, and a timeout inside an
// oversize packet's head.

/// The first request packet the peer reads.
fn first_request(peer: &mut RawPeer) -> Packet {
    let (_, packet) = peer.recv_until(|p| matches!(p.kind, PacketKind::Request { .. }));
    packet
}

// ---------------------------------------------------------------------------
// A hostile peer holding a connection past its idle timeout.

/// This end made one request, and the peer answered it. The peer then
/// replays that answer every 20 ms: a response to a request that is no
/// longer pending, which answers nothing (the application never sees it),
/// exactly like the stray responses the idle timeout already ignores. It
/// must not hold the connection past its 300 ms idle timeout.
#[test]
fn replayed_responses_to_an_answered_request_hold_no_connection_past_its_idle_timeout() {
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("t2r"))
            .idle_timeout(ms(300)),
    );
    let pending = conn.submit(1, 0, b"once").unwrap();
    let tag = first_request(&mut peer).tag;
    peer.send(&response(tag, true, 0, b"answer"));
    let first = pending.wait_timeout(PATIENCE);
    assert!(first.is_ok_and(|r| r.payload == b"answer"));
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(
        peer.stream.try_clone().unwrap(),
        Arc::clone(&stop),
        ms(20),
        Duration::from_secs(4),
        move |_| wire(&response(tag, true, 0, b"again")),
    );
    let why = ends_within(&conn, Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let sent = within("the feeder", move || feeder.join().unwrap());
    conn.abort();
    let _ = peer.stream.shutdown(Shutdown::Both);
    assert_eq!(
        why,
        Some(Disconnect::Idle),
        "idle 300 ms; {sent} replays of the answer to a request already answered, \
         nothing else in 3 s: still open"
    );
}

/// The same with a request this end gave up on (its handle dropped, which
/// cancels it): the peer answers it late, again and again.
#[test]
fn late_answers_to_a_cancelled_request_hold_no_connection_past_its_idle_timeout() {
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("t2c"))
            .idle_timeout(ms(300)),
    );
    drop(conn.submit(1, 0, b"never mind").unwrap());
    let tag = first_request(&mut peer).tag;
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(
        peer.stream.try_clone().unwrap(),
        Arc::clone(&stop),
        ms(20),
        Duration::from_secs(4),
        move |_| wire(&response(tag, true, 0, b"late")),
    );
    let why = ends_within(&conn, Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let sent = within("the feeder", move || feeder.join().unwrap());
    conn.abort();
    let _ = peer.stream.shutdown(Shutdown::Both);
    assert_eq!(
        why,
        Some(Disconnect::Idle),
        "idle 300 ms; {sent} answers to a cancelled request in 3 s: still open"
    );
}

/// The peer sent ERQ (it will make no more requests), then sends a request
/// every 20 ms anyway: each is refused "requests no longer allowed" without
/// running, a protocol violation like a repeated ERQ. It must not hold the
/// connection past its idle timeout.
#[test]
fn requests_refused_after_the_peers_erq_hold_no_connection_past_its_idle_timeout() {
    let config = Config::default().idle_timeout(ms(300));
    let (why, sent, served) = refused_after_erq(config, ms(20), Duration::from_secs(3), |i| {
        wire(&request(100 + i, 1, 0, b"after erq"))
    });
    assert_eq!(
        why,
        Some(Disconnect::Idle),
        "idle 300 ms; ERQ, then {sent} requests refused as not allowed in 3 s: still open \
         ({served:?})"
    );
}

/// A peer sends ERQ, then floods requests, every one refused ("requests
/// no longer allowed"), and reads the refusals at once. Refused requests
/// are not activity, nor is the making of their refusals: with the
/// keeper's look every 25 ms (packet timeout 100 ms) against an idle
/// timeout of 1 s, a look landing while a refusal is made must not count
/// the connection busy.
#[test]
fn a_flood_of_refused_requests_read_at_once_holds_no_connection_past_its_idle_timeout() {
    let config = Config::default()
        .idle_timeout(Duration::from_secs(1))
        .packet_timeout(ms(100));
    let (why, batches, stats) = refused_after_erq(config, ms(0), Duration::from_secs(6), |i| {
        (0..500u64)
            .flat_map(|j| wire(&request(1 + i * 500 + j, 1, 0, b"")))
            .collect()
    });
    assert_eq!(
        why,
        Some(Disconnect::Idle),
        "idle 1 s; ERQ then {batches} batches of 500 refused requests, nothing of the \
         application in 6 s: still open ({stats:?})"
    );
}

/// A peer sends ERQ, then `make(i)` every `every`, reading all that comes;
/// how the connection (an echo handler, with `config`) ended within
/// `watch`, how many were sent, and its counters.
fn refused_after_erq(
    config: Config,
    every: Duration,
    watch: Duration,
    make: impl Fn(u64) -> Vec<u8> + Send + 'static,
) -> (Option<Disconnect>, u64, packetstream::Stats) {
    let (conn, peer) = RawPeer::with(config.name(unique_name("rfe")).handler(common::echo));
    let drainer = drain(peer.stream.try_clone().unwrap());
    let mut stream = peer.stream.try_clone().unwrap();
    stream.write_all(&wire(&Packet::erq())).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(
        stream,
        Arc::clone(&stop),
        every,
        watch + Duration::from_secs(2),
        make,
    );
    let why = ends_within(&conn, watch);
    stop.store(true, Ordering::SeqCst);
    let sent = within("the feeder", move || feeder.join().unwrap());
    let stats = conn.stats();
    conn.abort();
    let _ = peer.stream.shutdown(Shutdown::Both);
    within("the drainer", move || drainer.join().unwrap());
    (why, sent, stats)
}

/// A peer floods pings, as in `a_flood_of_pings_…`, but reads the answers
/// slowly, so that this end's stream stays full and each of its reads lets
/// a write go on: "the peer taking this end's writes" is then only the
/// answers to its pings, which are not the application's traffic. It must
/// not hold the connection past its idle timeout.
#[test]
fn pings_whose_answers_are_read_slowly_hold_no_connection_past_its_idle_timeout() {
    let (conn, peer) = RawPeer::with(
        Config::default()
            .name(unique_name("t2p"))
            .idle_timeout(ms(300))
            .handler(common::echo),
    );
    let mut stream = peer.stream.try_clone().unwrap();
    stream.set_read_timeout(Some(ms(200))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let peer_thread = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let batch: Vec<u8> = (0..1000).flat_map(|i| wire(&control_ping(i))).collect();
            let started = Instant::now();
            let mut sent_batches = 0u64;
            let mut read = 0u64;
            let mut chunk = [0u8; 2048];
            // About 20 bytes of answer per ping (a refusal: extensions off),
            // so 1000 pings are about 20 KB of answers; keep about 1 MB of
            // answers owed, far past what the socket holds, far under the
            // budget of replies.
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(5) {
                while sent_batches * 20_000 < read + 1_000_000 {
                    if stream.write_all(&batch).is_err() {
                        return (sent_batches, read);
                    }
                    sent_batches += 1;
                }
                match stream.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => read += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
                thread::sleep(ms(2));
            }
            (sent_batches, read)
        })
    };
    let why = ends_within(&conn, Duration::from_secs(3));
    let stats = conn.stats();
    stop.store(true, Ordering::SeqCst);
    conn.abort();
    let (batches, read) = within("the peer", move || peer_thread.join().unwrap());
    let _ = peer.stream.shutdown(Shutdown::Both);
    assert_eq!(
        why,
        Some(Disconnect::Idle),
        "idle 300 ms; {batches} batches of 1000 pings, {read} bytes of answers read \
         slowly, nothing of the application in 3 s: still open ({stats:?})"
    );
}

// ---------------------------------------------------------------------------
// The reason reported.

/// An oversize packet whose head the peer stops sending half-way (inside
/// its tag): the packet timeout runs out inside a packet, and the
/// connection should end as `Silent`, as it does when the silence comes in
/// the payload of an oversize packet (`keeper.rs`), not as a protocol
/// error.
#[test]
fn silence_inside_the_head_of_an_oversize_packet_ends_as_silent() {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("t2o"))
            .max_packet_len(100)
            .packet_timeout(ms(200))
            .handler(common::echo)
            .on_end(move |why| {
                let _ = tx.lock().unwrap().send(why);
            }),
    );
    // A length of 10 000, then the first byte of a two-byte tag.
    peer.send_bytes(&bsuint(10_000));
    peer.send_bytes(&[0x85]);
    let on_end = rx.recv_timeout(PATIENCE).ok();
    let why = ended(&conn);
    let joined = conn.join();
    conn.abort();
    assert_eq!(
        (why, on_end),
        (Some(Disconnect::Silent), Some(Disconnect::Silent)),
        "silent inside an oversize packet's head for 200 ms: join gave {joined:?}"
    );
}

// ---------------------------------------------------------------------------
// What held up (kept, as checks).

/// A TCP client with an idle timeout makes one call and then rests: the
/// reader is lent to callers and at rest when the timeout runs out. The
/// connection ends as `Idle` promptly, on_end says so, and a call made
/// afterwards fails once, at once.
#[test]
fn a_tcp_client_resting_with_its_reader_lent_ends_as_idle_promptly() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_thread = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let server = PacketConnection::from_tcp_stream(
            stream,
            Config::default()
                .name(unique_name("t2S"))
                .handler(common::echo),
        )
        .unwrap();
        let res = server.join();
        server.abort();
        res
    });
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let client = PacketConnection::from_tcp_stream(
        TcpStream::connect(addr).unwrap(),
        Config::default()
            .name(unique_name("t2C"))
            .idle_timeout(ms(300))
            .on_end(move |why| {
                let _ = tx.lock().unwrap().send((why, Instant::now()));
            }),
    )
    .unwrap();
    let res = client.call_timeout(1, 0, b"hi", PATIENCE);
    assert!(res.is_ok(), "{res:?}");
    let rested = Instant::now();
    let end = rx.recv_timeout(PATIENCE).ok();
    let late = client.call_timeout(1, 0, b"late", PATIENCE);
    client.abort();
    let server_res = within("the server", move || server_thread.join().unwrap());
    let (why, at) = end.expect("the client ended");
    assert_eq!(why, Disconnect::Idle);
    assert!(at.duration_since(rested) < Duration::from_secs(3));
    assert!(matches!(late, Err(Error::Closed)), "{late:?}");
    let _ = server_res;
}

/// Requests from the peer arrive in one burst while the handler is slow:
/// the receive thread parses and queues them, its handler queue fills, and
/// the reader waits for room for longer than the idle timeout. Every
/// request is answered once; the connection then goes idle, ends as
/// `Idle`, and the peer sees the stream end.
#[test]
fn a_burst_parsed_behind_a_full_queue_is_answered_once_then_idle() {
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("t2q"))
            .idle_timeout(ms(200))
            .handler_threads(1)
            .handler_queue(1)
            .handler(|rq: Request| -> HandlerResult {
                thread::sleep(ms(150));
                Ok(rq.payload.into())
            }),
    );
    let burst: Vec<u8> = (0..6)
        .flat_map(|i| wire(&request(10 + i, 1, 0, &[i as u8])))
        .collect();
    peer.send_bytes(&burst);
    let mut answered = Vec::new();
    let mut end = false;
    while let Ok(got) = peer.try_recv() {
        match got {
            Some(p) if matches!(p.kind, PacketKind::Response { .. }) => answered.push(p.tag),
            Some(_) => {}
            None => {
                end = true;
                break;
            }
        }
    }
    let why = ends_within(&conn, PATIENCE);
    conn.abort();
    answered.sort_unstable();
    assert_eq!(answered, (10..16).collect::<Vec<_>>());
    assert!(end, "the stream should end after Idle");
    assert_eq!(why, Some(Disconnect::Idle));
}

/// An orderly close racing the idle timeout: the peer answers the close
/// (EOF) at about the moment the idle timeout runs out. Whatever wins, the
/// close's result, on_end and status agree.
#[test]
fn close_racing_the_idle_timeout_reports_one_ending() {
    for round in 0..6u64 {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let (conn, mut peer) = RawPeer::with(
            Config::default()
                .name(unique_name("t2x"))
                .idle_timeout(ms(150))
                .on_end(move |why| {
                    let _ = tx.lock().unwrap().send(why);
                }),
        );
        let answer = thread::spawn(move || {
            // ERQ and EOF of the close, then ours, after about the idle
            // timeout.
            let (_, _) = peer.recv_until(|p| p.is_eof());
            thread::sleep(ms(100 + round * 10));
            let _ = peer.stream.write_all(&wire(&Packet::erq()));
            let _ = peer.stream.write_all(&wire(&Packet::eof()));
            let _ = peer.try_recv();
        });
        thread::sleep(ms(20));
        let res = conn.close_timeout(PATIENCE);
        let on_end = rx.recv_timeout(PATIENCE).ok();
        let status = ended(&conn);
        within("the peer", move || answer.join().unwrap());
        let from_close = match &res {
            Ok(()) => Some(Disconnect::PeerEof),
            Err(Error::ConnectionLost(why)) => Some(*why),
            Err(_) => None,
        };
        assert!(
            from_close.is_some() && from_close == on_end && on_end == status,
            "round {round}: close {res:?}, on_end {on_end:?}, status {status:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Panics reachable from the peer's bytes.

/// With no practical length limit (`max_packet_len(u64::MAX)`), a peer
/// announces a packet of u64::MAX bytes and sends one byte of it. The
/// connection should refuse or wait for it, never panic its receive thread:
/// a pending call then fails once, and the connection ends within bounds
/// once the peer goes.
#[test]
fn a_length_prefix_of_u64_max_does_not_panic_the_reader() {
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("t2m"))
            .max_packet_len(u64::MAX)
            .packet_timeout(ms(300)),
    );
    let pending = conn.submit(1, 0, b"q").unwrap();
    let _ = first_request(&mut peer);
    peer.send_bytes(&bsuint(u128::from(u64::MAX)));
    peer.send_bytes(&[0x02]);
    let res = pending.wait_timeout(Duration::from_secs(5));
    let why = ends_within(&conn, Duration::from_secs(3));
    let _ = peer.stream.shutdown(Shutdown::Both);
    let later = ends_within(&conn, Duration::from_secs(3));
    conn.abort();
    assert!(
        matches!(&res, Err(Error::ConnectionLost(_) | Error::Unsent(_))) && why.is_some(),
        "the call gave {res:?}; the connection ended {why:?} (after the peer went: {later:?})"
    );
}

/// A hook of the user's that runs on the receive thread panics (an unlucky
/// `unwrap` in `on_peer_end_requests`): the connection ends as if its stream
/// had failed, the request waiting for an answer fails once, the peer sees
/// the stream end, and `on_end` runs; nothing waits for ever.
#[test]
fn a_panic_on_the_receive_thread_ends_the_connection_and_what_is_pending() {
    let (end_tx, end_rx) = mpsc::channel();
    let end_tx = Mutex::new(end_tx);
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("rtp"))
            .on_peer_end_requests(|| panic!("a hook that panics, on purpose"))
            .on_end(move |why| {
                let _ = end_tx.lock().unwrap().send(why);
            }),
    );
    let pending = conn.submit(1, 0, b"waiting").unwrap();
    first_request(&mut peer);
    peer.send(&Packet::erq());
    let res = within("the pending call", move || pending.wait_timeout(PATIENCE));
    let why = end_rx.recv_timeout(PATIENCE);
    // The peer's stream ends: a read gives EOF or an error, within a bound.
    peer.stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut rest = Vec::new();
    let tail = peer.stream.read_to_end(&mut rest);
    conn.abort();
    assert!(
        matches!(res, Err(Error::ConnectionLost(_))),
        "the request pending when the receive thread panicked: {res:?}"
    );
    assert!(why.is_ok(), "on_end did not run: {why:?}");
    assert!(
        !matches!(&tail, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the peer's stream did not end: {tail:?}"
    );
}

/// A logger of the user's with a bug: it panics, on purpose, on a warning
/// or error about a connection named `panicky-recv…` logged on that
/// connection's receive thread, or about one named `panicky-lent…` logged
/// on a thread named `panicky-caller`; on the trace of a write to one named
/// `panicky-write…` on a thread named `panicky-writer`; and on the error
/// logged for a handler's panic on one named `panicky-handler…`; and on
/// the trace of a reply queued by a handler thread of one named
/// `panicky-reply…`, or by the receive thread of one named
/// `panicky-inline…` (an inline handler's); on the debug line a connection
/// named `panicky-ended…` logs as it ends, on any thread; and on the
/// accept thread's line for a client accepted by a server named
/// `panicky-accept…`, and on the refusing thread's line for a client it has
/// refused, of a server named `panicky-refuse…`; on the line a connection
/// of a server named `panicky-started…` logs as it starts, on the accept
/// thread; and on the trace of a control packet queued for a connection of
/// a server named `panicky-queued…` on a thread named `panicky-stopper`.
/// It logs nothing else.
/// On the refusing thread of a server named `slowtls…` it keeps a
/// thread-local buffer, whose flush as the thread ends waits for the test
/// (see [`SlowFlush`]).
struct PanickyLogger;

/// A logger's per-thread buffer, flushed as its thread ends: it waits
/// until [`SLOW_FLUSH_RELEASED`] (at most 10 s), with
/// [`SLOW_FLUSH_RUNNING`] set meanwhile.
struct SlowFlush;

static SLOW_FLUSH_RUNNING: AtomicBool = AtomicBool::new(false);

/// How many times the logger has panicked on a line about a connection
/// named `panicky-lent…` logged on the thread `panicky-caller`.
static PANICS_ON_THE_LENT_READER: AtomicUsize = AtomicUsize::new(0);
static SLOW_FLUSH_RELEASED: AtomicBool = AtomicBool::new(false);

impl Drop for SlowFlush {
    fn drop(&mut self) {
        SLOW_FLUSH_RUNNING.store(true, Ordering::SeqCst);
        let until = Instant::now() + Duration::from_secs(10);
        while !SLOW_FLUSH_RELEASED.load(Ordering::SeqCst) && Instant::now() < until {
            thread::sleep(ms(5));
        }
        SLOW_FLUSH_RUNNING.store(false, Ordering::SeqCst);
    }
}

thread_local! {
    static SLOW_FLUSH: std::cell::RefCell<Option<SlowFlush>> =
        const { std::cell::RefCell::new(None) };
}

impl log::Log for PanickyLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let here = thread::current();
        let here = here.name().unwrap_or("");
        if here.starts_with("slowtls") && here.ends_with(":refuse") {
            SLOW_FLUSH.with(|buf| {
                buf.borrow_mut().get_or_insert(SlowFlush);
            });
        }
        let level = record.level();
        let reply_thread = here.starts_with("panicky-reply") && here.contains(":handler");
        let inline_thread = here.starts_with("panicky-inline") && here.ends_with(":recv");
        let loud =
            here == "panicky-writer" || here == "panicky-stopper" || reply_thread || inline_thread;
        if level > log::Level::Debug && !loud {
            return;
        }
        let message = record.args().to_string();
        let ended_line = (message.contains("panicky-ended") && message.contains(": ended: "))
            || (message.contains("panicky-accept") && message.ends_with(": accepted"))
            || (message.contains("panicky-refuse") && message.contains(": refused a client"))
            || (message.contains("panicky-wake") && message.contains("to wake the accept thread"))
            || (message.contains("panicky-stopping") && message.ends_with(": stopping"))
            || (message.contains("panicky-erqstop") && message.ends_with(": sent end of requests"))
            || (message.contains("panicky-started")
                && message.ends_with(": started")
                && here.ends_with(":accept"))
            || (message.contains("panicky-queued")
                && message.contains("==> queued")
                && here == "panicky-stopper");
        if level > log::Level::Warn && !loud && !ended_line {
            return;
        }
        if (message.contains("panicky-recv") && here.ends_with(":recv"))
            || (message.contains("panicky-lent") && here == "panicky-caller")
            || (message.contains("panicky-write") && message.contains("==> wrote"))
            || (message.contains("panicky-handler") && message.contains("handler panicked"))
            || (reply_thread && message.contains("==> reply"))
            || (inline_thread && message.contains("==> reply 0:"))
            || ended_line
        {
            if message.contains("panicky-lent") && here == "panicky-caller" {
                PANICS_ON_THE_LENT_READER.fetch_add(1, Ordering::SeqCst);
            }
            panic!("a logger that panics, on purpose: {message}");
        }
    }

    fn flush(&self) {}
}

fn install_panicky_logger() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&PanickyLogger).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// The user's logger panics on the warning the receive thread logs as the
/// stream ends: the request waiting for an answer still fails once, and
/// `on_end` runs.
#[test]
fn a_logger_panicking_as_the_stream_ends_leaves_nothing_waiting() {
    install_panicky_logger();
    let (end_tx, end_rx) = mpsc::channel();
    let end_tx = Mutex::new(end_tx);
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("panicky-recv"))
            .on_end(move |why| {
                let _ = end_tx.lock().unwrap().send(why);
            }),
    );
    let pending = conn.submit(1, 0, b"waiting").unwrap();
    first_request(&mut peer);
    peer.stream.shutdown(Shutdown::Both).unwrap();
    let res = within("the pending call", move || pending.wait_timeout(PATIENCE));
    let why = end_rx.recv_timeout(PATIENCE);
    conn.abort();
    assert!(
        matches!(res, Err(Error::ConnectionLost(_))),
        "the request pending when the logger panicked: {res:?}"
    );
    assert!(why.is_ok(), "on_end did not run: {why:?}");
}

/// What a caller thread saw of one call.
enum CallSeen {
    Answered,
    Failed(Error),
    Panicked,
}

/// A caller reads the stream itself, with the receive thread's reader lent
/// to it, and the user's logger panics there, on the warning about an
/// oversize packet the peer sent: the panic ends that line only. Every
/// call is answered, and the connection goes on.
#[test]
fn a_logger_panicking_on_a_caller_reading_for_itself_is_contained() {
    install_panicky_logger();
    const ROUNDS: u64 = 50;
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("panicky-lent"))
            .max_packet_len(1024),
    );
    let conn = Arc::new(conn);
    let (seen_tx, seen_rx) = mpsc::channel();
    let caller = {
        let conn = Arc::clone(&conn);
        thread::Builder::new()
            .name("panicky-caller".into())
            .spawn(move || {
                for _ in 0..ROUNDS {
                    let call = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        conn.call(1, 0, b"q")
                    }));
                    let seen = match call {
                        Ok(Ok(_)) => CallSeen::Answered,
                        Ok(Err(e)) => CallSeen::Failed(e),
                        Err(_) => CallSeen::Panicked,
                    };
                    let stop = !matches!(seen, CallSeen::Answered);
                    let _ = seen_tx.send(seen);
                    if stop {
                        break;
                    }
                }
            })
            .unwrap()
    };
    // What went wrong first, if anything; the caller is unstuck by an
    // abort before the test fails.
    let mut panicked = false;
    let mut wrong = None;
    for round in 0..ROUNDS {
        let asked = first_request(&mut peer);
        // Every other round, once the caller is likely blocked reading:
        // a packet over the limit, skipped with a warning by whichever
        // thread reads it. (The refusal it is owed keeps the reader from
        // being lent after it, for a round.)
        if round % 2 == 1 {
            thread::sleep(ms(20));
            peer.request(1_000 + round, 1, &[0u8; 2_000]);
        }
        peer.send(&response(asked.tag, true, 0, b"a"));
        match seen_rx.recv_timeout(PATIENCE) {
            Ok(CallSeen::Answered) => {}
            Ok(CallSeen::Panicked) => {
                panicked = true;
                break;
            }
            Ok(CallSeen::Failed(e)) => {
                wrong = Some(format!("call {round} failed: {e:?}"));
                break;
            }
            Err(_) => {
                wrong = Some(format!("call {round} did not return within {PATIENCE:?}"));
                break;
            }
        }
    }
    let why = ends_within(&conn, ms(0));
    conn.abort();
    caller.join().unwrap();
    assert_eq!(wrong, None);
    assert!(!panicked, "a caller's call panicked with the logger");
    assert!(
        PANICS_ON_THE_LENT_READER.load(Ordering::SeqCst) > 0,
        "in {ROUNDS} calls no caller read the stream for itself"
    );
    assert!(why.is_none(), "the connection ended: {why:?}");
}

/// A writer of the user's that panics, on purpose, on its first write.
struct PanickyWriter;

impl Write for PanickyWriter {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        panic!("a writer that panics, on purpose")
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The user's writer panics on the send thread: the request that was to
/// be written fails once, later calls fail at once, and once the peer goes
/// the connection ends and `on_end` runs.
#[test]
fn a_writer_panicking_on_the_send_thread_fails_what_is_pending() {
    let (a, b) = UnixStream::pair().unwrap();
    let (end_tx, end_rx) = mpsc::channel();
    let end_tx = Mutex::new(end_tx);
    let conn = PacketConnection::new(
        a,
        PanickyWriter,
        Config::default()
            .name(unique_name("wpn"))
            .on_end(move |why| {
                let _ = end_tx.lock().unwrap().send(why);
            }),
    )
    .unwrap();
    let pending = conn.submit(1, 0, b"never written").unwrap();
    let res = within("the pending call", move || pending.wait_timeout(PATIENCE));
    let later = conn.submit(1, 0, b"after");
    drop(b);
    let why = end_rx.recv_timeout(PATIENCE);
    conn.abort();
    assert!(
        matches!(res, Err(Error::ConnectionLost(_) | Error::Unsent(_))),
        "the request the writer panicked on: {res:?}"
    );
    assert!(later.is_err(), "a call after the panic: {later:?}");
    assert!(why.is_ok(), "on_end did not run: {why:?}");
}

/// The user's logger panics on a caller thread while that caller holds the
/// writer's role (a `call` writes what is queued before it waits), on the
/// trace of the write: the panic ends that line only, so the call is
/// answered, a later request too, and `close` returns.
#[test]
fn a_logger_panicking_on_a_caller_while_it_writes_is_contained() {
    install_panicky_logger();
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(
        b,
        Config::default()
            .name(unique_name("pws"))
            .extensions(false)
            .handler(common::echo),
    )
    .unwrap();
    let conn = Arc::new(
        PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name(unique_name("panicky-write"))
                .extensions(false),
        )
        .unwrap(),
    );
    let victim = {
        let conn = Arc::clone(&conn);
        thread::Builder::new()
            .name("panicky-writer".into())
            .spawn(move || {
                let call = std::panic::AssertUnwindSafe(|| conn.call(1, 0, b"boom"));
                std::panic::catch_unwind(call).map(|res| res.is_ok())
            })
            .unwrap()
    };
    wait_for("the writing caller", PATIENCE, || victim.is_finished());
    let victim = victim.join().unwrap();
    let after = conn
        .submit(1, 0, b"after")
        .map(|pending| pending.wait_timeout(PATIENCE));
    let closed = conn.close_timeout(PATIENCE);
    conn.abort();
    server.abort();
    assert!(
        matches!(victim, Ok(true)),
        "the call whose write the logger panicked on: {victim:?}"
    );
    assert!(
        matches!(&after, Ok(Ok(_))),
        "a request after the logger's panic on a writing caller: {after:?}"
    );
    assert!(
        !matches!(&closed, Err(Error::Timeout { .. })),
        "close after the logger's panic on a writing caller: {closed:?}"
    );
}

/// One call of `client`'s with `payload`, then the close of `server`, and
/// both aborted: the call's outcome and the close's.
fn call_then_close_server(
    client: PacketConnection,
    server: PacketConnection,
    payload: &[u8],
) -> (Result<packetstream::Response, Error>, Result<(), Error>) {
    let res = client.call_timeout(1, 0, payload, PATIENCE);
    let closed = server.close_timeout(PATIENCE);
    client.abort();
    server.abort();
    (res, closed)
}

/// The user's logger panics on the error logged for a handler's panic, on
/// a handler thread: the request is still answered, not ok, and the
/// connection closes.
#[test]
fn a_logger_panicking_on_a_handlers_panic_leaves_no_request_unanswered() {
    install_panicky_logger();
    let (client, server) = pair_with(
        Config::default().name(unique_name("phc")),
        Config::default()
            .name(unique_name("panicky-handler"))
            .handler(|_rq: Request| -> HandlerResult {
                panic!("a handler that panics, on purpose")
            }),
    );
    let (res, closed) = call_then_close_server(client, server, b"");
    assert!(
        matches!(&res, Err(Error::Failed { .. })),
        "a request whose handler panicked, with the logger panicking on the error: {res:?}"
    );
    assert!(
        !matches!(&closed, Err(Error::Timeout { .. })),
        "close: {closed:?}"
    );
}

/// The user's logger panics on the trace of a reply, on a handler thread,
/// after the handler ran: the reply's fate is unknown, so the connection
/// ends, and the caller's request ends with it instead of waiting; the
/// close returns.
#[test]
fn a_logger_panicking_on_a_reply_on_a_handler_thread_leaves_nothing_waiting() {
    install_panicky_logger();
    let (client, server) = pair_with(
        Config::default().name(unique_name("prc")),
        Config::default()
            .name(unique_name("panicky-reply"))
            .handler(common::echo),
    );
    let (res, closed) = call_then_close_server(client, server, b"echo");
    assert!(
        !matches!(&res, Err(Error::Timeout { .. })),
        "a request whose reply's trace panicked: {res:?}"
    );
    assert!(
        !matches!(&closed, Err(Error::Timeout { .. })),
        "close: {closed:?}"
    );
}

/// A connection over `connect_with` halves of a socketpair whose `on_close`
/// hook panics, with an `on_end` hook that reports; and a peer of this
/// crate on the other end.
fn with_panicking_on_close(
    name: &str,
) -> (
    PacketConnection,
    PacketConnection,
    mpsc::Receiver<Disconnect>,
) {
    let (a, b) = UnixStream::pair().unwrap();
    let (ended_tx, ended_rx) = mpsc::channel();
    let ended_tx = Mutex::new(ended_tx);
    let conn = PacketConnection::connect_with(
        move || {
            let recv = a.try_clone()?;
            let on_close: packetstream::OnClose = Box::new(move || {
                let _ = a.shutdown(Shutdown::Both);
                panic!("on_close panics");
            });
            let send = recv.try_clone()?;
            Ok((recv, send, Some(on_close)))
        },
        Config::default()
            .name(unique_name(name))
            .on_end(move |why| {
                let _ = ended_tx.lock().unwrap().send(why);
            }),
    )
    .unwrap();
    let peer = PacketConnection::from_unix_stream(
        b,
        Config::default()
            .name(unique_name(name))
            .handler(common::echo),
    )
    .unwrap();
    (conn, peer, ended_rx)
}

/// The `on_close` hook runs when the connection is finished with its
/// streams: if it panics there, the connection still ends, and its
/// `on_end` hook still runs.
#[test]
fn a_panicking_on_close_at_the_end_leaves_on_end_to_run() {
    let (conn, peer, ended_rx) = with_panicking_on_close("poc");
    let res = conn.call_timeout(1, 0, b"first", PATIENCE);
    let conn = Arc::new(conn);
    let closer = Arc::clone(&conn);
    let closed = within("close", move || closer.close_timeout(PATIENCE).is_ok());
    let why = ended_rx.recv_timeout(PATIENCE).ok();
    peer.abort();
    assert!(res.is_ok(), "{res:?}");
    assert!(closed, "close did not finish: {:?}", conn.status());
    assert_eq!(why, Some(Disconnect::PeerEof), "on_end did not run");
}

/// `abort` runs the `on_close` hook at once to interrupt the streams: if
/// it panics there, `abort` still returns, and the connection ends.
#[test]
fn a_panicking_on_close_in_abort_leaves_abort_returning() {
    let (conn, peer, ended_rx) = with_panicking_on_close("poa");
    let pending = conn.submit(1, 0, b"never answered?").ok();
    let conn = Arc::new(conn);
    let aborter = Arc::clone(&conn);
    let returned = within("abort", move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| aborter.abort())).is_ok()
    });
    let why = ended_rx.recv_timeout(PATIENCE).ok();
    let outcome = pending.map(|p| p.wait_timeout(PATIENCE));
    peer.abort();
    assert!(returned, "abort panicked with the on_close hook");
    assert!(why.is_some(), "on_end did not run: {:?}", conn.status());
    if let Some(outcome) = outcome {
        assert!(
            !matches!(outcome, Err(Error::Timeout { .. })),
            "a request left waiting: {outcome:?}"
        );
    }
}

/// The user's logger panics on the debug line a connection logs as it
/// ends (`…: ended: …`), on whichever thread ends it: `on_end` should still
/// run, once.
#[test]
fn a_logger_panicking_on_the_ended_line_still_runs_on_end() {
    install_panicky_logger();
    let (end_tx, end_rx) = mpsc::channel();
    let end_tx = Mutex::new(end_tx);
    let (client, server) = pair_with(
        Config::default().name(unique_name("pec")),
        Config::default()
            .name(unique_name("panicky-ended"))
            .handler(common::echo)
            .on_end(move |why| {
                let _ = end_tx.lock().unwrap().send(why);
            }),
    );
    let res = client.call_timeout(1, 0, b"echo", PATIENCE);
    let closed = client.close_timeout(PATIENCE);
    let status = ends_within(&server, PATIENCE);
    let why = end_rx.recv_timeout(PATIENCE);
    client.abort();
    server.abort();
    assert!(res.is_ok() && closed.is_ok(), "{res:?} {closed:?}");
    assert!(
        why.is_ok(),
        "on_end did not run (the connection ended: {status:?})"
    );
}

/// An echo server on loopback TCP, named after `name`, with at most `limit`
/// connections.
fn echo_server(name: &str, limit: usize) -> (Server, std::net::SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::serve_tcp(
        listener,
        ServerConfig::new(
            Config::default()
                .name(unique_name(name))
                .handler(common::echo),
        )
        .max_connections(limit),
    )
    .unwrap();
    (server, addr)
}

/// Stops `server` within `PATIENCE`; `Err` if the stop panicked, as
/// `stop_timeout` does to re-raise a panic of the server's threads.
fn stop_catching(server: Server) -> Result<Result<(), Error>, &'static str> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        server.stop_timeout(PATIENCE)
    }))
    .map_err(|_| "stop_timeout panicked")
}

/// A client of the server at `addr` that makes one call and closes: the
/// call's outcome and the close's.
fn one_call_then_close(
    addr: std::net::SocketAddr,
) -> (Result<packetstream::Response, Error>, Result<(), Error>) {
    let client = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    let res = client.call_timeout(1, 0, b"one", PATIENCE);
    (res, client.close_timeout(PATIENCE))
}

/// The same logger on a server's connection: the slot of a client whose
/// end's debug line panicked is freed, so under `max_connections(1)` the
/// next client is served, and `stop` returns.
#[test]
fn a_logger_panicking_on_the_ended_line_frees_the_servers_slot() {
    install_panicky_logger();
    let (server, addr) = echo_server("panicky-ended-srv", 1);
    let (one, first_closed) = one_call_then_close(addr);
    let deadline = Instant::now() + PATIENCE;
    while server.connections() > 0 && Instant::now() < deadline {
        thread::sleep(ms(10));
    }
    let live = server.connections();
    let second = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    let two = second.call_timeout(1, 0, b"two", PATIENCE);
    second.abort();
    let stopped = server.stop_timeout(ms(3000));
    assert!(
        one.is_ok() && first_closed.is_ok(),
        "{one:?} {first_closed:?}"
    );
    assert!(
        live == 0 && two.is_ok() && stopped.is_ok(),
        "the first client, whose end's log line panicked: still counted {live}; \
         the next client: {two:?}; stop: {stopped:?}"
    );
}

/// The user's logger panics on the trace of a reply made by an inline
/// handler, on the receive thread, over generic halves (no socket to shut
/// down): the connection should still end, `on_end` run and `close` return.
#[test]
fn a_logger_panicking_on_an_inline_reply_over_generic_halves_leaves_close_returning() {
    install_panicky_logger();
    let (a, b) = UnixStream::pair().unwrap();
    let (end_tx, end_rx) = mpsc::channel();
    let end_tx = Mutex::new(end_tx);
    let server = PacketConnection::new(
        b.try_clone().unwrap(),
        b,
        Config::default()
            .name(unique_name("panicky-inline"))
            .inline_handler(common::echo)
            .on_end(move |why| {
                let _ = end_tx.lock().unwrap().send(why);
            }),
    )
    .unwrap();
    let client =
        PacketConnection::from_unix_stream(a, Config::default().name(unique_name("pic"))).unwrap();
    let res = client.call_timeout(1, 0, b"echo", ms(2000));
    let closed = server.close_timeout(PATIENCE);
    let why = end_rx.recv_timeout(ms(500));
    client.abort();
    server.abort();
    assert!(
        !matches!(&closed, Err(Error::Timeout { .. })),
        "close after the logger panicked on an inline reply (the call gave {res:?}): {closed:?}"
    );
    assert!(why.is_ok(), "on_end did not run before abort");
}

/// After this end ended its requests, the user's logger panics on a
/// refusal's warning on the receive thread: the refusal is still sent,
/// and the connection goes on until it is closed, `on_end` running then.
#[test]
fn a_logger_panicking_on_a_refusal_after_end_requests_is_contained() {
    install_panicky_logger();
    let (end_tx, end_rx) = mpsc::channel();
    let end_tx = Mutex::new(end_tx);
    let (conn, mut peer) = RawPeer::with(
        Config::default()
            .name(unique_name("panicky-recv"))
            .on_end(move |why| {
                let _ = end_tx.lock().unwrap().send(why);
            }),
    );
    conn.end_requests();
    let _erq = peer.recv();
    // No handler: refused, with a warning, on the receive thread.
    peer.request(1, 1, b"refused");
    let refusal = peer.recv();
    let ended_early = end_rx.try_recv();
    conn.abort();
    let why = end_rx.recv_timeout(PATIENCE);
    assert!(
        matches!(
            &refusal,
            Some(Packet {
                tag: 1,
                kind: PacketKind::Response { ok: false, .. },
                ..
            })
        ),
        "the refusal: {refusal:?}"
    );
    assert!(
        ended_early.is_err(),
        "the connection ended: {ended_early:?}"
    );
    assert!(why.is_ok(), "on_end did not run at the abort");
}

/// The user's logger panics on the debug line the accept thread logs for a
/// client it has accepted (`…: accepted`): the server should go on
/// accepting, as it does when `on_close` panics there.
#[test]
fn a_logger_panicking_on_the_accepted_line_leaves_the_server_accepting() {
    install_panicky_logger();
    let (server, addr) = echo_server("panicky-accept", 1024);
    let (one, first_closed) = one_call_then_close(addr);
    let second = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    let two = second.call_timeout(1, 0, b"two", ms(3000));
    second.abort();
    let stopped = stop_catching(server);
    assert!(
        one.is_ok() && first_closed.is_ok(),
        "{one:?} {first_closed:?}"
    );
    assert!(
        two.is_ok(),
        "the next client: {two:?} (stop gave {stopped:?})"
    );
    assert!(stopped.is_ok(), "stop: {stopped:?}");
}

/// The user's logger panics on the refusing thread's line for a client it
/// has refused (`…: refused a client`): the next client past the limit is
/// still refused as "server full", not dropped unanswered, and the server
/// stops cleanly.
#[test]
fn a_logger_panicking_on_the_refused_line_leaves_the_server_refusing() {
    install_panicky_logger();
    let (server, addr) = echo_server("panicky-refuse", 1);
    let holder = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    let held = holder.call_timeout(1, 0, b"held", PATIENCE);
    let refused = |what: &str| {
        let client = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
        let res = client.call_timeout(1, 0, what.as_bytes(), PATIENCE);
        // Its EOF ends the refusal: the refusing thread logs the line.
        let closed = client.close_timeout(PATIENCE);
        (res, closed)
    };
    let (first, first_closed) = refused("first");
    let (second, second_closed) = refused("second");
    let held_closed = holder.close_timeout(PATIENCE);
    let stopped = stop_catching(server);
    assert!(
        held.is_ok() && held_closed.is_ok(),
        "{held:?} {held_closed:?}"
    );
    assert!(
        matches!(&first, Err(e) if e.is_busy()),
        "the first refused client: {first:?} (closed: {first_closed:?})"
    );
    assert!(
        matches!(&second, Err(e) if e.is_busy()),
        "the next refused client: {second:?} (closed: {second_closed:?}, stop gave {stopped:?})"
    );
    assert!(stopped.is_ok(), "stop: {stopped:?}");
}

/// The user's logger panics on the warning that the accept thread cannot
/// be woken (a Unix listener whose path was removed): the stop still
/// returns, in time, rather than wait for an accept thread that nobody
/// woke.
#[test]
fn a_logger_panicking_on_the_wake_warning_leaves_the_stop_returning() {
    install_panicky_logger();
    let path = std::env::temp_dir().join(format!(
        "packetstream-keeper-wake-{}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = Server::serve_unix(
        listener,
        ServerConfig::new(
            Config::default()
                .name(unique_name("panicky-wake"))
                .handler(common::echo),
        ),
    )
    .unwrap();
    // No one can connect to wake the accept thread now.
    std::fs::remove_file(&path).unwrap();
    let started = Instant::now();
    let stopped = stop_catching(server);
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "stop: {stopped:?} after {:?}",
        started.elapsed()
    );
}

/// The user's logger panics on the first line a server's stop logs
/// (`…: stopping`): the stop leaves no server behind, serving clients with
/// nothing left to stop it.
#[test]
fn a_logger_panicking_on_the_stopping_line_leaves_no_server_running() {
    install_panicky_logger();
    let (server, addr) = echo_server("panicky-stopping", 4);
    let stopped = stop_catching(server);
    let served = PacketConnection::connect_tcp_timeout(addr, PATIENCE, Config::default()).and_then(
        |client| {
            let res = client.call_timeout(1, 0, b"after the stop", PATIENCE);
            let _ = client.close_timeout(PATIENCE);
            res
        },
    );
    assert!(
        served.is_err(),
        "a client was served after the stop ({stopped:?}): {served:?}"
    );
    assert!(matches!(stopped, Ok(Ok(()))), "stop: {stopped:?}");
}

/// The same logger panics on the line a server connection logs as the
/// stop sends it ERQ: the stop still closes every connection and returns,
/// and each client sees its connection end in order.
#[test]
fn a_logger_panicking_as_the_stop_sends_erq_leaves_the_stop_closing() {
    install_panicky_logger();
    let (server, addr) = echo_server("panicky-erqstop", 4);
    let clients: Vec<PacketConnection> = (0..2)
        .map(|_| PacketConnection::connect_tcp(addr, Config::default()).unwrap())
        .collect();
    for client in &clients {
        let res = client.call_timeout(1, 0, b"before the stop", PATIENCE);
        assert!(res.is_ok(), "{res:?}");
    }
    let stopped = stop_catching(server);
    for client in &clients {
        let closed = client.close_timeout(PATIENCE);
        assert!(
            closed.is_ok(),
            "a client's close: {closed:?} (stop: {stopped:?})"
        );
    }
    assert!(matches!(stopped, Ok(Ok(()))), "stop: {stopped:?}");
}

/// The user's logger keeps a per-thread buffer on the refusing thread and
/// flushes it, slowly, as the thread ends: the accept thread does not wait
/// for that flush, so a client past the limit is refused, and one in a
/// slot freed meanwhile is served. (The accept thread joined the refusing
/// thread that had ended as it started the next, and waited for the
/// flush with it.)
#[test]
fn a_logger_flushing_slowly_as_the_refusing_thread_ends_holds_up_no_client() {
    install_panicky_logger();
    let (server, addr) = echo_server("slowtls", 1);
    let holder = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    let held = holder.call_timeout(1, 0, b"held", PATIENCE);
    // Refused: the refusing thread logs, keeps its buffer, and ends a
    // second after, flushing it until released.
    let (first, _) = one_call_then_close(addr);
    wait_for("the refusing thread's end and flush", PATIENCE, || {
        SLOW_FLUSH_RUNNING.load(Ordering::SeqCst)
    });
    // The next client past the limit, while the flush runs, then one in
    // the slot the holder frees.
    let refused = thread::spawn(move || one_call_then_close(addr).0);
    thread::sleep(ms(200));
    let held_closed = holder.close_timeout(PATIENCE);
    // The holder's close returns once the server's EOF is read; the server
    // frees the slot once it has read the holder's, a moment later.
    wait_for("the server to free the holder's slot", PATIENCE, || {
        server.connections() == 0
    });
    let served = {
        let client = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
        let res = client.call_timeout(1, 0, b"in the free slot", ms(5000));
        let _ = client.close_timeout(PATIENCE);
        res
    };
    SLOW_FLUSH_RELEASED.store(true, Ordering::SeqCst);
    let second = refused.join().unwrap();
    let stopped = stop_catching(server);
    assert!(held.is_ok(), "{held:?}");
    let busy = |res: &Result<packetstream::Response, Error>| matches!(res, Err(Error::Failed { flags, .. }) if *flags == packetstream::BUSY_FLAGS);
    assert!(busy(&first), "the first client past the limit: {first:?}");
    assert!(
        matches!(&served, Ok(rsp) if rsp.payload == b"in the free slot"),
        "the client in the freed slot: {served:?}"
    );
    assert!(
        busy(&second),
        "the client past the limit during the flush: {second:?}"
    );
    assert!(held_closed.is_ok(), "{held_closed:?}");
    assert!(matches!(stopped, Ok(Ok(()))), "stop: {stopped:?}");
}

/// The user's logger panics on the line a connection logs as it starts
/// (`…: started`), which runs on the server's accept thread: the server
/// goes on accepting, and the stop returns. (The accept thread ended, with
/// the connection it was starting still counted: the next client was cut
/// off, and `stop_timeout` waited out its deadline.)
#[test]
fn a_logger_panicking_on_the_started_line_leaves_the_server_accepting() {
    install_panicky_logger();
    let (server, addr) = echo_server("panicky-started", 16);
    let (first, first_closed) = one_call_then_close(addr);
    let (second, second_closed) = one_call_then_close(addr);
    let stopped = stop_catching(server);
    assert!(
        first.is_ok() && second.is_ok(),
        "first: {first:?} ({first_closed:?}); second: {second:?} ({second_closed:?})"
    );
    assert!(matches!(stopped, Ok(Ok(()))), "stop: {stopped:?}");
}

/// The user's logger panics on the trace of the end of requests that the
/// stop queues for each connection, on the stopping thread, with the
/// outgoing queue's lock held: the stop still ends every connection, and
/// none serves a request after it. (The stop unwound at the first
/// connection, and both went on serving.)
#[test]
fn a_logger_panicking_as_the_stop_queues_erq_leaves_no_connection_serving() {
    install_panicky_logger();
    let (server, addr) = echo_server("panicky-queued", 16);
    let clients: Vec<PacketConnection> = (0..2)
        .map(|_| PacketConnection::connect_tcp(addr, Config::default()).unwrap())
        .collect();
    for client in &clients {
        let before = client.call_timeout(1, 0, b"before", PATIENCE);
        assert!(before.is_ok(), "{before:?}");
    }
    let stopper = thread::Builder::new()
        .name("panicky-stopper".into())
        .spawn(move || stop_catching(server))
        .unwrap();
    wait_for("the stop", PATIENCE * 2, || stopper.is_finished());
    let stopped = stopper.join().unwrap();
    let after: Vec<_> = clients
        .iter()
        .map(|c| c.call_timeout(1, 0, b"after the stop", PATIENCE))
        .collect();
    for client in &clients {
        client.abort();
    }
    assert!(matches!(stopped, Ok(Ok(()))), "stop: {stopped:?}");
    assert!(
        after.iter().all(Result::is_err),
        "a connection served a request after the stop: {after:?}"
    );
}
