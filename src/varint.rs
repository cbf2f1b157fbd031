//! BSUInt, the varint of the wire and of cs.binary payloads: 7 bits a byte,
//! most significant group first, the high bit set on every byte but the
//! last. `127` is `7f`, `128` is `81 00`.
//!
//! Values are `u128`, since a response header with 64-bit flags is 67 bits
//! wide; each field is range-checked by its reader.

use crate::error::{Error, Result};

/// The longest BSUInt accepted: 10 bytes carry 70 bits, enough for the widest
/// field (a response header, 67 bits).
pub const MAX_VARINT_LEN: usize = 10;

/// Parses a BSUInt at the front of `src`: `Ok(Some((value, n)))` after `n`
/// bytes, `Ok(None)` if `src` ends first, `Err` if it runs past
/// [`MAX_VARINT_LEN`] bytes.
pub(crate) fn parse(src: &[u8]) -> Result<Option<(u128, usize)>> {
    let mut value: u128 = 0;
    for (idx, &byte) in src.iter().enumerate() {
        if idx == MAX_VARINT_LEN {
            break;
        }
        value = value << 7 | u128::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            return Ok(Some((value, idx + 1)));
        }
    }
    if src.len() >= MAX_VARINT_LEN {
        return Err(Error::Malformed {
            reason: "varint longer than 10 bytes",
        });
    }
    Ok(None)
}

/// Writes `value` as a BSUInt at the front of `out`, which must have room
/// for it (19 bytes for any `u128`), and returns its length.
#[inline]
pub(crate) fn put(value: u128, out: &mut [u8]) -> usize {
    // Nearly every value is small: a 64-bit path, and a one-byte one, since
    // a packet head is written for every packet sent.
    match u64::try_from(value) {
        Ok(small) if small < 0x80 => {
            out[0] = small as u8;
            1
        }
        Ok(small) => put_groups(small, len(value), out),
        Err(_) => put_groups(value, len(value), out),
    }
}

/// Writes the `n` groups of 7 bits of `value`, most significant first.
fn put_groups<T>(mut rest: T, n: usize, out: &mut [u8]) -> usize
where
    T: Copy + std::ops::ShrAssign<u32> + std::ops::BitAnd<Output = T> + From<u8> + TryInto<u8>,
{
    let out = &mut out[..n];
    let mut continued = 0;
    for byte in out.iter_mut().rev() {
        let group: u8 = (rest & T::from(0x7f)).try_into().unwrap_or(0);
        *byte = group | continued;
        continued = 0x80;
        rest >>= 7;
    }
    n
}

/// The length of `value` as a BSUInt.
#[inline]
pub(crate) fn len(value: u128) -> usize {
    let bits = 128 - value.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// `value` as a BSUInt, for tests.
#[cfg(test)]
pub(crate) fn to_vec(value: u128) -> Vec<u8> {
    let mut out = [0u8; 19];
    let n = put(value, &mut out);
    out[..n].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's BSUInt.TEST_CASES are checked through the payload
    /// codec (`codec.rs`); here, every edge up to 67 bits.
    #[test]
    fn edges() {
        for shift in 0..67 {
            for value in [1u128 << shift, (1u128 << shift) - 1, (1u128 << shift) + 1] {
                let bytes = to_vec(value);
                assert_eq!(bytes.len(), len(value));
                assert!(bytes.len() <= MAX_VARINT_LEN);
                assert_eq!(parse(&bytes).unwrap(), Some((value, bytes.len())));
                // Every proper prefix asks for more bytes.
                for cut in 0..bytes.len() {
                    assert_eq!(parse(&bytes[..cut]).unwrap(), None);
                }
            }
        }
        assert_eq!(to_vec(u128::from(u64::MAX)).len(), 10);
        assert_eq!(to_vec(u128::from(u64::MAX))[0], 0x81);
        assert_eq!(to_vec(u128::MAX).len(), 19);
    }

    #[test]
    fn overlong_is_an_error() {
        let eleven = [0x80u8; 11];
        assert!(matches!(parse(&eleven), Err(Error::Malformed { .. })));
        // Ten continuation bytes can never end within the limit either.
        assert!(matches!(parse(&eleven[..10]), Err(Error::Malformed { .. })));
    }
}
