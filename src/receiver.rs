//! The receive thread: reads packets and hands each to the shared state, a
//! request to `receive_request`, a response to `deliver`, until the peer's EOF or
//! an error.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::error::{Disconnect, Error, Expired, Result};
use crate::ext::CONTROL_CHANNEL;
use crate::handler::Request;
use crate::keeper::{self, Watched};
use crate::outbox::Control;
use crate::packet::{read_frame_head, read_payload, wire_len, BodyHead, Frame, Packet, PacketKind};
use crate::reply::Response;
use crate::shared::{PacketSource, Returned, Shared, Step};
use crate::stats;
use crate::sync;

/// The receive thread's read buffer.
const READ_BUFFER: usize = 64 << 10;

/// The connection's own read timeouts, kept where a blocked read can be
/// interrupted (sockets): the keeper looks at the reader's stamps every
/// `slice`, and interrupts the reading once one has run out.
#[derive(Clone)]
pub(crate) struct ReadTimeouts {
    /// How long the peer may be silent inside a packet.
    pub(crate) packet: Option<Duration>,
    /// How long the connection may be idle.
    pub(crate) idle: Option<Duration>,
    /// How long the peer may be quiet before it is pinged.
    pub(crate) keepalive: Option<Duration>,
    /// How often the keeper looks.
    pub(crate) slice: Duration,
    /// Interrupts a blocked read.
    pub(crate) control: Arc<dyn Control>,
}

/// What the reader and the keeper share of a connection's read timeouts.
/// The reader stamps the start of each read (with whether it is inside a
/// packet, in one word, so that the keeper reads the two together), each
/// read that brings bytes, and each packet of the application; the keeper
/// reads the stamps (see [`Watched::look`]). Stamps are [`sync::stamp`]s.
///
/// Silence is judged only while the reader waits in a read: time this end
/// spends on its own work (a handler on the receive thread, a wait for room
/// in the handler queue, a lent reader at rest) is never the peer's
/// silence. Idleness is judged whatever the reader does: a peer that keeps
/// the reader busy with packets that are not the application's is idle.
struct Liveness {
    timeouts: ReadTimeouts,
    shared: Weak<Shared>,
    /// The read the reader waits in: its start's stamp shifted left by
    /// one, the low bit set if it is inside a packet; or [`NOT_READING`].
    reading: AtomicU64,
    last_read: AtomicU64,
    last_packet: AtomicU64,
    /// The keeper's own: when the connection was last seen busy, and when
    /// it last pinged the peer.
    last_busy: AtomicU64,
    pinged: AtomicU64,
    /// Which timeout ran out, once the keeper has interrupted the reading.
    expired: OnceLock<Disconnect>,
}

/// [`Liveness::reading`] between reads.
const NOT_READING: u64 = u64::MAX;

impl Liveness {
    /// Which of the read timeouts, if any, has run out at `now`. Sends the
    /// keepalive ping when it is due.
    fn expired_at(&self, shared: &Shared, now: Instant) -> Option<Disconnect> {
        let timeouts = &self.timeouts;
        // Acquire: the stamps the reader left before it began this read.
        let reading = self.reading.load(Ordering::Acquire);
        if reading != NOT_READING {
            // The peer is to blame from the start of this read.
            let since = sync::stamped(reading >> 1);
            let silent = now.saturating_duration_since(since);
            let mid_packet = reading & 1 == 1;
            if mid_packet && timeouts.packet.is_some_and(|limit| silent >= limit) {
                return Some(Disconnect::Silent);
            }
            if let Some(every) = timeouts.keepalive {
                if self.ping_or_give_up(shared, since, now, every) {
                    return Some(Disconnect::NoAnswer);
                }
            }
        }
        let limit = timeouts.idle?;
        if !shared.is_idle() {
            self.last_busy.store(sync::stamp_of(now), Ordering::Relaxed);
        }
        // The extensions' control packets, pings among them, are not
        // activity of the application, nor are refusals; the peer taking
        // this end's requests or handlers' replies from a full stream is
        // (but not a stream full of only pongs and refusals).
        let last_write = shared.stats.send.last_app_write.load(Ordering::Relaxed);
        let last_packet = self.last_packet.load(Ordering::Relaxed);
        let last_busy = self.last_busy.load(Ordering::Relaxed);
        let active = last_packet.max(last_busy).max(last_write);
        let quiet = now.saturating_duration_since(sync::stamped(active));
        (quiet >= limit).then_some(Disconnect::Idle)
    }

    /// The keepalive, while the reader has waited in a read since `since`:
    /// pings the peer once nothing has been heard of it for `every`, and
    /// returns true once it has not answered for as long again.
    fn ping_or_give_up(
        &self,
        shared: &Shared,
        since: Instant,
        now: Instant,
        every: Duration,
    ) -> bool {
        // Signs of life: a byte from the peer (none since the read began),
        // or one of this end's taken by it.
        let last_write = shared.stats.send.last_write.load(Ordering::Relaxed);
        let heard = since.max(sync::stamped(last_write));
        let pinged = self.pinged.load(Ordering::Relaxed);
        if sync::stamped(pinged) > heard {
            return now.saturating_duration_since(sync::stamped(pinged)) >= every;
        }
        if now.saturating_duration_since(heard) >= every {
            // Stamped before it goes: an answer read at once is heard
            // after it.
            self.pinged.store(sync::stamp_of(now), Ordering::Relaxed);
            if shared.send_ping() {
                debug!("{}: nothing heard for {every:?}: ping", shared.name);
            } else {
                self.pinged.store(pinged, Ordering::Relaxed);
            }
        }
        false
    }
}

/// The keeper's look at the read timeouts: interrupts the reading once one
/// has run out; the reader then ends with it.
impl Watched for Liveness {
    fn look(&self, now: Instant) -> Option<Instant> {
        let shared = self.shared.upgrade()?;
        match self.expired_at(&shared, now) {
            None => Some(now + self.timeouts.slice),
            Some(why) => {
                let _ = self.expired.set(why);
                self.timeouts.control.interrupt_reads();
                None
            }
        }
    }
}

/// The stream, as the reader's `BufReader` sees it: every read that may
/// block first lets the shared state act on what was parsed so far, so a
/// request that has fully arrived never waits for the next packet; and the
/// reads are stamped for the connection's read timeouts, if it has any.
struct Guarded {
    stream: Box<dyn Read + Send>,
    shared: Arc<Shared>,
    live: Option<Arc<Liveness>>,
    /// The reader is inside a packet (for the read timeouts).
    mid_packet: Cell<bool>,
}

impl Read for Guarded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.shared.before_read();
        let Some(live) = &self.live else {
            return self.stream.read(buf);
        };
        if live.expired.get().is_none() {
            let start = (sync::stamp() << 1) | u64::from(self.mid_packet.get());
            // Release: the keeper that sees this read begun sees the stamps
            // before it.
            live.reading.store(start, Ordering::Release);
            let res = self.stream.read(buf);
            if matches!(res, Ok(n) if n > 0) {
                live.last_read.store(sync::stamp(), Ordering::Relaxed);
            }
            live.reading.store(NOT_READING, Ordering::Release);
            if live.expired.get().is_none() {
                return res;
            }
        }
        // The keeper ended the reading: a timeout ran out. (A TCP socket
        // whose reading is shut down may still hand over what arrives.)
        let why = *live.expired.get().expect("just seen");
        warn!("{}: {why}", self.shared.name);
        Err(Expired(why).into_io())
    }
}

impl Guarded {
    fn mid_packet(&self, inside: bool) {
        self.mid_packet.set(inside);
    }

    /// A packet of the application has come whole: a request, or a
    /// response to one of this end's, off the control channel. The
    /// extensions' packets, ERQ and stray responses are not activity.
    fn application_packet(&self) {
        if let Some(live) = &self.live {
            if live.timeouts.idle.is_some() {
                // Its last byte came with the last read: no second clock
                // read.
                let last_read = live.last_read.load(Ordering::Relaxed);
                live.last_packet.store(last_read, Ordering::Relaxed);
            }
        }
    }
}

/// The receive thread. Reads until the peer's EOF or an error, then hands
/// the outcome to [`Shared::receive_ended`]. After delivering a response,
/// it may lend its reader to the waiting callers (see
/// [`Shared::lend_reader`]).
pub(crate) fn run_recv_loop(
    shared: &Arc<Shared>,
    stream: Box<dyn Read + Send>,
    timeouts: Option<ReadTimeouts>,
) {
    shared.mark_reading_thread();
    let live = timeouts.and_then(|timeouts| {
        let now = sync::stamp();
        let first = Instant::now() + timeouts.slice;
        let live = Arc::new(Liveness {
            timeouts,
            shared: Arc::downgrade(shared),
            reading: AtomicU64::new(NOT_READING),
            last_read: AtomicU64::new(now),
            last_packet: AtomicU64::new(now),
            last_busy: AtomicU64::new(now),
            pinged: AtomicU64::new(0),
            expired: OnceLock::new(),
        });
        let watched: Weak<dyn Watched> = Arc::downgrade(&live) as Weak<Liveness>;
        if keeper::watch(watched, first) {
            Some(live)
        } else {
            error!(
                "{}: no keeper thread: its read timeouts are not kept",
                shared.name
            );
            None
        }
    });
    let watched = Guarded {
        stream,
        shared: Arc::clone(shared),
        live,
        mid_packet: Cell::new(false),
    };
    let mut source: Box<dyn PacketSource> = Box::new(Source {
        reader: BufReader::with_capacity(READ_BUFFER, watched),
    });
    loop {
        let step = source.step(shared);
        shared.run_erq_hook();
        match step {
            Step::Ended(res) => {
                let unread = source.unread(&res);
                shared.receive_ended(res, unread);
                return;
            }
            Step::Read { delivered } => {
                if delivered && source.idle() {
                    match shared.lend_reader(source) {
                        Returned::Reader(back) => source = back,
                        Returned::Ended(res, unread) => {
                            shared.run_erq_hook();
                            shared.receive_ended(res, unread);
                            return;
                        }
                    }
                    // A caller may have read the peer's ERQ.
                    shared.run_erq_hook();
                }
            }
        }
    }
}

/// The connection's reader: a `BufReader` over the stream.
struct Source {
    reader: BufReader<Guarded>,
}

impl PacketSource for Source {
    fn step(&mut self, shared: &Arc<Shared>) -> Step {
        match read_one(shared, &mut self.reader) {
            Ok(Some(delivered)) => Step::Read { delivered },
            Ok(None) => Step::Ended(Ok(Disconnect::PeerEof)),
            Err(Error::ConnectionLost(why)) => Step::Ended(Ok(why)),
            Err(e) => Step::Ended(Err(e)),
        }
    }

    fn idle(&self) -> bool {
        self.reader.buffer().is_empty()
    }

    fn unread(&self, res: &Result<Disconnect>) -> Vec<u8> {
        // Bytes past the peer's EOF packet belong to whatever the peer sends
        // next on this stream, such as another connection.
        match res {
            Ok(Disconnect::PeerEof) => self.reader.buffer().to_vec(),
            _ => Vec::new(),
        }
    }
}

/// Reads and handles one packet: `Ok(Some(delivered))` if it went on,
/// `delivered` if it was a response to one of this end's requests;
/// `Ok(None)` at the peer's EOF packet; `Err(ConnectionLost(StreamEnded))`
/// at the end of the stream between packets; another `Err` for an error.
fn read_one(shared: &Arc<Shared>, r: &mut BufReader<Guarded>) -> Result<Option<bool>> {
    // Bytes read and not parsed yet: more requests, and so more replies,
    // may follow at once. A read that may block says otherwise.
    shared.more_incoming(!r.buffer().is_empty());
    r.get_ref().mid_packet(!r.buffer().is_empty());
    let (channel, tag, kind, payload) = match next_packet(shared, r)? {
        Next::Packet(packet) => packet,
        Next::Skipped => return Ok(Some(false)),
        Next::End => return Err(Error::ConnectionLost(Disconnect::StreamEnded)),
    };
    match kind {
        PacketKind::Control { flags } => {
            let packet = Packet {
                channel,
                tag,
                kind: PacketKind::Control { flags },
                payload,
            };
            if packet.is_eof() {
                trace!("{}: <== EOF", shared.name);
                return Ok(None);
            }
            if packet.is_erq() {
                shared.peer_ended_requests();
                return Ok(Some(false));
            }
            error!("{}: malformed control packet {packet:?}", shared.name);
            Err(Error::Malformed {
                reason: "control packet that is neither EOF nor ERQ",
            })
        }
        PacketKind::Request { rq_type, flags } => {
            trace!(
                "{}: <== request {channel}:{tag} rq_type={rq_type} flags={flags:#x} len={}",
                shared.name,
                payload.len()
            );
            // Only a request taken in is activity: not a refused one.
            if shared.receive_request(Request::new(channel, tag, rq_type, flags, payload)) {
                r.get_ref().application_packet();
            }
            Ok(Some(false))
        }
        PacketKind::Response { ok, flags } => {
            trace!(
                "{}: <== response {channel}:{tag} ok={ok} flags={flags:#x} len={}",
                shared.name,
                payload.len()
            );
            if channel != CONTROL_CHANNEL {
                let counters = &shared.stats.recv;
                let counter = if ok {
                    &counters.responses_ok
                } else {
                    &counters.responses_failed
                };
                stats::bump(counter, 1);
            }
            let res = if ok {
                Ok(Response { flags, payload })
            } else {
                Err(Error::Failed {
                    channel,
                    tag,
                    flags,
                    payload,
                })
            };
            // Only a response that reaches a waiting request is activity.
            if shared.deliver(channel, tag, res) && channel != CONTROL_CHANNEL {
                r.get_ref().application_packet();
            }
            Ok(Some(true))
        }
    }
}

/// What [`next_packet`] read.
enum Next {
    /// A packet: its channel, tag, kind and payload.
    Packet((u64, u64, PacketKind, Vec<u8>)),
    /// An oversize packet, answered or failed and discarded.
    Skipped,
    /// The end of the stream, between packets.
    End,
}

/// Reads the next packet. A packet already whole in the read buffer is
/// decoded in place, its payload copied out; anything else (a packet that
/// is only partly there, or over the limit) is read from the stream field by
/// field, never past its end.
fn next_packet(shared: &Shared, r: &mut BufReader<Guarded>) -> Result<Next> {
    let max_len = shared.max_packet_len;
    let counters = &shared.stats.recv;
    if r.buffer().is_empty() {
        // Fill the buffer first, so that a packet that arrives whole is
        // decoded in place.
        loop {
            match r.fill_buf() {
                Ok([]) => return Ok(Next::End),
                Ok(_) => {
                    // A packet has begun.
                    r.get_ref().mid_packet(true);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }
    match Packet::decode(r.buffer(), max_len) {
        Ok(Some((packet, used))) => {
            r.consume(used);
            stats::bump(&counters.packets_in, 1);
            stats::bump(&counters.bytes_in, used as u64);
            let Packet {
                channel,
                tag,
                kind,
                payload,
            } = packet;
            return Ok(Next::Packet((channel, tag, kind, payload)));
        }
        // Not all there yet, or oversize: the stream path below handles both.
        Ok(None) | Err(Error::TooLarge { .. }) => {}
        Err(e) => return Err(e),
    }
    let Some(frame) = read_frame_head(r, max_len)? else {
        return Ok(Next::End);
    };
    stats::bump(&counters.packets_in, 1);
    match frame {
        Frame::TooLarge { len, head } => {
            skip_oversize(shared, r, len, head)?;
            stats::bump(&counters.bytes_in, wire_len(len));
            Ok(Next::Skipped)
        }
        Frame::Whole(head) => {
            let payload = read_payload(r, &head)?;
            stats::bump(&counters.bytes_in, wire_len(head.body_len));
            let BodyHead {
                channel, tag, kind, ..
            } = head;
            Ok(Next::Packet((channel, tag, kind, payload)))
        }
    }
}

/// Reads and discards the rest of an oversize packet, answering it if it is
/// a request and failing the request it answers if it is a response. A
/// packet whose head cannot be parsed ends the connection.
fn skip_oversize(
    shared: &Shared,
    r: &mut impl Read,
    len: u64,
    head: Option<BodyHead>,
) -> Result<()> {
    let max = shared.max_packet_len;
    let too_large = Error::TooLarge { len, max };
    let Some(BodyHead {
        channel,
        tag,
        kind,
        payload_len,
        ..
    }) = head
    else {
        return Err(too_large);
    };
    warn!(
        "{}: skipping packet {channel}:{tag} of {len} bytes, over the limit of {max}",
        shared.name
    );
    match kind {
        PacketKind::Request { .. } => {
            stats::bump(&shared.stats.recv.requests_received, 1);
            shared.refuse(
                channel,
                tag,
                format!("packet too large: {len} bytes exceeds limit of {max}"),
                0,
            );
        }
        PacketKind::Response { .. } => {
            let _ = shared.deliver(channel, tag, Err(Error::ResponseTooLarge { len, max }));
        }
        PacketKind::Control { .. } => return Err(too_large),
    }
    let remaining = payload_len as u64;
    let skipped = io::copy(&mut r.take(remaining), &mut io::sink())?;
    if skipped < remaining {
        return Err(Error::Malformed {
            reason: "stream ended inside a packet",
        });
    }
    Ok(())
}
