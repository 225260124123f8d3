"""Random-weight models for the benches and the GPU run (bench/gpu), at three geometries, all built with ComfyUI's
own classes (the layouts come from the stand-ins' module, ``tm`` below: stand_ins/models.py):

* ``tiny``: the tiny stand-ins (2 UNet levels, 2+2 FLUX blocks, width 64 text);
* ``dry``: the real layouts of ``tm.FULL_SIZE`` (SD1.5's 4 levels and 16 transformers, SDXL's 70, FLUX's
  19 + 38 blocks) at tiny widths (32 UNet channels, FLUX hidden 64, text width 64), so a CPU dry run walks every
  block of the real architectures in seconds;
* ``full``: the real architectures (SD1.5 859.52 M, SDXL 2.57 B, FLUX.1-dev 11.9 B parameters).

Full-size weights on a GPU are drawn there, with a generator on the device: drawing 12 B numbers on the CPU would
take a minute per model. At full size the text encoders are the family's own ComfyUI classes at their real widths
with 3 CLIP / 2 T5 layers (SDXL: CLIP-L + CLIP-G, 2048-wide tokens and a 1280-wide pooled vector; FLUX: CLIP-L + T5-XXL);
CLIP vision has CLIP-H's width and the ControlNet the UNet's own layout: their cost is not what the benches measure.
The VAE is always the tiny one.
"""
from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip

from idportrait.stand_ins import models as tm

GEOMETRIES = ("tiny", "dry", "full")
TW = tm.TEXT_WIDTH
# (cross-attention context width, pooled vector width) of each family's real text encoders
FULL_DIMS = {"sd15": (768, None), "sdxl": (2048, 1280), "flux": (4096, 768)}
# weight dtypes ComfyUI picks for these models on a recent NVIDIA GPU
CUDA_DTYPES = {"sd15": torch.float16, "sdxl": torch.float16, "flux": torch.bfloat16}


def dims(family: str, geometry: str) -> tuple[int, int | None]:
    """(context width, pooled width or None) of the conditioning a model of this geometry takes."""
    if geometry == "full":
        return FULL_DIMS[family]
    return TW, (None if family == "sd15" else TW)


def text_tokens(family: str, geometry: str) -> int:
    """Prompt tokens: 77 (CLIP); FLUX's T5 prompt is 256 tokens at full size."""
    return 256 if (family == "flux" and geometry == "full") else 77


def default_dtype(family: str, geometry: str, device: torch.device) -> torch.dtype:
    return CUDA_DTYPES[family] if (geometry == "full" and device.type == "cuda") else torch.float32


randomize_ = tm.randomize_   # draws on each parameter's own device (GPU weights never pass through the CPU)


def model_config(family: str, geometry: str, depth: tuple[int, int] | None = None):
    """The ComfyUI model config of a geometry. ``depth`` = (double, single) FLUX blocks, for a shallower FLUX."""
    if geometry == "tiny":
        cfg = tm.model_config(family)
    elif geometry in ("dry", "full"):
        cfg = tm.FULL_SIZE[family]()
        u = cfg.unet_config
        if geometry == "dry" and family == "flux":
            u.update(hidden_size=64, num_heads=2, axes_dim=[16, 8, 8], context_in_dim=TW, vec_in_dim=TW)
        elif geometry == "dry":
            u.update(model_channels=32, context_dim=TW)
            if family == "sdxl":
                u.update(adm_in_channels=TW + tm.SDXL_ADM_EXTRA, num_head_channels=16)
    else:
        raise ValueError(f"unknown geometry {geometry!r}; expected one of {GEOMETRIES}")
    if depth is not None:
        if family != "flux":
            raise ValueError("depth applies to FLUX only")
        cfg.unet_config.update(depth=depth[0], depth_single_blocks=depth[1])
    return cfg


def diffusion_model(family: str, geometry: str = "full", dtype: torch.dtype | None = None, seed: int = 0,
                    depth: tuple[int, int] | None = None) -> comfy.model_patcher.ModelPatcher:
    """A random-weight diffusion model as a ModelPatcher; full size on a GPU is built and drawn on the GPU."""
    dev = mm.get_torch_device()
    if geometry == "tiny" and dtype is None and depth is None:
        return tm.tiny_model(family, seed)
    dtype = dtype or default_dtype(family, geometry, dev)
    if geometry == "full" and dev.type == "cpu" and depth is None:
        return tm.full_size_model(family, dtype, seed)
    cfg = model_config(family, geometry, depth)
    cfg.set_inference_dtype(dtype, None)
    build_on = dev if geometry == "full" else torch.device("cpu")
    model = cfg.get_model({}, "", device=build_on)
    randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=mm.unet_offload_device())


def conditioning(family: str, geometry: str, seed: int = 1, batch: int = 1) -> list:
    """CONDITIONING of the widths the model takes, as a text encoder would give it (random)."""
    ctx, vec = dims(family, geometry)
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if vec is not None:
        extra["pooled_output"] = torch.randn(batch, vec, generator=g)
    if family == "flux":
        extra["guidance"] = 3.5
    return [[torch.randn(batch, text_tokens(family, geometry), ctx, generator=g), extra]]


def _text_target(family: str):
    """What comfy.sd.CLIP needs for the family's own text encoder classes (and their tokenizer files)."""
    import comfy.sdxl_clip
    import comfy.text_encoders.flux
    clip, tok = {"sd15": (comfy.sd1_clip.SD1ClipModel, comfy.sd1_clip.SD1Tokenizer),
                 "sdxl": (comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer),
                 "flux": (comfy.text_encoders.flux.FluxClipModel, comfy.text_encoders.flux.FluxTokenizer)}[family]
    return type("TextTarget", (), {"clip": clip, "tokenizer": tok, "params": {}})


def clip(family: str, geometry: str, seed: int = 0) -> comfy.sd.CLIP:
    """A text encoder whose tokens and pooled vector have the widths the family's model takes."""
    c = tm.tiny_clip(seed) if geometry != "full" else _wide_clip(family, seed)
    cond, pooled = c.encode_from_tokens(c.tokenize("a"), return_pooled=True)
    ctx, vec = dims(family, geometry)
    if cond.shape[-1] != ctx or (vec is not None and pooled.shape[-1] != vec):   # FLUX would silently cut a wider one
        raise RuntimeError(f"{family} text stand-in gives {cond.shape[-1]} / {pooled.shape[-1]}, expected {ctx} / {vec}")
    return c


def _wide_clip(family: str, seed: int) -> comfy.sd.CLIP:
    """The family's real text encoders (CLIP-L; CLIP-L + CLIP-G; CLIP-L + T5-XXL) at their real widths, few layers."""
    # 3 CLIP layers: SDXL reads the penultimate one (layer_idx -2)
    layers = {"clip_l_model_config": {"num_hidden_layers": 3}, "clip_g_model_config": {"num_hidden_layers": 3},
              "t5xxl_model_config": {"num_layers": 2}}
    c = comfy.sd.CLIP(_text_target(family), model_options={**layers, "dtype": torch.float32})
    randomize_(c.cond_stage_model, seed + 1)
    return c


def clip_vision(geometry: str, seed: int = 0):
    """CLIP vision: the tiny stand-in, or CLIP-H's width (1280, 257 tokens at 224 px) with 2 layers."""
    if geometry != "full":
        return tm.tiny_clip_vision(seed)
    from idportrait.omni_encoder.train import trunk
    return trunk.tiny_clip_vision(seed, 224, width=1280, layers=2, heads=16)


def controlnet(model: comfy.model_patcher.ModelPatcher, seed: int = 0):
    """ComfyUI's ControlNet for this very UNet's layout (what a real SD1.5/SDXL ControlNet file gives)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    base = model.model
    cfg = {k: v for k, v in base.model_config.unet_config.items() if k != "out_channels"}
    dtype = base.get_dtype()
    dev = mm.get_torch_device()
    build_on = dev if dev.type == "cuda" else torch.device("cpu")
    cfg.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=dtype, device=build_on)
    net = randomize_(comfy.cldm.cldm.ControlNet(**cfg), seed + 4, std=0.05)
    return comfy.controlnet.ControlNet(net, load_device=dev, manual_cast_dtype=None)


def omni_id_config(geometry: str):
    """The paper's encoder (256 x 1280 from CLIP-H tokens) at full size, else the tests' tiny one."""
    from idportrait.omni_encoder.encoder import OmniIDConfig
    if geometry == "full":
        return OmniIDConfig()
    return OmniIDConfig(token_dim=32, clip_dim=TW, num_queries=16, heads=2)


def identity_adapter(model: comfy.model_patcher.ModelPatcher, family: str, token_dim: int, ctx_dim: int, seed: int = 1):
    """Omni-ID's injection layers for this model (random), on the CPU."""
    from idportrait.guidance import ip_adapter as IP
    dm = model.model.diffusion_model
    if family == "flux":
        a = IP.FluxIdentityAdapter(token_dim, dm.hidden_size, len(dm.double_blocks), len(dm.single_blocks))
    else:
        a = IP.SDIdentityAdapter(token_dim, ctx_dim, IP.SDIdentityAdapter.inner_dims_of(dm))
    return tm.randomize_(a, seed)


def write_omni_id(path: str, family: str, model: comfy.model_patcher.ModelPatcher, geometry: str, seed: int = 0) -> None:
    """An Omni-ID weight file in the real format that fits ``model`` (random encoder and injection layers)."""
    from idportrait.omni_encoder import weights as W
    from idportrait.omni_encoder.encoder import OmniIDEncoder
    cfg = omni_id_config(geometry)
    enc = tm.randomize_(OmniIDEncoder(cfg), seed)
    ad = identity_adapter(model, family, cfg.token_dim, dims(family, geometry)[0], seed + 1)
    proj = ad.state_dict_flat() if family == "flux" else ad.state_dict()
    W.save_identity_weights(path, enc.state_dict(), proj,
                            W.IdentityWeightsMeta(config=cfg, base_family=family, injected_blocks="all"))


def flashface_model(geometry: str, dtype: torch.dtype | None = None, seed: int = 0):
    """FlashFace's main UNet + reference UNet (released layout; 1.65 B parameters at full size), random weights."""
    from idportrait.guidance import flashface as FF
    from idportrait.guidance import flashface_checkpoint as ffc
    dev = mm.get_torch_device()
    full = geometry == "full"
    dtype = dtype or (torch.float16 if (full and dev.type == "cuda") else torch.float32)
    shapes = ffc.expected_shapes(ffc.SD15 if full else ffc.Geometry(32, TW))
    draw_on = dev if dev.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=draw_on).manual_seed(seed)
    weights = ffc.FlashFaceWeights(*({k: (torch.randn(s, generator=g, device=draw_on) * 0.02).to(dtype)
                                      for k, s in shapes[part].items()} for part in ("main", "ref", "ref_attention")))
    return FF.build_models(weights, {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32"))


def release() -> None:
    """Free the models nothing refers to any more. Unlike mm.unload_all_models it does not copy weights back to the
    CPU first (24 GB for FLUX), which is what a bench wants between families."""
    import gc
    gc.collect()
    mm.cleanup_models()
    mm.soft_empty_cache()


def write_json(path: str, data: dict) -> None:
    """Benches write after every family, so a run stopped at its time limit keeps what it measured."""
    import json
    import os
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
