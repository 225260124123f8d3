"""Face functions for curation, evaluation and the ArcFace baselines, on the pack's face/ library.

Curation and evaluation take *functions*, so any back-end (or a test's deterministic one) plugs in:

* ``detect(rgb) -> [FaceDetection]``            (default: RetinaFace from face/detect.py, offline)
* ``embed(rgb, face) -> (D,) unit vector``       (insightface ArcFace on the 112-px aligned crop)
* ``pose(rgb, face) -> (yaw, pitch, roll)``      (insightface 3d68 pose, else mediapipe landmarks)
* ``quality(rgb, face) -> float``                (default: sharpness, see ``sharpness``)

``InsightFaceTools`` bundles them for a local insightface pack (models/insightface/models/<pack>).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from ...face import align as face_align
from ...face import detect as face_detect
from ...face.types import FaceDetection

log = logging.getLogger(__name__)


def _rgb_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).float()[None] / 255.0


def aligned_crop(rgb: np.ndarray, face: FaceDetection, size: int, padding: float = 0.0) -> tuple:
    """(crop IMAGE (size, size, 3) float, 2x3 matrix image -> crop) aligned to the ArcFace template."""
    al = face_align.align_faces(_rgb_tensor(rgb), [face.with_(image_index=0)], size=size, padding=padding)
    return al.crops[0], al.matrices[0]


def sharpness(rgb: np.ndarray, face: FaceDetection) -> float:
    """Face quality stand-in: variance of the Laplacian of the face box (resized to 112 px), times
    sqrt(box side / 112) capped at 2 (bigger faces carry more detail). The paper uses TOPIQ; pass your
    own ``quality`` function to use another estimator."""
    from PIL import Image
    x1, y1, x2, y2 = (int(round(v)) for v in face.bbox)
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if x2 - x1 < 4 or y2 - y1 < 4:
        return 0.0
    crop = Image.fromarray(np.ascontiguousarray(rgb[y1:y2, x1:x2])).convert("L").resize((112, 112), Image.BILINEAR)
    g = np.asarray(crop, np.float32) / 255.0
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    size_term = min(2.0, (max(x2 - x1, y2 - y1) / 112.0) ** 0.5)
    return float(lap.var() * size_term)


def default_detect(rgb: np.ndarray) -> list:
    return face_detect.default_detector().detect(rgb)


def mediapipe_pose(rgb: np.ndarray, face: FaceDetection) -> Optional[tuple]:
    from ...face import landmarks
    if face.pose is not None:
        return tuple(face.pose)
    res = landmarks.mediapipe_landmarks(_rgb_tensor(rgb), [[face.with_(image_index=0)]])[0][0]
    return None if res.pose is None else tuple(res.pose)


class InsightFaceTools:
    """Detection, ArcFace embeddings and pose from a local insightface pack (never downloaded)."""

    def __init__(self, models_root: str, pack: str = "antelopev2", provider: str = "CPU", crop_padding: float = 0.6):
        from ...face import insightface_loader as ifl
        self.ifl = ifl
        self.pack = ifl.load_insightface(models_root, pack, provider=provider)
        self.detector = face_detect.InsightFaceDetector(self.pack)
        self.crop_padding = crop_padding

    def detect(self, rgb: np.ndarray) -> list:
        return self.detector.detect(rgb)

    def embed(self, rgb: np.ndarray, face: FaceDetection) -> np.ndarray:
        if face.embedding is not None:
            return np.asarray(face.embedding, np.float32)
        crop, _ = aligned_crop(rgb, face, 112)
        return self.ifl.arcface_embeddings(self.pack, crop[None])[0].numpy()

    def pose(self, rgb: np.ndarray, face: FaceDetection) -> Optional[tuple]:
        return tuple(face.pose) if face.pose is not None else mediapipe_pose(rgb, face)

    def _largest(self, rgb):
        faces = face_detect.select_faces(self.detect(rgb), "largest", 0)
        return faces[0] if faces else None

    def embed_image(self, rgb: np.ndarray) -> Optional[np.ndarray]:
        f = self._largest(rgb)
        return None if f is None else self.embed(rgb, f)

    def pose_image(self, rgb: np.ndarray) -> Optional[tuple]:
        f = self._largest(rgb)
        return None if f is None else self.pose(rgb, f)

    def arcface_from_crops(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) aligned training crops (template padding ``crop_padding``) -> (n, 512) ArcFace.

        The ArcFace-aligned 112-px crop is the centre S / (1 + padding) of such a crop, resized.
        """
        s = images.shape[-1]
        side = int(round(s / (1.0 + self.crop_padding)))
        o = (s - side) // 2
        centre = images[..., o:o + side, o:o + side]
        crops = torch.nn.functional.interpolate(centre.float().cpu(), size=(112, 112), mode="bilinear",
                                                antialias=True, align_corners=False).clamp(0, 1)
        emb = self.ifl.arcface_embeddings(self.pack, crops.permute(0, 2, 3, 1))
        return emb.to(images.device)
