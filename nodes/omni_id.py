"""Omni-ID nodes: load weights, encode 1..N faces into one identity, apply it to SD1.5/SDXL/FLUX, mix, save/load.

Thin adapters: models and encoding in guidance/omni_id.py, injection in guidance/ip_adapter.py, the encoder,
formats and mixing in omni_encoder/.
"""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

import folder_paths

from ..guidance import omni_id
from ..guidance.adapters import vocabulary
from ..guidance.omni_id import Identity, encode_arcface, encode_faces, load_omni_id_model
from ..guidance.patching import apply_injector
from ..omni_encoder import mixing, weights
from ..errors import InputError
from .folders import escapes_folder, fingerprint_or_name, model_file, register_model_folder, user_file

log = logging.getLogger(__name__)

FOLDER = "omni_id"
IPADAPTER_FOLDER = "ipadapter"


register_model_folder(FOLDER, {".safetensors", ".sft"})
# IP-Adapter files also come as .bin (FaceID only so); ComfyUI reads them with torch.load(weights_only=True)
register_model_folder(IPADAPTER_FOLDER, {".safetensors", ".sft", ".bin"})
# XLabs' ComfyUI nodes keep their FLUX IP-Adapter in models/xlabs/ipadapters: list those files too
_XLABS = os.path.join(folder_paths.models_dir, "xlabs", "ipadapters")
if _XLABS not in folder_paths.get_folder_paths(IPADAPTER_FOLDER):
    folder_paths.add_model_folder_path(IPADAPTER_FOLDER, _XLABS)

OmniIDModelType = io.Custom("OMNI_ID_MODEL")
OmniIDType = io.Custom("OMNI_ID")


def identity_ui(ident: Identity) -> dict:
    """UI data for the frontend's identity chip (web/js/idportrait.js)."""
    return {"idp_identity": [{"images": int(sum(ident.num_source_images)), "tokens": int(ident.tokens.shape[-2]),
                              "identities": int(ident.tokens.shape[0])}]}


class OmniIDLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_OmniIDLoader", display_name="Load Omni-ID Model (IDP)", category="identity_portrait/omni_id",
            description=("Loads an Omni-ID weight file (encoder + injection layers for one base family) from "
                         "models/omni_id. No official Omni-ID weights exist: train them with this pack's trainer."),
            inputs=[io.Combo.Input("omni_id_file", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A .safetensors file in models/omni_id (format=omni_id in its metadata).")],
            outputs=[OmniIDModelType.Output(display_name="OMNI_ID_MODEL")])

    @classmethod
    def fingerprint_inputs(cls, omni_id_file, **kwargs):
        return fingerprint_or_name(lambda n: model_file(FOLDER, n, "Load Omni-ID Model"), omni_id_file)

    @classmethod
    def execute(cls, omni_id_file):
        return io.NodeOutput(load_omni_id_model(model_file(FOLDER, omni_id_file, "Load Omni-ID Model: omni_id_file")))


class IPAdapterFullFaceLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_IPAdapterFullFaceLoader", display_name="Load IP-Adapter (IDP)",
            category="identity_portrait/omni_id",
            description=("Loads a public identity adapter from models/ipadapter (or models/xlabs/ipadapters), told by "
                         "its keys, not its name: IP-Adapter basic, plus, plus-face, full-face (Omni-ID's CLIP "
                         "baseline), FaceID, FaceID-Plus (v1/v2) for SD1.5 and SDXL (ViT-H or ViT-bigG), and XLabs' "
                         "FLUX IP-Adapter. Encode faces with it (FaceID kinds: from ArcFace), then apply like an "
                         "Omni-ID identity. A file of another kind is refused with what it is."),
            inputs=[io.Combo.Input("ipadapter_file", options=folder_paths.get_filename_list(IPADAPTER_FOLDER),
                                   tooltip="e.g. ip-adapter-plus-face_sdxl_vit-h.safetensors, "
                                           "ip-adapter-full-face_sd15.safetensors, ip-adapter-faceid-plusv2_sd15.bin, "
                                           "XLabs ip_adapter.safetensors (FLUX).")],
            outputs=[OmniIDModelType.Output(display_name="OMNI_ID_MODEL")])

    @classmethod
    def fingerprint_inputs(cls, ipadapter_file, **kwargs):
        return fingerprint_or_name(lambda n: model_file(IPADAPTER_FOLDER, n, "Load IP-Adapter"), ipadapter_file)

    @classmethod
    def execute(cls, ipadapter_file):
        return io.NodeOutput(load_omni_id_model(model_file(IPADAPTER_FOLDER, ipadapter_file,
                                                           "Load IP-Adapter as CLIP Baseline: ipadapter_file")))


class OmniIDEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_OmniIDEncode", display_name="Omni-ID Encode Faces (IDP)", category="identity_portrait/omni_id",
            description=("Encodes any number of face images of ONE person into one fixed-size identity "
                         "(256 tokens for Omni-ID; 257 per image for the CLIP baseline). Feed aligned face crops "
                         "(the face tools' Align node), all of the same person."),
            inputs=[
                OmniIDModelType.Input("omni_id_model", tooltip="From Load Omni-ID Model or the CLIP-baseline loader."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-H/14 (the file IP-Adapter uses): its penultimate "
                                                           "257 tokens per image feed the encoder."),
                io.Image.Input("faces", tooltip="A batch of 1..N aligned face crops of the same person."),
                io.Combo.Input("crop", options=["center", "none"], default="center",
                               tooltip="How CLIP preprocessing fits non-square crops to 224 px."),
                io.Image.Input("negative_image", optional=True,
                               tooltip="What the negative (uncond) rows attend to with apply_to 'cond, negative on "
                                       "uncond'. Empty: the adapter's own 'no image' (IP-Adapter files: CLIP of an "
                                       "all-zero pixel tensor, as the original; Omni-ID weights: none)."),
                io.Combo.Input("combine_embeds", options=list(vocabulary.COMBINE_EMBEDS), default="concat", optional=True,
                               tooltip="Several faces: concat keeps every image (Omni-ID: all into its encoder); add, "
                                       "subtract (first minus the others' mean), average, norm average combine the "
                                       "per-image CLIP features first."),
            ],
            outputs=[OmniIDType.Output(display_name="OMNI_ID")])

    @classmethod
    def execute(cls, omni_id_model, clip_vision, faces, crop, negative_image=None, combine_embeds="concat"):
        ident = encode_faces(omni_id_model, clip_vision, faces, crop == "center", negative=negative_image,
                             combine=combine_embeds)
        return io.NodeOutput(ident, ui=identity_ui(ident))


class OmniIDEncodeArcFace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_OmniIDEncodeArcFace", display_name="Identity Encode from ArcFace (IDP)",
            category="identity_portrait/omni_id",
            description=("ArcFace embeddings of one person's faces (Face Embedding node) → one identity: IP-Adapter "
                         "FaceID / FaceID-Plus files (Plus also needs CLIP vision and the aligned face crops, one per "
                         "embedding), or the Omni-ID appendix's ArcFace baselines ('arcface' weights: 256 tokens; "
                         "'arcface_clip': ArcFace-derived queries over CLIP tokens)."),
            inputs=[
                OmniIDModelType.Input("omni_id_model", tooltip="An IP-Adapter FaceID / FaceID-Plus file, or Omni-ID "
                                                               "weights whose encoder_type is arcface or arcface_clip."),
                io.Custom("IDP_FACE_EMBEDDING").Input("face_embedding", tooltip="ArcFace embeddings of the faces (one person)."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="Needed by FaceID-Plus and arcface_clip (ViT-H)."),
                io.Image.Input("faces", optional=True, tooltip="The aligned face crops (FaceID-Plus, arcface_clip)."),
                io.Combo.Input("combine_embeds", options=list(vocabulary.COMBINE_EMBEDS), default="concat", optional=True,
                               tooltip="Several faces: concat keeps every image's tokens; add, subtract, average, "
                                       "norm average combine the per-image embeddings first."),
                io.Combo.Input("faceid_plus", options=["v2 (shortcut)", "v1"], default="v2 (shortcut)", optional=True,
                               tooltip="FaceID-Plus files only (v1 and v2 have the same keys): v2 adds the ArcFace "
                                       "tokens back (x + scale · resampler output), v1 does not."),
                io.Float.Input("shortcut_scale", default=1.0, min=0.0, max=5.0, step=0.05, optional=True,
                               tooltip="FaceID-Plus v2: scale of the CLIP (structure) part."),
            ],
            outputs=[OmniIDType.Output(display_name="OMNI_ID")])

    @classmethod
    def execute(cls, omni_id_model, face_embedding, clip_vision=None, faces=None, combine_embeds="concat",
                faceid_plus="v2 (shortcut)", shortcut_scale=1.0):
        ident = encode_arcface(omni_id_model, face_embedding.embeddings, clip_vision, faces, combine=combine_embeds,
                               shortcut=faceid_plus.startswith("v2"), shortcut_scale=shortcut_scale)
        return io.NodeOutput(ident, ui=identity_ui(ident))


class OmniIDApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_OmniIDApply", display_name="Apply Omni-ID (IDP)", category="identity_portrait/omni_id",
            description=("Injects an identity into a copy of the model through decoupled attention (IP-Adapter style): "
                         "SD1.5/SDXL cross-attention layers, or every FLUX double and single block. The input model is "
                         "not changed. Chain several to place several identities (use masks)."),
            inputs=[
                io.Model.Input("model"),
                OmniIDModelType.Input("omni_id_model"),
                OmniIDType.Input("identity", tooltip="From Omni-ID Encode, Mix or Load Identity."),
                io.Float.Input("weight", default=1.0, min=vocabulary.WEIGHT_MIN, max=vocabulary.WEIGHT_MAX, step=0.05,
                               tooltip="Strength of the identity attention; 0 leaves the model exactly as it was."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling at which the identity starts acting."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling after which the identity stops acting."),
                io.Combo.Input("apply_to", options=list(omni_id.APPLY_TO), default=omni_id.NEGATIVE_ON_UNCOND,
                               tooltip="cond, negative on uncond: the positive prompt sees the identity, the negative "
                                       "sees the identity's negative (IP-Adapter files: the original's 'no image', or "
                                       "the encoded negative image; Omni-ID weights: only a negative image, else "
                                       "nothing). cond: only the positive prompt sees the identity (CFG amplifies it). "
                                       "cond+uncond: both see it (weaker). uncond: only the negative sees it (steers "
                                       "away from that face)."),
                io.Mask.Input("attn_mask", optional=True,
                              tooltip="Optional region (white = this identity) for several people in one image."),
                io.Combo.Input("weight_type", options=list(vocabulary.WEIGHT_TYPES), default="linear", optional=True,
                               tooltip="How the weight is spread over the layers: linear = the same everywhere; ease "
                                       "in/out, in-out, weak/strong parts; style transfer / composition (SDXL, "
                                       "InstantStyle's two attention modules)."),
                io.Combo.Input("embeds_scaling", options=list(vocabulary.EMBEDS_SCALING), default="V only", optional=True,
                               tooltip="V only: out + weight · attention (the original IP-Adapter). K+V: keys and "
                                       "values scaled, so the weight also sharpens the identity attention."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")])

    @classmethod
    def validate_inputs(cls, start_at, end_at, **kwargs):
        return True if start_at <= end_at else f"start_at ({start_at}) must not exceed end_at ({end_at})"

    @classmethod
    def execute(cls, model, omni_id_model, identity, weight, start_at, end_at, apply_to, attn_mask=None,
                weight_type="linear", embeds_scaling="V only"):
        inj = omni_id.identity_injector(omni_id_model, model, identity, weight, start_at, end_at, apply_to, attn_mask,
                                   weight_type, embeds_scaling)
        return io.NodeOutput(apply_injector(model, inj))


class IdentityMix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_IdentityMix", display_name="Mix Identities (IDP)", category="identity_portrait/omni_id",
            description=("Combines two identities: 'interpolate' blends them (weight 0 = identity_a exactly, 1 = identity_b "
                         "exactly); 'stack' concatenates their tokens so the model attends to both (Infinite-ID / "
                         "FlashFace style identity mixing)."),
            inputs=[
                OmniIDType.Input("identity_a"), OmniIDType.Input("identity_b"),
                io.Combo.Input("mode", options=["interpolate", "stack"], default="interpolate",
                               tooltip="interpolate: weighted average of tokens; stack: token concatenation."),
                io.Float.Input("weight_b", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of identity_b when interpolating (ignored by stack)."),
            ],
            outputs=[OmniIDType.Output(display_name="OMNI_ID")])

    @classmethod
    def execute(cls, identity_a, identity_b, mode, weight_b):
        a = identity_a.tokens
        b = identity_b.tokens.to(a.device, a.dtype)   # loaded (CPU) and encoded (intermediate device) identities
        combine = (lambda x, y: mixing.stack_identities([x, y])) if mode == "stack" else \
            (lambda x, y: mixing.mix_identities([x, y], [1.0 - weight_b, weight_b]))
        ua, ub = identity_a.uncond_tokens, identity_b.uncond_tokens
        uncond = None   # the negative mixes like the identity when both have one that fits
        if ua is not None and ub is not None and (mode == "stack" or ua.shape == ub.shape):
            uncond = combine(ua, ub.to(ua.device, ua.dtype))
        ident = Identity(combine(a, b), identity_a.num_source_images + identity_b.num_source_images,
                         identity_a.encoder_type, uncond, identity_a.negative if uncond is not None else "")
        return io.NodeOutput(ident, ui=identity_ui(ident))


class IdentitySave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_IdentitySave", display_name="Save Identity (IDP)", category="identity_portrait/omni_id",
            description="Saves an encoded identity as .safetensors in output/identities (reuse it without the photos).",
            inputs=[OmniIDType.Input("identity"),
                    io.String.Input("filename_prefix", default="identities/identity",
                                    tooltip="Path under the output folder.")],
            outputs=[], is_output_node=True)

    @classmethod
    def execute(cls, identity, filename_prefix):
        _check_prefix(filename_prefix)
        full, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory())
        path = os.path.join(full, f"{name}_{counter:05}_.safetensors")
        meta = {"encoder_type": identity.encoder_type}
        if len(identity.num_source_images) == identity.tokens.shape[0]:
            meta["num_source_images"] = identity.num_source_images
        weights.save_identity(path, identity.tokens, meta)
        return io.NodeOutput(ui={"text": [os.path.relpath(path, folder_paths.get_output_directory())]})


PREFIX_MAX_BYTES = 200   # file name part; the counter and extension add 19 (file systems allow 255)


def _check_prefix(prefix: str) -> None:
    """A save prefix must name a file under the output folder (checked before ComfyUI's helper, whose own
    refusal prints the server's paths)."""
    what = "Save Identity (IDP): filename_prefix"
    if not isinstance(prefix, str) or not prefix.strip():
        raise InputError(f"{what} is empty; give a name such as 'identities/identity'")
    if any(ord(c) < 32 for c in prefix):
        raise InputError(f"{what} contains a control character (e.g. NUL); use letters, digits, '-', '_' and '/'")
    if escapes_folder(prefix):
        raise InputError(f"{what} must be a path inside the output folder, without '..' or a leading '/' "
                         "(e.g. 'identities/identity')")
    long = [p for p in prefix.replace("\\", "/").split("/") if len(p.encode("utf-8")) > PREFIX_MAX_BYTES]
    if long or len(prefix.encode("utf-8")) > 1024:
        raise InputError(f"{what} is too long: each folder or file name may have at most {PREFIX_MAX_BYTES} bytes "
                         "(and the whole prefix 1024); use a shorter name")


class IdentityLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_IdentityLoad", display_name="Load Identity (IDP)", category="identity_portrait/omni_id",
            description=("Loads an identity saved by Save Identity: from ComfyUI's input folder, or (marked "
                         "[output]) from output/identities, where Save Identity writes."),
            inputs=[io.Combo.Input("identity_file", options=_identity_files(),
                                   tooltip="A .safetensors identity file in the input folder, or one Save Identity "
                                           "wrote to output/identities ('... [output]').")],
            outputs=[OmniIDType.Output(display_name="OMNI_ID")])

    @classmethod
    def fingerprint_inputs(cls, identity_file, **kwargs):
        # overwriting the file and queueing again must load the new identity, not ComfyUI's cached result
        return fingerprint_or_name(lambda n: user_file(n, "Load Identity"), identity_file)

    @classmethod
    def execute(cls, identity_file):
        path = user_file(identity_file, "Load Identity (IDP): identity_file")
        tokens, meta = weights.load_identity(path, name=identity_file)
        return io.NodeOutput(Identity(tokens, list(meta.get("num_source_images") or []),
                                      meta.get("encoder_type", "omni_id")))


def _safetensors_under(root: str) -> list:
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files if f.endswith(".safetensors")]
    return sorted(out)


def _identity_files() -> list:
    saved = os.path.join(folder_paths.get_output_directory(), "identities")
    return _safetensors_under(folder_paths.get_input_directory()) + [
        f"{os.path.join('identities', f)} [output]" for f in _safetensors_under(saved)]


NODES = [OmniIDLoader, IPAdapterFullFaceLoader, OmniIDEncode, OmniIDEncodeArcFace, OmniIDApply, IdentityMix, IdentitySave, IdentityLoad]
