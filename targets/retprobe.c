/* retprobe.c -- functions with several exits, for return probes (SPEC%return).
 *
 * Usage:  retprobe MODE [N] [wait] [hold]
 *   wait: read one line from stdin before the work (to arm kernel probes first);
 *   hold: after the work print "retprobe: holding" and block in read(0) until EOF,
 *         so a tracer can end while the process is alive.
 * Every returned value is printed, so a test compares them with recorded ones.
 *
 * Modes and the probed function:
 *   multi N     classify(i), i = -1 .. N-2: four ret instructions (early returns
 *               for x < 0, x == 0 before the prologue, two after it); prints
 *               "classify(I)=R" per call.  per_thread's one ret is a branch target
 *               right after the code before it: that exit cannot be jump-optimized.
 *   rec D       rec(D): real recursion D deep (the volatile defeats gcc's
 *               accumulator transform), prints "rec(D)=R"; D+1 entries, D+1 exits.
 *   tail N      tailer(i) ends in a tail call (jmp) to leaf_odd or leaf_even;
 *               prints "tailer(I)=R".
 *   longjmp N   jumper(i) calls deep(i), which longjmps out for odd i: N entries,
 *               N/2 exits; prints "jumper(I)=R" or "jumper(I) longjmp".
 *   pthread_exit N  a thread calls quitter(i) i = 0..N-1; quitter(N-1) calls
 *               pthread_exit: N entries, N-1 exits; prints "quitter(I)=R".
 *   never       a thread calls forever(), which never returns; main prints
 *               "forever: entered" once it runs (the test uses hold).
 *   threads N   8 threads call per_thread(t, j), j = 0..N-1, all at once (barrier);
 *               prints "thread T sum=S" per thread.
 *   nap N       nap(i) sleeps 2 ms and returns 7*i; prints "nap(I)=R ns=D" with D
 *               the program's own CLOCK_MONOTONIC measure around the call.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile long sink;

__attribute__((noipa)) long helper(long x)
{
    return x * 3 + sink;
}

/* gcc 12 -O2: four ret instructions, one before the prologue (shrink-wrapped). */
__attribute__((noipa)) long classify(long x)
{
    if (x < 0)
        return -1;
    if (x == 0)
        return sink;
    long a = helper(x);
    if (a % 5 == 0)
        return a + x;
    long b = helper(a);
    if (b & 1)
        return b - x;
    return a + b + x;
}

__attribute__((noipa)) long rec(long n)
{
    if (n == 0)
        return 0;
    volatile long below = rec(n - 1);
    return below + n;
}

__attribute__((noipa)) long leaf_odd(long x) { return 3 * x + 1 + sink; }
__attribute__((noipa)) long leaf_even(long x) { return x / 2 + sink; }

__attribute__((noipa)) long tailer(long x)
{
    if (x & 1)
        return leaf_odd(x + 100);
    return leaf_even(x * 4);
}

static jmp_buf env;

__attribute__((noipa)) long deep(long i)
{
    if (i & 1)
        longjmp(env, 1);
    return i * 10 + sink;
}

__attribute__((noipa)) long jumper(long i)
{
    long r = deep(i);
    return r + 1;
}

static long quit_n;

__attribute__((noipa)) long quitter(long i)
{
    if (i == quit_n - 1)
        pthread_exit(NULL);
    return i * i + sink;
}

static void *quit_thread(void *arg)
{
    (void)arg;
    for (long i = 0; i < quit_n; i++)
        printf("quitter(%ld)=%ld\n", i, quitter(i));
    return NULL;
}

static volatile int entered;

__attribute__((noipa, noreturn)) void forever(void)
{
    entered = 1;
    for (;;) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
}

static void *forever_thread(void *arg)
{
    (void)arg;
    forever();
}

static pthread_barrier_t barrier;
static long per_n;
static long sums[8];

__attribute__((noipa)) long per_thread(long t, long j)
{
    if (j % 7 == 0)
        return t;
    return t * 1000 + j;
}

static void *worker(void *arg)
{
    long t = (long)arg, s = 0;
    pthread_barrier_wait(&barrier);
    for (long j = 0; j < per_n; j++)
        s += per_thread(t, j);
    sums[t] = s;
    return NULL;
}

__attribute__((noipa)) long nap(long i)
{
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, NULL);
    return 7 * i + sink;
}

static long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void hold(void)
{
    char buf[64];
    printf("retprobe: holding\n");
    fflush(stdout);
    while (read(0, buf, sizeof buf) > 0)
        ;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "multi";
    long n = argc > 2 ? atol(argv[2]) : 20;
    int do_hold = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "hold"))
            do_hold = 1;
        if (!strcmp(argv[i], "wait")) {
            char line[64];
            if (!fgets(line, sizeof line, stdin))
                return 3;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(mode, "multi")) {
        for (long i = -1; i < n - 1; i++)
            printf("classify(%ld)=%ld\n", i, classify(i));
    } else if (!strcmp(mode, "rec")) {
        printf("rec(%ld)=%ld\n", n, rec(n));
    } else if (!strcmp(mode, "tail")) {
        for (long i = 0; i < n; i++)
            printf("tailer(%ld)=%ld\n", i, tailer(i));
    } else if (!strcmp(mode, "longjmp")) {
        for (volatile long i = 0; i < n; i++) {
            if (setjmp(env) == 0)
                printf("jumper(%ld)=%ld\n", (long)i, jumper(i));
            else
                printf("jumper(%ld) longjmp\n", (long)i);
        }
    } else if (!strcmp(mode, "pthread_exit")) {
        pthread_t th;
        quit_n = n;
        pthread_create(&th, NULL, quit_thread, NULL);
        pthread_join(th, NULL);
    } else if (!strcmp(mode, "never")) {
        pthread_t th;
        pthread_create(&th, NULL, forever_thread, NULL);
        while (!entered) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        printf("forever: entered\n");
    } else if (!strcmp(mode, "threads")) {
        pthread_t th[8];
        per_n = n;
        pthread_barrier_init(&barrier, NULL, 8);
        for (long t = 0; t < 8; t++)
            pthread_create(&th[t], NULL, worker, (void *)t);
        for (long t = 0; t < 8; t++)
            pthread_join(th[t], NULL);
        for (long t = 0; t < 8; t++)
            printf("thread %ld sum=%ld\n", t, sums[t]);
    } else if (!strcmp(mode, "nap")) {
        for (long i = 0; i < n; i++) {
            long t0 = now_ns();
            long r = nap(i);
            long t1 = now_ns();
            printf("nap(%ld)=%ld ns=%ld\n", i, r, t1 - t0);
        }
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    if (do_hold)
        hold();
    return 0;
}
