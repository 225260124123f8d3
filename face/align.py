"""Similarity alignment of faces to the ArcFace 5-point template, with a differentiable kornia warp.

The 112x112 ArcFace template is what every insightface recogniser was trained on; larger crops
(224 for CLIP/Omni-ID, 448/512 for training data) scale the same template, optionally with
``padding`` to include more hair/background. The transform is a least-squares similarity
(rotation + uniform scale + translation, no reflection), the same model insightface's
``norm_crop`` estimates, and the warp uses the same pixel-centre convention as cv2.warpAffine, so
112 crops match insightface's to within interpolation differences.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .types import FaceDetection

log = logging.getLogger(__name__)

# ArcFace reference points for a 112x112 crop (left eye, right eye, nose, left/right mouth corner).
ARCFACE_112 = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                            [41.5493, 92.3655], [70.7299, 92.2041]], dtype=torch.float32)


def arcface_template(size: int = 112, padding: float = 0.0) -> torch.Tensor:
    """The 5 template points [5,2] for a size x size crop.

    padding > 0 shrinks the face toward the crop centre so the crop shows (1 + padding) times more
    context per side length; 0 is the exact ArcFace layout scaled by size / 112.
    """
    t = ARCFACE_112 / 112.0
    if padding:
        t = (t - 0.5) / (1.0 + padding) + 0.5
    # Plain scaling, as insightface's estimate_norm does for multiples of 112, so crops match its own.
    return t * size


def estimate_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms mapping src points onto dst points (Umeyama, no reflection).

    src, dst: [..., N, 2] (N >= 2). Returns [..., 2, 3] matrices M with dst ~= M @ [x, y, 1].
    Differentiable in both arguments.
    """
    src = src.to(torch.float64)
    dst = dst.to(torch.float64)
    ms, md = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    s, d = src - ms, dst - md
    var = (s ** 2).sum((-1, -2)).clamp_min(1e-12)
    a = (s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(-1) / var   # scale * cos
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(-1) / var   # scale * sin
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)
    t = md.squeeze(-2) - (rot @ ms.squeeze(-2).unsqueeze(-1)).squeeze(-1)
    return torch.cat([rot, t.unsqueeze(-1)], -1).to(torch.float32)


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    """Inverse of [...,2,3] affine matrices (to paste crops back or map crop points to the image)."""
    a = m[..., :2, :2]
    ai = torch.linalg.inv(a)
    return torch.cat([ai, -(ai @ m[..., :2, 2:])], -1)


def transform_points(m: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Apply [...,2,3] affine matrices to [...,N,2] points."""
    return pts @ m[..., :2, :2].transpose(-1, -2) + m[..., :2, 2].unsqueeze(-2)


def warp_images(images_bchw: torch.Tensor, m: torch.Tensor, size: int | tuple[int, int],
                antialias: bool = True, padding_mode: str = "zeros") -> torch.Tensor:
    """Warp [N,C,H,W] images with [N,2,3] matrices (source pixels -> output pixels) to size.

    antialias: blur before a strong downscale (scale < 0.5) so 1024px faces do not alias into 112px
    crops; the blur is a Gaussian of sigma (1/scale - 1)/2, a standard choice, and differentiable.
    """
    import kornia

    oh, ow = (size, size) if isinstance(size, int) else size
    if antialias:
        scale = torch.sqrt(torch.det(m[:, :2, :2].double()).abs()).float()
        blurred = []
        for i in range(images_bchw.shape[0]):
            s = float(scale[i])
            if s < 0.5:
                sigma = (1.0 / s - 1.0) / 2.0
                k = 2 * math.ceil(3 * sigma) + 1
                blurred.append(kornia.filters.gaussian_blur2d(images_bchw[i:i + 1], (k, k), (sigma, sigma),
                                                              border_type="replicate"))
            else:
                blurred.append(images_bchw[i:i + 1])
        images_bchw = torch.cat(blurred, 0)
    return kornia.geometry.transform.warp_affine(images_bchw, m.to(images_bchw.dtype), dsize=(oh, ow),
                                                 mode="bilinear", padding_mode=padding_mode, align_corners=True)


@dataclass
class AlignedFaces:
    """Result of ``align_faces``.

    crops: IMAGE [N,S,S,C]. matrices: [N,2,3] image pixels -> crop pixels; inverse: crop -> image.
    image_indices: [N] long, which input image each crop came from. boxes: [N,4]. kps: [N,5,2] in
    image pixels. faces: the FaceDetection objects, in crop order.
    """

    crops: torch.Tensor
    matrices: torch.Tensor
    inverse: torch.Tensor
    image_indices: torch.Tensor
    boxes: torch.Tensor
    kps: torch.Tensor
    faces: list[FaceDetection]


def align_faces(images: torch.Tensor, faces: Sequence[FaceDetection] | Sequence[Sequence[FaceDetection]],
                size: int = 112, padding: float = 0.0, antialias: bool = True,
                padding_mode: str = "zeros", template: torch.Tensor | None = None) -> AlignedFaces:
    """Align faces from a ComfyUI IMAGE batch [B,H,W,C] to size x size crops.

    faces: a flat list of FaceDetection (``image_index`` says which image) or one list per image.
    template: [5,2] target points in crop pixels; default ``arcface_template(size, padding)``.
    padding_mode: 'zeros' (black, like insightface), 'border' or 'reflection'.
    Gradients flow to ``images`` (and to the key points if they are given as tensors upstream).
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    flat: list[FaceDetection] = []
    for item in faces:
        if isinstance(item, FaceDetection):
            flat.append(item)
        else:
            flat.extend(item)
    c = images.shape[-1]
    if not flat:
        z = torch.zeros(0, 2, 3)
        return AlignedFaces(images.new_zeros(0, size, size, c), z, z.clone(), torch.zeros(0, dtype=torch.long),
                            torch.zeros(0, 4), torch.zeros(0, 5, 2), [])
    tpl = (template if template is not None else arcface_template(size, padding)).to(torch.float32)
    kps = torch.stack([torch.as_tensor(f.kps, dtype=torch.float32) for f in flat])
    idx = torch.tensor([f.image_index for f in flat], dtype=torch.long)
    if int(idx.max()) >= images.shape[0]:
        raise IndexError(f"face image_index {int(idx.max())} is outside the batch of {images.shape[0]}")
    m = estimate_similarity(kps, tpl.expand_as(kps))
    src = images[idx].permute(0, 3, 1, 2)
    crops = warp_images(src, m.to(images.device), size, antialias=antialias, padding_mode=padding_mode)
    boxes = torch.stack([torch.as_tensor(f.bbox, dtype=torch.float32) for f in flat])
    return AlignedFaces(crops=crops.permute(0, 2, 3, 1).clamp(0, 1) if not crops.requires_grad
                        else crops.permute(0, 2, 3, 1),
                        matrices=m, inverse=invert_affine(m), image_indices=idx, boxes=boxes, kps=kps,
                        faces=list(flat))


def paste_back(images: torch.Tensor, crops: torch.Tensor, aligned: AlignedFaces,
               masks: torch.Tensor | None = None) -> torch.Tensor:
    """Composite (edited) crops [N,S,S,C] back into their source images with the inverse warp.

    masks: optional crop-space MASK [N,S,S] (e.g. a feathered face mask); default: the whole crop
    with a soft 2-pixel edge. Returns a new IMAGE batch.
    """
    out = images.clone()
    n, s = crops.shape[0], crops.shape[1]
    if masks is None:
        masks = torch.ones(n, s, s, dtype=crops.dtype, device=crops.device)
        masks = F.pad(masks[:, 2:-2, 2:-2], (2, 2, 2, 2))
    h, w = images.shape[1:3]
    warped = warp_images(crops.permute(0, 3, 1, 2), aligned.inverse.to(crops.device), (h, w), antialias=False)
    wm = warp_images(masks.unsqueeze(1), aligned.inverse.to(crops.device), (h, w), antialias=False)
    for j in range(n):
        i = int(aligned.image_indices[j])
        a = wm[j].permute(1, 2, 0)
        out[i] = out[i] * (1 - a) + warped[j].permute(1, 2, 0) * a
    return out
