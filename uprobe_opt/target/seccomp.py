"""Seccomp: never inject a system call the target's filter may kill it for.

A process under seccomp (``Seccomp:`` in /proc/PID/status: 0 none, 1 strict, 2 filter)
runs every system call through the kernel's check, also the ones a tracer makes it run
(our remote mmap/munmap/...).  Strict mode (``man 2 seccomp``, SECCOMP_MODE_STRICT)
allows read, write, _exit and sigreturn only: anything we inject kills the process, so
such a process is refused before anything is done.  In filter mode the thread's cBPF
programs are read with PTRACE_SECCOMP_GET_FILTER (the thread must be ptrace-stopped;
CAP_SYS_ADMIN) and evaluated here for the exact call (number, arguments, instruction
pointer) before it is injected; anything but SECCOMP_RET_ALLOW / SECCOMP_RET_LOG from
any of them refuses the call (kernel/seccomp.c: every filter runs, the action with the
highest precedence wins, and only ALLOW and LOG let the call run unchanged).
"""
from __future__ import annotations

import ctypes
import struct

from ..errors import AccessDenied

PTRACE_SECCOMP_GET_FILTER = 0x420c
AUDIT_ARCH_X86_64 = 0xC000003E
RET_ACTION_FULL = 0xFFFF0000
RET_ALLOW, RET_LOG = 0x7FFF0000, 0x7FFC0000
_ACTIONS = {0x80000000: "KILL_PROCESS", 0x00000000: "KILL_THREAD", 0x00030000: "TRAP",
            0x00050000: "ERRNO", 0x7FC00000: "USER_NOTIF", 0x7FF00000: "TRACE"}
_MAX_INSNS = 4096                                  # BPF_MAXINSNS
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_libc.ptrace.restype = ctypes.c_long


def seccomp_mode(pid: int, tid: int | None = None) -> int:
    """0, 1 (strict) or 2 (filter) from /proc/PID[/task/TID]/status; 0 if unknown."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def strict_refusal(pid: int) -> AccessDenied:
    return AccessDenied(f"process {pid} runs in seccomp strict mode: every system call "
                        "but read, write, _exit and sigreturn kills it, and probes need "
                        "mmap(2) in the target; not traced (nothing was done)", pid=pid)


def read_filters(tid: int) -> list[bytes]:
    """The cBPF programs of stopped thread ``tid``, newest first (8-byte sock_filter
    instructions).  AccessDenied when the kernel refuses (no CAP_SYS_ADMIN, or
    CONFIG_CHECKPOINT_RESTORE off)."""
    progs = []
    for index in range(1024):
        ctypes.set_errno(0)
        n = _libc.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, None)
        err = ctypes.get_errno()
        if n == -1 and err == 2:                    # ENOENT: no filter at this index
            return progs
        if n < 0 or n > _MAX_INSNS:
            raise AccessDenied(f"thread {tid} runs under a seccomp filter that cannot be "
                               f"read (PTRACE_SECCOMP_GET_FILTER: errno {err}): a system "
                               "call we inject could kill it; not traced", tid=tid)
        buf = ctypes.create_string_buffer(8 * n)
        _libc.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, buf)
        progs.append(buf.raw)
    return progs


def seccomp_data(nr: int, args, ip: int) -> bytes:
    """struct seccomp_data (include/uapi/linux/seccomp.h) for an x86-64 call."""
    args = list(args) + [0] * (6 - len(args))
    return struct.pack("<iIQ6Q", nr, AUDIT_ARCH_X86_64, ip,
                       *[a & (2**64 - 1) for a in args])


def run_filter(prog: bytes, data: bytes) -> int:
    """Evaluate one classic BPF program (Documentation/networking/filter.rst) over
    ``data``; returns its 32-bit return value.  Malformed programs raise ValueError
    (the kernel would not have accepted them)."""
    insns = [struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog), 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0
    for _ in range(len(insns) + 1):             # cBPF jumps only forward
        code, jt, jf, k = insns[pc]
        cls = code & 0x07
        pc += 1
        if cls == 0x06:                                     # RET
            return (a if code & 0x18 == 0x10 else k) & 0xFFFFFFFF
        if cls in (0x00, 0x01):                             # LD / LDX
            value = _load(code, k, data, mem)
            if cls == 0x00:
                a = value
            else:
                x = value
        elif cls == 0x02:                                   # ST
            mem[k] = a
        elif cls == 0x03:                                   # STX
            mem[k] = x
        elif cls == 0x04:                                   # ALU
            a = _alu(code, a, x if code & 0x08 else k)
        elif cls == 0x05:                                   # JMP
            pc += _jump(code, a, x if code & 0x08 else k, jt, jf, k)
        elif cls == 0x07:                                   # MISC: TAX / TXA
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
    raise ValueError("cBPF program runs past its end")


def _load(code: int, k: int, data: bytes, mem: list[int]) -> int:
    mode = code & 0xE0
    if mode == 0x20:                                        # ABS (W only for seccomp)
        if code & 0x18 != 0x00 or k % 4 or k + 4 > len(data):
            raise ValueError(f"bad seccomp load at offset {k}")
        return struct.unpack_from("<I", data, k)[0]
    if mode == 0x00:
        return k                                           # IMM
    if mode == 0x60:
        return mem[k]                                      # MEM
    if mode == 0x80:
        return len(data)                                   # LEN
    raise ValueError(f"unsupported load {code:#x}")


def _alu(code: int, a: int, v: int) -> int:
    op = code & 0xF0
    ops = {0x00: lambda: a + v, 0x10: lambda: a - v, 0x20: lambda: a * v,
           0x30: lambda: a // v if v else 0, 0x40: lambda: a | v, 0x50: lambda: a & v,
           0x60: lambda: a << (v & 31), 0x70: lambda: a >> (v & 31), 0x80: lambda: -a,
           0x90: lambda: a % v if v else 0, 0xA0: lambda: a ^ v}
    if op not in ops:
        raise ValueError(f"unsupported ALU op {code:#x}")
    return ops[op]() & 0xFFFFFFFF


def _jump(code: int, a: int, v: int, jt: int, jf: int, k: int) -> int:
    op = code & 0xF0
    if op == 0x00:
        return k                                           # JA
    cond = {0x10: a == v, 0x20: a > v, 0x30: a >= v, 0x40: bool(a & v)}.get(op)
    if cond is None:
        raise ValueError(f"unsupported jump {code:#x}")
    return jt if cond else jf


def verdict(progs: list[bytes], nr: int, args, ip: int) -> str | None:
    """None when every filter allows the call (ALLOW or LOG), else the action's name."""
    data = seccomp_data(nr, args, ip)
    for prog in progs:
        try:
            ret = run_filter(prog, data)
        except (ValueError, IndexError) as e:
            return f"unknown ({e})"
        action = ret & RET_ACTION_FULL
        if action not in (RET_ALLOW, RET_LOG):
            return _ACTIONS.get(action, f"{action:#x}")
    return None
