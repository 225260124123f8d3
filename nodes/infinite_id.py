"""Infinite-ID node: an identity stream and a text stream joined by mixed attention and a cross-attention merge.

The math and the batching live in guidance/infinite_id.py; the identity comes from the Omni-ID nodes
(Omni-ID weights, or any public adapter of Load IP-Adapter: IP-Adapter plus/full-face/basic/FaceID/FaceID-Plus,
XLabs FLUX) through the same adapter check as Apply Omni-ID.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..guidance import infinite_id
from .omni_id import OmniIDModelType, OmniIDType

DEFAULTS = infinite_id.PAPER_DEFAULTS


class InfiniteIDApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_InfiniteIDApply", display_name="Apply Infinite-ID (IDP)", category="identity_portrait/infinite_id",
            description=(
                "Infinite-ID (ECCV 2024) at sampling time: every latent is denoised twice in the same model calls, as an "
                "identity stream (identity image-attention on, the prompt switched off exactly) and a text stream (your "
                "prompt). The text stream takes the identity only through mixed attention in its self-attention "
                "(its keys/values extended with the identity stream's, optionally AdaIN-mean aligned) and the "
                "cross-attention merge (the identity's image attention added to its text cross-attention). Use any "
                "sampler; it returns the text stream. Costs up to about 2x per step. Paper setting: SDXL, DDIM 30 steps "
                "(sampler ddim, scheduler ddim_uniform), CFG 5. The identity adapters here were trained with text on "
                "(Infinite-ID's weights are not public): lower merge_weight if the prompt gets lost."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.5, SDXL or FLUX model."),
                OmniIDModelType.Input("omni_id_model", tooltip="From Load Omni-ID Model or Load IP-Adapter (any "
                                                               "public layout): its adapter drives the identity stream "
                                                               "and the merge."),
                OmniIDType.Input("identity", tooltip="From Omni-ID Encode, Mix or Load Identity."),
                io.Float.Input("identity_weight", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="Strength of the identity image-attention in the identity stream."),
                io.Float.Input("mixed_attention_weight", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="Scales the attention the text stream pays to the identity stream's keys "
                                       "(1 = the paper's mixed attention; 0 = off, then no identity stream is run)."),
                io.Float.Input("merge_weight", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="Cross-attention merge: text cross-attention + this x the identity's image "
                                       "attention, in the text stream (1 = the paper's sum; 0 = off)."),
                io.Combo.Input("adain_mean", options=list(infinite_id.ADAIN_MODES), default="off",
                               tooltip="AdaIN-mean of the identity keys/values toward the text stream's channel means: "
                                       "off for photos, on for stylised prompts (the paper's switch)."),
                io.String.Input("blocks", default="all",
                                tooltip="Self-attention blocks with mixed attention: 'all', 'none', or items like "
                                        "'input, middle, output_3', 'output_0-5', 'output_3_1' (UNet) or "
                                        "'double, single_0-9' (FLUX)."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling at which mixed attention and the merge start."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling after which they stop (the identity stream is not run "
                                       "after this point)."),
                io.Combo.Input("apply_to", options=["cond", "cond+uncond"], default="cond",
                               tooltip="Text-stream rows that get mixed attention and the merge: the positive prompt "
                                       "only (CFG amplifies the identity) or both."),
                io.Boolean.Input("identity_stream_cfg", default=True,
                                 tooltip="On: the identity stream's negative rows run without the identity, so CFG "
                                         "guides that stream toward the face. Off: both carry it (unguided)."),
                io.Combo.Input("output", options=list(infinite_id.OUTPUTS), default=infinite_id.OUTPUTS[0],
                               tooltip="'text + identity streams' returns 2N latents (text first, then what the "
                                       "identity stream drew) to inspect the identity stream."),
                io.Combo.Input("identity_mixing", options=["interpolate", "stack"], default="interpolate",
                               tooltip="With identity_2: interpolate the two identities' tokens, or stack them "
                                       "(token concatenation: the stream attends to both people)."),
                io.Float.Input("identity_2_weight", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of identity_2 when interpolating (0 = identity only, 1 = identity_2 only)."),
                OmniIDType.Input("identity_2", optional=True,
                                 tooltip="Optional second identity (same encoder), mixed per identity_mixing."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")])

    @classmethod
    def validate_inputs(cls, start_at=0.0, end_at=1.0, **kwargs):
        return True if start_at <= end_at else f"start_at ({start_at}) must not exceed end_at ({end_at})"

    @classmethod
    def execute(cls, model, omni_id_model, identity, identity_weight, mixed_attention_weight, merge_weight, adain_mean,
                blocks, start_at, end_at, apply_to, identity_stream_cfg, output, identity_mixing, identity_2_weight,
                identity_2=None):
        adapter = omni_id_model.adapter_for(model)
        tokens = infinite_id.combine_identities(identity.tokens, None if identity_2 is None else identity_2.tokens,
                                        identity_mixing, identity_2_weight)
        patched = infinite_id.apply_infinite_id(
            model, adapter, tokens, identity_weight=identity_weight, mix_weight=mixed_attention_weight,
            merge_weight=merge_weight, adain=adain_mean, blocks=blocks, start_percent=start_at, end_percent=end_at,
            apply_to="cond" if apply_to == "cond" else "both", identity_stream_cfg=identity_stream_cfg, output=output)
        return io.NodeOutput(patched)


NODES = [InfiniteIDApply]
