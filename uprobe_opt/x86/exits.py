"""Exit sites of a function, their jump-optimization regions and exit detours.

A return probe here never touches a return address: every instruction that leaves the
function is probed instead (the way Dyninst instruments exit points).  An *exit* is

* a ``ret`` (``c3``, ``c2 imm16``, with or without a ``bnd``/``rep`` prefix), or
* a *tail call*: a direct ``jmp`` whose target lies outside the function (or is the
  function's own first byte: a self tail call starts a new call), or an indirect
  ``jmp qword ptr [rip + X]`` without index (a tail call through the GOT).

Other indirect jumps (``jmp rax``, ``jmp [r + i*8]``) may be a jump table or a tail
call; they are not exits we can name, and :func:`find_exits` reports them as notes (a
call that leaves through one is seen as an entry without its exit).

At an exit the thread's ``rsp`` points at the return-address slot of the call, exactly
as at the function's first instruction (the SysV call sequence: ``call`` pushes the
return address, the function pops what it pushed before ``ret`` or a tail ``jmp``).

Exit detour (:func:`build_exit_detour`), for a region ``[A, X + len)`` ending with the
exit instruction at X::

    <relocated instructions A..X>    ; the epilogue before the exit (pop rbx; pop rbp ...)
    <save frame>                     ; rip = X, rsp = the rsp at X (return-address slot)
    <handler part>                   ; sees rax/rdx = the return value
    <restore frame>                  ; a python handler's rax change becomes the result
    <relocated exit>                 ; ret (runs in the detour), or jmp to the tail target

Nothing jumps back into the function: the detour leaves by the exit itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .analysis import Region, _check_relocatable, _check_region_bytes, _scan_function
from .decode import Insn, decode
from .refusal import Reason, Refusal
from .xol import JMP_REL32_SIZE

__all__ = ["Exit", "find_exits", "find_exit_region", "can_optimize_exit"]


@dataclass(frozen=True)
class Exit:
    """One exit of a function.  ``addr``: the exit instruction (absolute, target
    address space); ``kind``: ``"ret"`` or ``"tail"``; ``target``: where a direct tail
    call goes (None for ret and for a tail call through memory)."""

    addr: int
    kind: str
    insn: Insn
    target: int | None = None

    def describe(self, func_addr: int, symbol: str | None = None) -> str:
        """``ret at work+0x3c`` / ``tail call (jmp 0x401200) at work+0x51``."""
        where = f"{symbol or hex(func_addr)}+{self.addr - func_addr:#x}"
        if self.kind == "ret":
            return f"ret at {where}"
        return f"tail call ({self.insn}) at {where}"


def _is_got_jump(insn: Insn) -> bool:
    """``jmp qword ptr [rip + X]``: the PLT-less tail call through the GOT."""
    return insn.kind == "jmp_ind" and insn.mem_base == "rip" and "*" not in insn.op_str


def _decode_whole(func_code: bytes, func_addr: int, func_size: int, why: str):
    """The linear sweep of the whole function, or a Refusal (DECODE_ERROR) where it
    stops early: whatever lies in the undecoded bytes cannot be checked (``why`` ends
    the message)."""
    insns = decode(bytes(func_code[:func_size]), func_addr)
    swept = insns[-1].end if insns else func_addr
    if swept < func_addr + func_size:
        return Refusal(Reason.DECODE_ERROR, swept,
                       f"cannot decode the function past 0x{swept:x}{why}")
    return insns


def find_exits(func_code: bytes, func_addr: int, func_size: int
               ) -> tuple[list[Exit], list[str]] | Refusal:
    """Every exit of the function whose ORIGINAL bytes are ``func_code`` (``func_size``
    of them from ``func_addr``), in address order, plus notes about indirect jumps that
    may leave it.  A Refusal (DECODE_ERROR) when the linear sweep cannot decode the whole
    function: an exit could hide in the undecoded bytes."""
    insns = _decode_whole(func_code, func_addr, func_size, ": its exits cannot all be found")
    if isinstance(insns, Refusal):
        return insns
    end = func_addr + func_size
    exits, notes = [], []
    for insn in insns:
        if insn.kind == "ret":
            exits.append(Exit(insn.addr, "ret", insn))
        elif insn.kind == "jmp" and (not func_addr <= insn.target < end
                                     or insn.target == func_addr):
            exits.append(Exit(insn.addr, "tail", insn, insn.target))
        elif _is_got_jump(insn):
            exits.append(Exit(insn.addr, "tail", insn, None))
        elif insn.kind == "jmp_ind":
            notes.append(f"indirect '{insn}' at {insn.addr:#x} (a jump table or a tail "
                         "call) is not probed: a call leaving through it ends as unwound")
    return exits, notes


def find_exit_region(insns: list[Insn], exit_addr: int) -> Region | Refusal:
    """The shortest run of whole instructions that ENDS with the exit at ``exit_addr``
    and covers the 5-byte jump: the exit instruction itself when it is 5 bytes or more
    (a ``jmp rel32`` tail call), else the exit plus the instructions just before it."""
    index = next((i for i, insn in enumerate(insns) if insn.addr == exit_addr), None)
    if index is None:
        return Refusal(Reason.NOT_BOUNDARY, exit_addr,
                       f"0x{exit_addr:x} does not start a decoded instruction")
    end = insns[index].end
    start = index
    while end - insns[start].addr < JMP_REL32_SIZE:
        if start == 0 or insns[start - 1].end != insns[start].addr:
            first = insns[start].addr
            return Refusal(Reason.FUNCTION_TOO_SHORT, exit_addr,
                           f"only {end - first} bytes from the function start to the end "
                           f"of the exit at 0x{exit_addr:x}")
        start -= 1
    picked = tuple(insns[start:index + 1])
    return Region(picked[0].addr, end - picked[0].addr, picked,
                  b"".join(i.bytes for i in picked))


def can_optimize_exit(func_code: bytes, func_addr: int, func_size: int, exit_addr: int, *,
                      other_probes: Iterable[int] = (), extra_targets: Iterable[int] = (),
                      shadow_stack: bool = False) -> Region | Refusal:
    """The region a 5-byte jump may cover for the exit at ``exit_addr``, or why not.

    The same checks as :func:`uprobe_opt.x86.analysis.can_optimize` (the whole function
    decodes; no indirect jump in it; no branch, landing pad or other probe strictly
    inside the region; every instruction relocatable), plus: no other probe at the
    region's first byte (the jump would be written over it).  A region that starts
    before the exit is only safe if every path to the exit runs through its first
    byte, which is what "no branch lands strictly inside" guarantees: the 1-byte
    ``ret`` right after alignment padding or a branch target gets a refusal here.
    """
    insns = _decode_whole(func_code, func_addr, func_size,
                          ", so jumps into the region cannot be ruled out")
    if isinstance(insns, Refusal):
        return insns
    region = find_exit_region(insns, exit_addr)
    if isinstance(region, Refusal):
        return region
    others = set(other_probes) - {exit_addr}
    if region.addr != exit_addr and region.addr in others:
        return Refusal(Reason.PROBE_IN_RANGE, region.addr,
                       f"probe at 0x{region.addr:x} is where the exit's jump would start "
                       f"(region 0x{region.addr:x}-0x{region.end:x})")
    for insn in region.insns[:-1]:
        if insn.kind in ("jmp", "jmp_ind", "ret"):
            return Refusal(Reason.NOT_RELOCATABLE, insn.addr,
                           f"'{insn}' at 0x{insn.addr:x} leaves before the exit")
    return (_check_region_bytes(region, others)
            or _scan_function(insns, region, extra_targets)
            or _check_relocatable(region, shadow_stack)
            or region)
