"""Return probes (SPEC%return) on real processes: every exit probed, no return address
touched; calls matched by (tid, rsp); unwound and in-flight entries; exact values."""
from __future__ import annotations

import json
import os
import re
import select
import subprocess
import time

import numpy as np
import pytest

from helpers import run_cli
from uprobe_opt import Tracer
from uprobe_opt.core.calls import CallMatcher, ReturnProbe, split_return_spec
from uprobe_opt.core.probe import ProbeState
from uprobe_opt.core.records import HIT_DTYPE

pytestmark = pytest.mark.timeout(180)
MODES = [pytest.param(True, id="optimized"), pytest.param(False, id="int3")]


def signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


class Run:
    """A spawned program with return probes; ``hold``: the program blocks at the end
    (retprobe.c's hold) and the trace ends while it is alive."""

    def __init__(self, argv, specs, *, handler="record", optimize=True, pre=None,
                 hold=False):
        self.r, w = os.pipe()
        self.hold = hold
        self.stdin_r, self.stdin_w = os.pipe() if hold else (None, None)
        self.t = Tracer.spawn([str(a) for a in argv], stdout=w, stdin=self.stdin_r,
                              optimize=optimize)
        os.close(w)
        self.t.calls.keep_calls = True
        self.probes = self.t.add_probes(specs, pre, handler=handler)
        self.out = b""

    def _read(self) -> None:
        while select.select([self.r], [], [], 0)[0]:
            chunk = os.read(self.r, 65536)
            if not chunk:
                break
            self.out += chunk

    def finish(self, timeout=120.0) -> str:
        t = self.t
        if self.hold:
            def held():
                self._read()
                return b"retprobe: holding" in self.out
            t.run(duration=timeout, until=held)
            assert held(), self.out
            t.detach()
            os.close(self.stdin_w)
            os.waitpid(t.pid, 0)
        else:
            t.run(duration=timeout)
            assert t.exited, "the program did not exit"
            t.detach()
            assert t.exit_code == 0
        self._read()
        while True:
            chunk = os.read(self.r, 65536)
            if not chunk:
                break
            self.out += chunk
        os.close(self.r)
        if self.stdin_r is not None:
            os.close(self.stdin_r)
        return self.out.decode()

    def calls(self, rp):
        return [c for c in self.t.calls.calls if c.probe is rp]


def stats(rp) -> dict:
    s = rp.stats.as_dict()
    return {k: s[k] for k in ("entries", "exits", "calls", "unwound", "in_flight",
                              "exits_without_entry")}


def check_states(rp, optimize: bool) -> None:
    want = ProbeState.OPTIMIZED if optimize else ProbeState.INT3
    for p in rp.exits:
        assert p.state is want, (p.spec, p.reason)


# -- several returns and early returns ---------------------------------------------------
@pytest.mark.parametrize("optimize", MODES)
def test_several_returns_retvals_exact(c_target, run_plain, optimize):
    exe = c_target("retprobe")
    run = Run([exe, "multi", "40"], ["classify%return"], optimize=optimize)
    (rp,) = run.probes
    out = run.finish()
    assert out == run_plain([exe, "multi", "40"]).stdout
    printed = {int(a): int(r) for a, r in re.findall(r"classify\((-?\d+)\)=(-?\d+)", out)}
    assert len(printed) == 40
    assert len(rp.exits) == 4 and all(p.kind == "ret" for p in rp.exit_points)
    check_states(rp, optimize)
    assert stats(rp) == dict(entries=40, exits=40, calls=40, unwound=0, in_flight=0,
                             exits_without_entry=0)
    calls = run.calls(rp)
    assert {signed(c.args[0]): signed(c.retval) for c in calls} == printed
    # Each exit's own count: x < 0 and x == 0 leave early; of 1..38, x*3 % 5 == 0
    # for multiples of 5 leave at the third ret, the others at the last two.
    hits = [p.nhit for p in rp.exits]
    assert sum(hits) == 40 and min(hits) >= 1
    assert sum(1 for c in calls if c.exit_addr == rp.exit_points[0].addr) == hits[0]
    assert len(rp.durations) == 40 and all(d > 0 for d in rp.durations)


# -- recursion ---------------------------------------------------------------------------
@pytest.mark.parametrize("optimize", MODES)
def test_recursion_50_deep(c_target, optimize):
    exe = c_target("retprobe")
    run = Run([exe, "rec", "50"], ["rec%return"], optimize=optimize)
    (rp,) = run.probes
    out = run.finish()
    assert out == "rec(50)=1275\n"
    check_states(rp, optimize)
    assert stats(rp) == dict(entries=51, exits=51, calls=51, unwound=0, in_flight=0,
                             exits_without_entry=0)
    calls = run.calls(rp)
    assert [c.args[0] for c in calls] == list(range(51))       # innermost first
    assert [c.retval for c in calls] == [n * (n + 1) // 2 for n in range(51)]
    rsps = [c.rsp for c in calls]
    assert all(b - a > 0 for a, b in zip(rsps, rsps[1:]))       # each caller 1 frame up
    durations = [c.duration_ns for c in calls]
    assert all(b > a for a, b in zip(durations, durations[1:]))  # nested: outer longer


# -- tail calls --------------------------------------------------------------------------
@pytest.mark.parametrize("optimize", MODES)
def test_tail_call_ends_at_the_jump(c_target, optimize):
    exe = c_target("retprobe")
    run = Run([exe, "tail", "10"], ["tailer%return", "leaf_odd%return",
                                   "leaf_even%return"], optimize=optimize)
    tailer, odd, even = run.probes
    out = run.finish()
    printed = {int(a): int(r) for a, r in re.findall(r"tailer\((\d+)\)=(-?\d+)", out)}
    assert [p.kind for p in tailer.exit_points] == ["tail", "tail"]
    check_states(tailer, optimize)
    assert stats(tailer) == dict(entries=10, exits=10, calls=10, unwound=0, in_flight=0,
                                 exits_without_entry=0)
    for rp in (odd, even):
        assert stats(rp) == dict(entries=5, exits=5, calls=5, unwound=0, in_flight=0,
                                 exits_without_entry=0)
    # The caller's call ends at its jmp: no value there; the callee, entered at the
    # same rsp, returns the value the program prints.
    calls_t = run.calls(tailer)
    assert all(c.retval is None for c in calls_t)
    leaf = sorted(run.calls(odd) + run.calls(even), key=lambda c: c.start_ns)
    assert [signed(c.retval) for c in leaf] == [printed[i] for i in range(10)]
    for t, l in zip(sorted(calls_t, key=lambda c: c.start_ns), leaf):
        assert t.rsp == l.rsp and t.end_ns <= l.start_ns


# -- longjmp, C++ exception, pthread_exit, never returns ---------------------------------
@pytest.mark.parametrize("optimize", MODES)
def test_longjmp_out_is_unwound(c_target, run_plain, optimize):
    exe = c_target("retprobe")
    run = Run([exe, "longjmp", "20"], ["jumper%return"], optimize=optimize)
    (rp,) = run.probes
    out = run.finish()
    assert out == run_plain([exe, "longjmp", "20"]).stdout
    printed = {int(a): int(r) for a, r in re.findall(r"jumper\((\d+)\)=(-?\d+)", out)}
    assert sorted(printed) == list(range(0, 20, 2))
    check_states(rp, optimize)
    assert stats(rp) == dict(entries=20, exits=10, calls=10, unwound=10, in_flight=0,
                             exits_without_entry=0)
    assert {c.args[0]: c.retval for c in run.calls(rp)} == printed


@pytest.mark.parametrize("optimize", MODES)
def test_cxx_exception_through_is_unwound(c_target, run_plain, optimize):
    exe = c_target("retprobe_throw")
    run = Run([exe, "30"], ["thrower%return"], optimize=optimize)
    (rp,) = run.probes
    out = run.finish()
    assert out == run_plain([exe, "30"]).stdout
    printed = {int(a): int(r) for a, r in re.findall(r"thrower\((\d+)\)=(-?\d+)", out)}
    assert len(printed) == 20 and out.count("threw") == 10
    check_states(rp, optimize)
    assert stats(rp) == dict(entries=30, exits=20, calls=20, unwound=10, in_flight=0,
                             exits_without_entry=0)
    assert {c.args[0]: c.retval for c in run.calls(rp)} == printed


@pytest.mark.parametrize("optimize", MODES)
def test_pthread_exit_inside_is_unwound(c_target, optimize):
    exe = c_target("retprobe")
    run = Run([exe, "pthread_exit", "12", "hold"], ["quitter%return"], optimize=optimize,
              hold=True)
    (rp,) = run.probes
    out = run.finish()
    printed = {int(a): int(r) for a, r in re.findall(r"quitter\((\d+)\)=(-?\d+)", out)}
    assert printed == {i: i * i for i in range(11)}
    check_states(rp, optimize)
    # The thread is gone when tracing ends (the process is alive): unwound.
    assert stats(rp) == dict(entries=12, exits=11, calls=11, unwound=1, in_flight=0,
                             exits_without_entry=0)
    assert {c.args[0]: c.retval for c in run.calls(rp)} == printed


def test_function_that_never_returns_is_in_flight(c_target):
    exe = c_target("retprobe")
    run = Run([exe, "never", "0", "hold"], ["forever%return"], handler="latency",
              hold=True)
    (rp,) = run.probes
    out = run.finish()
    assert out == "forever: entered\nretprobe: holding\n"
    assert rp.exits == [] and "no exit found" in rp.reason
    assert rp.entry.state is ProbeState.OPTIMIZED
    assert stats(rp) == dict(entries=1, exits=0, calls=0, unwound=0, in_flight=1,
                             exits_without_entry=0)
    assert rp.durations == []


# -- threads -----------------------------------------------------------------------------
@pytest.mark.parametrize("optimize", MODES)
def test_8_threads_at_once(c_target, run_plain, optimize):
    exe = c_target("retprobe")
    n = 2000 if optimize else 300
    run = Run([exe, "threads", str(n)], ["per_thread%return"], optimize=optimize)
    (rp,) = run.probes
    out = run.finish()
    assert out == run_plain([exe, "threads", str(n)]).stdout
    # per_thread's only ret is a branch target right after 3 bytes: it stays int3,
    # with the reason; the entry is optimized.
    (exit_probe,) = rp.exits
    assert exit_probe.state is ProbeState.INT3
    if optimize:
        assert "targets" in exit_probe.reason and "inside the region" in exit_probe.reason
    assert rp.entry.state is (ProbeState.OPTIMIZED if optimize else ProbeState.INT3)
    assert stats(rp) == dict(entries=8 * n, exits=8 * n, calls=8 * n, unwound=0,
                             in_flight=0, exits_without_entry=0)
    sums: dict[int, int] = {}
    tids: dict[int, set] = {}
    for c in run.calls(rp):
        sums[c.args[0]] = sums.get(c.args[0], 0) + c.retval
        tids.setdefault(c.args[0], set()).add(c.tid)
    printed = {int(t): int(s) for t, s in re.findall(r"thread (\d+) sum=(\d+)", out)}
    assert sums == printed
    assert all(len(v) == 1 for v in tids.values()) and len({min(v) for v in tids.values()}) == 8


# -- latency -----------------------------------------------------------------------------
@pytest.mark.parametrize("optimize", MODES)
def test_latency_of_a_2ms_sleep(c_target, optimize):
    exe = c_target("retprobe")
    run = Run([exe, "nap", "8"], ["nap%return"], handler="latency", optimize=optimize)
    (rp,) = run.probes
    out = run.finish()
    own = [int(d) for d in re.findall(r"ns=(\d+)", out)]
    assert stats(rp)["calls"] == len(rp.durations) == 8
    for ours, theirs in zip(rp.durations, own):
        # inside the program's own measure around the call (up to the error of our
        # TSC -> CLOCK_MONOTONIC conversion: a few hundred ns were seen on a loaded
        # machine), and at least the sleep
        assert 2_000_000 <= ours <= theirs + 10_000
        if optimize:    # int3: the program's measure also holds the tracer's stops
            assert theirs - ours < 1_000_000
    assert abs(float(np.median(rp.durations)) - 2_000_000) < 1_000_000
    assert [c.retval for c in run.calls(rp)] == [7 * i for i in range(8)]


# -- python handler: writable registers at the exit ------------------------------------
@pytest.mark.parametrize("optimize", MODES)
def test_python_handler_changes_return_value(c_target, run_plain, optimize):
    exe = c_target("retprobe")
    seen = []

    def add_1000(probe, regs):
        seen.append(signed(regs.rax))
        regs.rax = regs.rax + 1000

    run = Run([exe, "multi", "12"], ["classify%return"], handler="python", pre=add_1000,
              optimize=optimize)
    (rp,) = run.probes
    out = run.finish()
    plain = run_plain([exe, "multi", "12"]).stdout
    want = [f"classify({a})={int(r) + 1000}" for a, r in
            re.findall(r"classify\((-?\d+)\)=(-?\d+)", plain)]
    assert out.splitlines() == want
    assert seen == [int(r) for r in re.findall(r"=(-?\d+)", plain)]
    assert rp.nhit == 12 and rp.entry is None
    check_states(rp, optimize)


# -- CET: -fcf-protection=full, no return address touched ------------------------------
def test_cf_protection_stack_words_unchanged(c_target, run_plain):
    exe = c_target("retprobe", flags=["-fcf-protection=full"])
    entry_words, exit_words = [], []

    def at_entry(probe, regs):
        entry_words.append(regs.read(regs.rsp, 24))

    def at_exit(probe, regs):
        exit_words.append(regs.read(regs.rsp, 24))

    r, w = os.pipe()
    t = Tracer.spawn([str(exe), "rec", "20"], stdout=w)
    os.close(w)
    entry = t.add_probe("rec", at_entry)
    (rp,) = t.add_probes(["rec%return"], at_exit, handler="python")
    t.run()
    t.detach()
    out = os.read(r, 4096).decode()
    os.close(r)
    assert out == run_plain([exe, "rec", "20"]).stdout == "rec(20)=210\n"
    assert entry.state is ProbeState.OPTIMIZED and rp.state is ProbeState.OPTIMIZED
    assert len(entry_words) == len(exit_words) == 21
    # Calls nest: the exits come innermost first; the words at rsp (the return
    # address and the two above it) are those the entry saw.
    assert exit_words == entry_words[::-1]


# -- kernel uretprobes as the oracle -----------------------------------------------------
def _kernel_returns(exe, mode, n, spec):
    import kuprobe
    p = subprocess.Popen([str(exe), mode, str(n), "wait"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(f"/proc/{p.pid}/maps") and time.monotonic() < deadline:
            time.sleep(0.01)
        with kuprobe.KernelUprobes(p.pid, [spec], retprobe=True) as k:
            k.start()
            p.stdin.write("go\n")
            p.stdin.flush()
            p.stdin.close()
            out = p.stdout.read()
            p.wait(timeout=60)
            k.stop()
            return k.counts()[spec], out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("mode,n,func", [("multi", 50, "classify"), ("rec", 50, "rec"),
                                         ("tail", 20, "tailer"), ("longjmp", 20, "jumper")])
def test_return_counts_equal_kernel_uretprobe(c_target, mode, n, func):
    import kuprobe
    exe = c_target("retprobe")
    try:
        kernel, kout = _kernel_returns(exe, mode, n, func)
    except kuprobe.Unavailable as e:
        pytest.skip(str(e))
    run = Run([exe, mode, str(n)], [f"{func}%return"])
    (rp,) = run.probes
    out = run.finish()
    assert out == kout
    assert rp.stats.exits == rp.nhit == kernel


# -- explain, CLI, perfetto --------------------------------------------------------------
def test_explain_lists_every_exit(c_target):
    exe = c_target("retprobe")
    res = run_cli("explain", exe, "classify%return", "per_thread%return", "--json")
    assert res.returncode == 0, res.stderr
    classify, per_thread = [json.loads(line) for line in res.stdout.splitlines()]
    assert [e["kind"] for e in classify["exits"]] == ["ret"] * 4
    assert all(e["optimizable"] for e in classify["exits"])
    assert all(e["region"][-1]["insn"] == "ret" for e in classify["exits"])
    (ex,) = per_thread["exits"]
    assert not ex["optimizable"] and "inside the region" in ex["reason"]
    text = run_cli("explain", exe, "uretprobe:tailer")
    assert text.returncode == 0
    assert text.stdout.count("tail call (jmp") == 2 and "ends the call at its jmp" in text.stdout
    bad = run_cli("explain", exe, "classify+0x4%return")
    assert bad.returncode == 2 and "takes a function" in bad.stderr


def test_cli_latency_hist_and_json(c_target):
    exe = c_target("retprobe")
    res = run_cli("trace", "nap%return", "--handler", "latency", "--hist", "latency",
                  "--", exe, "nap", "4")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("nap(0)=0")       # spawn mode: ours on stderr
    assert "@nap%return[latency ns]:" in res.stderr
    # 2 ms = 1.91 Mi ns: the [1M, 2M) bucket or, for a sleep a loaded machine
    # stretched (seen: 5.9 ms), a later one; never an earlier one; 4 calls in all
    rows = re.findall(r"^\[(\w+), (\w+)\)\s+(\d+) \|@*\s*\|$", res.stderr, re.M)
    assert {lo for lo, _, _ in rows} <= {"1M", "2M", "4M", "8M", "16M", "32M"} and \
        sum(int(n) for *_, n in rows) == 4, res.stderr
    assert "nap%return: 4 entries, 4 exits, 4 calls matched, 0 unwound, 0 in flight" \
        in res.stderr
    res = run_cli("trace", "nap%return", "--handler", "latency", "--json", "--",
                  exe, "nap", "3")
    events = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    calls = [e for e in events if e["event"] == "call"]
    assert [c["retval"] for c in calls] == [0, 7, 14]
    assert all(2_000_000 <= c["duration_ns"] == c["end_ns"] - c["time_ns"] for c in calls)
    (lat,) = [e for e in events if e["event"] == "latency"]
    assert lat["count"] == 3 and lat["calls"]["unwound"] == 0
    (summary,) = [e for e in events if e["event"] == "summary"]
    assert summary["probes"][0]["exits"][0]["kind"] == "ret"
    bad = run_cli("trace", "nap", "--hist", "latency", "--", exe, "nap", "1")
    assert bad.returncode == 2 and "return probe" in bad.stderr


def test_cli_record_lines_per_call(c_target, run_plain):
    """The default handler (record; print is its old name) shows a line per matched
    call of a return probe, on stderr in spawn mode; -q keeps only the summary."""
    exe = c_target("retprobe")
    plain = run_plain([exe, "longjmp", "4"]).stdout
    for handler in ("record", "print"):
        res = run_cli("trace", "jumper%return", "--handler", handler, "--", exe, "longjmp", "4")
        assert res.returncode == 0, res.stderr
        assert res.stdout == plain                   # the program's stdout untouched
        calls = re.findall(r"^\s+[\d.]+\s+\d+ jumper%return  = (0x[0-9a-f]+)  [\d.]+ us",
                           res.stderr, re.M)
        assert calls == ["0x1", "0x15"], res.stderr
        assert "jumper%return: 4 entries, 2 exits, 2 calls matched, 2 unwound" in res.stderr
        assert re.search(r"^uprobe-opt: ended: target exited with status 0 after", res.stderr,
                         re.M), res.stderr
    quiet = run_cli("trace", "jumper%return", "-q", "--", exe, "longjmp", "4")
    assert quiet.returncode == 0 and quiet.stdout == plain
    assert " us  (" not in quiet.stderr and "2 calls matched" in quiet.stderr, quiet.stderr


def test_perfetto_slices_decode(c_target, tmp_path):
    pb = pytest.importorskip("perfetto.protos.perfetto.trace.perfetto_trace_pb2")
    exe = c_target("retprobe")
    path = tmp_path / "t.pftrace"
    res = run_cli("trace", "rec%return", "helper", "--handler", "record", "--perfetto",
                  path, "--", exe, "rec", "5")
    assert res.returncode == 0, res.stderr
    trace = pb.Trace()
    trace.ParseFromString(path.read_bytes())
    tracks = {p.track_descriptor.uuid: p.track_descriptor.thread.tid
              for p in trace.packet if p.HasField("track_descriptor")}
    events = [p for p in trace.packet if p.HasField("track_event")]
    begins = [p for p in events if p.track_event.type == pb.TrackEvent.TYPE_SLICE_BEGIN]
    ends = [p for p in events if p.track_event.type == pb.TrackEvent.TYPE_SLICE_END]
    assert len(begins) == len(ends) == 6 and len(tracks) == 1
    assert {p.track_event.name for p in begins} == {"rec%return"}
    # properly nested: a stack of begins closed by ends, timestamps non-decreasing
    depth, stamps, retvals = 0, [], []
    for p in events:
        stamps.append(p.timestamp)
        assert p.timestamp_clock_id == 3
        if p.track_event.type == pb.TrackEvent.TYPE_SLICE_BEGIN:
            depth += 1
        elif p.track_event.type == pb.TrackEvent.TYPE_SLICE_END:
            depth -= 1
            retvals += [a.int_value for a in p.track_event.debug_annotations
                        if a.name == "retval"]
        assert depth >= 0
    assert depth == 0 and stamps == sorted(stamps)
    assert retvals == [0, 1, 3, 6, 10, 15]


# -- the matcher on its own (stack discipline) ------------------------------------------
class _FakeSite:
    def __init__(self, id, addr, regs, exit=None):
        self.id, self.addr, self.record_regs, self.exit = id, addr, regs, exit


class _FakeProbe:
    def __init__(self, site):
        self.site = site


def _matcher():
    class R:
        func_addr, func_size, symbol, addr = 0x1000, 0x40, "f", 0x1000
    rp = ReturnProbe("f%return", "f", R, "latency")
    rp.entry = _FakeProbe(_FakeSite(1, 0x1000, ("rdi", "rsi", "rdx", "rcx", "r8", "rsp")))
    rp.exits = [_FakeProbe(_FakeSite(2, 0x1030, ("rax", "rdx", "rsp")))]
    m = CallMatcher()
    m.add(rp)
    return m, rp


def _batch(rows):
    out = np.zeros(len(rows), dtype=HIT_DTYPE)
    for i, (site, t, tid, rsp, val) in enumerate(rows):
        out[i]["site"], out[i]["time_ns"], out[i]["tid"] = site, t, tid
        out[i]["args"] = [val, 0, 0, 0, 0, rsp] if site == 1 else [val, 0, rsp, 0, 0, 0]
    return out


def test_matcher_stack_discipline():
    m, rp = _matcher()
    m.keep_calls = True
    m.feed(_batch([
        (1, 10, 7, 0x7000, 1),      # entry A at 0x7000
        (1, 20, 7, 0x6f00, 2),      # nested entry B (deeper)
        (1, 25, 8, 0x9000, 9),      # other thread
        (2, 30, 7, 0x7000, 42),     # exit at A's slot: B never exited -> unwound
        (1, 40, 7, 0x7000, 3),      # new call at the same slot
        (1, 50, 7, 0x7100, 4),      # higher rsp: the previous one is unwound
        (2, 60, 8, 0x9000, 99),
        (2, 70, 7, 0x5000, 5),      # exit deeper than anything open: no entry
    ]))
    m.finish({7: 0x7200})           # thread 7 is above its last open entry; 8 gone
    assert rp.stats.as_dict() == dict(entries=5, exits=3, calls=2, unwound=3,
                                      in_flight=0, exits_without_entry=1)
    assert [(c.tid, c.duration_ns, c.retval) for c in m.calls] == \
        [(7, 20, 42), (8, 35, 99), (7, None, 5)]
    assert rp.durations == [20, 35]
    m2, rp2 = _matcher()
    m2.feed(_batch([(1, 10, 7, 0x7000, 1)]))
    m2.finish({7: 0x6000})          # still below the slot: in flight
    assert (rp2.stats.in_flight, rp2.stats.unwound) == (1, 0)


def test_split_return_spec():
    assert split_return_spec("work%return") == ("work", True)
    assert split_return_spec("uretprobe:libc:malloc") == ("libc:malloc", True)
    assert split_return_spec("uprobe:work") == ("work", False)
    assert split_return_spec("work+0x4") == ("work+0x4", False)
