"""The module-wide half of check 3: a direct branch from another function of the
module into a site's region refuses it, naming the branch."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from helpers import run_cli
from uprobe_opt.session import Tracer
from uprobe_opt.symbols import SymbolResolver
from uprobe_opt.testing import build_target
from uprobe_opt.x86.branchindex import sweep_branches

N = 5000


@pytest.fixture(scope="module")
def xjump():
    return build_target("hz_xjump")


def _addr(exe, name) -> int:
    return SymbolResolver(binary=str(exe)).resolve(name).addr


def test_jump_from_other_function_keeps_int3(xjump):
    want = subprocess.run([xjump, str(N)], capture_output=True, text=True).stdout
    r, w = os.pipe()
    with Tracer.spawn([xjump, str(N)], stdout=w) as t:
        os.close(w)
        entry5, other = t.add_probes(["entry5", "other"], handler="count")
        t.run()
        got = os.read(r, 4096).decode()
    os.close(r)
    assert got == want == f"hz_xjump: {N} calls, sum={sum(2 * i + 103 + 3 for i in range(N))}\n"
    assert (entry5.nhit, other.nhit) == (N, N)
    assert entry5.state.value == "int3"
    # the site may be served by the kernel's uprobe: "int3 (kernel uprobe): <refusal>"
    m = re.fullmatch(r"(?:int3 \(kernel uprobe\): )?jmp at (0x[0-9a-f]+) \(in other\) "
                     r"targets (0x[0-9a-f]+) inside the region", entry5.reason)
    assert m, entry5.reason
    jmp, target = (int(x, 16) for x in m.groups())
    assert target == entry5.addr + 3                       # `inner`
    assert other.addr < jmp                                # the jmp lies in other()
    assert other.state.value == "optimized"


def test_explain_and_list_name_the_jump(xjump):
    res = run_cli("explain", str(xjump), "entry5", "--json")
    out = json.loads(res.stdout)
    assert not out["optimizable"] and "(in other) targets" in out["reason"]
    lst = run_cli("list", str(xjump), "entry5", "other", "--json")
    rows = [json.loads(x) for x in lst.stdout.splitlines()]
    assert [(r["probe"], r["optimizable"]) for r in rows] == [("entry5", False), ("other", True)]
    assert rows[0]["reason"] == out["reason"]


def test_sweep_finds_every_direct_branch():
    # jmp rel8 +2, call rel32 0, jne rel8 -4, ret; a jmp through a register is not direct
    code = bytes.fromhex("eb02" "e800000000" "75fa" "ffe0" "c3")
    src, dst = sweep_branches([(0x1000, len(code))], lambda a, n: code)
    assert list(zip(src, dst)) == [(0x1000, 0x1004), (0x1002, 0x1007), (0x1007, 0x1003)]


def _verdicts_agree(path: str, limit: int | None = None) -> int:
    """Every function of ``path`` (up to ``limit``): the verdict from the module
    sweep's facts (what list and explain use) equals a full decode's, refusal text
    included.  Returns how many functions were compared."""
    from uprobe_opt.core.arch import load_arch
    arch = load_arch()
    res = SymbolResolver(binary=path)
    n = 0
    for site in res.resolve_all("*")[:limit]:
        if site.func_addr is None or site.is_ifunc:
            continue
        code = res.read_code(site.func_addr, site.func_size)
        addr = arch.adjust_addr(code, site.func_addr, site.addr)
        pads = res.landing_pads(site.func_addr, site.func_size) or {}
        facts = res.function_facts(site.func_addr, site.func_size)
        assert facts is not None, site.spec
        fast = arch.check(code, site.func_addr, site.func_size, addr, (), pads, facts=facts)
        slow = arch.check(code, site.func_addr, site.func_size, addr, (), pads)
        key = [(r.addr, r.size) if hasattr(r, "size") else str(r) for r in (fast, slow)]
        assert key[0] == key[1], site.spec
        n += 1
    return n


@pytest.mark.parametrize("name", ["hz_xjump", "hz_switch", "hz_cxx_throw"])
def test_facts_verdict_equals_full_decode_on_targets(name):
    assert _verdicts_agree(str(build_target(name))) > 3


def test_facts_verdict_equals_full_decode_on_libc():
    """A sample of libc's functions (all 3,640 agree; checked when the fast path was
    written, 31 s of full decodes, too slow for every run)."""
    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    if not os.path.exists(libc):
        pytest.skip(f"{libc} not found")
    assert _verdicts_agree(libc, limit=400) > 300
