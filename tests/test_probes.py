"""Foundation: int3 probes with Python handlers on real processes (exact values)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import exec_mappings, proc_state, run_cli, symbol_addr, tracer_pid, wait_for_line
from uprobe_opt import SymbolError, Tracer
from uprobe_opt.core.probe import ProbeState

pytestmark = pytest.mark.timeout(180)


def test_single_thread_exact_hits_int3(c_target, traced, run_plain):
    exe = c_target("loop")
    run = traced([exe, "1000"], optimize=False)
    seen = []
    probe = run.add_probe("work", lambda p, r: seen.append(r.rdi))
    res = run.finish()
    assert probe.nhit == 1000
    assert seen == list(range(1000))
    assert probe.state is ProbeState.INT3
    assert res.stdout == run_plain([exe, "1000"]).stdout
    assert res.exit_code == 0
    assert res.summary == [{"probe": "work", "address": hex(probe.addr), "state": "int3",
                            "hits": 1000, "nmissed": 0, "reason": None, "served_by": "tracer"}]


def test_16_threads_160000_hits_on_one_int3_probe(c_target, traced, run_plain):
    exe = c_target("threads")
    run = traced([exe, "16", "10000"], optimize=False)
    tids = set()
    probe = run.add_probe("hit", lambda p, r: tids.add(r.tid))
    res = run.finish(timeout=170)
    assert probe.nhit == 160_000
    assert len(tids) == 16
    assert res.stdout == run_plain([exe, "16", "10000"]).stdout


def test_handler_changes_argument_register(c_target, traced, run_plain):
    exe = c_target("args")
    plain = run_plain([exe]).stdout
    assert plain.splitlines()[0] == "scale(1)=3"

    def add_100(probe, regs):
        regs.rdi = regs.rdi + 100

    run = traced([exe], optimize=False)
    run.add_probe("scale", add_100)
    res = run.finish()
    assert res.stdout.splitlines() == [f"scale({v})={(v + 100) * 3}" for v in range(1, 11)]

    run = traced([exe], optimize=False)
    probe = run.add_probe("scale", lambda p, r: None)
    assert run.finish().stdout == plain
    assert probe.nhit == 10


def test_handler_reads_and_writes_memory(c_target, traced):
    exe = c_target("args")
    run = traced([exe], optimize=False)
    stack_words = []

    def peek(probe, regs):
        # the return address sits at [rsp] at function entry
        stack_words.append(int.from_bytes(regs.read(regs.rsp, 8), "little"))
    run.add_probe("scale", peek)
    res = run.finish()
    assert len(stack_words) == 10 and len(set(stack_words)) == 1
    assert res.exit_code == 0


def test_probe_in_shared_library(c_target, traced, run_plain):
    lib = c_target("libdemo", shared=True)
    exe = c_target("uselib", libs=[lib])
    run = traced([exe, "500"], optimize=False)
    probe = run.add_probe("libdemo:lib_add", lambda p, r: None)
    res = run.finish()
    assert probe.nhit == 500
    assert res.stdout == run_plain([exe, "500"]).stdout


def test_probe_by_sym_plus_offset_and_absolute_address(c_target, traced):
    exe = c_target("loop")
    run = traced([exe, "300"], optimize=False)
    by_off = run.add_probe("work+0x3", lambda p, r: None)     # movsxd is 3 bytes
    addr = by_off.addr - 3
    by_abs = run.add_probe(hex(addr), lambda p, r: None)
    assert by_abs.addr == symbol_addr(run.pid, "work")
    run.finish()
    assert by_off.nhit == 300
    assert by_abs.nhit == 300


def test_aggregated_probes_enable_disable_reregister(c_target, traced):
    exe = c_target("sleeper")
    run = traced([exe, "0", "1"], optimize=False, stdin=subprocess.DEVNULL)
    a = run.add_probe("tick", lambda p, r: None)
    b = run.add_probe("tick", lambda p, r: None)
    assert a.site is b.site
    run.run(duration=0.3)
    assert a.nhit == b.nhit > 0
    run.tracer.disable(b)
    frozen = b.nhit
    run.run(duration=0.3)
    assert b.nhit == frozen and b.state is ProbeState.DISABLED
    assert a.nhit > frozen
    run.tracer.remove_probe(a)
    run.tracer.remove_probe(b)
    orig = run.tracer.target.read(a.site.addr, 1)
    assert orig != b"\xcc"
    c = run.add_probe("tick", lambda p, r: None)
    run.run(duration=0.3)
    assert c.nhit > 0
    run.tracer.kill()


def test_detach_restores_code_and_target_keeps_running(c_target):
    exe = c_target("sleeper")
    proc = subprocess.Popen([str(exe), "0", "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        wait_for_line(proc.stdout, "sleeper: ready")
        before = exec_mappings(proc.pid)
        with Tracer.attach(proc.pid, optimize=False) as t:
            p = t.add_probe("tick", lambda p, r: None)
            t.run(duration=0.5)
            assert p.nhit > 10
        assert tracer_pid(proc.pid) == 0
        assert exec_mappings(proc.pid) == before
        line = wait_for_line(proc.stdout, "sleeper: tick")       # still making progress
        assert proc_state(proc.pid) in "RS"
        proc.stdin.write("hello\n")
        proc.stdin.close()
        assert wait_for_line(proc.stdout, "reader:").strip() == "reader: 6 bytes"
    finally:
        proc.kill()
        proc.wait()


def test_targets_own_sigtrap_is_delivered(c_target, traced, run_plain):
    exe = c_target("sigtrap")
    run = traced([exe, "10"], optimize=False)
    probe = run.add_probe("probed", lambda p, r: None)
    res = run.finish()
    assert probe.nhit == 10
    assert res.stdout == run_plain([exe, "10"]).stdout
    assert "handled 10" in res.stdout


def test_fork_child_survives_inherited_int3(c_target, traced, run_plain):
    exe = c_target("forker")
    run = traced([exe, "100"], optimize=False)
    probe = run.add_probe("counted", lambda p, r: None)
    res = run.finish()
    assert probe.nhit == 2
    assert res.stdout == run_plain([exe, "100"]).stdout
    assert "child exit=7" in res.stdout


# -- bad input: exit 2, one clear line, target bytes unchanged -------------------------

@pytest.fixture
def sleeper(c_target):
    exe = c_target("sleeper")
    proc = subprocess.Popen([str(exe), "0", "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    wait_for_line(proc.stdout, "sleeper: ready")
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("probe, message", [
    ("no_such_function", "unknown symbol 'no_such_function'"),
    ("tick+0x1", "is inside"),
    ("nosuchlib:malloc", "nosuchlib"),
])
def test_bad_probe_exit_2_and_bytes_unchanged(sleeper, probe, message):
    before = exec_mappings(sleeper.pid)
    res = run_cli("trace", "-p", sleeper.pid, probe, "--duration", "1")
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr
    assert exec_mappings(sleeper.pid) == before
    assert tracer_pid(sleeper.pid) == 0


def test_non_executable_address_exit_2(sleeper):
    with open(f"/proc/{sleeper.pid}/maps") as f:
        rw = next(l for l in f if l.split()[1].startswith("rw"))
    addr = int(rw.split("-")[0], 16)
    before = exec_mappings(sleeper.pid)
    res = run_cli("trace", "-p", sleeper.pid, hex(addr), "--duration", "1")
    assert res.returncode == 2
    assert "not executable" in res.stderr
    assert exec_mappings(sleeper.pid) == before


def test_unknown_pid_exit_2():
    res = run_cli("trace", "-p", "999999999", "malloc", "--duration", "1")
    assert res.returncode == 2
    assert "999999999" in res.stderr and "Traceback" not in res.stderr


# -- command line ------------------------------------------------------------------------

def test_cli_spawn_json_summary_and_exit_status(c_target, tmp_path, run_plain):
    exe = c_target("loop")
    out = tmp_path / "trace.jsonl"
    res = run_cli("trace", "work", "--handler", "count", "--no-optimize", "--json",
                  "-o", out, "--", exe, "250")
    assert res.returncode == 0, res.stderr
    assert res.stdout == run_plain([exe, "250"]).stdout       # stdout is the program's
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    summary = lines[-1]
    assert summary["event"] == "summary"
    [row] = summary["probes"]
    assert row == {"probe": "work", "address": row["address"], "state": "int3",
                   "hits": 250, "nmissed": 0, "reason": None, "served_by": "tracer"}


def test_cli_print_lines_and_child_exit_code(c_target, tmp_path):
    src = tmp_path / "exit3.c"
    src.write_text('__attribute__((noipa)) int f(int x){return x+1;}\n'
                   'int main(){int s=0; for(int i=0;i<3;i++) s+=f(i); return s;}\n')
    exe = c_target(src)
    res = run_cli("trace", "f", "--no-optimize", "--", exe)
    assert res.returncode == 6                                  # 1+2+3
    assert res.stdout == ""                      # spawn mode: our lines go to stderr
    hits = [l for l in res.stderr.splitlines() if l.split()[2:3] == ["f"]]
    assert [int(l.split()[3], 16) for l in hits] == [0, 1, 2]


def test_real_python3_getpid_count(tmp_path):
    script = ("import os, sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
              "s = 0\nfor i in range(2000):\n    s += os.getpid() > 0\nprint('done', s, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        wait_for_line(proc.stdout, "ready")
        with Tracer.attach(proc.pid, optimize=False) as t:
            p = t.add_probe("libc:getpid", lambda p, r: None)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            # (never proc.poll() while attached: our waitpid owns its stops)
            t.run(until=lambda: p.nhit >= 2000, duration=60)
            t.run(duration=0.3)
            hits = p.nhit
        assert proc.stdout.readline() == "done 2000\n"
        assert hits >= 2000
    finally:
        proc.kill()
        proc.wait()


def test_cli_spawn_duration_waits_for_the_program_and_returns_its_status(c_target, tmp_path):
    """Tracing ends before the program: we detach, it runs on untraced to its end, and
    our exit status is still the program's."""
    src = tmp_path / "slow.c"
    src.write_text('#include <stdio.h>\n#include <unistd.h>\n'
                   '__attribute__((noipa)) int f(int x){return x+1;}\n'
                   'int main(){int s=0; for(int i=0;i<30;i++){s+=f(i); usleep(20000);}\n'
                   'printf("s=%d\\n", s); return 9;}\n')
    exe = c_target(src)
    res = run_cli("trace", "f", "--handler", "count", "--duration", "0.2", "-o",
                  tmp_path / "log", "--", exe)
    assert res.returncode == 9
    assert res.stdout == "s=465\n"
    row = (tmp_path / "log").read_text().splitlines()[1].split()
    assert row[0] == "f" and row[2] == "int3" and 0 < int(row[3]) < 30   # summary printed


@pytest.mark.parametrize("args, message", [
    (["--duration", "nan"], "--duration must be a positive number"),
    (["--buffer-size", "100G"], "too large"),
    (["-o", "/nonexistent/dir/f"], "No such file or directory"),
    (["--args", "9"], "--args must be 0..6"),
])
def test_cli_bad_options_exit_2(sleeper, args, message):
    before = exec_mappings(sleeper.pid)
    res = run_cli("trace", "-p", sleeper.pid, "tick", *args)
    assert res.returncode == 2 and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert exec_mappings(sleeper.pid) == before


def test_kernel_thread_pid_exit_2():
    res = run_cli("trace", "-p", "2", "work", "--duration", "1")
    assert res.returncode == 2 and "kernel thread" in res.stderr
