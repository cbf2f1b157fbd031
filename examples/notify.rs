//! A server that knows its clients and calls them: each client gets a
//! handler of its own from [`ServerConfig::per_client`], and the server
//! pushes a notification request to every connected client through
//! [`Server::clients`].
//!
//! ```text
//! cargo run --example notify
//! ```
//!
//! Everything runs in this one process over a Unix socket: three clients
//! connect and register a name; the server greets each on accept, then
//! broadcasts two notifications and counts the acknowledgements; each
//! client prints what it was told, and the server's close hook reports how
//! each connection ended.

// An example talks to the person running it.
#![allow(clippy::print_stdout)]

use std::os::unix::net::UnixListener;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use packetstream::{
    Client, ClientInfo, Config, Error, PacketConnection, Request, Server, ServerConfig,
};

/// Client to server: REGISTER a name (payload).
const REGISTER: u64 = 1;
/// Server to client: NOTIFY with a text (payload); the client acknowledges.
const NOTIFY: u64 = 2;

const CLIENTS: [&str; 3] = ["ada", "brian", "grace"];
const WAIT: Duration = Duration::from_secs(10);

fn main() -> Result<(), Error> {
    let dir = std::env::temp_dir().join(format!("packetstream-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("server.sock");
    let listener = UnixListener::bind(&path)?;

    // Each connection's handler knows its client and keeps its own state:
    // the name the client registered.
    let config = ServerConfig::per_client("notify", |client: &ClientInfo| {
        let (id, name) = (client.id, Mutex::new(String::new()));
        Config::default().handler(move |rq: Request| match rq.rq_type {
            REGISTER => {
                let registered = String::from_utf8(rq.payload)?;
                *name.lock().unwrap() = registered.clone();
                Ok(format!("welcome, {registered}: you are client {id}").into())
            }
            other => Err(format!("unknown request type {other}").into()),
        })
    })
    .on_accept(|client: &Client| println!("server: client {} connected", client.id()))
    .on_close(|client, why| println!("server: client {} ended: {why}", client.id()));
    let server = Server::serve_unix(listener, config)?;

    // The clients serve NOTIFY: the server calls them.
    let clients = CLIENTS
        .iter()
        .map(|&name| {
            let config = Config::default().name(name).handler(move |rq: Request| {
                println!("{name}: notified: {}", String::from_utf8_lossy(&rq.payload));
                Ok(format!("{name} got it").into())
            });
            let conn = PacketConnection::connect_unix(&path, config)?;
            let welcome: String = conn.call_as(REGISTER, 0, name.as_bytes())?;
            println!("{name}: {welcome}");
            Ok(conn)
        })
        .collect::<Result<Vec<_>, Error>>()?;

    // Broadcast: a request to every connected client, all in flight at once.
    for text in ["the build is green", "lunch is served"] {
        let pending = server
            .clients()
            .into_iter()
            .map(|client| client.connection().submit(NOTIFY, 0, text.as_bytes()))
            .collect::<Result<Vec<_>, Error>>()?;
        let acks = pending
            .iter()
            .map(|p| p.wait_timeout(WAIT))
            .collect::<Result<Vec<_>, Error>>()?;
        println!("server: {text:?} acknowledged by {} clients", acks.len());
        assert_eq!(acks.len(), CLIENTS.len());
    }

    // One client leaves; the server sees it go and the others stay.
    let mut clients = clients.into_iter();
    let first = clients.next().expect("three clients");
    first.close_timeout(WAIT)?;
    let deadline = Instant::now() + WAIT;
    while server.connections() != CLIENTS.len() - 1 {
        assert!(Instant::now() < deadline, "the server never saw it go");
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("server: {} clients left", server.connections());

    // The server stops: every client sees its EOF and ends in order.
    server.stop_timeout(WAIT)?;
    for conn in clients {
        conn.close_timeout(WAIT)?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
