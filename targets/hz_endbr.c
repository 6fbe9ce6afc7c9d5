/* hz_endbr.c -- an endbr64 at the function entry (CET / IBT).
 *
 * build-flags: -fcf-protection=full
 * Probe spec:  ebr      (lands at ebr+0x4, after the endbr64, like the kernel's
 *                        arch_adjust_kprobe_addr; hits report `ebr`)
 *              ebr+0x4  (the same site, spelled out)
 * Shape:       gcc 12 -O2 -fcf-protection=full:
 *   +0x0  f3 0f 1e fa        endbr64
 *   +0x4  48 8d 44 bf 03     lea  0x3(%rdi,%rdi,4),%rax   (region: exactly this)
 *   +0x9  c3                 ret
 *   ebr(x) = x * 5 + 3.
 * Usage:       hz_endbr [K=100000]
 * Prints:      "endbr: K calls, sum=S"   (S = sum of 5i + 3)
 * Hazard:      a jmp written over the endbr64 breaks indirect calls into the
 *              function under IBT (and moves the landing pad); ebr is also called
 *              through a function pointer here so an indirect call is exercised.
 * Expected:    optimized at ebr+0x4 (endbr64 kept in place).
 */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noipa)) long ebr(long x)
{
    return x * 5 + 3;
}

long (*volatile ebr_ptr)(long) = ebr;

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 100000;
    long sum = 0;
    for (long i = 0; i < k; i++)
        sum += (i & 1) ? ebr_ptr(i) : ebr(i);
    printf("endbr: %ld calls, sum=%ld\n", k, sum);
    return 0;
}
