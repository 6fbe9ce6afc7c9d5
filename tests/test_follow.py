"""Process trees: -f/--follow-forks (strace -f) and --follow-exec, on targets/forktree.c
(3 children calling ``counted`` K times each, a grandchild G times, the first process
P times) and targets/forker.c (exec'd by forktree).  Every count is exact and per pid."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from helpers import UPROBE_OPT, ROOT, run_cli, text_vs_file, wait_for_line
from uprobe_opt.follow import ProcessTree
from uprobe_opt.session import Tracer

P, KS, G = 7, (100, 200, 300), 50
FORKER_K = 40


def _calls(stdout: str) -> dict[int, int]:
    """pid -> calls of counted(), from forktree's own lines."""
    out = {int(m[1]): int(m[2]) for m in
           re.finditer(r"(?:child \d|grandchild) pid=(\d+) calls=(\d+)", stdout)}
    m = re.search(r"forktree: pid=(\d+) calls=(\d+)", stdout)
    out[int(m[1])] = int(m[2])
    return out


def _summary(path) -> dict:
    events = [json.loads(line) for line in open(path)]
    return next(e for e in events if e["event"] == "summary")


def _same_output(traced: str, plain: str) -> bool:
    """The program's lines, pids aside (the children's lines come in any order)."""
    def norm(text):
        return sorted(re.sub(r"pid=\d+", "pid=N", text).splitlines())
    return norm(traced) == norm(plain)


def _rows(summary) -> dict[tuple[int, str], list[dict]]:
    rows: dict = {}
    for r in summary["probes"]:
        rows.setdefault((r["pid"], r["probe"]), []).append(r)
    return rows


@pytest.fixture(scope="module")
def forktree():
    from uprobe_opt.testing import build_target
    return str(build_target("forktree"))


@pytest.fixture(scope="module")
def forker():
    from uprobe_opt.testing import build_target
    return str(build_target("forker"))


# --------------------------------------------------------------------------- -f
@pytest.mark.parametrize("optimize", [True, False], ids=["optimized", "int3"])
def test_follow_forks_counts_per_pid(forktree, run_plain, tmp_path, optimize):
    """-f, spawn mode: 3 children and a grandchild, each with its own exact count
    (the first process's P too: the children's hits never reach its counters),
    tree_only counted once in the first process only; the program's output as
    without us."""
    argv = [forktree, P, *KS, G]
    out = tmp_path / "out.json"
    res = run_cli("trace", "-f", "counted", "tree_only", "--handler", "count", "--json",
                  "-o", out, *([] if optimize else ["--no-optimize"]), "--", *argv)
    assert res.returncode == 0, res.stderr
    assert _same_output(res.stdout, run_plain(argv).stdout), res.stdout
    calls = _calls(res.stdout)
    assert sorted(calls.values()) == sorted([P, *KS, G])
    summary = _summary(out)
    rows = _rows(summary)
    root = summary["processes"][0]["pid"]
    assert {pid for pid, _ in rows} == set(calls)
    state = "optimized" if optimize else "int3"
    for pid, k in calls.items():
        [row] = rows[(pid, "counted")]
        assert (row["hits"], row["state"], row["nmissed"]) == (k, state, 0), row
        [row] = rows[(pid, "tree_only")]
        assert row["hits"] == (1 if pid == root else 0), row
    assert summary["mode"] == "attached"
    assert summary["mode_reason"] == "following forks (-f) needs the tracer"
    ends = {p["pid"]: (p["parent"], p["end"]) for p in summary["processes"]}
    child_pids = {int(m[1]): int(m[2]) for m in
                  re.finditer(r"child (\d) pid=(\d+)", res.stdout)}
    kids = {i: pid for pid, i in ((int(m[2]), int(m[1])) for m in
                                  re.finditer(r"child (\d) pid=(\d+)", res.stdout))}
    assert len(child_pids) == 3
    for i, pid in kids.items():
        assert ends[pid] == (root, f"exited with status {10 + i}")
    grand = next(pid for pid, k in calls.items() if k == G)
    assert ends[grand] == (kids[2], "exited with status 20")
    assert summary["end"]["reason"] == "exited" and summary["end"]["status"] == 0


def test_follow_forks_text_summary_has_a_pid_column(forktree, tmp_path):
    res = run_cli("trace", "-f", "counted", "--handler", "count", "-o", tmp_path / "o",
                  "--", forktree, 1, 2, 3, 4)
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "o").read_text()
    head = next(line for line in text.splitlines() if "PROBE" in line)
    assert head.split()[:2] == ["PID", "PROBE"]
    calls = _calls(res.stdout)
    for pid, k in calls.items():
        assert re.search(rf"^\s*{pid}\s+counted\s+0x[0-9a-f]+\s+optimized\s+{k}\s+0$",
                         text, re.M), text
    assert "(forked by" in text


def test_children_count_in_pages_and_ring_of_their_own(forktree):
    """The hazard -f must get right: a forked child inherits its parent's detour
    areas, whose data pages (counters) and record ring are MAP_SHARED memfds, the
    same pages as the parent's.  Each followed process gets its own: records of a
    process carry only its own tid, with the arguments of its own calls, and no two
    processes share a data page or ring (memfd inode)."""
    r, w = os.pipe()
    try:
        t = Tracer.spawn([forktree, *map(str, (P, *KS, G))], stdout=w, kernel_uprobes=False,
                         hands_off=False)
    finally:
        os.close(w)
    tree = ProcessTree(t)
    try:
        t.add_probes(["counted"], handler="record", nargs=1)
        tree.run()
    finally:
        tree.detach()
    with os.fdopen(r) as f:
        calls = _calls(f.read())
    assert sorted(tr.pid for tr in tree.tracers) == sorted(calls)
    inodes = []
    for tr in tree.tracers:
        recs = tr.records()
        assert set(recs["tid"].tolist()) == {tr.pid}
        assert sorted(recs["args"][:, 0].tolist()) == list(range(calls[tr.pid]))
        [probe] = tr.probes
        assert probe.nhit == calls[tr.pid] and probe.state.value == "optimized"
        inodes += [a.data_inode for a in tr.manager.pool.areas]
        inodes.append(tr.manager.records.ring.inode)
    assert len(inodes) == len(set(inodes))


def test_without_follow_children_get_the_original_bytes(forktree, run_plain, tmp_path):
    """No -f: as before, every child runs untraced with the original bytes and exits
    as it would; the one process traced counts its own P calls (its children's hits
    land nowhere)."""
    for extra in ([], ["--no-optimize"]):
        out = tmp_path / "out.json"
        res = run_cli("trace", "counted", "--handler", "count", "--json", "-o", out,
                      *extra, "--", forktree, P, *KS, G)
        assert res.returncode == 0, res.stderr
        assert "exits=10,11,12" in res.stdout
        assert _same_output(res.stdout, run_plain([forktree, P, *KS, G]).stdout)
        summary = _summary(out)
        [row] = summary["probes"]
        assert row["hits"] == P and "pid" not in row
        assert "processes" not in summary


def test_follow_forks_attach_mode(forktree, tmp_path):
    """-f on a running process (-p): its children from then on are followed."""
    proc = subprocess.Popen([forktree, "-w", *map(str, (P, *KS, G))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    cli = None
    try:
        wait_for_line(proc.stdout, "forktree: ready")
        out = tmp_path / "out.json"
        cli = subprocess.Popen(UPROBE_OPT + ["trace", "-p", str(proc.pid), "-f",
                                             "counted", "--handler", "count", "--json",
                                             "-o", str(out)],
                               cwd=ROOT, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not text_vs_file(proc.pid, forktree):     # our bytes are in: armed
            assert cli.poll() is None, cli.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.stdin.write("go\n")
        proc.stdin.close()
        stdout = proc.stdout.read()
        assert proc.wait(60) == 0
        assert cli.wait(60) == 0, cli.stderr.read()
    finally:
        for p in (proc, cli):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    calls = _calls(stdout)
    rows = _rows(_summary(out))
    assert {pid: rows[(pid, "counted")][0]["hits"] for pid in calls} == calls


# --------------------------------------------------------------------------- exec
@pytest.mark.parametrize("optimize", [True, False], ids=["optimized", "int3"])
def test_follow_exec_into_another_target(forktree, forker, tmp_path, optimize):
    """-f --follow-exec: forktree execs forker after its P calls; the specs are
    resolved again in forker (counted: its 2 calls; tree_only: not there, a gone row
    with the reason), forker's own child is followed (its K calls)."""
    out = tmp_path / "out.json"
    res = run_cli("trace", "-f", "--follow-exec", "counted", "tree_only", "--handler",
                  "count", "--json", "-o", out, *([] if optimize else ["--no-optimize"]),
                  "--", forktree, P, *KS, 0, forker, FORKER_K)
    assert res.returncode == 0, res.stderr
    assert "forker: child exit=7 parent calls=2" in res.stdout
    summary = _summary(out)
    rows = _rows(summary)
    root = summary["processes"][0]["pid"]
    state = "optimized" if optimize else "int3"
    before, after = rows[(root, "counted")]
    assert (before["state"], before["hits"]) == ("gone", P)
    assert before["reason"] == "target exec'd a new program"
    assert (after["state"], after["hits"]) == (state, 2)
    old, missing = rows[(root, "tree_only")]
    assert (old["state"], old["hits"]) == ("gone", 1)
    assert missing["state"] == "gone" and missing["address"] == "-"
    assert missing["reason"].startswith("not in this program: unknown symbol 'tree_only'")
    calls = _calls(res.stdout)
    forked_by_forker = set(p for p, _ in rows) - set(calls)
    [grand] = forked_by_forker
    [row] = rows[(grand, "counted")]
    assert (row["hits"], row["state"]) == (FORKER_K, state)
    for pid in calls:
        if pid != root:
            assert rows[(pid, "counted")][0]["hits"] == calls[pid]
    assert summary["end"]["reason"] == "exited" and summary["end"]["status"] == 0


def test_follow_exec_alone_and_exec_without_it(forktree, forker, tmp_path):
    """--follow-exec without -f follows the one process into forker (no child rows);
    without --follow-exec an exec ends the trace as before, probes gone."""
    out = tmp_path / "out.json"
    argv = [forktree, P, *KS, 0, forker, FORKER_K]
    res = run_cli("trace", "--follow-exec", "counted", "--handler", "count", "--json",
                  "-o", out, "--", *argv)
    assert res.returncode == 0, res.stderr
    summary = _summary(out)
    assert [(r["state"], r["hits"]) for r in summary["probes"]] == [
        ("gone", P), ("optimized", 2)]
    assert {r["pid"] for r in summary["probes"]} == {summary["processes"][0]["pid"]}
    res = run_cli("trace", "counted", "--handler", "count", "--json", "-o", out, "--",
                  *argv)
    assert res.returncode == 0, res.stderr
    assert "forker: child exit=7 parent calls=2" in res.stdout
    summary = _summary(out)
    assert summary["end"]["reason"] == "exec"
    assert [(r["state"], r["hits"]) for r in summary["probes"]] == [("gone", P)]


def test_follow_a_vfork_child_into_its_program(forktree, forker, tmp_path):
    """posix_spawn (a CLONE_VM|CLONE_VFORK child that execs at once), -f
    --follow-exec: the child is a process of its own from its new program on
    (forker: 2 calls), forker's own child is followed (40), the spawner counts its
    own 3.  With -f alone the exec'd child is let go: one row."""
    from uprobe_opt.testing import build_target
    spawner = str(build_target("spawner"))
    out = tmp_path / "out.json"
    res = run_cli("trace", "-f", "--follow-exec", "counted", "--handler", "count",
                  "--json", "-o", out, "--", spawner, 3, forker, FORKER_K)
    assert res.returncode == 0, res.stderr
    m = re.search(r"spawner: pid=(\d+) calls=3 child=(\d+) exit=0", res.stdout)
    assert m, res.stdout
    root, child = int(m[1]), int(m[2])
    summary = _summary(out)
    hits = {r["pid"]: r["hits"] for r in summary["probes"]}
    procs = {p["pid"]: p["parent"] for p in summary["processes"]}
    [grand] = set(hits) - {root, child}
    assert hits == {root: 3, child: 2, grand: FORKER_K}
    assert procs == {root: None, child: root, grand: child}
    res = run_cli("trace", "-f", "counted", "--handler", "count", "--json", "-o", out,
                  "--", spawner, 3, forker, FORKER_K)
    assert res.returncode == 0, res.stderr
    assert [(r["hits"], r["state"]) for r in _summary(out)["probes"]] == [(3, "optimized")]
