"""Detours for optimized probes: save frame -> handler -> restore -> relocated region ->
jump back (design.md "Detour slot layout").

Slot layout (all on the thread's own stack, so any number of threads may be inside)::

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
from . import ringlayout as RL
from .writer import INT32_MAX, INT32_MIN, TrampolineWriter, fits_rel32
from .xol import JMP_REL32_SIZE, SLOT_SIZE, jump_bytes

HANDLER_KINDS = ("count", "record", "python", "none")
COUNTER_STRIDE = 64      # bytes between per-CPU counters: one cache line each


@dataclass(frozen=True)
class HandlerSpec:
    """What the handler part of a detour does.

    ``count``: ``lock inc`` of the u64 at ``counter_addr + (cpu & (ncpu_slots-1)) * 64``
    where cpu is ``struct rseq.cpu_id`` read at ``fs:[rseq_offset + 4]`` (glibc's
    ``__rseq_offset``); with ``rseq_offset`` None or one slot, always slot 0.  The sum
    over slots is exact with any number of threads.  ``python``: one int3 after the
    frame is saved.  ``none``: nothing (the detour is then a pure relocation).

    ``record``: counts the hit exactly like ``count``, then appends one record to the
    ring whose header page is at ``ring_addr`` (layout and protocol: ringlayout.py):
    ``probe_id``, ``nargs`` (0..6: how many of rdi, rsi, rdx, rcx, r8, r9 are stored;
    with ``regs`` given, those registers instead, e.g. ``("rax", "rdx", "rsp")`` at an
    exit, their values as at the probe site: rsp is the site rsp),
    rdtsc and the thread word: the u32 tid at ``fs:[tid_offset]`` (the thread's own
    descriptor) when ``tid_offset`` is given, else the fs base.  ``ring_mask`` =
    records - 1.  A full ring drops the record
    and does ``lock inc`` of the u64 at ``missed_addr``, so records + missed == hits.
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

    def __post_init__(self):
        if self.kind not in HANDLER_KINDS:
            raise ValueError(f"unknown handler kind {self.kind!r} (known: {HANDLER_KINDS})")
        n = self.ncpu_slots
        if n < 1 or n & (n - 1):
            raise ValueError(f"ncpu_slots must be a power of two, not {n}")
        if self.kind == "record":
            RL.check_nrecords(self.ring_mask + 1)
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
    handler_addr: int | None = None   # exit detours: where the frame save starts (the
                                      # relocated instructions before it run first)

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
def put_count_handler(w: TrampolineWriter, spec: HandlerSpec, scratch: str = "rcx",
                      base: tuple[str, int] | None = None) -> None:
    """lock inc of this CPU's counter; rax, ``scratch`` and flags are clobbered (saved in
    the frame).  cpu_id may be -1/-2 (rseq not registered): masked, that is still a
    valid slot.  ``base`` = (register, the address it holds): address the counter
    relative to it when in disp32 reach (saves loading the counter's address)."""
    per_cpu = spec.ncpu_slots > 1 and spec.rseq_offset is not None
    if per_cpu:
        # mov eax, dword ptr fs:[disp32]: SIB form without base (mod=00 rm=100 base=101),
        # since mod=00 rm=101 means RIP-relative in 64-bit mode (SDM vol. 2A, 2.2.1.6).
        disp = spec.rseq_offset + 4
        w.put_bytes(b"\x64\x8b\x04\x25" + disp.to_bytes(4, "little", signed=True))
        w.put_asm(f"and eax, {spec.ncpu_slots - 1}")
        w.put_asm("shl eax, 6")
        assert COUNTER_STRIDE == 64
    if base is not None and _fits_disp32(spec.counter_addr - base[1]):
        index = " + rax" if per_cpu else ""
        w.put_asm(f"lock inc qword ptr [{base[0]}{index} + {spec.counter_addr - base[1]}]")
    elif per_cpu or not fits_rel32(w.pc + 8, spec.counter_addr):
        if fits_rel32(w.pc + 7, spec.counter_addr):
            put_lea_riprel(w, scratch, spec.counter_addr)
        else:
            w.put_asm(f"movabs {scratch}, {spec.counter_addr:#x}")
        w.put_asm(f"lock inc qword ptr [{scratch} + rax]" if per_cpu
                  else f"lock inc qword ptr [{scratch}]")
    else:
        w.put_riprel(b"\xf0\x48\xff\x05", spec.counter_addr)        # lock inc qword [rip+X]


_REG_NUM = {name: i for i, name in enumerate(
    ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}


def put_lea_riprel(w: TrampolineWriter, reg: str, target: int) -> None:
    """lea reg, [rip + target - next]: REX.W(+R) 8d /r with mod=00 rm=101 (SDM 2A 2.2.1.6)."""
    num = _REG_NUM[reg]
    w.put_riprel(bytes([0x48 | (num >> 3) << 2, 0x8D, 0x05 | (num & 7) << 3]), target)


def put_load_addr(w: TrampolineWriter, reg: str, addr: int) -> None:
    """reg = addr: rip-relative lea (7 bytes) when in reach, else movabs (10)."""
    if fits_rel32(w.pc + 7, addr):
        put_lea_riprel(w, reg, addr)
    else:
        w.put_asm(f"movabs {reg}, {addr:#x}")


def put_record_handler(w: TrampolineWriter, spec: HandlerSpec) -> None:
    """Count the hit, then append a record to the ring (ringlayout.py, Vyukov's bounded
    queue).  Registers: r10 = ring header, rax = pos (cmpxchg's implicit operand),
    rbx = slot, rbp = seq - pos, then pos + 1.  None of them is an argument register:
    at this point rdi, rsi, rdx, rcx, r8, r9 still hold the site values (put_save_frame
    clobbers no GPR, and the count part here uses rax/r11), identical to the frame's
    copies, so the arguments are stored straight from the registers (4 bytes each
    instead of 9 for a load from the frame plus a store; that keeps the detour in a
    SLOT_SIZE-byte slot)."""
    assert RL.ARG_REGS == ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
    retry, reload, full, done = (w.new_label(h) for h in ("retry", "reload", "full", "done"))
    # 1. The hit counter, before the ring: the tracer may check records + missed == hits
    #    (r10 first: the counter is usually within disp32 of the ring, no second address).
    put_load_addr(w, "r10", spec.ring_addr)
    put_count_handler(w, spec, scratch="r11", base=("r10", spec.ring_addr))
    # 2. Reserve a slot: pos = head; s = rec[pos & mask].seq
    w.put_label(reload)
    w.put_asm(f"mov rax, qword ptr [r10 + {RL.HEAD_OFFSET}]")
    w.put_label(retry)                      # a failed cmpxchg left the new head in rax
    w.put_asm("mov ebx, eax")
    w.put_asm(f"and ebx, {spec.ring_mask:#x}")             # 32-bit: ring_mask < 2**32
    w.put_asm(f"imul rbx, rbx, {RL.RECORD_SIZE}")
    w.put_asm(f"lea rbx, [r10 + rbx + {RL.HEADER_SIZE}]")
    w.put_asm(f"mov rbp, qword ptr [rbx + {RL.SEQ_OFFSET}]")
    w.put_asm("sub rbp, rax")
    w.put_jcc_rel8(0x8, full)              # js: s - pos < 0, last lap's record: full
    w.put_jcc_rel8(0x5, reload)            # jne: s > pos, another producer took it
    w.put_asm("lea rbp, [rax + 1]")
    w.put_asm(f"lock cmpxchg qword ptr [r10 + {RL.HEAD_OFFSET}], rbp")
    w.put_jcc_rel8(0x5, retry)             # jne: lost the race; rax = current head
    # 3. The slot is ours: fields, then seq = pos + 1 as the LAST store (release).
    put_record_fields(w, spec)
    w.put_asm(f"mov qword ptr [rbx + {RL.SEQ_OFFSET}], rbp")
    w.put_jmp_rel8(done)
    # 4. Full: drop the record, count it.
    w.put_label(full)
    put_lock_inc(w, spec.missed_addr, base=("r10", spec.ring_addr), scratch="r11")
    w.put_label(done)


def put_record_fields(w: TrampolineWriter, spec: HandlerSpec) -> None:
    """Fill the slot at rbx except seq.  The argument registers are stored first:
    rdtsc overwrites rdx.  Registers the handler has clobbered (rax, rbx, rbp, r10,
    r11) and rsp (moved by the frame) are copied from the frame at rsp, through r11."""
    regs = spec.record_regs
    for i, reg in enumerate(regs):
        dest = f"qword ptr [rbx + {RL.ARGS_OFFSET + 8 * i}]"
        if reg in RL.ARG_REGS:
            w.put_asm(f"mov {dest}, {reg}")
        else:
            w.put_asm(f"mov r11, qword ptr [rsp + {frame_offset(reg)}]")
            w.put_asm(f"mov {dest}, r11")
    assert RL.NARGS_OFFSET == RL.PROBE_ID_OFFSET + 4
    w.put_asm(f"movabs rax, {len(regs) << 32 | spec.probe_id:#x}")
    w.put_asm(f"mov qword ptr [rbx + {RL.PROBE_ID_OFFSET}], rax")
    w.put_bytes(b"\x0f\x31")                                        # rdtsc: edx:eax
    w.put_asm(f"mov dword ptr [rbx + {RL.TSC_OFFSET}], eax")
    w.put_asm(f"mov dword ptr [rbx + {RL.TSC_OFFSET + 4}], edx")
    if spec.tid_offset is not None:
        # mov eax, dword ptr fs:[tid_offset]: the kernel tid in the thread's own
        # descriptor (glibc struct pthread.tid, ringlayout.py THREAD); a 32-bit load
        # zero-extends into rax.  SIB without base, as in put_count_handler.
        w.put_bytes(b"\x64\x8b\x04\x25" + spec.tid_offset.to_bytes(4, "little", signed=True))
    else:
        # mov rax, qword ptr fs:[0]: the TCB self-pointer == fs base (ringlayout.py
        # FS_BASE).
        w.put_bytes(b"\x64\x48\x8b\x04\x25\x00\x00\x00\x00")
    w.put_asm(f"mov qword ptr [rbx + {RL.FS_BASE_OFFSET}], rax")


def _fits_disp32(disp: int) -> bool:
    return INT32_MIN <= disp <= INT32_MAX


def put_lock_inc(w: TrampolineWriter, addr: int, base: tuple[str, int], scratch: str) -> None:
    """lock inc qword [addr], the shortest way: [base_reg + disp] when ``addr`` is
    within disp32 of the value already in base_reg, else [rip+X], else via movabs."""
    reg, value = base
    if _fits_disp32(addr - value):
        w.put_asm(f"lock inc qword ptr [{reg} + {addr - value}]")
    elif fits_rel32(w.pc + 8, addr):
        w.put_riprel(b"\xf0\x48\xff\x05", addr)                    # lock inc qword [rip+X]
    else:
        w.put_asm(f"movabs {scratch}, {addr:#x}")
        w.put_asm(f"lock inc qword ptr [{scratch}]")


def put_handler(w: TrampolineWriter, spec: HandlerSpec) -> int | None:
    """Emit the handler part; returns the trap address for "python"."""
    if spec.kind == "count":
        put_count_handler(w, spec)
    elif spec.kind == "record":
        put_record_handler(w, spec)
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
    put_save_frame(w, exit_insn.addr)
    trap_addr = put_handler(w, handler)
    put_restore_frame(w)
    reloc_addr = w.pc
    start = w.offset
    refusal = relocator.write_one(exit_insn, is_last=True)
    if refusal is not None:
        return refusal
    spans.append((exit_insn, start, w.offset))
    code = w.finish()
    if len(code) > SLOT_SIZE:
        return Refusal(Reason.NOT_RELOCATABLE, region.addr,
                       f"the exit detour for 0x{exit_insn.addr:x} needs {len(code)} bytes, "
                       f"more than a {SLOT_SIZE}-byte slot")
    relocated = tuple((insn, _render(code, slot_addr, s, e)) for insn, s, e in spans)
    return Detour(slot_addr, code, region, trap_addr, reloc_addr, relocated, handler_addr)
