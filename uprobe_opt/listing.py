"""``uprobe-opt list``: every site a spec names (globs included), with what it would get.

Like ``bpftrace -l`` plus the verdict: for each match the address, the function's size
and ``optimized`` or ``int3: REASON`` (the same analysis as ``explain``, nothing in any
process is changed).  ``-p PID``: runtime addresses in that process (IFUNCs as the
implementation it runs); ``BINARY``: link-time addresses in that file.
"""
from __future__ import annotations

import json
import os
import sys

from uprobe_opt.errors import SymbolError, UsageError

# explain and symbols (pyelftools, capstone, numpy) are imported by the functions that
# use them: the CLI builds its parser from add_parser on every start, `--help` and
# `trace` included.


def add_parser(sub) -> None:
    ls = sub.add_parser("list", help="list the functions a spec matches and what each would get",
                        usage="uprobe-opt list [-p PID | BINARY] SPEC... [--json]")
    ls.add_argument("-p", "--pid", type=int)
    ls.add_argument("items", nargs="+", metavar="[BINARY] SPEC")
    ls.add_argument("--json", action="store_true")


def iter_rows(resolver, specs, maps):
    """One analysis dict (see explain.analyse_site) per site of every spec
    (``resolver``: a uprobe_opt.symbols.SymbolResolver)."""
    from uprobe_opt.explain import analyse_site
    for spec in specs:
        for site in resolver.resolve_all(spec):
            try:
                res = analyse_site(resolver, site, site.spec, maps)
            except SymbolError as e:    # e.g. not an instruction boundary
                res = {"probe": site.spec, "address": f"{site.addr:#x}",
                       "optimizable": False, "reason": str(e), "function": None}
            res["size"] = site.func_size
            yield res


def cmd_list(args) -> int:
    from uprobe_opt.symbols import SymbolResolver
    items = list(args.items)
    if args.pid is not None:
        from uprobe_opt.target.maps import read_maps
        from uprobe_opt.target.process import check_user_process
        check_user_process(args.pid)
        resolver, maps, specs = SymbolResolver(pid=args.pid), read_maps(args.pid), items
    else:
        if len(items) < 2:
            raise UsageError("list wants BINARY SPEC... or -p PID SPEC...")
        if not os.path.isfile(items[0]):
            raise UsageError(f"no such file {items[0]!r}")
        resolver, maps, specs = SymbolResolver(binary=items[0]), None, items[1:]
    rows = list(iter_rows(resolver, specs, maps))
    w = sys.stdout.write
    if args.json:
        for r in rows:
            w(json.dumps({"event": "list", "probe": r["probe"], "address": r["address"],
                          "size": r["size"], "optimizable": r["optimizable"],
                          "reason": r["reason"],
                          **({"usdt": r["usdt"]} if "usdt" in r else {})}) + "\n")
        return 0
    width = max([len(r["probe"]) for r in rows] + [5])
    w(f"{'ADDRESS':<18}  {'SIZE':>6}  {'PROBE':<{width}}  WOULD GET\n")
    for r in rows:
        verdict = "optimized" if r["optimizable"] else f"int3: {r['reason']}"
        if "usdt" in r:
            u = r["usdt"]
            verdict += f"; semaphore {u['semaphore'] or 'none'}; args {u['args'] or 'none'}"
        w(f"{r['address']:<18}  {r['size'] or '?':>6}  {r['probe']:<{width}}  {verdict}\n")
    n_opt = sum(r["optimizable"] for r in rows)
    w(f"{len(rows)} sites: {n_opt} optimizable, {len(rows) - n_opt} int3\n")
    return 0
