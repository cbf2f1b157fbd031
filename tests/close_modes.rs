//! Close modes: drain (the default), drain with a deadline, and abort, each
//! with thousands of requests in flight and every one accounted for; and
//! shutdowns that must not hang on a peer that never reads.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_threads_gone, echo, pair_with, unique_name, within_or, LIMIT};
use packetstream::{
    Config, Disconnect, Error, PacketConnection, PendingResponse, Request, Response,
};

const IN_FLIGHT: u64 = 10_000;

/// A server that answers echo after a short pause, and a client, over a
/// socketpair.
fn pair(
    server_name: &str,
    client_name: &str,
    pause: Duration,
) -> (Arc<PacketConnection>, Arc<PacketConnection>) {
    let paused_echo = move |rq: Request| {
        thread::sleep(pause);
        echo(rq)
    };
    let (client, server) = pair_with(
        Config::default().name(client_name),
        Config::default().name(server_name).handler(paused_echo),
    );
    (Arc::new(server), Arc::new(client))
}

fn submit_many(client: &PacketConnection, n: u64) -> Vec<PendingResponse> {
    (0..n)
        .map(|idx| client.submit(1, idx, &idx.to_le_bytes()).unwrap())
        .collect()
}

/// Collects every outcome, each within the patience.
fn outcomes(pending: Vec<PendingResponse>) -> Vec<(u64, Result<Response, Error>)> {
    pending
        .into_iter()
        .enumerate()
        .map(|(idx, p)| {
            let res = p.wait_timeout(LIMIT);
            assert!(
                !matches!(res, Err(Error::Timeout { .. })),
                "request {idx} hangs"
            );
            if let Ok(rsp) = &res {
                assert_eq!(rsp.payload, (idx as u64).to_le_bytes());
            }
            (idx as u64, res)
        })
        .collect()
}

#[test]
fn drain_close_of_the_client_answers_all_10k_requests_in_flight() {
    let (sn, cn) = (unique_name("ds"), unique_name("dc"));
    let (server, client) = pair(&sn, &cn, Duration::ZERO);
    let pending = submit_many(&client, IN_FLIGHT);
    // The default close: ERQ, EOF, then wait for the server to answer
    // everything and send its own EOF.
    let c = client.clone();
    let (s1, s2) = (server.clone(), client.clone());
    within_or(
        "close",
        LIMIT,
        move || c.close(),
        move || {
            s1.abort();
            s2.abort();
        },
    )
    .expect("orderly close");
    let all = outcomes(pending);
    assert_eq!(all.len() as u64, IN_FLIGHT);
    assert!(all.iter().all(|(_, res)| res.is_ok()));
    assert_eq!(client.stats().responses_ok, IN_FLIGHT);
    let s = server.clone();
    within_or("server join", LIMIT, move || s.join(), || server.abort()).expect("server join");
    assert_threads_gone(&sn, LIMIT);
    assert_threads_gone(&cn, LIMIT);
}

#[test]
fn drain_close_of_the_server_answers_or_refuses_each_of_10k_requests_once() {
    let (sn, cn) = (unique_name("Ds"), unique_name("Dc"));
    let (server, client) = pair(&sn, &cn, Duration::from_micros(20));
    let pending = submit_many(&client, IN_FLIGHT);
    let s = server.clone();
    let closer = thread::spawn(move || s.close_timeout(LIMIT));
    let all = outcomes(pending);
    let (mut ok, mut refused, mut lost) = (0, 0, 0);
    for (idx, res) in &all {
        match res {
            Ok(_) => ok += 1,
            Err(e) if e.failure_reason().is_some() => refused += 1,
            // Written and not answered, or not yet written when the
            // server's EOF came.
            Err(
                Error::ConnectionLost(Disconnect::PeerEof) | Error::Unsent(Disconnect::PeerEof),
            ) => lost += 1,
            Err(e) => panic!("request {idx}: {e:?}"),
        }
    }
    assert_eq!(ok + refused + lost, IN_FLIGHT);
    // The client closes once it has its answers; then the server's close
    // completes.
    client.close_timeout(LIMIT).expect("client close");
    closer.join().unwrap().expect("server close");
    assert_threads_gone(&sn, LIMIT);
    assert_threads_gone(&cn, LIMIT);
}

#[test]
fn drain_with_a_deadline_that_is_met_answers_everything() {
    let (sn, cn) = (unique_name("ts"), unique_name("tc"));
    let (server, client) = pair(&sn, &cn, Duration::ZERO);
    let pending = submit_many(&client, IN_FLIGHT);
    client.close_timeout(LIMIT).expect("drained in time");
    assert!(outcomes(pending).iter().all(|(_, res)| res.is_ok()));
    server.close_timeout(LIMIT).expect("server close");
    assert_threads_gone(&sn, LIMIT);
    assert_threads_gone(&cn, LIMIT);
}

/// Fills the outgoing queue of a connection whose peer reads nothing, with
/// `try_submit_on` until it would block, and returns the handles.
fn fill_queue(conn: &PacketConnection) -> Vec<PendingResponse> {
    let deadline = Instant::now() + LIMIT;
    let mut pending = Vec::new();
    loop {
        match conn.try_submit_on(0, 1, 0, &[7; 4096]) {
            Ok(p) => pending.push(p),
            Err(Error::WouldBlock) => return pending,
            Err(e) => panic!("{e:?}"),
        }
        assert!(Instant::now() < deadline, "the queue never filled");
    }
}

/// A client whose peer never reads or answers, with a small queue.
fn silent_pair(name: &str) -> (Arc<PacketConnection>, UnixStream) {
    let (a, silent) = UnixStream::pair().unwrap();
    let config = Config::default()
        .name(name)
        .max_queued_bytes(64 << 10)
        .max_queued_packets(64);
    let client = PacketConnection::from_unix_stream(a, config).unwrap();
    (Arc::new(client), silent)
}

#[test]
fn drain_with_a_deadline_against_a_silent_peer_gives_up_and_fails_every_request() {
    // The client's queue is full and a submitter blocks on it; close_timeout
    // must still return, fail every pending request, and unblock the
    // submitter.
    let name = unique_name("tq");
    let (client, silent) = silent_pair(&name);
    let pending = fill_queue(&client);
    assert!(!pending.is_empty());
    let c = client.clone();
    // The send thread may still make room in the socket's buffer after the
    // queue first filled: then the submit gets in, and its handle must end
    // the same way as the others.
    let submitter = thread::spawn(move || {
        c.submit(1, 0, &[7; 4096])
            .and_then(|p| p.wait_timeout(LIMIT))
            .map(|_| ())
    });
    let res = client.close_timeout(Duration::from_millis(200));
    assert!(matches!(res, Err(Error::Timeout { .. })), "{res:?}");
    let res = within_or(
        "the blocked submitter",
        LIMIT,
        move || submitter.join().unwrap(),
        || {},
    );
    assert!(matches!(&res, Err(e) if e.is_disconnect()), "{res:?}");
    for (idx, res) in outcomes(pending) {
        match res {
            Err(Error::ConnectionLost(Disconnect::Local)) => {}
            other => panic!("request {idx}: {other:?}"),
        }
    }
    assert_threads_gone(&name, LIMIT);
    drop(silent);
}

#[test]
fn abort_with_10k_requests_in_flight_ends_each_one_at_once() {
    let (sn, cn) = (unique_name("as"), unique_name("ac"));
    let (server, client) = pair(&sn, &cn, Duration::from_micros(50));
    let pending = submit_many(&client, IN_FLIGHT);
    let c = client.clone();
    within_or("abort", LIMIT, move || c.abort(), || {});
    let all = outcomes(pending);
    let lost = all
        .iter()
        .filter(|(idx, res)| match res {
            Ok(_) => false,
            // Written before the abort, or still queued and dropped by it.
            Err(Error::ConnectionLost(Disconnect::Local) | Error::Unsent(Disconnect::Local)) => {
                true
            }
            Err(e) => panic!("request {idx}: {e:?}"),
        })
        .count();
    assert_eq!(all.len() as u64, IN_FLIGHT);
    assert!(lost > 0, "abort came after every reply");
    assert!(matches!(client.submit(1, 0, b""), Err(e) if e.is_disconnect()));
    // The server sees the socket shut down and ends too.
    let s = server.clone();
    within_or("server join", LIMIT, move || s.join(), || server.abort()).ok();
    assert_threads_gone(&cn, LIMIT);
    assert_threads_gone(&sn, LIMIT);
}

#[test]
fn abort_never_blocks_on_a_peer_that_never_reads() {
    let name = unique_name("na");
    let (client, silent) = silent_pair(&name);
    // A large request is written by its submitting thread, which then
    // blocks on the full socket.
    let c = client.clone();
    let writer = thread::spawn(move || {
        c.submit(1, 0, &vec![1; 8 << 20])
            .and_then(|p| p.wait_timeout(LIMIT))
    });
    let pending = fill_queue(&client);
    let c = client.clone();
    within_or("abort", LIMIT, move || c.abort(), || {});
    // The socket is shut down, which ends the blocked write.
    let res = within_or(
        "the blocked writer",
        LIMIT,
        move || writer.join().unwrap(),
        || {},
    );
    assert!(matches!(&res, Err(e) if e.is_disconnect()), "{res:?}");
    assert!(outcomes(pending).iter().all(|(_, res)| res.is_err()));
    assert_threads_gone(&name, LIMIT);
    drop(silent);
}

#[test]
fn drop_never_blocks_and_the_threads_end_once_the_peer_goes() {
    let name = unique_name("nd");
    let (client, silent) = silent_pair(&name);
    let pending = fill_queue(&client);
    let client = Arc::into_inner(client).unwrap();
    within_or("drop", LIMIT, move || drop(client), || {});
    // The handles still wait; the connection ends when the peer goes away,
    // and each of them then fails.
    drop(silent);
    for (idx, res) in outcomes(pending) {
        assert!(
            matches!(&res, Err(e) if e.is_disconnect()),
            "request {idx}: {res:?}"
        );
    }
    assert_threads_gone(&name, LIMIT);
}
