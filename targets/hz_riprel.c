/* hz_riprel.c -- RIP-relative loads/stores at function entry, incl. AVX (VEX).
 *
 * Probe specs: rip_load   rip_store   avx_load
 * Shapes (asm, exact):
 *   rip_load:  48 8b 05 <disp32>       mov  rip_table(%rip),%rax   (7 bytes)
 *              48 01 f8                add  %rdi,%rax
 *              c3                      ret
 *   rip_store: 48 89 3d <disp32>       mov  %rdi,rip_slot(%rip)    (7 bytes)
 *              48 8d 47 01             lea  0x1(%rdi),%rax
 *              c3                      ret
 *   avx_load:  c5 fe 6f 05 <disp32>    vmovdqu rip_vec(%rip),%ymm0 (8 bytes, VEX)
 *              c5 fe 7f 07             vmovdqu %ymm0,(%rdi)
 *              c5 f8 77                vzeroupper
 *              48 8b 07                mov  (%rdi),%rax
 *              48 03 47 18             add  0x18(%rdi),%rax
 *              c3                      ret
 *   (avx_load is written in asm so the shape is exact; it is only called when the
 *   CPU has AVX2 -- __builtin_cpu_supports -- otherwise "avx: skipped" is printed)
 * Usage:       hz_riprel [K=100000]
 * Prints:      "riprel: K calls, load=L, slot=V"      (L = sum over i < K of i + 1000, V = K-1)
 *              "avx: K calls, sum=A"                   (A = K * (1 + 4))
 * Hazard:      a copied instruction whose disp32 is not re-encoded for the detour
 *              address reads/writes the wrong memory (or faults); VEX encodings must
 *              be decoded and patched at the right byte.
 * Expected:    optimized for all three (disp re-encoded), or int3 with
 *              RIPREL_OUT_OF_RANGE if no detour page within +-2 GiB of the data.
 */
#include <stdio.h>
#include <stdlib.h>

long rip_table[4] = {1000, 2000, 3000, 4000};
long rip_slot;
long rip_vec[4] __attribute__((aligned(32))) = {1, 2, 3, 4};

long rip_load(long x);
long rip_store(long x);
long avx_load(long *out);
__asm__(
    ".text\n"
    ".globl rip_load\n.type rip_load,@function\n.p2align 4\n"
    "rip_load:\n.cfi_startproc\n"
    "  mov rip_table(%rip),%rax\n"
    "  add %rdi,%rax\n"
    "  ret\n"
    ".cfi_endproc\n.size rip_load, .-rip_load\n"
    ".globl rip_store\n.type rip_store,@function\n.p2align 4\n"
    "rip_store:\n.cfi_startproc\n"
    "  mov %rdi,rip_slot(%rip)\n"
    "  lea 1(%rdi),%rax\n"
    "  ret\n"
    ".cfi_endproc\n.size rip_store, .-rip_store\n"
    ".globl avx_load\n.type avx_load,@function\n.p2align 4\n"
    "avx_load:\n.cfi_startproc\n"
    "  vmovdqu rip_vec(%rip),%ymm0\n"
    "  vmovdqu %ymm0,(%rdi)\n"
    "  vzeroupper\n"
    "  mov (%rdi),%rax\n"
    "  add 24(%rdi),%rax\n"
    "  ret\n"
    ".cfi_endproc\n.size avx_load, .-avx_load\n");

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 100000;
    long load = 0;
    for (long i = 0; i < k; i++) {
        load += rip_load(i);
        rip_store(i);
    }
    printf("riprel: %ld calls, load=%ld, slot=%ld\n", k, load, rip_slot);
    if (__builtin_cpu_supports("avx2")) {
        long out[4] __attribute__((aligned(32)));
        long sum = 0;
        for (long i = 0; i < k; i++)
            sum += avx_load(out);
        printf("avx: %ld calls, sum=%ld\n", k, sum);
    } else {
        printf("avx: skipped\n");
    }
    return 0;
}
