"""Run in a pod: try an escape trick (setuid, SO_MARK, bind), then connect; one JSON line like the probe client.

argv[1] = JSON {dst, port, family?, udp?, timeout?, setuid?, mark?, bind?}. Stdlib only (``python3 -S``).
"""

import errno
import json
import os
import socket
import sys

a = json.loads(sys.argv[1])
rec: dict = {"setup": {}}


def step(name, fn):
    try:
        fn()
        rec["setup"][name] = "ok"
    except OSError as e:
        rec["setup"][name] = errno.errorcode.get(e.errno, str(e.errno))


if "setuid" in a:
    step("setgid", lambda: os.setgid(a["setuid"]))
    step("setuid", lambda: os.setuid(a["setuid"]))
rec["uid"] = os.getuid()
fam = socket.AF_INET6 if a.get("family") == 6 or ":" in a["dst"] else socket.AF_INET
udp = a.get("udp", False)
s = socket.socket(fam, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
s.settimeout(a.get("timeout", 2.0))
if "mark" in a:
    step("so_mark", lambda: s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, a["mark"]))
if "bind" in a:
    step("bind", lambda: s.bind((a["bind"], 0)))
try:
    if udp:
        s.sendto(b"probe", (a["dst"], a["port"]))
        data, src = s.recvfrom(4096)
        rec.update(json.loads(data))
        rec["reply_from"] = [src[0], src[1]]
    else:
        s.connect((a["dst"], a["port"]))
        buf = b""
        while True:
            c = s.recv(4096)
            if not c:
                break
            buf += c
        rec.update(json.loads(buf) if buf.strip() else {"listener": "error", "error": "empty reply"})
except ConnectionRefusedError:
    rec["listener"] = "refused"
except socket.timeout:
    rec["listener"] = "timeout"
except OSError as e:
    rec["listener"] = "error"
    rec["errno"] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(rec))
