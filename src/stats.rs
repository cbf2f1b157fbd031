//! Counters that the connection's threads bump as they work, and the
//! snapshot users read.

use std::sync::atomic::{AtomicU64, Ordering};

/// The live counters, updated with relaxed atomics. They are grouped by the
/// thread that mostly writes them, each group on cache lines of its own, so
/// that counting does not bounce a line between the receive thread, the
/// handlers and the callers.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) recv: Padded<RecvCounters>,
    pub(crate) send: Padded<SendCounters>,
    pub(crate) replies: Padded<ReplyCounters>,
}

/// Written by the receive thread.
#[derive(Debug, Default)]
pub(crate) struct RecvCounters {
    pub(crate) packets_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) requests_received: AtomicU64,
    pub(crate) responses_ok: AtomicU64,
    pub(crate) responses_failed: AtomicU64,
    pub(crate) busy_refusals: AtomicU64,
}

/// Written by whoever queues or writes packets.
#[derive(Debug, Default)]
pub(crate) struct SendCounters {
    pub(crate) packets_out: AtomicU64,
    pub(crate) requests_sent: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) writes: AtomicU64,
    /// When the peer last took bytes from a full stream: a
    /// [`sync::stamp`](crate::sync::stamp), or 0.
    pub(crate) last_write: AtomicU64,
    /// The same, for bytes of a write that held the application's packets
    /// (replies or requests, not only the extensions' control packets).
    pub(crate) last_app_write: AtomicU64,
}

/// Written by the handler threads.
#[derive(Debug, Default)]
pub(crate) struct ReplyCounters {
    pub(crate) replies_ok: AtomicU64,
    pub(crate) replies_failed: AtomicU64,
}

/// Adds `n` to a counter that one thread at a time writes: the holder of
/// the lock or the role that orders its writers (the reader, the writer,
/// the outgoing queue's lock). A load and a store, where `fetch_add` would
/// be a locked instruction on every packet.
pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// A value on cache lines of its own: 128 bytes, since the adjacent-line
/// prefetcher pulls lines in pairs.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// A snapshot of a connection's counters, from
/// [`PacketConnection::stats`](crate::PacketConnection::stats).
///
/// The counters are read one by one while the connection runs, so a
/// snapshot is consistent per field, not across fields.
///
/// # Examples
///
/// ```
/// # use std::os::unix::net::UnixStream;
/// # use packetstream::{Config, PacketConnection, Request};
/// # let (a, b) = UnixStream::pair()?;
/// # let server = PacketConnection::from_unix_stream(b, Config::default()
/// #     .handler(|rq: Request| Ok(rq.payload.into())))?;
/// # let client = PacketConnection::from_unix_stream(a, Config::default())?;
/// for n in 0..10u8 {
///     client.call(1, 0, &[n; 100])?;
/// }
/// let stats = client.stats();
/// assert_eq!((stats.requests_sent, stats.responses_ok, stats.pending), (10, 10, 0));
/// assert!(stats.bytes_out > 1000 && stats.bytes_in > 1000);
/// # client.close()?;
/// # server.join()?;
/// # Ok::<(), packetstream::Error>(())
/// ```
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
    /// Writes of the outgoing queue to the stream: each is one batch of
    /// packets, written and then flushed.
    pub writes: u64,
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
    /// Of those, the requests waiting for a handler thread.
    pub requests_waiting: u64,
    /// Requests from the peer refused for load ("busy"), not run: the
    /// replies owed to the peer were at their budget. Counted in
    /// `replies_failed` too.
    pub busy_refusals: u64,
    /// Bytes queued to send and not yet written.
    pub queued_bytes: u64,
    /// Packets queued to send and not yet written.
    pub queued_packets: u64,
    /// Of those, the replies.
    pub queued_replies: u64,
}

/// The queue depths of a [`Stats`] snapshot.
pub(crate) struct Depths {
    pub(crate) pending: u64,
    pub(crate) in_progress: u64,
    pub(crate) requests_waiting: u64,
    pub(crate) queued_bytes: u64,
    pub(crate) queued_packets: u64,
    pub(crate) queued_replies: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self, depths: Depths) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (recv, send, replies) = (&self.recv, &self.send, &self.replies);
        Stats {
            packets_in: get(&recv.packets_in),
            bytes_in: get(&recv.bytes_in),
            packets_out: get(&send.packets_out),
            bytes_out: get(&send.bytes_out),
            writes: get(&send.writes),
            requests_sent: get(&send.requests_sent),
            requests_received: get(&recv.requests_received),
            responses_ok: get(&recv.responses_ok),
            responses_failed: get(&recv.responses_failed),
            replies_ok: get(&replies.replies_ok),
            replies_failed: get(&replies.replies_failed),
            pending: depths.pending,
            in_progress: depths.in_progress,
            requests_waiting: depths.requests_waiting,
            busy_refusals: get(&recv.busy_refusals),
            queued_bytes: depths.queued_bytes,
            queued_packets: depths.queued_packets,
            queued_replies: depths.queued_replies,
        }
    }
}
