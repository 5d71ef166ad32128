"""Programs for the two-host lab's remote connection tests (remote.rs):
plain blocking sockets, unmodified, run under ssock-run or not.

serve PORT: listens on every address, prints "LISTENING", echoes each
connection (a thread each) until EOF, then prints "ECHOED N" for it; a
connection that ends with a reset prints "RESET N".
stream HOST PORT MIB: sends MIB MiB of the pattern while reading the echo
back, checks every byte, prints "OK N" (or "CORRUPT at OFFSET", or "SHORT
N of M" if the echo ended early), closes.
hang HOST PORT: sends 64 KiB, reads its echo, prints "HANGING" and waits
forever (the test kills it).
wait PORT: accepts one connection, reads until EOF or an error within 30 s,
prints "EOF N", "RESET N" or "TIMEOUT N".
"""
import socket
import sys
import threading
import time

PERIOD = 256
CHUNK = 64 * 1024
BLOCK = bytes(((i * 131 + 7) & 0xFF) for i in range(CHUNK + PERIOD))


def at(off, n):
    """The pattern's n bytes at stream offset off (n <= CHUNK)."""
    s = off % PERIOD
    return BLOCK[s:s + n]


def echo(c):
    n = 0
    try:
        while True:
            b = c.recv(CHUNK)
            if not b:
                break
            c.sendall(b)
            n += len(b)
        print("ECHOED", n, flush=True)
    except ConnectionResetError:
        print("RESET", n, flush=True)
    finally:
        c.close()


def serve(port):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(64)
    print("LISTENING", flush=True)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()


def stream(host, port, mib):
    n = mib << 20
    s = socket.create_connection((host, port))
    got = [0]
    bad = []

    def reader():
        while got[0] < n:
            b = s.recv(CHUNK)
            if not b:
                break
            if b != at(got[0], len(b)):
                bad.append(got[0])
                break
            got[0] += len(b)

    t = threading.Thread(target=reader)
    t.start()
    off = 0
    while off < n:
        k = min(CHUNK, n - off)
        s.sendall(at(off, k))
        off += k
    t.join()
    if bad:
        print("CORRUPT at", bad[0], flush=True)
        sys.exit(1)
    if got[0] != n:
        print("SHORT", got[0], "of", n, flush=True)
        sys.exit(1)
    s.close()
    print("OK", n, flush=True)


def hang(host, port):
    s = socket.create_connection((host, port))
    s.sendall(at(0, CHUNK))
    got = 0
    while got < CHUNK:
        got += len(s.recv(CHUNK))
    print("HANGING", flush=True)
    time.sleep(3600)


def wait(port):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(1)
    print("LISTENING", flush=True)
    c, _ = ls.accept()
    c.settimeout(30)
    n = 0
    try:
        while True:
            b = c.recv(CHUNK)
            if not b:
                print("EOF", n, flush=True)
                return
            if n < CHUNK:
                c.sendall(b)
            n += len(b)
    except ConnectionResetError:
        print("RESET", n, flush=True)
    except socket.timeout:
        print("TIMEOUT", n, flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "serve":
        serve(int(sys.argv[2]))
    elif mode == "stream":
        stream(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "hang":
        hang(sys.argv[2], int(sys.argv[3]))
    elif mode == "wait":
        wait(int(sys.argv[2]))
    else:
        sys.exit("unknown mode " + mode)
