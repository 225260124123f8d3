"""OmniPortrait nodes: RB-Guidance as a GUIDER for SamplerCustomAdvanced and as a KSampler-style node, identities
for several people in one image, a preview of the generated-face mask M_gen, and the Pivot ID encoder (loader and
text encode: e_mix in the prompt, whose cross-attention RB-Guidance takes M_gen from).

Thin adapters: the guider and all math live in guidance/rb_guidance/.
"""
from __future__ import annotations

import logging
import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview

from ..guidance import rb_guidance
from ..guidance.rb_guidance import energy
from .folders import register_model_folder

log = logging.getLogger(__name__)

CATEGORY = "identity_portrait/rb_guidance"
IdentitiesType = io.Custom("RB_IDENTITIES")
PivotIDType = io.Custom("PIVOT_ID")
PIVOT_FOLDER = "pivot_id"

register_model_folder(PIVOT_FOLDER, {".safetensors", ".sft"})

_FEATURE_TIP = ("Where the diffusion (DIFT) features are read. 'auto': SD1.5/SDXL the up-block output at 1/16 of the "
                "image (SD1.5 up:1, SDXL up:0), FLUX after the last double block. Others: 'mid', 'up:i' (UNet), "
                "'double:i' / 'single:i' (FLUX). The forward stops there, so earlier points are cheaper.")


def _guidance_inputs() -> list:
    """Inputs shared by the guider and the sampler node (names are part of saved workflows)."""
    return [
        io.Vae.Input("vae", tooltip="The VAE of this model; encodes the reference image(s)."),
        io.Float.Input("p", default=energy.P_STRENGTH, min=0.0, max=1000.0, step=0.1,
                       tooltip="Strength p of the energy E = p / (1 + S). 0 turns the guidance off (plain sampling). "
                               "8.5 is the paper's value with match = euclidean and reduction = sum (Eq. 7-8 as "
                               "written); with reduction = mean the same pull needs a much smaller p (see reduction)."),
        io.Float.Input("u", default=energy.U_START, min=0.0, max=1.0, step=0.01,
                       tooltip="Guidance runs for t <= u*T: the last u of the noise schedule (0.6 = the paper). "
                               "Earlier steps are plain CFG."),
        io.Int.Input("t0", default=rb_guidance.T0_DEFAULT, min=1, max=999,
                     tooltip="Noise level of the reference pass on the 1000-step scale (671 = the paper), converted "
                             "to the model's own sigma."),
        io.String.Input("feature_point", default=rb_guidance.FEATURE_AUTO, tooltip=_FEATURE_TIP),
    ]


def _energy_inputs() -> list:
    """Eq. 7 / Eq. 8 as written, or the alternatives. Optional and last: widgets_values of workflows saved before
    these inputs existed keep their positions (nodes/migrations.py gives those workflows their old cosine/mean)."""
    return [
        io.Combo.Input("match", optional=True, options=list(energy.MATCHES), default="euclidean",
                       tooltip="How each reference face point finds its generated point. euclidean: the smallest L2 "
                               "feature distance (the paper's Eq. 7). cosine: the highest cosine similarity (DIFT's "
                               "own matching). The score is the cosine either way."),
        io.Combo.Input("reduction", optional=True, options=list(energy.REDUCTIONS), default="sum",
                       tooltip="How the pair scores form S in E = p / (1 + S). sum (the paper's Eq. 8): S grows with "
                               "the number N of reference face points, so p = 8.5 is the paper's strength for its "
                               "face sizes and the pull weakens roughly as 1/N on larger faces. mean: S in [0, 1], "
                               "the same p whatever the face size; about (1+N·s)²/(N(1+s)²) times the sum's pull "
                               "(~30x at 150 points), so use a p about that much smaller (~0.3 for the paper's 8.5)."),
    ]


def _identity_inputs(prefix_optional: bool = True) -> list:
    return [
        io.Image.Input("reference", optional=prefix_optional,
                       tooltip="Reference photo(s) of the person; several images of the same person are pooled. A "
                               "photo larger than the model's working size (SD1.5 512 px, SDXL/FLUX 1024 px) is "
                               "cropped around the face (twice the face box) and resized to at most that size before "
                               "encoding, so a phone photo costs what a working-size reference does."),
        io.Mask.Input("reference_mask", optional=True,
                      tooltip="Face region M_ref in the reference (one mask, or one per image). Not connected: the "
                              "face is detected with the face tools; an image without a face is an error."),
        io.Mask.Input("region_mask", optional=True,
                      tooltip="Where this person's face goes in the generated image (user M_gen). Not connected: "
                              "from the region box, the token index, or the identity adapter's attention."),
        io.String.Input("region_box", optional=True, default="",
                        tooltip="Face box in the generated image as fractions 'x0, y0, x1, y1' (empty: not used)."),
        io.Int.Input("token_index", optional=True, default=-1, min=-1, max=4095,
                     tooltip="Prompt token whose cross-attention gives M_gen (Eq. 6), e.g. the class word 'woman'; "
                             "counts the start token. -1: not used."),
        io.Combo.Input("reference_mask_source", optional=True, options=list(rb_guidance.MASK_SOURCES), default="auto",
                       tooltip="When the reference face is detected: 'auto' = landmark hull (or box ellipse), "
                               "'box' = the detection box."),
    ]


def _identity(reference, reference_mask=None, region_mask=None, region_box="", token_index=-1,
              reference_mask_source="auto") -> rb_guidance.RBIdentity:
    return rb_guidance.RBIdentity(reference=reference, reference_mask=reference_mask, region_mask=region_mask,
                         region_box=rb_guidance.parse_box(region_box),
                         token_index=None if token_index is None or token_index < 0 else int(token_index),
                         reference_mask_source=reference_mask_source or "auto")


def build_guider(model, positive, negative, cfg, vae, p, u, t0, feature_point, identities, ensemble=1,
                 ref_seed=0, normalize_mask=False, match="euclidean", reduction="sum") -> rb_guidance.RBGuider:
    if not identities:
        raise rb_guidance.RBGuidanceError("connect a reference image (or identities from 'RB-Guidance Identity')")
    settings = rb_guidance.RBSettings(p=float(p), u=float(u), t0=float(t0), feature_point=feature_point, ensemble=int(ensemble),
                             ref_seed=int(ref_seed), normalize_mask=bool(normalize_mask), match=match or "euclidean",
                             reduction=reduction or "sum")
    guider = rb_guidance.RBGuider(model, identities, vae, settings)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    if settings.p != 0:
        guider.prepare_references()   # encode references and find their faces now: errors show on this node
    log.info("RB-Guidance guider: %d identities, p=%g (%s, %s), u=%g, t0=%g, features at %s", len(identities),
             settings.p, settings.match, settings.reduction, settings.u, settings.t0, guider.point.name)
    return guider


def _collect(reference, more_identities, **kw) -> list:
    out = [_identity(reference, **kw)] if reference is not None else []
    return out + list(more_identities or [])


class RBGuidanceIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_RBGuidanceIdentity", display_name="RB-Guidance Identity (IDP)", category=CATEGORY,
            description=("One person for RB-Guidance: reference photo(s) and where their face is, in the reference "
                         "and in the generated image. Chain several to guide several people in one image; each "
                         "region is guided only by its own reference."),
            inputs=_identity_inputs(prefix_optional=False)[:1] + _identity_inputs()[1:] + [
                io.String.Input("class_word", optional=True, default="",
                                tooltip="Class word of the prompt for M_gen (e.g. 'woman'); needs clip and prompt. "
                                        "Overrides token_index."),
                io.Clip.Input("clip", optional=True, tooltip="The CLIP that encoded the prompt (to find class_word)."),
                io.String.Input("prompt", optional=True, default="", multiline=True,
                                tooltip="The positive prompt text (to find class_word)."),
                IdentitiesType.Input("identities", optional=True, tooltip="Identities defined so far (chain)."),
            ],
            outputs=[IdentitiesType.Output(display_name="IDENTITIES")],
        )

    @classmethod
    def execute(cls, reference, reference_mask=None, region_mask=None, region_box="", token_index=-1,
                reference_mask_source="auto", class_word="", clip=None, prompt="", identities=None) -> io.NodeOutput:
        if class_word and class_word.strip():
            if clip is None or not (prompt or "").strip():
                raise rb_guidance.RBGuidanceError("class_word needs the clip and the prompt text it was encoded from")
            token_index = rb_guidance.find_token_index(clip, prompt, class_word)
        ident = _identity(reference, reference_mask, region_mask, region_box, token_index, reference_mask_source)
        return io.NodeOutput(list(identities or []) + [ident])


class RBGuidanceGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_RBGuidanceGuider", display_name="RB-Guidance Guider (IDP)", category=CATEGORY,
            description=("OmniPortrait Reference-Based Guidance as a GUIDER for SamplerCustomAdvanced: CFG, plus, for the "
                         "late steps, the gradient of a feature-matching energy that pulls the generated face towards "
                         "the reference face. Needs no trained weights; works with any sampler and scheduler, with "
                         "ControlNet conditioning and with identity adapters (Omni-ID) applied to the model."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.5, SDXL or FLUX model (identity adapters may be applied)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning (ControlNet-applied is fine)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the paper: 7.5)."),
            ] + _guidance_inputs() + _identity_inputs() + [
                io.Int.Input("ensemble", optional=True, default=1, min=1, max=16,
                             tooltip="Noise draws averaged for the reference features (DIFT uses 8)."),
                io.Int.Input("ref_seed", optional=True, default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the reference noise."),
                io.Boolean.Input("normalize_mask", optional=True, default=False,
                                 tooltip="Min-max normalise the attention mask before the 0.5 threshold, so it is "
                                         "never empty (not in the paper; helps weak attention)."),
                IdentitiesType.Input("more_identities", optional=True,
                                     tooltip="Further people (from 'RB-Guidance Identity'), each with its own region."),
            ] + _energy_inputs(),
            outputs=[io.Guider.Output(display_name="GUIDER")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, vae, p, u, t0, feature_point, reference=None, reference_mask=None,
                region_mask=None, region_box="", token_index=-1, reference_mask_source="auto", ensemble=1, ref_seed=0,
                normalize_mask=False, more_identities=None, match="euclidean", reduction="sum") -> io.NodeOutput:
        ids = _collect(reference, more_identities, reference_mask=reference_mask, region_mask=region_mask,
                       region_box=region_box, token_index=token_index, reference_mask_source=reference_mask_source)
        return io.NodeOutput(build_guider(model, positive, negative, cfg, vae, p, u, t0, feature_point, ids, ensemble,
                                          ref_seed, normalize_mask, match, reduction))


def _latent_size_mask(guider: rb_guidance.RBGuider, samples: torch.Tensor) -> torch.Tensor:
    return guider.gen_mask_preview((samples.shape[-2] * 8, samples.shape[-1] * 8))


class RBGuidanceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_RBGuidanceSampler", display_name="RB-Guidance KSampler (IDP)", category=CATEGORY,
            description=("KSampler with OmniPortrait Reference-Based Guidance: same inputs and result as KSampler "
                         "when p = 0; otherwise the late steps follow the identity energy's gradient. Also outputs the "
                         "generated-face mask M_gen of the last guided step."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.5, SDXL or FLUX model (identity adapters may be applied)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the initial noise."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Number of denoising steps."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), tooltip="Sampler."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), tooltip="Scheduler."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning (ControlNet-applied is fine)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoising strength, as in KSampler."),
            ] + _guidance_inputs() + _identity_inputs() + [
                io.Int.Input("ensemble", optional=True, default=1, min=1, max=16,
                             tooltip="Noise draws averaged for the reference features."),
                io.Boolean.Input("normalize_mask", optional=True, default=False,
                                 tooltip="Min-max normalise the attention mask before the threshold."),
                IdentitiesType.Input("more_identities", optional=True, tooltip="Further people, each with its region."),
            ] + _energy_inputs(),
            outputs=[io.Latent.Output(display_name="LATENT"), io.Mask.Output(display_name="MGEN_MASK")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise, vae,
                p, u, t0, feature_point, reference=None, reference_mask=None, region_mask=None, region_box="",
                token_index=-1, reference_mask_source="auto", ensemble=1, normalize_mask=False,
                more_identities=None, match="euclidean", reduction="sum") -> io.NodeOutput:
        ids = _collect(reference, more_identities, reference_mask=reference_mask, region_mask=region_mask,
                       region_box=region_box, token_index=token_index, reference_mask_source=reference_mask_source)
        guider = build_guider(model, positive, negative, cfg, vae, p, u, t0, feature_point, ids, ensemble, 0, normalize_mask,
                              match, reduction)
        latent = latent_image["samples"]
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        # the same sigmas and sampler object KSampler builds, so p = 0 reproduces KSampler exactly
        ks = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=model.model_options)
        out = latent_image.copy()
        if ks.sigmas.shape[-1] == 0:
            out["samples"] = latent
            return io.NodeOutput(out, _latent_size_mask(guider, latent))
        samples = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), ks.sigmas,
                                denoise_mask=latent_image.get("noise_mask"),
                                callback=latent_preview.prepare_callback(model, steps),
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(out, _latent_size_mask(guider, latent))


class RBGuidanceMaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_RBGuidanceMaskPreview", display_name="RB-Guidance Mask Preview (IDP)", category=CATEGORY,
            description=("The generated-face mask M_gen of the last guided step of an RB-Guidance guider (union of all "
                         "identities) at image size. Connect the sampler's output LATENT too, so this runs after "
                         "sampling."),
            inputs=[io.Guider.Input("guider", tooltip="An RB-Guidance guider that has sampled."),
                    io.Latent.Input("samples", tooltip="The sampled latent (orders this node after sampling; sets the size).")],
            outputs=[io.Mask.Output(display_name="MASK")],
        )

    @classmethod
    def execute(cls, guider, samples) -> io.NodeOutput:
        if not isinstance(guider, rb_guidance.RBGuider):
            raise rb_guidance.RBGuidanceError("the guider is not an RB-Guidance guider")
        return io.NodeOutput(_latent_size_mask(guider, samples["samples"]))


class PivotIDLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_PivotIDLoader", display_name="Load Pivot ID Encoder (IDP)", category=CATEGORY,
            description=("OmniPortrait's Pivot ID encoder (its alignment layer e_mix = Linear([e_ref; e_txt])) from "
                         "models/pivot_id: the pivot_id.safetensors the pack's trainer exports (stage 'pivot'). No "
                         "weights are public. Use it with 'Pivot ID Text Encode (IDP)'."),
            inputs=[io.Combo.Input("pivot_file", options=folder_paths.get_filename_list(PIVOT_FOLDER),
                                   tooltip="A Pivot ID file in models/pivot_id.")],
            outputs=[PivotIDType.Output(display_name="PIVOT_ID")],
        )

    @classmethod
    def execute(cls, pivot_file: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(PIVOT_FOLDER, pivot_file)
        return io.NodeOutput(rb_guidance.load_pivot_model(path))


class PivotIDTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_PivotIDTextEncode", display_name="Pivot ID Text Encode (IDP)", category=CATEGORY,
            description=("CLIP Text Encode with OmniPortrait's identity pivot: the class word of the prompt ('woman', "
                         "'man') is replaced by e_mix = Linear([e_ref; e_txt]) from the reference face, as in the paper "
                         "(Sec. 3.2). Connect the CONDITIONING as the positive prompt of the RB-Guidance nodes: with no "
                         "region box or mask there, M_gen comes from the cross-attention of e_mix (Eq. 6)."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the SD1.5/SDXL model the Pivot ID weights were trained for."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default="portrait photo of a woman",
                                tooltip="The prompt; it must contain the class word."),
                PivotIDType.Input("pivot_id", tooltip="From 'Load Pivot ID Encoder (IDP)'."),
                io.ClipVision.Input("clip_vision",
                                    tooltip="The CLIP vision model the Pivot ID weights were trained with (the paper: "
                                            "OpenCLIP ViT-L/14; a fine-tuned trunk: the run's "
                                            "clip_vision_finetuned.safetensors). A warning says when it is not."),
                io.Image.Input("reference", tooltip="The reference face (a crop, e.g. from 'Detect & Align Faces'); "
                                                    "several images are averaged."),
                io.String.Input("class_word", default="",
                                tooltip="The prompt word e_mix replaces. Empty: the word the weights were trained on."),
                io.Int.Input("occurrence", default=0, min=0, max=16,
                             tooltip="Which appearance of the class word (0 = the first); two people of one class "
                                     "word: 0 and 1."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="To add a second person: the output of another Pivot ID Text Encode of "
                                              "the same text. Each person's e_mix guides its own RB-Guidance identity."),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING"),
                     io.Int.Output(display_name="token_index")],
        )

    @classmethod
    def execute(cls, clip, text, pivot_id, clip_vision, reference, class_word="", occurrence=0,
                conditioning=None) -> io.NodeOutput:
        cond, index = rb_guidance.pivot_conditioning(clip, text, pivot_id, clip_vision, reference, class_word,
                                                     occurrence, conditioning)
        return io.NodeOutput(cond, index)


NODES = [RBGuidanceIdentity, RBGuidanceGuider, RBGuidanceSampler, RBGuidanceMaskPreview, PivotIDLoader,
         PivotIDTextEncode]
