"""Every direct branch target of a module: the module-wide half of check 3.

The per-function scan (analysis._scan_function) sees only the probed function's own
branches.  Hand-written assembly jumps into other functions' bodies (glibc's string
functions share tails), and a jump landing inside the bytes our 5-byte jump covers
executes the middle of it.  This linear sweep decodes every known function of a
module (capstone's lite mode: no operand detail, ~1 us per instruction) and collects
each direct jmp/jcc/call/loop/jrcxz target, so a site is refused when a branch from
anywhere in the module lands strictly inside its region.

Pure: bytes in, arrays out; the caller caches (by build-id) and adds the load bias.
"""
from __future__ import annotations

import capstone

__all__ = ["sweep_branches"]

_BRANCH_MNEMONICS = frozenset(
    ["jmp", "call", "loop", "loope", "loopne", "jrcxz", "jecxz", "ja", "jae", "jb",
     "jbe", "je", "jne", "jg", "jge", "jl", "jle", "jo", "jno", "jp", "jnp", "js", "jns"])

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_CS.skipdata = False


def sweep_branches(funcs, read) -> tuple[list[int], list[int]]:
    """(sources, targets) of every direct branch in the functions ``funcs`` (an
    iterable of (start, size), link-time addresses; ``read(start, size)`` returns their
    bytes or None).  A function that stops decoding early contributes the branches
    decoded so far (its own sites are refused by the per-function scan anyway)."""
    srcs: list[int] = []
    dsts: list[int] = []
    for start, size in funcs:
        code = read(start, size)
        if not code:
            continue
        for addr, _sz, mnem, op in _CS.disasm_lite(code, start):
            if mnem.rpartition(" ")[2] in _BRANCH_MNEMONICS and op.startswith("0x"):
                srcs.append(addr)
                dsts.append(int(op, 16))
    return srcs, dsts
