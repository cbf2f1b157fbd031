//! How to unit-test a service: run it and a client in one process over
//! `UnixStream::pair()`, with no child process and no network.
//!
//! ```text
//! cargo run --example socketpair_test     # runs the checks from main
//! cargo test --example socketpair_test    # runs the same checks as #[test]s
//! ```
//!
//! The service is a small counter store: ADD adds the request's flags to a
//! named counter and answers with the new value, GET reads one, and an
//! unknown counter is a not-ok reply with flags 404. `service()` builds its
//! [`Config`] the way a real program would; [`Pair`] starts it against a
//! client and closes both ends in order when the check is done.
//!
//! The test pattern, for your own services:
//!
//! - Build the handler in a function the program and the tests share, so
//!   the tests exercise the real thing.
//! - Every blocking wait has a timeout (`wait_timeout`, `close_timeout`), so
//!   that a bug shows as a failed check, never as a hung test run.
//! - Assert on exact replies, including the `Err` of a not-ok reply: its
//!   flags and reason are part of the protocol.
//! - Close in order at the end and check that it succeeded: a handler that
//!   panicked, or a reply that never went out, shows up there.

// An example talks to the person running it.
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use packetstream::{Config, Error, Failure, HandlerResult, PacketConnection, Request};

/// ADD: add the flags to the counter named by the payload; reply with the
/// new value in the flags.
const ADD: u64 = 1;
/// GET: reply with the counter's value in the flags, or fail with 404.
const GET: u64 = 2;

/// The longest any one step may take before it counts as a hang.
const LIMIT: Duration = Duration::from_secs(10);

/// The service under test: its state and its handler, in a `Config`.
fn service() -> Config {
    let counters = Arc::new(Mutex::new(HashMap::<Vec<u8>, u64>::new()));
    Config::default()
        .name("counters")
        .handler(move |rq: Request| -> HandlerResult {
            let mut counters = counters.lock().map_err(|_| "state poisoned")?;
            match rq.rq_type {
                ADD => {
                    let value = counters.entry(rq.payload).or_insert(0);
                    *value += rq.flags;
                    Ok((*value).into())
                }
                GET => match counters.get(&rq.payload) {
                    Some(&value) => Ok(value.into()),
                    None => Err(Failure::new(404, "no such counter").into()),
                },
                other => Err(format!("unknown request type {other}").into()),
            }
        })
}

/// A client connected to the service over a socketpair.
struct Pair {
    client: PacketConnection,
    server: PacketConnection,
}

impl Pair {
    fn start() -> Result<Pair, Error> {
        let (a, b) = UnixStream::pair()?;
        let server = PacketConnection::from_unix_stream(b, service())?;
        let client = PacketConnection::from_unix_stream(a, Config::default().name("test-client"))?;
        Ok(Pair { client, server })
    }

    /// Sends a request and waits at most `LIMIT` for the reply.
    fn call(&self, rq_type: u64, flags: u64, payload: &[u8]) -> Result<u64, Error> {
        let pending = self.client.submit(rq_type, flags, payload)?;
        Ok(pending.wait_timeout(LIMIT)?.flags)
    }

    /// Closes both ends in order; either one failing fails the check.
    fn close(self) -> Result<(), Error> {
        self.client.close_timeout(LIMIT)?;
        self.server.close_timeout(LIMIT)
    }
}

fn adds_accumulate() -> Result<(), Error> {
    let pair = Pair::start()?;
    assert_eq!(pair.call(ADD, 5, b"a")?, 5);
    assert_eq!(pair.call(ADD, 7, b"a")?, 12);
    assert_eq!(pair.call(ADD, 1, b"b")?, 1);
    assert_eq!(pair.call(GET, 0, b"a")?, 12);
    pair.close()
}

fn unknown_counter_fails_with_404() -> Result<(), Error> {
    let pair = Pair::start()?;
    match pair.call(GET, 0, b"missing") {
        Err(Error::Failed { flags, payload, .. }) => {
            assert_eq!((flags, payload.as_slice()), (404, &b"no such counter"[..]));
        }
        other => panic!("expected a 404 failure, got {other:?}"),
    }
    // The connection goes on after a not-ok reply.
    assert_eq!(pair.call(ADD, 3, b"missing")?, 3);
    pair.close()
}

fn unknown_request_type_is_refused_with_a_reason() -> Result<(), Error> {
    let pair = Pair::start()?;
    let err = pair.call(42, 0, b"").unwrap_err();
    assert_eq!(
        err.failure_reason().as_deref(),
        Some("unknown request type 42")
    );
    pair.close()
}

fn concurrent_adds_from_many_threads_all_count() -> Result<(), Error> {
    let pair = Pair::start()?;
    let (n_threads, n_each) = (4, 50);
    thread::scope(|s| {
        let workers: Vec<_> = (0..n_threads)
            .map(|_| {
                s.spawn(|| -> Result<(), Error> {
                    for _ in 0..n_each {
                        pair.call(ADD, 1, b"shared")?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker thread")?;
        }
        Ok::<(), Error>(())
    })?;
    assert_eq!(pair.call(GET, 0, b"shared")?, n_threads * n_each);
    let stats = pair.client.stats();
    assert_eq!(stats.requests_sent, n_threads * n_each + 1);
    assert_eq!(stats.pending, 0);
    pair.close()
}

/// One check: `Ok` if it passed.
type Check = fn() -> Result<(), Error>;

/// Every check, by name, for `main`; the `#[test]`s below call the same.
const CHECKS: &[(&str, Check)] = &[
    ("adds_accumulate", adds_accumulate),
    (
        "unknown_counter_fails_with_404",
        unknown_counter_fails_with_404,
    ),
    (
        "unknown_request_type_is_refused_with_a_reason",
        unknown_request_type_is_refused_with_a_reason,
    ),
    (
        "concurrent_adds_from_many_threads_all_count",
        concurrent_adds_from_many_threads_all_count,
    ),
];

fn main() -> Result<(), Error> {
    for (name, check) in CHECKS {
        check()?;
        println!("ok: {name}");
    }
    println!("{} checks passed", CHECKS.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn adds_accumulate() {
        super::adds_accumulate().unwrap();
    }

    #[test]
    fn unknown_counter_fails_with_404() {
        super::unknown_counter_fails_with_404().unwrap();
    }

    #[test]
    fn unknown_request_type_is_refused_with_a_reason() {
        super::unknown_request_type_is_refused_with_a_reason().unwrap();
    }

    #[test]
    fn concurrent_adds_from_many_threads_all_count() {
        super::concurrent_adds_from_many_threads_all_count().unwrap();
    }
}
