"""Run as root in the destination netns: which SYNs (without ACK) to a port arrived.

argv[1] = port, argv[2] = max seconds; stops early when a line arrives on stdin. Prints READY,
then one JSON list of [source ip, source port]. Stdlib only (``python3 -S``).
"""

import json
import select
import socket
import struct
import sys
import time

port, dur = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
print("READY", flush=True)
watch: list = [s, sys.stdin]
seen, end = [], time.time() + dur
while time.time() < end:
    r = select.select(watch, [], [], 0.05)[0]
    if sys.stdin in r:
        if sys.stdin.readline():
            end = time.time() + 0.2     # drain what is still in flight
        watch = [s]
    if s in r:
        pkt, addr = s.recvfrom(65535)
        ihl = (pkt[0] & 0xf) * 4
        sp, dp = struct.unpack("!HH", pkt[ihl:ihl + 4])
        if dp == port and pkt[ihl + 13] & 0x12 == 0x02:
            seen.append([addr[0], sp])
print(json.dumps(seen), flush=True)
