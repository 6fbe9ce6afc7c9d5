"""Exits of a function (return probes): finding them, their regions, exit detours.
Pure x86 on hand-assembled bytes, plus the differential emulation of exit detours."""
import os

import pytest

from uprobe_opt import relocheck, x86
from uprobe_opt.x86 import lean
from uprobe_opt.x86 import (HandlerSpec, Reason, Region, build_exit_detour,
                            can_optimize_exit, decode, find_exits)
from uprobe_opt.x86.writer import TrampolineWriter

F = 0x401000
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"


def asm(text: str, addr: int = F) -> bytes:
    w = TrampolineWriter(addr)
    for line in text.strip().split(";"):
        w.put_asm(line.strip())
    return w.finish()


# push rbx; test edi, edi; je L (+8); mov eax, 1; pop rbx; ret; L: xor eax, eax; pop rbx;
# ret; jmp 0x402000 (tail call out of the function)
TWO_RETS = bytes.fromhex("53" "85ff" "7407" "b801000000" "5b" "c3" "31c0" "5b" "c3"
                         "e9") + (0x402000 - (F + 21)).to_bytes(4, "little", signed=True)


def test_find_exits_rets_and_tail_call():
    exits, notes = find_exits(TWO_RETS, F, len(TWO_RETS))
    assert [(e.addr - F, e.kind) for e in exits] == [(11, "ret"), (15, "ret"), (16, "tail")]
    assert exits[2].target == 0x402000 and notes == []
    assert exits[0].describe(F, "f") == "ret at f+0xb"
    assert exits[2].describe(F, "f") == "tail call (jmp 0x402000) at f+0x10"


def test_exit_region_ends_at_the_exit():
    r = can_optimize_exit(TWO_RETS, F, len(TWO_RETS), F + 11)
    assert isinstance(r, Region)
    assert (r.addr, r.end) == (F + 5, F + 12)       # mov eax, 1; pop rbx; ret
    assert [str(i) for i in r.insns] == ["mov eax, 1", "pop rbx", "ret"]
    t = can_optimize_exit(TWO_RETS, F, len(TWO_RETS), F + 16)
    assert (t.addr, t.size) == (F + 16, 5)          # the jmp rel32 alone


def test_ret_after_a_branch_target_stays_int3():
    # The second ret: 4 bytes from L, so the region runs back over the first ret.
    r = can_optimize_exit(TWO_RETS, F, len(TWO_RETS), F + 15)
    assert r.reason is Reason.NOT_RELOCATABLE
    assert str(r) == "'ret' at 0x40100b leaves before the exit"
    # push rbx; test edi, edi; je L; mov eax, 1; L: pop rbx; ret: L inside the region
    code = bytes.fromhex("53" "85ff" "7405" "b801000000" "5b" "c3")
    r = can_optimize_exit(code, F, len(code), F + 11)
    assert r.reason is Reason.JUMP_INTO_RANGE and r.addr == F + 3
    assert str(r) == "je at 0x401003 targets 0x40100a inside the region"


def test_one_byte_function_and_probe_at_region_start():
    r = can_optimize_exit(b"\xc3", F, 1, F)
    assert r.reason is Reason.FUNCTION_TOO_SHORT
    r = can_optimize_exit(TWO_RETS, F, len(TWO_RETS), F + 11, other_probes=[F + 5])
    assert r.reason is Reason.PROBE_IN_RANGE and "where the exit's jump would start" in str(r)


def test_indirect_jump_is_a_note_got_jump_is_a_tail_call():
    code = asm("test edi, edi; je 0x401010; jmp rax") + b"\x90" * 7 + \
        asm("jmp qword ptr [rip + 0x100]", F + 13)
    exits, notes = find_exits(code, F, len(code))
    assert [(e.addr - F, e.kind, e.target) for e in exits] == [(13, "tail", None)]
    assert len(notes) == 1 and "'jmp rax'" in notes[0]


def test_self_tail_call_is_an_exit_loop_back_is_not():
    # dec edi; je L; jmp f (a new call of f); L: ret; jmp f+2 (a loop inside f)
    code = asm("dec edi; je 0x401006; jmp 0x401000; ret; jmp 0x401002")
    exits, _ = find_exits(code, F, len(code))
    assert [(e.addr - F, e.kind) for e in exits] == [(4, "tail"), (6, "ret")]


def test_exit_detour_shape():
    region = can_optimize_exit(TWO_RETS, F, len(TWO_RETS), F + 11)
    d = build_exit_detour(region, F + 0x100000, HandlerSpec("python"))
    insns = decode(d.code, d.slot_addr)
    texts = [str(i) for i in insns]
    assert texts[:2] == ["mov eax, 1", "pop rbx"]        # the epilogue first
    assert d.handler_addr == insns[2].addr and texts[2] == "lea rsp, [rsp - 0x80]"
    assert texts[-1] == "ret" and d.reloc_addr == insns[-1].addr
    assert d.trap_addr is not None and d.handler_addr < d.trap_addr < d.reloc_addr
    assert d.jump == x86.jump_bytes(F + 5, F + 0x100000)


def test_record_handler_stores_exit_regs_from_their_saved_copies():
    region = can_optimize_exit(TWO_RETS, F, len(TWO_RETS), F + 11)
    spec = HandlerSpec("record", counter_addr=F + 0x200000, ring_addr=F + 0x300000,
                       ring_mask=15, missed_addr=F + 0x200040, regs=("rax", "rdx", "rsp"))
    d = build_exit_detour(region, F + 0x100000, spec)
    texts = [str(i) for i in decode(d.code, d.slot_addr)]
    # the lean save: rax rbx rbp r10 r11 rdx pushed, then the flags word (lean.py)
    saved = lean.Saved(lean.RECORD_CLOBBERS, "lahf-stack")
    assert saved.offset("rax") == 0x30 and saved.site_rsp_offset == 0xB8
    assert "mov r11, qword ptr [rsp + 0x30]" in texts           # rax as at the exit
    assert "lea r11, [rsp + 0xb8]" in texts                     # the exit's rsp
    assert "mov qword ptr [rbx + 0x28], rdx" in texts          # args[1]: still live
    with pytest.raises(ValueError):
        HandlerSpec("record", ring_mask=15, regs=("rax", "xmm0"))


def test_exit_detours_emulate_equal_on_a_target(c_target):
    exe = c_target("retprobe")
    report = relocheck.check_file(str(exe), exits=True, seed=3)
    assert report.sites >= 15 and report.optimizable >= 13
    assert report.checked == report.optimizable and report.mismatches == []


@pytest.mark.skipif(not os.path.exists(LIBC), reason="no libc.so.6 at the Debian path")
def test_exit_detours_emulate_equal_on_libc_sample():
    report = relocheck.check_file(LIBC, exits=True, sites=150, seed=11, num_states=2)
    assert report.optimizable >= 100
    assert report.mismatches == [], [m.render() for m in report.mismatches[:3]]
