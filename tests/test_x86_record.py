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


def spec(**kw):
    base = dict(counter_addr=COUNTERS, ncpu_slots=8, rseq_offset=RSEQ_OFFSET, ring_addr=RING,
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
    for r in {RING, ring}:
        uc.mem_map(r, RL.ring_size(N))
        buf = bytearray(RL.ring_size(N))
        RL.init_ring(buf, N)
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
@pytest.mark.parametrize("nargs", [6, 2, 0])
def test_record_fill_full_and_consumer(nargs):
    want = reference()
    detour = make_detour(spec(nargs=nargs))
    uc = machine(cpu=13)            # beyond the 8 per-CPU slots: the shared slot 8
    tscs = []
    # 1. four hits fill the ring: exact records, seq = pos + 1
    for pos in range(N):
        assert run_detour(uc, detour) == want
        rec = records(uc)[pos]
        assert (rec["seq"], rec["probe_id"], rec["nargs"]) == (pos + 1, 0xC0FFEE, nargs)
        assert rec["args"][:nargs].tolist() == expected_args(nargs)[:nargs]
        assert rec["fs_base"] == FS_BASE
        tscs.append(int(rec["tsc"]))
        assert u64(uc, RING + RL.HEAD_OFFSET) == pos + 1
    assert tscs[0] > 0 and tscs == sorted(set(tscs))
    if nargs < 6:                           # the other args are left as they were (0)
        assert records(uc)["args"][:, nargs:].tolist() == [[0] * (6 - nargs)] * N
    # 2. no consumer: the fifth hit is dropped and counted, the ring is untouched
    ring = bytes(uc.mem_read(RING, RL.ring_size(N)))
    assert run_detour(uc, detour) == want
    assert bytes(uc.mem_read(RING, RL.ring_size(N))) == ring
    assert u64(uc, MISSED) == 1
    # 3. the consumer takes position 0: seq = 0 + N, tail = 1; the next hit reuses slot 0
    uc.mem_write(RING + RL.HEADER_SIZE + RL.SEQ_OFFSET, (0 + N).to_bytes(8, "little"))
    uc.mem_write(RING + RL.TAIL_OFFSET, (1).to_bytes(8, "little"))
    assert run_detour(uc, detour) == want
    rec = records(uc)
    assert rec["seq"].tolist() == [5, 2, 3, 4]
    assert rec[0]["probe_id"] == 0xC0FFEE and rec[0]["tsc"] > tscs[-1]
    assert rec[0]["args"][:nargs].tolist() == expected_args(nargs)[:nargs]
    assert RL.read_header(bytes(uc.mem_read(RING, 256)))["head"] == 5
    assert RL.read_header(bytes(uc.mem_read(RING, 256)))["tail"] == 1
    assert u64(uc, MISSED) == 1
    # 4. every hit was counted on this CPU's counter: records + missed == hits
    counters = [u64(uc, COUNTERS + 64 * i) for i in range(9)]
    assert counters == [0, 0, 0, 0, 0, 0, 0, 0, 6]


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
            uc_.mem_write(RING + RL.HEAD_OFFSET, (pos + 1).to_bytes(8, "little"))
            uc_.mem_write(RING + RL.record_offset(pos, N - 1), (pos + 1).to_bytes(8, "little"))
    return hook, done


@pytest.mark.parametrize("where", [("cmpxchg", None),        # the CAS fails: retry
                                   ("mov", "rbp, qword ptr [rbx]")])   # seq > pos: reload
def test_lost_race_takes_next_slot(where):
    """Another producer takes position 0 between our read of head and our CAS (or our
    read of seq): we must end up in slot 1, slot 0 keeps the other producer's seq."""
    want = reference()
    detour = make_detour(spec())
    uc = machine()
    hook, fired = _other_producer(0)
    addr = _insn_addr(detour, *where)
    assert run_detour(uc, detour, hooks=[(addr, hook)]) == want
    assert fired
    rec = records(uc)
    assert rec["seq"].tolist() == [1, 2, 2, 3]
    assert rec[1]["args"].tolist() == expected_args(6) and rec[0]["probe_id"] == 0
    assert u64(uc, RING + RL.HEAD_OFFSET) == 2 and u64(uc, MISSED) == 0


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
    rec = records(uc, ring)
    assert rec["seq"].tolist() == [1, 2, 3, 4] and rec["probe_id"].tolist() == [0xC0FFEE] * N
    assert rec["args"][:, :nargs].tolist() == [expected_args(nargs)[:nargs]] * N
    assert rec["fs_base"].tolist() == [FS_BASE] * N
    assert u64(uc, counter + 2 * 64) == N + 2 and u64(uc, missed) == 2
    assert records(uc)["seq"].tolist() == [0, 1, 2, 3]         # the near ring: untouched


def test_record_detour_size():
    """The record detour fits a slot with typical regions (sizes as measured when
    written; the rseq abort handler and its 32-byte aligned descriptor included), even with all three addresses scattered beyond reach of each other and
    of the slot; a detour that cannot fit is a Refusal, never an overlong slot."""
    prologue = bytes.fromhex("554889e5" "4883ec10" "c3")       # push rbp; mov rbp, rsp; sub
    region = can_optimize(prologue, FUNC, len(prologue), FUNC)
    sizes = {nargs: len(build_detour(region, SLOT, spec(nargs=nargs)).code) for nargs in (6, 2)}
    assert sizes == {6: 301, 2: 301} and max(sizes.values()) <= SLOT_SIZE
    clustered = spec(ring_addr=FAR, counter_addr=FAR - 0x1000, missed_addr=FAR - 8)
    assert len(build_detour(region, SLOT, clustered).code) == 330
    scattered = spec(ring_addr=FAR, counter_addr=FAR - (1 << 40), missed_addr=FAR + (1 << 39))
    assert len(build_detour(region, SLOT, scattered).code) == 339 <= SLOT_SIZE
    assert isinstance(build_detour(region, SLOT, replace(scattered, nargs=2)), Detour)
    long_region = can_optimize(prologue * 2, FUNC, 2 * len(prologue), FUNC)   # fits too
    assert isinstance(build_detour(long_region, SLOT, scattered), Detour)
