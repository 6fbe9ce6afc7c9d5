"""Per-file facts kept on disk between runs: what a start-up would otherwise parse again
(an ELF file's headers and symbol tables), keyed by the file's identity.

The key is the file's ``(st_dev, st_ino, st_mtime_ns, st_ctime_ns, st_size)`` as
``stat(2)`` reports it for the mapping's file: a file replaced on disk is another inode,
one rewritten in place has another mtime and ctime (``man 7 inode``).  An entry lives at
``~/.cache/uprobe-opt/files/KIND-KEY.bin`` (``$UPROBE_OPT_CACHE/../files`` when that is
set, like the test targets' cache) and holds a header (magic, format version, the kind
and key again, a BLAKE2b digest of the payload) and the payload, a ``marshal`` of plain
tuples, lists, dicts, strings and ints only: never pickle (loading it runs code).

Safe against a stale or corrupt cache: an entry whose header, key or digest does not
match is ignored (and replaced by the next store); any error reading or writing is a
cache miss, never an error of the command.  Entries are written to a temporary file and
renamed into place (``rename(2)`` is atomic): a reader never sees half an entry.
"""
from __future__ import annotations

import hashlib
import marshal
import os

FORMAT = 1
_MAGIC = b"uprobe-opt-filecache\n"
_DIGEST = 16


def cache_dir() -> str:
    """The directory of the entries (it may not exist yet)."""
    env = os.environ.get("UPROBE_OPT_CACHE")
    base = os.path.dirname(env) if env else os.path.join(os.path.expanduser("~"), ".cache",
                                                          "uprobe-opt")
    return os.path.join(base, "files")


def file_key(st: os.stat_result) -> str:
    """The identity of the file with stat ``st`` (hex fields joined by '-')."""
    return "-".join(f"{v:x}" for v in (st.st_dev, st.st_ino, st.st_mtime_ns,
                                         st.st_ctime_ns, st.st_size))


def _entry(kind: str, key: str) -> tuple[str, bytes]:
    head = _MAGIC + f"{FORMAT} {kind} {key}\n".encode()
    return os.path.join(cache_dir(), f"{kind}-{key}.bin"), head


def load(kind: str, st: os.stat_result, version: int):
    """The payload stored for ``kind`` (with the caller's own format ``version``) of the
    file with stat ``st``, or None (absent, stale, corrupt or unreadable)."""
    path, head = _entry(f"{kind}{version}", file_key(st))
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    if not blob.startswith(head) or len(blob) < len(head) + _DIGEST:
        return None
    digest, payload = blob[len(head):len(head) + _DIGEST], blob[len(head) + _DIGEST:]
    if hashlib.blake2b(payload, digest_size=_DIGEST).digest() != digest:
        return None
    try:
        return marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        return None


def store(kind: str, st: os.stat_result, version: int, value) -> None:
    """Keep ``value`` (marshal-able plain data) for ``kind`` of the file with stat
    ``st``.  Best effort: a read-only or full disk only means the next run parses
    again."""
    path, head = _entry(f"{kind}{version}", file_key(st))
    try:
        payload = marshal.dumps(value)
        digest = hashlib.blake2b(payload, digest_size=_DIGEST).digest()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(head + digest + payload)
        os.replace(tmp, path)
    except (OSError, ValueError):
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass
