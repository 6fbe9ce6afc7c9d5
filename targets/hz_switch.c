/* hz_switch.c -- a dense switch compiled to a jump table (indirect jmp).
 *
 * build-flags: -fcf-protection=full
 * (so gcc emits `notrack jmp *%rax` for the table, as on distros that default to CET)
 * Probe spec:  classify
 * Shape:       gcc 12 -O2 (checked with objdump -d):
 *   +0x0  f3 0f 1e fa           endbr64             (`classify` lands at +0x4)
 *   +0x4  83 ff 0b              cmp  $0xb,%edi
 *   +0x7  0f 87 <rel32>         ja   classify.cold  (default case, OUTSIDE the symbol)
 *   +0xd  48 8d 15 <disp32>     lea  table(%rip),%rdx
 *   +0x14 89 ff                 mov  %edi,%edi
 *   +0x16 48 63 04 ba           movslq (%rdx,%rdi,4),%rax
 *   +0x1a 48 01 d0              add  %rdx,%rax
 *   +0x1d 3e ff e0              notrack jmp *%rax
 *              (check with objdump -d; the cases compute different things on y so
 *              gcc cannot turn the switch into a lookup array)
 * Usage:       hz_switch [K=100000]
 * Prints:      "switch: K calls, sum=S"   (S = sum of classify(i % 13, i))
 * Hazard:      a jump-table target may land inside any region of the function; it
 *              cannot be checked statically without parsing the table.
 * Expected:    int3 (INDIRECT_JUMP) unless the optimizer proves the table harmless.
 */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noipa)) long classify(int x, long y)
{
    switch (x) {
    case 0: return y + 1;
    case 1: return y * 3;
    case 2: return y ^ 0x55;
    case 3: return y - 7;
    case 4: return y << 2;
    case 5: return y >> 1;
    case 6: return y * y;
    case 7: return ~y;
    case 8: return y | 0x100;
    case 9: return y & 0xff;
    case 10: return y % 10;
    case 11: return -y;
    default: return 0;
    }
}

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 100000;
    long sum = 0;
    for (long i = 0; i < k; i++)
        sum += classify((int)(i % 13), i);
    printf("switch: %ld calls, sum=%ld\n", k, sum);
    return 0;
}
