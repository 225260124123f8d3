"""What a ComfyUI ``models/`` folder holds, told by each file's keys and metadata (never by its name).

``scan(models_dir)`` reads safetensors headers (no tensor data) and the key lists of torch checkpoints
(``torch.load(weights_only=True, mmap=True)``: nothing is read but the pickle), and finds insightface packs
(folders of ONNX files, ``face/insightface_loader.py``). Every recognised file fills a *role* the example workflows
need (``ROLES``); the demo then runs every technique whose roles are filled and names, for the others, the file
that would enable each one and where it goes. Nothing is downloaded.
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Optional

log = logging.getLogger("idportrait.demo")

WEIGHT_EXTS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
# folders of other kinds of files (LoRAs, upscalers, ...): not opened
SKIP_DIRS = {"loras", "embeddings", "upscale_models", "hypernetworks", "vae_approx", "style_models", "gligen",
             "photomaker", "configs", "diffusers", "latent_upscale_models", "audio_encoders", "model_patches"}
OMNI_ID_FORMAT = "omni_id"                         # omni_encoder/weights.py, README "Omni-ID weight file layout"
FLASHFACE_CONVERTED_FORMAT = "idportrait.flashface-sd15"   # our deduplicated copy (README "FlashFace")


@dataclass
class Role:
    what: str            # what the file is, for people
    folder: str          # where it goes under models/
    file: str            # the usual file name
    url: str = ""        # where people get it (printed, never fetched)


ROLES = {
    "sd15_checkpoint": Role("an SD1.5 checkpoint (UNet + CLIP + VAE in one file)", "checkpoints",
                            "v1-5-pruned-emaonly.safetensors",
                            "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive"),
    "sdxl_checkpoint": Role("an SDXL base checkpoint", "checkpoints", "sd_xl_base_1.0.safetensors",
                            "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0"),
    "flux_unet": Role("the FLUX.1 diffusion model (dev or schnell), or one all-in-one FLUX checkpoint in "
                      "models/checkpoints", "diffusion_models", "flux1-dev.safetensors",
                      "https://huggingface.co/black-forest-labs/FLUX.1-dev"),
    "flux_clip_l": Role("the CLIP-L text encoder of FLUX", "text_encoders", "clip_l.safetensors",
                        "https://huggingface.co/comfyanonymous/flux_text_encoders"),
    "flux_t5xxl": Role("the T5-XXL text encoder of FLUX", "text_encoders", "t5xxl_fp16.safetensors",
                       "https://huggingface.co/comfyanonymous/flux_text_encoders"),
    "flux_vae": Role("the FLUX VAE (16 latent channels)", "vae", "ae.safetensors",
                     "https://huggingface.co/black-forest-labs/FLUX.1-dev"),
    "clip_vision_h": Role("CLIP ViT-H/14 vision (the IP-Adapter image encoder)", "clip_vision",
                          "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                          "https://huggingface.co/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors"),
    "omni_id_sd15": Role("Omni-ID weights for SD1.5 (metadata format=omni_id, base_family=sd15; none are public: "
                         "train them, README 'Training Omni-ID')", "omni_id", "omni_id_sd15.safetensors"),
    "omni_id_sdxl": Role("Omni-ID weights for SDXL (metadata format=omni_id, base_family=sdxl; train them, README "
                         "'Training Omni-ID')", "omni_id", "omni_id_sdxl.safetensors"),
    "omni_id_flux": Role("Omni-ID weights for FLUX (metadata format=omni_id, base_family=flux; train them, README "
                         "'Training Omni-ID')", "omni_id", "omni_id_flux.safetensors"),
    "flashface": Role("FlashFace's released SD1.5 weights (or the pack's converted .safetensors copy)", "flashface",
                      "flashface.ckpt", "https://huggingface.co/shilongz/FlashFace-SD1.5/resolve/main/flashface.ckpt"),
    "ip_adapter_full_face": Role("IP-Adapter 'full face' for SD1.5 (Omni-ID's CLIP baseline)", "ipadapter",
                                 "ip-adapter-full-face_sd15.safetensors",
                                 "https://huggingface.co/h94/IP-Adapter/resolve/main/models/"
                                 "ip-adapter-full-face_sd15.safetensors"),
    "controlnet_sd15": Role("an SD1.5 ControlNet (openpose: the control image is a face-keypoint image)", "controlnet",
                            "control_v11p_sd15_openpose.safetensors",
                            "https://huggingface.co/lllyasviel/ControlNet-v1-1"),
    "insightface": Role("an insightface pack (ArcFace ID similarity; antelopev2 or buffalo_l)",
                        "insightface/models/antelopev2",
                        "scrfd_10g_bnkps.onnx, glintr100.onnx, 1k3d68.onnx, 2d106det.onnx, genderage.onnx"),
}
FLUX_PARTS = ("flux_unet", "flux_clip_l", "flux_t5xxl", "flux_vae")


@dataclass
class Found:
    role: str
    path: str                    # absolute
    rel: str                     # relative to the models folder
    detail: str = ""             # what told us (keys / metadata)
    comfy_folder: str = ""       # ComfyUI folder name its loader reads
    extra: dict = field(default_factory=dict)


@dataclass
class Inventory:
    models_dir: str
    found: dict = field(default_factory=dict)        # role -> [Found], best first
    ignored: list = field(default_factory=list)      # (rel, why) for weight files that fill no role
    notes: list = field(default_factory=list)

    def get(self, role: str) -> Optional[Found]:
        files = self.found.get(role)
        return files[0] if files else None

    def has(self, role: str) -> bool:
        return role in self.found

    @property
    def flux_checkpoint(self) -> Optional[Found]:
        return self.get("flux_checkpoint")

    def has_flux(self) -> bool:
        return self.has("flux_checkpoint") or all(self.has(r) for r in FLUX_PARTS)

    def to_json(self) -> dict:
        return {"models_dir": self.models_dir,
                "found": {r: [{k: v for k, v in asdict(f).items() if k != "path"} for f in fs]
                          for r, fs in self.found.items()},
                "ignored": [{"file": rel, "why": why} for rel, why in self.ignored], "notes": self.notes}


# ------------------------------------------------------------------------------------------ reading files

def safetensors_header(path: str) -> tuple[dict, dict]:
    """(key -> shape, metadata) from a .safetensors header alone."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > 100_000_000:
            raise ValueError("not a safetensors file")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    return {k: tuple(v.get("shape", ())) for k, v in header.items()}, meta


def torch_keys(path: str) -> dict:
    """key -> shape of a torch checkpoint (nested dicts flattened with '.'); tensors are memory-mapped, not read."""
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:       # legacy (non-zip) files cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif hasattr(v, "shape"):
                out[f"{prefix}{k}"] = tuple(v.shape)
    if isinstance(obj, dict):
        walk(obj, "")
    return out


def read_keys(path: str) -> tuple[dict, dict]:
    if path.endswith((".safetensors", ".sft")):
        return safetensors_header(path)
    return torch_keys(path), {}


# ------------------------------------------------------------------------------------------ classifying

def _max_index(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(idx) if idx else -1


def classify(keys: dict, meta: dict) -> tuple[Optional[str], str, dict]:
    """(role or None, what told us / why not, extra) for one weight file."""
    ks = set(keys)
    has = ks.__contains__

    def pre(p):
        return any(k.startswith(p) for k in ks)
    fmt = meta.get("format", "")
    if fmt == OMNI_ID_FORMAT:
        fam, enc = meta.get("base_family", "?"), meta.get("encoder_type", "omni_id")
        if fam not in ("sd15", "sdxl", "flux"):
            return None, f"Omni-ID file for an unknown base family {fam!r}", {}
        if enc not in ("omni_id", "clip"):
            return None, (f"Omni-ID {enc} baseline weights: the example workflows encode with CLIP ('Omni-ID Encode "
                          "Faces'); use them with 'Identity Encode from ArcFace'"), {}
        return f"omni_id_{fam}", f"metadata format=omni_id, base_family={fam}, encoder_type={enc}", {"family": fam}
    if fmt == FLASHFACE_CONVERTED_FORMAT:
        return "flashface", f"metadata format={fmt} (the pack's converted copy)", {}
    if pre("ref_encoder.") and (pre("ori_decoder.") or pre("decoder.")) and any(".self_attn_first." in k for k in ks):
        return "flashface", "FlashFace's released keys (ref_encoder.*, ori_decoder.*, self_attn_first)", {}
    if pre("image_proj.") and pre("ip_adapter."):
        full = {"image_proj.proj.0.weight", "image_proj.proj.2.weight", "image_proj.proj.3.weight"} <= ks
        if not full or has("image_proj.norm.weight") or has("image_proj.latents"):
            return None, "an IP-Adapter, but not 'full face' (its projection is not proj.0/2/3 over 257 tokens)", {}
        layers = _max_index(ks, r"ip_adapter\.(\d+)\.to_k_ip\.weight$")
        if layers != 31:   # SD1.5 has 16 cross-attention layers: ip_adapter.1 ... ip_adapter.31
            return None, f"an IP-Adapter full-face file for another architecture (last layer ip_adapter.{layers})", {}
        return "ip_adapter_full_face", "keys image_proj.proj.{0,2,3} + ip_adapter.{1..31}.to_{k,v}_ip (SD1.5)", {}
    if has("model.diffusion_model.double_blocks.0.img_attn.qkv.weight") or has("double_blocks.0.img_attn.qkv.weight"):
        if pre("controlnet_blocks."):
            return None, "a FLUX ControlNet (not used by the demo)", {}
        if pre("text_encoders.clip_l.") and pre("text_encoders.t5xxl.") and pre("vae."):
            return "flux_checkpoint", "FLUX keys double_blocks.* + text_encoders.{clip_l,t5xxl}.* + vae.*", {}
        return "flux_unet", "FLUX diffusion-model keys (double_blocks.*, single_blocks.*)", {}
    if has("model.diffusion_model.input_blocks.0.0.weight"):
        if not pre("first_stage_model."):
            return None, "a UNet-only checkpoint: the example workflows need CLIP and VAE in the checkpoint", {}
        if has("model.diffusion_model.label_emb.0.0.weight"):
            if pre("conditioner.embedders.1."):
                return "sdxl_checkpoint", "SDXL keys (label_emb, conditioner.embedders.0/1, first_stage_model)", {}
            return None, "an SDXL refiner (one text encoder): the examples need the SDXL base", {}
        if pre("cond_stage_model.model.transformer."):
            return None, "an SD2.x checkpoint (OpenCLIP text encoder): the examples use SD1.5/SDXL/FLUX", {}
        if pre("cond_stage_model.transformer."):
            return "sd15_checkpoint", "SD1.5 keys (model.diffusion_model.*, cond_stage_model.transformer.*, " \
                                      "first_stage_model.*)", {}
        return None, "a UNet checkpoint without a recognised text encoder", {}
    if pre("control_model.input_hint_block.") or pre("input_hint_block.") or pre("controlnet_cond_embedding."):
        if pre("control_model.label_emb.") or pre("label_emb.") or pre("add_embedding."):
            return None, "an SDXL ControlNet (the ControlNet example is SD1.5)", {}
        return "controlnet_sd15", "ControlNet keys (input_hint_block / controlnet_cond_embedding), no SDXL label_emb", {}
    vision = _max_index(ks, r"vision_model\.encoder\.layers\.(\d+)\.") if pre("vision_model.") else \
        _max_index(ks, r"visual\.transformer\.resblocks\.(\d+)\.")
    if vision >= 0:
        if vision == 31:       # ViT-H/14 has 32 layers (ViT-L 24, ViT-bigG 48)
            return "clip_vision_h", "CLIP vision keys with 32 layers (ViT-H/14)", {}
        return None, f"a CLIP vision model with {vision + 1} layers (the examples use ViT-H/14: 32)", {}
    if pre("text_model.encoder.layers."):
        n = _max_index(ks, r"text_model\.encoder\.layers\.(\d+)\.")
        if n == 11:
            return "flux_clip_l", "CLIP text keys with 12 layers (CLIP-L)", {}
        return None, f"a CLIP text encoder with {n + 1} layers (FLUX uses CLIP-L: 12)", {}
    if pre("encoder.block.") and any("DenseReluDense.wi_0" in k for k in ks):
        n = _max_index(ks, r"encoder\.block\.(\d+)\.")
        if n == 23:
            return "flux_t5xxl", "T5 v1.1 encoder keys with 24 blocks (T5-XXL)", {}
        return None, f"a T5 encoder with {n + 1} blocks (FLUX uses T5-XXL: 24)", {}
    if has("decoder.conv_in.weight") and has("encoder.conv_in.weight"):
        z = keys["decoder.conv_in.weight"][1] if len(keys["decoder.conv_in.weight"]) > 1 else 0
        if z == 16:
            return "flux_vae", "VAE keys with 16 latent channels (decoder.conv_in)", {}
        return None, f"a VAE with {z} latent channels (FLUX's has 16; SD1.5/SDXL use the checkpoint's own)", {}
    return None, "not a file any example workflow loads", {}


COMFY_FOLDER = {"sd15_checkpoint": "checkpoints", "sdxl_checkpoint": "checkpoints", "flux_checkpoint": "checkpoints",
                "flux_unet": "diffusion_models", "flux_clip_l": "text_encoders", "flux_t5xxl": "text_encoders",
                "flux_vae": "vae", "clip_vision_h": "clip_vision", "omni_id_sd15": "omni_id", "omni_id_sdxl": "omni_id",
                "omni_id_flux": "omni_id", "flashface": "flashface", "ip_adapter_full_face": "ipadapter",
                "controlnet_sd15": "controlnet", "insightface": "insightface"}
# extensions each loader reads (the pack's own loaders take safetensors, FlashFace also the released .ckpt)
LOADER_EXTS = {"omni_id": (".safetensors", ".sft"), "ipadapter": (".safetensors", ".sft"),
               "flashface": (".safetensors", ".sft", ".ckpt")}


def _insightface_packs(models_dir: str, inv: Inventory) -> None:
    from idportrait.face import insightface_loader as ifl
    root = os.path.join(models_dir, "insightface", "models")
    if not os.path.isdir(root):
        return
    try:
        ifl.import_insightface()
        available = ""
    except Exception as e:   # BackendUnavailable: the pack is there but cannot be used
        available = str(e)
    for name in sorted(os.listdir(root)):
        if not os.path.isdir(os.path.join(root, name)):
            continue
        rel = os.path.join("insightface", "models", name)
        try:
            folder = ifl.find_pack_dir(models_dir, name)
        except ifl.InsightFaceModelsMissing as e:
            inv.ignored.append((rel, str(e)))
            continue
        missing = sorted(f for f in ifl.KNOWN_PACKS.get(name, {}).values()
                         if not os.path.isfile(os.path.join(folder, f)))
        if missing:
            inv.ignored.append((rel, f"insightface pack {name} is incomplete: missing {', '.join(missing)}"))
        elif available:
            inv.ignored.append((rel, f"insightface pack {name} found, but {available}"))
        else:
            onnx = sorted(f for f in os.listdir(folder) if f.endswith(".onnx"))
            inv.found.setdefault("insightface", []).append(
                Found("insightface", folder, rel, f"folder of ONNX files: {', '.join(onnx)}", "insightface",
                      {"pack": name, "root": os.path.join(models_dir, "insightface")}))


def scan(models_dir: str, prefer: Optional[str] = None) -> Inventory:
    """Every weight file under ``models_dir`` classified by keys/metadata; ``prefer``: a file name to put first."""
    models_dir = os.path.abspath(models_dir)
    inv = Inventory(models_dir)
    for root, dirs, files in os.walk(models_dir, followlinks=True):
        rel_root = os.path.relpath(root, models_dir)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and d != "insightface"]
        for fn in sorted(files):
            if not fn.lower().endswith(WEIGHT_EXTS):
                continue
            path = os.path.join(root, fn)
            rel = os.path.relpath(path, models_dir)
            try:
                keys, meta = read_keys(path)
            except Exception as e:   # a broken or foreign file: say so, keep scanning
                inv.ignored.append((rel, f"could not read its keys ({type(e).__name__}: {e})"))
                continue
            role, why, extra = classify(keys, meta)
            if role is None:
                inv.ignored.append((rel, why))
                continue
            cf = COMFY_FOLDER[role]
            exts = LOADER_EXTS.get(cf)
            if exts and not fn.lower().endswith(exts):
                inv.ignored.append((rel, f"{why}, but its loader reads {'/'.join(exts)} files only"))
                continue
            inv.found.setdefault(role, []).append(Found(role, path, rel, why, cf, extra))
    _insightface_packs(models_dir, inv)
    for fs in inv.found.values():
        fs.sort(key=lambda f: (os.path.basename(f.path) != prefer, f.rel))
    return inv


def register(found: Found) -> str:
    """Make ``found`` loadable by ComfyUI under its folder name; returns the name the loader node takes."""
    import folder_paths
    d = os.path.dirname(found.path)
    if found.role == "insightface":   # the loader looks in <root>/models/<pack>
        root = found.extra["root"]
        if root not in folder_paths.get_folder_paths("insightface"):
            folder_paths.add_model_folder_path("insightface", root, is_default=True)
        return found.extra["pack"]
    if d not in folder_paths.get_folder_paths(found.comfy_folder):
        folder_paths.add_model_folder_path(found.comfy_folder, d, is_default=True)
    return os.path.basename(found.path)
