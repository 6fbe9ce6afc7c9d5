/* hz_syscall.c -- a thread blocked in a syscall whose instruction is inside the
 * probed region.
 *
 * Probe specs: park_read       (syscall is the LAST instruction of the region)
 *              park_read_mid   (syscall in the MIDDLE of the region)
 * Shapes (asm, exact):
 *   park_read:      +0x0 31 c0  xor %eax,%eax     ; SYS_read
 *                   +0x2 90     nop
 *                   +0x3 0f 05  syscall           ; region = +0x0..+0x5
 *                   +0x5 c3     ret
 *   park_read_mid:  +0x0 31 c0  xor %eax,%eax
 *                   +0x2 0f 05  syscall
 *                   +0x4 48 89 c0  mov %rax,%rax  ; region = +0x0..+0x7
 *                   +0x7 c3     ret
 * Behaviour:   a "reader" thread blocks in park_read(0, buf, n) reading stdin
 *              until EOF; main calls park_read and park_read_mid K times each on
 *              /dev/zero (8 bytes), sleeping SLEEP_US between batches of 100 if
 *              given, then joins the reader.
 * Usage:       hz_syscall [K=1000] [SLEEP_US]   (stdin: a pipe the test controls)
 * Prints:      "syscall: K+K zero reads, stdin N bytes"
 * Hazard:      the blocked reader's rip is park_read+0x5 (region end), but while
 *              it is interrupted rax = -ERESTARTSYS and the kernel restarts the
 *              syscall by rewinding rip by 2, to park_read+0x3: INSIDE the region.
 *              Patching then would resume it in the middle of our jmp.  For
 *              park_read_mid a blocked thread sits at +0x4, strictly inside.
 * Expected:    park_read: int3 while the reader is blocked (THREAD_IN_RANGE,
 *              deferred), optimized after it exits (EOF on stdin);
 *              park_read_mid: int3 (syscall not last in region) or deferred.
 *              Hit counts: park_read = K + reader's read calls, park_read_mid = K.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

long park_read(long fd, void *buf, long n);
long park_read_mid(long fd, void *buf, long n);
__asm__(
    ".text\n"
    ".globl park_read\n.type park_read,@function\n.p2align 4\n"
    "park_read:\n.cfi_startproc\n"
    "  xor %eax,%eax\n  nop\n  syscall\n  ret\n"
    ".cfi_endproc\n.size park_read, .-park_read\n"
    ".globl park_read_mid\n.type park_read_mid,@function\n.p2align 4\n"
    "park_read_mid:\n.cfi_startproc\n"
    "  xor %eax,%eax\n  syscall\n  mov %rax,%rax\n  ret\n"
    ".cfi_endproc\n.size park_read_mid, .-park_read_mid\n");

static long stdin_bytes;

static void *reader(void *arg)
{
    (void)arg;
    char buf[256];
    long n;
    while ((n = park_read(0, buf, sizeof buf)) > 0 || n == -4 /* EINTR */)
        if (n > 0)
            stdin_bytes += n;
    return NULL;
}

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 1000;
    long sleep_us = argc > 2 ? atol(argv[2]) : -1;
    pthread_t t;
    pthread_create(&t, NULL, reader, NULL);
    int zfd = open("/dev/zero", O_RDONLY);
    char buf[8];
    long ok = 0, ok_mid = 0;
    for (long i = 0; i < k; i++) {
        ok += park_read(zfd, buf, sizeof buf) == 8;
        ok_mid += park_read_mid(zfd, buf, sizeof buf) == 8;
        if (sleep_us >= 0 && i % 100 == 99)
            usleep(sleep_us);
    }
    pthread_join(t, NULL);
    printf("syscall: %ld+%ld zero reads, stdin %ld bytes\n", ok, ok_mid, stdin_bytes);
    return 0;
}
