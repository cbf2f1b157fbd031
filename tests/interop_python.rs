//! Wire compatibility with the reference, cs.packetstream 20240630, both
//! ways, between processes; the typed record service against the
//! reference's `BaseRequest`; and the claims of the guide `talking_to_python`.
//!
//! The reference runs in a venv that `python/setup-venv.sh` makes in the
//! target directory from the pins of `python/requirements.txt` (its first
//! run needs PyPI). The pairings run a client and a server as child
//! processes: `examples/interop.rs` and `python/interop_peer.py` for the
//! interop service, `examples/typed_service.rs` and
//! `python/typed_service.py` for the typed one. The Python pairings pass
//! their streams through a relay in this process that decodes every packet
//! on its way, which lets the tests check the shutdown order on the wire.
//! The Rust pairings link the two processes by plain pipes. Every child is
//! killed at a deadline, so a hang is a failure.
//!
//! The test has its own harness (`harness = false`, with libtest-mimic):
//! a test that needs the reference but cannot have it, for want of Python
//! 3 with venv or of PyPI, is reported as ignored with the reason, which
//! the standard harness cannot do once a test has started. Under `CI=true`
//! it fails instead.

mod common;

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use common::{ms, report, LIMIT};
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use packetstream::{
    Config, Disconnect, Error, Packet, PacketConnection, PacketKind, Response, CONTROL_CHANNEL,
};

/// What the interop client of either implementation checks: `echo_reverse`
/// for 4 flags × 8 sizes, `echo` for 9 flags, fail, text, flags-only and
/// none, 200 concurrent sleeps and one check for the burst of 5000.
const INTEROP_CHECKS: usize = 4 * 8 + 9 + 4 + 200 + 1;
/// What the typed client of either implementation checks: echo, summarise
/// and store for each of the 7 records, fetch for each, then names, a fetch
/// past the end and a truncated store.
const TYPED_CHECKS: usize = 4 * 7 + 3;
/// What `--foreign-channel` adds: the refusal, and channel 0 still served.
const FOREIGN_CHANNEL_CHECKS: usize = 2;
/// How long a pairing may take before both processes are killed.
const PAIRING_DEADLINE: Duration = Duration::from_secs(120);
/// How long a bad-input run of the Rust server may take.
const BAD_INPUT_DEADLINE: Duration = Duration::from_secs(30);
/// How long a Python child may take to exit once its connection is closed.
const CHILD_DEADLINE: Duration = Duration::from_secs(30);
/// How long the venv's setup or the build of the examples may take.
const SETUP_DEADLINE: Duration = Duration::from_secs(900);
/// How long the relay holds our EOF before passing it on to the reference,
/// so that a reference that ended without waiting for it would be seen gone.
const EOF_HOLD: Duration = Duration::from_millis(100);
/// The relay's limit on one packet.
const RELAY_MAX_PACKET: u64 = 256 << 20;

/// The word service of `python/word_child.py` and `examples/rust_child.rs`.
const UPPER: u64 = 0;
const COUNT: u64 = 1;
/// Request types of the interop service (`python/README.md`).
const ECHO: u64 = 1;
const SLEEP: u64 = 6;

/// Trials named after their functions: `rust` ones need only this crate,
/// `python` ones the reference.
macro_rules! trials {
    ($($kind:ident $test:ident),* $(,)?) => {
        vec![$($kind(stringify!($test), $test)),*]
    };
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let trials = trials![
        rust rust_client_passes_every_check_against_rust_server_over_pipes,
        rust rust_server_ends_with_error_on_garbage,
        rust rust_server_ends_with_error_on_length_over_64_bits,
        rust rust_server_ends_with_error_on_absurd_length,
        rust rust_server_ends_with_error_on_truncated_packet,
        rust guide_shows_the_files_it_names_as_they_are,
        rust typed_rust_client_passes_every_check_against_rust_server_over_pipes,
        python rust_client_passes_every_check_against_reference_server,
        python rust_client_without_extensions_sends_the_base_protocol_only,
        python reference_client_passes_every_check_against_rust_server,
        python reference_refuses_channel_5_with_not_ok_response_and_keeps_serving,
        python reference_encodes_the_committed_vectors,
        python python_child_with_stdout_moved_aside_serves_and_ends_cleanly,
        python naive_python_child_breaks_the_stream_at_shutdown,
        python python_handler_exception_is_failed_with_a_fixed_text,
        python reference_refuses_other_channels_with_a_literal_percent_d,
        python reference_without_handler_refuses_with_no_request_handler,
        python python_reply_of_another_shape_is_never_sent,
        python python_child_killed_mid_request_is_connection_lost,
        python python_parent_with_rust_child_sees_ok_and_not_ok_replies,
        python reference_cannot_send_on_other_channels,
        python python_flags_over_64_bits_end_the_rust_connection,
        python typed_rust_client_passes_every_check_against_reference_server,
        python typed_reference_client_passes_every_check_against_rust_server,
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

fn rust(name: &str, test: fn()) -> Trial {
    Trial::test(name, move || {
        test();
        Ok(())
    })
}

/// A trial that needs the reference: ignored, with the reason, if it
/// cannot be had; failed instead under CI.
fn python(name: &str, test: fn(&Reference)) -> Trial {
    Trial::ignorable_test(name, move || match reference() {
        Ok(reference) => {
            test(reference);
            Ok(Completion::Completed)
        }
        Err(why) if in_ci() => Err(Failed::from(format!(
            "the interop tests must run under CI, but {why}"
        ))),
        Err(why) => Ok(Completion::ignored_with(why)),
    })
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(3000);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Waits for `child` until `deadline`, then kills it. `None` if killed.
fn wait_or_kill(child: &Mutex<Child>, deadline: Instant) -> Option<ExitStatus> {
    loop {
        {
            let mut child = child.lock().unwrap_or_else(PoisonError::into_inner);
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

/// Runs `cmd` to completion with a deadline, returning its status and
/// standard output and error. `None` status if it was killed.
fn run_with_deadline(
    mut cmd: Command,
    deadline: Instant,
) -> io::Result<(Option<ExitStatus>, String, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    let child = Mutex::new(child);
    Ok(thread::scope(|s| {
        let out = s.spawn(move || read_to_end(out));
        let err = s.spawn(move || read_to_end(err));
        let status = wait_or_kill(&child, deadline);
        (status, out.join().unwrap(), err.join().unwrap())
    }))
}

/// Where cargo put this test binary: `<target>/<profile>/deps/`. Returns
/// the target directory, the profile's directory and the profile's name.
fn build_dirs() -> Result<(PathBuf, PathBuf, String), String> {
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
    Ok((
        target_dir.to_path_buf(),
        profile_dir.to_path_buf(),
        profile.to_string(),
    ))
}

/// The examples the tests run, built with the profile of this test.
struct Examples {
    interop: PathBuf,
    rust_child: PathBuf,
    typed_service: PathBuf,
}

/// Builds the examples once.
///
/// Cargo makes no example binary available to integration tests (there is no
/// `CARGO_BIN_EXE_` for examples), and `cargo test --test interop_python`
/// does not build examples at all. So the test runs `cargo build --example`
/// itself, for the profile and target directory this test binary lives in:
/// that is quick when the examples are up to date, always tests the current
/// source, and cargo allows it while tests run.
fn examples() -> &'static Examples {
    static EXAMPLES: OnceLock<Result<Examples, String>> = OnceLock::new();
    let res = EXAMPLES.get_or_init(|| {
        let (target_dir, profile_dir, profile) = build_dirs()?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .args(["--example", "interop", "--example", "rust_child"])
            .args(["--example", "typed_service"])
            .args(["--profile", &profile])
            .arg("--manifest-path")
            .arg(manifest_dir().join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir);
        let (status, _, stderr) = run_with_deadline(cmd, Instant::now() + SETUP_DEADLINE)
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.is_some_and(|s| s.success()) {
            return Err(format!(
                "cargo build of the examples failed ({status:?}):\n{}",
                tail(&stderr)
            ));
        }
        let binary = |name: &str| {
            let binary = profile_dir.join("examples").join(name);
            match binary.is_file() {
                true => Ok(binary),
                false => Err(format!("no example binary at {}", binary.display())),
            }
        };
        Ok(Examples {
            interop: binary("interop")?,
            rust_child: binary("rust_child")?,
            typed_service: binary("typed_service")?,
        })
    });
    match res {
        Ok(examples) => examples,
        Err(e) => panic!("{e}"),
    }
}

/// Runs `example`, a binary of [`examples`], with `args`.
fn rust_command(example: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(example);
    cmd.args(args);
    cmd
}

/// The python of the venv that holds the reference.
struct Reference {
    python: PathBuf,
}

impl Reference {
    /// Runs `script` of the `python/` folder with `args`.
    fn script(&self, script: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(manifest_dir().join("python").join(script))
            .args(args)
            // The peers exit with status 3 after this; the deadlines are later.
            .env("PEER_TIMEOUT", "100");
        cmd
    }
}

/// Makes the venv with `python/setup-venv.sh`, or finds it made. The error
/// says in one line why it cannot be had.
fn make_venv() -> Result<Reference, String> {
    let (target_dir, _, _) = build_dirs()?;
    let setup = manifest_dir().join("python/setup-venv.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&setup).arg(target_dir.join("python-venv"));
    let started = Instant::now();
    let (status, stdout, stderr) = run_with_deadline(cmd, Instant::now() + SETUP_DEADLINE)
        .map_err(|e| format!("cannot run bash: {e}"))?;
    if !status.is_some_and(|s| s.success()) {
        report(format!(
            "python/setup-venv.sh failed ({status:?}):\n{}",
            tail(&stderr)
        ));
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        return Err(format!(
            "python/setup-venv.sh failed: {}",
            last.unwrap_or("no message").trim()
        ));
    }
    let python = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    if !python.is_file() {
        return Err(format!(
            "python/setup-venv.sh printed no python: {stdout:?}"
        ));
    }
    report(format!(
        "the reference's venv is ready, in {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        python.display()
    ));
    Ok(Reference { python })
}

/// The reference, made ready once for all the tests.
fn reference() -> Result<&'static Reference, String> {
    static REFERENCE: OnceLock<Result<Reference, String>> = OnceLock::new();
    REFERENCE
        .get_or_init(make_venv)
        .as_ref()
        .map_err(Clone::clone)
}

/// A direction on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    ToServer,
    ToClient,
}

/// A packet as the relay saw it pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Request { channel: u64 },
    Response { channel: u64, ok: bool },
    Erq,
    Eof,
    OtherControl,
}

impl Seen {
    fn of(packet: &Packet) -> Seen {
        if packet.is_eof() {
            return Seen::Eof;
        }
        if packet.is_erq() {
            return Seen::Erq;
        }
        match packet.kind {
            PacketKind::Request { .. } => Seen::Request {
                channel: packet.channel,
            },
            PacketKind::Response { ok, .. } => Seen::Response {
                channel: packet.channel,
                ok,
            },
            PacketKind::Control { .. } => Seen::OtherControl,
        }
    }
}

/// What the relay saw, in the order it saw it across both directions.
#[derive(Default)]
struct WireLog {
    events: Vec<(Dir, Seen)>,
    errors: Vec<String>,
    /// For each EOF of ours: was the reference still running after the hold?
    reference_alive_at_our_eof: Vec<bool>,
}

/// Copies `src` to `dst`, recording every packet before passing on the
/// bytes that complete it, so that the log's order is causal: a packet sent
/// in answer to another is always logged after it. `at_eof` runs when an
/// EOF packet is seen, before it is passed on. Closes `dst` when `src` ends.
fn relay(
    mut src: impl Read,
    mut dst: ChildStdin,
    dir: Dir,
    log: &Mutex<WireLog>,
    at_eof: impl Fn(),
) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut decoding = true;
    loop {
        let n = match src.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log.lock()
                    .unwrap()
                    .errors
                    .push(format!("{dir:?}: read: {e}"));
                break;
            }
        };
        if decoding {
            buf.extend_from_slice(&chunk[..n]);
            let mut used = 0;
            loop {
                match Packet::decode(&buf[used..], RELAY_MAX_PACKET) {
                    Ok(Some((packet, len))) => {
                        used += len;
                        let seen = Seen::of(&packet);
                        log.lock().unwrap().events.push((dir, seen));
                        if seen == Seen::Eof {
                            at_eof();
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let mut log = log.lock().unwrap();
                        log.errors.push(format!("{dir:?}: undecodable bytes: {e}"));
                        decoding = false;
                        break;
                    }
                }
            }
            buf.drain(..used);
        }
        if let Err(e) = dst.write_all(&chunk[..n]) {
            log.lock()
                .unwrap()
                .errors
                .push(format!("{dir:?}: write: {e}"));
            break;
        }
    }
    if decoding && !buf.is_empty() {
        let mut log = log.lock().unwrap();
        log.errors.push(format!(
            "{dir:?}: stream ended inside a packet ({} bytes)",
            buf.len()
        ));
    }
}

/// One side of a pairing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// How the two processes of a pairing are linked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// Through the relay; the reference is on the given side.
    Relay { reference: Side },
    /// By two pipes, with nothing in between.
    Pipes,
}

struct Ended {
    /// `None` if the process was killed at the deadline.
    status: Option<ExitStatus>,
    stderr: String,
}

struct PairingRun {
    client: Ended,
    server: Ended,
    wire: WireLog,
    elapsed: Duration,
}

fn spawn(mut cmd: Command, partner: Option<&mut Child>) -> Child {
    match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            if let Some(partner) = partner {
                let _ = partner.kill();
                let _ = partner.wait();
            }
            panic!("cannot start {cmd:?}: {e}");
        }
    }
}

fn read_to_end(mut r: impl Read) -> String {
    let mut bytes = Vec::new();
    let _ = r.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs a client and a server process against each other until both exit.
/// Both are killed at the deadline; once one has exited, the other gets
/// a little while more.
fn run_pairing(mut client: Command, mut server: Command, link: Link) -> PairingRun {
    let started = Instant::now();
    client.stderr(Stdio::piped());
    server.stderr(Stdio::piped());
    match link {
        Link::Pipes => {
            let (to_server_r, to_server_w) = io::pipe().expect("pipe");
            let (to_client_r, to_client_w) = io::pipe().expect("pipe");
            client.stdin(to_client_r).stdout(to_server_w);
            server.stdin(to_server_r).stdout(to_client_w);
        }
        Link::Relay { .. } => {
            for cmd in [&mut client, &mut server] {
                cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
            }
        }
    }
    // `spawn` consumes each command: dropping it closes this process's
    // copies of the pipe ends it was given, so the children alone hold them.
    let mut client = spawn(client, None);
    let mut server = spawn(server, Some(&mut client));
    let client_err = client.stderr.take().expect("piped stderr");
    let server_err = server.stderr.take().expect("piped stderr");
    let relay_ends = match link {
        Link::Relay { reference } => Some((
            reference,
            client.stdout.take().expect("piped stdout"),
            server.stdin.take().expect("piped stdin"),
            server.stdout.take().expect("piped stdout"),
            client.stdin.take().expect("piped stdin"),
        )),
        Link::Pipes => None,
    };
    let (client, server) = (Mutex::new(client), Mutex::new(server));
    let wire = Mutex::new(WireLog::default());
    let deadline = started + PAIRING_DEADLINE;
    let (client_status, server_status, client_stderr, server_stderr) = thread::scope(|s| {
        let client_err = s.spawn(|| read_to_end(client_err));
        let server_err = s.spawn(|| read_to_end(server_err));
        if let Some((reference, client_out, server_in, server_out, client_in)) = relay_ends {
            let reference_child = match reference {
                Side::Client => &client,
                Side::Server => &server,
            };
            let wire = &wire;
            // Our EOF is on its way to the reference: it must not have
            // finished before it arrives.
            let check_reference_alive = move || {
                thread::sleep(EOF_HOLD);
                let mut child = reference_child.lock().unwrap();
                let alive = child.try_wait().expect("try_wait").is_none();
                drop(child);
                wire.lock().unwrap().reference_alive_at_our_eof.push(alive);
            };
            s.spawn(move || {
                relay(client_out, server_in, Dir::ToServer, wire, || {
                    if reference == Side::Server {
                        check_reference_alive();
                    }
                })
            });
            s.spawn(move || {
                relay(server_out, client_in, Dir::ToClient, wire, || {
                    if reference == Side::Client {
                        check_reference_alive();
                    }
                })
            });
        }
        let client_status = wait_or_kill(&client, deadline);
        let server_status = wait_or_kill(&server, deadline.min(Instant::now() + ms(30_000)));
        (
            client_status,
            server_status,
            client_err.join().unwrap(),
            server_err.join().unwrap(),
        )
    });
    PairingRun {
        client: Ended {
            status: client_status,
            stderr: client_stderr,
        },
        server: Ended {
            status: server_status,
            stderr: server_stderr,
        },
        wire: wire.into_inner().unwrap(),
        elapsed: started.elapsed(),
    }
}

/// The counts of the client's closing line, `SERVICE: N passed, M failed`,
/// the last line that starts with `SERVICE: `.
fn closing_line(stderr: &str, service: &str) -> Option<(usize, usize)> {
    let prefix = format!("{service}: ");
    let line = stderr.lines().rev().find(|l| l.starts_with(&prefix))?;
    let words: Vec<&str> = line[prefix.len()..].split_whitespace().collect();
    match words.as_slice() {
        [passed, "passed,", failed, "failed"] => Some((passed.parse().ok()?, failed.parse().ok()?)),
        _ => None,
    }
}

/// Both processes exited 0 in time, and the client of `service` (`interop`
/// or `typed`) passed `n_checks` checks and failed none.
fn assert_pairing_passed(name: &str, run: &PairingRun, service: &str, n_checks: usize) {
    let both = format!(
        "client stderr:\n{}\nserver stderr:\n{}",
        tail(&run.client.stderr),
        tail(&run.server.stderr)
    );
    assert!(
        run.client.status.is_some() && run.server.status.is_some(),
        "{name}: killed at the deadline ({:?}, {:?})\n{both}",
        run.client.status,
        run.server.status
    );
    assert!(
        run.client.status.is_some_and(|s| s.success()),
        "{name}: client exited with {:?}\n{both}",
        run.client.status
    );
    assert!(
        run.server.status.is_some_and(|s| s.success()),
        "{name}: server exited with {:?}\n{both}",
        run.server.status
    );
    assert_eq!(
        closing_line(&run.client.stderr, service),
        Some((n_checks, 0)),
        "{name}: client's closing line\n{both}"
    );
    assert!(run.wire.errors.is_empty(), "{name}: {:?}", run.wire.errors);
    report(format!(
        "{name}: {n_checks} checks passed, both exited 0, in {:.2}s",
        run.elapsed.as_secs_f64()
    ));
}

/// What the Rust side of a pairing wrote at its end about the extensions:
/// the peer's answer to its hello (`yes`, `no` or `unknown`), and how many
/// log records above debug level the library made.
fn extensions_report(stderr: &str, who: &str) -> (String, usize) {
    let field = |name: &str| {
        let prefix = format!("interop {who}: {name}: ");
        stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no '{prefix}' line in:\n{}", tail(stderr)))
            .to_string()
    };
    let logged = field("records logged above debug");
    (field("peer extensions"), logged.parse().expect("a count"))
}

/// The Rust side, `who` on `dir`'s sending end, had extensions on and
/// faced the reference: it sent one hello on the control channel, the
/// reference refused it with a not-ok response and sent nothing else
/// there, and the Rust side took that as "no extensions", logging nothing
/// above debug.
fn assert_hello_refused_and_ignored(run: &PairingRun, who: &str, dir: Dir) {
    let stderr = match who {
        "client" => &run.client.stderr,
        _ => &run.server.stderr,
    };
    assert_eq!(
        extensions_report(stderr, who),
        ("no".to_string(), 0),
        "{who}: {}",
        tail(stderr)
    );
    let back = match dir {
        Dir::ToServer => Dir::ToClient,
        Dir::ToClient => Dir::ToServer,
    };
    let on_control = |dir: Dir| -> Vec<Seen> {
        packets(&run.wire, dir)
            .into_iter()
            .filter(|s| match s {
                Seen::Request { channel } | Seen::Response { channel, .. } => {
                    *channel == CONTROL_CHANNEL
                }
                _ => false,
            })
            .collect()
    };
    assert_eq!(
        on_control(dir),
        [Seen::Request {
            channel: CONTROL_CHANNEL
        }],
        "one hello from the Rust {who}"
    );
    assert_eq!(
        on_control(back),
        [Seen::Response {
            channel: CONTROL_CHANNEL,
            ok: false
        }],
        "the reference's refusal, and nothing else on the control channel"
    );
}

/// What one direction of the wire carried, in order.
fn packets(wire: &WireLog, dir: Dir) -> Vec<Seen> {
    wire.events
        .iter()
        .filter(|(d, _)| *d == dir)
        .map(|(_, seen)| *seen)
        .collect()
}

fn position(wire: &WireLog, want: (Dir, Seen)) -> usize {
    let found = wire.events.iter().position(|event| *event == want);
    found.unwrap_or_else(|| panic!("no {want:?} on the wire"))
}

/// Each direction ends with ERQ, then EOF, each sent once with nothing
/// after; the reference was still running when our EOF reached it; and the
/// two EOFs passed in the order the shutdown requires: the client's first.
fn assert_shutdown_order(wire: &WireLog) {
    for dir in [Dir::ToServer, Dir::ToClient] {
        let sent = packets(wire, dir);
        let n_eof = sent.iter().filter(|s| **s == Seen::Eof).count();
        let n_erq = sent.iter().filter(|s| **s == Seen::Erq).count();
        assert_eq!((n_erq, n_eof), (1, 1), "{dir:?}: ERQ and EOF counts");
        assert_eq!(sent.last(), Some(&Seen::Eof), "{dir:?}: EOF is last");
        let erq_idx = sent.iter().position(|s| *s == Seen::Erq).unwrap();
        let requests_after_erq = sent[erq_idx..]
            .iter()
            .filter(|s| matches!(s, Seen::Request { .. }))
            .count();
        assert_eq!(requests_after_erq, 0, "{dir:?}: requests after ERQ");
        assert!(!sent.contains(&Seen::OtherControl), "{dir:?}: bad control");
    }
    assert_eq!(
        wire.reference_alive_at_our_eof,
        [true],
        "the reference must still run when our EOF reaches it"
    );
    // The reference server sends its EOF only after ours: had our client
    // waited for it first, neither would have ended. The reference client
    // sends its EOF first, and our server answers with its own.
    assert!(
        position(wire, (Dir::ToServer, Seen::Eof)) < position(wire, (Dir::ToClient, Seen::Eof)),
        "the client's EOF must pass before the server's"
    );
}

fn rust_client_passes_every_check_against_reference_server(reference: &Reference) {
    let run = run_pairing(
        rust_command(&examples().interop, &["client"]),
        reference.script("interop_peer.py", &["serve"]),
        Link::Relay {
            reference: Side::Server,
        },
    );
    assert_pairing_passed(
        "rust client vs interop_peer.py serve",
        &run,
        "interop",
        INTEROP_CHECKS,
    );
    assert_shutdown_order(&run.wire);
    assert_hello_refused_and_ignored(&run, "client", Dir::ToServer);
}

fn rust_client_without_extensions_sends_the_base_protocol_only(reference: &Reference) {
    let run = run_pairing(
        rust_command(&examples().interop, &["client", "--no-extensions"]),
        reference.script("interop_peer.py", &["serve"]),
        Link::Relay {
            reference: Side::Server,
        },
    );
    assert_pairing_passed(
        "rust client without extensions vs interop_peer.py serve",
        &run,
        "interop",
        INTEROP_CHECKS,
    );
    assert_shutdown_order(&run.wire);
    assert_eq!(
        extensions_report(&run.client.stderr, "client"),
        ("no".to_string(), 0)
    );
    let off_channel_0 = run
        .wire
        .events
        .iter()
        .filter(|(_, seen)| match seen {
            Seen::Request { channel } | Seen::Response { channel, .. } => *channel != 0,
            _ => false,
        })
        .count();
    assert_eq!(off_channel_0, 0, "packets on channels other than 0");
}

fn reference_client_passes_every_check_against_rust_server(reference: &Reference) {
    let run = run_pairing(
        reference.script("interop_peer.py", &["client"]),
        rust_command(&examples().interop, &["serve"]),
        Link::Relay {
            reference: Side::Client,
        },
    );
    assert_pairing_passed(
        "interop_peer.py client vs rust serve",
        &run,
        "interop",
        INTEROP_CHECKS,
    );
    assert_shutdown_order(&run.wire);
    assert_hello_refused_and_ignored(&run, "serve", Dir::ToClient);
}

fn rust_client_passes_every_check_against_rust_server_over_pipes() {
    let run = run_pairing(
        rust_command(&examples().interop, &["client"]),
        rust_command(&examples().interop, &["serve"]),
        Link::Pipes,
    );
    assert_pairing_passed("rust client vs rust serve", &run, "interop", INTEROP_CHECKS);
    for who in ["client", "serve"] {
        let stderr = match who {
            "client" => &run.client.stderr,
            _ => &run.server.stderr,
        };
        assert_eq!(
            extensions_report(stderr, who),
            ("yes".to_string(), 0),
            "{who}: {}",
            tail(stderr)
        );
    }
}

fn reference_refuses_channel_5_with_not_ok_response_and_keeps_serving(reference: &Reference) {
    let run = run_pairing(
        rust_command(&examples().interop, &["client", "--foreign-channel", "5"]),
        reference.script("interop_peer.py", &["serve"]),
        Link::Relay {
            reference: Side::Server,
        },
    );
    assert_pairing_passed(
        "rust client on channel 5 vs interop_peer.py serve",
        &run,
        "interop",
        INTEROP_CHECKS + FOREIGN_CHANNEL_CHECKS,
    );
    let to_server = packets(&run.wire, Dir::ToServer);
    let to_client = packets(&run.wire, Dir::ToClient);
    assert_eq!(
        to_server
            .iter()
            .filter(|s| **s == Seen::Request { channel: 5 })
            .count(),
        1
    );
    // The refusal is an ordinary not-ok response on channel 5.
    assert_eq!(
        to_client
            .iter()
            .filter(|s| matches!(s, Seen::Response { channel: 5, .. }))
            .collect::<Vec<_>>(),
        [&Seen::Response {
            channel: 5,
            ok: false
        }]
    );
    assert_shutdown_order(&run.wire);
}

// The typed record service, written with `RequestType` in
// `examples/typed_service.rs` and with the reference's `BaseRequest` over
// `BinaryMultiValue` in `python/typed_service.py`.

fn typed_rust_client_passes_every_check_against_reference_server(reference: &Reference) {
    let run = run_pairing(
        rust_command(&examples().typed_service, &["client"]),
        reference.script("typed_service.py", &["serve"]),
        Link::Relay {
            reference: Side::Server,
        },
    );
    assert_pairing_passed(
        "typed_service client vs typed_service.py serve",
        &run,
        "typed",
        TYPED_CHECKS,
    );
    // Every STORE reached the reference's own BaseRequest classes.
    assert!(
        run.server
            .stderr
            .contains("serve: clean shutdown, 7 records stored"),
        "server stderr:\n{}",
        tail(&run.server.stderr)
    );
    assert_shutdown_order(&run.wire);
}

fn typed_reference_client_passes_every_check_against_rust_server(reference: &Reference) {
    let run = run_pairing(
        reference.script("typed_service.py", &["client"]),
        rust_command(&examples().typed_service, &["serve"]),
        Link::Relay {
            reference: Side::Client,
        },
    );
    assert_pairing_passed(
        "typed_service.py client vs typed_service serve",
        &run,
        "typed",
        TYPED_CHECKS,
    );
    assert!(
        run.server
            .stderr
            .contains(&format!("clean shutdown after {TYPED_CHECKS} requests")),
        "server stderr:\n{}",
        tail(&run.server.stderr)
    );
    assert_shutdown_order(&run.wire);
}

fn typed_rust_client_passes_every_check_against_rust_server_over_pipes() {
    let run = run_pairing(
        rust_command(&examples().typed_service, &["client"]),
        rust_command(&examples().typed_service, &["serve"]),
        Link::Pipes,
    );
    assert_pairing_passed(
        "typed_service client vs typed_service serve",
        &run,
        "typed",
        TYPED_CHECKS,
    );
}

/// A valid ECHO request, then `bad`.
fn echo_then(bad: &[u8]) -> Vec<u8> {
    let echo = Packet {
        channel: 0,
        tag: 2,
        kind: PacketKind::Request {
            rq_type: 1,
            flags: 7,
        },
        payload: b"ping".to_vec(),
    };
    let mut input = Vec::new();
    echo.encode_into(&mut input);
    input.extend_from_slice(bad);
    input
}

/// Feeds `input` to the Rust server and expects it to end by itself, with
/// `reason` in a clear error on stderr, a non-zero exit and no panic, after
/// answering the request that came before the bad bytes and sending EOF.
/// Standard input is closed after `input` only if `close_stdin`: a server
/// that needs the stream to end before it notices bad bytes is then killed
/// at the deadline, and the test fails.
fn assert_bad_input_ends_server(input: &[u8], close_stdin: bool, reason: &str) {
    let mut cmd = rust_command(&examples().interop, &["serve"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(cmd, None);
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let child = Mutex::new(child);
    let (status, sent, stderr) = thread::scope(|s| {
        let sent = s.spawn(|| {
            let mut bytes = Vec::new();
            let _ = { stdout }.read_to_end(&mut bytes);
            bytes
        });
        let stderr = s.spawn(|| read_to_end(stderr));
        // The input is small enough for the pipe's buffer.
        stdin.write_all(input).expect("write to server");
        let stdin = if close_stdin {
            drop(stdin);
            None
        } else {
            Some(stdin)
        };
        let status = wait_or_kill(&child, Instant::now() + BAD_INPUT_DEADLINE);
        drop(stdin);
        (status, sent.join().unwrap(), stderr.join().unwrap())
    });
    assert!(status.is_some(), "server did not end by itself:\n{stderr}");
    assert!(
        status.is_some_and(|s| !s.success()),
        "server exited with {status:?}"
    );
    assert!(
        stderr.contains("interop serve: error") && stderr.contains(reason),
        "no clear error saying {reason:?}:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "server panicked:\n{stderr}");
    let mut rest = sent.as_slice();
    let mut replies = Vec::new();
    while let Some((packet, len)) = Packet::decode(rest, RELAY_MAX_PACKET).expect("server output") {
        replies.push(packet);
        rest = &rest[len..];
    }
    assert!(rest.is_empty(), "server output ends inside a packet");
    let answered = replies.iter().any(|packet| {
        packet.tag == 2
            && packet.kind == (PacketKind::Response { ok: true, flags: 7 })
            && packet.payload == b"ping"
    });
    assert!(answered, "the request before the bad bytes went unanswered");
    assert!(
        replies.last().is_some_and(Packet::is_eof),
        "server did not end with EOF: {replies:?}"
    );
}

fn rust_server_ends_with_error_on_garbage() {
    assert_bad_input_ends_server(
        &echo_then(&[0xff; 11]),
        false,
        "malformed packet: varint longer than 10 bytes",
    );
}

fn rust_server_ends_with_error_on_length_over_64_bits() {
    assert_bad_input_ends_server(
        &echo_then(&common::bsuint(1 << 65)),
        false,
        "malformed packet: packet length exceeds 64 bits",
    );
}

fn rust_server_ends_with_error_on_absurd_length() {
    let len = 1u64 << 62;
    assert_bad_input_ends_server(
        &echo_then(&common::bsuint(len.into())),
        true,
        &format!("packet of {len} bytes exceeds limit of"),
    );
}

fn rust_server_ends_with_error_on_truncated_packet() {
    let mut cut = Vec::new();
    Packet {
        channel: 0,
        tag: 3,
        kind: PacketKind::Request {
            rq_type: 1,
            flags: 0,
        },
        payload: vec![b'x'; 100],
    }
    .encode_into(&mut cut);
    cut.truncate(40);
    assert_bad_input_ends_server(
        &echo_then(&cut),
        true,
        "malformed packet: stream ended inside a packet",
    );
}

// The claims of the guide `talking_to_python` (PYTHON.md).

/// A Python script of the `python/` folder run as a child process, with a
/// connection over its pipes. Its standard error is collected; dropping it
/// kills the child.
struct PythonChild {
    child: Mutex<Child>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl PythonChild {
    fn start(
        reference: &Reference,
        script: &str,
        args: &[&str],
    ) -> (PythonChild, PacketConnection) {
        let mut cmd = reference.script(script, args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn(cmd, None);
        let stderr = child.stderr.take().expect("piped stderr");
        let stderr = thread::spawn(move || read_to_end(stderr));
        // Made first, so that the child is killed should the connection fail.
        let child = PythonChild {
            child: Mutex::new(child),
            stderr: Some(stderr),
        };
        let conn = {
            let mut process = child.child.lock().unwrap();
            PacketConnection::from_child(&mut process, Config::default().name("parent"))
                .expect("connection over the child's pipes")
        };
        (child, conn)
    }

    fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        child.kill().expect("kill the child");
        // Bounded: the child was just sent SIGKILL.
        child.wait().expect("wait for the killed child");
    }

    /// Waits for the child to exit, killing it at the deadline: its status
    /// (`None` if killed) and its standard error.
    fn finish(mut self) -> (Option<ExitStatus>, String) {
        let status = wait_or_kill(&self.child, Instant::now() + CHILD_DEADLINE);
        let stderr = self.stderr.take().expect("not finished yet");
        (status, stderr.join().expect("stderr reader"))
    }
}

impl Drop for PythonChild {
    fn drop(&mut self) {
        if let Some(stderr) = self.stderr.take() {
            let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = child.kill();
            let _ = child.wait();
            drop(child);
            let _ = stderr.join();
        }
    }
}

fn call(
    conn: &PacketConnection,
    rq_type: u64,
    flags: u64,
    payload: &[u8],
) -> Result<Response, Error> {
    conn.submit(rq_type, flags, payload)?.wait_timeout(LIMIT)
}

/// The not-ok reply of a failed call: its channel, flags and payload.
fn failure(res: Result<Response, Error>) -> (u64, u64, String) {
    match res {
        Err(Error::Failed {
            channel,
            flags,
            payload,
            ..
        }) => (
            channel,
            flags,
            String::from_utf8_lossy(&payload).into_owned(),
        ),
        other => panic!("expected a not-ok reply, got {other:?}"),
    }
}

/// Closes the connection and expects the child to exit 0: its stderr.
fn close_cleanly(conn: PacketConnection, child: PythonChild) -> String {
    let closed = conn.close_timeout(LIMIT);
    let (status, stderr) = child.finish();
    assert!(
        closed.is_ok(),
        "close: {closed:?}\nchild stderr:\n{}",
        tail(&stderr)
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "child exited with {status:?}\n{}",
        tail(&stderr)
    );
    stderr
}

fn python_child_with_stdout_moved_aside_serves_and_ends_cleanly(reference: &Reference) {
    let (child, conn) = PythonChild::start(reference, "word_child.py", &[]);
    let rsp = call(&conn, UPPER, 0, b"hello from rust").unwrap();
    assert_eq!(
        (rsp.flags, rsp.payload.as_slice()),
        (0, &b"HELLO FROM RUST"[..])
    );
    let rsp = call(&conn, COUNT, 0, b"one two three").unwrap();
    assert_eq!((rsp.flags, rsp.payload.len()), (3, 0));
    let stderr = close_cleanly(conn, child);
    // The reference printed its progress lines, to standard error.
    assert!(
        stderr.contains("PacketConnection[wordsvc]: rq in:"),
        "no progress line on the child's stderr:\n{}",
        tail(&stderr)
    );
}

fn naive_python_child_breaks_the_stream_at_shutdown(reference: &Reference) {
    let (child, conn) = PythonChild::start(reference, "naive_child.py", &[]);
    // It serves well until it shuts down.
    let rsp = call(&conn, UPPER, 0, b"hello").unwrap();
    assert_eq!(rsp.payload, b"HELLO");
    let closed = conn.close_timeout(LIMIT);
    let (_, stderr) = child.finish();
    match closed {
        Err(Error::Malformed { reason }) => {
            report(format!("naive child: malformed packet: {reason}"))
        }
        other => panic!(
            "expected the stream to break, got {other:?}\nchild stderr:\n{}",
            tail(&stderr)
        ),
    }
}

fn python_handler_exception_is_failed_with_a_fixed_text(reference: &Reference) {
    let (child, conn) = PythonChild::start(reference, "word_child.py", &[]);
    let (channel, flags, reason) = failure(call(&conn, UPPER, 0, b"\xff"));
    assert_eq!(
        (channel, flags, reason.as_str()),
        (0, 0, "exception during handler")
    );
    // Other request types raise too, with the same reply.
    let (_, flags, reason) = failure(call(&conn, 7, 0, b""));
    assert_eq!((flags, reason.as_str()), (0, "exception during handler"));
    let stderr = close_cleanly(conn, child);
    // The exception itself went to the child's standard error.
    assert!(stderr.contains("UnicodeDecodeError"), "{}", tail(&stderr));
    assert!(
        stderr.contains("unknown request type 7"),
        "{}",
        tail(&stderr)
    );
}

fn reference_refuses_other_channels_with_a_literal_percent_d(reference: &Reference) {
    let (child, conn) = PythonChild::start(reference, "word_child.py", &[]);
    let res = conn
        .submit_on(5, UPPER, 0, b"hello")
        .and_then(|pending| pending.wait_timeout(LIMIT));
    let (channel, flags, reason) = failure(res);
    assert_eq!(
        (channel, flags, reason.as_str()),
        (5, 0, "unknown channel %d")
    );
    // The connection goes on.
    assert_eq!(call(&conn, UPPER, 0, b"still").unwrap().payload, b"STILL");
    close_cleanly(conn, child);
}

fn reference_without_handler_refuses_with_no_request_handler(reference: &Reference) {
    let (child, conn) = PythonChild::start(reference, "quirks_peer.py", &["no-handler"]);
    let (channel, flags, reason) = failure(call(&conn, ECHO, 9, b"x"));
    assert_eq!(
        (channel, flags, reason.as_str()),
        (0, 0, "no request handler")
    );
    close_cleanly(conn, child);
}

fn python_reply_of_another_shape_is_never_sent(reference: &Reference) {
    let (child, conn) = PythonChild::start(reference, "quirks_peer.py", &["bad-reply"]);
    // The handler returns (flags, str) for rq_type 0.
    let unanswered = conn.submit(0, 7, b"text").unwrap();
    // A request sent after it is answered...
    let rsp = call(&conn, ECHO, 9, b"fine").unwrap();
    assert_eq!((rsp.flags, rsp.payload.as_slice()), (9, &b"fine"[..]));
    let stderr = close_cleanly(conn, child);
    // ...but that one never was: the child finished without answering it.
    let res = unanswered.wait_timeout(LIMIT);
    assert!(
        matches!(res, Err(Error::ConnectionLost(Disconnect::PeerEof))),
        "got {res:?}"
    );
    assert!(stderr.contains("AssertionError"), "{}", tail(&stderr));
}

fn python_child_killed_mid_request_is_connection_lost(reference: &Reference) {
    let (child, conn) = PythonChild::start(reference, "interop_peer.py", &["serve"]);
    let slow = conn.submit(SLEEP, 0, b"20000").unwrap();
    assert_eq!(call(&conn, ECHO, 1, b"up").unwrap().payload, b"up");
    child.kill();
    let res = slow.wait_timeout(LIMIT);
    assert!(
        matches!(res, Err(Error::ConnectionLost(Disconnect::StreamEnded))),
        "got {res:?}"
    );
    // A crash, not an orderly end, whatever this end's own writes met.
    let closed = conn.close_timeout(LIMIT);
    assert!(
        matches!(closed, Err(Error::ConnectionLost(Disconnect::StreamEnded))),
        "close: {closed:?}"
    );
}

fn python_parent_with_rust_child_sees_ok_and_not_ok_replies(reference: &Reference) {
    let mut cmd = reference.script("rust_parent.py", &[]);
    cmd.arg(&examples().rust_child);
    let (status, stdout, stderr) =
        run_with_deadline(cmd, Instant::now() + CHILD_DEADLINE).expect("run rust_parent.py");
    assert!(
        status.is_some_and(|s| s.success()),
        "rust_parent.py exited with {status:?}\nstdout:\n{stdout}\nstderr:\n{}",
        tail(&stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        "UPPER: HELLO FROM PYTHON",
        "COUNT: 3",
        // A Rust handler's error: flags 0 and its text.
        "invalid UTF-8: (False, 0, b'invalid utf-8 sequence of 1 bytes from index 0')",
        // A Rust handler's Failure: its own flags and payload.
        "type 7: (False, 404, b'unknown request type 7')",
        "child: exit status 0",
    ] {
        assert!(lines.contains(&want), "no line {want:?} in:\n{stdout}");
    }
}

fn reference_cannot_send_on_other_channels(reference: &Reference) {
    let run = run_pairing(
        reference.script("quirks_peer.py", &["other-channel"]),
        rust_command(&examples().interop, &["serve"]),
        Link::Pipes,
    );
    let stderr = &run.client.stderr;
    for status in [run.client.status, run.server.status] {
        assert!(
            status.is_some_and(|s| s.success()),
            "exited with {status:?}\n{stderr}"
        );
    }
    for want in [
        "other-channel: channel 5 gives ValueError: unknown channel 5",
        "other-channel: channel 0 gives (True, 7, b'x')",
    ] {
        assert!(stderr.contains(want), "no {want:?} in:\n{}", tail(stderr));
    }
    // Nothing went out for channel 5: the server saw the one request.
    assert!(
        run.server
            .stderr
            .contains("interop serve: clean shutdown after 1 requests"),
        "{}",
        run.server.stderr
    );
}

fn python_flags_over_64_bits_end_the_rust_connection(reference: &Reference) {
    let run = run_pairing(
        reference.script("quirks_peer.py", &["wide-flags"]),
        rust_command(&examples().interop, &["serve"]),
        Link::Pipes,
    );
    let (client, server) = (&run.client, &run.server);
    assert!(
        server.status.is_some_and(|s| !s.success()),
        "server exited with {:?}\n{}",
        server.status,
        server.stderr
    );
    assert!(
        server
            .stderr
            .contains("malformed packet: request flags exceed 64 bits"),
        "{}",
        server.stderr
    );
    // The reference cancels its request, but a caller already waiting for
    // it is never woken; a new wait raises.
    assert!(
        client.status.is_some_and(|s| s.success()),
        "{}",
        tail(&client.stderr)
    );
    for want in [
        "wide-flags: cancelled=True waiter_blocked=True",
        "wide-flags: a new wait gives CancellationError",
    ] {
        assert!(
            client.stderr.contains(want),
            "no {want:?} in:\n{}",
            tail(&client.stderr)
        );
    }
}

fn reference_encodes_the_committed_vectors(reference: &Reference) {
    let cmd = reference.script("interop_peer.py", &["vectors"]);
    let (status, stdout, stderr) =
        run_with_deadline(cmd, Instant::now() + CHILD_DEADLINE).expect("run interop_peer.py");
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        tail(&stderr)
    );
    let made: serde_json::Value = serde_json::from_str(&stdout).expect("JSON from the peer");
    let committed =
        std::fs::read_to_string(manifest_dir().join("tests/data/vectors.json")).unwrap();
    let committed: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(made.as_array().map(Vec::len), Some(900));
    assert!(
        made == committed,
        "tests/data/vectors.json differs from what the reference encodes"
    );
}

/// The guide shows whole files, each after a line `<!-- file: PATH -->`:
/// each must be the file as it is.
fn guide_shows_the_files_it_names_as_they_are() {
    let guide = std::fs::read_to_string(manifest_dir().join("PYTHON.md")).unwrap();
    let mut lines = guide.lines();
    let mut shown = Vec::new();
    while let Some(line) = lines.next() {
        let Some(path) = line
            .strip_prefix("<!-- file: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "no code block after the mark for {path}"
        );
        let mut block = String::new();
        for line in lines.by_ref().take_while(|l| *l != "```") {
            block.push_str(line);
            block.push('\n');
        }
        let file = std::fs::read_to_string(manifest_dir().join(path)).unwrap();
        assert!(block == file, "PYTHON.md shows {path} otherwise than it is");
        shown.push(path);
    }
    for path in [
        "python/word_child.py",
        "python/rust_parent.py",
        "examples/python_child.rs",
        "examples/rust_child.rs",
    ] {
        assert!(
            shown.contains(&path),
            "PYTHON.md does not show {path}: {shown:?}"
        );
    }
}
