"""Programs for the two-host lab's remote connection tests (remote.rs):
plain blocking sockets, unmodified, run under ssock-run or not.

serve PORT: listens on every address, prints "LISTENING", echoes each
connection (a thread each) until EOF, then prints "ECHOED N" for it; a
connection that ends with a reset prints "RESET N".
stream HOST PORT MIB: sends MIB MiB of the pattern while reading the echo
back, shuts its writing down, reads the echo to its end, checks every byte,
prints "OK N" (or "CORRUPT at OFFSET" for a wrong byte or one beyond N, or
"SHORT N of M" if the echo ended early), closes.
steady HOST PORT FLAG: as stream, 64 KiB every millisecond until the file
FLAG exists (then N is what it sent).
hang HOST PORT: sends 64 KiB, reads its echo, prints "HANGING" and waits
forever (the test kills it).
wait PORT [block]: accepts one connection, reads until EOF or an error
within 30 s (block: a blocking socket, no time limit), prints "EOF N",
"RESET N" or "TIMEOUT N".
answer PORT [FLAG]: for each connection: reads a request line (the byte
count wanted), waits 5 ms, writes that many pattern bytes and closes at
once (as an HTTP/1.0 server does); FLAG: accepts only once the file FLAG
exists, and prints "ANSWERED" after each answer.
late HOST PORT BYTES: one connection: prints "CONNECTED", asks for
BYTES, waits 2 s, then reads to EOF; prints "OK N" if the answer was
whole and right, else "WRONG got G".
ask HOST PORT N BYTES [nb]: N connections one after another, each asking
for BYTES and reading to EOF (nb: a nonblocking socket waited on with
select.epoll, edge-triggered); prints "OK N" if every answer was whole and
right, else "WRONG i got G".
later PORT FLAG [reading]: for each connection (a thread each): reads 1 MiB
of the pattern and echoes it, waits until the file FLAG exists, then sends
16 MiB more of the pattern (from offset 1 MiB) and closes (reading: another
thread is blocked in recv meanwhile, to the client's end).
idle HOST PORT [nb|two]: sends 1 MiB (64 KiB every 5 ms), reads its echo, prints "MOVED", then
reads to EOF in one blocking recv after another (nb: a nonblocking socket
waited on with an edge-triggered epoll; two: another thread asleep in
poll on the socket meanwhile, until it is readable), checks every byte
and prints "OK N" (N: all it read) or "WRONG N".
sink PORT FLAG: accepts one connection, reads 1 MiB, prints "SINKING",
waits until FLAG exists, then reads to EOF, checks every byte, prints
"SUNK N" or "WRONG N", and answers "SUNK N" ("RESET N" if reset).
rst HOST PORT KIB: sends KIB KiB of the pattern (64 KiB every 5 ms), closes with SO_LINGER 0
(a reset), prints "CLOSED" and sleeps.
half HOST PORT KIB: sends KIB KiB of the pattern (64 KiB every 5 ms), shuts its writing down,
prints "SHUT", reads the answer to its end and prints "REPLY " and it.
flood HOST PORT MIB: sends MIB MiB of the pattern in one sendall (it
blocks once the peer stops reading), prints "SENT N" and closes.
greet PORT FLAG: prints "PORT P" (P: the port, PORT 0 picks one), accepts
one connection once the file FLAG exists, reads
"hello", answers "ping", reads "pong", prints "GREETED" (or "WRONG" and
what it read) and closes.
handoff HOST PORT [plain]: connects, hands the socket at once to a new
program (this file's "handed", started with the socket as an inherited fd;
plain: with its environment cleared but for PATH, so without ssock),
closes its own and waits for it; the new program sends "hello", reads
"ping", answers "pong" and prints "HANDED OK" (or "HANDED WRONG" and what
it read); it prints "HANDED UP" first.
moving PORT [close]: prints "PORT P", accepts one connection, reads "1",
writes "2", reads "3", writes "hello", reads "ping", writes "pong", reads
to EOF, prints "SERVED OK" (or "SERVED WRONG" and what it read) and
closes (close: closes right after "hello", prints "SERVED CLOSED").
moved HOST PORT exec|spawn [FLAG]: connects, writes "1", reads "2", writes
"3", waits until the socket is readable (the server's "hello") without
reading (and until the file FLAG exists), then hands the socket to a plain program (this file's "handed_moved", its
environment cleared but for PATH): exec replaces this process with it;
spawn starts it, closes its own socket and waits for it. The plain
program reads "hello", writes "ping", reads "pong", prints "HANDED OK" (or
"HANDED WRONG" and what it read, "HANDED RESET" if reset) and closes.
"""
import os
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


SAY = threading.Lock()


def say(*words):
    """One whole line on stdout, from any thread (print writes the text
    and its newline apart: two threads' lines would run together)."""
    with SAY:
        sys.stdout.write(" ".join(str(w) for w in words) + "\n")
        sys.stdout.flush()


def echo(c):
    n = 0
    try:
        while True:
            b = c.recv(CHUNK)
            if not b:
                break
            c.sendall(b)
            n += len(b)
        say("ECHOED", n)
    except ConnectionResetError:
        say("RESET", n)
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


def stream(host, port, mib, flag=None):
    n = mib << 20
    s = socket.create_connection((host, port))
    got = [0]
    sent = [0]
    bad = []

    def reader():
        # To the end of the echo: a byte beyond what was sent is as wrong
        # as one short.
        while True:
            b = s.recv(CHUNK)
            if not b:
                break
            if got[0] + len(b) > sent[0] or b != at(got[0], len(b)):
                bad.append(got[0])
                break
            got[0] += len(b)

    t = threading.Thread(target=reader)
    t.start()
    off = 0
    while (off < n) if flag is None else not os.path.exists(flag):
        k = min(CHUNK, n - off) if flag is None else CHUNK
        sent[0] = off + k
        s.sendall(at(off, k))
        off += k
        if flag is not None:
            time.sleep(0.001)
    n = off
    # The server echoes until this end of stream, then closes.
    s.shutdown(socket.SHUT_WR)
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


def answer(port, flag=None):
    ls = listening(port)
    while True:
        if flag is not None:
            wait_for(flag)
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
        if flag is not None:
            print("ANSWERED", flush=True)


def read_all(s):
    """Reads s to EOF with blocking recvs."""
    got = bytearray()
    while True:
        b = s.recv(CHUNK)
        if not b:
            return got
        got += b


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


def late(host, port, size):
    s = socket.create_connection((host, port))
    print("CONNECTED", flush=True)
    s.sendall(b"%d\n" % size)
    time.sleep(2)
    got = read_all(s)
    s.close()
    want = b"".join(at(o, min(CHUNK, size - o)) for o in range(0, size, CHUNK))
    if bytes(got) != want:
        print("WRONG got", len(got), flush=True)
        sys.exit(1)
    print("OK", size, flush=True)


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


MIB = 1 << 20


def wait_for(flag):
    while not os.path.exists(flag):
        time.sleep(0.02)


def recv_exact(c, n):
    got = bytearray()
    while len(got) < n:
        b = c.recv(min(CHUNK, n - len(got)))
        if not b:
            break
        got += b
    return bytes(got)


def pattern(off, n):
    return b"".join(at(o, min(CHUNK, off + n - o)) for o in range(off, off + n, CHUNK))


def later_one(c, flag, reading):
    try:
        b = recv_exact(c, MIB)
        c.sendall(b)
        if reading:
            r = threading.Thread(target=read_all, args=(c,))
            r.start()
        wait_for(flag)
        for o in range(MIB, 17 * MIB, CHUNK):
            c.sendall(at(o, CHUNK))
        if reading:
            c.shutdown(socket.SHUT_WR)
            r.join()
    finally:
        c.close()


def later(port, flag, reading=False):
    ls = listening(port)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=later_one, args=(c, flag, reading), daemon=True).start()


def paced(s, n):
    """Sends n bytes of the pattern in 64 KiB pieces 5 ms apart: the first
    bytes of a connection go on the kernel socket until its writer moves
    (its peer's devd answered), the rest through ssock."""
    for o in range(0, n, CHUNK):
        s.sendall(at(o, min(CHUNK, n - o)))
        time.sleep(0.005)


def idle(host, port, how=None):
    import select
    s = socket.create_connection((host, port))
    paced(s, MIB)
    first = recv_exact(s, MIB)
    nb = how == "nb"
    if how == "two":
        p = select.poll()
        p.register(s.fileno(), select.POLLIN)
        threading.Thread(target=p.poll, daemon=True).start()
    print("MOVED", flush=True)
    rest = read_all_nb(s) if nb else read_all(s)
    got = first + bytes(rest)
    s.close()
    if got != pattern(0, 17 * MIB):
        print("WRONG", len(got), flush=True)
        sys.exit(1)
    print("OK", len(got), flush=True)


def sink(port, flag, until_reset=False):
    """Takes 1 MiB, then (until_reset: once poll says the peer reset, no
    byte read meanwhile) waits for `flag` and reads the rest."""
    import select
    ls = listening(port, 1)
    c, _ = ls.accept()
    got = bytearray(recv_exact(c, MIB))
    print("SINKING", flush=True)
    if until_reset:
        p = select.poll()
        p.register(c, select.POLLIN)
        while not any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(30000)):
            time.sleep(0.01)
        print("RESET-SEEN", flush=True)
    wait_for(flag)
    while True:
        try:
            b = c.recv(CHUNK)
        except ConnectionResetError:
            print("RESET", len(got), flush=True)
            return
        if not b:
            break
        got += b
    if bytes(got) != pattern(0, len(got)):
        print("WRONG", len(got), flush=True)
        sys.exit(1)
    print("SUNK", len(got), flush=True)
    try:
        c.sendall(b"SUNK %d" % len(got))
        c.close()
    except OSError:
        pass  # a writer that closed at once does not read the answer


def half(host, port, kib):
    s = socket.create_connection((host, port))
    paced(s, kib << 10)
    s.shutdown(socket.SHUT_WR)
    print("SHUT", flush=True)
    reply = read_all(s)
    print("REPLY", reply.decode(errors="replace"), flush=True)


def rst(host, port, kib):
    import struct
    s = socket.create_connection((host, port))
    paced(s, kib << 10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    print("CLOSED", flush=True)
    time.sleep(60)


def flood(host, port, mib):
    s = socket.create_connection((host, port))
    s.sendall(pattern(0, mib * MIB))
    s.close()
    print("SENT", mib * MIB, flush=True)


def greet(port, flag):
    ls = listening(port)
    print("PORT", ls.getsockname()[1], flush=True)
    wait_for(flag)
    c, _ = ls.accept()
    got = recv_exact(c, 5)
    if got == b"hello":
        c.sendall(b"ping")
        got = recv_exact(c, 4)
    print("GREETED" if got == b"pong" else f"WRONG {got!r}", flush=True)
    c.close()


def plain_env():
    """An environment without ssock (LD_PRELOAD and SSOCK_* gone)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def handoff(host, port, plain=False):
    import subprocess
    s = socket.create_connection((host, port))
    child = subprocess.Popen([sys.executable, __file__, "handed", str(s.fileno())],
                             pass_fds=[s.fileno()], env=plain_env() if plain else None)
    s.close()
    child.wait()


def moving(port, close=False):
    ls = listening(port)
    print("PORT", ls.getsockname()[1], flush=True)
    c, _ = ls.accept()
    if close:
        ok = recv_exact(c, 1) == b"1"
        c.sendall(b"2")
        ok = ok and recv_exact(c, 1) == b"3"
        c.sendall(b"hello")
        c.close()
        print("SERVED CLOSED" if ok else "SERVED WRONG", flush=True)
        return
    got = []
    for want, answer in ((b"1", b"2"), (b"3", b"hello"), (b"ping", b"pong")):
        b = recv_exact(c, len(want))
        got.append(b)
        if b != want:
            break
        c.sendall(answer)
    rest = read_all(c)
    ok = got == [b"1", b"3", b"ping"] and rest == b""
    print("SERVED OK" if ok else f"SERVED WRONG {got!r} {rest!r}", flush=True)
    c.close()


def moved(host, port, how, flag=None):
    import select
    import subprocess
    s = socket.create_connection((host, port))
    s.sendall(b"1")
    got = recv_exact(s, 1)
    s.sendall(b"3")
    select.select([s], [], [], 10)
    if flag:
        wait_for(flag)
    if got != b"2":
        print("MOVED WRONG", repr(got), flush=True)
        return
    argv = [sys.executable, __file__, "handed_moved", str(s.fileno())]
    if how == "exec":
        os.set_inheritable(s.fileno(), True)
        os.execve(sys.executable, argv, plain_env())
    child = subprocess.Popen(argv, pass_fds=[s.fileno()], env=plain_env())
    s.close()
    child.wait()


def handed_moved(fd):
    s = socket.socket(fileno=fd)
    try:
        got = recv_exact(s, 5)
        if got == b"hello":
            s.sendall(b"ping")
            got = recv_exact(s, 4)
    except ConnectionResetError:
        print("HANDED RESET", flush=True)
        return
    print("HANDED OK" if got == b"pong" else f"HANDED WRONG {got!r}", flush=True)
    s.close()


def handed(fd):
    # (Under ssock-run the shim took the socket over, or left it plain,
    # before this program's first line.)
    print("HANDED UP", flush=True)
    s = socket.socket(fileno=fd)
    s.sendall(b"hello")
    got = recv_exact(s, 4)
    if got == b"ping":
        s.sendall(b"pong")
    print("HANDED OK" if got == b"ping" else f"HANDED WRONG {got!r}", flush=True)
    s.close()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "serve":
        serve(int(sys.argv[2]))
    elif mode == "stream":
        stream(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "steady":
        stream(sys.argv[2], int(sys.argv[3]), 0, sys.argv[4])
    elif mode == "hang":
        hang(sys.argv[2], int(sys.argv[3]))
    elif mode == "wait":
        wait(int(sys.argv[2]), sys.argv[3:] == ["block"])
    elif mode == "late":
        late(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "answer":
        answer(int(sys.argv[2]), (sys.argv[3:] or [None])[0])
    elif mode == "ask":
        ask(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
            sys.argv[6:] == ["nb"])
    elif mode == "later":
        later(int(sys.argv[2]), sys.argv[3], sys.argv[4:] == ["reading"])
    elif mode == "idle":
        idle(sys.argv[2], int(sys.argv[3]), (sys.argv[4:] or [None])[0])
    elif mode == "sink":
        sink(int(sys.argv[2]), sys.argv[3], sys.argv[4:] == ["until-reset"])
    elif mode == "rst":
        rst(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "half":
        half(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "flood":
        flood(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "greet":
        greet(int(sys.argv[2]), sys.argv[3])
    elif mode == "handoff":
        handoff(sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["plain"])
    elif mode == "moving":
        moving(int(sys.argv[2]), sys.argv[3:] == ["close"])
    elif mode == "moved":
        moved(sys.argv[2], int(sys.argv[3]), sys.argv[4], (sys.argv[5:] or [None])[0])
    elif mode == "handed_moved":
        handed_moved(int(sys.argv[2]))
    elif mode == "handed":
        handed(int(sys.argv[2]))
    else:
        sys.exit("unknown mode " + mode)
