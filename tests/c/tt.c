/* Test target for tests/test_target.py.  Usage: tt MODE [ARG].  Prints "ready" (and
 * some facts) once set up; "go" lines are read from stdin where a mode waits. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long counters[256];

__attribute__((noinline)) int unused_fn(int x) { return x * 7 + 3; }

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static void wait_go(void) {       /* block until a line arrives on stdin (or EOF) */
    char buf[64];
    if (!fgets(buf, sizeof buf, stdin)) exit(0);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *worker(void *arg) {   /* even: spin, odd: sleep 1 ms in a loop */
    long i = (long)arg;
    for (;;) {
        counters[i]++;
        if (i & 1) usleep(1000);
    }
    return NULL;
}

static void start_workers(int n) {
    for (long i = 0; i < n; i++) {
        pthread_t t;
        pthread_create(&t, NULL, worker, (void *)i);
    }
}

static int mode_threads(int n) {
    start_workers(n);
    say("ready fn=%p\n", (void *)unused_fn);
    wait_go();
    return 0;
}

static void *short_lived(void *arg) { (void)arg; usleep(500); return NULL; }

static __attribute__((noreturn)) int mode_churn(void) {      /* a new short-lived thread every ~1 ms, forever */
    say("ready\n");
    for (;;) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        pthread_create(&t, &a, short_lived, NULL);
        usleep(1000);
    }
}

static void *reader(void *arg) {
    char buf[64] = {0};
    (void)arg;
    ssize_t rc = read(0, buf, sizeof buf - 1);
    say("READ rc=%zd errno=%d data=%s", rc, rc < 0 ? errno : 0, buf);
    return NULL;
}

static void *sleeper(void *arg) {
    struct timespec ts = {1, 500000000};    /* 1.5 s */
    double t0 = now();
    (void)arg;
    int rc = nanosleep(&ts, NULL);
    say("SLEEP rc=%d errno=%d elapsed=%.3f\n", rc, rc ? errno : 0, now() - t0);
    return NULL;
}

static int mode_block(void) {
    pthread_t a, b;
    pthread_create(&a, NULL, reader, NULL);
    pthread_create(&b, NULL, sleeper, NULL);
    say("ready\n");
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    return 0;
}

static volatile sig_atomic_t usr1, usr2;
static void on_usr1(int s) { (void)s; usr1++; write(1, "u", 1); }
static void on_usr2(int s) { (void)s; usr2 = 1; }

static int mode_sigcount(void) {
    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    start_workers(2);
    say("ready\n");
    while (!usr2) usleep(1000);   /* not pause(): a worker may take the signal */
    say("\ncount=%d\n", (int)usr1);
    return 0;
}

static int mode_fork(void) {
    say("ready\n");
    wait_go();
    pid_t c = fork();
    if (c == 0) {
        say("child ok\n");
        _exit(0);
    }
    int st;
    waitpid(c, &st, 0);
    say("child exited=%d code=%d\n", WIFEXITED(st), WEXITSTATUS(st));
    return 0;
}

static volatile sig_atomic_t trapped;
static void on_trap(int s) { (void)s; trapped++; }

static int mode_int3(void) {
    signal(SIGTRAP, on_trap);
    say("ready\n");
    wait_go();
    __asm__ volatile("int3");
    say("handled=%d\n", (int)trapped);
    return 0;
}

static int mode_exit(int code) {
    say("ready\n");
    wait_go();
    return code;
}

static int mode_vfork(int trap) {   /* vfork child (optionally int3 first) execs sh */
    say("ready\n");
    wait_go();
    pid_t c = vfork();
    if (c == 0) {
        if (trap) __asm__ volatile("int3");
        execl("/bin/sh", "sh", "-c", "exit 4", (char *)NULL);
        _exit(127);
    }
    int st;
    waitpid(c, &st, 0);
    say("vfork child code=%d\n", WEXITSTATUS(st));
    return 0;
}

static void *execer(void *arg) {
    (void)arg;
    execl("/bin/sh", "sh", "-c", "exit 6", (char *)NULL);
    return NULL;
}

static int mode_exec(int from_thread) {
    start_workers(3);
    say("ready\n");
    wait_go();
    if (!from_thread) execer(NULL);
    pthread_t t;
    pthread_create(&t, NULL, execer, NULL);
    pthread_join(t, NULL);
    return 1;
}

static int mode_zombie_leader(int wait) {   /* main thread exits, workers go on */
    start_workers(3);
    say("ready\n");
    if (wait) wait_go();
    pthread_exit(NULL);
}

static int mode_int3loop(int n) {   /* n bare int3s: the tracer must swallow them */
    say("ready\n");
    wait_go();
    for (int i = 0; i < n; i++) __asm__ volatile("int3");
    say("done %d\n", n);
    return 0;
}

static pthread_barrier_t barrier;
static int loops;
static void *int3er(void *arg) {
    (void)arg;
    pthread_barrier_wait(&barrier);
    for (int i = 0; i < loops; i++) __asm__ volatile("int3");
    return NULL;
}

static int mode_int3threads(int n) {   /* n threads x 200 int3s, all at once */
    pthread_t t[256];
    loops = 200;
    pthread_barrier_init(&barrier, NULL, n + 1);
    for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, int3er, NULL);
    say("ready\n");
    wait_go();
    pthread_barrier_wait(&barrier);
    for (int i = 0; i < n; i++) pthread_join(t[i], NULL);
    say("done %d\n", n * loops);
    return 0;
}

int main(int argc, char **argv) {
    const char *m = argc > 1 ? argv[1] : "";
    int arg = argc > 2 ? atoi(argv[2]) : 0;
    if (!strcmp(m, "threads")) return mode_threads(arg);
    if (!strcmp(m, "churn")) return mode_churn();
    if (!strcmp(m, "block")) return mode_block();
    if (!strcmp(m, "sigcount")) return mode_sigcount();
    if (!strcmp(m, "fork")) return mode_fork();
    if (!strcmp(m, "int3")) return mode_int3();
    if (!strcmp(m, "exit")) return mode_exit(arg);
    if (!strcmp(m, "int3loop")) return mode_int3loop(arg);
    if (!strcmp(m, "int3threads")) return mode_int3threads(arg);
    if (!strcmp(m, "vfork")) return mode_vfork(arg);
    if (!strcmp(m, "exec")) return mode_exec(arg);
    if (!strcmp(m, "zombie_leader")) return mode_zombie_leader(arg);
    fprintf(stderr, "unknown mode %s\n", m);
    return 99;
}
