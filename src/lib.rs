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
//! the API small and the dependencies few. Before you start:
//!
//! - It runs on Unix only, for now: it uses `std::os::unix` (file
//!   descriptors, Unix sockets, shutting a socket down to unblock a read).
//! - [`PacketConnection`] is `Send + Sync`: share one between threads with
//!   an `Arc`, and call it from all of them at once. So are [`Server`] and
//!   [`PendingResponse`].
//! - The crate has no `unsafe` code (`#![forbid(unsafe_code)]`).
//! - `byteorder` 1 is a public dependency: its [`ByteOrder`],
//!   [`BigEndian`] and [`LittleEndian`] are re-exported, for the typed
//!   payloads' fixed-width numbers.
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
//! The handler serves the peer's requests: a closure
//! `Fn(Request) -> HandlerResult`, or a type implementing
//! [`RequestHandler`], given in [`Config::handler`]. It runs on a pool of
//! handler threads, several requests at once, so it takes `&self`.
//! `Ok(reply)` sends an ok response, in one of the shapes of [`Reply`];
//! `Err(e)` a not-ok one with `e`'s text, or a [`Failure`]'s own flags and
//! payload; a panic is caught and sent as a not-ok response. An end without
//! a handler refuses every request. [`RequestHandler`] says what a handler
//! may and must not do (such as wait on its own connection).
//!
//! # Channels
//!
//! Every request travels on a channel, a number; 0 is the default.
//! [`call_on`](PacketConnection::call_on) and
//! [`submit_on`](PacketConnection::submit_on) pick another; each channel has
//! its own tags, and the handler sees it in [`Request::channel`]. The Python
//! reference serves channel 0 only.
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
//! | [`Error::ReservedChannel`] | `submit_on` the extensions' control channel | `channel N is reserved for the connection's control requests` |
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
//! | `Silent`, `Idle`, `Stalled`, `NoAnswer`: a liveness timeout ran out ([`Config::packet_timeout`], [`Config::idle_timeout`], [`Config::stall_timeout`], [`Config::keepalive`]) | `peer went silent inside a packet`, ... | `Err(ConnectionLost(..))` |
//!
//! [`Disconnect`] has an example of a peer that vanishes.
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
//! [`Stats`] snapshot at any time, from any thread, and
//! [`PacketConnection::status`] says how far the connection is from its
//! end; the `progress` example draws a live line from the stats. The
//! [`log`] crate gets connection events at `debug`, every packet at
//! `trace`, lost requests and refusals at `warn`, broken streams at
//! `error`.
//!
//! # Threads
//!
//! Each connection runs a receive thread (`{name}:recv`), which reads and
//! never blocks in a write; a send thread (`{name}:send`), which writes the
//! outgoing queue once its oldest byte has waited the packet grace
//! ([`Config::packet_grace`], 10 ms), so that bursts go out in few writes;
//! and a pool of handler threads (`{name}:handler{idx}`), unless its handler
//! is [inline](Config::inline_handler) or it belongs to a [`Server`], whose
//! connections share one pool and take turns on it. A caller that waits
//! without a deadline may write the queue, and on a socket read its own
//! response, itself; calls with a deadline and the `try_*` calls never
//! read or write, so they return in time whatever the peer does. One more
//! thread serves the whole process, `ps:lease-keeper`: it takes lent
//! readers back and keeps the read timeouts ([`Config::packet_timeout`],
//! [`Config::idle_timeout`], [`Config::keepalive`]), and it ends a second
//! after it has nothing left to watch.
//! ARCHITECTURE.md in the repository has the details: who reads and
//! writes, the locks, the flush policy and the shutdown order.
//!
//! # Wire compatibility
//!
//! The bytes on the wire are those of `cs.packetstream` 20240630, and the
//! interop tests run this crate against the Python package both ways.
//! [`Packet`] has the format, byte by byte, and encodes and decodes single
//! packets.
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
//! A Rust program and a Python program using the reference talk over a
//! child's pipes, either one the parent: `examples/python_child.rs` starts
//! `python/word_child.py`, and `python/rust_parent.py` starts
//! `examples/rust_child.rs`. The guide [`talking_to_python`] has both pairs
//! in full, how to install the reference with its pins, the one rule for a
//! Python child (take the packet stream off standard output first), how
//! failures map each way, and what the reference cannot do.
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

#![forbid(unsafe_code)]

#[macro_use]
mod logging;

mod codec;
mod config;
mod connection;
mod error;
mod ext;
mod handler;
mod inbox;
mod keeper;
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
mod tags;
mod transport;
mod varint;

pub use crate::codec::{
    BSData, BSSFloat, BSString, BSUInt, BinaryUTF8NUL, Encoding, Float64BE, Float64LE, Int16BE,
    Int16LE, Int32BE, Int32LE, Payload, PayloadReader, PayloadWrite, UInt16BE, UInt16LE, UInt32BE,
    UInt32LE, UInt64BE, UInt64LE, UInt8,
};
pub use crate::config::Config;
pub use crate::connection::{OnClose, PacketConnection, PendingResponse};
pub use crate::error::{Disconnect, Error, RequestId, Result, BUSY_FLAGS};
pub use crate::ext::CONTROL_CHANNEL;
pub use crate::handler::{HandlerError, HandlerResult, Request, RequestHandler};
pub use crate::packet::{Packet, PacketKind, DEFAULT_MAX_PACKET_LEN};
pub use crate::protocol::{Dispatcher, Fulfil, PendingRequest, RequestType};
pub use crate::reply::{Failure, FromResponse, Reply, Response};
pub use crate::server::{Client, ClientInfo, PeerAddr, Server, ServerConfig};
pub use crate::shared::Status;
pub use crate::stats::Stats;
pub use crate::varint::MAX_VARINT_LEN;
pub use byteorder::{BigEndian, ByteOrder, LittleEndian};

// What the crate doc promises: the handles can be shared between threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PacketConnection>();
    send_sync::<PendingResponse>();
    send_sync::<Server>();
    send_sync::<Error>();
};

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
