//! Listening and connecting: a [`Server`] that accepts clients on a TCP or
//! Unix listener and serves each on a connection of its own, and the client
//! side's connect helpers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs,
};
use std::os::unix::net::{self, UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::{Condvar, Mutex};

use crate::config::Config;
use crate::connection::PacketConnection;
use crate::error::{Disconnect, Error, Result, BUSY_FLAGS};
use crate::packet::{read_body_head, BodyHead, Packet, PacketKind, MAX_HEAD_LEN};
use crate::pool::{Order, Pool};
use crate::shared::Job;
use crate::sync::{self, deadline_after, ThreadSet};
use crate::transport;
use crate::varint;

/// How long the accept thread rests after a failed `accept` (out of file
/// descriptors, say) before it tries again.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// How long `stop` waits for the connection that wakes the accept thread.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a client refused at the connection limit has to send its first
/// requests, which are answered "server full", before it is sent EOF.
const REFUSAL_WAIT: Duration = Duration::from_millis(200);

/// The default connection limit. A connection costs two threads (its
/// handlers run on the shared pool): 1024 connections are 2,048 threads,
/// well within what Linux allows a process by default, with stacks that
/// are mostly untouched. (A thread per handler per connection, as before the
/// shared pool, made 64 connections cost 448 threads.)
const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Refused clients waiting for their refusal; past this, a client's stream is
/// closed at once.
const REFUSAL_QUEUE: usize = 64;

/// Refused clients that the refusing thread refuses at once, each with a
/// buffer of a read's bytes and at most `REFUSAL_MAX_OWED` owed to it.
const REFUSING: usize = 64;

/// What the server knows of a client when it accepts it: given to the
/// per-client factory of [`ServerConfig::per_client`] and kept in its
/// [`Client`] handle.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientInfo {
    /// The client's number on this server: 1 for the first accepted, never
    /// reused. The connection is named `"{server}#{id}"`.
    pub id: u64,
    /// The client's address, as the listener reported it.
    pub peer_addr: PeerAddr,
}

/// A client's address.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PeerAddr {
    /// A TCP client.
    Tcp(SocketAddr),
    /// A Unix socket client (usually unnamed).
    Unix(net::SocketAddr),
}

/// A handle to one client of a [`Server`]: who it is, and its connection,
/// through which the server can make requests of the client or close it.
/// Cheap to clone; from [`Server::clients`], and given to the hooks.
#[derive(Clone)]
pub struct Client {
    info: ClientInfo,
    conn: Arc<PacketConnection>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.info.id)
            .field("peer_addr", &self.info.peer_addr)
            .field("connection", &self.conn.name())
            .finish()
    }
}

impl Client {
    /// The client's number on this server.
    pub fn id(&self) -> u64 {
        self.info.id
    }

    /// The client's address.
    pub fn peer_addr(&self) -> &PeerAddr {
        &self.info.peer_addr
    }

    /// What the server knew of the client when it accepted it.
    pub fn info(&self) -> &ClientInfo {
        &self.info
    }

    /// The connection to the client: submit requests to it, or close it.
    pub fn connection(&self) -> &PacketConnection {
        &self.conn
    }
}

type Factory = Arc<dyn Fn(&ClientInfo) -> Config + Send + Sync>;
type ClientHook = Arc<dyn Fn(&Client) + Send + Sync>;
type CloseHook = Arc<dyn Fn(&Client, Disconnect) + Send + Sync>;

/// Settings for a [`Server`]: how each client's connection is configured,
/// how many may be open at once, and the hooks run as clients come and go.
///
/// # Examples
///
/// ```
/// use packetstream::{Config, Request, ServerConfig};
///
/// // Every client is served alike, by one shared handler.
/// let config = ServerConfig::new(
///     Config::default()
///         .name("echo")
///         .handler(|rq: Request| Ok(rq.payload.into())),
/// )
/// .max_connections(16);
/// # let _ = config;
///
/// // Each client gets a handler of its own, which knows whom it serves.
/// let config = ServerConfig::per_client("greeter", |client| {
///     let greeting = format!("hello, client {} at {:?}", client.id, client.peer_addr);
///     Config::default().handler(move |_: Request| Ok(greeting.clone().into()))
/// });
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct ServerConfig {
    name: String,
    factory: Factory,
    max_connections: usize,
    handler_threads: usize,
    packet_timeout: Duration,
    idle_timeout: Duration,
    stall_timeout: Duration,
    max_packet_len: u64,
    max_queued_bytes: usize,
    on_accept: Option<ClientHook>,
    on_close: Option<CloseHook>,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("name", &self.name)
            .field("max_connections", &self.max_connections)
            .field("handler_threads", &self.handler_threads)
            .field("packet_timeout", &self.packet_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("stall_timeout", &self.stall_timeout)
            .field("max_packet_len", &self.max_packet_len)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("on_accept", &self.on_accept.is_some())
            .field("on_close", &self.on_close.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// Settings that start every client's connection with a clone of
    /// `conn`, its handler shared by all. `conn`'s name names the server's
    /// threads and, with a `#N` suffix, each connection.
    pub fn new(conn: Config) -> ServerConfig {
        let name = conn.name.clone();
        ServerConfig::per_client(name, move |_| conn.clone())
    }

    /// Settings that start each client's connection with the [`Config`]
    /// `factory` makes for it: its own handler and state. `name` names the
    /// server's threads, and with a `#N` suffix each connection, whatever
    /// name the factory's `Config` has. The factory runs on the accept
    /// thread, so it should be quick. If it panics, that client is cut off
    /// (its socket shut down, the panic logged) and the server goes on.
    pub fn per_client(
        name: impl Into<String>,
        factory: impl Fn(&ClientInfo) -> Config + Send + Sync + 'static,
    ) -> ServerConfig {
        ServerConfig {
            name: name.into(),
            factory: Arc::new(factory),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handler_threads: default_handler_threads(),
            packet_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(60),
            max_packet_len: 1 << 20,
            max_queued_bytes: 1 << 20,
            on_accept: None,
            on_close: None,
        }
    }

    /// The most connections served at once. A client past the limit is not
    /// left waiting: it is accepted and refused, its first requests answered
    /// not ok with [`BUSY_FLAGS`] and the text `"server full: N
    /// connections"`, then sent EOF. Each connection runs 2 threads (its
    /// handlers run on the server's shared pool), so this bounds the
    /// server's threads too. Default: 1024, which is 2,048 threads at the
    /// limit. At least 1.
    pub fn max_connections(mut self, n: usize) -> ServerConfig {
        self.max_connections = n.max(1);
        self
    }

    /// The threads that run the handlers of every connection, shared: a
    /// connection adds only its receive and send threads. The
    /// [`handler_threads`](Config::handler_threads) of the connections'
    /// `Config` are not used. Default: twice the processors, and at least
    /// 4. At least 1.
    pub fn handler_threads(mut self, n: usize) -> ServerConfig {
        self.handler_threads = n.max(1);
        self
    }

    /// The [`Config::packet_timeout`] of every connection whose `Config`
    /// sets none: how long a client may stay silent inside a packet it has
    /// begun, as a slow-loris client does. Default: 30 s, long enough for a
    /// large packet over a slow link to keep flowing, short enough that
    /// clients holding half a packet free their slot soon. `Duration::MAX`:
    /// no limit.
    pub fn packet_timeout(mut self, timeout: Duration) -> ServerConfig {
        self.packet_timeout = timeout;
        self
    }

    /// The [`Config::idle_timeout`] of every connection whose `Config` sets
    /// none: how long a client may send nothing with nothing pending either
    /// way. Default: 10 minutes, so that a client that connects and does
    /// nothing cannot hold its slot for good, while one that pauses between
    /// bursts keeps it. `Duration::MAX`: no limit.
    pub fn idle_timeout(mut self, timeout: Duration) -> ServerConfig {
        self.idle_timeout = timeout;
        self
    }

    /// The [`Config::stall_timeout`] of every connection whose `Config`
    /// sets none: how long what the server sends a client may make no
    /// progress. Default: 60 s, after which a client that stopped reading
    /// is dropped and what the server held for it is freed.
    /// `Duration::MAX`: no limit.
    pub fn stall_timeout(mut self, timeout: Duration) -> ServerConfig {
        self.stall_timeout = timeout;
        self
    }

    /// The [`Config::max_packet_len`] of every connection whose `Config`
    /// leaves it at its default. Default: 1 MiB. With the other per-client
    /// bounds it keeps what 1024 clients can make the server hold to about
    /// 3 GiB at worst (RELIABILITY.md has the sums); raise it for a service
    /// of larger messages.
    pub fn max_packet_len(mut self, len: u64) -> ServerConfig {
        self.max_packet_len = len;
        self
    }

    /// The [`Config::max_queued_bytes`] of every connection whose `Config`
    /// leaves it at its default: the budget of replies owed to a client
    /// past which its requests are refused as busy, and of its requests
    /// waiting for a handler. Default: 1 MiB.
    pub fn max_queued_bytes(mut self, n: usize) -> ServerConfig {
        self.max_queued_bytes = n.max(1);
        self
    }

    /// A hook run on the accept thread for each client accepted, once its
    /// connection is running: for instance, to greet it with a request. It
    /// runs before [`on_close`](ServerConfig::on_close) for the same
    /// client. If it panics, the panic is logged and the server goes on.
    pub fn on_accept(mut self, hook: impl Fn(&Client) + Send + Sync + 'static) -> ServerConfig {
        self.on_accept = Some(Arc::new(hook));
        self
    }

    /// A hook run once for each client whose connection has ended, with how
    /// it ended: [`Disconnect::PeerEof`] for an orderly end. It runs on one
    /// of that connection's threads, after the connection's own
    /// [`on_end`](Config::on_end); a `close` or `join` of the client's
    /// connection there returns how it ended, without waiting for the
    /// thread the hook runs on.
    pub fn on_close(
        mut self,
        hook: impl Fn(&Client, Disconnect) + Send + Sync + 'static,
    ) -> ServerConfig {
        self.on_close = Some(Arc::new(hook));
        self
    }
}

/// Twice the processors, and at least 4: handlers that wait on I/O leave
/// others runnable.
fn default_handler_threads() -> usize {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cpus).max(4)
}

impl From<Config> for ServerConfig {
    fn from(conn: Config) -> ServerConfig {
        ServerConfig::new(conn)
    }
}

/// A server: accepts clients on a listener, serves each on its own
/// [`PacketConnection`], can make requests of them, and stops in order.
///
/// Threads: one accept thread, `"{name}:accept"`; the handler threads
/// every connection shares, `"{name}:handler{idx}"`
/// ([`ServerConfig::handler_threads`]); each connection's receive and send
/// threads, named `"{name}#{n}:recv"` and `"{name}#{n}:send"` for the `n`th
/// client accepted; and, while clients past the connection limit are being
/// refused, one `"{name}:refuse"` thread (started again should it end with
/// a panic, a bug: see [`stop`](Server::stop)).
///
/// [`stop`](Server::stop) stops accepting, starts the orderly close of every
/// connection at once (ERQ to every client, so no connection starts a new
/// request; what is in progress is answered; EOF both ways) and waits for
/// them to end. Dropping the server starts the same without waiting.
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
            .field("name", &self.shared.config.name)
            .field("listening", &self.waker)
            .field("connections", &self.connections())
            .field("accepted", &self.accepted())
            .finish()
    }
}

struct ServerShared {
    config: ServerConfig,
    /// The handler threads every connection shares.
    pool: Arc<Pool<Job>>,
    state: Mutex<State>,
    /// Signalled when a connection ends, on stop, and when the accept
    /// thread ends.
    changed: Condvar,
    /// The handler threads, and the refusing thread while there is one.
    threads: Arc<ThreadSet>,
}

#[derive(Default)]
struct State {
    stopping: bool,
    /// The stop ran out of time and aborted the connections it found: one
    /// that was still starting then is aborted as it goes live.
    aborting: bool,
    acceptor_done: bool,
    /// The accept thread could not be woken: it ends at the next client.
    wake_failed: bool,
    accepted: u64,
    refused: u64,
    /// Connections being started by the accept thread, not yet recorded.
    starting: usize,
    /// Live clients by id, in accept order.
    live: BTreeMap<u64, Client>,
    /// Connections that have ended, whose threads are yet to be joined.
    ended: Vec<Arc<PacketConnection>>,
    /// Connections that ended before they were recorded as live.
    ended_early: BTreeMap<u64, Disconnect>,
    /// Clients whose `on_accept` has not returned yet: their `on_close`
    /// waits for it.
    announcing: BTreeSet<u64>,
    /// Where refused clients wait for the refusing thread, while it runs.
    refusals: Option<Sender<Waiting>>,
    /// The first panic of the accept thread, or of a thread of the server's
    /// own let go before the stop, kept for the stop to raise.
    panic: Option<sync::Panic>,
}

impl State {
    /// Keeps `panic` if it is the first; a later one is leaked rather than
    /// dropped, since its drop may panic in turn.
    fn keep_panic(&mut self, panic: sync::Panic) {
        match self.panic {
            None => self.panic = Some(panic),
            Some(_) => std::mem::forget(panic),
        }
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
    fn accept(&self) -> io::Result<(Stream, PeerAddr)> {
        match self {
            Listener::Tcp(listener) => listener
                .accept()
                .map(|(s, addr)| (Stream::Tcp(s), PeerAddr::Tcp(addr))),
            Listener::Unix(listener) => listener
                .accept()
                .map(|(s, addr)| (Stream::Unix(s), PeerAddr::Unix(addr))),
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

/// A client handed to the refusing thread: a new one, or one whose
/// refusal another refusing thread began and could not finish.
enum Waiting {
    New(Stream),
    Begun(Refusal),
}

impl Waiting {
    fn stream(&self) -> &Stream {
        match self {
            Waiting::New(stream) => stream,
            Waiting::Begun(refusal) => &refusal.stream,
        }
    }
}

impl Stream {
    fn into_connection(self, config: Config, pool: &Arc<Pool<Job>>) -> Result<PacketConnection> {
        let streams = match self {
            Stream::Tcp(stream) => transport::tcp_streams(stream)?,
            Stream::Unix(stream) => transport::unix_streams(stream)?,
        };
        PacketConnection::start_in(streams, config, Some(pool))
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_nonblocking(true)
            }
            Stream::Unix(s) => s.set_nonblocking(true),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl io::Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl io::Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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
        let name = config.name.clone();
        let threads = Arc::new(ThreadSet::default());
        // The connections take turns: one client's burst does not make the
        // others wait behind all of it. What is queued is bounded by each
        // connection's own quota (`Config::handler_queue`).
        let pool = Pool::start(&name, config.handler_threads, 0, Order::Fair, &threads)?;
        let shared = Arc::new(ServerShared {
            config,
            pool,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            threads,
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("{name}:accept"))
                .spawn(move || {
                    // Says the thread has ended once its panic, if any, is
                    // kept: the stop need not join it to raise the panic.
                    let done = AcceptorDone(&shared);
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_accept_loop(&shared, &listener);
                    }));
                    if let Err(panic) = ran {
                        shared.state.lock().keep_panic(panic);
                    }
                    drop(done);
                })
        };
        let acceptor = match acceptor {
            Ok(acceptor) => acceptor,
            Err(e) => {
                shared.pool.close();
                return Err(Error::Io(e));
            }
        };
        debug!("{name}: serving on {waker:?}");
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

    /// How many clients have been accepted and served so far.
    pub fn accepted(&self) -> u64 {
        self.shared.state.lock().accepted
    }

    /// How many clients have been refused at the connection limit so far.
    pub fn refused(&self) -> u64 {
        self.shared.state.lock().refused
    }

    /// The clients connected now, in the order they were accepted.
    pub fn clients(&self) -> Vec<Client> {
        self.shared.state.lock().live.values().cloned().collect()
    }

    /// The client with this id, if it is still connected.
    pub fn client(&self, id: u64) -> Option<Client> {
        self.shared.state.lock().live.get(&id).cloned()
    }

    /// Stops accepting, starts the orderly close of every connection at once
    /// (ERQ goes to every client, new requests are refused, what is in
    /// progress is answered, then EOF both ways), and waits for every
    /// connection to end. Waits as long as the clients take to answer with
    /// their EOF: see [`stop_timeout`](Server::stop_timeout) for a bounded
    /// wait. A client the kernel had queued on the listener and the server
    /// had not accepted yet gets no packet: its connection is reset when the
    /// listener closes, and its requests end with
    /// [`Error::ConnectionLost`](crate::Error::ConnectionLost).
    ///
    /// The accept thread is woken out of `accept` by a connection to the
    /// listener's own address, made from another thread. Should that fail
    /// (a Unix socket whose path was removed), the accept thread is left to
    /// end at the next client it accepts.
    ///
    /// # Panics
    ///
    /// Raises again the first panic that ended one of the server's own
    /// threads: the accept thread, a refusing thread or a handler thread.
    /// Each is a bug, since the application's code that runs on them (the
    /// `Config` factory, hooks, handlers, the logger) runs under a catch.
    /// It is raised once the stop has done its work: every connection
    /// ended (or, past the deadline, aborted), the handler threads closed,
    /// the threads that have ended joined (by `stop_timeout`, let go: a
    /// join waits for a thread's thread-locals, such as a logger's buffer,
    /// to be dropped, which no deadline bounds). A panic while refusing one
    /// client is caught, logged and costs that client alone, and a panic on
    /// a connection's own threads ends that connection and is logged:
    /// neither is raised here. Nor is the panic of a thread still running
    /// when [`stop_timeout`](Server::stop_timeout) gives up, which is left
    /// unjoined, or any panic if the server is dropped instead of stopped.
    ///
    /// Called by a handler of one of the server's connections (a request
    /// that stops the server, say), which cannot end before that handler
    /// returns, `stop` begins the stop and returns at once: a thread of its
    /// own, `{name}:stop`, finishes it, and a panic it raises is that
    /// thread's. [`stop_timeout`](Server::stop_timeout) there waits out its
    /// deadline.
    pub fn stop(mut self) {
        let serving = {
            let state = self.shared.state.lock();
            state.live.values().any(|client| client.conn.serving_here())
        };
        if serving {
            // On a handler of one of the connections, which cannot end
            // before the handler returns: a thread of its own stops the
            // server. Should it not start, the server, dropped with it,
            // begins the stop all the same.
            let name = format!("{}:stop", self.shared.config.name);
            let _ = thread::Builder::new().name(name).spawn(move || self.stop());
            return;
        }
        let _ended_in_time = self.stop_until(None);
    }

    /// Like [`stop`](Server::stop), but gives up waiting at `timeout`:
    /// connections not ended by then are aborted (their pending requests
    /// fail) and threads still running are left to end by themselves. A
    /// `timeout` too long for an `Instant`, such as `Duration::MAX`, means no
    /// limit.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the deadline passed.
    ///
    /// # Panics
    ///
    /// As for [`stop`](Server::stop), once the stop has done its work,
    /// instead of returning (whether or not the deadline passed).
    pub fn stop_timeout(mut self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        if self.stop_until(deadline_after(timeout)) {
            Ok(())
        } else {
            Err(Error::Timeout {
                request: None,
                waited: started.elapsed(),
            })
        }
    }

    /// Stops accepting and starts the close of every live connection at
    /// once, without waiting. The accept thread is woken from another
    /// thread, so this never blocks.
    fn begin_stop(&self) {
        let live: Vec<Client> = {
            let mut state = self.shared.state.lock();
            state.stopping = true;
            state.live.values().cloned().collect()
        };
        self.shared.changed.notify_all();
        for client in live {
            client.conn.begin_close();
        }
        let (shared, waker) = (Arc::clone(&self.shared), self.waker.clone());
        let spawned = thread::Builder::new()
            .name(format!("{}:wake", shared.config.name))
            .spawn(move || wake_acceptor(&shared, &waker));
        if let Err(e) = spawned {
            // Contained: a panicking logger must not leave the stop waiting
            // for an accept thread that nobody wakes.
            let name = &self.shared.config.name;
            warn!("{name}: cannot wake the accept thread: {e}");
            self.shared.state.lock().wake_failed = true;
            self.shared.changed.notify_all();
        }
    }

    /// Stops the server; false if the deadline passed first.
    fn stop_until(&mut self, deadline: Option<Instant>) -> bool {
        let Some(acceptor) = self.acceptor.take() else {
            return true;
        };
        let shared = &self.shared;
        let name = &shared.config.name;
        // Every line the stopping thread logs is contained: a logger that
        // panics must not leave a server half stopped, its accept thread's
        // handle gone and nothing left to stop it.
        debug!("{name}: stopping");
        self.begin_stop();
        let mut in_time = true;
        // The first panic of the server's own threads, raised once the stop
        // has done its work.
        let mut panic = None;
        let acceptor_ended = |state: &State| state.acceptor_done || state.wake_failed;
        if !shared.wait_until(deadline, acceptor_ended) {
            warn!("{name}: accept thread did not end in time");
            in_time = false;
        } else if shared.state.lock().acceptor_done {
            // Joined without a deadline; with one, let go, since a join
            // waits for the thread's thread-locals (a logger's flush, say).
            if deadline.is_none() {
                let _ = acceptor.join();
            }
            panic = shared.state.lock().panic.take();
        }
        if shared.wait_until(deadline, |state| {
            state.live.is_empty() && state.starting == 0
        }) {
            // No connection is left to queue work for the handler threads.
            shared.pool.close();
        } else {
            in_time = false;
            let late: Vec<Client> = {
                let mut state = shared.state.lock();
                state.aborting = true;
                state.live.values().cloned().collect()
            };
            for client in late {
                let conn_name = client.conn.name();
                warn!("{conn_name}: did not close in time; aborting");
                client.conn.abort();
            }
        }
        // Join what has ended by the deadline; the rest end by themselves.
        let reap_deadline = if in_time {
            deadline
        } else {
            Some(Instant::now())
        };
        in_time &= shared.threads.wait_until(reap_deadline);
        if let Some(payload) = shared.state.lock().panic.take() {
            panic.get_or_insert(payload);
        }
        if let Some(payload) = shared.threads.join_or_let_go(reap_deadline) {
            panic.get_or_insert(payload);
        }
        let ended = std::mem::take(&mut shared.state.lock().ended);
        for conn in ended {
            in_time &= conn.reap(reap_deadline);
        }
        debug!("{name}: stopped");
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
        in_time
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

impl Drop for ServerShared {
    /// The server and every connection of it are gone: so is all work for
    /// the handler threads.
    fn drop(&mut self) {
        self.pool.close();
    }
}

impl ServerShared {
    /// Waits until `done` holds, or the deadline passes (returns false).
    fn wait_until(&self, deadline: Option<Instant>, done: impl Fn(&State) -> bool) -> bool {
        let mut state = self.state.lock();
        sync::wait_until(&self.changed, &mut state, deadline, |state| !done(state))
    }

    /// The connection of client `id` has ended: it leaves the live set, and
    /// the close hook runs.
    fn connection_ended(&self, id: u64, why: Disconnect) {
        let client = {
            let mut state = self.state.lock();
            match state.live.remove(&id) {
                Some(client) => {
                    state.ended.push(Arc::clone(&client.conn));
                    if state.announcing.contains(&id) {
                        // `start_connection` runs the hook after on_accept.
                        state.ended_early.insert(id, why);
                        drop(state);
                        self.changed.notify_all();
                        return;
                    }
                    client
                }
                None => {
                    // Not recorded yet: `start_connection` sees this.
                    state.ended_early.insert(id, why);
                    return;
                }
            }
        };
        self.changed.notify_all();
        let conn_name = client.conn.name();
        debug!("{conn_name}: client ended: {why}");
        if let Some(hook) = &self.config.on_close {
            hook(&client, why);
        }
    }
}

/// Connects to the listener's own address, which wakes the accept thread out
/// of `accept` to see that the server is stopping.
fn wake_acceptor(shared: &ServerShared, waker: &Waker) {
    if let Err(e) = waker.wake() {
        let name = &shared.config.name;
        warn!("{name}: cannot connect to {waker:?} to wake the accept thread: {e}");
        shared.state.lock().wake_failed = true;
        shared.changed.notify_all();
    }
}

/// Says the accept thread has ended when it does, panic or not, so that
/// `stop` never waits for it in vain.
struct AcceptorDone<'a>(&'a ServerShared);

impl Drop for AcceptorDone<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.acceptor_done = true;
        // The refusing thread ends once it has refused whoever waits.
        state.refusals = None;
        drop(state);
        self.0.changed.notify_all();
    }
}

/// The accept thread. The user's code that runs here (the `Config` factory,
/// `on_accept`, `on_close` for a client that ended early, and the logger)
/// runs under a catch: a panic in it must not stop the server accepting.
fn run_accept_loop(shared: &Arc<ServerShared>, listener: &Listener) {
    let name = &shared.config.name;
    loop {
        let ended = std::mem::take(&mut shared.state.lock().ended);
        for conn in ended {
            // The connection has ended, so its threads are ending: join the
            // ones that have, keep the rest for later.
            if !conn.reap(Some(Instant::now())) {
                shared.state.lock().ended.push(conn);
            }
        }
        let (stream, peer_addr) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                let mut state = shared.state.lock();
                if state.stopping {
                    break;
                }
                warn!("{name}: accept failed: {e}");
                let _ = shared.changed.wait_for(&mut state, ACCEPT_RETRY);
                continue;
            }
        };
        let id = {
            let mut state = shared.state.lock();
            if state.stopping {
                break;
            }
            if state.live.len() >= shared.config.max_connections {
                state.refused += 1;
                drop(state);
                refuse(shared, stream);
                continue;
            }
            state.accepted += 1;
            state.starting += 1;
            state.accepted
        };
        let info = ClientInfo { id, peer_addr };
        if let Err(e) = start_connection(shared, info, stream) {
            warn!("{name}: cannot serve client #{id}: {e}");
        }
    }
    debug!("{name}: accept thread ends");
}

fn start_connection(shared: &Arc<ServerShared>, info: ClientInfo, stream: Stream) -> Result<()> {
    let id = info.id;
    let conn_name = format!("{}#{id}", shared.config.name);
    let Some(config) = sync::caught(&conn_name, "the Config factory", || {
        (shared.config.factory)(&info)
    }) else {
        shared.state.lock().starting -= 1;
        shared.changed.notify_all();
        stream.shutdown();
        return Err(Error::Io(io::Error::other("its Config factory panicked")));
    };
    let mut config = config.name(conn_name.clone());
    // The server's timeouts, where the connection's own config sets none.
    let server = &shared.config;
    config.packet_timeout.get_or_insert(server.packet_timeout);
    config.idle_timeout.get_or_insert(server.idle_timeout);
    config.stall_timeout.get_or_insert(server.stall_timeout);
    if !config.limits_set.0 {
        config = config.max_packet_len(server.max_packet_len);
    }
    if !config.limits_set.1 {
        config = config.max_queued_bytes(server.max_queued_bytes);
    }
    let own_hook = config.on_end.take();
    // A strong reference, dropped with the hook once it has run: a server
    // lives as long as a connection of its may still end.
    let server = Arc::clone(shared);
    let hook_name = conn_name.clone();
    config = config.on_end(move |why| {
        // The connection is counted out even if the user's hook panics:
        // else its slot would stay taken, and `stop` would wait for it.
        if let Some(hook) = &own_hook {
            sync::caught(&hook_name, "on_end", || hook(why));
        }
        server.connection_ended(id, why);
    });
    let started = stream.into_connection(config, &shared.pool);
    let mut state = shared.state.lock();
    state.starting -= 1;
    let conn = match started {
        Ok(conn) => Arc::new(conn),
        Err(e) => {
            drop(state);
            return Err(e);
        }
    };
    let client = Client { info, conn };
    let ended_early = state.ended_early.remove(&id);
    let (stopping, aborting) = (state.stopping, state.aborting);
    if ended_early.is_some() {
        state.ended.push(Arc::clone(&client.conn));
    } else {
        // Live from the same lock hold that counts it out of `starting`:
        // a stop waits for it, and keeps the handler threads until it ends.
        state.live.insert(id, client.clone());
        state.announcing.insert(id);
    }
    drop(state);
    debug!("{conn_name}: accepted");
    if aborting {
        // The stop gave up while this one was starting, and aborted the
        // others: so this one too.
        client.conn.abort();
    } else if stopping {
        // The stop began while this one was starting, after it began the
        // close of the others: this one ends in order too, ERQ then EOF.
        client.conn.begin_close();
    }
    // Every client accepted is reported, before its end if that came first.
    if let Some(hook) = &shared.config.on_accept {
        sync::caught(&conn_name, "on_accept", || hook(&client));
    }
    // An end that came while on_accept ran has waited for it.
    let ended_early = {
        let mut state = shared.state.lock();
        state.announcing.remove(&id);
        ended_early.or_else(|| state.ended_early.remove(&id))
    };
    if let Some(why) = ended_early {
        if let Some(hook) = &shared.config.on_close {
            // On the accept thread, which a panic here would end.
            sync::caught(&conn_name, "on_close", || hook(&client, why));
        }
    }
    Ok(())
}

/// Hands a client past the connection limit to the refusing thread, started
/// if need be (again, if it has ended); with too many waiting already,
/// closes it at once.
fn refuse(shared: &Arc<ServerShared>, stream: Stream) {
    hand_to_refuser(shared, Waiting::New(stream));
}

/// Hands a client to the refusing thread, as [`refuse`] does.
fn hand_to_refuser(shared: &Arc<ServerShared>, mut waiting: Waiting) {
    let name = &shared.config.name;
    let mut replaced = false;
    let mut state = shared.state.lock();
    // A refusing thread ends once it has had no client for a while, and
    // another starts at the next: the ones that have ended are let go here
    // (not joined: that would wait for their thread-locals, a logger's
    // flush among them), so that a server that refuses now and then does
    // not keep them all until its stop. Their panic is kept under the lock
    // the stop takes it under.
    if let Some(panic) = shared.threads.let_ended_go() {
        state.keep_panic(panic);
    }
    let closed = loop {
        let tx = match &state.refusals {
            Some(tx) => tx.clone(),
            None => match start_refusing(shared) {
                Ok(tx) => {
                    // Once the accept thread has ended, no one keeps the
                    // sender: the new thread ends with its last client.
                    if !state.acceptor_done {
                        state.refusals = Some(tx.clone());
                    }
                    tx
                }
                Err(e) => break Some((waiting, format!("cannot start refusing: {e}"))),
            },
        };
        match tx.try_send(waiting) {
            Ok(()) => break None,
            Err(TrySendError::Full(s)) => {
                break Some((s, "too many clients to refuse; closing one".into()));
            }
            // The refusing thread has ended without taking itself off (a
            // bug): another takes its place, once.
            Err(TrySendError::Disconnected(s)) if !replaced => {
                state.refusals = None;
                replaced = true;
                waiting = s;
            }
            Err(TrySendError::Disconnected(s)) => {
                break Some((s, "the refusing thread has ended; closing a client".into()));
            }
        }
    };
    drop(state);
    if replaced {
        warn!("{name}: the refusing thread had ended; started another");
    }
    if let Some((waiting, why)) = closed {
        warn!("{name}: {why}");
        waiting.stream().shutdown();
    }
}

/// Starts a refusing thread: the sender that hands it clients. A panic that
/// ends the thread (a bug: one while refusing a client costs that client
/// alone) hands the clients still waiting for it to another, and is raised
/// again, for [`Server::stop`] to raise.
fn start_refusing(shared: &Arc<ServerShared>) -> io::Result<Sender<Waiting>> {
    let (tx, rx) = crossbeam_channel::bounded(REFUSAL_QUEUE);
    let name = shared.config.name.clone();
    let reason = format!("server full: {} connections", shared.config.max_connections);
    let server = Arc::downgrade(shared);
    shared.threads.spawn(format!("{name}:refuse"), move || {
        // Kept out here, so that a panic leaves the refusals in progress
        // to hand over: each step on one client runs under its own catch,
        // so none is left halfway through a step.
        let mut refusing = Vec::new();
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_refusals(&server, &name, &reason, &rx, &mut refusing);
        }));
        if let Err(panic) = ran {
            error!(
                "{name}: the refusing thread panicked: {}",
                sync::panic_text(&panic)
            );
            hand_over(&server, &rx, refusing);
            std::panic::resume_unwind(panic);
        }
    })?;
    Ok(tx)
}

/// The refusing thread whose queue is `rx` has panicked: the server hands it
/// no more clients, and those it was refusing, then those still queued, go
/// to a new one.
fn hand_over(server: &Weak<ServerShared>, rx: &Receiver<Waiting>, refusing: Vec<Refusal>) {
    let Some(server) = server.upgrade() else {
        return;
    };
    let queued: Vec<Waiting> = {
        // The sender in the state is this thread's, or none: another is
        // started only once this one's queue has gone, or been taken off
        // here. Clients are handed over under this lock, so none is queued
        // after the queue is emptied.
        let mut state = server.state.lock();
        state.refusals = None;
        rx.try_iter().collect()
    };
    let begun = refusing.into_iter().map(Waiting::Begun);
    for waiting in begun.chain(queued) {
        hand_to_refuser(&server, waiting);
    }
}

/// The refusing thread: refuses the clients handed to it, all at once, each
/// within [`REFUSAL_WAIT`], until there have been none for a while, or the
/// server has gone. A panic while refusing one client (a bug) is caught and
/// logged, and costs that client alone: its stream is shut down.
fn run_refusals(
    server: &Weak<ServerShared>,
    name: &str,
    reason: &str,
    rx: &Receiver<Waiting>,
    refusing: &mut Vec<Refusal>,
) {
    loop {
        if refusing.is_empty() {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(waiting) => {
                    #[cfg(test)]
                    fault::hit(name, fault::Fault::Thread);
                    refusing.extend(Refusal::take_caught(name, waiting));
                    #[cfg(test)]
                    fault::hit(name, fault::Fault::Begun);
                }
                Err(RecvTimeoutError::Timeout) => {
                    let Some(server) = server.upgrade() else {
                        return;
                    };
                    // The accept thread hands clients over under this lock,
                    // so none can slip in between the check and the end.
                    let mut state = server.state.lock();
                    if rx.is_empty() {
                        state.refusals = None;
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        // At most REFUSING at once: the others wait in the queue, which is
        // bounded too.
        let room = REFUSING.saturating_sub(refusing.len());
        refusing.extend(
            rx.try_iter()
                .take(room)
                .filter_map(|waiting| Refusal::take_caught(name, waiting)),
        );
        #[cfg(test)]
        tests::MOST_REFUSING.fetch_max(refusing.len(), std::sync::atomic::Ordering::SeqCst);
        let mut progress = false;
        refusing.retain_mut(|refusal| {
            let polled = sync::caught(name, "refusing a client", || {
                #[cfg(test)]
                fault::hit(name, fault::Fault::Poll);
                refusal.poll(reason)
            });
            match polled {
                Some(Ok(true)) => true,
                Some(Ok(false)) => {
                    progress = true;
                    true
                }
                Some(Err(e)) => {
                    debug!("{name}: refused a client: {e}");
                    if sync::caught(name, "refusing a client", || refusal.finish()).is_none() {
                        refusal.stream.shutdown();
                    }
                    false
                }
                None => {
                    refusal.stream.shutdown();
                    false
                }
            }
        });
        if !progress && refusing.len() >= REFUSING {
            std::thread::sleep(REFUSAL_POLL);
        } else if !progress {
            // Nothing to read: rest a little, or until a new client comes.
            match rx.recv_timeout(REFUSAL_POLL) {
                Ok(waiting) => refusing.extend(Refusal::take_caught(name, waiting)),
                Err(RecvTimeoutError::Timeout) => {}
                // No client can come any more (the accept thread has
                // ended, or this thread was started after it): the wait
                // returns at once, so rest all the same.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(REFUSAL_POLL),
            }
        }
    }
}

/// How often the refusing thread looks at clients that have sent nothing.
const REFUSAL_POLL: Duration = Duration::from_millis(2);

/// One client being told that the server is full: ERQ at once, a not-ok
/// reply with [`BUSY_FLAGS`] to each request it sends within
/// [`REFUSAL_WAIT`], then EOF. Its socket is non-blocking, so no client can
/// hold up the others.
struct Refusal {
    stream: Stream,
    /// What the client sent and was not parsed yet: at most a packet's
    /// head and one read's bytes, since payloads are not kept.
    buf: Vec<u8>,
    /// Bytes of the payload of the client's last packet still to come,
    /// to be dropped as they do: a refusal answers each request from its
    /// head alone.
    skip: u64,
    /// What is owed to the client and not written yet: the socket does not
    /// block, so a slow reader gets the rest later, never half a packet
    /// followed by something else.
    out: Vec<u8>,
    deadline: Instant,
}

impl Refusal {
    /// A client handed over: a new one's refusal is begun, under a catch (a
    /// panic, a bug, is logged, and the client's stream, dropped with it,
    /// closed); one begun by another refusing thread goes on.
    fn take_caught(name: &str, waiting: Waiting) -> Option<Refusal> {
        match waiting {
            Waiting::New(stream) => {
                sync::caught(name, "refusing a client", || Refusal::start(name, stream)).flatten()
            }
            Waiting::Begun(refusal) => Some(refusal),
        }
    }

    /// Sends the client ERQ, or as much of it as its socket takes now:
    /// `None` (its stream shut down) if it cannot be refused.
    fn start(name: &str, stream: Stream) -> Option<Refusal> {
        let mut refusal = Refusal {
            stream,
            buf: Vec::new(),
            skip: 0,
            out: Vec::new(),
            deadline: Instant::now() + REFUSAL_WAIT,
        };
        Packet::erq().encode_into(&mut refusal.out);
        match refusal
            .stream
            .set_nonblocking()
            .and_then(|()| refusal.flush())
        {
            Ok(()) => Some(refusal),
            Err(e) => {
                debug!("{name}: cannot refuse a client: {e}");
                refusal.stream.shutdown();
                None
            }
        }
    }

    /// Writes what is owed, as far as the socket takes it now.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            match (&self.stream).write(&self.out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what the client has sent and answers its requests. `Ok(true)`:
    /// still waiting for it; `Ok(false)`: it sent something; `Err`: done
    /// with it (its time is up, whatever it sends; it ended; it cannot be
    /// read or written; or it does not read what it is owed).
    fn poll(&mut self, reason: &str) -> io::Result<bool> {
        if Instant::now() >= self.deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.flush()?;
        let mut chunk = [0u8; 4096];
        let n = match (&self.stream).read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(e) => return Err(e),
        };
        self.buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        loop {
            if self.skip > 0 {
                let left = self.buf.len() - used;
                let dropped = usize::try_from(self.skip).map_or(left, |skip| skip.min(left));
                used += dropped;
                self.skip -= dropped as u64;
                if self.skip > 0 {
                    break;
                }
            }
            let Some((head, n)) = refused_head(&self.buf[used..])? else {
                break;
            };
            used += n;
            self.skip = head.payload_len as u64;
            match head.kind {
                PacketKind::Request { .. } => Packet {
                    channel: head.channel,
                    tag: head.tag,
                    kind: PacketKind::Response {
                        ok: false,
                        flags: BUSY_FLAGS,
                    },
                    payload: reason.as_bytes().to_vec(),
                }
                .encode_into(&mut self.out),
                _ if head.is_eof() => {
                    self.flush()?;
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                _ => {}
            }
        }
        self.buf.drain(..used);
        self.flush()?;
        if self.out.len() > REFUSAL_MAX_OWED {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(false)
    }

    /// Sends EOF after what is owed, if the socket takes it all now, and
    /// shuts the socket down.
    fn finish(&mut self) {
        Packet::eof().encode_into(&mut self.out);
        let _ = self.flush();
        self.stream.shutdown();
    }
}

/// What a refused client may be owed before it is cut off for not reading.
const REFUSAL_MAX_OWED: usize = 64 << 10;

/// The head of the packet at the front of `src`, a refused client's bytes,
/// and the bytes of `src` it takes (its length prefix and head, not its
/// payload); `None` until all of them have come. A packet of any length is
/// taken: its payload is dropped as it comes.
fn refused_head(src: &[u8]) -> io::Result<Option<(BodyHead, usize)>> {
    let invalid = |e: Error| io::Error::new(io::ErrorKind::InvalidData, e);
    let Some((len, prefix)) = varint::parse(src).map_err(invalid)? else {
        return Ok(None);
    };
    let len = u64::try_from(len).map_err(|_| {
        invalid(Error::Malformed {
            reason: "packet length exceeds 64 bits",
        })
    })?;
    // The head is within the body's first bytes: once they are here, or
    // the whole body if it is shorter, a head that does not fit is
    // malformed.
    let room = usize::try_from(len).map_or(MAX_HEAD_LEN, |len| len.min(MAX_HEAD_LEN));
    let Some(mut front) = src.get(prefix..prefix + room) else {
        return Ok(None);
    };
    let head = read_body_head(&mut front, len).map_err(invalid)?;
    Ok(Some((head, prefix + room - front.len())))
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

    /// Like [`connect_tcp`](PacketConnection::connect_tcp), but gives up
    /// connecting at `timeout`, over all the addresses `addr` resolves to.
    /// Resolving a host name is not bounded by it: pass a `SocketAddr` for a
    /// strict bound.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if no address answered in time; [`Error::Io`] if
    /// every address refused, or as for
    /// [`from_tcp_stream`](PacketConnection::from_tcp_stream).
    pub fn connect_tcp_timeout(
        addr: impl ToSocketAddrs,
        timeout: Duration,
        config: Config,
    ) -> Result<PacketConnection> {
        let started = Instant::now();
        let deadline = deadline_after(timeout);
        let mut last = None;
        for addr in addr.to_socket_addrs()? {
            let left = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if left.is_zero() {
                break;
            }
            let res = if deadline.is_some() {
                TcpStream::connect_timeout(&addr, left)
            } else {
                TcpStream::connect(addr)
            };
            match res {
                Ok(stream) => return PacketConnection::from_tcp_stream(stream, config),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => last = None,
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(Error::Io(e)),
            None if started.elapsed() >= timeout => Err(Error::Timeout {
                request: None,
                waited: started.elapsed(),
            }),
            None => Err(Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no address to connect to",
            ))),
        }
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

/// Faults injected into the refusing thread of a named server, for the
/// tests: no input makes it panic.
#[cfg(test)]
mod fault {
    use parking_lot::Mutex;

    /// Where the refusing thread panics.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Fault {
        /// In the next look at a refused client.
        Poll,
        /// Outside the work on any one client, as it takes the next client
        /// off its queue: the thread ends.
        Thread,
        /// Outside the work on any one client, just after it has begun
        /// refusing one (ERQ sent): the thread ends with that client's
        /// refusal in progress.
        Begun,
    }

    /// The faults armed, each for the server of that name, each once.
    static ARMED: Mutex<Vec<(String, Fault)>> = Mutex::new(Vec::new());

    /// Makes the refusing thread of the server named `server` panic at
    /// `fault`, once.
    pub(super) fn arm(server: &str, fault: Fault) {
        ARMED.lock().push((server.to_string(), fault));
    }

    /// Whether `fault` is armed for `server` and has not fired yet.
    pub(super) fn armed(server: &str, fault: Fault) -> bool {
        ARMED.lock().iter().any(|(s, f)| s == server && *f == fault)
    }

    /// Panics if `fault` is armed for `server`, disarming it.
    pub(super) fn hit(server: &str, fault: Fault) {
        let mut armed = ARMED.lock();
        if let Some(at) = armed.iter().position(|(s, f)| s == server && *f == fault) {
            armed.remove(at);
            drop(armed);
            panic!("{server}: an injected fault: {fault:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::panic::{self, AssertUnwindSafe};

    use super::fault::{self, Fault};
    use super::*;
    use crate::handler::Request;

    /// The bound on every wait of these tests: a bug is a failure, not a
    /// hang.
    const LIMIT: Duration = Duration::from_secs(10);

    /// An echo server named `name` with room for one client, and one
    /// client that holds that room (its first call answered).
    fn full_server(name: &str) -> (Server, SocketAddr, PacketConnection) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::serve_tcp(
            listener,
            ServerConfig::new(
                Config::default()
                    .name(name)
                    .handler(|rq: Request| Ok(rq.payload.into())),
            )
            .max_connections(1),
        )
        .unwrap();
        let holder = PacketConnection::connect_tcp_timeout(addr, LIMIT, Config::default()).unwrap();
        let held = holder.call_timeout(1, 0, b"held", LIMIT);
        assert!(held.is_ok(), "the client that holds the room: {held:?}");
        (server, addr, holder)
    }

    /// A client past the limit makes one call, then closes: the call's
    /// outcome.
    fn call_past_the_limit(addr: SocketAddr) -> Result<crate::Response> {
        let client = PacketConnection::connect_tcp_timeout(addr, LIMIT, Config::default()).unwrap();
        let res = client.call_timeout(1, 0, b"let me in", LIMIT);
        let _ = client.close_timeout(LIMIT);
        res
    }

    fn is_busy_refusal(res: &Result<crate::Response>) -> bool {
        matches!(res, Err(e @ Error::Failed { flags, .. })
            if *flags == BUSY_FLAGS
                && e.failure_reason().as_deref() == Some("server full: 1 connections"))
    }

    /// What a panic carried, as text.
    fn panic_text(panic: &sync::Panic) -> String {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_default()
    }

    /// Stops `server` within `LIMIT`: `Err` with the text of the panic if
    /// the stop panicked.
    fn stop_catching(server: Server) -> std::result::Result<Result<()>, String> {
        panic::catch_unwind(AssertUnwindSafe(|| server.stop_timeout(LIMIT)))
            .map_err(|panic| panic_text(&panic))
    }

    /// A panic while refusing one client costs that client alone: the next
    /// client past the limit still gets its busy refusal, and the panic,
    /// caught and logged, is not raised again by `stop`.
    #[test]
    fn a_panic_refusing_one_client_leaves_the_others_refused() {
        let name = "refuse-fault-poll";
        let (server, addr, holder) = full_server(name);
        fault::arm(name, Fault::Poll);
        let first = call_past_the_limit(addr);
        let fired = !fault::armed(name, Fault::Poll);
        let second = call_past_the_limit(addr);
        let held_closed = holder.close_timeout(LIMIT);
        let stopped = stop_catching(server);
        assert!(fired, "the fault did not fire");
        assert!(
            first.is_err() && !is_busy_refusal(&first),
            "the client whose refusal panicked: {first:?}"
        );
        assert!(
            is_busy_refusal(&second),
            "the next client past the limit: {second:?}"
        );
        assert!(held_closed.is_ok(), "{held_closed:?}");
        assert!(matches!(stopped, Ok(Ok(()))), "stop: {stopped:?}");
    }

    /// The refusing thread ends with a panic: the next client past the
    /// limit still gets its busy refusal, from a new one.
    #[test]
    fn a_refusing_thread_ended_by_a_panic_is_replaced() {
        let name = "refuse-fault-thread";
        let (server, addr, holder) = full_server(name);
        fault::arm(name, Fault::Thread);
        let first = call_past_the_limit(addr);
        let fired = !fault::armed(name, Fault::Thread);
        let second = call_past_the_limit(addr);
        let third = call_past_the_limit(addr);
        let held_closed = holder.close_timeout(LIMIT);
        let stopped = stop_catching(server);
        assert!(fired, "the fault did not fire");
        assert!(
            first.is_err() && !is_busy_refusal(&first),
            "the client taken as the thread panicked: {first:?}"
        );
        assert!(
            is_busy_refusal(&second) && is_busy_refusal(&third),
            "the next clients past the limit: {second:?}, {third:?}"
        );
        assert!(held_closed.is_ok(), "{held_closed:?}");
        assert!(stopped.is_err(), "stop: {stopped:?}");
    }

    /// The refusing thread ends with a panic while a client's refusal is
    /// in progress: that client still gets its busy answer, from the
    /// thread that takes over.
    #[test]
    fn a_refusal_in_progress_when_its_thread_panics_is_finished_by_another() {
        let name = "refuse-fault-begun";
        let (server, addr, holder) = full_server(name);
        fault::arm(name, Fault::Begun);
        let first = call_past_the_limit(addr);
        let fired = !fault::armed(name, Fault::Begun);
        let second = call_past_the_limit(addr);
        let held_closed = holder.close_timeout(LIMIT);
        let stopped = stop_catching(server);
        assert!(fired, "the fault did not fire");
        assert!(
            is_busy_refusal(&first),
            "the client whose refusal was in progress: {first:?}"
        );
        assert!(is_busy_refusal(&second), "the next client: {second:?}");
        assert!(held_closed.is_ok(), "{held_closed:?}");
        match &stopped {
            Err(text) => assert_eq!(text, &format!("{name}: an injected fault: Begun")),
            Ok(res) => panic!("stop returned {res:?}: the panic was dropped"),
        }
    }

    /// A refusing thread that has ended for want of clients is let go when
    /// the next one starts, not kept until `stop`: a server that refuses
    /// now and then for months holds no handles for them.
    #[test]
    fn refusing_threads_that_have_ended_are_let_go_as_others_start() {
        let name = "refuse-reap";
        let (server, addr, holder) = full_server(name);
        let shared = Arc::clone(&server.shared);
        let before = shared.threads.handles();
        let mut outcomes = Vec::new();
        let mut ended_each_time = true;
        for _ in 0..3 {
            outcomes.push(call_past_the_limit(addr));
            // The refusing thread ends once it has had no client for a
            // second: wait for that, within the bound.
            let deadline = Instant::now() + LIMIT;
            while shared.state.lock().refusals.is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            ended_each_time &= shared.state.lock().refusals.is_none();
        }
        // One more refusal starts one more thread, which joins the rest.
        outcomes.push(call_past_the_limit(addr));
        let after = shared.threads.handles();
        let held_closed = holder.close_timeout(LIMIT);
        let stopped = stop_catching(server);
        assert!(ended_each_time, "a refusing thread did not end by itself");
        for res in &outcomes {
            assert!(is_busy_refusal(res), "a client past the limit: {res:?}");
        }
        assert!(
            after <= before + 1,
            "threads kept: {before} before the refusals, {after} after"
        );
        assert!(held_closed.is_ok(), "{held_closed:?}");
        assert!(matches!(stopped, Ok(Ok(()))), "stop: {stopped:?}");
    }

    /// `stop` raises the panic that ended the refusing thread again, once
    /// it has done its work: every connection ended, every thread joined.
    #[test]
    fn stop_raises_the_panic_of_the_refusing_thread_after_stopping() {
        let name = "refuse-fault-stop";
        let (server, addr, holder) = full_server(name);
        let shared = Arc::clone(&server.shared);
        fault::arm(name, Fault::Thread);
        let first = call_past_the_limit(addr);
        let fired = !fault::armed(name, Fault::Thread);
        let stopped = stop_catching(server);
        let after_stop = holder.call_timeout(1, 0, b"after", LIMIT);
        let held_closed = holder.close_timeout(LIMIT);
        let (live, starting) = {
            let state = shared.state.lock();
            (state.live.len(), state.starting)
        };
        let threads_ended = shared.threads.wait_until(Some(Instant::now()));
        assert!(fired, "the fault did not fire");
        assert!(first.is_err(), "the client taken as it panicked: {first:?}");
        match &stopped {
            Err(text) => assert_eq!(text, &format!("{name}: an injected fault: Thread")),
            Ok(res) => panic!("stop returned {res:?}: the panic was dropped"),
        }
        assert_eq!((live, starting), (0, 0), "connections left");
        assert!(threads_ended, "the server's threads were left running");
        assert!(after_stop.is_err(), "a call after the stop: {after_stop:?}");
        let _ = held_closed;
    }

    /// The most refusals the refusing threads of this test binary have had
    /// in progress at once.
    pub(super) static MOST_REFUSING: std::sync::atomic::AtomicUsize =
        std::sync::atomic::AtomicUsize::new(0);

    /// A refused client sends a request announcing more than 1 MiB (over
    /// what a refusal once buffered, and refused with an error), its body
    /// in pieces, then a small one: each gets its busy answer, and the
    /// refusal never holds more than a read's bytes. (It kept the body as
    /// it came, up to 1 MiB a client, and a longer packet ended the
    /// refusal without an answer.)
    #[test]
    fn a_refusal_keeps_no_payload_and_answers_a_request_of_any_size() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let (client, server_side) = UnixStream::pair().unwrap();
        client.set_read_timeout(Some(LIMIT)).unwrap();
        let mut refusal = Refusal::start("refuse-big", Stream::Unix(server_side)).unwrap();
        // The test's own pace, not the refusal's 200 ms.
        refusal.deadline = Instant::now() + LIMIT;
        let len = (1 << 20) + (100 << 10);
        let big = Packet {
            channel: 0,
            tag: 7,
            kind: PacketKind::Request {
                rq_type: 1,
                flags: 0,
            },
            payload: vec![0x55; len],
        };
        let mut bytes = Vec::new();
        big.encode_into(&mut bytes);
        Packet {
            channel: 0,
            tag: 8,
            kind: PacketKind::Request {
                rq_type: 1,
                flags: 0,
            },
            payload: b"small".to_vec(),
        }
        .encode_into(&mut bytes);
        let mut most = 0;
        for piece in bytes.chunks(64 << 10) {
            (&client).write_all(piece).unwrap();
            // Until it has read all there is.
            loop {
                let polled = refusal.poll("server full: 1 connections");
                most = most.max(refusal.buf.capacity());
                match polled {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => panic!("the refusal ended: {e}"),
                }
            }
        }
        refusal.finish();
        let mut answer = Vec::new();
        (&client).read_to_end(&mut answer).unwrap();
        let mut tags = Vec::new();
        let mut at = 0;
        while let Ok(Some((packet, n))) = Packet::decode(&answer[at..], 1 << 20) {
            at += n;
            if let PacketKind::Response { ok: false, flags } = packet.kind {
                assert_eq!(flags, BUSY_FLAGS, "{packet:?}");
                tags.push(packet.tag);
            }
        }
        assert_eq!(tags, [7, 8], "the busy answers");
        assert!(
            most <= 16 << 10,
            "the refusal's buffer grew to {most} bytes"
        );
    }

    /// A hundred clients past the limit at once, each sending nothing (so
    /// each refusal takes its whole 200 ms): the refusing thread refuses at
    /// most `REFUSING` at once, and every client ends, refused or closed.
    /// (It took every client queued into its list, with no bound.)
    #[test]
    fn the_refusing_thread_refuses_a_bounded_number_at_once() {
        use std::io::Read;
        let (server, addr, holder) = full_server("refuse-many");
        let clients: Vec<std::net::TcpStream> = (0..100)
            .map(|_| {
                let s = std::net::TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(LIMIT)).unwrap();
                s
            })
            .collect();
        let mut ended = 0;
        for mut client in clients {
            let mut rest = Vec::new();
            if client.read_to_end(&mut rest).is_ok() {
                ended += 1;
            }
        }
        let most = MOST_REFUSING.load(std::sync::atomic::Ordering::SeqCst);
        let _ = holder.close_timeout(LIMIT);
        let stopped = stop_catching(server);
        assert_eq!(ended, 100, "clients that did not end");
        assert!(most <= REFUSING, "{most} refusals at once");
        assert!(most > 1, "the refusals did not overlap: {most}");
        assert!(matches!(stopped, Ok(Ok(()))), "{stopped:?}");
    }
}
