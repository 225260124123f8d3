"""Training data: on-disk layout, loading, augmentation, face masks, and few-to-many sampling.

Dataset layout (what ``curate`` writes; any folder in this shape works)::

    dataset/
      <identity>/                 one folder per person, any name
        000.png ... 007.png       aligned square face crops (>= the training resolution; png/jpg/webp/bmp)
        000.mask.png ...          optional face masks M^r (white = face), same size as the image
        meta.json                 optional (curate: source, frame, pose, quality of each image)
      manifest.jsonl              optional, written by curate: one identity per line (below)

or a manifest (``data.manifest``), JSON lines (or a JSON list) of::

    {"id": "alice", "images": ["alice/000.png", ...], "masks": ["alice/000.mask.png", ...]}

paths relative to the manifest's folder; ``masks`` is optional. Images that are not aligned crops are
aligned on load with ``data.align: detect`` (RetinaFace from face/ + ArcFace-template similarity warp).

Face masks M^r (Eq. 4): the ``<stem>.mask.png`` next to an image when present (curate writes landmark
hulls); otherwise an ellipse placed by the ArcFace template the crops were aligned to (``crop_padding``).

Few-to-many sampling (Sec. 3.2, appendix A.2): per identity and epoch, |X^s| is drawn uniformly in
``num_inputs`` ([1, 3] by default) and X^r is ``num_targets`` images (all 8 by default, the inputs
included; ``disjoint`` draws X^r from the rest). The ablations 3-8, 3-5 and 8-8 are
``num_inputs: [3, 3]`` with ``num_targets`` 8 / 5 and ``num_inputs: [8, 8]``.

Every random choice of a sample (subset, split, augmentation, and the trainer's masks, noise and t) is
drawn from a generator seeded by (run seed, epoch, identity index): a sample is the same whatever the
number of processes, the batch size or a resume, which makes resumed and distributed runs reproducible.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from .config import DataConfig, input_range
from ...errors import TrainingError

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_SUFFIX = ".mask.png"


@dataclass
class IdentityRecord:
    name: str
    images: list
    masks: list = field(default_factory=list)   # same length as images; None where there is no mask file


# ---------------------------------------------------------------------------------------------------
# Discovery


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.lower().endswith(MASK_SUFFIX)


def _mask_for(path: str) -> Optional[str]:
    m = os.path.splitext(path)[0] + MASK_SUFFIX
    return m if os.path.isfile(m) else None


def discover_identities(root: str) -> list[IdentityRecord]:
    """One record per sub-folder of ``root`` holding images, sorted by name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    out = []
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if not os.path.isdir(d):
            continue
        imgs = sorted(os.path.join(d, f) for f in os.listdir(d) if _is_image(f))
        if imgs:
            out.append(IdentityRecord(name, imgs, [_mask_for(p) for p in imgs]))
    if not out:
        raise TrainingError(f"no identity folders with images under {root}; expected {root}/<identity>/*.png")
    return out


def read_manifest(path: str) -> list[IdentityRecord]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        text = f.read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    out = []
    for i, row in enumerate(rows):
        if "images" not in row:
            raise TrainingError(f"{path}: entry {i} has no 'images' list")
        imgs = [p if os.path.isabs(p) else os.path.join(base, p) for p in row["images"]]
        masks = row.get("masks") or [None] * len(imgs)
        masks = [None if m is None else (m if os.path.isabs(m) else os.path.join(base, m)) for m in masks]
        if len(masks) != len(imgs):
            raise TrainingError(f"{path}: entry {i} has {len(imgs)} images but {len(masks)} masks")
        masks = [m if m is not None else _mask_for(p) for p, m in zip(imgs, masks)]
        out.append(IdentityRecord(str(row.get("id", i)), imgs, masks))
    return out


def load_records(cfg: DataConfig) -> list[IdentityRecord]:
    if cfg.manifest:
        return read_manifest(cfg.manifest)
    if cfg.root:
        manifest = os.path.join(cfg.root, "manifest.jsonl")
        return read_manifest(manifest) if os.path.isfile(manifest) else discover_identities(cfg.root)
    raise TrainingError("set data.root (folder per identity) or data.manifest")


def split_identities(records: Sequence[IdentityRecord], holdout: Sequence[str] = (), fraction: float = 0.0,
                     seed: int = 0) -> tuple[list[IdentityRecord], list[IdentityRecord]]:
    """(train, held-out): the named identities plus a seeded ``fraction`` of the rest are held out."""
    names = {r.name for r in records}
    missing = sorted(set(holdout) - names)
    if missing:
        raise TrainingError(f"held-out identities {missing} are not in the dataset")
    held = set(holdout)
    if fraction > 0:
        rest = sorted(names - held)
        g = torch.Generator().manual_seed(seed)
        k = int(round(fraction * len(rest)))
        held |= {rest[i] for i in torch.randperm(len(rest), generator=g)[:k].tolist()}
    return [r for r in records if r.name not in held], [r for r in records if r.name in held]


# ---------------------------------------------------------------------------------------------------
# Seeds and the few-to-many split


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample: a fixed mix of (run seed, epoch, identity index), < 2**63."""
    x = (int(seed) * 0x9E3779B1 + int(epoch) * 0x85EBCA77 + int(index) * 0xC2B2AE3D) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & ((1 << 63) - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def few_to_many_split(num_images: int, num_inputs, num_targets: int, disjoint: bool,
                      g: torch.Generator) -> tuple[list[int], list[int]]:
    """Indices (inputs X^s, targets X^r) into ``num_images`` images of one identity.

    |X^s| is uniform in ``num_inputs`` = (min, max); X^r has ``num_targets`` images, chosen among all
    images (inputs included) or, with ``disjoint``, among the images not in X^s.
    """
    lo, hi = input_range(num_inputs)
    if hi > num_images or num_targets > num_images or (disjoint and hi + num_targets > num_images):
        raise TrainingError(f"cannot draw {num_inputs} inputs and {num_targets} targets from {num_images} images")
    k = int(torch.randint(lo, hi + 1, (1,), generator=g))
    perm = torch.randperm(num_images, generator=g).tolist()
    inputs = sorted(perm[:k])
    pool = perm[k:] if disjoint else torch.randperm(num_images, generator=g).tolist()
    targets = sorted(pool[:num_targets])
    return inputs, targets


# ---------------------------------------------------------------------------------------------------
# Images and masks


def template_face_mask(size: int, padding: float) -> torch.Tensor:
    """(size, size) float {0,1}: the face ellipse of a crop aligned to the ArcFace template.

    At padding 0 the face oval is centred at (0.5, 0.56) of the crop with half-axes (0.43, 0.54) (eyes
    at y 0.46, mouth at 0.82 of the template); padding shrinks it toward the centre like the template.
    """
    cx, cy, rx, ry = 0.5, 0.56, 0.43, 0.54
    s = 1.0 + padding
    cy = (cy - 0.5) / s + 0.5
    rx, ry = rx / s, ry / s
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return ((((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) <= 1.0).float()


def _pil_to_tensor(im) -> torch.Tensor:
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _square_resize(t: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(C, H, W) -> (C, size, size): centre crop to square, then resize (antialiased when shrinking)."""
    c, h, w = t.shape
    if h != w:
        s = min(h, w)
        t = t[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if t.shape[-1] == size:
        return t
    if mode == "nearest":
        return F.interpolate(t[None], size=(size, size), mode="nearest")[0]
    return F.interpolate(t[None], size=(size, size), mode=mode, antialias=t.shape[-1] > size,
                         align_corners=False)[0].clamp(0, 1)


def load_image(path: str) -> torch.Tensor:
    from PIL import Image
    with Image.open(path) as im:
        return _pil_to_tensor(im)


def load_mask(path: str) -> torch.Tensor:
    from PIL import Image
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def align_on_load(image: torch.Tensor, size: int, padding: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Detect the largest face of a (3, H, W) image and align it to the ArcFace template at ``size``.

    Returns (crop (3, size, size), face mask (1, size, size)) (mask: landmark-free template ellipse).
    """
    from ...face import align as face_align
    from ...face import detect as face_detect

    img = image.permute(1, 2, 0)[None]
    faces = face_detect.select_faces(face_detect.detect_faces(img)[0], "largest", 0)
    if not faces:
        raise TrainingError("no face found")
    crop = face_align.align_faces(img, faces, size=size, padding=padding).crops[0].permute(2, 0, 1)
    return crop, template_face_mask(size, padding)[None]


def augment(image: torch.Tensor, mask: torch.Tensor, cfg: DataConfig, g: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip, small zoom/shift, colour jitter of a (3, S, S) image and its (1, S, S) mask (same geometry)."""
    u = torch.rand(8, generator=g)
    if cfg.hflip > 0 and float(u[0]) < cfg.hflip:
        image, mask = image.flip(-1), mask.flip(-1)
    if cfg.scale_jitter > 0:
        j = cfg.scale_jitter
        scale = 1.0 + (float(u[1]) * 2 - 1) * j
        tx, ty = (float(u[2]) * 2 - 1) * j, (float(u[3]) * 2 - 1) * j
        theta = torch.tensor([[1 / scale, 0, tx], [0, 1 / scale, ty]], dtype=torch.float32)[None]
        grid = F.affine_grid(theta, (1, 1, *image.shape[-2:]), align_corners=False)
        image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        mask = F.grid_sample(mask[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        b, c, s = (1 + (float(u[k]) * 2 - 1) * j for k in (4, 5, 6))
        image = image * b
        mean = image.mean()
        image = (image - mean) * c + mean
        gray = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
        image = (image - gray) * s + gray
    return image.clamp(0, 1), mask


# ---------------------------------------------------------------------------------------------------
# Dataset, sampler, collate


class IdentityDataset(Dataset):
    """Few-to-many samples of identities. Index with ``(epoch, i)`` (the EpochSampler does) or ``i``."""

    def __init__(self, records: Sequence[IdentityRecord], cfg: DataConfig, seed: int, target_size: int,
                 input_size: Optional[int] = None):
        need = cfg.min_images or max(cfg.num_targets, input_range(cfg.num_inputs)[1])
        kept = [r for r in records if len(r.images) >= need]
        if len(kept) < len(records):
            log.warning("skipping %d identities with fewer than %d images", len(records) - len(kept), need)
        if not kept:
            raise TrainingError(f"no identity has at least {need} images")
        self.records, self.cfg, self.seed = list(kept), cfg, int(seed)
        self.target_size, self.input_size = int(target_size), int(input_size or cfg.input_resolution)
        self._aligned: dict = {}

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, rec: IdentityRecord, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (3, S, S), mask (1, S, S)) at the target size."""
        size, cfg = self.target_size, self.cfg
        path = rec.images[j]
        if cfg.align == "detect":
            if path not in self._aligned:
                self._aligned[path] = align_on_load(load_image(path), size, cfg.crop_padding)
            img, mask = self._aligned[path]
        else:
            img = _square_resize(load_image(path), size)
            mask = None
        mpath = rec.masks[j] if j < len(rec.masks) else None
        if cfg.mask == "none":
            mask = torch.ones(1, size, size)
        elif mpath is not None and cfg.mask in ("auto", "file"):
            mask = (_square_resize(load_mask(mpath), size, "nearest") > 0.5).float()
        elif cfg.mask == "file":
            raise FileNotFoundError(f"data.mask=file but {path} has no {MASK_SUFFIX}")
        elif mask is None:
            mask = template_face_mask(size, cfg.crop_padding)[None]
        return img, mask

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        seed = sample_seed(self.seed, epoch, index)
        g = generator(seed)
        rec = self.records[index]
        cfg = self.cfg
        n = len(rec.images)
        chosen = sorted(torch.randperm(n, generator=g)[:cfg.images_per_identity].tolist()) \
            if n > cfg.images_per_identity else list(range(n))
        inputs_i, targets_i = few_to_many_split(len(chosen), cfg.num_inputs, cfg.num_targets, cfg.disjoint, g)
        cache = {}

        def get(j):
            if j not in cache:
                cache[j] = self._load(rec, chosen[j])
            return cache[j]

        inputs = []
        for j in inputs_i:
            img, mask = get(j)
            img, _ = augment(img, mask, cfg, g)
            inputs.append(_square_resize(img, self.input_size))
        targets, masks = [], []
        for j in targets_i:
            img, mask = get(j)
            if cfg.augment_targets:
                img, mask = augment(img, mask, cfg, g)
            targets.append(img)
            masks.append(mask)
        return {"inputs": torch.stack(inputs), "targets": torch.stack(targets), "target_masks": torch.stack(masks),
                "seed": seed, "name": rec.name, "input_ids": [chosen[j] for j in inputs_i],
                "target_ids": [chosen[j] for j in targets_i],
                # identifies a target's pixels (for latent caching): only when targets are not augmented
                "target_keys": None if cfg.augment_targets else
                [f"{rec.images[chosen[j]]}@{self.target_size}" for j in targets_i]}


class EpochSampler(Sampler):
    """Yields ``(epoch, index)``: a permutation of the identities seeded by (seed, epoch).

    Every process builds the same order; accelerate hands each process its own batches of it.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = int(size), int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=generator(sample_seed(self.seed, self.epoch, -1))).tolist() \
            if self.shuffle else list(range(self.size))
        epoch = self.epoch
        return iter([(epoch, i) for i in order])


def collate_identities(items: Sequence[dict]) -> dict:
    """Stack samples: inputs padded to the largest |X^s| of the batch (``input_mask`` marks real ones)."""
    s_max = max(it["inputs"].shape[0] for it in items)
    b = len(items)
    c, h, w = items[0]["inputs"].shape[1:]
    inputs = torch.zeros(b, s_max, c, h, w)
    input_mask = torch.zeros(b, s_max, dtype=torch.bool)
    for i, it in enumerate(items):
        k = it["inputs"].shape[0]
        inputs[i, :k] = it["inputs"]
        input_mask[i, :k] = True
    return {"inputs": inputs, "input_mask": input_mask,
            "targets": torch.stack([it["targets"] for it in items]),
            "target_masks": torch.stack([it["target_masks"] for it in items]),
            "seeds": torch.tensor([it["seed"] for it in items], dtype=torch.int64),
            "names": [it["name"] for it in items], "input_ids": [it["input_ids"] for it in items],
            "target_ids": [it["target_ids"] for it in items],
            "target_keys": None if any(it["target_keys"] is None for it in items)
            else [k for it in items for k in it["target_keys"]]}


def first_identity(batch: dict) -> dict:
    """The batch restricted to its first identity (for diagnostics)."""
    r = batch["targets"].shape[1]
    return {k: None if v is None else (v[:r] if k == "target_keys" else v[:1]) for k, v in batch.items()}


def save_image_grid(path: str, rows: Sequence[Sequence[torch.Tensor]]) -> None:
    """Write rows of (3, H, W) images in [0, 1] (all the same size) as one PNG."""
    from PIL import Image
    rows = [list(r) for r in rows if len(r)]
    if not rows:
        return
    h, w = rows[0][0].shape[-2:]
    cols = max(len(r) for r in rows)
    canvas = torch.ones(3, h * len(rows), w * cols)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            im = im.detach().float().cpu().clamp(0, 1)
            if im.shape[0] == 1:
                im = im.expand(3, -1, -1)
            if im.shape[-2:] != (h, w):
                im = F.interpolate(im[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            canvas[:, i * h:(i + 1) * h, j * w:(j + 1) * w] = im
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arr = (canvas.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    Image.fromarray(arr).save(path)
