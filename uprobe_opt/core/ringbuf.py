"""The consumer side of the record ring buffer (the producers are detour code).

Layout and protocol are defined once, in :mod:`uprobe_opt.x86.ringlayout`: a header
page (``head`` reserved by producers with ``lock cmpxchg``, ``tail`` written only by
us), then N fixed-size records each carrying a sequence word (Vyukov's bounded queue).
A record at position t is committed when ``seq == t + 1``; we copy it out and hand the
slot back by setting ``seq = t + N``.  Producers never wait for us: on a full ring
they drop the record and count it in the probe's ``nmissed``.

Draining is bulk work on numpy structured arrays; no Python loop per record.  Only a
contiguous prefix of committed records is taken, so a half-written record (reserved,
not yet committed) is never shown and stops the batch until the next drain.
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


class RingBuffer:
    """One ring shared with one target.  ``addr``: the header's address in the target;
    ``nrecords``: capacity (power of two)."""

    def __init__(self, shm, addr: int, nrecords: int):
        self.shm = shm
        self.addr = addr
        self.nrecords = nrecords
        self.mask = nrecords - 1
        self.header = np.frombuffer(shm, dtype=np.uint64, count=rl.HEADER_SIZE // 8)
        self.records = np.frombuffer(shm, dtype=rl.record_dtype(), count=nrecords,
                                     offset=rl.HEADER_SIZE)
        # The same records as rows of u64 words: the seq column without a structured
        # field access (numpy's structured-field paths are several times slower).
        self.words = np.frombuffer(shm, dtype=np.uint64, count=nrecords * _WORDS,
                                   offset=rl.HEADER_SIZE).reshape(nrecords, _WORDS)
        self.tail = 0
        self.consumed = 0

    @staticmethod
    def size_for(nrecords: int) -> int:
        return rl.HEADER_SIZE + nrecords * rl.RECORD_SIZE

    def initialize(self) -> None:
        """Fresh ring: head = tail = 0, seq[i] = i (every slot free for lap 0)."""
        self.header[:] = 0
        self.header[rl.MASK_OFFSET // 8] = self.mask
        hdr = np.frombuffer(self.shm, dtype=np.uint32, count=rl.HEADER_SIZE // 4)
        hdr[rl.RSIZE_OFFSET // 4] = rl.RECORD_SIZE
        hdr[rl.MAGIC_OFFSET // 4] = rl.MAGIC
        self.records["seq"] = np.arange(self.nrecords, dtype=np.uint64)

    @property
    def head(self) -> int:
        return int(self.header[rl.HEAD_OFFSET // 8])

    def pending(self) -> int:
        """Records reserved by producers and not yet drained (some maybe uncommitted)."""
        return self.head - self.tail

    def drain(self, limit: int | None = None) -> np.ndarray:
        """Copy out the committed records at the tail, in reservation order, and free
        their slots.  Returns a structured array (possibly empty)."""
        n = self.pending()
        if limit is not None:
            n = min(n, limit)
        n = min(n, self.nrecords)
        if n <= 0:
            return self.records[:0].copy()
        parts = []
        pos = self.tail
        while n > 0:                      # at most two contiguous pieces (wrap-around)
            start = pos & self.mask
            take = min(n, self.nrecords - start)
            want = np.arange(pos + 1, pos + 1 + take, dtype=np.uint64)
            # 1. seq first, then the fields (x86 loads are not reordered with older
            #    loads, SDM vol. 3A 8.2.2; the producer stores seq last).
            committed = self.words[start:start + take, 0] == want
            if not committed.all():
                take = int(np.argmin(committed))   # stop before the first uncommitted
                n = take
                want = want[:take]
            # 2. copy as raw bytes (one memcpy), then 3. hand the slots back for the
            #    next lap: the producer waits for seq == pos + N.
            parts.append(self.records[start:start + take].view(_RAW).copy()
                         .view(self.records.dtype))
            self.words[start:start + take, 0] = want + np.uint64(self.nrecords - 1)
            pos += take
            n -= take
        got = pos - self.tail
        self.tail = pos
        self.header[rl.TAIL_OFFSET // 8] = self.tail
        self.consumed += got
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
