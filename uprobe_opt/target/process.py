"""The traced target process: threads, quiescence, memory, registers, remote syscalls.

One :class:`Target` per process. All ptrace requests are made by the OS thread that
created it (``man 2 ptrace``: the tracer is a thread, not a process); public methods
check this. The only wait loop is :meth:`Target._wait`. It never reaps with
``waitpid(-1)``: ``waitid(P_ALL, WNOWAIT)`` names the next waitable task and only *our*
tids are then reaped, with ``waitpid(tid, WNOHANG | __WALL)``, so other children of the
tracer (e.g. subprocess.Popen ones) keep their exit statuses. It sleeps in ``select()``
on a ``signal.set_wakeup_fd`` pipe that SIGCHLD writes to; off the main thread (no
wakeup fd possible) it falls back to sleeping 1 ms between reaps.

Thread bookkeeping (one :class:`_Thread` per traced task):
  * ``stopped``: in a ptrace-stop we reaped and have not ended;
  * ``new``: auto-attached (TRACECLONE/VFORK), its initial stop not reaped yet;
  * ``held``: holds an undelivered :class:`TrapEvent` (resume_all skips it);
  * ``group_stop``: stopped as part of a job-control stop: resumed with LISTEN;
  * ``sigs``: signals to deliver when resumed (first through CONT, others with tgkill).

Addresses are absolute virtual addresses in the target; sizes are bytes; timeouts seconds.
"""
from __future__ import annotations

import errno
import functools
import os
import select
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Union

from ..errors import (AccessDenied, PatchError, ProbeError, ProcessGone, TargetError,
                      TargetExited, ThreadGone, UsageError)
from . import _ptrace as pt
from . import seccomp
from .maps import Mapping, read_maps

__all__ = ["Target", "ForkedChild", "TrapEvent", "ExitEvent", "ExecEvent", "Event",
           "wait_any",
           "PROT_READ", "PROT_WRITE", "PROT_EXEC", "MAP_PRIVATE", "MAP_SHARED",
           "MAP_ANONYMOUS", "MAP_FIXED", "MAP_FIXED_NOREPLACE"]

# <sys/mman.h> values for x86-64 (the mmap module lacks MAP_FIXED*).
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_FIXED_NOREPLACE = 0x100000
SYS_MMAP, SYS_MPROTECT, SYS_MUNMAP = 9, 10, 11
_SYS_CLONE, _SYS_FORK, _SYS_VFORK, _SYS_CLONE3 = 56, 57, 58, 435
CLONE_VM, CLONE_VFORK, CLONE_THREAD = 0x100, 0x4000, 0x10000
AT_ENTRY = 9

_U64 = (1 << 64) - 1
_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class TrapEvent:
    """Thread ``tid`` executed an int3 (SIGTRAP with si_code SI_KERNEL); rip is past it.
    The thread stays stopped until ``resume(tid)`` or ``resume(tid, signal.SIGTRAP)``."""
    tid: int


@dataclass(frozen=True)
class ExitEvent:
    """The whole process is gone; ``status`` is the leader's raw wait status (None if it
    was reaped by someone else)."""
    status: int | None


@dataclass(frozen=True)
class ExecEvent:
    """The process exec'd (``tid`` is its pid); the old image, and every patch, is gone.
    The thread is resumed (kept stopped if inside stop_all)."""
    tid: int


Event = Union[TrapEvent, ExitEvent, ExecEvent]


@dataclass(eq=False)
class _Thread:
    tid: int
    proc: int                      # tgid of its process (ours, or a vfork child's)
    stopped: bool = False
    new: bool = False
    held: bool = False
    group_stop: bool = False
    zombie: bool = False           # exited leader waiting for its threads (pthread_exit)
    vfork_child: int | None = None  # blocked in vfork() until that child execs/exits
    exec_hold: bool = False        # held in its exec stop (hold_exec) until run_to_entry
    trap_rip: int | None = None    # rip when the held TrapEvent was reported
    regs: object = None            # registers read at this stop (valid until it resumes)
    sigs: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- errno boundary
def _translate(exc: OSError, pid: int) -> TargetError:
    tid = getattr(exc, "tid", None)
    what = str(exc)
    if exc.errno in (errno.ESRCH, errno.ENOENT, errno.ECHILD):
        if tid is not None and tid != pid:
            return ThreadGone(f"thread {tid} of process {pid} is gone ({what})",
                              pid=pid, tid=tid)
        return ProcessGone(f"process {pid} is gone ({what})", pid=pid, tid=tid)
    if exc.errno in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"access to process {pid} denied ({what})", pid=pid, tid=tid)
    return TargetError(f"operation on process {pid} failed ({what})", pid=pid, tid=tid)


def _boundary(fn):
    """Public-method decorator: enforce the tracer thread, translate errno (the only
    place OSError becomes a uprobe_opt.errors exception)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if threading.get_ident() != self._owner:
            raise UsageError(f"Target({self.pid}).{fn.__name__} called from a thread other "
                             "than the one that created it (ptrace is per-thread)",
                             pid=self.pid)
        try:
            return fn(self, *args, **kwargs)
        except ProbeError:
            raise
        except OSError as exc:
            raise _translate(exc, self.pid) from exc
    return wrapper


def _esrch(exc: OSError) -> bool:
    return exc.errno == errno.ESRCH


# --------------------------------------------------------------------------- /proc helpers
def _read_status(path: str) -> dict[str, str] | None:
    """Parse /proc/.../status into a dict; None if the task does not exist."""
    try:
        with open(path) as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return None


def _task_state(pid: int, tid: int) -> str:
    """One-letter state of a thread ('X' if gone), see ``man 5 proc`` /proc/pid/stat."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "X"


def _zombie_status(pid: int) -> int | None:
    """The wait status of a zombie not reaped yet: field 52 (``exit_code``, "in the
    form reported by waitpid(2)", since Linux 3.5) of /proc/PID/stat, man 5 proc;
    None once it is reaped (or not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if len(fields) < 50 or fields[0] != "Z":
        return None
    return int(fields[49])


def _list_tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} is gone", pid=pid) from None


def _ptrace_scope() -> str:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return f.read().strip()
    except OSError:
        return "absent"


def _denied_message(pid: int) -> str:
    return (f"cannot trace process {pid}: ptrace(PTRACE_SEIZE) was denied (EPERM). Run as "
            "root or with CAP_SYS_PTRACE, and check kernel.yama.ptrace_scope "
            f"(currently {_ptrace_scope()})")


def _is_kernel_thread(pid: int, st: dict[str, str]) -> bool:
    """Kernel threads have no memory map (no VmSize line; PF_KTHREAD in /proc/PID/stat
    flags, include/linux/sched.h)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            flags = int(f.read().rsplit(")", 1)[1].split()[6])
        return bool(flags & 0x00200000)
    except (OSError, ValueError, IndexError):
        return "VmSize" not in st


def check_user_process(pid: int) -> None:
    """ProcessGone/UsageError unless ``pid`` is a live user-space process (not a
    thread id, a zombie or a kernel thread).  For tools that only read /proc."""
    st = _read_status(f"/proc/{pid}/status") if pid > 0 else None
    if st is None:
        raise ProcessGone(f"no process with pid {pid}", pid=pid)
    if st["State"][0] in "ZX" and len(_list_tasks(pid)) <= 1:
        raise ProcessGone(f"process {pid} is a zombie (already exited)", pid=pid)
    if _is_kernel_thread(pid, st):
        raise UsageError(f"process {pid} ({st.get('Name', '?')}) is a kernel thread: it "
                         "has no user-space code to probe", pid=pid)


def _check_attachable(pid: int) -> None:
    """Raise before touching anything if ``pid`` cannot be attached."""
    if pid == os.getpid():
        raise UsageError("uprobe-opt cannot trace its own process", pid=pid)
    st = _read_status(f"/proc/{pid}/status") if pid > 0 else None
    if st is None:
        raise ProcessGone(f"no process with pid {pid}", pid=pid)
    if int(st["Tgid"]) != pid:
        raise UsageError(f"{pid} is a thread of process {st['Tgid']}; give the process id",
                         pid=pid)
    if st["State"][0] in "ZX" and len(_list_tasks(pid)) <= 1:
        raise ProcessGone(f"process {pid} is a zombie (already exited)", pid=pid)
    if _is_kernel_thread(pid, st):
        raise UsageError(f"process {pid} ({st.get('Name', '?')}) is a kernel thread: it "
                         "has no user-space code to probe", pid=pid)
    if st.get("Seccomp", "0").strip() == "1":
        raise seccomp.strict_refusal(pid)
    tracer = int(st["TracerPid"])
    if tracer:
        tst = _read_status(f"/proc/{tracer}/status") or {"Name": "?"}
        raise AccessDenied(f"process {pid} is already traced by process {tracer} "
                           f"({tst['Name']}); detach that tracer first", pid=pid)


def _live_task(pid: int) -> int | None:
    """None when the leader is alive (use /proc/PID/mem), else a live thread's tid:
    a zombie leader (pthread_exit) has no mm, its threads do."""
    if _task_state(pid, pid) not in "ZX":
        return None
    return next((t for t in _list_tasks(pid) if _task_state(pid, t) not in "ZX"), None)


def _read_auxv(pid: int) -> dict[int, int]:
    with open(f"/proc/{pid}/auxv", "rb") as f:
        raw = f.read()
    words = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw) - 7, 8)]
    return dict(zip(words[0::2], words[1::2]))


def _signed(value: int) -> int:
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


# --------------------------------------------------------------------------- memory
class _Memory:
    """Reads and writes through one /proc/PID/mem fd (works on r-x text: FOLL_FORCE)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.fd: int | None = None

    def open(self, tid: int | None = None) -> None:
        """Open /proc/PID/mem, or /proc/PID/task/TID/mem (a zombie leader has no mm)."""
        self.close()
        path = f"/proc/{self.pid}/mem" if tid is None else f"/proc/{self.pid}/task/{tid}/mem"
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessGone(f"process {self.pid} is gone", pid=self.pid) from None
        except PermissionError:
            raise AccessDenied(f"cannot open /proc/{self.pid}/mem: permission denied",
                               pid=self.pid) from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes at ``addr``; TargetError (with addr) on EIO or a short read."""
        if self.fd is None:
            self.open()
        try:
            data = os.pread(self.fd, size, addr)
        except OSError as exc:
            raise TargetError(f"cannot read {size} bytes at {addr:#x} in process "
                              f"{self.pid}: {exc.strerror}", pid=self.pid, addr=addr) from exc
        if not data and size:
            # pread of /proc/PID/mem returns 0 only once the address space is gone (an
            # unmapped address is EIO): the process exited, or exec'd (this fd keeps
            # the old mm, so nothing is ever read from or written to the new image).
            raise ProcessGone(f"process {self.pid} is gone: its address space no longer "
                              "exists", pid=self.pid, addr=addr)
        if len(data) != size:
            raise TargetError(f"short read at {addr:#x} in process {self.pid}: got "
                              f"{len(data)} of {size} bytes", pid=self.pid, addr=addr)
        return data

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr`` and read it back; PatchError on any failure."""
        self.write_many([(addr, data)])

    def write_many(self, pairs: list[tuple[int, bytes]]) -> None:
        """Write each (addr, data) of ``pairs``, then read every one back (one read
        per run of nearby writes).  Raises PatchError (its ``done``: how many pairs,
        from the first, were written and read back whole) or ProcessGone (the address
        space is gone)."""
        if self.fd is None:
            self.open()
        for i, (addr, data) in enumerate(pairs):
            try:
                done = os.pwrite(self.fd, data, addr)
            except OSError as exc:
                raise _partial(PatchError(
                    f"cannot write {len(data)} bytes at {addr:#x} in process "
                    f"{self.pid}: {exc.strerror}", pid=self.pid, addr=addr), i) from exc
            if done == 0 and data:
                raise ProcessGone(f"process {self.pid} is gone: its address space no "
                                  "longer exists", pid=self.pid, addr=addr)
            if done != len(data):
                raise _partial(PatchError(
                    f"short write at {addr:#x} in process {self.pid}: {done} of "
                    f"{len(data)} bytes", pid=self.pid, addr=addr), i)
        # Read back in runs: writes less than a page apart share one read (every
        # byte between lies on a page written to, so it is mapped).
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])
        runs: list[list] = []                   # [lo, hi, [pair indexes]]
        for i in order:
            addr, data = pairs[i]
            if runs and addr - runs[-1][1] < 4096:
                runs[-1][1] = max(runs[-1][1], addr + len(data))
                runs[-1][2].append(i)
            else:
                runs.append([addr, addr + len(data), [i]])
        bad = []
        for lo, hi, members in runs:
            try:
                got = self.read(lo, hi - lo)
            except ProcessGone:
                raise
            except TargetError:
                got = b""                       # every write of the run is unproven
            for i in members:
                addr, data = pairs[i]
                if got[addr - lo:addr - lo + len(data)] != bytes(data):
                    bad.append((i, got[addr - lo:addr - lo + len(data)]))
        if bad:
            i, got = min(bad)
            addr, data = pairs[i]
            raise _partial(PatchError(f"write at {addr:#x} in process {self.pid} read "
                                      f"back {got.hex()} instead of {bytes(data).hex()}",
                                      pid=self.pid, addr=addr), i)


def _partial(error: PatchError, done: int) -> PatchError:
    error.done = done
    return error


class ForkedChild:
    """A freshly forked child of the target, stopped, passed to ``Target.fork_hook``.

    It has its own copy of the parent's memory (inherited int3s included); ``read`` and
    ``write`` go through /proc/CHILD/mem. After the hook returns the Target detaches it,
    unless the hook called :meth:`adopt` (``strace -f``).
    """

    def __init__(self, pid: int, sig: int = 0, parent: int | None = None,
                 exec_stop: bool = False):
        self.pid = pid
        self.parent = parent            # pid of the process that forked it
        self._sig = sig                 # the signal it stopped with (0: an event stop)
        self.exec_stop = exec_stop      # a vfork child in the exec stop of its execve
        self._mem = _Memory(pid)
        self.adopted: "Target | None" = None

    def adopt(self) -> "Target":
        """Keep tracing the child: a :class:`Target` of its own, every thread (its
        one) stopped before its first instruction after fork(), as if ``stop_all``
        had run; ``resume_all`` lets it run.  The child was auto-attached by the
        kernel (PTRACE_O_TRACEFORK, ``man 2 ptrace``): nothing is seized."""
        if self.adopted is None:
            self.adopted = Target._adopt_child(self.pid, self._sig, self.exec_stop)
        return self.adopted

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes at ``addr`` in the child; raises TargetError."""
        return self._mem.read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        """Write and read back ``data`` at ``addr`` in the child; raises PatchError."""
        self._mem.write(addr, data)

    def close(self) -> None:
        self._mem.close()


# --------------------------------------------------------------------------- wakeup pipe
class _Wakeup:
    """Process-wide SIGCHLD wakeup: a no-op Python SIGCHLD handler (chaining any previous
    one) plus ``signal.set_wakeup_fd`` on a non-blocking pipe, shared by all Targets.
    Only possible on the main thread; elsewhere acquire() returns False and
    Target._wait polls every ms instead. Replaces any wakeup fd set before (asyncio's!)
    until the last Target is closed."""
    users = 0
    rfd = wfd = -1
    old_fd = -1
    old_handler = None

    @classmethod
    def acquire(cls) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        if cls.users == 0:
            cls.rfd, cls.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            cls.old_handler = signal.getsignal(signal.SIGCHLD)
            signal.signal(signal.SIGCHLD, cls._on_sigchld)
            cls.old_fd = signal.set_wakeup_fd(cls.wfd, warn_on_full_buffer=False)
        cls.users += 1
        return True

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0:
            signal.set_wakeup_fd(cls.old_fd)
            old = cls.old_handler
            signal.signal(signal.SIGCHLD, old if old is not None else signal.SIG_DFL)
            os.close(cls.rfd)
            os.close(cls.wfd)
            cls.rfd = cls.wfd = -1

    @classmethod
    def _on_sigchld(cls, signum, frame) -> None:
        if callable(cls.old_handler):
            cls.old_handler(signum, frame)

    @classmethod
    def drain(cls) -> bool:
        """Empty the pipe; True if a signal other than SIGCHLD was among the bytes."""
        foreign = False
        while True:
            try:
                data = os.read(cls.rfd, 512)
            except BlockingIOError:
                return foreign
            if not data:
                return foreign
            foreign = foreign or any(b != signal.SIGCHLD for b in data)


class _Urgency:
    """The tracer's thread at real-time priority (SCHED_FIFO 1) while it keeps the
    target stopped: on a busy machine a window otherwise lasts several times its CPU
    time, the tracer waiting for a CPU behind every runnable task while the target
    cannot run (``man 7 sched``).  Needs CAP_SYS_NICE (or RLIMIT_RTPRIO); without it
    nothing changes.  Bounded: a window is milliseconds, and the kernel's real-time
    throttling (sched_rt_runtime_us) leaves the other tasks a share even then."""

    def __init__(self):
        self.saved: tuple | None = None          # (policy, priority) to go back to

    def raise_(self) -> None:
        if self.saved is not None:
            return
        try:
            policy, prio = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
            if policy != os.SCHED_OTHER:
                return                           # the user chose a policy: keep it
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError:
            return
        self.saved = (policy, prio)

    def lower(self) -> None:
        if self.saved is None:
            return
        policy, prio = self.saved
        self.saved = None
        try:
            os.sched_setscheduler(0, policy, os.sched_param(prio))
        except OSError:
            pass



# --------------------------------------------------------------------------- Target
class Target:
    """A traced process. Build with :meth:`attach` or :meth:`spawn`; see docs/internals.md.

    ``thread_hook``: callable ``(tid) -> None`` run at the first stop of every thread we
    trace (the thread is stopped: its registers can be read).
    ``fork_hook``: callable ``(ForkedChild) -> None`` run inside poll when a traced thread
    forks; None just detaches the child.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.exited = False
        self.exit_status: int | None = None
        self.exec_count = 0                # execs of the process seen so far
        self._write_gen = 0                # exec_count that write()/syscall() accept
        self.fork_hook: Callable[[ForkedChild], None] | None = None
        # True: a thread that exec'd stays stopped in its exec stop (resume_all too)
        # until run_to_entry(), so probes can be armed in the new image before it runs
        self.hold_exec = False
        # (ForkedChild) -> None: a vfork (CLONE_VM) child traced as our task exec'd and
        # is a process of its own now, stopped in its exec stop; it may adopt it
        # (held until run_to_entry).  None: it is detached.
        self.exec_child_hook: Callable[[ForkedChild], None] | None = None
        self.thread_hook: Callable[[int], None] | None = None
        self._owner = threading.get_ident()
        self._threads: dict[int, _Thread] = {}
        self._events: list[Event] = []
        self._all_stopped = False
        self._mem = _Memory(pid)
        self._gadget: int | None = None
        self._closed = False
        self._leader_gone = False          # zombie leader at attach: not traced
        self._released = False             # no thread traced: hands-off (see release)
        self.exited_released = False       # the process ended while released
        self._child = False                # spawned by us: waitpid works untraced
        self._pidfd: int | None = None     # os.pidfd_open(pid) while released
        self._exec_probe: int | None = None  # a readable address of the mm we know
        self._window = 0                   # stop_all calls (seccomp filters re-read)
        self._filters = None               # ((tid, window), cBPF programs)
        self._wakeup = _Wakeup.acquire()
        self._urgency = _Urgency()         # while every thread is stopped
        self._runs = 0                     # resumes, stops, seizes, execs (generation)
        self._writes = 0                   # writes through write() (generation)
        self._stopped_at = None            # (_runs, threads) when stopped was true
        self._foreign = False              # a tracer signal drained outside _wait

    def __repr__(self) -> str:
        return f"<Target pid={self.pid} threads={len(self._threads)} exited={self.exited}>"

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ properties
    @property
    def tids(self) -> frozenset[int]:
        """Live traced thread ids (vfork children still sharing our memory included)."""
        return frozenset(t.tid for t in self._threads.values() if not t.zombie)

    @property
    def released(self) -> bool:
        """True while no thread is traced (before the first stop_all of a Target
        attached with ``stop=False``, and after :meth:`release`)."""
        return self._released

    def hurry(self) -> None:
        """The tracer's thread at real-time priority until the next resume_all,
        release or detach (see _Urgency): for the int3 stage, when a thread that
        meets a breakpoint waits for us."""
        self._urgency.raise_()

    def unhurry(self) -> None:
        self._urgency.lower()

    @property
    def generation(self) -> tuple[int, int]:
        """Changes whenever a thread may have run or we wrote: memory read while
        :attr:`stopped` stays valid while this stays the same (caches of code bytes
        for one window key on it)."""
        return self._runs, self._writes

    @property
    def stopped(self) -> bool:
        """True when every live traced thread is in a ptrace-stop."""
        key = (self._runs, len(self._threads))
        if self._stopped_at == key:
            return True             # nothing resumed since: still true (cheap in loops)
        live = [t for t in self._threads.values() if not t.zombie]
        quiet = bool(live) and all(t.stopped for t in live)
        if quiet:
            self._stopped_at = key
        return quiet

    # ------------------------------------------------------------------ construction
    @classmethod
    def attach(cls, pid: int, *, stop: bool = True) -> "Target":
        """Seize every thread of ``pid`` and stop them all. Raises ProcessGone (no such
        pid), AccessDenied (EPERM, or another tracer), UsageError (pid is a thread).
        On failure every thread already seized is detached again.

        ``stop=False``: only the checks; nothing is seized and the process keeps
        running untouched (``released``) until the first :meth:`stop_all`, which
        seizes every thread then (a window).  Memory can be read meanwhile."""
        _check_attachable(pid)
        self = cls(pid)
        if not stop:
            self._released = True
            self._open_pidfd()
            self._mem.open(_live_task(pid))
            m = next((m for m in self._read_maps() if m.perms[0] == "r"), None)
            self._exec_probe = None if m is None else m.start   # an exec shows there
            return self
        try:
            self._seize_all()
            self._mem.open(next(iter(self._threads)) if self._leader_gone else None)
            self.stop_all()
        except BaseException:
            self.detach()
            raise
        return self

    def _seize_all(self) -> None:
        """SEIZE every task, rescanning /proc/PID/task until a pass finds no new tid:
        threads created meanwhile by seized threads are auto-attached (TRACECLONE),
        the others show up in the next scan."""
        strikes: dict[int, int] = {}
        for _ in range(100000):
            fresh = [t for t in _list_tasks(self.pid)
                     if t not in self._threads and not (t == self.pid and self._leader_gone)]
            if not fresh:
                return
            for tid in fresh:
                self._seize_one(tid, strikes)
        raise TargetError(f"thread list of process {self.pid} never stabilized", pid=self.pid)

    def _seize_one(self, tid: int, strikes: dict[int, int]) -> None:
        try:
            pt.seize(tid, pt.TRACE_OPTIONS)
        except pt.PtraceOSError as exc:
            if exc.errno == errno.ESRCH and tid != self.pid:
                return                                   # died since the scan
            if exc.errno == errno.ESRCH:
                raise ProcessGone(f"process {self.pid} exited during attach",
                                  pid=self.pid) from exc
            if exc.errno != errno.EPERM:
                raise
            if not self._seize_eperm_is_ours(tid, strikes):
                return
            self._threads[tid] = _Thread(tid, self.pid, new=True)
            return
        self._threads[tid] = _Thread(tid, self.pid)

    def _seize_eperm_is_ours(self, tid: int, strikes: dict[int, int]) -> bool:
        """EPERM from SEIZE: a clone auto-attached to us (True), an exiting thread
        (False: skip it) or a real denial (AccessDenied after repeated tries)."""
        st = _read_status(f"/proc/{self.pid}/task/{tid}/status")
        if st is None or st["State"][0] in "ZX":
            # a leader that called pthread_exit() stays a zombie until its threads are
            # gone and cannot be seized; the process ends when our last thread does
            self._leader_gone = self._leader_gone or tid == self.pid
            return False
        if int(st["TracerPid"]) == os.getpid():
            return True
        strikes[tid] = strikes.get(tid, 0) + 1
        if tid == self.pid or strikes[tid] > 100:
            raise AccessDenied(_denied_message(self.pid), pid=self.pid, tid=tid)
        return False

    @classmethod
    def spawn(cls, argv: list[str], *, stdin: int | None = None, stdout: int | None = None,
              stderr: int | None = None, env: dict[str, str] | None = None,
              cwd: str | None = None) -> "Target":
        """Start ``argv`` traced and run it to its entry point (AT_ENTRY), after ld.so
        mapped its libraries; returns with its one thread stopped there. The child gets
        PTRACE_O_EXITKILL (it dies if the tracer dies). Raises UsageError if the program
        is not found/executable, TargetError if execve or the run to entry fails."""
        if not argv:
            raise UsageError("spawn: empty argv")
        path = _resolve_program(argv[0], env)
        for fd in (stdin, stdout, stderr):
            if fd is not None and (not isinstance(fd, int) or fd < 0):
                raise UsageError(f"spawn: stdin/stdout/stderr must be fds, not {fd!r}")
        pid, err_r = _fork_exec(path, list(argv), (stdin, stdout, stderr), env, cwd)
        self = cls(pid)
        self._child = True
        self._threads[pid] = _Thread(pid, pid)
        try:
            self._finish_spawn(argv[0], err_r)
        except BaseException:
            self.kill()
            raise
        return self

    def _finish_spawn(self, prog: str, err_r: int) -> None:
        try:
            self._wait_for_exec(prog, err_r)
        finally:
            os.close(err_r)
        self._mem.open()                  # after exec: a pre-exec fd sees the old mm
        self._run_to_entry()
        self._all_stopped = True

    def _wait_for_exec(self, prog: str, err_r: int) -> None:
        """Run the child until PTRACE_EVENT_EXEC; TargetError if execve failed."""
        while True:
            _, status = os.waitpid(self.pid, pt.WALL)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._threads.clear()
                self._runs += 1
                self.exited, self.exit_status = True, status
                code = os.read(err_r, 64).decode() or "0"
                if code != "0":
                    raise TargetError(f"cannot execute {prog!r}: {os.strerror(int(code))}",
                                      pid=self.pid)
                # Killed (SIGKILL) between its execve and our sight of the exec event,
                # which a killed task never reports: it ended before it was traced.
                raise TargetExited(f"{prog!r} ended before it could be traced",
                                   pid=self.pid, status=status)
            if status >> 16 == pt.PTRACE_EVENT_EXEC:
                self._threads[self.pid].stopped = True
                return
            sig = os.WSTOPSIG(status)
            pt.cont(self.pid, 0 if status >> 16 or sig == signal.SIGTRAP else sig)

    @_boundary
    def run_to_entry(self) -> None:
        """After an exec held by ``hold_exec``: run the new program until its entry
        point (AT_ENTRY: the dynamic linker has mapped its libraries, none of its own
        code ran), leaving it stopped there; ``resume_all`` lets it go on.  Threads
        and children a library constructor starts meanwhile are traced as usual.
        TargetExited if it ends before."""
        t = self._threads.get(self.pid)
        if t is None or not t.exec_hold:
            raise UsageError(f"process {self.pid} is not held in an exec stop",
                             pid=self.pid)
        t.exec_hold = False
        was, self._all_stopped = self._all_stopped, True
        try:
            self._run_to_entry()
        except TargetExited:
            self._process_gone(self.exit_status)
            raise
        finally:
            self._all_stopped = was
        t.stopped, t.regs = True, None

    def _run_to_entry(self) -> None:
        """Plant a temporary int3 at AT_ENTRY, continue to it, restore the byte and
        rewind rip: the thread is left stopped at the first instruction of the program."""
        entry = _read_auxv(self.pid)[AT_ENTRY]
        orig = self._mem.read(entry, 1)
        self._mem.write(entry, b"\xcc")
        deliver = 0
        try:
            while True:
                pt.cont(self.pid, deliver)
                deliver = 0
                _, status = os.waitpid(self.pid, pt.WALL)
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    self._threads.clear()
                    self._runs += 1
                    self.exited, self.exit_status = True, status
                    raise TargetExited(f"process {self.pid} exited before its entry point "
                                       f"{entry:#x}", pid=self.pid, status=status)
                if self._at_entry_trap(status, entry):
                    break
                sig, event = os.WSTOPSIG(status), status >> 16
                if (event in (pt.PTRACE_EVENT_CLONE, pt.PTRACE_EVENT_FORK,
                              pt.PTRACE_EVENT_VFORK) and self._all_stopped
                        and self.pid in self._threads):
                    # a constructor's thread or child after an exec we follow
                    # (run_to_entry: _all_stopped keeps _on_clone from resuming us)
                    self._on_clone(self._threads[self.pid], event)
                    continue
                if event == 0 and sig != signal.SIGTRAP:
                    deliver = sig                # foreign signal before entry: deliver it
                    continue
        finally:
            if not self.exited:
                self._mem.write(entry, orig)
        regs = pt.getregs(self.pid)
        regs.rip = entry
        pt.setregs(self.pid, regs)

    def _at_entry_trap(self, status: int, entry: int) -> bool:
        if status >> 16 or os.WSTOPSIG(status) != signal.SIGTRAP:
            return False
        return pt.getregs(self.pid).rip == entry + 1

    # ------------------------------------------------------------------ quiescence
    @_boundary
    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every thread (INTERRUPT all running ones first, then wait for each).
        Events arriving meanwhile are queued for poll; new clones stay stopped until
        resume_all. Raises TargetError if a thread does not stop within ``timeout`` s.
        If the process exits meanwhile, returns with ``exited`` True and no threads.
        A released Target seizes every thread first (AccessDenied if another tracer
        attached meanwhile); an exec that happened while released is reported as an
        ExecEvent (the write fence is up before anything can be written)."""
        self._urgency.raise_()
        self._runs += 1
        if self._released:
            self._reseize()
            if self.exited:
                self._urgency.lower()
                return
        self._window += 1
        self._all_stopped = True
        for t in list(self._threads.values()):
            if not t.stopped and not t.new:
                self._interrupt(t)
        self._wait_until_quiet(timeout)

    def seize(self) -> None:
        """A released Target: seize every thread without stopping any (PTRACE_SEIZE
        does not stop), so that an int3 written from now on traps to us instead of
        killing the thread that meets it.  Clones are traced from birth (TRACECLONE).
        No-op when already traced.  Raises AccessDenied as :meth:`stop_all` does; an
        exit meanwhile leaves ``exited`` True, an exec is reported as an ExecEvent."""
        if self._released:
            self._runs += 1
            self._reseize()

    @_boundary
    def resume_all(self) -> None:
        """Resume every thread we stopped (re-injecting its pending signal), except
        threads holding an undelivered TrapEvent."""
        self._all_stopped = False
        for t in list(self._threads.values()):
            if t.stopped and not (t.held or t.exec_hold):
                self._resume_thread(t)
        self._urgency.lower()

    @_boundary
    def resume(self, tid: int, sig: int = 0) -> None:
        """Resume one stopped thread, delivering ``sig`` (e.g. SIGTRAP for an int3 that
        is not ours). ThreadGone if ``tid`` is not a stopped traced thread."""
        t = self._stopped_thread(tid)
        t.held, t.trap_rip = False, None
        if sig:
            t.sigs.insert(0, sig)
        self._resume_thread(t)

    @_boundary
    def release(self) -> bool:
        """PTRACE_DETACH every thread and keep the Target: memory stays readable and
        writable through /proc/PID/mem, the process runs with no tracer (its signals
        are delivered by the kernel alone, a debugger can attach, our death does not
        touch it); :meth:`poll` learns of its exit through a pidfd; the next
        :meth:`stop_all` seizes it again.  A thread holding a TrapEvent nobody
        resumed is settled as :meth:`detach` does; threads that cannot be detached
        (a traced vfork parent, a traced leader that became a zombie) make it return
        False with nothing changed.  Returns True once released."""
        self._check_alive()
        if self._released:
            return True
        if not self.stopped:
            self.stop_all()
            if self.exited:
                return False
        if any(not t.stopped or t.proc != self.pid for t in self._threads.values()):
            return False
        if self._take_pending_traps():
            return False              # their TrapEvents first (poll): ours to handle
        if not self._open_pidfd():
            return False                          # no pidfd: we could not see the exit
        dying = [t for t in list(self._threads.values()) if not self._detach_thread(t)]
        self._threads.clear()
        self._runs += 1
        self._all_stopped = False
        if dying:
            # Killed in the window (SIGKILL wakes a stopped tracee): each such thread
            # stays our tracee and its exit is reported to us alone; unreaped, it would
            # keep the thread group alive and the pidfd would never fire.
            self._reap_dying(dying)
            return False
        self._released = True
        self._runs += 1
        self._urgency.lower()
        m = next((m for m in self._read_maps() if m.perms[0] == "r"), None)
        self._exec_probe = None if m is None else m.start
        return True

    def _reap_dying(self, dying: list[_Thread]) -> None:
        status = None
        for t in sorted(dying, key=lambda t: t.tid == self.pid):   # leader last
            try:
                _, st = os.waitpid(t.tid, pt.WALL)
            except ChildProcessError:
                continue
            if t.tid == self.pid:
                status = st
        self._process_gone(status)

    def _open_pidfd(self) -> bool:
        if self._pidfd is None:
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except (OSError, AttributeError):     # Linux < 5.3, Python < 3.9
                return False
        return True

    def _reseize(self) -> None:
        """Seize every thread again after :meth:`release` (or the first time)."""
        if self._pidfd is not None and select.select([self._pidfd], [], [], 0)[0]:
            self._released_exit()
            return
        st = _read_status(f"/proc/{self.pid}/status")
        if st is None:
            self._released_exit()
            return
        tracer = int(st["TracerPid"])
        if tracer and tracer != os.getpid():
            raise AccessDenied(f"process {self.pid} is traced by process {tracer} now: "
                               "cannot stop it to restore its code", pid=self.pid)
        self._leader_gone = False
        self._seize_all()
        self._released = False
        self._check_same_mm()

    def _check_same_mm(self, reopen_only_if_live: bool = False) -> None:
        """/proc/PID/mem is bound to the mm it was opened on: reading 0 bytes from it
        means that mm is gone: the process exec'd while we were released."""
        if self._mem.fd is None:
            return
        try:
            m = next((m for m in self._read_maps() if m.perms[0] == "r"), None)
        except ProbeError:
            return
        if m is None:
            return
        try:
            gone = not os.pread(self._mem.fd, 1, self._exec_probe or m.start)
        except OSError:
            gone = False                     # EIO: unreadable page, same mm
        if gone and reopen_only_if_live:
            try:
                fresh = _Memory(self.pid)
                fresh.open(_live_task(self.pid))
                live = bool(os.pread(fresh.fd, 1, m.start))
                fresh.close()
            except (OSError, ProbeError):
                live = False
            gone = live                      # else: exiting, the pidfd will say so
        if gone:
            self._exec_probe = m.start
            self._mem.open(_live_task(self.pid))
            self._gadget = None
            self.exec_count += 1
            self._events.append(ExecEvent(self.pid))

    def mm_replaced(self) -> bool:
        """True when the address space we opened is gone while the process lives on:
        it exec'd (our /proc/PID/mem fd reads 0 bytes, a fresh one reads the new
        image).  For callers that read the process without stopping it (symbol
        resolution) and must tell a failure of theirs from an exec meanwhile."""
        if self._mem.fd is None or self._exec_probe is None or self.exited:
            return False
        try:
            if os.pread(self._mem.fd, 1, self._exec_probe):
                return False
        except OSError:
            return False
        try:
            fresh = _Memory(self.pid)
            fresh.open(_live_task(self.pid))
            m = next((m for m in self._read_maps() if m.perms[0] == "r"), None)
            live = m is not None and bool(os.pread(fresh.fd, 1, m.start))
            fresh.close()
        except (OSError, ProbeError):
            return False
        return live

    def _check_exec_released(self) -> None:
        """No pidfd tells of an exec: our /proc/PID/mem fd does (it reads 0 bytes once
        the mm it was opened on is gone).  Exiting also drops the mm: an exec is when a
        fresh /proc/PID/mem reads the new image.  One pread per wake-up."""
        if self._mem.fd is None or self._exec_probe is None:
            return
        try:
            if os.pread(self._mem.fd, 1, self._exec_probe):
                return
        except OSError:
            return
        self._check_same_mm(reopen_only_if_live=True)

    def _released_exit(self) -> None:
        """The released process is gone (its pidfd is readable): reap it if it is our
        child (spawned), else read its status from its zombie while its parent has not
        reaped it yet (:func:`_zombie_status`); else it is unknown (only a parent or a
        tracer learns it)."""
        status = None
        if self._child:
            try:
                wpid, st = os.waitpid(self.pid, os.WNOHANG)
                if wpid:
                    status = st
            except ChildProcessError:
                pass
        else:
            status = _zombie_status(self.pid)
        self._released = False
        self.exited_released = True
        self._process_gone(status)

    def _wait_released(self, timeout: float | None) -> None:
        """poll() while released: sleep on the pidfd (and the tracer's own signals)."""
        if self._pidfd is None:                  # no pidfd: look at /proc
            time.sleep(0.01 if timeout is None else min(timeout, 0.01))
            st = _read_status(f"/proc/{self.pid}/status")
            if st is None or st["State"][0] in "ZX" and len(_list_tasks(self.pid)) <= 1:
                self._released_exit()
            return
        fds = [self._pidfd] + ([_Wakeup.rfd] if self._wakeup else [])
        ready = select.select(fds, [], [], timeout)[0]
        if self._wakeup:
            _Wakeup.drain()
        if self._pidfd not in ready:
            self._check_exec_released()
            return
        if self._pidfd in ready:
            if self._child:
                # our child: pidfd_open reports the exit before its zombie can be
                # reaped in rare cases; wait for the status (it is a zombie now)
                for _ in range(1000):
                    if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                        break
                    time.sleep(0.001)
            self._released_exit()

    def _interrupt(self, t: _Thread) -> None:
        try:
            pt.interrupt(t.tid)
        except pt.PtraceOSError as exc:
            if not _esrch(exc):                # exiting: its exit status will be reaped
                raise

    def _quiet(self) -> bool:
        return all(t.stopped or t.zombie or t.vfork_child is not None
                   for t in self._threads.values())

    def _wait_until_quiet(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        step = 0.02
        while True:
            self._wait(self._quiet, step)
            if self._quiet():
                return
            self._mark_zombie_leaders()
            if time.monotonic() >= deadline:
                late = sorted(t.tid for t in self._threads.values()
                              if not (t.stopped or t.zombie or t.vfork_child))
                raise TargetError(f"threads {late} of process {self.pid} did not stop "
                                  f"within {timeout}s", pid=self.pid)
            step = min(step * 2, 0.5)

    def _mark_zombie_leaders(self) -> None:
        """A leader that called pthread_exit() is a zombie until its threads are gone
        (``man 2 ptrace``, "the thread group leader ... reported after all other
        threads"); it never stops, so stop_all must not wait for it."""
        for t in self._threads.values():
            if t.tid == t.proc and not t.stopped and _task_state(t.proc, t.tid) in "ZX":
                t.zombie = True

    def _resume_thread(self, t: _Thread) -> None:
        self._runs += 1
        sig = t.sigs.pop(0) if t.sigs else 0
        try:
            if t.group_stop and not sig:
                self._listen(t)
            else:
                pt.cont(t.tid, sig)
        except pt.PtraceOSError as exc:
            if not _esrch(exc):
                raise
        t.stopped, t.trap_rip, t.regs = False, None, None
        self._resend(t)

    def _listen(self, t: _Thread) -> None:
        """Keep a group-stopped thread stopped as if untraced: SIGCONT will wake it
        and it reports PTRACE_EVENT_STOP (``man 2 ptrace``, PTRACE_LISTEN)."""
        try:
            pt.listen(t.tid)
        except pt.PtraceOSError as exc:
            if exc.errno != errno.EIO:         # EIO: not in an EVENT_STOP any more
                raise
            pt.cont(t.tid, 0)
        t.stopped, t.regs = False, None
        self._runs += 1

    def _resend(self, t: _Thread) -> None:
        """Signals beyond the one CONT can deliver are re-sent to the thread."""
        for sig in t.sigs:
            try:
                pt.tgkill(t.proc, t.tid, sig)
            except pt.PtraceOSError:
                pass
        t.sigs.clear()

    # ------------------------------------------------------------------ event loop
    @_boundary
    def poll(self, timeout: float | None = None) -> list[Event]:
        """Wait up to ``timeout`` s (None: forever) for events and return them; returns
        early, possibly with [], when the tracer receives a signal that has a Python
        handler (SIGINT, SIGTERM...) so callers can check their flags."""
        if self._released and not self._events:
            self._wait_released(timeout)
        elif not self._events and not self.exited:
            self._wait(lambda: bool(self._events) or not self._threads, timeout)
        elif not self.exited and not self._released:
            self._reap_ready()
        events, self._events = self._events, []
        return events

    def _wait(self, until: Callable[[], bool], timeout: float | None) -> None:
        """Reap and dispatch our statuses until ``until()``, ``timeout`` s passed, or
        the tracer got a signal other than SIGCHLD. The pipe is drained *before* the
        reap, so a SIGCHLD arriving after the reap always wakes the select()."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            foreign = (_Wakeup.drain() if self._wakeup else False) or self._foreign
            self._foreign = False            # a signal seen by _wait_thread meanwhile
            self._reap_ready()
            if until() or foreign:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._scan_each()            # also notices tids reaped by others
                return
            if self._wakeup:
                select.select([_Wakeup.rfd], [], [], remaining)
            else:   # not the main thread: no wakeup fd possible, poll every ms
                time.sleep(0.001 if remaining is None else min(remaining, 0.001))

    def _reap_ready(self) -> int:
        """Reap and dispatch every status of ours that is ready; returns how many.

        Fast path: waitid(P_ALL, WNOWAIT) names a waitable task without reaping it; if
        it is ours, reap it with waitpid(tid). If it is anyone else's (another child of
        the tracer), fall back to waitpid(tid, WNOHANG|__WALL) on each of our tids, so
        foreign exit statuses are never stolen."""
        count = 0
        for _ in range(1000):
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WSTOPPED | os.WNOHANG
                                 | os.WNOWAIT | pt.WALL)
            except ChildProcessError:
                return count
            if info is None:
                return count
            if info.si_pid not in self._threads and not self._adopt(info.si_pid):
                break
            wpid, status = os.waitpid(info.si_pid, os.WNOHANG | pt.WALL)
            if not wpid:
                break
            self._dispatch(wpid, status)
            count += 1
        return count + self._scan_each()

    def _adopt(self, tid: int) -> bool:
        """A waitable task we have no record of that is a thread of our process: a
        clone whose event was lost (its parent killed in the clone stop).  Such a task
        is traced by us and waits for our waitpid; unreaped, it would keep the whole
        process a zombie (the leader's exit is reported after its threads')."""
        if tid == self.pid or not os.path.exists(f"/proc/{self.pid}/task/{tid}"):
            return False
        self._threads[tid] = _Thread(tid, self.pid, new=True)
        return True

    def _scan_each(self) -> int:
        """waitpid(tid, WNOHANG|__WALL) for each of our tids, non-leaders first (a
        leader's exit is reported only after its threads are reaped)."""
        count = 0
        for _ in range(16):
            progress = 0
            order = sorted(self._threads, key=lambda tid: self._threads[tid].proc == tid)
            for tid in order:
                if tid not in self._threads:
                    continue
                try:
                    wpid, status = os.waitpid(tid, os.WNOHANG | pt.WALL)
                except ChildProcessError:
                    self._vanished(tid)
                    progress += 1
                    continue
                if wpid:
                    self._dispatch(tid, status)
                    progress += 1
            count += progress
            if not progress:
                break
        return count

    def _dispatch(self, tid: int, status: int) -> None:
        self._runs += 1                    # a thread ran up to this status
        t = self._threads[tid]
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._on_exit(t, status)
            return
        was_new = t.new
        t.stopped, t.new = True, False
        t.regs = None                     # a new stop: registers may have changed
        if was_new and self.thread_hook is not None:
            self._call_thread_hook(t)
        sig, event = os.WSTOPSIG(status), status >> 16
        if event == pt.PTRACE_EVENT_STOP:
            self._on_event_stop(t, sig)
        elif event in (pt.PTRACE_EVENT_CLONE, pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK):
            self._on_clone(t, event)
        elif event == pt.PTRACE_EVENT_EXEC:
            self._on_exec(t)
        elif event or sig == signal.SIGTRAP | 0x80:
            self._keep_or_resume(t)          # events/syscall-stops we never asked for
        else:
            self._on_signal(t, sig)

    def _call_thread_hook(self, t: _Thread) -> None:
        """First stop of a thread we trace (seized or auto-attached clone): tell the
        owner, who may read its registers (it is stopped; it must not resume it)."""
        try:
            self.thread_hook(t.tid)
        except pt.PtraceOSError as exc:
            if not _esrch(exc):
                raise
        except ProcessGone:
            pass

    def _keep_or_resume(self, t: _Thread) -> None:
        if not self._all_stopped:
            self._resume_thread(t)

    def _on_event_stop(self, t: _Thread, sig: int) -> None:
        """PTRACE_EVENT_STOP: a group-stop if WSTOPSIG is a stopping signal (``man 2
        ptrace``, "Group-stop"), else an INTERRUPT/initial/SIGCONT re-trap."""
        t.group_stop = sig in _STOP_SIGNALS
        if t.group_stop and not self._all_stopped:
            self._listen(t)
        else:
            self._keep_or_resume(t)

    def _on_signal(self, t: _Thread, sig: int) -> None:
        """Signal-delivery-stop: an int3 (SIGTRAP, si_code SI_KERNEL) becomes a
        TrapEvent and stays stopped; anything else (kill -TRAP included) is
        re-injected unchanged, at once or on resume if we are keeping threads stopped."""
        if sig == signal.SIGTRAP and self._is_int3(t):
            try:
                regs = pt.getregs(t.tid)
            except pt.PtraceOSError as exc:
                if not _esrch(exc):
                    raise
                # Killed in its trap stop (SIGKILL, or another thread's execve zapping
                # the others): its call never runs, and its exit or exec comes next.
                return
            t.held, t.regs, t.trap_rip = True, regs, regs.rip
            self._events.append(TrapEvent(t.tid))
        elif self._all_stopped:
            t.sigs.append(sig)
        else:
            try:
                pt.cont(t.tid, sig)
            except pt.PtraceOSError as exc:
                if not _esrch(exc):
                    raise
            t.stopped = False

    def _is_int3(self, t: _Thread) -> bool:
        try:
            return pt.getsiginfo(t.tid).si_code == pt.SI_KERNEL
        except pt.PtraceOSError:
            return False

    def _on_exit(self, t: _Thread, status: int) -> None:
        del self._threads[t.tid]
        for other in self._threads.values():
            if other.vfork_child == t.tid:
                other.vfork_child = None
        if t.tid == self.pid or (self._leader_gone and t.proc == self.pid and not any(
                x.proc == self.pid for x in self._threads.values())):
            self._process_gone(status)

    def _process_gone(self, status: int | None) -> None:
        self.exited, self.exit_status = True, status
        for tid in [x.tid for x in self._threads.values() if x.proc == self.pid]:
            del self._threads[tid]
        self._events.append(ExitEvent(status))

    def _vanished(self, tid: int) -> None:
        """ECHILD from waitpid: the task is no longer ours (reaped elsewhere)."""
        t = self._threads.pop(tid)
        if t.tid == self.pid:
            self._process_gone(None)

    # ------------------------------------------------------------------ clone/fork/exec
    def _on_clone(self, t: _Thread, event: int) -> None:
        child = pt.geteventmsg(t.tid)
        try:
            flags = self._clone_flags(t, event, child)
        except OSError as exc:
            if not _esrch(exc) and exc.errno != errno.EIO:
                raise
            # Killed (SIGKILL) in its clone stop: the child exists all the same, traced
            # by us (auto-attach), and only we can reap it; its Tgid tells what it is.
            flags = self._flags_of(t, child)
        if flags & CLONE_THREAD:
            self._threads.setdefault(child, _Thread(child, t.proc, new=True))
        elif flags & CLONE_VM:
            # vfork / CLONE_VM: shares our memory (and our int3s): keep it traced
            self._threads.setdefault(child, _Thread(child, child, new=True))
            if flags & CLONE_VFORK:
                t.vfork_child = child
        else:
            self._fork_child(child)
        self._keep_or_resume(t)

    def _clone_flags(self, t: _Thread, event: int, child: int) -> int:
        """clone flags of the call that stopped ``t``, from its syscall registers."""
        if event == pt.PTRACE_EVENT_VFORK:
            return CLONE_VM | CLONE_VFORK
        regs = pt.getregs(t.tid)
        nr = _signed(regs.orig_rax)
        if nr == _SYS_CLONE:
            return regs.rdi
        if nr == _SYS_CLONE3:       # struct clone_args starts with u64 flags
            return int.from_bytes(self._mem.read(regs.rdi, 8), "little")
        if nr == _SYS_FORK:
            return 0
        return self._flags_of(t, child)

    @staticmethod
    def _flags_of(t: _Thread, child: int) -> int:
        """CLONE_THREAD when ``child`` is a thread of ``t``'s process (its Tgid)."""
        st = _read_status(f"/proc/{child}/status")
        return CLONE_THREAD if st and int(st["Tgid"]) == t.proc else 0

    def _fork_child(self, child: int) -> None:
        """A forked child (own memory) is auto-attached: wait for its first stop, run
        fork_hook on it, detach it (delivering the signal it stopped with, if any)
        unless the hook adopted it (then its own Target holds it stopped)."""
        while True:
            _, status = os.waitpid(child, pt.WALL)
            if not os.WIFSTOPPED(status):
                return                                   # killed before its first stop
            break
        sig = 0 if status >> 16 else os.WSTOPSIG(status)
        forked = ForkedChild(child, sig, parent=self.pid)
        try:
            if self.fork_hook is not None:
                self.fork_hook(forked)
        finally:
            forked.close()
            if forked.adopted is None:
                try:
                    pt.detach(child, sig)
                except pt.PtraceOSError as exc:
                    if not _esrch(exc):
                        raise

    @classmethod
    def _adopt_child(cls, pid: int, sig: int, exec_stop: bool = False) -> "Target":
        """A Target for a forked child we trace already (auto-attached, in its first
        stop; or a vfork child in its exec stop: held there until run_to_entry): see
        :meth:`ForkedChild.adopt`."""
        self = cls(pid)
        t = _Thread(pid, pid, stopped=True, exec_hold=exec_stop)
        self.hold_exec = exec_stop
        if sig:
            t.sigs.append(sig)
        self._threads[pid] = t
        self._all_stopped = True
        self._mem.open()
        m = next((m for m in self._read_maps() if m.perms[0] == "r"), None)
        self._exec_probe = None if m is None else m.start
        return self

    def _on_exec(self, t: _Thread) -> None:
        former = pt.geteventmsg(t.tid)
        if t.proc != self.pid:
            # a vfork child exec'd: it no longer shares our memory, let it go (or
            # give it to exec_child_hook, which may adopt it)
            del self._threads[t.tid]
            for other in self._threads.values():
                if other.vfork_child == t.tid:
                    other.vfork_child = None
            if self.exec_child_hook is not None:
                child = ForkedChild(t.tid, parent=self.pid, exec_stop=True)
                try:
                    self.exec_child_hook(child)
                finally:
                    child.close()
                if child.adopted is not None:
                    return
            try:
                pt.detach(t.tid, 0)
            except pt.PtraceOSError as exc:
                if not _esrch(exc):
                    raise
            return
        if former != t.tid:
            self._threads.pop(former, None)      # the exec'ing thread took the pid
        # Traps queued before the execve belong to threads it killed (or to the old
        # image): their calls never run, and a tid may now name the exec'ing thread.
        self._events = [e for e in self._events if not isinstance(e, TrapEvent)]
        self._mem.open()
        self._gadget = None
        self._runs += 1
        self.exec_count += 1               # write fence: see accept_exec()
        self._events.append(ExecEvent(t.tid))
        if self.hold_exec:
            t.exec_hold = True             # until run_to_entry (resume_all skips it)
            return
        self._keep_or_resume(t)

    # ------------------------------------------------------------------ memory, registers
    @_boundary
    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes at ``addr``. TargetError (carrying addr) on EIO/short read;
        ProcessGone once the address space we know is gone (exit, or an exec: the
        message says which)."""
        self._check_alive()
        try:
            return self._mem.read(addr, size)
        except ProcessGone as exc:
            if self._released and _task_state(self.pid, self.pid) not in "ZX":
                raise ProcessGone(f"process {self.pid} exec'd a new program while "
                                  "uprobe-opt prepared its probes: nothing was written",
                                  pid=self.pid, addr=addr) from exc
            raise

    @_boundary
    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr`` (r-x text too) and read it back; PatchError.
        ProcessGone once the process exec'd (see :meth:`accept_exec`)."""
        self.write_many([(addr, data)])

    @_boundary
    def write_many(self, pairs: list[tuple[int, bytes]]) -> None:
        """:meth:`write` for each (addr, data) of ``pairs``, in order, with the checks
        once and one read-back per run of nearby writes: a window that patches 1,000
        sites.  PatchError carries ``done``: how many pairs, from the first, were
        written whole."""
        self._check_alive()
        self._check_image()
        self._writes += 1
        self._mem.write_many(pairs)

    def accept_exec(self) -> None:
        """Lift the exec write fence. After an exec (seen by the wait loop, which may be
        inside stop_all, before the owner polled the ExecEvent) :meth:`write` and
        :meth:`syscall` raise ProcessGone: a patch computed for the old image must never
        land in the new one. A caller that follows the exec and re-resolves its
        addresses calls this to write into the new image."""
        self._write_gen = self.exec_count

    def _check_image(self) -> None:
        if self._write_gen != self.exec_count:
            raise ProcessGone(f"process {self.pid} exec'd a new program: no write into "
                              "the new image (Target.accept_exec lifts this)", pid=self.pid)

    def live_task(self) -> int:
        """The pid, or a live thread's tid when the leader is a zombie (for /proc)."""
        return _live_task(self.pid) or self.pid

    def proc_path(self, name: str) -> str:
        """/proc/PID/NAME, through a live thread's /proc/PID/task/TID/NAME when the
        leader is a zombie (it has no mm and no file table any more)."""
        tid = _live_task(self.pid)
        return (f"/proc/{self.pid}/{name}" if tid is None
                else f"/proc/{self.pid}/task/{tid}/{name}")

    @_boundary
    def maps(self) -> list[Mapping]:
        """The target's mappings (/proc/PID/maps)."""
        self._check_alive()
        return self._read_maps()

    def _read_maps(self) -> list[Mapping]:
        """/proc/PID/maps, read through a live thread if the leader is a zombie."""
        leader = self._threads.get(self.pid)
        if leader is not None and not leader.zombie:
            return read_maps(self.pid)
        tid = next((t.tid for t in self._threads.values()
                    if t.proc == self.pid and not t.zombie), None)
        return read_maps(self.pid, tid)

    @_boundary
    def get_regs(self, tid: int) -> pt.user_regs_struct:
        """General registers of stopped thread ``tid`` (a fresh copy; read once per
        stop: a thread's registers cannot change while it stays stopped, except by
        set_regs, which updates the copy we keep)."""
        t = self._stopped_thread(tid)
        if t.regs is None:
            t.regs = pt.getregs(t.tid)
        return pt.user_regs_struct.from_buffer_copy(t.regs)

    @_boundary
    def set_regs(self, tid: int, regs: pt.user_regs_struct) -> None:
        """Set the general registers of stopped thread ``tid``."""
        t = self._stopped_thread(tid)
        t.regs = None
        pt.setregs(t.tid, regs)
        t.regs = pt.user_regs_struct.from_buffer_copy(regs)

    @_boundary
    def get_xstate(self, tid: int) -> bytes:
        """XSAVE area of stopped thread ``tid`` (PTRACE_GETREGSET NT_X86_XSTATE)."""
        return pt.get_xstate(self._stopped_thread(tid).tid)

    def _check_alive(self) -> None:
        if self.exited:
            raise TargetExited(f"process {self.pid} has exited", pid=self.pid,
                               status=self.exit_status)
        if self._closed:
            raise UsageError(f"Target({self.pid}) is detached", pid=self.pid)

    def _stopped_thread(self, tid: int) -> _Thread:
        self._check_alive()
        t = self._threads.get(tid)
        if t is None or t.zombie:
            raise ThreadGone(f"{tid} is not a live traced thread of process {self.pid}",
                             pid=self.pid, tid=tid)
        if not t.stopped:
            raise UsageError(f"thread {tid} of process {self.pid} is running; stop it "
                             "first (stop_all)", pid=self.pid, tid=tid)
        return t

    # ------------------------------------------------------------------ remote syscalls
    @_boundary
    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int:
        """Run syscall ``nr`` with up to 6 integer ``args`` in stopped thread ``tid``
        (default: the leader, else any stopped thread); returns the raw rax as a signed
        int (-errno on failure). All registers, orig_rax included, are restored, so a
        blocking syscall the thread was stopped in restarts as if nothing happened
        (python-ptrace.md section 3)."""
        if len(args) > 6:
            raise UsageError("a syscall takes at most 6 arguments", pid=self.pid)
        t = self._syscall_thread(tid)
        self._check_image()
        self._runs += 1                    # the address space may change
        gadget = self._syscall_gadget()
        self._check_seccomp(t, nr, args, gadget)
        saved = pt.getregs(t.tid)
        info = self._stop_siginfo(t)
        mask = pt.getsigmask(t.tid)
        regs = pt.user_regs_struct.from_buffer_copy(saved)
        regs.rax, regs.orig_rax, regs.rip = nr, _U64, gadget   # orig_rax=-1: no restart
        for name, value in zip(_ARG_REGS, args):
            setattr(regs, name, value & _U64)
        pt.setregs(t.tid, regs)
        # Signals stay queued in the kernel while we step (their order and siginfo
        # intact): all blocked but SIGTRAP, which the step itself raises (blocking a
        # forced SIGTRAP would reset the program's SIGTRAP handler to SIG_DFL).
        pt.setsigmask(t.tid, _U64 & ~(1 << (signal.SIGTRAP - 1)))
        try:
            self._step_to(t, gadget + 2)
            result = pt.getregs(t.tid).rax
        finally:
            if t.tid in self._threads:
                pt.setregs(t.tid, saved)
                pt.setsigmask(t.tid, mask)
                if info is not None:
                    # The stop we interrupted delivers its signal (t.sigs[0]) on resume,
                    # now from the step's stop: with its own siginfo (si_value, ...).
                    pt.setsiginfo(t.tid, info)
                if t.group_stop:
                    self._back_to_group_stop(t)
        return _signed(result)

    def _check_seccomp(self, t: _Thread, nr: int, args, gadget: int) -> None:
        """AccessDenied (nothing injected) when the thread's seccomp mode or filter
        would not let system call ``nr`` with ``args`` run unchanged (see seccomp.py)."""
        mode = seccomp.seccomp_mode(self.pid, t.tid)
        if mode == 0:
            return
        if mode == 1:
            raise seccomp.strict_refusal(self.pid)
        key = (t.tid, self._window)
        if self._filters is None or self._filters[0] != key:
            self._filters = (key, seccomp.read_filters(t.tid))
        # the kernel reports the address after the syscall instruction (regs->ip)
        action = seccomp.verdict(self._filters[1], nr, args, gadget + 2)
        if action is not None:
            raise AccessDenied(f"process {self.pid} runs under a seccomp filter that "
                               f"answers {action} to system call {nr} (which uprobe-opt "
                               "needs to run in it to place its code): not done, the "
                               "process was left as it was", pid=self.pid, tid=t.tid)

    @staticmethod
    def _stop_siginfo(t: _Thread):
        """siginfo of the signal-delivery-stop ``t`` sits in with a signal to deliver
        (None otherwise: nothing to preserve)."""
        if not t.sigs and not t.held:
            return None
        try:
            return pt.getsiginfo(t.tid)
        except pt.PtraceOSError:
            return None                    # a group-stop: no siginfo

    def _wait_thread(self, t: _Thread) -> int:
        """waitpid(t.tid, __WALL) for a thread we just resumed or stepped.  A group
        leader killed meanwhile reports its exit only after every other thread of
        its group was reaped (``man 2 ptrace``): waiting for it alone would wait
        forever, so the others' exits are reaped (and dispatched) meanwhile."""
        if t.tid != t.proc:
            return os.waitpid(t.tid, pt.WALL)[1]
        while True:
            if self._wakeup:       # drained before the reap: a later SIGCHLD wakes us
                self._foreign |= _Wakeup.drain()
            wpid, status = os.waitpid(t.tid, pt.WALL | os.WNOHANG)
            if wpid:
                return status
            for tid in [tid for tid in self._threads if tid != t.tid]:
                try:
                    wpid, st = os.waitpid(tid, pt.WALL | os.WNOHANG)
                except ChildProcessError:
                    self._vanished(tid)
                    continue
                if wpid:
                    self._dispatch(tid, st)
            if self._wakeup:
                select.select([_Wakeup.rfd], [], [], 0.005)
            else:
                time.sleep(0.0005)

    def _back_to_group_stop(self, t: _Thread) -> None:
        """After a step the thread sits in a SIGTRAP signal-delivery-stop, where LISTEN
        fails (EIO, ``man 2 ptrace``: LISTEN "works only on tracees ... in
        PTRACE_EVENT_STOP"). INTERRUPT then CONT(0): get_signal() drops the SIGTRAP,
        loops and traps again, reporting the group-stop as a PTRACE_EVENT_STOP."""
        pt.interrupt(t.tid)
        pt.cont(t.tid, 0)
        t.stopped = False
        status = self._wait_thread(t)
        if not os.WIFSTOPPED(status):
            self._dispatch(t.tid, status)
            return
        t.stopped = True
        sig, event = os.WSTOPSIG(status), status >> 16
        t.group_stop = event == pt.PTRACE_EVENT_STOP and sig in _STOP_SIGNALS
        if event == 0 and sig != signal.SIGTRAP:
            t.sigs.append(sig)

    def _syscall_thread(self, tid: int | None) -> _Thread:
        if tid is not None:
            return self._stopped_thread(tid)
        self._check_alive()
        leader = self._threads.get(self.pid)
        if leader is not None and leader.stopped:
            return leader
        for t in self._threads.values():
            if t.stopped and t.proc == self.pid:
                return t
        raise UsageError(f"no stopped thread in process {self.pid}; call stop_all() first",
                         pid=self.pid)

    def _syscall_gadget(self) -> int:
        """Address of a ``syscall`` (0f 05) instruction: the first in [vdso], else in
        any executable mapping. Nothing is written into the target. Cached until exec."""
        if self._gadget is None:
            maps = self._read_maps()
            maps.sort(key=lambda m: m.path != "[vdso]")
            for m in maps:
                if m.is_exec and m.path != "[vsyscall]":
                    i = self._mem.read(m.start, m.size).find(b"\x0f\x05")
                    if i >= 0:
                        self._gadget = m.start + i
                        break
            else:
                raise TargetError(f"no syscall instruction found in process {self.pid}",
                                  pid=self.pid)
        return self._gadget

    def _step_to(self, t: _Thread, rip: int) -> None:
        """SINGLESTEP ``t`` until it traps with rip == ``rip``. Signals that arrive first
        are kept for re-injection on resume; stray INTERRUPT stops are stepped over."""
        for _ in range(1000):
            pt.singlestep(t.tid)
            t.stopped, t.regs = False, None
            status = self._wait_thread(t)
            if not os.WIFSTOPPED(status):
                self._dispatch(t.tid, status)
                raise ThreadGone(f"thread {t.tid} exited during a remote syscall",
                                 pid=self.pid, tid=t.tid)
            t.stopped = True
            sig, event = os.WSTOPSIG(status), status >> 16
            if event == 0 and sig == signal.SIGTRAP and pt.getregs(t.tid).rip == rip:
                return
            if event == pt.PTRACE_EVENT_STOP:
                t.group_stop = sig in _STOP_SIGNALS
            elif event == 0 and sig != signal.SIGTRAP:
                t.sigs.append(sig)
        raise TargetError(f"single-step of thread {t.tid} never reached {rip:#x}",
                          pid=self.pid, tid=t.tid, addr=rip)

    @_boundary
    def mmap(self, addr: int, length: int, prot: int, flags: int, fd: int = -1,
             offset: int = 0) -> int:
        """Remote mmap; returns the mapping address. TargetError on failure, or if
        MAP_FIXED_NOREPLACE gave another address (pre-4.17 kernels ignore the flag;
        that mapping is unmapped again)."""
        ret = self.syscall(SYS_MMAP, addr, length, prot, flags, fd, offset)
        if -4096 < ret < 0:
            raise TargetError(f"remote mmap({addr:#x}, {length}, prot={prot:#x}, "
                              f"flags={flags:#x}) in process {self.pid} failed: "
                              f"{os.strerror(-ret)}", pid=self.pid, addr=addr)
        if flags & MAP_FIXED_NOREPLACE and ret != addr:
            self.munmap(ret, length)
            raise TargetError(f"remote mmap at {addr:#x} returned {ret:#x} "
                              "(MAP_FIXED_NOREPLACE unsupported?)", pid=self.pid, addr=addr)
        return ret

    @_boundary
    def munmap(self, addr: int, length: int) -> None:
        """Remote munmap; TargetError on failure."""
        self._checked(self.syscall(SYS_MUNMAP, addr, length), "munmap", addr, length)

    @_boundary
    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """Remote mprotect; TargetError on failure."""
        self._checked(self.syscall(SYS_MPROTECT, addr, length, prot), "mprotect", addr,
                      length)

    def _checked(self, ret: int, name: str, addr: int, length: int) -> None:
        if ret < 0:
            raise TargetError(f"remote {name}({addr:#x}, {length}) in process {self.pid} "
                              f"failed: {os.strerror(-ret)}", pid=self.pid, addr=addr)

    # ------------------------------------------------------------------ detach / kill
    @_boundary
    def detach(self) -> None:
        """Stop what runs, PTRACE_DETACH every thread with its pending signal, close
        fds, restore the SIGCHLD handler/wakeup fd. Idempotent; safe once exited."""
        if self._closed:
            return
        try:
            if not self.exited and self._threads:
                self._all_stopped = True
                for t in list(self._threads.values()):
                    if not t.stopped and not t.new:
                        self._interrupt(t)
                self._wait_until_quiet(5.0)
                self._take_pending_traps()      # settled below (_settle_trap)
                for t in list(self._threads.values()):
                    self._detach_thread(t)
        finally:
            self._close()

    def _take_pending_traps(self) -> bool:
        """Every stopped thread whose int3 SIGTRAP is generated but not reported yet
        runs until the kernel reports it, and holds it as a TrapEvent.  A stop of
        ours (PTRACE_INTERRUPT) is taken before the kernel dequeues a synchronous
        signal (kernel/signal.c get_signal: job-control traps first), so a thread
        stopped right after it executed an int3 keeps that SIGTRAP pending; detached
        then, it would die of it, with no tracer to report it to.  Resumed, it
        reports it at once, before any instruction of its own.  True if any."""
        pending = [t for t in self._threads.values()
                   if t.stopped and not t.held and not t.group_stop
                   and t.proc == self.pid and self._trap_pending(t)]
        for t in pending:
            self._resume_thread(t)
        if pending:
            self._wait(lambda: all(t.stopped or t.tid not in self._threads
                                   for t in pending), 2.0)
        return bool(pending)

    def _trap_pending(self, t: _Thread) -> bool:
        """SIGTRAP is in the thread's own pending set (/proc/PID/task/TID/status
        SigPnd: where the kernel queues an int3's trap)."""
        st = _read_status(f"/proc/{self.pid}/task/{t.tid}/status") or {}
        try:
            return bool(int(st.get("SigPnd", "0"), 16) & (1 << (signal.SIGTRAP - 1)))
        except ValueError:
            return False

    def _detach_thread(self, t: _Thread) -> bool:
        """False when the thread was killed meanwhile (ESRCH): it stays our tracee
        until its exit is reaped."""
        if not t.stopped:
            return True                     # zombie leader / vfork parent: cannot detach
        sig = self._settle_trap(t) if t.held else (t.sigs.pop(0) if t.sigs else 0)
        detached = True
        try:
            pt.detach(t.tid, sig)
        except pt.PtraceOSError as exc:
            if not _esrch(exc):
                raise
            detached = False
        self._resend(t)
        del self._threads[t.tid]
        return detached

    def _settle_trap(self, t: _Thread) -> int:
        """A TrapEvent nobody resumed: if rip is untouched and the int3 is still there,
        deliver SIGTRAP (the program's own int3); if the int3 was removed meanwhile,
        rewind rip onto the restored instruction, as uprobes does; else leave it."""
        regs = pt.getregs(t.tid)
        if regs.rip != t.trap_rip:
            return 0
        if self._mem.read(regs.rip - 1, 1) == b"\xcc":
            return signal.SIGTRAP
        regs.rip -= 1
        pt.setregs(t.tid, regs)
        return 0

    @_boundary
    def kill(self) -> None:
        """SIGKILL the process (and vfork children we trace), reap every thread."""
        if self._closed:
            return
        try:
            if self._released and not self.exited:
                self._kill_released()
            elif not self.exited:
                for proc in {t.proc for t in self._threads.values()} | {self.pid}:
                    try:
                        os.kill(proc, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self._all_stopped = True
                self._wait(lambda: not self._threads, 10.0)
        finally:
            self._events.clear()
            self._close()

    def _kill_released(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._child:
            try:
                _, status = os.waitpid(self.pid, 0)
                self._released = False
                self._process_gone(status)
                return
            except ChildProcessError:
                pass
        select.select([self._pidfd], [], [], 10.0)
        self._released_exit()

    def _close(self) -> None:
        self._urgency.lower()
        self._mem.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._released = False
        self._threads.clear()
        self._runs += 1
        if not self._closed and self._wakeup:
            _Wakeup.release()
        self._closed = True


# --------------------------------------------------------------------------- many targets
def wait_any(targets, timeout: float) -> None:
    """Sleep until one of ``targets`` (Targets driven by this thread, e.g. a process
    and the children it forked) has a status to reap, ``timeout`` s pass, or the
    tracer gets a signal other than SIGCHLD; then each target's ``poll(0)`` finds its
    events.  Nothing is reaped here: ``waitid(WNOWAIT)`` per tid only looks, and the
    check runs after the pipe is drained, so a status arriving later wakes the
    select (the order :meth:`Target._wait` keeps for one target)."""
    deadline = time.monotonic() + timeout
    wakeup = _Wakeup.rfd >= 0 and threading.current_thread() is threading.main_thread()
    while True:
        foreign = _Wakeup.drain() if wakeup else False
        if foreign or any(_waitable(tid) for tg in targets if not tg.released
                          for tid in list(tg._threads)):
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        if wakeup:
            select.select([_Wakeup.rfd], [], [], remaining)
        else:
            time.sleep(min(remaining, 0.001))


def _waitable(tid: int) -> bool:
    try:
        return os.waitid(os.P_PID, tid, os.WEXITED | os.WSTOPPED | os.WNOHANG
                         | os.WNOWAIT | pt.WALL) is not None
    except ChildProcessError:
        return True                  # reaped elsewhere: its Target's poll notices


# --------------------------------------------------------------------------- spawn helpers
def _resolve_program(prog: str, env: dict[str, str] | None) -> str:
    """Path of ``prog`` (PATH lookup like execvp); UsageError if absent/not executable."""
    if "/" in prog:
        path = prog
        if not os.path.exists(path):
            raise UsageError(f"cannot execute {prog!r}: no such file")
    else:
        found = shutil.which(prog, path=(env if env is not None else os.environ).get("PATH"))
        if found is None:
            raise UsageError(f"command not found: {prog!r}")
        path = found
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise UsageError(f"cannot execute {prog!r}: not an executable file")
    return path


def _fork_exec(path: str, argv: list[str], fds, env, cwd) -> tuple[int, int]:
    """fork; the child waits on a pipe until we have SEIZEd it, then dup2s and execs.
    (No SIGSTOP/SIGCONT is involved, so no job-control signal is ever seen by it.)
    Returns (pid, read end of the CLOEXEC pipe that carries execve's errno)."""
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _child_exec(path, argv, fds, env, cwd, go_r, go_w, err_w)
    os.close(go_r)
    os.close(err_w)
    try:
        pt.seize(pid, pt.TRACE_OPTIONS | pt.PTRACE_O_EXITKILL)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(go_w)
        os.close(err_r)
        raise
    os.write(go_w, b"g")
    os.close(go_w)
    return pid, err_r


def _child_exec(path, argv, fds, env, cwd, go_r, go_w, err_w) -> None:  # pragma: no cover
    code = 0
    try:
        os.close(go_w)
        os.read(go_r, 1)
        os.close(go_r)
        for fd, std in zip(fds, (0, 1, 2)):
            if fd is not None and fd != std:
                os.dup2(fd, std)
        if cwd is not None:
            os.chdir(cwd)
        os.execve(path, argv, env if env is not None else os.environ)
    except OSError as exc:
        code = exc.errno or 0
    except BaseException:
        pass
    finally:
        try:
            os.write(err_w, str(code).encode())
        finally:
            os._exit(127)
