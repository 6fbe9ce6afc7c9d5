"""The ``check-reloc`` command line, apart from uprobe_opt.relocheck: building the
parser must not import unicorn (0.75 s of every start-up, ``trace`` included); the
command itself imports it when it runs."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser(
        "check-reloc", help="prove relocations by differential emulation (unicorn)",
        description="For every function entry of each ELF, run the safety analysis and "
                    "compare each optimizable region with its detour in an emulator. "
                    "Exit status 1 when any mismatch is found.")
    p.add_argument("files", nargs="*", metavar="ELF",
                   help="ELF files (default: libc.so.6, python3, sqlite3, libsqlite3)")
    p.add_argument("--sites", type=int, metavar="N", help="check N sites per file (sampled)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--states", type=int, default=4, metavar="K",
                   help="random states per site (default 4)")
    p.add_argument("--all-boundaries", action="store_true",
                   help="also every instruction boundary in the first 32 bytes")
    p.add_argument("--addr", type=lambda t: int(t, 0), action="append", metavar="ADDR",
                   help="only the site at this link-time address (repeatable; reproduces "
                        "a reported mismatch)")
    p.add_argument("--exits", action="store_true",
                   help="check the exit sites of return probes (every ret and tail-call "
                        "jmp, with their exit detours) instead of function entries")
    p.add_argument("--json", action="store_true", help="JSON lines instead of text")
    return p
