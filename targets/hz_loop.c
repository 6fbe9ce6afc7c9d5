/* hz_loop.c -- `loop` and `jrcxz` (rel8-only branches) in the region.
 *
 * Probe specs: loopsum+0x5   (region = add + loop: the `loop` must be rewritten,
 *                             e.g. dec rcx; jnz rel32 without touching flags --
 *                             `loop` does not modify flags -- or refused)
 *              loopsum       (region = mov + xor; the loop targets +0x5, the
 *                             region end: not strictly inside -> optimizable)
 *              jrcxz_first   (region = mov + jrcxz, jrcxz leaves the region)
 * Shapes (asm, exact):
 *   loopsum:      +0x0 48 89 f9  mov %rdi,%rcx
 *                 +0x3 31 c0     xor %eax,%eax
 *                 +0x5 48 01 c8  add %rcx,%rax
 *                 +0x8 e2 fb     loop +0x5
 *                 +0xa c3        ret
 *   jrcxz_first:  +0x0 48 89 f9  mov %rdi,%rcx
 *                 +0x3 e3 05     jrcxz +0xa
 *                 +0x5 48 8d 41 01  lea 0x1(%rcx),%rax
 *                 +0x9 c3        ret
 *                 +0xa 48 c7 c0 ff ff ff ff  mov $-1,%rax
 *                 +0x11 c3       ret
 *   loopsum(n) = n(n+1)/2 (n >= 1); jrcxz_first(0) = -1, else x + 1.
 * Usage:       hz_loop [K=10000]
 * Prints:      "loop: K calls, sum=S, jrcxz=J"
 *              (S = sum of i(i+1)/2 for i = 1..K, J = sum of jrcxz_first(i % 5))
 * Hazard:      loop/jrcxz exist only with rel8: they cannot be copied to a far
 *              detour as is.
 * Expected:    loopsum: optimized; loopsum+0x5: optimized with a rewrite, or int3
 *              with the instruction named; jrcxz_first: same.
 */
#include <stdio.h>
#include <stdlib.h>

long loopsum(long n);
long jrcxz_first(long x);
__asm__(
    ".text\n"
    ".globl loopsum\n.type loopsum,@function\n.p2align 4\n"
    "loopsum:\n.cfi_startproc\n"
    "  mov %rdi,%rcx\n  xor %eax,%eax\n"
    "1: add %rcx,%rax\n  loop 1b\n  ret\n"
    ".cfi_endproc\n.size loopsum, .-loopsum\n"
    ".globl jrcxz_first\n.type jrcxz_first,@function\n.p2align 4\n"
    "jrcxz_first:\n.cfi_startproc\n"
    "  mov %rdi,%rcx\n  jrcxz 1f\n  lea 1(%rcx),%rax\n  ret\n"
    "1: mov $-1,%rax\n  ret\n"
    ".cfi_endproc\n.size jrcxz_first, .-jrcxz_first\n");

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 10000;
    unsigned long sum = 0;
    long j = 0;
    for (long i = 1; i <= k; i++) {
        sum += (unsigned long)loopsum(i);
        j += jrcxz_first(i % 5);
    }
    printf("loop: %ld calls, sum=%lu, jrcxz=%ld\n", k, sum, j);
    return 0;
}
