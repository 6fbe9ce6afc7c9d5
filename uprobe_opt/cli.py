"""The ``uprobe-opt`` command line: parses, then renders what the session layer
(:mod:`uprobe_opt.run`, :class:`uprobe_opt.session.Tracer`) did.

Exit status (README, "Exit status"): 0 on success (spawn mode: the traced program's own
status, 128+N when it was killed by signal N); 2 on bad input (unknown PID, no
permission, unknown symbol, mid-instruction address, non-executable page, bad option),
with one line on stderr and no byte of the target changed; 141 when our output pipe
was closed, 74 on any other write error of our output (after a clean detach); 128+N
when signal N interrupted the command before it touched a process; 1 on an unexpected
internal error.
"""
from __future__ import annotations

# Few imports here: the entry point installs its signal handlers before anything slow.
import contextlib
import os
import sys
import time

from uprobe_opt.errors import Interrupted, ProbeError, TargetExited

ARG_NAMES = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")

# Attach mode: the process was held by another tracer (a debugger) at the end, so our
# jumps and detours could not be taken out; they stay and keep working (the summary
# says so).
EXIT_PATCHES_LEFT = 3


def build_parser():
    import argparse
    ap = argparse.ArgumentParser(
        prog="uprobe-opt",
        description="Jump-optimized userspace probes for x86-64 Linux processes.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    tr = sub.add_parser(
        "trace", help="probe a running PID or a command",
        usage="uprobe-opt trace [-p PID] PROBE... [options] [-- COMMAND [ARG...]]",
        description="Our output goes to stdout in attach mode (-p) and to stderr in "
                    "spawn mode (the program owns stdout), or to -o FILE.")
    tr.add_argument("-p", "--pid", type=int, help="attach to this running process")
    tr.add_argument("probes", nargs="*", metavar="PROBE",
                    help="SYMBOL, SYMBOL+0xOFF, LIB:SYMBOL[+0xOFF] or 0xADDR; "
                         "SYMBOL%%return (or uretprobe:SYMBOL) probes every exit of "
                         "the function")
    _add_handler_args(tr)
    _add_output_args(tr)
    tr.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    tr.add_argument("--no-optimize", action="store_true", help="keep every probe int3")
    tr.add_argument("--no-kernel-uprobes", action="store_true",
                    help="keep int3 sites the optimizer refuses on ptrace instead of "
                         "handing them (count/record handlers) to the kernel's uprobe")
    tr.add_argument("-f", "--follow-forks", action="store_true",
                    help="trace the children it forks (fork, vfork, clone without "
                         "CLONE_VM) and theirs with the same probes, counts per pid "
                         "(like strace -f); stays attached")
    tr.add_argument("--follow-exec", action="store_true",
                    help="after an exec, resolve the probes again in the new program "
                         "(those that do not resolve are pending or gone)")

    from uprobe_opt.top import add_parser as add_top
    add_top(sub)

    ex = sub.add_parser("explain", help="show how each probe site would be optimized",
                        usage="uprobe-opt explain [-p PID | BINARY] PROBE... [--json] "
                              "[--detour[=KIND]]")
    ex.add_argument("-p", "--pid", type=int)
    ex.add_argument("items", nargs="+", metavar="[BINARY] PROBE")
    ex.add_argument("--json", action="store_true")
    ex.add_argument("--detour", nargs="?", const="all", metavar="KIND",
                    help="list the detour as it would be written, per handler "
                         "(count, record, python; default all)")

    from uprobe_opt.relocheck_args import add_parser as add_check_reloc
    add_check_reloc(sub)
    from uprobe_opt.listing import add_parser as add_list
    add_list(sub)

    de = sub.add_parser("demo", help="trace the bundled demo target (targets/loop.c)")
    de.add_argument("--calls", type=int, default=1_000_000)
    de.add_argument("--json", action="store_true")
    return ap


def _add_handler_args(p) -> None:
    """The in-process mechanism: what a hit does in the target."""
    p.add_argument("--handler", choices=("record", "count", "python", "latency", "print"),
                   default="record",
                   help="record (default): a record per hit (time, tid, --args "
                        "arguments) in a ring buffer shared with us; count: a counter "
                        "only; python: --python FILE:FUNCTION runs as "
                        "pre_handler(probe, regs), one stop per hit; latency: "
                        "SPEC%%return calls matched with their entries, durations "
                        "(--hist latency, --json) (print: old name of record)")
    p.add_argument("--python", metavar="FILE:FUNCTION", help="pre_handler for --handler python")
    p.add_argument("--args", type=int, default=6, metavar="N",
                   help="integer argument registers captured per record (0-6, default 6)")
    p.add_argument("--buffer-size", metavar="BYTES", default="8M",
                   help="record ring buffer size, at most 1G (suffix K, M or G; default "
                        "8M; records are 80 bytes and their number is rounded down to a "
                        "power of two: 8M holds 65,536); a full buffer drops records "
                        "(counted in nmissed)")


def _add_output_args(p) -> None:
    """What is shown, and where: independent of the handler."""
    p.add_argument("--lines", dest="lines", action="store_true", default=None,
                   help="a line per hit (default with --handler record, unless --hist)")
    p.add_argument("-q", "--quiet", "--no-lines", dest="lines", action="store_false",
                   help="no line per hit: only the summary (and --hist)")
    p.add_argument("--hist", metavar="argN",
                   help="at the end, a log2 histogram of argument N per probe "
                        "(bpftrace's hist(); needs --handler record); 'latency': of "
                        "the call durations (ns) per return probe")
    p.add_argument("--perfetto", metavar="FILE",
                   help="write the calls of return probes (slices per thread) and "
                        "other hits (instant events) as a Perfetto trace")
    p.add_argument("--json", action="store_true",
                   help="JSON lines: hit, note, hist and summary events")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write our output to FILE (default: stdout with -p, stderr in "
                        "spawn mode)")


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    # First of all: from here on SIGINT/SIGTERM/SIGHUP/SIGQUIT only set a flag.  One
    # that arrives before a process was touched ends the command quietly (128+N).
    from uprobe_opt.run import StopSignals, interrupted_status
    stop = StopSignals().install()
    argv_given = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, command = _split_command(argv)
    try:
        code = _dispatch(ours, command, stop)
    except Interrupted:               # stopped while preparing: nothing was armed
        code = interrupted_status(stop.signum) if stop.signum is not None else 1
    except ProbeError as e:
        from uprobe_opt.output import tell_stderr
        tell_stderr(str(e))               # stderr itself may be what fails: then silence
        code = 2
    except KeyboardInterrupt:        # only from a subcommand that restored SIGINT
        code = 130
    if stop.signum is not None and stop.tracer is None and code in (0, 1, 2):
        code = interrupted_status(stop.signum)      # interrupted before it started
    # The work is done and said: a stop signal from now on (a second Ctrl-C, a SIGTERM
    # 50 ms after a SIGINT) would meet the default action once the interpreter resets
    # its handlers at exit and turn our status into 128+N: ignore them from here.
    # Only as the command (argv from sys.argv): a caller of main(argv) in its own
    # process (tests) gets its handlers back; SIG_IGN would also be inherited by
    # every program it starts afterwards (a SIGTERM to them would do nothing).
    _join_kernel_closes()
    if argv_given:
        stop.uninstall()
    else:
        stop.hold()
    return code


def _join_kernel_closes() -> None:
    """Kernel uprobes of ours still closing on a background thread (see
    uprobe_opt.target.perf): wait for them, or the tracefs definitions they remove
    would outlive us (a daemon thread dies with the interpreter)."""
    perf = sys.modules.get("uprobe_opt.target.perf")
    if perf is not None:
        perf.join_all()


def _dispatch(ours: list[str], command: list[str], stop) -> int:
    from uprobe_opt.run import interrupted_status
    ap = build_parser()
    args = ap.parse_args(ours)
    if stop.signum is not None:
        return interrupted_status(stop.signum)
    if args.cmd == "trace":
        args.command = command
        return cmd_trace(args, stop)
    if args.cmd == "top":
        from uprobe_opt.top import cmd_top
        return cmd_top(args, stop)
    if args.cmd in ("explain", "list", "check-reloc"):
        from uprobe_opt.output import run_report
        return run_report(_report_command(args.cmd), args)
    if args.cmd == "demo":
        return cmd_demo(args)
    return 1


def _report_command(name: str):
    if name == "explain":
        from uprobe_opt.explain import cmd_explain
        return cmd_explain
    if name == "list":
        from uprobe_opt.listing import cmd_list
        return cmd_list
    from uprobe_opt.relocheck import cmd_check_reloc
    return cmd_check_reloc


def load_python_handler(spec: str):
    """FILE:FUNCTION -> callable; raises UsageError naming what is wrong."""
    import importlib.util
    from uprobe_opt.errors import UsageError
    path, sep, func = spec.rpartition(":")
    if not sep or not path or not func:
        raise UsageError(f"--python wants FILE:FUNCTION, got {spec!r}")
    if not os.path.isfile(path):
        raise UsageError(f"--python: no such file {path!r}")
    mod_spec = importlib.util.spec_from_file_location("uprobe_opt_user_handler", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        raise UsageError(f"--python: {path} failed to load: {e!r}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UsageError(f"--python: {path} has no function {func!r}")
    return fn


def parse_size(text: str) -> int:
    """'4M' -> 4194304; UsageError on nonsense."""
    from uprobe_opt.errors import UsageError
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in "KMG" else (t, "")
    try:
        value = int(num) * units[unit]
    except ValueError:
        raise UsageError(f"--buffer-size: not a size: {text!r} (e.g. 4M)") from None
    if value < 4096 + 16 * 80:
        raise UsageError(f"--buffer-size {text} is too small (at least 8K)")
    if value > MAX_BUFFER:
        raise UsageError(f"--buffer-size {text} is too large (at most 1G)")
    avail = _mem_available()
    if avail is not None and value > avail // 4:
        raise UsageError(f"--buffer-size {text} is more than a quarter of the memory "
                         f"available ({avail >> 20} MiB): the ring lives in shared memory "
                         "of both the tracer and the target")
    return value


MAX_BUFFER = 1 << 30


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_hist(text: str | None) -> int | None:
    from uprobe_opt.errors import UsageError
    if text is None or text == "latency":
        return None
    if len(text) == 4 and text.startswith("arg") and text[3] in "012345":
        return int(text[3])
    raise UsageError(f"--hist wants arg0..arg5 or latency, not {text!r}")


def _validate(args) -> None:
    from uprobe_opt.errors import UsageError
    if not args.probes:
        raise UsageError("no PROBE given (e.g. `uprobe-opt trace -p PID libc:malloc`)")
    if (args.pid is None) == (not args.command):
        raise UsageError("give exactly one of -p PID or -- COMMAND")
    if args.handler == "print":
        args.handler = "record"           # the old name of record-with-lines
    if args.handler == "python" and not args.python:
        raise UsageError("--handler python needs --python FILE:FUNCTION")
    if args.python and args.handler != "python":
        raise UsageError("--python needs --handler python")
    if args.duration is not None and not (0 < args.duration < float("inf")):
        raise UsageError("--duration must be a positive number of seconds")
    if not 0 <= args.args <= 6:
        raise UsageError("--args must be 0..6")
    args.hist_arg = parse_hist(args.hist)
    if args.hist_arg is not None and args.hist_arg >= args.args:
        raise UsageError(f"--hist {args.hist} needs --args {args.hist_arg + 1} or more")
    if args.hist_arg is not None and args.handler != "record":
        raise UsageError("--hist needs --handler record (the default)")
    if args.lines and args.handler == "count":
        raise UsageError("--lines needs a record per hit: --handler record (the default) "
                         "or python; count keeps only a counter")
    if args.lines is None:      # default: a line per hit when records are made for it
        args.lines = args.handler == "record" and args.hist_arg is None
    _validate_returns(args)
    _validate_perfetto(args)
    args.buffer_bytes = parse_size(args.buffer_size)


def _validate_perfetto(args) -> None:
    """--perfetto needs records, and a file we can write: both known before any
    process is touched (the file is created empty now, written at the end)."""
    from uprobe_opt.errors import UsageError
    if args.perfetto is None:
        return
    if not args.perfetto:
        raise UsageError("--perfetto needs a file name")
    if args.handler not in ("record", "latency"):
        raise UsageError(f"--perfetto needs --handler record or latency (--handler "
                         f"{args.handler} keeps no record of each hit)")
    try:
        with open(args.perfetto, "wb"):
            pass
    except OSError as e:
        raise UsageError(f"--perfetto {args.perfetto}: {e.strerror}") from None


def _validate_returns(args) -> None:
    """--hist latency / --handler latency need a return probe that records."""
    from uprobe_opt.core.calls import split_return_spec
    from uprobe_opt.errors import UsageError
    returns = any(split_return_spec(p)[1] for p in args.probes)
    if args.hist == "latency" and not returns:
        raise UsageError("--hist latency needs a return probe (SPEC%return)")
    if args.hist == "latency" and args.handler not in ("record", "latency"):
        raise UsageError("--hist latency needs --handler latency or record")
    if args.handler == "latency" and not returns:
        raise UsageError("--handler latency needs a return probe (SPEC%return)")


def cmd_trace(args, stop) -> int:
    """``uprobe-opt trace``: returns the exit status (README, "Exit status")."""
    from uprobe_opt.output import Output, tell_stderr
    from uprobe_opt.progress import PhaseProgress
    from uprobe_opt.run import TraceRun, interrupted_status
    _validate(args)
    pre = load_python_handler(args.python) if args.handler == "python" else None
    out = Output(args.output, args.json, stream="stderr" if args.command else "stdout")
    out.on_error = lambda: stop.request("output", out.error_line())
    if stop.signum is not None:
        return interrupted_status(stop.signum)     # nothing touched yet
    if pre is not None and args.lines:
        pre = _with_line(pre, out)
    sink = RecordSink(out, args)
    run = None
    try:
        with _handler_prints_to(out, enabled=pre is not None):
            try:
                run = TraceRun(pid=args.pid, command=args.command or None, stop=stop,
                               optimize=not args.no_optimize, log=out.note,
                               buffer_size=args.buffer_bytes, on_records=sink,
                               kernel_uprobes=not args.no_kernel_uprobes,
                               progress=PhaseProgress(), follow_forks=args.follow_forks,
                               follow_exec=args.follow_exec, records_for=sink.for_tracer)
            except TargetExited as e:
                if not args.command or e.status is None:
                    raise
                return _ended_before_traced(out, e)
            sink.hook_calls(run.tracer)
            run.arm(args.probes, pre, handler=args.handler, nargs=args.args)
            status = Status(run.tracer, enabled=_status_wanted(args, out))
            out.t0 = time.monotonic_ns()          # hit times are printed from here
            run.run(duration=args.duration, until=status.tick)
            status.clear()
        if out.error is None:
            _report(out, run, sink, args)
        if out.error is not None:
            _report_elsewhere(out, run, sink, args)
        perfetto_error = sink.write_perfetto(run.tracer, args.perfetto)
        code = run.program_status() if run.spawned else run.arming_death_status()
        if getattr(run.tracer, "patches_left", False) and not run.spawned:
            code = EXIT_PATCHES_LEFT
    finally:
        out.close()
    if out.error is not None:
        tell_stderr(out.error_line())
        return out.error_status()
    if perfetto_error is not None:
        tell_stderr(perfetto_error)
        from uprobe_opt.output import EXIT_OUTPUT_ERROR
        return EXIT_OUTPUT_ERROR
    return code


def _ended_before_traced(out, e) -> int:
    """Spawn mode: the program ended (killed, or exited) before it reached its entry
    point: an empty summary, how it ended, and its status as ours."""
    from uprobe_opt.run import RunEnd
    code = os.waitstatus_to_exitcode(e.status)
    end = RunEnd("killed", signal=-code) if code < 0 else RunEnd("exited", status=code)
    out.note(str(e))
    out.summary([], {"end": end.to_json(), "mode": "attached", "duration_s": 0.0,
                     "handler_errors": 0})
    return 128 - code if code < 0 else code


def _report_elsewhere(out, run, sink, args) -> None:
    """Our output failed: the summary goes to stderr, unless that is what failed."""
    from uprobe_opt.errors import UsageError
    from uprobe_opt.output import Output
    if out.name == "<stderr>":
        return
    try:
        fallback = Output(None, args.json, stream="stderr")
    except UsageError:
        return
    _report(fallback, run, sink, args)
    fallback.close()


def _with_line(pre, out):
    def pre_handler(probe, regs):
        out.hit(probe, regs)
        return pre(probe, regs)
    return pre_handler


@contextlib.contextmanager
def _handler_prints_to(out, enabled: bool):
    """A --python handler's print() goes where our output goes (never into the
    spawned program's stdout, which is also ours)."""
    if not enabled:
        yield
        return

    class Stream:
        def write(self, text):
            out.write(text)
            return len(text)

        def flush(self):
            out.flush()
    with contextlib.redirect_stdout(Stream()):
        yield


def _status_wanted(args, out) -> bool:
    """The live hits/s line on stderr: only on a terminal, never over a spawned
    program's own output nor over our hit lines on the same terminal."""
    return (sys.stderr.isatty() and not args.command and not args.json
            and not (args.lines and out.is_tty))


def _report(out, run, sink, args) -> None:
    """After the detach: notes, how the target ended (attach mode), histograms, the
    return probes' calls and latencies, the summary (a return probe's exits indented
    under it) with its end line, and a hint when records were dropped."""
    from uprobe_opt import retout
    tracer = run.tracer
    if run.died_while_arming:
        out.note(f"process {tracer.pid} died while uprobe-opt was arming its probes"
                 + run.death_cause())
    for note in tracer.notes:
        out.note(note)
    if not run.spawned and run.end.kind in ("exited", "killed"):
        out.note(f"{run.end.message} (pid {tracer.pid})")
    tree = run.tree
    by_pid = {tr.pid: tr for tr in run.tracers}
    for (pid, site), hist in sorted(sink.hists.items()):
        for probe in by_pid[pid].probes_of_site(site):
            label = probe.spec if tree is None else f"{probe.spec} (pid {pid})"
            out.hist(label, sink.hist_arg, hist)
    retout.report(out, tracer, args)
    if tree is not None:
        _report_processes(out, tree)
    rows = tracer.summary() if tree is None else tree.summary()
    out.summary(rows if out.json else retout.summary_rows(rows), run.end_facts())
    dropped = sum(r["nmissed"] for r in rows)
    if dropped and not out.json:
        out.note(f"{dropped} records dropped (ring buffer full): try a larger --buffer-size")


def _report_processes(out, tree) -> None:
    """-f/--follow-exec: how each followed process left the trace (text mode; the
    JSON summary carries them as ``processes``)."""
    if out.json:
        return
    for proc in tree.processes():
        for note in proc["notes"]:
            out.note(f"pid {proc['pid']}: {note}")
        if proc["parent"] is not None:
            out.note(f"pid {proc['pid']} (forked by {proc['parent']}): {proc['end']}")


class RecordSink:
    """Receives drained record batches: writes a line per record (``--lines``), feeds
    ``--hist``."""

    def __init__(self, out, args):
        self.out = out
        self.lines = args.lines and args.handler == "record"
        self.nargs = args.args
        self.hist_arg = getattr(args, "hist_arg", None)
        self.hists: dict[int, object] = {}
        self.probes_of_site = None
        # The return probes' matched calls (lines, ``call`` JSON events, --perfetto
        # slices); made before any process is touched: a missing perfetto package is
        # bad input (exit 2).
        from uprobe_opt.retout import CallSink
        self.calls = CallSink(out, args)
        self.tracer = None

    def hook_calls(self, tracer) -> None:
        """Matched calls go to our CallSink; none are built when nothing shows them."""
        self.tracer = tracer
        self.probes_of_site = tracer.probes_of_site
        tracer.calls.on_call = self.calls if self.calls.needed else None

    def write_perfetto(self, tracer, path: str | None) -> str | None:
        """Write the Perfetto trace; the error line when that failed, else None."""
        from uprobe_opt.output import OutputFailed
        if self.calls.perfetto is not None and path:
            self.calls.perfetto.pid = tracer.pid
            try:
                self.calls.perfetto.write(path)
            except OutputFailed as e:
                return f"writing {path}: {e.error.strerror or e.error}"
        return None

    def __call__(self, batch, tracer=None) -> None:
        """A batch of ``tracer``'s records (default: the first process's): site ids
        are per tracer, so hists are kept per (pid, site)."""
        tracer = tracer or self.tracer
        if self.calls.perfetto is not None:
            self.calls.perfetto.add_batch(batch, tracer)
        if self.lines:
            self.out.records(batch, tracer.probes_of_site, self.nargs)
        if self.hist_arg is not None:
            from uprobe_opt.hist import Log2Hist
            for site in set(batch["site"].tolist()):
                values = batch["args"][batch["site"] == site][:, self.hist_arg]
                self.hists.setdefault((tracer.pid, site), Log2Hist()).add(values)

    def for_tracer(self, tracer):
        """on_records for a followed child's Tracer (``-f``)."""
        if self.calls.needed:
            tracer.calls.on_call = self.calls
        return lambda batch: self(batch, tracer)


class Status:
    """A live status line on stderr (hits, hits/s, drops) once a second."""

    def __init__(self, tracer, enabled: bool):
        self.tracer, self.enabled = tracer, enabled
        self.last_t = time.monotonic()
        self.last_hits = 0
        self.shown = False

    def tick(self) -> bool:
        now = time.monotonic()
        if self.enabled and now - self.last_t >= 1.0:
            hits = sum(p.nhit for p in self.tracer.probes)
            drops = sum(p.nmissed for p in self.tracer.probes)
            rate = (hits - self.last_hits) / (now - self.last_t)
            self._show(f"uprobe-opt: {hits} hits, {rate:,.0f} hits/s, {drops} dropped")
            self.last_t, self.last_hits, self.shown = now, hits, True
        return False

    def _show(self, text: str) -> None:
        try:
            sys.stderr.write("\r" + text.ljust(70))
            sys.stderr.flush()
        except OSError:
            self.enabled = False

    def clear(self) -> None:
        if self.shown:
            self._show(" " * 70 + "\r")


def cmd_demo(args) -> int:
    from uprobe_opt.output import Output
    from uprobe_opt.session import Tracer
    from uprobe_opt.testing import build_target
    loop = str(build_target("loop"))
    out = Output(None, args.json, stream="stderr")    # the programs own stdout
    out.note(f"demo 1/2: {loop} 10, a line per hit of work(i, x): time, tid, probe, "
             "arguments, recorded in-process by the optimized probe")
    with Tracer.spawn([loop, "10"], log=out.note,
                      on_records=lambda b: out.records(b, t.probes_of_site, 2)) as t:
        t.add_probe("work", handler="record", nargs=2)
        out.t0 = time.monotonic_ns()
        t.run()
    out.summary(t.summary())
    out.note(f"demo 2/2: {loop} {args.calls}, in-process counter, no stop per hit")
    t0 = time.monotonic()
    with Tracer.spawn([loop, str(args.calls)], log=out.note) as t:
        t.add_probe("work", handler="count")
        t.run()
    dt = time.monotonic() - t0
    out.summary(t.summary())
    out.note(f"{args.calls} hits counted exactly in {dt:.2f} s")
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
