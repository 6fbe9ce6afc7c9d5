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


MINI_SRC = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((noipa)) static long bump(long x) { return x * 2 + 1; }
int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    long s = 0;
    for (int i = 0; i < n; i++)
        s += bump(i);
    printf("mini: %d calls, sum=%ld\n", n, s);
    return 0;
}
"""


@pytest.fixture(scope="module")
def minidebug(tmp_path_factory):
    """(plain, mini) of a program whose static function ``bump`` is named only by
    MiniDebugInfo, made the way Fedora's find-debuginfo does: the function symbols
    that .dynsym lacks, kept from the debug file, xz-compressed into .gnu_debugdata
    of the binary stripped with --strip-all."""
    for tool in ("strip", "objcopy", "nm", "xz"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    from uprobe_opt.testing import build_c
    d = tmp_path_factory.mktemp("minidebug")
    (d / "mini.c").write_text(MINI_SRC)
    plain = build_c(d / "mini.c", out_dir=d)

    def names(*args):
        out = subprocess.run(["nm", *args, "--format=posix", "--defined-only", plain],
                             capture_output=True, text=True, check=True).stdout
        return {line.split()[0] for line in out.splitlines()
                if len(line.split()) > 1 and (not args or line.split()[1] in "Tt")}
    dynsyms = names("-D")
    keep = sorted(names() - dynsyms)
    assert "bump" in keep
    (d / "keep").write_text("\n".join(keep) + "\n")
    run = lambda *cmd: subprocess.run(cmd, check=True, cwd=d, capture_output=True)  # noqa: E731
    run("objcopy", "--only-keep-debug", plain, "debug")
    run("objcopy", "-S", "--remove-section", ".gdb_index", "--remove-section", ".comment",
        "--keep-symbols=keep", "debug", "mini_debuginfo")
    run("strip", "--strip-all", "-R", ".comment", "-o", "mini", plain)
    run("xz", "-f", "mini_debuginfo")
    run("objcopy", "--add-section", ".gnu_debugdata=mini_debuginfo.xz", "mini")
    out = subprocess.run(["readelf", "-SW", d / "mini"], capture_output=True, text=True).stdout
    assert ".symtab" not in out and ".gnu_debugdata" in out and ".gnu_debuglink" not in out
    return plain, d / "mini"


def test_static_function_by_name_through_minidebuginfo(minidebug):
    plain, mini = minidebug
    want = SymbolResolver(binary=str(plain)).resolve("bump")
    res = SymbolResolver(binary=str(mini))
    site = res.resolve("bump")
    assert (site.addr, site.func_size) == (want.addr, want.func_size)
    assert next(res.iter_libraries()).elf.debug_source == ".gnu_debugdata"
    expected = subprocess.run([mini, str(K)], capture_output=True, text=True).stdout
    assert expected == f"mini: {K} calls, sum={sum(2 * i + 1 for i in range(K))}\n"
    r, w = os.pipe()
    with Tracer.spawn([str(mini), str(K)], stdout=w) as t:
        os.close(w)
        p = t.add_probe("bump", handler="count")
        assert p.site.func_size == want.func_size
        t.run()
        got = os.read(r, 4096).decode()
    os.close(r)
    assert got == expected
    assert p.nhit == K, p.reason
