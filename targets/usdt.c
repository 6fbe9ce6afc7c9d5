/* usdt.c -- USDT markers (<sys/sdt.h>, systemtap-sdt-dev) with a semaphore.
 *
 * Probe specs: usdt:demo:tick (semaphore-guarded), usdt:demo:plain (its semaphore
 *              is never tested: it fires whether or not a tracer holds it)
 * Usage:       usdt [N=1000]; then one phase per line read on stdin, until EOF.
 * Each phase:  N calls of step(i) for i = 0..N-1; each fires demo:plain and, when
 *              its semaphore is non-zero (a tracer is attached to it), counts the
 *              guarded work and fires demo:tick.
 * Prints:      "usdt: ready pid=P" first, then per phase
 *              "usdt: phase K steps=N guarded=G sem=S sum=X" (G = N while a tracer
 *              holds the semaphore, 0 otherwise; S the semaphore's value at the end).
 * Arguments:   demo:tick (i as -4@..., the global `total` as 8@total(%rip), the
 *              constant -7 as an immediate); demo:plain (i, i * 3 as a long, and
 *              a char -1 - (i & 1)); see `readelf -n` for the exact descriptors.
 */
#define _SDT_HAS_SEMAPHORES 1
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/sdt.h>

unsigned short demo_tick_semaphore __attribute__((unused, section(".probes")));
/* sdt.h gives every marker of a file with semaphores one: plain's is never tested */
unsigned short demo_plain_semaphore __attribute__((unused, section(".probes")));
long total;
static long guarded;

__attribute__((noipa)) static void step(int i)
{
    signed char c = (signed char)(-1 - (i & 1));
    long triple = (long)i * 3;
    total += i;
    DTRACE_PROBE3(demo, plain, i, triple, c);
    if (__builtin_expect(demo_tick_semaphore, 0)) {
        guarded++;
        DTRACE_PROBE3(demo, tick, i, total, -7);
    }
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("usdt: ready pid=%d\n", (int)getpid());
    for (int phase = 1; fgets(line, sizeof line, stdin); phase++) {
        guarded = 0;
        for (int i = 0; i < n; i++)
            step(i);
        printf("usdt: phase %d steps=%d guarded=%ld sem=%u sum=%ld\n", phase, n, guarded,
               (unsigned)demo_tick_semaphore, total);
    }
    return 0;
}
