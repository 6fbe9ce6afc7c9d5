"""Out-of-line (XOL) copies for the int3 path, and the probe's 5-byte jump."""
from __future__ import annotations

from dataclasses import dataclass

from .decode import Insn, decode_one
from .refusal import Reason, Refusal
from .relocator import Relocator
from .writer import TrampolineWriter, fits_rel32

BREAKPOINT = b"\xcc"
JMP_REL32_SIZE = 5
SLOT_SIZE = 768     # bytes; every XOL copy and every detour fits in one slot (32-byte
                    # multiple: rseq_cs descriptors inside detours are 32-byte aligned)


@dataclass(frozen=True)
class XolPlan:
    """Write ``code`` at ``slot_addr``; resume a thread that hit the int3 at
    ``insn.addr`` with rip = ``slot_addr`` (all other registers untouched)."""

    slot_addr: int
    code: bytes
    insn: Insn


def prepare_xol(insn_bytes: bytes, addr: int, slot_addr: int, *,
                shadow_stack: bool = False) -> XolPlan | Refusal:
    """Out-of-line copy of the single instruction at ``addr`` (``insn_bytes`` holds its
    ORIGINAL bytes, possibly followed by more).  Running the result at ``slot_addr``
    with the registers as at ``addr`` has the effect of that instruction, then continues
    at ``addr+len`` or at the same absolute branch target.  ``shadow_stack``: refuse
    calls (emulated as push+jmp they fault under CET shadow stacks)."""
    insn = decode_one(insn_bytes, addr)
    if insn is None:
        return Refusal(Reason.DECODE_ERROR, addr,
                       f"cannot decode the instruction at 0x{addr:x} ({bytes(insn_bytes[:15]).hex()})")
    writer = TrampolineWriter(slot_addr)
    relocator = Relocator(writer, "xol", shadow_stack=shadow_stack)
    refusal = relocator.write_one(insn, is_last=True)
    if refusal is not None:
        return refusal
    if not relocator.ends_flow:
        writer.put_jmp(insn.end)
    code = writer.finish()
    assert len(code) <= SLOT_SIZE, "an XOL copy is at most ~40 bytes"
    return XolPlan(slot_addr, code, insn)


def jump_bytes(src: int, dst: int) -> bytes:
    """``jmp rel32`` (e9) placed at ``src`` that lands on ``dst``; 5 bytes.
    ValueError if ``dst`` is beyond +-2 GiB of ``src + 5``."""
    if not fits_rel32(src + JMP_REL32_SIZE, dst):
        raise ValueError(f"0x{dst:x} is out of rel32 reach of a jmp at 0x{src:x}")
    return b"\xe9" + (dst - src - JMP_REL32_SIZE).to_bytes(4, "little", signed=True)
