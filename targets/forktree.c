/* forktree.c -- a process tree that calls a probed function known numbers of times.
 *
 * Probe spec:  counted (every process), tree_only (the first process, once)
 * Usage:       forktree [-w] P K1 K2 K3 [G [PROGRAM ARG...]]
 *              (-w: print "forktree: ready pid=PID" and wait for a line on stdin
 *              before anything else, for a tracer to attach)
 * Behaviour:   the first process calls tree_only() once, then forks 3 children:
 *              child I (0..2) prints "child I pid=PID calls=K", calls counted() K
 *              times and _exit(10+I)s.  With G > 0, child 2 first forks a grandchild
 *              that prints "grandchild pid=PID calls=G", calls counted() G times
 *              and _exit(20)s (child 2 waits for it).  The first process waits for
 *              its 3 children, calls counted() P times and prints
 *              "forktree: pid=PID calls=P exits=10,11,12"; with PROGRAM given it
 *              then execs PROGRAM ARG... (e.g. another of our targets).
 * Hazard:      forks while probes are armed or optimized: every child inherits our
 *              bytes, detour pages and the MAP_SHARED counter pages and ring of its
 *              parent.  Traced with -f, each process's counts are exact and apart.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noipa)) long counted(long i)
{
    return i * 2;
}

__attribute__((noipa)) long tree_only(long i)
{
    return i + 1;
}

static long calls(long n)
{
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += counted(i);
    return sum;
}

static int status_of(pid_t pid)
{
    int status;
    if (waitpid(pid, &status, 0) < 0)
        return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static void child(int i, long k, long g)
{
    pid_t grand = -1;
    if (g > 0) {
        fflush(stdout);
        grand = fork();
        if (grand == 0) {
            printf("grandchild pid=%d calls=%ld\n", (int)getpid(), g);
            fflush(stdout);
            calls(g);
            _exit(20);
        }
    }
    printf("child %d pid=%d calls=%ld\n", i, (int)getpid(), k);
    fflush(stdout);
    calls(k);
    if (grand > 0 && status_of(grand) != 20)
        _exit(99);
    _exit(10 + i);
}

int main(int argc, char **argv)
{
    if (argc > 1 && argv[1][0] == '-' && argv[1][1] == 'w') {
        char line[64];
        printf("forktree: ready pid=%d\n", (int)getpid());
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin))
            return 3;
        argv++;
        argc--;
    }
    if (argc < 5) {
        fprintf(stderr, "usage: forktree [-w] P K1 K2 K3 [G [PROGRAM ARG...]]\n");
        return 2;
    }
    long p = atol(argv[1]);
    long g = argc > 5 ? atol(argv[5]) : 0;
    pid_t kids[3];
    tree_only(0);
    for (int i = 0; i < 3; i++) {
        fflush(stdout);
        kids[i] = fork();
        if (kids[i] < 0) {
            perror("fork");
            return 1;
        }
        if (kids[i] == 0)
            child(i, atol(argv[2 + i]), i == 2 ? g : 0);
    }
    int st[3];
    for (int i = 0; i < 3; i++)
        st[i] = status_of(kids[i]);
    calls(p);
    printf("forktree: pid=%d calls=%ld exits=%d,%d,%d\n", (int)getpid(), p,
           st[0], st[1], st[2]);
    fflush(stdout);
    if (argc > 6) {
        execv(argv[6], argv + 6);
        perror("execv");
        return 1;
    }
    return 0;
}
