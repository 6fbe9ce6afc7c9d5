"""Target layer against real processes (tests/c/tt.c), real ptrace, exact asserts."""
from __future__ import annotations

import fcntl
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from uprobe_opt.errors import (AccessDenied, PatchError, ProcessGone, TargetError,
                               UsageError)
from uprobe_opt.target import (MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, PROT_EXEC, ExecEvent,
                               PROT_READ, ExitEvent, Target, TrapEvent, read_maps)

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.timeout(60)


def build_c(name: str, outdir) -> str:
    """Compile tests/c/NAME.c with gcc into outdir; returns the binary's path."""
    out = os.path.join(str(outdir), name)
    subprocess.run(["gcc", "-O1", "-g", "-Wall", "-pthread", "-o", out,
                    os.path.join(HERE, "c", name + ".c")], check=True)
    return out


@pytest.fixture(scope="session")
def tt(tmp_path_factory):
    return build_c("tt", tmp_path_factory.mktemp("c"))


class Prog:
    """An untraced child (subprocess) with pipes; stdout is read without blocking."""

    def __init__(self, argv):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pid = self.p.pid
        self.first = self.p.stdout.readline().decode()       # "ready ..."
        fd = self.p.stdout.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.out = ""

    def read(self) -> str:
        try:
            while chunk := os.read(self.p.stdout.fileno(), 4096):
                self.out += chunk.decode()
        except BlockingIOError:
            pass
        return self.out

    def send(self, text: str) -> None:
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def close(self):
        try:
            self.p.kill()
        except ProcessLookupError:
            pass
        self.p.wait(timeout=10)


@pytest.fixture
def run(tt):
    """run(mode, arg) -> Prog; every Prog and Target is cleaned up afterwards."""
    progs, targets = [], []

    def start(*args):
        prog = Prog([tt, *map(str, args)])
        progs.append(prog)
        return prog
    start.targets = targets
    yield start
    for t in targets:
        t.kill()
    for prog in progs:
        prog.close()


def attach(run, pid) -> Target:
    t = Target.attach(pid)
    run.targets.append(t)
    return t


def pump(t: Target, cond, timeout=10.0) -> list:
    """Poll the target until cond(events_so_far) is true; returns all events seen."""
    events, deadline = [], time.monotonic() + timeout
    while not cond(events):
        assert time.monotonic() < deadline, f"timed out; events so far: {events}"
        events += t.poll(0.02)
    return events


def task_tids(pid) -> set[int]:
    return {int(x) for x in os.listdir(f"/proc/{pid}/task")}


def state(pid, tid=None) -> str:
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_states(pid, states: set[str], timeout=5.0) -> None:
    """Wait until the set of thread states of pid is exactly ``states``."""
    deadline = time.monotonic() + timeout
    while (now := {state(pid, x) for x in task_tids(pid)}) != states:
        assert time.monotonic() < deadline, now
        time.sleep(0.005)


def cpu_ns(pid) -> int:
    """Total CPU time of the process in ns (/proc/PID/schedstat summed over threads)."""
    total = 0
    for tid in task_tids(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return total


def got_exit(events) -> bool:
    return any(isinstance(e, ExitEvent) for e in events)


# ------------------------------------------------------------------------- attach
def test_attach_sees_every_thread(run):
    prog = run("threads", 8)
    t = attach(run, prog.pid)
    assert t.stopped is True
    assert t.tids == task_tids(prog.pid)
    assert len(t.tids) == 9
    assert {state(prog.pid, tid) for tid in t.tids} == {"t"}
    for tid in t.tids:
        assert t.get_regs(tid).rip != 0
    t.detach()
    assert not {state(prog.pid, tid) for tid in task_tids(prog.pid)} & {"t", "T"}


def test_attach_while_threads_churn(run):
    prog = run("churn")
    for _ in range(5):
        t0 = time.monotonic()
        t = Target.attach(prog.pid)
        took = time.monotonic() - t0
        try:
            assert t.stopped is True
            assert task_tids(prog.pid) == t.tids
            for tid in t.tids:
                t.get_regs(tid)
            t.resume_all()
            t.poll(0.05)
            t.stop_all()
            assert task_tids(prog.pid) == t.tids
        finally:
            t.detach()
        assert took < 2.0
        time.sleep(0.02)
    assert state(prog.pid) in "RS"
    with open(f"/proc/{prog.pid}/status") as f:
        assert "TracerPid:\t0\n" in f.read()


def test_unknown_pid_is_process_gone():
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 12345
    with pytest.raises(ProcessGone, match=str(pid)):
        Target.attach(pid)


def test_already_traced_is_access_denied(run):
    prog = run("threads", 1)
    t = attach(run, prog.pid)
    with pytest.raises(AccessDenied, match=f"process {prog.pid} is already traced by "
                                           f"process {os.getpid()}"):
        Target.attach(prog.pid)
    assert t.stopped is True


def test_permission_denied_names_the_fix(run):
    prog = run("threads", 1)
    code = ("import os, sys\n"
            "from uprobe_opt.target import Target\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n"
            "    Target.attach(int(sys.argv[1]))\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(prog.pid)], capture_output=True,
                         text=True, timeout=30).stdout
    assert out.startswith(f"AccessDenied cannot trace process {prog.pid}: ")
    assert "root" in out and "CAP_SYS_PTRACE" in out and "kernel.yama.ptrace_scope" in out
    with open(f"/proc/{prog.pid}/status") as f:
        assert "TracerPid:\t0\n" in f.read()
    assert not {state(prog.pid, x) for x in task_tids(prog.pid)} & {"t", "T"}


# ------------------------------------------------------------------------- quiescence
def test_stop_all_then_get_regs_each_thread(run):
    prog = run("threads", 16)
    t = attach(run, prog.pid)
    stops, resumes = [], []
    for _ in range(20):
        t0 = time.perf_counter()
        t.resume_all()
        resumes.append(time.perf_counter() - t0)
        assert t.stopped is False
        time.sleep(0.005)
        t0 = time.perf_counter()
        t.stop_all()
        stops.append(time.perf_counter() - t0)
        assert t.stopped is True
        assert t.tids == task_tids(prog.pid)
        assert {state(prog.pid, tid) for tid in t.tids} == {"t"}
        rips = {tid: t.get_regs(tid).rip for tid in t.tids}
        assert len(rips) == 17 and all(rips.values())
    xstate = t.get_xstate(prog.pid)
    assert len(xstate) >= 576                  # legacy 512-byte area + XSAVE header
    assert xstate[24:28] == (0x1f80).to_bytes(4, "little")   # MXCSR: default value
    print(f"\n16+1 threads: stop_all median {statistics.median(stops) * 1e3:.3f} ms, "
          f"resume_all median {statistics.median(resumes) * 1e3:.3f} ms")
    assert t.poll(0) == []


def test_stop_and_cont_of_traced_target(run):
    prog = run("threads", 4)
    t = attach(run, prog.pid)
    t.resume_all()
    os.kill(prog.pid, signal.SIGSTOP)
    pump(t, lambda evs: {state(prog.pid, x) for x in task_tids(prog.pid)} == {"t"})
    # Group-stopped under PTRACE_LISTEN: the kernel shows a tracee as "t", never "T"
    # (man 5 proc). It must not run:
    t.poll(0.1)
    before = cpu_ns(prog.pid)
    t.poll(0.2)
    assert cpu_ns(prog.pid) == before
    # stop_all/resume_all while job-control stopped keeps it stopped
    t.stop_all()
    t.resume_all()
    t.poll(0.1)
    before = cpu_ns(prog.pid)
    t.poll(0.2)
    assert cpu_ns(prog.pid) == before
    os.kill(prog.pid, signal.SIGCONT)
    pump(t, lambda evs: cpu_ns(prog.pid) > before + 10_000_000)
    assert not {state(prog.pid, x) for x in task_tids(prog.pid)} & {"t", "T"}
    t.detach()
    # untraced, SIGSTOP gives the ordinary "T"
    os.kill(prog.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while state(prog.pid) != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(prog.pid, signal.SIGCONT)


def test_detach_leaves_process_running(run):
    prog = run("threads", 4)
    handler = signal.getsignal(signal.SIGCHLD)
    t = attach(run, prog.pid)
    assert signal.getsignal(signal.SIGCHLD) is not handler
    t.resume_all()
    t.poll(0.05)
    t.detach()                                  # threads running: interrupted first
    t.detach()                                  # idempotent
    assert signal.getsignal(signal.SIGCHLD) is handler
    assert signal.set_wakeup_fd(-1) == -1       # our wakeup fd was removed
    time.sleep(0.05)
    assert not {state(prog.pid, x) for x in task_tids(prog.pid)} & {"t", "T"}
    before = cpu_ns(prog.pid)
    time.sleep(0.2)
    assert cpu_ns(prog.pid) > before + 10_000_000
    with open(f"/proc/{prog.pid}/status") as f:
        assert "TracerPid:\t0\n" in f.read()
    t2 = attach(run, prog.pid)                  # detached while stopped, too
    t2.detach()
    assert not {state(prog.pid, x) for x in task_tids(prog.pid)} & {"t", "T"}
    prog.send("go\n")
    assert prog.p.wait(timeout=10) == 0


# ------------------------------------------------------------------------- memory
def test_write_rx_text_and_read_back(run):
    prog = run("threads", 2)
    fn = int(prog.first.split("fn=")[1], 16)
    t = attach(run, prog.pid)
    (m,) = [m for m in t.maps() if m.contains(fn)]
    assert m.perms == "r-xp" and m.is_exec
    orig = t.read(fn, 16)
    t.write(fn, b"\xcc" * 16)
    assert t.read(fn, 16) == b"\xcc" * 16
    t.write(fn, orig)
    assert t.read(fn, 16) == orig
    with pytest.raises(PatchError) as exc:
        t.write(0x1000, b"x")
    assert exc.value.addr == 0x1000 and "0x1000" in str(exc.value)
    with pytest.raises(TargetError) as exc:
        t.read(0x1000, 8)
    assert exc.value.addr == 0x1000


# ------------------------------------------------------------------------- remote syscalls
def test_remote_mmap_munmap_rx_page(run):
    prog = run("threads", 2)
    t = attach(run, prog.pid)
    exe = os.path.realpath(f"/proc/{prog.pid}/exe")
    base = min(m.start for m in t.maps() if m.path == exe)
    hint = base - 0x10000
    prot, flags = PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
    t0 = time.perf_counter()
    assert t.mmap(hint, 4096, prot, flags) == hint
    took = time.perf_counter() - t0
    (m,) = [m for m in t.maps() if m.start == hint]
    assert (m.end, m.perms, m.path) == (hint + 4096, "r-xp", "")
    with pytest.raises(TargetError, match="File exists"):
        t.mmap(hint, 4096, prot, flags)
    t.write(hint, b"\x90\xc3")
    assert t.read(hint, 2) == b"\x90\xc3"
    t.munmap(hint, 4096)
    assert not [m for m in t.maps() if m.start <= hint < m.end]
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        assert t.syscall(39) == prog.pid                    # getpid
        times.append(time.perf_counter() - t0)
    print(f"\nremote mmap {took * 1e6:.0f} us, remote getpid median "
          f"{statistics.median(times) * 1e6:.0f} us")
    t.resume_all()
    t.poll(0.05)
    t.detach()
    prog.send("go\n")
    assert prog.p.wait(timeout=10) == 0


def _in_syscall(pid, tid, nr) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            return f.read().split()[0] == str(nr)
    except (FileNotFoundError, IndexError):
        return False


def _blocked_threads(pid, t=None):
    """(reader tid, sleeper tid) once one thread is in read() and one in nanosleep
    (clock_nanosleep, or restart_syscall after an interruption)."""
    deadline = time.monotonic() + 5
    while True:
        tids = sorted(task_tids(pid) - {pid})
        readers = [x for x in tids if _in_syscall(pid, x, 0)]
        sleepers = [x for x in tids if _in_syscall(pid, x, 230) or _in_syscall(pid, x, 219)]
        if readers and sleepers:
            return readers[0], sleepers[0]
        assert time.monotonic() < deadline
        if t is None:
            time.sleep(0.01)
        else:
            t.poll(0.01)


def _inject_all_kinds(t, pid, tids):
    for tid in tids:
        before = t.get_regs(tid)
        assert t.syscall(39, tid=tid) == pid
        addr = t.mmap(0, 8192, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS)
        t.munmap(addr, 8192)
        after = t.get_regs(tid)
        assert bytes(after) == bytes(before)                # orig_rax included


def test_remote_syscall_in_threads_blocked_in_read_and_nanosleep(run):
    prog = run("block")
    tids = _blocked_threads(prog.pid)
    t = attach(run, prog.pid)                    # interrupt-stops inside the syscalls
    _inject_all_kinds(t, prog.pid, tids)
    t.resume_all()
    tids = _blocked_threads(prog.pid, t)
    t.stop_all()
    _inject_all_kinds(t, prog.pid, tids)
    t.resume_all()
    t.poll(0.1)
    prog.send("hello\n")
    pump(t, got_exit)
    assert t.exited and os.WEXITSTATUS(t.exit_status) == 0
    out = prog.read()
    assert "READ rc=6 errno=0 data=hello\n" in out
    sleep = [line for line in out.splitlines() if line.startswith("SLEEP")][0]
    assert sleep.startswith("SLEEP rc=0 errno=0 elapsed=")
    assert 1.5 <= float(sleep.split("elapsed=")[1]) < 3.0


# ------------------------------------------------------------------------- spawn
def _auxv_entry(pid) -> int:
    with open(f"/proc/{pid}/auxv", "rb") as f:
        raw = f.read()
    words = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
    return dict(zip(words[0::2], words[1::2]))[9]


def test_spawn_stops_at_entry_with_libraries_mapped(tt):
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    t = Target.spawn([tt, "exit", "3"], stdin=r, stdout=out_w)
    os.close(r)
    os.close(out_w)
    try:
        assert t.stopped is True and t.tids == {t.pid}
        assert t.get_regs(t.pid).rip == _auxv_entry(t.pid)
        paths = {os.path.basename(m.path) for m in read_maps(t.pid)}
        assert "libc.so.6" in paths
        with open(f"/proc/{t.pid}/status") as f:
            assert f"TracerPid:\t{os.getpid()}\n" in f.read()
        t.resume_all()
        os.write(w, b"go\n")
        events = pump(t, got_exit)
        assert events[-1] == ExitEvent(t.exit_status)
        assert t.exited is True and os.WIFEXITED(t.exit_status)
        assert os.WEXITSTATUS(t.exit_status) == 3
        assert os.read(out_r, 100) == b"ready\n"
    finally:
        t.kill()
        os.close(w)
        os.close(out_r)


def test_spawn_missing_or_not_executable(tmp_path):
    with pytest.raises(UsageError, match="command not found: 'no-such-cmd-xyz'"):
        Target.spawn(["no-such-cmd-xyz"])
    with pytest.raises(UsageError, match="no such file"):
        Target.spawn([str(tmp_path / "missing")])
    plain = tmp_path / "plain"
    plain.write_text("data")
    with pytest.raises(UsageError, match="not an executable"):
        Target.spawn([str(plain)])
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x7fELF garbage")
    bad.chmod(0o755)
    with pytest.raises(TargetError, match="Exec format error"):
        Target.spawn([str(bad)])


def test_kill_spawned(tt):
    null = os.open(os.devnull, os.O_WRONLY)
    r, w = os.pipe()                    # "threads" exits on EOF of stdin: keep it open
    t = Target.spawn([tt, "threads", "3"], stdin=r, stdout=null)
    os.close(null)
    os.close(r)
    pid = t.pid
    t.resume_all()
    t.poll(0.1)
    t.kill()
    assert t.exited is True and os.WTERMSIG(t.exit_status) == signal.SIGKILL
    assert not os.path.exists(f"/proc/{pid}")
    t.kill()
    t.detach()
    os.close(w)


# ------------------------------------------------------------------------- signals
def test_signals_delivered_exactly_once(run):
    prog = run("sigcount")
    t = attach(run, prog.pid)
    t.resume_all()
    for i in range(1, 11):
        os.kill(prog.pid, signal.SIGUSR1)
        if i % 2 == 0:                  # half of them race with a stop_all
            t.stop_all()
            t.resume_all()
        pump(t, lambda evs: prog.read().count("u") == i)
    os.kill(prog.pid, signal.SIGUSR2)
    events = pump(t, got_exit)
    assert [type(e) for e in events] == [ExitEvent]
    assert os.WEXITSTATUS(t.exit_status) == 0
    assert prog.read() == "u" * 10 + "\ncount=10\n"


def test_own_int3_and_sigtrap_handler(run):
    prog = run("int3")
    t = attach(run, prog.pid)
    t.resume_all()
    os.kill(prog.pid, signal.SIGTRAP)            # si_code SI_USER: re-injected, no event
    assert t.poll(0.2) == []
    prog.send("go\n")
    events = pump(t, lambda evs: evs)
    assert events == [TrapEvent(prog.pid)]
    assert t.read(t.get_regs(prog.pid).rip - 1, 1) == b"\xcc"
    t.resume(prog.pid, signal.SIGTRAP)           # not ours: deliver it unchanged
    events = pump(t, got_exit)
    assert [type(e) for e in events] == [ExitEvent]
    assert os.WEXITSTATUS(t.exit_status) == 0
    assert prog.read() == "handled=2\n"


def test_poll_returns_early_on_tracer_signal(run):
    prog = run("threads", 1)
    t = attach(run, prog.pid)
    t.resume_all()
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        t0 = time.monotonic()
        assert t.poll(10.0) == []
        assert time.monotonic() - t0 < 2.0
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_foreign_children_keep_their_exit_status(run):
    prog = run("threads", 2)
    t = attach(run, prog.pid)
    t.resume_all()
    other = subprocess.Popen(["sh", "-c", "exit 7"])
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.3:
        t.poll(0.05)
    assert other.wait(timeout=5) == 7


# ------------------------------------------------------------------------- fork / exit
def test_fork_child_survives(run):
    prog = run("fork")
    t = attach(run, prog.pid)
    t.resume_all()
    prog.send("go\n")
    events = pump(t, got_exit)
    assert [type(e) for e in events] == [ExitEvent]
    assert os.WEXITSTATUS(t.exit_status) == 0
    assert prog.read() == "child ok\nchild exited=1 code=0\n"


def test_fork_hook_sees_child_memory(run):
    prog = run("fork")
    t = attach(run, prog.pid)
    seen = []

    def hook(child):
        seen.append((child.pid, child.read(stack_addr, 8)))
    stack_addr = t.get_regs(prog.pid).rsp
    expect = t.read(stack_addr, 8)
    t.fork_hook = hook
    t.resume_all()
    prog.send("go\n")
    pump(t, got_exit)
    assert len(seen) == 1 and seen[0][0] != prog.pid
    assert prog.read() == "child ok\nchild exited=1 code=0\n"
    assert len(seen[0][1]) == len(expect) == 8


def test_exit_event_of_attached_process(run):
    prog = run("exit", 5)
    t = attach(run, prog.pid)
    t.resume_all()
    prog.send("go\n")
    events = pump(t, got_exit)
    assert events == [ExitEvent(t.exit_status)]
    assert t.exited is True and os.WEXITSTATUS(t.exit_status) == 5
    assert t.tids == frozenset() and t.stopped is False
    assert t.poll(0) == []
    t.detach()


# ------------------------------------------------------------------------- vfork / exec
def test_vfork_child_execs(run):
    prog = run("vfork", 0)
    t = attach(run, prog.pid)
    t.resume_all()
    prog.send("go\n")
    events = pump(t, got_exit)
    assert [type(e) for e in events] == [ExitEvent]
    assert os.WEXITSTATUS(t.exit_status) == 0
    assert prog.read() == "vfork child code=4\n"


def test_vfork_child_int3_is_a_trap_event_of_the_child(run):
    prog = run("vfork", 1)
    t = attach(run, prog.pid)
    t.resume_all()
    prog.send("go\n")
    events = pump(t, lambda evs: evs)
    assert len(events) == 1 and isinstance(events[0], TrapEvent)
    child = events[0].tid
    assert child != prog.pid and child in t.tids
    with open(f"/proc/{child}/status") as f:
        assert f"PPid:\t{prog.pid}\n" in f.read()
    t.stop_all()                                # the vfork parent need not stop
    assert t.get_regs(child).rip
    t.resume_all()                              # the held trap stays held ...
    assert t.poll(0.1) == []
    t.resume(child)                             # ... until resumed: int3 is 1 byte
    events = pump(t, got_exit)
    assert [type(e) for e in events] == [ExitEvent]
    assert child not in t.tids
    assert prog.read() == "vfork child code=4\n"


@pytest.mark.parametrize("from_thread", [0, 1])
def test_exec_then_exit(run, from_thread):
    prog = run("exec", from_thread)
    t = attach(run, prog.pid)
    t.resume_all()
    prog.send("go\n")
    events = pump(t, got_exit)
    assert [type(e) for e in events] == [ExecEvent, ExitEvent]
    assert events[0].tid == prog.pid
    assert os.WEXITSTATUS(t.exit_status) == 6


def test_exec_event_keeps_target_usable(run):
    prog = run("exec", 1)
    t = attach(run, prog.pid)
    t.resume_all()
    prog.send("go\n")
    deadline = time.monotonic() + 10
    while True:
        evs = t.poll(0.02)
        if evs:
            break
        assert time.monotonic() < deadline
    assert evs[0] == ExecEvent(prog.pid)
    if not t.exited:
        try:
            t.stop_all()
            maps = t.maps()
            if not t.exited:
                assert any(m.path.endswith("/sh") or "dash" in m.path or "bash" in m.path
                           for m in maps)
                t.resume_all()
        except ProcessGone:
            pass
    pump(t, lambda e: t.exited)
    assert os.WEXITSTATUS(t.exit_status) == 6


# ------------------------------------------------------------------------- odd shapes
def test_zombie_leader(run):
    prog = run("zombie_leader")
    deadline = time.monotonic() + 5
    while state(prog.pid) != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t = attach(run, prog.pid)
    workers = task_tids(prog.pid) - {prog.pid}
    assert len(workers) == 3
    assert t.tids == workers and t.stopped is True
    assert t.syscall(39) == prog.pid
    t.resume_all()
    t.poll(0.05)
    t.stop_all()
    t.detach()
    assert state(prog.pid) == "Z"
    assert not {state(prog.pid, x) for x in workers} & {"t", "T"}


def test_target_on_a_worker_thread(run):
    import threading
    prog = run("threads", 2)
    result = {}

    def work():
        t = Target.attach(prog.pid)
        result["target"] = t
        t.resume_all()
        os.kill(prog.pid, signal.SIGWINCH)   # ignored signal
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.2:
            t.poll(0.05)
        t.stop_all()
        result["tids"] = t.tids
        t.detach()
    th = threading.Thread(target=work)
    th.start()
    th.join(30)
    assert result["tids"] == task_tids(prog.pid)
    with pytest.raises(UsageError, match="thread"):
        result["target"].stop_all()
    assert state(prog.pid) in "RS"


def test_detach_with_undelivered_trap(run):
    prog = run("int3")
    t = attach(run, prog.pid)
    t.resume_all()
    prog.send("go\n")
    assert pump(t, lambda evs: evs) == [TrapEvent(prog.pid)]
    t.detach()                          # int3 still there: the program gets its SIGTRAP
    assert prog.p.wait(timeout=10) == 0
    assert prog.read() == "handled=1\n"


def test_detach_with_trap_whose_int3_was_removed(run):
    prog = run("int3")
    t = attach(run, prog.pid)
    t.resume_all()
    prog.send("go\n")
    assert pump(t, lambda evs: evs) == [TrapEvent(prog.pid)]
    rip = t.get_regs(prog.pid).rip
    t.write(rip - 1, b"\x90")           # "probe removed": rip is rewound onto the nop
    t.detach()
    assert prog.p.wait(timeout=10) == 0
    assert prog.read() == "handled=0\n"


def test_job_control_stop_survives_syscall_and_detach(run):
    prog = run("threads", 2)
    t = attach(run, prog.pid)
    t.resume_all()
    os.kill(prog.pid, signal.SIGSTOP)
    pump(t, lambda evs: {state(prog.pid, x) for x in task_tids(prog.pid)} == {"t"})
    t.stop_all()
    for tid in t.tids:
        assert t.syscall(39, tid=tid) == prog.pid
    t.resume_all()
    t.poll(0.1)
    before = cpu_ns(prog.pid)
    t.poll(0.2)
    assert cpu_ns(prog.pid) == before
    t.detach()                          # still job-control stopped, now as plain "T"
    wait_states(prog.pid, {"T"})        # detached threads are kicked, then re-stop
    os.kill(prog.pid, signal.SIGCONT)
    time.sleep(0.1)
    assert cpu_ns(prog.pid) > before


def test_signals_around_attach_and_detach_are_not_lost(run):
    prog = run("sigcount")

    def wait_count(n):
        deadline = time.monotonic() + 5
        while prog.read().count("u") < n:
            assert time.monotonic() < deadline, prog.read()
            time.sleep(0.005)
        assert prog.read().count("u") == n
    for i in range(1, 6):
        os.kill(prog.pid, signal.SIGUSR1)       # pending while we attach
        Target.attach(prog.pid).detach()
        wait_count(2 * i - 1)
        t = Target.attach(prog.pid)
        os.kill(prog.pid, signal.SIGUSR1)       # arrives while all stopped
        t.detach()
        wait_count(2 * i)
    os.kill(prog.pid, signal.SIGUSR2)
    assert prog.p.wait(timeout=10) == 0
    assert prog.read().endswith("\ncount=10\n")


def test_leader_exits_while_traced(run):
    prog = run("zombie_leader", 1)
    t = attach(run, prog.pid)
    t.resume_all()
    prog.send("go\n")
    deadline = time.monotonic() + 5
    while state(prog.pid) != "Z":
        assert time.monotonic() < deadline
        t.poll(0.01)
    t.stop_all()                                # does not wait for the zombie leader
    workers = task_tids(prog.pid) - {prog.pid}
    assert t.tids == workers and len(workers) == 3 and t.stopped is True
    assert t.syscall(39) == prog.pid
    assert any(m.path == "[stack]" for m in t.maps())
    t.resume_all()
    t.poll(0.05)
    os.kill(prog.pid, signal.SIGTERM)
    events = pump(t, got_exit)
    assert [type(e) for e in events] == [ExitEvent]
    assert os.WIFSIGNALED(t.exit_status) and os.WTERMSIG(t.exit_status) == signal.SIGTERM


def test_many_threads_trapping_at_once(run):
    prog = run("int3threads", 16)
    t = attach(run, prog.pid)
    t.resume_all()
    prog.send("go\n")
    per_tid: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while not t.exited:
        assert time.monotonic() < deadline
        for e in t.poll(0.1):
            if isinstance(e, TrapEvent):
                per_tid[e.tid] = per_tid.get(e.tid, 0) + 1
                if len(per_tid) == 3 and per_tid[e.tid] == 1:
                    t.stop_all()                # a stop_all in the middle of the storm
                    t.resume_all()
                t.resume(e.tid)
    assert os.WEXITSTATUS(t.exit_status) == 0
    assert len(per_tid) == 16 and set(per_tid.values()) == {200}
    assert prog.read() == "done 3200\n"
