/* hz_rel8.c -- a rel8 conditional branch inside the region, leaving it.
 *
 * Probe spec:  rel8_out
 * Shape (asm, exact):
 *   +0x0  48 85 ff        test %rdi,%rdi
 *   +0x3  74 06           je   +0xb            ; rel8, leaves the region
 *   +0x5  48 8d 44 3f 01  lea  0x1(%rdi,%rdi,1),%rax
 *   +0xa  c3              ret
 *   +0xb  48 c7 c0 ff ff ff ff  mov $-1,%rax
 *   +0x12 c3              ret
 *   rel8_out(0) = -1, rel8_out(x) = 2x + 1 otherwise.
 * Usage:       hz_rel8 [K=100000]
 * Prints:      "rel8: K calls, zeros=Z, sum=S"  (Z = number of i % 4 == 0 -> -1)
 * Hazard:      the relocated je must be widened to jcc rel32 and still reach the
 *              original target; a copied rel8 would jump into the detour page.
 * Expected:    optimized (region = test + je, exactly 5 bytes).
 */
#include <stdio.h>
#include <stdlib.h>

long rel8_out(long x);
__asm__(
    ".text\n"
    ".globl rel8_out\n.type rel8_out,@function\n.p2align 4\n"
    "rel8_out:\n.cfi_startproc\n"
    "  test %rdi,%rdi\n"
    "  je 1f\n"
    "  lea 1(%rdi,%rdi),%rax\n"
    "  ret\n"
    "1: mov $-1,%rax\n"
    "  ret\n"
    ".cfi_endproc\n.size rel8_out, .-rel8_out\n");

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 100000;
    long sum = 0, zeros = 0;
    for (long i = 0; i < k; i++) {
        long r = rel8_out(i % 4 == 0 ? 0 : i);
        zeros += r == -1;
        sum += r;
    }
    printf("rel8: %ld calls, zeros=%ld, sum=%ld\n", k, zeros, sum);
    return 0;
}
