"""Stage 2: the flow-matching decoder (Eq. 6-7) and the adapter-only trainer, on ComfyUI's own models.

The decoder V is a frozen ComfyUI base model (FLUX, SD1.5, SDXL; the tiny stand-ins in tests) patched
with this pack's own injection (``guidance.ip_adapter.IdentityInjector`` through
``guidance.patching.apply_injector``), so training exercises exactly the attention code the Omni-ID
nodes run at sampling time. What is trained: the identity encoder (+ the CLIP trunk when trainable)
and the decoupled-attention projections (``FluxIdentityAdapter`` / ``SDIdentityAdapter``); the base
model's weights never receive gradients, but gradients flow through its activations.

Losses, on latents x of the targets X^r (VAE, ``process_latent_in``), per-target noise ε ~ N(0, I):

* FLUX (``CONST`` model sampling, rectified flow): t ~ U(0, 1), x_t = (1 - t) x + t ε, and
  L = || V(x_t, t, y, ℓ) - (ε - x) ||^2 with V the raw diffusion-model output (Eq. 6-7);
* SD1.5/SDXL (``EPS``): a timestep uniform over the 1000 training steps, x_t = x + σ ε (ComfyUI's
  sigma parameterisation of the DDPM forward process), L = || ε_θ(x_t, t, y, ℓ) - ε ||^2.

y is the fixed prompt "photo of a person." encoded once by the base model's own text encoder. The raw
model output is read by a ``DIFFUSION_MODEL`` wrapper around ComfyUI's ``apply_model`` (which prepares
the inputs: scaling, timestep, dtype, conditioning), so no part of ComfyUI's forward is copied.

Adapter-only training (appendix A.1 baselines: CLIP, ArcFace, ArcFace+CLIP) is the same loop with a
frozen trunk and the baseline encoder (``encoder.encoder_type``); their parameters (the ArcFace
projection, the ArcFace+CLIP transformer) train with the projections.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import comfy.model_sampling
import comfy.patcher_extension

from ...guidance import ip_adapter
from ...guidance.differentiable import GradPass
from ...guidance.patching import apply_injector, unet_attention_module
from .data import first_identity, generator, sample_seed
from .trunk import checkpoint_modules, ensure_trainable_tensors
from ...errors import TrainingError

log = logging.getLogger(__name__)

CAPTURE_KEY = "idportrait_train_capture"
DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Seed streams: every per-sample random draw of the trainer uses its own stream of the sample's seed.
STREAM_NOISE, STREAM_T, STREAM_DROP, STREAM_MASK = 11, 12, 13, 14


def stream(seed: int, kind: int, k: int = 0) -> torch.Generator:
    return generator(sample_seed(int(seed), kind, k))


# ---------------------------------------------------------------------------------------------------
# Identity encoding shared by every trainer


class IdentityEncoding(nn.Module):
    """Trunk (optional) + identity encoder: inputs X^s (B, S, 3, h, w) -> identity tokens ℓ (B, L, C).

    ``arcface_fn``: images (n, 3, h, w) -> (n, 512) embeddings (insightface in real runs, a deterministic
    function in tests) for the arcface / arcface_clip encoders. The trunk runs on the real images only;
    padded slots of the batch are masked.
    """

    def __init__(self, encoder: nn.Module, trunk: Optional[nn.Module] = None,
                 arcface_fn: Optional[Callable] = None):
        super().__init__()
        self.encoder = encoder
        self.trunk = trunk
        self.arcface_fn = arcface_fn
        if encoder.uses_clip and trunk is None:
            raise TrainingError(f"the {encoder.encoder_type} encoder needs a CLIP trunk (trunk.kind)")
        if encoder.uses_arcface and arcface_fn is None:
            raise TrainingError(f"the {encoder.encoder_type} encoder needs ArcFace embeddings: pass arcface_fn "
                             "(insightface, see omni_encoder/train/faces.py)")

    @property
    def trunk_trainable(self) -> bool:
        return self.trunk is not None and any(p.requires_grad for p in self.trunk.parameters())

    def per_image(self, fn, inputs, mask, grad: bool):
        real = inputs[mask]
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = fn(real)
        full = out.new_zeros((*mask.shape, *out.shape[1:]))
        full[mask] = out
        return full

    def forward(self, inputs: torch.Tensor, input_mask: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(tokens (B, L, C), token mask (B, L) bool or None)."""
        kw = {}
        if self.encoder.uses_clip:
            kw["clip_tokens"] = self.per_image(self.trunk, inputs, input_mask, self.trunk_trainable)
        if self.encoder.uses_arcface:
            kw["arcface"] = self.per_image(lambda x: self.arcface_fn(x).float(), inputs, input_mask, False)
        mask = None if bool(input_mask.all()) else input_mask
        return self.encoder.encode(mask=mask, **kw)


# ---------------------------------------------------------------------------------------------------
# Injection with gradients


def adapter_kv(adapter: nn.Module, family: str, tokens: torch.Tensor) -> dict:
    """Keys/values of identity tokens (B, T, C) for every injection site, with gradients.

    FLUX: ``{"double_i"/"single_i": (K, V)}``; SD: ``{"input_4_0": (K, V), ...}`` (ip_adapter.sd_key_name).
    """
    if family == "flux":
        return {name: (blk.to_k_ip(tokens), blk.to_v_ip(tokens)) for name, blk in adapter.blocks.items()}
    c_ip = adapter.image_proj(tokens)
    return {name: (layer.to_k_ip(c_ip), layer.to_v_ip(c_ip)) for name, layer in adapter.attn2.items()}


class TrainableIdentityInjector(ip_adapter.IdentityInjector):
    """``IdentityInjector`` whose keys/values come from the training step (with gradients).

    The nodes' injector computes K/V from fixed tokens under ``no_grad`` and caches them per sampling
    run; here the step sets them (one row per latent of the batch) before calling the model. The
    attention math is the parent's: with no key mask, its own ``attn2`` / ``_flux_ip`` run unchanged;
    a key mask (CLIP baseline, padded images) switches to the same attention with masked keys.
    """

    name = "identity_train"

    def __init__(self, adapter: nn.Module, family: str):
        placeholder = torch.zeros(1, 1, ip_adapter.adapter_token_width(adapter) or 1)   # the step supplies K/V
        super().__init__(adapter, placeholder, family, weight=1.0, apply_to="both")
        self.train_kv: dict = {}
        self.key_mask: Optional[torch.Tensor] = None

    def set_identity(self, kv: dict, key_mask: Optional[torch.Tensor] = None) -> None:
        self.train_kv, self.key_mask = kv, key_mask

    def _lookup(self, name: str, like: torch.Tensor):
        if name not in self.train_kv:
            raise RuntimeError(f"no identity keys/values for injection site {name}: call set_identity first")
        k, v = self.train_kv[name]
        return k.to(like.dtype), v.to(like.dtype)

    def sd_kv(self, key, like, run=None):
        return self._lookup(ip_adapter.sd_key_name(key), like)

    def flux_kv(self, name, like, run=None):
        return self._lookup(name, like)

    def attn2(self, ctx, out, **kwargs):
        if self.key_mask is None:
            return super().attn2(ctx, out, **kwargs)
        k_ip, v_ip = self.sd_kv(ctx.key, ctx.q)
        b, lq, inner = ctx.q.shape
        h = ctx.n_heads
        q = ctx.q.view(b, lq, h, -1).transpose(1, 2)
        k = ip_adapter._rows_batch(k_ip, b).view(b, -1, h, inner // h).transpose(1, 2)
        v = ip_adapter._rows_batch(v_ip, b).view(b, -1, h, inner // h).transpose(1, 2)
        m = ip_adapter._rows_batch(self.key_mask[:, :, None], b)[:, None, None, :, 0]
        ip = F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(b, lq, inner)
        return out + self.weight * self._masked(ctx, ip)

    def _flux_ip(self, ctx, q, heads):
        if self.key_mask is None:
            return super()._flux_ip(ctx, q, heads)
        k_ip, v_ip = self.flux_kv(f"{ctx.kind}_{ctx.key[1]}", q)
        b, h, lq, d = q.shape
        k = ip_adapter._rows_batch(k_ip, b).view(b, -1, h, d).transpose(1, 2)
        v = ip_adapter._rows_batch(v_ip, b).view(b, -1, h, d).transpose(1, 2)
        m = ip_adapter._rows_batch(self.key_mask[:, :, None], b)[:, None, None, :, 0]
        ip = F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(b, lq, h * d)
        return self.weight * self._masked(ctx, ip)


def build_adapter(family: str, diffusion_model, token_dim: int, init: str = "zero_v") -> nn.Module:
    """Fresh projections for a base model.

    FLUX: per block K/V Linear(token_dim -> hidden); with ``zero_v`` the V projections start at zero,
    so the untrained adapter adds nothing (the base model's behaviour is the starting point).
    SD: IP-Adapter's layout and init (to_k_ip / to_v_ip copied from each layer's text to_k / to_v).
    """
    dm = diffusion_model
    if family == "flux":
        ad = ip_adapter.FluxIdentityAdapter(token_dim, dm.hidden_size, len(dm.double_blocks), len(dm.single_blocks))
        if init == "zero_v":
            with torch.no_grad():
                for blk in ad.blocks.values():
                    blk.to_v_ip.weight.zero_()
                    blk.to_v_ip.bias.zero_()
        return ad
    inner = ip_adapter.SDIdentityAdapter.inner_dims_of(dm)
    ctx_dim = unet_attention_module(dm, next(iter(inner)), "attn2").to_k.weight.shape[1]
    ad = ip_adapter.SDIdentityAdapter(token_dim, ctx_dim, inner)
    with torch.no_grad():
        for key in inner:
            attn = unet_attention_module(dm, key, "attn2")
            layer = ad.attn2[ip_adapter.sd_key_name(key)]
            layer.to_k_ip.weight.copy_(attn.to_k.weight.detach().float())
            layer.to_v_ip.weight.copy_(attn.to_v.weight.detach().float())
    return ad


def adapter_proj_state(adapter: nn.Module, family: str) -> dict:
    """The ``proj.*`` tensors of the weight file (prefix not included)."""
    return adapter.state_dict_flat() if family == "flux" else adapter.state_dict()


# ---------------------------------------------------------------------------------------------------
# Frozen base model


def load_base(cfg, device=None):
    """(ModelPatcher, CLIP, VAE) of the configured base: ComfyUI files, or the tiny stand-ins."""
    if cfg.kind == "tiny":
        from ...stand_ins import models as tm
        return tm.tiny_model(cfg.family, cfg.seed), tm.tiny_clip(cfg.seed), tm.tiny_vae(cfg.family, cfg.seed)
    import comfy.sd
    import comfy.utils
    dtype = DTYPES[cfg.weight_dtype]
    model_options = {"dtype": dtype} if dtype is not None else {}
    if cfg.family == "flux":
        if not (cfg.unet and cfg.clip and cfg.vae):
            raise TrainingError("a FLUX base needs base.unet (flux1-dev), base.clip [clip_l, t5xxl] and base.vae (ae)")
        model = comfy.sd.load_diffusion_model(cfg.unet, model_options=model_options)
        clip = comfy.sd.load_clip(list(cfg.clip), clip_type=comfy.sd.CLIPType.FLUX)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(cfg.vae))
        return model, clip, vae
    if not cfg.checkpoint:
        raise TrainingError(f"an {cfg.family} base needs base.checkpoint (a full checkpoint with CLIP and VAE)")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(cfg.checkpoint, output_vae=True, output_clip=True,
                                                                model_options=model_options)
    if cfg.vae:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(cfg.vae))
    return model, clip, vae


class _Capture:
    """DIFFUSION_MODEL wrapper keeping the raw output of the last model call (with its graph)."""

    def __init__(self):
        self.out = None

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        self.out = executor(*args, **kwargs)
        return self.out


class DiffusionDecoder:
    """The frozen base model, patched with a ``TrainableIdentityInjector``; not an nn.Module on purpose
    (its weights are neither trained, nor broadcast, nor saved by the trainer)."""

    def __init__(self, patcher, clip, vae, family: str, adapter: nn.Module, cfg, device: torch.device,
                 resolution: int, checkpointing: bool = False, prompt_cond: Optional[dict] = None):
        from ...guidance.patching import model_family
        got = model_family(patcher)
        if got != family:
            raise TrainingError(f"base.family is {family} but the loaded model is {got}")
        self.family, self.cfg, self.device = family, cfg, device
        self.patcher, self.vae = patcher, vae
        base = patcher.model
        self.inference_tensors_fixed = ensure_trainable_tensors(base)
        base.requires_grad_(False)
        base.eval()
        base.to(device)
        if vae is not None:
            ensure_trainable_tensors(vae.first_stage_model)
            vae.first_stage_model.requires_grad_(False)
        self.sampling = base.model_sampling
        if isinstance(self.sampling, comfy.model_sampling.CONST):
            self.prediction = "flow"
        elif isinstance(self.sampling, (comfy.model_sampling.V_PREDICTION, comfy.model_sampling.X0)):
            raise TrainingError(f"{type(self.sampling).__name__} models are not supported by the trainer (EPS or flow only)")
        elif isinstance(self.sampling, comfy.model_sampling.EPS):
            self.prediction = "eps"
        else:
            raise TrainingError(f"unsupported model sampling {type(self.sampling).__name__}")
        self.injector = TrainableIdentityInjector(adapter, family)
        self.patched = apply_injector(patcher, self.injector)
        self.capture = _Capture()
        self.patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CAPTURE_KEY, self.capture)
        self.resolution = int(resolution)
        self.latent_cache: dict = {}
        if clip is None:   # conditioning given directly ({"cross_attn": (1, T, C), "pooled": (1, D) or None})
            if prompt_cond is None:
                raise TrainingError("DiffusionDecoder needs a text encoder (clip) or prompt_cond")
            self.cond, self.empty = prompt_cond, None
        else:
            self.cond = self._encode_prompt(clip, cfg.prompt)
            self.empty = self._encode_prompt(clip, "") if cfg.text_drop > 0 else None
        if checkpointing:
            n = checkpoint_modules(base_blocks(base.diffusion_model, family), inplace=family == "flux")
            log.info("gradient checkpointing on %d blocks of the base model", n)

    def _encode_prompt(self, clip, text: str) -> dict:
        tokens = clip.tokenize(text)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return {"cross_attn": cond.detach().float().cpu().clone(),
                "pooled": None if pooled is None else pooled.detach().float().cpu().clone()}

    def _conds(self, prompt: dict, x: torch.Tensor) -> dict:
        kw = {"cross_attn": prompt["cross_attn"], "noise": x, "device": self.device,
              "width": self.resolution, "height": self.resolution, "target_width": self.resolution,
              "target_height": self.resolution, "crop_w": 0, "crop_h": 0}
        if prompt["pooled"] is not None:
            kw["pooled_output"] = prompt["pooled"]
        if self.family == "flux":
            kw["guidance"] = self.cfg.guidance
        conds = self.patched.model.extra_conds(**kw)
        return {k: v.process_cond(batch_size=x.shape[0], device=self.device, area=None).cond.to(self.device)
                for k, v in conds.items()}

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, keys=None) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> latents as the diffusion model sees them (process_latent_in).

        With ``base.cache_latents`` and ``keys`` (one string per image naming its pixels), each image is
        encoded once per process and kept in memory (the VAE is frozen, so this changes nothing else).
        """
        if keys is not None and self.cfg.cache_latents:
            todo = [i for i, k in enumerate(keys) if k not in self.latent_cache]
            if todo:
                z = self._encode(images[todo])
                for i, zi in zip(todo, z):
                    self.latent_cache[keys[i]] = zi.cpu()
            return torch.stack([self.latent_cache[k] for k in keys]).to(self.device)
        return self._encode(images)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(images.movedim(1, -1).float().cpu())
        return self.patched.model.process_latent_in(z.to(self.device).float())

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.patched.model.process_latent_out(latents.float())
        return self.vae.decode(z.cpu()).movedim(-1, 1).float()

    def sample_sigmas(self, seeds: torch.Tensor, per: int) -> torch.Tensor:
        """One sigma per latent (len(seeds) * per), from each sample's t stream."""
        out = []
        for s in seeds.tolist():
            g = stream(s, STREAM_T)
            for _ in range(per):
                if self.prediction == "flow":
                    if self.cfg.timesteps == "logit_normal":
                        t = torch.sigmoid(torch.randn(1, generator=g))
                    else:
                        t = 1.0 - torch.rand(1, generator=g)    # (0, 1]: never the clean latent itself
                    out.append(t)
                else:
                    idx = torch.randint(0, len(self.sampling.sigmas), (1,), generator=g)
                    out.append(self.sampling.sigmas[idx].cpu())
        return torch.cat(out).float().to(self.device)

    def sample_noise(self, seeds: torch.Tensor, per: int, shape) -> torch.Tensor:
        out = []
        for s in seeds.tolist():
            g = stream(s, STREAM_NOISE)
            out.append(torch.randn((per, *shape), generator=g))
        return torch.cat(out).to(self.device)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.sampling.noise_scaling(sigma, noise, x0)

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0 if self.prediction == "flow" else noise

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, text_rows: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Raw diffusion-model output (velocity for flow, ε for EPS) for the injected identity."""
        conds = self._conds(self.cond, x_t)
        if text_rows is not None and self.empty is not None and bool(text_rows.any()):
            empty = self._conds(self.empty, x_t)
            for k in ("c_crossattn", "y"):
                if k in conds and k in empty and conds[k].shape == empty[k].shape:
                    sel = text_rows.to(self.device).view(-1, *([1] * (conds[k].ndim - 1)))
                    conds[k] = torch.where(sel, empty[k], conds[k])
        transformer_options = dict(self.patched.model_options.get("transformer_options", {}))
        transformer_options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(self.patched.wrappers)
        transformer_options["sigmas"] = sigma
        transformer_options["cond_or_uncond"] = [0]
        self.capture.out = None
        # ComfyUI's forward as it runs, differentiable: in-place updates, its kernels without a backward
        with GradPass(weight_grads=True):
            self.patched.model.apply_model(x_t, sigma, transformer_options=transformer_options, **conds)
        out = self.capture.out
        self.capture.out = None
        if out is None:
            raise RuntimeError("the diffusion model wrapper did not run: is another wrapper skipping the model call?")
        return out.float()


def base_blocks(diffusion_model, family: str) -> list:
    """The blocks of a ComfyUI diffusion model worth checkpointing."""
    if family == "flux":
        return list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks)
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    return [m for m in diffusion_model.modules() if isinstance(m, (BasicTransformerBlock, ResBlock))]


class FlowStage(nn.Module):
    """Encoder (+ trunk) + projections trained through the frozen base model (Eq. 6-7, or ε-loss for SD)."""

    def __init__(self, identity: IdentityEncoding, adapter: nn.Module, decoder: DiffusionDecoder,
                 id_drop: float = 0.0, text_drop: float = 0.0):
        super().__init__()
        self.identity = identity
        self.adapter = adapter
        self.__dict__["decoder"] = decoder     # not a submodule: frozen, never saved
        self.id_drop, self.text_drop = float(id_drop), float(text_drop)

    def drops(self, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, txt = [], []
        for s in seeds.tolist():
            u = torch.rand(2, generator=stream(s, STREAM_DROP))
            ids.append(bool(u[0] < self.id_drop))
            txt.append(bool(u[1] < self.text_drop))
        return torch.tensor(ids), torch.tensor(txt)

    def forward(self, batch: dict) -> dict:
        dec = self.decoder
        targets = batch["targets"]
        b, r = targets.shape[:2]
        tokens, key_mask = self.identity(batch["inputs"], batch["input_mask"])
        id_drop, text_drop = self.drops(batch["seeds"])
        if bool(id_drop.any()):
            tokens = tokens * (~id_drop).to(tokens.device, tokens.dtype).view(-1, 1, 1)
        x0 = dec.encode_latents(targets.flatten(0, 1), batch.get("target_keys"))
        noise = dec.sample_noise(batch["seeds"], r, x0.shape[1:])
        sigma = dec.sample_sigmas(batch["seeds"], r)
        x_t = dec.noisy(x0, noise, sigma)
        kv = {k: (kk.repeat_interleave(r, 0), vv.repeat_interleave(r, 0))
              for k, (kk, vv) in adapter_kv(self.adapter, dec.family, tokens).items()}
        dec.injector.set_identity(kv, None if key_mask is None else key_mask.repeat_interleave(r, 0))
        try:
            out = dec.predict(x_t, sigma, text_drop.repeat_interleave(r) if self.text_drop > 0 else None)
        finally:
            dec.injector.set_identity({}, None)
        err = (out - dec.target(x0, noise)) ** 2
        per_latent = err.flatten(1).mean(1)
        return {"loss": per_latent.mean(), "per_sample": per_latent.view(b, r).mean(1).detach(),
                "sigma": sigma.detach()}

    @torch.no_grad()
    def reconstruct(self, batch: dict, sigma_value: float = 0.6, max_targets: int = 4) -> list:
        """Rows [target, noised, one-step x̂0] for the first identity: the denoiser's view at one noise level."""
        dec = self.decoder
        one = first_identity(batch)
        targets = one["targets"][0, :max_targets]
        tokens, key_mask = self.identity(one["inputs"], one["input_mask"])
        x0 = dec.encode_latents(targets)
        n = x0.shape[0]
        noise = dec.sample_noise(one["seeds"], n, x0.shape[1:])
        if dec.prediction == "flow":
            sigma = torch.full((n,), sigma_value, device=dec.device)
        else:
            idx = int(sigma_value * (len(dec.sampling.sigmas) - 1))
            sigma = dec.sampling.sigmas[idx].to(dec.device).repeat(n)
        x_t = dec.noisy(x0, noise, sigma)
        kv = {k: (kk.repeat_interleave(n, 0), vv.repeat_interleave(n, 0))
              for k, (kk, vv) in adapter_kv(self.adapter, dec.family, tokens).items()}
        dec.injector.set_identity(kv, None if key_mask is None else key_mask.repeat_interleave(n, 0))
        try:
            out = dec.predict(x_t, sigma)
        finally:
            dec.injector.set_identity({}, None)
        s = sigma.view(-1, 1, 1, 1)
        x0_hat = x_t - s * out           # flow: x_t - t v; EPS (x_t = x0 + σ ε): x_t - σ ε
        imgs = dec.decode_latents(x0_hat)
        noised = dec.decode_latents(x_t if dec.prediction == "flow" else x_t / (1 + s ** 2) ** 0.5)
        return [[targets[i].cpu(), noised[i], imgs[i]] for i in range(n)]
