"""OmniPortrait's Pivot ID encoder at sampling time (Sec. 3.2): the identity pivot in the prompt.

``e_mix = Linear([e_ref ; e_txt])`` (omni_encoder/pivot_id.py) replaces the embedding of the class word ("woman",
"man") in the prompt embedding the denoiser cross-attends to; ``e_ref`` is the CLIP image embedding of the
reference face, ``e_txt`` the class word's text embedding. The conditioning remembers where e_mix sits
(``PIVOT_KEY``), and RB-Guidance takes M_gen from the cross-attention of that token (Eq. 6), as the paper does:
the encoder was trained (Eq. 5) so that this attention lands on the face.

Built the way the trainer builds it (omni_encoder/train/pivot.py): the prompt encoded as CLIPTextEncode encodes
it, ``image_embeds`` of the CLIP vision model with ComfyUI's own preprocessing (centre crop), one token replaced.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from ...errors import RBGuidanceError
from ...face.types import rgb_images
from ...omni_encoder import trunk_identity
from ...omni_encoder.pivot_id import PivotIDEncoder, load_pivot_encoder
from .regions import find_token_index

log = logging.getLogger(__name__)

PIVOT_KEY = "idp_pivot"   # conditioning entry: one {"token_index", "class_word", "text"} per person, in order


@dataclass
class PivotModel:
    """PIVOT_ID: a trained Pivot ID alignment layer and what its file says about how it was trained."""
    encoder: PivotIDEncoder
    meta: dict = field(default_factory=dict)
    source: str = ""

    @property
    def class_word(self) -> str:
        return self.meta.get("class_word", "")

    def __repr__(self):   # shown in the UI and logs
        return (f"PivotModel({self.source}: e_ref {self.encoder.image_dim} + e_txt {self.encoder.text_dim}, "
                f"class word {self.class_word!r}, base {self.meta.get('base_family', '?')})")


def load_pivot_model(path: str) -> PivotModel:
    enc, meta = load_pivot_encoder(path)
    return PivotModel(enc.float(), meta, os.path.basename(path))


def reference_embedding(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """e_ref (1, D): the CLIP ``image_embeds`` of the reference face(s); several photos are averaged (the paper
    uses one)."""
    images = rgb_images(images, "Pivot ID reference", "connect a photo (or aligned crop) of the person's face",
                        error=RBGuidanceError)
    embeds = [clip_vision.encode_image(images[i:i + 1], crop=True)["image_embeds"] for i in range(images.shape[0])]
    return torch.cat(embeds).float().mean(0, keepdim=True).cpu()


def _markers(conditioning) -> list:
    for entry in conditioning or []:
        found = entry[1].get(PIVOT_KEY) if isinstance(entry, (list, tuple)) else entry.get(PIVOT_KEY)
        if found:
            return list(found)
    return []


def pivot_tokens(conditioning) -> list:
    """Token positions of the pivot embeddings in a conditioning (ComfyUI's [[tensor, dict]] list or a guider's
    converted list of dicts), one per person, in the order they were added."""
    return [int(m["token_index"]) for m in _markers(conditioning)]


def pivot_conditioning(clip, text: str, pivot: PivotModel, clip_vision, reference: torch.Tensor,
                       class_word: str = "", occurrence: int = 0, conditioning=None) -> tuple[list, int]:
    """CONDITIONING of ``text`` with e_mix in place of ``class_word`` (its ``occurrence``-th appearance), and the
    token position. ``conditioning``: the output of an earlier call on the same text (a second person)."""
    if not isinstance(pivot, PivotModel):
        raise RBGuidanceError("pivot_id must come from 'Load Pivot ID Encoder (IDP)'")
    if clip is None or clip_vision is None:
        raise RBGuidanceError("the Pivot ID encoder needs the CLIP that encodes the prompt and the CLIP vision model "
                              "it was trained with: connect both")
    text = text or ""
    word = (class_word or "").strip() or pivot.class_word
    if not word:
        raise RBGuidanceError(f"{pivot.source} names no class word: set class_word to the word of the prompt that "
                              "stands for the person (e.g. 'woman')")
    index = find_token_index(clip, text, word, int(occurrence))
    if conditioning is not None:
        earlier = _markers(conditioning)
        if not earlier or earlier[0]["text"] != text:
            raise RBGuidanceError("the conditioning input must come from another 'Pivot ID Text Encode (IDP)' with the "
                                  "same text (to add a second person); leave it empty otherwise")
        if index in pivot_tokens(conditioning):
            raise RBGuidanceError(f"token {index} ({word!r}) already carries a pivot embedding: set occurrence to "
                                  "the next appearance of the word, or use another class word")
        base = conditioning
    else:
        base = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        earlier = []
    msg = trunk_identity.trunk_mismatch(pivot.meta, clip_vision.model.state_dict(),
                                        weights=f"the Pivot ID weights {pivot.source}")
    if msg:
        log.warning(msg)
    e_ref = reference_embedding(clip_vision, reference)
    if e_ref.shape[-1] != pivot.encoder.image_dim:
        raise RBGuidanceError(f"the CLIP vision model gives image embeddings of width {e_ref.shape[-1]} but "
                              f"{pivot.source} takes {pivot.encoder.image_dim}: load the CLIP vision model it was "
                              "trained with (the paper: OpenCLIP ViT-L/14, 768)")
    marker = earlier + [{"token_index": index, "class_word": word, "text": text}]
    out = []
    for cond, extra in base:
        if cond.shape[-1] != pivot.encoder.text_dim:
            raise RBGuidanceError(f"the prompt embedding is {cond.shape[-1]} wide but {pivot.source} was trained for "
                                  f"{pivot.encoder.text_dim} ({pivot.meta.get('base_family', 'another model')}): use "
                                  "the CLIP of the model it was trained for")
        if index >= cond.shape[1]:
            raise RBGuidanceError(f"class word {word!r} is at token {index}, past the {cond.shape[1]} encoded tokens")
        rows = torch.full((cond.shape[0],), index, dtype=torch.long)
        with torch.no_grad():
            new, _ = pivot.encoder.inject(cond.float(), rows, e_ref.expand(cond.shape[0], -1))
        out.append([new.to(cond.dtype), {**extra, PIVOT_KEY: marker}])
    log.info("Pivot ID: e_mix at token %d (%r) of %r from %s", index, word, text, pivot.source)
    return out, index


__all__ = ["PIVOT_KEY", "PivotModel", "load_pivot_model", "reference_embedding", "pivot_tokens", "pivot_conditioning"]
