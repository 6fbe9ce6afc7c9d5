"""The probe manager: arming, hits, the optimizer and detach (kernel/kprobes.c's role).

It owns every :class:`Site` of one target and talks to the target only through the
target layer's contract (stop_all/resume_all, read/write, registers, remote syscalls)
and to the instruction set only through :class:`~uprobe_opt.core.arch.ArchOps`.

Patch protocol (the order is the safety argument; see design.md "Quiescence point"):

* arm: write the XOL copy into a fresh slot (unreachable until the breakpoint exists),
  then the one-byte breakpoint.  A single byte store is atomic for instruction fetch,
  so arming needs no quiescence; we stop all threads anyway for the remote mmap.
* optimize (batched): build the detour in a fresh slot, stop all threads, defer every
  site that a thread's rip or a word of its live stack points strictly into (it could
  resume in bytes 2..5 of the jump), write the jump's tail while the breakpoint still
  guards the first byte, then the first byte; resume all.
* unoptimize: breakpoint first, then the original tail (threads that arrive meanwhile
  trap and run out of line, never over half-restored bytes).
* verify before every write (arm, optimize, unoptimize, restore): the site's mapping
  is still the file (dev, inode, offset) it was when armed, and its bytes are ours or
  the original; else the site's probes are gone and nothing is written (a library
  unloaded and another one mapped at the same address is left alone).
"""
from __future__ import annotations

import bisect
import contextlib
import os
import signal

import numpy as np
import sys
import time
import traceback
from typing import Callable

from uprobe_opt.core.detour import DetourPool, NoDetourSpace, counter_bytes
from uprobe_opt.core.probe import HANDLER_KINDS, USDT_REFUSAL, Probe, Site, site_counts
from uprobe_opt.core.regs import GPR_NAMES, Regs
from uprobe_opt.errors import (Interrupted, PatchError, ProcessGone, SymbolError,
                              TargetError, UsageError)

# Jumps written in one optimizer window: 1,000 take about 5-10 ms of stop on the test
# machine (docs/performance.md); 10,000 sites take ten windows, none long.
MAX_WINDOW_SITES = 1000
# Batches of at least this many fresh sites analyse with the module sweep's facts
# (SymbolResolver.function_facts): building the sweep costs more than it saves for a few.
FACTS_BATCH = 64
MAX_EXIT_LEAD = 64   # bytes an exit's jump may start before its site (the whole
                     # instructions its jump covers up to the return); checked per site
PAGE = 4096
STACK_SCAN_LIMIT = 256 * 1024   # bytes of each thread's live stack scanned at quiescence
SETTLE_LIMIT = 0.5              # s the detach lets threads found inside a detour area run
RETRY_DELAY = 0.005             # seconds before a deferred site is tried again
MAX_RETRY_DELAY = 1.0          # seconds between attempts for a long-deferred site


class ProbeManager:
    def __init__(self, target, arch, *, optimize: bool = True, log: Callable = None,
                 kernel_uprobes: bool = True):
        self.target = target
        self.arch = arch
        self.optimize_enabled = optimize
        from uprobe_opt.core.kernel import KernelService
        self.kernel = KernelService(self, enabled=kernel_uprobes)
        self.sites: dict[int, Site] = {}
        self._site_addrs: list[int] = []        # sorted keys of sites (recovered())
        self._region_reach = 0                  # max region end - site addr (_region_clash)
        self.probes: list[Probe] = []
        self.trap_sites: dict[int, Site] = {}   # detour trap address -> site
        self.site_by_id: list[Site] = []        # Site.id -> site (ring records carry it)
        from uprobe_opt.core.records import Records
        self.records = Records(self)
        from uprobe_opt.core.semaphores import Semaphores
        self.semaphores = Semaphores(target, self._file_id)   # USDT semaphores held
        self.former_sites: set[int] = set()    # addresses we once patched
        self.original: dict[int, bytes] = {}   # their original bytes (jump size)
        # the kernel's optimizing_list, in order (a dict: O(1) for 10,000 sites)
        self.optimizing: dict[Site, None] = {}
        self.pool = DetourPool(target, arch.slot_size, stopped=self._stopped)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.ncpu_slots = 1 << max(0, (os.cpu_count() or 1) - 1).bit_length()
        # (func_addr, func_size) -> addresses entered from outside the function's own
        # branches (C++ landing pads), or None when they cannot be known.
        self.landing_pads: Callable = lambda addr, size: ()
        # (func_addr, func_size) -> the module sweep's facts or None (see _facts)
        self.function_facts: Callable | None = None
        self.stop_requested: Callable[[], bool] = lambda: False   # see _check_stop
        self._batch_sites = 0                    # fresh sites of the batch being armed
        self.rseq_offset: int | None = None
        self.pauses: list[float] = []            # seconds each quiescence point lasted
        # progress(phase, done, total) during long batches (a bar on a terminal)
        self.progress: Callable = lambda phase, done, total: None
        self.held: list[tuple[int, bool]] = []   # trap threads handled while all-stopped
        self.exited = False
        self.exec_seen = False
        self._exec_count = getattr(target, "exec_count", 0)
        self._rewind = False
        self._warned_rip = False
        self._maps_cache: tuple | None = None    # (target runs, maps): _maps
        self.window = 0                          # incremented at every window edge
        self._pages: dict[int, bytes] = {}       # code pages read in this window
        self._starts_of, self._starts = None, []  # _mapping_at
        self._batch_maps: list | None = None     # _one_maps_read
        self._pages_gen: tuple | None = None     # target.generation they belong to
        self.release_after_window = False        # see may_release
        self.let_go_check: Callable | None = None   # see may_release
        self._snap_pages: dict | None = None     # preverify: pages read for the check
        self._snapshot: tuple | None = None      # preverify -> _prove
        self._proven: tuple | None = None        # (window, site addresses) see _verify
        self._int3_batch: list | None = None     # see _write_int3s
        self._staged: tuple | None = None        # see _stage
        self._unnoted: list = []                 # see _note_written
        target.fork_hook = self.on_fork
        arch.shadow_stack = _uses_shadow_stack(target.pid)

    # -- helpers ----------------------------------------------------------------------
    def recovered(self, addr: int, size: int, skip: Site | None = None) -> bytes:
        """Target bytes at [addr, addr+size) with our own patches replaced by the
        original bytes (kernel recover_probed_instruction): analysis never sees them.
        ``skip``: a site whose patch is left as it is."""
        buf = bytearray(self._read_code(addr, size))
        end = addr + size
        # Only sites whose patch can reach into the range: a jump starts at most
        # MAX_EXIT_LEAD bytes before its site (an exit's region), never after it.
        first = bisect.bisect_left(self._site_addrs, addr - self.arch.jump_size)
        last = bisect.bisect_left(self._site_addrs, end + MAX_EXIT_LEAD)
        for site_addr in self._site_addrs[first:last]:
            site = self.sites[site_addr]
            if site is skip:
                continue
            if site.armed and addr <= site.addr < end:
                buf[site.addr - addr] = site.orig[0]
            if site.optimized:     # the jump: at the site, or before an exit
                at, orig = site.region.addr, site.region.orig[:self.arch.jump_size]
                lo, hi = max(at, addr), min(at + len(orig), end)
                if lo < hi:
                    buf[lo - addr:hi - addr] = orig[lo - at:hi - at]
        return bytes(buf)

    def _read_code(self, addr: int, size: int) -> bytes:
        """Target bytes; in a window (every thread stopped, nothing can change them
        but our own writes) each page is read once: a batch of 1,000 sites verifies
        and patches with one system call per site instead of five."""
        pages = self._snap_pages
        if pages is None:
            gen = self.target.generation
            if self._pages_gen != gen:
                if not self.target.stopped:
                    return self.target.read(addr, size)
                self._pages, self._pages_gen = {}, gen
            pages = self._pages
        out = bytearray()
        at, end = addr, addr + size
        while at < end:
            page = at & ~(PAGE - 1)
            data = pages.get(page)
            if data is None:
                try:
                    data = pages[page] = self.target.read(page, PAGE)
                except TargetError:
                    return self.target.read(addr, size)   # the error names addr
            stop = min(end, page + PAGE)
            out += data[at - page:stop - page]
            at = stop
        return bytes(out)

    def _stopped(self):
        return _AllStopped(self, self.pauses)

    # -- verify before write ------------------------------------------------------------
    def _maps(self) -> list:
        """The target's mappings; read once per window while every thread is stopped
        (nothing can map or unmap then), afresh each time otherwise."""
        if not self.target.stopped:
            return self.target.maps()
        if self._maps_cache is None or self._maps_cache[0] != self._runs():
            self._maps_cache = (self._runs(), self.target.maps())
        return self._maps_cache[1]

    def _runs(self):
        """Changes whenever a thread may have run (not when we write): what a reading
        of the maps, or a proof (see _verify), is valid for while all are stopped."""
        return self.target.generation[0]

    def maps_changed(self) -> None:
        """The target mapped or unmapped something while stopped (the dynamic
        linker's r_brk): the window's cached maps are stale."""
        self._maps_cache = None

    def _file_id(self, addr: int) -> tuple | None:
        """(dev, inode, offset) of the file byte mapped at ``addr``, None if none.
        /proc/PID/maps is read in pages: a process that maps or unmaps meanwhile can
        make one read skip a mapping that is there.  While it runs, a mapping missing
        is believed only when three reads agree."""
        if self._batch_maps is not None:
            m = self._mapping_at(self._batch_maps, addr)
            if m is not None:
                return m.file_id(addr)
        for _ in range(1 if self.target.stopped else 3):
            m = self._mapping_at(self._maps(), addr)
            if m is not None:
                return m.file_id(addr)
        return None

    def _mapping_at(self, maps: list, addr: int):
        """The mapping of ``maps`` (sorted, as /proc/PID/maps lists them) holding
        ``addr``, or None; the start addresses are kept for the last list asked."""
        if self._starts_of is not maps:
            self._starts_of, self._starts = maps, [m.start for m in maps]
        i = bisect.bisect_right(self._starts, addr) - 1
        return maps[i] if i >= 0 and addr < maps[i].end else None

    def _verify(self, site: Site) -> bool:
        """Before a write at ``site``: the same file byte is mapped there as when it was
        armed, and the bytes are the original or ours (breakpoint, jump, or the
        breakpoint over either tail: the states a patch passes through).  Otherwise
        every probe of the site becomes gone with the reason, and False is returned:
        the caller writes nothing.  A site proven in this window (see
        :meth:`preverify`) passes without being read again."""
        proven = self._proven
        if proven is not None and proven[0] == self._runs() and site.addr in proven[1]:
            return True
        reason = self._unverified(site)
        return True if reason is None else self._site_gone(site, reason)

    def _unverified(self, site: Site) -> str | None:
        """Why a write at ``site`` must not happen now (see _verify), or None."""
        if site.file_id is None:
            return None                          # not armed yet: checked when arming
        now = self._file_id(site.addr)
        if now != site.file_id:
            what = "unmapped" if now is None else "mapped to another file"
            return (f"the code at {site.addr:#x} was {what} (library unloaded?): nothing "
                    "written")
        if site.region is not None and site.region.addr != site.addr:
            return None      # an exit: its jump starts before it; the mapping is checked
        n = min(self.arch.jump_size, len(site.orig))
        try:
            live = self.recovered(site.addr, n, skip=site)
        except TargetError:
            return f"the code at {site.addr:#x} cannot be read"
        bp = self.arch.breakpoint
        orig = site.orig[:n]
        if live == orig or live == bp + orig[1:]:
            return None
        if site.jump is not None:
            # ...and the file's first byte before our jump's tail: a kernel uprobe put
            # on our jump (its int3 over our first byte) and removed again restores
            # the file's byte, not ours.  Only we can restore the tail.
            jump = site.jump[:n]
            if live in (jump, bp + jump[1:], orig[:1] + jump[1:]):
                return None
        return (f"the code at {site.addr:#x} was changed by someone else ({live.hex()}): "
                "nothing written")

    def preverify(self, sites, overlay=()) -> None:
        """While the target runs, before a window that writes at ``sites``: verify
        them (see _verify) against one reading of the maps and of their code pages,
        kept as a snapshot.  The window re-reads only those pages and the mappings
        holding them (:meth:`_prove`): where they are unchanged, every site verified
        against them stays verified, and the window skips its per-site checks
        (1,000 sites: about 10 ms less with every thread stopped).  Sites that fail
        here are left to the window's own check, which decides.  ``overlay``: sites
        whose breakpoint we are about to write (see _write_int3s): the snapshot holds
        it already, so it can be taken before the int3 stage starts."""
        self._snapshot, self._unnoted = None, []
        if self.target.stopped or self.target.exited:
            return
        sites = list(sites)
        try:
            maps = self.target.maps()
        except TargetError:
            return
        pages: dict[int, bytes] = {}
        for site in sites:
            for at in (site.addr, site.addr + self.arch.jump_size - 1):
                page = at & ~(PAGE - 1)
                if page not in pages:
                    try:
                        pages[page] = self.target.read(page, PAGE)
                    except TargetError:
                        pages[page] = b""
        for site in overlay:
            page = site.addr & ~(PAGE - 1)
            if pages.get(page):
                data = bytearray(pages[page])
                data[site.addr - page] = self.arch.breakpoint[0]
                pages[page] = bytes(data)
        ok = set()
        for i in range(0, len(sites), 16):
            if i and not self._served_meanwhile(15):
                return
            self._snap_pages, self._batch_maps = pages, maps
            try:
                for site in sites[i:i + 16]:
                    spans = {site.addr & ~(PAGE - 1),
                             (site.addr + self.arch.jump_size - 1) & ~(PAGE - 1)}
                    if all(pages[p] for p in spans) and self._unverified(site) is None:
                        ok.add(site.addr)
            finally:
                self._snap_pages, self._batch_maps = None, None
        held = {p: (self._mapping_at(maps, p), data) for p, data in pages.items() if data}
        self._snapshot = (held, ok)

    def _prove(self) -> None:
        """In a window (every thread stopped): the sites :meth:`preverify` checked
        whose pages and mappings are as they were then (or as our own writes since
        made them, see _note_written) count as verified for this window; the pages
        read become the window's page cache.  The snapshot stays for later windows
        (the optimizer's next part, the end)."""
        self._apply_noted()
        snap = self._snapshot
        self._proven = None
        if snap is None or not self.target.stopped:
            return
        held, ok = snap
        maps = self._maps()
        changed = set()
        for page, (mapping, data) in held.items():
            try:
                if self._mapping_at(maps, page) == mapping and \
                        self._read_code(page, PAGE) == data:
                    continue
            except TargetError:
                pass
            changed.add(page)
        if changed:
            jump = self.arch.jump_size
            ok = {a for a in ok if a & ~(PAGE - 1) not in changed
                  and (a + jump - 1) & ~(PAGE - 1) not in changed}
        self._proven = (self._runs(), ok)

    def _note_written(self, pairs) -> None:
        """Our writes (addr, bytes), each in a state its site's check accepts, go
        into the snapshot's pages too: the next window proves against them.  Noted
        now, applied after the window (see _apply_noted)."""
        if self._snapshot is not None:
            self._unnoted.extend(pairs)

    def _apply_noted(self) -> None:
        pairs, self._unnoted = self._unnoted, []
        if self._snapshot is None or not pairs:
            return
        held = self._snapshot[0]
        bufs: dict[int, bytearray] = {}
        for addr, data in pairs:
            at, end = addr, addr + len(data)
            while at < end:                     # a write may cross a page boundary
                page = at & ~(PAGE - 1)
                stop = min(end, page + PAGE)
                if page in held:
                    buf = bufs.get(page)
                    if buf is None:
                        buf = bufs[page] = bytearray(held[page][1])
                    buf[at - page:stop - page] = data[at - addr:stop - addr]
                at = stop
        for page, buf in bufs.items():
            held[page] = (held[page][0], bytes(buf))

    def _site_gone(self, site: Site, reason: str) -> bool:
        """The site's address space is not the one we patched any more."""
        for probe in site.probes:
            if not probe.is_gone:
                probe.gone_reason = reason
        site.armed = site.optimized = False
        site.gone = True
        self.original.pop(site.addr, None)      # never written into a fork child either
        self._dequeue(site)
        return False

    # -- hands-off ------------------------------------------------------------------
    def forget_site(self, site: Site, reason: str) -> None:
        """The code under ``site`` was unmapped (dlclose): every probe there becomes
        gone with ``reason``, nothing is written, and the address is free for a new
        site (a library mapped there later is another file).  A kernel-served site's
        events are closed first and waited for: the kernel re-plants its uprobe in
        every new mapping of the same file, and a late close would restore the
        original byte over a breakpoint of ours there."""
        if site.kernel is not None:
            with self._stopped():
                self.kernel.release(site, wait=True)
                site.kernel_served = False
        self._site_gone(site, reason)
        self._usdt_semaphore(site, live=False)
        if self.sites.get(site.addr) is site:
            del self.sites[site.addr]
            self._site_addrs.remove(site.addr)

    def has_patches(self) -> bool:
        """Anything of ours is (or may be) in the target: a patched site, a mapped area
        or the ring.  False: detaching needs no window at all."""
        return bool(self.former_sites or any(a.mapped for a in self.pool.areas)
                    or self.records.ring is not None)

    def let_go(self) -> bool:
        """One window: handle the trap events that raced in, then PTRACE_DETACH every
        thread if no site needs the tracer any more (see :meth:`tracer_reason`).
        Returns True when the target runs untraced; else it is resumed as it was."""
        t0 = time.monotonic()
        self.window += 1
        self.target.stop_all()
        released = False
        try:
            for ev in self.target.poll(0):
                self.handle_event(ev, resume=False)
            if not (self.exited or self.exec_seen) and self.tracer_reason() is None:
                # Handled trap threads had their rip moved: detaching them delivers
                # nothing; foreign traps get their SIGTRAP (Target._settle_trap).
                released = self.target.release()
        finally:
            if released:
                self.held = []
            elif not self.target.exited:
                self.window += 1
                self.target.resume_all()
                self.release_held()
            self.pauses.append(time.monotonic() - t0)
        return released

    def may_release(self, was_released: bool) -> bool:
        """At the end of a window: let the target go now instead of resuming it?
        A target released before the window whose owner asked for it
        (``release_after_window``), or one whose owner lets it go as soon as nothing
        needs the tracer (``let_go_check()`` True, see :meth:`tracer_reason`)."""
        if was_released and self.release_after_window:
            return True
        check = self.let_go_check
        return (check is not None and not (self.exited or self.exec_seen)
                and not self.optimizing and self.tracer_reason() is None and check())

    def site_needs_tracer(self, site: Site) -> bool:
        """True when a hit at ``site`` stops the hitting thread for the tracer: an
        int3 (armed, not optimized, not served by the kernel's uprobe) with an enabled
        probe, or a detour that traps to run a Python pre_handler.  The one place that
        decides (see tracer_reason)."""
        if site.optimized and site.detour_kind != "python":
            return False         # its detour serves every kind it was built for
        if site.gone or not site.enabled_probes():
            return False
        if site.wanted_kind() == "python":
            return True
        if site.kernel is not None:
            return False                     # the kernel's uprobe handles its int3
        return site.armed and not site.optimized

    def tracer_reason(self) -> str | None:
        """Why the target cannot run without its tracer now (None: every live probe
        runs in-process, ptrace may be let go).  Sites whose hits trap (int3, Python
        handlers) need a tracer to handle the SIGTRAP, or the thread dies of it."""
        sites = [s for s in self.sites.values() if self.site_needs_tracer(s)]
        if not sites:
            return None
        # The r_brk breakpoint of pending probes (uprobe_opt.pending): no user's probe.
        internal = [s for s in sites if all(getattr(p, "internal", False) for p in s.probes)]
        sites = [s for s in sites if s not in internal]
        python = sum(1 for s in sites if s.wanted_kind() == "python")
        int3 = len(sites) - python
        parts = ["pending probes wait at the dynamic linker's r_brk breakpoint"] \
            if internal else []
        if int3:
            parts.append(f"{int3} int3 site{'s need' if int3 > 1 else ' needs'} the tracer")
        if python:
            parts.append(f"{python} site{'s' if python > 1 else ''} with Python "
                         f"handlers need{'' if python > 1 else 's'} the tracer")
        return ", ".join(parts)

    # -- registration -----------------------------------------------------------------
    def register(self, resolved, handler: str = "python", pre_handler: Callable = None,
                 spec: str | None = None, optimize: bool = True) -> Probe:
        """Register and arm a probe at a resolved symbols.Site.  Raises SymbolError when
        the address is not an instruction boundary, UsageError for a bad handler."""
        return self.register_many([(resolved, handler, pre_handler, spec, optimize)])[0]

    def register_many(self, items, nargs: int = 6) -> list[Probe]:
        """Register several probes with one stop of all threads.  ``items``: tuples
        (resolved, handler, pre_handler, spec, optimize).  All or nothing: every site
        is checked before any byte is written."""
        for _, handler, pre_handler, _, _ in items:
            if handler not in HANDLER_KINDS:
                raise UsageError(f"unknown handler {handler!r} (choose from {HANDLER_KINDS})")
            if handler == "python" and pre_handler is None:
                raise UsageError("handler 'python' needs a pre_handler callable")
        # Checks and analysis read the target while it runs; arming needs a window
        # only in the cases _arming_window names.
        addrs = []
        maps = self.target.maps()       # once, not once per site (10,000 reads)
        for i, item in enumerate(items):
            self._check_stop(i)
            addrs.append(self._check_site(item[0], maps))
            self.progress("checking sites", i + 1, len(items))
        news = {}
        for i, (addr, item) in enumerate(zip(addrs, items)):
            self.progress("arming", i, len(items))
            if addr not in self.sites and addr not in news:
                news[addr] = self._new_site(addr, item[0], register=False)
        # The XOL copies (and, below, the detours) are built and written while the
        # target runs (fresh slots no thread can reach); only mapping their areas (and
        # the record ring) needs a window: one for the batch.  A target running
        # untraced is let go again after it: a signal to a traced thread stops it
        # until we wait for it, and the work below takes long (1,000 sites: ~0.5 s).
        self.release_after_window = self.target.released
        try:
            self._map_areas(news, {addr: item[1] for addr, item in zip(addrs, items)})
        finally:
            self.release_after_window = False
        for site in news.values():
            self._prepare_xol(site)
        window = self._arming_window(addrs)     # decided before the new sites exist
        made = []
        for addr, (resolved, handler, pre_handler, spec, optimize) in zip(addrs, items):
            site = self.sites.get(addr) or self._register_site(news[addr])
            probe = Probe(spec or resolved.spec, resolved.addr, site, handler,
                          pre_handler, resolved.symbol, optimize)
            probe.nargs = nargs
            site.probes.append(probe)
            self.probes.append(probe)
            made.append(probe)
        if window is None:
            # Fresh sites, threads running: their detours are analysed and written
            # now, before any int3, so the int3 stage (when a killed tracer would take
            # the target with it) lasts only until the optimizer's window.
            self._batch_sites = len(news)
            try:
                with self._one_maps_read():
                    for i, site in enumerate(news.values()):
                        self._check_stop(i)
                        if site.want_optimize and any(p.want_optimize for p in site.probes):
                            self._prepare_detour(site, armed=False)
            finally:
                self._batch_sites = 0
            # Every thread traced (not stopped) before the first int3: one that meets
            # it traps to us, clones are traced from birth.
            self.target.seize()
            window = contextlib.nullcontext()
        running = isinstance(window, contextlib.nullcontext)
        if running:
            # The int3 stage starts: until the optimizer's window (whose end lowers
            # it) a thread that meets a breakpoint waits for us to get a CPU.
            self.target.hurry()
        # Fresh sites in a running target: every breakpoint is written at the end.
        self._int3_batch = [] if running else None
        try:
            self._arm_probes(made, window, running)
        finally:
            batch, self._int3_batch = self._int3_batch, None
            if batch and (self.exited or self.exec_seen):
                for site in batch:
                    site.armed = False
            elif batch:
                # Sites the analysis just refused stay int3 (or the kernel serves them,
                # serve_refused): not queued to be analysed again (libc:*, 200 of
                # 3,600 sites: 3 s more of the int3 stage).
                for site in batch:
                    if site.detour is None and site.refusal is not None:
                        self._dequeue(site)
                # The optimizer's work first: from the first int3 to its window
                # nothing is left to do but write the jumps.
                self._stage([site for site in batch if site.detour is not None
                             and site in self.optimizing], overlay=batch)
                self._write_int3s(batch)
        if running and not self.optimizing:
            self.target.unhurry()            # nothing to optimize: the stage stays
        if not self.optimizing:
            # Sites left for the kernel (_kernel_first); with jumps to write, the
            # optimizer hands them over after its window (optimize_pending).
            self.serve_refused()
        self.progress("arming", len(items), len(items))
        return made

    def _arm_probes(self, made: list[Probe], window, running: bool) -> None:
        with window, self._one_maps_read():
            for i, probe in enumerate(made):
                # Threads that met a breakpoint (of an earlier batch, or armed above
                # in a window-less batch of sites that exist) wait for us: serve them
                # now, not after the batch (1,000 sites: tens of ms).
                if running and not self._served_meanwhile(i):
                    break
                site = probe.site
                # A kernel-served site may change hands here: the new probe counts from
                # after the hand-back (every thread stopped), not from before it.
                served = site.kernel is not None
                if not served:
                    self._probe_enabled(probe)
                self._site_changed(site)
                if served:
                    self._probe_enabled(probe)

    def _check_stop(self, i: int) -> None:
        """In the long loops before the first int3 of a batch: Interrupted once the
        owner's ``stop_requested()`` says so (Ctrl-C while 3,000 sites are prepared
        acts at once, not a minute later)."""
        if i % 16 == 15 and self.stop_requested():
            raise Interrupted("stopped while the probes were prepared: nothing armed",
                              pid=self.target.pid)

    def _served_meanwhile(self, i: int) -> bool:
        """In a loop over sites while the target runs traced (the int3 stage): every
        16th step, serve the threads waiting on a breakpoint (see serve_waiting).
        False once the target exited or exec'd."""
        if i % 16 != 15 or self.target.released or self.target.stopped:
            return True
        return self.serve_waiting()

    def serve_waiting(self) -> bool:
        """Between steps of long work done while the target runs: handle the events
        waiting now (a thread stopped on one of our breakpoints is resumed).  False
        once the target exited or exec'd (stop the work)."""
        for ev in self.target.poll(0):
            self.handle_event(ev)
        return not (self.exited or self.exec_seen)

    @contextlib.contextmanager
    def _one_maps_read(self):
        """While arming a batch in a running target: one /proc/PID/maps read for the
        whole batch (1,000 sites took a read and parse each, about a second during
        which a thread that met an armed int3 waited).  A site missing from it is
        looked up afresh (see _file_id)."""
        self._batch_maps = None if self.target.stopped else self.target.maps()
        try:
            yield
        finally:
            self._batch_maps = None

    def _map_areas(self, news: dict, handlers: dict) -> None:
        """Map, in one window, the detour areas (and the record ring) the fresh sites
        ``news`` ({addr: Site}) will use: an XOL slot each, and for a site to be
        optimized a detour slot and its counters (``handlers``: {addr: handler})."""
        counter = counter_bytes(self.ncpu_slots)
        data = {"count": counter, "record": counter + counter_bytes(1)}
        needs = {}
        for addr, site in news.items():
            optimize = site.want_optimize
            needs[addr] = (1 + optimize, data.get(handlers[addr], 0) if optimize else 0)
        ring = self.records.ring is None and "record" in handlers.values() and news
        if not ring:
            self.pool.ensure_near(needs)
            return
        first = next(iter(news))
        needs[first] = (needs[first][0] + 1, needs[first][1])   # the ring's scratch slot
        with self._stopped():
            self.pool.ensure_near(needs)
            self.records.ensure_ring(first)

    def _arming_window(self, addrs: list[int]):
        """The window arming needs, or None when it needs none.  Writing an int3 over an instruction's
        first byte is a one-byte store, atomic for instruction fetch (the first step
        of the kernel's text_poke_bp, and how kernel uprobes install): threads keep
        running while fresh sites are armed.  A window is needed when a site already
        exists (its patch may change hands or be unoptimized) and when a new site lies
        in an optimized region (the region is unoptimized: a multi-byte write).  A
        released target needs none: it is seized (not stopped) before the first int3,
        so that every thread that meets one traps to us."""
        if self.target.stopped:
            return self._stopped()
        if any(addr in self.sites for addr in addrs):
            return self._stopped()
        regions = [o.region for o in self.sites.values() if o.optimized and o.region]
        for addr in addrs:
            for region in regions:
                if self.arch.within(region, addr) or region.addr == addr:
                    return self._stopped()
        return None

    def _check_site(self, resolved, maps=None) -> int:
        """can_probe: decode from the function start, land exactly on addr; skip endbr64.
        Returns the address to patch.  ``maps``: the target's mappings read just before
        (None: read them now)."""
        addr = resolved.addr
        if resolved.func_addr is None or not resolved.func_size:
            raise SymbolError(f"no function symbol contains {addr:#x}: cannot prove it is "
                              "an instruction boundary", addr=addr, pid=self.target.pid)
        code = self.recovered(resolved.func_addr, resolved.func_size)
        refusal = self.arch.check_boundary(code, resolved.func_addr, addr)
        if refusal is not None:
            raise SymbolError(f"{resolved.spec}: {refusal}", addr=addr, pid=self.target.pid)
        if addr == resolved.func_addr:
            addr = self.arch.adjust_addr(code, resolved.func_addr, addr)
        live = self.target.read(addr, 1)
        if live == self.arch.breakpoint and addr not in self.sites:
            raise SymbolError(f"{resolved.spec}: a breakpoint not planted by uprobe-opt is "
                              f"already at {addr:#x} (another debugger, or the program's "
                              "own int3)", addr=addr, pid=self.target.pid)
        if addr not in self.sites:
            self._check_unpatched(resolved, addr, maps)
        return addr

    def _file_bytes(self, addr: int, n: int, maps=None) -> bytes | None:
        """The bytes of the file mapped at [addr, addr+n), read through
        /proc/PID/map_files (the exact file mapped there); None for anonymous memory
        or when it cannot be read."""
        m = self._mapping_at(maps or self.target.maps(), addr)
        if m is None or not m.inode or addr + n > m.end:
            return None
        try:
            fd = os.open(f"/proc/{self.target.pid}/map_files/{m.start:x}-{m.end:x}",
                         os.O_RDONLY)
        except OSError:
            return None
        try:
            return os.pread(fd, n, m.offset + addr - m.start)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _facts(self, site: Site, func_code: bytes):
        """The module sweep's facts of the site's function (see
        SymbolResolver.function_facts: its branches and indirect jumps, from the file)
        for a batch of many sites, where decoding every whole function again is the
        cost (libc:*: 3,600 functions, 30 s); None otherwise, or when the function's
        bytes in the process are not the file's (the facts describe the file)."""
        if self.function_facts is None or self._batch_sites < FACTS_BATCH:
            return None
        if self._file_bytes(site.func_addr, site.func_size, self._batch_maps) \
                != bytes(func_code[:site.func_size]):
            return None
        try:
            return self.function_facts(site.func_addr, site.func_size)
        except Exception:
            return None

    def _check_unpatched(self, resolved, addr: int, maps=None) -> None:
        """The bytes a jump would cover must be the file's: anything else is another
        tool's patch (a jump left by a uprobe-opt that was killed, or one still tracing
        this process, a debugger's breakpoint over a jump).  Stacking our own patch and
        detour over it would relocate its jump and, once that tool restores or unmaps
        its pages, send the program into freed memory.  The file is read through
        /proc/PID/map_files (the exact file mapped there); where that cannot be read
        the check is skipped."""
        end = resolved.func_addr + resolved.func_size
        n = max(1, min(self.arch.jump_size, end - addr))
        want = self._file_bytes(addr, n, maps)
        if want is None:
            return
        live = self.recovered(addr, n)          # our own patches nearby are no one else's
        if len(want) == n and live != want:
            raise SymbolError(
                f"{resolved.spec}: the code at {addr:#x} is not the file's ({live.hex()}, "
                f"file {want.hex()}): another tool patched it (another uprobe-opt, alive or "
                "killed, or a debugger); refusing to probe over it", addr=addr,
                pid=self.target.pid)

    def _new_site(self, addr: int, resolved, register: bool = True) -> Site:
        n = max(self.arch.jump_size, 16)
        end = resolved.func_addr + resolved.func_size
        orig = self.recovered(addr, max(1, min(n, end - addr)))
        site = Site(addr, orig, resolved.func_addr, resolved.func_size,
                    want_optimize=self.optimize_enabled)
        site.usdt = getattr(resolved, "usdt", None)
        return self._register_site(site) if register else site

    def _register_site(self, site: Site) -> Site:
        site.id = len(self.site_by_id)
        self.site_by_id.append(site)
        self.sites[site.addr] = site
        bisect.insort(self._site_addrs, site.addr)
        return site

    def set_record_regs(self, site: Site, regs: tuple) -> None:
        """The registers the site's records store (an exit's return value and rsp, an
        entry's arguments and rsp); a detour built with others is rebuilt."""
        if site.record_regs == regs:
            return
        site.record_regs = regs
        if site.detour is not None:
            self._unoptimize(site)
            if site.detour.trap_addr is not None:
                self.trap_sites.pop(site.detour.trap_addr, None)
            site.detour = None
            self._site_changed(site)

    def _probe_enabled(self, probe: Probe) -> None:
        probe._snap = site_counts(probe.site)

    def _probe_disabled(self, probe: Probe) -> None:
        now = site_counts(probe.site)
        probe._frozen = [f + n - s for f, n, s in zip(probe._frozen, now, probe._snap)]

    def _traced(self):
        """A window when the tracer let go, else none: an int3 written into a process
        no tracer traces would kill it with SIGTRAP at its next hit, so a site that may
        be armed again is changed only while every thread is traced."""
        return self._stopped() if self.target.released else contextlib.nullcontext()

    def enable(self, probe: Probe) -> None:
        if probe.enabled or probe.is_gone:
            return
        with self._traced():
            probe.enabled = True
            self._probe_enabled(probe)
            self._site_changed(probe.site)

    def disable(self, probe: Probe) -> None:
        if not probe.enabled or probe.is_gone:
            return
        with self._traced():
            self._probe_disabled(probe)
            probe.enabled = False
            self._site_changed(probe.site)

    def unregister(self, probe: Probe) -> None:
        if not probe.registered:
            return
        with self._traced():
            if probe.enabled:
                self._probe_disabled(probe)
            probe.enabled = False
            probe.registered = False
            probe.site.probes.remove(probe)
            self._site_changed(probe.site)

    # -- site state machine -----------------------------------------------------------
    def _site_changed(self, site: Site) -> None:
        """Bring a site's patch in line with its probes (all threads stopped)."""
        if site.gone:
            return
        kind = site.wanted_kind()
        self._usdt_semaphore(site, live=kind is not None)
        if site.kernel is not None and kind != site.kernel_kind:
            self._take_back(site)
        if kind is None:
            self._unoptimize(site)
            self._disarm(site)
            if not site.probes:
                if self.sites.pop(site.addr, None) is not None:
                    self._site_addrs.remove(site.addr)
                self._dequeue(site)
            return
        # Collisions first: unoptimizing a region rewrites its tail bytes, which
        # would erase a breakpoint planted inside it beforehand.
        self._collision_check(site)
        refused = site.detour is None and site.refusal is not None
        if not site.armed and not (refused and self._kernel_first(site)):
            self._arm(site)
        if site.optimized and site.detour_kind != kind:
            self._unoptimize(site)
        if (not site.optimized and site.want_optimize and not refused
                and any(p.want_optimize for p in site.enabled_probes())):
            self._enqueue(site)

    def _kernel_first(self, site: Site) -> bool:
        """A site the analysis refused, not armed yet, that the kernel's uprobe can
        serve: it is left unarmed for serve_refused, which hands it over and lets the
        kernel plant the int3 (see uprobe_opt.core.kernel)."""
        return (site.kernel is None and site.kernel_note is None and site.want_optimize
                and self.kernel.can_serve(site, unarmed=True) is None)

    def _usdt_semaphore(self, site: Site, live: bool) -> None:
        """A USDT marker's semaphore counts one more tracer while the site has an
        enabled probe (the program runs the marker's guarded code only then)."""
        sem = site.usdt.semaphore if site.usdt is not None else 0
        if not sem or self.exec_seen or self.exited:
            return
        if live:
            note = self.semaphores.acquire(sem, site.id)
            if note is not None:
                self.log(f"usdt:{site.usdt.provider}:{site.usdt.name}: {note}")
        else:
            self.semaphores.release(sem, site.id)

    def _take_back(self, site: Site) -> None:
        """A kernel-served site goes back to ptrace (a Python handler, a record probe on
        a count site, disable): one window; the events are closed before our int3 is
        written again (closing restores the original byte over any int3)."""
        with self._stopped():
            for ev in self.target.poll(0):
                self.handle_event(ev, resume=False)
            self.kernel.release(site, wait=True)
            site.kernel_served = False
            if site.armed and not self.exec_seen:
                site.armed = False
                if site.wanted_kind() is not None:
                    self._arm(site)
        self.release_held()
        site.kernel_note = None

    def serve_refused(self) -> int:
        """Hand every int3 site the optimizer refused (count/record only) to the
        kernel's uprobe.  Returns how many are now served."""
        todo = [s for s in self.sites.values()
                if s.refusal is not None and s.kernel is None and s.kernel_note is None
                and s.want_optimize and self.kernel.can_serve(s, unarmed=True) is None]
        if not todo or self.exited or self.exec_seen:
            return 0
        served = self.kernel.serve(todo)
        for site in served:
            if not site.armed:               # the kernel planted the int3
                site.file_id = self._file_id(site.addr)
                self.original.setdefault(site.addr, site.orig[: self.arch.jump_size])
                site.armed = True
                self.former_sites.add(site.addr)
        left = [s for s in todo if s.kernel is None and not s.armed]
        if left and not (self.exited or self.exec_seen):
            # The kernel would not take them (kernel_note says why): our int3, and
            # the tracer serves them.
            with self._traced():
                for site in left:
                    self._site_changed(site)
        return len(served)

    def _collision_check(self, site: Site) -> None:
        """A new probe inside an optimized region forces that region back to int3
        (kernel __arm_kprobe -> unoptimize immediately)."""
        # An optimized region holding site.addr belongs to a site at most
        # _region_reach bytes before it or MAX_EXIT_LEAD after it (an exit's region).
        first = bisect.bisect_left(self._site_addrs, site.addr - self._region_reach)
        last = bisect.bisect_right(self._site_addrs, site.addr + MAX_EXIT_LEAD)
        for other in [self.sites[a] for a in self._site_addrs[first:last]]:
            if other is not site and other.optimized and (
                    self.arch.within(other.region, site.addr)
                    or other.region.addr == site.addr):     # an exit's jump starts there
                self._unoptimize(other)
                other.detour = None     # its relocated copy would skip the new probe
                other.refusal = f"probe at {site.addr:#x} inside the region"

    def _prepare_xol(self, site: Site) -> None:
        """Build the site's out-of-line copy and write it into a fresh slot (no thread
        can reach it yet).  SymbolError when the instruction cannot run out of line."""
        if site.xol_addr is not None:
            return
        try:
            slot = self.pool.slot_near(site.addr)
        except NoDetourSpace:
            slot = self.pool.slot_anywhere()   # XOL returns by absolute jump
        plan = self.arch.prepare_xol(site.orig, site.addr, slot)
        if not hasattr(plan, "code"):
            raise SymbolError(f"cannot probe {site.addr:#x}: {plan}", addr=site.addr)
        self.target.write(slot, plan.code)
        site.xol_addr = slot

    def _arm(self, site: Site) -> None:
        self._prepare_xol(site)
        if site.file_id is None:
            site.file_id = self._file_id(site.addr)
        elif not self._verify(site):
            return
        self.original.setdefault(site.addr, site.orig[: self.arch.jump_size])
        if site.file_id is not None and self.kernel.closing:
            # A kernel uprobe of ours still closing at this file byte would take our
            # int3's hits (and remove the int3): let its close finish first.
            self.kernel.wait_closed(site.file_id)
        site.armed = True
        if self._int3_batch is not None:
            self._int3_batch.append(site)        # written by _write_int3s
            return
        self.target.write(site.addr, self.arch.breakpoint)
        self.former_sites.add(site.addr)

    def _write_int3s(self, sites: list[Site]) -> None:
        """The breakpoints of fresh sites armed while the target runs, in one pass
        at the end of the batch: the int3 stage (a thread that meets one waits for
        us) starts there, not at the batch's first site.  One-byte writes, each
        atomic for instruction fetch.  A PatchError leaves the sites not written
        unarmed and is raised."""
        written: set = set()
        try:
            self._write_pass(sites, [(site.addr, self.arch.breakpoint) for site in sites],
                             written, note=False)
        except PatchError:
            self._snapshot, self._unnoted = None, []   # the overlay is not true
            raise
        finally:
            for site in sites:
                if site in written:
                    self.former_sites.add(site.addr)
                else:
                    site.armed = False

    def _write_pass(self, items: list, pairs: list, written: set,
                    note: bool = True) -> None:
        """Target.write_many of ``pairs`` (one per item of ``items``, in order), noted
        into the verification snapshot (see _note_written).  ``written`` receives
        the items written, also when a PatchError (raised) stopped the pass."""
        done = len(items)
        try:
            self.target.write_many(pairs)
            if note:
                self._note_written(pairs)
        except PatchError as e:
            done = getattr(e, "done", 0)
            raise
        finally:
            written.update(items[:done])

    def _disarm(self, site: Site) -> None:
        if site.armed and self._verify(site):
            self.target.write(site.addr, site.orig[:1])
            site.armed = False

    def _enqueue(self, site: Site) -> None:
        if site not in self.optimizing:
            site.retry_at = 0.0
            self.optimizing[site] = None

    def _dequeue(self, site: Site) -> None:
        self.optimizing.pop(site, None)

    # -- optimizer --------------------------------------------------------------------
    def optimize_pending(self, *, force: bool = False) -> int:
        """Try to optimize every queued site that is due: one quiescence point for the
        batch.  Returns how many sites were optimized."""
        now = time.monotonic()
        due = [s for s in self.optimizing if force or s.retry_at <= now]
        if not due:
            if force:
                self.serve_refused()
            return 0
        try:
            done = self._optimize_batch(due, now)
            self.release_held()
            self.serve_refused()
            return done
        except ProcessGone:
            # The target (or a thread) exited or exec'd meanwhile; the target layer
            # refuses writes into a new image.  The wait loop reports the rest; sites
            # still queued are retried.
            self._exec_pending()
            return 0
        finally:
            self.release_held()

    def _exec_pending(self) -> bool:
        """The target exec'd (its ExecEvent may still be queued): probes become gone."""
        if getattr(self.target, "exec_count", 0) != self._exec_count:
            self.on_exec()
        return self.exec_seen

    def _stage(self, sites: list[Site], overlay: list[Site]) -> None:
        """Before the breakpoints of a fresh batch are written: the optimizer's work
        for the window that follows (jumps planned, the spans no thread may be in,
        the snapshot it verifies against), so the int3 stage is that window's wait."""
        for site in sites:
            self._plan_jump(site)
            self.original.setdefault(site.region.addr,
                                     site.region.orig[: self.arch.jump_size])
        self._staged = (set(sites), self._busy_spans(sites))
        self.preverify(sites, overlay=overlay)

    def _optimize_batch(self, due: list[Site], now: float) -> int:
        # Detours are analysed, built and written into fresh slots while the target
        # runs (nothing can reach a fresh slot yet); only the patch needs quiescence.
        staged, self._staged = self._staged, None
        if staged is not None and staged[0] == set(due) and all(
                site.armed and site.detour_kind == site.wanted_kind() for site in due):
            return self._optimize_window(due, staged[1], now)
        ready = []
        work = 0
        for i, site in enumerate(due):
            # Serving the threads waiting on a breakpoint slows the way to the window
            # that frees them all: only between sites whose detour is built now.
            if site.detour is None or site.detour_kind != site.wanted_kind():
                work += 1
                if not self._served_meanwhile(work):
                    return 0
            if self._prepare_detour(site):
                self._plan_jump(site)
                ready.append(site)
            self.progress("optimizing", i + 1, len(due))
        if not ready:
            return 0
        spans = self._busy_spans(ready)
        if not (self._snapshot is not None
                and all(site.addr in self._snapshot[1] for site in ready)):
            self.preverify(ready)
        if not self._served_meanwhile(15):
            return 0
        return self._optimize_window(ready, spans, now)

    def _optimize_window(self, ready: list[Site], spans: tuple, now: float) -> int:
        """The optimizer's window: jumps written for every site of ``ready`` (prepared
        and planned) no thread is inside (``spans``: see _busy_spans); the others are
        deferred.  More than MAX_WINDOW_SITES sites take one window per part, the
        threads waiting on a breakpoint served between them."""
        if len(ready) <= MAX_WINDOW_SITES:
            return self._optimize_part(ready, spans, now)
        done = 0
        for i in range(0, len(ready), MAX_WINDOW_SITES):
            part = ready[i:i + MAX_WINDOW_SITES]
            spans = self._busy_spans(part)
            if i and not self._served_meanwhile(15):
                break
            done += self._optimize_part(part, spans, now)
            self._apply_noted()                  # while the target runs
            if self.exited or self.exec_seen or self.target.released:
                break
        return done

    def _optimize_part(self, ready: list[Site], spans: tuple, now: float) -> int:
        with self._stopped():
            # Threads that trapped on a breakpoint before we stopped them: run their
            # hits now, resuming them (later) in the detour's relocated region.
            for ev in self.target.poll(0):
                self.handle_event(ev, resume=False)
            if self.exited or self.exec_seen:
                return 0
            self._prove()
            self._redirect_xol_starts(ready)
            busy = self._busy_ranges(spans)
            for site in ready:
                if site.addr in busy:
                    # Never forced: retried with a growing delay (at most 1 s) for as
                    # long as some thread stays parked inside.
                    site.deferrals += 1
                    site.deferred = busy[site.addr]
                    site.retry_at = now + min(RETRY_DELAY * site.deferrals, MAX_RETRY_DELAY)
            return self._write_jumps([s for s in ready if s.addr not in busy])

    def _prepare_detour(self, site: Site, armed: bool = True) -> bool:
        """Analyse the site and write its detour into a fresh slot (not yet reachable).
        False when the site stays int3 (site.refusal says why) or nothing is needed.
        ``armed=False``: for a site about to be armed (its probes are registered)."""
        kind = site.wanted_kind()
        if kind is None or (armed and not site.armed):
            self._dequeue(site)
            return False
        if site.usdt is not None:
            return self._refuse(site, USDT_REFUSAL)
        if site.detour is not None and site.detour_kind == kind:
            return True
        func_code = self.recovered(site.func_addr, site.func_size)
        # Only the sites inside the function can lie in its region (a region never
        # leaves its function): not every site per site, 10,000 x 10,000 of them.
        first = bisect.bisect_left(self._site_addrs, site.func_addr)
        last = bisect.bisect_left(self._site_addrs, site.func_addr + site.func_size)
        others = [a for a in self._site_addrs[first:last] if a != site.addr]
        pads = self.landing_pads(site.func_addr, site.func_size)
        if pads is None:
            return self._refuse(site, f"exception tables of the function at "
                                      f"{site.func_addr:#x} could not be read")
        if site.exit is not None:
            region = self.arch.check_exit(func_code, site.func_addr, site.func_size,
                                          site.addr, others, pads)
        else:
            region = self.arch.check(func_code, site.func_addr, site.func_size, site.addr,
                                     others, pads, facts=self._facts(site, func_code))
        if not hasattr(region, "size"):
            return self._refuse(site, region)
        if not 0 <= site.addr - region.addr <= MAX_EXIT_LEAD:
            return self._refuse(site, f"the region starts {site.addr - region.addr} bytes "
                                      f"before the site (at most {MAX_EXIT_LEAD})")
        clash = self._region_clash(site, region)
        if clash is not None:
            return self._refuse(site, clash)
        try:
            slot = self.pool.slot_near(site.addr)
            spec = self._handler_spec(site, kind)
        except NoDetourSpace as e:
            return self._refuse(site, str(e))
        prepare = self.arch.prepare_exit if site.exit is not None else self.arch.prepare
        detour = prepare(region, slot, spec)
        if not hasattr(detour, "code"):
            return self._refuse(site, detour)
        self.target.write(slot, detour.code)
        if site.detour is not None and site.detour.trap_addr is not None:
            self.trap_sites.pop(site.detour.trap_addr, None)
        site.region, site.detour, site.detour_kind = region, detour, kind
        self._region_reach = max(self._region_reach, region.addr + region.size - site.addr)
        if region.addr == site.addr and len(region.orig) >= len(site.orig):
            site.orig = region.orig
        if detour.trap_addr is not None:
            self.trap_sites[detour.trap_addr] = site
        return True

    def _region_clash(self, site: Site, region) -> str | None:
        """Two jumps must never share a byte.  An exit's region starts before its
        site, so it can overlap another site's region without either site lying
        inside the other's region (an entry and an exit of a tiny function)."""
        lo, hi = region.addr, region.addr + region.size
        # A region starts at most MAX_EXIT_LEAD bytes before its site and ends at most
        # _region_reach bytes after it: only the sites in that reach of [lo, hi) can
        # clash (the first in registration order is named, as the full scan did).
        first = bisect.bisect_left(self._site_addrs, lo - self._region_reach)
        last = bisect.bisect_left(self._site_addrs, hi + MAX_EXIT_LEAD)
        near = sorted((self.sites[a] for a in self._site_addrs[first:last]),
                      key=lambda s: s.id)          # ids count registrations
        for other in near:
            r = other.region
            if other is site or r is None or (other.detour is None and not other.optimized):
                continue
            if lo < r.addr + r.size and r.addr < hi:
                return (f"the region {lo:#x}-{hi:#x} overlaps the region "
                        f"{r.addr:#x}-{r.addr + r.size:#x} of the probe at {other.addr:#x}")
        return None

    def _refuse(self, site: Site, refusal) -> bool:
        site.refusal = refusal
        site.detour = None
        self._dequeue(site)
        return False

    def _handler_spec(self, site: Site, kind: str):
        if kind not in ("count", "record"):
            return self.arch.handler_spec(kind)
        if site.counter is None:
            site.counter = self.pool.counter_near(site.addr, self.ncpu_slots)
            for p in site.probes:
                p._snap[0] = 0
        if kind == "count":
            return self.arch.handler_spec("count", counter_addr=site.counter.addr,
                                          ncpu_slots=self.ncpu_slots,
                                          rseq_offset=self.rseq_offset)
        if site.missed is None:
            site.missed = self.pool.counter_near(site.addr, 1)
            for p in site.probes:
                p._snap[1] = 0
        ring = self.records.ring
        if ring is None:
            with self._stopped():
                ring = self.records.ensure_ring(site.addr)
        return self.arch.handler_spec(
            "record", counter_addr=site.counter.addr, ncpu_slots=self.ncpu_slots,
            rseq_offset=self.rseq_offset, ring_addr=ring.addr, ring_mask=ring.mask,
            missed_addr=site.missed.addr, probe_id=site.id,
            nargs=max(p.nargs for p in site.enabled_probes()), regs=site.record_regs,
            tid_offset=self.records.tid_offset)

    def _redirect_xol_starts(self, sites: list[Site]) -> None:
        """A thread about to run a site's XOL copy (rip at its first byte) is moved to
        the detour's relocated region: same effect, and it no longer returns into the
        middle of the region."""
        starts = {s.xol_addr: s for s in sites if s.detour is not None}
        for tid in self.target.tids:
            try:
                regs = self.target.get_regs(tid)
            except TargetError:
                continue
            site = starts.get(regs.rip)
            if site is not None:
                regs.rip = site.detour.reloc_addr
                self.target.set_regs(tid, regs)

    def _busy_ranges(self, sites: list[Site]) -> dict[int, str]:
        """Sites some thread could resume inside: rip or a live stack word strictly
        inside the region (a preempted or signalled thread, a return address), or
        anywhere in the site's XOL slot (it jumps back to the first instruction's end,
        which may lie inside the region).  Vectorized: spans are disjoint, so one
        sorted search per thread finds every word that falls in one.  ``sites`` may
        be the spans of :meth:`_busy_spans`, made before the window."""
        spans, starts, ends = sites if isinstance(sites, tuple) else self._busy_spans(sites)
        busy: dict[int, str] = {}
        maps = self._maps()
        for tid in self.target.tids:
            try:
                regs = self.target.get_regs(tid)
            except TargetError:
                continue
            at = [regs.rip]
            if regs.orig_rax < (1 << 63):
                # Inside a system call: an interrupted call is restarted by moving rip
                # back over the 2-byte syscall instruction (kernel
                # arch/x86/kernel/signal.c, ERESTART* handling): it may resume at rip-2.
                at.append(regs.rip - 2)
            words = np.concatenate([np.array(at, dtype=np.uint64),
                                    self._stack_words(regs.rsp, maps)])
            idx = np.searchsorted(starts, words, side="right") - 1
            hit = (idx >= 0) & (words < ends[np.maximum(idx, 0)])
            for i in np.nonzero(hit)[0].tolist():
                site, w = spans[idx[i]][2], int(words[i])
                if site.addr not in busy:
                    where = "rip" if i < len(at) else "a stack word"
                    busy[site.addr] = (f"thread {tid} keeps {where} {w:#x} inside the "
                                       f"region at {site.addr:#x}")
        return busy

    def _busy_spans(self, sites: list[Site]) -> tuple:
        """(spans sorted by start, their starts, their ends) for _busy_ranges: what a
        thread must not be inside for each site to be patched."""
        spans = []
        for s in sites:
            spans.append((s.region.addr + 1, s.region.addr + s.region.size, s))
            spans.append((s.xol_addr, s.xol_addr + self.arch.slot_size, s))
        spans.sort(key=lambda span: span[0])
        return (spans, np.array([lo for lo, _, _ in spans], dtype=np.uint64),
                np.array([hi for _, hi, _ in spans], dtype=np.uint64))

    def _stack_words(self, rsp: int, maps) -> "np.ndarray":
        """The live part of the stack holding rsp, as u64 words (at most
        STACK_SCAN_LIMIT bytes; empty when rsp is in no mapping)."""
        m = next((m for m in maps if m.start <= rsp < m.end), None)
        if m is None:
            return np.zeros(0, dtype=np.uint64)
        start = rsp & ~7
        end = min(m.end, start + STACK_SCAN_LIMIT)
        try:
            data = self.target.read(start, end - start)
        except TargetError:
            return np.zeros(0, dtype=np.uint64)
        return np.frombuffer(data[: len(data) // 8 * 8], dtype=np.uint64)

    def _plan_jump(self, site: Site) -> None:
        """site.jump: the bytes that send the site's region into its detour."""
        tail, head = self.arch.optimize(site.region, site.detour.slot_addr)
        site.jump = head + tail

    def _write_jumps(self, sites: list[Site]) -> int:
        """Every thread stopped: each site's jump (planned before the window, see
        _plan_jump) goes in as one write (no thread can fetch the bytes between), all
        sites checked first, then written in one pass.
        Returns how many were optimized; a PatchError leaves those written before it
        optimized and is raised."""
        todo = [site for site in sites if self._verify(site)]
        for site in todo:
            self.original.setdefault(site.region.addr,
                                     site.region.orig[: self.arch.jump_size])
        written: set = set()
        try:
            self._write_pass(todo, [(site.region.addr, site.jump) for site in todo],
                             written)
        finally:
            todo = [site for site in todo if site in written]
            for site in todo:
                site.optimized = True
                site.refusal = None
                site.deferred = None
                site.deferrals = 0
            for site in todo:
                self.optimizing.pop(site, None)
        return len(todo)

    def _unoptimize(self, site: Site) -> None:
        if not site.optimized:
            return
        if site.region.addr != site.addr:
            # An exit: the jump sits before the exit's breakpoint.  No thread stands in
            # the jump's bytes (it sends every arrival into the detour, which leaves by
            # the exit itself), so with all threads stopped the original bytes, with
            # the exit's breakpoint back in them, go in one write.
            with self._stopped():
                if not self._verify(site):
                    return
                self.target.write(site.region.addr,
                                  self.arch.unoptimize_exit(site.region, site.addr))
            site.optimized = False
            return
        head, tail = self.arch.unoptimize(site.region)
        with self._stopped():      # a multi-byte patch: no thread may fetch meanwhile
            if not self._verify(site):
                return
            self.target.write(site.addr, head)       # breakpoint first
            self.target.write(site.addr + 1, tail)   # then the original tail
        site.optimized = False

    def set_optimize(self, enabled: bool) -> None:
        """The user switch (like sysctl debug.kprobes-optimization)."""
        self.optimize_enabled = enabled
        with self._stopped():
            for site in list(self.sites.values()):
                site.want_optimize = enabled
                if enabled:
                    self._site_changed(site)
                else:
                    self._unoptimize(site)
                    self._dequeue(site)

    # -- hits -------------------------------------------------------------------------
    def on_trap(self, tid: int, *, resume: bool = True, rewind: bool = False) -> bool:
        """Handle an int3 SIGTRAP of thread tid.  Returns True when it was ours.  With
        resume=False the thread is left stopped (rip already set); with rewind=True an
        int3 hit resumes at the site itself (used when the original bytes return)."""
        regs = self.target.get_regs(tid)
        pc = regs.rip - 1
        site = self.sites.get(pc)
        if site is not None and site.xol_addr is not None and (site.armed or site.optimized):
            self._int3_hit(site, tid, regs, rewind or self._rewind)
        elif pc in self.trap_sites:
            self._detour_hit(self.trap_sites[pc], tid, regs)
        elif pc in self.former_sites and self.target.read(pc, 1) != self.arch.breakpoint:
            # It trapped on a breakpoint we have since removed: run the original
            # instruction, which is back in place (kernel: "the int3 is gone").
            regs.rip = pc
            self.target.set_regs(tid, regs)
        else:
            if resume:
                self.target.resume(tid, signal.SIGTRAP)
            return False
        if resume:
            self.target.resume(tid)
        return True

    def _int3_hit(self, site: Site, tid: int, regs, rewind: bool = False) -> None:
        values = {name: getattr(regs, name) for name in GPR_NAMES}
        values["rip"] = site.addr
        view = self._run_handlers(site, tid, values)
        if view is not None and view.dirty:
            for name in view.dirty:
                setattr(regs, name, view.as_dict()[name])
        if view is None or "rip" not in view.dirty:
            # Resume out of line: the displaced instruction runs from the XOL slot and
            # jumps back; the breakpoint never leaves the site.
            regs.rip = site.addr if rewind else self._resume_addr(site)
        self.target.set_regs(tid, regs)

    def _resume_addr(self, site: Site) -> int:
        """Where an int3 hit continues: the detour's relocated copy of the whole region
        once a detour exists (it jumps back to the region's end, so the thread never
        stands inside the region: kernel setup_detour_execution), else the XOL copy
        of the one displaced instruction."""
        if site.detour is not None:
            return site.detour.reloc_addr
        return site.xol_addr

    def _detour_hit(self, site: Site, tid: int, regs) -> None:
        from uprobe_opt.x86 import frame as fr
        raw = self.target.read(regs.rsp, fr.FRAME_SIZE)
        frame = fr.unpack_frame(raw)
        values = {name: getattr(regs, name) for name in GPR_NAMES}
        values.update(frame)
        values["rip"] = site.addr
        view = self._run_handlers(site, tid, values)
        if view is not None and view.dirty & {"rip", "rsp"} and not self._warned_rip:
            self._warned_rip = True
            self.log(f"a pre_handler at {site.addr:#x} wrote rip/rsp on the optimized "
                     "path: ignored there (as kprobes' optprobes do); use --no-optimize "
                     "to redirect execution")
        if view is not None and view.dirty - {"rip", "rsp"}:
            new = dict(frame)
            new.update({k: v for k, v in view.as_dict().items() if k in frame
                        and k not in ("rip", "rsp")})
            self.target.write(regs.rsp, fr.pack_frame(new))

    def _run_handlers(self, site: Site, tid: int, values: dict) -> Regs | None:
        view = None
        if any(p.handler == "record" for p in site.enabled_probes()):
            self.records.add_trap_record(site, values, tid)
        for probe in site.enabled_probes():
            probe._hits += 1
            if probe.pre_handler is None:
                continue
            if view is None:
                view = Regs(values, tid, self.target)
            try:
                probe.pre_handler(probe, view)
            except Exception:
                probe.nerrors += 1
                if probe.nerrors <= 3:
                    more = " (further errors of this handler are only counted)" \
                        if probe.nerrors == 3 else ""
                    self.log(f"pre_handler of {probe.spec} raised{more}:\n"
                             + traceback.format_exc().rstrip())
        return view

    # -- events -----------------------------------------------------------------------
    def handle_event(self, ev, *, resume: bool = True) -> None:
        """Dispatch one target event.  With resume=False trap threads stay stopped and
        their tids are collected in ``self.held`` (resume them after resume_all)."""
        kind = type(ev).__name__
        if kind == "TrapEvent":
            try:
                ours = self.on_trap(ev.tid, resume=resume)
            except TargetError:
                return
            if not resume:
                self.held.append((ev.tid, ours))
        elif kind == "ExecEvent":
            self.on_exec()
        elif kind == "ExitEvent":
            self.exited = True

    def release_held(self) -> None:
        """Resume the trap threads handled while all threads were stopped."""
        held, self.held = self.held, []
        for tid, ours in held:
            try:
                self.target.resume(tid, 0 if ours else signal.SIGTRAP)
            except TargetError:
                pass

    # -- life-cycle events ------------------------------------------------------------
    def on_fork(self, child) -> None:
        """A forked child inherits our patched text but not our tracer: put every
        original byte back in the child before it runs (it would die of SIGTRAP).
        Every address we ever patched, not only today's sites: the child holds the
        bytes of the moment it was forked, which may predate a disarm."""
        for addr, orig in self.original.items():
            try:
                if child.read(addr, len(orig)) != orig:
                    child.write(addr, orig)
            except TargetError:
                pass        # unmapped since (dlclose), or the child is already gone

    def on_exec(self) -> None:
        """The address space is gone: every probe is gone; never write again."""
        self.exec_seen = True
        self._snapshot = self._staged = None
        self._unnoted = []
        self._exec_count = getattr(self.target, "exec_count", 0)
        self.semaphores.forget()
        for probe in self.probes:
            if probe.registered and not probe.is_gone:
                probe.gone_reason = "target exec'd a new program"
        self.kernel.close()
        for site in self.sites.values():
            site.armed = site.optimized = False
        self.optimizing.clear()

    def shutdown(self) -> list[str]:
        """Detach sequence (all threads stopped): handle trap events still queued (their
        hits count; the thread is rewound to the site, whose original bytes return),
        restore every byte, unmap idle detour areas, release the trapped threads.
        Returns notes for the user."""
        self._rewind = True
        try:
            for ev in self.target.poll(0):
                self.handle_event(ev, resume=False)
        finally:
            self._rewind = False
        if self.exited or self.exec_seen:
            return []
        for probe in self.probes:
            # what it was while live (the reason first: once final_state is set,
            # probe.reason answers final_reason)
            probe.final_state, probe.final_reason = probe.state, probe.reason
        # Every thread is stopped: the kernel's counts are final.  Its events close on
        # a background thread, started after the window (Tracer.detach closes again);
        # our restore writes the original bytes now, so the kernel's own restore
        # (set_orig_insn) finds no int3 and writes nothing.
        self.kernel.close(defer=True)
        self._prove()
        self.restore_all()
        for probe in self.probes:
            if probe.is_gone:
                probe.final_state = None             # found gone by the verification
        self._rewind_area_entries()
        notes, busy = self.release_areas()
        deadline, wait = time.monotonic() + SETTLE_LIMIT, 0.001
        while busy and time.monotonic() < deadline:
            # A thread is still running our out-of-line code (nanoseconds from its
            # jump back, or a signal handler's return away).  Only those threads
            # run: the others stay stopped, so the busy ones get a CPU at once.
            busy -= {tid for tid, _ in self.held}       # resumed by release_held
            self.release_held()
            for tid in busy:
                with contextlib.suppress(TargetError):
                    self.target.resume(tid)
            for ev in self.target.poll(wait):
                self.handle_event(ev)
            self.target.stop_all()
            for ev in self.target.poll(0):
                self.handle_event(ev, resume=False)
            notes, busy = self.release_areas()
            wait = min(wait * 2, 0.016)
        self.release_held()
        return notes

    def _rewind_area_entries(self) -> None:
        """A thread whose rip is the first byte of a site's XOL copy or detour has run
        nothing of ours yet (held there by a SIGSTOP, or stopped right after the
        jump): with the original bytes back it resumes at the instruction those stand
        for.  Otherwise such a thread (a group-stopped one cannot be made to run)
        would keep its area mapped."""
        entries = {}
        for site in self.sites.values():
            if site.xol_addr is not None:
                entries[site.xol_addr] = (site.addr, site.orig[:1])
            if site.detour is not None:
                entries[site.detour.slot_addr] = (site.region.addr,
                                                  site.region.orig[:self.arch.jump_size])
        for tid in self.target.tids:
            try:
                regs = self.target.get_regs(tid)
                back, orig = entries.get(regs.rip, (None, b""))
                # Only onto original bytes: never back into a jump or an int3.
                if back is not None and self.target.read(back, len(orig)) == orig:
                    regs.rip = back
                    self.target.set_regs(tid, regs)
            except TargetError:
                continue

    def restore_all(self) -> None:
        """Unoptimize and disarm every site (all threads stopped).  The code of the
        target is byte-identical to before afterwards."""
        if self.target.stopped:
            self._restore_stopped()
        for site in self.sites.values():
            self._unoptimize(site)
            self._disarm(site)
        self.optimizing.clear()
        self.semaphores.release_all()

    def _restore_stopped(self) -> None:
        """Every thread stopped: the original bytes under each jump go back in one
        write.  No int3 in between (the unoptimize order, for threads that run while
        bytes change): a tracer killed inside the end window then leaves code that
        is the file's or still our jump, never a breakpoint nobody serves.  No thread
        stands inside the jump's bytes: every arrival at its first byte jumps away.
        Breakpoints of unoptimized sites go too; all checked first, written in one
        pass (a PatchError is raised with the sites written before it restored)."""
        jump = self.arch.jump_size
        todo = []                       # (site, addr, original bytes)
        for site in self.sites.values():
            if site.optimized:
                if self._verify(site):
                    todo.append((site, site.region.addr, site.region.orig[:jump]))
            elif site.armed and self._verify(site):
                todo.append((site, site.addr, site.orig[:1]))
        written: set = set()
        try:
            self._write_pass(todo, [(addr, data) for _, addr, data in todo], written)
        finally:
            for site, addr, data in [item for item in todo if item in written]:
                if not site.optimized:
                    site.armed = False
                    continue
                site.optimized = False
                if addr <= site.addr < addr + len(data):
                    site.armed = False       # its breakpoint byte was under the jump

    def release_areas(self) -> tuple[list[str], set[int]]:
        """Unmap detour areas no thread can be in: its rip, or a live stack word (a
        signal frame's saved rip: the thread returns there), inside the area's code.
        Data addresses do not count (a saved register may hold a counter's address;
        no thread can run there).  Returns notes about areas left mapped and the tids
        found inside one."""
        notes, busy = [], set()
        maps = self.target.maps()
        words = {}
        for tid in self.target.tids:
            try:
                regs = self.target.get_regs(tid)
            except TargetError:
                continue
            words[tid] = np.concatenate([np.array([regs.rip], dtype=np.uint64),
                                         self._stack_words(regs.rsp, maps)])
        for area in self.pool.areas:
            if not area.mapped:
                continue
            lo, hi = area.code_addr, area.code_addr + area.code_size
            inside = {}
            for tid, ws in words.items():
                hit = np.nonzero((ws >= np.uint64(lo)) & (ws < np.uint64(hi)))[0]
                if len(hit):
                    inside[tid] = ("rip" if hit[0] == 0 else "a stack word",
                                   int(ws[hit[0]]))
            if inside:
                busy |= set(inside)
                tid, (where, w) = next(iter(inside.items()))
                notes.append(f"detour area at {area.code_addr:#x} left mapped: a thread "
                             f"may still be inside it (thread {tid}: {where} {w:#x})")
                continue
            if not area.is_ours(maps):
                area.mapped = False
                notes.append(f"detour area at {area.code_addr:#x} is not ours any more "
                             "(unmapped or replaced by the program): left alone")
                continue
            try:
                area.unmap()
            except TargetError as e:
                notes.append(f"could not unmap detour area at {area.code_addr:#x}: {e}")
        if not busy:
            notes += self._release_ring(maps)
        return notes, busy

    def _release_ring(self, maps) -> list[str]:
        """Unmap the record ring: only detour code writes into it, and no thread is
        inside any detour area (checked by the caller), so no store can be in flight.
        Our own mapping of it stays: records are drained after the detach."""
        ring = self.records.ring
        if ring is None or getattr(ring, "unmapped", False):
            return []
        ring.unmapped = True
        m = next((m for m in maps if m.start == ring.addr), None)
        if m is None or m.inode != getattr(ring, "inode", None):
            return [f"record ring at {ring.addr:#x} is not ours any more: left alone"]
        try:
            self.target.munmap(ring.addr, ring.size)
        except TargetError as e:
            return [f"could not unmap the record ring at {ring.addr:#x}: {e}"]
        return []


def _uses_shadow_stack(pid: int) -> bool:
    """CET user shadow stack enabled (Linux >= 6.6 shows x86_Thread_features: shstk)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("x86_Thread_features:") and "shstk" in line
                       for line in f)
    except OSError:
        return False


class _AllStopped:
    """Context manager: a window (all threads stopped inside), previous state restored
    after.  A released target is seized for the window and stays seized after it (the
    owner decides when to let it go again), unless ProbeManager.may_release says it
    is let go at the window's end (one window, not a second one to let go)."""

    def __init__(self, manager, pauses: list):
        self.manager = manager
        self.target = manager.target
        self.pauses = pauses
        self.t0 = 0.0
        self.was_stopped = True

    def __enter__(self):
        self.was_stopped = self.target.stopped
        self.was_released = self.target.released
        self.t0 = time.monotonic()
        if not self.was_stopped:
            self.manager.window += 1
            self.target.stop_all()
        return self

    def __exit__(self, *exc):
        if not self.was_stopped and not self.target.exited:
            self.manager.window += 1
            if exc[0] is None and self.manager.may_release(self.was_released) \
                    and self.target.release():
                self.manager.held = []      # their rips were moved: nothing to deliver
            else:
                self.target.resume_all()
            self.pauses.append(time.monotonic() - self.t0)
        return False
