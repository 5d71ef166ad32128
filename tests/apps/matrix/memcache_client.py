"""memcached text-protocol client (tests/tests/matrix.rs).

client PORT N: one connection; sets N keys with values of 1 byte to about
500 KB, gets them back, checks every value against its SHA-256. Prints
"OK memcache N STORED_BYTES SHA".
"""
import hashlib
import socket
import sys


def value(i):
    n = 1 + (i * 7919) % 500000
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (n // 32 + 1))[:n]


def main(port, count):
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    sent = hashlib.sha256()
    total = 0
    for i in range(count):
        v = value(i)
        sent.update(v)
        total += len(v)
        s.sendall(b"set matrix%d 0 0 %d\r\n" % (i, len(v)) + v + b"\r\n")
        reply = f.readline()
        if reply != b"STORED\r\n":
            raise SystemExit(f"set matrix{i}: {reply!r}")
    got = hashlib.sha256()
    for i in range(count):
        s.sendall(b"get matrix%d\r\n" % i)
        head = f.readline().split()
        if not head or head[0] != b"VALUE":
            raise SystemExit(f"get matrix{i}: {head!r}")
        v = f.read(int(head[3]))
        if f.read(2) != b"\r\n" or f.readline() != b"END\r\n":
            raise SystemExit(f"get matrix{i}: bad framing")
        if hashlib.sha256(v).digest() != hashlib.sha256(value(i)).digest():
            raise SystemExit(f"get matrix{i}: value differs")
        got.update(v)
    s.sendall(b"quit\r\n")
    s.close()
    if got.digest() != sent.digest():
        raise SystemExit("values differ")
    print(f"OK memcache {count} {total} {got.hexdigest()}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[2]), int(sys.argv[3]))
