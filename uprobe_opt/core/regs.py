"""The register view a pre_handler receives.

``Regs`` wraps the thread's registers as they were **at the probe site** (``rip`` is the
probe address, ``rsp`` the stack pointer at the site), whichever path the hit took (an
int3 trap or the optimized detour's frame).  Reading is attribute access
(``regs.rdi``); writing (``regs.rdi = 5``) marks the view dirty and the tracer writes the
change back before the thread resumes, so the probed code sees the new value.

Argument helpers follow the x86-64 System V ABI (integer arguments in rdi, rsi, rdx, rcx,
r8, r9; AMD64 ABI 1.0 section 3.2.3).
"""
from __future__ import annotations

GPR_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
             "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
             "fs_base", "gs_base", "ds", "es", "fs", "gs")
ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
_MASK = (1 << 64) - 1


class Regs:
    """Registers of one thread at one probe hit; values are unsigned 64-bit ints.

    ``tid`` is the thread id (kernel tid), ``memory`` the target's memory accessor
    (``read(addr, size) -> bytes`` and ``write(addr, data)``, absolute target addresses).
    """

    __slots__ = ("_values", "_dirty", "tid", "memory")

    def __init__(self, values: dict[str, int], tid: int, memory=None):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_dirty", set())
        object.__setattr__(self, "tid", tid)
        object.__setattr__(self, "memory", memory)

    def __getattr__(self, name: str) -> int:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no register {name!r}") from None

    def __setattr__(self, name: str, value: int) -> None:
        if name not in self._values:
            raise AttributeError(f"no register {name!r}")
        self._values[name] = int(value) & _MASK
        self._dirty.add(name)

    @property
    def dirty(self) -> frozenset[str]:
        """Names of the registers a handler wrote."""
        return frozenset(self._dirty)

    def as_dict(self) -> dict[str, int]:
        return dict(self._values)

    def arg(self, n: int) -> int:
        """Integer argument ``n`` (0-5) of the System V calling convention."""
        return self._values[ARG_REGS[n]]

    def set_arg(self, n: int, value: int) -> None:
        setattr(self, ARG_REGS[n], value)

    @property
    def args(self) -> tuple[int, ...]:
        """The six integer argument registers (rdi, rsi, rdx, rcx, r8, r9)."""
        return tuple(self._values[r] for r in ARG_REGS)

    def read(self, addr: int, size: int) -> bytes:
        """Read ``size`` bytes of target memory at absolute address ``addr``."""
        return self.memory.read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` into target memory at absolute address ``addr``."""
        self.memory.write(addr, data)

    def read_cstring(self, addr: int, limit: int = 4096) -> bytes:
        """Read a NUL-terminated string (without the NUL), at most ``limit`` bytes."""
        out = b""
        while len(out) < limit:
            chunk = self.memory.read(addr + len(out), min(256, limit - len(out)))
            nul = chunk.find(b"\0")
            if nul >= 0:
                return out + chunk[:nul]
            out += chunk
        return out

    def __repr__(self) -> str:
        show = ", ".join(f"{r}={self._values[r]:#x}" for r in ("rip", "rsp") + ARG_REGS)
        return f"Regs(tid={self.tid}, {show})"
