"""Probe specs -> absolute addresses in a target (or in an ELF file on disk).

Spec forms (see :func:`parse_spec`)::

    SYMBOL               work
    SYMBOL+OFF           work+0x4, work+16
    LIB:SYMBOL[+OFF]     libc:getpid, libc.so.6:getpid, /lib/x86_64-linux-gnu/libc.so.6:getpid
    0xADDR               0x555555555139   (absolute, in the target's address space)

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

Symbols come from ``.symtab`` and ``.dynsym``, parsed once per file (cached process-wide,
keyed by path + device + inode + mtime + size) with ``struct`` over the section bytes,
which is ~50x faster than iterating pyelftools ``Symbol`` objects on a big libc.
Not handled: separate debug-info files (``.gnu_debuglink``/build-id), the vDSO, DWARF
(inlined functions, line numbers), C++ demangled names (use the mangled name).
"""
from __future__ import annotations

import bisect
import difflib
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable, BinaryIO, Iterator

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .errors import ProbeError, SymbolError
from .target.maps import Mapping as _Mapping, read_maps

__all__ = ["ProbeSpec", "Site", "LoadedObject", "SymbolResolver", "parse_spec",
           "SPEC_FORMS"]

SPEC_FORMS = ("SYMBOL, SYMBOL+0xOFF (or +DEC), LIB:SYMBOL[+0xOFF] (LIB = path, basename "
              "like libc.so.6, or unique prefix like libc), 0xADDR")

# ---------------------------------------------------------------------------------------
# Spec parsing

_ADDR_RE = re.compile(r"0[xX][0-9a-fA-F]+")
_SYM_RE = re.compile(
    r"(?:(?P<lib>[^:+\s]+):)?"                      # LIB:
    r"(?P<sym>[A-Za-z_.$][\w.$]*(?:@@?[\w.]+)?)"    # name, optional @VERSION / @@VERSION
    r"(?:\+(?P<off>0[xX][0-9a-fA-F]+|\d+))?")       # +OFF


@dataclass(frozen=True)
class ProbeSpec:
    """A parsed probe spec.  Either ``symbol`` (with optional ``lib`` and ``offset`` in
    bytes from the symbol) or ``addr`` (absolute, in the target) is set."""
    lib: str | None = None
    symbol: str | None = None
    offset: int = 0
    addr: int | None = None

    def __str__(self) -> str:
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
    m = _SYM_RE.fullmatch(text)
    if not m:
        raise SymbolError(f"bad probe spec {spec!r}; accepted forms: {SPEC_FORMS}")
    off = m.group("off")
    return ProbeSpec(lib=m.group("lib"), symbol=m.group("sym"),
                     offset=int(off, 0) if off else 0)


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


@dataclass(frozen=True)
class _Sym:
    name: str
    value: int          # link-time address
    size: int
    type: int
    bind: int
    hidden: bool        # a non-default symbol version (name@VER, not name@@VER)

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


class _ElfData:
    """Headers (eager, cheap) and symbols (lazy) of one ELF file."""

    def __init__(self, path: str, opener: Callable[[], BinaryIO]):
        self.path = path
        self._opener = opener
        self._lock = threading.Lock()
        self._by_name: dict[str, list[_Sym]] | None = None
        self._func_values: list[int] = []
        self._funcs: list[_Sym] = []
        with opener() as f:
            try:
                elf = ELFFile(f)
                self.is_pie_or_dso = elf["e_type"] == "ET_DYN"
                self.segments = [
                    _Segment(s["p_vaddr"], s["p_offset"], s["p_filesz"], s["p_memsz"],
                             s["p_flags"])
                    for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
                self.soname, self.needed = self._read_dynamic(elf)
            except (ELFError, struct.error, ValueError) as e:
                raise SymbolError(f"{path}: not a readable ELF file ({e})") from None

    @staticmethod
    def _read_dynamic(elf: ELFFile) -> tuple[str | None, list[str]]:
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
    def by_name(self) -> dict[str, list[_Sym]]:
        """name -> defined symbols with that name (versions stripped; hidden-versioned
        ones also under ``name@VER`` when the name carries it)."""
        if self._by_name is None:
            with self._lock:
                if self._by_name is None:
                    self._load_symbols()
        return self._by_name

    def _load_symbols(self) -> None:
        by_name: dict[str, list[_Sym]] = {}
        seen: set[tuple[str, int, int]] = set()
        try:
            f = self._opener()
        except OSError as e:
            raise SymbolError(f"cannot read symbols of {self.path}: {e}") from None
        with f:
            elf = ELFFile(f)
            for sec in elf.iter_sections():
                if sec["sh_type"] not in ("SHT_SYMTAB", "SHT_DYNSYM"):
                    continue
                versym = None
                if sec["sh_type"] == "SHT_DYNSYM":
                    versym = next((v for v in elf.iter_sections()
                                   if v["sh_type"] == "SHT_GNU_versym"), None)
                for sym in self._iter_section(sec, versym):
                    key = (sym.name, sym.value, sym.type)
                    if key in seen:
                        continue
                    seen.add(key)
                    by_name.setdefault(sym.name, []).append(sym)
        funcs: dict[int, _Sym] = {}
        for syms in by_name.values():
            for s in syms:
                if s.is_func and s.size > 0:
                    best = funcs.get(s.value)
                    if best is None or (s.rank(), -s.size) < (best.rank(), -best.size):
                        funcs[s.value] = s
        self._funcs = [funcs[v] for v in sorted(funcs)]
        self._func_values = [s.value for s in self._funcs]
        self._by_name = by_name

    @staticmethod
    def _iter_section(sec, versym) -> Iterator[_Sym]:
        """Defined symbols of one .symtab/.dynsym section (pyelftools), with the GNU
        hidden-version bit from .gnu.version (VERSYM_HIDDEN, 0x8000)."""
        for i, sym in enumerate(sec.iter_symbols()):
            stype = _STT.get(sym["st_info"]["type"], -1)
            shndx = sym["st_shndx"]
            if shndx in ("SHN_UNDEF", "SHN_ABS") or stype in (STT_SECTION, STT_FILE,
                                                              STT_TLS, -1):
                continue  # an undefined symbol is never a definition; TLS is not an address
            name = sym.name
            if not name:
                continue
            bind = _STB.get(sym["st_info"]["bind"], STB_GLOBAL)
            value, size = sym["st_value"], sym["st_size"]
            hidden = False
            if versym is not None and i < versym.num_symbols():
                ndx = versym.get_symbol(i)["ndx"]      # int, or VER_NDX_LOCAL/GLOBAL
                hidden = isinstance(ndx, int) and bool(ndx & 0x8000)
            if "@" in name:  # .symtab spelling: name@VER (hidden) or name@@VER (default)
                base, _, ver = name.partition("@")
                hidden = not ver.startswith("@")
                if hidden:
                    yield _Sym(name, value, size, stype, bind, True)
                name = base
            yield _Sym(name, value, size, stype, bind, hidden)

    def lookup(self, name: str) -> list[_Sym]:
        """Definitions of ``name`` at distinct addresses, best first: functions if any
        are functions, default versions over hidden ones; aliases collapse."""
        syms = self.by_name().get(name, [])
        if any(s.is_func for s in syms):
            syms = [s for s in syms if s.is_func]
        if any(not s.hidden for s in syms):
            syms = [s for s in syms if not s.hidden]
        by_addr: dict[int, _Sym] = {}
        for s in sorted(syms, key=lambda s: (s.rank(), -s.size)):
            by_addr.setdefault(s.value, s)
        return list(by_addr.values())

    def containing_func(self, vaddr: int) -> _Sym | None:
        """The function symbol (with size) covering link-time address ``vaddr``."""
        self.by_name()
        i = bisect.bisect_right(self._func_values, vaddr) - 1
        # Step back over a few neighbours: a small function may be nested/overlapping.
        for j in range(i, max(i - 8, -1), -1):
            s = self._funcs[j]
            if s.value <= vaddr < s.value + s.size:
                return s
        return None

    def all_names(self) -> list[str]:
        return list(self.by_name())

    def segment_for(self, vaddr: int) -> _Segment | None:
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
                return seg
        return None


_ELF_CACHE: dict[tuple, _ElfData] = {}
_ELF_CACHE_LOCK = threading.Lock()


def _elf_data(path: str, st: os.stat_result, opener: Callable[[], BinaryIO]) -> _ElfData:
    key = (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    data = _ELF_CACHE.get(key)
    if data is None:
        data = _ElfData(path, opener)
        with _ELF_CACHE_LOCK:
            data = _ELF_CACHE.setdefault(key, data)
    elif data._by_name is None:
        data._opener = opener  # the previous opener may name a process that is gone
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
            elf = _elf_data(path, st, opener)
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
        if not hits:
            raise SymbolError(f"unknown library {lib!r}; loaded: {', '.join(names)}",
                              candidates=names, pid=self.pid)
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
        if ps.addr is not None:
            return self._resolve_addr(ps.addr, text)
        obj, sym = self._lookup(ps)
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

    def find_object(self, addr: int) -> LoadedObject | None:
        """The loaded ELF object whose mappings contain ``addr`` (None if none)."""
        obj, _ = self._object_for_addr(addr)
        return obj

    def landing_pads(self, func_addr: int, func_size: int) -> list[int] | None:
        """C++ landing pads inside [func_addr, func_addr+func_size) (absolute addresses
        in this resolver's address space), from the file's .eh_frame and
        .gcc_except_table; None when those tables could not be parsed or read (then
        the pads are unknown, not absent).  The unwinder enters them from outside the
        function's own branches."""
        from uprobe_opt import ehtable
        obj = self.find_object(func_addr)
        if obj is None:
            return []
        path, lo = self.local_path(obj), func_addr - obj.bias
        try:
            if ehtable.unparsed_in(path, lo, lo + func_size):
                return None
            return [obj.bias + pad for pad in ehtable.landing_pads_in(path, lo, lo + func_size)]
        except OSError:
            return None

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
        return (func.name, obj.bias + func.value, func.size) if func else None

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
