"""Pivot ID encoder trainer (OmniPortrait Sec. 3.2, Eq. 5) on the shared loop, SD1.5/SDXL bases.

The frozen base model's prompt is "photo of a <class word>." (``base.prompt``; the class word must be in
it, ``pivot.class_word``). Per sample, the reference image's projected CLIP embedding e_ref (the trunk's
``image_embeds``) and the text embedding e_txt at the class word give e_mix = Linear([e_ref; e_txt])
(``omni_encoder.pivot_id.PivotIDEncoder``), which replaces that token. Loss:

    L = L_diff + L_loc,   L_diff = || ε_θ(x_t, t, c(e_mix)) - ε ||^2  on a target image of the identity,
    L_loc = face_localization_loss(A(e_mix), M)   (η = 2e-3 inside, Eq. 5)

A(e_mix) is the cross-attention probability of the e_mix token, averaged over heads and the
cross-attention layers whose token grid is ``pivot.loc_grid`` (16 x 16 on SD1.5 at 512 px), read by an
``attn2`` hook of the patching layer from the layer's own projected queries and keys. Trained: the
PivotIDEncoder layer and (when ``trunk.trainable``) the CLIP trunk; the denoiser stays frozen.
Export: ``export/pivot_id.safetensors`` (``proj.weight``, ``proj.bias``; metadata: dims, class word,
base family).
"""
from __future__ import annotations

import logging
import math
import os

import torch
from safetensors.torch import save_file
from torch import nn

import comfy.patcher_extension

from ...guidance.differentiable import GradPass
from ...guidance.patching import Injector, apply_injector
from ..pivot_id import PivotIDEncoder, face_localization_loss, find_token_indices
from .flow import STREAM_NOISE, STREAM_T, _Capture, load_base, stream
from .stage import Stage
from .trunk import ensure_trainable_tensors
from ...errors import TrainingError

log = logging.getLogger(__name__)


class TokenAttentionProbe(Injector):
    """Records the cross-attention probability map of one prompt token at a chosen token grid."""

    name = "pivot_probe"
    kinds = ("attn2",)

    def __init__(self, grid: int):
        super().__init__(apply_to="both")
        self.grid = int(grid)
        self.token_index = None
        self.maps: list = []

    def __deepcopy__(self, memo):
        return self

    def attn2(self, ctx, out, **kwargs):
        if self.token_index is None or ctx.k is None:
            return out
        h, w = ctx.grid()
        if (h, w) != (self.grid, self.grid):
            return out
        b, lq, inner = ctx.q.shape
        heads = ctx.n_heads
        d = inner // heads
        q = ctx.q.view(b, lq, heads, d).transpose(1, 2)
        k = ctx.k.view(b, -1, heads, d).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1)      # (B, heads, Lq, Lk)
        idx = self.token_index.to(probs.device).view(b, 1, 1, 1).expand(b, heads, lq, 1)
        self.maps.append(probs.gather(-1, idx)[..., 0].mean(1).view(b, h, w))
        return out


class PivotStage(nn.Module):
    def __init__(self, encoder: PivotIDEncoder, trunk: nn.Module, patcher, vae, clip, cfg, device):
        super().__init__()
        self.encoder, self.trunk = encoder, trunk
        self.cfg = cfg
        base = patcher.model
        from ...guidance.patching import model_family
        self.family = model_family(patcher)
        if self.family not in ("sd15", "sdxl"):
            raise TrainingError(f"the Pivot ID trainer needs an SD1.5/SDXL base, got {self.family}")
        ensure_trainable_tensors(base)
        base.requires_grad_(False)
        base.eval()
        base.to(device)
        self.device = device
        self.probe = TokenAttentionProbe(cfg.pivot.loc_grid)
        patched = apply_injector(patcher, self.probe)
        self.capture = _Capture()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "idportrait_pivot", self.capture)
        self.__dict__["patched"] = patched
        self.__dict__["vae"] = vae
        prompt = cfg.base.prompt
        tokens = clip.tokenize(prompt)
        key = "l" if "l" in tokens else next(iter(tokens))
        word = clip.tokenize(cfg.pivot.class_word)[key][0][1][0]
        ids = torch.tensor([[t[0] for t in tokens[key][0]]])
        self.token_index = int(find_token_indices(ids, word)[0])
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        self.cond = cond.detach().float().cpu().clone()
        self.pooled = None if pooled is None else pooled.detach().float().cpu().clone()
        self.resolution = cfg.target_resolution

    def forward(self, batch: dict) -> dict:
        targets = batch["targets"][:, 0]        # one target image per identity
        face = batch["target_masks"][:, 0, 0]
        b = targets.shape[0]
        ref = batch["inputs"][:, 0]
        e_ref = self.trunk.image_embeds(ref) if any(p.requires_grad for p in self.trunk.parameters()) else \
            torch.no_grad()(self.trunk.image_embeds)(ref)
        cond = self.cond.to(self.device).repeat(b, 1, 1)
        idx = torch.full((b,), self.token_index, dtype=torch.long, device=self.device)
        cond, _ = self.encoder.inject(cond, idx, e_ref)
        patched = self.patched
        model = patched.model
        with torch.no_grad():
            z = self.vae.encode(targets.movedim(1, -1).float().cpu())
            x0 = model.process_latent_in(z.to(self.device).float())
        ms = model.model_sampling
        noise, sig = [], []
        for s in batch["seeds"].tolist():
            noise.append(torch.randn(x0.shape[1:], generator=stream(s, STREAM_NOISE)))
            sig.append(ms.sigmas[torch.randint(0, len(ms.sigmas), (1,), generator=stream(s, STREAM_T))].cpu())
        noise = torch.stack(noise).to(self.device)
        sigma = torch.cat(sig).float().to(self.device)
        x_t = ms.noise_scaling(sigma, noise, x0)
        kw = {"cross_attn": cond, "noise": x_t, "device": self.device, "width": self.resolution,
              "height": self.resolution, "target_width": self.resolution, "target_height": self.resolution,
              "crop_w": 0, "crop_h": 0}
        if self.pooled is not None:
            kw["pooled_output"] = self.pooled.to(self.device).repeat(b, 1)
        conds = {k: v.process_cond(batch_size=b, device=self.device, area=None).cond
                 for k, v in model.extra_conds(**kw).items()}
        conds["c_crossattn"] = cond       # keep the graph to e_mix (extra_conds may copy)
        transformer_options = dict(patched.model_options.get("transformer_options", {}))
        transformer_options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patched.wrappers)
        transformer_options["sigmas"] = sigma
        transformer_options["cond_or_uncond"] = [0]
        self.probe.maps, self.probe.token_index = [], idx
        try:
            with GradPass(weight_grads=True):
                model.apply_model(x_t, sigma, transformer_options=transformer_options, **conds)
            eps = self.capture.out.float()
            maps = list(self.probe.maps)
        finally:
            self.probe.maps, self.probe.token_index, self.capture.out = [], None, None
        l_diff = ((eps - noise) ** 2).flatten(1).mean(1)
        if not maps:
            raise TrainingError(f"no cross-attention layer has a {self.cfg.pivot.loc_grid}x{self.cfg.pivot.loc_grid} "
                             "token grid at this resolution; set pivot.loc_grid to one the model has")
        a = torch.stack(maps, 1)                                 # (B, layers, h, w)
        l_loc = face_localization_loss(a.float(), face.float(), eta=self.cfg.pivot.eta)
        return {"loss": l_diff.mean() + l_loc, "per_sample": l_diff.detach(), "loc": l_loc.detach()}


def build_pivot_stage(cfg, device, trunk, _encoder):
    if trunk is None:
        raise TrainingError("the Pivot ID trainer needs a CLIP trunk for e_ref (trunk.kind)")
    patcher, clip, vae = load_base(cfg.base, device)
    text_dim = None
    tokens = clip.tokenize(cfg.base.prompt)
    cond, _ = clip.encode_from_tokens(tokens, return_pooled=True)
    text_dim = int(cond.shape[-1])
    image_dim = cfg.pivot.image_dim or trunk.projection_dim
    encoder = PivotIDEncoder(image_dim, text_dim)
    module = PivotStage(encoder, trunk, patcher, vae, clip, cfg, device)
    return Stage(module, encoder, trunk, None, module.family, (f"pivot token index {module.token_index}",))


def export_pivot(path: str, stage, extra: dict) -> str:
    enc = stage.encoder
    md = {str(k): str(v) for k, v in extra.items()}
    md.update({"format": "pivot_id", "format_version": "1", "image_dim": str(enc.image_dim),
               "text_dim": str(enc.text_dim), "base_family": stage.family,
               "class_word": stage.module.cfg.pivot.class_word})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in enc.state_dict().items()}, path, metadata=md)
    return path
