"""Decoding (capstone) and the instruction facts the rest of the package needs.

Only this module talks to capstone.  :class:`Insn` carries what relocation and the
safety analysis need, computed once here from the raw bytes: the instruction *kind*
(branch class), the absolute branch target, and for RIP-relative operands the offset of
the disp32 inside the instruction and the absolute address it designates.
"""
from __future__ import annotations

from dataclasses import dataclass

import capstone
from capstone import x86_const

from .refusal import Reason, Refusal

ENDBR64 = b"\xf3\x0f\x1e\xfa"

# Legacy prefixes (Intel SDM vol. 2A, 2.1.1) and the REX range (2.2.1).
_LEGACY_PREFIXES = frozenset(b"\xf0\xf2\xf3\x2e\x36\x3e\x26\x64\x65\x66\x67")
_VECTOR_ESCAPES = frozenset(b"\xc4\xc5\x62")   # VEX3, VEX2, EVEX: never branches in 64-bit mode

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_CS.detail = True


@dataclass(frozen=True)
class Insn:
    """One decoded instruction.

    ``kind`` is one of: ``jcc jmp call loop jrcxz`` (direct, ``target`` set),
    ``call_ind jmp_ind`` (through a register or memory), ``ret far iret int3 int syscall
    xbegin xabort mov_ss ud other``.  ``cc`` is the condition nibble of a jcc.
    ``rip_disp_offset`` is the offset of the disp32 in ``bytes`` for a RIP-relative
    operand and ``rip_target`` the absolute address it designates (else None).
    ``prefixes`` are the legacy prefix bytes in order.
    """

    addr: int
    size: int
    bytes: bytes
    mnemonic: str
    op_str: str
    kind: str = "other"
    target: int | None = None
    cc: int | None = None
    rip_disp_offset: int | None = None
    rip_target: int | None = None
    prefixes: bytes = b""
    modrm: int | None = None
    mem_base: str | None = None     # base register name of the memory operand ("rsp", "rip", ...)
    modrm_offset: int | None = None
    regs: frozenset = frozenset()   # 64-bit GPR families read or written, implicit ones included

    @property
    def end(self) -> int:
        """Address just after the instruction."""
        return self.addr + self.size

    @property
    def is_branch(self) -> bool:
        """A direct relative control transfer (jcc/jmp/call/loop/jrcxz)."""
        return self.target is not None

    def __str__(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()


def _opcode_index(code: bytes) -> int:
    """Index of the opcode byte after legacy prefixes and REX."""
    i = 0
    while i < len(code) and code[i] in _LEGACY_PREFIXES:
        i += 1
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        i += 1
    return i


def _modrm_reg(code: bytes, i: int) -> int | None:
    return (code[i] >> 3) & 7 if i < len(code) else None


def _classify(code: bytes) -> tuple[str, int | None]:
    """(kind, jcc condition nibble) from the raw bytes of one instruction."""
    i = _opcode_index(code)
    if i + 1 >= len(code):
        return ({0xC3: "ret", 0xCC: "int3", 0xCB: "far", 0xCF: "iret", 0xF1: "int"}
                .get(code[i], "other") if i < len(code) else "other"), None
    op = code[i]
    if op in _VECTOR_ESCAPES:
        return "other", None
    if 0x70 <= op <= 0x7F:
        return "jcc", op & 0xF
    if op == 0x0F:
        op2 = code[i + 1]
        if 0x80 <= op2 <= 0x8F:
            return "jcc", op2 & 0xF
        if op2 in (0x05, 0x07, 0x34, 0x35):
            return "syscall", None
        if op2 in (0x0B, 0xB9, 0xFF):
            return "ud", None
        return "other", None
    simple = {0xEB: "jmp", 0xE9: "jmp", 0xE8: "call", 0xE0: "loop", 0xE1: "loop",
              0xE2: "loop", 0xE3: "jrcxz", 0xC3: "ret", 0xC2: "ret", 0xCA: "far",
              0xCB: "far", 0xEA: "far", 0x9A: "far", 0xCF: "iret", 0xCC: "int3",
              0xCD: "int", 0xCE: "int", 0xF1: "int"}
    if op in simple:
        return simple[op], None
    reg = _modrm_reg(code, i + 1)
    if op == 0xFF:
        return {2: "call_ind", 3: "far", 4: "jmp_ind", 5: "far"}.get(reg, "other"), None
    if op == 0xC7 and code[i + 1] == 0xF8:
        return "xbegin", None
    if op == 0xC6 and code[i + 1] == 0xF8:
        return "xabort", None
    if op == 0x8E and reg == 2:
        return "mov_ss", None
    return "other", None


_FAMILY = {}
for _q, _names in {"rax": "al ah ax eax", "rbx": "bl bh bx ebx", "rcx": "cl ch cx ecx",
                   "rdx": "dl dh dx edx", "rsi": "sil si esi", "rdi": "dil di edi",
                   "rbp": "bpl bp ebp", "rsp": "spl sp esp", "rip": "ip eip"}.items():
    for _n in _names.split() + [_q]:
        _FAMILY[_n] = _q


def _family(name: str) -> str:
    """'eax' -> 'rax', 'r9d' -> 'r9'; other registers unchanged."""
    if name.startswith("r") and name[1:2].isdigit():
        return name.rstrip("dwb")
    return _FAMILY.get(name, name)


def _regs_used(ci) -> frozenset:
    try:
        read, written = ci.regs_access()
    except capstone.CsError:
        return frozenset()
    return frozenset(_family(ci.reg_name(r)) for r in list(read) + list(written))


def _make_insn(ci) -> Insn:
    raw = bytes(ci.bytes)
    kind, cc = _classify(raw)
    target = None
    if kind in ("jcc", "jmp", "call", "loop", "jrcxz"):
        target = ci.operands[0].imm & 0xFFFFFFFFFFFFFFFF
    rip_off = rip_target = base = None
    for op in ci.operands:
        if op.type == x86_const.X86_OP_MEM:
            if op.mem.base != 0:
                base = ci.reg_name(op.mem.base)
            if op.mem.base == x86_const.X86_REG_RIP:
                rip_off = ci.disp_offset
                rip_target = (ci.address + ci.size + op.mem.disp) & 0xFFFFFFFFFFFFFFFF
    prefixes = bytes(raw[: _opcode_index(raw)])
    prefixes = bytes(b for b in prefixes if not 0x40 <= b <= 0x4F)
    return Insn(ci.address, ci.size, raw, ci.mnemonic, ci.op_str, kind, target, cc,
                rip_off, rip_target, prefixes, ci.modrm if ci.modrm_offset else None, base,
                ci.modrm_offset or None, _regs_used(ci))


def decode(code: bytes, code_addr: int) -> list[Insn]:
    """Linear sweep of ``code`` (which starts at ``code_addr``), stopping at the first
    byte capstone cannot decode (or the end).  ``sum(i.size) < len(code)`` tells the
    caller the sweep stopped early."""
    return [_make_insn(ci) for ci in _CS.disasm(bytes(code), code_addr)]


def decode_covering(code: bytes, code_addr: int, nbytes: int) -> list[Insn]:
    """The whole instructions from ``code_addr`` (a proven boundary) that cover at
    least ``nbytes`` bytes, or fewer when the code ends or stops decoding first: a
    light sweep finds their length, only they are decoded in detail."""
    end = 0
    for a, size, _m, _o in _CS.disasm_lite(bytes(code[:nbytes - 1 + 15]), code_addr):
        end = a + size - code_addr
        if end >= nbytes:
            break
    return decode(code[:end], code_addr) if end else []


def decode_one(code: bytes, addr: int) -> Insn | None:
    """The first instruction of ``code`` at ``addr``, or None if it cannot be decoded."""
    for ci in _CS.disasm(bytes(code[:15]), addr, 1):
        return _make_insn(ci)
    return None


def find_containing(insns: list[Insn], addr: int) -> Insn | None:
    """The instruction whose bytes include ``addr`` (None if the sweep does not cover it)."""
    for insn in insns:
        if insn.addr <= addr < insn.end:
            return insn
    return None


def check_boundary(code: bytes, code_addr: int, addr: int) -> Refusal | None:
    """None if ``addr`` starts an instruction when ``code`` (original bytes of the
    containing function, starting at ``code_addr``) is decoded from its start, like the
    kernel's can_probe().  Else NOT_BOUNDARY naming the containing instruction,
    DECODE_ERROR if the sweep stops before ``addr``, OUTSIDE_FUNCTION if ``addr`` is
    not inside ``code``."""
    if not code_addr <= addr < code_addr + len(code):
        return Refusal(Reason.OUTSIDE_FUNCTION, addr,
                       f"0x{addr:x} is outside the code at 0x{code_addr:x} ({len(code)} bytes)")
    pos = code_addr
    for ci in _CS.disasm_lite(bytes(code[: addr - code_addr + 15]), code_addr):
        a, size, mnem, ops = ci
        if a == addr:
            return None
        if a < addr < a + size:
            text = f"{mnem} {ops}".strip()
            return Refusal(Reason.NOT_BOUNDARY, addr,
                           f"0x{addr:x} is inside '{text}' at 0x{a:x} ({size} bytes)")
        pos = a + size
        if pos > addr:
            break
    bad = code[pos - code_addr] if pos - code_addr < len(code) else None
    what = f"byte 0x{bad:02x}" if bad is not None else "end of code"
    return Refusal(Reason.DECODE_ERROR, pos,
                   f"cannot decode {what} at 0x{pos:x} before 0x{addr:x}")


def skip_endbr(code: bytes, code_addr: int, addr: int) -> int:
    """``addr + 4`` if an endbr64 starts at ``addr`` (like the kernel's
    arch_adjust_kprobe_addr: a probe at func+0 lands after the IBT landing pad), else
    ``addr``."""
    off = addr - code_addr
    if 0 <= off and bytes(code[off: off + 4]) == ENDBR64:
        return addr + 4
    return addr
