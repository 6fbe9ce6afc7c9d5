"""Int3 sites the optimizer refuses, served by the kernel's uprobe (core/kernel.py).

Real processes, exact values: hits equal the program's own call counts across the
hand-over, records carry the calling thread and the arguments, nothing is lost or
doubled when the site changes hands while the program runs through it, and after
detach the code is byte-identical.  Skips (with the reason) where the kernel cannot
serve sites.
"""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from helpers import exec_mappings, proc_state
from uprobe_opt import Tracer
from uprobe_opt.core.kernel import KernelService
from uprobe_opt.core.probe import ProbeState
from uprobe_opt.testing import build_target

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def kernel():
    from helpers import kernel_uprobes_unavailable
    reason = kernel_uprobes_unavailable()
    if reason is not None:
        pytest.skip(f"kernel uprobes unavailable: {reason}")


def _reference(name: str, *args) -> str:
    return subprocess.run([str(build_target(name)), *map(str, args)], capture_output=True,
                          text=True, check=True).stdout


def _spawn(name: str, *args, **kw):
    r, w = os.pipe()
    tr = Tracer.spawn([build_target(name), *map(str, args)], stdout=w, **kw)
    os.close(w)
    return tr, r


def _output(r: int) -> str:
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    return out.decode()


@pytest.mark.parametrize("name,spec,k", [("hz_switch", "classify", 100_000),
                                         ("hz_short", "tiny3", 100_000),
                                         ("hz_short", "tiny1", 100_000)])
def test_refused_count_site_is_served_by_the_kernel(name, spec, k):
    tr, r = _spawn(name, k)
    with tr:
        p = tr.add_probe(spec, handler="count")
        tr.run(until=lambda: p.site.kernel is not None or tr.exited)
        assert p.state is ProbeState.INT3 and p.served_by == "kernel uprobe"
        assert p.reason and not p.reason.startswith("int3")      # the refusal itself
        assert tr.tracer_probes() == []          # no hit of it needs the tracer
        tr.run()
        assert tr.exit_code == 0
        assert p.nhit == k and p.nmissed == 0
        assert p._hits == 0                      # handed over before the first call
    assert _output(r) == _reference(name, k)
    assert p.state is ProbeState.INT3 and p.served_by == "kernel uprobe"
    assert tr.summary()[0]["served_by"] == "kernel uprobe"


def test_summary_after_detach_keeps_the_refusal():
    """Detached while the program runs on (the end of a trace by PID): the summary
    row still says why the site stayed int3 and who served it."""
    tr, r = _spawn("hz_switch", 2_000_000)
    with tr:
        p = tr.add_probe("classify", handler="count")
        tr.run(until=lambda: p.site.kernel is not None and p.nhit > 0)
        live = p.reason
        assert live and live.startswith("indirect jmp at ") and live.endswith("(jump table)")
        tr.detach()
        (row,) = tr.summary()
        assert (row["state"], row["served_by"], row["reason"]) == \
            ("int3", "kernel uprobe", live)
    assert _output(r) == _reference("hz_switch", 2_000_000)


def test_refused_record_site_records_tid_and_args_exactly():
    k = 20_000
    tr, r = _spawn("hz_short", k)
    with tr:
        p = tr.add_probe("tiny3", handler="record", nargs=1)
        tr.run()
        recs = tr.records()
        assert tr.exit_code == 0 and p.site.kernel is not None
        assert p.nhit == k == len(recs) + p.nmissed and p.nmissed == 0
        assert (recs["site"] == p.site.id).all() and (recs["nargs"] == 1).all()
        assert (recs["tid"] == tr.pid).all()
        assert recs["args"][:, 0].tolist() == list(range(k))     # tiny3(i), in order
    assert _output(r) == _reference("hz_short", k)


def test_threads_records_on_a_kernel_site_name_the_calling_thread():
    """threads.c's hit() can be optimized, so its site is marked refused by hand
    (the probe does not ask for a jump) and handed to the kernel: each record names
    the worker thread that made the call, and each thread's calls come in order."""
    n, m = 4, 5000
    tr, r = _spawn("threads", n, m)
    with tr:
        p = tr.add_probe("hit", handler="record", nargs=2, optimize=False)
        p.site.refusal = "test: kept int3"        # as if the optimizer had refused it
        assert tr.manager.serve_refused() == 1
        tr.run()
        recs = tr.records()
        assert tr.exit_code == 0
        assert p.nhit == n * m == len(recs)
        by_worker = {}
        for w, i, tid in zip(recs["args"][:, 0].tolist(), recs["args"][:, 1].tolist(),
                             recs["tid"].tolist()):
            by_worker.setdefault(w, []).append((i, tid))
        assert sorted(by_worker) == list(range(n))
        for w, calls in by_worker.items():
            assert [i for i, _ in calls] == list(range(m))          # call order kept
            assert len({tid for _, tid in calls}) == 1              # one thread each
        assert len({calls[0][1] for calls in by_worker.values()}) == n
    assert _output(r) == _reference("threads", n, m)


def test_handover_while_the_program_runs_hot_loses_and_doubles_nothing():
    k = 200_000
    tr, r = _spawn("hz_switch", k, kernel_uprobes=False)
    with tr:
        p = tr.add_probe("classify", handler="count")
        tr.run(until=lambda: p.nhit >= 3000)       # a ptrace stop per hit
        assert p.site.kernel is None and p.site.refusal is not None
        tr.manager.kernel = KernelService(tr.manager)
        assert tr.manager.serve_refused() == 1     # one window, the program mid-loop
        on_ptrace = p._hits
        tr.run()
        assert tr.exit_code == 0
        assert p.nhit == k                         # ours before + the kernel's after
        assert 3000 <= on_ptrace == p._hits < k    # no trap came to us afterwards
    assert _output(r) == _reference("hz_switch", k)


def test_site_taken_back_for_a_python_handler_counts_exactly():
    k = 60_000
    tr, r = _spawn("hz_switch", k)
    seen = []
    with tr:
        c = tr.add_probe("classify", handler="count")
        tr.run(until=lambda: c.site.kernel is not None and c.nhit >= 20_000)
        before = c.nhit
        py = tr.add_probe("classify", lambda probe, regs: seen.append(regs.rdi))
        assert c.site.kernel is None and set(tr.tracer_probes()) == {c, py}
        tr.run()
        assert tr.exit_code == 0
        assert c.nhit == k
        assert 0 < py.nhit == len(seen) <= k - before
        assert seen == [i % 13 for i in range(k - len(seen), k)]
    assert _output(r) == _reference("hz_switch", k)


def test_detach_leaves_the_code_byte_identical():
    prog = subprocess.Popen([build_target("hz_switch"), "1000000000000000"],
                            stdout=subprocess.DEVNULL)
    try:
        # In its main loop (some CPU time used), past the loader's mapping changes.
        while int(open(f"/proc/{prog.pid}/stat").read().rsplit(")", 1)[1].split()[11]) < 2:
            os.sched_yield()
        before = exec_mappings(prog.pid)
        with Tracer.attach(prog.pid) as tr:
            p = tr.add_probe("classify", handler="count")
            tr.run(until=lambda: p.nhit >= 100_000)
            assert p.site.kernel is not None and p._hits < 100
        after = exec_mappings(prog.pid)
        assert {k: v for k, v in after.items() if k in before} == before
        assert [k[2] for k in after if k not in before] in ([], ["[uprobes]"])
        assert proc_state(prog.pid) in ("R", "S") and prog.poll() is None
    finally:
        prog.send_signal(signal.SIGKILL)
        prog.wait()


def test_no_kernel_uprobes_keeps_the_site_on_ptrace():
    k = 5000
    tr, r = _spawn("hz_switch", k, kernel_uprobes=False)
    with tr:
        p = tr.add_probe("classify", handler="count")
        tr.run()
        assert p.nhit == k == p._hits and p.site.kernel is None
        assert tr.tracer_probes() == [p] and tr.kernel_reason
    assert _output(r) == _reference("hz_switch", k)


def test_a_kernel_uprobe_placed_over_our_jump_and_removed_before_we_end():
    """Another tool (bpftrace, perf probe) puts its kernel uprobe on a function we
    jump-optimized, then removes it: the kernel writes its int3 over our jump's first
    byte and, on removal, the file's first byte back in front of our jump's tail.  Our
    end recognises that state and restores the tail: the code is the file's again.
    (The function is idle meanwhile: a call while the other uprobe's int3 sits over
    our jump would resume inside our jump's bytes; see the README.)"""
    import kuprobe
    from helpers import text_vs_file
    exe = str(build_target("sleeper"))
    prog = subprocess.Popen([exe, "0", "100000000"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert prog.stdout.readline().startswith("sleeper: ready pid=")
        t = Tracer.attach(prog.pid)
        p = t.add_probe("tick", handler="count")
        t.optimize(timeout=5)
        assert p.state is ProbeState.OPTIMIZED
        site, jump = p.site.addr, bytes(p.site.jump)
        with kuprobe.KernelUprobes(prog.pid, ["tick"]):
            assert t.target.read(site, 5) == b"\xcc" + jump[1:5]       # theirs over ours
        assert t.target.read(site, 5) == bytes(p.site.orig[:1]) + jump[1:5]
        t.detach()
        assert text_vs_file(prog.pid, exe) == []
        assert p.is_gone is False
    finally:
        prog.kill()
        prog.wait(timeout=10)
