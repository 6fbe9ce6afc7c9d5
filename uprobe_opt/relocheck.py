"""``uprobe-opt check-reloc``: prove the relocator by differential emulation.

For every function entry of the given ELF files (after endbr64, as the tool probes it;
with ``--all-boundaries`` also every instruction boundary in the first 32 bytes) this
runs the safety analysis (``x86.can_optimize``).  Each site it calls optimizable is then
run twice in unicorn from the same randomized state:

* the ORIGINAL region at its link-time address, until rip leaves ``[addr, addr+size)``
  (or branches back to ``addr``);
* the DETOUR built by ``x86.build_detour`` at a slot a random distance away (one state
  per site puts it near the +-2 GiB limit), entered at the slot (the 5-byte jump is
  written at ``addr`` too), until rip leaves the slot;

and compares: the 16 GPRs, the arithmetic flags and DF, xmm0-15, every byte either run
wrote (the red zone ``[rsp-128, rsp)`` included), the addresses the region read, and
where control goes next (the same absolute address).  Every state runs the detour twice,
with ``HandlerSpec("none")`` and with a per-CPU ``count`` handler (even states) or a
``record`` handler (odd states, a 4-record ring): the counter increment, the record
(checked field by field against the state at the site) and the rseq_cs word (0 again
afterwards) must be the only extra writes besides the detour's scratch below the red
zone.  In states 0, 1, 4, 5, ... the detour's restartable sequence is aborted once, at
one of its instructions, the way the kernel does it (rseq_cs cleared, rip = abort_ip):
the count must still grow by exactly one.

Memory is mapped on demand: any page either run touches is filled from a function of
(state, page address) only, so both runs see the same bytes wherever they look.  Pages
hold a mix of random bytes and canonical pointers, so a pointer loaded from memory can
be followed.  Registers that the region uses as memory bases get canonical pointers.

Outcomes per site: ``optimizable`` or the Refusal's reason; for optimizable sites
``skipped`` (nondeterministic instructions such as rdtsc/cpuid, or instructions unicorn
cannot execute, e.g. AVX2) or checked, with any mismatch reported with its bytes,
instructions, and diverging state.  Not compared: the x87/AVX upper state, segment
registers other than fs base, and what a syscall does (runs stop AT a syscall).
"""
from __future__ import annotations

import functools
import json
import os
import random
import shutil
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import capstone
import unicorn
import unicorn.x86_const as UX
from capstone import x86_const as CX

from uprobe_opt import x86
from uprobe_opt.errors import SymbolError
from uprobe_opt.symbols import SymbolResolver
from uprobe_opt.x86 import ringlayout as RL
from uprobe_opt.x86.writer import fits_rel32

__all__ = ["CodeImage", "Function", "Site", "Mismatch", "FileReport", "iter_functions", "find_sites",
           "check_site", "check_code", "check_file", "default_corpus", "add_parser", "cmd_check_reloc"]

PAGE = 0x1000
INT32_MAX = (1 << 31) - 1
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_UREG = {n: getattr(UX, f"UC_X86_REG_{n.upper()}") for n in GPRS + ("rip", "eflags")}
_XMM = tuple(getattr(UX, f"UC_X86_REG_XMM{i}") for i in range(16))
FLAGS_MASK = 0x240FD5            # CF PF AF ZF SF TF IF DF OF AC ID (not RF, VM, reserved)
BOUNDARY_WINDOW = 32            # bytes from the entry scanned with --all-boundaries
MAX_INSNS = 400                 # instructions per run (a detour is < 60)

# Address space of the emulated process (link-time code addresses are low; all our own
# areas are high, canonical, and far from any slot within +-2 GiB of the code).  Only the
# code, the slot and the rseq cpu_id are mapped up front; the stack, TLS, heap and data
# pages are mapped on first touch with the state's fill.
STACK_BASE, STACK_SIZE = 0x7FFE_0000_0000, 0x10000
TLS_BASE = 0x7FFC_0000_2000           # fs base; the TLS block is mapped on demand
HEAP_BASE, HEAP_SPAN = 0x5500_0000_0000, 1 << 32
FAR_COUNTERS = 0x6000_0000_0000
SLOT_MIN, SLOT_MAX = 0x10000, 0x7FFF_0000_0000
RSEQ_OFFSET = -0x7A0                  # struct rseq at fs + this (cpu_id at +4)
NCPU_SLOTS = 2
RING_RECORDS = 4                      # the record handler's ring (header page + records)
RING_DISTANCE = 0x10000               # ring = counter's page + this
PROBE_ID = 0x5EC

# Instructions whose result unicorn cannot reproduce the way the CPU does.
NONDETERMINISTIC = frozenset({
    "rdtsc", "rdtscp", "rdrand", "rdseed", "cpuid", "xgetbv", "rdpid", "rdpmc",
    "rdpkru", "xsave", "xsavec", "xsaveopt", "xsaves", "xrstor", "xrstors", "xsave64",
    "xsavec64", "xsaveopt64", "xrstor64", "rdsspq", "rdsspd", "incsspq", "incsspd",
    "umwait", "tpause"})
_STRING_OPS = ("movs", "stos", "lods", "scas", "cmps", "ins", "outs")

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_CS.detail = True


# ---------------------------------------------------------------------------------------
# Functions and sites

@dataclass(frozen=True)
class Function:
    """A function symbol: link-time ``addr``, ``size`` in bytes, best alias ``name``."""
    name: str
    addr: int
    size: int


@dataclass(frozen=True)
class Site:
    """A probe site: ``addr`` inside ``func`` (its entry, after endbr64, or a later
    instruction boundary)."""
    addr: int
    func: Function


class CodeImage:
    """The ORIGINAL bytes of an ELF's executable segments at link-time addresses."""

    def __init__(self, path: str):
        self.path = path
        self.resolver = SymbolResolver(binary=path)
        self.obj = next(self.resolver.iter_libraries())
        self._segs: list[tuple[int, bytes]] = []
        for seg in self.obj.elf.segments:
            if seg.flags & 1 and seg.filesz:         # PF_X
                self._segs.append((seg.vaddr, self.resolver.read_code(seg.vaddr, seg.filesz)))

    @classmethod
    def from_bytes(cls, code: bytes, addr: int, name: str = "<bytes>") -> "CodeImage":
        """An image holding one code blob at ``addr`` (unit tests; reproducing a site)."""
        self = cls.__new__(cls)
        self.path, self.resolver, self.obj = name, None, None
        self._segs = [(addr, bytes(code))]
        return self

    def read(self, addr: int, size: int) -> bytes | None:
        """``size`` bytes at ``addr`` if one executable segment holds them all."""
        for vaddr, data in self._segs:
            if vaddr <= addr and addr + size <= vaddr + len(data):
                return data[addr - vaddr: addr - vaddr + size]
        return None

    def read_page(self, page: int) -> bytes:
        """The page at ``page`` with executable bytes filled in, zero elsewhere."""
        out = bytearray(PAGE)
        for vaddr, data in self._segs:
            lo, hi = max(page, vaddr), min(page + PAGE, vaddr + len(data))
            if lo < hi:
                out[lo - page: hi - page] = data[lo - vaddr: hi - vaddr]
        return bytes(out)


def iter_functions(image: CodeImage) -> list[Function]:
    """STT_FUNC/IFUNC symbols with a size whose bytes lie in an executable segment, one
    per address (aliases collapse to the best-ranked name), sorted by address."""
    best: dict[int, object] = {}
    for syms in image.obj.elf.by_name().values():
        for s in syms:
            if not s.is_func or s.size <= 0:
                continue
            cur = best.get(s.value)
            if cur is None or (s.rank(), -s.size) < (cur.rank(), -cur.size):
                best[s.value] = s
    funcs = [Function(s.name, s.value, s.size) for s in best.values()]
    return sorted((f for f in funcs if image.read(f.addr, f.size) is not None),
                  key=lambda f: f.addr)


def find_sites(image: CodeImage, funcs: Iterable[Function],
               all_boundaries: bool = False) -> list[Site]:
    """Each function's probe address for ``func+0`` (after endbr64, like the tool), and
    with ``all_boundaries`` every instruction start in its first 32 bytes; one site per
    address."""
    sites: dict[int, Site] = {}
    for f in funcs:
        code = image.read(f.addr, f.size)
        entry = x86.skip_endbr(code, f.addr, f.addr)
        if entry < f.addr + f.size:
            sites.setdefault(entry, Site(entry, f))
        if all_boundaries:
            window = code[: min(f.size, BOUNDARY_WINDOW + 15)]
            for insn in x86.decode(window, f.addr):
                if insn.addr >= f.addr + BOUNDARY_WINDOW:
                    break
                if insn.addr >= entry:
                    sites.setdefault(insn.addr, Site(insn.addr, f))
    return [sites[a] for a in sorted(sites)]


# ---------------------------------------------------------------------------------------
# Randomized machine state

@functools.lru_cache(maxsize=1024)
def _page_fill(seed: int, zero: bool, page: int) -> bytes:
    """The bytes of ``page`` in a state: a function of (seed, page) only, so both runs
    see the same memory.  Qwords are random or canonical heap pointers."""
    if zero:
        return bytes(PAGE)
    rng = random.Random(seed * 0x9E3779B97F4A7C15 ^ page)
    raw = bytearray(rng.randbytes(PAGE))
    for i in range(0, PAGE, 16):        # every other qword slot may hold a pointer
        if raw[i] & 1:
            ptr = HEAP_BASE + (int.from_bytes(raw[i: i + 8], "little") % HEAP_SPAN)
            raw[i: i + 8] = ptr.to_bytes(8, "little")
    return bytes(raw)


@dataclass
class State:
    """One randomized starting state for a site (all runs of the state share it)."""
    index: int
    regs: dict[str, int]
    xmm: tuple[int, ...]
    eflags: int
    fill_seed: int
    zero_fill: bool
    cpu_id: int
    slot_addr: int
    alt_slot_addr: int          # used when build_detour refuses slot_addr (out of reach)
    counter_addr: int

    @property
    def rsp(self) -> int:
        return self.regs["rsp"]


def _region_roles(region) -> tuple[set[str], set[str], bool]:
    """(registers used as memory bases, as memory indexes, region has a rep string op)."""
    bases, indexes, rep = set(), set(), False
    for ci in _CS.disasm(region.orig, region.addr):
        for op in ci.operands:
            if op.type == CX.X86_OP_MEM:
                if op.mem.base not in (0, CX.X86_REG_RIP):
                    bases.add(_CS.reg_name(op.mem.base))
                if op.mem.index != 0:
                    indexes.add(_CS.reg_name(op.mem.index))
        if ci.mnemonic.split()[-1].startswith(_STRING_OPS):
            bases.update(("rsi", "rdi"))
            rep = rep or ci.mnemonic.startswith("rep")
        if ci.mnemonic in ("leave", "xlatb"):
            bases.add("rbp" if ci.mnemonic == "leave" else "rbx")
    return _full_regs(bases), _full_regs(indexes), rep


def _subreg_table() -> dict[str, str]:
    table = {}
    for r in GPRS:
        if r[1].isdigit():                         # r8..r15: r8d r8w r8b
            names = (r, r + "d", r + "w", r + "b")
        elif r[2] == "x":                          # rax: eax ax al ah
            names = (r, "e" + r[1:], r[1:], r[1] + "l", r[1] + "h")
        else:                                      # rsi: esi si sil
            names = (r, "e" + r[1:], r[1:], r[1:] + "l")
        table.update(dict.fromkeys(names, r))
    return table


_SUBREG = _subreg_table()


def _full_regs(names: Iterable[str]) -> set[str]:
    """64-bit GPR names for capstone (sub-)register names; others dropped."""
    return {_SUBREG[n] for n in names if n in _SUBREG}


def _random_value(rng: random.Random) -> int:
    kind = rng.random()
    if kind < 0.45:
        return HEAP_BASE + rng.randrange(HEAP_SPAN)
    if kind < 0.75:
        return rng.choice((0, 1, 2, 0xFFFFFFFFFFFFFFFF, rng.randrange(256), rng.randrange(1 << 32)))
    return rng.getrandbits(64)


def _pick_slot(rng: random.Random, region, near_limit: bool, code_pages: set[int],
               span: int = INT32_MAX) -> int:
    """A 16-byte aligned slot address whose detour the probe's jmp rel32 reaches: near
    the +-2 GiB limit or at a random distance; never on the function's code pages."""
    jmp_end = region.addr + x86.JMP_REL32_SIZE
    for _ in range(64):
        if near_limit:
            sign = rng.choice((1, -1))
            dist = INT32_MAX - rng.randrange(0, 4 * x86.SLOT_SIZE, 16) if sign > 0 \
                else -(INT32_MAX + 1) + rng.randrange(0, 4 * x86.SLOT_SIZE, 16)
        else:
            dist = rng.randrange(-span - 1, span - x86.SLOT_SIZE)
        slot = (jmp_end + dist + 15) & ~15
        if not fits_rel32(jmp_end, slot):
            slot -= 16
        if SLOT_MIN <= slot <= SLOT_MAX and not _pages(slot, x86.SLOT_SIZE) & code_pages:
            return slot
    return (jmp_end + PAGE * 64) & ~15     # tiny address space: just after the code


def make_state(seed: int, site: Site, region, index: int, code_pages: set[int]) -> State:
    """State ``index`` of a site, a function of (seed, site address, index) only."""
    rng = random.Random(f"{seed}:{site.addr:#x}:{index}")
    bases, indexes, rep = _region_roles(region)
    regs = {n: _random_value(rng) for n in GPRS}
    for n in bases:
        regs[n] = HEAP_BASE + rng.randrange(HEAP_SPAN)
    for n in indexes - bases:
        regs[n] = rng.randrange(64)
    if rep:
        regs["rcx"] = rng.randrange(8)
    regs["rsp"] = STACK_BASE + STACK_SIZE // 2 + rng.randrange(0, 0x1000, 16) + rng.choice((0, 8))
    if "rbp" in bases and rng.random() < 0.5:
        regs["rbp"] = regs["rsp"] + rng.randrange(0, 0x200, 8)
    eflags = 0x202 | sum(bit for bit in (0x1, 0x4, 0x10, 0x40, 0x80, 0x800)
                         if rng.random() < 0.5)
    slot = _pick_slot(rng, region, index == 0, code_pages)
    alt_slot = _pick_slot(rng, region, False, code_pages, span=1 << 24)
    if index % 2:
        counter = FAR_COUNTERS + rng.randrange(0, 1 << 20, 64)
    else:
        counter = ((slot & ~(PAGE - 1)) + PAGE * rng.choice((-2, 2))) + rng.randrange(0, 0x800, 64)
    return State(index, regs, tuple(rng.getrandbits(128) for _ in range(16)), eflags,
                 rng.getrandbits(62), index % 4 == 3, rng.choice((-1, 0, 1, 2, 3, 7, 12, 63)),
                 slot, alt_slot, counter)


def _pages(addr: int, size: int) -> set[int]:
    return set(range(addr & ~(PAGE - 1), addr + size, PAGE))


# ---------------------------------------------------------------------------------------
# Emulation

@dataclass
class Outcome:
    """The end of one run.  ``stop``: ("exit", next rip) when rip left the code,
    ("syscall", original address of the syscall) when a run reached one, ("fault",
    address) for an access to an unmappable address, ("limit", 0) after MAX_INSNS,
    ("error", text) for any other emulator error."""
    stop: tuple[str, object]
    regs: dict[str, int]
    xmm: tuple[int, ...]
    writes: set[int]            # byte addresses written by the region (or its copy)
    extra_writes: set[int]      # byte addresses the detour wrote before its relocated part
    reads: set[tuple[int, int]]  # (addr, size) read by the region (or its copy)
    starts: set[int]            # first byte of every access by the region (or its copy)
    emu: "_Emu"


class _Emu:
    """One unicorn machine for one run of one state."""

    def __init__(self, pages: dict[int, bytes], state: State):
        self.uc = uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.state = state
        self.mapped: dict[int, None] = {}
        self.phase = 1                  # 0: detour code before the relocated region
        self.aborted = False            # a restartable sequence was aborted
        self.stop: tuple[str, object] | None = None
        self.writes: list[tuple[int, int, int]] = []
        self.reads: list[tuple[int, int, int]] = []
        for page, data in pages.items():
            self.map_page(page, data)
        tls_cpu = TLS_BASE + RSEQ_OFFSET + 4
        self.map_page(tls_cpu & ~(PAGE - 1))
        uc.mem_write(tls_cpu, (state.cpu_id & 0xFFFFFFFF).to_bytes(4, "little"))
        for name, value in state.regs.items():
            uc.reg_write(_UREG[name], value)
        uc.reg_write(_UREG["eflags"], state.eflags)
        for reg, value in zip(_XMM, state.xmm):
            uc.reg_write(reg, value)
        uc.reg_write(UX.UC_X86_REG_FS_BASE, TLS_BASE)
        uc.hook_add(unicorn.UC_HOOK_MEM_READ_UNMAPPED | unicorn.UC_HOOK_MEM_WRITE_UNMAPPED,
                    self._on_unmapped)
        uc.hook_add(unicorn.UC_HOOK_MEM_FETCH_UNMAPPED, self._on_fetch_unmapped)
        uc.hook_add(unicorn.UC_HOOK_MEM_READ | unicorn.UC_HOOK_MEM_WRITE, self._on_access)

    # -- memory -----------------------------------------------------------------------
    def fill(self, page: int) -> bytes:
        return _page_fill(self.state.fill_seed, self.state.zero_fill, page)

    def map_page(self, page: int, data: bytes | None = None) -> None:
        self.uc.mem_map(page, PAGE)
        self.uc.mem_write(page, self.fill(page) if data is None else data)
        self.mapped[page] = None

    def _on_unmapped(self, uc, access, addr, size, value, _):
        try:
            for page in sorted(_pages(addr, max(size, 1))):
                if page not in self.mapped:
                    self.map_page(page)
        except unicorn.UcError:
            self.stop = ("fault", addr)      # non-canonical: the CPU would #GP
            return False
        return True

    def _on_fetch_unmapped(self, uc, access, addr, size, value, _):
        self.stop = self.stop or ("exit", addr)
        return False

    def _on_access(self, uc, access, addr, size, value, _):
        (self.writes if access == unicorn.UC_MEM_WRITE else self.reads).append(
            (addr, size, self.phase))

    def read_bytes(self, addrs: Iterable[int]) -> dict[int, int]:
        """Current value of each byte address (the state's fill where never mapped)."""
        cache: dict[int, bytes] = {}
        out = {}
        for a in addrs:
            page = a & ~(PAGE - 1)
            if page not in cache:
                cache[page] = (bytes(self.uc.mem_read(page, PAGE)) if page in self.mapped
                               else self.fill(page))
            out[a] = cache[page][a - page]
        return out

    # -- running ----------------------------------------------------------------------
    def run(self, start: int, on_code: Callable[[int], tuple | None]) -> Outcome:
        def hook(uc, pc, size, _):
            stop = on_code(pc)
            if stop is not None:
                self.stop = stop
                uc.emu_stop()
        self.uc.hook_add(unicorn.UC_HOOK_CODE, hook)
        try:
            self.uc.emu_start(start, 0, count=MAX_INSNS)
        except unicorn.UcError as e:
            if self.stop is None:
                self.stop = ("error", str(e))
        return self.outcome()

    def outcome(self) -> Outcome:
        uc = self.uc
        regs = {n: uc.reg_read(_UREG[n]) for n in GPRS}
        regs["eflags"] = uc.reg_read(_UREG["eflags"]) & FLAGS_MASK

        def spread(items, phase):
            return {a + i for a, s, p in items if p == phase for i in range(s)}
        return Outcome(self.stop or ("limit", 0), regs, tuple(uc.reg_read(r) for r in _XMM),
                       spread(self.writes, 1), spread(self.writes, 0),
                       {(a, s) for a, s, p in self.reads if p == 1},
                       {a for a, s, p in self.reads + self.writes if p == 1}, self)


def _is_syscall(emu: _Emu, pc: int) -> bool:
    return bytes(emu.uc.mem_read(pc, 2)) in (b"\x0f\x05", b"\x0f\x34")


def run_original(pages: dict[int, bytes], state: State, region) -> Outcome:
    """Run the region at its own address until rip leaves it or comes back to its start
    (a branch back; a rep string instruction at the start repeats in place instead);
    stop AT a syscall (what the kernel does is not ours to compare)."""
    emu = _Emu(pages, state)
    syscalls = {i.addr for i in region.insns if i.kind == "syscall"}
    first = region.insns[0]
    rep_first = bool({0xF2, 0xF3} & set(first.prefixes)) and \
        first.mnemonic.split()[-1].startswith(_STRING_OPS)
    prev = [None]
    last = region.insns[-1].addr
    emu.reached_last = False

    def on_code(pc):
        if pc == last:
            emu.reached_last = True      # an exit detour's handler runs only then
        if prev[0] is not None:
            if not region.addr <= pc < region.end:
                return ("exit", pc)
            if pc == region.addr and not (rep_first and prev[0] == pc):
                return ("exit", pc)
        prev[0] = pc
        return ("syscall", pc) if pc in syscalls else None
    return emu.run(region.addr, on_code)


def ring_addr(state: State) -> int:
    return (state.counter_addr & ~(PAGE - 1)) + RING_DISTANCE


def missed_addr(state: State) -> int:
    return state.counter_addr + 64 * (NCPU_SLOTS + 1)


def _ring_count(handler) -> int:
    return RL.nrings(NCPU_SLOTS, handler.per_cpu)


def _hit_ring(state: State, handler) -> int:
    """Address of the ring a hit in ``state`` appends to (its CPU's, or the shared)."""
    index = state.cpu_id if handler.per_cpu and 0 <= state.cpu_id < NCPU_SLOTS \
        else RL.shared_index(NCPU_SLOTS, handler.per_cpu)
    return RL.ring_addr(ring_addr(state), index, RING_RECORDS)


def _abort_pc(state: State, detour) -> int | None:
    """The instruction of one of the detour's restartable sequences (chosen by the
    state's seed) at which this state is preempted (every other state), or None."""
    if not detour.rseq or (state.index // 2) % 2:
        return None
    rng = random.Random(state.fill_seed)
    start, post, _ = detour.rseq[rng.randrange(len(detour.rseq))]
    insns = x86.decode(detour.code[start - detour.slot_addr: post - detour.slot_addr], start)
    return insns[rng.randrange(len(insns))].addr


def run_detour(pages: dict[int, bytes], state: State, detour, handler=None) -> Outcome:
    """Enter the detour at its slot (the 5-byte jump written at the probe address, as
    in the target) and run until rip leaves the slot.  A record handler's ring is
    initialized first; a restartable sequence may be aborted once (_abort_pc)."""
    emu = _Emu(pages, state)
    if handler is not None and handler.kind == "record":
        buf = bytearray(_ring_count(handler) * RL.ring_size(RING_RECORDS))
        RL.init_rings(buf, RING_RECORDS, _ring_count(handler))
        base = ring_addr(state)
        for page in range(base, base + len(buf), PAGE):
            emu.map_page(page, bytes(buf[page - base: page - base + PAGE]))
    abort_at = _abort_pc(state, detour)
    region = detour.region
    for page in sorted(_pages(detour.slot_addr, len(detour.code))):
        if page not in emu.mapped:
            emu.map_page(page)
    emu.uc.mem_write(detour.slot_addr, detour.code)
    emu.uc.mem_write(region.addr, detour.jump)
    # An exit detour runs relocated instructions first (phase 1), then the handler
    # (phase 0), then the exit itself (phase 1 again, from reloc_addr).
    emu.phase = 0 if detour.handler_addr is None else 1
    has_syscall = any(i.kind == "syscall" for i in region.insns)
    last = region.insns[-1].addr

    def on_code(pc):
        nonlocal abort_at
        if not detour.slot_addr <= pc < detour.end_addr:
            return ("exit", pc)
        if pc == abort_at:
            # kernel/rseq.c rseq_ip_fixup: only when rseq_cs points at a descriptor
            # whose [start_ip, start_ip + post_commit_offset) holds rip; then rseq_cs
            # is cleared and rip = abort_ip (a preemption elsewhere changes nothing)
            abort_at = None
            cs = int.from_bytes(emu.uc.mem_read(TLS_BASE + RSEQ_OFFSET + 8, 8), "little")
            if cs:
                _, start, off, abort_ip = struct.unpack("<QQQQ", emu.uc.mem_read(cs, 32))
                if start <= pc < start + off:
                    emu.aborted = True
                    emu.uc.mem_write(TLS_BASE + RSEQ_OFFSET + 8, bytes(8))
                    emu.uc.reg_write(_UREG["rip"], abort_ip)
            return None
        if pc == detour.handler_addr:
            emu.phase = 0
        if pc == detour.reloc_addr:
            emu.phase = 1
        if has_syscall and emu.phase and _is_syscall(emu, pc):
            return ("syscall", last)       # the relocator keeps a syscall last
        return None
    return emu.run(detour.slot_addr, on_code)


# ---------------------------------------------------------------------------------------
# Comparison

def _ranges(addrs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted byte addresses -> [(start, end)) runs."""
    out: list[list[int]] = []
    for a in sorted(addrs):
        if out and out[-1][1] == a:
            out[-1][1] = a + 1
        else:
            out.append([a, a + 1])
    return [(lo, hi) for lo, hi in out]


def _fmt_stop(stop: tuple) -> str:
    kind, where = stop
    return f"{kind} {where:#x}" if isinstance(where, int) and kind != "limit" else f"{kind} {where}"


def _scratch_limit(orig: Outcome, state: State) -> int:
    """Bytes below this address may serve the detour as scratch (its frame, a register
    spilled around a rewritten instruction): below the red zone both at the probe and
    where the region leaves (SysV ABI 3.2.2: memory below rsp-128 may change at any
    moment, a signal frame can land there)."""
    return max(state.rsp, orig.regs["rsp"]) - x86.RED_ZONE_SIZE


def _compare_memory(orig: Outcome, det: Outcome, allowed_extra: set[int],
                    state: State) -> list[str]:
    """Every byte the original wrote must end equal in the detour run.  Bytes only the
    detour wrote must be its scratch below the red zone (or ``allowed_extra``, the
    counter of a count handler): anything else it wrote is a clobber."""
    diffs = []
    limit = _scratch_limit(orig, state)
    stray = {a for a in (det.extra_writes | det.writes) - orig.writes
             if a >= limit and a not in allowed_extra}
    addrs = orig.writes | stray
    want, got = orig.emu.read_bytes(addrs), det.emu.read_bytes(addrs)
    bad = [a for a in addrs if want[a] != got[a] or a in stray]
    for lo, hi in _ranges(bad)[:8]:
        w = bytes(want[a] for a in range(lo, hi)).hex()
        g = bytes(got[a] for a in range(lo, hi)).hex()
        where = " (red zone)" if state.rsp - x86.RED_ZONE_SIZE <= lo < state.rsp else ""
        extra = "" if lo in orig.writes else "; written by the detour only"
        diffs.append(f"memory {lo:#x} (rsp{lo - state.rsp:+#x}){where}: original {w} "
                     f"relocated {g}{extra}")
    return diffs


def _compare_reads(orig: Outcome, det: Outcome, detour, limit: int) -> list[str]:
    """The relocated region must read exactly the addresses the original read (its own
    literal pool and stack scratch aside): a wrong displacement shows here even when
    the values agree."""
    mine = {(a, s) for a, s in det.reads
            if a not in detour and (a >= limit or (a, s) in orig.reads)}
    if mine == orig.reads:
        return []
    only_o = sorted(orig.reads - mine)[:4]
    only_r = sorted(mine - orig.reads)[:4]
    fmt = lambda xs: ", ".join(f"{a:#x}/{s}" for a, s in xs) or "-"
    return [f"reads: original only {fmt(only_o)}; relocated only {fmt(only_r)}"]


def _check_record(orig: Outcome, det: Outcome, state: State, handler, step: int) -> list[str]:
    """The ring after one hit: head == step, record 0 whole (seq 1, probe id, nargs,
    the site's argument registers; at an exit rax and rdx as the exit leaves them), in
    the ring of the state's CPU (the shared one without rseq or beyond the slots)."""

    ring = _hit_ring(state, handler)
    raw = bytes(det.emu.uc.mem_read(ring, RL.HEADER_SIZE + RL.RECORD_SIZE))
    head = int.from_bytes(raw[RL.HEAD_OFFSET: RL.HEAD_OFFSET + 8], "little")
    if head != step:
        return [f"ring head {head}, expected {step}"]
    if not step:
        return []
    seq, probe_id, nargs, _tsc, _thread, *args = RL.RECORD_STRUCT.unpack_from(raw, RL.HEADER_SIZE)
    regs = handler.record_regs
    want = [(orig.regs if handler.regs else state.regs)[r] for r in regs]
    got = (seq, probe_id, nargs, args[:len(regs)])
    if got != (1, PROBE_ID, len(regs), want):
        return [f"record {got}, expected {(1, PROBE_ID, len(regs), want)}"]
    return []


def compare(orig: Outcome, det: Outcome, state: State, detour,
            handler: "x86.HandlerSpec") -> list[str]:
    """Human-readable differences between the two runs (empty: equivalent)."""
    diffs = []
    if orig.stop != det.stop:
        diffs.append(f"next: original {_fmt_stop(orig.stop)}, relocated {_fmt_stop(det.stop)}")
    for name, value in orig.regs.items():
        if det.regs[name] != value:
            diffs.append(f"{name}: original {value:#x} relocated {det.regs[name]:#x}")
    for i, (a, b) in enumerate(zip(orig.xmm, det.xmm)):
        if a != b:
            diffs.append(f"xmm{i}: original {a:#x} relocated {b:#x}")
    counter: set[int] = set()
    if handler.kind in ("count", "record"):
        slot_addr = handler.counter_slot_addr(state.cpu_id)
        counter = set(range(slot_addr, slot_addr + 8))
        before = int.from_bytes(bytes(orig.emu.read_bytes(sorted(counter)).values()), "little")
        after = int.from_bytes(bytes(det.emu.read_bytes(sorted(counter)).values()), "little")
        # An exit detour counts only when the exit runs: a jcc before it in the region
        # may leave first (the original then never reached the exit either).
        step = 1 if detour.handler_addr is None or getattr(orig.emu, "reached_last", True) \
            else 0
        if after != (before + step) & 0xFFFFFFFFFFFFFFFF:
            diffs.append(f"counter {slot_addr:#x} (cpu {state.cpu_id}): {before} -> {after}, "
                         f"expected +{step}")
        rseq_cs = range(TLS_BASE + RSEQ_OFFSET + 8, TLS_BASE + RSEQ_OFFSET + 16)
        touched = set(rseq_cs) & (det.extra_writes | det.writes)
        if touched and any(det.emu.read_bytes(rseq_cs).values()):
            diffs.append("rseq_cs left pointing at the detour")
        counter |= set(rseq_cs)
        if handler.kind == "record":
            diffs += _check_record(orig, det, state, handler, step)
            ring = ring_addr(state)
            counter |= set(range(ring, ring + _ring_count(handler) * RL.ring_size(RING_RECORDS)))
    diffs += _compare_memory(orig, det, counter, state)
    diffs += _compare_reads(orig, det, detour, _scratch_limit(orig, state))
    if diffs and orig.stop[0] in ("error", "fault"):
        # The CPU faulted in the region (#DE, #GP, ...): a signal handler sees this state.
        diffs.insert(0, f"at a fault in the region ({_fmt_stop(orig.stop)}), "
                        "state a signal handler would see:")
    return diffs


# ---------------------------------------------------------------------------------------
# Sites and files

@dataclass
class Mismatch:
    """A state in which the detour and the original region disagree."""
    file: str
    func: str
    addr: int
    region: bytes
    insns: list[str]
    handler: str
    slot_addr: int
    state: int
    seed: int
    diffs: list[str]
    relocated: list[str]

    def to_json(self) -> dict:
        return {"event": "reloc-mismatch", "file": self.file, "function": self.func,
                "addr": f"{self.addr:#x}", "bytes": self.region.hex(), "insns": self.insns,
                "handler": self.handler, "slot": f"{self.slot_addr:#x}", "state": self.state,
                "seed": self.seed, "diffs": self.diffs, "relocated": self.relocated}

    def render(self) -> str:
        lines = [f"MISMATCH {self.addr:#x} ({self.func}) bytes {self.region.hex()} "
                 f"[{'; '.join(self.insns)}] handler={self.handler} slot={self.slot_addr:#x} "
                 f"state={self.state} seed={self.seed}"]
        lines += [f"    relocated: {t}" for t in self.relocated]
        lines += [f"    {d}" for d in self.diffs]
        return "\n".join(lines)


@dataclass
class SiteResult:
    """``refusal``: Reason name when not optimizable; ``skipped``: why a region was not
    emulated; ``states``: states compared; ``slot_refusals``: Reason names of slots
    build_detour refused (near the +-2 GiB limit); ``mismatches``."""
    site: Site
    refusal: str | None = None
    refused_insn: str | None = None     # mnemonic of the instruction the refusal names
    skipped: str | None = None
    states: int = 0
    slot_refusals: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)


Builder = Callable[..., object]


def _nondeterministic(region) -> str | None:
    for insn in region.insns:
        if insn.mnemonic in NONDETERMINISTIC:
            return insn.mnemonic
    return None


def _emulator_bug(region, orig: Outcome) -> str | None:
    """Why the emulator's run of the original cannot serve as the reference, or None.
    Besides instructions unicorn lacks (AVX2, ...), QEMU computes some RIP-relative
    addresses without the trailing immediate (shld/shrd m64, r64, imm8 read disp-1):
    an access that starts 1-4 bytes below the operand the SDM defines (vol. 2A,
    2.2.1.6: relative to the end of the instruction) is that bug, and a correct
    relocation through a scratch register would then look wrong."""
    if orig.stop[0] == "error" and "INSN_INVALID" in str(orig.stop[1]):
        return str(orig.stop[1])
    for insn in region.insns:
        t = insn.rip_target
        if t is None or insn.mnemonic in ("lea", "nop") or insn.mnemonic.startswith("prefetch"):
            continue
        if t not in orig.starts and any(t - d in orig.starts for d in range(1, 5)):
            return f"wrong RIP-relative address for '{insn}'"
    return None


def _mnemonic_at(image: CodeImage, func: Function, addr: int) -> str | None:
    """Mnemonic of the instruction at ``addr`` in ``func`` (for refusal statistics)."""
    code = image.read(func.addr, func.size)
    if not func.addr <= addr < func.addr + func.size:
        return None
    insn = x86.decode_one(code[addr - func.addr: addr - func.addr + 15], addr)
    return insn.mnemonic if insn else None


def _code_pages(image: CodeImage, func: Function) -> dict[int, bytes]:
    """The function's pages (and one after it: the exit may be past its end)."""
    return {p: image.read_page(p) for p in sorted(_pages(func.addr, func.size + PAGE))}


def _build(builder: Builder, region, state: State, handler, result: SiteResult):
    """The detour at the state's slot; a slot the builder refuses (a RIP-relative operand
    out of reach near the +-2 GiB limit) is counted and a closer slot used instead."""
    detour = builder(region, state.slot_addr, handler)
    if isinstance(detour, x86.Refusal) and state.slot_addr != state.alt_slot_addr:
        result.slot_refusals.append(detour.reason.name)
        state.slot_addr = state.alt_slot_addr
        detour = builder(region, state.slot_addr, handler)
    return detour


def _handlers(state: State, exit: bool = False) -> tuple:
    """``none`` in every state; ``count`` in even states, ``record`` in odd ones (both
    run the same counter code: one run each keeps the check's time)."""
    if state.index % 2 == 0:
        return (x86.HandlerSpec("none"),
                x86.HandlerSpec("count", counter_addr=state.counter_addr,
                                ncpu_slots=NCPU_SLOTS, rseq_offset=RSEQ_OFFSET))
    return (x86.HandlerSpec("none"),
            x86.HandlerSpec("record", counter_addr=state.counter_addr, ncpu_slots=NCPU_SLOTS,
                            rseq_offset=RSEQ_OFFSET, ring_addr=ring_addr(state),
                            ring_mask=RING_RECORDS - 1, missed_addr=missed_addr(state),
                            probe_id=PROBE_ID, regs=("rax", "rdx") if exit else None))


MODULE_WIDE = "JUMP_INTO_RANGE from another function"


def _external_branches(image: CodeImage, func: Function) -> dict[int, str]:
    """{target: "the branch at SRC"} for direct branches from outside ``func`` landing
    inside it (the file's branch index; empty for a bare code image)."""
    if image.obj is None or image.obj.elf is None:
        return {}
    end = func.addr + func.size
    into = image.obj.elf.branches_into(func.addr, end, (func.addr, end))
    return {t: f"the branch at {src:#x}" for t, src in into.items()}


def check_site(image: CodeImage, site: Site, *, seed: int = 0, num_states: int = 4,
               builder: Builder | None = None, slots: list[int] | None = None,
               exit: bool = False) -> SiteResult:
    """Analyse one site and, if optimizable, compare its detour with the original
    region in ``num_states`` random states, with a ``none`` and a ``count`` handler.
    ``slots``: fixed slot addresses (state i uses ``slots[i % len(slots)]``) instead of
    random ones.  ``exit``: the site is a function exit (a return probe's ret or
    tail-call jmp): its region ends there and its exit detour is compared."""
    builder = builder or (x86.build_exit_detour if exit else x86.build_detour)
    analyse = x86.can_optimize_exit if exit else x86.can_optimize
    func, result = site.func, SiteResult(site)
    # 1. the analysis, on the original bytes of the whole function, with the direct
    #    branches of the rest of the module that land in it (the module-wide check 3)
    extra = _external_branches(image, func)
    region = analyse(image.read(func.addr, func.size), func.addr, func.size,
                     site.addr, extra_targets=extra)
    if isinstance(region, x86.Refusal):
        result.refusal = region.reason.name
        if region.reason is x86.Reason.JUMP_INTO_RANGE and extra.get(region.addr):
            result.refusal = MODULE_WIDE
        result.refused_insn = _mnemonic_at(image, func, region.addr)
        return result
    # 2. instructions we cannot compare
    nondet = _nondeterministic(region)
    if nondet:
        result.skipped = f"nondeterministic ({nondet})"
        return result
    pages = _code_pages(image, func)
    for index in range(num_states):
        # 3. one state: the original once, the detour with each handler
        state = make_state(seed, site, region, index, set(pages))
        if slots:
            state.slot_addr = state.alt_slot_addr = slots[index % len(slots)]
        orig = run_original(pages, state, region)
        bug = _emulator_bug(region, orig)
        if bug:
            result.skipped = f"emulator: {bug}"
            return result
        for handler in _handlers(state, exit):
            detour = _build(builder, region, state, handler, result)
            if isinstance(detour, x86.Refusal):
                result.slot_refusals.append(detour.reason.name)
                continue
            diffs = compare(orig, run_detour(pages, state, detour, handler), state, detour,
                            handler)
            if diffs:
                result.mismatches.append(Mismatch(
                    image.path, func.name, site.addr, region.orig, [str(i) for i in region.insns],
                    handler.kind, state.slot_addr, index, seed, diffs,
                    [f"{i} -> {t}" for i, t in detour.relocated]))
        result.states += 1
        if result.mismatches:
            break           # one failing state per site is enough to report it
    return result


@dataclass
class FileReport:
    """Per-file totals: ``sites`` checked, ``optimizable`` (can_optimize said yes),
    ``refusals`` by Reason name, ``skipped`` optimizable sites not emulated (by cause),
    ``checked`` sites compared in at least one state, ``mismatches``."""
    file: str
    functions: int = 0
    sites: int = 0
    optimizable: int = 0
    checked: int = 0
    states: int = 0
    refusals: Counter = field(default_factory=Counter)
    refused_insns: Counter = field(default_factory=Counter)   # (reason, mnemonic) -> n
    skipped: Counter = field(default_factory=Counter)
    slot_refusals: Counter = field(default_factory=Counter)
    mismatches: list[Mismatch] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, r: SiteResult) -> None:
        self.sites += 1
        if r.refusal:
            self.refusals[r.refusal] += 1
            self.refused_insns[(r.refusal, r.refused_insn or "-")] += 1
            return
        self.optimizable += 1
        if r.skipped:
            self.skipped[r.skipped.split(":")[0].split(" (")[0]] += 1
        if r.states:
            self.checked += 1
            self.states += r.states
        self.slot_refusals.update(r.slot_refusals)
        self.mismatches += r.mismatches

    def merge(self, other: "FileReport") -> None:
        """Add the counts of another shard of the same file."""
        for name in ("sites", "optimizable", "checked", "states"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("refusals", "refused_insns", "skipped", "slot_refusals"):
            getattr(self, name).update(getattr(other, name))
        self.mismatches += other.mismatches
        self.seconds = max(self.seconds, other.seconds)

    @property
    def share(self) -> float:
        return 100.0 * self.optimizable / self.sites if self.sites else 0.0

    def to_json(self) -> dict:
        return {"event": "reloc-check", "file": self.file, "sites": self.sites,
                "optimizable": self.optimizable, "mismatches": len(self.mismatches),
                "refusals": dict(self.refusals.most_common()),
                "functions": self.functions, "checked": self.checked, "states": self.states,
                "skipped": dict(self.skipped.most_common()),
                "slot_refusals": dict(self.slot_refusals.most_common()),
                "seconds": round(self.seconds, 2)}

    def render(self) -> str:
        lines = [f"{self.file}: {self.sites} sites ({self.functions} functions), "
                 f"optimizable {self.optimizable} ({self.share:.1f}%), checked {self.checked} "
                 f"in {self.states} states, mismatches {len(self.mismatches)} "
                 f"[{self.seconds:.1f}s]"]
        for title, counts in (("refusals", self.refusals), ("skipped", self.skipped),
                              ("slot refusals (near +-2 GiB, retried closer)", self.slot_refusals)):
            if counts:
                lines.append(f"  {title}:")
                lines += [f"    {n:6d}  {k}" for k, n in counts.most_common()]
        lines += ["  " + m.render().replace("\n", "\n  ") for m in self.mismatches]
        return "\n".join(lines)


def find_exit_sites(image: CodeImage, funcs: Iterable[Function]) -> list[Site]:
    """Every exit (ret, tail-call jmp) of every function that decodes whole."""
    sites = []
    for f in funcs:
        found = x86.find_exits(image.read(f.addr, f.size), f.addr, f.size)
        if isinstance(found, tuple):
            sites += [Site(e.addr, f) for e in found[0]]
    return sites


def check_file(path: str, *, sites: int | None = None, seed: int = 0, num_states: int = 4,
               all_boundaries: bool = False, builder: Builder | None = None,
               addrs: Iterable[int] | None = None, shard: tuple[int, int] = (0, 1),
               on_mismatch: Callable[[Mismatch], None] | None = None,
               exits: bool = False,
               on_progress: Callable[[int, int], None] | None = None) -> FileReport:
    """Check every site of ``path`` (or ``sites`` of them, sampled with ``seed``; or
    only the sites at ``addrs``, link-time addresses).  ``shard=(i, n)`` keeps every
    n-th site from the i-th: n processes cover the file once (see :meth:`FileReport.merge`).
    ``on_progress(done, total)`` is told after each site."""
    t0 = time.monotonic()
    image = CodeImage(path)
    funcs = iter_functions(image)
    if exits:
        all_sites = find_exit_sites(image, funcs)
    else:
        all_sites = find_sites(image, funcs, all_boundaries or addrs is not None)
    if addrs is not None:
        wanted = set(addrs)
        all_sites = [s for s in all_sites if s.addr in wanted]
    if sites is not None and sites < len(all_sites):
        all_sites = sorted(random.Random(seed).sample(all_sites, sites), key=lambda s: s.addr)
    report = FileReport(path, functions=len(funcs))
    mine = all_sites[shard[0]::shard[1]]
    for i, site in enumerate(mine):
        result = check_site(image, site, seed=seed, num_states=num_states, builder=builder,
                            exit=exits)
        report.add(result)
        if on_progress:
            on_progress(i + 1, len(mine))
        for m in result.mismatches:
            if on_mismatch:
                on_mismatch(m)
    report.seconds = time.monotonic() - t0
    return report


def check_code(code: bytes, func_addr: int, addr: int | None = None, **kw) -> SiteResult:
    """:func:`check_site` for a function made of ``code`` at ``func_addr``, probed at
    ``addr`` (default: its entry after endbr64).  Keyword arguments go to check_site."""
    image = CodeImage.from_bytes(code, func_addr)
    func = Function("<code>", func_addr, len(code))
    site = Site(x86.skip_endbr(code, func_addr, func_addr) if addr is None else addr, func)
    return check_site(image, site, **kw)


def default_corpus() -> list[str]:
    """The machine's libc.so.6, python3 (and libpython if separate), sqlite3 and
    libsqlite3; files that are missing are left out."""
    import ctypes.util
    import subprocess
    cands = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
    python = shutil.which("python3", path="/usr/bin:/bin") or shutil.which("python3")
    exe = [os.path.realpath(p) for p in (python, shutil.which("sqlite3")) if p]
    cands += exe
    for lib in exe:      # shared libraries the executables take their code from
        try:
            out = subprocess.run(["ldd", lib], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        cands += [ln.split("=>")[1].split()[0] for ln in out.splitlines()
                  if "=>" in ln and ("libpython" in ln or "libsqlite3" in ln)]
    found = ctypes.util.find_library("sqlite3")
    if found:
        cands.append(os.path.join("/usr/lib/x86_64-linux-gnu", found))
    out: list[str] = []
    for p in cands:
        if os.path.exists(p) and os.path.realpath(p) not in {os.path.realpath(q) for q in out}:
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------
# CLI

from uprobe_opt.relocheck_args import add_parser  # noqa: E402,F401 (re-export)


def cmd_check_reloc(args) -> int:
    files = args.files or default_corpus()
    emit = (lambda obj: print(json.dumps(obj), flush=True)) if args.json else None
    bad = 0
    from uprobe_opt.progress import PhaseProgress
    for path in files:
        phase = f"check-reloc {os.path.basename(path)}"
        try:
            with PhaseProgress() as bar:       # on stderr, only on a terminal
                report = check_file(
                    path, sites=args.sites, seed=args.seed, num_states=args.states,
                    all_boundaries=args.all_boundaries, addrs=args.addr,
                    exits=getattr(args, "exits", False),
                    on_mismatch=(lambda m: emit(m.to_json())) if emit else None,
                    on_progress=lambda done, total: bar(phase, done, total))
        except SymbolError as e:
            print(f"uprobe-opt: check-reloc: {e}", file=sys.stderr)
            return 2
        bad += len(report.mismatches)
        if emit:
            emit(report.to_json())
        else:
            print(report.render(), flush=True)
    return 1 if bad else 0
