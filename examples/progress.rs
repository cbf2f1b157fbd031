//! A live progress line from [`PacketConnection::stats`] while a load runs.
//!
//! ```text
//! cargo run --release --example progress
//! ```
//!
//! The library never prints: it counts. [`Stats`] is a snapshot of those
//! counters (packets and bytes each way, writes, requests sent and received,
//! ok and not-ok outcomes, requests pending here, requests in progress in
//! the handlers), cheap enough to take at any moment from any thread. Here a
//! client pushes twenty thousand requests, a window of them in flight at a
//! time, to a server whose handler takes a little while, and a monitor
//! thread redraws one line on standard error ten times a second: what the
//! reference implementation shows as progress bars.
//!
//! When standard error is not a terminal, the line is printed afresh every
//! half second instead of being redrawn.

// An example talks to the person running it.
#![allow(clippy::print_stderr)]

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use packetstream::{Config, Error, PacketConnection, Request, Stats};

/// WORK: sleep for the flags' number of microseconds, then echo the payload.
/// A payload starting with `!` fails.
const WORK: u64 = 1;

const N_REQUESTS: u64 = 20_000;
/// Requests kept in flight.
const WINDOW: usize = 128;
const LIMIT: Duration = Duration::from_secs(30);

fn main() -> Result<(), Error> {
    let (a, b) = UnixStream::pair()?;
    let server = PacketConnection::from_unix_stream(
        b,
        Config::default()
            .name("server")
            .handler_threads(8)
            .handler(|rq: Request| {
                thread::sleep(Duration::from_micros(rq.flags));
                if rq.payload.first() == Some(&b'!') {
                    return Err("payload asked to fail".into());
                }
                Ok(rq.payload.into())
            }),
    )?;
    let client = PacketConnection::from_unix_stream(a, Config::default().name("client"))?;

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let started = Instant::now();
    let failed = thread::scope(|s| {
        let (client, server) = (&client, &server);
        let monitor = s.spawn(move || monitor(client, server, started, done_rx));
        let res = run_load(client);
        drop(done_tx);
        monitor.join().expect("monitor thread");
        res
    })?;

    let stats = client.stats();
    client.close_timeout(LIMIT)?;
    server.join()?;
    eprintln!(
        "done: {} requests in {:.1?}, {} failed on purpose, {} writes",
        stats.requests_sent,
        started.elapsed(),
        failed,
        stats.writes
    );
    assert_eq!(stats.responses_ok + stats.responses_failed, N_REQUESTS);
    assert_eq!(stats.responses_failed, failed);
    Ok(())
}

/// Submits every request, keeping `WINDOW` in flight. Returns how many
/// failed, as every hundredth one asks to.
fn run_load(client: &PacketConnection) -> Result<u64, Error> {
    let mut window = VecDeque::with_capacity(WINDOW);
    let mut n_failed = 0;
    let mut settle = |pending: packetstream::PendingResponse| match pending.wait_timeout(LIMIT) {
        Ok(_) => Ok(()),
        Err(Error::Failed { .. }) => {
            n_failed += 1;
            Ok(())
        }
        Err(e) => Err(e),
    };
    for idx in 0..N_REQUESTS {
        if window.len() == WINDOW {
            settle(window.pop_front().expect("window is full"))?;
        }
        let payload = if idx % 100 == 99 {
            b"!fail".to_vec()
        } else {
            vec![b'x'; 64 + (idx % 512) as usize]
        };
        // Between 0 and 2 ms of work each.
        let micros = (idx * 7919) % 2000;
        window.push_back(client.submit(WORK, micros, &payload)?);
    }
    for pending in window {
        settle(pending)?;
    }
    Ok(n_failed)
}

/// Redraws the progress line until `done` is dropped.
fn monitor(
    client: &PacketConnection,
    server: &PacketConnection,
    started: Instant,
    done: mpsc::Receiver<()>,
) {
    let redraw = std::io::stderr().is_terminal();
    let tick = if redraw {
        Duration::from_millis(100)
    } else {
        Duration::from_millis(500)
    };
    loop {
        let finished = !matches!(
            done.recv_timeout(tick),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        let line = progress_line(&client.stats(), &server.stats(), started.elapsed());
        let mut err = std::io::stderr().lock();
        if redraw {
            // Clear to the end of the line, in case the new one is shorter.
            let _ = write!(err, "\r{line}\x1b[K");
            if finished {
                let _ = writeln!(err);
            }
            let _ = err.flush();
        } else {
            let _ = writeln!(err, "{line}");
        }
        if finished {
            return;
        }
    }
}

fn progress_line(client: &Stats, server: &Stats, elapsed: Duration) -> String {
    let done = client.responses_ok + client.responses_failed;
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    format!(
        "[{:5.1}s] {done:>5}/{N_REQUESTS} done ({:3.0}%)  ok {}  failed {}  pending {:>3}  \
         server in progress {:>3}  out {} KiB in {} writes  in {} KiB  {rate:.0} rq/s",
        elapsed.as_secs_f64(),
        100.0 * done as f64 / N_REQUESTS as f64,
        client.responses_ok,
        client.responses_failed,
        client.pending,
        server.in_progress,
        client.bytes_out >> 10,
        client.writes,
        client.bytes_in >> 10,
    )
}
