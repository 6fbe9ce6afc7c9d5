/* forker.c -- calls a probed function, forks, the child calls it K times.
 *
 * Probe spec:  counted
 * Usage:       forker [K=100]
 * Behaviour:   parent calls counted() once, fork()s; the child calls counted()
 *              K times and _exit(7)s; the parent waits, then calls counted()
 *              once more.
 * Prints:      "forker: child exit=7 parent calls=2"  (the child prints
 *              "child: K calls, sum=S" first, S = sum of i*2 for i < K).
 * Hazard:      fork while probes are armed/optimized: the child inherits our int3
 *              bytes / jumps into a detour page; it must survive (sites cleaned in
 *              the child, or the detour kept valid) and exit with status 7.
 *              Expected probe hits in the parent: exactly 2.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noipa)) long counted(long i)
{
    return i * 2;
}

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 100;
    long calls = 0;
    counted(0);
    calls++;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 1;
    }
    if (pid == 0) {
        long sum = 0;
        for (long i = 0; i < k; i++)
            sum += counted(i);
        printf("child: %ld calls, sum=%ld\n", k, sum);
        fflush(stdout);
        _exit(7);
    }
    int status;
    waitpid(pid, &status, 0);
    counted(1);
    calls++;
    if (WIFEXITED(status))
        printf("forker: child exit=%d parent calls=%ld\n", WEXITSTATUS(status), calls);
    else
        printf("forker: child killed by signal %d parent calls=%ld\n",
               WIFSIGNALED(status) ? WTERMSIG(status) : -1, calls);
    return 0;
}
