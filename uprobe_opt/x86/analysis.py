"""Safety analysis for jump optimization: design.md checks 1-6 on ORIGINAL bytes.

Mirrors the kernel's can_optimize() (arch/x86/kernel/kprobes/opt.c): find the whole
instructions covered by the 5-byte jump, make sure they stay inside the function, that
nothing in the function can land strictly inside them, and that each can run elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from .decode import Insn, check_boundary, decode, decode_covering
from .refusal import Reason, Refusal
from .relocator import Relocator
from .writer import TrampolineWriter
from .xol import JMP_REL32_SIZE

__all__ = ["Region", "Refusal", "Reason", "can_optimize", "find_region"]


@dataclass(frozen=True)
class Region:
    """The whole instructions covering >= 5 bytes at ``addr``; ``orig`` are their
    original bytes (``size`` of them).  The jump overwrites the first 5; the rest
    become unreachable (no jump lands inside, check 3)."""

    addr: int
    size: int
    insns: tuple[Insn, ...]
    orig: bytes

    @property
    def end(self) -> int:
        return self.addr + self.size

    def __contains__(self, addr: int) -> bool:
        """True if ``addr`` lies strictly inside (bytes 1..size-1): where no thread's
        rip or return address may be when the jump is written."""
        return self.addr < addr < self.end


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def find_region(insns: list[Insn], addr: int, func_end: int) -> Region | Refusal:
    """Step 2: collect instructions from ``addr`` until they cover JMP_REL32_SIZE bytes."""
    picked: list[Insn] = []
    for insn in insns:
        if insn.addr < addr:
            continue
        if insn.addr != (picked[-1].end if picked else addr):
            break
        picked.append(insn)
        if insn.end - addr >= JMP_REL32_SIZE:
            break
    covered = picked[-1].end - addr if picked else 0
    if covered >= JMP_REL32_SIZE:
        return Region(addr, covered, tuple(picked), b"".join(i.bytes for i in picked))
    stop = addr + covered
    if stop >= func_end:
        return Refusal(Reason.FUNCTION_TOO_SHORT, addr,
                       f"function ends {_plural(func_end - addr, 'byte')} after probe")
    return Refusal(Reason.DECODE_ERROR, stop, f"cannot decode the instruction at 0x{stop:x}")


def _check_region_bytes(region: Region, other_probes: Iterable[int]) -> Refusal | None:
    """Checks 5/6 and the kernel's -EEXIST: no int3 of anyone else, no other probe."""
    for insn in region.insns:
        if insn.kind == "int3":
            return Refusal(Reason.FOREIGN_INT3, insn.addr,
                           f"int3 at 0x{insn.addr:x} in the region 0x{region.addr:x}-0x{region.end:x} "
                           "(a foreign breakpoint)")
    for other in sorted(set(other_probes)):
        if other in region:
            return Refusal(Reason.PROBE_IN_RANGE, other,
                           f"probe at 0x{other:x} lies inside the region "
                           f"0x{region.addr:x}-0x{region.end:x}")
    return None


def _indirect_kind(insn: Insn) -> str:
    if "[" not in insn.op_str or "*" in insn.op_str:
        return "jump table"
    return "through memory"


def _scan_function(insns: list[Insn], region: Region,
                   extra_targets: Iterable[int] = ()) -> Refusal | None:
    """Checks 3 and 4, in address order like the kernel: an indirect jump anywhere, or a
    direct branch landing strictly inside the region; then entry points known from
    outside the bytes (C++ landing pads, like the kernel's exception-table check)."""
    for insn in insns:
        if insn.kind == "jmp_ind" or (insn.kind == "far" and insn.mnemonic.endswith("jmp")):
            return Refusal(Reason.INDIRECT_JUMP, insn.addr,
                           f"indirect jmp at 0x{insn.addr:x} ({_indirect_kind(insn)})")
        if insn.target is not None and insn.target in region:
            return Refusal(Reason.JUMP_INTO_RANGE, insn.addr,
                           f"{insn.mnemonic} at 0x{insn.addr:x} targets 0x{insn.target:x} "
                           "inside the region")
    for target in sorted(set(extra_targets)):
        if target in region:
            # A Mapping names where the entry comes from (a branch elsewhere in the
            # module, found by the module-wide branch index).
            why = extra_targets.get(target) if isinstance(extra_targets, Mapping) else None
            if why:
                return Refusal(Reason.JUMP_INTO_RANGE, target,
                               f"{why} targets 0x{target:x} inside the region")
            return Refusal(Reason.JUMP_INTO_RANGE, target,
                           f"entry point 0x{target:x} (landing pad or external label) "
                           "is inside the region")
    return None


def _check_relocatable(region: Region, shadow_stack: bool = False) -> Refusal | None:
    """Check 5: a dry run of the relocation at the probe's own address (so RIP reach is
    not in question here; build_detour checks it for the real slot)."""
    relocator = Relocator(TrampolineWriter(region.addr), "region", shadow_stack=shadow_stack)
    last = len(region.insns) - 1
    for i, insn in enumerate(region.insns):
        refusal = relocator.write_one(insn, is_last=(i == last))
        if refusal is not None:
            return refusal
    return None


def can_optimize(func_code: bytes, func_addr: int, func_size: int | None, addr: int, *,
                 other_probes: Iterable[int] = (),
                 extra_targets: Iterable[int] = (),
                 shadow_stack: bool = False, facts=None) -> Region | Refusal:
    """The region to patch at ``addr``, or why a 5-byte jump there is unsafe.

    ``func_code`` holds the ORIGINAL bytes of the containing function (from
    ``func_addr``, at least ``func_size`` of them); ``other_probes`` the addresses of the
    other probes (armed or not) in the process; ``extra_targets`` addresses entered
    from outside the function's own branches (e.g. C++ landing pads parsed from
    .gcc_except_table), which must not lie inside the region either; ``shadow_stack``
    refuses calls in the region (their push+jmp form faults under CET shadow stacks).
    Steps:
      1. the function is known and contains addr;   2. addr is an instruction boundary;
      3. the region fits in the function;            4. no foreign int3 / other probe in it;
      5. the whole function decodes; no indirect jump, no branch into the region;
      6. every region instruction is relocatable.
    ``facts``: the function's branchindex.FunctionFacts (from the module's sweep, in
    the same address space as ``func_addr``): steps 5 then read them instead of a
    full decode of the function (same verdict, a few instructions decoded).
    """
    if func_size is None:
        return Refusal(Reason.OUTSIDE_FUNCTION, addr, f"no symbol size for 0x{addr:x}")
    func_end = func_addr + func_size
    if not func_addr <= addr < func_end:
        return Refusal(Reason.OUTSIDE_FUNCTION, addr,
                       f"0x{addr:x} is outside the function at 0x{func_addr:x} "
                       f"({_plural(func_size, 'byte')})")
    code = bytes(func_code[:func_size])
    refusal = check_boundary(code, func_addr, addr)
    if refusal is not None:
        return refusal
    if facts is not None:
        return _can_optimize_with(facts, code, func_addr, addr, other_probes,
                                  extra_targets, shadow_stack)
    insns = decode(code, func_addr)
    region = find_region(insns, addr, func_addr + len(code))
    if isinstance(region, Refusal):
        return region
    refusal = _check_region_bytes(region, other_probes)
    if refusal is not None:
        return refusal
    swept = insns[-1].end if insns else func_addr
    if swept < func_end:
        return Refusal(Reason.DECODE_ERROR, swept,
                       f"cannot decode the function past 0x{swept:x}, so jumps into the "
                       "region cannot be ruled out")
    refusal = _scan_function(insns, region, extra_targets) or _check_relocatable(region, shadow_stack)
    return refusal if refusal is not None else region


def _can_optimize_with(facts, code: bytes, func_addr: int, addr: int, other_probes,
                       extra_targets, shadow_stack: bool) -> Region | Refusal:
    """can_optimize steps 2-6 from the module sweep's facts: only the region's own
    instructions are decoded (``addr`` is a proven boundary, so decoding from it
    gives the instructions a sweep from the function's start gives)."""
    func_end = func_addr + len(code)
    off = addr - func_addr
    insns = decode_covering(code[off:], addr, JMP_REL32_SIZE)
    region = find_region(insns, addr, func_end)
    if isinstance(region, Refusal):
        return region
    refusal = _check_region_bytes(region, other_probes)
    if refusal is not None:
        return refusal
    if facts.end < func_end:
        return Refusal(Reason.DECODE_ERROR, facts.end,
                       f"cannot decode the function past 0x{facts.end:x}, so jumps into "
                       "the region cannot be ruled out")
    # Check 3 and 4 in address order, as _scan_function finds them.
    into = next(((src, dst) for src, dst in facts.branches if dst in region), None)
    ind = facts.indirect
    if ind is not None and (into is None or ind[0] < into[0]):
        return Refusal(Reason.INDIRECT_JUMP, ind[0], f"indirect jmp at 0x{ind[0]:x} ({ind[1]})")
    if into is not None:
        src, dst = into
        mnem = next((i.mnemonic for i in decode(code[src - func_addr:src - func_addr + 15],
                                                src)[:1]), "branch")
        return Refusal(Reason.JUMP_INTO_RANGE, src,
                       f"{mnem} at 0x{src:x} targets 0x{dst:x} inside the region")
    refusal = _scan_function([], region, extra_targets) or \
        _check_relocatable(region, shadow_stack)
    return refusal if refusal is not None else region
