"""USDT semaphores: the ``unsigned short`` counters a program tests before it computes
a guarded marker's arguments (see uprobe_opt.usdt).

A tracer adds one while a probe on the marker is live and takes it away after, as the
kernel does for a uprobe with ``ref_ctr_offset`` (kernel/events/uprobes.c
``update_ref_ctr``): other tracers (bpftrace, a second uprobe-opt) count in the same
word, so we add and subtract, never store an absolute value.  One increment per
semaphore however many of our sites share it (CPython's markers each have their own;
a marker inlined at several places shares one).

Verify before write, as for code: the word must still be the same file's byte (dev,
inode, file offset) as when it was incremented; after an exec, or once the library is
unloaded, nothing is written (the counter died with the image).
"""
from __future__ import annotations

import struct

from uprobe_opt.errors import TargetError


class Semaphores:
    """The semaphores one ProbeManager holds.  ``file_id(addr)`` gives the mapping
    identity at an absolute address (None: unmapped)."""

    def __init__(self, target, file_id):
        self.target = target
        self.file_id = file_id
        self.held: dict[int, tuple[set, tuple | None]] = {}   # addr -> (site ids, file id)
        self.notes: list[str] = []

    def acquire(self, addr: int, owner: int) -> str | None:
        """Count ``owner`` (a site id) as a user of the semaphore at absolute ``addr``;
        the first user increments it in the target.  Returns None, or why it could
        not be incremented (the marker is still probed, its guarded code just does
        not run)."""
        if addr in self.held:
            self.held[addr][0].add(owner)
            return None
        fid = self.file_id(addr)
        if fid is None:
            return f"semaphore {addr:#x} is not mapped"
        try:
            self._add(addr, +1)
        except TargetError as e:
            return f"semaphore {addr:#x} cannot be written: {e}"
        self.held[addr] = ({owner}, fid)
        return None

    def release(self, addr: int, owner: int) -> None:
        """``owner`` no longer uses the semaphore; the last one decrements it."""
        entry = self.held.get(addr)
        if entry is None:
            return
        entry[0].discard(owner)
        if not entry[0]:
            del self.held[addr]
            self._undo(addr, entry[1])

    def release_all(self) -> None:
        """Decrement every semaphore still held (the end of the trace)."""
        held, self.held = self.held, {}
        for addr, (_, fid) in held.items():
            self._undo(addr, fid)

    def forget(self) -> None:
        """The image is gone (exec, exit): nothing to undo, nothing to write."""
        self.held = {}

    def _undo(self, addr: int, fid) -> None:
        if self.file_id(addr) != fid:
            self.notes.append(f"semaphore {addr:#x} was unmapped or remapped: not "
                              "decremented (nothing written)")
            return
        try:
            self._add(addr, -1)
        except TargetError:
            pass           # the process is going away

    def _add(self, addr: int, delta: int) -> None:
        (now,) = struct.unpack("<H", self.target.read(addr, 2))
        if delta < 0 and now == 0:
            return         # someone else cleared it: never wrap to 65535
        self.target.write(addr, struct.pack("<H", (now + delta) & 0xFFFF))
