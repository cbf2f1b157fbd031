//! Typed protocols: request types, the dispatcher that serves them, and
//! typed client calls. The user-facing guide is on [`RequestType`] and
//! [`Dispatcher`].

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use crate::codec::Payload;
use crate::connection::{PacketConnection, PendingResponse};
use crate::error::{Error, Result};
use crate::handler::{HandlerError, HandlerResult, Request, RequestHandler};
use crate::reply::{Failure, FromResponse, Reply, Response};

/// A request type: its number on the wire, its payload (through the
/// [`Payload`] supertrait), and its response type. With [`Fulfil`] for the
/// serving side, a protocol is written as request types, not as raw
/// `(rq_type, flags, payload)`.
///
/// Only [`RQ_TYPE`](RequestType::RQ_TYPE) and
/// [`Response`](RequestType::Response) have no default.
///
/// This is the reference's `BaseRequest` and `HasPacketConnection` in Rust
/// clothes:
///
/// | reference | here |
/// |---|---|
/// | `BaseRequest` subclass, a `*Binary` payload | a type implementing [`Payload`] and [`RequestType`] |
/// | `BinaryMultiValue('Name', dict(a=UInt16BE, b=BSString))` | `struct Name { a: u16, b: String }` with [`impl_payload!(Name { a as UInt16BE, b })`](crate::impl_payload) |
/// | `rq_type_map = {0: AddRequest, ..}` | [`RequestType::RQ_TYPE`], and [`Dispatcher::route`] |
/// | `from_request_payload(flags, payload)` | [`RequestType::from_request`] |
/// | `fulfil(context)` | [`Fulfil::fulfil`] |
/// | `decode_response_payload(flags, payload)` | the response type's [`FromResponse`] |
/// | `conn_do_remote(rq)` | [`PacketConnection::request`] |
/// | `conn_submit(rq)` | [`PacketConnection::submit_request`] |
///
/// A response type travels as the flags and payload of an ok reply: the
/// server turns it into a [`Reply`] with `Into<Reply>`, the client decodes
/// it with [`FromResponse`]. Both are implemented for:
///
/// | response type | flags | payload |
/// |---|---|---|
/// | `()` | 0 | empty |
/// | `u64` | the value | empty |
/// | `Vec<u8>` | 0 | the bytes |
/// | `String` | 0 | the UTF-8 |
/// | `(u64, Vec<u8>)` | the value | the bytes |
/// | `bool` | 0 or 1 | empty |
/// | `Option<Vec<u8>>` | 1, or 0 for `None` | the bytes, or empty |
/// | a struct with [`impl_payload!`](crate::impl_payload) | 0 | its [`Payload`] encoding |
/// | a cs.binary newtype such as [`UInt32LE`](crate::UInt32LE) or [`BSSFloat`](crate::BSSFloat) | 0 | its encoding |
///
/// The first five are the reference's reply shapes (a handler there returns
/// `None`, an `int`, `bytes`, `str` or `(int, bytes)`). Decoding a payload
/// type checks that the whole payload is used and ignores the flags; a
/// reference service whose `fulfil` returns `bytes(SomeBinary(...))`
/// answers in exactly this shape. A list, an option or a tuple of payloads
/// is not a response type by itself (`Vec<u8>` and `Option<Vec<u8>>`
/// already mean something else): put it in a struct. The `typed_service`
/// example is a service written both here and with the reference's
/// `BaseRequest`.
///
/// A not-ok reply reaches the caller as [`Error::Failed`], which carries the
/// reply's flags and its reason. On the serving side, an rq_type with no
/// route gets a not-ok reply `"unknown rq_type N"`, and a payload that does
/// not decode gets one that names the request type and what was wrong.
///
/// # Adding a request type
///
/// A type, its payload, its `rq_type` and response, and its `fulfil`: under
/// 30 lines, here with a server and a client around it.
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use packetstream::{impl_payload, Fulfil, HandlerError, RequestType};
///
/// /// A key-value store, the context every request is fulfilled against.
/// #[derive(Default)]
/// struct Kv(Mutex<HashMap<String, Vec<u8>>>);
///
/// /// PUT: store a value under a key; the response is the previous length.
/// struct Put {
///     key: String,
///     value: Vec<u8>,
/// }
/// impl_payload!(Put { key, value });
///
/// impl RequestType for Put {
///     const RQ_TYPE: u64 = 1;
///     type Response = u64;
/// }
///
/// impl Fulfil<Kv> for Put {
///     fn fulfil(self, kv: &Kv) -> Result<u64, HandlerError> {
///         let old = kv.0.lock().unwrap().insert(self.key, self.value);
///         Ok(old.map_or(0, |v| v.len() as u64))
///     }
/// }
/// # use std::os::unix::net::UnixStream;
/// # use packetstream::{Config, Dispatcher, PacketConnection};
/// # let (a, b) = UnixStream::pair()?;
/// # let handler = Dispatcher::new(Kv::default()).route::<Put>();
/// # let server = PacketConnection::from_unix_stream(b, Config::default().handler(handler))?;
/// # let client = PacketConnection::from_unix_stream(a, Config::default())?;
/// # assert_eq!(client.request(&Put { key: "k".into(), value: vec![1, 2, 3] })?, 0);
/// # assert_eq!(client.request(&Put { key: "k".into(), value: vec![] })?, 3);
/// # client.close()?;
/// # server.join()?;
/// # Ok::<(), packetstream::Error>(())
/// ```
pub trait RequestType: Payload {
    /// The request's `rq_type` on the wire.
    const RQ_TYPE: u64;

    /// What an ok reply to this request decodes into. A server that
    /// fulfils the request also needs `Self::Response: Into<Reply>`.
    type Response: FromResponse;

    /// The flags sent with the request. Default: 0.
    fn flags(&self) -> u64 {
        0
    }

    /// Decodes a received request from its flags and payload. The default
    /// ignores the flags and decodes the whole payload with
    /// [`Payload::from_bytes`]; override it for a request that carries
    /// meaning in its flags.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if the payload is truncated, invalid or too long.
    fn from_request(flags: u64, payload: &[u8]) -> Result<Self> {
        let _ = flags;
        Self::from_bytes(payload)
    }

    /// A name for log lines and error replies. Default: the type's name
    /// without its module path.
    fn name() -> &'static str {
        short_type_name::<Self>()
    }
}

/// Serving a request type against a context `C`, the state the service
/// shares between requests (and connections).
pub trait Fulfil<C: ?Sized>: RequestType {
    /// Carries out the request and returns its response.
    ///
    /// # Errors
    ///
    /// Any error becomes a not-ok reply: a [`Failure`] with exactly its
    /// flags and payload, anything else with flags 0 and its text.
    fn fulfil(self, context: &C) -> Result<Self::Response, HandlerError>;
}

type Route<C> = fn(&C, &Request) -> HandlerResult;

/// Serves typed requests: maps each `rq_type` to the request type
/// registered for it, decodes the payload and calls
/// [`fulfil`](Fulfil::fulfil) with the shared context.
///
/// It is a [`RequestHandler`], so it goes straight into
/// [`Config::handler`](crate::Config::handler). Clone the `Config` (or
/// share the dispatcher with [`Config::shared_handler`](crate::Config::shared_handler))
/// to serve many connections from one context.
///
/// An `rq_type` with no route gets the not-ok reply `"unknown rq_type N"`;
/// a payload that does not decode gets `"NAME (rq_type N): cannot decode
/// payload: ..."`. Both have flags 0.
///
/// # Examples
///
/// ```
/// use std::os::unix::net::UnixStream;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use packetstream::{
///     impl_payload, Config, Dispatcher, Error, Failure, Fulfil, HandlerError,
///     PacketConnection, RequestType,
/// };
///
/// /// The service's state, shared by every connection it serves.
/// #[derive(Default)]
/// struct Counter(AtomicU64);
///
/// /// ADD n: add n to the counter and return the new total.
/// struct Add(u64);
/// impl_payload!(Add(0));
/// impl RequestType for Add {
///     const RQ_TYPE: u64 = 0;
///     type Response = u64;
/// }
/// impl Fulfil<Counter> for Add {
///     fn fulfil(self, ctx: &Counter) -> Result<u64, HandlerError> {
///         if self.0 == 0 {
///             return Err(Failure::new(0x4, "adding zero is pointless").into());
///         }
///         Ok(ctx.0.fetch_add(self.0, Ordering::SeqCst) + self.0)
///     }
/// }
///
/// /// NAME: the service's name, as text.
/// struct Name;
/// impl_payload!(Name);
/// impl RequestType for Name {
///     const RQ_TYPE: u64 = 1;
///     type Response = String;
/// }
/// impl Fulfil<Counter> for Name {
///     fn fulfil(self, _: &Counter) -> Result<String, HandlerError> {
///         Ok("counter".to_string())
///     }
/// }
///
/// let dispatcher = Dispatcher::new(Counter::default())
///     .route::<Add>()
///     .route::<Name>();
/// let (a, b) = UnixStream::pair()?;
/// let server = PacketConnection::from_unix_stream(b, Config::default().handler(dispatcher))?;
/// let client = PacketConnection::from_unix_stream(a, Config::default())?;
///
/// assert_eq!(client.request(&Add(5))?, 5);
/// let pending = client.submit_request(&Add(2))?; // returns at once
/// assert_eq!(client.request(&Name)?, "counter");
/// assert_eq!(pending.wait()?, 7);
///
/// // A not-ok reply is a typed error carrying the flags and the reason.
/// match client.request(&Add(0)) {
///     Err(Error::Failed { flags, payload, .. }) => {
///         assert_eq!((flags, payload.as_slice()), (0x4, &b"adding zero is pointless"[..]));
///     }
///     other => panic!("expected a failure, got {other:?}"),
/// }
/// // A request type the server does not know is refused by number.
/// let err = client.call(9, 0, b"").unwrap_err();
/// assert_eq!(err.failure_reason().as_deref(), Some("unknown rq_type 9"));
///
/// client.close()?;
/// server.join()?;
/// # Ok::<(), packetstream::Error>(())
/// ```
///
/// The `blockstore` example is a larger service built this way.
pub struct Dispatcher<C: ?Sized> {
    context: Arc<C>,
    routes: BTreeMap<u64, (&'static str, Route<C>)>,
}

impl<C: ?Sized> fmt::Debug for Dispatcher<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let routes: BTreeMap<u64, &str> = self
            .routes
            .iter()
            .map(|(&rq_type, &(name, _))| (rq_type, name))
            .collect();
        f.debug_struct("Dispatcher")
            .field("routes", &routes)
            .finish_non_exhaustive()
    }
}

impl<C> Dispatcher<C> {
    /// A dispatcher with no routes, serving against `context`.
    pub fn new(context: C) -> Dispatcher<C> {
        Dispatcher::shared(Arc::new(context))
    }
}

impl<C: ?Sized> Dispatcher<C> {
    /// A dispatcher with no routes, serving against a context that is
    /// already shared, such as an `Arc<dyn Store>`.
    pub fn shared(context: Arc<C>) -> Dispatcher<C> {
        Dispatcher {
            context,
            routes: BTreeMap::new(),
        }
    }

    /// Adds request type `R`, served at `R::RQ_TYPE`.
    ///
    /// # Panics
    ///
    /// If another request type already has that `rq_type`: two types on one
    /// number is a mistake in the protocol's definition.
    pub fn route<R>(mut self) -> Dispatcher<C>
    where
        R: Fulfil<C>,
        R::Response: Into<Reply>,
    {
        let route: Route<C> = run_route::<C, R>;
        if let Some((other, _)) = self.routes.insert(R::RQ_TYPE, (R::name(), route)) {
            panic!(
                "rq_type {} is taken by both {other} and {}",
                R::RQ_TYPE,
                R::name()
            );
        }
        self
    }

    /// The shared context.
    pub fn context(&self) -> &Arc<C> {
        &self.context
    }

    /// The routed `rq_type`s and the names of their request types, in
    /// `rq_type` order.
    pub fn routes(&self) -> impl Iterator<Item = (u64, &'static str)> + '_ {
        self.routes
            .iter()
            .map(|(&rq_type, &(name, _))| (rq_type, name))
    }
}

fn run_route<C, R>(context: &C, rq: &Request) -> HandlerResult
where
    C: ?Sized,
    R: Fulfil<C>,
    R::Response: Into<Reply>,
{
    // The connection logs the failure, with its name.
    let typed = R::from_request(rq.flags, &rq.payload)
        .map_err(|err| Failure::new(0, format!("{} (rq_type {}): {err}", R::name(), rq.rq_type)))?;
    Ok(typed.fulfil(context)?.into())
}

impl<C: ?Sized + Send + Sync + 'static> RequestHandler for Dispatcher<C> {
    fn handle(&self, rq: Request) -> HandlerResult {
        match self.routes.get(&rq.rq_type) {
            Some(&(_, route)) => route(&self.context, &rq),
            None => Err(Failure::new(0, format!("unknown rq_type {}", rq.rq_type)).into()),
        }
    }
}

impl PacketConnection {
    /// Sends a typed request and waits for its typed response.
    ///
    /// # Errors
    ///
    /// [`Error::Failed`] for a not-ok reply, with its flags and reason;
    /// [`Error::Decode`] if the ok reply does not decode into
    /// `R::Response`; otherwise as for [`call`](PacketConnection::call).
    pub fn request<R: RequestType>(&self, rq: &R) -> Result<R::Response> {
        self.submit_request(rq)?.wait()
    }

    /// Like [`request`](PacketConnection::request), but gives up at
    /// `timeout`, as [`call_timeout`](PacketConnection::call_timeout) does.
    ///
    /// # Errors
    ///
    /// As for [`call_timeout`](PacketConnection::call_timeout), and
    /// [`Error::Decode`] if the response does not decode.
    pub fn request_timeout<R: RequestType>(
        &self,
        rq: &R,
        timeout: Duration,
    ) -> Result<R::Response> {
        decode_response::<R>(self.call_timeout(R::RQ_TYPE, rq.flags(), &rq.to_bytes(), timeout))
    }

    /// Sends a typed request and returns at once with a handle to its typed
    /// response, so that many can be in flight.
    ///
    /// # Errors
    ///
    /// As for [`submit`](PacketConnection::submit).
    pub fn submit_request<R: RequestType>(&self, rq: &R) -> Result<PendingRequest<R>> {
        let pending = self.submit(R::RQ_TYPE, rq.flags(), &rq.to_bytes())?;
        Ok(PendingRequest {
            pending,
            _rq: PhantomData,
        })
    }
}

/// A handle to the typed response of a request sent with
/// [`submit_request`](PacketConnection::submit_request). Dropping it
/// cancels the request locally, as for [`PendingResponse`].
pub struct PendingRequest<R> {
    pending: PendingResponse,
    _rq: PhantomData<fn() -> R>,
}

impl<R: RequestType> fmt::Debug for PendingRequest<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingRequest")
            .field("request", &R::name())
            .field("tag", &self.pending.tag())
            .field("ready", &self.pending.is_ready())
            .finish()
    }
}

impl<R: RequestType> PendingRequest<R> {
    /// Waits for the response and decodes it.
    ///
    /// # Errors
    ///
    /// As for [`PacketConnection::request`].
    pub fn wait(self) -> Result<R::Response> {
        decode_response::<R>(self.pending.wait())
    }

    /// Waits at most `timeout` for the response. On timeout the request
    /// stays pending and can be waited on again.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], or as for [`wait`](PendingRequest::wait).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<R::Response> {
        decode_response::<R>(self.pending.wait_timeout(timeout))
    }

    /// Takes the response if it has arrived, without blocking.
    pub fn try_wait(&self) -> Option<Result<R::Response>> {
        self.pending.try_wait().map(decode_response::<R>)
    }

    /// True once the response (or the connection's end) has arrived.
    pub fn is_ready(&self) -> bool {
        self.pending.is_ready()
    }

    /// The request's tag.
    pub fn tag(&self) -> u64 {
        self.pending.tag()
    }

    /// Stops waiting; a late response is dropped quietly.
    pub fn cancel(self) {}

    /// The untyped handle underneath.
    pub fn into_inner(self) -> PendingResponse {
        self.pending
    }
}

fn decode_response<R: RequestType>(res: Result<Response>) -> Result<R::Response> {
    R::Response::from_response(res?).map_err(|err| match err {
        Error::Decode(msg) => Error::Decode(format!("{} response: {msg}", R::name())),
        other => other,
    })
}

fn short_type_name<T: ?Sized>() -> &'static str {
    let full = std::any::type_name::<T>();
    // Keep generic arguments whole: cut the path before the first `<` only.
    let head_end = full.find('<').unwrap_or(full.len());
    let start = full[..head_end].rfind("::").map_or(0, |idx| idx + 2);
    &full[start..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::impl_payload;

    struct Echo(Vec<u8>);
    impl_payload!(Echo(0));
    impl RequestType for Echo {
        const RQ_TYPE: u64 = 3;
        type Response = Vec<u8>;
    }
    impl Fulfil<()> for Echo {
        fn fulfil(self, (): &()) -> Result<Vec<u8>, HandlerError> {
            Ok(self.0)
        }
    }

    struct Other;
    impl_payload!(Other);
    impl RequestType for Other {
        const RQ_TYPE: u64 = 3;
        type Response = ();
    }
    impl Fulfil<()> for Other {
        fn fulfil(self, (): &()) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    fn rq(rq_type: u64, payload: &[u8]) -> Request {
        Request::new(0, 5, rq_type, 0, payload.to_vec())
    }

    fn failure(res: HandlerResult) -> Failure {
        *res.expect_err("expected a failure")
            .downcast::<Failure>()
            .expect("a Failure")
    }

    #[test]
    fn dispatcher_routes_by_rq_type_and_refuses_unknown_and_undecodable() {
        let dispatcher = Dispatcher::new(()).route::<Echo>();
        assert_eq!(dispatcher.routes().collect::<Vec<_>>(), [(3, "Echo")]);
        let reply = dispatcher.handle(rq(3, b"\x02hi")).unwrap();
        assert_eq!(reply, Reply::payload(b"hi".to_vec()));
        let fail = failure(dispatcher.handle(rq(4, b"")));
        assert_eq!(
            (fail.flags, fail.payload.as_slice()),
            (0, &b"unknown rq_type 4"[..])
        );
        let fail = failure(dispatcher.handle(rq(3, b"\x05hi")));
        assert_eq!(
            String::from_utf8(fail.payload).unwrap(),
            "Echo (rq_type 3): cannot decode payload: truncated BSData: needs 5 bytes at offset 1, 2 remain"
        );
    }

    #[test]
    fn two_request_types_on_one_rq_type_is_refused_at_registration() {
        let res = std::panic::catch_unwind(|| Dispatcher::new(()).route::<Echo>().route::<Other>());
        let panic = res.expect_err("a duplicate route must panic");
        let msg = panic.downcast_ref::<String>().expect("a formatted message");
        assert_eq!(msg, "rq_type 3 is taken by both Echo and Other");
    }

    #[test]
    fn short_type_names_drop_the_module_path_but_keep_generics() {
        assert_eq!(short_type_name::<Echo>(), "Echo");
        assert_eq!(
            short_type_name::<Option<Echo>>(),
            "Option<packetstream::protocol::tests::Echo>"
        );
    }

    #[test]
    fn bool_and_option_responses_round_trip_and_refuse_other_shapes() {
        let rsp = |reply: Reply| Response {
            flags: reply.flags,
            payload: reply.payload,
        };
        for value in [false, true] {
            assert_eq!(bool::from_response(rsp(value.into())).unwrap(), value);
        }
        for value in [None, Some(vec![]), Some(vec![1, 2])] {
            let back = Option::<Vec<u8>>::from_response(rsp(value.clone().into())).unwrap();
            assert_eq!(back, value);
        }
        assert!(bool::from_response(rsp(2u64.into())).is_err());
        assert!(bool::from_response(rsp(Reply::payload(vec![1]))).is_err());
        assert!(Option::<Vec<u8>>::from_response(rsp((2, vec![]).into())).is_err());
        assert!(Option::<Vec<u8>>::from_response(rsp((0, vec![1]).into())).is_err());
    }
}
