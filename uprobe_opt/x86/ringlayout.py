"""The "record" ring buffers: their layout, the ONE definition.

Shared by the detour generator (trampoline.py, which writes records from the target)
and the tracer's consumer (which drains them through its own mapping of the same
file).  Pure: no keystone, no I/O; numpy is imported only by :func:`record_dtype`.

A ring is a HEADER_SIZE (4096-byte) header page, then N records of RECORD_SIZE bytes
(N a power of two), record i at ``HEADER_SIZE + i * RECORD_SIZE``.  One shared mapping
holds ``nrings`` rings of the same N, ring i at ``i * ring_size(N)`` (:func:`ring_addr`):

- with per-CPU slots (the thread's ``struct rseq`` known, trampoline.HandlerSpec.per_cpu)
  rings 0..K-1 belong to CPUs 0..K-1 (K = ncpu_slots) and ring K is shared; a hit
  appends to its CPU's ring inside a restartable sequence (PER-CPU RINGS below), and
  a thread with no rseq area or a CPU number >= K appends to the shared ring;
- without, one ring, shared.

Header (little endian)::

    +0    u64 head      next reservation position; producers CAS it   (own cache line)
    +64   u64 tail      consumer position; written by the consumer only (own cache line)
    +128  u64 mask      N - 1
    +136  u32 rsize     RECORD_SIZE
    +140  u32 magic     MAGIC
    +192  u64 scratch   shared ring only: written by producers, read by no one (the
                        per-CPU commit store lands here on the shared path: lean.py)

Record (RECORD_SIZE = 80 bytes, little endian)::

    +0   u64 seq        protocol word, see below
    +8   u32 probe_id
    +12  u32 nargs      how many of args[] are valid (0..6)
    +16  u64 tsc        rdtsc at the hit
    +24  u64 fs_base    the thread word: the kernel tid (zero-extended, see THREAD
                        below) or, when the tid cannot be read, the thread pointer
    +32  u64 args[6]    rdi, rsi, rdx, rcx, r8, r9 as at the probe site (first nargs)

Protocol: Dmitry Vyukov's bounded MPMC queue with a single consumer
(https://www.1024cores.net/home/lock-free-algorithms/queues/bounded-mpmc-queue).
Initially ``seq[i] = i``.  A producer reads ``pos = head`` and the seq ``s`` of slot
``pos & mask``:

- ``s == pos``: free for this lap; ``lock cmpxchg head: pos -> pos+1`` reserves it
  (on failure another producer won: retry), then the fields are written and
  ``seq = pos + 1`` is stored LAST (a plain x86 store is a release store, SDM vol. 3A
  8.2.2: stores are not reordered with other stores);
- ``(int64)(s - pos) < 0``: the slot still holds the record of the previous lap, the
  ring is full: the record is dropped and the probe's missed counter incremented
  (producers never wait for the consumer);
- ``s > pos``: another producer reserved it after we read head: reload head, retry.

The consumer reads the slot at position ``t`` once ``seq == t + 1``, then stores
``seq = t + N`` (free for the next lap) and advances ``tail``.

PER-CPU RINGS: one producer at a time, so no locked instruction.  Inside a restartable
sequence (``man 2 rseq``; lean.py) the producer reads ``cpu = rseq->cpu_id``, then in
ring ``cpu``: ``pos = head``; full when ``pos - tail >= N`` (the record is dropped and
missed counted, after leaving the sequence); else it fills slot ``pos & mask`` (seq =
pos + 1 too, for readers of a raw dump) and commits with ONE store, ``head = pos + 1``,
the sequence's last instruction.  A preemption, migration or signal before the commit
makes the kernel restart the sequence from its abort handler, so the half-written slot
is never published and is overwritten by the next producer on that CPU.  The consumer
reads ``head`` and takes the slots in ``[tail, head)`` (x86 loads are not reordered
with older loads, stores not with older stores: SDM vol. 3A 8.2.2), then stores
``tail``.  The shared ring uses the protocol above (seq words, ``lock cmpxchg``).

Across rings there is no order; per thread there is, by TSC: a thread's records on one
ring are in order, and between two of its records on two rings lies a migration (a
pass through the kernel, which drains the store buffer), so the earlier one is visible
before the later one's rdtsc runs.  The consumer reads the TSC before it reads the
heads and holds back records stamped after that read until its next drain.

FS_BASE: ``rdfsbase`` faults unless the kernel enabled FSGSBASE (CR4.FSGSBASE, Linux
>= 5.9 on capable CPUs), so the detour loads ``fs:[0]`` instead.  This relies on the
x86-64 TLS ABI (Drepper, "ELF Handling For Thread-Local Storage", variant II; glibc's
``tcbhead_t.tcb``, musl's ``struct pthread.self``): the first word of the thread
control block at fs base is a pointer to itself, so ``fs:[0] == fs base``.  A thread
that set fs by hand (arch_prctl) without that convention gets whatever its fs:[0] is.

THREAD: glibc keeps each thread's kernel tid in its ``struct pthread``, which starts at
the fs base.  The tracer learns that field's offset when it creates the ring (the one
offset where fs base + offset holds the tid in every stopped thread) and the detour
loads ``fs:[offset]``: the tid is read by the thread itself at the hit, so it is right
even when a later thread reuses the same TLS block (an fs-base -> tid table would be
stale then).
"""
from __future__ import annotations

import struct

PAGE_SIZE = 4096
HEADER_SIZE = 4096
MAGIC = 0x55505242                  # "UPRB" read as a big-endian u32

HEAD_OFFSET = 0
TAIL_OFFSET = 64
MASK_OFFSET = 128
RSIZE_OFFSET = 136
MAGIC_OFFSET = 140
SCRATCH_OFFSET = 192

RECORD_SIZE = 80
SEQ_OFFSET = 0
PROBE_ID_OFFSET = 8
NARGS_OFFSET = 12
TSC_OFFSET = 16
FS_BASE_OFFSET = 24
ARGS_OFFSET = 32
MAX_ARGS = 6
ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")      # SysV x86-64 ABI 3.2.3

_U64 = struct.Struct("<Q")
_HEADER_TAIL = struct.Struct("<QII")      # mask, rsize, magic at MASK_OFFSET
RECORD_STRUCT = struct.Struct("<QIIQQ6Q")
assert RECORD_STRUCT.size == RECORD_SIZE
assert ARGS_OFFSET + 8 * MAX_ARGS == RECORD_SIZE


def ring_size(nrecords: int) -> int:
    """Bytes of a ring with ``nrecords`` records (header included), page-rounded."""
    check_nrecords(nrecords)
    size = HEADER_SIZE + nrecords * RECORD_SIZE
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def ring_addr(base: int, index: int, nrecords: int) -> int:
    """Address of ring ``index`` of a mapping of rings of ``nrecords`` at ``base``."""
    return base + index * ring_size(nrecords)


def nrings(ncpu_slots: int, per_cpu: bool) -> int:
    """Rings in the mapping: one per CPU slot plus the shared one, or one shared."""
    return ncpu_slots + 1 if per_cpu else 1


def shared_index(ncpu_slots: int, per_cpu: bool) -> int:
    """Index of the shared ring (the lock cmpxchg protocol)."""
    return ncpu_slots if per_cpu else 0


def check_nrecords(nrecords: int) -> None:
    """ValueError unless ``nrecords`` is a power of two whose mask fits a u32."""
    if nrecords < 1 or nrecords & (nrecords - 1) or nrecords > 1 << 32:
        raise ValueError(f"a ring holds a power of two of records (<= 2**32), not {nrecords}")


def record_offset(pos: int, mask: int) -> int:
    """Offset from the ring start of the slot for position ``pos``."""
    return HEADER_SIZE + (pos & mask) * RECORD_SIZE


def init_rings(buf, nrecords: int, count: int) -> None:
    """init_ring for each of ``count`` rings of ``nrecords`` laid out in ``buf``."""
    step = ring_size(nrecords)
    for i in range(count):
        init_ring(memoryview(buf)[i * step:(i + 1) * step], nrecords)


def init_ring(buf, nrecords: int) -> None:
    """Write a fresh header and ``seq[i] = i`` into ``buf`` (a writable buffer of at
    least ``ring_size(nrecords)`` bytes, e.g. the tracer's mmap of the ring file).
    head = tail = 0; other record fields are left as they are."""
    check_nrecords(nrecords)
    _U64.pack_into(buf, HEAD_OFFSET, 0)
    _U64.pack_into(buf, TAIL_OFFSET, 0)
    _HEADER_TAIL.pack_into(buf, MASK_OFFSET, nrecords - 1, RECORD_SIZE, MAGIC)
    for i in range(nrecords):
        _U64.pack_into(buf, HEADER_SIZE + i * RECORD_SIZE + SEQ_OFFSET, i)


def read_header(buf) -> dict[str, int]:
    """{head, tail, mask, rsize, magic} of the ring in ``buf``."""
    mask, rsize, magic = _HEADER_TAIL.unpack_from(buf, MASK_OFFSET)
    return {"head": _U64.unpack_from(buf, HEAD_OFFSET)[0],
            "tail": _U64.unpack_from(buf, TAIL_OFFSET)[0],
            "mask": mask, "rsize": rsize, "magic": magic}


def record_dtype():
    """numpy structured dtype of one record (itemsize RECORD_SIZE), for bulk reads:
    ``np.frombuffer(buf, record_dtype(), count=N, offset=HEADER_SIZE)``."""
    import numpy as np
    return np.dtype({
        "names": ["seq", "probe_id", "nargs", "tsc", "fs_base", "args"],
        "formats": ["<u8", "<u4", "<u4", "<u8", "<u8", ("<u8", (MAX_ARGS,))],
        "offsets": [SEQ_OFFSET, PROBE_ID_OFFSET, NARGS_OFFSET, TSC_OFFSET,
                    FS_BASE_OFFSET, ARGS_OFFSET],
        "itemsize": RECORD_SIZE,
    })
