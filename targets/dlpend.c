/* dlpend.c -- dlopen/dlclose on command, for pending probes (tests/test_pending.py).
 *
 * Usage:   dlpend LIB_A LIB_B   (handsoff_liba.c and handsoff_libb.c: lib_fn each)
 * Probe:   libhandsoff_liba:lib_fn, given before LIB_A is loaded.
 * stdin:   one command per line, each answered by one line on stdout:
 *            open a | open b   dlopen(LIB_A or LIB_B) -> "opened a base=0x..."
 *            call N            N calls of the open library's lib_fn -> "called N sum=S"
 *            close             dlclose -> "closed"
 *          EOF ends the program ("dlpend: done").
 * Prints:  "dlpend: ready pid=P" first.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: dlpend LIB_A LIB_B\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("dlpend: ready pid=%d\n", (int)getpid());
    void *h = NULL;
    long (*fn)(long) = NULL;
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "open ", 5)) {
            const char *path = line[5] == 'a' ? argv[1] : argv[2];
            h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
            if (!h) {
                printf("error %s\n", dlerror());
                continue;
            }
            fn = (long (*)(long))dlsym(h, "lib_fn");
            Dl_info info;
            dladdr((void *)fn, &info);
            printf("opened %c base=%p\n", line[5], info.dli_fbase);
        } else if (!strncmp(line, "call ", 5) && fn) {
            long n = atol(line + 5), sum = 0;
            for (long i = 0; i < n; i++)
                sum += fn(i);
            printf("called %ld sum=%ld\n", n, sum);
        } else if (!strncmp(line, "close", 5) && h) {
            dlclose(h);
            h = NULL;
            fn = NULL;
            printf("closed\n");
        } else {
            printf("error bad command\n");
        }
    }
    printf("dlpend: done\n");
    return 0;
}
