"""FlashFace's face position mask: the 5th input channel of the released UNet, from a box or a MASK."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...errors import FlashFaceError


def face_position_mask(box: Optional[Sequence[float]], latent_hw: tuple[int, int], downscale: int = 8) -> torch.Tensor:
    """(h, w) face position mask at latent resolution, built exactly as the released code does.

    box: (x1, y1, x2, y2) as fractions of the image; None or all zeros → no constraint (all zero).
    The canvas is the image (h·8, w·8); the box goes to pixels with ``int(v·W)`` / ``int(v·H)``, and a square
    of side ``max(x2−x1, y2−y1)`` pixels anchored at (x1, y1) is set to 1, as the released demo and notebook
    do at ``ali-vilab/FlashFace@fff0f078`` (``max(face_bbox[2] - face_bbox[0], face_bbox[3] - face_bbox[1])``;
    older commits had ``face_bbox[2] - face_bbox[1]``, which that release fixed).
    """
    h, w = latent_hw
    if box is None or all(float(b) == 0.0 for b in box):
        return torch.zeros(h, w)
    x1, y1, x2, y2 = (float(b) for b in box)
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise FlashFaceError(f"face box must be fractions 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1, got {tuple(box)}; "
                             "use 0, 0, 0, 0 for no position constraint")
    H, W = h * downscale, w * downscale
    px = [int(x1 * W), int(y1 * H), int(x2 * W), int(y2 * H)]
    side = max(px[2] - px[0], px[3] - px[1])
    canvas = torch.zeros(H, W)
    canvas[px[1]:px[1] + side, px[0]:px[0] + side] = 1.0
    return canvas[::downscale, ::downscale]


def mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int], downscale: int = 8) -> torch.Tensor:
    """A MASK (H, W) or (1, H, W) → (h, w): brought to the image size (nearest), then sampled [::8, ::8]."""
    if mask.ndim == 3:
        mask = mask[0]
    h, w = latent_hw
    H, W = h * downscale, w * downscale
    if tuple(mask.shape) != (H, W):
        mask = F.interpolate(mask[None, None].float(), size=(H, W), mode="nearest")[0, 0]
    return mask.float().clamp(0, 1)[::downscale, ::downscale]


class FaceMaskConcat:
    """APPLY_MODEL wrapper: gives a 5-channel FlashFace UNet its mask channel as ``c_concat``.

    A conditioning that already carries a concat tensor (``noise_concat``) keeps it.
    """

    def __init__(self, box=None, mask: Optional[torch.Tensor] = None):
        self.box, self.mask = (None if box is None else tuple(float(b) for b in box)), mask
        if self.box is not None:
            face_position_mask(self.box, (8, 8))   # validate now, not at sampling time

    def __deepcopy__(self, memo):
        return self

    def latent_mask(self, latent_hw) -> torch.Tensor:
        if self.mask is not None:
            return mask_to_latent(self.mask, latent_hw)
        return face_position_mask(self.box, latent_hw)

    def __call__(self, executor, *args, **kwargs):
        args = list(args)
        x = args[0]
        if len(args) > 2 and args[2] is None:
            m = self.latent_mask(tuple(x.shape[-2:])).to(x.device, x.dtype)
            args[2] = m[None, None].expand(x.shape[0], 1, -1, -1)
        elif len(args) <= 2 and kwargs.get("c_concat") is None:
            m = self.latent_mask(tuple(x.shape[-2:])).to(x.device, x.dtype)
            kwargs["c_concat"] = m[None, None].expand(x.shape[0], 1, -1, -1)
        return executor(*args, **kwargs)
