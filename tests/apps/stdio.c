/* A server that serves a connection through the C library's stdio, as
 * inetd-style servers do, and its client (docs/protocol.md section 2.7).
 * stdio's FILE streams read and write their fd through the C library's own
 * internal calls, which no preloaded library sees.
 *
 *   stdio serve MODE   prints "PORT p", accepts one connection, exchanges
 *                      "1", "2", "3" with read and write (the bytes move to
 *                      the region), waits until the client's next line is
 *                      readable (in the ring), then serves two lines
 *                      through stdio, and prints "SERVED OK". MODE: dup2 (a
 *                      forked child with the socket on fds 0 and 1), exec
 *                      (the same child exec'ing this program as "inetd"),
 *                      spawn (posix_spawn of this program as "inetd", the
 *                      socket put on fds 0 and 1 by the spawn's file
 *                      actions, which the C library does itself), fdopen
 *                      (fdopen on the accepted socket).
 *   stdio inetd        serves two lines on stdin and stdout.
 *   stdio client PORT  connects, exchanges "1", "2", "3", sends "hello\n"
 *                      and "bye\n" one after the other answer, expects
 *                      "echo hello\n", "echo bye\n" and the end of the
 *                      stream; prints "CLIENT OK" or what it got.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

/* Two lines from `in`, each answered on `out` with "echo " before it. */
static int serve_lines(FILE *in, FILE *out)
{
    char line[256];
    for (int i = 0; i < 2; i++) {
        if (!fgets(line, sizeof line, in))
            return 1;
        fprintf(out, "echo %s", line);
        if (fflush(out) != 0)
            return 1;
    }
    return 0;
}

static int one(int fd, char want)
{
    char b;
    return read(fd, &b, 1) == 1 && b == want;
}

static int serve(const char *self, const char *mode)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int on = 1;
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t len = sizeof a;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4) ||
        getsockname(ls, (struct sockaddr *)&a, &len))
        return 1;
    printf("PORT %d\n", ntohs(a.sin_port));
    fflush(stdout);
    int c = accept(ls, NULL, NULL);
    if (c < 0 || !one(c, '1') || write(c, "2", 1) != 1 || !one(c, '3'))
        return 1;
    struct pollfd p = {.fd = c, .events = POLLIN};
    if (poll(&p, 1, 10000) != 1)
        return 1;
    int rc;
    if (strcmp(mode, "fdopen") == 0) {
        FILE *in = fdopen(c, "r");
        FILE *out = fdopen(dup(c), "w");
        if (!in || !out)
            return 1;
        rc = serve_lines(in, out);
        fclose(out);
        fclose(in);
    } else if (strcmp(mode, "spawn") == 0) {
        posix_spawn_file_actions_t fa;
        char *argv[] = {(char *)self, "inetd", NULL};
        pid_t pid;
        int st;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_adddup2(&fa, c, 0);
        posix_spawn_file_actions_adddup2(&fa, c, 1);
        posix_spawn_file_actions_addclose(&fa, c);
        posix_spawn_file_actions_addclose(&fa, ls);
        if (posix_spawn(&pid, self, &fa, NULL, argv, environ))
            return 1;
        close(c);
        rc = waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st);
    } else {
        pid_t pid = fork();
        if (pid == 0) {
            dup2(c, 0);
            dup2(c, 1);
            close(c);
            close(ls);
            if (strcmp(mode, "exec") == 0) {
                char *argv[] = {(char *)self, "inetd", NULL};
                execv(self, argv);
                _exit(127);
            }
            _exit(serve_lines(stdin, stdout));
        }
        close(c);
        int st;
        rc = pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st);
    }
    printf(rc ? "SERVED FAILED\n" : "SERVED OK\n");
    return rc;
}

/* Reads a line (up to '\n') into `b`. */
static int line(int fd, char *b, size_t n)
{
    size_t k = 0;
    while (k + 1 < n && read(fd, b + k, 1) == 1)
        if (b[k++] == '\n')
            break;
    b[k] = 0;
    return (int)k;
}

static int client(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    char got[2][64], end;
    if (connect(s, (struct sockaddr *)&a, sizeof a) || write(s, "1", 1) != 1 ||
        !one(s, '2') || write(s, "3", 1) != 1 || write(s, "hello\n", 6) != 6)
        return 1;
    line(s, got[0], sizeof got[0]);
    if (write(s, "bye\n", 4) != 4)
        return 1;
    line(s, got[1], sizeof got[1]);
    ssize_t last = read(s, &end, 1);
    if (strcmp(got[0], "echo hello\n") || strcmp(got[1], "echo bye\n") || last != 0) {
        printf("CLIENT WRONG %s|%s|%zd\n", got[0], got[1], last);
        return 1;
    }
    printf("CLIENT OK\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "serve") == 0)
        return serve(argv[0], argv[2]);
    if (argc == 2 && strcmp(argv[1], "inetd") == 0)
        return serve_lines(stdin, stdout);
    if (argc == 3 && strcmp(argv[1], "client") == 0)
        return client(atoi(argv[2]));
    fprintf(stderr, "usage: stdio serve dup2|exec|spawn|fdopen | stdio inetd | stdio client PORT\n");
    return 2;
}
