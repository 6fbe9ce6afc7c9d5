"""Bulk reading of ELF symbol tables and of the files that hold a stripped file's names.

pyelftools finds the section headers (cheap: one header per section); the symbol
arrays themselves are decoded in bulk with numpy (``Elf64_Sym`` is a fixed 24-byte
record, System V gABI "Symbol Table"), which is what makes attaching to a process
with big libraries cheap: Debian's libc .dynsym (3,000 symbols) in ~3 ms where
iterating pyelftools ``Symbol`` objects takes ~600 ms (measured on this machine, see
the README's Performance section).

Where names come from, in :mod:`uprobe_opt.symbols`' order:

1. the file's own ``.dynsym`` and ``.symtab``;
2. a separate debug file: ``/usr/lib/debug/.build-id/xx/yyyy.debug`` (the build-id
   note, checked to match) or the ``.gnu_debuglink`` name (CRC32 checked) next to the
   file, in its ``.debug/`` directory or under ``/usr/lib/debug`` (gdb's search, see
   the gdb manual "Separate Debug Files");
3. MiniDebugInfo: ``.gnu_debugdata``, an xz-compressed ELF whose ``.symtab`` holds the
   static function symbols the stripped file lacks (the standard library's lzma).

Every function returns link-time addresses; a missing section gives an empty result,
a malformed one raises ``ValueError`` or ``ELFError`` (the caller decides).
"""
from __future__ import annotations

import io
import lzma
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["Section", "read_sections", "read_symbols", "read_build_id",
           "read_debuglink", "read_minidebuginfo", "find_debug_file", "SymRow"]

SHT_SYMTAB, SHT_DYNSYM, SHT_NOBITS = 2, 11, 8
SHT_GNU_VERDEF, SHT_GNU_VERSYM = 0x6FFFFFFD, 0x6FFFFFFF
SHN_UNDEF, SHN_ABS = 0, 0xFFF1
VERSYM_HIDDEN = 0x8000
# Kept symbol types: NOTYPE (asm labels), OBJECT, FUNC, COMMON, GNU_IFUNC.  SECTION and
# FILE symbols name no code, TLS values are offsets in the TLS block, not addresses.
_KEPT_TYPES = (0, 1, 2, 5, 10)

# (name, value, size, type, bind, hidden, version)
SymRow = tuple


@dataclass(frozen=True)
class Section:
    """One section header (ELF64): ``addr`` link-time, ``offset``/``size`` in the file."""
    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int

    def read(self, f: BinaryIO) -> bytes:
        if self.type == SHT_NOBITS or not self.size:
            return b""
        f.seek(self.offset)
        data = f.read(self.size)
        if len(data) != self.size:
            raise ValueError(f"section {self.name} truncated in the file")
        return data


def read_sections(f: BinaryIO) -> list[Section]:
    """Section headers of the ELF file open in ``f`` (pyelftools parses the header
    table; names from .shstrtab).  Raises ELFError on a file that is not ELF."""
    from elftools.elf.elffile import ELFFile
    elf = ELFFile(f)
    out = []
    for i, sec in enumerate(elf.iter_sections()):
        h = sec.header
        stype = h["sh_type"]
        if isinstance(stype, str):       # pyelftools names known types
            stype = _SHT_NUM.get(stype, -1)
        out.append(Section(i, sec.name, stype, h["sh_flags"], h["sh_addr"],
                           h["sh_offset"], h["sh_size"], h["sh_link"], h["sh_entsize"]))
    return out


_SHT_NUM = {"SHT_NULL": 0, "SHT_PROGBITS": 1, "SHT_SYMTAB": SHT_SYMTAB, "SHT_STRTAB": 3,
            "SHT_RELA": 4, "SHT_HASH": 5, "SHT_DYNAMIC": 6, "SHT_NOTE": 7,
            "SHT_NOBITS": SHT_NOBITS, "SHT_REL": 9, "SHT_DYNSYM": SHT_DYNSYM,
            "SHT_GNU_verdef": SHT_GNU_VERDEF, "SHT_GNU_versym": SHT_GNU_VERSYM,
            "SHT_GNU_verneed": 0x6FFFFFFE, "SHT_GNU_HASH": 0x6FFFFFF6,
            "SHT_INIT_ARRAY": 14, "SHT_FINI_ARRAY": 15, "SHT_PREINIT_ARRAY": 16,
            "SHT_GROUP": 17, "SHT_SYMTAB_SHNDX": 18, "SHT_NUM": 19}


def _decode_names(strtab: bytes, offsets) -> list[str]:
    """NUL-terminated strings of ``strtab`` at each offset (numpy array)."""
    import numpy as np
    zeros = np.flatnonzero(np.frombuffer(strtab, np.uint8) == 0)
    if not len(zeros):
        return ["" for _ in offsets]
    idx = np.searchsorted(zeros, offsets)
    idx = np.minimum(idx, len(zeros) - 1)
    ends = zeros[idx].tolist()
    return [strtab[a:b].decode("utf-8", "replace") if a < b else ""
            for a, b in zip(offsets.tolist(), ends)]


def _verdef_names(f: BinaryIO, secs: list[Section], verdef: Section | None) -> dict[int, str]:
    """Version index -> version name from .gnu.version_d (Elf64_Verdef/Verdaux, LSB
    "Symbol Versioning"); the first Verdaux of each entry names the version."""
    if verdef is None:
        return {}
    data = verdef.read(f)
    strtab = secs[verdef.link].read(f) if verdef.link < len(secs) else b""
    names, off = {}, 0
    for _ in range(4096):
        if off + 20 > len(data):
            break
        _ver, flags, ndx, _cnt, _hash, aux, nxt = struct.unpack_from("<HHHHIII", data, off)
        if aux and off + aux + 8 <= len(data):
            (name_off,) = struct.unpack_from("<I", data, off + aux)
            end = strtab.find(b"\0", name_off)
            if not flags & 1:            # VER_FLG_BASE names the file, not a version
                names[ndx] = strtab[name_off:end].decode("utf-8", "replace")
        if not nxt:
            break
        off += nxt
    return names


def read_symbols(f: BinaryIO, secs: list[Section] | None = None) -> list[SymRow]:
    """Every defined, named symbol of .dynsym then .symtab as rows ``(name, value, size,
    type, bind, hidden, version)``: ``hidden`` for a non-default version (``name@VER``
    rather than ``name@@VER``), ``version`` its name (None when unversioned).  A
    .symtab name spelt ``name@VER``/``name@@VER`` is split the same way."""
    import numpy as np
    secs = read_sections(f) if secs is None else secs
    rows: list[SymRow] = []
    for kind in (SHT_DYNSYM, SHT_SYMTAB):
        for sec in secs:
            if sec.type == kind and sec.size and sec.link < len(secs):
                rows += _section_rows(f, secs, sec, np)
    return rows


_SYM_DTYPE = None


def _section_rows(f: BinaryIO, secs: list[Section], sec: Section, np) -> list[SymRow]:
    global _SYM_DTYPE
    if _SYM_DTYPE is None:
        _SYM_DTYPE = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"),
                               ("shndx", "<u2"), ("value", "<u8"), ("size", "<u8")])
    data = sec.read(f)
    syms = np.frombuffer(data, _SYM_DTYPE, count=len(data) // 24)
    typ, bind = syms["info"] & 0xF, syms["info"] >> 4
    keep = ((syms["shndx"] != SHN_UNDEF) & (syms["shndx"] != SHN_ABS)
            & (syms["name"] != 0) & np.isin(typ, _KEPT_TYPES))
    idx = np.flatnonzero(keep)
    names = _decode_names(secs[sec.link].read(f), syms["name"][idx])
    versions = [None] * len(idx)
    hidden = [False] * len(idx)
    if sec.type == SHT_DYNSYM:
        versym = next((s for s in secs if s.type == SHT_GNU_VERSYM), None)
        if versym is not None:
            vs = np.frombuffer(versym.read(f), "<u2")
            vnames = _verdef_names(f, secs, next(
                (s for s in secs if s.type == SHT_GNU_VERDEF), None))
            ok = idx < len(vs)
            v = np.zeros(len(idx), np.uint16)
            v[ok] = vs[idx[ok]]
            hidden = ((v & VERSYM_HIDDEN) != 0).tolist()
            versions = [vnames.get(n) for n in (v & 0x7FFF).tolist()]
    out = []
    for name, value, size, t, b, hid, ver in zip(
            names, syms["value"][idx].tolist(), syms["size"][idx].tolist(),
            typ[idx].tolist(), bind[idx].tolist(), hidden, versions):
        if "@" in name:  # .symtab spelling: name@VER (hidden) or name@@VER (default)
            name, _, ver = name.partition("@")
            hid = not ver.startswith("@")
            ver = ver.lstrip("@")
        out.append((name, value, size, t, 1 if b == 10 else b, hid, ver))
    return out


def read_build_id(f: BinaryIO, secs: list[Section]) -> str | None:
    """The GNU build-id (hex) from the NT_GNU_BUILD_ID note, or None."""
    for sec in secs:
        if sec.type != 7 or not sec.size:
            continue
        data, off = sec.read(f), 0
        while off + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, off)
            name_end = off + 12 + ((namesz + 3) & ~3)
            if ntype == 3 and data[off + 12:off + 12 + namesz] == b"GNU\0":
                return data[name_end:name_end + descsz].hex()
            off = name_end + ((descsz + 3) & ~3)
    return None


def read_debuglink(f: BinaryIO, secs: list[Section]) -> tuple[str, int] | None:
    """(file name, CRC32) from .gnu_debuglink, or None."""
    sec = next((s for s in secs if s.name == ".gnu_debuglink"), None)
    if sec is None or sec.size < 8:
        return None
    data = sec.read(f)
    end = data.find(b"\0")
    if end <= 0:
        return None
    (crc,) = struct.unpack_from("<I", data, (end + 4) & ~3)
    return data[:end].decode("utf-8", "replace"), crc


def read_minidebuginfo(f: BinaryIO, secs: list[Section]) -> bytes | None:
    """The ELF image embedded xz-compressed in .gnu_debugdata (MiniDebugInfo), or None.
    Raises lzma.LZMAError on corrupt data."""
    sec = next((s for s in secs if s.name == ".gnu_debugdata"), None)
    if sec is None or not sec.size:
        return None
    return lzma.decompress(sec.read(f))


def _crc32_of(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def find_debug_file(path: str, build_id: str | None, debuglink: tuple[str, int] | None,
                    root: str = "") -> str | None:
    """The separate debug file of ``path`` (a path as the target sees it; ``root`` is
    prefixed to every candidate, e.g. ``/proc/PID/root``), or None.  A build-id file
    must carry the same build-id; a debuglink file must match the CRC32."""
    if build_id and len(build_id) > 2:
        cand = f"{root}/usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
        if os.path.isfile(cand) and _build_id_of(cand) == build_id:
            return cand
    if debuglink:
        name, crc = debuglink
        d = os.path.dirname(path)
        for cand in (f"{root}{d}/{name}", f"{root}{d}/.debug/{name}",
                     f"{root}/usr/lib/debug{d}/{name}"):
            if (os.path.isfile(cand) and os.path.realpath(cand) != os.path.realpath(root + path)
                    and _crc32_of(cand) == crc):
                return cand
    return None


def _build_id_of(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return read_build_id(f, read_sections(f))
    except Exception:  # noqa: BLE001 - an unreadable candidate is no candidate
        return None


def symbols_of_image(image: bytes) -> list[SymRow]:
    """read_symbols over an in-memory ELF (MiniDebugInfo)."""
    f = io.BytesIO(image)
    return read_symbols(f, read_sections(f))


R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT, R_X86_64_IRELATIVE = 1, 6, 7, 37
SHT_RELA = 4


def read_slot_relocs(f: BinaryIO, secs: list[Section]) -> tuple[dict, dict]:
    """The relocations that leave a function address in a data slot once the dynamic
    linker is done (x86-64 psABI 4.4): ``({resolver vaddr: [slot vaddr, ...]}`` for
    R_X86_64_IRELATIVE (addend = the IFUNC resolver), ``{symbol name: [slot vaddr,
    ...]}`` for R_X86_64_GLOB_DAT / JUMP_SLOT / 64 against a dynamic symbol)``."""
    import numpy as np
    rela = np.dtype([("offset", "<u8"), ("info", "<u8"), ("addend", "<i8")])
    irel: dict[int, list[int]] = {}
    named: dict[str, list[int]] = {}
    for sec in secs:
        if sec.type != SHT_RELA or not sec.size:
            continue
        data = sec.read(f)
        r = np.frombuffer(data, rela, count=len(data) // 24)
        rtype, rsym = r["info"] & 0xFFFFFFFF, r["info"] >> 32
        for off, add in zip(r["offset"][rtype == R_X86_64_IRELATIVE].tolist(),
                            r["addend"][rtype == R_X86_64_IRELATIVE].tolist()):
            irel.setdefault(add, []).append(off)
        m = np.isin(rtype, (R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT)) & (rsym != 0)
        if not m.any() or sec.link >= len(secs):
            continue
        symsec = secs[sec.link]
        sdata = symsec.read(f)
        name_offs = np.frombuffer(sdata, "<u4")[::6]        # st_name of each Elf64_Sym
        idx = rsym[m]
        ok = idx < len(name_offs)
        names = _decode_names(secs[symsec.link].read(f), name_offs[idx[ok]])
        for name, off in zip(names, r["offset"][m][ok].tolist()):
            named.setdefault(name, []).append(off)
    return irel, named
