"""Detours for optimized probes: save -> handler -> restore -> relocated region ->
jump back (design.md "Detour slot layout").

count and record detours save only the registers their handler writes and keep the
flags with lahf/seto ... add/sahf (lean.py, which also holds their bodies and the
rseq per-CPU counter); their out-of-line parts (rseq abort handlers and descriptors,
the full-ring path) follow the relocated region's jump back.  The python and none
handlers use the whole-frame layout (all on the thread's own stack, so any number of
threads may be inside)::

    lea  rsp, [rsp-128]          ; step over the SysV red zone (lea: flags untouched)
    push 0x2b / push rsp / pushfq
    add  qword ptr [rsp+8], 136  ; frame.rsp = the site rsp (flags already saved)
    push 0x33 / push <probe addr> / push -1
    push rdi ... push r15        ; -> one struct pt_regs frame at rsp (see frame.py)
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

from dataclasses import dataclass

from .analysis import Region
from .decode import Insn, decode
from .frame import (FRAME_FIELDS, FRAME_SIZE, GPR_FIELDS, RED_ZONE_SIZE, USER_CS, USER_SS,
                    frame_offset)
from .refusal import Reason, Refusal
from .relocator import Relocator
from . import lean
from . import ringlayout as RL
from .writer import INT32_MAX, INT32_MIN, TrampolineWriter, fits_rel32
from .xol import JMP_REL32_SIZE, SLOT_SIZE, jump_bytes

HANDLER_KINDS = ("count", "record", "python", "none")
COUNTER_STRIDE = 64      # bytes between per-CPU counters: one cache line each


@dataclass(frozen=True)
class HandlerSpec:
    """What the handler part of a detour does.

    ``count``: one hit into the counter at ``counter_addr`` (lean.py).  With
    ``rseq_offset`` (glibc's ``__rseq_offset``: struct rseq at ``fs:[rseq_offset]``) the
    counter has ``ncpu_slots + 1`` u64 slots 64 bytes apart: slot ``cpu`` for
    0 <= cpu_id < ncpu_slots, incremented without a lock inside a restartable
    sequence, and slot ``ncpu_slots`` for threads without a registered rseq area
    (``lock inc``); without ``rseq_offset`` one slot and ``lock inc``.  The sum over
    slots is exact with any number of threads (:attr:`counter_slots`).  ``python``: one
    int3 after a whole pt_regs frame is saved.  ``none``: the frame is saved and
    restored, nothing else.

    ``flags_save``: "lahf" (``lahf``/``seto`` and ``add al,0x7f``/``sahf``) or "pushf"
    (pushfq/popfq, for CPUs without LAHF in 64-bit mode) for count and record.

    ``record``: counts the hit exactly like ``count``, then appends one record to the
    ring whose header page is at ``ring_addr`` (layout and protocol: ringlayout.py):
    ``probe_id``, ``nargs`` (0..6: how many of rdi, rsi, rdx, rcx, r8, r9 are stored;
    with ``regs`` given, those registers instead, e.g. ``("rax", "rdx", "rsp")`` at an
    exit, their values as at the probe site: rsp is the site rsp),
    rdtsc and the thread word: the u32 tid at ``fs:[tid_offset]`` (the thread's own
    descriptor) when ``tid_offset`` is given, else the fs base.  ``ring_mask`` =
    records - 1 of each ring.  With per-CPU slots ``ring_addr`` is a mapping of
    ``ncpu_slots + 1`` rings (ringlayout.nrings: one per CPU, appended to without a
    lock in a restartable sequence, then the shared one); else of one shared ring.  A
    full ring drops the record and does ``lock inc`` of the u64 at ``missed_addr``,
    so records + missed == hits.
    """

    kind: str
    counter_addr: int = 0
    ncpu_slots: int = 1
    rseq_offset: int | None = None
    ring_addr: int = 0
    ring_mask: int = 0
    missed_addr: int = 0
    probe_id: int = 0
    nargs: int = RL.MAX_ARGS
    regs: tuple[str, ...] | None = None
    tid_offset: int | None = None
    flags_save: str = "lahf"

    def __post_init__(self):
        if self.kind not in HANDLER_KINDS:
            raise ValueError(f"unknown handler kind {self.kind!r} (known: {HANDLER_KINDS})")
        n = self.ncpu_slots
        if n < 1 or n & (n - 1):
            raise ValueError(f"ncpu_slots must be a power of two, not {n}")
        if self.flags_save not in ("lahf", "pushf"):
            raise ValueError(f"flags_save must be 'lahf' or 'pushf', not {self.flags_save!r}")
        if self.kind == "record":
            RL.check_nrecords(self.ring_mask + 1)
            if self.per_cpu and RL.ring_size(self.ring_mask + 1) >= 1 << 31:
                raise ValueError("per-CPU rings must each be under 2 GiB (imm32 stride)")
            if not 0 <= self.nargs <= RL.MAX_ARGS:
                raise ValueError(f"nargs must be 0..{RL.MAX_ARGS}, not {self.nargs}")
            if not 0 <= self.probe_id < 1 << 32:
                raise ValueError(f"probe_id must fit a u32, not {self.probe_id}")
            if self.regs is not None and (len(self.regs) > RL.MAX_ARGS or set(self.regs)
                                          - set(GPR_FIELDS) - {"rsp"}):
                raise ValueError(f"regs must be at most {RL.MAX_ARGS} GPR names, "
                                 f"not {self.regs}")

    @property
    def record_regs(self) -> tuple[str, ...]:
        """The registers a record stores in its args[] slots, in order: ``regs`` when
        given (an exit stores rax, rdx, rsp), else the first ``nargs`` argument
        registers."""
        return self.regs if self.regs is not None else RL.ARG_REGS[:self.nargs]

    @property
    def per_cpu(self) -> bool:
        """Per-CPU slots in a restartable sequence (else one slot, lock inc)."""
        return self.rseq_offset is not None

    @property
    def counter_slots(self) -> int:
        """u64 slots (64 bytes apart) the counter at ``counter_addr`` must have."""
        return self.ncpu_slots + 1 if self.per_cpu else 1

    def counter_slot_addr(self, cpu: int) -> int:
        """Address of the counter slot a hit increments when ``struct rseq.cpu_id`` reads
        ``cpu`` (a signed value: -1/-2 mean not registered)."""
        if not self.per_cpu:
            return self.counter_addr
        index = cpu if 0 <= cpu < self.ncpu_slots else self.ncpu_slots
        return self.counter_addr + index * COUNTER_STRIDE


@dataclass(frozen=True)
class Detour:
    """``code`` goes at ``slot_addr``.  ``trap_addr``: the int3 of a python handler (the
    tracer sees rip == trap_addr+1 and the frame at rsp), else None.  ``reloc_addr``:
    where the relocated region starts.  ``spans``: (original insn, start, end offset of
    its relocated form in ``code``; None for a jump back that joins the previous one),
    rendered as text by :attr:`relocated` when asked (``uprobe-opt explain``): not for
    every detour built."""

    slot_addr: int
    code: bytes
    region: Region
    trap_addr: int | None
    reloc_addr: int
    spans: tuple[tuple[Insn | None, int, int], ...]
    handler_addr: int | None = None   # exit detours: where the frame save starts (the
                                      # relocated instructions before it run first)
    rseq: tuple[tuple[int, int, int], ...] = ()   # (start_ip, post_commit_ip, abort_ip)
                                      # of each restartable sequence (lean.py)
    sections: tuple[tuple[str, int, int], ...] = ()   # (what, start, end) for explain
    data: tuple[tuple[int, int, str], ...] = ()       # (addr, size, what): not code

    @property
    def relocated(self) -> tuple[tuple[Insn, str], ...]:
        """(original insn, text of its relocated form) pairs, in order."""
        out: list[tuple[Insn, str]] = []
        for insn, start, end in self.spans:
            text = _render(self.code, self.slot_addr, start, end)
            if insn is None:       # the jump back joins the last instruction's text
                prev_insn, prev_text = out.pop()
                out.append((prev_insn, f"{prev_text}; {text}"))
            else:
                out.append((insn, text))
        return tuple(out)

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
    """Skip the red zone and push a FRAME_FIELDS frame (highest field first).  No GPR
    is clobbered: the handler part starts with every GPR still holding its site value
    (the record handler relies on that); flags are clobbered after pushfq."""
    special = {"ss": f"push {USER_SS:#x}", "rsp": "push rsp", "eflags": "pushfq",
               "cs": f"push {USER_CS:#x}", "orig_rax": "push -1"}
    assert FRAME_FIELDS.index("rsp") == FRAME_FIELDS.index("eflags") + 1
    w.put_asm(f"lea rsp, [rsp - {RED_ZONE_SIZE}]")
    for name in reversed(FRAME_FIELDS):
        if name == "rip":
            w.put_push_u64(probe_addr)
        else:
            w.put_asm(special.get(name, f"push {name}"))
        if name == "eflags":
            # `push rsp` stored the rsp of that moment (site - 128 - 8 for ss); make it
            # the site rsp.  add changes flags: only now that pushfq has saved them.
            above = 8 * (len(FRAME_FIELDS) - 1 - FRAME_FIELDS.index("rsp"))
            w.put_asm(f"add qword ptr [rsp + 8], {RED_ZONE_SIZE + above}")


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
def put_handler(w: TrampolineWriter, spec: HandlerSpec, probe_addr: int,
                tail: lean.Tail) -> int | None:
    """Emit the handler part with its saves; returns the trap address for "python".
    count and record save only what they clobber (lean.py); python and none save and
    restore the whole frame.  ``tail`` collects out-of-line code (emitted after the
    detour's last jump)."""
    if spec.kind == "count":
        lean.put_count(w, spec, tail)
        return None
    if spec.kind == "record":
        lean.put_record(w, spec, tail)
        return None
    put_save_frame(w, probe_addr)
    trap = None
    if spec.kind == "python":
        trap = w.pc
        w.put_bytes(b"\xcc")
    put_restore_frame(w)
    return trap


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
    tail = lean.Tail()
    trap_addr = put_handler(w, handler, region.addr, tail)
    reloc_addr = w.pc
    spans = _relocate_region(w, region)
    if isinstance(spans, Refusal):
        return spans
    tail.emit(w)
    code = w.finish()
    if len(code) > SLOT_SIZE:
        return Refusal(Reason.NOT_RELOCATABLE, region.addr,
                       f"the detour for 0x{region.addr:x} needs {len(code)} bytes, "
                       f"more than a {SLOT_SIZE}-byte slot")
    sections = (("handler (saves, handler, restores)", slot_addr, reloc_addr),
                ("relocated region and jump back", reloc_addr, tail.start)) + \
        _tail_sections(tail, slot_addr + len(code))
    return Detour(slot_addr, code, region, trap_addr, reloc_addr, tuple(spans),
                  rseq=tuple(tail.rseq), sections=sections, data=_data(tail, slot_addr, code))


# -- exit detours (return probes; see exits.py) ------------------------------------------
def build_exit_detour(region: Region, slot_addr: int, handler: HandlerSpec
                      ) -> Detour | Refusal:
    """The detour of an exit site: ``region`` ends with the exit instruction (a ret or a
    tail-call jmp).  The instructions before the exit are relocated first, then the
    frame is saved (rip = the exit's address, rsp = the rsp at the exit, i.e. the
    return-address slot), the handler runs, the frame is restored and the exit itself
    runs in the detour.  ``reloc_addr`` is the relocated exit: a thread that trapped on
    the exit's int3 continues there (same effect as its XOL copy)."""
    if not fits_rel32(region.addr + JMP_REL32_SIZE, slot_addr):
        return Refusal(Reason.DETOUR_TOO_FAR, region.addr,
                       f"no detour page within +-2 GiB of 0x{region.addr:x}")
    exit_insn = region.insns[-1]
    w = TrampolineWriter(slot_addr)
    relocator = Relocator(w, "region")
    spans = []
    for insn in region.insns[:-1]:
        start = w.offset
        refusal = relocator.write_one(insn, is_last=False)
        if refusal is not None:
            return refusal
        spans.append((insn, start, w.offset))
    handler_addr = w.pc
    tail = lean.Tail()
    trap_addr = put_handler(w, handler, exit_insn.addr, tail)
    reloc_addr = w.pc
    start = w.offset
    refusal = relocator.write_one(exit_insn, is_last=True)
    if refusal is not None:
        return refusal
    spans.append((exit_insn, start, w.offset))
    tail.emit(w)
    code = w.finish()
    if len(code) > SLOT_SIZE:
        return Refusal(Reason.NOT_RELOCATABLE, region.addr,
                       f"the exit detour for 0x{exit_insn.addr:x} needs {len(code)} bytes, "
                       f"more than a {SLOT_SIZE}-byte slot")
    sections = (("relocated instructions before the exit", slot_addr, handler_addr),
                ("handler (saves, handler, restores)", handler_addr, reloc_addr),
                ("the exit itself", reloc_addr, tail.start)) + \
        _tail_sections(tail, slot_addr + len(code))
    return Detour(slot_addr, code, region, trap_addr, reloc_addr, tuple(spans),
                  handler_addr,
                  rseq=tuple(tail.rseq), sections=sections, data=_data(tail, slot_addr, code))


def _tail_sections(tail: lean.Tail, code_end: int) -> tuple:
    out = ()
    if tail.end > tail.start:
        out += (("out of line (rseq abort and fallback, full ring)", tail.start, tail.end),)
    if code_end > tail.end:
        out += (("literal pool", tail.end, code_end),)
    return out


def _data(tail: lean.Tail, slot_addr: int, code: bytes) -> tuple:
    pool = tuple((a, 8, f".quad {int.from_bytes(code[a - slot_addr:a - slot_addr + 8], 'little'):#x}")
                 for a in range(tail.end + (-tail.end % 8), slot_addr + len(code), 8))
    return tuple(tail.data) + pool


def listing(detour: Detour) -> list[tuple[str, int, bytes, str]]:
    """The detour as it is written: (section, address, bytes, text) per instruction or
    data item, in address order (data: rseq descriptors, literals, int3 padding)."""
    data = {a: (n, text) for a, n, text in detour.data}
    marks = {}
    for start, post, abort in detour.rseq:
        marks[start] = "rseq start_ip"
        marks[post] = "post_commit_ip (the increment before it is the commit)"
        marks[abort] = "abort_ip"
    if detour.trap_addr is not None:
        marks[detour.trap_addr] = "the tracer runs the Python handler here"
    out = []
    for name, start, end in detour.sections:
        pc = start
        while pc < end:
            off = pc - detour.slot_addr
            if pc in data:
                n, text = data[pc]
                out.append((name, pc, detour.code[off:off + n], text))
                pc += n
                continue
            stop = min([a for a in data if a > pc] + [end])
            insns = decode(detour.code[off:stop - detour.slot_addr], pc)
            if not insns:
                out.append((name, pc, detour.code[off:off + 1], "(byte)"))
                pc += 1
                continue
            for i in insns:
                mark = marks.get(i.addr)
                out.append((name, i.addr, i.bytes, f"{i}    ; <- {mark}" if mark else str(i)))
            pc = insns[-1].addr + len(insns[-1].bytes)
    return out
