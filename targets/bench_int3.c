/* bench_int3.c -- raw ptrace round-trip target for scripts/bench_overhead.
 *
 * Usage:       bench_int3 [N=10000]      (only under a tracer: an untraced int3 kills it)
 *   Executes int3 N times in a loop; each one is a SIGTRAP stop its tracer handles
 *   (waitpid, GETREGS, SETREGS, CONT: rip is already past the int3).
 * Prints:      "bench_int3: n=N wall_ns=W ns_per_trap=X"  (CLOCK_MONOTONIC around the
 *              loop: the target's view of one stop-and-continue round trip)
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 10000;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        __asm__ volatile("int3" ::: "memory");
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("bench_int3: n=%ld wall_ns=%.0f ns_per_trap=%.1f\n", n, ns, ns / (n ? n : 1));
    return 0;
}
