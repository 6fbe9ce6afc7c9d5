/* sigtrap.c -- the program's own SIGTRAP handler and its own int3.
 *
 * Probe spec:  probed     (a probe elsewhere; the program's own int3 is in
 *              own_trap(), which must NOT be treated as ours)
 * Usage:       sigtrap [N=10]
 * Behaviour:   installs a SIGTRAP handler, then N times calls probed(i) and
 *              own_trap(), which executes `int3` (inline asm); the handler
 *              counts the traps.
 * Prints:      "sigtrap: handled N, sum=S"  (S = sum of i+5 for i < N).
 * Hazard:      a foreign int3 / SIGTRAP: the tracer must re-inject SIGTRAPs that
 *              do not come from its own sites, so the handler still runs N times;
 *              a probe on own_trap itself (own_trap+0 is `cc int3`, +1 is `c3 ret`)
 *              must be refused (foreign int3) rather than relocate someone's int3.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile sig_atomic_t handled;

static void on_trap(int sig)
{
    (void)sig;
    handled++;
}

__attribute__((noipa)) long probed(long i)
{
    return i + 5;
}

__attribute__((noipa)) void own_trap(void)
{
    __asm__ volatile("int3");
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 10;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_trap;
    sigaction(SIGTRAP, &sa, NULL);
    long sum = 0;
    for (long i = 0; i < n; i++) {
        sum += probed(i);
        own_trap();
    }
    printf("sigtrap: handled %d, sum=%ld\n", (int)handled, sum);
    return 0;
}
