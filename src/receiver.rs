//! The receive side: the loop that reads packets and routes them, and the
//! handler pool's worker loop.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::connection::{RecvEnd, Shared};
use crate::error::{Disconnect, Error, Result};
use crate::handler::{run_handler, JobQueue, Outcome, Request, RequestHandler};
use crate::packet::{read_frame_head, read_payload, wire_len, BodyHead, Frame, Kind, Packet};
use crate::pending::{Completion, Response};

/// The receive thread's read buffer.
const READ_BUFFER: usize = 64 << 10;

/// The receive thread. Reads until the peer's EOF or an error, then fails
/// every request still pending and starts this end's orderly close.
pub(crate) fn run_recv_loop(shared: &Arc<Shared>, recv: Box<dyn Read + Send>) {
    let jobs = &shared.jobs;
    let mut reader = BufReader::with_capacity(READ_BUFFER, recv);
    let res = recv_packets(shared, &mut reader, jobs);
    // The handler threads end once they have finished the requests already
    // queued.
    jobs.close();
    let why = match &res {
        Ok(()) => Disconnect::PeerEof,
        Err(Error::Io(e)) => Disconnect::Io(e.kind()),
        Err(_) => Disconnect::Protocol,
    };
    match &res {
        Ok(()) => log::debug!("{}: peer EOF", shared.name),
        Err(e) => log::error!("{}: receive failed: {e}", shared.name),
    }
    let n_failed = shared.table.fail_all(why);
    if n_failed > 0 {
        log::warn!("{}: {n_failed} requests lost: {why}", shared.name);
    }
    shared.begin_close();
    shared.set_recv_end(RecvEnd { error: res.err() });
}

fn recv_packets(
    shared: &Shared,
    r: &mut BufReader<Box<dyn Read + Send>>,
    jobs: &JobQueue,
) -> Result<()> {
    loop {
        if r.buffer().is_empty() {
            // The batch is parsed: wake the workers it needs.
            jobs.wake();
            shared.reader_idle();
        } else {
            shared.more_incoming.store(true, Ordering::SeqCst);
        }
        let (channel, tag, kind, payload) = match next_packet(shared, r)? {
            Next::Packet(packet) => packet,
            Next::Skipped => continue,
            Next::End => return Ok(()),
        };
        match kind {
            Kind::Control { flags } => {
                let packet = Packet {
                    channel,
                    tag,
                    kind: Kind::Control { flags },
                    payload,
                };
                if packet.is_eof() {
                    log::trace!("<== EOF");
                    return Ok(());
                }
                if packet.is_erq() {
                    log::debug!("{}: peer sent end of requests", shared.name);
                    shared.dispatch.lock().peer_erq = true;
                    continue;
                }
                log::error!("{}: malformed control packet {packet:?}", shared.name);
                return Err(Error::Malformed {
                    reason: "control packet that is neither EOF nor ERQ",
                });
            }
            Kind::Request { rq_type, flags } => {
                log::trace!(
                    "<== request {channel}:{tag} rq_type={rq_type} flags={flags:#x} len={}",
                    payload.len()
                );
                let rq = Request {
                    channel,
                    tag,
                    rq_type,
                    flags,
                    payload,
                };
                dispatch(shared, jobs, rq);
            }
            Kind::Response { ok, flags } => {
                log::trace!(
                    "<== response {channel}:{tag} ok={ok} flags={flags:#x} len={}",
                    payload.len()
                );
                let res = if ok {
                    shared
                        .stats
                        .recv
                        .responses_ok
                        .fetch_add(1, Ordering::Relaxed);
                    Ok(Response { flags, payload })
                } else {
                    shared
                        .stats
                        .recv
                        .responses_failed
                        .fetch_add(1, Ordering::Relaxed);
                    Err(Error::Failed {
                        channel,
                        tag,
                        flags,
                        payload,
                    })
                };
                deliver(shared, channel, tag, res);
            }
        }
    }
}

/// What [`next_packet`] read.
enum Next {
    /// A packet: its channel, tag, kind and payload.
    Packet((u64, u64, Kind, Vec<u8>)),
    /// An oversize packet, answered or failed and discarded.
    Skipped,
    /// The end of the stream, between packets.
    End,
}

/// Reads the next packet. A packet already whole in the read buffer is
/// decoded in place, its payload copied out; anything else (a packet that
/// is only partly there, or over the limit) is read from the stream field by
/// field, never past its end.
fn next_packet(shared: &Shared, r: &mut BufReader<Box<dyn Read + Send>>) -> Result<Next> {
    let max_len = shared.max_packet_len;
    let counters = &shared.stats.recv;
    match Packet::decode(r.buffer(), max_len) {
        Ok(Some((packet, used))) => {
            r.consume(used);
            counters.packets_in.fetch_add(1, Ordering::Relaxed);
            counters.bytes_in.fetch_add(used as u64, Ordering::Relaxed);
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
    counters.packets_in.fetch_add(1, Ordering::Relaxed);
    match frame {
        Frame::TooLarge { len, head } => {
            skip_oversize(shared, r, len, head)?;
            counters
                .bytes_in
                .fetch_add(wire_len(len), Ordering::Relaxed);
            Ok(Next::Skipped)
        }
        Frame::Whole(head) => {
            let payload = read_payload(r, &head)?;
            counters
                .bytes_in
                .fetch_add(wire_len(head.body_len), Ordering::Relaxed);
            let BodyHead {
                channel, tag, kind, ..
            } = head;
            Ok(Next::Packet((channel, tag, kind, payload)))
        }
    }
}

fn deliver(shared: &Shared, channel: u64, tag: u64, res: Result<Response>) {
    match shared.table.complete(channel, tag, res) {
        Completion::Delivered => {}
        Completion::Cancelled => log::debug!(
            "{}: dropped response to cancelled request {channel}:{tag}",
            shared.name
        ),
        Completion::Unknown => log::warn!(
            "{}: dropped response to unknown request {channel}:{tag}",
            shared.name
        ),
    }
}

/// Hands a request to the handler pool, or refuses it.
fn dispatch(shared: &Shared, jobs: &JobQueue, rq: Request) {
    shared
        .stats
        .recv
        .requests_received
        .fetch_add(1, Ordering::Relaxed);
    let (channel, tag) = (rq.channel, rq.tag);
    let refusal = {
        let mut dispatch = shared.dispatch.lock();
        if shared.handler.is_none() {
            Some("no request handler".to_string())
        } else if dispatch.peer_erq {
            Some("requests no longer allowed".to_string())
        } else if dispatch.closing {
            Some("connection is closing".to_string())
        } else if !dispatch.in_flight.insert((channel, tag)) {
            Some(format!("channel {channel}: tag already in use: {tag}"))
        } else {
            None
        }
    };
    match refusal {
        Some(reason) => refuse(shared, channel, tag, reason),
        None => jobs.push(rq),
    }
}

fn refuse(shared: &Shared, channel: u64, tag: u64, reason: String) {
    log::warn!(
        "{}: rejecting request {channel}:{tag}: {reason}",
        shared.name
    );
    let outcome = Outcome {
        ok: false,
        flags: 0,
        payload: reason.into_bytes(),
    };
    shared.send_outcome(channel, tag, outcome);
    shared.outbox.arm();
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
    log::warn!(
        "{}: skipping packet {channel}:{tag} of {len} bytes, over the limit of {max}",
        shared.name
    );
    match kind {
        Kind::Request { .. } => {
            shared
                .stats
                .recv
                .requests_received
                .fetch_add(1, Ordering::Relaxed);
            refuse(
                shared,
                channel,
                tag,
                format!("packet too large: {len} bytes exceeds limit of {max}"),
            );
        }
        Kind::Response { .. } => deliver(shared, channel, tag, Err(too_large)),
        Kind::Control { .. } => return Err(too_large),
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

/// A handler thread: runs requests until the receive thread is gone.
pub(crate) fn run_worker(shared: &Shared, handler: &Arc<dyn RequestHandler>) {
    let jobs = &shared.jobs;
    while let Some(rq) = jobs.pop() {
        // Busy until the reply is out of this thread's hands: writing it may
        // block, and then another worker must take the next job.
        jobs.busy(|| {
            let (channel, tag) = (rq.channel, rq.tag);
            let outcome = run_handler(&shared.name, handler, rq);
            shared.send_outcome(channel, tag, outcome);
            shared.finish_request(channel, tag);
        });
    }
}
