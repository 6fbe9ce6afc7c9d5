"""Int3 sites served by the kernel's own uprobe (see uprobe_opt.target.perf).

A site that stays int3 (the optimizer refused a jump there) with only ``count`` or
``record`` probes needs no tracer: the kernel takes the trap, runs the displaced
instruction out of line, and counts (and samples) each hit.  Each site is handed over
in a window with every thread stopped (sites in parts of bounded length, _arm): the
kernel's installer finds our int3 already
in place and writes nothing (kernel/events/uprobes.c ``verify_opcode``), so from the
first open every hit is the kernel's and none is lost or seen twice.  A site the
analysis refuses before it was ever armed gets no int3 of ours at all: the kernel
plants its own at the hand-over (no breakpoint that needs the tracer, whose death
would kill the process at the next hit, ever exists there).  The instruction
it runs out of line is the file's, so a site is handed over only when the bytes we
displaced equal the file's bytes there.

Giving a site back (a Python handler added there, disable, detach) happens in a window
too: the events are closed first (the kernel puts the original byte back over the
int3, ``set_orig_insn``), then our int3 is rewritten or the original kept.
"""
from __future__ import annotations

import os
import sys
import time

from uprobe_opt.errors import TargetError

KERNEL_KINDS = ("count", "record")
ARM_WINDOW_S = 0.010     # seconds of event opens in one hand-over window (see _arm)


class KernelService:
    """The kernel uprobes of one ProbeManager.  ``enabled`` False (Tracer
    kernel_uprobes=False, or unavailable: ``reason`` says why) keeps every int3 site
    on ptrace."""

    def __init__(self, manager, enabled: bool = True):
        self.manager = manager
        self.ku = None
        self.reason: str | None = None
        self.enabled = enabled
        if enabled:
            from uprobe_opt.target import perf
            self.reason = perf.unavailable_reason() or perf.tracefs_unavailable()
            if self.reason is not None:
                self.enabled = False
        else:
            self.reason = "kernel uprobes turned off"

    @property
    def closing(self) -> bool:
        """Some kernel uprobe of this tracer process is still being closed."""
        perf = sys.modules.get("uprobe_opt.target.perf")   # never loaded: none
        return perf is not None and perf.closing()

    @staticmethod
    def wait_closed(file_id: tuple) -> None:
        """Wait until no kernel uprobe of ours at ``file_id`` (dev, inode, offset) is
        still closing (see uprobe_opt.target.perf.wait_closed)."""
        from uprobe_opt.target import perf
        perf.wait_closed(file_id[1], file_id[2])

    # -- predicates --------------------------------------------------------------------
    def can_serve(self, site, unarmed: bool = False) -> str | None:
        """None when ``site`` can be handed to the kernel, else why not.  ``unarmed``:
        a site with no int3 of ours yet qualifies too (the kernel plants its own)."""
        if not self.enabled:
            return self.reason
        if site.wanted_kind() not in KERNEL_KINDS:
            return "a Python handler runs in the tracer"
        if site.optimized or not (site.armed or unarmed):
            return "not an int3 site"
        if site.record_regs is not None and site.wanted_kind() == "record":
            # A return probe's entry or exit: its records carry rsp (and the return
            # value) for call matching, which the kernel's samples do not.
            return "a return probe's records need rsp and the return value"
        if site.usdt is not None and site.usdt.args and site.wanted_kind() == "record":
            # Its arguments may live in memory at the marker (-4@-20(%rbp)): the
            # tracer reads them at the hit; the kernel's samples carry registers.
            return "USDT arguments are read by the tracer"
        return None

    # -- hand-over ---------------------------------------------------------------------
    def serve(self, sites) -> list:
        """Hand ``sites`` to the kernel: prepared while the target runs, armed in
        windows (see _arm).  Returns the sites now served; a site the kernel refuses keeps ptrace
        (its ``kernel_note`` says why)."""
        from uprobe_opt.target import perf
        m = self.manager
        ready = []
        maps = m.target.maps()
        for site in sites:
            # Defining an event costs milliseconds (tracefs): a thread that met one
            # of these int3 sites meanwhile is served now, not after all of them.
            if not m.target.stopped and not m.serve_waiting():
                return []
            loc = perf.file_location(m.target.pid, site.addr, maps)
            if loc is None:
                site.kernel_note = "not in a file mapping"
                continue
            path, offset, _, _ = loc
            if not self._file_matches(path, offset, site):
                continue
            try:
                if self.ku is None:
                    # The record buffer the user sized, shared out over the CPU rings.
                    ncpu = len(perf.online_cpus())
                    self.ku = perf.KernelUprobes(
                        m.target.pid, ring_bytes=max(64 << 10,
                                                     m.records.buffer_bytes // ncpu))
                self.ku.prepare(site.id, path, offset,
                                sample=site.wanted_kind() == "record")
            except TargetError as e:
                site.kernel_note = str(e)
                if self.ku is not None and site.id in self.ku.sites:
                    self.ku.remove(site.id, wait=True)
                continue
            ready.append(site)
        return self._arm(ready)

    def _file_matches(self, path: str, offset: int, site) -> bool:
        n = len(site.orig)
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), n, offset)
        except OSError as e:
            site.kernel_note = f"cannot read {path}: {e.strerror}"
            return False
        if data != bytes(site.orig[:n]):
            site.kernel_note = ("the process's instruction differs from the file's "
                                "(the kernel would run the file's)")
            return False
        return True

    def _arm(self, ready: list) -> list:
        """Open the events of ``ready`` on every thread, all stopped: one window per
        part of at most ARM_WINDOW_S seconds of opens (each open registers a uprobe:
        milliseconds; 400 sites at once froze a server for 10 s), so each site is
        armed on every thread at one moment and no stop lasts long."""
        m = self.manager
        done = []
        todo = list(ready)
        while todo:
            with m._stopped():
                # Traps taken before the stop are ours (counted by the tracer).
                for ev in m.target.poll(0):
                    m.handle_event(ev, resume=False)
                if m.exited or m.exec_seen:
                    for site in todo:
                        self.ku.remove(site.id, wait=False)
                    return done
                tids = m.target.tids
                end = time.monotonic() + ARM_WINDOW_S
                first = True
                while todo and (first or time.monotonic() < end):
                    first = False
                    site = todo.pop(0)
                    if site.optimized or site.wanted_kind() not in KERNEL_KINDS:
                        self.ku.remove(site.id, wait=False)
                        continue
                    try:
                        self.ku.arm(site.id, tids)
                    except TargetError as e:
                        site.kernel_note = str(e)
                        continue
                    site.kernel = self
                    site.kernel_kind = site.wanted_kind()
                    site.kernel_served = True
                    done.append(site)
            m.release_held()
            if todo and not m.target.released and not m.serve_waiting():
                break
        return done

    @property
    def samples(self) -> bool:
        """Some served site records (the tracer drains its rings often)."""
        return self.ku is not None and bool(self.ku.rings)

    # -- counts --------------------------------------------------------------------------
    def counts(self, site) -> list[int]:
        """[hits, missed] the kernel counted at ``site`` since it was handed over."""
        if getattr(site, "kernel", None) is not self or site.id not in self.ku.sites:
            return [0, 0]
        try:
            return [self.ku.count(site.id), self.ku.nmissed(site.id)]
        except OSError:
            return [0, 0]

    def take_records(self):
        """Samples drained so far (perf SAMPLE_DTYPE), or None."""
        if self.ku is None or not self.ku.rings:
            return None
        return self.ku.take(final=self.manager.target.stopped or self.manager.exited)

    # -- giving back -------------------------------------------------------------------
    def release(self, site, *, wait: bool) -> None:
        """Close ``site``'s kernel events (all threads stopped).  ``wait``: before our
        own int3 goes back (a late close would restore the original byte over it)."""
        self._release([site], wait=wait)

    def release_all(self, *, wait: bool = False, defer: bool = False) -> None:
        """:meth:`release` for every served site, their events closed together
        (``defer``: see :meth:`close`)."""
        self._release(list(self.manager.sites.values()), wait=wait, defer=defer)

    def _release(self, sites, *, wait: bool, defer: bool = False) -> None:
        sites = [s for s in sites if getattr(s, "kernel", None) is self]
        if not sites:
            return
        self.manager.records.stash_kernel(self.ku.take(final=True))
        for site in sites:
            now = self.counts(site)
            site.kernel_base = [b + n for b, n in zip(site.kernel_base, now)]
        for site in sites:
            site.kernel = None
        self.ku.remove_many([site.id for site in sites], wait=wait, defer=defer)

    def close(self, *, defer: bool = False) -> None:
        """Close everything, on a background thread (the target is not stopped by it).
        ``defer`` (the end window): the counts are read now, the thread starts at the
        next close (after the window)."""
        if self.ku is not None:
            self.release_all(defer=defer)
            self.ku.close(wait=False, defer=defer)
