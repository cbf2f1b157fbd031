//! The connection handle: starting a connection's threads, submitting
//! requests, waiting for responses, and the orderly shutdown.

use std::fmt;
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Error, RequestId, Result};
use crate::ext::CONTROL_CHANNEL;
use crate::outbox::{Admission, Control};
use crate::pending::{Cell, Completion};
use crate::pool::{Order, Pool};
use crate::receiver::{self, ReadTimeouts};
use crate::reply::{FromResponse, Response};
use crate::shared::{Hook, Job, Outgoing, Shared, Status};
use crate::stats::Stats;
use crate::sync::{deadline_after, ThreadSet};

/// The hook [`connect_with`](PacketConnection::connect_with) may return
/// with its streams: run once, when the connection is finished with them,
/// or earlier, to unblock its receive thread (on abort or a failed write).
/// A panic in it is caught and logged: `abort` still returns, and
/// [`Config::on_end`](crate::Config::on_end) still runs.
pub type OnClose = Box<dyn FnOnce() + Send>;

/// What a constructor hands over: the two halves of the stream, and what to
/// run to interrupt them (on abort or a failed write) and to release them
/// (once the connection has ended).
pub(crate) struct Streams {
    pub(crate) recv: Box<dyn Read + Send>,
    pub(crate) send: Box<dyn Write + Send>,
    /// For a socket: shutdown and non-blocking writes.
    pub(crate) control: Option<Arc<dyn Control>>,
    pub(crate) interrupt: Option<Hook>,
    pub(crate) release: Option<Hook>,
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
    threads: Arc<ThreadSet>,
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
    /// written in batches, so neither needs buffering of its own. The
    /// connection owns both and drops them once it has ended. It cannot
    /// interrupt a read or write blocked in them: see
    /// [`abort`](PacketConnection::abort) for what that means.
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
        let streams = Streams {
            recv: Box::new(recv),
            send: Box::new(send),
            control: None,
            interrupt: None,
            release: None,
        };
        PacketConnection::start(streams, config)
    }

    pub(crate) fn start(streams: Streams, config: Config) -> Result<PacketConnection> {
        PacketConnection::start_in(streams, config, None)
    }

    /// Starts a connection whose handler runs on `pool`, shared with other
    /// connections, instead of a pool of its own.
    pub(crate) fn start_in(
        streams: Streams,
        config: Config,
        shared_pool: Option<&Arc<Pool<Job>>>,
    ) -> Result<PacketConnection> {
        let Streams {
            recv,
            send,
            control,
            interrupt,
            release,
        } = streams;
        let name = &config.name;
        let threads = Arc::new(ThreadSet::default());
        let pool = match (&config.handler, shared_pool) {
            (None, _) => None,
            (Some(_), _) if config.inline => None,
            (Some(_), Some(pool)) => Some((Arc::clone(pool), false)),
            (Some(_), None) => {
                let pool = Pool::start(
                    name,
                    config.handler_threads,
                    config.handler_queue,
                    Order::Fifo,
                    &threads,
                )?;
                Some((pool, true))
            }
        };
        let timeouts = read_timeouts(&config, control.as_ref());
        let shared = Arc::new(Shared::new(
            &config, send, control, pool, interrupt, release,
        ));
        let conn = PacketConnection {
            shared: Arc::clone(&shared),
            threads: Arc::clone(&threads),
        };
        let sender = Arc::clone(&shared);
        let spawned = threads
            .spawn(format!("{name}:send"), move || {
                if catch_unwind(AssertUnwindSafe(|| sender.run_send_loop())).is_err() {
                    sender.send_panicked();
                }
            })
            .and_then(|()| {
                let receiver = Arc::clone(&shared);
                threads.spawn(format!("{name}:recv"), move || {
                    let run =
                        AssertUnwindSafe(|| receiver::run_recv_loop(&receiver, recv, timeouts));
                    if catch_unwind(run).is_err() {
                        receiver.receive_panicked();
                    }
                })
            });
        if let Err(e) = spawned {
            // The threads already started end: the pool is closed, the send
            // loop sees the side dead.
            shared.abort();
            return Err(Error::Io(e));
        }
        shared.send_hello();
        debug!("{name}: started");
        Ok(conn)
    }

    /// The connection's name, from [`Config::name`].
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Sends a request on channel 0 and returns with a handle to its
    /// response. Blocks while the outgoing queue is full; and a payload of
    /// 64 KiB or more is written from this thread, without a copy, when no
    /// other thread is writing, so that it returns once the stream has
    /// taken it (a peer that reads nothing holds it there: use
    /// [`try_submit`](PacketConnection::try_submit) or
    /// [`submit_timeout`](PacketConnection::submit_timeout), which never
    /// write, where that matters).
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] after `end_requests`, `close` or the end of the
    /// connection; [`Error::ConnectionLost`] if the connection has failed;
    /// [`Error::TooLarge`] if the packet would exceed the maximum length.
    pub fn submit(&self, rq_type: u64, flags: u64, payload: &[u8]) -> Result<PendingResponse> {
        self.submit_on(0, rq_type, flags, payload)
    }

    /// Like [`submit`](PacketConnection::submit), on `channel`. Each channel
    /// has its own tag sequence. The reference implementation serves only
    /// channel 0 and refuses other channels with a not-ok response.
    ///
    /// # Errors
    ///
    /// As for [`submit`](PacketConnection::submit), and
    /// [`Error::ReservedChannel`] for [`CONTROL_CHANNEL`].
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::os::unix::net::UnixStream;
    /// # use packetstream::{Config, PacketConnection, Request};
    /// # let (a, b) = UnixStream::pair()?;
    /// let server = PacketConnection::from_unix_stream(
    ///     b,
    ///     Config::default().handler(|rq: Request| Ok(rq.channel.into())),
    /// )?;
    /// let client = PacketConnection::from_unix_stream(a, Config::default())?;
    /// assert_eq!(client.call_on(5, 1, 0, b"")?.flags, 5);
    /// assert_eq!(client.submit_on(5, 1, 0, b"")?.tag(), 1); // channel 5's second tag
    /// # client.close()?;
    /// # server.join()?;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn submit_on(
        &self,
        channel: u64,
        rq_type: u64,
        flags: u64,
        payload: &[u8],
    ) -> Result<PendingResponse> {
        self.submit_with(Outgoing::new(channel, rq_type, flags, payload))
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
        self.try_submit_on(0, rq_type, flags, payload)
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
        self.submit_with(Outgoing {
            admission: Admission::NoWait,
            ..Outgoing::new(channel, rq_type, flags, payload)
        })
    }

    /// Submits `rq`, unless it is on the extensions' channel.
    fn submit_with(&self, rq: Outgoing<'_>) -> Result<PendingResponse> {
        if rq.channel == CONTROL_CHANNEL {
            return Err(Error::ReservedChannel(rq.channel));
        }
        let (tag, cell) = self.shared.submit(rq)?;
        Ok(PendingResponse {
            shared: Arc::clone(&self.shared),
            channel: rq.channel,
            tag,
            rq_type: rq.rq_type,
            cell: Some(cell),
            deadline: None,
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
        self.submit_with(Outgoing {
            then_writes: true,
            ..Outgoing::new(channel, rq_type, flags, payload)
        })?
        .wait()
    }

    /// Like [`call`](PacketConnection::call), but gives up at `timeout`:
    /// it waits for room in the outgoing queue and for the response only
    /// until then, and never writes the stream itself, so it returns in time
    /// whatever the peer does. On a timeout the request is given up as
    /// [`PendingResponse::cancel`] does: its entry is freed and a late
    /// response is dropped. With [extensions](Config::extensions) on both
    /// ends the peer gets the deadline with the request
    /// ([`Request::time_left`](crate::Request::time_left)), does not start
    /// it once the deadline has passed, and is asked to stop it at the
    /// timeout; without, the peer may still act on it. A `timeout` too
    /// long for an `Instant`, such as `Duration::MAX`, means no limit.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], naming the request and how long it waited;
    /// [`Error::WouldBlock`] if the outgoing queue stayed full until the
    /// deadline (nothing was sent); otherwise as for
    /// [`call`](PacketConnection::call).
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::os::unix::net::UnixStream;
    /// # use std::time::Duration;
    /// # use packetstream::{Config, Error, PacketConnection, Request};
    /// # let (a, b) = UnixStream::pair()?;
    /// let server = PacketConnection::from_unix_stream(b, Config::default().handler(
    ///     |rq: Request| {
    ///         std::thread::sleep(Duration::from_millis(rq.flags));
    ///         Ok(().into())
    ///     },
    /// ))?;
    /// let client = PacketConnection::from_unix_stream(a, Config::default())?;
    /// client.call_timeout(7, 0, b"", Duration::from_secs(10))?;
    /// let err = client.call_timeout(7, 500, b"", Duration::from_millis(50)).unwrap_err();
    /// assert!(err.is_timeout());
    /// assert!(err.to_string().starts_with("request 0:3 (rq_type 7) timed out after"));
    /// # client.close()?;
    /// # server.join()?;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn call_timeout(
        &self,
        rq_type: u64,
        flags: u64,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Response> {
        self.submit_timeout(rq_type, flags, payload, timeout)?
            .wait()
    }

    /// Like [`submit`](PacketConnection::submit), for a request that must
    /// be answered within `timeout`: it waits for room in the outgoing
    /// queue only until then, and its handle's waits end then, with
    /// [`Error::Timeout`]. With [extensions](Config::extensions) on both
    /// ends the peer gets the deadline with the request, and does not start
    /// it once the deadline has passed. [`call_timeout`](PacketConnection::call_timeout)
    /// is this and a `wait`.
    ///
    /// # Errors
    ///
    /// [`Error::WouldBlock`] if the outgoing queue stayed full until the
    /// deadline (nothing was sent); otherwise as for
    /// [`submit`](PacketConnection::submit).
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::os::unix::net::UnixStream;
    /// # use std::time::Duration;
    /// # use packetstream::{Config, Error, PacketConnection, Request};
    /// # let (a, b) = UnixStream::pair()?;
    /// let server = PacketConnection::from_unix_stream(b, Config::default().handler(
    ///     |rq: Request| {
    ///         std::thread::sleep(Duration::from_millis(rq.flags));
    ///         // Says whether the request came with a deadline.
    ///         Ok(format!("{:?}", rq.time_left().is_some()).into())
    ///     },
    /// ))?;
    /// let client = PacketConnection::from_unix_stream(a, Config::default())?;
    /// // No deadline; and after one round trip, the hello has had its answer.
    /// assert_eq!(client.call(7, 0, b"")?.payload, b"false");
    /// let quick = client.submit_timeout(7, 0, b"", Duration::from_secs(10))?;
    /// let slow = client.submit_timeout(7, 500, b"", Duration::from_millis(50))?;
    /// assert_eq!(quick.wait()?.payload, b"true");
    /// assert!(slow.wait().unwrap_err().is_timeout());
    /// # client.close()?;
    /// # server.join()?;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn submit_timeout(
        &self,
        rq_type: u64,
        flags: u64,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<PendingResponse> {
        let started = Instant::now();
        let deadline = deadline_after(timeout);
        let mut pending = self.submit_with(Outgoing {
            admission: Admission::Until(deadline),
            deadline,
            ..Outgoing::new(0, rq_type, flags, payload)
        })?;
        pending.deadline = deadline.map(|deadline| (started, deadline));
        Ok(pending)
    }

    /// Whether the peer has [extensions](Config::extensions): `None` until
    /// its answer to this end's hello (or its own hello) has come, which is
    /// one round trip after the start; `Some(false)` for a peer of the base
    /// protocol, such as the reference, or if this end has them off.
    pub fn peer_extensions(&self) -> Option<bool> {
        self.shared.peer_caps().map(|caps| caps.is_some())
    }

    /// Sends a ping and waits at most `timeout` for the peer's answer;
    /// returns the round trip. A peer without [extensions](Config::extensions)
    /// refuses the ping, which is an answer all the same: it shows the peer
    /// reads and writes. A ping is a request on
    /// [`CONTROL_CHANNEL`], so it is sent whether or not extensions are on.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if no answer came in time; [`Error::Closed`] or
    /// [`Error::ConnectionLost`] as for [`call`](PacketConnection::call).
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::os::unix::net::UnixStream;
    /// # use std::time::Duration;
    /// # use packetstream::{Config, PacketConnection};
    /// let (a, b) = UnixStream::pair()?;
    /// let server = PacketConnection::from_unix_stream(b, Config::default())?;
    /// let client = PacketConnection::from_unix_stream(a, Config::default())?;
    /// let rtt = client.ping(Duration::from_secs(10))?;
    /// assert!(rtt < Duration::from_secs(10));
    /// # client.close()?;
    /// # server.join()?;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn ping(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        self.shared.ping(started, deadline_after(timeout))?;
        Ok(started.elapsed())
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
        self.shared.stats()
    }

    /// Waits until the outgoing queue has drained to its low-water mark
    /// ([`Config::low_queued_bytes`]), or until `timeout`: a producer that
    /// stops when `try_submit` reports the queue full
    /// ([`Error::WouldBlock`], the high mark) goes on from here, as with
    /// asyncio's `pause_writing` and `resume_writing`. Never writes itself.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] at the deadline; [`Error::Closed`] if the
    /// connection can no longer send.
    pub fn wait_drained(&self, timeout: Duration) -> Result<()> {
        self.shared.outbox.flush_soon(false);
        self.shared
            .outbox
            .wait_low(self.shared.low_water, deadline_after(timeout))
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
    /// [`Error::Malformed`] or [`Error::TooLarge`]. On a thread running one
    /// of this connection's handlers, [`Error::WouldBlock`] at once: the
    /// connection cannot end before that handler returns, so the wait would
    /// be for ever; the close has begun, and ends once it does.
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
    /// threads are left to end by themselves. Threads that have ended are
    /// let go rather than joined, since a join also waits for the thread's
    /// thread-locals (a logger's buffer, say) to be dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] if the deadline passed; otherwise as for
    /// [`close`](PacketConnection::close).
    pub fn close_timeout(&self, timeout: Duration) -> Result<()> {
        self.shared.begin_close();
        let res = self.join_until(deadline_after(timeout));
        if matches!(res, Err(Error::Timeout { .. })) {
            self.shared.abort();
        }
        res
    }

    /// Starts the orderly close of [`close`](PacketConnection::close)
    /// without waiting for it.
    pub(crate) fn begin_close(&self) {
        self.shared.begin_close();
    }

    /// Stops at once: every pending request fails, with
    /// [`Error::ConnectionLost`] if it was written and [`Error::Unsent`] if
    /// not; queued packets are dropped, no EOF is sent, and the stream is
    /// interrupted where the transport allows it. Never blocks, and does not
    /// wait for the threads.
    ///
    /// What it can interrupt depends on the transport:
    ///
    /// - sockets (`from_unix_stream`, `from_tcp_stream`, `connect_*`, a
    ///   server's connections, and `from_fd` or `from_borrowed_fd` of a
    ///   socket): the socket is shut down, so a read or write blocked in the
    ///   kernel returns at once and every thread ends;
    /// - [`connect_with`](PacketConnection::connect_with): its `on_close`
    ///   hook runs, and interrupts what it can;
    /// - anything else (`new` over any `Read` and `Write`, pipes,
    ///   `from_fds`, `stdio`, `from_child`): nothing in the kernel can be
    ///   interrupted. Our send stream is closed unless a write is in
    ///   progress; a write in progress ends when the peer reads or closes
    ///   its end, and the receive thread when the peer writes or closes. For
    ///   a child, killing it ends both.
    ///
    /// Either way every call with a deadline, the `try_*` calls, `drop` and
    /// this one return in time: only the threads are left to end by
    /// themselves.
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

    /// True on a thread running one of this connection's handlers.
    pub(crate) fn serving_here(&self) -> bool {
        self.shared.serving_here()
    }

    fn join_until(&self, deadline: Option<Instant>) -> Result<()> {
        if deadline.is_none() && self.shared.serving_here() {
            // A handler of this connection's: the connection cannot end
            // before the handler returns, so the wait would be for ever.
            return Err(Error::WouldBlock);
        }
        let started = Instant::now();
        if !self.threads.wait_until(deadline) {
            return Err(Error::Timeout {
                request: None,
                waited: started.elapsed(),
            });
        }
        if let Some(payload) = self.threads.join_or_let_go(deadline) {
            std::panic::resume_unwind(payload);
        }
        self.shared.result()
    }

    /// Waits for the connection's threads until `deadline`, and joins those
    /// that have ended, or with a deadline lets them go (see
    /// [`ThreadSet::join_or_let_go`](sync::ThreadSet::join_or_let_go)); true
    /// if all have ended. For a server, once the connection has ended: a
    /// thread's panic is logged, not raised.
    pub(crate) fn reap(&self, deadline: Option<Instant>) -> bool {
        let all = self.threads.wait_until(deadline);
        if self.threads.join_or_let_go(deadline).is_some() {
            // On a server's accept thread, which a panicking logger must not
            // end.
            let name = &self.shared.name;
            error!("{name}: a thread panicked");
        }
        all
    }

    /// Where the connection is in its life: whether either end has ended
    /// its requests, whether it is closing, and whether and how it has
    /// ended. Cheap, and callable from any thread.
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::os::unix::net::UnixStream;
    /// # use packetstream::{Config, Disconnect, PacketConnection};
    /// # let (a, b) = UnixStream::pair()?;
    /// # let server = PacketConnection::from_unix_stream(b, Config::default())?;
    /// let client = PacketConnection::from_unix_stream(a, Config::default())?;
    /// assert!(client.status().is_open());
    /// client.end_requests();
    /// assert!(client.status().requests_ended);
    /// client.close()?;
    /// assert_eq!(client.status().ended, Some(Disconnect::PeerEof));
    /// # server.join()?;
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// Takes the bytes the receive thread read past the peer's EOF packet,
    /// once the connection has ended (empty before, and after the first
    /// call). They belong to whatever the peer sends next on the same
    /// stream, such as the next connection over the same pair of pipes:
    /// start it with these bytes in front of the stream, as
    /// [`PacketConnection::new`] allows with `Read::chain`.
    pub fn take_unread(&self) -> Vec<u8> {
        self.shared.take_unread()
    }
}

impl Drop for PacketConnection {
    /// Starts the orderly shutdown and returns without waiting: the threads
    /// finish by themselves once the peer has sent EOF.
    fn drop(&mut self) {
        self.shared.begin_close();
    }
}

/// The read timeouts to enforce, if the config sets any and a blocked read
/// on the stream can be interrupted (a socket): the keeper looks at them
/// every quarter of the shortest (between 5 ms and 1 s).
fn read_timeouts(config: &Config, control: Option<&Arc<dyn Control>>) -> Option<ReadTimeouts> {
    let shortest = [config.packet_timeout, config.idle_timeout, config.keepalive]
        .into_iter()
        .flatten()
        .min()?;
    let control = control.filter(|control| control.interruptible_reads())?;
    Some(ReadTimeouts {
        packet: config.packet_timeout,
        idle: config.idle_timeout,
        keepalive: config.keepalive,
        slice: (shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1)),
        control: Arc::clone(control),
    })
}

/// A handle to the response of a submitted request.
///
/// Dropping it without taking the response cancels the request, as
/// [`cancel`](PendingResponse::cancel) does.
pub struct PendingResponse {
    shared: Arc<Shared>,
    channel: u64,
    tag: u64,
    rq_type: u64,
    cell: Option<Arc<Cell>>,
    /// When it was submitted and its deadline, if it has one.
    deadline: Option<(Instant, Instant)>,
}

impl fmt::Debug for PendingResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingResponse")
            .field("channel", &self.channel)
            .field("tag", &self.tag)
            .field("rq_type", &self.rq_type)
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

    /// Waits for the response; for a request with a deadline
    /// ([`submit_timeout`](PacketConnection::submit_timeout)), only until
    /// then, where it is given up as
    /// [`wait_timeout`](PendingResponse::wait_timeout) says.
    ///
    /// # Errors
    ///
    /// [`Error::Failed`] for a not-ok response; [`Error::ConnectionLost`] if
    /// the connection ended first; [`Error::Timeout`] at the deadline.
    pub fn wait(self) -> Result<Response> {
        if let Some((started, deadline)) = self.deadline {
            return self.wait_deadline(started, Some(deadline), true);
        }
        let cell = self.cell();
        if let Some(res) = cell.try_take() {
            return res;
        }
        // About to block, with no deadline to keep: write what this end has
        // queued now, rather than wait out the grace or a thread hop; then
        // read the response itself, if the receive thread has lent its
        // reader, rather than be woken by that thread.
        self.shared.write_now();
        self.shared.read_for(cell);
        cell.wait()
    }

    /// Waits at most `timeout` for the response. On timeout the request stays
    /// pending and can be waited on again, or cancelled; but a request with
    /// its own deadline ([`submit_timeout`](PacketConnection::submit_timeout))
    /// is waited for only until then, and given up there: its outcome is
    /// the timeout, a late response is dropped, and the peer (with the
    /// extensions) is asked to stop it. Returns within the timeout whatever
    /// the peer does: this thread does no I/O, and the send thread is asked
    /// to write what is queued at once. A `timeout` too long for an
    /// `Instant`, such as `Duration::MAX`, means no limit.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], or as for [`wait`](PendingResponse::wait). Once the
    /// response has been taken, [`Error::ResponseTaken`].
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Response> {
        let deadline = deadline_after(timeout);
        match self.deadline {
            // The request's own deadline comes first.
            Some((submitted, at)) if deadline.is_none_or(|deadline| at <= deadline) => {
                self.wait_deadline(submitted, Some(at), true)
            }
            _ => self.wait_deadline(Instant::now(), deadline, false),
        }
    }

    /// Waits until `deadline`. If it is the request's own deadline (`own`),
    /// the request is given up there: its outcome is the timeout, a late
    /// response is dropped, and the peer is asked to stop it.
    fn wait_deadline(
        &self,
        started: Instant,
        deadline: Option<Instant>,
        own: bool,
    ) -> Result<Response> {
        let cell = self.cell();
        if let Some(res) = cell.try_take() {
            return res;
        }
        // This thread neither writes nor reads: the send thread writes now,
        // and the receive thread reads now, if it had lent its reader.
        self.shared.outbox.flush_soon(false);
        self.shared.recall_reader();
        if let Some(res) = cell.wait_until(deadline) {
            return res;
        }
        let timeout = Error::Timeout {
            request: Some(RequestId {
                channel: self.channel,
                tag: self.tag,
                rq_type: self.rq_type,
            }),
            waited: started.elapsed(),
        };
        if !own {
            return Err(timeout);
        }
        // The timeout is the request's outcome, unless its response (or the
        // connection's end) has just come: whichever takes the entry from
        // the table fills the cell, and the other gets what it filled.
        let given_up = self
            .shared
            .table
            .complete(self.channel, self.tag, Err(timeout));
        if given_up == Completion::Delivered {
            self.shared.cancelled(self.channel, self.tag);
        }
        cell.wait()
    }

    /// Takes the response if it has arrived, without blocking.
    pub fn try_wait(&self) -> Option<Result<Response>> {
        let res = self.cell().try_take();
        if res.is_none() {
            // Somebody must read it: the receive thread, if it lent its
            // reader.
            self.shared.recall_reader();
        }
        res
    }

    /// True once the response (or the connection's end) has arrived.
    pub fn is_ready(&self) -> bool {
        let ready = self.cell().is_ready();
        if !ready {
            self.shared.recall_reader();
        }
        ready
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
    /// dropped quietly. With [extensions](Config::extensions) on both ends
    /// the peer is asked to stop the request too
    /// ([`Request::is_cancelled`](crate::Request::is_cancelled)); without,
    /// the peer may still act on it. Dropping the handle does the same.
    pub fn cancel(self) {}
}

impl Drop for PendingResponse {
    fn drop(&mut self) {
        if let Some(cell) = self.cell.take() {
            if !cell.is_ready() {
                self.shared.table.remove(self.channel, self.tag);
                self.shared.cancelled(self.channel, self.tag);
            }
            self.shared.table.recycle(cell);
        }
    }
}
