//! The smallest parent/child pair: copy this to start a program that talks
//! to a helper process over its standard input and output.
//!
//! ```text
//! cargo run --example subprocess
//! ```
//!
//! The parent starts this same program again with the argument `child`. The
//! child serves requests over its stdin/stdout with
//! [`PacketConnection::stdio`] until the parent closes the connection; the
//! parent talks to it with [`PacketConnection::from_child`]. In your own
//! project the child is usually another binary: give its path to
//! `Command::new` instead of `current_exe()`.
//!
//! Two rules for the child: its standard output carries packets, so it must
//! not print there (log to standard error), and it should end when
//! [`join`](PacketConnection::join) returns, which is when the parent has
//! closed the connection.

// An example talks to the person running it.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::{Command, Stdio};

use packetstream::{Config, PacketConnection, Request};

/// Request types: numbers both sides agree on.
const UPPER: u64 = 1;
const ADD: u64 = 2;

/// The child: serve until the parent closes the connection.
fn child() -> packetstream::Result<()> {
    let conn = PacketConnection::stdio(Config::default().name("child").handler(|rq: Request| {
        match rq.rq_type {
            // The payload is text: answer it in upper case.
            UPPER => Ok(String::from_utf8(rq.payload)?.to_uppercase().into()),
            // The flags are a number: answer with it plus the payload's length.
            ADD => Ok((rq.flags + rq.payload.len() as u64).into()),
            other => Err(format!("unknown request type {other}").into()),
        }
    }))?;
    // Returns once the parent has sent EOF and every reply has gone out.
    conn.join()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("child") {
        child()?;
        return Ok(());
    }

    // Both pipes must be piped; standard error stays shared for messages.
    let mut process = Command::new(std::env::current_exe()?)
        .arg("child")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let conn = PacketConnection::from_child(&mut process, Config::default().name("parent"))?;

    // `call` sends a request and waits for its reply.
    let text: String = conn.call_as(UPPER, 0, b"hello, child")?;
    println!("UPPER -> {text}");
    let rsp = conn.call(ADD, 40, b"xy")?;
    println!("ADD 40 + len(\"xy\") -> {}", rsp.flags);

    // `submit` returns at once; many requests can be in flight.
    let pending = (0..10u64)
        .map(|n| conn.submit(ADD, n, b""))
        .collect::<Result<Vec<_>, _>>()?;
    let sum: u64 = pending
        .into_iter()
        .map(|p| p.wait().map(|rsp| rsp.flags))
        .sum::<Result<u64, _>>()?;
    println!("10 pipelined ADDs -> sum {sum}");

    // A not-ok reply is an `Err` carrying the child's reason.
    let err = conn.call(99, 0, b"").unwrap_err();
    println!("request type 99 -> {err}");

    // ERQ, EOF, wait for the child's EOF; then the child exits.
    conn.close()?;
    let status = process.wait()?;
    println!("child exited: {status}");
    if !status.success() {
        return Err("the child failed".into());
    }
    Ok(())
}
