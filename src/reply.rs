//! The reply shapes, in one place: what a handler returns ([`Reply`], or
//! [`Failure`] as its error), and what a caller decodes a response into
//! ([`Response`], [`FromResponse`]). `Reply`'s doc has the table of shapes.

use std::error::Error as StdError;
use std::fmt;

use crate::error::{Error, Result};

/// A successful ("ok") response.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Response {
    /// The response flags, the ok bit removed.
    pub flags: u64,
    /// The response payload.
    pub payload: Vec<u8>,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("flags", &self.flags)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// A successful reply: the flags and payload of an ok response.
///
/// Each shape converts the same way both ways: into a `Reply` with `From`,
/// for a handler to return, and out of a [`Response`] with
/// [`FromResponse`], for a caller to decode. They follow the reply shapes
/// of the reference implementation:
///
/// | shape | a handler's `Reply::from` sends | `FromResponse` takes |
/// |---|---|---|
/// | `()` | flags 0, no payload | anything, ignored |
/// | `u64` | flags = the value, no payload | the flags (any payload ignored) |
/// | `bool` | flags 1 or 0, no payload | flags 1 or 0 with no payload |
/// | `Vec<u8>` (and `&[u8]` to send) | flags 0, the bytes | the payload (the flags ignored) |
/// | `String` (and `&str` to send) | flags 0, the text as UTF-8 | the payload, which must be UTF-8 (the flags ignored) |
/// | `(u64, Vec<u8>)` | the flags and the bytes | the flags and the payload |
/// | `Option<Vec<u8>>` | `Some`: flags 1 and the bytes; `None`: flags 0 | flags 1 is `Some`; flags 0 with no payload is `None` |
/// | [`Response`] | | the flags and payload as they came |
/// | [`Failure`], as the handler's error | a not-ok reply with its flags and payload | (the caller gets [`Error::Failed`]) |
///
/// A response that lacks what the shape takes (text that is not UTF-8, a
/// `bool` or `Option` whose flags are neither 0 nor 1, or with a payload
/// where there must be none) is [`Error::Decode`]; what a shape does not
/// take, it ignores, as the table says: a `u64` read of a response that
/// also has a payload is its flags. Ask for `(u64, Vec<u8>)` or
/// [`Response`] to see everything. The typed layer adds one shape per
/// [`Payload`](crate::Payload) type, with [`impl_payload!`](crate::impl_payload).
///
/// # Examples
///
/// ```
/// use packetstream::Reply;
///
/// assert_eq!(Reply::from(()), Reply { flags: 0, payload: vec![] });
/// assert_eq!(Reply::from(7u64), Reply { flags: 7, payload: vec![] });
/// assert_eq!(Reply::from("hi"), Reply { flags: 0, payload: b"hi".to_vec() });
/// assert_eq!(Reply::from((3u64, vec![1u8])), Reply { flags: 3, payload: vec![1] });
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// The response flags.
    pub flags: u64,
    /// The response payload.
    pub payload: Vec<u8>,
}

impl Reply {
    /// A reply carrying `payload` and flags 0.
    pub fn payload(payload: impl Into<Vec<u8>>) -> Reply {
        Reply {
            flags: 0,
            payload: payload.into(),
        }
    }
}

impl From<()> for Reply {
    fn from((): ()) -> Reply {
        Reply::default()
    }
}

impl From<u64> for Reply {
    fn from(flags: u64) -> Reply {
        Reply {
            flags,
            payload: Vec::new(),
        }
    }
}

impl From<Vec<u8>> for Reply {
    fn from(payload: Vec<u8>) -> Reply {
        Reply::payload(payload)
    }
}

impl From<&[u8]> for Reply {
    fn from(payload: &[u8]) -> Reply {
        Reply::payload(payload)
    }
}

impl From<String> for Reply {
    fn from(text: String) -> Reply {
        Reply::payload(text)
    }
}

impl From<&str> for Reply {
    fn from(text: &str) -> Reply {
        Reply::payload(text)
    }
}

impl From<(u64, Vec<u8>)> for Reply {
    fn from((flags, payload): (u64, Vec<u8>)) -> Reply {
        Reply { flags, payload }
    }
}

/// A failure with chosen flags and payload. A handler that returns it as its
/// error sends exactly these in its not-ok response; any other error is sent
/// as flags 0 and its text.
///
/// # Examples
///
/// ```
/// use packetstream::{Failure, HandlerResult, Request};
///
/// fn handler(rq: Request) -> HandlerResult {
///     if rq.payload.is_empty() {
///         return Err(Failure::new(404, "empty key").into());
///     }
///     Ok(rq.payload.into())
/// }
/// # let _ = handler;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The flags of the not-ok response.
    pub flags: u64,
    /// The payload of the not-ok response.
    pub payload: Vec<u8>,
}

impl Failure {
    /// A failure with these flags and payload.
    pub fn new(flags: u64, payload: impl Into<Vec<u8>>) -> Failure {
        Failure {
            flags,
            payload: payload.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "failure (flags {:#x}): {}",
            self.flags,
            String::from_utf8_lossy(&self.payload)
        )
    }
}

impl StdError for Failure {}

/// Types an ok [`Response`] decodes into, for
/// [`call_as`](crate::PacketConnection::call_as) and
/// [`wait_as`](crate::PendingResponse::wait_as). The impls mirror the reply shapes
/// of [`Reply`], whose doc has the table.
pub trait FromResponse: Sized {
    /// Decodes the response.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if the response does not have this shape.
    fn from_response(rsp: Response) -> Result<Self>;
}

impl FromResponse for Response {
    fn from_response(rsp: Response) -> Result<Self> {
        Ok(rsp)
    }
}

/// Ignores the response.
impl FromResponse for () {
    fn from_response(_: Response) -> Result<Self> {
        Ok(())
    }
}

/// The flags.
impl FromResponse for u64 {
    fn from_response(rsp: Response) -> Result<Self> {
        Ok(rsp.flags)
    }
}

/// The payload.
impl FromResponse for Vec<u8> {
    fn from_response(rsp: Response) -> Result<Self> {
        Ok(rsp.payload)
    }
}

/// The payload as UTF-8 text.
impl FromResponse for String {
    fn from_response(rsp: Response) -> Result<Self> {
        String::from_utf8(rsp.payload).map_err(|e| Error::Decode(e.to_string()))
    }
}

/// The flags and the payload.
impl FromResponse for (u64, Vec<u8>) {
    fn from_response(rsp: Response) -> Result<Self> {
        Ok((rsp.flags, rsp.payload))
    }
}

/// Flags 1 for `true`, 0 for `false`, with an empty payload.
impl From<bool> for Reply {
    fn from(value: bool) -> Reply {
        Reply::from(u64::from(value))
    }
}

/// Flags 1 is `true`, flags 0 is `false`.
impl FromResponse for bool {
    fn from_response(rsp: Response) -> Result<Self> {
        match (rsp.flags, rsp.payload.is_empty()) {
            (0, true) => Ok(false),
            (1, true) => Ok(true),
            (flags, _) => Err(Error::Decode(format!(
                "expected flags 0 or 1 and no payload for a bool, got flags {flags:#x} and {} bytes",
                rsp.payload.len()
            ))),
        }
    }
}

/// `Some(bytes)` is flags 1 and the bytes; `None` is flags 0 and no
/// payload.
impl From<Option<Vec<u8>>> for Reply {
    fn from(value: Option<Vec<u8>>) -> Reply {
        match value {
            Some(payload) => Reply { flags: 1, payload },
            None => Reply::default(),
        }
    }
}

/// Flags 1 is `Some(payload)`; flags 0 with no payload is `None`.
impl FromResponse for Option<Vec<u8>> {
    fn from_response(rsp: Response) -> Result<Self> {
        match rsp.flags {
            1 => Ok(Some(rsp.payload)),
            0 if rsp.payload.is_empty() => Ok(None),
            flags => Err(Error::Decode(format!(
                "expected flags 1 and data, or flags 0 and nothing, got flags {flags:#x} and {} bytes",
                rsp.payload.len()
            ))),
        }
    }
}
