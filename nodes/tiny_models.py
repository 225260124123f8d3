"""Stand-in model nodes (Tiny Stand-in Checkpoint / CLIP Vision / ControlNet) for trying graphs on a CPU.

The builders live in stand_ins/models.py (shared with the tests, the trainer and the benchmarks).
"""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..stand_ins.models import FAMILIES, tiny_clip, tiny_clip_vision, tiny_controlnet, tiny_model, tiny_vae

log = logging.getLogger(__name__)


class TinyModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_TinyModels",
            display_name="Tiny Stand-in Checkpoint (IDP)",
            category="identity_portrait/testing",
            description=("Builds a tiny, randomly initialised SD1.5-, SDXL- or FLUX-shaped model, text encoder and "
                         "VAE from ComfyUI's own classes. Use it in place of 'Load Checkpoint' to try a workflow on "
                         "a CPU in seconds. Its images are noise: it proves the graph runs, not how it looks."),
            inputs=[
                io.Combo.Input("family", options=list(FAMILIES), default="sd15",
                               tooltip="Which architecture to imitate: sd15 / sdxl (UNet) or flux (DiT)."),
                io.Int.Input("weights_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random weights; the same seed always gives the same model."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def execute(cls, family: str, weights_seed: int) -> io.NodeOutput:
        log.info("building tiny %s stand-in models (seed %d)", family, weights_seed)
        return io.NodeOutput(tiny_model(family, weights_seed), tiny_clip(weights_seed), tiny_vae(family, weights_seed))


class TinyClipVision(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_TinyClipVision", display_name="Tiny Stand-in CLIP Vision (IDP)",
            category="identity_portrait/testing",
            description=("A tiny random CLIP vision model (ComfyUI's class, 257 tokens of width 64) in place of "
                         "'Load CLIP Vision' for trying identity workflows on a CPU. Pair it with stand-in Omni-ID weights."),
            inputs=[io.Int.Input("weights_seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights.")],
            outputs=[io.ClipVision.Output(display_name="CLIP_VISION")])

    @classmethod
    def execute(cls, weights_seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_clip_vision(weights_seed))


class TinyControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_TinyControlNet", display_name="Tiny Stand-in ControlNet (IDP)",
            category="identity_portrait/testing",
            description=("A tiny random ControlNet (ComfyUI's classes) matching the tiny SD1.5/SDXL stand-in models, "
                         "in place of 'Load ControlNet Model' to try ControlNet chains on a CPU."),
            inputs=[io.Combo.Input("family", options=["sd15", "sdxl"], default="sd15",
                                   tooltip="Must match the family of the tiny model it controls."),
                    io.Int.Input("weights_seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights.")],
            outputs=[io.ControlNet.Output(display_name="CONTROL_NET")])

    @classmethod
    def execute(cls, family: str, weights_seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_controlnet(family, weights_seed))


NODES = [TinyModels, TinyClipVision, TinyControlNet]
