"""Blocking TCP echo for the shim tests (unmodified socket program).

server PORTFILE: accepts one connection, echoes until EOF, prints the byte count.
client PORT N: sends N pattern bytes in chunks while reading the echo back,
verifies every byte, prints "OK echo N", then waits for a line on stdin
before closing (so the test can inspect ringstat while it is connected).
reuse N: N connections within this process, one after another (see reuse).
close-all FILE: closes every fd it does not know, as daemons do (see close_all).
pserver PORTFILE [daemon]: a server that stays up (see pserver).
sink PORTFILE PACE_US / source PORT N [PAUSE_AT]: N pattern bytes one way,
read slowly.
"""
import os
import socket
import sys


def pattern(n, start=0):
    return bytes(((i * 131 + 7) & 0xFF) for i in range(start, start + n))


BIG = None


def expected(off, n):
    """The pattern's bytes at stream offset off (n <= 65536)."""
    global BIG
    if BIG is None:
        BIG = pattern(65536 + 256)  # the pattern's period is 256
    return BIG[off % 256:off % 256 + n]


def sink(portfile, pace_us, announce=False):
    """Accepts one connection and reads it to EOF, slowly (a pause of
    pace_us after each read: the writer's bytes pile up in flight), checking
    every byte against the pattern; prints "OK sink N". With announce, it
    prints "ACCEPTED" once it holds the connection."""
    import select
    import time
    ls = listen_and_publish(portfile)
    c, _ = ls.accept()
    if announce:
        print("ACCEPTED", flush=True)
    got = 0
    p = select.poll()
    p.register(c.fileno(), select.POLLIN)
    while True:
        # poll first: under the shim its readiness check is where a reader
        # with bytes waiting learns that devd is gone.
        if not p.poll(30000):
            raise SystemExit(f"nothing to read for 30 s after {got} bytes")
        b = c.recv(65536)
        if not b:
            break
        if b != expected(got, len(b)):
            raise SystemExit(f"corrupt bytes at {got}")
        got += len(b)
        time.sleep(pace_us / 1e6)
    print(f"OK sink {got}", flush=True)
    c.close()


def source(port, n, pause_at=None, hold=False):
    """Sends n pattern bytes as fast as the connection takes them (prints
    "SENDING" after the first MiB; with pause_at, "PAUSED" after that many
    bytes, and then waits for a line on stdin), shuts down writing, waits
    for the peer's close; prints "OK source N". With pause_at = n it closes
    right after the pause instead. With hold, it prints "CONNECTED" once
    connected and waits for a line on stdin before sending."""
    s = socket.create_connection(("127.0.0.1", port))
    if hold:
        print("CONNECTED", flush=True)
        sys.stdin.readline()
    sent = 0
    while sent < n:
        k = min(65536, n - sent)
        s.sendall(expected(sent, k))
        sent += k
        if sent >= 1 << 20 and sent - k < 1 << 20:
            print("SENDING", flush=True)
        if pause_at is not None and sent >= pause_at and sent - k < pause_at:
            print("PAUSED", flush=True)
            sys.stdin.readline()
    if pause_at == n:
        # Closes at once (no shutdown, no wait): what it still owes its
        # reader is the close's to deliver.
        s.close()
        print(f"OK source {sent} closed", flush=True)
        return
    s.shutdown(socket.SHUT_WR)
    if s.recv(1) != b"":
        raise SystemExit("data from a sink")
    s.close()
    print(f"OK source {sent}", flush=True)


def listen_and_publish(portfile):
    """A listening socket on an ephemeral port (or on $ECHO_PORT), written
    (atomically) to portfile."""
    import os
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", int(os.environ.get("ECHO_PORT", "0"))))
    ls.listen(8)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(ls.getsockname()[1]))
    os.rename(portfile + ".tmp", portfile)
    return ls


def echo(c):
    """Echoes until EOF, closes, reports the byte count."""
    total = 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        c.sendall(b)
        total += len(b)
    c.close()
    print(f"OK served {total}", flush=True)


def userver(portfile):
    """Accepts, waits for a line on stdin, closes without reading what
    came meanwhile (a reset, as the kernel's close with bytes unread)."""
    ls = listen_and_publish(portfile)
    c, _ = ls.accept()
    print("ACCEPTED", flush=True)
    sys.stdin.readline()
    c.close()
    ls.close()
    print("OK userver", flush=True)


def uclient(port, n):
    """Connects, waits for a line on stdin (the server accepted), sends n
    bytes, waits for another, then reads: the server closed without
    reading them, so a reset."""
    s = socket.create_connection(("127.0.0.1", port))
    sys.stdin.readline()
    s.sendall(pattern(n))
    print("SENT", flush=True)
    sys.stdin.readline()
    try:
        got = s.recv(10)
        print(f"uclient read {got!r}", flush=True)
    except ConnectionResetError:
        print("OK uclient ECONNRESET", flush=True)
    s.close()


def server(portfile):
    ls = listen_and_publish(portfile)
    c, _ = ls.accept()
    echo(c)
    ls.close()


def pserver(portfile, daemon):
    """Fork per connection, as PostgreSQL and sshd do, and running until
    killed: the parent accepts, forks and closes its copy; the child
    echoes until EOF and exits with os._exit, never calling close (the
    kernel closes the socket at exit). With `daemon`, the listener is made
    first and the process then daemonizes (fork, the parent exits, setsid),
    as servers started the packaged way do: the listener's registration
    must outlive the process that made it. The pid of the process that
    serves is written to PORTFILE.pid before the port is published."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    if daemon:
        if os.fork() != 0:
            os._exit(0)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
    with open(portfile + ".pid", "w") as f:
        f.write(str(os.getpid()))
    with open(portfile + ".tmp", "w") as f:
        f.write(str(ls.getsockname()[1]))
    os.rename(portfile + ".tmp", portfile)
    while True:
        c, _ = ls.accept()
        if os.fork() == 0:
            ls.close()
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
            os._exit(0)
        c.close()
        try:
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        except ChildProcessError:
            pass


def read_line(sock, what):
    """Bytes up to and including a newline; EOF before it ends the program."""
    line = b""
    while not line.endswith(b"\n"):
        b = sock.recv(100)
        if not b:
            raise SystemExit(f"EOF before {what}")
        line += b
    return line


def gserver(portfile):
    """Server speaks first (SMTP, PostgreSQL, ...): a greeting at accept,
    then one line echoed back, then close."""
    ls = listen_and_publish(portfile)
    c, _ = ls.accept()
    c.sendall(b"220 ready\n")
    line = read_line(c, "the client's line")
    c.sendall(line)
    print(f"OK served {len(line)}", flush=True)
    sys.stdin.readline()
    c.close()
    ls.close()


def greeted(port):
    """Client of gserver: reads the greeting (reporting how long it took
    from connect), sends a line, reads it back."""
    import time
    s = socket.socket()
    t = time.monotonic()
    s.connect(("127.0.0.1", port))
    g = read_line(s, "the greeting")
    took = (time.monotonic() - t) * 1000
    if g != b"220 ready\n":
        raise SystemExit(f"greeting {g!r}")
    s.sendall(b"HELO test\n")
    back = b""
    while len(back) < 10:
        back += s.recv(100)
    if back != b"HELO test\n":
        raise SystemExit(f"echo {back!r}")
    print(f"OK greeted in {took:.0f} ms", flush=True)
    sys.stdin.readline()
    s.close()


def fserver(portfile):
    """The same echo, fork-per-connection: the parent accepts, forks and
    closes its copy at once; the child serves the connection."""
    import os
    ls = listen_and_publish(portfile)
    c, _ = ls.accept()
    pid = os.fork()
    if pid == 0:
        ls.close()
        echo(c)
        os._exit(0)
    c.close()
    _, status = os.waitpid(pid, 0)
    ls.close()
    raise SystemExit(0 if status == 0 else 1)


def kserver(portfile, k):
    """k connections, each served by a forked child (4 bytes echoed); the
    parent's open fds after the 5th and after the last: a fork must not
    leave the parent an fd."""
    import os
    ls = listen_and_publish(portfile)
    counts = []
    for i in range(k):
        c, _ = ls.accept()
        pid = os.fork()
        if pid == 0:
            ls.close()
            c.sendall(c.recv(4))
            c.close()
            os._exit(0)
        c.close()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise SystemExit(f"child {i} failed")
        if i in (4, k - 1):
            counts.append(len(os.listdir("/proc/self/fd")))
    print(f"FDS {counts[0]} {counts[1]}", flush=True)
    ls.close()


def kclient(port, k):
    """k connections to kserver, 4 bytes each way."""
    for i in range(k):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect(("127.0.0.1", port))
        s.sendall(b"ping")
        got = b""
        while len(got) < 4:
            b = s.recv(4 - len(got))
            if not b:
                raise SystemExit(f"EOF on connection {i}")
            got += b
        if got != b"ping":
            raise SystemExit(f"connection {i} echoed {got!r}")
        s.close()
    print(f"OK kclient {k}", flush=True)


def idle_pollers(s):
    """Two threads poll the connected, idle socket s for input for 2.5 s
    (nothing comes): the process must sleep meanwhile, not spin (over
    0.3 s of CPU fails)."""
    import resource
    import select
    import threading

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def two_threads(wait):
        """wait() in two threads at once: what each returned, and the
        process's CPU seconds meanwhile."""
        before = cpu()
        results = [[], []]
        ts = [threading.Thread(target=lambda out=r: out.append(wait())) for r in results]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return results, cpu() - before

    def poll_in():
        p = select.poll()
        p.register(s.fileno(), select.POLLIN)
        return p.poll(2500)

    results, used = two_threads(poll_in)
    if any(r != [[]] for r in results):
        raise SystemExit(f"an idle poll reported {results}")
    if used > 0.3:
        raise SystemExit(f"two idle pollers used {used:.2f} s of CPU in 2.5 s")

    # Then one byte echoed and left unread under an edge-triggered epoll
    # set, whose event is taken once: two threads waiting on the set must
    # sleep too (the ring is readable, but nothing is new for them).
    s.sendall(b"x")
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN | select.EPOLLET)
    if not ep.poll(10):
        raise SystemExit("the echoed byte was not reported")
    results, used = two_threads(lambda: ep.poll(2.5))
    if any(r != [[]] for r in results):
        raise SystemExit(f"an edge-triggered wait reported again: {results}")
    if used > 0.3:
        raise SystemExit(f"two edge-triggered waiters used {used:.2f} s of CPU in 2.5 s")
    if s.recv(1) != b"x":
        raise SystemExit("the echoed byte was not x")
    ep.close()


def threaded_client(port, n):
    """A writer thread sends while the main thread reads the echo (full
    duplex on one socket), then a reader thread blocked in recv must be
    woken by the main thread's shutdown(SHUT_RD), as the kernel does."""
    import threading
    import time
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(("127.0.0.1", port))
    data = pattern(n)

    def writer():
        for off in range(0, n, 65536):
            s.sendall(data[off:off + 65536])

    w = threading.Thread(target=writer)
    w.start()
    got = bytearray()
    while len(got) < n:
        b = s.recv(65536)
        if not b:
            raise SystemExit(f"EOF after {len(got)} bytes")
        got += b
    w.join()
    if bytes(got) != data:
        raise SystemExit("corrupt echo")
    print(f"OK echo {len(got)}", flush=True)
    result = {}

    def blocked_reader():
        result["b"] = s.recv(1)

    r = threading.Thread(target=blocked_reader)
    r.start()
    time.sleep(0.3)
    s.shutdown(socket.SHUT_RD)
    r.join(5)
    if r.is_alive() or result.get("b") != b"":
        raise SystemExit(f"shutdown(SHUT_RD) did not wake the blocked reader: {result}")
    sys.stdin.readline()
    s.shutdown(socket.SHUT_WR)
    s.close()


def aserver(portfile):
    """The same echo as an asyncio (epoll, nonblocking) server."""
    import asyncio
    import os

    done = {}

    async def handle(reader, writer):
        total = 0
        while True:
            b = await reader.read(65536)
            if not b:
                break
            writer.write(b)
            await writer.drain()
            total += len(b)
        writer.close()
        done["total"] = total
        done["event"].set()

    async def main():
        done["event"] = asyncio.Event()
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        with open(portfile + ".tmp", "w") as f:
            f.write(str(port))
        os.rename(portfile + ".tmp", portfile)
        await done["event"].wait()
        srv.close()
        print(f"OK served {done['total']}", flush=True)

    asyncio.run(main())


def aclient(port, n):
    """The echo client on asyncio: nonblocking connect, epoll."""
    import asyncio

    async def main():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        chunk = 16384
        block = pattern(chunk * 251)
        sent = got = 0
        while got < n:
            if sent < n:
                k = min(chunk, n - sent)
                off = sent % len(block)
                writer.write((block + block)[off:off + k])
                await writer.drain()
                sent += k
            b = await reader.read(65536)
            if not b:
                raise SystemExit(f"EOF after {got} bytes")
            off = got % len(block)
            if b != (block + block)[off:off + len(b)]:
                raise SystemExit(f"corrupt echo at {got}")
            got += len(b)
        print(f"OK echo {got}", flush=True)
        sys.stdin.readline()
        writer.write_eof()
        if await reader.read(1) != b"":
            raise SystemExit("data after EOF")
        writer.close()
        await writer.wait_closed()

    asyncio.run(main())


def reused_number_socket(port):
    """A TCP socket on an fd number that earlier named a socket the shim
    left to the kernel: a connected UDP socket a fresh TCP socket was
    dup2'ed onto. What the shim knew of the number must not outlive what
    it named. (Before that, a connected UDP socket freed with close_range
    and its number made again by socket(), which forgets by itself.)"""
    import os
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect(("127.0.0.1", port))
    fd = u.detach()
    os.closerange(fd, fd + 1)
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if t.fileno() != fd:
        raise SystemExit(f"the TCP socket got fd {t.fileno()}, not {fd}")
    u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u2.connect(("127.0.0.1", port))
    fd2 = u2.detach()
    os.dup2(t.fileno(), fd2)
    t.close()
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM, fileno=fd2)


def client(port, n, vec=False, use_poll=False, use_select=False, use_dup=False, fionread=False,
           rcvtimeo=False):
    """vec: send with sendmsg/writev and receive with recvmsg/readv, in turns.
    use_poll: wait with poll(2) for POLLOUT before each send and POLLIN
    before each receive (10 s timeout each)."""
    import os
    import select
    if os.environ.get("ECHO_MODE") == "reused":
        s = reused_number_socket(port)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(("127.0.0.1", port))
    if use_dup:
        # Go on with a duplicate; closing the original must not end the stream.
        d = s.dup()
        s.close()
        s = d
    turn = 0

    def wait(ev):
        if use_select:
            want_r = ev == select.POLLIN
            r, w, _ = select.select([s] if want_r else [], [] if want_r else [s], [], 10)
            if not (r or w):
                raise SystemExit(f"select({ev}) timed out")
            return
        if not use_poll:
            return
        p = select.poll()
        p.register(s.fileno(), ev)
        got = p.poll(10000)
        if not got or not got[0][1] & ev:
            raise SystemExit(f"poll({ev}) timed out or failed: {got}")

    def send_all(data):
        nonlocal turn
        wait(select.POLLOUT)
        if not vec:
            s.sendall(data)
            return
        while data:
            half = len(data) // 2
            parts = [data[:half], data[half:]]
            turn += 1
            k = s.sendmsg(parts) if turn % 2 else os.writev(s.fileno(), parts)
            data = data[k:]

    def recv_some():
        nonlocal turn
        wait(select.POLLIN)
        if fionread:
            import array
            import fcntl
            import termios
            cnt = array.array("i", [0])
            fcntl.ioctl(s.fileno(), termios.FIONREAD, cnt, True)
            if cnt[0] <= 0:
                raise SystemExit(f"FIONREAD says {cnt[0]} after POLLIN")
            b = s.recv(cnt[0])
            if len(b) != cnt[0]:
                raise SystemExit(f"recv gave {len(b)} of {cnt[0]} announced bytes")
            return b
        if not vec:
            return s.recv(65536)
        turn += 1
        if turn % 2:
            return s.recvmsg(65536)[0]
        a, b = bytearray(1000), bytearray(64536)
        k = os.readv(s.fileno(), [a, b])
        return (bytes(a) + bytes(b))[:k]

    if os.environ.get("ECHO_MODE") == "splice":
        # splice cannot reach a ring: refused with EINVAL (the stream is
        # untouched), so the echo below must still carry every byte.
        r, w = os.pipe()
        try:
            os.splice(s.fileno(), w, 1, flags=os.SPLICE_F_NONBLOCK)
            raise SystemExit("splice from an accelerated socket was accepted")
        except OSError as e:
            if e.errno != 22:
                raise SystemExit(f"splice failed with errno {e.errno}, not EINVAL")
        os.close(r)
        os.close(w)
    chunk = 16384
    sent = got = 0
    block = pattern(chunk * 251)  # period 251*chunk bytes of the pattern

    def echo_until(total):
        nonlocal sent, got
        while got < total:
            if sent < total:
                k = min(chunk, total - sent)
                off = sent % len(block)
                data = (block + block)[off:off + k]
                send_all(data)
                sent += k
            b = recv_some()
            if not b:
                raise SystemExit(f"EOF after {got} bytes")
            off = got % len(block)
            want = (block + block)[off:off + len(b)]
            if b != want:
                raise SystemExit(f"corrupt echo at {got}")
            got += len(b)

    if os.environ.get("ECHO_MODE") == "bigvec":
        got = sent = big_vectors(s, n)
    else:
        echo_until(n)
    if os.environ.get("ECHO_MODE") == "idlepoll":
        # Both directions carried bytes: they are on the rings now.
        idle_pollers(s)
    if os.environ.get("ECHO_AGAIN"):
        # A second round once told to (the test changes something between).
        print(f"OK echo {got}", flush=True)
        sys.stdin.readline()
        echo_until(2 * n)
    if rcvtimeo:
        import struct
        import time
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 500000))
        t = time.monotonic()
        try:
            s.recv(1)
            raise SystemExit("recv returned although nothing was sent")
        except BlockingIOError:
            pass
        took = time.monotonic() - t
        if not 0.4 <= took <= 3.0:
            raise SystemExit(f"SO_RCVTIMEO of 0.5 s ended the recv after {took:.2f} s")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
    print(f"OK echo {got}", flush=True)
    sys.stdin.readline()
    s.shutdown(socket.SHUT_WR)
    if s.recv(1) != b"":
        raise SystemExit("data after EOF")
    s.close()


def big_vectors(s, n):
    """Sends n bytes of the pattern in vectors larger than the ring
    (sendmsg and writev in turns, a thread of their own, each vector
    several iovecs of which one is a single byte), while this thread
    receives the echo into three buffers of odd sizes, with readv and with
    recvmsg_into(MSG_WAITALL) in turns, and verifies it. Returns n."""
    import os
    import select
    import threading
    data = pattern(n)
    failed = []

    def send():
        try:
            off, turn = 0, 0
            while off < n:
                blk = data[off:off + 400_000]
                parts = [blk[:1], blk[1:250_000], blk[250_000:250_003], blk[250_003:]]
                parts = [p for p in parts if p]
                turn += 1
                k = s.sendmsg(parts) if turn % 2 else os.writev(s.fileno(), parts)
                if k <= 0:
                    raise SystemExit(f"vector send returned {k}")
                off += k
        except BaseException as e:  # reported by the receiving thread
            failed.append(e)

    t = threading.Thread(target=send)
    t.start()
    got, turn = 0, 0
    bufs = [bytearray(7), bytearray(90_000), bytearray(300_000)]
    whole = sum(len(b) for b in bufs)
    while got < n:
        if not select.select([s], [], [], 20)[0]:
            raise SystemExit(f"nothing to read after {got} bytes (sender: {failed!r})")
        turn += 1
        if turn % 2 and n - got >= whole:
            # All three buffers filled in one call, across many waits.
            k = s.recvmsg_into(bufs, 0, socket.MSG_WAITALL)[0]
            if k != whole:
                raise SystemExit(f"MSG_WAITALL returned {k} of {whole} bytes")
        else:
            k = os.readv(s.fileno(), bufs)
        if k == 0:
            raise SystemExit(f"EOF after {got} bytes")
        b = b"".join(bytes(x) for x in bufs)[:k]
        if b != data[got:got + k]:
            raise SystemExit(f"corrupt echo at {got}")
        got += k
    t.join()
    if failed:
        raise SystemExit(f"send failed: {failed[0]!r}")
    return n


def failed_pass():
    """A connection whose socket a failed fd passing tried to send away:
    the hold taken for the passing is given back, so closing the socket
    still ends the stream for the peer. Prints "eof" or "no eof"."""
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(1)
    c = socket.create_connection(l.getsockname())
    a, _ = l.accept()
    c.sendall(b"x")  # both ends settled before the passing
    assert a.recv(1) == b"x"
    x, y = socket.socketpair()
    y.close()
    try:
        socket.send_fds(x, [b"fd"], [c.fileno()])
        print("sent?", flush=True)
    except OSError:
        pass
    c.close()
    a.settimeout(5)
    try:
        print("eof" if a.recv(1) == b"" else "data", flush=True)
    except socket.timeout:
        print("no eof", flush=True)


def recv_exact(sock, n):
    got = b""
    while len(got) < n:
        b = sock.recv(n - len(got))
        if not b:
            raise SystemExit(f"EOF after {len(got)} of {n} bytes")
        got += b
    return got


def local_pair():
    """A listener of this process and a connection to it, both ends
    settled by one byte: (listener, connector, acceptor)."""
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(8)
    c = socket.create_connection(l.getsockname())
    a, _ = l.accept()
    c.sendall(b"x")
    if recv_exact(a, 1) != b"x":
        raise SystemExit("bytes differ")
    return l, c, a


def maps_of_regions():
    """How many connection regions (memfd "ssock-direct") this process maps."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "memfd:ssock-direct" in line)


def reuse(n):
    """n connections one after another between a listener and a client of
    this process, each carrying its own bytes both ways and closed before
    the next (their regions are kept and reused). Then a child forked now
    must map no region (kept ones are not inherited), while this process
    still keeps some. Prints "OK reuse N kept=K child=M"."""
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(8)
    for i in range(n):
        c = socket.create_connection(l.getsockname())
        a, _ = l.accept()
        data = pattern(1000 + 37 * i, i)
        c.sendall(data)
        if recv_exact(a, len(data)) != data:
            raise SystemExit(f"connection {i}: bytes differ")
        a.sendall(data[::-1])
        if recv_exact(c, len(data)) != data[::-1]:
            raise SystemExit(f"connection {i}: bytes back differ")
        c.close()
        if a.recv(1) != b"":
            raise SystemExit(f"connection {i}: data after close")
        a.close()
    kept = maps_of_regions()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, str(maps_of_regions()).encode())
        os._exit(0)
    os.close(w)
    child = int(os.read(r, 100))
    os.waitpid(pid, 0)
    print(f"OK reuse {n} kept={kept} child={child}", flush=True)


def fork_live():
    """A connection live when this process forks (the child closes its
    copies and exits; the region may be in it), then a second one. Prints
    "OK fork-live"; the test checks that the first region was not reused."""
    l, c, a = local_pair()
    pid = os.fork()
    if pid == 0:
        c.close()
        a.close()
        os._exit(0)
    os.waitpid(pid, 0)
    c.close()
    if a.recv(1) != b"":
        raise SystemExit("data after close")
    a.close()
    c = socket.create_connection(l.getsockname())
    a, _ = l.accept()
    c.sendall(b"y")
    if recv_exact(a, 1) != b"y":
        raise SystemExit("bytes differ")
    c.close()
    a.close()
    print("OK fork-live", flush=True)


def close_all(path):
    """A connection within this process; then every fd it does not know is
    closed, with os.closerange (close_range) around its three sockets and
    a loop of os.close up to 1100, as daemons and sshd do; then a file is
    opened (it gets the lowest free number), more bytes go both ways on the
    first connection and on a second one, and the file must hold exactly
    what this program wrote to it. Prints "OK close-all"."""
    l, c, a = local_pair()
    mine = sorted(s.fileno() for s in (l, c, a))
    low = 3
    for fd in mine:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
    for fd in range(3, 1100):
        if fd not in mine:
            try:
                os.close(fd)
            except OSError:
                pass
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for i in range(20):
        data = pattern(70000, i)
        c.sendall(data)
        if recv_exact(a, len(data)) != data:
            raise SystemExit(f"round {i}: bytes differ")
        a.sendall(data[:100])
        if recv_exact(c, 100) != data[:100]:
            raise SystemExit(f"round {i}: bytes back differ")
    c2 = socket.create_connection(l.getsockname())
    a2, _ = l.accept()
    c2.sendall(b"second")
    if recv_exact(a2, 6) != b"second":
        raise SystemExit("second connection: bytes differ")
    for s in (c2, a2, c, a, l):
        s.close()
    os.write(f, b"the program's own bytes\n")
    os.close(f)
    with open(path, "rb") as g:
        got = g.read()
    if got != b"the program's own bytes\n":
        raise SystemExit(f"the program's file holds {got!r}")
    print("OK close-all", flush=True)


def reset_before_accept():
    """A connector that writes and resets before its server accepts: the
    server reads the bytes, then the reset (as on kernel TCP)."""
    import struct
    import time
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    c = socket.create_connection(ls.getsockname())
    c.sendall(b"early bytes")
    time.sleep(0.1)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    time.sleep(0.2)
    a, _ = ls.accept()
    got = b""
    try:
        while True:
            b = a.recv(100)
            if not b:
                got += b" EOF"
                break
            got += b
    except ConnectionResetError:
        got += b" ECONNRESET"
    print(got.decode(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "reset-before-accept":
        reset_before_accept()
        raise SystemExit(0)
    if sys.argv[1] == "close-all":
        close_all(sys.argv[2])
        raise SystemExit(0)
    if sys.argv[1] == "fork-live":
        fork_live()
        raise SystemExit(0)
    if sys.argv[1] == "failed-pass":
        failed_pass()
        raise SystemExit(0)
    if sys.argv[1] == "reuse":
        reuse(int(sys.argv[2]))
        raise SystemExit(0)
    if sys.argv[1] == "sink":
        sink(sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["announce"])
        raise SystemExit(0)
    if sys.argv[1] == "source":
        source(int(sys.argv[2]), int(sys.argv[3]),
               int(sys.argv[4]) if len(sys.argv) > 4 else None,
               sys.argv[5:] == ["hold"])
        raise SystemExit(0)
    if sys.argv[1] == "userver":
        userver(sys.argv[2])
        raise SystemExit(0)
    if sys.argv[1] == "uclient":
        uclient(int(sys.argv[2]), int(sys.argv[3]))
        raise SystemExit(0)
    if sys.argv[1] == "pserver":
        pserver(sys.argv[2], sys.argv[3:] == ["daemon"])
    if sys.argv[1] == "server":
        server(sys.argv[2])
    elif sys.argv[1] == "fserver":
        fserver(sys.argv[2])
    elif sys.argv[1] == "kserver":
        kserver(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "gserver":
        gserver(sys.argv[2])
    elif sys.argv[1] == "aserver":
        aserver(sys.argv[2])
    else:
        mode = sys.argv[4] if len(sys.argv) > 4 else ""
        if mode == "greeted":
            greeted(int(sys.argv[2]))
            raise SystemExit(0)
        if mode == "asyncio":
            aclient(int(sys.argv[2]), int(sys.argv[3]))
            raise SystemExit(0)
        if mode == "kclient":
            kclient(int(sys.argv[2]), int(sys.argv[3]))
            raise SystemExit(0)
        if mode == "threads":
            threaded_client(int(sys.argv[2]), int(sys.argv[3]))
            raise SystemExit(0)
        client(int(sys.argv[2]), int(sys.argv[3]), mode == "vec", mode in ("poll", "fionread"),
               mode == "select", mode == "dup", mode == "fionread", mode == "rcvtimeo")
