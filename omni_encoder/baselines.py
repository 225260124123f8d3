"""The Omni-ID paper's baseline identity representations (appendix A.1), behind the Omni-ID interface.

* ``clip``: all 257 CLIP-H penultimate tokens of every image, concatenated over images (IP-Adapter
  Full style): (B, 257 * N, 1280), no parameters.
* ``arcface``: the insightface ArcFace embedding (512-d), averaged over images after L2 normalisation
  and re-normalised, projected to 256 tokens of width 1280.
* ``arcface_clip``: the same ArcFace projection gives 256 *queries* that read the CLIP tokens of all
  images through the same transformer blocks as Omni-ID (IP-Adapter FaceID-Plus style, with the
  paper's larger query count and self-attention blocks).

The paper gives only the ArcFace projection's input and output sizes (1 x 512 -> 256 x 1280). A dense
Linear(512 -> 256 * 1280) would hold 168M parameters, more than the Omni-ID encoder itself, so it is
factored: the embedding gives each token its own ``arcface_rank``-wide code (one Linear), a shared
Linear maps codes to ``token_dim``, and each token adds a learned offset before a LayerNorm.

ArcFace embeddings are inputs here, computed by the caller (insightface); no face model is loaded.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import (IdentityEncoder, IdentityTransformer, OmniIDConfig, OmniIDEncoder, PerImageInput,
                      check_image_mask, image_mask_to_token_mask, pad_per_image, prepare_clip_tokens)
from ..errors import OmniIDError


def prepare_arcface(arcface: Optional[PerImageInput], mask: Optional[torch.Tensor], config: OmniIDConfig,
                    what: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Normalise ArcFace inputs to (B, N, D) plus a bool (B, N) mask or None.

    Accepts (B, N, D); (B, D), one embedding per identity (``mask`` is then not used); or a list of
    (N_i, D) or (D,) tensors, one per identity.
    """
    if arcface is None:
        raise OmniIDError(f"{what} needs ArcFace embeddings: pass arcface=(B, N, {config.arcface_dim}) from insightface")
    if isinstance(arcface, (list, tuple)):
        if mask is not None:
            raise OmniIDError(f"{what}: a list of per-identity embeddings builds its own mask; do not pass mask as well")
        arcface, mask = pad_per_image([a.unsqueeze(0) if a.ndim == 1 else a for a in arcface], what)
    elif arcface.ndim == 2:
        arcface, mask = arcface.unsqueeze(1), None
    if arcface.ndim != 3 or arcface.shape[-1] != config.arcface_dim:
        raise OmniIDError(f"{what}: arcface has shape {tuple(arcface.shape)}, expected (B, N, {config.arcface_dim})")
    mask = check_image_mask(mask, arcface.shape[0], arcface.shape[1], what)
    return arcface, mask


def average_arcface(embeddings: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N, D) -> (B, D): mean of the L2-normalised embeddings of the real images, re-normalised.

    ArcFace compares by cosine, so each image votes with its direction only; padded rows are zeroed
    before the sum so they cannot contribute (even if they hold NaN).
    """
    unit = F.normalize(embeddings, dim=-1)
    if mask is not None:
        unit = unit.masked_fill(~mask[..., None], 0.0)
    # Dividing by the count would not change the direction: normalise the sum directly.
    return F.normalize(unit.sum(dim=1), dim=-1)


class ArcFaceProjection(nn.Module):
    """(B, arcface_dim) unit embedding -> (B, num_queries, token_dim) tokens (factored MLP, see module doc)."""

    def __init__(self, config: OmniIDConfig):
        super().__init__()
        self.num_tokens = config.num_queries
        self.rank = config.arcface_rank
        self.to_codes = nn.Linear(config.arcface_dim, config.num_queries * config.arcface_rank)
        self.act = nn.GELU()
        self.to_tokens = nn.Linear(config.arcface_rank, config.token_dim)
        self.token_offset = nn.Parameter(torch.randn(config.num_queries, config.token_dim) * config.token_dim ** -0.5)
        self.norm = nn.LayerNorm(config.token_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        codes = self.to_codes(embedding).view(embedding.shape[0], self.num_tokens, self.rank)
        return self.norm(self.to_tokens(self.act(codes)) + self.token_offset)


class CLIPTokensEncoder(IdentityEncoder):
    """CLIP baseline: the image tokens themselves, concatenated over images. No parameters."""

    encoder_type = "clip"
    uses_clip = True

    @property
    def output_dim(self) -> int:
        return self.config.clip_dim

    def num_output_tokens(self, num_images: int) -> int:
        return num_images * self.config.tokens_per_image

    def encode(self, clip_tokens: Optional[PerImageInput] = None, arcface: Optional[PerImageInput] = None,
               mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        tokens, mask = prepare_clip_tokens(clip_tokens, mask, self.config, "CLIP baseline")
        b, n, t, c = tokens.shape
        return tokens.reshape(b, n * t, c), image_mask_to_token_mask(mask, t)

    def forward(self, clip_tokens: Optional[PerImageInput] = None, arcface: Optional[PerImageInput] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N * T, clip_dim); padded images come out as zero tokens (use ``encode`` for their mask)."""
        return self.encode(clip_tokens, arcface, mask)[0]


class ArcFaceEncoder(IdentityEncoder):
    """ArcFace baseline: the averaged embedding projected to ``num_queries`` tokens."""

    encoder_type = "arcface"
    uses_arcface = True

    def __init__(self, config: OmniIDConfig):
        super().__init__(config)
        self.proj = ArcFaceProjection(config)

    def forward(self, clip_tokens: Optional[PerImageInput] = None, arcface: Optional[PerImageInput] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb, emb_mask = prepare_arcface(arcface, mask, self.config, "ArcFace baseline")
        return self.proj(average_arcface(emb.to(self.proj.token_offset.dtype), emb_mask))


class ArcFaceCLIPEncoder(IdentityEncoder):
    """ArcFace+CLIP baseline: ArcFace-derived queries over all images' CLIP tokens, Omni-ID's blocks."""

    encoder_type = "arcface_clip"
    uses_clip = True
    uses_arcface = True

    def __init__(self, config: OmniIDConfig):
        super().__init__(config)
        self.proj = ArcFaceProjection(config)
        self.transformer = IdentityTransformer(config)

    def forward(self, clip_tokens: Optional[PerImageInput] = None, arcface: Optional[PerImageInput] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = self.proj.token_offset.dtype
        emb, emb_mask = prepare_arcface(arcface, mask, self.config, "ArcFace+CLIP baseline")
        tokens, clip_mask = prepare_clip_tokens(clip_tokens, mask, self.config, "ArcFace+CLIP baseline")
        if emb.shape[0] != tokens.shape[0]:
            raise OmniIDError(f"ArcFace+CLIP baseline: {emb.shape[0]} ArcFace identities but {tokens.shape[0]} CLIP identities; "
                             "pass both for the same identities")
        queries = self.proj(average_arcface(emb.to(dtype), emb_mask))
        b, n, t, c = tokens.shape
        return self.transformer(queries, tokens.to(dtype).reshape(b, n * t, c), image_mask_to_token_mask(clip_mask, t))


ENCODER_CLASSES: dict[str, type[IdentityEncoder]] = {
    "omni_id": OmniIDEncoder,
    "clip": CLIPTokensEncoder,
    "arcface": ArcFaceEncoder,
    "arcface_clip": ArcFaceCLIPEncoder,
}


def build_encoder(config: OmniIDConfig) -> IdentityEncoder:
    """The encoder ``config.encoder_type`` names, with freshly initialised parameters."""
    return ENCODER_CLASSES[config.encoder_type](config)
