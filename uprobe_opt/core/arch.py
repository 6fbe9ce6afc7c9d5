"""The arch boundary: the only way the probe core reaches instruction-level knowledge.

Like the kernel's arch hooks for kprobes (``arch_prepare_optimized_kprobe``,
``arch_check_optimized_kprobe``, ``arch_within_optimized_kprobe``,
``arch_optimize_kprobes``, ``arch_unoptimize_kprobes``, ``arch_remove_optimized_kprobe``)
the core never looks at opcodes: it hands bytes and addresses to an :class:`ArchOps`
and gets back byte strings to write or a refusal to keep.  Without an ArchOps the core
still runs every probe as an int3 probe (``load_arch(optimize=False)``).

Shapes: every ``addr`` is an absolute address in the target; ``code`` is the original
(recovered) bytes starting at ``code_addr``.  Methods that decide return either a plan
object or a ``Refusal`` (a value with ``reason``, ``addr`` and ``detail``; ``str()`` is
the detail).
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol


class ArchOps(Protocol):
    breakpoint: bytes          # the trap instruction written at an armed site
    shadow_stack: bool         # the target uses CET shadow stacks
    jump_size: int             # bytes a jump-optimized site covers at least
    slot_size: int             # bytes of one XOL or detour slot

    def check_boundary(self, code: bytes, code_addr: int, addr: int) -> Any | None:
        """Refusal if ``addr`` is not an instruction boundary (kernel ``can_probe``)."""

    def adjust_addr(self, code: bytes, code_addr: int, addr: int) -> int:
        """Where a probe requested at ``addr`` is planted (skips endbr64 at entry)."""

    def prepare_xol(self, insn: bytes, addr: int, slot_addr: int) -> Any:
        """XOL plan (``.code`` to write at slot_addr) for the instruction at addr, or Refusal."""

    def check(self, func_code: bytes, func_addr: int, func_size: int | None, addr: int,
              other_probes: Iterable[int], extra_targets: Iterable[int] = (),
              facts: Any = None) -> Any:
        """Region (``.addr``, ``.size``, ``.orig``) that jump optimization would cover,
        or Refusal (kernel ``can_optimize`` + ``arch_check_optimized_kprobe``).
        ``extra_targets``: addresses entered from outside the function's own branches
        (C++ landing pads), refused inside the region like jump targets.  ``facts``:
        the function's facts from the module's branch index (same verdict, no full
        decode of the function)."""

    def prepare(self, region: Any, slot_addr: int, handler: Any) -> Any:
        """Detour (``.code`` for slot_addr, ``.trap_addr``) for region, or Refusal
        (kernel ``arch_prepare_optimized_kprobe``)."""

    def find_exits(self, func_code: bytes, func_addr: int, func_size: int) -> Any:
        """(exits, notes) of the function, or Refusal: each exit (``.addr``, ``.kind``
        "ret" or "tail", ``.describe(func_addr, symbol)``) ends a call (return probes)."""

    def check_exit(self, func_code: bytes, func_addr: int, func_size: int, exit_addr: int,
                   other_probes: Iterable[int], extra_targets: Iterable[int] = ()) -> Any:
        """Region ENDING with the exit at ``exit_addr`` (it starts a few instructions
        before it: the jump goes there), or Refusal."""

    def prepare_exit(self, region: Any, slot_addr: int, handler: Any) -> Any:
        """Exit detour (relocated instructions before the exit, handler with the state
        at the exit, the exit itself), or Refusal."""

    def unoptimize_exit(self, region: Any, exit_addr: int) -> bytes:
        """Bytes to write at region.addr (all threads stopped) that undo an exit's
        jump and put the exit's breakpoint back."""

    def exit_regs(self) -> tuple[str, ...]:
        """Registers an exit record stores: the return value and the stack pointer."""

    def entry_regs(self, nargs: int) -> tuple[str, ...]:
        """Registers an entry record of a return probe stores (arguments, stack pointer)."""

    def within(self, region: Any, addr: int) -> bool:
        """True when addr lies strictly inside the region: (region.addr, region.addr+size)."""

    def optimize(self, region: Any, slot_addr: int) -> tuple[bytes, bytes]:
        """(tail, head): the jump's bytes after the first, then its first byte.  Written
        tail first while the breakpoint still guards the site, head last."""

    def unoptimize(self, region: Any) -> tuple[bytes, bytes]:
        """(head, tail): the breakpoint byte to write first, then the original tail."""

    def detour_listing(self, detour: Any) -> list[tuple[str, int, bytes, str]]:
        """The detour as written: (section, address, bytes, text) per instruction or
        data item, in address order (``uprobe-opt explain --detour``)."""

    def handler_spec(self, kind: str, **kw: Any) -> Any:
        """Arch description of the in-detour handler part (count, python, ...)."""


def load_arch(optimize: bool = True) -> ArchOps:
    """The x86-64 ArchOps.  ``optimize`` is accepted for symmetry; XOL needs the arch too."""
    from uprobe_opt.x86.ops import X86Ops
    return X86Ops()
