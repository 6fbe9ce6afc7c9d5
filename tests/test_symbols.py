"""symbols.py against real processes: addresses checked against `nm` + load bases
read independently from /proc/PID/maps."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from uprobe_opt.errors import SymbolError
from uprobe_opt.symbols import ProbeSpec, SymbolResolver, parse_spec
from uprobe_opt.testing import build_c, build_target


# -- helpers --------------------------------------------------------------------------

def nm(path, name, dynamic=False) -> int:
    out = subprocess.run(["nm", "-D" if dynamic else "-a", "--defined-only", str(path)],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].split("@")[0] == name:
            return int(parts[0], 16)
    raise LookupError(f"{name} not in nm {path}")


def maps(pid):
    rows = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        p = line.split(None, 5)
        lo, hi = (int(x, 16) for x in p[0].split("-"))
        rows.append((lo, hi, p[1], int(p[2], 16), p[5] if len(p) > 5 else ""))
    return rows


def base_of(pid, match) -> tuple[int, str]:
    """Start of the offset-0 mapping of the file whose path contains ``match``
    (for these files the first PT_LOAD has p_vaddr == 0, so this is the load bias)."""
    for lo, _hi, _perms, off, path in maps(pid):
        if match in path and off == 0:
            return lo, path
    raise LookupError(match)


def spawn(argv, wait_for=("libc.so",)):
    p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL)
    deadline = time.time() + 5
    while time.time() < deadline:
        text = Path(f"/proc/{p.pid}/maps").read_text()
        if all(w in text for w in wait_for):
            time.sleep(0.05)  # let ld.so finish relocation/mprotect of the last library
            return p
        time.sleep(0.01)
    p.kill()
    raise TimeoutError("target did not load its libraries")


@pytest.fixture
def proc_factory():
    procs = []

    def make(argv, **kw):
        p = spawn(argv, **kw)
        procs.append(p)
        return p
    yield make
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def sleeper_pie():
    return build_target("sleeper")


@pytest.fixture(scope="module")
def sleeper_nopie():
    return build_target("sleeper", flags=["-no-pie"])


@pytest.fixture(scope="module")
def uselib_pair():
    lib = build_target("libdemo", shared=True)
    return lib, build_target("uselib", libs=[lib])


# -- parse_spec -----------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("work", ProbeSpec(symbol="work")),
    ("work+0x4", ProbeSpec(symbol="work", offset=4)),
    ("work+16", ProbeSpec(symbol="work", offset=16)),
    ("libc:getpid", ProbeSpec(lib="libc", symbol="getpid")),
    ("libc.so.6:getpid+0x2", ProbeSpec(lib="libc.so.6", symbol="getpid", offset=2)),
    ("/usr/lib/x86_64-linux-gnu/libc.so.6:getpid",
     ProbeSpec(lib="/usr/lib/x86_64-linux-gnu/libc.so.6", symbol="getpid")),
    ("0x401136", ProbeSpec(addr=0x401136)),
    ("memcpy@GLIBC_2.2.5", ProbeSpec(symbol="memcpy@GLIBC_2.2.5")),
    ("_ZN3foo3barEv", ProbeSpec(symbol="_ZN3foo3barEv")),
])
def test_parse_spec(text, expected):
    assert parse_spec(text) == expected
    assert parse_spec(str(expected)) == expected


@pytest.mark.parametrize("bad", ["", "work+", "work+0xzz", "libc:", ":work", "a b",
                                 "work-4", "0x", "libc:+3"])
def test_parse_spec_bad(bad):
    with pytest.raises(SymbolError, match="accepted forms"):
        parse_spec(bad)


# -- pid mode -------------------------------------------------------------------------

def test_pie_symbol(proc_factory, sleeper_pie):
    p = proc_factory([sleeper_pie])
    base, path = base_of(p.pid, sleeper_pie.name)
    r = SymbolResolver(pid=p.pid)
    site = r.resolve("tick")
    assert base > 0x10000  # really PIE
    assert site.addr == base + nm(sleeper_pie, "tick")
    assert (site.symbol, site.func_addr, site.offset, site.lib_path) == \
        ("tick", site.addr, 0, path)
    assert site.func_size > 0
    assert site.file_offset == nm(sleeper_pie, "tick")  # .text: vaddr == file offset here

    s4 = r.resolve("tick+0x4")
    assert (s4.addr, s4.func_addr, s4.offset, s4.spec) == (site.addr + 4, site.addr, 4,
                                                          "tick+0x4")
    assert r.resolve("tick+4").addr == site.addr + 4


def test_nopie_symbol(proc_factory, sleeper_nopie):
    p = proc_factory([sleeper_nopie])
    r = SymbolResolver(pid=p.pid)
    want = nm(sleeper_nopie, "tick")
    assert want >= 0x400000  # really linked at a fixed address
    site = r.resolve("tick")
    assert site.addr == want
    assert r.resolve("tick+0x2").addr == want + 2
    main = next(r.iter_libraries())
    assert main.is_main and main.bias == 0


def test_libc_symbol_forms(proc_factory, sleeper_pie):
    p = proc_factory([sleeper_pie])
    base, libc_path = base_of(p.pid, "libc.so")
    want = base + nm(libc_path, "getpid", dynamic=True)
    r = SymbolResolver(pid=p.pid)
    for spec in ("libc:getpid", "libc.so.6:getpid", f"{libc_path}:getpid", "getpid"):
        site = r.resolve(spec)
        assert (site.addr, site.lib_path, site.symbol) == (want, libc_path, "getpid"), spec
    assert r.resolve("libc:getpid+0x1").addr == want + 1


def test_raw_address(proc_factory, sleeper_pie):
    p = proc_factory([sleeper_pie])
    r = SymbolResolver(pid=p.pid)
    tick = r.resolve("tick")
    site = r.resolve(f"{tick.addr + 3:#x}")
    assert (site.addr, site.symbol, site.func_addr, site.func_size, site.offset) == \
        (tick.addr + 3, "tick", tick.addr, tick.func_size, 3)
    assert r.find_symbol_for(tick.addr + 3) == ("tick", tick.addr, tick.func_size)


def test_read_code_is_file_bytes(proc_factory, sleeper_pie):
    p = proc_factory([sleeper_pie])
    r = SymbolResolver(pid=p.pid)
    tick = r.resolve("tick")
    data = sleeper_pie.read_bytes()
    assert r.read_code(tick.addr, tick.func_size) == \
        data[tick.file_offset:tick.file_offset + tick.func_size]
    with open(f"/proc/{p.pid}/mem", "rb") as mem:  # unpatched: identical to memory
        mem.seek(tick.addr)
        assert mem.read(tick.func_size) == r.read_code(tick.addr, tick.func_size)


def test_unknown_symbol(proc_factory, sleeper_pie):
    p = proc_factory([sleeper_pie])
    r = SymbolResolver(pid=p.pid)
    with pytest.raises(SymbolError) as ei:
        r.resolve("tikc")
    assert "unknown symbol 'tikc'" in str(ei.value)
    assert sleeper_pie.name in str(ei.value) and "libc.so.6" in str(ei.value)
    assert "tick" in ei.value.candidates
    assert "did you mean" in str(ei.value)


def test_unknown_lib(proc_factory, sleeper_pie):
    p = proc_factory([sleeper_pie])
    with pytest.raises(SymbolError, match="unknown library 'nosuchlib'") as ei:
        SymbolResolver(pid=p.pid).resolve("nosuchlib:getpid")
    assert any(c.endswith("libc.so.6") for c in ei.value.candidates)


def test_shared_library_and_ambiguous_prefix(proc_factory, uselib_pair):
    lib, exe = uselib_pair
    p = proc_factory([exe, "100000000", "100000"], wait_for=(lib.name, "libc.so"))
    base, lib_path = base_of(p.pid, lib.name)
    want = base + nm(lib, "lib_add", dynamic=True)
    r = SymbolResolver(pid=p.pid)
    # The executable's lib_add is undefined (SHN_UNDEF): never a match.
    for spec in ("lib_add", "libdemo:lib_add", f"{lib.name}:lib_add", f"{lib}:lib_add"):
        site = r.resolve(spec)
        assert (site.addr, site.lib_path) == (want, lib_path), spec
    with pytest.raises(SymbolError, match="ambiguous") as ei:
        r.resolve("lib:lib_add")  # libdemo-*.so and libc.so.6
    assert sorted(os.path.basename(c)[:4] for c in ei.value.candidates) == ["libc", "libd"]
    assert [o.name for o in r.iter_libraries()][:3] == [exe.name, lib.name, "libc.so.6"]


def test_not_executable(proc_factory, sleeper_pie):
    p = proc_factory([sleeper_pie])
    r = SymbolResolver(pid=p.pid)
    base, _ = base_of(p.pid, sleeper_pie.name)
    with pytest.raises(SymbolError, match=r"not executable") as ei:
        r.resolve("stdout")  # a data object (libc's FILE *), rw-p
    assert "rw-p" in str(ei.value)
    with pytest.raises(SymbolError, match="not in any mapping"):
        r.resolve("0x10")
    with pytest.raises(SymbolError, match=r"ld-linux-x86-64.so.2 \(r--p\), not executable"):
        r.resolve(f"{r.find_data_symbol('__rseq_offset'):#x}")


def test_past_end(proc_factory, sleeper_pie):
    p = proc_factory([sleeper_pie])
    r = SymbolResolver(pid=p.pid)
    size = r.resolve("tick").func_size
    with pytest.raises(SymbolError) as ei:
        r.resolve("tick+0x400")
    assert str(ei.value) == f"tick+0x400 is past the end of tick (size {size:#x})"
    with pytest.raises(SymbolError, match="past the end"):
        r.resolve(f"tick+{size}")
    assert r.resolve(f"tick+{size - 1}").offset == size - 1


def test_aliases_not_ambiguous(proc_factory, sleeper_pie):
    p = proc_factory([sleeper_pie])
    r = SymbolResolver(pid=p.pid)
    assert r.resolve("malloc").addr == r.resolve("__libc_malloc").addr
    assert r.resolve("memcpy").ifunc == "memcpy"  # the implementation of the IFUNC


def test_rseq_offset(proc_factory, sleeper_pie):
    p = proc_factory([sleeper_pie])
    base, ld_path = base_of(p.pid, "ld-linux-x86-64")
    r = SymbolResolver(pid=p.pid)
    assert r.find_rseq_offset() == base + nm(ld_path, "__rseq_offset", dynamic=True)
    assert r.find_data_symbol("__rseq_offset", lib="ld-linux") == r.find_rseq_offset()
    assert r.find_data_symbol("no_such_thing") is None
    assert r.find_data_symbol("getpid", lib="nosuchlib") is None


def test_ambiguous_local_symbols(tmp_path, proc_factory):
    a, b = tmp_path / "a.c", tmp_path / "b.c"
    a.write_text("#include <unistd.h>\n"
                 "static __attribute__((noipa)) int twin(int x) { return x + 1; }\n"
                 "int fa(int x) { return twin(x); }\n int fb(int);\n"
                 "int main(void) { int s = 0; for (;;) { s += fa(s) + fb(s); pause(); }"
                 " return s; }\n")
    b.write_text("static __attribute__((noipa)) int twin(int x) { return x * 2; }\n"
                 "int fb(int x) { return twin(x); }\n")
    exe = build_c(a, out_dir=tmp_path, flags=[str(b)])
    p = proc_factory([exe])
    with pytest.raises(SymbolError, match="'twin' is ambiguous") as ei:
        SymbolResolver(pid=p.pid).resolve("twin")
    assert len(ei.value.candidates) == 2
    for cand in ei.value.candidates:  # every candidate is itself a valid spec
        assert SymbolResolver(pid=p.pid).resolve(cand).symbol == "twin"


# -- binary mode ----------------------------------------------------------------------

def test_binary_mode(sleeper_pie, sleeper_nopie):
    for exe in (sleeper_pie, sleeper_nopie):
        r = SymbolResolver(binary=str(exe))
        want = nm(exe, "tick")
        site = r.resolve("tick+0x1")
        assert (site.addr, site.func_addr, site.offset, site.lib_path) == \
            (want + 1, want, 1, str(exe))
        code = r.read_code(want, site.func_size)
        assert code == exe.read_bytes()[site.file_offset - 1:
                                         site.file_offset - 1 + site.func_size]
        assert code[-1] == 0xC3 or b"\xc3" in code  # ends in (or contains) ret
        assert r.find_symbol_for(want + 2) == ("tick", want, site.func_size)
        with pytest.raises(SymbolError, match="not executable"):
            r.resolve(f"{nm(exe, 'main') and _data_addr(exe):#x}")
        with pytest.raises(SymbolError, match="unknown symbol"):
            r.resolve("getpid")  # binary mode does not look into libraries


def _data_addr(exe) -> int:
    out = subprocess.run(["nm", "--defined-only", str(exe)], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        val, kind, name = line.split()
        if kind in "dD" and not name.startswith("_"):
            return int(val, 16)
    for line in out.splitlines():
        val, kind, name = line.split()
        if kind in "dD":
            return int(val, 16)
    raise LookupError("no data symbol")


def test_warm_resolve_is_fast(proc_factory, sleeper_pie):
    p = proc_factory([sleeper_pie])
    SymbolResolver(pid=p.pid).resolve("libc:getpid")  # warm the per-file cache
    t = time.perf_counter()
    r = SymbolResolver(pid=p.pid)
    r.resolve("libc:getpid")
    r.resolve("nanosleep")
    assert time.perf_counter() - t < 0.3


# -- versioned names ------------------------------------------------------------------

def _dynsym_versions(path, name) -> dict[str, int]:
    """{'name@VER' or 'name@@VER': value} from readelf --dyn-syms (the oracle)."""
    out = subprocess.run(["readelf", "--dyn-syms", "-W", str(path)], capture_output=True,
                         text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[7].split("@")[0] == name and parts[6] != "UND":
            found[parts[7]] = int(parts[1], 16)
    return found


def test_versioned_names():
    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    versions = _dynsym_versions(libc, "lio_listio")
    if not any("@@" in v for v in versions) or len(set(versions.values())) < 2:
        pytest.skip(f"this libc has no two versions of lio_listio: {versions}")
    r = SymbolResolver(binary=libc)
    default = next(v for k, v in versions.items() if "@@" in k)
    assert r.resolve("lio_listio").addr == default  # the default version, like ld.so
    for spelled, value in versions.items():
        assert r.resolve(spelled).addr == value, spelled
        if "@@" not in spelled:
            continue
        assert r.resolve(spelled.replace("@@", "@")).addr == value  # @ matches it too
    with pytest.raises(SymbolError, match="unknown symbol"):
        r.resolve("lio_listio@@GLIBC_2.2.5")  # not the default version
