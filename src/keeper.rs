//! The lease keeper: one thread for the whole process that takes lent
//! readers back once they have rested unread for their lease.
//!
//! A receive thread that lends its reader to the callers (see
//! `Shared::lend_reader`) sleeps until it is recalled, instead of waking
//! every so often to look at the lease: with many connections, those looks
//! were thousands of wake-ups a second, each on a cold thread. The keeper
//! looks at every lent reader once per [`LOOK`] and recalls those whose
//! lease has run out, so a packet nobody waits for is read within a lease
//! and a look. It knows only the [`Lender`] trait, and holds each lender
//! weakly: a connection that ends is dropped from its list at the next
//! look. The thread starts with the first lender and ends once it has had
//! none for [`IDLE_END`].

use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// How often the keeper looks at the lent readers.
pub(crate) const LOOK: Duration = Duration::from_millis(10);

/// How long the keeper thread waits with nothing to watch before it ends.
const IDLE_END: Duration = Duration::from_secs(1);

/// The keeper thread's name.
const NAME: &str = "ps:lease-keeper";

/// Something that lends a reader: a connection's shared state.
pub(crate) trait Lender: Send + Sync {
    /// Looks at the lease at `now`, and recalls the reader if it has
    /// rested unread for all of it. Returns whether to look again at the
    /// next look: false once the reader is back with its receive thread.
    fn look(&self, now: Instant) -> bool;
}

struct Keeper {
    state: Mutex<State>,
    /// Wakes a keeper with nothing to watch.
    work: Condvar,
}

struct State {
    lenders: Vec<Weak<dyn Lender>>,
    /// The keeper thread is running (or about to).
    running: bool,
}

static KEEPER: Keeper = Keeper {
    state: Mutex::new(State {
        lenders: Vec::new(),
        running: false,
    }),
    work: Condvar::new(),
};

/// Has the keeper look at `lender` from the next look on, until its
/// [`look`](Lender::look) returns false. Returns false, watching nothing,
/// if the keeper thread is not running and cannot be started: the caller
/// must then not lend.
pub(crate) fn watch(lender: Weak<dyn Lender>) -> bool {
    let mut st = KEEPER.state.lock();
    if !st.running {
        // The new thread takes this lock only once it is released.
        let spawned = thread::Builder::new().name(NAME.to_string()).spawn(run);
        if let Err(e) = spawned {
            log::warn!("cannot start the lease keeper: {e}; readers are not lent");
            return false;
        }
        st.running = true;
    }
    st.lenders.push(lender);
    if st.lenders.len() == 1 {
        KEEPER.work.notify_one();
    }
    true
}

fn run() {
    loop {
        {
            let mut st = KEEPER.state.lock();
            while st.lenders.is_empty() {
                if KEEPER.work.wait_for(&mut st, IDLE_END).timed_out() && st.lenders.is_empty() {
                    st.running = false;
                    return;
                }
            }
        }
        thread::sleep(LOOK);
        // Looked at with the keeper's lock released: no thread holds two
        // of the crate's locks, and lenders added meanwhile wait for the
        // next look.
        let mut lenders = std::mem::take(&mut KEEPER.state.lock().lenders);
        let now = Instant::now();
        lenders.retain(|lender| {
            lender
                .upgrade()
                .is_some_and(|l: Arc<dyn Lender>| l.look(now))
        });
        let mut st = KEEPER.state.lock();
        if st.lenders.is_empty() {
            st.lenders = lenders;
        } else {
            st.lenders.append(&mut lenders);
        }
    }
}
