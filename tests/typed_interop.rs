//! The typed record service across languages: `examples/typed_service.rs` against the reference's `BaseRequest` version, `python/typed_service.py`, both ways, as processes over pipes.
//!
//! Each pairing runs a client and a server process linked by two pipes,
//! the client's standard output to the server's standard input and back.
//! Both are killed at a deadline, so a hang is a failure. Without the
//! reference's venv (and no way to make it), the Python pairings are
//! skipped with a printed reason, except under `CI=true`, where that is a
//! failure.

mod common;

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::{ms, report};

/// What either client checks: echo, summarise and store for each of the
/// 7 records, fetch for each, then names, a fetch past the end and a
/// truncated store.
const CHECKS: usize = 4 * 7 + 3;
/// How long a pairing may take before both processes are killed.
const PAIRING_DEADLINE: Duration = Duration::from_secs(120);
/// How long making the venv or building the example may take.
const SETUP_DEADLINE: Duration = Duration::from_secs(900);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The python of the venv that holds the reference (cs.packetstream and
/// cs.binary 20240630), made with `setup.sh` if it is missing. The one
/// place that knows where that venv lives.
fn find_reference_python() -> Result<PathBuf, String> {
    let venv = manifest_dir().join("target/interop-venv");
    let python = venv.join("bin/python");
    if python.is_file() {
        return Ok(python);
    }
    let setup = manifest_dir().join("../shared/interop/setup.sh");
    if !setup.is_file() {
        return Err(format!(
            "no venv at {} and no {} to make one",
            venv.display(),
            setup.display()
        ));
    }
    let mut cmd = Command::new("bash");
    cmd.arg(&setup).arg(&venv);
    let (status, stderr) = run_to_end(cmd, Instant::now() + SETUP_DEADLINE)?;
    if !status.is_some_and(|s| s.success()) || !python.is_file() {
        return Err(format!(
            "{} failed ({status:?}):\n{stderr}",
            setup.display()
        ));
    }
    Ok(python)
}

/// The reference's python, found once. `None` means skip, after saying
/// why; under CI, a missing reference fails the test instead.
fn reference_python() -> Option<&'static Path> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PYTHON.get_or_init(find_reference_python) {
        Ok(python) => Some(python),
        Err(why) if in_ci() => panic!("the typed interop tests must run under CI, but: {why}"),
        Err(why) => {
            report(format!("SKIPPED: cannot run the reference: {why}"));
            None
        }
    }
}

/// Waits for `child` until `deadline`, then kills it. `None` if killed.
fn wait_or_kill(child: &Mutex<Child>, deadline: Instant) -> Option<ExitStatus> {
    loop {
        {
            let mut child = child.lock().unwrap();
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                // Bounded: the child was just sent SIGKILL.
                let _ = child.wait();
                return None;
            }
        }
        thread::sleep(ms(10));
    }
}

fn read_to_end(mut r: impl Read) -> String {
    let mut bytes = Vec::new();
    let _ = r.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs `cmd` with a deadline; its status (`None` if killed) and the tail
/// of its standard error. Its standard output is dropped.
fn run_to_end(mut cmd: Command, deadline: Instant) -> Result<(Option<ExitStatus>, String), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let child = Mutex::new(child);
    thread::scope(|s| {
        let stderr = s.spawn(move || read_to_end(stderr));
        let status = wait_or_kill(&child, deadline);
        let stderr = stderr.join().unwrap();
        let tail_start = stderr.len().saturating_sub(3000);
        let tail = stderr.get(tail_start..).unwrap_or(&stderr).to_string();
        Ok((status, tail))
    })
}

/// The example `typed_service`, built with the profile of this test.
/// Cargo gives integration tests no path to an example binary and does not
/// build examples for `cargo test --test typed_interop`, so the test builds
/// it itself, into the target directory this test binary lives in
/// (`<target>/<profile>/deps/`): quick when it is up to date, and always
/// the current source.
fn example_binary() -> &'static Path {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let res = BINARY.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("test binary is not in <target>/<profile>/deps")?;
        let target_dir = profile_dir.parent().ok_or("no target directory")?;
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(name) => name,
            None => return Err("profile directory has no name".to_string()),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--example", "typed_service", "--profile", profile])
            .arg("--manifest-path")
            .arg(manifest_dir().join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        let (status, stderr) = run_to_end(cmd, Instant::now() + SETUP_DEADLINE)?;
        if !status.is_some_and(|s| s.success()) {
            return Err(format!(
                "cargo build --example typed_service failed ({status:?}):\n{stderr}"
            ));
        }
        let binary = profile_dir.join("examples").join("typed_service");
        if !binary.is_file() {
            return Err(format!("no example binary at {}", binary.display()));
        }
        Ok(binary)
    });
    match res {
        Ok(binary) => binary,
        Err(e) => panic!("{e}"),
    }
}

fn rust(mode: &str) -> Command {
    let mut cmd = Command::new(example_binary());
    cmd.arg(mode);
    cmd
}

fn python(python: &Path, mode: &str) -> Command {
    let mut cmd = Command::new(python);
    cmd.arg(manifest_dir().join("python/typed_service.py"))
        .arg(mode)
        // The script exits with status 3 after this; the deadline is later.
        .env("TYPED_TIMEOUT", "100");
    cmd
}

struct Ended {
    /// `None` if the process was killed at the deadline.
    status: Option<ExitStatus>,
    stderr: String,
}

impl Ended {
    fn assert_clean(&self, who: &str) {
        assert!(
            self.status.is_some_and(|s| s.success()),
            "{who} ended with {:?} (None: killed at the deadline); its stderr:\n{}",
            self.status,
            self.stderr
        );
    }
}

/// Runs a client and a server process against each other over two pipes
/// until both exit, killing both at the deadline.
fn run_pairing(mut client: Command, mut server: Command) -> (Ended, Ended) {
    let deadline = Instant::now() + PAIRING_DEADLINE;
    let (to_server_r, to_server_w) = io::pipe().expect("pipe");
    let (to_client_r, to_client_w) = io::pipe().expect("pipe");
    client
        .stdin(to_client_r)
        .stdout(to_server_w)
        .stderr(Stdio::piped());
    server
        .stdin(to_server_r)
        .stdout(to_client_w)
        .stderr(Stdio::piped());
    // `spawn` consumes each command: dropping it closes this process's
    // copies of the pipe ends, so that the children alone hold them.
    let mut client = client.spawn().expect("start the client");
    let mut server = match server.spawn() {
        Ok(server) => server,
        Err(e) => {
            let _ = client.kill();
            let _ = client.wait();
            panic!("cannot start the server: {e}");
        }
    };
    let client_err = client.stderr.take().expect("piped stderr");
    let server_err = server.stderr.take().expect("piped stderr");
    let (client, server) = (Mutex::new(client), Mutex::new(server));
    thread::scope(|s| {
        let client_err = s.spawn(move || read_to_end(client_err));
        let server_err = s.spawn(move || read_to_end(server_err));
        let server_status = s.spawn(|| wait_or_kill(&server, deadline));
        let client_status = wait_or_kill(&client, deadline);
        let server_status = server_status.join().unwrap();
        (
            Ended {
                status: client_status,
                stderr: client_err.join().unwrap(),
            },
            Ended {
                status: server_status,
                stderr: server_err.join().unwrap(),
            },
        )
    })
}

/// Checks that the client ran every check and passed them all, and that
/// both ended cleanly.
fn assert_all_passed(client: &Ended, server: &Ended) {
    let want = format!("typed: {CHECKS} passed, 0 failed");
    let summary = client
        .stderr
        .lines()
        .rev()
        .find(|line| line.starts_with("typed: "));
    assert_eq!(
        summary,
        Some(want.as_str()),
        "client's stderr:\n{}\nserver's stderr:\n{}",
        client.stderr,
        server.stderr
    );
    client.assert_clean("client");
    server.assert_clean("server");
    report(format!("typed interop: {want}"));
}

#[test]
fn rust_client_against_the_reference_server() {
    let Some(py) = reference_python() else {
        return;
    };
    let (client, server) = run_pairing(rust("client"), python(py, "serve"));
    assert_all_passed(&client, &server);
    // Every STORE reached the reference's own BaseRequest classes.
    assert!(
        server
            .stderr
            .contains("serve: clean shutdown, 7 records stored"),
        "server's stderr:\n{}",
        server.stderr
    );
}

#[test]
fn reference_client_against_the_rust_server() {
    let Some(py) = reference_python() else {
        return;
    };
    let (client, server) = run_pairing(python(py, "client"), rust("serve"));
    assert_all_passed(&client, &server);
    assert!(
        server
            .stderr
            .contains(&format!("clean shutdown after {CHECKS} requests")),
        "server's stderr:\n{}",
        server.stderr
    );
}

#[test]
fn rust_client_against_the_rust_server() {
    let (client, server) = run_pairing(rust("client"), rust("serve"));
    assert_all_passed(&client, &server);
}
