"""The full-size builders (the stand-ins' FULL_SIZE) are the real architectures.

The independent truth is diffusers' own classes built from the published configs of SD1.5 (runwayml
stable-diffusion-v1-5 unet/config.json), SDXL base 1.0 and FLUX.1-dev (transformer/config.json), on the meta device
(no memory). ComfyUI's own converters (comfy.utils.unet_to_diffusers / flux_to_diffusers) name each diffusers tensor
in ComfyUI's layout; every diffusers tensor must have exactly one ComfyUI tensor of the same shape and every ComfyUI
tensor must be named, and both sides must count the real models' parameters. A transformer in the wrong output block
(ComfyUI pops ``transformer_depth_output`` from the end) leaves diffusers' ``up_blocks.3.attentions.*`` unnamed.
"""
import os
import sys
from collections import Counter

import pytest
import torch

import comfy.supported_models as sm
import comfy.utils

import harness  # noqa: F401  (boots ComfyUI, loads the pack)
from idportrait.guidance import flashface as FF

sys.path.insert(0, os.path.join(harness.REPO, "bench"))
import builders  # noqa: E402

from idportrait.stand_ins import models as tm  # noqa: E402

diffusers = pytest.importorskip("diffusers")

REAL_PARAMETERS = {"sd15": 859_520_964, "sdxl": 2_567_463_684, "flux": 11_901_408_320}

DIFFUSERS_CONFIGS = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=(5, 10, 20),
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
    "flux": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
}


def diffusers_model(family):
    with torch.device("meta"):
        if family == "flux":
            return diffusers.FluxTransformer2DModel(**DIFFUSERS_CONFIGS[family])
        return diffusers.UNet2DConditionModel(**DIFFUSERS_CONFIGS[family])


def comfy_model(cfg):
    cfg.set_inference_dtype(torch.float16, None)
    with torch.device("meta"):   # the real sizes, without allocating them
        return cfg.get_model({}, "").diffusion_model


def shapes(module):
    return {k: tuple(p.shape) for k, p in module.named_parameters()}


def assert_same_architecture(family, cfg, comfy_shapes, diff_shapes):
    """Every diffusers tensor lands on a ComfyUI tensor (or its slice) of the same size; all are covered once."""
    if family == "flux":
        names = comfy.utils.flux_to_diffusers(cfg.unet_config, output_prefix="")
    else:
        names = comfy.utils.unet_to_diffusers(cfg.unet_config)
    unnamed = sorted(k for k in diff_shapes if k not in names)
    assert not unnamed, f"{len(unnamed)} diffusers tensors have no ComfyUI counterpart, e.g. {unnamed[:4]}"
    covered = Counter()
    for d, shape in diff_shapes.items():
        target = names[d]
        if isinstance(target, str):
            assert comfy_shapes.get(target) == shape, (d, target, shape, comfy_shapes.get(target))
            covered[target] += 1
        else:   # (ComfyUI key, (dim, offset, length) or None, ...): a slice of a fused tensor, e.g. FLUX qkv
            key, sl = target[0], target[1]
            assert key in comfy_shapes, (d, key)
            if sl is not None:
                dim, _, length = sl
                assert shape[dim] == length and all(a == b for i, (a, b) in enumerate(zip(shape, comfy_shapes[key]))
                                                    if i != dim), (d, key, shape, comfy_shapes[key])
            else:
                assert comfy_shapes[key] == shape, (d, key)
            covered[key] += 1
    missing = sorted(set(comfy_shapes) - set(covered))
    assert not missing, f"{len(missing)} ComfyUI tensors are not in the real model, e.g. {missing[:4]}"
    if family != "flux":   # UNet names are one-to-one; FLUX fuses q, k, v (and the single blocks' MLP input)
        assert max(covered.values()) == 1


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_full_size_builder_is_the_real_architecture(family):
    diff = diffusers_model(family)
    diff_shapes = shapes(diff)
    assert builders.count_parameters(diff) == REAL_PARAMETERS[family]   # the published configs are the real models
    cfg = tm.FULL_SIZE[family]()
    comfy_shapes = shapes(comfy_model(cfg))
    assert sum(torch.Size(s).numel() for s in comfy_shapes.values()) == REAL_PARAMETERS[family]
    assert_same_architecture(family, cfg, comfy_shapes, diff_shapes)


def test_sd15_has_attention_at_full_latent_resolution_and_none_at_the_lowest():
    dm = comfy_model(tm.FULL_SIZE["sd15"]())
    with_attention = [i for i, blk in enumerate(dm.output_blocks) if any("SpatialTransformer" in type(m).__name__
                                                                          for m in blk)]
    assert with_attention == list(range(3, 12))   # output_blocks 9-11 run at the latent's full resolution


def test_flashface_unet_layout_is_sd15():
    """The FlashFace bench builds its own SD1.5 config (guidance/flashface.py): the same real layout."""
    cfg = sm.SD15(FF.sd15_unet_config(320, 768, 4))
    comfy_shapes = shapes(comfy_model(cfg))
    assert sum(torch.Size(s).numel() for s in comfy_shapes.values()) == REAL_PARAMETERS["sd15"]
    assert_same_architecture("sd15", cfg, comfy_shapes, shapes(diffusers_model("sd15")))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_dry_geometry_has_every_block_of_the_real_one(family):
    """The GPU script's CPU dry run uses the real layouts at tiny widths: same tensors, only narrower."""
    full = shapes(comfy_model(builders.model_config(family, "full")))
    dry = shapes(comfy_model(builders.model_config(family, "dry")))
    assert set(dry) == set(full)
    assert all(len(dry[k]) == len(full[k]) for k in full)
    assert builders.count_parameters(comfy_model(builders.model_config(family, "dry"))) < REAL_PARAMETERS[family] / 50
