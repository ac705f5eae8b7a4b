"""Does FIONREAD still count plain-TCP data on a socket that sits in a sockhash with an sk_msg verdict?

Why: a one-direction sockmap mode (redirect only app -> Envoy; Envoy reads with readv, never
FIONREAD or splice, as strace shows) still has to put the *app's* socket in the map, because
sk_msg runs for the sender. If the kernel then answers FIONREAD from the sockmap's own ingress
queue only, every app that sizes its reads with FIONREAD (nginx) sees 0 with data queued,
although nothing is redirected to it. Run as root from the clone:
``.venv/bin/python tools/sockmap_fionread_probe.py`` (6.18: 0 for the in-map socket).
"""

import ctypes
import fcntl
import os
import socket
import struct
import sys
import termios
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def fionread(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def main() -> None:
    from bcc import BPF
    from bcc.libbcc import lib as bcclib

    from istio_ebpf_plugin.datapath import libbpf

    b = BPF(text="BPF_SOCKHASH(h, u32, 8);\nint pass_msg(struct sk_msg_md *m) { return SK_PASS; }\n")
    fn = b.load_func("pass_msg", BPF.SK_MSG)
    mfd = bcclib.bpf_table_fd(b.module, b"h")
    libbpf.prog_attach(fn.fd, mfd, libbpf.SK_MSG_VERDICT)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    app = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()
    libbpf.map_update(mfd, ctypes.c_uint32(1), ctypes.c_uint32(app.fileno()))   # the sender side is in the map
    peer.sendall(b"x" * 1000)              # reaches the app through plain TCP (nothing redirected)
    time.sleep(0.2)
    queued = fionread(app)
    got = len(app.recv(4096))
    app.sendall(b"y" * 500)
    time.sleep(0.1)
    print(f"in-map socket: FIONREAD {queued} with {got} bytes queued; peer (not in map): FIONREAD {fionread(peer)}")
    libbpf.prog_detach(fn.fd, mfd, libbpf.SK_MSG_VERDICT)


if __name__ == "__main__":
    main()
