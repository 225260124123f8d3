"""Synthetic data and tiny configurations: CPU smoke runs, tests and the benchmark, no downloads.

``make_identity_dataset`` writes a dataset in the trainer's layout (data.py) whose identities differ in
colours and face shape, and whose images of one identity differ in "pose" (the face moves and turns),
so a model can learn something identity-specific. ``tiny_config`` is a complete run configuration
around the tiny stand-in models of ``stand_ins/models.py``.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from .config import TrainConfig

TINY_ENCODER = {"token_dim": 32, "clip_dim": 64, "num_queries": 16, "heads": 2, "tokens_per_image": 17}
TINY_TRUNK_SIZE = 56     # the tiny CLIP vision trunk: 56 px, patch 14 -> 16 + 1 tokens


def _face_image(size: int, rng: np.random.Generator, skin, hair, eyes, shape: float, yaw: float, tilt: float):
    y, x = np.mgrid[:size, :size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array(hair) * 0.35 + 0.1
    cx, cy = 0.5 + 0.12 * yaw, 0.55 + 0.05 * tilt
    rx, ry = 0.26 * shape, 0.33
    face = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    img[face] = skin
    img[(((x - cx) / (rx * 1.05)) ** 2 + ((y - cy + 0.2) / (ry * 0.6)) ** 2 <= 1) & ~face & (y < cy)] = hair
    for side in (-1, 1):
        ex, ey = cx + side * 0.1 * shape + 0.04 * yaw, cy - 0.06 + 0.02 * tilt * side
        img[((x - ex) ** 2 + (y - ey) ** 2) <= (0.035 ** 2)] = eyes
    mouth = (np.abs(y - (cy + 0.15)) < 0.015) & (np.abs(x - cx - 0.03 * yaw) < 0.08 * shape)
    img[mouth] = np.array(skin) * 0.5
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    mask = face.astype(np.float32)
    return np.clip(img, 0, 1), mask


def make_identity_dataset(root: str, identities: int = 4, images: int = 8, size: int = 64, seed: int = 0,
                          masks: str = "some") -> list[str]:
    """Write ``identities`` folders of ``images`` PNGs (and, per ``masks``: 'all', 'some' or 'none', face
    masks ``<stem>.mask.png``) under ``root``. Returns the identity names."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    names = []
    for i in range(identities):
        name = f"person_{i:02d}"
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        skin, hair, eyes = rng.uniform(0.3, 0.95, 3), rng.uniform(0.0, 0.8, 3), rng.uniform(0.0, 0.5, 3)
        shape = float(rng.uniform(0.8, 1.2))
        for j in range(images):
            yaw = math.sin(2 * math.pi * j / images)
            tilt = math.cos(2 * math.pi * j / images)
            img, mask = _face_image(size, rng, skin, hair, eyes, shape, yaw, tilt)
            Image.fromarray((img * 255 + 0.5).astype(np.uint8)).save(os.path.join(d, f"{j:03d}.png"))
            if masks == "all" or (masks == "some" and i % 2 == 0):
                Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(d, f"{j:03d}.mask.png"))
        names.append(name)
    return names


def tiny_config(stage: str, root: str, output_dir: str, family: str = "flux", resolution: Optional[int] = None,
                **sections) -> TrainConfig:
    """A complete run config on the tiny stand-ins; ``sections`` update sections, e.g. optim={"lr": 1e-3}."""
    res = resolution or (56 if stage == "mtd" else 32)
    data = {"root": root, "resolution": res, "input_resolution": TINY_TRUNK_SIZE, "hflip": 0.0, "color_jitter": 0.0,
            "scale_jitter": 0.0}
    base = {"family": family, "kind": "tiny", "cache_latents": True}
    if stage == "pivot":
        base.update(family="sd15" if family == "flux" else family)
    cfg = {"stage": stage, "output_dir": output_dir, "seed": 0, "data": data,
           "trunk": {"kind": "tiny", "trainable": False, "image_size": TINY_TRUNK_SIZE}, "encoder": dict(TINY_ENCODER),
           "mtd": {"dim": 32, "heads": 2}, "base": base, "pivot": {"loc_grid": 4},
           "optim": {"batch_size": 2, "max_steps": 4, "lr": 1e-3},
           "log": {"every": 1, "image_every": 0, "save_every": 0, "progress": False, "probe": False}}
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return TrainConfig.from_dict(cfg)


# ---------------------------------------------------------------------------------------------------
# Synthetic "videos" for curation: identity and pose are written into the pixels


SYN_FRAME, SYN_BOX = 96, (16, 16, 80, 80)


def synthetic_frame(color, pose, blur: float = 0.0, face: bool = True, seed: int = 0) -> np.ndarray:
    """A frame whose one "face" (a square) carries the identity as the colour of its left half (with a
    fine texture) and the pose as three grey bands on its right half (yaw, pitch, roll: (a + 90) / 180)."""
    from PIL import Image, ImageFilter
    img = np.zeros((SYN_FRAME, SYN_FRAME, 3), np.float32)
    if face:
        x1, y1, x2, y2 = SYN_BOX
        xm = (x1 + x2) // 2
        yy, xx = np.mgrid[y1:y2, x1:xm]
        texture = np.where((yy + xx) % 2 == 0, 0.12, -0.12)[..., None]
        img[y1:y2, x1:xm] = np.clip(np.asarray(color, np.float32)[None, None] * 0.7 + 0.15 + texture, 0, 1)
        h = (y2 - y1) / 3
        for b, angle in enumerate(pose):
            img[int(y1 + b * h):int(y1 + (b + 1) * h), xm:x2] = (float(angle) + 90.0) / 180.0
    out = Image.fromarray((img * 255 + 0.5).astype(np.uint8))
    if blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(out)


def synthetic_detect(rgb: np.ndarray) -> list:
    """Detector for synthetic frames: the box of the non-black pixels, key points placed in it."""
    from ...face.types import FaceDetection
    ys, xs = np.nonzero(rgb.max(-1) > 20)
    if len(xs) < 16:
        return []
    x1, y1, x2, y2 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    w, h = x2 - x1, y2 - y1
    rel = np.array([[0.34, 0.46], [0.66, 0.46], [0.5, 0.64], [0.37, 0.82], [0.63, 0.82]], np.float32)
    kps = np.stack([x1 + rel[:, 0] * w, y1 + rel[:, 1] * h], 1)
    return [FaceDetection(bbox=[x1, y1, x2, y2], kps=kps, score=1.0, source="synthetic")]


def synthetic_embed(rgb: np.ndarray, face) -> np.ndarray:
    """Identity = the mean colour of the left half of the face box, centred (a 3-D unit vector)."""
    x1, y1, x2, y2 = (int(round(v)) for v in face.bbox)
    xm = (x1 + x2) // 2
    c = rgb[y1 + 4:y2 - 4, x1 + 4:xm - 2].reshape(-1, 3).astype(np.float64).mean(0) / 255.0 - 0.5
    return (c / max(np.linalg.norm(c), 1e-9)).astype(np.float32)


def synthetic_pose(rgb: np.ndarray, face) -> tuple:
    """Pose = the grey levels at the centres of the three bands of the right half of the face box."""
    x1, y1, x2, y2 = (int(round(v)) for v in face.bbox)
    xm = (x1 + x2) // 2
    h = (y2 - y1) / 3
    out = []
    for b in range(3):
        yc = int(y1 + (b + 0.5) * h)
        patch = rgb[yc - 2:yc + 3, xm + 4:x2 - 4].astype(np.float64).mean() / 255.0
        out.append(patch * 180.0 - 90.0)
    return tuple(out)
