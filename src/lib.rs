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
//! # Typed protocols and servers
//!
//! Above raw `(rq_type, flags, payload)` requests sits a typed layer, after
//! the reference's `BaseRequest` and `HasPacketConnection`: a protocol is a
//! set of [`RequestType`]s, each with its `rq_type`, its [`Payload`]
//! encoding (BSUInt, BSData, BSString and fixed-width fields through
//! [`PayloadWrite`] and [`PayloadReader`]) and its response type. A
//! [`Dispatcher`] serves them through [`Fulfil::fulfil`], and
//! [`PacketConnection::request`] calls them. [`Server`] accepts clients on
//! a TCP or Unix listener, one connection each with a shared handler, and
//! [`PacketConnection::connect_tcp`] connects to one. The `blockstore`
//! example is a content-addressed block store built this way.
//!
//! Enable `log` at `trace` level for `packetstream` to see every packet.

mod codec;
mod connection;
mod error;
mod handler;
mod packet;
mod pending;
mod protocol;
mod receiver;
mod sender;
mod server;
mod stats;
mod transport;

pub use crate::codec::{Payload, PayloadReader, PayloadWrite};
pub use crate::connection::{Config, FromResponse, OnClose, PacketConnection, PendingResponse};
pub use crate::error::{Disconnect, Error, Result};
pub use crate::handler::{Failure, HandlerError, HandlerResult, Reply, Request, RequestHandler};
pub use crate::packet::{Kind, Packet, DEFAULT_MAX_PACKET_LEN, MAX_VARINT_LEN};
pub use crate::pending::Response;
pub use crate::protocol::{Dispatcher, Fulfil, PendingRequest, RequestType};
pub use crate::server::{Server, ServerConfig};
pub use crate::stats::Stats;
pub use byteorder::{BigEndian, ByteOrder, LittleEndian};

/// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
