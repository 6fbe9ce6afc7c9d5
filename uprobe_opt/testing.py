"""Build helpers for the test targets in ``targets/``.

``build_c`` compiles a C (or C++, for ``.cc``/``.cpp``) source with gcc/g++ into a
content-addressed cache directory and returns the path of the result.  The cache key
covers everything that changes the output: the source bytes, the flags, the compiler
version, ``shared`` and the bytes of every library linked in.  The result is written
under a temporary name and renamed into place, so parallel builds (pytest-xdist, two
developers' test runs) never see a half-written binary.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import UsageError

__all__ = ["BuildError", "build_c", "build_target", "targets_dir", "cache_dir",
           "source_flags"]

DEFAULT_FLAGS: tuple[str, ...] = ("-O2", "-g", "-pthread")
CXX_SUFFIXES = (".cc", ".cpp", ".cxx", ".C")


class BuildError(UsageError):
    """The compiler failed; ``stderr`` holds its output, ``cmd`` the command line."""

    def __init__(self, msg: str, *, cmd: list[str], stderr: str):
        super().__init__(msg)
        self.cmd = cmd
        self.stderr = stderr


def targets_dir() -> Path:
    """The repository's ``targets/`` directory."""
    return Path(__file__).resolve().parent.parent / "targets"


def cache_dir() -> Path:
    """``$UPROBE_OPT_CACHE`` or ``~/.cache/uprobe-opt/targets``."""
    env = os.environ.get("UPROBE_OPT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "uprobe-opt" / "targets"


@functools.lru_cache(maxsize=None)
def _compiler_version(compiler: str) -> str:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0] if out.stdout else compiler


def _cache_key(src: bytes, compiler: str, flags: Sequence[str], shared: bool,
               libs: Sequence[Path]) -> str:
    h = hashlib.sha256()
    h.update(src)
    for part in (compiler, _compiler_version(compiler), repr(list(flags)), repr(shared)):
        h.update(b"\0" + part.encode())
    for lib in libs:
        h.update(b"\0" + str(lib).encode() + b"\0" + Path(lib).read_bytes())
    return h.hexdigest()[:16]


_FLAGS_RE = re.compile(rb"^\s*(?://|/\*|\*)?\s*build-flags:\s*(.*?)\s*(?:\*/)?\s*$", re.M)


def source_flags(src: bytes) -> list[str]:
    """Flags a target asks for itself with a ``build-flags: ...`` comment line (e.g.
    ``-fcf-protection=full``), so every builder of that target gets the same code shape."""
    return [f for m in _FLAGS_RE.finditer(src) for f in shlex.split(m.group(1).decode())]


def build_c(source: str | Path, *, out_dir: Path | None = None, flags: Sequence[str] = (),
            shared: bool = False, libs: Sequence[Path] = ()) -> Path:
    """Compile ``source`` and return the path of the executable (or ``.so`` if ``shared``).

    ``flags`` are added after the defaults (``-O2 -g -pthread``) and after the source's
    own ``build-flags:`` comment line (see :func:`source_flags`), so the caller's
    ``-O0`` or ``-no-pie`` win.  ``libs`` are shared libraries to link against; their directories are
    added with ``-Wl,-rpath`` so the program runs without LD_LIBRARY_PATH.
    Raises :class:`BuildError` with the compiler's stderr on failure.
    """
    source = Path(source)
    compiler = "g++" if source.suffix in CXX_SUFFIXES else "gcc"
    libs = [Path(lib).resolve() for lib in libs]
    src = source.read_bytes()
    all_flags = list(DEFAULT_FLAGS) + source_flags(src) + list(flags)
    if shared:
        all_flags += ["-shared", "-fPIC"]
    key = _cache_key(src, compiler, all_flags, shared, libs)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = source.stem
    if shared and not stem.startswith("lib"):
        stem = "lib" + stem
    name = f"{stem}-{key}.so" if shared else f"{stem}-{key}"
    out = out_dir / name
    if out.exists():
        return out
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out_dir)
    os.close(fd)
    cmd = [compiler, *all_flags, "-o", tmp, str(source)]
    if shared:  # DT_NEEDED of programs linking us = this name, found through their rpath
        cmd.append(f"-Wl,-soname,{name}")
    for lib in libs:
        cmd += [str(lib), f"-Wl,-rpath,{lib.parent}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"building {source.name} failed ({' '.join(cmd)}):\n{proc.stderr}",
                             cmd=cmd, stderr=proc.stderr)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)  # atomic: concurrent builders of the same key race harmlessly
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build_target(name: str, **kw) -> Path:
    """Build ``targets/<name>.c`` (or ``.cc``/``.cpp`` if that is what exists)."""
    for suffix in (".c", ".cc", ".cpp"):
        path = targets_dir() / f"{name}{suffix}"
        if path.exists():
            return build_c(path, **kw)
    raise UsageError(f"no target named {name!r} in {targets_dir()}")
