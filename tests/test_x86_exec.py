"""Execution tests (unicorn): the relocated detour must behave exactly like the original
region, from the same register state: same GPRs, flags, memory (including the red
zone) and next rip.  Also the count handler's per-CPU counters and the python frame."""
import pytest
import unicorn
import unicorn.x86_const as X

from uprobe_opt.x86 import (FRAME_SIZE, HandlerSpec, Region, build_detour, can_optimize,
                            frame_offset, pack_frame, prepare_xol, unpack_frame)

FUNC = 0x401000
SLOT = 0x500000
DATA = 0x600000
STACK_LO, STACK_TOP = 0x70000000, 0x70010000
RSP0 = 0x7000F000
FS_BASE = 0x80000800
FAR_DATA = 0x7F0000000000
GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15", "rsp"]
REG = {n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in GPRS + ["rip", "eflags"]}
FLAGS_MASK = 0xCD5        # CF PF AF ZF SF OF: what the compared code can change


def machine(func_code, regs, data=b"", stack=None):
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    for base, size in [(0x400000, 0x10000), (SLOT, 0x1000), (DATA, 0x2000),
                       (STACK_LO, STACK_TOP - STACK_LO), (0x80000000, 0x1000), (FAR_DATA, 0x1000)]:
        uc.mem_map(base, size)
    uc.mem_write(FUNC, bytes(func_code))
    uc.mem_write(DATA, bytes(data).ljust(0x100, b"\x00"))
    uc.mem_write(RSP0 - 0x200, bytes(range(256)) * 2 + bytes(range(255, -1, -1)) * 2)
    for addr, value in (stack or {}).items():
        uc.mem_write(addr, value.to_bytes(8, "little"))
    uc.reg_write(X.UC_X86_REG_FS_BASE, FS_BASE)
    init = {n: 0x1111 * (i + 1) for i, n in enumerate(GPRS)}
    init.update(rsp=RSP0, eflags=0x202)
    init.update(regs)
    for name, value in init.items():
        uc.reg_write(REG[name], value)
    return uc


def run_until_outside(uc, start, lo, hi, max_insns=200):
    """Run from ``start`` until rip leaves [lo, hi) or comes back to ``start`` (a branch
    back to the probe address); returns that rip."""
    exit_pc = []
    steps = []

    def hook(uc_, address, size, _):
        steps.append(address)
        if not lo <= address < hi or (address == start and len(steps) > 1):
            exit_pc.append(address)
            uc_.emu_stop()
    h = uc.hook_add(unicorn.UC_HOOK_CODE, hook)
    uc.emu_start(start, 0, count=max_insns)
    uc.hook_del(h)
    assert exit_pc, "never left the code"
    return exit_pc[0]


def snapshot(uc, pc):
    regs = {n: uc.reg_read(REG[n]) for n in GPRS}
    regs["eflags"] = uc.reg_read(REG["eflags"]) & FLAGS_MASK
    regs["pc"] = pc
    # memory from the red zone of the starting rsp up to the top of the stack, plus data
    mem = bytes(uc.mem_read(RSP0 - 128, STACK_TOP - (RSP0 - 128)))
    return regs, mem, bytes(uc.mem_read(DATA, 0x2000))


def compare(func_code, addr, regs, data=b"", handler=HandlerSpec("none"), slot=SLOT, stack=None):
    region = can_optimize(func_code, FUNC, len(func_code), addr)
    assert isinstance(region, Region), region
    detour = build_detour(region, slot, handler)
    uc = machine(func_code, regs, data, stack)
    pc = run_until_outside(uc, addr, region.addr, region.end)
    want = snapshot(uc, pc)
    uc = machine(func_code, regs, data, stack)
    uc.mem_write(slot, detour.code)
    pc = run_until_outside(uc, slot, slot, slot + len(detour.code))
    got = snapshot(uc, pc)
    assert got[0] == want[0]
    assert got[1] == want[1]
    if handler.kind == "none":
        assert got[2] == want[2]
    return want, got, uc, detour


def rel32(x):
    return x.to_bytes(4, "little", signed=True)


# --- regions ---------------------------------------------------------------------------
# mov eax, [rip+X]; add eax, 1; ret  (X -> DATA)
RIPLOAD = bytes.fromhex("8b05") + rel32(DATA - (FUNC + 6)) + bytes.fromhex("83c001c3")
# cmp dword ptr [rip+X], 5 (imm after disp); sete al; mov [rip+Y], ecx; ret
CMPIMM = (bytes.fromhex("833d") + rel32(DATA - (FUNC + 7)) + b"\x05" + bytes.fromhex("0f94c0")
          + bytes.fromhex("890d") + rel32(DATA + 8 - (FUNC + 16)) + b"\xc3")
# test edi, edi; je +0x10; xor eax, eax; ... (je target FUNC+0x14)
JCC = bytes.fromhex("85ff7410" "31c0" "90" * 14 + "c3" "b8 2a 00 00 00 c3".replace(" ", ""))
# xor eax, eax; call FUNC+0x20 ; ret; ... callee: mov eax, 7; ret
CALL = bytes.fromhex("31c0e8") + rel32(0x20 - 7) + b"\xc3" + b"\x90" * 24 + bytes.fromhex("b807000000c3")
# xor rax, rax; call rbx
CALLREG = bytes.fromhex("4831c0ffd3c3")
# xor rax, rax; call [rsp+8]
CALLMEM = bytes.fromhex("4831c0ff542408c3")
# L: xor rax, rax (3) ; loop L
LOOP = bytes.fromhex("4831c0e2fbc3")
JRCXZ = bytes.fromhex("4831c0e3fbc3")
# mov [rsp-8], rdi (red zone store); mov rax, [rsp-8]; ret
REDZONE = bytes.fromhex("48897c24f8488b4424f8c3")


def test_riprel_load():
    compare(RIPLOAD, FUNC, {}, data=(0x12345678).to_bytes(4, "little"))


@pytest.mark.parametrize("value", [4, 5, 6])
def test_riprel_cmp_imm_and_store(value):
    want, got, uc, _ = compare(CMPIMM, FUNC, {"rcx": 0xABCDEF}, data=value.to_bytes(4, "little"))
    assert want[0]["eflags"] & 0x40 == (0x40 if value == 5 else 0)     # ZF


@pytest.mark.parametrize("edi,exit_pc", [(0, FUNC + 0x14), (1, FUNC + 6)])
def test_jcc_both_ways(edi, exit_pc):
    want, _, _, _ = compare(JCC, FUNC, {"rdi": edi})
    assert want[0]["pc"] == exit_pc


def test_call_rel32_pushes_original_return():
    want, _, uc, _ = compare(CALL, FUNC, {})
    assert want[0]["pc"] == FUNC + 0x20
    assert want[0]["rsp"] == RSP0 - 8
    assert int.from_bytes(uc.mem_read(RSP0 - 8, 8), "little") == FUNC + 7


def test_call_reg():
    want, _, uc, _ = compare(CALLREG, FUNC, {"rbx": FUNC + 0x100})
    assert want[0]["pc"] == FUNC + 0x100
    assert int.from_bytes(uc.mem_read(RSP0 - 8, 8), "little") == FUNC + 5


def test_call_rsp_memory():
    want, _, uc, _ = compare(CALLMEM, FUNC, {}, stack={RSP0 + 8: FUNC + 0x200, RSP0: 0x999})
    assert want[0]["pc"] == FUNC + 0x200 and want[0]["rsp"] == RSP0 - 8
    assert int.from_bytes(uc.mem_read(RSP0 - 8, 8), "little") == FUNC + 7


@pytest.mark.parametrize("code", [LOOP, JRCXZ])
@pytest.mark.parametrize("rcx", [0, 1, 5])
def test_loop_jrcxz(code, rcx):
    want, _, _, _ = compare(code, FUNC, {"rcx": rcx})
    taken = (rcx != 1) if code is LOOP else (rcx == 0)
    assert want[0]["pc"] == (FUNC if taken else FUNC + 5)


@pytest.mark.parametrize("eflags", [0x202, 0x2C3, 0xAD7])
def test_flags_and_red_zone_preserved(eflags):
    compare(REDZONE, FUNC, {"eflags": eflags, "rdi": 0xDEADBEEF})
    compare(REDZONE, FUNC, {"eflags": eflags, "rdi": 0xDEADBEEF}, handler=HandlerSpec("count", DATA + 0x100))


def test_far_slot_absolute_jumps():
    """A slot beyond rel32 reach of the jcc target uses the absolute forms; run it via an
    XOL copy (no reach requirement) and compare."""
    slot = FAR_DATA + 0x100
    plan = prepare_xol(JCC[2:4], FUNC + 2, slot)
    for edi, exit_pc in [(0, FUNC + 0x14), (1, FUNC + 4)]:
        uc = machine(JCC, {"rdi": edi})
        uc.mem_write(slot, plan.code)
        uc.reg_write(X.UC_X86_REG_EFLAGS, 0x202 | (0x40 if edi == 0 else 0))
        assert run_until_outside(uc, slot, slot, slot + len(plan.code)) == exit_pc


# --- count handler -------------------------------------------------------------------------
COUNTERS = DATA + 0x1000


def counters(uc, n, base=COUNTERS):
    return [int.from_bytes(uc.mem_read(base + 64 * i, 8), "little") for i in range(n)]


@pytest.mark.parametrize("cpu,slot_index", [(5, 5), (13, 8), (0, 0), (7, 7), (-1, 8), (-2, 8)])
def test_count_per_cpu(cpu, slot_index):
    """cpu_id 0..7: that CPU's slot (the rseq path); -1/-2 (no rseq area) and a CPU
    beyond the slots: the shared slot 8 (lock inc)."""
    spec = HandlerSpec("count", counter_addr=COUNTERS, ncpu_slots=8, rseq_offset=-0x60)
    assert spec.counter_slots == 9
    _, _, uc, detour = compare(RIPLOAD, FUNC, {}, handler=spec)
    want = [0] * 9
    # compare() ran the detour once with cpu_id 0 (zeroed fs area): reset and rerun
    uc.mem_write(COUNTERS, bytes(8 * 64))
    uc.mem_write(FS_BASE - 0x60 + 4, cpu.to_bytes(4, "little", signed=True))
    for _ in range(3):
        uc.reg_write(X.UC_X86_REG_RSP, RSP0)
        run_until_outside(uc, SLOT, SLOT, SLOT + len(detour.code))
    want[slot_index] = 3
    assert counters(uc, 9) == want
    assert spec.counter_slot_addr(cpu) == COUNTERS + 64 * slot_index
    # the sequence leaves no pointer to its descriptor in struct rseq
    assert bytes(uc.mem_read(FS_BASE - 0x60 + 8, 8)) == bytes(8)


def test_count_single_slot_and_far_counter():
    _, _, uc, _ = compare(RIPLOAD, FUNC, {}, handler=HandlerSpec("count", counter_addr=COUNTERS))
    assert counters(uc, 2) == [1, 0]
    _, _, uc, _ = compare(RIPLOAD, FUNC, {}, handler=HandlerSpec("count", counter_addr=FAR_DATA + 0x40))
    assert int.from_bytes(uc.mem_read(FAR_DATA + 0x40, 8), "little") == 1
    spec = HandlerSpec("count", counter_addr=FAR_DATA + 0x40, ncpu_slots=4, rseq_offset=-0x60)
    _, _, uc, _ = compare(RIPLOAD, FUNC, {}, handler=spec)
    assert int.from_bytes(uc.mem_read(FAR_DATA + 0x40, 8), "little") == 1


# --- python handler: the frame ------------------------------------------------------------
def test_python_frame_read_and_write():
    region = can_optimize(REDZONE, FUNC, len(REDZONE), FUNC)
    detour = build_detour(region, SLOT, HandlerSpec("python"))
    uc = machine(REDZONE, {"rdi": 0xDEADBEEF, "eflags": 0x2C3})
    uc.mem_write(SLOT, detour.code)
    seen = {}

    def on_int3(uc_, intno, _):
        assert intno == 3
        rip = uc_.reg_read(X.UC_X86_REG_RIP)
        rsp = uc_.reg_read(X.UC_X86_REG_RSP)
        assert rip == detour.trap_addr + 1
        frame = unpack_frame(uc_.mem_read(rsp, FRAME_SIZE))
        seen.update(frame)
        frame.update(rdi=0x1234, rbx=0x5678, eflags=0x202)
        uc_.mem_write(rsp, pack_frame(frame))
    uc.hook_add(unicorn.UC_HOOK_INTR, on_int3)
    pc = run_until_outside(uc, SLOT, SLOT, SLOT + len(detour.code))
    assert pc == FUNC + 5
    assert seen["rip"] == FUNC and seen["rsp"] == RSP0 and seen["orig_rax"] == 2**64 - 1
    assert seen["rdi"] == 0xDEADBEEF and seen["rbx"] == 0x1111 * 2
    assert seen["eflags"] & FLAGS_MASK == 0x2C3 & FLAGS_MASK
    assert seen["cs"] == 0x33 and seen["ss"] == 0x2B
    # the relocated region ran with the registers the handler wrote
    assert uc.reg_read(X.UC_X86_REG_RDI) == 0x1234 and uc.reg_read(X.UC_X86_REG_RBX) == 0x5678
    assert uc.reg_read(X.UC_X86_REG_RSP) == RSP0
    assert uc.reg_read(X.UC_X86_REG_EFLAGS) & FLAGS_MASK == 0
    assert bytes(uc.mem_read(RSP0 - 8, 8)) == (0x1234).to_bytes(8, "little")
    assert frame_offset("rsp") == 152


@pytest.mark.parametrize("code,regs", [
    (RIPLOAD[:6], {}),
    (CMPIMM[:7], {}),
    (bytes.fromhex("488d05") + rel32(DATA - (FUNC + 7)), {}),            # lea rax, [rip+X]
    (bytes.fromhex("480fb10d") + rel32(DATA - (FUNC + 8)), {"rax": 5}),   # cmpxchg [rip+X], rcx
])
def test_xol_scratch_register_rewrite_runs_like_original(code, regs):
    """A slot beyond disp32 reach of the data: the scratch-register form must leave every
    register (the scratch one included), flags, red zone and memory as the original."""
    slot = FAR_DATA + 0x200
    plan = prepare_xol(code, FUNC, slot)
    assert b"\x48\xb8"[:1] in plan.code            # movabs present: the scratch form
    data = (5).to_bytes(8, "little")
    uc = machine(code + b"\xc3", regs, data)
    pc = run_until_outside(uc, FUNC, FUNC, FUNC + len(code))
    want = snapshot(uc, pc)
    uc = machine(code + b"\xc3", regs, data)
    uc.mem_write(slot, plan.code)
    pc = run_until_outside(uc, slot, slot, slot + len(plan.code))
    assert snapshot(uc, pc) == want
