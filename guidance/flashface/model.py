"""FlashFace's released SD1.5 model in ComfyUI: the main UNet (5-channel input, reference attention modules)
with the reference UNet attached as an additional model ComfyUI loads with it."""
from __future__ import annotations

import logging
import types

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models
from comfy.ldm.modules.attention import CrossAttention

from ...errors import FlashFaceError
from .. import flashface_checkpoint
from .. import flashface_keys
from ..patching import transformer_block
from .mask import FaceMaskConcat

log = logging.getLogger(__name__)

LOADER_KEY = "idportrait_flashface"             # the loader's face-mask wrapper (replaced by FlashFace Apply)
REF_UNET_KEY = "idportrait_flashface_ref_unet"  # additional model of a FlashFace MODEL


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
    if weight_dtype in flashface_checkpoint.DTYPES:
        dtype = flashface_checkpoint.DTYPES[weight_dtype]
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


def build_models(weights: flashface_checkpoint.FlashFaceWeights, weight_dtype: str = "default"):
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
    for name, i in flashface_keys.REF_ATTENTION_BLOCKS:
        tb = transformer_block(dm, (name, i, 0))
        ops = types.SimpleNamespace(Linear=type(tb.attn1.to_q))   # the UNet's own layer type (cast/fp8 aware)
        ch = tb.attn1.to_q.weight.shape[1]
        setattr(tb, flashface_keys.REF_ATTN, CrossAttention(query_dim=ch, heads=tb.attn1.heads,
                                                            dim_head=ch // tb.attn1.heads, dtype=dtype, operations=ops))
    _load_exactly(dm, {**weights.main, **weights.ref_attention}, "main UNet")
    _load_exactly(ref.diffusion_model, weights.ref, "reference UNet")
    main_p = comfy.model_patcher.ModelPatcher(main, load_device=load_device, offload_device=offload_device)
    ref_p = comfy.model_patcher.ModelPatcher(ref, load_device=load_device, offload_device=offload_device)
    main_p.set_additional_models(REF_UNET_KEY, [ref_p])
    # a FlashFace MODEL sampled without FlashFace Apply still gets its (empty) face-mask channel
    main_p.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, LOADER_KEY, FaceMaskConcat())
    log.info("FlashFace: main UNet (%d ch, 5-channel input) and reference UNet built in %s", mc, dtype)
    return main_p


def load_flashface(path: str, weight_dtype: str = "default"):
    """A FlashFace file (released ckpt, safetensors copy, or converted) → the main MODEL (see build_models)."""
    dtype = flashface_checkpoint.DTYPES.get(weight_dtype)
    return build_models(flashface_checkpoint.load(path, dtype=dtype, geometry="auto"), weight_dtype)


def is_flashface_model(model) -> bool:
    dm = getattr(model.model, "diffusion_model", None)
    if not model.get_additional_models_with_key(REF_UNET_KEY) or not hasattr(dm, "input_blocks"):
        return False
    try:
        return all(hasattr(transformer_block(dm, (n, i, 0)), flashface_keys.REF_ATTN)
                   for n, i in flashface_keys.REF_ATTENTION_BLOCKS)
    except (KeyError, IndexError, TypeError):
        return False
