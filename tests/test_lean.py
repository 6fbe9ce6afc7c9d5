"""Lean detours on real processes: per-CPU counters in restartable sequences exact under
migration, preemption and signals, and the lock-inc fallback of a thread without rseq.

lean_storm.c: "migrate" runs 8 workers on a 2-CPU machine while a flipper thread moves
them between CPU 0 and CPU 1 every 0.5 ms; "alarm" raises SIGALRM every 100 us and its
handler calls the probed function, so signals land while the main thread is inside
the detour (its sequence must abort and restart, never count twice or lose a hit).
"""
from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest

from uprobe_opt.core.probe import ProbeState

pytestmark = pytest.mark.timeout(300)

MIGRATE_N, MIGRATE_M = 8, 1_000_000
NO_RSEQ = dict(os.environ, GLIBC_TUNABLES="glibc.pthread.rseq=0")


def slots(site) -> list[int]:
    """The site's counter slots: one per CPU, then the shared slot of threads without
    rseq (HandlerSpec.counter_slots)."""
    c = site.counter
    return [struct.unpack_from("<Q", c.area.shm, c.offset + 64 * i)[0]
            for i in range(c.nslots)]


def add(run, kind):
    """kind: count, record, or both (a count and a record probe on one site)."""
    probes = {}
    if kind in ("count", "both"):
        probes["count"] = run.add_probe("hit", handler="count", nargs=2)
    if kind in ("record", "both"):
        probes["record"] = run.add_probe("hit", handler="record", nargs=2)
    return probes


def check_records(recs, probe, hits, per_thread: dict[int, int]):
    """records + missed == hits; every record whole: args (t, i) of a known thread t,
    each thread's i strictly increasing and below its call count, one tid per t."""
    assert len(recs) + probe.nmissed == hits
    assert np.all(recs["nargs"] == 2)
    for t, calls in per_thread.items():
        mine = recs[recs["args"][:, 0] == t]
        i = mine["args"][:, 1].astype(np.int64)
        assert np.all(np.diff(i) > 0) and (not len(i) or (i[0] >= 0 and i[-1] < calls))
        assert len(set(mine["tid"].tolist())) <= 1
    assert set(recs["args"][:, 0].tolist()) <= set(per_thread)


@pytest.mark.parametrize("kind", ["count", "record", "both"])
def test_8_threads_migrating_exact(c_target, traced, run_plain, kind):
    exe = c_target("lean_storm")
    argv = [exe, "migrate", str(MIGRATE_N), str(MIGRATE_M)]
    run = traced(argv)
    run.tracer.manager.records.buffer_bytes = 32 << 20
    probes = add(run, kind)
    res = run.finish(timeout=240)
    assert res.stdout == run_plain(argv).stdout
    flips, cpus = map(int, re.search(r"flips=(\d+) cpus_seen=(\d+)", res.stderr).groups())
    assert flips >= 20 and cpus == min(2, os.cpu_count())        # they did migrate
    hits = MIGRATE_N * MIGRATE_M
    for p in probes.values():
        assert p.state is ProbeState.OPTIMIZED and p.nhit == hits
    site = next(iter(probes.values())).site
    per_cpu = slots(site)
    assert per_cpu[-1] == 0 and sum(per_cpu) > 0               # rseq path, no fallback
    if "record" in probes:
        check_records(run.tracer.records(), probes["record"], hits,
                      {t: MIGRATE_M for t in range(MIGRATE_N)})
        # per-CPU rings only (no lock); both CPUs' rings took records
        *cpu_rings, shared = run.tracer.manager.records.ring.rings
        assert shared.tail == 0 and all(r.tail > 0 for r in cpu_rings[:os.cpu_count()])


@pytest.mark.parametrize("kind", ["count", "record"])
def test_sigalrm_storm_handler_calls_the_probed_function(c_target, traced, kind):
    exe = c_target("lean_storm")
    run = traced([exe, "alarm", "3000"])
    run.tracer.manager.records.buffer_bytes = 32 << 20
    probes = add(run, kind)
    res = run.finish(timeout=240)
    assert res.stdout == "alarm: 3000 signals\n"
    main, handler = map(int, re.search(r"main=(\d+) handler=(\d+)", res.stderr).groups())
    assert handler == 3000
    (probe,) = probes.values()
    assert probe.state is ProbeState.OPTIMIZED and probe.nhit == main + handler
    assert slots(probe.site)[-1] == 0
    if kind == "record":
        check_records(run.tracer.records(), probe, main + handler, {0: main, 1: handler})


@pytest.mark.parametrize("kind", ["count", "both"])
def test_without_rseq_the_lock_inc_fallback_is_exact(c_target, traced, run_plain, kind):
    exe = c_target("lean_storm")
    argv = [exe, "migrate", "4", "200000"]
    run = traced(argv, env=NO_RSEQ)
    run.tracer.manager.records.buffer_bytes = 32 << 20
    probes = add(run, kind)
    res = run.finish(timeout=240)
    assert res.stdout == run_plain(argv).stdout
    for p in probes.values():
        assert p.state is ProbeState.OPTIMIZED and p.nhit == 800_000
    per_cpu = slots(next(iter(probes.values())).site)
    assert sum(per_cpu[:-1]) == 0 and per_cpu[-1] > 0         # every hit: the shared slot
    if "record" in probes:
        check_records(run.tracer.records(), probes["record"], 800_000,
                      {t: 200_000 for t in range(4)})
        *cpu_rings, shared = run.tracer.manager.records.ring.rings   # the shared ring only
        assert all(r.tail == 0 for r in cpu_rings) and shared.tail + probes["record"].nmissed \
            == 800_000


# --- the detour bodies in the emulator: both ways of keeping the flags ---------------------
# mov rax, rdi; lea rdx, [rsi + 1]; ret: the region writes no flag, so the flags at its
# end are the ones the detour restored
FLAT = bytes.fromhex("4889f8" "488d5601" "c3")


@pytest.mark.parametrize("flags_save", ["lahf", "pushf"])
@pytest.mark.parametrize("eflags", [0x202, 0xAD7, 0x8C3, 0x283])
def test_count_and_record_keep_every_register_and_flag(flags_save, eflags):
    """All six arithmetic flags (OF too, which lahf does not cover), every GPR and the
    stack from the red zone up as the original region leaves them, with lahf/seto and
    with pushfq; the hit counted on this CPU's slot."""
    import test_x86_record as R
    from uprobe_opt.x86 import Detour, build_detour, can_optimize

    def start(uc):
        uc.mem_write(R.FUNC, FLAT)
        R.set_site_state(uc, eflags=eflags)
    uc = R.machine(cpu=3)
    start(uc)
    want = R.run(uc, R.FUNC, R.FUNC, R.FUNC + 7)
    assert want[0]["eflags"] == eflags & R.FLAGS_MASK
    region = can_optimize(FLAT, R.FUNC, len(FLAT), R.FUNC)
    for spec in (R.spec(flags_save=flags_save),
                 R.HandlerSpec("count", counter_addr=R.COUNTERS, ncpu_slots=8,
                               rseq_offset=R.RSEQ_OFFSET, flags_save=flags_save),
                 R.HandlerSpec("count", counter_addr=R.COUNTERS, flags_save=flags_save)):
        detour = build_detour(region, R.SLOT, spec)
        assert isinstance(detour, Detour)
        uc = R.machine(cpu=3)
        start(uc)
        uc.mem_write(R.SLOT, detour.code)
        assert R.run(uc, R.SLOT, R.SLOT, detour.end_addr) == want
        assert R.u64(uc, spec.counter_slot_addr(3)) == 1


def test_pushf_mode_has_no_lahf():
    import test_x86_record as R
    from uprobe_opt.x86 import decode
    d = R.make_detour(R.spec(flags_save="pushf"))
    texts = [str(i) for i in decode(d.code[:d.reloc_addr - d.slot_addr], d.slot_addr)]
    assert "pushfq" in texts and "popfq" in texts and "lahf" not in texts


# --- explain --detour -------------------------------------------------------------------------
def test_explain_detour_lists_what_a_hit_executes(c_target):
    from helpers import run_cli
    exe = c_target("lean_storm")
    res = run_cli("explain", exe, "hit", "--detour")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for kind in ("count", "record", "python"):
        assert f"detour, {kind} handler (" in out
    assert "lahf" in out and "sahf" in out and "add al, 0x7f" in out
    assert "<- rseq start_ip" in out and "<- abort_ip" in out
    assert "struct rseq_cs {version 0, flags 0" in out
    assert "the abort signature" in out
    assert "<- the tracer runs the Python handler here" in out
    js = run_cli("explain", exe, "hit", "--detour=count", "--json")
    (event,) = [json.loads(line) for line in js.stdout.splitlines()]
    lines = event["detours"]["count"]["lines"]
    assert set(event["detours"]) == {"count"}
    assert lines[0]["text"] == "lea rsp, [rsp - 0x80]"
    assert any(line["text"].startswith("inc qword ptr") for line in lines)
    bad = run_cli("explain", exe, "hit", "--detour=bogus")
    assert bad.returncode == 2 and "--detour takes one of" in bad.stderr
