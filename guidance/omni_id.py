"""Omni-ID models inside ComfyUI: weight files → an identity encoder and its injection adapter under ComfyUI's
memory management; one person's faces → one identity.

An ``OmniIDModel`` holds two ModelPatchers: the encoder (a small plain-torch module, loaded whole when it runs)
and the adapter (ComfyUI cast layers, loaded with the model it is applied to: ip_adapter.adapter_patcher). A
public IP-Adapter "full face" file (Omni-ID's CLIP baseline) is converted to the adapter layout once per UNet
architecture it is applied to.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ..errors import OmniIDError
from ..face.types import rgb_images
from ..omni_encoder import weights
from ..omni_encoder.baselines import CLIPTokensEncoder
from ..omni_encoder.encoder import OmniIDConfig
from . import ip_adapter
from .patching import model_family


def _patcher(module: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    # a plain torch module, moved whole when loaded (see run_encoder): never the lazy-casting dynamic patcher
    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@dataclass
class OmniIDModel:
    """An identity encoder with the injection adapter trained with it, for one base family.

    ``encoder`` / ``adapter``: ModelPatchers (plain modules given here are wrapped). ``adapter`` is None for a
    public IP-Adapter file, whose adapter ``adapter_for`` converts for the UNet it is applied to.
    """
    encoder: object
    adapter: object
    family: str
    meta: Optional[weights.IdentityWeightsMeta] = None
    source: str = ""
    public_ip_adapter: Optional[dict] = None
    _converted: dict = field(default_factory=dict, repr=False)   # UNet layout -> converted adapter patcher

    def __post_init__(self):
        if isinstance(self.encoder, torch.nn.Module):
            self.encoder = _patcher(self.encoder)
        if isinstance(self.adapter, torch.nn.Module):
            self.adapter = ip_adapter.adapter_patcher(self.adapter)

    @property
    def encoder_type(self) -> str:
        return self.meta.config.encoder_type if self.meta else "clip"

    @property
    def encoder_module(self) -> torch.nn.Module:
        return self.encoder.model

    def adapter_for(self, model) -> comfy.model_patcher.ModelPatcher:
        """The adapter for ``model`` (a ModelPatcher), checked against its architecture; a clear error otherwise."""
        family = model_family(model)
        if family not in weights.BASE_FAMILIES:
            raise OmniIDError(f"Omni-ID injection supports SD1.5, SDXL and FLUX models; this MODEL is {family}")
        dm = model.model.diffusion_model
        if self.public_ip_adapter is not None:
            if family == "flux":
                raise OmniIDError("an SD IP-Adapter file cannot be applied to a FLUX model: use an Omni-ID file for flux")
            layout = tuple(sorted(ip_adapter.SDIdentityAdapter.inner_dims_of(dm).items()))
            if layout not in self._converted:
                conv = ip_adapter.convert_public_ip_adapter(self.public_ip_adapter, dm)
                self._converted[layout] = ip_adapter.adapter_patcher(ip_adapter.adapter_from_state_dict("unet", conv))
            patcher = self._converted[layout]
        else:
            weights.check_base_family(self.meta, family)
            patcher = self.adapter
        ip_adapter.check_adapter_fits(patcher.model, family, dm)
        return patcher


@dataclass
class Identity:
    """Encoded identity tokens (N_id, L, C) and where they came from."""
    tokens: torch.Tensor
    num_source_images: list = field(default_factory=list)
    encoder_type: str = "omni_id"

    def __repr__(self):   # shown in the UI and logs
        return f"Identity({tuple(self.tokens.shape)}, from {self.num_source_images} image(s))"


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


def load_omni_id_model(path: str) -> OmniIDModel:
    """Our format (metadata format=omni_id) or a public IP-Adapter "full face" file (CLIP baseline, SD1.5/SDXL)."""
    name = os.path.basename(path)
    md = weights.read_metadata(path) if path.endswith((".safetensors", ".sft")) else {}
    if md.get("format") == weights.WEIGHTS_FORMAT:
        encoder, meta, proj_sd = weights.load_identity_encoder(path)
        adapter = ip_adapter.adapter_from_state_dict(meta.base_family, proj_sd)
        return OmniIDModel(encoder.eval(), adapter, meta.base_family, meta, name)
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    weights.require_finite(sd, name)
    if any(k.startswith("ip_adapter.") for k in sd) and any(k.startswith("image_proj.") for k in sd):
        kind = public_ip_adapter_kind(sd)
        if kind != "full-face":
            raise OmniIDError(f"{name} is a {kind} IP-Adapter; this loader takes the full-face file "
                              "(ip-adapter-full-face_sd15: 257 CLIP tokens through an MLP projection). Use an "
                              f"IP-Adapter pack for {kind} files")
        dim = sd["image_proj.proj.0.weight"].shape[1]   # width of the CLIP tokens the projection takes
        cfg = OmniIDConfig(encoder_type="clip", token_dim=dim, clip_dim=dim, heads=1)
        return OmniIDModel(CLIPTokensEncoder(cfg), None, "unet", None, name, public_ip_adapter=sd)
    raise OmniIDError(f"{name} is neither an Omni-ID weight file (format=omni_id in its metadata) nor an "
                      "IP-Adapter file (image_proj.* / ip_adapter.* keys): put Omni-ID files in models/omni_id and "
                      "IP-Adapter 'full face' files in models/ipadapter")


def run_encoder(encoder: comfy.model_patcher.ModelPatcher, **inputs) -> torch.Tensor:
    """Runs the identity encoder where ComfyUI loaded it.

    Loaded whole (``force_full_load``): a partial low-VRAM load would leave its plain layers and learned queries
    on the offload device. ComfyUI keeps it loaded while memory allows and offloads it like any other model.
    """
    mm.load_models_gpu([encoder], force_full_load=True)
    first = next(encoder.model.parameters(), None)   # the plain CLIP baseline has none
    dev = first.device if first is not None else encoder.load_device
    with torch.no_grad():
        return encoder.model(**{k: v.to(dev) if torch.is_tensor(v) else v for k, v in inputs.items()})


def encode_faces(m: OmniIDModel, clip_vision, images: torch.Tensor, crop: bool) -> Identity:
    """IMAGE (N, H, W, 3) of one person's aligned faces → one identity (1, L, C)."""
    images = rgb_images(images, "Omni-ID Encode", "connect one or more face images of the same person", error=OmniIDError)
    if clip_vision is None:
        raise OmniIDError(f"the {m.encoder_type} encoder needs CLIP vision tokens: connect a CLIP_VISION model (ViT-H/14)")
    pbar = comfy.utils.ProgressBar(images.shape[0] + 1)
    toks = []
    for i in range(images.shape[0]):   # one image at a time: bounded memory for large reference sets
        mm.throw_exception_if_processing_interrupted()
        toks.append(clip_vision.encode_image(images[i:i + 1], crop=crop)["penultimate_hidden_states"])
        pbar.update(1)
    clip_tokens = torch.cat(toks)[None].float()   # (1, N, 257, C)
    cfg = getattr(m.encoder_module, "config", None)
    if cfg is not None and clip_tokens.shape[-1] != cfg.clip_dim:
        raise OmniIDError(f"the CLIP vision model gives tokens of width {clip_tokens.shape[-1]} but these Omni-ID weights "
                          f"expect {cfg.clip_dim} (CLIP-H/14 is 1280): load the matching CLIP vision model")
    tokens = run_encoder(m.encoder, clip_tokens=clip_tokens)
    pbar.update(1)
    return Identity(tokens.to(mm.intermediate_device()).float(), [int(images.shape[0])], m.encoder_type)


def encode_arcface(m: OmniIDModel, embeddings: torch.Tensor, clip_vision=None,
                   faces: Optional[torch.Tensor] = None) -> Identity:
    """The appendix's ArcFace baselines: ArcFace embeddings (N, 512) of one person → one identity."""
    if m.encoder_type not in ("arcface", "arcface_clip"):
        raise OmniIDError(f"these weights are an {m.encoder_type} encoder: use 'Omni-ID Encode Faces' instead")
    if embeddings.shape[0] == 0:
        raise OmniIDError("no ArcFace embedding: the Face Embedding node found no face")
    clip_tokens = None
    if m.encoder_type == "arcface_clip":
        if faces is not None:
            faces = rgb_images(faces, "Omni-ID Encode ArcFace (faces)", "connect the aligned face crops",
                               error=OmniIDError)
        if clip_vision is None or faces is None:
            raise OmniIDError("arcface_clip weights also need CLIP vision and the face crops: connect both")
        clip_tokens = torch.cat([clip_vision.encode_image(faces[i:i + 1], crop=True)["penultimate_hidden_states"]
                                 for i in range(faces.shape[0])])[None].float()
    tokens = run_encoder(m.encoder, clip_tokens=clip_tokens, arcface=embeddings[None].float())
    return Identity(tokens.to(mm.intermediate_device()).float(), [int(embeddings.shape[0])], m.encoder_type)
