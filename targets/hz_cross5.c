/* hz_cross5.c -- instructions that cross byte 5 of the region.
 *
 * Probe specs: cross5     (region = xor + movabs = 12 bytes)
 *              cross5b    (region = mov + movabs = 13 bytes)
 * Shapes (asm, exact):
 *   cross5:   +0x0 31 d2                         xor %edx,%edx
 *             +0x2 48 b8 88 77 66 55 44 33 22 11 movabs $0x1122334455667788,%rax
 *             +0xc 48 01 f8                      add %rdi,%rax
 *             +0xf 48 01 d0                      add %rdx,%rax
 *             +0x12 c3                           ret
 *   cross5b:  +0x0 48 89 fa                      mov %rdi,%rdx
 *             +0x3 48 b8 <imm64>                 movabs $0x0102030405060708,%rax
 *             +0xd 48 29 d0                      sub %rdx,%rax
 *             +0x10 c3                           ret
 * Usage:       hz_cross5 [K=100000]
 * Prints:      "cross5: K calls, sum=S"  (S = sum of cross5(i) - cross5b(i), mod 2^64)
 * Hazard:      the 5-byte jmp ends inside the movabs; the whole instruction (not
 *              just 5 bytes) must be copied, and the tail bytes 5..12 restored as a
 *              unit on unoptimize.
 * Expected:    optimized (12- and 13-byte regions).
 */
#include <stdio.h>
#include <stdlib.h>

long cross5(long x);
long cross5b(long x);
__asm__(
    ".text\n"
    ".globl cross5\n.type cross5,@function\n.p2align 4\n"
    "cross5:\n.cfi_startproc\n"
    "  xor %edx,%edx\n  movabs $0x1122334455667788,%rax\n  add %rdi,%rax\n"
    "  add %rdx,%rax\n  ret\n"
    ".cfi_endproc\n.size cross5, .-cross5\n"
    ".globl cross5b\n.type cross5b,@function\n.p2align 4\n"
    "cross5b:\n.cfi_startproc\n"
    "  mov %rdi,%rdx\n  movabs $0x0102030405060708,%rax\n  sub %rdx,%rax\n  ret\n"
    ".cfi_endproc\n.size cross5b, .-cross5b\n");

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 100000;
    unsigned long sum = 0;
    for (long i = 0; i < k; i++)
        sum += (unsigned long)cross5(i) - (unsigned long)cross5b(i);
    printf("cross5: %ld calls, sum=%lu\n", k, sum);
    return 0;
}
