"""Where a face is, from what the user gave: a box string, a detected face (M_ref), a prompt token."""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

from ...errors import RBGuidanceError

MASK_SOURCES = ("auto", "box")


def box_mask(box: Sequence[float], size=(256, 256)) -> torch.Tensor:
    """(1, h, w) mask of a box given as fractions (x0, y0, x1, y1) of the image width/height."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise RBGuidanceError(f"box {tuple(box)} must be fractions with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    h, w = size
    m = torch.zeros(1, h, w)
    m[:, round(y0 * h):max(round(y1 * h), round(y0 * h) + 1), round(x0 * w):max(round(x1 * w), round(x0 * w) + 1)] = 1.0
    return m


def parse_box(text: str) -> Optional[tuple]:
    text = (text or "").strip()
    if not text:
        return None
    try:
        vals = tuple(float(v) for v in re.split(r"[,\s]+", text) if v)
    except ValueError:
        raise RBGuidanceError(f"region box {text!r}: expected four numbers 'x0, y0, x1, y1' (fractions)") from None
    if len(vals) != 4:
        raise RBGuidanceError(f"region box {text!r}: expected four numbers 'x0, y0, x1, y1' (fractions)")
    box_mask(vals, (4, 4))   # validates
    return vals


def detect_reference_masks(images: torch.Tensor, source: str = "auto", who: str = "reference") -> torch.Tensor:
    """M_ref from the face tools: the largest face in each image -> MASK (N, H, W). Raises when none."""
    if source not in MASK_SOURCES:
        raise RBGuidanceError(f"reference mask source must be one of {MASK_SOURCES}, got {source!r}")
    try:
        from ...face import detect as fdetect
        from ...face import masks as fmasks
        faces = fdetect.detect_faces(images)
    except ImportError as e:   # BackendUnavailable is an ImportError with the install hint
        raise RBGuidanceError(f"{who}: no reference mask was connected and the face detector is unavailable ({e}); "
                              "connect a reference MASK or install the face tools' detector") from e
    out = []
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    for i in range(n):
        if not faces[i]:
            raise RBGuidanceError(f"{who}: no face found in reference image {i + 1} of {n}; use a photo with a visible "
                                  "face or connect a reference MASK")
        face = fdetect.select_faces(faces[i], "largest", 0)[0]
        if source == "box":
            x1, y1, x2, y2 = (float(v) for v in face.bbox)
            out.append(box_mask((x1 / w, y1 / h, max(x2 / w, x1 / w + 1e-3), max(y2 / h, y1 / h + 1e-3)), (h, w))[0])
        else:
            out.append(fmasks.face_masks([[face]], h, w, source="auto")[0])
    return torch.stack(out).float()


def find_token_index(clip, prompt: str, word: str, occurrence: int = 0) -> int:
    """Position of ``word`` in ``prompt`` as the conditioning's token axis counts it (BOS included).

    Uses the CLIP object's own tokenizer: the stream the model cross-attends to (T5 for FLUX, CLIP-L
    for SD1.5; SDXL's two CLIP streams share positions). Special/padding tokens are those that
    tokenising an empty prompt produces.
    """
    word = (word or "").strip()
    if not word:
        raise RBGuidanceError("class word is empty")
    toks, wt, empty = clip.tokenize(prompt), clip.tokenize(word), clip.tokenize("")
    key = next((k for k in ("t5xxl", "l", "g") if k in toks), next(iter(toks)))

    def ids(t):
        return [tok[0] for chunk in t[key] for tok in chunk]
    special = set(ids(empty))
    target = [i for i in ids(wt) if i not in special]
    seq = ids(toks)
    hits = [s for s in range(len(seq) - len(target) + 1) if seq[s:s + len(target)] == target] if target else []
    if occurrence >= len(hits):
        raise RBGuidanceError(f"class word {word!r} not found in the prompt {prompt!r}"
                              + (f" (only {len(hits)} occurrence(s))" if hits else ""))
    return hits[occurrence]
