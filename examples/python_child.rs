//! A Rust parent with a Python child: starts `python/word_child.py`, which
//! serves a word service over its standard input and output with the
//! reference implementation, cs.packetstream 20240630, and makes requests
//! of it.
//!
//! ```text
//! python/setup-venv.sh                  # once: the venv in target/python-venv
//! cargo run --example python_child      # or: -- /path/to/venv/bin/python
//! ```
//!
//! The crate documentation's guide `talking_to_python` explains each step.

// An example talks to the person running it.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use packetstream::{Config, Error, PacketConnection};

/// The word service's request types, as in `python/word_child.py`.
const UPPER: u64 = 0;
const COUNT: u64 = 1;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = match std::env::args_os().nth(1) {
        Some(python) => PathBuf::from(python),
        None => repo.join("target/python-venv/bin/python"),
    };
    let mut child = Command::new(&python)
        .arg(repo.join("python/word_child.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: {e}; run python/setup-venv.sh",
                python.display()
            )
        })?;
    let conn = PacketConnection::from_child(&mut child, Config::default().name("parent"))?;

    let text: String = conn.call_as(UPPER, 0, b"hello from rust")?;
    println!("UPPER: {text}");
    let words: u64 = conn.call_as(COUNT, 0, b"one two three")?;
    println!("COUNT: {words}");

    // An exception in the Python handler is a not-ok response whose payload
    // is always the same text; the exception itself goes to the child's
    // standard error.
    match conn.call(UPPER, 0, b"\xff") {
        Err(Error::Failed { flags, payload, .. }) => {
            println!(
                "invalid UTF-8: not ok, flags {flags}, {:?}",
                String::from_utf8_lossy(&payload)
            )
        }
        other => return Err(format!("expected a not-ok response, got {other:?}").into()),
    }
    // The reference serves channel 0 only.
    match conn.call_on(5, UPPER, 0, b"hello") {
        Err(err @ Error::Failed { .. }) => println!("channel 5: {err}"),
        other => return Err(format!("expected a not-ok response, got {other:?}").into()),
    }

    conn.close()?; // ERQ, then EOF, then the child's EOF
    let status = child.wait()?;
    println!("child: {status}");
    if !status.success() {
        return Err("the child failed".into());
    }
    Ok(())
}
