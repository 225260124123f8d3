#!/usr/bin/env bash
# The whole test suite: installs the embedded ComfyUI (cached) then runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(bash scripts/install_comfy.sh 2> >(grep -v "is ignored: it is neither" >&2) | tail -n 1)
export COMFY_ROOT="$ROOT"
set +e
"$ROOT/venv/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi   # an empty run is not a pass
exit "$rc"
