"""Dense face landmarks, head pose, and landmark/key-point images for ControlNet-style conditioning.

Landmarks come from insightface (2d106 / 3d68 with pose, when a pack with those models is loaded; the
``InsightFaceDetector`` already fills them in) or, offline, from mediapipe 0.10.21's bundled FaceMesh
(478 points incl. irises). mediapipe's short-range detector misses small faces, so FaceMesh runs on a
square crop around each detected face and the points are mapped back to the image.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np
import torch

from .types import FaceError, BackendUnavailable, FaceDetection, image_to_uint8

log = logging.getLogger(__name__)

MEDIAPIPE_INSTALL_HINT = ("pip install --no-deps mediapipe==0.10.21 && pip install absl-py attrs flatbuffers "
                          "matplotlib 'protobuf>=6.31.1,<7' (newer mediapipe releases ship no face models)")

# Anatomical points per layout used for the head frame (image-left eye, image-right eye, brows, chin).
# mediapipe: 33/133 and 362/263 are the eye corners, 105/334 brow points, 152 the chin.
# 68-point (dlib/iBUG order, insightface 3d68): 36-41 and 42-47 the eyes, 19/24 brows, 8 the chin.
_POSE_POINTS = {
    "mediapipe478": dict(eye_l=[33, 133], eye_r=[362, 263], top=[105, 334], chin=[152]),
    "3d68": dict(eye_l=list(range(36, 42)), eye_r=list(range(42, 48)), top=[19, 24], chin=[8]),
}


def _import_mediapipe():
    try:
        import mediapipe as mp
        fm = mp.solutions.face_mesh
    except (ImportError, AttributeError) as e:
        raise BackendUnavailable(f"mediapipe with the legacy FaceMesh solution is not available ({e}). "
                                 f"Install it with: {MEDIAPIPE_INSTALL_HINT}") from e
    return fm


def mediapipe_available() -> bool:
    try:
        _import_mediapipe()
        return True
    except BackendUnavailable:
        return False


def _square_crop(rgb: np.ndarray, face: FaceDetection, expand: float, out_min: int, out_max: int):
    """Square crop around the face box (black outside the image); returns crop, origin and side."""
    from PIL import Image

    cx, cy = face.center
    side = max(face.width, face.height) * expand
    x0, y0 = cx - side / 2, cy - side / 2
    res = int(min(max(side, out_min), out_max))
    crop = Image.fromarray(rgb).transform((res, res), Image.EXTENT, (x0, y0, x0 + side, y0 + side),
                                          Image.BILINEAR)
    return np.asarray(crop), x0, y0, side


def mediapipe_landmarks(images: torch.Tensor, faces_per_image: Sequence[Sequence[FaceDetection]],
                        expand: float = 1.8, min_confidence: float = 0.3) -> list[list[FaceDetection]]:
    """Add mediapipe FaceMesh landmarks (478 x (x, y) in image pixels, plus ``landmarks_3d`` with z
    in the same pixel scale) and pose to each face. Faces where FaceMesh finds nothing keep
    ``landmarks=None``. Returns new FaceDetection objects (inputs are not modified).
    """
    fm = _import_mediapipe()
    if images.ndim == 3:
        images = images.unsqueeze(0)
    out = []
    with fm.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                     min_detection_confidence=min_confidence) as mesh:
        for i, faces in enumerate(faces_per_image):
            rgb = image_to_uint8(images[i])
            row = []
            for f in faces:
                crop, x0, y0, side = _square_crop(rgb, f, expand, 256, 512)
                res = mesh.process(crop)
                if not res.multi_face_landmarks:
                    log.debug("mediapipe found no face mesh in the crop of face %s", f.bbox)
                    row.append(f.with_())
                    continue
                pts = np.array([(p.x, p.y, p.z) for p in res.multi_face_landmarks[0].landmark], np.float32)
                # x, y are normalised by the crop side; z uses the same scale as x.
                xyz = np.stack([x0 + pts[:, 0] * side, y0 + pts[:, 1] * side, pts[:, 2] * side], 1)
                g = f.with_(landmarks=xyz[:, :2].copy(), landmarks_3d=xyz, landmark_kind="mediapipe478")
                g.pose = estimate_pose(xyz, "mediapipe478")
                row.append(g)
            out.append(row)
    return out


def add_landmarks(images: torch.Tensor, faces_per_image: Sequence[Sequence[FaceDetection]],
                  backend: str = "auto") -> list[list[FaceDetection]]:
    """Make sure every face has dense landmarks and a pose.

    backend: 'auto' keeps landmarks a detector already produced (insightface) and uses mediapipe for
    the rest; 'mediapipe' always recomputes with mediapipe; 'existing' only keeps what is there.
    """
    if backend not in ("auto", "mediapipe", "existing"):
        raise FaceError(f"unknown landmark backend {backend!r}")
    if backend == "existing":
        return [list(r) for r in faces_per_image]
    need = [[f for f in row if backend == "mediapipe" or f.landmarks is None] for row in faces_per_image]
    if not any(need):
        return [list(r) for r in faces_per_image]
    fresh = mediapipe_landmarks(images, need)
    out = []
    for row, new_row, need_row in zip(faces_per_image, fresh, need):
        repl = {id(a): b for a, b in zip(need_row, new_row)}
        out.append([repl.get(id(f), f) for f in row])
    return out


def _rotation_to_ypr(r: np.ndarray) -> tuple[float, float, float]:
    """R = Ry(yaw) @ Rx(pitch) @ Rz(roll) in camera axes (x right, y down, z into the image)."""
    pitch = math.asin(float(np.clip(-r[1, 2], -1.0, 1.0)))
    yaw = math.atan2(float(r[0, 2]), float(r[2, 2]))
    roll = math.atan2(float(r[1, 0]), float(r[1, 1]))
    return math.degrees(yaw), math.degrees(pitch), math.degrees(roll)


def head_frame(points3d: np.ndarray, kind: str) -> np.ndarray:
    """3x3 rotation whose columns are the face's right (image-left eye -> image-right eye), down
    (brows -> chin) and backward axes, in camera coordinates (pixels; z in the x scale)."""
    if kind not in _POSE_POINTS:
        raise FaceError(f"pose needs 3-D landmarks of kind {sorted(_POSE_POINTS)}, got {kind!r}")
    idx = _POSE_POINTS[kind]
    p = np.asarray(points3d, np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise FaceError(f"expected [N,3] landmarks, got {p.shape}")
    x = p[idx["eye_r"]].mean(0) - p[idx["eye_l"]].mean(0)
    down = p[idx["chin"]].mean(0) - p[idx["top"]].mean(0)
    x /= max(np.linalg.norm(x), 1e-9)
    y = down - (down @ x) * x
    y /= max(np.linalg.norm(y), 1e-9)
    z = np.cross(x, y)
    return np.stack([x, y, z], 1)


def estimate_pose(points3d: np.ndarray, kind: str = "mediapipe478") -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from 3-D landmarks, by the anatomical head frame.

    Conventions (camera view, image y down): roll > 0 when the face is turned clockwise in the image;
    yaw > 0 when the face turns toward the image's left; pitch > 0 when the face tilts down (chin
    toward the chest). A frontal face reads about 0 yaw and roll; pitch carries a small constant
    offset of the landmark model, which cancels in pose differences. Poses from different back-ends
    (mediapipe vs insightface's own 3d68 pose) use different conventions: compare like with like.
    """
    return _rotation_to_ypr(head_frame(points3d, kind))


def ensure_pose(face: FaceDetection) -> Optional[tuple[float, float, float]]:
    """The face's pose, computing it from 3-D landmarks when the detector gave none."""
    if face.pose is None and face.landmarks_3d is not None and face.landmark_kind in _POSE_POINTS:
        face.pose = estimate_pose(face.landmarks_3d, face.landmark_kind)
    return face.pose


def _mediapipe_contour_indices() -> np.ndarray:
    """The FaceMesh points on its drawn contours (oval, eyes, brows, lips, irises): a readable
    OpenPose-like face sketch instead of a 478-point blob."""
    fm = _import_mediapipe()
    idx = set()
    for conn in (fm.FACEMESH_CONTOURS, fm.FACEMESH_IRISES):
        for a, b in conn:
            idx.update((a, b))
    return np.array(sorted(idx))


def landmark_image(faces_per_image: Sequence[Sequence[FaceDetection]], height: int, width: int,
                   radius: Optional[int] = None, color=(255, 255, 255)) -> torch.Tensor:
    """OpenPose-face style landmark image: filled dots on black, IMAGE [B,H,W,3].

    Uses each face's dense landmarks (68/106 points as is; mediapipe reduced to its contour points)
    and falls back to the 5 key points for faces without landmarks.
    """
    from PIL import Image, ImageDraw

    r = radius if radius is not None else max(1, round(min(height, width) / 170))
    out = []
    contour = None
    for faces in faces_per_image:
        im = Image.new("RGB", (width, height), (0, 0, 0))
        d = ImageDraw.Draw(im)
        for f in faces:
            pts = f.kps if f.landmarks is None else f.landmarks
            if f.landmark_kind == "mediapipe478":
                if contour is None:
                    contour = _mediapipe_contour_indices()
                pts = f.landmarks[contour[contour < len(f.landmarks)]]
            for x, y in np.asarray(pts)[:, :2]:
                d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(color))
        out.append(torch.from_numpy(np.asarray(im).copy()).float() / 255.0)
    return torch.stack(out) if out else torch.zeros(0, height, width, 3)


_KPS_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def kps_image(faces_per_image: Sequence[Sequence[FaceDetection]], height: int, width: int,
              thickness: Optional[int] = None) -> torch.Tensor:
    """InstantID-style 5-key-point image: each eye/mouth corner joined to the nose by a coloured
    limb, coloured dots on the points, black background. IMAGE [B,H,W,3]."""
    from PIL import Image, ImageDraw

    t = thickness if thickness is not None else max(2, round(min(height, width) / 128))
    out = []
    for faces in faces_per_image:
        limbs = Image.new("RGB", (width, height), (0, 0, 0))
        dl = ImageDraw.Draw(limbs)
        dots = Image.new("RGB", (width, height), (0, 0, 0))
        dd = ImageDraw.Draw(dots)
        for f in faces:
            k = np.asarray(f.kps, np.float64)
            for j in (0, 1, 3, 4):
                dl.line([tuple(k[j]), tuple(k[2])], fill=_KPS_COLORS[j], width=t * 2)
            for j, (x, y) in enumerate(k):
                dd.ellipse([x - t * 2, y - t * 2, x + t * 2, y + t * 2], fill=_KPS_COLORS[j])
        a = np.asarray(limbs, np.float32) * 0.6          # dimmed limbs under full-strength points
        b = np.asarray(dots, np.float32)
        img = np.where(b.sum(-1, keepdims=True) > 0, b, a)
        out.append(torch.from_numpy(img) / 255.0)
    return torch.stack(out) if out else torch.zeros(0, height, width, 3)
