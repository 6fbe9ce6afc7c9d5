"""C++ exception landing pads of an ELF file (link-time addresses).

Jump optimization overwrites 5+ bytes at the probe address; code that is *entered* in
the middle of those bytes crashes.  Direct branches are found by the x86 analysis; a C++
landing pad is entered by the unwinder (``_Unwind_RaiseException`` -> personality ->
``_Unwind_SetIP``) from outside the function, like the kernel's exception-table
fixups that make kprobes refuse a function.  This module finds every landing pad so the
core can pass them as ``extra_targets`` to :func:`uprobe_opt.x86.analysis.can_optimize`.

Where the pads are::

    .eh_frame  FDE (initial_location = function start, augmentation 'L' -> LSDA pointer)
                |
    .gcc_except_table  LSDA:
        u8  lpstart_enc  [encoded LPStart if != DW_EH_PE_omit; default: function start]
        u8  ttype_enc    [uleb128 TType offset if != DW_EH_PE_omit]
        u8  cs_enc
        uleb128 call-site table length
        call-site records: start, len, lp (cs_enc, relative offsets), action (uleb128)
    landing pad = LPStart + lp   for every record with lp != 0

FDEs/CIEs are parsed with pyelftools' ``CallFrameInfo`` (the class behind
``DWARFInfo.EH_CFI_entries()``), built directly over ``.eh_frame`` so the ``.debug_*``
sections of a ``-g`` binary are never read or decompressed, one entry at a time so a
malformed entry only loses that FDE (counted in :func:`stats`), and with CFI
instruction decoding switched off (not needed here: ~2x faster).  LSDAs are parsed here.

API (pure functions over a path; results cached per file, keyed by path + device + inode
+ mtime + size, parsed once)::

    landing_pads(path)          {function start: (pad, pad, ...)}   sorted, deduplicated
    landing_pads_in(path, lo, hi)   [pad, ...] with lo <= pad < hi (from every FDE)
    unparsed_in(path, lo, hi)   True if an FDE starting in [lo, hi) had an LSDA we could
                                not parse (its pads are unknown: refuse to be safe)
    stats(path)                 counters (see :class:`EhStats`)

A file without ``.eh_frame`` or without ``.gcc_except_table`` (C programs, python3), or
not an ELF file at all, gives empty results, never an exception; a file that cannot be
opened raises ``OSError`` (an unknown file must not look like "no pads").  Addresses are
link-time virtual addresses; the caller adds the load bias.

Not handled (counted as ``bad_lsda`` when met): DW_EH_PE_indirect / datarel / textrel /
aligned encodings in an LSDA (GCC and clang emit udata4/uleb128 call sites, omit
LPStart); LSDAs outside allocated sections; stripped section headers (``sstrip``):
no sections -> empty results.
"""
from __future__ import annotations

import bisect
import io
import os
import struct
import threading
import time
from dataclasses import dataclass, field

from uprobe_opt import filecache

# pyelftools is imported where a file is parsed: a table kept on disk
# (uprobe_opt.filecache) answers without it.

__all__ = ["landing_pads", "landing_pads_in", "unparsed_in", "stats", "EhStats",
           "fde_ranges", "fde_ranges_of",
           "parse_lsda", "LsdaError", "clear_cache"]

DW_EH_PE_omit = 0xFF
DW_EH_PE_indirect = 0x80

SHF_ALLOC = 0x2


class LsdaError(ValueError):
    """An LSDA that cannot be decoded (truncated, unsupported encoding)."""


# ---------------------------------------------------------------------------------------
# LSDA decoding

_FIXED = {0x02: ("<H", 2), 0x03: ("<I", 4), 0x04: ("<Q", 8),
          0x0A: ("<h", 2), 0x0B: ("<i", 4), 0x0C: ("<q", 8), 0x00: ("<Q", 8)}


def _leb128(buf: bytes, pos: int, signed: bool) -> tuple[int, int]:
    """(value, next position) of the LEB128 number at ``pos`` (DWARF 5, 7.6)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise LsdaError("truncated leb128")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            if signed and b & 0x40:
                result -= 1 << shift
            return result, pos
        if shift > 70:
            raise LsdaError("leb128 too long")


def _uleb(buf: bytes, pos: int) -> tuple[int, int]:
    return _leb128(buf, pos, False)


def _sleb(buf: bytes, pos: int) -> tuple[int, int]:
    return _leb128(buf, pos, True)


def _read_encoded(buf: bytes, pos: int, enc: int, base_vaddr: int, func_start: int,
                  *, allow_rel: bool = True) -> tuple[int, int]:
    """Read one DW_EH_PE-encoded value at ``buf[pos]``; ``base_vaddr`` is the link-time
    address of ``buf[0]`` (for pcrel).  Returns (value, new pos)."""
    if enc == DW_EH_PE_omit:
        raise LsdaError("omitted value where one is required")
    if enc & DW_EH_PE_indirect:
        raise LsdaError(f"DW_EH_PE_indirect encoding {enc:#x} not supported")
    fmt, app = enc & 0x0F, enc & 0x70
    field_vaddr = base_vaddr + pos
    if fmt == 0x01:
        val, pos = _uleb(buf, pos)
    elif fmt == 0x09:
        val, pos = _sleb(buf, pos)
    elif fmt in _FIXED:
        code, size = _FIXED[fmt]
        if pos + size > len(buf):
            raise LsdaError("truncated encoded value")
        (val,) = struct.unpack_from(code, buf, pos)
        pos += size
    else:
        raise LsdaError(f"unknown value format in encoding {enc:#x}")
    if app == 0x00:
        pass
    elif app == 0x10 and allow_rel:  # pcrel
        val = (val + field_vaddr) & 0xFFFFFFFFFFFFFFFF
    elif app == 0x40 and allow_rel:  # funcrel
        val = (val + func_start) & 0xFFFFFFFFFFFFFFFF
    else:
        raise LsdaError(f"encoding application {app:#x} (enc {enc:#x}) not supported")
    return val, pos


def parse_lsda(buf: bytes, pos: int, base_vaddr: int, func_start: int,
               func_end: int | None = None) -> tuple[list[int], int]:
    """Decode the LSDA at ``buf[pos]`` (``buf[0]`` is at link-time ``base_vaddr``) of the
    function starting at ``func_start``.  Returns (sorted unique landing pads, number of
    call-site records).  Raises :class:`LsdaError` on anything undecodable.  With
    ``func_end``, a call site outside the function is an error (corrupt table)."""
    if pos < 0 or pos >= len(buf):
        raise LsdaError("LSDA outside its section")
    lpstart_enc = buf[pos]
    pos += 1
    if lpstart_enc != DW_EH_PE_omit:
        lpstart, pos = _read_encoded(buf, pos, lpstart_enc, base_vaddr, func_start)
    else:
        lpstart = func_start
    if pos >= len(buf):
        raise LsdaError("truncated LSDA header")
    ttype_enc = buf[pos]
    pos += 1
    if ttype_enc != DW_EH_PE_omit:
        _ttype_off, pos = _uleb(buf, pos)
    if pos >= len(buf):
        raise LsdaError("truncated LSDA header")
    cs_enc = buf[pos]
    pos += 1
    table_len, pos = _uleb(buf, pos)
    end = pos + table_len
    if end > len(buf):
        raise LsdaError("call-site table runs past the section end")
    pads: set[int] = set()
    n = 0
    while pos < end:
        # libgcc reads call-site fields with base 0: only plain formats make sense here
        cs_start, pos = _read_encoded(buf, pos, cs_enc, base_vaddr, 0, allow_rel=False)
        cs_len, pos = _read_encoded(buf, pos, cs_enc, base_vaddr, 0, allow_rel=False)
        cs_lp, pos = _read_encoded(buf, pos, cs_enc, base_vaddr, 0, allow_rel=False)
        _action, pos = _uleb(buf, pos)
        if pos > end:
            raise LsdaError("call-site record runs past the table end")
        n += 1
        if func_end is not None and func_start + cs_start + cs_len > func_end:
            raise LsdaError(f"call site {cs_start:#x}+{cs_len:#x} outside the function")
        if cs_lp:
            pads.add((lpstart + cs_lp) & 0xFFFFFFFFFFFFFFFF)
    return sorted(pads), n


# ---------------------------------------------------------------------------------------
# .eh_frame walk (pyelftools)

_CFI_CLASS = None


def _cfi_class():
    """pyelftools' CFI parser minus the CFI instruction decoding we never use (made on
    first use: pyelftools is imported only to parse)."""
    global _CFI_CLASS
    if _CFI_CLASS is None:
        from elftools.dwarf.callframe import CallFrameInfo

        class _EhFrameNoInstructions(CallFrameInfo):
            def _parse_instructions(self, structs, offset, end_offset):  # noqa: D401
                self.stream.seek(end_offset)
                return []
        _CFI_CLASS = _EhFrameNoInstructions
    return _CFI_CLASS


@dataclass
class EhStats:
    """What one parse saw.  ``bad_fdes``: FDEs pyelftools could not parse (skipped, their
    function unknown: ``bad_fde_offsets`` are their .eh_frame offsets); ``bad_lsdas``:
    FDEs whose LSDA could not be decoded (their function starts in ``unparsed``);
    ``reason``: why the results are empty when they are for a whole-file cause."""
    path: str = ""
    fdes: int = 0
    cies: int = 0
    fdes_with_lsda: int = 0
    call_sites: int = 0
    functions_with_pads: int = 0
    landing_pads: int = 0
    bad_fdes: int = 0
    bad_lsdas: int = 0
    bad_fde_offsets: tuple[int, ...] = ()
    unparsed: tuple[int, ...] = ()
    errors: tuple[str, ...] = ()       # first few error messages, for diagnostics
    reason: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Table:
    by_func: dict[int, tuple[int, ...]]
    pads: list[int]                          # every pad of the file, sorted, unique
    unparsed_ranges: list[tuple[int, int]]   # (start, end) of FDEs whose LSDA failed
    stats: EhStats = field(default_factory=EhStats)


class _Sections:
    """Bytes of allocated sections by link-time address; .gcc_except_table read eagerly,
    the others only if an LSDA points outside it."""

    def __init__(self, elf, primary):
        self._elf = elf
        self._cache: dict[str, tuple[int, bytes]] = {}
        self._ranges = []
        for sec in elf.iter_sections():
            if (sec["sh_flags"] & SHF_ALLOC and sec["sh_type"] != "SHT_NOBITS"
                    and sec["sh_size"]):
                self._ranges.append((sec["sh_addr"], sec["sh_addr"] + sec["sh_size"], sec))
        self._primary = (primary["sh_addr"], primary.data())

    def find(self, addr: int) -> tuple[int, bytes]:
        base, data = self._primary
        if base <= addr < base + len(data):
            return self._primary
        for lo, hi, sec in self._ranges:
            if lo <= addr < hi:
                got = self._cache.get(sec.name)
                if got is None:
                    got = self._cache[sec.name] = (lo, sec.data())
                return got
        raise LsdaError(f"LSDA at {addr:#x} is in no allocated section")


def _note(stats: EhStats, msg: str) -> None:
    if len(stats.errors) < 20:
        stats.errors = stats.errors + (msg,)


def _parse_file(path: str) -> _Table:
    t0 = time.perf_counter()
    st = EhStats(path=path)
    by_func: dict[int, tuple[int, ...]] = {}
    all_pads: set[int] = set()
    unparsed: list[tuple[int, int]] = []

    def done(reason: str | None = None) -> _Table:
        st.reason = reason
        st.functions_with_pads = len(by_func)
        st.landing_pads = len(all_pads)
        st.unparsed = tuple(sorted(s for s, _e in unparsed))
        st.seconds = time.perf_counter() - t0
        return _Table(by_func, sorted(all_pads), sorted(unparsed), st)

    from elftools.dwarf.callframe import FDE
    from elftools.dwarf.structs import DWARFStructs
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        try:
            elf = ELFFile(f)
            eh = elf.get_section_by_name(".eh_frame")
            gcc_et = elf.get_section_by_name(".gcc_except_table")
        except Exception as e:  # noqa: BLE001 - ELFError, construct/struct errors
            return done(f"not a readable ELF file: {type(e).__name__}: {e}")
        if eh is None or eh["sh_type"] == "SHT_NOBITS" or not eh["sh_size"]:
            return done("no .eh_frame")
        if gcc_et is None or gcc_et["sh_type"] == "SHT_NOBITS" or not gcc_et["sh_size"]:
            return done("no .gcc_except_table")
        if elf.elfclass != 64 or not elf.little_endian:
            return done("not a 64-bit little-endian ELF")
        try:
            eh_data = eh.data()
            sections = _Sections(elf, gcc_et)
        except Exception as e:  # noqa: BLE001 - truncated file, bad header
            return done(f"cannot read sections: {e}")

        structs = DWARFStructs(little_endian=True, dwarf_format=32, address_size=8)
        cfi = _cfi_class()(stream=io.BytesIO(eh_data), size=len(eh_data),
                                     address=eh["sh_addr"], base_structs=structs,
                                     for_eh_frame=True)
        size = len(eh_data)
        off = 0
        while off + 4 <= size:
            (length,) = struct.unpack_from("<I", eh_data, off)
            if length == 0:              # terminator (crtend); keep going: be thorough
                off += 4
                continue
            if length == 0xFFFFFFFF:
                if off + 12 > size:
                    st.bad_fdes += 1
                    _note(st, f".eh_frame+{off:#x}: truncated 64-bit length")
                    break
                (length,) = struct.unpack_from("<Q", eh_data, off + 4)
                id_off, nxt = off + 12, off + 12 + length
            else:
                id_off, nxt = off + 4, off + 4 + length
            if nxt > size or id_off + 4 > size:
                st.bad_fdes += 1
                st.bad_fde_offsets += (off,)
                _note(st, f".eh_frame+{off:#x}: entry runs past the section end")
                break
            (cie_id,) = struct.unpack_from("<I", eh_data, id_off)
            if cie_id == 0:
                st.cies += 1             # parsed on demand (and cached) by its FDEs
                off = nxt
                continue
            st.fdes += 1
            try:
                entry = cfi._parse_entry_at(off)
                if not isinstance(entry, FDE):
                    raise ValueError("not an FDE")
                start = entry.header["initial_location"]
                end = start + entry.header["address_range"]
                lsda = entry.lsda_pointer
            except Exception as e:  # noqa: BLE001 - pyelftools raises many kinds
                st.bad_fdes += 1
                st.bad_fde_offsets += (off,)
                _note(st, f".eh_frame+{off:#x}: {type(e).__name__}: {e}")
                off = nxt
                continue
            off = nxt
            if lsda is None or lsda == 0:
                continue
            st.fdes_with_lsda += 1
            try:
                base, data = sections.find(lsda)
                pads, n = parse_lsda(data, lsda - base, base, start, end)
            except (LsdaError, struct.error) as e:
                st.bad_lsdas += 1
                unparsed.append((start, end))
                _note(st, f"FDE {start:#x}: LSDA {lsda:#x}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - section read failure
                st.bad_lsdas += 1
                unparsed.append((start, end))
                _note(st, f"FDE {start:#x}: LSDA {lsda:#x}: {type(e).__name__}: {e}")
                continue
            st.call_sites += n
            if pads:
                prev = by_func.get(start, ())
                by_func[start] = tuple(sorted(set(prev) | set(pads)))
                all_pads.update(pads)
    return done()


# ---------------------------------------------------------------------------------------
# Cache + API

_lock = threading.Lock()
_cache: dict[tuple, _Table] = {}
_key_locks: dict[tuple, threading.Lock] = {}


def _key(path) -> tuple:
    path = os.fspath(path)
    s = os.stat(path)
    return (os.path.abspath(path), s.st_dev, s.st_ino, s.st_mtime_ns, s.st_size)


def _table(path) -> _Table:
    key = _key(path)
    with _lock:
        tab = _cache.get(key)
        if tab is not None:
            return tab
        klock = _key_locks.setdefault(key, threading.Lock())
    with klock:                       # one parse per file even with concurrent callers
        with _lock:
            tab = _cache.get(key)
        if tab is None:
            tab = _load_table(key)
            with _lock:
                # drop stale versions of the same path (rebuilt binaries)
                for k in [k for k in _cache if k[0] == key[0]]:
                    del _cache[k]
                _cache[key] = tab
                _key_locks.pop(key, None)
    return tab


# The format of the "eh" entries of uprobe_opt.filecache (_Table as plain data).
_DISK_VERSION = 1


def _load_table(key: tuple) -> _Table:
    """The table of the file ``key`` names: from the on-disk cache when it holds one
    for this very file (device, inode, mtime, ctime, size), else parsed and stored."""
    try:
        st = os.stat(key[0])
    except OSError:
        st = None
    if st is not None and (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size) == key[1:]:
        got = filecache.load("eh", st, _DISK_VERSION)
        try:
            by_func, pads, unparsed, stats = got
            stats = EhStats(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in stats.items()})
            return _Table({int(k): tuple(v) for k, v in by_func.items()}, list(pads),
                          [tuple(r) for r in unparsed], stats)
        except (TypeError, ValueError, AttributeError):
            pass                        # absent or not of that shape: parse
    else:
        st = None                       # changed since _key: do not store under it
    tab = _parse_file(key[0])
    if st is not None:
        filecache.store("eh", st, _DISK_VERSION,
                        (tab.by_func, tab.pads, tab.unparsed_ranges, tab.stats.as_dict()))
    return tab


def clear_cache() -> None:
    """Forget every parsed file (in this process; the on-disk entries are keyed by
    the file's identity and stay valid)."""
    with _lock:
        _cache.clear()


def landing_pads(path) -> dict[int, tuple[int, ...]]:
    """Function start (link-time vaddr: the FDE's initial location) -> its sorted landing
    pads (link-time vaddrs).  Functions without pads are absent.  The dict is a copy."""
    return dict(_table(path).by_func)


def landing_pads_in(path, lo: int, hi: int) -> list[int]:
    """Link-time addresses of every landing pad with ``lo <= pad < hi`` (whichever FDE
    it belongs to: a pad in a function's ``.cold`` part, or one reached from another
    FDE, is found by address)."""
    pads = _table(path).pads
    return pads[bisect.bisect_left(pads, lo):bisect.bisect_left(pads, hi)]


def unparsed_in(path, lo: int, hi: int) -> bool:
    """True if [lo, hi) overlaps a function whose LSDA could not be decoded (its landing
    pads are unknown) or the file had FDEs that could not be parsed at all."""
    tab = _table(path)
    if tab.stats.bad_fdes:
        return True
    return any(s < hi and lo < e for s, e in tab.unparsed_ranges)


def stats(path) -> dict:
    """Counters of the (cached) parse of ``path``: fdes, cies, fdes_with_lsda,
    call_sites, functions_with_pads, landing_pads, bad_fdes, bad_lsdas,
    bad_fde_offsets, unparsed (function starts), errors, reason, seconds."""
    return _table(path).stats.as_dict()


# ---------------------------------------------------------------------------------------
# Function bounds from FDEs (stripped files keep .eh_frame: the unwinder needs it)

def _cie_fde_encoding(buf: bytes, pos: int, end: int) -> int:
    """The FDE pointer encoding ('R' augmentation) of the CIE whose body starts at
    ``pos`` (after its id); DW_EH_PE_absptr when the CIE has none (DWARF 5, 6.4.1 and
    the LSB's .eh_frame augmentation rules)."""
    version = buf[pos]
    aug_end = buf.index(b"\0", pos + 1)
    aug = buf[pos + 1:aug_end].decode("ascii", "replace")
    pos = aug_end + 1
    if "eh" in aug:
        pos += 8
    _, pos = _uleb(buf, pos)                     # code alignment
    _, pos = _sleb(buf, pos)                     # data alignment
    if version == 1:
        pos += 1                                 # return address register
    else:
        _, pos = _uleb(buf, pos)
    if not aug.startswith("z"):
        return 0x00
    _, pos = _uleb(buf, pos)                     # augmentation data length
    for c in aug[1:]:
        if c == "R":
            return buf[pos]
        if c == "P":
            enc = buf[pos]
            _, pos = _read_encoded(buf, pos + 1, enc & ~DW_EH_PE_indirect, 0, 0)
        elif c == "L":
            pos += 1
        elif c not in "SBG":
            break                                # unknown: the rest cannot be read
    return 0x00


def _parse_fde_ranges(path: str) -> list[tuple[int, int]]:
    with open(path, "rb") as f:
        return fde_ranges_of(f)


def fde_ranges_of(f) -> list[tuple[int, int]]:
    """:func:`fde_ranges` of the ELF file open in ``f`` (not cached)."""
    from elftools.elf.elffile import ELFFile
    try:
        elf = ELFFile(f)
        eh = elf.get_section_by_name(".eh_frame")
        if eh is None or eh["sh_type"] == "SHT_NOBITS" or not eh["sh_size"]:
            return []
        buf, base = eh.data(), eh["sh_addr"]
    except Exception:  # noqa: BLE001 - not ELF / truncated: no bounds
        return []
    out: list[tuple[int, int]] = []
    encodings: dict[int, int] = {}
    off = 0
    while off + 8 <= len(buf):
        (length,) = struct.unpack_from("<I", buf, off)
        if length == 0:
            off += 4
            continue
        if length == 0xFFFFFFFF:
            break                                # 64-bit DWARF .eh_frame: not emitted on x86-64
        id_off, nxt = off + 4, off + 4 + length
        if nxt > len(buf):
            break
        (cie_id,) = struct.unpack_from("<I", buf, id_off)
        try:
            if cie_id == 0:
                encodings[off] = _cie_fde_encoding(buf, id_off + 4, nxt)
            else:
                enc = encodings.get(id_off - cie_id)
                if enc is None:
                    enc = encodings[id_off - cie_id] = _cie_fde_encoding(
                        buf, id_off - cie_id + 8, nxt)
                start, pos = _read_encoded(buf, id_off + 4, enc, base, 0)
                size, _ = _read_encoded(buf, pos, enc & 0x0F, base, 0)
                if size:
                    out.append((start, start + size))
        except (LsdaError, IndexError, ValueError, struct.error):
            pass                                 # one unreadable entry: that function unknown
        off = nxt
    out.sort()
    return out


_fde_cache: dict[tuple, list[tuple[int, int]]] = {}


def fde_ranges(path) -> list[tuple[int, int]]:
    """[(start, end)] link-time address ranges of every FDE of ``path``'s .eh_frame,
    sorted: the bounds of every function with unwind information, present in stripped
    binaries.  Empty without .eh_frame; OSError when the file cannot be opened."""
    key = _key(path)
    got = _fde_cache.get(key)
    if got is None:
        got = _fde_cache[key] = _parse_fde_ranges(key[0])
    return got
