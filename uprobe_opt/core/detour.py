"""Detour areas: code and data pages mapped in the target near the probed code.

An area is two adjacent mappings placed in a free gap of the target's address space,
within rel32 reach (+-2 GiB) of the code it serves (x86-64 ``jmp rel32``, Intel SDM
vol. 2A "JMP"):

- a code mapping, ``r-x``, private anonymous, written only through /proc/PID/mem; it
  holds fixed-size slots (XOL copies and detours);
- a data mapping, ``rw-``, ``MAP_SHARED`` of a memfd created in the target that the
  tracer maps too (through /proc/PID/fd), so counters are read without stopping the
  target, even after it exited.  The target's file descriptor is closed right after
  mmap: nothing is left open in the target, and no path is involved (containers).

No mapping is ever writable and executable.  Slots are never reused within a session:
a thread may still run in a detour that was just taken out of service (the kernel waits
an RCU-tasks grace period before freeing; we simply do not free).
"""
from __future__ import annotations

import contextlib
import mmap as _mmap
import os
import struct

from uprobe_opt.errors import TargetError

PAGE = 4096
CODE_SIZE = 64 * 1024
DATA_SIZE = 64 * 1024
AREA_SIZE = CODE_SIZE + DATA_SIZE
REACH = (1 << 31) - (16 << 20)      # keep 16 MiB of slack under the rel32 limit
HEAP_ROOM = 256 << 20               # never place an area within this of [heap]'s end
STACK_ROOM = 16 << 20               # nor this close below a stack (it grows down)
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MAP_FIXED_NOREPLACE = 0x100000
MAP_POPULATE = 0x8000
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
SYS_close, SYS_ftruncate, SYS_memfd_create = 3, 77, 319
MFD_CLOEXEC = 1
MAX_AREA_PART = 32 << 20            # bytes: the largest code or data part of one area
MEMFD_NAME = b"uprobe-opt"          # /proc/PID/maps shows /memfd:uprobe-opt (deleted)


def _pages(size: int) -> int:
    return (size + PAGE - 1) & ~(PAGE - 1)


def counter_bytes(nslots: int) -> int:
    """Data bytes of a counter of ``nslots`` per-CPU slots (plus the shared one)."""
    return 64 * (nslots + 1)


class NoDetourSpace(Exception):
    """No free gap within +-2 GiB of the address."""


class Counter:
    """Per-CPU counters of one site: ``nslots`` u64 at a 64-byte stride (one cache line
    each), summed by the tracer.  ``addr`` is the target address of slot 0."""

    def __init__(self, area: "DetourArea", offset: int, nslots: int):
        self.area, self.offset, self.nslots = area, offset, nslots
        self.addr = area.data_addr + offset

    def value(self) -> int:
        buf = self.area.shm
        return sum(struct.unpack_from("<Q", buf, self.offset + 64 * i)[0]
                   for i in range(self.nslots))


class DetourArea:
    """One area at ``addr`` (target address): ``code_size`` bytes of slots, then
    ``data_size`` bytes of shared data (page multiples; CODE_SIZE and DATA_SIZE at
    least, more for a batch of sites that needs it)."""

    def __init__(self, target, addr: int, slot_size: int, code_size: int = CODE_SIZE,
                 data_size: int = DATA_SIZE):
        self.target = target
        self.code_addr = addr
        self.code_size, self.data_size = code_size, data_size
        self.size = code_size + data_size
        self.data_addr = addr + code_size
        self.slot_size = slot_size
        self.next_slot = 0
        self.nslots = code_size // slot_size - 1     # the last slot holds the shm path
        self.next_data = 0
        self.shm = None
        self.data_inode = None
        self.mapped = False

    def contains(self, addr: int) -> bool:
        return self.code_addr <= addr < self.code_addr + self.size

    def in_reach(self, addr: int) -> bool:
        return (abs(self.code_addr - addr) < REACH
                and abs(self.code_addr + self.code_size - addr) < REACH)

    def alloc_slot(self) -> int | None:
        if self.next_slot >= self.nslots:
            return None
        addr = self.code_addr + self.next_slot * self.slot_size
        self.next_slot += 1
        return addr

    def alloc_counter(self, nslots: int) -> Counter | None:
        """A counter of ``nslots`` per-CPU slots plus one shared slot: the slot of
        threads without an rseq area (x86 HandlerSpec.counter_slots == nslots + 1);
        value() sums them all."""
        size = counter_bytes(nslots)
        if self.next_data + size > self.data_size:
            return None
        counter = Counter(self, self.next_data, nslots + 1)
        self.next_data += size
        return counter

    # -- mapping ----------------------------------------------------------------------
    def map(self) -> None:
        """Map code (r-x, private) and data (rw-, shared with the tracer) at code_addr.
        All threads must be stopped (remote syscalls)."""
        t = self.target
        t.mmap(self.code_addr, self.code_size, PROT_READ | PROT_EXEC,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)
        try:
            self._map_shared_data()
        except Exception:
            t.munmap(self.code_addr, self.code_size)
            raise
        self.mapped = True

    def _map_shared_data(self) -> None:
        # The path string must be in target memory for openat(2): put it in the
        # reserved last slot of our own code page (readable, never executed).
        scratch = self.code_addr + self.nslots * self.slot_size
        _, self.shm, self.data_inode = map_shared_file(self.target, self.data_size, scratch,
                                                       self.data_addr)

    def is_ours(self, maps) -> bool:
        """Both mappings are still the ones we made (an exec or a munmap by the
        program since would make us unmap someone else's memory)."""
        code = next((m for m in maps if m.start == self.code_addr), None)
        data = next((m for m in maps if m.start == self.data_addr), None)
        return (code is not None and code.end == self.data_addr and code.inode == 0
                and code.perms.startswith("r-x") and data is not None
                and data.end == self.data_addr + self.data_size
                and data.inode == self.data_inode)

    def unmap(self) -> None:
        self.target.munmap(self.code_addr, self.size)
        self.mapped = False


def map_shared_file(target, size: int, scratch_addr: int, fixed_addr: int | None = None,
                    populate: bool = False):
    """Create a memfd of ``size`` bytes *in the target* (memfd_create(2), so no path is
    involved: a target in its own mount namespace or chroot works), open it from here
    through /proc/PID/fd/N and map it rw- MAP_SHARED in the tracer and in the target
    (at ``fixed_addr`` with MAP_FIXED_NOREPLACE, or where the kernel chooses); then
    the target's descriptor is closed: both mappings stay, no fd is left open in the
    target.  ``scratch_addr``: target memory (in one of our own pages) where the
    memfd's name is written.  All threads stopped.  ``populate``: map with MAP_POPULATE
    (mmap(2)): the kernel allocates every page and fills the target's page tables
    now, so no store of the target takes a first-touch page fault later.
    Returns (target address, tracer mmap, inode of the memfd)."""
    target.write(scratch_addr, MEMFD_NAME + b"\0")
    tfd = target.syscall(SYS_memfd_create, scratch_addr, MFD_CLOEXEC)
    if tfd < 0:
        raise TargetError(f"memfd_create in process {target.pid} failed: "
                          f"{os.strerror(-tfd)}", pid=target.pid)
    try:
        ret = target.syscall(SYS_ftruncate, tfd, size)
        if ret < 0:
            raise TargetError(f"ftruncate of our memfd in process {target.pid} failed: "
                              f"{os.strerror(-ret)}", pid=target.pid)
        fd = os.open(target.proc_path(f"fd/{tfd}"), os.O_RDWR | os.O_CLOEXEC)
        try:
            shm = _mmap.mmap(fd, size)
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        flags = MAP_SHARED | (MAP_FIXED_NOREPLACE if fixed_addr is not None else 0)
        flags |= MAP_POPULATE if populate else 0
        addr = target.mmap(fixed_addr or 0, size, PROT_READ | PROT_WRITE, flags, tfd, 0)
    finally:
        target.syscall(SYS_close, tfd)
    return addr, shm, inode


def find_gap(maps, near: int, size: int, reach: int = REACH) -> int:
    """Lowest-distance page-aligned address for ``size`` bytes in a free gap of
    ``maps`` (sorted Mapping list) with the whole range within REACH of ``near``.

    Never right after ``[heap]`` (brk must stay free to grow: HEAP_ROOM) nor just below a
    stack.  Raises NoDetourSpace.
    """
    best = None
    spans = sorted((m.start, m.end, m.path) for m in maps)
    prev_end, prev_path = 0x10000, ""
    for start, end, path in spans + [(0x7fff_ffff_f000, 0, "")]:
        lo, hi = prev_end, start
        if prev_path == "[heap]":
            lo += HEAP_ROOM
        if path.startswith("[stack"):
            hi -= STACK_ROOM
        lo, hi = lo + (1 << 20), hi - (1 << 20)      # 1 MiB of air on both sides
        for cand in _candidates(lo, hi, size, near):
            if abs(cand - near) < reach and abs(cand + size - near) < reach:
                if best is None or abs(cand - near) < abs(best - near):
                    best = cand
        prev_end, prev_path = max(prev_end, end), path
    if best is None:
        raise NoDetourSpace(f"no detour page within +-2 GiB of {near:#x}")
    return best


def _candidates(lo: int, hi: int, size: int, near: int):
    lo = (lo + PAGE - 1) & ~(PAGE - 1)
    hi = hi & ~(PAGE - 1)
    if hi - lo < size:
        return
    yield lo
    yield hi - size
    mid = (near - size // 2) & ~(PAGE - 1)
    if lo <= mid <= hi - size:
        yield mid


class DetourPool:
    """All detour areas of one target; hands out slots near a given address."""

    def __init__(self, target, slot_size: int, stopped=None):
        self.target = target
        self.slot_size = slot_size
        self.areas: list[DetourArea] = []
        # context manager factory stopping all threads (remote mmap needs it)
        self.stopped = stopped or contextlib.nullcontext

    def _area_near(self, addr: int, data: int = 0) -> DetourArea:
        for area in self.areas:
            if area.in_reach(addr) and area.next_slot < area.nslots and \
                    area.next_data + data <= area.data_size:
                return area
        with self.stopped():
            return self._map_near(addr)

    def _map_near(self, addr: int, slots: int = 0, data: int = 0) -> DetourArea:
        """A new area near ``addr`` with room for ``slots`` slots and ``data`` bytes
        (at least the default sizes; at most MAX_AREA_PART each)."""
        code_size = _pages(max(CODE_SIZE, min((slots + 1) * self.slot_size, MAX_AREA_PART)))
        data_size = _pages(max(DATA_SIZE, min(data, MAX_AREA_PART)))
        base = find_gap(self.target.maps(), addr, code_size + data_size)
        area = DetourArea(self.target, base, self.slot_size, code_size, data_size)
        area.map()
        self.areas.append(area)
        return area

    def ensure_near(self, needs) -> int:
        """Map, in one window, every area the sites of ``needs`` will take their slots
        and counters from, so that those can then be filled while the target runs.
        ``needs``: {target address: (code slots, data bytes)}, each site's slots and
        counters coming from one area within rel32 reach of it.  Returns how many
        areas were mapped; NoDetourSpace as slot_near."""
        needs = dict(needs)
        if self._unplaced(needs, map_missing=False) == 0:
            return 0
        with self.stopped():
            return self._unplaced(needs, map_missing=True)

    def _unplaced(self, needs: dict, map_missing: bool) -> int:
        free = {id(a): [a.nslots - a.next_slot, a.data_size - a.next_data]
                for a in self.areas}

        def fits(area, addr, slots, data):
            room = free[id(area)]
            return area.in_reach(addr) and room[0] >= slots and room[1] >= data
        count = 0
        left = list(needs.items())
        for i, (addr, (slots, data)) in enumerate(left):
            area = next((a for a in self.areas if fits(a, addr, slots, data)), None)
            if area is None:
                count += 1
                if not map_missing:
                    continue
                # Sized for every site still to place within reach of this one: one
                # area (one set of remote system calls) for a batch of a module.
                near = [need for a, need in left[i:] if abs(a - addr) < REACH // 2]
                area = self._map_near(addr, sum(n[0] for n in near),
                                      min(sum(n[1] for n in near), MAX_AREA_PART))
                free[id(area)] = [area.nslots, area.data_size]
            free[id(area)][0] -= slots
            free[id(area)][1] -= data
        return count

    def slot_anywhere(self) -> int:
        """A fresh slot in an area placed by the kernel (for XOL copies, which need
        no rel32 reach: they return with an absolute jump)."""
        for area in self.areas:
            if area.next_slot < area.nslots:
                return area.alloc_slot()
        with self.stopped():
            maps = sorted(self.target.maps(), key=lambda m: m.start)
            base = find_gap(maps, maps[-1].start if maps else 1 << 40, AREA_SIZE,
                            reach=1 << 47)
            area = DetourArea(self.target, base, self.slot_size)
            area.map()
        self.areas.append(area)
        return area.alloc_slot()

    def slot_near(self, addr: int) -> int:
        """A fresh slot (absolute target address) within rel32 reach of addr."""
        area = self._area_near(addr)
        return area.alloc_slot()

    def counter_near(self, addr: int, nslots: int) -> Counter:
        area = self._area_near(addr, data=counter_bytes(nslots))
        counter = area.alloc_counter(nslots)
        if counter is None:
            raise NoDetourSpace(f"detour data page near {addr:#x} is full")
        return counter

    def owner_of(self, addr: int) -> DetourArea | None:
        return next((a for a in self.areas if a.contains(addr)), None)
