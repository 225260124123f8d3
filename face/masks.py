"""Face masks from landmark hulls (or box ellipses), dilatable and feathered, as ComfyUI MASKs [B,H,W].

With mediapipe's 478 points the convex hull is the face oval up to the hairline; with 68/106-point
layouts it stops at the brows. Faces without dense landmarks fall back to the ellipse inscribed in
their detection box, so a mask is always available.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .types import FaceError, FaceDetection


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull of [N,2] points, counter-clockwise (monotone chain); [M,2] with M >= 1."""
    pts = np.unique(np.asarray(points, np.float64).reshape(-1, 2), axis=0)
    if len(pts) < 3:
        return pts

    def half(seq):
        h = []
        for p in seq:
            while len(h) >= 2 and ((h[-1][0] - h[-2][0]) * (p[1] - h[-2][1])
                                   - (h[-1][1] - h[-2][1]) * (p[0] - h[-2][0])) <= 0:
                h.pop()
            h.append(p)
        return h

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def grow_polygon(hull: np.ndarray, radius: float, segments: int = 24) -> np.ndarray:
    """Minkowski sum of a convex polygon with a disk: the exact round-cornered dilation by radius px."""
    if radius <= 0:
        return hull
    a = np.linspace(0, 2 * math.pi, segments, endpoint=False)
    disk = np.stack([np.cos(a), np.sin(a)], 1) * radius
    return convex_hull((hull[:, None, :] + disk[None]).reshape(-1, 2))


def polygon_mask(poly: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise a polygon (pixel-centre coordinates) to a float32 {0,1} [H,W] array."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (width, height), 0)
    if len(poly) >= 3:
        ImageDraw.Draw(im).polygon([(float(x), float(y)) for x, y in poly], fill=255, outline=255)
    return (np.asarray(im) > 127).astype(np.float32)


def ellipse_polygon(bbox: np.ndarray, segments: int = 64) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in bbox)
    a = np.linspace(0, 2 * math.pi, segments, endpoint=False)
    return np.stack([(x1 + x2) / 2 + np.cos(a) * (x2 - x1) / 2, (y1 + y2) / 2 + np.sin(a) * (y2 - y1) / 2], 1)


def face_polygon(face: FaceDetection, source: str = "auto") -> np.ndarray:
    """The outline used for a face's mask: landmark hull ('landmarks'), box ellipse ('box'), or
    'auto' (hull when the face has dense landmarks, else the ellipse)."""
    if source not in ("auto", "landmarks", "box"):
        raise FaceError(f"unknown mask source {source!r}")
    if source == "landmarks" and face.landmarks is None:
        raise FaceError("face has no dense landmarks; run landmarks.add_landmarks first or use source='box'")
    if source != "box" and face.landmarks is not None:
        return convex_hull(face.landmarks[:, :2])
    return ellipse_polygon(face.bbox)


def erode_dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Square-element dilation (px > 0) or erosion (px < 0) of MASK [B,H,W], separable max-pool."""
    if px == 0:
        return mask
    k = 2 * abs(px) + 1
    m = mask.unsqueeze(1) if px > 0 else -mask.unsqueeze(1)
    m = F.max_pool2d(m, (k, 1), stride=1, padding=(abs(px), 0))
    m = F.max_pool2d(m, (1, k), stride=1, padding=(0, abs(px)))
    return (m if px > 0 else -m).squeeze(1)


def feather(mask: torch.Tensor, px: float) -> torch.Tensor:
    """Soften MASK [B,H,W] edges with a Gaussian of sigma px/2 (transition about px wide each side)."""
    if px <= 0:
        return mask
    import kornia

    sigma = px / 2.0
    k = 2 * math.ceil(3 * sigma) + 1
    return kornia.filters.gaussian_blur2d(mask.unsqueeze(1), (k, k), (sigma, sigma),
                                          border_type="constant").squeeze(1).clamp(0, 1)


def face_masks(faces_per_image: Sequence[Sequence[FaceDetection]], height: int, width: int,
               grow: float = 0.0, feather_px: float = 0.0, source: str = "auto",
               relative: bool = False) -> torch.Tensor:
    """MASK [B,H,W]: union of the face regions in each image.

    grow: dilate (> 0, exact round dilation of the hull) or erode (< 0) by this many pixels, or by this
    fraction of each face's box size when relative=True. feather_px: Gaussian edge softening.
    """
    for name, v in (("grow", grow), ("feather", feather_px)):
        if not math.isfinite(v):
            raise FaceError(f"face mask: {name} is {v}; give a finite number of pixels")
    out = []
    for faces in faces_per_image:
        hard = np.zeros((height, width), np.float32)
        for f in faces:
            g = grow * max(f.width, f.height) if relative else grow
            poly = face_polygon(f, source)
            m = polygon_mask(grow_polygon(poly, g) if g > 0 else poly, height, width)
            if g < 0:
                m = erode_dilate(torch.from_numpy(m)[None], -int(round(-g)))[0].numpy()
            hard = np.maximum(hard, m)
        out.append(torch.from_numpy(hard))
    masks = torch.stack(out) if out else torch.zeros(0, height, width)
    return feather(masks, feather_px)


def mask_iou(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> float:
    """IoU of two masks after thresholding."""
    a, b = a > threshold, b > threshold
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0
