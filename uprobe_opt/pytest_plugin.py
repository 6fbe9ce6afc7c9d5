"""pytest plugin (entry point ``pytest11``): fixtures that build C targets and trace them.

Any test suite with uprobe-opt installed gets these fixtures::

    def test_counts(c_target, traced):
        exe = c_target("loop")                    # targets/loop.c, or any .c path
        run = traced([exe, "1000"])               # spawned, held at its entry point
        probe = run.add_probe("work", handler="count")
        result = run.finish()                     # runs to exit, detaches
        assert probe.nhit == 1000
        assert result.stdout == plain_output      # see `run_plain`

Fixtures:

* ``c_target(name_or_path, flags=(), shared=False, libs=())`` -> Path: compile with gcc/g++,
  cached by source hash and flags (``uprobe_opt.testing.build_c``).  A bare name means
  ``targets/NAME.c`` of this repository.
* ``traced(argv, optimize=True, stdin=None)`` -> :class:`TracedRun`: the program spawned under
  trace, stopped at its entry point; stdout/stderr captured.  Killed at teardown if
  still running.
* ``run_plain(argv, timeout=60)`` -> :class:`Result`: the same program without any tracer,
  for output comparison.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Result:
    stdout: str
    stderr: str
    exit_code: int | None      # os.waitstatus_to_exitcode semantics (-N: killed by N)
    summary: list | None = None


class TracedRun:
    """A spawned program under a :class:`~uprobe_opt.session.Tracer`."""

    def __init__(self, argv, *, optimize: bool = True, stdin=None, env=None,
                 hands_off: bool = True):
        from uprobe_opt.session import Tracer
        self.argv = [str(a) for a in argv]
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        self._null = None
        if stdin == subprocess.DEVNULL:
            self._null = open(os.devnull, "rb")
            stdin = self._null.fileno()
        self.tracer = Tracer.spawn(self.argv, stdin=stdin, stdout=self._out.fileno(),
                                   stderr=self._err.fileno(), env=env, optimize=optimize,
                                   hands_off=hands_off)
        self.result: Result | None = None

    @property
    def pid(self) -> int:
        return self.tracer.pid

    def add_probe(self, spec, pre_handler=None, **kw):
        return self.tracer.add_probe(spec, pre_handler, **kw)

    def run(self, duration=None, until=None) -> None:
        self.tracer.run(duration=duration, until=until)

    def finish(self, timeout: float = 120.0) -> Result:
        """Run until the program exits (killing it after ``timeout`` seconds, which
        fails the test), detach, and return its output, exit code and our summary."""
        t = self.tracer
        t.run(duration=timeout)
        if not t.exited:
            t.kill()
            pytest.fail(f"{self.argv} did not exit within {timeout} s")
        t.detach()
        self.result = Result(self._read(self._out), self._read(self._err), t.exit_code,
                             t.summary())
        return self.result

    @staticmethod
    def _read(f) -> str:
        f.seek(0)
        return f.read().decode(errors="replace")

    def close(self) -> None:
        t = self.tracer
        if not t.exited:
            try:
                t.kill()
            except Exception:
                pass
        self._out.close()
        self._err.close()
        if self._null is not None:
            self._null.close()


@pytest.fixture
def c_target():
    from uprobe_opt.testing import build_c, build_target

    def build(name_or_path, **kw) -> Path:
        p = Path(str(name_or_path))
        if p.suffix or os.sep in str(name_or_path):
            return build_c(p, **kw)
        return build_target(str(name_or_path), **kw)
    return build


@pytest.fixture
def traced():
    runs: list[TracedRun] = []

    def spawn(argv, **kw) -> TracedRun:
        run = TracedRun(argv, **kw)
        runs.append(run)
        return run
    yield spawn
    for run in runs:
        run.close()


@pytest.fixture
def run_plain():
    def run(argv, timeout: float = 60.0, stdin=None) -> Result:
        p = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout,
                           stdin=stdin)
        return Result(p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"),
                      p.returncode)
    return run
