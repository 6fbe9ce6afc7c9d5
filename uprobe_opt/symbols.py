"""Probe specs -> absolute addresses in a target (or in an ELF file on disk).

Spec forms (see :func:`parse_spec`)::

    SYMBOL               work
    SYMBOL+OFF           work+0x4, work+16
    LIB:SYMBOL[+OFF]     libc:getpid, libc.so.6:getpid, /lib/x86_64-linux-gnu/libc.so.6:getpid
    0xADDR               0x555555555139   (absolute, in the target's address space)
    usdt:[LIB:]PROVIDER:NAME   usdt:python:function__entry (a USDT marker, uprobe_opt.usdt)

Two modes:

* ``SymbolResolver(pid=PID)``: runtime addresses.  Loaded objects come from
  ``/proc/PID/maps``; each object's load bias is computed from its lowest mapping and the
  PT_LOAD segment that covers that mapping's file offset (``bias = start - (p_vaddr -
  p_offset + offset)``), so PIE executables, non-PIE executables and shared libraries are
  handled alike.  ELF files are opened through ``/proc/PID/map_files/START-END`` (the exact
  inode that is mapped, even if deleted or replaced on disk; needs CAP_SYS_ADMIN) and,
  failing that, through ``/proc/PID/root/PATH`` (inode checked).  A deleted file without
  map_files access cannot be read: the error says so.
* ``SymbolResolver(binary=PATH)``: no process; addresses are the ELF's link-time
  addresses (``uprobe-opt explain BINARY``) and ``read_code`` reads the file.

Symbols come from ``.dynsym`` and ``.symtab``, decoded in bulk (:mod:`uprobe_opt.elfsyms`:
pyelftools for the section headers, numpy over the ``Elf64_Sym`` arrays; Debian's libc in
~20 ms where iterating pyelftools ``Symbol`` objects took ~640 ms), parsed once per file
(cached process-wide, keyed by path + device + inode + mtime + size, and on disk by
the file's identity, :mod:`uprobe_opt.filecache`: a second run reads neither pyelftools
nor numpy for a file it has seen).  Where the file has
no name for a name or an address, its separate debug file (build-id or .gnu_debuglink)
or its MiniDebugInfo (.gnu_debugdata) is read once; where no name covers an address,
its .eh_frame FDE gives the function's bounds (unnamed).  Versioned names: ``name@VER`` and
``name@@VER`` name one version; a bare name binds to the default version as the dynamic
linker does.  GNU IFUNC symbols resolve, in a process, to the implementation that
process runs (:mod:`uprobe_opt.ifunc`): the Site's ``spec`` reads
``libc:strlen -> __strlen_avx2``.
Not handled: the vDSO, DWARF (inlined functions, line numbers), C++ demangled names (use
the mangled name).
"""
from __future__ import annotations

import bisect
import dataclasses
import difflib
import fnmatch
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable, BinaryIO, Iterator, NamedTuple

from . import elfsyms, filecache
from .errors import LibraryNotLoaded, ProbeError, SymbolError
from .target.maps import Mapping as _Mapping, read_maps

__all__ = ["ProbeSpec", "Site", "LoadedObject", "SymbolResolver", "parse_spec",
           "SPEC_FORMS"]

SPEC_FORMS = ("SYMBOL, SYMBOL+0xOFF (or +DEC), LIB:SYMBOL[+0xOFF] (LIB = path, basename "
              "like libc.so.6, or unique prefix like libc), SYMBOL@VER / SYMBOL@@VER, "
              "[LIB:]GLOB (libc:str*, one probe per matching function), 0xADDR, "
              "usdt:[LIB:]PROVIDER:NAME (a USDT marker; globs too)")

# ---------------------------------------------------------------------------------------
# Spec parsing

_ADDR_RE = re.compile(r"0[xX][0-9a-fA-F]+")
_SYM_RE = re.compile(
    r"(?:(?P<lib>[^:+\s]+):)?"                      # LIB:
    r"(?P<sym>(?:[A-Za-z_.$*?]|\[!?[\w.$-]+\])(?:[\w.$*?]|\[!?[\w.$-]+\])*"
    r"(?:@@?[\w.*?]+)?)"                             # name or glob, @VER / @@VER
    r"(?:\+(?P<off>0[xX][0-9a-fA-F]+|\d+))?")       # +OFF


@dataclass(frozen=True)
class ProbeSpec:
    """A parsed probe spec.  Either ``symbol`` (with optional ``lib`` and ``offset`` in
    bytes from the symbol) or ``addr`` (absolute, in the target) is set."""
    lib: str | None = None
    symbol: str | None = None
    offset: int = 0
    addr: int | None = None
    usdt: bool = False              # a USDT marker: ``symbol`` is its name
    provider: str | None = None     # the marker's provider (None: any)

    @property
    def is_glob(self) -> bool:
        """The symbol is a shell-style pattern (``str*``, ``mem?py``, ``[ab]*``)."""
        return self.symbol is not None and any(c in self.symbol for c in "*?[")

    def __str__(self) -> str:
        if self.usdt:
            return ":".join(["usdt"] + [p for p in (self.lib, self.provider) if p]
                            + [str(self.symbol)])
        if self.addr is not None:
            return f"{self.addr:#x}"
        text = f"{self.lib}:{self.symbol}" if self.lib else str(self.symbol)
        return f"{text}+{self.offset:#x}" if self.offset else text


def parse_spec(spec: str) -> ProbeSpec:
    """Parse a probe spec; raise SymbolError showing the accepted forms on bad syntax."""
    text = spec.strip() if isinstance(spec, str) else spec
    if not isinstance(text, str) or not text:
        raise SymbolError(f"empty probe spec; accepted forms: {SPEC_FORMS}")
    if _ADDR_RE.fullmatch(text):
        return ProbeSpec(addr=int(text, 16))
    if text.startswith("usdt:"):
        return _parse_usdt(spec, text[5:])
    m = _SYM_RE.fullmatch(text)
    if not m or (m.group("off") and any(c in m.group("sym") for c in "*?[")):
        raise SymbolError(f"bad probe spec {spec!r}; accepted forms: {SPEC_FORMS}")
    off = m.group("off")
    return ProbeSpec(lib=m.group("lib"), symbol=m.group("sym"),
                     offset=int(off, 0) if off else 0)


_USDT_PART = re.compile(r"[\w.$*?\[\]!-]+")


def _parse_usdt(spec: str, rest: str) -> ProbeSpec:
    """``usdt:NAME``, ``usdt:PROVIDER:NAME``, ``usdt:LIB:PROVIDER:NAME`` (bpftrace's
    forms; LIB as for symbols, a path may hold no ``:``)."""
    parts = rest.split(":")
    if not 1 <= len(parts) <= 3 or not all(_USDT_PART.fullmatch(p) for p in parts[-2:]) \
            or not all(parts):
        raise SymbolError(f"bad USDT spec {spec!r}; accepted forms: usdt:PROVIDER:NAME, "
                          "usdt:LIB:PROVIDER:NAME, usdt:NAME")
    lib = parts[0] if len(parts) == 3 else None
    provider = parts[-2] if len(parts) >= 2 else None
    return ProbeSpec(lib=lib, symbol=parts[-1], usdt=True, provider=provider)


@dataclass(frozen=True)
class UsdtSite:
    """What a USDT marker adds to its Site: ``provider``/``name``; ``semaphore`` the
    absolute address of its u16 semaphore (0: none; the link-time one in binary
    mode); ``args`` its decoded argument descriptors (uprobe_opt.x86.sdtargs, symbols
    bound), ``args_text`` the note's string, ``args_error`` why they could not be
    decoded (then ``args`` is empty)."""
    provider: str
    name: str
    semaphore: int
    args: tuple = ()
    args_text: str = ""
    args_error: str | None = None


@dataclass(frozen=True)
class Site:
    """A resolved probe site.  ``addr`` is absolute in the target's address space (the
    link-time address in binary mode); ``func_addr``/``func_size`` describe the containing
    function symbol (None when unknown); ``offset = addr - func_addr`` (None without a
    function); ``file_offset`` is where ``addr``'s byte lives in ``lib_path``."""
    addr: int
    symbol: str | None
    func_addr: int | None
    func_size: int | None
    lib_path: str | None
    offset: int | None
    spec: str
    file_offset: int | None = None
    is_ifunc: bool = False  # the symbol is a GNU IFUNC: this is its *resolver*, run once
    ifunc: str | None = None  # this is the implementation the process runs for IFUNC ``ifunc``
    ifunc_how: str | None = None  # how that implementation was learnt (slot, emulation)
    usdt: UsdtSite | None = None  # the site is this USDT marker


# ---------------------------------------------------------------------------------------
# Per-file ELF data (cached process-wide)

STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE, STT_TLS, STT_GNU_IFUNC = 1, 2, 3, 4, 6, 10
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
SHN_UNDEF, SHN_ABS = 0, 0xFFF1
PF_X, PF_W, PF_R = 1, 2, 4
_FUNC_TYPES = (STT_FUNC, STT_GNU_IFUNC)
_STT = {"STT_NOTYPE": 0, "STT_OBJECT": STT_OBJECT, "STT_FUNC": STT_FUNC,
        "STT_SECTION": STT_SECTION, "STT_FILE": STT_FILE, "STT_COMMON": 5,
        "STT_TLS": STT_TLS, "STT_LOOS": STT_GNU_IFUNC, "STT_GNU_IFUNC": STT_GNU_IFUNC}
_STB = {"STB_LOCAL": STB_LOCAL, "STB_GLOBAL": STB_GLOBAL, "STB_WEAK": STB_WEAK,
        "STB_GNU_UNIQUE": STB_GLOBAL, "STB_LOOS": STB_GLOBAL}


class _Sym(NamedTuple):
    """One defined symbol (a tuple: thousands are built per file, a dataclass is 5x
    slower to construct)."""
    name: str
    value: int          # link-time address
    size: int
    type: int
    bind: int
    hidden: bool        # a non-default symbol version (name@VER, not name@@VER)
    version: str | None = None   # the version name from .gnu.version_d, if any

    @property
    def is_func(self) -> bool:
        return self.type in _FUNC_TYPES

    def rank(self) -> tuple:
        """Sort key for picking the display name among aliases: lower is better."""
        bind = {STB_GLOBAL: 0, STB_WEAK: 1}.get(self.bind, 2)
        return (self.hidden, bind, len(self.name) - len(self.name.lstrip("_")),
                len(self.name), self.name)


@dataclass(frozen=True)
class _Segment:
    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int

    @property
    def perms(self) -> str:
        return "".join(c if self.flags & bit else "-"
                       for c, bit in (("r", PF_R), ("w", PF_W), ("x", PF_X)))


class _SymIndex:
    """Symbols of one source (the file itself, or its debug information): by name, and
    the sized functions sorted by address for containment lookups."""

    def __init__(self, rows):
        # One pass, no per-row Python-level constructor: a start-up builds this for
        # every file it resolves in (20,000 rows for 10,000 functions).
        by_name: dict[str, list[_Sym]] = {}
        seen: set[tuple] = set()
        funcs: dict[int, _Sym] = {}
        make = tuple.__new__
        for row in rows:
            name, value, size, typ, _bind, hidden, version = row
            key = (name, value, typ, version, hidden)
            if key in seen:
                continue     # the same definition in .dynsym and .symtab
            seen.add(key)
            sym = make(_Sym, row)
            by_name.setdefault(name, []).append(sym)
            if version:      # also reachable as name@VER, and name@@VER when default
                by_name.setdefault(f"{name}@{version}", []).append(sym)
                if not hidden:
                    by_name.setdefault(f"{name}@@{version}", []).append(sym)
            if typ in _FUNC_TYPES and size > 0:   # the best-ranked alias per address
                best = funcs.get(value)
                if best is None or (sym.rank(), -size) < (best.rank(), -best.size):
                    funcs[value] = sym
        self.by_name = by_name
        self.funcs = [funcs[v] for v in sorted(funcs)]
        self.func_values = [s.value for s in self.funcs]

    def containing(self, vaddr: int) -> _Sym | None:
        i = bisect.bisect_right(self.func_values, vaddr) - 1
        # Step back over a few neighbours: a small function may be nested/overlapping.
        for j in range(i, max(i - 8, -1), -1):
            s = self.funcs[j]
            if s.value <= vaddr < s.value + s.size:
                return s
        return None


_EMPTY_INDEX = None


class _ElfData:
    """Headers (eager, cheap) and symbols (lazy) of one ELF file.  Symbols come from
    the file itself (primary) and, only where the file has none for a name or an
    address, from its separate debug file or MiniDebugInfo (secondary, loaded on the
    first miss): a stripped file's static functions get names without changing what
    the names the file does carry resolve to."""

    def __init__(self, path: str, opener: Callable[[], BinaryIO], root: str = "",
                 st: os.stat_result | None = None):
        self.path = path
        self._st = st                # the file's stat: the key of its on-disk cache
        self.root = root             # prefix for the debug-file search (/proc/PID/root)
        self._opener = opener
        self._lock = threading.RLock()  # branch_index -> iter_functions -> secondary
        self._primary: _SymIndex | None = None
        self._secondary: _SymIndex | None = None
        self.debug_source: str | None = None   # where the secondary names came from
        self._relocs: tuple[dict, dict] | None = None
        self._branches = None
        self._sweep = None           # the module sweep's per-function facts (arrays)
        self._fdes: list[tuple[int, int]] | None = None
        self._markers = None
        facts = filecache.load("elf", st, _ELF_FACTS_VERSION) if st else None
        if facts is None or not self._set_facts(facts):
            self._set_facts(self._parse_headers(path, opener))
            if st is not None:
                filecache.store("elf", st, _ELF_FACTS_VERSION, self._facts())

    @staticmethod
    def _parse_headers(path: str, opener: Callable[[], BinaryIO]) -> tuple:
        """The facts _set_facts takes, from the file (pyelftools).  Raises SymbolError
        for a file that is not a readable ELF file."""
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
        with opener() as f:
            try:
                elf = ELFFile(f)
                segments = [(s["p_vaddr"], s["p_offset"], s["p_filesz"], s["p_memsz"],
                             s["p_flags"])
                            for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
                soname, needed = _ElfData._read_dynamic(elf)
                sections = elfsyms.read_sections(f)
                build_id = elfsyms.read_build_id(f, sections)
                return (elf["e_type"] == "ET_DYN", segments, soname, needed,
                        [dataclasses.astuple(sec) for sec in sections], build_id)
            except (ELFError, struct.error, ValueError) as e:
                raise SymbolError(f"{path}: not a readable ELF file ({e})") from None

    def _set_facts(self, facts) -> bool:
        """Take the header facts (a tuple of plain data, from _parse_headers or the
        on-disk cache); False, and nothing set, when they do not have that shape."""
        try:
            pie, segments, soname, needed, sections, build_id = facts
            segments = [_Segment(*seg) for seg in segments]
            sections = [elfsyms.Section(*sec) for sec in sections]
            needed = [str(n) for n in needed]
        except (TypeError, ValueError):
            return False
        self.is_pie_or_dso, self.segments, self.soname = bool(pie), segments, soname
        self.needed, self.sections, self.build_id = needed, sections, build_id
        return True

    def _facts(self) -> tuple:
        return (self.is_pie_or_dso, [dataclasses.astuple(seg) for seg in self.segments],
                self.soname, self.needed,
                [dataclasses.astuple(sec) for sec in self.sections], self.build_id)

    @staticmethod
    def _read_dynamic(elf) -> tuple[str | None, list[str]]:
        soname, needed = None, []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_DYNAMIC":
                continue
            for tag in seg.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)
                elif tag.entry.d_tag == "DT_SONAME":
                    soname = tag.soname
        return soname, needed

    # -- symbols -------------------------------------------------------------------------
    def primary(self) -> _SymIndex:
        if self._primary is None:
            with self._lock:
                if self._primary is None:
                    self._primary = _SymIndex(self._primary_rows())
        return self._primary

    def _primary_rows(self) -> list:
        """elfsyms.read_symbols of the file, through the on-disk cache."""
        st = self._st
        rows = filecache.load("syms", st, _ELF_FACTS_VERSION) if st else None
        if isinstance(rows, list) and all(isinstance(r, tuple) and len(r) == 7
                                          for r in rows):
            return rows
        from elftools.common.exceptions import ELFError
        try:
            with self._opener() as f:
                rows = elfsyms.read_symbols(f, self.sections)
        except OSError as e:
            raise SymbolError(f"cannot read symbols of {self.path}: {e}") from None
        except (ELFError, struct.error, ValueError) as e:
            raise SymbolError(f"{self.path}: bad symbol table ({e})") from None
        if st is not None:
            filecache.store("syms", st, _ELF_FACTS_VERSION, rows)
        return rows

    def secondary(self) -> _SymIndex:
        """Names from the separate debug file, else from .gnu_debugdata (empty when
        neither exists or can be read: then the file simply has no more names)."""
        if self._secondary is None:
            with self._lock:
                if self._secondary is None:
                    if self.root and not os.path.isdir(self.root):
                        # the process whose root we would search is gone: do not cache
                        # "no debug names" for the next caller, who has a live one
                        return _SymIndex(())
                    self._secondary = self._load_secondary()
        return self._secondary

    def _load_secondary(self) -> _SymIndex:
        try:
            with self._opener() as f:
                link = elfsyms.read_debuglink(f, self.sections)
                debug = elfsyms.find_debug_file(self.path, self.build_id, link, self.root)
                if debug is not None:
                    with open(debug, "rb") as g:
                        rows = elfsyms.read_symbols(g)
                    self.debug_source = debug
                    return _SymIndex(rows)
                image = elfsyms.read_minidebuginfo(f, self.sections)
                if image is not None:
                    self.debug_source = ".gnu_debugdata"
                    return _SymIndex(elfsyms.symbols_of_image(image))
        except Exception:  # noqa: BLE001 - optional names: unreadable means absent
            pass
        return _SymIndex(())

    def by_name(self) -> dict[str, list[_Sym]]:
        """name -> defined symbols with that name in the file's own tables (versions
        stripped; versioned ones also under ``name@VER``, default ones under
        ``name@@VER``)."""
        return self.primary().by_name

    def lookup(self, name: str) -> list[_Sym]:
        """Definitions of ``name`` at distinct addresses, best first: functions if any
        are functions, default versions over hidden ones (a bare name binds to the
        default version, as the dynamic linker does); aliases collapse.  The debug
        file's names are used only when the file itself has no definition."""
        syms = self.primary().by_name.get(name) or self.secondary().by_name.get(name, [])
        if any(s.is_func for s in syms):
            syms = [s for s in syms if s.is_func]
        if any(not s.hidden for s in syms):
            syms = [s for s in syms if not s.hidden]
        by_addr: dict[int, _Sym] = {}
        for s in sorted(syms, key=lambda s: (s.rank(), -s.size)):
            by_addr.setdefault(s.value, s)
        return list(by_addr.values())

    def containing_func(self, vaddr: int) -> _Sym | None:
        """The function symbol (with size) covering link-time address ``vaddr``: the
        file's own, else the debug file's, else an unnamed function (``name`` None)
        whose bounds are the .eh_frame FDE covering it (stripped files keep them)."""
        found = self.primary().containing(vaddr) or self.secondary().containing(vaddr)
        if found is not None:
            return found
        fdes = self.fde_ranges()
        i = bisect.bisect_right(fdes, (vaddr, 1 << 64)) - 1
        if i >= 0 and fdes[i][0] <= vaddr < fdes[i][1]:
            start, end = fdes[i]
            return _Sym(None, start, end - start, STT_FUNC, STB_LOCAL, False)
        return None

    def fde_ranges(self) -> list[tuple[int, int]]:
        """Sorted (start, end) link-time bounds of every FDE (ehtable.fde_ranges)."""
        if self._fdes is None:
            from uprobe_opt import ehtable
            try:
                with self._opener() as f:
                    self._fdes = ehtable.fde_ranges_of(f)
            except OSError:
                return []
        return self._fdes

    def markers(self) -> list:
        """The file's USDT markers (uprobe_opt.usdt.Marker, link-time), read once."""
        if self._markers is None:
            from uprobe_opt import usdt
            try:
                with self._opener() as f:
                    self._markers = usdt.read_markers(f, self.sections)
            except (OSError, ValueError, struct.error):
                return []
        return self._markers

    def all_names(self) -> list[str]:
        return list(self.primary().by_name) + list(self.secondary().by_name)

    def iter_functions(self) -> list[_Sym]:
        """Every sized function symbol, one per address (best-ranked alias; the file's
        own over the debug file's), sorted by address."""
        best = {s.value: s for s in self.secondary().funcs}
        best.update({s.value: s for s in self.primary().funcs})
        return [best[v] for v in sorted(best)]

    def branch_index(self):
        """(targets, sources): numpy arrays of every direct branch of the file's known
        functions (link-time addresses), sorted by target (x86.branchindex).  Built
        once per file and cached on disk by build-id under ~/.cache/uprobe-opt/branches
        (a rebuilt file has another build-id)."""
        if self._branches is None:
            with self._lock:
                if self._branches is None:
                    self._branches = self._load_branch_index()
        return self._branches

    _SWEEP_KEYS = ("starts", "sizes", "ends", "ind_addrs", "ind_kinds", "by_source")

    def _load_branch_index(self):
        import numpy as np
        path = _branch_cache_path(self.build_id)
        if path is not None:
            try:
                with np.load(path) as z:
                    self._sweep = {k: z[k] for k in self._SWEEP_KEYS}
                    return z["targets"], z["sources"]
            except (OSError, KeyError, ValueError):
                pass
        from uprobe_opt.x86.branchindex import sweep_module
        segs = []
        with self._opener() as f:
            for seg in self.segments:
                if seg.flags & PF_X and seg.filesz:
                    f.seek(seg.offset)
                    segs.append((seg.vaddr, f.read(seg.filesz)))

        def read(start: int, size: int) -> bytes | None:
            for vaddr, data in segs:
                if vaddr <= start and start + size <= vaddr + len(data):
                    return data[start - vaddr:start - vaddr + size]
            return None
        funcs = [(s.value, s.size) for s in self.iter_functions()]
        named = {start for start, _ in funcs}
        funcs += [(lo, hi - lo) for lo, hi in self.fde_ranges() if lo not in named]
        sweep = sweep_module(funcs, read)
        order = np.argsort(np.asarray(sweep.dsts, np.uint64), kind="stable")
        targets = np.asarray(sweep.dsts, np.uint64)[order]
        sources = np.asarray(sweep.srcs, np.uint64)[order]
        fo = np.argsort(np.asarray(sweep.starts, np.uint64), kind="stable")
        io = np.argsort(np.asarray(sweep.ind_addrs, np.uint64), kind="stable")
        self._sweep = {
            "starts": np.asarray(sweep.starts, np.uint64)[fo],
            "sizes": np.asarray(sweep.sizes, np.uint64)[fo],
            "ends": np.asarray(sweep.ends, np.uint64)[fo],
            "ind_addrs": np.asarray(sweep.ind_addrs, np.uint64)[io],
            "ind_kinds": np.asarray(sweep.ind_kinds, np.uint8)[io],
            "by_source": np.argsort(sources, kind="stable")}
        if path is not None:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp.npz"
                np.savez(tmp, targets=targets, sources=sources, **self._sweep)
                os.replace(tmp, path)
            except OSError:
                pass
        return targets, sources

    def function_facts(self, start: int, size: int):
        """The module sweep's x86.branchindex.FunctionFacts of the function at
        link-time ``start`` with ``size`` bytes (None when the sweep did not cover
        exactly that function: the caller decodes it itself)."""
        import numpy as np
        from uprobe_opt.x86.branchindex import INDIRECT_KINDS, FunctionFacts
        targets, sources = self.branch_index()
        sw = self._sweep
        # uint64 keys: a Python int would make numpy compare the array as float64
        # (a copy of it per lookup, and inexact above 2**53).
        i = int(np.searchsorted(sw["starts"], np.uint64(start)))
        if i >= len(sw["starts"]) or int(sw["starts"][i]) != start \
                or int(sw["sizes"][i]) != size:
            return None
        end = start + size
        span = np.array([start, end], np.uint64)
        j, k = np.searchsorted(sw["ind_addrs"], span)
        indirect = (None if j == k else
                    (int(sw["ind_addrs"][j]), INDIRECT_KINDS[int(sw["ind_kinds"][j])]))
        order = sw["by_source"]
        if "sources_sorted" not in sw:
            sw["sources_sorted"] = sources[order]
        a, b = np.searchsorted(sw["sources_sorted"], span)
        own = order[a:b]
        branches = tuple(zip(sources[own].tolist(), targets[own].tolist()))
        return FunctionFacts(int(sw["ends"][i]), indirect, branches)

    def branches_into(self, lo: int, hi: int, exclude: tuple[int, int]) -> dict[int, int]:
        """{target: source} of direct branches landing in [lo, hi) from outside the
        link-time range ``exclude`` (the function's own branches are scanned with it)."""
        import numpy as np
        targets, sources = self.branch_index()
        i, j = np.searchsorted(targets, np.array([lo, hi], np.uint64))
        out: dict[int, int] = {}
        for t, s in zip(targets[i:j].tolist(), sources[i:j].tolist()):
            if not exclude[0] <= s < exclude[1]:
                out.setdefault(t, s)
        return out

    def slot_relocs(self) -> tuple[dict, dict]:
        """(IRELATIVE slots by resolver vaddr, GLOB_DAT/JUMP_SLOT/64 slots by symbol
        name), link-time addresses (elfsyms.read_slot_relocs), parsed once."""
        if self._relocs is None:
            try:
                with self._opener() as f:
                    self._relocs = elfsyms.read_slot_relocs(f, self.sections)
            except (OSError, ValueError):
                self._relocs = ({}, {})
        return self._relocs

    def segment_for(self, vaddr: int) -> _Segment | None:
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
                return seg
        return None


BRANCH_INDEX_VERSION = 3


def _branch_cache_path(build_id: str | None) -> str | None:
    """Where the branch index of a file with this build-id is kept (None: no build-id,
    in-memory only).  ``$UPROBE_OPT_CACHE/..`` like the test targets' cache."""
    if not build_id:
        return None
    env = os.environ.get("UPROBE_OPT_CACHE")
    base = os.path.dirname(env) if env else os.path.join(os.path.expanduser("~"), ".cache",
                                                          "uprobe-opt")
    return os.path.join(base, "branches", f"{build_id}-v{BRANCH_INDEX_VERSION}.npz")


# The format of the "elf" (_ElfData._facts) and "syms" (elfsyms.read_symbols rows)
# entries of uprobe_opt.filecache: bump it when either changes shape or meaning.
_ELF_FACTS_VERSION = 1
_ELF_CACHE: dict[tuple, _ElfData] = {}
_ELF_CACHE_LOCK = threading.Lock()


def _elf_data(path: str, st: os.stat_result, opener: Callable[[], BinaryIO],
              root: str = "") -> _ElfData:
    """The cached data of the file at ``path`` (as the target names it) with stat
    ``st``; parsed once per (path, device, inode, mtime, size) per process."""
    key = (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    data = _ELF_CACHE.get(key)
    if data is None:
        data = _ElfData(path, opener, root, st)
        with _ELF_CACHE_LOCK:
            data = _ELF_CACHE.setdefault(key, data)
    else:
        data._opener = opener  # the previous opener may name a process that is gone
        data.root = root
    return data


# ---------------------------------------------------------------------------------------
# Loaded objects and the resolver

def _read_maps(pid: int) -> list[_Mapping]:
    """The target's mappings (uprobe_opt.target.maps), with /proc errors as SymbolError:
    the resolver is also used without a tracer (``explain -p``)."""
    try:
        return read_maps(pid)
    except ProbeError as e:
        raise SymbolError(str(e), pid=pid) from None


@dataclass
class LoadedObject:
    """One ELF file in the target: ``path`` as the target sees it, ``bias`` = runtime
    address - link-time address (0 for non-PIE executables and in binary mode)."""
    path: str
    bias: int
    is_main: bool
    mappings: list = field(default_factory=list, repr=False)
    elf: _ElfData | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")


class SymbolResolver:
    """Resolve probe specs in process ``pid`` (runtime addresses) or in ELF file
    ``binary`` (link-time addresses).  Everything is read lazily and cached; call
    :meth:`refresh` after the target loaded or unloaded libraries."""

    def __init__(self, pid: int | None = None, binary: str | None = None):
        if (pid is None) == (binary is None):
            raise ValueError("SymbolResolver needs exactly one of pid= or binary=")
        self.pid = pid
        self.binary = os.path.abspath(binary) if binary else None
        self._objects: list[LoadedObject] | None = None
        self._maps: list[_Mapping] | None = None

    def refresh(self) -> None:
        """Forget the maps (not the per-file symbol caches)."""
        self._objects = None
        self._maps = None

    # -- loaded objects ------------------------------------------------------------------
    def iter_libraries(self) -> Iterator[LoadedObject]:
        """Loaded ELF objects in symbol search order: the main executable, LD_PRELOADs,
        then DT_NEEDED breadth first (ld.so's global scope), then the rest (dlopen'ed) by
        address."""
        if self._objects is None:
            self._objects = self._load_binary() if self.binary else self._load_process()
        return iter(self._objects)

    def _load_binary(self) -> list[LoadedObject]:
        path = self.binary
        try:
            st = os.stat(path)
        except OSError as e:
            raise SymbolError(f"cannot open {path}: {e.strerror}") from None
        elf = _elf_data(path, st, lambda: open(path, "rb"))
        return [LoadedObject(path, 0, True, [], elf)]

    def _mappings(self) -> list[_Mapping]:
        if self._maps is None:
            self._maps = _read_maps(self.pid)
        return self._maps

    def _load_process(self) -> list[LoadedObject]:
        groups: dict[tuple, list[_Mapping]] = {}
        for m in self._mappings():
            if m.path and m.inode and not m.path.startswith("["):
                groups.setdefault((m.path, m.inode), []).append(m)
        try:
            exe_ino = os.stat(f"/proc/{self.pid}/exe").st_ino
        except OSError:
            exe_ino = None
        objs = []
        for (path, inode), maps in groups.items():
            if not any(m.is_exec for m in maps):
                continue  # data files, locale archives, ...
            obj = self._make_object(path, inode, maps, inode == exe_ino)
            if obj is not None:
                objs.append(obj)
        return self._search_order(objs)

    def _make_object(self, path, inode, maps, is_main) -> LoadedObject | None:
        first = min(maps, key=lambda m: m.start)
        opener, st = self._opener_for(first, path, inode)
        if opener is None:
            return LoadedObject(path, first.start - first.offset, is_main, maps, None)
        try:
            elf = _elf_data(path, st, opener, f"/proc/{self.pid}/root")
        except SymbolError:
            return None  # an executable mapping of a non-ELF file: not ours to resolve in
        bias = first.start - first.offset
        for seg in elf.segments:
            page_off = seg.offset & ~0xFFF
            if page_off <= first.offset < seg.offset + max(seg.filesz, 1):
                bias = first.start - (seg.vaddr - seg.offset + first.offset)
                break
        return LoadedObject(path, bias, is_main, maps, elf)

    def _opener_for(self, m: _Mapping, path: str, inode: int):
        """(opener, stat) for the file behind mapping ``m``, or (None, None)."""
        mf = f"/proc/{self.pid}/map_files/{m.start:x}-{m.end:x}"
        try:
            st = os.stat(mf)
            return (lambda: open(mf, "rb")), st
        except OSError:
            pass
        clean = path[:-len(" (deleted)")] if path.endswith(" (deleted)") else path
        rooted = f"/proc/{self.pid}/root{clean}"
        try:
            st = os.stat(rooted)
        except OSError:
            return None, None
        if st.st_ino != inode:
            return None, None  # replaced on disk since it was mapped
        return (lambda: open(rooted, "rb")), st

    def _search_order(self, objs: list[LoadedObject]) -> list[LoadedObject]:
        objs.sort(key=lambda o: o.mappings[0].start)
        ordered = [o for o in objs if o.is_main]
        rest = [o for o in objs if not o.is_main]

        def take(match: Callable[[LoadedObject], bool]) -> LoadedObject | None:
            for o in rest:
                if match(o):
                    rest.remove(o)
                    ordered.append(o)
                    return o
            return None

        for pre in self._ld_preload():
            take(lambda o, p=pre: o.path == p or o.name == os.path.basename(p))
        i = 0
        while i < len(ordered):  # breadth first over DT_NEEDED
            elf = ordered[i].elf
            for need in (elf.needed if elf else []):
                take(lambda o, n=need: (o.elf is not None and o.elf.soname == n)
                     or o.name == n)
            i += 1
        return ordered + rest

    def _program_names(self) -> set[str]:
        """Names the main program goes by: argv[0]'s base name and the command name
        (/proc/PID/cmdline, /proc/PID/comm), whatever file they lead to."""
        names = set()
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode(errors="replace")
            names.add(os.path.basename(argv0).split()[0] if argv0.strip() else "")
            with open(f"/proc/{self.pid}/comm") as f:
                names.add(f.read().strip())
        except (OSError, IndexError):
            pass
        names.discard("")
        return names

    def _ld_preload(self) -> list[str]:
        try:
            with open(f"/proc/{self.pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            return []
        for kv in env:
            if kv.startswith(b"LD_PRELOAD="):
                return re.split(r"[:\s]+", kv[11:].decode(errors="replace").strip())
        return []

    def _objects_for_lib(self, lib: str) -> LoadedObject:
        objs = list(self.iter_libraries())
        names = [o.path for o in objs]
        if "/" in lib:
            want = os.path.realpath(lib)
            hits = [o for o in objs if o.path == lib or os.path.realpath(o.path) == want]
        else:
            hits = [o for o in objs if o.name == lib
                    or (o.elf is not None and o.elf.soname == lib)]
            if not hits:
                hits = [o for o in objs if o.name.startswith(lib)]
                if len(hits) > 1:  # "libc" -> libc.so.6 rather than libcrypto.so.3
                    exact = [o for o in hits if o.name[len(lib)] in ".-_"]
                    hits = exact if len(exact) == 1 else hits
        if not hits and "/" not in lib and lib in self._program_names():
            # The program by the name it was started as: /usr/bin/redis-server is a
            # symlink to redis-check-rdb, the name /proc/PID/maps shows.
            hits = [o for o in objs if o.is_main]
        if not hits:
            raise LibraryNotLoaded(f"unknown library {lib!r}; loaded: {', '.join(names)}",
                                   candidates=names, pid=self.pid, lib=lib)
        if len(hits) > 1:
            cands = [o.path for o in hits]
            raise SymbolError(f"library {lib!r} is ambiguous: matches {', '.join(cands)}",
                              candidates=cands, pid=self.pid)
        return hits[0]

    def _object_for_addr(self, addr: int) -> tuple[LoadedObject | None, object]:
        """(object, mapping-or-segment) containing absolute ``addr``."""
        if self.binary:
            obj = next(self.iter_libraries())
            return obj, obj.elf.segment_for(addr)
        for m in self._mappings():
            if m.start <= addr < m.end:
                for o in self.iter_libraries():
                    if m in o.mappings:
                        return o, m
                return None, m
        return None, None

    # -- resolution ----------------------------------------------------------------------
    def resolve(self, spec: str | ProbeSpec) -> Site:
        """Resolve ``spec`` to a :class:`Site` in an executable mapping; raise SymbolError
        for unknown/ambiguous names and libraries, offsets past the function's end and
        addresses that are not executable."""
        ps = spec if isinstance(spec, ProbeSpec) else parse_spec(spec)
        text = str(spec)
        if ps.usdt:
            sites = self._resolve_usdt(ps)
            if len(sites) > 1:
                raise SymbolError(f"{text} names {len(sites)} marker sites ("
                                  + ", ".join(s.spec for s in sites) + ")", pid=self.pid)
            return sites[0]
        if ps.addr is not None:
            return self._resolve_addr(ps.addr, text)
        obj, sym = self._lookup(ps)
        if sym.type == STT_GNU_IFUNC and self.pid is not None and ps.offset == 0:
            return self._resolve_ifunc(obj, sym, text)
        func_addr = obj.bias + sym.value
        addr = func_addr + ps.offset
        if sym.is_func and sym.size and ps.offset >= sym.size:
            raise SymbolError(
                f"{sym.name}+{ps.offset:#x} is past the end of {sym.name} "
                f"(size {sym.size:#x})", pid=self.pid, addr=addr)
        self._check_exec(addr)
        if not sym.is_func or not sym.size:  # an asm label: report the enclosing function
            return self._resolve_addr(addr, text, name=sym.name)
        return Site(addr=addr, symbol=sym.name, func_addr=func_addr, func_size=sym.size,
                    lib_path=obj.path, offset=ps.offset, spec=text,
                    file_offset=self._file_offset(addr),
                    is_ifunc=sym.type == STT_GNU_IFUNC)

    def resolve_all(self, spec: str | ProbeSpec) -> list[Site]:
        """Every site ``spec`` names: one for a plain spec (:meth:`resolve`), one per
        matching sized function for a glob (``libc:str*``; without LIB in every loaded
        object), sorted by address, one per address (aliases collapse, an IFUNC
        becomes its implementation in a process).  Each Site's ``spec`` is
        ``LIB:NAME`` (LIB as given).  SymbolError when nothing matches."""
        ps = spec if isinstance(spec, ProbeSpec) else parse_spec(spec)
        if ps.usdt:
            return self._warmed(self._resolve_usdt(ps))
        if not ps.is_glob:
            return self._warmed([self.resolve(ps)])
        objs = [self._objects_for_lib(ps.lib)] if ps.lib else list(self.iter_libraries())
        sites: dict[int, Site] = {}
        for obj in objs:
            for sym in self._glob_funcs(obj, ps.symbol):
                text = f"{ps.lib}:{sym.name}" if ps.lib else sym.name
                try:
                    site = (self._resolve_ifunc(obj, sym, text)
                            if sym.type == STT_GNU_IFUNC and self.pid is not None
                            else self._func_site(obj, sym, text))
                except SymbolError:
                    continue     # an IFUNC whose implementation cannot be learnt
                sites.setdefault(site.addr, site)
        if not sites:
            where = ", ".join(o.path for o in objs)
            raise SymbolError(f"no function matches {str(ps)!r} in {where}", pid=self.pid)
        return self._warmed([sites[a] for a in sorted(sites)])

    def _resolve_usdt(self, ps: ProbeSpec) -> list[Site]:
        """One Site per location of every USDT marker ``ps`` matches (without LIB in
        every loaded object, in search order).  The site's ``spec`` is
        ``usdt:[LIB:]PROVIDER:NAME`` (LIB as given), with ``#N`` for the N-th
        location when a marker has several.  SymbolError when nothing matches."""
        from uprobe_opt import usdt
        objs = [self._objects_for_lib(ps.lib)] if ps.lib else list(self.iter_libraries())
        out: list[Site] = []
        for obj in objs:
            if obj.elf is None:
                continue
            found = usdt.match_markers(obj.elf.markers(), ps.provider, ps.symbol)
            seen: dict[str, int] = {}
            for m in found:
                seen[m.qualname] = seen.get(m.qualname, 0) + 1
            nth: dict[str, int] = {}
            for m in found:
                nth[m.qualname] = nth.get(m.qualname, 0) + 1
                text = ":".join(["usdt"] + ([ps.lib] if ps.lib else []) + [m.qualname])
                if seen[m.qualname] > 1:
                    text += f"#{nth[m.qualname]}"
                out.append(self._usdt_site(obj, m, text))
        if not out:
            where = ", ".join(o.path for o in objs)
            listed = sorted({m.qualname for o in objs if o.elf is not None
                             for m in o.elf.markers()})
            more = f"; markers there: {', '.join(listed)}" if listed else \
                " (no .note.stapsdt markers there)"
            raise SymbolError(f"no USDT marker matches {str(ps)!r} in {where}{more}",
                              candidates=listed, pid=self.pid)
        return out

    def _usdt_site(self, obj: LoadedObject, marker, text: str) -> Site:
        from uprobe_opt.x86 import sdtargs
        site = self._resolve_addr(obj.bias + marker.pc, text)
        try:
            args = tuple(a.bind(lambda name: self._usdt_symbol(obj, name))
                         for a in sdtargs.parse_args(marker.args))
            err = None
        except sdtargs.SdtArgError as e:
            args, err = (), str(e)
        info = UsdtSite(marker.provider, marker.name,
                        obj.bias + marker.semaphore if marker.semaphore else 0,
                        args, marker.args, err)
        return dataclasses.replace(site, usdt=info)

    @staticmethod
    def _usdt_symbol(obj: LoadedObject, name: str) -> int | None:
        syms = obj.elf.lookup(name) if obj.elf is not None else []
        return obj.bias + syms[0].value if syms else None

    def _warmed(self, sites: list[Site]) -> list[Site]:
        """``sites``, after building (or loading from disk) the branch index of each
        object they lie in: the optimizer consults it later, possibly while every
        thread of the target is stopped, so the sweep happens now, while it runs."""
        done = set()
        for site in sites:
            obj = self.find_object(site.addr) if site.func_addr is not None else None
            if obj is not None and obj.elf is not None and id(obj.elf) not in done:
                done.add(id(obj.elf))
                try:
                    obj.elf.branch_index()
                except (OSError, ValueError):
                    pass     # landing_pads() reports it (None: refused) at check time
        return sites

    @staticmethod
    def _glob_funcs(obj: LoadedObject, pattern: str) -> list[_Sym]:
        """Sized functions of ``obj`` with a name matching ``pattern`` (fnmatch,
        case-sensitive; versioned spellings only when the pattern has an @), the
        best-ranked alias per address, the file's own names over the debug file's."""
        if obj.elf is None:
            return []
        rx = re.compile(fnmatch.translate(pattern))
        want_ver = "@" in pattern
        best: dict[int, _Sym] = {}
        for index in (obj.elf.secondary(), obj.elf.primary()):
            found: dict[int, _Sym] = {}
            for name, syms in index.by_name.items():
                if ("@" in name) != want_ver or not rx.match(name):
                    continue
                for s in syms:
                    if s.is_func and s.size and not (s.hidden and not want_ver):
                        cur = found.get(s.value)
                        if cur is None or s.rank() < cur.rank():
                            found[s.value] = s
            best.update(found)
        return list(best.values())

    def _func_site(self, obj: LoadedObject, sym: _Sym, text: str) -> Site:
        addr = obj.bias + sym.value
        return Site(addr=addr, symbol=sym.name, func_addr=addr, func_size=sym.size,
                    lib_path=obj.path, offset=0, spec=text,
                    file_offset=self._file_offset(addr),
                    is_ifunc=sym.type == STT_GNU_IFUNC)

    def _resolve_ifunc(self, obj: LoadedObject, sym: _Sym, text: str) -> Site:
        """The implementation the process runs for IFUNC ``sym`` (see uprobe_opt.ifunc);
        SymbolError naming the candidates when it cannot be learnt."""
        impl, how = self.find_ifunc_target(obj, sym)
        if impl is None:
            from uprobe_opt import ifunc
            cands = ", ".join(self.ifunc_candidates(obj.bias + sym.value, sym.size)) or "none found"
            why = ifunc.emulation_unavailable()
            raise SymbolError(
                f"{text}: {sym.name} is a GNU IFUNC and the implementation process "
                f"{self.pid} runs could not be learnt (no relocated slot holds it and its "
                f"resolver could not be emulated{f': {why}' if why else ''}); probe one "
                f"by name or address: {cands}", pid=self.pid)
        site = self._resolve_addr(impl, text)
        name = site.symbol if site.func_addr == impl else None
        return dataclasses.replace(site, spec=f"{text} -> {name or f'{impl:#x}'}",
                                   ifunc=sym.name, ifunc_how=how)

    def find_ifunc_target(self, obj: LoadedObject, sym: _Sym) -> tuple[int | None, str]:
        """(absolute address of the implementation process ``pid`` runs for IFUNC
        ``sym`` defined in ``obj``, how it was learnt) or (None, reason)."""
        from uprobe_opt import ifunc
        resolver = obj.bias + sym.value

        def in_code(v: int | None) -> bool:
            return (v is not None and v != resolver
                    and any(m.is_exec and m.start <= v < m.end for m in obj.mappings))

        irel, _named = obj.elf.slot_relocs()
        for slot in irel.get(sym.value, ()):
            value = ifunc.read_word(self.pid, obj.bias + slot)
            if in_code(value):
                return value, f"R_X86_64_IRELATIVE slot {obj.bias + slot:#x} of {obj.name}"
        for other in self.iter_libraries():
            if other.elf is None:
                continue
            for slot in other.elf.slot_relocs()[1].get(sym.name, ()):
                value = ifunc.read_word(self.pid, other.bias + slot)
                if in_code(value):
                    return value, f"GOT slot {other.bias + slot:#x} of {other.name}"
        maps = self._mappings()

        def readable(addr: int) -> bool:
            return any(m.start <= addr < m.end and m.perms.startswith("r")
                       and m.path not in ("[vvar]", "[vsyscall]") for m in maps)
        value = ifunc.emulate_resolver(self.pid, resolver, readable)
        if in_code(value):
            return value, "its resolver, emulated over the process's memory"
        return None, "unresolved"

    def ifunc_candidates(self, resolver: int, size: int) -> list[str]:
        """The functions IFUNC resolver code at ``resolver`` may return (names, or
        addresses when unnamed), from its RIP-relative lea instructions."""
        from uprobe_opt import ifunc
        try:
            code = self.read_code(resolver, size)
        except SymbolError:
            return []
        out = []
        for addr in ifunc.resolver_candidates(code, resolver):
            found = self.find_symbol_for(addr)
            if found is not None and found[1] == addr:
                out.append(found[0])
            elif self._is_code(addr):
                out.append(f"{addr:#x}")
        return out

    def _is_code(self, addr: int) -> bool:
        try:
            self._check_exec(addr)
            return True
        except SymbolError:
            return False

    def find_object(self, addr: int) -> LoadedObject | None:
        """The loaded ELF object whose mappings contain ``addr`` (None if none)."""
        obj, _ = self._object_for_addr(addr)
        return obj

    def function_facts(self, func_addr: int, func_size: int):
        """The module sweep's facts of the function at absolute ``func_addr``
        (x86.branchindex.FunctionFacts, absolute addresses), or None (not swept,
        index unreadable): the analysis then decodes the whole function."""
        obj = self.find_object(func_addr)
        if obj is None or obj.elf is None:
            return None
        try:
            facts = obj.elf.function_facts(func_addr - obj.bias, func_size)
        except (OSError, ValueError):
            return None
        if facts is None or not obj.bias:
            return facts
        b = obj.bias
        return dataclasses.replace(
            facts, end=facts.end + b,
            indirect=None if facts.indirect is None else (facts.indirect[0] + b,
                                                          facts.indirect[1]),
            branches=tuple((s + b, t + b) for s, t in facts.branches))

    def landing_pads(self, func_addr: int, func_size: int) -> list[int] | None:
        """Entry points inside [func_addr, func_addr+func_size) that come from outside
        the function's own branches, as {absolute address: description or None}: C++
        landing pads (the file's .eh_frame and .gcc_except_table; the unwinder enters
        them) and direct branches from other functions of the module (the module's
        branch index; the description names the branch).  None when the exception
        tables could not be parsed or read (then the pads are unknown, not absent)."""
        from uprobe_opt import ehtable
        obj = self.find_object(func_addr)
        if obj is None:
            return []
        path, lo = self.local_path(obj), func_addr - obj.bias
        try:
            if ehtable.unparsed_in(path, lo, lo + func_size):
                return None
            entries = {obj.bias + pad: None
                       for pad in ehtable.landing_pads_in(path, lo, lo + func_size)}
        except OSError:
            return None
        if obj.elf is None:
            return entries
        # Direct branches from elsewhere in the module (module-wide check 3).
        try:
            into = obj.elf.branches_into(lo, lo + func_size, (lo, lo + func_size))
        except (OSError, ValueError):
            return None
        for target, src in into.items():
            entries.setdefault(obj.bias + target, self._describe_branch(obj.bias + src))
        return entries

    def _describe_branch(self, addr: int) -> str:
        """``jmp at 0x... (in FUNC)`` for the branch instruction at absolute ``addr``."""
        from uprobe_opt.x86.decode import decode
        found = self.find_symbol_for(addr)
        where = f" (in {found[0]})" if found else ""
        try:
            insns = decode(self.read_code(addr, 15), addr)
            what = insns[0].mnemonic if insns else "branch"
        except SymbolError:
            what = "branch"
        return f"{what} at {addr:#x}{where}"

    def local_path(self, obj: LoadedObject) -> str:
        """A path the tracer can open for ``obj``'s file (through /proc/PID/root in pid
        mode, so a target in another mount namespace works)."""
        if self.pid is None or not os.path.isabs(obj.path):
            return obj.path
        return f"/proc/{self.pid}/root{obj.path}"

    def _resolve_addr(self, addr: int, text: str, name: str | None = None) -> Site:
        self._check_exec(addr)
        obj, _ = self._object_for_addr(addr)
        func = obj.elf.containing_func(addr - obj.bias) if obj and obj.elf else None
        func_addr = obj.bias + func.value if func else None
        return Site(addr=addr, symbol=func.name if func else name, func_addr=func_addr,
                    func_size=func.size if func else None,
                    lib_path=obj.path if obj else None,
                    offset=addr - func_addr if func else None, spec=text,
                    file_offset=self._file_offset(addr),
                    is_ifunc=bool(func and func.type == STT_GNU_IFUNC))

    def _lookup(self, ps: ProbeSpec) -> tuple[LoadedObject, _Sym]:
        objs = [self._objects_for_lib(ps.lib)] if ps.lib else list(self.iter_libraries())
        searched = []
        for obj in objs:
            if obj.elf is None:
                continue
            searched.append(obj)
            syms = obj.elf.lookup(ps.symbol)
            if len(syms) > 1:
                self._raise_ambiguous(ps.symbol, obj, syms)
            if syms:
                return obj, syms[0]  # first definition in search order wins, like ld.so
        self._raise_unknown(ps.symbol, searched, objs)

    def _raise_ambiguous(self, name: str, obj: LoadedObject, syms: list[_Sym]):
        bind = {STB_LOCAL: "local", STB_GLOBAL: "global", STB_WEAK: "weak"}
        desc = [f"{obj.bias + s.value:#x} ({bind.get(s.bind, '?')}, size {s.size:#x})"
                for s in syms]
        raise SymbolError(
            f"symbol {name!r} is ambiguous in {obj.path}: defined at {', '.join(desc)}; "
            f"use an address", candidates=[f"{obj.bias + s.value:#x}" for s in syms],
            pid=self.pid)

    def _raise_unknown(self, name: str, searched: list[LoadedObject],
                       objs: list[LoadedObject]):
        names: set[str] = set()
        for obj in searched:
            names.update(obj.elf.all_names())
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        where = ", ".join(o.path for o in searched) or "no readable ELF files"
        unreadable = [o.path for o in objs if o.elf is None]
        msg = f"unknown symbol {name!r} in {where}"
        if close:
            msg += f"; did you mean: {', '.join(close)}?"
        if unreadable:
            msg += (f" (could not read {', '.join(unreadable)}: deleted or replaced on "
                    "disk and /proc/PID/map_files is not accessible)")
        raise SymbolError(msg, candidates=close, pid=self.pid)

    def _check_exec(self, addr: int) -> None:
        obj, where = self._object_for_addr(addr)
        if where is None:
            scope = f"process {self.pid}" if self.pid else self.binary
            raise SymbolError(f"{addr:#x} is not in any mapping of {scope}",
                              pid=self.pid, addr=addr)
        if isinstance(where, _Segment):
            if not where.flags & PF_X or addr >= where.vaddr + where.filesz:
                raise SymbolError(f"{addr:#x} is in {self.binary} ({where.perms}), "
                                  "not executable", pid=self.pid, addr=addr)
        elif not where.is_exec:
            raise SymbolError(f"{addr:#x} is in {where.path or 'an anonymous mapping'} ({where.perms}), "
                              "not executable", pid=self.pid, addr=addr)

    def _file_offset(self, addr: int) -> int | None:
        obj, where = self._object_for_addr(addr)
        if isinstance(where, _Segment):
            return where.offset + (addr - where.vaddr)
        if where is not None and where.path and where.inode:
            return where.offset + (addr - where.start)
        return None

    # -- lookups for printing and for the core -------------------------------------------
    def find_symbol_for(self, addr: int) -> tuple[str, int, int] | None:
        """(name, func_addr, func_size) of the function containing absolute ``addr``."""
        obj, _ = self._object_for_addr(addr)
        if obj is None or obj.elf is None:
            return None
        func = obj.elf.containing_func(addr - obj.bias)
        if func is None:
            return None
        return (func.name or f"{obj.bias + func.value:#x}", obj.bias + func.value, func.size)

    def find_data_symbol(self, name: str, lib: str | None = None) -> int | None:
        """Absolute address of symbol ``name`` (any type, e.g. an object), first
        definition in search order; None if absent or ``lib`` is not loaded."""
        try:
            objs = [self._objects_for_lib(lib)] if lib else list(self.iter_libraries())
        except SymbolError:
            return None
        for obj in objs:
            syms = obj.elf.by_name().get(name) if obj.elf else None
            if syms:
                best = min(syms, key=_Sym.rank)
                return obj.bias + best.value
        return None

    def find_rseq_offset(self) -> int | None:
        """Address of glibc's ``__rseq_offset`` (in ld.so); the caller reads its value
        (a ptrdiff_t: rseq area = thread pointer + value) from the target's memory."""
        return self.find_data_symbol("__rseq_offset")

    def read_code(self, addr: int, size: int) -> bytes:
        """``size`` ORIGINAL bytes at ``addr`` as stored in the ELF file (not the live
        process: our int3/jmp patches are never seen).  Raises SymbolError when the
        address is not file-backed or the file is unreadable."""
        out = bytearray()
        while len(out) < size:
            cur = addr + len(out)
            obj, where = self._object_for_addr(cur)
            if isinstance(where, _Segment):
                avail = where.vaddr + where.filesz - cur
            elif where is not None:
                avail = where.end - cur
            else:
                avail = 0
            foff = self._file_offset(cur)
            if avail <= 0 or foff is None or obj is None:
                raise SymbolError(f"{cur:#x} is not backed by a file; cannot read the "
                                  "original code", pid=self.pid, addr=cur)
            out += self._read_file(obj, where, foff, min(avail, size - len(out)))
        return bytes(out)

    def _read_file(self, obj: LoadedObject, where, foff: int, n: int) -> bytes:
        if self.binary:
            opener = lambda: open(self.binary, "rb")  # noqa: E731
        else:
            opener, _ = self._opener_for(where, obj.path, where.inode)
        if opener is None:
            raise SymbolError(f"cannot read {obj.path} (deleted or replaced on disk, and "
                              f"/proc/{self.pid}/map_files is not accessible)",
                              pid=self.pid)
        with opener() as f:
            f.seek(foff)
            data = f.read(n)
        if len(data) != n:
            raise SymbolError(f"short read from {obj.path} at file offset {foff:#x}",
                              pid=self.pid)
        return data
