//! Counters that the connection's threads bump as they work, and the
//! snapshot users read.

use std::sync::atomic::{AtomicU64, Ordering};

/// The live counters, updated with relaxed atomics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) packets_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) packets_out: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) requests_sent: AtomicU64,
    pub(crate) requests_received: AtomicU64,
    pub(crate) responses_ok: AtomicU64,
    pub(crate) responses_failed: AtomicU64,
    pub(crate) replies_ok: AtomicU64,
    pub(crate) replies_failed: AtomicU64,
}

/// A snapshot of a connection's counters, from
/// [`PacketConnection::stats`](crate::PacketConnection::stats).
///
/// The counters are read one by one while the connection runs, so a
/// snapshot is consistent per field, not across fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Packets received, control packets included.
    pub packets_in: u64,
    /// Bytes received, length prefixes included.
    pub bytes_in: u64,
    /// Packets queued for sending, control packets included.
    pub packets_out: u64,
    /// Bytes written to the stream.
    pub bytes_out: u64,
    /// Writes of the outgoing queue to the stream, each followed by a flush.
    pub flushes: u64,
    /// Requests this end sent.
    pub requests_sent: u64,
    /// Requests the peer sent to this end.
    pub requests_received: u64,
    /// Ok responses to this end's requests.
    pub responses_ok: u64,
    /// Not-ok responses to this end's requests.
    pub responses_failed: u64,
    /// Ok replies this end sent, from its handlers.
    pub replies_ok: u64,
    /// Not-ok replies this end sent: handler errors, panics and refusals.
    pub replies_failed: u64,
    /// This end's requests still waiting for a response.
    pub pending: u64,
    /// The peer's requests accepted and not yet answered.
    pub in_progress: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self, pending: u64, in_progress: u64) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            packets_in: get(&self.packets_in),
            bytes_in: get(&self.bytes_in),
            packets_out: get(&self.packets_out),
            bytes_out: get(&self.bytes_out),
            flushes: get(&self.flushes),
            requests_sent: get(&self.requests_sent),
            requests_received: get(&self.requests_received),
            responses_ok: get(&self.responses_ok),
            responses_failed: get(&self.responses_failed),
            replies_ok: get(&self.replies_ok),
            replies_failed: get(&self.replies_failed),
            pending,
            in_progress,
        }
    }
}
