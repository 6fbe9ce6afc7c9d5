/* spawner.c -- starts a program with posix_spawn (a CLONE_VM|CLONE_VFORK child that
 * execs at once), calls a probed function, waits for the program.
 *
 * Probe spec:  counted
 * Usage:       spawner P PROGRAM [ARG...]
 * Behaviour:   posix_spawn()s PROGRAM ARG..., calls counted() P times, waits for it
 *              and prints "spawner: pid=PID calls=P child=CHILD exit=N".
 * Hazard:      the spawned child shares its parent's memory (our patches and
 *              counters) until its execve: followed (-f --follow-exec), it becomes a
 *              process of its own only in its new program.
 */
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

__attribute__((noipa)) long counted(long i)
{
    return i * 2;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: spawner P PROGRAM [ARG...]\n");
        return 2;
    }
    long p = atol(argv[1]), sum = 0;
    pid_t pid;
    fflush(stdout);
    int err = posix_spawn(&pid, argv[2], NULL, NULL, argv + 2, environ);
    if (err) {
        fprintf(stderr, "posix_spawn: error %d\n", err);
        return 1;
    }
    for (long i = 0; i < p; i++)
        sum += counted(i);
    int status;
    waitpid(pid, &status, 0);
    printf("spawner: pid=%d calls=%ld child=%d exit=%d\n", (int)getpid(), p, (int)pid,
           WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return sum < 0;
}
