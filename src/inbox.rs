//! The peer's requests as this end takes them in: which are in progress,
//! which the peer has cancelled, whether more are welcome, and the replies
//! owed. The receive thread admits requests here (`Shared`), and handlers
//! see their cancels through it (`Request`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::ext::EarlyDeadlines;
use crate::stats::Padded;
use crate::sync;
use crate::tags::TagSet;

/// The peer's requests being handled here, and whether more are welcome.
#[derive(Default)]
pub(crate) struct Inbound {
    in_progress: TagSet,
    /// Of those, the ones the peer has cancelled (extensions).
    cancelled: TagSet,
    /// The peer's deadlines for requests still to come (extensions).
    pub(crate) early_deadlines: EarlyDeadlines,
    /// The peer sent ERQ: it will send no more requests.
    pub(crate) peer_ended_requests: bool,
    /// This end is closing: EOF goes out once `in_progress` is empty.
    pub(crate) closing: bool,
}

/// [`Inbound`] behind its lock, shared with the handlers through their
/// [`Request`]s so that they can see the peer's cancels.
#[derive(Default)]
pub(crate) struct Inbox {
    /// On cache lines of its own, apart from the count of the `Arc` that
    /// holds the `Inbox`, which every request served changes.
    state: Padded<Mutex<Inbound>>,
    /// Notified when the peer cancels a request.
    cancel: Condvar,
    /// Read for every request and seldom written: on cache lines apart
    /// from the lock's, which every request writes.
    seldom: Padded<Seldom>,
    /// Requests answered, their tags free again, or refused, whose replies
    /// are being queued: EOF waits for them too. Raised under the lock, as
    /// the request leaves `in_progress` or is refused, or is taken in to be
    /// served on the thread that reads; lowered without it, once the reply
    /// is queued.
    pub(crate) replying: Padded<AtomicUsize>,
    /// The refusals among `replying`: not the application's work, so not
    /// activity for the idle timeout. Raised before `replying`, lowered
    /// after it.
    pub(crate) refusing: AtomicUsize,
}

#[derive(Default)]
pub(crate) struct Seldom {
    /// How many requests in progress the peer has cancelled: most of the
    /// time none, and then asking takes no lock.
    n_cancelled: AtomicUsize,
    /// `Inbound::closing`, for a handler to read without the lock.
    closing: AtomicBool,
    /// No answer can reach the peer any more: this end aborted, or the
    /// stream broke. Every request in progress counts as cancelled.
    cut_off: AtomicBool,
}

impl Inbox {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inbound> {
        self.state.lock()
    }

    /// No request of the peer's is in progress, nor a reply to one being
    /// queued.
    pub(crate) fn is_idle(&self, inbound: &Inbound) -> bool {
        inbound.in_progress.is_empty() && self.replying.load(Ordering::SeqCst) == 0
    }

    /// No request of the peer's taken in is in progress, nor its reply
    /// being queued: refusals being made do not count. For the idle
    /// timeout, which samples it; a sample racing a refusal may see it
    /// busy, rarely.
    pub(crate) fn serves_nothing(&self, inbound: &Inbound) -> bool {
        let refusing = self.refusing.load(Ordering::SeqCst);
        let replying = self.replying.load(Ordering::SeqCst);
        inbound.in_progress.is_empty() && replying.saturating_sub(refusing) == 0
    }

    /// The peer's requests taken in and not yet answered on the wire.
    pub(crate) fn in_flight(&self, inbound: &Inbound) -> usize {
        inbound.in_progress.len() + self.replying.load(Ordering::SeqCst)
    }

    /// This end is closing ([`Inbox::close`]), as read without the lock.
    pub(crate) fn is_closing(&self) -> bool {
        self.seldom.closing.load(Ordering::SeqCst)
    }

    /// This end is closing: no more requests are taken in, and EOF goes out
    /// once the end is idle.
    pub(crate) fn close(&self, inbound: &mut Inbound) {
        inbound.closing = true;
        self.seldom.closing.store(true, Ordering::SeqCst);
    }

    /// The peer cancels its request `(channel, tag)`. Only a request in
    /// progress can be: a cancel for one answered already, or never sent,
    /// is ignored, so what is held is bounded by the requests in progress.
    pub(crate) fn cancel(&self, channel: u64, tag: u64) -> bool {
        let mut inbound = self.lock();
        let found = inbound.in_progress.contains(&(channel, tag));
        if found && inbound.cancelled.insert((channel, tag)) {
            self.seldom.n_cancelled.fetch_add(1, Ordering::Release);
            self.cancel.notify_all();
        }
        found
    }

    /// `(channel, tag)` is answered: its tag is free for the peer again,
    /// and it can no longer be cancelled.
    pub(crate) fn answered(&self, inbound: &mut Inbound, channel: u64, tag: u64) {
        inbound.in_progress.remove(&(channel, tag));
        if !inbound.cancelled.is_empty() && inbound.cancelled.remove(&(channel, tag)) {
            self.seldom.n_cancelled.fetch_sub(1, Ordering::Release);
        }
    }

    /// True if the peer has cancelled `(channel, tag)`.
    pub(crate) fn peer_cancelled(&self, channel: u64, tag: u64) -> bool {
        self.seldom.n_cancelled.load(Ordering::Acquire) != 0
            && self.lock().cancelled.contains(&(channel, tag))
    }

    /// True if the peer has cancelled `(channel, tag)`, or no answer can
    /// reach it any more.
    pub(crate) fn is_cancelled(&self, channel: u64, tag: u64) -> bool {
        self.seldom.cut_off.load(Ordering::SeqCst) || self.peer_cancelled(channel, tag)
    }

    /// No answer can reach the peer any more: wakes every handler waiting
    /// for a cancel.
    pub(crate) fn cut_off(&self) {
        let _inbound = self.lock();
        self.seldom.cut_off.store(true, Ordering::SeqCst);
        self.cancel.notify_all();
    }

    /// Waits until the peer cancels `(channel, tag)`, or no answer can
    /// reach it any more, or until `deadline`. Returns true if either
    /// happened. Once the request is answered it can no longer be
    /// cancelled, and this waits out the deadline.
    pub(crate) fn wait_cancelled(&self, channel: u64, tag: u64, deadline: Option<Instant>) -> bool {
        let mut inbound = self.lock();
        sync::wait_until(&self.cancel, &mut inbound, deadline, |inbound| {
            !self.seldom.cut_off.load(Ordering::SeqCst)
                && !inbound.cancelled.contains(&(channel, tag))
        })
    }
}

/// Why a request from the peer is not taken in.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// For what it is, or when it came: flags 0 and this reason.
    Denied(String),
    /// For load: the replies this end owes the peer are at their budget.
    Busy,
}

impl Inbound {
    /// Takes in the peer's request `(channel, tag)`, or says why not. With
    /// the replies owed to the peer `at_budget`, the request is refused as
    /// busy, unless none is in progress. It goes into `in_progress` only if
    /// `tracked`: a request served on the thread that reads (an inline
    /// handler's) is answered before the next packet is read, so no later
    /// packet can reuse its tag or cancel it, and the caller counts it as
    /// `replying` instead.
    pub(crate) fn admit(
        &mut self,
        has_handler: bool,
        channel: u64,
        tag: u64,
        at_budget: bool,
        tracked: bool,
    ) -> Result<(), Refusal> {
        let denied = |reason: String| Err(Refusal::Denied(reason));
        if !has_handler {
            denied("no request handler".to_string())
        } else if self.peer_ended_requests {
            denied("requests no longer allowed".to_string())
        } else if self.closing {
            denied("connection is closing".to_string())
        } else if self.in_progress.contains(&(channel, tag)) {
            denied(format!("channel {channel}: tag already in use: {tag}"))
        } else if at_budget && !self.in_progress.is_empty() {
            Err(Refusal::Busy)
        } else {
            if tracked {
                self.in_progress.insert((channel, tag));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn cancels_only_requests_in_progress() {
        let inbox = Inbox::default();
        assert!(!inbox.cancel(0, 9), "never arrived");
        assert_eq!(inbox.lock().admit(true, 0, 9, false, true), Ok(()));
        assert!(!inbox.is_cancelled(0, 9));
        assert!(inbox.cancel(0, 9));
        assert!(inbox.cancel(0, 9), "a second cancel is harmless");
        assert!(inbox.is_cancelled(0, 9));
        assert!(inbox.wait_cancelled(0, 9, Some(Instant::now())));
        {
            let mut inbound = inbox.lock();
            inbox.answered(&mut inbound, 0, 9);
        }
        assert!(!inbox.is_cancelled(0, 9));
        assert_eq!(inbox.seldom.n_cancelled.load(Ordering::Relaxed), 0);
        // Answered: a wait runs to its deadline and says not cancelled.
        let deadline = Instant::now() + Duration::from_millis(20);
        assert!(!inbox.wait_cancelled(0, 9, Some(deadline)));
        assert!(Instant::now() >= deadline);
        assert!(!inbox.cancel(0, 9), "answered already");
        assert!(inbox.lock().cancelled.is_empty());
    }

    #[test]
    fn a_cancel_wakes_a_waiting_handler() {
        let inbox = Arc::new(Inbox::default());
        assert_eq!(inbox.lock().admit(true, 0, 4, false, true), Ok(()));
        let waiter = {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || {
                inbox.wait_cancelled(0, 4, Some(Instant::now() + Duration::from_secs(10)))
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(inbox.cancel(0, 4));
        assert!(
            waiter.join().unwrap(),
            "woken by the cancel, not the deadline"
        );
    }

    #[test]
    fn admission_refuses_for_each_reason_and_names_it() {
        let mut inbound = Inbound::default();
        let denied = |reason: &str| Err(Refusal::Denied(reason.to_string()));
        assert_eq!(
            inbound.admit(false, 0, 2, false, true),
            denied("no request handler")
        );
        assert_eq!(inbound.admit(true, 0, 2, false, true), Ok(()));
        assert_eq!(
            inbound.admit(true, 0, 2, false, true),
            denied("channel 0: tag already in use: 2")
        );
        // The same tag on another channel is another request.
        assert_eq!(inbound.admit(true, 5, 2, false, true), Ok(()));
        inbound.closing = true;
        assert_eq!(
            inbound.admit(true, 0, 3, false, true),
            denied("connection is closing")
        );
        inbound.peer_ended_requests = true;
        assert_eq!(
            inbound.admit(true, 0, 3, false, true),
            denied("requests no longer allowed")
        );
        assert_eq!(inbound.in_progress.len(), 2);
    }

    #[test]
    fn admission_sheds_load_at_the_reply_budget_but_never_starves() {
        let mut inbound = Inbound::default();
        assert_eq!(inbound.admit(true, 0, 2, false, true), Ok(()));
        assert_eq!(inbound.admit(true, 0, 3, true, true), Err(Refusal::Busy));
        assert_eq!(inbound.in_progress.len(), 1);
        // With nothing in progress, one request is always let in.
        let mut inbound = Inbound::default();
        assert_eq!(inbound.admit(true, 0, 2, true, true), Ok(()));
    }
}
