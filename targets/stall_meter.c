/* stall_meter.c -- threads that measure how long they were kept from running.
 *
 * build-flags: -rdynamic
 * (the probe functions are exported, so Frida's Module.getExportByName finds them)
 * Probe specs: pf_0000 .. pf_9999 (10,000 small functions, `return x * 7 + N`)
 * Usage:       stall_meter SHM_FILE NTHREADS NCALL
 *              SHM_FILE: a file of >= stall_meter_size(NTHREADS) bytes shared with
 *              the driver (scripts/bench_freeze); NCALL: the functions pf_0000 ..
 *              pf_{NCALL-1} the workers call, round robin, 10 per iteration.
 * Behaviour:   NTHREADS workers each loop every PERIOD_US: sleep to an absolute
 *              deadline (CLOCK_MONOTONIC), then a busy segment calling probe
 *              functions for BUSY_US.  Each thread measures, per iteration:
 *                late = (wake - deadline) - (run-queue wait meanwhile)
 *                off  = busy wall time - busy CPU time - run-queue wait meanwhile
 *              (CPU time from CLOCK_THREAD_CPUTIME_ID, run-queue wait from field 2
 *              of /proc/thread-self/schedstat), i.e. time it was neither running
 *              nor runnable although it wanted to run: stopped (ptrace, SIGSTOP).
 *              A stall = late + off when above NOISE_NS; per thread and per phase
 *              (the phase word the driver writes into the shared file) it keeps the
 *              longest stall and the sum.  SIGUSR1 is counted (received).
 *              The driver writes phase 99 to end it; it prints
 *              "stall_meter: T threads, S SIGUSR1 received, sum=X".
 * Hazard:      none; a measuring instrument.  Nothing here is a probe hazard.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define NPHASE 5
#define PERIOD_US 2000
#define BUSY_US 100
#define NOISE_NS 50000

/* Shared layout (little endian), read by scripts/bench_freeze:
 *   0  u32 phase (driver)     4 u32 nthreads    8 u32 ready (workers running)
 *  16  u64 sigusr1 received
 *  64 + (t*NPHASE + p)*32: u64 longest_ns, u64 total_ns, u64 iterations, u64 stalls */
struct stat_slot { uint64_t longest, total, iters, stalls; };
struct shared {
    _Atomic uint32_t phase, nthreads, ready, pad;
    _Atomic uint64_t received;
    uint64_t reserved[5];
    struct stat_slot slot[];
};

static struct shared *shm;
static long ncall;

#define F1(n) __attribute__((noipa)) long pf_##n(long x) { return x * 7 + 1##n; }
#define F10(n) F1(n##0) F1(n##1) F1(n##2) F1(n##3) F1(n##4) F1(n##5) F1(n##6) \
    F1(n##7) F1(n##8) F1(n##9)
#define F100(n) F10(n##0) F10(n##1) F10(n##2) F10(n##3) F10(n##4) F10(n##5) \
    F10(n##6) F10(n##7) F10(n##8) F10(n##9)
#define F1000(n) F100(n##0) F100(n##1) F100(n##2) F100(n##3) F100(n##4) \
    F100(n##5) F100(n##6) F100(n##7) F100(n##8) F100(n##9)
F1000(0) F1000(1) F1000(2) F1000(3) F1000(4) F1000(5) F1000(6) F1000(7) F1000(8)
F1000(9)

#define T1(n) pf_##n,
#define T10(n) T1(n##0) T1(n##1) T1(n##2) T1(n##3) T1(n##4) T1(n##5) T1(n##6) \
    T1(n##7) T1(n##8) T1(n##9)
#define T100(n) T10(n##0) T10(n##1) T10(n##2) T10(n##3) T10(n##4) T10(n##5) \
    T10(n##6) T10(n##7) T10(n##8) T10(n##9)
#define T1000(n) T100(n##0) T100(n##1) T100(n##2) T100(n##3) T100(n##4) \
    T100(n##5) T100(n##6) T100(n##7) T100(n##8) T100(n##9)
static long (*const table[10000])(long) = {
    T1000(0) T1000(1) T1000(2) T1000(3) T1000(4) T1000(5) T1000(6) T1000(7)
    T1000(8) T1000(9)
};

static int64_t now_ns(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Run-queue wait so far (ns), field 2 of /proc/thread-self/schedstat. */
static int64_t runq_ns(int fd)
{
    char buf[128];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strchr(buf, ' ');
    return p ? strtoll(p + 1, NULL, 10) : 0;
}

static void record(int t, int64_t stall)
{
    uint32_t p = atomic_load(&shm->phase);
    if (p >= NPHASE)
        p = NPHASE - 1;
    struct stat_slot *s = &shm->slot[t * NPHASE + p];
    s->iters++;
    if (stall < NOISE_NS)
        return;
    s->stalls++;
    s->total += (uint64_t)stall;
    if ((uint64_t)stall > s->longest)
        s->longest = (uint64_t)stall;
}

static void *worker(void *arg)
{
    int t = (int)(long)arg;
    int fd = open("/proc/thread-self/schedstat", O_RDONLY);
    long sum = 0, next = t;
    int64_t deadline = now_ns(CLOCK_MONOTONIC);
    atomic_fetch_add(&shm->ready, 1);
    while (atomic_load(&shm->phase) != 99) {
        deadline += PERIOD_US * 1000L;
        int64_t q0 = runq_ns(fd);
        struct timespec ts = { deadline / 1000000000, deadline % 1000000000 };
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL))
            ;
        int64_t w1 = now_ns(CLOCK_MONOTONIC), c1 = now_ns(CLOCK_THREAD_CPUTIME_ID);
        int64_t q1 = runq_ns(fd);
        int64_t late = (w1 - deadline) - (q1 - q0);
        int64_t w2;
        do {
            for (int i = 0; i < 10; i++) {
                sum += table[next](i);
                next = next + 1 < ncall ? next + 1 : 0;
            }
            w2 = now_ns(CLOCK_MONOTONIC);
        } while (w2 - w1 < BUSY_US * 1000L);
        int64_t c2 = now_ns(CLOCK_THREAD_CPUTIME_ID), q2 = runq_ns(fd);
        int64_t off = (w2 - w1) - (c2 - c1) - (q2 - q1);
        record(t, (late > 0 ? late : 0) + (off > 0 ? off : 0));
        if (w2 > deadline + PERIOD_US * 1000L)
            deadline = w2;        /* overran: start a fresh grid, never burst */
    }
    return (void *)sum;
}

static void on_usr1(int sig)
{
    (void)sig;
    atomic_fetch_add(&shm->received, 1);
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: stall_meter SHM_FILE NTHREADS NCALL\n");
        return 2;
    }
    int n = atoi(argv[2]);
    ncall = atol(argv[3]);
    if (ncall < 1 || ncall > 10000 || n < 1) {
        fprintf(stderr, "stall_meter: NCALL must be 1..10000, NTHREADS >= 1\n");
        return 2;
    }
    int fd = open(argv[1], O_RDWR);
    size_t size = 64 + (size_t)n * NPHASE * sizeof(struct stat_slot);
    if (fd < 0 || ftruncate(fd, (off_t)size) < 0) {
        perror("stall_meter: shared file");
        return 2;
    }
    shm = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (shm == MAP_FAILED) {
        perror("stall_meter: mmap");
        return 2;
    }
    prctl(PR_SET_TIMERSLACK, 1UL);           /* threads inherit it */
    struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
    sigaction(SIGUSR1, &sa, NULL);
    shm->nthreads = (uint32_t)n;
    pthread_t *tids = calloc((size_t)n, sizeof *tids);
    for (int t = 0; t < n; t++)
        pthread_create(&tids[t], NULL, worker, (void *)(long)t);
    long total = 0;
    for (int t = 0; t < n; t++) {
        void *ret;
        pthread_join(tids[t], &ret);
        total += (long)ret;
    }
    printf("stall_meter: %d threads, %llu SIGUSR1 received, sum=%ld\n", n,
           (unsigned long long)atomic_load(&shm->received), total);
    return 0;
}
