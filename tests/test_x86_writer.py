"""TrampolineWriter and frame layout."""
import pytest
from ptrace.binding import ptrace_registers_t as user_regs_struct

from uprobe_opt.x86 import (FRAME_FIELDS, FRAME_SIZE, TrampolineWriter, WriterError, decode,
                            frame_offset, pack_frame, site_rsp, unpack_frame)


def test_offset_and_pc_are_separate():
    w = TrampolineWriter(0x500000)
    assert (w.offset, w.pc) == (0, 0x500000)
    w.put_bytes(b"\x90\x90")
    assert (w.offset, w.pc) == (2, 0x500002)


def test_labels_resolved_in_finish():
    w = TrampolineWriter(0x500000)
    w.put_jcc_rel8(4, "out")            # je out
    w.put_jmp_rel32("out")
    w.put_label("out")
    w.put_bytes(b"\xc3")
    assert w.finish() == bytes.fromhex("7405" "e900000000" "c3")


def test_unresolved_label_raises():
    w = TrampolineWriter(0x500000)
    w.put_jmp_rel8("nowhere")
    with pytest.raises(WriterError, match="unresolved label nowhere"):
        w.finish()


def test_rel8_out_of_range_raises():
    w = TrampolineWriter(0x500000)
    w.put_jmp_rel8("far")
    w.put_bytes(b"\x90" * 200)
    w.put_label("far")
    with pytest.raises(WriterError, match="out of rel8"):
        w.finish()
    with pytest.raises(WriterError):
        TrampolineWriter(0x500000).put_jmp_rel32(0x7F0000000000)


def test_jmp_forms_and_literals():
    w = TrampolineWriter(0x500000)
    w.put_jmp(0x401000)                 # in reach: rel32
    w.put_jmp(0x7F0000000000)           # beyond: absolute through [rip+0]
    w.put_push_u64(0x401005)            # sign-extends: push imm32
    w.put_push_u64(0x7F0000000005)      # pool literal
    code = w.finish()
    parts = [(0, 5), (5, 11), (19, 24), (24, 30)]
    assert [str(decode(code[a:b], 0x500000 + a)[0]) for a, b in parts] == [
        "jmp 0x401000", "jmp qword ptr [rip]", "push 0x401005", "push qword ptr [rip + 2]"]
    assert code[11:19] == (0x7F0000000000).to_bytes(8, "little")
    assert len(code) % 8 == 0 and code[-8:] == (0x7F0000000005).to_bytes(8, "little")


def test_put_asm_uses_pc():
    w = TrampolineWriter(0x500000)
    w.put_asm("nop")
    w.put_asm("jmp 0x500010")
    assert w.finish() == bytes.fromhex("90" "eb0d")


def test_frame_matches_user_regs_struct():
    names = [name for name, _ in user_regs_struct._fields_][:21]
    assert tuple(names) == FRAME_FIELDS
    assert FRAME_SIZE == 168 and frame_offset("r15") == 0 and frame_offset("rip") == 128
    assert frame_offset("eflags") == 144 and frame_offset("rsp") == 152 and frame_offset("ss") == 160
    values = {n: i * 0x1000 + 1 for i, n in enumerate(FRAME_FIELDS)}
    values["orig_rax"] = -1
    raw = pack_frame(values)
    assert len(raw) == 168 and raw[120:128] == b"\xff" * 8
    back = unpack_frame(raw)
    assert back["orig_rax"] == 2**64 - 1 and back["rdi"] == values["rdi"]
    assert site_rsp(0x7000F000 - 296) == 0x7000F000
    with pytest.raises(KeyError):
        pack_frame({"fs_base": 1})
