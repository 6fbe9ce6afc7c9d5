"""Refusals: the normal "no" answer of every x86 check (style convention 3).

A :class:`Refusal` is a value, never an exception: the core keeps the int3 probe and
stores the refusal; the CLI prints ``str(refusal)``, which is the ``detail`` sentence.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Reason(enum.Enum):
    """Why a site cannot be probed or optimized (one member per distinct cause)."""

    NOT_BOUNDARY = "not an instruction boundary"
    OUTSIDE_FUNCTION = "outside any known function"
    FUNCTION_TOO_SHORT = "function too short for a 5-byte jump"
    JUMP_INTO_RANGE = "a jump targets the inside of the region"
    INDIRECT_JUMP = "the function has an indirect jump"
    NOT_RELOCATABLE = "an instruction cannot be relocated"
    RIPREL_OUT_OF_RANGE = "a RIP-relative operand is out of reach of the slot"
    FOREIGN_INT3 = "a foreign int3 lies in the region"
    DETOUR_TOO_FAR = "no detour page within +-2 GiB"
    PROBE_IN_RANGE = "another probe lies inside the region"
    DECODE_ERROR = "bytes cannot be decoded"
    THREAD_IN_RANGE = "a thread is inside the region"


@dataclass(frozen=True)
class Refusal:
    """``reason``: the cause; ``addr``: the absolute address the detail is about (the
    offending instruction, else the probe); ``detail``: one short sentence naming them."""

    reason: Reason
    addr: int
    detail: str

    def __str__(self) -> str:
        return self.detail
