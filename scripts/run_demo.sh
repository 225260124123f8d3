#!/usr/bin/env bash
# The main job: install (cached) and run the headless demo workflow(s); outputs and report in ./out.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(bash scripts/install_comfy.sh 2> >(grep -v "is ignored: it is neither" >&2) | tail -n 1)
export COMFY_ROOT="$ROOT"
exec "$ROOT/venv/bin/python" scripts/demo.py "$@"
