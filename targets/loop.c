/* loop.c -- the default demo target: one thread calling work() K times.
 *
 * Probe spec:  work          (also work+4 etc.; `objdump -d` shows its shape)
 * Usage:       loop [K=1000] [SLEEP_US]
 *   K calls of work(i, x) in batches of 100; with SLEEP_US, usleep(SLEEP_US)
 *   after each batch so a tracer can attach and watch it live.
 * Prints:      "loop: K calls, sum=S"   (S depends only on K; deterministic)
 * Hazard:      none -- the plain case: hit count must equal K exactly and the
 *              output must be identical with and without probes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((noipa)) long work(int i, long x)
{
    return x + (long)i * 3 + 1;
}

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 1000;
    long sleep_us = argc > 2 ? atol(argv[2]) : -1;
    long sum = 0;
    for (long i = 0; i < k; i++) {
        sum = work((int)i, sum);
        if (sleep_us >= 0 && i % 100 == 99)
            usleep(sleep_us);
    }
    printf("loop: %ld calls, sum=%ld\n", k, sum);
    return 0;
}
