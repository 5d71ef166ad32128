"""Whether ssock parks the idle members of a large epoll set, as the shim
shows it to the kernel: its epoll instance holds, beside the program's
own registrations (which the kernel never sees for accelerated sockets),
the set's control bell (an eventfd), the members' kernel sockets (under
the shim's key) and, once members are parked, the set's doorbell (a unix
datagram socket that is no member's).

Forty connections (their peers in a child process, two requests each),
all in one epoll set; prints "BEFORE n" (doorbell sockets in the kernel
instance after a first wait), then, after two hundred zero-timeout waits
and 0.3 s,
"ASLEEP n" (the same, read by another thread while a wait sleeps), then
"WOKE fd-index events" for a byte the child sends meanwhile, then
"IDLE cpu-seconds" spent by that sleep."""
import os
import select
import socket
import stat
import threading
import time


def doorbells(epfd, members):
    """Registrations of the kernel instance whose file is a socket that is
    none of the members."""
    n = 0
    with open(f"/proc/self/fdinfo/{epfd}") as f:
        for line in f:
            if not line.startswith("tfd:"):
                continue
            tfd = int(line.split()[1])
            if tfd in members:
                continue
            try:
                if stat.S_ISSOCK(os.fstat(tfd).st_mode):
                    n += 1
            except OSError:
                pass
    return n


def main():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
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
                cs[int(i)].sendall(b"x")
        os._exit(0)
    os.close(r)
    ends = [ls.accept()[0] for _ in range(40)]
    for a in ends:
        assert a.recv(2) == b"hi"
    os.write(w, b"greet 0\n")
    for a in ends:
        assert a.recv(2) == b"ho"
    members = {a.fileno(): i for i, a in enumerate(ends)}
    ep = select.epoll()
    for a in ends:
        ep.register(a.fileno(), select.EPOLLIN)
    ep.poll(0.05)
    print("BEFORE", doorbells(ep.fileno(), members), flush=True)
    # Idle for many looks, and for longer than ssock's 20 ms.
    for _ in range(100):
        ep.poll(0)
    time.sleep(0.3)
    for _ in range(100):
        ep.poll(0)
    seen = []

    def look():
        time.sleep(0.3)
        seen.append(doorbells(ep.fileno(), members))
        os.write(w, b"send 7\n")

    t = threading.Thread(target=look)
    t.start()
    cpu = time.process_time()
    got = ep.poll(5)
    cpu = time.process_time() - cpu
    t.join()
    print("ASLEEP", seen[0], flush=True)
    print("WOKE", *[f"{members[fd]} {ev}" for fd, ev in got], flush=True)
    print("IDLE", round(cpu, 3), flush=True)
    os.close(w)
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
