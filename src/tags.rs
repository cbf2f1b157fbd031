//! Maps and sets keyed by `(channel, tag)`, with a hasher made for them: the
//! pending table's entries, the peer's requests in progress and their
//! cancels, and the peer's deadlines for requests still to come.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes `(channel, tag)` keys with one multiply per word (as FxHash does)
/// instead of SipHash. These keys are this end's own tags, or the peer's:
/// of requests in progress here, which the handler queue bounds to a few
/// dozen, and of deadlines for requests still to come, at most 1,024
/// (`ext::EarlyDeadlines`). A chain that a hostile peer builds of colliding
/// keys is no longer than that.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TagHasher(u64);

impl Hasher for TagHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by `(channel, tag)`.
pub(crate) type TagMap<V> = HashMap<(u64, u64), V, BuildHasherDefault<TagHasher>>;
/// A set of `(channel, tag)`.
pub(crate) type TagSet = HashSet<(u64, u64), BuildHasherDefault<TagHasher>>;
