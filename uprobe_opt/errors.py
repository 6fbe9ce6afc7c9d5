"""One exception hierarchy for uprobe-opt.

Exceptions are for environment failures (the process went away, permission denied,
a symbol does not exist).  Decisions such as "this site cannot be optimized" are
``Refusal`` values (see :mod:`uprobe_opt.x86.analysis`), never exceptions.

Every exception carries ``pid``, ``tid`` and ``addr`` (``None`` when unknown); ``addr``
is always an absolute virtual address in the target's address space.
"""
from __future__ import annotations


class ProbeError(Exception):
    """Base class of every error raised by uprobe-opt."""

    def __init__(self, msg: str, *, pid: int | None = None, tid: int | None = None,
                 addr: int | None = None):
        super().__init__(msg)
        self.msg = msg
        self.pid = pid
        self.tid = tid
        self.addr = addr

    def __str__(self) -> str:
        return self.msg


class TargetError(ProbeError):
    """The target process could not be operated on."""


class ProcessGone(TargetError):
    """The process does not exist (ESRCH/ENOENT), or no longer does."""


class ThreadGone(ProcessGone):
    """One thread of the target exited while we operated on it (ESRCH)."""


class TargetExited(ProcessGone):
    """The whole target exited; ``status`` is its wait status (see os.waitstatus_to_exitcode)."""

    def __init__(self, msg: str, *, status: int | None = None, **kw):
        super().__init__(msg, **kw)
        self.status = status


class AccessDenied(TargetError):
    """ptrace or /proc access was refused (EPERM/EACCES): not root, no CAP_SYS_PTRACE,
    Yama ``kernel.yama.ptrace_scope`` too strict, or another tracer is attached."""


class SymbolError(ProbeError):
    """A probe spec could not be resolved to an address, or the address is not a valid
    probe site (unknown/ambiguous symbol, mid-instruction, not executable)."""

    def __init__(self, msg: str, *, candidates: list[str] | None = None, **kw):
        super().__init__(msg, **kw)
        self.candidates = candidates or []


class LibraryNotLoaded(SymbolError):
    """A spec names a library the process has not loaded (``lib``): the Tracer keeps
    such a probe pending until the dynamic linker maps it."""

    def __init__(self, msg: str, *, lib: str | None = None, **kw):
        super().__init__(msg, **kw)
        self.lib = lib


class PatchError(ProbeError):
    """Writing the target's code failed or read back different bytes."""


class UsageError(ProbeError):
    """The caller asked for something inconsistent (bad option combination, unknown
    probe, bad handler spec)."""


class Interrupted(ProbeError):
    """A stop was requested (Ctrl-C, SIGTERM...) while probes were being prepared,
    before any breakpoint was written: the batch is abandoned."""
