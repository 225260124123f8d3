"""Omni-ID models inside ComfyUI: weight files → an identity encoder and its injection adapter under ComfyUI's
memory management; one person's faces → one identity.

An ``OmniIDModel`` holds two ModelPatchers: the encoder (a small plain-torch module, loaded whole when it runs)
and the adapter (ComfyUI cast layers, loaded with the model it is applied to: ip_adapter.adapter_patcher). A
public identity-adapter file (guidance/adapters/public.py: IP-Adapter basic / plus / full-face / FaceID /
FaceID-Plus, XLabs FLUX) gives an encoder that is its image-prompt projection (full-face: the CLIP tokens
themselves, Omni-ID's CLIP baseline) and an adapter converted once per architecture it is applied to.

Encoding also makes the identity's negative, what the uncond rows attend to with apply_to "cond, negative on
uncond": the negative image(s) if connected, else the original IP-Adapter's "no image" (CLIP of an all-zero
pixel tensor for the CLIP-token kinds, a zero embedding for basic and FaceID, CLIP of a black image for XLabs).
Omni-ID weights define no such uncond (their training drops the identity, if at all, by zeroing the tokens):
without a negative image their uncond rows are left as they are.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ..errors import OmniIDError
from ..face.types import rgb_images
from ..omni_encoder import trunk_identity, weights
from ..omni_encoder.baselines import CLIPTokensEncoder
from ..omni_encoder.encoder import OmniIDConfig
from . import ip_adapter
from .adapters import vocabulary
from .adapters.public import PublicAdapter, read_public_adapter, what_is
from .patching import model_family

log = logging.getLogger(__name__)


def _patcher(module: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    # a plain torch module, moved whole when loaded (see run_encoder): never the lazy-casting dynamic patcher
    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@dataclass
class OmniIDModel:
    """An identity encoder with the injection adapter trained with it, for one base family.

    ``encoder`` / ``adapter``: ModelPatchers (plain modules given here are wrapped). ``adapter`` is None for a
    public adapter file (``public``), whose adapter ``adapter_for`` converts for the model it is applied to.
    """
    encoder: object
    adapter: object
    family: str
    meta: Optional[weights.IdentityWeightsMeta] = None
    source: str = ""
    public: Optional[PublicAdapter] = None
    _converted: dict = field(default_factory=dict, repr=False)   # model layout -> converted adapter patcher

    def __post_init__(self):
        if isinstance(self.encoder, torch.nn.Module):
            self.encoder = _patcher(self.encoder)
        if isinstance(self.adapter, torch.nn.Module):
            self.adapter = ip_adapter.adapter_patcher(self.adapter)

    @property
    def encoder_type(self) -> str:
        if self.meta:
            return self.meta.config.encoder_type
        if self.public is None or self.public.kind == "full-face":
            return "clip"
        return "ip_adapter_" + self.public.kind.replace("-", "_")

    @property
    def encoder_module(self) -> torch.nn.Module:
        return self.encoder.model

    @property
    def features(self) -> tuple:
        """What the encoder takes: clip_tokens | clip_embeds | arcface (several for FaceID-Plus)."""
        if self.public is not None:
            return self.public.features
        return {"arcface": ("arcface",), "arcface_clip": ("arcface", "clip_tokens")}.get(self.encoder_type,
                                                                                        ("clip_tokens",))

    @property
    def title(self) -> str:
        return self.public.title if self.public is not None else f"Omni-ID ({self.encoder_type}) weights"

    def adapter_for(self, model) -> comfy.model_patcher.ModelPatcher:
        """The adapter for ``model`` (a ModelPatcher), checked against its architecture; a clear error otherwise."""
        family = model_family(model)
        if family not in weights.BASE_FAMILIES:
            raise OmniIDError(f"Omni-ID injection supports SD1.5, SDXL and FLUX models; this MODEL is {family}")
        dm = model.model.diffusion_model
        if self.public is not None:
            for_flux = self.public.family == "flux"
            if for_flux != (family == "flux"):
                what = "FLUX" if for_flux else "an SD1.5/SDXL UNet"
                raise OmniIDError(f"{self.source} is an {self.public.title} file for {what}; this MODEL is {family}: "
                                  + ("use an Omni-ID file or the XLabs FLUX IP-Adapter for FLUX" if family == "flux"
                                     else "use an IP-Adapter file made for this model"))
            if for_flux:
                layout = ("flux", len(dm.double_blocks), len(dm.single_blocks), dm.hidden_size)
            else:
                layout = tuple(sorted(ip_adapter.SDIdentityAdapter.inner_dims_of(dm).items()))
            if layout not in self._converted:
                sd, names = self.public.adapter_state_dict(dm)
                ip_adapter.check_adapter_fits(sd, family, dm, names)   # before building: name the file's tensor
                self._converted[layout] = ip_adapter.adapter_patcher(
                    ip_adapter.adapter_from_state_dict("flux" if for_flux else "unet", sd, file_keys=names))
            patcher = self._converted[layout]
        else:
            weights.check_base_family(self.meta, family)
            patcher = self.adapter
        ip_adapter.check_adapter_fits(patcher.model, family, dm)
        return patcher


@dataclass
class Identity:
    """Encoded identity tokens (N_id, L, C), what the uncond rows attend to, and where they came from."""
    tokens: torch.Tensor
    num_source_images: list = field(default_factory=list)
    encoder_type: str = "omni_id"
    uncond_tokens: Optional[torch.Tensor] = None
    negative: str = ""      # where uncond_tokens came from ("negative image", "zero pixels", ...), "" = none

    def __repr__(self):   # shown in the UI and logs
        neg = f", negative: {self.negative}" if self.uncond_tokens is not None else ""
        return f"Identity({tuple(self.tokens.shape)}, from {self.num_source_images} image(s){neg})"


def public_ip_adapter_kind(sd: dict) -> str:
    """Which public adapter layout a state dict is (the name of what it is when it is none)."""
    try:
        return read_public_adapter(sd, "file").kind
    except OmniIDError:
        return "unrecognised"


def load_omni_id_model(path: str) -> OmniIDModel:
    """Our format (metadata format=omni_id) or a public identity-adapter file, told by its keys."""
    name = os.path.basename(path)
    md = weights.read_metadata(path) if path.endswith((".safetensors", ".sft")) else {}
    if md.get("format") == weights.WEIGHTS_FORMAT:
        encoder, meta, proj_sd = weights.load_identity_encoder(path)
        adapter = ip_adapter.adapter_from_state_dict(meta.base_family, proj_sd,
                                                     file_keys={k: f"proj.{k}" for k in proj_sd})
        return OmniIDModel(encoder.eval(), adapter, meta.base_family, meta, name)
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    weights.require_finite(sd, name)
    try:
        public = read_public_adapter(sd, name)
    except OmniIDError as e:
        if md.get("format"):
            raise OmniIDError(f"{name} has metadata format={md['format']!r}, which is neither an Omni-ID weight file "
                              "(format=omni_id) nor an identity adapter") from None
        raise e from None
    if public.kind == "full-face":
        dim = public.feature_width   # width of the CLIP tokens the projection takes
        cfg = OmniIDConfig(encoder_type="clip", token_dim=dim, clip_dim=dim, heads=1)
        return OmniIDModel(CLIPTokensEncoder(cfg), None, "unet", None, name, public=public)
    return OmniIDModel(public.projection(device=mm.unet_offload_device()), None, public.family, None, name,
                       public=public)


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


# ---------------------------------------------------------------------------------------------------
# CLIP features


def clip_features(clip_vision, images: torch.Tensor, crop: bool) -> dict:
    """Per image: CLIP's penultimate tokens (N, L, C) and projected image embedding (N, E)."""
    pbar = comfy.utils.ProgressBar(images.shape[0])
    toks, embeds = [], []
    for i in range(images.shape[0]):   # one image at a time: bounded memory for large reference sets
        mm.throw_exception_if_processing_interrupted()
        out = clip_vision.encode_image(images[i:i + 1], crop=crop)
        toks.append(out["penultimate_hidden_states"])
        embeds.append(out["image_embeds"])
        pbar.update(1)
    return {"clip_tokens": torch.cat(toks).float(), "clip_embeds": torch.cat(embeds).float()}


def clip_of_zero_pixels(clip_vision) -> dict:
    """CLIP applied to an all-zero pixel tensor (after CLIP's normalisation: the original IP-Adapter's
    ``zeros_like(clip_image)``), as the penultimate tokens (1, L, C) and the image embedding (1, E)."""
    mm.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    with torch.no_grad():
        out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    dev = mm.intermediate_device()
    return {"clip_tokens": out[1].to(dev).float(), "clip_embeds": out[2].to(dev).float()}


def _check_clip_width(m: OmniIDModel, feats: dict) -> None:
    if m.public is not None:
        want = m.public.feature_width
        have = feats["clip_embeds" if "clip_embeds" in m.features else "clip_tokens"].shape[-1]
        if have != want:
            which = "image embedding" if "clip_embeds" in m.features else "tokens"
            raise OmniIDError(f"the CLIP vision model gives {which} of width {have} but {m.source} ({m.public.title}) takes "
                              f"{want}: load the image encoder it was made with (CLIP ViT-H/14: tokens 1280, embedding "
                              "1024; ViT-bigG/14: tokens 1664, embedding 1280; ViT-L/14: embedding 768)")
        return
    cfg = getattr(m.encoder_module, "config", None)
    have = feats["clip_tokens"].shape[-1]
    if cfg is not None and have != cfg.clip_dim:
        raise OmniIDError(f"the CLIP vision model gives tokens of width {have} but these Omni-ID weights "
                          f"expect {cfg.clip_dim} (CLIP-H/14 is 1280): load the matching CLIP vision model")


def _project(m: OmniIDModel, feats: dict, **options) -> torch.Tensor:
    """Per-image features → one identity (1, tokens, C): the encoder (Omni-ID, the CLIP baseline) sees every
    image at once; a public projection runs per image and its image-prompt tokens are concatenated."""
    if m.public is not None and m.public.projects_at_encode:
        inputs = {k: feats[k] for k in m.features}
        out = run_encoder(m.encoder, **inputs, **options)           # (N, T, ctx)
        return out.reshape(1, -1, out.shape[-1])
    if "arcface" in m.features:
        return run_encoder(m.encoder, clip_tokens=feats["clip_tokens"][None] if "clip_tokens" in feats else None,
                           arcface=feats["arcface"][None])
    return run_encoder(m.encoder, clip_tokens=feats["clip_tokens"][None])


def _combined(feats: dict, mode: str) -> dict:
    return {k: vocabulary.combine(v, mode) for k, v in feats.items()}


def _identity(m: OmniIDModel, feats: dict, n_images: int, combine: str, negative_feats: Optional[dict],
              default_negative: Optional[dict], negative_name: str, **options) -> Identity:
    tokens = _project(m, _combined(feats, combine), **options)
    uncond, negative = None, ""
    if negative_feats is not None:
        uncond, negative = _project(m, _combined(negative_feats, combine), **options), "negative image"
    elif default_negative is not None:
        uncond, negative = _project(m, default_negative, **options), negative_name
    dev = mm.intermediate_device()
    return Identity(tokens.to(dev).float(), [n_images], m.encoder_type,
                    None if uncond is None else uncond.to(dev).float(), negative)


def encode_faces(m: OmniIDModel, clip_vision, images: torch.Tensor, crop: bool, negative: Optional[torch.Tensor] = None,
                 combine: str = "concat") -> Identity:
    """IMAGE (N, H, W, 3) of one person's aligned faces → one identity (1, L, C), with its negative."""
    images = rgb_images(images, "Omni-ID Encode", "connect one or more face images of the same person", error=OmniIDError)
    if "arcface" in m.features:
        raise OmniIDError(f"{m.source or 'these weights'} ({m.title}) take ArcFace embeddings: use 'Identity Encode from "
                          "ArcFace (IDP)' with the Face Embedding node instead")
    if clip_vision is None:
        raise OmniIDError(f"the {m.encoder_type} encoder needs CLIP vision tokens: connect a CLIP_VISION model (ViT-H/14)")
    warn_if_other_trunk(m, clip_vision)
    if combine not in vocabulary.COMBINE_EMBEDS:
        raise OmniIDError(f"combine_embeds must be one of {vocabulary.COMBINE_EMBEDS}, got {combine!r}")
    feats = clip_features(clip_vision, images, crop)
    _check_clip_width(m, feats)
    keep = lambda f: {k: f[k] for k in m.features}   # noqa: E731
    negative_feats = None
    if negative is not None:
        negative = rgb_images(negative, "Omni-ID Encode (negative_image)", "connect a negative image or leave it empty",
                              error=OmniIDError)
        negative_feats = keep(clip_features(clip_vision, negative, crop))
    default, name = None, ""
    if m.public is not None:
        rule = m.public.info.uncond
        if rule == "zero pixels":
            default, name = keep(clip_of_zero_pixels(clip_vision)), "zero pixel tensor (the original's)"
        elif rule == "zero embedding":
            default, name = {k: torch.zeros_like(feats[k][:1]) for k in m.features}, "zero embedding (the original's)"
        elif rule == "black image":
            black = torch.zeros(1, clip_vision.image_size, clip_vision.image_size, 3)
            default, name = keep(clip_features(clip_vision, black, crop)), "black image (x-flux's)"
    return _identity(m, keep(feats), int(images.shape[0]), combine, negative_feats, default, name)


def encode_arcface(m: OmniIDModel, embeddings: torch.Tensor, clip_vision=None, faces: Optional[torch.Tensor] = None,
                   combine: str = "concat", shortcut: bool = True, shortcut_scale: float = 1.0) -> Identity:
    """ArcFace embeddings (N, 512) of one person (+ their aligned crops for the CLIP part) → one identity.

    Omni-ID's ArcFace baselines (``arcface`` / ``arcface_clip`` weights) or IP-Adapter FaceID / FaceID-Plus files
    (``shortcut``/``shortcut_scale``: FaceID-Plus v2's ``x + s · resampler(x, clip)``; off is v1)."""
    if "arcface" not in m.features:
        raise OmniIDError(f"these weights are an {m.encoder_type} encoder: use 'Omni-ID Encode Faces' instead")
    if embeddings.shape[0] == 0:
        raise OmniIDError("no ArcFace embedding: the Face Embedding node found no face")
    if combine not in vocabulary.COMBINE_EMBEDS:
        raise OmniIDError(f"combine_embeds must be one of {vocabulary.COMBINE_EMBEDS}, got {combine!r}")
    if m.public is not None and embeddings.shape[-1] != m.public.arcface_width:
        raise OmniIDError(f"the face embeddings have width {embeddings.shape[-1]}; {m.source} takes ArcFace embeddings "
                          f"of width {m.public.arcface_width} (insightface antelopev2 / buffalo_l)")
    feats = {"arcface": embeddings.float()}
    if "clip_tokens" in m.features:
        if faces is not None:
            faces = rgb_images(faces, "Omni-ID Encode ArcFace (faces)", "connect the aligned face crops",
                               error=OmniIDError)
        if clip_vision is None or faces is None:
            what = "arcface_clip weights also need" if m.public is None else f"{m.title} also needs"
            raise OmniIDError(f"{what} CLIP vision and the face crops: connect both")
        if m.public is not None and faces.shape[0] != embeddings.shape[0]:
            raise OmniIDError(f"{embeddings.shape[0]} face embeddings but {faces.shape[0]} face crops: connect the crops "
                              "the embeddings were computed from, one per embedding")
        feats["clip_tokens"] = clip_features(clip_vision, faces, True)["clip_tokens"]
        _check_clip_width(m, feats)
    options = {"shortcut": bool(shortcut), "scale": float(shortcut_scale)} if m.public is not None \
        and m.public.kind == "faceid-plus" else {}
    if m.public is None:   # Omni-ID's ArcFace baselines: the encoder averages the images itself; no negative
        tokens = _project(m, _combined(feats, combine))
        return Identity(tokens.to(mm.intermediate_device()).float(), [int(embeddings.shape[0])], m.encoder_type)
    default = {"arcface": torch.zeros_like(feats["arcface"][:1])}
    if "clip_tokens" in feats:
        default["clip_tokens"] = clip_of_zero_pixels(clip_vision)["clip_tokens"]
    return _identity(m, feats, int(embeddings.shape[0]), combine, None, default, "zero embedding (the original's)",
                     **options)


def warn_if_other_trunk(m: OmniIDModel, clip_vision) -> Optional[str]:
    """Logs (and returns) a warning when ``clip_vision`` is not the CLIP trunk the weights were trained with (their
    ``trunk_*`` metadata, omni_encoder.trunk_identity): a fine-tuned trunk must be loaded in place of CLIP-H."""
    if m.meta is None or clip_vision is None or not hasattr(clip_vision, "model"):
        return None
    msg = trunk_identity.trunk_mismatch(m.meta.extra, clip_vision.model.state_dict(),
                                        weights=f"the Omni-ID weights {m.source or ''}".rstrip())
    if msg:
        logging.getLogger(__name__).warning(msg)
    return msg


# ---------------------------------------------------------------------------------------------------
# Applying an identity

NEGATIVE_ON_UNCOND = "cond, negative on uncond"
APPLY_TO = (NEGATIVE_ON_UNCOND, "cond", "cond+uncond", "uncond")
_ROWS = {"cond": "cond", "cond+uncond": "both", "uncond": "uncond"}


def identity_injector(m: OmniIDModel, model, identity: Identity, weight: float = 1.0, start_at: float = 0.0,
                      end_at: float = 1.0, apply_to: str = "cond", mask: Optional[torch.Tensor] = None,
                      weight_type: str = "linear", embeds_scaling: str = "V only") -> ip_adapter.IdentityInjector:
    """The injector Apply Omni-ID puts on ``model``: rows per ``apply_to`` (APPLY_TO), weight per ``weight_type``."""
    if apply_to not in APPLY_TO:
        raise OmniIDError(f"apply_to must be one of {APPLY_TO}, got {apply_to!r}")
    adapter = m.adapter_for(model)
    family = model_family(model)
    uncond = None
    if apply_to == NEGATIVE_ON_UNCOND:
        if identity.uncond_tokens is not None:
            rows, uncond = "both", identity.uncond_tokens
        elif m.public is not None:
            raise OmniIDError(f"this identity has no negative for the uncond rows ({m.public.title} defines one when the "
                              "faces are encoded; identities loaded from a file or mixed with one that lacks it do "
                              "not carry it): encode the faces in this workflow, or choose apply_to 'cond'")
        else:
            rows = "cond"   # Omni-ID weights define no image uncond: without a negative image, nothing (as 'cond')
    else:
        rows = _ROWS[apply_to]
    site_weights = None
    if weight_type != "linear":
        dm = model.model.diffusion_model
        sites = ip_adapter.adapter_sites(adapter.model, "flux" if family == "flux" else "unet", dm)
        site_weights = vocabulary.site_weights(weight_type, weight, family, sites,
                                               getattr(model.model.model_config, "unet_config", {}))
    return ip_adapter.IdentityInjector(adapter, identity.tokens, family, weight=weight, mask=mask, uncond_tokens=uncond,
                                       site_weights=site_weights, embeds_scaling=embeds_scaling,
                                       start_percent=start_at, end_percent=end_at, apply_to=rows)


__all__ = ["APPLY_TO", "NEGATIVE_ON_UNCOND", "identity_injector", "Identity", "OmniIDModel", "clip_features", "clip_of_zero_pixels", "encode_arcface", "encode_faces",
           "load_omni_id_model", "public_ip_adapter_kind", "run_encoder", "warn_if_other_trunk", "what_is"]
