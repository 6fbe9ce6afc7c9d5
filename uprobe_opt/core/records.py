"""Hit records: the ring buffer shared with the target, plus the records made by the
tracer itself for hits on the int3 path, converted into one stream.

A drained batch is a numpy structured array (:data:`HIT_DTYPE`): ``site`` (the site
id; :meth:`Records.probes_of` gives its probes), ``time_ns`` (CLOCK_MONOTONIC ns),
``tid`` (kernel thread id; 0 if the thread could not be named), ``nargs`` and
``args`` (six u64, the first ``nargs`` captured: rdi, rsi, rdx, rcx, r8, r9).
Per thread, records arrive in call order: a thread's ring records are reserved in the
order it hits, and the ring is drained before an int3-path record is added.
"""
from __future__ import annotations

import struct
import time

import numpy as np

from uprobe_opt.core.ringbuf import DEFAULT_BUFFER_BYTES, RingBuffer, records_for_bytes
from uprobe_opt.core.tsc import TscClock
from uprobe_opt.errors import TargetError
from uprobe_opt.x86 import ringlayout as rl

HIT_DTYPE = np.dtype([("site", np.uint32), ("nargs", np.uint32), ("time_ns", np.int64),
                      ("tid", np.int32), ("args", np.uint64, (6,))])
ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")


def _byte_map() -> list[tuple[slice, slice]]:
    """(HIT_DTYPE bytes, ring record bytes) of the fields copied as they are: site and
    nargs (probe_id, nargs), tid (the low half of the thread word), args."""
    h, r = HIT_DTYPE.fields, rl.record_dtype().fields
    assert h["nargs"][1] == h["site"][1] + 4 and r["nargs"][1] == r["probe_id"][1] + 4
    return [(slice(h["site"][1], h["site"][1] + 8), slice(r["probe_id"][1], r["probe_id"][1] + 8)),
            (slice(h["tid"][1], h["tid"][1] + 4), slice(r["fs_base"][1], r["fs_base"][1] + 4)),
            (slice(h["args"][1], h["args"][1] + 48), slice(r["args"][1], r["args"][1] + 48))]


_BYTE_MAP = _byte_map()


RINGS_AT_FULL_SIZE = 4


def ring_bytes(buffer_bytes: int, nrings: int) -> int:
    """Bytes for each of ``nrings`` rings given ``--buffer-size``: the whole size each
    while there are at most RINGS_AT_FULL_SIZE rings (2 CPUs: 3 rings), else split so
    that the mapping stays at 4 x the buffer size (64 CPUs: 65 rings of 1/16 each)."""
    if nrings <= RINGS_AT_FULL_SIZE:
        return buffer_bytes
    return buffer_bytes * RINGS_AT_FULL_SIZE // nrings


def convert(raw: np.ndarray, clock, threads: "ThreadNames | None") -> np.ndarray:
    """Ring records (ringlayout.record_dtype) -> HIT_DTYPE.  ``threads`` None: the
    thread word is the tid itself (read in-process, Records.tid_offset); else fs bases
    named by ``threads``.  Fields move as byte columns of 2-D u8 views: numpy's
    structured-field assignments between two record dtypes are several times slower."""
    n = len(raw)
    out = np.empty(n, dtype=HIT_DTYPE)
    ob = out.view(np.uint8).reshape(n, HIT_DTYPE.itemsize)
    rb = raw.view(np.uint8).reshape(n, rl.RECORD_SIZE)
    for dst, src in _BYTE_MAP:
        ob[:, dst] = rb[:, src]
    words = raw.view(np.uint64).reshape(n, rl.RECORD_SIZE // 8)
    out["time_ns"] = clock.to_ns(words[:, rl.TSC_OFFSET // 8])
    if threads is not None:
        out["tid"] = threads.names(words[:, rl.FS_BASE_OFFSET // 8])
    return out


class ThreadNames:
    """The offset of the tid in glibc's ``struct pthread`` (from the fs base), measured
    on every stopped thread when the ring is created, never assumed: with it, record
    detours read the tid in-process (ringlayout.py THREAD).

    Fallback when no single offset fits every thread (not glibc, a thread that set its
    own fs): fs base -> kernel tid, exact for every thread seen stopped, else read at
    drain time (stale once a later thread reuses the same TLS block)."""

    def __init__(self, target):
        self.target = target
        self.by_fs: dict[int, int] = {}
        self.tid_offset: int | None = None

    def learn_thread(self, tid: int) -> None:
        """A new thread stopped at its first stop: its fs base is final (clone(2) with
        CLONE_SETTLS set it), so the mapping is exact."""
        try:
            fs = self.target.get_regs(tid).fs_base
        except TargetError:
            return
        if fs:
            self.by_fs[fs] = tid

    def learn(self) -> None:
        """Record fs_base of every thread (all threads stopped)."""
        pairs = []
        for tid in self.target.tids:
            try:
                fs = self.target.get_regs(tid).fs_base
            except TargetError:
                continue
            if fs:
                self.by_fs[fs] = tid
                pairs.append((fs, tid))
        if self.tid_offset is None and pairs:
            self.tid_offset = self._find_offset(pairs)

    def _find_offset(self, pairs) -> int | None:
        offsets = None
        for fs, tid in pairs:
            try:
                tcb = self.target.read(fs, 0x1000)
            except TargetError:
                return None
            words = struct.unpack(f"<{len(tcb) // 4}i", tcb)
            found = {4 * i for i, w in enumerate(words) if w == tid}
            offsets = found if offsets is None else offsets & found
        return min(offsets) if offsets else None

    def names(self, fs_bases: np.ndarray) -> np.ndarray:
        """tids for an array of fs bases (one lookup per distinct thread)."""
        uniq, inverse = np.unique(fs_bases, return_inverse=True)
        tids = np.array([self.lookup(int(fs)) for fs in uniq], dtype=np.int32)
        return tids[inverse]

    def lookup(self, fs: int) -> int:
        tid = self.by_fs.get(fs)
        if tid is None and self.tid_offset is not None and not self.target.exited:
            try:
                (tid,) = struct.unpack("<i", self.target.read(fs + self.tid_offset, 4))
            except TargetError:
                tid = 0
            if tid > 0:
                self.by_fs[fs] = tid
        return tid or 0


class Records:
    def __init__(self, manager, buffer_bytes: int = DEFAULT_BUFFER_BYTES):
        self.manager = manager
        self.buffer_bytes = buffer_bytes
        self.ring: RingBuffer | None = None
        self.clock: TscClock | None = None
        self.threads = ThreadNames(manager.target)
        manager.target.thread_hook = self.threads.learn_thread
        self.pending: list[np.ndarray] = []
        self.tid_offset: int | None = None   # the ring's thread word is the tid itself
        self._trap_rows: list[tuple] = []
        self.nrecords = 0

    def ensure_ring(self, near: int) -> RingBuffer:
        """Map the ring into the target (all threads stopped) on first use; ``near``:
        an address whose detour area lends a scratch slot for the file name."""
        if self.ring is None:
            from uprobe_opt.core.detour import map_shared_file
            # Per-CPU rings when the detours get per-CPU slots: HandlerSpec.per_cpu is
            # rseq_offset being known, fixed for the tracer's life (Tracer.__init__).
            per_cpu = self.manager.rseq_offset is not None
            ncpu = self.manager.ncpu_slots if per_cpu else 0
            n = records_for_bytes(ring_bytes(self.buffer_bytes, ncpu + 1))
            size = RingBuffer.size_for(n, ncpu)
            scratch = self.manager.pool.slot_near(near)
            # MAP_POPULATE: without it the target's first store to each ring page
            # faults inside a detour (measured here: 3,666 faults, 1.7 us each, in a
            # 500,000-call entry+return run, 12 ns per call pair).  The pages are
            # allocated inside this window either way (initialize() writes every
            # record's seq), so populating them costs the pause no more.
            addr, shm, inode = map_shared_file(self.manager.target, size, scratch,
                                               populate=True)
            self.clock = TscClock()
            ring = RingBuffer(shm, addr, n, ncpu, rdtsc=self.clock.rdtsc)
            ring.inode, ring.size = inode, size
            ring.initialize()
            self.ring = ring
            self.threads.learn()
            # Fixed for the ring's life: every record detour reads the tid in-process.
            self.tid_offset = self.threads.tid_offset
        return self.ring

    def add_trap_record(self, site, values: dict, tid: int) -> None:
        """A record for a hit the tracer saw (int3 path or a Python-handler trap).
        Kept as a tuple until the next drain (one conversion per batch)."""
        if self.ring is not None and self.ring.pending():
            self.drain()             # keep per-thread order: earlier ring records first
        if site.usdt is not None:               # a USDT marker: its own arguments
            nargs, stored = self._usdt_args(site, values)
        elif site.record_regs is not None:      # an exit, or an entry paired with one
            regs = site.record_regs
            nargs = len(regs)
            stored = tuple(values[r] for r in regs) + (0,) * (len(ARG_REGS) - nargs)
        else:
            nargs = max(p.nargs for p in site.enabled_probes())
            stored = tuple(values[r] for r in ARG_REGS)
        # The tracer reads CLOCK_MONOTONIC itself (the thread is stopped right at the
        # hit); ring records get the same clock through the TSC fit.
        self._trap_rows.append((site.id, nargs, time.monotonic_ns(), tid, stored))
        self.nrecords += 1

    def _usdt_args(self, site, values: dict) -> tuple[int, tuple]:
        """(nargs, six u64) of a USDT marker hit: its note's argument descriptors
        evaluated on the stopped thread's registers and memory (0 where one cannot
        be read)."""
        args = site.usdt.args[:len(ARG_REGS)]
        nargs = min(len(args), max(p.nargs for p in site.enabled_probes()))
        out = []
        for arg in args[:nargs]:
            try:
                out.append(arg.fetch(values, self.manager.target.read))
            except (TargetError, ValueError, KeyError):
                out.append(0)
        return nargs, tuple(out) + (0,) * (len(ARG_REGS) - nargs)

    def _flush_trap_rows(self) -> None:
        rows, self._trap_rows = self._trap_rows, []
        if not rows:
            return
        out = np.empty(len(rows), dtype=HIT_DTYPE)
        out["site"] = [r[0] for r in rows]
        out["nargs"] = [r[1] for r in rows]
        out["time_ns"] = [r[2] for r in rows]
        out["tid"] = [r[3] for r in rows]
        out["args"] = [r[4] for r in rows]
        self.pending.append(out)

    def stash_kernel(self, samples) -> None:
        """Samples of sites the kernel serves (perf SAMPLE_DTYPE) into ``pending``."""
        if samples is None or not len(samples):
            return
        out = np.empty(len(samples), dtype=HIT_DTYPE)
        out["site"] = samples["key"]
        keys, inverse = np.unique(samples["key"], return_inverse=True)
        nargs = [max((p.nargs for p in self.manager.site_by_id[int(k)].probes
                      if p.handler == "record"), default=6) for k in keys]
        out["nargs"] = np.array(nargs, dtype=np.uint32)[inverse]
        out["time_ns"] = samples["time_ns"]
        out["tid"] = samples["tid"]
        out["args"] = samples["args"]
        self.pending.append(out)
        self.nrecords += len(out)

    def drain(self) -> None:
        """Move committed ring records (after the tracer's own, which came first) into
        ``pending``, converted; then the kernel's samples (sites handed over after
        their tracer-made records)."""
        self._drain_ring()
        self.stash_kernel(self.manager.kernel.take_records())

    def _drain_ring(self) -> None:
        self._flush_trap_rows()
        if self.ring is None:
            return
        raw = self.ring.drain()
        if not len(raw):
            return
        self.clock.update()
        out = convert(raw, self.clock, None if self.tid_offset is not None else self.threads)
        self.pending.append(out)
        self.nrecords += len(out)

    def take(self) -> np.ndarray:
        """Everything drained so far, as one array, in arrival order."""
        self.drain()
        if not self.pending:
            return np.zeros(0, dtype=HIT_DTYPE)
        batch = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        self.pending = []
        return batch

    def probes_of(self, site_id: int) -> list:
        """The plain record probes of a site (the entry and exit probes of a return
        probe are consumed by :mod:`uprobe_opt.core.calls` instead)."""
        site = self.manager.site_by_id[site_id]
        return [p for p in site.probes if p.handler == "record" and p.retprobe is None]
