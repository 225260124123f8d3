"""OmniPortrait RB-Guidance wired into ComfyUI sampling (the math is in rb_energy.py).

``RBGuider`` is a ``comfy.samplers.CFGGuider`` subclass (override of ``predict_noise``, the hook that is
stable from 0.3.75 to current). Per sampling run it

1. encodes each reference image with the VAE once (at guider creation), noises it to t0 (671 on the
   1000-step scale, converted to the model's own sigma), runs the model once (optionally an ensemble of
   noise draws, averaged) and reads the DIFT features at the feature point;
2. for each step with ``sigma > sigma(uT)`` returns the plain CFG prediction untouched (bit-identical);
3. for each step with ``sigma <= sigma(uT)``: after the plain CFG prediction, runs the positive
   conditioning once more through ComfyUI's own ``calc_cond_batch`` (ControlNet, hooks, other packs'
   patches all apply), on a grad-tracking copy of the network input, and *stops the forward at the
   feature point* (an ``output_block_patch`` for UNets, a ``dit`` block hook for FLUX, raising
   ``_FeatureReady``). Attention maps of the same forward give M_gen (Eq. 6). ``rb_energy`` matches the
   features and returns the masked dE/dz, which is added to the CFG'd prediction (Eq. 11) and handed
   back to the sampler as ``denoised`` (conversions in rb_energy: ``eps_guidance_to_denoised`` for
   discrete VP models, ``flow_guidance_to_denoised`` for CONST/flow models such as FLUX).

Why the network input: ComfyUI feeds an EPS UNet ``x / sqrt(sigma^2 + 1)``, which is exactly the paper's
z_t, so the gradient w.r.t. that tensor needs no chain rule; for CONST models the input is x itself,
which is what ``flow_guidance_to_denoised`` takes.

Inference tensors: ComfyUI runs every node under ``torch.inference_mode()``, so weights loaded or built
inside a node (every checkpoint loader, our tiny-model node) are *inference tensors*, and autograd
refuses to save them for backward ("Inference tensors cannot be saved for backward"), even inside
``inference_mode(False)``. Cloning the weights would double their memory; instead, for the duration of
the truncated forward only, a ``TorchFunctionMode`` hands every op a zero-copy alias of any inference
tensor argument (same storage, made outside inference mode, so a normal tensor). Nothing of the model
is modified and nothing is copied.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode

import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ..errors import FeaturePointError, RBGuidanceError
from ..face.types import to_rgb
from . import rb_energy as rb
from .differentiable import comfy_training_mode
from .ip_adapter import IdentityInjector, flux_double_query
from .patching import LAYER_KEY, WRAPPER_KEY, Injector, apply_injector, model_family

log = logging.getLogger(__name__)

T0_DEFAULT = 671                       # DIFT/OmniPortrait reference noise level, 1000-step scale
CAPTURE_KEY = "idportrait_rb_capture"   # transformer_options key, present only in our own passes
CAPTURE_WRAPPER_KEY = "idportrait_rb"
FEATURE_AUTO = "auto"
MASK_SOURCES = ("auto", "box")


class _FeatureReady(Exception):
    """Raised at the feature point to end a forward early (caught by the guider, never escapes it)."""


# --------------------------------------------------------------------------------------------------
# Feature points
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeaturePoint:
    """Where the DIFT features are read.

    UNet: ``output_index`` j = the tensor h entering ``output_blocks[j]`` (before the skip concat), i.e.
    the output of output block j-1, or of the middle block for j = 0. ``up:i`` (DIFT's ``up_ft_index``)
    is the output of the i-th decoder up-block, taken after its upsampler.
    FLUX: ``block`` = ("double"|"single", i): the image tokens after that block.
    """
    family: str
    name: str
    output_index: int = -1
    block: tuple = ()

    @property
    def is_flux(self) -> bool:
        return bool(self.block)


def unet_upsample_blocks(dm) -> list[int]:
    """Indices of the output blocks that end with an upsampler (the ends of DIFT's up-blocks)."""
    return [j for j, blk in enumerate(dm.output_blocks) if any(isinstance(m, Upsample) for m in blk)]


def unet_attention_levels(dm) -> set[int]:
    """Resolution levels (number of 2x downsamplings) that hold transformer blocks."""
    levels, level = set(), 0
    for blk in dm.input_blocks:
        if any(isinstance(m, SpatialTransformer) for m in blk):
            levels.add(level)
        if any(isinstance(m, Downsample) for m in blk):
            level += 1
    if dm.middle_block is not None and any(isinstance(m, SpatialTransformer) for m in dm.middle_block):
        levels.add(level)
    return levels


def resolve_feature_point(model, spec: str = FEATURE_AUTO) -> FeaturePoint:
    """Parse a feature-point name for ``model`` (ModelPatcher); clear error when the model lacks it.

    UNet (SD1.5/SDXL): ``auto`` = the up-block output at 1/16 image resolution (latent/2): DIFT's
    ``up_ft_index=1`` on SD1.5 (output_blocks.5), ``up:0`` on SDXL (output_blocks.2), the middle block
    on a UNet with only one downsampling; ``mid``; ``up:i``. FLUX: ``auto`` = after the last double
    block (our choice; no source names a FLUX layer); ``double:i``; ``single:i``.
    """
    family = model_family(model)
    dm = model.model.diffusion_model
    s = (spec or FEATURE_AUTO).strip().lower().replace(" ", "")
    if family == "flux":
        nd, ns = len(dm.double_blocks), len(dm.single_blocks)
        if s == FEATURE_AUTO:
            s = f"double:{nd - 1}"
        m = re.fullmatch(r"(double|single):(\d+)", s)
        n = {"double": nd, "single": ns}.get(m.group(1)) if m else None
        if m is None or int(m.group(2)) >= n:
            raise FeaturePointError(
                f"feature point {spec!r} does not exist on this FLUX model; use 'auto', 'double:0'..'double:{nd - 1}' "
                f"or 'single:0'..'single:{ns - 1}' ('up:i'/'mid' are UNet points)")
        return FeaturePoint("flux", s, block=(m.group(1), int(m.group(2))))
    if family in ("sd15", "sdxl", "unet"):
        ups = unet_upsample_blocks(dm)
        if s == FEATURE_AUTO:
            i = len(ups) - 2        # the up-block whose output is at latent/2 = image/16
            s = "mid" if i < 0 else f"up:{i}"
        if s == "mid":
            return FeaturePoint(family, s, output_index=0)
        m = re.fullmatch(r"up:(\d+)", s)
        if m is None or int(m.group(1)) >= len(ups):
            valid = ", ".join(["'auto'", "'mid'"] + [f"'up:{i}'" for i in range(len(ups))])
            raise FeaturePointError(
                f"feature point {spec!r} does not exist on this {family} UNet; use one of {valid} "
                f"('double:i'/'single:i' are FLUX points; the last up-block has no upsampler and ends the network)")
        return FeaturePoint(family, s, output_index=ups[int(m.group(1))] + 1)
    raise FeaturePointError(f"RB-Guidance supports SD1.5/SDXL UNets and FLUX; this model is {type(model.model).__name__}")


def _ceil_half(hw, times: int):
    h, w = hw
    for _ in range(times):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def mask_grid(model, latent_hw) -> tuple[int, int]:
    """Token grid whose attention gives M_gen: the paper's 16x16 of a 512 px SD1.5 image (latent/4);
    on other UNets the attention level nearest to latent/4 from above; FLUX's only grid (latent/2)."""
    if model_family(model) == "flux":
        return _ceil_half(latent_hw, 1)
    levels = unet_attention_levels(model.model.diffusion_model)
    if not levels:
        raise RBGuidanceError("this UNet has no attention layers, so M_gen cannot come from attention: connect region masks")
    below = [lv for lv in levels if lv <= 2]
    return _ceil_half(latent_hw, max(below) if below else min(levels))


# --------------------------------------------------------------------------------------------------
# Autograd through inference-mode weights
# --------------------------------------------------------------------------------------------------

def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor sharing ``t``'s storage (no copy). Must be created outside inference mode."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _storage_key(t: torch.Tensor):
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):   # tensors without storage (subclasses, meta)
        return None


class _Saved:
    __slots__ = ("t", "own")

    def __init__(self, t):
        self.t, self.own = t, False


class GradPass(TorchFunctionMode):
    """Lets autograd run through ComfyUI's stock forward code; active only during our truncated forward.

    1. Inference tensors (weights made inside a node) reach each op as zero-copy normal aliases (see the
       module doc). Tensor subclasses (quantised weights and the like) are passed through unchanged.
    2. ComfyUI's blocks update tensors in place (FLUX ``img += ...`` on the block input that the
       block's own LayerNorm saved for backward; ``h += control`` on UNet skips), which autograd rejects
       ("modified by an inplace operation"). Saved tensors go through a pack hook that only keeps a
       reference; right before an in-place op writes to a storage that holds saved tensors, those are
       snapshotted (cloned). So only tensors that are really overwritten are copied, and the forward
       code and its results are exactly ComfyUI's.
    3. ComfyUI's own differentiable kernels are selected (``differentiable.comfy_training_mode``: current
       ComfyUI's fused FLUX RoPE has no backward) and deselected on exit, also when the forward raises.
    Use inside ``torch.inference_mode(False)`` and ``torch.enable_grad()``.
    """

    def __init__(self):
        super().__init__()
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._saved: dict = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.snapshots = 0
        self.saved_bytes = 0       # distinct activation storages kept for backward: what the gradient costs
        self._counted: set = set()  # storages already counted, plus the weights' (not activations)

    def __enter__(self):
        self._training = comfy_training_mode()
        self._training.__enter__()
        try:
            self._hooks.__enter__()
            return super().__enter__()
        except BaseException:
            self._training.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            try:
                self._hooks.__exit__(*exc)
            finally:
                self._training.__exit__(None, None, None)
                self._saved.clear()
                self._cache.clear()
                self._counted.clear()

    def _pack(self, t):
        h = _Saved(t)
        key = _storage_key(t)
        if key is not None:
            self._saved.setdefault(key, []).append(h)
            if key not in self._counted and not t.is_inference():
                self._counted.add(key)
                self.saved_bytes += t.untyped_storage().nbytes()
        return h

    @staticmethod
    def _unpack(h):
        return h.t

    def _before_write(self, target):
        key = _storage_key(target) if isinstance(target, torch.Tensor) else None
        for h in self._saved.pop(key, ()) if key is not None else ():
            h.t = h.t.clone()
            self.snapshots += 1

    def _map(self, a):
        if isinstance(a, torch.Tensor):
            if isinstance(a, torch.nn.Parameter) and not a.is_inference():
                self._counted.add(_storage_key(a))
                # only dE/dz is wanted: no weight gradients, no saved inputs for them
                return a.detach() if a.requires_grad else a
            if a.is_inference() and type(a) in (torch.Tensor, torch.nn.Parameter):
                hit = self._cache.get(id(a))
                if hit is None or hit[0] is not a:
                    hit = (a, _alias(a))   # keep ``a`` referenced: its id cannot be reused meanwhile
                    self._cache[id(a)] = hit
                    self._counted.add(_storage_key(a))
                return hit[1]
            return a
        if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
            return type(a)(self._map(x) for x in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if args and ((name.endswith("_") and not name.endswith("__")) or name == "__setitem__" or kwargs.get("inplace")):
            self._before_write(args[0])
        args = tuple(self._map(a) for a in args)
        kwargs = {k: self._map(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# Capturing features and attention during our own passes
# --------------------------------------------------------------------------------------------------

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


def _identity_adapters(to: dict) -> list:
    layer = to.get(LAYER_KEY)
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
                k_ip, _ = inj.sd_kv(ctx.key, ctx.q)
                return q @ _heads(_batch_rows(k_ip.detach(), b), n).float().transpose(-1, -2) * q.shape[-1] ** -0.5
            _record_cross(cap.record, logits, ip_logits, ctx, _identity_adapters(ctx.transformer_options))
        return out

    # -- FLUX
    def double_block(self, ctx, args, call, **kw):
        return self._dit(ctx, args, call)

    def single_block(self, ctx, args, call, **kw):
        return self._dit(ctx, args, call)

    def _dit(self, ctx, args, call):
        to = args.get("transformer_options") or {}
        cap = to.get(CAPTURE_KEY)
        if cap is None:
            return call(args)
        kind, idx = ctx.kind, ctx.key[1]
        point_kind, point_idx = cap.point.block
        if cap.record is not None and kind == "double" and (point_kind == "single" or idx <= point_idx):
            prev = to.get("optimized_attention_override")
            rec_args = args

            def override(func, *a, **kwa):
                # joint attention of this block: q, k are (B, heads, txt+img, d) after RoPE, text first
                _record_flux(cap, ctx, rec_args, a[0], a[1])
                return prev(func, *a, **kwa) if prev is not None else func(*a, **kwa)
            args = {**args, "transformer_options": {**to, "optimized_attention_override": override}}
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
            k_ip, _ = inj.flux_kv(f"double_{ctx.key[1]}", q_pre)
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
        to = kwargs.get("transformer_options")
        if to is None:
            to = next((a for a in args[2:] if isinstance(a, dict) and "sigmas" in a), {})
        cap = to.get(CAPTURE_KEY)
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


# --------------------------------------------------------------------------------------------------
# Identities, masks, settings
# --------------------------------------------------------------------------------------------------

@dataclass
class RBIdentity:
    """One identity: its reference image(s) and how its face region is found in each.

    ``reference``: IMAGE (N, H, W, C); several images are several photos of the same person (their
    reference points are pooled). ``reference_mask``: MASK (1 or N, H, W) = M_ref; None: detect the
    face with the face tools (``reference_mask_source``: 'auto' = landmark hull or box ellipse, 'box'
    = the detection box). Region in the generated image (first that is set): ``region_mask`` (MASK),
    ``region_box`` (x0, y0, x1, y1 as fractions), ``token_index`` (cross-attention of that prompt
    token), ``adapter`` (cross-attention of the k-th identity adapter on the model; None = next free).
    """
    reference: torch.Tensor
    reference_mask: Optional[torch.Tensor] = None
    region_mask: Optional[torch.Tensor] = None
    region_box: Optional[tuple] = None
    token_index: Optional[int] = None
    adapter: Optional[int] = None
    reference_mask_source: str = "auto"


@dataclass
class RBSettings:
    p: float = rb.P_STRENGTH
    u: float = rb.U_START
    t0: float = T0_DEFAULT
    feature_point: str = FEATURE_AUTO
    ensemble: int = 1
    ref_seed: int = 0
    gamma: int = rb.GAMMA
    alpha: float = rb.ALPHA
    beta: float = rb.BETA
    normalize_mask: bool = False      # min-max A_hat before beta (never-empty safety net, not the paper)
    metric: str = "cosine"
    reduction: str = "mean"
    scale: float = 1.0                # multiplier on the Eq. 11 term (1 = paper)

    def validate(self):
        if not 0.0 <= self.u <= 1.0:
            raise RBGuidanceError(f"u must be in [0, 1], got {self.u}")
        if not 0.0 < self.t0 < 1000.0:
            raise RBGuidanceError(f"t0 must be in (0, 1000), got {self.t0}")
        if self.ensemble < 1:
            raise RBGuidanceError(f"ensemble must be >= 1, got {self.ensemble}")


def box_mask(box: Sequence[float], size=(256, 256)) -> torch.Tensor:
    """(1, h, w) mask of a box given as fractions (x0, y0, x1, y1) of the image width/height."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise RBGuidanceError(f"box {tuple(box)} must be fractions with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    h, w = size
    m = torch.zeros(1, h, w)
    m[:, round(y0 * h):max(round(y1 * h), round(y0 * h) + 1), round(x0 * w):max(round(x1 * w), round(x0 * w) + 1)] = 1.0
    return m


def parse_box(text: str) -> Optional[tuple]:
    text = (text or "").strip()
    if not text:
        return None
    try:
        vals = tuple(float(v) for v in re.split(r"[,\s]+", text) if v)
    except ValueError:
        raise RBGuidanceError(f"region box {text!r}: expected four numbers 'x0, y0, x1, y1' (fractions)") from None
    if len(vals) != 4:
        raise RBGuidanceError(f"region box {text!r}: expected four numbers 'x0, y0, x1, y1' (fractions)")
    box_mask(vals, (4, 4))   # validates
    return vals


def detect_reference_masks(images: torch.Tensor, source: str = "auto", who: str = "reference") -> torch.Tensor:
    """M_ref from the face tools: the largest face in each image -> MASK (N, H, W). Raises when none."""
    if source not in MASK_SOURCES:
        raise RBGuidanceError(f"reference mask source must be one of {MASK_SOURCES}, got {source!r}")
    try:
        from ..face import detect as fdetect
        from ..face import masks as fmasks
        faces = fdetect.detect_faces(images)
    except ImportError as e:   # BackendUnavailable is an ImportError with the install hint
        raise RBGuidanceError(f"{who}: no reference mask was connected and the face detector is unavailable ({e}); "
                              "connect a reference MASK or install the face tools' detector") from e
    out = []
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    for i in range(n):
        if not faces[i]:
            raise RBGuidanceError(f"{who}: no face found in reference image {i + 1} of {n}; use a photo with a visible "
                                  "face or connect a reference MASK")
        face = fdetect.select_faces(faces[i], "largest", 0)[0]
        if source == "box":
            x1, y1, x2, y2 = (float(v) for v in face.bbox)
            out.append(box_mask((x1 / w, y1 / h, max(x2 / w, x1 / w + 1e-3), max(y2 / h, y1 / h + 1e-3)), (h, w))[0])
        else:
            out.append(fmasks.face_masks([[face]], h, w, source="auto")[0])
    return torch.stack(out).float()


def find_token_index(clip, prompt: str, word: str, occurrence: int = 0) -> int:
    """Position of ``word`` in ``prompt`` as the conditioning's token axis counts it (BOS included).

    Uses the CLIP object's own tokenizer: the stream the model cross-attends to (T5 for FLUX, CLIP-L
    for SD1.5; SDXL's two CLIP streams share positions). Special/padding tokens are those that
    tokenising an empty prompt produces.
    """
    word = (word or "").strip()
    if not word:
        raise RBGuidanceError("class word is empty")
    toks, wt, empty = clip.tokenize(prompt), clip.tokenize(word), clip.tokenize("")
    key = next((k for k in ("t5xxl", "l", "g") if k in toks), next(iter(toks)))

    def ids(t):
        return [tok[0] for chunk in t[key] for tok in chunk]
    special = set(ids(empty))
    target = [i for i in ids(wt) if i not in special]
    seq = ids(toks)
    hits = [s for s in range(len(seq) - len(target) + 1) if seq[s:s + len(target)] == target] if target else []
    if occurrence >= len(hits):
        raise RBGuidanceError(f"class word {word!r} not found in the prompt {prompt!r}"
                              + (f" (only {len(hits)} occurrence(s))" if hits else ""))
    return hits[occurrence]


# --------------------------------------------------------------------------------------------------
# The guider
# --------------------------------------------------------------------------------------------------

@dataclass
class StepTrace:
    sigma: float
    guided: bool
    energy: Optional[torch.Tensor] = None   # (K, B)
    s_hat: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    mask_cells: Optional[list] = None        # M_gen cells per identity at feature resolution (first batch item)
    grad_norm: float = 0.0
    grad: Optional[torch.Tensor] = None      # the masked gradient, only with ``record_grads``
    saved_bytes: int = 0                     # tensors autograd kept for the backward of the truncated forward


class RBGuider(comfy.samplers.CFGGuider):
    """CFG guider that adds the RB-Guidance energy gradient for t <= uT (see module doc).

    ``apply_guidance=False`` computes and records the energy at every guided step but returns the plain
    prediction (for measuring E along an unguided trajectory).
    """

    def __init__(self, model_patcher, identities: Sequence[RBIdentity], vae, settings: Optional[RBSettings] = None,
                 apply_guidance: bool = True):
        super().__init__(model_patcher)
        self.identities = list(identities)
        self.vae = vae
        self.settings = settings or RBSettings()
        self.settings.validate()
        self.apply_guidance = apply_guidance
        self.record_grads = False      # keep each step's gradient in the trace (tests, diagnostics)
        self.point = resolve_feature_point(model_patcher, self.settings.feature_point)
        self.trace: list[StepTrace] = []
        self.last_gen_masks: Optional[list] = None
        self._refs = None          # per identity: (raw latents, ref masks (N, H, W))
        self._run = None
        if not self.identities and self.settings.p != 0:
            raise RBGuidanceError("RB-Guidance needs at least one identity (a reference image)")

    # -- preparation that does not need the model loaded (runs at node execution)
    def prepare_references(self):
        if self._refs is not None:
            return self._refs
        refs = []
        adapters = _identity_adapters(self.model_patcher.model_options.get("transformer_options", {}))
        free_adapter = 0
        self._sources = []
        for k, ident in enumerate(self.identities):
            who = f"identity {k + 1}"
            img = ident.reference
            if img is None or img.dim() != 4 or img.shape[0] == 0:
                raise RBGuidanceError(f"{who}: the reference must be an IMAGE batch with at least one image")
            img = to_rgb(img)
            n, h, w = img.shape[:3]
            if ident.reference_mask is not None:
                m = ident.reference_mask
                m = m[None] if m.dim() == 2 else m
                if m.shape[0] not in (1, n):
                    raise RBGuidanceError(f"{who}: {m.shape[0]} reference masks for {n} reference images")
                m = rb.resize_mask(m.float(), (h, w), threshold=0.5).expand(n, h, w)
                for i in range(n):
                    if not bool(m[i].any()):
                        raise RBGuidanceError(f"{who}: the reference mask of image {i + 1} is empty")
            else:
                m = detect_reference_masks(img, ident.reference_mask_source, who)
            with torch.no_grad():   # callable outside ComfyUI's inference mode too
                lat = self.vae.encode(img)
            want = getattr(self.model_patcher.model.latent_format, "latent_channels", lat.shape[1])
            if lat.shape[1] != want:
                raise RBGuidanceError(f"{who}: the VAE gives {lat.shape[1]}-channel latents but this model uses {want}: "
                                      "connect the VAE of this model's family")
            # the region in the generated image
            if ident.region_mask is not None:
                rm = ident.region_mask
                rm = rm[None] if rm.dim() == 2 else rm
                if not bool((rm > 0.5).any()):
                    raise RBGuidanceError(f"{who}: the region mask is empty (no pixel > 0.5)")
                src = None
            elif ident.region_box is not None:
                src = None
            elif ident.token_index is not None:
                src = ("token", int(ident.token_index))
            else:
                a = ident.adapter if ident.adapter is not None else free_adapter
                if a >= len(adapters):
                    raise RBGuidanceError(
                        f"{who} has no region: connect a region mask or box, set a token index / class word, or "
                        f"apply an identity adapter (Omni-ID) to the model first (it carries {len(adapters)})")
                src = ("adapter", a)
                free_adapter = a + 1
            self._sources.append(src)
            refs.append((lat, m))
        self._refs = refs
        return refs

    def sample(self, *args, **kwargs):
        self.prepare_references()
        self.trace = []
        self._run = None           # reference features, sigmas and the capture clone: once per run
        try:
            out = super().sample(*args, **kwargs)
        finally:
            self._run = None
        self._warn_empty_regions()
        return out

    def _warn_empty_regions(self) -> None:
        """An attention-derived region that never covered a cell means guidance silently did nothing."""
        guided = [s for s in self.trace if s.guided and s.mask_cells]
        for k, src in enumerate(self._sources or []):
            if src is not None and guided and all(s.mask_cells[k] == 0 for s in guided):
                what = f"token {src[1]}" if src[0] == "token" else f"identity adapter {src[1] + 1}"
                log.warning("RB-Guidance: the face region of identity %d (from %s) was empty at every guided step, so "
                            "it was not guided: check the token index / class word, turn on normalize_mask, or "
                            "draw a region box or mask", k + 1, what)

    # -- per run, at the first guided step (model loaded, conds processed)
    def _prepare_run(self, x, model_options):
        ms = self.inner_model.model_sampling
        s = self.settings
        if isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) and len(ms.sigmas) == 1000:
            sigma_t0 = float(ms.sigma(torch.tensor(float(s.t0))))   # exactly DDPM t0
        else:
            sigma_t0 = float(ms.percent_to_sigma(1.0 - s.t0 / 1000.0))
        rb_model = apply_injector(self.model_patcher, RBInjector())
        run = {"sigma_t0": sigma_t0, "rb_model": rb_model, "flow": isinstance(ms, comfy.model_sampling.CONST)}
        self._run = run
        positive = self.conds.get("positive") or []
        if not positive:
            raise RBGuidanceError("RB-Guidance needs positive conditioning")
        # the reference pass sees the prompt, not the generation's ControlNet/area/mask
        ref_conds = [{k: v for k, v in c.items() if k not in ("control", "area", "mask", "gligen", "strength")}
                     for c in positive[:1]]
        feats = []
        for k, (lat, m) in enumerate(self._refs):
            latent = self.inner_model.process_latent_in(lat.to(x.device, torch.float32))
            n = latent.shape[0]
            g = torch.Generator().manual_seed(int(s.ref_seed) + k)
            noise = torch.randn((s.ensemble,) + tuple(latent.shape), generator=g).to(x.device, latent.dtype)
            lat_rep = latent[None].expand(s.ensemble, *latent.shape)
            x_ref = ms.noise_scaling(torch.full((s.ensemble * n,), sigma_t0, device=x.device),
                                     noise.reshape(-1, *latent.shape[1:]).clone(), lat_rep.reshape(-1, *latent.shape[1:]))
            with torch.no_grad():
                cap = self._forward(x_ref, torch.full((x_ref.shape[0],), sigma_t0, device=x.device), model_options,
                                    ref_conds, _Capture(self.point, x_ref.shape[0]))
            f = cap.features.float().reshape(s.ensemble, n, *cap.features.shape[1:]).mean(0)   # (N, C, h, w)
            mf = rb.resize_mask(m.to(f.device), f.shape[-2:])
            for i in range(n):
                if not bool(mf[i].any()):
                    raise RBGuidanceError(f"identity {k + 1}: the face in reference image {i + 1} is too small for the "
                                          f"{f.shape[-2]}x{f.shape[-1]} feature grid; use a larger face or reference")
            # several photos of one person: tile side by side, so their points form one reference pool
            feats.append(rb.IdentityGuide(ref_feat=torch.cat(list(f), dim=-1)[None],
                                          ref_mask=torch.cat(list(mf), dim=-1)[None], gen_mask=torch.zeros(1, 1, 1)))
        run["refs"] = feats
        log.info("RB-Guidance: reference features %s at %s (sigma_t0=%.4f, ensemble %d) for %d identities",
                 tuple(feats[0].ref_feat.shape), self.point.name, sigma_t0, s.ensemble, len(feats))
        return run

    def _capture_options(self, model_options: dict, cap: _Capture) -> dict:
        """Model options of our passes: the caller's, plus the patch layer of the RB clone and our hooks."""
        opts = comfy.model_patcher.create_model_options_clone(model_options)
        to = opts.setdefault("transformer_options", {})
        rb_model = self._run["rb_model"]
        rb_to = rb_model.model_options["transformer_options"]
        pr = to.setdefault("patches_replace", {})
        for name, slot in rb_to.get("patches_replace", {}).items():
            pr[name] = {**pr.get(name, {}), **slot}
        to[LAYER_KEY] = rb_to[LAYER_KEY]
        wrappers = to.setdefault("wrappers", {}).setdefault(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
        wrappers[WRAPPER_KEY] = list(rb_model.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL][WRAPPER_KEY])
        wrappers[CAPTURE_WRAPPER_KEY] = [_CaptureWrapper()]
        if not self.point.is_flux:
            patches = to.setdefault("patches", {})
            patches["output_block_patch"] = list(patches.get("output_block_patch", [])) + [_StopAtOutputBlock(self.point.output_index)]
        to[CAPTURE_KEY] = cap
        return opts

    def _forward(self, x, timestep, model_options, conds, cap: _Capture) -> _Capture:
        opts = self._capture_options(model_options, cap)
        try:
            comfy.samplers.calc_cond_batch(self.inner_model, [conds], x, timestep, opts)
        except _FeatureReady:
            return cap
        raise FeaturePointError("the model was never called in the RB-Guidance pass (no positive conditioning applies)")

    def _window_sigma(self) -> float:
        return float(self.inner_model.model_sampling.percent_to_sigma(1.0 - self.settings.u))

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        denoised = super().predict_noise(x, timestep, model_options, seed)
        s = self.settings
        sigma = float(timestep.flatten()[0])
        if s.p == 0 or not self.identities or sigma <= 0.0 or sigma > self._window_sigma() * (1 + 1e-6):
            self.trace.append(StepTrace(sigma, False))
            return denoised
        res = self.energy_gradient(x, timestep, model_options)
        if res is None or not self.apply_guidance:
            return denoised
        grad = res.grad.to(denoised.dtype)
        if self._run["flow"]:
            return rb.flow_guidance_to_denoised(denoised, grad, timestep, s.scale)
        return rb.eps_guidance_to_denoised(denoised, grad, timestep, s.scale)

    def energy_gradient(self, x, timestep, model_options=None) -> Optional[rb.RBGradient]:
        """dE/d(network input) at (x, sigma) for all identities, masked per identity; records a StepTrace."""
        model_options = model_options if model_options is not None else {}
        if self._run is None:
            self._prepare_run(x, model_options)
        s, run = self.settings, self._run
        ms = self.inner_model.model_sampling
        b = x.shape[0]
        record = None
        if any(src is not None for src in self._sources):
            record = _AttnRecord(mask_grid(self.model_patcher, tuple(x.shape[-2:])), list(self._sources))
        with torch.inference_mode(False):
            z = ms.calculate_input(timestep, x).detach().clone().requires_grad_(True)
            with torch.no_grad():   # the capture wrapper turns grad on for the diffusion model only
                cap = self._forward(x, timestep, model_options, self.conds["positive"], _Capture(self.point, b, z, record))
            gen_masks = self._gen_masks(record, b, tuple(x.shape[-2:]))
            fhw = tuple(cap.features.shape[-2:])
            for k, (src, gm) in enumerate(zip(self._sources, gen_masks)):
                if src is None and not bool(rb.resize_mask(gm, fhw).any()):
                    raise RBGuidanceError(f"identity {k + 1}: the region covers no cell of the {fhw[0]}x{fhw[1]} "
                                          "feature grid; draw a larger region")
            guides = [rb.IdentityGuide(ref.ref_feat.to(z.device), ref.ref_mask.to(z.device), gm.to(z.device))
                      for ref, gm in zip(run["refs"], gen_masks)]
            with torch.enable_grad():
                res = rb.rb_energy_grad_from_features(z, cap.features, guides, p=s.p, metric=s.metric,
                                                      reduction=s.reduction)
        self.last_gen_masks = [gm.detach().cpu() for gm in gen_masks]
        self.trace.append(StepTrace(float(timestep.flatten()[0]), True, res.energy.cpu(), res.s_hat.cpu(), res.valid.cpu(),
                                    [int(rb.resize_mask(gm, fhw)[0].sum()) for gm in gen_masks],
                                    float(res.grad.norm()), res.grad.cpu() if self.record_grads else None,
                                    cap.grad_pass.saved_bytes if cap.grad_pass is not None else 0))
        return res

    def _gen_masks(self, record: Optional[_AttnRecord], b: int, latent_hw) -> list:
        """M_gen per identity: user masks/boxes as given, attention masks by Eq. 6 (disjoint by argmax)."""
        s = self.settings
        out: list = [None] * len(self.identities)
        a_hats = {}
        for k, ident in enumerate(self.identities):
            if ident.region_mask is not None:
                out[k] = ident.region_mask.float()
            elif ident.region_box is not None:
                out[k] = box_mask(ident.region_box, (latent_hw[0] * 8, latent_hw[1] * 8))
            else:
                maps = record.cross[k] if record is not None else []
                if not maps:
                    out[k] = torch.zeros(b, *record.grid) if record is not None else torch.zeros(b, 1, 1)
                    continue
                h, w = record.grid
                cross = torch.stack(maps).mean(0).reshape(b, h, w)
                refined = rb.refine_mask(cross, gamma=s.gamma, alpha=s.alpha)
                a_hat = rb.propagate_by_self_attention(refined, record.qk) if record.qk else refined
                if s.normalize_mask:
                    a_hat = rb.minmax_normalize(a_hat)
                a_hats[k] = a_hat
        if a_hats:
            keys = list(a_hats)
            stack = torch.stack([a_hats[k] for k in keys])
            winner = stack.argmax(0)
            for j, k in enumerate(keys):
                # a pixel claimed by several identities goes to the strongest: regions never overlap
                out[k] = ((stack[j] > s.beta) & (winner == j)).float()
        return out

    def gen_mask_preview(self, size) -> torch.Tensor:
        """Union of the last M_gen of all identities as a MASK (B, H, W) of ``size`` (zeros before any guided step)."""
        h, w = size
        if not self.last_gen_masks:
            return torch.zeros(1, h, w)
        ms = [rb.resize_mask(m if m.dim() == 3 else m[None], (h, w), threshold=0.5) for m in self.last_gen_masks]
        bmax = max(m.shape[0] for m in ms)
        return torch.stack([m.expand(bmax, h, w) for m in ms]).amax(0)


def guided_sigma_window(model, u: float) -> float:
    """Largest sigma that is guided for ``u`` (steps with sigma above it run plain CFG)."""
    return float(model.get_model_object("model_sampling").percent_to_sigma(1.0 - u))


__all__ = ["T0_DEFAULT", "RBGuidanceError", "FeaturePointError", "FeaturePoint", "resolve_feature_point",
           "unet_upsample_blocks", "unet_attention_levels", "mask_grid", "GradPass", "RBInjector",
           "RBIdentity", "RBSettings", "box_mask", "parse_box", "detect_reference_masks", "find_token_index",
           "StepTrace", "RBGuider", "guided_sigma_window"]
