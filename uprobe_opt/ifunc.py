"""GNU IFUNC symbols (STT_GNU_IFUNC): which implementation a process runs.

An IFUNC symbol's value is a *resolver*: the dynamic linker calls it once per
relocation and stores the address it returns (the implementation, e.g.
``__strlen_avx2``) in the relocated slot (x86-64 psABI, R_X86_64_IRELATIVE and
R_X86_64_GLOB_DAT/JUMP_SLOT against an IFUNC symbol).  A probe on the resolver counts
nothing after start-up, so a probe on ``strlen`` must land on the implementation.

How the implementation is found in a live process, first answer wins:

1. **A relocated slot, read from the target** (what gdb does with the resolved GOT
   entry): an R_X86_64_IRELATIVE slot of the defining object whose addend is the
   resolver, or a GLOB_DAT/JUMP_SLOT slot of any loaded object for the symbol's name
   whose value points into the defining object's code (a lazy JUMP_SLOT that still
   points back into its own PLT is not an answer).
2. **The resolver run on a copy**: glibc's resolvers are pure functions of the CPU
   feature words the dynamic linker filled in; the resolver is emulated (unicorn)
   over pages copied from ``/proc/PID/mem`` on demand, without a syscall, at most a
   few thousand instructions.  Nothing runs in the target and nothing is written.

Without a process (``explain FILE``) the choice is made at run time; the candidates
are the functions the resolver's code takes the address of (``lea reg, [rip+X]``).
"""
from __future__ import annotations

import os
import struct

__all__ = ["read_word", "emulate_resolver", "resolver_candidates"]

_PAGE = 4096
_MAX_INSNS = 20_000
_STACK_BASE, _STACK_SIZE = 0x7FFF_0000_0000 - 0x10_0000, 0x10_0000   # scratch, emulator only
_SENTINEL = 0x7FFF_0000_0000 - 0x20_0000                             # the return address


def read_word(pid: int, addr: int) -> int | None:
    """The 8-byte little-endian word at ``addr`` in process ``pid`` (through
    /proc/PID/mem, no stop), or None when it cannot be read."""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, 8, addr)
    except OSError:
        return None
    finally:
        os.close(fd)
    return struct.unpack("<Q", data)[0] if len(data) == 8 else None


def emulation_unavailable() -> str | None:
    """Why resolvers cannot be emulated here (the optional ``unicorn`` package, the
    ``emulation`` extra, is not installed), or None."""
    import importlib.util
    if importlib.util.find_spec("unicorn") is None:
        return "unicorn not installed: pip install 'uprobe-opt[emulation]'"
    return None


def emulate_resolver(pid: int, resolver: int, readable) -> int | None:
    """What the IFUNC resolver at absolute ``resolver`` returns in process ``pid``,
    emulated over copies of its pages; ``readable(addr)`` says whether ``addr`` lies
    in a mapping we may copy (not [vvar]/io).  None when the resolver makes a
    syscall, touches something unreadable or runs too long: then we do not know."""
    try:
        from unicorn import Uc, UcError, UC_ARCH_X86, UC_MODE_64, UC_HOOK_MEM_UNMAPPED
        from unicorn import UC_HOOK_INSN
        from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RSP, UC_X86_INS_SYSCALL
    except ImportError:
        return None
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return None
    uc = Uc(UC_ARCH_X86, UC_MODE_64)

    def fault_in(uc, _access, addr, _size, _value, _data):
        page = addr & ~(_PAGE - 1)
        if not readable(page):
            return False
        try:
            data = os.pread(fd, _PAGE, page)
        except OSError:
            return False
        if len(data) != _PAGE:
            return False
        uc.mem_map(page, _PAGE)
        uc.mem_write(page, data)
        return True

    def no_syscall(uc, _data):
        uc.emu_stop()
        stopped.append(True)

    stopped: list[bool] = []
    try:
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, fault_in)
        uc.hook_add(UC_HOOK_INSN, no_syscall, None, 1, 0, UC_X86_INS_SYSCALL)
        uc.mem_map(_STACK_BASE, _STACK_SIZE)
        rsp = _STACK_BASE + _STACK_SIZE - 0x100
        uc.mem_write(rsp, struct.pack("<Q", _SENTINEL))
        uc.reg_write(UC_X86_REG_RSP, rsp)
        uc.emu_start(resolver, _SENTINEL, count=_MAX_INSNS)
        if stopped or uc.reg_read(UC_X86_REG_RSP) != rsp + 8:
            return None
        return uc.reg_read(UC_X86_REG_RAX)
    except UcError:
        return None
    finally:
        os.close(fd)


def resolver_candidates(code: bytes, addr: int) -> list[int]:
    """Addresses the resolver whose bytes ``code`` start at ``addr`` takes with a
    RIP-relative ``lea`` (glibc's resolvers return one of them), in first-seen order."""
    from uprobe_opt.x86.decode import decode
    seen: list[int] = []
    for insn in decode(code, addr):
        if insn.mnemonic == "lea" and insn.rip_target is not None \
                and insn.rip_target not in seen:
            seen.append(insn.rip_target)
    return seen
