//! A hostile peer and an unlucky user against the connection's promises: lent readers, inline handlers, bounded writes, a server's shared pool, refusals and hooks.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{echo, ms, server_config, within, within_or, ECHO, SLEEP};
use packetstream::{Config, Disconnect, Error, OnClose, Packet, PacketConnection};

/// Long enough for any step that should succeed.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long a step that should return at once is given before it counts as
/// hung.
const HANG: Duration = Duration::from_secs(3);

/// A client with an echo handler of its own and a server with the common
/// service, over a socketpair.
fn pair_both_serving(tag: &str) -> (Arc<PacketConnection>, Arc<PacketConnection>) {
    let (a, b) = UnixStream::pair().unwrap();
    let server = PacketConnection::from_unix_stream(b, server_config(&format!("{tag}s"))).unwrap();
    let client = PacketConnection::from_unix_stream(
        a,
        Config::default().name(format!("{tag}c")).handler(echo),
    )
    .unwrap();
    (Arc::new(client), Arc::new(server))
}

/// After a caller has read its own response on the lent reader for longer
/// than the lease, a request from the peer must still be read and answered.
#[test]
fn a_request_from_the_peer_is_served_after_a_caller_read_past_the_lease() {
    let (client, server) = pair_both_serving("lease");
    let (c, s) = (Arc::clone(&client), Arc::clone(&server));
    let outcomes = within("the calls", move || {
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            // Delivered by the receive thread, which then lends its reader.
            c.call(ECHO, 0, b"warm").unwrap();
            // Read by this caller itself, for longer than the lease.
            c.call(SLEEP, 0, b"60").unwrap();
            // The peer now asks us something: somebody must read it.
            outcomes.push(
                s.call_timeout(ECHO, 0, b"ping", ms(2000))
                    .map(|r| r.payload),
            );
        }
        outcomes
    });
    for res in outcomes {
        assert_eq!(res.unwrap(), b"ping", "the peer's request was never read");
    }
    assert!(client.close_timeout(PATIENCE).is_ok());
    assert!(server.close_timeout(PATIENCE).is_ok());
}

/// A `call` from one thread while another thread's `call_timeout` waited
/// for a response that the first read: a later `call` must still get its
/// response, which the peer sends.
#[test]
fn a_call_after_a_call_timeout_raced_a_reading_caller_gets_its_response() {
    let (client, server) = pair_both_serving("race");
    client.call(ECHO, 0, b"warm").unwrap();
    let reader = {
        let c = Arc::clone(&client);
        thread::spawn(move || c.call(SLEEP, 0, b"150").map(|r| r.payload))
    };
    thread::sleep(ms(40));
    // Waits with a deadline while the other caller reads.
    let res = client.call_timeout(ECHO, 0, b"meanwhile", PATIENCE);
    assert_eq!(res.unwrap().payload, b"meanwhile");
    let joined = within("the reading caller", move || reader.join().unwrap());
    assert_eq!(joined.unwrap(), b"150");
    let c = Arc::clone(&client);
    let res = within_or(
        "a call after the race",
        HANG,
        move || c.call(ECHO, 0, b"after").map(|r| r.payload),
        || client.abort(),
    );
    assert_eq!(res.unwrap(), b"after");
    assert!(client.close_timeout(PATIENCE).is_ok());
    assert!(server.close_timeout(PATIENCE).is_ok());
}

/// `close` while a caller reads its own response must still read the peer's
/// EOF, which comes later.
#[test]
fn close_while_a_caller_reads_still_reads_the_peers_eof() {
    let (client, server) = pair_both_serving("eof");
    // Held by the server past the reading caller's response, so that the
    // server's EOF comes well after it; cancelled here, so that nothing is
    // pending when the reader is handed back.
    drop(client.submit(SLEEP, 0, b"400").unwrap());
    client.call(ECHO, 0, b"warm").unwrap();
    let reader = {
        let c = Arc::clone(&client);
        thread::spawn(move || c.call(SLEEP, 0, b"100").map(|r| r.payload))
    };
    thread::sleep(ms(30));
    let c = Arc::clone(&client);
    let res = within_or(
        "close while a caller reads",
        ms(400) + HANG,
        move || c.close(),
        || client.abort(),
    );
    assert!(res.is_ok(), "{res:?}");
    let joined = within("the reading caller", move || reader.join().unwrap());
    assert_eq!(joined.unwrap(), b"100");
    assert!(server.close_timeout(PATIENCE).is_ok());
}

/// The whole packets read so far from `stream`, reading until `n` have
/// come.
fn read_packets(stream: &mut UnixStream, buf: &mut Vec<u8>, n: usize) -> Vec<Packet> {
    let mut packets = Vec::new();
    while packets.len() < n {
        if let Some((packet, used)) = Packet::decode(buf, u64::MAX).unwrap() {
            buf.drain(..used);
            packets.push(packet);
            continue;
        }
        let mut chunk = [0u8; 4096];
        let got = stream.read(&mut chunk).unwrap();
        assert!(got > 0, "stream ended");
        buf.extend_from_slice(&chunk[..got]);
    }
    packets
}

fn wire(packet: &Packet) -> Vec<u8> {
    let mut buf = Vec::new();
    packet.encode_into(&mut buf);
    buf
}

/// `abort` must wake a caller waiting in `call`, on `connect_with` streams
/// whose `on_close` cannot interrupt a read (here: none given), as it does
/// on every other transport.
#[test]
fn abort_wakes_a_caller_in_call_on_connect_with_streams_without_a_hook() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(PATIENCE)).unwrap();
    let client = Arc::new(
        PacketConnection::connect_with(
            move || {
                let on_close: OnClose = None;
                Ok((a.try_clone()?, a, on_close))
            },
            Config::default().name("cwith"),
        )
        .unwrap(),
    );
    let caller = {
        let c = Arc::clone(&client);
        thread::spawn(move || {
            let first = c.call(ECHO, 0, b"one");
            let second = c.call(ECHO, 0, b"two");
            (first.map(|r| r.payload), second)
        })
    };
    // Answer the first request, read the second and leave it unanswered.
    let mut buf = Vec::new();
    let first = read_packets(&mut peer, &mut buf, 1).remove(0);
    peer.write_all(&wire(&common::response(first.tag, true, 0, b"one")))
        .unwrap();
    let second = read_packets(&mut peer, &mut buf, 1).remove(0);
    assert_eq!(second.payload, b"two");
    thread::sleep(ms(50));
    client.abort();
    let (first, second) = within_or(
        "a caller in call() after abort",
        HANG,
        move || caller.join().unwrap(),
        // Unstick the caller: the peer closes the stream.
        || peer.shutdown(std::net::Shutdown::Both).unwrap(),
    );
    assert_eq!(first.unwrap(), b"one");
    assert!(
        matches!(second, Err(Error::ConnectionLost(Disconnect::Local))),
        "{second:?}"
    );
}
