//! Listening and connecting: a [`Server`] that accepts clients on a TCP or
//! Unix listener and serves each on its own connection with a shared
//! handler, and the client side's connect helpers.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{self, UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::config::Config;
use crate::connection::PacketConnection;
use crate::error::{Error, Result};
use crate::sync::{self, deadline_after};

/// How long the accept thread rests after a failed `accept` (out of file
/// descriptors, say) before it tries again.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// How long `stop` waits for the connection that wakes the accept thread.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// Settings for a [`Server`]: the [`Config`] every connection is started
/// with (its handler shared by all of them), and how many connections may
/// be open at once.
///
/// # Examples
///
/// ```
/// use packetstream::{Config, Request, ServerConfig};
///
/// let config = ServerConfig::new(
///     Config::default()
///         .name("echo")
///         .handler(|rq: Request| Ok(rq.payload.into())),
/// )
/// .max_connections(16);
/// # let _ = config;
/// ```
#[derive(Clone, Debug)]
pub struct ServerConfig {
    conn: Config,
    max_connections: usize,
}

impl ServerConfig {
    /// Settings that start each connection with `conn`. Its name names the
    /// server's threads and, with a `#N` suffix, each connection.
    pub fn new(conn: Config) -> ServerConfig {
        ServerConfig {
            conn,
            max_connections: 64,
        }
    }

    /// The most connections served at once. At the limit the server stops
    /// accepting: further clients wait in the listener's backlog until a
    /// connection ends. Each connection runs
    /// [`handler_threads`](Config::handler_threads) + 2 threads, plus one
    /// that waits for its end, so this bounds the server's threads too.
    /// Default: 64. At least 1.
    pub fn max_connections(mut self, n: usize) -> ServerConfig {
        self.max_connections = n.max(1);
        self
    }
}

impl From<Config> for ServerConfig {
    fn from(conn: Config) -> ServerConfig {
        ServerConfig::new(conn)
    }
}

/// A server: accepts clients on a listener, serves each on its own
/// [`PacketConnection`] with the handler of its [`ServerConfig`], and stops
/// in order.
///
/// Threads: one accept thread, `"{name}:accept"`; each connection's own
/// threads, named `"{name}#{n}:..."` for the `n`th client accepted; and for
/// each connection one `"{name}#{n}:watch"` thread that waits for its end
/// and frees its slot. At most
/// `1 + max_connections * (handler_threads + 3)` threads in all.
///
/// [`stop`](Server::stop) stops accepting, then closes every live
/// connection in the order they were accepted, each with the orderly close
/// of [`PacketConnection::close`] (requests in progress are answered, then
/// EOF both ways), and joins every thread. Dropping the server starts the
/// same without waiting.
///
/// # Examples
///
/// ```
/// use std::net::TcpListener;
/// use std::time::Duration;
/// use packetstream::{Config, PacketConnection, Request, Server};
///
/// let listener = TcpListener::bind("127.0.0.1:0")?;
/// let addr = listener.local_addr()?;
/// let server = Server::serve_tcp(
///     listener,
///     Config::default().name("echo").handler(|rq: Request| Ok(rq.payload.into())),
/// )?;
///
/// let client = PacketConnection::connect_tcp(addr, Config::default())?;
/// assert_eq!(client.call(0, 0, b"ping")?.payload, b"ping");
///
/// server.stop_timeout(Duration::from_secs(10))?; // the client sees EOF
/// client.close_timeout(Duration::from_secs(10))?;
/// # Ok::<(), packetstream::Error>(())
/// ```
pub struct Server {
    shared: Arc<ServerShared>,
    acceptor: Option<JoinHandle<()>>,
    waker: Waker,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.shared.name)
            .field("listening", &self.waker)
            .field("connections", &self.connections())
            .field("accepted", &self.accepted())
            .finish()
    }
}

struct ServerShared {
    name: String,
    max_connections: usize,
    state: Mutex<State>,
    /// Signalled when a connection ends, on stop, and when the accept
    /// thread ends.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    stopping: bool,
    acceptor_done: bool,
    /// The accept thread could not be woken: it ends at the next client.
    wake_failed: bool,
    accepted: u64,
    /// Live connections by accept order.
    live: BTreeMap<u64, Arc<PacketConnection>>,
    /// The watch threads not yet joined, by connection.
    watchers: BTreeMap<u64, JoinHandle<()>>,
    /// Connections whose watch thread has finished, to be joined.
    done: Vec<u64>,
}

impl State {
    fn take_done_watchers(&mut self) -> Vec<JoinHandle<()>> {
        let done = std::mem::take(&mut self.done);
        done.iter()
            .filter_map(|id| self.watchers.remove(id))
            .collect()
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Where to connect to wake the accept thread out of `accept`.
#[derive(Clone, Debug)]
enum Waker {
    Tcp(SocketAddr),
    Unix(net::SocketAddr),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(listener) => listener.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(listener) => listener.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    fn waker(&self) -> io::Result<Waker> {
        match self {
            Listener::Tcp(listener) => {
                let mut addr = listener.local_addr()?;
                // A wildcard address is reached through the loopback.
                if addr.ip().is_unspecified() {
                    addr.set_ip(match addr.ip() {
                        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                    });
                }
                Ok(Waker::Tcp(addr))
            }
            Listener::Unix(listener) => Ok(Waker::Unix(listener.local_addr()?)),
        }
    }
}

impl Stream {
    fn into_connection(self, config: Config) -> Result<PacketConnection> {
        match self {
            Stream::Tcp(stream) => PacketConnection::from_tcp_stream(stream, config),
            Stream::Unix(stream) => PacketConnection::from_unix_stream(stream, config),
        }
    }
}

impl Waker {
    fn wake(&self) -> io::Result<()> {
        match self {
            Waker::Tcp(addr) => TcpStream::connect_timeout(addr, WAKE_TIMEOUT).map(drop),
            Waker::Unix(addr) => UnixStream::connect_addr(addr).map(drop),
        }
    }
}

impl Server {
    /// Serves clients that connect to a TCP listener.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the listener's address cannot be read or the accept
    /// thread cannot be spawned.
    pub fn serve_tcp(listener: TcpListener, config: impl Into<ServerConfig>) -> Result<Server> {
        Server::serve(Listener::Tcp(listener), config.into())
    }

    /// Serves clients that connect to a Unix socket listener.
    ///
    /// # Errors
    ///
    /// As for [`serve_tcp`](Server::serve_tcp).
    pub fn serve_unix(listener: UnixListener, config: impl Into<ServerConfig>) -> Result<Server> {
        Server::serve(Listener::Unix(listener), config.into())
    }

    fn serve(listener: Listener, config: ServerConfig) -> Result<Server> {
        let waker = listener.waker()?;
        let shared = Arc::new(ServerShared {
            name: config.conn.name.clone(),
            max_connections: config.max_connections,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("{}:accept", shared.name))
                .spawn(move || run_accept_loop(&shared, &listener, &config.conn))?
        };
        log::debug!("{}: serving on {waker:?}", shared.name);
        Ok(Server {
            shared,
            acceptor: Some(acceptor),
            waker,
        })
    }

    /// How many connections are open now.
    pub fn connections(&self) -> usize {
        self.shared.state.lock().live.len()
    }

    /// How many clients have been accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.state.lock().accepted
    }

    /// Stops accepting, closes every live connection in accept order with
    /// [`PacketConnection::close`], and joins every thread. Waits as long as
    /// the clients take to answer the close with their EOF: see
    /// [`stop_timeout`](Server::stop_timeout) for a bounded wait.
    ///
    /// The accept thread is woken out of `accept` by a connection to the
    /// listener's own address. Should that fail (a Unix socket whose path
    /// was removed), the thread is logged and left to end at the next
    /// client it accepts, instead of being joined.
    ///
    /// # Errors
    ///
    /// None yet; errors of single connections (a client that vanished) are
    /// logged, not returned. The `Result` leaves room for failures of the
    /// server itself.
    ///
    /// # Panics
    ///
    /// Re-raises a panic of the accept thread.
    pub fn stop(mut self) -> Result<()> {
        self.stop_until(None)
    }

    /// Like [`stop`](Server::stop), but gives up waiting at `timeout`:
    /// connections not closed by then are aborted (their pending requests
    /// fail with [`Error::ConnectionLost`]) and threads still running are
    /// left to end by themselves.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the deadline passed.
    ///
    /// # Panics
    ///
    /// As for [`stop`](Server::stop).
    pub fn stop_timeout(mut self, timeout: Duration) -> Result<()> {
        self.stop_until(deadline_after(timeout))
    }

    /// Stops accepting. False if the accept thread may be left blocked in
    /// `accept`: it then ends at the next client it accepts.
    /// Stops accepting and starts the close of every live connection at
    /// once, without waiting: ERQ goes to every client, new requests are
    /// refused, and the connections drain side by side. The accept thread is
    /// woken from another thread, so this never blocks.
    fn begin_stop(&self) {
        let live: Vec<Arc<PacketConnection>> = {
            let mut state = self.shared.state.lock();
            state.stopping = true;
            state.live.values().cloned().collect()
        };
        self.shared.changed.notify_all();
        for conn in live {
            conn.begin_close();
        }
        let (shared, waker) = (Arc::clone(&self.shared), self.waker.clone());
        let spawned = thread::Builder::new()
            .name(format!("{}:wake", shared.name))
            .spawn(move || wake_acceptor(&shared, &waker));
        if let Err(e) = spawned {
            log::warn!("{}: cannot wake the accept thread: {e}", self.shared.name);
            self.shared.state.lock().wake_failed = true;
            self.shared.changed.notify_all();
        }
    }

    fn stop_until(&mut self, deadline: Option<Instant>) -> Result<()> {
        let Some(acceptor) = self.acceptor.take() else {
            return Ok(());
        };
        let started = Instant::now();
        let shared = &self.shared;
        log::debug!("{}: stopping", shared.name);
        // Every live connection starts its close at once: ERQ goes to every
        // client, new requests are refused, and the connections drain side
        // by side. A connection accepted from now on is refused.
        self.begin_stop();
        let mut timed_out = false;
        // Unwoken, the accept thread is left to end by itself, at the next
        // client it accepts; a thread waiting for a free slot has seen
        // `stopping` all the same.
        let acceptor_ended = |state: &State| state.acceptor_done || state.wake_failed;
        if !shared.wait_until(deadline, acceptor_ended) {
            log::warn!("{}: accept thread did not end in time", shared.name);
            timed_out = true;
        } else if shared.state.lock().acceptor_done {
            if let Err(panic) = acceptor.join() {
                std::panic::resume_unwind(panic);
            }
        }
        if !shared.wait_until(deadline, |state| state.live.is_empty()) {
            timed_out = true;
            let late: Vec<Arc<PacketConnection>> =
                shared.state.lock().live.values().cloned().collect();
            for conn in late {
                log::warn!("{}: did not close in time; aborting", conn.name());
                conn.abort();
            }
        }
        // The watch threads that have ended; any still running end by
        // themselves once their connection does.
        let done = shared.state.lock().take_done_watchers();
        for handle in done {
            if handle.join().is_err() {
                log::error!("{}: a watch thread panicked", shared.name);
            }
        }
        log::debug!("{}: stopped", shared.name);
        if timed_out {
            Err(Error::Timeout {
                request: None,
                waited: started.elapsed(),
            })
        } else {
            Ok(())
        }
    }
}

impl Drop for Server {
    /// Starts the stop without waiting: no more clients are accepted, and
    /// every live connection begins its orderly close.
    fn drop(&mut self) {
        if self.acceptor.take().is_some() {
            self.begin_stop();
        }
    }
}

impl ServerShared {
    /// Waits until `done` holds, or the deadline passes (returns false).
    fn wait_until(&self, deadline: Option<Instant>, done: impl Fn(&State) -> bool) -> bool {
        let mut state = self.state.lock();
        sync::wait_until(&self.changed, &mut state, deadline, |state| !done(state))
    }
}

/// Connects to the listener's own address, which wakes the accept thread out
/// of `accept` to see that the server is stopping.
fn wake_acceptor(shared: &ServerShared, waker: &Waker) {
    if let Err(e) = waker.wake() {
        log::warn!(
            "{}: cannot connect to {waker:?} to wake the accept thread: {e}",
            shared.name
        );
        shared.state.lock().wake_failed = true;
        shared.changed.notify_all();
    }
}

fn run_accept_loop(shared: &Arc<ServerShared>, listener: &Listener, config: &Config) {
    let name = &shared.name;
    loop {
        let reaped = {
            let mut state = shared.state.lock();
            while state.live.len() >= shared.max_connections && !state.stopping {
                shared.changed.wait(&mut state);
            }
            if state.stopping {
                break;
            }
            state.take_done_watchers()
        };
        for handle in reaped {
            let _ = handle.join();
        }
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(e) => {
                let mut state = shared.state.lock();
                if state.stopping {
                    break;
                }
                log::warn!("{name}: accept failed: {e}");
                let _ = shared.changed.wait_for(&mut state, ACCEPT_RETRY);
                continue;
            }
        };
        let id = {
            let mut state = shared.state.lock();
            if state.stopping {
                break;
            }
            state.accepted += 1;
            state.accepted
        };
        if let Err(e) = start_connection(shared, id, stream, config) {
            log::warn!("{name}: cannot serve client #{id}: {e}");
        }
    }
    shared.state.lock().acceptor_done = true;
    shared.changed.notify_all();
    log::debug!("{name}: accept thread ends");
}

fn start_connection(
    shared: &Arc<ServerShared>,
    id: u64,
    stream: Stream,
    config: &Config,
) -> Result<()> {
    let conn_name = format!("{}#{id}", shared.name);
    let conn = Arc::new(stream.into_connection(config.clone().name(conn_name.clone()))?);
    {
        let mut state = shared.state.lock();
        if state.stopping {
            // The stop has already begun closing the connections it knows.
            drop(state);
            conn.abort();
            return Ok(());
        }
        state.live.insert(id, Arc::clone(&conn));
    }
    log::debug!("{conn_name}: accepted");
    let watcher = {
        let (shared, conn) = (Arc::clone(shared), Arc::clone(&conn));
        thread::Builder::new()
            .name(format!("{conn_name}:watch"))
            .spawn(move || {
                match conn.join() {
                    Ok(()) => log::debug!("{}: client finished", conn.name()),
                    Err(e) => log::warn!("{}: connection ended with {e}", conn.name()),
                }
                let mut state = shared.state.lock();
                state.live.remove(&id);
                state.done.push(id);
                drop(state);
                shared.changed.notify_all();
            })
    };
    match watcher {
        Ok(handle) => {
            shared.state.lock().watchers.insert(id, handle);
            Ok(())
        }
        Err(e) => {
            conn.abort();
            shared.state.lock().live.remove(&id);
            Err(Error::Io(e))
        }
    }
}

impl PacketConnection {
    /// Connects to a TCP server and starts a connection over the stream.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if no address can be reached, or as for
    /// [`from_tcp_stream`](PacketConnection::from_tcp_stream).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use packetstream::{Config, PacketConnection};
    ///
    /// let conn = PacketConnection::connect_tcp("127.0.0.1:7070", Config::default())?;
    /// let rsp = conn.call(1, 0, b"hello")?;
    /// conn.close()?;
    /// # let _ = rsp;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn connect_tcp(addr: impl ToSocketAddrs, config: Config) -> Result<PacketConnection> {
        PacketConnection::from_tcp_stream(TcpStream::connect(addr)?, config)
    }

    /// Connects to a Unix socket server and starts a connection over the
    /// stream.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket cannot be reached, or as for
    /// [`from_unix_stream`](PacketConnection::from_unix_stream).
    pub fn connect_unix(path: impl AsRef<Path>, config: Config) -> Result<PacketConnection> {
        PacketConnection::from_unix_stream(UnixStream::connect(path)?, config)
    }
}
