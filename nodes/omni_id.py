"""Omni-ID nodes: load weights, encode 1..N faces into one identity, apply it to SD1.5/SDXL/FLUX, mix, save/load.

Thin adapters: models and encoding in guidance/omni_id.py, injection in guidance/ip_adapter.py, the encoder,
formats and mixing in omni_encoder/.
"""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

import folder_paths

from ..guidance import ip_adapter
from ..guidance.omni_id import Identity, encode_arcface, encode_faces, load_omni_id_model
from ..guidance.patching import apply_injector, model_family
from ..omni_encoder import mixing, weights
from ..errors import InputError
from .folders import escapes_folder, fingerprint_or_name, model_file, register_model_folder, user_file

log = logging.getLogger(__name__)

FOLDER = "omni_id"
IPADAPTER_FOLDER = "ipadapter"


for _name in (FOLDER, IPADAPTER_FOLDER):
    register_model_folder(_name, {".safetensors", ".sft"})

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
            node_id="IDP_IPAdapterFullFaceLoader", display_name="Load IP-Adapter as CLIP Baseline (IDP)",
            category="identity_portrait/omni_id",
            description=("Loads a public IP-Adapter file whose image projection takes all 257 CLIP-H tokens "
                         "(ip-adapter-full-face_sd15) from models/ipadapter, as Omni-ID's CLIP baseline: "
                         "encode faces with it, then apply like an Omni-ID identity."),
            inputs=[io.Combo.Input("ipadapter_file", options=folder_paths.get_filename_list(IPADAPTER_FOLDER),
                                   tooltip="ip-adapter-full-face_sd15.safetensors (or another 257-token IP-Adapter).")],
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
            ],
            outputs=[OmniIDType.Output(display_name="OMNI_ID")])

    @classmethod
    def execute(cls, omni_id_model, clip_vision, faces, crop):
        ident = encode_faces(omni_id_model, clip_vision, faces, crop == "center")
        return io.NodeOutput(ident, ui=identity_ui(ident))


class OmniIDEncodeArcFace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_OmniIDEncodeArcFace", display_name="Identity Encode from ArcFace (IDP)",
            category="identity_portrait/omni_id",
            description=("The appendix's ArcFace baselines: ArcFace embeddings of one person's faces (Face Embedding node) "
                         "→ 256 identity tokens ('arcface' weights), or ArcFace-derived queries over CLIP tokens "
                         "('arcface_clip' weights, which also need CLIP vision and the face crops)."),
            inputs=[
                OmniIDModelType.Input("omni_id_model", tooltip="Weights whose encoder_type is arcface or arcface_clip."),
                io.Custom("IDP_FACE_EMBEDDING").Input("face_embedding", tooltip="ArcFace embeddings of the faces (one person)."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="Needed by arcface_clip weights."),
                io.Image.Input("faces", optional=True, tooltip="The aligned face crops (arcface_clip weights)."),
            ],
            outputs=[OmniIDType.Output(display_name="OMNI_ID")])

    @classmethod
    def execute(cls, omni_id_model, face_embedding, clip_vision=None, faces=None):
        ident = encode_arcface(omni_id_model, face_embedding.embeddings, clip_vision, faces)
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
                io.Float.Input("weight", default=1.0, min=-1.0, max=3.0, step=0.05,
                               tooltip="Strength of the identity attention; 0 leaves the model exactly as it was."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling at which the identity starts acting."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of sampling after which the identity stops acting."),
                io.Combo.Input("apply_to", options=["cond", "cond+uncond"], default="cond",
                               tooltip="cond: only the positive prompt sees the identity (CFG then amplifies it); "
                                       "cond+uncond: both do (weaker, sometimes cleaner)."),
                io.Mask.Input("attn_mask", optional=True,
                              tooltip="Optional region (white = this identity) for several people in one image."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")])

    @classmethod
    def validate_inputs(cls, start_at, end_at, **kwargs):
        return True if start_at <= end_at else f"start_at ({start_at}) must not exceed end_at ({end_at})"

    @classmethod
    def execute(cls, model, omni_id_model, identity, weight, start_at, end_at, apply_to, attn_mask=None):
        adapter = omni_id_model.adapter_for(model)
        inj = ip_adapter.IdentityInjector(adapter, identity.tokens, model_family(model), weight=weight, mask=attn_mask,
                                   start_percent=start_at, end_percent=end_at,
                                   apply_to="cond" if apply_to == "cond" else "both")
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
        if mode == "stack":
            tokens = mixing.stack_identities([a, b])
        else:
            tokens = mixing.mix_identities([a, b], [1.0 - weight_b, weight_b])
        ident = Identity(tokens, identity_a.num_source_images + identity_b.num_source_images, identity_a.encoder_type)
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
