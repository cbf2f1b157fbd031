//! The state a connection's threads share, and every step that changes it:
//! submitting, taking in the peer's requests, replying, the orderly close,
//! abort, and the teardown after a write or read fails.
//!
//! The threads are in other modules and call in here: the receive loop
//! (`receiver.rs`), the send loop and the waiting callers (`connection.rs`),
//! and the handler pool's workers, which run [`Job`]s (`pool.rs`). This
//! module imports none of them but the pool.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::config::{Config, EndHook, EventHook};
use crate::error::{Disconnect, Error, Expired, RequestId, Result, BUSY_FLAGS};
use crate::ext::{self, CONTROL_CHANNEL};
use crate::handler::{run_handler, Outcome, Request, RequestCtx, RequestHandler};
use crate::inbox::{Inbox, Refusal};
use crate::keeper::{self, Watched};
use crate::outbox::{Admission, Control, DeadlineNote, Outbox, Phase, WriteFailed};
use crate::packet::{Head, PacketKind};
use crate::pending::{Cell, Completion, PendingTable};
use crate::pool::{self, Pool, Quota};
use crate::reply::Response;
use crate::stats::{Counters, Depths, Stats};
use crate::sync;

/// A hook run at most once.
pub(crate) type Hook = Box<dyn FnOnce() + Send>;

/// What reads the connection's packets: the receive thread's, lent to a
/// waiting caller at times. Defined here, implemented by `receiver.rs`.
pub(crate) trait PacketSource: Send {
    /// Reads one packet and acts on it.
    fn step(&mut self, shared: &Arc<Shared>) -> Step;

    /// True if nothing read is left to parse.
    fn idle(&self) -> bool;

    /// The bytes read past the end, for [`Shared::receive_ended`].
    fn unread(&self, res: &Result<Disconnect>) -> Vec<u8>;
}

/// What reading one packet led to.
pub(crate) enum Step {
    /// A packet was read; `delivered` if it answered one of this end's
    /// requests.
    Read { delivered: bool },
    /// Reading has ended: the peer's EOF, the end of the stream, or an
    /// error.
    Ended(Result<Disconnect>),
}

/// How long a lent reader may first rest unread, and the longest: the lease
/// doubles at each look of the keeper that finds callers have read since
/// the last. A packet nobody waits for (a request from the peer, its EOF)
/// that arrives after the last call may wait this long, and up to one more
/// look of the keeper's ([`MAX_LEASE`] apart while a caller reads) and a
/// step of its grid, to be read: about 70 ms.
const LEASE: Duration = Duration::from_millis(10);
const MAX_LEASE: Duration = Duration::from_millis(50);

/// Who reads the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    /// The receive thread.
    Recv,
    /// Lent: free for a waiting caller to take, until the lease runs out.
    Lent,
    /// A caller waiting for its response reads.
    Caller,
    /// Reading has ended.
    Done,
}

/// The reader, while it is lent.
struct Lending {
    holder: Holder,
    source: Option<Box<dyn PacketSource>>,
    /// When it was last lent.
    since: Instant,
    /// The receive thread must take it back at once: others wait for
    /// responses, the connection is closing, or a hook is due.
    recall: bool,
    /// A caller read the end: what it was, and the bytes read past it, for
    /// the receive thread to act on.
    ended: Option<(Result<Disconnect>, Vec<u8>)>,
    /// The lease: how long the reader may rest unread once a caller has
    /// handed it back (it grows while callers keep reading), and when the
    /// keeper last saw it handed back.
    lease: Duration,
    checked: Instant,
    /// The lease keeper is looking at this reader.
    watched: bool,
}

/// What the receive thread gets back from lending its reader.
pub(crate) enum Returned {
    /// The reader, to read on.
    Reader(Box<dyn PacketSource>),
    /// A caller read the end of the stream: what it was, and the bytes
    /// read past it.
    Ended(Result<Disconnect>, Vec<u8>),
}

/// A request to send: what goes in its packet, and how it is sent.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Outgoing<'a> {
    pub(crate) channel: u64,
    pub(crate) rq_type: u64,
    pub(crate) flags: u64,
    pub(crate) payload: &'a [u8],
    /// How it waits for room in the outgoing queue.
    pub(crate) admission: Admission,
    /// The caller is about to wait for it, and writes the queue itself then.
    pub(crate) then_writes: bool,
    /// Its deadline, sent to the peer with it if the peer can take one.
    pub(crate) deadline: Option<Instant>,
}

impl<'a> Outgoing<'a> {
    /// A request that waits for room, with no deadline.
    pub(crate) fn new(channel: u64, rq_type: u64, flags: u64, payload: &'a [u8]) -> Outgoing<'a> {
        Outgoing {
            channel,
            rq_type,
            flags,
            payload,
            admission: Admission::Wait,
            then_writes: false,
            deadline: None,
        }
    }

    /// A control request of the extensions, which never waits for room.
    fn control(rq_type: u64, payload: &'a [u8]) -> Outgoing<'a> {
        Outgoing {
            admission: Admission::NoWait,
            ..Outgoing::new(CONTROL_CHANNEL, rq_type, 0, payload)
        }
    }
}

/// The replies owed to a peer past which it is cut off: four times the
/// budget at which its requests are refused as busy, and at least 1 MiB.
/// Past the budget only small refusals are added, and only as fast as the
/// peer sends requests, so a peer that reads at all stays far below.
fn reply_cap(budget: usize) -> usize {
    budget.saturating_mul(4).max(1 << 20)
}

thread_local! {
    /// The connection whose receive thread this is, by the address of its
    /// shared state; 0 on any other thread.
    static READING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// The connection whose handler this thread is running, by the address
    /// of its shared state; 0 while it runs none.
    static SERVING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// One request from the peer, for the handler pool.
pub(crate) struct Job {
    shared: Arc<Shared>,
    rq: Request,
    /// The deadline the peer gave the request, if any.
    deadline: Option<Instant>,
}

impl pool::Job for Job {
    fn run(self) {
        let Job {
            shared,
            rq,
            deadline,
        } = self;
        shared.quota.release(rq.payload.len());
        // The handler's own panics are its outcome (`run_handler`); a panic
        // here is the library's logging on this thread, in a logger of the
        // user's, or a bug. The request's reply may or may not be queued,
        // and a pool shared by a server's connections must not lose the
        // worker.
        let served = catch_unwind(AssertUnwindSafe(|| shared.serve(rq, deadline, false)));
        if served.is_err() {
            shared.job_panicked();
        }
    }

    /// A server's connections take turns.
    fn lane(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }
}

/// What the connection's threads share. See the module doc.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) max_packet_len: u64,
    handler: Option<Arc<dyn RequestHandler>>,
    pub(crate) table: PendingTable,
    pub(crate) outbox: Outbox,
    inbound: Arc<Inbox>,
    /// The handler pool, if there is a handler that is not inline: this
    /// connection's own, or its server's.
    pool: Option<Arc<Pool<Job>>>,
    owns_pool: bool,
    /// What this connection may have queued in the pool.
    quota: Quota,
    /// The low-water mark of the outgoing queue.
    pub(crate) low_water: usize,
    /// The bytes of replies owed past which the peer is cut off.
    reply_cap: usize,
    /// Extensions are on at this end.
    extensions: bool,
    /// `life.aborted`, for the handlers to read without the lock.
    aborted: AtomicBool,
    /// This end's hello, until its answer is read.
    hello: Mutex<Option<Arc<Cell>>>,
    /// What the peer can do, once its hello or its answer to ours is
    /// known: `None` if it has no extensions.
    peer_caps: OnceLock<Option<u64>>,
    /// The receive thread has read bytes it has not parsed yet: more
    /// requests, and so more replies, may be about to follow.
    more_incoming: AtomicBool,
    /// Whether a handler thread may write the stream itself: only with more
    /// than one, and on a socket without waiting for the peer (see
    /// [`finish_request`](Shared::finish_request)).
    handlers_write: bool,
    pub(crate) stats: Counters,
    life: Mutex<Life>,
    /// Unblocks the connection's threads on abort or a failed write, where
    /// the transport allows it (a socket's shutdown). Never run by an
    /// orderly close, so a stream the caller kept stays usable.
    interrupt: Mutex<Option<Hook>>,
    /// Run once the connection has ended, before `on_end`.
    release: Mutex<Option<Hook>>,
    /// The reader, when the receive thread lends it to callers.
    /// The peer's ERQ has come and its hook has not run yet.
    erq_hook_due: AtomicBool,
    lending: Mutex<Lending>,
    lent: Condvar,
    /// Whether the reader may be lent: only where a caller blocked in a read
    /// can be interrupted (a socket), so that abort still wakes every
    /// waiter.
    may_lend: bool,
    /// Run once the connection has ended, then dropped, with what it holds.
    on_end: Mutex<Option<EndHook>>,
    on_peer_end_requests: Option<EventHook>,
}

/// How the connection is ending. The receive loop and the send loop each
/// report their end; when both have, the connection has ended.
#[derive(Default)]
struct Life {
    aborted: bool,
    /// One of this end's own timeouts ended the connection.
    expired: Option<Disconnect>,
    /// Why the receive loop ended, and the error, if it was one.
    recv_end: Option<Disconnect>,
    recv_error: Option<Error>,
    /// A write failed before the peer's EOF arrived.
    write_error: Option<Error>,
    /// The loops that have ended, each counted once.
    loops_ended: Loops,
    ended: Option<Disconnect>,
    /// Bytes read past the peer's EOF packet.
    unread: Vec<u8>,
}

impl Life {
    /// How the connection ended, once both loops have: an abort first, then
    /// what ended the receive side unless that was the peer's EOF, then a
    /// failed write. So a peer that crashes gives `StreamEnded` whether or
    /// not a write to it failed first.
    fn why(&self) -> Disconnect {
        if self.aborted {
            return Disconnect::Local;
        }
        if let Some(why) = self.expired {
            return why;
        }
        match (self.recv_end, &self.write_error) {
            (Some(why), _) if why != Disconnect::PeerEof => why,
            (_, Some(Error::Io(e))) => broken(e),
            _ => Disconnect::PeerEof,
        }
    }

    /// What `close` and `join` return for this ending.
    fn result(&self) -> Result<()> {
        let why = self.ended.unwrap_or_else(|| self.why());
        let detail = match why {
            Disconnect::PeerEof => return Ok(()),
            Disconnect::Protocol | Disconnect::Io(_) => {
                self.recv_error.as_ref().or(self.write_error.as_ref())
            }
            _ => None,
        };
        Err(detail.map_or(Error::ConnectionLost(why), replicate))
    }
}

/// How an I/O error ends a connection: the peer's side closing under a read
/// or a write (a crash, a kill, an exit without EOF) is the stream ending
/// without EOF, whichever side noticed first; anything else is an I/O
/// error.
fn broken(e: &io::Error) -> Disconnect {
    if let Some(why) = Expired::of(e) {
        return why;
    }
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => Disconnect::StreamEnded,
        kind => Disconnect::Io(kind),
    }
}

/// A copy of an error that ended a connection, so that every `close` and
/// `join` can return it.
fn replicate(err: &Error) -> Error {
    match err {
        Error::Io(e) => Error::Io(io::Error::new(e.kind(), e.to_string())),
        Error::Malformed { reason } => Error::Malformed { reason },
        Error::TooLarge { len, max } => Error::TooLarge {
            len: *len,
            max: *max,
        },
        other => Error::ConnectionLost(match other {
            Error::ConnectionLost(why) => *why,
            _ => Disconnect::Protocol,
        }),
    }
}

/// A snapshot of where a connection is in its life, from
/// [`PacketConnection::status`](crate::PacketConnection::status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// This end has ended its requests (ERQ sent or queued, by
    /// `end_requests`, `close`, an abort, or the peer's end): `submit` fails
    /// with [`Error::Closed`].
    pub requests_ended: bool,
    /// The peer has sent ERQ: it will make no more requests.
    pub peer_requests_ended: bool,
    /// The orderly close has begun, by this end or after the peer's EOF:
    /// requests from the peer are refused, and EOF goes out once those in
    /// progress are answered.
    pub closing: bool,
    /// The connection has ended, and how. Once set, it never changes.
    pub ended: Option<Disconnect>,
}

impl Status {
    /// True while both ends may still make requests of each other.
    pub fn is_open(&self) -> bool {
        !self.requests_ended && !self.closing && self.ended.is_none()
    }
}

impl Shared {
    pub(crate) fn new(
        config: &Config,
        send: Box<dyn io::Write + Send>,
        control: Option<Arc<dyn Control>>,
        pool: Option<(Arc<Pool<Job>>, bool)>,
        interrupt: Option<Hook>,
        release: Option<Hook>,
    ) -> Shared {
        let (pool, owns_pool) = match pool {
            Some((pool, owned)) => (Some(pool), owned),
            None => (None, false),
        };
        // Lent only where `abort` can wake a caller blocked in a read (a
        // socket, shut down), and where reading runs no user code: with an
        // inline handler it stays on the receive thread.
        let may_lend = control.is_some() && !config.inline;
        Shared {
            name: config.name.clone(),
            max_packet_len: config.max_packet_len,
            handler: config.handler.clone(),
            table: PendingTable::new(),
            outbox: Outbox::new(
                &config.name,
                send,
                control,
                config.packet_grace,
                config.max_queued_bytes,
                config.max_queued_packets,
                config.stall_timeout,
            ),
            inbound: Arc::default(),
            pool,
            owns_pool,
            quota: Quota::new(config.handler_queue, config.max_queued_bytes),
            reply_cap: reply_cap(config.max_queued_bytes),
            extensions: config.extensions,
            aborted: AtomicBool::new(false),
            hello: Mutex::new(None),
            peer_caps: OnceLock::new(),
            low_water: config.low_water(),
            more_incoming: AtomicBool::new(false),
            handlers_write: config.handler_threads > 1,
            stats: Counters::default(),
            life: Mutex::new(Life::default()),
            may_lend,
            interrupt: Mutex::new(interrupt),
            release: Mutex::new(release),
            erq_hook_due: AtomicBool::new(false),
            lending: Mutex::new(Lending {
                holder: Holder::Recv,
                source: None,
                ended: None,
                since: Instant::now(),
                recall: false,
                lease: LEASE,
                checked: Instant::now(),
                watched: false,
            }),
            lent: Condvar::new(),
            on_end: Mutex::new(config.on_end.clone()),
            on_peer_end_requests: config.on_peer_end_requests.clone(),
        }
    }

    /// Sends a request: a new tag and response cell, then the packet into
    /// the outbox (with extensions, its deadline goes to the peer just
    /// before it). An error means nothing was sent and no entry is left.
    pub(crate) fn submit(&self, rq: Outgoing<'_>) -> Result<(u64, Arc<Cell>)> {
        let Outgoing {
            channel,
            rq_type,
            flags,
            payload,
            admission,
            then_writes,
            deadline,
        } = rq;
        // The thread that reads never waits for room: an inline handler's
        // submit fails at once on a full queue.
        let admission = match admission {
            Admission::Wait | Admission::Until(_) if self.on_reading_thread() => Admission::NoWait,
            other => other,
        };
        let (tag, cell) = self.table.register(channel)?;
        let head = Head::new(
            channel,
            tag,
            PacketKind::Request { rq_type, flags },
            payload.len(),
        );
        let res = if head.body_len > self.max_packet_len {
            Err(Error::TooLarge {
                len: head.body_len,
                max: self.max_packet_len,
            })
        } else if channel == CONTROL_CHANNEL {
            self.outbox
                .push_control_request(&head, payload, &cell.queued_end, &self.stats)
                .map(|()| None)
        } else {
            let note = deadline
                .filter(|_| self.peer_can(ext::CAN_DEADLINE))
                .and_then(|at| self.deadline_note(channel, tag, at));
            self.outbox.push_request(
                &head,
                payload,
                note.as_ref(),
                admission,
                then_writes,
                &cell.queued_end,
                &self.stats,
            )
        };
        match res {
            Ok(failed) => {
                trace!(
                    "{}: ==> request {channel}:{tag} rq_type={rq_type} flags={flags:#x} len={}",
                    self.name,
                    payload.len()
                );
                self.after_write(failed);
                Ok((tag, cell))
            }
            Err(err) => {
                self.table.remove(channel, tag);
                self.table.recycle(cell);
                Err(err)
            }
        }
    }

    /// Queues the reply to the peer's request `(channel, tag)`: `app` if
    /// the application's handler made it (the peer taking it is activity,
    /// as a refusal or a control reply is not). A reply whose packet would
    /// exceed the limit becomes a not-ok reply saying so.
    fn reply(&self, channel: u64, tag: u64, outcome: Outcome, app: bool) {
        let Outcome {
            mut ok,
            mut flags,
            mut payload,
        } = outcome;
        let mut head = Head::new(
            channel,
            tag,
            PacketKind::Response { ok, flags },
            payload.len(),
        );
        if head.body_len > self.max_packet_len {
            let reason = format!(
                "reply of {} bytes exceeds limit of {}",
                head.body_len, self.max_packet_len
            );
            error!("{}: reply to {channel}:{tag}: {reason}", self.name);
            (ok, flags, payload) = (false, 0, reason.into_bytes());
            head = Head::new(
                channel,
                tag,
                PacketKind::Response { ok, flags },
                payload.len(),
            );
        }
        if channel != CONTROL_CHANNEL {
            let counter = if ok {
                &self.stats.replies.replies_ok
            } else {
                &self.stats.replies.replies_failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        trace!(
            "{}: ==> reply {channel}:{tag} ok={ok} flags={flags:#x} len={}",
            self.name,
            payload.len()
        );
        match self.outbox.push_reply(&head, payload, app, &self.stats) {
            None => debug!(
                "{}: dropped reply to {channel}:{tag}: the send side is closed",
                self.name
            ),
            Some(owed) if owed > self.reply_cap => self.cut_off(owed),
            Some(_) => {}
        }
    }

    /// The peer has been sending requests without reading the answers, far
    /// past the budget of replies owed to it (load shedding keeps a peer
    /// that reads under it): it has stopped reading, and holding more for
    /// it would hold memory without bound. The connection ends as
    /// [`Disconnect::Stalled`], as a write that makes no progress does.
    fn cut_off(&self, owed: usize) {
        warn!(
            "{}: {owed} bytes of replies owed to a peer that reads none of them: cut off",
            self.name
        );
        self.outbox.abort();
        self.after_write(Some(WriteFailed(Expired(Disconnect::Stalled).into_io())));
    }

    /// Hands a request from the peer to the handler pool, or refuses it.
    /// True if it was taken in (a control request or a refusal is not).
    pub(crate) fn receive_request(self: &Arc<Self>, rq: Request) -> bool {
        let (channel, tag) = (rq.channel, rq.tag);
        if channel == CONTROL_CHANNEL {
            self.control(rq);
            return false;
        }
        // On the thread that reads, the counter's one writer.
        crate::stats::bump(&self.stats.recv.requests_received, 1);
        let at_budget = self.outbox.at_reply_budget();
        let inline = self.pool.is_none();
        let (deadline, admitted) = {
            let mut inbound = self.inbound.lock();
            // Taken even if the request is refused, so that it is not left
            // over.
            let deadline = inbound.early_deadlines.take(channel, tag);
            let admitted = inbound.admit(self.handler.is_some(), channel, tag, at_budget, !inline);
            if admitted.is_err() {
                self.inbound.refusing.fetch_add(1, Ordering::SeqCst);
            }
            if admitted.is_err() || inline {
                // Its refusal, or an inline handler's reply, is owed from
                // now: EOF waits for it, even if the close begins before it
                // is queued.
                self.inbound.replying.fetch_add(1, Ordering::SeqCst);
            }
            (deadline, admitted)
        };
        match admitted {
            Ok(()) => {}
            Err(refusal) => {
                match refusal {
                    Refusal::Denied(reason) => {
                        warn!("{}: refusing request {channel}:{tag}: {reason}", self.name);
                        self.refuse(channel, tag, reason, 0);
                    }
                    Refusal::Busy => self.refuse_busy(channel, tag),
                }
                self.replied();
                self.inbound.refusing.fetch_sub(1, Ordering::SeqCst);
                return false;
            }
        }
        match &self.pool {
            Some(pool) => {
                // Blocks while this connection has too much queued: that is
                // the backpressure on the peer.
                // While it waits, the peer hears from this end now and
                // then, so that its keepalive does not take this end for
                // gone.
                self.quota
                    .acquire(rq.payload.len(), || pool.wake(), || self.show_alive());
                pool.push(Job {
                    shared: Arc::clone(self),
                    rq,
                    deadline,
                });
            }
            // An inline handler, on this thread.
            None => self.serve(rq, deadline, true),
        }
        true
    }

    /// A control request from the peer, on the reserved channel: answered
    /// here, on the thread that reads, never by a handler.
    fn control(&self, rq: Request) {
        let (channel, tag) = (rq.channel, rq.tag);
        let answer = match rq.rq_type {
            _ if !self.extensions => Err(Error::Decode("extensions are off".to_string())),
            ext::HELLO => ext::read_hello(&rq.payload).map(|(_, caps)| {
                let _ = self.peer_caps.set(Some(caps & ext::CAPABILITIES));
                ext::hello(ext::VERSION, ext::CAPABILITIES)
            }),
            ext::PING => Ok(Vec::new()),
            ext::CANCEL => ext::read_target(&rq.payload, false).map(|(ch, tag, _)| {
                let found = self.inbound.cancel(ch, tag);
                debug!(
                    "{}: peer cancels {ch}:{tag} (in progress: {found})",
                    self.name
                );
                Vec::new()
            }),
            ext::DEADLINE => ext::read_target(&rq.payload, true).map(|(ch, tag, ms)| {
                if !self.inbound.lock().early_deadlines.set(ch, tag, ms) {
                    warn!(
                        "{}: deadlines for requests that never came piled up: forgotten",
                        self.name
                    );
                }
                Vec::new()
            }),
            other => Err(Error::Decode(format!("unknown control request {other}"))),
        };
        if let Err(e) = &answer {
            debug!(
                "{}: refused control request {channel}:{tag}: {e}",
                self.name
            );
        }
        let outcome = match answer {
            Ok(payload) => Outcome {
                ok: true,
                flags: 0,
                payload,
            },
            Err(e) => Outcome {
                ok: false,
                flags: 0,
                payload: match e {
                    Error::Decode(reason) => reason,
                    other => other.to_string(),
                }
                .into_bytes(),
            },
        };
        self.reply(channel, tag, outcome, false);
        self.outbox.arm();
    }

    /// True on a thread running one of this connection's handlers: a wait
    /// there for the connection to end would wait for itself.
    pub(crate) fn serving_here(&self) -> bool {
        SERVING.with(|serving| serving.get() == self as *const Shared as usize)
    }

    /// True on this connection's receive thread.
    fn on_reading_thread(&self) -> bool {
        READING.with(|reading| reading.get() == self as *const Shared as usize)
    }

    /// Marks the calling thread as this connection's receive thread.
    pub(crate) fn mark_reading_thread(&self) {
        READING.with(|reading| reading.set(self as *const Shared as usize));
    }

    /// Sends this end's hello, if extensions are on; its answer is read
    /// later, when needed.
    pub(crate) fn send_hello(&self) {
        if self.extensions {
            let hello = ext::hello(ext::VERSION, ext::CAPABILITIES);
            if let Ok((_, cell)) = self.submit(Outgoing::control(ext::HELLO, &hello)) {
                *self.hello.lock() = Some(cell);
            }
        }
    }

    /// True if the peer has said, in the hello's answer or its own hello,
    /// that it can do `capability`.
    pub(crate) fn peer_can(&self, capability: u64) -> bool {
        self.peer_caps()
            .is_some_and(|caps| caps.is_some_and(|caps| caps & capability != 0))
    }

    /// What the peer can do: `None` until known, `Some(None)` if it has no
    /// extensions (or this end has them off).
    pub(crate) fn peer_caps(&self) -> Option<Option<u64>> {
        if !self.extensions {
            return Some(None);
        }
        if let Some(caps) = self.peer_caps.get() {
            return Some(*caps);
        }
        // No lock is held while another is taken: the hello's cell is
        // cloned out, and whoever takes its answer records what it says.
        let cell = self.hello.lock().clone()?;
        let answer = cell.try_take()?;
        if matches!(answer, Err(Error::ResponseTaken)) {
            // Another thread took it, and is recording it now.
            return self.peer_caps.get().copied();
        }
        let mine = self.hello.lock().take();
        drop(mine);
        self.table.recycle(cell);
        // Refused by a peer of the base protocol: no extensions.
        let caps = match answer {
            Ok(rsp) => match ext::read_hello(&rsp.payload) {
                Ok((_, caps)) => Some(caps & ext::CAPABILITIES),
                Err(e) => {
                    debug!("{}: peer's hello does not decode: {e}", self.name);
                    None
                }
            },
            Err(e) => {
                debug!("{}: peer has no extensions: {e}", self.name);
                None
            }
        };
        Some(*self.peer_caps.get_or_init(|| caps))
    }

    /// The deadline packet for this end's request `(channel, tag)`, due at
    /// `at`, on a tag of the control channel whose answer nobody waits for.
    fn deadline_note(&self, channel: u64, tag: u64, at: Instant) -> Option<DeadlineNote> {
        let (control_tag, cell) = self.table.register(CONTROL_CHANNEL).ok()?;
        self.table.remove(CONTROL_CHANNEL, control_tag);
        self.table.recycle(cell);
        let payload = ext::deadline(channel, tag);
        let head = Head::new(
            CONTROL_CHANNEL,
            control_tag,
            PacketKind::Request {
                rq_type: ext::DEADLINE,
                flags: 0,
            },
            payload.len(),
        );
        let mut packet = head.as_bytes().to_vec();
        packet.extend_from_slice(&payload);
        Some(DeadlineNote {
            ms_at: packet.len() - 4,
            packet,
            at,
        })
    }

    /// Sends a control request whose answer nobody waits for; false if
    /// the connection is ending.
    fn send_control(&self, rq_type: u64, payload: &[u8]) -> bool {
        match self.submit(Outgoing::control(rq_type, payload)) {
            Ok((tag, cell)) => {
                self.table.remove(CONTROL_CHANNEL, tag);
                self.table.recycle(cell);
                true
            }
            Err(_) => false,
        }
    }

    /// Sends a ping whose answer nobody waits for: the answer is traffic,
    /// which is all a keepalive needs. Never blocks. False if it could not
    /// be sent: the connection is ending, or this end's requests have ended
    /// and the peer has no extensions to answer a ping after that.
    pub(crate) fn send_ping(&self) -> bool {
        if !self.may_ping() {
            return false;
        }
        let sent = self.send_control(ext::PING, &[]);
        self.outbox.flush_soon(false);
        sent
    }

    /// This end reads nothing for now (its handler queue is full), but is
    /// there: a ping tells a peer with the extensions so.
    fn show_alive(&self) {
        if self.peer_can(ext::CAN_PING) {
            let _ = self.send_control(ext::PING, &[]);
            self.outbox.flush_soon(false);
        }
    }

    /// A ping may go: before this end's ERQ to any peer (it answers a
    /// request, even one it refuses), after it to a peer with the
    /// extensions only.
    fn may_ping(&self) -> bool {
        self.outbox.phase() == Phase::Open || self.peer_can(ext::CAN_PING)
    }

    /// This end gives up on its request `(channel, tag)`: with extensions,
    /// the peer is asked to stop it.
    pub(crate) fn cancelled(&self, channel: u64, tag: u64) {
        if self.peer_can(ext::CAN_CANCEL) {
            let _ = self.send_control(ext::CANCEL, &ext::cancel(channel, tag));
            // Not worth a grace: the peer may be spending work on it now.
            self.outbox.flush_soon(false);
        }
    }

    /// Sends a ping on the reserved channel and waits for its answer, or
    /// until `deadline`. A refusal is an answer too: a peer of the base
    /// protocol refuses the ping, and so shows it is there.
    pub(crate) fn ping(&self, started: Instant, deadline: Option<Instant>) -> Result<()> {
        if !self.may_ping() {
            return Err(Error::Closed);
        }
        let (tag, cell) = self.submit(Outgoing {
            admission: Admission::Until(deadline),
            ..Outgoing::control(ext::PING, &[])
        })?;
        self.outbox.flush_soon(false);
        self.recall_reader();
        let answer = cell.wait_until(deadline);
        if answer.is_none() {
            self.table.remove(CONTROL_CHANNEL, tag);
        }
        self.table.recycle(cell);
        match answer {
            Some(Ok(_) | Err(Error::Failed { .. })) => Ok(()),
            Some(Err(e)) => Err(e),
            None => Err(Error::Timeout {
                request: Some(RequestId {
                    channel: CONTROL_CHANNEL,
                    tag,
                    rq_type: ext::PING,
                }),
                waited: started.elapsed(),
            }),
        }
    }

    /// Refuses the peer's request `(channel, tag)` for load, without running
    /// it: `owed` bytes of replies wait for the peer to read them.
    fn refuse_busy(&self, channel: u64, tag: u64) {
        let owed = self.outbox.reply_bytes();
        self.stats
            .recv
            .busy_refusals
            .fetch_add(1, Ordering::Relaxed);
        let reason = format!("busy: {owed} bytes of replies wait for this peer to read them");
        warn!("{}: refusing request {channel}:{tag}: {reason}", self.name);
        self.refuse(channel, tag, reason, BUSY_FLAGS);
    }

    /// Answers the peer's request `(channel, tag)` with a not-ok reply,
    /// without running it. The caller logs why, at the level it deserves.
    pub(crate) fn refuse(&self, channel: u64, tag: u64, reason: String, flags: u64) {
        let outcome = Outcome {
            ok: false,
            flags,
            payload: reason.into_bytes(),
        };
        self.reply(channel, tag, outcome, false);
        self.outbox.arm();
    }

    /// Runs the handler on a request taken in by `receive_request`: on a worker, or
    /// on the thread that reads (`reading`) for an inline handler.
    fn serve(&self, mut rq: Request, deadline: Option<Instant>, reading: bool) {
        let (channel, tag) = (rq.channel, rq.tag);
        // The link to the peer's cancels is made here, on the thread that
        // serves the request, which also drops it: its count is not moved
        // between the receive thread's core and the handlers'.
        if self.extensions {
            rq.ctx = Some(RequestCtx {
                inbox: Arc::clone(&self.inbound),
                deadline,
            });
        }
        if !reading {
            // Taken in while the replies owed were under budget; if they
            // have reached it since, this one is refused for load now,
            // without running: what a peer that does not read can make this
            // end hold stays bounded, and nothing waits for the peer.
            if self.outbox.at_reply_budget() {
                self.answering(channel, tag, reading);
                self.refuse_busy(channel, tag);
                return self.finish_request(false);
            }
        }
        // Cancelled by the peer, or past its deadline, before a handler took
        // it: not run. (A request that has arrived still runs if only the
        // stream has broken: the peer may have wanted it done.)
        let peer_cancelled = self.extensions && self.inbound.peer_cancelled(channel, tag);
        if peer_cancelled || rq.time_left().is_some_and(|left| left.is_zero()) {
            let reason = if peer_cancelled {
                "cancelled before it ran"
            } else {
                "deadline passed before it ran"
            };
            // The peer's own doing, in ordinary use: not worth a warning.
            debug!("{}: refusing request {channel}:{tag}: {reason}", self.name);
            self.answering(channel, tag, reading);
            self.refuse(channel, tag, reason.to_string(), 0);
            return self.finish_request(reading);
        }
        // A request that has arrived is served, even if its reply can no
        // longer be sent (the peer may only have wanted it done); after this
        // end's abort, nothing more runs.
        let aborted = self.aborted.load(Ordering::SeqCst);
        let outcome = match (&self.handler, aborted) {
            (Some(handler), false) => {
                let before =
                    SERVING.with(|serving| serving.replace(self as *const Shared as usize));
                let outcome = run_handler(&self.name, handler, rq);
                SERVING.with(|serving| serving.set(before));
                Some(outcome)
            }
            _ => None,
        };
        self.answering(channel, tag, reading);
        if let Some(outcome) = outcome {
            self.reply(channel, tag, outcome, true);
        }
        self.finish_request(reading);
    }

    /// The peer's request `(channel, tag)` is answered, its reply about to be
    /// queued: its tag is free for the peer again from now (it may reuse it
    /// as soon as it reads the reply), and it can no longer be cancelled.
    /// [`finish_request`](Shared::finish_request) follows the reply.
    /// A request served on the thread that reads was counted as replying
    /// when it was taken in, and never entered `in_progress`.
    fn answering(&self, channel: u64, tag: u64, reading: bool) {
        if reading {
            return;
        }
        let mut inbound = self.inbound.lock();
        self.inbound.answered(&mut inbound, channel, tag);
        self.inbound.replying.fetch_add(1, Ordering::SeqCst);
    }

    /// A reply to one of the peer's requests is queued. If it was
    /// the last one owed before EOF, queue EOF. Otherwise, if no more
    /// replies are about to follow (no request waits for a handler, and the
    /// receive thread has nothing left to parse), write now: the peer may be
    /// waiting. Neither the thread that reads (`reading`) nor, on a socket,
    /// a handler thread blocks in that write: what the stream does not take
    /// within its short write timeout is the send thread's. A handler
    /// thread that waited for a peer to read would be lost to every other
    /// request, and to every other client of a server, whose connections
    /// share the pool.
    fn finish_request(&self, reading: bool) {
        if self.replied() {
            return;
        }
        let jobs_queued = self.quota.queued() > 0;
        if jobs_queued || self.more_incoming.load(Ordering::SeqCst) {
            // More replies are about to follow: `before_read` or the grace
            // writes them together.
            self.outbox.arm();
        } else if reading {
            self.write_nonblocking(true);
        } else if self.handlers_write {
            let failed = self.outbox.write_now_from_handler(&self.stats);
            self.after_write(failed);
        } else {
            self.outbox.flush_soon(true);
        }
    }

    /// A reply or refusal counted in `replying` is queued: counts it out,
    /// and queues EOF if it was the last one owed once closing. True if it
    /// queued EOF.
    fn replied(&self) -> bool {
        // The lock is taken only for the last reply owed once closing. Both
        // this and `close_inbound` write one flag (`replying` here,
        // `closing` there) before they read the other, all SeqCst, so at
        // least one of them sees both and, if nothing is in progress,
        // queues EOF (queuing it twice is harmless).
        let last = self.inbound.replying.fetch_sub(1, Ordering::SeqCst) == 1;
        let eof_due = last && self.inbound.is_closing() && {
            let inbound = self.inbound.lock();
            self.inbound.is_idle(&inbound)
        };
        if eof_due {
            self.outbox.push_eof(&self.stats);
        }
        eof_due
    }

    /// Delivers a response from the peer to the request it answers. False
    /// if it reaches no waiting request of this end's (one cancelled, or
    /// answered already, or never made).
    pub(crate) fn deliver(&self, channel: u64, tag: u64, res: Result<Response>) -> bool {
        match self.table.complete(channel, tag, res) {
            Completion::Delivered => true,
            Completion::Cancelled => {
                debug!(
                    "{}: dropped response to cancelled request {channel}:{tag}",
                    self.name
                );
                false
            }
            Completion::Unknown => {
                warn!(
                    "{}: dropped response to unknown request {channel}:{tag}",
                    self.name
                );
                false
            }
        }
    }

    /// The peer sent ERQ. Its hook runs later, on the receive thread
    /// ([`run_erq_hook`](Shared::run_erq_hook)), even if a caller read it.
    pub(crate) fn peer_ended_requests(&self) {
        debug!("{}: peer sent end of requests", self.name);
        self.inbound.lock().peer_ended_requests = true;
        if self.on_peer_end_requests.is_some() {
            self.erq_hook_due.store(true, Ordering::SeqCst);
        }
    }

    /// Runs the hook of the peer's ERQ if it is due: on the receive thread,
    /// after the packet that carried it.
    pub(crate) fn run_erq_hook(&self) {
        if self.erq_hook_due.swap(false, Ordering::SeqCst) {
            if let Some(hook) = &self.on_peer_end_requests {
                // The hook may take its time: the requests read before the
                // ERQ do not wait for it, nor for the read after it.
                if let Some(pool) = &self.pool {
                    pool.wake();
                }
                hook();
            }
        }
    }

    /// The receive thread is about to block in `read`: wake the workers for
    /// the requests it has queued, and have the replies already queued
    /// (refusals among them) written now, unless a handler is about to
    /// write them with its own.
    pub(crate) fn before_read(&self) {
        self.more_incoming(false);
        if let Some(pool) = &self.pool {
            pool.wake();
        }
        let jobs_queued = self.quota.queued() > 0;
        if !jobs_queued {
            self.write_nonblocking(true);
        }
    }

    /// Whether the receive thread has bytes it has not parsed yet.
    pub(crate) fn more_incoming(&self, more: bool) {
        // Stored only when it changes: the handlers read it after every
        // request, and a store for every packet would take its cache line
        // from them each time.
        if self.more_incoming.load(Ordering::SeqCst) != more {
            self.more_incoming.store(more, Ordering::SeqCst);
        }
    }

    /// Writes the queue on this thread if nobody else is writing. Blocks
    /// while the stream does: only for threads that may block without a
    /// deadline.
    pub(crate) fn write_now(&self) {
        let failed = self.outbox.write_now(&self.stats);
        self.after_write(failed);
    }

    /// Writes the queue on the thread that reads, without blocking; with
    /// `replies_only`, only if replies are queued.
    fn write_nonblocking(&self, replies_only: bool) {
        let failed = self.outbox.write_now_nonblocking(replies_only, &self.stats);
        self.after_write(failed);
    }

    /// Runs the send loop until EOF is written or the side dies.
    pub(crate) fn run_send_loop(&self) {
        let failed = self.outbox.run_send_loop(&self.stats);
        self.after_write(failed);
        self.loop_ended(Loops::SEND);
    }

    /// The send thread panicked (in a writer or logger of the user's, or a
    /// bug): nothing writes any more, so the connection fails as if a
    /// write had, and what is pending or queued fails, so that nobody
    /// waits for ever. Nothing is logged: the panic may have come from the
    /// logger.
    pub(crate) fn send_panicked(&self) {
        // How far the writers got, read in the same hold that stops them: a
        // request taken by a writer in between is not reported unsent.
        let written_to = self.outbox.abort();
        let e = io::Error::other("the send thread panicked");
        let why = broken(&e);
        self.life.lock().write_error.get_or_insert(Error::Io(e));
        self.table.fail_all(why, written_to);
        self.inbound.cut_off();
        self.interrupt();
        self.recall_reader();
        self.loop_ended(Loops::SEND);
    }

    /// The one place a failed write is handled: every pending request fails,
    /// and the stream is interrupted where the transport allows, which ends
    /// the receive thread.
    fn after_write(&self, failed: Option<WriteFailed>) {
        let Some(WriteFailed(e)) = failed else {
            return;
        };
        let n_failed = self.table.fail_all(broken(&e), self.outbox.written_to());
        self.inbound.cut_off();
        {
            let mut life = self.life.lock();
            // After the peer's EOF, a write that fails is no error: the peer
            // has gone, as it said it would.
            if let Some(why) = Expired::of(&e) {
                life.expired.get_or_insert(why);
            }
            if life.recv_end != Some(Disconnect::PeerEof) {
                error!(
                    "{}: send side failed ({e}); failed {n_failed} pending requests",
                    self.name
                );
                life.write_error.get_or_insert(Error::Io(e));
            } else {
                debug!("{}: write after the peer's EOF failed: {e}", self.name);
            }
        }
        self.interrupt();
    }

    /// Sends ERQ, once: this end makes no more requests.
    pub(crate) fn end_requests(&self) {
        if self.outbox.end_requests(&self.stats) {
            // Contained: the close goes on after this line.
            debug!("{}: sent end of requests", self.name);
        }
    }

    /// Starts the orderly shutdown without waiting: ERQ now, refuse new
    /// requests from the peer, and EOF once the handlers have answered what
    /// they hold. Never blocks.
    pub(crate) fn begin_close(&self) {
        self.end_requests();
        self.close_inbound();
    }

    /// Refuses new requests from the peer, and queues EOF once none is in
    /// progress.
    fn close_inbound(&self) {
        let idle = {
            let mut inbound = self.inbound.lock();
            self.inbound.close(&mut inbound);
            self.inbound.is_idle(&inbound)
        };
        // The peer's EOF is to be read promptly now.
        self.recall_reader();
        if idle {
            self.outbox.push_eof(&self.stats);
        }
    }

    /// Stops everything now: drops what is queued, fails what is pending,
    /// stops the handler pool taking new work, and interrupts the stream
    /// where the transport allows it. Never blocks.
    pub(crate) fn abort(&self) {
        {
            let mut life = self.life.lock();
            if life.ended.is_some() {
                return;
            }
            life.aborted = true;
            self.aborted.store(true, Ordering::SeqCst);
        }
        {
            let mut inbound = self.inbound.lock();
            self.inbound.close(&mut inbound);
        }
        self.inbound.cut_off();
        let written_to = self.outbox.abort();
        let n_failed = self.table.fail_all(Disconnect::Local, written_to);
        self.close_pool();
        self.interrupt();
        self.recall_reader();
        // Last: a logger that panics leaves nothing undone.
        debug!("{}: aborted; failed {n_failed} pending requests", self.name);
    }

    /// Serving a request of the peer's panicked after its handler ran (in
    /// the library's logging, with a logger of the user's that panics, or
    /// a bug): whether its reply is queued is unknown, so the connection is
    /// aborted, which gives every request at either end an outcome. Nothing
    /// is logged but under a catch: the panic may have come from the
    /// logger.
    fn job_panicked(&self) {
        error!(
            "{}: serving a request panicked after its handler ran: aborting",
            self.name
        );
        sync::contained(|| self.abort());
    }

    /// The receive loop has ended, with the peer's EOF, the end of the
    /// stream, or an error: this end's requests end (those not yet written
    /// are dropped, since nobody will answer them), what is pending fails,
    /// the handler threads end once they have finished what is queued, and
    /// this end's close begins.
    pub(crate) fn receive_ended(&self, res: Result<Disconnect>, unread: Vec<u8>) {
        // What ended it is recorded before anything is logged: a logger of
        // the user's that panics here leaves `receive_panicked` the rest.
        let log_res = match &res {
            Ok(why) => Ok(*why),
            Err(e) => Err(e.to_string()),
        };
        let why = self.record_receive_end(res, unread);
        match log_res {
            Ok(Disconnect::PeerEof) => debug!("{}: peer EOF", self.name),
            Ok(why) => warn!("{}: {why}", self.name),
            Err(e) => error!("{}: receive failed: {e}", self.name),
        }
        let n_failed = self.finish_receive(why);
        if n_failed > 0 {
            warn!("{}: {n_failed} requests lost: {why}", self.name);
        }
        self.loop_ended(Loops::RECV);
    }

    /// Records how the receive loop ended, once, and stops the handler
    /// pool taking new work; returns why it ended.
    fn record_receive_end(&self, res: Result<Disconnect>, unread: Vec<u8>) -> Disconnect {
        self.close_pool();
        let why = match &res {
            Ok(why) => *why,
            Err(Error::Io(e)) => broken(e),
            Err(_) => Disconnect::Protocol,
        };
        let mut life = self.life.lock();
        if let Err(Error::Io(e)) = &res {
            if let Some(why) = Expired::of(e) {
                life.expired.get_or_insert(why);
            }
        }
        life.recv_end = Some(why);
        life.recv_error = res.err();
        life.unread = unread;
        why
    }

    /// The end of the receive loop, after it is recorded: this end's
    /// requests end, what is pending fails, and this end's close begins.
    /// Logs nothing; each step may be done again. Returns how many pending
    /// requests failed.
    fn finish_receive(&self, why: Disconnect) -> usize {
        if why != Disconnect::PeerEof {
            self.inbound.cut_off();
        }
        let written_to = self.outbox.end_requests_dropping_unsent(&self.stats);
        let n_failed = self.table.fail_all(why, written_to);
        if matches!(
            why,
            Disconnect::Silent | Disconnect::Idle | Disconnect::NoAnswer
        ) {
            // This end has given up on a peer that may be gone without
            // closing: a write blocked on it is interrupted, where the
            // transport allows, so that the connection ends now. (A peer
            // that closed, or sent garbage, fails or drains the writes by
            // itself.)
            self.interrupt();
        }
        self.close_inbound();
        n_failed
    }

    /// The receive thread panicked (in a hook or logger of the user's that
    /// runs there, or a bug): the connection ends as if its stream had
    /// failed, or as the thread had begun to end it, so that no request
    /// waits for ever. The socket is shut down, so that the peer sees the
    /// end, and nothing more is sent: the panic may have come while a reply
    /// was owed (an inline handler's, or a refusal), which would keep EOF
    /// from being queued for ever. Nothing is logged: the panic may have
    /// come from the logger.
    pub(crate) fn receive_panicked(&self) {
        self.interrupt();
        let recorded = self.life.lock().recv_end;
        let why = recorded.unwrap_or_else(|| {
            let e = io::Error::other("the receive thread panicked");
            self.record_receive_end(Err(Error::Io(e)), Vec::new())
        });
        self.finish_receive(why);
        self.outbox.abort();
        self.close_pool();
        self.loop_ended(Loops::RECV);
    }

    /// No more jobs come from this connection: its own pool's workers end
    /// once they have run what is queued, and a receive thread waiting for
    /// room goes on. A shared pool is woken for the jobs this connection
    /// queued last: the receive thread wakes the workers before a read
    /// that may block, and there is no read after the last packet (a
    /// request read with the peer's EOF would wait for another
    /// connection's read).
    fn close_pool(&self) {
        self.quota.close();
        match (&self.pool, self.owns_pool) {
            (Some(pool), true) => pool.close(),
            (Some(pool), false) => pool.wake(),
            (None, _) => {}
        }
    }

    /// One of the two loops has ended (each is counted once); after the
    /// second, the connection has, and the hooks run.
    fn loop_ended(&self, which: Loops) {
        let why = {
            let mut life = self.life.lock();
            if life.loops_ended.0 & which.0 != 0 {
                return;
            }
            life.loops_ended.0 |= which.0;
            if life.loops_ended != Loops::BOTH {
                return;
            }
            let why = life.why();
            life.ended = Some(why);
            why
        };
        // Under a catch: a logger that panics here must not keep the hooks
        // from running (this thread's catch would find the loop counted).
        debug!("{}: ended: {why}", self.name);
        // Nothing is left to interrupt: dropping the hook unrun closes what
        // it held (a socket's last descriptor of ours).
        drop(self.interrupt.lock().take());
        // Hooks of the application's: one that panics must not keep the
        // next from running, nor end the thread that runs them.
        let release = self.release.lock().take();
        if let Some(release) = release {
            sync::caught(&self.name, "the on_close hook", release);
        }
        let hook = self.on_end.lock().take();
        if let Some(hook) = hook {
            sync::caught(&self.name, "on_end", || hook(why));
        }
    }

    /// Runs the interrupt hook, the first time only.
    fn interrupt(&self) {
        let hook = self.interrupt.lock().take();
        if let Some(hook) = hook {
            // The application's `on_close`, for `connect_with`: it runs in
            // `abort`, or on a thread of the library's, and must not stop
            // what follows it.
            sync::caught(&self.name, "the on_close hook", hook);
        }
    }

    /// The receive thread, having just delivered a response with nothing
    /// left to parse, lends its reader to the callers, if it may: the
    /// caller whose response was just delivered is likely to call again at
    /// once, and a caller that reads for itself is woken by the stream, not
    /// by this thread. Returns the reader once the lease has run out with no
    /// caller reading, or at once when recalled; or, if a caller read the
    /// end of the stream, that end, for this thread to act on.
    pub(crate) fn lend_reader(self: &Arc<Self>, source: Box<dyn PacketSource>) -> Returned {
        if !self.may_lend || self.busy() {
            return Returned::Reader(source);
        }
        // The reader may rest lent for a whole lease, read by nobody: what
        // a read that may block does first is done now, so that a request
        // read just before the response runs, and its reply goes, at once.
        self.before_read();
        let mut lending = self.lending.lock();
        lending.holder = Holder::Lent;
        lending.source = Some(source);
        lending.since = Instant::now();
        lending.checked = lending.since;
        lending.lease = LEASE;
        lending.recall = false;
        // The keeper takes the reader back once it has rested unread for
        // its lease (it may be looking already, from an earlier lending).
        // Without a keeper, this thread looks itself. (Not under the lock:
        // no thread holds two.)
        let mut keeperless = false;
        if !lending.watched {
            lending.watched = true;
            let lender: Weak<dyn Watched> = Arc::downgrade(self) as Weak<Shared>;
            let first = lending.since + LOOK;
            keeperless = !MutexGuard::unlocked(&mut lending, || keeper::watch(lender, first));
            // Nothing watches: the next lending tries the keeper again.
            lending.watched = !keeperless;
        }
        // Looked at again once the reader is lent: a waiter that submitted,
        // or a close that began, after the first look recalled the reader,
        // or looked for it to read, while this thread still held it, and
        // found nothing to do. (Not under the lock: no thread holds two.)
        if MutexGuard::unlocked(&mut lending, || self.busy()) {
            lending.recall = true;
        }
        // Sleeps until the reader is wanted back: recalled by the keeper
        // once the lease has run out, by a waiter that does not read, by a
        // caller handing it back with bytes left to parse or others
        // waiting, or by the close; or until a caller has read the end.
        loop {
            if let Some((res, unread)) = lending.ended.take() {
                lending.holder = Holder::Done;
                return Returned::Ended(res, unread);
            }
            match lending.holder {
                Holder::Lent if lending.recall => {
                    lending.holder = Holder::Recv;
                    let source = lending.source.take().expect("a lent reader is there");
                    return Returned::Reader(source);
                }
                Holder::Lent | Holder::Caller if keeperless => {
                    self.lent.wait_for(&mut lending, LOOK);
                    MutexGuard::unlocked(&mut lending, || self.look(Instant::now()));
                    // This thread looks, not the keeper.
                    lending.watched = false;
                }
                Holder::Lent | Holder::Caller => self.lent.wait(&mut lending),
                Holder::Recv | Holder::Done => {
                    unreachable!("only this thread takes the reader back")
                }
            }
        }
    }
}

/// The connection's two loops, as bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Loops(u8);

impl Loops {
    const SEND: Loops = Loops(1);
    const RECV: Loops = Loops(2);
    const BOTH: Loops = Loops(3);
}

/// Held by a caller reading with the lent reader: if the caller unwinds,
/// the reader is lost with it, and the receive thread, which waits for it,
/// is told to end the connection.
struct ReaderLost<'a>(&'a Shared);

impl ReaderLost<'_> {
    /// The caller reads no more: the reader is not lost.
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for ReaderLost<'_> {
    fn drop(&mut self) {
        let mut lending = self.0.lending.lock();
        let e = io::Error::other("a caller reading for its response panicked");
        lending.ended.get_or_insert((Err(Error::Io(e)), Vec::new()));
        drop(lending);
        self.0.lent.notify_all();
    }
}

/// The lease keeper looks at a lent reader this often.
const LOOK: Duration = Duration::from_millis(10);

/// The keeper's look at the lent reader: takes it back once it has rested
/// unread for its lease.
impl Watched for Shared {
    fn look(&self, now: Instant) -> Option<Instant> {
        let mut lending = self.lending.lock();
        let mut recall = false;
        let mut next = now + LOOK;
        let again = match lending.holder {
            Holder::Lent if lending.recall => false,
            Holder::Lent => {
                if lending.since > lending.checked {
                    // A caller has read since the last look: the next one
                    // is likely to come soon.
                    lending.checked = lending.since;
                    lending.lease = (lending.lease * 2).min(MAX_LEASE);
                }
                recall = now >= lending.since + lending.lease;
                lending.recall |= recall;
                !recall
            }
            // A caller blocked for its response holds the reader for most
            // of a call: callers are reading, and the reader is not looked
            // at again for a whole lease (a look further off falls on a
            // coarser grid, shared by more connections' looks).
            Holder::Caller => {
                lending.lease = MAX_LEASE;
                next = now + MAX_LEASE;
                true
            }
            Holder::Recv | Holder::Done => false,
        };
        lending.watched = again;
        drop(lending);
        if recall {
            self.lent.notify_all();
        }
        again.then_some(next)
    }
}

impl Shared {
    /// Whether the receive thread must read on rather than lend its
    /// reader: requests of this end are pending, or the close has begun.
    fn busy(&self) -> bool {
        self.table.len() > 0 || self.inbound.is_closing()
    }

    /// A caller about to wait for `cell` reads the stream itself if the
    /// reader is lent, until its response has come; true if it did. It
    /// hands the reader back at once if a packet needs the receive thread:
    /// the end of the stream, or the peer's ERQ whose hook is due.
    pub(crate) fn read_for(self: &Arc<Self>, cell: &Cell) -> bool {
        let mut source = {
            let mut lending = self.lending.lock();
            if lending.holder != Holder::Lent || lending.recall {
                return false;
            }
            match lending.source.take() {
                Some(source) => {
                    lending.holder = Holder::Caller;
                    source
                }
                None => return false,
            }
        };
        // A panic while this thread reads (in a logger of the user's, or a
        // bug) must not leave the reader held for ever: the receive thread
        // ends the connection.
        let lost = ReaderLost(self);
        let mut recall = false;
        // Whether a packet other than a response was read: a request of the
        // peer's, whose job or reply may wait on what comes before a read.
        let mut served = false;
        while !cell.is_ready() {
            match source.step(self) {
                Step::Ended(res) => {
                    // The receive thread ends the connection, and fails
                    // this caller's request with the rest.
                    lost.disarm();
                    let unread = source.unread(&res);
                    let mut lending = self.lending.lock();
                    lending.ended = Some((res, unread));
                    drop(lending);
                    self.lent.notify_all();
                    return true;
                }
                Step::Read { .. } if self.erq_hook_due.load(Ordering::SeqCst) => {
                    recall = true;
                    break;
                }
                Step::Read { delivered } => served |= !delivered,
            }
        }
        lost.disarm();
        // Bytes left to parse: the receive thread reads on at once. Else the
        // lease goes on, for the next call, and the reader may rest unread
        // for all of it: if a request of the peer's was read, what a read
        // that may block does first is done now, so that a request read
        // just before this caller's response runs, and its reply goes, at
        // once.
        recall |= !source.idle();
        if !recall && served {
            self.before_read();
        }
        let mut lending = self.lending.lock();
        lending.source = Some(source);
        lending.holder = Holder::Lent;
        lending.since = Instant::now();
        lending.recall |= recall;
        let mut wake = lending.recall;
        drop(lending);
        // Others waiting are looked for once the reader is back, as in
        // `lend_reader`: a caller that registered its request before this
        // look is seen here, and one that registers after it finds the
        // reader lent.
        if !wake && self.table.len() > 0 {
            self.lending.lock().recall = true;
            wake = true;
        }
        if wake {
            self.lent.notify_all();
        }
        true
    }

    /// Has the receive thread take its reader back at once, if it is lent.
    /// Never blocks.
    pub(crate) fn recall_reader(&self) {
        let mut lending = self.lending.lock();
        if matches!(lending.holder, Holder::Lent | Holder::Caller) {
            lending.recall = true;
            drop(lending);
            self.lent.notify_all();
        }
    }

    /// What `close` and `join` return, once the connection has ended.
    pub(crate) fn result(&self) -> Result<()> {
        self.life.lock().result()
    }

    /// Bytes the receive thread read past the peer's EOF packet, once.
    pub(crate) fn take_unread(&self) -> Vec<u8> {
        std::mem::take(&mut self.life.lock().unread)
    }

    /// Where the connection is in its life.
    pub(crate) fn status(&self) -> Status {
        let (peer_requests_ended, closing) = {
            let inbound = self.inbound.lock();
            (inbound.peer_ended_requests, inbound.closing)
        };
        Status {
            requests_ended: self.outbox.phase() != Phase::Open,
            peer_requests_ended,
            closing,
            ended: self.life.lock().ended,
        }
    }

    /// True if no request is pending either way.
    pub(crate) fn is_idle(&self) -> bool {
        self.table.len() == 0 && self.inbound.serves_nothing(&self.inbound.lock())
    }

    /// A snapshot of the counters and the queue depths.
    pub(crate) fn stats(&self) -> Stats {
        let depths = self.outbox.depths();
        self.stats.snapshot(Depths {
            pending: self.table.len() as u64,
            in_progress: self.inbound.in_flight(&self.inbound.lock()) as u64,
            requests_waiting: self.quota.queued() as u64,
            queued_bytes: depths.bytes as u64,
            queued_packets: depths.packets as u64,
            queued_replies: depths.replies as u64,
        })
    }
}
