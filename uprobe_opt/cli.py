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
                    help="SYMBOL, SYMBOL+0xOFF, LIB:SYMBOL[+0xOFF] or 0xADDR")
    tr.add_argument("--handler", choices=("print", "count", "python"), default="print",
                    help="print: a line per hit; count: only the summary; python: "
                         "--python FILE:FUNCTION as pre_handler(probe, regs)")
    tr.add_argument("--python", metavar="FILE:FUNCTION", help="pre_handler for --handler python")
    tr.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    tr.add_argument("--json", action="store_true", help="JSON lines output")
    tr.add_argument("-o", "--output", metavar="FILE", help="write our output to FILE")
    tr.add_argument("--no-optimize", action="store_true", help="keep every probe int3")

    ex = sub.add_parser("explain", help="show how each probe site would be optimized",
                        usage="uprobe-opt explain [-p PID | BINARY] PROBE... [--json]")
    ex.add_argument("-p", "--pid", type=int)
    ex.add_argument("items", nargs="+", metavar="[BINARY] PROBE")
    ex.add_argument("--json", action="store_true")

    from uprobe_opt.relocheck import add_parser as add_check_reloc
    add_check_reloc(sub)

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
    ap = build_parser()
    args = ap.parse_args(ours)
    try:
        if args.cmd == "trace":
            args.command = command
            return cmd_trace(ap, args)
        if args.cmd == "explain":
            from uprobe_opt.explain import cmd_explain
            return cmd_explain(args)
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


class Output:
    """Where our own lines go (stdout, or -o FILE so a spawned program owns stdout)."""

    def __init__(self, path: str | None, as_json: bool):
        self.file = open(path, "w", buffering=1) if path else sys.stdout
        self.json = as_json
        self.t0 = time.monotonic_ns()

    def hit(self, probe, regs) -> None:
        now = time.monotonic_ns()
        if self.json:
            self.emit({"event": "hit", "probe": probe.spec, "time_ns": now, "tid": regs.tid,
                       "args": list(regs.args)})
        else:
            args = " ".join(f"{a:#x}" for a in regs.args)
            self.file.write(f"{(now - self.t0) / 1e9:12.6f} {regs.tid:>7} {probe.spec}  {args}\n")

    def emit(self, obj: dict) -> None:
        self.file.write(json.dumps(obj) + "\n")

    def note(self, msg: str) -> None:
        if self.json:
            self.emit({"event": "note", "message": msg})
        else:
            self.file.write(f"uprobe-opt: {msg}\n")

    def summary(self, rows: list[dict]) -> None:
        if self.json:
            self.emit({"event": "summary", "probes": rows})
            return
        head = ("PROBE", "ADDRESS", "STATE", "HITS", "NMISSED", "REASON")
        table = [head] + [(r["probe"], r["address"], r["state"], str(r["hits"]),
                           str(r["nmissed"]), r["reason"] or "") for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        for row in table:
            cells = [row[i].ljust(widths[i]) if i in (0, 1, 2) else row[i].rjust(widths[i])
                     for i in range(5)]
            self.file.write("  ".join(cells + [row[5]]).rstrip() + "\n")

    def close(self) -> None:
        if self.file is not sys.stdout:
            self.file.close()
        else:
            self.file.flush()


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
    except Exception as e:
        raise UsageError(f"--python: {path} failed to load: {e!r}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UsageError(f"--python: {path} has no function {func!r}")
    return fn


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
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")


def cmd_trace(ap, args) -> int:
    from uprobe_opt.session import Tracer
    _validate(ap, args)
    pre = load_python_handler(args.python) if args.handler == "python" else None
    out = Output(args.output, args.json)
    kw = dict(optimize=not args.no_optimize, log=out.note)
    tracer = Tracer.attach(args.pid, **kw) if args.pid is not None else Tracer.spawn(args.command, **kw)
    try:
        return _trace_session(tracer, args, out, pre)
    finally:
        out.close()


def _trace_session(tracer, args, out: Output, pre) -> int:
    try:
        if args.handler == "count":
            tracer.add_probes(args.probes, handler="count")
        elif args.handler == "print":
            tracer.add_probes(args.probes, out.hit, handler="print")
        else:
            tracer.add_probes(args.probes, pre, handler="python")
    except BaseException:
        # Bad input: restore what was armed and let the target go as it was.
        if args.pid is None:
            tracer.kill()
        else:
            tracer.detach()
        raise
    with _stop_on_signals(tracer):
        tracer.run(duration=args.duration)
        tracer.detach()
    for note in tracer.notes:
        out.note(note)
    out.summary(tracer.summary())
    if args.pid is None:
        return _child_status(tracer)
    return 0


def _child_status(tracer) -> int:
    if not tracer.exited:
        return 0
    code = tracer.exit_code
    return 128 - code if code < 0 else code


@contextlib.contextmanager
def _stop_on_signals(tracer):
    """SIGINT/SIGTERM only set a flag: the tracer finishes what it is doing (never
    half-patched) and detaches cleanly."""
    def handler(signum, frame):
        tracer.request_stop()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cmd_demo(args) -> int:
    from uprobe_opt.session import Tracer
    from uprobe_opt.testing import build_target
    loop = str(build_target("loop"))
    out = Output(None, args.json)
    out.note(f"demo 1/2: {loop} 10, a line per hit of work(i, x) (probe optimized, "
             "a Python handler per hit)")
    with Tracer.spawn([loop, "10"], log=out.note) as t:
        t.add_probe("work", out.hit, handler="print")
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
