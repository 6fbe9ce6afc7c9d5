"""``uprobe-opt explain``: for each probe site, what jump optimization would do.

Works without ptrace: on a binary on disk (link-time addresses) or on a live PID (the
code is read from the mapped files, its maps for detour reachability).  Nothing in any
process is changed.  Output per site: the region's instructions, their relocated forms
in a detour slot, the detour reachability, then ``optimizable`` or the refusal.
"""
from __future__ import annotations

import json
import os
import sys

from uprobe_opt.core.arch import load_arch
from uprobe_opt.core.detour import AREA_SIZE, NoDetourSpace, find_gap
from uprobe_opt.errors import SymbolError, UsageError
from uprobe_opt.symbols import SymbolResolver


DETOUR_KINDS = ("count", "record", "python")


def explain_site(resolver: SymbolResolver, spec: str, maps=None,
                 detours: tuple[str, ...] = ()) -> dict:
    """Analyse one probe spec; returns a JSON-ready dict (addresses as hex strings).
    ``detours``: handler kinds whose whole detour is listed (``detours`` key)."""
    return analyse_site(resolver, resolver.resolve(spec), spec, maps, detours)


def analyse_site(resolver: SymbolResolver, site, spec: str, maps=None,
                 detours: tuple[str, ...] = ()) -> dict:
    """Analyse one resolved symbols.Site (see explain_site); SymbolError when its
    address is not an instruction boundary."""
    arch = load_arch()
    out = {"probe": spec, "address": f"{site.addr:#x}", "symbol": site.symbol,
           "function": None, "region": [], "relocated": [], "detour": None,
           "optimizable": False, "reason": None}
    if site.ifunc:
        out["ifunc"] = {"symbol": site.ifunc, "learnt_from": site.ifunc_how}
    if site.is_ifunc and site.offset == 0 and resolver.pid is None:
        cands = resolver.ifunc_candidates(site.func_addr, site.func_size)
        out["ifunc_candidates"] = cands
        out["reason"] = (f"{site.symbol} is a GNU IFUNC: the implementation is chosen at "
                         "run time by its resolver (from the CPU's features); a probe in a "
                         "process lands on the one it runs; candidates: "
                         + (", ".join(cands) or "none found in the resolver's code"))
        return out
    if site.func_addr is None or not site.func_size:
        out["reason"] = f"no function symbol contains {site.addr:#x}"
        return out
    out["function"] = {"addr": f"{site.func_addr:#x}", "size": site.func_size}
    code = resolver.read_code(site.func_addr, site.func_size)
    refusal = arch.check_boundary(code, site.func_addr, site.addr)
    if refusal is not None:
        # Not a probe site at all (trace refuses it the same way): bad input.
        raise SymbolError(f"{spec}: {refusal}", addr=site.addr)
    addr = site.addr
    if addr == site.func_addr:
        addr = arch.adjust_addr(code, site.func_addr, addr)
    out["patched_address"] = f"{addr:#x}"
    if site.usdt is not None:
        return _usdt_verdict(out, site.usdt)
    pads = resolver.landing_pads(site.func_addr, site.func_size)
    if pads is None:
        out["reason"] = "exception tables of the function could not be read"
        return out
    region = arch.check(code, site.func_addr, site.func_size, addr, (), pads,
                        facts=resolver.function_facts(site.func_addr, site.func_size))
    if not hasattr(region, "size"):
        out["reason"] = str(region)
        return out
    return _detour_verdict(out, arch, arch.prepare, region, addr, maps, detours,
                           resolver.pid)


def _usdt_verdict(out: dict, usdt) -> dict:
    """A USDT marker is never jump-optimized (core.probe.USDT_REFUSAL)."""
    from uprobe_opt.core.probe import USDT_REFUSAL
    out["usdt"] = {"provider": usdt.provider, "name": usdt.name,
                   "semaphore": f"{usdt.semaphore:#x}" if usdt.semaphore else None,
                   "args": usdt.args_text, "args_error": usdt.args_error}
    out["reason"] = USDT_REFUSAL
    return out


def _rseq_offset(pid: int | None) -> tuple[int | None, str]:
    """glibc's __rseq_offset of process ``pid`` (read from /proc/PID/mem, no stop), or
    without a process our own (the same libc as a program on this machine)."""
    import ctypes
    import struct
    if pid is not None:
        try:
            from uprobe_opt.symbols import SymbolResolver as _R
            addr = _R(pid=pid).find_data_symbol("__rseq_offset", lib="ld-linux-x86-64.so.2")
            with open(f"/proc/{pid}/mem", "rb") as f:
                f.seek(addr)
                (off,) = struct.unpack("<q", f.read(8))
            return off or None, f"__rseq_offset of process {pid}"
        except Exception:
            return None, f"process {pid} has no readable __rseq_offset"
    try:
        off = ctypes.c_long.in_dll(ctypes.CDLL(None), "__rseq_offset").value
        return off or None, "__rseq_offset of this machine's glibc"
    except (ValueError, OSError):
        return None, "no __rseq_offset in this machine's glibc"


def _detour_verdict(out: dict, arch, prepare, region, jump_at: int, maps, detours,
                    pid: int | None, regs: tuple[str, ...] | None = None) -> dict:
    """The rest of a site's verdict once its region is known (an entry's or an
    exit's, by ``prepare``): the region, the detour slot in reach of ``jump_at``, the
    relocated instructions, and the detours asked for; ``reason`` where it stops."""
    out["region"] = [{"addr": f"{i.addr:#x}", "bytes": i.bytes.hex(), "insn": str(i)}
                     for i in region.insns]
    slot, reach = _slot_for(jump_at, maps)
    out["detour"] = reach
    if slot is None:
        out["reason"] = reach
        return out
    detour = prepare(region, slot, arch.handler_spec("count", counter_addr=slot + 0x10000))
    if not hasattr(detour, "code"):
        out["reason"] = str(detour)
        return out
    out["relocated"] = [{"insn": str(i), "relocated": t} for i, t in detour.relocated]
    out["optimizable"] = True
    if detours:
        out["detours"] = detour_listings(arch, prepare, region, slot, detours, pid, regs)
    return out


def detour_listings(arch, prepare, region, slot: int, kinds, pid: int | None,
                    regs: tuple[str, ...] | None = None) -> dict:
    """{kind: {"note", "lines": [{section, addr, bytes, text}]}} for each handler kind:
    the detour as it would be written at ``slot``, counter and ring at hypothetical
    addresses in the detour's data pages."""
    rseq, how = _rseq_offset(pid)
    ncpu = 1 << max(0, (os.cpu_count() or 1) - 1).bit_length()
    counter, ring, missed = slot + 0x10000, slot + 0x20000, slot + 0x10000 + 64 * (ncpu + 1)
    specs = {
        "count": arch.handler_spec("count", counter_addr=counter, ncpu_slots=ncpu,
                                   rseq_offset=rseq),
        "record": arch.handler_spec("record", counter_addr=counter, ncpu_slots=ncpu,
                                    rseq_offset=rseq, ring_addr=ring, ring_mask=(1 << 16) - 1,
                                    missed_addr=missed, regs=regs),
        "python": arch.handler_spec("python"),
    }
    note = (f"counter at {counter:#x} ({ncpu} per-CPU slots + 1 shared"
            f"{'' if rseq is not None else ', no rseq: lock inc'}; {how}: "
            f"{rseq if rseq is not None else '-'}), ring at {ring:#x} (hypothetical)")
    out = {}
    for kind in kinds:
        detour = prepare(region, slot, specs[kind])
        if not hasattr(detour, "code"):
            out[kind] = {"note": str(detour), "lines": []}
            continue
        out[kind] = {"note": note if kind != "python" else
                     "the whole pt_regs frame, then int3 (the tracer runs the handler)",
                     "bytes": len(detour.code),
                     "lines": [{"section": sec, "addr": f"{a:#x}", "bytes": b.hex(),
                                "text": t} for sec, a, b, t in arch.detour_listing(detour)]}
    return out


def _print_detours(detours: dict, w, indent: str = "  ") -> None:
    for kind, d in detours.items():
        w(f"{indent}detour, {kind} handler"
          + (f" ({d['bytes']} bytes)" if "bytes" in d else "") + f": {d['note']}\n")
        section = None
        for line in d["lines"]:
            if line["section"] != section:
                section = line["section"]
                w(f"{indent}  {section}:\n")
            w(f"{indent}    {line['addr']}  {line['bytes'][:24]:<24} {line['text']}\n")


def _slot_for(addr: int, maps) -> tuple[int | None, str]:
    if maps is None:
        slot = (addr - (64 << 20) if addr > (128 << 20) else addr + (64 << 20)) & ~0xFFF
        return slot, (f"no process: a detour would be mapped in the nearest free gap; "
                      f"shown at {slot:#x} (hypothetical, {slot - addr:+#x} from the site)")
    try:
        slot = find_gap(maps, addr, AREA_SIZE)
    except NoDetourSpace as e:
        return None, str(e)
    return slot, f"free gap at {slot:#x}, {slot - addr:+#x} from the site (rel32 reach)"


def cmd_explain(args) -> int:
    items = list(args.items)
    if args.pid is not None:
        from uprobe_opt.target.process import check_user_process
        check_user_process(args.pid)
        resolver = SymbolResolver(pid=args.pid)
        from uprobe_opt.target.maps import read_maps
        maps = read_maps(args.pid)
        specs = items
    else:
        if len(items) < 2:
            raise UsageError("explain wants BINARY PROBE... or -p PID PROBE...")
        if not os.path.isfile(items[0]):
            raise UsageError(f"no such file {items[0]!r}")
        resolver = SymbolResolver(binary=items[0])
        maps, specs = None, items[1:]
    from uprobe_opt.core.calls import split_return_spec
    from uprobe_opt.symbols import parse_spec
    expanded = []
    for spec in specs:      # a glob (libc:str*) explains each match, as trace probes it
        if not split_return_spec(spec)[1] and parse_spec(spec).is_glob:
            # (an IFUNC match reads "libc:strlen -> __strlen_avx2": its name resolves)
            expanded += [site.spec.split(" -> ")[0] for site in resolver.resolve_all(spec)]
        else:
            expanded.append(spec)
    for spec in expanded:
        if split_return_spec(spec)[1]:
            res = explain_return(resolver, spec, maps, _kinds(args))
            if args.json:
                print(json.dumps({"event": "explain", **res}))
            else:
                _print_return_text(res)
            continue
        res = explain_site(resolver, spec, maps, _kinds(args))
        if args.json:
            print(json.dumps({"event": "explain", **res}))
        else:
            _print_text(res)
    return 0


def _kinds(args) -> tuple[str, ...]:
    """--detour [KIND]: every handler kind, or the one named."""
    chosen = getattr(args, "detour", None)
    if chosen is None:
        return ()
    if chosen == "all":
        return DETOUR_KINDS
    if chosen not in DETOUR_KINDS:
        raise UsageError(f"--detour takes one of {', '.join(DETOUR_KINDS)}, not {chosen!r}")
    return (chosen,)


def explain_return(resolver: SymbolResolver, spec: str, maps=None,
                   detours: tuple[str, ...] = ()) -> dict:
    """``SPEC%return``: the function's entry (where a recording handler pairs its
    calls) and every exit, each with its region, its exit detour and whether it is
    jump-optimizable, or the reason it stays int3.  Raises SymbolError when the spec is
    not a function start or the body cannot be decoded."""
    from uprobe_opt.core.calls import split_return_spec
    arch = load_arch()
    base, _ = split_return_spec(spec)
    site = resolver.resolve(base)
    if site.func_addr is None or not site.func_size:
        raise SymbolError(f"{spec}: no function symbol with a size contains {site.addr:#x}")
    if site.addr != site.func_addr:
        raise SymbolError(f"{spec}: a return probe takes a function, not an address inside one")
    code = resolver.read_code(site.func_addr, site.func_size)
    found = arch.find_exits(code, site.func_addr, site.func_size)
    if not isinstance(found, tuple):
        raise SymbolError(f"{spec}: {found}", addr=site.addr)
    exits, notes = found
    pads = resolver.landing_pads(site.func_addr, site.func_size)
    out = {"probe": spec, "address": f"{site.addr:#x}", "symbol": site.symbol,
           "function": {"addr": f"{site.func_addr:#x}", "size": site.func_size},
           "entry": explain_site(resolver, base, maps, detours), "exits": [], "notes": notes}
    entry_addr = int(out["entry"].get("patched_address", out["address"]), 16)
    for point in exits:
        out["exits"].append(_explain_exit(arch, code, site, point, entry_addr, pads, maps,
                                          detours, resolver.pid))
    return out


def _explain_exit(arch, code, site, point, entry_addr, pads, maps, detours=(),
                  pid=None) -> dict:
    """One exit: what a hit there records (the return value and rsp; a tail call's
    value is the callee's) and how it is probed."""
    gets = ("rax (return value), rdx, rsp (the return-address slot, matched with the "
            "entry)" if point.kind == "ret" else
            "rsp (matched with the entry; the call ends at the jump, rax is not yet "
            "the callee's value)")
    res = {"exit": point.describe(site.func_addr, site.symbol), "kind": point.kind,
           "address": f"{point.addr:#x}", "insn": str(point.insn), "gets": gets,
           "region": [], "relocated": [], "optimizable": False, "reason": None}
    if pads is None:
        res["reason"] = "exception tables of the function could not be read"
        return res
    region = arch.check_exit(code, site.func_addr, site.func_size, point.addr,
                             [entry_addr], pads)
    if not hasattr(region, "size"):
        res["reason"] = str(region)
        return res
    res["jump_at"] = f"{region.addr:#x}"
    return _detour_verdict(res, arch, arch.prepare_exit, region, region.addr, maps, detours,
                           pid, arch.exit_regs())


def _print_return_text(res: dict, file=None) -> None:
    w = (file or sys.stdout).write
    n = len(res["exits"])
    w(f"{res['probe']}: {res['symbol']} at {res['address']}, {n} exit{'s' * (n != 1)}\n")
    entry = res["entry"]
    state = "optimizable" if entry["optimizable"] else f"int3: {entry['reason']}"
    w(f"  entry at {entry.get('patched_address', entry['address'])} (records the "
      f"arguments and rsp for latency): {state}\n")
    if entry.get("detours"):
        _print_detours(entry["detours"], w, "    ")
    for ex in res["exits"]:
        w(f"  {ex['exit']} ({ex['address']}: {ex['insn']})\n")
        w(f"    gets: {ex['gets']}\n")
        if ex["region"]:
            w(f"    region (jump at {ex['jump_at']}):\n")
            for i in ex["region"]:
                w(f"      {i['addr']}  {i['bytes']:<24} {i['insn']}\n")
        if ex["relocated"]:
            w("    exit detour: relocated instructions, then the handler with the "
              "state at the exit, then the exit itself:\n")
            for r in ex["relocated"]:
                w(f"      {r['insn']:<40} -> {r['relocated']}\n")
        w("    optimizable\n" if ex["optimizable"] else f"    int3: {ex['reason']}\n")
        if ex.get("detours"):
            _print_detours(ex["detours"], w, "    ")
    for note in res["notes"]:
        w(f"  note: {note}\n")
    if not res["exits"]:
        w("  no exit: the function never returns (or leaves only through indirect "
          "jumps); calls are counted as entries, in flight or unwound\n")
    if any(ex["kind"] == "tail" for ex in res["exits"]):
        w("  a tail call ends the call at its jmp (the callee's time is not included)\n")


def _print_text(res: dict, file=None) -> None:
    w = (file or sys.stdout).write
    w(f"{res['probe']} at {res['address']}"
      + (f" ({res['symbol']})" if res.get("symbol") else "") + "\n")
    if res.get("ifunc"):
        w(f"  implementation of GNU IFUNC {res['ifunc']['symbol']}, learnt from "
          f"{res['ifunc']['learnt_from']}\n")
    if res.get("patched_address") and res["patched_address"] != res["address"]:
        w(f"  planted at {res['patched_address']} (after endbr64)\n")
    if res["region"]:
        w("  region:\n")
        for i in res["region"]:
            w(f"    {i['addr']}  {i['bytes']:<24} {i['insn']}\n")
    if res["relocated"]:
        w("  relocated:\n")
        for r in res["relocated"]:
            w(f"    {r['insn']:<40} -> {r['relocated']}\n")
    if res["detour"]:
        w(f"  detour: {res['detour']}\n")
    w("  optimizable\n" if res["optimizable"] else f"  int3: {res['reason']}\n")
    if res.get("detours"):
        _print_detours(res["detours"], w)
