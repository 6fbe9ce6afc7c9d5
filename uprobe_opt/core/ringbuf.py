"""The consumer side of the record ring buffers (the producers are detour code).

Layout and protocol are defined once, in :mod:`uprobe_opt.x86.ringlayout`: one mapping
of rings, each a header page (``head``, ``tail`` written only by us) then N fixed-size
records.  The shared ring is Vyukov's bounded queue (producers reserve with ``lock
cmpxchg``; a record at position t is committed when ``seq == t + 1``; we copy it out
and hand the slot back by setting ``seq = t + N``).  Per-CPU rings (when the tracer
knows the threads' rseq area) have one producer at a time: the records in ``[tail,
head)`` are committed, and storing ``tail`` hands their slots back.  Producers never
wait for us: on a full ring they drop the record and count it in the probe's
``nmissed``.

Draining is bulk work on numpy arrays; no Python loop per record.  Only committed
records are taken, so a half-written record is never shown.  Records of several rings
are merged by TSC, and those stamped after the drain's own TSC read wait for the next
drain (ringlayout.py: that keeps each thread's records in call order).
"""
from __future__ import annotations

import numpy as np

from uprobe_opt.x86 import ringlayout as rl

DEFAULT_BUFFER_BYTES = 8 << 20
_WORDS = rl.RECORD_SIZE // 8
_RAW = np.dtype((np.void, rl.RECORD_SIZE))     # a record as opaque bytes: copies are memcpy
assert rl.SEQ_OFFSET == 0


def records_for_bytes(nbytes: int) -> int:
    """Largest power of two of records fitting in ``nbytes`` (at least 16)."""
    n = max(16, nbytes // rl.RECORD_SIZE)
    return 1 << (n.bit_length() - 1)


class _Ring:
    """numpy views of one ring of the mapping: its header words, its records (structured
    and as rows of u64 words: the seq column without a structured field access, which
    numpy makes several times slower)."""

    def __init__(self, shm, offset: int, nrecords: int, shared: bool):
        self.shared = shared
        self.header = np.frombuffer(shm, dtype=np.uint64, count=rl.HEADER_SIZE // 8,
                                    offset=offset)
        self.records = np.frombuffer(shm, dtype=rl.record_dtype(), count=nrecords,
                                     offset=offset + rl.HEADER_SIZE)
        self.words = np.frombuffer(shm, dtype=np.uint64, count=nrecords * _WORDS,
                                   offset=offset + rl.HEADER_SIZE).reshape(nrecords, _WORDS)
        self.tail = 0

    @property
    def head(self) -> int:
        return int(self.header[rl.HEAD_OFFSET // 8])


class RingBuffer:
    """The rings shared with one target.  ``addr``: the mapping's address in the target;
    ``nrecords``: capacity of each ring (power of two); ``ncpu_rings``: per-CPU rings
    before the shared one (0: the shared ring only; ringlayout.nrings)."""

    def __init__(self, shm, addr: int, nrecords: int, ncpu_rings: int = 0, rdtsc=None):
        self.shm = shm
        self.addr = addr
        self.nrecords = nrecords
        self.mask = nrecords - 1
        self.ncpu_rings = ncpu_rings
        step = rl.ring_size(nrecords) if ncpu_rings else 0
        self.rings = [_Ring(shm, i * step, nrecords, shared=i == ncpu_rings)
                      for i in range(ncpu_rings + 1)]
        shared = self.rings[-1]
        self.header, self.records, self.words = shared.header, shared.records, shared.words
        self.rdtsc = rdtsc
        self.held = None              # records stamped after the last drain's TSC read
        self.consumed = 0

    @staticmethod
    def size_for(nrecords: int, ncpu_rings: int = 0) -> int:
        if ncpu_rings:
            return (ncpu_rings + 1) * rl.ring_size(nrecords)
        return rl.HEADER_SIZE + nrecords * rl.RECORD_SIZE

    def initialize(self) -> None:
        """Fresh rings: head = tail = 0, seq[i] = i (every slot free for lap 0)."""
        for ring in self.rings:
            ring.header[:] = 0
            ring.header[rl.MASK_OFFSET // 8] = self.mask
            hdr = ring.header.view(np.uint32)
            hdr[rl.RSIZE_OFFSET // 4] = rl.RECORD_SIZE
            hdr[rl.MAGIC_OFFSET // 4] = rl.MAGIC
            ring.words[:, 0] = np.arange(self.nrecords, dtype=np.uint64)
            ring.tail = 0

    @property
    def tail(self) -> int:
        """The shared ring's tail (the only ring without per-CPU slots)."""
        return self.rings[-1].tail

    @property
    def head(self) -> int:
        return self.rings[-1].head

    def pending(self) -> int:
        """Records reserved by producers and not yet handed out (some maybe uncommitted)."""
        held = 0 if self.held is None else len(self.held)
        return held + sum(r.head - r.tail for r in self.rings)

    def drain(self, limit: int | None = None) -> np.ndarray:
        """Copy out the committed records, free their slots, and return them as a
        structured array (possibly empty): one ring's in reservation order, several
        rings' merged by TSC, per thread in call order (module docstring).  ``limit``:
        at most this many records from each ring."""
        if len(self.rings) == 1:
            got = self._take_shared(self.rings[0], limit)
            self.consumed += len(got)
            return got
        out = self._drain_merged(limit)
        if self.held is not None and len(self.held) and self.pending() == len(self.held):
            # Nothing new since: what was held back was committed before this pass's
            # TSC read, so one more pass hands it out (a stopped target's last drain).
            out2 = self._drain_merged(limit)
            out = np.concatenate([out, out2]) if len(out) else out2
        return out

    def _drain_merged(self, limit) -> np.ndarray:
        # 1. The TSC first (rdtsc; lfence): a record committed after the heads are read
        #    but stamped before this is taken at the next drain, and a later record of
        #    the same thread is stamped after it (ringlayout.py), so it waits too.
        now = self.rdtsc()
        parts = [self.held] if self.held is not None and len(self.held) else []
        for ring in self.rings:
            got = self._take_shared(ring, limit) if ring.shared else self._take_spsc(ring, limit)
            if len(got):
                parts.append(got)
        self.held = None
        if not parts:
            return self.rings[0].records[:0].copy()
        batch = self._merge(parts)
        tsc = batch.view(np.uint64).reshape(len(batch), _WORDS)[:, rl.TSC_OFFSET // 8]
        cut = int(np.searchsorted(tsc, np.uint64(now), side="left"))
        if cut < len(batch):
            self.held = batch[cut:]
            batch = batch[:cut]
        self.consumed += len(batch)
        return batch

    @staticmethod
    def _merge(parts: list) -> np.ndarray:
        """One array of every part's records in TSC order (each part is in order):
        parts that do not overlap in time are concatenated, else a stable argsort
        (timsort: linear on a few sorted runs) and a row gather of u64 words (numpy
        gathers 80-byte void items several times slower)."""
        if len(parts) == 1:
            return parts[0]
        tscs = [p.view(np.uint64).reshape(len(p), _WORDS)[:, rl.TSC_OFFSET // 8] for p in parts]
        order = sorted(range(len(parts)), key=lambda i: int(tscs[i][0]))
        if all(tscs[a][-1] <= tscs[b][0] for a, b in zip(order, order[1:])):
            return np.concatenate([parts[i] for i in order])
        batch = np.concatenate(parts)
        words = batch.view(np.uint64).reshape(len(batch), _WORDS)
        idx = np.argsort(words[:, rl.TSC_OFFSET // 8], kind="stable")
        return np.take(words, idx, axis=0).view(batch.dtype).reshape(len(batch))

    def _take_spsc(self, ring: _Ring, limit) -> np.ndarray:
        """A per-CPU ring: [tail, head) is committed (head is the commit store)."""
        n = min(ring.head - ring.tail, self.nrecords)
        if limit is not None:
            n = min(n, limit)
        if n <= 0:
            return ring.records[:0].copy()
        start = ring.tail & self.mask
        first = min(n, self.nrecords - start)
        got = ring.records[start:start + first].view(_RAW).copy().view(ring.records.dtype)
        if first < n:
            got = np.concatenate([got, ring.records[:n - first].view(_RAW).copy()
                                  .view(ring.records.dtype)])
        ring.tail += n
        ring.header[rl.TAIL_OFFSET // 8] = ring.tail      # after the copies: frees them
        return got

    def _take_shared(self, ring: _Ring, limit) -> np.ndarray:
        """The shared ring: the committed prefix at the tail (seq == pos + 1), slots
        handed back by seq = pos + N."""
        n = ring.head - ring.tail
        if limit is not None:
            n = min(n, limit)
        n = min(n, self.nrecords)
        if n <= 0:
            return ring.records[:0].copy()
        parts = []
        pos = ring.tail
        while n > 0:                      # at most two contiguous pieces (wrap-around)
            start = pos & self.mask
            take = min(n, self.nrecords - start)
            want = np.arange(pos + 1, pos + 1 + take, dtype=np.uint64)
            # 1. seq first, then the fields (x86 loads are not reordered with older
            #    loads, SDM vol. 3A 8.2.2; the producer stores seq last).
            committed = ring.words[start:start + take, 0] == want
            if not committed.all():
                take = int(np.argmin(committed))   # stop before the first uncommitted
                n = take
                want = want[:take]
            # 2. copy as raw bytes (one memcpy), then 3. hand the slots back for the
            #    next lap: the producer waits for seq == pos + N.
            parts.append(ring.records[start:start + take].view(_RAW).copy()
                         .view(ring.records.dtype))
            ring.words[start:start + take, 0] = want + np.uint64(self.nrecords - 1)
            pos += take
            n -= take
        ring.tail = pos
        ring.header[rl.TAIL_OFFSET // 8] = ring.tail
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
