"""Kernel uprobes of one process through ``perf_event_open(2)`` and the uprobe PMU.

Knows nothing about probes: a *site* here is a (file, file offset) pair and a caller's
integer ``key``.  The kernel does the work a ptrace tracer does for an int3 site (the
trap, running the displaced instruction out of line), without stopping the thread and
without a tracer; we only read counters and drain sample rings.

How an event is scoped (the same as ``perf record -p PID``):

* one event per existing thread (``pid=tid``; for sampling one per thread and CPU)
  with ``inherit=1``, so every thread or process those threads create later carries
  the event too (a forked child's hits are counted and recorded with the parent's;
  an exec drops them).  That needs the event defined in tracefs (``uprobe_events``,
  opened as PERF_TYPE_TRACEPOINT): the uprobe PMU cannot be inherited (see
  :func:`_pmu_attr`) and is used without inherit where tracefs is missing;
* the kernel's uprobe filter (kernel/trace/trace_uprobe.c, ``uprobe_perf_filter``)
  inserts the breakpoint only into the address spaces of the events' tasks: another
  process mapping the same file is never touched.

Open the events of a site while **every thread of the target is stopped** (a ptrace
window): from the first open on, every hit of that site in the target is the
kernel's, and a thread without an event would be served by the kernel yet counted
nowhere.  Inside the window nothing can run, so nothing is lost.

What the kernel does with a site we already patched (kernel/events/uprobes.c, tested
in tests/test_perf.py on the running kernel):

* register: ``install_breakpoint`` -> ``set_swbp`` -> ``uprobe_write_opcode``, whose
  ``verify_opcode`` returns 0 ("already installed") when the byte in the process's
  page is already an int3: nothing is written, our private page stays as it is;
* the instruction it runs out of line is ``copy_insn``'s copy, read from the file's
  page cache (``__copy_insn``), never from the process: the file's original
  instruction, whatever our int3 or any other change in the process's page says;
* unregister (closing the last event of the site in that process): ``set_orig_insn``
  writes the first byte of that copy back, but only if the byte is still an int3
  (``verify_opcode`` again): closing our events restores the original instruction.

Counting: ``read(2)`` of each event (children included).  Sampling (``sample=True``):
one ring per CPU, shared by every site through ``PERF_EVENT_IOC_SET_OUTPUT``; a
sample carries the thread (PERF_SAMPLE_TID), the
time in CLOCK_MONOTONIC nanoseconds (``use_clockid``) and the user registers rdi, rsi,
rdx, rcx, r8, r9, sp, ip (PERF_SAMPLE_REGS_USER).  Rings are parsed in bulk with numpy.
A sample that does not fit is dropped by the kernel and reported in a
PERF_RECORD_LOST record.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import resource
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from uprobe_opt.errors import AccessDenied, ProcessGone, TargetError

__all__ = ["PerfError", "KernelUprobes", "SAMPLE_DTYPE", "unavailable_reason",
           "uprobe_pmu_type", "file_location"]

UPROBE_PMU = "/sys/bus/event_source/devices/uprobe"
PARANOID = "/proc/sys/kernel/perf_event_paranoid"
SYS_perf_event_open = 298            # x86-64
PERF_FLAG_FD_CLOEXEC = 8
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_SET_OUTPUT = 0x2405
PERF_EVENT_IOC_ID = 0x80082407       # _IOR('$', 7, __u64 *)
ATTR_SIZE = 112                      # PERF_ATTR_SIZE_VER5
CLOCK_MONOTONIC = 1

PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_COUNT_SW_DUMMY = 9
ENOTSUPP = 524                       # kernel-internal: arch_uprobe_analyze_insn refused

# perf_event_attr.sample_type bits (include/uapi/linux/perf_event.h)
SAMPLE_TID = 1 << 1
SAMPLE_TIME = 1 << 2
SAMPLE_REGS_USER = 1 << 12
SAMPLE_IDENTIFIER = 1 << 16
SAMPLE_TYPE = SAMPLE_IDENTIFIER | SAMPLE_TID | SAMPLE_TIME | SAMPLE_REGS_USER

# perf_event_attr flag bits
F_INHERIT = 1 << 1
F_SAMPLE_ID_ALL = 1 << 18
F_USE_CLOCKID = 1 << 25

# arch/x86/include/uapi/asm/perf_regs.h: the sample lists registers in bit order.
_REG_BITS = {"cx": 2, "dx": 3, "si": 4, "di": 5, "sp": 7, "ip": 8, "r8": 16, "r9": 17}
REGS_MASK = sum(1 << b for b in _REG_BITS.values())
_REG_ORDER = sorted(_REG_BITS, key=_REG_BITS.get)           # cx dx si di sp ip r8 r9
_ARG_INDEX = [_REG_ORDER.index(r) for r in ("di", "si", "dx", "cx", "r8", "r9")]
PERF_SAMPLE_REGS_ABI_64 = 2

PERF_RECORD_LOST = 2
PERF_RECORD_THROTTLE = 5
PERF_RECORD_SAMPLE = 9

# One PERF_RECORD_SAMPLE as SAMPLE_TYPE lays it out (fixed size: no variable part).
_RAW_DTYPE = np.dtype([("type", "<u4"), ("misc", "<u2"), ("size", "<u2"),
                       ("id", "<u8"), ("pid", "<i4"), ("tid", "<i4"), ("time", "<i8"),
                       ("abi", "<u8"), ("regs", "<u8", (len(_REG_ORDER),))])
SAMPLE_SIZE = _RAW_DTYPE.itemsize                            # 104 bytes
_HDR_DTYPE = np.dtype({"names": ["type", "size"], "formats": ["<u4", "<u2"],
                       "offsets": [0, 6], "itemsize": SAMPLE_SIZE})

SAMPLE_DTYPE = np.dtype([("key", np.uint32), ("pid", np.int32), ("tid", np.int32),
                         ("time_ns", np.int64), ("ip", np.uint64), ("sp", np.uint64),
                         ("args", np.uint64, (6,))])
"""A drained sample: ``key`` (the caller's site key), ``pid``/``tid`` (kernel ids of the
thread that hit), ``time_ns`` (CLOCK_MONOTONIC), ``ip`` (the site's address in the
process that hit), ``sp``, ``args`` (rdi, rsi, rdx, rcx, r8, r9)."""

DEFAULT_RING_BYTES = 256 << 10       # data bytes per CPU ring (power of two pages)
HOLD_NS = 2_000_000                  # samples this young wait for the next drain

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int


class PerfError(TargetError):
    """perf_event_open(2) or a perf ioctl/mmap failed; ``errno`` is the error number."""

    def __init__(self, msg: str, *, errno: int | None = None, **kw):
        super().__init__(msg, **kw)
        self.errno = errno


# -- availability -------------------------------------------------------------------
def uprobe_pmu_type() -> int | None:
    """The uprobe PMU's ``perf_event_attr.type`` (sysfs), None when the kernel has none."""
    try:
        with open(f"{UPROBE_PMU}/type") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _cap_eff() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def unavailable_reason() -> str | None:
    """Why kernel uprobes through perf cannot be used by this process, or None.

    The uprobe PMU (kernel/events/core.c ``perf_uprobe_event_init``) needs
    CAP_PERFMON or CAP_SYS_ADMIN whatever ``kernel.perf_event_paranoid`` says;
    Debian's paranoid level 3 additionally refuses every perf_event_open without
    CAP_SYS_ADMIN."""
    if uprobe_pmu_type() is None:
        return (f"the kernel has no uprobe PMU ({UPROBE_PMU} is missing: "
                "CONFIG_UPROBE_EVENTS is off)")
    caps = _cap_eff()
    sys_admin, perfmon = bool(caps >> 21 & 1), bool(caps >> 38 & 1)
    try:
        with open(PARANOID) as f:
            paranoid = int(f.read())
    except (OSError, ValueError):
        return f"{PARANOID} is missing: the kernel has no perf events"
    if paranoid >= 3 and not sys_admin:
        return (f"kernel.perf_event_paranoid is {paranoid}: perf_event_open needs "
                "CAP_SYS_ADMIN")
    if not (sys_admin or perfmon):
        return "kernel uprobes through perf need CAP_PERFMON or CAP_SYS_ADMIN (root)"
    return None


def online_cpus() -> list[int]:
    """CPU numbers from /sys/devices/system/cpu/online (``0-3,8``)."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def file_location(pid: int, addr: int, maps) -> tuple[str, int, int, int] | None:
    """Where ``addr`` (absolute, in process ``pid``) lives in its file: (path, file
    offset, st_dev, st_ino), or None for an anonymous or non-executable mapping.

    The path is ``/proc/PID/map_files/START-END``, which names the very file the
    process mapped even when the process sees another mount namespace (a container)
    or the file was replaced on disk since; ``/proc/PID/root/PATH`` when map_files
    cannot be read."""
    m = next((m for m in maps if m.start <= addr < m.end), None)
    if m is None or not m.is_exec or not m.path.startswith("/"):
        return None
    offset = addr - m.start + m.offset
    for path in (f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}",
                 f"/proc/{pid}/root{m.path}"):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_ino == m.inode:
            return path, offset, st.st_dev, st.st_ino
    return None


# -- perf_event_open ----------------------------------------------------------------
def _pack_attr(etype: int, config: int, *, config1: int = 0, config2: int = 0,
               sample: bool = False, inherit: bool = True, regs: int = REGS_MASK,
               sample_type: int = SAMPLE_TYPE) -> ctypes.Array:
    """A perf_event_attr (PERF_ATTR_SIZE_VER5).  Counting: sample_period 0.  Sampling:
    every hit (sample_period 1), SAMPLE_TYPE, CLOCK_MONOTONIC times."""
    flags = F_INHERIT if inherit else 0
    if sample:
        flags |= F_SAMPLE_ID_ALL | F_USE_CLOCKID
    else:
        sample_type = regs = 0
    # type size config sample_period sample_type read_format flags wakeup_events
    # bp_type config1 config2 branch_sample_type sample_regs_user sample_stack_user
    # clockid sample_regs_intr aux_watermark sample_max_stack reserved
    raw = struct.pack("<IIQQQQQIIQQQQIiQIHH", etype, ATTR_SIZE, config,
                      1 if sample and etype != PERF_TYPE_SOFTWARE else 0, sample_type, 0,
                      flags, 0, 0, config1, config2, 0, regs, 0,
                      CLOCK_MONOTONIC if sample else 0, 0, 0, 0, 0)
    return ctypes.create_string_buffer(raw, ATTR_SIZE)


def _pmu_attr(pmu: int, path: str, offset: int, sample: bool) -> ctypes.Array:
    """perf_event_attr of the uprobe PMU: config1 points at the path (copied by the
    kernel in perf_uprobe_init), config2 is the file offset.  Never inherit=1: an
    inherited copy is initialized again inside the target's clone()/fork(), which
    then reads config1 as an address of the *target* (EFAULT: the target's
    pthread_create fails) and checks CAP_PERFMON against the target's credentials."""
    path_buf = ctypes.create_string_buffer(os.fsencode(path))
    attr = _pack_attr(pmu, 0, config1=ctypes.addressof(path_buf), config2=offset,
                      sample=sample, inherit=False)
    attr._keep = path_buf                 # type: ignore[attr-defined]
    return attr


def _open(attr, tid: int, path: str, offset: int, cpu: int = -1) -> int:
    fd = _libc.syscall(ctypes.c_long(SYS_perf_event_open), attr, ctypes.c_int(tid),
                       ctypes.c_int(cpu), ctypes.c_int(-1),
                       ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    where = f"perf_event_open(uprobe {path}:{offset:#x}, tid {tid})"
    if err == ENOTSUPP:
        raise PerfError(f"{where}: the kernel's uprobes cannot run this instruction out "
                        "of line (arch_uprobe_analyze_insn)", errno=err, tid=tid)
    if err == 3:
        raise ProcessGone(f"{where}: no such thread", tid=tid)
    if err in (1, 13):
        raise AccessDenied(f"{where}: {os.strerror(err)} "
                           f"({unavailable_reason() or 'refused by the kernel'})", tid=tid)
    raise PerfError(f"{where}: {os.strerror(err)}", errno=err, tid=tid)


def _ioctl(fd: int, req: int, arg) -> None:
    if _libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(req), arg) < 0:
        err = ctypes.get_errno()
        raise PerfError(f"perf ioctl {req:#x}: {os.strerror(err)}", errno=err)


def _event_id(fd: int) -> int:
    out = ctypes.c_uint64()
    _ioctl(fd, PERF_EVENT_IOC_ID, ctypes.byref(out))
    return out.value


def _raise_fd_limit(need: int) -> None:
    """Lift the soft RLIMIT_NOFILE toward the hard limit when ``need`` more fds are
    about to be opened (one per site and thread)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nfds = len(os.listdir("/proc/self/fd"))
    if nfds + need + 64 > soft and soft != hard:
        new = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft * 2,
                                                                         nfds + need + 1024))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


# -- rings --------------------------------------------------------------------------
class _Ring:
    """One perf mmap ring (non-overwrite mode: we advance data_tail)."""

    def __init__(self, fd: int, data_bytes: int):
        page = mmap.PAGESIZE
        pages = max(1, data_bytes // page)
        pages = 1 << (pages.bit_length() - 1)            # the kernel wants 2^n pages
        self.size = pages * page
        try:
            self.mm = mmap.mmap(fd, page + self.size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise PerfError(f"mmap of a perf ring ({self.size} bytes): {e.strerror} "
                            "(kernel.perf_event_mlock_kb?)", errno=e.errno) from None
        self.data_offset = page
        self.lost = 0            # PERF_RECORD_LOST totals (samples the kernel dropped)
        self.throttled = 0       # PERF_RECORD_THROTTLE seen

    def take(self) -> bytes:
        """The bytes between data_tail and data_head, and hand them back."""
        head, = struct.unpack_from("<Q", self.mm, 1024)     # perf_event_mmap_page
        tail, = struct.unpack_from("<Q", self.mm, 1032)
        if head == tail:
            return b""
        lo, hi = tail % self.size, head % self.size
        base = self.data_offset
        if head - tail >= self.size or hi <= lo:
            data = self.mm[base + lo: base + self.size] + self.mm[base: base + hi]
        else:
            data = self.mm[base + lo: base + hi]
        struct.pack_into("<Q", self.mm, 1032, head)         # x86: loads done before
        return data

    def close(self) -> None:
        self.mm.close()


def parse_records(buf: bytes) -> tuple[np.ndarray, list[tuple[int, int]], int]:
    """Split a ring's bytes into the raw samples (an array of the fixed sample layout),
    the (event id, count) of every PERF_RECORD_LOST and the number of
    PERF_RECORD_THROTTLE records.  Runs of samples are taken in bulk; only other
    records are walked one by one."""
    samples, lost, throttled = [], [], 0
    off, n = 0, len(buf)
    while n - off >= 8:
        k = (n - off) // SAMPLE_SIZE
        if k:
            hdr = np.ndarray((k,), dtype=_HDR_DTYPE, buffer=buf, offset=off)
            ok = (hdr["type"] == PERF_RECORD_SAMPLE) & (hdr["size"] == SAMPLE_SIZE)
            run = k if ok.all() else int(np.argmin(ok))
            if run:
                samples.append(np.frombuffer(buf, _RAW_DTYPE, count=run, offset=off))
                off += run * SAMPLE_SIZE
                continue
        rtype, _, size = struct.unpack_from("<IHH", buf, off)
        if size < 8:
            break                                    # never: a corrupt ring
        if rtype == PERF_RECORD_LOST and size >= 24:
            lost.append(struct.unpack_from("<QQ", buf, off + 8))
        elif rtype == PERF_RECORD_THROTTLE:
            throttled += 1
        off += size
    raw = np.concatenate(samples) if samples else np.zeros(0, _RAW_DTYPE)
    return raw, lost, throttled


# -- tracefs event definitions ------------------------------------------------------
TRACEFS = "/sys/kernel/tracing"
GROUP_PREFIX = "uprobe_opt_"


def tracefs_unavailable() -> str | None:
    """Why uprobe events cannot be defined in tracefs, or None."""
    path = f"{TRACEFS}/uprobe_events"
    if not os.path.exists(path):
        return f"{path} is missing (tracefs not mounted, or CONFIG_UPROBE_EVENTS off)"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable (root needed)"
    return None


def _tracefs_write(line: str) -> None:
    fd = os.open(f"{TRACEFS}/uprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _remove_stale_groups() -> None:
    """Definitions left by a tracer that died (SIGKILL) before removing them: only a
    definition (never armed without an open event), removed here by the next one."""
    try:
        with open(f"{TRACEFS}/uprobe_events") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        name = line.split()[0].split(":", 1)[-1] if line else ""
        group = name.split("/")[0]
        if not group.startswith(GROUP_PREFIX):
            continue
        owner = group[len(GROUP_PREFIX):]
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            try:
                _tracefs_write(f"-:{name}")
            except OSError:
                pass


# Events closing on background threads, by (inode, file offset) of their site.  Until
# such a close is done the kernel's uprobe there is still registered, and an int3 we
# write at that file byte in any process is the kernel's to handle: finding no
# consumer for that process it removes the int3 (``unapply_uprobe``) and the hit is
# lost.  wait_closed() joins them first.
_CLOSING: dict[tuple[int, int], list] = {}


_ALL_CLOSES: list = []          # every background closer started (join_all)


def closing() -> bool:
    """Some event of ours is still being closed on a background thread."""
    for key in [k for k, ths in _CLOSING.items() if not any(t.is_alive() for t in ths)]:
        del _CLOSING[key]
    return bool(_CLOSING)


def join_all(timeout: float | None = None) -> None:
    """Wait until every event of ours closing on a background thread is closed."""
    while _ALL_CLOSES:
        _ALL_CLOSES.pop().join(timeout)
    closing()


def wait_closed(inode: int, offset: int, timeout: float = 5.0) -> None:
    """Return once no event of ours at that file byte is still being closed (at most
    ``timeout`` s).  Cheap when none is."""
    for th in _CLOSING.pop((inode, offset), None) or ():
        th.join(timeout)


# -- the set of kernel uprobes of one process ----------------------------------------
@dataclass
class _Site:
    key: int
    path: str
    offset: int
    sample: bool
    attr: ctypes.Array | None = None
    event: str | None = None                               # tracefs GROUP/EVENT
    fds: dict[tuple[int, int], int] = field(default_factory=dict)   # (tid, cpu) -> fd
    nrecords: int = 0


class KernelUprobes:
    """Kernel uprobes in process ``pid``: every thread given to :meth:`add` (and, with
    the tracefs backend, everything they create later).

    ``backend``: ``"tracefs"`` defines each site once in tracefs ``uprobe_events`` and
    opens a PERF_TYPE_TRACEPOINT event per thread with ``inherit=1`` (new threads and
    forked children carry it; one uprobe consumer per site; the definition is removed
    at close); ``"pmu"`` opens the uprobe PMU directly, without inherit (see
    :func:`_pmu_attr`): a thread created later must get its events through
    :meth:`add_thread` before it runs, so a caller using it must keep tracing new
    threads (``inherits`` is False).  Default: tracefs when writable, else pmu.
    ``ring_bytes``: data bytes of each thread's sample ring.  Raises
    :class:`PerfError`, ProcessGone or AccessDenied; a failed :meth:`add` leaves
    nothing open."""

    def __init__(self, pid: int, *, ring_bytes: int = DEFAULT_RING_BYTES,
                 backend: str | None = None):
        reason = unavailable_reason()
        if reason is not None:
            raise PerfError(reason, pid=pid)
        if backend is None:
            backend = "tracefs" if tracefs_unavailable() is None else "pmu"
        if backend == "tracefs":
            if tracefs_unavailable():
                raise PerfError(tracefs_unavailable(), pid=pid)
            _remove_stale_groups()
        self.backend = backend
        self.inherits = backend == "tracefs"
        self.pid = pid
        self.pmu = uprobe_pmu_type()
        self.group = f"{GROUP_PREFIX}{os.getpid()}"
        self.ring_bytes = ring_bytes
        self.sites: dict[int, _Site] = {}
        self.rings: dict[int, tuple[int, _Ring]] = {}      # cpu -> (dummy event fd, ring)
        self.cpus = online_cpus()
        self._by_id: dict[int, int] = {}                    # event id -> key
        self.pending: list[np.ndarray] = []
        self._held = np.zeros(0, SAMPLE_DTYPE)
        self.closing: list = []                             # background closers
        self._deferred: list = []                           # _close_sites(defer=True)

    def add(self, key: int, path: str, offset: int, tids, *, sample: bool = False) -> None:
        """:meth:`prepare` then :meth:`arm`."""
        self.prepare(key, path, offset, sample=sample)
        self.arm(key, tids)

    def prepare(self, key: int, path: str, offset: int, *, sample: bool = False) -> None:
        """Get site ``key`` (file ``path``, byte ``offset``) ready without arming it:
        with tracefs, its event is defined (nothing is written into any process until
        an event is opened).  Work to do while the target runs."""
        if key in self.sites:
            raise ValueError(f"site key {key} already open")
        site = _Site(key, path, offset, sample)
        site.attr = self._site_attr(site)
        self.sites[key] = site

    def arm(self, key: int, tids) -> None:
        """Open site ``key``'s event on each thread of ``tids`` (every thread of the
        process, all stopped: see the module docstring); from the first one on, the
        kernel serves the site in this process.  With ``sample`` every hit leaves a
        sample in the thread's ring.  A thread that exited meanwhile is skipped; if
        none is left, raises ProcessGone.  On failure the site is closed and
        forgotten."""
        site = self.sites[key]
        tids = sorted(tids)
        _raise_fd_limit(len(tids))
        try:
            for tid in tids:
                self._open_on(site, tid)
            if not site.fds:
                raise ProcessGone(f"no thread of process {self.pid} is left to probe",
                                  pid=self.pid)
        except BaseException:
            del self.sites[key]
            self._close_site(site, wait=True)
            raise

    def add_thread(self, tid: int) -> None:
        """Open every site's event on a new thread ``tid`` (stopped, before it runs its
        first instruction).  Needed only when ``inherits`` is False."""
        for site in self.sites.values():
            if not any(t == tid for t, _ in site.fds):
                self._open_on(site, tid)

    def _site_attr(self, site: _Site) -> ctypes.Array:
        if self.backend == "pmu":
            return _pmu_attr(self.pmu, site.path, site.offset, site.sample)
        site.event = f"{self.group}/p{self.pid}_{site.key}"
        try:
            _tracefs_write(f"p:{site.event} {site.path}:{site.offset:#x}")
        except OSError as e:
            site.event = None
            msg = f"uprobe_events refused {site.path}:{site.offset:#x}: {e.strerror}"
            if e.errno == ENOTSUPP:
                msg += (" (the kernel's uprobes cannot run this instruction out of "
                        "line, arch_uprobe_analyze_insn)")
            raise PerfError(msg, errno=e.errno, pid=self.pid) from None
        with open(f"{TRACEFS}/events/{site.event}/id") as f:
            eid = int(f.read())
        return _pack_attr(PERF_TYPE_TRACEPOINT, eid, sample=site.sample)

    def _open_on(self, site: _Site, tid: int) -> None:
        """Counting: one event per thread (cpu -1).  Sampling: one per thread and CPU,
        each writing into that CPU's ring (perf refuses to mmap an inherited per-task
        event, perf_mmap: its children on other CPUs would write one ring at once;
        a per-CPU ring has one writer at a time, as with ``perf record -p``)."""
        for cpu in (self.cpus if site.sample else [-1]):
            try:
                fd = _open(site.attr, tid, site.path, site.offset, cpu)
            except ProcessGone:
                return
            site.fds[tid, cpu] = fd
            if site.sample:
                self._by_id[_event_id(fd)] = site.key
                if cpu not in self.rings:
                    self.rings[cpu] = self._new_ring(cpu)
                _ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, ctypes.c_int(self.rings[cpu][0]))

    def _new_ring(self, cpu: int) -> tuple[int, "_Ring"]:
        """A CPU's ring lives on a dummy software event of that CPU (it records
        nothing itself), so any site can be closed (unregistered) while the others
        keep writing.  Same clock as the uprobe events (PERF_EVENT_IOC_SET_OUTPUT
        refuses a mix)."""
        attr = _pack_attr(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_DUMMY, sample=True,
                          inherit=False, regs=0, sample_type=SAMPLE_TYPE & ~SAMPLE_REGS_USER)
        fd = _open(attr, -1, "(ring)", 0, cpu)
        try:
            return fd, _Ring(fd, self.ring_bytes)
        except BaseException:
            os.close(fd)
            raise

    # -- reading ---------------------------------------------------------------------
    def count(self, key: int) -> int:
        """Hits of site ``key`` so far: its events' counters (inherited ones included)."""
        return sum(struct.unpack("<Q", os.read(fd, 8))[0]
                   for fd in self.sites[key].fds.values())

    def drain(self, *, final: bool = False) -> int:
        """Move samples from the rings into ``pending`` (converted to
        :data:`SAMPLE_DTYPE`, in time order: per thread, call order); returns how
        many.  A thread's consecutive samples may sit in two CPUs' rings, and a ring
        read a moment before another can miss a sample the other already follows:
        samples younger than :data:`HOLD_NS` stay held back until the next drain
        (``final``: release everything, for a target that is stopped or gone)."""
        cut = time.monotonic_ns() - HOLD_NS
        batches = [self._held] if len(self._held) else []
        for _, ring in self.rings.values():
            raw, lost, throttled = parse_records(ring.take())
            ring.lost += sum(n for _, n in lost)
            ring.throttled += throttled
            if len(raw):
                batches.append(self._convert(raw))
        if not batches:
            return 0
        out = np.concatenate(batches) if len(batches) > 1 else batches[0]
        out = out[np.argsort(out["time_ns"], kind="stable")]
        n = len(out) if final else int(np.searchsorted(out["time_ns"], cut, side="right"))
        self._held = out[n:]
        if n:
            self.pending.append(out[:n])
        return n

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        out = np.empty(len(raw), SAMPLE_DTYPE)
        ids, inverse = np.unique(raw["id"], return_inverse=True)
        keys = np.array([self._by_id.get(int(i), 0xFFFFFFFF) for i in ids], dtype=np.uint32)
        out["key"] = keys[inverse]
        out["pid"], out["tid"], out["time_ns"] = raw["pid"], raw["tid"], raw["time"]
        regs = raw["regs"]
        out["ip"] = regs[:, _REG_ORDER.index("ip")]
        out["sp"] = regs[:, _REG_ORDER.index("sp")]
        out["args"] = regs[:, _ARG_INDEX]
        for key, n in zip(*np.unique(out["key"], return_counts=True)):
            if int(key) in self.sites:
                self.sites[int(key)].nrecords += int(n)
        return out

    def take(self, *, final: bool = False) -> np.ndarray:
        """Drain, then return (and forget) every sample drained so far."""
        self.drain(final=final)
        batch = np.concatenate(self.pending) if self.pending else np.zeros(0, SAMPLE_DTYPE)
        self.pending = []
        return batch

    def nrecords(self, key: int) -> int:
        """Samples of site ``key`` drained so far."""
        return self.sites[key].nrecords

    def lost(self) -> int:
        """Samples the kernel dropped (full rings: PERF_RECORD_LOST, or throttling)."""
        return sum(ring.lost + ring.throttled for _, ring in self.rings.values())

    def nmissed(self, key: int) -> int:
        """Hits of a sampling site whose sample the kernel dropped (a full ring): hits
        minus samples drained.  Exact once the target is stopped or gone and the rings
        drained; while it runs it also counts hits whose sample is not drained yet.
        (PERF_RECORD_LOST cannot say which site lost, and is written only when the
        ring has room again.)"""
        site = self.sites[key]
        if not site.sample:
            return 0
        self.drain(final=True)
        return max(0, self.count(key) - site.nrecords)

    # -- closing ---------------------------------------------------------------------
    def remove(self, key: int, *, wait: bool = False) -> int:
        """Disarm site ``key``: its samples are drained, its final count read, its
        events closed.  The kernel then unregisters the uprobe from the process and
        puts the original first byte back where an int3 still is.  Closing waits for
        RCU grace periods (tens of ms to seconds per event on a busy machine; the
        target is not stopped meanwhile), so by default it happens on a background
        thread; ``wait`` blocks until done.  Returns the final hit count."""
        return self.remove_many([key], wait=wait)[key]

    def remove_many(self, keys, *, wait: bool = False, defer: bool = False
                    ) -> dict[int, int]:
        """:meth:`remove` for every site of ``keys``, the rings drained once and the
        events closed together on one background thread (one thread per site made
        the tracer wait for the GIL behind hundreds of them: 1.4 s for 205 sites,
        with the target stopped).  ``defer``: see :meth:`close`.  Returns {key: final
        hit count}."""
        self.drain(final=True)
        finals, sites = {}, []
        for key in keys:
            site = self.sites.pop(key)
            finals[key] = sum(struct.unpack("<Q", os.read(fd, 8))[0]
                              for fd in site.fds.values())
            sites.append(site)
        self._close_sites(sites, wait=wait, defer=defer)
        return finals

    def _close_site(self, site: _Site, wait: bool) -> None:
        self._close_sites([site], wait)

    def _close_sites(self, sites: list[_Site], wait: bool, defer: bool = False) -> None:
        """Close the sites' events: now (``wait``), on one background thread, or
        (``defer``) on the thread the next close without ``defer`` starts."""
        fds = [fd for site in sites for fd in site.fds.values()]
        events = [site.event for site in sites if site.event is not None]
        paths = [(site.path, site.offset) for site in sites]
        for site in sites:
            site.fds, site.event = {}, None
        if defer:
            self._deferred.append((fds, events, paths))
            return
        for more in self._deferred:
            fds, events, paths = fds + more[0], events + more[1], paths + more[2]
        self._deferred = []
        if not fds and not events:
            return

        def work():
            for fd in fds:
                os.close(fd)
            for event in events:
                try:
                    _tracefs_write(f"-:{event}")
                except OSError:
                    pass
        if wait:
            work()
        else:
            import threading

            def background():
                # Not at the real-time priority of the window it was started in.
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                work()
            th = threading.Thread(target=background, name="uprobe-opt perf close",
                                  daemon=True)
            th.start()
            self.closing.append(th)
            _ALL_CLOSES.append(th)
            for path, offset in paths:
                try:
                    key = (os.stat(path).st_ino, offset)
                except OSError:
                    continue
                _CLOSING.setdefault(key, []).append(th)

    def close(self, *, wait: bool = True, defer: bool = False) -> None:
        """Drain, then close everything (idempotent).  ``wait`` False: the events are
        closed on a background thread (see :meth:`remove`); :meth:`join` waits.
        ``defer``: that thread starts only at the next close (the end window: no
        thread of ours competes with the tracer while the target is stopped)."""
        try:
            self.drain(final=True)
        except (ValueError, OSError):
            pass
        self._close_sites(list(self.sites.values()), wait=False, defer=defer)
        self.sites.clear()
        for fd, ring in self.rings.values():
            ring.close()
            os.close(fd)
        self.rings.clear()
        if wait:
            self.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for background closes; True when all are done."""
        for th in self.closing:
            th.join(timeout)
        self.closing = [th for th in self.closing if th.is_alive()]
        return not self.closing

    def __enter__(self) -> "KernelUprobes":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
