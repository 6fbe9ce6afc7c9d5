"""uprobe_opt.target.perf: kernel uprobes scoped to one process, on real processes.

Each test also pins down one fact about kernel/events/uprobes.c on the running kernel
(the facts the hand-over of an int3 site to the kernel relies on):

* registering over a byte that is already an int3 writes nothing (verify_opcode),
  and from then on the kernel, not ptrace, takes the trap: no SIGTRAP reaches the
  target or the tracer, no hit is lost or counted twice;
* the instruction the kernel runs out of line is the file's (copy_insn reads the page
  cache), not the bytes in the process's page;
* closing the last event writes back the first byte of that copy where an int3 still
  is (set_orig_insn), and nothing else;
* a process mapping the same file but not traced is never touched.
"""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import time

import numpy as np
import pytest

from helpers import exec_mappings, proc_state
from uprobe_opt import Tracer
from uprobe_opt.core.probe import ProbeState
from uprobe_opt.symbols import SymbolResolver
from uprobe_opt.target import Target, perf
from uprobe_opt.testing import build_target

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def kernel():
    """Skip (with the reason) where kernel uprobes through perf cannot be used."""
    from helpers import kernel_uprobes_unavailable
    reason = kernel_uprobes_unavailable()
    if reason is not None:
        pytest.skip(f"kernel uprobes unavailable: {reason}")
    return perf


def _spawned(name: str, *args, flags=()):
    """The target, stopped at its entry point (nothing of main has run), its stdout
    on a pipe."""
    exe = build_target(name, flags=list(flags))
    r, w = os.pipe()
    t = Target.spawn([str(exe), *map(str, args)], stdout=w)
    os.close(w)
    return t, r


def _where(pid: int, spec: str, maps) -> tuple[int, str, int]:
    addr = SymbolResolver(pid=pid).resolve(spec).addr
    path, offset, _, _ = perf.file_location(pid, addr, maps)
    return addr, path, offset


def _finish(pid: int, r: int) -> tuple[int, str]:
    _, status = os.waitpid(pid, 0)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    return os.waitstatus_to_exitcode(status), out.decode()


def _reference(name: str, *args) -> str:
    return subprocess.run([str(build_target(name)), *map(str, args)], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.parametrize("name,spec,k", [("hz_switch", "classify", 200_000),
                                         ("hz_short", "tiny3", 200_000),
                                         ("hz_short", "tiny1", 200_000)])
def test_count_exact_on_sites_we_refuse_to_optimize(kernel, name, spec, k):
    t, r = _spawned(name, k)
    pid = t.pid
    _, path, offset = _where(pid, spec, t.maps())
    with kernel.KernelUprobes(pid) as ku:
        ku.add(1, path, offset, t.tids)
        t.detach()                       # no tracer at all: the kernel serves every hit
        code, out = _finish(pid, r)
        assert code == 0 and out == _reference(name, k)
        assert ku.count(1) == k


@pytest.mark.parametrize("backend", ["tracefs", "pmu"])
def test_records_carry_the_exact_tid_and_args(kernel, backend):
    n, m = 4, 5000
    t, r = _spawned("threads", n, m)
    pid = t.pid
    addr, path, offset = _where(pid, "hit", t.maps())
    ku = kernel.KernelUprobes(pid, backend=backend, ring_bytes=4 << 20)   # holds all
    try:
        ku.add(3, path, offset, t.tids, sample=True)
        if backend == "pmu":
            # The PMU cannot inherit (see perf._pmu_attr): open each new thread's event
            # at its first stop, before it runs, as the tracer does while attached.
            t.thread_hook = ku.add_thread
            t.resume_all()
            batches = []
            while not t.exited:
                t.poll(0.05)
                batches.append(ku.take())
            batches.append(ku.take(final=True))
            recs = np.concatenate(batches)
            code = os.waitstatus_to_exitcode(t.exit_status)
            out = os.read(r, 4096).decode()
            t.detach()
        else:
            t.detach()
            batches = []
            while proc_state(pid) != "Z":
                batches.append(ku.take())
                time.sleep(0.01)
            batches.append(ku.take(final=True))
            recs = np.concatenate(batches)
            code, out = _finish(pid, r)
        assert code == 0 and out == _reference("threads", n, m)
        assert ku.count(3) == n * m == len(recs) and ku.nmissed(3) == 0
        assert (recs["key"] == 3).all() and (recs["ip"] == addr).all()
        assert (recs["pid"] == pid).all()
        pairs = sorted(zip(recs["args"][:, 0].tolist(), recs["args"][:, 1].tolist()))
        assert pairs == sorted((w, i) for w in range(n) for i in range(m))
        # Each worker is one thread, and each thread made its calls in order.
        by_worker = {}
        for w in range(n):
            mine = recs[recs["args"][:, 0] == w]
            by_worker[w] = set(mine["tid"].tolist())
            assert mine["args"][:, 1].tolist() == list(range(m))
        assert all(len(tids) == 1 for tids in by_worker.values())
        assert len(set().union(*by_worker.values())) == n
        assert pid not in set().union(*by_worker.values())       # the workers, not main
        now = time.monotonic_ns()
        assert 0 < now - int(recs["time_ns"][-1]) < 60e9          # CLOCK_MONOTONIC
        for tid in set(recs["tid"].tolist()):
            assert (np.diff(recs["time_ns"][recs["tid"] == tid]) >= 0).all()
    finally:
        ku.close()


def test_full_ring_counts_nmissed_exactly(kernel):
    k = 20_000
    t, r = _spawned("hz_switch", k)
    pid = t.pid
    _, path, offset = _where(pid, "classify", t.maps())
    with kernel.KernelUprobes(pid, ring_bytes=4096) as ku:    # 39 samples fit
        ku.add(1, path, offset, t.tids, sample=True)
        t.detach()
        code, _ = _finish(pid, r)                   # nobody drains meanwhile
        recs = ku.take(final=True)
        assert code == 0 and ku.count(1) == k
        # Most hits found the ring full.  (The PERF_RECORD_LOST telling so is written
        # only once the ring has room again: never here.)
        assert 0 < len(recs) < k
        assert len(recs) + ku.nmissed(1) == k


def test_parse_records_takes_samples_in_bulk_around_other_records():
    def sample(i):
        return (struct.pack("<IHH", perf.PERF_RECORD_SAMPLE, 2, perf.SAMPLE_SIZE)
                + struct.pack("<QiiqQ", 77, 10, 11 + i, 1000 + i, 2)
                + struct.pack("<8Q", *range(i, i + 8)))
    lost = struct.pack("<IHH", perf.PERF_RECORD_LOST, 0, 48) + struct.pack("<QQ", 77, 5) \
        + bytes(24)
    throttle = struct.pack("<IHH", perf.PERF_RECORD_THROTTLE, 0, 48) + bytes(40)
    buf = sample(0) + sample(1) + lost + sample(2) + throttle + sample(3)
    raw, lost_recs, throttled = perf.parse_records(buf)
    assert raw["tid"].tolist() == [11, 12, 13, 14]
    assert raw["time"].tolist() == [1000, 1001, 1002, 1003]
    assert raw["regs"][2].tolist() == list(range(2, 10))
    assert lost_recs == [(77, 5)] and throttled == 1


def _page_of(t, addr: int) -> bytes:
    return t.read(addr & ~0xFFF, 4096)


def test_handover_of_our_int3_while_hot(kernel):
    """A site we armed (int3, refused for a jump: a jump table) is handed to the kernel
    while the program runs through it as fast as it can: every call is counted exactly
    once, by us before and by the kernel after; the kernel writes nothing over our
    int3; and once all is closed the code is byte-identical."""
    k = 200_000
    exe = build_target("hz_switch")
    r, w = os.pipe()
    tr = Tracer.spawn([exe, str(k)], stdout=w, kernel_uprobes=False)   # ours here
    os.close(w)
    probe = tr.add_probe("classify", handler="count")
    tr.run(until=lambda: probe.nhit >= 2000)      # hot: a stop per hit
    assert probe.state is ProbeState.INT3
    t, m = tr.target, tr.manager
    addr = probe.site.addr
    path, offset, _, _ = perf.file_location(t.pid, addr, t.maps())
    ku = kernel.KernelUprobes(t.pid)
    ku.prepare(1, path, offset)
    with m._stopped():                              # one window, every thread stopped
        for ev in t.poll(0):
            m.handle_event(ev, resume=False)      # a trap already taken is ours
        page = _page_of(t, addr)
        assert page[addr & 0xFFF] == 0xCC
        ku.arm(1, t.tids)
        assert _page_of(t, addr) == page          # verify_opcode: already an int3
        ours = probe.nhit
    m.release_held()
    tr.run()                                        # to the end; traps would come to us
    assert tr.exit_code == 0
    assert os.read(r, 4096).decode() == _reference("hz_switch", k)
    assert probe.nhit == ours                       # no trap reached the tracer since
    assert ours + ku.count(1) == k
    tr.detach()
    ku.close()


def test_kernel_runs_the_files_instruction_and_restores_one_byte(kernel):
    """Change the probed instruction in the process's page under our int3 (cmp
    $0xb,%edi -> cmp $0x0,%edi): the kernel still runs the file's instruction (the
    output stays right), and closing its event writes back the file's first byte
    only (our changed operand byte stays, our int3 is replaced)."""
    k = 100_000
    exe = build_target("hz_switch")
    r, w = os.pipe()
    tr = Tracer.spawn([exe, str(k)], stdout=w, kernel_uprobes=False)   # ours here
    os.close(w)
    probe = tr.add_probe("classify", handler="count")
    t = tr.target
    addr = probe.site.addr
    orig = bytes(probe.site.orig[:3])
    assert orig[0] == 0x83 and orig[2] == 0x0B    # cmp $0xb,%edi (targets/hz_switch.c)
    t.write(addr + 2, b"\x00")
    path, offset, _, _ = perf.file_location(t.pid, addr, t.maps())
    with open(path, "rb") as f:
        assert os.pread(f.fileno(), 3, offset) == orig
    ku = kernel.KernelUprobes(t.pid)
    ku.add(1, path, offset, t.tids)
    assert t.read(addr, 3) == b"\xcc\xff\x00"
    tr.run(until=lambda: ku.count(1) >= k // 2)   # the kernel serves; we see no trap
    m = tr.manager
    with m._stopped():
        for ev in t.poll(0):
            m.handle_event(ev, resume=False)
        ku.remove(1, wait=True)
        assert t.read(addr, 3) == b"\x83\xff\x00"   # set_orig_insn: one byte, the file's
        t.write(addr, b"\xcc")                     # ours again for the rest of the run
        t.write(addr + 2, orig[2:3])
    m.release_held()
    tr.run()
    assert tr.exit_code == 0
    assert os.read(r, 4096).decode() == _reference("hz_switch", k)
    tr.detach()
    ku.close()


def test_a_process_mapping_the_same_file_is_never_touched(kernel):
    k = 300_000
    exe = build_target("hz_switch")
    other = subprocess.Popen([exe, "1000000000000000"], stdout=subprocess.DEVNULL)
    try:
        t, r = _spawned("hz_switch", k)
        pid = t.pid
        addr_other = SymbolResolver(pid=other.pid).resolve("classify").addr
        with open(f"/proc/{other.pid}/mem", "rb", buffering=0) as mem:
            mem.seek(addr_other)
            orig = mem.read(4)
        _, path, offset = _where(pid, "classify", t.maps())
        with kernel.KernelUprobes(pid) as ku:
            ku.add(1, path, offset, t.tids)
            t.detach()
            while proc_state(pid) != "Z":
                with open(f"/proc/{other.pid}/mem", "rb", buffering=0) as mem:
                    mem.seek(addr_other)
                    assert mem.read(4) == orig
                assert proc_state(other.pid) in ("R", "S")
                time.sleep(0.005)
            code, out = _finish(pid, r)
            assert code == 0 and out == _reference("hz_switch", k)
            assert ku.count(1) == k                 # the other's calls are not counted
        with open(f"/proc/{other.pid}/maps") as f:
            assert "[uprobes]" not in f.read()      # never trapped: no XOL area there
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_closing_restores_the_byte_and_leaves_the_target_running(kernel):
    t, r = _spawned("sleeper", 0, 2)
    pid = t.pid
    addr, path, offset = _where(pid, "tick", t.maps())
    orig = t.read(addr, 1)
    before = exec_mappings(pid)
    ku = kernel.KernelUprobes(pid)
    ku.add(1, path, offset, t.tids)
    t.detach()
    deadline = time.monotonic() + 20
    while ku.count(1) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(addr)
        assert mem.read(1) == b"\xcc"               # the kernel's own int3 this time
    ku.close()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(addr)
        assert mem.read(1) == orig
    after = exec_mappings(pid)
    assert {k: v for k, v in after.items() if k in before} == before
    assert [k[2] for k in after if k not in before] in ([], ["[uprobes]"])
    assert proc_state(pid) in ("R", "S")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(r)


def test_forked_child_inherits_the_event(kernel):
    """tracefs backend: a child forked after arming carries the event (inherit=1):
    its hits count with the parent's, and it exits normally."""
    k = 100
    t, r = _spawned("forker", k)
    pid = t.pid
    _, path, offset = _where(pid, "counted", t.maps())
    with kernel.KernelUprobes(pid, backend="tracefs") as ku:
        ku.add(1, path, offset, t.tids)
        t.detach()
        code, out = _finish(pid, r)
        assert code == 0 and out == _reference("forker", k)
        assert ku.count(1) == 2 + k
