"""Pending probes: a spec naming a library not loaded yet is armed when the dynamic
linker maps it (r_brk), gone and pending again after dlclose; nothing is ever written
into another library mapped at the same address."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from helpers import exec_mappings, run_cli, text_vs_file, tracer_pid
from uprobe_opt.session import Tracer
from uprobe_opt.testing import build_target

SPEC = "libhandsoff_liba:lib_fn"


def lib_fn_a(x):
    return x * 3 + (x >> 2) + 1


@pytest.fixture(scope="module")
def libs():
    return (str(build_target("dlpend")), str(build_target("handsoff_liba", shared=True)),
            str(build_target("handsoff_libb", shared=True)))


class Prog:
    """dlpend driven line by line while a Tracer handles its events."""

    def __init__(self, exe, liba, libb):
        self.p = subprocess.Popen([exe, liba, libb], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        self.buf = b""
        self.tracer = None
        assert self.line().startswith("dlpend: ready")

    def line(self, timeout=30.0) -> str:
        deadline = time.monotonic() + timeout
        os.set_blocking(self.p.stdout.fileno(), False)
        while b"\n" not in self.buf:
            assert time.monotonic() < deadline, self.buf
            if self.tracer is not None:
                self.tracer.run(duration=0.01)
            else:
                time.sleep(0.005)
            try:
                self.buf += os.read(self.p.stdout.fileno(), 4096)
            except BlockingIOError:
                pass
        out, self.buf = self.buf.split(b"\n", 1)
        return out.decode()

    def cmd(self, text: str) -> str:
        self.p.stdin.write(text.encode() + b"\n")
        self.p.stdin.flush()
        return self.line()

    def finish(self) -> int:
        self.tracer = None
        self.p.stdin.close()
        assert self.line() == "dlpend: done"
        return self.p.wait(timeout=30)


def test_dlopen_after_the_probe_was_given_counts_from_the_load(libs):
    exe, liba, libb = libs
    prog = Prog(exe, liba, libb)
    with Tracer.attach(prog.pid if hasattr(prog, "pid") else prog.p.pid) as t:
        prog.tracer = t
        pp = t.add_probe(SPEC, handler="count")
        assert pp.state.value == "pending" and "not loaded" in pp.reason
        assert [r["state"] for r in t.summary()] == ["pending"]
        assert "r_brk" in t.manager.tracer_reason()
        assert prog.cmd("open a").startswith("opened a")
        assert pp.state.value in ("int3", "optimized") and len(pp.incarnations) == 1
        assert prog.cmd("call 1000") == f"called 1000 sum={sum(map(lib_fn_a, range(1000)))}"
        assert pp.nhit == 1000
        rows = t.summary()
        assert [r["probe"] for r in rows] == [SPEC] and rows[0]["hits"] == 1000
    assert prog.finish() == 0


def test_dlclose_then_another_library_at_the_same_address(libs):
    exe, liba, libb = libs
    prog = Prog(exe, liba, libb)
    pid = prog.p.pid
    t = Tracer.attach(pid)
    prog.tracer = t
    try:
        pp = t.add_probe(SPEC, handler="count")
        base_a = prog.cmd("open a").split("base=")[1]
        assert prog.cmd("call 300").startswith("called 300")
        assert prog.cmd("close") == "closed"
        first = pp.incarnations[0]
        assert first.state.value == "gone" and "library unloaded" in first.reason
        assert pp.state.value == "pending" and "unloaded" in pp.reason
        base_b = prog.cmd("open b").split("base=")[1]
        if base_b != base_a:
            pytest.skip(f"library B was mapped at {base_b}, not where A was ({base_a})")
        assert text_vs_file(pid, libb) == []          # not a byte written into B
        assert prog.cmd("call 200").startswith("called 200")
        assert pp.state.value == "pending" and pp.nhit == 300
        assert prog.cmd("close") == "closed"
        assert prog.cmd("open a").startswith("opened a")   # armed again
        assert prog.cmd("call 500").startswith("called 500")
        assert len(pp.incarnations) == 2 and pp.nhit == 800
        states = [(r["probe"], r["state"]) for r in t.summary()]
        assert states == [(SPEC, "gone"), (SPEC, pp.state.value)]
    finally:
        t.detach()
    assert tracer_pid(pid) == 0
    assert text_vs_file(pid, liba) == []
    assert prog.finish() == 0


def test_cli_pending_spec_in_spawn_mode(libs):
    exe, liba, libb = libs
    r = run_cli("trace", SPEC, "--handler", "count", "--", exe, liba, libb,
                input="open a\ncall 250\nclose\n")
    assert r.returncode == 0, r.stderr
    assert "called 250" in r.stdout
    table = [line for line in r.stderr.splitlines() if line.startswith(SPEC)]
    assert len(table) == 2 and "gone" in table[0] and " 250 " in table[0]
    assert "pending" in table[1] and "unloaded" in table[1]
