//! The keeper: one thread for the whole process that keeps the time for
//! every connection's reader, so that no read waits with a timeout.
//!
//! It does two things, each behind the [`Watched`] trait:
//! - it takes lent readers back once they have rested unread for their
//!   lease (`Shared::lend_reader`). A receive thread that lends its reader
//!   sleeps until it is recalled, instead of waking every so often to look
//!   at the lease: with many connections, those looks were thousands of
//!   wake-ups a second, each on a cold thread;
//! - it keeps a connection's read timeouts (`receiver::Liveness`): it looks
//!   at the clock the reader stamps, sends the keepalive pings, and when a
//!   timeout has run out it wakes the blocked reader by shutting the
//!   socket's reading down. A read given a timeout instead arms a kernel
//!   timer each time it blocks: once per call on a busy server.
//!
//! The keeper holds what it watches weakly, with the moment it is due for
//! its next look, and sleeps until the first is due. A connection that ends
//! is dropped from its list at its next look. The thread starts with the
//! first thing to watch and ends once it has had none for [`IDLE_END`].

use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// How long the keeper thread waits with nothing to watch before it ends.
const IDLE_END: Duration = Duration::from_secs(1);

/// Looks fall on a grid of this step, so that the keeper wakes once for
/// all the looks due at about the same time.
const GRID: Duration = Duration::from_millis(5);

/// `at`, rounded up to the grid of looks.
fn on_grid(at: Instant) -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    let step = GRID.as_nanos();
    let since = at.saturating_duration_since(base).as_nanos();
    let steps = since.div_ceil(step);
    let offset = u64::try_from(steps * step).unwrap_or(u64::MAX);
    base + Duration::from_nanos(offset)
}

/// The keeper thread's name (the kernel keeps 15 bytes of it).
const NAME: &str = "ps:lease-keeper";

/// Something the keeper looks at now and then.
pub(crate) trait Watched: Send + Sync {
    /// Looks at `now`, and acts if a time has run out. Returns when to
    /// look next, or `None` to be watched no more.
    fn look(&self, now: Instant) -> Option<Instant>;
}

struct Keeper {
    state: Mutex<State>,
    /// Wakes the keeper: something to watch sooner than it would look.
    work: Condvar,
}

struct State {
    /// What is watched, each with when it is due.
    watched: Vec<(Instant, Weak<dyn Watched>)>,
    /// When the keeper wakes next, if it sleeps with something to watch.
    wakes_at: Option<Instant>,
    /// The keeper thread is running (or about to).
    running: bool,
}

static KEEPER: Keeper = Keeper {
    state: Mutex::new(State {
        watched: Vec::new(),
        wakes_at: None,
        running: false,
    }),
    work: Condvar::new(),
};

/// Has the keeper look at `watched` at `first`, and then whenever its
/// [`look`](Watched::look) says, until it says no more. Returns false,
/// watching nothing, if the keeper thread is not running and cannot be
/// started.
pub(crate) fn watch(watched: Weak<dyn Watched>, first: Instant) -> bool {
    let mut st = KEEPER.state.lock();
    if !st.running {
        // The new thread takes this lock once it is released.
        let spawned = thread::Builder::new().name(NAME.to_string()).spawn(run);
        if let Err(e) = spawned {
            log::warn!("cannot start the keeper thread: {e}");
            return false;
        }
        st.running = true;
    }
    let first = on_grid(first);
    st.watched.push((first, watched));
    if st.wakes_at.is_none_or(|at| first < at) {
        KEEPER.work.notify_one();
    }
    true
}

fn run() {
    // Kept from one look to the next: the keeper allocates nothing once
    // they have grown to the number watched.
    let mut due = Vec::new();
    let mut again = Vec::new();
    loop {
        {
            let mut st = KEEPER.state.lock();
            loop {
                let now = Instant::now();
                let first = st.watched.iter().map(|(at, _)| *at).min();
                match first {
                    Some(at) if at <= now => break,
                    Some(at) => {
                        st.wakes_at = Some(at);
                        KEEPER.work.wait_until(&mut st, at);
                    }
                    None => {
                        st.wakes_at = None;
                        let idle = KEEPER.work.wait_for(&mut st, IDLE_END).timed_out();
                        if idle && st.watched.is_empty() {
                            st.running = false;
                            return;
                        }
                    }
                }
            }
            st.wakes_at = None;
            let now = Instant::now();
            let mut idx = 0;
            while idx < st.watched.len() {
                if st.watched[idx].0 <= now {
                    due.push(st.watched.swap_remove(idx).1);
                } else {
                    idx += 1;
                }
            }
        }
        // Looked at with the keeper's lock released: no thread holds two
        // of the crate's locks.
        let now = Instant::now();
        for watched in due.drain(..) {
            let next = watched
                .upgrade()
                .and_then(|w: Arc<dyn Watched>| w.look(now));
            if let Some(at) = next {
                again.push((on_grid(at), watched));
            }
        }
        KEEPER.state.lock().watched.append(&mut again);
    }
}
