//! The crate's one public error type.

use std::fmt;
use std::io;
use std::time::Duration;

/// The flags of the not-ok reply this crate sends when it refuses a request
/// for load, not for what it asks: a server at its connection limit, or a
/// connection whose outgoing queue is at its budget. The request was not
/// run, and may be sent again later; see [`Error::is_busy`].
pub const BUSY_FLAGS: u64 = u64::MAX;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong on a packet connection.
///
/// A request that the peer answered "not ok" is an `Err` too
/// ([`Error::Failed`]), so that `?` works at call sites.
///
/// A request ends in exactly one of these ways, which say whether the peer
/// may have acted on it:
///
/// | outcome | sent? | the peer may have acted on it |
/// |---|---|---|
/// | `Ok(Response)`, [`Error::Failed`], [`Error::ResponseTooLarge`] | yes | yes: it answered |
/// | [`Error::ConnectionLost`] | yes, or partly | maybe |
/// | [`Error::Unsent`] | no: the connection ended first | no |
/// | [`Error::Closed`], [`Error::WouldBlock`], [`Error::TooLarge`], [`Error::ReservedChannel`] | no: refused by `submit` | no |
/// | [`Error::Timeout`] from a wait | yes; still pending, unless it was the request's own deadline ([`submit_timeout`](crate::PacketConnection::submit_timeout)): then it is given up | maybe |
///
/// [`Error::was_sent`] tells the two groups apart, which is what a retry
/// needs.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on the underlying stream. Returned once, from
    /// [`join`](crate::PacketConnection::join) or
    /// [`close`](crate::PacketConnection::close); waiting callers see
    /// [`Error::ConnectionLost`] instead.
    #[error("i/o error on packet stream: {0}")]
    Io(#[from] io::Error),
    /// The peer sent bytes that are not a valid packet, or a packet this end
    /// cannot accept. The connection's receive side ends; `close` or `join`
    /// returns this.
    #[error("malformed packet: {reason}")]
    Malformed {
        /// What was wrong, in a few words.
        reason: &'static str,
    },
    /// A packet is longer than the configured maximum, checked before any
    /// buffer is allocated. Per request: `submit` refuses an oversize
    /// request, and nothing is sent. Per connection: `close` or `join`
    /// returns it when the peer announced an oversize packet that could not
    /// be skipped.
    #[error("packet of {len} bytes exceeds limit of {max}")]
    TooLarge {
        /// The length of the packet, length prefix excluded.
        len: u64,
        /// The limit in force.
        max: u64,
    },
    /// The peer's response to the request is longer than the configured
    /// maximum: it was read past and dropped, and only this request fails.
    #[error("response of {len} bytes exceeds limit of {max}")]
    ResponseTooLarge {
        /// The length of the response packet, length prefix excluded.
        len: u64,
        /// The limit in force.
        max: u64,
    },
    /// The peer answered the request with a "not ok" response.
    #[error("request {channel}:{tag} failed remotely (flags {flags:#x}): {}", reason_text(.payload))]
    Failed {
        /// The request's channel.
        channel: u64,
        /// The request's tag.
        tag: u64,
        /// The flags of the response, the ok bit removed.
        flags: u64,
        /// The response payload: by convention a short UTF-8 reason.
        payload: Vec<u8>,
    },
    /// The connection ended after the request was written (or taken by a
    /// write that never finished, which may have sent part of it, or
    /// none), before its response arrived: the peer may or may not have
    /// acted on it. The [`Disconnect`] says how the connection ended.
    #[error("connection lost before a response arrived: {0}")]
    ConnectionLost(Disconnect),
    /// The connection ended before the request was written: the peer never
    /// saw it, so it is safe to send again elsewhere.
    #[error("request not sent, connection ended: {0}")]
    Unsent(Disconnect),
    /// `submit` refused the request, and nothing was sent: this end has
    /// ended its requests (`end_requests`, `close`, `abort`, or a peer's
    /// EOF), or the connection has ended.
    #[error("connection is not accepting new requests")]
    Closed,
    /// A bounded wait ran out of time. For a request
    /// ([`PendingResponse::wait_timeout`](crate::PendingResponse::wait_timeout),
    /// [`call_timeout`](crate::PacketConnection::call_timeout)) it names the
    /// request.
    #[error("{}", timeout_text(.request.as_ref(), .waited))]
    Timeout {
        /// The request that timed out, if the wait was for one.
        request: Option<RequestId>,
        /// How long the wait lasted; for a request with its own deadline
        /// ([`submit_timeout`](crate::PacketConnection::submit_timeout)),
        /// since it was submitted.
        waited: Duration,
    },
    /// The outgoing queue was full, and the request could not wait for
    /// room: [`try_submit`](crate::PacketConnection::try_submit) and
    /// [`try_submit_on`](crate::PacketConnection::try_submit_on); a
    /// [`submit_timeout`](crate::PacketConnection::submit_timeout) or
    /// [`call_timeout`](crate::PacketConnection::call_timeout) whose deadline
    /// came first; a `submit` from an
    /// [inline handler](crate::Config::inline_handler). Nothing was sent.
    #[error("outgoing queue is full")]
    WouldBlock,
    /// The response was already taken from this
    /// [`PendingResponse`](crate::PendingResponse), by an earlier
    /// `wait_timeout` or `try_wait`.
    #[error("response already taken")]
    ResponseTaken,
    /// The channel is reserved for the connection's own control requests
    /// ([`CONTROL_CHANNEL`](crate::CONTROL_CHANNEL)); nothing was sent.
    #[error("channel {0} is reserved for the connection's control requests")]
    ReservedChannel(u64),
    /// A payload could not be decoded: an ok response into the type asked
    /// for, or a payload read with [`PayloadReader`](crate::PayloadReader)
    /// that is truncated or invalid. The text says what and where.
    #[error("cannot decode payload: {0}")]
    Decode(String),
}

/// Which request an [`Error::Timeout`] was waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId {
    /// The request's channel.
    pub channel: u64,
    /// The request's tag.
    pub tag: u64,
    /// The request's type.
    pub rq_type: u64,
}

fn timeout_text(request: Option<&RequestId>, waited: &Duration) -> String {
    match request {
        Some(RequestId {
            channel,
            tag,
            rq_type,
        }) => format!("request {channel}:{tag} (rq_type {rq_type}) timed out after {waited:?}"),
        None => format!("timed out after {waited:?}"),
    }
}

/// How a connection ended: given to every request it took with it
/// ([`Error::ConnectionLost`], [`Error::Unsent`]), to the
/// [`on_end`](crate::Config::on_end) hook, and by
/// [`PacketConnection::status`](crate::PacketConnection::status). `Copy`, so
/// that every waiter gets its own.
///
/// # Examples
///
/// A peer that goes away without its EOF:
///
/// ```
/// # use std::os::unix::net::UnixStream;
/// # use std::sync::{mpsc, Mutex};
/// # use std::time::Duration;
/// # use packetstream::{Config, Disconnect, Error, PacketConnection, Request};
/// let (a, b) = UnixStream::pair()?;
/// let (started_tx, started) = mpsc::channel::<()>();
/// let (release, held) = mpsc::channel::<()>();
/// let (started_tx, held) = (Mutex::new(started_tx), Mutex::new(held));
/// let server = PacketConnection::from_unix_stream(
///     b,
///     Config::default().handler(move |_: Request| {
///         // Say the request has arrived, then hold it until released.
///         let _ = started_tx.lock().unwrap().send(());
///         let _ = held.lock().unwrap().recv_timeout(Duration::from_secs(10));
///         Ok(().into())
///     }),
/// )?;
/// let (ended_tx, ended) = mpsc::channel();
/// let ended_tx = Mutex::new(ended_tx);
/// let client = PacketConnection::from_unix_stream(
///     a,
///     Config::default().on_end(move |why| {
///         let _ = ended_tx.lock().unwrap().send(why);
///     }),
/// )?;
/// let pending = client.submit(1, 0, b"")?;
/// started.recv_timeout(Duration::from_secs(10)).expect("request reached the handler");
///
/// server.abort(); // the server goes away without answering or its EOF
/// match pending.wait_timeout(Duration::from_secs(10)) {
///     Err(err @ Error::ConnectionLost(Disconnect::StreamEnded)) => assert!(err.was_sent()),
///     other => panic!("expected a lost connection, got {other:?}"),
/// }
/// assert_eq!(ended.recv_timeout(Duration::from_secs(10)), Ok(Disconnect::StreamEnded));
/// assert!(matches!(client.submit(1, 0, b""), Err(Error::Closed)));
/// assert!(matches!(
///     client.close(),
///     Err(Error::ConnectionLost(Disconnect::StreamEnded))
/// ));
/// drop(release);
/// assert!(server.join().is_err()); // it was aborted
/// # Ok::<(), packetstream::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Disconnect {
    /// The peer sent its EOF packet: the orderly end.
    PeerEof,
    /// The stream ended without the peer's EOF packet: the peer crashed,
    /// was killed, exited without closing, or never spoke. A read or write
    /// that finds the peer's side closed (a broken pipe, a reset
    /// connection) means the same, whichever side notices first.
    StreamEnded,
    /// The peer sent a malformed, truncated or oversize packet.
    Protocol,
    /// Reading or writing the stream failed with this kind of error, other
    /// than finding the peer's side closed.
    Io(io::ErrorKind),
    /// This end aborted the connection (`abort`, or a `close_timeout` or
    /// server stop that ran out of time).
    Local,
    /// The peer announced a packet and then sent nothing more of it for
    /// longer than [`Config::packet_timeout`](crate::Config::packet_timeout).
    Silent,
    /// Nothing came from the peer, and no request was pending either way,
    /// for longer than [`Config::idle_timeout`](crate::Config::idle_timeout).
    Idle,
    /// Nothing came from the peer, not even the answer to a ping, for twice
    /// [`Config::keepalive`](crate::Config::keepalive).
    NoAnswer,
    /// What this end had to send made no progress for longer than
    /// [`Config::stall_timeout`](crate::Config::stall_timeout), or the
    /// replies owed to the peer passed four times
    /// [`Config::max_queued_bytes`](crate::Config::max_queued_bytes): the
    /// peer stopped reading.
    Stalled,
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disconnect::PeerEof => f.write_str("peer sent EOF"),
            Disconnect::StreamEnded => f.write_str("stream ended without EOF"),
            Disconnect::Protocol => f.write_str("protocol error from peer"),
            Disconnect::Io(kind) => write!(f, "i/o error: {kind}"),
            Disconnect::Local => f.write_str("aborted locally"),
            Disconnect::Silent => f.write_str("peer went silent inside a packet"),
            Disconnect::Idle => f.write_str("idle for too long"),
            Disconnect::NoAnswer => f.write_str("peer answered no ping"),
            Disconnect::Stalled => f.write_str("peer stopped reading"),
        }
    }
}

/// The error a read or write returns when one of the connection's own
/// timeouts ends it: carried inside an `io::Error` of kind `TimedOut`, so
/// that the connection can tell it from the stream's own errors.
#[derive(Debug)]
pub(crate) struct Expired(pub(crate) Disconnect);

impl fmt::Display for Expired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Expired {}

impl Expired {
    pub(crate) fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, self)
    }

    /// The reason inside `e`, if it is one of these.
    pub(crate) fn of(e: &io::Error) -> Option<Disconnect> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Expired>())
            .map(|expired| expired.0)
    }
}

fn reason_text(payload: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&payload[..payload.len().min(MAX)]);
    if payload.len() > MAX {
        format!("{text}...")
    } else {
        text.into_owned()
    }
}

impl Error {
    /// The failure reason of a [`Error::Failed`] as text, lossily decoded.
    /// `None` for any other variant.
    pub fn failure_reason(&self) -> Option<String> {
        match self {
            Error::Failed { payload, .. } => Some(String::from_utf8_lossy(payload).into_owned()),
            _ => None,
        }
    }

    /// True if this is [`Error::ConnectionLost`], [`Error::Unsent`] or
    /// [`Error::Closed`]: the connection is gone and retrying on it is
    /// pointless.
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            Error::ConnectionLost(_) | Error::Unsent(_) | Error::Closed
        )
    }

    /// True if the peer refused the request for load, not for what it asked:
    /// a not-ok reply with [`BUSY_FLAGS`](crate::BUSY_FLAGS), such as a
    /// server's "server full". The request was not run; it may be sent
    /// again later.
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Failed { flags, .. } if *flags == BUSY_FLAGS)
    }

    /// True if this is [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// False if the request this error ended was certainly never written to
    /// the stream ([`Error::Unsent`], [`Error::Closed`],
    /// [`Error::WouldBlock`], [`Error::TooLarge`]), so the peer never saw it
    /// and sending it again elsewhere is safe. True when the peer may have
    /// acted on it.
    pub fn was_sent(&self) -> bool {
        !matches!(
            self,
            Error::Unsent(_)
                | Error::Closed
                | Error::WouldBlock
                | Error::TooLarge { .. }
                | Error::ReservedChannel(_)
        )
    }
}

// Hand-written so that large payloads are not dumped into logs.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => f.debug_tuple("Io").field(e).finish(),
            Error::Malformed { reason } => {
                f.debug_struct("Malformed").field("reason", reason).finish()
            }
            Error::ResponseTooLarge { len, max } => f
                .debug_struct("ResponseTooLarge")
                .field("len", len)
                .field("max", max)
                .finish(),
            Error::TooLarge { len, max } => f
                .debug_struct("TooLarge")
                .field("len", len)
                .field("max", max)
                .finish(),
            Error::Failed {
                channel,
                tag,
                flags,
                payload,
            } => f
                .debug_struct("Failed")
                .field("channel", channel)
                .field("tag", tag)
                .field("flags", flags)
                .field("payload", &reason_text(payload))
                .finish(),
            Error::ConnectionLost(why) => f.debug_tuple("ConnectionLost").field(why).finish(),
            Error::Unsent(why) => f.debug_tuple("Unsent").field(why).finish(),
            Error::Closed => f.write_str("Closed"),
            Error::Timeout { request, waited } => f
                .debug_struct("Timeout")
                .field("request", request)
                .field("waited", waited)
                .finish(),
            Error::WouldBlock => f.write_str("WouldBlock"),
            Error::ResponseTaken => f.write_str("ResponseTaken"),
            Error::ReservedChannel(channel) => {
                f.debug_tuple("ReservedChannel").field(channel).finish()
            }
            Error::Decode(msg) => f.debug_tuple("Decode").field(msg).finish(),
        }
    }
}

impl From<Error> for io::Error {
    /// Turns an [`Error`] into an `io::Error`, unwrapping [`Error::Io`].
    fn from(err: Error) -> io::Error {
        match err {
            Error::Io(e) => e,
            Error::Timeout { .. } => io::Error::new(io::ErrorKind::TimedOut, err),
            Error::WouldBlock => io::Error::new(io::ErrorKind::WouldBlock, err),
            Error::ConnectionLost(_) | Error::Unsent(_) | Error::Closed => {
                io::Error::new(io::ErrorKind::NotConnected, err)
            }
            other => io::Error::other(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_sync_and_small() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Error>();
        assert!(
            std::mem::size_of::<Error>() <= 56,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn failed_display_shows_reason_and_debug_elides_payload() {
        let err = Error::Failed {
            channel: 0,
            tag: 7,
            flags: 0,
            payload: vec![b'x'; 1000],
        };
        let shown = err.to_string();
        assert!(shown.starts_with("request 0:7 failed remotely (flags 0x0): xxx"));
        assert!(shown.ends_with("..."));
        assert!(format!("{err:?}").len() < 300);
        assert_eq!(err.failure_reason().unwrap().len(), 1000);
    }

    #[test]
    fn into_io_error_unwraps_io() {
        let err = Error::Io(io::Error::new(io::ErrorKind::BrokenPipe, "x"));
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::BrokenPipe);
        let err = Error::ConnectionLost(Disconnect::PeerEof);
        assert_eq!(io::Error::from(err).kind(), io::ErrorKind::NotConnected);
    }
}
