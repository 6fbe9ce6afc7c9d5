"""The register frame a detour saves on the thread's own stack: the ONE definition.

Layout = Linux ``struct pt_regs`` (arch/x86/include/asm/ptrace.h) = the first 21
fields of python-ptrace's ``user_regs_struct``: 21 little-endian u64, 168 bytes, field
``FRAME_FIELDS[i]`` at offset ``8*i``.  The trampoline generator (trampoline.py) derives
its push/pop order from this tuple, and the tracer reads/writes the same bytes with
:func:`unpack_frame` / :func:`pack_frame`.

While the handler part of a detour runs, the frame starts at the thread's rsp, and

    site rsp (the rsp at the probe) == frame address + FRAME_SIZE + RED_ZONE_SIZE

(the detour first steps over the 128-byte red zone of the SysV ABI, then pushes the
frame).  Stored values: ``rip`` = the probe address, ``rsp`` = the site rsp,
``orig_rax`` = -1, ``cs``/``ss`` = the user selectors 0x33/0x2b, ``eflags`` as at
the probe.  On the way out the detour reloads every GPR and eflags FROM THE FRAME, so
a handler changes registers by writing the frame; changes to rip, rsp, cs, ss and
orig_rax are ignored (the relocated region always runs next, on the original stack).
"""
from __future__ import annotations

import struct

FRAME_FIELDS: tuple[str, ...] = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
)
FRAME_SIZE = 8 * len(FRAME_FIELDS)         # 168 bytes
RED_ZONE_SIZE = 128                         # SysV x86-64 ABI 3.2.2
GPR_FIELDS = FRAME_FIELDS[:FRAME_FIELDS.index("orig_rax")]   # restored by pop, in order
USER_CS, USER_SS = 0x33, 0x2B               # Linux x86-64 __USER_CS / __USER_DS

_STRUCT = struct.Struct("<" + "Q" * len(FRAME_FIELDS))
_OFFSETS = {name: 8 * i for i, name in enumerate(FRAME_FIELDS)}


def frame_offset(name: str) -> int:
    """Byte offset of field ``name`` from the start of the frame (KeyError if unknown)."""
    return _OFFSETS[name]


def unpack_frame(data: bytes) -> dict[str, int]:
    """The first FRAME_SIZE bytes of ``data`` as {field: unsigned 64-bit value}."""
    return dict(zip(FRAME_FIELDS, _STRUCT.unpack_from(bytes(data[:FRAME_SIZE]))))


def pack_frame(values: dict[str, int]) -> bytes:
    """FRAME_SIZE bytes from {field: value}; missing fields are 0, values are taken
    modulo 2**64 (so -1 is fine for orig_rax)."""
    unknown = set(values) - set(FRAME_FIELDS)
    if unknown:
        raise KeyError(f"not frame fields: {sorted(unknown)}")
    return _STRUCT.pack(*((values.get(name, 0)) & 0xFFFFFFFFFFFFFFFF for name in FRAME_FIELDS))


def site_rsp(frame_addr: int) -> int:
    """The rsp at the probe site given the frame address (the thread's rsp at the trap)."""
    return frame_addr + FRAME_SIZE + RED_ZONE_SIZE
