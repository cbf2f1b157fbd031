#!/usr/bin/env python3
"""Peers that show what the reference implementation, cs.packetstream
20240630, does at the edges, over this process's standard input (receive)
and standard output (send). The interop tests run them to check the claims
of the crate's guide `talking_to_python`.

    quirks_peer.py no-handler   an end without a request handler, until the
                                other end's EOF
    quirks_peer.py bad-reply    answers rq_type 0 with (flags, str), which the
                                reference cannot send, and echoes the others
    quirks_peer.py other-channel
                                tries to send a request on channel 5, then one
                                ECHO (rq_type 1) on channel 0, and reports both
    quirks_peer.py wide-flags   sends one request with flags 2**64 and reports
                                what became of it

Every message goes to standard error. The peer gives up with exit status 3
after PEER_TIMEOUT seconds (default 60).
"""

import os
import signal
import sys
import threading
import time

from cs.packetstream import PacketConnection


def say(message):
    print(f"quirks_peer: {message}", file=sys.stderr, flush=True)


def packet_stdio():
    """The (receive, send) file descriptors of the packet stream, with fd 1
    moved to standard error, as in word_child.py."""
    send_fd = os.dup(1)
    os.dup2(2, 1)
    return 0, send_fd


def serve(name, handler):
    recv_fd, send_fd = packet_stdio()
    with PacketConnection((recv_fd, send_fd), name, request_handler=handler) as conn:
        conn.join_recv()
    os.close(send_fd)
    say(f"{name}: clean shutdown")
    return 0


def bad_reply(rq_type, flags, payload):
    if rq_type == 0:
        return flags, payload.decode("utf-8")  # the payload must be bytes
    return flags, payload


def other_channel():
    recv_fd, send_fd = packet_stdio()
    with PacketConnection((recv_fd, send_fd), "other-channel") as conn:
        try:
            got = repr(conn.submit(1, 0, b"x", channel=5)())
        except Exception as e:
            got = f"{type(e).__name__}: {e}"
        say(f"other-channel: channel 5 gives {got}")
        say(f"other-channel: channel 0 gives {conn(1, b'x', 7)!r}")
    os.close(send_fd)
    return 0


def wide_flags():
    """One request whose flags do not fit in 64 bits, then wait for the
    connection to end. Reports whether the request was cancelled and whether
    a thread that was waiting for it returned."""
    recv_fd, send_fd = packet_stdio()
    conn = PacketConnection((recv_fd, send_fd), "wide-flags")
    conn.open()
    result = conn.submit(0, 1 << 64, b"wide")
    waiter = threading.Thread(target=result, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 30
    while not result.is_cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    # The waiter had a whole second to return, had it been woken.
    waiter.join(1)
    say(f"wide-flags: cancelled={result.is_cancelled} waiter_blocked={waiter.is_alive()}")
    try:
        got = repr(result())
    except Exception as e:
        got = type(e).__name__
    say(f"wide-flags: a new wait gives {got}")
    # The connection is broken: leave without its shutdown.
    os._exit(0)


def main(argv):
    signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
    signal.alarm(int(os.environ.get("PEER_TIMEOUT", "60")))
    modes = {
        "no-handler": lambda: serve("no-handler", None),
        "bad-reply": lambda: serve("bad-reply", bad_reply),
        "other-channel": other_channel,
        "wide-flags": wide_flags,
    }
    if len(argv) != 2 or argv[1] not in modes:
        say("usage: quirks_peer.py no-handler|bad-reply|other-channel|wide-flags")
        return 2
    return modes[argv[1]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
