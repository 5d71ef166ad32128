"""A process that connects to itself (tests/tests/matrix.rs).

listener N SIZE: one process with a listening socket of its own connects to
it N times. Each time it connects (blocking), writes a first chunk before it
accepts, accepts, then moves SIZE bytes each way at once (a thread writes
one direction while the main thread reads the other) and checks both with
SHA-256. Prints "OK listener N CONNS BYTES SHA" (BYTES: both directions).

simultaneous SIZE: a TCP socket bound to a port and connected to that same
port (the kernel's self-connect, no listener anywhere): what it writes it
reads back. Prints "OK simultaneous BYTES SHA".
"""
import hashlib
import socket
import sys
import threading


def payload(seed, n):
    """Deterministic bytes: SHA-256 in counter mode."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:n])


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(min(1 << 20, n - len(buf)))
        if not b:
            raise SystemExit(f"EOF after {len(buf)} of {n} bytes")
        buf += b
    return bytes(buf)


def exchange(a, b, size, seed):
    """size bytes a -> b while size bytes b -> a; both checked."""
    ab, ba = payload(seed, size), payload(seed + 1, size)
    errors = []

    def send(s, data):
        try:
            s.sendall(data)
        except OSError as e:
            errors.append(e)

    t1 = threading.Thread(target=send, args=(a, ab))
    t2 = threading.Thread(target=send, args=(b, ba))
    t1.start()
    t2.start()
    got_ba = []
    t3 = threading.Thread(target=lambda: got_ba.append(recv_exact(a, size)))
    t3.start()
    got_ab = recv_exact(b, size)
    t3.join()
    t1.join()
    t2.join()
    if errors:
        raise SystemExit(f"send failed: {errors}")
    if hashlib.sha256(got_ab).digest() != hashlib.sha256(ab).digest():
        raise SystemExit("a->b bytes differ")
    if hashlib.sha256(got_ba[0]).digest() != hashlib.sha256(ba).digest():
        raise SystemExit("b->a bytes differ")
    return hashlib.sha256(ab + ba)


def listener(n, size):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    port = ls.getsockname()[1]
    total = hashlib.sha256()
    first = payload(99, 4096)
    for i in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        # Connected before accept (the kernel's backlog): write first.
        c.sendall(first)
        a, _ = ls.accept()
        if recv_exact(a, len(first)) != first:
            raise SystemExit("the bytes written before accept differ")
        total.update(exchange(c, a, size, 2 * i).digest())
        c.shutdown(socket.SHUT_WR)
        if a.recv(1) != b"":
            raise SystemExit("no EOF after shutdown")
        a.close()
        c.close()
    ls.close()
    print(f"OK listener {n} conns {2 * n * size} {total.hexdigest()}", flush=True)


def simultaneous(size):
    # Find a free port, then bind a socket to it and connect it to itself.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.connect(("127.0.0.1", port))
    if s.getsockname() != s.getpeername():
        raise SystemExit(f"not self-connected: {s.getsockname()} {s.getpeername()}")
    data = payload(7, size)
    got = bytearray()
    # Write in chunks and read back what was written: no second party.
    for off in range(0, size, 65536):
        chunk = data[off:off + 65536]
        s.sendall(chunk)
        got += recv_exact(s, len(chunk))
    s.close()
    if bytes(got) != data:
        raise SystemExit("self-connected socket read back other bytes")
    print(f"OK simultaneous {size} {hashlib.sha256(data).hexdigest()}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "listener":
        listener(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "simultaneous":
        simultaneous(int(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]}")
