/* hz_short.c -- functions shorter than 5 bytes, packed back to back.
 *
 * Probe specs: tiny1   tiny3   (and `after_tiny` as a normal control)
 * Shape (asm, exact, no padding between them):
 *   tiny1:      c3              ret                 (1 byte)
 *   tiny3:      89 f8           mov %edi,%eax ; c3 ret   (3 bytes)
 *   after_tiny: 48 8d 47 07     lea 0x7(%rdi),%rax ; c3 ret
 *   tiny3(x) = (int)x, after_tiny(x) = x + 7.
 * Usage:       hz_short [K=100000]
 * Prints:      "short: K calls, sum=S"  (S = sum of tiny3(i) + after_tiny(i))
 * Hazard:      a 5-byte jmp at tiny1 or tiny3 would overwrite the next function
 *              (the region runs past a `ret` and out of the symbol).
 * Expected:    tiny1, tiny3: int3 (region would leave the function);
 *              after_tiny: optimized (lea + ret = 5 bytes, ends the function -- or
 *              int3 if the optimizer refuses a region containing ret).
 */
#include <stdio.h>
#include <stdlib.h>

void tiny1(void);
int tiny3(int x);
long after_tiny(long x);
__asm__(
    ".text\n.p2align 4\n"
    ".globl tiny1\n.type tiny1,@function\n"
    "tiny1:\n.cfi_startproc\n  ret\n.cfi_endproc\n.size tiny1, .-tiny1\n"
    ".globl tiny3\n.type tiny3,@function\n"
    "tiny3:\n.cfi_startproc\n  mov %edi,%eax\n  ret\n.cfi_endproc\n.size tiny3, .-tiny3\n"
    ".globl after_tiny\n.type after_tiny,@function\n"
    "after_tiny:\n.cfi_startproc\n  lea 7(%rdi),%rax\n  ret\n.cfi_endproc\n"
    ".size after_tiny, .-after_tiny\n");

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 100000;
    long sum = 0;
    for (long i = 0; i < k; i++) {
        tiny1();
        sum += tiny3((int)i) + after_tiny(i);
    }
    printf("short: %ld calls, sum=%ld\n", k, sum);
    return 0;
}
