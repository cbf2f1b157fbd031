//! Load and soak: mutual floods, many threads on one connection, many
//! connections at once, flat memory over a long run, and thread counts that
//! return to their baseline.
//!
//! Bounded by default; `PACKETSTREAM_LONG=1` runs the full-size variants.
//! Tests that measure the whole process (RSS, thread count) re-run this
//! binary on just themselves, so that other tests do not disturb the figures.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use packetstream::{Config, PacketConnection, PendingResponse, Reply, Request};

/// Every blocking wait in this file ends by this long after it starts.
const PATIENCE: Duration = Duration::from_secs(120);

fn long() -> bool {
    std::env::var_os("PACKETSTREAM_LONG").is_some_and(|v| v != "0")
}

fn echo(rq: Request) -> packetstream::HandlerResult {
    Ok(Reply {
        flags: rq.flags,
        payload: rq.payload,
    })
}

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

/// Waits for a reply and checks that it echoes request `idx`.
fn expect_echo(pending: PendingResponse, idx: u64, max_len: usize, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    let rsp = pending
        .wait_timeout(left)
        .unwrap_or_else(|e| panic!("request {idx}: {e}"));
    assert_eq!(rsp.flags, idx, "reply to the wrong request");
    assert_eq!(rsp.payload, payload_for(idx, max_len), "request {idx}");
}

/// Submits `n` echo requests, all before waiting for any, then checks every
/// reply.
fn pipeline(conn: &PacketConnection, n: u64, max_len: usize, deadline: Instant) {
    let mut pending = Vec::with_capacity(n as usize);
    for idx in 0..n {
        assert!(Instant::now() < deadline, "submit stuck at request {idx}");
        let payload = payload_for(idx, max_len);
        pending.push(conn.submit(1, idx, &payload).expect("submit"));
    }
    for (idx, p) in pending.into_iter().enumerate() {
        expect_echo(p, idx as u64, max_len, deadline);
    }
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

/// Two connections over one socketpair, both serving echo.
fn echo_pair(
    name: &str,
    config: impl Fn(Config) -> Config,
) -> (PacketConnection, PacketConnection) {
    let (a, b) = UnixStream::pair().unwrap();
    let a = PacketConnection::from_unix_stream(
        a,
        config(Config::default().name(format!("{name}a")).handler(echo)),
    )
    .unwrap();
    let b = PacketConnection::from_unix_stream(
        b,
        config(Config::default().name(format!("{name}b")).handler(echo)),
    )
    .unwrap();
    (a, b)
}

fn close_pair(a: PacketConnection, b: PacketConnection) {
    thread::scope(|s| {
        let closer = s.spawn(|| b.close_timeout(PATIENCE));
        a.close_timeout(PATIENCE).expect("close a");
        closer.join().unwrap().expect("close b");
    });
}

#[test]
fn mutual_flood_of_100k_pipelined_requests_each_way_completes() {
    let n = if long() { 1_000_000 } else { 100_000 };
    let (a, b) = echo_pair("fl", |c| c);
    let deadline = Instant::now() + PATIENCE;
    with_watchdog(&[&a, &b], deadline, |_, conn| {
        pipeline(conn, n, 16, deadline)
    });
    for conn in [&a, &b] {
        let stats = conn.stats();
        assert_eq!((stats.requests_sent, stats.responses_ok), (n, n));
        assert_eq!((stats.requests_received, stats.replies_ok), (n, n));
        assert_eq!((stats.pending, stats.in_progress), (0, 0));
    }
    close_pair(a, b);
}

#[test]
fn mutual_flood_of_large_payloads_completes() {
    // Requests and replies of up to 200 KB fill both socket buffers at once.
    let n = if long() { 10_000 } else { 1_000 };
    let (a, b) = echo_pair("fL", |c| c.handler_threads(2));
    let deadline = Instant::now() + PATIENCE;
    with_watchdog(&[&a, &b], deadline, |_, conn| {
        pipeline(conn, n, 200_000, deadline)
    });
    close_pair(a, b);
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
    let deadline = Instant::now() + PATIENCE;
    with_watchdog(&[&a, &b], deadline, |_, conn| {
        pipeline(conn, n, 3000, deadline)
    });
    close_pair(a, b);
}
