"""Probe objects: the arch-independent half of the probe life cycle (like kernel/kprobes.c).

A :class:`Probe` is what a user registered (a spec, a handler).  Several probes at one
address share one :class:`Site` (the kernel's *aggregated probe*): one breakpoint, one
out-of-line (XOL) copy, at most one detour.  States are read through ``is_*``
predicates and :attr:`Probe.state`; staging (queued for optimization) is shown by which
queue of the :class:`~uprobe_opt.core.manager.ProbeManager` a site is on.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

HANDLER_KINDS = ("python", "count", "record")
# A USDT marker is a nop the program placed for tracers (often one byte, right before
# code that reads the marker's operands): it keeps the int3, which the kernel's uprobe
# serves for count probes, as it does for bpftrace and perf probe at the same site.
USDT_REFUSAL = "USDT marker: stays int3 (a nop placed for uprobes)"
_ids = itertools.count(1)


class ProbeState(enum.Enum):
    REGISTERED = "registered"   # resolved, not yet in the target
    INT3 = "int3"               # armed with a breakpoint (unoptimized)
    OPTIMIZED = "optimized"     # the site jumps to a detour
    DISABLED = "disabled"       # registered but not counting; the site may be disarmed
    GONE = "gone"               # the address space it lived in is gone (exec)
    PENDING = "pending"         # its library is not loaded (armed when it is mapped)


@dataclass(eq=False)
class Site:
    """One patched address in the target, shared by every probe planted there.

    ``addr`` is where the breakpoint/jump is written (absolute, target address space),
    ``orig`` the original bytes there (at least the jump size; the whole region once
    analysed), ``func_addr``/``func_size`` the containing function.
    """
    addr: int
    orig: bytes
    func_addr: int | None
    func_size: int | None
    probes: list["Probe"] = field(default_factory=list)
    armed: bool = False            # breakpoint (or jump) present in the target
    xol_addr: int | None = None    # out-of-line copy of the instruction at addr
    region: Any = None             # arch Region when analysed
    detour: Any = None             # arch Detour when a detour is written
    detour_kind: str | None = None
    optimized: bool = False        # the jump is written
    counter: Any = None            # (Counter) per-CPU hit counters (count, record)
    missed: Any = None             # (Counter) records dropped on a full ring (record)
    id: int = 0                    # site number carried in ring records
    refusal: Any = None            # why the site stays int3 (arch Refusal or str)
    retry_at: float = 0.0          # monotonic seconds: next optimization attempt
    deferrals: int = 0
    deferred: str | None = None    # why the last optimization attempt was deferred
    want_optimize: bool = True     # False under --no-optimize (Tracer(optimize=False))
    kernel: Any = None             # the KernelService serving this int3 site, or None
    kernel_base: list = field(default_factory=lambda: [0, 0])   # kernel [hits, missed]
    kernel_kind: str | None = None  # the handler kind the kernel serves (count/record)
    kernel_served: bool = False    # served by the kernel until the end (summary)
    kernel_note: str | None = None  # why the kernel does not serve it (tried, refused)
    exit: Any = None               # arch Exit when this site is a function exit (ret,
                                   # tail-call jmp) of a return probe; its jump region
                                   # then ENDS at the exit and starts before it
    record_regs: tuple | None = None   # registers a record stores (None: argument regs)
    file_id: Any = None            # (dev, inode, file offset) mapped at addr when armed
    jump: bytes | None = None      # the jump written (or to write) at addr
    gone: bool = False             # its address space is not the one we patched
    usdt: Any = None               # symbols.UsdtSite when the site is a USDT marker

    @property
    def patch_addr(self) -> int:
        """Where the jump is (or would be) written: the site itself, or for an exit
        the start of its region, a few instructions before the exit."""
        return self.region.addr if self.region is not None else self.addr

    def enabled_probes(self) -> list["Probe"]:
        return [p for p in self.probes if p.enabled]

    def wanted_kind(self) -> str | None:
        """The detour handler this site needs: python (a trap per hit) if any enabled
        probe has a Python-side handler, count if all are counters, None if none enabled."""
        kinds = {p.handler for p in self.enabled_probes()}
        if not kinds:
            return None
        if "python" in kinds:
            return "python"
        return "record" if "record" in kinds else "count"


class Probe:
    """A registered probe.

    ``addr`` is the address the user asked for (absolute, target); the site may sit a
    few bytes later (endbr64 is skipped like the kernel's ``arch_adjust_kprobe_addr``).
    ``pre_handler(probe, regs)`` runs in the tracer for ``python``/``print`` handlers.
    """

    def __init__(self, spec: str, addr: int, site: Site, handler: str,
                 pre_handler: Callable | None, symbol: str | None, want_optimize: bool):
        self.id = next(_ids)
        self.spec = spec
        self.addr = addr
        self.site = site
        self.handler = handler
        self.pre_handler = pre_handler
        self.symbol = symbol
        self.want_optimize = want_optimize
        self.enabled = True
        self.gone_reason: str | None = None
        self.registered = True
        self.nerrors = 0            # exceptions raised by pre_handler
        self.nargs = 6              # argument registers a record captures (0-6)
        self.final_state: ProbeState | None = None   # state when the tracer detached
        self.final_reason: str | None = None
        self.retprobe = None        # the ReturnProbe this entry/exit probe belongs to
        self._hits = 0              # hits seen by the tracer (int3 path, detour traps)
        self._frozen = [0, 0]       # in-process [hits, missed] while previously enabled
        self._snap = [0, 0]         # site [hits, missed] counters when last enabled

    # -- predicates ---------------------------------------------------------------
    @property
    def is_gone(self) -> bool:
        return self.gone_reason is not None

    @property
    def is_optimized(self) -> bool:
        return not self.is_gone and self.enabled and self.site.optimized

    @property
    def state(self) -> ProbeState:
        """The probe's state; after detach, the state it had while attached."""
        if self.final_state is not None:
            return self.final_state
        if self.is_gone:
            return ProbeState.GONE
        if not self.enabled:
            return ProbeState.DISABLED
        if self.site.optimized:
            return ProbeState.OPTIMIZED
        if self.site.armed:
            return ProbeState.INT3
        return ProbeState.REGISTERED

    @property
    def reason(self) -> str | None:
        """Why this probe is not optimized (None when optimized or not asked to be)."""
        if self.final_state is not None:
            return self.final_reason
        if self.is_gone:
            return self.gone_reason
        if self.state is ProbeState.OPTIMIZED or not self.want_optimize \
                or not self.site.want_optimize:
            return None
        if self.site.refusal is not None:
            return str(self.site.refusal)
        if self.state is ProbeState.INT3:
            if self.site.deferred:
                return f"deferred: {self.site.deferred}"
            return "optimization pending"
        return None

    @property
    def served_by(self) -> str | None:
        """Who handles a hit: ``in-process`` (a jump to a detour with a count/record
        handler), ``kernel uprobe`` (an int3 site the kernel's uprobe serves),
        ``tracer`` (a stop per hit: Python handlers, int3 sites on ptrace), or None
        when the probe is not live."""
        if self.is_gone or not self.enabled or not (self.site.armed or self.final_state):
            return None
        if self.site.kernel_served:
            return "kernel uprobe"
        if self.state is ProbeState.OPTIMIZED and self.site.detour_kind != "python":
            return "in-process"
        return "tracer"

    def __repr__(self) -> str:
        return f"<Probe #{self.id} {self.spec} @{self.addr:#x} {self.state.value}>"


def site_counts(site: Site) -> list[int]:
    """The site's [hits, missed] counted without the tracer: in-process counters plus
    the kernel uprobe's, while and since it served the site."""
    k = site.kernel.counts(site) if site.kernel is not None else [0, 0]
    return [(site.counter.value() if site.counter is not None else 0)
            + site.kernel_base[0] + k[0],
            (site.missed.value() if site.missed is not None else 0)
            + site.kernel_base[1] + k[1]]


def _probe_counted(self: Probe, i: int) -> int:
    n = self._frozen[i]
    if self.enabled:
        n += site_counts(self.site)[i] - self._snap[i]
    return n


def _probe_nhit(self: Probe) -> int:
    """Hits so far: tracer-seen hits plus in-process counted ones (exact; the counters
    live in a shared mapping the tracer reads even after the target is gone)."""
    return self._hits + _probe_counted(self, 0)


def _probe_nmissed(self: Probe) -> int:
    """Hits whose record was dropped because the ring buffer was full (the kernel's
    nmissed: the hit happened, the handler's work did not)."""
    return _probe_counted(self, 1)


Probe.nhit = property(_probe_nhit)
Probe.nmissed = property(_probe_nmissed)
