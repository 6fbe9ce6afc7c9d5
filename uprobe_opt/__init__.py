"""uprobe-opt: jump-optimized userspace probes for x86-64 Linux processes."""
from uprobe_opt.errors import (AccessDenied, PatchError, ProbeError, ProcessGone,
                               SymbolError, TargetError, TargetExited, ThreadGone, UsageError)

__version__ = "0.1.0"
__all__ = ["Tracer", "ProbeState", "ProbeError", "TargetError", "ProcessGone", "ThreadGone",
           "TargetExited", "AccessDenied", "SymbolError", "PatchError", "UsageError"]


def __getattr__(name):
    # Lazy: importing uprobe_opt (e.g. for the pytest plugin) does not load ptrace.
    if name == "Tracer":
        from uprobe_opt.session import Tracer
        return Tracer
    if name == "ProbeState":
        from uprobe_opt.core.probe import ProbeState
        return ProbeState
    raise AttributeError(name)
