"""Checks and conversions for IMAGE inputs shared by the nodes (clear errors instead of deep failures)."""
from __future__ import annotations

from typing import Optional

import torch

from ..face.types import to_rgb


def rgb_images(image: Optional[torch.Tensor], what: str, fix: str = "connect one or more images",
               error: type = ValueError) -> torch.Tensor:
    """A ComfyUI IMAGE batch (B, H, W, C) as RGB (see ``face.types.to_rgb``). Raises ``error`` naming ``what``
    for a missing or empty batch."""
    if image is None or image.ndim != 4 or image.shape[0] == 0:
        raise error(f"{what}: the image batch is empty; {fix}")
    try:
        return to_rgb(image)
    except ValueError as e:
        raise error(f"{what}: {e}") from e
