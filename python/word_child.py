#!/usr/bin/env python3
"""A child process that serves a small word service to its parent over
standard input and output, with cs.packetstream 20240630. Its parent is
examples/python_child.rs.

    UPPER (0)  the payload as text, upper-cased
    COUNT (1)  the number of words in the payload, as the response flags
"""

import os
import sys

from cs.packetstream import PacketConnection

UPPER = 0
COUNT = 1


def handle(rq_type, flags, payload):
    """Answers one request. The return value is the ok response; an
    exception sends a not-ok response instead."""
    text = payload.decode("utf-8")  # invalid UTF-8 raises: not ok
    if rq_type == UPPER:
        return text.upper()  # a str: flags 0, the text as UTF-8
    if rq_type == COUNT:
        return len(text.split())  # an int: these flags, no payload
    raise ValueError(f"unknown request type {rq_type}")


def packet_stdio():
    """The (receive, send) file descriptors for a packet stream over this
    process's standard input and output.

    cs.packetstream prints progress lines such as
    "PacketConnection[wordsvc]: rq in: 505 in 0.3s" on sys.stdout, and so
    may any print(). Standard output is the packet channel, so the stream
    takes a new descriptor for the pipe to the parent, and fd 1, where
    sys.stdout writes, now goes to standard error.
    """
    send_fd = os.dup(1)
    os.dup2(2, 1)
    return 0, send_fd


def main():
    recv_fd, send_fd = packet_stdio()
    print("wordsvc: serving", file=sys.stderr)
    with PacketConnection((recv_fd, send_fd), "wordsvc", request_handler=handle) as conn:
        conn.join_recv()  # until the parent's EOF
    # Leaving the block answered what was in progress and sent our EOF.
    os.close(send_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
