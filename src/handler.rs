//! Request handlers: what a handler receives and returns, and the pool of
//! worker threads that runs them.

use std::error::Error as StdError;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

/// A request from the peer, as a handler receives it.
#[derive(Clone, PartialEq, Eq)]
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

/// A successful reply: the flags and payload of an ok response.
///
/// `From` conversions cover the five reply shapes of the reference
/// implementation:
///
/// | handler returns | flags | payload |
/// |---|---|---|
/// | `()` | 0 | empty |
/// | `u64` | the value | empty |
/// | `Vec<u8>` or `&[u8]` | 0 | the bytes |
/// | `String` or `&str` | 0 | the text as UTF-8 |
/// | `(u64, Vec<u8>)` | the value | the bytes |
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
    match catch_unwind(AssertUnwindSafe(|| handler.handle(rq))) {
        Ok(Ok(reply)) => Outcome {
            ok: true,
            flags: reply.flags,
            payload: reply.payload,
        },
        Ok(Err(err)) => match err.downcast::<Failure>() {
            Ok(failure) => Outcome {
                ok: false,
                flags: failure.flags,
                payload: failure.payload,
            },
            Err(err) => {
                log::debug!("{name}: request {channel}:{tag} (rq_type {rq_type}) failed: {err}");
                Outcome {
                    ok: false,
                    flags: 0,
                    payload: err.to_string().into_bytes(),
                }
            }
        },
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            log::error!(
                "{name}: handler panicked on request {channel}:{tag} (rq_type {rq_type}): {msg}"
            );
            Outcome {
                ok: false,
                flags: 0,
                payload: format!("handler panicked: {msg}").into_bytes(),
            }
        }
    }
}

/// Queued jobs one awake worker is expected to get through before another is
/// woken to help.
const JOBS_PER_WORKER: usize = 16;

/// The queue between the receive thread and the handler threads.
///
/// A bounded crossbeam channel holds the jobs, so the receive thread blocks
/// when the handlers fall behind. Idle workers park on a condvar instead of
/// spinning, and the receive thread wakes one only when the jobs queued plus
/// the workers busy in a handler outnumber the workers awake: a burst of
/// quick requests is served by the workers already awake, and a request never
/// waits behind a long-running handler while a worker sleeps.
pub(crate) struct JobQueue {
    tx: Sender<Request>,
    rx: Receiver<Request>,
    n_workers: usize,
    /// Workers parked on `wake`; changed only under `parked`'s lock.
    n_parked: AtomicUsize,
    /// Workers inside a handler.
    n_busy: AtomicUsize,
    /// Payload bytes of the queued jobs, and their budget.
    n_bytes: AtomicUsize,
    max_bytes: usize,
    /// The receive thread waits on `room` for the bytes to drop.
    pusher_waiting: AtomicBool,
    room: Condvar,
    closed: AtomicBool,
    parked: Mutex<()>,
    wake: Condvar,
}

impl JobQueue {
    pub(crate) fn new(capacity: usize, max_bytes: usize, n_workers: usize) -> JobQueue {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        JobQueue {
            tx,
            rx,
            n_workers,
            n_parked: AtomicUsize::new(0),
            n_busy: AtomicUsize::new(0),
            n_bytes: AtomicUsize::new(0),
            max_bytes,
            pusher_waiting: AtomicBool::new(false),
            room: Condvar::new(),
            closed: AtomicBool::new(false),
            parked: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Queues a job without waking a worker: the receive thread calls
    /// [`wake`](JobQueue::wake) once its read buffer runs dry, so a batch of
    /// requests costs a few wake-ups, not one each. If the queue is full, by
    /// count or by payload bytes, wakes workers, then blocks until there is
    /// room.
    pub(crate) fn push(&self, rq: Request) {
        let len = rq.payload.len();
        if self.n_bytes.load(Ordering::SeqCst) + len > self.max_bytes && !self.rx.is_empty() {
            self.wake();
            let mut guard = self.parked.lock();
            self.pusher_waiting.store(true, Ordering::SeqCst);
            while self.n_bytes.load(Ordering::SeqCst) + len > self.max_bytes
                && !self.rx.is_empty()
                && !self.closed.load(Ordering::SeqCst)
            {
                self.room.wait(&mut guard);
            }
            self.pusher_waiting.store(false, Ordering::SeqCst);
        }
        self.n_bytes.fetch_add(len, Ordering::SeqCst);
        if let Err(err) = self.tx.try_send(rq) {
            self.wake();
            // The receiver lives in `self`, so the channel never disconnects.
            let _ = self.tx.send(err.into_inner());
        }
    }

    /// Wakes as many parked workers as the queued jobs need: one for every
    /// [`JOBS_PER_WORKER`] queued jobs, plus one for every worker busy in a
    /// handler (which may be a slow one). A quick handler serves a whole batch
    /// on one thread; slow handlers run side by side.
    pub(crate) fn wake(&self) {
        // Pairs with the fence in `pop`: either this thread sees the worker
        // parked, or the worker sees the job.
        fence(Ordering::SeqCst);
        if self.n_parked.load(Ordering::SeqCst) == 0 || self.rx.is_empty() {
            return;
        }
        let _guard = self.parked.lock();
        loop {
            let n_parked = self.n_parked.load(Ordering::SeqCst);
            let n_awake = self.n_workers - n_parked;
            let n_needed =
                self.n_busy.load(Ordering::SeqCst) + self.rx.len().div_ceil(JOBS_PER_WORKER);
            if n_parked == 0 || n_needed <= n_awake {
                return;
            }
            // The woken worker counts as awake from now on.
            self.n_parked.fetch_sub(1, Ordering::SeqCst);
            self.wake.notify_one();
        }
    }

    /// The next job; `None` once the queue is closed and empty.
    pub(crate) fn pop(&self) -> Option<Request> {
        loop {
            if let Ok(rq) = self.rx.try_recv() {
                self.n_bytes.fetch_sub(rq.payload.len(), Ordering::SeqCst);
                if self.pusher_waiting.load(Ordering::SeqCst) {
                    let _guard = self.parked.lock();
                    self.room.notify_one();
                }
                return Some(rq);
            }
            let mut guard = self.parked.lock();
            self.n_parked.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !self.rx.is_empty() || self.closed.load(Ordering::SeqCst) {
                self.n_parked.fetch_sub(1, Ordering::SeqCst);
                drop(guard);
                if self.closed.load(Ordering::SeqCst) && self.rx.is_empty() {
                    return None;
                }
                continue;
            }
            // Whoever wakes this worker has already taken it off `n_parked`.
            self.wake.wait(&mut guard);
        }
    }

    /// True if no job waits for a worker.
    pub(crate) fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Runs `f` counted as busy: a worker that may take long (a slow
    /// handler, or a blocked write of its reply).
    pub(crate) fn busy<T>(&self, f: impl FnOnce() -> T) -> T {
        self.n_busy.fetch_add(1, Ordering::SeqCst);
        let res = f();
        self.n_busy.fetch_sub(1, Ordering::SeqCst);
        res
    }

    /// No more jobs come: workers finish what is queued, then end.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _guard = self.parked.lock();
        self.n_parked.store(0, Ordering::SeqCst);
        self.wake.notify_all();
        self.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rq(payload: &[u8]) -> Request {
        Request {
            channel: 0,
            tag: 2,
            rq_type: 0,
            flags: 0,
            payload: payload.to_vec(),
        }
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
}

#[cfg(test)]
mod queue_tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn job(tag: u64) -> Request {
        Request {
            channel: 0,
            tag,
            rq_type: 0,
            flags: 0,
            payload: Vec::new(),
        }
    }

    #[test]
    fn a_new_job_is_not_stuck_behind_a_long_handler() {
        let queue = Arc::new(JobQueue::new(16, 1 << 20, 2));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                let (queue, done_tx, release_rx) =
                    (Arc::clone(&queue), done_tx.clone(), release_rx.clone());
                s.spawn(move || {
                    while let Some(rq) = queue.pop() {
                        queue.busy(|| {
                            if rq.tag == 0 {
                                // The long handler: held until released.
                                let _ = release_rx.recv_timeout(Duration::from_secs(30));
                            }
                        });
                        done_tx.send(rq.tag).unwrap();
                    }
                });
            }
            // Let both workers park, then start the long job.
            let deadline = Instant::now() + Duration::from_secs(30);
            while queue.n_parked.load(Ordering::SeqCst) < 2 {
                assert!(Instant::now() < deadline);
                std::thread::yield_now();
            }
            queue.push(job(0));
            queue.wake();
            while queue.n_busy.load(Ordering::SeqCst) < 1 {
                assert!(Instant::now() < deadline);
                std::thread::yield_now();
            }
            // The second worker must wake for this one.
            queue.push(job(1));
            queue.wake();
            assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok(1));
            drop(release_tx);
            assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok(0));
            queue.close();
        });
    }

    #[test]
    fn queued_payload_bytes_are_bounded() {
        let queue = Arc::new(JobQueue::new(100, 1000, 1));
        let big = |tag| Request {
            payload: vec![0; 600],
            ..job(tag)
        };
        // One job is always let in, however large.
        queue.push(Request {
            payload: vec![0; 5000],
            ..job(0)
        });
        let pusher = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                queue.push(big(1));
                queue.push(big(2));
            })
        };
        // The pusher must wait for the worker to make room.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !queue.pusher_waiting.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the push never blocked");
            std::thread::yield_now();
        }
        assert_eq!(queue.rx.len(), 1);
        let mut got = Vec::new();
        while got.len() < 3 {
            assert!(Instant::now() < deadline);
            if let Ok(rq) = queue.rx.try_recv() {
                // As `pop` does.
                queue.n_bytes.fetch_sub(rq.payload.len(), Ordering::SeqCst);
                let _guard = queue.parked.lock();
                queue.room.notify_one();
                got.push(rq.tag);
            }
            assert!(queue.n_bytes.load(Ordering::SeqCst) <= 5000);
            std::thread::yield_now();
        }
        pusher.join().unwrap();
        assert_eq!(got, [0, 1, 2]);
        queue.close();
    }

    #[test]
    fn close_lets_workers_finish_what_is_queued() {
        let queue = Arc::new(JobQueue::new(16, 1 << 20, 1));
        for tag in 0..5 {
            queue.push(job(tag));
        }
        queue.close();
        let worker = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                std::iter::from_fn(|| queue.pop())
                    .map(|rq| rq.tag)
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(worker.join().unwrap(), [0, 1, 2, 3, 4]);
    }
}
