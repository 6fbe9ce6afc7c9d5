/* sleeper.c -- a multi-threaded process that mostly sleeps; for attach tests.
 *
 * Probe spec:  tick
 * Usage:       sleeper [ITERS=0 (forever)] [INTERVAL_MS=10]
 * Threads:     - "reader": blocked in read(0, ...) on stdin (give it a pipe); on
 *                EOF it prints "reader: N bytes" and exits.
 *              - "napper": loops in nanosleep(1 ms) forever.
 *              - main: calls tick(i) every INTERVAL_MS ms; prints
 *                "sleeper: ready pid=P" (flushed) at start, "sleeper: tick N" every
 *                100 ticks, and after ITERS ticks "sleeper: done N ticks, sum=S"
 *                with S = sum of tick(i) = sum of 2*i+1 = N*N, then exits 0.
 * Hazard:      attaching to threads parked in blocking syscalls (read, nanosleep)
 *              -- the remote syscall / interrupt path must restart them cleanly;
 *              detaching leaves all three running.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

__attribute__((noipa)) long tick(long i)
{
    return 2 * i + 1;
}

static void *reader(void *arg)
{
    (void)arg;
    char buf[256];
    long total = 0;
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0)
        total += n;
    printf("reader: %ld bytes\n", total);
    fflush(stdout);
    return NULL;
}

static void *napper(void *arg)
{
    (void)arg;
    struct timespec ts = {0, 1000000};
    for (;;)
        nanosleep(&ts, NULL);
    return NULL;
}

int main(int argc, char **argv)
{
    long iters = argc > 1 ? atol(argv[1]) : 0;
    long interval_ms = argc > 2 ? atol(argv[2]) : 10;
    pthread_t t1, t2;
    pthread_create(&t1, NULL, reader, NULL);
    pthread_create(&t2, NULL, napper, NULL);
    printf("sleeper: ready pid=%d\n", (int)getpid());
    fflush(stdout);
    struct timespec ts = {interval_ms / 1000, (interval_ms % 1000) * 1000000};
    long sum = 0, i;
    for (i = 0; iters == 0 || i < iters; i++) {
        sum += tick(i);
        if (i % 100 == 99) {
            printf("sleeper: tick %ld\n", i + 1);
            fflush(stdout);
        }
        nanosleep(&ts, NULL);
    }
    printf("sleeper: done %ld ticks, sum=%ld\n", i, sum);
    fflush(stdout);
    _exit(0);
}
