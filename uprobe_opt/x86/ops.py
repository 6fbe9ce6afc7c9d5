"""x86-64 implementation of the core's :class:`uprobe_opt.core.arch.ArchOps`.

A thin adapter: every decision lives in the pure modules of this package.
"""
from __future__ import annotations

import functools
from typing import Iterable, Mapping

from uprobe_opt import x86

# What a record stores at an exit: the return value (rax, rdx for 128-bit results) and
# the rsp at the exit, which points at the return-address slot (SysV ABI 3.2: the
# caller's `call` pushed it; at the function's first instruction rsp points at it too).
EXIT_REGS = ("rax", "rdx", "rsp")
# The entry of a function with a return probe: five argument registers and rsp (a
# record holds six words).
ENTRY_ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8")


class X86Ops:
    """``shadow_stack``: the target runs with CET shadow stacks (x86_Thread_features:
    shstk in /proc/PID/status); a call relocated as push+jmp would then fault with #CP,
    so calls are refused in relocated code."""

    shadow_stack = False
    breakpoint = x86.BREAKPOINT
    jump_size = x86.JMP_REL32_SIZE
    slot_size = x86.SLOT_SIZE

    def check_boundary(self, code: bytes, code_addr: int, addr: int):
        return x86.check_boundary(code, code_addr, addr)

    def adjust_addr(self, code: bytes, code_addr: int, addr: int) -> int:
        return x86.skip_endbr(code, code_addr, addr)

    def prepare_xol(self, insn: bytes, addr: int, slot_addr: int):
        return x86.prepare_xol(insn, addr, slot_addr, shadow_stack=self.shadow_stack)

    def check(self, func_code: bytes, func_addr: int, func_size: int | None, addr: int,
              other_probes: Iterable[int] = (), extra_targets: Iterable[int] = (),
              facts=None):
        return x86.can_optimize(func_code, func_addr, func_size, addr,
                                other_probes=tuple(other_probes),
                                extra_targets=(extra_targets if isinstance(extra_targets, Mapping)
                                               else tuple(extra_targets)),
                                shadow_stack=self.shadow_stack, facts=facts)

    def find_exits(self, func_code: bytes, func_addr: int, func_size: int):
        return x86.find_exits(func_code, func_addr, func_size)

    def check_exit(self, func_code: bytes, func_addr: int, func_size: int, exit_addr: int,
                   other_probes: Iterable[int] = (), extra_targets: Iterable[int] = ()):
        return x86.can_optimize_exit(func_code, func_addr, func_size, exit_addr,
                                     other_probes=tuple(other_probes),
                                     extra_targets=tuple(extra_targets),
                                     shadow_stack=self.shadow_stack)

    def prepare_exit(self, region, slot_addr: int, handler):
        return x86.build_exit_detour(region, slot_addr, handler)

    def exit_regs(self) -> tuple[str, ...]:
        return EXIT_REGS

    def entry_regs(self, nargs: int) -> tuple[str, ...]:
        return ENTRY_ARG_REGS[:min(nargs, len(ENTRY_ARG_REGS))] + ("rsp",)

    def unoptimize_exit(self, region, exit_addr: int) -> bytes:
        """The original bytes under the jump, with the exit's breakpoint back in them
        when the jump covered it (written while all threads are stopped)."""
        data = bytearray(region.orig[:x86.JMP_REL32_SIZE])
        if 0 <= exit_addr - region.addr < len(data):
            data[exit_addr - region.addr] = x86.BREAKPOINT[0]
        return bytes(data)

    def prepare(self, region, slot_addr: int, handler):
        return x86.build_detour(region, slot_addr, handler)

    def within(self, region, addr: int) -> bool:
        return region.addr < addr < region.addr + region.size

    def optimize(self, region, slot_addr: int) -> tuple[bytes, bytes]:
        jmp = x86.jump_bytes(region.addr, slot_addr)
        return jmp[1:], jmp[:1]

    def unoptimize(self, region) -> tuple[bytes, bytes]:
        return x86.BREAKPOINT, region.orig[1:x86.JMP_REL32_SIZE]

    def detour_listing(self, detour) -> list[tuple[str, int, bytes, str]]:
        return x86.trampoline.listing(detour)

    def handler_spec(self, kind: str, **kw):
        kw.setdefault("flags_save", "lahf" if cpu_has_lahf() else "pushf")
        return x86.HandlerSpec(kind=kind, **kw)


@functools.lru_cache(maxsize=1)
def cpu_has_lahf() -> bool:
    """LAHF/SAHF are valid in 64-bit mode (CPUID.80000001H:ECX[0], Linux's cpuinfo flag
    ``lahf_lm``; missing only on the first x86-64 CPUs).  The tracer and the target run
    on the same machine; unreadable cpuinfo counts as missing (pushfq is always valid)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "lahf_lm" in line.split()
    except OSError:
        pass
    return False
