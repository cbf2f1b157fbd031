#!/usr/bin/env python3
"""How not to serve a parent over standard output: word_child.py without its
packet_stdio(). The packet stream shares standard output with everything the
process prints, and cs.packetstream prints progress lines there when the
connection shuts down, so the parent reads text as packets and its stream
breaks. Kept to show, and to test, that failure.
"""

import sys

from cs.packetstream import PacketConnection

from word_child import handle

with PacketConnection((sys.stdin.buffer, sys.stdout.buffer), "wordsvc", request_handler=handle) as conn:
    conn.join_recv()
