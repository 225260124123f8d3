"""The image-prompt projections of the public IP-Adapter files, each written from its original formulation.

An IP-Adapter turns what an image encoder gives (CLIP's projected image embedding, CLIP's penultimate hidden
states, an ArcFace embedding) into a few "image prompt" tokens c_ip of the UNet's (or FLUX's) context width;
the decoupled cross-attention then attends to to_k_ip(c_ip), to_v_ip(c_ip) (guidance/ip_adapter.py).
The modules below take the file's tensors under the file's own key names (``image_proj.`` removed), so a
file loads with ``load_state_dict(strict=True)``; they are built from ``operations`` (ComfyUI's cast layers
for loaded weights: each layer computes in its input's dtype, the weights are never cast in place).

Formulations (Ye et al. 2023, "IP-Adapter", and the released ``tencent-ailab/IP-Adapter`` code):

* **basic** (``ImageProjModel``; also XLabs' FLUX IP-Adapter): one CLIP image embedding e (E) →
  ``LayerNorm(reshape(Linear(e), (T, ctx)))``, T = 4 tokens.
* **full-face** (``MLPProjModel``): every CLIP token x → ``LayerNorm(Linear(GELU(Linear(x))))``: one c_ip
  token per CLIP token (kept as the Omni-ID CLIP baseline's ``image_proj`` in guidance/ip_adapter.py).
* **plus / plus-face** (``Resampler``, a Perceiver resampler): Q learned latents L (Q, d) read the CLIP
  tokens X (257, C): ``X' = proj_in(X)``; per layer ``L ← L + PerceiverAttn(X', L)``, ``L ← L + FF(L)``;
  out ``LayerNorm(proj_out(L))``. PerceiverAttn: ``LN1(X')``, ``LN2(L)``, q = to_q(L), (k, v) = to_kv([X'; L])
  (the latents also attend to themselves), softmax(q kᵀ / √d_head) (in float32) v, to_out; FF: LayerNorm,
  Linear(d → m·d), GELU, Linear(m·d → d), both without bias. d_head = 64 in every released file.
* **FaceID** (``MLPProjModel`` of ip_adapter_faceid): an ArcFace embedding a (512, L2-normalised) →
  ``LayerNorm(reshape(Linear(GELU(Linear(a))), (T, ctx)))``.
* **FaceID-Plus** (``ProjPlusModel``): the FaceID tokens x = the above are the latents of a Perceiver
  resampler (no learned latents) over the CLIP tokens of the aligned face: out = R(x, X); v1 returns out,
  v2 ("shortcut") returns ``x + s · out``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import comfy.ops

DIM_HEAD = 64   # the Perceiver head width of every released Resampler (SD1.5: 12 heads of 768, SDXL: 20 of 1280)


def _kw(dtype, device):
    return {"dtype": dtype, "device": device}


class BasicProjection(nn.Module):
    """IP-Adapter's ``ImageProjModel``: (B, E) image embeddings → (B, T, ctx) tokens."""
    inputs = ("clip_embeds",)

    def __init__(self, embed_dim: int, context_dim: int, num_tokens: int, operations=comfy.ops.manual_cast,
                 dtype=None, device=None):
        super().__init__()
        self.num_tokens, self.context_dim = num_tokens, context_dim
        self.proj = operations.Linear(embed_dim, num_tokens * context_dim, **_kw(dtype, device))
        self.norm = operations.LayerNorm(context_dim, **_kw(dtype, device))

    @property
    def input_dim(self) -> int:
        return self.proj.weight.shape[1]

    def forward(self, clip_embeds: torch.Tensor, **kwargs) -> torch.Tensor:
        x = self.proj(clip_embeds.reshape(clip_embeds.shape[0], -1))
        return self.norm(x.reshape(x.shape[0], self.num_tokens, self.context_dim))


class FaceIDProjection(nn.Module):
    """FaceID's MLP: (B, 512) ArcFace embeddings → (B, T, ctx) tokens."""
    inputs = ("arcface",)

    def __init__(self, id_dim: int, hidden: int, context_dim: int, num_tokens: int,
                 operations=comfy.ops.manual_cast, dtype=None, device=None):
        super().__init__()
        kw = _kw(dtype, device)
        self.num_tokens, self.context_dim = num_tokens, context_dim
        self.proj = nn.Sequential(operations.Linear(id_dim, hidden, **kw), nn.GELU(),
                                  operations.Linear(hidden, num_tokens * context_dim, **kw))
        self.norm = operations.LayerNorm(context_dim, **kw)

    @property
    def input_dim(self) -> int:
        return self.proj[0].weight.shape[1]

    def forward(self, arcface: torch.Tensor, **kwargs) -> torch.Tensor:
        x = self.proj(arcface.reshape(arcface.shape[0], -1))
        return self.norm(x.reshape(x.shape[0], self.num_tokens, self.context_dim))


class PerceiverAttention(nn.Module):
    """Latents attend to [image features; latents] (keys ``norm1, norm2, to_q, to_kv, to_out``)."""

    def __init__(self, dim: int, heads: int, operations, dtype=None, device=None):
        super().__init__()
        kw = _kw(dtype, device)
        inner = heads * DIM_HEAD
        self.heads = heads
        self.norm1 = operations.LayerNorm(dim, **kw)
        self.norm2 = operations.LayerNorm(dim, **kw)
        self.to_q = operations.Linear(dim, inner, bias=False, **kw)
        self.to_kv = operations.Linear(dim, 2 * inner, bias=False, **kw)
        self.to_out = operations.Linear(inner, dim, bias=False, **kw)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        heads = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)   # noqa: E731
        q = heads(self.to_q(latents))
        k, v = (heads(t) for t in self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1))
        logits = q @ k.transpose(-1, -2) * DIM_HEAD ** -0.5
        attn = logits.float().softmax(-1).to(q.dtype)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


def _feed_forward(dim: int, inner: int, operations, kw) -> nn.Sequential:
    # keys 0 (LayerNorm), 1 and 3 (Linear, no bias), as released
    return nn.Sequential(operations.LayerNorm(dim, **kw), operations.Linear(dim, inner, bias=False, **kw), nn.GELU(),
                         operations.Linear(inner, dim, bias=False, **kw))


class PerceiverResampler(nn.Module):
    """``proj_in``, ``layers.{i}.{0: attention, 1: feed-forward}``, ``proj_out``, ``norm_out``; latents given."""

    def __init__(self, embed_dim: int, dim: int, output_dim: int, depth: int, heads: int, ff_inner: int,
                 operations=comfy.ops.manual_cast, dtype=None, device=None):
        super().__init__()
        kw = _kw(dtype, device)
        self.proj_in = operations.Linear(embed_dim, dim, **kw)
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim, heads, operations, **kw),
                                                    _feed_forward(dim, ff_inner, operations, kw)])
                                     for _ in range(depth)])
        self.proj_out = operations.Linear(dim, output_dim, **kw)
        self.norm_out = operations.LayerNorm(output_dim, **kw)

    def resample(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class Resampler(PerceiverResampler):
    """IP-Adapter plus / plus-face: learned latents (1, Q, d) read (B, 257, C) CLIP tokens → (B, Q, ctx)."""
    inputs = ("clip_tokens",)

    def __init__(self, embed_dim: int, dim: int, output_dim: int, depth: int, heads: int, ff_inner: int,
                 num_queries: int, operations=comfy.ops.manual_cast, dtype=None, device=None):
        super().__init__(embed_dim, dim, output_dim, depth, heads, ff_inner, operations, dtype, device)
        self.latents = nn.Parameter(torch.empty(1, num_queries, dim, **_kw(dtype, device)), requires_grad=False)

    @property
    def input_dim(self) -> int:
        return self.proj_in.weight.shape[1]

    def forward(self, clip_tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        latents = self.latents.to(device=clip_tokens.device, dtype=clip_tokens.dtype)   # a plain parameter
        return self.resample(latents.expand(clip_tokens.shape[0], -1, -1), clip_tokens)


class FaceIDPlusProjection(nn.Module):
    """FaceID-Plus: FaceID tokens of the ArcFace embedding resample the face crop's CLIP tokens (v2: + shortcut)."""
    inputs = ("arcface", "clip_tokens")

    def __init__(self, faceid: FaceIDProjection, resampler: PerceiverResampler):
        super().__init__()
        self.proj, self.norm = faceid.proj, faceid.norm   # the file's keys: proj.{0,2}, norm, perceiver_resampler.*
        self.num_tokens, self.context_dim = faceid.num_tokens, faceid.context_dim
        self.perceiver_resampler = resampler

    @property
    def input_dim(self) -> int:
        return self.perceiver_resampler.proj_in.weight.shape[1]

    def forward(self, arcface: torch.Tensor, clip_tokens: torch.Tensor, shortcut: bool = True, scale: float = 1.0,
                **kwargs) -> torch.Tensor:
        x = self.proj(arcface.reshape(arcface.shape[0], -1))
        x = self.norm(x.reshape(x.shape[0], self.num_tokens, self.context_dim))
        out = self.perceiver_resampler.resample(x, clip_tokens)
        return x + scale * out if shortcut else out


# ---------------------------------------------------------------------------------------------------
# Building a projection from the file's tensors (shapes read off the tensors)


def _depth(sd: dict, prefix: str) -> int:
    n = 0
    while f"{prefix}layers.{n}.0.to_q.weight" in sd:
        n += 1
    return n


def _resampler_args(sd: dict, prefix: str = "") -> dict:
    inner = sd[f"{prefix}layers.0.0.to_q.weight"].shape[0]
    return {"embed_dim": sd[f"{prefix}proj_in.weight"].shape[1], "dim": sd[f"{prefix}proj_in.weight"].shape[0],
            "output_dim": sd[f"{prefix}proj_out.weight"].shape[0], "depth": _depth(sd, prefix),
            "heads": inner // DIM_HEAD, "ff_inner": sd[f"{prefix}layers.0.1.1.weight"].shape[0]}


def build_projection(kind: str, sd: dict, operations=comfy.ops.manual_cast, dtype=None, device=None) -> nn.Module:
    """The projection of a public IP-Adapter ``kind`` with the file's ``image_proj`` tensors loaded (strict)."""
    kw = {"operations": operations, "dtype": dtype, "device": device}
    if kind in ("basic", "xlabs"):
        ctx = sd["norm.weight"].shape[0]
        m = BasicProjection(sd["proj.weight"].shape[1], ctx, sd["proj.weight"].shape[0] // ctx, **kw)
    elif kind == "faceid":
        ctx = sd["norm.weight"].shape[0]
        m = FaceIDProjection(sd["proj.0.weight"].shape[1], sd["proj.0.weight"].shape[0], ctx,
                             sd["proj.2.weight"].shape[0] // ctx, **kw)
    elif kind == "plus":
        m = Resampler(**_resampler_args(sd), num_queries=sd["latents"].shape[1], **kw)
    elif kind == "faceid-plus":
        ctx = sd["norm.weight"].shape[0]
        faceid = FaceIDProjection(sd["proj.0.weight"].shape[1], sd["proj.0.weight"].shape[0], ctx,
                                  sd["proj.2.weight"].shape[0] // ctx, **kw)
        m = FaceIDPlusProjection(faceid, PerceiverResampler(**_resampler_args(sd, "perceiver_resampler."), **kw))
    else:
        raise KeyError(kind)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def projection_output_dim(m: nn.Module) -> int:
    if isinstance(m, (BasicProjection, FaceIDProjection, FaceIDPlusProjection)):
        return m.context_dim
    return m.norm_out.weight.shape[0]


__all__ = ["BasicProjection", "FaceIDProjection", "FaceIDPlusProjection", "PerceiverAttention", "PerceiverResampler",
           "Resampler", "build_projection", "projection_output_dim", "DIM_HEAD"]
