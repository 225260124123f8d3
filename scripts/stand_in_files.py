"""The files a stand-in run of the example workflows needs: tiny weight files in the pack's real formats and the
reference images, named as each workflow names them.

One implementation for CI (tests/test_example_workflows.py) and the demo (scripts/demo.py), so that the demo's
stand-in run is exactly the graph CI runs. Needs the embedded ComfyUI with the pack loaded (``import
embedded_comfy`` first): the tiny Omni-ID file is written with the pack's own weight format code.
"""
from __future__ import annotations

import ast
import os
from typing import Callable, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The released FlashFace checkpoint's 2142 keys and shapes (names and shapes only, no weights).
FLASHFACE_KEYS_FILE = os.path.join(REPO, "tests", "data", "flashface", "checkpoint_keys_shapes.txt")
FLASHFACE_MODEL_CHANNELS = 32


def face_photo() -> np.ndarray:
    """A real photo shipped inside scikit-image (never committed here): the default reference face."""
    from skimage import data
    return data.astronaut()


def ci_image_for(name: str) -> np.ndarray:
    """What CI puts under each image name: the photo, or (a second person) the mirrored photo."""
    img = face_photo()
    return img if name == "face.png" else np.ascontiguousarray(img[:, ::-1])


def model_folder(base_dir: str, folder: str) -> str:
    """``<base_dir>/models/<folder>``, created and registered with ComfyUI for ``folder``."""
    import folder_paths
    d = os.path.join(base_dir, "models", folder)
    os.makedirs(d, exist_ok=True)
    if d not in folder_paths.get_folder_paths(folder):
        folder_paths.add_model_folder_path(folder, d)
    return d


# ------------------------------------------------------------------------------------------ FlashFace

def flashface_tiny_shape(shape, context=24):
    """Released shape -> tiny shape: channel widths / 10, context 768 -> ``context``; in/out channels and kernels kept."""
    def dim(i, d):
        if i >= 2 or d in (4, 5):
            return d
        return context if d == 768 else d // 10
    return tuple(dim(i, d) for i, d in enumerate(shape))


def flashface_tiny_state_dict(context=24, seed=0, std=0.05) -> dict:
    """The 2142-key state dict of a tiny FlashFace checkpoint (every released key, widths / 10, random values;
    the aliases hold copies of their ori_* twins as in the real file)."""
    import torch
    import idportrait.guidance.flashface_keys as fk
    g = torch.Generator().manual_seed(seed)
    sd = {}
    with open(FLASHFACE_KEYS_FILE, encoding="utf-8") as fh:
        for line in fh:
            key, shape = line.rstrip("\n").split("\t")
            sd[key] = torch.randn(flashface_tiny_shape(ast.literal_eval(shape), context), generator=g) * std
    for alias, canonical in fk.ALIASES.items():  # the real file stores identical copies under both names
        for key in [k for k in sd if k.startswith(canonical + ".")]:
            sd[alias + key[len(canonical):]] = sd[key].clone()
    assert len(sd) == 2142
    return sd


def write_flashface(path: str) -> str:
    import torch
    from idportrait.stand_ins import models as tm
    torch.save(flashface_tiny_state_dict(context=tm.TEXT_WIDTH), path)
    return path


# ------------------------------------------------------------------------------------------ Omni-ID

def omni_id_config():
    """The encoder config of the tiny Omni-ID files (tokens fit the tiny CLIP vision stand-in)."""
    from idportrait.stand_ins import models as tm
    from idportrait.omni_encoder.encoder import OmniIDConfig
    return OmniIDConfig(token_dim=32, clip_dim=tm.TEXT_WIDTH, num_queries=16, heads=2)


def randomize(module, seed, std=0.2):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def write_omni_id_weights(family: str, path: str, seed: int = 0) -> str:
    """An Omni-ID weight file in the real format (metadata format=omni_id) for the tiny model of ``family``."""
    from idportrait.guidance import ip_adapter as IP
    from idportrait.stand_ins import models as tm
    from idportrait.omni_encoder import weights as W
    from idportrait.omni_encoder.encoder import OmniIDEncoder
    cfg = omni_id_config()
    dm = tm.tiny_model(family, 0).model.diffusion_model
    enc = OmniIDEncoder(cfg)
    if family == "flux":
        ad = randomize(IP.FluxIdentityAdapter(cfg.token_dim, dm.hidden_size, len(dm.double_blocks),
                                              len(dm.single_blocks)), seed)
        proj = ad.state_dict_flat()
    else:
        ad = randomize(IP.SDIdentityAdapter(cfg.token_dim, tm.TEXT_WIDTH, IP.SDIdentityAdapter.inner_dims_of(dm)), seed)
        proj = ad.state_dict()
    W.save_identity_weights(path, enc.state_dict(), proj,
                            W.IdentityWeightsMeta(config=cfg, base_family=family, injected_blocks="all"))
    return path


def write_ip_adapter_full_face(path: str, seed: int = 5) -> str:
    """A public IP-Adapter "full face" file (``image_proj.proj.{0,2,3}``, ``ip_adapter.{2k+1}.to_{k,v}_ip``) for the
    tiny SD1.5 stand-in and the tiny CLIP vision (its 257 tokens of width TEXT_WIDTH)."""
    from safetensors.torch import save_file
    from idportrait.guidance import ip_adapter as IP
    from idportrait.stand_ins import models as tm
    dm = tm.tiny_model("sd15", 0).model.diffusion_model
    ours = randomize(IP.SDIdentityAdapter(tm.TEXT_WIDTH, tm.TEXT_WIDTH, IP.SDIdentityAdapter.inner_dims_of(dm)),
                     seed).state_dict()
    public = {f"image_proj.proj.{i}.{p}": ours[f"image_proj.{i}.{p}"] for i in (0, 2, 3) for p in ("weight", "bias")}
    for n, key in enumerate(IP.ip_adapter_order(list(IP.SDIdentityAdapter.inner_dims_of(dm)))):
        for kv in ("to_k_ip", "to_v_ip"):
            public[f"ip_adapter.{2 * n + 1}.{kv}.weight"] = ours[f"attn2.{IP.sd_key_name(key)}.{kv}.weight"]
    save_file(public, path)
    return path


# ------------------------------------------------------------------------------------------ Pivot ID

def write_pivot_id(path: str, seed: int = 0, class_word: str = "woman", std: float = 0.2, metadata=None) -> str:
    """A Pivot ID file in the trainer's format (proj.weight / proj.bias + metadata) for the tiny SD1.5 stand-in:
    e_ref from the tiny CLIP vision (projection width TEXT_WIDTH), e_txt from the tiny CLIP (TEXT_WIDTH)."""
    from idportrait.omni_encoder.pivot_id import PivotIDEncoder, save_pivot_encoder
    from idportrait.stand_ins import models as tm
    enc = randomize(PivotIDEncoder(tm.TEXT_WIDTH, tm.TEXT_WIDTH, identity_init=False), seed, std)
    save_pivot_encoder(path, enc, {"base_family": "sd15", "class_word": class_word, **(metadata or {})})
    return path


# ------------------------------------------------------------------------------------------ public adapter layouts
# Tiny files with the public key names of each released layout (guidance/adapters/public.py), sized for the tiny
# stand-ins: CLIP vision width TEXT_WIDTH (its 257 tokens and its image embedding), UNet context TEXT_WIDTH, the tiny
# FLUX's width. Perceiver widths are 64 (one head of the released 64 channels) and depth 4, as released.

PUBLIC_KINDS = ("full-face", "plus", "basic", "faceid", "faceid-plus", "xlabs")


def _random_tensors(shapes: dict, seed: int, std: float = 0.2) -> dict:
    """Seeded random tensors; LayerNorm weights near 1 (so outputs stay in a sane range)."""
    import re
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g) * std
        norm = len(shape) == 1 and k.endswith("weight") and ("norm" in k or re.search(r"layers\.\d+\.1\.0\.weight$", k))
        out[k] = 1.0 + t if norm else t
    return out


def _sd_layers(family: str, n_tokens_ctx: int) -> dict:
    """``ip_adapter.{2k+1}.to_{k,v}_ip.weight`` shapes of a tiny UNet, in IP-Adapter's numbering."""
    from idportrait.guidance import ip_adapter as IP
    from idportrait.stand_ins import models as tm
    dm = tm.tiny_model(family, 0).model.diffusion_model
    dims = IP.SDIdentityAdapter.inner_dims_of(dm)
    return {f"ip_adapter.{2 * n + 1}.{kv}.weight": (dims[key], n_tokens_ctx)
            for n, key in enumerate(IP.ip_adapter_order(list(dims))) for kv in ("to_k_ip", "to_v_ip")}


def _perceiver_shapes(prefix: str, embed: int, dim: int, out: int, depth: int = 4, ff_mult: int = 4) -> dict:
    shapes = {f"{prefix}proj_in.weight": (dim, embed), f"{prefix}proj_in.bias": (dim,),
              f"{prefix}proj_out.weight": (out, dim), f"{prefix}proj_out.bias": (out,),
              f"{prefix}norm_out.weight": (out,), f"{prefix}norm_out.bias": (out,)}
    for i in range(depth):
        a, f = f"{prefix}layers.{i}.0.", f"{prefix}layers.{i}.1."
        shapes.update({a + "norm1.weight": (dim,), a + "norm1.bias": (dim,), a + "norm2.weight": (dim,),
                       a + "norm2.bias": (dim,), a + "to_q.weight": (dim, dim), a + "to_kv.weight": (2 * dim, dim),
                       a + "to_out.weight": (dim, dim), f + "0.weight": (dim,), f + "0.bias": (dim,),
                       f + "1.weight": (ff_mult * dim, dim), f + "3.weight": (dim, ff_mult * dim)})
    return shapes


def public_adapter_state_dict(kind: str, family: str = "sd15", seed: int = 5, lora: bool = False,
                              clip_width: Optional[int] = None) -> dict:
    """The state dict of a tiny public adapter of ``kind`` (PUBLIC_KINDS) for the tiny model of ``family``;
    ``clip_width``: the CLIP vision stand-in's width it takes (tokens and image embedding; another width stands in
    for ViT-bigG)."""
    from idportrait.stand_ins import models as tm
    w, ctx, tokens = clip_width or tm.TEXT_WIDTH, tm.TEXT_WIDTH, 4
    if kind == "xlabs":
        dm = tm.tiny_model("flux", 0).model.diffusion_model
        ip_ctx = 48   # the released file projects to 4096 (T5's width); any width works
        shapes = {"ip_adapter_proj_model.proj.weight": (tokens * ip_ctx, w), "ip_adapter_proj_model.proj.bias": (tokens * ip_ctx,),
                  "ip_adapter_proj_model.norm.weight": (ip_ctx,), "ip_adapter_proj_model.norm.bias": (ip_ctx,)}
        for i in range(len(dm.double_blocks)):
            for kv in ("k", "v"):
                p = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj."
                shapes.update({p + "weight": (dm.hidden_size, ip_ctx), p + "bias": (dm.hidden_size,)})
        return _random_tensors(shapes, seed)
    shapes = _sd_layers(family, ctx)
    if kind == "full-face":
        shapes.update({"image_proj.proj.0.weight": (w, w), "image_proj.proj.0.bias": (w,), "image_proj.proj.2.weight": (ctx, w),
                       "image_proj.proj.2.bias": (ctx,), "image_proj.proj.3.weight": (ctx,), "image_proj.proj.3.bias": (ctx,)})
    elif kind == "basic":
        shapes.update({"image_proj.proj.weight": (tokens * ctx, w), "image_proj.proj.bias": (tokens * ctx,),
                       "image_proj.norm.weight": (ctx,), "image_proj.norm.bias": (ctx,)})
    elif kind == "plus":
        shapes.update({"image_proj.latents": (1, tokens, 64), **_perceiver_shapes("image_proj.", w, 64, ctx)})
    elif kind in ("faceid", "faceid-plus"):
        shapes.update({"image_proj.proj.0.weight": (1024, 512), "image_proj.proj.0.bias": (1024,),
                       "image_proj.proj.2.weight": (tokens * ctx, 1024), "image_proj.proj.2.bias": (tokens * ctx,),
                       "image_proj.norm.weight": (ctx,), "image_proj.norm.bias": (ctx,)})
        if kind == "faceid-plus":
            shapes.update(_perceiver_shapes("image_proj.perceiver_resampler.", w, ctx, ctx))
    else:
        raise ValueError(f"unknown public adapter kind {kind!r}; one of {PUBLIC_KINDS}")
    sd = _random_tensors(shapes, seed)
    if lora:   # FaceID's UNet LoRA, on every attention processor (rank 4 here, 128 released)
        n_proc = 2 * len([k for k in shapes if k.endswith("to_k_ip.weight")])
        g = seed + 1
        for n in range(n_proc):
            for which in ("q", "k", "v", "out"):
                sd.update(_random_tensors({f"ip_adapter.{n}.to_{which}_lora.down.weight": (4, 8),
                                           f"ip_adapter.{n}.to_{which}_lora.up.weight": (8, 4)}, g))
                g += 1
    return sd


def write_public_adapter(path: str, kind: str, family: str = "sd15", seed: int = 5, lora: bool = False,
                         clip_width: Optional[int] = None) -> str:
    """A tiny public adapter file (safetensors, flat keys; ``.bin``: the nested layout, torch.save)."""
    sd = public_adapter_state_dict(kind, family, seed, lora, clip_width)
    if path.endswith(".bin"):
        import torch
        nested = {}
        for k, v in sd.items():
            top, rest = k.split(".", 1)
            nested.setdefault(top, {})[rest] = v
        torch.save(nested, path)
    else:
        from safetensors.torch import save_file
        save_file(sd, path)
    return path


def _write_ipadapter(spec: dict, path: str) -> str:
    kind = spec.get("kind", "full-face")
    if kind == "full-face" and spec.get("family", "sd15") == "sd15":
        return write_ip_adapter_full_face(path)   # the file the demo and CI have always written
    return write_public_adapter(path, kind, spec.get("family", "sd15"))


# ------------------------------------------------------------------------------------------ per workflow

STAND_IN_WRITERS = {"omni_id": lambda spec, path: write_omni_id_weights(spec["family"], path),
                    "flashface": lambda spec, path: write_flashface(path),
                    "ipadapter": _write_ipadapter,
                    "pivot_id": lambda spec, path: write_pivot_id(path)}


def prepare_files(ui: dict, base_dir: str, image_for: Optional[Callable[[str], Optional[np.ndarray]]] = ci_image_for):
    """Write the images and tiny weight files the stand-in run of UI workflow ``ui`` needs.

    Images go to ``<base_dir>/input/<name>`` (``image_for(name)``; None writes nothing), weight files to
    ``<base_dir>/models/<folder>/<the loader's file name>`` (registered with ComfyUI).
    """
    from PIL import Image
    for n in ui["nodes"]:
        props = n.get("properties") or {}
        if "idportrait_stand_in_image" in props and image_for is not None:
            name = props["idportrait_stand_in_image"]
            img = image_for(name)
            if img is not None:
                Image.fromarray(np.ascontiguousarray(img)).save(os.path.join(base_dir, "input", name))
        if "idportrait_stand_in_file" in props:
            spec = props["idportrait_stand_in_file"]
            writer = STAND_IN_WRITERS.get(spec["folder"])
            if writer is None:
                raise AssertionError(f"no stand-in writer for folder {spec['folder']!r}")
            writer(spec, os.path.join(model_folder(base_dir, spec["folder"]), n["widgets_values"][0]))
