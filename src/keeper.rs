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

/// Looks fall on a grid, so that the keeper wakes once for all the looks
/// due at about the same time. This is its finest step.
const GRID: Duration = Duration::from_millis(5);

/// Its coarsest step: `GRID` doubled six times.
const MAX_GRID_SHIFT: u32 = 6;

/// `at`, a look asked for at `now`, rounded up to the grid of looks. A look
/// further off falls on a coarser grid: the steps are `GRID` doubled, the
/// largest no longer than half the wait (so a look is at most half its
/// wait, or one 5 ms step, late), to 320 ms. The grids nest, so that looks of every wait share
/// the keeper's wake-ups: 200 connections looked at once a second wake it
/// 2 to 3 times a second, not on 200 different steps.
///
/// Every wake-up of the keeper is a timer's, on whichever thread the CPU was
/// running, and the scheduler counts it against that thread as a wake-up of
/// another task: a thread seen waking many tasks is not kept on the CPU of
/// the one it talks to, so with many busy connections, frequent wake-ups
/// split the threads of a call between the CPUs.
fn on_grid(now: Instant, at: Instant) -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    let half_wait = at.saturating_duration_since(now).as_nanos() / 2;
    let mut step = GRID.as_nanos();
    for _ in 0..MAX_GRID_SHIFT {
        if step * 2 > half_wait {
            break;
        }
        step *= 2;
    }
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
            warn!("cannot start the keeper thread: {e}");
            return false;
        }
        st.running = true;
    }
    let first = on_grid(Instant::now(), first);
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
                again.push((on_grid(now, at), watched));
            }
        }
        KEEPER.state.lock().watched.append(&mut again);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A look falls at or after the moment asked, at most half its wait
    /// late (or one finest step, for a short wait), and looks of different
    /// waits share grid points.
    #[test]
    fn looks_fall_on_a_grid_as_coarse_as_half_their_wait() {
        let now = Instant::now();
        for wait_ms in [0u64, 1, 4, 5, 9, 10, 19, 40, 50, 99, 250, 1000, 60_000] {
            for offset_us in [0u64, 1, 2_499, 4_999, 77_777] {
                let asked_at = now + Duration::from_micros(offset_us);
                let at = asked_at + Duration::from_millis(wait_ms);
                let look = on_grid(asked_at, at);
                assert!(look >= at, "wait {wait_ms} ms: a look before its time");
                let late = look - at;
                let bound = (Duration::from_millis(wait_ms) / 2).max(GRID);
                assert!(late < bound, "wait {wait_ms} ms: {late:?} late");
                // The look is on the 5 ms grid too: it shares its wake-up
                // with the looks of short waits.
                assert_eq!(on_grid(look, look), look, "wait {wait_ms} ms");
            }
        }
        // Long waits coalesce: 200 looks a second apart by 5 ms fall on at
        // most 4 steps of the coarsest grid.
        let mut steps: Vec<Instant> = (0..200u64)
            .map(|i| {
                let asked_at = now + Duration::from_millis(5 * i);
                on_grid(asked_at, asked_at + Duration::from_secs(1))
            })
            .collect();
        steps.dedup();
        assert!(steps.len() <= 5, "{} steps", steps.len());
    }
}
