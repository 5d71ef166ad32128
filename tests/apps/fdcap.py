"""How many TCP connections a program with 1024 descriptors can hold.

server PORTFILE: raises its own fd limit, accepts and holds connections
until stdin closes. client PORT N [LIMIT]: lowers its fd limit to LIMIT
(1024 unless given: Debian's default), connects up to N times (each connection waits for one byte from
the server, so it is in use), holding every socket, until a connect fails
with EMFILE; prints "HELD K"."""
import errno
import os
import resource
import socket
import sys
import threading


def server(portfile):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(ls.getsockname()[1]))
    os.rename(portfile + ".tmp", portfile)
    held = []

    def serve():
        while True:
            c, _ = ls.accept()
            c.send(b"x")
            held.append(c)
    threading.Thread(target=serve, daemon=True).start()
    sys.stdin.read()


def client(port, n, limit):
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    held = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.EMFILE:
                break
            raise
        if s.recv(1) != b"x":
            raise SystemExit("no greeting")
        held.append(s)
    print(f"HELD {len(held)}", flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2])
    else:
        client(int(sys.argv[2]), int(sys.argv[3]),
               int(sys.argv[4]) if len(sys.argv) > 4 else 1024)
