/* lean_storm.c -- exactness of in-process counters and records under migration,
 * preemption and signals.
 *
 * Probe spec:  hit
 * Usage:       lean_storm migrate [N=8] [M=200000]
 *                  N workers call hit(t, i) for i < M; a flipper thread moves every
 *                  worker between CPU 0 and CPU 1 (sched_setaffinity) every 0.5 ms until
 *                  all are done; each worker waits for the next flip every M/20
 *                  calls, so every worker sees at least 20 flips.  Prints "migrate: N x M calls, total=T" (T = sum of
 *                  t*1000 + i); on stderr "migrate: flips=F cpus_seen=C".
 *              lean_storm alarm [K=2000]
 *                  the main thread calls hit(0, i) for i = 0, 1, ... while an interval
 *                  timer (100 us) raises SIGALRM; the handler calls hit(1, h) for
 *                  h = 0, 1, ...; the loop ends after K signals.  Prints
 *                  "alarm: K signals"; on stderr "alarm: main=M handler=K".
 * Hazard:      a thread migrated or preempted inside a detour's restartable sequence
 *              (the commit must not double-count nor be lost); a signal handler calling
 *              the probed function while the interrupted thread is inside the detour.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#define CHECKPOINTS 20

__attribute__((noipa)) long hit(int thread, int i)
{
    return (long)thread * 1000 + i;
}

static int nworkers;
static long m_calls;
static int done;                 /* workers finished (a joinable thread's handle stays
                                    valid until joined: the flipper may still use it) */
static pthread_t *workers;
static volatile unsigned long cpus_seen;
static int started;
static long flips_now;             /* flips so far: workers pace themselves on it */

static void *worker(void *arg)
{
    int t = (int)(long)arg;
    long sum = 0;
    while (!__atomic_load_n(&started, __ATOMIC_ACQUIRE))
        sched_yield();                     /* the flipper is running */
    long step = m_calls / CHECKPOINTS > 0 ? m_calls / CHECKPOINTS : 1;
    for (long i = 0; i < m_calls; i++) {
        if (i % step == 0)          /* at least CHECKPOINTS flips during the calls */
            while (__atomic_load_n(&flips_now, __ATOMIC_ACQUIRE) < i / step)
                sched_yield();
        sum += hit(t, (int)i);
        if ((i & 4095) == 0) {
            int cpu = sched_getcpu();
            if (cpu >= 0 && cpu < 64)
                __atomic_or_fetch(&cpus_seen, 1UL << cpu, __ATOMIC_RELAXED);
        }
    }
    __atomic_add_fetch(&done, 1, __ATOMIC_RELEASE);
    return (void *)sum;
}

static void *flipper(void *arg)
{
    long flips = 0;
    int ncpu = 0;
    cpu_set_t all;
    (void)arg;
    sched_getaffinity(0, sizeof all, &all);
    ncpu = CPU_COUNT(&all);
    while (__atomic_load_n(&done, __ATOMIC_ACQUIRE) < nworkers) {
        __atomic_store_n(&started, 1, __ATOMIC_RELEASE);
        for (int t = 0; t < nworkers; t++) {
            cpu_set_t one;
            CPU_ZERO(&one);
            CPU_SET((int)((flips + t) % (ncpu > 1 ? 2 : 1)), &one);
            pthread_setaffinity_np(workers[t], sizeof one, &one);
        }
        flips++;
        __atomic_store_n(&flips_now, flips, __ATOMIC_RELEASE);
        struct timespec ts = {0, 500000};
        nanosleep(&ts, NULL);
    }
    return (void *)flips;
}

static int migrate(int n, long m)
{
    pthread_t flip;
    nworkers = n;
    m_calls = m;
    workers = calloc(n, sizeof *workers);
    for (int t = 0; t < n; t++)
        pthread_create(&workers[t], NULL, worker, (void *)(long)t);
    pthread_create(&flip, NULL, flipper, NULL);
    void *flips;
    pthread_join(flip, &flips);             /* first: it uses the workers' handles */
    long total = 0;
    for (int t = 0; t < n; t++) {
        void *ret;
        pthread_join(workers[t], &ret);
        total += (long)ret;
    }
    printf("migrate: %d x %ld calls, total=%ld\n", n, m, total);
    fprintf(stderr, "migrate: flips=%ld cpus_seen=%d\n", (long)flips,
            __builtin_popcountl(cpus_seen));
    return 0;
}

static volatile sig_atomic_t handled;

static void on_alarm(int sig)
{
    (void)sig;
    hit(1, handled);
    handled = handled + 1;
}

static int alarm_storm(long k)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 100}, {0, 100}};
    setitimer(ITIMER_REAL, &it, NULL);
    long i = 0;
    while (handled < k)
        hit(0, (int)i++);
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    signal(SIGALRM, SIG_IGN);       /* one may still be pending */
    long h = handled;
    printf("alarm: %ld signals\n", k);
    fprintf(stderr, "alarm: main=%ld handler=%ld\n", i, h);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "migrate"))
        return migrate(argc > 2 ? atoi(argv[2]) : 8, argc > 3 ? atol(argv[3]) : 200000);
    if (argc > 1 && !strcmp(argv[1], "alarm"))
        return alarm_storm(argc > 2 ? atol(argv[2]) : 2000);
    fprintf(stderr, "usage: lean_storm migrate [N] [M] | alarm [K]\n");
    return 2;
}
