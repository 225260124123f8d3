"""Stage 1: the Masked Transformer Decoder objective (Omni-ID Eq. 4-5, appendix A.2).

For each identity, the encoder reads the inputs X^s and gives ℓ = E(X^s). Every target x^r of X^r is
cut into 14 x 14 patches; 95 % of them, chosen at random, are hidden (x̃^r = x^r ⊙ M). The decoder
reconstructs the whole target from the few visible patches and ℓ:

    query tokens = Linear(patch pixels of x̃^r) + position embedding, a learned mask token added on
                   hidden patches (it tells hidden from black patches),
    6 cross-attention blocks (keys/values = ℓ), then 2 self-attention blocks over the patches,
    LayerNorm, Linear -> patch pixels.

Loss (Eq. 4): L1 between the reconstruction and the target on the face mask M^r only, per target
image normalised by its mask area (so every target weighs the same whatever its face size), then
averaged over targets and identities. Pixels are compared in [-1, 1].

The decoder uses the encoder's own block classes (``omni_encoder.encoder``): "the decoder uses the same
architecture as the Omni-ID encoder, but instead of a learned query, its query comes from the masked
input target image" (Sec. 3.3). Its width and heads are not given by the paper (our choice: 1024 / 16).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..encoder import CrossAttentionBlock, SelfAttentionBlock
from .data import first_identity, generator, sample_seed
from ...errors import TrainingError

STREAM_PATCHES = 21


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, (H/p)*(W/p), C*p*p), patches in raster order."""
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise TrainingError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(patches: torch.Tensor, patch: int, h: int, w: int, channels: int = 3) -> torch.Tensor:
    """Inverse of ``patchify``."""
    n = patches.shape[0]
    x = patches.reshape(n, h // patch, w // patch, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, h, w)


def num_masked(num_patches: int, ratio: float) -> int:
    """How many patches a ratio hides: round(ratio * N), leaving at least one patch visible."""
    return min(num_patches - 1, int(round(ratio * num_patches)))


def random_patch_mask(num_patches: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    """Bool (num_patches,): True = hidden. Exactly ``num_masked(num_patches, ratio)`` patches are hidden."""
    hidden = torch.zeros(num_patches, dtype=torch.bool)
    hidden[torch.randperm(num_patches, generator=g)[:num_masked(num_patches, ratio)]] = True
    return hidden


def patch_masks_for(seeds: torch.Tensor, per: int, num_patches: int, ratio: float) -> torch.Tensor:
    """(len(seeds) * per, num_patches) hidden-patch masks, one per target, from each sample's seed."""
    rows = []
    for s in seeds.tolist():
        g = generator(sample_seed(int(s), STREAM_PATCHES, 0))
        rows.extend(random_patch_mask(num_patches, ratio, g) for _ in range(per))
    return torch.stack(rows)


def patch_mask_pixels(hidden: torch.Tensor, patch: int, h: int, w: int) -> torch.Tensor:
    """(N, L) hidden-patch mask -> (N, 1, H, W) float pixel mask (1 on hidden patches)."""
    return unpatchify(hidden.float()[..., None].expand(-1, -1, patch * patch), patch, h, w, channels=1)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 4's |(D(ℓ, x̃) - x) ⊙ M^r|_1, normalised per image by its mask area, averaged over images.

    pred, target: (N, C, H, W); mask: (N, 1, H, W) in [0, 1]. Pixels outside the mask do not count at
    all; an image with an empty mask contributes 0. Returns (mean over images, per-image losses (N,)).
    """
    err = (pred - target).abs() * mask
    per_image = err.flatten(1).sum(1) / (mask.flatten(1).sum(1) * pred.shape[1]).clamp_min(eps)
    return per_image.mean(), per_image


class MaskedTransformerDecoder(nn.Module):
    """Reconstructs targets from visible patches (queries) and identity tokens ℓ (keys/values)."""

    def __init__(self, token_dim: int, image_size: int, patch: int = 14, dim: int = 1024, heads: int = 16,
                 mlp_ratio: float = 4.0, cross_blocks: int = 6, self_blocks: int = 2, channels: int = 3):
        super().__init__()
        if image_size % patch:
            raise TrainingError(f"image_size {image_size} must be a multiple of the patch size {patch}")
        if dim % heads:
            raise TrainingError(f"decoder dim {dim} is not divisible by heads {heads}")
        self.image_size, self.patch, self.channels = image_size, patch, channels
        self.grid = image_size // patch
        self.num_patches = self.grid * self.grid
        pdim = channels * patch * patch
        self.embed = nn.Linear(pdim, dim)
        self.pos = nn.Parameter(torch.randn(1, self.num_patches, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(dim, token_dim, heads, mlp_ratio)
                                          for _ in range(cross_blocks))
        self.self_blocks = nn.ModuleList(SelfAttentionBlock(dim, heads, mlp_ratio) for _ in range(self_blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, pdim)

    def blocks(self) -> list:
        return list(self.cross_blocks) + list(self.self_blocks)

    def forward(self, identity: torch.Tensor, masked_images: torch.Tensor, hidden: torch.Tensor,
                identity_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """identity (N, L, C); masked_images (N, 3, S, S) in [-1, 1] with hidden patches zeroed;
        hidden (N, num_patches) bool. Returns the reconstruction (N, 3, S, S)."""
        x = self.embed(patchify(masked_images, self.patch)) + self.pos
        x = x + hidden[..., None].to(x.dtype) * self.mask_token
        for blk in self.cross_blocks:
            x = blk(x, identity, identity_mask)
        for blk in self.self_blocks:
            x = blk(x)
        out = self.head(self.norm(x))
        return unpatchify(out, self.patch, self.image_size, self.image_size, self.channels)


class MTDStage(nn.Module):
    """Encoder (+ trunk) + masked transformer decoder, trained end to end with Eq. 4."""

    def __init__(self, identity: nn.Module, decoder: MaskedTransformerDecoder, mask_ratio: float = 0.95,
                 loss_on: str = "all"):
        super().__init__()
        self.identity = identity
        self.decoder = decoder
        self.mask_ratio, self.loss_on = float(mask_ratio), loss_on

    def corrupt(self, targets: torch.Tensor, seeds: torch.Tensor, per: int):
        """x̃ = x ⊙ M on [-1, 1] images: returns (masked images, hidden (N, L) bool, hidden pixel mask)."""
        d = self.decoder
        hidden = patch_masks_for(seeds, per, d.num_patches, self.mask_ratio).to(targets.device)
        pix = patch_mask_pixels(hidden, d.patch, d.image_size, d.image_size).to(targets.dtype)
        return targets * (1 - pix), hidden, pix

    def forward(self, batch: dict) -> dict:
        targets = batch["targets"]
        b, r = targets.shape[:2]
        tokens, key_mask = self.identity(batch["inputs"], batch["input_mask"])
        x = targets.flatten(0, 1) * 2 - 1
        if x.shape[-1] != self.decoder.image_size:
            raise TrainingError(f"targets are {x.shape[-1]} px but the decoder was built for {self.decoder.image_size}")
        face = batch["target_masks"].flatten(0, 1).to(x.dtype)
        masked, hidden, pix = self.corrupt(x, batch["seeds"], r)
        ident = tokens.repeat_interleave(r, 0)
        km = None if key_mask is None else key_mask.repeat_interleave(r, 0)
        pred = self.decoder(ident, masked, hidden, km).float()
        region = face * pix if self.loss_on == "masked" else face
        loss, per_image = masked_l1(pred, x.float(), region.float())
        return {"loss": loss, "per_sample": per_image.detach().view(b, r).mean(1)}

    @torch.no_grad()
    def reconstruct(self, batch: dict, max_targets: int = 8) -> list:
        """Rows [masked target, reconstruction, target, face mask] for the first identity, in [0, 1]."""
        one = first_identity(batch)
        targets = one["targets"][0, :max_targets]
        n = targets.shape[0]
        tokens, key_mask = self.identity(one["inputs"], one["input_mask"])
        x = targets * 2 - 1
        masked, hidden, _ = self.corrupt(x, one["seeds"], n)
        pred = self.decoder(tokens.repeat_interleave(n, 0), masked, hidden,
                            None if key_mask is None else key_mask.repeat_interleave(n, 0)).float()
        face = one["target_masks"][0, :n]
        return [[(masked[i] + 1) / 2, ((pred[i] + 1) / 2).clamp(0, 1), targets[i], face[i]] for i in range(n)]

