/* hz_cxx_throw.cc -- a `call` as the first instruction, with a C++ exception
 * thrown through it.
 *
 * Probe spec:  call_first
 * Shape (asm with CFI, exact):
 *   call_first:  e8 <rel32>        call thrower_stub   ; the whole 5-byte region
 *                48 8d 44 3f 01    lea  0x1(%rdi,%rdi,1),%rax
 *                c3                ret
 *   thrower_stub saves rdi, realigns the stack and calls thrower(i), which throws
 *   std::runtime_error when i % 3 == 0.  call_first(i) = 2i + 1 otherwise.
 * Usage:       hz_cxx_throw [K=3000]
 * Prints:      "caught N, sum=S"   (N = ceil(K/3), S = sum of 2i+1 over i % 3 != 0)
 * Hazard:      the relocated call must push the ORIGINAL return address
 *              (call_first+5), not one in the detour page: the unwinder looks up
 *              FDEs by return address and would std::terminate() otherwise;
 *              a thread inside thrower has call_first+5 on its stack (return
 *              address at the region end: not strictly inside, so not blocking).
 * Expected:    optimized (call relocated as `push call_first+5; jmp thrower_stub`),
 *              or int3 if the relocator refuses calls; "caught" count unchanged.
 */
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

extern "C" long call_first(long i);
extern "C" void thrower(long i)
{
    if (i % 3 == 0)
        throw std::runtime_error("boom");
}

__asm__(
    ".text\n"
    ".globl thrower_stub\n.type thrower_stub,@function\n.p2align 4\n"
    "thrower_stub:\n.cfi_startproc\n"
    "  push %rdi\n.cfi_adjust_cfa_offset 8\n.cfi_offset %rdi, -16\n"
    "  sub $8,%rsp\n.cfi_adjust_cfa_offset 8\n"
    "  call thrower\n"
    "  add $8,%rsp\n.cfi_adjust_cfa_offset -8\n"
    "  pop %rdi\n.cfi_adjust_cfa_offset -8\n"
    "  ret\n"
    ".cfi_endproc\n.size thrower_stub, .-thrower_stub\n"
    ".globl call_first\n.type call_first,@function\n.p2align 4\n"
    "call_first:\n.cfi_startproc\n"
    "  call thrower_stub\n"
    "  lea 1(%rdi,%rdi),%rax\n"
    "  ret\n"
    ".cfi_endproc\n.size call_first, .-call_first\n");

int main(int argc, char **argv)
{
    long k = argc > 1 ? atol(argv[1]) : 3000;
    long caught = 0, sum = 0;
    for (long i = 0; i < k; i++) {
        try {
            sum += call_first(i);
        } catch (const std::runtime_error &) {
            caught++;
        }
    }
    std::printf("caught %ld, sum=%ld\n", caught, sum);
    return 0;
}
