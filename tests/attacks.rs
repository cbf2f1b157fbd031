//! A hostile peer and an unlucky user against the connection's promises:
//! lent readers, inline handlers, bounded writes, a server's shared pool,
//! refusals and hooks. A connection facing a raw peer that scripts the base
//! protocol has its extensions off: no hello among the packets it counts.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    decode_all, echo, ms, pair_with, server_config, wire, within, within_or, ECHO, HANG, LIMIT,
    SLEEP,
};
use packetstream::{
    Config, Disconnect, Error, HandlerResult, OnClose, Packet, PacketConnection, Request, Response,
    Server, ServerConfig,
};

/// A client with an echo handler of its own and a server with the common
/// service, over a socketpair.
fn pair_both_serving(tag: &str) -> (Arc<PacketConnection>, Arc<PacketConnection>) {
    let (client, server) = pair_with(
        Config::default().name(format!("{tag}c")).handler(echo),
        server_config(&format!("{tag}s")),
    );
    (Arc::new(client), Arc::new(server))
}

/// A thread that makes a few quick calls (after the first, the receive
/// thread lends its reader, and each later call reads for itself, the lease
/// growing), then calls SLEEP for `millis`: that call reads the stream
/// itself while the test acts.
fn spawn_reading_caller(
    conn: &Arc<PacketConnection>,
    millis: u64,
) -> thread::JoinHandle<Result<Vec<u8>, Error>> {
    let conn = Arc::clone(conn);
    thread::spawn(move || {
        for _ in 0..4 {
            conn.call(ECHO, 0, b"warm")?;
        }
        conn.call(SLEEP, 0, millis.to_string().as_bytes())
            .map(|r| r.payload)
    })
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
    assert!(client.close_timeout(LIMIT).is_ok());
    assert!(server.close_timeout(LIMIT).is_ok());
}

/// A `call` from one thread while another thread's `call_timeout` waited
/// for a response that the first read: a later `call` must still get its
/// response, which the peer sends.
#[test]
fn a_call_after_a_call_timeout_raced_a_reading_caller_gets_its_response() {
    let (client, server) = pair_both_serving("race");
    let reader = spawn_reading_caller(&client, 200);
    thread::sleep(ms(80));
    // Waits with a deadline while the other caller reads.
    let res = client.call_timeout(ECHO, 0, b"meanwhile", LIMIT);
    assert_eq!(res.unwrap().payload, b"meanwhile");
    let joined = within("the reading caller", move || reader.join().unwrap());
    assert_eq!(joined.unwrap(), b"200");
    let c = Arc::clone(&client);
    let res = within_or(
        "a call after the race",
        HANG,
        move || c.call(ECHO, 0, b"after").map(|r| r.payload),
        || client.abort(),
    );
    assert_eq!(res.unwrap(), b"after");
    assert!(client.close_timeout(LIMIT).is_ok());
    assert!(server.close_timeout(LIMIT).is_ok());
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
    let reader = spawn_reading_caller(&client, 150);
    thread::sleep(ms(60));
    let c = Arc::clone(&client);
    let res = within_or(
        "close while a caller reads",
        ms(400) + HANG,
        move || c.close(),
        || client.abort(),
    );
    assert!(res.is_ok(), "{res:?}");
    let joined = within("the reading caller", move || reader.join().unwrap());
    assert_eq!(joined.unwrap(), b"150");
    assert!(server.close_timeout(LIMIT).is_ok());
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

/// How many quick calls a caller makes, answered at once, before the call
/// that reads the stream itself.
const WARM_CALLS: usize = 4;

/// A thread that makes [`WARM_CALLS`] calls, then one more, `last`, whose
/// answer the test holds back: that call reads the stream itself. Returns
/// whether the first calls were answered right, and how the last ended.
fn spawn_calls_then(
    conn: &Arc<PacketConnection>,
    last: &'static [u8],
) -> thread::JoinHandle<(bool, std::thread::Result<Result<Response, Error>>)> {
    let conn = Arc::clone(conn);
    thread::spawn(move || {
        let warm_ok = (0..WARM_CALLS).all(|idx| {
            let payload = [idx as u8];
            conn.call(ECHO, 0, &payload)
                .is_ok_and(|rsp| rsp.payload == payload)
        });
        let res =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conn.call(ECHO, 0, last)));
        (warm_ok, res)
    })
}

/// The raw peer's side of [`spawn_calls_then`]: answers the first calls,
/// echoing them, and returns the last request, unanswered.
fn answer_warm_calls(peer: &mut UnixStream, buf: &mut Vec<u8>) -> Packet {
    for _ in 0..WARM_CALLS {
        let rq = read_packets(peer, buf, 1).remove(0);
        peer.write_all(&wire(&common::response(rq.tag, true, 0, &rq.payload)))
            .unwrap();
    }
    read_packets(peer, buf, 1).remove(0)
}

/// `abort` must wake a caller waiting in `call`, on `connect_with` streams
/// whose `on_close` cannot interrupt a read (here: none given), as it does
/// on every other transport.
#[test]
fn abort_wakes_a_caller_in_call_on_connect_with_streams_without_a_hook() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(LIMIT)).unwrap();
    let client = Arc::new(
        PacketConnection::connect_with(
            move || {
                let on_close: Option<OnClose> = None;
                Ok((a.try_clone()?, a, on_close))
            },
            Config::default().name("cwith").extensions(false),
        )
        .unwrap(),
    );
    let caller = spawn_calls_then(&client, b"last");
    // Answer the first requests, read the last and leave it unanswered.
    let mut buf = Vec::new();
    let last = answer_warm_calls(&mut peer, &mut buf);
    assert_eq!(last.payload, b"last");
    thread::sleep(ms(50));
    client.abort();
    let (warm_ok, last) = within_or(
        "a caller in call() after abort",
        HANG,
        move || caller.join().unwrap(),
        // Unstick the caller: the peer closes the stream.
        || peer.shutdown(std::net::Shutdown::Both).unwrap(),
    );
    assert!(warm_ok);
    assert!(
        matches!(last, Ok(Err(Error::ConnectionLost(Disconnect::Local)))),
        "{last:?}"
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
    assert_eq!(
        holder.call_timeout(ECHO, 0, b"in", LIMIT).unwrap().payload,
        b"in"
    );

    let refused = TcpStream::connect(addr).unwrap();
    refused.set_read_timeout(Some(ms(100))).unwrap();
    refused.set_write_timeout(Some(ms(100))).unwrap();
    let flooding = Arc::new(AtomicBool::new(true));
    let flooder = {
        let (mut stream, flooding) = (refused.try_clone().unwrap(), Arc::clone(&flooding));
        thread::spawn(move || {
            let chunk = wire(&Packet::erq()).repeat(1024);
            let deadline = Instant::now() + LIMIT;
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
    let _ = holder.close_timeout(LIMIT);
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
    common::wait_for("the flood to start", LIMIT, || {
        started.lock().unwrap().len() >= 10
    });
    let before = started.lock().unwrap().len();
    let asked = Instant::now();
    let res = victim.call_timeout(ECHO, 0, b"me", LIMIT);
    let waited = asked.elapsed();
    assert_eq!(res.unwrap().payload, b"me");
    let log = started.lock().unwrap().clone();
    let at = log.iter().position(|&tag| tag == u64::MAX).unwrap();
    let overtaken_by = at - before;
    for pending in flood {
        pending.wait_timeout(LIMIT).unwrap();
    }
    assert!(flooder.close_timeout(LIMIT).is_ok());
    assert!(victim.close_timeout(LIMIT).is_ok());
    assert!(server.stop_timeout(LIMIT).is_ok());
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

/// A logger that takes its time over the server's "accepted" lines, as one
/// that writes synchronously to a slow disk or socket does.
struct SlowLogger;

impl log::Log for SlowLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() == log::Level::Warn {
            pause_if_asked(record);
        }
        if record.level() == log::Level::Debug && record.target() == "packetstream::server" {
            let line = record.args().to_string();
            if line.starts_with("hooks#") && line.ends_with(": accepted") {
                thread::sleep(ms(5));
            }
        }
    }

    fn flush(&self) {}
}

/// Installs [`SlowLogger`] for this test binary, once.
fn install_slow_logger() {
    static LOGGER: std::sync::Once = std::sync::Once::new();
    LOGGER.call_once(|| {
        log::set_logger(&SlowLogger).unwrap();
        log::set_max_level(log::LevelFilter::Debug);
    });
}

/// A warning to hold up, as a logger that blocks would: the thread named
/// `thread` that logs a line containing `text` waits at `gate`, and the
/// line is kept in `line`. Once only.
struct Pause {
    thread: String,
    text: String,
    gate: common::Gate,
    line: Arc<Mutex<Option<String>>>,
}

static PAUSE: Mutex<Option<Pause>> = Mutex::new(None);

fn pause_if_asked(record: &log::Record<'_>) {
    let current = thread::current();
    let Some(name) = current.name() else {
        return;
    };
    let line = record.args().to_string();
    let gate = {
        let mut pause = PAUSE.lock().unwrap_or_else(|e| e.into_inner());
        match pause.as_ref() {
            Some(p) if p.thread == name && line.contains(&p.text) => {
                let p = pause.take().unwrap();
                *p.line.lock().unwrap() = Some(line);
                p.gate
            }
            _ => return,
        }
    };
    gate.pass();
}

/// Clients that connect, send EOF and go at once: each is reported by
/// `on_accept` once, then by `on_close` once, in that order, even with a
/// slow logger.
#[test]
fn clients_that_end_at_once_get_on_accept_then_on_close_once_each() {
    const CLIENTS: u64 = 40;
    install_slow_logger();
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
    common::wait_for("every client's on_close", LIMIT, || {
        let seen = seen.lock().unwrap();
        seen.iter()
            .filter(|h| matches!(h, Hooked::Close(_)))
            .count() as u64
            >= CLIENTS
    });
    assert!(server.stop_timeout(LIMIT).is_ok());
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
                    match c.call_timeout(SLEEP, 0, b"1", LIMIT) {
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
    common::wait_for("the server's threads to end", LIMIT, || {
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
    decode_all(&bytes)
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
        peer.set_read_timeout(Some(LIMIT)).unwrap();
        let conn = PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name("bigreply")
                .extensions(false)
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

/// A payload of `len` bytes that says where it came from.
fn payload_for(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Mostly small, one in eight over the size that is queued by move.
fn size_for(seed: u64) -> usize {
    match seed % 8 {
        0 => 64 * 1024 + (seed as usize * 7919) % 60_000,
        _ => (seed as usize * 131) % 1500,
    }
}

/// Two ends that both serve inline flood each other with requests from
/// several threads, mixing `call`, `wait` and `wait_timeout`, small payloads
/// and large: every request gets its own reply, byte for byte, and nothing
/// deadlocks.
#[test]
fn two_inline_ends_flooding_each_other_answer_every_request_exactly() {
    let (a, b) = UnixStream::pair().unwrap();
    let inline = |name: &str| {
        Config::default()
            .name(name)
            .max_queued_bytes(1 << 20)
            .inline_handler(echo)
    };
    let left = Arc::new(PacketConnection::from_unix_stream(a, inline("infl-a")).unwrap());
    let right = Arc::new(PacketConnection::from_unix_stream(b, inline("infl-b")).unwrap());
    let ends = [Arc::clone(&left), Arc::clone(&right)];
    let flood = move || {
        let mut workers = Vec::new();
        for (end_idx, end) in ends.iter().enumerate() {
            for thread_idx in 0..3u64 {
                let end = Arc::clone(end);
                workers.push(thread::spawn(move || {
                    let mut n_checked = 0;
                    for round in 0..60u64 {
                        let seed0 = ((end_idx as u64 * 3 + thread_idx) << 32) | (round << 8);
                        if round % 3 == 0 {
                            let want = payload_for(seed0, size_for(seed0));
                            let got = end.call(ECHO, seed0, &want)?;
                            assert_eq!((got.flags, got.payload == want), (seed0, true));
                            n_checked += 1;
                            continue;
                        }
                        let mut pending = Vec::new();
                        for i in 0..12u64 {
                            let seed = seed0 | i;
                            let payload = payload_for(seed, size_for(seed));
                            let handle = end.submit(ECHO, seed, &payload)?;
                            pending.push((seed, payload, handle));
                        }
                        for (seed, want, pending) in pending {
                            let got = if round % 3 == 1 {
                                pending.wait()
                            } else {
                                pending.wait_timeout(LIMIT)
                            }?;
                            assert_eq!(got.flags, seed);
                            assert!(got.payload == want, "reply to {seed:#x} differs");
                            n_checked += 1;
                        }
                    }
                    Ok::<usize, Error>(n_checked)
                }));
            }
        }
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Result<Vec<usize>, Error>>()
            .map(|counts| counts.into_iter().sum::<usize>())
    };
    let (l, r) = (Arc::clone(&left), Arc::clone(&right));
    let n_checked = within_or("the flood", LIMIT + HANG, flood, || {
        l.abort();
        r.abort();
    })
    .unwrap();
    assert_eq!(n_checked, 6 * (20 + 40 * 12));
    let closing = Arc::clone(&right);
    let closer = thread::spawn(move || closing.close_timeout(LIMIT));
    assert!(left.close_timeout(LIMIT).is_ok());
    assert!(within("the other close", move || closer.join().unwrap()).is_ok());
}

/// A peer that reads slowly, in small pieces, gets every reply of an inline
/// handler in order and byte for byte, though the thread that reads writes
/// them through a short write timeout and leaves the rest to the send
/// thread.
#[test]
fn a_slow_reader_gets_every_inline_reply_in_order_and_whole() {
    const N: u64 = 300;
    let (a, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(LIMIT)).unwrap();
    let conn = PacketConnection::from_unix_stream(
        a,
        Config::default()
            .name("slowrd")
            .extensions(false)
            .inline_handler(echo),
    )
    .unwrap();
    let mut writer = peer.try_clone().unwrap();
    let writing = thread::spawn(move || {
        for tag in 2..2 + N {
            let payload = payload_for(tag, size_for(tag));
            writer
                .write_all(&wire(&common::request(tag, ECHO, tag, &payload)))
                .unwrap();
        }
        writer.write_all(&wire(&Packet::eof())).unwrap();
    });
    let packets = within("the slow reader", move || {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 3000];
        let mut n_reads = 0u64;
        while let Ok(n @ 1..) = peer.read(&mut chunk) {
            bytes.extend_from_slice(&chunk[..n]);
            n_reads += 1;
            if n_reads.is_multiple_of(64) {
                thread::sleep(ms(1));
            }
        }
        let mut packets = Vec::new();
        let mut pos = 0;
        while let Some((packet, used)) = Packet::decode(&bytes[pos..], u64::MAX).unwrap() {
            packets.push(packet);
            pos += used;
        }
        assert_eq!(pos, bytes.len(), "bytes of a partial packet at the end");
        packets
    });
    within("the writer", move || writing.join().unwrap());
    assert!(within("join", move || conn.join()).is_ok());
    let (replies, rest) = packets.split_at(N as usize);
    for (idx, reply) in replies.iter().enumerate() {
        let tag = 2 + idx as u64;
        assert_eq!((reply.tag, reply.payload.len()), (tag, size_for(tag)));
        assert!(
            reply.payload == payload_for(tag, size_for(tag)),
            "reply {tag} differs"
        );
    }
    assert_eq!(rest.len(), 2);
    assert!(rest[0].is_erq() && rest[1].is_eof());
}

/// Two ends whose inline handlers submit a request of their own (without
/// waiting for its response, as the inline handler's documentation allows)
/// while both flood each other: nothing deadlocks.
#[test]
fn two_inline_ends_whose_handlers_submit_do_not_deadlock() {
    const PING: u64 = 20;
    const PONG: u64 = 21;
    let (a, b) = UnixStream::pair().unwrap();
    let make = |stream: UnixStream, name: &str| {
        let me: Arc<std::sync::OnceLock<std::sync::Weak<PacketConnection>>> = Arc::default();
        let handler = {
            let me = Arc::clone(&me);
            move |rq: Request| -> HandlerResult {
                if rq.rq_type == PING {
                    if let Some(conn) = me.get().and_then(std::sync::Weak::upgrade) {
                        drop(conn.submit(PONG, 0, &rq.payload));
                    }
                }
                Ok(().into())
            }
        };
        let config = Config::default()
            .name(name)
            .max_queued_bytes(256 << 10)
            .inline_handler(handler);
        let conn = Arc::new(PacketConnection::from_unix_stream(stream, config).unwrap());
        me.set(Arc::downgrade(&conn)).unwrap();
        conn
    };
    let left = make(a, "pp-a");
    let right = make(b, "pp-b");
    let ends = [Arc::clone(&left), Arc::clone(&right)];
    let flood = move || {
        let workers: Vec<_> = ends
            .iter()
            .map(|end| {
                let end = Arc::clone(end);
                thread::spawn(move || {
                    let payload = vec![7u8; 16 << 10];
                    let mut window = std::collections::VecDeque::new();
                    for _ in 0..600 {
                        window.push_back(end.submit(PING, 0, &payload)?);
                        if window.len() > 64 {
                            window.pop_front().unwrap().wait_timeout(LIMIT)?;
                        }
                    }
                    for pending in window {
                        pending.wait_timeout(LIMIT)?;
                    }
                    Ok::<(), Error>(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    };
    let res = within_or("the ping flood", ms(8_000), flood, || {
        left.abort();
        right.abort();
    });
    for res in res {
        assert!(res.is_ok(), "{res:?}");
    }
    let closing = Arc::clone(&right);
    let closer = thread::spawn(move || closing.close_timeout(LIMIT));
    assert!(left.close_timeout(LIMIT).is_ok());
    assert!(within("the other close", move || closer.join().unwrap()).is_ok());
}

/// Many threads share one connection and wait in every way at once: `call`
/// and `wait` (which may read for themselves), `wait_timeout`,
/// `call_timeout`, and `try_wait` polling, against handlers of varying
/// speed; meanwhile the peer calls back. Every request gets its own answer,
/// and nothing hangs.
#[test]
fn threads_mixing_every_way_of_waiting_on_one_connection_all_get_their_answers() {
    let (client, server) = pair_both_serving("mix");
    let mut workers = Vec::new();
    for thread_idx in 0..8u64 {
        let c = Arc::clone(&client);
        workers.push(thread::spawn(move || {
            for round in 0..40u64 {
                let seed = (thread_idx << 16) | round;
                let sleep = format!("{}", seed % 4);
                let got = match (thread_idx + round) % 5 {
                    0 => c.call(SLEEP, seed, sleep.as_bytes()),
                    1 => c.submit(SLEEP, seed, sleep.as_bytes())?.wait(),
                    2 => c.submit(SLEEP, seed, sleep.as_bytes())?.wait_timeout(LIMIT),
                    3 => c.call_timeout(SLEEP, seed, sleep.as_bytes(), LIMIT),
                    _ => {
                        let pending = c.submit(SLEEP, seed, sleep.as_bytes())?;
                        let deadline = Instant::now() + LIMIT;
                        loop {
                            if let Some(res) = pending.try_wait() {
                                break res;
                            }
                            if Instant::now() > deadline {
                                break Err(Error::Closed);
                            }
                            thread::sleep(ms(1));
                        }
                    }
                }?;
                assert_eq!(got.flags, seed);
            }
            Ok::<(), Error>(())
        }));
    }
    // The peer calls back meanwhile.
    let s = Arc::clone(&server);
    workers.push(thread::spawn(move || {
        for round in 0..100u64 {
            let got = s.call_timeout(ECHO, round, b"back", LIMIT)?;
            assert_eq!(got.flags, round);
            thread::sleep(ms(3));
        }
        Ok(())
    }));
    join_all_ok("the mixed waiters", workers, &client, &server);
}

/// Joins the calling threads within 15 s, aborting both ends first if they
/// take longer, checks that each ended well, and closes both ends in order.
fn join_all_ok(
    what: &str,
    workers: Vec<thread::JoinHandle<Result<(), Error>>>,
    client: &PacketConnection,
    server: &PacketConnection,
) {
    let results = within_or(
        what,
        ms(15_000),
        move || {
            workers
                .into_iter()
                .map(|w| w.join().unwrap())
                .collect::<Vec<_>>()
        },
        || {
            client.abort();
            server.abort();
        },
    );
    for res in results {
        assert!(res.is_ok(), "{res:?}");
    }
    assert!(client.close_timeout(LIMIT).is_ok());
    assert!(server.close_timeout(LIMIT).is_ok());
}

/// A server's handlers call back over the connection they serve and wait
/// without a deadline (so that a handler thread may read for itself), while
/// the client's own threads call the server: every call completes.
#[test]
fn handlers_that_call_back_and_wait_while_the_client_calls_all_complete() {
    const OUTER: u64 = 30;
    const INNER: u64 = 31;
    let (a, b) = UnixStream::pair().unwrap();
    let me: Arc<std::sync::OnceLock<std::sync::Weak<PacketConnection>>> = Arc::default();
    let handler = {
        let me = Arc::clone(&me);
        move |rq: Request| -> HandlerResult {
            let conn = me.get().and_then(std::sync::Weak::upgrade).ok_or("gone")?;
            let inner = conn.call(INNER, rq.flags, &rq.payload)?;
            Ok((inner.flags, inner.payload).into())
        }
    };
    let server = Arc::new(
        PacketConnection::from_unix_stream(
            b,
            Config::default()
                .name("cbs")
                .handler_threads(6)
                .handler(handler),
        )
        .unwrap(),
    );
    me.set(Arc::downgrade(&server)).unwrap();
    let client = Arc::new(
        PacketConnection::from_unix_stream(a, Config::default().name("cbc").handler(echo)).unwrap(),
    );
    let workers: Vec<_> = (0..4u64)
        .map(|thread_idx| {
            let c = Arc::clone(&client);
            thread::spawn(move || {
                for round in 0..50u64 {
                    let seed = (thread_idx << 16) | round;
                    let got = c.call(OUTER, seed, &seed.to_be_bytes())?;
                    assert_eq!(
                        (got.flags, got.payload),
                        (seed, seed.to_be_bytes().to_vec())
                    );
                }
                Ok::<(), Error>(())
            })
        })
        .collect();
    join_all_ok("the callers", workers, &client, &server);
}

/// A peer that crashes (its stream ends without EOF) while one of our
/// callers reads the stream itself: the caller's request, `close` and
/// `on_end` all say the stream ended, never that the peer sent EOF.
#[test]
fn a_crash_read_by_a_caller_on_the_lent_reader_is_stream_ended() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(LIMIT)).unwrap();
    let (ended_tx, ended_rx) = std::sync::mpsc::channel();
    let ended_tx = Mutex::new(ended_tx);
    let client = Arc::new(
        PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name("crash")
                .extensions(false)
                .on_end(move |why| {
                    let _ = ended_tx.lock().unwrap().send(why);
                }),
        )
        .unwrap(),
    );
    let caller = spawn_calls_then(&client, b"last");
    let mut buf = Vec::new();
    let last = answer_warm_calls(&mut peer, &mut buf);
    assert_eq!(last.payload, b"last");
    thread::sleep(ms(30));
    // The peer crashes: its stream goes, without EOF.
    drop(peer);
    let (warm_ok, last) = within("the caller", move || caller.join().unwrap());
    assert!(warm_ok);
    assert!(
        matches!(
            last,
            Ok(Err(Error::ConnectionLost(Disconnect::StreamEnded)))
        ),
        "{last:?}"
    );
    for _ in 0..2 {
        let closed = client.close_timeout(LIMIT);
        assert!(
            matches!(closed, Err(Error::ConnectionLost(Disconnect::StreamEnded))),
            "close after a crash: {closed:?}"
        );
    }
    let why = ended_rx.recv_timeout(LIMIT).unwrap();
    assert_eq!(why, Disconnect::StreamEnded);
    assert_eq!(client.status().ended, Some(why));
}

/// A per-client factory that panics (an unlucky user's `unwrap`) cuts that
/// client off; the server goes on serving the others, and stops in order.
#[test]
fn a_panicking_factory_cuts_its_client_off_and_the_server_goes_on() {
    let config = ServerConfig::per_client("pfac", |client| {
        assert!(client.id != 2, "the factory fails for client {}", client.id);
        server_config("pfac")
    });
    let (server, addr) = serve(config);
    let first = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    assert_eq!(
        first.call_timeout(ECHO, 0, b"1", LIMIT).unwrap().payload,
        b"1"
    );
    // The second client's factory panics: its stream ends.
    let second = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    let err = second.call_timeout(ECHO, 0, b"2", LIMIT).unwrap_err();
    assert!(err.is_disconnect(), "{err:?}");
    // The third is served.
    let third = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    assert_eq!(
        third.call_timeout(ECHO, 0, b"3", LIMIT).unwrap().payload,
        b"3"
    );
    assert_eq!(server.connections(), 2);
    let stopper = thread::spawn(move || server.stop_timeout(LIMIT));
    for client in [&first, &third] {
        client.close_timeout(LIMIT).unwrap();
    }
    within("the server's stop", move || stopper.join().unwrap()).unwrap();
    second.abort();
}

/// An inline end closing while a raw peer floods it with requests and
/// answers its requests, and its own threads call and submit: on the wire,
/// no request follows its ERQ and nothing follows its EOF; each of the
/// peer's requests gets one reply; each of its own requests ends once, and
/// none that went out is called `Unsent`.
#[test]
fn an_inline_end_closing_under_a_two_way_flood_keeps_the_shutdown_order() {
    use std::collections::HashSet;
    let (a, peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(LIMIT)).unwrap();
    let conn = Arc::new(
        PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name("ord")
                .extensions(false)
                .inline_handler(echo),
        )
        .unwrap(),
    );
    let peer_out = Arc::new(Mutex::new((peer.try_clone().unwrap(), false)));
    // The peer's requests, until it has seen our EOF.
    let peer_writer = {
        let peer_out = Arc::clone(&peer_out);
        thread::spawn(move || {
            let mut sent = 0u64;
            loop {
                {
                    let mut out = peer_out.lock().unwrap();
                    if out.1 {
                        return sent;
                    }
                    let tag = 2 + sent;
                    if out
                        .0
                        .write_all(&wire(&common::request(tag, ECHO, tag, b"p")))
                        .is_err()
                    {
                        return sent;
                    }
                    sent += 1;
                }
                thread::sleep(Duration::from_micros(200));
            }
        })
    };
    // The peer reads everything, answers our requests, and sends its EOF
    // after ours.
    let peer_reader = {
        let (peer_out, mut peer) = (Arc::clone(&peer_out), peer);
        thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 16 << 10];
            loop {
                while let Some((packet, used)) = Packet::decode(&buf, u64::MAX).unwrap() {
                    buf.drain(..used);
                    let mut out = peer_out.lock().unwrap();
                    if let packetstream::PacketKind::Request { .. } = packet.kind {
                        if !out.1 && !packet.is_eof() && !packet.is_erq() {
                            let _ = out.0.write_all(&wire(&common::response(
                                packet.tag, true, packet.tag, b"",
                            )));
                        }
                    }
                    if packet.is_eof() && !out.1 {
                        out.1 = true;
                        let _ = out.0.write_all(&wire(&Packet::eof()));
                    }
                    seen.push(packet);
                }
                match peer.read(&mut chunk) {
                    Ok(0) | Err(_) => return (seen, buf.len()),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
    };
    // Our own requests, from two threads, until the close refuses them.
    let callers: Vec<_> = (0..2)
        .map(|idx| {
            let conn = Arc::clone(&conn);
            thread::spawn(move || {
                let mut outcomes: Vec<(u64, Result<(), Error>)> = Vec::new();
                loop {
                    let pending = match conn.submit(ECHO, 0, b"us") {
                        Ok(pending) => pending,
                        Err(Error::Closed) => return outcomes,
                        Err(err) => panic!("submit: {err:?}"),
                    };
                    let tag = pending.tag();
                    let res = if idx == 0 {
                        pending.wait()
                    } else {
                        pending.wait_timeout(LIMIT)
                    };
                    outcomes.push((tag, res.map(drop)));
                }
            })
        })
        .collect();
    thread::sleep(ms(150));
    let closed = conn.close_timeout(LIMIT);
    let n_peer_requests = within("the peer's writer", move || peer_writer.join().unwrap());
    let (seen, left_over) = within("the peer's reader", move || peer_reader.join().unwrap());
    let outcomes: Vec<_> = callers
        .into_iter()
        .flat_map(|c| within("a caller", move || c.join().unwrap()))
        .collect();
    assert!(closed.is_ok(), "{closed:?}");
    assert_eq!(left_over, 0, "bytes of a partial packet at the end");

    let erq_at = seen.iter().position(Packet::is_erq).expect("ERQ sent");
    let eof_at = seen.iter().position(Packet::is_eof).expect("EOF sent");
    assert_eq!(eof_at, seen.len() - 1, "packets after EOF");
    let our_requests: HashSet<u64> = seen
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p.kind, packetstream::PacketKind::Request { .. }))
        .filter(|(_, p)| !p.is_erq() && !p.is_eof())
        .map(|(at, p)| {
            assert!(at < erq_at, "request {} after ERQ", p.tag);
            p.tag
        })
        .collect();
    for (tag, res) in &outcomes {
        match res {
            Ok(()) => assert!(our_requests.contains(tag)),
            Err(Error::ConnectionLost(Disconnect::PeerEof)) => {
                assert!(our_requests.contains(tag))
            }
            Err(Error::Unsent(Disconnect::PeerEof)) => {
                assert!(
                    !our_requests.contains(tag),
                    "request {tag} went out as Unsent"
                )
            }
            Err(err) => panic!("request {tag}: {err:?}"),
        }
    }
    assert_eq!(
        outcomes.len(),
        our_requests.len()
            + outcomes
                .iter()
                .filter(|(_, r)| matches!(r, Err(Error::Unsent(_))))
                .count()
    );
    // The peer's requests read before our EOF was queued got one reply
    // each, in order (ok, or refused once we were closing); those read after
    // it could get none.
    let replied: Vec<u64> = seen
        .iter()
        .filter(|p| matches!(p.kind, packetstream::PacketKind::Response { .. }))
        .map(|p| p.tag)
        .collect();
    let want: Vec<u64> = (2..2 + replied.len() as u64).collect();
    assert_eq!(replied, want, "replies out of order, missing or repeated");
    assert!(replied.len() as u64 <= conn.stats().requests_received);
    assert!(replied.len() as u64 <= n_peer_requests);
}

/// A hook that panics (an unlucky user's `on_end`) runs, as documented, on
/// one of the connection's threads, so `close` re-raises its panic. Here the
/// peer's EOF is read by a caller waiting in `call` on the lent reader: the
/// caller's `call` must still end with the lost connection, and `close` must
/// not wait for ever.
#[test]
fn a_panicking_on_end_hook_neither_lands_in_a_callers_call_nor_hangs_close() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(LIMIT)).unwrap();
    let client = Arc::new(
        PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name("hookp")
                .extensions(false)
                .on_end(|_| panic!("the on_end hook fails")),
        )
        .unwrap(),
    );
    let caller = spawn_calls_then(&client, b"last");
    let mut buf = Vec::new();
    let last = answer_warm_calls(&mut peer, &mut buf);
    assert_eq!(last.payload, b"last");
    thread::sleep(ms(30));
    // Our close: ERQ and EOF go out; then the peer's EOF, without an answer.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let closer = {
        let c = Arc::clone(&client);
        thread::spawn(move || {
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.close()));
            let _ = done_tx.send(res.is_err());
        })
    };
    let ours = read_packets(&mut peer, &mut buf, 2);
    assert!(ours[0].is_erq() && ours[1].is_eof());
    peer.write_all(&wire(&Packet::eof())).unwrap();
    let (warm_ok, last) = within("the caller", move || caller.join().unwrap());
    assert!(warm_ok);
    let close_outcome = done_rx.recv_timeout(HANG);
    if close_outcome.is_ok() {
        closer.join().unwrap();
    }
    assert!(
        matches!(last, Ok(Err(Error::ConnectionLost(Disconnect::PeerEof))))
            && close_outcome.is_ok(),
        "the caller's last call: {last:?}; close returned (true if it panicked) \
         within {HANG:?}: {close_outcome:?}"
    );
}

/// Requests queued behind a large reply that a bounded write cut short, and
/// never written before an abort, are `Unsent`: the bytes the cut write
/// left over are counted once, not twice, in how far the writers got.
#[test]
fn requests_never_written_behind_a_cut_short_reply_are_unsent_on_abort() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(LIMIT)).unwrap();
    let conn = PacketConnection::from_unix_stream(
        a,
        Config::default()
            .name("twice")
            .extensions(false)
            .inline_handler(|_: Request| -> HandlerResult { Ok(vec![0u8; 1 << 20].into()) }),
    )
    .unwrap();
    // The peer asks for the large reply and reads nothing yet: the reply
    // fills the socket, the receive thread's write is cut short, and the
    // send thread takes the rest and blocks in it.
    peer.write_all(&wire(&common::request(2, ECHO, 0, b"")))
        .unwrap();
    common::wait_for("the reply to start going out", LIMIT, || {
        conn.stats().bytes_out > 0
    });
    thread::sleep(ms(100));
    // Queued behind it; the grace runs out, but the writer is still blocked.
    let pending: Vec<_> = (0..5)
        .map(|_| conn.submit(ECHO, 0, b"behind").unwrap())
        .collect();
    let tags: Vec<u64> = pending.iter().map(|p| p.tag()).collect();
    thread::sleep(ms(50));
    conn.abort();
    let outcomes: Vec<_> = pending
        .into_iter()
        .map(|p| p.wait_timeout(LIMIT).map(drop))
        .collect();
    let (packets, _) = within("the peer's reads", move || read_to_end_packets(&mut peer));
    let on_wire: Vec<u64> = packets
        .iter()
        .filter(|p| matches!(p.kind, packetstream::PacketKind::Request { .. }))
        .map(|p| p.tag)
        .collect();
    for (tag, res) in tags.iter().zip(&outcomes) {
        assert!(!on_wire.contains(tag), "request {tag} was written");
        assert!(
            matches!(res, Err(Error::Unsent(Disconnect::Local))),
            "request {tag}, never written, ended with {res:?}"
        );
    }
}

/// A peer that floods an inline end with requests and never reads a reply:
/// the end keeps reading every request (its receive thread never blocks in
/// a write), and `close_timeout` still returns in time.
#[test]
fn an_inline_end_keeps_reading_a_peer_that_never_reads_and_closes_in_time() {
    const N: u64 = 5000;
    let (a, peer) = UnixStream::pair().unwrap();
    peer.set_write_timeout(Some(LIMIT)).unwrap();
    let conn = Arc::new(
        PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name("noread")
                .extensions(false)
                .inline_handler(echo),
        )
        .unwrap(),
    );
    let mut writer = peer.try_clone().unwrap();
    let writing = thread::spawn(move || {
        let payload = vec![5u8; 1000];
        for tag in 2..2 + N {
            writer.write_all(&wire(&common::request(tag, ECHO, 0, &payload)))?;
        }
        Ok::<(), std::io::Error>(())
    });
    let c = Arc::clone(&conn);
    common::wait_for("every request to be read", LIMIT, move || {
        c.stats().requests_received == N
    });
    assert!(within("the peer's writes", move || writing.join().unwrap()).is_ok());
    // Replies far past what the socket holds are queued: nothing reads them.
    assert!(conn.stats().bytes_out < N * 1000);
    let c = Arc::clone(&conn);
    let (res, took) = match common::timed(HANG, move || c.close_timeout(ms(200))) {
        common::Timed::Done(res, took) => (res, took),
        common::Timed::Stuck(_) => panic!("close_timeout(200 ms) still blocked after {HANG:?}"),
    };
    assert!(matches!(res, Err(Error::Timeout { .. })), "{res:?}");
    assert!(took < ms(300), "close_timeout(200 ms) took {took:?}");
    drop(peer);
}

/// A socket handed over with a read timeout still set (left from the
/// caller's own use of it): the connection manages the socket's write
/// timeout, and an idle spell longer than the read timeout must not end
/// the connection.
#[test]
fn an_idle_connection_over_a_socket_with_a_read_timeout_stays_up() {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_read_timeout(Some(ms(50))).unwrap();
    let server = PacketConnection::from_unix_stream(b, server_config("rto-s")).unwrap();
    let client = PacketConnection::from_unix_stream(a, Config::default().name("rto-c")).unwrap();
    assert!(client.call_timeout(ECHO, 0, b"before", LIMIT).is_ok());
    thread::sleep(ms(200));
    let res = client.call_timeout(ECHO, 0, b"after", LIMIT);
    let status = client.status();
    let _ = server.close_timeout(LIMIT);
    let _ = client.close_timeout(LIMIT);
    assert!(
        res.is_ok(),
        "after an idle spell: {res:?}; status {status:?}"
    );
}

/// A request refused as busy before the close began is still answered
/// before EOF: the receive thread decided the refusal (the replies owed at
/// their budget, a request in progress) and, before it queued it, the last
/// request in progress was answered and the close began. The refusal must
/// not be dropped behind EOF, leaving the peer's request with no answer.
#[test]
fn a_busy_refusal_decided_before_the_close_is_sent_before_eof() {
    const HOLD: u64 = 10;
    const BIG: u64 = 20;
    install_slow_logger();
    let name = common::unique_name("busyeof");
    let hold = common::Gate::new();
    let handler = {
        let hold = hold.clone();
        move |rq: Request| -> HandlerResult {
            if rq.rq_type == HOLD {
                hold.pass();
            }
            Ok(vec![b'b'; if rq.rq_type == BIG { 64 << 10 } else { 8 }].into())
        }
    };
    let (conn, mut peer) = common::RawPeer::with(
        Config::default()
            .name(&name)
            .handler(handler)
            .handler_threads(2)
            .max_queued_bytes(1000),
    );
    // The receive thread waits in its warning of the first busy refusal.
    let paused = common::Gate::new();
    let line: Arc<Mutex<Option<String>>> = Arc::default();
    *PAUSE.lock().unwrap() = Some(Pause {
        thread: format!("{name}:recv"),
        text: "busy: ".to_string(),
        gate: paused.clone(),
        line: Arc::clone(&line),
    });
    peer.request(0, HOLD, b"");
    hold.wait_entered(1, LIMIT);
    // Requests for large replies, which the peer does not read yet: the
    // replies owed reach their budget, and one is refused as busy.
    // One at a time, each answered (into the queue) before the next, so
    // that the receive thread, not a handler, finds the budget reached.
    let mut writer = peer.stream.try_clone().unwrap();
    let mut tag = 0;
    while paused.entered() == 0 {
        tag += 1;
        assert!(
            tag < 100,
            "no busy refusal: {:?} {:?}",
            conn.stats(),
            conn.status()
        );
        writer
            .write_all(&wire(&common::request(tag, BIG, 0, b"")))
            .unwrap();
        common::wait_for("the request to be answered or refused", LIMIT, || {
            let stats = conn.stats();
            paused.entered() > 0 || (stats.requests_received > tag && stats.in_progress == 1)
        });
    }
    let send = thread::spawn(move || {
        // More requests, which arrive during the close.
        for tag in 1000..1040 {
            if writer
                .write_all(&wire(&common::request(tag, BIG, 0, b"")))
                .is_err()
            {
                break;
            }
        }
    });
    paused.wait_entered(1, LIMIT);
    let refused: u64 = {
        let line = line.lock().unwrap().clone().unwrap();
        // "{name}: refusing request 0:{tag}: busy: ..."
        let at = line.find("refusing request 0:").unwrap() + "refusing request 0:".len();
        line[at..].split(':').next().unwrap().parse().unwrap()
    };
    // The request in progress is answered, and every request taken in
    // before the refusal; then the close begins, and finds nothing owed.
    hold.open();
    // (The refusal held up may count as in progress.)
    common::wait_for("the requests taken in to be answered", LIMIT, || {
        let stats = conn.stats();
        stats.replies_ok >= refused && stats.in_progress <= 1
    });
    let conn = Arc::new(conn);
    let closer = {
        let conn = Arc::clone(&conn);
        thread::spawn(move || conn.close_timeout(LIMIT))
    };
    common::wait_for("the close to begin", LIMIT, || conn.status().closing);
    thread::sleep(ms(20));
    // The refusal goes on its way now.
    paused.open();
    // The peer reads everything up to EOF.
    let mut replied = Vec::new();
    loop {
        let packet = peer.recv_packet();
        if packet.is_eof() {
            break;
        }
        if let packetstream::PacketKind::Response { .. } = packet.kind {
            replied.push(packet.tag);
        }
    }
    send.join().unwrap();
    peer.send(&Packet::eof());
    let closed = within_or("the close", LIMIT, move || closer.join().unwrap(), || {});
    assert!(closed.is_ok(), "{closed:?}");
    assert!(replied.contains(&0), "the held request was answered");
    assert!(
        replied.contains(&refused),
        "request {refused}, refused as busy before the close began, got no reply before EOF \
         (replies to {replied:?})"
    );
}

/// A client the server has accepted while the stop begins (its connection
/// still starting, here held in the `Config` factory) is ended in order,
/// ERQ then EOF, like every other: not cut off as if the server had
/// crashed, with its requests lost without a word.
#[test]
fn a_client_accepted_as_the_stop_begins_is_ended_in_order() {
    let gate = common::Gate::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::serve_tcp(
        listener,
        ServerConfig::per_client("starting", {
            let gate = gate.clone();
            move |info| {
                if info.id == 1 {
                    gate.pass();
                }
                Config::default().handler(echo)
            }
        }),
    )
    .unwrap();
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(LIMIT)).unwrap();
    client.set_write_timeout(Some(LIMIT)).unwrap();
    client
        .write_all(&wire(&common::request(1, ECHO, 0, b"x")))
        .unwrap();
    gate.wait_entered(1, LIMIT);
    let stop = thread::spawn(move || server.stop_timeout(LIMIT));
    // The stop begins while the client's connection is starting.
    thread::sleep(ms(50));
    gate.open();
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut sent_eof = false;
    loop {
        let n = match client.read(&mut chunk) {
            Ok(n) => n,
            Err(e) => panic!("the client's stream broke: {e} after {bytes:?}"),
        };
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
        if !sent_eof && decode_all(&bytes).0.iter().any(Packet::is_eof) {
            client.write_all(&wire(&Packet::eof())).unwrap();
            sent_eof = true;
        }
    }
    let (packets, partial) = decode_all(&bytes);
    assert_eq!(partial, 0);
    assert_eq!(
        packets.last(),
        Some(&Packet::eof()),
        "the stream ended without EOF: {packets:?}"
    );
    assert!(packets.contains(&Packet::erq()), "{packets:?}");
    let stopped = within_or("the stop", LIMIT, move || stop.join().unwrap(), || {});
    assert!(stopped.is_ok(), "{stopped:?}");
}

/// A handler's error whose `Display` panics.
#[derive(Debug)]
struct PanickyError;

impl std::fmt::Display for PanickyError {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("an error whose Display panics, on purpose")
    }
}

impl std::error::Error for PanickyError {}

/// An error a handler returns whose `Display` panics is a panic in the
/// handler's work like any other: its request gets a not-ok reply, and the
/// thread that ran it, the one handler thread or the receive thread of an
/// inline handler, lives on to serve the next request and the close.
#[test]
fn a_handler_error_whose_display_panics_is_answered_and_the_handler_thread_serves_on() {
    fn handler(rq: Request) -> HandlerResult {
        match rq.rq_type {
            ECHO => echo(rq),
            _ => Err(Box::new(PanickyError)),
        }
    }
    let servers = [
        Config::default().handler_threads(1).handler(handler),
        Config::default().inline_handler(handler),
    ];
    for (idx, config) in servers.into_iter().enumerate() {
        let (client, server) = pair_with(
            Config::default().name(format!("dispc{idx}")),
            config.name(format!("disps{idx}")),
        );
        let res = client.call_timeout(99, 0, b"", HANG);
        assert!(
            matches!(&res, Err(Error::Failed { payload, .. }) if payload.starts_with(b"handler panicked")),
            "server {idx}: {res:?}"
        );
        let res = client.call_timeout(ECHO, 0, b"after", HANG);
        assert_eq!(
            res.unwrap().payload,
            b"after",
            "server {idx}: the thread that ran the handler is gone"
        );
        assert!(client.close_timeout(HANG).is_ok());
        assert!(server.close_timeout(HANG).is_ok());
    }
}

/// How a raw peer sends the packet that follows its answer to a client's
/// last call: in the same write, before or after the answer, or in a write
/// of its own once the call has returned.
#[derive(Clone, Copy, Debug)]
enum Arrival {
    Before,
    After,
    Later,
}

/// A client that calls a raw peer [`WARM_CALLS`] times and once more, the
/// peer answering each: the last answer comes with `then`, as `arrival`
/// says. Returns the client (its calls done, all answered) and the peer.
fn calls_then(
    name: String,
    config: Config,
    then: &Packet,
    arrival: Arrival,
) -> (Arc<PacketConnection>, common::RawPeer) {
    let (conn, mut peer) = common::RawPeer::with_patience(config.name(name), HANG);
    let conn = Arc::new(conn);
    let caller = spawn_calls_then(&conn, b"last");
    for idx in 0..=WARM_CALLS {
        let rq = peer.recv_packet();
        let answer = wire(&common::response(rq.tag, true, 0, &rq.payload));
        let bytes = match arrival {
            _ if idx < WARM_CALLS => answer,
            Arrival::Before => [wire(then), answer].concat(),
            Arrival::After => [answer, wire(then)].concat(),
            Arrival::Later => answer,
        };
        peer.send_bytes(&bytes);
    }
    let (warm_ok, last) = within("the calls", move || caller.join().unwrap());
    assert!(warm_ok);
    assert_eq!(last.unwrap().unwrap().payload, b"last");
    if let Arrival::Later = arrival {
        peer.send(then);
    }
    (conn, peer)
}

/// The peer's request that comes with the answer to a client's last call,
/// or after it, is answered, by the client's handler, while no call reads:
/// whether the caller read it before its answer and queued it, or left it
/// unread behind the answer, or it came once the reader rested lent.
#[test]
fn a_request_that_comes_with_or_after_the_last_answer_is_served() {
    for arrival in [Arrival::Before, Arrival::After, Arrival::Later] {
        let name = format!("lastrq{arrival:?}");
        let pushed = common::request(1000, ECHO, 0, b"pushed");
        let config = Config::default().handler(echo);
        let (conn, mut peer) = calls_then(name, config, &pushed, arrival);
        // The peer's patience is HANG: a reply that never comes fails here.
        let reply = peer.recv_packet();
        assert_eq!(
            (reply.tag, reply.payload.as_slice()),
            (1000, &b"pushed"[..]),
            "{arrival:?}"
        );
        conn.abort();
    }
}

/// The peer's EOF, with the answer to a client's last call or after it,
/// ends the connection in order while no call reads: the client sends its
/// own EOF, and `join` returns.
#[test]
fn a_peer_eof_that_comes_with_or_after_the_last_answer_ends_the_connection() {
    for arrival in [Arrival::After, Arrival::Later] {
        let name = format!("lasteof{arrival:?}");
        let (conn, mut peer) = calls_then(name, Config::default(), &Packet::eof(), arrival);
        let (_, last) = peer.recv_until(Packet::is_eof);
        assert_eq!(last, Packet::eof(), "{arrival:?}");
        let c = Arc::clone(&conn);
        let res = within_or("join", HANG, move || c.join(), || conn.abort());
        assert!(res.is_ok(), "{arrival:?}: {res:?}");
    }
}

/// A connection aborted while its peer floods it with requests, its quota
/// of queued jobs full behind a slow handler, frees everything it held once
/// dropped: no job left queued, with nobody to run it, keeps the handler
/// (and the connection's state that holds it) alive. Over many rounds, so
/// that the abort meets the receive thread at every step of handing on a
/// request.
#[test]
fn a_connection_aborted_under_a_flood_of_requests_frees_its_handler() {
    let mut rng = common::Rng::new(0x5eed_ab07);
    for round in 0..40 {
        let marker = Arc::new(());
        let held = Arc::downgrade(&marker);
        let name = common::unique_name("flood");
        let handler_threads = 1 + rng.below(3) as usize;
        let config = Config::default()
            .name(name.as_str())
            .handler_threads(handler_threads)
            .handler_queue(4)
            .handler(move |rq: Request| -> HandlerResult {
                let _marker = &marker;
                thread::sleep(Duration::from_micros(200));
                echo(rq)
            });
        let (conn, peer) = common::RawPeer::with_patience(config, HANG);
        let mut stream = peer.stream.try_clone().unwrap();
        let flood = thread::spawn(move || {
            let mut tag = 0;
            // Until the connection's abort breaks the stream.
            while stream
                .write_all(&wire(&common::request(tag, ECHO, 0, b"x")))
                .is_ok()
            {
                tag += 1;
            }
        });
        thread::sleep(Duration::from_micros(rng.below(5_000)));
        conn.abort();
        drop(conn);
        common::assert_threads_gone(&name, HANG);
        within("the flood", move || flood.join().unwrap());
        drop(peer);
        common::wait_for(
            &format!("round {round}: the handler to be dropped"),
            HANG,
            || held.strong_count() == 0,
        );
    }
}

/// A server stopped while its clients flood it with requests, past its
/// deadline so that it aborts them, frees everything it held: its threads
/// end and its handler is dropped, with no job left queued in its shared
/// pool.
#[test]
fn a_server_stopped_under_a_flood_of_requests_frees_its_handler() {
    for round in 0..4 {
        let marker = Arc::new(());
        let held = Arc::downgrade(&marker);
        let name = common::unique_name("sflood");
        let config = Config::default()
            .name(name.as_str())
            .handler_queue(4)
            .handler(move |rq: Request| -> HandlerResult {
                let _marker = &marker;
                thread::sleep(Duration::from_micros(200));
                echo(rq)
            });
        let (server, addr) = serve(ServerConfig::new(config).handler_threads(2));
        let floods: Vec<_> = (0..6)
            .map(|_| {
                let mut stream = TcpStream::connect(addr).unwrap();
                stream.set_write_timeout(Some(HANG)).unwrap();
                thread::spawn(move || {
                    let mut tag = 0;
                    // Until the server's abort breaks the stream.
                    while stream
                        .write_all(&wire(&common::request(tag, ECHO, 0, b"x")))
                        .is_ok()
                    {
                        tag += 1;
                    }
                })
            })
            .collect();
        common::wait_for("the clients to be served", HANG, || {
            server.connections() == 6
        });
        thread::sleep(ms(10 * round));
        let stopped = within("the stop", move || server.stop_timeout(ms(50)));
        assert!(stopped.is_err(), "round {round}: the clients never closed");
        common::join_all("the floods", floods);
        common::wait_for(
            &format!("round {round}: the server's threads to end"),
            HANG,
            || common::threads_named(&name).is_empty(),
        );
        common::wait_for(
            &format!("round {round}: the handler to be dropped"),
            HANG,
            || held.strong_count() == 0,
        );
    }
}
