"""x86-64 arch package: decoding, safety analysis, relocation, trampolines, jump encoding.

Pure functions over bytes and absolute addresses: no ptrace, no I/O, no logging.
The core uses this package only through ``uprobe_opt/core/arch.py:ArchOps``.
"""
from .decode import Insn, check_boundary, decode, decode_one, skip_endbr
from .refusal import Reason, Refusal
from .writer import TrampolineWriter, WriterError
from .relocator import Relocator
from .xol import BREAKPOINT, JMP_REL32_SIZE, SLOT_SIZE, XolPlan, jump_bytes, prepare_xol

__all__ = [
    "BREAKPOINT", "JMP_REL32_SIZE", "SLOT_SIZE", "Reason", "Refusal", "Insn", "decode",
    "decode_one", "check_boundary", "skip_endbr", "XolPlan", "prepare_xol", "jump_bytes",
    "TrampolineWriter", "WriterError", "Relocator",
]
