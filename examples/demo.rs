//! The main example: a parent talks to a child process over its pipes.
//!
//! `cargo run --release --example demo` starts this same program again as a
//! child in `serve` mode, serving over its stdin/stdout, then makes a few
//! hundred requests of it: synchronous calls, a pipelined burst, and one
//! that fails. It prints what happened and shuts down in order.

// An example talks to the person running it.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use packetstream::{Config, Error, PacketConnection, Reply, Request};

/// Echo the payload and flags back.
const ECHO: u64 = 1;
/// Reverse the payload.
const REVERSE: u64 = 2;
/// Sum the payload's bytes, returned as the flags.
const SUM: u64 = 3;

fn serve() -> Result<(), Error> {
    let conn =
        PacketConnection::stdio(Config::default().name("demo-child").handler(|rq: Request| {
            match rq.rq_type {
                ECHO => Ok(Reply {
                    flags: rq.flags,
                    payload: rq.payload,
                }),
                REVERSE => Ok(rq.payload.iter().rev().copied().collect::<Vec<u8>>().into()),
                SUM => Ok(rq.payload.iter().map(|&b| u64::from(b)).sum::<u64>().into()),
                other => Err(format!("unknown request type {other}").into()),
            }
        }))?;
    // Serve until the parent sends EOF; then answer what is in progress and
    // send our own EOF.
    conn.join()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("serve") {
        if let Err(e) = serve() {
            eprintln!("demo child: {e}");
            std::process::exit(1);
        }
        return Ok(());
    }

    let mut child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let conn = PacketConnection::from_child(&mut child, Config::default().name("demo-parent"))?;
    println!("started child process {}", child.id());

    // Synchronous calls: each waits for its reply.
    let n_sync = 200;
    let started = Instant::now();
    for idx in 0..n_sync {
        let payload = format!("hello #{idx}");
        let rsp = conn.call(ECHO, idx, payload.as_bytes())?;
        assert_eq!(
            (rsp.flags, rsp.payload.as_slice()),
            (idx, payload.as_bytes())
        );
    }
    let per_call = started.elapsed() / n_sync as u32;
    println!("{n_sync} synchronous echo calls: {per_call:?} per round trip");

    let reversed: String = conn.call_as(REVERSE, 0, b"packetstream")?;
    let sum: u64 = conn.call_as(SUM, 0, &[1, 2, 3, 4])?;
    println!("reverse(\"packetstream\") = {reversed:?}, sum([1, 2, 3, 4]) = {sum}");

    // Pipelined: submit everything, then collect the replies.
    let n_pipelined = 500;
    let started = Instant::now();
    let pending = (0..n_pipelined)
        .map(|idx| conn.submit(ECHO, idx, &idx.to_be_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    for (idx, rsp) in pending.into_iter().enumerate() {
        let rsp = rsp.wait_timeout(Duration::from_secs(10))?;
        assert_eq!(rsp.flags, idx as u64);
    }
    let elapsed = started.elapsed();
    println!(
        "{n_pipelined} pipelined echo requests in {elapsed:?}: {:.0} requests/s",
        f64::from(n_pipelined as u32) / elapsed.as_secs_f64()
    );

    // A request the child does not know: a not-ok reply, as an Err.
    match conn.call(99, 0, b"") {
        Err(err @ Error::Failed { .. }) => println!("request type 99 failed as expected: {err}"),
        other => return Err(format!("expected a failure, got {other:?}").into()),
    }

    let stats = conn.stats();
    conn.close()?;
    let status = child.wait()?;
    println!(
        "closed: {} requests sent, {} ok, {} failed, {} writes; child exited with {status}",
        stats.requests_sent, stats.responses_ok, stats.responses_failed, stats.writes
    );
    if !status.success() {
        return Err("child failed".into());
    }
    Ok(())
}
