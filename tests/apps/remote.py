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
wait PORT [block]: accepts one connection, reads until EOF or an error
within 30 s (block: a blocking socket, no time limit), prints "EOF N",
"RESET N" or "TIMEOUT N".
answer PORT: for each connection: reads a request line (the byte count
wanted), waits 5 ms, writes that many pattern bytes and closes at once
(as an HTTP/1.0 server does).
ask HOST PORT N BYTES [nb]: N connections one after another, each asking
for BYTES and reading to EOF (nb: a nonblocking socket waited on with
select.epoll, edge-triggered); prints "OK N" if every answer was whole and
right, else "WRONG i got G".
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


def listening(port, backlog=64):
    """A listener on every address at port, announced with LISTENING."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(backlog)
    print("LISTENING", flush=True)
    return ls


def serve(port):
    ls = listening(port)
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


def wait(port, block=False):
    ls = listening(port, 1)
    c, _ = ls.accept()
    if not block:
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


def answer(port):
    ls = listening(port)
    while True:
        c, _ = ls.accept()
        line = b""
        while not line.endswith(b"\n"):
            b = c.recv(64)
            if not b:
                break
            line += b
        if line.endswith(b"\n"):
            n = int(line)
            time.sleep(0.005)
            off = 0
            while off < n:
                k = min(CHUNK, n - off)
                c.sendall(at(off, k))
                off += k
        c.close()


def read_all_nb(s):
    """Reads s to EOF with a nonblocking socket and an edge-triggered
    epoll, as event loops do."""
    import select
    s.setblocking(False)
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
    got = bytearray()
    try:
        while True:
            try:
                b = s.recv(CHUNK)
            except BlockingIOError:
                if not ep.poll(30):
                    raise TimeoutError("no event in 30 s")
                continue
            if not b:
                return got
            got += b
    finally:
        ep.close()


def ask(host, port, n, size, nb=False):
    for i in range(n):
        s = socket.create_connection((host, port))
        s.sendall(b"%d\n" % size)
        got = bytearray()
        if nb:
            got = read_all_nb(s)
        while not nb:
            b = s.recv(CHUNK)
            if not b:
                break
            got += b
        s.close()
        want = b"".join(at(o, min(CHUNK, size - o)) for o in range(0, size, CHUNK))
        if bytes(got) != want:
            print("WRONG", i, "got", len(got), flush=True)
            sys.exit(1)
    print("OK", n, flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "serve":
        serve(int(sys.argv[2]))
    elif mode == "stream":
        stream(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "hang":
        hang(sys.argv[2], int(sys.argv[3]))
    elif mode == "wait":
        wait(int(sys.argv[2]), sys.argv[3:] == ["block"])
    elif mode == "answer":
        answer(int(sys.argv[2]))
    elif mode == "ask":
        ask(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
            sys.argv[6:] == ["nb"])
    else:
        sys.exit("unknown mode " + mode)
