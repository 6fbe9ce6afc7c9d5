"""Lean detours on real processes: per-CPU counters in restartable sequences exact under
migration, preemption and signals, and the lock-inc fallback of a thread without rseq.

lean_storm.c: "migrate" runs 8 workers on a 2-CPU machine while a flipper thread moves
them between CPU 0 and CPU 1 every 0.5 ms; "alarm" raises SIGALRM every 100 us and its
handler calls the probed function, so signals land while the main thread is inside
the detour (its sequence must abort and restart, never count twice or lose a hit).
"""
from __future__ import annotations

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
    assert flips >= 5 and cpus == min(2, os.cpu_count())        # they did migrate
    hits = MIGRATE_N * MIGRATE_M
    for p in probes.values():
        assert p.state is ProbeState.OPTIMIZED and p.nhit == hits
    site = next(iter(probes.values())).site
    per_cpu = slots(site)
    assert per_cpu[-1] == 0 and sum(per_cpu) > 0               # rseq path, no fallback
    if "record" in probes:
        check_records(run.tracer.records(), probes["record"], hits,
                      {t: MIGRATE_M for t in range(MIGRATE_N)})


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
