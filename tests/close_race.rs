//! The serving end's shutdown order under races, seen on the wire by a raw
//! peer: handlers finishing as the close begins, the peer's ERQ crossing
//! it, busy refusals, abort. EOF is the last packet, and it follows every
//! reply owed to a request a handler ran.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{ms, report, request, RawPeer, Rng, HANG, LIMIT};
use packetstream::{Config, Packet, PacketKind, Reply, Request, BUSY_FLAGS};

#[derive(Clone, Copy, Debug)]
enum Ending {
    Close,
    CloseTimeout,
    Abort,
}

/// One trial; returns a description of what broke, if anything.
fn trial(seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let inline = rng.below(4) == 0;
    let threads = [1, 2, 4, 6][rng.below(4) as usize];
    let busy = rng.below(3) == 0;
    let ending = match rng.below(5) {
        0 | 1 => Ending::Close,
        2 | 3 => Ending::CloseTimeout,
        _ => Ending::Abort,
    };
    let peer_erq_at = if rng.below(2) == 0 {
        Some(rng.below(64))
    } else {
        None
    };
    let n_requests = 16 + rng.below(200);
    let close_after = rng.below(n_requests);
    let reply_len = if busy { 200 } else { 8 };

    let ran: Arc<Mutex<Vec<u64>>> = Arc::default();
    let ran2 = Arc::clone(&ran);
    let handler = move |rq: Request| {
        let spin = rq.tag % 7;
        if spin > 0 {
            thread::sleep(Duration::from_micros(spin * 40));
        }
        ran2.lock().unwrap().push(rq.tag);
        Ok(Reply {
            flags: 0,
            payload: vec![b'x'; reply_len],
        })
    };
    let mut config = Config::default().name(format!("cr{seed:x}"));
    config = if inline {
        config.inline_handler(handler)
    } else {
        config.handler(handler).handler_threads(threads)
    };
    if busy {
        config = config.max_queued_bytes(600);
    }
    let (conn, mut peer) = RawPeer::with(config);
    let conn = Arc::new(conn);
    let mut writer = peer.stream.try_clone().unwrap();
    let started = Arc::new((Mutex::new(0u64), std::sync::Condvar::new()));
    let started2 = Arc::clone(&started);
    let send = thread::spawn(move || {
        let mut sent = 0;
        for tag in 0..n_requests {
            if peer_erq_at == Some(tag) {
                let mut bytes = Vec::new();
                Packet::erq().encode_into(&mut bytes);
                if writer.write_all(&bytes).is_err() {
                    break;
                }
                break;
            }
            let mut bytes = Vec::new();
            request(tag, 1, 0, b"r").encode_into(&mut bytes);
            if writer.write_all(&bytes).is_err() {
                break;
            }
            sent += 1;
            let (lock, cv) = &*started2;
            *lock.lock().unwrap() = sent;
            cv.notify_all();
        }
        let (lock, cv) = &*started2;
        *lock.lock().unwrap() = u64::MAX;
        cv.notify_all();
        sent
    });
    // Close once `close_after` requests have been written.
    {
        let (lock, cv) = &*started;
        let deadline = Instant::now() + LIMIT;
        let mut n = lock.lock().unwrap();
        while *n < close_after {
            let now = Instant::now();
            assert!(now < deadline, "the sender stalled");
            n = cv.wait_timeout(n, deadline - now).unwrap().0;
        }
    }
    let closer = {
        let conn = Arc::clone(&conn);
        thread::spawn(move || match ending {
            Ending::Close => conn.close().map_err(|e| e.to_string()),
            Ending::CloseTimeout => conn.close_timeout(LIMIT).map_err(|e| e.to_string()),
            Ending::Abort => {
                conn.abort();
                Ok(())
            }
        })
    };
    // Read until EOF or the end of the stream; a busy peer starts reading
    // late.
    if busy {
        thread::sleep(ms(rng.below(20)));
    }
    let mut packets = Vec::new();
    let mut saw_eof = false;
    loop {
        match peer.try_recv() {
            Ok(Some(p)) => {
                let eof = p.is_eof();
                packets.push(p);
                if eof {
                    saw_eof = true;
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => return Err(format!("peer read failed: {e}")),
        }
    }
    // Anything after EOF?
    let mut after = Vec::new();
    if saw_eof {
        peer.stream.set_read_timeout(Some(ms(50))).unwrap();
        while let Ok(Some(p)) = peer.try_recv() {
            after.push(p);
        }
    }
    let sent = send.join().unwrap();
    // Our EOF, so that the orderly close can end.
    let _ = peer.stream.write_all(&{
        let mut b = Vec::new();
        Packet::eof().encode_into(&mut b);
        b
    });
    let closed = {
        let deadline = Instant::now() + LIMIT + HANG;
        loop {
            if closer.is_finished() {
                break closer.join().unwrap();
            }
            if Instant::now() > deadline {
                conn.abort();
                return Err("close hung".into());
            }
            thread::sleep(ms(2));
        }
    };
    let what = format!(
        "seed {seed:#x} inline={inline} threads={threads} busy={busy} {ending:?} erq_at={peer_erq_at:?} n={n_requests} close_after={close_after} sent={sent}"
    );
    if !after.is_empty() {
        return Err(format!(
            "{what}: {} packets after EOF: {after:?}",
            after.len()
        ));
    }
    let mut answered = HashSet::new();
    let mut saw_erq = false;
    for p in &packets {
        match p.kind {
            PacketKind::Response { ok, flags } => {
                if !answered.insert(p.tag) {
                    return Err(format!("{what}: two replies to {}", p.tag));
                }
                if p.tag >= sent {
                    return Err(format!("{what}: reply to unsent {}", p.tag));
                }
                if !ok && flags == BUSY_FLAGS && !busy {
                    return Err(format!("{what}: busy refusal without a budget"));
                }
            }
            PacketKind::Request { .. } => {
                if saw_erq {
                    return Err(format!("{what}: request after ERQ"));
                }
            }
            PacketKind::Control { .. } => {
                if p.is_erq() {
                    saw_erq = true;
                }
            }
        }
    }
    match ending {
        Ending::Abort => {}
        Ending::Close | Ending::CloseTimeout => {
            if !saw_eof {
                return Err(format!("{what}: no EOF on an orderly close: {closed:?}"));
            }
            if !saw_erq {
                return Err(format!("{what}: no ERQ before EOF"));
            }
            if let Err(e) = closed {
                return Err(format!("{what}: close failed: {e}"));
            }
            let ran = ran.lock().unwrap().clone();
            for tag in &ran {
                if !answered.contains(tag) {
                    return Err(format!(
                        "{what}: handler ran {tag} but its reply is not before EOF ({} ran, {} answered)",
                        ran.len(),
                        answered.len()
                    ));
                }
            }
        }
    }
    drop(peer);
    Ok(())
}

#[test]
fn eof_follows_every_reply_owed_whatever_races_the_close() {
    let seed0 = std::env::var("SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let trials: u64 = std::env::var("TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    report(format!(
        "close race: first seed {seed0:#x}, {trials} trials"
    ));
    let mut failures = Vec::new();
    for i in 0..trials {
        let seed = seed0.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if let Err(e) = trial(seed) {
            report(&e);
            failures.push(e);
            if failures.len() > 5 {
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );
}

/// `Server::stop` racing the handlers of many raw clients on the shared
/// pool: on each client's wire, EOF is last and follows the reply to every
/// request a handler ran for it.
#[test]
fn server_stop_sends_eof_after_every_reply_owed_to_each_client() {
    use packetstream::{Server, ServerConfig};
    use std::net::{TcpListener, TcpStream};
    let seed0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    report(format!("server stop race: first seed {seed0:#x}"));
    for round in 0..15u64 {
        let seed = seed0.wrapping_add(round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut rng = Rng::new(seed);
        let n_clients = 2 + rng.below(10) as usize;
        let threads = 1 + rng.below(6) as usize;
        let ran: Arc<Mutex<HashSet<(u8, u64)>>> = Arc::default();
        let handler = {
            let ran = Arc::clone(&ran);
            move |rq: Request| {
                let spin = rq.tag % 5;
                if spin > 0 {
                    thread::sleep(Duration::from_micros(spin * 50));
                }
                ran.lock().unwrap().insert((rq.payload[0], rq.tag));
                Ok(Reply {
                    flags: 0,
                    payload: rq.payload,
                })
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::serve_tcp(
            listener,
            ServerConfig::new(
                Config::default()
                    .name(format!("ss{round}"))
                    .handler(handler),
            )
            .handler_threads(threads),
        )
        .unwrap();
        let n_requests = 20 + rng.below(200);
        let clients: Vec<_> = (0..n_clients)
            .map(|k| {
                let stream = TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(LIMIT)).unwrap();
                stream.set_write_timeout(Some(LIMIT)).unwrap();
                let mut writer = stream.try_clone().unwrap();
                let send = thread::spawn(move || {
                    let mut sent = 0;
                    for tag in 0..n_requests {
                        let mut bytes = Vec::new();
                        request(tag, 1, 0, &[k as u8]).encode_into(&mut bytes);
                        if writer.write_all(&bytes).is_err() {
                            break;
                        }
                        sent += 1;
                    }
                    sent
                });
                let read = thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = Vec::new();
                    let mut packets = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let mut saw_eof = false;
                    loop {
                        use std::io::Read;
                        let n = match stream.read(&mut chunk) {
                            Ok(n) => n,
                            // This client's requests may follow its EOF
                            // (the writer goes on), and the server, closing
                            // with them unread, resets the stream.
                            Err(_) if saw_eof => break,
                            Err(e) => return Err(format!("read: {e}")),
                        };
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let (got, rest) = common::decode_all(&buf);
                        let used = buf.len() - rest;
                        buf.drain(..used);
                        let eof = got.iter().any(|p| p.is_eof());
                        packets.extend(got);
                        if eof && !saw_eof {
                            saw_eof = true;
                            // Our EOF, for the server's close to end; then
                            // read whatever else comes, to the end.
                            let mut b = Vec::new();
                            Packet::eof().encode_into(&mut b);
                            let _ = stream.write_all(&b);
                        }
                    }
                    Ok(packets)
                });
                (k as u8, send, read)
            })
            .collect();
        // Every client taken in: one still in the listener's backlog when
        // the stop begins is never served, and gets no packet at all.
        common::wait_for("every client accepted", LIMIT, || {
            server.accepted() == n_clients as u64
        });
        thread::sleep(Duration::from_micros(rng.below(3000)));
        let stop = thread::spawn(move || server.stop_timeout(LIMIT));
        let stopped = stop.join().unwrap();
        assert!(stopped.is_ok(), "seed {seed:#x}: {stopped:?}");
        let ran = ran.lock().unwrap().clone();
        for (k, send, read) in clients {
            let _sent = send.join().unwrap();
            let packets = read
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("seed {seed:#x}: {e}"));
            let eof_at = packets
                .iter()
                .position(Packet::is_eof)
                .unwrap_or_else(|| {
                    panic!(
                        "seed {seed:#x}: client {k} of {n_clients}: no EOF in {} packets, the last {:?}",
                        packets.len(),
                        &packets[packets.len().saturating_sub(3)..]
                    )
                });
            assert_eq!(
                eof_at,
                packets.len() - 1,
                "seed {seed:#x}: client {k}: packets after EOF: {:?}",
                &packets[eof_at..]
            );
            let mut answered = HashSet::new();
            for p in &packets {
                if let PacketKind::Response { .. } = p.kind {
                    if p.channel == 0 {
                        assert!(
                            answered.insert(p.tag),
                            "seed {seed:#x}: client {k}: two replies to {}",
                            p.tag
                        );
                    }
                }
            }
            for &(client, tag) in &ran {
                if client == k {
                    assert!(
                        answered.contains(&tag),
                        "seed {seed:#x}: client {k}: request {tag} ran, no reply before EOF"
                    );
                }
            }
        }
    }
}
