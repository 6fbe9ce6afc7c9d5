# Sourced by scripts/demo and scripts/test: make a venv with uprobe-opt and its test
# dependencies, and the compilers the C targets need.  Idempotent and quiet when done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UPROBE_OPT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

need_pkgs=()
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
command -v g++ >/dev/null 2>&1 || need_pkgs+=(g++)
if ((${#need_pkgs[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "uprobe-opt: please install: ${need_pkgs[*]}" >&2; exit 2
  fi
fi
# Real programs traced by tests/test_real_programs.py (which skip without them), and tmux:
# optional, installed when we can, never fatal.
opt_pkgs=()
[ -x /usr/bin/python3 ] || opt_pkgs+=(python3)
[ -x /usr/bin/sqlite3 ] || opt_pkgs+=(sqlite3)
[ -x /usr/bin/redis-server ] || opt_pkgs+=(redis-server)
# <sys/sdt.h> for the USDT target (tests/test_usdt.py skips its C half without it).
[ -f /usr/include/x86_64-linux-gnu/sys/sdt.h ] || [ -f /usr/include/sys/sdt.h ] ||
  opt_pkgs+=(systemtap-sdt-dev)
# A real terminal for the `top` test (tests/test_output.py skips without it).
command -v tmux >/dev/null 2>&1 || opt_pkgs+=(tmux)
if ((${#opt_pkgs[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        "${opt_pkgs[@]}" >/dev/null; } ||
      echo "uprobe-opt: could not install ${opt_pkgs[*]}: their tests will skip" >&2
  else
    echo "uprobe-opt: not installed (their tests will skip): ${opt_pkgs[*]}" >&2
  fi
fi
stamp="$VENV/.uprobe-opt-installed"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]" \
    2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import uprobe_opt, ptrace, capstone, keystone, elftools, psutil, numpy, unicorn"
  touch "$stamp"
fi
# Bytecode for our own package, as `pip install` (not -e) writes it: with
# PYTHONDONTWRITEBYTECODE set, every start of uprobe-opt (the tests start hundreds)
# would compile its ~60 modules again.  Up-to-date files are skipped.
"$VENV/bin/python" -m compileall -q "$ROOT/uprobe_opt" >/dev/null || true
