//! A TCP server and its clients: [`Server::serve_tcp`] accepts clients and
//! serves each on its own connection with one shared handler;
//! [`PacketConnection::connect_tcp`] connects to it.
//!
//! ```text
//! cargo run --example tcp
//! ```
//!
//! Everything runs in this one process on the loopback interface: the
//! server listens on `127.0.0.1` on a port the system picks, four client
//! threads each connect, make requests and close, and then the server stops
//! in order. The handler's state (a hit counter) is shared by every
//! connection. [`Server::serve_unix`] and
//! [`PacketConnection::connect_unix`] do the same over a Unix socket.

// An example talks to the person running it.
#![allow(clippy::print_stdout)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use packetstream::{Config, Error, PacketConnection, Request, Server, ServerConfig};

/// ECHO: the payload back.
const ECHO: u64 = 1;
/// HITS: how many requests the server has served, all clients together.
const HITS: u64 = 2;

const N_CLIENTS: usize = 4;
const N_CALLS: u64 = 25;

fn main() -> Result<(), Error> {
    // Port 0: the system picks a free port; `local_addr` says which.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;

    let hits = Arc::new(AtomicU64::new(0));
    let handler = {
        let hits = Arc::clone(&hits);
        move |rq: Request| {
            let n_hits = hits.fetch_add(1, Ordering::Relaxed) + 1;
            match rq.rq_type {
                ECHO => Ok(rq.payload.into()),
                HITS => Ok(n_hits.into()),
                other => Err(format!("unknown request type {other}").into()),
            }
        }
    };
    let config = ServerConfig::new(Config::default().name("tcp-server").handler(handler))
        .max_connections(N_CLIENTS);
    let server = Server::serve_tcp(listener, config)?;
    println!("serving on {addr}");

    thread::scope(|s| {
        let clients: Vec<_> = (0..N_CLIENTS)
            .map(|idx| {
                s.spawn(move || -> Result<(), Error> {
                    let name = format!("client{idx}");
                    let conn = PacketConnection::connect_tcp(addr, Config::default().name(&name))?;
                    for n in 0..N_CALLS {
                        let text = format!("{name} call {n}");
                        let echoed: String = conn.call_as(ECHO, 0, text.as_bytes())?;
                        assert_eq!(echoed, text);
                    }
                    let seen_so_far: u64 = conn.call_as(HITS, 0, b"")?;
                    println!("{name}: {N_CALLS} echoes done; server has served {seen_so_far}");
                    conn.close_timeout(Duration::from_secs(10))
                })
            })
            .collect();
        for client in clients {
            client.join().expect("client thread")?;
        }
        Ok::<(), Error>(())
    })?;

    let (accepted, total) = (server.accepted(), hits.load(Ordering::Relaxed));
    // Stop accepting, close what is still open, join every thread.
    server.stop_timeout(Duration::from_secs(10))?;
    println!("server stopped: {accepted} clients accepted, {total} requests served");
    assert_eq!(total, N_CLIENTS as u64 * (N_CALLS + 1));
    Ok(())
}
