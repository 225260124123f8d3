"""FlashFace's guidance (released ``ContextGaussianDiffusion.denoise``) and the two ways ComfyUI samples with it.

While t > launch: two-way CFG with λ_before in both rows. Once t ≤ launch: three rows [cond λ_feat, cond λ=0,
uncond λ=0] and ``u + g(y−u) + c(y_ref−y)`` (``three_way``), then CFG rescale on the ε prediction. With c = λ_ref = 0
the released code takes its two-way branch after launch too, with λ_feat in both rows (the references stay on).

* MODEL path (KSampler, or any guider that runs ComfyUI's CFG): the injector's CALC_COND_BATCH wrapper
  (``ReferenceRowBatch``) adds the cond-with-reference row as a third condition chunk, so ComfyUI batches,
  splits and area-handles it like any cond; the injector's pre-CFG step forms the result and hands it on as a
  cond/uncond pair ComfyUI's CFG turns into it (``as_cfg_pair``); other nodes' post-CFG functions still run.
* GUIDER path: ``FlashFaceGuider``, a CFGGuider whose ``predict_noise`` runs the rows in one ``calc_cond_batch``
  and combines them itself (the style of core's Guider_PerpNeg), then runs the post-CFG functions.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Optional

import torch

import comfy.model_sampling
import comfy.samplers

from ...errors import FlashFaceError
from ..patching import options_transformer_options
from ..rows import COND, with_layout
from ..run_state import RUN_KEY

RELEASED = types.MappingProxyType(dict(lambda_feat=1.2, lambda_ref=3.2, cfg=7.5, launch=750.0, lambda_before=0.85,
                                       rescale=0.5, num_refs=4, face_size=224, steps=25,
                                       box=(0.3, 0.1, 0.6, 0.4), sampler="ddim", scheduler="simple"))
# Training-free defaults: the paper's λ_feat/λ_ref; the paper applies its Eq. 3 at every step (no launch).
TRAINING_FREE = types.MappingProxyType(dict(lambda_feat=0.85, lambda_ref=2.0, launch=1000.0, lambda_before=0.85,
                                            rescale=0.0))
REF_LABEL = 2                                # chunk label of the cond-with-reference row
REF_ROW = ((REF_LABEL, COND, "ref"),)        # its row layout entry: a COND chunk of branch "ref"


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
    buf = next(model_sampling.buffers(), None)   # the schedule lives where the model does
    t = torch.tensor([float(sigma)], device=buf.device if buf is not None else "cpu")
    return float(model_sampling.timestep(t).flatten()[0])


def rescale_cfg(final: torch.Tensor, y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, r: float) -> torch.Tensor:
    """CFG rescale (arXiv:2305.08891) as the released code does it, on the ε (flow: velocity) prediction:
    ``ε_out *= r·std(ε_y)/(std(ε_out)+1e-12) + (1−r)``; inputs and output are ComfyUI denoised tensors."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    eps_out, eps_y = (x - final) / s, (x - y) / s
    ratio = eps_y.flatten(1).std(dim=1) / (eps_out.flatten(1).std(dim=1) + 1e-12)
    eps_out = eps_out * (r * ratio.view(-1, *([1] * (x.ndim - 1))) + (1.0 - r))
    return x - s * eps_out


def three_way(y: torch.Tensor, u: torch.Tensor, y_ref: Optional[torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
              cond_scale: float, guidance: Guidance) -> torch.Tensor:
    """``u + g(y−u) + c(y_ref−y)`` (no reference row: plain CFG), then CFG rescale against y; denoised tensors."""
    final = u + cond_scale * (y - u)
    if y_ref is not None:
        final = final + guidance.lambda_ref * (y_ref - y)
    if guidance.rescale > 0.0:
        final = rescale_cfg(final, y, x, sigma, guidance.rescale)
    return final


def as_cfg_pair(final: torch.Tensor, u: torch.Tensor, cond_scale: float) -> list:
    """A (cond, uncond) pair that ComfyUI's CFG ``u + g(c − u)`` turns into ``final``."""
    if cond_scale == 0.0:
        return [final, final]
    return [u + (final - u) / cond_scale, u]


def with_reference_row(model_options: dict) -> dict:
    """Model options whose row layout names chunk 2 the cond-with-reference row."""
    return with_layout(model_options, chunks=REF_ROW)


def _injector_state(injector, model_options):
    run = options_transformer_options(model_options).get(RUN_KEY)
    return run.of(injector) if run is not None else None


class ReferenceRowBatch:
    """CALC_COND_BATCH wrapper of the MODEL path: in the three-way phase, the cond-with-reference row is run as a
    third condition chunk; its output waits in the run state for the injector's pre-CFG step."""

    def __init__(self, injector):
        self.injector = injector

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        inj = self.injector
        state = _injector_state(inj, model_options)
        sigma = float(timestep.flatten()[0])
        # FlashFaceGuider asks for the three rows itself (three conds): nothing to add then
        if state is None or len(conds) != 2 or conds[0] is None or not inj.needs_ref_branch(state, sigma):
            return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
        ref_cond = [dict(c) for c in conds[0]]
        out = executor(model, [conds[0], conds[1], ref_cond], x_in, timestep, with_reference_row(model_options),
                       *args, **kwargs)
        state.ref_out = (sigma, out[2])
        return out[:2]


def take_reference_output(state, sigma: float, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The reference row ReferenceRowBatch computed for this step (once), or None."""
    got = state.ref_out if state is not None else None
    if state is not None:
        state.ref_out = None
    if got is None or got[0] != sigma or got[1].shape != like.shape:
        return None
    return got[1]


def pre_cfg(injector, args) -> list:
    """The MODEL path's pre-CFG step (``args`` as ComfyUI passes them)."""
    out = list(args["conds_out"])
    g = float(args["cond_scale"])
    sigma = args["sigma"]
    y_ref = take_reference_output(_injector_state(injector, args.get("model_options")), float(sigma.flatten()[0]),
                                  out[0])
    if y_ref is None and injector.guidance.rescale == 0.0:
        return out   # plain two-way CFG: exactly ComfyUI's
    final = three_way(out[0], out[1], y_ref, args["input"], sigma, g, injector.guidance)
    return as_cfg_pair(final, out[1], g) + out[2:]


class FlashFaceGuider(comfy.samplers.CFGGuider):
    """The GUIDER path: FlashFace's guidance as a CFGGuider on a MODEL patched with FlashFace reference attention."""

    def __init__(self, model_patcher, injector):
        super().__init__(model_patcher)
        self.injector = injector

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        inj = self.injector
        positive, negative = self.conds.get("positive"), self.conds.get("negative")
        state = _injector_state(inj, model_options)
        sigma = float(timestep.flatten()[0])
        ref = positive is not None and state is not None and inj.needs_ref_branch(state, sigma)
        conds = [positive, negative] + ([positive] if ref else [])
        opts = with_reference_row(model_options) if ref else model_options
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, opts)
        y, u = out[0], out[1]
        final = three_way(y, u, out[2] if ref else None, x, timestep, self.cfg, inj.guidance)
        for fn in model_options.get("sampler_post_cfg_function", []):
            final = fn({"denoised": final, "cond": positive, "uncond": negative, "cond_scale": self.cfg,
                        "model": self.inner_model, "uncond_denoised": u, "cond_denoised": y, "sigma": timestep,
                        "model_options": model_options, "input": x})
        return final
