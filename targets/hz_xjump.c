/* hz_xjump.c -- a direct jump from ANOTHER function into the bytes after an entry.
 *
 * Probe spec:  entry5   (its first two instructions are 3 + 3 bytes: a 5-byte jump
 *              fits exactly and the function itself has no branch at all)
 * Usage:       hz_xjump [N=1000]
 *   N calls of entry5(i) and N of other(i); other() does its own work and then
 *   `jmp inner`, the label 3 bytes into entry5, like glibc's hand-written string
 *   functions that share tails.
 * Prints:      "hz_xjump: N calls, sum=S"   (S depends only on N)
 * Hazard:      a jump-optimized probe at entry5 would overwrite `inner`: other()
 *              would jump into the middle of our jmp rel32.  The module-wide branch
 *              index must refuse it, naming the jmp in other().
 */
#include <stdio.h>
#include <stdlib.h>

long entry5(long x);
long other(long x);

__asm__(
    ".text\n"
    ".globl entry5\n.type entry5, @function\n"
    "entry5:\n"
    "    mov %rdi, %rax\n"        /* 48 89 f8: 3 bytes */
    "inner:\n"
    "    add $1, %eax\n"          /* 83 c0 01: 3 bytes, starts inside entry5's first 5 */
    "    add $2, %rax\n"
    "    ret\n"
    ".size entry5, .-entry5\n"
    ".globl other\n.type other, @function\n"
    "other:\n"
    "    lea 100(%rdi), %rax\n"
    "    jmp inner\n"
    ".size other, .-other\n");

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000;
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += entry5(i) + other(i);
    printf("hz_xjump: %ld calls, sum=%ld\n", n, sum);
    return 0;
}
