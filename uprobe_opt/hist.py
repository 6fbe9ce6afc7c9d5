"""Power-of-two histograms drawn the way bpftrace's ``hist()`` draws them."""
from __future__ import annotations

import numpy as np

_SUFFIX = ["", "K", "M", "G", "T", "P", "E"]
WIDTH = 52


def _human(n: int) -> str:
    i = 0
    while n >= 1024 and n % 1024 == 0 and i < len(_SUFFIX) - 1:
        n //= 1024
        i += 1
    return f"{n}{_SUFFIX[i]}"


class Log2Hist:
    """Counts of signed 64-bit values in buckets: (..., 0), [0], [1], [2, 4), [4, 8)..."""

    def __init__(self):
        self.neg = 0
        self.counts = np.zeros(65, dtype=np.int64)   # [0] is value 0, [k] is [2^(k-1), 2^k)

    def add(self, values) -> None:
        v = np.asarray(values, dtype=np.uint64).view(np.int64)
        self.neg += int((v < 0).sum())
        pos = v[v >= 0].astype(np.uint64)
        idx = np.zeros(len(pos), dtype=np.int64)
        nz = pos > 0
        # bit_length(v) == floor(log2 v) + 1 for v > 0
        idx[nz] = np.floor(np.log2(pos[nz].astype(np.float64))).astype(np.int64) + 1
        # float rounding near 2^k for huge values: fix with exact integer checks
        big = nz & (pos >= (1 << 52))
        for i in np.nonzero(big)[0]:
            idx[i] = int(pos[i]).bit_length()
        np.add.at(self.counts, idx, 1)

    def buckets(self) -> list[dict]:
        """Non-empty range: [{"min": lo, "max": hi_exclusive_or_None, "count": n}]."""
        out = []
        if self.neg:
            out.append({"min": None, "max": 0, "count": self.neg})
        nonzero = np.nonzero(self.counts)[0]
        if len(nonzero):
            for k in range(nonzero[0], nonzero[-1] + 1):
                lo = 0 if k == 0 else 1 << (k - 1)
                hi = 1 if k == 0 else 1 << k
                out.append({"min": lo, "max": hi, "count": int(self.counts[k])})
        return out

    def render(self) -> str:
        rows = self.buckets()
        if not rows:
            return "(no values)"
        peak = max(r["count"] for r in rows)
        lines = []
        for r in rows:
            if r["min"] is None:
                label = "(..., 0)"
            elif r["max"] - r["min"] == 1:
                label = f"[{_human(r['min'])}]"
            else:
                label = f"[{_human(r['min'])}, {_human(r['max'])})"
            bar = "@" * (r["count"] * WIDTH // peak) if peak else ""
            lines.append(f"{label:<20}{r['count']:>8} |{bar:<{WIDTH}}|")
        return "\n".join(lines)
