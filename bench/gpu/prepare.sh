#!/usr/bin/env bash
# Prepares what bench/gpu/run.sh needs on the GPU machine, which has no network: run it HERE (a machine with the
# package registry), in the checkout the session started in (the one that travels), before the device call.
#
#   bash bench/gpu/prepare.sh            # download, build bench/gpu/carry/, list it with sizes, check the 64 MiB limit
#   bash bench/gpu/prepare.sh --list     # only list what bench/gpu/carry/ holds (or, before a prepare, would hold)
#                                        # and the total that would travel
#
# Writes the folder bench/gpu/carry/ (ignored by bench/gpu/.gitignore; the device call names it in carry):
#   site.tar.xz              the wheels of bench/gpu/wheels.txt (Python 3.12, manylinux x86_64) installed into one
#                            tree (pip --target), without comfy-kitchen's compiled backends
#   comfyui-current.tar.xz   the ComfyUI snapshot of ../shared/comfyui/ (0.33.0), recompressed
#   kitchen-cuda.tar.xz      comfy-kitchen's CUDA kernels (optional: carried only if everything fits)
#   comfyui-pinned.tar.xz    the pinned ComfyUI 0.3.75 tree of $COMFY_PINNED_DIR (default ~/.cache/idportrait-comfy/
#                            ComfyUI), sources only (optional: carried only if everything fits)
#   MANIFEST.txt             what is in there, with sizes and sha256
# Optional items are added in that order while the working tree + carry stay under the limit (64 MiB less a
# margin of 256 KiB: the tree can grow a little before the call).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
CARRY=$ROOT/bench/gpu/carry
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((256 * 1024))
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in "${COMFY_ROOT:-$HOME/.cache/idportrait-comfy}/venv/bin/python" python3; do
    if "$c" -m pip --version >/dev/null 2>&1; then PY=$c; break; fi
  done
fi

tree_bytes() {   # what the device tool sends besides carry: tracked + untracked files git does not ignore
  git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

list() {
  local tree carry total
  tree=$(tree_bytes)
  echo "working tree that travels: $tree bytes ($(awk -v b="$tree" 'BEGIN {printf "%.1f", b / 1048576}') MiB)"
  carry=0
  if [ -d "$CARRY" ]; then
    while IFS= read -r f; do
      s=$(stat -c %s "$f"); carry=$((carry + s))
      printf '  %-44s %10d bytes  %6.1f MiB\n' "${f#$ROOT/}" "$s" "$(awk -v b="$s" 'BEGIN {print b / 1048576}')"
    done < <(find "$CARRY" -type f | sort)
  else   # nothing prepared yet: what prepare would carry, at the sizes of bench/gpu/carry_plan.txt
    echo "  no bench/gpu/carry/ yet; bash bench/gpu/prepare.sh would carry (sizes of bench/gpu/carry_plan.txt):"
    while read -r name bytes kind what; do
      if [ "$kind" = required ] || [ $((tree + carry + bytes + MARGIN)) -le $LIMIT ]; then
        carry=$((carry + bytes)); mark=""
      else
        mark="  (left out: would not fit)"
      fi
      printf '  %-44s %10d bytes  %6.1f MiB  %s%s\n' "$name" "$bytes" "$(awk -v b="$bytes" 'BEGIN {print b / 1048576}')" \
        "$kind" "$mark"
    done < <(grep -v '^#' bench/gpu/carry_plan.txt)
  fi
  total=$((tree + carry))
  printf 'total that travels with carry=["bench/gpu/carry"]: %d bytes (%.1f MiB) of %d (64 MiB)\n' "$total" \
    "$(awk -v b="$total" 'BEGIN {print b / 1048576}')" "$LIMIT"
  [ "$total" -le "$LIMIT" ] || { echo "OVER THE 64 MiB LIMIT"; return 1; }
}

if [ "${1:-}" = "--list" ]; then list; exit $?; fi
[ -n "$PY" ] || { echo "no Python with pip found; set PYTHON=/path/to/python" >&2; exit 2; }

git check-ignore -q "$CARRY/x" || { echo "bench/gpu/carry/ is not ignored (bench/gpu/.gitignore missing?)" >&2; exit 2; }

rm -rf "$CARRY"
mkdir -p "$CARRY"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# 1. wheels -> one installed tree
mapfile -t PKGS < <(sed 's/#.*//; s/[[:space:]]//g; /^$/d' bench/gpu/wheels.txt)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64
      --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
echo "downloading ${#PKGS[@]} wheels for Python 3.12 manylinux x86_64 ..."
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d "$TMP/wheels" "${PKGS[@]}"
"$PY" -m pip install -q --no-deps --no-index --no-compile --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLAT[@]}" --target "$TMP/site" "$TMP"/wheels/*.whl
rm -rf "$TMP/site/bin"
# comfy-kitchen's compiled backends: ROCm's is never used on an NVIDIA machine; CUDA's travels separately
rm -f "$TMP"/site/comfy_kitchen/backends/hip/_C*.so
mkdir -p "$TMP/kitchen/comfy_kitchen/backends/cuda"
mv "$TMP"/site/comfy_kitchen/backends/cuda/_C*.so "$TMP/kitchen/comfy_kitchen/backends/cuda/" 2>/dev/null || true
echo "compressing the installed tree ($(du -sm "$TMP/site" | cut -f1) MB) ..."
tar -C "$TMP/site" -cf - . | xz -T0 -6 > "$CARRY/site.tar.xz"

# 2. the current ComfyUI snapshot
SNAP=${COMFY_SNAPSHOT:-$(ls "$ROOT"/../shared/comfyui/comfyui-*.tar.gz 2>/dev/null | head -1)}
[ -f "$SNAP" ] || { echo "no ComfyUI snapshot at ../shared/comfyui/ (set COMFY_SNAPSHOT)" >&2; exit 2; }
gzip -dc "$SNAP" | xz -T0 -6 > "$CARRY/comfyui-current.tar.xz"

# 3. optional items, in order, while everything fits
carry_bytes() { find "$CARRY" -type f -exec stat -c %s {} + | awk '{s += $1} END {print s + 0}'; }
fits() { [ $(( $(tree_bytes) + $(carry_bytes) + $(stat -c %s "$1") + MARGIN )) -le $LIMIT ]; }
if ls "$TMP"/kitchen/comfy_kitchen/backends/cuda/_C*.so >/dev/null 2>&1; then
  tar -C "$TMP/kitchen" -cf - . | xz -T0 -6 > "$TMP/kitchen-cuda.tar.xz"
  if fits "$TMP/kitchen-cuda.tar.xz"; then mv "$TMP/kitchen-cuda.tar.xz" "$CARRY/"
  else echo "left out: comfy-kitchen's CUDA kernels (would exceed the limit); ComfyUI 0.33 then uses its triton/eager ops"; fi
fi
PINNED=${COMFY_PINNED_DIR:-${COMFY_PINNED_ROOT:-$HOME/.cache/idportrait-comfy}/ComfyUI}
if [ -f "$PINNED/main.py" ]; then
  tar -C "$(dirname "$PINNED")" -cf - --exclude='__pycache__' --exclude='*.pyc' --exclude='.git' \
    --exclude='ComfyUI/models/*' --exclude='ComfyUI/output/*' --exclude='ComfyUI/input/*' --exclude='ComfyUI/temp/*' \
    --exclude='ComfyUI/user/*' --exclude='ComfyUI/custom_nodes/*' --exclude='ComfyUI/tests' \
    --exclude='ComfyUI/tests-unit' "$(basename "$PINNED")" | xz -T0 -6 > "$TMP/comfyui-pinned.tar.xz"
  if fits "$TMP/comfyui-pinned.tar.xz"; then mv "$TMP/comfyui-pinned.tar.xz" "$CARRY/"
  else echo "left out: the pinned ComfyUI tree (would exceed the limit); smoke_pinned is skipped on the GPU"; fi
else
  echo "left out: no pinned ComfyUI tree at $PINNED"
fi

# 4. manifest
{
  echo "# bench/gpu/carry, made $(date -u +%Y-%m-%dT%H:%M:%SZ) by bench/gpu/prepare.sh from $(git rev-parse --short HEAD)"
  echo "# wheels (bench/gpu/wheels.txt), installed into site.tar.xz:"
  for w in "$TMP"/wheels/*.whl; do printf '#   %-70s %10d bytes\n' "$(basename "$w")" "$(stat -c %s "$w")"; done
  echo "# ComfyUI current: $(basename "$SNAP")"
  [ -f "$CARRY/comfyui-pinned.tar.xz" ] && echo "# ComfyUI pinned: $PINNED ($(sed -n 's/__version__ = //p' "$PINNED/comfyui_version.py"))"
  (cd "$CARRY" && sha256sum ./*.tar.xz)
} > "$CARRY/MANIFEST.txt"
cat "$CARRY/MANIFEST.txt"
list
