//! Wire order under races: whatever the interleaving of small and large submits
//! with close, close_timeout, abort, drop and end_requests, no packet follows
//! EOF, no request follows ERQ, a submit that returned Ok went out before ERQ
//! (or, once aborted, failed with ConnectionLost), every request ends exactly
//! once, and an orderly close never fails with an I/O error.
//!
//! The randomized check runs 1,000 seeded interleavings (`PACKETSTREAM_LONG=1`
//! runs 10,000); `PACKETSTREAM_WIRE_SEED=N` reruns the plan of seed N alone,
//! 200 times.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::{long, ms, report, response, timed, unique_name, Gate, Rng, Timed, LIMIT};
use packetstream::{
    Config, Error, Packet, PacketConnection, PacketKind, PendingResponse, Response,
};

/// A whole run that takes longer than this hangs: twice `LIMIT`, which
/// bounds each wait of the run.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Payloads at least this long are "large".
const LARGE: usize = 64 << 10;

// ---------------------------------------------------------------------------
// The recording peer.

/// How the recording peer reads.
#[derive(Clone, Copy, Debug)]
struct PeerPlan {
    /// Reads nothing for this long at first.
    start_paused: Duration,
    /// After a read, the chance in percent that it stops reading for 1 or
    /// 2 ms, so that large writes block.
    pause_percent: u64,
    seed: u64,
}

/// What the connection under test put on the wire.
#[derive(Default)]
struct Wire {
    packets: Vec<Packet>,
    /// Bytes left at the end that were not a whole packet.
    trailing: usize,
    /// How reading ended, if not at the end of the stream.
    error: Option<String>,
}

/// Reads, decodes and records every packet until the stream ends; answers
/// each request ok, with the request's flags and its payload's length, and
/// the first EOF with its own EOF. Waits at `go` before its first read.
fn record(mut stream: UnixStream, plan: PeerPlan, go: Option<Gate>) -> Wire {
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.set_write_timeout(Some(LIMIT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut rng = Rng::new(plan.seed);
    let mut wire = Wire::default();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let (mut sent_eof, mut can_write) = (false, true);
    if let Some(go) = go {
        go.pass();
    }
    thread::sleep(plan.start_paused);
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => {
                wire.error = Some(format!("the peer's read failed: {e}"));
                break;
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        let mut out = Vec::new();
        loop {
            match Packet::decode(&buf[used..], u64::MAX) {
                Ok(Some((packet, len))) => {
                    used += len;
                    if !sent_eof {
                        if let PacketKind::Request { flags, .. } = packet.kind {
                            let len = packet.payload.len() as u64;
                            let mut reply = response(packet.tag, true, flags, &len.to_le_bytes());
                            reply.channel = packet.channel;
                            reply.encode_into(&mut out);
                        } else if packet.is_eof() {
                            Packet::eof().encode_into(&mut out);
                            sent_eof = true;
                        }
                    }
                    wire.packets.push(packet);
                }
                Ok(None) => break,
                Err(e) => {
                    wire.error = Some(format!("undecodable bytes on the wire: {e}"));
                    return wire;
                }
            }
        }
        buf.drain(..used);
        if can_write && !out.is_empty() && writer.write_all(&out).is_err() {
            can_write = false;
        }
        if rng.chance(plan.pause_percent) {
            thread::sleep(Duration::from_micros(1000 + rng.below(1000)));
        }
    }
    wire.trailing = buf.len();
    wire
}

/// Starts [`record`] on its own thread; the receiver yields its record.
fn start_peer(stream: UnixStream, plan: PeerPlan, go: Option<Gate>) -> mpsc::Receiver<Wire> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(record(stream, plan, go));
    });
    rx
}

// ---------------------------------------------------------------------------
// What the caller saw, and the checks.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Shutdown {
    Close,
    CloseTimeout(Duration),
    Abort,
    Drop,
    EndRequests,
}

/// What became of a submit that returned Ok: its tag, its outcome, and
/// what a second look at the handle gave.
type Ended = (
    u64,
    Result<Response, Error>,
    Option<Result<Response, Error>>,
);

/// One submit: its flags (unique in the run), its payload's length, and
/// its error or what became of it.
struct Submitted {
    flags: u64,
    size: usize,
    res: Result<Ended, Error>,
}

/// Waits for the outcome of a submit, until `deadline` at most.
fn settle(
    flags: u64,
    size: usize,
    res: Result<PendingResponse, Error>,
    deadline: Instant,
) -> Submitted {
    let res = res.map(|pending| {
        let tag = pending.tag();
        let outcome = pending.wait_timeout(deadline.saturating_duration_since(Instant::now()));
        let again = pending.try_wait();
        (tag, outcome, again)
    });
    Submitted { flags, size, res }
}

/// Every way the run broke the rules.
fn check(
    wire: &Wire,
    submits: &[Submitted],
    shutdown: Shutdown,
    aborted: bool,
    closed: Option<&Result<(), Error>>,
) -> Vec<String> {
    let mut bad = Vec::new();
    let packets = &wire.packets;
    if let Some(e) = &wire.error {
        bad.push(e.clone());
    }
    let erq = packets.iter().position(Packet::is_erq);
    let eof = packets.iter().position(Packet::is_eof);
    if let Some(at) = eof {
        if at + 1 < packets.len() {
            bad.push(format!(
                "{} packets after EOF, the first {:?}",
                packets.len() - at - 1,
                packets[at + 1]
            ));
        }
    }
    if wire.trailing > 0 && !aborted {
        bad.push(format!(
            "the stream ended {} bytes into a packet",
            wire.trailing
        ));
    }
    if !aborted && (erq.is_none() || eof.is_none()) {
        bad.push(format!(
            "an orderly end without ERQ ({erq:?}) or EOF ({eof:?})"
        ));
    }
    let mut sent: HashMap<u64, (usize, u64)> = HashMap::new();
    for (at, packet) in packets.iter().enumerate() {
        if let PacketKind::Request { flags, .. } = packet.kind {
            if let Some(erq) = erq.filter(|&erq| at > erq) {
                bad.push(format!(
                    "request {flags:#x} (tag {}, {} bytes) went out after ERQ: packet {at}, ERQ {erq}",
                    packet.tag,
                    packet.payload.len()
                ));
            }
            if sent.insert(flags, (at, packet.tag)).is_some() {
                bad.push(format!("request {flags:#x} went out twice"));
            }
        }
    }
    for sub in submits {
        let what = format!("submit {:#x} of {} bytes", sub.flags, sub.size);
        match &sub.res {
            Err(e) => {
                // Refused: after ERQ, or once the connection has ended.
                if !e.is_disconnect() {
                    bad.push(format!("{what} failed with {e:?}"));
                }
                if sent.contains_key(&sub.flags) {
                    bad.push(format!(
                        "{what} failed with {e:?}, but its request went out"
                    ));
                }
            }
            Ok((tag, outcome, again)) => {
                match sent.get(&sub.flags) {
                    Some(&(_, wire_tag)) if wire_tag != *tag => bad.push(format!(
                        "{what} has tag {tag} but went out as tag {wire_tag}"
                    )),
                    // Unsent is a promise that the peer never saw it.
                    Some(_) if matches!(outcome, Err(Error::Unsent(_))) => {
                        bad.push(format!("{what} went out but ended {outcome:?}"))
                    }
                    Some(_) => {}
                    None if !aborted => {
                        bad.push(format!("{what} returned Ok but its request never went out"))
                    }
                    // Unsent, or lost if it was being written when the abort
                    // cut the stream.
                    None if !matches!(
                        outcome,
                        Err(Error::Unsent(_) | Error::ConnectionLost(_))
                    ) =>
                    {
                        bad.push(format!(
                            "{what} returned Ok, never went out, and ended {outcome:?}"
                        ))
                    }
                    None => {}
                }
                match outcome {
                    Ok(rsp) => {
                        if rsp.flags != sub.flags || rsp.payload != (sub.size as u64).to_le_bytes()
                        {
                            bad.push(format!("{what} got the wrong response {rsp:?}"));
                        }
                    }
                    // Once aborted, any request may be lost or unsent.
                    Err(Error::ConnectionLost(_) | Error::Unsent(_)) if aborted => {}
                    Err(e) => bad.push(format!("{what} ended {e:?}")),
                }
                if let Some(
                    Ok(_) | Err(Error::ConnectionLost(_) | Error::Unsent(_) | Error::Failed { .. }),
                ) = again
                {
                    bad.push(format!("{what} ended twice: then {again:?}"));
                }
            }
        }
    }
    if let Some(closed) = closed {
        let fine = match shutdown {
            Shutdown::CloseTimeout(timeout) if timeout < LIMIT => {
                matches!(closed, Ok(()) | Err(Error::Timeout { .. }))
            }
            _ => closed.is_ok(),
        };
        if !fine {
            bad.push(format!("{shutdown:?} returned {closed:?}"));
        }
    }
    bad
}

// ---------------------------------------------------------------------------
// A large submit waiting behind a big write, when the shutdown comes.

/// A peer that does not read yet; thread A submits 4 MiB and blocks in the
/// write; thread B submits 128 KiB, which has to wait behind it; then the
/// shutdown; then the peer reads everything.
fn large_submit_behind_a_big_write(shutdown: Shutdown) -> Vec<String> {
    let (a, b) = UnixStream::pair().unwrap();
    let go = Gate::new();
    let peer = start_peer(
        b,
        PeerPlan {
            start_paused: Duration::ZERO,
            pause_percent: 0,
            seed: 1,
        },
        Some(go.clone()),
    );
    let conn = Arc::new(
        PacketConnection::from_unix_stream(a, Config::default().name(unique_name("lb"))).unwrap(),
    );
    let start = |flags: u64, size: usize| {
        let conn = Arc::clone(&conn);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(conn.submit(1, flags, &vec![0x42; size]));
        });
        rx
    };
    let first = start(1, 4 << 20);
    thread::sleep(ms(100));
    let second = start(2, 128 << 10);
    thread::sleep(ms(100));
    let (tx, closed_rx) = mpsc::channel();
    {
        let conn = Arc::clone(&conn);
        thread::spawn(move || {
            let res = match shutdown {
                Shutdown::Close => Some(conn.close()),
                Shutdown::EndRequests => {
                    conn.end_requests();
                    None
                }
                Shutdown::Abort => {
                    conn.abort();
                    None
                }
                other => unreachable!("{other:?}"),
            };
            let _ = tx.send(res);
        });
    }
    thread::sleep(ms(100));
    go.open();
    let deadline = Instant::now() + LIMIT;
    let mut submits = Vec::new();
    for (flags, size, rx) in [(1, 4 << 20, first), (2, 128 << 10, second)] {
        let res = rx
            .recv_timeout(LIMIT)
            .expect("the submit returns once the peer reads");
        submits.push(settle(flags, size, res, deadline));
    }
    let mut closed = closed_rx.recv_timeout(LIMIT).expect("the shutdown returns");
    if shutdown == Shutdown::EndRequests {
        let c = Arc::clone(&conn);
        match timed(LIMIT, move || c.close()) {
            Timed::Done(res, _) => closed = Some(res),
            Timed::Stuck(_) => return vec!["close after end_requests hangs".to_string()],
        }
    }
    drop(conn);
    let wire = peer
        .recv_timeout(LIMIT)
        .expect("the peer sees the end of the stream");
    check(
        &wire,
        &submits,
        shutdown,
        shutdown == Shutdown::Abort,
        closed.as_ref(),
    )
}

#[test]
fn a_large_submit_waiting_behind_a_big_write_goes_out_before_the_erq_of_close() {
    let bad = large_submit_behind_a_big_write(Shutdown::Close);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn a_large_submit_waiting_behind_a_big_write_goes_out_before_the_erq_of_end_requests() {
    let bad = large_submit_behind_a_big_write(Shutdown::EndRequests);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn a_large_submit_waiting_behind_a_big_write_fails_as_lost_on_abort() {
    let bad = large_submit_behind_a_big_write(Shutdown::Abort);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

// ---------------------------------------------------------------------------
// Randomized interleavings.

#[derive(Debug)]
struct Plan {
    grace: Duration,
    /// Payload lengths, for each submitting thread.
    submits: Vec<Vec<usize>>,
    shutdown: Shutdown,
    /// The shutdown starts once this many submits have returned.
    after: usize,
    peer: PeerPlan,
}

fn plan(seed: u64) -> Plan {
    let mut rng = Rng::new(seed);
    let grace = [Duration::ZERO, ms(1), ms(10)][rng.below(3) as usize];
    let n_threads = 1 + rng.below(3) as usize;
    let submits: Vec<Vec<usize>> = (0..n_threads)
        .map(|_| {
            (0..1 + rng.below(4))
                .map(|_| {
                    if rng.chance(35) {
                        LARGE + rng.below(96 << 10) as usize
                    } else {
                        rng.below(300) as usize
                    }
                })
                .collect()
        })
        .collect();
    let total: usize = submits.iter().map(Vec::len).sum();
    let shutdown = match rng.below(100) {
        0..25 => Shutdown::Close,
        25..35 => Shutdown::CloseTimeout(LIMIT),
        35..50 => Shutdown::CloseTimeout(Duration::from_micros(rng.below(5000))),
        50..65 => Shutdown::Abort,
        65..80 => Shutdown::Drop,
        _ => Shutdown::EndRequests,
    };
    let after = rng.below(total as u64 + 1) as usize;
    let peer = PeerPlan {
        start_paused: if rng.chance(50) {
            Duration::ZERO
        } else {
            Duration::from_micros(500 + rng.below(2500))
        },
        pause_percent: rng.below(25),
        seed: rng.next(),
    };
    Plan {
        grace,
        submits,
        shutdown,
        after,
        peer,
    }
}

/// What a run counted.
#[derive(Default)]
struct Tally {
    submits: usize,
    large: usize,
    answered: usize,
    refused: usize,
    lost: usize,
}

/// One interleaving: submitting threads and a shutdown racing, against the
/// recording peer.
fn run(seed: u64) -> Result<Tally, String> {
    let plan = plan(seed);
    let (a, b) = UnixStream::pair().unwrap();
    let peer = start_peer(b, plan.peer, None);
    let conn = Arc::new(
        PacketConnection::from_unix_stream(
            a,
            Config::default()
                .name(unique_name("wo"))
                .packet_grace(plan.grace),
        )
        .unwrap(),
    );
    let returned = AtomicUsize::new(0);
    let total: usize = plan.submits.iter().map(Vec::len).sum();
    let mut main_conn = Some(conn);
    let (results, mut closed) = thread::scope(|s| {
        let returned = &returned;
        let submitters: Vec<_> = plan
            .submits
            .iter()
            .enumerate()
            .map(|(thread_idx, sizes)| {
                let conn = Arc::clone(main_conn.as_ref().unwrap());
                s.spawn(move || {
                    sizes
                        .iter()
                        .enumerate()
                        .map(|(idx, &size)| {
                            let flags = ((thread_idx as u64 + 1) << 8) | idx as u64;
                            let res = conn.submit(1, flags, &vec![flags as u8; size]);
                            returned.fetch_add(1, Ordering::SeqCst);
                            (flags, size, res)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let closer_conn = match plan.shutdown {
            Shutdown::Drop => main_conn.take().unwrap(),
            _ => Arc::clone(main_conn.as_ref().unwrap()),
        };
        let (shutdown, after) = (plan.shutdown, plan.after);
        let closer = s.spawn(move || {
            let deadline = Instant::now() + LIMIT;
            while returned.load(Ordering::SeqCst) < after.min(total) && Instant::now() < deadline {
                thread::yield_now();
            }
            match shutdown {
                Shutdown::Close => Some(closer_conn.close()),
                Shutdown::CloseTimeout(timeout) => Some(closer_conn.close_timeout(timeout)),
                Shutdown::Abort => {
                    closer_conn.abort();
                    None
                }
                Shutdown::Drop => {
                    drop(closer_conn);
                    None
                }
                Shutdown::EndRequests => {
                    closer_conn.end_requests();
                    None
                }
            }
        });
        let results: Vec<_> = submitters
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (results, closer.join().unwrap())
    });
    if plan.shutdown == Shutdown::EndRequests {
        closed = Some(main_conn.as_ref().unwrap().close());
    }
    drop(main_conn);
    let deadline = Instant::now() + LIMIT;
    let submits: Vec<Submitted> = results
        .into_iter()
        .map(|(flags, size, res)| settle(flags, size, res, deadline))
        .collect();
    let aborted =
        plan.shutdown == Shutdown::Abort || matches!(closed, Some(Err(Error::Timeout { .. })));
    let wire = match peer.recv_timeout(LIMIT) {
        Ok(wire) => wire,
        Err(_) => {
            return Err(format!(
                "{plan:?}: the peer never saw the end of the stream"
            ))
        }
    };
    let bad = check(&wire, &submits, plan.shutdown, aborted, closed.as_ref());
    if !bad.is_empty() {
        return Err(format!("{plan:?}:\n  {}", bad.join("\n  ")));
    }
    let mut tally = Tally::default();
    for sub in &submits {
        tally.submits += 1;
        tally.large += usize::from(sub.size >= LARGE);
        match &sub.res {
            Ok((_, Ok(_), _)) => tally.answered += 1,
            Ok(_) => tally.lost += 1,
            Err(_) => tally.refused += 1,
        }
    }
    Ok(tally)
}

#[test]
fn randomized_submits_racing_every_shutdown_keep_the_wire_in_order() {
    let seeds: Vec<u64> = match std::env::var("PACKETSTREAM_WIRE_SEED") {
        // A seed fixes the plan, not the threads' timing: run it many times.
        Ok(seed) => vec![seed.parse().expect("PACKETSTREAM_WIRE_SEED is a number"); 200],
        Err(_) => {
            let n_runs = if long() { 10_000 } else { 1_000 };
            (1..=n_runs)
                .map(|idx: u64| idx.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16)
                .collect()
        }
    };
    let started = Instant::now();
    let mut total = Tally::default();
    let mut broken = Vec::new();
    for &seed in &seeds {
        match timed(RUN_LIMIT, move || run(seed)) {
            Timed::Done(Ok(tally), _) => {
                total.submits += tally.submits;
                total.large += tally.large;
                total.answered += tally.answered;
                total.refused += tally.refused;
                total.lost += tally.lost;
            }
            Timed::Done(Err(why), _) => broken.push((seed, why)),
            Timed::Stuck(_) => {
                broken.push((seed, format!("{:?}: the run hangs", plan(seed))));
                break;
            }
        }
    }
    report(format!(
        "wire order: {} runs in {:.1?}: {} submits ({} large): {} answered, {} refused, {} lost; {} runs broke the rules",
        seeds.len(),
        started.elapsed(),
        total.submits,
        total.large,
        total.answered,
        total.refused,
        total.lost,
        broken.len()
    ));
    if let Some((seed, why)) = broken.first() {
        panic!(
            "{} of {} runs broke the rules. The first, seed {seed} (rerun its plan with PACKETSTREAM_WIRE_SEED={seed}): {why}",
            broken.len(),
            seeds.len()
        );
    }
}
