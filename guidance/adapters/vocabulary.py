"""The IP-Adapter vocabulary users know from IPAdapter_plus, where it is well defined, written out here.

``weight_type``: a factor per attention module (UNet: the spatial transformers in forward order: input blocks,
middle, output blocks, i = 0 … n-1; FLUX: the blocks the adapter acts on, double then single). Every
transformer block of a module gets its module's factor. With x = i / n:

* ``linear``: 1 everywhere (the default: the same weight on every layer, what the node always did);
* ``ease in``: 0.05 + 0.95 (1 − x), strong near the input, fading; ``ease out``: 0.05 + 0.95 x;
* ``ease in-out``: 0.05 + 0.95 (1 − |i − n/2| / (n/2)), strongest mid-way; ``reverse in-out``: 0.05 + 0.95 |i − n/2| / (n/2);
* ``weak input`` / ``weak middle`` / ``weak output``: 0.2 on that part of the UNet, 1 elsewhere;
  ``strong middle``: 0.2 on the input and output blocks (UNets only: FLUX has no such parts);
* ``style transfer`` / ``composition`` (SDXL only; InstantStyle, Wang et al. 2024): the identity acts only in
  ``up_blocks.0.attentions.1`` (the deepest up level's second attention module: style) or only in
  ``down_blocks.2.attentions.1`` (the deepest down level's second one: layout); 0 everywhere else.

These factors are the ones IPAdapter_plus uses for the same names (its module index counts the same spatial
transformers in the same order), so a setting carries over.

``combine_embeds`` (several images of one person): what the encoder gives per image (CLIP tokens or image
embedding, ArcFace embedding) is combined before the projection. ``concat`` keeps every image (IP-Adapter:
their image-prompt tokens side by side; Omni-ID: every image into its encoder, the paper's way); ``add``: Σ x_i;
``subtract``: x_0 − mean(x_1 … x_{N−1}); ``average``: mean x_i; ``norm average``: mean of x_i ‖x̄‖/‖x_i‖ with
‖·‖ the L2 norm over channels (per token) and ‖x̄‖ the images' mean norm, so each image votes with its
direction at the images' typical magnitude (IPAdapter_plus divides element-wise by the norm over the images
instead; that is not a direction average).

``embeds_scaling``: ``V only``: out + w·Attn(q, K_ip, V_ip) (the original IP-Adapter's scale); ``K+V``:
out + Attn(q, w·K_ip, w·V_ip), i.e. w also sharpens (w > 1) or flattens the identity attention.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ...errors import OmniIDError

WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition")
COMBINE_EMBEDS = ("concat", "add", "subtract", "average", "norm average")
EMBEDS_SCALING = ("V only", "K+V")
WEIGHT_MIN, WEIGHT_MAX = -1.0, 5.0   # IPAdapter_plus's range


def _module(key) -> tuple:
    return tuple(key[:2])


def _instantstyle_module(which: str, unet_config: dict) -> tuple:
    """LDM (block, id) of InstantStyle's diffusers module: style = up_blocks.0.attentions.1 (output block 1),
    composition = down_blocks.2.attentions.1 (the deepest level's second input block)."""
    if which == "style transfer":
        return ("output", 1)
    nrb = unet_config.get("num_res_blocks")
    levels = len(unet_config.get("channel_mult", ()))
    nrb = list(nrb) if isinstance(nrb, (list, tuple)) else [nrb] * levels
    start = 1 + sum(n + 1 for n in nrb[:-1])   # input block 0 is conv_in; each level but the last ends in a downsample
    return ("input", start + 1)


def site_weights(weight_type: str, weight: float, family: str, sites: Iterable, unet_config: Optional[dict] = None,
                 ) -> dict:
    """{site key: weight} for ``weight_type`` (see the module doc). ``sites``: the keys the adapter acts on, in
    the model's forward order (UNet (block, id, index); FLUX (kind, i))."""
    if weight_type not in WEIGHT_TYPES:
        raise OmniIDError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    sites = list(sites)
    unet = family != "flux"
    modules = list(dict.fromkeys(_module(k) if unet else tuple(k) for k in sites))
    n = len(modules)
    index = {m: i for i, m in enumerate(modules)}
    if weight_type in ("style transfer", "composition"):
        if family != "sdxl":
            raise OmniIDError(f"weight_type {weight_type!r} is defined for SDXL (InstantStyle's up_blocks.0.attentions.1 "
                              f"/ down_blocks.2.attentions.1); this model is {family}: use linear or another type")
        target = _instantstyle_module(weight_type, unet_config or {})
        if target not in index:
            raise OmniIDError(f"this SDXL model has no attention in {target[0]} block {target[1]}, where "
                              f"{weight_type!r} acts")
        return {k: (weight if _module(k) == target else 0.0) for k in sites}
    if not unet and weight_type.startswith(("weak", "strong")):
        raise OmniIDError(f"weight_type {weight_type!r} names UNet parts (input, middle, output blocks); FLUX has none: "
                          "use linear or an ease type")

    def factor(key) -> float:
        i = index[_module(key) if unet else tuple(key)]
        x, half = i / n, n / 2
        part = key[0]
        if weight_type == "ease in":
            return 0.05 + 0.95 * (1 - x)
        if weight_type == "ease out":
            return 0.05 + 0.95 * x
        if weight_type == "ease in-out":
            return 0.05 + 0.95 * (1 - abs(i - half) / half)
        if weight_type == "reverse in-out":
            return 0.05 + 0.95 * abs(i - half) / half
        if weight_type == "weak input":
            return 0.2 if part == "input" else 1.0
        if weight_type == "weak middle":
            return 0.2 if part == "middle" else 1.0
        if weight_type == "weak output":
            return 0.2 if part == "output" else 1.0
        if weight_type == "strong middle":
            return 0.2 if part in ("input", "output") else 1.0
        return 1.0
    return {k: weight * factor(k) for k in sites}


def combine(features: torch.Tensor, mode: str) -> torch.Tensor:
    """Combine per-image features (N, ...) into (1, ...) (``concat`` returns them unchanged: N images)."""
    if mode not in COMBINE_EMBEDS:
        raise OmniIDError(f"combine_embeds must be one of {COMBINE_EMBEDS}, got {mode!r}")
    if mode == "concat" or features.shape[0] == 1 and mode != "subtract":
        return features
    if mode == "add":
        return features.sum(0, keepdim=True)
    if mode == "average":
        return features.mean(0, keepdim=True)
    if mode == "subtract":
        if features.shape[0] < 2:
            raise OmniIDError("combine_embeds 'subtract' needs at least two images: the first minus the mean of the others")
        return features[:1] - features[1:].mean(0, keepdim=True)
    norms = features.norm(dim=-1, keepdim=True)
    return (features * (norms.mean(0, keepdim=True) / norms.clamp_min(1e-12))).mean(0, keepdim=True)
