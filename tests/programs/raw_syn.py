"""A hand-made TCP SYN on a raw socket: argv[1..4] = source IP, destination IP, destination port, source port.

Prints {"socket": "ok"|errno, "reply": [ip, port, flags] | null}. Stdlib only (``python3 -S``).
"""

import errno
import json
import select
import socket
import struct
import sys
import time

src, dst, dport, sport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
except OSError as e:
    print(json.dumps({"socket": errno.errorcode.get(e.errno, str(e.errno)), "reply": None}))
    sys.exit(0)


def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16:
        t = (t & 0xffff) + (t >> 16)
    return ~t & 0xffff


hdr = struct.pack("!HHLLBBHHH", sport, dport, 12345, 0, 5 << 4, 0x02, 64240, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(hdr))
hdr = hdr[:16] + struct.pack("!H", csum(pseudo + hdr)) + hdr[18:]
s.sendto(hdr, (dst, 0))
reply, end = None, time.time() + 1.5
while reply is None and time.time() < end:
    if select.select([s], [], [], 0.1)[0]:
        pkt, addr = s.recvfrom(65535)
        ihl = (pkt[0] & 0xf) * 4
        sp, dp = struct.unpack("!HH", pkt[ihl:ihl + 4])
        if dp == sport:
            reply = [addr[0], sp, pkt[ihl + 13]]
print(json.dumps({"socket": "ok", "reply": reply}))
