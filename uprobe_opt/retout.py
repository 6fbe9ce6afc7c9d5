"""CLI output of return probes (``SPEC%return``): a line per call, the calls summary,
latency histograms (``--hist latency``, like bcc's funclatency), ``--perfetto``.

Kept apart from cli.py: the CLI hands the tracer's matched calls here
(:class:`CallSink`) and calls :func:`report` at the end.
"""
from __future__ import annotations

from uprobe_opt.core.calls import TAIL_CALL_NOTE, Call

LATENCY = "latency"


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


class CallSink:
    """Receives each matched call (``CallMatcher.on_call``): a line per call (handler
    ``record`` with its default lines, or ``--lines``), a ``call`` JSON event instead
    with ``--json`` (and always for ``latency`` with ``--json``), and keeps what
    ``--perfetto`` needs.  ``args``: the CLI's validated trace arguments."""

    def __init__(self, out, args):
        self.out = out
        lines = bool(getattr(args, "lines", False)) and args.handler in ("record", LATENCY)
        self.json_calls = out.json and (lines or args.handler == LATENCY)
        self.lines = lines and not out.json
        self.nargs = min(args.args, 5)
        self.perfetto = None
        if getattr(args, "perfetto", None):
            from uprobe_opt.perfetto_out import PerfettoWriter
            self.perfetto = PerfettoWriter()

    @property
    def needed(self) -> bool:
        """False when no call is shown one by one (only counts and durations): the
        matcher then builds no Call objects."""
        return self.lines or self.json_calls or self.perfetto is not None

    def __call__(self, call: Call) -> None:
        if self.perfetto is not None:
            self.perfetto.add_call(call)
        if self.json_calls:
            self.out.emit(call_event(call, self.nargs))
        elif self.lines:
            self.out.write(call_line(call, self.out.t0, self.nargs))


def call_event(call: Call, nargs: int = 5) -> dict:
    """The ``call`` JSON event: times in CLOCK_MONOTONIC ns, ``duration_ns`` null for an
    exit without entry, ``retval`` signed (null at a tail call)."""
    return {"event": "call", "probe": call.probe.spec, "tid": call.tid,
            "time_ns": call.start_ns, "end_ns": call.end_ns,
            "duration_ns": call.duration_ns,
            "retval": None if call.retval is None else _signed(call.retval),
            "args": list(call.args[:nargs]), "exit": f"{call.exit_addr:#x}"}


def call_line(call: Call, t0: int, nargs: int = 5) -> str:
    """``    0.001234    4242 work%return  = 0x2a  1.234 us  (0x1 0x2)``"""
    value = "(tail call)" if call.retval is None else f"= {_signed(call.retval):#x}"
    dur = "(no entry)" if call.duration_ns is None else f"{call.duration_ns / 1e3:.3f} us"
    args = " ".join(f"{a:#x}" for a in call.args[:nargs])
    t = (call.end_ns - t0) / 1e9
    return f"{t:12.6f} {call.tid:>7} {call.probe.spec}  {value}  {dur}" \
           + (f"  ({args})" if args else "") + "\n"


def latency_summary(rp) -> dict:
    """count, min, avg, max, p50, p99 and total of the matched calls' durations (ns)."""
    import numpy as np
    d = np.asarray(rp.durations, dtype=np.int64)
    if not len(d):
        return {"count": 0}
    return {"count": int(len(d)), "min_ns": int(d.min()), "avg_ns": float(d.mean()),
            "max_ns": int(d.max()), "p50_ns": float(np.percentile(d, 50)),
            "p99_ns": float(np.percentile(d, 99)), "total_ns": int(d.sum())}


def report(out, tracer, args) -> None:
    """End of a trace: per return probe the calls line, and the histogram or the
    latency event; tail-call semantics said once when a probe has tail-call exits."""
    from uprobe_opt.hist import Log2Hist
    want_hist = getattr(args, "hist", None) == LATENCY
    for rp in tracer.return_probes:
        for note in rp.notes:
            out.note(f"{rp.spec}: {note}")
        if rp.entry is None:
            continue
        s = rp.stats
        lat = latency_summary(rp)
        if out.json:
            ev = {"event": "latency", "probe": rp.spec, "calls": s.as_dict(), **lat}
            if want_hist:
                h = Log2Hist()
                h.add(rp.durations)
                ev["buckets"] = h.buckets()
            out.emit(ev)
            continue
        if want_hist:
            h = Log2Hist()
            h.add(rp.durations)
            out.write(f"@{rp.spec}[latency ns]:\n{h.render()}\n")
        out.write(f"{rp.spec}: {s.entries} entries, {s.exits} exits, {s.calls} calls "
                  f"matched, {s.unwound} unwound, {s.in_flight} in flight"
                  + (f", {s.exits_without_entry} exits without entry"
                     if s.exits_without_entry else "") + "\n")
        if lat["count"]:
            out.write(f"{rp.spec}: latency avg {lat['avg_ns']:,.0f} ns, min "
                      f"{lat['min_ns']:,} ns, p50 {lat['p50_ns']:,.0f} ns, p99 "
                      f"{lat['p99_ns']:,.0f} ns, max {lat['max_ns']:,} ns\n")
        if any(p.kind == "tail" for p in rp.exit_points):
            out.write(f"{rp.spec}: {TAIL_CALL_NOTE}\n")


def summary_rows(rows: list[dict]) -> list[dict]:
    """The summary's rows with, after each return probe, one indented row per exit."""
    out = []
    for row in rows:
        out.append(row)
        for ex in row.get("exits", ()):
            out.append({"probe": f"  {ex['exit']}", "address": ex["address"],
                        "state": ex["state"], "hits": ex["hits"],
                        "nmissed": ex["nmissed"], "reason": ex["reason"]})
    return out
