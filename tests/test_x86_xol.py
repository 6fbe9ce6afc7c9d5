"""Unit tests: decode, check_boundary, skip_endbr, prepare_xol, jump_bytes (exact bytes)."""
import pytest

from uprobe_opt.x86 import (BREAKPOINT, JMP_REL32_SIZE, SLOT_SIZE, Reason, Refusal, XolPlan,
                            check_boundary, decode, jump_bytes, prepare_xol, skip_endbr)

ADDR = 0x401000
NEAR = 0x402000          # a slot within 2 GiB
FAR = 0x7F0000001000     # a slot far from ADDR


def asm(plan):
    assert isinstance(plan, XolPlan), plan
    return [str(i) for i in decode(plan.code, plan.slot_addr)]


def xol(hexbytes, addr=ADDR, slot=NEAR):
    return prepare_xol(bytes.fromhex(hexbytes), addr, slot)


def test_constants():
    assert BREAKPOINT == b"\xcc" and JMP_REL32_SIZE == 5 and SLOT_SIZE == 768


def test_decode_and_str():
    insns = decode(bytes.fromhex("8b05c32e0000c3ff"), 0x401130)
    assert [str(i) for i in insns] == ["mov eax, dword ptr [rip + 0x2ec3]", "ret"]
    assert insns[0].rip_target == 0x401136 + 0x2EC3 and insns[0].rip_disp_offset == 2
    assert insns[1].kind == "ret"


def test_check_boundary():
    code = bytes.fromhex("8b05c32e0000c3")
    assert check_boundary(code, 0x401130, 0x401130) is None
    assert check_boundary(code, 0x401130, 0x401136) is None
    r = check_boundary(code, 0x401130, 0x401133)
    assert r.reason is Reason.NOT_BOUNDARY and r.addr == 0x401133
    assert str(r) == "0x401133 is inside 'mov eax, dword ptr [rip + 0x2ec3]' at 0x401130 (6 bytes)"
    assert check_boundary(code, 0x401130, 0x401200).reason is Reason.OUTSIDE_FUNCTION


def test_skip_endbr():
    code = bytes.fromhex("f30f1efa55")
    assert skip_endbr(code, 0x1000, 0x1000) == 0x1004
    assert skip_endbr(code, 0x1000, 0x1004) == 0x1004
    assert skip_endbr(bytes.fromhex("554889e5"), 0x1000, 0x1000) == 0x1000


def test_jump_bytes():
    assert jump_bytes(0x401000, 0x402000) == bytes.fromhex("e9fb0f0000")
    assert jump_bytes(0x402000, 0x401000) == bytes.fromhex("e9fbefffff")
    with pytest.raises(ValueError):
        jump_bytes(0x401000, 0x7F0000000000)


def test_xol_plain_copy_then_jmp_back():
    p = xol("4889e5")   # mov rbp, rsp
    assert p.code == bytes.fromhex("4889e5") + b"\xe9" + (ADDR + 3 - (NEAR + 8)).to_bytes(4, "little", signed=True)
    assert asm(p) == ["mov rbp, rsp", "jmp 0x401003"]


def test_xol_riprel_load_same_absolute():
    p = xol("8b05c32e0000")  # target 0x403ec9
    assert asm(p) == ["mov eax, dword ptr [rip + 0x1ec3]", "jmp 0x401006"]


def test_xol_riprel_imm_after_disp():
    p = xol("833d1000000005")  # cmp dword ptr [rip+0x10], 5 -> 0x401017
    assert p.code[:7] == bytes.fromhex("833d") + (0x401017 - (NEAR + 7)).to_bytes(4, "little", signed=True) + b"\x05"
    assert asm(p)[0] == "cmp dword ptr [rip - 0xff0], 5"


def test_xol_vex_evex_riprel():
    assert asm(xol("c5fe6f0510000000"))[0] == "vmovdqu ymm0, ymmword ptr [rip - 0xff0]"
    assert asm(xol("62f1fe486f0510000000"))[0] == "vmovdqu64 zmm0, zmmword ptr [rip - 0xff0]"


def test_xol_riprel_out_of_range_scratch_register():
    assert asm(xol("8b05c32e0000", slot=FAR))[:6] == [
        "lea rsp, [rsp - 0x80]", "push rcx", "movabs rcx, 0x403ec9", "mov eax, dword ptr [rcx]",
        "pop rcx", "lea rsp, [rsp + 0x80]"]
    # cmpxchg uses rax implicitly and rcx explicitly: rdx is the scratch; REX.W kept
    assert asm(xol("480fb10d10000000", slot=FAR))[1:4] == [
        "push rdx", "movabs rdx, 0x401018", "cmpxchg qword ptr [rdx], rcx"]
    # immediate after the displacement stays in place
    assert asm(xol("833d1000000005", slot=FAR))[3] == "cmp dword ptr [rax], 5"


def test_xol_riprel_out_of_range_refused():
    r = xol("c5fe6f05c32e0000", slot=FAR)       # VEX: no scratch rewrite
    assert r.reason is Reason.RIPREL_OUT_OF_RANGE
    assert str(r) == ("'vmovdqu ymm0, ymmword ptr [rip + 0x2ec3]' at 0x401000 reaches 0x403ecb, "
                      "beyond +-2 GiB of its relocated copy at 0x7f0000001000")
    assert xol("ff35c32e0000", slot=FAR).reason is Reason.RIPREL_OUT_OF_RANGE   # push: uses rsp


def test_xol_jcc_rel8_and_far():
    assert asm(xol("7410")) == ["je 0x401012", "jmp 0x401002"]
    assert asm(xol("0f8410000000")) == ["je 0x401016", "jmp 0x401006"]
    p = xol("7410", slot=FAR)   # beyond rel32: inverted jcc over absolute jumps
    assert p.code[:2] == bytes.fromhex("750e")
    assert p.code[2:16] == bytes.fromhex("ff2500000000") + (0x401012).to_bytes(8, "little")
    assert p.code[16:30] == bytes.fromhex("ff2500000000") + (0x401002).to_bytes(8, "little")


def test_xol_jmp_rel8():
    assert asm(xol("eb10")) == ["jmp 0x401012"]


def test_xol_calls_push_original_return_address():
    assert asm(xol("e810000000")) == ["push 0x401005", "jmp 0x401015"]
    assert asm(xol("ffd0")) == ["push 0x401002", "jmp rax"]
    assert asm(xol("ff1510000000")) == ["push 0x401006", "jmp qword ptr [rip - 0xff5]"]
    assert asm(xol("ff542408")) == ["push 0x401004", "jmp qword ptr [rsp + 0x10]"]
    assert asm(xol("ff1424")) == ["push 0x401003", "jmp qword ptr [rsp + 8]"]
    assert asm(xol("ff54247c")) == ["push 0x401004", "jmp qword ptr [rsp + 0x84]"]


def test_xol_call_high_return_address_uses_literal():
    addr, slot = 0x7F0000000000, 0x7F0000100000
    p = prepare_xol(bytes.fromhex("ffd0"), addr, slot)
    assert asm(p)[:2] == ["push qword ptr [rip + 2]", "jmp rax"]
    assert p.code[8:16] == (addr + 2).to_bytes(8, "little")


def test_xol_loop_jrcxz():
    assert asm(xol("e2fe")) == ["loop 0x402004", "jmp 0x402009", "jmp 0x401000", "jmp 0x401002"]
    assert asm(xol("e3fe"))[0] == "jrcxz 0x402004"
    assert asm(xol("e1fe"))[0] == "loope 0x402004"


def test_xol_ret_copied():
    assert asm(xol("c3")) == ["ret"]
    assert asm(xol("f3c3")) == ["repz ret"]
    assert asm(xol("0f05")) == ["syscall", "jmp 0x401002"]


@pytest.mark.parametrize("hexbytes,text", [
    ("cc", "int3 at 0x401000 cannot run out of line"),
    ("cd80", "'int 0x80' at 0x401000 traps (software interrupt)"),
    ("c7f800000000", "'xbegin 0x401006' at 0x401000: the abort address is relative to the instruction"),
    ("66e900000000", "0x66-prefixed branch 'jmp 0x401006' at 0x401000 (Intel and AMD differ)"),
    ("67e800000000", "0x67-prefixed branch 'call 0x401006' at 0x401000"),
    ("ff2c24", "far transfer 'jmp ptr [rsp]' at 0x401000"),
    ("8ed0", "'mov ss, eax' at 0x401000 loads ss (inhibits interrupts for the next instruction)"),
])
def test_xol_refusals(hexbytes, text):
    r = xol(hexbytes)
    assert isinstance(r, Refusal) and r.reason is Reason.NOT_RELOCATABLE and str(r) == text


def test_xol_decode_error():
    assert xol("06").reason is Reason.DECODE_ERROR
