"""Functions without symbols: bounds from .eh_frame FDEs, names from a separate debug
file (.gnu_debuglink), in a program stripped with ``strip --strip-all``."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from uprobe_opt.errors import SymbolError
from uprobe_opt.session import Tracer
from uprobe_opt.symbols import SymbolResolver
from uprobe_opt.testing import build_target

K = 3000


@pytest.fixture(scope="module")
def stripped(tmp_path_factory):
    """(plain, stripped, stripped+debuglink, work's address) of loop.c, non-PIE so the
    link-time address is the runtime one."""
    if not shutil.which("strip") or not shutil.which("objcopy"):
        pytest.skip("binutils strip/objcopy not installed")
    d = tmp_path_factory.mktemp("stripped")
    src = build_target("loop", flags=["-no-pie"])
    plain = d / "loop"
    shutil.copy(src, plain)
    addr = SymbolResolver(binary=str(plain)).resolve("work").addr
    bare, linked, debug = d / "loop.bare", d / "loop.linked", d / "loop.debug"
    subprocess.run(["objcopy", "--only-keep-debug", plain, debug], check=True)
    subprocess.run(["strip", "--strip-all", "-o", bare, plain], check=True)
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", bare, linked], check=True,
                   cwd=d)
    out = subprocess.run(["readelf", "-SW", bare], capture_output=True, text=True).stdout
    assert ".symtab" not in out and ".eh_frame" in out
    return plain, bare, linked, addr


def _count(exe, spec):
    want = subprocess.run([exe, str(K)], capture_output=True, text=True).stdout
    r, w = os.pipe()
    with Tracer.spawn([exe, str(K)], stdout=w) as t:
        os.close(w)
        p = t.add_probe(spec, handler="count")
        t.run()
        got = os.read(r, 4096).decode()
    os.close(r)
    assert got == want
    return p


def test_by_address_through_eh_frame(stripped):
    _plain, bare, _linked, addr = stripped
    res = SymbolResolver(binary=str(bare))
    with pytest.raises(SymbolError, match="unknown symbol"):
        res.resolve("work")                      # no name anywhere
    site = res.resolve(f"{addr:#x}")
    assert site.symbol is None and site.func_addr == addr and site.func_size
    p = _count(str(bare), f"{addr:#x}")
    assert p.nhit == K and p.state.value == "optimized", p.reason


def test_by_name_through_debug_file(stripped):
    plain, _bare, linked, addr = stripped
    site = SymbolResolver(binary=str(linked)).resolve("work")
    want = SymbolResolver(binary=str(plain)).resolve("work")
    assert (site.addr, site.func_size) == (want.addr, want.func_size) == (addr, want.func_size)
    p = _count(str(linked), "work")
    assert p.nhit == K and p.state.value == "optimized", p.reason
