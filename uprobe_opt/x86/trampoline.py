"""Detours for optimized probes: save frame -> handler -> restore -> relocated region ->
jump back (design.md "Detour slot layout").

Slot layout (all on the thread's own stack, so any number of threads may be inside)::

    lea  rsp, [rsp-128]          ; step over the SysV red zone (lea: flags untouched)
    push 0x2b / push rsp / pushfq / push 0x33 / push <probe addr> / push -1
    push rdi ... push r15        ; -> one struct pt_regs frame at rsp (see frame.py)
    lea  rax, [rsp+296]; mov [rsp+152], rax      ; frame.rsp = the site rsp
    <handler part>               ; may clobber any GPR and flags
    pop  r15 ... pop rdi         ; GPRs FROM THE FRAME (a python handler edits them there)
    lea  rsp, [rsp+24]; popfq    ; eflags from the frame
    lea  rsp, [rsp+144]          ; back to the site rsp; nothing after popfq touches flags
    <relocated region>
    jmp  addr+len                ; rel32, or jmp [rip+0]; .quad when out of reach
    <literal pool>

Alignment: the frame address is site_rsp - 296, and the site rsp has no guaranteed
alignment (8 mod 16 at a function entry, usually 0 mid-function).  Handler code that
calls a function aligns itself, e.g. ``mov rbx, rsp; and rsp, -16; call f; mov rsp, rbx``
(rbx is callee-saved, and flags/GPRs are free to clobber: all are reloaded from the frame).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .analysis import Region
from .decode import Insn, decode
from .frame import (FRAME_FIELDS, FRAME_SIZE, GPR_FIELDS, RED_ZONE_SIZE, USER_CS, USER_SS,
                    frame_offset)
from .refusal import Reason, Refusal
from .relocator import Relocator
from .writer import TrampolineWriter, fits_rel32
from .xol import JMP_REL32_SIZE, SLOT_SIZE, jump_bytes

HANDLER_KINDS = ("count", "python", "none")     # "record" (ring buffer) is planned
COUNTER_STRIDE = 64      # bytes between per-CPU counters: one cache line each


@dataclass(frozen=True)
class HandlerSpec:
    """What the handler part of a detour does.

    ``count``: ``lock inc`` of the u64 at ``counter_addr + (cpu & (ncpu_slots-1)) * 64``
    where cpu is ``struct rseq.cpu_id`` read at ``fs:[rseq_offset + 4]`` (glibc's
    ``__rseq_offset``); with ``rseq_offset`` None or one slot, always slot 0.  The sum
    over slots is exact with any number of threads.  ``python``: one int3 after the
    frame is saved.  ``none``: nothing (the detour is then a pure relocation).
    """

    kind: str
    counter_addr: int = 0
    ncpu_slots: int = 1
    rseq_offset: int | None = None

    def __post_init__(self):
        if self.kind not in HANDLER_KINDS:
            raise ValueError(f"unknown handler kind {self.kind!r} (known: {HANDLER_KINDS})")
        n = self.ncpu_slots
        if n < 1 or n & (n - 1):
            raise ValueError(f"ncpu_slots must be a power of two, not {n}")

    def counter_slot_addr(self, cpu: int) -> int:
        """Address of the counter the detour increments on CPU ``cpu``."""
        return self.counter_addr + (cpu & (self.ncpu_slots - 1)) * COUNTER_STRIDE


@dataclass(frozen=True)
class Detour:
    """``code`` goes at ``slot_addr``.  ``trap_addr``: the int3 of a python handler (the
    tracer sees rip == trap_addr+1 and the frame at rsp), else None.  ``reloc_addr``:
    where the relocated region starts.  ``relocated``: (original insn, text of its
    relocated form) pairs for ``uprobe-opt explain``."""

    slot_addr: int
    code: bytes
    region: Region
    trap_addr: int | None
    reloc_addr: int
    relocated: tuple[tuple[Insn, str], ...]

    @property
    def jump(self) -> bytes:
        """The 5 bytes to write at ``region.addr`` (first byte last, int3 until then)."""
        return jump_bytes(self.region.addr, self.slot_addr)

    @property
    def end_addr(self) -> int:
        return self.slot_addr + len(self.code)

    def __contains__(self, addr: int) -> bool:
        return self.slot_addr <= addr < self.end_addr


# -- frame save / restore -------------------------------------------------------------
def put_save_frame(w: TrampolineWriter, probe_addr: int) -> None:
    """Skip the red zone and push a FRAME_FIELDS frame (highest field first)."""
    special = {"ss": f"push {USER_SS:#x}", "rsp": "push rsp", "eflags": "pushfq",
               "cs": f"push {USER_CS:#x}", "orig_rax": "push -1"}
    w.put_asm(f"lea rsp, [rsp - {RED_ZONE_SIZE}]")
    for name in reversed(FRAME_FIELDS):
        if name == "rip":
            w.put_push_u64(probe_addr)
        else:
            w.put_asm(special.get(name, f"push {name}"))
    # `push rsp` stored the rsp of that moment; store the site rsp instead.
    w.put_asm(f"lea rax, [rsp + {FRAME_SIZE + RED_ZONE_SIZE}]")
    w.put_asm(f"mov qword ptr [rsp + {frame_offset('rsp')}], rax")


def put_restore_frame(w: TrampolineWriter) -> None:
    """Reload GPRs and eflags from the frame, then return rsp to the site value with
    lea only, so the flags popfq restored stay intact."""
    assert FRAME_FIELDS[:len(GPR_FIELDS)] == GPR_FIELDS
    for name in GPR_FIELDS:
        w.put_asm(f"pop {name}")
    w.put_asm(f"lea rsp, [rsp + {frame_offset('eflags') - 8 * len(GPR_FIELDS)}]")
    w.put_asm("popfq")
    w.put_asm(f"lea rsp, [rsp + {FRAME_SIZE - frame_offset('eflags') - 8 + RED_ZONE_SIZE}]")


# -- handler parts ----------------------------------------------------------------------
def put_count_handler(w: TrampolineWriter, spec: HandlerSpec) -> None:
    """lock inc of this CPU's counter; rax/rcx and flags are scratch (saved in the frame).
    cpu_id may be -1/-2 (rseq not registered): masked, that is still a valid slot."""
    per_cpu = spec.ncpu_slots > 1 and spec.rseq_offset is not None
    if per_cpu:
        # mov eax, dword ptr fs:[disp32]: SIB form without base (mod=00 rm=100 base=101),
        # since mod=00 rm=101 means RIP-relative in 64-bit mode (SDM vol. 2A, 2.2.1.6).
        disp = spec.rseq_offset + 4
        w.put_bytes(b"\x64\x8b\x04\x25" + disp.to_bytes(4, "little", signed=True))
        w.put_asm(f"and eax, {spec.ncpu_slots - 1}")
        w.put_asm("shl eax, 6")
        assert COUNTER_STRIDE == 64
    if per_cpu or not fits_rel32(w.pc + 8, spec.counter_addr):
        if fits_rel32(w.pc + 7, spec.counter_addr):
            w.put_riprel(b"\x48\x8d\x0d", spec.counter_addr)         # lea rcx, [rip+X]
        else:
            w.put_asm(f"movabs rcx, {spec.counter_addr:#x}")
        w.put_asm("lock inc qword ptr [rcx + rax]" if per_cpu else "lock inc qword ptr [rcx]")
    else:
        w.put_riprel(b"\xf0\x48\xff\x05", spec.counter_addr)        # lock inc qword [rip+X]


def put_handler(w: TrampolineWriter, spec: HandlerSpec) -> int | None:
    """Emit the handler part; returns the trap address for "python"."""
    if spec.kind == "count":
        put_count_handler(w, spec)
    elif spec.kind == "python":
        trap = w.pc
        w.put_bytes(b"\xcc")
        return trap
    return None


# -- the detour ---------------------------------------------------------------------------
def _relocate_region(w: TrampolineWriter, region: Region) -> list[tuple[Insn, int, int]] | Refusal:
    relocator = Relocator(w, "region")
    spans = []
    last = len(region.insns) - 1
    for i, insn in enumerate(region.insns):
        start = w.offset
        refusal = relocator.write_one(insn, is_last=(i == last))
        if refusal is not None:
            return refusal
        spans.append((insn, start, w.offset))
    if not relocator.ends_flow:
        start = w.offset
        w.put_jmp(region.end)
        spans.append((None, start, w.offset))
    return spans


def _render(code: bytes, slot_addr: int, start: int, end: int) -> str:
    return "; ".join(str(i) for i in decode(code[start:end], slot_addr + start))


def build_detour(region: Region, slot_addr: int, handler: HandlerSpec) -> Detour | Refusal:
    """Check 7 (the probe's jmp rel32 reaches ``slot_addr``) and the slot's code."""
    if not fits_rel32(region.addr + JMP_REL32_SIZE, slot_addr):
        return Refusal(Reason.DETOUR_TOO_FAR, region.addr,
                       f"no detour page within +-2 GiB of 0x{region.addr:x}")
    w = TrampolineWriter(slot_addr)
    put_save_frame(w, region.addr)
    trap_addr = put_handler(w, handler)
    put_restore_frame(w)
    reloc_addr = w.pc
    spans = _relocate_region(w, region)
    if isinstance(spans, Refusal):
        return spans
    code = w.finish()
    if len(code) > SLOT_SIZE:
        return Refusal(Reason.NOT_RELOCATABLE, region.addr,
                       f"the detour for 0x{region.addr:x} needs {len(code)} bytes, "
                       f"more than a {SLOT_SIZE}-byte slot")
    relocated = []
    for insn, start, end in spans:
        text = _render(code, slot_addr, start, end)
        if insn is None:       # the jump back joins the last instruction's text
            prev_insn, prev_text = relocated.pop()
            relocated.append((prev_insn, f"{prev_text}; {text}"))
        else:
            relocated.append((insn, text))
    return Detour(slot_addr, code, region, trap_addr, reloc_addr, tuple(relocated))
