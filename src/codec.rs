//! Payload codecs for typed request and response payloads: the writer and
//! reader, the [`Payload`] and [`Encoding`] traits, and `impl_payload!`.
//! The types named after cs.binary's are in `binary.rs`. The user-facing
//! guide is on [`Payload`] (the table of types) and [`PayloadReader`].

use byteorder::ByteOrder;

use crate::error::{Error, Result};
use crate::varint::{self, MAX_VARINT_LEN};

mod binary;

pub use binary::{
    BSData, BSSFloat, BSString, BSUInt, BinaryUTF8NUL, Float64BE, Float64LE, Int16BE, Int16LE,
    Int32BE, Int32LE, UInt16BE, UInt16LE, UInt32BE, UInt32LE, UInt64BE, UInt64LE, UInt8,
};

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
    /// Appends an 8-byte IEEE 754 binary64 float in byte order `B`.
    fn put_f64<B: ByteOrder>(&mut self, x: f64);
    /// Appends `value` with its [`Payload`] encoding.
    fn put<T: Payload>(&mut self, value: &T);
    /// Appends `value` with the encoding `E`: `out.put_as::<UInt16BE, _>(&port)`
    /// writes a `u16` as cs.binary's `UInt16BE`.
    fn put_as<E: Encoding<T>, T>(&mut self, value: &T);
}

impl PayloadWrite for Vec<u8> {
    fn put_bs_uint(&mut self, n: u64) {
        let mut bytes = [0u8; MAX_VARINT_LEN];
        let len = varint::put(u128::from(n), &mut bytes);
        self.extend_from_slice(&bytes[..len]);
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

    fn put_f64<B: ByteOrder>(&mut self, x: f64) {
        self.put_u64::<B>(x.to_bits());
    }

    fn put<T: Payload>(&mut self, value: &T) {
        value.encode(self);
    }

    fn put_as<E: Encoding<T>, T>(&mut self, value: &T) {
        E::encode_value(value, self);
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
/// [`Error::Decode`], whose text names the field's type and its offset in
/// the payload. A struct's fields read through [`field`](PayloadReader::field)
/// (as [`impl_payload!`](crate::impl_payload) does) add the field's name in
/// front, as the reference's `Pfx` does: `"port: truncated UInt16BE: needs 2
/// bytes at offset 4, 1 remain"`.
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
        let (value, n) = match varint::parse(rest) {
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

    /// Reads a BSUInt length, then that many bytes, naming `what` in the
    /// error.
    fn prefixed(&mut self, what: &str) -> Result<&'a [u8]> {
        let start = self.pos;
        let len = self
            .bs_uint()
            .map_err(|err| in_context(err, &format!("{what} length")))?;
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
        self.take_array::<N>("array")
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

    /// Reads an 8-byte IEEE 754 binary64 float in byte order `B`.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if fewer than 8 bytes remain.
    pub fn f64<B: ByteOrder>(&mut self) -> Result<f64> {
        Ok(B::read_f64(self.take(8, "f64")?))
    }

    /// Reads a value with its [`Payload`] decoding. The cursor does not
    /// move on error.
    ///
    /// # Errors
    ///
    /// As the type's [`Payload::decode`].
    pub fn read<T: Payload>(&mut self) -> Result<T> {
        let start = self.pos;
        T::decode(self).inspect_err(|_| self.pos = start)
    }

    /// Reads a `T` with the encoding `E`: `r.read_as::<UInt16BE, _>()`
    /// reads cs.binary's `UInt16BE` into a `u16`. The cursor does not move
    /// on error.
    ///
    /// # Errors
    ///
    /// As `E`'s [`Encoding::decode_value`].
    pub fn read_as<E: Encoding<T>, T>(&mut self) -> Result<T> {
        let start = self.pos;
        E::decode_value(self).inspect_err(|_| self.pos = start)
    }

    /// Reads one field of a struct with `read`, naming the field in any
    /// error: a decode error's text gets `"{name}: "` in front, so that
    /// nested structs read as a path (`"header: size: truncated ..."`). The
    /// cursor does not move on error.
    ///
    /// # Errors
    ///
    /// Whatever `read` returns.
    ///
    /// # Examples
    ///
    /// ```
    /// use packetstream::{PayloadReader, UInt16BE};
    ///
    /// let mut r = PayloadReader::new(b"\x01\x02\x03");
    /// assert_eq!(r.field("port", |r| r.read_as::<UInt16BE, u16>())?, 0x0102);
    /// let err = r.field("port", |r| r.read_as::<UInt16BE, u16>()).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "cannot decode payload: port: truncated UInt16BE: needs 2 bytes at offset 2, 1 remain"
    /// );
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    pub fn field<T>(
        &mut self,
        name: &str,
        read: impl FnOnce(&mut PayloadReader<'a>) -> Result<T>,
    ) -> Result<T> {
        let start = self.pos;
        read(self).map_err(|err| {
            self.pos = start;
            in_context(err, name)
        })
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

    /// Reads exactly `N` bytes, naming `what` in the error.
    fn take_array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let bytes = self.take(N, what)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// The input from the cursor on, without moving it.
    fn peek_rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Skips `n` bytes, which the caller has checked remain.
    fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.remaining());
        self.pos += n;
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

/// Puts `context: ` in front of a decode error's text; other errors pass
/// through.
fn in_context(err: Error, context: &str) -> Error {
    match err {
        Error::Decode(msg) => Error::Decode(format!("{context}: {msg}")),
        other => other,
    }
}

/// A value with a payload encoding: how it is written into a payload and
/// read back out. The types below carry the names of the Python
/// reference's `cs.binary` classes (release 20240630), so that a protocol
/// written there with `BinaryMultiValue` can be written here field for
/// field, with the same bytes on the wire.
///
/// | Rust type | cs.binary | wire encoding |
/// |---|---|---|
/// | [`UInt8`] (a `u8`) | `UInt8` | 1 byte |
/// | [`UInt16BE`], [`UInt16LE`] (a `u16`) | `UInt16BE`, `UInt16LE` | 2 bytes, big- or little-endian |
/// | [`UInt32BE`], [`UInt32LE`] (a `u32`) | `UInt32BE`, `UInt32LE` | 4 bytes, big- or little-endian |
/// | [`UInt64BE`], [`UInt64LE`] (a `u64`) | `UInt64BE`, `UInt64LE` | 8 bytes, big- or little-endian |
/// | [`Int16BE`], [`Int16LE`] (an `i16`) | `Int16BE`, `Int16LE` | 2 bytes, two's complement |
/// | [`Int32BE`], [`Int32LE`] (an `i32`) | `Int32BE`, `Int32LE` | 4 bytes, two's complement |
/// | [`Float64BE`], [`Float64LE`] (an `f64`) | `Float64BE`, `Float64LE` | 8 bytes, IEEE 754 binary64 |
/// | [`BSUInt`], or a plain `u64` | `BSUInt` | 7-bit groups, most significant first, the high bit set on every byte but the last: 1 to 10 bytes (`128` is `81 00`) |
/// | [`BSData`], or a plain `Vec<u8>` | `BSData` | BSUInt length, then the bytes |
/// | [`BSString`], or a plain `String` | `BSString` | BSUInt length of the UTF-8, then the UTF-8 |
/// | [`BSSFloat`] (an `f64`) | `BSSFloat` | a BSString of Python's `str(float)`: `0.1`, `1e+16`, `-0.0`, `inf`, `nan` |
/// | [`BinaryUTF8NUL`] (a `String` without NUL) | `BinaryUTF8NUL` | the UTF-8, then a 0 byte |
/// | `[u8; N]` | `BinaryFixedBytes(name, N)` | `N` bytes |
/// | `Vec<T>` for any other `T: Payload` | none, see below | BSUInt count, then each item |
/// | a struct with [`impl_payload!`](crate::impl_payload) | `BinaryMultiValue` | each field in turn |
/// | `bool` | none | BSUInt 0 or 1 |
/// | `Option<T>` | none | BSUInt 0; or BSUInt 1, then `T` |
/// | `()` | none | nothing |
/// | `(A, B)`, `(A, B, C)`, `(A, B, C, D)` | none | each field in turn |
///
/// cs.binary has no signed 8- or 64-bit type, so neither has this table.
/// Its `BSUInt` is unbounded; here it is a `u64`, and a longer one is a
/// decode error. A decoded `BSSFloat` is read as Python's `float()` reads
/// it (surrounding whitespace and `_` between digits allowed), but with
/// ASCII digits only: Python also reads other Unicode decimal digits.
/// `BinaryUTF8NUL` is read strictly: the reference also accepts a string
/// that the end of the input cuts off before its NUL, this crate does not.
///
/// **Lists.** cs.binary's `BinaryListValues` carries no count of its own:
/// it reads items until its buffer ends, or as many as a count read
/// elsewhere says. A list here is self-contained: a BSUInt count, then the
/// items, which is what a Python protocol writes as a `BSUInt` followed by
/// `BinaryListValues.parse(bfr, count=n, pt=T)` (the repository's
/// `python/typed_service.py` has that helper, `counted_list`). `Vec<u8>`
/// stays `BSData`, which has the same bytes as a list of [`UInt8`]. A
/// decoder refuses a count larger than the bytes that remain, since every
/// item but a zero-width one takes a byte; so a list of zero-width items
/// such as `()` cannot be longer than what follows it.
///
/// **Newtypes.** Each cs.binary type is a newtype over its Rust value
/// (`UInt16BE(pub u16)`), converting to and from it with `From`. A
/// newtype, not a marker: a value of it is a [`Payload`] of its own, so it
/// nests anywhere a payload does (`Vec<UInt16BE>`, `Option<Int32LE>`, a
/// tuple, a request type, a response type), and a struct's field types
/// spell out its wire format. A plain integer or float has no payload
/// encoding, because it has no single obvious one (`u16` could be either
/// byte order, `f64` three formats); `u64`, `Vec<u8>` and `String` keep
/// theirs (BSUInt, BSData, BSString). Each newtype is also an
/// [`Encoding`] of its plain value, so a struct can keep plain field types
/// and name the encoding in [`impl_payload!`](crate::impl_payload):
/// `port as UInt16BE` on a `u16` field. That is how the reference's
/// `BinaryMultiValue` reads: its attributes hold plain values, and the
/// field map names their classes.
///
/// # Errors
///
/// Every decode error is [`Error::Decode`]. Its text names the type and
/// the offset in the payload, and, for a struct's fields and a list's
/// items, the path to them: `"samples: item 3: truncated Int32LE: needs 4
/// bytes at offset 40, 2 remain"`.
///
/// # Examples
///
/// A struct written field for field after a `BinaryMultiValue`:
///
/// ```
/// use packetstream::{impl_payload, BinaryUTF8NUL, Payload, UInt16LE};
///
/// // Python:
/// //   Reading = BinaryMultiValue('Reading', dict(
/// //       sensor=UInt16LE, celsius=Float64BE, note=BSString,
/// //       raw=counted_list(Int32BE), tag=BinaryUTF8NUL))
/// #[derive(Debug, PartialEq)]
/// struct Reading {
///     sensor: UInt16LE,     // a newtype field: `reading.sensor.0`
///     celsius: f64,         // a plain field with a named encoding
///     note: String,         // BSString, String's own encoding
///     raw: Vec<i32>,        // a list of Int32BE
///     tag: BinaryUTF8NUL,
/// }
/// impl_payload!(Reading {
///     sensor,
///     celsius as packetstream::Float64BE,
///     note,
///     raw as Vec<packetstream::Int32BE>,
///     tag,
/// });
///
/// let reading = Reading {
///     sensor: UInt16LE(7),
///     celsius: 21.5,
///     note: "ok".into(),
///     raw: vec![-1, 2],
///     tag: BinaryUTF8NUL::new("t1").expect("no NUL"),
/// };
/// let bytes = reading.to_bytes();
/// assert_eq!(
///     bytes,
///     b"\x07\x00\x40\x35\x80\x00\x00\x00\x00\x00\x02ok\x02\xff\xff\xff\xff\x00\x00\x00\x02t1\x00"
/// );
/// assert_eq!(Reading::from_bytes(&bytes)?, reading);
///
/// // A decode error names the field, the type and the offset.
/// let err = Reading::from_bytes(&bytes[..20]).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "cannot decode payload: raw: item 1: truncated Int32BE: needs 4 bytes at offset 18, 2 remain"
/// );
/// # Ok::<(), packetstream::Error>(())
/// ```
///
/// By hand, an implementation is two short methods:
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
///         Ok(Rename {
///             from: r.field("from", |r| r.read())?,
///             to: r.field("to", |r| r.read())?,
///         })
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

/// A named wire encoding for values of type `T`: the reference's
/// `parse_value` and `transcribe_value` pair of a cs.binary class, for a
/// value that is not itself a [`Payload`].
///
/// Each cs.binary newtype is the encoding of its plain value
/// (`UInt16BE: Encoding<u16>`, `BSSFloat: Encoding<f64>`), and lists and
/// options of encodings compose (`Vec<Int32LE>: Encoding<Vec<i32>>`). It is
/// what `field as E` means in [`impl_payload!`](crate::impl_payload), and
/// what [`PayloadWrite::put_as`] and [`PayloadReader::read_as`] take.
///
/// # Examples
///
/// ```
/// use packetstream::{Int16LE, PayloadReader, PayloadWrite, UInt32BE};
///
/// let mut out = Vec::new();
/// out.put_as::<UInt32BE, _>(&7);
/// out.put_as::<Vec<Int16LE>, _>(&vec![-2, 3]);
/// assert_eq!(out, b"\x00\x00\x00\x07\x02\xfe\xff\x03\x00");
///
/// let mut r = PayloadReader::new(&out);
/// assert_eq!(r.read_as::<UInt32BE, u32>()?, 7);
/// assert_eq!(r.read_as::<Vec<Int16LE>, Vec<i16>>()?, [-2, 3]);
/// r.finish()?;
/// # Ok::<(), packetstream::Error>(())
/// ```
pub trait Encoding<T> {
    /// Appends the encoding of `value` to `out` (cs.binary's
    /// `transcribe_value`).
    fn encode_value(value: &T, out: &mut Vec<u8>);

    /// Reads a value from the front of `r` (cs.binary's `parse_value`).
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] if the input is truncated or invalid.
    fn decode_value(r: &mut PayloadReader<'_>) -> Result<T>;
}

/// The largest capacity a list decoder reserves before it has read the
/// items, whatever count the input claims.
const LIST_PREALLOC: usize = 1024;

/// Writes a list: its count as a BSUInt, then each item with `item`.
fn encode_list<T>(items: &[T], out: &mut Vec<u8>, mut item: impl FnMut(&T, &mut Vec<u8>)) {
    out.put_bs_uint(items.len() as u64);
    for value in items {
        item(value, out);
    }
}

/// Reads a list written by [`encode_list`], each item with `item`. A count
/// larger than the bytes that remain is refused before anything is read.
fn decode_list<'a, T>(
    r: &mut PayloadReader<'a>,
    mut item: impl FnMut(&mut PayloadReader<'a>) -> Result<T>,
) -> Result<Vec<T>> {
    let start = r.position();
    let count = r.bs_uint().map_err(|err| in_context(err, "list count"))?;
    let remaining = r.remaining();
    let count = match usize::try_from(count) {
        Ok(count) if count <= remaining => count,
        _ => {
            let err = r.error(format!(
                "list at offset {start} claims {count} items, but only {remaining} bytes remain"
            ));
            r.pos = start;
            return Err(err);
        }
    };
    let mut items = Vec::with_capacity(count.min(LIST_PREALLOC));
    for idx in 0..count {
        match r.field(&format!("item {idx}"), &mut item) {
            Ok(value) => items.push(value),
            Err(err) => {
                r.pos = start;
                return Err(err);
            }
        }
    }
    Ok(items)
}

/// A list: a BSUInt count, then each item. `Vec<u8>` is not this but
/// BSData (the same bytes as a list of [`UInt8`]).
impl<T: Payload> Payload for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_list(self, out, T::encode);
    }

    fn decode(r: &mut PayloadReader<'_>) -> Result<Vec<T>> {
        decode_list(r, T::decode)
    }
}

/// A list of values in the encoding `E`: a BSUInt count, then each item.
impl<T, E: Encoding<T>> Encoding<Vec<T>> for Vec<E> {
    fn encode_value(value: &Vec<T>, out: &mut Vec<u8>) {
        encode_list(value, out, E::encode_value);
    }

    fn decode_value(r: &mut PayloadReader<'_>) -> Result<Vec<T>> {
        decode_list(r, E::decode_value)
    }
}

/// An optional value in the encoding `E`, as for `Option<T>`'s payload:
/// BSUInt 0; or BSUInt 1, then the value.
impl<T, E: Encoding<T>> Encoding<Option<T>> for Option<E> {
    fn encode_value(value: &Option<T>, out: &mut Vec<u8>) {
        match value {
            None => out.put_bs_uint(0),
            Some(value) => {
                out.put_bs_uint(1);
                E::encode_value(value, out);
            }
        }
    }

    fn decode_value(r: &mut PayloadReader<'_>) -> Result<Option<T>> {
        Ok(if r.read::<bool>()? {
            Some(r.read_as::<E, T>()?)
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

/// Makes a struct a payload, a response and a reply. It implements:
///
/// - [`Payload`]: the fields in the order listed, each with its own
///   payload encoding, or with the [`Encoding`] named after `as`;
/// - [`FromResponse`](crate::FromResponse): an ok response's whole payload
///   decodes into the struct (its flags are not looked at), so that the
///   struct can be a [`RequestType::Response`](crate::RequestType::Response)
///   or the type of [`call_as`](crate::PacketConnection::call_as);
/// - `From<Struct> for `[`Reply`](crate::Reply): flags 0 and the encoding
///   as payload, so that a handler or [`Fulfil::fulfil`](crate::Fulfil::fulfil)
///   can return it.
///
/// With [`RequestType`](crate::RequestType) (and
/// [`Fulfil`](crate::Fulfil) to serve it) the struct is a request type, as
/// a reference `BaseRequest` subclass over a `BinaryMultiValue` is.
///
/// Three forms:
///
/// - `impl_payload!(Name { field, other as Enc, .. })` for named fields.
///   A decode error names the field that failed
///   (see [`PayloadReader::field`]).
/// - `impl_payload!(Name(0, 1 as Enc, ..))` for a tuple struct.
/// - `impl_payload!(Name)` for a unit struct: an empty payload.
///
/// `field as Enc` writes and reads the field with `Enc`'s [`Encoding`] of
/// its type: `port as UInt16BE` on a `u16`, `samples as Vec<Int32LE>` on a
/// `Vec<i32>`, `ratio as BSSFloat` on an `f64`. Without `as`, the field's
/// type must be a [`Payload`] itself; the table on [`Payload`] lists them.
///
/// Since the macro implements `FromResponse` and `From<Name> for Reply`,
/// the struct cannot also have hand-written ones. A struct whose response
/// travels some other way, in the flags say, implements [`Payload`] by
/// hand (two short methods) and the conversions it wants.
///
/// # Examples
///
/// ```
/// use packetstream::{impl_payload, Payload, UInt16BE};
///
/// #[derive(Debug, PartialEq)]
/// struct Put {
///     key: String,
///     value: Vec<u8>,
/// }
/// impl_payload!(Put { key, value });
///
/// #[derive(Debug, PartialEq)]
/// struct Endpoint {
///     host: String,
///     port: u16,
/// }
/// impl_payload!(Endpoint { host, port as UInt16BE });
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
/// let endpoint = Endpoint { host: "h".into(), port: 443 };
/// assert_eq!(endpoint.to_bytes(), b"\x01h\x01\xbb");
/// assert_eq!(Get::from_bytes(b"\x01k")?, Get("k".into()));
/// assert_eq!(Ping.to_bytes(), b"");
/// let err = Endpoint::from_bytes(b"\x01h\x01").unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "cannot decode payload: port: truncated UInt16BE: needs 2 bytes at offset 2, 1 remain"
/// );
/// # Ok::<(), packetstream::Error>(())
/// ```
///
/// A struct as a typed response, with no glue:
///
/// ```
/// use std::os::unix::net::UnixStream;
/// use packetstream::{
///     impl_payload, Config, Dispatcher, Fulfil, HandlerError, PacketConnection, RequestType,
///     UInt32LE,
/// };
///
/// /// STAT path: how big is it, and who owns it.
/// struct Stat(String);
/// impl_payload!(Stat(0));
///
/// #[derive(Debug, PartialEq)]
/// struct StatReply {
///     size: u64,
///     owner: String,
///     mode: UInt32LE,
/// }
/// impl_payload!(StatReply { size, owner, mode });
///
/// impl RequestType for Stat {
///     const RQ_TYPE: u64 = 0;
///     type Response = StatReply;
/// }
/// impl Fulfil<()> for Stat {
///     fn fulfil(self, (): &()) -> Result<StatReply, HandlerError> {
///         Ok(StatReply { size: self.0.len() as u64, owner: "root".into(), mode: UInt32LE(0o644) })
///     }
/// }
///
/// let (a, b) = UnixStream::pair()?;
/// let handler = Dispatcher::new(()).route::<Stat>();
/// let server = PacketConnection::from_unix_stream(b, Config::default().handler(handler))?;
/// let client = PacketConnection::from_unix_stream(a, Config::default())?;
/// let reply = client.request(&Stat("/etc/hosts".into()))?;
/// assert_eq!(reply, StatReply { size: 10, owner: "root".into(), mode: UInt32LE(0o644) });
/// client.close()?;
/// server.join()?;
/// # Ok::<(), packetstream::Error>(())
/// ```
#[macro_export]
macro_rules! impl_payload {
    ($ty:ident { $($field:ident $(as $enc:ty)?),* $(,)? }) => {
        impl $crate::Payload for $ty {
            fn encode(&self, out: &mut ::std::vec::Vec<u8>) {
                $(($crate::__payload_field!(encode $($enc)?))(&self.$field, out);)*
                let _ = out;
            }

            fn decode(r: &mut $crate::PayloadReader<'_>) -> $crate::Result<Self> {
                let _ = &r;
                ::std::result::Result::Ok($ty {
                    $($field: r.field(
                        ::std::stringify!($field),
                        $crate::__payload_field!(decode $($enc)?),
                    )?,)*
                })
            }
        }
        $crate::__payload_response!($ty);
    };
    ($ty:ident ( $($idx:tt $(as $enc:ty)?),+ $(,)? )) => {
        impl $crate::Payload for $ty {
            fn encode(&self, out: &mut ::std::vec::Vec<u8>) {
                $(($crate::__payload_field!(encode $($enc)?))(&self.$idx, out);)+
            }

            fn decode(r: &mut $crate::PayloadReader<'_>) -> $crate::Result<Self> {
                ::std::result::Result::Ok($ty($({
                    let _ = $idx;
                    ($crate::__payload_field!(decode $($enc)?))(r)?
                }),+))
            }
        }
        $crate::__payload_response!($ty);
    };
    ($ty:ident) => {
        impl $crate::Payload for $ty {
            fn encode(&self, _: &mut ::std::vec::Vec<u8>) {}

            fn decode(_: &mut $crate::PayloadReader<'_>) -> $crate::Result<Self> {
                ::std::result::Result::Ok($ty)
            }
        }
        $crate::__payload_response!($ty);
    };
}

/// The function that writes or reads one field for
/// [`impl_payload!`](crate::impl_payload): with the field's own
/// [`Payload`], or with the [`Encoding`] given.
#[doc(hidden)]
#[macro_export]
macro_rules! __payload_field {
    (encode) => {
        $crate::Payload::encode
    };
    (encode $enc:ty) => {
        <$enc as $crate::Encoding<_>>::encode_value
    };
    (decode) => {
        $crate::PayloadReader::read
    };
    (decode $enc:ty) => {
        $crate::PayloadReader::read_as::<$enc, _>
    };
}

/// Implements [`FromResponse`](crate::FromResponse) and `From<T> for
/// Reply` for a [`Payload`] type: the reply carries flags 0 and the
/// encoding, the response's payload decodes whole.
#[doc(hidden)]
#[macro_export]
macro_rules! __payload_response {
    ($ty:ty) => {
        impl ::std::convert::From<$ty> for $crate::Reply {
            fn from(value: $ty) -> $crate::Reply {
                $crate::Reply::payload($crate::Payload::to_bytes(&value))
            }
        }

        impl $crate::FromResponse for $ty {
            fn from_response(rsp: $crate::Response) -> $crate::Result<Self> {
                <Self as $crate::Payload>::from_bytes(&rsp.payload)
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

    #[derive(Debug, PartialEq)]
    struct Outer {
        tag: u16,
        inner: Named,
        ports: Vec<u16>,
        maybe: Option<i32>,
    }
    impl_payload!(Outer {
        tag as UInt16LE,
        inner,
        ports as Vec<UInt16BE>,
        maybe as Option<Int32BE>,
    });

    #[derive(Debug, PartialEq)]
    struct Port(u16, String);
    impl_payload!(Port(0 as UInt16LE, 1));

    fn outer() -> Outer {
        Outer {
            tag: 0x0102,
            inner: Named {
                id: 1,
                name: "n".into(),
            },
            ports: vec![80, 443],
            maybe: Some(-2),
        }
    }

    #[test]
    fn impl_payload_applies_named_encodings_and_nests() {
        let bytes = outer().to_bytes();
        assert_eq!(
            bytes,
            b"\x02\x01\x01\x01n\x02\x00\x50\x01\xbb\x01\xff\xff\xff\xfe"
        );
        assert_eq!(Outer::from_bytes(&bytes).unwrap(), outer());
        let none = Outer {
            maybe: None,
            ..outer()
        };
        assert_eq!(none.to_bytes().last(), Some(&0));
        assert_eq!(Outer::from_bytes(&none.to_bytes()).unwrap(), none);
        let port = Port(443, "https".into());
        assert_eq!(port.to_bytes(), b"\xbb\x01\x05https");
        assert_eq!(Port::from_bytes(&port.to_bytes()).unwrap(), port);
    }

    #[test]
    fn decode_errors_name_the_path_to_the_field() {
        let bytes = outer().to_bytes();
        let msg = decode_msg(Outer::from_bytes(&bytes[..4]));
        assert_eq!(
            msg,
            "inner: name: truncated BSString: needs 1 bytes at offset 4, 0 remain"
        );
        let msg = decode_msg(Outer::from_bytes(&bytes[..8]));
        assert_eq!(
            msg,
            "ports: item 1: truncated UInt16BE: needs 2 bytes at offset 8, 0 remain"
        );
        let msg = decode_msg(Outer::from_bytes(&bytes[..12]));
        assert_eq!(
            msg,
            "maybe: truncated Int32BE: needs 4 bytes at offset 11, 1 remain"
        );
        // Tuple fields carry no name.
        let msg = decode_msg(Port::from_bytes(b"\xbb"));
        assert_eq!(
            msg,
            "truncated UInt16LE: needs 2 bytes at offset 0, 1 remain"
        );
        // A failed read leaves the cursor where it was.
        let mut r = PayloadReader::new(&bytes[..8]);
        assert!(r.read::<Outer>().is_err());
        assert_eq!(r.position(), 0);
        r.bytes(5).unwrap();
        assert!(r.read_as::<Vec<UInt16BE>, Vec<u16>>().is_err());
        assert_eq!(r.position(), 5);
    }

    #[test]
    fn impl_payload_makes_a_response_and_a_reply() {
        use crate::{FromResponse, Reply, Response};

        let reply = Reply::from(outer());
        assert_eq!(reply.flags, 0);
        assert_eq!(reply.payload, outer().to_bytes());
        // The flags are not looked at; the whole payload must decode.
        let rsp = Response {
            flags: 5,
            payload: reply.payload.clone(),
        };
        assert_eq!(Outer::from_response(rsp).unwrap(), outer());
        let mut long = reply.payload;
        long.push(0);
        let rsp = Response {
            flags: 0,
            payload: long,
        };
        let msg = decode_msg(Outer::from_response(rsp));
        assert_eq!(msg, "1 unexpected bytes after offset 15");
        assert_eq!(Reply::from(UInt32BE(7)).payload, b"\x00\x00\x00\x07");
        assert_eq!(Reply::from(Unit), Reply::default());
    }

    #[test]
    fn a_list_longer_than_its_input_is_refused_before_reading_items() {
        // Zero-width items could otherwise claim 2^60 entries of nothing.
        let mut bytes = Vec::new();
        bytes.put_bs_uint(1 << 60);
        let msg = decode_msg(Vec::<()>::from_bytes(&bytes));
        assert_eq!(
            msg,
            format!(
                "list at offset 0 claims {} items, but only 0 bytes remain",
                1u64 << 60
            )
        );
        assert_eq!(Vec::<()>::from_bytes(b"\x00").unwrap(), Vec::<()>::new());
        let msg = decode_msg(Vec::<u64>::from_bytes(b"\x81"));
        assert_eq!(
            msg,
            "list count: truncated BSUInt at offset 0: input ends after 1 bytes"
        );
        // A list of UInt8 has the bytes of a BSData.
        let bytes = vec![UInt8(1), UInt8(2)].to_bytes();
        assert_eq!(bytes, vec![1u8, 2].to_bytes());
    }
}
