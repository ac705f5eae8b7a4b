"""A UDP echo on 127.0.0.1 and ::1, port argv[1] (the Istio agent's DNS proxy stand-in; stdlib only)."""

import select
import socket
import sys

port = int(sys.argv[1])
socks = []
for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((addr, port))
    socks.append(s)
print("READY", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, src = s.recvfrom(512)
        s.sendto(data, src)
