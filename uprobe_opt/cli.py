"""The ``uprobe-opt`` command line: a thin layer over :class:`uprobe_opt.session.Tracer`.

Exit status: 0 on success (spawn mode: the traced program's own status, 128+N when it
was killed by signal N); 2 on bad input (unknown PID, no permission, unknown symbol,
mid-instruction address, non-executable page, bad option), with one line on stderr and
no byte of the target changed; 1 on an unexpected internal error.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import sys
import time

from uprobe_opt.errors import ProbeError

ARG_NAMES = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="uprobe-opt",
        description="Jump-optimized userspace probes for x86-64 Linux processes.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    tr = sub.add_parser("trace", help="probe a running PID or a command",
                        usage="uprobe-opt trace [-p PID] PROBE... [options] [-- COMMAND [ARG...]]")
    tr.add_argument("-p", "--pid", type=int, help="attach to this running process")
    tr.add_argument("probes", nargs="*", metavar="PROBE",
                    help="SYMBOL, SYMBOL+0xOFF, LIB:SYMBOL[+0xOFF] or 0xADDR; "
                         "SYMBOL%%return (or uretprobe:SYMBOL) probes every exit of "
                         "the function")
    tr.add_argument("--handler", choices=("print", "record", "count", "python", "latency"),
                    default="print",
                    help="print (default): a line per hit from in-process records; "
                         "record: the same, kept for --hist without lines; count: only "
                         "the summary; python: --python FILE:FUNCTION as "
                         "pre_handler(probe, regs), one stop per hit; latency: "
                         "SPEC%%return calls matched with their entries, durations "
                         "(--hist latency, --json)")
    tr.add_argument("--python", metavar="FILE:FUNCTION", help="pre_handler for --handler python")
    tr.add_argument("--args", type=int, default=6, metavar="N",
                    help="integer argument registers captured per record (0-6, default 6)")
    tr.add_argument("--hist", metavar="argN",
                    help="at the end, a log2 histogram of argument N per probe; "
                         "'latency': of the call durations (ns) per return probe")
    tr.add_argument("--perfetto", metavar="FILE",
                    help="write the calls of return probes (slices per thread) and "
                         "other hits (instant events) as a Perfetto trace")
    tr.add_argument("--buffer-size", metavar="BYTES", default="8M",
                    help="record ring buffer size, at most 1G (suffix K, M or G; default "
                         "8M; records are 80 bytes and their number is rounded down to a "
                         "power of two: 8M holds 65,536); a full buffer drops records "
                         "(counted in nmissed)")
    tr.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    tr.add_argument("--json", action="store_true", help="JSON lines output")
    tr.add_argument("-o", "--output", metavar="FILE", help="write our output to FILE")
    tr.add_argument("--no-optimize", action="store_true", help="keep every probe int3")
    tr.add_argument("--no-kernel-uprobes", action="store_true",
                    help="keep int3 sites the optimizer refuses on ptrace instead of "
                         "handing them (count/record handlers) to the kernel's uprobe")

    ex = sub.add_parser("explain", help="show how each probe site would be optimized",
                        usage="uprobe-opt explain [-p PID | BINARY] PROBE... [--json]")
    ex.add_argument("-p", "--pid", type=int)
    ex.add_argument("items", nargs="+", metavar="[BINARY] PROBE")
    ex.add_argument("--json", action="store_true")

    from uprobe_opt.relocheck import add_parser as add_check_reloc
    add_check_reloc(sub)
    from uprobe_opt.listing import add_parser as add_list
    add_list(sub)

    de = sub.add_parser("demo", help="trace the bundled demo target (targets/loop.c)")
    de.add_argument("--calls", type=int, default=1_000_000)
    de.add_argument("--json", action="store_true")
    return ap


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, command = _split_command(argv)
    try:
        ap = build_parser()
        args = ap.parse_args(ours)
        if args.cmd == "trace":
            args.command = command
            return cmd_trace(ap, args)
        if args.cmd == "explain":
            from uprobe_opt.explain import cmd_explain
            return cmd_explain(args)
        if args.cmd == "list":
            from uprobe_opt.listing import cmd_list
            return cmd_list(args)
        if args.cmd == "check-reloc":
            from uprobe_opt.relocheck import cmd_check_reloc
            return cmd_check_reloc(args)
        if args.cmd == "demo":
            return cmd_demo(args)
    except ProbeError as e:
        print(f"uprobe-opt: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


def _open_output(path: str):
    """-o FILE for writing; UsageError (exit 2) naming the problem."""
    from uprobe_opt.errors import UsageError
    try:
        return open(path, "w", buffering=1)
    except OSError as e:
        raise UsageError(f"-o {path}: {e.strerror}") from None


def _reason_cell(row: dict) -> str:
    reason = row["reason"] or ""
    if row.get("served_by") == "kernel uprobe":
        return f"(kernel uprobe) {reason}".rstrip()
    return reason


class Output:
    """Where our own lines go (stdout, or -o FILE so a spawned program owns stdout)."""

    def __init__(self, path: str | None, as_json: bool):
        self.file = _open_output(path) if path else sys.stdout
        self.json = as_json
        self.t0 = time.monotonic_ns()
        self.broken = False
        self.on_broken = lambda: None

    @property
    def is_tty(self) -> bool:
        return self.file.isatty()

    def write(self, text: str) -> None:
        """Write our output; a reader that went away (``| head``) ends the trace
        cleanly instead of killing us mid-patch: SIGPIPE is ignored by Python, the
        BrokenPipeError is caught here and ``on_broken`` asks the tracer to stop."""
        if self.broken:
            return
        try:
            self.file.write(text)
        except BrokenPipeError:
            self.broken = True
            self.on_broken()

    def flush(self) -> None:
        if not self.broken:
            try:
                self.file.flush()
            except BrokenPipeError:
                self.broken = True
                self.on_broken()

    def hit(self, probe, regs) -> None:
        """A line for one hit seen by a Python pre_handler trap."""
        self._line(probe.spec, time.monotonic_ns(), regs.tid, regs.args)

    def records(self, batch, tracer, nargs: int) -> None:
        """Lines for a drained batch of records (one per record and probe)."""
        specs = {}
        for site, t, tid, args in zip(batch["site"].tolist(), batch["time_ns"].tolist(),
                                      batch["tid"].tolist(), batch["args"].tolist()):
            names = specs.get(site)
            if names is None:
                names = specs[site] = [p.spec for p in tracer.probes_of_site(site)]
            for name in names:
                self._line(name, t, tid, args[:nargs])

    def _line(self, spec: str, t_ns: int, tid: int, args) -> None:
        if self.json:
            self.emit({"event": "hit", "probe": spec, "time_ns": t_ns, "tid": tid,
                       "args": list(args)})
        else:
            text = " ".join(f"{a:#x}" for a in args)
            self.write(f"{(t_ns - self.t0) / 1e9:12.6f} {tid:>7} {spec}  {text}\n")

    def emit(self, obj: dict) -> None:
        self.write(json.dumps(obj) + "\n")

    def note(self, msg: str) -> None:
        if self.json:
            self.emit({"event": "note", "message": msg})
        else:
            self.write(f"uprobe-opt: {msg}\n")

    def summary(self, rows: list[dict]) -> None:
        """The summary table (text) or its JSON line; a site the kernel's uprobe
        serves shows "(kernel uprobe)" before its reason."""
        if self.json:
            self.emit({"event": "summary", "probes": rows})
            return
        head = ("PROBE", "ADDRESS", "STATE", "HITS", "NMISSED", "REASON")
        table = [head] + [(r["probe"], r["address"], r["state"], str(r["hits"]),
                           str(r["nmissed"]), _reason_cell(r)) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        for row in table:
            cells = [row[i].ljust(widths[i]) if i in (0, 1, 2) else row[i].rjust(widths[i])
                     for i in range(5)]
            self.write("  ".join(cells + [row[5]]).rstrip() + "\n")

    def status(self, text: str) -> None:
        self.write("\r" + text.ljust(70))
        self.flush()

    def end_status(self) -> None:
        self.write("\r" + " " * 70 + "\r")

    def close(self) -> None:
        if self.file is not sys.stdout:
            try:
                self.file.close()
            except OSError as e:
                print(f"uprobe-opt: writing {self.file.name}: {e.strerror}", file=sys.stderr)
            return
        self.flush()
        if self.broken:
            # Nobody reads stdout any more: point it at /dev/null so the interpreter's
            # final flush does not raise again at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def load_python_handler(spec: str):
    """FILE:FUNCTION -> callable; raises UsageError naming what is wrong."""
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


def _validate(ap, args) -> None:
    from uprobe_opt.errors import UsageError
    if not args.probes:
        raise UsageError("no PROBE given (e.g. `uprobe-opt trace -p PID libc:malloc`)")
    if (args.pid is None) == (not args.command):
        raise UsageError("give exactly one of -p PID or -- COMMAND")
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
    if args.hist_arg is not None and args.handler not in ("print", "record"):
        raise UsageError("--hist needs --handler record or print")
    _validate_returns(args)
    args.buffer_bytes = parse_size(args.buffer_size)


def _validate_returns(args) -> None:
    """--hist latency / --handler latency need a return probe that records."""
    from uprobe_opt.core.calls import split_return_spec
    from uprobe_opt.errors import UsageError
    returns = any(split_return_spec(p)[1] for p in args.probes)
    if args.hist == "latency" and not returns:
        raise UsageError("--hist latency needs a return probe (SPEC%return)")
    if args.hist == "latency" and args.handler not in ("print", "record", "latency"):
        raise UsageError("--hist latency needs --handler latency, record or print")
    if args.handler == "latency" and not returns:
        raise UsageError("--handler latency needs a return probe (SPEC%return)")


def cmd_trace(ap, args) -> int:
    from uprobe_opt.session import Tracer
    _validate(ap, args)
    pre = load_python_handler(args.python) if args.handler == "python" else None
    out = Output(args.output, args.json)
    sink = RecordSink(out, args)
    kw = dict(optimize=not args.no_optimize, log=out.note, buffer_size=args.buffer_bytes,
              kernel_uprobes=not args.no_kernel_uprobes,
              on_records=sink)
    try:
        # From before the attach until the detach has finished, SIGINT/SIGTERM only set
        # a flag: a KeyboardInterrupt can never escape between two patch writes.
        with _stop_on_signals() as stop:
            tracer = (Tracer.attach(args.pid, **kw) if args.pid is not None
                      else Tracer.spawn(args.command, **kw))
            sink.tracer = tracer
            stop.tracer = tracer
            from uprobe_opt.retout import CallSink
            sink.calls = CallSink(out, args)
            tracer.calls.on_call = sink.calls if sink.calls.needed else None
            out.on_broken = tracer.request_stop
            code = _trace_session(tracer, args, out, pre, sink)
        if args.pid is None:
            code = _spawned_status(tracer)
        return 128 + signal.SIGPIPE if out.broken else code
    finally:
        out.close()


class RecordSink:
    """Receives drained record batches: prints lines (print), feeds --hist."""

    def __init__(self, out: Output, args):
        self.out = out
        self.print_lines = args.handler == "print"
        self.nargs = args.args
        self.hist_arg = getattr(args, "hist_arg", None)
        self.hists: dict[int, object] = {}
        self.tracer = None
        self.calls = None           # retout.CallSink of the return probes

    def __call__(self, batch) -> None:
        if self.calls is not None and self.calls.perfetto is not None:
            self.calls.perfetto.add_batch(batch, self.tracer)
        if self.print_lines:
            self.out.records(batch, self.tracer, self.nargs)
        if self.hist_arg is not None:
            from uprobe_opt.hist import Log2Hist
            for site in set(batch["site"].tolist()):
                values = batch["args"][batch["site"] == site][:, self.hist_arg]
                self.hists.setdefault(site, Log2Hist()).add(values)


class Status:
    """A live status line (hits/s, drops) once a second when output is a terminal."""

    def __init__(self, out: Output, tracer, enabled: bool):
        self.out, self.tracer, self.enabled = out, tracer, enabled
        self.last_t = time.monotonic()
        self.last_hits = 0
        self.shown = False

    def tick(self) -> bool:
        now = time.monotonic()
        if self.enabled and now - self.last_t >= 1.0:
            hits = sum(p.nhit for p in self.tracer.probes)
            drops = sum(p.nmissed for p in self.tracer.probes)
            rate = (hits - self.last_hits) / (now - self.last_t)
            self.out.status(f"uprobe-opt: {hits} hits, {rate:,.0f} hits/s, {drops} dropped")
            self.last_t, self.last_hits, self.shown = now, hits, True
        return False

    def clear(self) -> None:
        if self.shown:
            self.out.end_status()


def _trace_session(tracer, args, out: Output, pre, sink: RecordSink) -> int:
    handler = {"print": "print", "record": "record", "count": "count",
               "python": "python", "latency": "latency"}[args.handler]
    if handler == "print":        # records printed by the CLI
        from uprobe_opt.core.calls import split_return_spec
        if not any(split_return_spec(p)[1] for p in args.probes):
            handler = "record"
    try:
        tracer.add_probes(args.probes, pre, handler=handler, nargs=args.args)
    except BaseException as exc:
        if not (isinstance(exc, ProbeError) and _target_died(tracer)):
            # Bad input: restore what was armed and let the target go as it was.
            if args.pid is None:
                tracer.kill()
            else:
                tracer.detach()
            raise
        # The target died while we armed (read its symbols, ...): report what there is.
        out.note(f"process {tracer.pid} died while uprobe-opt was arming its probes"
                 + _death_cause(tracer))
        died_while_arming = True
    else:
        died_while_arming = False
    status = Status(out, tracer, out.is_tty and not out.json and args.handler != "print")
    out.t0 = time.monotonic_ns()          # hit times are printed from here
    try:
        if not tracer.exited:
            tracer.run(duration=args.duration, until=status.tick)
    finally:
        tracer.detach()                   # whatever happened: every byte restored
    status.clear()
    for note in tracer.notes:
        out.note(note)
    if sink.hists:
        _print_hists(out, tracer, sink)
    from uprobe_opt import retout
    retout.report(out, tracer, args)
    if sink.calls is not None and sink.calls.perfetto is not None:
        sink.calls.perfetto.pid = tracer.pid
        sink.calls.perfetto.write(args.perfetto)
    rows = tracer.summary()
    out.summary(rows if out.json else retout.summary_rows(rows))
    dropped = sum(r["nmissed"] for r in rows)
    if dropped and not out.json:
        out.note(f"{dropped} records dropped (ring buffer full): try a larger --buffer-size")
    if args.pid is None:
        return _child_status(tracer)
    return 1 if died_while_arming and _death_cause(tracer) else 0


def _death_cause(tracer) -> str:
    """': killed by SIGSYS (its seccomp filter) ...' when the target died of a system
    call it was not allowed (one of ours would be our fault: exit 1), else ''."""
    st = tracer.exit_status
    if st is not None and os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGSYS:
        return ": killed by SIGSYS (its seccomp filter refused a system call)"
    return ""


def _print_hists(out: Output, tracer, sink: RecordSink) -> None:
    for site, hist in sorted(sink.hists.items()):
        for probe in tracer.probes_of_site(site):
            if out.json:
                out.emit({"event": "hist", "probe": probe.spec, "arg": sink.hist_arg,
                          "buckets": hist.buckets()})
            else:
                out.write(f"@{probe.spec}[arg{sink.hist_arg}]:\n")
                out.write(hist.render() + "\n")


def _child_status(tracer) -> int:
    if not tracer.exited:
        return 0
    code = tracer.exit_code
    return 128 - code if code < 0 else code


def _target_died(tracer, timeout: float = 2.0) -> bool:
    """After an error: True when the target is dead (its exit is then reported)."""
    t0 = time.monotonic()
    while not tracer.exited and time.monotonic() - t0 < timeout:
        try:
            with open(f"/proc/{tracer.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            state = "X"
        if state in "ZX":
            tracer.run(duration=0.05)       # reap it: exited, exit status known
        elif time.monotonic() - t0 > 0.2:
            return False                    # alive: the error was something else
        else:
            time.sleep(0.005)
    return tracer.exited


def _spawned_status(tracer) -> int:
    """Spawn mode: our exit status is the program's.  If tracing ended first (an exec,
    --duration, Ctrl-C, SIGTERM) we have detached and the program runs on untraced: we
    wait for it, passing SIGINT/SIGTERM on to it, like a shell running it."""
    if tracer.exited:
        return _child_status(tracer)
    pid = tracer.pid

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    old = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class _StopRequest:
    """What the SIGINT/SIGTERM handler knows: the tracer once it exists, and whether a
    stop was asked for before (during the attach)."""

    def __init__(self):
        self.requested = False
        self._tracer = None

    @property
    def tracer(self):
        return self._tracer

    @tracer.setter
    def tracer(self, tracer) -> None:
        self._tracer = tracer
        if self.requested:
            tracer.request_stop()

    def __call__(self, signum, frame) -> None:
        self.requested = True
        if self._tracer is not None:
            self._tracer.request_stop()


# Every signal a user or a session manager sends to end a tool: Ctrl-C, kill, a closed
# terminal or dropped ssh (SIGHUP), Ctrl-\ (SIGQUIT).  Their default actions would end
# the tracer with the target's code half-patched or int3 sites left in place.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT/SIGTERM/SIGHUP/SIGQUIT only set a flag: the tracer finishes what it is
    doing (never half-patched) and detaches cleanly; a second signal changes nothing.
    Installed before the attach and removed only after the detach."""
    stop = _StopRequest()
    old = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cmd_demo(args) -> int:
    from uprobe_opt.session import Tracer
    from uprobe_opt.testing import build_target
    loop = str(build_target("loop"))
    out = Output(None, args.json)
    out.note(f"demo 1/2: {loop} 10, a line per hit of work(i, x): time, tid, probe, "
             "arguments, recorded in-process by the optimized probe")
    with Tracer.spawn([loop, "10"], log=out.note,
                      on_records=lambda b: out.records(b, t, 2)) as t:
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
