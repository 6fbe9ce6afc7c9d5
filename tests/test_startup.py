"""Start-up: what the command line imports, and the per-file cache on disk
(uprobe_opt.filecache) that lets a second run skip pyelftools and numpy.  Timing goals
live in scripts/bench_freeze (launch-to-live); these tests assert what is imported and
what is read, exactly."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from uprobe_opt import filecache
from uprobe_opt.testing import build_target

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("numpy", "capstone", "keystone", "elftools", "rich", "perfetto", "unicorn",
         "psutil", "ptrace")


def _modules_after(code: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter: the heavy packages and our own modules it
    left in sys.modules, and under "out" what the code printed as JSON (if it did)."""
    probe = (f"{code}\nimport sys, json\n"
             f"print(json.dumps({{'heavy': sorted({{m.split('.')[0] for m in sys.modules}}"
             f" & set({HEAVY!r})), 'ours': sorted(m for m in sys.modules "
             f"if m.split('.')[0] == 'uprobe_opt')}}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    got = json.loads(lines[-1])
    if len(lines) > 1:
        got["out"] = json.loads(lines[-2])
    return got


def test_import_of_cli_imports_nothing_heavy():
    got = _modules_after("import uprobe_opt.cli")
    assert got == {"heavy": [], "ours": ["uprobe_opt", "uprobe_opt.cli", "uprobe_opt.errors"]}


@pytest.mark.parametrize("argv", [["--help"], ["trace", "--help"]])
def test_help_imports_nothing_heavy(argv):
    code = ("import contextlib, io\nfrom uprobe_opt.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass")
    got = _modules_after(code)
    assert got == {"heavy": [], "ours": [
        "uprobe_opt", "uprobe_opt.cli", "uprobe_opt.errors", "uprobe_opt.listing",
        "uprobe_opt.output", "uprobe_opt.relocheck_args", "uprobe_opt.run",
        "uprobe_opt.top"]}


# -- the per-file cache ---------------------------------------------------------------

def _resolve_in_fresh_process(binary: Path, cache: Path, name: str = "work") -> dict:
    """Resolve ``name`` in ``binary`` (binary mode) and read its landing pads, in a
    fresh interpreter whose cache directory is under ``cache``."""
    code = ("import json\nfrom uprobe_opt.symbols import SymbolResolver\n"
            f"r = SymbolResolver(binary={str(binary)!r})\n"
            f"s = r.resolve({name!r})\n"
            "from uprobe_opt import ehtable\n"
            "st = ehtable.stats(r.local_path(r.find_object(s.addr)))\n"
            "print(json.dumps({'addr': s.addr, 'size': s.func_size, "
            "'eh_reason': st['reason'], 'eh_fdes': st['fdes']}))")
    got = _modules_after(code, {"UPROBE_OPT_CACHE": str(cache / "targets")})
    got.update(got.pop("out"))
    return got


def _nm_work(path: Path) -> tuple[int, int]:
    out = subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3] == "work":
            return int(parts[0], 16), int(parts[1], 16)
    raise LookupError("work")


def test_second_run_reads_symbols_and_eh_tables_from_the_cache(tmp_path):
    exe = build_target("loop")
    addr, size = _nm_work(exe)
    cold = _resolve_in_fresh_process(exe, tmp_path)
    warm = _resolve_in_fresh_process(exe, tmp_path)
    for got in (cold, warm):
        assert (got["addr"], got["size"], got["eh_reason"]) == (addr, size,
                                                               "no .gcc_except_table")
    assert "elftools" in cold["heavy"] and "numpy" in cold["heavy"]
    # python-ptrace comes with uprobe_opt.target (the maps reader's package)
    assert warm["heavy"] == ["ptrace"] and warm["eh_fdes"] == cold["eh_fdes"]
    kinds = sorted(p.name.split("-")[0] for p in (tmp_path / "files").iterdir())
    assert kinds == ["eh1", "elf1", "syms1"]


def test_corrupt_truncated_or_foreign_entries_are_ignored_and_replaced(tmp_path):
    exe = build_target("loop")
    addr, size = _nm_work(exe)
    _resolve_in_fresh_process(exe, tmp_path)
    good = {p: p.read_bytes() for p in sorted((tmp_path / "files").iterdir())}
    damage = [lambda b: b[:-1] + bytes([b[-1] ^ 1]),          # a payload byte flipped
              lambda b: b[:len(b) // 2],                      # truncated
              lambda b: b"garbage\n" + b[8:],                 # not our header
              lambda b: b""]                                  # empty
    for hurt in damage:
        for p, blob in good.items():
            p.write_bytes(hurt(blob))
        got = _resolve_in_fresh_process(exe, tmp_path)
        assert (got["addr"], got["size"]) == (addr, size)
        assert "elftools" in got["heavy"]               # parsed again, not trusted
        again = _resolve_in_fresh_process(exe, tmp_path)
        assert (again["addr"], again["heavy"]) == (addr, ["ptrace"])   # stored again


def test_a_file_rewritten_in_place_is_parsed_again(tmp_path):
    """Same path and inode, other content: the key (mtime, ctime, size) differs."""
    a, b = build_target("loop"), build_target("threads")
    path = tmp_path / "prog"
    shutil.copyfile(a, path)
    ino = path.stat().st_ino
    first = _resolve_in_fresh_process(path, tmp_path, "main")
    shutil.copyfile(b, path)                            # truncates and writes: same inode
    assert path.stat().st_ino == ino
    second = _resolve_in_fresh_process(path, tmp_path, "main")
    nm_main = {p: next(int(ln.split()[0], 16) for ln in subprocess.run(
        ["nm", "--defined-only", str(p)], capture_output=True, text=True,
        check=True).stdout.splitlines() if ln.split()[-1] == "main") for p in (a, b)}
    assert (first["addr"], second["addr"]) == (nm_main[a], nm_main[b])


def test_filecache_round_trip_and_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("UPROBE_OPT_CACHE", str(tmp_path / "targets"))
    f = tmp_path / "some-file"
    f.write_bytes(b"x" * 10)
    st = f.stat()
    value = ([(1, "a", None, True)], {7: (1, 2)}, "s")
    assert filecache.load("k", st, 1) is None
    filecache.store("k", st, 1, value)
    assert filecache.load("k", st, 1) == value
    assert filecache.load("k", st, 2) is None           # another format version
    assert filecache.load("other", st, 1) is None       # another kind
    f.write_bytes(b"y" * 11)                            # another size, mtime, ctime
    assert filecache.load("k", f.stat(), 1) is None
    filecache.store("k", st, 1, object())               # not marshal-able: not stored
    assert filecache.load("k", st, 1) == value
    assert not [p for p in (tmp_path / "files").iterdir() if p.name.endswith(".tmp")]
