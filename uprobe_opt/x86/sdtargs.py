"""USDT argument descriptors of x86-64 (the ``Arguments`` string of a ``.note.stapsdt``
note, as ``<sys/sdt.h>`` emits it from the compiler's ``"nor"`` asm operands).

Each argument is ``[-]SIZE@OPERAND`` (SIZE 1, 2, 4 or 8 bytes; a minus sign means
signed), OPERAND an AT&T operand: ``%reg`` (any width: ``%rax``, ``%eax``, ``%al``,
``%ah``, ``%r8d``, ``%sil``), ``$imm``, or memory ``disp(%base,%index,scale)`` with
each part optional, ``sym(%rip)`` / ``sym+8(%rip)`` (the symbol's address: the
assembler resolves it, the note keeps the name), or an absolute ``disp``.  Without
``SIZE@`` (notes of version 1) the argument is 8 bytes, unsigned.

Pure functions: :func:`parse_args` turns the string into :class:`SdtArg` values;
:meth:`SdtArg.fetch` computes one argument from the registers of a thread stopped at
the marker and a memory reader.  Symbols are bound by the caller (``bind``), which
knows the module's load bias.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

__all__ = ["SdtArg", "parse_args", "SdtArgError"]

# name -> (64-bit register, bit shift, width in bits)
_REGS: dict[str, tuple[str, int, int]] = {}
for _q, _d, _w, _b in (("rax", "eax", "ax", "al"), ("rbx", "ebx", "bx", "bl"),
                       ("rcx", "ecx", "cx", "cl"), ("rdx", "edx", "dx", "dl"),
                       ("rsi", "esi", "si", "sil"), ("rdi", "edi", "di", "dil"),
                       ("rbp", "ebp", "bp", "bpl"), ("rsp", "esp", "sp", "spl")):
    _REGS.update({_q: (_q, 0, 64), _d: (_q, 0, 32), _w: (_q, 0, 16), _b: (_q, 0, 8)})
for _q, _h in (("rax", "ah"), ("rbx", "bh"), ("rcx", "ch"), ("rdx", "dh")):
    _REGS[_h] = (_q, 8, 8)
for _n in range(8, 16):
    _q = f"r{_n}"
    _REGS.update({_q: (_q, 0, 64), f"{_q}d": (_q, 0, 32), f"{_q}w": (_q, 0, 16),
                  f"{_q}b": (_q, 0, 8), f"{_q}l": (_q, 0, 8)})
_REGS["rip"] = ("rip", 0, 64)

_MASK64 = (1 << 64) - 1
_NUM = r"[-+]?(?:0[xX][0-9a-fA-F]+|\d+)"
_SYM = r"[A-Za-z_.$][\w.$@]*"
_MEM_RE = re.compile(
    rf"(?P<sym>{_SYM})?(?P<disp>{_NUM})?"
    r"(?:\((?:%(?P<base>\w+))?(?:,%(?P<index>\w+)(?:,(?P<scale>[1248]))?)?\))?")


class SdtArgError(ValueError):
    """An argument descriptor this decoder does not understand (the marker is still
    probed; only its arguments are not decoded)."""


@dataclass(frozen=True)
class SdtArg:
    """One decoded argument.  ``size`` in bytes (1, 2, 4, 8), ``signed``; ``kind``
    ``reg`` (``reg``, ``shift``, ``bits``), ``imm`` (``disp``) or ``mem``: the address
    is ``disp + base + index * scale`` (registers by their 64-bit names) plus
    ``symbol``'s absolute address once bound (``sym_addr``).  ``text`` is the
    descriptor as written in the note."""
    text: str
    size: int
    signed: bool
    kind: str
    reg: str | None = None
    shift: int = 0
    bits: int = 64
    disp: int = 0
    base: str | None = None
    index: str | None = None
    scale: int = 1
    symbol: str | None = None
    sym_addr: int | None = None

    def bind(self, lookup: Callable[[str], int | None]) -> "SdtArg":
        """The argument with its symbol's absolute address filled in from
        ``lookup(name)`` (None: unknown, then :meth:`fetch` raises SdtArgError)."""
        if self.symbol is None:
            return self
        return replace(self, sym_addr=lookup(self.symbol))

    def fetch(self, regs: dict, read: Callable[[int, int], bytes]) -> int:
        """The argument's value as a u64 (a signed one sign-extended to 64 bits).
        ``regs``: 64-bit register name -> value of the thread stopped at the marker
        (``rip`` the marker's address); ``read(addr, size)``: the target's memory
        (raises the target's errors on an unreadable address)."""
        if self.kind == "imm":
            raw = self.disp & _MASK64
        elif self.kind == "reg":
            raw = (regs[self.reg] >> self.shift) & ((1 << self.bits) - 1)
        else:
            raw = int.from_bytes(read(self.address(regs), self.size), "little")
        return _extend(raw, self.size, self.signed)

    def address(self, regs: dict) -> int:
        """The memory operand's absolute address (``kind == "mem"``)."""
        addr = self.disp
        if self.symbol is not None:
            if self.sym_addr is None:
                raise SdtArgError(f"{self.text}: symbol {self.symbol!r} not found")
            addr += self.sym_addr
            if self.base == "rip":      # sym(%rip) names sym itself, not rip + sym
                return addr & _MASK64
        if self.base is not None:
            addr += regs[self.base]
        if self.index is not None:
            addr += regs[self.index] * self.scale
        return addr & _MASK64


def _extend(raw: int, size: int, signed: bool) -> int:
    raw &= (1 << (8 * size)) - 1
    if signed and raw >> (8 * size - 1):
        raw -= 1 << (8 * size)
    return raw & _MASK64


def _reg64(name: str | None, text: str) -> str | None:
    if name is None:
        return None
    found = _REGS.get(name)
    if found is None or (found[2] != 64):
        raise SdtArgError(f"{text}: {name!r} is not a 64-bit address register")
    return found[0]


def parse_arg(text: str) -> SdtArg:
    """One descriptor (``-4@-20(%rbp)``); SdtArgError on a form not understood."""
    size, signed, op = 8, False, text
    m = re.fullmatch(r"(-?)([1248])@(.+)", text)
    if m:
        signed, size, op = bool(m.group(1)), int(m.group(2)), m.group(3)
    if op.startswith("%"):
        found = _REGS.get(op[1:])
        if found is None:
            raise SdtArgError(f"{text}: unknown register {op!r}")
        return SdtArg(text, size, signed, "reg", reg=found[0], shift=found[1],
                      bits=found[2])
    if op.startswith("$"):
        try:
            return SdtArg(text, size, signed, "imm", disp=int(op[1:], 0))
        except ValueError:
            raise SdtArgError(f"{text}: immediate {op!r} is not a number") from None
    mm = _MEM_RE.fullmatch(op)
    if not mm or not any(mm.group(g) for g in ("sym", "disp", "base", "index")):
        raise SdtArgError(f"{text}: operand {op!r} not understood")
    disp = int(mm.group("disp"), 0) if mm.group("disp") else 0
    return SdtArg(text, size, signed, "mem", disp=disp, base=_reg64(mm.group("base"), text),
                  index=_reg64(mm.group("index"), text),
                  scale=int(mm.group("scale") or 1), symbol=mm.group("sym"))


def parse_args(text: str) -> tuple[SdtArg, ...]:
    """Every argument of a note's ``Arguments`` string (space separated, in order);
    SdtArgError naming the first one not understood."""
    return tuple(parse_arg(t) for t in text.split())
