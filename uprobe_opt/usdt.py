"""USDT markers (SystemTap SDT probes, ``<sys/sdt.h>``, DTrace-compatible) of an ELF file.

A marker is a ``nop`` the program placed in its code, described by one note of the
``.note.stapsdt`` section (owner ``stapsdt``, type 3, NT_STAPSDT): three 64-bit words,
the marker's link-time address (``pc``), the link-time address of ``.stapsdt.base``
(``base``), the link-time address of its semaphore (0: none), then three
NUL-terminated strings: provider, name, argument descriptors
(:mod:`uprobe_opt.x86.sdtargs`).  When the file was moved after linking (prelink), the
section ``.stapsdt.base`` no longer sits at ``base``: ``pc`` and the semaphore move by
the same difference (the rule gdb and systemtap apply).

The semaphore is an ``unsigned short`` in the program's data (section ``.probes``)
that the program's code tests before computing a guarded marker's arguments
(``PyDTrace_FUNCTION_ENTRY_ENABLED()`` in CPython): a tracer increments it while its
probe is live and decrements it afterwards, as the kernel does for a uprobe with a
``ref_ctr_offset``.
"""
from __future__ import annotations

import fnmatch
import re
import struct
from dataclasses import dataclass
from typing import BinaryIO

from uprobe_opt import elfsyms

__all__ = ["Marker", "read_markers", "match_markers"]

NT_STAPSDT = 3
_SHT_NOTE = 7


@dataclass(frozen=True)
class Marker:
    """One USDT marker of a file.  ``pc`` and ``semaphore`` are link-time addresses
    (prelink-adjusted; ``semaphore`` 0 when the marker has none); ``args`` the note's
    argument string (``8@%rbp 8@%r12 -4@%eax``)."""
    provider: str
    name: str
    pc: int
    semaphore: int
    args: str

    @property
    def qualname(self) -> str:
        return f"{self.provider}:{self.name}"


def read_markers(f: BinaryIO, secs: list | None = None) -> list[Marker]:
    """Every marker of the ELF file open in ``f``, in note order (empty without a
    ``.note.stapsdt`` section).  Malformed notes are skipped."""
    secs = secs if secs is not None else elfsyms.read_sections(f)
    notes = [s for s in secs if s.name == ".note.stapsdt" and s.type == _SHT_NOTE]
    base_sec = next((s for s in secs if s.name == ".stapsdt.base"), None)
    out: list[Marker] = []
    for sec in notes:
        data = sec.read(f)
        off = 0
        while off + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, off)
            name_off = off + 12
            desc_off = name_off + _align4(namesz)
            end = desc_off + _align4(descsz)
            owner = data[name_off:name_off + namesz].rstrip(b"\0")
            if ntype == NT_STAPSDT and owner == b"stapsdt" and descsz >= 27:
                marker = _parse_desc(data[desc_off:desc_off + descsz],
                                     base_sec.addr if base_sec is not None else None)
                if marker is not None:
                    out.append(marker)
            off = end
    return out


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _parse_desc(desc: bytes, base_now: int | None) -> Marker | None:
    pc, base, sem = struct.unpack_from("<QQQ", desc, 0)
    parts = desc[24:].split(b"\0")
    if len(parts) < 3:
        return None
    provider, name, args = (p.decode("utf-8", "replace") for p in parts[:3])
    if base_now is not None and base and base_now != base:
        delta = base_now - base
        pc += delta
        if sem:
            sem += delta
    return Marker(provider, name, pc, sem, args)


def match_markers(markers: list[Marker], provider: str | None, name: str) -> list[Marker]:
    """The markers whose provider and name match (shell patterns, case-sensitive;
    ``provider`` None: any provider)."""
    name_rx = re.compile(fnmatch.translate(name))
    prov_rx = re.compile(fnmatch.translate(provider)) if provider is not None else None
    return [m for m in markers if name_rx.match(m.name)
            and (prov_rx is None or prov_rx.match(m.provider))]
