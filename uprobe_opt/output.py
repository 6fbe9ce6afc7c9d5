"""Where the command's own output goes, and how it looks.

The rules (README, "Output"):

* Our output never enters the traced program's streams.  Spawn mode: it goes to
  stderr (the program owns stdout, as with strace, ltrace and perf trace) unless
  ``-o FILE``; attach mode: stdout (the target's streams are not ours) or ``-o FILE``.
* ``--json``: every line is one JSON object (``hit``, ``note``, ``hist``, ``summary``).
* A write that fails (a closed pipe, a full disk, a file that refuses writes) never
  raises: the error is kept (:attr:`Output.error`), ``on_error`` asks the trace to
  end, and everything written afterwards is dropped.  The caller detaches, then
  reports the error in one line and exits with :func:`error_status`.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time

EXIT_BROKEN_PIPE = 141          # 128 + SIGPIPE, what a shell shows for `... | head`
EXIT_OUTPUT_ERROR = 74          # EX_IOERR (sysexits.h): any other write error


class Output:
    """Our lines, written to ``path`` (``-o``) or to the stream named by ``stream``
    (``"stdout"`` or ``"stderr"``).  Raises UsageError (exit 2) when ``path`` cannot be
    opened or the stream is closed, before anything touched the target."""

    def __init__(self, path: str | None, as_json: bool, stream: str = "stdout"):
        self.json = as_json
        self.name = path or f"<{stream}>"
        self.file = _open(path, stream)
        self.is_tty = _isatty(self.file)
        self.t0 = time.monotonic_ns()
        self.error: OSError | None = None
        self.on_error = lambda: None

    # -- writing -----------------------------------------------------------------------
    def write(self, text: str) -> None:
        if self.error is None:
            try:
                self.file.write(text)
            except OSError as e:
                self._failed(e)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.file.flush()
            except OSError as e:
                self._failed(e)

    def _failed(self, e: OSError) -> None:
        self.error = e
        self.on_error()

    @property
    def broken_pipe(self) -> bool:
        return self.error is not None and self.error.errno == errno.EPIPE

    def error_line(self) -> str | None:
        """``writing FILE: strerror`` once a write failed, else None."""
        if self.error is None:
            return None
        return f"writing {self.name}: {self.error.strerror or self.error}"

    def error_status(self) -> int | None:
        """141 for a closed pipe, 74 for any other write error, None when none."""
        if self.error is None:
            return None
        return EXIT_BROKEN_PIPE if self.broken_pipe else EXIT_OUTPUT_ERROR

    def close(self) -> None:
        """Flush and close; a failure here is kept like any write error."""
        self.flush()
        try:
            self.file.close()
        except OSError as e:
            if self.error is None:
                self.error = e

    # -- events ------------------------------------------------------------------------
    def emit(self, obj: dict) -> None:
        self.write(json.dumps(obj) + "\n")

    def note(self, msg: str) -> None:
        if self.json:
            self.emit({"event": "note", "message": msg})
        else:
            self.write(f"uprobe-opt: {msg}\n")
        self.flush()

    def hit(self, probe, regs) -> None:
        """A line for one hit seen by a Python pre_handler trap."""
        self._line(probe.spec, time.monotonic_ns(), regs.tid, regs.args)

    def records(self, batch, probes_of_site, nargs: int) -> None:
        """Lines for a drained batch of records (one per record and probe);
        ``probes_of_site(site_id)`` names the probes of a record's site."""
        specs = {}
        for site, t, tid, args in zip(batch["site"].tolist(), batch["time_ns"].tolist(),
                                      batch["tid"].tolist(), batch["args"].tolist()):
            names = specs.get(site)
            if names is None:
                names = specs[site] = [p.spec for p in probes_of_site(site)]
            for name in names:
                self._line(name, t, tid, args[:nargs])
        self.flush()

    def _line(self, spec: str, t_ns: int, tid: int, args) -> None:
        if self.json:
            self.emit({"event": "hit", "probe": spec, "time_ns": t_ns, "tid": tid,
                       "args": list(args)})
        else:
            text = " ".join(f"{a:#x}" for a in args)
            self.write(f"{(t_ns - self.t0) / 1e9:12.6f} {tid:>7} {spec}  {text}\n")

    def hist(self, spec: str, arg: int, hist) -> None:
        if self.json:
            self.emit({"event": "hist", "probe": spec, "arg": arg, "buckets": hist.buckets()})
        else:
            self.write(f"@{spec}[arg{arg}]:\n{hist.render()}\n")

    def summary(self, rows: list[dict], end: dict | None = None) -> None:
        """The probe table, then one line saying how the run ended.  ``end``: the
        run's facts (:meth:`uprobe_opt.run.TraceRun.end_facts`), if known."""
        if self.json:
            self.emit({"event": "summary", "probes": rows, **(end or {})})
            self.flush()
            return
        self.write(render_table(rows))
        if end is not None:
            self.write(f"uprobe-opt: {end_line(end)}\n")
        self.flush()


def reason_cell(row: dict) -> str:
    """A summary row's REASON cell (the summary table and `top`)."""
    reason = row["reason"] or ""
    if row.get("served_by") == "kernel uprobe":
        return f"(kernel uprobe) {reason}".rstrip()
    return reason


def render_table(rows: list[dict]) -> str:
    """The summary table; a site the kernel's uprobe serves shows "(kernel uprobe)"
    before its reason."""
    head = ("PROBE", "ADDRESS", "STATE", "HITS", "NMISSED", "REASON")
    table = [head] + [(r["probe"], r["address"], r["state"], str(r["hits"]),
                       str(r["nmissed"]), reason_cell(r)) for r in rows]
    if any("pid" in r for r in rows):         # -f: one process per row, strace-like
        table = [("PID",) + head] + [(str(r.get("pid", "")),) + row
                                     for r, row in zip(rows, table[1:])]
    n = len(table[0]) - 1
    left = {0, 1, 2} if n == 5 else {1, 2, 3}
    widths = [max(len(row[i]) for row in table) for i in range(n)]
    lines = []
    for row in table:
        cells = [row[i].ljust(widths[i]) if i in left else row[i].rjust(widths[i])
                 for i in range(n)]
        lines.append("  ".join(cells + [row[n]]).rstrip() + "\n")
    return "".join(lines)


def end_line(end: dict) -> str:
    """``ended: target exited with status 0 after 1.20 s (attached mode, 0 handler
    errors)``; the seconds count from the moment the probes were armed."""
    mode = end.get("mode") or "attached"
    errs = end.get("handler_errors", 0)
    return (f"ended: {end['end']['message']} after {end.get('duration_s', 0):.2f} s "
            f"({mode} mode, {errs} handler error{'' if errs == 1 else 's'})")


def _open(path: str | None, stream: str):
    """Our own file object: over ``path``, or over a duplicate of fd 1 or 2, so the
    interpreter's sys.stdout never holds a line of ours it could fail to flush at exit."""
    from uprobe_opt.errors import UsageError
    if path:
        try:
            return open(path, "w", buffering=1 << 16)
        except OSError as e:
            raise UsageError(f"-o {path}: {e.strerror}") from None
    fd = 1 if stream == "stdout" else 2
    try:
        f = os.fdopen(os.dup(fd), "w", buffering=1 << 16)
    except OSError as e:
        raise UsageError(f"writing <{stream}>: {e.strerror}") from None
    if _isatty(f):
        f.reconfigure(line_buffering=True)
    return f


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (OSError, ValueError):
        return False


def tell_stderr(line: str) -> None:
    """One line of ours on stderr; stderr itself may be what failed: then nothing."""
    try:
        sys.stderr.write(f"uprobe-opt: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class OutputFailed(Exception):
    """A write to our standard output failed (``error``: the OSError).  Not an
    OSError itself, so that no ``except OSError`` on the way takes it for a failure
    to read a file."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


class GuardedStdout:
    """``sys.stdout`` while a report command (``list``, ``explain``, ``check-reloc``)
    prints: a failed write or flush raises OutputFailed."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise OutputFailed(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise OutputFailed(e) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def run_report(fn, args) -> int:
    """Run a report command with its stdout guarded: a closed pipe ends it with 141,
    any other write error (full disk, /dev/full) with one line and 74 (README, "Exit
    status"); never a traceback."""
    real = sys.stdout
    sys.stdout = GuardedStdout(real)
    try:
        code = fn(args)
        sys.stdout.flush()
        return code
    except OutputFailed as e:
        # What is still buffered for fd 1 would fail again at exit: send it nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        if e.error.errno == errno.EPIPE:
            return EXIT_BROKEN_PIPE
        tell_stderr(f"writing <stdout>: {e.error.strerror or e.error}")
        return EXIT_OUTPUT_ERROR
    finally:
        sys.stdout = real
