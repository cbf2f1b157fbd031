//! The table of this end's requests awaiting a response, keyed by
//! `(channel, tag)`, and the condvar-backed cell each waiter sleeps on.
//!
//! No thread holds the table's lock and a cell's lock at once, and no I/O
//! and no user code runs under either.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::error::{Disconnect, Error, Result};
use crate::ext::CONTROL_CHANNEL;
use crate::reply::Response;
use crate::tags::TagMap;

enum Slot {
    Empty,
    Ready(Result<Response>),
    Taken,
}

/// One request's result, filled exactly once by the receive side.
pub(crate) struct Cell {
    slot: Mutex<Slot>,
    ready: Condvar,
    /// Where the request's packet ends in the stream of bytes this end has
    /// queued (see `Outbox`), or 0 before it is queued: against how far the
    /// writers have got when the connection ends, this says whether the
    /// request was written.
    pub(crate) queued_end: AtomicU64,
}

impl Cell {
    fn new() -> Cell {
        Cell {
            slot: Mutex::new(Slot::Empty),
            ready: Condvar::new(),
            queued_end: AtomicU64::new(0),
        }
    }

    fn fill(&self, res: Result<Response>) {
        let mut slot = self.slot.lock();
        debug_assert!(matches!(*slot, Slot::Empty), "response cell filled twice");
        *slot = Slot::Ready(res);
        drop(slot);
        self.ready.notify_all();
    }

    fn take(slot: &mut Slot) -> Option<Result<Response>> {
        match std::mem::replace(slot, Slot::Taken) {
            Slot::Ready(res) => Some(res),
            Slot::Taken => Some(Err(Error::ResponseTaken)),
            Slot::Empty => {
                *slot = Slot::Empty;
                None
            }
        }
    }

    /// Takes the result if it is there.
    pub(crate) fn try_take(&self) -> Option<Result<Response>> {
        Cell::take(&mut self.slot.lock())
    }

    pub(crate) fn is_ready(&self) -> bool {
        !matches!(*self.slot.lock(), Slot::Empty)
    }

    /// Blocks until the result is there.
    pub(crate) fn wait(&self) -> Result<Response> {
        let mut slot = self.slot.lock();
        self.ready
            .wait_while(&mut slot, |s| matches!(s, Slot::Empty));
        Cell::take(&mut slot).unwrap_or(Err(Error::ResponseTaken))
    }

    /// Blocks until the result is there, or until `deadline`.
    pub(crate) fn wait_until(&self, deadline: Option<Instant>) -> Option<Result<Response>> {
        let mut slot = self.slot.lock();
        match deadline {
            None => self
                .ready
                .wait_while(&mut slot, |s| matches!(s, Slot::Empty)),
            Some(deadline) => {
                self.ready
                    .wait_while_until(&mut slot, |s| matches!(s, Slot::Empty), deadline);
            }
        }
        Cell::take(&mut slot)
    }
}

/// What became of a response handed to [`PendingTable::complete`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    Delivered,
    /// No entry, but the tag was issued: the request was cancelled (or
    /// already answered). Its entry is long gone; tags are never reused, so
    /// nothing needs to be remembered to know this.
    Cancelled,
    /// A tag this end never issued.
    Unknown,
}

/// Keep at most this many spare cells for reuse.
const MAX_FREE_CELLS: usize = 1024;

struct Inner {
    entries: TagMap<Arc<Cell>>,
    /// Of the entries, those on the extensions' control channel: not
    /// counted as requests pending.
    control: usize,
    /// The next tag of each channel but 0.
    next_tags: HashMap<u64, u64>,
    next_tag0: u64,
    /// Set once the connection can no longer deliver responses.
    closed: bool,
    /// Cells whose handles are gone, for reuse. The receive thread may hold
    /// a clone for a moment after filling one, so they are checked for sole
    /// ownership when taken, not when returned.
    free: VecDeque<Arc<Cell>>,
}

impl Inner {
    fn remove(&mut self, channel: u64, tag: u64) -> Option<Arc<Cell>> {
        let cell = self.entries.remove(&(channel, tag));
        self.control -= usize::from(cell.is_some() && channel == CONTROL_CHANNEL);
        cell
    }
}

/// A spare cell nobody else holds, emptied. The newest spare may still be
/// held by the receive thread that filled it: it goes to the back of the line
/// and one more is tried.
fn take_free_cell(free: &mut VecDeque<Arc<Cell>>) -> Option<Arc<Cell>> {
    for _ in 0..2 {
        let mut cell = free.pop_back()?;
        if let Some(only) = Arc::get_mut(&mut cell) {
            *only.slot.get_mut() = Slot::Empty;
            *only.queued_end.get_mut() = 0;
            return Some(cell);
        }
        free.push_front(cell);
    }
    None
}

/// This end's requests awaiting responses.
pub(crate) struct PendingTable {
    inner: Mutex<Inner>,
}

/// Channel 0's tags 0 and 1 belong to the EOF and ERQ packets.
const FIRST_TAG0: u64 = 2;

impl PendingTable {
    pub(crate) fn new() -> PendingTable {
        PendingTable {
            inner: Mutex::new(Inner {
                entries: TagMap::default(),
                control: 0,
                next_tags: HashMap::new(),
                next_tag0: FIRST_TAG0,
                closed: false,
                free: VecDeque::new(),
            }),
        }
    }

    /// Allocates the next tag on `channel` and a cell for its response. Tags
    /// are never reused.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the connection has ended.
    pub(crate) fn register(&self, channel: u64) -> Result<(u64, Arc<Cell>)> {
        let mut inner = self.inner.lock();
        if inner.closed {
            return Err(Error::Closed);
        }
        let next = if channel == 0 {
            &mut inner.next_tag0
        } else {
            inner.next_tags.entry(channel).or_insert(0)
        };
        let tag = *next;
        *next = tag.checked_add(1).ok_or(Error::Closed)?;
        let cell = take_free_cell(&mut inner.free).unwrap_or_else(|| Arc::new(Cell::new()));
        inner.entries.insert((channel, tag), Arc::clone(&cell));
        inner.control += usize::from(channel == CONTROL_CHANNEL);
        Ok((tag, cell))
    }

    /// Hands a response to the request it answers.
    pub(crate) fn complete(&self, channel: u64, tag: u64, res: Result<Response>) -> Completion {
        let mut inner = self.inner.lock();
        if let Some(cell) = inner.remove(channel, tag) {
            drop(inner);
            cell.fill(res);
            return Completion::Delivered;
        }
        let issued = match channel {
            0 => (FIRST_TAG0..inner.next_tag0).contains(&tag),
            _ => inner
                .next_tags
                .get(&channel)
                .is_some_and(|&next| tag < next),
        };
        if issued {
            Completion::Cancelled
        } else {
            Completion::Unknown
        }
    }

    /// Stops waiting for `(channel, tag)`: its entry is freed at once, so
    /// that requests the peer never answers cannot pile up. A late response
    /// is recognised by its tag, which was issued and is never reused.
    pub(crate) fn remove(&self, channel: u64, tag: u64) {
        self.inner.lock().remove(channel, tag);
    }

    /// Fails every pending request and refuses new ones: with
    /// [`Error::ConnectionLost`] if its packet ends at or before
    /// `written_to` in the stream of queued bytes (it was written, or was
    /// being written), else with [`Error::Unsent`]. Returns how many waiters
    /// it failed.
    pub(crate) fn fail_all(&self, why: Disconnect, written_to: u64) -> usize {
        let entries = {
            let mut inner = self.inner.lock();
            inner.closed = true;
            inner.control = 0;
            std::mem::take(&mut inner.entries)
        };
        let mut n_failed = 0;
        for (_, cell) in entries {
            // 0: not queued yet, and now it never will be. (It is stored
            // under the outgoing queue's lock, which `written_to` was read
            // under after every push that could still queue.)
            let end = cell.queued_end.load(Ordering::Acquire);
            let err = if end != 0 && end <= written_to {
                Error::ConnectionLost(why)
            } else {
                Error::Unsent(why)
            };
            cell.fill(Err(err));
            n_failed += 1;
        }
        n_failed
    }

    /// Keeps a cell whose handle is gone for a later request.
    pub(crate) fn recycle(&self, cell: Arc<Cell>) {
        // Ours, plus perhaps the receive thread's, about to be dropped; a
        // cell still in the table (count 3 or more) is not reusable.
        if Arc::strong_count(&cell) <= 2 {
            let mut inner = self.inner.lock();
            if inner.free.len() < MAX_FREE_CELLS {
                inner.free.push_back(cell);
            }
        }
    }

    /// The number of requests still waiting for a response, control
    /// requests not counted.
    pub(crate) fn len(&self) -> usize {
        let inner = self.inner.lock();
        inner.entries.len() - inner.control
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ok(flags: u64) -> Result<Response> {
        Ok(Response {
            flags,
            payload: Vec::new(),
        })
    }

    #[test]
    fn tags_start_at_2_on_channel_0_and_0_elsewhere_and_never_repeat() {
        let table = PendingTable::new();
        let (t0, _) = table.register(0).unwrap();
        let (t1, _) = table.register(0).unwrap();
        let (c5, _) = table.register(5).unwrap();
        assert_eq!((t0, t1, c5), (2, 3, 0));
        assert_eq!(table.complete(0, 2, ok(0)), Completion::Delivered);
        assert_eq!(table.register(0).unwrap().0, 4);
    }

    #[test]
    fn fill_then_wait() {
        let table = PendingTable::new();
        let (tag, cell) = table.register(0).unwrap();
        assert!(!cell.is_ready());
        assert_eq!(table.complete(0, tag, ok(9)), Completion::Delivered);
        assert!(cell.is_ready());
        assert_eq!(cell.wait_until(None).unwrap().unwrap().flags, 9);
        // A second take reports the result as gone.
        assert!(matches!(cell.try_take(), Some(Err(Error::ResponseTaken))));
    }

    #[test]
    fn wait_then_fill_from_another_thread() {
        let table = PendingTable::new();
        let (tag, cell) = table.register(0).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| cell.wait_until(Some(deadline)));
            // A notify that finds a thread asleep on the cell proves the
            // waiter is blocked; the slot still empty, it goes back to
            // sleep.
            while cell.ready.notify_all() == 0 {
                assert!(Instant::now() < deadline, "the waiter never blocked");
                std::thread::yield_now();
            }
            assert!(!waiter.is_finished(), "the waiter returned unfilled");
            assert_eq!(table.complete(0, tag, ok(3)), Completion::Delivered);
            let res = waiter.join().unwrap().expect("filled in time");
            assert_eq!(res.unwrap().flags, 3);
        });
    }

    #[test]
    fn timeout_leaves_the_request_pending() {
        let table = PendingTable::new();
        let (tag, cell) = table.register(0).unwrap();
        let deadline = Instant::now() + Duration::from_millis(10);
        assert!(cell.wait_until(Some(deadline)).is_none());
        assert_eq!(table.len(), 1);
        assert_eq!(table.complete(0, tag, ok(1)), Completion::Delivered);
        assert!(cell.try_take().unwrap().is_ok());
    }

    #[test]
    fn cancel_then_late_reply_is_dropped_quietly() {
        let table = PendingTable::new();
        let (tag, _cell) = table.register(0).unwrap();
        table.remove(0, tag);
        assert_eq!(table.len(), 0);
        assert_eq!(table.complete(0, tag, ok(1)), Completion::Cancelled);
        // Tags never issued, on this channel or another, are unknown.
        assert_eq!(table.complete(0, tag + 1, ok(1)), Completion::Unknown);
        assert_eq!(table.complete(0, 0, ok(1)), Completion::Unknown);
        assert_eq!(table.complete(3, 0, ok(1)), Completion::Unknown);
    }

    #[test]
    fn fail_all_tells_written_from_unsent_wakes_every_waiter_and_refuses_new_requests() {
        let table = PendingTable::new();
        let cells: Vec<_> = (0..5).map(|_| table.register(0).unwrap().1).collect();
        // The first three were written (the writers reached byte 30), the
        // fourth was queued after them, the fifth never reached the queue.
        for (idx, cell) in cells.iter().enumerate().take(4) {
            cell.queued_end
                .store(10 * (idx as u64 + 1), Ordering::SeqCst);
        }
        assert_eq!(table.fail_all(Disconnect::PeerEof, 30), 5);
        for (idx, cell) in cells.into_iter().enumerate() {
            let res = cell.wait_until(Some(Instant::now() + Duration::from_secs(5)));
            match res {
                Some(Err(Error::ConnectionLost(Disconnect::PeerEof))) => assert!(idx < 3),
                Some(Err(Error::Unsent(Disconnect::PeerEof))) => assert!(idx >= 3),
                other => panic!("request {idx}: {other:?}"),
            }
        }
        assert!(matches!(table.register(0), Err(Error::Closed)));
    }

    #[test]
    fn recycled_cells_come_back_empty() {
        let table = PendingTable::new();
        let (tag, cell) = table.register(0).unwrap();
        table.complete(0, tag, ok(1));
        let ptr = Arc::as_ptr(&cell);
        table.recycle(cell);
        let (_, again) = table.register(0).unwrap();
        assert_eq!(Arc::as_ptr(&again), ptr);
        assert!(!again.is_ready());
    }
}
