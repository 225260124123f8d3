"""FlashFace reference faces: preparation as the released code does it, and the FLASHFACE_REF type.

A ``FlashFaceReferences`` holds one or more reference sets (one person each; several = identity mixing,
supplement Eq. 1) of VAE-mean latents with weights that sum to 1. Preparation (``encode_references``), as the
released demo and notebook (``ali-vilab/FlashFace@fff0f078``: ``detect_face``, ``ldm/models/retinaface.py``
``crop_face``, ``utils.PadToSquare``) do it:

1. detection on the photo padded to a 640 px square (long side resized to 640, centred black padding), faces
   with score > 0.6, boxes and eyes mapped back to the photo;
2. the box rounded (``bbox.round()``) and cropped with PIL (no margin; outside the photo is black);
3. the crop turned about its centre by the released eye angle (PIL ``rotate``: same size, nearest, black fill);
4. padded to a square of ``size`` (224), VAE-encoded (posterior mean).

Differences that remain: our detector is RetinaFace-mobilenet0.25 (the released one is RetinaFace-ResNet50, whose
weights are not on this machine), and its boxes are clipped to the padded square. The release requires exactly one
face per photo; with several we take the largest and say so in the log.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import FlashFaceError
from ...face import detect as face_detect
from ...face.types import BackendUnavailable, FaceDetection, image_to_uint8, rgb_images

DETECT_SIZE = 640        # the released detector input: PadToSquare(640)
DETECT_SCORE = 0.6       # released retinaface.detect(min_thr=0.6)

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


def released_eye_angle(left_eye, right_eye) -> float:
    """Degrees (counter-clockwise, PIL's convention) the released ``crop_face`` turns a face crop by: the angle of
    the eye line from the horizontal, computed as the release does (law of cosines on the eyes and the corner
    point between them), so its cases (which eye is higher, eyes one above the other) come out the same."""
    (lx, ly), (rx, ry) = (float(v) for v in left_eye[:2]), (float(v) for v in right_eye[:2])
    if ly > ry:
        corner, direction = (rx, ly), -1.0
    else:
        corner, direction = (lx, ry), 1.0
    a = math.hypot(lx - corner[0], ly - corner[1])
    b = math.hypot(rx - corner[0], ry - corner[1])
    c = math.hypot(rx - lx, ry - ly)
    if b == 0 or c == 0:
        return 0.0
    angle = math.degrees(math.acos(min(1.0, max(-1.0, (b * b + c * c - a * a) / (2 * b * c)))))
    if direction < 0:
        angle = 90.0 - angle
    return direction * angle


def crop_and_level(image: torch.Tensor, bbox, left_eye, right_eye) -> torch.Tensor:
    """One IMAGE (H, W, C) → the released face crop: the box rounded (``bbox.round()``) and cropped (no margin;
    outside the photo is black), then turned about its centre by ``released_eye_angle`` (PIL ``rotate``: same size,
    nearest, black fill). 8-bit as the release's PIL images are."""
    from PIL import Image
    box = tuple(float(round(float(v))) for v in bbox[:4])
    if box[2] <= box[0] or box[3] <= box[1]:
        raise FlashFaceError(f"empty face box {tuple(float(b) for b in bbox[:4])} in a "
                             f"{image.shape[1]}x{image.shape[0]} image")
    crop = Image.fromarray(image_to_uint8(image[..., :3])).crop(box)
    angle = released_eye_angle(left_eye, right_eye)
    if angle != 0.0:
        crop = crop.rotate(angle)
    return torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0)


_DETECTOR = None


def _released_detector():
    """RetinaFace at the released score threshold; the input is already the 640 px square (no downscale)."""
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = face_detect.RetinaFaceDetector(score_threshold=DETECT_SCORE, max_size=DETECT_SIZE)
    return _DETECTOR


def detect_as_released(image: torch.Tensor, detector=None) -> list:
    """Faces of one IMAGE (H, W, C) found as the released ``detect_face`` finds them: on the photo padded to a
    640 px square (PadToSquare: long side resized to 640 with PIL, centred black padding), score > 0.6, boxes and
    key points mapped back to the photo's pixels. Largest first."""
    from PIL import Image
    photo = Image.fromarray(image_to_uint8(image[..., :3]))
    w, h = photo.size
    scale = DETECT_SIZE / max(w, h)
    nw, nh = round(w * scale), round(h * scale)
    canvas = np.zeros((DETECT_SIZE, DETECT_SIZE, 3), np.uint8)
    left, top = (DETECT_SIZE - nw) // 2, (DETECT_SIZE - nh) // 2   # the release's get_padding
    canvas[top:top + nh, left:left + nw] = np.asarray(photo.resize((nw, nh), Image.BICUBIC))
    found = (detector or _released_detector()).detect(canvas)
    out = []
    for f in found:
        shift = np.array([left, top], np.float32)
        bbox = (np.asarray(f.bbox, np.float32).reshape(2, 2) - shift).reshape(4) / scale
        kps = (np.asarray(f.kps, np.float32) - shift) / scale
        out.append(FaceDetection(bbox=bbox, kps=kps, score=float(f.score), source=f.source))
    return face_detect.order_faces(out, "largest")


def _detect_and_crop(faces: torch.Tensor, detector=None) -> list:
    crops = []
    n = faces.shape[0]
    for i in range(n):
        try:
            found = detect_as_released(faces[i], detector)
        except BackendUnavailable as e:
            raise FlashFaceError(f"{e}; or crop the faces yourself and set crop to 'pre-cropped'") from e
        if not found:
            raise FlashFaceError(f"no face found in reference image {i + 1} of {n}: use a photo with one "
                                 "clearly visible face, or crop the face yourself and set crop to 'pre-cropped'")
        if len(found) > 1:
            # the release refuses such a photo; we take the largest face and say so
            log.warning("FlashFace: %d faces in reference image %d; using the largest (the released demo asks for one "
                        "face per photo)", len(found), i + 1)
        f = found[0]
        crops.append(crop_and_level(faces[i], f.bbox, f.kps[0], f.kps[1]))
    return crops


def encode_references(faces, vae, crop: str, size: int, pad_to: int, detector: Optional[object] = None):
    """IMAGE faces → (FlashFaceReferences, the prepared face images). ``detector``: any face detector with
    ``detect(rgb_uint8)`` (default: RetinaFace at the released 0.6)."""
    faces = rgb_images(faces, "FlashFace references", "connect one or more photos of the same person",
                       error=FlashFaceError)
    crops = _detect_and_crop(faces, detector) if crop == "detect" else list(faces)
    prepared = torch.cat([pad_to_square(c[None], size) for c in crops])
    latents = vae.encode(prepared).float().cpu()   # ComfyUI's VAE encodes to the posterior mean
    return FlashFaceReferences.single(latents).padded(pad_to), prepared
