"""Identity mixing on encoded identity tokens.

* Interpolation (``mix_identities``): a weighted average of identities with the same token layout,
  weights normalised to sum to 1 (Infinite-ID supp. A.7 interpolates identity embeddings; FlashFace
  supp. Sec. 3 constrains its two mixing weights to sum to 1). A weight set that selects one identity
  (all other weights 0) returns that identity bit-exactly: the arithmetic is skipped, so no rounding
  and no inf/NaN from a zero-weighted identity can touch it.
* Stacking (``stack_identities``): the tokens of all identities concatenated along the token axis
  (Infinite-ID supp. A.7), so the model attends to every identity at once.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from ..errors import OmniIDError


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Non-negative weights scaled to sum to 1."""
    w = [float(x) for x in weights]
    if not w:
        raise OmniIDError("no mixing weights given; pass one weight per identity")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise OmniIDError(f"mixing weights must be finite and >= 0, got {w}; use 0 to leave an identity out")
    total = sum(w)
    if total <= 0:
        raise OmniIDError(f"mixing weights sum to {total}; give at least one identity a weight > 0")
    return [x / total for x in w]


def mix_identities(identities: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted interpolation of identities of identical shape, e.g. (256, 1280) or (1, 256, 1280).

    Weights are normalised to sum to 1. Accumulates in at least float32 and returns the inputs' dtype.
    """
    if len(identities) != len(weights):
        raise OmniIDError(f"{len(identities)} identities but {len(weights)} weights; pass one weight per identity")
    w = normalize_weights(weights)
    first = identities[0]
    for i, t in enumerate(identities[1:], start=1):
        if t.shape != first.shape:
            raise OmniIDError(f"identity {i} has shape {tuple(t.shape)}, identity 0 {tuple(first.shape)}: only identities "
                             "with the same token layout can be interpolated; use stack_identities to combine them")
        if t.dtype != first.dtype or t.device != first.device:
            raise OmniIDError(f"identity {i} is {t.dtype} on {t.device}, identity 0 {first.dtype} on {first.device}; "
                             "convert them to one dtype and device first")
    selected = [i for i, x in enumerate(w) if x != 0.0]
    if len(selected) == 1:
        return identities[selected[0]].clone()  # clone: the caller may modify the result in place
    acc_dtype = torch.promote_types(first.dtype, torch.float32)
    out = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
    for t, x in zip(identities, w):
        if x != 0.0:
            out.add_(t.to(acc_dtype), alpha=x)
    return out.to(first.dtype)


def stack_identities(identities: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate identities along the token axis (-2): (..., L_1, C), (..., L_2, C) -> (..., L_1 + L_2, C)."""
    if len(identities) == 0:
        raise OmniIDError("no identities to stack")
    first = identities[0]
    for i, t in enumerate(identities):
        if t.ndim < 2 or t.ndim != first.ndim or t.shape[:-2] != first.shape[:-2] or t.shape[-1] != first.shape[-1]:
            raise OmniIDError(f"identity {i} has shape {tuple(t.shape)}, identity 0 {tuple(first.shape)}: stacked identities "
                             "need the same token width and leading (batch) dimensions")
    return torch.cat(list(identities), dim=-2)
