//! The types of the reference's `cs.binary` (release 20240630): one newtype
//! per class, each a [`Payload`] of its own and an [`Encoding`] of its plain
//! value. The table of types, and why they are newtypes, is on [`Payload`].

use std::fmt;

use super::{Encoding, Payload, PayloadReader, PayloadWrite};
use crate::error::Result;

/// The parts every newtype shares: its payload (through its encoding of
/// the plain value), conversions both ways, and its response and reply
/// shape (the encoding in the payload, flags 0).
macro_rules! newtype {
    ($name:ident, $value:ty) => {
        impl Payload for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                <$name as Encoding<$value>>::encode_value(&self.0, out);
            }

            fn decode(r: &mut PayloadReader<'_>) -> Result<$name> {
                <$name as Encoding<$value>>::decode_value(r).map($name)
            }
        }

        impl From<$value> for $name {
            fn from(value: $value) -> $name {
                $name(value)
            }
        }

        impl From<$name> for $value {
            fn from(value: $name) -> $value {
                value.0
            }
        }

        crate::__payload_response!($name);
    };
}

/// A fixed-width number: `$len` bytes in the order `$from_bytes` and
/// `$to_bytes` name, through the standard library's conversions.
macro_rules! fixed_width {
    (
        $(#[$doc:meta])*
        $name:ident($value:ty), $len:literal, $from_bytes:ident, $to_bytes:ident,
        derive($($derive:ident),*)
    ) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, $($derive),*)]
        pub struct $name(pub $value);

        impl Encoding<$value> for $name {
            fn encode_value(value: &$value, out: &mut Vec<u8>) {
                out.extend_from_slice(&value.$to_bytes());
            }

            fn decode_value(r: &mut PayloadReader<'_>) -> Result<$value> {
                Ok(<$value>::$from_bytes(r.take_array::<$len>(stringify!($name))?))
            }
        }

        newtype!($name, $value);
    };
}

fixed_width! {
    /// cs.binary's `UInt8`: an unsigned byte.
    ///
    /// ```
    /// use packetstream::{Payload, UInt8};
    ///
    /// assert_eq!(UInt8(65).to_bytes(), b"A");
    /// assert_eq!(u8::from(UInt8::from_bytes(b"\xff")?), 255);
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    UInt8(u8), 1, from_be_bytes, to_be_bytes, derive(PartialEq, Eq, PartialOrd, Ord, Hash)
}
fixed_width! {
    /// cs.binary's `UInt16BE`: an unsigned 16-bit integer, 2 bytes
    /// big-endian (struct format `>H`).
    ///
    /// ```
    /// use packetstream::{Payload, UInt16BE};
    ///
    /// assert_eq!(UInt16BE(0x0102).to_bytes(), b"\x01\x02");
    /// assert_eq!(UInt16BE::from_bytes(b"\x80\x00")?, UInt16BE(32768));
    /// # Ok::<(), packetstream::Error>(())
    /// ```
    UInt16BE(u16), 2, from_be_bytes, to_be_bytes, derive(PartialEq, Eq, PartialOrd, Ord, Hash)
}
fixed_width! {
    /// cs.binary's `UInt16LE`: an unsigned 16-bit integer, 2 bytes
    /// little-endian (struct format `<H`).
    UInt16LE(u16), 2, from_le_bytes, to_le_bytes, derive(PartialEq, Eq, PartialOrd, Ord, Hash)
}
fixed_width! {
    /// cs.binary's `UInt32BE`: an unsigned 32-bit integer, 4 bytes
    /// big-endian (struct format `>L`).
    UInt32BE(u32), 4, from_be_bytes, to_be_bytes, derive(PartialEq, Eq, PartialOrd, Ord, Hash)
}
fixed_width! {
    /// cs.binary's `UInt32LE`: an unsigned 32-bit integer, 4 bytes
    /// little-endian (struct format `<L`).
    UInt32LE(u32), 4, from_le_bytes, to_le_bytes, derive(PartialEq, Eq, PartialOrd, Ord, Hash)
}
fixed_width! {
    /// cs.binary's `UInt64BE`: an unsigned 64-bit integer, 8 bytes
    /// big-endian (struct format `>Q`).
    UInt64BE(u64), 8, from_be_bytes, to_be_bytes, derive(PartialEq, Eq, PartialOrd, Ord, Hash)
}
fixed_width! {
    /// cs.binary's `UInt64LE`: an unsigned 64-bit integer, 8 bytes
    /// little-endian (struct format `<Q`).
    UInt64LE(u64), 8, from_le_bytes, to_le_bytes, derive(PartialEq, Eq, PartialOrd, Ord, Hash)
}
fixed_width! {
    /// cs.binary's `Int16BE`: a signed 16-bit integer, 2 bytes two's
    /// complement big-endian (struct format `>h`).
    Int16BE(i16), 2, from_be_bytes, to_be_bytes, derive(PartialEq, Eq, PartialOrd, Ord, Hash)
}
fixed_width! {
    /// cs.binary's `Int16LE`: a signed 16-bit integer, 2 bytes two's
    /// complement little-endian (struct format `<h`).
    Int16LE(i16), 2, from_le_bytes, to_le_bytes, derive(PartialEq, Eq, PartialOrd, Ord, Hash)
}
fixed_width! {
    /// cs.binary's `Int32BE`: a signed 32-bit integer, 4 bytes two's
    /// complement big-endian (struct format `>l`).
    Int32BE(i32), 4, from_be_bytes, to_be_bytes, derive(PartialEq, Eq, PartialOrd, Ord, Hash)
}
fixed_width! {
    /// cs.binary's `Int32LE`: a signed 32-bit integer, 4 bytes two's
    /// complement little-endian (struct format `<l`).
    Int32LE(i32), 4, from_le_bytes, to_le_bytes, derive(PartialEq, Eq, PartialOrd, Ord, Hash)
}
fixed_width! {
    /// cs.binary's `Float64BE`: an IEEE 754 binary64 float, 8 bytes
    /// big-endian (struct format `>d`). Every bit pattern, NaNs included,
    /// goes through unchanged.
    ///
    /// ```
    /// use packetstream::{Float64BE, Payload};
    ///
    /// assert_eq!(Float64BE(1.0).to_bytes(), b"?\xf0\x00\x00\x00\x00\x00\x00");
    /// ```
    Float64BE(f64), 8, from_be_bytes, to_be_bytes, derive(PartialEq, PartialOrd)
}
fixed_width! {
    /// cs.binary's `Float64LE`: an IEEE 754 binary64 float, 8 bytes
    /// little-endian (struct format `<d`). Every bit pattern, NaNs
    /// included, goes through unchanged.
    Float64LE(f64), 8, from_le_bytes, to_le_bytes, derive(PartialEq, PartialOrd)
}

/// cs.binary's `BSUInt`: an unsigned integer in 7-bit groups, most
/// significant first, the high bit set on every byte but the last (1 to
/// 10 bytes). A plain `u64` has the same encoding; this name is for
/// reading a protocol side by side with its Python definition. The
/// reference's `BSUInt` is unbounded; one wider than 64 bits does not
/// decode here.
///
/// ```
/// use packetstream::{BSUInt, Payload};
///
/// assert_eq!(BSUInt(128).to_bytes(), b"\x81\x00");
/// assert_eq!(BSUInt(128).to_bytes(), 128u64.to_bytes());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BSUInt(pub u64);

impl Encoding<u64> for BSUInt {
    fn encode_value(value: &u64, out: &mut Vec<u8>) {
        out.put_bs_uint(*value);
    }

    fn decode_value(r: &mut PayloadReader<'_>) -> Result<u64> {
        r.bs_uint()
    }
}

newtype!(BSUInt, u64);

/// cs.binary's `BSData`: a BSUInt length, then that many bytes. A plain
/// `Vec<u8>` has the same encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BSData(pub Vec<u8>);

impl Encoding<Vec<u8>> for BSData {
    fn encode_value(value: &Vec<u8>, out: &mut Vec<u8>) {
        out.put_bs_data(value);
    }

    fn decode_value(r: &mut PayloadReader<'_>) -> Result<Vec<u8>> {
        Ok(r.bs_data()?.to_vec())
    }
}

newtype!(BSData, Vec<u8>);

impl From<&[u8]> for BSData {
    fn from(data: &[u8]) -> BSData {
        BSData(data.to_vec())
    }
}

/// cs.binary's `BSString`: the BSUInt length of the UTF-8, then the
/// UTF-8. A plain `String` has the same encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BSString(pub String);

impl Encoding<String> for BSString {
    fn encode_value(value: &String, out: &mut Vec<u8>) {
        out.put_bs_string(value);
    }

    fn decode_value(r: &mut PayloadReader<'_>) -> Result<String> {
        Ok(r.bs_string()?.to_owned())
    }
}

newtype!(BSString, String);

impl From<&str> for BSString {
    fn from(text: &str) -> BSString {
        BSString(text.to_owned())
    }
}

/// cs.binary's `BSSFloat`: a float as a BSString of its text, the text
/// Python's `str(float)` gives (the shortest that reads back to the same
/// float): `0.1`, `100.0`, `1e+16`, `1e-05`, `-0.0`, `inf`, `nan`.
///
/// Decoding reads the text as Python's `float()` does: surrounding
/// whitespace and single `_` between digits are allowed, and `inf`,
/// `infinity` and `nan` in any case; but the digits must be ASCII (Python
/// also reads other Unicode decimal digits, such as `١٢٣`). A NaN is written as `nan`, so its
/// sign and payload bits are not kept; every other value reads back
/// exactly.
///
/// ```
/// use packetstream::{BSSFloat, Payload};
///
/// assert_eq!(BSSFloat(0.1).to_bytes(), b"\x030.1");
/// assert_eq!(BSSFloat(1e16).to_bytes(), b"\x051e+16");
/// assert_eq!(BSSFloat::from_bytes(b"\x071_000.5")?, BSSFloat(1000.5));
/// # Ok::<(), packetstream::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd)]
pub struct BSSFloat(pub f64);

impl Encoding<f64> for BSSFloat {
    fn encode_value(value: &f64, out: &mut Vec<u8>) {
        out.put_bs_string(&python_float_str(*value));
    }

    fn decode_value(r: &mut PayloadReader<'_>) -> Result<f64> {
        let start = r.position();
        let bytes = r.prefixed("BSSFloat")?;
        let parsed = std::str::from_utf8(bytes).ok().and_then(parse_python_float);
        match parsed {
            Some(value) => Ok(value),
            None => {
                r.pos = start;
                Err(r.error(format!(
                    "BSSFloat at offset {start} is not a float: {}",
                    Cropped(bytes)
                )))
            }
        }
    }
}

newtype!(BSSFloat, f64);

/// cs.binary's `BinaryUTF8NUL`: a string as its UTF-8 and a terminating 0
/// byte. The string cannot hold a NUL of its own, which would end it early
/// on the other side, so the constructors refuse one.
///
/// Decoding takes the bytes up to the first 0 byte. Unlike the
/// reference, which also accepts a string that the end of its input cuts
/// off before the NUL, a missing NUL is an error here.
///
/// ```
/// use packetstream::{BinaryUTF8NUL, Payload};
///
/// let name = BinaryUTF8NUL::new("123").expect("no NUL");
/// assert_eq!(name.to_bytes(), b"123\x00");
/// assert_eq!(BinaryUTF8NUL::from_bytes(b"123\x00")?.as_str(), "123");
/// assert!(BinaryUTF8NUL::new("a\0b").is_none());
/// assert!(BinaryUTF8NUL::from_bytes(b"123").is_err()); // no NUL
/// # Ok::<(), packetstream::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BinaryUTF8NUL(String);

impl BinaryUTF8NUL {
    /// The string `text`, or `None` if it holds a NUL.
    pub fn new(text: impl Into<String>) -> Option<BinaryUTF8NUL> {
        BinaryUTF8NUL::try_from(text.into()).ok()
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The string, taken out.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// Fails, giving the string back, if it holds a NUL.
impl TryFrom<String> for BinaryUTF8NUL {
    type Error = String;

    fn try_from(text: String) -> std::result::Result<BinaryUTF8NUL, String> {
        if text.as_bytes().contains(&0) {
            Err(text)
        } else {
            Ok(BinaryUTF8NUL(text))
        }
    }
}

impl From<BinaryUTF8NUL> for String {
    fn from(text: BinaryUTF8NUL) -> String {
        text.0
    }
}

impl AsRef<str> for BinaryUTF8NUL {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BinaryUTF8NUL {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Payload for BinaryUTF8NUL {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.0.as_bytes());
        out.push(0);
    }

    fn decode(r: &mut PayloadReader<'_>) -> Result<BinaryUTF8NUL> {
        let start = r.position();
        let rest = r.peek_rest();
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(r.error(format!(
                "truncated BinaryUTF8NUL: no NUL in the {} bytes from offset {start}",
                rest.len()
            )));
        };
        let text = std::str::from_utf8(&rest[..len])
            .map_err(|e| r.error(format!("BinaryUTF8NUL at offset {start} is not UTF-8: {e}")))?;
        r.advance(len + 1);
        Ok(BinaryUTF8NUL(text.to_owned()))
    }
}

crate::__payload_response!(BinaryUTF8NUL);

/// Bytes for an error message: as text if they are UTF-8, at most 32
/// characters of it.
struct Cropped<'a>(&'a [u8]);

impl fmt::Display for Cropped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 32;
        let text = String::from_utf8_lossy(self.0);
        match text.char_indices().nth(MAX) {
            Some((cut, _)) => write!(f, "{:?}... ({} bytes)", &text[..cut], self.0.len()),
            None => write!(f, "{text:?}"),
        }
    }
}

/// `x` as Python's `str(float)` writes it: the shortest digits that read
/// back to `x`, in positional notation when the decimal exponent is from
/// -4 to 15 and in scientific notation otherwise, with a sign and at least
/// two digits in the exponent. Of the strings with that many digits,
/// Python writes the one nearest `x`, and on a tie (an `x` exactly halfway
/// between two) the one whose last digit is even: Rust's `{:e}` gives the
/// shortest count but breaks such a tie away from zero, and its
/// fixed-precision `{:.N$e}` gives the nearest with ties to even.
pub(crate) fn python_float_str(x: f64) -> String {
    if x.is_nan() {
        return "nan".to_owned();
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if x.is_infinite() {
        return format!("{sign}inf");
    }
    if x == 0.0 {
        return format!("{sign}0.0");
    }
    // "d.ddde-N" or "de+N": the shortest round trip's count of digits,
    // then that many digits, rounded as Python rounds them.
    let shortest = format!("{:e}", x.abs());
    let count = shortest.split('e').next().map_or(1, |mantissa| {
        mantissa.bytes().filter(u8::is_ascii_digit).count()
    });
    let sci = format!("{:.*e}", count.saturating_sub(1), x.abs());
    let Some((mantissa, exponent)) = sci.split_once('e') else {
        return format!("{x:?}");
    };
    let Ok(exponent) = exponent.parse::<i32>() else {
        return format!("{x:?}");
    };
    let digits: String = mantissa.chars().filter(|&c| c != '.').collect();
    if !(-4..16).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        let point = if rest.is_empty() { "" } else { "." };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        return format!(
            "{sign}{first}{point}{rest}e{exp_sign}{:02}",
            exponent.unsigned_abs()
        );
    }
    // Digits before the decimal point; at most 16 here.
    let before = exponent + 1;
    match usize::try_from(before) {
        Err(_) | Ok(0) => {
            let zeros = "0".repeat(before.unsigned_abs() as usize);
            format!("{sign}0.{zeros}{digits}")
        }
        Ok(before) if before < digits.len() => {
            format!("{sign}{}.{}", &digits[..before], &digits[before..])
        }
        Ok(before) => {
            let zeros = "0".repeat(before - digits.len());
            format!("{sign}{digits}{zeros}.0")
        }
    }
}

/// Reads a float as Python's `float(str)` does: surrounding whitespace is
/// dropped, a `_` is allowed between two digits, and Rust's parser does
/// the rest (which, as Python's, takes `inf`, `infinity` and `nan` in any
/// case and with a sign). Digits are ASCII only: Python also reads other
/// Unicode decimal digits (`float("١٢٣")` is 123.0), which this refuses.
pub(crate) fn parse_python_float(text: &str) -> Option<f64> {
    let text = text.trim();
    if !text.contains('_') {
        return text.parse().ok();
    }
    let bytes = text.as_bytes();
    let digits_around = |idx: usize| {
        idx > 0
            && bytes[idx - 1].is_ascii_digit()
            && bytes.get(idx + 1).is_some_and(u8::is_ascii_digit)
    };
    let lone = bytes
        .iter()
        .enumerate()
        .all(|(idx, &b)| b != b'_' || digits_around(idx));
    if !lone {
        return None;
    }
    text.replace('_', "").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    fn decode_msg<T: std::fmt::Debug>(res: Result<T>) -> String {
        match res {
            Err(Error::Decode(msg)) => msg,
            other => panic!("expected a decode error, got {other:?}"),
        }
    }

    #[test]
    fn python_float_text_matches_the_reference_at_the_notation_edges() {
        // The text Python 3.11's str(float) gives for each.
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (100.0, "100.0"),
            (123456.789, "123456.789"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (0.000123, "0.000123"),
            (1234567890123456.0, "1234567890123456.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (-2.5e-7, "-2.5e-07"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
        ];
        for &(value, text) in cases {
            assert_eq!(python_float_str(value), text, "{value:?}");
            let back = parse_python_float(text).unwrap();
            assert!(
                back.to_bits() == value.to_bits() || (value.is_nan() && back.is_nan()),
                "{text} read back as {back:?}"
            );
        }
    }

    /// Floats exactly halfway between the two nearest strings of their
    /// shortest length (found with Python's `decimal`), and the text
    /// Python 3.11's `repr` gives: the one that ends in an even digit.
    /// Rust's `{:e}` writes the other one for each.
    #[test]
    fn python_float_text_breaks_a_tie_to_even_as_the_reference_does() {
        let cases: &[(u64, &str)] = &[
            (0x42d6_bcc4_1e90_0008, "100000000000000.12"),
            (0xc2ef_7811_48b3_3d2c, "-276804372109801.38"),
            (0x42e0_2881_6d45_a9bc, "142129249267021.88"),
            (0x430e_1c6d_958d_7b72, "1059438285926254.2"),
            (0xc314_9218_fe44_0c37, "-1447533894238989.8"),
            (0x42b7_fa57_c450_e950, "26363981746409.312"),
            (0xc2d8_c0fe_9119_c088, "-108868734838530.12"),
            (0x431a_0c23_ffca_3b2b, "1832924537327306.8"),
            (0x42ec_e9cf_2446_38fc, "254324225749447.88"),
        ];
        for &(bits, text) in cases {
            let value = f64::from_bits(bits);
            assert_eq!(python_float_str(value), text, "{value:?}");
            assert_eq!(
                parse_python_float(text).map(f64::to_bits),
                Some(bits),
                "{text}"
            );
        }
    }

    #[test]
    fn python_float_parsing_takes_what_float_takes() {
        let good: &[(&str, f64)] = &[
            (" 1.5\n", 1.5),
            ("1_000.5", 1000.5),
            ("1E5", 1e5),
            ("-Infinity", f64::NEG_INFINITY),
            ("+inf", f64::INFINITY),
            (".5", 0.5),
            ("5.", 5.0),
        ];
        for &(text, value) in good {
            assert_eq!(parse_python_float(text), Some(value), "{text:?}");
        }
        assert!(parse_python_float("NaN").unwrap().is_nan());
        for bad in [
            "", "1__0", "_1", "1_", "1._5", "1_e5", "abc", "0x10", "1.5 2",
        ] {
            assert_eq!(parse_python_float(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bssfloat_that_is_not_a_float_names_the_text_and_offset() {
        let msg = decode_msg(<(u64, BSSFloat)>::from_bytes(b"\x00\x03abc"));
        assert_eq!(msg, "BSSFloat at offset 1 is not a float: \"abc\"");
        let long = [b'9'; 40];
        let mut payload = vec![41];
        payload.extend_from_slice(&long);
        payload.push(b'x');
        let msg = decode_msg(BSSFloat::from_bytes(&payload));
        assert_eq!(
            msg,
            format!(
                "BSSFloat at offset 0 is not a float: \"{}\"... (41 bytes)",
                "9".repeat(32)
            )
        );
        let msg = decode_msg(BSSFloat::from_bytes(b"\x05abc"));
        assert_eq!(
            msg,
            "truncated BSSFloat: needs 5 bytes at offset 1, 3 remain"
        );
    }

    #[test]
    fn binary_utf8_nul_refuses_inner_nul_missing_nul_and_bad_utf8() {
        assert_eq!(
            BinaryUTF8NUL::try_from("a\0".to_string()),
            Err("a\0".to_string())
        );
        let mut r = PayloadReader::new(b"ab\x00cd");
        assert_eq!(r.read::<BinaryUTF8NUL>().unwrap().as_str(), "ab");
        let msg = decode_msg(r.read::<BinaryUTF8NUL>());
        assert_eq!(
            msg,
            "truncated BinaryUTF8NUL: no NUL in the 2 bytes from offset 3"
        );
        assert_eq!(r.position(), 3);
        let msg = decode_msg(BinaryUTF8NUL::from_bytes(b"\xff\x00"));
        assert!(
            msg.starts_with("BinaryUTF8NUL at offset 0 is not UTF-8"),
            "{msg}"
        );
    }

    #[test]
    fn newtypes_convert_both_ways() {
        assert_eq!(u16::from(UInt16LE::from(7u16)), 7);
        assert_eq!(String::from(BSString::from("x")), "x");
        assert_eq!(BSData::from(&b"ab"[..]).0, b"ab");
        assert_eq!(f64::from(BSSFloat(0.5)), 0.5);
        assert_eq!(
            String::from(BinaryUTF8NUL::new("n").unwrap()),
            "n".to_string()
        );
    }
}
