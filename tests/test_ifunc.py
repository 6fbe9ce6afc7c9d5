"""GNU IFUNC symbols: a probe lands on the implementation the process runs."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from helpers import run_cli
from uprobe_opt import ifunc
from uprobe_opt.session import Tracer
from uprobe_opt.symbols import STT_GNU_IFUNC, SymbolResolver
from uprobe_opt.testing import build_target

N = 20_000
SPECS = ("libc:strlen", "libc:memcpy", "libm:sin")


@pytest.fixture(scope="module")
def ifunc_exe():
    return build_target("ifunc")


def _is_ifunc(path, name) -> bool:
    r = SymbolResolver(binary=path)
    return r.resolve(name).is_ifunc


@pytest.fixture(autouse=True)
def _need_ifuncs():
    for lib, name in (("/lib/x86_64-linux-gnu/libc.so.6", "strlen"),
                      ("/lib/x86_64-linux-gnu/libm.so.6", "sin")):
        if not os.path.exists(lib) or not _is_ifunc(lib, name):
            pytest.skip(f"{name} is not an IFUNC in {lib}")


def test_ifunc_counts_plt_and_pointer(ifunc_exe):
    """N calls through the PLT and N through a function pointer: hits == 2N each."""
    want = subprocess.run([ifunc_exe, str(N)], capture_output=True, text=True).stdout
    r, w = os.pipe()
    with Tracer.spawn([ifunc_exe, str(N)], stdout=w) as t:
        os.close(w)
        probes = t.add_probes(SPECS, handler="count")
        t.run()
        got = os.read(r, 4096).decode()
    os.close(r)
    assert got == want
    for spec, p in zip(SPECS, probes):
        assert p.nhit == 2 * N, (spec, p.nhit, p.state, p.reason)
        assert p.spec.startswith(spec + " -> ") and p.spec != spec + " -> "
    for p in probes:   # glibc's __mempcpy_* jump into __memcpy_*'s first bytes
        assert p.state.value == "optimized" or re.fullmatch(
            r"(?:int3 \(kernel uprobe\): )?"
            r"jmp at 0x[0-9a-f]+ \(in \w+\) targets 0x[0-9a-f]+ inside the region",
            p.reason), (p.spec, p.state, p.reason)


def test_ifunc_resolution_agrees(ifunc_exe):
    """The relocated slot, the emulated resolver and the target's own function
    pointer (p_sin etc., bound by ld.so at load) name the same implementation."""
    null = os.open(os.devnull, os.O_WRONLY)
    with Tracer.spawn([ifunc_exe, "1"], stdout=null) as t:   # held at AT_ENTRY: ld.so done
        os.close(null)
        res = SymbolResolver(pid=t.pid)
        exe = next(o for o in res.iter_libraries() if o.is_main)
        for spec, ptr in zip(SPECS, ("p_strlen", "p_memcpy", "p_sin")):
            site = res.resolve(spec)
            value = ifunc.read_word(t.pid, exe.bias + exe.elf.lookup(ptr)[0].value)
            assert site.addr == value, spec
            lib = res._objects_for_lib(spec.split(":")[0])
            sym = lib.elf.lookup(spec.split(":")[1])[0]
            assert sym.type == STT_GNU_IFUNC
            emulated = ifunc.emulate_resolver(t.pid, lib.bias + sym.value, lambda a: True)
            assert emulated == value, spec
        t.run()


def test_explain_ifunc_without_process():
    res = run_cli("explain", "/lib/x86_64-linux-gnu/libc.so.6", "strlen", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert "chosen at run time" in out["reason"] and not out["optimizable"]
    assert len(out["ifunc_candidates"]) >= 2
    assert all(c.startswith("__strlen") or c.startswith("0x") for c in out["ifunc_candidates"])


def test_glob_counts_each_match(ifunc_exe):
    """``libc:str*``: one probe per matching function, strlen's implementation gets
    the program's 2N calls, strtol the one call of atol(argv[1]), every other match none,
    output unchanged."""
    want = subprocess.run([ifunc_exe, str(N)], capture_output=True, text=True).stdout
    r, w = os.pipe()
    with Tracer.spawn([ifunc_exe, str(N)], stdout=w) as t:
        os.close(w)
        probes = t.add_probes(["libc:str*"], handler="count")
        t.run()
        got = os.read(r, 4096).decode()
    os.close(r)
    assert got == want
    addrs = [p.addr for p in probes]
    assert len(addrs) == len(set(addrs)) >= 20    # static twins keep their own probe
    assert all(p.spec.startswith("libc:str") for p in probes)
    strlen = [p for p in probes if p.spec.startswith("libc:strlen -> ")]
    assert len(strlen) == 1 and strlen[0].nhit == 2 * N
    # and atol(argv[1]) is strtol's one call
    assert {p.spec: p.nhit for p in probes if p.nhit and p is not strlen[0]} == \
        {"libc:strtol": 1}


def test_list_command(ifunc_exe):
    """``list -p PID libc:str*``: a row per match, sane addresses and sizes, the same
    set as the Tracer's probes; --json agrees with the text form."""
    p = subprocess.Popen(["sleep", "60"])
    try:
        res = run_cli("list", "-p", str(p.pid), "libc:str*")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0].split()[:3] == ["ADDRESS", "SIZE", "PROBE"]
        rows = lines[1:-1]
        assert lines[-1].startswith(f"{len(rows)} sites: ")
        resolver = SymbolResolver(pid=p.pid)
        sites = resolver.resolve_all("libc:str*")
        assert len(rows) == len(sites) >= 20
        for row, site in zip(rows, sites):
            addr, size, probe = row.split()[:3]
            assert int(addr, 16) == site.addr and int(size) == site.func_size
            assert probe == site.spec.split(" -> ")[0]
            assert resolver.find_symbol_for(site.addr)[1] == site.addr
        js = run_cli("list", "-p", str(p.pid), "libc:str*", "--json")
        objs = [json.loads(x) for x in js.stdout.splitlines()]
        assert [o["address"] for o in objs] == [r.split()[0] for r in rows]
        assert all((o["reason"] is None) == o["optimizable"] for o in objs)
        bad = run_cli("list", "-p", str(p.pid), "libc:no_such_fn*")
        assert bad.returncode == 2 and "no function matches" in bad.stderr
    finally:
        p.kill()
        p.wait()
