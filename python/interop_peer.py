#!/usr/bin/env python3
"""The interop peer: the reference implementation, cs.packetstream 20240630,
speaking the interop service of README.md over this process's standard input
(receive) and standard output (send). Run it with the python of the venv that
setup-venv.sh makes.

    interop_peer.py serve    answer the interop service until the other end's
                             EOF, then shut down in order; exit 0
    interop_peer.py client   run the interop checks against the server on the
                             other end, shut down in order, print
                             "interop: N passed, M failed" on standard error;
                             exit 0 only if none failed
    interop_peer.py vectors  print the wire test vectors, packets as the
                             reference encodes them, as JSON

Standard output is the packet stream: every message goes to standard error.
The peer gives up with exit status 3 after PEER_TIMEOUT seconds (default 120),
so that it never hangs a test. INTEROP_SEED fixes the client's random data.
"""

import json
import os
import random
import signal
import sys
import time

from cs.packetstream import Packet, PacketConnection

# The request types of the interop service, as the application sees them.
ECHO_REVERSE = 0
ECHO = 1
FAIL = 2
TEXT = 3
FLAGS_ONLY = 4
NONE = 5
SLEEP = 6


def say(message):
    print(f"interop_peer: {message}", file=sys.stderr, flush=True)


def handle(rq_type, flags, payload):
    """The interop service."""
    if rq_type == ECHO_REVERSE:
        return 0x11, payload[::-1]
    if rq_type == ECHO:
        return flags, payload
    if rq_type == FAIL:
        raise ValueError("requested failure")
    if rq_type == TEXT:
        return f"len={len(payload)}"
    if rq_type == FLAGS_ONLY:
        return len(payload)
    if rq_type == NONE:
        return None
    if rq_type == SLEEP:
        time.sleep(int(payload) / 1000)
        return flags, payload
    raise ValueError(f"unknown rq_type {rq_type}")


def packet_stdio():
    """The (receive, send) file descriptors of the packet stream.

    cs.packetstream prints progress lines on sys.stdout, so the stream's send
    side moves to a new descriptor and fd 1 goes to standard error.
    """
    send_fd = os.dup(1)
    os.dup2(2, 1)
    return 0, send_fd


def serve():
    recv_fd, send_fd = packet_stdio()
    with PacketConnection((recv_fd, send_fd), "py-serve", request_handler=handle) as conn:
        conn.join_recv()
    os.close(send_fd)
    say("serve: clean shutdown")
    return 0


class Checks:
    """Counts the checks that passed and reports those that failed."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def expect(self, what, got, want):
        if got == want:
            self.passed += 1
        else:
            self.failed += 1
            say(f"FAIL {what}: got {got!r:.200} want {want!r:.200}")


def run_checks(conn, checks):
    """The interop checks, as README.md lists them."""
    rng = random.Random(int(os.environ.get("INTEROP_SEED", time.time_ns())))
    for flags in (0, 1, 0x55, 1 << 40):
        for size in (0, 1, 127, 128, 16383, 16384, 65536, 1 << 20):
            chunk = rng.randbytes(min(size, 4096))
            data = (chunk * (size // max(len(chunk), 1) + 1))[:size]
            checks.expect(
                f"echo_reverse flags={flags} size={size}",
                conn(ECHO_REVERSE, data, flags),
                (True, 0x11, data[::-1]),
            )
    for flags in (0, 1, 127, 128, 1 << 32, (1 << 61) - 1, 1 << 62, 1 << 63, (1 << 64) - 1):
        checks.expect(f"echo flags={flags}", conn(ECHO, b"f", flags), (True, flags, b"f"))
    checks.expect("fail gives not-ok", conn(FAIL, b"boom")[0], False)
    checks.expect("text", conn(TEXT, b"abcd"), (True, 0, b"len=4"))
    checks.expect("flags only", conn(FLAGS_ONLY, b"abc"), (True, 3, b""))
    checks.expect("none", conn(NONE, b"xyz"), (True, 0, b""))
    # 200 requests in flight that complete out of order, collected in a
    # shuffled order: each reply must find its own request.
    pending = []
    for idx in range(200):
        delay = str(rng.randrange(20)).encode("ascii")
        pending.append((conn.submit(SLEEP, idx, delay), idx, delay))
    rng.shuffle(pending)
    for result, idx, delay in pending:
        checks.expect(f"sleep #{idx}", result(), (True, idx, delay))
    # A pipelined burst: every request is sent before any reply is awaited.
    burst = [(conn.submit(ECHO, idx % 1024, b"p%d" % idx), idx) for idx in range(5000)]
    n_bad = sum(result() != (True, idx % 1024, b"p%d" % idx) for result, idx in burst)
    checks.expect("pipelined burst of 5000: mismatches", n_bad, 0)


def client():
    recv_fd, send_fd = packet_stdio()
    checks = Checks()
    started = time.monotonic()
    # Leaving the block sends ERQ, then EOF, then waits for the peer's EOF.
    with PacketConnection((recv_fd, send_fd), "py-client") as conn:
        run_checks(conn, checks)
    os.close(send_fd)
    elapsed = time.monotonic() - started
    say(f"client: {checks.passed} passed, {checks.failed} failed in {elapsed:.2f}s")
    # The closing line that test runners read.
    print(f"interop: {checks.passed} passed, {checks.failed} failed", file=sys.stderr, flush=True)
    return 0 if checks.failed == 0 else 1


def vectors():
    """Packets as the reference encodes them, for every combination of kind,
    channel, tag, flags and payload below. A request's rq_type is the wire
    value (the application's plus one); a response's flags are the wire
    value, the ok bit lowest.
    """
    out = []
    for is_request in (False, True):
        for channel in (0, 1, 127, 128, 300):
            for tag in (0, 2, 127, 128, 16384, 1 << 32):
                for flags in (0, 1, 0x3F, 0x40, 1 << 40):
                    for payload in (b"", b"\x00", b"abc"):
                        rq_type = tag % 5 + 1 if is_request else None
                        packet = Packet(
                            is_request=is_request,
                            channel=channel,
                            tag=tag,
                            flags=flags,
                            rq_type=rq_type,
                            payload=payload,
                        )
                        out.append(
                            {
                                "is_request": is_request,
                                "channel": channel,
                                "tag": tag,
                                "flags": flags,
                                "rq_type": rq_type,
                                "payload": payload.hex(),
                                "wire": bytes(packet).hex(),
                            }
                        )
    json.dump(out, sys.stdout, indent=0)
    print()
    return 0


def main(argv):
    signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
    signal.alarm(int(os.environ.get("PEER_TIMEOUT", "120")))
    modes = {"serve": serve, "client": client, "vectors": vectors}
    if len(argv) != 2 or argv[1] not in modes:
        say("usage: interop_peer.py serve|client|vectors")
        return 2
    return modes[argv[1]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
