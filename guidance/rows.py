"""Which rows and tokens of a model call an injector acts on: the one row-layout concept of the pack.

ComfyUI stacks condition chunks of equal size in one model call and labels them in
``transformer_options["cond_or_uncond"]`` (0 = cond, 1 = uncond). Techniques that add rows say how in a
``RowLayout`` stored in the call's transformer options:

* extra chunks: a label >= 2 with its role (COND or UNCOND) and a branch name, e.g. FlashFace's cond row with
  reference attention, label 2 → (COND, "ref");
* streams: every chunk split into named row groups in order, e.g. Infinite-ID's (("text", N), ("identity", N)).

``apply_to`` of an injector (cond, uncond, both) selects chunks by role, so an injector meant for the cond
rows also acts on an extra cond chunk, whatever the caller that added it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import InputError, PatchingError

LAYOUT_KEY = "idportrait_rows"   # transformer_options: the RowLayout of this call
COND, UNCOND = 0, 1
APPLY_TO = ("both", "cond", "uncond")


@dataclass(frozen=True)
class RowLayout:
    chunks: tuple = ()    # ((label, role, branch), ...) for chunk labels ComfyUI does not know
    streams: tuple = ()   # ((name, rows), ...): how every chunk's rows are split

    def role(self, label: int) -> Optional[int]:
        """COND or UNCOND for a chunk label (None for an extra label nobody described)."""
        if label in (COND, UNCOND):
            return label
        return next((role for lab, role, _ in self.chunks if lab == label), None)

    def branch(self, label: int) -> Optional[str]:
        return next((branch for lab, _, branch in self.chunks if lab == label), None)

    def merged(self, chunks: tuple = (), streams: Optional[tuple] = None) -> "RowLayout":
        labels = {lab for lab, _, _ in chunks}
        kept = tuple(c for c in self.chunks if c[0] not in labels)
        return RowLayout(kept + tuple(chunks), self.streams if streams is None else tuple(streams))


def layout_of(transformer_options: Optional[dict]) -> RowLayout:
    return (transformer_options or {}).get(LAYOUT_KEY) or RowLayout()


def with_layout(model_options: dict, chunks: tuple = (), streams: Optional[tuple] = None) -> dict:
    """A copy of ``model_options`` whose transformer options carry the merged row layout (the input is unchanged)."""
    transformer_options = model_options.get("transformer_options", {})
    layout = layout_of(transformer_options).merged(tuple(chunks), streams)
    return {**model_options, "transformer_options": {**transformer_options, LAYOUT_KEY: layout}}


def _check_apply_to(apply_to: str) -> None:
    if apply_to not in APPLY_TO:
        raise PatchingError(f"apply_to must be one of {APPLY_TO}, got {apply_to!r}")


def row_mask(transformer_options: dict, batch: int, apply_to: str, device=None) -> Optional[torch.Tensor]:
    """Bool (batch,) of the rows of the chunks ``apply_to`` selects; None means every row."""
    _check_apply_to(apply_to)
    cou = (transformer_options or {}).get("cond_or_uncond") or []
    if apply_to == "both" or not cou:
        return None
    want = COND if apply_to == "cond" else UNCOND
    layout = layout_of(transformer_options)
    per = batch // len(cou)
    return torch.tensor([layout.role(c) == want for c in cou for _ in range(per)], device=device)


def stream_layout(transformer_options: Optional[dict]) -> Optional[tuple]:
    """The ``((name, rows), ...)`` layout every chunk of this call follows, or None."""
    streams = layout_of(transformer_options).streams
    return tuple((str(n), int(r)) for n, r in streams) if streams else None


def stream_rows(transformer_options: dict, batch: int, name: str, apply_to: str = "both",
                device=None) -> Optional[torch.Tensor]:
    """Row indices (long, chunk-major) of stream ``name`` in the chunks ``apply_to`` selects.

    None when the call has no stream layout or the batch does not follow it (then nobody should treat any
    row as belonging to a stream); an empty tensor when the stream has no rows here.
    """
    _check_apply_to(apply_to)
    lay = stream_layout(transformer_options)
    if lay is None:
        return None
    size = sum(r for _, r in lay)
    if size <= 0 or batch % size:
        return None
    cou = (transformer_options or {}).get("cond_or_uncond") or []
    chunks = batch // size
    if cou and len(cou) != chunks:
        return None
    offset, count = 0, 0
    for n, r in lay:
        if n == name:
            count = r
            break
        offset += r
    want = None if apply_to == "both" else (COND if apply_to == "cond" else UNCOND)
    layout = layout_of(transformer_options)
    rows = [c * size + offset + i for c in range(chunks) for i in range(count)
            if want is None or not cou or layout.role(cou[c]) == want]
    return torch.tensor(rows, dtype=torch.long, device=device)


def stream_pairs(transformer_options: dict, batch: int, a: str, b: str, apply_to: str = "both", device=None):
    """(rows of stream a, the rows of stream b at the same position of the same chunk), or None.

    Needs both streams present with the same number of rows per chunk.
    """
    lay = stream_layout(transformer_options)
    ra = stream_rows(transformer_options, batch, a, apply_to, device)
    if ra is None:
        return None
    counts = dict(lay)
    if counts.get(a, 0) == 0 or counts.get(a) != counts.get(b):
        return None
    names = [n for n, _ in lay]
    offset = lambda n: sum(r for _, r in lay[:names.index(n)])   # noqa: E731
    return ra, ra + (offset(b) - offset(a))


def token_mask(mask: torch.Tensor, grid_hw: tuple[int, int], batch: int, chunks: int = 1) -> torch.Tensor:
    """Resize a region mask (M,H,W) or (H,W) to a token grid: (batch or 1, h*w, 1), values in [0,1].

    Area interpolation keeps the mass of soft masks. ``batch`` rows are ``chunks`` cond/uncond chunks of
    the latent batch; M must be 1 or the latent batch (one mask per image, repeated over the chunks).
    """
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or 0 in mask.shape:
        raise InputError(f"a region mask is (H, W) or (batch, H, W) with at least one pixel, got {tuple(mask.shape)}: "
                         "connect a MASK output")
    h, w = grid_hw
    m = F.interpolate(mask[:, None].float(), size=(h, w), mode="area" if mask.shape[-1] >= w else "bilinear")
    m = m.reshape(m.shape[0], h * w, 1).clamp(0, 1)
    per = batch // chunks if chunks > 0 and batch % chunks == 0 else batch
    if m.shape[0] != 1:
        if m.shape[0] != per:
            raise InputError(f"{m.shape[0]} masks for {per} latent image(s): connect one mask, or one per latent image")
        m = m.repeat(batch // per, 1, 1)
    return m
