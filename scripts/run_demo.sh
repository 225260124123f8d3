#!/usr/bin/env bash
# The main job: install ComfyUI (cached) and run every technique's example workflow on a reference photo
# (scripts/demo.py; --help for the options). Images, contact sheet and report.md / report.json go to ./out.
# Paths given to it (--reference, --models-dir, --out) are relative to where you run it.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT=$(bash "$HERE/install_comfy.sh" 2> >(grep -v "is ignored: it is neither" >&2) | tail -n 1)
export COMFY_ROOT="$ROOT"
exec "$ROOT/venv/bin/python" "$HERE/demo.py" "$@"
