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
        self.rseq: list[tuple[int, int, int]] = []    # (start_ip, post_commit_ip, abort_ip)
        self.data: list[tuple[int, int, str]] = []    # (addr, size, what): not code
        self.start: int | None = None                 # where the out-of-line part starts
        self.end: int | None = None

    def add(self, fn) -> None:
        self.parts.append(fn)

    def emit(self, w: TrampolineWriter) -> None:
        self.start = w.pc
        for fn in self.parts:
            fn(w)
        self.end = w.pc


def put_counter_inc(w: TrampolineWriter, spec, tail: Tail, idx: str, base: str) -> None:
    """Count one hit into ``spec``'s counter (layout: HandlerSpec.counter_slot_addr).
    ``idx`` and ``base`` are scratch registers the caller saved; flags are clobbered.

    Per-CPU (``spec.per_cpu``): the restartable sequence described in the module
    docstring, fallback ``lock inc`` of slot ``ncpu_slots``.  Else one ``lock inc``."""
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
    fs_store64_zero(w, rseq + RSEQ_CS_OFFSET)

    def out_of_line(w2: TrampolineWriter) -> None:
        w2.put_label(fallback)
        w2.put_asm(f"lock inc qword ptr [{base} + {spec.ncpu_slots * COUNTER_STRIDE}]")
        w2.put_jmp_rel32(done)
        # ud1 edi, [rip + RSEQ_SIG]: glibc's abort-handler prefix, the signature being
        # the last 4 bytes before abort_ip (the kernel checks them before jumping).
        tail.data.append((w2.pc, 7, f"ud1 edi, [rip + {RSEQ_SIG:#x}]: the abort signature "
                                    "(RSEQ_SIG, the 4 bytes before abort_ip)"))
        w2.put_bytes(b"\x0f\xb9\x3d" + RSEQ_SIG.to_bytes(4, "little"))
        w2.put_label(abort)
        w2.put_jmp_rel32(restart)                   # the kernel cleared rseq_cs: set again
        pad = -w2.offset % RSEQ_CS_ALIGN
        if pad:
            tail.data.append((w2.pc, pad, f"int3 x {pad} (alignment)"))
        w2.put_bytes(b"\xcc" * pad)
        w2.put_label(desc)
        abort_ip = w2.label_addr(abort)
        # struct rseq_cs: u32 version 0, u32 flags 0, u64 start_ip,
        # u64 post_commit_offset, u64 abort_ip
        w2.put_bytes(bytes(8) + start.to_bytes(8, "little") + (post - start).to_bytes(8, "little")
                     + abort_ip.to_bytes(8, "little"))
        tail.data.append((w2.label_addr(desc), 32,
                          f"struct rseq_cs {{version 0, flags 0, start_ip {start:#x}, "
                          f"post_commit_offset {post - start}, abort_ip {abort_ip:#x}}}"))
        tail.rseq.append((start, post, abort_ip))
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
    the hit, append the record (ringlayout.py, Vyukov's bounded queue), restore.

    Registers in the body: r10 = ring header, rax = pos (cmpxchg's implicit operand),
    rbx = slot, rbp = seq - pos, then pos + 1, r11 scratch, rdx = rdtsc's high half.
    The argument registers rdi rsi rcx r8 r9 are never written, and rdx only by rdtsc
    after the arguments are stored, so arguments are stored straight from registers;
    a recorded register the body writes (or rsp) comes from its saved copy."""
    from . import ringlayout as RL
    retry, reload, full, done = (w.new_label(h) for h in ("retry", "reload", "full", "done"))
    saved = put_save(w, RECORD_CLOBBERS, spec.flags_save, rax_busy=True)
    # 1. The hit counter, before the ring: the tracer may check records + missed == hits.
    put_counter_inc(w, spec, tail, "r11", "rbx")
    # 2. Reserve a slot: pos = head; s = rec[pos & mask].seq
    load_addr(w, "r10", spec.ring_addr)
    w.put_label(reload)
    w.put_asm(f"mov rax, qword ptr [r10 + {RL.HEAD_OFFSET}]")
    w.put_label(retry)                      # a failed cmpxchg left the new head in rax
    w.put_asm("mov ebx, eax")
    w.put_asm(f"and ebx, {spec.ring_mask:#x}")             # 32-bit: ring_mask < 2**32
    w.put_asm(f"imul rbx, rbx, {RL.RECORD_SIZE}")
    w.put_asm(f"lea rbx, [r10 + rbx + {RL.HEADER_SIZE}]")
    w.put_asm(f"mov rbp, qword ptr [rbx + {RL.SEQ_OFFSET}]")
    w.put_asm("sub rbp, rax")
    w.put_jcc_rel32(0x8, full)             # js: s - pos < 0, last lap's record: full
    w.put_jcc_rel8(0x5, reload)            # jne: s > pos, another producer took it
    w.put_asm("lea rbp, [rax + 1]")
    w.put_asm(f"lock cmpxchg qword ptr [r10 + {RL.HEAD_OFFSET}], rbp")
    w.put_jcc_rel8(0x5, retry)             # jne: lost the race; rax = current head
    # 3. The slot is ours: fields, then seq = pos + 1 as the LAST store (release).
    put_record_fields(w, spec, saved)
    w.put_asm(f"mov qword ptr [rbx + {RL.SEQ_OFFSET}], rbp")
    w.put_label(done)
    put_restore(w, saved)

    def out_of_line(w2: TrampolineWriter) -> None:
        # 4. Full: drop the record, count it (rare: a plain lock inc).
        w2.put_label(full)
        if fits_disp32(spec.missed_addr - spec.ring_addr):
            w2.put_asm(f"lock inc qword ptr [r10 + {spec.missed_addr - spec.ring_addr}]")
        else:
            w2.put_asm(f"movabs r11, {spec.missed_addr:#x}")
            w2.put_asm("lock inc qword ptr [r11]")
        w2.put_jmp_rel32(done)
    tail.add(out_of_line)


def put_record_fields(w: TrampolineWriter, spec, saved: Saved) -> None:
    """Fill the slot at rbx except seq.  The argument registers are stored first:
    rdtsc overwrites rdx."""
    from . import ringlayout as RL
    regs = spec.record_regs
    for i, reg in enumerate(regs):
        dest = f"qword ptr [rbx + {RL.ARGS_OFFSET + 8 * i}]"
        if reg == "rsp":
            w.put_asm(f"lea r11, [rsp + {saved.site_rsp_offset}]")
            w.put_asm(f"mov {dest}, r11")
        elif reg in saved.regs and reg != "rdx":
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
