"""The public API: a traced process and its probes.

Example::

    from uprobe_opt import Tracer

    with Tracer.spawn(["./loop", "1000"]) as t:
        p = t.add_probe("work", handler="count")
        t.run()                      # until the program exits
    print(p.nhit, p.state.value)     # 1000 optimized

    def double_first_arg(probe, regs):
        regs.rdi *= 2                # the probed function sees the new value

    with Tracer.attach(pid) as t:
        t.add_probe("libc:getpid", pre_handler=lambda p, r: None)
        t.run(duration=5.0)          # then detach: the code is byte-identical again

Hands-off: once every live probe runs in-process (count and record handlers on
optimized sites), :meth:`Tracer.run` lets go of ptrace entirely (every thread is
detached; counters and records are read through shared mappings; the target's exit is
learnt from a pidfd) and seizes the target again only for a window: to patch, and at
:meth:`Tracer.detach` to verify and restore.  :attr:`Tracer.mode` says which.

Every method runs on the thread that created the Tracer (ptrace requires it).
"""
from __future__ import annotations

import os
import struct
import time
from typing import Callable, Iterable, Sequence

from uprobe_opt.core.arch import load_arch
from uprobe_opt.core.manager import RETRY_DELAY, ProbeManager
from uprobe_opt.core.probe import Probe
from uprobe_opt.errors import (AccessDenied, LibraryNotLoaded, ProcessGone, SymbolError,
                              UsageError)
from uprobe_opt.symbols import SymbolResolver
from uprobe_opt.target import Target

DELIVER_SLICE = 4096     # records handed to on_records between two event services


def _not_in_image(spec: str, error: Exception) -> dict:
    """The summary row of a spec that does not resolve in the program the process runs
    (after an exec, or in a forked child of a process that exec'd)."""
    return {"probe": spec, "address": "-", "state": "gone", "hits": 0, "nmissed": 0,
            "reason": f"not in this program: {error}", "served_by": None}


def _exe_name(target) -> str:
    try:
        return os.readlink(target.proc_path("exe"))
    except OSError:
        return "a new program"


class Tracer:
    """One traced process.  Create with :meth:`attach` (the process keeps running: it
    is stopped only for the windows that patch it) or :meth:`spawn` (the program is
    held at its entry point until :meth:`run`, so probes added before are armed before
    its first instruction).

    ``optimize``: jump-optimize probes when safe (False: int3 probes only, the CLI's
    ``--no-optimize``).  ``log``: callable for diagnostics (default: stderr).
    ``buffer_size``: bytes of the record ring buffer (default 8 MiB).
    ``kernel_uprobes``: hand int3 sites the optimizer refuses (count and record
    handlers) to the kernel's own uprobe through perf_event_open, so their hits stop
    the target no more (see uprobe_opt.core.kernel); where the kernel cannot (no
    uprobe events, not root) they stay on ptrace.  ``on_records``:
    callable receiving each drained batch of records (a numpy array of
    :data:`uprobe_opt.core.records.HIT_DTYPE`); without it batches accumulate in
    ``record_batches`` (see :meth:`records`).  ``hands_off``: let go of ptrace when no
    probe needs the tracer (default True; False keeps every thread traced until
    detach, e.g. to learn the exit status of a process that is not our child).
    ``progress``: callable ``(phase, done, total)`` told of long batches (resolving,
    checking sites, arming, optimizing), e.g. :class:`uprobe_opt.progress.PhaseProgress`.
    """

    def __init__(self, target: Target, *, optimize: bool = True, log: Callable = None,
                 buffer_size: int | None = None, on_records: Callable | None = None,
                 kernel_uprobes: bool = True, hands_off: bool = True,
                 progress: Callable | None = None):
        self.target = target
        self.hands_off = hands_off
        self._end_mode: tuple[str, str | None] | None = None
        self._image_kw = dict(optimize=optimize, log=log, buffer_size=buffer_size,
                              kernel_uprobes=kernel_uprobes, progress=progress)
        self._new_image(**self._image_kw)
        self.on_records = on_records
        self.record_batches: list = []
        from uprobe_opt.core.calls import CallMatcher
        self.calls = CallMatcher()          # return probes: entries matched with exits
        self.return_probes: list = []
        self._stop_requested = False
        self._detached = False
        self.notes: list[str] = []
        self.exec_seen = False
        self.libwatch = None          # pending probes (uprobe_opt.pending), when any
        # follower(tracer, ForkedChild): told of every fork after our bytes left the
        # child; it may adopt the child (uprobe_opt.follow, ``-f``).  None: let it go.
        self.follower: Callable | None = None
        self.attached_reason: str | None = None   # why hands_off is False, if told
        self._let_go_at_start = False       # attach(): see start()
        target.fork_hook = self._on_fork
        # --follow-exec: specs resolved again after an exec (see follow_exec)
        self.follow_execs = False
        self._given: list[tuple] = []       # add_probes calls: (specs, pre, handler, ...)
        self.former_rows: list[dict] = []   # summary rows of the images exec'd away
        self.images = 1                     # programs traced in this process so far

    def _new_image(self, *, optimize, log, buffer_size, kernel_uprobes, progress) -> None:
        """The resolver and the probe manager of the program the target runs now."""
        target = self.target
        # /proc/TID of a live thread when the leader is a zombie (pthread_exit): it has
        # no mm, so its /proc/PID/map_files, exe and root are unreadable; a thread's
        # /proc/TID view is the same process.
        self.resolver = SymbolResolver(pid=target.live_task())
        self.manager = ProbeManager(target, load_arch(), optimize=optimize, log=log,
                                    kernel_uprobes=kernel_uprobes)
        if progress is not None:
            self.manager.progress = progress
        if buffer_size is not None:
            self.manager.records.buffer_bytes = buffer_size
        self.manager.rseq_offset = self._find_rseq_offset()
        self.manager.landing_pads = self.resolver.landing_pads
        self.manager.function_facts = self.resolver.function_facts
        self.manager.let_go_check = self._lets_go_in_windows

    # -- construction -----------------------------------------------------------------
    @classmethod
    def attach(cls, pid: int, **kw) -> "Tracer":
        """Trace process ``pid``, which keeps running: nothing is stopped until probes
        are armed (:meth:`add_probes`, one window per batch).  Raises ProcessGone (no
        such pid), UsageError (a thread id, a kernel thread) or AccessDenied (traced by
        another tracer); EPERM from ptrace (see README, ptrace_scope) is raised as
        AccessDenied by the first add_probes."""
        target = Target.attach(pid, stop=False)
        try:
            tracer = cls(target, **kw)
        except BaseException:
            target.detach()
            raise
        tracer._let_go_at_start = True
        return tracer

    @classmethod
    def spawn(cls, argv: Sequence[str], *, stdin=None, stdout=None, stderr=None,
              env=None, cwd=None, **kw) -> "Tracer":
        """Start ``argv`` traced, held at its entry point (AT_ENTRY) with its libraries
        mapped.  stdin/stdout/stderr are file descriptors (int) or None to inherit."""
        target = Target.spawn([os.fspath(a) for a in argv], stdin=stdin, stdout=stdout,
                              stderr=stderr,
                              env=env, cwd=cwd)
        try:
            return cls(target, **kw)
        except BaseException:
            target.kill()
            raise

    def _find_rseq_offset(self) -> int | None:
        """glibc's __rseq_offset (fs-relative offset of the thread's struct rseq), read
        from the target while it runs; None if this libc does not register rseq.  glibc
        (>= 2.35) defines it in ld.so only: that one small symbol table is read, not
        every library's."""
        for ldso in ("ld-linux-x86-64.so.2", "ld-linux-x32.so.2", "ld-linux"):
            try:
                addr = self.resolver.find_data_symbol("__rseq_offset", lib=ldso)
                if addr is None:
                    continue
                (off,) = struct.unpack("<q", self.target.read(addr, 8))
                return off or None
            except Exception:
                continue
        return None

    # -- mode -------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``"hands-off"`` while no thread is traced (every live probe runs in-process)
        or ``"attached"``; after :meth:`detach`, the mode the trace ended in."""
        return self._mode()[0]

    @property
    def mode_reason(self) -> str | None:
        """Why the tracer is (or was, at the end) attached, e.g. ``"2 int3 sites need
        the tracer"``; None in hands-off mode."""
        return self._mode()[1]

    def _mode(self) -> tuple[str, str | None]:
        if self._end_mode is not None:
            return self._end_mode
        if self.target.released or self.target.exited_released:
            return ("hands-off", None)
        if not self.hands_off:
            return ("attached", self.attached_reason
                    or "hands-off disabled (hands_off=False)")
        reason = self.manager.tracer_reason()
        if reason is None:
            reason = ("held at its entry point until run()" if self.target.stopped
                      else "not let go yet")
        return ("attached", reason)

    def _let_go(self) -> None:
        """Release ptrace when nothing needs it (hands-off); see ProbeManager.let_go."""
        if (not self.hands_off or self.target.released or self.target.exited
                or self.exec_seen or self.manager.optimizing
                or self.manager.tracer_reason() is not None):
            return
        try:
            self.manager.let_go()
        except ProcessGone:
            pass

    def _lets_go_in_windows(self) -> bool:
        """ProbeManager.may_release: a window with nothing left for the tracer ends
        by letting go (one window less than a let-go of its own); see start() for
        why only a process attached while it ran."""
        return self._let_go_at_start and self.hands_off and not self.exec_seen

    def _on_fork(self, child) -> None:
        """Target.fork_hook: the child gets the original bytes back before it runs
        (ProbeManager.on_fork), then the follower may adopt it."""
        self.manager.on_fork(child)
        if self.follower is not None:
            self.follower(self, child)

    # -- probes -----------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.target.pid

    @property
    def probes(self) -> list[Probe]:
        return [p for p in self.manager.probes
                if p.registered and not getattr(p, "internal", False)]

    @property
    def pending_probes(self) -> list:
        """Specs whose library is not loaded, or was unloaded (uprobe_opt.pending)."""
        return self.libwatch.pending if self.libwatch is not None else []

    def add_probe(self, spec: str, pre_handler: Callable | None = None, *,
                  handler: str | None = None, optimize: bool = True, nargs: int = 6
                  ) -> Probe:
        """Register a probe at ``spec`` (``SYMBOL``, ``SYMBOL+0xOFF``, ``LIB:SYMBOL``,
        ``0xADDR``) and arm it (int3).  ``handler``: ``python`` (default when a
        pre_handler is given: ``pre_handler(probe, regs)`` runs in the tracer at each
        hit), ``count`` (in-process counter, no stop per hit once optimized),
        ``record`` (a record per hit in the shared ring buffer: time, thread and the
        first ``nargs`` integer argument registers; no stop per hit once optimized).
        The probe is queued for jump optimization unless ``optimize`` is False.
        Raises SymbolError (unknown/ambiguous symbol, not an instruction boundary, not
        executable), UsageError."""
        return self.add_probes([spec], pre_handler, handler=handler, optimize=optimize,
                               nargs=nargs)[0]

    def add_probes(self, specs: Iterable[str], pre_handler: Callable | None = None, *,
                   handler: str | None = None, optimize: bool = True, nargs: int = 6
                   ) -> list[Probe]:
        """Like :meth:`add_probe` for many specs at once: one stop of all threads for
        the whole batch, and nothing armed if any spec is bad."""
        from uprobe_opt.core.calls import split_return_spec
        if handler is None:
            handler = "python" if pre_handler is not None else "count"
        if not 0 <= nargs <= 6:
            raise UsageError(f"nargs must be 0..6, not {nargs}")
        specs = list(specs)
        out = self._add_probes(specs, pre_handler, handler, optimize, nargs)
        self._given.append((specs, pre_handler, handler, optimize, nargs))
        return out

    def _add_probes(self, specs, pre_handler, handler, optimize, nargs) -> list:
        from uprobe_opt.core.calls import split_return_spec
        if not any(split_return_spec(spec)[1] for spec in specs):
            if handler == "latency":
                raise UsageError("handler 'latency' needs a return probe (SPEC%return)")
            # One spec may name many sites (a glob: ``libc:str*``); site.spec is the spec
            # as given, ``libc:strlen -> __strlen_avx2`` for an IFUNC, LIB:NAME per match.
            items, plan = [], []
            for i, spec in enumerate(specs):
                try:
                    sites = self.resolver.resolve_all(split_return_spec(spec)[0])
                except LibraryNotLoaded as e:
                    plan.append(self._pending(spec, handler, pre_handler, optimize,
                                              nargs, e))
                    continue
                except SymbolError:
                    self._raise_if_exec()        # the names were read mid-exec
                    raise
                plan.append(len(sites))
                items += [(site, handler, pre_handler, site.spec, optimize)
                          for site in sites]
                self.manager.progress("resolving", i + 1, len(specs))
            probes = iter(self.manager.register_many(items, nargs=nargs))
            return [p for entry in plan
                    for p in ([entry] if not isinstance(entry, int)
                              else [next(probes) for _ in range(entry)])]
        return self._add_with_returns(specs, pre_handler, handler, optimize, nargs)

    def _raise_if_exec(self) -> None:
        """ProcessGone when the process exec'd while we read its names: the failure
        to resolve is then the exec's, not the user's spec's."""
        if self.target.mm_replaced():
            raise ProcessGone(f"process {self.pid} exec'd a new program while "
                              "uprobe-opt prepared its probes: nothing was written",
                              pid=self.pid)

    def _pending(self, spec, handler, pre_handler, optimize, nargs, error):
        """A PendingProbe for ``spec``, whose library is not loaded (uprobe_opt.pending)."""
        from uprobe_opt.pending import LibraryWatch, PendingProbe
        if self.libwatch is None:
            self.libwatch = LibraryWatch(self)
        pp = PendingProbe(spec, handler, pre_handler, optimize, nargs, error.lib)
        self.libwatch.add(pp, error)
        return pp

    def _add_with_returns(self, specs, pre_handler, handler, optimize, nargs) -> list:
        """add_probes with return probes among the specs: every site (plain probes,
        entries, exits) is registered in one all-or-nothing batch.  A return probe
        comes back as a :class:`~uprobe_opt.core.calls.ReturnProbe`."""
        from uprobe_opt.core.calls import attach_roles, return_items, split_return_spec
        plain = "record" if handler in ("latency", "print") else handler
        items, plan = [], []
        for spec in specs:
            base, is_return = split_return_spec(spec)
            resolved = self.resolver.resolve(base)
            if not is_return:
                plan.append(("plain", len(items)))
                items.append((resolved, plain, pre_handler, spec, optimize))
                continue
            rp, entry_item, exit_items = return_items(self.manager, spec, base, resolved,
                                                      handler, pre_handler, optimize)
            first = len(items)
            if entry_item is not None:
                items.append(entry_item)
            items += [item for _, item in exit_items]
            plan.append((rp, first, entry_item is not None, [p for p, _ in exit_items]))
        probes = self.manager.register_many(items, nargs=nargs)
        out = []
        for entry in plan:
            if entry[0] == "plain":
                out.append(probes[entry[1]])
                continue
            rp, first, has_entry, points = entry
            entry_probe = probes[first] if has_entry else None
            exits = probes[first + has_entry: first + has_entry + len(points)]
            attach_roles(self.manager, rp, entry_probe, exits, points, nargs)
            self.return_probes.append(rp)
            self.calls.add(rp)
            out.append(rp)
        return out

    def enable(self, probe: Probe) -> None:
        self.manager.enable(probe)

    def disable(self, probe: Probe) -> None:
        """Stop counting and calling the handler; the site is unoptimized (and disarmed
        when no enabled probe is left there)."""
        self.manager.disable(probe)

    def remove_probe(self, probe: Probe) -> None:
        """Unregister a probe; the last probe of a site restores its original bytes."""
        self.manager.unregister(probe)

    def set_optimize(self, enabled: bool) -> None:
        self.manager.set_optimize(enabled)

    def optimize(self, timeout: float = 1.0) -> None:
        """Optimize queued probes now (several quiescence attempts, up to ``timeout``
        seconds); probes that stay int3 keep their reason."""
        deadline = time.monotonic() + timeout
        while self.manager.optimizing and time.monotonic() < deadline:
            self.manager.optimize_pending(force=True)
            if self.target.stopped:
                break        # held: nothing can move until the target runs again
            if self.manager.optimizing:
                self.process_events(RETRY_DELAY)

    # -- running ----------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask :meth:`run` to return at its next wake-up (safe from a signal handler)."""
        self._stop_requested = True

    @property
    def exited(self) -> bool:
        return self.target.exited

    @property
    def exit_status(self) -> int | None:
        """The target's raw wait status once it exited (os.waitstatus_to_exitcode)."""
        return self.target.exit_status

    @property
    def exit_code(self) -> int | None:
        st = self.target.exit_status
        return None if st is None else os.waitstatus_to_exitcode(st)

    def run(self, duration: float | None = None, until: Callable[[], bool] | None = None
            ) -> None:
        """Let the target run, handling hits, until it exits or execs, ``duration``
        seconds pass, ``until()`` returns True, or :meth:`request_stop` is called."""
        self.start()
        deadline = None if duration is None else time.monotonic() + duration
        while not (self._stop_requested or self.target.exited or self.exec_seen):
            if until is not None and until():
                break
            timeout = self.wake_timeout()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                timeout = min(timeout, left)
            self.process_events(timeout)
            self.after_events()
        self.deliver_records()

    def start(self) -> None:
        """Optimize what is queued and let a held target run (run()'s first step)."""
        self.manager.optimize_pending(force=True)
        if self.target.stopped and not self.target.exited:
            self.target.resume_all()
        if self._let_go_at_start:
            # A running process attached: let go now, not after the first wait (up
            # to 0.2 s during which each signal stops the thread it is sent to until
            # we wait for it).  A spawned program keeps its tracer until then: what
            # it does first (exec a new program, fork) is seen exactly; a released
            # one notices an exec only within a wake-up.
            self._let_go()

    def wake_timeout(self) -> float:
        """Seconds run() may sleep before its next service: the ring and the kernel's
        samples are drained every 10 ms, a deferred optimization retried sooner."""
        if self.manager.optimizing:
            return RETRY_DELAY
        return 0.01 if self.manager.records.ring is not None \
            or self.manager.kernel.samples else 0.2

    def after_events(self) -> None:
        """run()'s work after each wake-up: retry the optimizer, let go of ptrace when
        nothing needs it, hand the records over."""
        if self.manager.optimizing and not self.target.exited:
            self.manager.optimize_pending()
        self._let_go()
        self.deliver_records()

    def process_events(self, timeout: float = 0.0) -> None:
        """Handle the target's pending events (probe hits, exits, exec), waiting up
        to ``timeout`` seconds for the first; no optimizer pass.  For callers that
        drive the target themselves instead of :meth:`run`."""
        for ev in self.target.poll(timeout):
            self.manager.handle_event(ev)
        self._note_exec()

    def _note_exec(self) -> None:
        if self.manager.exec_seen and not self.exec_seen:
            self.exec_seen = True
            if self.follow_execs and self.target.hold_exec and not self._detached:
                self.follow_exec()
            else:
                self.notes.append("target exec'd a new program: its probes are gone")

    def follow_exec(self) -> None:
        """``--follow-exec``: the target exec'd and is held in its exec stop
        (``Target.hold_exec``).  The old image's probes stay as ``gone`` rows
        (:attr:`former_rows`, their counts final); the new program is run to its
        entry point (its libraries mapped, none of its code run), every spec given so
        far is resolved again there and armed, then it runs: counts in the new image
        are exact from its first instruction.  A spec that names a library not loaded
        is pending; one that does not resolve is a ``gone`` row with the reason."""
        from uprobe_opt.errors import ProbeError, TargetExited
        self.deliver_records()
        self.former_rows += self.summary()
        self.target.accept_exec()
        try:
            self.target.run_to_entry()
        except TargetExited:
            return                                  # its end is reported as an exit
        self.images += 1
        self.return_probes, self.libwatch = [], None
        from uprobe_opt.core.calls import CallMatcher
        on_call = self.calls.on_call
        self.calls = CallMatcher()
        self.calls.on_call = on_call
        self._new_image(**self._image_kw)
        self.target.fork_hook = self._on_fork
        self.exec_seen = False
        given, self._given = self._given, []
        armed, missing = self.add_given(given)
        exe = _exe_name(self.target)
        self.notes.append(f"process {self.pid} exec'd {exe}: {armed} probe(s) armed "
                          f"again in the new program, {missing} not found there")
        self.start()

    def add_given(self, given: list[tuple]) -> tuple[int, int]:
        """Add the probes of ``given`` (another Tracer's :attr:`given`: a forked
        child's parent, or this process before its exec) spec by spec: one that does
        not resolve here is a ``gone`` row with the reason (in :attr:`former_rows`),
        not an error.  Returns (probes armed, specs not found).  Raises ProcessGone /
        TargetExited when the process died meanwhile."""
        from uprobe_opt.errors import ProbeError
        armed, missing = 0, 0
        for specs, pre, handler, optimize, nargs in given:
            for spec in specs:
                try:
                    armed += len(self.add_probes([spec], pre, handler=handler,
                                                 optimize=optimize, nargs=nargs))
                except ProbeError as e:
                    if self.target.exited or isinstance(e, ProcessGone):
                        raise
                    self.former_rows.append(_not_in_image(spec, e))
                    self._given.append(([spec], pre, handler, optimize, nargs))
                    missing += 1
        return armed, missing

    @property
    def given(self) -> list[tuple]:
        """Every add_probes call so far: (specs, pre_handler, handler, optimize, nargs)."""
        return list(self._given)

    # -- records ----------------------------------------------------------------------
    def deliver_records(self) -> int:
        """Drain the ring buffer (and int3-path records) and hand the batch to
        ``on_records`` (or keep it in ``record_batches``).  Returns the batch size."""
        batch = self.manager.records.take()
        if len(batch) and self.return_probes:
            self.calls.feed(batch)
        if len(batch):
            if self.on_records is not None:
                self._hand_over(batch)
            else:
                self.record_batches.append(batch)
        return len(batch)

    def _hand_over(self, batch) -> None:
        """on_records in slices; while attached, the target's pending events (a signal
        to re-inject, a trap) are served before each slice: a target signalled while
        we print is not kept stopped behind our output."""
        for i in range(0, len(batch), DELIVER_SLICE):
            if not (self.target.released or self.target.exited or self._detached
                    or self.exec_seen):
                self.process_events(0)
            self.on_records(batch[i:i + DELIVER_SLICE])

    def records(self):
        """All records kept so far (no ``on_records`` given), one numpy array."""
        import numpy as np
        from uprobe_opt.core.records import HIT_DTYPE
        self.deliver_records()
        if not self.record_batches:
            return np.zeros(0, dtype=HIT_DTYPE)
        return np.concatenate(self.record_batches)

    def probes_of_site(self, site_id: int) -> list[Probe]:
        """The record probes of a site id carried in records (the ``site`` field)."""
        return self.manager.records.probes_of(site_id)

    # -- results ----------------------------------------------------------------------
    def summary(self) -> list[dict]:
        """One dict per registered probe: probe (spec), address (hex string of the
        requested address), state, hits, nmissed, reason (None when optimized),
        served_by (``in-process``, ``kernel uprobe`` or ``tracer``; see
        Probe.served_by); then the return probes' rows."""
        rows = [{"probe": p.spec, "address": f"{p.addr:#x}", "state": p.state.value,
                 "hits": p.nhit, "nmissed": p.nmissed, "reason": p.reason,
                 "served_by": p.served_by}
                for p in self.probes if p.retprobe is None]
        pending = [pp.summary_row() for pp in self.pending_probes]
        return self.former_rows + rows + [r for r in pending if r is not None] + \
            [rp.summary_row() for rp in self.return_probes]

    def tracer_probes(self) -> list[Probe]:
        """Probes whose hits need the tracer: Python handlers, and int3 sites the
        kernel does not serve (``kernel_reason`` says why, when it serves none)."""
        return [p for p in self.probes
                if p.enabled and not p.is_gone and self.manager.site_needs_tracer(p.site)]

    @property
    def kernel_reason(self) -> str | None:
        """Why int3 sites cannot be handed to kernel uprobes here (None: they can)."""
        return self.manager.kernel.reason

    @property
    def pauses(self) -> list[float]:
        """Seconds each all-threads-stopped pause lasted."""
        return list(self.manager.pauses)

    # -- detach -----------------------------------------------------------------------
    def detach(self) -> None:
        """Unoptimize, disarm, restore every byte, resume every thread and detach.
        Safe to call twice and after the target died."""
        if self._detached:
            return
        self._detached = True
        self.patches_left = False    # True: another tracer held the process at the end
        self._end_mode = self._mode()
        t = self.target
        live_rsp: dict[int, int] = {}
        try:
            if not t.exited and not self.exec_seen and (
                    self.manager.has_patches() or not t.released):
                if not t.stopped:
                    # Checked while it runs; the window re-reads only the pages.
                    self.manager.preverify(self.manager.sites.values())
                    t.stop_all()     # a released target: seized again, one window
                live_rsp = self._thread_rsps()
                self.notes += self.manager.shutdown()
                self._note_exec()
        except ProcessGone:
            pass
        except AccessDenied as e:
            self.patches_left = True
            self.notes.append(f"{e}; its probes stay in place (the detours keep working "
                              "without us)")
        finally:
            t.detach()               # also releases our SIGCHLD wakeup when it exited
            self.deliver_records()
            self.manager.kernel.close()   # counts kept; events close in the background
            self.deliver_records()
            self.calls.finish(live_rsp)

    def _thread_rsps(self) -> dict[int, int]:
        """tid -> rsp of every live thread (all stopped): where each thread's stack
        stands when tracing ends, for the return probes' in-flight calls."""
        if not self.return_probes:
            return {}
        from uprobe_opt.errors import TargetError
        out = {}
        for tid in self.target.tids:
            try:
                out[tid] = self.target.get_regs(tid).rsp
            except TargetError:
                pass
        return out

    def kill(self) -> None:
        self._detached = True
        self._end_mode = self._mode()
        self.target.kill()

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False
