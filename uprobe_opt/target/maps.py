"""/proc/PID/maps parsing: one :class:`Mapping` per line (see ``man 5 proc``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import AccessDenied, ProcessGone


@dataclass(frozen=True)
class Mapping:
    """One virtual memory area of the target.

    ``start``/``end`` are absolute addresses in the target (end exclusive), ``perms`` the
    4-character permission string (``r-xp``), ``offset`` the file offset in bytes of
    ``start``, ``path`` the pathname column ('' for anonymous, ``[vdso]``, ``[stack]``...),
    ``dev`` the device column (``fd:01``: major:minor in hex).
    """
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    dev: str = ""

    @property
    def is_exec(self) -> bool:
        return "x" in self.perms

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.end - self.start

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def file_id(self, addr: int) -> tuple[str, int, int]:
        """(dev, inode, file offset of ``addr``): which byte of which file is mapped at
        ``addr`` (for an anonymous mapping inode is 0 and the offset is the page
        offset the kernel shows)."""
        return (self.dev, self.inode, self.offset + addr - self.start)


def parse_maps_line(line: str) -> Mapping:
    """Parse one line of /proc/PID/maps; the path may contain spaces."""
    fields = line.rstrip("\n").split(maxsplit=5)
    start, end = (int(x, 16) for x in fields[0].split("-"))
    path = fields[5] if len(fields) > 5 else ""
    return Mapping(start, end, fields[1], int(fields[2], 16), int(fields[4]), path,
                   fields[3])


def read_maps(pid: int, tid: int | None = None) -> list[Mapping]:
    """All mappings of process ``pid``, in address order; through thread ``tid``'s
    view if given.  A zombie leader's /proc/PID/maps is empty: then a live thread's
    view is read instead (same mm).

    Raises ProcessGone if the process does not exist, AccessDenied if /proc refuses.
    """
    path = f"/proc/{pid}/maps" if tid is None else f"/proc/{pid}/task/{tid}/maps"
    try:
        with open(path) as f:
            lines = f.readlines()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} does not exist", pid=pid) from None
    except PermissionError:
        raise AccessDenied(f"cannot read /proc/{pid}/maps: permission denied",
                           pid=pid) from None
    if not lines and tid is None:
        # A leader that called pthread_exit() has no mm of its own any more: its
        # /proc/PID/maps is empty while the threads still run in the process's mm.
        lines = _live_thread_maps(pid)
    return [parse_maps_line(line) for line in lines if line.strip()]


def _live_thread_maps(pid: int) -> list[str]:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/maps") as f:
                lines = f.readlines()
        except OSError:
            continue
        if lines:
            return lines
    return []
