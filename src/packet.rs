//! The wire format: BSUInt varints and packets, exactly as `cs.packetstream`
//! 20240630 writes them.
//!
//! ```text
//! packet  = BSUInt(len) body                       len = number of body bytes
//! body    = BSUInt(tag)
//!           BSUInt(header)                         header = flags << 2
//!                                                         | is_request << 1
//!                                                         | has_channel
//!           [BSUInt(channel)]                      only if channel != 0
//!           [BSUInt(rq_type + 1)]                  only for requests
//!           payload                                the rest of the body
//!
//! BSUInt: big-endian 7-bit groups, high bit set on every byte but the last
//!         0 -> 00    127 -> 7f    128 -> 81 00    16384 -> 81 80 00
//! ```
//!
//! - A response's wire flags carry the ok bit lowest: `flags << 1 | ok`. With
//!   64-bit flags a response header is therefore 67 bits wide, so varints are
//!   decoded into `u128` and range-checked per field.
//! - Wire `rq_type` 0 is reserved for two control packets on channel 0: EOF
//!   (tag 0) and end-of-requests "ERQ" (tag 1). Application request types are
//!   shifted up by one on the wire, so the whole `u64` range is usable.
//! - A varint may be at most [`MAX_VARINT_LEN`] bytes long; longer ones, and
//!   values too wide for their field, are decode errors.

use std::io::{self, Read};

use crate::error::{Error, Result};
use crate::varint::{self, MAX_VARINT_LEN};

/// The longest possible packet head: the length prefix, tag, header, channel
/// and request type varints.
pub(crate) const MAX_HEAD_LEN: usize = 5 * MAX_VARINT_LEN;

/// The default limit on a packet's length (the body, without its length
/// prefix): 64 MiB.
pub const DEFAULT_MAX_PACKET_LEN: u64 = 64 << 20;

/// Tag of the EOF control packet on channel 0.
pub(crate) const EOF_TAG: u64 = 0;
/// Tag of the end-of-requests control packet on channel 0.
pub(crate) const ERQ_TAG: u64 = 1;

/// What a packet is: a request, a response or a control packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketKind {
    /// A request. `rq_type` is the application's value; the wire carries
    /// `rq_type + 1`.
    Request {
        /// The application's request type.
        rq_type: u64,
        /// The request flags.
        flags: u64,
    },
    /// A response to the request with the same channel and tag.
    Response {
        /// Whether the request succeeded.
        ok: bool,
        /// The response flags, the ok bit removed.
        flags: u64,
    },
    /// A request with wire `rq_type` 0. Only two are valid: EOF (channel 0,
    /// tag 0) and ERQ (channel 0, tag 1), each with flags 0 and no payload.
    Control {
        /// The flags, 0 in a valid control packet.
        flags: u64,
    },
}

/// One packet as it travels on the wire, to encode and decode single
/// packets in tools and tests.
///
/// The bytes are those of `cs.packetstream` 20240630. Numbers are BSUInt
/// varints: 7 bits a byte, most significant group first, the high bit set
/// on every byte but the last (`127` is `7f`, `128` is `81 00`). A packet
/// is its length, then the body:
///
/// ```text
/// call(rq_type 1, flags 7, b"hi"), the first request on channel 0:
///
///   05  02  1e  02  68 69
///   │   │   │   │   └───┴── payload "hi": the rest of the body
///   │   │   │   └────────── rq_type + 1 = 2 (requests only; wire 0 is a control packet)
///   │   │   └────────────── header = flags << 2 | is_request << 1 | has_channel
///   │   │                          = 7 << 2 | 1 << 1 | 0 = 0x1e
///   │   └────────────────── tag 2 (channel 0's tags 0 and 1 belong to EOF and ERQ)
///   └────────────────────── length of the body: 5 bytes
///
/// its ok response, flags 7, b"hi":
///
///   04  02  3c  68 69
///           └── header = (flags << 1 | ok) << 2 = (7 << 1 | 1) << 2 = 0x3c
///
/// the same request on channel 5 (tag 0, the first on that channel):
///
///   06  00  1f  05  02  68 69
///           │   └── channel, present only when not 0 (has_channel = 1)
///           └────── 0x1e | 1
///
/// ERQ = 03 01 02 00    EOF = 03 00 02 00    (tag 1 or 0, a request of wire rq_type 0)
/// ```
///
/// In code:
///
/// ```
/// use packetstream::{PacketKind, Packet};
///
/// let wire = |packet: Packet| {
///     let mut buf = Vec::new();
///     packet.encode_into(&mut buf);
///     buf
/// };
/// let request = |channel, tag| Packet {
///     channel,
///     tag,
///     kind: PacketKind::Request { rq_type: 1, flags: 7 },
///     payload: b"hi".to_vec(),
/// };
/// assert_eq!(wire(request(0, 2)), [0x05, 0x02, 0x1e, 0x02, b'h', b'i']);
/// assert_eq!(wire(request(5, 0)), [0x06, 0x00, 0x1f, 0x05, 0x02, b'h', b'i']);
/// let response = Packet {
///     channel: 0,
///     tag: 2,
///     kind: PacketKind::Response { ok: true, flags: 7 },
///     payload: b"hi".to_vec(),
/// };
/// assert_eq!(wire(response), [0x04, 0x02, 0x3c, b'h', b'i']);
/// assert_eq!(wire(Packet::erq()), [0x03, 0x01, 0x02, 0x00]);
/// assert_eq!(wire(Packet::eof()), [0x03, 0x00, 0x02, 0x00]);
/// ```
///
/// A response's flags carry the ok bit lowest, so with 64-bit flags a
/// response header is 67 bits wide; the request types of the application
/// are shifted up by one on the wire, so every `u64` is usable.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Packet {
    /// The channel; 0 is the default and the only one the reference serves.
    pub channel: u64,
    /// The tag, unique among the sender's requests on this channel.
    pub tag: u64,
    /// Request, response or control, with the type and flags.
    pub kind: PacketKind,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packet")
            .field("channel", &self.channel)
            .field("tag", &self.tag)
            .field("kind", &self.kind)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Packet {
    /// The EOF control packet: the sender will send nothing more.
    pub fn eof() -> Packet {
        Packet::control(EOF_TAG)
    }

    /// The end-of-requests control packet: the sender will send no more
    /// requests, but still answers the ones it has.
    pub fn erq() -> Packet {
        Packet::control(ERQ_TAG)
    }

    fn control(tag: u64) -> Packet {
        Packet {
            channel: 0,
            tag,
            kind: PacketKind::Control { flags: 0 },
            payload: Vec::new(),
        }
    }

    /// True if this is the EOF control packet.
    pub fn is_eof(&self) -> bool {
        *self == Packet::eof()
    }

    /// True if this is the end-of-requests control packet.
    pub fn is_erq(&self) -> bool {
        *self == Packet::erq()
    }

    /// Appends the packet's wire bytes, length prefix first, to `buf`.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        let head = Head::new(self.channel, self.tag, self.kind, self.payload.len());
        buf.extend_from_slice(head.as_bytes());
        buf.extend_from_slice(&self.payload);
    }

    /// The number of bytes [`encode_into`](Packet::encode_into) appends.
    pub fn encoded_len(&self) -> usize {
        Head::new(self.channel, self.tag, self.kind, self.payload.len())
            .packet_len(self.payload.len())
    }

    /// Decodes one packet from the front of `src`.
    ///
    /// Returns `Ok(Some((packet, n)))` after a whole packet of `n` bytes,
    /// `Ok(None)` if `src` holds only the beginning of one, and `Err` if the
    /// bytes cannot be a valid packet or announce more than `max_len` bytes.
    ///
    /// # Errors
    ///
    /// [`Error::Malformed`] or [`Error::TooLarge`].
    pub fn decode(src: &[u8], max_len: u64) -> Result<Option<(Packet, usize)>> {
        let Some((len, prefix)) = varint::parse(src)? else {
            return Ok(None);
        };
        let len = check_len(len, max_len)?;
        // A length near the end of the address space is never all there.
        let Some(body) = prefix.checked_add(len).and_then(|end| src.get(prefix..end)) else {
            return Ok(None);
        };
        let head = parse_body_head(body)?;
        let packet = head.into_packet(payload_of(&body[len - head.payload_len..]));
        Ok(Some((packet, prefix + len)))
    }

    /// Reads one packet from `r`.
    ///
    /// Returns `Ok(None)` on a clean end of stream before the first byte of a
    /// packet. Reads exactly the packet's bytes and allocates only its
    /// payload, after checking the length against `max_len`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] from the reader, [`Error::Malformed`] for bad bytes or a
    /// stream that ends inside a packet, [`Error::TooLarge`] for a packet over
    /// `max_len`.
    pub fn read_from(r: &mut impl Read, max_len: u64) -> Result<Option<Packet>> {
        match read_frame_head(r, max_len)? {
            None => Ok(None),
            Some(Frame::Whole(head)) => {
                let payload = read_payload(r, &head)?;
                Ok(Some(head.into_packet(payload)))
            }
            Some(Frame::TooLarge { len, .. }) => Err(Error::TooLarge { len, max: max_len }),
        }
    }
}

/// The parsed front of a packet body: everything but the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BodyHead {
    pub(crate) channel: u64,
    pub(crate) tag: u64,
    pub(crate) kind: PacketKind,
    /// The body's length, as the prefix announced it.
    pub(crate) body_len: u64,
    /// Bytes of the payload still to come.
    pub(crate) payload_len: usize,
}

/// A packet's length on the wire, its length prefix included.
pub(crate) fn wire_len(body_len: u64) -> u64 {
    (varint::len(u128::from(body_len)) as u64).saturating_add(body_len)
}

impl BodyHead {
    /// True if this is the head of the EOF control packet.
    pub(crate) fn is_eof(&self) -> bool {
        self.payload_len == 0 && self.into_packet(Vec::new()).is_eof()
    }

    fn into_packet(self, payload: Vec<u8>) -> Packet {
        Packet {
            channel: self.channel,
            tag: self.tag,
            kind: self.kind,
            payload,
        }
    }
}

/// What [`read_frame_head`] found at the start of a packet.
#[derive(Debug)]
pub(crate) enum Frame {
    /// A packet within the limit; its payload is next in the stream.
    Whole(BodyHead),
    /// A packet over the limit, with its head if that could be read (then
    /// `payload_len` is what remains unread), or `None` if it could not.
    TooLarge { len: u64, head: Option<BodyHead> },
}

/// Reads a length prefix and the packet head after it, byte by byte (a
/// `BufReader` makes this cheap), never past the packet. `Ok(None)` is a
/// clean end of stream before the first byte.
pub(crate) fn read_frame_head(r: &mut impl Read, max_len: u64) -> Result<Option<Frame>> {
    let mut prefix = [0u8; MAX_VARINT_LEN];
    let mut n = 0;
    let len = loop {
        let Some(byte) = read_byte(r)? else {
            if n == 0 {
                return Ok(None);
            }
            return Err(truncated());
        };
        prefix[n] = byte;
        n += 1;
        if let Some((len, _)) = varint::parse(&prefix[..n])? {
            break fit_u64(len, "packet length exceeds 64 bits")?;
        }
    };
    if len > max_len {
        let head = match read_body_head(r, len) {
            Ok(head) => Some(head),
            // The stream failed inside the head (a read timeout ran out,
            // say): that, not the packet's size, ends the connection.
            Err(e @ Error::Io(_)) => return Err(e),
            // A head that cannot be read, or a stream that ends inside it:
            // the packet's size is the clearer error.
            Err(_) => None,
        };
        return Ok(Some(Frame::TooLarge { len, head }));
    }
    Ok(Some(Frame::Whole(read_body_head(r, len)?)))
}

/// Reads the rest of a packet: its payload. The one allocation is the
/// payload itself.
pub(crate) fn read_payload(r: &mut impl Read, head: &BodyHead) -> Result<Vec<u8>> {
    // Memory grows with the bytes that arrive, not with what the head
    // announces: a peer that announces a large packet and sends little of it
    // costs little.
    let mut payload = Vec::with_capacity(head.payload_len.min(PAYLOAD_STEP));
    let mut left = head.payload_len;
    while left > 0 {
        let step = left.min(PAYLOAD_STEP);
        let at = payload.len();
        payload.resize(at + step, 0);
        read_exact_or_truncated(r, &mut payload[at..])?;
        left -= step;
    }
    Ok(payload)
}

/// How much of an announced payload is allocated ahead of the bytes that
/// fill it.
const PAYLOAD_STEP: usize = 1 << 20;

thread_local! {
    /// A small payload buffer this thread has finished with, kept for the
    /// next payload it decodes: a reply's payload, once copied into the
    /// outgoing queue, serves the next request that the same thread reads,
    /// so an inline handler that echoes allocates nothing.
    static SPARE_PAYLOAD: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The largest buffer kept by [`recycle_payload`]: one per thread.
const SPARE_PAYLOAD_MAX: usize = 1024;

/// `src` in a buffer of its own: the thread's spare, if it is large enough
/// and not much larger (a payload the application keeps holds at most
/// twice its length, or 64 bytes), else a new one.
fn payload_of(src: &[u8]) -> Vec<u8> {
    if src.is_empty() {
        return Vec::new();
    }
    let fits = |cap: usize| cap >= src.len() && cap <= (2 * src.len()).max(64);
    let spare = SPARE_PAYLOAD
        .try_with(|spare| {
            let buf = spare.take();
            if fits(buf.capacity()) {
                Some(buf)
            } else {
                spare.set(buf);
                None
            }
        })
        .ok()
        .flatten();
    match spare {
        Some(mut buf) => {
            buf.clear();
            buf.extend_from_slice(src);
            buf
        }
        None => src.to_vec(),
    }
}

/// Keeps `buf`, a payload this thread has finished with, for the next
/// payload it decodes, if it is small.
pub(crate) fn recycle_payload(buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > SPARE_PAYLOAD_MAX {
        return;
    }
    // After the thread's locals are gone, the buffer is simply dropped.
    let _gone = SPARE_PAYLOAD.try_with(|spare| spare.set(buf));
}

fn read_byte(r: &mut impl Read) -> Result<Option<u8>> {
    let mut byte = [0u8];
    loop {
        return match r.read(&mut byte) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(byte[0])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(Error::Io(e)),
        };
    }
}

/// Reads one BSUInt field of a body that has `left` bytes left.
fn read_field(r: &mut impl Read, left: &mut u64, what: &'static str) -> Result<u128> {
    let mut bytes = [0u8; MAX_VARINT_LEN];
    let mut n = 0;
    loop {
        if *left == 0 {
            return Err(Error::Malformed { reason: what });
        }
        let byte = read_byte(r)?.ok_or_else(truncated)?;
        *left -= 1;
        bytes[n] = byte;
        n += 1;
        if let Some((value, _)) = varint::parse(&bytes[..n])? {
            return Ok(value);
        }
    }
}

/// Reads the tag, header, channel and request type at the front of a packet
/// body of `body_len` bytes, leaving `r` at the payload.
pub(crate) fn read_body_head(r: &mut impl Read, body_len: u64) -> Result<BodyHead> {
    let mut left = body_len;
    body_head(body_len, |what| {
        let value = read_field(r, &mut left, what)?;
        Ok((value, left))
    })
}

/// Parses the tag, header, channel and request type at the front of `body`,
/// a whole packet body, as [`read_body_head`] reads them from a stream: one
/// parse a field, rather than a read a byte.
pub(crate) fn parse_body_head(body: &[u8]) -> Result<BodyHead> {
    let mut rest = body;
    body_head(body.len() as u64, |what| match varint::parse(rest)? {
        Some((value, used)) => {
            rest = &rest[used..];
            Ok((value, rest.len() as u64))
        }
        None => Err(Error::Malformed { reason: what }),
    })
}

/// The head of a body of `body_len` bytes, from `field`, which returns the
/// next field and the bytes of the body left after it, or the error `what`
/// says if the body ends inside it.
fn body_head(
    body_len: u64,
    mut field: impl FnMut(&'static str) -> Result<(u128, u64)>,
) -> Result<BodyHead> {
    let (tag, _) = field("packet ends inside its tag")?;
    let (header, mut left) = field("packet ends inside its header")?;
    let tag = fit_u64(tag, "tag exceeds 64 bits")?;
    let channel = if header & 1 != 0 {
        let (channel, after) = field("packet ends inside its channel")?;
        left = after;
        fit_u64(channel, "channel exceeds 64 bits")?
    } else {
        0
    };
    let wire_flags = header >> 2;
    let kind = if header & 2 != 0 {
        let flags = fit_u64(wire_flags, "request flags exceed 64 bits")?;
        let (rq_type, after) = field("packet ends inside its request type")?;
        left = after;
        match rq_type {
            0 => PacketKind::Control { flags },
            wire => PacketKind::Request {
                rq_type: fit_u64(wire - 1, "request type exceeds 64 bits")?,
                flags,
            },
        }
    } else {
        PacketKind::Response {
            ok: wire_flags & 1 != 0,
            flags: fit_u64(wire_flags >> 1, "response flags exceed 64 bits")?,
        }
    };
    let payload_len = usize::try_from(left).map_err(|_| Error::TooLarge {
        len: body_len,
        max: usize::MAX as u64,
    })?;
    Ok(BodyHead {
        channel,
        tag,
        kind,
        body_len,
        payload_len,
    })
}

fn read_exact_or_truncated(r: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            truncated()
        } else {
            Error::Io(e)
        }
    })
}

fn truncated() -> Error {
    Error::Malformed {
        reason: "stream ended inside a packet",
    }
}

fn check_len(len: u128, max_len: u64) -> Result<usize> {
    let len = u64::try_from(len).map_err(|_| Error::Malformed {
        reason: "packet length exceeds 64 bits",
    })?;
    if len > max_len {
        return Err(Error::TooLarge { len, max: max_len });
    }
    usize::try_from(len).map_err(|_| Error::TooLarge { len, max: max_len })
}

fn fit_u64(value: u128, reason: &'static str) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::Malformed { reason })
}

/// A packet's encoded head: its length prefix and everything up to the
/// payload, built on the stack. The body's fields are written after room
/// for the longest prefix, and the prefix right before them, so nothing is
/// moved.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Head {
    bytes: [u8; MAX_HEAD_LEN],
    /// Where the prefix starts in `bytes`.
    start: usize,
    /// Where the head ends in `bytes`.
    end: usize,
    /// The length the prefix announces: the body, payload included.
    pub(crate) body_len: u64,
}

impl Head {
    pub(crate) fn new(channel: u64, tag: u64, kind: PacketKind, payload_len: usize) -> Head {
        let mut bytes = [0u8; MAX_HEAD_LEN];
        let mut end = MAX_VARINT_LEN;
        end += varint::put(u128::from(tag), &mut bytes[end..]);
        let (is_request, wire_flags, rq_type) = match kind {
            PacketKind::Request { rq_type, flags } => {
                (true, u128::from(flags), Some(u128::from(rq_type) + 1))
            }
            PacketKind::Control { flags } => (true, u128::from(flags), Some(0)),
            PacketKind::Response { ok, flags } => {
                (false, u128::from(flags) << 1 | u128::from(ok), None)
            }
        };
        let header = wire_flags << 2 | u128::from(is_request) << 1 | u128::from(channel != 0);
        end += varint::put(header, &mut bytes[end..]);
        if channel != 0 {
            end += varint::put(u128::from(channel), &mut bytes[end..]);
        }
        if let Some(rq_type) = rq_type {
            end += varint::put(rq_type, &mut bytes[end..]);
        }
        let body_len = (end - MAX_VARINT_LEN + payload_len) as u64;
        let start = MAX_VARINT_LEN - varint::len(u128::from(body_len));
        varint::put(u128::from(body_len), &mut bytes[start..]);
        Head {
            bytes,
            start,
            end,
            body_len,
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    /// The length of the whole packet, length prefix included, for a head
    /// built with `payload_len`.
    pub(crate) fn packet_len(&self, payload_len: usize) -> usize {
        self.end - self.start + payload_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 20;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn a_spare_payload_buffer_is_reused_only_when_it_fits_closely() {
        // Each test runs on a thread of its own, so the spare starts empty.
        let mut kept = Vec::with_capacity(32);
        kept.extend_from_slice(&[1; 32]);
        let at = kept.as_ptr();
        recycle_payload(kept);
        let reused = payload_of(&[2; 20]);
        assert_eq!(reused, [2; 20]);
        assert_eq!(reused.as_ptr(), at, "a spare that fits is reused");
        // Too small for the next payload: left for a later one.
        recycle_payload(reused);
        let fresh = payload_of(&[3; 40]);
        assert_eq!(fresh, [3; 40]);
        assert_ne!(fresh.as_ptr(), at);
        // Far larger than a short payload: a payload the application keeps
        // must not hold a large buffer.
        let mut large = Vec::with_capacity(1000);
        large.push(0);
        let large_at = large.as_ptr();
        recycle_payload(large);
        let short = payload_of(&[4; 3]);
        assert_ne!(short.as_ptr(), large_at);
        assert!(short.capacity() < 64);
        // Past the limit, a buffer is not kept at all.
        recycle_payload(Vec::with_capacity(SPARE_PAYLOAD_MAX + 1));
        let next = payload_of(&[5; 900]);
        assert_eq!(
            next.as_ptr(),
            large_at,
            "the kept buffer is still the 1000-byte one"
        );
        assert_eq!(payload_of(&[]).capacity(), 0);
    }

    fn encode(packet: &Packet) -> Vec<u8> {
        let mut buf = Vec::new();
        packet.encode_into(&mut buf);
        assert_eq!(buf.len(), packet.encoded_len());
        buf
    }

    #[test]
    fn reference_vectors_decode_and_reencode_byte_exact() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/vectors.json"
        ))
        .expect("tests/data/vectors.json");
        let vectors: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(vectors.len(), 900);
        for v in &vectors {
            let wire = hex(v["wire"].as_str().unwrap());
            let (packet, used) = Packet::decode(&wire, MAX).unwrap().expect("a whole packet");
            assert_eq!(used, wire.len());
            assert_eq!(packet.channel, v["channel"].as_u64().unwrap());
            assert_eq!(packet.tag, v["tag"].as_u64().unwrap());
            assert_eq!(packet.payload, hex(v["payload"].as_str().unwrap()));
            let flags = v["flags"].as_u64().unwrap();
            if v["is_request"].as_bool().unwrap() {
                // The vectors give the wire rq_type, ours is one less.
                let wire_rq_type = v["rq_type"].as_u64().unwrap();
                assert_eq!(
                    packet.kind,
                    PacketKind::Request {
                        rq_type: wire_rq_type - 1,
                        flags
                    }
                );
            } else {
                // The vectors' response flags include the ok bit.
                assert_eq!(
                    packet.kind,
                    PacketKind::Response {
                        ok: flags & 1 == 1,
                        flags: flags >> 1
                    }
                );
            }
            assert_eq!(encode(&packet), wire, "{v}");
            let read = Packet::read_from(&mut wire.as_slice(), MAX)
                .unwrap()
                .unwrap();
            assert_eq!(read, packet);
        }
    }

    #[test]
    fn a_length_prefix_that_never_ends_is_an_error() {
        let eleven = [0x80u8; 11];
        // An error, not a wait for more.
        assert!(matches!(
            Packet::decode(&eleven, MAX),
            Err(Error::Malformed { .. })
        ));
        let mut stream = &eleven[..];
        assert!(matches!(
            Packet::read_from(&mut stream, MAX),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn full_u64_flags_round_trip_in_requests_and_responses() {
        for flags in [0, 1, u64::MAX >> 2, 1 << 62, 1 << 63, u64::MAX] {
            for kind in [
                PacketKind::Request {
                    rq_type: u64::MAX,
                    flags,
                },
                PacketKind::Response { ok: true, flags },
                PacketKind::Response { ok: false, flags },
                PacketKind::Control { flags },
            ] {
                let packet = Packet {
                    channel: u64::MAX,
                    tag: u64::MAX,
                    kind,
                    payload: b"x".to_vec(),
                };
                let wire = encode(&packet);
                assert_eq!(
                    Packet::decode(&wire, MAX).unwrap(),
                    Some((packet, wire.len()))
                );
            }
        }
    }

    /// Builds a body from raw varints, for values our encoder would never
    /// produce.
    fn raw_packet(fields: &[u128]) -> Vec<u8> {
        let body: Vec<u8> = fields.iter().flat_map(|&f| varint::to_vec(f)).collect();
        let mut wire = varint::to_vec(body.len() as u128);
        wire.extend(body);
        wire
    }

    #[test]
    fn values_wider_than_their_field_are_decode_errors() {
        let wide = 1u128 << 64;
        let cases: [(&[u128], &str); 5] = [
            (&[wide, 0b10, 1], "tag exceeds 64 bits"),
            (&[2, wide << 2 | 0b10, 1], "request flags exceed 64 bits"),
            (&[2, wide << 3], "response flags exceed 64 bits"),
            (&[2, 0b11, wide, 1], "channel exceeds 64 bits"),
            (&[2, 0b10, wide + 1], "request type exceeds 64 bits"),
        ];
        for (fields, want) in cases {
            let wire = raw_packet(fields);
            match Packet::decode(&wire, MAX) {
                Err(Error::Malformed { reason }) => assert_eq!(reason, want),
                other => panic!("{fields:?}: {other:?}"),
            }
        }
        // The widest legal request type is u64::MAX, wire value 2^64.
        let wire = raw_packet(&[2, 0b10, wide]);
        let (packet, _) = Packet::decode(&wire, MAX).unwrap().unwrap();
        assert_eq!(
            packet.kind,
            PacketKind::Request {
                rq_type: u64::MAX,
                flags: 0
            }
        );
    }

    #[test]
    fn decode_fed_byte_by_byte_at_every_split_point() {
        let packets = [
            Packet {
                channel: 0,
                tag: 2,
                kind: PacketKind::Request {
                    rq_type: 0,
                    flags: 0,
                },
                payload: vec![],
            },
            Packet {
                channel: 300,
                tag: 1 << 40,
                kind: PacketKind::Response {
                    ok: true,
                    flags: u64::MAX,
                },
                payload: vec![7; 300],
            },
            Packet::erq(),
            Packet::eof(),
        ];
        let mut stream = Vec::new();
        for p in &packets {
            p.encode_into(&mut stream);
        }
        // Split once at every point: the decoder must wait, never fail.
        for split in 0..stream.len() {
            let mut buf = stream[..split].to_vec();
            let mut got = Vec::new();
            while let Some((p, used)) = Packet::decode(&buf, MAX).unwrap() {
                got.push(p);
                buf.drain(..used);
            }
            buf.extend_from_slice(&stream[split..]);
            while let Some((p, used)) = Packet::decode(&buf, MAX).unwrap() {
                got.push(p);
                buf.drain(..used);
            }
            assert_eq!(got, packets, "split at {split}");
            assert!(buf.is_empty());
        }
        // And one byte at a time.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for &byte in &stream {
            buf.push(byte);
            if let Some((p, used)) = Packet::decode(&buf, MAX).unwrap() {
                got.push(p);
                buf.drain(..used);
            }
        }
        assert_eq!(got, packets);
        // The reader, through a source that yields one byte per read.
        struct OneByte<'a>(&'a [u8]);
        impl Read for OneByte<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let Some((&first, rest)) = self.0.split_first() else {
                    return Ok(0);
                };
                if buf.is_empty() {
                    return Ok(0);
                }
                buf[0] = first;
                self.0 = rest;
                Ok(1)
            }
        }
        let mut r = OneByte(&stream);
        for p in &packets {
            assert_eq!(Packet::read_from(&mut r, MAX).unwrap().as_ref(), Some(p));
        }
        assert_eq!(Packet::read_from(&mut r, MAX).unwrap(), None);
    }

    #[test]
    fn truncated_packets_wait_in_decode_and_fail_in_read() {
        let packet = Packet {
            channel: 5,
            tag: 9,
            kind: PacketKind::Request {
                rq_type: 1,
                flags: 3,
            },
            payload: vec![1; 100],
        };
        let wire = encode(&packet);
        for cut in 1..wire.len() {
            assert_eq!(
                Packet::decode(&wire[..cut], MAX).unwrap(),
                None,
                "cut {cut}"
            );
            let mut r = &wire[..cut];
            match Packet::read_from(&mut r, MAX) {
                Err(Error::Malformed { reason }) => {
                    assert_eq!(reason, "stream ended inside a packet")
                }
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        assert_eq!(Packet::read_from(&mut &wire[..0], MAX).unwrap(), None);
    }

    #[test]
    fn a_body_too_short_for_its_head_is_malformed() {
        // Length 1, body holds a tag but no header.
        assert!(matches!(
            Packet::decode(&[0x01, 0x02], MAX),
            Err(Error::Malformed { .. })
        ));
        let mut r = &[0x01u8, 0x02][..];
        assert!(matches!(
            Packet::read_from(&mut r, MAX),
            Err(Error::Malformed { .. })
        ));
        // A request header with no rq_type after it.
        assert!(matches!(
            Packet::decode(&[0x02, 0x02, 0x02], MAX),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn oversize_length_is_refused_before_reading_the_body() {
        let mut wire = varint::to_vec(MAX as u128 + 1);
        wire.extend_from_slice(&[2, 2, 1]);
        match Packet::decode(&wire, MAX) {
            Err(Error::TooLarge { len, max }) => assert_eq!((len, max), (MAX + 1, MAX)),
            other => panic!("{other:?}"),
        }
        let mut r = wire.as_slice();
        assert!(matches!(
            Packet::read_from(&mut r, MAX),
            Err(Error::TooLarge { .. })
        ));
        // A length over 64 bits is malformed.
        let wire = varint::to_vec(1u128 << 64);
        assert!(matches!(
            Packet::decode(&wire, MAX),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn control_packets() {
        assert_eq!(encode(&Packet::eof()), [0x03, 0x00, 0x02, 0x00]);
        assert_eq!(encode(&Packet::erq()), [0x03, 0x01, 0x02, 0x00]);
        assert!(Packet::eof().is_eof() && !Packet::eof().is_erq());
        assert!(Packet::erq().is_erq());
    }
}
