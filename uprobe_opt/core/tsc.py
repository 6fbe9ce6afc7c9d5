"""Time Stamp Counter to CLOCK_MONOTONIC nanoseconds.

The record handler stamps each hit with ``rdtsc`` (Intel SDM vol. 2B "RDTSC"; with an
invariant TSC, ``constant_tsc nonstop_tsc`` in /proc/cpuinfo, it ticks at a constant
rate on every core).  The tracer reads the same counter with a 15-byte function of its
own, ``rdtsc; lfence`` (later loads wait for the read: SDM vol. 2B "RDTSC"), on an
executable page mapped read-only after writing (never writable and executable at
once), and fits ``ns = ns0 + (tsc - tsc0) * slope`` from pairs taken with
``time.monotonic_ns()``; the fit widens as the run goes on, so conversion error falls
with run length (about 1 ppm after a second).
"""
from __future__ import annotations

import ctypes
import mmap
import time

_CODE = bytes.fromhex("0f31" "0faee8" "48c1e220" "4809d0" "c3")
# rdtsc; lfence; shl rdx, 32; or rax, rdx; ret


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
    """Converts TSC values to CLOCK_MONOTONIC nanoseconds.

    The conversion is the piecewise-linear curve through measured (tsc, ns) pairs, so
    it is monotonic and never changes for a TSC value once a later pair exists: a
    consumer that calls :meth:`update` before converting what it drained converts
    every value by interpolation, and records of one thread stay ordered across
    batches."""

    def __init__(self, warmup: float = 0.02):
        import numpy as np
        self.rdtsc = _make_rdtsc()
        self._xs = np.zeros(64, dtype=np.float64)     # measured pairs, grown by doubling
        self._ys = np.zeros(64, dtype=np.float64)
        self.n = 0
        self._add(*self._pair())
        time.sleep(warmup)
        self.update()

    def _pair(self) -> tuple[int, int]:
        # Bracket the clock read with two TSC reads; take the midpoint.
        a = self.rdtsc()
        ns = time.monotonic_ns()
        b = self.rdtsc()
        return (a + b) // 2, ns

    def _add(self, tsc: int, ns: int) -> None:
        import numpy as np
        if self.n and not (tsc > self._xs[self.n - 1] and ns > self._ys[self.n - 1]):
            return
        if self.n == len(self._xs):
            self._xs = np.concatenate([self._xs, np.zeros_like(self._xs)])
            self._ys = np.concatenate([self._ys, np.zeros_like(self._ys)])
        self._xs[self.n], self._ys[self.n] = tsc, ns
        self.n += 1

    def update(self) -> None:
        """Measure a fresh pair: every TSC read before this call now converts by
        interpolation between measured pairs."""
        self._add(*self._pair())

    @property
    def slope(self) -> float:
        """ns per TSC tick over the whole run so far."""
        if self.n < 2:
            return 1.0
        return (self._ys[self.n - 1] - self._ys[0]) / (self._xs[self.n - 1] - self._xs[0])

    def to_ns(self, tsc):
        """TSC value(s) (int or numpy uint64 array) -> CLOCK_MONOTONIC ns (int64)."""
        import numpy as np
        arr = np.atleast_1d(np.asarray(tsc, dtype=np.uint64)).astype(np.float64)
        xs, ys = self._xs[:self.n], self._ys[:self.n]
        out = np.interp(arr, xs, ys)
        slope = self.slope
        hi, lo = arr > xs[-1], arr < xs[0]
        out[hi] = ys[-1] + (arr[hi] - xs[-1]) * slope
        out[lo] = ys[0] + (arr[lo] - xs[0]) * slope
        res = out.astype(np.int64)
        return res if isinstance(tsc, np.ndarray) else int(res[0])

    def now_tsc(self) -> int:
        return self.rdtsc()
