"""The command's output: which stream it uses, write errors, what is shown for each
handler, and the summary's end line (README, "Output" and "Exit status")."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest

from helpers import (ROOT, UPROBE_OPT, UPROBE_OPT_COMMAND, exec_mappings, reached,
                     tracer_pid, wait_for_line)

STATUS_LOOP = r'''
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
__attribute__((noipa)) long f(int i, long x) { return x + (long)i * 3 + 1; }
/* Calls f() about every ms until stdin says: 'x' exit 5, 'k' raise SIGUSR1. */
int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    long n = 0;
    int i = 0;
    for (;;) {
        n = f(i++, n);
        struct pollfd p = {0, POLLIN, 0};
        if (poll(&p, 1, 1) > 0) {
            char c = 0;
            if (read(0, &c, 1) != 1 || c == 'x') return 5;
            if (c == 'k') raise(SIGUSR1);
        }
    }
}
'''


def cli(*args, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(UPROBE_OPT + [str(a) for a in args], cwd=ROOT, timeout=120, **kw)


def plain(argv) -> bytes:
    return subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE, check=True,
                          timeout=60).stdout


def summary(text: str) -> dict:
    lines = [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]
    (s,) = [ln for ln in lines if ln["event"] == "summary"]
    return s


@pytest.fixture
def status_loop(c_target, tmp_path):
    src = tmp_path / "status_loop.c"
    src.write_text(STATUS_LOOP)
    exe = c_target(src)
    procs = []

    def start():
        p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout.readline() == b"ready\n"
        return p
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


# -- streams ---------------------------------------------------------------------------

@pytest.mark.parametrize("handler", ["record", "count"])
def test_spawn_mode_stdout_is_the_programs_summary_on_stderr(c_target, handler):
    exe = c_target("loop")
    res = cli("trace", "work", "--handler", handler, "--args", "1", "--", exe, "1000")
    assert res.returncode == 0, res.stderr
    assert res.stdout == plain([exe, "1000"]) == b"loop: 1000 calls, sum=1499500\n"
    err = res.stderr.decode().splitlines()
    hits = [ln for ln in err if ln.split()[2:3] == ["work"]]
    assert [int(ln.split()[3], 16) for ln in hits] == (list(range(1000))
                                                        if handler == "record" else [])
    table = err[len(hits):]
    assert table[0].split() == ["PROBE", "ADDRESS", "STATE", "HITS", "NMISSED", "REASON"]
    assert table[1].split()[0::2] == ["work", "optimized", "0"]
    assert table[1].split()[3] == "1000"
    assert table[2].startswith("uprobe-opt: ended: target exited with status 0 after ")
    assert table[2].endswith(" s (attached mode, 0 handler errors)")
    assert len(table) == 3


def test_attach_mode_keeps_stdout(status_loop):
    target = status_loop()
    p = subprocess.Popen(UPROBE_OPT + ["trace", "-p", str(target.pid), "f", "--args", "1"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(p.stdout, " ")                    # a hit line: armed and hitting
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and err == ""
    assert out.splitlines()[-1].startswith("uprobe-opt: ended: tracer interrupted by SIGINT")
    assert tracer_pid(target.pid) == 0


# -- write errors ----------------------------------------------------------------------

def _one_error_line(err: str, line: str) -> None:
    assert "Traceback" not in err and "Fatal" not in err, err
    assert err.splitlines()[-1] == line
    assert err.count("uprobe-opt: writing") == 1


def test_output_to_dev_full_spawn_mode(c_target):
    """-o /dev/full: the first drained batch fails, the trace ends (detach), the
    program runs on untraced to its end with its own output, we exit 74."""
    exe = c_target("loop")
    argv = [exe, "20000", "1000"]               # about 0.2 s of calls
    res = cli("trace", "work", "-o", "/dev/full", "--", *argv)
    err = res.stderr.decode()
    assert res.returncode == 74, err
    assert res.stdout == plain(argv) == b"loop: 20000 calls, sum=599990000\n"
    _one_error_line(err, "uprobe-opt: writing /dev/full: No space left on device")
    assert "uprobe-opt: ended: output closed (writing /dev/full: No space left on " \
           "device) after " in err                   # the summary went to stderr instead


@pytest.mark.parametrize("where, redirect, line", [
    ("stdout /dev/full", "stdout", "writing <stdout>: No space left on device"),
    ("-o /dev/full", "-o", "writing /dev/full: No space left on device"),
    ("-o /proc/version", "-o", "writing /proc/version: Input/output error"),
])
def test_output_write_errors_attach_mode_target_unharmed(status_loop, where, redirect,
                                                          line):
    target = status_loop()
    before = exec_mappings(target.pid)
    args = ["trace", "-p", target.pid, "f", "--json"]
    if redirect == "-o":
        res = cli(*args, "-o", where.split()[1])
    else:
        with open("/dev/full", "w") as full:
            res = cli(*args, stdout=full)
    err = res.stderr.decode()
    assert res.returncode == 74, err
    _one_error_line(err, f"uprobe-opt: {line}")
    s = summary(err)                               # the summary went to stderr instead
    assert s["end"] == {"reason": "output", "status": None, "signal": None,
                        "message": f"output closed ({line})"}
    assert target.poll() is None and tracer_pid(target.pid) == 0
    assert exec_mappings(target.pid) == before
    target.stdin.write(b"x")
    target.stdin.flush()
    assert target.wait(timeout=30) == 5


def test_output_into_a_closed_pipe_attach_mode(status_loop):
    """`uprobe-opt trace -p PID f | head -1`: exit 141, one line, target unharmed."""
    target = status_loop()
    before = exec_mappings(target.pid)
    p = subprocess.Popen(UPROBE_OPT + ["trace", "-p", str(target.pid), "f"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(p.stdout, " ")
    p.stdout.close()                              # the reader is gone
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141, err
    _one_error_line(err, "uprobe-opt: writing <stdout>: Broken pipe")
    assert "uprobe-opt: ended: output closed (writing <stdout>: Broken pipe) after " in err
    assert target.poll() is None and tracer_pid(target.pid) == 0
    assert exec_mappings(target.pid) == before


# -- handlers and what is shown ----------------------------------------------------------

def test_record_json_file_holds_one_line_per_hit(c_target, tmp_path):
    exe = c_target("loop")
    out = tmp_path / "o.jsonl"
    res = cli("trace", "work", "--handler", "record", "--json", "--args", "1", "-o", out,
              "--", exe, "3000")
    assert res.returncode == 0, res.stderr
    assert res.stdout == plain([exe, "3000"]) and res.stderr == b""
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    hits = [ln for ln in lines if ln["event"] == "hit"]
    assert [h["args"] for h in hits] == [[i] for i in range(3000)]
    assert lines[-1]["probes"][0]["hits"] == 3000 and lines[-1]["probes"][0]["nmissed"] == 0
    assert len(lines) == 3001


def test_python_handler_lines_and_quiet_record(c_target, tmp_path):
    exe = c_target("loop")
    h = tmp_path / "h.py"
    h.write_text("def on_hit(probe, regs):\n    print('seen', regs.rdi)\n")
    out = tmp_path / "p.jsonl"
    res = cli("trace", "work", "--handler", "python", "--python", f"{h}:on_hit", "--lines",
              "--json", "-o", out, "--", exe, "50")
    assert res.returncode == 0, res.stderr
    assert res.stdout == plain([exe, "50"])             # the handler's print() is ours
    text = out.read_text().splitlines()
    assert [ln for ln in text if ln.startswith("seen")] == [f"seen {i}" for i in range(50)]
    hits = [json.loads(ln) for ln in text if ln.startswith('{"event": "hit"')]
    assert [h["args"][0] for h in hits] == list(range(50))
    quiet = cli("trace", "work", "-q", "--json", "--", exe, "50")
    assert quiet.returncode == 0
    assert [json.loads(ln)["event"] for ln in quiet.stderr.splitlines()] == ["summary"]
    assert summary(quiet.stderr.decode())["probes"][0]["hits"] == 50
    bad = cli("trace", "work", "--handler", "count", "--lines", "--", exe, "5")
    assert bad.returncode == 2 and b"--lines needs a record per hit" in bad.stderr


# -- how a run ended ---------------------------------------------------------------------

def test_end_exited_and_killed_spawn_mode(c_target, tmp_path):
    src = tmp_path / "ends.c"
    src.write_text('#include <signal.h>\n#include <stdlib.h>\n'
                   '__attribute__((noipa)) int f(int x){return x+1;}\n'
                   'int main(int c, char **v){int s=0; for(int i=0;i<7;i++) s+=f(i);\n'
                   'if (c > 1) raise(SIGUSR1); return s - 25;}\n')
    exe = c_target(src)
    res = cli("trace", "f", "--handler", "count", "--json", "--", exe)
    s = summary(res.stderr.decode())
    assert res.returncode == 3
    assert s["end"] == {"reason": "exited", "status": 3, "signal": None,
                        "message": "target exited with status 3"}
    assert s["probes"][0]["hits"] == 7 and s["handler_errors"] == 0
    assert s["mode"] in ("attached", "hands-off")
    res = cli("trace", "f", "--handler", "count", "--json", "--", exe, "kill")
    assert res.returncode == 128 + signal.SIGUSR1
    assert summary(res.stderr.decode())["end"] == {
        "reason": "killed", "status": None, "signal": 10,
        "message": "target killed by signal 10 (SIGUSR1)"}


@pytest.mark.parametrize("key, end, note", [
    (b"x", {"reason": "exited", "status": 5, "signal": None,
            "message": "target exited with status 5"}, "target exited with status 5"),
    (b"k", {"reason": "killed", "status": None, "signal": 10,
            "message": "target killed by signal 10 (SIGUSR1)"},
     "target killed by signal 10 (SIGUSR1)"),
])
def test_attach_mode_says_the_target_ended(status_loop, key, end, note):
    target = status_loop()
    p = subprocess.Popen(UPROBE_OPT + ["trace", "-p", str(target.pid), "f", "--json"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(p.stdout, '{"event": "hit"')
    target.stdin.write(key)
    target.stdin.flush()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and err == ""
    notes = [json.loads(ln)["message"] for ln in out.splitlines() if '"note"' in ln]
    assert notes == [f"{note} (pid {target.pid})"]
    assert summary(out)["end"] == end


def test_end_duration_interrupted_and_handler_errors(status_loop, tmp_path):
    target = status_loop()
    h = tmp_path / "h.py"
    h.write_text("def boom(probe, regs):\n    raise ValueError(regs.rdi)\n")
    res = cli("trace", "-p", target.pid, "f", "--handler", "python", "--python",
              f"{h}:boom", "--json", "--duration", "0.3")
    s = summary(res.stdout.decode())
    assert res.returncode == 0
    assert s["end"] == {"reason": "duration", "status": None, "signal": None,
                        "message": "duration reached"}
    assert s["handler_errors"] == s["probes"][0]["hits"] > 0
    p = subprocess.Popen(UPROBE_OPT + ["trace", "-p", str(target.pid), "f", "--json"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(p.stdout, '{"event": "hit"')
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    assert summary(out)["end"] == {"reason": "interrupted", "status": None, "signal": 15,
                                   "message": "tracer interrupted by SIGTERM"}
    assert target.poll() is None and tracer_pid(target.pid) == 0


# -- top -----------------------------------------------------------------------------------

class Tmux:
    """A detached tmux server of our own (a real terminal): run, type, read the screen.
    The pane stays after its command exited (remain-on-exit) so the screen can still
    be read."""

    def __init__(self, name: str, tmp_path):
        self.sock = name
        self.conf = tmp_path / "tmux.conf"
        self.conf.write_text("set -g remain-on-exit on\n")

    def __call__(self, *args) -> str:
        return subprocess.run(["tmux", "-L", self.sock, "-f", str(self.conf), *args],
                              capture_output=True, text=True, timeout=30,
                              check=True).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top")


def _top_total(screen: str) -> int | None:
    """TOTAL of the `f` row of the top screen, None until it is drawn."""
    for line in screen.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 6 and cells[1] == "f" and cells[3] == "optimized":
            return int(cells[5].replace(",", ""))
    return None


def _start_top(tmux, target, spec: str, shell_prefix: str = "") -> None:
    """`uprobe-opt top -p PID SPEC` in a 160x40 tmux session named "top"; the shell
    prints EXIT=<status> when it returns."""
    cmd = " ".join(shlex.quote(str(a)) for a in UPROBE_OPT + [
        "top", "-p", target.pid, spec, "--interval", "0.2"])
    tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "40", "-c", str(ROOT),
         f"sh -c '{shell_prefix}{cmd}; echo EXIT=$?'")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed "
                    "(scripts/_setup.sh installs it when it can)")
@pytest.mark.parametrize("key, end", [("q", "quit"), ("C-c", "tracer interrupted by SIGINT")])
def test_top_in_a_terminal(status_loop, tmp_path, key, end):
    """`uprobe-opt top` in tmux: the probe row's TOTAL grows from one refresh to the
    next; q (or Ctrl-C) leaves with a clean detach and the summary on the screen."""
    target = status_loop()
    before = exec_mappings(target.pid)
    tmux = Tmux(f"uprobe-opt-test-{os.getpid()}-{key}", tmp_path)
    try:
        # `trap true INT`: the shell outlives a Ctrl-C to tell our exit status (the
        # command itself starts with the default SIGINT disposition).
        _start_top(tmux, target, "f", shell_prefix="trap true INT; ")
        totals = []

        def grown() -> bool:
            n = _top_total(tmux.screen())
            if n is not None and (not totals or n != totals[-1]):
                totals.append(n)
            return len(totals) >= 3
        wait_until(grown, 60, "three different TOTALs on the top screen")
        assert totals == sorted(totals) and totals[0] > 0
        assert "pid %d" % target.pid in tmux.screen() and "threads 1" in tmux.screen()
        tmux("send-keys", "-t", "top", key)
        wait_until(lambda: "EXIT=" in tmux.screen(), 60, "top to exit")
        screen = tmux.screen()
        assert "EXIT=0" in screen and "Traceback" not in screen, screen
        assert f"uprobe-opt: ended: {end} after " in screen
        row = [ln.split() for ln in screen.splitlines() if ln.startswith("f ")]
        assert row and row[0][2] == "optimized" and int(row[0][3]) >= totals[-1]
        assert target.poll() is None and tracer_pid(target.pid) == 0
        assert exec_mappings(target.pid) == before
    finally:
        subprocess.run(["tmux", "-L", tmux.sock, "kill-server"], capture_output=True)


def test_top_q_typed_at_once_is_not_lost(status_loop, tmp_path):
    """A q typed right after Enter, while top still attaches and arms (the terminal
    is not in cbreak mode yet, or only just): top leaves as soon as it can, cleanly."""
    target = status_loop()
    before = exec_mappings(target.pid)
    tmux = Tmux(f"uprobe-opt-test-{os.getpid()}-early", tmp_path)
    try:
        _start_top(tmux, target, "f")
        wait_until(lambda: reached(target.pid), 60, "top to attach")
        tmux("send-keys", "-t", "top", "q")
        wait_until(lambda: "EXIT=" in tmux.screen(), 60, "top to exit")
        screen = tmux.screen()
        assert "EXIT=0" in screen and "Traceback" not in screen, screen
        assert "uprobe-opt: ended: quit after " in screen, screen
        assert target.poll() is None and tracer_pid(target.pid) == 0
        assert exec_mappings(target.pid) == before
    finally:
        subprocess.run(["tmux", "-L", tmux.sock, "kill-server"], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_top_shows_a_return_probes_exits(status_loop, tmp_path):
    """top -p PID 'f%return': the return probe's row, then one indented row per exit
    (as in the summary), each with a TOTAL that grows and equals the entry's."""
    target = status_loop()
    tmux = Tmux(f"uprobe-opt-test-{os.getpid()}-ret", tmp_path)
    try:
        _start_top(tmux, target, "f%return")

        def rows() -> dict[str, int]:
            out = {}
            for line in tmux.screen().splitlines():
                cells = [c.strip() for c in line.split("│")]
                if len(cells) > 6 and cells[1].startswith(("f%return", "ret at f+")):
                    out[cells[1]] = int(cells[5].replace(",", ""))
            return out
        wait_until(lambda: len(rows()) == 2 and min(rows().values()) > 0, 60,
                   "the return probe's row and its exit's row")
        (exit_row,) = [k for k in rows() if k.startswith("ret at f+")]
        tmux("send-keys", "-t", "top", "q")
        wait_until(lambda: "EXIT=" in tmux.screen(), 60, "top to exit")
        screen = tmux.screen()
        assert "EXIT=0" in screen and "Traceback" not in screen, screen
        lines = screen.splitlines()            # the summary: the same two rows
        assert any(ln.startswith("f%return ") for ln in lines), screen
        assert any(ln.startswith(f"  {exit_row} ") for ln in lines), screen
        assert target.poll() is None and tracer_pid(target.pid) == 0
    finally:
        subprocess.run(["tmux", "-L", tmux.sock, "kill-server"], capture_output=True)


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- progress bars -------------------------------------------------------------------------

MANY = 600


@pytest.fixture(scope="module")
def many_functions(tmp_path_factory):
    """A program with MANY small functions, each called once."""
    from uprobe_opt.testing import build_c
    src = tmp_path_factory.mktemp("many") / "many.c"
    body = "".join(f"__attribute__((noipa)) long f{i}(long x) "
                   f"{{ return x * {i + 3} + (x >> 3) + {i}; }}\n" for i in range(MANY))
    calls = "".join(f"    s = f{i}(s);\n" for i in range(MANY))
    src.write_text(f"#include <stdio.h>\n{body}int main(void) {{\n    long s = 1;\n"
                   f"{calls}    printf(\"s=%ld\\n\", s);\n    return 0;\n}}\n")
    return build_c(src)


def test_no_progress_bar_when_stderr_is_not_a_terminal(many_functions, tmp_path):
    specs = [f"f{i}" for i in range(MANY)]
    res = cli("trace", *specs, "--handler", "count", "-o", tmp_path / "out",
              "--", many_functions)
    assert res.returncode == 0 and res.stderr == b""
    assert res.stdout == plain([many_functions])
    rows = [ln.split() for ln in (tmp_path / "out").read_text().splitlines()[1:-1]]
    assert len(rows) == MANY and all(r[3] == "1" for r in rows)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
@pytest.mark.parametrize("what", ["trace", "check-reloc"])
def test_progress_bar_on_a_terminal(many_functions, tmp_path, what):
    """On a terminal, long work draws a rich progress bar on stderr: everything the
    pane receives is recorded (pipe-pane) from before the command starts."""
    if what == "trace":
        args = ["trace", *[f"f{i}" for i in range(MANY)], "--handler", "count", "-o",
                tmp_path / "out", "--", many_functions]
        bar = "uprobe-opt: optimizing"
    else:
        args = ["check-reloc", many_functions]
        bar = f"uprobe-opt: check-reloc {os.path.basename(many_functions)}"
    tmux = Tmux(f"uprobe-opt-test-{os.getpid()}-{what}", tmp_path)
    log = tmp_path / "pane.log"
    try:
        cmd = " ".join(shlex.quote(str(a)) for a in UPROBE_OPT + args)
        tmux("new-session", "-d", "-s", "top", "-x", "120", "-y", "30", "-c", str(ROOT),
             f"sh -c 'read go; {cmd} > {tmp_path}/stdout; echo EXIT=$?'")
        tmux("pipe-pane", "-t", "top", "-o", f"cat >> {log}")
        tmux("send-keys", "-t", "top", "go", "Enter")
        wait_until(lambda: "EXIT=" in tmux.screen(), 120, f"{what} to finish")
        assert "EXIT=0" in tmux.screen(), tmux.screen()
        seen = log.read_bytes().decode(errors="replace")
        assert bar in seen and "━" in seen
        assert bar not in tmux.screen()                  # transient: gone when done
    finally:
        subprocess.run(["tmux", "-L", tmux.sock, "kill-server"], capture_output=True)


# -- early signals -------------------------------------------------------------------------

def test_sigint_during_start_up_ends_quietly(status_loop):
    """SIGINT sent at growing delays after the installed command starts, until one
    lands after the trace began: every earlier one ends the command quietly (128+2
    from our handler, or the plain SIGINT death of the launcher before Python runs),
    never a "Fatal Python error" or a traceback, and the target is never touched."""
    target = status_loop()
    before = exec_mappings(target.pid)
    quiet = []
    delay = 0.0005
    while True:
        p = subprocess.Popen(UPROBE_OPT_COMMAND + ["trace", "-p", str(target.pid), "f", "--handler",
                              "count"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        time.sleep(delay)                 # when the signal is sent, not a synchronisation
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert "Fatal" not in err and "Traceback" not in err, (delay, err)
        if "uprobe-opt: ended: tracer interrupted by SIGINT" in out:
            assert p.returncode == 0 and err == ""
            break                         # it had started: the normal Ctrl-C end
        assert (p.returncode, out, err) in ((130, "", ""), (-signal.SIGINT, "", "")), delay
        quiet.append(p.returncode)
        assert tracer_pid(target.pid) == 0 and exec_mappings(target.pid) == before
        delay *= 1.5
        assert delay < 60, quiet
    assert 130 in quiet, quiet            # at least one landed while Python started
    assert tracer_pid(target.pid) == 0 and exec_mappings(target.pid) == before


# -- report commands and --perfetto: output errors -------------------------------------

@pytest.mark.parametrize("command", [["list", "-p", "{pid}", "libc:str*"],
                                     ["list", "--json", "-p", "{pid}", "libc:mem*"],
                                     ["explain", "-p", "{pid}", "libc:str*"],
                                     ["check-reloc", "{exe}"]])
def test_report_commands_output_errors(status_loop, c_target, command):
    """list, explain and check-reloc: into /dev/full one line and 74, into a closed
    pipe 141; never a traceback; the target (read only) untouched."""
    target = status_loop()
    before = exec_mappings(target.pid)
    argv = [a.format(pid=target.pid, exe=c_target("loop")) for a in command]
    with open("/dev/full", "w") as full:
        res = cli(*argv, stdout=full)
    err = res.stderr.decode()
    assert res.returncode == 74, err
    _one_error_line(err, "uprobe-opt: writing <stdout>: No space left on device")
    r, w = os.pipe()
    os.close(r)                                   # the reader is gone before the start
    try:
        res = cli(*argv, stdout=w)
    finally:
        os.close(w)
    err = res.stderr.decode()
    assert res.returncode == 141 and "Traceback" not in err, err
    assert tracer_pid(target.pid) == 0 and exec_mappings(target.pid) == before


def test_perfetto_checked_before_anything_is_touched(status_loop):
    """--perfetto into a directory that does not exist, or with a handler that keeps
    no record per hit: bad input, exit 2, before the target is touched."""
    target = status_loop()
    before = exec_mappings(target.pid)
    for extra, line in [
            (["--perfetto", "/nonexistent/dir/x.pf"],
             "uprobe-opt: --perfetto /nonexistent/dir/x.pf: No such file or directory"),
            (["--perfetto", ""], "uprobe-opt: --perfetto needs a file name"),
            (["--perfetto", "/tmp/x.pf", "--handler", "count"],
             "uprobe-opt: --perfetto needs --handler record or latency (--handler count "
             "keeps no record of each hit)")]:
        res = cli("trace", "-p", target.pid, "f%return", *extra)
        err = res.stderr.decode()
        assert res.returncode == 2 and err.splitlines() == [line], err
    assert tracer_pid(target.pid) == 0 and exec_mappings(target.pid) == before


def test_perfetto_write_error_is_an_output_error(c_target):
    """--perfetto /dev/full: the trace runs, the program's output is its own, then one
    line and exit 74 (an output error takes precedence over the program's status)."""
    exe = c_target("loop")
    res = cli("trace", "work%return", "--handler", "latency", "--perfetto", "/dev/full",
              "-q", "--", exe, "1000")
    err = res.stderr.decode()
    assert res.returncode == 74, err
    assert res.stdout == plain([exe, "1000"])
    _one_error_line(err, "uprobe-opt: writing /dev/full: No space left on device")


def test_spawned_program_killed_before_its_entry_point(tmp_path):
    """A program that dies before its entry point (here: SIGKILL from a library
    constructor, which ld.so runs first; the same as a kill between its execve and
    our sight of it): an empty summary, how it ended, its status as ours."""
    lib, prog = tmp_path / "libk.so", tmp_path / "prog"
    (tmp_path / "k.c").write_text("#include <signal.h>\n#include <unistd.h>\n"
                                  "__attribute__((constructor)) static void k(void)"
                                  " { kill(getpid(), SIGKILL); }\nvoid k_fn(void) {}\n")
    (tmp_path / "p.c").write_text("void k_fn(void);\nint main(void) { k_fn(); return 0; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", lib, tmp_path / "k.c"], check=True)
    subprocess.run(["gcc", "-o", prog, tmp_path / "p.c", f"-L{tmp_path}", "-lk",
                    f"-Wl,-rpath,{tmp_path}"], check=True)
    res = cli("trace", "main", "--handler", "count", "--", prog)
    err = res.stderr.decode()
    assert res.returncode == 137 and "Traceback" not in err, err
    assert err.splitlines()[-2:] == [
        "PROBE  ADDRESS  STATE  HITS  NMISSED  REASON",
        "uprobe-opt: ended: target killed by signal 9 (SIGKILL) after 0.00 s (attached "
        "mode, 0 handler errors)"], err


def test_bad_input_with_stderr_unwritable_is_still_exit_2():
    """`2>/dev/full`: the one line cannot be written, the status still says bad input."""
    with open("/dev/full", "w") as full:
        res = cli("trace", "-p", "999999", "libc:malloc", stderr=full)
    assert res.returncode == 2
