//! A hostile peer and an unlucky user against the connection's promises: lent readers, inline handlers, bounded writes, a server's shared pool, refusals and hooks.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{echo, ms, server_config, within, within_or, ECHO, SLEEP};
use packetstream::{
    Config, Disconnect, Error, HandlerResult, OnClose, Packet, PacketConnection, Request, Server,
    ServerConfig,
};

/// Long enough for any step that should succeed.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long a step that should return at once is given before it counts as
/// hung.
const HANG: Duration = Duration::from_secs(3);

/// A client with an echo handler of its own and a server with the common
/// service, over a socketpair.
fn pair_both_serving(tag: &str) -> (Arc<PacketConnection>, Arc<PacketConnection>) {
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(b, server_config(&format!("{tag}s"))).unwrap();
    let client = PacketConnection::from_unix_stream(
        a,
        Config::default().name(format!("{tag}c")).handler(echo),
    )
    .unwrap();
    (Arc::new(client), Arc::new(server))
}

/// After a caller has read its own response on the lent reader for longer
/// than the lease, a request from the peer must still be read and answered.
#[test]
fn a_request_from_the_peer_is_served_after_a_caller_read_past_the_lease() {
    let (client, server) = pair_both_serving("lease");
    let (c, s) = (Arc::clone(&client), Arc::clone(&server));
    let outcomes = within("the calls", move || {
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            // Delivered by the receive thread, which then lends its reader.
            c.call(ECHO, 0, b"warm").unwrap();
            // Read by this caller itself, for longer than the lease.
            c.call(SLEEP, 0, b"60").unwrap();
            // The peer now asks us something: somebody must read it.
            outcomes.push(
                s.call_timeout(ECHO, 0, b"ping", ms(2000))
                    .map(|r| r.payload),
            );
        }
        outcomes
    });
    for res in outcomes {
        assert_eq!(res.unwrap(), b"ping", "the peer's request was never read");
    }
    assert!(client.close_timeout(PATIENCE).is_ok());
    assert!(server.close_timeout(PATIENCE).is_ok());
}

/// A `call` from one thread while another thread's `call_timeout` waited
/// for a response that the first read: a later `call` must still get its
/// response, which the peer sends.
#[test]
fn a_call_after_a_call_timeout_raced_a_reading_caller_gets_its_response() {
    let (client, server) = pair_both_serving("race");
    client.call(ECHO, 0, b"warm").unwrap();
    let reader = {
        let c = Arc::clone(&client);
        thread::spawn(move || c.call(SLEEP, 0, b"150").map(|r| r.payload))
    };
    thread::sleep(ms(40));
    // Waits with a deadline while the other caller reads.
    let res = client.call_timeout(ECHO, 0, b"meanwhile", PATIENCE);
    assert_eq!(res.unwrap().payload, b"meanwhile");
    let joined = within("the reading caller", move || reader.join().unwrap());
    assert_eq!(joined.unwrap(), b"150");
    let c = Arc::clone(&client);
    let res = within_or(
        "a call after the race",
        HANG,
        move || c.call(ECHO, 0, b"after").map(|r| r.payload),
        || client.abort(),
    );
    assert_eq!(res.unwrap(), b"after");
    assert!(client.close_timeout(PATIENCE).is_ok());
    assert!(server.close_timeout(PATIENCE).is_ok());
}

/// `close` while a caller reads its own response must still read the peer's
/// EOF, which comes later.
#[test]
fn close_while_a_caller_reads_still_reads_the_peers_eof() {
    let (client, server) = pair_both_serving("eof");
    // Held by the server past the reading caller's response, so that the
    // server's EOF comes well after it; cancelled here, so that nothing is
    // pending when the reader is handed back.
    drop(client.submit(SLEEP, 0, b"400").unwrap());
    client.call(ECHO, 0, b"warm").unwrap();
    let reader = {
        let c = Arc::clone(&client);
        thread::spawn(move || c.call(SLEEP, 0, b"100").map(|r| r.payload))
    };
    thread::sleep(ms(30));
    let c = Arc::clone(&client);
    let res = within_or(
        "close while a caller reads",
        ms(400) + HANG,
        move || c.close(),
        || client.abort(),
    );
    assert!(res.is_ok(), "{res:?}");
    let joined = within("the reading caller", move || reader.join().unwrap());
    assert_eq!(joined.unwrap(), b"100");
    assert!(server.close_timeout(PATIENCE).is_ok());
}

/// The whole packets read so far from `stream`, reading until `n` have
/// come.
fn read_packets(stream: &mut UnixStream, buf: &mut Vec<u8>, n: usize) -> Vec<Packet> {
    let mut packets = Vec::new();
    while packets.len() < n {
        if let Some((packet, used)) = Packet::decode(buf, u64::MAX).unwrap() {
            buf.drain(..used);
            packets.push(packet);
            continue;
        }
        let mut chunk = [0u8; 4096];
        let got = stream.read(&mut chunk).unwrap();
        assert!(got > 0, "stream ended");
        buf.extend_from_slice(&chunk[..got]);
    }
    packets
}

fn wire(packet: &Packet) -> Vec<u8> {
    let mut buf = Vec::new();
    packet.encode_into(&mut buf);
    buf
}

/// `abort` must wake a caller waiting in `call`, on `connect_with` streams
/// whose `on_close` cannot interrupt a read (here: none given), as it does
/// on every other transport.
#[test]
fn abort_wakes_a_caller_in_call_on_connect_with_streams_without_a_hook() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(PATIENCE)).unwrap();
    let client = Arc::new(
        PacketConnection::connect_with(
            move || {
                let on_close: OnClose = None;
                Ok((a.try_clone()?, a, on_close))
            },
            Config::default().name("cwith"),
        )
        .unwrap(),
    );
    let caller = {
        let c = Arc::clone(&client);
        thread::spawn(move || {
            let first = c.call(ECHO, 0, b"one");
            let second = c.call(ECHO, 0, b"two");
            (first.map(|r| r.payload), second)
        })
    };
    // Answer the first request, read the second and leave it unanswered.
    let mut buf = Vec::new();
    let first = read_packets(&mut peer, &mut buf, 1).remove(0);
    peer.write_all(&wire(&common::response(first.tag, true, 0, b"one")))
        .unwrap();
    let second = read_packets(&mut peer, &mut buf, 1).remove(0);
    assert_eq!(second.payload, b"two");
    thread::sleep(ms(50));
    client.abort();
    let (first, second) = within_or(
        "a caller in call() after abort",
        HANG,
        move || caller.join().unwrap(),
        // Unstick the caller: the peer closes the stream.
        || peer.shutdown(std::net::Shutdown::Both).unwrap(),
    );
    assert_eq!(first.unwrap(), b"one");
    assert!(
        matches!(second, Err(Error::ConnectionLost(Disconnect::Local))),
        "{second:?}"
    );
}

/// A TCP server on loopback, and its address.
fn serve(config: ServerConfig) -> (Server, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (Server::serve_tcp(listener, config).unwrap(), addr)
}

/// A client past `max_connections` that keeps sending (here ERQ packets,
/// which ask for no answer) is still sent EOF, and does not hold up the
/// server's stop.
#[test]
fn a_refused_client_that_keeps_sending_is_still_sent_eof_and_does_not_hold_up_stop() {
    let (server, addr) = serve(ServerConfig::new(server_config("full")).max_connections(1));
    let holder = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    assert_eq!(holder.call(ECHO, 0, b"in").unwrap().payload, b"in");

    let refused = TcpStream::connect(addr).unwrap();
    refused.set_read_timeout(Some(ms(100))).unwrap();
    refused.set_write_timeout(Some(ms(100))).unwrap();
    let flooding = Arc::new(AtomicBool::new(true));
    let flooder = {
        let (mut stream, flooding) = (refused.try_clone().unwrap(), Arc::clone(&flooding));
        thread::spawn(move || {
            let chunk = wire(&Packet::erq()).repeat(1024);
            let deadline = Instant::now() + PATIENCE;
            while flooding.load(Ordering::SeqCst) && Instant::now() < deadline {
                match stream.write(&chunk) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        })
    };
    // Read what the server sends: ERQ, then EOF (or the end of the stream).
    let mut stream = refused;
    let ended = within("reading the refusal", move || {
        let deadline = Instant::now() + ms(2000);
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        while Instant::now() < deadline {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) if Instant::now() >= deadline => break,
                Ok(0) => return true,
                Ok(n) => {
                    bytes.extend_from_slice(&chunk[..n]);
                    let mut pos = 0;
                    while let Ok(Some((packet, used))) = Packet::decode(&bytes[pos..], u64::MAX) {
                        if packet.is_eof() {
                            return true;
                        }
                        pos += used;
                    }
                }
                Err(_) => {}
            }
        }
        false
    });
    let stopped = within("stop_timeout", move || server.stop_timeout(ms(1000)));
    flooding.store(false, Ordering::SeqCst);
    within("the flooder", move || flooder.join().unwrap());
    let _ = holder.close_timeout(PATIENCE);
    assert!(
        ended && stopped.is_ok(),
        "EOF sent to the refused client: {ended}; stop_timeout(1 s): {stopped:?}"
    );
}

/// A client that floods a server with slow requests fills its own quota of
/// queued jobs; a request from another client that comes meanwhile must not
/// wait for that whole quota to be served first.
#[test]
fn a_flooding_client_does_not_make_another_wait_behind_its_whole_quota() {
    const SLOW: u64 = 7;
    // The order in which the handlers start: the slow requests, and the
    // victim's one (as `u64::MAX`).
    let started: Arc<Mutex<Vec<u64>>> = Arc::default();
    let handler = {
        let started = Arc::clone(&started);
        move |rq: Request| -> HandlerResult {
            if rq.rq_type == SLOW {
                started.lock().unwrap().push(rq.tag);
                thread::sleep(ms(4));
            } else {
                started.lock().unwrap().push(u64::MAX);
            }
            Ok(rq.payload.into())
        }
    };
    let config =
        ServerConfig::new(Config::default().name("fair").handler(handler)).handler_threads(2);
    let (server, addr) = serve(config);
    let flooder = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    let flood: Vec<_> = (0..400)
        .map(|_| flooder.submit(SLOW, 0, b"").unwrap())
        .collect();
    let victim = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    common::wait_for("the flood to start", PATIENCE, || {
        started.lock().unwrap().len() >= 10
    });
    let before = started.lock().unwrap().len();
    let asked = Instant::now();
    let res = victim.call_timeout(ECHO, 0, b"me", PATIENCE);
    let waited = asked.elapsed();
    assert_eq!(res.unwrap().payload, b"me");
    let log = started.lock().unwrap().clone();
    let at = log.iter().position(|&tag| tag == u64::MAX).unwrap();
    let overtaken_by = at - before;
    for pending in flood {
        pending.wait_timeout(PATIENCE).unwrap();
    }
    assert!(flooder.close_timeout(PATIENCE).is_ok());
    assert!(victim.close_timeout(PATIENCE).is_ok());
    assert!(server.stop_timeout(PATIENCE).is_ok());
    // Two handler threads and two clients: a fair pool starts a handful of
    // the flood's jobs before the victim's; a FIFO shared by all starts the
    // flooder's whole quota (256 by default).
    assert!(
        overtaken_by < 32,
        "{overtaken_by} of the flooder's jobs started after the victim's call began and before \
         its request (which waited {waited:?})"
    );
}

/// What the server's hooks saw, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hooked {
    Accept(u64),
    Close(u64),
}

/// Clients that connect, send EOF and go at once: each is reported by
/// `on_accept` once, then by `on_close` once, in that order.
#[test]
fn clients_that_end_at_once_get_on_accept_then_on_close_once_each() {
    const CLIENTS: u64 = 150;
    let seen: Arc<Mutex<Vec<Hooked>>> = Arc::default();
    let config = ServerConfig::new(server_config("hooks"))
        .max_connections(CLIENTS as usize + 1)
        .on_accept({
            let seen = Arc::clone(&seen);
            move |client| seen.lock().unwrap().push(Hooked::Accept(client.id()))
        })
        .on_close({
            let seen = Arc::clone(&seen);
            move |client, _| seen.lock().unwrap().push(Hooked::Close(client.id()))
        });
    let (server, addr) = serve(config);
    let eof = wire(&Packet::eof());
    for _ in 0..CLIENTS {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(&eof).unwrap();
        drop(stream);
    }
    common::wait_for("every client's on_close", PATIENCE, || {
        let seen = seen.lock().unwrap();
        seen.iter()
            .filter(|h| matches!(h, Hooked::Close(_)))
            .count() as u64
            >= CLIENTS
    });
    assert!(server.stop_timeout(PATIENCE).is_ok());
    let seen = seen.lock().unwrap().clone();
    for id in 1..=CLIENTS {
        let events: Vec<Hooked> = seen
            .iter()
            .copied()
            .filter(|h| matches!(h, Hooked::Accept(n) | Hooked::Close(n) if *n == id))
            .collect();
        assert_eq!(
            events,
            [Hooked::Accept(id), Hooked::Close(id)],
            "client {id}'s hooks"
        );
    }
}

/// Dropping a busy server without stopping it: its clients see an orderly
/// end, and every thread of the server ends.
#[test]
fn dropping_a_busy_server_ends_its_clients_in_order_and_all_its_threads() {
    let name = "drp";
    let (server, addr) = serve(ServerConfig::new(server_config(name)).handler_threads(3));
    let clients: Vec<Arc<PacketConnection>> = (0..6)
        .map(|_| Arc::new(PacketConnection::connect_tcp(addr, Config::default()).unwrap()))
        .collect();
    let callers: Vec<_> = clients
        .iter()
        .map(|c| {
            let c = Arc::clone(c);
            thread::spawn(move || {
                let mut n_ok = 0;
                loop {
                    match c.call_timeout(SLEEP, 0, b"1", PATIENCE) {
                        Ok(_) => n_ok += 1,
                        // The ends of a request the server's close overtook:
                        // refused, or sent as the server's EOF went out.
                        Err(
                            Error::Closed
                            | Error::Failed { .. }
                            | Error::ConnectionLost(Disconnect::PeerEof)
                            | Error::Unsent(Disconnect::PeerEof),
                        ) => return Ok(n_ok),
                        Err(err) => return Err(err),
                    }
                }
            })
        })
        .collect();
    thread::sleep(ms(100));
    drop(server);
    for caller in callers {
        let res = within("a caller", move || caller.join().unwrap());
        assert!(res.is_ok(), "{res:?}");
    }
    for client in clients {
        let c = Arc::clone(&client);
        let res = within("a client's join", move || c.join());
        assert!(res.is_ok(), "{res:?}");
    }
    common::wait_for("the server's threads to end", PATIENCE, || {
        common::threads_named(name).is_empty()
    });
}

/// Reads `stream` to its end (or a read error) and decodes the packets;
/// also says whether bytes of a partial packet were left over.
fn read_to_end_packets(stream: &mut UnixStream) -> (Vec<Packet>, usize) {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    while let Ok(n @ 1..) = stream.read(&mut chunk) {
        bytes.extend_from_slice(&chunk[..n]);
    }
    let mut packets = Vec::new();
    let mut pos = 0;
    while let Ok(Some((packet, used))) = Packet::decode(&bytes[pos..], u64::MAX) {
        packets.push(packet);
        pos += used;
    }
    (packets, bytes.len() - pos)
}

/// An inline handler's large reply, cut short by the socket's write timeout
/// while the peer is slow to read, reaches the peer whole, whatever its
/// bytes, even when the peer's EOF is read right after the request.
#[test]
fn a_large_reply_cut_short_by_a_bounded_write_reaches_a_slow_peer_whole() {
    const FILL: u8 = 0x06;
    const LEN: usize = 1 << 20;
    let mut intact = 0;
    let trials = 10;
    for trial in 0..trials {
        // Lengths that leave different remainders after the socket's fill.
        let len = LEN + trial;
        let (a, mut peer) = UnixStream::pair().unwrap();
        peer.set_read_timeout(Some(PATIENCE)).unwrap();
        let conn = PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name("bigreply")
                .inline_handler(move |_: Request| -> HandlerResult { Ok(vec![FILL; len].into()) }),
        )
        .unwrap();
        // A request and, in the same write, EOF; then read nothing for a
        // while, so that the reply fills the socket.
        let mut wire_bytes = wire(&common::request(2, ECHO, 0, b""));
        wire_bytes.extend_from_slice(&wire(&Packet::eof()));
        peer.write_all(&wire_bytes).unwrap();
        thread::sleep(ms(50));
        let (packets, left_over) = within("reading the reply", move || {
            let got = read_to_end_packets(&mut peer);
            drop(peer);
            got
        });
        let res = within("join", move || conn.join());
        assert!(res.is_ok(), "{res:?}");
        let reply_ok = packets.first().is_some_and(|p| {
            p.tag == 2 && p.payload.len() == len && p.payload.iter().all(|&b| b == FILL)
        });
        let ends =
            packets.len() == 3 && packets[1].is_erq() && packets[2].is_eof() && left_over == 0;
        if reply_ok && ends {
            intact += 1;
        }
    }
    assert_eq!(
        intact, trials,
        "replies that reached the peer whole and in order"
    );
}
