/* bench_work.c -- per-hit overhead target for scripts/bench_overhead.
 *
 * Probe spec:  work          (6 integer arguments, so a `record` handler has all of
 *                             rdi, rsi, rdx, rcx, r8, r9 to save)
 * Usage:       bench_work [N=1000000] [THREADS=1]
 *   THREADS=1: main calls work() N times.  THREADS>1: THREADS threads, released
 *   together by a barrier, each call work() N times.  The timed section is only the
 *   call loop: each thread reads CLOCK_MONOTONIC before and after its loop, and the
 *   wall time is last end - first start; so start-up, thread creation, attach and
 *   probe set-up are excluded (under a spawning tracer, probes are optimized before
 *   main runs).
 * Prints:      "bench_work: threads=T n=N calls=C wall_ns=W ns_per_call=X
 *               cpu_ns_per_call=Y minflt=F sum=S"
 *   ns_per_call     = wall time of the timed section / (T*N): for T>1 this is the
 *                     process's wall time per call with all threads running at once
 *                     (the machine's cores shared), not one thread's latency.
 *   cpu_ns_per_call = sum of the threads' CLOCK_THREAD_CPUTIME_ID over the loop / (T*N)
 *                     (user+kernel CPU; time stopped under ptrace is not in it).
 *   minflt          = page faults the threads took inside their loops (getrusage
 *                     RUSAGE_THREAD ru_minflt + ru_majflt): first stores into a ring
 *                     page the process had not touched yet show up here.
 *   S depends only on T and N (deterministic), so output can be compared.
 * Hazard:      none; a plain, optimizable function entry.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((noipa)) long work(long a, long b, long c, long d, long e, long f)
{
    return a + (b ^ c) + d * 3 + (e | f);
}

static long n_calls;
static pthread_barrier_t barrier;

struct result { long sum; double cpu_ns, start_ns, end_ns; long faults; };

static double now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static long thread_faults(void)
{
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    return ru.ru_minflt + ru.ru_majflt;
}

static void loop(long t, struct result *r)
{
    long sum = 0;
    long f0 = thread_faults();
    r->start_ns = now_ns(CLOCK_MONOTONIC);
    double c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    for (long i = 0; i < n_calls; i++)
        sum = work(i, sum, t, 7, i & 3, 1) & 0xffffffffffffL;
    r->cpu_ns = now_ns(CLOCK_THREAD_CPUTIME_ID) - c0;
    r->end_ns = now_ns(CLOCK_MONOTONIC);
    r->faults = thread_faults() - f0;
    r->sum = sum;
}

static void *worker(void *arg)
{
    struct result *r = arg;
    pthread_barrier_wait(&barrier);
    loop(r->sum, r);
    return NULL;
}

int main(int argc, char **argv)
{
    n_calls = argc > 1 ? atol(argv[1]) : 1000000;
    int nt = argc > 2 ? atoi(argv[2]) : 1;
    if (nt < 1)
        nt = 1;
    struct result *res = calloc(nt, sizeof *res);
    pthread_t *tids = calloc(nt, sizeof *tids);
    if (nt == 1) {
        loop(0, &res[0]);
    } else {
        pthread_barrier_init(&barrier, NULL, nt + 1);
        for (int t = 0; t < nt; t++) {
            res[t].sum = t;               /* the thread's index, read before the loop */
            pthread_create(&tids[t], NULL, worker, &res[t]);
        }
        pthread_barrier_wait(&barrier);
        for (int t = 0; t < nt; t++)
            pthread_join(tids[t], NULL);
    }
    long sum = 0, faults = 0;
    double cpu = 0, w0 = res[0].start_ns, w1 = res[0].end_ns;
    for (int t = 0; t < nt; t++) {
        sum += res[t].sum;
        cpu += res[t].cpu_ns;
        faults += res[t].faults;
        if (res[t].start_ns < w0)
            w0 = res[t].start_ns;
        if (res[t].end_ns > w1)
            w1 = res[t].end_ns;
    }
    double calls = (double)nt * n_calls;
    printf("bench_work: threads=%d n=%ld calls=%.0f wall_ns=%.0f ns_per_call=%.3f "
           "cpu_ns_per_call=%.3f minflt=%ld sum=%ld\n", nt, n_calls, calls, w1 - w0,
           (w1 - w0) / calls, cpu / calls, faults, sum);
    return 0;
}
