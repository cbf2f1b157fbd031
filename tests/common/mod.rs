//! Helpers shared by the integration tests.
// Each test binary uses some of these; `pub` items in a test-only module are fine.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use packetstream::{Config, HandlerResult, Kind, Packet, PacketConnection, Reply, Request};

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The longest any single step of a test may take before it counts as a hang.
pub const LIMIT: Duration = Duration::from_secs(30);

/// Runs `f` on its own thread and fails the test if it takes longer than
/// `LIMIT`. The thread is joined when it finishes in time.
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(value) => {
            handle.join().expect("finished thread joins");
            value
        }
        Err(_) => panic!("{what} did not finish within {LIMIT:?}: hang"),
    }
}

pub const ECHO: u64 = 1;
pub const FAIL: u64 = 2;
pub const SLEEP: u64 = 3;
pub const PANIC: u64 = 4;

/// ECHO answers with the request's flags and payload; FAIL fails with the
/// payload as reason; SLEEP sleeps the payload's decimal milliseconds, then
/// echoes; PANIC panics.
pub fn service(rq: Request) -> HandlerResult {
    match rq.rq_type {
        ECHO => Ok(Reply {
            flags: rq.flags,
            payload: rq.payload,
        }),
        FAIL => Err(String::from_utf8(rq.payload)?.into()),
        SLEEP => {
            let millis: u64 = std::str::from_utf8(&rq.payload)?.parse()?;
            std::thread::sleep(ms(millis));
            Ok(Reply {
                flags: rq.flags,
                payload: rq.payload,
            })
        }
        PANIC => panic!("handler told to panic"),
        other => Err(format!("unknown rq_type {other}").into()),
    }
}

pub fn server_config(name: &str) -> Config {
    Config::default().name(name).handler(service)
}

/// A client and a server over a socketpair.
pub fn pair() -> (PacketConnection, PacketConnection) {
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(b, server_config("server")).unwrap();
    let client = PacketConnection::from_unix_stream(a, Config::default().name("client")).unwrap();
    (client, server)
}

/// A scripted peer on a raw socket: sends and receives packets by hand.
/// Every read has a timeout.
pub struct RawPeer {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl RawPeer {
    /// A connection with `config` and a raw peer on the other end.
    pub fn with(config: Config) -> (PacketConnection, RawPeer) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(LIMIT)).unwrap();
        let conn = PacketConnection::from_unix_stream(a, config).unwrap();
        (
            conn,
            RawPeer {
                stream: b,
                buf: Vec::new(),
            },
        )
    }

    pub fn send(&mut self, packet: &Packet) {
        let mut wire = Vec::new();
        packet.encode_into(&mut wire);
        self.stream.write_all(&wire).unwrap();
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next packet, or `None` at the end of the stream. Panics on a read
    /// timeout.
    pub fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some((packet, used)) = Packet::decode(&self.buf, u64::MAX).unwrap() {
                self.buf.drain(..used);
                return Some(packet);
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .expect("raw peer read within the limit");
            if n == 0 {
                assert!(self.buf.is_empty(), "stream ended inside a packet");
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Receives until `pred` matches, returning the skipped packets too.
    pub fn recv_until(&mut self, pred: impl Fn(&Packet) -> bool) -> (Vec<Packet>, Packet) {
        let mut skipped = Vec::new();
        loop {
            let packet = self
                .recv()
                .expect("stream ended before the expected packet");
            if pred(&packet) {
                return (skipped, packet);
            }
            skipped.push(packet);
        }
    }
}

pub fn request(tag: u64, rq_type: u64, flags: u64, payload: &[u8]) -> Packet {
    Packet {
        channel: 0,
        tag,
        kind: Kind::Request { rq_type, flags },
        payload: payload.to_vec(),
    }
}

pub fn response(tag: u64, ok: bool, flags: u64, payload: &[u8]) -> Packet {
    Packet {
        channel: 0,
        tag,
        kind: Kind::Response { ok, flags },
        payload: payload.to_vec(),
    }
}

/// Threads of this process, from /proc.
pub fn thread_count() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Threads of this process whose name starts with `prefix` (names are cut
/// to 15 bytes by the kernel).
pub fn threads_named(prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let comm = entry.unwrap().path().join("comm");
        if let Ok(name) = std::fs::read_to_string(comm) {
            let name = name.trim_end().to_string();
            if name.starts_with(prefix) {
                names.push(name);
            }
        }
    }
    names.sort();
    names
}
