//! A Rust child for a Python parent: serves the word service of
//! `python/word_child.py` over its standard input and output. Its parent is
//! `python/rust_parent.py`, which uses the reference implementation,
//! cs.packetstream 20240630.
//!
//! ```text
//! python/setup-venv.sh                  # once: the venv in target/python-venv
//! cargo build --example rust_child
//! target/python-venv/bin/python python/rust_parent.py target/debug/examples/rust_child
//! ```
//!
//! The crate documentation's guide `talking_to_python` explains each step.

// Standard output carries the packets: messages go to standard error.
#![allow(clippy::print_stderr)]

use std::process::ExitCode;

use packetstream::{Config, Failure, HandlerResult, PacketConnection, Request};

/// The word service's request types, as in `python/word_child.py`.
const UPPER: u64 = 0;
const COUNT: u64 = 1;

fn handle(rq: Request) -> HandlerResult {
    // Invalid UTF-8 is a not-ok response, flags 0, with the error's text.
    let text = String::from_utf8(rq.payload)?;
    match rq.rq_type {
        UPPER => Ok(text.to_uppercase().into()),
        COUNT => Ok((text.split_whitespace().count() as u64).into()),
        // A not-ok response with chosen flags and payload.
        other => Err(Failure::new(404, format!("unknown request type {other}")).into()),
    }
}

fn main() -> ExitCode {
    let config = Config::default().name("rust-child").handler(handle);
    let served = PacketConnection::stdio(config).and_then(|conn| {
        // Returns once the parent has closed the connection and our
        // answers and EOF are written.
        conn.join()
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rust_child: {e}");
            ExitCode::FAILURE
        }
    }
}
