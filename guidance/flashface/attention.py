"""FlashFace reference attention as injectors of the patching layer: the released model, and the training-free
extension.

Released layout (``ali-vilab/FlashFace``, ``all_finetune``; the released code wins over the paper):

* Reference pass, once per sampler step (cached per run by sigma, shared by every cond/uncond/reference row
  and every split batch): the reference UNet (its encoder and decoder, with the MAIN model's middle
  block) runs on the clean reference latents (VAE mean, no noise) at the current timestep with the
  negative-prompt context. The input of self-attention (``norm1(x)``) of ``middle_block.1`` and
  ``output_blocks.3-11`` is recorded.
* Main pass, in those blocks, after the stock self-attention (separate weights ``flashface_ref_attn``)::

      x += λ·RA(y, [y; refs]) + (1−λ)·RA(y, y)          y = norm1(x); λ may exceed 1

  λ = 0 still adds RA(y, y). Identity mixing (supplement Eq. 1) replaces the first term by
  λ·Σ_i w_i·RA(y, [y; refs_i]) with Σ w_i = 1.

Training-free extension (NOT FlashFace's trained model; works on any SD1.5, SDXL or FLUX model): the
model itself is the reference net. The reference pass runs the model on the references; the main
pass blends its own self-attention ``(1−λ)·SA(y, y) + λ·SA(y, [y; refs])`` (UNet: the block's own
q/k/v/out; FLUX: reference image keys/values, after QK-norm and RoPE, appended to the joint attention
of the chosen blocks, for the image queries only).
"""
from __future__ import annotations

import logging
import types
from typing import Iterable, Optional

import torch

import comfy.model_management as mm
from comfy.ldm.modules.attention import optimized_attention

from ...errors import FlashFaceError, FlashFaceMemoryError
from .. import flashface_keys
from ..patching import (MODEL_KEY, Injector, WrappersMP, chain_attention_override, transformer_block,
                        unet_block_keys)
from ..rows import COND, UNCOND, layout_of
from ..run_state import record, run_state_of
from .guidance import Guidance, ReferenceRowBatch, timestep_1000
from .guidance import pre_cfg as guidance_pre_cfg
from .references import FlashFaceReferences

log = logging.getLogger(__name__)

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
TF_BLOCKS = ("decoder", "all")


class _UnetRecorder:
    """attn1_patch for the reference pass: keeps ``norm1(x)`` of the wanted blocks."""

    def __init__(self, wanted: set):
        self.wanted, self.out = wanted, {}

    def __call__(self, n, context, value, extra_options, **kwargs):
        block = extra_options.get("block")
        if block is not None:
            key = (block[0], block[1], extra_options.get("block_index", 0))
            if key in self.wanted:
                self.out[key] = n
        return n, context, value


def _image_slice(kind: str, block, total: int, txt_len: int) -> slice:
    """Where the image tokens sit in a FLUX block's joint q/k/v (text first, unless the block flips)."""
    if kind == "double" and getattr(block, "flipped_img_txt", False):
        return slice(0, total - txt_len)
    return slice(txt_len, total)


def _pad_mask(mask, extra: int):
    """An attention mask for keys extended by ``extra`` reference tokens (which every query may see)."""
    if mask is None:
        return None
    pad = torch.zeros(*mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device)
    if mask.dtype == torch.bool:
        pad = pad.logical_not()
    return torch.cat([mask, pad], dim=-1)


class ReferenceAttention(Injector):
    """Shared machinery: λ per row, the once-per-step reference pass, the run's negative context.

    Per-run state (``new_run_state``): the step whose reference features are held, the run's negative prompt,
    the reference row of this step (MODEL path), the reference batch size that fits in memory, a sigma →
    timestep cache. Trace events: ``flashface.reference_pass`` (faces, sigma) for every reference pass.
    """
    name = "flashface"

    def __init__(self, references: FlashFaceReferences, guidance: Guidance, latent_format,
                 blocks: Optional[Iterable] = None, max_ref_batch: Optional[int] = None):
        super().__init__(blocks=blocks)
        self.references, self.guidance, self.latent_format = references, guidance, latent_format
        self.max_ref_batch = max_ref_batch   # a cap from the caller; the run may learn a smaller one (memory)
        self._ms = None

    def bind(self, model_sampling) -> None:
        super().bind(model_sampling)
        self._ms = model_sampling

    def new_run_state(self):
        return types.SimpleNamespace(step=None, conds=None, ref_out=None, max_ref_batch=self.max_ref_batch,
                                     t_of_sigma={})

    def begin_run(self, state, guider) -> None:
        state.of(self).conds = _reference_conds(getattr(guider, "conds", None) or {})

    # -- sampler side: the MODEL path's reference row and pre-CFG step (guidance.py)
    def sampler_wrappers(self) -> list:
        return [(WrappersMP.CALC_COND_BATCH, ReferenceRowBatch(self))]

    def pre_cfg(self, args):
        return guidance_pre_cfg(self, args)

    # -- schedule
    def timestep(self, state, sigma: float) -> float:
        t = state.t_of_sigma.get(sigma)
        if t is None:
            t = state.t_of_sigma[sigma] = timestep_1000(self._ms, sigma)
        return t

    def three_way(self, state, sigma: float) -> bool:
        return self.timestep(state, sigma) <= self.guidance.launch

    def needs_ref_branch(self, state, sigma: float) -> bool:
        # λ_feat = 0 makes the reference row equal the plain cond row, so c·(y_ref − y) vanishes
        g = self.guidance
        return self.three_way(state, sigma) and g.lambda_ref != 0.0 and g.lambda_feat != 0.0

    def chunk_lambdas(self, state, cond_or_uncond: list, sigma: float, transformer_options: dict) -> list:
        g = self.guidance
        if not self.three_way(state, sigma):
            return [g.lambda_before for _ in cond_or_uncond]
        if g.lambda_ref == 0.0:
            # the released denoise with classifier = 0 takes its two-way branch with λ_feat in both rows:
            # the references stay on in cond and uncond (not λ = 0)
            return [g.lambda_feat for _ in cond_or_uncond]
        layout = layout_of(transformer_options)
        return [g.lambda_feat if layout.branch(c) == "ref" else 0.0 for c in cond_or_uncond]

    def row_lambdas(self, ctx) -> list:
        cou = ctx.cond_or_uncond or [COND]
        batch = ctx.x.shape[0] if ctx.x is not None else ctx.q.shape[0] if ctx.q is not None else ctx.batch
        lam = self.chunk_lambdas(self.state(ctx), cou, ctx.sigma, ctx.transformer_options)
        per = batch // len(lam)
        return [v for v in lam for _ in range(per)]

    # -- the reference pass, once per step
    def on_model_call(self, transformer_options: dict, x, timestep, call_args=(), call_kwargs=None,
                      **kwargs) -> None:
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return
        state = run_state_of(transformer_options).of(self)
        sigma = float(sigmas.flatten()[0])
        lam = self.chunk_lambdas(state, transformer_options.get("cond_or_uncond") or [COND], sigma, transformer_options)
        if all(v == 0.0 for v in lam):
            return
        if state.step is not None and state.step["sigma"] == sigma and state.step["device"] == x.device:
            return
        conds = state.conds or _conds_from_call(call_args, call_kwargs or {}, transformer_options)
        t = timestep.flatten()[:1]
        feats = self._reference_pass(state, transformer_options, t, conds, x.dtype)
        state.step = {"sigma": sigma, "device": x.device, "features": feats, "kv": {}}

    def features(self, ctx) -> list:
        """Per active reference set: the recorded reference tensors of this block at this step."""
        step = self.state(ctx).step
        if step is None or ctx.key not in step["features"]:
            raise RuntimeError(f"FlashFace: no reference features for block {ctx.key} at this step")
        return step["features"][ctx.key]

    def cached(self, ctx, name, make):
        kv = self.state(ctx).step["kv"]
        if name not in kv:
            kv[name] = make()
        return kv[name]

    def _reference_pass(self, state, transformer_options, t, conds, dtype) -> dict:
        sets = self.references.active_sets()
        latents = [s.latents for s in sets]
        shapes = {tuple(lt.shape[1:]) for lt in latents}
        groups = [latents] if len(shapes) == 1 else [[lt] for lt in latents]
        per_set: dict = {}
        faces = 0
        for group in groups:
            batch = torch.cat(group)
            counts = [g.shape[0] for g in group]
            # Faces repeated to pad a set (the released code always uses 4) or shared between sets are
            # encoded once: the reference pass is per face, so its features are simply repeated.
            unique, inverse = _unique_faces(batch)
            feats = self._chunked(state, unique, t, conds, transformer_options, dtype)
            faces += unique.shape[0]
            for key, val in feats.items():
                per_set.setdefault(key, []).extend(_split_refs(_take_refs(val, inverse), counts))
        record("flashface.reference_pass", injector=self, faces=faces, sigma=float(t.flatten()[0]),
               batch_size=state.max_ref_batch)
        return per_set

    def _chunked(self, state, latents, t, conds, transformer_options, dtype) -> dict:
        n = latents.shape[0]
        size = min(state.max_ref_batch or n, n)
        while True:
            try:
                parts = [self._run_reference_model(latents[i:i + size], t, conds, transformer_options, dtype)
                         for i in range(0, n, size)]
                break
            except OOM as e:
                if size == 1:
                    raise FlashFaceMemoryError(
                        "out of memory in the FlashFace reference pass even with one reference face at a time: use "
                        "fewer or smaller references (the 'size' input of the encode node), a smaller weight dtype, "
                        "or free GPU memory") from e
                size = max(1, size // 2)
                log.warning("FlashFace: out of memory with %d references per batch; retrying with %d", size * 2, size)
                mm.soft_empty_cache()
        if size < n and state.max_ref_batch != size:
            state.max_ref_batch = size   # remember the working size for the rest of this run
        if len(parts) == 1:
            return parts[0]
        return {k: _cat_refs([p[k] for p in parts]) for k in parts[0]}

    def _run_reference_model(self, latents, t, conds, transformer_options, dtype) -> dict:
        """Reference features {block key: tensor (N, L, C) or FLUX (k, v)} for N reference latents."""
        raise NotImplementedError


def _unique_faces(batch: torch.Tensor):
    """(N, C, h, w) latents → (distinct latents in first-seen order, index of each input among them);
    the index is None when every face is distinct."""
    flat = batch.flatten(1)
    first, inverse = [], []
    for i in range(batch.shape[0]):
        j = next((u for u, f in enumerate(first) if torch.equal(flat[f], flat[i])), None)
        if j is None:
            j = len(first)
            first.append(i)
        inverse.append(j)
    if len(first) == batch.shape[0]:
        return batch, None
    return batch[first], torch.tensor(inverse)


def _take_refs(val, inverse):
    if inverse is None:
        return val
    if isinstance(val, tuple):   # FLUX (k, v)
        return val[0][inverse.to(val[0].device)], val[1][inverse.to(val[1].device)]
    return val[inverse.to(val.device)]


def _split_refs(val, counts):
    if isinstance(val, tuple):   # FLUX (k, v)
        ks, vs = val[0].split(counts), val[1].split(counts)
        return list(zip(ks, vs))
    return list(val.split(counts))


def _cat_refs(vals):
    if isinstance(vals[0], tuple):
        return torch.cat([v[0] for v in vals]), torch.cat([v[1] for v in vals])
    return torch.cat(vals)


def _reference_conds(conds: dict) -> Optional[dict]:
    """Tensors of the negative conditioning (the positive if the run has none) for the reference pass."""
    for name in ("negative", "positive"):
        for c in conds.get(name) or []:
            mc = c.get("model_conds", {})
            if "c_crossattn" in mc:
                return {k: getattr(v, "cond", None)[:1] for k, v in mc.items()
                        if k in ("c_crossattn", "y", "guidance") and torch.is_tensor(getattr(v, "cond", None))}
    return None


def _conds_from_call(call_args, call_kwargs: dict, transformer_options: dict) -> dict:
    """Fallback outside a sampler run: the uncond row of this call (else its first row).

    The diffusion models are called as UNet ``(x, timesteps, context, y, control, ...)`` and FLUX
    ``(x, timestep, context, y, guidance, ...)``, positionally or by keyword.
    """
    flux_positional = len(call_args) > 7   # FLUX passes (x, t, context, y, guidance, ref_latents, control, to)
    names = ("x", "timestep", "context", "y", "guidance" if flux_positional else "")
    given = {**{n: a for n, a in zip(names, call_args) if n}, **call_kwargs}
    cou = transformer_options.get("cond_or_uncond") or [COND]
    ctx = given.get("context")
    if not torch.is_tensor(ctx):
        raise FlashFaceError("FlashFace: the model call carries no text context for the reference pass")
    per = ctx.shape[0] // len(cou)
    row = cou.index(UNCOND) * per if UNCOND in cou else 0
    out = {"c_crossattn": ctx[row:row + 1]}
    for k in ("y", "guidance"):
        v = given.get(k)
        if torch.is_tensor(v):
            out[k] = v[row:row + 1]
    return out


def _model_inputs(conds: dict, n: int, device, dtype) -> dict:
    if conds is None:
        raise FlashFaceError("FlashFace: no conditioning found for the reference pass")
    out = {}
    for k, v in conds.items():
        v = v.to(device)
        out[k] = v.repeat(n, *([1] * (v.ndim - 1))).to(dtype) if v.is_floating_point() else v.repeat(n)
    return out


class FlashFaceInjector(ReferenceAttention):
    """The released model: reference UNet pass + separate reference attention in 10 decoder blocks."""
    name = "flashface"
    kinds = ("attn1_output",)

    def __init__(self, references, guidance, latent_format, ref_patcher, face_mask=None, **kw):
        """``ref_patcher``: the reference UNet (an additional model of the FlashFace MODEL, loaded with it);
        ``face_mask``: the APPLY_MODEL wrapper that gives the main UNet its face-position channel."""
        blocks = [(name, i, 0) for name, i in flashface_keys.REF_ATTENTION_BLOCKS]
        super().__init__(references, guidance, latent_format, blocks=blocks, **kw)
        self.ref_patcher, self.face_mask = ref_patcher, face_mask

    def sampler_wrappers(self) -> list:
        extra = [(WrappersMP.APPLY_MODEL, self.face_mask)] if self.face_mask is not None else []
        return super().sampler_wrappers() + extra

    def _run_reference_model(self, latents, t, conds, transformer_options, dtype):
        unet = self.ref_patcher.model.diffusion_model
        device = t.device
        x = self.latent_format.process_in(latents.to(device)).to(dtype)   # clean latents: no noise, no c_in
        n = x.shape[0]
        rec = _UnetRecorder(set(self.blocks))
        reference_options = {"patches": {"attn1_patch": [rec]}, "cond_or_uncond": [UNCOND],
              "sigmas": transformer_options.get("sigmas")}
        inputs = _model_inputs(conds, n, device, dtype)
        with torch.no_grad():
            unet(x, t.expand(n).to(device), context=inputs["c_crossattn"], transformer_options=reference_options)
        missing = set(self.blocks) - set(rec.out)
        if missing:
            raise FlashFaceError(f"the reference UNet has no self-attention at {sorted(missing)}: "
                                 "not a FlashFace layout")
        return rec.out

    def attn1_output(self, ctx, out, **kwargs):
        y = ctx.x
        if y is None:
            raise RuntimeError("FlashFace: the attention input was not recorded (patching layer)")
        module = transformer_block(ctx.diffusion_model, ctx.key).flashface_ref_attn
        lam = self.row_lambdas(ctx)
        transformer_options = ctx.transformer_options
        q, k, v = module.to_q(y), module.to_k(y), module.to_v(y)
        attn = lambda q_, k_, v_: optimized_attention(q_, k_, v_, module.heads,  # noqa: E731
                                                      attn_precision=module.attn_precision,
                                                      transformer_options=transformer_options)
        pre = attn(q, k, v)                                      # RA(y, y), for every row
        rows = [i for i, val in enumerate(lam) if val != 0.0]
        if rows:
            idx = torch.tensor(rows, device=y.device)
            acc = None
            for s_i, (s, feats) in enumerate(zip(self.references.active_sets(), self.features(ctx))):
                kr, vr = self.cached(ctx, (ctx.key, s_i), lambda f=feats: _flat_kv(module, f))
                r = len(rows)
                a = attn(q[idx], torch.cat([k[idx], kr.expand(r, -1, -1)], 1),
                         torch.cat([v[idx], vr.expand(r, -1, -1)], 1))
                acc = a * s.weight if acc is None else acc + a * s.weight
            lam_r = torch.tensor([lam[i] for i in rows], device=y.device, dtype=pre.dtype).view(-1, 1, 1)
            pre = pre.clone()
            pre[idx] = (1.0 - lam_r) * pre[idx] + lam_r * acc
        return out + module.to_out(pre)


def _flat_kv(module, feats):
    """Reference tokens (N, L, C) → this module's keys and values of all N faces, (1, N·L, inner)."""
    flat = feats.reshape(1, -1, feats.shape[-1])
    return module.to_k(flat), module.to_v(flat)


class TrainingFreeInjector(ReferenceAttention):
    """EXTENSION (not FlashFace's trained model): the model itself as reference net, any SD1.5/SDXL/FLUX."""
    name = "flashface_training_free"

    def __init__(self, references, guidance, latent_format, family: str, diffusion_model, blocks: str = "decoder",
                 **kw):
        if blocks not in TF_BLOCKS:
            raise FlashFaceError(f"blocks must be one of {TF_BLOCKS}, got {blocks!r}")
        self.family = family
        if family == "flux":
            self.kinds = ("single",) if blocks == "decoder" else ("double", "single")
            keys = None
        else:
            self.kinds = ("attn1",)
            keys = [k for k in unet_block_keys(diffusion_model) if blocks == "all" or k[0] != "input"]
        super().__init__(references, guidance, latent_format, blocks=keys, **kw)
        self._wanted = (set(keys) if keys is not None else
                        {(kind, i) for kind in self.kinds
                         for i in range(len(getattr(diffusion_model, f"{kind}_blocks")))})

    def _run_reference_model(self, latents, t, conds, transformer_options, dtype):
        dm = transformer_options[MODEL_KEY]   # the model itself is the reference net
        device = t.device
        n = latents.shape[0]
        x = self.latent_format.process_in(latents.to(device)).to(dtype)
        inputs = _model_inputs(conds, n, device, dtype)
        reference_options = {"cond_or_uncond": [UNCOND], "sigmas": transformer_options.get("sigmas")}
        if self.family == "flux":
            rec: dict = {}
            txt_len = inputs["c_crossattn"].shape[1]
            reference_options["patches_replace"] = {"dit": {(f"{kind}_block", i): _FluxRecorder(rec, (kind, i), txt_len, dm)
                                                            for kind, i in self._wanted}}
            with torch.no_grad():
                dm(x, t.expand(n).to(device), inputs["c_crossattn"], y=inputs.get("y"), guidance=inputs.get("guidance"),
                   transformer_options=reference_options)
            return rec
        recorder = _UnetRecorder(self._wanted)
        reference_options["patches"] = {"attn1_patch": [recorder]}
        with torch.no_grad():
            dm(x, t.expand(n).to(device), context=inputs["c_crossattn"], y=inputs.get("y"),
               transformer_options=reference_options)
        return recorder.out

    # UNet: out is the stock attention output before to_out; blending before to_out is exact because
    # to_out is affine and the weights (1−λ) + λ·Σw_i sum to 1.
    def attn1(self, ctx, out, **kwargs):
        lam = self.row_lambdas(ctx)
        rows = [i for i, val in enumerate(lam) if val != 0.0]
        if not rows:
            return out
        module = ctx.module()
        idx = torch.tensor(rows, device=out.device)
        r = len(rows)
        q, k, v = ctx.q[idx], ctx.k[idx], ctx.v[idx]
        acc = None
        for s_i, (s, feats) in enumerate(zip(self.references.active_sets(), self.features(ctx))):
            kr, vr = self.cached(ctx, (ctx.key, s_i), lambda f=feats: _flat_kv(module, f))
            a = optimized_attention(q, torch.cat([k, kr.expand(r, -1, -1)], 1), torch.cat([v, vr.expand(r, -1, -1)], 1),
                                    ctx.n_heads, attn_precision=ctx.transformer_options.get("attn_precision"),
                                    transformer_options=ctx.transformer_options)
            acc = a * s.weight if acc is None else acc + a * s.weight
        lam_r = torch.tensor([lam[i] for i in rows], device=out.device, dtype=out.dtype).view(-1, 1, 1)
        new = out.clone()
        new[idx] = (1.0 - lam_r) * out[idx] + lam_r * acc
        return new

    # FLUX: an attention override set only for the duration of this block call, chaining any other.
    def double_block(self, ctx, args, call, **kwargs):
        return self._flux_block(ctx, args, call)

    def single_block(self, ctx, args, call, **kwargs):
        return self._flux_block(ctx, args, call)

    def _flux_block(self, ctx, args, call):
        lam = self.row_lambdas(ctx)
        rows = [i for i, val in enumerate(lam) if val != 0.0]
        if not rows:
            return call(args)
        block = ctx.module()
        refs = [(s, self.cached(ctx, (ctx.key, s_i), lambda f=f: _flat_heads(f)))
                for s_i, (s, f) in enumerate(zip(self.references.active_sets(), self.features(ctx)))]
        device = args["img"].device
        idx = torch.tensor(rows, device=device)
        lam_r = torch.tensor([lam[i] for i in rows], device=device)

        def blend(attend, q, k, v, heads, *a, **kw):
            base = attend(q, k, v, heads, *a, **kw)
            sl = _image_slice(ctx.kind, block, q.shape[2], ctx.txt_len)
            r = len(rows)
            qi = q[idx][:, :, sl]
            mask = kw.get("mask")
            acc = None
            for s, (kr, vr) in refs:
                kw2 = dict(kw)
                if mask is not None:
                    m = mask[idx] if mask.ndim == 4 and mask.shape[0] == q.shape[0] else mask
                    kw2["mask"] = _pad_mask(m[..., sl, :] if m.shape[-2] == q.shape[2] else m, kr.shape[2])
                ka = torch.cat([k[idx], kr.expand(r, -1, -1, -1)], 2)
                va = torch.cat([v[idx], vr.expand(r, -1, -1, -1)], 2)
                o = attend(qi, ka, va, heads, *a, **kw2)
                acc = o * s.weight if acc is None else acc + o * s.weight
            lr = lam_r.to(base.dtype).view(-1, 1, 1)
            new = base.clone()
            new[idx, sl] = (1.0 - lr) * base[idx][:, sl] + lr * acc
            return new

        transformer_options = args.get("transformer_options") or {}
        return call({**args, "transformer_options": chain_attention_override(transformer_options, blend)})


def _flat_heads(kv):
    """(k, v) of N references, each (N, H, L, D) → (1, H, N·L, D)."""
    k, v = kv
    return (k.transpose(0, 1).reshape(k.shape[1], -1, k.shape[-1])[None],
            v.transpose(0, 1).reshape(v.shape[1], -1, v.shape[-1])[None])


class _FluxRecorder:
    """dit replace patch for the reference pass: keeps the image keys/values (after QK-norm and RoPE)."""

    def __init__(self, out: dict, key, txt_len: int, dm):
        self.out, self.key, self.txt_len = out, key, txt_len
        self.block = (dm.double_blocks if key[0] == "double" else dm.single_blocks)[key[1]]

    def __call__(self, args, extra, **kwargs):
        def keep(attend, q, k, v, heads, *a, **kw):
            sl = _image_slice(self.key[0], self.block, q.shape[2], self.txt_len)
            self.out[self.key] = (k[:, :, sl], v[:, :, sl])
            return attend(q, k, v, heads, *a, **kw)

        transformer_options = args.get("transformer_options") or {}
        return extra["original_block"]({**args, "transformer_options": chain_attention_override(transformer_options, keep)})
