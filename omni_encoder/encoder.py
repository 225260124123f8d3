"""Omni-ID identity encoder (Qian et al., "Omni-ID", CVPR 2025, Sec. 3.1) in plain torch.

The encoder turns a *set* of face images of one person into a fixed-size identity code of
``num_queries`` tokens of width ``token_dim`` (the paper: 256 x 1280). Each image is given as its
CLIP-H penultimate hidden state (257 tokens: 256 patches + class token, width 1280). The tokens of all
images are concatenated along the token axis and serve as keys/values; learnable queries read them
through cross-attention blocks, then self-attention blocks refine the queries.

The paper fixes L=256, C=1280, 2 cross-attention blocks then 2 self-attention blocks. Choices it leaves
open, made here (they change the weights, so they are recorded in ``OmniIDConfig``):

* 20 heads (head width 64), feed-forward ratio 4 with GELU, pre-norm residual blocks;
* the image tokens get a LayerNorm inside every cross-attention block (CLIP hidden states are not
  normalised) and no projection before it;
* no positional or image-index embedding on the image tokens: the encoder is then invariant to the
  order of the images by construction (attention over a concatenated key set is a sum over keys);
* a final LayerNorm on the output tokens, so their scale does not depend on the number of images.

Batches of identities with different numbers of images are padded and carry an image mask.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from ..errors import OmniIDError

ENCODER_TYPES = ("omni_id", "clip", "arcface", "arcface_clip")

# Per-image inputs: a padded tensor (B, N, ...) with an optional (B, N) mask, or a list with one tensor
# (N_i, ...) per identity, from which the padding and the mask are built.
PerImageInput = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class OmniIDConfig:
    """Sizes of an identity encoder. Defaults are the paper's Omni-ID encoder on CLIP-H features."""

    encoder_type: str = "omni_id"   # one of ENCODER_TYPES (selects the class in build_encoder)
    token_dim: int = 1280           # C: width of the queries and of the output tokens
    clip_dim: int = 1280            # width of the CLIP image tokens (keys/values); CLIP-H: 1280
    num_queries: int = 256          # L: number of output tokens
    num_cross_blocks: int = 2
    num_self_blocks: int = 2
    heads: int = 20
    mlp_ratio: float = 4.0
    tokens_per_image: int = 257     # CLIP-H penultimate layer: 256 patches + class token
    arcface_dim: int = 512          # insightface ArcFace embedding (arcface / arcface_clip only)
    arcface_rank: int = 64          # per-token code width of the ArcFace projection (see baselines)
    version: str = "1"

    def __post_init__(self):
        if self.encoder_type not in ENCODER_TYPES:
            raise OmniIDError(f"encoder_type {self.encoder_type!r} is not one of {', '.join(ENCODER_TYPES)}")
        for name in ("token_dim", "clip_dim", "num_queries", "heads", "tokens_per_image", "arcface_dim", "arcface_rank"):
            if getattr(self, name) < 1:
                raise OmniIDError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_cross_blocks", "num_self_blocks"):
            if getattr(self, name) < 0:
                raise OmniIDError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.token_dim % self.heads:
            raise OmniIDError(f"token_dim {self.token_dim} is not divisible by heads {self.heads}")
        if not math.isfinite(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise OmniIDError(f"mlp_ratio must be a finite number > 0, got {self.mlp_ratio}: the weight file's metadata "
                              "is damaged; re-save it with save_identity_weights")

    def to_dict(self) -> dict[str, str]:
        """Flat str -> str dict (safetensors metadata holds strings only)."""
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> "OmniIDConfig":
        """Inverse of to_dict. Keys that are not config fields are ignored; missing ones take defaults."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            raw = data[f.name]
            kind = type(f.default)
            try:
                kwargs[f.name] = raw if kind is str else kind(float(raw)) if kind is float else int(str(raw))
            except ValueError:
                raise OmniIDError(f"config field {f.name}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**kwargs)


def pad_per_image(items: Sequence[torch.Tensor], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack one (N_i, ...) tensor per identity into (B, N_max, ...) plus a (B, N_max) bool mask.

    The mask is True for real images. Padding is zeros.
    """
    if len(items) == 0:
        raise OmniIDError(f"{what}: got an empty list; pass one tensor (N_i, ...) per identity")
    tail = items[0].shape[1:]
    for i, t in enumerate(items):
        if t.ndim != len(tail) + 1 or t.shape[1:] != tail:
            raise OmniIDError(f"{what}: identity {i} has shape {tuple(t.shape)}, expected (N_i, {', '.join(map(str, tail))})")
        if t.shape[0] == 0:
            raise OmniIDError(f"{what}: identity {i} has no images; every identity needs at least one")
    n_max = max(t.shape[0] for t in items)
    ref = items[0]
    out = ref.new_zeros((len(items), n_max, *tail))
    mask = torch.zeros(len(items), n_max, dtype=torch.bool, device=ref.device)
    for i, t in enumerate(items):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return out, mask


def check_image_mask(mask: Optional[torch.Tensor], batch: int, num_images: int, what: str) -> Optional[torch.Tensor]:
    """Validate a (B, N) image mask (True/nonzero = real image). Returns a bool mask, or None if unused."""
    if mask is None:
        return None
    if mask.shape != (batch, num_images):
        raise OmniIDError(f"{what}: mask has shape {tuple(mask.shape)}, expected (batch, images) = ({batch}, {num_images})")
    mask = mask if mask.dtype == torch.bool else mask != 0
    if not bool(mask.any(dim=1).all()):
        raise OmniIDError(f"{what}: an identity has no unmasked image; every row of the mask needs at least one True")
    return mask


def prepare_clip_tokens(clip_tokens: Optional[PerImageInput], mask: Optional[torch.Tensor], config: OmniIDConfig,
                        what: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Normalise CLIP inputs to (B, N, T, C) and a bool (B, N) mask (None when nothing is padded).

    Accepts (B, N, T, C), a single identity (N, T, C), or a list of (N_i, T, C) tensors, one per identity.
    Padded images are zeroed so that garbage (even NaN) in padding cannot leak through attention.
    """
    if clip_tokens is None:
        raise OmniIDError(f"{what} needs CLIP image tokens: pass clip_tokens=(B, N, {config.tokens_per_image}, {config.clip_dim})")
    if isinstance(clip_tokens, (list, tuple)):
        if mask is not None:
            raise OmniIDError(f"{what}: a list of per-identity tensors builds its own mask; do not pass mask as well")
        clip_tokens, mask = pad_per_image(clip_tokens, what)
    elif clip_tokens.ndim == 3:
        clip_tokens = clip_tokens.unsqueeze(0)
    if clip_tokens.ndim != 4:
        raise OmniIDError(f"{what}: clip_tokens has shape {tuple(clip_tokens.shape)}, expected (B, N, T, C)")
    b, n, t, c = clip_tokens.shape
    if (t, c) != (config.tokens_per_image, config.clip_dim):
        raise OmniIDError(
            f"{what}: each image must have {config.tokens_per_image} tokens of width {config.clip_dim} "
            f"(CLIP-H penultimate hidden state), got {t} x {c}; use the encoder's CLIP vision model or a config that matches")
    if n < 1:
        raise OmniIDError(f"{what}: no images given; pass at least one image per identity")
    mask = check_image_mask(mask, b, n, what)
    if mask is not None:
        if bool(mask.all()):
            mask = None  # nothing padded: let SDPA take its unmasked (faster) path
        else:
            clip_tokens = clip_tokens.masked_fill(~mask[:, :, None, None], 0.0)
    return clip_tokens, mask


def image_mask_to_token_mask(mask: Optional[torch.Tensor], tokens_per_image: int) -> Optional[torch.Tensor]:
    """(B, N) image mask -> (B, N * T) key mask matching images concatenated along the token axis."""
    return None if mask is None else mask.repeat_interleave(tokens_per_image, dim=1)


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention; keys/values may have their own width."""

    def __init__(self, dim: int, kv_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, lq, dim = x.shape
        lk = context.shape[1]
        h = self.heads
        q = self.to_q(x).view(b, lq, h, dim // h).transpose(1, 2)
        k = self.to_k(context).view(b, lk, h, dim // h).transpose(1, 2)
        v = self.to_v(context).view(b, lk, h, dim // h).transpose(1, 2)
        # Bool mask: True = this key takes part. Broadcast over heads and queries.
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, lq, dim))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: float):
        hidden = int(dim * mlp_ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: queries attend to the image-set tokens, then a feed-forward."""

    def __init__(self, dim: int, kv_dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.attn = Attention(dim, kv_dim, heads)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(context), key_mask)
        return x + self.ff(self.norm_ff(x))


class SelfAttentionBlock(nn.Module):
    """Pre-norm block: the queries attend to each other, then a feed-forward."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, dim, heads)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_attn(x)
        x = x + self.attn(h, h)
        return x + self.ff(self.norm_ff(x))


class IdentityTransformer(nn.Module):
    """Cross-attention blocks over the image-set tokens, then self-attention blocks, then a LayerNorm.

    Shared by Omni-ID (learned queries) and the ArcFace+CLIP baseline (ArcFace-derived queries).
    """

    def __init__(self, config: OmniIDConfig):
        super().__init__()
        c = config
        self.cross_blocks = nn.ModuleList(
            CrossAttentionBlock(c.token_dim, c.clip_dim, c.heads, c.mlp_ratio) for _ in range(c.num_cross_blocks))
        self.self_blocks = nn.ModuleList(SelfAttentionBlock(c.token_dim, c.heads, c.mlp_ratio) for _ in range(c.num_self_blocks))
        self.norm_out = nn.LayerNorm(c.token_dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = queries
        for block in self.cross_blocks:
            x = block(x, context, key_mask)
        for block in self.self_blocks:
            x = block(x)
        return self.norm_out(x)


class IdentityEncoder(nn.Module):
    """Common interface of Omni-ID and its baselines.

    ``forward(clip_tokens=None, arcface=None, mask=None) -> tokens (B, L, output_dim)``

    * ``clip_tokens``: CLIP-H penultimate tokens, (B, N, T, clip_dim), or (N, T, clip_dim) for one
      identity, or a list of (N_i, T, clip_dim) tensors, one per identity (padded internally);
    * ``arcface``: insightface embeddings, (B, N, arcface_dim), (B, arcface_dim), or a list of
      (N_i, arcface_dim) tensors;
    * ``mask``: (B, N) bool, True for real images, for padded tensor inputs.

    Inputs an encoder does not use (see ``uses_clip`` / ``uses_arcface``) are ignored, so a caller can
    pass everything it has. ``encode`` also returns an output-token mask for encoders whose output
    length depends on the number of images (the CLIP baseline).
    """

    encoder_type: str = ""
    uses_clip: bool = False
    uses_arcface: bool = False

    def __init__(self, config: OmniIDConfig):
        super().__init__()
        # The config records what this module is (it goes into weight files): keep its type truthful.
        if self.encoder_type and config.encoder_type != self.encoder_type:
            config = dataclasses.replace(config, encoder_type=self.encoder_type)
        self.config = config

    @property
    def output_dim(self) -> int:
        return self.config.token_dim

    def num_output_tokens(self, num_images: int) -> int:
        return self.config.num_queries

    def encode(self, clip_tokens: Optional[PerImageInput] = None, arcface: Optional[PerImageInput] = None,
               mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(tokens, token_mask): token_mask is (B, L) bool with False on padding, or None if all tokens are real."""
        return self(clip_tokens=clip_tokens, arcface=arcface, mask=mask), None

    def forward(self, clip_tokens: Optional[PerImageInput] = None, arcface: Optional[PerImageInput] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError


class OmniIDEncoder(IdentityEncoder):
    """Omni-ID encoder: ``num_queries`` learned queries read the concatenated CLIP tokens of N images."""

    encoder_type = "omni_id"
    uses_clip = True

    def __init__(self, config: OmniIDConfig = OmniIDConfig()):
        super().__init__(config)
        # Small init keeps the first residual updates from being dominated by the queries' scale.
        self.queries = nn.Parameter(torch.randn(config.num_queries, config.token_dim) * config.token_dim ** -0.5)
        self.transformer = IdentityTransformer(config)

    def forward(self, clip_tokens: Optional[PerImageInput] = None, arcface: Optional[PerImageInput] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        tokens, mask = prepare_clip_tokens(clip_tokens, mask, self.config, "Omni-ID encoder")
        b, n, t, c = tokens.shape
        context = tokens.to(self.queries.dtype).reshape(b, n * t, c)
        queries = self.queries.unsqueeze(0).expand(b, -1, -1)
        return self.transformer(queries, context, image_mask_to_token_mask(mask, t))
