#!/usr/bin/env python3
"""A Python parent with a Rust child: starts the program named on the command
line, examples/rust_child.rs, which serves the word service of word_child.py
over its standard input and output, and makes requests of it with
cs.packetstream 20240630.

    cargo build --example rust_child
    target/python-venv/bin/python python/rust_parent.py target/debug/examples/rust_child
"""

import subprocess
import sys

from cs.packetstream import PacketConnection

UPPER = 0
COUNT = 1


def main(argv):
    if len(argv) < 2:
        print("usage: rust_parent.py CHILD [ARG...]", file=sys.stderr)
        return 2
    child = subprocess.Popen(argv[1:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    # Receive from the child's standard output, send to its standard input.
    recv_send = (child.stdout.fileno(), child.stdin.fileno())
    with PacketConnection(recv_send, "parent") as conn:
        # conn(rq_type, payload, flags) waits for the response, a tuple
        # (ok, flags, payload). Note the order: submit() takes
        # (rq_type, flags, payload).
        ok, flags, payload = conn(UPPER, b"hello from python")
        print(f"UPPER: {payload.decode()}")
        ok, flags, payload = conn(COUNT, b"one two three")
        print(f"COUNT: {flags}")
        # The Rust handler's error: not ok, flags 0, the error's text.
        print("invalid UTF-8:", conn(UPPER, b"\xff"))
        # The Rust handler's Failure: not ok, its own flags and payload.
        print("type 7:", conn(7))
    # Leaving the block sent ERQ and EOF and waited for the child's EOF.
    child.stdin.close()
    child.stdout.close()
    status = child.wait()
    print(f"child: exit status {status}")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
