"""FlashFace nodes: load the released model, encode reference faces, apply (MODEL + GUIDER), sample with the
released defaults, mix identities, and the training-free extension for any SD1.5/SDXL/FLUX model.

Math lives in guidance/flashface.py (reference pass, attention, guidance, mask) and
guidance/flashface_checkpoint.py (safe loading). FlashFace uses SD1.5's text encoder and VAE unchanged:
take CLIP and VAE from any SD1.5 checkpoint.
"""
from __future__ import annotations

import logging

from comfy_api.latest import io

import comfy.sample
import comfy.utils
import latent_preview
import folder_paths

from ..guidance import flashface
from ..guidance.flashface import RELEASED, TRAINING_FREE
from .folders import fingerprint_or_name, model_file, register_model_folder

log = logging.getLogger(__name__)

FOLDER = "flashface"
CATEGORY = "identity_portrait/flashface"
EXTENSIONS = {".safetensors", ".sft", ".ckpt"}   # .ckpt is read with torch.load(weights_only=True) only


register_model_folder(FOLDER, EXTENSIONS)

FlashFaceRef = io.Custom("FLASHFACE_REF")

def _lambda_inputs(defaults) -> list:
    return [
        io.Float.Input("lambda_feat", default=defaults["lambda_feat"], min=0.0, max=3.0, step=0.05,
                       tooltip="Reference feature strength λ_feat: weight of the attention that sees the reference "
                               "faces (the cond-with-reference row after launch). Above 1 extrapolates. 0 = off."),
        io.Float.Input("lambda_ref", default=defaults["lambda_ref"], min=0.0, max=10.0, step=0.1,
                       tooltip="Reference guidance c in u + g(y−u) + c(y_ref−y), once t ≤ launch. Higher keeps "
                               "more face detail but can look pasted. 0 = no third row."),
    ]


def _schedule_inputs(defaults) -> list:
    return [
        io.Float.Input("launch", default=defaults["launch"], min=-1.0, max=1000.0, step=1.0,
                       tooltip="Timestep (0-1000) from which reference guidance runs: while t > launch, plain CFG with "
                               "lambda_before in both rows; once t ≤ launch, the three-way guidance. 1000 = from the "
                               "first step; -1 = never."),
        io.Float.Input("lambda_before", default=defaults["lambda_before"], min=0.0, max=3.0, step=0.05,
                       tooltip="λ_feat in both cond and uncond rows before launch (the released code uses 0.85)."),
        io.Float.Input("cfg_rescale", default=defaults["rescale"], min=0.0, max=1.0, step=0.05,
                       tooltip="CFG rescale on the ε prediction, as the released code does it (0.5 there); 0 = off."),
    ]


def _box_inputs(box) -> list:
    names = ("face_x1", "face_y1", "face_x2", "face_y2")
    return [io.Float.Input(n, default=v, min=0.0, max=1.0, step=0.01,
                           tooltip="Face box as fractions of the image (x1, y1, x2, y2). All zero = no position "
                                   "constraint. The released model fills a square of side max(x2−x1, y2−y1) pixels "
                                   "from (x1, y1) into its 5th input channel.")
            for n, v in zip(names, box)]


def _guidance(lambda_feat, lambda_ref, launch, lambda_before, cfg_rescale) -> flashface.Guidance:
    return flashface.Guidance(lambda_feat=lambda_feat, lambda_ref=lambda_ref, launch=launch, lambda_before=lambda_before,
                       rescale=cfg_rescale)


class FlashFaceLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_FlashFaceLoader",
            display_name="FlashFace Loader (IDP)",
            category=CATEGORY,
            description=("Loads FlashFace's released SD1.5 weights from models/flashface: flashface.ckpt (read safely, "
                         "tensors only), a safetensors copy, or the fp16 file made by "
                         "`python -m guidance.flashface_checkpoint`. Gives the main UNet (5-channel input) with its "
                         "reference UNet attached. Use CLIP and VAE from any SD1.5 checkpoint."),
            inputs=[
                io.Combo.Input("flashface_file", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A file in models/flashface (.ckpt or .safetensors)."),
                io.Combo.Input("weight_dtype", options=["default", "fp16", "bf16", "fp32"], default="default",
                               tooltip="Weight dtype; 'default' lets ComfyUI choose for your device."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def fingerprint_inputs(cls, flashface_file, **kwargs):
        return fingerprint_or_name(lambda n: model_file(FOLDER, n, "FlashFace Loader"), flashface_file)

    @classmethod
    def execute(cls, flashface_file: str, weight_dtype: str) -> io.NodeOutput:
        path = model_file(FOLDER, flashface_file, "FlashFace Loader (IDP): flashface_file")
        return io.NodeOutput(flashface.load_flashface(path, weight_dtype))


class FlashFaceEncodeReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_FlashFaceEncodeReferences",
            display_name="FlashFace Encode References (IDP)",
            category=CATEGORY,
            description=("Turns 1-N photos of one person into FlashFace references: finds the face (or takes "
                         "pre-cropped faces), levels the eyes, pads to a square, resizes and encodes with the VAE "
                         "(posterior mean). The released model was trained with 224 px faces and always 4 references."),
            inputs=[
                io.Image.Input("faces", tooltip="Photos of one person, one face each (a batch)."),
                io.Vae.Input("vae", tooltip="The VAE of the model the references are for (SD1.5's for FlashFace)."),
                io.Combo.Input("crop", options=["detect", "pre-cropped"], default="detect",
                               tooltip="detect: as the released code does, find the face (RetinaFace on the photo "
                                       "padded to 640 px, score > 0.6), crop its rounded box and level the eyes; a "
                                       "photo with several faces uses the largest (the release asks for one). "
                                       "pre-cropped: use the images as they are."),
                io.Int.Input("size", default=RELEASED["face_size"], min=64, max=1024, step=8,
                             tooltip="Face size in pixels after padding to a square (224 for the released model)."),
                io.Int.Input("pad_to", default=RELEASED["num_refs"], min=0, max=64,
                             tooltip="Repeat the faces cyclically up to this many references (the released code "
                                     "always uses 4). 0 = keep the faces as given."),
            ],
            outputs=[FlashFaceRef.Output(display_name="references"), io.Image.Output(display_name="faces")],
        )

    @classmethod
    def execute(cls, faces, vae, crop: str, size: int, pad_to: int) -> io.NodeOutput:
        refs, prepared = flashface.encode_references(faces, vae, crop, size, pad_to)
        return io.NodeOutput(refs, prepared)


class FlashFaceTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_FlashFaceTextEncode",
            display_name="FlashFace Text Encode (IDP)",
            category=CATEGORY,
            description=("Positive and negative prompts for FlashFace, as CLIP Text Encode encodes them; optionally "
                         "with the released demo's fixed postfixes ('best quality, masterpiece, ...' and its long "
                         "negative list) and its 77-token limit."),
            inputs=[
                io.Clip.Input("clip", tooltip="The SD1.5 CLIP (FlashFace uses SD1.5's text encoder unchanged)."),
                io.String.Input("positive", multiline=True, dynamic_prompts=True, default="",
                                tooltip="Positive prompt; include an age word ('young woman'), as the authors advise."),
                io.String.Input("negative", multiline=True, dynamic_prompts=True, default="",
                                tooltip="Negative prompt (also the reference pass context)."),
                io.Boolean.Input("released_postfixes", default=False,
                                 tooltip="Append the released demo's postfixes to both prompts (the negative postfix "
                                         "alone when the negative is empty) and keep the first 77 tokens, as its "
                                         "tokenizer does. Off: the prompts as written, any length."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, clip, positive: str, negative: str, released_postfixes: bool = False) -> io.NodeOutput:
        if released_postfixes:
            positive, negative = flashface.with_released_postfixes(positive, negative)
        return io.NodeOutput(flashface.encode_prompt(clip, positive, released_postfixes),
                             flashface.encode_prompt(clip, negative, released_postfixes))


class FlashFaceMixReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_FlashFaceMixReferences",
            display_name="FlashFace Mix References (IDP)",
            category=CATEGORY,
            description=("Identity mixing (FlashFace supplement, Eq. 1): each person gets their own reference-"
                         "attention term, weighted (1 − weight_b) and weight_b."),
            inputs=[
                FlashFaceRef.Input("references_a", tooltip="First person (may itself be a mix)."),
                FlashFaceRef.Input("references_b", tooltip="Second person."),
                io.Float.Input("weight_b", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Weight of the second person; the first gets 1 − weight_b."),
            ],
            outputs=[FlashFaceRef.Output(display_name="references")],
        )

    @classmethod
    def execute(cls, references_a, references_b, weight_b: float) -> io.NodeOutput:
        return io.NodeOutput(references_a.mix(references_b, weight_b))


class FlashFaceApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_FlashFaceApply",
            display_name="FlashFace Apply (IDP)",
            category=CATEGORY,
            description=("FlashFace's released method on the model from 'FlashFace Loader': reference UNet pass once "
                         "per step, reference attention in 10 decoder blocks, three-way guidance after the launch "
                         "step, face position mask. The MODEL works with KSampler (its cfg is the text guidance); "
                         "the GUIDER is for SamplerCustomAdvanced. ddim + simple is the released sampler."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of 'FlashFace Loader (IDP)'."),
                FlashFaceRef.Input("references", tooltip="From 'FlashFace Encode References (IDP)'."),
                io.Conditioning.Input("positive", tooltip="Positive prompt (for the GUIDER output)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (for the GUIDER output); the reference "
                                                          "pass always uses the negative prompt of the run."),
                *_lambda_inputs(RELEASED),
                io.Float.Input("cfg", default=RELEASED["cfg"], min=0.0, max=30.0, step=0.1,
                               tooltip="Text guidance g of the GUIDER output (7.5 in the released code)."),
                *_schedule_inputs(RELEASED),
                *_box_inputs(RELEASED["box"]),
                io.Mask.Input("face_mask", optional=True,
                              tooltip="Instead of the box: a mask of the image size (1 = face region), sampled to "
                                      "the latent grid like the released mask."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Guider.Output(display_name="GUIDER")],
        )

    @classmethod
    def execute(cls, model, references, positive, negative, lambda_feat, lambda_ref, cfg, launch, lambda_before,
                cfg_rescale, face_x1, face_y1, face_x2, face_y2, face_mask=None) -> io.NodeOutput:
        g = _guidance(lambda_feat, lambda_ref, launch, lambda_before, cfg_rescale)
        m = flashface.apply_flashface(model, references, g, box=(face_x1, face_y1, face_x2, face_y2), mask=face_mask)
        return io.NodeOutput(m, flashface.make_guider(m, positive, negative, cfg))


class FlashFaceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_FlashFaceSampler",
            display_name="FlashFace Sampler (IDP)",
            category=CATEGORY,
            description=("One node with the released defaults: λ_feat 1.2, reference guidance 3.2, text CFG 7.5, "
                         "launch 750, λ before launch 0.85, CFG rescale 0.5, 4 references (repeated if fewer), "
                         "DDIM with trailing timesteps (ComfyUI: ddim + simple). The released demo used "
                         "25-35 steps at 768x768."),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of 'FlashFace Loader (IDP)'."),
                io.Conditioning.Input("positive", tooltip="Positive prompt."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (also the reference pass context)."),
                FlashFaceRef.Input("references", tooltip="From 'FlashFace Encode References (IDP)'."),
                io.Latent.Input("latent_image", tooltip="Empty latent of the output size (768x768 in the demo)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Int.Input("steps", default=RELEASED["steps"], min=1, max=200, tooltip="DDIM steps."),
                io.Float.Input("cfg", default=RELEASED["cfg"], min=0.0, max=30.0, step=0.1, tooltip="Text guidance g."),
                *_lambda_inputs(RELEASED),
                io.Float.Input("launch", default=RELEASED["launch"], min=-1.0, max=1000.0, step=1.0,
                               tooltip="Timestep (0-1000) from which the three-way reference guidance runs."),
                *_box_inputs(RELEASED["box"]),
                io.Int.Input("num_references", default=RELEASED["num_refs"], min=0, max=64,
                             tooltip="Repeat the references cyclically up to this many (4 released); 0 = as given."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, model, positive, negative, references, latent_image, seed, steps, cfg, lambda_feat, lambda_ref,
                launch, face_x1, face_y1, face_x2, face_y2, num_references) -> io.NodeOutput:
        g = _guidance(lambda_feat, lambda_ref, launch, RELEASED["lambda_before"], RELEASED["rescale"])
        m = flashface.apply_flashface(model, references.padded(num_references), g, box=(face_x1, face_y1, face_x2, face_y2))
        latent = comfy.sample.fix_empty_latent_channels(m, latent_image["samples"])
        if latent.shape[1] != 4:
            raise flashface.FlashFaceError(f"the latent has {latent.shape[1]} channels; FlashFace is an SD1.5 model (4): use an "
                                    "Empty Latent Image or a latent from an SD1.5 VAE")
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        # the UI's progress bar and previews, as KSampler gives them
        samples = comfy.sample.sample(m, noise, steps, cfg, RELEASED["sampler"], RELEASED["scheduler"], positive,
                                      negative, latent, denoise=1.0, noise_mask=latent_image.get("noise_mask"),
                                      callback=latent_preview.prepare_callback(m, steps),
                                      disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = {k: v for k, v in latent_image.items() if k != "noise_mask"}
        out["samples"] = samples
        return io.NodeOutput(out)


class FlashFaceTrainingFreeApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDP_FlashFaceTrainingFreeApply",
            display_name="FlashFace Training-free Apply (IDP, extension)",
            category=CATEGORY,
            description=("EXTENSION, not FlashFace's trained model: reference attention for any SD1.5, SDXL or FLUX "
                         "model, with the model itself as reference net. Each chosen self-attention becomes "
                         "(1−λ)·SA(y,y) + λ·SA(y,[y;refs]) (FLUX: reference image keys/values appended to the "
                         "joint attention of the image tokens), with FlashFace's three-way guidance. "
                         "λ_feat = λ_ref = 0 leaves the model unchanged. Weaker identity than a trained model; "
                         "try λ_feat 0.5-1."),
            inputs=[
                io.Model.Input("model", tooltip="Any SD1.5, SDXL or FLUX model."),
                FlashFaceRef.Input("references",
                                   tooltip="From 'FlashFace Encode References (IDP)', with this model's VAE."),
                io.Conditioning.Input("positive", tooltip="Positive prompt (for the GUIDER output)."),
                io.Conditioning.Input("negative",
                                      tooltip="Negative prompt (for the GUIDER output); the reference pass uses the "
                                              "run's negative prompt (FLUX without one: the positive)."),
                *_lambda_inputs(TRAINING_FREE),
                io.Float.Input("cfg", default=RELEASED["cfg"], min=0.0, max=30.0, step=0.1,
                               tooltip="Text guidance g of the GUIDER output (FLUX dev: 1.0)."),
                *_schedule_inputs(TRAINING_FREE),
                io.Combo.Input("blocks", options=list(flashface.TF_BLOCKS), default="decoder",
                               tooltip="decoder: middle and decoder self-attention (UNet; as FlashFace) or the single "
                                       "blocks (FLUX). all: every self-attention / every FLUX block."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Guider.Output(display_name="GUIDER")],
        )

    @classmethod
    def execute(cls, model, references, positive, negative, lambda_feat, lambda_ref, cfg, launch, lambda_before,
                cfg_rescale, blocks) -> io.NodeOutput:
        m = flashface.apply_training_free(model, references, _guidance(lambda_feat, lambda_ref, launch, lambda_before,
                                                                cfg_rescale), blocks=blocks)
        return io.NodeOutput(m, flashface.make_guider(m, positive, negative, cfg))


NODES = [FlashFaceLoader, FlashFaceEncodeReferences, FlashFaceMixReferences, FlashFaceApply, FlashFaceSampler,
         FlashFaceTrainingFreeApply, FlashFaceTextEncode]
