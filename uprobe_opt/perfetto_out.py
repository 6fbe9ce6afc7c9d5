"""``--perfetto FILE``: the trace as a Perfetto timeline (open it in ui.perfetto.dev).

Built with the ``perfetto`` package's ``TraceProtoBuilder`` and its protos (the
optional dependency ``uprobe-opt[perfetto]``, imported only here).  One thread track
per traced thread (a ``TrackDescriptor`` with the pid and tid), and on it:

* a **slice** per matched call of a return probe (``TYPE_SLICE_BEGIN`` at the entry,
  ``TYPE_SLICE_END`` at the exit), named after the probe, with the return value and
  the exit in debug annotations;
* an **instant event** (``TYPE_INSTANT``) per hit of a plain record probe and per exit
  without entry.

Timestamps are CLOCK_MONOTONIC ns (``timestamp_clock_id`` 3, BUILTIN_CLOCK_MONOTONIC),
the clock of every record.  Slices of one thread nest properly: matched calls of one
thread are properly nested intervals (the matcher pairs by stack position), and the
events are written sorted by time, ends before begins at equal times.
"""
from __future__ import annotations

from uprobe_opt.errors import UsageError

CLOCK_MONOTONIC = 3          # perfetto.protos BuiltinClock.BUILTIN_CLOCK_MONOTONIC
SEQUENCE_ID = 0x55504F       # our one trusted packet sequence


def _perfetto():
    try:
        from perfetto.trace_builder.proto_builder import TraceProtoBuilder
        from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb
    except ImportError:
        raise UsageError("--perfetto needs the perfetto package: "
                         "pip install 'uprobe-opt[perfetto]' (or pip install perfetto)") from None
    return TraceProtoBuilder, pb


class PerfettoWriter:
    """Collects (time, order, tid, kind, name, annotations) events; :meth:`write`
    builds and writes the trace.  ``pid``: the traced process (for thread tracks)."""

    def __init__(self, pid: int = 0):
        _perfetto()              # fail at start (exit 2), not after the trace
        self.pid = pid
        self.events: list[tuple] = []

    def add_call(self, call) -> None:
        """A matched call: a slice; an exit without entry: an instant."""
        notes = {"exit": f"{call.exit_addr:#x}"}
        if call.retval is not None:
            notes["retval"] = call.retval - (1 << 64) if call.retval >= 1 << 63 else call.retval
        if call.start_ns is None:
            self.events.append((call.end_ns, 2, call.tid, "instant",
                                f"{call.probe.spec} (exit without entry)", notes))
            return
        self.events.append((call.start_ns, 1, call.tid, "begin", call.probe.spec,
                            {f"arg{i}": a for i, a in enumerate(call.args)}))
        self.events.append((call.end_ns, 0, call.tid, "end", call.probe.spec, notes))

    def add_batch(self, batch, tracer) -> None:
        """Plain record-probe hits of a drained batch: instant events."""
        names: dict[int, list] = {}
        for site, t, tid in zip(batch["site"].tolist(), batch["time_ns"].tolist(),
                                batch["tid"].tolist()):
            specs = names.get(site)
            if specs is None:
                specs = names[site] = [p.spec for p in tracer.probes_of_site(site)]
            for spec in specs:
                self.events.append((t, 2, tid, "instant", spec, {}))

    def build(self) -> bytes:
        TraceProtoBuilder, pb = _perfetto()
        builder = TraceProtoBuilder()
        tids = sorted({e[2] for e in self.events})
        uuid = {tid: 0x7000_0000 + i for i, tid in enumerate(tids)}
        for tid in tids:
            packet = builder.add_packet()
            packet.trusted_packet_sequence_id = SEQUENCE_ID
            desc = packet.track_descriptor
            desc.uuid = uuid[tid]
            desc.thread.pid = self.pid or tid
            desc.thread.tid = tid
            desc.thread.thread_name = f"tid {tid}"
        kinds = {"begin": pb.TrackEvent.TYPE_SLICE_BEGIN,
                 "end": pb.TrackEvent.TYPE_SLICE_END,
                 "instant": pb.TrackEvent.TYPE_INSTANT}
        for t, _, tid, kind, name, notes in sorted(self.events, key=lambda e: e[:2]):
            packet = builder.add_packet()
            packet.timestamp = t
            packet.timestamp_clock_id = CLOCK_MONOTONIC
            packet.trusted_packet_sequence_id = SEQUENCE_ID
            ev = packet.track_event
            ev.type = kinds[kind]
            ev.track_uuid = uuid[tid]
            if kind != "end":
                ev.name = name
            for key, value in notes.items():
                ann = ev.debug_annotations.add()
                ann.name = key
                if isinstance(value, int):
                    ann.int_value = value if -(1 << 63) <= value < (1 << 63) else value - (1 << 64)
                else:
                    ann.string_value = str(value)
        return builder.serialize()

    def write(self, path: str) -> None:
        data = self.build()
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            from uprobe_opt.output import OutputFailed
            raise OutputFailed(e) from None
