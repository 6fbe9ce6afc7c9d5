"""USDT markers (.note.stapsdt): specs, semaphores, arguments, listing.

Targets: targets/usdt.c (needs <sys/sdt.h>, Debian's systemtap-sdt-dev) and python3's
own markers (python:function__entry, semaphore-guarded), with bpftrace's usdt probe
as the oracle when it is installed."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest

from helpers import exec_mappings, run_cli, wait_for_line
from uprobe_opt.errors import SymbolError
from uprobe_opt.session import Tracer
from uprobe_opt.symbols import SymbolResolver, parse_spec
from uprobe_opt.testing import BuildError, build_target
from uprobe_opt.x86.sdtargs import SdtArgError, parse_args

N = 500
PYTHON = "/usr/bin/python3"
U64 = (1 << 64) - 1


# -- descriptors (pure) -------------------------------------------------------------------

def test_argument_descriptors_decode_and_fetch():
    regs = {"rax": 0x1122334455667788, "rbp": 0x7000, "rdx": 3, "rip": 0x401000}
    mem = {0x7000 - 20: struct.pack("<i", -5), 0x7000 + 3 * 8 + 8: struct.pack("<Q", 99),
           0x601040 + 8: struct.pack("<q", -2)}

    def read(addr, size):
        return mem[addr][:size]

    args = parse_args("8@%rax -4@%eax 2@%ax 1@%ah -4@-20(%rbp) 8@8(%rbp,%rdx,8) "
                      "-4@$-7 8@$0x10 -8@sym+8(%rip)")
    args = tuple(a.bind(lambda name: 0x601040 if name == "sym" else None) for a in args)
    got = [a.fetch(regs, read) for a in args]
    assert got == [0x1122334455667788, 0x55667788, 0x7788, 0x77, -5 & U64, 99,
                   -7 & U64, 0x10, -2 & U64]
    assert parse_args("%rdi")[0].size == 8            # v1 notes: no SIZE@
    with pytest.raises(SdtArgError):
        parse_args("8@%xmm0")


def test_usdt_spec_forms():
    assert parse_spec("usdt:python:function__entry") == parse_spec(
        "usdt:python:function__entry")
    ps = parse_spec("usdt:libfoo.so.1:prov:name")
    assert (ps.usdt, ps.lib, ps.provider, ps.symbol) == (True, "libfoo.so.1", "prov", "name")
    ps = parse_spec("usdt:gc__*")
    assert (ps.lib, ps.provider, ps.symbol) == (None, None, "gc__*")
    assert str(parse_spec("usdt:a:b:c")) == "usdt:a:b:c"
    with pytest.raises(SymbolError, match="bad USDT spec"):
        parse_spec("usdt:a:b:c:d")


# -- a C target with <sys/sdt.h> ------------------------------------------------------------

def _sdt_target(flags=()):
    try:
        return str(build_target("usdt", flags=list(flags)))
    except BuildError as e:
        if "sdt.h" not in str(e):
            raise
        pytest.skip("<sys/sdt.h> not installed (Debian: systemtap-sdt-dev; "
                    "scripts/_setup.sh installs it when it can)")


def test_markers_listed_with_semaphore_and_args():
    exe = _sdt_target()
    r = run_cli("list", exe, "usdt:demo:*", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["probe"] for row in rows] == ["usdt:demo:plain", "usdt:demo:tick"]
    for row in rows:
        assert row["optimizable"] is False and "USDT marker" in row["reason"]
        assert row["usdt"]["semaphore"] is not None
    assert rows[1]["usdt"]["args"].split()[2] == "-4@$-7"
    text = run_cli("list", exe, "usdt:*").stdout
    assert "usdt:demo:tick" in text and "semaphore 0x" in text and "2 sites" in text
    r = run_cli("trace", "usdt:demo:nope", "--", exe)
    assert r.returncode == 2 and "no USDT marker matches" in r.stderr
    assert "demo:tick" in r.stderr


def _phase(proc) -> dict:
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    line = wait_for_line(proc.stdout, "usdt: phase")
    return dict(kv.split("=") for kv in line.split()[3:])


def _sem_value(pid: int, addr: int) -> int:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(addr)
        return struct.unpack("<H", mem.read(2))[0]


@pytest.mark.parametrize("opt", ["-O2", "-O0"])   # -O0: arguments in stack memory
def test_semaphore_live_then_released_and_args_decoded(opt):
    exe = _sdt_target([opt])
    proc = subprocess.Popen([exe, str(N)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        wait_for_line(proc.stdout, "usdt: ready")
        before = exec_mappings(proc.pid)
        assert _phase(proc)["guarded"] == "0"
        with Tracer.attach(proc.pid) as t:
            tick, plain = t.add_probes(["usdt:demo:tick", "usdt:demo:plain"],
                                       handler="record")
            sem = t.resolver.resolve("usdt:demo:tick").usdt.semaphore
            assert _sem_value(proc.pid, sem) == 1      # live: incremented
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            t.run(until=lambda: tick.nhit + plain.nhit >= 2 * N, duration=60)
            line = wait_for_line(proc.stdout, "usdt: phase")
            recs = t.records()
            assert (tick.nhit, plain.nhit) == (N, N)
            assert tick.state.value == "int3" and "USDT marker" in tick.reason
        phase = dict(kv.split("=") for kv in line.split()[3:])
        assert phase["guarded"] == str(N) and phase["sem"] == "1"
        assert _sem_value(proc.pid, sem) == 0          # released at detach
        assert exec_mappings(proc.pid) == before
        by_site = {}
        for rec in recs:
            by_site.setdefault(int(rec["site"]), []).append(
                [int(a) for a in rec["args"][:int(rec["nargs"])]])
        plain_args = by_site[plain.site.id]
        tick_args = by_site[tick.site.id]
        assert plain_args == [[i, 3 * i, (-1 - (i & 1)) & U64] for i in range(N)]
        base = N * (N - 1) // 2                  # `total` after the first phase
        assert tick_args == [[i, base + i * (i + 1) // 2, -7 & U64] for i in range(N)]
        assert _phase(proc)["guarded"] == "0"          # untraced again
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_spawned_marker_counts_with_the_semaphore_held_from_the_start():
    exe = _sdt_target()
    r, w = os.pipe()
    rr, ww = os.pipe()
    with Tracer.spawn([exe, str(N)], stdin=rr, stdout=w) as t:
        os.close(w)
        os.close(rr)
        p = t.add_probe("usdt:demo:tick", handler="count")
        os.write(ww, b"go\n")
        os.close(ww)
        t.run()
        out = os.read(r, 65536).decode()
    os.close(r)
    assert f"guarded={N} sem=1" in out
    assert p.nhit == N and p.served_by in ("kernel uprobe", "tracer")


# -- python3's own markers ---------------------------------------------------------------

SCRIPT = """\
import sys
def f(i):
    return i
n = int(sys.argv[1])
sys.settrace(lambda *a: None)   # 3.11 fires function__entry only while tracing is on
for i in range(n):
    f(i)
sys.settrace(None)
print("calls done", flush=True)
sys.stdin.read()
"""


def _python_with_markers():
    if not os.path.exists(PYTHON):
        pytest.skip(f"{PYTHON} not installed")
    try:
        SymbolResolver(binary=os.path.realpath(PYTHON)).resolve_all(
            "usdt:python:function__entry")
    except SymbolError as e:
        pytest.skip(f"{PYTHON} has no function__entry marker: {e}")


def _python_entries(tmp_path, n: int) -> tuple[int, int]:
    """(function__entry hits, those whose funcname argument is 'f' with lineno 2)."""
    script = tmp_path / "calls.py"
    script.write_text(SCRIPT)
    r, w = os.pipe()
    rr, ww = os.pipe()
    with Tracer.spawn([PYTHON, "-S", str(script), str(n)], stdin=rr, stdout=w) as t:
        os.close(w)
        os.close(rr)
        p = t.add_probe("usdt:python:function__entry", handler="record", nargs=3)
        assert p.site.usdt.semaphore
        lib = os.path.basename(os.path.realpath(PYTHON))     # usdt:LIB:PROVIDER:NAME
        [site] = t.resolver.resolve_all(f"usdt:{lib}:python:function__entry")
        assert site.addr == p.site.addr and site.spec.startswith(f"usdt:{lib}:")
        buf = b""
        while b"calls done" not in buf:
            t.run(duration=0.05)
            try:
                os.set_blocking(r, False)
                buf += os.read(r, 4096)
            except BlockingIOError:
                pass
        recs = t.records()
        named = 0
        for rec in recs:
            name = t.target.read(int(rec["args"][1]), 2)
            named += name == b"f\0" and int(rec["args"][2]) == 2
        hits = p.nhit
        os.close(ww)
        t.run()
    os.close(r)
    assert len(recs) == hits
    return hits, named


def test_python_function_entry_counts_the_calls(tmp_path):
    _python_with_markers()
    base, named0 = _python_entries(tmp_path, 0)
    hits, named = _python_entries(tmp_path, N)
    assert named0 == 0 and named == N
    assert hits - base == N


def test_python_function_entry_agrees_with_bpftrace(tmp_path):
    _python_with_markers()
    if not shutil.which("bpftrace"):
        pytest.skip("bpftrace not installed: no oracle")
    script = tmp_path / "calls.py"
    script.write_text(SCRIPT.replace("sys.stdin.read()\n", ""))
    prog = (f"usdt:{os.path.realpath(PYTHON)}:python:function__entry {{ @n = count(); }}")
    bt = subprocess.run(["bpftrace", "-e", prog, "-c", f"{PYTHON} -S {script} {N}"],
                        capture_output=True, text=True, timeout=120)
    if bt.returncode != 0 or "@n:" not in bt.stdout:
        pytest.skip(f"bpftrace could not run here: {bt.stderr.strip()[:200]}")
    want = int(bt.stdout.split("@n:")[1].split()[0])
    r = run_cli("trace", "usdt:python:function__entry", "--handler", "count", "--json",
                "--", PYTHON, "-S", str(script), str(N))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    summary = [x for x in rows if x.get("event") == "summary"]
    hits = summary[0]["probes"][0]["hits"] if summary else None
    assert hits == want


def test_semaphore_follows_disable_and_enable():
    exe = _sdt_target()
    proc = subprocess.Popen([exe, str(N)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        wait_for_line(proc.stdout, "usdt: ready")
        with Tracer.attach(proc.pid) as t:
            tick = t.add_probe("usdt:demo:tick", handler="count")
            sem = tick.site.usdt.semaphore
            assert _sem_value(proc.pid, sem) == 1
            t.disable(tick)
            assert _sem_value(proc.pid, sem) == 0      # not live: the guard is off
            t.enable(tick)
            assert _sem_value(proc.pid, sem) == 1
            t.remove_probe(tick)
            assert _sem_value(proc.pid, sem) == 0
        assert _phase(proc)["guarded"] == "0"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_cli_ctrl_c_releases_the_semaphore():
    """The command's clean end (SIGINT, here while hands-off: the kernel serves the
    count site) decrements the semaphore; the hits of the phase traced are exact."""
    import signal
    import sys
    import time
    exe = _sdt_target()
    proc = subprocess.Popen([exe, str(N)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        wait_for_line(proc.stdout, "usdt: ready")
        sem = SymbolResolver(pid=proc.pid).resolve("usdt:demo:tick").usdt.semaphore
        cli = subprocess.Popen([sys.executable, "-m", "uprobe_opt.cli", "trace", "-p",
                                str(proc.pid), "usdt:demo:tick", "--handler", "count",
                                "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        deadline = time.monotonic() + 60
        while _sem_value(proc.pid, sem) != 1:        # armed: the guard is on
            assert time.monotonic() < deadline and cli.poll() is None
            time.sleep(0.01)
        phase = _phase(proc)
        assert phase["guarded"] == str(N) and phase["sem"] == "1"
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=60)
        assert cli.returncode in (0, 130), err
        summary = [json.loads(x) for x in out.splitlines() if '"summary"' in x][0]
        assert summary["probes"][0]["hits"] == N
        assert _sem_value(proc.pid, sem) == 0
        assert _phase(proc)["guarded"] == "0"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
