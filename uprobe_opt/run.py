"""One trace as the command runs it: start the target, arm the probes, run until
something ends the trace, detach, and know why it ended.

:class:`StopSignals` is installed first thing by the command's entry point: from then
on SIGINT, SIGTERM, SIGHUP and SIGQUIT only set a flag, so a signal can never land
between two patch writes, and one that arrives before any process was touched ends the
command quietly (:func:`interrupted_status`).  :class:`TraceRun` holds the decisions
around a :class:`uprobe_opt.session.Tracer`: kill or detach after bad input, how the
run ended (:class:`RunEnd`), and, in spawn mode, waiting for a program that outlives
the trace.
"""
from __future__ import annotations

import os
import select
import signal
import time
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class StopSignals:
    """What the stop handler knows: the first signal (``signum``), the tracer once it
    exists, and any other reason to stop (``request``), e.g. a failed output write."""

    def __init__(self):
        self.signum: int | None = None
        self.reason: str | None = None      # "signal", "output", "quit"
        self.detail: str | None = None
        self._tracer = None
        self._old: dict = {}
        self.later: list[int] = []          # stop signals after the first

    def install(self) -> "StopSignals":
        self._old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        # A launcher may have blocked them so that none lands before we are ready.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return self

    def hold(self) -> None:
        """Ignore the stop signals for the rest of the process: the command has
        finished.  Not a mask: a mask is per thread, and any other thread of ours may
        take the signal.  Not our handler: the interpreter resets the handlers it
        installed to SIG_DFL at exit (SIG_IGN it leaves alone)."""
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    @property
    def tracer(self):
        return self._tracer

    @tracer.setter
    def tracer(self, tracer) -> None:
        self._tracer = tracer
        if self.reason is not None and tracer is not None:
            tracer.request_stop()

    def _on_signal(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        else:
            self.later.append(signum)
        self.request("signal")

    def take_later(self) -> list[int]:
        """The stop signals that arrived after the first one, in order."""
        out, self.later = self.later, []
        return out

    def request(self, reason: str, detail: str | None = None) -> None:
        """End the trace at the tracer's next wake-up (safe from a signal handler)."""
        if self.reason is None:
            self.reason, self.detail = reason, detail
        if self._tracer is not None:
            self._tracer.request_stop()


def interrupted_status(signum: int) -> int:
    """Exit status when a signal ends the command before it touched a process."""
    return 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class RunEnd:
    """How a trace ended.  ``kind``: ``exited`` (``status``), ``killed``
    (``signal``), ``interrupted`` (the tracer got ``signal``), ``duration``,
    ``output`` (our output could not be written), ``quit`` (``q`` in ``top``),
    ``exec`` (the target exec'd: its probes are gone)."""
    kind: str
    status: int | None = None
    signal: int | None = None
    detail: str | None = None

    @property
    def message(self) -> str:
        if self.kind == "exited" and self.status is None:
            return "target exited"          # hands-off, not our child: status unknown
        if self.kind == "exited":
            return f"target exited with status {self.status}"
        if self.kind == "killed":
            return f"target killed by signal {self.signal} ({signal_name(self.signal)})"
        if self.kind == "interrupted":
            return f"tracer interrupted by {signal_name(self.signal)}"
        text = {"duration": "duration reached", "output": "output closed",
                "quit": "quit", "exec": "target exec'd a new program"}[self.kind]
        return f"{text} ({self.detail})" if self.detail else text

    def to_json(self) -> dict:
        return {"reason": self.kind, "status": self.status, "signal": self.signal,
                "message": self.message}


class TraceRun:
    """One target traced from start to detach.  ``pid`` (attach) or ``command``
    (spawn); ``stop``: the installed :class:`StopSignals`; ``tracer_kw`` go to
    :class:`uprobe_opt.session.Tracer`.  Raises what Tracer.attach/spawn raise."""

    def __init__(self, *, pid: int | None, command: list[str] | None, stop: StopSignals,
                 follow_forks: bool = False, follow_exec: bool = False,
                 records_for=None, **tracer_kw):
        from uprobe_opt.session import Tracer
        self.stop = stop
        self.spawned = pid is None
        self.t0 = time.monotonic()
        self.progress = tracer_kw.get("progress")
        if follow_forks:
            # forks are seen only while traced; a kernel uprobe's event would be
            # inherited by the children (uprobe_opt.follow)
            tracer_kw.update(hands_off=False, kernel_uprobes=False)
        if follow_exec:
            tracer_kw.update(hands_off=False)     # an exec is held only by a tracer
        self.tracer = (Tracer.attach(pid, **tracer_kw) if pid is not None
                       else Tracer.spawn(command, **tracer_kw))
        self.tree = None
        if follow_forks or follow_exec:
            from uprobe_opt.follow import ProcessTree
            child_kw = {k: v for k, v in tracer_kw.items()
                        if k not in ("progress", "on_records")}
            self.tree = ProcessTree(self.tracer, follow_forks=follow_forks,
                                    follow_exec=follow_exec, tracer_kw=child_kw,
                                    records_for=records_for)
        stop.tracer = self.tracer
        self.tracer.manager.stop_requested = lambda: stop.reason is not None
        self.end: RunEnd | None = None
        self.seconds = 0.0
        self.died_while_arming = False

    @property
    def mode(self) -> str:
        """``hands-off`` or ``attached`` (:attr:`uprobe_opt.session.Tracer.mode`)."""
        return self.tracer.mode

    @property
    def mode_reason(self) -> str | None:
        return self.tracer.mode_reason

    # -- arming ------------------------------------------------------------------------
    def arm(self, specs, pre_handler, *, handler: str, nargs: int) -> None:
        """Register and arm every probe.  Bad input leaves the target as it was (a
        spawned one is killed: it never ran a line of its own) and re-raises; a target
        that died while we armed is not an error: its end is reported."""
        from uprobe_opt.errors import ProbeError
        try:
            self.tracer.add_probes(specs, pre_handler, handler=handler, nargs=nargs)
        except BaseException as exc:
            if isinstance(exc, ProbeError) and self._target_died():
                self.died_while_arming = True
                return
            if self.spawned:
                self.tracer.kill()
            else:
                self.tracer.detach()
            raise

    def _target_died(self, timeout: float = 2.0) -> bool:
        """After an error: True when the target is dead (its exit is then reported)."""
        t = self.tracer
        t0 = time.monotonic()
        while not t.exited and time.monotonic() - t0 < timeout:
            try:
                with open(f"/proc/{t.pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                state = "X"
            if state in "ZX":
                t.run(duration=0.05)        # reap it: exited, exit status known
            elif time.monotonic() - t0 > 0.2:
                return False                # alive: the error was something else
            else:
                time.sleep(0.005)
        return t.exited

    def death_cause(self) -> str:
        """': killed by SIGSYS (its seccomp filter) ...' when the target died of a system
        call it was not allowed (one of ours would be our fault), else ''."""
        st = self.tracer.exit_status
        if st is not None and os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGSYS:
            return ": killed by SIGSYS (its seccomp filter refused a system call)"
        return ""

    def arming_death_status(self) -> int:
        """Attach mode: 1 when the target's seccomp filter killed it while we armed (a
        system call of ours it does not allow), else 0."""
        return 1 if self.died_while_arming and self.death_cause() else 0

    # -- running -----------------------------------------------------------------------
    def run(self, duration: float | None = None, until=None) -> None:
        """Run until the target exits or execs, ``duration`` seconds pass, ``until()``
        is true or a stop is requested; then detach (always: every byte restored)."""
        self.t0 = time.monotonic()           # the trace proper: armed, target running
        driver = self.tree if self.tree is not None else self.tracer
        try:
            if not self.tracer.exited and self.stop.reason is None:
                driver.run(duration=duration, until=self._first_tick(until))
        finally:
            self.seconds = time.monotonic() - self.t0     # traced, not detaching
            self.end_progress()
            driver.detach()
            self.end = self._why_ended()

    @property
    def tracers(self) -> list:
        """Every process's Tracer (the first one, then the followed ones)."""
        return self.tree.tracers if self.tree is not None else [self.tracer]

    def _first_tick(self, until):
        """``until`` for Tracer.run: at its first call (the initial optimization is
        done, the target runs) the progress bars go, never drawn over its output."""
        first = [True]

        def tick() -> bool:
            if first[0]:
                first[0] = False
                self.end_progress()
            return until() if until is not None else False
        return tick

    def end_progress(self) -> None:
        bars = getattr(self.progress, "close", None)
        if bars is not None:
            bars()

    def _why_ended(self) -> RunEnd:
        t = self.tracer
        if self.stop.reason == "signal":
            return RunEnd("interrupted", signal=self.stop.signum)
        if self.stop.reason in ("output", "quit"):
            return RunEnd(self.stop.reason, detail=self.stop.detail)
        if t.exited:
            code = t.exit_code
            if code is not None and code < 0:
                return RunEnd("killed", signal=-code)
            return RunEnd("exited", status=code)
        if t.exec_seen:
            return RunEnd("exec")
        return RunEnd("duration")

    def end_facts(self) -> dict:
        """What the summary tells besides the probe rows."""
        facts = {"end": self.end.to_json(), "mode": self.mode,
                 "duration_s": round(self.seconds, 3),
                 "handler_errors": sum(p.nerrors for tr in self.tracers
                                       for p in tr.probes)}
        if self.mode_reason:
            facts["mode_reason"] = self.mode_reason
        if self.tree is not None:
            facts["processes"] = self.tree.processes()
        return facts

    # -- spawn mode: the program's status -----------------------------------------------
    def program_status(self) -> int:
        """Spawn mode: our exit status is the program's (128+N when signal N killed
        it).  If tracing ended first (an exec, --duration, Ctrl-C, SIGTERM, our output
        failed) we have detached and the program runs on untraced: we wait for it,
        passing SIGINT/SIGTERM/SIGHUP/SIGQUIT on to it, like a shell running it."""
        t = self.tracer
        if t.exited:
            code = t.exit_code
            if code is None:
                return 0
            return 128 - code if code < 0 else code
        pid = t.pid

        def forward(signum, frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        old = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
        # A signal after the one that ended the trace (it arrived while we detached)
        # was meant for the program as much as one arriving now.
        for s in self.stop.take_later():
            forward(s, None)
        try:
            status = _wait_child(pid)
        except ChildProcessError:
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code


def _wait_child(pid: int) -> int:
    """waitpid(pid) that lets our Python signal handlers run meanwhile.  A blocking
    waitpid is interrupted only by a signal delivered to this thread; one the kernel
    gives to another thread of ours (a background close of kernel events) would wait
    for the program's exit.  So: the child's pidfd, with a timeout."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        fd = None
    try:
        while True:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid:
                return status
            if fd is not None:
                select.select([fd], [], [], 0.1)
            else:
                time.sleep(0.01)
    finally:
        if fd is not None:
            os.close(fd)
