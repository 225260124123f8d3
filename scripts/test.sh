#!/usr/bin/env bash
# The whole test suite: installs the embedded ComfyUI (cached) then runs pytest. Extra args go to pytest.
# COMFY_SRC=<ComfyUI folder or .tar.gz> runs it against that ComfyUI instead of the pinned 0.3.75 (README, Tests).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(bash scripts/install_comfy.sh 2> >(grep -v "is ignored: it is neither" >&2) | tail -n 1)
export COMFY_ROOT="$ROOT"
echo "ComfyUI $(sed -n -E 's/^__version__ *= *"([^"]+)".*/\1/p' "$ROOT/ComfyUI/comfyui_version.py") at $ROOT"
# Browser tests drive Debian's Chromium (never a downloaded browser); install it when we can.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: browser tests will be skipped"
fi
set +e
"$ROOT/venv/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi   # an empty run is not a pass
exit "$rc"
