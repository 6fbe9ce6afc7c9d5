"""``uprobe-opt top -p PID SPEC...``: a live full-screen view of a traced process.

Every probe's state, hits per second, total and nmissed, and the process's own facts
(threads, CPU, resident memory; psutil), redrawn each second with rich's ``Live`` on
the terminal's alternate screen.  ``q`` or Ctrl-C leaves: the trace ends the way every
trace ends (detach, every byte restored), then the summary is printed on the normal
screen.
"""
from __future__ import annotations

import os
import select
import sys
import time

from uprobe_opt.output import reason_cell


def add_parser(sub) -> None:
    p = sub.add_parser("top", help="live view of probe hit rates in a running process",
                       usage="uprobe-opt top -p PID PROBE... [options]",
                       description="A full-screen view refreshed each second; q or "
                                   "Ctrl-C detaches cleanly and prints the summary.")
    p.add_argument("-p", "--pid", type=int, required=True, help="the process to trace")
    p.add_argument("probes", nargs="+", metavar="PROBE",
                   help="SYMBOL, SYMBOL+0xOFF, LIB:SYMBOL[+0xOFF] or 0xADDR")
    p.add_argument("--handler", choices=("count", "record"), default="count",
                   help="count (default): an in-process counter; record: a record per "
                        "hit (counted here, not shown)")
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between refreshes (default 1)")
    p.add_argument("--duration", type=float, metavar="S", help="leave after S seconds")
    p.add_argument("--no-optimize", action="store_true", help="keep every probe int3")


def cmd_top(args, stop) -> int:
    from uprobe_opt.errors import UsageError
    from uprobe_opt.output import Output
    from uprobe_opt.progress import PhaseProgress
    from uprobe_opt.run import TraceRun
    if not (0.05 <= args.interval < 3600):
        raise UsageError("--interval must be 0.05 s or more")
    if args.duration is not None and not (0 < args.duration < float("inf")):
        raise UsageError("--duration must be a positive number of seconds")
    if not sys.stdout.isatty():
        raise UsageError("top needs a terminal on stdout (for a summary: uprobe-opt "
                         "trace -p PID PROBE... --handler count)")
    notes: list[str] = []
    run = TraceRun(pid=args.pid, command=None, stop=stop, optimize=not args.no_optimize,
                   log=notes.append, on_records=lambda batch: None,
                   progress=PhaseProgress())
    with _keys() as keys:                 # from the start: a q typed while arming counts
        run.arm(args.probes, None, handler=args.handler, nargs=0)
        view = TopView(run, args.interval)
        with view.live():
            def until() -> bool:
                if keys.pressed("qQ"):
                    stop.request("quit")
                    return True
                view.tick()
                return False
            run.run(duration=args.duration, until=until)
    out = Output(None, False, stream="stdout")
    for note in notes + run.tracer.notes:
        out.note(note)
    from uprobe_opt.retout import summary_rows
    out.summary(summary_rows(run.tracer.summary()), run.end_facts())
    out.close()
    return 0 if out.error is None else out.error_status()



class TopView:
    """The screen: one row per probe, the process's facts above."""

    def __init__(self, run, interval: float):
        import psutil
        self.run, self.interval = run, interval
        self.proc = psutil.Process(run.tracer.pid)
        self.proc.cpu_percent(None)            # starts the CPU measurement window
        self.last_t = time.monotonic()
        self.last_hits = {_key(r): r["hits"] for r in self._rows()}
        self.rates = {k: 0.0 for k in self.last_hits}
        self._live = None

    def live(self):
        from rich.console import Console
        from rich.live import Live
        self._live = Live(self.render(), console=Console(), screen=True,
                          auto_refresh=False, transient=True)
        return self._live

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_t < self.interval:
            return
        dt = now - self.last_t
        for row in self._rows():
            k, n = _key(row), row["hits"]
            self.rates[k] = (n - self.last_hits.get(k, 0)) / dt
            self.last_hits[k] = n
        self.last_t = now
        self._live.update(self.render(), refresh=True)

    def _facts(self) -> str:
        import psutil
        try:
            with self.proc.oneshot():
                name = self.proc.name()
                threads = self.proc.num_threads()
                cpu = self.proc.cpu_percent(None)
                rss = self.proc.memory_info().rss
        except psutil.Error:
            return f"pid {self.proc.pid}: gone"
        return (f"pid {self.proc.pid} ({name})  threads {threads}  CPU {cpu:.1f}%  "
                f"RSS {rss / (1 << 20):.1f} MiB  {self.run.mode} mode")

    def render(self):
        from rich.table import Table
        elapsed = time.monotonic() - self.run.t0
        table = Table(title=f"uprobe-opt top  {self._facts()}  {elapsed:.0f} s",
                      caption="q or Ctrl-C: detach and quit", expand=True)
        for col, justify in (("PROBE", "left"), ("ADDRESS", "left"), ("STATE", "left"),
                             ("HITS/S", "right"), ("TOTAL", "right"),
                             ("NMISSED", "right"), ("REASON", "left")):
            table.add_column(col, justify=justify, no_wrap=col != "REASON")
        for row in self._rows():
            table.add_row(row["probe"], row["address"], row["state"],
                          f"{self.rates.get(_key(row), 0.0):,.0f}", f"{row['hits']:,}",
                          f"{row['nmissed']:,}", reason_cell(row))
        return table

    def _rows(self) -> list[dict]:
        """The summary's rows: each probe, each return probe followed by its exits."""
        from uprobe_opt.retout import summary_rows
        return summary_rows(self.run.tracer.summary())


def _key(row: dict) -> tuple[str, str]:
    return row["probe"], row["address"]


class _keys:
    """The terminal's stdin in cbreak mode (keys arrive one by one, Ctrl-C still sends
    SIGINT); restored on exit whatever happened."""

    def __init__(self):
        self.fd = sys.stdin.fileno() if sys.stdin.isatty() else None
        self.saved = None

    def __enter__(self) -> "_keys":
        if self.fd is not None:
            import termios
            import tty
            self.saved = termios.tcgetattr(self.fd)
            # TCSANOW, not tty's default TCSAFLUSH: a key typed before (a q pressed
            # while we started) is kept, not discarded.
            tty.setcbreak(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def pressed(self, keys: str) -> bool:
        """True when one of ``keys`` was typed since the last call (never blocks)."""
        if self.fd is None:
            return False
        while select.select([self.fd], [], [], 0)[0]:
            ch = os.read(self.fd, 1).decode(errors="replace")
            if not ch:
                return False
            if ch in keys:
                return True
        return False
