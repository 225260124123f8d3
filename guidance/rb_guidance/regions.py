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


def _largest_faces(images: torch.Tensor, who: str) -> list:
    """The largest detected face of each image (FaceDetection, pixel coordinates). Raises when one has none."""
    try:
        from ...face import detect as fdetect
        faces = fdetect.detect_faces(images)
    except ImportError as e:   # BackendUnavailable is an ImportError with the install hint
        raise RBGuidanceError(f"{who}: no reference mask was connected and the face detector is unavailable ({e}); "
                              "connect a reference MASK or install the face tools' detector") from e
    n = images.shape[0]
    for i in range(n):
        if not faces[i]:
            raise RBGuidanceError(f"{who}: no face found in reference image {i + 1} of {n}; use a photo with a visible "
                                  "face or connect a reference MASK")
    return [fdetect.select_faces(f, "largest", 0)[0] for f in faces]


def _face_mask(face, h: int, w: int, source: str) -> torch.Tensor:
    """(h, w) M_ref of one detected face: the detection box, or the landmark hull / box ellipse ('auto')."""
    if source == "box":
        x1, y1, x2, y2 = (min(max(float(v) / d, 0.0), 1.0) for v, d in zip(face.bbox, (w, h, w, h)))
        return box_mask((x1, y1, max(x2, x1 + 1e-3), max(y2, y1 + 1e-3)), (h, w))[0]
    from ...face import masks as fmasks
    return fmasks.face_masks([[face]], h, w, source="auto")[0]


def _check_source(source: str) -> None:
    if source not in MASK_SOURCES:
        raise RBGuidanceError(f"reference mask source must be one of {MASK_SOURCES}, got {source!r}")


def detect_reference_masks(images: torch.Tensor, source: str = "auto", who: str = "reference") -> torch.Tensor:
    """M_ref from the face tools: the largest face in each image -> MASK (N, H, W). Raises when none."""
    _check_source(source)
    h, w = images.shape[1], images.shape[2]
    return torch.stack([_face_mask(f, h, w, source) for f in _largest_faces(images, who)]).float()


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


def _square(y0: float, y1: float, x0: float, x1: float, h: int, w: int) -> tuple[int, int, int]:
    """(top, left, side) of the square crop around a face box: ``FACE_CONTEXT`` times its longer side, centred on
    it, moved (and if need be shrunk) to lie inside the (h, w) image."""
    side = min(h, w, max(1, math.ceil(FACE_CONTEXT * max(y1 - y0, x1 - x0))))
    top = min(max(0, int((y0 + y1 - side) // 2)), h - side)
    left = min(max(0, int((x0 + x1 - side) // 2)), w - side)
    return top, left, side


def _working_side(sides, size: int) -> int:
    """One side for the whole batch: the largest crop, at most ``size``, a multiple of 64 (at least 64)."""
    return max(64, min(size, max(sides)) // 64 * 64)


def _shrink(image: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """IMAGE (N, H, W, C) resized to (out_h, out_w), antialiased when shrinking.

    A strided view first takes every k-th pixel while at least twice the output's resolution remains, so the
    filter never copies a whole phone photo (a 4096 px image would be 200 MB more)."""
    h, w = image.shape[1:3]
    k = max(1, min(h // (2 * out_h), w // (2 * out_w)))
    x = image[:, ::k, ::k, :3].movedim(-1, 1).float()
    return F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=x.shape[-1] > out_w,
                         align_corners=False).clamp(0, 1).movedim(1, -1)


def _resized(image: torch.Tensor, top: int, left: int, s: int, side: int) -> torch.Tensor:
    return _shrink(image[None, top:top + s, left:left + s], side, side)[0]


def fit_reference(images: torch.Tensor, masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference photos (N, H, W, 3) and their face masks (N, H, W) at the working resolution ``size``.

    Images no larger than ``size`` are returned as they are. Larger ones (a phone photo) are cropped to a square
    around each face region (``FACE_CONTEXT`` times its box), then resized so the side is at most ``size`` (a
    multiple of 64): the VAE and the reference pass see a bounded image whatever the photo's size, and the face
    keeps the detail the DIFT features match on. Masks are cropped and resized the same way (binary again).
    """
    n, h, w = images.shape[:3]
    if max(h, w) <= size:
        return images, masks
    boxes = []
    for i in range(n):
        ys, xs = torch.nonzero(masks[i] > 0.5, as_tuple=True)
        boxes.append(_square(int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1, h, w))
    side = _working_side([b[2] for b in boxes], size)
    out_img = [_resized(images[i], top, left, s, side) for i, (top, left, s) in enumerate(boxes)]
    out_mask = [resize_mask(masks[i:i + 1, top:top + s, left:left + s].float(), (side, side), 0.5)[0]
                for i, (top, left, s) in enumerate(boxes)]
    return torch.stack(out_img).to(images.dtype), torch.stack(out_mask)


def detect_and_fit(images: torch.Tensor, source: str, who: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """M_ref by face detection and the references at the working resolution (see ``fit_reference``).

    A photo larger than ``size`` is searched for its face on a copy shrunk to ``size`` (the whole photo only if
    no face is found there), the face's square is cropped from the photo and resized, and the mask is drawn from
    the detection at the crop's resolution: a 4096 px photo costs about what a ``size`` px one does.
    """
    _check_source(source)
    n, h, w = images.shape[:3]
    if max(h, w) <= size:
        return images, detect_reference_masks(images, source, who)
    scale = size / max(h, w)
    small = _shrink(images, max(1, round(h * scale)), max(1, round(w * scale)))
    try:
        faces = [_scaled(f, 1.0 / scale, 0.0, 0.0) for f in _largest_faces(small, who)]
    except RBGuidanceError:   # a face too small to find at the working size: look at the photo itself
        faces = _largest_faces(images, who)
    boxes = [_square(float(f.bbox[1]), float(f.bbox[3]), float(f.bbox[0]), float(f.bbox[2]), h, w) for f in faces]
    side = _working_side([b[2] for b in boxes], size)
    out_img, out_mask = [], []
    for i, ((top, left, s), f) in enumerate(zip(boxes, faces)):
        out_img.append(_resized(images[i], top, left, s, side))
        out_mask.append(_face_mask(_scaled(f, side / s, -left, -top), side, side, source))
    return torch.stack(out_img).to(images.dtype), torch.stack(out_mask).float()


def _scaled(face, factor: float, dx: float, dy: float):
    """A detection moved by (dx, dy) pixels, then scaled by ``factor`` (into a crop, or back from a smaller copy)."""
    shift = lambda p: ((p.reshape(-1, 2) + (dx, dy)) * factor).reshape(p.shape)   # noqa: E731
    return face.with_(bbox=shift(face.bbox), kps=shift(face.kps),
                      landmarks=None if face.landmarks is None else shift(face.landmarks[:, :2]))
