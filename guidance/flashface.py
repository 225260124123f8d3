"""FlashFace reference attention in ComfyUI: the released SD1.5 model, and a training-free extension.

Released layout (``ali-vilab/FlashFace``, ``all_finetune``; the released code wins over the paper):

* Reference pass, once per sampler step (cached by sigma, shared by every cond/uncond/reference row
  and every split batch): the reference UNet (its encoder and decoder, with the MAIN model's middle
  block) runs on the clean reference latents (VAE mean, no noise) at the current timestep with the
  negative-prompt context. The input of self-attention (``norm1(x)``) of ``middle_block.1`` and
  ``output_blocks.3-11`` is recorded.
* Main pass, in those blocks, after the stock self-attention (separate weights ``flashface_ref_attn``)::

      x += λ·RA(y, [y; refs]) + (1−λ)·RA(y, y)          y = norm1(x); λ may exceed 1

  λ = 0 still adds RA(y, y). Identity mixing (supplement Eq. 1) replaces the first term by
  λ·Σ_i w_i·RA(y, [y; refs_i]) with Σ w_i = 1.
* Guidance (``ContextGaussianDiffusion.denoise``): while t > launch, two-way CFG with λ_before in both
  rows; once t ≤ launch, three-way ``u + g(y−u) + c(y_ref−y)`` with rows [cond λ_feat, cond λ=0,
  uncond λ=0]. Then CFG rescale on the ε prediction: ``out *= r·std(y)/std(out) + (1−r)`` with y the
  cond row without reference (unbiased std per sample, +1e-12).
* Face position mask: 5th input channel, a square of side ``max(x2−y1, y2−y1)`` (pixels; the
  released demo and notebook compute the side exactly like this) at the box's top-left, sampled
  ``[::8, ::8]``; all zero without a box.

Training-free extension (NOT FlashFace's trained model; works on any SD1.5, SDXL or FLUX model): the
model itself is the reference net. The reference pass runs the model on the references; the main
pass blends its own self-attention ``(1−λ)·SA(y, y) + λ·SA(y, [y; refs])`` (UNet: the block's own
q/k/v/out; FLUX: reference image keys/values, after QK-norm and RoPE, appended to the joint attention
of the chosen blocks, for the image queries only). Same guidance schedule.

Sampler: the released DDIM with ``discretization='trailing'`` (timesteps 999, 999−1000/n, ...) is ComfyUI's
``ddim`` sampler with the ``simple`` scheduler (identical timesteps when n divides 1000, e.g. 25 or 50;
``sgm_uniform`` is off by one or two timesteps at some steps).

ComfyUI hooks (all public, chained with other packs'): the patching layer (guidance/patching.py) for
the attention sites and the once-per-call reference pass; a CALC_COND_BATCH wrapper that adds the
reference row as a third condition chunk (so ComfyUI batches and area-splits it like any cond); a
pre-CFG function that forms the three-way result; a SAMPLER_SAMPLE wrapper that reads the negative
conditioning of the run; an APPLY_MODEL wrapper that supplies the face mask as ``c_concat``. Any
ComfyUI sampler and scheduler works.
"""
from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
import comfy.supported_models
from comfy.ldm.modules.attention import CrossAttention, optimized_attention

from ..errors import FlashFaceError, FlashFaceMemoryError
from . import flashface_checkpoint as ffc
from . import flashface_keys as fk
from .patching import COND, MODEL_KEY, ROLES_KEY, UNCOND, Injector, apply_injector, model_family, unet_block_keys

log = logging.getLogger(__name__)

KEY = "idportrait_flashface"                    # wrapper / additional-model / option key
REF_UNET_KEY = "idportrait_flashface_ref_unet"  # additional model of a FlashFace MODEL
BRANCH_KEY = "idportrait_flashface_branch"      # transformer_options: {chunk label: "ref"}
REF_LABEL = 2                                   # chunk label of the cond-with-reference row
OVERRIDE = "optimized_attention_override"
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

RELEASED = types.MappingProxyType(dict(lambda_feat=1.2, lambda_ref=3.2, cfg=7.5, launch=750.0, lambda_before=0.85,
                                       rescale=0.5, num_refs=4, face_size=224, steps=25,
                                       box=(0.3, 0.1, 0.6, 0.4), sampler="ddim", scheduler="simple"))
# Training-free defaults: the paper's λ_feat/λ_ref; the paper applies its Eq. 3 at every step (no launch).
TRAINING_FREE = types.MappingProxyType(dict(lambda_feat=0.85, lambda_ref=2.0, launch=1000.0, lambda_before=0.85,
                                            rescale=0.0))
TF_BLOCKS = ("decoder", "all")

FIX_NOT_FLASHFACE = ("load flashface.ckpt (or its converted copy) with 'FlashFace Loader (IDP)', or use "
                     "'FlashFace Training-free Apply (IDP)' for other SD1.5/SDXL/FLUX models")


# --- references --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReferenceSet:
    """One person's reference faces: VAE-mean latents (N, C, h, w) in the VAE's raw space."""
    latents: torch.Tensor
    weight: float = 1.0


@dataclass(frozen=True)
class FlashFaceReferences:
    """FLASHFACE_REF: one or more reference sets (identity mixing) with weights summing to 1."""
    sets: tuple

    def __post_init__(self):
        if not self.sets:
            raise FlashFaceError("no reference faces: connect at least one face image to 'FlashFace Encode References'")
        for s in self.sets:
            if s.latents.ndim != 4 or s.latents.shape[0] == 0:
                raise FlashFaceError("a reference set is empty: encode at least one face image")
            if s.weight < 0:
                raise FlashFaceError(f"identity weights must be >= 0, got {s.weight}")
        if len({s.latents.shape[1] for s in self.sets}) != 1:
            raise FlashFaceError("reference sets were encoded with different VAEs (latent channels differ)")
        total = sum(s.weight for s in self.sets)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise FlashFaceError(f"identity weights must sum to 1, got {total}")

    @classmethod
    def single(cls, latents: torch.Tensor) -> "FlashFaceReferences":
        return cls((ReferenceSet(latents, 1.0),))

    @property
    def latent_channels(self) -> int:
        return self.sets[0].latents.shape[1]

    def active_sets(self) -> list:
        return [s for s in self.sets if s.weight != 0.0]

    def mix(self, other: "FlashFaceReferences", weight_other: float) -> "FlashFaceReferences":
        """Identity mixing: this person with weight 1−w, ``other`` with w (each set scaled)."""
        if not 0.0 <= weight_other <= 1.0:
            raise FlashFaceError(f"mixing weight must be in [0, 1], got {weight_other}")
        sets = [ReferenceSet(s.latents, s.weight * (1.0 - weight_other)) for s in self.sets]
        sets += [ReferenceSet(s.latents, s.weight * weight_other) for s in other.sets]
        return FlashFaceReferences(tuple(sets))

    def padded(self, n: int) -> "FlashFaceReferences":
        """Each set repeated cyclically up to ``n`` faces (the released code always uses 4)."""
        if n <= 0:
            return self
        out = []
        for s in self.sets:
            k = s.latents.shape[0]
            idx = torch.arange(max(n, k)) % k if k < n else torch.arange(k)
            out.append(ReferenceSet(s.latents[idx], s.weight))
        return FlashFaceReferences(tuple(out))

    def __repr__(self):   # shown in the UI and logs
        parts = ", ".join(f"{s.latents.shape[0]} face(s) w={s.weight:g}" for s in self.sets)
        return f"FlashFaceReferences({parts})"


def pad_to_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE (N, H, W, C) → (N, size, size, 3): long side resized to ``size``, black centred padding
    (FlashFace's PadToSquare; black is −1 after the VAE's normalisation, as in the released code)."""
    out = []
    for img in images[..., :3]:
        h, w = img.shape[:2]
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        x = F.interpolate(img.movedim(-1, 0)[None].float(), size=(nh, nw), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)[0].movedim(0, -1)
        canvas = torch.zeros(size, size, 3, dtype=x.dtype)
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas[top:top + nh, left:left + nw] = x
        out.append(canvas)
    return torch.stack(out)


def crop_and_level(image: torch.Tensor, bbox, left_eye, right_eye) -> torch.Tensor:
    """One IMAGE (H, W, C): crop the detection box (no margin), then rotate the crop about its centre
    so the eyes are level (same size, black fill) — FlashFace's reference preprocessing."""
    h, w = image.shape[:2]
    x1, y1 = max(0, int(math.floor(bbox[0]))), max(0, int(math.floor(bbox[1])))
    x2, y2 = min(w, int(math.ceil(bbox[2]))), min(h, int(math.ceil(bbox[3])))
    if x2 <= x1 or y2 <= y1:
        raise FlashFaceError(f"empty face box {tuple(float(b) for b in bbox)} in a {w}x{h} image")
    crop = image[y1:y2, x1:x2, :3].float()
    angle = math.atan2(float(right_eye[1]) - float(left_eye[1]), float(right_eye[0]) - float(left_eye[0]))
    if abs(angle) < 1e-6:
        return crop
    ch, cw = crop.shape[:2]
    cos, sin = math.cos(angle), math.sin(angle)
    # output pixel (u, v) samples the input at R(angle)·(u, v) about the centre (pixel units → [-1, 1])
    theta = torch.tensor([[cos, -sin * ch / cw, 0.0], [sin * cw / ch, cos, 0.0]], dtype=torch.float32,
                         device=crop.device)
    grid = F.affine_grid(theta[None], (1, 3, ch, cw), align_corners=False)
    out = F.grid_sample(crop.movedim(-1, 0)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].movedim(0, -1).clamp(0, 1)


def face_position_mask(box: Optional[Sequence[float]], latent_hw: tuple[int, int], downscale: int = 8) -> torch.Tensor:
    """(h, w) face position mask at latent resolution, built exactly as the released code does.

    box: (x1, y1, x2, y2) as fractions of the image; None or all zeros → no constraint (all zero).
    The canvas is the image (h·8, w·8); the square's side is ``max(x2−y1, y2−y1)`` in pixels,
    anchored at (x1, y1) — the released demo and notebook use ``face_bbox[2] - face_bbox[1]``.
    """
    h, w = latent_hw
    if box is None or all(float(b) == 0.0 for b in box):
        return torch.zeros(h, w)
    x1, y1, x2, y2 = (float(b) for b in box)
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise FlashFaceError(f"face box must be fractions 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1, got {tuple(box)}; "
                             "use 0, 0, 0, 0 for no position constraint")
    H, W = h * downscale, w * downscale
    px = [int(x1 * W), int(y1 * H), int(x2 * W), int(y2 * H)]
    side = max(px[2] - px[1], px[3] - px[1])
    canvas = torch.zeros(H, W)
    canvas[px[1]:px[1] + side, px[0]:px[0] + side] = 1.0
    return canvas[::downscale, ::downscale]


def mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int], downscale: int = 8) -> torch.Tensor:
    """A MASK (H, W) or (1, H, W) → (h, w): brought to the image size (nearest), then sampled [::8, ::8]."""
    if mask.ndim == 3:
        mask = mask[0]
    h, w = latent_hw
    H, W = h * downscale, w * downscale
    if tuple(mask.shape) != (H, W):
        mask = F.interpolate(mask[None, None].float(), size=(H, W), mode="nearest")[0, 0]
    return mask.float().clamp(0, 1)[::downscale, ::downscale]


class FaceMaskConcat:
    """APPLY_MODEL wrapper: gives a 5-channel FlashFace UNet its mask channel as ``c_concat``.

    A conditioning that already carries a concat tensor (``noise_concat``) keeps it.
    """

    def __init__(self, box=None, mask: Optional[torch.Tensor] = None):
        self.box, self.mask = (None if box is None else tuple(float(b) for b in box)), mask
        if self.box is not None:
            face_position_mask(self.box, (8, 8))   # validate now, not at sampling time

    def __deepcopy__(self, memo):
        return self

    def latent_mask(self, latent_hw) -> torch.Tensor:
        if self.mask is not None:
            return mask_to_latent(self.mask, latent_hw)
        return face_position_mask(self.box, latent_hw)

    def __call__(self, executor, *args, **kwargs):
        args = list(args)
        x = args[0]
        if len(args) > 2 and args[2] is None:
            m = self.latent_mask(tuple(x.shape[-2:])).to(x.device, x.dtype)
            args[2] = m[None, None].expand(x.shape[0], 1, -1, -1)
        elif len(args) <= 2 and kwargs.get("c_concat") is None:
            m = self.latent_mask(tuple(x.shape[-2:])).to(x.device, x.dtype)
            kwargs["c_concat"] = m[None, None].expand(x.shape[0], 1, -1, -1)
        return executor(*args, **kwargs)


# --- guidance ----------------------------------------------------------------------------------

@dataclass
class Guidance:
    """λ_feat, λ_ref (= c), launch timestep (0..1000; three-way once t ≤ launch), λ before launch, rescale."""
    lambda_feat: float = RELEASED["lambda_feat"]
    lambda_ref: float = RELEASED["lambda_ref"]
    launch: float = RELEASED["launch"]
    lambda_before: float = RELEASED["lambda_before"]
    rescale: float = RELEASED["rescale"]

    def __post_init__(self):
        if not 0.0 <= self.rescale <= 1.0:
            raise FlashFaceError(f"cfg_rescale must be in [0, 1], got {self.rescale}")


def timestep_1000(model_sampling, sigma: float) -> float:
    """The model timestep of ``sigma`` on a 0..1000 scale (discrete SD: the integer DDPM step; flow: σ·1000)."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return float(sigma) * 1000.0
    return float(model_sampling.timestep(torch.tensor([float(sigma)])).flatten()[0])


def rescale_cfg(final: torch.Tensor, y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, r: float) -> torch.Tensor:
    """CFG rescale (arXiv:2305.08891) as the released code does it, on the ε (flow: velocity) prediction:
    ``ε_out *= r·std(ε_y)/(std(ε_out)+1e-12) + (1−r)``; inputs and output are ComfyUI denoised tensors."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    eps_out, eps_y = (x - final) / s, (x - y) / s
    ratio = eps_y.flatten(1).std(dim=1) / (eps_out.flatten(1).std(dim=1) + 1e-12)
    eps_out = eps_out * (r * ratio.view(-1, *([1] * (x.ndim - 1))) + (1.0 - r))
    return x - s * eps_out


class _ThreeWayBatch:
    """CALC_COND_BATCH wrapper: in the three-way phase, adds the cond-with-reference row as a third
    condition chunk (label 2, role COND), so ComfyUI batches, splits and area-handles it like any cond."""

    def __init__(self, injector: "ReferenceAttention"):
        self.injector = injector

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        inj = self.injector
        sigma = float(timestep.flatten()[0])
        if len(conds) != 2 or conds[0] is None or not inj.needs_ref_branch(sigma):
            return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
        ref_cond = [dict(c) for c in conds[0]]
        to = dict(model_options.get("transformer_options", {}))
        to[ROLES_KEY] = {**to.get(ROLES_KEY, {}), REF_LABEL: COND}
        to[BRANCH_KEY] = {REF_LABEL: "ref"}
        out = executor(model, [conds[0], conds[1], ref_cond], x_in, timestep,
                       {**model_options, "transformer_options": to}, *args, **kwargs)
        inj.stash_ref_output(sigma, out[2])
        return out[:2]


class _ThreeWayCombine:
    """Pre-CFG function: ``final = u + g(y−u) + c(y_ref−y)`` (+ rescale), handed on as a cond/uncond pair
    that ComfyUI's own CFG turns into ``final``; post-CFG functions of other nodes still run after."""

    def __init__(self, injector: "ReferenceAttention"):
        self.injector = injector

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        out = list(args["conds_out"])
        inj, g = self.injector, float(args["cond_scale"])
        cfg = inj.guidance
        sigma = args["sigma"]
        y_ref = inj.take_ref_output(float(sigma.flatten()[0]), out[0])
        if y_ref is None and cfg.rescale == 0.0:
            return out   # plain two-way CFG: exactly ComfyUI's
        y, u, x = out[0], out[1], args["input"]
        final = u + g * (y - u)
        if y_ref is not None:
            final = final + cfg.lambda_ref * (y_ref - y)
        if cfg.rescale > 0.0:
            final = rescale_cfg(final, y, x, sigma, cfg.rescale)
        if g == 0.0:
            return [final, final] + out[2:]
        return [u + (final - u) / g, u] + out[2:]


class _RunScope:
    """SAMPLER_SAMPLE wrapper: reads the run's negative conditioning (context of the reference pass)
    and drops per-run caches at both ends."""

    def __init__(self, injector: "ReferenceAttention"):
        self.injector = injector

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        guider = args[0] if args else None
        self.injector.begin_run(getattr(guider, "conds", None) or {})
        try:
            return executor(*args, **kwargs)
        finally:
            self.injector.end_run()


# --- the injectors -----------------------------------------------------------------------------

def transformer_block(diffusion_model, key):
    """The BasicTransformerBlock of a UNet attention key (name, id, index)."""
    name, block_id, index = key
    block = diffusion_model.middle_block if name == "middle" else getattr(diffusion_model, f"{name}_blocks")[block_id]
    for layer in block:
        if getattr(layer, "transformer_blocks", None) is not None:
            return layer.transformer_blocks[index]
    raise KeyError(f"no transformer block at {key}")


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
    """Shared machinery: λ per row, the once-per-step reference pass, the run's negative context."""
    name = "flashface"

    def __init__(self, references: FlashFaceReferences, guidance: Guidance, latent_format,
                 blocks: Optional[Iterable] = None, max_ref_batch: Optional[int] = None):
        super().__init__(blocks=blocks)
        self.references, self.guidance, self.latent_format = references, guidance, latent_format
        self.max_ref_batch = max_ref_batch
        self.reference_passes = 0        # how many times reference features were computed (tests, logs)
        self.reference_faces_encoded = 0   # distinct faces run through the reference net, over all passes
        self._ms = None
        self._t_of_sigma: dict = {}
        self._step: Optional[dict] = None
        self._run_conds: Optional[dict] = None
        self._ref_out = None

    def __deepcopy__(self, memo):
        return self   # shared state is per run and per step; see begin_run/end_run

    def bind(self, model_sampling) -> None:
        super().bind(model_sampling)
        self._ms = model_sampling

    # -- schedule
    def timestep(self, sigma: float) -> float:
        t = self._t_of_sigma.get(sigma)
        if t is None:
            t = self._t_of_sigma[sigma] = timestep_1000(self._ms, sigma)
        return t

    def three_way(self, sigma: float) -> bool:
        return self.timestep(sigma) <= self.guidance.launch

    def needs_ref_branch(self, sigma: float) -> bool:
        # λ_feat = 0 makes the reference row equal the plain cond row, so c·(y_ref − y) vanishes
        g = self.guidance
        return self.three_way(sigma) and g.lambda_ref != 0.0 and g.lambda_feat != 0.0

    def chunk_lambdas(self, cond_or_uncond: list, sigma: float, transformer_options: dict) -> list:
        g = self.guidance
        if not self.three_way(sigma):
            return [g.lambda_before for _ in cond_or_uncond]
        branch = transformer_options.get(BRANCH_KEY) or {}
        return [g.lambda_feat if branch.get(c) == "ref" else 0.0 for c in cond_or_uncond]

    def row_lambdas(self, cond_or_uncond: list, batch: int, sigma: float, transformer_options: dict) -> list:
        lam = self.chunk_lambdas(cond_or_uncond or [COND], sigma, transformer_options)
        per = batch // len(lam)
        return [v for v in lam for _ in range(per)]

    # -- per run / per step state
    def begin_run(self, conds: dict) -> None:
        self._step, self._ref_out = None, None
        self._run_conds = _reference_conds(conds)

    def end_run(self) -> None:
        self._step, self._ref_out, self._run_conds = None, None, None

    def stash_ref_output(self, sigma: float, out: torch.Tensor) -> None:
        self._ref_out = (sigma, out)

    def take_ref_output(self, sigma: float, like: torch.Tensor) -> Optional[torch.Tensor]:
        got, self._ref_out = self._ref_out, None
        if got is None or got[0] != sigma or got[1].shape != like.shape:
            return None
        return got[1]

    def on_model_call(self, transformer_options: dict, x, timestep, call_args=(), call_kwargs=None,
                      **kwargs) -> None:
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return
        sigma = float(sigmas.flatten()[0])
        lam = self.chunk_lambdas(transformer_options.get("cond_or_uncond") or [COND], sigma, transformer_options)
        if all(v == 0.0 for v in lam):
            return
        if self._step is not None and self._step["sigma"] == sigma and self._step["device"] == x.device:
            return
        conds = self._run_conds or _conds_from_call(call_args, call_kwargs or {}, transformer_options)
        t = timestep.flatten()[:1]
        feats = self._reference_pass(transformer_options, t, conds, x.dtype)
        self._step = {"sigma": sigma, "device": x.device, "features": feats, "kv": {}}
        self.reference_passes += 1

    def features(self, key) -> list:
        """Per active reference set: the recorded reference tensors of block ``key`` at this step."""
        if self._step is None or key not in self._step["features"]:
            raise RuntimeError(f"FlashFace: no reference features for block {key} at this step")
        return self._step["features"][key]

    def cached(self, name, make):
        kv = self._step["kv"]
        if name not in kv:
            kv[name] = make()
        return kv[name]

    # -- the reference pass
    def _reference_pass(self, transformer_options, t, conds, dtype) -> dict:
        sets = self.references.active_sets()
        latents = [s.latents for s in sets]
        shapes = {tuple(lt.shape[1:]) for lt in latents}
        groups = [latents] if len(shapes) == 1 else [[lt] for lt in latents]
        per_set: dict = {}
        for group in groups:
            batch = torch.cat(group)
            counts = [g.shape[0] for g in group]
            # Faces repeated to pad a set (the released code always uses 4) or shared between sets are
            # encoded once: the reference pass is per face, so its features are simply repeated.
            unique, inverse = _unique_faces(batch)
            feats = self._chunked(unique, t, conds, transformer_options, dtype)
            self.reference_faces_encoded += unique.shape[0]
            for key, val in feats.items():
                per_set.setdefault(key, []).extend(_split_refs(_take_refs(val, inverse), counts))
        return per_set

    def _chunked(self, latents, t, conds, transformer_options, dtype) -> dict:
        n = latents.shape[0]
        size = min(self.max_ref_batch or n, n)
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
        if size < n and self.max_ref_batch != size:
            self.max_ref_batch = size   # remember the working size for the rest of the run
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

    def __init__(self, references, guidance, latent_format, ref_patcher, **kw):
        blocks = [(name, i, 0) for name, i in fk.REF_ATTENTION_BLOCKS]
        super().__init__(references, guidance, latent_format, blocks=blocks, **kw)
        self.ref_patcher = ref_patcher

    def _run_reference_model(self, latents, t, conds, transformer_options, dtype):
        unet = self.ref_patcher.model.diffusion_model
        device = t.device
        x = self.latent_format.process_in(latents.to(device)).to(dtype)   # clean latents: no noise, no c_in
        n = x.shape[0]
        rec = _UnetRecorder(set(self.blocks))
        to = {"patches": {"attn1_patch": [rec]}, "cond_or_uncond": [UNCOND],
              "sigmas": transformer_options.get("sigmas")}
        inputs = _model_inputs(conds, n, device, dtype)
        with torch.no_grad():
            unet(x, t.expand(n).to(device), context=inputs["c_crossattn"], transformer_options=to)
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
        lam = self.row_lambdas(ctx.cond_or_uncond, y.shape[0], ctx.sigma, ctx.transformer_options)
        to = ctx.transformer_options
        q, k, v = module.to_q(y), module.to_k(y), module.to_v(y)
        attn = lambda q_, k_, v_: optimized_attention(q_, k_, v_, module.heads,  # noqa: E731
                                                      attn_precision=module.attn_precision, transformer_options=to)
        pre = attn(q, k, v)                                      # RA(y, y), for every row
        rows = [i for i, val in enumerate(lam) if val != 0.0]
        if rows:
            idx = torch.tensor(rows, device=y.device)
            acc = None
            for s_i, (s, feats) in enumerate(zip(self.references.active_sets(), self.features(ctx.key))):
                kr, vr = self.cached((ctx.key, s_i), lambda f=feats: _flat_kv(module, f))
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
        to = {"cond_or_uncond": [UNCOND], "sigmas": transformer_options.get("sigmas")}
        if self.family == "flux":
            rec: dict = {}
            txt_len = inputs["c_crossattn"].shape[1]
            to["patches_replace"] = {"dit": {(f"{kind}_block", i): _FluxRecorder(rec, (kind, i), txt_len, dm)
                                             for kind, i in self._wanted}}
            with torch.no_grad():
                dm(x, t.expand(n).to(device), inputs["c_crossattn"], y=inputs.get("y"), guidance=inputs.get("guidance"),
                   transformer_options=to)
            return rec
        recorder = _UnetRecorder(self._wanted)
        to["patches"] = {"attn1_patch": [recorder]}
        with torch.no_grad():
            dm(x, t.expand(n).to(device), context=inputs["c_crossattn"], y=inputs.get("y"), transformer_options=to)
        return recorder.out

    # UNet: out is the stock attention output before to_out; blending before to_out is exact because
    # to_out is affine and the weights (1−λ) + λ·Σw_i sum to 1.
    def attn1(self, ctx, out, **kwargs):
        lam = self.row_lambdas(ctx.cond_or_uncond, out.shape[0], ctx.sigma, ctx.transformer_options)
        rows = [i for i, val in enumerate(lam) if val != 0.0]
        if not rows:
            return out
        module = ctx.module()
        idx = torch.tensor(rows, device=out.device)
        r = len(rows)
        q, k, v = ctx.q[idx], ctx.k[idx], ctx.v[idx]
        acc = None
        for s_i, (s, feats) in enumerate(zip(self.references.active_sets(), self.features(ctx.key))):
            kr, vr = self.cached((ctx.key, s_i), lambda f=feats: _flat_kv(module, f))
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
        batch = args["img"].shape[0]
        lam = self.row_lambdas(ctx.cond_or_uncond, batch, ctx.sigma, ctx.transformer_options)
        rows = [i for i, val in enumerate(lam) if val != 0.0]
        if not rows:
            return call(args)
        to = dict(args.get("transformer_options") or {})
        prev = to.get(OVERRIDE)
        block = ctx.module()
        refs = [(s, self.cached((ctx.key, s_i), lambda f=f: _flat_heads(f)))
                for s_i, (s, f) in enumerate(zip(self.references.active_sets(), self.features(ctx.key)))]
        device = args["img"].device
        idx = torch.tensor(rows, device=device)
        lam_r = torch.tensor([lam[i] for i in rows], device=device)

        def override(func, q, k, v, heads, *a, **kw):
            run = (lambda *aa, **kk: prev(func, *aa, **kk)) if prev is not None else func
            base = run(q, k, v, heads, *a, **kw)
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
                o = run(qi, ka, va, heads, *a, **kw2)
                acc = o * s.weight if acc is None else acc + o * s.weight
            lr = lam_r.to(base.dtype).view(-1, 1, 1)
            new = base.clone()
            new[idx, sl] = (1.0 - lr) * base[idx][:, sl] + lr * acc
            return new

        to[OVERRIDE] = override
        return call({**args, "transformer_options": to})


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
        to = dict(args.get("transformer_options") or {})
        prev = to.get(OVERRIDE)

        def override(func, q, k, v, heads, *a, **kw):
            sl = _image_slice(self.key[0], self.block, q.shape[2], self.txt_len)
            self.out[self.key] = (k[:, :, sl], v[:, :, sl])
            return prev(func, q, k, v, heads, *a, **kw) if prev is not None else func(q, k, v, heads, *a, **kw)

        to[OVERRIDE] = override
        return extra["original_block"]({**args, "transformer_options": to})


# --- building and applying ---------------------------------------------------------------------

def sd15_unet_config(model_channels: int, context_dim: int, in_channels: int) -> dict:
    """ComfyUI's SD1.5 UNet config at the given widths (SD1.5 itself: 320, 768)."""
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": in_channels, "model_channels": model_channels,
            "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
            "transformer_depth_middle": 1, "transformer_depth_output": [1] * 9 + [0] * 3,
            "use_linear_in_transformer": False, "context_dim": context_dim,
            "use_temporal_attention": False, "use_temporal_resblock": False}


def _pick_dtype(weight_dtype: str, load_device):
    supported = [torch.float16, torch.bfloat16, torch.float32]
    if weight_dtype in ffc.DTYPES:
        dtype = ffc.DTYPES[weight_dtype]
    else:
        dtype = mm.unet_dtype(model_params=1_650_000_000, supported_dtypes=supported)
    return dtype, mm.unet_manual_cast(dtype, load_device, supported)


def _load_exactly(module, sd: dict, what: str) -> None:
    """Every tensor must land; parameter-less state that newer ComfyUI adds to its modules may stay unset."""
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(".config")]   # e.g. CrossAttention.comfy_attention.config
    if missing or unexpected:
        raise FlashFaceError(f"the FlashFace {what} does not fit ComfyUI's SD1.5 UNet: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


def build_models(weights: ffc.FlashFaceWeights, weight_dtype: str = "default"):
    """ComfyUI ModelPatchers: the main UNet (5-channel input, ``flashface_ref_attn`` modules beside the
    self-attention of the 10 reference blocks) with the reference UNet attached as an additional model."""
    mc = weights.main["input_blocks.0.0.weight"].shape[0]
    ctx = weights.main["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype, manual_cast = _pick_dtype(weight_dtype, load_device)
    bases = []
    for in_ch in (5, 4):
        cfg = comfy.supported_models.SD15(sd15_unet_config(mc, ctx, in_ch))
        cfg.set_inference_dtype(dtype, manual_cast)
        bases.append(cfg.get_model({}, ""))
    main, ref = bases
    main.concat_keys = ()   # ComfyUI takes in_channels > 4 for inpainting; our 5th channel is the face mask
    dm = main.diffusion_model
    for name, i in fk.REF_ATTENTION_BLOCKS:
        tb = transformer_block(dm, (name, i, 0))
        ops = types.SimpleNamespace(Linear=type(tb.attn1.to_q))   # the UNet's own layer type (cast/fp8 aware)
        ch = tb.attn1.to_q.weight.shape[1]
        setattr(tb, fk.REF_ATTN, CrossAttention(query_dim=ch, heads=tb.attn1.heads, dim_head=ch // tb.attn1.heads,
                                                dtype=dtype, operations=ops))
    _load_exactly(dm, {**weights.main, **weights.ref_attention}, "main UNet")
    _load_exactly(ref.diffusion_model, weights.ref, "reference UNet")
    main_p = comfy.model_patcher.ModelPatcher(main, load_device=load_device, offload_device=offload_device)
    ref_p = comfy.model_patcher.ModelPatcher(ref, load_device=load_device, offload_device=offload_device)
    main_p.set_additional_models(REF_UNET_KEY, [ref_p])
    main_p.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, FaceMaskConcat())
    log.info("FlashFace: main UNet (%d ch, 5-channel input) and reference UNet built in %s", mc, dtype)
    return main_p


def load_flashface(path: str, weight_dtype: str = "default"):
    """A FlashFace file (released ckpt, safetensors copy, or converted) → the main MODEL (see build_models)."""
    dtype = ffc.DTYPES.get(weight_dtype)
    return build_models(ffc.load(path, dtype=dtype, geometry="auto"), weight_dtype)


def is_flashface_model(model) -> bool:
    dm = getattr(model.model, "diffusion_model", None)
    if not model.get_additional_models_with_key(REF_UNET_KEY) or not hasattr(dm, "input_blocks"):
        return False
    try:
        return all(hasattr(transformer_block(dm, (n, i, 0)), fk.REF_ATTN) for n, i in fk.REF_ATTENTION_BLOCKS)
    except (KeyError, IndexError, TypeError):
        return False


def _check_references(model, references: FlashFaceReferences) -> None:
    if not isinstance(references, FlashFaceReferences):
        raise FlashFaceError("references must come from 'FlashFace Encode References (IDP)'")
    want = model.model.latent_format.latent_channels
    if references.latent_channels != want:
        raise FlashFaceError(f"the references have {references.latent_channels} latent channels but this model uses "
                             f"{want}: encode the faces with this model's VAE")


def _install(model, injector: ReferenceAttention):
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, KEY):
        raise FlashFaceError("this MODEL already has FlashFace reference attention: apply it once, and put several "
                             "people in one reference input with 'FlashFace Mix References (IDP)'")
    m = apply_injector(model, injector)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, KEY, _ThreeWayBatch(injector))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, KEY, _RunScope(injector))
    m.set_model_sampler_pre_cfg_function(_ThreeWayCombine(injector))
    return m


def apply_flashface(model, references: FlashFaceReferences, guidance: Guidance, box=None,
                    mask: Optional[torch.Tensor] = None, max_ref_batch: Optional[int] = None):
    """The released method on a MODEL from :func:`load_flashface`; returns a patched clone."""
    if not is_flashface_model(model):
        raise FlashFaceError("this MODEL is not FlashFace's (no reference UNet / reference attention): "
                             + FIX_NOT_FLASHFACE)
    _check_references(model, references)
    if mask is not None and mask.ndim == 3 and mask.shape[0] > 1:
        raise FlashFaceError(f"the face mask has {mask.shape[0]} masks; FlashFace takes one face position for the "
                             "whole batch: connect a single mask")
    ref_p = model.get_additional_models_with_key(REF_UNET_KEY)[0]
    inj = FlashFaceInjector(references, guidance, model.model.latent_format, ref_p, max_ref_batch=max_ref_batch)
    m = _install(model, inj)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, FaceMaskConcat(box, mask))
    return m


def apply_training_free(model, references: FlashFaceReferences, guidance: Guidance, blocks: str = "decoder",
                        max_ref_batch: Optional[int] = None):
    """EXTENSION: reference attention with the model itself as reference net (SD1.5, SDXL, FLUX)."""
    family = model_family(model)
    if family == "other":
        raise FlashFaceError(f"training-free reference attention supports SD1.5/SDXL UNets and FLUX; got "
                             f"{type(model.model).__name__}")
    if is_flashface_model(model):
        raise FlashFaceError("this is FlashFace's own model: use 'FlashFace Apply (IDP)', which runs its trained "
                             "reference UNet")
    _check_references(model, references)
    inj = TrainingFreeInjector(references, guidance, model.model.latent_format, family, model.model.diffusion_model,
                               blocks=blocks, max_ref_batch=max_ref_batch)
    return _install(model, inj)


def make_guider(model, positive, negative, cfg: float):
    """A ComfyUI CFGGuider on a patched MODEL (the guidance lives in the MODEL's options)."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def injector_of(model) -> Optional[ReferenceAttention]:
    """The FlashFace injector on a patched MODEL (None if none): for tests and diagnostics."""
    for w in model.get_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, KEY):
        return w.injector
    return None
