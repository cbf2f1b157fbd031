//! Property tests of the codec: packet sequences round-trip, and arbitrary
//! or mutated byte streams never panic the decoder, never make it allocate
//! past the limit, and never hang or panic a live connection.
//!
//! `PROPTEST_CASES=n` sets the number of cases of every property (the live
//! connection property runs a tenth as many).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use packetstream::{
    Config, Error, Packet, PacketConnection, PacketKind, PayloadWrite, Reply, Request,
};
use proptest::prelude::*;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn kind() -> impl Strategy<Value = PacketKind> {
    prop_oneof![
        (any::<u64>(), any::<u64>())
            .prop_map(|(rq_type, flags)| PacketKind::Request { rq_type, flags }),
        (any::<bool>(), any::<u64>()).prop_map(|(ok, flags)| PacketKind::Response { ok, flags }),
        any::<u64>().prop_map(|flags| PacketKind::Control { flags }),
    ]
}

/// Values that hit every varint length, not just the long ones.
fn wide_u64() -> impl Strategy<Value = u64> {
    (0u32..64, any::<u64>()).prop_map(|(bits, x)| x >> bits)
}

fn packet() -> impl Strategy<Value = Packet> {
    (
        prop_oneof![Just(0u64), wide_u64()],
        wide_u64(),
        kind(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(channel, tag, kind, payload)| Packet {
            channel,
            tag,
            kind,
            payload,
        })
}

/// A reader that records the largest buffer it was asked to fill: the
/// decoder reads a payload into a buffer of the payload's size, so this is
/// its largest allocation.
struct Recording<'a> {
    src: &'a [u8],
    largest: usize,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.largest = self.largest.max(buf.len());
        self.src.read(buf)
    }
}

/// What a decoder made of a stream: the packets, and how it ended.
#[derive(Debug, PartialEq)]
struct Decoded {
    packets: Vec<Packet>,
    /// True if it ended cleanly: every byte was part of a whole packet.
    clean: bool,
}

/// Decodes `stream` with `Packet::decode`, as a buffer-based reader would.
fn decode_all(stream: &[u8], max: u64) -> Decoded {
    let mut packets = Vec::new();
    let mut rest = stream;
    loop {
        match Packet::decode(rest, max) {
            Ok(Some((packet, used))) => {
                assert!(used > 0 && used <= rest.len());
                assert!(packet.payload.len() as u64 <= max);
                packets.push(packet);
                rest = &rest[used..];
            }
            Ok(None) => {
                return Decoded {
                    packets,
                    clean: rest.is_empty(),
                }
            }
            Err(e) => {
                assert!(
                    matches!(e, Error::Malformed { .. } | Error::TooLarge { .. }),
                    "{e:?}"
                );
                return Decoded {
                    packets,
                    clean: false,
                };
            }
        }
    }
}

/// Reads `stream` with `Packet::read_from`, as the receive thread does,
/// checking that no buffer past `max` bytes is ever asked for.
fn read_all(stream: &[u8], max: u64) -> Decoded {
    let mut r = Recording {
        src: stream,
        largest: 0,
    };
    let mut packets = Vec::new();
    let clean = loop {
        match Packet::read_from(&mut r, max) {
            Ok(Some(packet)) => packets.push(packet),
            Ok(None) => break true,
            Err(e) => {
                assert!(
                    matches!(e, Error::Malformed { .. } | Error::TooLarge { .. }),
                    "{e:?}"
                );
                break false;
            }
        }
    };
    assert!(
        r.largest as u64 <= max.max(1),
        "asked for {} bytes, limit {max}",
        r.largest
    );
    Decoded { packets, clean }
}

fn encode_all(packets: &[Packet]) -> Vec<u8> {
    let mut stream = Vec::new();
    for p in packets {
        let before = stream.len();
        p.encode_into(&mut stream);
        assert_eq!(stream.len() - before, p.encoded_len());
    }
    stream
}

/// One change to a byte stream.
#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, u8),
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), 0u8..8).prop_map(|(i, bit)| Mutation::Flip(i, bit)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(stream: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = stream.len();
        match *m {
            Mutation::Insert(i, b) => stream.insert(i % (len + 1), b),
            _ if len == 0 => {}
            Mutation::Set(i, b) => stream[i % len] = b,
            Mutation::Flip(i, bit) => stream[i % len] ^= 1 << bit,
            Mutation::Delete(i) => {
                stream.remove(i % len);
            }
            Mutation::Truncate(i) => stream.truncate(i % len),
        }
    }
}

/// Both decoders agree on any stream: the same packets, and the same
/// verdict on whether it ended cleanly.
fn check_stream(stream: &[u8], max: u64) -> Decoded {
    let decoded = decode_all(stream, max);
    let read = read_all(stream, max);
    assert_eq!(decoded, read);
    read
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1000)))]

    #[test]
    fn any_packet_sequence_round_trips(packets in prop::collection::vec(packet(), 0..20)) {
        let stream = encode_all(&packets);
        let got = check_stream(&stream, 1 << 20);
        prop_assert!(got.clean);
        prop_assert_eq!(got.packets, packets);
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_allocate_past_the_limit(
        stream in prop::collection::vec(any::<u8>(), 0..600),
        max in prop_oneof![0u64..64, 0u64..4096, Just(u64::from(u32::MAX))],
    ) {
        check_stream(&stream, max);
    }

    #[test]
    fn mutated_streams_never_panic_or_allocate_past_the_limit(
        packets in prop::collection::vec(packet(), 1..8),
        mutations in prop::collection::vec(mutation(), 1..6),
        max in prop_oneof![0u64..400, Just(1u64 << 20)],
    ) {
        let mut stream = encode_all(&packets);
        mutate(&mut stream, &mutations);
        check_stream(&stream, max);
    }

    #[test]
    fn a_packet_over_the_limit_is_refused_whatever_follows(
        len in 1025u64..u64::MAX,
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        // A BSUInt length prefix of `len`, then the tail.
        let mut stream = Vec::new();
        stream.put_bs_uint(len);
        stream.extend(tail);
        let got = check_stream(&stream, 1024);
        prop_assert!(got.packets.is_empty() && !got.clean);
        let refused = matches!(Packet::decode(&stream, 1024), Err(Error::TooLarge { .. }));
        prop_assert!(refused, "not refused");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1000) / 10))]

    #[test]
    fn a_live_connection_fed_any_stream_answers_every_request_once_and_ends(
        packets in prop::collection::vec(packet(), 0..6),
        mutations in prop::collection::vec(mutation(), 0..4),
        garbage in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut stream = encode_all(&packets);
        mutate(&mut stream, &mutations);
        stream.extend(garbage);
        let (a, mut b) = UnixStream::pair().unwrap();
        let conn = PacketConnection::from_unix_stream(
            a,
            Config::default()
                .max_packet_len(1 << 16)
                .handler(|rq: Request| Ok(Reply::payload(rq.payload))),
        )
        .unwrap();
        let pending = conn.submit(1, 0, b"mine").unwrap();
        b.write_all(&stream).unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let patience = Duration::from_secs(20);
        // A stream without EOF ends at its end: the one request is answered
        // by the stream or fails with the connection, never hangs.
        let res = pending.wait_timeout(patience);
        prop_assert!(!matches!(res, Err(Error::Timeout { .. })), "{res:?}");
        if let Err(e) = &res {
            // Answered by the stream: not ok, or too large for the limit;
            // or failed with the connection.
            prop_assert!(
                e.is_disconnect()
                    || e.failure_reason().is_some()
                    || matches!(e, Error::TooLarge { .. } | Error::ResponseTooLarge { .. }),
                "{e:?}"
            );
        }
        let res = conn.close_timeout(patience);
        prop_assert!(!matches!(res, Err(Error::Timeout { .. })), "{res:?}");
        prop_assert!(conn.submit(1, 0, b"").unwrap_err().is_disconnect());
    }
}
