/* hz_goto.c -- a computed goto (indirect jmp) to a label inside the first 5 bytes.
 *
 * Probe spec:  cgoto
 * Shape (asm, exact):
 *   +0x0  31 c0                 xor  %eax,%eax
 *   +0x2  48 83 c0 03     L:    add  $0x3,%rax      ; label inside the region
 *   +0x6  48 ff cf              dec  %rdi
 *   +0x9  74 09                 je   done
 *   +0xb  48 8d 0d f0 ff ff ff  lea  L(%rip),%rcx   ; the label's address taken
 *   +0x12 ff e1                 jmp  *%rcx          ; indirect jump back to +0x2
 *   +0x14 c3              done: ret
 *   cgoto(n) = 3n  (n >= 1).  (C's `goto *&&label` gives gcc freedom over the
 *   layout, so this is asm; a C version would be equivalent for the analysis.)
 * Usage:       hz_goto [K=10000]
 * Prints:      "goto: K calls, sum=S"  (S = sum of 3i for i = 1..K)
 * Hazard:      the jump target is only known at run time; a direct-branch scan
 *              finds nothing targeting +0x2.
 * Expected:    int3 (INDIRECT_JUMP in the function).
 */
#include <stdio.h>
#include <stdlib.h>

long cgoto(long n);
__asm__(
    ".text\n"
    ".globl cgoto\n.type cgoto,@function\n.p2align 4\n"
    "cgoto:\n.cfi_startproc\n"
    "  xor %eax,%eax\n"
    "1: add $3,%rax\n"
    "  dec %rdi\n"
    "  je 2f\n"
    "  lea 1b(%rip),%rcx\n"
    "  jmp *%rcx\n"
    "2: ret\n"
    ".cfi_endproc\n.size cgoto, .-cgoto\n");

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 10000;
    long sum = 0;
    for (long i = 1; i <= k; i++)
        sum += cgoto(i);
    printf("goto: %ld calls, sum=%ld\n", k, sum);
    return 0;
}
