"""Small ctypes binding for the ptrace requests the target layer needs (x86-64 Linux).

python-ptrace is used only for its structures and constants (``user_regs_struct``,
``siginfo``, ``PTRACE_*``); it lacks SEIZE/INTERRUPT/LISTEN and its wait loop is unusable
on live multi-threaded targets (see /work/shared/reference/python-ptrace.md).

Every function clears errno before the call (``man 2 ptrace``: "On error, all requests
return -1, and errno is set"; PEEK requests may legitimately return -1) and raises
:class:`PtraceOSError` (an ``OSError`` carrying ``request`` and ``tid``) on failure.
Translation into :mod:`uprobe_opt.errors` happens one level up, in ``process.py``.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os

from ptrace.binding.func import (  # noqa: F401  (re-exported constants)
    PTRACE_CONT, PTRACE_DETACH, PTRACE_GETEVENTMSG, PTRACE_GETREGS, PTRACE_GETREGSET,
    PTRACE_GETSIGINFO, PTRACE_SETOPTIONS, PTRACE_SETREGS, PTRACE_SINGLESTEP,
    PTRACE_EVENT_CLONE, PTRACE_EVENT_EXEC, PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK,
    PTRACE_O_TRACECLONE, PTRACE_O_TRACEEXEC, PTRACE_O_TRACEFORK, PTRACE_O_TRACESYSGOOD,
    PTRACE_O_TRACEVFORK)
from ptrace.binding.linux_struct import iovec_struct, siginfo, user_regs_struct

# Requests and options python-ptrace 0.9.9 does not define (<linux/ptrace.h>).
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_EVENT_STOP = 128
PTRACE_SETSIGINFO = 0x4203
PTRACE_GETSIGMASK = 0x420a
PTRACE_SETSIGMASK = 0x420b
PTRACE_O_EXITKILL = 0x100000
NT_X86_XSTATE = 0x202
SI_KERNEL = 0x80          # si_code of a SIGTRAP raised by int3 (#BP), see man 2 sigaction
WALL = 0x40000000         # __WALL for waitpid: wait for threads and non-SIGCHLD children

TRACE_OPTIONS = (PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK
                 | PTRACE_O_TRACEEXEC | PTRACE_O_TRACESYSGOOD)

_NAMES = {PTRACE_SEIZE: "SEIZE", PTRACE_INTERRUPT: "INTERRUPT", PTRACE_LISTEN: "LISTEN",
          PTRACE_CONT: "CONT", PTRACE_SINGLESTEP: "SINGLESTEP", PTRACE_DETACH: "DETACH",
          PTRACE_GETREGS: "GETREGS", PTRACE_SETREGS: "SETREGS",
          PTRACE_GETREGSET: "GETREGSET", PTRACE_GETSIGINFO: "GETSIGINFO",
          PTRACE_GETEVENTMSG: "GETEVENTMSG", PTRACE_SETOPTIONS: "SETOPTIONS",
          PTRACE_SETSIGINFO: "SETSIGINFO", PTRACE_GETSIGMASK: "GETSIGMASK",
          PTRACE_SETSIGMASK: "SETSIGMASK"}

_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
# long ptrace(enum __ptrace_request request, pid_t pid, void *addr, void *data);
_ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_ptrace.restype = ctypes.c_long

_SYS_TGKILL = 234        # x86-64 syscall number
_XSTATE_MAX = 1 << 15     # bytes; AMX-capable CPUs need ~11 KiB, the kernel trims iov_len


class PtraceOSError(OSError):
    """A failed ptrace request; ``request`` is its name, ``tid`` the thread it targeted."""

    def __init__(self, err: int, request: str, tid: int):
        super().__init__(err, f"ptrace(PTRACE_{request}, {tid}): {os.strerror(err)}")
        self.request = request
        self.tid = tid


def _call(request: int, tid: int, addr=None, data=None) -> int:
    ctypes.set_errno(0)
    ret = _ptrace(request, tid, addr, data)
    err = ctypes.get_errno()
    if ret == -1 and err:
        raise PtraceOSError(err, _NAMES.get(request, str(request)), tid)
    return ret


def seize(tid: int, options: int) -> None:
    """Attach to ``tid`` without stopping it (``man 2 ptrace``: PTRACE_SEIZE)."""
    _call(PTRACE_SEIZE, tid, None, options)


def interrupt(tid: int) -> None:
    """Ask a seized thread to stop; it reports a PTRACE_EVENT_STOP (or any other stop)."""
    _call(PTRACE_INTERRUPT, tid)


def listen(tid: int) -> None:
    """Restart a group-stopped thread without letting it run (it stays job-control
    stopped until SIGCONT, then reports PTRACE_EVENT_STOP)."""
    _call(PTRACE_LISTEN, tid)


def cont(tid: int, sig: int = 0) -> None:
    """Resume ``tid`` delivering signal ``sig`` (0: none)."""
    _call(PTRACE_CONT, tid, None, sig)


def singlestep(tid: int, sig: int = 0) -> None:
    """Resume ``tid`` for one instruction; it then reports SIGTRAP."""
    _call(PTRACE_SINGLESTEP, tid, None, sig)


def detach(tid: int, sig: int = 0) -> None:
    """Detach from a ptrace-stopped ``tid``, delivering ``sig`` (0: none)."""
    _call(PTRACE_DETACH, tid, None, sig)


def setoptions(tid: int, options: int) -> None:
    _call(PTRACE_SETOPTIONS, tid, None, options)


def getregs(tid: int) -> user_regs_struct:
    """General registers of a ptrace-stopped thread."""
    regs = user_regs_struct()
    _call(PTRACE_GETREGS, tid, None, ctypes.addressof(regs))
    return regs


def setregs(tid: int, regs: user_regs_struct) -> None:
    _call(PTRACE_SETREGS, tid, None, ctypes.addressof(regs))


def getsiginfo(tid: int) -> siginfo:
    """siginfo of the signal that caused the current stop (EINVAL for a group-stop)."""
    info = siginfo()
    _call(PTRACE_GETSIGINFO, tid, None, ctypes.addressof(info))
    return info


def setsiginfo(tid: int, info: siginfo) -> None:
    """Replace the siginfo of the current signal-delivery-stop: a later CONT with the
    same signal number delivers it with this siginfo (kernel ptrace_signal)."""
    _call(PTRACE_SETSIGINFO, tid, None, ctypes.addressof(info))


def getsigmask(tid: int) -> int:
    """The thread's blocked-signal mask (bit N-1 = signal N)."""
    mask = ctypes.c_uint64()
    _call(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask))
    return mask.value


def setsigmask(tid: int, mask: int) -> None:
    """Set the thread's blocked-signal mask (the kernel never blocks KILL/STOP)."""
    value = ctypes.c_uint64(mask)
    _call(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(value))


def geteventmsg(tid: int) -> int:
    """PTRACE_GETEVENTMSG into an unsigned long (new tid, former tid on exec, ...)."""
    msg = ctypes.c_ulong()
    _call(PTRACE_GETEVENTMSG, tid, None, ctypes.addressof(msg))
    return msg.value


def get_xstate(tid: int) -> bytes:
    """The XSAVE area (FPU/SSE/AVX/... state) via PTRACE_GETREGSET(NT_X86_XSTATE)."""
    buf = ctypes.create_string_buffer(_XSTATE_MAX)
    iov = iovec_struct(ctypes.cast(buf, ctypes.c_void_p), _XSTATE_MAX)
    _call(PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))
    return buf.raw[:iov.len]


def tgkill(tgid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread of process ``tgid`` (``man 2 tgkill``)."""
    ctypes.set_errno(0)
    if _libc.syscall(_SYS_TGKILL, tgid, tid, sig) == -1:
        raise PtraceOSError(ctypes.get_errno() or _errno.ESRCH, "TGKILL", tid)
