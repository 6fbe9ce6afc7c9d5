/* threads.c -- N threads x M calls of hit(), released together by a barrier.
 *
 * Probe spec:  hit
 * Usage:       threads [N=8] [M=10000]
 * Prints:      "threads: N x M calls, total=T"  where T = sum over threads t and
 *              i < M of (t*1000 + i) -- deterministic, independent of scheduling.
 * Hazard:      many threads hitting one probe at once (the int3 path and the
 *              optimized path must both count N*M hits exactly, none missed);
 *              threads created while a tracer is attached.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static pthread_barrier_t barrier;
static long m_calls;

__attribute__((noipa)) long hit(int thread, int i)
{
    return (long)thread * 1000 + i;
}

static void *worker(void *arg)
{
    int t = (int)(long)arg;
    long sum = 0;
    pthread_barrier_wait(&barrier);
    for (long i = 0; i < m_calls; i++)
        sum += hit(t, (int)i);
    return (void *)sum;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 8;
    m_calls = argc > 2 ? atol(argv[2]) : 10000;
    pthread_t *tids = calloc(n, sizeof *tids);
    pthread_barrier_init(&barrier, NULL, n);
    for (int t = 0; t < n; t++)
        pthread_create(&tids[t], NULL, worker, (void *)(long)t);
    long total = 0;
    for (int t = 0; t < n; t++) {
        void *ret;
        pthread_join(tids[t], &ret);
        total += (long)ret;
    }
    printf("threads: %d x %ld calls, total=%ld\n", n, m_calls, total);
    return 0;
}
