//! Load and soak: mutual floods, many threads on one connection, many
//! connections at once, flat memory over a long run, and thread counts that
//! return to their baseline.
//!
//! Bounded by default; `PACKETSTREAM_LONG=1` runs the full-size variants.
//! Tests that measure the whole process (RSS, thread count) re-run this
//! binary on just themselves, so that other tests do not disturb the figures.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{close_both, echo, isolated, long, pair_with, proc_status, report, threads, wait_for};
use packetstream::{Config, PacketConnection, PendingResponse};

/// How long a load run may take before it counts as a hang: longer than
/// `LIMIT`, for the floods of a debug build.
const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// A deterministic payload for request `idx`, from `max_len / 2` to
/// `max_len` bytes: its length and bytes depend on the index, so a reply
/// delivered to the wrong request shows.
fn payload_for(idx: u64, max_len: usize) -> Vec<u8> {
    let x = idx.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16;
    let len = max_len / 2 + (x % (max_len as u64 / 2 + 1)) as usize;
    let mut payload = vec![idx as u8; len];
    let stamp = idx.to_le_bytes();
    let n = stamp.len().min(len);
    payload[..n].copy_from_slice(&stamp[..n]);
    payload
}

/// Submits `n` echo requests, all before waiting for any, then checks every
/// reply; requests refused as busy are sent again, in rounds, until every one
/// is answered. Returns the busy refusals met.
fn pipeline(conn: &PacketConnection, n: u64, max_len: usize, deadline: Instant) -> u64 {
    let mut todo: Vec<u64> = (0..n).collect();
    let mut busy = 0;
    while !todo.is_empty() {
        let mut pending = Vec::with_capacity(todo.len());
        for &idx in &todo {
            assert!(Instant::now() < deadline, "submit stuck at request {idx}");
            let payload = payload_for(idx, max_len);
            pending.push((idx, conn.submit(1, idx, &payload).expect("submit")));
        }
        todo = pending
            .into_iter()
            .filter(|(idx, p)| !expect_echo_ref(p, *idx, max_len, deadline))
            .map(|(idx, _)| idx)
            .collect();
        busy += todo.len() as u64;
    }
    busy
}

/// Waits for a reply and checks that it echoes request `idx`; false if the
/// peer refused it as busy, so that it may be sent again.
fn expect_echo_ref(pending: &PendingResponse, idx: u64, max_len: usize, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let rsp = match pending.wait_timeout(left) {
        Ok(rsp) => rsp,
        Err(e) if e.is_busy() => return false,
        Err(e) => panic!("request {idx}: {e}"),
    };
    assert_eq!(rsp.flags, idx, "reply to the wrong request");
    assert_eq!(rsp.payload, payload_for(idx, max_len), "request {idx}");
    true
}

/// Runs `body` on scoped threads, one per connection in `conns`, and aborts
/// every connection if they have not all finished by `deadline`, so that a
/// deadlock fails the test instead of hanging it.
fn with_watchdog<F>(conns: &[&PacketConnection], deadline: Instant, body: F)
where
    F: Fn(usize, &PacketConnection) + Sync,
{
    thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter()
            .enumerate()
            .map(|(idx, conn)| {
                let body = &body;
                s.spawn(move || body(idx, conn))
            })
            .collect();
        let mut aborted = false;
        while handles.iter().any(|h| !h.is_finished()) {
            if !aborted && Instant::now() > deadline + Duration::from_secs(5) {
                for conn in conns {
                    conn.abort();
                }
                aborted = true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        for h in handles {
            if let Err(panic) = h.join() {
                for conn in conns {
                    conn.abort();
                }
                std::panic::resume_unwind(panic);
            }
        }
    });
}

/// Two connections over one socketpair, both serving echo, named `{name}a`
/// and `{name}b`.
fn echo_pair(
    name: &str,
    config: impl Fn(Config) -> Config,
) -> (PacketConnection, PacketConnection) {
    let end = |suffix| {
        config(
            Config::default()
                .name(format!("{name}{suffix}"))
                .handler(echo),
        )
    };
    pair_with(end("a"), end("b"))
}

#[test]
fn mutual_flood_of_100k_pipelined_requests_each_way_completes() {
    let n = if long() { 1_000_000 } else { 100_000 };
    let (a, b) = echo_pair("fl", |c| c);
    let deadline = Instant::now() + LOAD_LIMIT;
    with_watchdog(&[&a, &b], deadline, |_, conn| {
        pipeline(conn, n, 16, deadline);
    });
    for conn in [&a, &b] {
        let stats = conn.stats();
        // Every request answered once, after however many busy refusals.
        let busy = stats.responses_failed;
        assert_eq!((stats.requests_sent, stats.responses_ok), (n + busy, n));
        assert_eq!((stats.pending, stats.in_progress), (0, 0));
    }
    report(format!(
        "flood of {n} each way: {} and {} busy refusals",
        a.stats().busy_refusals,
        b.stats().busy_refusals
    ));
    close_both(&a, &b);
}

#[test]
fn mutual_flood_of_large_payloads_completes() {
    // Requests and replies of up to 200 KB fill both socket buffers at once.
    let n = if long() { 10_000 } else { 1_000 };
    let (a, b) = echo_pair("fL", |c| c.handler_threads(2));
    let deadline = Instant::now() + LOAD_LIMIT;
    with_watchdog(&[&a, &b], deadline, |_, conn| {
        pipeline(conn, n, 200_000, deadline);
    });
    report(format!(
        "flood of {n} large each way: {} and {} busy refusals",
        a.stats().busy_refusals,
        b.stats().busy_refusals
    ));
    close_both(&a, &b);
}

#[test]
fn mutual_flood_with_one_handler_thread_and_tiny_queues_completes() {
    let n = if long() { 200_000 } else { 20_000 };
    let (a, b) = echo_pair("f1", |c| {
        c.handler_threads(1)
            .handler_queue(1)
            .max_queued_packets(8)
            .max_queued_bytes(4096)
    });
    let deadline = Instant::now() + LOAD_LIMIT;
    with_watchdog(&[&a, &b], deadline, |_, conn| {
        pipeline(conn, n, 3000, deadline);
    });
    report(format!(
        "flood of {n} each way, 4 KiB budgets: {} and {} busy refusals",
        a.stats().busy_refusals,
        b.stats().busy_refusals
    ));
    close_both(&a, &b);
}

// ---------------------------------------------------------------------------
// Whole-process measurements, each in a copy of this binary running just
// that test.

/// How long the copy of this binary that runs one of them may take.
fn isolated_limit() -> Duration {
    if long() {
        LOAD_LIMIT * 10
    } else {
        LOAD_LIMIT * 2
    }
}

/// Waits until the process is back to `baseline` threads.
fn wait_for_threads(baseline: u64) {
    wait_for(
        &format!("the thread count to return to {baseline}"),
        LOAD_LIMIT,
        || threads() == baseline,
    );
}

#[test]
fn sixty_four_threads_share_one_connection() {
    if !isolated("sixty_four_threads_share_one_connection", isolated_limit()) {
        return;
    }
    let per_thread = 10_000;
    let baseline = threads();
    let (a, b) = echo_pair("t64", |c| c);
    let deadline = Instant::now() + LOAD_LIMIT * 2;
    let conns: Vec<&PacketConnection> = vec![&a; 64];
    with_watchdog(&conns, deadline, |thread_idx, conn| {
        // Windows of 100 pipelined requests, tagged with the thread in the
        // flags so that a crossed reply shows.
        let base = thread_idx as u64 * 1_000_000;
        for window in 0..per_thread / 100 {
            let first = base + window * 100;
            let pending: Vec<_> = (first..first + 100)
                .map(|idx| conn.submit(1, idx, &payload_for(idx, 64)).unwrap())
                .collect();
            for (p, idx) in pending.into_iter().zip(first..) {
                assert!(
                    expect_echo_ref(&p, idx, 64, deadline),
                    "request {idx} refused as busy"
                );
            }
        }
    });
    let n = 64 * per_thread;
    assert_eq!((a.stats().responses_ok, b.stats().replies_ok), (n, n));
    report(format!(
        "load: 64 threads x {per_thread} requests on one connection"
    ));
    close_both(&a, &b);
    wait_for_threads(baseline);
}

#[test]
fn two_hundred_connections_at_once_then_threads_return_to_baseline() {
    if !isolated(
        "two_hundred_connections_at_once_then_threads_return_to_baseline",
        isolated_limit(),
    ) {
        return;
    }
    const N_CONNS: usize = 200;
    let per_conn = if long() { 1_000 } else { 100 };
    let baseline = threads();
    let pairs: Vec<_> = (0..N_CONNS)
        .map(|idx| echo_pair(&format!("c{idx}"), |c| c.handler_threads(2)))
        .collect();
    let peak = threads();
    // Each pair: two connections of a receive, a send and two handler
    // threads.
    assert_eq!(peak, baseline + 8 * N_CONNS as u64);
    let deadline = Instant::now() + LOAD_LIMIT;
    // Pipeline on every client at once from a few driver threads.
    let clients: Vec<&PacketConnection> = pairs.iter().map(|(a, _)| a).collect();
    let drivers: Vec<&PacketConnection> = clients[..8].to_vec();
    with_watchdog(&drivers, deadline, |driver_idx, _| {
        let mine: Vec<_> = clients.iter().skip(driver_idx).step_by(8).collect();
        let pending: Vec<Vec<_>> = mine
            .iter()
            .map(|conn| {
                (0..per_conn)
                    .map(|idx| conn.submit(1, idx, &payload_for(idx, 100)).unwrap())
                    .collect()
            })
            .collect();
        for conn_pending in pending {
            for (p, idx) in conn_pending.into_iter().zip(0..) {
                assert!(
                    expect_echo_ref(&p, idx, 100, deadline),
                    "request {idx} refused as busy"
                );
            }
        }
    });
    for (a, b) in pairs {
        assert_eq!(a.stats().responses_ok, per_conn);
        close_both(&a, &b);
    }
    report(format!(
        "load: {N_CONNS} connection pairs at once, {per_conn} requests each, \
         threads {baseline} -> {peak} -> baseline"
    ));
    wait_for_threads(baseline);
}

#[test]
fn soak_memory_stays_flat() {
    if !isolated("soak_memory_stays_flat", isolated_limit()) {
        return;
    }
    let total: u64 = if long() { 1_000_000 } else { 200_000 };
    const CHECKPOINT: u64 = 100_000;
    const SUBMITTERS: u64 = 4;
    const WINDOW: u64 = 500;
    let baseline = threads();
    let (a, b) = echo_pair("soak", |c| c);
    let rss_at_checkpoint = std::sync::Mutex::new(None);
    let deadline = Instant::now() + if long() { LOAD_LIMIT * 8 } else { LOAD_LIMIT };
    let conns: Vec<&PacketConnection> = vec![&a; SUBMITTERS as usize];
    let done = std::sync::atomic::AtomicU64::new(0);
    with_watchdog(&conns, deadline, |thread_idx, conn| {
        let per_thread = total / SUBMITTERS;
        let base = thread_idx as u64 * per_thread;
        for window in 0..per_thread / WINDOW {
            let first = base + window * WINDOW;
            let pending: Vec<_> = (first..first + WINDOW)
                .map(|idx| conn.submit(1, idx, &payload_for(idx, 512)).unwrap())
                .collect();
            for (p, idx) in pending.into_iter().zip(first..) {
                assert!(
                    expect_echo_ref(&p, idx, 512, deadline),
                    "request {idx} refused as busy"
                );
            }
            let before = done.fetch_add(WINDOW, std::sync::atomic::Ordering::SeqCst);
            if before < CHECKPOINT && before + WINDOW >= CHECKPOINT {
                *rss_at_checkpoint.lock().unwrap() = Some(proc_status("VmRSS"));
            }
        }
    });
    let rss_checkpoint = rss_at_checkpoint.into_inner().unwrap().unwrap();
    let rss_end = proc_status("VmRSS");
    let peak = proc_status("VmHWM");
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sa.responses_ok, sb.replies_ok), (total, total));
    assert_eq!((sa.pending, sb.in_progress), (0, 0));
    report(format!(
        "soak: {total} requests; RSS {rss_checkpoint} kB at {CHECKPOINT}, \
         {rss_end} kB at {total}; peak {peak} kB"
    ));
    // Flat: no more than 16 MiB of growth from the checkpoint to the end.
    assert!(
        rss_end <= rss_checkpoint + 16 * 1024,
        "RSS grew from {rss_checkpoint} kB to {rss_end} kB"
    );
    close_both(&a, &b);
    wait_for_threads(baseline);
}
