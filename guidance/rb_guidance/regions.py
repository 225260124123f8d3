"""Where a face is, from what the user gave: a box string, a detected face (M_ref), a prompt token; references
brought to the model's working resolution around the face."""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...errors import RBGuidanceError
from .energy import resize_mask

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


# the model's working resolution: references larger than this are cropped to the face, then resized to it
REFERENCE_SIZE = {"sd15": 512, "sdxl": 1024, "flux": 1024}
REFERENCE_SIZE_OTHER = 768
FACE_CONTEXT = 2.0   # crop side / the face box's longer side (the face fills about half of the crop, as in FFHQ)


def reference_size(family: str) -> int:
    return REFERENCE_SIZE.get(family, REFERENCE_SIZE_OTHER)


def _face_square(mask: torch.Tensor, h: int, w: int) -> tuple[int, int, int]:
    """(top, left, side) of the square crop around the face region of one (H, W) mask, inside the image."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = min(h, w, max(1, math.ceil(FACE_CONTEXT * max(y1 - y0, x1 - x0))))
    top = min(max(0, (y0 + y1 - side) // 2), h - side)
    left = min(max(0, (x0 + x1 - side) // 2), w - side)
    return top, left, side


def fit_reference(images: torch.Tensor, masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference photos (N, H, W, 3) and their face masks (N, H, W) at the working resolution ``size``.

    Images no larger than ``size`` are returned as they are. Larger ones (a phone photo) are cropped to a square
    around each face (``FACE_CONTEXT`` times its box), then resized so the side is at most ``size`` (a multiple of
    64): the VAE and the reference pass see a bounded image whatever the photo's size, and the face keeps the
    detail the DIFT features match on. Masks are cropped and resized the same way (then made binary again).
    """
    n, h, w = images.shape[:3]
    if max(h, w) <= size:
        return images, masks
    boxes = [_face_square(masks[i], h, w) for i in range(n)]
    side = max(64, min(size, max(b[2] for b in boxes)) // 64 * 64)
    out_img, out_mask = [], []
    for i, (top, left, s) in enumerate(boxes):
        crop = images[i, top:top + s, left:left + s].movedim(-1, 0)[None].float()
        out_img.append(F.interpolate(crop, size=(side, side), mode="bilinear", antialias=s > side,
                                     align_corners=False).clamp(0, 1)[0].movedim(0, -1))
        out_mask.append(resize_mask(masks[i:i + 1, top:top + s, left:left + s].float(), (side, side), 0.5)[0])
    return torch.stack(out_img).to(images.dtype), torch.stack(out_mask)
