"""Process trees: the traced process and the processes it forks (``strace -f``).

:class:`ProcessTree` drives one :class:`~uprobe_opt.session.Tracer` per process from
the tracer thread.  A child created by fork(), or clone() without CLONE_VM, stops
before its first instruction (the kernel auto-attaches it: PTRACE_O_TRACEFORK and
TRACECLONE, ``man 2 ptrace``).  In that stop, before it runs:

1. every byte we patched goes back to the original in the child
   (:meth:`ProbeManager.on_fork`): it holds the parent's int3s and jumps;
2. the parent's detour areas and record ring are unmapped from the child.  Their data
   pages are ``MAP_SHARED`` of memfds, so the child inherited *the same* counter pages
   and ring as its parent: a hit of the child in an inherited detour would be counted
   as the parent's (and its records would land in the parent's ring).  No code of the
   child can reach them once step 1 is done; step 2 makes it impossible (an area a
   register or a stack word of the child points into is left mapped and said);
3. the child gets a Tracer of its own with the same probe specs, armed with fresh
   areas, counters and ring of its own, then it runs.

So each process's counts are its own, exact from its first instruction.  A child's
children are followed the same way.  A vfork() (or CLONE_VM) child shares its
parent's memory until it execs or exits: its hits meanwhile are its parent's (one
address space, one set of counters), as the kernel's own uprobes count them.

An exec ends the probes of that image: without ``follow_exec`` they are ``gone`` and
the process is let go (a followed child's row ends there); with it, the specs are
resolved again in the new image (:meth:`~uprobe_opt.session.Tracer.follow_exec`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from uprobe_opt.errors import ProbeError
from uprobe_opt.target.process import wait_any

FOLLOW_REASON = "following forks (-f) needs the tracer"
FOLLOW_EXEC_REASON = "following execs (--follow-exec) needs the tracer"


@dataclass(eq=False)
class Followed:
    """One process of the tree: its tracer, the pid that forked it (None for the
    first) and, once it left the trace, how (``end``: a sentence)."""
    tracer: object
    parent: int | None = None
    end: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.tracer.pid


class ProcessTree:
    """The tracer ``root`` and every process followed from it.

    ``follow_forks``: adopt forked children (else they get the original bytes back
    and run untraced, the Tracer's own behaviour).  ``tracer_kw``: keyword arguments
    for the children's Tracers (``optimize``, ``log``, ``buffer_size``...).
    ``records_for``: ``tracer -> on_records callable`` for a child's records (its site
    ids are its own).  A child gets every probe its parent was given (spec by spec:
    Tracer.add_given).  Call :meth:`run`, then :meth:`detach`; every method runs on
    the tracer thread."""

    def __init__(self, root, *, follow_forks: bool = True, follow_exec: bool = False,
                 tracer_kw: dict | None = None, records_for: Callable | None = None):
        self.root = root
        self.follow_forks = follow_forks
        self.follow_exec = follow_exec
        self.tracer_kw = dict(tracer_kw or {})
        self.records_for = records_for
        self.procs: list[Followed] = [Followed(root)]
        self._queued: list[tuple] = []   # (Target, parent Tracer, inherited ranges)
        self._follow(root)

    def _follow(self, tracer) -> None:
        if self.follow_exec:
            tracer.follow_execs = True
            tracer.target.hold_exec = True
            tracer.hands_off = False    # an exec is held only by a tracer
            tracer.attached_reason = FOLLOW_EXEC_REASON
        if not self.follow_forks:
            return
        tracer.follower = self._adopt
        if self.follow_exec:
            tracer.target.exec_child_hook = lambda child: self._adopt_exec(tracer, child)
        tracer.hands_off = False        # a fork is seen only by a tracer
        tracer.attached_reason = FOLLOW_REASON
        # A kernel uprobe's perf event is inherited by forked children (inherit=1)
        # and reading it sums their hits with ours: int3 sites stay on ptrace.
        kernel = tracer.manager.kernel
        if kernel.enabled:
            kernel.enabled = False
            kernel.reason = "kernel uprobes are not used with -f (their events are " \
                            "inherited by children: counts would not be per process)"

    @property
    def tracers(self) -> list:
        return [f.tracer for f in self.procs]

    # -- forks ------------------------------------------------------------------------
    def _adopt(self, parent, child) -> None:
        """Tracer.follower, inside the parent's poll: keep the child stopped under a
        Target of its own; it is armed after the poll (:meth:`_start_children`)."""
        target = child.adopt()
        self._queued.append((target, parent, _inherited(parent.manager)))

    def _adopt_exec(self, parent, child) -> None:
        """Target.exec_child_hook: a vfork child exec'd (a process of its own now, in
        its new program): followed like a forked child, nothing inherited to undo."""
        self._queued.append((child.adopt(), parent, None))

    def _start_children(self) -> None:
        while self._queued:
            target, parent, inherited = self._queued.pop(0)
            self._start_child(target, parent, inherited)

    def _start_child(self, target, parent, inherited) -> None:
        from uprobe_opt.session import Tracer
        kw = dict(self.tracer_kw, kernel_uprobes=False, hands_off=False)
        try:
            if inherited is None:
                target.run_to_entry()      # a vfork child's new program: to its entry
            tracer = Tracer(target, **kw)
        except ProbeError as e:
            # Not traceable as a process of its own: it runs on untraced, with the
            # original bytes it got back at the fork.
            target.detach()
            self.root.notes.append(f"forked child {target.pid} not followed: {e}")
            return
        if self.records_for is not None:
            tracer.on_records = self.records_for(tracer)
        self._follow(tracer)
        f = Followed(tracer, parent.pid)
        self.procs.append(f)
        try:
            if inherited is not None:
                f.notes += _unmap_inherited(tracer, inherited)
            tracer.add_given(parent.given)
            tracer.start()
        except ProbeError as e:
            if not tracer.exited:
                f.notes.append(f"its probes could not be armed: {e}")
                tracer.detach()
                f.end = "let go (not traced)"

    # -- running ----------------------------------------------------------------------
    def live(self) -> list[Followed]:
        return [f for f in self.procs if f.end is None]

    def run(self, duration: float | None = None, until: Callable | None = None) -> None:
        """Like Tracer.run over every process of the tree: until all of them ended,
        ``duration`` s passed, ``until()`` is true or the root's stop was requested."""
        root = self.root
        self._start_children()
        root.start()
        deadline = None if duration is None else time.monotonic() + duration
        while not root._stop_requested:
            live = [f.tracer for f in self.live()]
            if not live and not self._queued:
                break
            if until is not None and until():
                break
            timeout = min([tr.wake_timeout() for tr in live] or [0.0])
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                timeout = min(timeout, left)
            if live:
                wait_any([tr.target for tr in live], timeout)
            for tr in live:
                tr.process_events(0)
            self._start_children()
            for tr in live:
                if not (tr.exited or tr.exec_seen):
                    tr.after_events()
            self._end_finished()
        for tr in self.tracers:
            tr.deliver_records()

    def _end_finished(self) -> None:
        for f in self.live():
            tr = f.tracer
            if tr.exited:
                tr.detach()
                f.end = _exit_text(tr.exit_code)
            elif tr.exec_seen:
                # let go now: a process nobody polls would stay in its next stop
                f.end = "exec'd a new program (its probes are gone)"
                tr.detach()

    def detach(self) -> None:
        """Detach every process still traced (each gets its original bytes back),
        children adopted but not armed yet included (their bytes are the original
        already: a stopped child nobody resumes would hang its parent's wait)."""
        while self._queued:
            target, _, _ = self._queued.pop(0)
            target.detach()
        for f in self.procs:
            if f.end is None and f.parent is not None:
                f.tracer.detach()
                f.end = "still running when tracing ended"
        self.root.detach()

    # -- results ----------------------------------------------------------------------
    def summary(self) -> list[dict]:
        """Every process's Tracer.summary() rows, each with its ``pid``, in the order
        the processes were followed (the first one first)."""
        return [{"pid": f.pid, **row} for f in self.procs for row in f.tracer.summary()]

    def processes(self) -> list[dict]:
        """One dict per process: pid, parent (None for the first), end (None while
        traced, or for the first, whose end is the trace's), notes."""
        return [{"pid": f.pid, "parent": f.parent,
                 "end": None if f.parent is None else f.end, "notes": list(f.notes)}
                for f in self.procs]


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        import signal
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by signal {-code} ({name})"
    return f"exited with status {code}"


def _inherited(manager) -> list[tuple[int, int, int, int]]:
    """(start, size, data start, data inode) of every shared mapping a child forked
    now inherits from this manager's process: its detour areas and its record ring."""
    from uprobe_opt.core.detour import AREA_SIZE
    out = [(a.code_addr, AREA_SIZE, a.data_addr, a.data_inode)
           for a in manager.pool.areas if a.mapped]
    ring = manager.records.ring
    if ring is not None and not getattr(ring, "unmapped", False):
        out.append((ring.addr, ring.size, ring.addr, getattr(ring, "inode", None)))
    return out


def _unmap_inherited(tracer, inherited) -> list[str]:
    """Unmap from a freshly forked child (stopped, its bytes restored) the parent's
    areas and ring it inherited: see the module docstring, step 2.  A range is
    unmapped only when its data mapping is still the parent's memfd (same inode).
    Returns notes for ranges left mapped."""
    if not inherited:
        return []
    t = tracer.target
    maps = t.maps()
    regs = t.get_regs(t.pid)
    words = [regs.rip] + tracer.manager._stack_words(regs.rsp, maps).tolist()
    notes = []
    for start, size, data_start, inode in inherited:
        data = next((m for m in maps if m.start == data_start), None)
        if data is None or data.inode != inode:
            continue
        if any(start <= w < start + size for w in words):
            notes.append(f"inherited detour memory at {start:#x} left mapped: the "
                         "child's registers or stack point into it")
            continue
        t.munmap(start, size)
    return notes
