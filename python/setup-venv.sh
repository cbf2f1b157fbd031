#!/usr/bin/env bash
# Makes a Python virtual environment holding the reference implementation,
# cs.packetstream 20240630, with the pinned versions of requirements.txt.
#
# Usage: python/setup-venv.sh [VENV_DIR]     (default: target/python-venv)
#
# Prints the venv's python on its last line of standard output; pip's
# messages go to standard error. Quick when VENV_DIR was already made from
# the same requirements. Set PYTHON3 to choose the interpreter the venv is
# made from (default: python3, which needs its venv module: on Debian, the
# package python3-venv).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-target/python-venv}
python3=${PYTHON3:-python3}
mkdir -p "$(dirname "$venv")"
venv="$(cd "$(dirname "$venv")" && pwd)/$(basename "$venv")"

# Two runs at once (two test binaries, say) take turns.
exec 9>"$venv.lock"
flock 9

stamp="$venv/.requirements-sha256"
want=$(sha256sum <"$here/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    rm -rf "$venv"
    "$python3" -m venv "$venv" >&2
    # --no-deps: requirements.txt says why the packages' own dependency
    # metadata must not be followed.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-input --no-deps -r "$here/requirements.txt" >&2
    "$venv/bin/python" -c 'import cs.packetstream' >&2
    # Written last: a venv without it is made again on the next run.
    echo "$want" >"$stamp"
fi
echo "$venv/bin/python"
