"""The papers' identity evaluation protocol over generated images and references (node and CLI share it).

For every image the largest detected face is used (the papers evaluate single-person portraits).
Per generated image i, with references r = 1..R and an optional target (ground-truth) image:

* ``id_sim``: mean over references of cos(ArcFace(gen_i), ArcFace(ref_r)) (Omni-ID Sec. 4.1 / appendix
  Table I: "cosine ... between the generated samples and the images of each identity").
* ``sim_target``, ``sim_ref``, ``paste``: FlashFace Sec. 4.3 (needs a target image).
* ``pose_error``: |dyaw| + |dpitch| + |droll| in degrees between gen_i and the target (Omni-ID Sec. 4.1).
* ``clip_i``: mean over references of cos(CLIP(face crop gen_i), CLIP(face crop ref_r)) (Infinite-ID
  supp. Eq. 1: faces are detected first).
* ``clip_t``: cos(CLIP(gen_i), CLIP_text(prompt_i)) on the whole image (Infinite-ID supp. Eq. 3).
* ``zscore_id_clip``: Infinite-ID supp. Eq. 2, the mean z-score of id_sim and clip_i across the images
  (or across methods, see ``combine_methods``).

The embedders are plain callables so the ComfyUI node plugs in ComfyUI's CLIP_VISION/CLIP and the CLI
plugs in a transformers CLIP; the maths is always ``metrics.py``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import align, detect, landmarks, metrics
from .types import FaceError, BackendUnavailable, FaceDetection

log = logging.getLogger(__name__)

ImagesLike = Union[torch.Tensor, Sequence[torch.Tensor]]

ID_SIZE = 112               # ArcFace input
CLIP_FACE_SIZE = 224        # CLIP input
CLIP_FACE_PADDING = 0.25    # CLIP face crops show the whole head, not only the ArcFace inner face

SIMILARITY_METRICS = ("id_sim", "sim_target", "sim_ref", "paste", "clip_i", "clip_t")
ALL_METRICS = SIMILARITY_METRICS + ("pose_error", "zscore_id_clip")
LOWER_IS_BETTER = ("paste", "pose_error")

DEFINITIONS = {
    "id_sim": "mean over references of cos(ArcFace(generated face), ArcFace(reference face)) (Omni-ID)",
    "sim_target": "cos(ArcFace(generated face), ArcFace(target face)) (FlashFace Sim_Target)",
    "sim_ref": "max over references of cos(ArcFace(generated face), ArcFace(reference face)) (FlashFace Sim_Ref)",
    "paste": "sim_ref - sim_target; higher means more copy-paste of one reference (FlashFace)",
    "pose_error": "|dyaw|+|dpitch|+|droll| in degrees, generated vs target face (Omni-ID)",
    "clip_i": "mean over references of cos(CLIP(generated face crop), CLIP(reference face crop)) (Infinite-ID)",
    "clip_t": "cos(CLIP image embedding of the generated image, CLIP text embedding of its prompt)",
    "zscore_id_clip": "mean of the z-scores of id_sim and clip_i across the compared items (Infinite-ID Eq. 2)",
}


@dataclass
class Embedders:
    """What the protocol needs; anything None is skipped with a note.

    detector: ``detect.FaceDetector``. id_embed: aligned 112x112 crops IMAGE [N,112,112,3] -> [N,D].
    clip_image: IMAGE [N,H,W,3] (one size per call) -> [N,D]. clip_text: list of prompts -> [N,D].
    """

    detector: detect.FaceDetector
    id_embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    clip_image: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    clip_text: Optional[Callable[[list[str]], torch.Tensor]] = None
    id_model: str = ""
    clip_model: str = ""


def as_image_list(images: Optional[ImagesLike]) -> list[torch.Tensor]:
    """A batch [B,H,W,C] or a list of [H,W,C]/[1,H,W,C] images -> list of [1,H,W,3] tensors."""
    if images is None:
        return []
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        return [images[i:i + 1, ..., :3] for i in range(images.shape[0])]
    out = []
    for im in images:
        out.extend(as_image_list(im))
    return out


def largest_faces(images: Sequence[torch.Tensor], detector: detect.FaceDetector,
                  step: Optional[Callable[[], None]] = None) -> list[Optional[FaceDetection]]:
    """The largest face of each [1,H,W,3] image (None where no face is found)."""
    out = []
    for im in images:
        faces = detect.detect_faces(im, detector)[0]
        best = detect.select_faces(faces, "largest", 0)
        out.append(best[0] if best else None)
        if step is not None:
            step()
    return out


def _crops(images: Sequence[torch.Tensor], faces: Sequence[Optional[FaceDetection]], size: int,
           padding: float = 0.0) -> tuple[list[int], torch.Tensor]:
    """Aligned crops of the found faces: (indices of images with a face, IMAGE [K,size,size,3])."""
    idx = [i for i, f in enumerate(faces) if f is not None]
    crops = [align.align_faces(images[i], [faces[i]], size, padding=padding).crops for i in idx]
    return idx, (torch.cat(crops) if crops else torch.zeros(0, size, size, 3))


def _scatter(n: int, idx: Sequence[int], values: torch.Tensor) -> np.ndarray:
    out = np.full(n, np.nan)
    if len(idx):
        out[list(idx)] = values.detach().cpu().double().numpy()
    return out


def _poses(images: Sequence[torch.Tensor], faces: Sequence[Optional[FaceDetection]]
           ) -> tuple[list[Optional[tuple]], Optional[str]]:
    """Pose per face: the detector's own (insightface 3d68) or, where it gave none, mediapipe's.

    Returns the poses and a note when mediapipe is needed but not installed.
    """
    out = []
    for im, f in zip(images, faces):
        if f is None:
            out.append(None)
            continue
        if f.pose is None and landmarks.ensure_pose(f) is None:
            try:
                g = landmarks.mediapipe_landmarks(im, [[f]])[0][0]
            except BackendUnavailable as e:
                return [], f"pose error skipped: {e}"
            out.append(tuple(g.pose) if g.pose is not None else None)
        else:
            out.append(tuple(f.pose))
    return out, None


def _prompts_for(prompts: Optional[Sequence[str]], n: int) -> Optional[list[str]]:
    if prompts is None:
        return None
    prompts = list(prompts)
    if len(prompts) == 1:
        return prompts * n
    if len(prompts) != n:
        raise FaceError(f"got {len(prompts)} prompts for {n} generated images: give one prompt for all "
                         f"images or exactly one per image")
    return prompts


def _nan_to_none(x):
    return None if (x is None or (isinstance(x, float) and not math.isfinite(x))) else x


def evaluate(generated: ImagesLike, references: ImagesLike, emb: Embedders, target: Optional[ImagesLike] = None,
             prompts: Optional[Sequence[str]] = None, missing_face: str = "exclude",
             progress: Optional[Callable[[int, int], None]] = None,
             check_interrupt: Optional[Callable[[], None]] = None) -> dict:
    """Run the protocol; returns a JSON-serialisable dict (see module docstring for the metrics).

    target: none, one image (shared by all generated images) or one per generated image.
    prompts: for CLIP-T; one for all images or one per generated image.
    missing_face: 'exclude' leaves generated images without a detected face out of the means (they
    are counted in ``face_detection_rate``); 'zero' scores them 0 similarity (pose error stays excluded).
    progress(done, total) and check_interrupt() are called between steps (ComfyUI progress and Cancel).
    """
    if missing_face not in ("exclude", "zero"):
        raise FaceError("missing_face must be 'exclude' or 'zero'")
    gen, refs, tgt = as_image_list(generated), as_image_list(references), as_image_list(target)
    if not gen:
        raise FaceError("no generated images")
    if not refs:
        raise FaceError("no reference images")
    if tgt and len(tgt) not in (1, len(gen)):
        raise FaceError(f"give one target image or one per generated image ({len(gen)}), got {len(tgt)}")
    prompt_list = _prompts_for(prompts, len(gen))
    n = len(gen)
    total = len(gen) + len(refs) + len(tgt) + 4
    done = [0]

    def step(k: int = 1):
        done[0] += k
        if progress is not None:
            progress(min(done[0], total), total)
        if check_interrupt is not None:
            check_interrupt()

    notes: list[str] = []
    gen_faces = largest_faces(gen, emb.detector, step)
    ref_faces = largest_faces(refs, emb.detector, step)
    tgt_faces = largest_faces(tgt, emb.detector, step)
    for kind, faces in (("reference", ref_faces), ("target", tgt_faces)):
        missing = [i for i, f in enumerate(faces) if f is None]
        if missing:
            notes.append(f"no face found in {kind} image(s) {missing}; they are left out")
    if tgt and all(f is None for f in tgt_faces):
        raise FaceError("no face found in the target image(s)")
    if all(f is None for f in ref_faces):
        raise FaceError("no face found in any reference image")
    values: dict[str, np.ndarray] = {}
    gi, gcrop = _crops(gen, gen_faces, ID_SIZE)
    ri, rcrop = _crops(refs, ref_faces, ID_SIZE)
    ti, tcrop = _crops(tgt, tgt_faces, ID_SIZE)

    # ArcFace identity metrics
    if emb.id_embed is None:
        notes.append("ID metrics skipped: no face recognition model (load an insightface pack with a "
                      "recognition model: antelopev2 or buffalo_l)")
    elif gi:
        g = emb.id_embed(gcrop)
        r = emb.id_embed(rcrop)
        values["id_sim"] = _scatter(n, gi, metrics.cosine_matrix(g, r).mean(-1))
        if ti:
            t = emb.id_embed(tcrop)
            if len(tgt) == 1:
                target_rows = t[0]
                sel = list(gi)
            else:   # per-image targets: only images whose own target has a face
                pos = {img: k for k, img in enumerate(ti)}
                sel = [i for i in gi if i in pos]
                target_rows = t[[pos[i] for i in sel]]
                g = g[[gi.index(i) for i in sel]]
            if sel:
                ff = metrics.flashface_scores(g, target_rows, r)
                for k in ("sim_target", "sim_ref", "paste"):
                    values[k] = _scatter(n, sel, ff[k])
        else:
            values["sim_ref"] = _scatter(n, gi, metrics.cosine_matrix(g, r).max(-1).values)
            notes.append("sim_target and paste need a target image")
    step()

    # pose error against the target's face
    if tgt:
        gen_pose, note_g = _poses(gen, gen_faces)
        tgt_pose, note_t = _poses(tgt, tgt_faces)
        note = note_g or note_t
        if note:
            notes.append(note)
        else:
            pe = np.full(n, np.nan)
            for i in range(n):
                tp = tgt_pose[0] if len(tgt) == 1 else tgt_pose[i]
                if gen_pose[i] is not None and tp is not None:
                    pe[i] = float(metrics.pose_error(gen_pose[i], tp))
            values["pose_error"] = pe
    step()

    # CLIP-I on face crops, CLIP-T on whole images
    if emb.clip_image is None:
        notes.append("CLIP-I/CLIP-T skipped: no CLIP model connected")
    else:
        if gi:
            _, gc = _crops(gen, gen_faces, CLIP_FACE_SIZE, CLIP_FACE_PADDING)
            _, rc = _crops(refs, ref_faces, CLIP_FACE_SIZE, CLIP_FACE_PADDING)
            values["clip_i"] = _scatter(n, gi, metrics.cosine_matrix(emb.clip_image(gc), emb.clip_image(rc)).mean(-1))
        if prompt_list is not None:
            if emb.clip_text is None:
                notes.append("CLIP-T skipped: no CLIP text model connected")
            else:
                img_emb = torch.cat([emb.clip_image(im) for im in gen])
                txt_emb = emb.clip_text(prompt_list)
                if img_emb.shape[-1] != txt_emb.shape[-1]:
                    raise FaceError(f"CLIP image embeddings have {img_emb.shape[-1]} dims but text embeddings "
                                     f"{txt_emb.shape[-1]}: use the text encoder that belongs to the CLIP vision "
                                     f"model (e.g. clip_l with CLIP ViT-L/14)")
                values["clip_t"] = metrics.clip_t(img_emb, txt_emb).cpu().numpy()
        else:
            notes.append("CLIP-T skipped: no prompts given")
    step()

    if missing_face == "zero":
        if not gi:   # no generated face at all: every similarity that could have been measured is 0
            if emb.id_embed is not None:
                values["id_sim"] = np.full(n, np.nan)
                values["sim_target" if ti else "sim_ref"] = np.full(n, np.nan)
            if emb.clip_image is not None:
                values["clip_i"] = np.full(n, np.nan)
            notes.append("no face found in any generated image: similarities scored 0 (missing_face = zero)")
        for k in ("id_sim", "sim_target", "sim_ref", "clip_i"):
            if k in values:
                v = values[k].copy()
                v[[i for i in range(n) if gen_faces[i] is None]] = 0.0
                values[k] = v
        if "sim_target" in values and "sim_ref" in values:
            values["paste"] = values["sim_ref"] - values["sim_target"]

    # Infinite-ID Eq. 2 across images (which sample keeps identity best in both spaces)
    combo = {k: values[k] for k in ("id_sim", "clip_i") if k in values}
    if combo and n > 1:
        ok = np.all([np.isfinite(v) for v in combo.values()], axis=0)
        z = np.full(n, np.nan)
        if ok.sum() > 1:
            z[ok] = metrics.zscore_combination({k: v[ok] for k, v in combo.items()}).numpy()
        values["zscore_id_clip"] = z
    step()

    order = [k for k in ALL_METRICS if k in values]
    per_image = []
    for i in range(n):
        rec = {"index": i, "face_found": gen_faces[i] is not None}
        if gen_faces[i] is not None:
            rec["face_box"] = [round(float(v), 2) for v in gen_faces[i].bbox]
        if prompt_list is not None:
            rec["prompt"] = prompt_list[i]
        for k in order:
            rec[k] = _nan_to_none(float(values[k][i]))
        per_image.append(rec)
    mean, std = {}, {}
    for k in order:
        v = values[k][np.isfinite(values[k])]
        mean[k] = _nan_to_none(float(v.mean())) if v.size else None
        std[k] = _nan_to_none(float(v.std())) if v.size else None
    found = sum(f is not None for f in gen_faces)
    return {
        "n_generated": n, "n_references": len(refs), "n_targets": len(tgt),
        "faces_found": {"generated": found, "references": sum(f is not None for f in ref_faces),
                        "targets": sum(f is not None for f in tgt_faces)},
        "face_detection_rate": found / n,
        "missing_face": missing_face,
        "id_model": emb.id_model, "clip_model": emb.clip_model,
        "metrics": order,
        "mean": mean, "std": std,
        "per_image": per_image,
        "notes": notes,
        "definitions": {k: DEFINITIONS[k] for k in order},
    }


def combine_methods(results: dict[str, dict], keys: Sequence[str] = ("id_sim", "clip_i")) -> dict[str, Optional[float]]:
    """Infinite-ID supp. Eq. 2 across methods: mean z-score of the methods' mean metrics.

    results: {method: evaluate(...) result}. Metrics missing for any method are left out; returns
    {method: score} (None when no metric is shared or fewer than two methods).
    """
    names = list(results)
    usable = [k for k in keys if all(results[m]["mean"].get(k) is not None for m in names)]
    if len(names) < 2 or not usable:
        return {m: None for m in names}
    z = metrics.zscore_combination({k: [results[m]["mean"][k] for m in names] for k in usable},
                                   lower_is_better=LOWER_IS_BETTER)
    return {m: float(v) for m, v in zip(names, z)}


def chart(groups: dict[str, dict[str, Optional[float]]], title: str = "", width: int = 768,
          height: int = 432) -> torch.Tensor:
    """Bar chart IMAGE [1,H',W,3]: similarity metrics on top; pose error (degrees) in a second panel."""
    sim = {g: {k: v for k, v in vals.items() if k in SIMILARITY_METRICS + ("zscore_id_clip",) and v is not None}
           for g, vals in groups.items()}
    pose = {g: vals["pose_error"] for g, vals in groups.items() if vals.get("pose_error") is not None}
    panels = []
    if any(sim.values()):
        panels.append(metrics.bar_chart(sim, title=title or "identity metrics", width=width, height=height))
    if pose:
        panels.append(metrics.bar_chart(pose, title="pose error (degrees, lower is better)", width=width,
                                        height=height // 2 + 60))
    if not panels:
        panels.append(metrics.bar_chart({"no metric": 0.0}, title=title or "no metric computed", width=width,
                                        height=height // 2))
    return torch.cat(panels, dim=1)
