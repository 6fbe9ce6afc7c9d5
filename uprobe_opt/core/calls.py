"""Return probes: a probe on every exit of a function, and calls matched in the consumer.

No return address is ever replaced (the way kernel uretprobes, bpftrace, bcc and Frida
do it, which breaks stack switching, unwinders, backtraces and CET shadow stacks).
Instead, ``SPEC%return`` (perf probe's spelling; ``uretprobe:SPEC`` is accepted too)
puts a probe on each exit the arch finds in the function's decoded body (each ``ret``,
each tail-call ``jmp``), and, for the handlers that record, one on the function's
entry.  Each exit is a site of its own: int3 first, jump-optimized where proven safe.

Matching (:class:`CallMatcher`): at the entry, rsp holds the address of the
return-address slot the caller's ``call`` pushed; at each exit rsp points at the very
same slot.  So per thread, records are matched by rsp on a stack:

* an entry at rsp E first closes, as **unwound**, every open entry at rsp <= E (a call
  at the same or a higher stack address cannot be nested in them: they ended without
  passing an exit: longjmp, an exception unwinding through, a signal handler's
  siglongjmp);
* an exit at rsp X closes, as unwound, every open entry at rsp < X (deeper calls that
  never returned), then matches the open entry at rsp == X of the same function:
  one **call**, duration = exit time - entry time;
* an exit with no such entry (the call began before the probe was armed) counts as an
  exit without entry;
* when tracing ends, entries of threads that are gone (pthread_exit, a killed thread)
  and entries above the thread's current rsp are unwound; the others are **in
  flight** (the function was still running, or never returns).

A tail call ends the call at the jump: the callee's time is not part of the caller's
(``f`` tail-calling ``g`` shows as a call of ``f`` ending at the jmp, then a call of
``g`` at the same rsp).  Records of one thread arrive in the order it made them
(core/records.py), which is all the matching needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# numpy only in CallMatcher.feed: the CLI imports split_return_spec to check options
# before anything is attached.

RETURN_SUFFIX = "%return"
RETURN_PREFIX = "uretprobe:"
ENTRY_PREFIX = "uprobe:"
TAIL_CALL_NOTE = "a tail call ends the call at its jmp (the callee's time is not included)"


def split_return_spec(spec: str) -> tuple[str, bool]:
    """``("work", True)`` for ``work%return`` or ``uretprobe:work``; ``("work", False)``
    for ``work`` or ``uprobe:work``; other specs are returned unchanged."""
    text = spec.strip()
    if text.endswith(RETURN_SUFFIX):
        return text[: -len(RETURN_SUFFIX)], True
    if text.startswith(RETURN_PREFIX):
        return text[len(RETURN_PREFIX):], True
    if text.startswith(ENTRY_PREFIX):
        return text[len(ENTRY_PREFIX):], False
    return spec, False


@dataclass
class CallStats:
    """Counters of one return probe's calls (see the module docstring)."""
    entries: int = 0
    exits: int = 0
    calls: int = 0            # entries matched with their exit
    unwound: int = 0
    in_flight: int = 0        # set when tracing ends
    exits_without_entry: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Call:
    """One matched call (or an exit without entry: ``start_ns`` None).  Times are
    CLOCK_MONOTONIC ns; ``retval`` is rax at the exit, ``rdx`` the high half of a
    128-bit result (both None at a tail call: the callee makes the value); ``args`` the entry's argument registers (rdi, rsi, rdx, rcx, r8)
    when recorded; ``exit_addr`` the exit instruction (absolute, target)."""
    probe: "ReturnProbe"
    tid: int
    start_ns: int | None
    end_ns: int
    retval: int | None
    rdx: int | None
    args: tuple
    exit_addr: int
    rsp: int

    @property
    def duration_ns(self) -> int | None:
        return None if self.start_ns is None else self.end_ns - self.start_ns


class ReturnProbe:
    """What ``SPEC%return`` registered: ``exits`` (one Probe per exit site),
    ``entry`` (the entry Probe when the handler records, else None), ``exit_points``
    (the arch's Exit values, same order), ``notes`` (exits that cannot be probed).
    ``nhit`` is the number of exits taken; ``stats`` the matched calls;
    ``durations`` the per-call durations in ns (matched calls, in order)."""

    def __init__(self, spec: str, base: str, resolved, handler: str):
        self.spec = spec
        self.base = base
        self.addr = resolved.func_addr
        self.func_addr = resolved.func_addr
        self.func_size = resolved.func_size
        self.symbol = resolved.symbol
        self.handler = handler
        self.exits: list = []
        self.exit_points: list = []
        self.entry = None
        self.notes: list[str] = []
        self.stats = CallStats()
        self.durations: list[int] = []

    def probes(self) -> list:
        return ([self.entry] if self.entry is not None else []) + list(self.exits)

    @property
    def nhit(self) -> int:
        return sum(p.nhit for p in self.exits)

    @property
    def nmissed(self) -> int:
        return sum(p.nmissed for p in self.probes())

    @property
    def state(self):
        """optimized when every exit is; int3 when any is (the summary's exit rows
        say which); the entry's state when there is no exit."""
        from uprobe_opt.core.probe import ProbeState
        states = [p.state for p in self.exits] or [p.state for p in self.probes()]
        if not states:
            return ProbeState.REGISTERED
        if all(s is ProbeState.OPTIMIZED for s in states):
            return ProbeState.OPTIMIZED
        for s in (ProbeState.GONE, ProbeState.INT3, ProbeState.DISABLED):
            if s in states:
                return s
        return states[0]

    @property
    def reason(self) -> str | None:
        parts = []
        for probe, point in zip(self.exits, self.exit_points):
            if probe.reason:
                parts.append(f"{point.describe(self.func_addr, self.symbol)}: {probe.reason}")
        if self.entry is not None and self.entry.reason:
            parts.append(f"entry: {self.entry.reason}")
        if not self.exits:
            parts.append("no exit found (the function never returns, or leaves only "
                         "through indirect jumps)")
        return "; ".join(parts) or None

    def exit_rows(self) -> list[dict]:
        rows = []
        for probe, point in zip(self.exits, self.exit_points):
            rows.append({"exit": point.describe(self.func_addr, self.symbol),
                         "kind": point.kind, "address": f"{point.addr:#x}",
                         "state": probe.state.value, "hits": probe.nhit,
                         "nmissed": probe.nmissed, "reason": probe.reason})
        return rows

    def summary_row(self) -> dict:
        row = {"probe": self.spec, "address": f"{self.addr:#x}",
               "state": self.state.value, "hits": self.nhit, "nmissed": self.nmissed,
               "reason": self.reason, "exits": self.exit_rows()}
        if self.entry is not None:
            row["entry"] = {"address": f"{self.entry.site.addr:#x}",
                            "state": self.entry.state.value, "hits": self.entry.nhit}
            row["calls"] = self.stats.as_dict()
        if any(p.kind == "tail" for p in self.exit_points):
            row["tail_calls"] = TAIL_CALL_NOTE
        return row

    def __repr__(self) -> str:
        return f"<ReturnProbe {self.spec} {len(self.exits)} exits {self.state.value}>"


@dataclass
class _Role:
    entry: bool
    probes: list = field(default_factory=list)    # ReturnProbes of this site
    func: int = 0
    rsp_index: int = 0
    nargs: int = 0
    exit_addr: int = 0
    tail: bool = False        # a tail-call exit: rax is not a return value there


class CallMatcher:
    """Pairs entry and exit records per thread by rsp (module docstring).  ``feed`` a
    drained batch (records.HIT_DTYPE); matched calls go to ``on_call`` (or are only
    counted, with ``durations`` kept, when it is None)."""

    def __init__(self):
        self.roles: dict[int, _Role] = {}
        # tid -> open entries (rsp, start_ns, entry site, saved args), innermost last
        self.stacks: dict[int, list[tuple]] = {}
        self.on_call: Callable | None = None
        self.keep_calls = False
        self.calls: list[Call] = []

    def add(self, rp: ReturnProbe) -> None:
        """Learn the sites of a return probe (after it is registered)."""
        if rp.entry is not None:
            regs = rp.entry.site.record_regs or ()
            role = self.roles.setdefault(rp.entry.site.id, _Role(True, func=rp.func_addr))
            role.rsp_index = regs.index("rsp") if "rsp" in regs else -1
            role.nargs = max(0, len(regs) - 1)
            role.probes.append(rp)
        for probe in rp.exits:
            role = self.roles.setdefault(probe.site.id, _Role(False, func=rp.func_addr,
                                                              exit_addr=probe.site.addr))
            role.tail = probe.site.exit is not None and probe.site.exit.kind == "tail"
            role.probes.append(rp)

    def feed(self, batch) -> None:
        """Match a drained batch (numpy records of core.records.HIT_DTYPE).  Counting is
        vectorized; the stack walk is one tight loop over plain lists (the order of a
        thread's records is what matters)."""
        import numpy as np
        if not len(batch) or not self.roles:
            return
        ids = np.fromiter(self.roles, dtype=np.uint32)
        mine = np.isin(batch["site"], ids)
        if not mine.any():
            return
        sub = batch[mine]
        sites = sub["site"]
        # 1. entries and exits per site, without a loop
        uniq, counts = np.unique(sites, return_counts=True)
        for site, count in zip(uniq.tolist(), counts.tolist()):
            role = self.roles[site]
            for rp in role.probes:
                if role.entry:
                    rp.stats.entries += count
                else:
                    rp.stats.exits += count
        # 2. the rsp of each record: args[rsp_index] at an entry, args[2] at an exit
        col = np.zeros(int(ids.max()) + 1, dtype=np.int64)
        for site, role in self.roles.items():
            col[site] = role.rsp_index if role.entry else 2
        rsp = sub["args"][np.arange(len(sub)), col[sites]]
        want_calls = self.keep_calls or self.on_call is not None
        args = sub["args"].tolist() if want_calls else None
        self._walk(sites.tolist(), sub["time_ns"].tolist(), sub["tid"].tolist(),
                   rsp.tolist(), args)

    def _walk(self, sites, times, tids, rsps, args) -> None:
        roles, stacks = self.roles, self.stacks
        unwound: dict[int, int] = {}
        for i in range(len(sites)):
            role = roles[sites[i]]
            rsp = rsps[i]
            stack = stacks.get(tids[i])
            if stack is None:
                stack = stacks[tids[i]] = []
            if role.entry:
                if role.rsp_index < 0:
                    continue
                while stack and stack[-1][0] <= rsp:
                    site = stack.pop()[2]
                    unwound[site] = unwound.get(site, 0) + 1
                saved = tuple(args[i][:role.nargs]) if args is not None else ()
                stack.append((rsp, times[i], sites[i], saved))
                continue
            while stack and stack[-1][0] < rsp:
                site = stack.pop()[2]
                unwound[site] = unwound.get(site, 0) + 1
            top = stack[-1] if stack else None
            if top is not None and top[0] == rsp and roles[top[2]].func == role.func:
                stack.pop()
                self._ended(role, tids[i], top[1], times[i], rsp, args, top[3], i)
            else:
                self._ended(role, tids[i], None, times[i], rsp, args, (), i)
        for site, n in unwound.items():
            for rp in roles[site].probes:
                rp.stats.unwound += n

    def _ended(self, role, tid, start, end, rsp, args, entry_args, exit_i) -> None:
        """One exit: a matched call (start set) or an exit without entry."""
        for rp in role.probes:
            if start is None:
                rp.stats.exits_without_entry += 1
                if rp.entry is None:
                    continue
            else:
                rp.stats.calls += 1
                rp.durations.append(end - start)
            if args is None:
                continue
            retval, rdx = (None, None) if role.tail else (args[exit_i][0], args[exit_i][1])
            call = Call(rp, tid, start, end, retval, rdx, entry_args, role.exit_addr, rsp)
            if self.keep_calls:
                self.calls.append(call)
            if self.on_call is not None:
                self.on_call(call)

    def finish(self, live_rsp: dict[int, int]) -> None:
        """Tracing ended: close what is still open.  ``live_rsp``: tid -> current rsp of
        every thread still alive (read while all were stopped); others are gone."""
        for tid, stack in self.stacks.items():
            rsp = live_rsp.get(tid)
            while stack:
                item = stack.pop()
                gone = rsp is None or rsp > item[0]
                for rp in self.roles[item[2]].probes:
                    if gone:
                        rp.stats.unwound += 1
                    else:
                        rp.stats.in_flight += 1
        self.stacks.clear()


# -- registration (used by session.Tracer) ------------------------------------------------
RECORDING = ("record", "latency", "print")


def return_items(manager, rp_spec: str, base: str, resolved, handler: str,
                 pre_handler, optimize: bool):
    """The ReturnProbe for ``rp_spec`` and the register_many items of its sites:
    (rp, entry_item or None, [(exit, item), ...]).  Raises SymbolError when the spec
    is not a whole function or its body cannot be decoded to find the exits."""
    import dataclasses
    from uprobe_opt.errors import SymbolError
    pid = manager.target.pid
    if resolved.func_addr is None or not resolved.func_size:
        raise SymbolError(f"{rp_spec}: no function symbol with a size contains "
                          f"{resolved.addr:#x}: its exits cannot be found", pid=pid)
    if resolved.addr != resolved.func_addr:
        raise SymbolError(f"{rp_spec}: a return probe takes a function, not an address "
                          f"inside one ({base} is {resolved.func_addr:#x}"
                          f"+{resolved.addr - resolved.func_addr:#x})", pid=pid)
    code = manager.recovered(resolved.func_addr, resolved.func_size)
    found = manager.arch.find_exits(code, resolved.func_addr, resolved.func_size)
    if not isinstance(found, tuple):
        raise SymbolError(f"{rp_spec}: {found}", addr=resolved.addr, pid=pid)
    exits, notes = found
    rp = ReturnProbe(rp_spec, base, resolved, handler)
    rp.notes = list(notes)
    kind = "record" if handler in RECORDING else handler
    entry_item = None
    if kind == "record":
        entry_item = (resolved, "record", None, rp_spec, optimize)
    exit_items = []
    for point in exits:
        where = point.describe(resolved.func_addr, resolved.symbol)
        site = dataclasses.replace(resolved, addr=point.addr,
                                   offset=point.addr - resolved.func_addr,
                                   spec=f"{rp_spec} ({where})")
        exit_items.append((point, (site, kind, pre_handler, site.spec, optimize)))
    return rp, entry_item, exit_items


def attach_roles(manager, rp: ReturnProbe, entry, exit_probes, points, nargs: int) -> None:
    """After register_many: mark the sites (exit, record registers) and the probes."""
    arch = manager.arch
    if entry is not None:
        rp.entry = entry
        entry.retprobe = rp
        manager.set_record_regs(entry.site, arch.entry_regs(nargs))
    for probe, point in zip(exit_probes, points):
        probe.retprobe = rp
        probe.site.exit = point
        manager.set_record_regs(probe.site, arch.exit_regs())
        rp.exits.append(probe)
        rp.exit_points.append(point)
