"""Shared face-test helpers: stand-in insightface ONNX packs and real photos from installed packages.

The stand-ins have the exact input/output layout of the released files (SCRFD 9-output detector,
112x112 ArcFace recogniser, 192x192 2d106 and 1k3d68 landmark models, 96x96 gender/age), named like
the antelopev2 and buffalo_l files, so insightface's real model zoo routes them. Their weights are
constructed, not trained: the detector fires on bright 32x32 squares aligned to its 32-px grid (so
detection can be checked against known positions), the 3d68 model outputs insightface's own mean shape
(so the pose is known: frontal), the recogniser is a fixed random convnet (deterministic, discriminates
crops somewhat; not an identity model).

Photos are read from installed packages at test time; nothing is copied into the repository.
Needs onnx and insightface (callers skip when they are missing).
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

try:   # only the ONNX builders need onnx; the photo helpers do not
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:   # pragma: no cover
    onnx = TensorProto = helper = numpy_helper = None

from idportrait.face import insightface_loader as L

TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
BOX_HALF = 64.0   # stand-in detector boxes are 128 px squares centred on the firing anchor


def _save(nodes, inputs, outputs, inits, path):
    graph = helper.make_graph(nodes, os.path.basename(path), inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="idp-standin")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def build_detector(path):
    """SCRFD layout: input [1,3,H,W] (dynamic H, W); outputs score/bbox/kps for strides 8, 16, 32 with
    2 anchors, each [K*2, C] with rows ordered (y, x, anchor). Only stride 32 fires, on cells whose
    mean normalised intensity is near white."""
    nodes, outs, inits = [], [], []
    shape = {}
    for kind, c in (("score", 1), ("bbox", 4), ("kps", 10)):
        for s in (8, 16, 32):
            w = np.zeros((2 * c, 3, s, s), np.float32)
            if kind == "score":
                b = np.full(2, -20.0)
                if s == 32:
                    w[:] = 20.0 / (3 * s * s)      # logit = 20 * (mean - 0.5): white cell -> ~1, rest -> ~0
                    b = np.full(2, -10.0)
            elif kind == "bbox":
                b = np.tile(np.full(4, BOX_HALF / s), 2)   # left/top/right/bottom distances in strides
            else:
                rel = (TEMPLATE - 56.0) / 112.0 * (2 * BOX_HALF) / s
                b = np.tile(rel.reshape(-1), 2)
            n = f"{kind}{s}"
            inits += [_init(f"{n}_w", w), _init(f"{n}_b", b),
                      numpy_helper.from_array(np.array([-1, c], np.int64), f"{n}_shape")]
            nodes.append(helper.make_node("Conv", ["input.1", f"{n}_w", f"{n}_b"], [f"{n}_c"], strides=[s, s],
                                          name=f"conv_{n}"))
            src = f"{n}_c"
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [src], [f"{n}_sig"], name=f"sig_{n}"))
                src = f"{n}_sig"
            nodes.append(helper.make_node("Transpose", [src], [f"{n}_t"], perm=[0, 2, 3, 1], name=f"tr_{n}"))
            nodes.append(helper.make_node("Reshape", [f"{n}_t", f"{n}_shape"], [n], name=f"rs_{n}"))
            shape[n] = c
    order = [f"{k}{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"K_{n}", shape[n]]) for n in order]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])
    _save(nodes, [inp], outs, inits, path)


def _pooled_head(path, size, n_out, weight, bias, act=None, conv=None):
    """input [N,3,size,size] -> (conv/pool) -> flatten -> MatMul -> Add (-> act) -> [N, n_out]."""
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, size, size])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", n_out])
    inits = [_init("w", weight), _init("b", bias)]
    if conv is not None:
        inits.append(_init("cw", conv))
        k = conv.shape[-1]
        nodes = [helper.make_node("Conv", ["input.1", "cw"], ["f"], strides=[k, k], name="conv0")]
    else:
        nodes = [helper.make_node("GlobalAveragePool", ["input.1"], ["f"], name="pool0")]
    nodes += [helper.make_node("Flatten", ["f"], ["flat"], axis=1, name="flat0"),
              helper.make_node("MatMul", ["flat", "w"], ["mm"], name="fc0"),
              helper.make_node("Add", ["mm", "b"], ["pre" if act else "output"], name="bias0")]
    if act:
        nodes.append(helper.make_node(act, ["pre"], ["output"], name="act0"))
    _save(nodes, [inp], [out], inits, path)


def build_recognition(path, seed=0):
    rng = np.random.RandomState(seed)
    conv = rng.randn(8, 3, 8, 8).astype(np.float32) / 8.0
    _pooled_head(path, 112, 512, rng.randn(8 * 14 * 14, 512) / 40.0, np.zeros(512), conv=conv)


def build_landmark_2d106(path):
    ang = np.linspace(0, 2 * np.pi, 106, endpoint=False)
    pts = np.stack([np.cos(ang), np.sin(ang)], 1) * 0.6         # a ring in crop coordinates [-1, 1]
    _pooled_head(path, 192, 212, np.zeros((3, 212)), pts.reshape(-1))


def mean_shape_68() -> np.ndarray:
    """insightface's own 68-point mean shape, read from the installed package at test time."""
    import insightface

    p = os.path.join(os.path.dirname(insightface.__file__), "data", "objects", "meanshape_68.pkl")
    with open(p, "rb") as f:
        return np.asarray(pickle.load(f), np.float64)


def build_landmark_3d68(path):
    m = mean_shape_68()
    m = m - m.mean(0)
    m = m / np.abs(m[:, :2]).max() * 0.6     # into the [-1, 1] crop frame (same axes as the mean shape)
    out = np.zeros(3309)
    out[-68 * 3:] = m.reshape(-1)
    _pooled_head(path, 192, 3309, np.zeros((3, 3309)), out)


def build_genderage(path):
    _pooled_head(path, 96, 3, np.zeros((3, 3)), np.array([0.2, 0.8, 0.35]))


BUILDERS = {"detection": build_detector, "recognition": build_recognition,
            "landmark_2d_106": build_landmark_2d106, "landmark_3d_68": build_landmark_3d68,
            "genderage": build_genderage}


def make_pack(models_root, name, skip=()):
    folder = os.path.join(models_root, "insightface", "models", name)
    os.makedirs(folder, exist_ok=True)
    for task, fname in L.KNOWN_PACKS[name].items():
        if fname not in skip:
            BUILDERS[task](os.path.join(folder, fname))
    return folder


def squares_image(centres, size=640, side=32):
    img = np.zeros((size, size, 3), np.float32)
    for cx, cy in centres:
        img[cy - side // 2:cy + side // 2, cx - side // 2:cx + side // 2] = 1.0
    return torch.from_numpy(img)[None]


def textured_face_image(seed: int, centre=(336, 336), size=640, texture=240) -> np.ndarray:
    """uint8 RGB image for the stand-in detector: a seeded random texture (the 'identity', which the
    recogniser sees inside the aligned crop) around one white 32x32 square on the detector's 32-px grid."""
    rng = np.random.RandomState(seed)
    img = np.zeros((size, size, 3), np.uint8)
    cx, cy = centre
    h = texture // 2
    img[cy - h:cy + h, cx - h:cx + h] = (rng.rand(texture, texture, 3) * 200).astype(np.uint8)
    img[cy - 16:cy + 16, cx - 16:cx + 16] = 255
    return img


# ------------------------------------------------------------------ real photos from installed packages

def astronaut() -> np.ndarray:
    """scikit-image's astronaut (Eileen Collins, NASA, public domain): 512x512 RGB, one face."""
    from skimage import data
    return np.ascontiguousarray(data.astronaut())


def grace_hopper() -> np.ndarray:
    """matplotlib's Grace Hopper sample: 600x512 RGB, one face."""
    from matplotlib import cbook
    from PIL import Image
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def group_t1() -> np.ndarray:
    """insightface's bundled t1.jpg group photo: 1280x886 RGB, six faces."""
    from insightface import data
    return np.ascontiguousarray(data.get_image("t1")[..., ::-1])


PHOTOS = {"astronaut": (astronaut, 1), "grace_hopper": (grace_hopper, 1), "t1": (group_t1, 6)}


def save_png(arr: np.ndarray, path: str) -> str:
    from PIL import Image
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return os.path.basename(path)
