//! A parent that gives up on a long job in a child, and the child that
//! stops it: remote cancel and deadlines, two of the crate's
//! [extensions](packetstream::extensions).
//!
//! ```text
//! cargo run --example cancel
//! ```
//!
//! The child runs jobs of many small steps. Between steps its handler
//! blocks in [`Request::wait_cancelled`], which returns at once when the
//! parent gives up, instead of sleeping. The parent
//!
//! 1. starts a job of 10 s with [`call_timeout`](PacketConnection::call_timeout)
//!    and a timeout of 200 ms: at the timeout the child is told to stop;
//! 2. starts another with [`submit`](PacketConnection::submit) and, after
//!    100 ms, [`cancel`](packetstream::PendingResponse::cancel)s it;
//! 3. asks the child how many jobs it stopped and how many steps it ran,
//!    and how long the child took to stop after each cancel.
//!
//! It exits with an error if a cancelled job ran on.

// An example talks to the person running it.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use packetstream::{Config, Error, PacketConnection, Request};

/// Request types.
const JOB: u64 = 1; // flags: steps of 10 ms
const REPORT: u64 = 2; // answers (stopped jobs, steps run)

const STEP: Duration = Duration::from_millis(10);

/// The child: serves jobs until the parent closes the connection.
fn child() -> packetstream::Result<()> {
    let stopped = Arc::new(AtomicU64::new(0));
    let steps = Arc::new(AtomicU64::new(0));
    let conn =
        PacketConnection::stdio(Config::default().name("child").handler(move |rq: Request| {
            match rq.rq_type {
                JOB => {
                    for _ in 0..rq.flags {
                        // One step of work, or the parent's cancel, whichever
                        // comes first.
                        if rq.wait_cancelled(STEP) {
                            stopped.fetch_add(1, Ordering::SeqCst);
                            return Err("cancelled".into());
                        }
                        steps.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(().into())
                }
                REPORT => Ok(format!(
                    "{} {}",
                    stopped.load(Ordering::SeqCst),
                    steps.load(Ordering::SeqCst)
                )
                .into()),
                other => Err(format!("unknown request type {other}").into()),
            }
        }))?;
    conn.join()
}

/// Asks the child until it has stopped `n` jobs, or 5 s have passed;
/// returns its counts.
fn wait_stopped(conn: &PacketConnection, n: u64) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        let text: String = conn.call_as(REPORT, 0, b"")?;
        let (stopped, steps) = text.split_once(' ').ok_or("bad report")?;
        let (stopped, steps) = (stopped.parse()?, steps.parse()?);
        if stopped >= n || Instant::now() >= give_up {
            return Ok((stopped, steps));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("child") {
        child()?;
        return Ok(());
    }
    let mut process = Command::new(std::env::current_exe()?)
        .arg("child")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let conn = PacketConnection::from_child(&mut process, Config::default().name("parent"))?;
    // After one round trip, both ends know the other has the extensions.
    let rtt = conn.ping(Duration::from_secs(5))?;
    println!(
        "ping: {rtt:?}; the child has the extensions: {:?}",
        conn.peer_extensions()
    );

    // 1. A 10 s job, given 200 ms.
    let started = Instant::now();
    match conn.call_timeout(JOB, 1000, b"", Duration::from_millis(200)) {
        Err(e @ Error::Timeout { .. }) => println!("job 1: {e}"),
        other => return Err(format!("job 1 should time out: {other:?}").into()),
    }
    let gave_up = started.elapsed();
    let (stopped, steps) = wait_stopped(&conn, 1)?;
    println!(
        "job 1: the child stopped it {:?} after the timeout, at step {steps} of 1000",
        started.elapsed().saturating_sub(gave_up)
    );

    // 2. Another, cancelled by hand after 100 ms.
    let job = conn.submit(JOB, 1000, b"")?;
    std::thread::sleep(Duration::from_millis(100));
    let cancelled = Instant::now();
    job.cancel();
    let (stopped_now, steps_now) = wait_stopped(&conn, stopped + 1)?;
    println!(
        "job 2: the child stopped it {:?} after the cancel, at step {} of 1000",
        cancelled.elapsed(),
        steps_now - steps
    );

    conn.close()?;
    let status = process.wait()?;
    println!("child exited: {status}");
    if stopped_now != 2 || steps_now > 100 || !status.success() {
        return Err(
            format!("the child stopped {stopped_now} jobs of 2 after {steps_now} steps").into(),
        );
    }
    Ok(())
}
