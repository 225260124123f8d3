"""Applying FlashFace to a MODEL: the released model (apply_flashface), the training-free extension
(apply_training_free), and its GUIDER (make_guider)."""
from __future__ import annotations

from typing import Optional

import torch

import comfy.patcher_extension

from ...errors import FlashFaceError
from ...face.types import mask_batch
from ..patching import apply_injector, current_layer, model_family
from .attention import FlashFaceInjector, ReferenceAttention, TrainingFreeInjector
from .guidance import FlashFaceGuider, Guidance
from .mask import FaceMaskConcat
from .model import LOADER_KEY, REF_UNET_KEY, is_flashface_model
from .references import FlashFaceReferences

FIX_NOT_FLASHFACE = ("load flashface.ckpt (or its converted copy) with 'FlashFace Loader (IDP)', or use "
                     "'FlashFace Training-free Apply (IDP)' for other SD1.5/SDXL/FLUX models")


def _check_references(model, references: FlashFaceReferences) -> None:
    if not isinstance(references, FlashFaceReferences):
        raise FlashFaceError("references must come from 'FlashFace Encode References (IDP)'")
    want = model.model.latent_format.latent_channels
    if references.latent_channels != want:
        raise FlashFaceError(f"the references have {references.latent_channels} latent channels but this model uses "
                             f"{want}: encode the faces with this model's VAE")


def injector_of(model) -> Optional[ReferenceAttention]:
    """The FlashFace injector on a patched MODEL (None if none)."""
    return next((i for i in current_layer(model).injectors if isinstance(i, ReferenceAttention)), None)


def _check_not_applied(model) -> None:
    if injector_of(model) is not None:
        raise FlashFaceError("this MODEL already has FlashFace reference attention: apply it once, and put several "
                             "people in one reference input with 'FlashFace Mix References (IDP)'")


def apply_flashface(model, references: FlashFaceReferences, guidance: Guidance, box=None,
                    mask: Optional[torch.Tensor] = None, max_ref_batch: Optional[int] = None):
    """The released method on a MODEL from :func:`load_flashface`; returns a patched clone."""
    if not is_flashface_model(model):
        raise FlashFaceError("this MODEL is not FlashFace's (no reference UNet / reference attention): "
                             + FIX_NOT_FLASHFACE)
    _check_references(model, references)
    _check_not_applied(model)
    if mask is not None:
        mask = mask_batch(mask, "FlashFace face_mask", FlashFaceError)
    if mask is not None and mask.ndim == 3 and mask.shape[0] > 1:
        raise FlashFaceError(f"the face mask has {mask.shape[0]} masks; FlashFace takes one face position for the "
                             "whole batch: connect a single mask")
    ref_p = model.get_additional_models_with_key(REF_UNET_KEY)[0]
    inj = FlashFaceInjector(references, guidance, model.model.latent_format, ref_p, FaceMaskConcat(box, mask),
                            max_ref_batch=max_ref_batch)
    m = apply_injector(model, inj)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, LOADER_KEY)   # the box's mask instead
    return m


def apply_training_free(model, references: FlashFaceReferences, guidance: Guidance, blocks: str = "decoder",
                        max_ref_batch: Optional[int] = None):
    """EXTENSION: reference attention with the model itself as reference net (SD1.5, SDXL, FLUX)."""
    family = model_family(model)
    if family == "other":
        raise FlashFaceError(f"training-free reference attention supports SD1.5/SDXL UNets and FLUX; got "
                             f"{type(model.model).__name__}")
    if is_flashface_model(model):
        raise FlashFaceError("this is FlashFace's own model: use 'FlashFace Apply (IDP)', which runs its trained "
                             "reference UNet")
    _check_references(model, references)
    _check_not_applied(model)
    inj = TrainingFreeInjector(references, guidance, model.model.latent_format, family, model.model.diffusion_model,
                               blocks=blocks, max_ref_batch=max_ref_batch)
    return apply_injector(model, inj)


def make_guider(model, positive, negative, cfg: float) -> FlashFaceGuider:
    """FlashFace's guidance as a GUIDER (SamplerCustomAdvanced) on a MODEL patched by apply_flashface /
    apply_training_free."""
    inj = injector_of(model)
    if inj is None:
        raise FlashFaceError("this MODEL has no FlashFace reference attention: apply FlashFace first")
    guider = FlashFaceGuider(model, inj)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider
