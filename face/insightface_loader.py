"""Load an insightface model pack (antelopev2, buffalo_l, ...) from a local folder, never downloading.

The folder layout is the one every ComfyUI face pack uses: ``<models>/insightface/models/<name>/*.onnx``.
Files are routed to their tasks by insightface's own ``FaceAnalysis``/``model_zoo`` (by input shape and
output count), so a user's real pack loads exactly as it does for InstantID/PuLID/IPAdapter.
insightface is imported only when a pack is loaded: the rest of ``face/`` works without it.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from .types import BackendUnavailable, FaceError, ModelFilesMissing

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install insightface onnxruntime (or onnxruntime-gpu for CUDA) into ComfyUI's "
                "Python environment")

# The files of the released packs. Used to name what is missing; routing itself is by shape.
KNOWN_PACKS: dict[str, dict[str, str]] = {
    "antelopev2": {
        "detection": "scrfd_10g_bnkps.onnx",
        "recognition": "glintr100.onnx",
        "landmark_3d_68": "1k3d68.onnx",
        "landmark_2d_106": "2d106det.onnx",
        "genderage": "genderage.onnx",
    },
    "buffalo_l": {
        "detection": "det_10g.onnx",
        "recognition": "w600k_r50.onnx",
        "landmark_3d_68": "1k3d68.onnx",
        "landmark_2d_106": "2d106det.onnx",
        "genderage": "genderage.onnx",
    },
}

# Short provider names as ComfyUI users know them (IPAdapter/PuLID/InstantID loaders) -> onnxruntime.
PROVIDER_ALIASES = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCM": "ROCMExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "DML": "DmlExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
    "TensorRT": "TensorrtExecutionProvider",
}


class InsightFaceModelsMissing(ModelFilesMissing):
    """The model folder or some of its expected ONNX files are absent."""


def import_insightface():
    """Import insightface (and onnxruntime) or raise BackendUnavailable with the install command."""
    try:
        import onnxruntime  # noqa: F401
        from insightface.app import FaceAnalysis  # noqa: F401
        import insightface
    except ImportError as e:
        raise BackendUnavailable(f"insightface is not available ({e}). Install it with: {INSTALL_HINT}") from e
    return insightface


def resolve_providers(provider: Union[str, Sequence[str]] = "CPU") -> list[str]:
    """Map 'CPU'/'CUDA'/... (or full onnxruntime names) to an onnxruntime provider list ending in CPU.

    Providers this onnxruntime build lacks are dropped with a warning instead of failing later inside
    onnxruntime with an obscure message; CPU is always kept as the last resort.
    """
    import onnxruntime

    names = [provider] if isinstance(provider, str) else list(provider)
    wanted = [PROVIDER_ALIASES.get(n, n if n.endswith("ExecutionProvider") else f"{n}ExecutionProvider")
              for n in names]
    available = set(onnxruntime.get_available_providers())
    out = []
    for p in wanted:
        if p in available:
            if p not in out:
                out.append(p)
        else:
            log.warning("onnxruntime provider %s is not available here (have %s); skipping it",
                        p, sorted(available))
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def find_pack_dir(models_root: str, name: str) -> str:
    """Return the folder holding the pack's .onnx files, or raise InsightFaceModelsMissing.

    ``models_root`` is ComfyUI's ``models`` folder (containing ``insightface/models/<name>``), or the
    ``insightface`` folder itself, or directly the pack folder. The antelopev2 zip unpacks to
    ``antelopev2/antelopev2/``; that nesting is a common user mistake, so it is accepted with a warning.
    """
    candidates = [os.path.join(models_root, "insightface", "models", name),
                  os.path.join(models_root, "models", name)]
    if os.path.basename(os.path.normpath(models_root)) == name:
        candidates.append(models_root)
    expected = sorted(KNOWN_PACKS.get(name, {}).values())
    for d in candidates:
        if not os.path.isdir(d):
            continue
        if glob.glob(os.path.join(d, "*.onnx")) or os.path.isfile(os.path.join(d, "manifest.json")):
            return os.path.abspath(d)
        nested = os.path.join(d, name)
        if glob.glob(os.path.join(nested, "*.onnx")):
            log.warning("insightface pack %s is nested one level too deep (%s); using it, but move the "
                        ".onnx files up into %s", name, nested, d)
            return os.path.abspath(nested)
        raise InsightFaceModelsMissing(
            f"insightface model folder {d} contains no .onnx files; expected "
            f"{', '.join(expected) if expected else 'the ONNX files of the pack'}")
    raise InsightFaceModelsMissing(
        f"insightface model pack '{name}' not found: expected the folder {candidates[0]} containing "
        f"{', '.join(expected) if expected else 'the ONNX files of the pack'}. Models are never "
        f"downloaded automatically; place the files there yourself.")


@dataclass
class InsightFacePack:
    """A loaded FaceAnalysis plus what was asked for (for logs, caching keys and node outputs)."""

    app: Any
    name: str
    folder: str
    providers: list[str]
    det_size: tuple[int, int]
    det_thresh: float
    task_files: dict[str, str] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.task_files)

    def model(self, task: str):
        """The insightface model object for ``task`` ('recognition', 'landmark_3d_68', ...), or None."""
        return self.app.models.get(task)


def load_insightface(models_root: str, name: str = "antelopev2", provider: Union[str, Sequence[str]] = "CPU",
                     det_size: Union[int, tuple[int, int]] = 640, det_thresh: float = 0.5,
                     allowed_modules: Optional[Sequence[str]] = None, strict: bool = True) -> InsightFacePack:
    """Load ``<models_root>/insightface/models/<name>`` through insightface's FaceAnalysis.

    provider: 'CPU', 'CUDA', 'ROCM', 'DirectML', 'CoreML', 'OpenVINO' or a list of those/onnxruntime names.
    det_size: detector input size; passed explicitly because insightface 2.x otherwise runs two sizes.
    strict: for the known packs, require every released file (so a half-copied pack fails loudly
    with the list of missing files); with allowed_modules only the files of those tasks are required.
    Raises BackendUnavailable when insightface is not installed, InsightFaceModelsMissing when files
    are absent, RuntimeError when the files load but no detector is among them.
    """
    import_insightface()   # first: "install insightface" is the more fundamental fix than any file
    folder = find_pack_dir(models_root, name)
    if name in KNOWN_PACKS and strict:
        need = {t: f for t, f in KNOWN_PACKS[name].items() if allowed_modules is None or t in allowed_modules}
        missing = sorted(f for f in need.values() if not os.path.isfile(os.path.join(folder, f)))
        if missing:
            raise InsightFaceModelsMissing(
                f"insightface pack '{name}' in {folder} is incomplete: missing {', '.join(missing)} "
                f"(expected {', '.join(sorted(need.values()))})")
    from insightface.app import FaceAnalysis

    providers = resolve_providers(provider)
    if isinstance(det_size, int):
        det_size = (det_size, det_size)
    det_size = (int(det_size[0]), int(det_size[1]))
    # name=<absolute folder> makes both insightface 0.7.x and 2.x use the folder as is: no download
    # path is ever taken, whatever `root` says.
    kwargs: dict[str, Any] = dict(name=folder, root=os.path.dirname(folder), providers=providers)
    if allowed_modules is not None:
        kwargs["allowed_modules"] = list(allowed_modules)
    try:
        app = FaceAnalysis(**kwargs)
    except AssertionError as e:   # insightface asserts 'detection' in self.models
        raise InsightFaceModelsMissing(f"no face detector among the ONNX files in {folder}: "
                           f"{sorted(os.listdir(folder))}") from e
    ctx_id = 0 if providers[0] != "CPUExecutionProvider" else -1
    app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=det_size)
    task_files = {task: os.path.basename(getattr(m, "model_file", "") or "") for task, m in app.models.items()}
    log.info("loaded insightface pack %s from %s on %s: %s", name, folder, providers[0], task_files)
    return InsightFacePack(app=app, name=name, folder=folder, providers=providers, det_size=det_size,
                           det_thresh=det_thresh, task_files=task_files)


def arcface_embeddings(pack: InsightFacePack, crops, normalize: bool = True):
    """Identity embeddings [N,D] (torch float32) of aligned 112x112 crops IMAGE [N,112,112,C].

    Uses the pack's recognition model (glintr100 / w600k_r50), which expects ArcFace-aligned crops
    as produced by ``align.align_faces(..., size=112)``; L2-normalised unless normalize=False.
    """
    import numpy as np
    import torch

    rec = pack.model("recognition")
    if rec is None:
        raise FaceError(f"insightface pack {pack.name} at {pack.folder} has no recognition model: add its ArcFace file "
                        "(antelopev2: glintr100.onnx, buffalo_l: w600k_r50.onnx)")
    if crops.shape[0] == 0:
        return torch.zeros(0, 512)
    h, w = int(crops.shape[1]), int(crops.shape[2])
    if (h, w) != tuple(rec.input_size[::-1]):
        raise FaceError(f"recognition model wants {rec.input_size} crops, got {w}x{h}: align with size=112")
    arr = (crops[..., :3].detach().to("cpu", torch.float32).clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    feats = rec.get_feat([np.ascontiguousarray(a[..., ::-1]) for a in arr])   # insightface wants BGR
    emb = torch.from_numpy(np.asarray(feats, np.float32)).reshape(arr.shape[0], -1)
    return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb
