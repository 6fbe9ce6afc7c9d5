"""Placeholder: ``uprobe-opt check-reloc`` (differential emulation of relocations)."""


def add_parser(sub):
    p = sub.add_parser("check-reloc", help="prove relocations by differential emulation")
    p.add_argument("files", nargs="+", metavar="ELF")
    return p


def cmd_check_reloc(args) -> int:
    raise SystemExit("check-reloc: not implemented yet")
