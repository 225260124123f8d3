"""Evaluation on a held-out identity split: ID similarity and pose error for 1 / 3 / 5 inputs (Tables 1-3).

Protocol (Omni-ID Sec. 4.1-4.2): for each held-out identity and each number of inputs n, n of its images
are the inputs; every other image is a target, generated from the inputs with the target's own pose
(landmark ControlNet in the paper). Scores between each generated image and its target:

* ID similarity: cosine of ArcFace embeddings (``face.metrics.id_similarity``);
* pose error: |Δyaw| + |Δpitch| + |Δroll| in degrees (``face.metrics.pose_error``).

``make_plan`` fixes inputs and targets (seeded) and the file each generation must be saved to:
``<generated>/<identity>/<n>/<target stem>.png``; generate them with any workflow, then run
``evaluate_generated``. Images without a detected face count as misses (reported, left out of means).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ...face import metrics
from .data import load_records
from .config import DataConfig


def make_plan(dataset: str, holdout: Optional[str] = None, inputs: Sequence[int] = (1, 3, 5), seed: int = 0) -> dict:
    records = load_records(DataConfig(root=dataset) if os.path.isdir(dataset) else DataConfig(manifest=dataset))
    names = None
    if holdout:
        with open(holdout) as f:
            names = set(json.load(f))
    items = []
    for i, rec in enumerate(records):
        if names is not None and rec.name not in names:
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        order = torch.randperm(len(rec.images), generator=g).tolist()
        for n in inputs:
            if n >= len(rec.images):
                continue
            ins = [rec.images[j] for j in order[:n]]
            for j in order[n:]:
                stem = os.path.splitext(os.path.basename(rec.images[j]))[0]
                items.append({"identity": rec.name, "n_inputs": int(n), "inputs": ins, "target": rec.images[j],
                              "out": f"{rec.name}/{n}/{stem}.png"})
    return {"dataset": os.path.abspath(dataset), "seed": seed, "inputs": list(inputs), "items": items}


def _rgb(path: str) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def evaluate_generated(plan, generated: str, embed_fn: Callable, pose_fn: Callable,
                       out: Optional[str] = None) -> dict:
    """Scores per number of inputs: {"1": {"id_similarity", "pose_error", "count", "missing"}, ...}.

    ``embed_fn(rgb) -> (D,) or None`` and ``pose_fn(rgb) -> (yaw, pitch, roll) or None`` (None: no face).
    """
    if isinstance(plan, str):
        with open(plan) as f:
            plan = json.load(f)
    cache: dict = {}

    def target_info(path):
        if path not in cache:
            rgb = _rgb(path)
            cache[path] = (embed_fn(rgb), pose_fn(rgb))
        return cache[path]

    per: dict = {}
    for it in plan["items"]:
        row = per.setdefault(str(it["n_inputs"]), {"sims": [], "poses": [], "missing": 0, "planned": 0})
        row["planned"] += 1
        gpath = os.path.join(generated, it["out"])
        if not os.path.isfile(gpath):
            row["missing"] += 1
            continue
        rgb = _rgb(gpath)
        g_emb, g_pose = embed_fn(rgb), pose_fn(rgb)
        t_emb, t_pose = target_info(it["target"])
        if g_emb is None or t_emb is None:
            row["missing"] += 1
            continue
        row["sims"].append(float(metrics.id_similarity(g_emb, t_emb)))
        if g_pose is not None and t_pose is not None:
            row["poses"].append(float(metrics.pose_error(g_pose, t_pose)))
    res = {}
    for n, row in sorted(per.items(), key=lambda kv: int(kv[0])):
        res[n] = {"id_similarity": float(np.mean(row["sims"])) if row["sims"] else None,
                  "pose_error": float(np.mean(row["poses"])) if row["poses"] else None,
                  "count": len(row["sims"]), "missing": row["missing"], "planned": row["planned"]}
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    return res


def format_table(res: dict) -> str:
    lines = ["| inputs | ID similarity | pose error (deg) | scored | missing |", "|---|---|---|---|---|"]
    for n, r in res.items():
        sim = "n/a" if r["id_similarity"] is None else f"{r['id_similarity']:.3f}"
        pose = "n/a" if r["pose_error"] is None else f"{r['pose_error']:.1f}"
        lines.append(f"| {n} | {sim} | {pose} | {r['count']} | {r['missing']} |")
    return "\n".join(lines)
