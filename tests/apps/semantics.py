#!/usr/bin/env python3
"""Walks through the socket semantics the shim must keep, printing one line
per observation. tests/tests/semantics.rs runs it on kernel TCP and under
ssock-run and requires identical output. Nothing here knows about ssock.

Arguments name the cases to run (all by default); `-case_x` leaves one
out. The last line counts the connections that should be accelerated
(every one but the refused connect).

Between two hosts (tests/tests/remote_semantics.rs): `agent PORT CTL` on
one host listens on PORT and holds the ends it accepts, doing what it is
told over the unix socket CTL (the hosts share a file system); with
SEMANTICS_REMOTE=HOST:PORT:CTL on the other, each pair is a connection to
that agent, the agent's end standing in for the pair's first socket, and
only the cases of REMOTE_CASES run."""

import errno
import hashlib
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

CONNS = 0
# (host, port, control socket) of the agent on the other host, if any.
REMOTE = None


def say(*a):
    print(*a, flush=True)


def err_name(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if isinstance(e, OSError) else type(e).__name__


def attempt(f):
    """f's result ("ok" for none), or the name of the error it raised."""
    try:
        r = f()
        return "ok" if r is None else r
    except OSError as e:
        return err_name(e)


def listener(family=socket.AF_INET, host="127.0.0.1"):
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.bind((host, 0))
    ls.listen(16)
    return ls


class RemoteEnd:
    """The agent's end of a connection (see the module's doc): each call
    is made there, an error raised here as the same OSError. A forked
    child's close is its own copy's: the agent's end stays."""

    OPS = ("recv", "send", "sendall", "shutdown", "setsockopt", "getsockopt",
           "getsockname", "getpeername")

    def __init__(self):
        self.owner = os.getpid()
        self.lock = threading.Lock()
        self.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A call that hangs there (a lost byte or mark) fails the run.
        self.ctl.settimeout(60)
        self.ctl.connect(REMOTE[2])
        self.call("accept")

    def call(self, op, *args):
        import pickle
        with self.lock:
            data = pickle.dumps((op, args))
            self.ctl.sendall(struct.pack("!I", len(data)) + data)
            n = struct.unpack("!I", recv_exactly(self.ctl, 4))[0]
            kind, val = pickle.loads(recv_exactly(self.ctl, n))
        if kind == "err":
            raise OSError(*val)
        return val

    def __getattr__(self, name):
        if name in RemoteEnd.OPS:
            return lambda *a: self.call(name, *a)
        raise AttributeError(name)

    def close(self):
        if os.getpid() == self.owner:
            self.call("close")
            self.ctl.close()


def agent(port, ctl):
    """The other host's ends: one per control connection ("accept"
    first), each call done on it and answered."""
    import pickle
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(16)
    us = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    us.bind(ctl)
    us.listen(16)
    taking = threading.Lock()

    def serve(k):
        s = None
        while True:
            head = recv_exactly(k, 4)
            if len(head) < 4:
                break
            op, args = pickle.loads(recv_exactly(k, struct.unpack("!I", head)[0]))
            try:
                if op == "accept":
                    with taking:
                        s, _ = ls.accept()
                    res = ("ok", None)
                elif op == "close":
                    s.close()
                    res = ("ok", None)
                elif op in RemoteEnd.OPS:
                    res = ("ok", getattr(s, op)(*args))
                else:
                    res = ("err", (errno.EINVAL, f"no operation {op}"))
            except OSError as e:
                res = ("err", (e.errno, e.strerror))
            data = pickle.dumps(res)
            k.sendall(struct.pack("!I", len(data)) + data)
        k.close()

    say("AGENT READY")
    while True:
        k, _ = us.accept()
        threading.Thread(target=serve, args=(k,), daemon=True).start()


def pair(family=socket.AF_INET, host="127.0.0.1"):
    """A connected pair in one thread: connect, then accept (between two
    hosts: the agent's end first)."""
    global CONNS
    if REMOTE:
        s = socket.create_connection(REMOTE[:2])
        r = RemoteEnd()
        CONNS += 1
        return r, s
    ls = listener(family, host)
    c = socket.socket(family, socket.SOCK_STREAM)
    c.connect(ls.getsockname()[:2])
    a, _ = ls.accept()
    ls.close()
    CONNS += 1
    return c, a


def recv_exactly(s, n):
    b = b""
    while len(b) < n:
        k = s.recv(n - len(b))
        if not k:
            break
        b += k
    return b


def ev_names(mask):
    names = [("IN", select.EPOLLIN), ("OUT", select.EPOLLOUT), ("RDHUP", select.EPOLLRDHUP),
             ("HUP", select.EPOLLHUP), ("ERR", select.EPOLLERR)]
    return "|".join(n for n, m in names if mask & m) or "-"


def events(ep, t=0.2):
    return ",".join(ev_names(m) for _, m in ep.poll(t)) or "none"


def events_soon(ep):
    """What a wait that the event should end reports, and whether it ended
    only with its 5 s timeout (a lost wake-up, which a final look after
    the timeout would hide)."""
    t0 = time.monotonic()
    r = events(ep, 5)
    return r if time.monotonic() - t0 < 2 else r + " (only at the timeout)"


def case_peek_and_basics():
    c, a = pair()
    say("peername matches:", c.getpeername() == a.getsockname())
    c.sendall(b"hello world")
    say("peek:", a.recv(5, socket.MSG_PEEK))
    say("recv after peek:", recv_exactly(a, 11))
    c.close()
    say("eof:", a.recv(10))
    a.close()


def case_waitall():
    c, a = pair()

    def trickle():
        for _ in range(4):
            c.sendall(b"w" * 250)
            time.sleep(0.02)

    t = threading.Thread(target=trickle)
    t.start()
    say("waitall got:", len(a.recv(1000, socket.MSG_WAITALL)))
    t.join()
    c.close()
    a.close()


def case_half_close():
    c, a = pair()
    c.sendall(b"request")
    c.shutdown(socket.SHUT_WR)
    say("half-close server reads:", recv_exactly(a, 100))
    a.sendall(b"reply")
    a.close()
    say("half-close client reads:", recv_exactly(c, 100), "then", c.recv(10))
    c.close()


def case_rcvtimeo():
    c, a = pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200000))
    try:
        a.recv(10)
        say("rcvtimeo: returned")
    except OSError as e:
        say("rcvtimeo:", err_name(e))
    c.close()
    a.close()


def case_nonblocking_connect():
    global CONNS
    ls = listener()
    s = socket.socket()
    s.setblocking(False)
    say("nonblocking connect:", errno.errorcode.get(s.connect_ex(ls.getsockname()), "0"))
    a, _ = ls.accept()
    ls.close()
    CONNS += 1
    _, w, _ = select.select([], [s], [], 10)
    say("writable:", bool(w), "SO_ERROR:", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    try:
        s.recv(10)
        say("nonblocking recv: returned")
    except OSError as e:
        say("nonblocking recv:", err_name(e))
    s.send(b"nb")
    say("server got:", recv_exactly(a, 2))
    a.sendall(b"back")
    r, _, _ = select.select([s], [], [], 10)
    say("readable:", bool(r), s.recv(10))
    s.close()
    a.close()


def case_refused():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    s = socket.socket()
    s.setblocking(False)
    say("refused connect:", errno.errorcode.get(s.connect_ex(("127.0.0.1", port)), "0"))
    select.select([], [s], [], 10)
    say("SO_ERROR:", errno.errorcode.get(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)))
    s.close()


def case_epoll_edges():
    c, a = pair()
    a.setblocking(False)
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN | select.EPOLLET)
    say("et idle:", events(ep, 0.05))
    c.sendall(b"0123456789")
    say("et data:", events_soon(ep))
    say("et again:", events(ep, 0.1))
    say("et partial read:", a.recv(5))
    say("et after partial read:", events(ep, 0.1))
    c.sendall(b"more")
    say("et new data:", events_soon(ep))
    say("et read:", recv_exactly(a, 9))
    ep.modify(a.fileno(), select.EPOLLIN)
    say("lt idle:", events(ep, 0.05))
    c.sendall(b"x")
    say("lt data:", events_soon(ep))
    say("lt again:", events(ep, 0.1))
    say("lt read:", a.recv(10))
    ep.modify(a.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
    c.sendall(b"y")
    say("oneshot data:", events_soon(ep))
    say("oneshot again:", events(ep, 0.1))
    ep.modify(a.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
    say("oneshot rearmed:", events_soon(ep))
    say("oneshot read:", a.recv(10))
    if not REMOTE:
        ep.register(c.fileno(), select.EPOLLOUT)
        say("out:", events_soon(ep))
        ep.unregister(c.fileno())
    ep.modify(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    c.shutdown(socket.SHUT_WR)
    say("rdhup:", events_soon(ep))
    say("rdhup read:", a.recv(10))
    a.shutdown(socket.SHUT_WR)
    say("both shut:", events_soon(ep))
    ep.close()
    c.close()
    a.close()


def case_epoll_local_shutdown():
    """Readiness after this end's own shutdowns, level- and edge-
    triggered: SHUT_RD makes it readable (the end of the stream) with
    RDHUP, both ways shut add HUP. The waits before found nothing, and a
    shutdown moves no byte."""
    c, a = pair()
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    say("lt idle:", events(ep, 0.05))
    say("lt idle again:", events(ep, 0))
    c.sendall(b"x")
    say("lt data:", events(ep, 5))
    say("lt read:", a.recv(1))
    say("lt nothing left:", events(ep, 0))
    a.shutdown(socket.SHUT_RD)
    say("lt shut_rd:", events(ep, 5))
    say("lt shut_rd read:", a.recv(10))
    a.shutdown(socket.SHUT_WR)
    say("lt both shut:", events(ep, 5))
    ep.close()
    d, b = pair()
    ep = select.epoll()
    ep.register(b.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
    say("et idle:", events(ep, 0.05))
    d.sendall(b"y")
    say("et data:", events(ep, 5))
    say("et read:", b.recv(1))
    b.shutdown(socket.SHUT_RD)
    say("et shut_rd:", events(ep, 5))
    say("et shut_rd again:", events(ep, 0.05))
    b.shutdown(socket.SHUT_WR)
    # (Only the first wait: the kernel may report the FIN's ACK again.)
    say("et both shut:", events(ep, 5))
    ep.close()
    e, f = pair()
    ep = select.epoll()
    ep.register(f.fileno(), select.EPOLLOUT | select.EPOLLET)
    say("et out:", events(ep, 5))
    say("et out again:", events(ep, 0.05))
    f.shutdown(socket.SHUT_WR)
    say("et out shut_wr:", events(ep, 5))
    ep.close()
    for s in (c, a, d, b, e, f):
        s.close()


def case_epoll_reset_edges():
    """A reset seen by edge- and level-triggered epoll: one edge with
    all of IN, RDHUP, HUP and ERR, none more after a look from another
    instance; once SO_ERROR was read, no ERR."""
    c, a = pair()
    et = select.epoll()
    et.register(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
    lt = select.epoll()
    lt.register(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    say("et idle:", events(et, 0.05))
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    say("et reset:", events(et, 5))
    say("lt reset:", events(lt, 0))
    say("et again:", events(et, 0.05))
    e = a.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    say("so_error:", errno.errorcode.get(e, e))
    say("et after so_error:", events(et, 0.05))
    say("lt after so_error:", events(lt, 0))
    et.close()
    lt.close()
    a.close()
    # A receive takes the reset's error: still no edge after it.
    c, a = pair()
    et = select.epoll()
    et.register(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    say("et reset:", events(et, 5))
    say("recv:", attempt(lambda: a.recv(10)))
    say("et after recv:", events(et, 0.05))
    say("recv again:", attempt(lambda: a.recv(10)))
    say("et after the second recv:", events(et, 0.05))
    et.close()
    a.close()


def case_shut_rd_keeps_receiving():
    """After this end's shutdown(SHUT_RD), Linux's TCP still hands out
    the bytes that were there and those that come after, and says 0 (not
    a wait) when there are none."""
    c, a = pair()
    c.sendall(b"hello")
    say("readable:", bool(select.select([a], [], [], 5)[0]))
    a.shutdown(socket.SHUT_RD)
    say("recv queued:", recv_exactly(a, 5))
    say("recv none:", a.recv(10))
    c.sendall(b"later")
    time.sleep(0.2)
    say("recv later:", recv_exactly(a, 5))
    say("recv none again:", a.recv(10))
    c.close()
    a.close()


def cpu_seconds():
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def case_epoll_waits_sleep():
    """An edge-triggered wait with nothing new to report, and a poll for
    RDHUP alone with unread data, must sleep through their timeout, not
    spin: printed as whether the wait used under a fifth of its time."""
    c, a = pair()
    a.setblocking(False)
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET)
    c.sendall(b"unread")
    say("et first:", events(ep, 5))
    t = cpu_seconds()
    say("et idle wait:", events(ep, 1.0), "slept:", cpu_seconds() - t < 0.2)
    p = select.poll()
    p.register(a.fileno(), select.POLLRDHUP)
    t = cpu_seconds()
    say("rdhup-only poll:", p.poll(1000), "slept:", cpu_seconds() - t < 0.2)
    say("then read:", a.recv(10))
    ep.close()
    c.close()
    a.close()


def case_oneshot_fired_then_peer_closed():
    """A one-shot registration that fired, then its peer closes: the next
    wait must sleep through its timeout (the registration is disabled
    until EPOLL_CTL_MOD), not wake again and again; after the MOD it
    reports the end."""
    c, a = pair()
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT)
    c.sendall(b"x")
    say("oneshot first:", events(ep, 5))
    c.close()
    time.sleep(0.2)
    t = cpu_seconds()
    say("oneshot fired, peer closed:", events(ep, 0.5), "slept:", cpu_seconds() - t < 0.1)
    ep.modify(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    say("oneshot rearmed:", events(ep, 5))
    say("oneshot reads:", a.recv(10), a.recv(10))
    ep.close()
    a.close()


def case_nested_epoll():
    c, a = pair()
    inner = select.epoll()
    inner.register(a.fileno(), select.EPOLLIN)
    outer = select.epoll()
    outer.register(inner.fileno(), select.EPOLLIN)
    say("nested idle:", events(outer, 0.05))
    c.sendall(b"n")
    got = outer.poll(5)
    say("nested outer:", [fd == inner.fileno() for fd, _ in got], ev_names(got[0][1]) if got else "")
    p = select.poll()
    p.register(inner.fileno(), select.POLLIN)
    say("inner in poll:", [(fd == inner.fileno(), m & select.POLLIN != 0) for fd, m in p.poll(5000)])
    say("inner:", events(inner, 5))
    say("nested read:", a.recv(10))
    outer.close()
    inner.close()
    c.close()
    a.close()


def case_dup2_onto_a_member():
    """dup2 onto a connection's fd closes that connection (its peer reads
    the end) and its epoll registration goes with it."""
    c, a = pair()
    c.settimeout(5)
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    r, w = os.pipe()
    os.dup2(r, a.fileno())
    try:
        say("peer after dup2:", c.recv(10))
    except OSError as e:
        say("peer after dup2:", err_name(e))
    os.write(w, b"p")
    say("epoll after dup2:", events(ep, 0.05))
    os.close(a.detach())
    # With SO_LINGER 0 the close that dup2 makes is a reset.
    c2, a2 = pair()
    c2.settimeout(5)
    a2.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    os.dup2(r, a2.fileno())
    try:
        say("peer after dup2 with SO_LINGER 0:", c2.recv(10))
    except OSError as e:
        say("peer after dup2 with SO_LINGER 0:", err_name(e))
    os.close(a2.detach())
    # The same with no fd left to spare.
    c3, a3 = pair()
    c3.settimeout(5)
    a3.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    import resource
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, limits[1]))
    fillers = []
    try:
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        say("filled up to:", err_name(e))
    os.dup2(r, a3.fileno())
    for fd in fillers:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    try:
        say("peer after dup2 at the fd limit:", c3.recv(10))
    except OSError as e:
        say("peer after dup2 at the fd limit:", err_name(e))
    os.close(a3.detach())
    for fd in (r, w):
        os.close(fd)
    ep.close()
    c.close()
    c2.close()
    c3.close()


def case_select_from_c():
    """libc's select itself (through ctypes, as a C program calls it): a
    bad fd is EBADF with the sets untouched, and the timeout is updated to
    the time not slept."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    class Timeval(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]

    def fdset(*fds):
        b = (ctypes.c_ulong * 16)()
        for fd in fds:
            b[fd // 64] |= 1 << (fd % 64)
        return b

    def isset(b, fd):
        return bool(b[fd // 64] & (1 << (fd % 64)))

    c, a = pair()
    bad = os.open("/dev/null", os.O_RDONLY)
    os.close(bad)
    r = fdset(a.fileno(), bad)
    tv = Timeval(0, 100000)
    n = libc.select(max(a.fileno(), bad) + 1, ctypes.byref(r), None, None, ctypes.byref(tv))
    say("select with a closed fd:", n, errno.errorcode.get(ctypes.get_errno()),
        "sets kept:", isset(r, a.fileno()) and isset(r, bad))
    r = fdset(a.fileno())
    tv = Timeval(0, 200000)
    n = libc.select(a.fileno() + 1, ctypes.byref(r), None, None, ctypes.byref(tv))
    say("select timed out:", n, "timeout left:", (tv.tv_sec, tv.tv_usec))
    c.sendall(b"s")
    r = fdset(a.fileno())
    tv = Timeval(5, 0)
    n = libc.select(a.fileno() + 1, ctypes.byref(r), None, None, ctypes.byref(tv))
    say("select ready:", n, isset(r, a.fileno()), "timeout left over 4 s:",
        tv.tv_sec * 1000000 + tv.tv_usec > 4000000)
    c.sendall(b"t")
    for sec, usec in ((2**62, 0), (-1, 0), (0, -5)):
        r = fdset(a.fileno())
        tv = Timeval(sec, usec)
        n = libc.select(a.fileno() + 1, ctypes.byref(r), None, None, ctypes.byref(tv))
        say(f"select with a timeout of ({sec}, {usec}):", n,
            errno.errorcode.get(ctypes.get_errno()) if n < 0 else "",
            (tv.tv_sec, tv.tv_usec) if n < 0 else "")
    say("read:", recv_exactly(a, 2))
    c.close()
    a.close()


def case_epoll_member_added_by_another_thread():
    """A thread sleeps in epoll_wait on a set with no connection in it yet
    (an event loop's idle wait); another thread adds a connected socket
    whose bytes are waiting: the sleeper wakes with it at once, as apache
    mpm_event's listener thread does when a worker hands a keep-alive
    connection back, well before its 5 s timeout."""
    c, a = pair()
    ep = select.epoll()
    got = []

    def waiter():
        t = time.monotonic()
        r = ep.poll(5)
        got.append((r, time.monotonic() - t))

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.2)
    c.sendall(b"x")
    ep.register(a.fileno(), select.EPOLLIN)
    th.join()
    r, took = got[0]
    say("added by another thread:", [(fd == a.fileno(), ev_names(m)) for fd, m in r],
        "woke early:", took < 4)
    say("then read:", a.recv(10))
    ep.close()
    c.close()
    a.close()


def case_threads():
    c, a = pair()
    msg = 4096
    count = 200

    def writer(ch):
        for _ in range(count):
            c.sendall(ch * msg)

    ts = [threading.Thread(target=writer, args=(ch,)) for ch in (b"A", b"B")]
    for t in ts:
        t.start()
    data = recv_exactly(a, 2 * msg * count)
    for t in ts:
        t.join()
    whole = all(data[i:i + msg] in (b"A" * msg, b"B" * msg) for i in range(0, len(data), msg))
    say("threads: bytes", len(data), "every send whole:", whole)
    c.close()
    a.close()


def case_fork():
    c, a = pair()
    pid = os.fork()
    if pid == 0:
        c.close()
        a.sendall(b"from child;")
        a.close()
        os._exit(0)
    os.waitpid(pid, 0)
    a.sendall(b"from parent")
    a.close()
    say("fork: client reads", recv_exactly(c, 22), "then", c.recv(10))
    c.close()


def case_exit_without_close():
    c, a = pair()
    pid = os.fork()
    if pid == 0:
        c.close()
        a.sendall(b"bye")
        os._exit(0)  # no close(): the kernel closes the socket
    a.close()
    os.waitpid(pid, 0)
    say("exit without close: client reads", recv_exactly(c, 3), "then", c.recv(10))
    c.close()


def case_shut_wr_then_exit_with_bytes_unread():
    """The far end sends, shuts its writes down, takes nothing of what
    this end sends it, and its process exits without close(): the
    kernel's close of a socket with bytes unread is a reset, which this
    end (its reads at their end already) sees in its events and calls."""
    c, a = pair()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        c.close()
        os.close(w)
        a.sendall(b"bye")
        a.shutdown(socket.SHUT_WR)
        os.read(r, 1)
        os._exit(0)  # no close(): the kernel closes the socket
    os.close(r)
    a.close()
    say("shut_wr then exit: client reads", recv_exactly(c, 3), "then", c.recv(10))
    c.sendall(b"unread")
    os.write(w, b"x")
    os.close(w)
    os.waitpid(pid, 0)
    ep = select.epoll()
    ep.register(c.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP)
    # Looked at until the reset is there (5 s at most): where an engine
    # carries it, it comes after devd found the process gone, as over a
    # network; the kernel's loopback delivers it within the exit.
    deadline = time.monotonic() + 5
    seen = events(ep, 0.1)
    while "ERR" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
        seen = events(ep, 0.1)
    say("shut_wr then exit: events", seen)
    ep.close()
    say("shut_wr then exit: recv", attempt(lambda: c.recv(10)),
        "send", attempt(lambda: c.send(b"more")),
        "send again", attempt(lambda: c.send(b"more")),
        "recv", attempt(lambda: c.recv(10)))
    c.close()


def case_peer_killed():
    import signal
    c, a = pair()
    pid = os.fork()
    if pid == 0:
        c.close()
        a.sendall(b"last words")
        time.sleep(60)
        os._exit(0)
    a.close()
    say("killed peer: client reads", recv_exactly(c, 10))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    say("killed peer: then", c.recv(10))
    c.close()


def case_peers_killed_seen_by_zero_timeouts():
    """Eight connections; the process holding the far end of two of them
    is SIGKILLed; then poll, epoll and select, each with a zero timeout
    (no sleep that would watch the sockets), say which peers are gone and
    that the other six are quiet."""
    import signal
    pairs = [pair() for _ in range(8)]
    gone = (3, 5)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        for i, (c, a) in enumerate(pairs):
            c.close()
            if i not in gone:
                a.close()
        os.write(w, b"k")
        time.sleep(60)
        os._exit(0)
    os.close(w)
    for i in gone:
        pairs[i][1].close()
    os.read(r, 1)
    os.close(r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    # (Time for what the dead ends sent to arrive where an engine carries
    # it: the kernel's loopback delivers within the kill.)
    time.sleep(0.2)
    cs = [c for c, _ in pairs]
    # Kernel fds among them: a pipe with a byte in it and a quiet one.
    full_r, full_w = os.pipe()
    os.write(full_w, b"p")
    quiet_r, quiet_w = os.pipe()
    fds = [cs[0], full_r] + cs[1:5] + [quiet_r] + cs[5:]
    name = {c.fileno(): i for i, c in enumerate(cs)}
    name.update({full_r: "pipe with a byte", quiet_r: "quiet pipe"})
    p = select.poll()
    for c in fds:
        p.register(c, select.POLLIN | select.POLLRDHUP)
    say("killed peers: poll(0)", sorted((str(name[fd]), ev) for fd, ev in p.poll(0)))
    ep = select.epoll()
    for c in fds:
        ep.register(c, select.EPOLLIN | select.EPOLLRDHUP)
    say("killed peers: epoll(0)", sorted((str(name[fd]), ev) for fd, ev in ep.poll(0)))
    rd, _, _ = select.select(fds, [], [], 0)
    fileno = lambda x: x if isinstance(x, int) else x.fileno()
    say("killed peers: select(0)", sorted(str(name[fileno(c)]) for c in rd))
    say("killed peers: recv", [cs[i].recv(10) for i in gone])
    ep.close()
    for fd in (full_r, full_w, quiet_r, quiet_w):
        os.close(fd)
    for i, (c, a) in enumerate(pairs):
        c.close()
        if i not in gone:
            a.close()


def case_peers_killed_wake_an_epoll_sleeper():
    """Eight connections in one epoll set, watched by a wait that sleeps;
    the process holding the far end of two of them sends a byte on one,
    then is SIGKILLed: the first wait wakes for the byte, the second for
    the dead peers, each well before its timeout (a sleep that did not
    watch the members' kernel sockets would sleep it out)."""
    import signal
    pairs = [pair() for _ in range(8)]
    gone = (3, 5)
    pid = os.fork()
    if pid == 0:
        for i, (c, a) in enumerate(pairs):
            c.close()
            if i not in gone:
                a.close()
        time.sleep(0.3)
        pairs[3][1].sendall(b"x")
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    for i in gone:
        pairs[i][1].close()
    cs = [c for c, _ in pairs]
    name = {c.fileno(): i for i, c in enumerate(cs)}
    ep = select.epoll()
    for c in cs:
        ep.register(c, select.EPOLLIN | select.EPOLLRDHUP)
    t = time.time()
    got = sorted((name[fd], ev) for fd, ev in ep.poll(5))
    say("sleeper: first wake", got, "soon:", time.time() - t < 3)
    say("sleeper: reads", cs[3].recv(1))
    t = time.time()
    woke = ep.poll(5)
    say("sleeper: second wake has a dead peer:", any(name[fd] in gone for fd, _ in woke),
        "soon:", time.time() - t < 3)
    os.waitpid(pid, 0)
    # (Time for the ends' closes to arrive where an engine carries them:
    # devd learns that an end left to a process that died is gone by
    # looking its socket up at intervals, the 750 ms look here.)
    time.sleep(1.5)
    say("sleeper: then", sorted((name[fd], ev) for fd, ev in ep.poll(0)))
    say("sleeper: recv", [cs[i].recv(10) for i in gone])
    ep.close()
    for i, (c, a) in enumerate(pairs):
        c.close()
        if i not in gone:
            a.close()


def case_epoll_pipe_beside_a_connection():
    """A pipe and a connection in one epoll set. After waits the
    connection's bytes answered (a wait then asks the kernel's instance
    before it sleeps only if it had events lately), a byte on the pipe is
    reported, whether it was there before the wait or written while the
    wait sleeps; a byte on each is reported once each, in one wait or the
    next."""
    c, a = pair()
    r, w = os.pipe()
    name = {a.fileno(): "conn", r: "pipe"}

    def wait(t):
        got = sorted((name[fd], ev_names(ev)) for fd, ev in ep.poll(t))
        return got or "none"

    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    ep.register(r, select.EPOLLIN)
    for i in range(6):
        c.sendall(b"m%d" % i)
        say("pipe beside: bytes answer", wait(5))
        a.recv(10)
    say("pipe beside: nothing", wait(0.05))
    os.write(w, b"p")
    say("pipe beside: pipe before the wait", wait(5))
    os.read(r, 1)
    say("pipe beside: nothing again", wait(0.05))
    timer = threading.Timer(0.1, lambda: os.write(w, b"q"))
    timer.start()
    t = time.time()
    say("pipe beside: pipe during the sleep", wait(5), "soon:", time.time() - t < 3)
    timer.join()
    os.read(r, 1)
    os.write(w, b"z")
    c.sendall(b"y")
    time.sleep(0.1)
    seen = []
    for _ in range(3):
        got = wait(0.2)
        if got == "none":
            break
        for who, _ in got:
            seen.append(who)
            if who == "pipe":
                os.read(r, 1)
            else:
                a.recv(10)
    say("pipe beside: both, once each:", sorted(seen))
    # Both left ready, the waits asking for one event at a time: each is
    # reported within a few waits (the kernel takes turns), with a
    # timeout and with none.
    os.write(w, b"z")
    c.sendall(b"y")
    time.sleep(0.1)
    for t in (5, 0):
        got = [name[fd] for _ in range(8) for fd, _ in ep.poll(t, 1)]
        say("pipe beside: one at a time, timeout", t, "both seen:", sorted(set(got)))
    # Only the connection ready, two places per answer: never named twice.
    os.read(r, 1)
    for t in (5, 0):
        answers = [[fd for fd, _ in ep.poll(t, 2)] for _ in range(8)]
        say("pipe beside: two places, timeout", t, "answers:", sorted(set(len(a) for a in answers)),
            "each once:", all(len(a) == len(set(a)) for a in answers))
    ep.close()
    os.close(r)
    os.close(w)
    c.close()
    a.close()


def case_epoll_many_idle_members():
    """Forty connections in one epoll set, one of them busy: after many
    waits the idle ones have had nothing to report for long (ssock then
    stops looking at them until a peer rings). Each is still reported
    when its peer sends, closes, or when a write is asked for (MOD), a
    blocking recv on one from another thread still wakes, one removed
    (DEL) is not reported, and a forked child's waits see them too."""
    pairs = [pair() for _ in range(40)]
    cs = [c for c, _ in pairs]
    names = {a.fileno(): i for i, (_, a) in enumerate(pairs)}
    ep = select.epoll()
    for _, a in pairs:
        ep.register(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def wait(t=5):
        return sorted((names[fd], ev_names(ev)) for fd, ev in ep.poll(t)) or "none"

    def busy(n):
        for _ in range(n):
            cs[0].sendall(b"b")
            got = wait()
            pairs[0][1].recv(10)
            if got != [(0, "IN")]:
                return got
        return "ok"

    busy(70)
    time.sleep(0.25)
    say("many idle: busy", busy(150))
    cs[7].sendall(b"seven")
    t = time.time()
    say("many idle: one wakes", wait(), "soon:", time.time() - t < 0.5)
    say("many idle: reads", pairs[7][1].recv(10))
    say("many idle: busy again", busy(150))
    cs[11].close()
    t = time.time()
    say("many idle: a peer closes", wait(), "soon:", time.time() - t < 0.5)
    ep.unregister(pairs[11][1].fileno())
    say("many idle: busy again", busy(150))
    got = []
    reader = threading.Thread(target=lambda: got.append((pairs[9][1].recv(10), time.time())))
    reader.start()
    time.sleep(0.1)
    t = time.time()
    cs[9].sendall(b"nine")
    reader.join(5)
    say("many idle: a blocking recv wakes", got[0][0] if got else None,
        "soon:", bool(got) and got[0][1] - t < 0.5)
    say("many idle: then", wait(0.1))
    say("many idle: busy again", busy(150))
    ep.modify(pairs[13][1].fileno(), select.EPOLLIN | select.EPOLLOUT)
    say("many idle: asked to write", wait())
    ep.modify(pairs[13][1].fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    say("many idle: busy again", busy(150))
    ep.unregister(pairs[15][1].fileno())
    cs[15].sendall(b"x")
    say("many idle: removed one sends", wait(0.2))
    say("many idle: busy again", busy(150))
    pid = os.fork()
    if pid == 0:
        cs[17].sendall(b"child")
        r = wait()
        os._exit(0 if r == [(17, "IN")] else 1)
    _, st = os.waitpid(pid, 0)
    say("many idle: a forked child sees one", os.WEXITSTATUS(st) == 0)
    say("many idle: the parent too", wait(), pairs[17][1].recv(10))
    ep.close()
    for c, a in pairs:
        c.close()
        a.close()


def case_epoll_idle_members_of_another_process():
    """Forty connections in one epoll set, their peers in another process,
    all idle for many waits (ssock then waits for them on one doorbell of
    the set's alone): a wait sleeps without using the CPU, and each peer's
    send or close is reported as soon as it comes."""
    global CONNS
    ls = listener()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        cs = [socket.create_connection(ls.getsockname()[:2]) for _ in range(40)]
        for c in cs:
            c.sendall(b"hi")
        for line in os.fdopen(r):
            cmd, i = line.split()
            if cmd == "greet":
                for c in cs:
                    c.sendall(b"ho")
            elif cmd == "send":
                cs[int(i)].sendall(b"x" * 3)
            elif cmd == "close":
                cs[int(i)].close()
        os._exit(0)
    os.close(r)
    ends = [ls.accept()[0] for _ in range(40)]
    CONNS += 40
    ls.close()
    # Two requests on each, one after the other (the second one's bytes
    # come as the connection's later ones do).
    say("idle of another: greeted", all(recv_exactly(a, 2) == b"hi" for a in ends))
    tell_first = lambda *words: os.write(w, (" ".join(str(x) for x in words) + "\n").encode())
    tell_first("greet", 0)
    say("idle of another: again", all(recv_exactly(a, 2) == b"ho" for a in ends))
    names = {a.fileno(): i for i, a in enumerate(ends)}
    ep = select.epoll()
    for a in ends:
        ep.register(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def tell(*words):
        os.write(w, (" ".join(str(x) for x in words) + "\n").encode())

    def wait(t=5):
        return sorted((names[fd], ev_names(ev)) for fd, ev in ep.poll(t)) or "none"

    def later(*words):
        # Told once the wait below is asleep.
        threading.Timer(0.3, tell, words).start()

    def idle_long():
        # Many looks and longer than ssock's 200 ms without news.
        for _ in range(100):
            ep.poll(0)
        time.sleep(0.25)
        for _ in range(100):
            ep.poll(0)

    idle_long()
    say("idle of another: nothing", wait(0.05))
    for what, i in (("send", 5), ("close", 9), ("send", 30)):
        later(what, i)
        t, cpu = time.time(), time.process_time()
        got = wait()
        say(f"idle of another: {what}", got, "soon:", time.time() - t < 0.8,
            "idle:", time.process_time() - cpu < 0.1)
        if what == "send":
            say("idle of another: reads", ends[i].recv(10))
        else:
            ep.unregister(ends[i].fileno())
        idle_long()
    os.close(w)
    os.waitpid(pid, 0)
    # The peers closed with the child's exit: every one reported.
    t = time.time()
    seen = set()
    while len(seen) < 39 and time.time() - t < 5:
        seen |= {names[fd] for fd, _ in ep.poll(1)}
    say("idle of another: all closed", len(seen))
    ep.close()
    for a in ends:
        a.close()


def case_exec():
    c, a = pair()
    child = subprocess.Popen([sys.executable, __file__, "exec-child", str(a.fileno())],
                             pass_fds=[a.fileno()])
    a.close()
    talk_to_child(c, "exec", 9)
    say("exec: child status", child.wait())
    c.close()


def case_exec_two_fds():
    """inetd style: the new program gets the socket on two fds, closes one
    and goes on with the other."""
    c, a = pair()
    d = os.dup(a.fileno())
    child = subprocess.Popen([sys.executable, __file__, "exec-two", str(a.fileno()), str(d)],
                             pass_fds=[a.fileno(), d])
    a.close()
    os.close(d)
    talk_to_child(c, "exec two fds", 9)
    say("exec two fds: child status", child.wait())
    c.close()


def case_posix_spawn():
    c, a = pair()
    a.set_inheritable(True)
    pid = os.posix_spawn(sys.executable, [sys.executable, __file__, "exec-child",
                                          str(a.fileno())], os.environ)
    a.close()
    talk_to_child(c, "posix_spawn", 9)
    say("posix_spawn: child status", os.waitpid(pid, 0)[1])
    c.close()


def talk_to_child(c, label, n):
    """The parent's side of a child's exchange: its n-byte greeting, then
    ping and pong, then the end of the stream."""
    say(f"{label}: client reads", recv_exactly(c, n))
    c.sendall(b"ping")
    say(f"{label}: reply", recv_exactly(c, 4), "then", c.recv(10))


def child_side(s, greeting):
    """The child's side: a greeting, pong for ping, close."""
    s.sendall(greeting)
    if recv_exactly(s, 4) == b"ping":
        s.sendall(b"pong")
    s.close()


def exec_child(fd):
    child_side(socket.socket(fileno=fd), b"from exec")


def case_fd_passing():
    c, a = pair()
    left, right = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        c.close()
        a.close()
        left.close()
        _, fds, _, _ = socket.recv_fds(right, 10, 1)
        child_side(socket.socket(fileno=fds[0]), b"passed")
        os._exit(0)
    right.close()
    socket.send_fds(left, [b"x"], [a.fileno()])
    a.close()
    left.close()
    talk_to_child(c, "fd passing", 6)
    os.waitpid(pid, 0)
    c.close()


def case_passed_by_a_process_that_exits():
    """The connecting process passes its socket on and exits before the
    receiver takes it: the end lives on in the receiver."""
    left, right = socket.socketpair()
    receiver = os.fork()
    if receiver == 0:
        left.close()
        time.sleep(0.3)  # the sender has exited by now
        _, fds, _, _ = socket.recv_fds(right, 10, 1)
        child_side(socket.socket(fileno=fds[0]), b"passed on")
        os._exit(0)
    right.close()
    ls = listener()
    accepted_r, accepted_w = os.pipe()
    sender = os.fork()
    if sender == 0:
        os.close(accepted_w)
        s = socket.create_connection(ls.getsockname())
        os.read(accepted_r, 1)  # the connection is accepted: a pair
        socket.send_fds(left, [b"x"], [s.fileno()])
        s.close()
        os._exit(0)
    os.close(accepted_r)
    left.close()
    c, _ = ls.accept()
    ls.close()
    os.write(accepted_w, b"a")
    os.close(accepted_w)
    global CONNS
    CONNS += 1
    os.waitpid(sender, 0)
    talk_to_child(c, "passed by a process that exits", 9)
    os.waitpid(receiver, 0)
    c.close()


def case_one_process_reads_another_writes():
    """A forked child writes much on the shared end while its parent
    waits in recv on it; a thread reads it all, then answers."""
    c, a = pair()
    n = 8 << 20
    pid = os.fork()
    if pid == 0:
        c.close()
        a.sendall(b"w" * n)
        os._exit(0)
    got = []

    def drain():
        left = n
        while left:
            k = c.recv(min(left, 1 << 20))
            if not k or k.strip(b"w"):
                break
            left -= len(k)
        got.append(n - left)
        c.sendall(b"done")

    t = threading.Thread(target=drain)
    t.start()
    answer = recv_exactly(a, 4)
    t.join()
    os.waitpid(pid, 0)
    say("one reads, another writes:", got, answer)
    a.close()
    c.close()


def case_ipv6():
    c, a = pair(socket.AF_INET6, "::1")
    c.sendall(b"six")
    say("ipv6:", recv_exactly(a, 3), a.family == socket.AF_INET6)
    c.close()
    a.close()


def case_sendfile():
    c, a = pair()
    data = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        got = []

        def reader():
            got.append(recv_exactly(a, len(data)))

        t = threading.Thread(target=reader)
        t.start()
        off = 0
        while off < len(data):
            off += os.sendfile(c.fileno(), f.fileno(), off, len(data) - off)
        t.join()
    say("sendfile: bytes", len(got[0]), "same:", got[0] == data)
    c.close()
    a.close()


def case_reset():
    c, a = pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()
    try:
        say("reset: recv returned", c.recv(10))
    except OSError as e:
        say("reset:", err_name(e))
    c.close()


def case_close_with_unread_bytes():
    """A close that leaves received bytes unread resets the connection."""
    c, a = pair()
    c.sendall(b"never read")
    select.select([a], [], [], 5)
    a.close()
    try:
        say("close with unread bytes: peer reads", c.recv(10))
    except OSError as e:
        say("close with unread bytes: peer reads", errno.errorcode[e.errno])
    c.close()


def answered_then_reset(response=b"response"):
    """A client's request, which its server answers and then closes with
    the request's rest unread (a reset); the client's socket, once the
    answer and the reset are there."""
    c, a = pair()
    c.sendall(b"request and a body the server never reads")
    select.select([a], [], [], 5)
    a.recv(7)
    a.sendall(response)
    a.close()
    if not REMOTE:
        select.select([c], [], [], 5)
    time.sleep(0.1)
    return c


def case_response_then_close_with_unread_bytes():
    """A server answers and closes with the request's rest unread: its
    close resets the connection, and the client still reads the answer
    first (Linux keeps what it received before a reset), then the reset
    once, then the end."""
    c = answered_then_reset()
    for i in range(3):
        say("client reads", attempt(lambda: c.recv(100)))
    c.close()


def case_send_after_a_reset_then_read():
    """A send after the peer's reset gets the reset; the bytes received
    before it are still read, then the end (Linux keeps its receive queue
    after an RST); a send after that gets EPIPE."""
    c = answered_then_reset()
    for op in ("send", "recv", "recv", "send", "recv"):
        say(op, attempt(lambda: c.send(b"x") if op == "send" else c.recv(100)))
    c.close()
    # An answer of 40 KB: more than a small Queued region's RX buffers
    # hold (the rest still in devd's engine when the reset comes), fewer
    # than the kernel's receive window takes at once.
    answer = bytes(range(256)) * 160
    c = answered_then_reset(answer)
    first = attempt(lambda: c.send(b"x"))
    got = recv_exactly(c, len(answer))
    say("40 KB answer: send", first, "then every byte:", got == answer,
        "then", attempt(lambda: c.recv(100)), attempt(lambda: c.send(b"x")))
    c.close()


def case_error_queue_and_sendfile_from_a_pipe():
    """recvmsg(MSG_ERRQUEUE) reads the socket's error queue (empty here:
    EAGAIN), never the stream's bytes; sendfile from a pipe or a socket
    says EINVAL, as this kernel's, and takes nothing from the pipe."""
    c, a = pair()
    a.sendall(b"hello")
    time.sleep(0.05)
    say("error queue:",
        attempt(lambda: c.recvmsg(100, 1024, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)),
        "then", attempt(lambda: c.recv(100)))
    r, w = os.pipe()
    os.write(w, b"p" * 1000)
    say("sendfile from a pipe:", attempt(lambda: os.sendfile(a.fileno(), r, None, 1000)),
        "the pipe keeps", len(os.read(r, 2000)))
    say("sendfile from a socket:", attempt(lambda: os.sendfile(a.fileno(), c.fileno(), None, 10)))
    a.sendall(b"after")
    say("then", attempt(lambda: c.recv(100)))
    for f in (r, w):
        os.close(f)
    c.close()
    a.close()


def case_send_after_the_peer_closed():
    """A peer that closed its socket, nothing of ours unread: the kernel's
    first send goes (the peer answers it with an RST; a Direct end knows
    at once and says EPIPE), the next ones take EPIPE; a large sendall
    stops with EPIPE too."""
    c, a = pair()
    a.close()
    time.sleep(0.2)
    sent = []
    for _ in range(3):
        sent.append(attempt(lambda: c.send(b"x")))
        time.sleep(0.1)
    say("sends after the peer closed: first sent or EPIPE:", sent[0] in (1, "EPIPE"),
        "then", sent[1:], "and reads", attempt(lambda: c.recv(10)))
    c.close()
    c, a = pair()
    a.close()
    time.sleep(0.2)
    say("1 MB sendall after the peer closed:", attempt(lambda: c.sendall(b"z" * (1 << 20))),
        "then", attempt(lambda: c.send(b"x")))
    c.close()


def case_reset_read_by_an_event_loop():
    """A 40 KB answer, then a reset, read by a nonblocking epoll loop
    (level- and edge-triggered) after a send took the reset's error:
    every byte, then the end."""
    answer = bytes(range(256)) * 160
    for et in (False, True):
        c = answered_then_reset(answer)
        first = attempt(lambda: c.send(b"x"))
        c.setblocking(False)
        ep = select.epoll()
        ep.register(c.fileno(), select.EPOLLIN | (select.EPOLLET if et else 0))
        got, end = b"", None
        while end is None:
            if not ep.poll(5):
                end = "no event in 5 s"
                break
            while end is None:
                try:
                    k = c.recv(65536)
                except BlockingIOError:
                    break
                except OSError as e:
                    end = err_name(e)
                    break
                if not k:
                    end = "the end"
                got += k
        say("edge" if et else "level", "loop: send", first, "every byte:", got == answer,
            "then", end)
        ep.close()
        c.close()


def case_shutdown_once_the_connection_is_over():
    """shutdown(2) on a connection that is over (reset, or shut down both
    ways) says ENOTCONN, as the kernel's TCP_CLOSE; the reset's bytes and
    error are still read after it."""
    c, a = pair()
    a.send(b"x")
    time.sleep(0.05)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()
    time.sleep(0.1)
    say("after a reset:", attempt(lambda: c.shutdown(socket.SHUT_WR)),
        attempt(lambda: c.recv(10)), attempt(lambda: c.recv(10)),
        attempt(lambda: c.shutdown(socket.SHUT_RDWR)))
    c.close()
    c, a = pair()
    c.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    a.close()
    time.sleep(0.1)
    say("shut both ways:", attempt(lambda: c.shutdown(socket.SHUT_RD)),
        attempt(lambda: c.recv(10)))
    c.close()
    c, a = pair()
    a.close()
    time.sleep(0.1)
    say("peer closed:", attempt(lambda: c.shutdown(socket.SHUT_WR)),
        attempt(lambda: c.shutdown(socket.SHUT_WR)))
    c.close()


def case_peer_name_once_the_connection_is_over():
    """getpeername(2) says ENOTCONN once the connection is over (shut down
    both ways, bytes unread or not, or reset), as the kernel's socket in
    TCP_CLOSE; with a direction still open, the peer's address."""
    def peer(s):
        return attempt(lambda: "connected" if s.getpeername() else "none")
    c, a = pair()
    c.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    say("one way shut:", peer(c), peer(a))
    a.sendall(b"unread")
    a.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    say("both ways, bytes unread:", peer(c), peer(a))
    say("then read:", attempt(lambda: c.recv(10)), attempt(lambda: c.recv(10)), peer(c))
    c.close()
    a.close()
    c, a = pair()
    a.close()
    time.sleep(0.1)
    say("peer closed:", peer(c))
    c.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    say("then this end shut:", peer(c))
    c.close()
    c, a = pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()
    time.sleep(0.1)
    say("reset:", peer(c), attempt(lambda: c.recv(10)), peer(c))
    c.close()


def case_shut_rd_by_a_forked_child():
    """shutdown(SHUT_RD) is the socket's, not the process's: a forked
    child's ends the parent's blocking receive (0) and reaches its
    edge-triggered epoll once; bytes that come later are still read.
    ("woken": within half a second of the child's shutdown, which its
    sleep's bound of a second would not be.)"""
    c, a = pair()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        time.sleep(0.3)
        c.shutdown(socket.SHUT_RD)
        os.write(w, struct.pack("d", time.monotonic()))
        os._exit(0)
    c.settimeout(5)
    got = c.recv(10)
    woke = time.monotonic()
    shut = struct.unpack("d", os.read(r, 8))[0]
    os.close(r)
    os.close(w)
    say("parent's blocking recv:", got, "woken" if woke - shut < 0.5 else "only later")
    os.waitpid(pid, 0)
    a.send(b"later")
    time.sleep(0.05)
    say("then:", c.recv(10), c.recv(10))
    c.close()
    a.close()
    c, a = pair()
    ep = select.epoll()
    ep.register(c.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
    say("epoll before:", ep.poll(0))
    pid = os.fork()
    if pid == 0:
        time.sleep(0.3)
        c.shutdown(socket.SHUT_RD)
        os._exit(0)
    t = time.time()
    got = ep.poll(5)
    say("epoll after the child's SHUT_RD:", [ev_names(e) for _, e in got],
        "woken" if time.time() - t < 2 else "only at the timeout")
    os.waitpid(pid, 0)
    say("epoll again:", ep.poll(0))
    ep.close()
    c.close()
    a.close()


def case_reset_after_the_end_of_stream():
    """A peer that shut its writes down, then closed abortively: Linux's
    error for an RST after the FIN is EPIPE (SO_ERROR or a send takes
    it, once), whether the bytes sent before the FIN were read yet or
    not; reads see those bytes, then the end, never the error."""
    def soerr(s):
        e = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return errno.errorcode.get(e, e)
    def abort(s):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    c, a = pair()
    a.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    abort(a)
    time.sleep(0.1)
    say("SO_ERROR first:", soerr(c), attempt(lambda: c.recv(10)), attempt(lambda: c.recv(10)),
        attempt(lambda: c.send(b"y")), soerr(c))
    c.close()
    def ended_then_aborted(words):
        # The peer's end of stream after `words`, then its abortive close.
        c, a = pair()
        a.sendall(words)
        a.shutdown(socket.SHUT_WR)
        time.sleep(0.05)
        abort(a)
        time.sleep(0.1)
        return c
    c = ended_then_aborted(b"last words")
    say("reads first:", attempt(lambda: c.recv(100)), attempt(lambda: c.recv(10)),
        attempt(lambda: c.send(b"y")), soerr(c), attempt(lambda: c.send(b"y")))
    c.close()
    # A send while the bytes sent before the FIN still wait unread.
    c = ended_then_aborted(b"last words")
    say("sends first:", attempt(lambda: c.send(b"y")), attempt(lambda: c.send(b"y")),
        soerr(c), attempt(lambda: c.recv(100)), attempt(lambda: c.recv(10)))
    c.close()
    # The same with more bytes waiting than a reader's buffers hold
    # (Queued: the rest still in the engine's backend when the reset
    # comes); fewer than the kernel's receive window takes at once.
    words = bytes(range(256)) * 160
    c = ended_then_aborted(words)
    first = attempt(lambda: c.send(b"y"))
    got = recv_exactly(c, len(words))
    say("sends first, 40 KB wait:", first, got == words, attempt(lambda: c.recv(10)), soerr(c),
        attempt(lambda: c.send(b"y")))
    c.close()


def case_reset_so_error():
    c, a = pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()
    time.sleep(0.05)
    e = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    say("reset SO_ERROR:", errno.errorcode.get(e, e),
        "again:", c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    say("then recv:", c.recv(10))
    try:
        c.send(b"x")
        say("then send: sent")
    except OSError as e:
        say("then send:", err_name(e))
    c.close()


def case_urgent():
    c, a = pair()
    c.send(b"ab", socket.MSG_OOB)
    _, _, x = select.select([], [], [a], 5)
    say("urgent: exceptional", bool(x))
    say("urgent: oob byte", a.recv(1, socket.MSG_OOB))
    say("urgent: normal data", recv_exactly(a, 1))
    c.sendall(b"after")
    say("urgent: then", recv_exactly(a, 5))
    c.close()
    a.close()


def case_sends_of_nothing_and_a_read_of_all_there():
    """A send of no bytes says what the socket would (0, also once the
    peer closed, which it does not provoke to a reset; EPIPE once its own
    writes are shut down), with send(2) and write(2); a read takes all
    the bytes there, up to its length, however many sends brought them
    (a Queued end used to give one buffer's worth per read)."""
    import array
    import fcntl
    import termios
    c, a = pair()
    say("send of nothing:", attempt(lambda: c.send(b"")), attempt(lambda: os.write(c.fileno(), b"")))
    a.sendall(b"abc")
    time.sleep(0.02)
    a.sendall(b"de")
    n = array.array("i", [0])
    deadline = time.monotonic() + 5
    while n[0] < 5 and time.monotonic() < deadline:
        select.select([c], [], [], 1)
        fcntl.ioctl(c.fileno(), termios.FIONREAD, n, True)
    say("one read of both sends:", c.recv(10))
    a.close()
    select.select([c], [], [], 5)
    say("the peer closed:", c.recv(10), "a send of nothing:", attempt(lambda: c.send(b"")),
        attempt(lambda: os.write(c.fileno(), b"")))
    c.shutdown(socket.SHUT_WR)
    say("send of nothing after SHUT_WR:", attempt(lambda: c.send(b"")),
        attempt(lambda: os.write(c.fileno(), b"")))
    c.close()


def case_vector_limits_and_recvmmsg_at_the_end():
    """readv and writev of more iovecs than the kernel takes (1024) fail
    with EINVAL, and a message with more with EMSGSIZE, moving nothing
    (through ctypes, as a C program calls them); at the end of the stream
    recvmmsg gives every message its 0 (the shim's stopped at the first)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    class Iovec(ctypes.Structure):
        _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]

    class Msghdr(ctypes.Structure):
        _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                    ("msg_iov", ctypes.POINTER(Iovec)), ("msg_iovlen", ctypes.c_size_t),
                    ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                    ("msg_flags", ctypes.c_int)]

    class Mmsghdr(ctypes.Structure):
        _fields_ = [("msg_hdr", Msghdr), ("msg_len", ctypes.c_uint)]

    def call(name, *args):
        ctypes.set_errno(0)
        r = getattr(libc, name)(*args)
        return r if r >= 0 else errno.errorcode.get(ctypes.get_errno())

    c, a = pair()
    data = ctypes.create_string_buffer(b"v" * 1100)
    iov = (Iovec * 1100)(*[Iovec(ctypes.addressof(data) + i, 1) for i in range(1100)])
    say("writev of 1025 iovecs:", call("writev", c.fileno(), iov, 1025),
        "of 1024:", call("writev", c.fileno(), iov, 1024))
    m = Msghdr(None, 0, iov, 1025, None, 0, 0)
    say("sendmsg of 1025:", call("sendmsg", c.fileno(), ctypes.byref(m), 0))
    say("read:", len(recv_exactly(a, 1024)))
    say("readv of 1025:", call("readv", a.fileno(), iov, 1025),
        "recvmsg of 1025:", call("recvmsg", a.fileno(), ctypes.byref(m), 0))
    c.close()
    select.select([a], [], [], 5)
    bufs = [ctypes.create_string_buffer(8) for _ in range(3)]
    msgs = (Mmsghdr * 3)()
    small = (Iovec * 3)(*[Iovec(ctypes.addressof(b), 8) for b in bufs])
    for k in range(3):
        msgs[k].msg_hdr.msg_iov = ctypes.pointer(small[k])
        msgs[k].msg_hdr.msg_iovlen = 1
        msgs[k].msg_len = 99
    say("recvmmsg at the end:", call("recvmmsg", a.fileno(), msgs, 3, 0, None),
        [msgs[k].msg_len for k in range(3)])
    a.close()
    # A reset behind the bytes: recvmmsg reports the socket's pending error
    # before any message (the kernel's sock_error), the bytes come after.
    c, a = pair()
    c.sendall(b"abc")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    select.select([a], [], [], 5)
    time.sleep(0.2)  # the reset, behind the bytes, across an engine too
    for k in range(3):
        msgs[k].msg_len = 99
    say("recvmmsg with a reset behind the bytes:",
        call("recvmmsg", a.fileno(), msgs, 3, 0, None), [msgs[k].msg_len for k in range(3)])
    say("then recv:", attempt(lambda: a.recv(10)), "and:", attempt(lambda: a.recv(10)))
    a.close()
    # A reset met by a later buffer of one read: the bytes before it, the
    # error kept as the socket's (the kernel's sk_err): POLLERR, SO_ERROR
    # takes it once, then the end.
    c, a = pair()
    c.sendall(b"abc")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    select.select([a], [], [], 5)
    time.sleep(0.2)
    first, second = bytearray(3), bytearray(10)
    say("recvmsg_into 3 + 10 before a reset:",
        attempt(lambda: a.recvmsg_into([first, second])[0]), bytes(first))
    p = select.poll()
    p.register(a, select.POLLIN)
    err = lambda: bool(p.poll(0) and p.poll(0)[0][1] & select.POLLERR)
    say("POLLERR:", err(), "SO_ERROR:",
        errno.errorcode.get(a.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "0"),
        "POLLERR after:", err(), "SO_ERROR again:",
        a.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    say("then recv:", attempt(lambda: a.recv(10)))
    a.close()
    # A later message's error (too many iovecs) after a first message:
    # recvmmsg returns 1 and the error is the socket's (sk_err): POLLERR
    # and SO_ERROR's, once.
    c, a = pair()
    c.sendall(b"abcdef")
    select.select([a], [], [], 5)
    time.sleep(0.05)
    for k in range(3):
        msgs[k].msg_len = 99
    msgs[1].msg_hdr.msg_iov = iov
    msgs[1].msg_hdr.msg_iovlen = 1025
    say("recvmmsg, the second message with 1025 iovecs:",
        call("recvmmsg", a.fileno(), msgs, 3, 0, None), msgs[0].msg_len, bufs[0].raw[:6])
    p = select.poll()
    p.register(a, select.POLLIN)
    say("POLLERR:", err(), "SO_ERROR:",
        errno.errorcode.get(a.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "0"),
        "POLLERR after:", err(), "SO_ERROR again:",
        a.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    c.sendall(b"gh")
    select.select([a], [], [], 5)
    say("then recv:", attempt(lambda: a.recv(10)))
    c.close()
    a.close()


def case_fionread():
    import array
    import fcntl
    import termios
    c, a = pair()
    c.sendall(b"12345")
    select.select([a], [], [], 5)
    time.sleep(0.05)
    n = array.array("i", [0])
    fcntl.ioctl(a.fileno(), termios.FIONREAD, n, True)
    say("fionread:", n[0])
    # Bytes its peer has not read are in the peer's receive queue, which
    # acknowledged them: none outstanding (SIOCOUTQ, termios's TIOCOUTQ).
    a.sendall(b"not read yet")
    time.sleep(0.05)
    fcntl.ioctl(a.fileno(), termios.TIOCOUTQ, n, True)
    say("outq once the peer has them:", n[0])
    c.close()
    a.close()


def case_self_connect_before_accept():
    """libevent-style: a nonblocking connect to its own listener, writable
    and bytes sent before the accept; then a second connection."""
    global CONNS
    ls = listener()
    for n in (1, 2):
        s = socket.socket()
        s.setblocking(False)
        say("self connect:", errno.errorcode.get(s.connect_ex(ls.getsockname()), "0"))
        _, w, _ = select.select([], [s], [], 10)
        say("writable before accept:", bool(w),
            "SO_ERROR:", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        s.setblocking(True)
        s.sendall(b"early%d" % n)
        a, _ = ls.accept()
        CONNS += 1
        say("accepted reads:", recv_exactly(a, 6))
        a.sendall(b"reply")
        say("connector reads:", recv_exactly(s, 5))
        s.sendall(b"later")
        say("accepted reads:", recv_exactly(a, 5))
        s.close()
        say("then:", a.recv(10))
        a.close()
    ls.close()


def case_bytes_before_accept():
    """The connector writes 300 KiB before its peer accepts, then more
    after the reply: one stream, in order, whatever carried each part."""
    global CONNS
    ls = listener()
    c = socket.socket()
    c.connect(ls.getsockname())
    first = bytes(range(256)) * 1200
    c.sendall(first)
    a, _ = ls.accept()
    ls.close()
    CONNS += 1
    got = recv_exactly(a, len(first))
    say("before accept:", len(got), got == first)
    a.sendall(b"ok")
    say("reply:", recv_exactly(c, 2))
    second = bytes(reversed(range(256))) * 900
    c.sendall(second)
    c.shutdown(socket.SHUT_WR)
    rest = recv_exactly(a, len(second) + 1)
    say("after the reply:", len(rest), rest == second)
    a.close()
    c.close()


def case_edge_triggered_end_after_a_request_sent_before_accept():
    """A client's request goes out before its server accepts; the server
    reads it, answers or not, and waits with edge-triggered epoll; the
    client leaves without reading any answer (closes, or exits without
    close: with an answer unread, the kernel resets the connection). The
    server's wait reports it at once, as the kernel's: under ssock the
    request came on the kernel socket, and the end's progress counters
    once both directions were in the region read as they did while the
    request waited (nginx kept wrk's connections open for its keep-alive
    timeout)."""
    global CONNS
    for answer in (False, True):
        for how in ("close", "exit"):
            ls = listener()
            go_r, go_w = os.pipe()
            addr = ls.getsockname()
            pid = os.fork()
            if pid == 0:
                ls.close()
                os.close(go_w)
                c = socket.socket()
                c.connect(addr)
                c.sendall(b"GET / HTTP/1.1")
                os.read(go_r, 1)
                # A look at the socket, as an event loop's (its end moves
                # then).
                select.select([c], [], [], 0.05)
                if how == "close":
                    c.close()
                os._exit(0)
            os.close(go_r)
            time.sleep(0.1)
            a, _ = ls.accept()
            ls.close()
            CONNS += 1
            a.setblocking(False)
            ep = select.epoll()
            ep.register(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
            tag = (how, "answered" if answer else "silent")
            say(*tag, "request:", events_soon(ep), recv_exactly(a, 14))
            if answer:
                a.sendall(b"HTTP/1.1 200 OK")
            say(*tag, "nothing more:", attempt(lambda: a.recv(10)), events(ep, 0.1))
            os.write(go_w, b"x")
            os.close(go_w)
            os.waitpid(pid, 0)
            say(*tag, "client gone:", events_soon(ep), attempt(lambda: a.recv(10)))
            ep.close()
            a.close()


def refuse_socket_calls():
    """Installs, in this process for good, a seccomp filter under which
    sendto, recvfrom, sendmsg and recvmsg fail with EPERM (sshd's network
    child allows read and write, not these); x86-64 only (elsewhere it
    refuses nothing). Says whether it is in place."""
    import ctypes
    import struct
    libc = ctypes.CDLL(None, use_errno=True)
    allow, eperm = 0x7FFF0000, 0x00050000 | errno.EPERM
    insns = [(0x20, 0, 0, 4), (0x15, 0, 5, 0xC000003E), (0x20, 0, 0, 0),
             (0x15, 4, 0, 44), (0x15, 3, 0, 45), (0x15, 2, 0, 46), (0x15, 1, 0, 47),
             (0x06, 0, 0, allow), (0x06, 0, 0, eperm)]
    code = b"".join(struct.pack("HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(code, len(code))

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Prog(len(insns), ctypes.addressof(buf))
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return "no_new_privs refused"
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        return "filter refused"
    return "in place"


def read_plainly(s, n):
    """Up to n bytes from nonblocking socket s with read(2), waiting with
    select (5 s at most); an error ends it, named in what it returns."""
    got = b""
    deadline = time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        select.select([s], [], [], 1)
        try:
            got += os.read(s.fileno(), 100)
        except BlockingIOError:
            pass
        except OSError as e:
            got += ("<%s>" % err_name(e)).encode()
            break
    return got


def case_sandboxed_reads_and_writes():
    """A process whose seccomp filter refuses send(2) and recv(2) (sshd's
    network child: read and write only) reads what came before the accept
    and answers with read(2) and write(2) on a nonblocking socket shared
    with its parent, as on the kernel's (under ssock the bytes on the
    kernel socket moved with recvfrom and sendto: sshd's child died of
    SIGSYS, its client saw the connection closed)."""
    global CONNS
    ls = listener()
    c = socket.socket()
    c.connect(ls.getsockname())
    c.sendall(b"hello before accept")
    a, _ = ls.accept()
    ls.close()
    CONNS += 1
    a.setblocking(False)
    pid = os.fork()
    if pid == 0:
        how = refuse_socket_calls()
        got = read_plainly(a, 19)
        try:
            sent = os.write(a.fileno(), b"answer from the sandbox")
        except OSError as e:
            sent = err_name(e)
        say("sandboxed:", how, got, sent)
        os._exit(0)
    os.waitpid(pid, 0)
    say("client reads:", recv_exactly(c, 23))
    a.close()
    c.close()
    # A connector shared before its writes moved (they stay on the kernel
    # socket for good) writes from the sandbox.
    ls = listener()
    c = socket.socket()
    c.connect(ls.getsockname())
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ls.close()
        os.close(go_w)
        how = refuse_socket_calls()
        c.setblocking(False)
        try:
            sent = os.write(c.fileno(), b"from a sandboxed connector")
        except OSError as e:
            sent = err_name(e)
        os.read(go_r, 1)
        got = read_plainly(c, 6)
        say("sandboxed connector:", how, sent, got)
        os._exit(0)
    os.close(go_r)
    a, _ = ls.accept()
    ls.close()
    CONNS += 1
    say("acceptor reads:", recv_exactly(a, 26))
    a.sendall(b"thanks")
    os.write(go_w, b"x")
    os.close(go_w)
    os.waitpid(pid, 0)
    a.close()
    c.close()


def case_nonblocking_connect_to_a_full_queue():
    """The listener's accept queue is full: a nonblocking connect returns
    at once, not yet connected (the kernel retransmits its SYN later)."""
    global CONNS
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    queued = []
    for _ in range(2):
        q = socket.socket()
        q.connect(ls.getsockname())
        queued.append(q)
    s = socket.socket()
    s.setblocking(False)
    say("full queue, nonblocking connect:",
        errno.errorcode.get(s.connect_ex(ls.getsockname()), "0"))
    _, w, _ = select.select([], [s], [], 0)
    say("connected at once:", bool(w))
    accepted = [ls.accept()[0] for _ in range(3)]
    CONNS += 3
    _, w, _ = select.select([], [s], [], 10)
    say("connected later:", bool(w), "SO_ERROR:", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    s.setblocking(True)
    for i, c in enumerate(queued + [s]):
        c.sendall(b"n%d" % i)
    say("accepted read:", sorted(recv_exactly(a, 2) for a in accepted))
    for c in queued + [s] + accepted:
        c.close()
    ls.close()


def case_plain_acceptor_by_exec():
    """The listener was registered by this process; a plain program (no
    preload, an empty environment) got it by exec and accepts: it reads
    exactly what the connector wrote."""
    ls = listener()
    ls.set_inheritable(True)
    child = subprocess.Popen([sys.executable, __file__, "plain-echo", str(ls.fileno())],
                             pass_fds=[ls.fileno()], env={})
    c = socket.socket()
    c.connect(ls.getsockname())
    ls.close()
    ep = select.epoll()
    ep.register(c.fileno(), select.EPOLLIN)
    c.sendall(b"first words")
    say("plain acceptor echoes:", recv_exactly(c, 11))
    c.setblocking(False)
    say("nothing more yet:", attempt(lambda: c.recv(10)))
    c.setblocking(True)
    # Registered before the connection turned out plain (its acceptor
    # holds no end), with no wait since: still a registration to change
    # and remove.
    say("epoll modify, remove:", attempt(lambda: ep.modify(c.fileno(), select.EPOLLIN | select.EPOLLOUT)),
        attempt(lambda: ep.unregister(c.fileno())))
    ep.close()
    c.sendall(b"and more")
    say("plain acceptor echoes:", recv_exactly(c, 8))
    c.shutdown(socket.SHUT_WR)
    say("then:", c.recv(10))
    c.close()
    say("plain acceptor status:", child.wait())


def plain_echo(fd):
    ls = socket.socket(fileno=fd)
    a, _ = ls.accept()
    ls.close()
    first = recv_exactly(a, 11)
    say("plain acceptor reads:", first)
    a.sendall(first)
    while True:
        b = a.recv(65536)
        if not b:
            break
        a.sendall(b)
    a.close()


CASES = [case_peek_and_basics, case_waitall, case_half_close, case_rcvtimeo,
         case_nonblocking_connect, case_refused, case_epoll_edges, case_epoll_local_shutdown,
         case_shut_rd_keeps_receiving, case_epoll_reset_edges,
         case_epoll_waits_sleep,
         case_oneshot_fired_then_peer_closed, case_nested_epoll,
         case_dup2_onto_a_member, case_select_from_c, case_epoll_member_added_by_another_thread, case_threads, case_fork, case_exit_without_close, case_shut_wr_then_exit_with_bytes_unread,
         case_peer_killed, case_peers_killed_seen_by_zero_timeouts, case_peers_killed_wake_an_epoll_sleeper,
         case_epoll_pipe_beside_a_connection, case_epoll_many_idle_members,
         case_epoll_idle_members_of_another_process, case_exec, case_exec_two_fds, case_posix_spawn, case_fd_passing, case_passed_by_a_process_that_exits,
         case_one_process_reads_another_writes, case_ipv6, case_sendfile,
         case_reset, case_reset_so_error, case_close_with_unread_bytes,
         case_response_then_close_with_unread_bytes, case_send_after_a_reset_then_read,
         case_reset_read_by_an_event_loop, case_send_after_the_peer_closed,
         case_error_queue_and_sendfile_from_a_pipe,
         case_shutdown_once_the_connection_is_over, case_shut_rd_by_a_forked_child,
         case_reset_after_the_end_of_stream, case_peer_name_once_the_connection_is_over,
         case_urgent, case_fionread, case_sends_of_nothing_and_a_read_of_all_there,
         case_vector_limits_and_recvmmsg_at_the_end,
         case_self_connect_before_accept, case_bytes_before_accept,
         case_edge_triggered_end_after_a_request_sent_before_accept,
         case_sandboxed_reads_and_writes,
         case_nonblocking_connect_to_a_full_queue, case_plain_acceptor_by_exec]

# Those whose first socket is only sent to, read, shut down, closed or
# asked options of: the agent's end can stand in for it. (Not those that
# need its fd (dup2, select from C, sendfile), connect themselves, use
# IPv6, or expect bytes readable within the send: case_epoll_waits_sleep.)
REMOTE_CASES = [case_peek_and_basics, case_waitall, case_half_close, case_rcvtimeo,
                case_epoll_edges, case_nested_epoll, case_epoll_member_added_by_another_thread,
                case_threads, case_fork, case_exit_without_close, case_peer_killed,
                case_exec, case_exec_two_fds, case_posix_spawn, case_fd_passing,
                case_one_process_reads_another_writes,
                case_reset, case_reset_so_error, case_close_with_unread_bytes,
                case_response_then_close_with_unread_bytes, case_send_after_a_reset_then_read,
                case_send_after_the_peer_closed,
                case_reset_after_the_end_of_stream, case_peer_name_once_the_connection_is_over,
                case_urgent, case_fionread]

if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "agent":
        agent(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    if len(sys.argv) > 3 and sys.argv[1] == "exec-two":
        os.close(int(sys.argv[2]))
        exec_child(int(sys.argv[3]))
        sys.exit(0)
    if len(sys.argv) > 2 and sys.argv[1] == "plain-echo":
        plain_echo(int(sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) > 2 and sys.argv[1] == "exec-child":
        exec_child(int(sys.argv[2]))
        sys.exit(0)
    only = [a for a in sys.argv[1:] if not a.startswith("-")]
    skip = [a[1:] for a in sys.argv[1:] if a.startswith("-")]
    if os.environ.get("SEMANTICS_REMOTE"):
        h, p, ctl = os.environ["SEMANTICS_REMOTE"].split(":", 2)
        REMOTE = (h, int(p), ctl)
        CASES = REMOTE_CASES
    for case in CASES:
        if (only and case.__name__ not in only) or case.__name__ in skip:
            continue
        say(f"== {case.__name__[5:]}")
        t0 = time.monotonic()
        case()
        if os.environ.get("SEMANTICS_TIMES"):
            # (To stderr: the outputs compared stay the same.)
            print(f"{case.__name__}: {time.monotonic() - t0:.2f} s", file=sys.stderr)
    say("connections", CONNS)
