//! Servers that know their clients: a connection per client, made by a
//! factory that knows whom it serves; client handles the server calls and
//! closes; hooks as clients come and go; a clear refusal past the
//! connection limit; a connect that gives up in time; and a stop that ends
//! every client in order.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    decode_all, echo, join_all, report, request, serial, threads_named, timed, unique_name,
    wait_for, wire, Gate, Timed, ECHO, HANG, LIMIT, SLACK,
};
use packetstream::{
    ClientInfo, Config, Disconnect, Error, HandlerResult, Packet, PacketConnection, PacketKind,
    PeerAddr, Request, Server, ServerConfig, BUSY_FLAGS, CONTROL_CHANNEL,
};

/// Answered with the serving connection's client id and address.
const WHO: u64 = 21;
/// Answered with how many COUNTs the serving connection has had, in the
/// flags.
const COUNT: u64 = 22;
/// A client answers with its own label.
const NAME: u64 = 23;
/// A client holds it at the test's gate.
const GATED: u64 = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listen {
    Tcp,
    Unix,
}

/// Where a test server listens.
enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Drop for Addr {
    fn drop(&mut self) {
        if let Addr::Unix(path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn serve(listen: Listen, config: ServerConfig) -> (Server, Addr) {
    match listen {
        Listen::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            (
                Server::serve_tcp(listener, config).unwrap(),
                Addr::Tcp(addr),
            )
        }
        Listen::Unix => {
            let path = std::env::temp_dir().join(format!(
                "packetstream-servers-{}-{}.sock",
                std::process::id(),
                unique_name("s")
            ));
            let listener = UnixListener::bind(&path).unwrap();
            (
                Server::serve_unix(listener, config).unwrap(),
                Addr::Unix(path),
            )
        }
    }
}

/// A raw client stream of either kind.
enum RawClient {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl RawClient {
    fn write_all(&mut self, bytes: &[u8]) {
        match self {
            RawClient::Tcp(s) => s.write_all(bytes),
            RawClient::Unix(s) => s.write_all(bytes),
        }
        .unwrap();
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            RawClient::Tcp(s) => s.read(buf),
            RawClient::Unix(s) => s.read(buf),
        }
    }

    /// Reads packets until the end of the stream (or a read error): the
    /// whole packets, and how many bytes of a partial one follow them.
    fn read_to_end(&mut self) -> (Vec<Packet>, usize) {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = self.read(&mut chunk) {
            bytes.extend_from_slice(&chunk[..n]);
        }
        decode_all(&bytes)
    }

    /// Reads until a whole packet has come, passing over the server's
    /// hello, which a client of the base protocol may leave unanswered.
    fn read_packet(&mut self) -> Packet {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 1];
        loop {
            if let Some((packet, used)) = Packet::decode(&bytes, u64::MAX).unwrap() {
                if packet.channel != CONTROL_CHANNEL {
                    return packet;
                }
                bytes.drain(..used);
                continue;
            }
            let n = self.read(&mut chunk).unwrap();
            assert_eq!(n, 1, "the stream ended before a whole packet");
            bytes.push(chunk[0]);
        }
    }
}

impl Addr {
    /// A client connection, and the client's address as the server sees
    /// it.
    fn connect(&self, config: Config) -> (PacketConnection, String) {
        match self {
            Addr::Tcp(addr) => {
                let stream = TcpStream::connect(addr).unwrap();
                let local = stream.local_addr().unwrap().to_string();
                (
                    PacketConnection::from_tcp_stream(stream, config).unwrap(),
                    local,
                )
            }
            Addr::Unix(path) => {
                let stream = UnixStream::connect(path).unwrap();
                (
                    PacketConnection::from_unix_stream(stream, config).unwrap(),
                    "unnamed".to_string(),
                )
            }
        }
    }

    /// A raw client, whose reads give up after `LIMIT`.
    fn connect_raw(&self) -> RawClient {
        match self {
            Addr::Tcp(addr) => {
                let stream = TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(LIMIT)).unwrap();
                RawClient::Tcp(stream)
            }
            Addr::Unix(path) => {
                let stream = UnixStream::connect(path).unwrap();
                stream.set_read_timeout(Some(LIMIT)).unwrap();
                RawClient::Unix(stream)
            }
        }
    }
}

fn addr_text(addr: &PeerAddr) -> String {
    match addr {
        PeerAddr::Tcp(addr) => addr.to_string(),
        PeerAddr::Unix(addr) if addr.is_unnamed() => "unnamed".to_string(),
        PeerAddr::Unix(addr) => format!("{:?}", addr.as_pathname()),
        other => format!("{other:?}"),
    }
}

/// A client whose handler answers NAME with `label`, holds GATED at
/// `gate`, and echoes the rest.
fn client_config(label: &str, gate: &Gate) -> Config {
    let (label, gate) = (label.to_string(), gate.clone());
    Config::default()
        .name(unique_name("client"))
        .handler(move |rq: Request| -> HandlerResult {
            match rq.rq_type {
                NAME => Ok(label.clone().into()),
                GATED => {
                    gate.pass();
                    Ok(label.clone().into())
                }
                _ => echo(rq),
            }
        })
}

/// What a server's hooks saw.
#[derive(Clone, Default)]
struct Seen {
    accepted: Arc<Mutex<Vec<u64>>>,
    closed: Arc<Mutex<Vec<(u64, Disconnect)>>>,
}

impl Seen {
    fn on(&self, config: ServerConfig) -> ServerConfig {
        let (accepted, closed) = (Arc::clone(&self.accepted), Arc::clone(&self.closed));
        config
            .on_accept(move |client| accepted.lock().unwrap().push(client.id()))
            .on_close(move |client, why| closed.lock().unwrap().push((client.id(), why)))
    }

    fn accepted(&self) -> Vec<u64> {
        self.accepted.lock().unwrap().clone()
    }

    fn closed(&self) -> Vec<(u64, Disconnect)> {
        let mut closed = self.closed.lock().unwrap().clone();
        closed.sort_by_key(|(id, _)| *id);
        closed
    }
}

// ---------------------------------------------------------------------------
// Each client its own handler.

#[test]
fn each_client_gets_its_own_handler_which_knows_whom_it_serves() {
    for listen in [Listen::Tcp, Listen::Unix] {
        let infos: Arc<Mutex<Vec<ClientInfo>>> = Arc::default();
        let config = {
            let infos = Arc::clone(&infos);
            ServerConfig::per_client(unique_name("each"), move |info: &ClientInfo| {
                infos.lock().unwrap().push(info.clone());
                let who = format!("{} {}", info.id, addr_text(&info.peer_addr));
                let count = AtomicU64::new(0);
                Config::default().handler(move |rq: Request| -> HandlerResult {
                    match rq.rq_type {
                        WHO => Ok(who.clone().into()),
                        COUNT => Ok((count.fetch_add(1, Ordering::SeqCst) + 1).into()),
                        _ => echo(rq),
                    }
                })
            })
        };
        let (server, addr) = serve(listen, config);
        let mut clients = Vec::new();
        for k in 1..=3u64 {
            let (conn, local) = addr.connect(Config::default().name(unique_name("c")));
            // Asked before the next client connects: ids in connect order.
            let who = conn.call_timeout(WHO, 0, b"", LIMIT).unwrap();
            assert_eq!(
                String::from_utf8(who.payload).unwrap(),
                format!("{k} {local}"),
                "{listen:?}"
            );
            clients.push((conn, local));
        }
        // Interleaved: client k's count is its own.
        for round in 0..3u64 {
            for (idx, (conn, _)) in clients.iter().enumerate() {
                if round <= idx as u64 {
                    let rsp = conn.call_timeout(COUNT, 0, b"", LIMIT).unwrap();
                    assert_eq!(rsp.flags, round + 1, "{listen:?} client {}", idx + 1);
                }
            }
        }
        let listed: Vec<_> = server
            .clients()
            .iter()
            .map(|c| (c.id(), addr_text(c.peer_addr())))
            .collect();
        let expected: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(idx, (_, local))| (idx as u64 + 1, local.clone()))
            .collect();
        assert_eq!(listed, expected, "{listen:?}");
        let ids: Vec<_> = infos.lock().unwrap().iter().map(|i| i.id).collect();
        assert_eq!(
            ids,
            [1, 2, 3],
            "{listen:?}: the factory ran once per client"
        );
        for (conn, _) in &clients {
            conn.close_timeout(LIMIT).unwrap();
        }
        server.stop_timeout(LIMIT).unwrap();
    }
}

// ---------------------------------------------------------------------------
// The server calls its clients.

#[test]
fn the_server_calls_its_clients_and_closes_one_while_the_others_go_on() {
    let gate = Gate::new();
    let config = ServerConfig::new(Config::default().name(unique_name("caller")).handler(echo));
    let (server, addr) = serve(Listen::Tcp, config);
    let clients: Vec<_> = (1..=3)
        .map(|k| {
            let (conn, _) = addr.connect(client_config(&format!("client-{k}"), &gate));
            conn.call_timeout(ECHO, 0, b"hello", LIMIT).unwrap();
            conn
        })
        .collect();
    let handles = server.clients();
    assert_eq!(
        handles.iter().map(|c| c.id()).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for (idx, handle) in handles.iter().enumerate() {
        let rsp = handle
            .connection()
            .call_timeout(NAME, 0, b"", LIMIT)
            .unwrap();
        assert_eq!(rsp.payload, format!("client-{}", idx + 1).as_bytes());
    }
    // Many in flight to every client at once.
    let pending: Vec<_> = handles
        .iter()
        .flat_map(|handle| {
            (0..5).map(move |n| {
                let payload = format!("to {} #{n}", handle.id());
                let pending = handle
                    .connection()
                    .submit(ECHO, n, payload.as_bytes())
                    .unwrap();
                (payload, pending)
            })
        })
        .collect();
    for (payload, pending) in pending {
        assert_eq!(
            pending.wait_timeout(LIMIT).unwrap().payload,
            payload.as_bytes()
        );
    }

    // The server closes client 2; the others go on.
    handles[1]
        .connection()
        .close_timeout(LIMIT)
        .expect("client 2 closes in order");
    wait_for("client 2 sees the server's EOF", LIMIT, || {
        clients[1].status().ended.is_some()
    });
    assert_eq!(clients[1].status().ended, Some(Disconnect::PeerEof));
    clients[1].close_timeout(LIMIT).unwrap();
    wait_for("client 2 leaves the server's list", LIMIT, || {
        server.connections() == 2
    });
    let ids: Vec<_> = server.clients().iter().map(|c| c.id()).collect();
    assert_eq!(ids, [1, 3]);
    assert!(server.client(2).is_none());
    assert!(matches!(
        handles[1].connection().submit(NAME, 0, b""),
        Err(Error::Closed)
    ));
    for idx in [0, 2] {
        let rsp = handles[idx]
            .connection()
            .call_timeout(NAME, 0, b"", LIMIT)
            .unwrap();
        assert_eq!(rsp.payload, format!("client-{}", idx + 1).as_bytes());
        clients[idx].call_timeout(ECHO, 0, b"still", LIMIT).unwrap();
    }
    // The clients leave: no connection is left.
    for idx in [0, 2] {
        clients[idx].close_timeout(LIMIT).unwrap();
    }
    wait_for("every client leaves", LIMIT, || {
        server.connections() == 0 && server.clients().is_empty()
    });
    assert_eq!(server.accepted(), 3);
    server.stop_timeout(LIMIT).unwrap();
}

// ---------------------------------------------------------------------------
// Hooks as clients come and go.

#[test]
fn on_accept_and_on_close_run_once_per_client_with_how_it_ended() {
    let _serial = serial();
    const BURST: u64 = 100;
    for listen in [Listen::Tcp, Listen::Unix] {
        let seen = Seen::default();
        let config = seen.on(ServerConfig::new(
            Config::default().name(unique_name("hooks")).handler(echo),
        ));
        let (server, addr) = serve(listen, config);
        let gate = Gate::new();

        // 1 closes in order.
        let (first, _) = addr.connect(client_config("one", &gate));
        first.call_timeout(ECHO, 0, b"", LIMIT).unwrap();
        first.close_timeout(LIMIT).unwrap();
        wait_for("client 1 ends", LIMIT, || seen.closed().len() == 1);

        // 2 is dropped without EOF, once it has had its answer.
        let mut second = addr.connect_raw();
        second.write_all(&wire(&request(2, ECHO, 0, b"two")));
        let answer = second.read_packet();
        assert!(matches!(answer.kind, PacketKind::Response { ok: true, .. }));
        drop(second);
        wait_for("client 2 ends", LIMIT, || seen.closed().len() == 2);

        // 3 is aborted by the server.
        let (third, _) = addr.connect(client_config("three", &gate));
        third.call_timeout(ECHO, 0, b"", LIMIT).unwrap();
        server
            .client(3)
            .expect("client 3 is live")
            .connection()
            .abort();
        wait_for("client 3 ends", LIMIT, || seen.closed().len() == 3);
        wait_for("client 3 sees the end", LIMIT, || {
            third.status().ended.is_some()
        });
        assert_eq!(
            third.status().ended,
            Some(Disconnect::StreamEnded),
            "{listen:?}: an aborted server is no EOF"
        );

        assert_eq!(seen.accepted(), [1, 2, 3], "{listen:?}");
        assert_eq!(
            seen.closed(),
            [
                (1, Disconnect::PeerEof),
                (2, Disconnect::StreamEnded),
                (3, Disconnect::Local)
            ],
            "{listen:?}"
        );

        // A hundred clients that connect and vanish at once. Those past
        // the limit are refused; every one accepted is seen by both hooks.
        for _ in 0..BURST {
            drop(addr.connect_raw());
        }
        wait_for("the burst is accepted or refused", LIMIT, || {
            server.accepted() + server.refused() == 3 + BURST
        });
        let n_accepted = server.accepted();
        wait_for("every accepted client ends", LIMIT, || {
            seen.closed().len() as u64 == n_accepted
        });
        server.stop_timeout(LIMIT).unwrap();
        let mut accepted = seen.accepted();
        accepted.sort_unstable();
        let missing: Vec<_> = (1..=n_accepted)
            .filter(|id| !accepted.contains(id))
            .collect();
        assert!(
            missing.is_empty() && accepted.len() as u64 == n_accepted,
            "{listen:?}: on_accept did not run for clients {missing:?} of {n_accepted} accepted \
             (on_close ran for them: {:?})",
            seen.closed()
                .iter()
                .filter(|(id, _)| missing.contains(id))
                .collect::<Vec<_>>()
        );
        let closed = seen.closed();
        assert_eq!(
            closed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            (1..=n_accepted).collect::<Vec<_>>(),
            "{listen:?}: on_close once for each"
        );
        for (id, why) in &closed[3..] {
            assert_eq!(*why, Disconnect::StreamEnded, "{listen:?}: client {id}");
        }
        drop(third);
    }
}

// ---------------------------------------------------------------------------
// Past the connection limit.

fn check_busy(res: &Result<packetstream::Response, Error>, max: usize) {
    match res {
        Err(err @ Error::Failed { flags, .. }) => {
            assert!(err.is_busy(), "{err:?}");
            assert_eq!(*flags, BUSY_FLAGS);
            assert_eq!(
                err.failure_reason().unwrap(),
                format!("server full: {max} connections")
            );
        }
        other => panic!("expected a busy refusal, got {other:?}"),
    }
}

#[test]
fn a_client_past_the_limit_is_refused_at_once_and_later_served() {
    let _serial = serial();
    let (server, addr) = serve(
        Listen::Tcp,
        ServerConfig::new(Config::default().name(unique_name("full")).handler(echo))
            .max_connections(2),
    );
    let gate = Gate::new();
    let live: Vec<_> = (0..2)
        .map(|k| {
            let (conn, _) = addr.connect(client_config(&format!("live{k}"), &gate));
            conn.call_timeout(ECHO, 0, b"", LIMIT).unwrap();
            conn
        })
        .collect();
    let (third, _) = addr.connect(Config::default().name(unique_name("third")));
    let started = Instant::now();
    let res = third.call_timeout(ECHO, 0, b"let me in", LIMIT);
    let took = started.elapsed();
    check_busy(&res, 2);
    report(format!("a client past the limit is refused after {took:?}"));
    assert!(took < HANG, "the refusal took {took:?}");
    assert_eq!(server.refused(), 1);
    assert_eq!((server.accepted(), server.connections()), (2, 2));
    // The refused client is sent EOF: its connection ends.
    wait_for("the refused client's connection ends", LIMIT, || {
        third.status().ended.is_some()
    });
    let ended = third.status().ended;
    let closed = third.close_timeout(LIMIT);
    report(format!(
        "the refused client: ended {ended:?}, close {closed:?}"
    ));
    assert_eq!(ended, Some(Disconnect::PeerEof));

    // Room again once a client leaves.
    live[0].close_timeout(LIMIT).unwrap();
    wait_for("a place frees", LIMIT, || server.connections() == 1);
    let (later, _) = addr.connect(Config::default().name(unique_name("later")));
    later.call_timeout(ECHO, 0, b"now", LIMIT).unwrap();
    assert_eq!((server.accepted(), server.refused()), (3, 1));
    later.close_timeout(LIMIT).unwrap();
    live[1].close_timeout(LIMIT).unwrap();
    server.stop_timeout(LIMIT).unwrap();
}

/// Twenty clients past the limit of one connect at once and ask; each
/// leaves once it has its refusal, or, if `hold`, once all twenty have
/// theirs. Returns how long each refusal took.
fn twenty_refused_at_once(hold: bool) -> Vec<Duration> {
    let _serial = serial();
    const N: usize = 20;
    let (server, addr) = serve(
        Listen::Tcp,
        ServerConfig::new(Config::default().name(unique_name("crowd")).handler(echo))
            .max_connections(1),
    );
    let Addr::Tcp(at) = &addr else { unreachable!() };
    let at = *at;
    let (live, _) = addr.connect(Config::default().name(unique_name("live")));
    live.call_timeout(ECHO, 0, b"", LIMIT).unwrap();
    let ready = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..N)
        .map(|_| {
            let (ready, answered) = (Arc::clone(&ready), Arc::clone(&answered));
            thread::spawn(move || {
                let conn =
                    PacketConnection::connect_tcp(at, Config::default().name(unique_name("crowd")))
                        .unwrap();
                ready.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + LIMIT;
                while ready.load(Ordering::SeqCst) < N && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(1));
                }
                let started = Instant::now();
                let res = conn.call_timeout(ECHO, 0, b"let me in", LIMIT);
                let took = started.elapsed();
                answered.fetch_add(1, Ordering::SeqCst);
                while hold && answered.load(Ordering::SeqCst) < N && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(1));
                }
                let _ = conn.close_timeout(LIMIT);
                (res, took)
            })
        })
        .collect();
    let results = join_all("the twenty clients", threads);
    for (res, _) in &results {
        check_busy(res, 1);
    }
    wait_for("every refusal is counted", LIMIT, || {
        server.refused() == N as u64
    });
    assert_eq!((server.accepted(), server.connections()), (1, 1));
    live.close_timeout(LIMIT).unwrap();
    server.stop_timeout(LIMIT).unwrap();
    results.into_iter().map(|(_, took)| took).collect()
}

#[test]
fn twenty_clients_past_the_limit_at_once_are_all_refused_and_nothing_hangs() {
    let took = twenty_refused_at_once(false);
    let slowest = took.iter().max().unwrap();
    report(format!(
        "twenty clients past the limit, leaving once refused: slowest refusal {slowest:?}"
    ));
    assert!(*slowest < LIMIT);
}

#[test]
fn twenty_waiting_clients_past_the_limit_each_get_their_refusal_at_once() {
    // The server gives a refused client 200 ms to send its requests; a
    // refusal "at once" comes well within five times that, whoever else is
    // being refused.
    let took = twenty_refused_at_once(true);
    let mut sorted = took.clone();
    sorted.sort_unstable();
    report(format!(
        "twenty clients past the limit, staying until all are refused: \
         refusals after {:?} (fastest) .. {:?} (slowest)",
        sorted[0],
        sorted[sorted.len() - 1]
    ));
    let late: Vec<_> = sorted
        .iter()
        .filter(|took| **took > Duration::from_secs(1))
        .collect();
    assert!(
        late.is_empty(),
        "{} of 20 refused clients waited over 1 s for their refusal: {late:?}",
        late.len()
    );
}

// ---------------------------------------------------------------------------
// Connecting with a deadline.

/// A listener that takes no more connections: std listens with a backlog of
/// 128, and Linux drops the SYN of a connection to a listener whose accept
/// queue is full (with `net.ipv4.tcp_abort_on_overflow` at its default, 0),
/// so the connect is never answered while nobody accepts. This works on
/// loopback, with no network; addresses meant to be unroutable cannot be
/// relied on (here, a proxy answers connections to 10.255.255.1 at once).
fn full_listener() -> (TcpListener, SocketAddr, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(50)) {
            Ok(stream) => held.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
            Err(e) => panic!("filling the accept queue: {e}"),
        }
        assert!(held.len() < 10_000, "the accept queue never filled");
    }
    (listener, addr, held)
}

/// `connect_tcp_timeout` on its own thread: its result and how long it
/// took, which must be within `timeout + HANG`.
fn timed_connect(
    addrs: Vec<SocketAddr>,
    timeout: Duration,
) -> (Result<PacketConnection, Error>, Duration) {
    match timed(timeout + HANG, move || {
        PacketConnection::connect_tcp_timeout(&addrs[..], timeout, Config::default())
    }) {
        Timed::Done(res, took) => (res, took),
        Timed::Stuck(_) => {
            panic!("connect_tcp_timeout({timeout:?}) still blocked after {HANG:?} more")
        }
    }
}

#[test]
fn connect_tcp_timeout_gives_up_in_time_when_the_server_does_not_answer() {
    let _serial = serial();
    const TIMEOUT: Duration = Duration::from_millis(300);
    let (_listener, addr, _held) = full_listener();
    let (res, took) = timed_connect(vec![addr], TIMEOUT);
    match res {
        Err(Error::Timeout {
            request: None,
            waited,
        }) => {
            assert!(waited >= TIMEOUT, "waited {waited:?}")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    report(format!(
        "connect_tcp_timeout({TIMEOUT:?}) to a full listener: {took:?}"
    ));
    assert!(took <= TIMEOUT + SLACK, "took {took:?}");

    // Two addresses that do not answer: one deadline for both.
    let (_listener2, addr2, _held2) = full_listener();
    let (res, took) = timed_connect(vec![addr, addr2], TIMEOUT);
    assert!(matches!(res, Err(Error::Timeout { .. })), "{res:?}");
    assert!(took <= TIMEOUT + SLACK, "two addresses took {took:?}");

    // A refused port fails at once, as an i/o error.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let (res, took) = timed_connect(vec![closed], TIMEOUT);
    match res {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(took < TIMEOUT, "a refusal took {took:?}");
}

#[test]
fn connect_tcp_timeout_connects_normally_to_a_server_that_answers() {
    let (server, addr) = serve(
        Listen::Tcp,
        ServerConfig::new(Config::default().name(unique_name("answers")).handler(echo)),
    );
    let Addr::Tcp(at) = &addr else { unreachable!() };
    let conn = PacketConnection::connect_tcp_timeout(*at, LIMIT, Config::default()).unwrap();
    assert_eq!(
        conn.call_timeout(ECHO, 3, b"hi", LIMIT).unwrap().payload,
        b"hi"
    );
    conn.close_timeout(LIMIT).unwrap();
    server.stop_timeout(LIMIT).unwrap();
}

// ---------------------------------------------------------------------------
// Stopping.

#[test]
fn stop_ends_every_client_in_order_and_answers_what_is_in_flight() {
    let seen = Seen::default();
    let name = unique_name("stop");
    let config = seen.on(ServerConfig::new(
        Config::default().name(&name).handler(echo),
    ));
    let (server, addr) = serve(Listen::Tcp, config);
    let gate = Gate::new();
    let ends: Vec<Arc<Mutex<Vec<Disconnect>>>> = (0..4).map(|_| Arc::default()).collect();
    let clients: Vec<_> = ends
        .iter()
        .enumerate()
        .map(|(idx, end)| {
            let end = Arc::clone(end);
            let config = client_config(&format!("client-{}", idx + 1), &gate)
                .on_end(move |why| end.lock().unwrap().push(why));
            let (conn, _) = addr.connect(config);
            conn.call_timeout(ECHO, 0, b"", LIMIT).unwrap();
            conn
        })
        .collect();
    let handles = server.clients();
    assert_eq!(server.connections(), 4);
    // The server has a request in flight to client 1, held in its handler.
    let held = handles[0].connection().submit(GATED, 0, b"").unwrap();
    gate.wait_entered(1, LIMIT);

    let stopper = thread::spawn(move || server.stop());
    wait_for("every connection is closing", LIMIT, || {
        handles.iter().all(|h| h.connection().status().closing)
    });
    gate.open();
    join_all("stop", vec![stopper]);

    assert_eq!(
        held.wait_timeout(LIMIT).unwrap().payload,
        b"client-1",
        "the request in flight is answered before the end"
    );
    for (idx, (client, end)) in clients.iter().zip(&ends).enumerate() {
        wait_for("the client ends", LIMIT, || client.status().ended.is_some());
        assert_eq!(
            client.status().ended,
            Some(Disconnect::PeerEof),
            "client {} sees the server's EOF",
            idx + 1
        );
        client.close_timeout(LIMIT).unwrap();
        assert_eq!(*end.lock().unwrap(), [Disconnect::PeerEof]);
    }
    for handle in &handles {
        assert_eq!(
            handle.connection().status().ended,
            Some(Disconnect::PeerEof)
        );
    }
    assert_eq!(
        seen.closed(),
        (1..=4)
            .map(|id| (id, Disconnect::PeerEof))
            .collect::<Vec<_>>()
    );
    assert_eq!(seen.accepted(), [1, 2, 3, 4]);
    // Every thread the server started has ended.
    wait_for("the server's threads to end", LIMIT, || {
        threads_named(&name).is_empty()
    });
}

#[test]
fn stop_timeout_aborts_a_client_that_never_answers_and_ends_the_rest_in_order() {
    let _serial = serial();
    const TIMEOUT: Duration = Duration::from_millis(300);
    let seen = Seen::default();
    let name = unique_name("stopt");
    let config = seen.on(ServerConfig::new(
        Config::default().name(&name).handler(echo),
    ));
    let (server, addr) = serve(Listen::Unix, config);
    let gate = Gate::new();
    let clients: Vec<_> = (1..=2)
        .map(|k| {
            let (conn, _) = addr.connect(client_config(&format!("client-{k}"), &gate));
            conn.call_timeout(ECHO, 0, b"", LIMIT).unwrap();
            conn
        })
        .collect();
    // Client 3 has its answer, then never sends EOF.
    let mut silent = addr.connect_raw();
    silent.write_all(&wire(&request(2, ECHO, 0, b"")));
    assert!(matches!(
        silent.read_packet().kind,
        PacketKind::Response { ok: true, .. }
    ));
    wait_for("three clients", LIMIT, || server.connections() == 3);

    let (res, took) = match timed(TIMEOUT + HANG, move || server.stop_timeout(TIMEOUT)) {
        Timed::Done(res, took) => (res, took),
        Timed::Stuck(_) => panic!("stop_timeout({TIMEOUT:?}) still blocked after {HANG:?} more"),
    };
    assert!(matches!(res, Err(Error::Timeout { .. })), "{res:?}");
    report(format!(
        "stop_timeout({TIMEOUT:?}) with a silent client: {took:?}"
    ));
    assert!(took <= TIMEOUT + SLACK, "took {took:?}");

    // The silent client was sent ERQ and EOF, whole, then cut off. (The
    // server's hello may have come before its answer, or after.)
    let (packets, partial) = silent.read_to_end();
    let ending: Vec<_> = packets
        .into_iter()
        .filter(|p| p.channel != CONTROL_CHANNEL)
        .collect();
    assert_eq!(ending, [Packet::erq(), Packet::eof()]);
    assert_eq!(partial, 0, "bytes of a packet cut short");
    for client in &clients {
        wait_for("the client ends", LIMIT, || client.status().ended.is_some());
        assert_eq!(client.status().ended, Some(Disconnect::PeerEof));
        client.close_timeout(LIMIT).unwrap();
    }
    // Every connection has ended by now: the silent one was aborted, and
    // the other two have closed. Give a late hook time all the same.
    let deadline = Instant::now() + HANG;
    while seen.closed().len() < 3 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let closed: BTreeMap<_, _> = seen.closed().into_iter().collect();
    assert_eq!(
        closed,
        BTreeMap::from([
            (1, Disconnect::PeerEof),
            (2, Disconnect::PeerEof),
            (3, Disconnect::Local)
        ])
    );
    wait_for("the server's threads to end", LIMIT, || {
        threads_named(&name).is_empty()
    });
}

/// A client's `on_end`, given by the server's Config factory, panics: the
/// server still counts the connection out, so that with
/// `max_connections(1)` the next client is served, and `stop` returns.
#[test]
fn a_panicking_on_end_of_a_served_connection_frees_its_slot() {
    let ends = Arc::new(AtomicUsize::new(0));
    let factory_ends = Arc::clone(&ends);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::serve_tcp(
        listener,
        ServerConfig::per_client("pnd", move |_| {
            let ends = Arc::clone(&factory_ends);
            Config::default().handler(echo).on_end(move |_| {
                ends.fetch_add(1, Ordering::SeqCst);
                panic!("an on_end that panics, on purpose");
            })
        })
        .max_connections(1),
    )
    .unwrap();
    let first_client = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    let first = first_client.call_timeout(ECHO, 0, b"one", LIMIT);
    let first_closed = first_client.close_timeout(LIMIT);
    wait_for("the first client's on_end", LIMIT, || {
        ends.load(Ordering::SeqCst) == 1
    });
    let deadline = Instant::now() + LIMIT;
    while server.connections() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let live = server.connections();
    let second_client = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    let second = second_client.call_timeout(ECHO, 0, b"two", LIMIT);
    second_client.abort();
    let stopped = server.stop_timeout(LIMIT);
    assert!(
        first.is_ok() && first_closed.is_ok(),
        "{first:?} {first_closed:?}"
    );
    assert_eq!(
        live, 0,
        "the first client, whose on_end panicked, is still counted"
    );
    assert!(second.is_ok(), "the next client: {second:?}");
    assert!(stopped.is_ok(), "stop: {stopped:?}");
    assert_eq!(
        ends.load(Ordering::SeqCst),
        2,
        "on_end runs once for each client"
    );
}

/// A client's connection ends while `on_accept` still runs for it, so its
/// `on_close` runs on the accept thread, and panics: the server goes on
/// accepting and serving the next client, and `stop` returns.
#[test]
fn a_panicking_on_close_on_the_accept_thread_leaves_the_server_serving() {
    let closes = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&closes);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::serve_tcp(
        listener,
        ServerConfig::new(Config::default().handler(echo))
            .on_accept(|client| {
                // Until this client's connection has ended.
                let until = Instant::now() + LIMIT;
                while client.connection().status().ended.is_none() && Instant::now() < until {
                    thread::sleep(Duration::from_millis(10));
                }
            })
            .on_close(move |_, _| {
                if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("an on_close that panics, on purpose");
                }
            }),
    )
    .unwrap();
    let first = TcpStream::connect(addr).unwrap();
    first.shutdown(std::net::Shutdown::Both).unwrap();
    drop(first);
    wait_for("the first client's on_close", LIMIT, || {
        closes.load(Ordering::SeqCst) == 1
    });
    let second_client = PacketConnection::connect_tcp(addr, Config::default()).unwrap();
    let second = second_client.call_timeout(ECHO, 0, b"two", LIMIT);
    second_client.abort();
    let stopped = server.stop_timeout(LIMIT);
    assert!(second.is_ok(), "the next client: {second:?}");
    assert!(stopped.is_ok(), "stop: {stopped:?}");
}

/// A client's request, end of requests and EOF, all read at once by its
/// connection: the request, queued for the shared handler pool as the
/// receive loop ends, still runs, and its reply goes before the server's
/// EOF. (It waited for another connection's read to wake the pool: with
/// one client, for ever.)
fn a_request_read_with_the_clients_end(listen: Listen) {
    let (server, addr) = serve(
        listen,
        ServerConfig::new(Config::default().name(unique_name("last")).handler(echo)),
    );
    let mut client = addr.connect_raw();
    // Shorter than `LIMIT`: a reply that never comes fails the test soon.
    let limit = Some(Duration::from_secs(10));
    match &client {
        RawClient::Tcp(s) => s.set_read_timeout(limit).unwrap(),
        RawClient::Unix(s) => s.set_read_timeout(limit).unwrap(),
    }
    let mut bytes = wire(&request(7, ECHO, 0, b"last words"));
    bytes.extend(wire(&Packet::erq()));
    bytes.extend(wire(&Packet::eof()));
    client.write_all(&bytes);
    let (packets, partial) = client.read_to_end();
    let stopped = server.stop_timeout(LIMIT);
    let reply = packets.iter().position(|p| {
        p.channel == 0 && p.tag == 7 && matches!(p.kind, PacketKind::Response { ok: true, .. })
    });
    let eof = packets.iter().position(Packet::is_eof);
    assert!(
        matches!((reply, eof), (Some(r), Some(e)) if r < e),
        "{listen:?}: the reply and EOF, in order, among {packets:?} ({partial} bytes more)"
    );
    assert_eq!(packets[reply.unwrap()].payload, b"last words");
    assert!(stopped.is_ok(), "{listen:?}: stop: {stopped:?}");
}

#[test]
fn a_request_read_with_the_clients_end_still_runs_on_the_shared_pool() {
    a_request_read_with_the_clients_end(Listen::Tcp);
    a_request_read_with_the_clients_end(Listen::Unix);
}

/// `on_close` closes, or joins, the client it is told has ended: the close
/// returns the connection's ending at once, and the server's stop returns.
/// (The hook runs on one of the connection's own threads, and the close
/// waited for every one of them, that one too: for ever, and the stop
/// behind it.)
#[test]
fn closing_a_client_in_on_close_returns_and_the_stop_ends() {
    for join in [false, true] {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        let config = ServerConfig::new(
            Config::default()
                .name(unique_name("closeinclose"))
                .handler(echo),
        )
        .on_close(move |client, _| {
            let conn = client.connection();
            let res = if join { conn.join() } else { conn.close() };
            let _ = tx.lock().unwrap().send(res);
        });
        let (server, addr) = serve(Listen::Tcp, config);
        let Addr::Tcp(at) = &addr else { unreachable!() };
        let client = PacketConnection::connect_tcp(*at, Config::default()).unwrap();
        let res = client.call_timeout(1, ECHO, b"x", LIMIT);
        assert!(res.is_ok(), "{res:?}");
        let closed = client.close_timeout(LIMIT);
        assert!(closed.is_ok(), "the client's close: {closed:?}");
        let in_hook = rx.recv_timeout(HANG);
        let stopped = timed(HANG, move || server.stop_timeout(LIMIT));
        assert!(
            matches!(in_hook, Ok(Ok(()))),
            "join {join}: the close in on_close: {in_hook:?}"
        );
        match stopped {
            Timed::Done(res, _) => assert!(res.is_ok(), "stop: {res:?}"),
            Timed::Stuck(running) => {
                let _ = running.finish_within(LIMIT);
                panic!("join {join}: the stop did not return within {HANG:?}");
            }
        }
    }
}

/// A client's connection is still starting (its `per_client` factory
/// held) when `stop_timeout` runs out and aborts the others: once the
/// factory returns, that connection is aborted too, its threads ended at
/// once, not left waiting for a client that never closes. (It only began
/// an orderly close, and its receive thread waited for the client's EOF.)
#[test]
fn a_connection_still_starting_when_the_stop_gives_up_is_aborted() {
    let gate = Gate::new();
    let name = unique_name("lst");
    let config = ServerConfig::per_client(name.clone(), {
        let gate = gate.clone();
        move |_| {
            gate.pass();
            Config::default().handler(echo)
        }
    });
    let (server, addr) = serve(Listen::Tcp, config);
    let Addr::Tcp(at) = &addr else { unreachable!() };
    // A client that never writes, nor closes, while the test runs.
    let client = TcpStream::connect(at).unwrap();
    wait_for("the factory to start", LIMIT, || gate.entered() == 1);
    let stopped = timed(LIMIT, move || {
        server.stop_timeout(Duration::from_millis(50))
    });
    gate.open();
    let stopped = match stopped {
        Timed::Done(res, _) => res,
        Timed::Stuck(_) => panic!("stop_timeout did not return"),
    };
    // The accept thread ends once it has started the connection.
    let accept = format!("{name}:accept");
    wait_for("the accept thread to end", LIMIT, || {
        threads_named(&accept).is_empty()
    });
    let prefix = format!("{name}#");
    let until = Instant::now() + HANG;
    let left = loop {
        let left = threads_named(&prefix);
        if left.is_empty() || Instant::now() >= until {
            break left;
        }
        thread::sleep(Duration::from_millis(10));
    };
    drop(client);
    assert!(
        matches!(stopped, Err(Error::Timeout { .. })),
        "stop: {stopped:?}"
    );
    assert!(left.is_empty(), "the late connection's threads: {left:?}");
}

/// As many clients as the server has handler threads each send a request
/// whose echo is large, and never read: a well-behaved client is still
/// answered, since no handler thread waits for a peer to read. (Each
/// handler thread wrote its large reply itself, blocking until the stall
/// timeout, 60 s, and nothing was left to serve anyone.)
#[test]
fn clients_that_never_read_large_replies_leave_the_shared_pool_serving() {
    const THREADS: usize = 4;
    let config = ServerConfig::new(
        Config::default()
            .name(unique_name("nonreaders"))
            .handler(echo),
    )
    .handler_threads(THREADS);
    // Over a Unix socket, whose buffers take less than one such reply.
    let (server, addr) = serve(Listen::Unix, config);
    let Addr::Unix(at) = &addr else {
        unreachable!()
    };
    let good = PacketConnection::connect_unix(at, Config::default()).unwrap();
    let first = good.call_timeout(1, ECHO, b"first", LIMIT);
    assert!(first.is_ok(), "{first:?}");
    // Never read: their kernel buffers fill with the first bytes of the
    // replies.
    let nonreaders: Vec<UnixStream> = (0..THREADS)
        .map(|i| {
            let mut s = UnixStream::connect(at).unwrap();
            s.set_write_timeout(Some(LIMIT)).unwrap();
            let tag = 2 + i as u64;
            s.write_all(&wire(&request(tag, ECHO, 0, &vec![7u8; 900 << 10])))
                .unwrap();
            s
        })
        .collect();
    wait_for("the large requests to be served", LIMIT, || {
        server.clients().len() == THREADS + 1
    });
    thread::sleep(std::time::Duration::from_millis(200));
    let res = good.call_timeout(1, ECHO, b"still served", LIMIT / 6);
    drop(nonreaders);
    good.abort();
    let stopped = timed(LIMIT, move || server.stop_timeout(LIMIT));
    assert!(
        res.as_ref().is_ok_and(|rsp| rsp.payload == b"still served"),
        "a client that reads, beside {THREADS} that do not: {res:?}"
    );
    assert!(matches!(stopped, Timed::Done(Ok(()), _)), "the stop");
}

/// A handler stops its server (a request to shut down): `stop` returns at
/// once, the request is answered, and a thread of the stop's own finishes
/// it, every thread of the server ending. (The stop waited for the
/// handler's own connection, which waited for the handler: for ever.)
#[test]
fn a_handler_that_stops_its_server_is_answered_and_the_server_stops() {
    let slot: Arc<Mutex<Option<Server>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    let name = unique_name("selfstop");
    let config = ServerConfig::new(Config::default().name(name.clone()).handler({
        let slot = Arc::clone(&slot);
        move |rq: Request| -> HandlerResult {
            if let Some(server) = slot.lock().unwrap().take() {
                server.stop();
                let _ = tx.lock().unwrap().send(());
            }
            Ok(rq.payload.into())
        }
    }));
    let (server, addr) = serve(Listen::Tcp, config);
    *slot.lock().unwrap() = Some(server);
    let Addr::Tcp(at) = &addr else { unreachable!() };
    let client = PacketConnection::connect_tcp(*at, Config::default()).unwrap();
    let res = client.call_timeout(ECHO, 0, b"stop", LIMIT);
    let stopped = rx.recv_timeout(HANG);
    let closed = client.close_timeout(LIMIT);
    let prefix = format!("{name}:");
    wait_for("the server's threads to end", LIMIT, || {
        threads_named(&prefix).is_empty()
    });
    assert!(stopped.is_ok(), "stop in the handler did not return");
    assert!(res.is_ok(), "the request that stopped the server: {res:?}");
    assert!(closed.is_ok(), "the client's close: {closed:?}");
}
