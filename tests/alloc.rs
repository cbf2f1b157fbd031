//! Heap allocations per request in steady state, counted by the global allocator.
//!
//! The budget for one 32 B echo request, both ends in this process:
//!
//! - server: the request payload `Vec`, read off the wire. The echo handler
//!   moves it into its reply, so the reply costs nothing more;
//! - client: the response payload `Vec`, read off the wire.
//!
//! That is two allocations, both payload buffers. With an inline handler,
//! which runs on the thread that reads, the reply's payload buffer, once
//! queued, is kept by that thread and serves the next request it reads: one
//! allocation a request, the response's. Everything else on the hot
//! path (the pending cell, the outgoing byte queue, the handler job, the
//! tag tables) must reuse memory; one allocation more per request, such as a
//! fresh `Arc` for the pending cell or a boxed job, shows as a third. The
//! counts are averages over many requests after a warm-up, with a fixed slack
//! for one-off growth of tables and buffers. Nothing here is timed.

mod common;

use std::collections::VecDeque;

use common::{close_both, echo, pair_with, serial, ECHO, LIMIT};
use packetstream::{Config, PacketConnection};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const PAYLOAD_ALLOCS_PER_REQUEST: usize = 2;
const WARMUP: usize = 2_000;
const N: usize = 20_000;
/// One-off allocations tolerated in a measured run of `N` requests.
const ONE_OFF_ALLOCATIONS: usize = 100;

fn echo_pair() -> (PacketConnection, PacketConnection) {
    pair_with(
        Config::default().name("client"),
        Config::default().name("server").handler(echo),
    )
}

fn sync_calls(client: &PacketConnection, payload: &[u8], n: usize) {
    for _ in 0..n {
        let pending = client.submit(ECHO, 0, payload).unwrap();
        let rsp = pending.wait_timeout(LIMIT).unwrap();
        assert_eq!(rsp.payload.len(), payload.len());
    }
}

fn pipelined(client: &PacketConnection, payload: &[u8], window: usize, n: usize) {
    let mut queue = VecDeque::with_capacity(window);
    for _ in 0..n {
        if queue.len() == window {
            let pending: packetstream::PendingResponse = queue.pop_front().unwrap();
            let rsp = pending.wait_timeout(LIMIT).unwrap();
            assert_eq!(rsp.payload.len(), payload.len());
        }
        queue.push_back(client.submit(ECHO, 0, payload).unwrap());
    }
    for pending in queue {
        pending.wait_timeout(LIMIT).unwrap();
    }
}

/// The allocations of `N` sync calls of 32 B after a warm-up; then both
/// ends close.
fn sync_allocations(client: &PacketConnection, server: &PacketConnection) -> usize {
    let payload = [0xa5u8; 32];
    sync_calls(client, &payload, WARMUP);
    let region = Region::new(GLOBAL);
    sync_calls(client, &payload, N);
    let allocations = region.change().allocations;
    close_both(client, server);
    allocations
}

fn check_budget(what: &str, allocations: usize) {
    check_budget_of(what, allocations, PAYLOAD_ALLOCS_PER_REQUEST);
}

fn check_budget_of(what: &str, allocations: usize, per_request: usize) {
    let budget = per_request * N + ONE_OFF_ALLOCATIONS;
    assert!(
        allocations <= budget,
        "{what}: {allocations} allocations for {N} requests ({:.3} per request); \
         the budget is {per_request} per request (payload buffers) plus {ONE_OFF_ALLOCATIONS}",
        allocations as f64 / N as f64
    );
    // The payload buffers themselves are counted, so the counter works.
    assert!(
        allocations >= per_request * N,
        "{what}: only {allocations} allocations for {N} requests"
    );
}

#[test]
fn sync_calls_allocate_only_payload_buffers() {
    // The counts are process-wide: the tests take turns.
    let _turn = serial();
    let (client, server) = echo_pair();
    check_budget("sync calls", sync_allocations(&client, &server));
}

#[test]
fn pipelined_requests_allocate_only_payload_buffers() {
    // The counts are process-wide: the tests take turns.
    let _turn = serial();
    let (client, server) = echo_pair();
    let payload = [0xa5u8; 32];
    let window = 256;
    pipelined(&client, &payload, window, WARMUP + window);
    let region = Region::new(GLOBAL);
    pipelined(&client, &payload, window, N);
    let allocations = region.change().allocations;
    close_both(&client, &server);
    check_budget("pipelined, 256 in flight", allocations);
}

#[test]
fn an_inline_echo_allocates_only_the_response_buffer() {
    // The counts are process-wide: the tests take turns.
    let _turn = serial();
    let (client, server) = pair_with(
        Config::default().name("client"),
        Config::default().name("server").inline_handler(echo),
    );
    check_budget_of(
        "sync calls, inline echo",
        sync_allocations(&client, &server),
        1,
    );
}
