"""Hazard targets (targets/hz_*.c, targets/README.md) under the real tool.

For every target and every documented probe spec: the program's output is identical with
and without the probe, it exits 0, the hit count is exactly the number of executions of
the probed instruction (derived from the program's arguments), and the probe ends in the
documented state -- ``optimized`` where the site is safe, ``int3`` with a reason naming
the hazard where it is not.  The 8-thread optimize/unoptimize x200 hazard lives in
tests/test_optimize.py::test_exact_across_optimize_unoptimize_transitions.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from helpers import symbol_addr
from uprobe_opt.core.probe import ProbeState

pytestmark = pytest.mark.timeout(120)

OPT, INT3 = ProbeState.OPTIMIZED, ProbeState.INT3


def calls(k: int) -> int:
    """One hit per call."""
    return k


def tri(k: int) -> int:
    """A probe on a loop body run i times by call i = 1..k: k(k+1)/2 hits."""
    return k * (k + 1) // 2


@dataclass(frozen=True)
class Case:
    target: str
    spec: str
    state: ProbeState
    reason: str | None          # distinctive substring of the int3 reason
    k: int                      # K for the optimized run (count handler)
    k_int3: int                 # K for runs where every hit is a ptrace stop
    hits: Callable[[int], int] = calls

    @property
    def id(self) -> str:
        return f"{self.target}:{self.spec}"


CASES = [
    # red zone: live data at -8/-16(%rsp) across the probe point
    Case("hz_redzone", "rz_leaf+0xa", OPT, None, 100_000, 5000),
    Case("hz_redzone", "rz_leaf", OPT, None, 100_000, 5000),
    # loop back-edge into the first 5 bytes
    Case("hz_backedge", "backedge", INT3, "targets", 10_000, 5000),
    Case("hz_backedge", "backedge+0x5", OPT, None, 2000, 100, tri),
    # dense switch: notrack jmp *%rax through a jump table
    Case("hz_switch", "classify", INT3, "indirect jmp", 10_000, 5000),
    # je rel8 leaving the region
    Case("hz_rel8", "rel8_out", OPT, None, 100_000, 5000),
    # RIP-relative load/store and VEX (AVX2) RIP-relative load
    Case("hz_riprel", "rip_load", OPT, None, 100_000, 3000),
    Case("hz_riprel", "rip_store", OPT, None, 100_000, 3000),
    Case("hz_riprel", "avx_load", OPT, None, 100_000, 3000),
    # call as the whole region, C++ exception thrown through it
    Case("hz_cxx_throw", "call_first", OPT, None, 3000, 3000),
    # functions shorter than the jump
    Case("hz_short", "tiny1", INT3, "function ends", 10_000, 5000),
    Case("hz_short", "tiny3", INT3, "function ends", 10_000, 5000),
    Case("hz_short", "after_tiny", OPT, None, 100_000, 5000),
    # endbr64 entry: `ebr` is planted at ebr+0x4
    Case("hz_endbr", "ebr", OPT, None, 100_000, 5000),
    Case("hz_endbr", "ebr+0x4", OPT, None, 100_000, 5000),
    # RIP-relative operand followed by an immediate
    Case("hz_cmpimm", "cmp_imm8", OPT, None, 100_000, 5000),
    Case("hz_cmpimm", "cmp_imm32", OPT, None, 100_000, 5000),
    # computed goto back into the region
    Case("hz_goto", "cgoto", INT3, "indirect jmp", 10_000, 5000),
    # loop / jrcxz (rel8 only)
    Case("hz_loop", "loopsum", OPT, None, 10_000, 3000),
    Case("hz_loop", "loopsum+0x5", OPT, None, 2000, 100, tri),
    Case("hz_loop", "jrcxz_first", OPT, None, 10_000, 3000),
    # instructions crossing byte 5
    Case("hz_cross5", "cross5", OPT, None, 100_000, 5000),
    Case("hz_cross5", "cross5b", OPT, None, 100_000, 5000),
]
OPT_CASES = [c for c in CASES if c.state is OPT]


def expected_hits(case: Case, k: int, stdout: str) -> int:
    if case.spec == "avx_load" and "avx: skipped" in stdout:
        return 0                                  # no AVX2: never called
    return case.hits(k)


def exe_for(c_target, case: Case):
    return c_target(case.target)          # targets/NAME.c or .cc


def check_run(case: Case, run, probe, plain, k: int, state: ProbeState) -> None:
    res = run.finish()
    assert res.exit_code == 0, res.stderr
    assert plain.exit_code == 0, plain.stderr
    assert res.stdout == plain.stdout
    assert probe.nhit == expected_hits(case, k, res.stdout)
    assert probe.nmissed == 0
    assert probe.state is state, probe.reason
    row = res.summary[0]
    assert row["hits"] == probe.nhit and row["state"] == state.value


# -- the table: count handler, optimizer on --------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hazard_count(case, c_target, traced, run_plain):
    exe = exe_for(c_target, case)
    k = case.k if case.state is OPT else case.k_int3
    run = traced([exe, str(k)])
    probe = run.add_probe(case.spec, handler="count")
    run.tracer.optimize()
    # the state is decided before the program runs: it must not change on the way
    assert probe.state is case.state, probe.reason
    if case.state is INT3:
        assert probe.reason is not None and case.reason in probe.reason, probe.reason
    else:
        assert probe.reason is None
    check_run(case, run, probe, run_plain([exe, str(k)]), k, case.state)
    if case.state is INT3:
        assert case.reason in run.result.summary[0]["reason"]


# -- the same sites with every probe kept int3 (--no-optimize) --------------------------

@pytest.mark.parametrize("case", OPT_CASES, ids=lambda c: c.id)
def test_hazard_no_optimize_same_counts(case, c_target, traced, run_plain):
    exe = exe_for(c_target, case)
    k = case.k_int3
    run = traced([exe, str(k)], optimize=False)
    probe = run.add_probe(case.spec, handler="count")
    check_run(case, run, probe, run_plain([exe, str(k)]), k, INT3)
    assert probe.reason is None


# -- Python pre_handlers on the optimized path: the registers of the probe site ---------

def _arg_cases():
    # (target, spec, K, expected (rdi, rsi) per call; rsi None: not checked)
    return [
        ("hz_redzone", "rz_leaf+0xa", 3000, [(i, 3 * i) for i in range(3000)]),
        ("hz_rel8", "rel8_out", 3000, [(0 if i % 4 == 0 else i, None) for i in range(3000)]),
        ("hz_cxx_throw", "call_first", 3000, [(i, None) for i in range(3000)]),
        ("hz_cross5", "cross5b", 3000, [(i, None) for i in range(3000)]),
        ("hz_endbr", "ebr", 3000, [(i, None) for i in range(3000)]),
        ("hz_loop", "jrcxz_first", 3000, [(i % 5, None) for i in range(1, 3001)]),
    ]


@pytest.mark.parametrize("target,spec,k,expected", _arg_cases(),
                         ids=[f"{a[0]}:{a[1]}" for a in _arg_cases()])
def test_hazard_python_handler_records_args(target, spec, k, expected, c_target, traced,
                                            run_plain):
    case = Case(target, spec, OPT, None, k, k)
    exe = exe_for(c_target, case)
    run = traced([exe, str(k)])
    seen = []

    def record(probe, regs):
        seen.append((regs.rdi, regs.rsi, regs.rip, probe.addr))

    probe = run.add_probe(spec, record)
    run.tracer.optimize()
    assert probe.state is OPT, probe.reason
    site = probe.site.addr
    requested = symbol_addr(run.pid, spec)
    check_run(case, run, probe, run_plain([exe, str(k)]), k, OPT)
    assert len(seen) == k
    assert [s[0] for s in seen] == [e[0] for e in expected]
    if expected[0][1] is not None:
        assert [s[1] for s in seen] == [e[1] for e in expected]
    assert {s[2] for s in seen} == {site}          # rip as at the site, not the detour
    assert {s[3] for s in seen} == {requested}     # the address the user asked for


# -- specific checks ---------------------------------------------------------------------

def test_endbr64_kept_in_place_while_optimized(c_target, traced, run_plain):
    exe = c_target("hz_endbr")
    run = traced([exe, "100000"])
    probe = run.add_probe("ebr", handler="count")
    run.tracer.optimize()
    func = symbol_addr(run.pid, "ebr")
    assert probe.addr == func and probe.site.addr == func + 4
    assert probe.state is OPT
    t = run.tracer.target
    assert t.read(func, 4) == bytes.fromhex("f30f1efa")    # endbr64 untouched
    assert t.read(func + 4, 1) == b"\xe9"                    # jmp rel32 after it
    res = run.finish()
    assert res.stdout == run_plain([exe, "100000"]).stdout
    assert probe.nhit == 100_000
    assert res.summary[0]["address"] == f"{func:#x}"


def test_cxx_throw_through_relocated_call_catch_works(c_target, traced, run_plain):
    """Every third call throws through call_first's relocated call: the catch still
    works, so the return address pushed by the detour is the original call_first+5."""
    exe = c_target("hz_cxx_throw")
    run = traced([exe, "30000"])
    probe = run.add_probe("call_first", handler="count")
    run.tracer.optimize()
    assert probe.state is OPT, probe.reason
    res = run.finish()
    plain = run_plain([exe, "30000"])
    assert res.exit_code == 0 and plain.exit_code == 0, res.stderr
    assert res.stdout == plain.stdout == "caught 10000, sum=600020000\n"
    assert probe.nhit == 30_000


def test_new_probe_into_cross5_region_restores_whole_tail(c_target, traced, run_plain):
    """cross5's region is 12 bytes (xor + movabs): the jump ends inside the movabs.  A
    new probe on the movabs (byte 2, inside the region) unoptimizes it: int3 first, then
    bytes 1..11 restored as a unit -- without wiping the new probe's own int3 at +0x2;
    both probes then count every call."""
    exe = c_target("hz_cross5")
    k = 5000
    run = traced([exe, str(k)])
    outer = run.add_probe("cross5", handler="count")
    run.tracer.optimize()
    assert outer.state is OPT
    t = run.tracer.target
    orig = outer.site.region.orig
    assert len(orig) == 12
    live = t.read(outer.site.addr, 12)
    assert live[0] == 0xE9 and live[5:] == orig[5:]       # jmp, then the rest untouched
    # the inner probe stays int3 (optimize=False): it must keep trapping on its own
    inner = run.add_probe("cross5+0x2", handler="count", optimize=False)
    assert inner.state is INT3
    assert outer.state is INT3 and "inside" in outer.reason, outer.reason
    live = t.read(outer.site.addr, 12)
    res = run.finish()
    assert res.exit_code == 0
    assert res.stdout == run_plain([exe, str(k)]).stdout
    assert outer.nhit == k
    assert inner.nhit == k, "the inner probe lost its int3"
    assert live[0] == 0xCC and live[1] == orig[1]
    assert live[2] == 0xCC and live[3:] == orig[3:]       # +0x2: the inner probe's int3


# -- a thread blocked in a syscall inside the region ------------------------------------

def _blocked_reader(pid: int, func_lo: int, func_hi: int) -> int | None:
    """tid of a thread blocked in read(0, ...) with its pc in [func_lo, func_hi)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            continue
        if len(fields) >= 9 and fields[0] == "0" and int(fields[1], 16) == 0 \
                and func_lo <= int(fields[-1], 16) < func_hi:
            return int(tid)
    return None


def test_syscall_blocked_thread_in_region_defers(c_target, traced, run_plain, tmp_path):
    """hz_syscall's reader thread blocks in park_read's `syscall` (+0x3..+0x5).  Its rip
    is +0x5 (the region end), but the kernel restarts the interrupted read at rip-2 =
    +0x3, strictly inside the region: the jump must not be written while it is parked.

    Probes are armed int3-only first (exact counts from the first call), the reader is
    let block, then optimization is switched on: park_read must stay int3, deferred,
    with a reason naming the thread; once stdin reaches EOF and the reader has left,
    park_read is optimized while main still calls it.  Reads return their data
    ("stdin 100 bytes") and the output equals an untraced run.

    Observed at 13c1e8b: deferred correctly (a few hundred deferrals, never forced),
    optimized within ms of EOF, counts exact -- but while deferred the reason reads
    "optimization pending"; the THREAD_IN_RANGE text only appears after MAX_DEFERRALS
    (2000) attempts, and from then on the site is dropped from the queue for good."""
    exe = c_target("hz_syscall")
    k, sleep_us = 5000, 20000                # main: 50 batches of 100 calls, 20 ms apart
    argv = [exe, str(k), str(sleep_us)]
    r, w = os.pipe()
    try:
        run = traced(argv, optimize=False, stdin=r)
    finally:
        os.close(r)
    try:
        p = run.add_probe("park_read", handler="count")
        q = run.add_probe("park_read_mid", handler="count")
        func = symbol_addr(run.pid, "park_read")
        t = run.tracer

        reader = None
        deadline = time.monotonic() + 10
        while reader is None and time.monotonic() < deadline:
            run.run(duration=0.02)
            reader = _blocked_reader(run.pid, func, func + 6)
        assert reader is not None, "reader thread never blocked in park_read"

        t.set_optimize(True)
        t.optimize(timeout=0.3)
        run.run(duration=0.3)
        assert not t.exited
        assert _blocked_reader(run.pid, func, func + 6) == reader
        # deferred, never forced (the reason is checked last, after the counts)
        assert p.state is INT3
        parked_reason = p.reason
        # park_read_mid: syscall in the middle of the region is refused outright
        assert q.state is INT3 and "not the last" in q.reason, q.reason

        os.write(w, b"x" * 100)              # one atomic write: one read returns it all
        run.run(duration=0.05)
        os.close(w)
        w = -1                                # EOF: the reader returns and exits
        run.run(until=lambda: p.state is OPT, duration=5)
        assert not t.exited, "main finished before park_read was optimized"
        assert p.state is OPT, p.reason
    finally:
        if w >= 0:
            os.close(w)
    res = run.finish()
    data = tmp_path / "stdin"
    data.write_bytes(b"x" * 100)
    with open(data, "rb") as f:              # plain run: the same 100 bytes, then EOF
        plain = run_plain(argv, stdin=f)
    assert res.exit_code == 0 and plain.exit_code == 0, res.stderr
    assert res.stdout == plain.stdout == f"syscall: {k}+{k} zero reads, stdin 100 bytes\n"
    # main's K calls + the reader's read that returned 100 bytes + the one at EOF
    assert p.nhit == k + 2
    assert q.nhit == k
    assert q.state is INT3
    # while the reader was parked the reason said why (THREAD_IN_RANGE), not just "pending"
    assert parked_reason is not None and "thread" in parked_reason, parked_reason


def test_syscall_reader_started_after_optimization(c_target, traced):
    """The other legal order: park_read optimized before the reader exists, the reader
    then blocks in the detour's relocated syscall (restarts land there too)."""
    exe = c_target("hz_syscall")
    k = 1000
    r, w = os.pipe()
    try:
        run = traced([exe, str(k), "1000"], stdin=r)
    finally:
        os.close(r)
    try:
        p = run.add_probe("park_read", handler="count")
        run.tracer.optimize()
        assert p.state is OPT, p.reason
        run.run(duration=0.3)
        os.write(w, b"y" * 200)
        run.run(duration=0.05)
    finally:
        os.close(w)
    res = run.finish()
    assert res.exit_code == 0, res.stderr
    assert res.stdout == f"syscall: {k}+{k} zero reads, stdin 200 bytes\n"
    assert p.nhit == k + 2
    assert p.state is OPT
