//! The handler pool: a bounded queue of jobs, the worker threads that run
//! them, and the policy for waking workers.
//!
//! The pool knows nothing of connections: a job is anything that implements
//! [`Job`]. A connection's job is one request from its peer, carrying the
//! connection's shared state with it.
//!
//! A bounded crossbeam channel holds the jobs, so the thread that queues them
//! (a receive thread) blocks when the workers fall behind, which slows the
//! peer down. Idle workers park on a condvar instead of spinning, and the
//! queuing thread wakes one only when the jobs queued plus the workers busy in
//! a job outnumber the workers awake: a burst of quick jobs is served by the
//! workers already awake, and a job never waits behind a long-running one
//! while a worker sleeps.

use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::sync::ThreadSet;

/// Work for the pool.
pub(crate) trait Job: Send + 'static {
    /// The bytes this job holds, counted against the pool's byte budget.
    fn size(&self) -> usize;

    /// Does the work, on a worker thread.
    fn run(self);
}

/// Queued jobs one awake worker is expected to get through before another is
/// woken to help.
const JOBS_PER_WORKER: usize = 16;

/// The queue and its workers. See the module doc.
pub(crate) struct Pool<J> {
    tx: Sender<J>,
    rx: Receiver<J>,
    n_workers: usize,
    /// Workers parked on `wake`; changed only under `parked`'s lock.
    n_parked: AtomicUsize,
    /// Workers inside a job.
    n_busy: AtomicUsize,
    /// Bytes of the queued jobs, and their budget.
    n_bytes: AtomicUsize,
    max_bytes: usize,
    /// A pusher waits on `room` for the bytes to drop.
    pusher_waiting: AtomicBool,
    room: Condvar,
    closed: AtomicBool,
    parked: Mutex<()>,
    wake: Condvar,
}

impl<J: Job> Pool<J> {
    /// Starts `n_workers` workers, named `"{name}:handler{idx}"`, in
    /// `threads`. At most `capacity` jobs, and `max_bytes` of them (one job
    /// is always let in, however large), wait for a worker.
    pub(crate) fn start(
        name: &str,
        n_workers: usize,
        capacity: usize,
        max_bytes: usize,
        threads: &Arc<ThreadSet>,
    ) -> io::Result<Arc<Pool<J>>> {
        let pool: Arc<Pool<J>> = Arc::new(Pool::new(capacity, max_bytes, n_workers));
        for idx in 0..n_workers {
            let worker = Arc::clone(&pool);
            let spawned = threads.spawn(format!("{name}:handler{idx}"), move || {
                while let Some(job) = worker.pop() {
                    worker.busy(|| job.run());
                }
            });
            if let Err(e) = spawned {
                pool.close();
                return Err(e);
            }
        }
        Ok(pool)
    }

    fn new(capacity: usize, max_bytes: usize, n_workers: usize) -> Pool<J> {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        Pool {
            tx,
            rx,
            n_workers,
            n_parked: AtomicUsize::new(0),
            n_busy: AtomicUsize::new(0),
            n_bytes: AtomicUsize::new(0),
            max_bytes,
            pusher_waiting: AtomicBool::new(false),
            room: Condvar::new(),
            closed: AtomicBool::new(false),
            parked: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Queues a job without waking a worker: the caller calls
    /// [`wake`](Pool::wake) once it has queued a batch, so a batch costs a few
    /// wake-ups, not one each. If the queue is full, by count or by bytes,
    /// wakes workers, then blocks until there is room.
    pub(crate) fn push(&self, job: J) {
        let size = job.size();
        if self.n_bytes.load(Ordering::SeqCst) + size > self.max_bytes && !self.rx.is_empty() {
            self.wake();
            let mut guard = self.parked.lock();
            self.pusher_waiting.store(true, Ordering::SeqCst);
            while self.n_bytes.load(Ordering::SeqCst) + size > self.max_bytes
                && !self.rx.is_empty()
                && !self.closed.load(Ordering::SeqCst)
            {
                self.room.wait(&mut guard);
            }
            self.pusher_waiting.store(false, Ordering::SeqCst);
        }
        self.n_bytes.fetch_add(size, Ordering::SeqCst);
        if let Err(err) = self.tx.try_send(job) {
            self.wake();
            // The receiver lives in `self`, so the channel never disconnects.
            let _ = self.tx.send(err.into_inner());
        }
    }

    /// Wakes as many parked workers as the queued jobs need: one for every
    /// [`JOBS_PER_WORKER`] queued jobs, plus one for every worker busy in a
    /// job (which may be a slow one).
    pub(crate) fn wake(&self) {
        // Pairs with the fence in `pop`: either this thread sees the worker
        // parked, or the worker sees the job.
        fence(Ordering::SeqCst);
        if self.n_parked.load(Ordering::SeqCst) == 0 || self.rx.is_empty() {
            return;
        }
        let _guard = self.parked.lock();
        loop {
            let n_parked = self.n_parked.load(Ordering::SeqCst);
            let n_awake = self.n_workers - n_parked;
            let n_needed =
                self.n_busy.load(Ordering::SeqCst) + self.rx.len().div_ceil(JOBS_PER_WORKER);
            if n_parked == 0 || n_needed <= n_awake {
                return;
            }
            // The woken worker counts as awake from now on.
            self.n_parked.fetch_sub(1, Ordering::SeqCst);
            self.wake.notify_one();
        }
    }

    /// The next job; `None` once the pool is closed and its queue empty.
    fn pop(&self) -> Option<J> {
        loop {
            if let Ok(job) = self.rx.try_recv() {
                self.n_bytes.fetch_sub(job.size(), Ordering::SeqCst);
                if self.pusher_waiting.load(Ordering::SeqCst) {
                    let _guard = self.parked.lock();
                    self.room.notify_one();
                }
                return Some(job);
            }
            let mut guard = self.parked.lock();
            self.n_parked.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !self.rx.is_empty() || self.closed.load(Ordering::SeqCst) {
                self.n_parked.fetch_sub(1, Ordering::SeqCst);
                drop(guard);
                if self.closed.load(Ordering::SeqCst) && self.rx.is_empty() {
                    return None;
                }
                continue;
            }
            // Whoever wakes this worker has already taken it off `n_parked`.
            self.wake.wait(&mut guard);
        }
    }

    /// True if no job waits for a worker.
    pub(crate) fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Runs `f` counted as busy.
    fn busy<T>(&self, f: impl FnOnce() -> T) -> T {
        self.n_busy.fetch_add(1, Ordering::SeqCst);
        let res = f();
        self.n_busy.fetch_sub(1, Ordering::SeqCst);
        res
    }

    /// No more jobs come: the workers run what is queued, then end.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _guard = self.parked.lock();
        self.n_parked.store(0, Ordering::SeqCst);
        self.wake.notify_all();
        self.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    use crossbeam_channel::RecvTimeoutError;

    /// A job that reports its id when done, after waiting for `gate` if it
    /// has one.
    struct TestJob {
        id: u64,
        size: usize,
        done: Sender<u64>,
        gate: Option<Receiver<()>>,
    }

    impl Job for TestJob {
        fn size(&self) -> usize {
            self.size
        }

        fn run(self) {
            if let Some(gate) = &self.gate {
                let _ = gate.recv_timeout(Duration::from_secs(30));
            }
            let _ = self.done.send(self.id);
        }
    }

    fn job(id: u64, size: usize, done: &Sender<u64>) -> TestJob {
        TestJob {
            id,
            size,
            done: done.clone(),
            gate: None,
        }
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_new_job_is_not_stuck_behind_a_long_one() {
        let threads = Arc::new(ThreadSet::default());
        let pool = Pool::start("t", 2, 16, 1 << 20, &threads).unwrap();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (release, gate) = crossbeam_channel::bounded::<()>(0);
        wait_until("both workers to park", || {
            pool.n_parked.load(Ordering::SeqCst) == 2
        });
        pool.push(TestJob {
            gate: Some(gate),
            ..job(0, 0, &done_tx)
        });
        pool.wake();
        wait_until("the long job to start", || {
            pool.n_busy.load(Ordering::SeqCst) == 1
        });
        // The second worker must wake for this one.
        pool.push(job(1, 0, &done_tx));
        pool.wake();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok(1));
        drop(release);
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(30)), Ok(0));
        pool.close();
        assert!(threads.wait_until(Some(Instant::now() + Duration::from_secs(30))));
        assert!(threads.join_ended().is_none());
    }

    #[test]
    fn queued_bytes_are_bounded_and_the_pusher_waits_for_room() {
        let threads = Arc::new(ThreadSet::default());
        let pool = Pool::start("t", 1, 100, 1000, &threads).unwrap();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (release, gate) = crossbeam_channel::bounded::<()>(0);
        // The worker is held inside job 0; one job is always let in,
        // however large, so job 1 queues even though it is over budget.
        pool.push(TestJob {
            gate: Some(gate),
            ..job(0, 10, &done_tx)
        });
        pool.wake();
        wait_until("job 0 to start", || pool.n_busy.load(Ordering::SeqCst) == 1);
        pool.push(job(1, 5000, &done_tx));
        std::thread::scope(|s| {
            // As a receive thread does, the pusher wakes the workers for
            // what it has queued.
            let pusher = s.spawn(|| {
                pool.push(job(2, 600, &done_tx));
                pool.wake();
                pool.push(job(3, 600, &done_tx));
                pool.wake();
            });
            wait_until("the pusher to block", || {
                pool.pusher_waiting.load(Ordering::SeqCst)
            });
            assert_eq!(pool.rx.len(), 1, "only job 1 is queued while over budget");
            drop(release);
            let mut got = Vec::new();
            while got.len() < 4 {
                match done_rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(id) => got.push(id),
                    Err(RecvTimeoutError::Timeout) => panic!("jobs stalled: {got:?}"),
                    Err(RecvTimeoutError::Disconnected) => unreachable!(),
                }
                assert!(pool.n_bytes.load(Ordering::SeqCst) <= 5000);
            }
            pusher.join().unwrap();
            assert_eq!(got, [0, 1, 2, 3]);
        });
        pool.close();
        assert!(threads.wait_until(Some(Instant::now() + Duration::from_secs(30))));
    }

    #[test]
    fn close_lets_workers_finish_what_is_queued_then_end() {
        let threads = Arc::new(ThreadSet::default());
        let pool = Pool::new(16, 1 << 20, 1);
        let pool = Arc::new(pool);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        for id in 0..5 {
            pool.push(job(id, 0, &done_tx));
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
}
