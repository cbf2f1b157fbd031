//! Request handlers: what a handler receives and returns, and running one.

use std::error::Error as StdError;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::inbox::Inbox;
use crate::reply::{Failure, Reply};
use crate::sync::contained;

/// A request from the peer, as a handler receives it.
///
/// With [extensions](crate::Config::extensions) on both ends, the peer can
/// cancel it and give it a deadline: a long handler polls
/// [`is_cancelled`](Request::is_cancelled), or blocks in
/// [`wait_cancelled`](Request::wait_cancelled), and reads
/// [`time_left`](Request::time_left).
#[derive(Clone)]
pub struct Request {
    /// The channel the request came on.
    pub channel: u64,
    /// The peer's tag for it; the reply goes out under the same tag.
    pub tag: u64,
    /// The application's request type.
    pub rq_type: u64,
    /// The request flags.
    pub flags: u64,
    /// The request payload.
    pub payload: Vec<u8>,
    /// Where the peer's cancel and deadline for it are found.
    pub(crate) ctx: Option<RequestCtx>,
}

/// A request's link to its connection's cancels, and its deadline.
#[derive(Clone)]
pub(crate) struct RequestCtx {
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) deadline: Option<Instant>,
}

impl PartialEq for Request {
    fn eq(&self, other: &Request) -> bool {
        (
            self.channel,
            self.tag,
            self.rq_type,
            self.flags,
            &self.payload,
        ) == (
            other.channel,
            other.tag,
            other.rq_type,
            other.flags,
            &other.payload,
        )
    }
}

impl Eq for Request {}

impl Request {
    /// A request as a handler would receive it, with no cancel and no
    /// deadline: for testing a handler by calling it.
    pub fn new(channel: u64, tag: u64, rq_type: u64, flags: u64, payload: Vec<u8>) -> Request {
        Request {
            channel,
            tag,
            rq_type,
            flags,
            payload,
            ctx: None,
        }
    }

    /// True if the peer has cancelled this request, or its answer can no
    /// longer reach the peer: this end aborted, or the stream broke (the
    /// peer crashed, or its end was cut). The first needs
    /// [extensions](crate::Config::extensions) on both ends; the second
    /// holds with them on at this end.
    pub fn is_cancelled(&self) -> bool {
        self.ctx
            .as_ref()
            .is_some_and(|ctx| ctx.inbox.is_cancelled(self.channel, self.tag))
    }

    /// Waits until the peer cancels this request, or its answer can no
    /// longer reach the peer (see [`is_cancelled`](Request::is_cancelled)),
    /// or `timeout` passes; returns true for either of the first two. A
    /// handler that works in steps, or waits on something else, uses it in
    /// place of a sleep. Without extensions at this end it waits out the
    /// timeout. A `timeout` too long for an `Instant` means no limit.
    pub fn wait_cancelled(&self, timeout: Duration) -> bool {
        let deadline = crate::sync::deadline_after(timeout);
        match &self.ctx {
            Some(ctx) => ctx.inbox.wait_cancelled(self.channel, self.tag, deadline),
            None => {
                std::thread::sleep(timeout);
                false
            }
        }
    }

    /// The deadline the peer gave this request, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.ctx.as_ref().and_then(|ctx| ctx.deadline)
    }

    /// The time left before the peer's deadline, if it gave one: zero once
    /// it has passed.
    pub fn time_left(&self) -> Option<Duration> {
        self.deadline()
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("channel", &self.channel)
            .field("tag", &self.tag)
            .field("rq_type", &self.rq_type)
            .field("flags", &self.flags)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// The error type handlers return: anything that can be turned into a boxed
/// error, so `?` works on most errors and `"text".into()` makes one.
pub type HandlerError = Box<dyn StdError + Send + Sync>;

/// What a handler returns.
pub type HandlerResult = Result<Reply, HandlerError>;

/// Serves the peer's requests.
///
/// Implemented for every `Fn(Request) -> HandlerResult + Send + Sync`
/// closure. The handler runs on the connection's handler pool, several
/// requests at once, so it takes `&self`.
///
/// - `Ok(reply)` sends an ok response.
/// - `Err(e)` sends a not-ok response: flags 0 and `e`'s text as UTF-8, or
///   exactly the flags and payload of a [`Failure`].
/// - A panic sends a not-ok response saying so; the connection goes on.
///
/// # Examples
///
/// ```
/// use packetstream::{HandlerResult, Request, RequestHandler};
///
/// struct Upper;
///
/// impl RequestHandler for Upper {
///     fn handle(&self, rq: Request) -> HandlerResult {
///         let text = String::from_utf8(rq.payload)?;
///         Ok(text.to_uppercase().into())
///     }
/// }
/// # let _ = Upper;
/// ```
///
/// # What a handler may do
///
/// - Take its time: a slow handler holds one handler thread, and the others
///   go on serving. A request never waits behind a busy handler while
///   another handler thread sleeps.
/// - Make requests of the peer on its own connection, and wait for the
///   responses: the receive thread delivers them while the handler waits.
///   The handler needs a handle to its connection, which exists only after
///   the [`Config`](crate::Config) is built; a [`Weak`](std::sync::Weak) in a
///   [`OnceLock`](std::sync::OnceLock) does it without a reference cycle:
///
/// ```
/// use std::os::unix::net::UnixStream;
/// use std::sync::{Arc, OnceLock, Weak};
/// use std::time::Duration;
/// use packetstream::{Config, HandlerResult, PacketConnection, Request};
///
/// const GREET: u64 = 1; // client -> server
/// const NAME: u64 = 2; // server -> client, while handling GREET
///
/// let (a, b) = UnixStream::pair()?;
/// let me: Arc<OnceLock<Weak<PacketConnection>>> = Arc::default();
/// let server = Arc::new(PacketConnection::from_unix_stream(b, Config::default().handler({
///     let me = Arc::clone(&me);
///     move |_: Request| -> HandlerResult {
///         let conn = me.get().and_then(Weak::upgrade).ok_or("connection is gone")?;
///         let name = conn.submit(NAME, 0, b"")?.wait_timeout(Duration::from_secs(10))?;
///         Ok(format!("hello, {}", String::from_utf8_lossy(&name.payload)).into())
///     }
/// }))?);
/// me.set(Arc::downgrade(&server)).expect("set once");
///
/// let client = PacketConnection::from_unix_stream(
///     a,
///     Config::default().handler(|_: Request| Ok("client".into())),
/// )?;
/// assert_eq!(client.call_as::<String>(GREET, 0, b"")?, "hello, client");
/// client.close()?;
/// server.join()?;
/// # Ok::<(), packetstream::Error>(())
/// ```
///
/// # What a handler must not do
///
/// - Block forever. It stalls one handler thread for good. Once every
///   handler thread is stuck and the handler queue is full, the receive
///   thread stops reading, and then responses to this end's own requests
///   stop arriving too. A handler that waits for the peer, as above, should
///   wait with a timeout, and nested call-backs need enough handler
///   threads.
/// - Wait for its own connection to end: it cannot end before the handler
///   returns. [`close`](crate::PacketConnection::close) and
///   [`join`](crate::PacketConnection::join) there return
///   [`Error::WouldBlock`](crate::Error::WouldBlock) at once (`close` having
///   begun the close), and `close_timeout` waits out its deadline; call
///   [`end_requests`](crate::PacketConnection::end_requests) or
///   [`abort`](crate::PacketConnection::abort), which do not wait, or leave the
///   close to another thread. A handler of a server's that calls
///   [`Server::stop`](crate::Server::stop) has the stop finished by a
///   thread of its own (see there).
/// - Write to standard output when the connection runs over it
///   ([`PacketConnection::stdio`](crate::PacketConnection::stdio)): log to standard error.
///
/// A handler that panics sends a not-ok reply and the connection goes on;
/// a `std::sync::Mutex` it held is poisoned, as with any panic.
pub trait RequestHandler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(&self, rq: Request) -> HandlerResult;
}

impl<F> RequestHandler for F
where
    F: Fn(Request) -> HandlerResult + Send + Sync + 'static,
{
    fn handle(&self, rq: Request) -> HandlerResult {
        self(rq)
    }
}

/// The outcome of running a handler: ok or not, flags and payload.
pub(crate) struct Outcome {
    pub(crate) ok: bool,
    pub(crate) flags: u64,
    pub(crate) payload: Vec<u8>,
}

/// Runs `handler` on `rq`, turning errors and panics into not-ok outcomes.
/// `name` is the connection's, for the log.
pub(crate) fn run_handler(name: &str, handler: &Arc<dyn RequestHandler>, rq: Request) -> Outcome {
    let (channel, tag, rq_type) = (rq.channel, rq.tag, rq.rq_type);
    // The handler's error is shown and dropped inside the catch too: its
    // `Display` and its `Drop` are the application's code, and a panic in
    // them must not end the thread that runs the handler (a worker of the
    // pool, or the receive thread), leaving the request unanswered.
    let res = catch_unwind(AssertUnwindSafe(|| match handler.handle(rq) {
        Ok(reply) => Outcome {
            ok: true,
            flags: reply.flags,
            payload: reply.payload,
        },
        Err(err) => {
            debug!("{name}: request {channel}:{tag} (rq_type {rq_type}) failed: {err}");
            match err.downcast::<Failure>() {
                Ok(failure) => Outcome {
                    ok: false,
                    flags: failure.flags,
                    payload: failure.payload,
                },
                Err(err) => Outcome {
                    ok: false,
                    flags: 0,
                    payload: err.to_string().into_bytes(),
                },
            }
        }
    }));
    match res {
        Ok(outcome) => outcome,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            error!(
                "{name}: handler panicked on request {channel}:{tag} (rq_type {rq_type}): {msg}"
            );
            // The panic's payload is the application's too: a panic in its
            // drop is caught.
            contained(move || drop(panic));
            Outcome {
                ok: false,
                flags: 0,
                payload: format!("handler panicked: {msg}").into_bytes(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rq(payload: &[u8]) -> Request {
        Request::new(0, 2, 0, 0, payload.to_vec())
    }

    #[test]
    fn errors_become_text_and_failures_keep_their_flags() {
        let handler: Arc<dyn RequestHandler> = Arc::new(|rq: Request| -> HandlerResult {
            match rq.payload.as_slice() {
                b"text" => Err("plain reason".into()),
                b"failure" => Err(Failure::new(0x42, "custom").into()),
                b"panic" => panic!("boom"),
                _ => Ok(7u64.into()),
            }
        });
        let out = run_handler("test", &handler, rq(b"text"));
        assert!(!out.ok);
        assert_eq!(
            (out.flags, out.payload.as_slice()),
            (0, &b"plain reason"[..])
        );
        let out = run_handler("test", &handler, rq(b"failure"));
        assert_eq!(
            (out.ok, out.flags, out.payload.as_slice()),
            (false, 0x42, &b"custom"[..])
        );
        let out = run_handler("test", &handler, rq(b"panic"));
        assert!(!out.ok);
        assert_eq!(out.payload, b"handler panicked: boom");
        let out = run_handler("test", &handler, rq(b"other"));
        assert_eq!((out.ok, out.flags), (true, 7));
    }

    #[test]
    fn a_panic_in_the_errors_display_or_in_dropping_a_panic_is_a_not_ok_outcome() {
        #[derive(Debug)]
        struct PanicsInDisplay;
        impl std::fmt::Display for PanicsInDisplay {
            fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                panic!("Display panics")
            }
        }
        impl StdError for PanicsInDisplay {}
        struct PanicsInDrop;
        impl Drop for PanicsInDrop {
            fn drop(&mut self) {
                panic!("Drop panics")
            }
        }
        let handler: Arc<dyn RequestHandler> = Arc::new(|rq: Request| -> HandlerResult {
            match rq.payload.as_slice() {
                b"display" => Err(Box::new(PanicsInDisplay)),
                _ => std::panic::panic_any(PanicsInDrop),
            }
        });
        let out = run_handler("test", &handler, rq(b"display"));
        assert_eq!(
            (out.ok, out.payload.as_slice()),
            (false, &b"handler panicked: Display panics"[..])
        );
        let out = run_handler("test", &handler, rq(b"drop"));
        assert_eq!(
            (out.ok, out.payload.as_slice()),
            (false, &b"handler panicked: non-string panic payload"[..])
        );
    }
}
