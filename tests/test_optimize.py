"""Jump optimization on real processes: states, exact counts, handlers on the detour."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from helpers import exec_mappings, run_cli, symbol_addr, wait_for_line
from uprobe_opt import Tracer
from uprobe_opt.core.probe import ProbeState

pytestmark = pytest.mark.timeout(180)


def test_count_is_optimized_and_exact(c_target, traced, run_plain):
    exe = c_target("loop")
    run = traced([exe, "200000"])
    probe = run.add_probe("work", handler="count")
    res = run.finish()
    assert probe.state is ProbeState.OPTIMIZED
    assert probe.nhit == 200_000
    assert res.stdout == run_plain([exe, "200000"]).stdout
    assert res.summary[0]["state"] == "optimized" and res.summary[0]["reason"] is None


def test_count_exact_with_threads(c_target, traced, run_plain):
    exe = c_target("threads")
    run = traced([exe, "8", "100000"])
    probe = run.add_probe("hit", handler="count")
    res = run.finish()
    assert probe.state is ProbeState.OPTIMIZED
    assert probe.nhit == 800_000
    assert res.stdout == run_plain([exe, "8", "100000"]).stdout


def test_python_handler_on_detour_sees_site_registers(c_target, traced):
    exe = c_target("args")
    run = traced([exe])
    seen = []

    def handler(probe, regs):
        ret = int.from_bytes(regs.read(regs.rsp, 8), "little")
        seen.append((regs.rip, regs.rdi, ret))
        regs.rdi = regs.rdi + 100

    probe = run.add_probe("scale", handler)
    site = symbol_addr(run.pid, "scale")
    main_lo = symbol_addr(run.pid, "main")
    res = run.finish()
    assert probe.state is ProbeState.OPTIMIZED
    assert res.stdout.splitlines() == [f"scale({v})={(v + 100) * 3}" for v in range(1, 11)]
    assert [s[1] for s in seen] == list(range(1, 11))
    assert all(rip == site for rip, _, _ in seen)
    # rsp as at the site: [rsp] is the return address into main
    assert all(main_lo < ret < main_lo + 0x1000 for _, _, ret in seen)


def test_aggregated_count_and_python_on_one_site(c_target, traced):
    exe = c_target("loop")
    run = traced([exe, "5000"])
    calls = []
    c = run.add_probe("work", handler="count")
    p = run.add_probe("work", lambda probe, regs: calls.append(regs.rdi))
    run.finish()
    assert c.nhit == p.nhit == 5000
    assert calls == list(range(5000))
    assert c.state is ProbeState.OPTIMIZED


def test_exact_across_optimize_unoptimize_transitions(c_target, traced):
    """8 threads call the probed function while it is optimized and unoptimized up to
    200 times: no crash, int3-phase + optimized-phase hits == calls."""
    exe = c_target("hz_hammer")
    run = traced([exe, "8", "0", "12"])        # threads call for 12 s, then report
    probe = run.add_probe("hammered", handler="count")
    t = run.tracer
    optimized = rounds = 0
    # The threads call for 12 s: stop flipping in time for them to be still calling
    # (a loaded machine runs fewer than 200 rounds in that time).
    end = time.monotonic() + 8
    while rounds < 200 and time.monotonic() < end:
        rounds += 1
        t.optimize(timeout=0.5)
        optimized += probe.state is ProbeState.OPTIMIZED
        run.run(duration=0.002)
        t.set_optimize(False)
        assert probe.state is ProbeState.INT3
        run.run(duration=0.002)
        t.set_optimize(True)
    assert not t.exited and rounds >= 10
    # a batch may be deferred now and then, never forced
    assert optimized >= rounds - max(10, rounds // 20)
    res = run.finish()
    total = int(res.stdout.split("total=")[1].split()[0])
    assert res.exit_code == 0
    assert probe.nhit == total


def test_disable_enable_and_unregister_restore_int3_then_bytes(c_target, traced):
    exe = c_target("sleeper")
    run = traced([exe, "0", "1"], stdin=subprocess.DEVNULL)
    probe = run.add_probe("tick", handler="count")
    t = run.tracer
    t.optimize()
    assert probe.state is ProbeState.OPTIMIZED
    addr = probe.site.addr
    run.run(duration=0.2)
    t.disable(probe)
    assert probe.state is ProbeState.DISABLED
    assert t.target.read(addr, 1) != b"\xcc"           # no enabled probe: disarmed
    frozen = probe.nhit
    run.run(duration=0.2)
    assert probe.nhit == frozen
    t.enable(probe)
    t.optimize()
    assert probe.state is ProbeState.OPTIMIZED
    run.run(duration=0.2)
    assert probe.nhit > frozen
    t.remove_probe(probe)
    assert t.target.read(addr, 5) == probe.site.orig[:5]
    t.kill()


def test_new_probe_inside_optimized_region_unoptimizes_it(c_target, traced):
    exe = c_target("loop")
    run = traced([exe, "3000"])
    outer = run.add_probe("work", handler="count")
    run.tracer.optimize()
    assert outer.state is ProbeState.OPTIMIZED
    inner = run.add_probe("work+0x3", handler="count")  # 2nd instruction of the region
    assert outer.state is ProbeState.INT3
    assert "inside the region" in outer.reason
    run.finish()
    assert outer.nhit == inner.nhit == 3000


def test_no_optimize_keeps_int3(c_target, traced):
    exe = c_target("loop")
    run = traced([exe, "100"], optimize=False)
    probe = run.add_probe("work", handler="count")
    res = run.finish()
    assert probe.state is ProbeState.INT3 and probe.reason is None
    assert res.summary[0]["hits"] == 100


def test_attach_optimize_detach_bytes_identical(c_target):
    exe = c_target("sleeper")
    proc = subprocess.Popen([str(exe), "0", "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        wait_for_line(proc.stdout, "sleeper: ready")
        before = exec_mappings(proc.pid)
        with Tracer.attach(proc.pid) as t:
            p = t.add_probe("tick", handler="count")
            t.run(duration=0.5)
            assert p.state is ProbeState.OPTIMIZED
            assert p.nhit > 10
        assert exec_mappings(proc.pid) == before
        wait_for_line(proc.stdout, "sleeper: tick")
    finally:
        proc.kill()
        proc.wait()


def test_cli_count_optimized_json(c_target, tmp_path, run_plain):
    exe = c_target("loop")
    out = tmp_path / "o.jsonl"
    res = run_cli("trace", "work", "--handler", "count", "--json", "-o", out, "--", exe, "1000")
    assert res.returncode == 0, res.stderr
    assert res.stdout == run_plain([exe, "1000"]).stdout
    summary = json.loads(out.read_text().splitlines()[-1])
    assert summary["probes"][0]["state"] == "optimized"
    assert summary["probes"][0]["hits"] == 1000


def test_cli_python_handler(c_target, tmp_path):
    exe = c_target("args")
    handler = tmp_path / "h.py"
    handler.write_text("def bump(probe, regs):\n    regs.rdi += 1\n")
    res = run_cli("trace", "scale", "--handler", "python", "--python", f"{handler}:bump",
                  "-o", tmp_path / "log", "--", exe)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "scale(1)=6"


def test_explain_binary_json(c_target):
    exe = c_target("loop")
    res = run_cli("explain", exe, "work", "main", "--json")
    assert res.returncode == 0, res.stderr
    a, b = (json.loads(l) for l in res.stdout.splitlines())
    assert a["optimizable"] is True and a["reason"] is None
    assert [i["insn"] for i in a["region"]][0].startswith("movsxd")
    assert b["probe"] == "main" and b["function"]["addr"] == b["address"]
    bad = run_cli("explain", exe, "work+4")                 # not a probe site: bad input
    assert bad.returncode == 2 and "is inside" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
