"""Identity and prompt metrics used by the seed papers, on precomputed embeddings, plus a bar chart.

* ID similarity: cosine of ArcFace embeddings (Omni-ID Sec. 4.1).
* FlashFace Sec. 4.3: Sim_Target = cos(gen, target); Sim_Ref = max over references of cos(gen, ref);
  Paste = Sim_Ref - Sim_Target (higher means more copy-paste of one reference).
* Pose error (Omni-ID Sec. 4.1): |dyaw| + |dpitch| + |droll| in degrees.
* CLIP-I = cos(image emb, image emb), CLIP-T = cos(image emb, text emb) (Infinite-ID supp. Eq. 1, 3).
* Infinite-ID supp. Eq. 2: per method, mean over metrics of z-score(metric across methods).

Embeddings are whatever the caller computed (ArcFace via insightface, CLIP via ComfyUI's clip_vision):
this module only does the maths, so the numbers are comparable across nodes and scripts.
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from .types import FaceError

log = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


def _t(x: ArrayLike) -> torch.Tensor:
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=torch.float64)


def cosine_similarity(a: ArrayLike, b: ArrayLike) -> torch.Tensor:
    """Row-wise cosine of [..., D] embeddings (broadcasting), float64."""
    a, b = _t(a), _t(b)
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a * b).sum(-1)


def cosine_matrix(a: ArrayLike, b: ArrayLike) -> torch.Tensor:
    """All-pairs cosine: a [N,D], b [M,D] -> [N,M]."""
    a, b = _t(a), _t(b)
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.transpose(-1, -2)


def id_similarity(generated: ArrayLike, reference: ArrayLike) -> torch.Tensor:
    """ArcFace ID similarity: cosine between generated and ground-truth embeddings, [N] or scalar."""
    return cosine_similarity(generated, reference)


def flashface_scores(generated: ArrayLike, target: ArrayLike, references: ArrayLike) -> dict[str, torch.Tensor]:
    """FlashFace Sim_Target, Sim_Ref and Paste per generated image.

    generated: [N,D]; target: [N,D] or [D]; references: [R,D] (shared) or [N,R,D] (per sample).
    Returns per-sample tensors [N] under 'sim_target', 'sim_ref', 'paste' and their means under
    'sim_target_mean', ... (the paper reports means x 100).
    """
    g = _t(generated)
    if g.ndim == 1:
        g = g.unsqueeze(0)
    tgt = _t(target)
    refs = _t(references)
    sim_target = cosine_similarity(g, tgt.expand_as(g) if tgt.ndim == 1 else tgt)
    if refs.ndim == 2:
        sims = cosine_matrix(g, refs)                       # [N,R]
    elif refs.ndim == 3:
        sims = cosine_similarity(g.unsqueeze(1), refs)      # [N,R]
    else:
        raise FaceError(f"references must be [R,D] or [N,R,D], got {tuple(refs.shape)}")
    sim_ref = sims.max(-1).values
    paste = sim_ref - sim_target
    out = {"sim_target": sim_target, "sim_ref": sim_ref, "paste": paste}
    out.update({f"{k}_mean": v.mean() for k, v in list(out.items())})
    return out


def _wrap_deg(d: torch.Tensor) -> torch.Tensor:
    return torch.remainder(d + 180.0, 360.0) - 180.0


def pose_error(pose_a: ArrayLike, pose_b: ArrayLike) -> torch.Tensor:
    """Sum of absolute yaw, pitch and roll differences in degrees, [...,3] -> [...].

    Differences are wrapped to [-180, 180) so 179 and -179 differ by 2 degrees, not 358.
    """
    a, b = _t(pose_a), _t(pose_b)
    if a.shape[-1] != 3 or b.shape[-1] != 3:
        raise FaceError("poses must be (yaw, pitch, roll) triples")
    return _wrap_deg(a - b).abs().sum(-1)


def clip_i(image_emb_a: ArrayLike, image_emb_b: ArrayLike) -> torch.Tensor:
    """CLIP-I: cosine of CLIP image embeddings (generated vs identity image)."""
    return cosine_similarity(image_emb_a, image_emb_b)


def clip_t(image_emb: ArrayLike, text_emb: ArrayLike) -> torch.Tensor:
    """CLIP-T: cosine of a CLIP image embedding and the prompt's CLIP text embedding (same space)."""
    return cosine_similarity(image_emb, text_emb)


def zscore(values: ArrayLike, ddof: int = 0) -> torch.Tensor:
    """(x - mean) / std over the last axis. ddof=0 (population std) by default; with a constant
    metric the z-scores are 0 rather than NaN (the metric then carries no ranking information)."""
    x = _t(values)
    std = x.std(dim=-1, correction=ddof, keepdim=True)
    return torch.where(std > 0, (x - x.mean(-1, keepdim=True)) / std.clamp_min(1e-300), torch.zeros_like(x))


def zscore_combination(metrics: Mapping[str, ArrayLike], lower_is_better: Sequence[str] = (),
                       ddof: int = 0) -> torch.Tensor:
    """Infinite-ID supp. Eq. 2: mean over metrics of the z-score of each metric across methods.

    metrics: name -> values over the same M methods (e.g. {'FaceNet': [...], 'CLIP-I': [...]}).
    Metrics named in lower_is_better (e.g. pose error, Paste) are negated first so a higher combined
    score is always better. Returns [M].
    """
    if not metrics:
        raise FaceError("no metrics given")
    rows = []
    for name, v in metrics.items():
        z = zscore(v, ddof=ddof)
        rows.append(-z if name in lower_is_better else z)
    lengths = {r.shape[-1] for r in rows}
    if len(lengths) != 1:
        raise FaceError(f"every metric needs one value per method; got lengths {sorted(lengths)}")
    return torch.stack(rows).mean(0)


def _as_table(values) -> tuple[list[str], list[str], np.ndarray]:
    """{group: {series: v}} or {series: v} -> (groups, series, [G,S] array)."""
    if all(isinstance(v, Mapping) for v in values.values()):
        groups = list(values)
        series = list(dict.fromkeys(k for g in groups for k in values[g]))
        arr = np.array([[float(values[g].get(s, np.nan)) for s in series] for g in groups])
    else:
        groups, series = list(values), [""]
        arr = np.array([[float(values[g])] for g in groups])
    return groups, series, arr


def bar_chart(values: Mapping, title: str = "", width: int = 768, height: int = 432,
              backend: Optional[str] = None) -> torch.Tensor:
    """Grouped bar chart as an IMAGE [1,H,W,3].

    values: {label: number} or {group: {series: number}} (e.g. {method: {metric: value}}).
    backend: 'matplotlib', 'pil', or None (matplotlib when importable, else a plain PIL drawing).
    """
    groups, series, arr = _as_table(values)
    if backend is None:
        try:
            import matplotlib  # noqa: F401
            backend = "matplotlib"
        except ImportError:
            backend = "pil"
    img = _bar_matplotlib(groups, series, arr, title, width, height) if backend == "matplotlib" \
        else _bar_pil(groups, series, arr, title, width, height)
    return torch.from_numpy(img[..., :3].astype(np.float32) / 255.0).unsqueeze(0)


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _bar_matplotlib(groups, series, arr, title, width, height) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot global state, safe inside ComfyUI's worker thread.
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    n = len(series)
    w = 0.8 / n
    x = np.arange(len(groups))
    for j, s in enumerate(series):
        c = np.array(_PALETTE[j % len(_PALETTE)]) / 255.0
        bars = ax.bar(x + (j - (n - 1) / 2) * w, arr[:, j], w, label=s or None, color=c)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(x, groups)
    ax.axhline(0, color="black", linewidth=0.8)
    if title:
        ax.set_title(title)
    if n > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def _bar_pil(groups, series, arr, title, width, height) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 50, width - 10, 30 if title else 10, height - 40
    finite = arr[np.isfinite(arr)]
    lo, hi = min(0.0, float(finite.min()) if finite.size else 0.0), max(0.0, float(finite.max()) if finite.size else 1.0)
    hi = hi if hi > lo else lo + 1.0

    def y_of(v):
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    if title:
        d.text((left, 8), title, fill=(0, 0, 0))
    d.line([(left, y_of(0)), (right, y_of(0))], fill=(0, 0, 0))
    d.line([(left, top), (left, bottom)], fill=(0, 0, 0))
    d.text((4, top), f"{hi:.3g}", fill=(0, 0, 0))
    d.text((4, bottom - 10), f"{lo:.3g}", fill=(0, 0, 0))
    gw = (right - left) / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)
    for g, name in enumerate(groups):
        x0 = left + g * gw + gw * 0.1
        for j in range(len(series)):
            v = arr[g, j]
            if not np.isfinite(v):
                continue
            xa = x0 + j * bw
            ya, yb = sorted((y_of(0), y_of(v)))
            d.rectangle([xa, ya, xa + bw - 1, yb], fill=_PALETTE[j % len(_PALETTE)])
            d.text((xa, ya - 11), f"{v:.3g}", fill=(0, 0, 0))
        d.text((x0, bottom + 6), str(name)[:18], fill=(0, 0, 0))
    for j, s in enumerate(series):
        if s:
            d.rectangle([right - 120, top + j * 14, right - 110, top + j * 14 + 10], fill=_PALETTE[j % len(_PALETTE)])
            d.text((right - 105, top + j * 14), str(s)[:16], fill=(0, 0, 0))
    return np.asarray(im)
