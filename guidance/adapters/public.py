"""Public identity-adapter files, told apart by their keys and shapes (never by file name), and converted into
this pack's adapter layout (guidance/ip_adapter.py: per cross-attention layer / FLUX block ``to_k_ip``/``to_v_ip``).

Supported layouts (the projection of each: guidance/adapters/projections.py):

| kind | keys that identify it | encoder input | uncond of the original |
|---|---|---|---|
| ``full-face`` | ``image_proj.proj.{0,2,3}`` | CLIP penultimate tokens (all 257) | CLIP of an all-zero pixel tensor |
| ``plus`` (plus, plus-face) | ``image_proj.latents``, ``proj_in``, ``layers.*`` | CLIP penultimate tokens | CLIP of an all-zero pixel tensor |
| ``basic`` | ``image_proj.proj.weight``, ``image_proj.norm`` | CLIP image embedding | a zero embedding |
| ``faceid`` (FaceID, portrait) | ``image_proj.proj.{0,2}``, ``image_proj.norm`` | ArcFace embedding (512) | a zero embedding |
| ``faceid-plus`` (v1, v2) | ``+ image_proj.perceiver_resampler.*`` | ArcFace + CLIP tokens of the face | zero ArcFace + CLIP of zero pixels |
| ``xlabs`` (FLUX) | ``ip_adapter_proj_model.*``, ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj`` | CLIP-L image embedding | CLIP of a black image |

SD1.5 vs SDXL and ViT-H vs ViT-bigG are read from the shapes (context width 768/2048, CLIP width 1280/1664,
embedding 1024/1280); the per-layer ``ip_adapter.{2k+1}`` numbering maps to the k-th cross-attention layer in
diffusers' order (down, up, mid). IP-Adapter files come as ``.safetensors`` (flat keys) or as ``.bin``
(``{"image_proj": ..., "ip_adapter": ...}``, read with ``torch.load(weights_only=True)`` by ComfyUI).

Refused, with a message that names what the file is: the InstantX FLUX IP-Adapter (its encoder is SigLIP's
pooled output, made by an attention-pooling head ComfyUI's CLIP vision loader does not build), InstantID's
adapter (an ArcFace embedding through a Resampler, made for its IdentityNet ControlNet), Resamplers with
positional embeddings or mean-pooled latents (no released file has them), PuLID, LoRAs, CLIP vision
models, checkpoints. FaceID files also hold a LoRA for the UNet's attention (``ip_adapter.{n}.to_*_lora``):
it is not applied here (as diffusers does not); load the companion ``*_lora.safetensors`` with ComfyUI's
LoRA loader, as FaceID's authors describe.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.ops

from ...errors import OmniIDError
from ..ip_adapter import ip_adapter_order, sd_key_name
from ..patching import unet_block_keys
from . import projections

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KindInfo:
    family: str          # "unet" (SD1.5/SDXL) | "flux"
    features: tuple      # what the encoder gives: clip_tokens | clip_embeds | arcface
    uncond: str          # the original's "no image": zero pixels | zero embedding | black image
    title: str


KINDS = {
    "full-face": KindInfo("unet", ("clip_tokens",), "zero pixels",
                          "IP-Adapter full-face (an MLP over all 257 CLIP tokens)"),
    "plus": KindInfo("unet", ("clip_tokens",), "zero pixels",
                     "IP-Adapter plus / plus-face (a Resampler over the CLIP tokens)"),
    "basic": KindInfo("unet", ("clip_embeds",), "zero embedding",
                      "IP-Adapter (the CLIP image embedding to 4 tokens)"),
    "faceid": KindInfo("unet", ("arcface",), "zero embedding",
                       "IP-Adapter FaceID (an ArcFace embedding to tokens)"),
    "faceid-plus": KindInfo("unet", ("arcface", "clip_tokens"), "zero embedding and zero pixels",
                            "IP-Adapter FaceID-Plus (ArcFace tokens resampling the face's CLIP tokens)"),
    "xlabs": KindInfo("flux", ("clip_embeds",), "black image",
                      "XLabs FLUX IP-Adapter (the CLIP-L image embedding to 4 tokens, every double block)"),
}

_SD_LAYER = re.compile(r"ip_adapter\.(\d+)\.(to_[kv]_ip)\.weight")
_SD_LORA = re.compile(r"ip_adapter\.(\d+)\.to_(q|k|v|out)_lora\.(up|down)\.weight")
_XLABS_LAYER = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)")


def flatten(sd: dict) -> dict:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` (the .bin layout) → flat ``image_proj.x`` keys."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in flatten(v).items()})
        else:
            out[k] = v
    return out


@dataclass
class PublicAdapter:
    """One public adapter file: its kind, its projection's tensors and its per-layer K/V tensors (file names)."""
    kind: str
    name: str
    image_proj: dict                     # projection tensors, file prefix removed
    layers: dict                         # K/V tensors under the file's own names
    lora: dict = field(default_factory=dict)   # FaceID's UNet LoRA (not applied; see module doc)

    @property
    def info(self) -> KindInfo:
        return KINDS[self.kind]

    @property
    def family(self) -> str:
        return self.info.family

    @property
    def features(self) -> tuple:
        return self.info.features

    @property
    def title(self) -> str:
        return self.info.title

    @property
    def feature_width(self) -> int:
        """Width of the CLIP part of the encoder input (the ArcFace part is always 512)."""
        p = self.image_proj
        if self.kind in ("basic", "xlabs"):
            return p["proj.weight"].shape[1]
        if self.kind == "full-face":
            return p["proj.0.weight"].shape[1]
        if self.kind == "plus":
            return p["proj_in.weight"].shape[1]
        if self.kind == "faceid-plus":
            return p["perceiver_resampler.proj_in.weight"].shape[1]
        return p["proj.0.weight"].shape[1]   # faceid: the ArcFace width

    @property
    def arcface_width(self) -> Optional[int]:
        return self.image_proj["proj.0.weight"].shape[1] if "arcface" in self.features else None

    @property
    def context_width(self) -> int:
        """Width of the image-prompt tokens (the UNet's text context, or the XLabs 4096)."""
        p = self.image_proj
        if self.kind == "full-face":
            return p["proj.3.weight"].shape[0]
        if self.kind == "plus":
            return p["norm_out.weight"].shape[0]
        return p["norm.weight"].shape[0]

    @property
    def projects_at_encode(self) -> bool:
        """full-face keeps the CLIP tokens as its identity (the Omni-ID CLIP baseline) and projects them in the
        adapter; every other kind's identity is its image-prompt tokens, projected when the faces are encoded."""
        return self.kind != "full-face"

    def projection(self, operations=comfy.ops.manual_cast, dtype=None, device=None):
        """The image-prompt projection (guidance/adapters/projections.py), None for full-face."""
        if not self.projects_at_encode:
            return None
        dtype = dtype or next(iter(self.image_proj.values())).dtype
        try:
            return projections.build_projection(self.kind, self.image_proj, operations, dtype, device)
        except (KeyError, RuntimeError, IndexError) as e:
            raise OmniIDError(f"{self.name} looks like an {self.title} file but its image projection does not load "
                              f"({str(e)[:300]}): the file is damaged or a variant this pack does not know") from None

    # -- conversion to this pack's adapter layout
    def num_layers(self) -> int:
        pat = _XLABS_LAYER if self.kind == "xlabs" else _SD_LAYER
        return len({pat.fullmatch(k).group(1) for k in self.layers})

    def adapter_state_dict(self, diffusion_model) -> tuple[dict, dict]:
        """(our adapter's state dict, {our key: the file's key}) for ``diffusion_model``."""
        out, names = {}, {}
        if self.kind == "xlabs":
            for k, t in self.layers.items():
                i, kv, what = _XLABS_LAYER.fullmatch(k).groups()
                ours = f"double_{i}.to_{kv}_ip.{what}"
                out[ours], names[ours] = t, k
            return out, names
        order = ip_adapter_order(unet_block_keys(diffusion_model))
        n_file = self.num_layers()
        if n_file != len(order):
            raise OmniIDError(
                f"{self.name} ({self.title}) is made for a UNet with {n_file} cross-attention layers; this model has "
                f"{len(order)} (SD1.5 has 16, SDXL 70): use the file made for this model's family")
        for k, t in self.layers.items():
            n, kv = _SD_LAYER.fullmatch(k).groups()
            n = int(n)
            if n % 2 != 1 or (n - 1) // 2 >= len(order):
                raise OmniIDError(f"{self.name}: layer key {k} does not fit this UNet's {len(order)} cross-attention "
                                  "layers (IP-Adapter numbers them 1, 3, 5, ...): the file is for another architecture")
            ours = f"attn2.{sd_key_name(order[(n - 1) // 2])}.{kv}.weight"
            out[ours], names[ours] = t, k
        if self.kind == "full-face":
            for i in (0, 2, 3):
                for p in ("weight", "bias"):
                    out[f"image_proj.{i}.{p}"] = self.image_proj[f"proj.{i}.{p}"]
                    names[f"image_proj.{i}.{p}"] = f"image_proj.proj.{i}.{p}"
        return out, names


# ---------------------------------------------------------------------------------------------------
# Telling a file apart


def _shape(sd, k):
    t = sd.get(k)
    return tuple(t.shape) if torch.is_tensor(t) else None


def what_is(sd: dict) -> str:
    """A short description of a file that is not a supported identity adapter (for error messages)."""
    keys = list(sd)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)   # noqa: E731
    if has("pulid_encoder.") or has("pulid_ca.") or has("id_adapter."):
        return "PuLID weights (use a PuLID pack)"
    if any("lora" in k.lower() for k in keys):
        return "a LoRA (load it with ComfyUI's LoRA loader; FaceID's companion LoRA goes there too)"
    if has("vision_model.") or has("visual.") or has("vision_model.encoder."):
        return "a CLIP vision model (put it in models/clip_vision and load it with Load CLIP Vision)"
    if has("model.diffusion_model.") or has("input_blocks.") or has("double_blocks."):
        return "a diffusion model / checkpoint, not an adapter"
    if has("controlnet_") or has("zero_convs.") or has("input_hint_block."):
        return "a ControlNet (InstantID's IdentityNet is one): load it with ComfyUI's ControlNet loader"
    return "no IP-Adapter (image_proj.* + ip_adapter.*) nor XLabs FLUX IP-Adapter (ip_adapter_proj_model.*) keys"


def read_public_adapter(sd: dict, name: str) -> PublicAdapter:
    """Tell a public adapter state dict's layout by its keys and shapes; refuse what cannot be reproduced."""
    sd = flatten(sd)
    keys = set(sd)
    if any(k.startswith("ip_adapter_proj_model.") for k in keys):
        return _xlabs(sd, name)
    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    ip = {k: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    if not proj or not ip:
        raise OmniIDError(f"{name} is not an identity adapter this pack reads: {what_is(sd)}")
    other = sorted(k for k in keys if not (k.startswith("image_proj.") or k.startswith("ip_adapter.")))
    layers = {k: v for k, v in ip.items() if _SD_LAYER.fullmatch(k)}
    lora = {k: v for k, v in ip.items() if _SD_LORA.fullmatch(k)}
    unknown = sorted(set(ip) - set(layers) - set(lora))
    k_shapes = {tuple(v.shape) for k, v in layers.items() if k.endswith("to_k_ip.weight")}
    ctx = proj.get("norm.weight", proj.get("norm_out.weight", proj.get("proj.3.weight")))
    if ctx is not None and ctx.shape[0] == 4096 and any(s[0] == 3072 for s in k_shapes):
        raise OmniIDError(
            f"{name} is the InstantX FLUX.1-dev IP-Adapter: its image encoder is SigLIP so400m's pooled output, made by "
            "an attention-pooling head that ComfyUI's CLIP vision loader does not build, so its input cannot be "
            "computed in ComfyUI. Use the XLabs FLUX IP-Adapter (ip_adapter.safetensors) instead")
    if unknown or other:
        raise OmniIDError(f"{name} has IP-Adapter keys this pack does not know ({(unknown + other)[:4]}): a variant for "
                          "another base model (SD3, Kolors, ...) or a modified file; it is not supported")
    if not layers:
        raise OmniIDError(f"{name} has an image projection but no ip_adapter.N.to_k_ip/to_v_ip layers: the file is "
                          "incomplete")
    if "latents" in proj:
        if any(k.startswith(("pos_emb", "to_latents_from_mean_pooled_seq")) for k in proj):
            raise OmniIDError(f"{name}: a Resampler with positional embeddings or mean-pooled latents, which no released "
                              "IP-Adapter uses; not supported")
        width = _shape(proj, "proj_in.weight")
        if width is not None and width[1] == 512:
            raise OmniIDError(f"{name} is a Resampler over an ArcFace embedding (InstantID's adapter, made to work with "
                              "its IdentityNet ControlNet, or FaceID portrait-unnorm): not supported here; use an "
                              "IP-Adapter FaceID / FaceID-Plus file with the face embedding node")
        kind = "plus"
    elif "perceiver_resampler.proj_in.weight" in proj:
        kind = "faceid-plus"
    elif {"proj.0.weight", "proj.2.weight", "proj.3.weight"} <= set(proj):
        kind = "full-face"
    elif {"proj.0.weight", "proj.2.weight", "norm.weight"} <= set(proj):
        kind = "faceid"
    elif {"proj.weight", "norm.weight"} <= set(proj):
        kind = "basic"
    else:
        raise OmniIDError(f"{name} is an IP-Adapter whose image projection ({sorted(proj)[:5]}) is none of the released "
                          "layouts (basic, plus, full-face, FaceID, FaceID-Plus); not supported")
    if kind in ("faceid", "faceid-plus") and proj["proj.0.weight"].shape[1] != 512:
        raise OmniIDError(f"{name}: a FaceID-style projection of a {proj['proj.0.weight'].shape[1]}-wide embedding; "
                          "FaceID takes insightface's 512-wide ArcFace embedding: not a FaceID file this pack reads")
    if lora:
        log.info("%s: FaceID's UNet LoRA inside the file is not applied; load the companion *_lora.safetensors with "
                 "ComfyUI's LoRA loader", name)
    return PublicAdapter(kind, name, proj, layers, lora)


def _xlabs(sd: dict, name: str) -> PublicAdapter:
    proj = {k[len("ip_adapter_proj_model."):]: v for k, v in sd.items() if k.startswith("ip_adapter_proj_model.")}
    layers = {k: v for k, v in sd.items() if _XLABS_LAYER.fullmatch(k)}
    rest = sorted(set(sd) - set(layers) - {f"ip_adapter_proj_model.{k}" for k in proj})
    if rest:
        raise OmniIDError(f"{name} has XLabs IP-Adapter keys and others this pack does not know ({rest[:4]}): not supported")
    if set(proj) != {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        raise OmniIDError(f"{name}: the XLabs image projection should be proj + norm, found {sorted(proj)}")
    if not layers:
        raise OmniIDError(f"{name} has the XLabs image projection but no double_blocks.N.processor layers: incomplete")
    return PublicAdapter("xlabs", name, proj, layers)
