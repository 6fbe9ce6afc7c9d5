"""Target-process layer: ptrace, threads, memory, registers, remote syscalls.

Knows nothing about probes. See docs/internals.md ("target layer").
"""
from .maps import Mapping, read_maps
from .process import (ExecEvent, ExitEvent, Event, ForkedChild, Target, TrapEvent,
                      MAP_ANONYMOUS, MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_PRIVATE,
                      MAP_SHARED, PROT_EXEC, PROT_READ, PROT_WRITE)

events = (TrapEvent, ExitEvent, ExecEvent)

__all__ = ["Target", "Mapping", "read_maps", "ForkedChild", "TrapEvent", "ExitEvent",
           "ExecEvent", "Event", "events", "PROT_READ", "PROT_WRITE", "PROT_EXEC",
           "MAP_PRIVATE", "MAP_SHARED", "MAP_ANONYMOUS", "MAP_FIXED",
           "MAP_FIXED_NOREPLACE"]
