"""can_optimize / build_detour refusals and regions, with exact reason text."""
from uprobe_opt.x86 import (Detour, HandlerSpec, Reason, Refusal, Region, build_detour,
                            can_optimize, decode, jump_bytes)

F = 0x401100


def refuse(code, addr, *, func=F, size=None, **kw):
    r = can_optimize(code, func, len(code) if size is None else size, addr, **kw)
    assert isinstance(r, Refusal), r
    return r


# push rbp; mov rbp,rsp; xor eax,eax; L: inc eax; cmp eax,10; jne L; pop rbp; ret
BACKEDGE = bytes.fromhex("554889e531c0ffc083f80a75f95dc3")


def test_region_covers_whole_instructions():
    r = can_optimize(BACKEDGE, F, len(BACKEDGE), F + 1)
    assert isinstance(r, Region)
    assert (r.addr, r.size, r.orig) == (F + 1, 5, bytes.fromhex("4889e531c0"))
    assert [str(i) for i in r.insns] == ["mov rbp, rsp", "xor eax, eax"]
    assert F + 1 not in r and F + 2 in r and F + 6 not in r


def test_backedge_jcc_into_region():
    r = refuse(BACKEDGE, F + 4)
    assert r.reason is Reason.JUMP_INTO_RANGE and r.addr == F + 11
    assert str(r) == "jne at 0x40110b targets 0x401106 inside the region"


def test_branch_to_probe_address_itself_is_fine():
    # L: xor rax, rax ; loop L  (target == addr: not strictly inside)
    code = bytes.fromhex("4831c0e2fbc3")
    assert isinstance(can_optimize(code, F, len(code), F), Region)


# endbr64; cmp edi,3; ja +0x10; lea rax,[rip]; movsxd rcx,[rax+rdi*4]; add rax,rcx;
# notrack jmp rax; xor eax,eax; ret
SWITCH = bytes.fromhex("f30f1efa83ff037710488d050000000048630cb84801c83effe031c0c3")


def test_switch_jump_table():
    r = refuse(SWITCH, F + 4)
    assert r.reason is Reason.INDIRECT_JUMP and r.addr == F + 0x17
    assert str(r) == "indirect jmp at 0x401117 (jump table)"


def test_indirect_jmp_through_memory():
    code = bytes.fromhex("4883ec0831c0ff2500000000")
    assert str(refuse(code, F)) == "indirect jmp at 0x401106 (through memory)"


def test_region_past_function_end():
    assert str(refuse(bytes.fromhex("c3"), F)) == "function ends 1 byte after probe"
    r = refuse(bytes.fromhex("31c0c3"), F)
    assert r.reason is Reason.FUNCTION_TOO_SHORT and str(r) == "function ends 3 bytes after probe"
    # a probe on the final ret of a longer function
    assert str(refuse(BACKEDGE, F + 14)) == "function ends 1 byte after probe"
    # bytes past the symbol end are never part of the region
    assert str(refuse(bytes.fromhex("31c0c3909090"), F, size=3)) == "function ends 3 bytes after probe"


def test_no_symbol_size_and_outside():
    r = can_optimize(BACKEDGE, F, None, F)
    assert r.reason is Reason.OUTSIDE_FUNCTION and str(r) == "no symbol size for 0x401100"
    r = refuse(BACKEDGE, F + 0x100)
    assert str(r) == "0x401200 is outside the function at 0x401100 (15 bytes)"


def test_not_boundary():
    r = refuse(BACKEDGE, F + 2)
    assert r.reason is Reason.NOT_BOUNDARY
    assert str(r) == "0x401102 is inside 'mov rbp, rsp' at 0x401101 (3 bytes)"


def test_foreign_int3():
    code = bytes.fromhex("55cc89e531c05dc3")
    r = refuse(code, F)
    assert r.reason is Reason.FOREIGN_INT3 and r.addr == F + 1
    assert str(r) == "int3 at 0x401101 in the region 0x401100-0x401106 (a foreign breakpoint)"


def test_probe_in_range():
    r = refuse(BACKEDGE, F + 1, other_probes=[F + 1, F + 4, 0x999])
    assert r.reason is Reason.PROBE_IN_RANGE and r.addr == F + 4
    assert str(r) == "probe at 0x401104 lies inside the region 0x401101-0x401106"
    assert isinstance(can_optimize(BACKEDGE, F, 15, F + 1, other_probes=[F + 6, F]), Region)


def test_call_not_last():
    code = bytes.fromhex("ffd04883c408c3")        # call rax; add rsp, 8; ret
    r = refuse(code, F)
    assert r.reason is Reason.NOT_RELOCATABLE
    assert str(r) == "'call rax' at 0x401100 is a call that is not the last instruction of the region"
    code = bytes.fromhex("4831c0ffd0c3")          # xor rax,rax; call rax (last): fine
    assert isinstance(can_optimize(code, F, len(code), F), Region)


def test_syscall_not_last_and_ret_not_last():
    code = bytes.fromhex("0f054883c408c3")
    assert str(refuse(code, F)) == "'syscall' at 0x401100 is not the last instruction of the region"
    code = bytes.fromhex("4831c00f05c3")           # xor; syscall last: fine
    assert isinstance(can_optimize(code, F, len(code), F), Region)
    code = bytes.fromhex("5dc30f1f440000")         # pop rbp; ret; nopl (inside the symbol)
    assert str(refuse(code, F)) == "'ret' at 0x401101 is followed by more region bytes"
    code = bytes.fromhex("4883c408c3")             # add rsp, 8; ret: ret is last
    assert isinstance(can_optimize(code, F, len(code), F), Region)


def test_refused_instructions_in_region():
    assert str(refuse(bytes.fromhex("cd804831c0c3"), F)) == "'int 0x80' at 0x401100 traps (software interrupt)"
    assert refuse(bytes.fromhex("c7f8000000004831c0c3"), F).reason is Reason.NOT_RELOCATABLE
    assert str(refuse(bytes.fromhex("4831c067e800000000c3"), F)) == "0x67-prefixed branch 'call 0x401109' at 0x401103"


def test_decode_error_in_function():
    code = bytes.fromhex("4889e531c00660c3")   # 06 is invalid in 64-bit mode
    r = refuse(code, F)
    assert r.reason is Reason.DECODE_ERROR
    assert str(r) == "cannot decode the function past 0x401105, so jumps into the region cannot be ruled out"


def test_build_detour_too_far():
    region = can_optimize(BACKEDGE, F, 15, F + 1)
    r = build_detour(region, 0x7F0000000000, HandlerSpec("none"))
    assert r.reason is Reason.DETOUR_TOO_FAR and str(r) == "no detour page within +-2 GiB of 0x401101"


def test_build_detour_riprel_out_of_range():
    # mov eax, [rip + 0x7ff00000] at F; slot 256 MiB below: jmp reaches, disp32 does not
    code = bytes.fromhex("c5fe6f050000f07fc3")      # vmovdqu ymm0, [rip + 0x7ff00000]
    region = can_optimize(code, F, len(code), F)
    r = build_detour(region, F - 0x10000000, HandlerSpec("none"))
    assert r.reason is Reason.RIPREL_OUT_OF_RANGE and r.addr == F
    code = bytes.fromhex("8b050000f07fc3")          # a load could fault: refused in a detour
    region = can_optimize(code, F, len(code), F)
    r = build_detour(region, F - 0x10000000, HandlerSpec("none"))
    assert r.reason is Reason.RIPREL_OUT_OF_RANGE
    code = bytes.fromhex("488d050000f07fc3")        # lea never faults: scratch register
    region = can_optimize(code, F, len(code), F)
    d = build_detour(region, F - 0x10000000, HandlerSpec("none"))
    assert d.relocated[0][1].startswith("lea rsp, [rsp - 0x80]; push rcx; movabs rcx, 0x80301107")


def test_detour_fields_and_relocated_text():
    region = can_optimize(BACKEDGE, F, 15, F + 1)
    d = build_detour(region, 0x500000, HandlerSpec("python"))
    assert isinstance(d, Detour) and d.slot_addr == 0x500000
    assert d.code[d.trap_addr - d.slot_addr] == 0xCC
    assert d.jump == jump_bytes(F + 1, 0x500000)
    assert [(str(i), t) for i, t in d.relocated] == [
        ("mov rbp, rsp", "mov rbp, rsp"), ("xor eax, eax", "xor eax, eax; jmp 0x401106")]
    assert str(decode(d.code[d.reloc_addr - d.slot_addr:], d.reloc_addr)[0]) == "mov rbp, rsp"


def test_detour_rel8_jcc_widened():
    # test edi,edi; je +0x10 (target outside region); xor eax, eax; ...
    code = bytes.fromhex("85ff741031c0" + "90" * 14 + "c3")
    region = can_optimize(code, F, len(code), F)
    d = build_detour(region, 0x500000, HandlerSpec("none"))
    texts = [t for _, t in d.relocated]
    assert texts == ["test edi, edi", "je 0x401114", "xor eax, eax; jmp 0x401106"]


def test_extra_targets_landing_pad():
    r = refuse(BACKEDGE, F + 1, extra_targets=[F + 3])
    assert r.reason is Reason.JUMP_INTO_RANGE
    assert str(r) == "entry point 0x401103 (landing pad or external label) is inside the region"
    assert isinstance(can_optimize(BACKEDGE, F, 15, F + 1, extra_targets=[F + 1, F + 6]), Region)


def test_shadow_stack_refuses_emulated_calls():
    code = bytes.fromhex("4831c0ffd0c3")
    r = can_optimize(code, F, len(code), F, shadow_stack=True)
    assert r.reason is Reason.NOT_RELOCATABLE
    assert str(r) == "'call rax' at 0x401103: an emulated call breaks the shadow stack"
    from uprobe_opt.x86 import prepare_xol
    assert prepare_xol(bytes.fromhex("e810000000"), F, 0x500000, shadow_stack=True).reason is Reason.NOT_RELOCATABLE
    assert not isinstance(prepare_xol(bytes.fromhex("4831c0"), F, 0x500000, shadow_stack=True), Refusal)
