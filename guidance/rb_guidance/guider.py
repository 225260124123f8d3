"""The RB-Guidance guider: a ``CFGGuider`` subclass overriding ``predict_noise`` (stable from 0.3.75 to current).

Per sampling run it

1. brings each reference to the model's working resolution (a photo larger than it is cropped around the
   face, then resized: regions.fit_reference), encodes it with the VAE once (at guider creation), noises it
   to t0 (671 on the 1000-step scale, converted to the model's own sigma), runs the model once per noise
   draw of the ensemble (averaged; Cancel is honoured and progress reported between draws) and reads the
   DIFT features at the feature point;
2. for each step with ``sigma > sigma(uT)`` returns the plain CFG prediction untouched (bit-identical);
3. for each step with ``sigma <= sigma(uT)``: after the plain CFG prediction, runs the positive
   conditioning once more through ComfyUI's own ``calc_cond_batch`` (ControlNet, hooks, other packs'
   patches all apply), on a grad-tracking copy of the network input, and *stops the forward at the
   feature point* (capture.py). Attention maps of the same forward give M_gen (Eq. 6). energy.py matches
   the features and returns the masked dE/dz, which is added to the CFG'd prediction (Eq. 11) and handed
   back to the sampler as ``denoised`` (``eps_guidance_to_denoised`` for discrete VP models,
   ``flow_guidance_to_denoised`` for CONST/flow models such as FLUX).

Why the network input: ComfyUI feeds an EPS UNet ``x / sqrt(sigma^2 + 1)``, which is exactly the paper's
z_t, so the gradient w.r.t. that tensor needs no chain rule; for CONST models the input is x itself,
which is what ``flow_guidance_to_denoised`` takes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from ...errors import FeaturePointError, RBGuidanceError
from ...face.types import check_finite, mask_batch, rgb_images
from ..patching import LAYER_KEY, WRAPPER_KEY, apply_injector, model_family
from ..run_state import record
from . import energy
from .capture import (CAPTURE_KEY, CAPTURE_WRAPPER_KEY, RBInjector, _AttnRecord, _Capture, _CaptureWrapper,
                      _FeatureReady, _identity_adapters, _StopAtOutputBlock)
from .feature_points import FEATURE_AUTO, mask_grid, resolve_feature_point
from .pivot import pivot_tokens
from .regions import box_mask, detect_and_fit, fit_reference, reference_size

log = logging.getLogger(__name__)

T0_DEFAULT = 671                       # DIFT/OmniPortrait reference noise level, 1000-step scale


@dataclass
class RBIdentity:
    """One identity: its reference image(s) and how its face region is found in each.

    ``reference``: IMAGE (N, H, W, C); several images are several photos of the same person (their
    reference points are pooled). ``reference_mask``: MASK (1 or N, H, W) = M_ref; None: detect the
    face with the face tools (``reference_mask_source``: 'auto' = landmark hull or box ellipse, 'box'
    = the detection box). Region in the generated image (first that is set): ``region_mask`` (MASK),
    ``region_box`` (x0, y0, x1, y1 as fractions), ``token_index`` (cross-attention of that prompt
    token), the next Pivot ID token of the positive conditioning (pivot.py: e_mix, the paper's way), ``adapter``
    (cross-attention of the k-th identity adapter on the model; None = next free).
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
    p: float = energy.P_STRENGTH
    u: float = energy.U_START
    t0: float = T0_DEFAULT
    feature_point: str = FEATURE_AUTO
    ensemble: int = 1
    ref_seed: int = 0
    gamma: int = energy.GAMMA
    alpha: float = energy.ALPHA
    beta: float = energy.BETA
    normalize_mask: bool = False      # min-max A_hat before beta (never-empty safety net, not the paper)
    match: str = "euclidean"          # Eq. 7 as written; "cosine": DIFT's matching
    reduction: str = "sum"            # Eq. 8 as written; "mean": p independent of the face size
    scale: float = 1.0                # multiplier on the Eq. 11 term (1 = paper)

    def validate(self):
        if self.match not in energy.MATCHES:
            raise RBGuidanceError(f"match must be one of {', '.join(energy.MATCHES)}, got {self.match!r}")
        if self.reduction not in energy.REDUCTIONS:
            raise RBGuidanceError(f"reduction must be one of {', '.join(energy.REDUCTIONS)}, got {self.reduction!r}")
        if not math.isfinite(self.p):
            raise RBGuidanceError(f"p must be a finite number, got {self.p}")
        if not 0.0 <= self.u <= 1.0:
            raise RBGuidanceError(f"u must be in [0, 1], got {self.u}")
        if not 0.0 < self.t0 < 1000.0:
            raise RBGuidanceError(f"t0 must be in (0, 1000), got {self.t0}")
        if self.ensemble < 1:
            raise RBGuidanceError(f"ensemble must be >= 1, got {self.ensemble}")


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
        self.reference_size = reference_size(model_family(model_patcher))   # see regions.fit_reference
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
        pivots = pivot_tokens(self.original_conds.get("positive"))   # e_mix tokens, one per person (pivot.py)
        self._sources = []
        for k, ident in enumerate(self.identities):
            who = f"identity {k + 1}"
            img = ident.reference
            if img is None or img.dim() != 4 or img.shape[0] == 0:
                raise RBGuidanceError(f"{who}: the reference must be an IMAGE batch with at least one image")
            img = rgb_images(img, f"{who}: reference", error=RBGuidanceError)
            n, h, w = img.shape[:3]
            if ident.reference_mask is not None:
                m = mask_batch(ident.reference_mask, f"{who}: reference_mask", RBGuidanceError)
                if m.shape[0] not in (1, n):
                    raise RBGuidanceError(f"{who}: {m.shape[0]} reference masks for {n} reference images")
                m = energy.resize_mask(m.float(), (h, w), threshold=0.5).expand(n, h, w)
                for i in range(n):
                    if not bool(m[i].any()):
                        raise RBGuidanceError(f"{who}: the reference mask of image {i + 1} is empty")
                # a phone photo is brought to the working resolution around the face before the VAE sees it
                img, m = fit_reference(img, m, self.reference_size)
            else:
                img, m = detect_and_fit(img, ident.reference_mask_source, who, self.reference_size)
            comfy.model_management.throw_exception_if_processing_interrupted()
            with torch.no_grad():   # callable outside ComfyUI's inference mode too
                lat = self.vae.encode(img)
            record("rb.reference_encoded", identity=k, shape=tuple(img.shape))
            want = getattr(self.model_patcher.model.latent_format, "latent_channels", lat.shape[1])
            if lat.shape[1] != want:
                raise RBGuidanceError(f"{who}: the VAE gives {lat.shape[1]}-channel latents but this model uses {want}: "
                                      "connect the VAE of this model's family")
            check_finite(lat, f"{who}: the VAE-encoded reference", "latent values", RBGuidanceError)
            # the region in the generated image
            if ident.region_mask is not None:
                rm = mask_batch(ident.region_mask, f"{who}: region_mask", RBGuidanceError)
                if not bool((rm > 0.5).any()):
                    raise RBGuidanceError(f"{who}: the region mask is empty (no pixel > 0.5)")
                src = None
            elif ident.region_box is not None:
                src = None
            elif ident.token_index is not None:
                src = ("token", int(ident.token_index))
            elif ident.adapter is None and pivots:
                src = ("token", pivots.pop(0), "pivot")
            else:
                a = ident.adapter if ident.adapter is not None else free_adapter
                if a >= len(adapters):
                    raise RBGuidanceError(
                        f"{who} has no region: connect a region mask or box, set a token index / class word, encode "
                        "the prompt with 'Pivot ID Text Encode (IDP)', or apply an identity adapter (Omni-ID) to the "
                        f"model first (it carries {len(adapters)})")
                src = ("adapter", a)
                free_adapter = a + 1
            self._sources.append(src)
            refs.append((lat, m))
        self._refs = refs
        return refs

    def sample(self, *args, **kwargs):
        self.prepare_references()
        # what a run records (its steps, the last M_gen for the mask preview) starts empty in every run
        self.trace, self.last_gen_masks = [], None
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
                what = (f"the Pivot ID token {src[1]}" if src[-1] == "pivot" else f"token {src[1]}" if src[0] == "token"
                        else f"identity adapter {src[1] + 1}")
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
        # one forward per noise draw: bounded memory, and Cancel and the progress bar work during a long ensemble
        total, done = len(self._refs) * s.ensemble, 0
        pbar = comfy.utils.ProgressBar(total)
        for k, (lat, m) in enumerate(self._refs):
            latent = self.inner_model.process_latent_in(lat.to(x.device, torch.float32))
            n = latent.shape[0]
            g = torch.Generator().manual_seed(int(s.ref_seed) + k)
            noise = torch.randn((s.ensemble,) + tuple(latent.shape), generator=g).to(x.device, latent.dtype)
            sig = torch.full((n,), sigma_t0, device=x.device)
            acc = None
            for e in range(s.ensemble):
                comfy.model_management.throw_exception_if_processing_interrupted()
                x_ref = ms.noise_scaling(sig, noise[e].clone(), latent)
                with torch.no_grad():
                    cap = self._forward(x_ref, sig, model_options, ref_conds, _Capture(self.point, n))
                acc = cap.features.float() if acc is None else acc + cap.features.float()
                done += 1
                record("rb.reference_draw", identity=k, draw=e)
                pbar.update_absolute(done, total)
            f = acc / s.ensemble   # (N, C, h, w): the ensemble mean
            mf = energy.resize_mask(m.to(f.device), f.shape[-2:])
            for i in range(n):
                if not bool(mf[i].any()):
                    raise RBGuidanceError(f"identity {k + 1}: the face in reference image {i + 1} is too small for the "
                                          f"{f.shape[-2]}x{f.shape[-1]} feature grid; use a larger face or reference")
            # several photos of one person: tile side by side, so their points form one reference pool
            feats.append(energy.IdentityGuide(ref_feat=torch.cat(list(f), dim=-1)[None],
                                          ref_mask=torch.cat(list(mf), dim=-1)[None], gen_mask=torch.zeros(1, 1, 1)))
        run["refs"] = feats
        log.info("RB-Guidance: reference features %s at %s (sigma_t0=%.4f, ensemble %d) for %d identities",
                 tuple(feats[0].ref_feat.shape), self.point.name, sigma_t0, s.ensemble, len(feats))
        return run

    def _capture_options(self, model_options: dict, cap: _Capture) -> dict:
        """Model options of our passes: the caller's, plus the patch layer of the RB clone and our hooks."""
        opts = comfy.model_patcher.create_model_options_clone(model_options)
        transformer_options = opts.setdefault("transformer_options", {})
        rb_model = self._run["rb_model"]
        rb_to = rb_model.model_options["transformer_options"]
        pr = transformer_options.setdefault("patches_replace", {})
        for name, slot in rb_to.get("patches_replace", {}).items():
            pr[name] = {**pr.get(name, {}), **slot}
        transformer_options[LAYER_KEY] = rb_to[LAYER_KEY]
        wrappers = transformer_options.setdefault("wrappers", {}).setdefault(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
        wrappers[WRAPPER_KEY] = list(rb_model.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL][WRAPPER_KEY])
        wrappers[CAPTURE_WRAPPER_KEY] = [_CaptureWrapper()]
        if not self.point.is_flux:
            patches = transformer_options.setdefault("patches", {})
            stop = _StopAtOutputBlock(self.point.output_index)
            patches["output_block_patch"] = list(patches.get("output_block_patch", [])) + [stop]
        transformer_options[CAPTURE_KEY] = cap
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
            return energy.flow_guidance_to_denoised(denoised, grad, timestep, s.scale)
        return energy.eps_guidance_to_denoised(denoised, grad, timestep, s.scale)

    def energy_gradient(self, x, timestep, model_options=None) -> Optional[energy.RBGradient]:
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
        capture = None
        try:
            with torch.inference_mode(False):
                z = ms.calculate_input(timestep, x).detach().clone().requires_grad_(True)
                capture = _Capture(self.point, b, z, record)
                with torch.no_grad():   # the capture wrapper turns grad on for the diffusion model only
                    cap = self._forward(x, timestep, model_options, self.conds["positive"], capture)
                gen_masks = self._gen_masks(record, b, tuple(x.shape[-2:]))
                fhw = tuple(cap.features.shape[-2:])
                for k, (src, gm) in enumerate(zip(self._sources, gen_masks)):
                    if src is None and not bool(energy.resize_mask(gm, fhw).any()):
                        raise RBGuidanceError(f"identity {k + 1}: the region covers no cell of the {fhw[0]}x{fhw[1]} "
                                              "feature grid; draw a larger region")
                guides = [energy.IdentityGuide(ref.ref_feat.to(z.device), ref.ref_mask.to(z.device), gm.to(z.device))
                          for ref, gm in zip(run["refs"], gen_masks)]
                with torch.enable_grad():
                    res = energy.rb_energy_grad_from_features(z, cap.features, guides, p=s.p, match=s.match,
                                                              reduction=s.reduction)
        finally:   # the graph of this step is done with, backpropagated or not (GradPass.release)
            if capture is not None and capture.grad_pass is not None:
                capture.grad_pass.release()
        if not bool(torch.isfinite(res.grad).all()):
            raise RBGuidanceError(
                f"the guidance gradient at sigma {float(timestep.flatten()[0]):.4g} is NaN or infinite (the energy is "
                f"{res.energy.flatten().tolist()}): sampling stopped instead of writing NaN into the latent. Lower p, "
                "use fp32/bf16 weights instead of fp16, or check the model and references for NaN values")
        self.last_gen_masks = [gm.detach().cpu() for gm in gen_masks]
        self.trace.append(StepTrace(float(timestep.flatten()[0]), True, res.energy.cpu(), res.s_hat.cpu(), res.valid.cpu(),
                                    [int(energy.resize_mask(gm, fhw)[0].sum()) for gm in gen_masks],
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
                refined = energy.refine_mask(cross, gamma=s.gamma, alpha=s.alpha)
                a_hat = energy.propagate_by_self_attention(refined, record.qk) if record.qk else refined
                if s.normalize_mask:
                    a_hat = energy.minmax_normalize(a_hat)
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
        ms = [energy.resize_mask(m if m.dim() == 3 else m[None], (h, w), threshold=0.5) for m in self.last_gen_masks]
        bmax = max(m.shape[0] for m in ms)
        return torch.stack([m.expand(bmax, h, w) for m in ms]).amax(0)


def guided_sigma_window(model, u: float) -> float:
    """Largest sigma that is guided for ``u`` (steps with sigma above it run plain CFG)."""
    return float(model.get_model_object("model_sampling").percent_to_sigma(1.0 - u))
