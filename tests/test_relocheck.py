"""check-reloc: differential emulation of detours against the original regions.

* a bounded, seeded sample of the machine's libc: no mismatch, and the JSON line shape;
* a handcrafted ELF (top-level asm, so the bytes are exact): exact site/refusal counts;
* negative controls: a detour with a disp32 off by one, and one whose frame overlaps the
  red zone, must be reported as mismatches (the checker can fail);
* xfail(strict) cases for relocator/analysis bugs the checker found (docs/reloc-mismatches.md).
"""
import dataclasses
import json
import os

import pytest

from uprobe_opt import relocheck, x86
from uprobe_opt.cli import main
from uprobe_opt.testing import build_c

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
REAL_BUILD_DETOUR = x86.build_detour     # the negative controls wrap it

HANDCRAFTED = r'''
/* Sites for tests/test_relocheck.py; every byte is fixed by the asm. */
__asm__(
".intel_syntax noprefix\n"
".data\n"
"cvar: .long 41\n"
".text\n"
".globl f_riprel\n.type f_riprel,@function\n"              /* rip-relative load */
"f_riprel: mov eax, dword ptr [rip + cvar]\n add eax, 1\n ret\n"
".size f_riprel, .-f_riprel\n"
".globl f_riprel_alias\n.type f_riprel_alias,@function\n"  /* alias: one site */
".set f_riprel_alias, f_riprel\n.size f_riprel_alias, 10\n"
".globl f_jcc\n.type f_jcc,@function\n"                    /* jcc rel8 first */
"f_jcc: jz 1f\n mov eax, 1\n ret\n1: xor eax, eax\n ret\n"
".size f_jcc, .-f_jcc\n"
".type f_helper,@function\n"                               /* local symbol */
"f_helper: mov eax, 7\n ret\n"
".size f_helper, .-f_helper\n"
".globl f_call\n.type f_call,@function\n"                  /* call first */
"f_call: call f_helper\n add eax, 2\n ret\n"
".size f_call, .-f_call\n"
".globl f_loop\n.type f_loop,@function\n"                  /* loop rel8 first */
"f_loop: loop 1f\n mov eax, 1\n1: ret\n"
".size f_loop, .-f_loop\n"
".globl f_short\n.type f_short,@function\n"                /* FUNCTION_TOO_SHORT */
"f_short: ret\n"
".size f_short, .-f_short\n"
".globl f_into\n.type f_into,@function\n"                  /* JUMP_INTO_RANGE */
"f_into: xor eax, eax\n1: inc eax\n cmp eax, edi\n jl 1b\n ret\n"
".size f_into, .-f_into\n"
".globl f_indirect\n.type f_indirect,@function\n"          /* INDIRECT_JUMP */
"f_indirect: lea rax, [rip + 1f]\n jmp rax\n1: ret\n"
".size f_indirect, .-f_indirect\n"
".globl f_syscall\n.type f_syscall,@function\n"            /* syscall last: stop at it */
"f_syscall: xor edi, edi\n nop\n syscall\n ret\n"
".size f_syscall, .-f_syscall\n"
".globl f_rdtsc\n.type f_rdtsc,@function\n"                /* skipped: nondeterministic */
"f_rdtsc: rdtsc\n shl rdx, 32\n or rax, rdx\n ret\n"
".size f_rdtsc, .-f_rdtsc\n"
".globl f_endbr\n.type f_endbr,@function\n"                /* site after endbr64 */
"f_endbr: endbr64\n mov rax, qword ptr [rip + cvar]\n ret\n"
".size f_endbr, .-f_endbr\n"
".globl f_callreg_mid\n.type f_callreg_mid,@function\n"    /* NOT_RELOCATABLE */
"f_callreg_mid: xor eax, eax\n call rdi\n nop\n ret\n"
".size f_callreg_mid, .-f_callreg_mid\n"
".globl f_redzone\n.type f_redzone,@function\n"            /* red-zone user */
"f_redzone: mov qword ptr [rsp - 8], rdi\n mov rax, qword ptr [rsp - 8]\n ret\n"
".size f_redzone, .-f_redzone\n"
".att_syntax prefix\n");
'''


@pytest.fixture(scope="module")
def handcrafted(tmp_path_factory):
    src = tmp_path_factory.mktemp("relocheck") / "handcrafted.c"
    src.write_text(HANDCRAFTED)
    return str(build_c(src, shared=True, flags=["-nostdlib"]))


def run_cli(capsys, *argv):
    status = main(["check-reloc", *argv])
    out = capsys.readouterr().out
    return status, [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# -- real binaries ----------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists(LIBC), reason="no libc.so.6 at the Debian path")
def test_libc_sample_has_no_mismatch(capsys):
    status, lines = run_cli(capsys, LIBC, "--sites", "300", "--seed", "7", "--json")
    last = lines[-1]
    assert set(last) >= {"event", "file", "sites", "optimizable", "mismatches", "refusals"}
    assert last["event"] == "reloc-check" and last["file"] == LIBC
    assert last["sites"] == 300
    assert 0 < last["optimizable"] <= 300
    assert all(isinstance(k, str) and v > 0 for k, v in last["refusals"].items())
    assert set(last["refusals"]) <= {r.name for r in x86.Reason}
    assert last["optimizable"] + sum(last["refusals"].values()) == last["sites"]
    mismatches = [ln for ln in lines if ln["event"] == "reloc-mismatch"]
    assert last["mismatches"] == 0, json.dumps(mismatches, indent=1)
    assert status == 0
    assert last["checked"] >= 0.8 * last["optimizable"]      # most are really emulated


# -- handcrafted ------------------------------------------------------------------------
def test_handcrafted_exact_counts(handcrafted):
    report = relocheck.check_file(handcrafted, seed=1)
    assert report.functions == 13            # f_riprel_alias collapses into f_riprel
    assert report.sites == 13
    assert report.optimizable == 9
    assert dict(report.refusals) == {"FUNCTION_TOO_SHORT": 1, "JUMP_INTO_RANGE": 1,
                                     "INDIRECT_JUMP": 1, "NOT_RELOCATABLE": 1}
    assert dict(report.skipped) == {"nondeterministic": 1}        # f_rdtsc
    assert report.checked == 8 and report.states == 8 * 4
    assert report.mismatches == []


def test_handcrafted_sites_after_endbr_and_all_boundaries(handcrafted):
    image = relocheck.CodeImage(handcrafted)
    funcs = {f.name: f for f in relocheck.iter_functions(image)}
    sites = relocheck.find_sites(image, funcs.values())
    assert funcs["f_endbr"].addr + 4 in {s.addr for s in sites}
    assert funcs["f_endbr"].addr not in {s.addr for s in sites}
    report = relocheck.check_file(handcrafted, seed=1, all_boundaries=True, num_states=2)
    assert report.sites == 42                # every instruction start of every function
    assert report.optimizable == 15 and report.mismatches == []


def test_json_text_and_exit_status(handcrafted, capsys):
    status, lines = run_cli(capsys, handcrafted, "--json", "--seed", "3")
    assert status == 0 and len(lines) == 1
    assert lines[0]["sites"] == 13 and lines[0]["optimizable"] == 9
    assert main(["check-reloc", handcrafted, "--states", "1"]) == 0
    out = capsys.readouterr().out
    assert "optimizable 9 (69.2%)" in out and "JUMP_INTO_RANGE" in out


def test_deterministic_given_seed(handcrafted):
    a = relocheck.check_file(handcrafted, seed=5, all_boundaries=True, sites=20)
    b = relocheck.check_file(handcrafted, seed=5, all_boundaries=True, sites=20)
    assert a.to_json() | {"seconds": 0} == b.to_json() | {"seconds": 0}


# -- negative controls: the checker can fail ---------------------------------------------------
def _corrupt_disp(region, slot_addr, handler):
    """build_detour, then add 1 to the disp32 of the first relocated RIP-relative operand."""
    detour = REAL_BUILD_DETOUR(region, slot_addr, handler)
    if isinstance(detour, x86.Refusal):
        return detour
    off = detour.reloc_addr - detour.slot_addr
    for insn in x86.decode(detour.code[off:], detour.reloc_addr):
        if insn.rip_disp_offset is not None:
            pos = insn.addr - detour.slot_addr + insn.rip_disp_offset
            code = bytearray(detour.code)
            code[pos] = (code[pos] + 1) & 0xFF
            return dataclasses.replace(detour, code=bytes(code))
    return detour


def _frame_in_red_zone(region, slot_addr, handler):
    """build_detour whose first instruction skips only 64 of the 128 red-zone bytes."""
    detour = REAL_BUILD_DETOUR(region, slot_addr, handler)
    if isinstance(detour, x86.Refusal):
        return detour
    lea128 = bytes.fromhex("488d642480")            # lea rsp, [rsp-128] (disp8)
    assert detour.code.startswith(lea128)
    code = bytes.fromhex("488d6424c0") + detour.code[len(lea128):]    # lea rsp, [rsp-64]
    return dataclasses.replace(detour, code=code)


def test_negative_control_wrong_displacement(handcrafted, monkeypatch, capsys):
    report = relocheck.check_file(handcrafted, seed=1, builder=_corrupt_disp)
    bad = {m.func for m in report.mismatches}
    assert bad == {"f_riprel", "f_endbr"}
    m = next(m for m in report.mismatches if m.func == "f_riprel")
    assert m.region.hex().startswith("8b05") and any(d.startswith("reads:") for d in m.diffs)
    assert any(d.startswith("rax:") for d in m.diffs)
    # through the CLI: the same wrong relocator makes the exit status 1
    monkeypatch.setattr(x86, "build_detour", _corrupt_disp)
    status, lines = run_cli(capsys, handcrafted, "--json")
    assert status == 1 and lines[-1]["mismatches"] >= 2
    assert lines[0]["event"] == "reloc-mismatch" and lines[0]["bytes"]


def test_negative_control_red_zone_clobber(handcrafted):
    report = relocheck.check_file(handcrafted, seed=1, builder=_frame_in_red_zone)
    assert report.mismatches and len({m.func for m in report.mismatches}) == report.checked
    diffs = [d for m in report.mismatches for d in m.diffs]
    assert any("red zone" in d for d in diffs)
    assert any(d.startswith("rsp:") for d in diffs)


def _jump_back_off_by_one(region, slot_addr, handler):
    """build_detour whose final jmp rel32 (back to addr+len) lands one byte further."""
    detour = REAL_BUILD_DETOUR(region, slot_addr, handler)
    if isinstance(detour, x86.Refusal) or detour.code[-5] != 0xE9:
        return detour
    rel = int.from_bytes(detour.code[-4:], "little", signed=True) + 1
    return dataclasses.replace(detour, code=detour.code[:-4] + rel.to_bytes(4, "little", signed=True))


def test_negative_control_wrong_jump_back(handcrafted):
    report = relocheck.check_file(handcrafted, seed=1, builder=_jump_back_off_by_one)
    m = next(m for m in report.mismatches if m.func == "f_redzone")
    assert any(d.startswith("next: original exit") for d in m.diffs), m.diffs


# -- synthetic sites (check_code): exact bytes at an exact address ----------------------------
FUNC = 0x100000000
SLOT_FAR = FUNC + 0x7FFFFD00   # near +2 GiB: data at FUNC-0x2000 is out of disp32 reach


def test_emulator_riprel_bug_is_skipped_not_a_mismatch():
    """unicorn/QEMU reads shld/shrd [rip+disp], r, imm8 one byte low; the checker must
    notice (the scratch-register relocation is right) and skip the site."""
    code = bytes.fromhex("480fac15f7dfffff03") + b"\x90" * 5 + b"\xc3"   # shrd [rip-0x2009], rdx, 3
    r = relocheck.check_code(code, FUNC, slots=[SLOT_FAR], seed=1)
    assert r.skipped and "wrong RIP-relative address" in r.skipped and not r.mismatches


@pytest.mark.parametrize("code", [
    bytes.fromhex("8b05fadfffff"),             # mov eax, [rip-0x2006]
    bytes.fromhex("f00fb10df9dfffff"),         # lock cmpxchg [rip-0x2007], ecx
    bytes.fromhex("48813df3dfffff78563412"),   # cmp qword ptr [rip-0x200d], 0x12345678
])
def test_faulting_riprel_far_slot_refused_then_near_slot_checked(code):
    """Memory-touching RIP-relative operands beyond disp32 reach of the slot are
    refused in a detour (a fault inside a scratch rewrite would show wrong registers);
    the checker then proves them at a slot in reach."""
    r = relocheck.check_code(code + b"\x90" * 5 + b"\xc3", FUNC, slots=[SLOT_FAR], seed=2)
    assert "RIPREL_OUT_OF_RANGE" in r.slot_refusals
    assert r.states == 4 and not r.mismatches, r.mismatches


def test_scratch_register_rewrite_far_slot_for_lea():
    """lea never faults: beyond reach it is relocated through a scratch register."""
    code = bytes.fromhex("488d05f9dfffff")      # lea rax, [rip-0x2007]
    r = relocheck.check_code(code + b"\x90" * 5 + b"\xc3", FUNC, slots=[SLOT_FAR], seed=2)
    assert r.states == 4 and not r.mismatches and not r.slot_refusals, r.mismatches


def test_fault_in_scratch_rewrite_shows_original_registers():
    """docs/reloc-mismatches.md #1, fixed: a faulting RIP-relative form beyond reach of
    the slot is refused (a fault inside a scratch-register rewrite would show the
    scratch register and rsp-0x88 to the signal handler); near slots still work."""
    code = bytes.fromhex("f735fadfffff") + b"\x90" * 5 + b"\xc3"        # div dword ptr [rip-0x2006]
    r = relocheck.check_code(code, FUNC, slots=[SLOT_FAR], seed=1)
    assert "RIPREL_OUT_OF_RANGE" in r.slot_refusals
    assert r.states == 4 and not r.mismatches


@pytest.mark.parametrize("name,code", [
    ("rep stosb first (repeats in place)", bytes.fromhex("f3aa31c031d2")),
    ("jz rel8 back to the start", bytes.fromhex("31c031d274fa")),
    ("loop forward", bytes.fromhex("e205b801000000")),
    ("jrcxz forward", bytes.fromhex("e305b801000000")),
    ("call rel32 far back", bytes.fromhex("31c0e8f9cfffff")),
    ("call [rsp+rcx*8+0x78]", bytes.fromhex("31c9ff54cc78")),
    ("push rbx; lea rax, [rip-far] (scratch below the red zone)", bytes.fromhex("53488d05f0cfffff")),
    ("pop rbx; lea rax, [rip-far]", bytes.fromhex("5b488d05f0cfffff")),
    ("syscall last (stop at it)", bytes.fromhex("31ff900f05")),
])
@pytest.mark.parametrize("slot", [SLOT_FAR, FUNC + 0x1000000, FUNC - 0x7FFFF000])
def test_control_flow_and_stack_shapes(name, code, slot):
    r = relocheck.check_code(code + b"\x90" * 8 + b"\xc3", FUNC, slots=[slot], seed=3)
    assert r.refusal is None and r.skipped is None
    assert r.states == 4 and not r.mismatches, r.mismatches[0].render()
