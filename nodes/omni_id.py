"""Omni-ID nodes: load weights, encode 1..N faces into one identity, apply it to SD1.5/SDXL/FLUX, mix, save/load.

Math lives in omni_encoder/ (encoders, formats, mixing) and guidance/ip_adapter.py (injection).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..guidance import ip_adapter as ipa
from ..guidance.patching import apply_injector, model_family
from ..omni_encoder import mixing, weights
from ..omni_encoder.baselines import CLIPTokensEncoder
from ..omni_encoder.encoder import OmniIDConfig
from .folders import register_model_folder
from .inputs import rgb_images
from ..errors import OmniIDError

log = logging.getLogger(__name__)

FOLDER = "omni_id"
IPADAPTER_FOLDER = "ipadapter"


for _name in (FOLDER, IPADAPTER_FOLDER):
    register_model_folder(_name, {".safetensors", ".sft"})

OmniIDModelType = io.Custom("OMNI_ID_MODEL")
OmniIDType = io.Custom("OMNI_ID")


@dataclass
class OmniIDModel:
    """An identity encoder with the injection adapter trained with it, for one base family."""
    encoder: torch.nn.Module
    adapter: torch.nn.Module
    family: str
    meta: Optional[weights.IdentityWeightsMeta] = None
    source: str = ""

    @property
    def encoder_type(self) -> str:
        return self.meta.config.encoder_type if self.meta else "clip"


@dataclass
class Identity:
    """Encoded identity tokens (N_id, L, C) and where they came from."""
    tokens: torch.Tensor
    num_source_images: list = field(default_factory=list)
    encoder_type: str = "omni_id"

    def __repr__(self):   # shown in the UI and logs
        return f"Identity({tuple(self.tokens.shape)}, from {self.num_source_images} image(s))"


def identity_ui(ident: Identity) -> dict:
    """UI data for the frontend's identity chip (web/js/idportrait.js)."""
    return {"idp_identity": [{"images": int(sum(ident.num_source_images)), "tokens": int(ident.tokens.shape[-2]),
                              "identities": int(ident.tokens.shape[0])}]}


def load_omni_id_model(path: str) -> OmniIDModel:
    """Our format (metadata format=omni_id) or a public IP-Adapter file (CLIP baseline, SD1.5/SDXL)."""
    md = weights.read_metadata(path) if path.endswith((".safetensors", ".sft")) else {}
    if md.get("format") == weights.WEIGHTS_FORMAT:
        encoder, meta, proj_sd = weights.load_identity_encoder(path)
        adapter = ipa.adapter_from_state_dict(meta.base_family, proj_sd)
        return OmniIDModel(encoder, adapter, meta.base_family, meta, os.path.basename(path))
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    if any(k.startswith("ip_adapter.") for k in sd) and any(k.startswith("image_proj.") for k in sd):
        kind = public_ip_adapter_kind(sd)
        if kind != "full-face":
            raise OmniIDError(f"{os.path.basename(path)} is a {kind} IP-Adapter; this loader takes the full-face file "
                             "(ip-adapter-full-face_sd15: 257 CLIP tokens through an MLP projection). Use an "
                             f"IP-Adapter pack for {kind} files")
        dim = sd["image_proj.proj.0.weight"].shape[1]   # width of the CLIP tokens the projection takes
        cfg = OmniIDConfig(encoder_type="clip", token_dim=dim, clip_dim=dim, heads=1)
        return OmniIDModel(CLIPTokensEncoder(cfg), _PublicIPAdapter(sd), "unet", None, os.path.basename(path))
    raise OmniIDError(f"{os.path.basename(path)} is neither an Omni-ID weight file (format=omni_id in its metadata) nor an "
                     "IP-Adapter file (image_proj.* / ip_adapter.* keys): put Omni-ID files in models/omni_id and "
                     "IP-Adapter 'full face' files in models/ipadapter")


def public_ip_adapter_kind(sd: dict) -> str:
    """Which public IP-Adapter an ``image_proj.*`` state dict is (by its projection's layout)."""
    keys = set(sd)
    if "image_proj.latents" in keys:
        return "plus (Resampler)"
    if "image_proj.norm.weight" in keys:
        return "FaceID" if "image_proj.proj.0.weight" in keys else "basic"
    if {"image_proj.proj.0.weight", "image_proj.proj.2.weight", "image_proj.proj.3.weight"} <= keys:
        return "full-face"
    return "unrecognised"


class _PublicIPAdapter:
    """Public IP-Adapter weights, converted to our layout once the target UNet is known."""

    def __init__(self, sd):
        self.sd = sd

    def for_model(self, diffusion_model) -> ipa.SDIdentityAdapter:
        conv = ipa.convert_public_ip_adapter(self.sd, diffusion_model)
        return ipa.adapter_from_state_dict("unet", conv)


def _adapter_for(m: OmniIDModel, model) -> torch.nn.Module:
    family = model_family(model)
    if family not in weights.BASE_FAMILIES:
        raise OmniIDError(f"Omni-ID injection supports SD1.5, SDXL and FLUX models; this MODEL is {family}")
    dm = model.model.diffusion_model
    if isinstance(m.adapter, _PublicIPAdapter):
        if family == "flux":
            raise OmniIDError("an SD IP-Adapter file cannot be applied to a FLUX model: use an Omni-ID file for flux")
        adapter = m.adapter.for_model(dm)
    else:
        weights.check_base_family(m.meta, family)
        adapter = m.adapter
    ipa.check_adapter_fits(adapter, family, dm)
    return adapter


def run_encoder(encoder: torch.nn.Module, **inputs) -> torch.Tensor:
    """Runs the (small, plain torch) identity encoder on the compute device and puts it back.

    Moved as a whole: a ModelPatcher's partial (low-VRAM) load would leave its plain layers and the learned
    queries on the CPU. With --novram it stays on the offload device.
    """
    dev = mm.get_torch_device() if mm.vram_state != mm.VRAMState.NO_VRAM else mm.unet_offload_device()
    if dev.type != "cpu":
        mm.free_memory(2 * sum(p.numel() * p.element_size() for p in encoder.parameters()), dev)
    first = next(encoder.parameters(), None)   # the plain CLIP baseline has none
    home = first.device if first is not None else torch.device("cpu")
    try:
        encoder.to(dev)
        with torch.no_grad():
            return encoder(**{k: v.to(dev) if torch.is_tensor(v) else v for k, v in inputs.items()})
    finally:
        encoder.to(home)


def encode_faces(m: OmniIDModel, clip_vision, images: torch.Tensor, crop: bool) -> Identity:
    """IMAGE (N, H, W, 3) of one person's aligned faces → one identity (1, L, C)."""
    images = rgb_images(images, "Omni-ID Encode", "connect one or more face images of the same person")
    if clip_vision is None:
        raise OmniIDError(f"the {m.encoder_type} encoder needs CLIP vision tokens: connect a CLIP_VISION model (ViT-H/14)")
    pbar = comfy.utils.ProgressBar(images.shape[0] + 1)
    toks = []
    for i in range(images.shape[0]):   # one image at a time: bounded memory for large reference sets
        toks.append(clip_vision.encode_image(images[i:i + 1], crop=crop)["penultimate_hidden_states"])
        pbar.update(1)
    clip_tokens = torch.cat(toks)[None].float()   # (1, N, 257, C)
    cfg = getattr(m.encoder, "config", None)
    if cfg is not None and clip_tokens.shape[-1] != cfg.clip_dim:
        raise OmniIDError(f"the CLIP vision model gives tokens of width {clip_tokens.shape[-1]} but these Omni-ID weights "
                         f"expect {cfg.clip_dim} (CLIP-H/14 is 1280): load the matching CLIP vision model")
    tokens = run_encoder(m.encoder, clip_tokens=clip_tokens)
    pbar.update(1)
    return Identity(tokens.to(mm.intermediate_device()).float(), [int(images.shape[0])], m.encoder_type)


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
    def execute(cls, omni_id_file):
        return io.NodeOutput(load_omni_id_model(folder_paths.get_full_path_or_raise(FOLDER, omni_id_file)))


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
    def execute(cls, ipadapter_file):
        return io.NodeOutput(load_omni_id_model(folder_paths.get_full_path_or_raise(IPADAPTER_FOLDER, ipadapter_file)))


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
        m = omni_id_model
        if m.encoder_type not in ("arcface", "arcface_clip"):
            raise OmniIDError(f"these weights are an {m.encoder_type} encoder: use 'Omni-ID Encode Faces' instead")
        emb = face_embedding.embeddings
        if emb.shape[0] == 0:
            raise OmniIDError("no ArcFace embedding: the Face Embedding node found no face")
        clip_tokens = None
        if m.encoder_type == "arcface_clip":
            if faces is not None:
                faces = rgb_images(faces, "Omni-ID Encode ArcFace (faces)", "connect the aligned face crops")
            if clip_vision is None or faces is None:
                raise OmniIDError("arcface_clip weights also need CLIP vision and the face crops: connect both")
            clip_tokens = torch.cat([clip_vision.encode_image(faces[i:i + 1], crop=True)["penultimate_hidden_states"]
                                     for i in range(faces.shape[0])])[None].float()
        tokens = run_encoder(m.encoder, clip_tokens=clip_tokens, arcface=emb[None].float())
        ident = Identity(tokens.to(mm.intermediate_device()).float(), [int(emb.shape[0])], m.encoder_type)
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
        adapter = _adapter_for(omni_id_model, model)
        inj = ipa.IdentityInjector(adapter, identity.tokens, model_family(model), weight=weight, mask=attn_mask,
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
        full, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory())
        path = os.path.join(full, f"{name}_{counter:05}_.safetensors")
        meta = {"encoder_type": identity.encoder_type}
        if len(identity.num_source_images) == identity.tokens.shape[0]:
            meta["num_source_images"] = identity.num_source_images
        weights.save_identity(path, identity.tokens, meta)
        return io.NodeOutput(ui={"text": [os.path.relpath(path, folder_paths.get_output_directory())]})


class IdentityLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDP_IdentityLoad", display_name="Load Identity (IDP)", category="identity_portrait/omni_id",
            description="Loads an identity saved by Save Identity (copy the file into ComfyUI's input folder).",
            inputs=[io.Combo.Input("identity_file", options=_input_identities(),
                                   tooltip="A .safetensors identity file in the input folder.")],
            outputs=[OmniIDType.Output(display_name="OMNI_ID")])

    @classmethod
    def execute(cls, identity_file):
        path = folder_paths.get_annotated_filepath(identity_file)
        tokens, meta = weights.load_identity(path)
        return io.NodeOutput(Identity(tokens, list(meta.get("num_source_images") or []),
                                      meta.get("encoder_type", "omni_id")))


def _input_identities() -> list:
    root = folder_paths.get_input_directory()
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files if f.endswith(".safetensors")]
    return sorted(out)


NODES = [OmniIDLoader, IPAdapterFullFaceLoader, OmniIDEncode, OmniIDEncodeArcFace, OmniIDApply, IdentityMix, IdentitySave, IdentityLoad]
