"""Property test: relocation preserves every instruction's absolute targets.

For random instruction forms at random addresses, relocated to random slots, walk the
reachable part of the relocated code (decoded back with capstone) and collect what it
does in absolute terms: where it can leave the slot, which absolute addresses it
accesses RIP-relatively, which values it pushes, and rsp-based displacements measured
from the entry rsp.  They must equal the original instruction's.
"""
from hypothesis import assume, given, settings, strategies as st

from uprobe_opt.x86 import Reason, Refusal, Relocator, TrampolineWriter, decode, decode_one, prepare_xol
from uprobe_opt.x86.writer import fits_rel32

RIP_TEMPLATES = [  # (bytes before disp32, bytes after)
    ("8b05", ""), ("488b05", ""), ("48890d", ""), ("488d05", ""), ("833d", "05"),
    ("c705", "78563412"), ("66813d", "3412"), ("c5fe6f05", ""), ("62f1fe486f05", ""),
    ("660f6f05", ""), ("f30f7e05", ""), ("ff15", ""), ("ff25", ""), ("0fb605", ""),
]
s8 = st.integers(-128, 127)
s32 = st.integers(-(1 << 31), (1 << 31) - 1)


@st.composite
def insn_forms(draw):
    kind = draw(st.sampled_from(["jcc8", "jcc32", "jmp8", "jmp32", "call32", "loop", "rip",
                                 "callreg", "callrsp"]))
    if kind == "jcc8":
        return bytes([0x70 | draw(st.integers(0, 15))]) + draw(s8).to_bytes(1, "little", signed=True)
    if kind == "jcc32":
        return bytes([0x0F, 0x80 | draw(st.integers(0, 15))]) + draw(s32).to_bytes(4, "little", signed=True)
    if kind in ("jmp8", "loop"):
        op = 0xEB if kind == "jmp8" else draw(st.sampled_from([0xE0, 0xE1, 0xE2, 0xE3]))
        return bytes([op]) + draw(s8).to_bytes(1, "little", signed=True)
    if kind in ("jmp32", "call32"):
        return bytes([0xE9 if kind == "jmp32" else 0xE8]) + draw(s32).to_bytes(4, "little", signed=True)
    if kind == "callreg":
        return bytes([0xFF, draw(st.sampled_from([0xD0, 0xD1, 0xD2, 0xD3, 0xD5, 0xD6, 0xD7]))])
    if kind == "callrsp":
        return bytes.fromhex("ff5424") + draw(s8).to_bytes(1, "little", signed=True)
    before, after = draw(st.sampled_from(RIP_TEMPLATES))
    return bytes.fromhex(before) + draw(s32).to_bytes(4, "little", signed=True) + bytes.fromhex(after)


def original_effect(insn):
    exits, mem, pushed, rspmem = set(), set(), [], set()
    if insn.rip_target is not None:
        mem.add(insn.rip_target)
    if insn.mem_base == "rsp":
        rspmem.add(_rsp_disp(insn))
    if insn.kind in ("call", "call_ind"):
        pushed.append(insn.end)
    if insn.target is not None:
        exits.add(insn.target)
    if insn.kind in ("jcc", "loop", "jrcxz", "other"):
        exits.add(insn.end)
    return exits, mem, pushed, rspmem


def _rsp_disp(insn):
    text = insn.op_str.split("[", 1)[1].rstrip("]")
    if text == "rsp":
        return 0
    sign = -1 if " - " in text else 1
    return sign * int(text.split(" ")[-1], 16)


def relocated_effect(code, slot):
    """Walk reachable instructions from slot; literals are read, never executed.
    Tracks rsp moves (lea rsp / push / pop) and scratch registers loaded by movabs."""
    end = slot + len(code)
    exits, mem, pushed, rspmem = set(), set(), [], set()
    todo, seen = [(slot, 0, ())], set()

    def literal(addr):
        return int.from_bytes(code[addr - slot: addr - slot + 8], "little")
    while todo:
        pc, rsp_delta, scratch = todo.pop()
        if pc in seen:
            continue
        seen.add(pc)
        insn = decode_one(code[pc - slot:], pc)
        scratch = dict(scratch)
        local_rip = insn.rip_target is not None and slot <= insn.rip_target < end
        ops = insn.op_str.split(", ")
        if insn.mnemonic == "lea" and ops[0] == "rsp":
            rsp_delta += _rsp_disp(insn)
        elif insn.mnemonic == "movabs":
            scratch[ops[0]] = int(ops[1], 16)
        elif insn.mnemonic == "pop":
            rsp_delta += 8
            scratch.pop(ops[0], None)
        elif insn.mnemonic == "push":
            rsp_delta -= 8
            if local_rip:
                pushed.append(literal(insn.rip_target))
            elif ops[0].startswith("0x") or ops[0].startswith("-"):
                pushed.append(int(ops[0], 16) & (2**64 - 1))
        elif insn.rip_target is not None and not local_rip:
            mem.add(insn.rip_target)
        elif insn.mem_base in scratch:
            mem.add(scratch[insn.mem_base])
        elif insn.mem_base == "rsp":
            rspmem.add(_rsp_disp(insn) + rsp_delta)
        nexts = []
        if insn.mnemonic == "jmp" and local_rip:
            exits.add(literal(insn.rip_target))
        elif insn.target is not None:
            if slot <= insn.target < end:
                nexts.append(insn.target)
            else:
                exits.add(insn.target)
        if insn.kind not in ("jmp", "jmp_ind", "ret"):
            nexts.append(insn.end)
        todo.extend((n, rsp_delta, tuple(scratch.items())) for n in nexts)
    return exits, mem, pushed, rspmem


@settings(max_examples=400, deadline=None)
@given(raw=insn_forms(), addr=st.integers(1 << 32, (1 << 47) - (1 << 33)),
       delta=st.one_of(st.integers(-(1 << 31) + 0x20000, (1 << 31) - 0x20000),
                       st.integers(-(1 << 33), 1 << 33)),
       scenario=st.sampled_from(["xol", "region"]))
def test_relocation_preserves_absolute_targets(raw, addr, delta, scenario):
    slot = addr + delta + (0x40000 if abs(delta) < 0x20000 else 0)   # slot never overlaps targets
    insn = decode_one(raw, addr)
    assert insn is not None and insn.size == len(raw)
    for target in (insn.target, insn.rip_target, insn.end):   # targets outside the slot
        assume(target is None or not slot - 64 <= target < slot + 256)
    assume(slot > 0x1000)
    writer = TrampolineWriter(slot)
    relocator = Relocator(writer, scenario)
    result = relocator.write_one(insn, is_last=True)
    if isinstance(result, Refusal):
        # only forms the scratch-register rewrite cannot take (VEX/EVEX, stack users,
        # calls) and, in a region (detour), every form but lea: it could fault there
        assert result.reason is Reason.RIPREL_OUT_OF_RANGE
        assert not fits_rel32(slot + insn.size, insn.rip_target)
        assert raw[0] in (0xC4, 0xC5, 0x62, 0xFF) or (
            scenario == "region" and insn.mnemonic != "lea")
        return
    if not relocator.ends_flow:
        writer.put_jmp(insn.end)
    code = writer.finish()
    assert len(code) <= 80
    assert relocated_effect(code, slot) == original_effect(insn)
    # prepare_xol gives the same bytes for the xol scenario
    if scenario == "xol":
        assert prepare_xol(raw, addr, slot).code == code
