"""Every direct branch target of a module: the module-wide half of check 3.

The per-function scan (analysis._scan_function) sees only the probed function's own
branches.  Hand-written assembly jumps into other functions' bodies (glibc's string
functions share tails), and a jump landing inside the bytes our 5-byte jump covers
executes the middle of it.  This linear sweep decodes every known function of a
module (capstone's lite mode: no operand detail, ~1 us per instruction) and collects
each direct jmp/jcc/call/loop/jrcxz target, so a site is refused when a branch from
anywhere in the module lands strictly inside its region.

The same sweep records, per function, where the linear decode stopped and every
indirect jmp (:func:`sweep_module`): with them a site's check 3 and 4 need no full
decode of its function (``analysis.can_optimize(..., facts=)``), which is what makes
listing thousands of functions fast.

Pure: bytes in, arrays out; the caller caches (by build-id) and adds the load bias.
"""
from __future__ import annotations

import capstone

from dataclasses import dataclass, field

from .decode import _classify

__all__ = ["sweep_branches", "sweep_module", "ModuleSweep", "FunctionFacts",
           "INDIRECT_KINDS"]

# How an indirect jmp reaches its target (the words analysis prints).
INDIRECT_KINDS = ("jump table", "through memory")

_BRANCH_MNEMONICS = frozenset(
    ["jmp", "call", "loop", "loope", "loopne", "jrcxz", "jecxz", "ja", "jae", "jb",
     "jbe", "je", "jne", "jg", "jge", "jl", "jle", "jo", "jno", "jp", "jnp", "js", "jns"])

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_CS.skipdata = False


@dataclass
class ModuleSweep:
    """What one linear sweep of every function of a module found (link-time
    addresses): direct branches (``srcs[i]`` -> ``dsts[i]``); per swept function its
    ``starts``, ``sizes`` and ``ends`` (where the decode stopped: ``end < start + size``
    means it could not decode further); indirect jmps at ``ind_addrs`` with
    ``ind_kinds`` (an index into INDIRECT_KINDS)."""
    srcs: list = field(default_factory=list)
    dsts: list = field(default_factory=list)
    starts: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    ends: list = field(default_factory=list)
    ind_addrs: list = field(default_factory=list)
    ind_kinds: list = field(default_factory=list)


@dataclass(frozen=True)
class FunctionFacts:
    """One function's share of a ModuleSweep (absolute or link-time addresses, as
    long as they agree with the code given to the analysis): ``end`` where its
    decode stopped, ``indirect`` its first indirect jmp (addr, kind word) or None,
    ``branches`` its own direct branches as (source, target), by source."""
    end: int
    indirect: tuple[int, str] | None
    branches: tuple[tuple[int, int], ...]


def sweep_branches(funcs, read) -> tuple[list[int], list[int]]:
    """(sources, targets) of every direct branch in the functions ``funcs`` (an
    iterable of (start, size), link-time addresses; ``read(start, size)`` returns their
    bytes or None).  A function that stops decoding early contributes the branches
    decoded so far (its own sites are refused by the per-function scan anyway)."""
    sweep = sweep_module(funcs, read)
    return sweep.srcs, sweep.dsts


def sweep_module(funcs, read) -> ModuleSweep:
    """The :class:`ModuleSweep` of ``funcs`` (see :func:`sweep_branches`).  Indirect
    jmps are classified from their raw bytes exactly as decode.py classifies them
    (``jmp_ind``, or a far jmp), so the facts equal a full decode's."""
    out = ModuleSweep()
    for start, size in funcs:
        code = read(start, size)
        if not code:
            continue
        pos = start
        for addr, sz, mnem, op in _CS.disasm_lite(code, start):
            pos = addr + sz
            base = mnem.rpartition(" ")[2]
            if base in _BRANCH_MNEMONICS and op.startswith("0x"):
                out.srcs.append(addr)
                out.dsts.append(int(op, 16))
            elif "jmp" in base:
                kind = _classify(code[addr - start:addr - start + sz])[0]
                if kind == "jmp_ind" or (kind == "far" and base.endswith("jmp")):
                    out.ind_addrs.append(addr)
                    out.ind_kinds.append(0 if "[" not in op or "*" in op else 1)
        out.starts.append(start)
        out.sizes.append(size)
        out.ends.append(pos)
    return out
