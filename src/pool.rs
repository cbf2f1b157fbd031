//! The handler pool: a queue of jobs, the worker threads that run them, the
//! policy for waking workers, and the quota that bounds what one producer
//! may have queued.
//!
//! The pool knows nothing of connections: a job is anything that implements
//! [`Job`]. A connection's job is one request from its peer, carrying the
//! connection's shared state with it. One pool serves one connection, its
//! jobs first in first out; or every connection of a server, which take
//! turns ([`Order::Fair`]), so that one client's burst delays another's
//! request by at most a job per connection with work queued.
//!
//! Each producer (a connection's receive thread) holds a [`Quota`]: it
//! blocks when it has too many jobs, or too many bytes, queued and not yet
//! started, which slows its peer down without holding up other producers of
//! the same pool. The queue itself is therefore bounded by the quotas.
//!
//! Idle workers park on a condvar instead of spinning, and a producer wakes
//! one only when the jobs queued plus the workers busy in a job outnumber the
//! workers awake: a burst of quick jobs is served by the workers already
//! awake. A job never waits long behind long-running ones while a worker
//! sleeps: a worker that parks while another is in a job looks at the queue
//! again every [`LOOK_AGAIN`], and when none does, a worker that takes a job
//! with more queued wakes one to do so. A watcher is woken by a producer
//! only when no other parked worker is left, so it goes on watching through
//! a run of bursts, and each burst costs the one wake-up of the worker that
//! serves it. A look that finds jobs that were queued already when it
//! began, and not taken since, shows the workers awake held up: the watcher
//! takes one of those jobs and wakes a worker for each of the others at
//! once. So the jobs of a burst that block all start within a look of
//! being queued, two if the burst came partway through a look, not one
//! look after another.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::sync::ThreadSet;

/// Work for the pool.
pub(crate) trait Job: Send + 'static {
    /// Does the work, on a worker thread.
    fn run(self);

    /// Who the job is for: in a [fair](Order::Fair) pool, the jobs of each
    /// lane take turns.
    fn lane(&self) -> usize;
}

/// The order in which queued jobs start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// First in, first out: for one producer.
    Fifo,
    /// The lanes take turns, one job each, first in first out within a
    /// lane: for many producers, so that one with many jobs queued does
    /// not make the others wait behind all of them.
    Fair,
}

/// The queue of a pool.
enum Queue<J> {
    /// A bounded channel: queuing allocates nothing.
    Fifo { tx: Sender<J>, rx: Receiver<J> },
    Fair {
        lanes: Mutex<Lanes<J>>,
        len: AtomicUsize,
    },
}

/// The jobs of a fair queue, by lane, and the lanes with jobs, in turn.
struct Lanes<J> {
    jobs: HashMap<usize, VecDeque<J>>,
    turns: VecDeque<usize>,
}

impl<J: Job> Queue<J> {
    fn len(&self) -> usize {
        match self {
            Queue::Fifo { rx, .. } => rx.len(),
            Queue::Fair { len, .. } => len.load(Ordering::SeqCst),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn try_pop(&self) -> Option<J> {
        match self {
            Queue::Fifo { rx, .. } => rx.try_recv().ok(),
            Queue::Fair { lanes, len } => {
                if len.load(Ordering::SeqCst) == 0 {
                    return None;
                }
                let mut lanes = lanes.lock();
                let lane = lanes.turns.pop_front()?;
                let queue = lanes.jobs.get_mut(&lane)?;
                let job = queue.pop_front();
                if queue.is_empty() {
                    lanes.jobs.remove(&lane);
                } else {
                    lanes.turns.push_back(lane);
                }
                len.fetch_sub(usize::from(job.is_some()), Ordering::SeqCst);
                job
            }
        }
    }
}

/// Queued jobs one awake worker is expected to get through before another is
/// woken to help.
const JOBS_PER_WORKER: usize = 16;

/// How often a worker parked while jobs run looks at the queue: about how
/// long a job waits behind jobs that block, with a worker free, and half
/// the longest.
pub(crate) const LOOK_AGAIN: Duration = Duration::from_millis(5);

/// The queue and its workers. See the module doc.
pub(crate) struct Pool<J> {
    queue: Queue<J>,
    n_workers: usize,
    /// Workers parked on `wake` or `watch`; changed only under `parked`'s
    /// lock.
    n_parked: AtomicUsize,
    /// Workers inside a job.
    n_busy: AtomicUsize,
    /// How often a watching worker looks at the queue: [`LOOK_AGAIN`].
    look_again: Duration,
    /// Parked workers that look at the queue again every [`LOOK_AGAIN`].
    n_watching: AtomicUsize,
    /// Workers woken to watch the queue rather than take a job; changed
    /// only under `parked`'s lock.
    recruits: AtomicUsize,
    /// Jobs taken from the queue so far (wrapping): a watcher compares it
    /// before and after a look.
    n_taken: AtomicUsize,
    /// Successful wake-ups of parked workers, for the tests.
    n_woken: AtomicUsize,
    /// Looks at the end of a watch that found jobs queued, for the tests.
    n_looks: AtomicUsize,
    /// Workers started and not yet ended.
    n_alive: AtomicUsize,
    closed: AtomicBool,
    /// The lock of `n_parked` and of the two condvars: workers parked with
    /// no job running wait on `wake`, the watching ones on `watch`.
    parked: Mutex<()>,
    wake: Condvar,
    watch: Condvar,
}

impl<J: Job> Pool<J> {
    /// Starts `n_workers` workers, named `"{name}:handler{idx}"`, in
    /// `threads`, with room for `capacity` queued jobs (a fair queue holds
    /// what the producers' quotas let in).
    pub(crate) fn start(
        name: &str,
        n_workers: usize,
        capacity: usize,
        order: Order,
        threads: &Arc<ThreadSet>,
    ) -> io::Result<Arc<Pool<J>>> {
        Pool::start_looking_every(name, n_workers, capacity, order, threads, LOOK_AGAIN)
    }

    /// [`start`](Pool::start), with the watchers looking at the queue every
    /// `look_again`.
    fn start_looking_every(
        name: &str,
        n_workers: usize,
        capacity: usize,
        order: Order,
        threads: &Arc<ThreadSet>,
        look_again: Duration,
    ) -> io::Result<Arc<Pool<J>>> {
        let pool: Arc<Pool<J>> = Arc::new(Pool::new(n_workers, capacity, order, look_again));
        for idx in 0..n_workers {
            let worker = Arc::clone(&pool);
            pool.n_alive.fetch_add(1, Ordering::SeqCst);
            let spawned = threads.spawn(format!("{name}:handler{idx}"), move || {
                let _ended = WorkerEnded(&worker);
                while let Some(job) = worker.pop() {
                    worker.busy(|| {
                        // Counted busy now: if jobs are still queued and no
                        // parked worker watches the queue, one must, in case
                        // this job is slow and the producer has nothing
                        // more to wake workers for.
                        if worker.n_watching.load(Ordering::SeqCst) == 0 {
                            worker.recruit_watcher();
                        }
                        job.run()
                    });
                }
            });
            if let Err(e) = spawned {
                pool.n_alive.fetch_sub(1, Ordering::SeqCst);
                pool.close();
                return Err(e);
            }
        }
        Ok(pool)
    }

    fn new(n_workers: usize, capacity: usize, order: Order, look_again: Duration) -> Pool<J> {
        let queue = match order {
            Order::Fifo => {
                // An array, allocated once: queuing a job allocates nothing.
                let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
                Queue::Fifo { tx, rx }
            }
            Order::Fair => Queue::Fair {
                lanes: Mutex::new(Lanes {
                    jobs: HashMap::new(),
                    turns: VecDeque::new(),
                }),
                len: AtomicUsize::new(0),
            },
        };
        Pool {
            queue,
            n_workers,
            n_parked: AtomicUsize::new(0),
            n_busy: AtomicUsize::new(0),
            look_again,
            n_watching: AtomicUsize::new(0),
            recruits: AtomicUsize::new(0),
            n_taken: AtomicUsize::new(0),
            n_woken: AtomicUsize::new(0),
            n_looks: AtomicUsize::new(0),
            n_alive: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            parked: Mutex::new(()),
            wake: Condvar::new(),
            watch: Condvar::new(),
        }
    }

    /// Queues a job without waking a worker: the producer calls
    /// [`wake`](Pool::wake) once it has queued a batch, so a batch costs a
    /// few wake-ups, not one each. Blocks only if the whole pool's queue is
    /// full (each producer's own [`Quota`] usually stops it first), after
    /// waking workers, and never once the pool is closed: a job that finds
    /// it closed and the queue full is dropped, as the jobs queued when the
    /// last worker ends are. (A closed quota lets its producers through, so
    /// an abort can find the queue full, its handlers held up.)
    pub(crate) fn push(&self, job: J) {
        match &self.queue {
            Queue::Fifo { tx, .. } => {
                if let Err(err) = tx.try_send(job) {
                    self.wake();
                    let mut job = err.into_inner();
                    // The receiver lives in `self`, so the channel never
                    // disconnects.
                    loop {
                        if self.closed.load(Ordering::SeqCst) {
                            debug!("a job for a closed pool whose queue is full: dropped");
                            return;
                        }
                        match tx.send_timeout(job, CLOSED_LOOK) {
                            Ok(()) => break,
                            Err(e) => job = e.into_inner(),
                        }
                    }
                }
            }
            Queue::Fair { lanes, len } => {
                let lane = job.lane();
                let mut lanes = lanes.lock();
                let queue = lanes.jobs.entry(lane).or_default();
                queue.push_back(job);
                if queue.len() == 1 {
                    lanes.turns.push_back(lane);
                }
                len.fetch_add(1, Ordering::SeqCst);
            }
        }
        // Queued once the last worker has ended, as when a connection is
        // aborted while its reader hands on a request: nobody would run it,
        // and what it holds would be kept alive by the queue.
        if self.closed.load(Ordering::SeqCst) && self.n_alive.load(Ordering::SeqCst) == 0 {
            self.discard_queued();
        }
    }

    /// Drops every queued job, unrun: for a closed pool with no worker left.
    fn discard_queued(&self) {
        let mut n = 0;
        while let Some(job) = self.queue.try_pop() {
            drop(job);
            n += 1;
        }
        if n > 0 {
            debug!("{n} jobs queued after the pool's workers had ended: dropped");
        }
    }

    /// Wakes as many parked workers as the queued jobs need: one for every
    /// [`JOBS_PER_WORKER`] queued jobs, plus one for every worker busy in a
    /// job (which may be a slow one). Workers that are not watching the
    /// queue are woken first: a watcher keeps watching while it can.
    pub(crate) fn wake(&self) {
        // Pairs with the fence in `pop`: either this thread sees the worker
        // parked, or the worker sees the job.
        fence(Ordering::SeqCst);
        if self.n_parked.load(Ordering::SeqCst) == 0 || self.queue.is_empty() {
            return;
        }
        let _guard = self.parked.lock();
        loop {
            let n_parked = self.n_parked.load(Ordering::SeqCst);
            let n_awake = self.n_workers - n_parked;
            let n_needed =
                self.n_busy.load(Ordering::SeqCst) + self.queue.len().div_ceil(JOBS_PER_WORKER);
            if n_parked == 0 || n_needed <= n_awake {
                return;
            }
            if !self.wake_one() {
                return;
            }
        }
    }

    /// Called with `parked` locked: wakes one parked worker, one that is
    /// not watching if there is one, and counts it awake. False if none was
    /// woken: every parked one is between a timed-out wait and taking the
    /// lock back, and counts itself out and looks at the queue.
    fn wake_one(&self) -> bool {
        if self.wake.notify_one() || self.watch.notify_one() {
            self.n_parked.fetch_sub(1, Ordering::SeqCst);
            self.n_woken.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Called by a worker that has just taken a job, with no worker
    /// watching: if jobs are still queued, wakes a parked worker to watch
    /// the queue, not to take a job at once. Were it to take one, it would
    /// wake another in turn, and a burst of quick jobs would wake every
    /// worker; a watcher takes a job only if one is still queued when it
    /// next looks, [`LOOK_AGAIN`] later.
    fn recruit_watcher(&self) {
        fence(Ordering::SeqCst);
        if self.n_parked.load(Ordering::SeqCst) == 0 || self.queue.is_empty() {
            return;
        }
        let _guard = self.parked.lock();
        if self.n_watching.load(Ordering::SeqCst) > 0 || self.queue.is_empty() {
            return;
        }
        // Whichever worker wakes next from `wake` takes the task. It counts
        // as watching from now, so that the jobs taken before it is up do
        // not recruit more.
        if self.wake.notify_one() {
            self.recruits.fetch_add(1, Ordering::SeqCst);
            self.n_watching.fetch_add(1, Ordering::SeqCst);
            self.n_parked.fetch_sub(1, Ordering::SeqCst);
            self.n_woken.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Called with `parked` locked, by a watcher at the end of a look that
    /// began with `queued_before` jobs queued and `taken_before` taken: the
    /// jobs queued then and not taken since have waited a whole look, so
    /// the workers awake are held up, in jobs that may block. Each such job
    /// still queued gets a worker now: this one, and one woken for each of
    /// the others. Were each woken worker to recruit the next watcher
    /// instead, the jobs of a burst that block would start one look apart.
    fn wake_for_stuck_jobs(&self, queued_before: usize, taken_before: usize) {
        let n_taken = self
            .n_taken
            .load(Ordering::SeqCst)
            .wrapping_sub(taken_before);
        let n_stuck = queued_before.saturating_sub(n_taken).min(self.queue.len());
        for _ in 1..n_stuck {
            if !self.wake_one() {
                return;
            }
        }
    }

    /// The next job; `None` once the pool is closed and its queue empty.
    fn pop(&self) -> Option<J> {
        // Woken to watch the queue, and counted in `n_watching` already:
        // the next look is `look_again` away.
        let mut recruited = false;
        loop {
            if !recruited {
                if let Some(job) = self.queue.try_pop() {
                    self.n_taken.fetch_add(1, Ordering::SeqCst);
                    return Some(job);
                }
            }
            let mut guard = self.parked.lock();
            self.n_parked.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let closed = self.closed.load(Ordering::SeqCst);
            if closed || (!recruited && !self.queue.is_empty()) {
                self.n_parked.fetch_sub(1, Ordering::SeqCst);
                if recruited {
                    self.n_watching.fetch_sub(1, Ordering::SeqCst);
                    recruited = false;
                }
                drop(guard);
                if closed && self.queue.is_empty() {
                    return None;
                }
                continue;
            }
            // Whoever wakes this worker takes it off `n_parked`; a worker
            // whose wait timed out was woken by nobody and does it itself.
            if recruited || self.n_busy.load(Ordering::SeqCst) > 0 {
                if !recruited {
                    self.n_watching.fetch_add(1, Ordering::SeqCst);
                }
                recruited = false;
                let queued_before = self.queue.len();
                let taken_before = self.n_taken.load(Ordering::SeqCst);
                let timed_out = self.watch.wait_for(&mut guard, self.look_again).timed_out();
                self.n_watching.fetch_sub(1, Ordering::SeqCst);
                if timed_out {
                    self.n_parked.fetch_sub(1, Ordering::SeqCst);
                    if !self.queue.is_empty() {
                        self.n_looks.fetch_add(1, Ordering::Relaxed);
                    }
                    self.wake_for_stuck_jobs(queued_before, taken_before);
                }
            } else {
                self.wake.wait(&mut guard);
                if self.recruits.load(Ordering::SeqCst) > 0 {
                    self.recruits.fetch_sub(1, Ordering::SeqCst);
                    recruited = true;
                }
            }
        }
    }

    /// Runs `f` counted as busy.
    fn busy<T>(&self, f: impl FnOnce() -> T) -> T {
        /// Counts the worker out again, even if the job panics.
        struct Busy<'a>(&'a AtomicUsize);
        impl Drop for Busy<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.n_busy.fetch_add(1, Ordering::SeqCst);
        let _busy = Busy(&self.n_busy);
        f()
    }

    /// No more jobs come: the workers run what is queued, then end.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _guard = self.parked.lock();
        let woken = self.wake.notify_all() + self.watch.notify_all();
        self.n_parked.fetch_sub(woken, Ordering::SeqCst);
    }
}

/// How often a producer blocked on a full queue looks whether the pool has
/// been closed.
const CLOSED_LOOK: Duration = Duration::from_millis(10);

/// Counts a worker out when it ends, however it ends. The last one drops
/// what is still queued: a job pushed as the last worker made its final
/// look at the queue, which the pusher saw as taken care of.
struct WorkerEnded<'a, J: Job>(&'a Pool<J>);

impl<J: Job> Drop for WorkerEnded<'_, J> {
    fn drop(&mut self) {
        let pool = self.0;
        // Pairs with `push`, which queues before it reads `n_alive`: either
        // it sees this worker gone, or this worker sees its job.
        if pool.n_alive.fetch_sub(1, Ordering::SeqCst) == 1 {
            pool.discard_queued();
        }
    }
}

/// How often a producer waiting for room in its quota is told it still
/// waits: the reader of a connection then shows the peer it is alive,
/// though it reads nothing.
pub(crate) const STALLED_EVERY: Duration = Duration::from_millis(100);

/// What one producer may have queued and not yet started: `max_jobs` jobs
/// and `max_bytes` bytes (one job is always let in, however large).
pub(crate) struct Quota {
    jobs: AtomicUsize,
    bytes: AtomicUsize,
    max_jobs: usize,
    max_bytes: usize,
    /// The producer waits on `room`.
    waiting: AtomicBool,
    closed: AtomicBool,
    lock: Mutex<()>,
    room: Condvar,
}

impl Quota {
    pub(crate) fn new(max_jobs: usize, max_bytes: usize) -> Quota {
        Quota {
            jobs: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_jobs: max_jobs.max(1),
            max_bytes,
            waiting: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            lock: Mutex::new(()),
            room: Condvar::new(),
        }
    }

    fn full(&self, size: usize) -> bool {
        let jobs = self.jobs.load(Ordering::SeqCst);
        jobs > 0
            && (jobs >= self.max_jobs || self.bytes.load(Ordering::SeqCst) + size > self.max_bytes)
    }

    /// Counts a job of `size` bytes in, first waiting for room if the quota
    /// is full; `wake` is called before waiting, so that workers drain what
    /// is queued, and `stalled` every [`STALLED_EVERY`] while it waits, with
    /// no lock held. Returns at once once the quota is closed.
    pub(crate) fn acquire(&self, size: usize, wake: impl Fn(), stalled: impl Fn()) {
        if self.full(size) {
            wake();
            let mut guard = self.lock.lock();
            self.waiting.store(true, Ordering::SeqCst);
            while self.full(size) && !self.closed.load(Ordering::SeqCst) {
                if self.room.wait_for(&mut guard, STALLED_EVERY).timed_out() {
                    MutexGuard::unlocked(&mut guard, &stalled);
                }
            }
            self.waiting.store(false, Ordering::SeqCst);
        }
        self.jobs.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(size, Ordering::SeqCst);
    }

    /// Counts a job of `size` bytes out, when a worker takes it.
    pub(crate) fn release(&self, size: usize) {
        self.jobs.fetch_sub(1, Ordering::SeqCst);
        self.bytes.fetch_sub(size, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            let _guard = self.lock.lock();
            self.room.notify_one();
        }
    }

    /// Jobs counted in and not yet out.
    pub(crate) fn queued(&self) -> usize {
        self.jobs.load(Ordering::SeqCst)
    }

    /// Lets a waiting producer go, and every later one through.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _guard = self.lock.lock();
        self.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    use crossbeam_channel::RecvTimeoutError;

    /// A job that reports its id when done, after waiting for `gate` if it
    /// has one, counting itself out of `quota` first, as a connection's job
    /// does; and when it starts, if it has `started`.
    struct TestJob {
        id: u64,
        size: usize,
        quota: Option<Arc<Quota>>,
        started: Option<Sender<u64>>,
        done: Sender<u64>,
        gate: Option<Receiver<()>>,
    }

    impl Job for TestJob {
        fn run(self) {
            if let Some(quota) = &self.quota {
                quota.release(self.size);
            }
            if let Some(started) = &self.started {
                let _ = started.send(self.id);
            }
            if let Some(gate) = &self.gate {
                let _ = gate.recv_timeout(Duration::from_secs(30));
            }
            let _ = self.done.send(self.id);
        }

        fn lane(&self) -> usize {
            (self.id / 100) as usize
        }
    }

    fn job(id: u64, done: &Sender<u64>) -> TestJob {
        TestJob {
            id,
            size: 0,
            quota: None,
            started: None,
            done: done.clone(),
            gate: None,
        }
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            // A short sleep, not a spin: a spinning test takes a core from
            // the threads it waits for, and from the other tests.
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// A pool of two workers, one held in a job (id 0) that blocks until
    /// `release` is dropped, and a quick job (id 1) already run by the
    /// other, which the pool had to wake for it.
    struct OneHeld {
        threads: Arc<ThreadSet>,
        pool: Arc<Pool<TestJob>>,
        done_tx: Sender<u64>,
        done_rx: Receiver<u64>,
        release: Sender<()>,
    }

    fn one_of_two_held() -> OneHeld {
        let threads = Arc::new(ThreadSet::default());
        let pool = Pool::start("t", 2, 16, Order::Fifo, &threads).unwrap();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (release, gate) = crossbeam_channel::bounded::<()>(0);
        wait_until("both workers to park", || {
            pool.n_parked.load(Ordering::SeqCst) == 2
        });
        pool.push(TestJob {
            gate: Some(gate),
            ..job(0, &done_tx)
        });
        pool.wake();
        wait_until("the long job to start", || {
            pool.n_busy.load(Ordering::SeqCst) == 1
        });
        // The second worker must wake for this one.
        pool.push(job(1, &done_tx));
        pool.wake();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok(1));
        OneHeld {
            threads,
            pool,
            done_tx,
            done_rx,
            release,
        }
    }

    #[test]
    fn a_new_job_is_not_stuck_behind_a_long_one() {
        let OneHeld {
            threads,
            pool,
            done_rx,
            release,
            ..
        } = one_of_two_held();
        drop(release);
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok(0));
        pool.close();
        assert!(threads.wait_until(Some(Instant::now() + Duration::from_secs(30))));
        assert!(threads.join_ended().is_none());
    }

    #[test]
    fn queued_jobs_are_not_stranded_behind_jobs_that_block() {
        let threads = Arc::new(ThreadSet::default());
        let pool = Pool::start("t", 3, 16, Order::Fifo, &threads).unwrap();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (release, gate) = crossbeam_channel::bounded::<()>(0);
        wait_until("the workers to park", || {
            pool.n_parked.load(Ordering::SeqCst) == 3
        });
        for id in 0..3 {
            pool.push(TestJob {
                gate: Some(gate.clone()),
                ..job(id, &done_tx)
            });
        }
        // One wake-up from the producer, for a batch that needs one worker
        // by count; each job then blocks, and every one must still start.
        pool.wake();
        wait_until("all three jobs to start", || {
            pool.n_busy.load(Ordering::SeqCst) == 3
        });
        drop(release);
        let mut done: Vec<u64> = (0..3)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(30)).unwrap())
            .collect();
        done.sort();
        assert_eq!(done, [0, 1, 2]);
        pool.close();
        assert!(threads.wait_until(Some(Instant::now() + Duration::from_secs(30))));
    }

    /// Eight workers that look at the queue every 10 ms, and jobs that
    /// report their start and then block until `release` is dropped.
    struct Blocking {
        threads: Arc<ThreadSet>,
        pool: Arc<Pool<TestJob>>,
        started_tx: Sender<u64>,
        started_rx: Receiver<u64>,
        done_tx: Sender<u64>,
        done_rx: Receiver<u64>,
        release: Sender<()>,
        gate: Receiver<()>,
    }

    impl Blocking {
        fn start() -> Blocking {
            let threads = Arc::new(ThreadSet::default());
            let pool = Pool::start_looking_every(
                "t",
                8,
                16,
                Order::Fifo,
                &threads,
                Duration::from_millis(10),
            )
            .unwrap();
            let (started_tx, started_rx) = crossbeam_channel::unbounded();
            let (done_tx, done_rx) = crossbeam_channel::unbounded();
            let (release, gate) = crossbeam_channel::bounded::<()>(0);
            wait_until("every worker to park", || {
                pool.n_parked.load(Ordering::SeqCst) == 8
            });
            Blocking {
                threads,
                pool,
                started_tx,
                started_rx,
                done_tx,
                done_rx,
                release,
                gate,
            }
        }

        /// A job that reports its start, then blocks.
        fn job(&self, id: u64) -> TestJob {
            TestJob {
                started: Some(self.started_tx.clone()),
                gate: Some(self.gate.clone()),
                ..job(id, &self.done_tx)
            }
        }

        /// Lets the `n` jobs go, sees each end, and closes the pool.
        fn finish(self, n: usize) {
            drop(self.release);
            for _ in 0..n {
                assert!(self.done_rx.recv_timeout(Duration::from_secs(10)).is_ok());
            }
            close_and_check_ended(&self.pool, &self.threads, "after the blocking jobs");
        }
    }

    #[test]
    fn jobs_queued_behind_blocking_ones_all_start_after_one_look() {
        // Seven jobs that block, queued in one burst with one wake-up, and
        // eight workers. The worker that takes job 0 recruits a watcher,
        // whose first look finds the six others held up: they must all
        // start then, not one look after another.
        let b = Blocking::start();
        for id in 0..7 {
            b.pool.push(b.job(id));
        }
        b.pool.wake();
        for n_started in 0..7 {
            b.started_rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("{n_started} of 7 jobs started"));
        }
        // Once they have, no job is left for a look to find.
        assert_eq!(
            b.pool.n_looks.load(Ordering::SeqCst),
            1,
            "looks that found jobs, before the seven had started"
        );
        b.finish(7);
    }

    #[test]
    fn jobs_queued_while_a_watcher_is_partway_through_its_look_start_after_two_looks() {
        // Job 0 blocks, and a quick job leaves one worker watching the
        // queue while the other six sleep. A burst of six jobs that block
        // then comes partway through a look: what the watcher finds at its
        // end may be new, so it takes one job and recruits the next
        // watcher, whose look, a whole one, shows the rest held up.
        let b = Blocking::start();
        b.pool.push(b.job(0));
        b.pool.wake();
        assert_eq!(b.started_rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        b.pool.push(job(100, &b.done_tx));
        b.pool.wake();
        assert_eq!(b.done_rx.recv_timeout(Duration::from_secs(10)), Ok(100));
        wait_until("one worker to watch, the others to sleep", || {
            counters(&b.pool) == [7, 1, 0, 1]
        });
        let n_looks = b.pool.n_looks.load(Ordering::SeqCst);
        for id in 1..7 {
            b.pool.push(b.job(id));
        }
        b.pool.wake();
        for n_started in 0..6 {
            b.started_rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("{n_started} of 6 jobs started"));
        }
        // The watcher's look and the recruit's. (A chain of recruits that
        // each take one job would need five.) Once the six have started, no
        // job is left for a look to find.
        let n_looks = b.pool.n_looks.load(Ordering::SeqCst) - n_looks;
        assert!(
            n_looks <= 2,
            "{n_looks} looks that found jobs, before the six had started"
        );
        b.finish(7);
    }

    #[test]
    fn each_burst_of_quick_jobs_wakes_one_worker() {
        // The watchers look so seldom here that none gives up watching
        // during the test: what is counted is the wake-ups the bursts cost.
        let threads = Arc::new(ThreadSet::default());
        let pool =
            Pool::start_looking_every("t", 4, 64, Order::Fifo, &threads, Duration::from_secs(60))
                .unwrap();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        const BURSTS: usize = 100;
        const JOBS: u64 = 16;
        for burst in 0..BURSTS {
            wait_until("every worker to park", || {
                pool.n_parked.load(Ordering::SeqCst) == 4
            });
            for id in 0..JOBS {
                pool.push(job(id, &done_tx));
            }
            // One wake-up from the producer for the burst, as a receive
            // thread gives before it reads again.
            pool.wake();
            for _ in 0..JOBS {
                done_rx
                    .recv_timeout(Duration::from_secs(30))
                    .unwrap_or_else(|_| panic!("burst {burst}: a job did not run"));
            }
        }
        // One worker per burst, and at most one more, the first time, to
        // watch the queue while jobs run. A taker that woke another to take
        // jobs at once would wake about two per burst.
        let woken = pool.n_woken.load(Ordering::SeqCst);
        assert!(
            woken <= BURSTS + 1,
            "{woken} wake-ups for {BURSTS} bursts of {JOBS} quick jobs"
        );
        assert!(woken >= BURSTS, "{woken} wake-ups for {BURSTS} bursts");
        pool.close();
        assert!(threads.wait_until(Some(Instant::now() + Duration::from_secs(30))));
        assert!(threads.join_ended().is_none());
    }

    /// A job that holds a reference, as a connection's job holds its
    /// connection.
    struct Holding(
        // Held only to be dropped with the job.
        #[allow(dead_code)] Arc<()>,
    );

    impl Job for Holding {
        fn run(self) {}

        fn lane(&self) -> usize {
            0
        }
    }

    #[test]
    fn a_job_queued_after_the_last_worker_ended_is_dropped_not_kept() {
        for order in [Order::Fifo, Order::Fair] {
            let threads = Arc::new(ThreadSet::default());
            let pool = Pool::start("t", 2, 16, order, &threads).unwrap();
            pool.close();
            assert!(threads.wait_until(Some(Instant::now() + Duration::from_secs(30))));
            assert_eq!(pool.n_alive.load(Ordering::SeqCst), 0);
            let held = Arc::new(());
            pool.push(Holding(Arc::clone(&held)));
            assert_eq!(
                Arc::strong_count(&held),
                1,
                "{order:?}: the job is still queued, with nobody to run it"
            );
            assert!(pool.queue.is_empty());
        }
    }

    #[test]
    fn a_job_that_panics_counts_its_worker_out_of_the_busy() {
        struct Panics;
        impl Job for Panics {
            fn run(self) {
                panic!("a job that panics, on purpose");
            }
            fn lane(&self) -> usize {
                0
            }
        }
        let threads = Arc::new(ThreadSet::default());
        let pool = Pool::start("t", 1, 16, Order::Fifo, &threads).unwrap();
        pool.push(Panics);
        pool.wake();
        // The one worker dies with the panic; the pool's counts must not
        // say it is still in a job.
        wait_until("the worker to end", || {
            pool.n_alive.load(Ordering::SeqCst) == 0
        });
        assert_eq!(pool.n_busy.load(Ordering::SeqCst), 0);
        pool.close();
        assert!(threads.wait_until(Some(Instant::now() + Duration::from_secs(30))));
    }

    #[test]
    fn a_worker_parked_while_a_job_runs_takes_a_job_queued_with_no_wake() {
        // The worker that ran the quick job parks while the first job runs:
        // it watches the queue.
        let OneHeld {
            threads,
            pool,
            done_tx,
            done_rx,
            release,
        } = one_of_two_held();
        wait_until("the free worker to watch the queue", || {
            pool.n_watching.load(Ordering::SeqCst) == 1
        });
        // Queued with no wake-up at all, as when a producer's wake-up
        // raced a worker: the watching worker finds it.
        pool.push(job(2, &done_tx));
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok(2));
        drop(release);
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok(0));
        pool.close();
        assert!(threads.wait_until(Some(Instant::now() + Duration::from_secs(30))));
        assert!(threads.join_ended().is_none());
        assert_eq!(pool.n_parked.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_quota_bounds_what_its_producer_has_queued_and_the_producer_waits_for_room() {
        let threads = Arc::new(ThreadSet::default());
        let pool = Pool::start("t", 1, 100, Order::Fifo, &threads).unwrap();
        let quota = Arc::new(Quota::new(100, 1000));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (release, gate) = crossbeam_channel::bounded::<()>(0);
        let sized = |id, size, gate| TestJob {
            size,
            quota: Some(Arc::clone(&quota)),
            gate,
            ..job(id, &done_tx)
        };
        // The worker is held inside job 0, which has left the quota.
        quota.acquire(10, || pool.wake(), || {});
        pool.push(sized(0, 10, Some(gate)));
        pool.wake();
        wait_until("job 0 to start", || pool.n_busy.load(Ordering::SeqCst) == 1);
        // One job is always let in, however large.
        quota.acquire(5000, || pool.wake(), || {});
        pool.push(sized(1, 5000, None));
        std::thread::scope(|s| {
            // As a receive thread does, the producer wakes the workers for
            // what it has queued.
            let producer = s.spawn(|| {
                for id in [2, 3] {
                    quota.acquire(600, || pool.wake(), || {});
                    pool.push(sized(id, 600, None));
                    pool.wake();
                }
            });
            wait_until("the producer to wait", || {
                quota.waiting.load(Ordering::SeqCst)
            });
            assert_eq!(quota.queued(), 1, "only job 1 is queued while over budget");
            drop(release);
            let mut got = Vec::new();
            while got.len() < 4 {
                match done_rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(id) => got.push(id),
                    Err(RecvTimeoutError::Timeout) => panic!("jobs stalled: {got:?}"),
                    Err(RecvTimeoutError::Disconnected) => unreachable!(),
                }
                assert!(quota.bytes.load(Ordering::SeqCst) <= 5000);
            }
            producer.join().unwrap();
            assert_eq!(got, [0, 1, 2, 3]);
        });
        pool.close();
        assert!(threads.wait_until(Some(Instant::now() + Duration::from_secs(30))));
    }

    #[test]
    fn closing_a_quota_lets_its_waiting_producer_go() {
        let quota = Quota::new(1, 1 << 20);
        quota.acquire(1, || {}, || {});
        std::thread::scope(|s| {
            let producer = s.spawn(|| quota.acquire(1, || {}, || {}));
            wait_until("the producer to wait", || {
                quota.waiting.load(Ordering::SeqCst)
            });
            quota.close();
            producer.join().unwrap();
        });
    }

    #[test]
    fn a_fair_pool_takes_the_lanes_in_turn() {
        let pool = Pool::new(1, 16, Order::Fair, LOOK_AGAIN);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        // Lane 0 queues ten jobs, then lanes 1 and 2 one each.
        for id in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100, 200] {
            pool.push(job(id, &done_tx));
        }
        assert_eq!(pool.queue.len(), 12);
        while let Some(job) = pool.queue.try_pop() {
            job.run();
        }
        let order: Vec<u64> = done_rx.try_iter().collect();
        assert_eq!(order, [0, 100, 200, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert!(pool.queue.is_empty());
        let Queue::Fair { lanes, .. } = &pool.queue else {
            unreachable!()
        };
        assert!(lanes.lock().jobs.is_empty(), "no lane is kept once empty");
    }

    #[test]
    fn close_lets_workers_finish_what_is_queued_then_end() {
        let threads = Arc::new(ThreadSet::default());
        let pool = Arc::new(Pool::new(1, 16, Order::Fifo, LOOK_AGAIN));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        for id in 0..5 {
            pool.push(job(id, &done_tx));
        }
        pool.close();
        let worker = Arc::clone(&pool);
        threads
            .spawn("t:handler0".into(), move || {
                while let Some(job) = worker.pop() {
                    job.run();
                }
            })
            .unwrap();
        assert!(threads.wait_until(Some(Instant::now() + Duration::from_secs(30))));
        assert_eq!(done_rx.try_iter().collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    }

    /// The counters that come back to rest: parked, watching, recruits,
    /// busy.
    fn counters<J: Job>(pool: &Pool<J>) -> [usize; 4] {
        [
            pool.n_parked.load(Ordering::SeqCst),
            pool.n_watching.load(Ordering::SeqCst),
            pool.recruits.load(Ordering::SeqCst),
            pool.n_busy.load(Ordering::SeqCst),
        ]
    }

    /// Closes `pool`, then checks that every worker ends and that its
    /// counters are back at zero.
    fn close_and_check_ended<J: Job>(pool: &Pool<J>, threads: &ThreadSet, what: &str) {
        pool.close();
        assert!(
            threads.wait_until(Some(Instant::now() + Duration::from_secs(10))),
            "{what}: workers still running 10 s after close; parked, watching, recruits, busy: {:?}",
            counters(pool)
        );
        assert!(threads.join_ended().is_none(), "{what}: a worker panicked");
        assert_eq!(
            counters(pool),
            [0; 4],
            "{what}: parked, watching, recruits, busy once every worker ended"
        );
    }

    #[test]
    fn close_wakes_a_recruit_that_watches_and_the_queue_drains() {
        // The recruit would look at the queue only in a minute: the close
        // must wake it, and it must run what is queued before it ends.
        let threads = Arc::new(ThreadSet::default());
        let pool =
            Pool::start_looking_every("t", 2, 16, Order::Fifo, &threads, Duration::from_secs(60))
                .unwrap();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (release, gate) = crossbeam_channel::bounded::<()>(0);
        wait_until("both workers to park", || {
            pool.n_parked.load(Ordering::SeqCst) == 2
        });
        pool.push(TestJob {
            gate: Some(gate),
            ..job(0, &done_tx)
        });
        pool.push(job(1, &done_tx));
        // One worker by count: it takes job 0 and, with job 1 queued,
        // recruits the other to watch.
        pool.wake();
        wait_until("the recruit to watch, with job 1 queued", || {
            counters(&pool) == [1, 1, 0, 1]
        });
        assert_eq!(pool.queue.len(), 1);
        pool.close();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)), Ok(1));
        drop(release);
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        close_and_check_ended(&pool, &threads, "after close");
    }

    #[test]
    fn close_right_after_a_burst_runs_every_job_and_ends_every_worker() {
        // The close races the wake-ups and the recruits of the burst.
        for round in 0..200 {
            let threads = Arc::new(ThreadSet::default());
            let pool = Pool::start_looking_every(
                "t",
                4,
                64,
                [Order::Fifo, Order::Fair][round % 2],
                &threads,
                Duration::from_millis(1),
            )
            .unwrap();
            let (done_tx, done_rx) = crossbeam_channel::unbounded();
            if round % 4 < 2 {
                wait_until("every worker to park", || {
                    pool.n_parked.load(Ordering::SeqCst) == 4
                });
            }
            for id in 0..20 {
                pool.push(job(id, &done_tx));
            }
            pool.wake();
            pool.close();
            let mut done: Vec<u64> = (0..20)
                .map(|_| {
                    done_rx
                        .recv_timeout(Duration::from_secs(10))
                        .unwrap_or_else(|_| panic!("round {round}: a queued job did not run"))
                })
                .collect();
            done.sort();
            assert_eq!(done, (0..20).collect::<Vec<_>>());
            close_and_check_ended(&pool, &threads, &format!("round {round}"));
        }
    }

    /// A small seeded generator (xorshift64*), for the randomized test,
    /// which reports its seeds.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed | 1)
        }

        /// A number below `n`.
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }

        /// True `percent` times in a hundred.
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// Sets its flag when dropped, on a panic too.
    struct SetOnDrop<'a>(&'a AtomicBool);

    impl Drop for SetOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// One randomized round against a new pool: producers push bursts of
    /// quick jobs and of jobs that block until the round releases them
    /// (fewer than there are workers), some bursts followed by a wake-up
    /// and each producer's last one always; the pool is closed at once, or
    /// once it is at rest. Checks that every job starts though no wake-up
    /// comes after the last, that every job runs once, that the counters
    /// never exceed the number of workers (an underflow shows as a huge
    /// number), that they come back to rest while the pool is idle, and
    /// to zero once it is closed.
    fn attack_round(seed: u64, order: Order) {
        let what = format!(
            "{order:?} round of seed {seed} (rerun it alone with PACKETSTREAM_POOL_SEED={seed})"
        );
        let patience = Duration::from_secs(10);
        let mut rng = Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let n_workers = 1 + rng.below(5) as usize;
        let capacity = [2, 8, 256][rng.below(3) as usize];
        let look_again = Duration::from_micros(500 + rng.below(2500));
        let n_producers = 1 + rng.below(3);
        // Each producer's bursts: the jobs, each with whether it blocks,
        // and whether a wake-up follows.
        let mut n_blocking = 0;
        let mut plans = Vec::new();
        for lane in 0..n_producers {
            let n_bursts = 1 + rng.below(4);
            let mut bursts = Vec::new();
            for burst_idx in 0..n_bursts {
                let n_jobs = 1 + rng.below(16);
                let jobs: Vec<(u64, bool)> = (0..n_jobs)
                    .map(|_| {
                        let blocks = n_blocking + 1 < n_workers && rng.chance(8);
                        n_blocking += usize::from(blocks);
                        (0, blocks)
                    })
                    .collect();
                bursts.push((jobs, burst_idx + 1 == n_bursts || rng.chance(70)));
            }
            // Ids of the lane's jobs: `lane * 100 + n`, as `TestJob::lane`
            // reads them.
            let mut next_id = lane * 100;
            for (jobs, _) in &mut bursts {
                for (id, _) in jobs.iter_mut() {
                    *id = next_id;
                    next_id += 1;
                }
            }
            plans.push(bursts);
        }
        let mut expected: Vec<u64> = plans
            .iter()
            .flatten()
            .flat_map(|(jobs, _)| jobs.iter().map(|&(id, _)| id))
            .collect();
        expected.sort();
        let n_jobs = expected.len();

        let threads = Arc::new(ThreadSet::default());
        let pool = Pool::start_looking_every("t", n_workers, capacity, order, &threads, look_again)
            .unwrap();
        let (started_tx, started_rx) = crossbeam_channel::unbounded();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (release, gate) = crossbeam_channel::bounded::<()>(0);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_monitor = SetOnDrop(&stop);
        let monitor = {
            let (pool, stop) = (Arc::clone(&pool), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let seen = counters(&pool);
                    if seen.iter().any(|&n| n > pool.n_workers) {
                        return Some(seen);
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                None
            })
        };
        let (finished_tx, finished_rx) = crossbeam_channel::unbounded();
        let producers: Vec<_> = plans
            .into_iter()
            .enumerate()
            .map(|(idx, bursts)| {
                let mut rng = Rng::new(seed ^ (idx as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let pool = Arc::clone(&pool);
                let (started, done) = (started_tx.clone(), done_tx.clone());
                let (gate, finished) = (gate.clone(), finished_tx.clone());
                std::thread::spawn(move || {
                    for (jobs, wake) in bursts {
                        for (id, blocks) in jobs {
                            pool.push(TestJob {
                                started: Some(started.clone()),
                                gate: blocks.then(|| gate.clone()),
                                ..job(id, &done)
                            });
                        }
                        if wake {
                            pool.wake();
                        }
                        match rng.below(4) {
                            0 => std::thread::yield_now(),
                            1 => std::thread::sleep(look_again * rng.below(3) as u32),
                            _ => {}
                        }
                    }
                    let _ = finished.send(());
                })
            })
            .collect();
        drop(gate);
        for _ in 0..n_producers {
            // A producer can block only in a push to a full queue, which
            // the one worker not held by a blocking job drains.
            finished_rx.recv_timeout(patience).unwrap_or_else(|_| {
                panic!(
                    "{what}: a producer stuck in a push; parked, watching, recruits, busy: {:?}",
                    counters(&pool)
                )
            });
        }
        for producer in producers {
            producer.join().unwrap();
        }
        let close_early = rng.chance(30);
        if close_early {
            pool.close();
            if rng.chance(50) {
                pool.wake();
            }
        }
        // Every job starts, the blocking ones still blocking: one worker
        // at least is never held.
        let mut started: Vec<u64> = (0..n_jobs)
            .map(|n_started| {
                started_rx.recv_timeout(patience).unwrap_or_else(|_| {
                    panic!(
                        "{what}: a job stranded with {n_started} of {n_jobs} started, \
                         {n_blocking} blocking, {n_workers} workers; \
                         parked, watching, recruits, busy: {:?}",
                        counters(&pool)
                    )
                })
            })
            .collect();
        drop(release);
        for n_done in 0..n_jobs {
            done_rx
                .recv_timeout(patience)
                .unwrap_or_else(|_| panic!("{what}: {n_done} of {n_jobs} jobs done once released"));
        }
        if !close_early {
            let deadline = Instant::now() + patience;
            while counters(&pool) != [n_workers, 0, 0, 0] {
                assert!(
                    Instant::now() < deadline,
                    "{what}: idle, yet parked, watching, recruits, busy: {:?}",
                    counters(&pool)
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        drop(stop_monitor);
        let seen = monitor.join().unwrap();
        assert!(
            seen.is_none(),
            "{what}: parked, watching, recruits, busy {seen:?} with {n_workers} workers"
        );
        close_and_check_ended(&pool, &threads, &what);
        started.sort();
        assert_eq!(started, expected, "{what}: each job starts once");
    }

    /// Runs randomized rounds for about `budget` (a minute with
    /// `PACKETSTREAM_LONG=1`), or the one round of the seed in
    /// `PACKETSTREAM_POOL_SEED`.
    fn attack(order: Order, budget: Duration) {
        if let Ok(seed) = std::env::var("PACKETSTREAM_POOL_SEED") {
            let seed = seed.parse().expect("PACKETSTREAM_POOL_SEED is a number");
            return attack_round(seed, order);
        }
        let budget = match std::env::var_os("PACKETSTREAM_LONG") {
            Some(long) if long != "0" => Duration::from_secs(60),
            _ => budget,
        };
        let begun = Instant::now();
        let mut n_rounds = 0;
        while n_rounds < 20 || begun.elapsed() < budget {
            attack_round(n_rounds, order);
            n_rounds += 1;
        }
    }

    #[test]
    fn a_fifo_pool_under_random_bursts_blocking_jobs_and_closes() {
        attack(Order::Fifo, Duration::from_millis(1500));
    }

    #[test]
    fn a_fair_pool_under_random_bursts_blocking_jobs_and_closes() {
        attack(Order::Fair, Duration::from_millis(1500));
    }
}
