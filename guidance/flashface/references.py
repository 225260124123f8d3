"""FlashFace reference faces: preparation as the released code does it, and the FLASHFACE_REF type.

A ``FlashFaceReferences`` holds one or more reference sets (one person each; several = identity mixing,
supplement Eq. 1) of VAE-mean latents with weights that sum to 1. Preparation (``encode_references``): find
the face (or take pre-cropped faces), crop the detection box, level the eyes, pad to a square, resize, encode.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import FlashFaceError
from ...face import detect as face_detect
from ...face.types import BackendUnavailable, rgb_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceSet:
    """One person's reference faces: VAE-mean latents (N, C, h, w) in the VAE's raw space."""
    latents: torch.Tensor
    weight: float = 1.0


@dataclass(frozen=True)
class FlashFaceReferences:
    """FLASHFACE_REF: one or more reference sets (identity mixing) with weights summing to 1."""
    sets: tuple

    def __post_init__(self):
        if not self.sets:
            raise FlashFaceError("no reference faces: connect at least one face image to 'FlashFace Encode References'")
        for s in self.sets:
            if s.latents.ndim != 4 or s.latents.shape[0] == 0:
                raise FlashFaceError("a reference set is empty: encode at least one face image")
            if s.weight < 0:
                raise FlashFaceError(f"identity weights must be >= 0, got {s.weight}")
        if len({s.latents.shape[1] for s in self.sets}) != 1:
            raise FlashFaceError("reference sets were encoded with different VAEs (latent channels differ)")
        total = sum(s.weight for s in self.sets)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise FlashFaceError(f"identity weights must sum to 1, got {total}")

    @classmethod
    def single(cls, latents: torch.Tensor) -> "FlashFaceReferences":
        return cls((ReferenceSet(latents, 1.0),))

    @property
    def latent_channels(self) -> int:
        return self.sets[0].latents.shape[1]

    def active_sets(self) -> list:
        return [s for s in self.sets if s.weight != 0.0]

    def mix(self, other: "FlashFaceReferences", weight_other: float) -> "FlashFaceReferences":
        """Identity mixing: this person with weight 1−w, ``other`` with w (each set scaled)."""
        if not 0.0 <= weight_other <= 1.0:
            raise FlashFaceError(f"mixing weight must be in [0, 1], got {weight_other}")
        sets = [ReferenceSet(s.latents, s.weight * (1.0 - weight_other)) for s in self.sets]
        sets += [ReferenceSet(s.latents, s.weight * weight_other) for s in other.sets]
        return FlashFaceReferences(tuple(sets))

    def padded(self, n: int) -> "FlashFaceReferences":
        """Each set repeated cyclically up to ``n`` faces (the released code always uses 4)."""
        if n <= 0:
            return self
        out = []
        for s in self.sets:
            k = s.latents.shape[0]
            idx = torch.arange(max(n, k)) % k if k < n else torch.arange(k)
            out.append(ReferenceSet(s.latents[idx], s.weight))
        return FlashFaceReferences(tuple(out))

    def __repr__(self):   # shown in the UI and logs
        parts = ", ".join(f"{s.latents.shape[0]} face(s) w={s.weight:g}" for s in self.sets)
        return f"FlashFaceReferences({parts})"


def pad_to_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE (N, H, W, C) → (N, size, size, 3): long side resized to ``size``, black centred padding
    (FlashFace's PadToSquare; black is −1 after the VAE's normalisation, as in the released code)."""
    out = []
    for img in images[..., :3]:
        h, w = img.shape[:2]
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        x = F.interpolate(img.movedim(-1, 0)[None].float(), size=(nh, nw), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)[0].movedim(0, -1)
        canvas = torch.zeros(size, size, 3, dtype=x.dtype)
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas[top:top + nh, left:left + nw] = x
        out.append(canvas)
    return torch.stack(out)


def crop_and_level(image: torch.Tensor, bbox, left_eye, right_eye) -> torch.Tensor:
    """One IMAGE (H, W, C): crop the detection box (no margin), then rotate the crop about its centre
    so the eyes are level (same size, black fill) — FlashFace's reference preprocessing."""
    h, w = image.shape[:2]
    x1, y1 = max(0, int(math.floor(bbox[0]))), max(0, int(math.floor(bbox[1])))
    x2, y2 = min(w, int(math.ceil(bbox[2]))), min(h, int(math.ceil(bbox[3])))
    if x2 <= x1 or y2 <= y1:
        raise FlashFaceError(f"empty face box {tuple(float(b) for b in bbox)} in a {w}x{h} image")
    crop = image[y1:y2, x1:x2, :3].float()
    angle = math.atan2(float(right_eye[1]) - float(left_eye[1]), float(right_eye[0]) - float(left_eye[0]))
    if abs(angle) < 1e-6:
        return crop
    ch, cw = crop.shape[:2]
    cos, sin = math.cos(angle), math.sin(angle)
    # output pixel (u, v) samples the input at R(angle)·(u, v) about the centre (pixel units → [-1, 1])
    theta = torch.tensor([[cos, -sin * ch / cw, 0.0], [sin * cw / ch, cos, 0.0]], dtype=torch.float32,
                         device=crop.device)
    grid = F.affine_grid(theta[None], (1, 3, ch, cw), align_corners=False)
    out = F.grid_sample(crop.movedim(-1, 0)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].movedim(0, -1).clamp(0, 1)


def _detect_and_crop(faces: torch.Tensor) -> list:
    try:
        found = face_detect.detect_faces(faces)
    except BackendUnavailable as e:
        raise FlashFaceError(f"{e}; or crop the faces yourself and set crop to 'pre-cropped'") from e
    crops = []
    for i, per_image in enumerate(found):
        chosen = face_detect.select_faces(per_image, "largest", 0)
        if not chosen:
            raise FlashFaceError(f"no face found in reference image {i + 1} of {len(found)}: use a photo with one "
                                    "clearly visible face, or crop the face yourself and set crop to 'pre-cropped'")
        if len(per_image) > 1:
            log.warning("FlashFace: %d faces in reference image %d; using the largest", len(per_image), i + 1)
        f = chosen[0]
        crops.append(crop_and_level(faces[i], f.bbox, f.kps[0], f.kps[1]))
    return crops


def encode_references(faces, vae, crop: str, size: int, pad_to: int):
    """IMAGE faces → (FlashFaceReferences, the prepared face images)."""
    faces = rgb_images(faces, "FlashFace references", "connect one or more photos of the same person",
                       error=FlashFaceError)
    crops = _detect_and_crop(faces) if crop == "detect" else list(faces)
    prepared = torch.cat([pad_to_square(c[None], size) for c in crops])
    latents = vae.encode(prepared).float().cpu()   # ComfyUI's VAE encodes to the posterior mean
    return FlashFaceReferences.single(latents).padded(pad_to), prepared
