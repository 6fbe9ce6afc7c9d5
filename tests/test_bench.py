"""The benchmark scripts run (tiny --quick mode) and produce their table and JSON.

No timing is asserted here: the numbers are the scripts' business (see
docs/performance.md); this only proves the scripts work end to end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ptrace, tracefs)")


def run_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # The venv's python directly: the scripts' bash preamble does the same after
    # checking the venv is set up, which it is when the tests run.
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_scripts_are_executable_with_a_shebang():
    for name in ("bench_overhead", "bench_setup", "bench_freeze"):
        path = ROOT / "scripts" / name
        assert os.access(path, os.X_OK), name
        assert path.read_text().startswith("#!"), name


def test_bench_overhead_quick(tmp_path):
    out = tmp_path / "overhead.json"
    proc = run_script("bench_overhead", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in ("configuration", "baseline ns/call", "uprobe-opt optimized, count",
                 "uprobe-opt optimized, record", "raw ptrace round trip", "ratios",
                 "goals"):
        assert text in proc.stdout, text
    doc = json.loads(out.read_text())
    for key in ("machine", "rounds", "results", "ratios", "goals", "unavailable",
                "definitions"):
        assert key in doc, key
    assert doc["quick"] is True and doc["rounds"] == 1
    for cfg in ("baseline", "opt-count", "opt-python", "int3-python", "ptrace-raw"):
        res = doc["results"][f"{cfg}@1"]
        assert res["samples"], cfg
        assert set(res) >= {"config", "threads", "samples", "ns_per_hit", "ns_per_call"}
    for nt in (1, 4):
        assert doc["results"][f"baseline@{nt}"]["ns_per_call"]["median"] > 0
        count = doc["results"][f"opt-count@{nt}"]
        assert not count["errors"], count["errors"]
        assert all(s["hits"] == s["n"] * nt and s["state"] == "optimized"
                   for s in count["samples"])
    # every optional configuration either ran or says why it could not
    for cfg in ("kernel", "gdb", "opt-record"):
        assert f"{cfg}@1" in doc["results"] or cfg in doc["unavailable"], cfg
    # the two reference detours count exactly too; ours / reference is printed
    for cfg in ("ref-lockinc", "ref-rseq"):
        if cfg in doc["unavailable"]:
            continue
        for nt in (1, 4):
            res = doc["results"][f"{cfg}@{nt}"]
            assert not res["errors"] and all(s["hits"] == s["n"] * nt for s in res["samples"])
        assert f"opt-count/{cfg}@1" in doc["ratios"], cfg
    assert doc["machine"]["cpu_model"] and "CPU: " in proc.stdout


def test_bench_setup_quick(tmp_path):
    out = tmp_path / "setup.json"
    proc = run_script("bench_setup", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in ("mode", "to-optimized s", "max pause ms", "goals"):
        assert text in proc.stdout, text
    doc = json.loads(out.read_text())
    for key in ("machine", "rounds", "probes", "threads", "modes", "results", "goals"):
        assert key in doc, key
    assert {(e["mode"], e["threads"], e["probes"]) for e in doc["results"]} >= {
        ("live", 1, 1), ("live", 4, 10), ("held", 4, 10)}
    for e in doc["results"]:
        assert set(e) >= {"to_optimized_s", "max_pause_s", "arm_s", "optimize_s",
                          "samples", "errors", "all_optimized"}
        for s in e["samples"]:
            if "error" not in s:
                assert s["optimized"] + len(s["not_optimized"]) >= min(s["probes"], 1)


def test_bench_freeze_quick(tmp_path):
    """Smallest configuration (1 probe, 1 thread, uprobe-opt and kernel uprobes):
    structure, and signal counts that add up exactly; no timing."""
    out = tmp_path / "freeze.json"
    proc = run_script("bench_freeze", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in ("tool", "live ms", "attach ms", "tracing ms", "detach ms", "lost",
                 "goals (uprobe-opt):"):
        assert text in proc.stdout, text
    doc = json.loads(out.read_text())
    for key in ("machine", "quick", "results", "goals", "unavailable", "trace_s"):
        assert key in doc, key
    rows = {r["tool"]: r for r in doc["results"]}
    assert set(rows) | set(doc["unavailable"]) >= {"uprobe-opt", "kernel"}
    for tool, r in rows.items():
        assert "error" not in r, (tool, r.get("error"))
        assert (r["probes"], r["threads"]) == (1, 1)
        for phase in ("before", "attach", "tracing", "detach", "after"):
            assert r[f"{phase}_longest_ms"] >= 0 and r[f"{phase}_total_ms"] >= 0
        assert r["restored"] is True, tool          # every byte original again
        assert r["signals_sent"] > 0
        assert r["signals_sent"] == r["signals_received"] + r["signals_lost"]
        assert 0 <= r["signals_received"] <= r["signals_sent"]
    # (How many are lost is timing: two SIGUSR1 pending merge into one whenever the
    # process cannot run for 20 ms, which a loaded machine does too.)
    assert {g["goal"].split(" (")[0] for g in doc["goals"]} >= {
        "attach freeze <= 1 ms", "detach freeze <= 1 ms", "0 signals lost",
        "launch-to-live <= 300 ms"}
    assert all(isinstance(g["met"], bool) for g in doc["goals"])
