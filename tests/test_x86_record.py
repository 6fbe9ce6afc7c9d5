"""The "record" handler (unicorn): exact ring contents, the full-ring drop, the consumer
freeing slots, the producer's retry paths, and a detour that otherwise behaves exactly
like the original region.  Also the ring layout module (ringlayout.py) itself."""
import struct
from dataclasses import replace

import numpy as np
import pytest
import unicorn
import unicorn.x86_const as X

from uprobe_opt.x86 import (Detour, HandlerSpec, Reason, Refusal, SLOT_SIZE, build_detour,
                            can_optimize, decode)
from uprobe_opt.x86 import ringlayout as RL

FUNC = 0x401000
SLOT = 0x500000
COUNTERS = 0x510000          # 8 per-CPU counters
MISSED = 0x512000
RING = 0x600000
STACK_LO, STACK_TOP = 0x70000000, 0x70010000
RSP0 = 0x7000F000
FS_BASE = 0x80000800
RSEQ_OFFSET = -0x60
FAR = 0x7F0000000000
N = 4
GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15", "rsp"]
REG = {n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in GPRS + ["rip", "eflags"]}
ARGS = {"rdi": 0x1010101010101010, "rsi": 0x2020202020202020, "rdx": 0xFFFFFFFF00000003,
        "rcx": 0x4444, "r8": 0x8000000000000005, "r9": 0x66}
FLAGS_MASK = 0xCD5
# mov rax, rdi; add rax, rsi; ret  -- the region is the first two (6 bytes)
REGION = bytes.fromhex("4889f8" "4801f0" "c3")


NSLOTS = 8
STRIDE = RL.ring_size(N)
SHARED = RL.ring_addr(RING, NSLOTS, N)      # ring 8: threads without rseq, CPUs >= 8


def cpu_ring(cpu, base=RING):
    return RL.ring_addr(base, cpu if 0 <= cpu < NSLOTS else NSLOTS, N)


def spec(**kw):
    base = dict(counter_addr=COUNTERS, ncpu_slots=NSLOTS, rseq_offset=RSEQ_OFFSET, ring_addr=RING,
                ring_mask=N - 1, missed_addr=MISSED, probe_id=0xC0FFEE, nargs=6)
    base.update(kw)
    return HandlerSpec("record", **base)


def u64(uc, addr):
    return int.from_bytes(uc.mem_read(addr, 8), "little")


def records(uc, ring=RING, n=N):
    raw = bytes(uc.mem_read(ring + RL.HEADER_SIZE, n * RL.RECORD_SIZE))
    return np.frombuffer(raw, RL.record_dtype(), count=n)


def machine(cpu=5, ring=RING):
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    for base, size in [(0x400000, 0x10000), (SLOT, 0x1000), (COUNTERS, 0x3000),
                       (STACK_LO, STACK_TOP - STACK_LO), (0x80000000, 0x1000)]:
        uc.mem_map(base, size)
    count = RL.nrings(NSLOTS, True)          # 8 per-CPU rings, then the shared one
    for r in {RING, ring}:
        uc.mem_map(r, count * STRIDE)
        buf = bytearray(count * STRIDE)
        RL.init_rings(buf, N, count)
        uc.mem_write(r, bytes(buf))
    uc.mem_write(FUNC, REGION)
    uc.mem_write(RSP0 - 0x200, bytes(range(256)) * 2 + bytes(range(255, -1, -1)) * 2)
    # the TCB at fs base starts with its self-pointer (glibc tcbhead_t.tcb), rseq after
    uc.reg_write(X.UC_X86_REG_FS_BASE, FS_BASE)
    uc.mem_write(FS_BASE, FS_BASE.to_bytes(8, "little"))
    uc.mem_write(FS_BASE + RSEQ_OFFSET + 4, cpu.to_bytes(4, "little", signed=True))
    return uc


def set_site_state(uc, eflags=0x2C3):
    init = {n: 0x1111 * (i + 1) for i, n in enumerate(GPRS)}
    init.update(ARGS, rsp=RSP0, eflags=eflags)
    for name, value in init.items():
        uc.reg_write(REG[name], value)


def run(uc, start, lo, hi, hooks=(), max_insns=500):
    """Run from ``start`` until rip leaves [lo, hi); returns (regs, stack bytes from the
    site's red zone up)."""
    exit_pc = []

    def leave(uc_, address, size, _):
        if not lo <= address < hi:
            exit_pc.append(address)
            uc_.emu_stop()
    handles = [uc.hook_add(unicorn.UC_HOOK_CODE, leave)]
    handles += [uc.hook_add(unicorn.UC_HOOK_CODE, h, begin=a, end=a) for a, h in hooks]
    uc.emu_start(start, 0, count=max_insns)
    for h in handles:
        uc.hook_del(h)
    assert exit_pc, "never left the code"
    regs = {n: uc.reg_read(REG[n]) for n in GPRS}
    regs["eflags"] = uc.reg_read(REG["eflags"]) & FLAGS_MASK
    regs["pc"] = exit_pc[0]
    return regs, bytes(uc.mem_read(RSP0 - 128, STACK_TOP - (RSP0 - 128)))


def reference():
    """Registers, flags, next rip and stack of the region run without any detour."""
    uc = machine()
    set_site_state(uc)
    return run(uc, FUNC, FUNC, FUNC + 6)


def make_detour(handler) -> Detour:
    region = can_optimize(REGION, FUNC, len(REGION), FUNC)
    detour = build_detour(region, SLOT, handler)
    assert isinstance(detour, Detour), detour
    return detour


def run_detour(uc, detour, hooks=()):
    uc.mem_write(detour.slot_addr, detour.code)
    set_site_state(uc)
    return run(uc, SLOT, SLOT, detour.end_addr, hooks)


def expected_args(nargs):
    return [ARGS[r] for r in RL.ARG_REGS[:nargs]] + [0] * (RL.MAX_ARGS - nargs)


# --- the ring layout -----------------------------------------------------------------------
def test_record_dtype_matches_packed_struct():
    dt = RL.record_dtype()
    assert dt.itemsize == RL.RECORD_SIZE == struct.calcsize("<QIIQQ6Q") == 80
    args = [2**64 - 1, 1, 2, 3, 4, 2**63]
    raw = struct.pack("<QIIQQ6Q", 9, 0xDEADBEEF, 6, 123456789, FS_BASE, *args)
    raw += struct.pack("<QIIQQ6Q", 10, 1, 2, 5, 6, *range(6))
    rec = np.frombuffer(raw, dt)
    assert rec["seq"].tolist() == [9, 10] and rec["probe_id"].tolist() == [0xDEADBEEF, 1]
    assert rec["nargs"].tolist() == [6, 2] and rec["tsc"].tolist() == [123456789, 5]
    assert rec["fs_base"].tolist() == [FS_BASE, 6]
    assert rec["args"].tolist() == [args, list(range(6))]
    assert [dt.fields[f][1] for f in dt.names] == [RL.SEQ_OFFSET, RL.PROBE_ID_OFFSET,
                                                  RL.NARGS_OFFSET, RL.TSC_OFFSET,
                                                  RL.FS_BASE_OFFSET, RL.ARGS_OFFSET]


def test_init_ring_header_and_seq():
    assert RL.ring_size(4) == 8192 and RL.ring_size(64) == 4096 + 8192
    buf = bytearray(RL.ring_size(N))
    RL.init_ring(buf, N)
    assert RL.read_header(buf) == {"head": 0, "tail": 0, "mask": N - 1, "rsize": 80,
                                   "magic": 0x55505242}
    assert bytes(buf[140:144]) == b"BRPU"      # 0x55505242 little endian
    rec = np.frombuffer(bytes(buf), RL.record_dtype(), count=N, offset=RL.HEADER_SIZE)
    assert rec["seq"].tolist() == [0, 1, 2, 3]
    assert RL.record_offset(5, N - 1) == 4096 + 80
    for bad in (0, 3, 6, 2**33):
        with pytest.raises(ValueError):
            RL.check_nrecords(bad)


def test_handler_spec_validation():
    with pytest.raises(ValueError):
        spec(ring_mask=5)
    with pytest.raises(ValueError):
        spec(nargs=7)
    with pytest.raises(ValueError):
        spec(probe_id=2**32)
    assert spec().nargs == 6 and HandlerSpec("count").ring_addr == 0


# --- the producer ------------------------------------------------------------------------
@pytest.mark.parametrize("cpu", [13, 3])
@pytest.mark.parametrize("nargs", [6, 2, 0])
def test_record_fill_full_and_consumer(nargs, cpu):
    """cpu 13 (beyond the 8 per-CPU slots): the shared ring and counter slot 8; cpu 3:
    ring 3 and slot 3, appended to without a lock, its slots freed by tail alone."""
    want = reference()
    detour = make_detour(spec(nargs=nargs))
    uc = machine(cpu=cpu)
    ring = cpu_ring(cpu)
    tscs = []
    # 1. four hits fill the ring: exact records, seq = pos + 1
    for pos in range(N):
        assert run_detour(uc, detour) == want
        rec = records(uc, ring)[pos]
        assert (rec["seq"], rec["probe_id"], rec["nargs"]) == (pos + 1, 0xC0FFEE, nargs)
        assert rec["args"][:nargs].tolist() == expected_args(nargs)[:nargs]
        assert rec["fs_base"] == FS_BASE
        tscs.append(int(rec["tsc"]))
        assert u64(uc, ring + RL.HEAD_OFFSET) == pos + 1
    assert tscs[0] > 0 and tscs == sorted(set(tscs))
    if nargs < 6:                           # the other args are left as they were (0)
        assert records(uc, ring)["args"][:, nargs:].tolist() == [[0] * (6 - nargs)] * N
    # 2. no consumer: the fifth hit is dropped and counted, every ring is untouched
    rings = bytes(uc.mem_read(RING, 9 * STRIDE))
    assert run_detour(uc, detour) == want
    assert bytes(uc.mem_read(RING, 9 * STRIDE)) == rings
    assert u64(uc, MISSED) == 1
    # 3. the consumer takes position 0 (shared ring: seq = 0 + N; both: tail = 1); the
    #    next hit reuses slot 0
    if ring == SHARED:
        uc.mem_write(ring + RL.HEADER_SIZE + RL.SEQ_OFFSET, (0 + N).to_bytes(8, "little"))
    uc.mem_write(ring + RL.TAIL_OFFSET, (1).to_bytes(8, "little"))
    assert run_detour(uc, detour) == want
    rec = records(uc, ring)
    assert rec["seq"].tolist() == [5, 2, 3, 4]
    assert rec[0]["probe_id"] == 0xC0FFEE and rec[0]["tsc"] > tscs[-1]
    assert rec[0]["args"][:nargs].tolist() == expected_args(nargs)[:nargs]
    assert RL.read_header(bytes(uc.mem_read(ring, 256)))["head"] == 5
    assert RL.read_header(bytes(uc.mem_read(ring, 256)))["tail"] == 1
    assert u64(uc, MISSED) == 1
    # 4. every hit was counted on this CPU's counter: records + missed == hits
    counters = [u64(uc, COUNTERS + 64 * i) for i in range(9)]
    assert counters == [6 if i == min(cpu, 8) else 0 for i in range(9)]
    # 5. the other rings were never written
    for other in range(9):
        if RL.ring_addr(RING, other, N) != ring:
            assert records(uc, RL.ring_addr(RING, other, N))["seq"].tolist() == [0, 1, 2, 3]


def _record_sequence(detour):
    """(start, post, abort_ip) of the record's restartable sequence (the second one;
    the first is the hit counter's)."""
    assert len(detour.rseq) == 2
    return detour.rseq[1]


@pytest.mark.parametrize("new_cpu", [1, 6, -1])
def test_record_sequence_aborted_anywhere_commits_once(new_cpu):
    """The kernel aborts the record's sequence at each of its instructions in turn (a
    preemption that migrates the thread to ``new_cpu``; -1: its rseq area unregistered
    meanwhile): exactly one whole record, in the ring of the CPU it ends on; the ring
    it started in publishes nothing (head unchanged); the hit counted once."""
    want = reference()
    detour = make_detour(spec())
    start, post, abort_ip = _record_sequence(detour)
    insns = [i.addr for i in decode(detour.code[start - SLOT: post - SLOT], start)]
    assert len(insns) > 20
    cs_ptr = FS_BASE + RSEQ_OFFSET + 8
    for at in insns:
        uc = machine(cpu=5)
        fired = []

        def preempt(uc_, address, size, _):
            if fired or int.from_bytes(uc_.mem_read(cs_ptr, 8), "little") == 0:
                return
            fired.append(address)
            uc_.mem_write(cs_ptr, bytes(8))                          # rseq_ip_fixup
            uc_.mem_write(FS_BASE + RSEQ_OFFSET + 4, new_cpu.to_bytes(4, "little",
                                                                     signed=True))
            uc_.reg_write(X.UC_X86_REG_RIP, abort_ip)
        assert run_detour(uc, detour, hooks=[(at, preempt)]) == want, hex(at)
        assert fired == [at]
        assert u64(uc, cpu_ring(5) + RL.HEAD_OFFSET) == 0, hex(at)
        ring = cpu_ring(new_cpu)
        rec = records(uc, ring)
        assert u64(uc, ring + RL.HEAD_OFFSET) == 1, hex(at)
        assert (rec[0]["seq"], rec[0]["probe_id"], rec[0]["nargs"]) == (1, 0xC0FFEE, 6)
        assert rec[0]["args"].tolist() == expected_args(6), hex(at)
        assert rec[0]["fs_base"] == FS_BASE and rec[0]["tsc"] > 0
        assert sum(u64(uc, COUNTERS + 64 * i) for i in range(9)) == 1
        assert u64(uc, MISSED) == 0 and u64(uc, cs_ptr) == 0


def _insn_addr(detour, mnemonic, op_str=None):
    for insn in decode(detour.code, detour.slot_addr):
        if insn.mnemonic.endswith(mnemonic) and (op_str is None or insn.op_str == op_str):
            return insn.addr
    raise AssertionError(f"no {mnemonic} {op_str} in the detour")


def _other_producer(pos):
    """A hook that, once, makes another producer reserve and publish position ``pos``."""
    done = []

    def hook(uc_, address, size, _):
        if not done:
            done.append(address)
            uc_.mem_write(SHARED + RL.HEAD_OFFSET, (pos + 1).to_bytes(8, "little"))
            uc_.mem_write(SHARED + RL.record_offset(pos, N - 1), (pos + 1).to_bytes(8, "little"))
    return hook, done


@pytest.mark.parametrize("where", [("cmpxchg", None),        # the CAS fails: retry
                                   ("mov", "rbp, qword ptr [rbx]")])   # seq > pos: reload
def test_lost_race_takes_next_slot(where):
    """Another producer takes position 0 between our read of head and our CAS (or our
    read of seq): we must end up in slot 1, slot 0 keeps the other producer's seq.
    (The shared ring: a thread without rseq, cpu_id -1.)"""
    want = reference()
    detour = make_detour(spec())
    uc = machine(cpu=-1)
    hook, fired = _other_producer(0)
    addr = _insn_addr(detour, *where)
    assert run_detour(uc, detour, hooks=[(addr, hook)]) == want
    assert fired
    rec = records(uc, SHARED)
    assert rec["seq"].tolist() == [1, 2, 2, 3]
    assert rec[1]["args"].tolist() == expected_args(6) and rec[0]["probe_id"] == 0
    assert u64(uc, SHARED + RL.HEAD_OFFSET) == 2 and u64(uc, MISSED) == 0


@pytest.mark.parametrize("counter,missed,nargs", [
    (COUNTERS, MISSED, 6),                           # counters near the slot: rip-relative
    (FAR + 0x9000, FAR + 0x9800, 6),                 # near the ring: [r10 + disp32]
    (FAR - (1 << 40), FAR + (1 << 39), 2),           # out of every reach: movabs
])
def test_far_ring(counter, missed, nargs):
    """A ring beyond rel32 reach of the slot, counter and missed near it, near the slot
    or nowhere near anything: still exact, the full ring still counted."""
    want = reference()
    ring = FAR + 0x10000
    handler = spec(ring_addr=ring, counter_addr=counter, missed_addr=missed, nargs=nargs)
    detour = make_detour(handler)
    uc = machine(cpu=2, ring=ring)
    for addr in {counter & ~0xFFF, missed & ~0xFFF} - {COUNTERS, MISSED & ~0xFFF}:
        uc.mem_map(addr, 0x1000)
    for _ in range(N + 2):
        assert run_detour(uc, detour) == want
    rec = records(uc, cpu_ring(2, ring))
    assert rec["seq"].tolist() == [1, 2, 3, 4] and rec["probe_id"].tolist() == [0xC0FFEE] * N
    assert rec["args"][:, :nargs].tolist() == [expected_args(nargs)[:nargs]] * N
    assert rec["fs_base"].tolist() == [FS_BASE] * N
    assert u64(uc, counter + 2 * 64) == N + 2 and u64(uc, missed) == 2
    assert records(uc, cpu_ring(2))["seq"].tolist() == [0, 1, 2, 3]   # the near rings:
    assert records(uc, SHARED)["seq"].tolist() == [0, 1, 2, 3]        # untouched


def test_record_detour_size():
    """The record detour fits a slot with typical regions (sizes as measured when
    written: two restartable sequences, the count's and the per-CPU ring's, their abort
    handlers and 32-byte aligned descriptors, the shared ring's path), even with all
    three addresses scattered beyond reach of each other and of the slot; a detour that
    cannot fit is a Refusal, never an overlong slot."""
    prologue = bytes.fromhex("554889e5" "4883ec10" "c3")       # push rbp; mov rbp, rsp; sub
    region = can_optimize(prologue, FUNC, len(prologue), FUNC)
    sizes = {nargs: len(build_detour(region, SLOT, spec(nargs=nargs)).code) for nargs in (6, 2)}
    assert sizes == {6: 512, 2: 480} and max(sizes.values()) <= SLOT_SIZE
    clustered = spec(ring_addr=FAR, counter_addr=FAR - 0x1000, missed_addr=FAR - 8)
    assert len(build_detour(region, SLOT, clustered).code) == 512
    scattered = spec(ring_addr=FAR, counter_addr=FAR - (1 << 40), missed_addr=FAR + (1 << 39))
    assert len(build_detour(region, SLOT, scattered).code) == 512 <= SLOT_SIZE
    shared_only = spec(rseq_offset=None)               # no rseq area known: one ring
    assert len(build_detour(region, SLOT, shared_only).code) < 300
    assert isinstance(build_detour(region, SLOT, replace(scattered, nargs=2)), Detour)
    long_region = can_optimize(prologue * 2, FUNC, 2 * len(prologue), FUNC)   # fits too
    assert isinstance(build_detour(long_region, SLOT, scattered), Detour)


# --- the consumer ------------------------------------------------------------------------
def _publish(ring, tscs):
    """Commit records stamped ``tscs`` at the ring's head (as the producers would)."""
    head = ring.head
    for k, tsc in enumerate(tscs):
        pos = head + k
        rec = ring.records[pos & (len(ring.records) - 1)]
        rec["probe_id"], rec["nargs"], rec["tsc"], rec["args"][0] = 7, 1, tsc, tsc
        rec["seq"] = pos + 1
    ring.header[RL.HEAD_OFFSET // 8] = head + len(tscs)


def test_consumer_merges_rings_by_tsc_and_holds_back_later_records():
    """Two per-CPU rings and the shared one: a drain hands out every committed record
    stamped before its own TSC read, in TSC order; later ones wait for the next drain
    (a thread's record on one CPU may be published after the heads were read while
    its next one, on another CPU, already is: ringlayout.py); slots are freed (tail;
    the shared ring's seq = pos + N)."""
    import mmap
    from uprobe_opt.core.ringbuf import RingBuffer
    now = [35]
    shm = mmap.mmap(-1, RingBuffer.size_for(N, 2))
    rb = RingBuffer(shm, 0, N, 2, rdtsc=lambda: now[0])
    rb.initialize()
    cpu0, cpu1, shared = rb.rings
    _publish(cpu0, [10, 30])
    _publish(cpu1, [20, 40])
    _publish(shared, [25])
    assert rb.pending() == 5
    got = rb.drain()
    assert got["tsc"].tolist() == [10, 20, 25, 30] and got["args"][:, 0].tolist() == [10, 20, 25, 30]
    assert rb.pending() == 1 and rb.held["tsc"].tolist() == [40]
    assert cpu0.tail == 2 and cpu1.tail == 2 and shared.tail == 1
    assert int(cpu1.header[RL.TAIL_OFFSET // 8]) == 2
    assert int(shared.words[0, 0]) == 0 + N                   # the shared slot handed back
    now[0] = 100                                              # nothing new: the held one
    assert rb.drain()["tsc"].tolist() == [40] and rb.pending() == 0
    # a full lap: the per-CPU ring's slots are reused once the tail moved on
    _publish(cpu0, [101, 102, 103, 104])
    now[0] = 200
    assert rb.drain()["tsc"].tolist() == [101, 102, 103, 104] and cpu0.tail == 6
    assert rb.consumed == 9


def test_consumer_one_ring_keeps_reservation_order():
    """Without per-CPU rings (no rseq area known) one shared ring, drained in
    reservation order, no TSC read."""
    import mmap
    from uprobe_opt.core.ringbuf import RingBuffer
    shm = mmap.mmap(-1, RingBuffer.size_for(N))
    rb = RingBuffer(shm, 0, N)
    rb.initialize()
    _publish(rb.rings[0], [5, 3, 4])
    assert rb.drain()["tsc"].tolist() == [5, 3, 4] and rb.tail == 3
