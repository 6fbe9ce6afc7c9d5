/* hz_hammer.c -- many threads calling one probed function in a tight loop.
 *
 * Probe spec:  hammered
 * Usage:       hz_hammer [N=8] [CALLS=200000] [SECONDS]
 *              With SECONDS, each thread calls until SECONDS have passed (CALLS
 *              ignored) -- for optimizing/unoptimizing while threads are in flight.
 * Prints:      "hammer: N threads, total=T calls, sum=S"  where T is counted by the
 *              threads themselves (exactly N*CALLS without SECONDS) and
 *              S = sum of hammered(t, i) = sum of (t << 32) + i.
 * Hazard:      threads executing inside the region (and on their way into the
 *              detour) while the jmp is written; the hit count must equal T with
 *              no missed or doubled hits on either path.
 * Expected:    optimized (after a quiescence point in which no thread sits
 *              strictly inside the region).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long calls_per_thread;
static double seconds = -1;
static pthread_barrier_t barrier;

__attribute__((noipa)) long hammered(long t, long i)
{
    return (t << 32) + i;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct result { long calls, sum; };

static void *worker(void *arg)
{
    long t = (long)arg;
    struct result *r = calloc(1, sizeof *r);
    pthread_barrier_wait(&barrier);
    if (seconds < 0) {
        for (long i = 0; i < calls_per_thread; i++)
            r->sum += hammered(t, i);
        r->calls = calls_per_thread;
    } else {
        double end = now() + seconds;
        long i = 0;
        while (now() < end)
            for (long j = 0; j < 1000; j++, i++)
                r->sum += hammered(t, i);
        r->calls = i;
    }
    return r;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 8;
    calls_per_thread = argc > 2 ? atol(argv[2]) : 200000;
    if (argc > 3)
        seconds = atof(argv[3]);
    pthread_t *tids = calloc(n, sizeof *tids);
    pthread_barrier_init(&barrier, NULL, n);
    for (long t = 0; t < n; t++)
        pthread_create(&tids[t], NULL, worker, (void *)t);
    long total = 0, sum = 0;
    for (int t = 0; t < n; t++) {
        struct result *r;
        pthread_join(tids[t], (void **)&r);
        total += r->calls;
        sum += r->sum;
        free(r);
    }
    printf("hammer: %d threads, total=%ld calls, sum=%ld\n", n, total, sum);
    return 0;
}
