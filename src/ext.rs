//! Extensions to the base protocol: a hello, remote cancel, deadlines and
//! ping, carried as ordinary requests on a reserved channel, so that a peer
//! of the base protocol (the Python reference) refuses them with a not-ok
//! reply and goes on. The wire spec is in the crate doc's "Extensions"
//! section.

use std::time::{Duration, Instant};

use byteorder::BigEndian;

use crate::codec::{PayloadReader, PayloadWrite};
use crate::error::Result;
use crate::tags::TagMap;

/// The channel reserved for the extensions' control requests. Requests on it
/// never reach a handler, and `submit_on` refuses it.
pub const CONTROL_CHANNEL: u64 = 0xFFFF_FFFF;

/// The extensions' version, sent in the hello.
pub(crate) const VERSION: u64 = 1;

/// Control request types, on [`CONTROL_CHANNEL`].
pub(crate) const HELLO: u64 = 0;
pub(crate) const PING: u64 = 1;
pub(crate) const CANCEL: u64 = 2;
pub(crate) const DEADLINE: u64 = 3;

/// Capability bits, in the hello.
pub(crate) const CAN_PING: u64 = 1;
pub(crate) const CAN_CANCEL: u64 = 2;
pub(crate) const CAN_DEADLINE: u64 = 4;
/// What this end can do.
pub(crate) const CAPABILITIES: u64 = CAN_PING | CAN_CANCEL | CAN_DEADLINE;

/// The longest deadline a peer may set, and the most deadlines held for
/// requests not yet arrived: each deadline comes just before its request,
/// so a peer of this crate has at most one per submitting thread there.
const MAX_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_EARLY_DEADLINES: usize = 1024;

/// A hello's payload, and its reply's: BSUInt version, BSUInt capabilities.
pub(crate) fn hello(version: u64, capabilities: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_bs_uint(version);
    out.put_bs_uint(capabilities);
    out
}

/// The capabilities in a hello or its reply.
pub(crate) fn read_hello(payload: &[u8]) -> Result<(u64, u64)> {
    let mut r = PayloadReader::new(payload);
    Ok((r.bs_uint()?, r.bs_uint()?))
}

/// A cancel's payload: BSUInt channel, BSUInt tag.
pub(crate) fn cancel(channel: u64, tag: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_bs_uint(channel);
    out.put_bs_uint(tag);
    out
}

/// A deadline's payload: BSUInt channel, BSUInt tag, UInt32BE
/// milliseconds left, here 0: the writer fills them in as it writes the
/// packet (see `Outbox`), so that time spent in this end's queue counts.
/// The milliseconds are the payload's last four bytes.
pub(crate) fn deadline(channel: u64, tag: u64) -> Vec<u8> {
    let mut out = cancel(channel, tag);
    out.put_u32::<BigEndian>(0);
    out
}

/// The channel and tag of a cancel, and the milliseconds of a deadline.
pub(crate) fn read_target(payload: &[u8], with_ms: bool) -> Result<(u64, u64, u64)> {
    let mut r = PayloadReader::new(payload);
    let (channel, tag) = (r.bs_uint()?, r.bs_uint()?);
    let ms = if with_ms {
        u64::from(r.u32::<BigEndian>()?)
    } else {
        0
    };
    r.finish()?;
    Ok((channel, tag, ms))
}

/// Deadlines the peer has sent for requests that have not arrived yet.
/// Each comes just before its request, so a peer of this crate has at most
/// one per submitting thread here; what a hostile peer can pile up is
/// bounded. Only the thread that reads touches it.
#[derive(Default)]
pub(crate) struct EarlyDeadlines {
    early: TagMap<Instant>,
}

impl EarlyDeadlines {
    /// The peer gives its request `(channel, tag)`, about to arrive, a
    /// deadline `ms` from now (at most a week). Returns false if deadlines
    /// for requests that never came had piled up, and were all forgotten
    /// to make room.
    pub(crate) fn set(&mut self, channel: u64, tag: u64, ms: u64) -> bool {
        let within = Duration::from_millis(ms).min(MAX_DEADLINE);
        let room = self.early.len() < MAX_EARLY_DEADLINES;
        if !room {
            self.early.clear();
        }
        self.early.insert((channel, tag), Instant::now() + within);
        room
    }

    /// Takes the deadline set for `(channel, tag)`, which has arrived.
    pub(crate) fn take(&mut self, channel: u64, tag: u64) -> Option<Instant> {
        if self.early.is_empty() {
            return None;
        }
        self.early.remove(&(channel, tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_payloads_round_trip() {
        assert_eq!(read_hello(&hello(1, 7)).unwrap(), (1, 7));
        assert_eq!(read_target(&cancel(5, 300), false).unwrap(), (5, 300, 0));
        let mut d = deadline(0xFFFF_FFFF, u64::MAX);
        let at = d.len() - 4;
        d[at..].copy_from_slice(&1500u32.to_be_bytes());
        assert_eq!(
            read_target(&d, true).unwrap(),
            (0xFFFF_FFFF, u64::MAX, 1500)
        );
        // A cancel has nothing after its tag.
        assert!(read_target(&d, false).is_err());
        assert!(read_target(&cancel(1, 2), true).is_err());
        assert!(read_hello(&[0x80]).is_err());
    }

    #[test]
    fn early_deadlines_are_bounded() {
        let mut deadlines = EarlyDeadlines::default();
        let mut forgotten = 0;
        for tag in 0..10 * MAX_EARLY_DEADLINES as u64 {
            forgotten += usize::from(!deadlines.set(0, tag, u64::MAX));
        }
        assert_eq!(forgotten, 9);
        assert!(deadlines.early.len() <= MAX_EARLY_DEADLINES);
        let last = 10 * MAX_EARLY_DEADLINES as u64 - 1;
        let deadline = deadlines.take(0, last).unwrap();
        assert!(deadline <= Instant::now() + MAX_DEADLINE);
        assert_eq!(deadlines.take(0, last), None);
    }
}
