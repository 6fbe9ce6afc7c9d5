/* handsoff.c -- targets for hands-off tracing (tests/test_handsoff.py).
 *
 * Probe spec:  probed      (long probed(long a, long b): a*3 + b; the tests pass the
 *                           calling thread's tid as `a` where they check records)
 * Usage:
 *   handsoff spin N        N threads call probed() without pause; a SIGRTMIN+1
 *                          handler counts signals.  stdin: 'p' pause (every thread
 *                          parks; prints "paused calls=C sigs=S"), 'r' resume,
 *                          'q' quit (prints "done calls=C sigs=S").
 *   handsoff zombie N      as spin, but the main thread calls pthread_exit() first
 *                          (a zombie group leader); a worker reads stdin.
 *   handsoff tids T K      T threads one after another (each joined before the next:
 *                          glibc reuses the same stack and TLS block), each calling
 *                          probed(its tid, i) K times; waits for 'g' on stdin first,
 *                          prints "tids: T x K" then holds until 'q'.
 *   handsoff dl A B        dlopen(A), call its lib_fn() until 's' on stdin; then
 *                          dlclose(A), dlopen(B) (usually mapped at the same address:
 *                          prints "swapped same=1"), call B's lib_fn until 'q'.
 *   handsoff strict N      seccomp strict mode, waits for 'g' on stdin, then N calls
 *                          of probed() (strict mode allows read/write/exit only), prints
 *                          "strict: N calls, sum=S" and exits 0.
 *   handsoff nommap        a seccomp filter killing the process on mmap(2), then
 *                          as spin 1 (stdin 'p', 'r', 'q').
 * Every mode prints "ready pid=P" once it is running.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noipa)) long probed(long a, long b)
{
    return a * 3 + b;
}

static atomic_long calls, sigs;
static atomic_int paused, quit, parked;
static int nthreads;

static void on_sig(int sig)
{
    (void)sig;
    atomic_fetch_add(&sigs, 1);
}

static void *spinner(void *arg)
{
    (void)arg;
    long sum = 0;
    while (!atomic_load(&quit)) {
        if (atomic_load(&paused)) {
            atomic_fetch_add(&parked, 1);
            while (atomic_load(&paused) && !atomic_load(&quit))
                usleep(1000);
            atomic_fetch_sub(&parked, 1);
            continue;
        }
        sum += probed(1, sum & 7);
        atomic_fetch_add(&calls, 1);
    }
    return (void *)sum;
}

static void control_loop(void)
{
    char c;
    while (read(0, &c, 1) == 1) {
        if (c == 'p') {
            atomic_store(&paused, 1);
            while (atomic_load(&parked) < nthreads)
                usleep(1000);
            printf("paused calls=%ld sigs=%ld\n", atomic_load(&calls), atomic_load(&sigs));
            fflush(stdout);
        } else if (c == 'r') {
            atomic_store(&paused, 0);
        } else if (c == 'q') {
            break;
        }
    }
    atomic_store(&quit, 1);
}

static pthread_t *start_spinners(int n)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sig;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGRTMIN + 1, &sa, NULL);
    nthreads = n;
    pthread_t *th = calloc(n, sizeof *th);
    for (int i = 0; i < n; i++)
        pthread_create(&th[i], NULL, spinner, NULL);
    return th;
}

static int mode_spin(int n)
{
    pthread_t *th = start_spinners(n);
    printf("ready pid=%d\n", getpid());
    fflush(stdout);
    control_loop();
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    printf("done calls=%ld sigs=%ld\n", atomic_load(&calls), atomic_load(&sigs));
    return 0;
}

static void *zombie_control(void *arg)
{
    pthread_t *th = arg;
    control_loop();
    for (int i = 0; i < nthreads; i++)
        pthread_join(th[i], NULL);
    printf("done calls=%ld sigs=%ld\n", atomic_load(&calls), atomic_load(&sigs));
    fflush(stdout);
    exit(0);
}

static int mode_zombie(int n)
{
    pthread_t *th = start_spinners(n);
    pthread_t ctl;
    pthread_create(&ctl, NULL, zombie_control, th);
    printf("ready pid=%d\n", getpid());
    fflush(stdout);
    pthread_exit(NULL);
}

static long tids_k;

static void *tid_worker(void *arg)
{
    (void)arg;
    long tid = syscall(SYS_gettid), sum = 0;
    for (long i = 0; i < tids_k; i++)
        sum += probed(tid, i);
    return (void *)sum;
}

static int mode_tids(int t, long k)
{
    char c;
    tids_k = k;
    printf("ready pid=%d\n", getpid());
    fflush(stdout);
    if (read(0, &c, 1) != 1)
        return 1;
    for (int i = 0; i < t; i++) {
        pthread_t th;
        pthread_create(&th, NULL, tid_worker, NULL);
        pthread_join(th, NULL);
    }
    printf("tids: %d x %ld\n", t, k);
    fflush(stdout);
    while (read(0, &c, 1) == 1 && c != 'q')
        ;
    return 0;
}

struct lib_loop { long (*fn)(long); atomic_int stop; long sum; };

static void *lib_caller(void *arg)
{
    struct lib_loop *l = arg;
    while (!atomic_load(&l->stop)) {
        l->sum += l->fn(l->sum & 15);
        usleep(100);
    }
    return NULL;
}

static int run_lib(const char *path, void **handle, char until)
{
    *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!*handle) {
        fprintf(stderr, "dlopen %s: %s\n", path, dlerror());
        return -1;
    }
    struct lib_loop l = {.fn = (long (*)(long))dlsym(*handle, "lib_fn")};
    pthread_t th;
    pthread_create(&th, NULL, lib_caller, &l);
    if (until == 's') {
        printf("ready pid=%d\n", getpid());
        fflush(stdout);
    }
    char c;
    while (read(0, &c, 1) == 1 && c != until)
        ;
    atomic_store(&l.stop, 1);
    pthread_join(th, NULL);
    return 0;
}

static int mode_dl(const char *a, const char *b)
{
    void *ha, *hb;
    Dl_info info;
    if (run_lib(a, &ha, 's') < 0)
        return 1;
    dladdr(dlsym(ha, "lib_fn"), &info);
    void *base_a = info.dli_fbase;
    dlclose(ha);
    void *h = dlopen(b, RTLD_NOW | RTLD_LOCAL);
    dladdr(dlsym(h, "lib_fn"), &info);
    printf("swapped same=%d\n", info.dli_fbase == base_a);
    fflush(stdout);
    dlclose(h);
    return run_lib(b, &hb, 'q') < 0;
}

static int mode_strict(long n)
{
    char buf[96];
    long sum = 0;
    int len = snprintf(buf, sizeof buf, "ready pid=%d\n", getpid());
    fflush(stdout);
    write(1, buf, len);
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT);
    char c;
    if (read(0, &c, 1) != 1)       /* 'g': go (read(2) is allowed in strict mode) */
        syscall(SYS_exit, 1);
    for (long i = 0; i < n; i++)
        sum += probed(i, 1);
    len = snprintf(buf, sizeof buf, "strict: %ld calls, sum=%ld\n", n, sum);
    write(1, buf, len);
    syscall(SYS_exit, 0);       /* exit_group is not allowed in strict mode */
    return 0;
}

static int mode_nommap(void)
{
    struct sock_filter prog[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mmap, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog fprog = {.len = sizeof prog / sizeof prog[0], .filter = prog};
    pthread_t *th = start_spinners(1);   /* threads first: they need mmap for stacks */
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fprog)) {
        perror("seccomp");
        return 1;
    }
    printf("ready pid=%d\n", getpid());
    fflush(stdout);
    control_loop();
    pthread_join(th[0], NULL);
    printf("done calls=%ld sigs=%ld\n", atomic_load(&calls), atomic_load(&sigs));
    return 0;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "spin";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(mode, "spin"))
        return mode_spin(argc > 2 ? atoi(argv[2]) : 1);
    if (!strcmp(mode, "zombie"))
        return mode_zombie(argc > 2 ? atoi(argv[2]) : 2);
    if (!strcmp(mode, "tids"))
        return mode_tids(argc > 2 ? atoi(argv[2]) : 50, argc > 3 ? atol(argv[3]) : 10);
    if (!strcmp(mode, "dl") && argc > 3)
        return mode_dl(argv[2], argv[3]);
    if (!strcmp(mode, "strict"))
        return mode_strict(argc > 2 ? atol(argv[2]) : 1000000);
    if (!strcmp(mode, "nommap"))
        return mode_nommap();
    fprintf(stderr, "usage: handsoff spin|zombie|tids|dl|strict|nommap ...\n");
    return 2;
}
