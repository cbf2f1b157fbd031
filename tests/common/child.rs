//! The child-process fixture: a copy of the test binary that plays the far
//! end of a connection over its standard input and output, in one of a few
//! [`Mode`]s. Tests start it with [`spawn`] or [`connect`], never an
//! example, so that the examples can change without breaking the tests.
//!
//! A test binary that starts children invokes [`child_fixture!`] once: it
//! makes the test that the copy runs. In a normal run that test checks the
//! fixture itself.

use std::io::{self, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use packetstream::{Config, HandlerResult, PacketConnection, Request};

use super::{
    bad_control, ms, request, response, service, unique_name, wire, within, ECHO, EXIT, FAIL, HOLD,
    LIMIT, QUIT,
};

/// Set in the environment of the copy; its value names the mode.
const MODE_ENV: &str = "PACKETSTREAM_CHILD";

/// What the child writes on its standard output before its first byte of
/// the stream, after the test harness's own lines.
const READY: &[u8] = b"\nPACKETSTREAM-CHILD-READY\n";

/// What the child does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Serves [`service`], and HOLD, EXIT and QUIT, until the connection
    /// ends; exits with status 0 if it ended in order.
    Serve,
    /// Reads nothing and sends nothing until killed.
    Silent,
    /// Sends [`half_response`], then nothing; reads nothing.
    HalfPacket,
    /// Sends a HOLD request with tag 2, then exits with status 0.
    AskThenExit,
    /// Sends [`bad_control`], a protocol error, then nothing.
    ProtocolError,
    /// Exits with status 0 before it writes anything.
    ExitAtOnce,
}

const MODES: [(Mode, &str); 6] = [
    (Mode::Serve, "serve"),
    (Mode::Silent, "silent"),
    (Mode::HalfPacket, "half-packet"),
    (Mode::AskThenExit, "ask-then-exit"),
    (Mode::ProtocolError, "protocol-error"),
    (Mode::ExitAtOnce, "exit-at-once"),
];

impl Mode {
    fn name(self) -> &'static str {
        MODES.iter().find(|(mode, _)| *mode == self).unwrap().1
    }

    fn named(name: &str) -> Mode {
        let found = MODES.iter().find(|(_, n)| *n == name);
        found.unwrap_or_else(|| panic!("no child mode {name}")).0
    }
}

/// The first half of an ok response to tag 2, the first tag a connection
/// uses: the rest never comes.
pub fn half_response() -> Vec<u8> {
    let mut bytes = wire(&response(2, true, 0, &[0x33; 200]));
    bytes.truncate(bytes.len() / 2);
    bytes
}

/// Makes the test `child_fixture` that a copy of this test binary started
/// by [`spawn`] runs: there it plays its part and exits. In a normal run
/// the test starts a child that serves, and checks it.
#[allow(unused_macros)] // Only the test binaries that start children use it.
macro_rules! child_fixture {
    () => {
        /// The child-process fixture's entry point (see `common::child`).
        #[test]
        fn child_fixture() {
            crate::common::child::entry();
        }
    };
}
#[allow(unused_imports)] // As above.
pub(crate) use child_fixture;

/// The body of the test that [`child_fixture!`] makes.
pub fn entry() {
    match std::env::var(MODE_ENV) {
        Ok(mode) => run(Mode::named(&mode)),
        Err(_) => check(),
    }
}

/// The fixture's own test: a child that serves answers and fails as the
/// service says, and exits with status 0 once its parent has closed.
fn check() {
    let (child, conn) = connect(Mode::Serve, Config::default().name(unique_name("fixture")));
    let rsp = conn.call_timeout(ECHO, 7, b"echo", LIMIT).unwrap();
    assert_eq!((rsp.flags, rsp.payload.as_slice()), (7, &b"echo"[..]));
    let err = conn.call_timeout(FAIL, 0, b"told to", LIMIT).unwrap_err();
    assert_eq!(err.failure_reason().as_deref(), Some("told to"));
    conn.close_timeout(LIMIT).unwrap();
    assert!(reap(child).success());
}

/// The child's side. Never returns.
fn run(mode: Mode) -> ! {
    if mode == Mode::ExitAtOnce {
        std::process::exit(0);
    }
    let mut stdout = io::stdout().lock();
    stdout.write_all(READY).unwrap();
    match mode {
        Mode::Serve => {
            stdout.flush().unwrap();
            drop(stdout);
            serve();
        }
        Mode::Silent | Mode::ExitAtOnce => {}
        Mode::HalfPacket => stdout.write_all(&half_response()).unwrap(),
        Mode::AskThenExit => {
            stdout
                .write_all(&wire(&request(2, HOLD, 0, b"hold")))
                .unwrap();
            stdout.flush().unwrap();
            std::process::exit(0);
        }
        Mode::ProtocolError => stdout.write_all(&wire(&bad_control())).unwrap(),
    }
    stdout.flush().unwrap();
    // Reads nothing and sends nothing more until killed.
    thread::sleep(LIMIT);
    std::process::exit(0)
}

/// Serves the parent until the connection ends, or QUIT asks for an
/// orderly close, or EXIT for an exit.
fn serve() -> ! {
    // true: close now; false: the connection has ended.
    let (tx, rx) = mpsc::channel::<bool>();
    let quit = tx.clone();
    let config = Config::default()
        .name("child")
        .handler(move |rq: Request| -> HandlerResult {
            match rq.rq_type {
                HOLD => {
                    thread::sleep(LIMIT);
                    Ok(().into())
                }
                EXIT => {
                    if !rq.payload.is_empty() {
                        let trigger = std::path::PathBuf::from(String::from_utf8(rq.payload)?);
                        let deadline = Instant::now() + LIMIT;
                        while !trigger.exists() && Instant::now() < deadline {
                            thread::sleep(ms(1));
                        }
                    }
                    std::process::exit(3);
                }
                QUIT => {
                    let _ = quit.send(true);
                    Ok(().into())
                }
                _ => service(rq),
            }
        })
        .on_end(move |_| {
            let _ = tx.send(false);
        });
    let conn = PacketConnection::stdio(config).unwrap();
    let res = match rx.recv_timeout(LIMIT) {
        Ok(true) => conn.close(),
        Ok(false) => conn.join(),
        Err(_) => std::process::exit(1),
    };
    std::process::exit(i32::from(res.is_err()))
}

/// Starts a child in `mode`: a copy of this test binary that runs only its
/// `child_fixture` test, with its standard input and output piped and its
/// standard error discarded. Its standard output begins with the harness's
/// lines: [`connect`] and [`skip_to_ready`] pass over them.
pub fn spawn(mode: Mode) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_fixture",
            "--exact",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(MODE_ENV, mode.name())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A child in `mode`, and a connection to it with `config`, made with
/// [`PacketConnection::new`] over its pipes.
pub fn connect(mode: Mode, config: Config) -> (Child, PacketConnection) {
    let mut child = spawn(mode);
    let recv = SkipPast::new(child.stdout.take().unwrap(), READY);
    let send = child.stdin.take().unwrap();
    let conn = PacketConnection::new(recv, send, config).unwrap();
    (child, conn)
}

/// Reads the child's standard output up to where its stream begins, within
/// `LIMIT`, and leaves the rest in place: for
/// [`PacketConnection::from_child`].
pub fn skip_to_ready(child: &mut Child) {
    let mut stdout = child.stdout.take().unwrap();
    let stdout = within("the child says it is ready", move || {
        let mut seen = Vec::new();
        let mut byte = [0u8];
        while !seen.ends_with(READY) {
            assert_eq!(stdout.read(&mut byte).unwrap(), 1, "child ended early");
            seen.push(byte[0]);
        }
        stdout
    });
    child.stdout = Some(stdout);
}

/// Waits for the child to exit, within `LIMIT`.
pub fn reap(mut child: Child) -> ExitStatus {
    within("the child exits", move || child.wait().unwrap())
}

/// Kills the child, and waits for it to exit.
pub fn kill(mut child: Child) -> ExitStatus {
    let _ = child.kill();
    reap(child)
}

/// Reads `inner`, dropping everything up to and including the first
/// `marker`.
struct SkipPast<R> {
    inner: R,
    marker: &'static [u8],
    seen: Vec<u8>,
    found: bool,
}

impl<R> SkipPast<R> {
    fn new(inner: R, marker: &'static [u8]) -> SkipPast<R> {
        SkipPast {
            inner,
            marker,
            seen: Vec::new(),
            found: false,
        }
    }
}

impl<R: Read> Read for SkipPast<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while !self.found {
            let mut byte = [0u8];
            if self.inner.read(&mut byte)? == 0 {
                return Ok(0);
            }
            self.seen.push(byte[0]);
            self.found = self.seen.ends_with(self.marker);
        }
        self.inner.read(buf)
    }
}
