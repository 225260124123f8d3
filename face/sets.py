"""What the face nodes pass between them: a face analyser, the faces found in an IMAGE batch, ArcFace embeddings.

Long loops take an optional ``step(done, total)`` callback, called before each item and once at the end (done ==
total): ComfyUI's nodes pass one that moves the progress bar and stops on Cancel; the library knows nothing of ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from . import align, detect, landmarks
from . import insightface_loader
from .types import FaceDetection, FaceError

Step = Callable[[int, int], None]


@dataclass
class FaceAnalysis:
    """A face detector (+ optional insightface pack with recognition/landmarks/pose) for the face nodes."""

    detector: detect.FaceDetector
    backend: str                                   # "insightface" or "retinaface"
    pack: Optional[insightface_loader.InsightFacePack] = None

    @property
    def has_recognition(self) -> bool:
        return self.pack is not None and self.pack.model("recognition") is not None

    @property
    def id_model(self) -> str:
        if not self.has_recognition:
            return ""
        return f"insightface {self.pack.name} ({self.pack.task_files.get('recognition', '?')})"

    def detect(self, images: torch.Tensor, step: Optional[Step] = None) -> list[list[FaceDetection]]:
        """All faces per image, one image at a time (``step``: see the module doc)."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        out = []
        for i in range(images.shape[0]):
            if step is not None:
                step(i, images.shape[0])
            faces = detect.detect_faces(images[i:i + 1], self.detector)[0]
            for f in faces:
                f.image_index = i
            out.append(faces)
        if step is not None:
            step(images.shape[0], images.shape[0])
        return out

    def embed(self, crops112: torch.Tensor) -> torch.Tensor:
        if not self.has_recognition:
            if self.pack is not None:
                raise FaceError(f"the insightface pack '{self.pack.name}' has no recognition model: add its ArcFace "
                                 "file (antelopev2: glintr100.onnx, buffalo_l: w600k_r50.onnx) to the pack's folder")
            raise FaceError("face embeddings need an insightface pack with a recognition model (antelopev2: "
                             "glintr100.onnx, buffalo_l: w600k_r50.onnx): use 'Load InsightFace Pack (IDP)' "
                             f"instead of the {self.backend} detector")
        return insightface_loader.arcface_embeddings(self.pack, crops112)

    def __repr__(self):
        if self.pack is not None:
            return f"FaceAnalysis(insightface {self.pack.name}: {', '.join(self.pack.tasks)})"
        return f"FaceAnalysis({self.backend})"


@dataclass
class FaceSet:
    """Faces found in an IMAGE batch: every detection, the selected ones (crop order) and their alignment."""

    images: torch.Tensor
    detected: list
    selected: list
    aligned: Optional[align.AlignedFaces] = None
    crop_size: int = 112
    padding: float = 0.0
    backend: str = ""

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    def rows(self, which: str = "selected") -> list:
        return self.selected if which == "selected" else self.detected

    def with_faces(self, mapping: dict) -> "FaceSet":
        """A copy where faces are replaced by id() -> new FaceDetection (e.g. with landmarks)."""
        def sub(rows):
            return [[mapping.get(id(f), f) for f in row] for row in rows]
        aligned = self.aligned
        if aligned is not None:
            aligned = replace(aligned, faces=[mapping.get(id(f), f) for f in aligned.faces])
        return replace(self, detected=sub(self.detected), selected=sub(self.selected), aligned=aligned)

    def __repr__(self):
        return (f"FaceSet({sum(map(len, self.selected))} selected of {sum(map(len, self.detected))} faces in "
                f"{len(self.detected)} image(s), {self.backend})")


@dataclass
class FaceEmbedding:
    """L2-normalised identity embeddings [N,D] (ArcFace) and the image each came from."""

    embeddings: torch.Tensor
    image_indices: list
    model: str = ""

    def __repr__(self):
        return f"FaceEmbedding({tuple(self.embeddings.shape)}, {self.model})"


def _mediapipe_for(faces: FaceSet, which: str, need: Callable[[FaceDetection], bool],
                   step: Optional[Step] = None) -> FaceSet:
    """Run mediapipe FaceMesh on the faces in ``which`` for which need(face) is true."""
    rows = faces.rows(which)
    todo = [[f for f in row if need(f)] for row in rows]
    if not any(todo):
        return faces
    mapping = {}
    for i, row in enumerate(todo):
        if step is not None:
            step(i, len(rows))
        if row:
            fresh = landmarks.mediapipe_landmarks(faces.images[i:i + 1], [row])[0]
            mapping.update((id(old), new) for old, new in zip(row, fresh))
    if step is not None:
        step(len(rows), len(rows))
    return faces.with_faces(mapping)


def ensure_landmarks(faces: FaceSet, backend: str = "auto", which: str = "selected",
                     step: Optional[Step] = None) -> FaceSet:
    """Dense landmarks (+ pose) for the faces in ``which``; 'auto' keeps insightface's, 'mediapipe' redoes all."""
    return _mediapipe_for(faces, which, lambda f: backend == "mediapipe" or f.landmarks is None, step)


def ensure_poses(faces: FaceSet, which: str = "selected", step: Optional[Step] = None) -> FaceSet:
    """Every face gets a pose: the detector's (insightface 3d68) or, where it has none, mediapipe's."""
    return _mediapipe_for(faces, which, lambda f: f.pose is None and landmarks.ensure_pose(f) is None, step)
