//! The block store example as a service: 10,000 blocks over TCP loopback from 8 client threads with every byte checked, its typed errors, its file, and its pipes.

mod common;

// Only the example's service and its put/get helpers are used here, not
// its command line; its `pub` items are public to the example, not to this
// test.
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/blockstore.rs"]
mod blockstore;

use std::collections::HashSet;
use std::net::TcpListener;
use std::thread;

use packetstream::{Config, Error, PacketConnection, Server, ServerConfig};

use blockstore::service::{Add, BlockStore, Contains, Flush, Get, HashCode, Len, TOO_LARGE};
use blockstore::{block, get_all, put_all};
use common::{close_both, pair_with, within, LIMIT};

const BLOCKS: u64 = 10_000;
const THREADS: u64 = 8;
const MAX_SIZE: usize = 4096;
const WINDOW: usize = 32;

/// The blocks thread `t` stores.
fn share(t: u64) -> Vec<u64> {
    (0..BLOCKS).filter(|i| i % THREADS == t).collect()
}

#[test]
fn ten_thousand_blocks_over_tcp_loopback_from_eight_client_threads() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config::default()
        .name("bs-srv")
        .handler(BlockStore::new().dispatcher());
    let server = Server::serve_tcp(listener, ServerConfig::new(config).max_connections(8)).unwrap();

    let clients = within("connecting and storing", move || {
        let clients: Vec<PacketConnection> = (0..THREADS)
            .map(|t| {
                let config = Config::default().name(format!("bs-client{t}"));
                PacketConnection::connect_tcp(addr, config).unwrap()
            })
            .collect();
        let hashes: Vec<Vec<HashCode>> = thread::scope(|s| {
            let workers: Vec<_> = clients
                .iter()
                .zip(0..THREADS)
                .map(|(conn, t)| {
                    s.spawn(move || {
                        let blocks: Vec<Vec<u8>> =
                            share(t).iter().map(|&i| block(i, MAX_SIZE)).collect();
                        let hashes = put_all(conn, &blocks, WINDOW).unwrap();
                        for (data, hash) in blocks.iter().zip(&hashes) {
                            assert_eq!(*hash, HashCode::of(data), "ADD's hash of a block");
                        }
                        assert_eq!(hashes.len(), blocks.len());
                        hashes
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        (clients, hashes)
    });
    let (clients, hashes) = clients;

    // Each thread fetches another thread's blocks, over its own connection.
    let (clients, hashes) = within("fetching and checking", move || {
        thread::scope(|s| {
            let workers: Vec<_> = clients
                .iter()
                .zip(0..THREADS)
                .map(|(conn, t)| {
                    let other = (t + 1) % THREADS;
                    let hashes = &hashes[other as usize];
                    s.spawn(move || {
                        let got = get_all(conn, hashes, WINDOW).unwrap();
                        let mut n_checked = 0;
                        for (i, data) in share(other).into_iter().zip(got) {
                            let data = data.unwrap_or_else(|| panic!("block {i} not found"));
                            assert!(data == block(i, MAX_SIZE), "block {i} differs");
                            n_checked += 1;
                        }
                        assert_eq!(n_checked, hashes.len());
                        assert!(conn.request(&Contains(hashes[0])).unwrap());
                    })
                })
                .collect();
            for worker in workers {
                worker.join().unwrap();
            }
        });
        (clients, hashes)
    });

    let distinct: HashSet<HashCode> = hashes.iter().flatten().copied().collect();
    assert_eq!(hashes.iter().map(Vec::len).sum::<usize>(), BLOCKS as usize);
    let conn = &clients[0];
    assert_eq!(conn.request(&Len).unwrap(), distinct.len() as u64);
    let unknown = HashCode::of(b"never stored");
    assert!(!distinct.contains(&unknown));
    assert_eq!(conn.request(&Get(unknown)).unwrap(), None);
    assert!(!conn.request(&Contains(unknown)).unwrap());
    conn.request(&Flush).unwrap();
    assert_eq!(server.accepted(), THREADS);

    within("stopping", move || {
        server.stop_timeout(LIMIT).unwrap();
        for client in clients {
            client.join().unwrap();
        }
    });
}

fn store_pair(store: BlockStore) -> (PacketConnection, PacketConnection) {
    pair_with(
        Config::default(),
        Config::default().handler(store.dispatcher()),
    )
}

#[test]
fn a_block_over_the_limit_is_refused_with_flags_and_reason() {
    let (client, server) = store_pair(BlockStore::new().max_block(100));
    let hash = client.request(&Add { data: vec![1; 100] }).unwrap();
    assert_eq!(hash, HashCode::of(&[1; 100]));
    match client.request(&Add { data: vec![1; 101] }) {
        Err(Error::Failed { flags, payload, .. }) => {
            assert_eq!(flags, TOO_LARGE);
            assert_eq!(payload, b"block of 101 bytes exceeds limit of 100");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(client.request(&Len).unwrap(), 1);
    close_both(&client, &server);
}

#[test]
fn the_store_reads_back_its_file_after_flush() {
    let path = std::env::temp_dir().join(format!(
        "packetstream-blockstore-{}.dat",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let blocks: Vec<Vec<u8>> = (0..50).map(|i| block(i, 1000)).collect();
    let (client, server) = store_pair(BlockStore::open(&path).unwrap());
    let hashes = put_all(&client, &blocks, 8).unwrap();
    // Storing a block twice appends it once.
    client
        .request(&Add {
            data: blocks[0].clone(),
        })
        .unwrap();
    client.request(&Flush).unwrap();
    close_both(&client, &server);

    let (client, server) = store_pair(BlockStore::open(&path).unwrap());
    let distinct: HashSet<&HashCode> = hashes.iter().collect();
    assert_eq!(client.request(&Len).unwrap(), distinct.len() as u64);
    let got = get_all(&client, &hashes, 8).unwrap();
    for (data, want) in got.into_iter().zip(&blocks) {
        assert_eq!(data.as_ref(), Some(want));
    }
    close_both(&client, &server);
    let file_len = std::fs::metadata(&path).unwrap().len();
    let distinct_bytes: usize = blocks
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| b.len() + if b.len() < 128 { 1 } else { 2 })
        .sum::<usize>()
        + usize::from(blocks.iter().any(Vec::is_empty));
    assert_eq!(file_len, distinct_bytes as u64);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn the_store_serves_over_a_pair_of_pipes_as_a_child_process_would() {
    let (from_client, to_server) = std::io::pipe().unwrap();
    let (from_server, to_client) = std::io::pipe().unwrap();
    let server = PacketConnection::new(
        from_client,
        to_client,
        Config::default().handler(BlockStore::new().dispatcher()),
    )
    .unwrap();
    let client = PacketConnection::new(from_server, to_server, Config::default()).unwrap();
    let blocks: Vec<Vec<u8>> = (0..300).map(|i| block(i, 20_000)).collect();
    let hashes = put_all(&client, &blocks, 16).unwrap();
    let got = get_all(&client, &hashes, 16).unwrap();
    for (data, want) in got.into_iter().zip(&blocks) {
        assert_eq!(data.as_ref(), Some(want));
    }
    close_both(&client, &server);
}
