"""Pending probes: specs naming a library the process has not loaded yet.

A pending probe is armed when the dynamic linker maps its library, and goes back to
pending when the library is unloaded.  The dynamic linker tells debuggers about its
changes through ``struct r_debug`` (``<link.h>``; ld.so's ``_r_debug``): it calls the
empty function at ``r_brk`` (``_dl_debug_state``) with ``r_state`` = RT_ADD or
RT_DELETE before it maps or unmaps objects, and with RT_CONSISTENT once the list of
loaded objects is consistent again, before the new objects' constructors run and
before dlopen returns: gdb and lldb plant their breakpoint there.  So do we (an
internal int3 with a tracer-side handler): at RT_CONSISTENT, with the thread that
called dlopen/dlclose stopped,

1. every site of a previously armed pending probe whose mapping is no longer the same
   file (dev, inode, offset) becomes gone, "library unloaded", with nothing written
   (ProbeManager.forget_site), and its probe pending again;
2. every pending spec that now resolves is registered (armed in one window) before
   the program can call into the library: counts are exact from the load on.

The breakpoint needs the tracer (one stop per dlopen/dlclose, not per hit), so a run
with pending probes stays attached (``mode_reason`` says so).
"""
from __future__ import annotations

import os
import struct

from uprobe_opt.core.probe import ProbeState
from uprobe_opt.errors import LibraryNotLoaded, SymbolError, TargetError

RT_CONSISTENT, RT_ADD, RT_DELETE = 0, 1, 2
# struct r_debug (x86-64): int r_version; struct link_map *r_map; ElfW(Addr) r_brk;
# enum r_state; ElfW(Addr) r_ldbase
R_BRK_OFFSET, R_STATE_OFFSET = 16, 24
_LDSO_NAMES = ("ld-linux-x86-64.so.2", "ld-linux")


_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
             "/lib", "/usr/lib", "/usr/local/lib")


def find_on_disk(pid: int, lib: str, loaded_paths) -> str | None:
    """A file the process could dlopen as ``lib`` (a path; or a name matched like
    loaded objects are, ``libssl`` -> ``libssl.so.3``, in its LD_LIBRARY_PATH, the
    directories of the objects it has loaded, and the system library directories),
    seen through /proc/PID/root; None when there is none (a typo: the spec is an
    error, not a pending probe)."""
    root = f"/proc/{pid}/root"
    if "/" in lib:
        return lib if os.path.isfile(root + lib) else None
    dirs: list[str] = []
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for kv in f.read().split(b"\0"):
                if kv.startswith(b"LD_LIBRARY_PATH="):
                    dirs += [d for d in kv[16:].decode(errors="replace").split(":") if d]
    except OSError:
        pass
    dirs += [os.path.dirname(p) for p in loaded_paths] + list(_LIB_DIRS)
    for d in dict.fromkeys(dirs):
        try:
            names = os.listdir(root + d)
        except OSError:
            continue
        for name in sorted(names):
            if name == lib or (name.startswith(lib) and name[len(lib):len(lib) + 1] in ".-_"
                               and ".so" in name[len(lib):]):
                return os.path.join(d, name)
    return None


class PendingProbe:
    """A probe spec whose library is not loaded (yet, or any more).  Each time the
    library is mapped its sites are registered as ordinary probes (``incarnations``,
    in load order); ``nhit``/``nmissed`` add them all up.  Read like a Probe."""

    def __init__(self, spec: str, handler: str, pre_handler, optimize: bool, nargs: int,
                 lib: str):
        self.spec = spec
        self.handler = handler
        self.pre_handler = pre_handler
        self.optimize = optimize
        self.nargs = nargs
        self.lib = lib
        self.incarnations: list = []
        self.nerrors = 0
        self.retprobe = None
        self.enabled = True
        self.registered = True

    @property
    def live(self) -> list:
        """The probes of the current load (empty while pending)."""
        return [p for p in self.incarnations if not p.is_gone]

    @property
    def is_pending(self) -> bool:
        return not self.live

    @property
    def state(self) -> ProbeState:
        live = self.live
        return live[0].state if live else ProbeState.PENDING

    @property
    def reason(self) -> str | None:
        live = self.live
        if live:
            return live[0].reason
        return (f"library {self.lib!r} not loaded: armed when the dynamic linker maps it"
                if not self.incarnations else
                f"library {self.lib!r} unloaded: armed again when it is mapped")

    @property
    def nhit(self) -> int:
        return sum(p.nhit for p in self.incarnations)

    @property
    def nmissed(self) -> int:
        return sum(p.nmissed for p in self.incarnations)

    def summary_row(self) -> dict | None:
        """The summary's row while pending (a live incarnation has its own rows)."""
        if self.live:
            return None
        return {"probe": self.spec, "address": "-", "state": "pending", "hits": 0,
                "nmissed": 0, "reason": self.reason, "served_by": None}

    def __repr__(self) -> str:
        return f"<PendingProbe {self.spec} {self.state.value}>"


class LibraryWatch:
    """The r_brk breakpoint of one Tracer and its pending probes."""

    def __init__(self, tracer):
        self.tracer = tracer
        self.pending: list[PendingProbe] = []
        self.r_debug: int | None = None
        self.probe = None            # the internal probe at r_brk
        self.events = 0              # RT_CONSISTENT stops seen
        self.errors: list[str] = []

    # -- set-up ------------------------------------------------------------------------
    def add(self, pending: PendingProbe, error: LibraryNotLoaded) -> None:
        """Register ``pending``; the first one plants the r_brk breakpoint.  Raises
        ``error`` when no such library exists for the process to load (find_on_disk)
        or it has no dynamic linker to watch (static)."""
        t = self.tracer
        paths = [o.path for o in t.resolver.iter_libraries()]
        if find_on_disk(t.pid, pending.lib, paths) is None:
            raise error
        if self.probe is None:
            self._start(error)
        self.pending.append(pending)

    def _start(self, error: LibraryNotLoaded) -> None:
        t = self.tracer
        r_debug = None
        for name in _LDSO_NAMES:
            r_debug = t.resolver.find_data_symbol("_r_debug", lib=name)
            if r_debug is not None:
                break
        if r_debug is None:
            raise SymbolError(f"{error} (and no dynamic linker to wait for it: a "
                              "static program)", pid=t.pid) from None
        (r_brk,) = struct.unpack("<Q", t.target.read(r_debug + R_BRK_OFFSET, 8))
        if not r_brk:
            raise SymbolError(f"{error} (the dynamic linker's r_debug has no r_brk yet)",
                              pid=t.pid) from None
        self.r_debug = r_debug
        site = t.resolver.resolve(f"{r_brk:#x}")
        [probe] = t.manager.register_many(
            [(site, "python", self._on_brk, "r_brk (dynamic linker)", False)], nargs=0)
        probe.internal = True
        self.probe = probe

    # -- the breakpoint ------------------------------------------------------------------
    def _on_brk(self, _probe, _regs) -> None:
        """At r_brk (the caller of dlopen/dlclose stopped): act at RT_CONSISTENT."""
        t = self.tracer
        try:
            (state,) = struct.unpack("<i", t.target.read(self.r_debug + R_STATE_OFFSET, 4))
        except TargetError:
            return
        if state == RT_CONSISTENT:
            self.events += 1
            self.sync()

    def sync(self) -> None:
        """Steps 1 and 2 of the module docstring."""
        t = self.tracer
        t.resolver.refresh()
        t.manager.maps_changed()
        for pp in self.pending:
            for probe in pp.live:
                self._check_mapped(probe, pp)
        for pp in self.pending:
            if pp.is_pending:
                self._try_arm(pp)

    def _check_mapped(self, probe, pp: PendingProbe) -> None:
        m = self.tracer.manager
        site = probe.site
        if site.gone or site.file_id is None:
            return
        if m._file_id(site.addr) != site.file_id:
            m.forget_site(site, f"library unloaded ({pp.lib}): nothing written")

    def _try_arm(self, pp: PendingProbe) -> None:
        t = self.tracer
        try:
            sites = t.resolver.resolve_all(pp.spec)
        except LibraryNotLoaded:
            return
        except SymbolError as e:     # loaded, but the name is not in it
            self._note(f"{pp.spec}: {e}")
            return
        items = [(s, pp.handler, pp.pre_handler, s.spec, pp.optimize) for s in sites]
        try:
            pp.incarnations += t.manager.register_many(items, nargs=pp.nargs)
        except SymbolError as e:
            self._note(f"{pp.spec}: {e}")

    def _note(self, msg: str) -> None:
        if msg not in self.errors:
            self.errors.append(msg)
            self.tracer.manager.log(f"uprobe-opt: pending probe {msg}")
