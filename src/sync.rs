//! Waiting with deadlines, and the set of threads a connection or server
//! owns.
//!
//! Every bounded wait in the crate goes through [`wait_until`] with an
//! `Option<Instant>` made by [`deadline_after`], so a deadline is passed
//! down to the lowest wait and a huge `Duration` means "no limit" instead of
//! an overflow.

use std::any::Any;
use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

/// The instant `timeout` from now, or `None` ("no limit") if that is past
/// what an `Instant` can hold.
pub(crate) fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// Waits on `cv` while `pending` holds, until `deadline` (`None`: for ever).
/// Returns true if `pending` no longer holds.
pub(crate) fn wait_until<T>(
    cv: &Condvar,
    guard: &mut MutexGuard<'_, T>,
    deadline: Option<Instant>,
    mut pending: impl FnMut(&mut T) -> bool,
) -> bool {
    match deadline {
        None => {
            cv.wait_while(guard, pending);
            true
        }
        Some(deadline) => {
            cv.wait_while_until(guard, &mut pending, deadline);
            !pending(guard)
        }
    }
}

/// Microseconds since the first call in this process: a moment that fits in
/// an atomic.
pub(crate) fn stamp() -> u64 {
    stamp_of(Instant::now())
}

/// The [`stamp`] of `moment`: 0 for a moment before the first stamp.
pub(crate) fn stamp_of(moment: Instant) -> u64 {
    let base = *STAMP_BASE.get_or_init(Instant::now);
    u64::try_from(moment.saturating_duration_since(base).as_micros()).unwrap_or(u64::MAX)
}

/// The moment of a [`stamp`].
pub(crate) fn stamped(micros: u64) -> Instant {
    *STAMP_BASE.get_or_init(Instant::now) + Duration::from_micros(micros)
}

static STAMP_BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A panic payload from a joined thread.
pub(crate) type Panic = Box<dyn Any + Send + 'static>;

/// Threads that someone must be able to wait for with a deadline: each one
/// counts itself out as it ends, so a waiter can give up at its deadline
/// and leave the rest to end by themselves, which `JoinHandle::join` cannot.
/// A thread that ends with a panic leaves the panic here as it ends, so
/// that threads which have ended can be let go without a join: a join
/// waits for the thread's thread-locals to be dropped after its body,
/// where a logger of the user's may flush for as long as it likes.
#[derive(Default)]
pub(crate) struct ThreadSet {
    inner: Mutex<Threads>,
    ended: Condvar,
}

#[derive(Default)]
struct Threads {
    handles: Vec<JoinHandle<()>>,
    live: usize,
    /// The first panic that ended one of the threads, not taken yet.
    panic: Option<Panic>,
}

impl Threads {
    /// Keeps `panic` if it is the first; a later one is leaked rather than
    /// dropped, since its drop may panic in turn.
    fn keep(&mut self, panic: Panic) {
        match self.panic {
            None => self.panic = Some(panic),
            Some(_) => std::mem::forget(panic),
        }
    }
}

/// Counts its thread out when dropped, so a panicking thread is counted out
/// too.
struct LiveGuard(Arc<ThreadSet>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut inner = self.0.inner.lock();
        inner.live -= 1;
        // A waiter that is itself one of the threads waits for one left.
        if inner.live <= 1 {
            self.0.ended.notify_all();
        }
    }
}

thread_local! {
    /// The set this thread belongs to, if it is one of a set's: the set's
    /// address.
    static OWN_SET: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl ThreadSet {
    /// Spawns a named thread that belongs to this set.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        name: String,
        body: impl FnOnce() + Send + 'static,
    ) -> io::Result<()> {
        self.inner.lock().live += 1;
        // Made after the count went up: if the spawn fails, the closure is
        // dropped unrun and the guard counts the thread out again.
        let guard = LiveGuard(Arc::clone(self));
        let handle = thread::Builder::new().name(name).spawn(move || {
            let guard = guard;
            OWN_SET.with(|own| own.set(Arc::as_ptr(&guard.0) as usize));
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
            // Kept before the thread counts itself out: whoever sees every
            // thread ended sees its panic.
            if let Err(panic) = ran {
                guard.0.inner.lock().keep(panic);
            }
            drop(guard);
        })?;
        self.inner.lock().handles.push(handle);
        Ok(())
    }

    /// Waits until every thread of the set has ended, or until `deadline`.
    /// Returns true if they all ended. Called on one of the set's own
    /// threads (a hook of the application's that closes the connection it
    /// runs for), it waits for the others: a thread cannot end while it
    /// waits for itself.
    pub(crate) fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mine = OWN_SET.with(|own| own.get()) == self as *const ThreadSet as usize;
        let left = usize::from(mine);
        let mut inner = self.inner.lock();
        wait_until(&self.ended, &mut inner, deadline, |inner| inner.live > left)
    }

    /// The threads spawned and not joined yet, running or not.
    #[cfg(test)]
    pub(crate) fn handles(&self) -> usize {
        self.inner.lock().handles.len()
    }

    /// Joins the threads that have ended and returns the first panic that
    /// ended one of them, if not taken yet. Threads still running are left
    /// alone. A join waits for the thread's thread-locals to be dropped:
    /// not for a thread that must go on at once.
    pub(crate) fn join_ended(&self) -> Option<Panic> {
        let handles = self.take_ended();
        for handle in handles {
            if let Err(payload) = handle.join() {
                self.inner.lock().keep(payload);
            }
        }
        self.inner.lock().panic.take()
    }

    /// Lets the threads that have ended go without joining them, and
    /// returns the first panic that ended one of them, if not taken yet.
    /// Never waits.
    pub(crate) fn let_ended_go(&self) -> Option<Panic> {
        drop(self.take_ended());
        self.inner.lock().panic.take()
    }

    /// [`join_ended`](ThreadSet::join_ended) for a wait with no deadline,
    /// [`let_ended_go`](ThreadSet::let_ended_go) for one with a deadline,
    /// which a thread's thread-locals (a logger's flush, say) must not hold
    /// past it.
    pub(crate) fn join_or_let_go(&self, deadline: Option<Instant>) -> Option<Panic> {
        match deadline {
            None => self.join_ended(),
            Some(_) => self.let_ended_go(),
        }
    }

    /// The handles of the threads that have ended, taken out of the set.
    fn take_ended(&self) -> Vec<JoinHandle<()>> {
        let mut inner = self.inner.lock();
        // Once none is live, every thread is past its body and about to
        // exit, so joining it is quick.
        let all = inner.live == 0;
        let (ended, running): (Vec<_>, Vec<_>) = std::mem::take(&mut inner.handles)
            .into_iter()
            .partition(|handle| all || handle.is_finished());
        inner.handles = running;
        ended
    }
}

/// Runs `f`, code of the application's (or the library's logging, which
/// may be the application's logger), catching a panic in it; what that
/// panic carries is leaked rather than dropped, since its drop may panic
/// in turn.
pub(crate) fn contained(f: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        std::mem::forget(panic);
    }
}

/// Runs `f`, a hook of the application's, on a thread of the library's or
/// in a call that must return: a panic in it is caught and logged, as
/// `what` of connection or server `name`, and `None` returned. The logging
/// is [`contained`] too.
pub(crate) fn caught<T>(name: &str, what: &str, f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(value) => Some(value),
        Err(panic) => {
            error!("{name}: {what} panicked: {}", panic_text(&panic));
            std::mem::forget(panic);
            None
        }
    }
}

/// The message a panic carries, or "a panic" if it is not text.
pub(crate) fn panic_text(panic: &Panic) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}
