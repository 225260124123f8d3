"""Dataset curation following the Omni-ID appendix (Fig. II, MFHQ creation), for videos and photo folders.

Per source (a video file, or a folder of photos; folders of such are searched recursively):

1. detect faces in the frames (every ``every``-th video frame, at most ``max_frames``), keep faces whose
   box side is at least ``min_face`` pixels;
2. split identities by face-embedding cosine: a face joins the identity whose mean embedding it matches
   with cosine >= ``threshold``, else it starts a new identity (frames in time order);
3. sort each identity's faces by quality and drop the lowest ``drop_quality`` (20 %);
4. estimate head pose (yaw, pitch, roll) and cluster the poses into ``pose_clusters`` (16) clusters
   (k-means, k-means++ initialisation with a fixed seed);
5. pick ``frames`` (8) faces, best quality first, at most one per cluster, each pair differing by more
   than ``min_pose_diff`` (15 degrees) in |Δyaw| + |Δpitch| + |Δroll|; identities where this cannot be
   done are skipped (reported in the source's record);
6. write the picked faces as aligned crops (``resolution``, ArcFace template with ``padding``), their
   face masks (landmark hull when the detector gives landmarks, else the template ellipse) and
   ``meta.json`` to ``out/<source>_id<k>/``, in the trainer's dataset layout (data.py).

Resumable: a finished source leaves ``out/.done/<source>.json``; a rerun skips it, so an interrupted
run continues where it stopped. ``workers`` processes handle sources in parallel. ``out/manifest.jsonl``
lists every identity written so far. Face functions are pluggable (faces.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .data import IMAGE_EXTS, template_face_mask
from ...errors import TrainingError

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


@dataclass
class CurateConfig:
    threshold: float = 0.5
    drop_quality: float = 0.2
    pose_clusters: int = 16
    frames: int = 8
    min_pose_diff: float = 15.0
    every: int = 5
    max_frames: int = 2000
    min_face: int = 448              # Omni-ID §3.4: MFHQ faces are larger than 448 px (0 keeps every face)
    resolution: int = 512
    padding: float = 0.6
    seed: int = 0


@dataclass
class FaceTools:
    """The pluggable face functions (see faces.py). ``embed`` is required: no usable default exists offline."""
    embed: Callable
    detect: Optional[Callable] = None
    pose: Optional[Callable] = None
    quality: Optional[Callable] = None

    def resolved(self) -> "FaceTools":
        from . import faces
        return FaceTools(embed=self.embed, detect=self.detect or faces.default_detect,
                         pose=self.pose or faces.mediapipe_pose, quality=self.quality or faces.sharpness)


@dataclass
class FaceRecord:
    frame: int
    face: object
    embedding: np.ndarray
    quality: float
    pose: Optional[tuple] = None
    identity: int = -1
    cluster: int = -1
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Sources and frames


def find_sources(inputs: Sequence[str]) -> list[str]:
    """Videos and photo folders under ``inputs`` (a folder with images is one source)."""
    out = []
    for p in inputs:
        if os.path.isfile(p):
            if p.lower().endswith(VIDEO_EXTS):
                out.append(os.path.abspath(p))
            continue
        if not os.path.isdir(p):
            raise FileNotFoundError(p)
        names = sorted(os.listdir(p))
        if any(n.lower().endswith(IMAGE_EXTS) and ".mask." not in n for n in names):
            out.append(os.path.abspath(p))
        for n in names:
            q = os.path.join(p, n)
            if os.path.isdir(q) or q.lower().endswith(VIDEO_EXTS):
                out.extend(find_sources([q]))
    return sorted(dict.fromkeys(out))


def source_id(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40] or "source"
    return f"{safe}_{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]}"


def read_frames(path: str, every: int = 1, max_frames: int = 10 ** 9, only: Optional[set] = None):
    """Yield (frame index, RGB uint8) of a photo folder (index = position in sorted order) or a video."""
    from PIL import Image
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS) and ".mask." not in f)
        for i, f in enumerate(files[:max_frames]):
            if only is not None and i not in only:
                continue
            with Image.open(os.path.join(path, f)) as im:
                yield i, np.asarray(im.convert("RGB")).copy()
        return
    import cv2
    cap = cv2.VideoCapture(path)
    try:
        idx, kept = 0, 0
        while kept < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            if idx % every == 0:
                kept += 1
                if only is None or idx in only:
                    yield idx, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            idx += 1
    finally:
        cap.release()


def frame_name(path: str, index: int) -> str:
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS) and ".mask." not in f)
        return files[index]
    return f"frame_{index:07d}"


# ---------------------------------------------------------------------------------------------------
# The steps of Fig. II


def split_identities(records: list, threshold: float) -> list[list]:
    """Greedy identity split by cosine to each identity's running mean embedding (time order)."""
    groups, means = [], []
    for r in records:
        e = np.asarray(r.embedding, np.float64)
        e = e / max(np.linalg.norm(e), 1e-12)
        best, best_sim = -1, -2.0
        for k, m in enumerate(means):
            sim = float(e @ (m / max(np.linalg.norm(m), 1e-12)))
            if sim > best_sim:
                best, best_sim = k, sim
        if best >= 0 and best_sim >= threshold:
            groups[best].append(r)
            means[best] = means[best] + e
        else:
            groups.append([r])
            means.append(e.copy())
    for k, g in enumerate(groups):
        for r in g:
            r.identity = k
    return groups


def drop_low_quality(records: list, fraction: float) -> list:
    n_drop = int(len(records) * fraction)
    ranked = sorted(records, key=lambda r: -r.quality)
    return ranked[:len(ranked) - n_drop]


def kmeans(points: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Labels of k-means with k-means++ initialisation (deterministic for a seed)."""
    n = len(points)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    x = np.asarray(points, np.float64)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        if d2.sum() <= 0:
            centres.append(x[rng.integers(n)])
        else:
            centres.append(x[rng.choice(n, p=d2 / d2.sum())])
    c = np.array(centres)
    labels = np.zeros(n, np.int64)
    for _ in range(iters):
        labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[labels == j].mean(0) if np.any(labels == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return labels


def pose_distance(a, b) -> float:
    """|Δyaw| + |Δpitch| + |Δroll| in degrees (wrapped), as face.metrics.pose_error."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64) + 180.0) % 360.0 - 180.0
    return float(np.abs(d).sum())


def select_frames(records: list, frames: int, clusters: int, min_diff: float, seed: int = 0) -> Optional[list]:
    """Pick ``frames`` records, best quality first, one per pose cluster, pairwise pose distance > min_diff."""
    recs = [r for r in records if r.pose is not None]
    if len(recs) < frames:
        return None
    labels = kmeans(np.array([r.pose for r in recs]), clusters, seed)
    for r, lab in zip(recs, labels):
        r.cluster = int(lab)
    picked, used = [], set()
    for r in sorted(recs, key=lambda r: -r.quality):
        if r.cluster in used:
            continue
        if all(pose_distance(r.pose, p.pose) > min_diff for p in picked):
            picked.append(r)
            used.add(r.cluster)
            if len(picked) == frames:
                return picked
    return None


# ---------------------------------------------------------------------------------------------------
# One source


def _face_mask(face, matrix, size: int, padding: float) -> np.ndarray:
    from ...face import masks as face_masks
    if face.landmarks is not None and len(face.landmarks) >= 20:
        pts = np.asarray(face.landmarks[:, :2], np.float64)
        m = np.asarray(matrix, np.float64)
        crop_pts = pts @ m[:, :2].T + m[:, 2]
        return face_masks.polygon_mask(face_masks.convex_hull(crop_pts), size, size)
    return template_face_mask(size, padding).numpy()


def process_source(path: str, out: str, cfg: CurateConfig, tools: FaceTools) -> dict:
    """Run Fig. II on one source; returns its record (also written to out/.done/<id>.json)."""
    from PIL import Image
    from . import faces as F
    sid = source_id(path)
    tools = tools.resolved()
    records = []
    for idx, rgb in read_frames(path, cfg.every, cfg.max_frames):
        for face in tools.detect(rgb):
            if min(face.width, face.height) < cfg.min_face:
                continue
            rec = FaceRecord(idx, face, np.asarray(tools.embed(rgb, face), np.float32), float(tools.quality(rgb, face)))
            rec.pose = tools.pose(rgb, face)
            records.append(rec)
    groups = split_identities(records, cfg.threshold)
    result = {"source": path, "id": sid, "faces": len(records), "identities": [], "rejected": []}
    chosen = []
    for k, g in enumerate(groups):
        kept = drop_low_quality(g, cfg.drop_quality)
        picked = select_frames(kept, cfg.frames, cfg.pose_clusters, cfg.min_pose_diff, cfg.seed)
        if picked is None:
            result["rejected"].append({"identity": k, "faces": len(g), "reason": "not enough distinct poses"})
            continue
        chosen.append((k, sorted(picked, key=lambda r: r.frame)))
    need = {r.frame for _, p in chosen for r in p}
    frames = dict(read_frames(path, cfg.every, cfg.max_frames, only=need)) if need else {}
    for k, picked in chosen:
        name = f"{sid}_id{k}"
        tmp = os.path.join(out, f".tmp_{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        meta = []
        for j, r in enumerate(picked):
            crop, matrix = F.aligned_crop(frames[r.frame], r.face, cfg.resolution, cfg.padding)
            Image.fromarray((crop.numpy() * 255 + 0.5).astype(np.uint8)).save(os.path.join(tmp, f"{j:03d}.png"))
            mask = _face_mask(r.face, matrix.numpy(), cfg.resolution, cfg.padding)
            Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(tmp, f"{j:03d}.mask.png"))
            meta.append({"file": f"{j:03d}.png", "frame": r.frame, "frame_name": frame_name(path, r.frame),
                         "pose": [float(v) for v in r.pose], "quality": r.quality, "cluster": r.cluster,
                         "bbox": [float(v) for v in r.face.bbox]})
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"source": path, "identity": k, "padding": cfg.padding, "images": meta}, f, indent=1)
        final = os.path.join(out, name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        result["identities"].append({"name": name, "frames": [r.frame for r in picked]})
    done = os.path.join(out, ".done")
    os.makedirs(done, exist_ok=True)
    with open(os.path.join(done, f"{sid}.json.tmp"), "w") as f:
        json.dump(result, f, indent=1)
    os.replace(os.path.join(done, f"{sid}.json.tmp"), os.path.join(done, f"{sid}.json"))
    return result


_WORKER: dict = {}


def _work(path: str) -> dict:
    return process_source(path, _WORKER["out"], _WORKER["cfg"], _WORKER["tools"])


def write_manifest(out: str) -> int:
    done = os.path.join(out, ".done")
    rows = []
    for f in sorted(os.listdir(done)) if os.path.isdir(done) else []:
        if not f.endswith(".json"):
            continue
        with open(os.path.join(done, f)) as fh:
            rec = json.load(fh)
        for ident in rec["identities"]:
            d = os.path.join(out, ident["name"])
            imgs = sorted(n for n in os.listdir(d) if n.endswith(".png") and ".mask." not in n)
            rows.append({"id": ident["name"], "images": [f"{ident['name']}/{n}" for n in imgs],
                         "masks": [f"{ident['name']}/{os.path.splitext(n)[0]}.mask.png" for n in imgs]})
    with open(os.path.join(out, "manifest.jsonl"), "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return len(rows)


def curate(inputs: Sequence[str], out: str, cfg: CurateConfig = CurateConfig(), tools=None, workers: int = 1,
           progress: bool = True) -> dict:
    """Curate every source under ``inputs`` into ``out``; already finished sources are skipped."""
    from tqdm.auto import tqdm
    if tools is None:
        raise TrainingError("curation needs a face-embedding function: pass --insightface MODELS_ROOT (insightface "
                         "ArcFace) or FaceTools(embed=...)")
    if not isinstance(tools, FaceTools):
        tools = FaceTools(embed=tools.embed, detect=tools.detect, pose=tools.pose)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "curate_config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    sources = find_sources(inputs)
    done_dir = os.path.join(out, ".done")
    todo = [s for s in sources if not os.path.isfile(os.path.join(done_dir, f"{source_id(s)}.json"))]
    results = []
    bar = tqdm(total=len(todo), desc="curate", disable=not progress, dynamic_ncols=True)
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        if "fork" not in mp.get_all_start_methods():
            log.warning("no fork start method here: curating in one process")
            workers = 1
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        _WORKER.update(out=out, cfg=cfg, tools=tools)
        with mp.get_context("fork").Pool(min(workers, len(todo))) as pool:
            for res in pool.imap_unordered(_work, todo):
                results.append(res)
                bar.update(1)
        _WORKER.clear()
    else:
        for s in todo:
            results.append(process_source(s, out, cfg, tools))
            bar.update(1)
    bar.close()
    n = write_manifest(out)
    return {"sources": len(sources), "skipped": len(sources) - len(todo), "processed": results, "identities": n}
