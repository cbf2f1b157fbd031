//! The typed layer over real connections: request types, the dispatcher, typed errors, and typed services behind the TCP and Unix servers.

mod common;

use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use packetstream::{
    impl_payload, Config, Dispatcher, Error, Failure, Fulfil, HandlerError, PacketConnection,
    Payload, PayloadReader, Request, RequestType, Result, Server, ServerConfig,
};

use common::{close_both, pair_with, threads_named, wait_for, within, LIMIT};

/// The service's context: a running total.
#[derive(Default)]
struct Total {
    sum: AtomicU64,
}

/// ADD n: adds n to the total and returns the new total.
struct Add(u64);
impl_payload!(Add(0));
impl RequestType for Add {
    const RQ_TYPE: u64 = 1;
    type Response = u64;
}
impl Fulfil<Total> for Add {
    fn fulfil(self, ctx: &Total) -> std::result::Result<u64, HandlerError> {
        match self.0 {
            0 => Err(Failure::new(0x2a, "nothing to add").into()),
            u64::MAX => Err("far too much".into()),
            n => Ok(ctx.sum.fetch_add(n, Ordering::SeqCst) + n),
        }
    }
}

/// NOTE key text: a request of two strings whose response is text.
#[derive(Debug, PartialEq)]
struct Note {
    key: String,
    text: String,
}
impl_payload!(Note { key, text });
impl RequestType for Note {
    const RQ_TYPE: u64 = 2;
    type Response = String;
}
impl Fulfil<Total> for Note {
    fn fulfil(self, _: &Total) -> std::result::Result<String, HandlerError> {
        Ok(format!("{}={}", self.key, self.text))
    }
}

/// SHOUT: carries its meaning in the request flags, which it echoes back.
struct Shout {
    level: u64,
}
impl Payload for Shout {
    fn encode(&self, _: &mut Vec<u8>) {}
    fn decode(_: &mut PayloadReader<'_>) -> Result<Shout> {
        Ok(Shout { level: 0 })
    }
}
impl RequestType for Shout {
    const RQ_TYPE: u64 = 3;
    type Response = u64;
    fn flags(&self) -> u64 {
        self.level
    }
    fn from_request(flags: u64, payload: &[u8]) -> Result<Shout> {
        Shout::from_bytes(payload)?;
        Ok(Shout { level: flags })
    }
}
impl Fulfil<Total> for Shout {
    fn fulfil(self, _: &Total) -> std::result::Result<u64, HandlerError> {
        Ok(self.level * 2)
    }
}

/// A request type the server does not route.
struct Unrouted;
impl_payload!(Unrouted);
impl RequestType for Unrouted {
    const RQ_TYPE: u64 = 42;
    type Response = ();
}

/// Sent as ADD, but expects a bool: the server's u64 total is the wrong
/// shape for it.
struct AddExpectingBool(u64);
impl_payload!(AddExpectingBool(0));
impl RequestType for AddExpectingBool {
    const RQ_TYPE: u64 = 1;
    type Response = bool;
}

fn dispatcher(ctx: Arc<Total>) -> Dispatcher<Total> {
    Dispatcher::shared(ctx)
        .route::<Add>()
        .route::<Note>()
        .route::<Shout>()
}

fn typed_pair() -> (PacketConnection, PacketConnection, Arc<Total>) {
    let ctx = Arc::new(Total::default());
    let (client, server) = pair_with(
        Config::default().name("typed-client"),
        Config::default()
            .name("typed-server")
            .handler(dispatcher(Arc::clone(&ctx))),
    );
    (client, server, ctx)
}

fn failed(err: Error) -> (u64, String) {
    match err {
        Error::Failed { flags, payload, .. } => (flags, String::from_utf8(payload).unwrap()),
        other => panic!("expected a not-ok reply, got {other:?}"),
    }
}

#[test]
fn typed_calls_return_typed_responses() {
    let (client, server, ctx) = typed_pair();
    assert_eq!(client.request(&Add(5)).unwrap(), 5);
    assert_eq!(client.request(&Add(7)).unwrap(), 12);
    assert_eq!(ctx.sum.load(Ordering::SeqCst), 12);
    let note = Note {
        key: "k".into(),
        text: "żółw".into(),
    };
    assert_eq!(client.request(&note).unwrap(), "k=żółw");
    close_both(&client, &server);
}

#[test]
fn unknown_rq_type_gets_a_not_ok_reply_naming_it() {
    let (client, server, _) = typed_pair();
    let (flags, reason) = failed(client.request(&Unrouted).unwrap_err());
    assert_eq!((flags, reason.as_str()), (0, "unknown rq_type 42"));
    let (flags, reason) = failed(client.call(1000, 0, b"").unwrap_err());
    assert_eq!((flags, reason.as_str()), (0, "unknown rq_type 1000"));
    close_both(&client, &server);
}

#[test]
fn a_failure_from_fulfil_reaches_the_caller_with_its_flags_and_reason() {
    let (client, server, _) = typed_pair();
    let (flags, reason) = failed(client.request(&Add(0)).unwrap_err());
    assert_eq!((flags, reason.as_str()), (0x2a, "nothing to add"));
    let (flags, reason) = failed(client.request(&Add(u64::MAX)).unwrap_err());
    assert_eq!((flags, reason.as_str()), (0, "far too much"));
    // The connection goes on after a failure.
    assert_eq!(client.request(&Add(1)).unwrap(), 1);
    close_both(&client, &server);
}

#[test]
fn an_undecodable_request_payload_is_refused_naming_the_type() {
    let (client, server, _) = typed_pair();
    // NOTE with a key that claims 5 bytes and has 2.
    let (flags, reason) = failed(client.call(Note::RQ_TYPE, 0, b"\x05ab").unwrap_err());
    assert_eq!(flags, 0);
    assert_eq!(
        reason,
        "Note (rq_type 2): cannot decode payload: key: truncated BSString: needs 5 bytes at offset 1, 2 remain"
    );
    // ADD with a byte left over.
    let (_, reason) = failed(client.call(Add::RQ_TYPE, 0, b"\x01\x02").unwrap_err());
    assert_eq!(
        reason,
        "Add (rq_type 1): cannot decode payload: 1 unexpected bytes after offset 1"
    );
    close_both(&client, &server);
}

#[test]
fn a_response_of_the_wrong_shape_is_a_decode_error_naming_the_request() {
    let (client, server, _) = typed_pair();
    match client.request(&AddExpectingBool(9)) {
        Err(Error::Decode(msg)) => assert_eq!(
            msg,
            "AddExpectingBool response: expected flags 0 or 1 and no payload for a bool, \
             got flags 0x9 and 0 bytes"
        ),
        other => panic!("expected a decode error, got {other:?}"),
    }
    close_both(&client, &server);
}

#[test]
fn request_flags_travel_both_ways() {
    let (client, server, _) = typed_pair();
    assert_eq!(client.request(&Shout { level: 21 }).unwrap(), 42);
    assert_eq!(client.request(&Shout { level: 0 }).unwrap(), 0);
    close_both(&client, &server);
}

#[test]
fn many_submitted_requests_each_get_their_own_typed_response() {
    let (client, server, ctx) = typed_pair();
    let pending: Vec<_> = (1..=200u64)
        .map(|n| {
            let note = Note {
                key: n.to_string(),
                text: "x".repeat(n as usize),
            };
            (n, client.submit_request(&note).unwrap())
        })
        .collect();
    let adds: Vec<_> = (1..=100u64)
        .map(|_| client.submit_request(&Add(1)).unwrap())
        .collect();
    for (n, rq) in pending {
        let text = rq.wait_timeout(LIMIT).unwrap();
        assert_eq!(text, format!("{n}={}", "x".repeat(n as usize)));
    }
    let mut totals: Vec<u64> = adds
        .iter()
        .map(|rq| rq.wait_timeout(LIMIT).unwrap())
        .collect();
    totals.sort_unstable();
    assert_eq!(totals, (1..=100).collect::<Vec<u64>>());
    assert_eq!(ctx.sum.load(Ordering::SeqCst), 100);
    close_both(&client, &server);
}

fn tcp_server(name: &str) -> (Server, std::net::SocketAddr, Arc<Total>) {
    let ctx = Arc::new(Total::default());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config::default()
        .name(name)
        .handler_threads(2)
        .handler(dispatcher(Arc::clone(&ctx)));
    let server = Server::serve_tcp(listener, ServerConfig::new(config).max_connections(8)).unwrap();
    (server, addr, ctx)
}

fn connect(addr: std::net::SocketAddr) -> PacketConnection {
    PacketConnection::connect_tcp(addr, Config::default().name("tcp-client")).unwrap()
}

#[test]
fn tcp_server_serves_each_client_on_its_own_connection_with_a_shared_context() {
    let (server, addr, ctx) = tcp_server("srv-a");
    let clients: Vec<PacketConnection> = (0..4).map(|_| connect(addr)).collect();
    within("four clients adding", {
        let clients: Vec<_> = clients
            .iter()
            .map(|c| c.submit_request(&Add(3)).unwrap())
            .collect();
        move || {
            for pending in clients {
                pending.wait_timeout(LIMIT).unwrap();
            }
        }
    });
    assert_eq!(ctx.sum.load(Ordering::SeqCst), 12);
    assert_eq!(server.accepted(), 4);
    assert_eq!(server.connections(), 4);
    // A thread is named after the thread that starts it until it names
    // itself: a connection's threads, started by the accept thread, may
    // still bear its name for a moment.
    wait_for("one accept thread", LIMIT, || {
        threads_named("srv-a:accept").len() == 1
    });
    within("stopping the server", move || {
        server.stop_timeout(LIMIT).unwrap();
        for client in clients {
            client.join().unwrap();
        }
    });
    // Every thread the server started ends (with a deadline, the stop
    // lets those that have ended go, rather than joining them).
    wait_for("the server's threads to end", LIMIT, || {
        threads_named("srv-a").is_empty()
    });
}

#[test]
fn unix_server_serves_clients_that_connect_unix() {
    let path = std::env::temp_dir().join(format!("packetstream-typed-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let ctx = Arc::new(Total::default());
    let listener = UnixListener::bind(&path).unwrap();
    let config = Config::default()
        .name("srv-d")
        .handler(dispatcher(Arc::clone(&ctx)));
    let server = Server::serve_unix(listener, config).unwrap();
    let client = PacketConnection::connect_unix(&path, Config::default()).unwrap();
    assert_eq!(client.request(&Add(4)).unwrap(), 4);
    within("stopping", move || {
        server.stop_timeout(LIMIT).unwrap();
        client.join().unwrap();
    });
    std::fs::remove_file(&path).unwrap();
    wait_for("the server's threads to end", LIMIT, || {
        threads_named("srv-d").is_empty()
    });
}

#[test]
fn request_handler_and_typed_clients_mix_on_one_connection() {
    // A plain closure server answering ADD's rq_type by hand: typed clients
    // need only the wire shape, not the dispatcher.
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(
        b,
        Config::default().handler(|rq: Request| {
            let n = u64::from_bytes(&rq.payload)?;
            Ok((n * 10).into())
        }),
    )
    .unwrap();
    let client = PacketConnection::from_unix_stream(a, Config::default()).unwrap();
    assert_eq!(client.request(&Add(4)).unwrap(), 40);
    close_both(&client, &server);
}
