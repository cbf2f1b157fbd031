//! Hostile peers and injected faults: oversize and garbage packets, a peer
//! that stops reading, I/O faults at every byte offset of a scripted
//! exchange, and a child-process peer killed mid-stream.
//!
//! Bounded by default; `PACKETSTREAM_LONG=1` runs more trials.

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::child::{self, child_fixture, Mode};
use common::{
    assert_threads_gone, echo, long, report, response, unique_name, wait_for, RawPeer, LIMIT, SLEEP,
};
use packetstream::{Config, Disconnect, Error, OnClose, PacketConnection, Reply, Request};

// ---------------------------------------------------------------------------
// Maximum packet size.

#[test]
fn oversize_response_fails_its_request_only() {
    const MAX: u64 = 1024;
    let (conn, mut peer) = RawPeer::with_patience(Config::default().max_packet_len(MAX), LIMIT);
    let first = conn.submit(1, 0, b"big please").unwrap();
    let second = conn.submit(1, 0, b"small please").unwrap();
    let (t1, t2) = (first.tag(), second.tag());
    peer.send(&response(t1, true, 0, &vec![1; 1 << 20]));
    peer.send(&response(t2, true, 0, b"fine"));
    match first.wait_timeout(LIMIT) {
        Err(Error::ResponseTooLarge { max, .. }) => assert_eq!(max, MAX),
        other => panic!("{other:?}"),
    }
    assert_eq!(second.wait_timeout(LIMIT).unwrap().payload, b"fine");
    conn.abort();
}

#[test]
fn absurd_length_then_nothing_or_garbage_ends_the_connection_with_a_typed_error() {
    // A length prefix of 2^40 followed by: nothing; a request head and a few
    // body bytes; garbage that is no head at all.
    let tails: [&[u8]; 3] = [b"", &[0x05, 0x06, 0x09, 1, 2, 3], &[0xff; 12]];
    for tail in tails {
        let name = unique_name("ab");
        let (conn, mut peer) =
            RawPeer::with_patience(Config::default().name(&name).handler(echo), LIMIT);
        let pending = conn.submit(1, 0, b"q").unwrap();
        let mut wire = vec![0xa0, 0x80, 0x80, 0x80, 0x80, 0x00]; // 2^40
        wire.extend_from_slice(tail);
        peer.stream.write_all(&wire).unwrap();
        peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
        // Lost if it was written before the bad bytes arrived, unsent if
        // not.
        match pending.wait_timeout(LIMIT) {
            Err(
                Error::ConnectionLost(Disconnect::Protocol) | Error::Unsent(Disconnect::Protocol),
            ) => {}
            other => panic!("tail {tail:?}: {other:?}"),
        }
        match conn.close_timeout(LIMIT) {
            Err(Error::TooLarge { len, .. }) => assert_eq!(len, 1 << 40),
            Err(Error::Malformed { .. }) => assert!(!tail.is_empty()),
            other => panic!("tail {tail:?}: {other:?}"),
        }
        assert!(conn.submit(1, 0, b"").unwrap_err().is_disconnect());
        assert_threads_gone(&name, LIMIT);
    }
}

#[test]
fn oversize_submit_fails_with_too_large_and_the_connection_goes_on() {
    let (a, b) = UnixStream::pair().unwrap();
    let server =
        PacketConnection::from_unix_stream(b, Config::default().max_packet_len(100).handler(echo))
            .unwrap();
    let client =
        PacketConnection::from_unix_stream(a, Config::default().max_packet_len(100)).unwrap();
    match client.submit(1, 0, &[0; 200]) {
        Err(Error::TooLarge { len, max }) => assert_eq!((len > 200, max), (true, 100)),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.stats().pending, 0);
    let rsp = client.submit(1, 0, b"ok").unwrap().wait_timeout(LIMIT);
    assert_eq!(rsp.unwrap().payload, b"ok");
    client.close_timeout(LIMIT).unwrap();
    server.close_timeout(LIMIT).unwrap();
}

// ---------------------------------------------------------------------------
// A peer that stops reading.

#[test]
fn responses_still_arrive_while_the_peer_reads_none_of_our_replies() {
    // The peer sends requests whose replies are larger than the socket
    // buffer, and never reads them; it then answers our request. The
    // receive thread must not be stuck behind a handler blocked on a write.
    for handler_threads in [1, 2] {
        let (conn, mut peer) = RawPeer::with_patience(
            Config::default()
                .handler_threads(handler_threads)
                .handler_queue(1)
                .handler(|rq: Request| Ok(Reply::payload(vec![rq.tag as u8; 1 << 20]))),
            LIMIT,
        );
        let ours = conn.submit(5, 0, b"question").unwrap();
        let question = peer.recv_packet();
        assert_eq!(question.tag, ours.tag());
        peer.request(100, 1, b"");
        wait_for("the first reply", LIMIT, || conn.stats().replies_ok == 1);
        // Give a handler time to start writing, were it to write.
        thread::sleep(Duration::from_millis(100));
        for tag in 101..106 {
            peer.request(tag, 1, b"");
        }
        peer.send(&response(ours.tag(), true, 9, b"answer"));
        let rsp = ours.wait_timeout(LIMIT);
        conn.abort();
        let rsp = rsp.unwrap_or_else(|e| panic!("{handler_threads} handler threads: {e}"));
        assert_eq!((rsp.flags, rsp.payload.as_slice()), (9, &b"answer"[..]));
    }
}

// ---------------------------------------------------------------------------
// Local timeouts and cancels.

/// A handler that holds every request until `open` is set.
fn gated(
    open: Arc<std::sync::atomic::AtomicBool>,
) -> impl Fn(Request) -> packetstream::HandlerResult {
    move |rq: Request| {
        let deadline = Instant::now() + LIMIT;
        while !open.load(Ordering::SeqCst) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        echo(rq)
    }
}

#[test]
fn wait_timeout_leaves_the_request_pending_and_cancel_frees_it() {
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (a, b) = UnixStream::pair().unwrap();
    let server =
        PacketConnection::from_unix_stream(b, Config::default().handler(gated(open.clone())))
            .unwrap();
    // Without extensions, so that the cancels stay local: with them, a
    // cancel that reaches the server before its request runs has it
    // answered not ok unrun (tests/extensions.rs).
    let client =
        PacketConnection::from_unix_stream(a, Config::default().extensions(false)).unwrap();
    let kept = client.submit(1, 0, b"kept").unwrap();
    assert!(matches!(
        kept.wait_timeout(Duration::from_millis(5)),
        Err(Error::Timeout { .. })
    ));
    assert!(!kept.is_ready());
    let mut dropped = Vec::new();
    for idx in 0..1000u64 {
        dropped.push(client.submit(1, idx, b"abandoned").unwrap());
    }
    assert_eq!(client.stats().pending, 1001);
    for (idx, pending) in dropped.into_iter().enumerate() {
        // Half are cancelled explicitly, half by dropping the handle.
        if idx % 2 == 0 {
            pending.cancel();
        }
    }
    // Their entries are freed now, not when (or if) the peer answers.
    assert_eq!(client.stats().pending, 1);
    open.store(true, Ordering::SeqCst);
    let rsp = kept.wait_timeout(LIMIT).expect("the kept request");
    assert_eq!(rsp.payload, b"kept");
    // The late replies are dropped quietly, and the connection goes on.
    wait_for("the late replies", LIMIT, || {
        client.stats().responses_ok == 1001
    });
    let rsp = client.submit(1, 5, b"after").unwrap().wait_timeout(LIMIT);
    assert_eq!(rsp.unwrap().flags, 5);
    assert_eq!(client.stats().pending, 0);
    client.close_timeout(LIMIT).unwrap();
    server.close_timeout(LIMIT).unwrap();
}

// ---------------------------------------------------------------------------
// Fault injection at every byte offset.

/// What happens to the stream at the chosen offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// One read or write of a single byte. Harmless.
    Short,
    /// One `Interrupted` error. Harmless: it must be retried.
    Interrupted,
    /// A lasting I/O error from there on.
    Error,
    /// End of stream from there on: `Ok(0)`.
    Eof,
}

const FAULTS: [Fault; 4] = [Fault::Short, Fault::Interrupted, Fault::Error, Fault::Eof];

/// A `Read` or `Write` that passes bytes through until byte offset `at`,
/// then injects `fault` there. Reads and writes are cut short so that one
/// starts exactly at `at`.
struct Faulty<T> {
    inner: T,
    at: u64,
    pos: u64,
    fault: Fault,
    fired: bool,
    injected: Arc<AtomicU64>,
}

impl<T> Faulty<T> {
    fn new(inner: T, at: u64, fault: Fault, injected: Arc<AtomicU64>) -> Faulty<T> {
        Faulty {
            inner,
            at,
            pos: 0,
            fault,
            fired: false,
            injected,
        }
    }

    /// How much of a `len`-byte call may go through, or the fault to inject
    /// now.
    fn admit(&mut self, len: usize, error_kind: io::ErrorKind) -> io::Result<Option<usize>> {
        if self.pos < self.at {
            return Ok(Some(len.min((self.at - self.pos) as usize)));
        }
        if self.pos > self.at
            || (self.fired && matches!(self.fault, Fault::Short | Fault::Interrupted))
        {
            return Ok(Some(len));
        }
        if !self.fired {
            self.fired = true;
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        match self.fault {
            Fault::Short => Ok(Some(len.min(1))),
            Fault::Interrupted => Err(io::Error::new(io::ErrorKind::Interrupted, "injected")),
            Fault::Error => Err(io::Error::new(error_kind, "injected")),
            Fault::Eof => Ok(None),
        }
    }
}

impl<T: Read> Read for Faulty<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.admit(buf.len(), io::ErrorKind::ConnectionReset)? {
            None => Ok(0),
            Some(len) => {
                let n = self.inner.read(&mut buf[..len])?;
                self.pos += n as u64;
                Ok(n)
            }
        }
    }
}

impl<T: Write> Write for Faulty<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.admit(buf.len(), io::ErrorKind::BrokenPipe)? {
            None => Ok(0),
            Some(len) => {
                let n = self.inner.write(&buf[..len])?;
                self.pos += n as u64;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Which direction of the faulty end's stream gets the fault.
#[derive(Clone, Copy, Debug)]
enum Side {
    Read,
    Write,
}

/// Tally of outcomes over all trials.
#[derive(Default, Debug)]
struct Tally {
    trials: u64,
    requests: u64,
    ok: u64,
    lost: u64,
}

/// Payloads of the scripted exchange's requests, in both directions.
const SCRIPT: [&[u8]; 3] = [b"", b"seven!!", &[0x5a; 40]];

/// One scripted exchange: each end sends the requests of `SCRIPT` to the
/// other and waits for every reply, then both close. One end's stream gets
/// `fault` at byte `at` on `side`. Every request must end in exactly one
/// outcome, within the patience; every thread must end.
fn scripted_exchange(
    side: Side,
    fault: Fault,
    at: u64,
    injected: &Arc<AtomicU64>,
    tally: &mut Tally,
) -> (u64, u64) {
    let (a, b) = UnixStream::pair().unwrap();
    let (fa, fb) = (unique_name("fa"), unique_name("fb"));
    let faulty = PacketConnection::connect_with(
        || {
            let (mut r, mut w) = (u64::MAX, u64::MAX);
            match side {
                Side::Read => r = at,
                Side::Write => w = at,
            }
            let recv = Faulty::new(a.try_clone()?, r, fault, injected.clone());
            let send = Faulty::new(a.try_clone()?, w, fault, injected.clone());
            let on_close: Option<OnClose> = Some(Box::new(move || {
                let _ = a.shutdown(std::net::Shutdown::Both);
            }));
            Ok((recv, send, on_close))
        },
        Config::default()
            .name(&fa)
            .packet_grace(Duration::from_millis(1))
            .handler(echo),
    )
    .unwrap();
    let clean = PacketConnection::from_unix_stream(
        b,
        Config::default()
            .name(&fb)
            .packet_grace(Duration::from_millis(1))
            .handler(echo),
    )
    .unwrap();
    let harmless = matches!(fault, Fault::Short | Fault::Interrupted);
    let mut bytes = (0, 0);
    let what = format!("{side:?} {fault:?} at {at}");
    let run = |conn: &PacketConnection| {
        let mut outcomes = Vec::new();
        let mut pending = Vec::new();
        for (idx, payload) in SCRIPT.iter().enumerate() {
            match conn.submit(1, idx as u64, payload) {
                Ok(p) => pending.push((idx, p)),
                // Refused at once is one outcome too.
                Err(e) => outcomes.push(Err(e)),
            }
        }
        for (idx, p) in pending {
            let res = p.wait_timeout(LIMIT);
            if let Ok(rsp) = &res {
                assert_eq!(
                    (rsp.flags, rsp.payload.as_slice()),
                    (idx as u64, SCRIPT[idx]),
                    "{what}"
                );
            }
            outcomes.push(res);
        }
        outcomes
    };
    thread::scope(|s| {
        let other = s.spawn(|| run(&clean));
        let mut outcomes = run(&faulty);
        outcomes.extend(other.join().unwrap());
        assert_eq!(outcomes.len(), 2 * SCRIPT.len());
        for res in &outcomes {
            tally.requests += 1;
            match res {
                Ok(_) => tally.ok += 1,
                Err(e) if e.is_disconnect() && !harmless => tally.lost += 1,
                Err(e) => panic!("{what}: unexpected outcome {e:?}"),
            }
        }
        let closer = s.spawn(|| clean.close_timeout(LIMIT));
        let res = faulty.close_timeout(LIMIT);
        let stats = faulty.stats();
        bytes = (stats.bytes_in, stats.bytes_out);
        let other = closer.join().unwrap();
        for res in [res, other] {
            match res {
                Ok(()) => {}
                Err(Error::Timeout { .. }) => panic!("{what}: close timed out"),
                Err(e) => assert!(!harmless, "{what}: {e:?}"),
            }
        }
    });
    assert_threads_gone(&fa, LIMIT);
    assert_threads_gone(&fb, LIMIT);
    tally.trials += 1;
    bytes
}

#[test]
fn a_fault_at_every_byte_offset_of_a_scripted_exchange_loses_nothing_and_hangs_nothing() {
    // A run without a fault measures the exchange: three requests, three
    // replies, ERQ and EOF each way, about 110 bytes in each direction.
    // Then every offset of each direction gets each fault; the long variant
    // sweeps several times, as packets interleave differently each run.
    let sweeps = if long() { 10 } else { 1 };
    let injected = Arc::new(AtomicU64::new(0));
    let mut tally = Tally::default();
    let (len_in, len_out) =
        scripted_exchange(Side::Read, Fault::Error, u64::MAX, &injected, &mut tally);
    assert!(len_in > 50 && len_out > 50, "{len_in} {len_out}");
    let clean_trials = tally.trials;
    for _ in 0..sweeps {
        for (side, len) in [(Side::Read, len_in), (Side::Write, len_out)] {
            for fault in FAULTS {
                for at in 0..len {
                    scripted_exchange(side, fault, at, &injected, &mut tally);
                }
            }
        }
    }
    let injected = injected.load(Ordering::Relaxed);
    report(format!(
        "fault injection: {} trials, {injected} faults injected, {} requests ({} ok, {} lost)",
        tally.trials, tally.requests, tally.ok, tally.lost
    ));
    assert_eq!(tally.requests, tally.trials * 2 * SCRIPT.len() as u64);
    assert_eq!(tally.ok + tally.lost, tally.requests);
    // Every offset falls inside the exchange, so every trial but the
    // clean one injects its fault; the lasting faults lose requests at
    // some offsets.
    assert_eq!(injected, tally.trials - clean_trials);
    assert!(tally.lost > 0);
}

// ---------------------------------------------------------------------------
// A child-process peer killed mid-stream.

child_fixture!();

#[test]
fn killing_a_child_peer_mid_stream_fails_each_request_once_and_hangs_nothing() {
    const N: u64 = 1000;
    let n_trials = if long() { 500 } else { 50 };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut tally = Tally::default();
    for trial in 0..n_trials {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Kill once this many replies have arrived: from before the first
        // to after the last.
        let kill_after = rng % (N + 1);
        let name = unique_name("ck");
        let (child, conn) = child::connect(Mode::Serve, Config::default().name(&name));
        let child = Mutex::new(child);
        let what = format!("trial {trial}, kill after {kill_after} replies");
        let outcomes = thread::scope(|s| {
            let killer = s.spawn(|| {
                let deadline = Instant::now() + LIMIT;
                while conn.stats().responses_ok < kill_after && Instant::now() < deadline {
                    thread::sleep(Duration::from_micros(200));
                }
                child.lock().unwrap().kill().unwrap();
            });
            let mut outcomes = Vec::new();
            let mut pending = Vec::new();
            // Each request takes a little while, 0.1 ms, so that the kill
            // lands in the middle of the exchange.
            for idx in 0..N {
                match conn.submit(SLEEP, idx, b"0.1") {
                    Ok(p) => pending.push((idx, p)),
                    Err(e) => outcomes.push(Err(e)),
                }
            }
            for (idx, p) in pending {
                let res = p.wait_timeout(LIMIT);
                if let Ok(rsp) = &res {
                    assert_eq!(rsp.flags, idx, "{what}: the reply to another request");
                }
                outcomes.push(res);
            }
            killer.join().unwrap();
            outcomes
        });
        assert_eq!(outcomes.len() as u64, N, "{what}");
        let mut n_ok = 0;
        for res in outcomes {
            match res {
                Ok(_) => n_ok += 1,
                Err(e) if e.is_disconnect() => tally.lost += 1,
                Err(e) => panic!("{what}: {e:?}"),
            }
        }
        assert!(n_ok >= kill_after, "{what}: only {n_ok} ok");
        tally.ok += n_ok;
        tally.requests += N;
        let res = conn.close_timeout(LIMIT);
        assert!(
            !matches!(res, Err(Error::Timeout { .. })),
            "{what}: close timed out"
        );
        let status = child::reap(child.into_inner().unwrap());
        assert!(!status.success(), "{what}: {status}");
        assert_threads_gone(&name, LIMIT);
        tally.trials += 1;
    }
    report(format!(
        "child kill: {} trials, {} requests ({} ok, {} lost)",
        tally.trials, tally.requests, tally.ok, tally.lost
    ));
    assert_eq!(tally.ok + tally.lost, tally.requests);
    assert!(tally.lost > 0 && tally.ok > 0);
}
