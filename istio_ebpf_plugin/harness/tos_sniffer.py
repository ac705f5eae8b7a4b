"""Run as root in the server pod's netns: every TCP SYN (no ACK) to a port, IPv4 and IPv6, with its
TOS / traffic class. ``tos_sniffer.py PORT``; prints READY, then on a line on stdin one JSON list
of [source ip, source port, tos]. Stdlib only (``python3 -S``)."""

import json
import select
import socket
import struct
import sys

port = int(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))   # ETH_P_ALL, L3 payload
print("READY", flush=True)
seen = []
while True:
    r = select.select([s, sys.stdin], [], [], 0.05)[0]
    if s in r:
        pkt, addr = s.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING or not pkt:
            continue
        version = pkt[0] >> 4
        if version == 4 and pkt[9] == 6:
            ihl, tos, src = (pkt[0] & 0xF) * 4, pkt[1], socket.inet_ntop(socket.AF_INET, pkt[12:16])
            tcp = pkt[ihl:]
        elif version == 6 and pkt[6] == 6:
            tos = ((pkt[0] & 0xF) << 4) | (pkt[1] >> 4)
            src, tcp = socket.inet_ntop(socket.AF_INET6, pkt[8:24]), pkt[40:]
        else:
            continue
        if len(tcp) < 14:
            continue
        sport, dport = struct.unpack("!HH", tcp[:4])
        if dport == port and tcp[13] & 0x12 == 0x02:
            seen.append([src, sport, tos])
    if sys.stdin in r:
        sys.stdin.readline()
        break
print(json.dumps(seen), flush=True)
