//! The connection: configuration, the state its threads share, submitting
//! requests, and the orderly shutdown.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Disconnect, Error, Result};
use crate::handler::{JobQueue, Outcome, RequestHandler};
use crate::packet::{Kind, DEFAULT_MAX_PACKET_LEN, MAX_HEAD_LEN};
use crate::pending::{Cell, PendingTable, Response, TagSet};
use crate::receiver;
use crate::sender::{Outbox, WriteFailed};
use crate::stats::{Counters, Stats};

/// Settings for a [`PacketConnection`], built from `Default` with by-value
/// setters. Cheap to clone.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use packetstream::{Config, Request};
///
/// let config = Config::default()
///     .name("server")
///     .packet_grace(Duration::from_millis(2))
///     .handler_threads(8)
///     .handler(|rq: Request| Ok(rq.payload.into()));
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct Config {
    pub(crate) name: String,
    pub(crate) packet_grace: Duration,
    pub(crate) handler_threads: usize,
    pub(crate) handler_queue: Option<usize>,
    pub(crate) max_packet_len: u64,
    pub(crate) max_queued_bytes: usize,
    pub(crate) max_queued_packets: usize,
    pub(crate) handler: Option<Arc<dyn RequestHandler>>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            name: "packetstream".to_string(),
            packet_grace: Duration::from_millis(10),
            handler_threads: 4,
            handler_queue: None,
            max_packet_len: DEFAULT_MAX_PACKET_LEN,
            max_queued_bytes: 8 << 20,
            max_queued_packets: 1 << 16,
            handler: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("name", &self.name)
            .field("packet_grace", &self.packet_grace)
            .field("handler_threads", &self.handler_threads)
            .field("handler_queue", &self.handler_queue_len())
            .field("max_packet_len", &self.max_packet_len)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("max_queued_packets", &self.max_queued_packets)
            .field("handler", &self.handler.is_some())
            .finish()
    }
}

impl Config {
    /// The connection's name, used in its threads' names
    /// (`"{name}:recv"`, `"{name}:send"`, `"{name}:handler{idx}"`) and in log
    /// lines. Default: `"packetstream"`.
    pub fn name(mut self, name: impl Into<String>) -> Config {
        self.name = name.into();
        self
    }

    /// How long queued packets may wait for company before they are written,
    /// so that bursts go out in few writes. A caller that blocks for a
    /// response never waits it out: its queue is written at once. Zero
    /// writes as soon as the queue is idle. Default: 10 ms, as the reference.
    pub fn packet_grace(mut self, grace: Duration) -> Config {
        self.packet_grace = grace;
        self
    }

    /// The number of threads that run the handler. Default: 4, as the
    /// reference. At least 1.
    pub fn handler_threads(mut self, n: usize) -> Config {
        self.handler_threads = n.max(1);
        self
    }

    /// How many received requests may wait for a handler thread before the
    /// receive thread stops reading. Their payloads are bounded too, by
    /// [`max_queued_bytes`](Config::max_queued_bytes). Default: 256.
    pub fn handler_queue(mut self, n: usize) -> Config {
        self.handler_queue = Some(n.max(1));
        self
    }

    /// The longest packet accepted or sent, its length prefix excluded.
    /// Checked before any buffer is allocated. Default: 64 MiB.
    pub fn max_packet_len(mut self, len: u64) -> Config {
        self.max_packet_len = len;
        self
    }

    /// How many unwritten bytes the outgoing queue holds before `submit`
    /// blocks (and `try_submit_on` fails). Replies and control packets are
    /// never held back by it. The same budget bounds the payload bytes of
    /// received requests waiting for a handler thread (one request is always
    /// let through, however large). Default: 8 MiB.
    pub fn max_queued_bytes(mut self, n: usize) -> Config {
        self.max_queued_bytes = n.max(1);
        self
    }

    /// How many unwritten packets the outgoing queue holds before `submit`
    /// blocks. Default: 65536.
    pub fn max_queued_packets(mut self, n: usize) -> Config {
        self.max_queued_packets = n.max(1);
        self
    }

    /// The handler that serves the peer's requests. Without one, every
    /// request from the peer gets a not-ok reply, "no request handler".
    pub fn handler(mut self, handler: impl RequestHandler) -> Config {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// Like [`handler`](Config::handler), for a handler already shared.
    pub fn shared_handler(mut self, handler: Arc<dyn RequestHandler>) -> Config {
        self.handler = Some(handler);
        self
    }

    fn handler_queue_len(&self) -> usize {
        self.handler_queue.unwrap_or(DEFAULT_HANDLER_QUEUE)
    }
}

/// Requests that may wait for a handler thread, by default. Large enough that
/// the receive thread rarely blocks on a burst (at 16, the old default of
/// four per thread, blocking and waking it dominated a pipelined profile);
/// memory is bounded by the queue's byte budget.
const DEFAULT_HANDLER_QUEUE: usize = 256;

/// A hook run once when the connection is finished with its stream, or must
/// unblock its receive thread (on abort or a write error).
pub type OnClose = Option<Box<dyn FnOnce() + Send>>;

/// The peer's requests being handled here, and whether more are welcome.
#[derive(Default)]
pub(crate) struct Dispatch {
    pub(crate) in_flight: TagSet,
    /// The peer sent ERQ: it will send no more requests.
    pub(crate) peer_erq: bool,
    /// This end is closing: EOF goes out once `in_flight` is empty.
    pub(crate) closing: bool,
}

/// How the receive loop ended.
pub(crate) struct RecvEnd {
    pub(crate) error: Option<Error>,
}

/// What the connection's threads share.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) max_packet_len: u64,
    pub(crate) handler: Option<Arc<dyn RequestHandler>>,
    pub(crate) table: PendingTable,
    pub(crate) outbox: Outbox,
    pub(crate) dispatch: Mutex<Dispatch>,
    /// The peer's requests waiting for a handler thread.
    pub(crate) jobs: JobQueue,
    /// The receive thread has buffered bytes it has not parsed yet.
    pub(crate) more_incoming: AtomicBool,
    /// Whether a handler thread may write the stream itself. Only with more
    /// than one: while one is blocked on a write the others still take
    /// requests, so the receive thread never waits on the peer.
    pub(crate) handlers_write: bool,
    pub(crate) stats: Counters,
    recv_end: Mutex<Option<RecvEnd>>,
    recv_done: Condvar,
    on_close: Mutex<OnClose>,
}

impl Shared {
    /// Queues a reply; a write failure tears the connection down.
    pub(crate) fn send_outcome(&self, channel: u64, tag: u64, outcome: Outcome) {
        let Outcome {
            mut ok,
            mut flags,
            mut payload,
        } = outcome;
        // Reply bodies past the limit would be refused by the peer.
        if payload.len() as u64 + MAX_HEAD_LEN as u64 > self.max_packet_len {
            log::error!(
                "reply to {channel}:{tag} of {} bytes exceeds limit of {}",
                payload.len(),
                self.max_packet_len
            );
            payload = format!(
                "reply of {} bytes exceeds limit of {}",
                payload.len(),
                self.max_packet_len
            )
            .into_bytes();
            (ok, flags) = (false, 0);
        }
        let counter = if ok {
            &self.stats.replies.replies_ok
        } else {
            &self.stats.replies.replies_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        log::trace!(
            "==> reply {channel}:{tag} ok={ok} flags={flags:#x} len={}",
            payload.len()
        );
        let kind = Kind::Response { ok, flags };
        let failed = self
            .outbox
            .push_reply(channel, tag, kind, payload, &self.stats);
        self.check_write(failed);
    }

    /// A handler finished the peer's request `(channel, tag)`, whose reply
    /// is queued. If no more replies are about to follow (no request waits
    /// for a handler, and the receive thread has nothing left to parse),
    /// write now: the peer may be waiting.
    pub(crate) fn finish_request(&self, channel: u64, tag: u64) {
        let (idle, closing) = {
            let mut dispatch = self.dispatch.lock();
            dispatch.in_flight.remove(&(channel, tag));
            (dispatch.in_flight.is_empty(), dispatch.closing)
        };
        if idle && closing {
            self.outbox.push_eof(&self.stats);
        } else if self.jobs.is_empty() && !self.more_incoming.load(Ordering::SeqCst) {
            if self.handlers_write {
                let failed = self.outbox.flush_now(&self.stats);
                self.check_write(failed);
            } else {
                self.outbox.flush_replies_soon();
            }
        } else {
            self.outbox.arm();
        }
    }

    /// The receive thread is about to block for more bytes: if no request
    /// waits for a handler, replies already queued (refusals among them) go
    /// out now; a handler still running writes its own when it finishes.
    pub(crate) fn reader_idle(&self) {
        self.more_incoming.store(false, Ordering::SeqCst);
        if self.jobs.is_empty() {
            self.outbox.flush_replies_soon();
        }
    }

    pub(crate) fn check_write(&self, failed: WriteFailed) {
        if let Some(kind) = failed {
            let n_failed = self.table.fail_all(Disconnect::Io(kind));
            log::error!(
                "{}: send side failed ({kind}); failed {n_failed} pending requests",
                self.name
            );
            self.run_on_close();
        }
    }

    /// Sends ERQ once.
    pub(crate) fn end_requests(&self) {
        if self.outbox.push_erq(&self.stats) {
            log::debug!("{}: sent end of requests", self.name);
        }
    }

    /// Starts the orderly shutdown without waiting: ERQ now, refuse new
    /// requests from the peer, and EOF once the handlers have answered what
    /// they hold.
    pub(crate) fn begin_close(&self) {
        self.end_requests();
        let idle = {
            let mut dispatch = self.dispatch.lock();
            dispatch.closing = true;
            dispatch.in_flight.is_empty()
        };
        if idle {
            self.outbox.push_eof(&self.stats);
        }
    }

    /// Stops everything now: fails what is pending, drops what is queued and
    /// unblocks the receive thread where the transport allows it.
    pub(crate) fn abort(&self) {
        self.dispatch.lock().closing = true;
        let n_failed = self.table.fail_all(Disconnect::Local);
        self.outbox.abort();
        log::debug!("{}: aborted; failed {n_failed} pending requests", self.name);
        self.run_on_close();
    }

    pub(crate) fn run_on_close(&self) {
        let hook = self.on_close.lock().take();
        if let Some(hook) = hook {
            hook();
        }
    }

    /// Records how the receive loop ended and wakes `join`.
    pub(crate) fn set_recv_end(&self, end: RecvEnd) {
        *self.recv_end.lock() = Some(end);
        self.recv_done.notify_all();
    }

    fn wait_recv_end(&self, deadline: Option<Instant>) -> bool {
        let mut end = self.recv_end.lock();
        while end.is_none() {
            match deadline {
                None => self.recv_done.wait(&mut end),
                Some(deadline) => {
                    if self.recv_done.wait_until(&mut end, deadline).timed_out() {
                        return end.is_some();
                    }
                }
            }
        }
        true
    }

    fn take_recv_error(&self) -> Option<Error> {
        self.recv_end
            .lock()
            .as_mut()
            .and_then(|end| end.error.take())
    }
}

/// A bidirectional packet connection: either end sends requests and answers
/// the other's.
///
/// Owns three kinds of threads: a receive thread, a send thread, and a pool
/// of handler threads for the peer's requests; the crate documentation's
/// "Threads" section says what runs where. `close` (or `join`, for a
/// server waiting for its client to finish) ends them in order; dropping the
/// connection starts the same shutdown without waiting for it.
pub struct PacketConnection {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for PacketConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketConnection")
            .field("name", &self.shared.name)
            .field("stats", &self.stats())
            .finish()
    }
}

impl PacketConnection {
    /// Starts a connection that receives from `recv` and sends to `send`.
    ///
    /// `recv` is read through a `BufReader` on the receive thread; `send` is
    /// written in batches, so neither needs buffering of its own.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if a thread cannot be spawned.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::os::unix::net::UnixStream;
    /// use packetstream::{Config, PacketConnection, Reply, Request};
    ///
    /// let (a, b) = UnixStream::pair()?;
    /// let server = PacketConnection::new(
    ///     b.try_clone()?,
    ///     b,
    ///     Config::default().handler(|rq: Request| Ok(Reply::payload(rq.payload))),
    /// )?;
    /// let client = PacketConnection::new(a.try_clone()?, a, Config::default())?;
    /// assert_eq!(client.call(0, 0, b"hi")?.payload, b"hi");
    /// client.close()?;
    /// server.join()?;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn new<R, W>(recv: R, send: W, config: Config) -> Result<PacketConnection>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        PacketConnection::with_on_close(Box::new(recv), Box::new(send), None, config)
    }

    pub(crate) fn with_on_close(
        recv: Box<dyn Read + Send>,
        send: Box<dyn Write + Send>,
        on_close: OnClose,
        config: Config,
    ) -> Result<PacketConnection> {
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            max_packet_len: config.max_packet_len,
            handler: config.handler.clone(),
            table: PendingTable::new(),
            outbox: Outbox::new(
                send,
                config.packet_grace,
                config.max_queued_bytes,
                config.max_queued_packets,
                config.max_packet_len,
            ),
            dispatch: Mutex::new(Dispatch::default()),
            jobs: JobQueue::new(
                config.handler_queue_len(),
                config.max_queued_bytes,
                if config.handler.is_some() {
                    config.handler_threads
                } else {
                    0
                },
            ),
            more_incoming: AtomicBool::new(false),
            handlers_write: config.handler_threads > 1,
            stats: Counters::default(),
            recv_end: Mutex::new(None),
            recv_done: Condvar::new(),
            on_close: Mutex::new(on_close),
        });
        let conn = PacketConnection {
            shared: Arc::clone(&shared),
            threads: Mutex::new(Vec::new()),
        };
        let name = &config.name;
        let res = (|| -> io::Result<()> {
            let mut threads = conn.threads.lock();
            if let Some(handler) = &config.handler {
                for idx in 0..config.handler_threads {
                    let (shared, handler) = (Arc::clone(&shared), Arc::clone(handler));
                    threads.push(spawn(format!("{name}:handler{idx}"), move || {
                        receiver::run_worker(&shared, &handler)
                    })?);
                }
            }
            let sender_shared = Arc::clone(&shared);
            threads.push(spawn(format!("{name}:send"), move || {
                let failed = sender_shared.outbox.run_send_loop(&sender_shared.stats);
                sender_shared.check_write(failed);
            })?);
            let recv_shared = Arc::clone(&shared);
            threads.push(spawn(format!("{name}:recv"), move || {
                receiver::run_recv_loop(&recv_shared, recv)
            })?);
            Ok(())
        })();
        if let Err(e) = res {
            shared.jobs.close();
            shared.abort();
            return Err(Error::Io(e));
        }
        log::debug!("{name}: started");
        Ok(conn)
    }

    /// The connection's name, from [`Config::name`].
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Sends a request on channel 0 and returns at once with a handle to its
    /// response. Blocks only while the outgoing queue is full.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] after `end_requests`, `close` or the end of the
    /// connection; [`Error::ConnectionLost`] if the connection has failed;
    /// [`Error::TooLarge`] if the packet would exceed the maximum length.
    pub fn submit(&self, rq_type: u64, flags: u64, payload: &[u8]) -> Result<PendingResponse> {
        self.submit_inner(0, rq_type, flags, payload, true, false)
    }

    /// Like [`submit`](PacketConnection::submit), on `channel`. Each channel
    /// has its own tag sequence. The reference implementation serves only
    /// channel 0 and refuses other channels with a not-ok response.
    ///
    /// # Errors
    ///
    /// As for [`submit`](PacketConnection::submit).
    pub fn submit_on(
        &self,
        channel: u64,
        rq_type: u64,
        flags: u64,
        payload: &[u8],
    ) -> Result<PendingResponse> {
        self.submit_inner(channel, rq_type, flags, payload, true, false)
    }

    /// Like [`submit`](PacketConnection::submit), but fails with
    /// [`Error::WouldBlock`] instead of blocking when the outgoing queue is
    /// full.
    ///
    /// # Errors
    ///
    /// As for [`submit`](PacketConnection::submit), and
    /// [`Error::WouldBlock`].
    pub fn try_submit(&self, rq_type: u64, flags: u64, payload: &[u8]) -> Result<PendingResponse> {
        self.submit_inner(0, rq_type, flags, payload, false, false)
    }

    /// Like [`submit_on`](PacketConnection::submit_on), but fails with
    /// [`Error::WouldBlock`] instead of blocking when the outgoing queue is
    /// full.
    ///
    /// # Errors
    ///
    /// As for [`submit`](PacketConnection::submit), and
    /// [`Error::WouldBlock`].
    pub fn try_submit_on(
        &self,
        channel: u64,
        rq_type: u64,
        flags: u64,
        payload: &[u8],
    ) -> Result<PendingResponse> {
        self.submit_inner(channel, rq_type, flags, payload, false, false)
    }

    fn submit_inner(
        &self,
        channel: u64,
        rq_type: u64,
        flags: u64,
        payload: &[u8],
        block: bool,
        will_flush: bool,
    ) -> Result<PendingResponse> {
        let shared = &self.shared;
        let (tag, cell) = shared.table.register(channel)?;
        let kind = Kind::Request { rq_type, flags };
        match shared.outbox.push_request(
            channel,
            tag,
            kind,
            payload,
            block,
            will_flush,
            &shared.stats,
        ) {
            Ok(failed) => shared.check_write(failed),
            Err(err) => {
                shared.table.remove(channel, tag);
                shared.table.recycle(cell);
                return Err(err);
            }
        }
        shared
            .stats
            .send
            .requests_sent
            .fetch_add(1, Ordering::Relaxed);
        log::trace!(
            "==> request {channel}:{tag} rq_type={rq_type} flags={flags:#x} len={}",
            payload.len()
        );
        Ok(PendingResponse {
            shared: Arc::clone(shared),
            channel,
            tag,
            cell: Some(cell),
        })
    }

    /// Sends a request on channel 0 and waits for its response.
    ///
    /// # Errors
    ///
    /// As for [`submit`](PacketConnection::submit) and
    /// [`PendingResponse::wait`].
    pub fn call(&self, rq_type: u64, flags: u64, payload: &[u8]) -> Result<Response> {
        self.call_on(0, rq_type, flags, payload)
    }

    /// Like [`call`](PacketConnection::call), on `channel`.
    ///
    /// # Errors
    ///
    /// As for [`call`](PacketConnection::call).
    pub fn call_on(
        &self,
        channel: u64,
        rq_type: u64,
        flags: u64,
        payload: &[u8],
    ) -> Result<Response> {
        // The caller blocks right away, and `wait` writes the queue before it
        // does: no need to wake the send thread to time a grace.
        self.submit_inner(channel, rq_type, flags, payload, true, true)?
            .wait()
    }

    /// Like [`call`](PacketConnection::call), decoding the ok response into
    /// `T`.
    ///
    /// # Errors
    ///
    /// As for [`call`](PacketConnection::call), and [`Error::Decode`] if the
    /// response does not decode.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::os::unix::net::UnixStream;
    /// # use packetstream::{Config, PacketConnection, Request};
    /// # let (a, b) = UnixStream::pair()?;
    /// # let server = PacketConnection::from_unix_stream(b, Config::default()
    /// #     .handler(|rq: Request| Ok(format!("len={}", rq.payload.len()).into())))?;
    /// # let client = PacketConnection::from_unix_stream(a, Config::default())?;
    /// let text: String = client.call_as(3, 0, b"abcd")?;
    /// assert_eq!(text, "len=4");
    /// # client.close()?;
    /// # server.join()?;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn call_as<T: FromResponse>(&self, rq_type: u64, flags: u64, payload: &[u8]) -> Result<T> {
        T::from_response(self.call(rq_type, flags, payload)?)
    }

    /// Sends the end-of-requests packet: this end will send no more
    /// requests, and the peer may stop serving it. Later `submit`s fail with
    /// [`Error::Closed`]. Responses to requests already sent still arrive.
    pub fn end_requests(&self) {
        self.shared.end_requests();
    }

    /// A snapshot of the connection's counters: packets and bytes each way,
    /// writes, requests sent and received, their outcomes, and the requests
    /// pending and in progress now. Cheap (atomic loads and two short
    /// locks), so it can be taken at any time from any thread, for a
    /// progress line or a health check; the `progress` example draws one.
    pub fn stats(&self) -> Stats {
        let in_progress = self.shared.dispatch.lock().in_flight.len() as u64;
        self.shared
            .stats
            .snapshot(self.shared.table.len() as u64, in_progress)
    }

    /// Closes the connection in order and waits for the end:
    ///
    /// 1. sends ERQ, so the peer knows no more requests come;
    /// 2. refuses new requests from the peer, and lets the handlers finish
    ///    the ones in progress, their replies going out;
    /// 3. sends EOF, last;
    /// 4. waits for the peer's EOF, which ends the receive thread, and joins
    ///    every thread. Responses to this end's requests that arrive before
    ///    the peer's EOF are still delivered; requests still pending at the
    ///    peer's EOF fail with [`Error::ConnectionLost`].
    ///
    /// Calling it again, or after `join`, returns `Ok(())` at once.
    ///
    /// # Errors
    ///
    /// The first error that ended the connection: [`Error::Io`],
    /// [`Error::Malformed`] or [`Error::TooLarge`].
    ///
    /// # Panics
    ///
    /// Re-raises a panic of one of the connection's threads (handler panics
    /// are caught and never reach here).
    pub fn close(&self) -> Result<()> {
        self.shared.begin_close();
        self.join_until(None)
    }

    /// Like [`close`](PacketConnection::close), but gives up at `timeout`:
    /// then every request still pending fails with
    /// [`Error::ConnectionLost`], what is still queued is dropped, and the
    /// threads are left to end by themselves.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the deadline passed; otherwise as for
    /// [`close`](PacketConnection::close).
    pub fn close_timeout(&self, timeout: Duration) -> Result<()> {
        self.shared.begin_close();
        let res = self.join_until(Some(Instant::now() + timeout));
        if matches!(res, Err(Error::Timeout)) {
            self.shared.abort();
        }
        res
    }

    /// Starts the orderly close of [`close`](PacketConnection::close)
    /// without waiting for it.
    pub(crate) fn begin_close(&self) {
        self.shared.begin_close();
    }

    /// Stops at once: every pending request fails with
    /// [`Error::ConnectionLost`], queued packets are dropped, no EOF is sent,
    /// and the stream is shut down where the transport allows it (sockets).
    /// Does not wait for the threads.
    pub fn abort(&self) {
        self.shared.abort();
    }

    /// Waits until the peer has sent EOF (or the stream ended or failed),
    /// this end has answered everything in progress and sent its own EOF,
    /// and every thread has ended. This is how a server waits for its
    /// client to finish. It does not start a shutdown itself: call
    /// [`close`](PacketConnection::close) for that.
    ///
    /// # Errors
    ///
    /// As for [`close`](PacketConnection::close).
    ///
    /// # Panics
    ///
    /// As for [`close`](PacketConnection::close).
    pub fn join(&self) -> Result<()> {
        self.join_until(None)
    }

    fn join_until(&self, deadline: Option<Instant>) -> Result<()> {
        let shared = &self.shared;
        if !shared.wait_recv_end(deadline) || !shared.outbox.wait_finished(deadline) {
            return Err(Error::Timeout);
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        let mut panic = None;
        for handle in threads {
            if let Err(payload) = handle.join() {
                panic.get_or_insert(payload);
            }
        }
        shared.run_on_close();
        if let Some(payload) = panic {
            std::panic::resume_unwind(payload);
        }
        if let Some(err) = shared.take_recv_error() {
            return Err(err);
        }
        if let Some(err) = shared.outbox.take_error() {
            return Err(Error::Io(err));
        }
        Ok(())
    }
}

impl Drop for PacketConnection {
    /// Starts the orderly shutdown and returns without waiting: the threads
    /// finish by themselves once the peer has sent EOF.
    fn drop(&mut self) {
        self.shared.begin_close();
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name).spawn(f)
}

/// A handle to the response of a submitted request.
///
/// Dropping it without taking the response cancels the request locally: its
/// entry is freed at once, and a late response is then dropped quietly.
pub struct PendingResponse {
    shared: Arc<Shared>,
    channel: u64,
    tag: u64,
    cell: Option<Arc<Cell>>,
}

impl fmt::Debug for PendingResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingResponse")
            .field("channel", &self.channel)
            .field("tag", &self.tag)
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl PendingResponse {
    /// The request's channel.
    pub fn channel(&self) -> u64 {
        self.channel
    }

    /// The request's tag.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    fn cell(&self) -> &Cell {
        self.cell
            .as_ref()
            .expect("the cell lives as long as the handle")
    }

    /// Waits for the response.
    ///
    /// # Errors
    ///
    /// [`Error::Failed`] for a not-ok response; [`Error::ConnectionLost`] if
    /// the connection ended first.
    pub fn wait(self) -> Result<Response> {
        self.wait_deadline(None)
    }

    /// Waits at most `timeout` for the response. On timeout the request stays
    /// pending and can be waited on again, or cancelled.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], or as for [`wait`](PendingResponse::wait). Once the
    /// response has been taken, [`Error::Cancelled`].
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Response> {
        self.wait_deadline(Some(Instant::now() + timeout))
    }

    fn wait_deadline(&self, deadline: Option<Instant>) -> Result<Response> {
        let cell = self.cell();
        if let Some(res) = cell.try_take() {
            return res;
        }
        // About to block: nothing this end has queued may wait for the grace.
        self.flush();
        cell.wait_until(deadline).unwrap_or(Err(Error::Timeout))
    }

    fn flush(&self) {
        let failed = self.shared.outbox.flush_now(&self.shared.stats);
        self.shared.check_write(failed);
    }

    /// Takes the response if it has arrived, without blocking.
    pub fn try_wait(&self) -> Option<Result<Response>> {
        self.cell().try_take()
    }

    /// True once the response (or the connection's end) has arrived.
    pub fn is_ready(&self) -> bool {
        self.cell().is_ready()
    }

    /// Waits for the response and decodes it into `T`.
    ///
    /// # Errors
    ///
    /// As for [`wait`](PendingResponse::wait), and [`Error::Decode`].
    pub fn wait_as<T: FromResponse>(self) -> Result<T> {
        T::from_response(self.wait()?)
    }

    /// Stops waiting: the request's entry is freed, and a late response is
    /// dropped quietly. The peer may still act on the request.
    pub fn cancel(self) {}
}

impl Drop for PendingResponse {
    fn drop(&mut self) {
        if let Some(cell) = self.cell.take() {
            if !cell.is_ready() {
                self.shared.table.cancel(self.channel, self.tag);
            }
            self.shared.table.recycle(cell);
        }
    }
}

/// Types an ok [`Response`] decodes into, for
/// [`call_as`](PacketConnection::call_as) and
/// [`wait_as`](PendingResponse::wait_as). The impls mirror the reply shapes
/// of [`Reply`](crate::Reply).
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
