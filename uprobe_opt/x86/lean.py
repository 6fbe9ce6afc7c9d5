"""Lean detour bodies for the in-process handlers (count, record): save only what the
handler clobbers, the flags the cheap way, and count without a locked instruction.

The Python handler keeps the whole pt_regs frame (trampoline.py: it must see and edit
every register).  A count or record detour instead runs::

    lea  rsp, [rsp-128]          ; step over the SysV red zone (lea: flags untouched)
    push rax; push <clobbered>   ; only the registers the body writes
    lahf; seto al                ; SF ZF AF PF CF -> ah, OF -> al (pushfq on CPUs
                                 ; without LAHF in 64-bit mode, CPUID.80000001H:ECX[0])
    [push rax]                   ; record: the flags word moves to the stack (cmpxchg
                                 ; needs rax)
    <body>
    [pop rax]
    add  al, 0x7f; sahf          ; al = 1 -> 0x80 sets OF, al = 0 -> 0x7f clears it;
                                 ; then sahf restores the five others from ah
    pop  <clobbered>; pop rax
    lea  rsp, [rsp+128]
    <relocated region> ...

``add al, 0x7f`` must run before ``sahf``: it rewrites SF ZF AF PF CF itself.  DF, IF,
TF and AC are not touched by any instruction of the body, so they need no save (popfq
is the slow instruction this avoids).

Per-CPU counters in a restartable sequence (``man 2 rseq``, kernel kernel/rseq.c):
glibc registers one ``struct rseq`` per thread at ``fs:[__rseq_offset]`` with the
signature RSEQ_SIG (0x53053053 on x86).  The body stores the address of its own
``struct rseq_cs`` descriptor in ``rseq->rseq_cs``, reads ``rseq->cpu_id`` and, when
it is a slot we have (0 <= cpu_id < ncpu_slots), increments that CPU's counter with a
plain ``inc qword ptr [...]``: the commit, one instruction.  A preemption, migration or
signal delivery while rip is in [start_ip, post_commit_ip) makes the kernel clear
``rseq_cs`` and resume the thread at ``abort_ip`` (whose preceding 4 bytes must be the
signature), which starts over; so at the moment any thread executes the commit it is
running on the CPU whose slot it increments, and no two increments of one slot can
interleave.  A thread without a registered rseq area (cpu_id -1 or -2: glibc started
with ``glibc.pthread.rseq=0``, or registration failed) or with a CPU number beyond our
slots uses ``lock inc`` of one extra shared slot (index ncpu_slots), so the sum of all
slots is exact either way.

The record handler appends to its CPU's ring with a second sequence of the same kind
(ringlayout.py PER-CPU RINGS; commit: the store of the ring's head), right after the
count's: it stores its own descriptor over the count's (the kernel ignores, and clears,
a descriptor whose range does not hold rip), so only the last one is cleared.

After the sequence the body stores 0 into ``rseq->rseq_cs``: a pointer left there
would make the kernel read our descriptor at the thread's next preemption, and once
the detour area is unmapped that read faults and the kernel kills the thread with
SIGSEGV.  (While the thread is between the two stores its rip is in the detour area,
which is then never unmapped.)
"""
from __future__ import annotations

from dataclasses import dataclass

from .writer import TrampolineWriter, fits_rel32, INT32_MAX, INT32_MIN

RED_ZONE_SIZE = 128                  # SysV x86-64 ABI 3.2.2
RSEQ_SIG = 0x53053053                # glibc sysdeps/unix/sysv/linux/x86/bits/rseq.h
RSEQ_CPU_ID_OFFSET = 4               # struct rseq: u32 cpu_id_start, u32 cpu_id,
RSEQ_CS_OFFSET = 8                   #              u64 rseq_cs, ... (linux/rseq.h)
RSEQ_CS_ALIGN = 32                   # struct rseq_cs is 32-byte aligned (linux/rseq.h)
COUNTER_STRIDE = 64

_REG_NUM = {name: i for i, name in enumerate(
    ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}


@dataclass(frozen=True)
class Saved:
    """What a lean prologue pushed: ``regs`` in push order (rax first), ``flags`` how the
    arithmetic flags were kept ("lahf": in ax, "lahf-stack": ax pushed after regs,
    "pushf": pushfq after regs)."""

    regs: tuple[str, ...]
    flags: str

    @property
    def depth(self) -> int:
        """Bytes pushed below the red zone."""
        return 8 * (len(self.regs) + (self.flags != "lahf"))

    def offset(self, reg: str) -> int:
        """rsp-relative offset of the saved copy of ``reg`` while the body runs."""
        return self.depth - 8 * (self.regs.index(reg) + 1)

    @property
    def site_rsp_offset(self) -> int:
        """site rsp == rsp + this, while the body runs."""
        return self.depth + RED_ZONE_SIZE


def put_save(w: TrampolineWriter, regs: tuple[str, ...], flags: str, rax_busy: bool) -> Saved:
    """Step over the red zone, push ``regs`` and keep the arithmetic flags.  ``flags``:
    "lahf" or "pushf".  ``rax_busy``: the body writes rax (the flags word then goes to
    the stack).  rax is always saved in "lahf" mode (lahf/seto write it)."""
    if flags == "lahf" and "rax" not in regs:
        regs = ("rax",) + tuple(regs)
    w.put_asm(f"lea rsp, [rsp - {RED_ZONE_SIZE}]")
    for reg in regs:
        w.put_asm(f"push {reg}")
    if flags == "pushf":
        w.put_bytes(b"\x9c")                                   # pushfq
        return Saved(tuple(regs), "pushf")
    w.put_bytes(b"\x9f")                                       # lahf
    w.put_asm("seto al")
    if rax_busy:
        w.put_asm("push rax")
        return Saved(tuple(regs), "lahf-stack")
    return Saved(tuple(regs), "lahf")


def put_restore(w: TrampolineWriter, saved: Saved) -> None:
    """Undo put_save: flags first (add/sahf clobber nothing else than al's flags), then
    the registers; nothing after the flags are restored may write flags."""
    if saved.flags == "pushf":
        w.put_bytes(b"\x9d")                                   # popfq
    else:
        if saved.flags == "lahf-stack":
            w.put_asm("pop rax")
        w.put_asm("add al, 0x7f")
        w.put_bytes(b"\x9e")                                   # sahf
    for reg in reversed(saved.regs):
        w.put_asm(f"pop {reg}")
    w.put_asm(f"lea rsp, [rsp + {RED_ZONE_SIZE}]")


# -- fs-relative encodings ------------------------------------------------------------------
# mod=00 rm=100 with SIB base=101 and no index: [disp32] with no base register; the
# plain mod=00 rm=101 form would be RIP-relative in 64-bit mode (SDM vol. 2A 2.2.1.6).
def _disp(disp: int) -> bytes:
    return disp.to_bytes(4, "little", signed=True)


def fs_load32(w: TrampolineWriter, reg: str, disp: int) -> None:
    """mov r32, dword ptr fs:[disp] (zero-extends into the 64-bit register)."""
    n = _REG_NUM[reg]
    rex = b"\x44" if n >= 8 else b""
    w.put_bytes(b"\x64" + rex + bytes([0x8B, 0x04 | (n & 7) << 3, 0x25]) + _disp(disp))


def fs_load64(w: TrampolineWriter, reg: str, disp: int) -> None:
    """mov r64, qword ptr fs:[disp]."""
    n = _REG_NUM[reg]
    w.put_bytes(bytes([0x64, 0x48 | (n >> 3) << 2, 0x8B, 0x04 | (n & 7) << 3, 0x25])
                + _disp(disp))


def fs_store64(w: TrampolineWriter, reg: str, disp: int) -> None:
    """mov qword ptr fs:[disp], r64."""
    n = _REG_NUM[reg]
    w.put_bytes(bytes([0x64, 0x48 | (n >> 3) << 2, 0x89, 0x04 | (n & 7) << 3, 0x25])
                + _disp(disp))


def fs_store64_zero(w: TrampolineWriter, disp: int) -> None:
    """mov qword ptr fs:[disp], 0 (imm32 sign-extended)."""
    w.put_bytes(b"\x64\x48\xc7\x04\x25" + _disp(disp) + b"\x00\x00\x00\x00")


def lea_riprel(w: TrampolineWriter, reg: str, target: int | str) -> None:
    """lea reg, [rip + target - next]: REX.W(+R) 8d /r with mod=00 rm=101."""
    n = _REG_NUM[reg]
    w.put_riprel(bytes([0x48 | (n >> 3) << 2, 0x8D, 0x05 | (n & 7) << 3]), target)


def load_addr(w: TrampolineWriter, reg: str, addr: int) -> None:
    """reg = addr: rip-relative lea (7 bytes) when in reach, else movabs (10)."""
    if fits_rel32(w.pc + 7, addr):
        lea_riprel(w, reg, addr)
    else:
        w.put_asm(f"movabs {reg}, {addr:#x}")


def fits_disp32(disp: int) -> bool:
    return INT32_MIN <= disp <= INT32_MAX


# -- the counter ------------------------------------------------------------------------------
class Tail:
    """Code placed after the detour's final jump (never fallen into): the rseq abort
    handlers, fallback paths and descriptors.  ``emit(w)`` writes them all."""

    def __init__(self):
        self.parts: list = []
        self.descs: list = []                         # written after every part
        self.rseq: list[tuple[int, int, int]] = []    # (start_ip, post_commit_ip, abort_ip)
        self.data: list[tuple[int, int, str]] = []    # (addr, size, what): not code
        self.start: int | None = None                 # where the out-of-line part starts
        self.end: int | None = None

    def add(self, fn) -> None:
        self.parts.append(fn)

    def emit(self, w: TrampolineWriter) -> None:
        self.start = w.pc
        for fn in self.parts:             # a part may add parts: they run too
            fn(w)
        for fn in self.descs:             # 32-byte descriptors side by side: one padding
            fn(w)
        self.end = w.pc


def put_counter_inc(w: TrampolineWriter, spec, tail: Tail, idx: str, base: str,
                    then_rearm: bool = False) -> None:
    """Count one hit into ``spec``'s counter (layout: HandlerSpec.counter_slot_addr).
    ``idx`` and ``base`` are scratch registers the caller saved; flags are clobbered.

    Per-CPU (``spec.per_cpu``): the restartable sequence described in the module
    docstring, fallback ``lock inc`` of slot ``ncpu_slots``.  Else one ``lock inc``.
    ``then_rearm``: the caller's next instruction stores another descriptor into
    ``rseq->rseq_cs`` (the record's sequence), so this one is not cleared first: the
    kernel ignores (and clears) a descriptor whose range does not hold rip."""
    if not spec.per_cpu:
        if fits_rel32(w.pc + 8, spec.counter_addr):
            w.put_riprel(b"\xf0\x48\xff\x05", spec.counter_addr)    # lock inc qword [rip+X]
        else:
            w.put_asm(f"movabs {base}, {spec.counter_addr:#x}")
            w.put_asm(f"lock inc qword ptr [{base}]")
        return
    rseq = spec.rseq_offset
    restart, fallback, done, desc, abort = (
        w.new_label(h) for h in ("restart", "fallback", "done", "rseq_cs", "abort"))
    load_addr(w, base, spec.counter_addr)
    # 1. rseq->rseq_cs = &desc, then the critical section [start, post).
    w.put_label(restart)
    lea_riprel(w, idx, desc)
    fs_store64(w, idx, rseq + RSEQ_CS_OFFSET)
    start = w.pc
    fs_load32(w, idx, rseq + RSEQ_CPU_ID_OFFSET)
    w.put_asm(f"cmp {_r32(idx)}, {spec.ncpu_slots}")
    w.put_jcc_rel32(0x3, fallback)                  # jae: unsigned, so -1/-2 go there too
    w.put_asm(f"shl {_r32(idx)}, 6")
    assert COUNTER_STRIDE == 64
    w.put_asm(f"inc qword ptr [{base} + {idx}]")    # the commit
    post = w.pc
    # 2. No pointer to our descriptor outlives the sequence (see the module docstring).
    w.put_label(done)
    if not then_rearm:
        fs_store64_zero(w, rseq + RSEQ_CS_OFFSET)

    def out_of_line(w2: TrampolineWriter) -> None:
        w2.put_label(fallback)
        w2.put_asm(f"lock inc qword ptr [{base} + {spec.ncpu_slots * COUNTER_STRIDE}]")
        w2.put_jmp_rel32(done)
        _put_rseq_abort(w2, tail, restart, abort, desc, start, post)
    tail.add(out_of_line)


def _r32(reg: str) -> str:
    if reg[1].isdigit():
        return reg + "d"
    return "e" + reg[1:]


# -- the handlers -----------------------------------------------------------------------------
COUNT_SCRATCH = ("rcx", "rdx")                          # idx, base
RECORD_CLOBBERS = ("rax", "rbx", "rbp", "r10", "r11", "rdx")


def put_count(w: TrampolineWriter, spec, tail: Tail) -> None:
    """The whole lean count handler: save, count, restore."""
    far = not fits_rel32(w.pc + 64, spec.counter_addr)
    regs = COUNT_SCRATCH if spec.per_cpu or far else ()
    saved = put_save(w, regs, spec.flags_save, rax_busy=False)
    put_counter_inc(w, spec, tail, *COUNT_SCRATCH)
    put_restore(w, saved)


def put_record(w: TrampolineWriter, spec, tail: Tail) -> None:
    """The whole lean record handler: save rax rbx rbp r10 r11 rdx and the flags, count
    the hit, append the record (ringlayout.py), restore.

    Registers in the body: r10 = ring header, rbx = slot, rbp = pos + 1, rax = pos
    (cmpxchg's implicit operand), r11 scratch, rdx = rdtsc's high half.  The argument
    registers rdi rsi rcx r8 r9 are never written; rdx is stored before rdtsc (or, when
    a restartable sequence may run the fields twice, from its saved copy); a recorded
    register the body writes (or rsp) comes from its saved copy.

    Per-CPU (``spec.per_cpu``): the CPU's own ring inside a restartable sequence, the
    commit one plain store of head (_put_percpu_append); a thread without rseq (or a
    CPU beyond the slots) appends to the shared ring.  Else the shared ring only."""
    done = w.new_label("done")
    saved = put_save(w, RECORD_CLOBBERS, spec.flags_save, rax_busy=True)
    # 1. The hit counter, before the ring: the tracer may check records + missed == hits.
    put_counter_inc(w, spec, tail, "r11", "rbx", then_rearm=spec.per_cpu)
    if spec.per_cpu:
        _put_percpu_append(w, spec, tail, saved, done)
    else:
        load_addr(w, "r10", spec.ring_addr)
        _put_shared_append(w, spec, tail, saved, done, from_saved_rdx=False)
    w.put_label(done)
    put_restore(w, saved)


def _put_shared_append(w: TrampolineWriter, spec, tail: Tail, saved: Saved, done,
                       from_saved_rdx: bool) -> None:
    """Append to the shared ring whose header is in r10 (Vyukov's bounded queue,
    ringlayout.py), then jump to (or fall into) ``done``."""
    from . import ringlayout as RL
    full = w.new_label("full")
    _put_shared_reserve(w, spec, full)
    # 3. The slot is ours: fields, then seq = pos + 1 as the LAST store (release).
    put_record_fields(w, spec, saved, from_saved_rdx)
    w.put_asm(f"mov qword ptr [rbx + {RL.SEQ_OFFSET}], rbp")
    w.put_jmp_rel32(done)

    def out_of_line(w2: TrampolineWriter) -> None:
        # 4. Full: drop the record, count it (rare: a plain lock inc).
        w2.put_label(full)
        _put_missed_inc(w2, spec)
        w2.put_jmp_rel32(done)
    tail.add(out_of_line)


def _put_shared_reserve(w: TrampolineWriter, spec, full) -> None:
    """Reserve a slot of the shared ring at r10: rbx = slot, rbp = pos + 1; a full ring
    jumps to ``full``."""
    from . import ringlayout as RL
    retry, reload = w.new_label("retry"), w.new_label("reload")
    # 2. pos = head; s = rec[pos & mask].seq
    w.put_label(reload)
    w.put_asm(f"mov rax, qword ptr [r10 + {RL.HEAD_OFFSET}]")
    w.put_label(retry)                      # a failed cmpxchg left the new head in rax
    _put_slot(w, spec)
    w.put_asm(f"mov rbp, qword ptr [rbx + {RL.SEQ_OFFSET}]")
    w.put_asm("sub rbp, rax")
    w.put_jcc_rel32(0x8, full)             # js: s - pos < 0, last lap's record: full
    w.put_jcc_rel8(0x5, reload)            # jne: s > pos, another producer took it
    w.put_asm("lea rbp, [rax + 1]")
    w.put_asm(f"lock cmpxchg qword ptr [r10 + {RL.HEAD_OFFSET}], rbp")
    w.put_jcc_rel8(0x5, retry)             # jne: lost the race; rax = current head


def _put_slot(w: TrampolineWriter, spec) -> None:
    """rbx = address of the slot of position rax in the ring whose header is in r10."""
    from . import ringlayout as RL
    w.put_asm("mov ebx, eax")
    w.put_asm(f"and ebx, {spec.ring_mask:#x}")             # 32-bit: ring_mask < 2**32
    w.put_asm(f"imul rbx, rbx, {RL.RECORD_SIZE}")
    w.put_asm(f"lea rbx, [r10 + rbx + {RL.HEADER_SIZE}]")


def _put_missed_inc(w: TrampolineWriter, spec) -> None:
    if fits_rel32(w.pc + 8, spec.missed_addr):
        w.put_riprel(b"\xf0\x48\xff\x05", spec.missed_addr)     # lock inc qword [rip+X]
    else:
        w.put_asm(f"movabs r11, {spec.missed_addr:#x}")
        w.put_asm("lock inc qword ptr [r11]")


def _put_percpu_append(w: TrampolineWriter, spec, tail: Tail, saved: Saved, done) -> None:
    """Append to this CPU's ring inside a restartable sequence (ringlayout.py PER-CPU
    RINGS; the rseq mechanics as in put_counter_inc).  An abort restarts the sequence,
    so its first part may run more than once: before the commit it only writes our
    slot, which nothing reads before the commit, and rdx is stored from its saved copy
    (a first pass's rdtsc overwrote the register).

    The shared ring's path (no rseq area, or a CPU beyond the slots) leaves the
    sequence (rseq_cs = 0) and reserves with lock cmpxchg, then runs the same field
    stores inside the sequence's range (harmless with rseq_cs cleared: the kernel
    restarts only a thread whose rseq_cs is set) with r10 pointing at the shared
    header's SCRATCH word, which the per-CPU commit store then writes instead of head."""
    from . import ringlayout as RL
    nrec = spec.ring_mask + 1
    rseq = spec.rseq_offset
    restart, shared, full, clear, fields, desc, abort = (w.new_label(h) for h in (
        "ring_restart", "ring_shared", "ring_full", "ring_clear", "ring_fields",
        "ring_rseq_cs", "ring_abort"))
    # 1. rseq->rseq_cs = &desc, then the critical section [start, post).
    w.put_label(restart)
    load_addr(w, "r10", spec.ring_addr)
    lea_riprel(w, "r11", desc)
    fs_store64(w, "r11", rseq + RSEQ_CS_OFFSET)
    start = w.pc
    fs_load32(w, "r11", rseq + RSEQ_CPU_ID_OFFSET)
    w.put_asm(f"cmp r11d, {spec.ncpu_slots}")
    w.put_jcc_rel32(0x3, shared)                # jae: unsigned, so -1/-2 go there too
    w.put_asm(f"imul r11, r11, {RL.ring_size(nrec):#x}")
    w.put_asm("add r10, r11")                   # r10 = this CPU's ring
    # 2. pos = head; full when pos - tail >= N (the consumer has not freed the slot).
    w.put_asm(f"mov rax, qword ptr [r10 + {RL.HEAD_OFFSET}]")
    w.put_asm("mov rbp, rax")
    w.put_asm(f"sub rbp, qword ptr [r10 + {RL.TAIL_OFFSET}]")
    w.put_asm(f"cmp rbp, {nrec:#x}")
    w.put_jcc_rel32(0x3, full)                  # jae
    w.put_asm("lea rbp, [rax + 1]")
    _put_slot(w, spec)
    # 3. The fields, seq, then the commit: head = pos + 1, the sequence's last store.
    w.put_label(fields)
    put_record_fields(w, spec, saved, from_saved_rdx=True)
    w.put_asm(f"mov qword ptr [rbx + {RL.SEQ_OFFSET}], rbp")
    w.put_asm(f"mov qword ptr [r10 + {RL.HEAD_OFFSET}], rbp")      # the commit
    post = w.pc
    # 4. No pointer to our descriptor outlives the sequence (module docstring).
    w.put_label(clear)
    fs_store64_zero(w, rseq + RSEQ_CS_OFFSET)

    def out_of_line(w2: TrampolineWriter) -> None:
        w2.put_label(full)                      # outside [start, post): no abort
        _put_missed_inc(w2, spec)
        w2.put_jmp_rel32(clear)
        w2.put_label(shared)
        fs_store64_zero(w2, rseq + RSEQ_CS_OFFSET)
        shared_full = w2.new_label("shared_full")
        load_addr(w2, "r10", RL.ring_addr(spec.ring_addr, spec.ncpu_slots, nrec))
        _put_shared_reserve(w2, spec, shared_full)
        w2.put_asm(f"lea r10, [r10 + {RL.SCRATCH_OFFSET - RL.HEAD_OFFSET}]")
        w2.put_jmp_rel32(fields)
        w2.put_label(shared_full)
        _put_missed_inc(w2, spec)
        w2.put_jmp_rel32(done)
        _put_rseq_abort(w2, tail, restart, abort, desc, start, post)
    tail.add(out_of_line)


def _put_rseq_abort(w2: TrampolineWriter, tail: Tail, restart, abort, desc, start: int,
                    post: int) -> None:
    """The signature, the abort handler (jump to ``restart``) and the 32-byte aligned
    struct rseq_cs of the sequence [start, post)."""
    tail.data.append((w2.pc, 7, f"ud1 edi, [rip + {RSEQ_SIG:#x}]: the abort signature "
                                "(RSEQ_SIG, the 4 bytes before abort_ip)"))
    w2.put_bytes(b"\x0f\xb9\x3d" + RSEQ_SIG.to_bytes(4, "little"))
    w2.put_label(abort)
    w2.put_jmp_rel32(restart)                   # the kernel cleared rseq_cs: set again
    abort_ip = w2.label_addr(abort)

    def descriptor(w3: TrampolineWriter) -> None:
        pad = -w3.offset % RSEQ_CS_ALIGN
        if pad:
            tail.data.append((w3.pc, pad, f"int3 x {pad} (alignment)"))
        w3.put_bytes(b"\xcc" * pad)
        w3.put_label(desc)
        # struct rseq_cs: u32 version 0, u32 flags 0, u64 start_ip,
        # u64 post_commit_offset, u64 abort_ip
        w3.put_bytes(bytes(8) + start.to_bytes(8, "little")
                     + (post - start).to_bytes(8, "little") + abort_ip.to_bytes(8, "little"))
        tail.data.append((w3.label_addr(desc), 32,
                          f"struct rseq_cs {{version 0, flags 0, start_ip {start:#x}, "
                          f"post_commit_offset {post - start}, abort_ip {abort_ip:#x}}}"))
    tail.descs.append(descriptor)
    tail.rseq.append((start, post, abort_ip))


def put_record_fields(w: TrampolineWriter, spec, saved: Saved,
                      from_saved_rdx: bool = False) -> None:
    """Fill the slot at rbx except seq.  The argument registers are stored first:
    rdtsc overwrites rdx (``from_saved_rdx``: rdx is taken from its saved copy, for
    code that may run after an rdtsc of an aborted pass)."""
    from . import ringlayout as RL
    regs = spec.record_regs
    for i, reg in enumerate(regs):
        dest = f"qword ptr [rbx + {RL.ARGS_OFFSET + 8 * i}]"
        if reg == "rsp":
            w.put_asm(f"lea r11, [rsp + {saved.site_rsp_offset}]")
            w.put_asm(f"mov {dest}, r11")
        elif reg in saved.regs and (reg != "rdx" or from_saved_rdx):
            w.put_asm(f"mov r11, qword ptr [rsp + {saved.offset(reg)}]")
            w.put_asm(f"mov {dest}, r11")
        else:
            w.put_asm(f"mov {dest}, {reg}")
    assert RL.NARGS_OFFSET == RL.PROBE_ID_OFFSET + 4
    w.put_asm(f"movabs rax, {len(regs) << 32 | spec.probe_id:#x}")
    w.put_asm(f"mov qword ptr [rbx + {RL.PROBE_ID_OFFSET}], rax")
    w.put_bytes(b"\x0f\x31")                                        # rdtsc: edx:eax
    w.put_asm(f"mov dword ptr [rbx + {RL.TSC_OFFSET}], eax")
    w.put_asm(f"mov dword ptr [rbx + {RL.TSC_OFFSET + 4}], edx")
    if spec.tid_offset is not None:
        # the kernel tid in the thread's own descriptor (glibc struct pthread.tid,
        # ringlayout.py THREAD); a 32-bit load zero-extends into rax.
        fs_load32(w, "rax", spec.tid_offset)
    else:
        fs_load64(w, "rax", 0)          # the TCB self-pointer == fs base (ringlayout.py)
    w.put_asm(f"mov qword ptr [rbx + {RL.FS_BASE_OFFSET}], rax")
