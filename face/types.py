"""Data types shared by the face modules, and conversions between ComfyUI tensors and numpy images."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
import torch

try:
    from ..errors import BackendUnavailable, FaceError, InputError, ModelFilesMissing
except ImportError:   # `python -m face.cli` from the repository root: face/ is top-level there
    from errors import BackendUnavailable, FaceError, InputError, ModelFilesMissing

__all__ = ["BackendUnavailable", "FaceError", "InputError", "ModelFilesMissing", "FaceDetection"]


@dataclass
class FaceDetection:
    """One detected face, in pixel coordinates of the image it was found in.

    bbox: (4,) x1, y1, x2, y2. kps: (5, 2) left eye, right eye, nose, left and right mouth corner in
    insightface order (left/right as seen in the image). landmarks: optional dense (N, 2) points and
    ``landmark_kind`` naming their layout ("2d106", "3d68", "mediapipe478"). pose: optional
    (yaw, pitch, roll) in degrees, see ``landmarks.estimate_pose`` for the convention; poses are only
    comparable when produced by the same back-end. embedding: optional L2-normalised identity vector.
    """

    bbox: np.ndarray
    kps: np.ndarray
    score: float
    image_index: int = 0
    landmarks: Optional[np.ndarray] = None
    landmark_kind: str = ""
    landmarks_3d: Optional[np.ndarray] = None
    pose: Optional[tuple[float, float, float]] = None
    embedding: Optional[np.ndarray] = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.bbox = np.asarray(self.bbox, dtype=np.float32).reshape(4)
        self.kps = np.asarray(self.kps, dtype=np.float32).reshape(5, 2)
        self.score = float(self.score)

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return float(self.bbox[0] + self.bbox[2]) / 2, float(self.bbox[1] + self.bbox[3]) / 2

    def with_(self, **changes) -> "FaceDetection":
        return replace(self, **changes)


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI image(s) [..., C] as RGB [..., 3]: gray (C=1) and gray+alpha (C=2) become three equal
    channels, alpha (C=4, LoadImage variants) is dropped."""
    c = image.shape[-1]
    if c in (1, 2):
        return image[..., :1].expand(*image.shape[:-1], 3)
    if c < 1 or c > 4:
        raise InputError(f"an IMAGE has 1 to 4 channels (last axis), this one has {c}")
    return image[..., :3]


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """One ComfyUI image [H,W,C] (or [1,H,W,C]) in 0..1 to an RGB uint8 array [H,W,3]."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise InputError(f"expected a single image, got a batch of {image.shape[0]}")
        image = image[0]
    arr = to_rgb(image.detach()).to("cpu", torch.float32).clamp(0, 1).numpy()
    return (arr * 255.0 + 0.5).astype(np.uint8)


def uint8_to_image(arr: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H,W,3] (or grey [H,W]) to a ComfyUI IMAGE [1,H,W,3]."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return torch.from_numpy(np.array(arr[..., :3], dtype=np.float32)).div(255.0).unsqueeze(0)


def faces_to_boxes(faces: list[FaceDetection]) -> torch.Tensor:
    """[N,4] float boxes (x1,y1,x2,y2), empty [0,4] for no faces."""
    if not faces:
        return torch.zeros(0, 4)
    return torch.from_numpy(np.stack([f.bbox for f in faces])).float()


def rgb_images(image: Optional[torch.Tensor], what: str, fix: str = "connect one or more images",
               error: type = InputError) -> torch.Tensor:
    """A ComfyUI IMAGE batch (B, H, W, C) as RGB (see ``to_rgb``). Raises ``error`` naming ``what`` for a missing or
    empty batch, an image of no pixels, NaN/inf pixels, or an image that is not one."""
    if image is None or image.ndim != 4 or image.shape[0] == 0:
        raise error(f"{what}: the image batch is empty; {fix}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise error(f"{what}: the images are {image.shape[2]}x{image.shape[1]} pixels; connect images with at least one "
                    "pixel (a crop or resize upstream produced an empty image)")
    check_finite(image, what, "pixel values", error)
    try:
        return to_rgb(image)
    except ValueError as e:
        raise error(f"{what}: {e}") from e


def all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """No NaN/inf in ``t``, checked a slab at a time: ``isfinite`` of a whole phone photo makes temporaries several
    times its size."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.numel() <= chunk or t.dim() == 0:
        return bool(torch.isfinite(t).all())
    if t.shape[0] == 1:
        return all_finite(t[0], chunk)
    return all(all_finite(c, chunk) for c in t.split(max(1, chunk * t.shape[0] // t.numel())))


def check_finite(t: torch.Tensor, what: str, kind: str = "values", error: type = InputError) -> torch.Tensor:
    """``t`` unchanged; ``error`` naming ``what`` if it holds NaN or infinite values."""
    if not all_finite(t):
        raise error(f"{what}: the {kind} include NaN or infinite numbers; fix the node that produced them")
    return t


def mask_batch(mask: torch.Tensor, what: str, error: type = InputError) -> torch.Tensor:
    """A ComfyUI MASK as (M, H, W) float: (H, W) gets a batch axis. Raises ``error`` naming ``what`` for another
    number of dimensions, no mask or no pixels, or NaN/inf values."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise error(f"{what}: a MASK is (H, W) or (batch, H, W), got {shape}; connect a MASK output (Load Image's "
                    "mask, Face Mask, Solid Mask, ...)")
    m = mask[None] if mask.ndim == 2 else mask
    if 0 in m.shape:
        raise error(f"{what}: the mask is empty {tuple(mask.shape)}; connect a mask with at least one pixel (a mask "
                    "node upstream found nothing)")
    return check_finite(m.float(), what, "mask values", error)
