"""Checks and conversions for IMAGE inputs shared by the nodes (clear errors instead of deep failures)."""
from __future__ import annotations

from typing import Optional

import torch


def rgb_images(image: Optional[torch.Tensor], what: str, fix: str = "connect one or more images") -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, C) as RGB: gray (C=1) and gray+alpha (C=2) become three equal channels,
    alpha (C=4) is dropped. Raises a ValueError naming ``what`` for a missing or empty batch."""
    if image is None or image.ndim != 4 or image.shape[0] == 0:
        raise ValueError(f"{what}: the image batch is empty; {fix}")
    c = image.shape[-1]
    if c in (1, 2):
        return image[..., :1].expand(*image.shape[:-1], 3)
    if c < 1 or c > 4:
        raise ValueError(f"{what}: an IMAGE has 1 to 4 channels (last axis), this one has {c}")
    return image[..., :3]
