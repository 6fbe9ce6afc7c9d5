/* uselib.c -- calls lib_add() from libdemo.so K times.
 *
 * Build:       lib = build_target("libdemo", shared=True)
 *              exe = build_target("uselib", libs=[lib])
 * Probe spec:  libdemo:lib_add
 * Usage:       uselib [K=1000] [SLEEP_US]   (with SLEEP_US: usleep after every
 *              100 calls, so a tracer can attach)
 * Prints:      "uselib: K calls, result=R"  where R = sum of (i % 7 + 1) for i < K,
 *              computed with wrap-around int arithmetic (deterministic).
 * Hazard:      a probe in a shared library.
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int lib_add(int a, int b);

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 1000;
    long sleep_us = argc > 2 ? atol(argv[2]) : -1;
    int r = 0;
    for (long i = 0; i < k; i++) {
        r = lib_add(r, (int)(i % 7) + 1);
        if (sleep_us >= 0 && i % 100 == 99)
            usleep(sleep_us);
    }
    printf("uselib: %ld calls, result=%d\n", k, r);
    return 0;
}
