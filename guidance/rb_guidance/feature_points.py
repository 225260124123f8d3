"""Where RB-Guidance reads its DIFT features (the feature point), and the token grid M_gen comes from."""
from __future__ import annotations

import re
from dataclasses import dataclass

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ...errors import FeaturePointError, RBGuidanceError
from ..patching import model_family

FEATURE_AUTO = "auto"


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
