"""Infinite-ID's ID-semantics decoupling at sampling time (Wu et al., ECCV 2024), for SD1.5/SDXL and FLUX.

Two denoising streams of ONE model, run as rows of the same model calls and integrated by the same
sampler (no second model copy):

* identity stream: the identity adapter's image attention on, the prompt switched off exactly.
  SD1.5/SDXL: in every cross-attention the text term is dropped (not scaled: the rows get exact
  zeros before the image-attention term is added, ``to_out`` follows as for any output);
  SDXL/FLUX: the pooled text vector of these rows is zeroed (the "no text" condition of SDXL's own
  conditioning dropout); FLUX: image tokens of these rows do not attend to the text tokens in any
  block. Its uncond rows run without the identity either (``identity_stream_cfg``), so CFG guides
  this stream toward the identity.
* text stream: the prompt. It sees the identity only through
  - mixed attention, in the self-attention of chosen blocks, between start and end percent:
    ``Attn(Q_t, [AdaIN-m(K_id, K_t); K_t], [AdaIN-m(V_id, V_t); V_t])`` with the identity stream's
    keys/values of the same block, step and chunk; ``AdaIN-m(x, y) = x - mu(x) + mu(y)``, mu the
    per-channel mean over tokens (optional: photos off, stylised prompts on). A weight w scales the
    attention mass given to the identity keys (log w added to their logits; w = 1 is the paper).
    FLUX: the same for the image-token queries of the joint attention (keys/values after RoPE; the
    identity part is the identity stream's image tokens, the text part all of the text stream's tokens).
  - the cross-attention merge: ``text cross-attention output + w_merge * Attn(Q_t, K'_id, V'_id)``,
    the identity adapter's image attention (optionally with AdaIN-m of K'_id/V'_id toward the text
    keys/values; SD only). FLUX: the adapter's image-token attention added after each block.

How the batch is built (all public ComfyUI extension points):
* ``SAMPLER_SAMPLE`` wrapper: the latent batch N becomes 2N (text rows first, identity rows after,
  same noise and the same start latent), the sampler runs as usual, and the first N rows (or all 2N
  with ``output="text + identity streams"``) come back. Previews see the rows that come back.
* ``CALC_COND_BATCH`` wrapper: per step, inside the coupling window, one model call holds both
  streams (row layout ``(("text", N), ("identity", N))`` in every cond/uncond chunk, see
  guidance/rows.py). Outside the window the streams do not interact, so they run as two
  calls (text rows alone are then computed exactly as without this patch, whatever the kernels do
  with batch size), and after the window the identity stream, no longer needed, is not run at all
  (its rows are held still) unless its output was asked for.
* ``DIFFUSION_MODEL`` wrapper: zeroes the pooled text vector of identity rows (SDXL, FLUX).
* attention hooks through ``guidance/patching`` (UNet attn1/attn2, FLUX double/single blocks; FLUX
  attention through ``optimized_attention_override`` set for the block call only, chained).

Not released by the authors: weights and code. The identity stream is driven by this pack's identity
adapters (Omni-ID weights or the public IP-Adapter files of the CLIP baseline), which were trained
with text cross-attention on; Infinite-ID trained its image cross-attention with text off.
"""
from __future__ import annotations

import logging
import math
import re
import types
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from comfy.ldm.modules.attention import optimized_attention

from ..errors import InfiniteIDError
from ..omni_encoder import mixing
from . import ip_adapter
from .patching import (CallContext, Injector, WrappersMP, apply_injector, call_transformer_options,
                       chain_attention_override, current_layer, model_family, options_transformer_options,
                       unet_block_keys)
from .rows import row_mask, stream_layout, stream_pairs, stream_rows, with_layout
from .run_state import RUN_KEY, record, tracing

log = logging.getLogger(__name__)

TEXT, IDENT = "text", "identity"
ADAIN_MODES = ("off", "mixed attention", "mixed attention + merge")
OUTPUTS = ("text stream", "text + identity streams")
SDXL_ADM_EXTRA = 6 * 256   # SDXL's y = [pooled text, 6 size/crop embeddings of 256]

PAPER_DEFAULTS = {"base": "SDXL", "sampler": "DDIM", "steps": 30, "cfg": 5.0}


# ---------------------------------------------------------------------------------------------------
# The math


def adain_mean(x: torch.Tensor, y: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """AdaIN-mean: ``x - mean(x) + mean(y)``, means per channel over the token axis ``dim``.

    Only the means move; x keeps its own spread (full AdaIN, with std, hurt identity in the paper).
    x and y may have different token counts; the other axes must broadcast.
    """
    return x - x.mean(dim=dim, keepdim=True) + y.mean(dim=dim, keepdim=True)


def mixed_kv(k_t: torch.Tensor, v_t: torch.Tensor, k_id: torch.Tensor, v_id: torch.Tensor, adain: bool,
             dim: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values of mixed attention: ``[AdaIN-m(K_id, K_t); K_t]`` (identity part first), same for V."""
    if adain:
        k_id, v_id = adain_mean(k_id, k_t, dim), adain_mean(v_id, v_t, dim)
    return torch.cat([k_id, k_t], dim=dim), torch.cat([v_id, v_t], dim=dim)


def identity_bias(n_id: int, n_total: int, weight: float, like: torch.Tensor) -> Optional[torch.Tensor]:
    """Additive logits (1, 1, 1, n_total): log(weight) on the first n_id keys, 0 elsewhere; None for w = 1."""
    if weight == 1.0:
        return None
    if weight <= 0:
        raise InfiniteIDError(f"the mixed-attention weight must be > 0 here (0 skips mixed attention), got {weight}")
    bias = torch.zeros(1, 1, 1, n_total, dtype=like.dtype, device=like.device)
    bias[..., :n_id] = math.log(weight)
    return bias


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attend_sd(q, k, v, heads: int, transformer_options: dict, bias: Optional[torch.Tensor] = None):
    """Attention on (b, L, heads*d) tensors: ComfyUI's function, or SDPA when logits carry a bias."""
    if bias is None:
        return optimized_attention(q, k, v, heads, attn_precision=transformer_options.get("attn_precision"),
                                   transformer_options=transformer_options)
    return _merge_heads(F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads),
                                                       attn_mask=bias))


def combine_identities(a: torch.Tensor, b: Optional[torch.Tensor] = None, mode: str = "interpolate",
                       weight_b: float = 0.5) -> torch.Tensor:
    """The identity stream's tokens: one identity, two interpolated (weight_b = share of b), or stacked."""
    if b is None:
        return a
    b = b.to(a.device, a.dtype)
    if mode == "stack":
        return mixing.stack_identities([a, b])
    if mode != "interpolate":
        raise InfiniteIDError(f"identity mixing must be 'interpolate' or 'stack', got {mode!r}")
    return mixing.mix_identities([a, b], [1.0 - weight_b, weight_b])


# ---------------------------------------------------------------------------------------------------
# Which blocks get mixed attention


def all_block_keys(model) -> list:
    """Mixed-attention sites of a ModelPatcher: UNet (name, id, index) keys or FLUX (kind, i)."""
    dm = model.model.diffusion_model
    if model_family(model) == "flux":
        return [("double", i) for i in range(len(dm.double_blocks))] + \
               [("single", i) for i in range(len(dm.single_blocks))]
    return unet_block_keys(dm)


def parse_blocks(spec: str, keys: list) -> Optional[set]:
    """Block selection: "all" (None), "none" (empty), or comma/space separated items, each one of
    ``input|middle|output|double|single`` (a whole group), ``NAME_ID`` (``input_4``, ``double_3``),
    ``NAME_A-B`` (an id range) or a full UNet key ``NAME_ID_INDEX`` (``output_3_1``)."""
    spec = (spec or "all").strip().lower()
    if spec in ("", "all"):
        return None
    if spec == "none":
        return set()
    chosen = set()
    groups = sorted({k[0] for k in keys})
    for item in re.split(r"[,\s;]+", spec):
        if not item:
            continue
        m = re.fullmatch(r"([a-z]+)(?:_(\d+)(?:-(\d+))?)?(?:_(\d+))?", item)
        if not m or m.group(1) not in groups:
            raise InfiniteIDError(f"unknown block {item!r}: use 'all', 'none' or items like {', '.join(groups)}, "
                             f"{groups[0]}_1, {groups[0]}_0-3" + (", output_3_1" if "output" in groups else ""))
        name, lo, hi, index = m.group(1), m.group(2), m.group(3), m.group(4)
        if hi is not None and index is not None:
            raise InfiniteIDError(f"block {item!r}: a range cannot also name a transformer index")
        sel = [k for k in keys if k[0] == name
               and (lo is None or int(lo) <= k[1] <= int(hi if hi is not None else lo))
               and (index is None or (len(k) > 2 and k[2] == int(index)))]
        if not sel:
            raise InfiniteIDError(f"block {item!r} matches no attention block of this model "
                             f"({name} ids: {sorted({k[1] for k in keys if k[0] == name})})")
        chosen.update(sel)
    return chosen


# ---------------------------------------------------------------------------------------------------
# The injector (attention hooks)


class InfiniteIDInjector(Injector):
    """The attention part of Infinite-ID (see the module doc). Its own window is the coupling window
    (mixed attention and merge); the identity stream itself is the identity stream at every step."""
    name = "infinite_id"
    kinds = ("attn1", "attn2", "double", "single")

    def __init__(self, adapter, tokens: torch.Tensor, family: str, identity_weight: float = 1.0,
                 mix_weight: float = 1.0, merge_weight: float = 1.0, adain: str = "off",
                 mix_blocks: Optional[Iterable] = None, start_percent: float = 0.0, end_percent: float = 1.0,
                 apply_to: str = "cond", identity_stream_cfg: bool = True, keep_identity_stream: bool = False,
                 zero_pooled_text: bool = False):
        super().__init__()   # hooks run at every step on every row; the window below is for the coupling
        if tokens.ndim == 3 and tokens.shape[0] > 1:
            raise InfiniteIDError(f"this identity holds {tokens.shape[0]} identities; Infinite-ID takes one: mix two with "
                             "identity_2 (interpolate or stack) or 'Mix Identities (IDP)'")
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise InfiniteIDError(f"need 0 <= start_percent ({start_percent}) <= end_percent ({end_percent}) <= 1")
        if apply_to not in ("cond", "both"):
            raise InfiniteIDError(f"apply_to must be 'cond' or 'both', got {apply_to!r}")
        if adain not in ADAIN_MODES:
            raise InfiniteIDError(f"adain must be one of {ADAIN_MODES}, got {adain!r}")
        if mix_weight < 0:
            raise InfiniteIDError(f"the mixed-attention weight must be >= 0 (0 = off), got {mix_weight}")
        # the identity adapter: its keys/values of the identity tokens, cached once per site/device/dtype
        self.identity = ip_adapter.IdentityInjector(adapter, tokens, family, weight=1.0)
        self.family = family
        self.identity_weight, self.mix_weight, self.merge_weight = float(identity_weight), float(mix_weight), \
            float(merge_weight)
        self.adain_mix = adain != "off"
        self.adain_merge = adain == "mixed attention + merge"
        self.mix_blocks = None if mix_blocks is None else {tuple(b) for b in mix_blocks}
        self.mix_start, self.mix_end = start_percent, end_percent
        self.mix_apply_to = apply_to
        self.identity_stream_cfg = bool(identity_stream_cfg)
        self.keep_identity_stream = bool(keep_identity_stream)
        self.zero_pooled_text = bool(zero_pooled_text)   # SDXL/FLUX: identity rows get no pooled text
        self.mix_sigma_start, self.mix_sigma_end = math.inf, 0.0

    # the identity adapter is a model ComfyUI loads with the patched model
    def models(self) -> list:
        return self.identity.models()

    def to(self, device_or_dtype):
        self.identity.to(device_or_dtype)
        return self

    def new_run_state(self):
        return types.SimpleNamespace(text_rows=None)   # N, set when this run samples the two streams

    def sampler_wrappers(self) -> list:
        out = [(WrappersMP.SAMPLER_SAMPLE, _TwoStreamSampler(self)), (WrappersMP.CALC_COND_BATCH, _StreamCalls(self))]
        if self.zero_pooled_text:
            out.append((WrappersMP.DIFFUSION_MODEL, _TextFreeIdentityInputs(self.family)))
        return out

    @property
    def tokens(self) -> torch.Tensor:
        return self.identity.tokens

    def bind(self, model_sampling) -> None:
        super().bind(model_sampling)
        self.mix_sigma_start = float(model_sampling.percent_to_sigma(self.mix_start))
        self.mix_sigma_end = float(model_sampling.percent_to_sigma(self.mix_end))

    # -- when and where
    def in_window(self, sigma: float) -> bool:
        return self.mix_sigma_end <= sigma <= self.mix_sigma_start

    def phase(self, sigma: float) -> str:
        if sigma > self.mix_sigma_start:
            return "before"
        return "after" if sigma < self.mix_sigma_end else "in"

    @property
    def mixing_on(self) -> bool:
        return self.mix_weight != 0.0 and (self.mix_blocks is None or len(self.mix_blocks) > 0)

    def mixes_at(self, key) -> bool:
        return self.mixing_on and (self.mix_blocks is None or tuple(key) in self.mix_blocks)

    def stream_needed(self, sigmas: torch.Tensor) -> bool:
        """Does this sampling run need the identity stream at all?"""
        if self.keep_identity_stream:
            return True
        if not self.mixing_on or sigmas.numel() < 2:
            return False
        hi, lo = float(sigmas[:-1].max()), float(sigmas.min())
        return self.mix_sigma_end <= hi and self.mix_sigma_start >= lo

    # -- rows of one call
    def _rows(self, transformer_options: dict, batch: int, sigma: float, device):
        """(identity rows, identity rows carrying the identity, merge rows, (text, identity) mixing pairs)."""
        empty = torch.zeros(0, dtype=torch.long, device=device)
        coupled = self.in_window(sigma)
        if stream_layout(transformer_options) is None:   # no identity stream in this call: every row is a text row
            if not coupled or self.merge_weight == 0.0:
                return empty, empty, empty, None
            rm = row_mask(transformer_options, batch, self.mix_apply_to, device)
            merge = torch.arange(batch, device=device) if rm is None else rm.nonzero().flatten()
            return empty, empty, merge, None
        ident = stream_rows(transformer_options, batch, IDENT, "both", device)
        if ident is None:
            return empty, empty, empty, None
        carry = stream_rows(transformer_options, batch, IDENT, "cond" if self.identity_stream_cfg else "both", device)
        merge = empty
        if coupled and self.merge_weight != 0.0:
            merge = stream_rows(transformer_options, batch, TEXT, self.mix_apply_to, device)
        pairs = stream_pairs(transformer_options, batch, TEXT, IDENT, self.mix_apply_to, device) if coupled else None
        if pairs is not None and pairs[0].numel() == 0:
            pairs = None
        return ident, carry, merge, pairs

    # -- SD1.5 / SDXL
    def attn1(self, ctx: CallContext, out, **kwargs):
        if not self.mixes_at(ctx.key) or not self.in_window(ctx.sigma):
            return out
        pairs = stream_pairs(ctx.transformer_options, ctx.q.shape[0], TEXT, IDENT, self.mix_apply_to, ctx.q.device)
        if pairs is None or pairs[0].numel() == 0:
            return out
        t, i = pairs
        k, v = mixed_kv(ctx.k[t], ctx.v[t], ctx.k[i], ctx.v[i], self.adain_mix)
        n_id = ctx.k.shape[1]
        mixed = attend_sd(ctx.q[t], k, v, ctx.n_heads, ctx.transformer_options,
                          identity_bias(n_id, k.shape[1], self.mix_weight, k))
        if tracing():
            record("infinite_id.attn1", key=ctx.key, k=k, v=v, n_id=n_id, k_t=ctx.k[t], v_t=ctx.v[t], k_id=ctx.k[i],
                   v_id=ctx.v[i], text_rows=t, identity_rows=i, q_t=ctx.q[t], heads=ctx.n_heads, mixed=mixed)
        new = out.clone()
        new[t] = mixed if out is ctx.base else out[t] - ctx.base[t] + mixed
        return new

    def attn2(self, ctx: CallContext, out, **kwargs):
        B = ctx.q.shape[0]
        ident, carry, merge, _ = self._rows(ctx.transformer_options, B, ctx.sigma, ctx.q.device)
        if ident.numel() == 0 and merge.numel() == 0:
            return out
        new = out.clone()
        k_ip, v_ip = self.identity.sd_kv(ctx.key, ctx.q, ctx.run)   # (1, T, inner)
        if ident.numel():
            # the text term is removed, not scaled: exact zeros (plus what stacked patches added)
            new[ident] = 0.0 if out is ctx.base else out[ident] - ctx.base[ident]
            if carry.numel() and self.identity_weight != 0.0:
                n = carry.numel()
                ip = attend_sd(ctx.q[carry], k_ip.expand(n, -1, -1), v_ip.expand(n, -1, -1), ctx.n_heads,
                               ctx.transformer_options)
                new[carry] = new[carry] + self.identity_weight * ip
        if merge.numel():
            n = merge.numel()
            km, vm = k_ip.expand(n, -1, -1), v_ip.expand(n, -1, -1)
            if self.adain_merge:
                km, vm = adain_mean(km, ctx.k[merge]), adain_mean(vm, ctx.v[merge])
            if tracing():
                record("infinite_id.attn2", key=ctx.key, k=km, v=vm, merge_rows=merge, identity_rows=ident)
            ip = attend_sd(ctx.q[merge], km, vm, ctx.n_heads, ctx.transformer_options)
            new[merge] = out[merge] + self.merge_weight * ip
        return new

    # -- FLUX
    def double_block(self, ctx: CallContext, args, call, **kwargs):
        return self._flux_block(ctx, args, call, args["img"], 0)

    def single_block(self, ctx: CallContext, args, call, **kwargs):
        return self._flux_block(ctx, args, call, args["img"][:, ctx.txt_len:], ctx.txt_len)

    def _flux_block(self, ctx: CallContext, args, call, img_tokens, img_start: int):
        transformer_options = ctx.transformer_options
        B, dev = args["img"].shape[0], args["img"].device
        ident, carry, merge, pairs = self._rows(transformer_options, B, ctx.sigma, dev)
        if pairs is not None and not self.mixes_at(ctx.key):
            pairs = None
        if ident.numel() == 0 and merge.numel() == 0 and pairs is None:
            return call(args)
        block = ctx.module()
        # identity-adapter attention (image tokens only), queried before the block changes img in place
        add_rows, add_w = [], []
        if carry.numel() and self.identity_weight != 0.0:
            add_rows.append(carry)
            add_w.append(torch.full((carry.numel(),), self.identity_weight, device=dev))
        if merge.numel():
            add_rows.append(merge)
            add_w.append(torch.full((merge.numel(),), self.merge_weight, device=dev))
        ip = None
        if add_rows and self.identity.has_site(ctx.kind, ctx.key):   # XLabs' adapter: double blocks only
            rows, w = torch.cat(add_rows), torch.cat(add_w)
            vec = args["vec"][rows] if torch.is_tensor(args["vec"]) else args["vec"]
            q = (ip_adapter.flux_double_query(block, img_tokens[rows], vec) if ctx.kind == "double"
                 else ip_adapter.flux_single_query(block, img_tokens[rows], vec))
            k_ip, v_ip = self.identity.flux_kv(f"{ctx.kind}_{ctx.key[1]}", q, ctx.run)
            n, H, L, D = q.shape
            k = k_ip.view(1, -1, H, D).transpose(1, 2).expand(n, -1, -1, -1)
            v = v_ip.view(1, -1, H, D).transpose(1, 2).expand(n, -1, -1, -1)
            ip = _merge_heads(F.scaled_dot_product_attention(q, k, v)) * w.view(-1, 1, 1).to(q.dtype)
        call_args = args
        if ident.numel() or pairs is not None:
            txt_len = ctx.txt_len if ctx.kind == "single" else args["txt"].shape[1]
            fn = _FluxJointAttention(self, ctx.key, txt_len, ident, pairs)
            call_args = {**args, "transformer_options": chain_attention_override(transformer_options, fn)}
        res = call(call_args)
        if ip is None:
            return res
        img = res["img"].clone()
        img[rows, img_start:] = img[rows, img_start:] + ip.to(img.dtype)
        return {**res, "img": img}


def _mask4(mask: torch.Tensor, rows: torch.Tensor, q_sl: slice, k_sl: slice) -> torch.Tensor:
    """A ComfyUI attention mask (2-D/3-D/4-D, bool or additive) for some rows, queries and keys, additive."""
    m = mask
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 3:
        m = m[:, None]
    if m.shape[0] > 1:
        m = m[rows]
    m = m[..., q_sl, k_sl]
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))
    return m


class _FluxJointAttention:
    """Attention override for one FLUX block call (q/k/v: (B, heads, L, d) after RoPE, text tokens first).

    Identity rows: image-token queries attend to image tokens only (the prompt is switched off).
    Text rows paired with identity rows: image-token queries attend to
    [AdaIN-m(identity image K/V, text image K/V); all text-row K/V].
    """

    def __init__(self, inj: InfiniteIDInjector, key, txt_len: int, ident, pairs):
        self.inj, self.key, self.txt_len, self.ident, self.pairs = inj, key, txt_len, ident, pairs

    def __call__(self, attend, q, k, v, heads, *args, **kwargs):
        out = attend(q, k, v, heads, *args, **kwargs)
        T = self.txt_len
        if (q.ndim != 4 or not kwargs.get("skip_reshape") or kwargs.get("skip_output_reshape")
                or q.shape[2] <= T or out.ndim != 3):
            log.warning("Infinite-ID: unexpected FLUX attention call (shapes %s), left unchanged", tuple(q.shape))
            return out
        mask = kwargs.get("mask")
        img = slice(T, None)
        out = out.clone()
        if self.ident.numel():
            r = self.ident
            m = None if mask is None else _mask4(mask, r, img, img).to(q.dtype)
            o = F.scaled_dot_product_attention(q[r][:, :, img], k[r][:, :, img], v[r][:, :, img], attn_mask=m)
            out[r, img] = _merge_heads(o).to(out.dtype)
        if self.pairs is not None:
            t, i = self.pairs
            inj = self.inj
            k_t, v_t = k[t], v[t]
            k_id, v_id = k[i][:, :, img], v[i][:, :, img]
            if inj.adain_mix:   # toward the text stream's image tokens, per head channel
                k_id, v_id = adain_mean(k_id, k_t[:, :, img]), adain_mean(v_id, v_t[:, :, img])
            kk, vv = torch.cat([k_id, k_t], dim=2), torch.cat([v_id, v_t], dim=2)
            n_id = k_id.shape[2]
            if tracing():
                record("infinite_id.flux", key=self.key, k=kk, v=vv, n_id=n_id, k_t_img=k_t[:, :, img], text_rows=t,
                       identity_rows=i)
            bias = identity_bias(n_id, kk.shape[2], inj.mix_weight, q)
            if mask is not None:
                m = _mask4(mask, t, img, slice(None)).to(q.dtype)
                m = torch.cat([torch.zeros(*m.shape[:-1], n_id, dtype=m.dtype, device=m.device), m], dim=-1)
                bias = m if bias is None else m + bias
            o = F.scaled_dot_product_attention(q[t][:, :, img], kk, vv, attn_mask=bias)
            out[t, img] = _merge_heads(o).to(out.dtype)
        return out


# ---------------------------------------------------------------------------------------------------
# The two streams in the batch (wrappers)


class _TwoStreamSampler:
    """SAMPLER_SAMPLE: N latents -> 2N rows (text, identity), the same sampler, N (or 2N) rows back."""

    def __init__(self, inj: InfiniteIDInjector):
        self.inj = inj

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        if len(args) < 7:
            log.warning("Infinite-ID: unexpected sampler call (%d arguments); sampling without the identity stream",
                        len(args))
            return executor(*args, **kwargs)
        guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask = args[:7]
        run = options_transformer_options(extra_args.get("model_options")).get(RUN_KEY)
        if run is None or not self.inj.stream_needed(sigmas):
            return executor(*args, **kwargs)
        n = noise.shape[0]
        run.of(self.inj).text_rows = n
        keep = 2 * n if self.inj.keep_identity_stream else n
        two = lambda t: t if t is None or t.shape[0] != n else torch.cat([t, t])   # noqa: E731

        def cut(t):
            return t[:keep] if torch.is_tensor(t) and t.shape[0] == 2 * n else t

        def rows_back(step, x0, x, total, *a, **kw):   # previews see the rows that come back
            return callback(step, cut(x0), cut(x), total, *a, **kw)
        cb = None if callback is None else rows_back
        out = executor(guider, sigmas, extra_args, cb, two(noise), two(latent_image), two(denoise_mask),
                       *args[7:], **kwargs)
        return out[:keep]


class _StreamCalls:
    """CALC_COND_BATCH: one model call for both streams in the coupling window, separate calls outside."""

    def __init__(self, inj: InfiniteIDInjector):
        self.inj = inj

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        run = options_transformer_options(model_options).get(RUN_KEY)
        n = run.of(self.inj).text_rows if run is not None else None
        if n is None or x_in.shape[0] != 2 * n:
            return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
        ts = timestep if torch.is_tensor(timestep) and timestep.ndim and timestep.shape[0] == 2 * n else None
        phase = self.inj.phase(float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep))
        if phase == "in" and self.inj.mixing_on:
            record("infinite_id.call", kind="coupled")
            return executor(model, conds, x_in, timestep, with_layout(model_options, streams=((TEXT, n), (IDENT, n))),
                            *args, **kwargs)
        record("infinite_id.call", kind="text")
        out_t = executor(model, conds, x_in[:n], timestep if ts is None else ts[:n],
                         with_layout(model_options, streams=((TEXT, n),)), *args, **kwargs)
        if phase == "after" and not self.inj.keep_identity_stream:
            record("infinite_id.call", kind="identity_skipped")
            out_i = [x_in[n:]] * len(out_t)   # denoised = input: the unused stream is held still
        else:
            record("infinite_id.call", kind="identity")
            out_i = executor(model, conds, x_in[n:], timestep if ts is None else ts[n:],
                             with_layout(model_options, streams=((IDENT, n),)), *args, **kwargs)
        return [torch.cat([a, b.to(a.dtype)]) for a, b in zip(out_t, out_i)]


class _TextFreeIdentityInputs:
    """DIFFUSION_MODEL: the identity rows get a zero pooled text vector (SDXL: its text part; FLUX: all)."""

    def __init__(self, family: str):
        self.family = family

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        args = list(args)
        transformer_options = call_transformer_options(args, kwargs)
        in_kw = "y" in kwargs
        y = kwargs.get("y") if in_kw else (args[3] if len(args) > 3 else None)
        if torch.is_tensor(y) and stream_layout(transformer_options) is not None:
            rows = stream_rows(transformer_options, args[0].shape[0], IDENT, "both", y.device)
            width = y.shape[-1] if self.family == "flux" else y.shape[-1] - SDXL_ADM_EXTRA
            if rows is not None and rows.numel() and width > 0 and y.shape[0] == args[0].shape[0]:
                y = y.clone()
                y[rows, ..., :width] = 0.0
                if in_kw:
                    kwargs["y"] = y
                else:
                    args[3] = y
        return executor(*args, **kwargs)


def apply_infinite_id(model, adapter, tokens: torch.Tensor, identity_weight: float = 1.0, mix_weight: float = 1.0,
                      merge_weight: float = 1.0, adain: str = "off", blocks: str = "all", start_percent: float = 0.0,
                      end_percent: float = 1.0, apply_to: str = "cond", identity_stream_cfg: bool = True,
                      output: str = "text stream"):
    """A clone of ``model`` (ModelPatcher) that samples Infinite-ID's two streams (see the module doc)."""
    family = model_family(model)
    if family not in ("sd15", "sdxl", "flux", "unet"):
        raise InfiniteIDError(f"Infinite-ID patches SD1.5/SDXL UNets or FLUX; this MODEL is {type(model.model).__name__}")
    if any(isinstance(i, InfiniteIDInjector) for i in current_layer(model).injectors):
        raise InfiniteIDError("Infinite-ID is already applied to this model: apply it once (mix identities with the "
                         "identity_2 input)")
    if output not in OUTPUTS:
        raise InfiniteIDError(f"output must be one of {OUTPUTS}, got {output!r}")
    inj = InfiniteIDInjector(adapter, tokens, "flux" if family == "flux" else "unet",
                             identity_weight=identity_weight, mix_weight=mix_weight, merge_weight=merge_weight,
                             adain=adain, mix_blocks=parse_blocks(blocks, all_block_keys(model)),
                             start_percent=start_percent, end_percent=end_percent, apply_to=apply_to,
                             identity_stream_cfg=identity_stream_cfg, keep_identity_stream=output == OUTPUTS[1],
                             zero_pooled_text=family in ("sdxl", "flux"))
    return apply_injector(model, inj)


def injector_of(model) -> Optional[InfiniteIDInjector]:
    """The Infinite-ID injector on a patched model (None if there is none)."""
    return next((i for i in current_layer(model).injectors if isinstance(i, InfiniteIDInjector)), None)

