"""Shared helpers for the tests (real processes, no mocks)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPROBE_OPT = [sys.executable, "-m", "uprobe_opt.cli"]
# The installed command (bin/uprobe-opt): Python starts with the stop signals blocked,
# so a signal during the interpreter's own start-up ends it quietly too.
UPROBE_OPT_COMMAND = [os.path.join(os.path.dirname(sys.executable), "uprobe-opt")]


def exec_mappings(pid: int) -> dict[tuple, str]:
    """sha256 of every executable mapping of pid, keyed by (start, end, path)."""
    out = {}
    with open(f"/proc/{pid}/maps") as f:
        lines = f.read().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in lines:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5] if len(parts) > 5 else ""
            if "x" not in parts[1] or path in ("[vsyscall]", "[uprobes]"):
                # [uprobes]: the kernel's own XOL page (kernel uprobes), not readable
                continue
            mem.seek(lo)
            out[(lo, hi, path)] = hashlib.sha256(mem.read(hi - lo)).hexdigest()
    return out


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def tracer_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def reached(pid: int) -> bool:
    """uprobe-opt has reached process ``pid``: it traces it now, or mapped its areas
    there (a trace of a running process is traced only while it patches: TracerPid
    alone can be 0 again before a poll sees it)."""
    if tracer_pid(pid) != 0:
        return True
    with open(f"/proc/{pid}/maps") as f:
        return "memfd:uprobe-opt" in f.read()


def run_cli(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(UPROBE_OPT + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, **kw)


def wait_for_line(stream, prefix: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise AssertionError(f"stream closed before {prefix!r}")
        if isinstance(line, bytes):
            line = line.decode()
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r} within {timeout} s")


def symbol_addr(pid: int, spec: str) -> int:
    from uprobe_opt.symbols import SymbolResolver
    return SymbolResolver(pid=pid).resolve(spec).addr


def text_vs_file(pid: int, path: str) -> list[str]:
    """Executable mappings of ``path`` in pid whose bytes differ from the file."""
    bad = []
    data = Path(path).read_bytes()
    real = os.path.realpath(path)
    with open(f"/proc/{pid}/maps") as f:
        lines = f.read().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or "x" not in parts[1] or os.path.realpath(parts[5]) != real:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            off = int(parts[2], 16)
            mem.seek(lo)
            live = mem.read(hi - lo)
            want = data[off:off + hi - lo]
            if live[:len(want)] != want:
                bad.append(line)
    assert lines, pid
    return bad


def kernel_uprobes_unavailable() -> str | None:
    """Why kernel uprobes through perf (uprobe_opt.target.perf) cannot be used here, or
    None: the uprobe PMU, else tracefs uprobe_events (mounted on demand)."""
    from uprobe_opt.target import perf
    reason = perf.unavailable_reason()
    if reason is None and perf.tracefs_unavailable() is not None:
        import kuprobe
        try:
            kuprobe.tracefs()
        except kuprobe.Unavailable as e:
            reason = str(e)
    return reason
