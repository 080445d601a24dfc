#!/usr/bin/env bash
# Runs the Python client's tests (tests/python) with the project's virtual environment
# (${MOE_VENV:-<repo>/.venv}, made by scripts/setup.sh). Exits 77, which ctest reports as
# skipped, when that environment lacks pycapnp or pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${MOE_VENV:-$root/.venv}"
python="$venv/bin/python"
if [[ ! -x $python ]] || ! "$python" -c "import capnp, pytest" 2>/dev/null; then
  echo "skipped: $venv has no pycapnp/pytest (scripts/setup.sh installs them)"
  exit 77
fi
cd "$root"
# The package is imported from the source tree (conftest.py), whatever the venv has installed.
exec "$python" -m pytest "$root/tests/python" -q -p no:cacheprovider "$@"
