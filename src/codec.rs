//! Payload codecs: the reference's `BSUInt`, `BSData` and `BSString`, and
//! fixed-width integers through `byteorder`, for typed request and response
//! payloads. The user-facing guide is on [`PayloadReader`].

use byteorder::ByteOrder;

use crate::error::{Error, Result};
use crate::packet::{parse_varint, MAX_VARINT_LEN};

/// Appends payload fields to a buffer. Implemented for `Vec<u8>`; every
/// method is infallible.
pub trait PayloadWrite {
    /// Appends `n` as a BSUInt: 1 to 10 bytes.
    fn put_bs_uint(&mut self, n: u64);
    /// Appends `data` as a BSData: its length as a BSUInt, then the bytes.
    fn put_bs_data(&mut self, data: &[u8]);
    /// Appends `text` as a BSString: its UTF-8 length as a BSUInt, then the
    /// UTF-8 bytes.
    fn put_bs_string(&mut self, text: &str);
    /// Appends raw bytes, with no length prefix.
    fn put_bytes(&mut self, bytes: &[u8]);
    /// Appends one byte.
    fn put_u8(&mut self, n: u8);
    /// Appends a 2-byte unsigned integer in byte order `B`.
    fn put_u16<B: ByteOrder>(&mut self, n: u16);
    /// Appends a 4-byte unsigned integer in byte order `B`.
    fn put_u32<B: ByteOrder>(&mut self, n: u32);
    /// Appends an 8-byte unsigned integer in byte order `B`.
    fn put_u64<B: ByteOrder>(&mut self, n: u64);
    /// Appends a 2-byte signed integer in byte order `B`.
    fn put_i16<B: ByteOrder>(&mut self, n: i16);
    /// Appends a 4-byte signed integer in byte order `B`.
    fn put_i32<B: ByteOrder>(&mut self, n: i32);
    /// Appends an 8-byte signed integer in byte order `B`.
    fn put_i64<B: ByteOrder>(&mut self, n: i64);
    /// Appends `value` with its [`Payload`] encoding.
    fn put<T: Payload>(&mut self, value: &T);
}

impl PayloadWrite for Vec<u8> {
    fn put_bs_uint(&mut self, n: u64) {
        let mut groups = [0u8; MAX_VARINT_LEN];
        let mut idx = MAX_VARINT_LEN;
        let mut rest = n;
        loop {
            idx -= 1;
            groups[idx] = (rest & 0x7f) as u8;
            if idx + 1 < MAX_VARINT_LEN {
                groups[idx] |= 0x80;
            }
            rest >>= 7;
            if rest == 0 {
                break;
            }
        }
        self.extend_from_slice(&groups[idx..]);
    }

    fn put_bs_data(&mut self, data: &[u8]) {
        self.put_bs_uint(data.len() as u64);
        self.extend_from_slice(data);
    }

    fn put_bs_string(&mut self, text: &str) {
        self.put_bs_data(text.as_bytes());
    }

    fn put_bytes(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    fn put_u8(&mut self, n: u8) {
        self.push(n);
    }

    fn put_u16<B: ByteOrder>(&mut self, n: u16) {
        let mut buf = [0; 2];
        B::write_u16(&mut buf, n);
        self.extend_from_slice(&buf);
    }

    fn put_u32<B: ByteOrder>(&mut self, n: u32) {
        let mut buf = [0; 4];
        B::write_u32(&mut buf, n);
        self.extend_from_slice(&buf);
    }

    fn put_u64<B: ByteOrder>(&mut self, n: u64) {
        let mut buf = [0; 8];
        B::write_u64(&mut buf, n);
        self.extend_from_slice(&buf);
    }

    fn put_i16<B: ByteOrder>(&mut self, n: i16) {
        self.put_u16::<B>(n as u16);
    }

    fn put_i32<B: ByteOrder>(&mut self, n: i32) {
        self.put_u32::<B>(n as u32);
    }

    fn put_i64<B: ByteOrder>(&mut self, n: i64) {
        self.put_u64::<B>(n as u64);
    }

    fn put<T: Payload>(&mut self, value: &T) {
        value.encode(self);
    }
}

/// A bounds-checked cursor over a payload: the reading half of the payload
/// codecs, which write and read the reference's `BSUInt`, `BSData` and
/// `BSString` and fixed-width integers in either byte order.
///
/// Each read takes its field from the front of what remains and returns
/// [`Error::Decode`] if the input is too short or the field is invalid; the
/// cursor does not move on error. Byte and string fields borrow from the
/// input, so nothing is allocated or copied unless the caller asks.
///
/// ```text
/// BSUInt    big-endian 7-bit groups, high bit set on every byte but the last,
///           at most 10 bytes        0 -> 00   127 -> 7f   128 -> 81 00
/// BSData    BSUInt(len) bytes       b"A" -> 01 41
/// BSString  BSUInt(len) UTF-8       "" -> 00
/// ```
///
/// Writing appends to a `Vec<u8>` through [`PayloadWrite`] and cannot fail.
/// Reading checks every length against the bytes that remain before it
/// takes or allocates anything. Running out of input, an overlong or
/// too-wide BSUInt, invalid UTF-8 and trailing bytes are all
/// [`Error::Decode`], whose text names the field and the offset.
///
/// The [`Payload`] trait ties the two together for whole values, and the
/// [`impl_payload!`](crate::impl_payload) macro implements it for a struct
/// field by field.
///
/// # Examples
///
/// ```
/// use packetstream::{BigEndian, PayloadReader, PayloadWrite};
///
/// let mut payload = Vec::new();
/// payload.put_bs_uint(300);
/// payload.put_bs_string("name");
/// payload.put_u32::<BigEndian>(7);
/// payload.put_bs_data(b"\x00\x01");
/// assert_eq!(payload, b"\x82\x2c\x04name\x00\x00\x00\x07\x02\x00\x01");
///
/// let mut r = PayloadReader::new(&payload);
/// assert_eq!(r.bs_uint()?, 300);
/// assert_eq!(r.bs_string()?, "name");
/// assert_eq!(r.u32::<BigEndian>()?, 7);
/// assert_eq!(r.bs_data()?, b"\x00\x01");
/// r.finish()?; // every byte was used
///
/// // Truncated input is an error that says what was missing, never a panic.
/// let err = PayloadReader::new(&payload[2..5]).bs_string().unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "cannot decode payload: truncated BSString: needs 4 bytes at offset 1, 2 remain"
/// );
/// # Ok::<(), packetstream::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct PayloadReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> PayloadReader<'a> {
    /// A reader over all of `payload`.
    pub fn new(payload: &'a [u8]) -> PayloadReader<'a> {
        PayloadReader {
            buf: payload,
            pos: 0,
        }
    }

    /// How many bytes have been read.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// How many bytes remain.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// True if every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// Reads a BSUInt.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if the input ends inside it, it is longer than
    /// [`MAX_VARINT_LEN`](crate::MAX_VARINT_LEN) bytes, or its value does
    /// not fit in a `u64`.
    pub fn bs_uint(&mut self) -> Result<u64> {
        let rest = &self.buf[self.pos..];
        let (value, n) = match parse_varint(rest) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => {
                return Err(self.error(format!(
                    "truncated BSUInt at offset {}: input ends after {} bytes",
                    self.pos,
                    rest.len()
                )))
            }
            Err(_) => {
                return Err(self.error(format!(
                    "BSUInt at offset {} is longer than {MAX_VARINT_LEN} bytes",
                    self.pos
                )))
            }
        };
        let value = u64::try_from(value)
            .map_err(|_| self.error(format!("BSUInt at offset {} exceeds 64 bits", self.pos)))?;
        self.pos += n;
        Ok(value)
    }

    /// Reads a BSData: a BSUInt length, then that many bytes, borrowed.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if the length is bad or more than the bytes that
    /// remain.
    pub fn bs_data(&mut self) -> Result<&'a [u8]> {
        self.prefixed("BSData")
    }

    /// Reads a BSString: a BSUInt length, then that many bytes of UTF-8,
    /// borrowed.
    ///
    /// # Errors
    ///
    /// As for [`bs_data`](PayloadReader::bs_data), and [`Error::Decode`] if
    /// the bytes are not UTF-8.
    pub fn bs_string(&mut self) -> Result<&'a str> {
        let start = self.pos;
        let bytes = self.prefixed("BSString")?;
        std::str::from_utf8(bytes).map_err(|e| {
            self.pos = start;
            self.error(format!("BSString at offset {start} is not UTF-8: {e}"))
        })
    }

    fn prefixed(&mut self, what: &str) -> Result<&'a [u8]> {
        let start = self.pos;
        let len = self.bs_uint()?;
        match usize::try_from(len) {
            Ok(len) if len <= self.remaining() => {
                let bytes = &self.buf[self.pos..self.pos + len];
                self.pos += len;
                Ok(bytes)
            }
            _ => {
                let err = self.error(format!(
                    "truncated {what}: needs {len} bytes at offset {}, {} remain",
                    self.pos,
                    self.remaining()
                ));
                self.pos = start;
                Err(err)
            }
        }
    }

    /// Reads exactly `n` raw bytes, borrowed.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if fewer than `n` bytes remain.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        self.take(n, "field")
    }

    /// Reads exactly `N` raw bytes into an array.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if fewer than `N` bytes remain.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N, "array")?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// Takes everything that remains, borrowed.
    pub fn rest(&mut self) -> &'a [u8] {
        let rest = &self.buf[self.pos..];
        self.pos = self.buf.len();
        rest
    }

    /// Reads one byte.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if no byte remains.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1, "u8")?[0])
    }

    /// Reads a 2-byte unsigned integer in byte order `B`.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if fewer than 2 bytes remain.
    pub fn u16<B: ByteOrder>(&mut self) -> Result<u16> {
        Ok(B::read_u16(self.take(2, "u16")?))
    }

    /// Reads a 4-byte unsigned integer in byte order `B`.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if fewer than 4 bytes remain.
    pub fn u32<B: ByteOrder>(&mut self) -> Result<u32> {
        Ok(B::read_u32(self.take(4, "u32")?))
    }

    /// Reads an 8-byte unsigned integer in byte order `B`.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if fewer than 8 bytes remain.
    pub fn u64<B: ByteOrder>(&mut self) -> Result<u64> {
        Ok(B::read_u64(self.take(8, "u64")?))
    }

    /// Reads a 2-byte signed integer in byte order `B`.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if fewer than 2 bytes remain.
    pub fn i16<B: ByteOrder>(&mut self) -> Result<i16> {
        Ok(B::read_i16(self.take(2, "i16")?))
    }

    /// Reads a 4-byte signed integer in byte order `B`.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if fewer than 4 bytes remain.
    pub fn i32<B: ByteOrder>(&mut self) -> Result<i32> {
        Ok(B::read_i32(self.take(4, "i32")?))
    }

    /// Reads an 8-byte signed integer in byte order `B`.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if fewer than 8 bytes remain.
    pub fn i64<B: ByteOrder>(&mut self) -> Result<i64> {
        Ok(B::read_i64(self.take(8, "i64")?))
    }

    /// Reads a value with its [`Payload`] decoding.
    ///
    /// # Errors
    ///
    /// As the type's [`Payload::decode`].
    pub fn read<T: Payload>(&mut self) -> Result<T> {
        let start = self.pos;
        T::decode(self).inspect_err(|_| self.pos = start)
    }

    /// Ends the read, checking that every byte was used.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if bytes remain.
    pub fn finish(self) -> Result<()> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self.error(format!(
                "{} unexpected bytes after offset {}",
                self.remaining(),
                self.pos
            )))
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error(format!(
                "truncated {what}: needs {n} bytes at offset {}, {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn error(&self, msg: String) -> Error {
        Error::Decode(msg)
    }
}

/// A value with a payload encoding: how it is written into a payload and
/// read back out.
///
/// Implemented for the reference's field types and a few compositions:
///
/// | type | encoding |
/// |---|---|
/// | `u64` | BSUInt |
/// | `bool` | BSUInt 0 or 1 |
/// | `Vec<u8>` | BSData |
/// | `String` | BSString |
/// | `[u8; N]` | `N` raw bytes |
/// | `()` | nothing |
/// | `Option<T>` | BSUInt 0, or BSUInt 1 then `T` |
/// | `(A, B)`, `(A, B, C)`, `(A, B, C, D)` | each field in turn |
///
/// For a struct, [`impl_payload!`](crate::impl_payload) writes the impl;
/// by hand it is two short methods.
///
/// # Examples
///
/// ```
/// use packetstream::{Payload, PayloadReader, PayloadWrite, Result};
///
/// #[derive(Debug, PartialEq)]
/// struct Rename {
///     from: String,
///     to: String,
/// }
///
/// impl Payload for Rename {
///     fn encode(&self, out: &mut Vec<u8>) {
///         out.put_bs_string(&self.from);
///         out.put_bs_string(&self.to);
///     }
///
///     fn decode(r: &mut PayloadReader<'_>) -> Result<Rename> {
///         Ok(Rename { from: r.read()?, to: r.read()? })
///     }
/// }
///
/// let rq = Rename { from: "a".into(), to: "b".into() };
/// assert_eq!(rq.to_bytes(), b"\x01a\x01b");
/// assert_eq!(Rename::from_bytes(b"\x01a\x01b")?, rq);
/// assert!(Rename::from_bytes(b"\x01a\x05b").is_err()); // truncated
/// # Ok::<(), packetstream::Error>(())
/// ```
pub trait Payload: Sized {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Reads a value from the front of `r`.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if the input is truncated or invalid.
    fn decode(r: &mut PayloadReader<'_>) -> Result<Self>;

    /// The encoding of `self` as a new buffer.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes a value that must use all of `bytes`.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if the input is truncated or invalid, or bytes are
    /// left over.
    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = PayloadReader::new(bytes);
        let value = Self::decode(&mut r)?;
        r.finish()?;
        Ok(value)
    }
}

impl Payload for () {
    fn encode(&self, _: &mut Vec<u8>) {}

    fn decode(_: &mut PayloadReader<'_>) -> Result<()> {
        Ok(())
    }
}

impl Payload for u64 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_bs_uint(*self);
    }

    fn decode(r: &mut PayloadReader<'_>) -> Result<u64> {
        r.bs_uint()
    }
}

impl Payload for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_bs_uint(u64::from(*self));
    }

    fn decode(r: &mut PayloadReader<'_>) -> Result<bool> {
        let start = r.position();
        match r.bs_uint()? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(Error::Decode(format!(
                "bool at offset {start} is {n}, not 0 or 1"
            ))),
        }
    }
}

impl Payload for Vec<u8> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_bs_data(self);
    }

    fn decode(r: &mut PayloadReader<'_>) -> Result<Vec<u8>> {
        Ok(r.bs_data()?.to_vec())
    }
}

impl Payload for String {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_bs_string(self);
    }

    fn decode(r: &mut PayloadReader<'_>) -> Result<String> {
        Ok(r.bs_string()?.to_owned())
    }
}

impl<const N: usize> Payload for [u8; N] {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }

    fn decode(r: &mut PayloadReader<'_>) -> Result<[u8; N]> {
        r.array()
    }
}

impl<T: Payload> Payload for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            None => out.put_bs_uint(0),
            Some(value) => {
                out.put_bs_uint(1);
                value.encode(out);
            }
        }
    }

    fn decode(r: &mut PayloadReader<'_>) -> Result<Option<T>> {
        Ok(if r.read::<bool>()? {
            Some(r.read()?)
        } else {
            None
        })
    }
}

macro_rules! tuple_payload {
    ($($name:ident $idx:tt),+) => {
        impl<$($name: Payload),+> Payload for ($($name,)+) {
            fn encode(&self, out: &mut Vec<u8>) {
                $(self.$idx.encode(out);)+
            }

            fn decode(r: &mut PayloadReader<'_>) -> Result<Self> {
                Ok(($(r.read::<$name>()?,)+))
            }
        }
    };
}

tuple_payload!(A 0, B 1);
tuple_payload!(A 0, B 1, C 2);
tuple_payload!(A 0, B 1, C 2, D 3);

/// Implements [`Payload`] for a struct, encoding its fields in the order
/// listed, each with its own `Payload` encoding.
///
/// Three forms: `impl_payload!(Name { field, .. })` for named fields,
/// `impl_payload!(Name(0, 1, ..))` for a tuple struct, and
/// `impl_payload!(Name)` for a unit struct (an empty payload).
///
/// # Examples
///
/// ```
/// use packetstream::{impl_payload, Payload};
///
/// #[derive(Debug, PartialEq)]
/// struct Put {
///     key: String,
///     value: Vec<u8>,
/// }
/// impl_payload!(Put { key, value });
///
/// #[derive(Debug, PartialEq)]
/// struct Get(String);
/// impl_payload!(Get(0));
///
/// #[derive(Debug, PartialEq)]
/// struct Ping;
/// impl_payload!(Ping);
///
/// let put = Put { key: "k".into(), value: vec![1, 2] };
/// assert_eq!(put.to_bytes(), b"\x01k\x02\x01\x02");
/// assert_eq!(Put::from_bytes(&put.to_bytes())?, put);
/// assert_eq!(Get::from_bytes(b"\x01k")?, Get("k".into()));
/// assert_eq!(Ping.to_bytes(), b"");
/// # Ok::<(), packetstream::Error>(())
/// ```
#[macro_export]
macro_rules! impl_payload {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl $crate::Payload for $ty {
            fn encode(&self, out: &mut ::std::vec::Vec<u8>) {
                $($crate::Payload::encode(&self.$field, out);)*
                let _ = out;
            }

            fn decode(r: &mut $crate::PayloadReader<'_>) -> $crate::Result<Self> {
                let _ = &r;
                ::std::result::Result::Ok($ty { $($field: r.read()?,)* })
            }
        }
    };
    ($ty:ident ( $($idx:tt),+ $(,)? )) => {
        impl $crate::Payload for $ty {
            fn encode(&self, out: &mut ::std::vec::Vec<u8>) {
                $($crate::Payload::encode(&self.$idx, out);)+
            }

            fn decode(r: &mut $crate::PayloadReader<'_>) -> $crate::Result<Self> {
                ::std::result::Result::Ok($ty($({
                    let _ = $idx;
                    r.read()?
                }),+))
            }
        }
    };
    ($ty:ident) => {
        impl $crate::Payload for $ty {
            fn encode(&self, _: &mut ::std::vec::Vec<u8>) {}

            fn decode(_: &mut $crate::PayloadReader<'_>) -> $crate::Result<Self> {
                ::std::result::Result::Ok($ty)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use byteorder::{BigEndian, LittleEndian};

    use super::*;

    fn bs_uint(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_bs_uint(n);
        out
    }

    fn decode_msg<T>(res: Result<T>) -> String {
        match res {
            Err(Error::Decode(msg)) => msg,
            Err(other) => panic!("expected a decode error, got {other:?}"),
            Ok(_) => panic!("expected a decode error, got a value"),
        }
    }

    #[test]
    fn bs_uint_matches_the_reference_test_cases() {
        // The reference's BSUInt.TEST_CASES.
        let cases: &[(u64, &[u8])] = &[
            (0, b"\x00"),
            (1, b"\x01"),
            (127, b"\x7f"),
            (128, b"\x81\x00"),
            (255, b"\x81\x7f"),
            (16383, b"\xff\x7f"),
            (16384, b"\x81\x80\x00"),
        ];
        for &(value, bytes) in cases {
            assert_eq!(bs_uint(value), bytes, "encoding {value}");
            let mut r = PayloadReader::new(bytes);
            assert_eq!(r.bs_uint().unwrap(), value);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn bs_uint_agrees_with_the_packet_codec_at_the_edges() {
        for shift in 0..64 {
            for value in [1u64 << shift, (1u64 << shift) - 1, (1u64 << shift) + 1] {
                let bytes = bs_uint(value);
                assert!(bytes.len() <= MAX_VARINT_LEN);
                let (parsed, n) = parse_varint(&bytes).unwrap().unwrap();
                assert_eq!((parsed, n), (u128::from(value), bytes.len()));
                assert_eq!(PayloadReader::new(&bytes).bs_uint().unwrap(), value);
            }
        }
        assert_eq!(bs_uint(u64::MAX).len(), 10);
        assert_eq!(bs_uint(u64::MAX)[0], 0x81);
    }

    #[test]
    fn bs_uint_rejects_truncated_overlong_and_too_wide_input() {
        let msg = decode_msg(PayloadReader::new(b"\x81\x80").bs_uint());
        assert_eq!(
            msg,
            "truncated BSUInt at offset 0: input ends after 2 bytes"
        );
        let msg = decode_msg(PayloadReader::new(b"").bs_uint());
        assert!(msg.starts_with("truncated BSUInt"), "{msg}");
        let overlong = [0x80u8; 11];
        let msg = decode_msg(PayloadReader::new(&overlong).bs_uint());
        assert_eq!(msg, "BSUInt at offset 0 is longer than 10 bytes");
        // Ten bytes carry 70 bits: 2^64 is too wide for a u64.
        let mut too_wide = vec![0x82];
        too_wide.extend([0x80; 8]);
        too_wide.push(0x00);
        let msg = decode_msg(PayloadReader::new(&too_wide).bs_uint());
        assert_eq!(msg, "BSUInt at offset 0 exceeds 64 bits");
    }

    #[test]
    fn bs_data_and_bs_string_round_trip_and_match_the_reference() {
        let mut out = Vec::new();
        out.put_bs_data(b"");
        out.put_bs_data(b"A");
        out.put_bs_string("");
        out.put_bs_string("A");
        out.put_bs_string("żółw");
        let big = vec![7u8; 300];
        out.put_bs_data(&big);
        assert_eq!(&out[..6], b"\x00\x01A\x00\x01A");
        let mut r = PayloadReader::new(&out);
        assert_eq!(r.bs_data().unwrap(), b"");
        assert_eq!(r.bs_data().unwrap(), b"A");
        assert_eq!(r.bs_string().unwrap(), "");
        assert_eq!(r.bs_string().unwrap(), "A");
        assert_eq!(r.bs_string().unwrap(), "żółw");
        assert_eq!(r.bs_data().unwrap(), big.as_slice());
        r.finish().unwrap();
    }

    #[test]
    fn truncated_bs_data_is_refused_before_allocating_and_leaves_the_cursor() {
        // A length of 2^62 with three bytes behind it must fail at once.
        let mut out = Vec::new();
        out.put_bs_uint(1 << 62);
        out.extend_from_slice(b"abc");
        let mut r = PayloadReader::new(&out);
        let msg = decode_msg(r.bs_data());
        assert_eq!(
            msg,
            format!(
                "truncated BSData: needs {} bytes at offset 9, 3 remain",
                1u64 << 62
            )
        );
        assert_eq!(r.position(), 0);
        let msg = decode_msg(Vec::<u8>::from_bytes(b"\x05abc"));
        assert_eq!(msg, "truncated BSData: needs 5 bytes at offset 1, 3 remain");
        let msg = decode_msg(String::from_bytes(b"\x02a"));
        assert_eq!(
            msg,
            "truncated BSString: needs 2 bytes at offset 1, 1 remain"
        );
    }

    #[test]
    fn bs_string_rejects_invalid_utf8() {
        let mut r = PayloadReader::new(b"\x00\x02\xff\xfe");
        assert_eq!(r.bs_string().unwrap(), "");
        let msg = decode_msg(r.bs_string());
        assert!(
            msg.starts_with("BSString at offset 1 is not UTF-8"),
            "{msg}"
        );
        assert_eq!(r.position(), 1);
    }

    #[test]
    fn fixed_width_integers_in_both_byte_orders() {
        let mut out = Vec::new();
        out.put_u8(0xab);
        out.put_u16::<BigEndian>(0x0102);
        out.put_u16::<LittleEndian>(0x0102);
        out.put_u32::<BigEndian>(0x0102_0304);
        out.put_u64::<LittleEndian>(0x0102_0304_0506_0708);
        out.put_i16::<BigEndian>(-2);
        out.put_i32::<LittleEndian>(-3);
        out.put_i64::<BigEndian>(i64::MIN);
        assert_eq!(&out[..11], b"\xab\x01\x02\x02\x01\x01\x02\x03\x04\x08\x07");
        let mut r = PayloadReader::new(&out);
        assert_eq!(r.u8().unwrap(), 0xab);
        assert_eq!(r.u16::<BigEndian>().unwrap(), 0x0102);
        assert_eq!(r.u16::<LittleEndian>().unwrap(), 0x0102);
        assert_eq!(r.u32::<BigEndian>().unwrap(), 0x0102_0304);
        assert_eq!(r.u64::<LittleEndian>().unwrap(), 0x0102_0304_0506_0708);
        assert_eq!(r.i16::<BigEndian>().unwrap(), -2);
        assert_eq!(r.i32::<LittleEndian>().unwrap(), -3);
        assert_eq!(r.i64::<BigEndian>().unwrap(), i64::MIN);
        r.finish().unwrap();
    }

    #[test]
    fn truncated_fixed_width_fields_name_what_was_missing() {
        let mut r = PayloadReader::new(b"\x01\x02\x03");
        let msg = decode_msg(r.u32::<BigEndian>());
        assert_eq!(msg, "truncated u32: needs 4 bytes at offset 0, 3 remain");
        assert_eq!(r.u16::<BigEndian>().unwrap(), 0x0102);
        let msg = decode_msg(r.u64::<LittleEndian>());
        assert_eq!(msg, "truncated u64: needs 8 bytes at offset 2, 1 remain");
        let msg = decode_msg(r.array::<2>());
        assert_eq!(msg, "truncated array: needs 2 bytes at offset 2, 1 remain");
        assert_eq!(r.rest(), b"\x03");
        let msg = decode_msg(r.u8());
        assert_eq!(msg, "truncated u8: needs 1 bytes at offset 3, 0 remain");
    }

    #[test]
    fn composite_payloads_round_trip_and_every_truncation_fails() {
        type Composite = (u64, Option<String>, (bool, Vec<u8>), [u8; 3]);
        let value: Composite = (
            1 << 40,
            Some("text".to_string()),
            (true, vec![9; 130]),
            *b"xyz",
        );
        let bytes = value.to_bytes();
        assert_eq!(Composite::from_bytes(&bytes).unwrap(), value);
        for cut in 0..bytes.len() {
            let res = Composite::from_bytes(&bytes[..cut]);
            assert!(matches!(res, Err(Error::Decode(_))), "cut at {cut} decoded");
        }
        let none: Option<u64> = None;
        assert_eq!(none.to_bytes(), b"\x00");
        assert_eq!(Option::<u64>::from_bytes(b"\x00").unwrap(), None);
        let msg = decode_msg(Option::<u64>::from_bytes(b"\x02"));
        assert_eq!(msg, "bool at offset 0 is 2, not 0 or 1");
    }

    #[test]
    fn from_bytes_refuses_trailing_bytes() {
        let msg = decode_msg(u64::from_bytes(b"\x05\x00\x00"));
        assert_eq!(msg, "2 unexpected bytes after offset 1");
        assert!(<()>::from_bytes(b"").is_ok());
        assert!(<()>::from_bytes(b"x").is_err());
    }

    #[derive(Debug, PartialEq)]
    struct Named {
        id: u64,
        name: String,
    }
    impl_payload!(Named { id, name });

    #[derive(Debug, PartialEq)]
    struct Pair(u64, Vec<u8>);
    impl_payload!(Pair(0, 1));

    #[derive(Debug, PartialEq)]
    struct Unit;
    impl_payload!(Unit);

    #[derive(Debug, PartialEq)]
    struct Empty {}
    impl_payload!(Empty {});

    #[test]
    fn impl_payload_encodes_fields_in_order() {
        let named = Named {
            id: 128,
            name: "n".into(),
        };
        assert_eq!(named.to_bytes(), b"\x81\x00\x01n");
        assert_eq!(Named::from_bytes(b"\x81\x00\x01n").unwrap(), named);
        let pair = Pair(3, vec![4]);
        assert_eq!(pair.to_bytes(), b"\x03\x01\x04");
        assert_eq!(Pair::from_bytes(b"\x03\x01\x04").unwrap(), pair);
        assert_eq!(Unit.to_bytes(), b"");
        assert_eq!(Unit::from_bytes(b"").unwrap(), Unit);
        assert_eq!(Empty::from_bytes(b"").unwrap(), Empty {});
        assert!(Named::from_bytes(b"\x81\x00\x02n").is_err());
    }
}
