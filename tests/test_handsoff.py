"""Hands-off tracing: prepare while the target runs, patch in short windows, let go of
ptrace while every probe runs in-process, seize again only to restore (targets/handsoff.c).

Every test drives real processes; counts are exact (deltas between two pauses of the
target, where it has parked every thread and printed its own call count)."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest

from helpers import ROOT, UPROBE_OPT, exec_mappings, text_vs_file, tracer_pid
from uprobe_opt.session import Tracer
from uprobe_opt.testing import build_target

SIG = signal.SIGRTMIN + 1          # queued: a lost one is our bug, never coalescing


@pytest.fixture(scope="module")
def exe() -> str:
    return str(build_target("handsoff"))


class Prog:
    """A handsoff target: stdin commands, stdout lines."""

    def __init__(self, *argv, **kw):
        self.p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, **kw)
        self.pid = self.p.pid
        assert self.line().startswith("ready pid=")

    def line(self) -> str:
        ln = self.p.stdout.readline()
        assert ln, "target closed its stdout"
        return ln.rstrip("\n")

    def send(self, text: str) -> None:
        self.p.stdin.write(text)
        self.p.stdin.flush()

    def pause(self) -> tuple[int, int]:
        """Every thread parked: (calls, signals handled) so far."""
        self.send("p")
        ln = self.line()
        assert ln.startswith("paused "), ln
        fields = dict(kv.split("=") for kv in ln.split()[1:])
        return int(fields["calls"]), int(fields["sigs"])

    def finish(self) -> tuple[int, str]:
        self.send("q")
        out, _ = self.p.communicate(timeout=30)
        return self.p.returncode, out

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout=10)


@pytest.fixture
def progs():
    started: list[Prog] = []

    def start(*argv, **kw) -> Prog:
        prog = Prog(*argv, **kw)
        started.append(prog)
        return prog
    yield start
    for prog in started:
        prog.kill()


def run_until_hands_off(t: Tracer, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while t.mode != "hands-off":
        assert time.monotonic() < deadline, (t.mode, t.mode_reason)
        t.run(duration=0.01)


def ours_left(pid: int) -> list[str]:
    """Mappings of ours still in the target: memfds, anonymous r-x pages."""
    with open(f"/proc/{pid}/maps") as f:
        lines = f.read().splitlines()
    return [ln for ln in lines if "memfd:uprobe-opt" in ln
            or (ln.split()[1] == "r-xp" and ln.split()[4] == "0" and len(ln.split()) == 5)]


def fds(pid: int) -> set[str]:
    return {os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}


class Sender(threading.Thread):
    """Sends SIG to ``pid`` every 20 ms until stopped; counts what it sent."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.sent = pid, 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.02):
            os.kill(self.pid, SIG)
            self.sent += 1

    def stop(self) -> int:
        self.halt.set()
        self.join()
        return self.sent


# --------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("spec", ["no_such_function", "probed+0x1"])
def test_bad_input_never_seizes_the_target(exe, progs, spec):
    """A misspelt symbol or a mid-instruction address is refused (exit 2) before any
    thread is seized: TracerPid stays 0 the whole time, polled without pause."""
    prog = progs(exe, "spin", 2)
    seen, done = set(), threading.Event()

    def poll():
        while not done.is_set():
            seen.add(tracer_pid(prog.pid))
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    r = subprocess.run(UPROBE_OPT + ["trace", "-p", str(prog.pid), spec], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    done.set()
    poller.join()
    assert r.returncode == 2, r.stderr
    assert seen == {0}
    assert text_vs_file(prog.pid, exe) == []
    assert prog.finish()[0] == 0


# --------------------------------------------------------------------------- hands-off
@pytest.mark.parametrize("handler", ["count", "record"])
@pytest.mark.parametrize("nthreads", [1, 8])
def test_hands_off_exact_counts_signals_delivered(exe, progs, handler, nthreads):
    """A signal every 20 ms from before the attach until after the detach: every one
    handled; while hands-off no thread is traced; hits between two pauses == calls;
    records + dropped == hits; after detach nothing of ours is mapped or open."""
    prog = progs(exe, "spin", nthreads)
    fds_before = fds(prog.pid)
    sender = Sender(prog.pid)
    sender.start()
    t = Tracer.attach(prog.pid, buffer_size=1 << 20)
    try:
        probe = t.add_probe("probed", handler=handler, nargs=2)
        run_until_hands_off(t)
        assert tracer_pid(prog.pid) == 0 and t.mode_reason is None
        c1, _ = prog.pause()
        h1 = probe.nhit
        prog.send("r")
        t.run(duration=0.3)
        c2, _ = prog.pause()
        assert probe.nhit - h1 == c2 - c1 > 0
        prog.send("r")
        t.run(duration=0.05)
    finally:
        t.detach()
    assert t.mode == "hands-off" and t.notes == []
    if handler == "record":
        assert len(t.records()) + probe.nmissed == probe.nhit
    assert tracer_pid(prog.pid) == 0
    assert ours_left(prog.pid) == [] and fds(prog.pid) == fds_before
    assert text_vs_file(prog.pid, exe) == []
    time.sleep(0.05)
    sent = sender.stop()
    time.sleep(0.05)
    _, sigs = prog.pause()
    assert sigs == sent and sent > 5
    code, out = prog.finish()
    assert code == 0 and out.startswith("done calls=")


def test_python_handler_stays_attached(exe, progs):
    """A Python pre_handler runs in the tracer: one stop per hit, so the tracer stays
    attached and says why."""
    prog = progs(exe, "spin", 1)
    hits = []
    with Tracer.attach(prog.pid) as t:
        t.add_probe("probed", lambda p, r: hits.append(1))
        t.run(duration=0.2)
        assert t.mode == "attached"
        assert t.mode_reason == "1 site with Python handlers needs the tracer"
        assert tracer_pid(prog.pid) == os.getpid()
    assert hits and tracer_pid(prog.pid) == 0
    assert prog.finish()[0] == 0


# --------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM,
                                 signal.SIGINT])
def test_tracer_signal_clean_detach(exe, progs, sig):
    """A closed terminal (SIGHUP), Ctrl-\\, kill, Ctrl-C to the CLI while hands-off:
    a clean detach (code byte-identical, nothing of ours left), summary printed, exit
    0; the target runs on and ends as without us."""
    prog = progs(exe, "spin", 2)
    before = exec_mappings(prog.pid)
    p = _cli_until_hands_off(prog)
    p.send_signal(sig)
    p.send_signal(sig)                          # a second one changes nothing
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "probed" in out and "optimized" in out, out
    assert exec_mappings(prog.pid) == before and ours_left(prog.pid) == []
    code, text = prog.finish()
    assert code == 0 and text.startswith("done calls=")


@pytest.mark.parametrize("gap", [0.0, 0.02, 0.05, 0.2])
def test_second_different_signal_at_the_end(exe, progs, gap):
    """SIGINT, then SIGTERM ``gap`` s later (an impatient user, a service manager):
    whether the second lands during the detach, the summary or the interpreter's exit,
    the end is the first one's: clean detach, summary, exit 0."""
    prog = progs(exe, "spin", 2)
    before = exec_mappings(prog.pid)
    p = _cli_until_hands_off(prog)
    p.send_signal(signal.SIGINT)
    time.sleep(gap)                             # the gap is the case, not a wait
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "Traceback" not in err, (p.returncode, err)
    assert "optimized" in out and "tracer interrupted by SIGINT" in out, (out, err)
    assert exec_mappings(prog.pid) == before and ours_left(prog.pid) == []
    code, text = prog.finish()
    assert code == 0 and text.startswith("done calls=")


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGHUP])
def test_spawn_mode_signal_during_the_detach_reaches_the_program(exe, second):
    """Spawn mode, SIGINT then SIGTERM (or SIGHUP) 50 ms later: the first ends the
    trace, the second (whether it lands during the detach or after) is passed on to
    the program, like a shell's: it dies of it and our status says so.  (A second
    SIGINT that close may count as one: the interpreter keeps one flag per signal.)"""
    import psutil
    p = subprocess.Popen(UPROBE_OPT + ["trace", "probed", "--handler", "count", "--",
                                       exe, "spin", "2"], cwd=ROOT, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        child = None
        while child is None or tracer_pid(child.pid) != 0 or not _jump_at(child):
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()
            kids = [k for k in psutil.Process(p.pid).children()
                    if _exe_of(k.pid) == os.path.realpath(exe)]    # exec'd already
            child = types.SimpleNamespace(pid=kids[0].pid) if kids else None
            time.sleep(0.005)
        p.send_signal(signal.SIGINT)
        time.sleep(0.05)                        # the gap is the case, not a wait
        p.send_signal(second)
        p.wait(timeout=30)              # stdin stays open: the program ends by the signal
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + second, (p.returncode, err)
    assert "tracer interrupted by SIGINT" in err and "Traceback" not in err, err
    assert not psutil.pid_exists(child.pid)


def test_target_killed_while_hands_off_summary_says_so(exe, progs):
    """kill -9 of the target while hands-off (no thread traced): the CLI learns it
    through the pidfd and the summary says how it ended and in which mode."""
    prog = progs(exe, "spin", 2)
    p = _cli_until_hands_off(prog, "--json")
    prog.p.kill()
    assert prog.p.wait(timeout=10) == -signal.SIGKILL      # reaped by its parent: us
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "Traceback" not in err, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["mode"] == "hands-off" and "mode_reason" not in summary, summary
    # its status is read from the zombie, unless its parent (this test) reaped it first
    end = summary["end"]
    assert (end["reason"], end["signal"]) in (("killed", 9), ("exited", None)), end


def test_enable_disable_remove_after_letting_go(exe, progs):
    """The API after hands-off: disable, enable and remove a probe while the tracer
    has let go.  Each is done in a window that seizes the threads first (an int3 in an
    untraced process would kill it at its next hit); the program runs on and counts
    resume exactly where they were frozen."""
    prog = progs(exe, "spin", 2)
    before = exec_mappings(prog.pid)
    with Tracer.attach(prog.pid) as t:
        p = t.add_probe("probed", handler="count")
        run_until_hands_off(t)
        t.disable(p)
        frozen = p.nhit
        run_until_hands_off(t)                      # nothing patched: let go again
        assert p.nhit == frozen and t.mode == "hands-off"
        t.enable(p)
        t.optimize(timeout=5)
        run_until_hands_off(t)
        t.run(duration=0.1)
        assert p.state.value == "optimized" and p.nhit > frozen
        t.remove_probe(p)
        run_until_hands_off(t)
    assert exec_mappings(prog.pid) == before and ours_left(prog.pid) == []
    code, text = prog.finish()
    assert code == 0 and text.startswith("done calls=")


def test_second_tracer_refuses_to_stack_on_our_jump(exe, progs):
    """A second uprobe-opt on a function the first one jump-optimized (it is still
    tracing, hands-off) is refused with exit 2 before touching anything: stacking a
    detour over another's jump would send the program into pages the first one unmaps
    when it ends.  The first one then ends cleanly and the target is untouched."""
    prog = progs(exe, "spin", 2)
    before = exec_mappings(prog.pid)
    first = _cli_until_hands_off(prog)
    second = subprocess.run(UPROBE_OPT + ["trace", "-p", str(prog.pid), "probed",
                                          "--handler", "count", "--duration", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, (second.returncode, second.stderr)
    assert "another tool patched it" in second.stderr and "Traceback" not in second.stderr
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=30)
    assert first.returncode == 0 and "optimized" in out, err
    assert exec_mappings(prog.pid) == before and ours_left(prog.pid) == []
    code, text = prog.finish()
    assert code == 0 and text.startswith("done calls=")


def _cli_until_hands_off(prog: Prog, *extra: str) -> subprocess.Popen:
    """`uprobe-opt trace -p PID probed --handler count EXTRA...`, returned once it is
    hands-off: our pages mapped, no tracer, the jump in place."""
    p = subprocess.Popen(UPROBE_OPT + ["trace", "-p", str(prog.pid), "probed",
                                       "--handler", "count", *extra], cwd=ROOT,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ours_left(prog.pid) or tracer_pid(prog.pid) != 0 or not _jump_at(prog):
        assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()
        time.sleep(0.005)
    return p


def _exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _jump_at(prog: Prog) -> bool:
    from helpers import symbol_addr
    addr = symbol_addr(prog.pid, "probed")
    with open(f"/proc/{prog.pid}/mem", "rb", buffering=0) as mem:
        mem.seek(addr)
        head = mem.read(8)
    return b"\xe9" in head[:5]


KILLED = '''
import sys, time
from uprobe_opt.session import Tracer
print("start", flush=True)
t0 = time.monotonic()
t = Tracer.attach(int(sys.argv[1]))
t.add_probes(["probed"], handler="count")
armed = time.monotonic()
print("armed", flush=True)
while t.mode != "hands-off":
    t.run(duration=0.001)
print(f"hands-off {armed - t0:.6f} {time.monotonic() - armed:.6f}", flush=True)
t.run()
'''


def test_sigkill_of_tracer_at_random_moments(exe, progs, tmp_path):
    """SIGKILL of the tracer at 20 random moments (during the attach, the int3 stage,
    hands-off): whenever hands-off was reached the target survives, its counts go on,
    and it ends normally.  Before it (int3 sites in place) a hit kills it with
    SIGTRAP: the window is measured and printed."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    rnd = random.Random(11)
    windows, survived = [], 0
    for i in range(20):
        prog = progs(exe, "spin", 2)
        p = subprocess.Popen([sys.executable, str(script), str(prog.pid)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "start\n"     # imports done: the attach begins
        phase = i % 3
        if phase == 0:
            time.sleep(rnd.uniform(0, 0.3))          # while preparing or arming
        elif phase == 1:
            assert p.stdout.readline() == "armed\n"
            time.sleep(rnd.uniform(0, 0.05))         # int3 stage, or just hands-off
        else:
            assert p.stdout.readline() == "armed\n"
            early = p.stdout.readline()              # hands-off reached: kill then
            assert early.startswith("hands-off"), early
            time.sleep(rnd.uniform(0, 0.05))
        os.set_blocking(p.stdout.fileno(), False)
        p.kill()
        p.wait()
        line = (early if phase == 2 else "") + (p.stdout.read() or "")
        line = line.replace("armed\n", "")
        if line.startswith("hands-off"):
            windows.append(float(line.split()[2]))
            prog.pause()
            code, text = prog.finish()
            assert code == 0 and text.startswith("done calls="), (code, text)
            survived += 1
        else:
            prog.kill()
    print(f"\nhands-off reached in {survived}/20 runs; int3 window (armed -> hands-off) "
          f"median {sorted(windows)[len(windows) // 2] * 1000 if windows else 0:.1f} ms, "
          f"max {max(windows, default=0) * 1000:.1f} ms")
    assert survived >= 6                             # every phase-2 run, at least


# --------------------------------------------------------------------------- odd targets
def test_zombie_group_leader(exe, progs):
    """The main thread called pthread_exit (/proc/PID/maps is empty): attached, hands-off,
    exact counts, restored."""
    prog = progs(exe, "zombie", 2)
    deadline = time.monotonic() + 10
    while open(f"/proc/{prog.pid}/maps").read():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    t = Tracer.attach(prog.pid)
    try:
        probe = t.add_probe("probed", handler="count")
        run_until_hands_off(t)
        c1, _ = prog.pause()
        h1 = probe.nhit
        prog.send("r")
        t.run(duration=0.2)
        c2, _ = prog.pause()
        assert probe.nhit - h1 == c2 - c1 > 0
        prog.send("r")
    finally:
        t.detach()
    assert t.notes == [] and tracer_pid(prog.pid) == 0
    code, out = prog.finish()
    assert code == 0 and out.startswith("done calls=")


def test_dlclose_and_another_library_at_the_same_address(exe, progs):
    """A library is unloaded while its probe is live and another one is mapped at the
    same address: at detach the mapping is found to be another file, the probe is gone
    with the reason, and not a byte of the new library is written."""
    liba = str(build_target("handsoff_liba", shared=True))
    libb = str(build_target("handsoff_libb", shared=True))
    prog = progs(exe, "dl", liba, libb)
    t = Tracer.attach(prog.pid)
    try:
        probe = t.add_probe("libhandsoff_liba:lib_fn", handler="count")
        run_until_hands_off(t)
        t.run(duration=0.05)
        assert probe.nhit > 0
        prog.send("s")
        swapped = prog.line()
        if swapped != "swapped same=1":
            pytest.skip(f"library B was not mapped where A was ({swapped})")
        deadline = time.monotonic() + 10
        while libb not in open(f"/proc/{prog.pid}/maps").read():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        t.run(duration=0.05)
    finally:
        t.detach()
    assert probe.state.value == "gone"
    assert "mapped to another file" in probe.reason or "unmapped" in probe.reason
    assert text_vs_file(prog.pid, libb) == []
    assert tracer_pid(prog.pid) == 0
    code, _ = prog.finish()
    assert code == 0


def test_own_mount_namespace_and_dev_shm(exe, progs):
    """A target in its own mount namespace with its own /dev/shm (tmpfs): the ring and
    counters are memfds created in the target, so records flow."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) not installed")
    inner = f"mount -t tmpfs none /dev/shm && exec {exe} spin 1"
    try:
        prog = progs("unshare", "-m", "--propagation", "private", "sh", "-c", inner)
    except AssertionError:
        pytest.skip("unshare -m not permitted here")
    assert os.readlink(f"/proc/{prog.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    with Tracer.attach(prog.pid) as t:
        probe = t.add_probe("probed", handler="record", nargs=2)
        run_until_hands_off(t)
        t.run(duration=0.1)
    records = t.records()
    assert len(records) > 0 and len(records) + probe.nmissed == probe.nhit
    assert set(records["tid"].tolist()) <= set(int(x) for x in os.listdir(
        f"/proc/{prog.pid}/task"))
    assert ours_left(prog.pid) == []
    assert prog.finish()[0] == 0


def test_seccomp_strict_refused_target_untouched(exe, progs):
    """Strict mode kills on any system call but read/write/exit: refused before any
    stop (exit 2, the reason said); the target goes on and ends normally."""
    prog = progs(exe, "strict", 100000)
    r = subprocess.run(UPROBE_OPT + ["trace", "-p", str(prog.pid), "probed"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "seccomp strict mode" in r.stderr, r.stderr
    prog.send("g")
    out, _ = prog.p.communicate(timeout=30)
    assert prog.p.returncode == 0
    assert out == "strict: 100000 calls, sum=14999950000\n"


def test_seccomp_filter_killing_mmap_refused(exe, progs):
    """A filter that kills the process on mmap(2): the filter is read and evaluated
    for the exact call before it is injected; refused (exit 2), never killed."""
    prog = progs(exe, "nommap")
    r = subprocess.run(UPROBE_OPT + ["trace", "-p", str(prog.pid), "probed"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "seccomp filter" in r.stderr and "KILL_PROCESS" in \
        r.stderr, r.stderr
    assert tracer_pid(prog.pid) == 0 and text_vs_file(prog.pid, exe) == []
    prog.pause()
    code, out = prog.finish()
    assert code == 0 and out.startswith("done calls=")


def test_record_tid_when_threads_reuse_tls_blocks(exe, progs):
    """Threads created and ended one after another (each joined before the next: glibc
    hands the next one the same stack and TLS block) each call probed(own tid, i): the
    tid of every record is the tid of the thread that made the call (read in-process
    from the thread's descriptor, not from a table the tracer keeps)."""
    prog = progs(exe, "tids", 200, 50)
    t = Tracer.attach(prog.pid, buffer_size=4 << 20)
    try:
        probe = t.add_probe("probed", handler="record", nargs=1)
        run_until_hands_off(t)
        prog.send("g")
        assert prog.line() == "tids: 200 x 50"
        t.run(duration=0.05)
    finally:
        t.detach()
    records = t.records()
    assert probe.nmissed == 0 and len(records) == probe.nhit == 200 * 50
    assert (records["tid"].astype("int64") == records["args"][:, 0].astype("int64")).all()
    assert len(set(records["tid"].tolist())) == 200
    assert prog.finish()[0] == 0


def test_end_window_puts_the_original_bytes_back_in_one_write(exe, progs):
    """The end window (every thread stopped) writes the original bytes over a jump in
    one write, never the breakpoint first: a tracer killed inside the window leaves
    the jump or the file's code, not an int3 nobody serves."""
    prog = progs(exe, "spin", 2)
    before = exec_mappings(prog.pid)
    t = Tracer.attach(prog.pid)
    p = t.add_probe("probed", handler="count")
    run_until_hands_off(t)
    site, orig = p.site.addr, bytes(p.site.orig[:5])
    writes = []
    real_write = t.target.write

    real_many = t.target.write_many

    def write(addr, data):
        writes.append((addr, bytes(data)))
        return real_write(addr, data)

    def write_many(pairs):
        writes.extend((addr, bytes(data)) for addr, data in pairs)
        return real_many(pairs)
    t.target.write = write
    t.target.write_many = write_many
    t.detach()
    at_site = [d for a, d in writes if a <= site < a + len(d)]
    assert at_site == [orig], at_site
    assert exec_mappings(prog.pid) == before and ours_left(prog.pid) == []
    code, text = prog.finish()
    assert code == 0 and text.startswith("done calls=")


HOLDER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
pid = int(sys.argv[1])
PTRACE_SEIZE, PTRACE_DETACH = 0x4206, 17
if libc.ptrace(PTRACE_SEIZE, pid, 0, 0) != 0:
    sys.exit(f"seize: {os.strerror(ctypes.get_errno())}")
print("held", flush=True)
sys.stdin.readline()                 # until told: the tracer's end comes meanwhile
"""


def test_a_debugger_holding_the_process_at_the_end_exits_3(exe, progs):
    """Another tracer (as gdb -p) seizes the process while we are hands-off and holds
    it when the trace ends: the summary says the probes stay in place, exit status 3,
    and the program keeps running correctly with our jump in its code."""
    prog = progs(exe, "spin", 1)
    p = subprocess.Popen([*UPROBE_OPT, "trace", "-p", str(prog.pid), "probed",
                          "--handler", "count", "--duration", "3", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while "memfd:uprobe-opt" not in open(f"/proc/{prog.pid}/maps").read() \
            or tracer_pid(prog.pid) != 0:
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.01)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(prog.pid)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        out, err = p.communicate(timeout=60)
        assert p.returncode == 3, (out, err)
        assert f"is traced by process {holder.pid} now" in out, out
        assert "its probes stay in place" in out
        assert text_vs_file(prog.pid, exe) != []          # our jump is still there
    finally:
        holder.communicate("go\n", timeout=10)           # exits: the kernel detaches it
    c1, _ = prog.pause()
    assert c1 > 0
    code, out = prog.finish()
    assert code == 0 and out.startswith("done calls=")


def test_the_program_by_the_name_it_was_started_as(exe, progs, tmp_path):
    """`NAME:SYMBOL` where NAME is the program's own name through a symlink (as
    /usr/bin/redis-server -> redis-check-rdb): the main program, for list and trace
    alike (it was "unknown library" for list and a pending probe for trace)."""
    link = tmp_path / "linked-prog"
    link.symlink_to(exe)
    prog = progs(link, "spin", 1)
    p = subprocess.run([*UPROBE_OPT, "list", "-p", str(prog.pid), "linked-prog:probed"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "linked-prog:probed" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([*UPROBE_OPT, "trace", "-p", str(prog.pid), "linked-prog:probed",
                        "--handler", "count", "--duration", "0.5", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith("linked-prog:probed"))
    assert "optimized" in row and "pending" not in p.stdout
    assert int(row.split()[3]) > 0
    code, out = prog.finish()
    assert code == 0 and out.startswith("done calls=")
