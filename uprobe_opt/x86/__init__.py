"""x86-64 arch package: decoding, safety analysis, relocation, trampolines, jump encoding.

Pure functions over bytes and absolute addresses: no ptrace, no I/O, no logging.
The core uses this package only through ``uprobe_opt/core/arch.py:ArchOps``.

Modules: ``decode`` (capstone -> Insn, boundary, endbr64), ``refusal`` (Reason,
Refusal), ``writer`` (TrampolineWriter, the only emitter; keystone lives there),
``relocator`` (one rewrite_* per relocation rule), ``xol`` (int3-path copies, jump
encoding), ``analysis`` (can_optimize: design.md checks 1-6), ``frame`` (the saved
register frame, one definition), ``trampoline`` (HandlerSpec, Detour, build_detour:
check 7 and the slot code, ``listing`` for ``explain --detour``), ``lean`` (the count
and record bodies: minimal saves, lahf/sahf flags, rseq per-CPU counters), ``ringlayout`` (the "record" ring: layout and protocol,
shared with the tracer's consumer), ``exits`` (the exits of a function for
return probes, their regions).
"""
from .decode import Insn, check_boundary, decode, decode_one, skip_endbr
from .refusal import Reason, Refusal
from .writer import TrampolineWriter, WriterError
from .relocator import Relocator
from .xol import BREAKPOINT, JMP_REL32_SIZE, SLOT_SIZE, XolPlan, jump_bytes, prepare_xol
from .analysis import Region, can_optimize
from .frame import (FRAME_FIELDS, FRAME_SIZE, RED_ZONE_SIZE, frame_offset, pack_frame,
                    site_rsp, unpack_frame)
from .trampoline import COUNTER_STRIDE, Detour, HandlerSpec, build_detour, build_exit_detour
from .exits import Exit, can_optimize_exit, find_exits

__all__ = [
    "BREAKPOINT", "JMP_REL32_SIZE", "SLOT_SIZE", "Reason", "Refusal", "Insn", "decode",
    "decode_one", "check_boundary", "skip_endbr", "XolPlan", "prepare_xol", "jump_bytes",
    "TrampolineWriter", "WriterError", "Relocator", "Region", "can_optimize",
    "FRAME_FIELDS", "FRAME_SIZE", "RED_ZONE_SIZE", "frame_offset", "pack_frame",
    "unpack_frame", "site_rsp", "COUNTER_STRIDE", "Detour", "HandlerSpec", "build_detour",
    "build_exit_detour", "Exit", "can_optimize_exit", "find_exits",
]
