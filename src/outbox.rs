//! The send side: the outgoing queue, its phases, who may write it and when.
//!
//! The queue plays the part of a `BufWriter` that several threads can fill
//! while a write is in progress: packets are encoded straight into `buf`, and
//! the thread that writes swaps `buf` for an empty spare, writes the full one
//! without holding the lock, and swaps back. Payloads of
//! [`LARGE_PAYLOAD`] bytes or more are not copied into `buf`: a reply's is
//! queued by move, as a segment written right after its head, and a
//! request's is written straight from the caller's slice when the caller may
//! write.
//!
//! The phases are explicit ([`Phase`]) and every admission checks the phase
//! under the same lock hold that appends the packet, so nothing can slip in
//! after ERQ or EOF. No thread ever waits for another thread's write: one
//! thread at a time has the writer role (`writing`), it takes the stream out
//! of the state for the write, and it keeps writing until the queue is
//! empty, so bytes appended during a write go out right after it. Which
//! threads may take the role is in ARCHITECTURE.md ("Who writes").

use std::io::{self, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::error::{Disconnect, Error, Expired, Result};
use crate::packet::{read_body_head, Head, Packet, PacketKind};
use crate::stats::{Counters, SendCounters};
use crate::varint;

/// Payloads at least this long are not copied into the queue: a request's
/// is written straight from the caller's slice if the caller may write, a
/// reply's is queued by move.
pub(crate) const LARGE_PAYLOAD: usize = 64 << 10;
/// A spare buffer larger than this is shrunk back after a write.
const KEEP_BUF_CAPACITY: usize = 1 << 20;

/// Where the send side is in its life. It only moves forward, and `Dead`
/// can be reached from any phase but `Finished`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Requests, replies and control packets are accepted.
    Open,
    /// ERQ is queued: replies are still accepted, requests are not.
    RequestsEnded,
    /// EOF is queued, last: nothing more is accepted.
    EofQueued,
    /// EOF is written and the stream closed.
    Finished,
    /// Aborted, or a write failed: what was queued is dropped and nothing
    /// more is written.
    Dead,
}

/// How a request waits for room in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Waits for room, and may write a large payload itself: for callers
    /// without a deadline.
    Wait,
    /// Waits for room until the deadline (`None`: for ever), then fails
    /// with [`Error::WouldBlock`]; never writes. Large payloads are copied
    /// into the queue.
    Until(Option<Instant>),
    /// Never waits and never writes: fails with [`Error::WouldBlock`] when
    /// the queue is full. Large payloads are copied into the queue.
    NoWait,
}

/// What an outbox holds unwritten.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Depths {
    pub(crate) bytes: usize,
    pub(crate) packets: usize,
    pub(crate) replies: usize,
}

/// The length of a packet's length prefix, for a body of `body_len` bytes.
fn prefix_len(body_len: u64) -> usize {
    (crate::packet::wire_len(body_len) - body_len) as usize
}

/// A deadline packet to queue just before its request: the whole packet,
/// where its milliseconds field (a `UInt32BE`) is in it, and when the
/// deadline falls. The writer fills in the time left as it writes.
#[derive(Debug)]
pub(crate) struct DeadlineNote {
    pub(crate) packet: Vec<u8>,
    pub(crate) ms_at: usize,
    pub(crate) at: Instant,
}

/// Writes into `field` (a `UInt32BE`) the milliseconds left until
/// `deadline`, rounded up.
fn fill_deadline(field: &mut [u8], deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = u32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u32::MAX);
    field.copy_from_slice(&ms.to_be_bytes());
}

/// A write failed: the outbox is now [`Phase::Dead`]. Returned once, to the
/// thread whose write failed, which must tear the connection down.
#[must_use]
#[derive(Debug)]
pub(crate) struct WriteFailed(pub(crate) io::Error);

struct State {
    phase: Phase,
    buf: Vec<u8>,
    spare: Vec<u8>,
    /// Large payloads queued by move: each goes out right after the first
    /// `.0` bytes of `buf` (its packet's head).
    large: Vec<(usize, Vec<u8>)>,
    spare_large: Vec<(usize, Vec<u8>)>,
    large_bytes: usize,
    /// Packets in `buf`, and the replies among them.
    queued_packets: usize,
    queued_replies: usize,
    /// Bytes of the replies among them.
    queued_reply_bytes: usize,
    /// Bytes ever queued, and bytes ever taken by a writer. A request whose
    /// packet ends at or before `taken_total` was written, or was being
    /// written; see [`PendingTable::fail_all`](crate::pending::PendingTable::fail_all).
    queued_total: u64,
    taken_total: u64,
    /// Bytes at the front of `buf` that finish a packet a bounded write cut
    /// short: they must go out next, whole, whatever else is dropped.
    cut: usize,
    /// Deadlines queued in `buf`: where each one's milliseconds field (a
    /// `UInt32BE`) is, and when the deadline falls. The writer fills in the
    /// time left when it takes them.
    deadlines: Vec<(usize, Instant)>,
    /// Bytes and packets taken by the writer and not yet written: they still
    /// count against the budget.
    writing_bytes: usize,
    writing_packets: usize,
    writing_replies: usize,
    writing_reply_bytes: usize,
    /// Whether `queued_reply_bytes + writing_reply_bytes` has reached
    /// `reply_budget`, for readers that take no lock: see
    /// [`Outbox::at_reply_budget`]. Stored only when it changes, so that its
    /// cache line stays with its readers.
    at_reply_budget: Arc<AtomicBool>,
    reply_budget: usize,
    /// A thread has the writer role, and the stream with it.
    writing: bool,
    /// The stream, while nobody is writing. `None` once closed.
    stream: Option<Box<dyn Write + Send>>,
    /// Switches the stream to non-blocking writes and back, where the
    /// transport allows it (sockets). Dropped with the stream.
    control: Option<Arc<dyn Control>>,
    /// Write without waiting out the grace.
    urgent: bool,
    /// Replies or control packets are among the unwritten bytes: the peer
    /// may be waiting for them.
    owes_peer: bool,
    /// When the oldest unwritten byte was queued.
    since: Option<Instant>,
    /// The send loop sleeps until a batch's grace runs out; it need not be
    /// woken for later packets.
    timer_set: bool,
}

impl State {
    /// Publishes whether the replies owed are at their budget, after they
    /// changed.
    fn note_reply_bytes(&self) {
        let at = self.reply_bytes() >= self.reply_budget;
        if self.at_reply_budget.load(Ordering::Relaxed) != at {
            self.at_reply_budget.store(at, Ordering::Relaxed);
        }
    }

    fn reply_bytes(&self) -> usize {
        self.queued_reply_bytes + self.writing_reply_bytes
    }

    /// Whether the stream's writes are bounded (a socket's write timeout).
    fn bounded_writes(&self) -> bool {
        self.control.as_ref().is_some_and(|c| c.bounded_writes())
    }

    fn unwritten(&self) -> (usize, usize) {
        (
            self.buf.len() + self.large_bytes + self.writing_bytes,
            self.queued_packets + self.writing_packets,
        )
    }

    /// Drops what is queued, refuses everything after, and hands back the
    /// stream to close if nobody is writing with it.
    #[cold]
    #[inline(never)]
    fn kill(&mut self) -> Option<Box<dyn Write + Send>> {
        self.phase = Phase::Dead;
        self.buf.clear();
        self.large.clear();
        self.large_bytes = 0;
        self.cut = 0;
        self.deadlines.clear();
        self.queued_packets = 0;
        self.queued_replies = 0;
        self.queued_reply_bytes = 0;
        self.note_reply_bytes();
        self.control = None;
        self.stream.take()
    }
}

/// The outgoing queue. See the module doc.
pub(crate) struct Outbox {
    /// The connection's name, for the log.
    name: String,
    state: Mutex<State>,
    /// Whether the replies queued or being written are at their budget
    /// (see `State`).
    at_reply_budget: Arc<AtomicBool>,
    /// Wakes the send loop: bytes queued, an urgent flush, or the end.
    work: Condvar,
    /// Wakes requests waiting for room.
    room: Condvar,
    grace: Duration,
    max_bytes: usize,
    max_packets: usize,
    /// How long a write may make no progress before the side gives up.
    stall: Option<Duration>,
    /// Where the last of the application's packets queued (a request, or
    /// a handler's reply: not the extensions' control packets, nor
    /// refusals, ERQ or EOF) ends, in the stream of bytes taken by writers
    /// (`taken_total`'s count). A write that the peer takes from a full
    /// stream before that point is the peer taking the application's
    /// packets, or making its way to them: activity (see
    /// `SendCounters::last_app_write`). Bytes after it, such as a flood of
    /// answers to pings queued behind a reply, are not. Stored under the
    /// queue's lock, read by the writer without it.
    app_end: AtomicU64,
}

impl Outbox {
    pub(crate) fn new(
        name: &str,
        stream: Box<dyn Write + Send>,
        control: Option<Arc<dyn Control>>,
        grace: Duration,
        max_bytes: usize,
        max_packets: usize,
        stall: Option<Duration>,
    ) -> Outbox {
        let at_reply_budget = Arc::new(AtomicBool::new(false));
        Outbox {
            name: name.to_string(),
            at_reply_budget: Arc::clone(&at_reply_budget),
            state: Mutex::new(State {
                phase: Phase::Open,
                buf: Vec::new(),
                spare: Vec::new(),
                large: Vec::new(),
                spare_large: Vec::new(),
                large_bytes: 0,
                queued_packets: 0,
                queued_replies: 0,
                queued_reply_bytes: 0,
                queued_total: 0,
                taken_total: 0,
                cut: 0,
                deadlines: Vec::new(),
                writing_bytes: 0,
                writing_packets: 0,
                writing_replies: 0,
                writing_reply_bytes: 0,
                at_reply_budget,
                reply_budget: max_bytes,
                writing: false,
                stream: Some(stream),
                control,
                urgent: false,
                owes_peer: false,
                since: None,
                timer_set: false,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            grace,
            max_bytes,
            max_packets,
            stall,
            app_end: AtomicU64::new(0),
        }
    }

    /// The current phase.
    pub(crate) fn phase(&self) -> Phase {
        self.state.lock().phase
    }

    /// What is queued and not yet written: bytes, packets, and the replies
    /// among the packets.
    /// Whether the bytes of replies queued or being written have reached
    /// the budget (`max_bytes`), without taking the queue's lock: for the
    /// admission of each request from the peer.
    pub(crate) fn at_reply_budget(&self) -> bool {
        self.at_reply_budget.load(Ordering::Relaxed)
    }

    /// The bytes of replies queued or being written.
    pub(crate) fn reply_bytes(&self) -> usize {
        self.state.lock().reply_bytes()
    }

    pub(crate) fn depths(&self) -> Depths {
        let st = self.state.lock();
        let (bytes, packets) = st.unwritten();
        Depths {
            bytes,
            packets,
            replies: st.queued_replies + st.writing_replies,
        }
    }

    /// Waits until no more than `low` bytes are unwritten, or `deadline`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] at the deadline; [`Error::Closed`] if the side
    /// died first, with bytes left unwritten.
    pub(crate) fn wait_low(&self, low: usize, deadline: Option<Instant>) -> Result<()> {
        let started = Instant::now();
        let mut st = self.state.lock();
        let done = crate::sync::wait_until(&self.room, &mut st, deadline, |st| {
            st.unwritten().0 > low && st.phase != Phase::Dead
        });
        if !done {
            return Err(Error::Timeout {
                request: None,
                waited: started.elapsed(),
            });
        }
        if st.phase == Phase::Dead {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Queues a request, its head already encoded, and the packet of its
    /// deadline, if it has one, just before it, once there is room for
    /// both. `then_writes` says the
    /// caller writes the queue itself right after (it is about to wait for
    /// the response), so the send loop need not be woken.
    ///
    /// With [`Admission::Wait`] and a large payload, the caller writes the
    /// queue and its payload itself if nobody else is writing; a write that
    /// fails is returned as `Ok(Some(WriteFailed))`: the request was queued
    /// and the teardown will end it.
    ///
    /// Once queued, where the packet ends in the stream of queued bytes is
    /// stored in `queued_end`, under the queue's lock.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once ERQ is queued (or the side has finished or
    /// died); [`Error::WouldBlock`] for [`Admission::NoWait`] when the queue
    /// is full.
    #[allow(clippy::too_many_arguments)] // Each says something of the request.
    pub(crate) fn push_request(
        &self,
        head: &Head,
        payload: &[u8],
        deadline: Option<&DeadlineNote>,
        admission: Admission,
        then_writes: bool,
        queued_end: &AtomicU64,
        stats: &Counters,
    ) -> Result<Option<WriteFailed>> {
        let len = head.packet_len(payload.len()) + deadline.map_or(0, |note| note.packet.len());
        let mut st = self.state.lock();
        loop {
            if st.phase != Phase::Open {
                return Err(Error::Closed);
            }
            let (bytes, packets) = st.unwritten();
            let full = bytes > 0 && (bytes + len > self.max_bytes || packets >= self.max_packets);
            if !full {
                break;
            }
            // Make room: whoever writes next writes now. The phase is checked
            // again after the wait.
            st.urgent = true;
            self.work.notify_one();
            match admission {
                Admission::NoWait => return Err(Error::WouldBlock),
                Admission::Wait | Admission::Until(None) => self.room.wait(&mut st),
                Admission::Until(Some(deadline)) => {
                    if self.room.wait_until(&mut st, deadline).timed_out() {
                        return Err(Error::WouldBlock);
                    }
                }
            }
        }
        if let Some(note) = deadline {
            // The deadline goes just before its request, in the same hold.
            let at = st.buf.len() + note.ms_at;
            st.buf.extend_from_slice(&note.packet);
            st.deadlines.push((at, note.at));
            st.queued_packets += 1;
            crate::stats::bump(&stats.send.packets_out, 1);
        }
        crate::stats::bump(&stats.send.packets_out, 1);
        crate::stats::bump(&stats.send.requests_sent, 1);
        st.buf.extend_from_slice(head.as_bytes());
        st.queued_packets += 1;
        st.queued_total += len as u64;
        queued_end.store(st.queued_total, Ordering::Release);
        if payload.len() >= LARGE_PAYLOAD {
            if admission == Admission::Wait && !st.writing {
                // Write what was queued, this head and the payload, without
                // copying the payload.
                self.app_ends_at(&st, payload.len());
                return Ok(self.drain(st, Some(payload), stats));
            }
            let at = st.buf.len();
            st.large_bytes += payload.len();
            st.large.push((at, payload.to_vec()));
        } else {
            st.buf.extend_from_slice(payload);
        }
        self.app_ends_at(&st, 0);
        if !then_writes {
            self.start_timer(st);
        }
        Ok(None)
    }

    /// Queues a control request of the extensions (a hello, ping or
    /// cancel): small, so it never waits for room, and accepted after ERQ
    /// too (a peer with the extensions answers them whatever the state of
    /// this end's requests), but not after EOF.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once EOF is queued or the side has died.
    pub(crate) fn push_control_request(
        &self,
        head: &Head,
        payload: &[u8],
        queued_end: &AtomicU64,
        stats: &Counters,
    ) -> Result<()> {
        let mut st = self.state.lock();
        if !matches!(st.phase, Phase::Open | Phase::RequestsEnded) {
            return Err(Error::Closed);
        }
        crate::stats::bump(&stats.send.packets_out, 1);
        st.buf.extend_from_slice(head.as_bytes());
        st.buf.extend_from_slice(payload);
        st.queued_packets += 1;
        st.queued_total += head.packet_len(payload.len()) as u64;
        queued_end.store(st.queued_total, Ordering::Release);
        self.start_timer(st);
        Ok(())
    }

    /// Queues a reply, its head already encoded; `app` if a handler of the
    /// application made it (not a refusal, nor a control reply). Never
    /// waits for room. Returns the bytes of replies now owed to the peer
    /// (queued or being written); `None`, dropping the reply, once EOF is
    /// queued or the side is dead. The caller then writes the queue, or starts the grace timer
    /// with [`arm`](Outbox::arm).
    pub(crate) fn push_reply(
        &self,
        head: &Head,
        payload: Vec<u8>,
        app: bool,
        stats: &Counters,
    ) -> Option<usize> {
        let mut st = self.state.lock();
        if !matches!(st.phase, Phase::Open | Phase::RequestsEnded) {
            return None;
        }
        crate::stats::bump(&stats.send.packets_out, 1);
        st.owes_peer = true;
        st.buf.extend_from_slice(head.as_bytes());
        st.queued_packets += 1;
        st.queued_replies += 1;
        st.queued_reply_bytes += head.packet_len(payload.len());
        st.note_reply_bytes();
        st.queued_total += head.packet_len(payload.len()) as u64;
        let spent = if payload.len() >= LARGE_PAYLOAD {
            let at = st.buf.len();
            st.large_bytes += payload.len();
            st.large.push((at, payload));
            None
        } else {
            st.buf.extend_from_slice(&payload);
            Some(payload)
        };
        if app {
            self.app_ends_at(&st, 0);
        }
        let owed = st.queued_reply_bytes + st.writing_reply_bytes;
        drop(st);
        if let Some(payload) = spent {
            crate::packet::recycle_payload(payload);
        }
        Some(owed)
    }

    /// A packet of the application's has just been queued, last, and
    /// `extra` bytes of its payload will follow the queue: see
    /// [`app_end`](Outbox::app_end).
    fn app_ends_at(&self, st: &State, extra: usize) {
        let end = st.taken_total + (st.buf.len() + st.large_bytes + extra) as u64;
        self.app_end.store(end, Ordering::Relaxed);
    }

    /// Queues the end-of-requests packet, to be written at once: later
    /// requests are refused. Returns false if the requests had already
    /// ended.
    pub(crate) fn end_requests(&self, stats: &Counters) -> bool {
        let mut st = self.state.lock();
        if st.phase != Phase::Open {
            return false;
        }
        st.phase = Phase::RequestsEnded;
        self.push_control(st, &Packet::erq(), stats);
        true
    }

    /// Queues the EOF packet, last, to be written at once; the stream is
    /// closed once it is written. Returns false if EOF was already queued or
    /// the side is dead.
    pub(crate) fn push_eof(&self, stats: &Counters) -> bool {
        let mut st = self.state.lock();
        if !matches!(st.phase, Phase::Open | Phase::RequestsEnded) {
            return false;
        }
        st.phase = Phase::EofQueued;
        self.push_control(st, &Packet::eof(), stats);
        true
    }

    fn push_control(&self, mut st: MutexGuard<'_, State>, packet: &Packet, stats: &Counters) {
        let before = st.buf.len();
        packet.encode_into(&mut st.buf);
        trace!("{}: ==> queued {packet:?}", self.name);
        st.queued_total += (st.buf.len() - before) as u64;
        st.queued_packets += 1;
        st.since.get_or_insert_with(Instant::now);
        st.urgent = true;
        st.owes_peer = true;
        crate::stats::bump(&stats.send.packets_out, 1);
        drop(st);
        self.work.notify_one();
    }

    /// Makes sure the send loop writes what is queued within the grace: wakes
    /// it if its timer is not already running.
    pub(crate) fn arm(&self) {
        self.start_timer(self.state.lock());
    }

    fn start_timer(&self, mut st: MutexGuard<'_, State>) {
        if st.buf.is_empty() {
            return;
        }
        st.since.get_or_insert_with(Instant::now);
        if !st.timer_set {
            st.timer_set = true;
            drop(st);
            self.work.notify_one();
        }
    }

    /// Asks the send loop to write the queue at once, without doing I/O on
    /// this thread. For threads that must not block in a write: a caller
    /// with a deadline, or the receive thread (`replies_only`: queued
    /// requests alone keep their grace).
    pub(crate) fn flush_soon(&self, replies_only: bool) {
        let mut st = self.state.lock();
        if !st.buf.is_empty() && !st.urgent && (st.owes_peer || !replies_only) {
            st.urgent = true;
            drop(st);
            self.work.notify_one();
        }
    }

    /// Writes the queue now if nobody else is writing; if somebody is, they
    /// write it when their current write ends. Blocks while the stream does:
    /// only for threads that may block without a deadline.
    pub(crate) fn write_now(&self, stats: &Counters) -> Option<WriteFailed> {
        let st = self.state.lock();
        if st.buf.is_empty() || st.writing || st.stream.is_none() {
            return None;
        }
        self.drain(st, None, stats)
    }

    /// Writes the queue now if nobody else is writing, for a handler
    /// thread: where the transport bounds its writes (a socket), as
    /// [`write_now_nonblocking`](Outbox::write_now_nonblocking) does, so
    /// that the thread never waits for the peer to read; elsewhere (a pipe,
    /// whose writes nothing can bound) as [`write_now`](Outbox::write_now)
    /// does, blocking while the stream does.
    pub(crate) fn write_now_from_handler(&self, stats: &Counters) -> Option<WriteFailed> {
        let st = self.state.lock();
        if st.buf.is_empty() || st.writing || st.stream.is_none() {
            return None;
        }
        let mode = match st.bounded_writes() {
            true => Mode::Bounded,
            false => Mode::Blocking(None),
        };
        self.drain_with(st, mode, stats)
    }

    /// Writes the queue now if nobody else is writing, without blocking for
    /// long: only as much as the stream takes within its write timeout, the
    /// rest left at the front of the queue for the send thread. For the thread that reads, which
    /// must never block in a write: two ends whose readers both blocked in
    /// writes could wait on each other for ever. Where the transport cannot
    /// write without blocking, the send thread is asked to write instead.
    /// With `replies_only`, nothing happens unless replies or control packets
    /// are queued: requests alone keep their grace.
    pub(crate) fn write_now_nonblocking(
        &self,
        replies_only: bool,
        stats: &Counters,
    ) -> Option<WriteFailed> {
        let st = self.state.lock();
        if st.buf.is_empty() || st.writing || st.stream.is_none() || (replies_only && !st.owes_peer)
        {
            return None;
        }
        match st.bounded_writes() {
            true => self.drain_with(st, Mode::Bounded, stats),
            false => {
                drop(st);
                self.flush_soon(replies_only);
                None
            }
        }
    }

    /// Writes the queue until it is empty, as the one writer. `extra`, if
    /// any, is written right after the bytes queued so far. The thread that
    /// writes EOF, or finds the side dead, closes the stream.
    fn drain(
        &self,
        st: MutexGuard<'_, State>,
        extra: Option<&[u8]>,
        stats: &Counters,
    ) -> Option<WriteFailed> {
        self.drain_with(st, Mode::Blocking(extra), stats)
    }

    fn drain_with(
        &self,
        mut st: MutexGuard<'_, State>,
        mode: Mode<'_>,
        stats: &Counters,
    ) -> Option<WriteFailed> {
        debug_assert!(!st.writing);
        let mut stream = st.stream.take()?;
        st.writing = true;
        let (mut extra, bounded) = match mode {
            Mode::Blocking(extra) => (extra, false),
            Mode::Bounded => (None, true),
        };
        // With bounded writes on, a write that cannot go on returns after a
        // moment: a bounded writer gives up, any other tries again.
        let retry = !bounded && st.bounded_writes();
        let mut failed = None;
        while st.phase != Phase::Dead && (!st.buf.is_empty() || extra.is_some()) {
            let mut batch = std::mem::take(&mut st.spare);
            std::mem::swap(&mut batch, &mut st.buf);
            let mut large = std::mem::take(&mut st.spare_large);
            std::mem::swap(&mut large, &mut st.large);
            let payload = extra.take();
            let batch_cut = std::mem::take(&mut st.cut);
            let deadlines = std::mem::take(&mut st.deadlines);
            let mut unfilled = &deadlines[..];
            st.writing_bytes = batch.len() + st.large_bytes + payload.map_or(0, <[u8]>::len);
            // Where the batch starts in the stream of bytes taken.
            let from = st.taken_total;
            st.taken_total += st.writing_bytes as u64;
            st.writing_packets = st.queued_packets;
            st.writing_replies = st.queued_replies;
            st.writing_reply_bytes = st.queued_reply_bytes;
            st.large_bytes = 0;
            st.queued_packets = 0;
            st.queued_replies = 0;
            st.queued_reply_bytes = 0;
            st.urgent = false;
            st.owes_peer = false;
            st.since = None;
            let mut written = 0;
            let res = MutexGuard::unlocked(&mut st, || {
                // A writer or logger of the user's that panics here would
                // leave the side with no stream and a writer for ever: its
                // panic is the write's failure, handled as any other.
                let write = AssertUnwindSafe(|| {
                    write_batch(
                        &self.name,
                        &mut stream,
                        (&mut batch, &large, payload),
                        &mut unfilled,
                        retry.then_some(self.stall),
                        &mut written,
                        (stats, Progress::new(from, &self.app_end)),
                    )
                });
                catch_unwind(write).unwrap_or_else(|_| Err(io::Error::other("a write panicked")))
            });
            let stuck = bounded && matches!(&res, Err(e) if would_block(e));
            if stuck && st.phase != Phase::Dead {
                // The stream takes no more for now: what is left goes back
                // to the front of the queue, for the send thread, which
                // writes it at once; the deadlines not reached are filled
                // in now.
                for &(at, deadline) in unfilled {
                    fill_deadline(&mut batch[at..at + 4], deadline);
                }
                requeue(&self.name, &mut st, &batch, batch_cut, &mut large, written);
            }
            st.writing_bytes = 0;
            st.writing_packets = 0;
            st.writing_replies = 0;
            st.writing_reply_bytes = 0;
            st.note_reply_bytes();
            large.clear();
            st.spare_large = large;
            batch.clear();
            if batch.capacity() > KEEP_BUF_CAPACITY {
                batch.shrink_to(KEEP_BUF_CAPACITY);
            }
            st.spare = batch;
            self.room.notify_all();
            match res {
                Err(_) if stuck => {
                    st.urgent = true;
                    self.work.notify_one();
                    break;
                }
                Err(e) if st.phase != Phase::Dead => {
                    failed = Some(WriteFailed(e));
                    // Nothing is queued past a failed write.
                    let _none = st.kill();
                }
                _ => {}
            }
        }
        st.writing = false;
        if st.phase == Phase::EofQueued && st.buf.is_empty() {
            st.phase = Phase::Finished;
        }
        let ended = matches!(st.phase, Phase::Finished | Phase::Dead);
        if !ended {
            st.stream = Some(stream);
            return failed;
        }
        self.close_stream(st, stream);
        failed
    }

    /// The last writer's end, once EOF is written or the side is dead:
    /// closes the stream. For a pipe, this is what the peer sees as the
    /// end. The send loop may be waiting for this write to end.
    #[cold]
    #[inline(never)]
    fn close_stream(&self, mut st: MutexGuard<'_, State>, stream: Box<dyn Write + Send>) {
        let control = st.control.take();
        drop(st);
        drop(control);
        drop(stream);
        self.work.notify_one();
        self.room.notify_all();
    }

    /// Stops sending at once: drops what is queued, refuses everything
    /// after, closes the stream unless a write is in progress (that writer
    /// closes it when its write returns), and lets the send loop end.
    /// Returns how far the writers got in the stream of queued bytes.
    pub(crate) fn abort(&self) -> u64 {
        let mut st = self.state.lock();
        let written_to = st.taken_total;
        if matches!(st.phase, Phase::Finished | Phase::Dead) {
            return written_to;
        }
        let stream = st.kill();
        drop(st);
        drop(stream);
        self.work.notify_all();
        self.room.notify_all();
        written_to
    }

    /// How far the writers have got in the stream of queued bytes: the
    /// bytes written, or being written.
    pub(crate) fn written_to(&self) -> u64 {
        self.state.lock().taken_total
    }

    /// The peer has stopped serving: queues ERQ if this end's requests had
    /// not ended, and drops the requests not yet taken by a writer, which
    /// could now only be refused or ignored. Replies stay: the peer may still
    /// be reading them. Returns how far the writers had got, as
    /// [`abort`](Outbox::abort) does.
    pub(crate) fn end_requests_dropping_unsent(&self, stats: &Counters) -> u64 {
        let mut st = self.state.lock();
        let written_to = st.taken_total;
        match st.phase {
            Phase::Open => {
                st.phase = Phase::RequestsEnded;
                self.drop_requests(&mut st);
                self.push_control(st, &Packet::erq(), stats);
            }
            // ERQ, and perhaps EOF, are queued behind requests the peer
            // will not serve.
            Phase::RequestsEnded | Phase::EofQueued => self.drop_requests(&mut st),
            _ => {}
        }
        written_to
    }

    /// Drops the requests not yet taken by a writer. The application's last
    /// packet queued may have been one of them: what is left of the queue
    /// ends no later.
    fn drop_requests(&self, st: &mut State) {
        drop_requests(&self.name, st);
        let end = st.taken_total + (st.buf.len() + st.large_bytes) as u64;
        self.app_end.fetch_min(end, Ordering::Relaxed);
    }

    /// The send loop. Writes the queue once its oldest byte has waited the
    /// grace, or at once when asked; returns once EOF is written or the side
    /// is dead.
    pub(crate) fn run_send_loop(&self, stats: &Counters) -> Option<WriteFailed> {
        let mut failed = None;
        let mut st = self.state.lock();
        loop {
            if matches!(st.phase, Phase::Finished | Phase::Dead) {
                break;
            }
            if st.buf.is_empty() || st.writing {
                st.timer_set = false;
                self.work.wait(&mut st);
                continue;
            }
            if !st.urgent {
                let since = *st.since.get_or_insert_with(Instant::now);
                // A grace too long for an `Instant` never runs out.
                let deadline = since.checked_add(self.grace);
                if deadline.is_none_or(|deadline| Instant::now() < deadline) {
                    st.timer_set = true;
                    match deadline {
                        Some(deadline) => {
                            self.work.wait_until(&mut st, deadline);
                        }
                        None => self.work.wait(&mut st),
                    }
                    continue;
                }
            }
            if let Some(e) = self.drain(st, None, stats) {
                failed = Some(e);
            }
            st = self.state.lock();
        }
        failed
    }
}

/// Removes the request packets from what is queued, keeping every other
/// packet, in order. The queue holds only whole packets, each a head in
/// `buf` followed by its payload, in `buf` or in a large segment that starts
/// right after the head.
fn drop_requests(name: &str, st: &mut State) {
    // Deadlines are requests too, and go with the rest.
    st.deadlines.clear();
    // The packets, as (start, end in `buf`, has a large segment, keep).
    let mut packets = Vec::new();
    let mut n_segments = 0;
    let mut n_replies = 0;
    let mut reply_bytes = 0;
    // The rest of a packet cut short is kept, whole, first.
    if st.cut > 0 {
        packets.push((0, st.cut, false, true));
    }
    let mut pos = st.cut;
    while pos < st.buf.len() {
        let parsed = varint::parse(&st.buf[pos..])
            .ok()
            .flatten()
            .and_then(|(len, prefix)| {
                let mut rest = &st.buf[pos + prefix..];
                let head = read_body_head(&mut rest, len as u64).ok()?;
                Some((prefix + len as usize - head.payload_len, head))
            });
        let Some((head_len, head)) = parsed else {
            // Not reached: the queue holds only packets this end encoded.
            error!("{name}: cannot parse the outgoing queue; keeping it whole");
            return;
        };
        let payload_at = pos + head_len;
        let external = head.payload_len > 0
            && st
                .large
                .get(n_segments)
                .is_some_and(|(at, _)| *at == payload_at);
        let end = if external {
            payload_at
        } else {
            payload_at + head.payload_len
        };
        let keep = !matches!(head.kind, PacketKind::Request { .. });
        if matches!(head.kind, PacketKind::Response { .. }) {
            n_replies += 1;
            reply_bytes += prefix_len(head.body_len) + head.body_len as usize;
        }
        packets.push((pos, end, external, keep));
        n_segments += usize::from(external);
        pos = end;
    }
    let mut segments = std::mem::take(&mut st.large).into_iter();
    let mut kept = Vec::with_capacity(st.buf.len());
    let (mut n_packets, mut large_bytes) = (0, 0);
    for (start, end, external, keep) in packets {
        let segment = if external { segments.next() } else { None };
        if !keep {
            continue;
        }
        kept.extend_from_slice(&st.buf[start..end]);
        n_packets += 1;
        if let Some((_, payload)) = segment {
            large_bytes += payload.len();
            st.large.push((kept.len(), payload));
        }
    }
    st.buf = kept;
    st.queued_packets = n_packets;
    st.queued_replies = n_replies;
    st.queued_reply_bytes = reply_bytes;
    st.note_reply_bytes();
    st.large_bytes = large_bytes;
}

/// A write that stopped because the stream takes no more for now.
fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A batch: its bytes, its large segments, and a caller's payload after
/// them.
type Pieces<'a> = (&'a mut [u8], &'a [(usize, Vec<u8>)], Option<&'a [u8]>);

fn write_batch(
    name: &str,
    stream: &mut Box<dyn Write + Send>,
    pieces: Pieces<'_>,
    deadlines: &mut &[(usize, Instant)],
    retry: Option<Option<Duration>>,
    written: &mut usize,
    (stats, progress): (&Counters, Progress<'_>),
) -> io::Result<()> {
    let res = write_pieces(
        stream,
        pieces,
        deadlines,
        retry,
        written,
        (&stats.send, progress),
    )
    .and_then(|()| stream.flush());
    if *written > 0 {
        crate::stats::bump(&stats.send.bytes_out, *written as u64);
        crate::stats::bump(&stats.send.writes, 1);
        trace!("{name}: ==> wrote {written} bytes");
    }
    res
}

/// Writes the batch, its large segments in place, then the payload,
/// counting the bytes written in `written`, so that a write that stops
/// short (a bounded write to a full socket) can be resumed. With `retry`, a
/// write that stops short is tried again, until it has made no progress for
/// the stall timeout inside, if any. The milliseconds field of each of
/// `deadlines` (offsets in the batch, in order) is filled in with the time
/// left just before it is written; those not reached are left in
/// `deadlines`.
fn write_pieces(
    stream: &mut Box<dyn Write + Send>,
    (batch, large, payload): Pieces<'_>,
    deadlines: &mut &[(usize, Instant)],
    retry: Option<Option<Duration>>,
    written: &mut usize,
    (send, progress): (&SendCounters, Progress<'_>),
) -> io::Result<()> {
    let mut pos = 0;
    let mut write_to = |stream: &mut Box<dyn Write + Send>,
                        batch: &mut [u8],
                        pos: &mut usize,
                        end: usize,
                        written: &mut usize|
     -> io::Result<()> {
        while let Some(&(at, deadline)) = deadlines.first() {
            if at >= end {
                break;
            }
            write_counted(stream, &batch[*pos..at], retry, written, (send, progress))?;
            *pos = at;
            fill_deadline(&mut batch[at..at + 4], deadline);
            *deadlines = &deadlines[1..];
        }
        write_counted(stream, &batch[*pos..end], retry, written, (send, progress))?;
        *pos = end;
        Ok(())
    };
    for (at, segment) in large {
        write_to(stream, batch, &mut pos, *at, written)?;
        write_counted(stream, segment, retry, written, (send, progress))?;
    }
    write_to(stream, batch, &mut pos, batch.len(), written)?;
    if let Some(payload) = payload {
        write_counted(stream, payload, retry, written, (send, progress))?;
    }
    Ok(())
}

/// Writes `buf` whole, counting into `written`. A write that goes on after
/// the stream's buffer was full (a write took only part, or nothing)
/// stamps `last_write` (see [`sync::stamp`](crate::sync::stamp)): the peer
/// is reading. Bytes that merely fill the buffer prove nothing. If the
/// bytes taken come before the end of the application's last packet
/// queued (see [`Progress`]), `last_app_write` too: the peer is taking
/// replies, or requests, of the application, or the bytes ahead of them.
fn write_counted(
    stream: &mut Box<dyn Write + Send>,
    mut buf: &[u8],
    retry: Option<Option<Duration>>,
    written: &mut usize,
    (send, progress): (&SendCounters, Progress<'_>),
) -> io::Result<()> {
    let mut stuck_since: Option<Instant> = None;
    // The stream's buffer was full at the last write.
    let mut full = false;
    while !buf.is_empty() {
        match stream.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                if full {
                    let now = crate::sync::stamp();
                    send.last_write.store(now, Ordering::Relaxed);
                    if progress.before_app_end(*written) {
                        send.last_app_write.store(now, Ordering::Relaxed);
                    }
                }
                full = n < buf.len();
                *written += n;
                buf = &buf[n..];
                stuck_since = None;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if would_block(&e) => match retry {
                None => return Err(e),
                Some(stall) => {
                    full = true;
                    let since = *stuck_since.get_or_insert_with(Instant::now);
                    if stall.is_some_and(|stall| since.elapsed() >= stall) {
                        return Err(Expired(Disconnect::Stalled).into_io());
                    }
                }
            },
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Where a batch's writes are in the stream of bytes taken, against where
/// the application's last packet queued ends ([`Outbox::app_end`]).
#[derive(Clone, Copy)]
struct Progress<'a> {
    /// Where the batch starts.
    from: u64,
    app_end: &'a AtomicU64,
}

impl<'a> Progress<'a> {
    fn new(from: u64, app_end: &'a AtomicU64) -> Progress<'a> {
        Progress { from, app_end }
    }

    /// Whether a write that begins `written` bytes into the batch takes
    /// bytes before the end of the application's last packet. Read afresh
    /// each time: a packet queued behind the batch while it is written
    /// makes the rest of it the way to that packet.
    fn before_app_end(&self, written: usize) -> bool {
        self.from + (written as u64) < self.app_end.load(Ordering::Relaxed)
    }
}

/// The packet that a write of the first `written` bytes of `batch` (and
/// its `large` segments) cut short: how many of its bytes are left, and
/// which large segment holds its payload, if one does. The batch starts
/// with `batch_cut` bytes that finish a packet cut before; whole packets
/// follow.
fn cut_packet(
    batch: &[u8],
    batch_cut: usize,
    large: &[(usize, Vec<u8>)],
    written: usize,
) -> Option<(usize, Option<usize>)> {
    if written < batch_cut {
        return Some((batch_cut - written, None));
    }
    // Walk the packets, by their position in `batch` and on the wire.
    let (mut at, mut wire, mut segment) = (batch_cut, batch_cut, 0);
    while wire < written {
        let (len, prefix) = varint::parse(&batch[at..]).ok().flatten()?;
        let head = read_body_head(&mut &batch[at + prefix..], len as u64).ok()?;
        let total = prefix + len as usize;
        let head_len = total - head.payload_len;
        let external = head.payload_len > 0
            && large
                .get(segment)
                .is_some_and(|(seg_at, _)| *seg_at == at + head_len);
        if wire + total > written {
            return Some((wire + total - written, external.then_some(segment)));
        }
        wire += total;
        at += if external { head_len } else { total };
        segment += usize::from(external);
    }
    Some((0, None))
}

/// Puts what a write left of `batch` and its `large` segments, past its
/// first `written` bytes, back at the front of the queue. Only for writes
/// without a caller's payload. The rest of a packet cut short is all in
/// `buf`, and marked, so that dropping requests keeps it whole.
#[cold]
#[inline(never)]
fn requeue(
    name: &str,
    st: &mut State,
    batch: &[u8],
    batch_cut: usize,
    large: &mut Vec<(usize, Vec<u8>)>,
    written: usize,
) {
    // What was not written was not taken after all.
    st.taken_total -= (st.writing_bytes - written) as u64;
    let (cut, cut_segment) = cut_packet(batch, batch_cut, large, written).unwrap_or_else(|| {
        // Not reached: the queue holds only packets this end encoded.
        error!("{name}: cannot parse the batch a write cut short");
        (0, None)
    });
    let mut rest = Vec::with_capacity(batch.len() + st.buf.len());
    let mut rest_large = Vec::new();
    let mut rest_large_bytes = 0;
    // Walk the pieces in order, skipping the written bytes.
    let mut skip = written;
    let mut pos = 0;
    let take = |piece: &[u8], skip: &mut usize| -> usize {
        let n = (*skip).min(piece.len());
        *skip -= n;
        n
    };
    for (index, (at, segment)) in large.drain(..).enumerate() {
        let bytes = &batch[pos..at];
        let n = take(bytes, &mut skip);
        rest.extend_from_slice(&bytes[n..]);
        let n = take(&segment, &mut skip);
        if n == 0 && cut_segment != Some(index) {
            rest_large_bytes += segment.len();
            rest_large.push((rest.len(), segment));
        } else if n < segment.len() {
            // Partly written, or the payload of a packet whose head was:
            // the rest of it is copied, once.
            rest.extend_from_slice(&segment[n..]);
        }
        pos = at;
    }
    let bytes = &batch[pos..];
    let n = take(bytes, &mut skip);
    rest.extend_from_slice(&bytes[n..]);
    let shift = rest.len();
    rest.extend_from_slice(&st.buf);
    // Deadlines queued during the write are in `buf`, now behind the rest.
    for (at, _) in &mut st.deadlines {
        *at += shift;
    }
    st.buf = rest;
    for (at, segment) in st.large.drain(..) {
        rest_large.push((at + shift, segment));
    }
    st.large = rest_large;
    st.large_bytes += rest_large_bytes;
    st.cut = cut;
    // The packets of the batch count as queued again, with what came since.
    st.queued_packets += st.writing_packets;
    st.queued_replies += st.writing_replies;
    st.queued_reply_bytes += st.writing_reply_bytes;
}

/// How [`Outbox::drain_with`] writes.
enum Mode<'a> {
    /// Writes that block as long as the stream does, with the caller's
    /// payload after the queue.
    Blocking(Option<&'a [u8]>),
    /// Writes that give up when the stream takes nothing for a moment
    /// (see [`Control::bounded_writes`]), leaving the rest to the send
    /// thread.
    Bounded,
}

/// What a connection can do to its socket besides reading and writing it.
pub(crate) trait Control: Send + Sync {
    /// Shuts the socket down both ways, which unblocks every read and write.
    fn shutdown(&self);

    /// True if a write to the stream that cannot go on returns
    /// `WouldBlock` or `TimedOut` after a moment, instead of blocking: a
    /// socket given a short write timeout.
    fn bounded_writes(&self) -> bool;

    /// True if [`interrupt_reads`](Control::interrupt_reads) wakes a read
    /// blocked on the stream, so that the connection's read timeouts can
    /// be kept.
    fn interruptible_reads(&self) -> bool;

    /// Shuts the socket's reading down, which ends a blocked read with the
    /// end of the stream, and every read after it: a read timeout has run
    /// out. Writing goes on.
    fn interrupt_reads(&self);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer that records each write call.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn request(tag: u64, payload_len: usize) -> Head {
        let kind = PacketKind::Request {
            rq_type: 1,
            flags: 0,
        };
        Head::new(0, tag, kind, payload_len)
    }

    fn reply(tag: u64, payload_len: usize) -> Head {
        let kind = PacketKind::Response { ok: true, flags: 0 };
        Head::new(0, tag, kind, payload_len)
    }

    fn outbox(rec: &Recorder, max_bytes: usize) -> Outbox {
        Outbox::new(
            "test",
            Box::new(rec.clone()),
            None,
            Duration::from_secs(60),
            max_bytes,
            1000,
            None,
        )
    }

    #[test]
    fn queued_packets_go_out_in_one_write_on_write_now() {
        let rec = Recorder::default();
        let outbox = outbox(&rec, 1 << 20);
        let stats = Counters::default();
        let end = AtomicU64::new(0);
        for tag in 2..12 {
            let res = outbox.push_request(
                &request(tag, 3),
                b"abc",
                None,
                Admission::Wait,
                false,
                &end,
                &stats,
            );
            assert!(matches!(res, Ok(None)));
        }
        assert!(rec.0.lock().is_empty());
        assert!(outbox.write_now(&stats).is_none());
        let writes = rec.0.lock();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].len(), 10 * 7);
    }

    #[test]
    fn a_full_queue_refuses_no_wait_requests_but_never_replies() {
        let rec = Recorder::default();
        let outbox = outbox(&rec, 64);
        let stats = Counters::default();
        let end = AtomicU64::new(0);
        let res = outbox.push_request(
            &request(2, 60),
            &[0; 60],
            None,
            Admission::NoWait,
            false,
            &end,
            &stats,
        );
        assert!(matches!(res, Ok(None)));
        let res = outbox.push_request(
            &request(3, 60),
            &[0; 60],
            None,
            Admission::NoWait,
            false,
            &end,
            &stats,
        );
        assert!(matches!(res, Err(Error::WouldBlock)));
        assert!(outbox
            .push_reply(&reply(9, 60), vec![0; 60], true, &stats)
            .is_some());
        assert!(outbox.write_now(&stats).is_none());
        let want = request(2, 60).packet_len(60) + reply(9, 60).packet_len(60);
        assert_eq!(rec.0.lock().concat().len(), want);
    }

    #[test]
    fn a_large_no_wait_request_is_copied_and_written_by_the_writer_in_order() {
        let rec = Recorder::default();
        let outbox = outbox(&rec, 1 << 30);
        let stats = Counters::default();
        let end = AtomicU64::new(0);
        let big = vec![7u8; LARGE_PAYLOAD];
        let res = outbox.push_request(
            &request(2, big.len()),
            &big,
            None,
            Admission::NoWait,
            false,
            &end,
            &stats,
        );
        assert!(matches!(res, Ok(None)));
        assert!(rec.0.lock().is_empty(), "a no-wait request never writes");
        assert!(outbox.write_now(&stats).is_none());
        let mut want = request(2, big.len()).as_bytes().to_vec();
        want.extend_from_slice(&big);
        assert_eq!(rec.0.lock().concat(), want);
    }

    #[test]
    fn large_replies_are_queued_by_move_and_written_in_order() {
        let rec = Recorder::default();
        let outbox = outbox(&rec, 1 << 30);
        let stats = Counters::default();
        let big = |byte: u8| vec![byte; LARGE_PAYLOAD + 1];
        let mut want = Vec::new();
        for (tag, payload) in [
            (2, vec![1u8; 10]),
            (3, big(2)),
            (4, vec![3; 5]),
            (5, big(4)),
        ] {
            let head = reply(tag, payload.len());
            want.extend_from_slice(head.as_bytes());
            want.extend_from_slice(&payload);
            assert!(outbox.push_reply(&head, payload, true, &stats).is_some());
        }
        assert!(outbox.write_now(&stats).is_none());
        let writes = rec.0.lock();
        assert_eq!(writes.concat(), want);
        // The large payloads went out as writes of their own, uncopied.
        assert!(writes
            .iter()
            .any(|w| w.len() == LARGE_PAYLOAD + 1 && w[0] == 2));
    }

    #[test]
    fn phases_refuse_what_they_must() {
        let rec = Recorder::default();
        let outbox = Outbox::new(
            "test",
            Box::new(rec.clone()),
            None,
            Duration::MAX,
            1 << 20,
            1000,
            None,
        );
        let stats = Counters::default();
        let end = AtomicU64::new(0);
        assert!(outbox.end_requests(&stats));
        assert!(!outbox.end_requests(&stats));
        assert_eq!(outbox.phase(), Phase::RequestsEnded);
        let res = outbox.push_request(
            &request(2, 0),
            b"",
            None,
            Admission::Wait,
            false,
            &end,
            &stats,
        );
        assert!(matches!(res, Err(Error::Closed)));
        assert!(outbox
            .push_reply(&reply(9, 0), Vec::new(), true, &stats)
            .is_some());
        assert!(outbox.push_eof(&stats));
        assert!(!outbox.push_eof(&stats));
        assert!(outbox
            .push_reply(&reply(10, 0), Vec::new(), true, &stats)
            .is_none());
        // A grace of Duration::MAX never runs out, but ERQ and EOF are urgent.
        assert!(outbox.run_send_loop(&stats).is_none());
        assert_eq!(outbox.phase(), Phase::Finished);
        let mut want = vec![0x03, 0x01, 0x02, 0x00];
        want.extend_from_slice(reply(9, 0).as_bytes());
        want.extend_from_slice(&[0x03, 0x00, 0x02, 0x00]);
        assert_eq!(rec.0.lock().concat(), want);
        outbox.abort();
        assert_eq!(
            outbox.phase(),
            Phase::Finished,
            "a finished side cannot die"
        );
    }

    #[test]
    fn when_the_peer_stops_serving_unwritten_requests_are_dropped_and_replies_kept() {
        let rec = Recorder::default();
        let outbox = outbox(&rec, 1 << 30);
        let stats = Counters::default();
        let (end_a, end_b) = (AtomicU64::new(0), AtomicU64::new(0));
        let big = |byte: u8| vec![byte; LARGE_PAYLOAD + 3];
        // Written first: request 2.
        let res = outbox.push_request(
            &request(2, 1),
            b"a",
            None,
            Admission::Wait,
            true,
            &end_a,
            &stats,
        );
        assert!(matches!(res, Ok(None)));
        assert!(outbox.write_now(&stats).is_none());
        let written = rec.0.lock().concat().len() as u64;
        // Queued, not written: request 3, a reply, a large request, a large
        // reply.
        let mut want = Vec::new();
        let res = outbox.push_request(
            &request(3, 2),
            b"bb",
            None,
            Admission::Wait,
            true,
            &end_b,
            &stats,
        );
        assert!(matches!(res, Ok(None)));
        let head = reply(7, 3);
        want.extend_from_slice(head.as_bytes());
        want.extend_from_slice(b"ccc");
        assert!(outbox
            .push_reply(&head, b"ccc".to_vec(), true, &stats)
            .is_some());
        let large = big(4);
        let res = outbox.push_request(
            &request(4, large.len()),
            &large,
            None,
            Admission::NoWait,
            true,
            &end_b,
            &stats,
        );
        assert!(matches!(res, Ok(None)));
        let head = reply(8, LARGE_PAYLOAD + 3);
        want.extend_from_slice(head.as_bytes());
        want.extend_from_slice(&big(5));
        assert!(outbox.push_reply(&head, big(5), true, &stats).is_some());
        let written_to = outbox.end_requests_dropping_unsent(&stats);
        assert_eq!(written_to, written);
        assert!(end_a.load(Ordering::SeqCst) <= written_to);
        assert!(end_b.load(Ordering::SeqCst) > written_to);
        want.extend_from_slice(&[0x03, 0x01, 0x02, 0x00]);
        assert!(outbox.write_now(&stats).is_none());
        assert_eq!(&rec.0.lock().concat()[written as usize..], &want[..]);
    }

    /// A socket-like stream with a write timeout: it takes `room` bytes,
    /// then times out once (`WouldBlock`) and has room again, as a socket
    /// whose reader wakes up.
    #[derive(Clone, Default)]
    struct Tight {
        inner: Arc<Mutex<TightState>>,
    }

    #[derive(Default)]
    struct TightState {
        room: Option<usize>,
        timeouts: usize,
        wire: Vec<u8>,
    }

    impl Write for Tight {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut st = self.inner.lock();
            let n = match st.room {
                Some(0) => {
                    st.room = None;
                    st.timeouts += 1;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Some(room) => {
                    st.room = Some(room - buf.len().min(room));
                    buf.len().min(room)
                }
                None => buf.len(),
            };
            st.wire.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Control for Tight {
        fn shutdown(&self) {}
        fn bounded_writes(&self) -> bool {
            true
        }
        fn interruptible_reads(&self) -> bool {
            false
        }
        fn interrupt_reads(&self) {}
    }

    /// An outbox over a [`Tight`] stream that takes `room` bytes, then
    /// blocks, with a grace long enough never to run out in a test.
    fn tight_outbox(room: usize) -> (Tight, Outbox) {
        let tight = Tight::default();
        tight.inner.lock().room = Some(room);
        let control: Arc<dyn Control> = Arc::new(tight.clone());
        let outbox = Outbox::new(
            "test",
            Box::new(tight.clone()),
            Some(control),
            Duration::from_secs(60),
            1 << 30,
            1000,
            None,
        );
        (tight, outbox)
    }

    #[test]
    fn a_bounded_write_that_stops_short_leaves_the_rest_in_order_for_the_next_writer() {
        let big = |byte: u8| vec![byte; LARGE_PAYLOAD + 10];
        // Stop inside the first small reply, inside the large one, and
        // between packets.
        for room in [3, 20, LARGE_PAYLOAD / 2, LARGE_PAYLOAD + 40] {
            let (tight, outbox) = tight_outbox(room);
            let stats = Counters::default();
            let mut want = Vec::new();
            for (tag, payload) in [(2, vec![1u8; 30]), (3, big(2)), (4, vec![3; 5])] {
                let head = reply(tag, payload.len());
                want.extend_from_slice(head.as_bytes());
                want.extend_from_slice(&payload);
                assert!(outbox.push_reply(&head, payload, true, &stats).is_some());
            }
            assert!(outbox.write_now_nonblocking(true, &stats).is_none());
            assert_eq!(
                tight.inner.lock().wire,
                want[..room.min(want.len())],
                "room {room}"
            );
            assert_eq!(tight.inner.lock().timeouts, 1);
            // A reply queued meanwhile goes after the rest; the stream now
            // times out once more, and a blocking writer tries again.
            tight.inner.lock().room = Some(7);
            let head = reply(5, 2);
            want.extend_from_slice(head.as_bytes());
            want.extend_from_slice(b"zz");
            assert!(outbox
                .push_reply(&head, b"zz".to_vec(), true, &stats)
                .is_some());
            assert!(outbox.write_now(&stats).is_none());
            assert_eq!(tight.inner.lock().wire, want, "room {room}");
            assert_eq!(tight.inner.lock().timeouts, 2);
        }
    }

    #[test]
    fn dropping_requests_after_a_cut_keeps_the_cut_packet_whole_and_counts_the_rest_unwritten() {
        let big = vec![9u8; LARGE_PAYLOAD + 10];
        // Requests, then a large reply, then requests: cut inside the
        // first request, inside the large reply's head, inside its payload,
        // and between packets.
        for room in [2, 11, 13, 11 + 4, 11 + 20, 11 + LARGE_PAYLOAD / 2] {
            let (tight, outbox) = tight_outbox(room);
            let stats = Counters::default();
            let ends: Vec<_> = (0..4).map(|_| AtomicU64::new(0)).collect();
            let push_rq = |tag: u64, end: &AtomicU64| {
                let res = outbox.push_request(
                    &request(tag, 7),
                    b"request",
                    None,
                    Admission::NoWait,
                    false,
                    end,
                    &stats,
                );
                assert!(matches!(res, Ok(None)));
            };
            push_rq(2, &ends[0]);
            assert!(outbox
                .push_reply(&reply(7, big.len()), big.clone(), true, &stats)
                .is_some());
            push_rq(3, &ends[1]);
            assert!(outbox.write_now_nonblocking(true, &stats).is_none());
            let written = tight.inner.lock().wire.len();
            assert_eq!(written, room, "room {room}");
            // Only what went out counts as written.
            assert_eq!(outbox.written_to(), written as u64, "room {room}");
            push_rq(4, &ends[2]);
            outbox.end_requests_dropping_unsent(&stats);
            assert!(outbox.write_now(&stats).is_none());
            // Whole packets: a request cut short is finished; the large
            // reply goes whole; unwritten requests are gone; ERQ is last.
            let wire = tight.inner.lock().wire.clone();
            let mut pos = 0;
            let mut seen = Vec::new();
            while pos < wire.len() {
                let (packet, used) = Packet::decode(&wire[pos..], u64::MAX)
                    .unwrap()
                    .expect("whole packets");
                seen.push((packet.tag, packet.payload.len()));
                pos += used;
            }
            // The first request is 11 bytes, written or cut: it goes whole.
            let want = [(2, 7), (7, big.len()), (1, 0)];
            assert_eq!(seen, want, "room {room}");
        }
    }

    /// A writer that fails every write.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_is_reported_once_and_kills_the_side() {
        let outbox = Outbox::new(
            "test",
            Box::new(Broken),
            None,
            Duration::ZERO,
            1 << 20,
            1000,
            None,
        );
        let stats = Counters::default();
        let end = AtomicU64::new(0);
        let res = outbox.push_request(
            &request(2, 1),
            b"x",
            None,
            Admission::Wait,
            true,
            &end,
            &stats,
        );
        assert!(matches!(res, Ok(None)));
        let failed = outbox.write_now(&stats).expect("the write failed");
        assert_eq!(failed.0.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(outbox.phase(), Phase::Dead);
        assert!(outbox.write_now(&stats).is_none());
        assert!(outbox.run_send_loop(&stats).is_none());
        let res = outbox.push_request(
            &request(3, 1),
            b"x",
            None,
            Admission::Wait,
            true,
            &end,
            &stats,
        );
        assert!(matches!(res, Err(Error::Closed)));
    }
}
