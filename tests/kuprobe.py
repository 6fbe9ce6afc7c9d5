"""The kernel's own uprobes as an oracle: events defined in tracefs ``uprobe_events``,
counted per process.

Why not simply ``echo 1 > events/G/E/enable`` and read ``uprobe_profile``?  A tracefs
uprobe enabled for ftrace is armed in *every* process that maps the file: a probe on
``libc:malloc`` then counts every malloc of the machine (``uprobe_profile``'s hit count
is taken before any filter), and worse, it writes int3 into the libc text of every other
process, which breaks anyone else comparing code bytes at that moment.

So the event is defined in tracefs (``p:GROUP/EVENT PATH:0xOFFSET``) but enabled only
through ``perf_event_open(PERF_TYPE_TRACEPOINT, config=<event id>, pid=TID)``: the
kernel's uprobe perf filter (``uprobe_perf_filter``) then inserts the breakpoint only
into the mm of the traced task(s).  Two counts result, and :class:`KernelUprobes` gives
both:

* ``perf_count``: the perf counter of each thread, enabled/disabled with ioctls around
  the workload (hits of those threads in that window);
* ``nhit``: the event's line of ``uprobe_profile`` (every hit of the uprobe in every mm
  that has the breakpoint, here only the target process), as a difference.

Needs root, tracefs (mounted here if it is not) and perf tracepoint events.
"""
from __future__ import annotations

import ctypes
import os
import struct
import subprocess
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_RESET = 0x2403
SYS_perf_event_open = 298          # x86-64

_libc = ctypes.CDLL(None, use_errno=True)


class Unavailable(Exception):
    """Kernel uprobes cannot be used here; str() is the reason (for pytest.skip)."""


def tracefs() -> Path:
    """The tracefs mount, mounted at /sys/kernel/tracing if needed; raises Unavailable."""
    if (TRACEFS / "uprobe_events").exists():
        return TRACEFS
    if os.geteuid() != 0:
        raise Unavailable("tracefs is not mounted and mounting it needs root")
    res = subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)],
                         capture_output=True, text=True)
    if not (TRACEFS / "uprobe_events").exists():
        raise Unavailable(f"cannot mount tracefs at {TRACEFS}: "
                          f"{(res.stderr or res.stdout).strip() or 'no uprobe_events'} "
                          "(kernel without CONFIG_UPROBE_EVENTS?)")
    return TRACEFS


def file_offset(path: str, symbol: str) -> int:
    """File offset of ``symbol`` in the ELF file ``path`` (.symtab or .dynsym), the
    ``PATH:0xOFFSET`` place of a uprobe event.  Independent of uprobe_opt.symbols."""
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        elf = ELFFile(f)
        value = None
        for name in (".symtab", ".dynsym"):
            sec = elf.get_section_by_name(name)
            if sec is None:
                continue
            for sym in sec.get_symbol_by_name(symbol) or ():
                if sym["st_info"]["type"] == "STT_FUNC" and sym["st_value"]:
                    value = sym["st_value"]
                    break
            if value is not None:
                break
        if value is None:
            raise KeyError(f"{symbol} not in {path}")
        for seg in elf.iter_segments():
            if (seg["p_type"] == "PT_LOAD" and seg["p_flags"] & 1
                    and seg["p_vaddr"] <= value < seg["p_vaddr"] + seg["p_filesz"]):
                return value - seg["p_vaddr"] + seg["p_offset"]
    raise KeyError(f"{symbol} of {path} is in no executable segment")


def mapped_path(pid: int, name: str) -> str:
    """The path of the mapped file of ``pid`` named ``name``, ``name.so*`` or ``name-*``
    (``libc`` -> /usr/lib/x86_64-linux-gnu/libc.so.6, not libcrypto.so.3), or the main
    program for ``""``."""
    if not name:
        return os.path.realpath(f"/proc/{pid}/exe")
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            base = os.path.basename(parts[-1].strip()) if len(parts) == 6 else ""
            if base == name or base.startswith((name + ".so", name + "-")):
                return os.path.realpath(parts[5].strip())
    raise KeyError(f"no mapping {name!r} in process {pid}")


def _perf_open(event_id: int, tid: int) -> int:
    attr = struct.pack("<IIQQQQQIIQ", PERF_TYPE_TRACEPOINT, 64, event_id, 0, 0, 0,
                       1, 0, 0, 0)                           # flags: disabled
    buf = ctypes.create_string_buffer(attr, len(attr))
    _libc.syscall.restype = ctypes.c_long
    fd = _libc.syscall(ctypes.c_long(SYS_perf_event_open), buf, ctypes.c_int(tid),
                       ctypes.c_int(-1), ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise Unavailable(f"perf_event_open(tracepoint {event_id}, tid {tid}): "
                          f"{os.strerror(err)}")
    return fd


def _append(path: Path, line: str) -> None:
    """One write of one line, O_APPEND (tracefs refuses the seek of open(..., "a"))."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _ioctl(fd: int, req: int) -> None:
    if _libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(req), ctypes.c_int(0)) < 0:
        raise OSError(ctypes.get_errno(), "perf ioctl")


class KernelUprobes:
    """Kernel uprobes on the functions ``specs`` (``LIB:SYMBOL`` or ``SYMBOL`` of the
    main program) of process ``pid``, armed only in that process::

        with KernelUprobes(pid, ["libc:malloc", "PyLong_FromLong"]) as k:
            k.start()                  # counters on (breakpoints are already in)
            ...workload...
            k.stop()
        k.counts()                     # {"libc:malloc": 1234, ...}  (perf counters)
        k.profile_counts()             # the same from uprobe_profile (nhit deltas)

    ``threads``: the tids to count (default: every thread of pid at creation).
    ``retprobe``: define return probes (``r:`` events, kernel uretprobes: they fire
    at each return, through the kernel's hijacked return address).
    """

    def __init__(self, pid: int, specs, threads=None, retprobe: bool = False):
        self.kind = "r" if retprobe else "p"
        self.root = tracefs()
        self.pid = pid
        self.group = f"uopt_test_{os.getpid()}_{pid}"
        self.specs = list(specs)
        self.tids = list(threads) if threads is not None else \
            sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        self.events: dict[str, str] = {}
        self.fds: dict[str, list[int]] = {}
        self._nhit0: dict[str, int] = {}
        self._nhit1: dict[str, int] = {}
        self._result: dict[str, int] | None = None
        try:
            self._define()
            for spec, ev in self.events.items():
                eid = int((self.root / "events" / self.group / ev / "id").read_text())
                self.fds[spec] = [_perf_open(eid, tid) for tid in self.tids]
            self._nhit0 = self._profile()
        except BaseException:
            self.close()
            raise

    def _define(self) -> None:
        lines = []
        for i, spec in enumerate(self.specs):
            lib, _, sym = spec.rpartition(":")
            path = mapped_path(self.pid, lib)
            off = file_offset(path, sym)
            ev = f"u{os.getpid()}_{self.pid}_{i}_{sym}"[:60]   # unique in uprobe_profile
            self.events[spec] = ev
            lines.append(f"{self.kind}:{self.group}/{ev} {path}:{off:#x}")
        for line in lines:
            try:
                _append(self.root / "uprobe_events", line)
            except OSError as e:
                raise Unavailable(f"uprobe_events rejected {line!r}: {e}") from None

    def _profile(self) -> dict[str, int]:
        out = {}
        names = {ev: spec for spec, ev in self.events.items()}   # lines: path event nhit
        for line in (self.root / "uprobe_profile").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in names:
                out[names[parts[1]]] = int(parts[-1])
        return out

    def start(self) -> None:
        # uprobe_profile counts every hit, enabled or not: read it before the counters
        # start and after they stop, so its window holds theirs (equal for a quiet
        # target; a hit from the target's own timer in between counts only there)
        self._nhit0 = self._profile()
        for fds in self.fds.values():
            for fd in fds:
                _ioctl(fd, PERF_EVENT_IOC_RESET)
                _ioctl(fd, PERF_EVENT_IOC_ENABLE)

    def stop(self) -> None:
        for fds in self.fds.values():
            for fd in fds:
                _ioctl(fd, PERF_EVENT_IOC_DISABLE)
        self._nhit1 = self._profile()
        self._result = {spec: sum(struct.unpack("<Q", os.read(fd, 8))[0] for fd in fds)
                        for spec, fds in self.fds.items()}

    def counts(self) -> dict[str, int]:
        """Hits per spec between start() and stop(), from the perf counters."""
        assert self._result is not None, "stop() first"
        return dict(self._result)

    def profile_counts(self) -> dict[str, int]:
        """Hits per spec between start() and stop(), from uprobe_profile."""
        return {spec: self._nhit1.get(spec, 0) - self._nhit0.get(spec, 0)
                for spec in self.events}

    def close(self) -> None:
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)
        self.fds = {}
        if self.events:
            for ev in self.events.values():
                try:
                    _append(self.root / "uprobe_events", f"-:{self.group}/{ev}")
                except OSError:
                    pass
            self.events = {}

    def __enter__(self) -> "KernelUprobes":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
