//! A synchronous, thread-based bidirectional packet stream connection,
//! wire-compatible with the Python package `cs.packetstream` (release
//! 20240630).
//!
//! Either end of a [`PacketConnection`] sends requests, and the other end
//! answers each one in a handler: ok or not ok, with flags and a payload,
//! under the request's tag. Many requests are in flight at once and
//! responses come back in any order. It runs over anything that implements
//! [`Read`](std::io::Read) and [`Write`](std::io::Write): pipes to a child
//! process, a socketpair, a TCP socket.
//!
//! It uses blocking I/O on plain threads, with no async runtime, which keeps
//! the API small and the dependencies few.
//!
//! # Quick start
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use std::time::Duration;
//! use packetstream::{Config, PacketConnection, Reply, Request};
//!
//! const ECHO: u64 = 1;
//!
//! let (a, b) = UnixStream::pair()?;
//! let server = PacketConnection::from_unix_stream(
//!     b,
//!     Config::default().name("server").handler(|rq: Request| match rq.rq_type {
//!         ECHO => Ok(Reply { flags: rq.flags, payload: rq.payload }),
//!         other => Err(format!("unknown rq_type {other}").into()),
//!     }),
//! )?;
//! let client = PacketConnection::from_unix_stream(a, Config::default().name("client"))?;
//!
//! let rsp = client.call(ECHO, 7, b"hello")?; // blocks until the reply
//! assert_eq!((rsp.flags, rsp.payload.as_slice()), (7, &b"hello"[..]));
//!
//! let pending = client.submit(ECHO, 0, b"later")?; // returns at once
//! assert_eq!(pending.wait_timeout(Duration::from_secs(5))?.payload, b"later");
//!
//! let err = client.call(99, 0, b"").unwrap_err(); // a not-ok reply is an Err
//! assert_eq!(err.failure_reason().as_deref(), Some("unknown rq_type 99"));
//!
//! client.close()?; // ERQ, our handlers finish, EOF, then the peer's EOF
//! server.join()?; // the server ends when its client has
//! # Ok::<(), packetstream::Error>(())
//! ```
//!
//! Both ends are the same type: the "server" is just the end with a
//! handler, and an end can have a handler and make requests at once.
//!
//! # Picking a constructor
//!
//! | you have | start the connection with |
//! |---|---|
//! | a child process, spawned with piped stdin and stdout | [`PacketConnection::from_child`] |
//! | nothing: you *are* the child, serving your parent | [`PacketConnection::stdio`] |
//! | a `UnixStream`, such as one end of `UnixStream::pair()` in a test | [`PacketConnection::from_unix_stream`] |
//! | a Unix socket path or a TCP address to connect to | [`PacketConnection::connect_unix`], [`PacketConnection::connect_tcp`] |
//! | an accepted `TcpStream` | [`PacketConnection::from_tcp_stream`] |
//! | a listener, to serve many clients | [`Server::serve_unix`], [`Server::serve_tcp`] |
//! | one file descriptor used both ways (a socket) | [`PacketConnection::from_fd`], [`PacketConnection::from_borrowed_fd`] |
//! | two file descriptors, such as inherited pipes | [`PacketConnection::from_fds`], [`PacketConnection::from_borrowed_fds`] |
//! | any `Read` and `Write` | [`PacketConnection::new`] |
//! | streams to open on demand, with a hook to run at close | [`PacketConnection::connect_with`] |
//!
//! Every constructor takes a [`Config`]: the connection's name (used in its
//! threads' names and log lines), the handler, the number of handler
//! threads, the packet grace, and the limits on packet length and on the
//! outgoing queue. The defaults follow the reference implementation.
//!
//! The socket constructors also shut the socket down on
//! [`abort`](PacketConnection::abort), which unblocks the receive thread;
//! with plain `Read` and `Write` the receive thread ends only when the
//! stream does.
//!
//! # Requests and responses
//!
//! A request is a `rq_type`, a `flags` word and a payload, all the
//! application's to define. [`call`](PacketConnection::call) sends one and
//! waits for its [`Response`]; [`submit`](PacketConnection::submit) sends it
//! and returns a [`PendingResponse`] at once, so that many requests can be
//! in flight. A pending response is waited for with
//! [`wait`](PendingResponse::wait) or
//! [`wait_timeout`](PendingResponse::wait_timeout) (after a timeout the
//! request is still pending), polled with
//! [`try_wait`](PendingResponse::try_wait), or given up with
//! [`cancel`](PendingResponse::cancel), as dropping it does.
//! [`call_as`](PacketConnection::call_as) and
//! [`wait_as`](PendingResponse::wait_as) decode the response through
//! [`FromResponse`]: into its flags (`u64`), its payload (`Vec<u8>`,
//! `String`), both, or nothing (`()`).
//!
//! A not-ok response is an `Err`, [`Error::Failed`], which carries the
//! reply's flags and payload, so `?` works at call sites.
//!
//! ```
//! # use std::os::unix::net::UnixStream;
//! # use std::time::Duration;
//! # use packetstream::{Config, Error, Failure, PacketConnection, Request};
//! # let (a, b) = UnixStream::pair()?;
//! # let server = PacketConnection::from_unix_stream(b, Config::default().handler(
//! #     |rq: Request| match rq.payload.as_slice() {
//! #         b"" => Err(Failure::new(404, "empty").into()),
//! #         payload => Ok((payload.len() as u64, payload.to_ascii_uppercase()).into()),
//! #     },
//! # ))?;
//! # let client = PacketConnection::from_unix_stream(a, Config::default())?;
//! // Many in flight: submit them all, then collect the responses.
//! let pending: Vec<_> = ["a", "bb", "ccc"]
//!     .iter()
//!     .map(|text| client.submit(1, 0, text.as_bytes()))
//!     .collect::<Result<_, _>>()?;
//! let lengths = pending
//!     .into_iter()
//!     .map(|p| p.wait_as::<u64>())
//!     .collect::<Result<Vec<_>, _>>()?;
//! assert_eq!(lengths, [1, 2, 3]);
//!
//! // Decode the payload as text.
//! let text: String = client.call_as(1, 0, b"shout")?;
//! assert_eq!(text, "SHOUT");
//!
//! // The handler's not-ok reply, with its flags and reason.
//! match client.call(1, 0, b"") {
//!     Err(Error::Failed { flags: 404, payload, .. }) => assert_eq!(payload, b"empty"),
//!     other => panic!("expected a 404 failure, got {other:?}"),
//! }
//! # client.close()?;
//! # server.join()?;
//! # Ok::<(), packetstream::Error>(())
//! ```
//!
//! `submit` blocks only while the outgoing queue is full
//! ([`Config::max_queued_bytes`], [`Config::max_queued_packets`]);
//! [`try_submit_on`](PacketConnection::try_submit_on) fails with
//! [`Error::WouldBlock`] instead.
//!
//! # Handlers
//!
//! The handler serves the peer's requests. It is a closure
//! `Fn(Request) -> HandlerResult`, or a type implementing
//! [`RequestHandler`], given in [`Config::handler`]. It runs on the
//! connection's pool of handler threads ([`Config::handler_threads`], 4 by
//! default), so several requests are handled at once and the handler takes
//! `&self`: shared state goes behind a `Mutex` or atomics.
//!
//! - `Ok(reply)` sends an ok response. [`Reply`] converts from `()`, `u64`
//!   (the flags), `Vec<u8>`, `&[u8]`, `String`, `&str` (the payload) and
//!   `(u64, Vec<u8>)`, as the reference's handlers may return.
//! - `Err(e)` sends a not-ok response with flags 0 and `e`'s text, so `?`
//!   works inside handlers; a [`Failure`] sends exactly its own flags and
//!   payload.
//! - A panic is caught and sent as a not-ok response; the connection goes
//!   on.
//!
//! An end without a handler answers every request from the peer with a
//! not-ok "no request handler".
//!
//! # Channels
//!
//! Every request travels on a channel, a number; 0 is the default, used by
//! [`call`](PacketConnection::call) and [`submit`](PacketConnection::submit).
//! [`call_on`](PacketConnection::call_on) and
//! [`submit_on`](PacketConnection::submit_on) pick another. Each channel
//! has its own sequence of tags, the handler sees the channel in
//! [`Request::channel`], and the reply goes back on the same channel. The
//! Python reference serves channel 0 only and refuses others with a not-ok
//! response.
//!
//! ```
//! # use std::os::unix::net::UnixStream;
//! # use packetstream::{Config, PacketConnection, Request};
//! # let (a, b) = UnixStream::pair()?;
//! let server = PacketConnection::from_unix_stream(
//!     b,
//!     Config::default().handler(|rq: Request| Ok(rq.channel.into())),
//! )?;
//! let client = PacketConnection::from_unix_stream(a, Config::default())?;
//! assert_eq!(client.call_on(5, 1, 0, b"")?.flags, 5);
//! assert_eq!(client.submit_on(5, 1, 0, b"")?.tag(), 1); // channel 5's second tag
//! # client.close()?;
//! # server.join()?;
//! # Ok::<(), packetstream::Error>(())
//! ```
//!
//! # Shutdown
//!
//! A connection ends in order, as the reference's does: each end sends
//! end-of-requests (ERQ) when it will make no more requests, finishes the
//! requests it is handling, and sends EOF last. An end's receive thread
//! stops at the peer's EOF.
//!
//! - [`close`](PacketConnection::close) does all of that for this end and
//!   waits for the peer's EOF; [`close_timeout`](PacketConnection::close_timeout)
//!   gives up at a deadline and then aborts.
//! - [`join`](PacketConnection::join) is for the serving end: it waits for
//!   the peer to finish (its EOF), answers what is still in progress and
//!   sends its own EOF, without starting a close itself.
//! - [`end_requests`](PacketConnection::end_requests) sends ERQ alone:
//!   responses still arrive, new requests fail with [`Error::Closed`].
//! - [`abort`](PacketConnection::abort) stops at once: pending requests
//!   fail, queued packets are dropped, no EOF is sent, and a socket is shut
//!   down.
//! - Dropping a connection starts `close` without waiting for it.
//!
//! An orderly close never shuts down or closes a stream the caller still
//! holds: the connection drops only its own descriptors, so a socket or
//! pipes the caller kept can carry the next connection.
//! [`take_unread`](PacketConnection::take_unread) hands over any bytes read
//! past the peer's EOF, which belong to that next connection.
//!
//! # Endings
//!
//! Every request ends exactly once, in one of these ways, each with its
//! `Display` text; the table on [`Error`] says which of them the peer may
//! have acted on, and [`Error::was_sent`] tells them apart for a retry:
//!
//! | outcome | when | text |
//! |---|---|---|
//! | `Ok(`[`Response`]`)` | the peer answered ok | |
//! | [`Error::Failed`] | the peer answered not ok | `request 0:2 failed remotely (flags 0x0): REASON` |
//! | [`Error::ResponseTooLarge`] | the answer was over [`Config::max_packet_len`] | `response of N bytes exceeds limit of M` |
//! | [`Error::ConnectionLost`] | sent, and the connection ended first | `connection lost before a response arrived: HOW` |
//! | [`Error::Unsent`] | the connection ended before it was written | `request not sent, connection ended: HOW` |
//! | [`Error::Timeout`] | a wait with a deadline ran out | `request 0:2 (rq_type 1) timed out after 200ms` |
//! | [`Error::Closed`] | `submit` after this end's requests ended | `connection is not accepting new requests` |
//! | [`Error::WouldBlock`] | `try_submit` on a full queue | `outgoing queue is full` |
//! | [`Error::TooLarge`] | `submit` of a packet over the limit | `packet of N bytes exceeds limit of M` |
//!
//! A connection ends once, in one of the ways of [`Disconnect`], which
//! every request it took with it carries, which [`Config::on_end`] gets,
//! and which [`status`](PacketConnection::status) reports. `close` and
//! `join` return `Ok` for the orderly end only:
//!
//! | [`Disconnect`] | text | `close` and `join` return |
//! |---|---|---|
//! | `PeerEof` | `peer sent EOF` | `Ok(())` |
//! | `StreamEnded`: the peer crashed, exited or never spoke | `stream ended without EOF` | `Err(ConnectionLost(StreamEnded))` |
//! | `Protocol`: bad bytes from the peer | `protocol error from peer` | `Err(Malformed { .. })` or `Err(TooLarge { .. })` |
//! | `Io(kind)`: reading or writing failed | `i/o error: KIND` | `Err(Io(..))` |
//! | `Local`: this end aborted | `aborted locally` | `Err(ConnectionLost(Local))` |
//!
//! ```
//! # use std::os::unix::net::UnixStream;
//! # use std::sync::{mpsc, Mutex};
//! # use std::time::Duration;
//! # use packetstream::{Config, Disconnect, Error, PacketConnection, Request};
//! let (a, b) = UnixStream::pair()?;
//! let (started_tx, started) = mpsc::channel::<()>();
//! let (release, held) = mpsc::channel::<()>();
//! let (started_tx, held) = (Mutex::new(started_tx), Mutex::new(held));
//! let server = PacketConnection::from_unix_stream(
//!     b,
//!     Config::default().handler(move |_: Request| {
//!         // Say the request has arrived, then hold it until released.
//!         let _ = started_tx.lock().unwrap().send(());
//!         let _ = held.lock().unwrap().recv_timeout(Duration::from_secs(10));
//!         Ok(().into())
//!     }),
//! )?;
//! let (ended_tx, ended) = mpsc::channel();
//! let ended_tx = Mutex::new(ended_tx);
//! let client = PacketConnection::from_unix_stream(
//!     a,
//!     Config::default().on_end(move |why| {
//!         let _ = ended_tx.lock().unwrap().send(why);
//!     }),
//! )?;
//! let pending = client.submit(1, 0, b"")?;
//! started.recv_timeout(Duration::from_secs(10)).expect("request reached the handler");
//!
//! server.abort(); // the server goes away without answering or its EOF
//! match pending.wait_timeout(Duration::from_secs(10)) {
//!     Err(err @ Error::ConnectionLost(Disconnect::StreamEnded)) => assert!(err.was_sent()),
//!     other => panic!("expected a lost connection, got {other:?}"),
//! }
//! assert_eq!(ended.recv_timeout(Duration::from_secs(10)), Ok(Disconnect::StreamEnded));
//! assert!(matches!(client.submit(1, 0, b""), Err(Error::Closed)));
//! assert!(matches!(
//!     client.close(),
//!     Err(Error::ConnectionLost(Disconnect::StreamEnded))
//! ));
//! drop(release);
//! assert!(server.join().is_err()); // it was aborted
//! # Ok::<(), packetstream::Error>(())
//! ```
//!
//! [`Config::on_peer_end_requests`] tells when the peer's ERQ arrives, and
//! [`call_timeout`](PacketConnection::call_timeout) is `call` with a
//! deadline.
//!
//! # Servers
//!
//! A [`Server`] accepts clients on a TCP or Unix listener and serves each on
//! a connection of its own:
//!
//! - [`ServerConfig::new`] serves every client alike, with one handler;
//!   [`ServerConfig::per_client`] builds each client's [`Config`] from its
//!   [`ClientInfo`] (id and peer address), so a handler has state of its own
//!   and knows whom it serves.
//! - [`Server::clients`] lists the live clients. Each [`Client`] handle holds
//!   the client's connection, through which the server can make requests of
//!   the client (the protocol is symmetric) or close it.
//! - [`ServerConfig::on_accept`] and [`ServerConfig::on_close`] run as
//!   clients come and go; `on_close` gets how the connection ended.
//! - At [`ServerConfig::max_connections`], a new client is refused at once,
//!   not parked: its first requests get a not-ok "server full" reply
//!   ([`Error::is_busy`]), then EOF.
//! - [`Server::stop`] starts the orderly close of every connection at once
//!   and waits for them; [`Server::stop_timeout`] aborts those still open at
//!   its deadline.
//!
//! The `notify` example is a server that pushes a notification to every
//! connected client; the `blockstore` example is a typed service served this
//! way.
//!
//! # Observability
//!
//! The library never prints. [`PacketConnection::stats`] returns a
//! [`Stats`] snapshot at any time, from any thread: packets and bytes in and
//! out, writes, requests sent and received, ok and not-ok
//! responses and replies, requests pending here and requests in progress in
//! this end's handlers. The `progress` example draws a live progress line
//! from it. For a trace of every packet, enable the [`log`] crate at `trace`
//! level for `packetstream`; connection events are logged at `debug`, lost
//! requests and refusals at `warn`, broken streams at `error`.
//!
//! ```
//! # use std::os::unix::net::UnixStream;
//! # use packetstream::{Config, PacketConnection, Request};
//! # let (a, b) = UnixStream::pair()?;
//! # let server = PacketConnection::from_unix_stream(b, Config::default()
//! #     .handler(|rq: Request| Ok(rq.payload.into())))?;
//! # let client = PacketConnection::from_unix_stream(a, Config::default())?;
//! for n in 0..10u8 {
//!     client.call(1, 0, &[n; 100])?;
//! }
//! let stats = client.stats();
//! assert_eq!((stats.requests_sent, stats.responses_ok, stats.pending), (10, 10, 0));
//! assert!(stats.bytes_out > 1000 && stats.bytes_in > 1000);
//! # client.close()?;
//! # server.join()?;
//! # Ok::<(), packetstream::Error>(())
//! ```
//!
//! # Threads
//!
//! Each connection runs these threads, named after [`Config::name`]:
//!
//! - **`{name}:recv`**, the receive thread, reads packets. A response fills
//!   the waiting caller's cell; a request is checked (is there a handler,
//!   has the peer sent ERQ, is this end closing, is the tag in use) and
//!   handed to the handlers, or refused with a not-ok reply. It writes only
//!   replies, and only without blocking for long (on a socket; elsewhere the
//!   send thread writes them), so it keeps reading whatever the peer does.
//!   It waits in `read`, and when this connection has too many requests
//!   waiting for a handler ([`Config::handler_queue`], 256, and
//!   [`Config::max_queued_bytes`] of payload): that is how a peer that sends
//!   faster than the handlers work is slowed down.
//! - **`{name}:handler{idx}`**, [`Config::handler_threads`] of them, if
//!   there is a handler; a [`Server`]'s connections share one pool instead
//!   ([`ServerConfig::handler_threads`]). An
//!   [`inline_handler`](Config::inline_handler) runs on the receive thread
//!   and needs none.
//! - **`{name}:send`**, the send thread, writes the outgoing queue once its
//!   oldest byte has waited the packet grace ([`Config::packet_grace`],
//!   10 ms), so that bursts go out in few writes; at once for ERQ, EOF and
//!   a full queue. The stream is closed once EOF is written.
//! - **Your threads**: `submit` queues the request and returns. A caller
//!   that waits with no deadline (`call`, `wait`) writes the queue itself
//!   and, on a socket, may read its own response: the receive thread lends
//!   its reader to waiting callers when nothing else is pending, so a
//!   synchronous call is woken by the stream, not by another thread. Calls
//!   with a deadline and the `try_*` calls never read or write: they leave
//!   that to the connection's threads, so they return in time whatever the
//!   peer does.
//!
//! A [`Server`] adds one `{name}:accept` thread, its handler pool, and for
//! its `n`th client a connection named `{name}#{n}`.
//!
//! No lock is held while a handler or a hook runs or while the stream is
//! read or written, and no thread holds two of the crate's locks at once.
//! Replies are never refused for lack of room in the outgoing queue, so an
//! end answering a flood of requests cannot block on its own replies.
//! ARCHITECTURE.md in the repository has the details.
//!
//! ## What a handler may do
//!
//! - Take its time: a slow handler holds one handler thread, and the others
//!   go on serving. A request never waits behind a busy handler while
//!   another handler thread sleeps.
//! - Make requests of the peer on its own connection, and wait for the
//!   responses: the receive thread delivers them while the handler waits.
//!   The handler needs a handle to its connection, which exists only after
//!   the [`Config`] is built; a [`Weak`](std::sync::Weak) in a
//!   [`OnceLock`](std::sync::OnceLock) does it without a reference cycle:
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use std::sync::{Arc, OnceLock, Weak};
//! use std::time::Duration;
//! use packetstream::{Config, HandlerResult, PacketConnection, Request};
//!
//! const GREET: u64 = 1; // client -> server
//! const NAME: u64 = 2; // server -> client, while handling GREET
//!
//! let (a, b) = UnixStream::pair()?;
//! let me: Arc<OnceLock<Weak<PacketConnection>>> = Arc::default();
//! let server = Arc::new(PacketConnection::from_unix_stream(b, Config::default().handler({
//!     let me = Arc::clone(&me);
//!     move |_: Request| -> HandlerResult {
//!         let conn = me.get().and_then(Weak::upgrade).ok_or("connection is gone")?;
//!         let name = conn.submit(NAME, 0, b"")?.wait_timeout(Duration::from_secs(10))?;
//!         Ok(format!("hello, {}", String::from_utf8_lossy(&name.payload)).into())
//!     }
//! }))?);
//! me.set(Arc::downgrade(&server)).expect("set once");
//!
//! let client = PacketConnection::from_unix_stream(
//!     a,
//!     Config::default().handler(|_: Request| Ok("client".into())),
//! )?;
//! assert_eq!(client.call_as::<String>(GREET, 0, b"")?, "hello, client");
//! client.close()?;
//! server.join()?;
//! # Ok::<(), packetstream::Error>(())
//! ```
//!
//! ## What a handler must not do
//!
//! - Block forever. It stalls one handler thread for good. Once every
//!   handler thread is stuck and the handler queue is full, the receive
//!   thread stops reading, and then responses to this end's own requests
//!   stop arriving too. A handler that waits for the peer, as above, should
//!   wait with a timeout, and nested call-backs need enough handler
//!   threads.
//! - Call [`close`](PacketConnection::close) or
//!   [`join`](PacketConnection::join) on its own connection: both wait for
//!   every handler to finish, itself included. Call
//!   [`end_requests`](PacketConnection::end_requests) or
//!   [`abort`](PacketConnection::abort), which do not wait, or leave the
//!   close to another thread.
//! - Write to standard output when the connection runs over it
//!   ([`PacketConnection::stdio`]): log to standard error.
//!
//! A handler that panics sends a not-ok reply and the connection goes on;
//! a `std::sync::Mutex` it held is poisoned, as with any panic.
//!
//! # Wire compatibility
//!
//! The bytes on the wire are those of `cs.packetstream` 20240630; the
//! interop tests run this crate against the Python package in both
//! directions. Numbers are BSUInt varints: 7 bits a byte, most significant
//! group first, the high bit set on every byte but the last (`127` is
//! `7f`, `128` is `81 00`). A packet is its length, then the body:
//!
//! ```text
//! call(rq_type 1, flags 7, b"hi"), the first request on channel 0:
//!
//!   05  02  1e  02  68 69
//!   │   │   │   │   └───┴── payload "hi": the rest of the body
//!   │   │   │   └────────── rq_type + 1 = 2 (requests only; wire 0 is a control packet)
//!   │   │   └────────────── header = flags << 2 | is_request << 1 | has_channel
//!   │   │                          = 7 << 2 | 1 << 1 | 0 = 0x1e
//!   │   └────────────────── tag 2 (channel 0's tags 0 and 1 belong to EOF and ERQ)
//!   └────────────────────── length of the body: 5 bytes
//!
//! its ok response, flags 7, b"hi":
//!
//!   04  02  3c  68 69
//!           └── header = (flags << 1 | ok) << 2 = (7 << 1 | 1) << 2 = 0x3c
//!
//! the same request on channel 5 (tag 0, the first on that channel):
//!
//!   06  00  1f  05  02  68 69
//!           │   └── channel, present only when not 0 (has_channel = 1)
//!           └────── 0x1e | 1
//!
//! ERQ = 03 01 02 00    EOF = 03 00 02 00    (tag 1 or 0, a request of wire rq_type 0)
//! ```
//!
//! [`Packet`] encodes and decodes single packets, for tools and tests:
//!
//! ```
//! use packetstream::{PacketKind, Packet};
//!
//! let wire = |packet: Packet| {
//!     let mut buf = Vec::new();
//!     packet.encode_into(&mut buf);
//!     buf
//! };
//! let request = |channel, tag| Packet {
//!     channel,
//!     tag,
//!     kind: PacketKind::Request { rq_type: 1, flags: 7 },
//!     payload: b"hi".to_vec(),
//! };
//! assert_eq!(wire(request(0, 2)), [0x05, 0x02, 0x1e, 0x02, b'h', b'i']);
//! assert_eq!(wire(request(5, 0)), [0x06, 0x00, 0x1f, 0x05, 0x02, b'h', b'i']);
//! let response = Packet {
//!     channel: 0,
//!     tag: 2,
//!     kind: PacketKind::Response { ok: true, flags: 7 },
//!     payload: b"hi".to_vec(),
//! };
//! assert_eq!(wire(response), [0x04, 0x02, 0x3c, b'h', b'i']);
//! assert_eq!(wire(Packet::erq()), [0x03, 0x01, 0x02, 0x00]);
//! assert_eq!(wire(Packet::eof()), [0x03, 0x00, 0x02, 0x00]);
//! ```
//!
//! A response's flags carry the ok bit lowest, so with 64-bit flags a
//! response header is 67 bits wide; the request types of the application
//! are shifted up by one on the wire, so every `u64` is usable. The module
//! doc of the wire format in the source (`src/packet.rs`) has the grammar.
//!
//! # Extensions
//!
//! On top of the base protocol, and degrading to it against the
//! reference: remote cancel (dropping a [`PendingResponse`] stops the
//! peer's handler, which polls [`Request::is_cancelled`]), deadlines sent
//! with [`submit_timeout`](PacketConnection::submit_timeout) and
//! [`call_timeout`](PacketConnection::call_timeout), [`ping`](PacketConnection::ping)
//! and [`keepalive`](Config::keepalive). They travel as requests on a
//! reserved channel after a hello, and are on by default
//! ([`Config::extensions`]). The guide [`extensions`] has the wire spec,
//! with vectors.
//!
//! # Talking to Python
//!
//! A Rust program and a Python program using the reference,
//! `cs.packetstream` 20240630, talk over a child's pipes, either one the
//! parent. The repository has a runnable pair for each direction:
//! `examples/python_child.rs` starts `python/word_child.py`, and
//! `python/rust_parent.py` starts `examples/rust_child.rs`.
//!
//! - Install the reference with the library versions of its time, without
//!   letting pip resolve them: `python/setup-venv.sh`, which runs
//!   `pip install --no-deps -r python/requirements.txt` in a new venv.
//! - A Python child must take its packet stream off standard output before
//!   its connection starts (`send_fd = os.dup(1)`, then `os.dup2(2, 1)`):
//!   the reference prints progress lines there, which would otherwise break
//!   the parent's stream with [`Error::Malformed`].
//! - A Python handler's exception arrives as [`Error::Failed`] with the
//!   payload `exception during handler`; a request on a channel other than
//!   0 gets `unknown channel %d`, literally.
//!
//! The guide [`talking_to_python`] has both pairs in full, how failures map
//! in each direction, and what the reference cannot do.
//!
//! # Typed protocols
//!
//! Above raw `(rq_type, flags, payload)` requests sits a typed layer, after
//! the reference's `BaseRequest` and `HasPacketConnection`: a protocol is a
//! set of [`RequestType`]s, each with its `rq_type`, its [`Payload`]
//! encoding (the cs.binary types of the table on [`Payload`], or
//! [`impl_payload!`] for a struct of them) and its response type. A
//! [`Dispatcher`] serves them through [`Fulfil::fulfil`], and
//! [`PacketConnection::request`] calls them. The `blockstore` example is a
//! content-addressed block store built this way, and `typed_service` is one
//! service written both here and in Python.
//!
//! # Examples
//!
//! The repository's `examples/` directory has one program per use, each
//! runnable with `cargo run --example NAME`: `subprocess` (a parent and a
//! child over pipes, the one to copy), `cancel` (a parent that gives up on
//! a long job in a child), `socketpair_test` (how to test a
//! service), `tcp` (a server and its clients), `notify` (a server that
//! calls its clients), `progress` (a live progress line from the stats),
//! `python_child` and `rust_child` (a Python peer on either end),
//! `typed_service`, `demo`, `blockstore`, `interop` and `bench`.

mod codec;
mod config;
mod connection;
mod error;
mod ext;
mod handler;
mod outbox;
mod packet;
mod pending;
mod pool;
mod protocol;
mod receiver;
mod reply;
mod server;
mod shared;
mod stats;
mod sync;
mod transport;
mod varint;

pub use crate::codec::{
    BSData, BSSFloat, BSString, BSUInt, BinaryUTF8NUL, Encoding, Float64BE, Float64LE, Int16BE,
    Int16LE, Int32BE, Int32LE, Payload, PayloadReader, PayloadWrite, UInt16BE, UInt16LE, UInt32BE,
    UInt32LE, UInt64BE, UInt64LE, UInt8,
};
pub use crate::config::Config;
pub use crate::connection::{OnClose, PacketConnection, PendingResponse};
pub use crate::error::{Disconnect, Error, RequestId, Result};
pub use crate::ext::CONTROL_CHANNEL;
pub use crate::handler::{HandlerError, HandlerResult, Request, RequestHandler};
pub use crate::packet::{Packet, PacketKind, DEFAULT_MAX_PACKET_LEN};
pub use crate::protocol::{Dispatcher, Fulfil, PendingRequest, RequestType};
pub use crate::reply::{Failure, FromResponse, Reply, Response};
pub use crate::server::{Client, ClientInfo, PeerAddr, Server, ServerConfig, BUSY_FLAGS};
pub use crate::shared::Status;
pub use crate::stats::Stats;
pub use crate::varint::MAX_VARINT_LEN;
pub use byteorder::{BigEndian, ByteOrder, LittleEndian};

// The guide of `PYTHON.md`, a page of the documentation whose Rust blocks
// are compiled with the doctests.
#[cfg(any(doc, doctest))]
#[doc = include_str!("../PYTHON.md")]
pub mod talking_to_python {}

// The extensions' guide and wire spec, `EXTENSIONS.md`, likewise.
#[cfg(any(doc, doctest))]
#[doc = include_str!("../EXTENSIONS.md")]
pub mod extensions {}

/// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
