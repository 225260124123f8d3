"""The image trunk of the encoder (CLIP-H), trainable or frozen, and training utilities for torch modules.

``CLIPTrunk`` wraps the ``torch.nn.Module`` inside a ComfyUI ``ClipVisionModel`` (``.model``, a
``comfy.clip_model.CLIPVisionModelProjection``) and returns exactly what the Omni-ID nodes feed the
encoder: the penultimate hidden state, 257 tokens per 224-px image (``encode_faces`` in
nodes/omni_id.py uses ``penultimate_hidden_states``), with ComfyUI's own ``clip_preprocess``. Any other
module mapping (N, 3, H, W) images in [0, 1] to (N, T, C) tokens can stand in for it (``TokenTrunk``).

Weights created under ``torch.inference_mode()`` (everything a ComfyUI node loads while a workflow runs)
are *inference tensors*: autograd cannot save them for backward ("Inference tensors cannot be saved for
backward"). ``ensure_trainable_tensors`` replaces such parameters and buffers by normal copies; the
trainer calls it on every ComfyUI module it uses, frozen or not, because gradients flow *through* the
frozen base model to the identity projections.
"""
from __future__ import annotations

import functools
import logging
from typing import Iterable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...guidance.differentiable import GradPass
from ...stand_ins.models import tiny_clip_vision   # the trainer's "tiny" trunk (kept a module name: benches swap it)
from ...errors import TrainingError

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def ensure_trainable_tensors(module: nn.Module) -> int:
    """Replace inference-mode parameters/buffers of ``module`` by ordinary tensors; returns how many."""
    fixed = 0
    with torch.inference_mode(False):
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.is_inference():
                    mod._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    fixed += 1
            for name, b in list(mod._buffers.items()):
                if b is not None and b.is_inference():
                    mod._buffers[name] = b.clone()
                    fixed += 1
    if fixed:
        log.info("replaced %d inference tensors of %s by trainable copies", fixed, type(module).__name__)
    return fixed


def _clip_layer_forward(layer, x, mask=None, optimized_attention=None):
    """ComfyUI's CLIPLayer.forward with out-of-place residual adds (its ``x += ...`` breaks autograd)."""
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


def out_of_place_residuals(module: nn.Module) -> int:
    """Make ComfyUI CLIP layers differentiable: their forward adds residuals in place, which autograd
    rejects when the layer norms saved the tensor; the same computation out of place is used instead."""
    from comfy.clip_model import CLIPLayer
    n = 0
    for m in module.modules():
        if isinstance(m, CLIPLayer) and not getattr(m, "_idp_out_of_place", False):
            m.forward = functools.partial(_clip_layer_forward, m)
            m._idp_out_of_place = True
            n += 1
    return n


def count_inference_tensors(module: nn.Module) -> int:
    return sum(int(t.is_inference()) for t in list(module.parameters()) + list(module.buffers()))


def checkpoint_modules(modules: Iterable[nn.Module], inplace: bool = False) -> int:
    """Gradient checkpointing: each module's forward recomputes its activations during backward.

    Patches the instance's ``forward`` (state-dict keys and call sites stay the same).
    ``inplace=False``: non-reentrant checkpointing (keyword arguments, tensors captured from outside
    the module, frozen modules all work). ``inplace=True``, for modules that modify their inputs in
    place (ComfyUI's FLUX blocks): reentrant checkpointing of a function that clones its tensor inputs
    and runs inside ``GradPass`` (in-place writes snapshot what autograd saved) when it is recomputed; such a
    module must not use tensors that need gradients other than its inputs (true for a frozen FLUX block).
    """
    n = 0
    for m in modules:
        if getattr(m, "_idp_checkpointed", False):
            continue
        orig = m.forward
        run = functools.wraps(orig)(functools.partial(_run_inplace if inplace else _run_checkpointed, orig))
        m.forward = run
        m._idp_checkpointed = True
        n += 1
    return n


def _run_checkpointed(orig, *args, **kwargs):
    if not torch.is_grad_enabled():
        return orig(*args, **kwargs)
    return checkpoint(_differentiable, orig, *args, use_reentrant=False, **kwargs)


def _differentiable(orig, *args, **kwargs):
    # the recomputation runs during backward, outside the forward's GradPass
    with GradPass(weight_grads=True):
        return orig(*args, **kwargs)


def _run_inplace(orig, *args, **kwargs):
    if not torch.is_grad_enabled():
        return orig(*args, **kwargs)
    keys = list(kwargs)
    slots = [("a", i) for i, a in enumerate(args) if torch.is_tensor(a)] + \
            [("k", k) for k in keys if torch.is_tensor(kwargs[k])]
    tensors = [args[i] if w == "a" else kwargs[i] for w, i in slots]

    def fn(*ts):
        ts = [t.clone() for t in ts]      # the caller's tensors are never modified
        a, k = list(args), dict(kwargs)
        for (w, i), t in zip(slots, ts):
            if w == "a":
                a[i] = t
            else:
                k[i] = t
        with GradPass(weight_grads=True):
            return orig(*a, **k)

    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*requires_grad=True.*")
        return checkpoint(fn, *tensors, use_reentrant=True)


class CLIPTrunk(nn.Module):
    """ComfyUI CLIP vision model -> penultimate tokens (N, 257, C), as the Omni-ID nodes compute them."""

    def __init__(self, vision: nn.Module, image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.vision = vision
        self.image_size = int(image_size)
        self.mean, self.std = list(mean), list(std)

    @classmethod
    def from_comfy(cls, clip_vision) -> "CLIPTrunk":
        return cls(clip_vision.model, clip_vision.image_size, clip_vision.image_mean, clip_vision.image_std)

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // int(self.vision.vision_model.embeddings.patch_embedding.weight.shape[-1])) ** 2 + 1

    @property
    def width(self) -> int:
        return int(self.vision.vision_model.embeddings.class_embedding.shape[-1])

    @property
    def projection_dim(self) -> int:
        vp = getattr(self.vision, "visual_projection", None)
        return int(vp.weight.shape[0]) if isinstance(vp, nn.Module) else self.width

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        from comfy.clip_vision import clip_preprocess
        return clip_preprocess(images.movedim(1, -1).float(), size=self.image_size, mean=self.mean, std=self.std,
                               crop=True)

    def run(self, images: torch.Tensor):
        # ComfyUI builds CLIP vision with manual_cast layers: weights are cast to the input's dtype.
        return self.vision(pixel_values=self.preprocess(images), intermediate_output=-2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 257, C) penultimate hidden states."""
        return self.run(images)[1].float()

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """(N, projection_dim) projected image embeddings (the Pivot ID encoder's e_ref)."""
        return self.run(images)[2].float()

    def blocks(self) -> list:
        return list(self.vision.vision_model.encoder.layers)

    def freeze_unused(self, output: str = "penultimate") -> int:
        """Freeze what cannot influence ``output``: for penultimate tokens, the last layer, the final
        norm and the projection. Distributed training needs this: DDP silently skips the gradient
        all-reduce of a step in which a trainable parameter gets no gradient."""
        if output != "penultimate":
            return 0
        vm = self.vision.vision_model
        mods = [vm.encoder.layers[-1], vm.post_layernorm]
        vp = getattr(self.vision, "visual_projection", None)
        if isinstance(vp, nn.Module):
            mods.append(vp)
        n = 0
        for m in mods:
            for p in m.parameters():
                n += int(p.requires_grad)
                p.requires_grad_(False)
        return n


class TokenTrunk(nn.Module):
    """Adapter for any module (N, 3, H, W) -> (N, T, C); resizes to ``image_size`` first."""

    def __init__(self, module: nn.Module, image_size: int = 224):
        super().__init__()
        self.module, self.image_size = module, int(image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size:
            images = torch.nn.functional.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                                     antialias=True, align_corners=False)
        return self.module(images).float()

    def blocks(self) -> list:
        return []


def build_trunk(cfg, device: Optional[torch.device] = None, output: str = "penultimate") -> Optional[nn.Module]:
    """The trunk a TrunkConfig names: a ComfyUI CLIP vision file, the tiny stand-in, or None."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "tiny":
        cv = tiny_clip_vision(cfg.seed, cfg.image_size)
    else:
        if not cfg.path:
            raise TrainingError("trunk.path must name a CLIP vision file (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)")
        import comfy.clip_vision
        cv = comfy.clip_vision.load(cfg.path)
        if cv is None:
            raise TrainingError(f"{cfg.path} is not a CLIP vision model ComfyUI can load")
    trunk = CLIPTrunk.from_comfy(cv)
    ensure_trainable_tensors(trunk)
    # fp32 weights: master weights when trained (mixed precision comes from autocast); when frozen, no
    # per-call weight casts (ComfyUI keeps CLIP vision in fp16 and casts each layer at every call).
    trunk.float()
    if cfg.trainable:
        out_of_place_residuals(trunk)
    trunk.requires_grad_(bool(cfg.trainable))
    if cfg.trainable:
        trunk.freeze_unused(output)
    if not cfg.trainable:
        trunk.eval()
    if device is not None:
        trunk.to(device)
    return trunk


def trunk_state_dict(trunk: nn.Module) -> dict:
    """The trunk's weights in ComfyUI's CLIP vision key layout (loadable by Load CLIP Vision)."""
    inner = trunk.vision if isinstance(trunk, CLIPTrunk) else trunk
    return {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
