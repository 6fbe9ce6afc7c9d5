"""TrampolineWriter: the only emitter of machine code (style convention 5).

Keeps ``offset`` (position in the buffer) and ``pc`` (address where the bytes will run)
apart, like frida-gum's GumX86Writer.  Branch targets are either absolute addresses
(``int``, encoded immediately) or label names (``str``, resolved in :meth:`finish`).
8-byte literals (absolute jump targets, pushed return addresses) go to a pool that
:meth:`finish` appends after the code.  keystone is used only here, by :meth:`put_asm`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import keystone

_KS = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
_ASM_CACHE: dict[str, bytes] = {}

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT8_MIN, INT8_MAX = -128, 127
JMP_ABS_SIZE = 14          # ff 25 00000000 + .quad target


class WriterError(ValueError):
    """A label was never placed, or a displacement does not fit its field."""


def fits_rel32(src_end: int, dst: int) -> bool:
    """True if ``dst`` is reachable by a rel32 field whose instruction ends at ``src_end``."""
    return INT32_MIN <= dst - src_end <= INT32_MAX


def to_signed64(value: int) -> int:
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >> 63 else value


@dataclass
class _Fixup:
    pos: int          # offset of the displacement field
    size: int         # 1 or 4 (relative), 8 (absolute address of the label)
    label: str
    end: int          # offset of the end of the instruction (relative fixups)


class TrampolineWriter:
    """Emits x86-64 code for a buffer that will run at ``base_pc``."""

    def __init__(self, base_pc: int):
        self.base_pc = base_pc
        self._buf = bytearray()
        self._labels: dict[str, int] = {}
        self._fixups: list[_Fixup] = []
        self._literals: list[tuple[str, int]] = []
        self._serial = 0

    # -- position -------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Bytes emitted so far (position in the buffer)."""
        return len(self._buf)

    @property
    def pc(self) -> int:
        """Run address of the next byte."""
        return self.base_pc + len(self._buf)

    def new_label(self, hint: str = "L") -> str:
        self._serial += 1
        return f".{hint}{self._serial}"

    def put_label(self, name: str) -> None:
        if name in self._labels:
            raise WriterError(f"label {name} placed twice")
        self._labels[name] = self.offset

    def label_addr(self, name: str) -> int:
        """Run address of a placed label."""
        return self.base_pc + self._labels[name]

    # -- raw ------------------------------------------------------------------------
    def put_bytes(self, data: bytes) -> None:
        self._buf += data

    def put_asm(self, text: str) -> None:
        """Assemble ``text`` with keystone at the current pc.  Snippets without
        pc-relative parts (no 'rip', no branch mnemonic) are cached by text."""
        cacheable = "rip" not in text and not text.lstrip().startswith(("j", "call", "loop"))
        code = _ASM_CACHE.get(text) if cacheable else None
        if code is None:
            encoding, _ = _KS.asm(text, self.pc)
            if not encoding:
                raise WriterError(f"keystone could not assemble {text!r}")
            code = bytes(encoding)
            if cacheable:
                _ASM_CACHE[text] = code
        self.put_bytes(code)

    # -- displacement helpers -------------------------------------------------------
    def _put_rel(self, target: int | str, size: int) -> None:
        """Append a ``size``-byte displacement that ends the instruction."""
        end = self.offset + size
        if isinstance(target, str):
            self._fixups.append(_Fixup(self.offset, size, target, end))
            self.put_bytes(bytes(size))
            return
        rel = target - (self.base_pc + end)
        lo, hi = (INT8_MIN, INT8_MAX) if size == 1 else (INT32_MIN, INT32_MAX)
        if not lo <= rel <= hi:
            raise WriterError(f"0x{target:x} out of rel{size * 8} reach from 0x{self.pc:x}")
        self.put_bytes(rel.to_bytes(size, "little", signed=True))

    def put_riprel(self, before: bytes, target: int | str, after: bytes = b"") -> None:
        """An instruction with one RIP-relative disp32: ``before`` + disp32 + ``after``
        (``after`` is an immediate that follows the displacement, so the disp is relative
        to the end of the whole instruction, Intel SDM vol. 2A, 2.2.1.6)."""
        self.put_bytes(before)
        pos = self.offset
        end = pos + 4 + len(after)
        if isinstance(target, str):
            self._fixups.append(_Fixup(pos, 4, target, end))
            disp = 0
        else:
            disp = target - (self.base_pc + end)
            if not INT32_MIN <= disp <= INT32_MAX:
                raise WriterError(f"0x{target:x} out of disp32 reach from 0x{self.pc:x}")
        self.put_bytes(disp.to_bytes(4, "little", signed=True) + after)

    def put_literal(self, value: int) -> str:
        """Reserve an 8-byte literal in the pool; returns its label."""
        label = self.new_label("lit")
        self._literals.append((label, value & 0xFFFFFFFFFFFFFFFF))
        return label

    # -- control transfer -----------------------------------------------------------
    def put_jmp_rel32(self, target: int | str) -> None:
        self.put_bytes(b"\xe9")
        self._put_rel(target, 4)

    def put_jmp_rel8(self, target: int | str) -> None:
        self.put_bytes(b"\xeb")
        self._put_rel(target, 1)

    def put_jcc_rel32(self, cc: int, target: int | str) -> None:
        self.put_bytes(bytes([0x0F, 0x80 | cc]))
        self._put_rel(target, 4)

    def put_jcc_rel8(self, cc: int, target: int | str) -> None:
        self.put_bytes(bytes([0x70 | cc]))
        self._put_rel(target, 1)

    def put_branch_rel8(self, opcode: int, target: int | str) -> None:
        """loop/loope/loopne/jrcxz (``opcode`` e0..e3) to a rel8 target."""
        self.put_bytes(bytes([opcode]))
        self._put_rel(target, 1)

    def put_jmp_abs(self, target: int) -> None:
        """``jmp qword ptr [rip+0]; .quad target``: reaches anywhere, 14 bytes, no register
        or flag touched."""
        self.put_bytes(b"\xff\x25\x00\x00\x00\x00" + (target & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def put_jmp(self, target: int) -> None:
        """jmp rel32 when in reach, else the 14-byte absolute form."""
        if fits_rel32(self.pc + 5, target):
            self.put_jmp_rel32(target)
        else:
            self.put_jmp_abs(target)

    def put_push_u64(self, value: int) -> None:
        """Push a 64-bit constant without touching registers or flags: ``push imm32``
        when it sign-extends to ``value``, else ``push qword ptr [rip+lit]``."""
        if INT32_MIN <= to_signed64(value) <= INT32_MAX:
            self.put_bytes(b"\x68" + to_signed64(value).to_bytes(4, "little", signed=True))
        else:
            self.put_riprel(b"\xff\x35", self.put_literal(value))

    # -- finish ---------------------------------------------------------------------
    def finish(self) -> bytes:
        """Append the literal pool (8-aligned), resolve every label reference and return
        the code.  Raises WriterError on an unplaced label or an out-of-range field."""
        if self._literals:
            self.put_bytes(b"\xcc" * (-self.offset % 8))
            for label, value in self._literals:
                self.put_label(label)
                self.put_bytes(struct.pack("<Q", value))
            self._literals = []
        for fx in self._fixups:
            if fx.label not in self._labels:
                raise WriterError(f"unresolved label {fx.label}")
            dest = self._labels[fx.label]
            if fx.size == 8:
                value = self.base_pc + dest
                self._buf[fx.pos: fx.pos + 8] = value.to_bytes(8, "little")
                continue
            rel = dest - fx.end
            bits = fx.size * 8
            if not -(1 << (bits - 1)) <= rel < (1 << (bits - 1)):
                raise WriterError(f"label {fx.label} out of rel{bits} reach")
            self._buf[fx.pos: fx.pos + fx.size] = rel.to_bytes(fx.size, "little", signed=True)
        self._fixups = []
        return bytes(self._buf)
