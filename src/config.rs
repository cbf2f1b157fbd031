//! [`Config`]: the settings a connection starts with.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Disconnect;
use crate::handler::RequestHandler;
use crate::packet::DEFAULT_MAX_PACKET_LEN;

/// Settings for a [`PacketConnection`](crate::PacketConnection), built from `Default` with by-value
/// setters. Cheap to clone.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use packetstream::{Config, Request};
///
/// let config = Config::default()
///     .name("server")
///     .packet_grace(Duration::from_millis(2))
///     .handler_threads(8)
///     .handler(|rq: Request| Ok(rq.payload.into()));
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct Config {
    pub(crate) name: String,
    pub(crate) packet_grace: Duration,
    pub(crate) handler_threads: usize,
    pub(crate) handler_queue: usize,
    pub(crate) max_packet_len: u64,
    pub(crate) max_queued_bytes: usize,
    pub(crate) max_queued_packets: usize,
    /// `max_packet_len` and `max_queued_bytes` were set, not left at their
    /// defaults (a server applies its own defaults to those left).
    pub(crate) limits_set: (bool, bool),
    pub(crate) low_queued_bytes: Option<usize>,
    pub(crate) packet_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) keepalive: Option<Duration>,
    pub(crate) stall_timeout: Option<Duration>,
    pub(crate) handler: Option<Arc<dyn RequestHandler>>,
    /// The handler runs on the receive thread.
    pub(crate) inline: bool,
    pub(crate) extensions: bool,
    pub(crate) on_end: Option<EndHook>,
    pub(crate) on_peer_end_requests: Option<EventHook>,
}

/// The hook of [`Config::on_end`].
pub(crate) type EndHook = Arc<dyn Fn(Disconnect) + Send + Sync>;
/// The hook of [`Config::on_peer_end_requests`].
pub(crate) type EventHook = Arc<dyn Fn() + Send + Sync>;

impl Default for Config {
    fn default() -> Config {
        Config {
            name: "packetstream".to_string(),
            packet_grace: Duration::from_millis(10),
            handler_threads: 4,
            handler_queue: DEFAULT_HANDLER_QUEUE,
            max_packet_len: DEFAULT_MAX_PACKET_LEN,
            max_queued_bytes: 8 << 20,
            max_queued_packets: 1 << 16,
            limits_set: (false, false),
            low_queued_bytes: None,
            packet_timeout: None,
            idle_timeout: None,
            keepalive: None,
            stall_timeout: None,
            handler: None,
            inline: false,
            extensions: true,
            on_end: None,
            on_peer_end_requests: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("name", &self.name)
            .field("packet_grace", &self.packet_grace)
            .field("handler_threads", &self.handler_threads)
            .field("handler_queue", &self.handler_queue)
            .field("max_packet_len", &self.max_packet_len)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("max_queued_packets", &self.max_queued_packets)
            .field("low_queued_bytes", &self.low_water())
            .field("packet_timeout", &self.packet_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("keepalive", &self.keepalive)
            .field("stall_timeout", &self.stall_timeout)
            .field("handler", &self.handler.is_some())
            .field("inline", &self.inline)
            .field("extensions", &self.extensions)
            .field("on_end", &self.on_end.is_some())
            .field("on_peer_end_requests", &self.on_peer_end_requests.is_some())
            .finish()
    }
}

impl Config {
    /// The connection's name, used in its threads' names
    /// (`"{name}:recv"`, `"{name}:send"`, `"{name}:handler{idx}"`) and in log
    /// lines. Default: `"packetstream"`.
    pub fn name(mut self, name: impl Into<String>) -> Config {
        self.name = name.into();
        self
    }

    /// How long queued packets may wait for company before they are written,
    /// so that bursts go out in few writes. A caller that blocks for a
    /// response never waits it out: its queue is written at once. Zero
    /// writes as soon as the queue is idle; a grace too long to add to an
    /// `Instant` (such as `Duration::MAX`) never runs out, so packets then go
    /// out only when a caller waits, the queue is full, or ERQ or EOF is
    /// sent. Default: 10 ms, as the reference.
    pub fn packet_grace(mut self, grace: Duration) -> Config {
        self.packet_grace = grace;
        self
    }

    /// The number of threads that run the handler. Default: 4, as the
    /// reference. At least 1.
    pub fn handler_threads(mut self, n: usize) -> Config {
        self.handler_threads = n.max(1);
        self
    }

    /// How many received requests may wait for a handler thread before the
    /// receive thread stops reading. Their payloads are bounded too, by
    /// [`max_queued_bytes`](Config::max_queued_bytes). Default: 256.
    pub fn handler_queue(mut self, n: usize) -> Config {
        self.handler_queue = n.max(1);
        self
    }

    /// The longest packet accepted or sent, its length prefix excluded.
    /// Checked before any buffer is allocated. Default: 64 MiB
    /// ([`Server`](crate::Server) connections: 1 MiB, see
    /// [`ServerConfig::max_packet_len`](crate::ServerConfig::max_packet_len)).
    pub fn max_packet_len(mut self, len: u64) -> Config {
        self.max_packet_len = len;
        self.limits_set.0 = true;
        self
    }

    /// How many unwritten bytes the outgoing queue holds before `submit`
    /// blocks (and `try_submit_on` fails). Replies and control packets are
    /// never held back by it. The same budget bounds the payload bytes of
    /// received requests waiting for a handler thread (one request is always
    /// let through, however large), and the replies owed to the peer: past
    /// it, the peer's requests are refused as busy, and past four times it
    /// (at least 1 MiB), the peer is taken to have stopped reading and the
    /// connection ends with [`Disconnect::Stalled`]. Default: 8 MiB.
    pub fn max_queued_bytes(mut self, n: usize) -> Config {
        self.max_queued_bytes = n.max(1);
        self.limits_set.1 = true;
        self
    }

    /// How many unwritten packets the outgoing queue holds before `submit`
    /// blocks. Default: 65536.
    pub fn max_queued_packets(mut self, n: usize) -> Config {
        self.max_queued_packets = n.max(1);
        self
    }

    /// The low-water mark of the outgoing queue, in unwritten bytes:
    /// [`PacketConnection::wait_drained`](crate::PacketConnection::wait_drained)
    /// waits until the queue has drained to it, so that a producer can stop
    /// at the high mark ([`max_queued_bytes`](Config::max_queued_bytes)) and
    /// go on at the low one. Default: a quarter of `max_queued_bytes`.
    pub fn low_queued_bytes(mut self, n: usize) -> Config {
        self.low_queued_bytes = Some(n);
        self
    }

    pub(crate) fn low_water(&self) -> usize {
        self.low_queued_bytes
            .unwrap_or(self.max_queued_bytes / 4)
            .min(self.max_queued_bytes)
    }

    /// How long the peer may go silent in the middle of a packet it has
    /// begun to send: past it, the connection ends with
    /// [`Disconnect::Silent`]. Enforced on sockets, where a blocked read can
    /// be interrupted (the socket's reading is shut down); on pipes and
    /// other streams it is not. The time is kept by one thread for the
    /// process, which looks every quarter of the shortest of the read
    /// timeouts (5 ms to 1 s), each look up to half of that or 5 ms late
    /// (looks share its wake-ups), so a timeout runs out up to 3/8 of the
    /// shortest late, or a quarter of it and 5 ms if the shortest is under
    /// 40 ms, and a little more on a busy machine; reads themselves get no
    /// timeout.
    ///
    /// This and the other read timeouts count only the time this end waits
    /// in a read: while it does its own work instead (an
    /// [inline handler](Config::inline_handler) running, a wait for room in
    /// the handler queue), the peer is not held to them. Default: no limit
    /// ([`Server`](crate::Server) connections: 30 s, see
    /// [`ServerConfig::packet_timeout`](crate::ServerConfig::packet_timeout)).
    pub fn packet_timeout(mut self, timeout: Duration) -> Config {
        self.packet_timeout = Some(timeout);
        self
    }

    /// How long the connection may stay idle: no packet of the application
    /// received from the peer (a request taken in, or a response that
    /// reaches a request of this end's still waiting; the extensions' pings
    /// and other control packets, ERQ, refused requests and responses to
    /// nothing do not count), no request pending either way, and none of
    /// this end's requests or handlers' replies, or the bytes queued ahead
    /// of them, being taken by the peer from a full stream (pongs and
    /// refusals queued after the last of them do not count). Past it, the
    /// connection ends with [`Disconnect::Idle`], whatever the reader is
    /// doing. A packet counts once it is whole, so a peer that trickles one
    /// packet for ever is let go too, and a packet that takes longer than
    /// this to arrive ends an otherwise idle connection. What this end
    /// sees is its writes: the last bytes of a reply, once in the kernel's
    /// socket buffer (hundreds of KiB on a Unix socket, up to a few MiB on
    /// TCP), are not seen being read, so a peer that takes longer than the
    /// timeout to read them is cut as idle. Enforced on sockets only, as
    /// [`packet_timeout`](Config::packet_timeout). Default: no limit
    /// ([`Server`](crate::Server) connections: 10 minutes).
    pub fn idle_timeout(mut self, timeout: Duration) -> Config {
        self.idle_timeout = Some(timeout);
        self
    }

    /// Checks that the peer is there when it has been quiet: once this end
    /// has heard nothing of it for `every`, it sends a
    /// [ping](crate::PacketConnection::ping); if it hears nothing for as
    /// long again, the connection ends with [`Disconnect::NoAnswer`]. It
    /// finds a peer gone without closing the stream (a host that went down),
    /// which neither the stream nor the other timeouts report, and a write
    /// blocked on such a peer is interrupted.
    ///
    /// Hearing from the peer is a byte from it, or the peer taking bytes of
    /// this end's from a full stream (it is reading a long write). Any peer
    /// answers a ping, the reference too (it refuses it, which is an
    /// answer); after this end's ERQ, only a peer with the
    /// [extensions](Config::extensions) is pinged, and none is given up for
    /// want of a ping. A peer of this crate whose handler queue is full
    /// stops reading until its handlers catch up; it pings this end every
    /// 100 ms meanwhile, so a period above that never takes it for gone.
    /// Time this end spends not reading (see
    /// [`packet_timeout`](Config::packet_timeout)) is not held against the
    /// peer; but a peer whose [inline handler](Config::inline_handler) runs
    /// for longer than the period cannot answer meanwhile, and is taken for
    /// gone. Pings are not the
    /// application's traffic: they keep no connection from
    /// [`idle_timeout`](Config::idle_timeout), at either end. Enforced on
    /// sockets only, as [`packet_timeout`](Config::packet_timeout).
    /// Default: off.
    pub fn keepalive(mut self, every: Duration) -> Config {
        self.keepalive = Some(every);
        self
    }

    /// How long what this end has to send may make no progress, the peer
    /// not reading: past it, the connection ends with
    /// [`Disconnect::Stalled`] and every pending request fails. Enforced on
    /// sockets, whose writes are bounded; a write to a pipe that blocks
    /// cannot be timed out. Default: no limit ([`Server`](crate::Server)
    /// connections: 60 s).
    pub fn stall_timeout(mut self, timeout: Duration) -> Config {
        self.stall_timeout = Some(timeout);
        self
    }

    /// The handler that serves the peer's requests, on a pool of handler
    /// threads. Without one, every request from the peer gets a not-ok
    /// reply, "no request handler".
    pub fn handler(mut self, handler: impl RequestHandler) -> Config {
        self.handler = Some(Arc::new(handler));
        self.inline = false;
        self
    }

    /// Like [`handler`](Config::handler), for a handler already shared.
    pub fn shared_handler(mut self, handler: Arc<dyn RequestHandler>) -> Config {
        self.handler = Some(handler);
        self.inline = false;
        self
    }

    /// A handler that runs on the receive thread itself, as each request
    /// is read: no handler threads, no hop between threads, and its reply
    /// is written by the receive thread at once, without blocking (on a
    /// socket; elsewhere by the send thread). For cheap handlers, such as a
    /// lookup in memory or an echo, this is the fastest way to serve.
    ///
    /// While it runs, this connection reads nothing: no other request, and
    /// no response to this end's own requests. So an inline handler must
    /// not:
    ///
    /// - block, sleep or take long: it holds up every request behind it on
    ///   this connection (a server's other connections go on);
    /// - wait for a response on its own connection (`call`, `wait`,
    ///   `request`): the thread that would read it is the one waiting, so it
    ///   would wait for ever. Submitting is fine, but on this thread a
    ///   `submit` never waits for room in the outgoing queue: when it is
    ///   full, it fails with [`Error::WouldBlock`](crate::Error::WouldBlock)
    ///   at once, as `try_submit` does, since waiting there would stop the
    ///   reading that lets two such ends drain each other;
    /// - call `close` or `join` on its own connection.
    ///
    /// A panic is caught and sent as a not-ok reply, as with
    /// [`handler`](Config::handler). Nothing is read while it runs, so it
    /// cannot see the peer cancel its own request
    /// ([`Request::is_cancelled`](crate::Request::is_cancelled)).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::os::unix::net::UnixStream;
    /// use packetstream::{Config, PacketConnection, Request};
    ///
    /// let (a, b) = UnixStream::pair()?;
    /// let server = PacketConnection::from_unix_stream(
    ///     b,
    ///     Config::default().inline_handler(|rq: Request| Ok(rq.payload.into())),
    /// )?;
    /// let client = PacketConnection::from_unix_stream(a, Config::default())?;
    /// assert_eq!(client.call(1, 0, b"echo")?.payload, b"echo");
    /// client.close()?;
    /// server.join()?;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn inline_handler(mut self, handler: impl RequestHandler) -> Config {
        self.handler = Some(Arc::new(handler));
        self.inline = true;
        self
    }

    /// The extensions to the base protocol: remote cancel and request
    /// deadlines (the guide [`extensions`](crate::extensions) has the wire
    /// spec). At start the connection sends a hello on
    /// [`CONTROL_CHANNEL`](crate::CONTROL_CHANNEL), without waiting for
    /// its answer; a peer of this crate with extensions on answers it, and
    /// the extensions come on for the connection. A peer of the base
    /// protocol, such as the Python reference, refuses the hello, and the
    /// connection stays on the base protocol, with nothing else changed.
    ///
    /// Then dropping or cancelling a [`PendingResponse`](crate::PendingResponse)
    /// whose response has not come asks the peer to stop the request
    /// ([`Request::is_cancelled`](crate::Request::is_cancelled)), and
    /// [`submit_timeout`](crate::PacketConnection::submit_timeout) sends its
    /// deadline with the request ([`Request::time_left`](crate::Request::time_left)).
    /// Off, the connection sends only the base protocol, and refuses the
    /// peer's control requests as the reference does.
    ///
    /// Default: on. The interop tests pass unchanged with it on, against
    /// the reference in both directions; turn it off for a peer that
    /// treats a request on an unknown channel as an error, or a test that
    /// counts packets.
    pub fn extensions(mut self, on: bool) -> Config {
        self.extensions = on;
        self
    }

    /// A hook run once, when the connection has ended: both its receive and
    /// send sides are done, and every request it took with it has failed.
    /// It gets how the connection ended: [`Disconnect::PeerEof`] for the
    /// orderly end, anything else for a crash, an error or an abort. It runs
    /// on one of the connection's threads, so it must not block for long,
    /// nor call `close` or `join` on its own connection. Like asyncio's
    /// `connection_lost`.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::os::unix::net::UnixStream;
    /// use std::sync::mpsc;
    /// use std::time::Duration;
    /// use packetstream::{Config, Disconnect, PacketConnection};
    ///
    /// let (a, b) = UnixStream::pair()?;
    /// let (ended_tx, ended) = mpsc::channel();
    /// let ended_tx = std::sync::Mutex::new(ended_tx);
    /// let client = PacketConnection::from_unix_stream(
    ///     a,
    ///     Config::default().on_end(move |why| {
    ///         let _ = ended_tx.lock().unwrap().send(why);
    ///     }),
    /// )?;
    /// drop(b); // the peer vanishes without its EOF
    /// let why = ended.recv_timeout(Duration::from_secs(10)).unwrap();
    /// assert_eq!(why, Disconnect::StreamEnded);
    /// # let _ = client.close();
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn on_end(mut self, hook: impl Fn(Disconnect) + Send + Sync + 'static) -> Config {
        self.on_end = Some(Arc::new(hook));
        self
    }

    /// A hook run when the peer's end-of-requests packet (ERQ) arrives: it
    /// will send no more requests. Runs on the receive thread, so it must
    /// not block for long; if it panics, the connection ends as if its
    /// stream had failed, and every pending request fails.
    pub fn on_peer_end_requests(mut self, hook: impl Fn() + Send + Sync + 'static) -> Config {
        self.on_peer_end_requests = Some(Arc::new(hook));
        self
    }
}

/// Requests that may wait for a handler thread, by default. Large enough that
/// the receive thread rarely blocks on a burst (at 16, blocking and waking it
/// dominated a pipelined profile); memory is bounded by the queue's byte
/// budget.
const DEFAULT_HANDLER_QUEUE: usize = 256;
