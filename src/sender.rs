//! The send side: an outgoing byte queue that any thread can append encoded
//! packets to, and the send loop that writes it out after the packet grace.
//!
//! The queue plays the part of a `BufWriter` that several threads can fill
//! while a write is in progress: packets are encoded straight into `buf`, and
//! whoever writes swaps `buf` for an empty spare, writes the full one without
//! holding the lock, and swaps back. No packet allocates.
//!
//! Who writes:
//! - the send thread, once the oldest unwritten byte has waited the packet
//!   grace, or at once when a flush is urgent;
//! - a thread about to block for a response (a caller in `wait`, or a handler
//!   whose reply is the last thing this end owes the peer, when there is more
//!   than one handler thread) writes the queue itself when nobody else is
//!   writing, which saves a thread hop. Only one thread writes at a time, so
//!   at most one handler thread can be blocked in a write while the others
//!   keep serving;
//! - a request with a large payload is written by its caller straight from
//!   the caller's slice, after what was queued before it. A large reply is
//!   never written that way, since the handler thread would have to wait for
//!   the writer role: it is queued by move, without a copy, and written in
//!   order by whoever writes next.
//!
//! Only one thread writes at a time (`writing`); it keeps writing until the
//! queue is empty, so bytes appended during a write go out right after it.
//! Replies and control packets are never refused for lack of space; only
//! requests wait for it, so replies cannot be stuck behind requests.

use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::packet::{Head, Kind, Packet};
use crate::stats::Counters;

/// Payloads at least this long are not copied into the queue: a request's is
/// written straight from the caller's slice, a reply's is queued by move.
const DIRECT_WRITE_MIN: usize = 64 << 10;
/// A spare buffer larger than this is shrunk back after a write.
const KEEP_BUF_CAPACITY: usize = 1 << 20;

/// Where the send side is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Accepting packets.
    Open,
    /// The EOF packet is queued: nothing more is accepted.
    EofQueued,
    /// Writing failed, or the connection was aborted: nothing more is
    /// written.
    Dead,
}

struct State {
    buf: Vec<u8>,
    spare: Vec<u8>,
    /// Large reply payloads, queued by move instead of copied: each goes out
    /// right after the first `.0` bytes of `buf` (its packet's head).
    large: Vec<(usize, Vec<u8>)>,
    spare_large: Vec<(usize, Vec<u8>)>,
    large_bytes: usize,
    n_packets: usize,
    writing: bool,
    urgent: bool,
    /// When the oldest unwritten byte was queued.
    since: Option<Instant>,
    phase: Phase,
    /// The first write error, for `join`.
    error: Option<io::Error>,
    /// The send loop has finished: EOF written or the side is dead.
    finished: bool,
    /// The end-of-requests packet is queued: no more requests.
    erq_queued: bool,
    /// Replies (or control packets) are among the unwritten bytes: the peer
    /// may be waiting for them.
    owes_peer: bool,
    /// The send loop sleeps until a batch's grace runs out; it need not be
    /// woken for later packets.
    timer_set: bool,
}

/// The outgoing queue. See the module doc.
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Wakes the send loop: bytes queued, an urgent flush, or the end.
    work: Condvar,
    /// Wakes threads waiting for space, for the writer role, or for the end.
    space: Condvar,
    /// The stream. Only the thread that set `writing` touches it; the lock is
    /// never contended. `None` once closed.
    writer: Mutex<Option<Box<dyn Write + Send>>>,
    grace: Duration,
    max_bytes: usize,
    max_packets: usize,
    max_packet_len: u64,
}

/// What the caller must do after a write failed for the first time.
pub(crate) type WriteFailed = Option<io::ErrorKind>;

impl Outbox {
    pub(crate) fn new(
        writer: Box<dyn Write + Send>,
        grace: Duration,
        max_bytes: usize,
        max_packets: usize,
        max_packet_len: u64,
    ) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                buf: Vec::new(),
                spare: Vec::new(),
                large: Vec::new(),
                spare_large: Vec::new(),
                large_bytes: 0,
                n_packets: 0,
                writing: false,
                urgent: false,
                since: None,
                phase: Phase::Open,
                error: None,
                finished: false,
                erq_queued: false,
                owes_peer: false,
                timer_set: false,
            }),
            work: Condvar::new(),
            space: Condvar::new(),
            writer: Mutex::new(Some(writer)),
            grace,
            max_bytes,
            max_packets,
            max_packet_len,
        }
    }

    /// Queues a request. Waits for space if `block`, else fails with
    /// [`Error::WouldBlock`] when the queue is full. `will_flush` promises a
    /// [`flush_now`](Outbox::flush_now) right after, so the send loop is not
    /// woken to start the grace timer.
    #[allow(clippy::too_many_arguments)] // One call site; a struct would only rename them.
    pub(crate) fn push_request(
        &self,
        channel: u64,
        tag: u64,
        kind: Kind,
        payload: &[u8],
        block: bool,
        will_flush: bool,
        stats: &Counters,
    ) -> Result<WriteFailed> {
        let head = Head::new(channel, tag, kind, payload.len());
        if head.body_len > self.max_packet_len {
            return Err(Error::TooLarge {
                len: head.body_len,
                max: self.max_packet_len,
            });
        }
        let len = head.packet_len(payload.len());
        let mut st = self.state.lock();
        loop {
            if st.phase != Phase::Open || st.erq_queued {
                return Err(Error::Closed);
            }
            let full = !st.buf.is_empty()
                && (st.buf.len() + st.large_bytes + len > self.max_bytes
                    || st.n_packets >= self.max_packets);
            if !full {
                break;
            }
            if !block {
                return Err(Error::WouldBlock);
            }
            // Make room: whoever writes next writes now.
            st.urgent = true;
            self.work.notify_one();
            self.space.wait(&mut st);
        }
        Ok(self.push(st, &head, payload, true, !will_flush, stats))
    }

    /// Queues a response or a control packet. Never waits for space. A packet
    /// queued after EOF, or after the side died, is dropped and logged. The
    /// caller then either writes the queue with
    /// [`flush_now`](Outbox::flush_now) or starts the grace timer with
    /// [`arm`](Outbox::arm).
    pub(crate) fn push_reply(
        &self,
        channel: u64,
        tag: u64,
        kind: Kind,
        payload: Vec<u8>,
        stats: &Counters,
    ) -> WriteFailed {
        let head = Head::new(channel, tag, kind, payload.len());
        let mut st = self.state.lock();
        if st.phase != Phase::Open {
            log::debug!("dropping packet {channel}:{tag} {kind:?}: send side closed");
            return None;
        }
        st.owes_peer = true;
        if payload.len() >= DIRECT_WRITE_MIN {
            // Queued by move: no copy, and no write on this thread.
            stats.send.packets_out.fetch_add(1, Ordering::Relaxed);
            st.buf.extend_from_slice(head.as_bytes());
            st.n_packets += 1;
            st.large_bytes += payload.len();
            let at = st.buf.len();
            st.large.push((at, payload));
            return None;
        }
        // Never written by this thread: a handler or the receive thread
        // blocked on a write could stop this end reading, and so deadlock
        // two ends that flood each other.
        self.push(st, &head, &payload, false, false, stats)
    }

    /// Queues the end-of-requests packet and asks for it to be written at
    /// once. Later requests are refused. Returns false if it was already
    /// queued, or the send side is closed.
    pub(crate) fn push_erq(&self, stats: &Counters) -> bool {
        let mut st = self.state.lock();
        if st.phase != Phase::Open || st.erq_queued {
            return false;
        }
        st.erq_queued = true;
        self.push_control(st, &Packet::erq(), stats);
        true
    }

    /// Queues the EOF packet, last, and asks for it to be written at once.
    /// Later packets are dropped. Returns false if it was already queued, or
    /// the send side is dead.
    pub(crate) fn push_eof(&self, stats: &Counters) -> bool {
        let mut st = self.state.lock();
        if st.phase != Phase::Open {
            return false;
        }
        st.erq_queued = true;
        st.phase = Phase::EofQueued;
        self.push_control(st, &Packet::eof(), stats);
        true
    }

    fn push_control(&self, mut st: MutexGuard<'_, State>, packet: &Packet, stats: &Counters) {
        packet.encode_into(&mut st.buf);
        st.n_packets += 1;
        st.since.get_or_insert_with(Instant::now);
        st.urgent = true;
        st.owes_peer = true;
        stats.send.packets_out.fetch_add(1, Ordering::Relaxed);
        log::trace!("==> queued {packet:?}");
        drop(st);
        self.work.notify_one();
    }

    fn push(
        &self,
        mut st: MutexGuard<'_, State>,
        head: &Head,
        payload: &[u8],
        direct_ok: bool,
        wake: bool,
        stats: &Counters,
    ) -> WriteFailed {
        stats.send.packets_out.fetch_add(1, Ordering::Relaxed);
        if direct_ok && payload.len() >= DIRECT_WRITE_MIN {
            // Wait for the writer role, then write what was queued before this
            // packet, the head and the payload, without copying the payload.
            while st.writing && st.phase != Phase::Dead {
                self.space.wait(&mut st);
            }
            if st.phase == Phase::Dead {
                return None;
            }
            st.buf.extend_from_slice(head.as_bytes());
            st.n_packets += 1;
            return self.drain(st, Some(payload), stats);
        }
        st.buf.extend_from_slice(head.as_bytes());
        st.buf.extend_from_slice(payload);
        st.n_packets += 1;
        if wake {
            self.start_timer(st);
        }
        None
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

    /// Writes the queue now if nobody else is writing; if somebody is, they
    /// write it when their current write ends. Called by threads about to
    /// block, so that the grace never delays a waiting caller.
    pub(crate) fn flush_now(&self, stats: &Counters) -> WriteFailed {
        let st = self.state.lock();
        if st.buf.is_empty() || st.writing || st.phase == Phase::Dead {
            return None;
        }
        self.drain(st, None, stats)
    }

    /// Asks the send loop to write the queue at once if it holds replies,
    /// without doing I/O on this thread. For the receive loop, which must
    /// never block on writes; queued requests alone keep their grace.
    pub(crate) fn flush_replies_soon(&self) {
        let mut st = self.state.lock();
        if st.owes_peer && !st.buf.is_empty() && !st.urgent {
            st.urgent = true;
            drop(st);
            self.work.notify_one();
        }
    }

    /// True if bytes are queued and not yet being written.
    #[cfg(test)]
    pub(crate) fn has_unwritten(&self) -> bool {
        !self.state.lock().buf.is_empty()
    }

    /// Writes the queue until it is empty, as the one writer. `extra`, if
    /// any, is written right after the bytes queued so far.
    fn drain(
        &self,
        mut st: MutexGuard<'_, State>,
        mut extra: Option<&[u8]>,
        stats: &Counters,
    ) -> WriteFailed {
        debug_assert!(!st.writing);
        st.writing = true;
        let mut failed = None;
        while !st.buf.is_empty() && st.phase != Phase::Dead {
            let mut batch = std::mem::take(&mut st.spare);
            std::mem::swap(&mut batch, &mut st.buf);
            let mut large = std::mem::take(&mut st.spare_large);
            std::mem::swap(&mut large, &mut st.large);
            st.large_bytes = 0;
            st.n_packets = 0;
            st.urgent = false;
            st.owes_peer = false;
            st.since = None;
            let payload = extra.take();
            let res = MutexGuard::unlocked(&mut st, || {
                self.space.notify_all();
                let res = self.write_batch(&batch, &large, payload, stats);
                // Free the large payloads here, not under the lock.
                large.clear();
                res
            });
            st.spare_large = large;
            batch.clear();
            if batch.capacity() > KEEP_BUF_CAPACITY {
                batch.shrink_to(KEEP_BUF_CAPACITY);
            }
            st.spare = batch;
            if let Err(e) = res {
                log::error!("write failed: {e}");
                failed = Some(e.kind());
                st.error.get_or_insert(e);
                self.kill(&mut st);
            }
        }
        st.writing = false;
        let ending = st.phase != Phase::Open;
        drop(st);
        self.space.notify_all();
        if ending {
            // The send loop may be waiting for this write to end, to finish.
            self.work.notify_one();
        }
        failed
    }

    fn write_batch(
        &self,
        batch: &[u8],
        large: &[(usize, Vec<u8>)],
        payload: Option<&[u8]>,
        stats: &Counters,
    ) -> io::Result<()> {
        let mut writer = self.writer.lock();
        let Some(writer) = writer.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "send side closed",
            ));
        };
        let mut pos = 0;
        let mut n_bytes = batch.len();
        for (at, payload) in large {
            writer.write_all(&batch[pos..*at])?;
            writer.write_all(payload)?;
            n_bytes += payload.len();
            pos = *at;
        }
        writer.write_all(&batch[pos..])?;
        if let Some(payload) = payload {
            writer.write_all(payload)?;
            n_bytes += payload.len();
        }
        writer.flush()?;
        stats
            .send
            .bytes_out
            .fetch_add(n_bytes as u64, Ordering::Relaxed);
        stats.send.flushes.fetch_add(1, Ordering::Relaxed);
        log::trace!("==> wrote {n_bytes} bytes");
        Ok(())
    }

    fn kill(&self, st: &mut State) {
        st.phase = Phase::Dead;
        st.buf.clear();
        st.large.clear();
        st.large_bytes = 0;
        st.n_packets = 0;
        self.work.notify_all();
        self.space.notify_all();
    }

    /// Stops sending at once: drops what is queued, refuses everything after
    /// and lets the send loop end. The stream itself is closed when the send
    /// loop ends, or by a write in progress when it returns.
    pub(crate) fn abort(&self) {
        let mut st = self.state.lock();
        if st.phase != Phase::Dead {
            self.kill(&mut st);
        }
    }

    /// Waits until the send loop has finished, or until `deadline`. Returns
    /// true if it finished.
    pub(crate) fn wait_finished(&self, deadline: Option<Instant>) -> bool {
        let mut st = self.state.lock();
        while !st.finished {
            match deadline {
                None => self.space.wait(&mut st),
                Some(deadline) => {
                    if self.space.wait_until(&mut st, deadline).timed_out() {
                        return st.finished;
                    }
                }
            }
        }
        true
    }

    /// Takes the first write error, if any.
    pub(crate) fn take_error(&self) -> Option<io::Error> {
        self.state.lock().error.take()
    }

    /// The send loop. Writes the queue once its oldest byte has waited the
    /// grace, or at once when asked; after EOF is written, or the side dies,
    /// it closes the stream and returns.
    pub(crate) fn run_send_loop(&self, stats: &Counters) -> WriteFailed {
        let mut failed = None;
        let mut st = self.state.lock();
        loop {
            if st.phase == Phase::Dead {
                break;
            }
            if st.buf.is_empty() || st.writing {
                if st.phase == Phase::EofQueued && st.buf.is_empty() && !st.writing {
                    break;
                }
                st.timer_set = false;
                self.work.wait(&mut st);
                continue;
            }
            if !st.urgent && !self.grace.is_zero() {
                let since = *st.since.get_or_insert_with(Instant::now);
                let deadline = since + self.grace;
                if Instant::now() < deadline {
                    st.timer_set = true;
                    self.work.wait_until(&mut st, deadline);
                    continue;
                }
            }
            failed = failed.or(self.drain(st, None, stats));
            st = self.state.lock();
        }
        // Close the stream: for a pipe, this is what the peer sees as the end.
        let writer = self.writer.lock().take();
        drop(writer);
        st.finished = true;
        drop(st);
        self.space.notify_all();
        failed
    }
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

    fn request(tag: u64) -> (u64, u64, Kind) {
        (
            0,
            tag,
            Kind::Request {
                rq_type: 1,
                flags: 0,
            },
        )
    }

    #[test]
    fn queued_packets_go_out_in_one_write_on_flush_now() {
        let rec = Recorder::default();
        let outbox = Outbox::new(
            Box::new(rec.clone()),
            Duration::from_secs(60),
            1 << 20,
            1000,
            1 << 20,
        );
        let stats = Counters::default();
        for tag in 2..12 {
            let (ch, tag, kind) = request(tag);
            outbox
                .push_request(ch, tag, kind, b"abc", true, false, &stats)
                .unwrap();
        }
        assert!(rec.0.lock().is_empty());
        assert_eq!(outbox.flush_now(&stats), None);
        let writes = rec.0.lock();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].len(), 10 * 7);
    }

    #[test]
    fn full_queue_refuses_try_but_not_replies() {
        let rec = Recorder::default();
        let outbox = Outbox::new(Box::new(rec), Duration::from_secs(60), 64, 1000, 1 << 20);
        let stats = Counters::default();
        let (ch, tag, kind) = request(2);
        outbox
            .push_request(ch, tag, kind, &[0; 60], false, false, &stats)
            .unwrap();
        let (ch, tag, kind) = request(3);
        let res = outbox.push_request(ch, tag, kind, &[0; 60], false, false, &stats);
        assert!(matches!(res, Err(Error::WouldBlock)));
        let reply = Kind::Response { ok: true, flags: 0 };
        assert_eq!(outbox.push_reply(0, 9, reply, vec![0; 60], &stats), None);
        assert!(outbox.has_unwritten());
    }

    #[test]
    fn large_replies_are_queued_by_move_and_written_in_order() {
        let rec = Recorder::default();
        let outbox = Outbox::new(
            Box::new(rec.clone()),
            Duration::from_secs(60),
            1 << 30,
            1000,
            1 << 30,
        );
        let stats = Counters::default();
        let ok = Kind::Response { ok: true, flags: 0 };
        let big = |byte: u8| vec![byte; DIRECT_WRITE_MIN + 1];
        let mut want = Vec::new();
        for (tag, payload) in [
            (2, vec![1u8; 10]),
            (3, big(2)),
            (4, vec![3; 5]),
            (5, big(4)),
        ] {
            Packet {
                channel: 0,
                tag,
                kind: ok,
                payload: payload.clone(),
            }
            .encode_into(&mut want);
            assert_eq!(outbox.push_reply(0, tag, ok, payload, &stats), None);
        }
        assert_eq!(outbox.flush_now(&stats), None);
        let writes = rec.0.lock();
        assert_eq!(writes.concat(), want);
        // The large payloads went out as writes of their own, uncopied.
        assert!(writes
            .iter()
            .any(|w| w.len() == DIRECT_WRITE_MIN + 1 && w[0] == 2));
    }

    #[test]
    fn nothing_is_accepted_after_eof() {
        let rec = Recorder::default();
        let outbox = Outbox::new(
            Box::new(rec.clone()),
            Duration::ZERO,
            1 << 20,
            1000,
            1 << 20,
        );
        let stats = Counters::default();
        assert!(outbox.push_eof(&stats));
        assert!(!outbox.push_eof(&stats));
        let (ch, tag, kind) = request(2);
        assert!(matches!(
            outbox.push_request(ch, tag, kind, b"", true, false, &stats),
            Err(Error::Closed)
        ));
        assert_eq!(outbox.run_send_loop(&stats), None);
        assert_eq!(rec.0.lock().concat(), [0x03, 0x00, 0x02, 0x00]);
    }
}
