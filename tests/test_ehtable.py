"""ehtable.py: C++ landing pads from .eh_frame + .gcc_except_table, checked exactly
against independent ground truth:

* hand-written LSDAs in top-level asm whose landing pads are global symbols (``nm``),
  covering udata4 / uleb128 call sites, an explicit pcrel LPStart, a TType table,
  lp == 0 records and shared pads;
* g++-generated code: the call-site tables of ``g++ -S`` output (``.uleb128 .L13-.LFB7``)
  resolved through the labels the assembler keeps with ``-Wa,-L`` (``nm -a``), hot and
  ``.cold`` parts alike;
* the hz_cxx_throw target, a C program (no pads), corrupted copies (skip + count), and
  libstdc++ (timed).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from uprobe_opt import ehtable
from uprobe_opt.testing import DEFAULT_FLAGS, build_c, source_flags, targets_dir

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

LIBSTDCXX = Path("/usr/lib/x86_64-linux-gnu/libstdc++.so.6")


# -- helpers --------------------------------------------------------------------------

def nm_all(path) -> dict[str, int]:
    """Every defined symbol (local labels too, when kept with -Wa,-L)."""
    out = subprocess.run(["nm", "-a", "--defined-only", str(path)], capture_output=True,
                         text=True, check=True).stdout
    syms: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms.setdefault(parts[2], int(parts[0], 16))
    return syms


def nm_sized(path, name) -> tuple[int, int]:
    out = subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3] == name:
            return int(parts[0], 16), int(parts[1], 16)
    raise LookupError(name)


def asm_call_site_pads(source: Path, flags: list[str], tmp_path: Path) -> dict[str, list[str]]:
    """Compile ``source`` to assembly with the flags build_c uses and read its LSDAs:
    ``{function start label: [landing pad labels]}``.  GCC names the LSDA of function
    number N ``.LLSDA<N>`` (hot part, starts at ``.LFB<N>``) and ``.LLSDAC<N>`` (cold
    part, starts at ``.LFSB<N>``); each call-site record is four ``.uleb128`` lines:
    start, length, landing pad (``0`` or ``.LX-.LBASE``), action."""
    src = source.read_bytes()
    asm = tmp_path / (source.stem + ".s")
    subprocess.run(["g++", *DEFAULT_FLAGS, *source_flags(src), *flags, "-S", "-o", str(asm),
                    str(source)], check=True)
    result: dict[str, list[str]] = {}
    func = None
    fields: list[str] | None = None
    for raw in asm.read_text().splitlines():
        line = raw.strip()
        m = re.fullmatch(r"\.LLSDA(C?)(\d+):", line)
        if m:
            func = (".LFSB" if m.group(1) else ".LFB") + m.group(2)
            continue
        if re.fullmatch(r"\.LLSDACSBC?\d+:", line):
            fields = []
            continue
        if re.fullmatch(r"\.LLSDACSEC?\d+:", line):
            assert fields is not None and len(fields) % 4 == 0, fields
            pads = {f.split("-")[0] for f in fields[2::4] if f != "0"}
            if pads:
                result[func] = sorted(pads)
            fields = None
            continue
        if fields is not None:
            m = re.fullmatch(r"\.uleb128\s+(\S+)", line)
            assert m, f"unexpected call-site line {line!r} (not uleb128 call sites?)"
            fields.append(m.group(1))
    return result


def resolve(truth: dict[str, list[str]], syms: dict[str, int]) -> dict[int, tuple[int, ...]]:
    return {syms[f]: tuple(sorted({syms[p] for p in pads})) for f, pads in truth.items()}


def file_offset(path, vaddr) -> int:
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        for sec in ELFFile(f).iter_sections():
            if sec["sh_addr"] <= vaddr < sec["sh_addr"] + sec["sh_size"] and sec["sh_type"] != "SHT_NOBITS":
                return vaddr - sec["sh_addr"] + sec["sh_offset"]
    raise LookupError(hex(vaddr))


def patch(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    blob = bytearray(src.read_bytes())
    blob[offset:offset + len(data)] = data
    dst.write_bytes(bytes(blob))
    return dst


# -- hand-written LSDAs ---------------------------------------------------------------

LABELED_CC = r'''
// Hand-written LSDAs; every landing pad is a global symbol.  Parsed, never run.
extern "C" void ext_throw(int x) { if (x) throw x; }
// Makes g++ emit DW.ref.__gxx_personality_v0 in this TU.
__attribute__((noinline)) int anchor(int x) { try { ext_throw(x); } catch (...) { return 1; } return 0; }

__asm__(R"ASM(
    .text
    .p2align 4
    .globl eh_a
    .type eh_a,@function
eh_a:                           # LPStart omitted, no TType, udata4 call sites
    .cfi_startproc
    .cfi_personality 0x9b,DW.ref.__gxx_personality_v0
    .cfi_lsda 0x1b,eh_a_lsda
    sub $8,%rsp
    .cfi_def_cfa_offset 16
.La_cs1:
    call ext_throw
.La_cs1e:
    nop
.La_cs2:
    call ext_throw
.La_cs2e:
    nop
.La_cs3:
    call ext_throw
.La_cs3e:
    add $8,%rsp
    .cfi_def_cfa_offset 8
    ret
    .cfi_def_cfa_offset 16
    .globl eh_a_pad1
eh_a_pad1:
    nop
    .globl eh_a_pad2
eh_a_pad2:
    add $8,%rsp
    .cfi_def_cfa_offset 8
    ret
    .cfi_endproc
    .size eh_a, .-eh_a

    .p2align 4
    .globl eh_b
    .type eh_b,@function
eh_b:                           # explicit pcrel LPStart, TType table, uleb128 call sites
    .cfi_startproc
    .cfi_personality 0x9b,DW.ref.__gxx_personality_v0
    .cfi_lsda 0x1b,eh_b_lsda
    sub $8,%rsp
    .cfi_def_cfa_offset 16
.Lb_cs1:
    call ext_throw
.Lb_cs1e:
    add $8,%rsp
    .cfi_def_cfa_offset 8
    ret
    .cfi_def_cfa_offset 16
    .globl eh_b_lpbase
eh_b_lpbase:
    nop
    nop
    .globl eh_b_pad1
eh_b_pad1:
    add $8,%rsp
    .cfi_def_cfa_offset 8
    ret
    .cfi_endproc
    .size eh_b, .-eh_b

    .p2align 4
    .globl eh_c
    .type eh_c,@function
eh_c:                           # an LSDA whose call sites have no landing pad
    .cfi_startproc
    .cfi_personality 0x9b,DW.ref.__gxx_personality_v0
    .cfi_lsda 0x1b,eh_c_lsda
    sub $8,%rsp
    .cfi_def_cfa_offset 16
.Lc_cs1:
    call ext_throw
.Lc_cs1e:
    add $8,%rsp
    .cfi_def_cfa_offset 8
    ret
    .cfi_endproc
    .size eh_c, .-eh_c

    .section .gcc_except_table,"a",@progbits
    .globl eh_a_lsda
eh_a_lsda:
    .byte 0xff                  # LPStart: omitted -> function start
    .byte 0xff                  # TType: omitted
    .byte 0x03                  # call sites: DW_EH_PE_udata4
    .uleb128 .La_cse-.La_csb
.La_csb:
    .long .La_cs1-eh_a, .La_cs1e-.La_cs1, eh_a_pad1-eh_a
    .uleb128 0
    .long .La_cs1e-eh_a, .La_cs2-.La_cs1e, 0
    .uleb128 0
    .long .La_cs2-eh_a, .La_cs2e-.La_cs2, eh_a_pad2-eh_a
    .uleb128 0
    .long .La_cs3-eh_a, .La_cs3e-.La_cs3, eh_a_pad1-eh_a
    .uleb128 0
.La_cse:

    .p2align 2
    .globl eh_b_lsda
eh_b_lsda:
    .byte 0x1b                  # LPStart: DW_EH_PE_pcrel|sdata4
    .long eh_b_lpbase-.
    .byte 0x9b                  # TType: indirect|pcrel|sdata4, uleb offset
    .uleb128 .Lb_tt-.Lb_ttd
.Lb_ttd:
    .byte 0x01                  # call sites: DW_EH_PE_uleb128
    .uleb128 .Lb_cse-.Lb_csb
.Lb_csb:
    .uleb128 .Lb_cs1-eh_b
    .uleb128 .Lb_cs1e-.Lb_cs1
    .uleb128 eh_b_pad1-eh_b_lpbase
    .uleb128 1
    .uleb128 .Lb_cs1e-eh_b
    .uleb128 1
    .uleb128 0                  # lp == 0: no landing pad (even with an LPStart)
    .uleb128 0
.Lb_cse:
    .byte 1, 0                  # action table: catch type 1, end
    .p2align 2
    .long 0                     # type 1: catch (...)
.Lb_tt:

    .globl eh_c_lsda
eh_c_lsda:
    .byte 0xff, 0xff, 0x01
    .uleb128 .Lc_cse-.Lc_csb
.Lc_csb:
    .uleb128 .Lc_cs1-eh_c
    .uleb128 .Lc_cs1e-.Lc_cs1
    .uleb128 0
    .uleb128 0
.Lc_cse:
    .text
)ASM");

int main(int argc, char **) { return anchor(argc); }
'''


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    src = tmp_path_factory.mktemp("eh") / "eh_labeled.cc"
    src.write_text(LABELED_CC)
    binary = build_c(src)
    return binary, nm_all(binary)


def test_hand_written_lsdas_exact(labeled):
    binary, s = labeled
    pads = ehtable.landing_pads(binary)
    # eh_a: udata4 records, pad1 shared by two call sites, a record with lp == 0
    assert pads[s["eh_a"]] == (s["eh_a_pad1"], s["eh_a_pad2"])
    # sub(4) call(5) nop call(5) nop call(5) add(4) ret -> pad1 at +0x1a
    assert s["eh_a_pad1"] == s["eh_a"] + 0x1a and s["eh_a_pad2"] == s["eh_a"] + 0x1b
    # eh_b: pads relative to the explicit LPStart, not to the function start
    assert pads[s["eh_b"]] == (s["eh_b_pad1"],)
    assert s["eh_b_pad1"] == s["eh_b_lpbase"] + 2
    # eh_c: an LSDA without pads is not listed
    assert s["eh_c"] not in pads
    # anchor (g++ code) has its catch pad (in its .cold part at -O2); nothing else has one
    anchor = s.get("_Z6anchori.cold", s["_Z6anchori"])
    assert set(pads) == {s["eh_a"], s["eh_b"], anchor}
    st = ehtable.stats(binary)
    assert st["bad_fdes"] == 0 and st["bad_lsdas"] == 0 and st["unparsed"] == ()
    assert st["fdes_with_lsda"] >= 4 and st["reason"] is None


def test_landing_pads_in_range(labeled):
    binary, s = labeled
    a_lo, a_size = nm_sized(binary, "eh_a")
    assert ehtable.landing_pads_in(binary, a_lo, a_lo + a_size) == [s["eh_a_pad1"], s["eh_a_pad2"]]
    assert ehtable.landing_pads_in(binary, a_lo, s["eh_a_pad2"]) == [s["eh_a_pad1"]]  # [lo, hi)
    assert ehtable.landing_pads_in(binary, s["eh_a_pad2"], s["eh_a_pad2"] + 1) == [s["eh_a_pad2"]]
    c_lo, c_size = nm_sized(binary, "eh_c")
    assert ehtable.landing_pads_in(binary, c_lo, c_lo + c_size) == []
    assert not ehtable.unparsed_in(binary, c_lo, c_lo + c_size)


def test_corrupt_lsda_skipped_and_counted(labeled, tmp_path):
    binary, s = labeled
    # eh_c's call-site encoding byte -> 0x0f (no such value format)
    bad = patch(binary, tmp_path / "bad_lsda", file_offset(binary, s["eh_c_lsda"]) + 2, b"\x0f")
    pads = ehtable.landing_pads(bad)
    assert pads == ehtable.landing_pads(binary)          # eh_c had none; others intact
    st = ehtable.stats(bad)
    assert st["bad_lsdas"] == 1 and st["bad_fdes"] == 0
    assert st["unparsed"] == (s["eh_c"],)
    c_lo, c_size = nm_sized(binary, "eh_c")
    assert ehtable.unparsed_in(bad, c_lo, c_lo + c_size)
    a_lo, a_size = nm_sized(binary, "eh_a")
    assert not ehtable.unparsed_in(bad, a_lo, a_lo + a_size)

    # eh_a's call-site table length -> far past the section end
    bad2 = patch(binary, tmp_path / "bad_lsda2", file_offset(binary, s["eh_a_lsda"]) + 3,
                 b"\xff\xff\x7f")
    pads2 = ehtable.landing_pads(bad2)
    assert s["eh_a"] not in pads2 and pads2[s["eh_b"]] == (s["eh_b_pad1"],)
    assert ehtable.stats(bad2)["unparsed"] == (s["eh_a"],)


def test_corrupt_fde_skipped_and_counted(labeled, tmp_path):
    binary, s = labeled
    # readelf (independent parser) gives the .eh_frame offset of eh_b's FDE
    frames = subprocess.run(["readelf", "-wf", str(binary)], capture_output=True, text=True,
                            check=True).stdout
    m = re.search(r"^([0-9a-f]+) [0-9a-f]+ [0-9a-f]+ FDE cie=[0-9a-f]+ pc=0*%x\.\." % s["eh_b"],
                  frames, re.M)
    assert m, frames[:2000]
    from elftools.elf.elffile import ELFFile
    with open(binary, "rb") as f:
        eh = ELFFile(f).get_section_by_name(".eh_frame")
        eh_off = eh["sh_offset"]
    # CIE pointer -> points before the section start
    bad = patch(binary, tmp_path / "bad_fde", eh_off + int(m.group(1), 16) + 4,
                (0x7FFFFFF0).to_bytes(4, "little"))
    pads = ehtable.landing_pads(bad)
    good = ehtable.landing_pads(binary)
    assert s["eh_b"] not in pads
    assert pads == {k: v for k, v in good.items() if k != s["eh_b"]}
    st = ehtable.stats(bad)
    assert st["bad_fdes"] == 1 and st["bad_fde_offsets"] == (int(m.group(1), 16),)
    assert ehtable.unparsed_in(bad, 0, 1)   # unknown function: everything is suspect


# -- g++-generated tables -------------------------------------------------------------

GXX_CC = r'''
#include <cstdio>
#include <stdexcept>
#include <string>

struct Guard {
    int id;
    explicit Guard(int i) : id(i) {}
    ~Guard() { std::printf("release %d\n", id); }
};

__attribute__((noinline)) void may_throw(int x)
{
    if (x > 100)
        throw std::runtime_error("big");
}

__attribute__((noinline)) int with_catch(int x)
{
    try {
        may_throw(x);
        return 0;
    } catch (const std::runtime_error &) {
        return 1;
    } catch (...) {
        return 2;
    }
}

__attribute__((noinline)) int with_cleanup(int x)      // destructor-only pads
{
    Guard a(1);
    may_throw(x);
    Guard b(2);
    may_throw(x + 1);
    return x;
}

__attribute__((noinline)) int both(int x)
{
    std::string s("abc");
    try {
        Guard g(3);
        may_throw(x);
    } catch (...) {
        s += "x";
    }
    may_throw(x * 2);
    return (int)s.size();
}

int main(int argc, char **)
{
    int r = with_catch(argc) + both(argc);
    try { r += with_cleanup(argc * 200); } catch (...) { r++; }
    std::printf("%d\n", r);
    return 0;
}
'''


@pytest.mark.parametrize("flags", [["-Wa,-L"], ["-Wa,-L", "-O0"],
                                   ["-Wa,-L", "-fno-reorder-blocks-and-partition"]],
                         ids=["O2", "O0", "no-partition"])
def test_gxx_tables_match_assembly(tmp_path, flags):
    src = tmp_path / "eh_gxx.cc"
    src.write_text(GXX_CC)
    binary = build_c(src, flags=flags)
    truth = asm_call_site_pads(src, flags, tmp_path)
    syms = nm_all(binary)
    expected = resolve(truth, syms)
    assert len(expected) >= 4          # with_catch, with_cleanup, both, main (+ .cold parts)
    assert ehtable.landing_pads(binary) == expected
    # every function's pads lie in that function's own FDE range ...
    for fn in ("_Z10with_catchi", "_Z12with_cleanupi", "_Z4bothi", "main"):
        lo, size = nm_sized(binary, fn)
        in_fn = ehtable.landing_pads_in(binary, lo, lo + size)
        assert in_fn == sorted(p for f, ps in expected.items() for p in ps if lo <= p < lo + size)
    # ... and the destructor-only function has cleanup pads too
    lo, size = nm_sized(binary, "_Z12with_cleanupi")
    cold = syms.get("_Z12with_cleanupi.cold")
    assert ehtable.landing_pads_in(binary, lo, lo + size) or (
        cold is not None and ehtable.landing_pads_in(binary, cold, cold + 0x100))
    st = ehtable.stats(binary)
    assert st["bad_fdes"] == st["bad_lsdas"] == 0


def test_pad_refuses_region(labeled):
    """End to end with the x86 analysis: a region straddling a landing pad is refused
    only when the pads are passed as extra_targets.  (In g++ code a pad usually follows
    a ret or jmp, which ends a region anyway; eh_a's pad2 follows a nop, pad1.)"""
    from uprobe_opt.x86.analysis import Region, can_optimize
    from uprobe_opt.x86.refusal import Reason, Refusal
    binary, s = labeled
    lo, size = nm_sized(binary, "eh_a")
    off = file_offset(binary, lo)
    code = Path(binary).read_bytes()[off:off + size]
    pads = ehtable.landing_pads_in(binary, lo, lo + size)
    probe = s["eh_a_pad1"]                  # nop; add $8,%rsp -> 5-byte region
    plain = can_optimize(code, lo, size, probe)
    assert isinstance(plain, Region) and plain.addr < s["eh_a_pad2"] < plain.end
    refused = can_optimize(code, lo, size, probe, extra_targets=pads)
    assert isinstance(refused, Refusal)
    assert refused.reason == Reason.JUMP_INTO_RANGE and refused.addr == s["eh_a_pad2"]
    # a pad at the region start is fine (entered at an instruction boundary we keep)
    assert isinstance(can_optimize(code, lo, size, s["eh_a_pad2"], extra_targets=pads), Region)


# -- the hz_cxx_throw target ----------------------------------------------------------

def test_hz_cxx_throw(tmp_path):
    source = targets_dir() / "hz_cxx_throw.cc"
    binary = build_c(source)
    pads = ehtable.landing_pads(binary)
    # the probed function and its stub are plain asm: no LSDA, no pad inside them
    for fn in ("call_first", "thrower_stub"):
        lo, size = nm_sized(binary, fn)
        assert ehtable.landing_pads_in(binary, lo, lo + size) == []
        assert lo not in pads
    # main's try/catch around call_first: its catch pad is in main (or main.cold)
    m_lo, m_size = nm_sized(binary, "main")
    syms = nm_all(binary)
    main_pads = ehtable.landing_pads_in(binary, m_lo, m_lo + m_size)
    cold = syms.get("main.cold")
    cold_pads = pads.get(cold, ()) if cold is not None else ()
    assert main_pads or cold_pads
    assert set(main_pads) <= set(pads.get(m_lo, ()))
    # exact values: the same target built with local labels kept, against its assembly
    flags = ["-Wa,-L"]
    labeled = build_c(source, flags=flags)
    expected = resolve(asm_call_site_pads(source, flags, tmp_path), nm_all(labeled))
    assert ehtable.landing_pads(labeled) == expected
    # kept labels only add symbols: the unlabeled build has the very same pads
    assert pads == expected


# -- files without pads ---------------------------------------------------------------

C_SRC = r'''
#include <stdio.h>
static int work(int x) { return x * 3 + 1; }
int main(int argc, char **argv) { printf("%d\n", work(argc)); return 0; }
'''


def test_c_program_has_no_pads(tmp_path):
    src = tmp_path / "plain.c"
    src.write_text(C_SRC)
    binary = build_c(src)
    assert ehtable.landing_pads(binary) == {}
    assert ehtable.landing_pads_in(binary, 0, 1 << 64) == []
    st = ehtable.stats(binary)
    assert st["reason"] == "no .gcc_except_table" and st["bad_fdes"] == 0


def test_not_elf_and_truncated(tmp_path, labeled):
    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\necho hi\n")
    assert ehtable.landing_pads(text) == {}
    assert ehtable.landing_pads_in(text, 0, 1 << 64) == []
    assert "not a readable ELF" in ehtable.stats(text)["reason"]
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert ehtable.landing_pads(empty) == {}
    binary, _ = labeled
    blob = Path(binary).read_bytes()
    for cut in (64, 4096, len(blob) // 2):
        trunc = tmp_path / f"trunc{cut}"
        trunc.write_bytes(blob[:cut])
        assert isinstance(ehtable.landing_pads(trunc), dict)   # no exception
        ehtable.stats(trunc)
    with pytest.raises(OSError):
        ehtable.landing_pads(tmp_path / "missing")


def test_cache_follows_file_changes(tmp_path, labeled):
    binary, s = labeled
    copy = tmp_path / "copy"
    shutil.copy(binary, copy)
    first = ehtable.landing_pads(copy)
    t0 = time.perf_counter()
    for _ in range(1000):
        ehtable.landing_pads_in(copy, 0, 1 << 64)
    assert time.perf_counter() - t0 < 0.5           # cached: no reparse per call
    # rewritten in place with different content -> reparsed
    c_src = tmp_path / "plain.c"
    c_src.write_text(C_SRC)
    shutil.copy(build_c(c_src), copy)
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert first and ehtable.landing_pads(copy) == {}


# -- libstdc++ ------------------------------------------------------------------------

@pytest.mark.skipif(not LIBSTDCXX.exists(), reason="no libstdc++.so.6")
def test_libstdcxx(tmp_path):
    # a private copy so this test times a real (uncached) parse
    lib = tmp_path / "libstdc++.so.6"
    shutil.copy(LIBSTDCXX, lib)
    t0 = time.perf_counter()
    pads = ehtable.landing_pads(lib)
    elapsed = time.perf_counter() - t0
    st = ehtable.stats(lib)
    print(f"libstdc++: {st['fdes']} FDEs, {st['fdes_with_lsda']} with LSDA, "
          f"{len(pads)} functions with {st['landing_pads']} pads in {elapsed:.3f}s")
    assert len(pads) > 100 and st["landing_pads"] > 100
    assert st["bad_fdes"] == 0 and st["bad_lsdas"] == 0
    assert elapsed < 5.0
    t0 = time.perf_counter()
    ehtable.landing_pads(lib)
    assert time.perf_counter() - t0 < 0.05
    # every pad of a function lies within that function's FDE range per readelf: check
    # a sample against readelf's FDE list (independent .eh_frame parser)
    frames = subprocess.run(["readelf", "-wf", str(lib)], capture_output=True, text=True,
                            check=True).stdout
    ranges = {int(a, 16): int(b, 16) for a, b in
              re.findall(r"FDE cie=[0-9a-f]+ pc=([0-9a-f]+)\.\.([0-9a-f]+)", frames)}
    assert set(pads) <= set(ranges)
    for start, ps in pads.items():
        assert all(start <= p < ranges[start] for p in ps), hex(start)
