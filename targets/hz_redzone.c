/* hz_redzone.c -- a leaf function that keeps live data in the red zone across
 * the probe point.
 *
 * Probe spec:  rz_leaf+0xa   (mid-body: after the two red-zone stores, before
 *              the reloads; `rz_leaf` itself works too)
 * Shape (asm, exact):
 *   +0x0  48 89 7c 24 f8    mov  %rdi,-0x8(%rsp)     ; red-zone store
 *   +0x5  48 89 74 24 f0    mov  %rsi,-0x10(%rsp)    ; red-zone store
 *   +0xa  48 8d 04 77       lea  (%rdi,%rsi,2),%rax  ; <- probe here
 *   +0xe  48 83 c0 01       add  $0x1,%rax
 *   +0x12 48 03 44 24 f8    add  -0x8(%rsp),%rax     ; reload
 *   +0x17 48 2b 44 24 f0    sub  -0x10(%rsp),%rax    ; reload
 *   +0x1c c3                ret
 *   rz_leaf(a, b) = 2a + b + 1.
 * Usage:       hz_redzone [K=100000]
 * Prints:      "redzone: K calls, sum=S"  (S = sum of rz_leaf(i, 3*i) = sum 5i+1)
 * Hazard:      a trampoline (or int3 path) that pushes onto the stack without first
 *              skipping the 128-byte red zone corrupts -8/-16(%rsp): the sum changes.
 * Expected:    optimized (region +0xa..+0x12: lea, add -- both relocatable).
 */
#include <stdio.h>
#include <stdlib.h>

long rz_leaf(long a, long b);
__asm__(
    ".text\n"
    ".globl rz_leaf\n.type rz_leaf,@function\n.p2align 4\n"
    "rz_leaf:\n.cfi_startproc\n"
    "  mov %rdi,-8(%rsp)\n"
    "  mov %rsi,-16(%rsp)\n"
    "  lea (%rdi,%rsi,2),%rax\n"
    "  add $1,%rax\n"
    "  add -8(%rsp),%rax\n"
    "  sub -16(%rsp),%rax\n"
    "  ret\n"
    ".cfi_endproc\n.size rz_leaf, .-rz_leaf\n");

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 100000;
    long sum = 0;
    for (long i = 0; i < k; i++)
        sum += rz_leaf(i, 3 * i);
    printf("redzone: %ld calls, sum=%ld\n", k, sum);
    return 0;
}
