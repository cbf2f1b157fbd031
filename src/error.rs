//! The crate's one public error type.

use std::fmt;
use std::io;

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong on a packet connection.
///
/// A request that the peer answered "not ok" is an `Err` too
/// ([`Error::Failed`]), so that `?` works at call sites.
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
    /// cannot accept. The connection's receive side ends.
    #[error("malformed packet: {reason}")]
    Malformed {
        /// What was wrong, in a few words.
        reason: &'static str,
    },
    /// A packet is longer than the configured maximum, checked before any
    /// buffer is allocated. Returned by `submit` for an oversize payload, and
    /// by `join` when the peer announced an oversize packet it then failed to
    /// send.
    #[error("packet of {len} bytes exceeds limit of {max}")]
    TooLarge {
        /// The length of the packet, length prefix excluded.
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
    /// The connection ended before a response arrived.
    #[error("connection lost before a response arrived: {0}")]
    ConnectionLost(Disconnect),
    /// The connection does not accept new requests: `end_requests`, `close`
    /// or `abort` was called, or the connection has ended.
    #[error("connection is not accepting new requests")]
    Closed,
    /// A bounded wait ran out of time. For
    /// [`PendingResponse::wait_timeout`](crate::PendingResponse::wait_timeout)
    /// the request is still pending and can be waited on again.
    #[error("timed out")]
    Timeout,
    /// [`try_submit`](crate::PacketConnection::try_submit) or
    /// [`try_submit_on`](crate::PacketConnection::try_submit_on) found the
    /// outgoing queue full.
    #[error("outgoing queue is full")]
    WouldBlock,
    /// The request was cancelled locally with
    /// [`PendingResponse::cancel`](crate::PendingResponse::cancel), or its
    /// response was already taken.
    #[error("request was cancelled or its response already taken")]
    Cancelled,
    /// A payload could not be decoded: an ok response into the type asked
    /// for, or a payload read with [`PayloadReader`](crate::PayloadReader)
    /// that is truncated or invalid. The text says what and where.
    #[error("cannot decode payload: {0}")]
    Decode(String),
}

/// Why a connection ended, as reported to callers whose requests it took
/// with it. `Copy`, so that every waiter gets its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disconnect {
    /// The peer sent its EOF packet, or closed the stream between packets.
    PeerEof,
    /// The peer sent a malformed, truncated or oversize packet.
    Protocol,
    /// Reading or writing the stream failed with this kind of error.
    Io(io::ErrorKind),
    /// This end closed the connection, or aborted it.
    Local,
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disconnect::PeerEof => f.write_str("peer sent EOF"),
            Disconnect::Protocol => f.write_str("protocol error from peer"),
            Disconnect::Io(kind) => write!(f, "i/o error: {kind}"),
            Disconnect::Local => f.write_str("closed locally"),
        }
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

    /// True if this is [`Error::ConnectionLost`] or [`Error::Closed`]: the
    /// connection is gone and retrying on it is pointless.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, Error::ConnectionLost(_) | Error::Closed)
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
            Error::Closed => f.write_str("Closed"),
            Error::Timeout => f.write_str("Timeout"),
            Error::WouldBlock => f.write_str("WouldBlock"),
            Error::Cancelled => f.write_str("Cancelled"),
            Error::Decode(msg) => f.debug_tuple("Decode").field(msg).finish(),
        }
    }
}

impl From<Error> for io::Error {
    /// Turns an [`Error`] into an `io::Error`, unwrapping [`Error::Io`].
    fn from(err: Error) -> io::Error {
        match err {
            Error::Io(e) => e,
            Error::Timeout => io::Error::new(io::ErrorKind::TimedOut, err),
            Error::WouldBlock => io::Error::new(io::ErrorKind::WouldBlock, err),
            Error::ConnectionLost(_) | Error::Closed => {
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
