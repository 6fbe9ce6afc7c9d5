/* hz_cmpimm.c -- RIP-relative operands followed by an immediate.
 *
 * Probe specs: cmp_imm8   cmp_imm32
 * Shapes (asm, exact):
 *   cmp_imm8:   83 3d <disp32> 05           cmpl $0x5,cmp_target(%rip)      (7 bytes)
 *               0f 94 c0                    sete %al
 *               0f b6 c0                    movzbl %al,%eax
 *               c3                          ret
 *   cmp_imm32:  81 3d <disp32> 45 23 01 00  cmpl $0x12345,cmp_target(%rip)  (10 bytes)
 *               0f 94 c0 / 0f b6 c0 / c3
 * Usage:       hz_cmpimm [K=100000]
 * Prints:      "cmpimm: K calls, five=F, big=B"  (F = #i with i%10 == 5,
 *              B = #i with i%10 == 7; cmp_target is set to 0x12345 for those)
 * Hazard:      disp32 is relative to the END of the instruction, i.e. after the
 *              immediate: a relocator that computes it from the end of the
 *              displacement field (or mis-sizes the imm) compares the wrong word.
 * Expected:    optimized (disp re-encoded), same output.
 */
#include <stdio.h>
#include <stdlib.h>

volatile int cmp_target;

int cmp_imm8(void);
int cmp_imm32(void);
__asm__(
    ".text\n"
    ".globl cmp_imm8\n.type cmp_imm8,@function\n.p2align 4\n"
    "cmp_imm8:\n.cfi_startproc\n"
    "  cmpl $5,cmp_target(%rip)\n  sete %al\n  movzbl %al,%eax\n  ret\n"
    ".cfi_endproc\n.size cmp_imm8, .-cmp_imm8\n"
    ".globl cmp_imm32\n.type cmp_imm32,@function\n.p2align 4\n"
    "cmp_imm32:\n.cfi_startproc\n"
    "  cmpl $0x12345,cmp_target(%rip)\n  sete %al\n  movzbl %al,%eax\n  ret\n"
    ".cfi_endproc\n.size cmp_imm32, .-cmp_imm32\n");

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 100000;
    long five = 0, big = 0;
    for (long i = 0; i < k; i++) {
        cmp_target = i % 10 == 7 ? 0x12345 : (int)(i % 10);
        five += cmp_imm8();
        big += cmp_imm32();
    }
    printf("cmpimm: %ld calls, five=%ld, big=%ld\n", k, five, big);
    return 0;
}
