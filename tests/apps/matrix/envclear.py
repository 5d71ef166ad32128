"""A server that clears its environment after listen (tests/tests/matrix.rs).

server N: listens on an ephemeral port, then empties its environment with
the C library's clearenv() (LD_PRELOAD, SSOCK_DEVD_SOCKET and everything
else gone from environ), prints "PORT P", and serves N connections one after
another: it reads an upload to EOF, answers with the upload's SHA-256 and a
1 MiB download. Before the first accept it forks a child (so after the
environment was cleared) that connects to the server as one more client;
the server serves N + 1 connections in all, then prints
"OK served N+1 UPLOADED" and exits once the child did (with its status).

client PORT N SIZE: N connections, each uploading SIZE bytes and checking
the checksum and the download. Prints "OK client N BYTES".
"""
import ctypes
import hashlib
import os
import socket
import sys

DOWNLOAD = 1 << 20


def payload(seed, n):
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:n])


def recv_all(s):
    buf = bytearray()
    while True:
        b = s.recv(1 << 20)
        if not b:
            return bytes(buf)
        buf += b


def client_once(port, seed, size):
    up = payload(seed, size)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(up)
    s.shutdown(socket.SHUT_WR)
    reply = recv_all(s)
    s.close()
    digest, down = reply[:64], reply[64:]
    if digest != hashlib.sha256(up).hexdigest().encode():
        raise SystemExit(f"server's checksum {digest!r} is not the upload's")
    if down != payload(1000, DOWNLOAD):
        raise SystemExit(f"download differs ({len(down)} bytes)")
    return size + len(reply)


def server(n):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    port = ls.getsockname()[1]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.clearenv() != 0:
        raise SystemExit("clearenv failed")
    os.environ.clear()
    if libc.getenv(b"SSOCK_DEVD_SOCKET") or libc.getenv(b"LD_PRELOAD"):
        raise SystemExit("environment not cleared")
    print(f"PORT {port}", flush=True)
    pid = os.fork()
    if pid == 0:
        # A connector whose process only ever had an empty environment.
        try:
            client_once(port, 500, 300000)
        except BaseException as e:  # noqa: BLE001 - report and fail
            print(f"ERR child: {e}", flush=True)
            os._exit(1)
        os._exit(0)
    download = payload(1000, DOWNLOAD)
    uploaded = 0
    for _ in range(n + 1):
        c, _ = ls.accept()
        up = recv_all(c)
        uploaded += len(up)
        c.sendall(hashlib.sha256(up).hexdigest().encode() + download)
        c.close()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"the forked client failed ({status})")
    print(f"OK served {n + 1} {uploaded}", flush=True)


def client(port, n, size):
    total = 0
    for i in range(n):
        total += client_once(port, i, size)
    print(f"OK client {n} {total}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    elif sys.argv[1] == "client":
        client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]}")
