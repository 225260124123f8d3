"""What RB-Guidance's own passes capture: the DIFT features at the feature point (the forward stops there) and
the attention that gives M_gen (Eq. 6), through an injector that is inert in every other model call.

A pass of ours carries a ``_Capture`` in its transformer options (``CAPTURE_KEY``). ``RBInjector`` records
attention maps and FLUX features only then; ``_StopAtOutputBlock`` ends a UNet forward at the feature point and
``_CaptureWrapper`` (DIFFUSION_MODEL) swaps in the gradient leaf and runs the forward inside ``GradPass``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ...errors import FeaturePointError, RBGuidanceError
from ..differentiable import GradPass
from ..ip_adapter import IdentityInjector, flux_double_query
from ..patching import LAYER_KEY, Injector, call_transformer_options, chain_attention_override
from .feature_points import FeaturePoint

CAPTURE_KEY = "idportrait_rb_capture"   # transformer_options key, present only in our own passes
CAPTURE_WRAPPER_KEY = "idportrait_rb"


class _FeatureReady(Exception):
    """Raised at the feature point to end a forward early (caught by the guider, never escapes it)."""


@dataclass
class _AttnRecord:
    grid: tuple[int, int]
    sources: list                    # per identity: ("token", index) | ("adapter", k) | None (user mask)
    cross: list = field(default_factory=list)   # per identity: list of (B, N) maps, one per layer
    qk: list = field(default_factory=list)      # (q, k) (B, heads, N, d) of self-attention layers

    def __post_init__(self):
        self.cross = [[] for _ in self.sources]


@dataclass
class _Capture:
    point: FeaturePoint
    batch: int                       # rows of the first chunk = the latent batch
    z: Optional[torch.Tensor] = None  # grad leaf replacing the latent channels of the first chunk
    record: Optional[_AttnRecord] = None
    features: Optional[torch.Tensor] = None
    grad_pass: Optional["GradPass"] = None

    def __deepcopy__(self, memo):
        return self   # model_options are deep-copied on 0.3.75; the capture must stay one object


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    b, l, inner = t.shape
    return t.reshape(b, l, n, inner // n).transpose(1, 2)


def _batch_rows(t: torch.Tensor, b: int) -> torch.Tensor:
    """Identity tokens (N_id, T, C) to ``b`` rows (N_id == 1 broadcasts; else repeated like the model batch)."""
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    return t.repeat(math.ceil(b / t.shape[0]), 1, 1)[:b]


def _identity_adapters(transformer_options: dict) -> list:
    layer = transformer_options.get(LAYER_KEY)
    return [inj for inj in (layer.injectors if layer is not None else ()) if isinstance(inj, IdentityInjector)]


class RBInjector(Injector):
    """Records attention and captures FLUX features, only inside the guider's own passes.

    Without the capture key in the transformer options (every ordinary model call) each hook returns its
    input untouched; the guider applies it only to the clone it uses for its own passes anyway.
    """
    name = "rb_guidance"
    kinds = ("attn1", "attn2", "double", "single")

    def __deepcopy__(self, memo):
        return self

    # -- UNet
    def attn1(self, ctx, out, **kw):
        cap = ctx.transformer_options.get(CAPTURE_KEY)
        if cap is not None and cap.record is not None and tuple(ctx.grid()) == cap.record.grid:
            b = cap.batch
            cap.record.qk.append((_heads(ctx.q[:b].detach(), ctx.n_heads), _heads(ctx.k[:b].detach(), ctx.n_heads)))
        return out

    def attn2(self, ctx, out, **kw):
        cap = ctx.transformer_options.get(CAPTURE_KEY)
        if cap is None or cap.record is None or tuple(ctx.grid()) != cap.record.grid:
            return out
        b, n = cap.batch, ctx.n_heads
        with torch.no_grad():
            # float32 logits: fp16 q·kᵀ can overflow, bf16 rounds before the beta threshold
            q = _heads(ctx.q[:b].detach(), n).float()
            logits = q @ _heads(ctx.k[:b].detach(), n).float().transpose(-1, -2) * q.shape[-1] ** -0.5

            def ip_logits(inj):
                k_ip, _ = inj.sd_kv(ctx.key, ctx.q, ctx.run)
                return q @ _heads(_batch_rows(k_ip.detach(), b), n).float().transpose(-1, -2) * q.shape[-1] ** -0.5
            _record_cross(cap.record, logits, ip_logits, ctx, _identity_adapters(ctx.transformer_options))
        return out

    # -- FLUX
    def double_block(self, ctx, args, call, **kw):
        return self._dit(ctx, args, call)

    def single_block(self, ctx, args, call, **kw):
        return self._dit(ctx, args, call)

    def _dit(self, ctx, args, call):
        transformer_options = args.get("transformer_options") or {}
        cap = transformer_options.get(CAPTURE_KEY)
        if cap is None:
            return call(args)
        kind, idx = ctx.kind, ctx.key[1]
        point_kind, point_idx = cap.point.block
        if cap.record is not None and kind == "double" and (point_kind == "single" or idx <= point_idx):
            rec_args = args

            def record_attention(attend, q, k, *a, **kwa):
                # joint attention of this block: q, k are (B, heads, txt+img, d) after RoPE, text first
                _record_flux(cap, ctx, rec_args, q, k)
                return attend(q, k, *a, **kwa)
            args = {**args, "transformer_options": chain_attention_override(transformer_options, record_attention)}
        res = call(args)
        if (kind, idx) == (point_kind, point_idx):
            img = res["img"] if kind == "double" else res["img"][:, ctx.txt_len:]
            h, w = ctx.grid()
            cap.features = img[:cap.batch].transpose(1, 2).reshape(cap.batch, img.shape[-1], h, w)
            raise _FeatureReady()
        return res


def _record_cross(record: _AttnRecord, logits_txt, ip_logits_fn, ctx, adapters) -> None:
    """Per identity, the (B, N) cross-attention map of its token(s) from one layer's logits."""
    probs = None
    for i, src in enumerate(record.sources):
        if src is None:
            continue
        if src[0] == "token":
            t = logits_txt.shape[-1]
            if not -t <= src[1] < t:
                raise RBGuidanceError(f"identity {i + 1}: token index {src[1]} is outside the prompt's {t} tokens")
            if probs is None:
                probs = logits_txt.float().softmax(-1)
            record.cross[i].append(probs[..., src[1]].mean(1))
        else:
            inj = adapters[src[1]] if src[1] < len(adapters) else None
            if inj is None or not inj.active(ctx.sigma) or not inj.wants(ctx.kind, ctx.key):
                continue
            # The adapter attends in its own softmax (weights sum to 1 over its tokens for every pixel);
            # the map of "where the identity is read" is its share in one softmax over text + identity.
            joint = torch.cat([logits_txt.float(), ip_logits_fn(inj).float()], -1).softmax(-1)
            record.cross[i].append(joint[..., logits_txt.shape[-1]:].sum(-1).mean(1))


def _record_flux(cap: _Capture, ctx, args, q, k) -> None:
    b, t = cap.batch, ctx.txt_len
    with torch.no_grad():
        q_img, k_img = q[:b, :, t:].detach(), k[:b, :, t:].detach()
        cap.record.qk.append((q_img, k_img))
        scale = q.shape[-1] ** -0.5
        logits = q_img.float() @ k[:b, :, :t].detach().float().transpose(-1, -2) * scale   # float32, as above
        heads = q.shape[1]

        def ip_logits(inj):
            block = ctx.module()
            q_pre = flux_double_query(block, args["img"][:b].detach(), args["vec"][:b].detach())
            k_ip, _ = inj.flux_kv(f"double_{ctx.key[1]}", q_pre, ctx.run)
            k_ip = _batch_rows(k_ip.detach(), b)
            k_ip = k_ip.view(b, k_ip.shape[1], heads, -1).transpose(1, 2)
            return q_pre.float() @ k_ip.float().transpose(-1, -2) * scale
        _record_cross(cap.record, logits, ip_logits, ctx, _identity_adapters(ctx.transformer_options))


class _StopAtOutputBlock:
    """UNet ``output_block_patch``: at ("output", j), keep h (the feature) and end the forward."""

    def __init__(self, index: int):
        self.index = index

    def __deepcopy__(self, memo):
        return self

    def __call__(self, h, hsp, transformer_options):
        cap = transformer_options.get(CAPTURE_KEY)
        if cap is not None and tuple(transformer_options.get("block", ())) == ("output", self.index):
            cap.features = h[:cap.batch]
            raise _FeatureReady()
        return h, hsp


class _CaptureWrapper:
    """DIFFUSION_MODEL wrapper of our passes: swaps in the grad leaf and aliases inference tensors."""

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        cap = call_transformer_options(args, kwargs).get(CAPTURE_KEY)
        if cap is None:
            return executor(*args, **kwargs)
        if cap.z is None:            # reference pass: plain forward, stopped at the feature point
            executor(*args, **kwargs)
        else:
            # grad is on only from here: what ran before the diffusion model (ControlNet, other packs'
            # pre-passes) saw a detached input, so its residuals are constants w.r.t. z_t
            with torch.enable_grad(), GradPass() as gp:
                cap.grad_pass = gp
                executor(self._with_leaf(args[0], cap.z), *args[1:], **kwargs)
        raise FeaturePointError(f"the forward finished without reaching the feature point {cap.point.name!r}")

    @staticmethod
    def _with_leaf(x, z):
        b, c = z.shape[:2]
        if tuple(x.shape[-2:]) != tuple(z.shape[-2:]) or x.shape[0] < b:
            raise RBGuidanceError("RB-Guidance needs positive conditioning that covers the whole image "
                                  "(area-restricted conditioning is not supported)")
        # the latent channels of the first chunk become the leaf; c_concat channels and any other chunk
        # stay as ComfyUI built them
        first = z.to(x.dtype) if x.shape[1] == c else torch.cat([z.to(x.dtype), x[:b, c:]], dim=1)
        return first if x.shape[0] == b else torch.cat([first, x[b:]], dim=0)
