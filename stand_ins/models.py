"""Stand-in models built with ComfyUI's own classes: tiny SD1.5-, SDXL- and FLUX-shaped ones, and the full-size
architectures with random weights (benchmarks).

They let example workflows and tests run on a CPU in seconds, with no weight files. Every piece is a
real ComfyUI object (``comfy.supported_models`` configs → ``model_base`` → ``ModelPatcher``; a
``comfy.sd.CLIP`` around ComfyUI's SD1 CLIP text model; a ``comfy.sd.VAE`` around ComfyUI's
AutoencoderKL), only small and randomly initialised from a seed. So ``CLIPTextEncode``,
``KSampler``, ``VAEDecode``, ControlNet apply nodes, and every patch of this pack run on them
exactly as on real checkpoints. Outputs are noise-like images: stand-ins prove plumbing, not looks.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

import comfy.ldm.flux.model
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
from comfy import supported_models
from comfy.ldm.models.autoencoder import AutoencoderKL
from ..errors import InputError

log = logging.getLogger(__name__)

FAMILIES = ("sd15", "sdxl", "flux")
TEXT_WIDTH = 64          # tiny CLIP hidden size = UNet context dim = FLUX context/vec dims
SDXL_ADM_EXTRA = 6 * 256  # SDXL's size/crop embeddings appended to the pooled text vector


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Seeded init. comfy.ops layers are created with torch.empty, so they must be filled explicitly.

    Norm scales are set to 1 and norm biases to 0 so activations keep a sane scale through depth. Values are
    drawn where each parameter lives (one generator per device): full-size weights on a GPU never pass
    through the CPU; on the CPU the weights are those of every earlier run with the same seed.
    """
    gens = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm = "norm" in name.lower() or name.endswith(".scale")
            if p.ndim == 1 and is_norm and (name.endswith("weight") or name.endswith("scale")):
                p.fill_(1.0)
            elif p.ndim == 1 and is_norm:
                p.zero_()
            elif p.device.type == "cpu":
                g = gens.setdefault(p.device, torch.Generator().manual_seed(seed))
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).mul_(std))
    return module


def _unet_common(context_dim: int, model_channels: int) -> dict:
    return {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
            "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
            "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
            "context_dim": context_dim, "use_spatial_transformer": True, "legacy": False,
            "use_temporal_resblock": False, "use_temporal_attention": False, "use_checkpoint": False}


def model_config(family: str, in_channels: int | None = None):
    """The ComfyUI model config (``comfy.supported_models`` class instance) of a tiny model."""
    if family == "sd15":
        cfg = supported_models.SD15({**_unet_common(TEXT_WIDTH, 32), "use_linear_in_transformer": False,
                       "adm_in_channels": None})
    elif family == "sdxl":
        cfg = supported_models.SDXL({**_unet_common(TEXT_WIDTH, 32), "use_linear_in_transformer": True,
                       "adm_in_channels": TEXT_WIDTH + SDXL_ADM_EXTRA, "num_classes": "sequential"})
        cfg.unet_config["num_head_channels"] = 16   # SDXL's extra config forces 64 per head: too wide here
    elif family == "flux":
        hidden, heads = 64, 2
        pe = hidden // heads
        a = pe // 4
        cfg = flux_config({"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
                       "vec_in_dim": TEXT_WIDTH, "context_in_dim": TEXT_WIDTH, "hidden_size": hidden,
                       "mlp_ratio": 4.0, "num_heads": heads, "depth": 2, "depth_single_blocks": 2,
                       "axes_dim": [pe - 2 * a, a, a], "theta": 10000, "qkv_bias": True,
                       "guidance_embed": True})
    else:
        raise InputError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if in_channels is not None:
        cfg.unet_config["in_channels"] = in_channels
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def flux_config(config: dict):
    """ComfyUI's Flux model config; current ComfyUI requires ``txt_ids_dims`` (Flux.1: []), which 0.3.75's
    FluxParams does not accept."""
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in fields:
        config = {"txt_ids_dims": [], **config}
    return supported_models.Flux(config)


_FULL_UNET = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "use_spatial_transformer": True, "legacy": False,
              "image_size": 32, "use_temporal_attention": False, "use_temporal_resblock": False, "use_checkpoint": False}
FULL_SIZE = {   # the real architectures (SD1.5, SDXL base, FLUX.1-dev), for benchmarks with random weights
    "sd15": lambda: supported_models.SD15({**_FULL_UNET, "use_linear_in_transformer": False, "adm_in_channels": None,
                             "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
                             # ComfyUI pops this from the end: output_blocks 0-2 (lowest resolution) get none, 3-11 one each
                             "transformer_depth_output": [1] * 9 + [0] * 3, "context_dim": 768}),
    "sdxl": lambda: supported_models.SDXL({**_FULL_UNET, "use_linear_in_transformer": True, "adm_in_channels": 2816,
                             "num_classes": "sequential", "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "context_dim": 2048}),
    "flux": lambda: flux_config({"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
                             "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0,
                             "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56],
                             "theta": 10000, "qkv_bias": True, "guidance_embed": True}),
}


def full_size_model(family: str, dtype=torch.float32, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A full-size architecture of ``family`` with random weights, built on the load device (benchmarks)."""
    cfg = FULL_SIZE[family]()
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, "", device=mm.get_torch_device())
    randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_model(family: str, seed: int = 0, in_channels: int | None = None) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a randomly initialised tiny diffusion model of the given family."""
    cfg = model_config(family, in_channels)
    model = cfg.get_model({}, "")
    randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


class _TinyClipTarget:
    """What comfy.sd.CLIP needs: the text-model class, the tokenizer class and their params."""
    clip = comfy.sd1_clip.SD1ClipModel
    tokenizer = comfy.sd1_clip.SD1Tokenizer
    params: dict = {}


def tiny_clip(seed: int = 0) -> comfy.sd.CLIP:
    """ComfyUI's SD1 CLIP text model (real tokenizer files shipped with ComfyUI), 2 layers wide 64."""
    te_config = {"hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH, "num_attention_heads": 2,
                 "num_hidden_layers": 2, "projection_dim": TEXT_WIDTH}
    clip = comfy.sd.CLIP(_TinyClipTarget, model_options={"clip_l_model_config": te_config,
                                                          "dtype": torch.float32})
    randomize_(clip.cond_stage_model, seed + 1)
    return clip


def tiny_vae(family: str, seed: int = 0) -> comfy.sd.VAE:
    """ComfyUI's AutoencoderKL with 8x downscale, 32 base channels, 4 (SD) or 16 (FLUX) latent channels."""
    z = 16 if family == "flux" else 4
    ddconfig = {"double_z": True, "z_channels": z, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    ae = randomize_(AutoencoderKL(ddconfig=ddconfig, embed_dim=z), seed + 2)
    vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": {"ddconfig": ddconfig, "embed_dim": z}})
    vae.latent_channels = z
    return vae


def tiny_clip_vision(seed: int = 0, image_size: int = 224, width: int = TEXT_WIDTH, layers: int = 3, heads: int = 2):
    """ComfyUI's CLIP vision model (``comfy.clip_vision.ClipVisionModel``), tiny and seeded: patch 14,
    ``(image_size / 14)^2 + 1`` tokens of width ``width`` (257 at 224 px, as CLIP-H)."""
    import json
    import os
    import tempfile

    import comfy.clip_vision
    cfg = {"hidden_act": "gelu", "hidden_size": width, "image_size": image_size, "intermediate_size": 4 * width,
           "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": heads, "num_channels": 3,
           "num_hidden_layers": layers, "patch_size": 14, "projection_dim": width}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    try:
        cv = comfy.clip_vision.ClipVisionModel(f.name)
    finally:
        os.unlink(f.name)
    randomize_(cv.model, seed + 3)
    return cv


def tiny_controlnet(family: str = "sd15", seed: int = 0):
    """ComfyUI's ControlNet (comfy.cldm.cldm.ControlNet wrapped in comfy.controlnet.ControlNet) for a tiny UNet."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    if family not in ("sd15", "sdxl"):
        raise InputError("the tiny ControlNet stand-in exists for the sd15 and sdxl families")
    cfg = dict(model_config(family).unet_config)
    cfg.pop("out_channels")
    cfg.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    net = randomize_(comfy.cldm.cldm.ControlNet(**cfg), seed + 4, std=0.05)
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device(), manual_cast_dtype=None)


def tiny_conditioning(family: str, seed: int = 1, batch: int = 1, tokens: int = 77) -> list:
    """CONDITIONING as a text encoder would give it, without a text encoder (for tests)."""
    g = torch.Generator().manual_seed(seed)
    cross = torch.randn(batch, tokens, TEXT_WIDTH, generator=g)
    extra = {}
    if family in ("sdxl", "flux"):
        extra["pooled_output"] = torch.randn(batch, TEXT_WIDTH, generator=g)
    if family == "flux":
        extra["guidance"] = 3.5
    return [[cross, extra]]


def latent_channels(family: str) -> int:
    return 16 if family == "flux" else 4


