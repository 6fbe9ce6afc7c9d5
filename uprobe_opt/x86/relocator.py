"""Relocator: decides how each original instruction runs at a new address and
delegates every byte to the :class:`TrampolineWriter` (style convention 5).

Two scenarios:

* ``"xol"``: one instruction copied out of line for the int3 path.  A call, syscall or
  ret is fine here: the copy is the whole story of that instruction.
* ``"region"``: the instructions displaced by the 5-byte jump (optimized path).  A call
  or syscall must be the last instruction (a thread blocked in it, or a return address
  pushed by it, must never point into the middle of a region or a detour), and
  nothing may follow an unconditional transfer (ret/jmp).

Every rule is one ``rewrite_*`` method; :meth:`Relocator.check` is the pure decision
(used by the analysis without emitting), :meth:`Relocator.write_one` the emission.
"""
from __future__ import annotations

from .decode import Insn
from .refusal import Reason, Refusal
from .writer import INT8_MAX, INT8_MIN, TrampolineWriter, fits_rel32

_BRANCH_KINDS = frozenset({"jcc", "jmp", "call", "loop", "jrcxz", "call_ind", "jmp_ind", "ret"})
_NEVER = {
    "int3": "int3 at 0x{a:x} cannot run out of line",
    "int": "'{t}' at 0x{a:x} traps (software interrupt)",
    "far": "far transfer '{t}' at 0x{a:x}",
    "iret": "'{t}' at 0x{a:x} is a far return",
    "xbegin": "'{t}' at 0x{a:x}: the abort address is relative to the instruction",
    "xabort": "'{t}' at 0x{a:x}: transactional region control",
    "mov_ss": "'{t}' at 0x{a:x} loads ss (inhibits interrupts for the next instruction)",
    "ud": "'{t}' at 0x{a:x} traps and would report a detour address",
}
_UNCONDITIONAL = frozenset({"jmp", "jmp_ind", "ret"})


def _refuse(insn: Insn, fmt: str, reason: Reason = Reason.NOT_RELOCATABLE) -> Refusal:
    return Refusal(reason, insn.addr, fmt.format(a=insn.addr, t=str(insn)))


class Relocator:
    """Relocates instructions into ``writer`` (which is positioned at the run address)."""

    def __init__(self, writer: TrampolineWriter, scenario: str = "region", *,
                 shadow_stack: bool = False):
        """``shadow_stack``: the thread runs with CET shadow stacks (x86_Thread_features
        shstk), so a call emulated as push+jmp would make the callee's ret fault (#CP)."""
        if scenario not in ("xol", "region"):
            raise ValueError(f"unknown scenario {scenario!r}")
        self.writer = writer
        self.scenario = scenario
        self.shadow_stack = shadow_stack
        self.ends_flow = False      # the last written instruction never falls through

    # -- decision -------------------------------------------------------------------
    def check(self, insn: Insn, is_last: bool) -> Refusal | None:
        """Can ``insn`` be relocated in this scenario?  (RIP reach is checked at write
        time, it depends on the run address.)"""
        if insn.kind in _NEVER:
            return _refuse(insn, _NEVER[insn.kind])
        if insn.kind in _BRANCH_KINDS:
            if 0x66 in insn.prefixes:
                return _refuse(insn, "0x66-prefixed branch '{t}' at 0x{a:x} (Intel and AMD differ)")
            if 0x67 in insn.prefixes:
                return _refuse(insn, "0x67-prefixed branch '{t}' at 0x{a:x}")
        if self.scenario == "region" and not is_last:
            if insn.kind in ("call", "call_ind"):
                return _refuse(insn, "'{t}' at 0x{a:x} is a call that is not the last "
                                     "instruction of the region")
            if insn.kind == "syscall":
                return _refuse(insn, "'{t}' at 0x{a:x} is not the last instruction of the region")
            if insn.kind in _UNCONDITIONAL:
                return _refuse(insn, "'{t}' at 0x{a:x} is followed by more region bytes")
        if self.shadow_stack and insn.kind in ("call", "call_ind"):
            return _refuse(insn, "'{t}' at 0x{a:x}: an emulated call breaks the shadow stack")
        if insn.kind == "call_ind" and insn.op_str == "rsp":
            return _refuse(insn, "'{t}' at 0x{a:x} calls through rsp")
        return None

    # -- emission -------------------------------------------------------------------
    def write_one(self, insn: Insn, is_last: bool = True) -> Refusal | None:
        """Emit the relocated form of ``insn`` or return why it cannot be."""
        refusal = self.check(insn, is_last)
        if refusal is not None:
            return refusal
        self.ends_flow = False
        kind = insn.kind
        if kind == "jcc":
            return self.rewrite_jcc(insn)
        if kind == "jmp":
            return self.rewrite_jmp(insn)
        if kind in ("call", "call_ind"):
            return self.rewrite_call(insn)
        if kind in ("loop", "jrcxz"):
            return self.rewrite_loop(insn)
        if kind in ("jmp_ind", "ret"):
            self.ends_flow = True
        if insn.rip_disp_offset is not None:
            return self.rewrite_rip_relative(insn)
        self.writer.put_bytes(insn.bytes)
        return None

    def rewrite_rip_relative(self, insn: Insn, raw: bytes | None = None) -> Refusal | None:
        """Re-encode the disp32 so the operand designates the same absolute address.
        The instruction length is unchanged, and any immediate after the displacement
        (``cmp dword ptr [rip+x], 5``) stays after it (the disp counts from the end of
        the whole instruction).  VEX/EVEX forms always use a full disp32 for RIP-relative
        (no disp8*N compression), so the same patch applies."""
        raw = insn.bytes if raw is None else raw
        off = insn.rip_disp_offset
        if not fits_rel32(self.writer.pc + len(raw), insn.rip_target):
            # In a detour region the scratch rewrite is used only for lea, which never
            # faults: a fault inside the rewrite would show the scratch register and a
            # moved rsp to the program's signal handler (kernel uprobes repairs that in
            # riprel_post_xol; we have no hook there), and an optimization can always
            # be declined.  An XOL copy (the int3 path, only far from the code when no
            # gap is near) keeps it: there the handler already sees the XOL rip.
            faultless = insn.mnemonic == "lea" or self.scenario == "xol"
            if raw is insn.bytes and faultless and _scratch_for(insn) is not None:
                return self.rewrite_rip_scratch(insn)
            return Refusal(Reason.RIPREL_OUT_OF_RANGE, insn.addr,
                           f"'{insn}' at 0x{insn.addr:x} reaches 0x{insn.rip_target:x}, beyond "
                           f"+-2 GiB of its relocated copy at 0x{self.writer.pc:x}")
        self.writer.put_riprel(raw[:off], insn.rip_target, raw[off + 4:])
        return None

    def rewrite_rip_scratch(self, insn: Insn) -> Refusal | None:
        """A RIP-relative operand beyond disp32 reach of the copy, done like kernel
        uprobes (arch/x86/kernel/uprobes.c, riprel_analyze): the address goes into a
        scratch register the instruction does not use, and the operand becomes
        [scratch+0].  The scratch register is saved below the red zone and restored;
        lea/push/mov/pop leave the flags alone.  Only for legacy encodings that do not
        use rsp (see _scratch_for)."""
        w = self.writer
        name, num = _scratch_for(insn)
        w.put_asm("lea rsp, [rsp - 128]")
        w.put_asm(f"push {name}")
        w.put_asm(f"movabs {name}, {insn.rip_target:#x}")
        w.put_bytes(_riprel_to_base(insn, num))
        w.put_asm(f"pop {name}")
        w.put_asm("lea rsp, [rsp + 128]")
        return None

    def rewrite_jcc(self, insn: Insn) -> Refusal | None:
        """jcc rel8/rel32 -> jcc rel32 to the same absolute target; beyond +-2 GiB, the
        inverted jcc skips over an absolute jump."""
        w = self.writer
        if fits_rel32(w.pc + 6, insn.target):
            w.put_jcc_rel32(insn.cc, insn.target)
            return None
        skip = w.new_label("nottaken")
        w.put_jcc_rel8(insn.cc ^ 1, skip)
        w.put_jmp_abs(insn.target)
        w.put_label(skip)
        return None

    def rewrite_jmp(self, insn: Insn) -> Refusal | None:
        """jmp rel8/rel32 -> jmp to the same absolute target (rel32 or absolute)."""
        self.writer.put_jmp(insn.target)
        self.ends_flow = True
        return None

    def rewrite_call(self, insn: Insn) -> Refusal | None:
        """call -> push the ORIGINAL return address (insn.end), then jmp to the callee, so
        no return address ever points into a detour.  A memory operand based on rsp is
        read after our push, so its displacement grows by 8."""
        w = self.writer
        w.put_push_u64(insn.end)
        self.ends_flow = True
        if insn.kind == "call":
            w.put_jmp(insn.target)
            return None
        raw = _call_to_jmp(insn.bytes)
        if insn.rip_disp_offset is not None:
            return self.rewrite_rip_relative(insn, raw)
        if insn.mem_base == "rsp":
            raw = _add_rsp_disp(raw, 8)
        w.put_bytes(raw)
        return None

    def rewrite_loop(self, insn: Insn) -> Refusal | None:
        """loop/loope/loopne/jrcxz have only a rel8 form: keep the instruction (so rcx and
        the condition behave exactly as before) but aim it at a local absolute jump:
        ``loopX taken; jmp short next; taken: jmp target; next:``."""
        w = self.writer
        taken, nxt = w.new_label("taken"), w.new_label("next")
        opcode = insn.bytes[-2]         # e0..e3, right before the rel8
        w.put_branch_rel8(opcode, taken)
        w.put_jmp_rel8(nxt)
        w.put_label(taken)
        w.put_jmp(insn.target)
        w.put_label(nxt)
        return None


_SCRATCH = (("rax", 0), ("rcx", 1), ("rdx", 2), ("rbx", 3), ("rsi", 6), ("rdi", 7))
_VECTOR_ESCAPES = frozenset(b"\xc4\xc5\x62\x8f")


def _scratch_for(insn: Insn) -> tuple[str, int] | None:
    """A low GPR the instruction neither reads nor writes (implicit uses included), or
    None when the scratch rewrite does not apply: VEX/EVEX/XOP encodings (their
    inverted REX bits are not handled), stack users (our push moves rsp), branches."""
    if insn.kind != "other" or insn.modrm_offset is None or "rsp" in insn.regs:
        return None
    rex_pos = len(insn.prefixes)
    op_pos = rex_pos + (1 if 0x40 <= insn.bytes[rex_pos] <= 0x4F else 0)
    if insn.bytes[op_pos] in _VECTOR_ESCAPES:
        return None
    for name, num in _SCRATCH:
        if name not in insn.regs:
            return name, num
    return None


def _riprel_to_base(insn: Insn, num: int) -> bytes:
    """The instruction with [rip+disp32] replaced by [reg+disp32=0] (mod=10, rm=reg;
    REX.B cleared since reg is one of the low eight).  Same length and layout, so an
    immediate after the displacement stays in place."""
    raw = bytearray(insn.bytes)
    rex_pos = len(insn.prefixes)
    if 0x40 <= raw[rex_pos] <= 0x4F and rex_pos < insn.modrm_offset:
        raw[rex_pos] &= ~0x01 & 0xFF
    mo = insn.modrm_offset
    raw[mo] = 0x80 | (raw[mo] & 0x38) | num
    raw[insn.rip_disp_offset: insn.rip_disp_offset + 4] = bytes(4)
    return bytes(raw)


def _opcode_pos(raw: bytes) -> int:
    """Index of the 0xff opcode of an indirect call/jmp."""
    return raw.index(0xFF)  # prefixes and REX never contain 0xff


def _call_to_jmp(raw: bytes) -> bytes:
    """``ff /2`` (near call) -> ``ff /4`` (near jmp) with the same operand."""
    i = _opcode_pos(raw) + 1
    modrm = (raw[i] & 0xC7) | (4 << 3)
    return raw[:i] + bytes([modrm]) + raw[i + 1:]


def _add_rsp_disp(raw: bytes, delta: int) -> bytes:
    """Add ``delta`` to the displacement of an rsp-based ``ff /r`` memory operand
    (modrm.rm == 100 with a SIB byte), widening disp8 to disp32 if needed."""
    i = _opcode_pos(raw) + 1
    modrm, sib = raw[i], raw[i + 1]
    mod = modrm >> 6
    dsize = {0: 0, 1: 1, 2: 4}[mod]
    disp = int.from_bytes(raw[i + 2: i + 2 + dsize], "little", signed=True) if dsize else 0
    disp += delta
    if INT8_MIN <= disp <= INT8_MAX:
        mod, enc = 1, disp.to_bytes(1, "little", signed=True)
    else:
        mod, enc = 2, disp.to_bytes(4, "little", signed=True)
    return raw[:i] + bytes([(mod << 6) | (modrm & 0x3F), sib]) + enc + raw[i + 2 + dsize:]
