"""Progress bars for long work (resolving, arming and optimizing many probes,
``check-reloc``): drawn with rich on stderr when it is a terminal, nothing otherwise.

A bar appears only once its phase has run for :data:`SHOW_AFTER` seconds, so short
work draws nothing, and it is removed from the screen when done (rich ``transient``).
rich is imported only when a bar is actually drawn.
"""
from __future__ import annotations

import sys
import time

SHOW_AFTER = 0.3            # seconds a phase runs before its bar is drawn


class PhaseProgress:
    """Callable ``(phase, done, total)``: one bar per phase name.  ``enabled`` None
    means: when stderr is a terminal."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = _stderr_is_tty() if enabled is None else enabled
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._started: dict[str, float] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        t0 = self._started.setdefault(phase, now)
        if self._progress is None:
            if now - t0 < SHOW_AFTER or done >= total:
                return
            self._start()
        task = self._tasks.get(phase)
        if task is None:
            task = self._tasks[phase] = self._progress.add_task(phase, total=total)
        self._progress.update(task, completed=done, total=total)

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)
        self._progress = Progress(TextColumn("uprobe-opt: {task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=Console(stderr=True), transient=True,
                                  redirect_stdout=False, redirect_stderr=False)
        self._progress.start()

    def close(self) -> None:
        """Remove the bars and draw none any more (safe to call twice): what follows
        (a running program's own output, our hit lines) must not be drawn over."""
        self.enabled = False
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._tasks.clear()
        self._started.clear()

    def __enter__(self) -> "PhaseProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (OSError, ValueError):
        return False
