/* hz_backedge.c -- a loop whose back-edge jumps into the first 5 bytes.
 *
 * Probe spec:  backedge
 * Shape (asm, exact):
 *   +0x0  31 c0        xor  %eax,%eax
 *   +0x2  48 01 f8     add  %rdi,%rax      ; <- jnz target: addr+2, inside the region
 *   +0x5  48 ff cf     dec  %rdi
 *   +0x8  75 f8        jne  +0x2
 *   +0xa  c3           ret
 *   backedge(n) = n + (n-1) + ... + 1 = n(n+1)/2   (n >= 1)
 * Usage:       hz_backedge [K=10000]
 * Prints:      "backedge: K calls, sum=S"  (S = sum over i=1..K of i(i+1)/2 mod 2^64)
 * Hazard:      a 5-byte jmp over +0..+5 would make the jne land in the middle of it.
 * Expected:    `backedge`: int3 (JUMP_INTO_RANGE: the jne at +0x8 targets +0x2).
 *              `backedge+0x5`: optimized (region = dec + jne, 5 bytes; the jne
 *              targets +0x2, outside the region: re-targeted as jne rel32).
 */
#include <stdio.h>
#include <stdlib.h>

long backedge(long n);
__asm__(
    ".text\n"
    ".globl backedge\n.type backedge,@function\n.p2align 4\n"
    "backedge:\n.cfi_startproc\n"
    "  xor %eax,%eax\n"
    "1: add %rdi,%rax\n"
    "  dec %rdi\n"
    "  jnz 1b\n"
    "  ret\n"
    ".cfi_endproc\n.size backedge, .-backedge\n");

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 10000;
    unsigned long sum = 0;
    for (long i = 1; i <= k; i++)
        sum += (unsigned long)backedge(i);
    printf("backedge: %ld calls, sum=%lu\n", k, sum);
    return 0;
}
