/* A blocking recv interrupted by a signal: restarted when the handler has
 * SA_RESTART, EINTR when it has not (signal(7)). Prints one line per case;
 * tests/tests/semantics.rs runs it on kernel TCP and under ssock-run. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_alarm(int sig) { (void)sig; }

static int connected_pair(int *c, int *a) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&sa, sizeof sa) || listen(l, 4) ||
        getsockname(l, (struct sockaddr *)&sa, &len))
        return -1;
    *c = socket(AF_INET, SOCK_STREAM, 0);
    if (*c < 0 || connect(*c, (struct sockaddr *)&sa, sizeof sa))
        return -1;
    *a = accept(l, NULL, NULL);
    close(l);
    return *a < 0 ? -1 : 0;
}

static void one(int restart) {
    int c, a;
    if (connected_pair(&c, &a)) {
        perror("pair");
        _exit(1);
    }
    struct sigaction act;
    memset(&act, 0, sizeof act);
    act.sa_handler = on_alarm;
    act.sa_flags = restart ? SA_RESTART : 0;
    sigaction(SIGALRM, &act, NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(a);
        usleep(400000);
        if (write(c, "x", 1) != 1)
            _exit(1);
        close(c);
        _exit(0);
    }
    close(c);
    struct itimerval t = {.it_value = {.tv_usec = 100000}};
    setitimer(ITIMER_REAL, &t, NULL);
    char b[8];
    ssize_t n = recv(a, b, sizeof b, 0);
    int e = n < 0 ? errno : 0;
    printf("SA_RESTART=%d: recv=%zd %s\n", restart, n, e == EINTR ? "EINTR" : e ? strerror(e) : "");
    fflush(stdout);
    waitpid(pid, NULL, 0);
    close(a);
}

int main(void) {
    one(1);
    one(0);
    return 0;
}
