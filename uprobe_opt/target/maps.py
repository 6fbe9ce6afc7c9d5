"""/proc/PID/maps parsing: one :class:`Mapping` per line (see ``man 5 proc``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import AccessDenied, ProcessGone


@dataclass(frozen=True)
class Mapping:
    """One virtual memory area of the target.

    ``start``/``end`` are absolute addresses in the target (end exclusive), ``perms`` the
    4-character permission string (``r-xp``), ``offset`` the file offset in bytes of
    ``start``, ``path`` the pathname column ('' for anonymous, ``[vdso]``, ``[stack]``...).
    """
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def is_exec(self) -> bool:
        return "x" in self.perms

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.end - self.start

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end


def parse_maps_line(line: str) -> Mapping:
    """Parse one line of /proc/PID/maps; the path may contain spaces."""
    fields = line.rstrip("\n").split(maxsplit=5)
    start, end = (int(x, 16) for x in fields[0].split("-"))
    path = fields[5] if len(fields) > 5 else ""
    return Mapping(start, end, fields[1], int(fields[2], 16), int(fields[4]), path)


def read_maps(pid: int, tid: int | None = None) -> list[Mapping]:
    """All mappings of process ``pid``, in address order; through thread ``tid``'s
    view if given (a zombie leader's /proc/PID/maps is empty).

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
    return [parse_maps_line(line) for line in lines if line.strip()]
