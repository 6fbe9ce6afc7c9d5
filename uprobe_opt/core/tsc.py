"""Time Stamp Counter to CLOCK_MONOTONIC nanoseconds.

The record handler stamps each hit with ``rdtsc`` (Intel SDM vol. 2B "RDTSC"; with an
invariant TSC, ``constant_tsc nonstop_tsc`` in /proc/cpuinfo, it ticks at a constant
rate on every core).  The tracer reads the same counter with a 12-byte function of its
own (an executable page mapped read-only after writing: never writable and executable
at once) and fits ``ns = ns0 + (tsc - tsc0) * slope`` from pairs taken with
``time.monotonic_ns()``; the fit widens as the run goes on, so conversion error falls
with run length (about 1 ppm after a second).
"""
from __future__ import annotations

import ctypes
import mmap
import time

_CODE = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")   # rdtsc; shl rdx,32; or rax,rdx; ret


def _make_rdtsc():
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    page.write(_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of the rdtsc page failed")
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    fn._page = page                      # keep the mapping alive with the function
    return fn


class TscClock:
    """Converts TSC values to CLOCK_MONOTONIC nanoseconds."""

    def __init__(self, warmup: float = 0.02):
        self.rdtsc = _make_rdtsc()
        self.tsc0, self.ns0 = self._pair()
        time.sleep(warmup)
        self.slope = 1.0
        self.update()

    def _pair(self) -> tuple[int, int]:
        # Bracket the clock read with two TSC reads; take the midpoint.
        a = self.rdtsc()
        ns = time.monotonic_ns()
        b = self.rdtsc()
        return (a + b) // 2, ns

    def update(self) -> None:
        """Refit the slope with a fresh pair (call now and then during a run)."""
        tsc, ns = self._pair()
        if tsc > self.tsc0:
            self.slope = (ns - self.ns0) / (tsc - self.tsc0)

    def to_ns(self, tsc):
        """TSC value(s) (int or numpy uint64 array) -> CLOCK_MONOTONIC ns (int64)."""
        try:
            import numpy as np
            if isinstance(tsc, np.ndarray):
                delta = tsc.astype(np.int64) - np.int64(self.tsc0)
                return (self.ns0 + delta * self.slope).astype(np.int64)
        except ImportError:
            pass
        return int(self.ns0 + (int(tsc) - self.tsc0) * self.slope)

    def now_tsc(self) -> int:
        return self.rdtsc()
