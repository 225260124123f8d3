#!/usr/bin/env bash
# The one command of the GPU run, from the repository root of the checkout that travels:
#
#   bash bench/gpu/run.sh [--out DIR] [run_all.py options]    on the GPU machine (needs bench/gpu/carry/, made by
#                                                             bash bench/gpu/prepare.sh here and named in carry)
#   bash bench/gpu/run.sh --dry-run [--out DIR]               on any CPU machine with the test ComfyUI
#                                                             (COMFY_ROOT, as the tests): what CI runs
#
# GPU: unpacks the carried wheel tree and ComfyUI snapshot(s) into /tmp, puts them on PYTHONPATH for the machine's
# own CUDA PyTorch (python3), and runs bench/gpu/run_all.py: the smoke of every example workflow, then every
# full-size bench, within 8 minutes in all (--budget S overrides), writing one JSON per part, summary.json and run.log
# into DIR (default $OUT on the device machine, else ./out/gpu). Exits 0 only when every part passed.
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/../.."
DRY=0
ARGS=()
OUTDIR=${OUT:-$PWD/out/gpu}
BUDGET=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUTDIR=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if [ $DRY = 1 ]; then
  ROOT=${COMFY_ROOT:-$HOME/.cache/idportrait-comfy}
  PY=${PYTHON:-$ROOT/venv/bin/python}
  export COMFY_ROOT=$ROOT IDP_COMFY_DEVICE=cpu IDP_BLOCK_ABSENT=1
  exec "$PY" bench/gpu/run_all.py --dry-run --out "$OUTDIR" --budget "${BUDGET:-900}" "${ARGS[@]}"
fi

CARRY=bench/gpu/carry
PY=${PYTHON:-python3}
SITE=/tmp/idp-gpu-site
TREES=/tmp/idp-gpu-comfy
for f in site.tar.xz comfyui-current.tar.xz; do
  [ -f "$CARRY/$f" ] || { echo "missing $CARRY/$f: run 'bash bench/gpu/prepare.sh' before the device call and name" \
                            "bench/gpu/carry in carry" >&2; exit 2; }
done
rm -rf "$SITE" "$TREES"
mkdir -p "$SITE" "$TREES/current" "$TREES/pinned"
tar -C "$SITE" -xJf "$CARRY/site.tar.xz" || exit 2
[ -f "$CARRY/kitchen-cuda.tar.xz" ] && tar -C "$SITE" -xJf "$CARRY/kitchen-cuda.tar.xz"
tar -C "$TREES/current" -xJf "$CARRY/comfyui-current.tar.xz" || exit 2
PINNED=()
if [ -f "$CARRY/comfyui-pinned.tar.xz" ] && tar -C "$TREES/pinned" -xJf "$CARRY/comfyui-pinned.tar.xz"; then
  PINNED=(--pinned-comfy-dir "$TREES/pinned/ComfyUI")
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export COMFY_DIR=$TREES/current/ComfyUI IDP_COMFY_DEVICE=auto   # embedded_comfy: let ComfyUI take the GPU
{
  echo "setup took $(( $(date +%s) - START )) s; python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())' 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
} | tee -a "$OUTDIR/run.log"
LEFT=$(( ${BUDGET:-480} - ($(date +%s) - START) - 5 ))
"$PY" bench/gpu/run_all.py --out "$OUTDIR" --budget "$LEFT" "${PINNED[@]}" "${ARGS[@]}"
