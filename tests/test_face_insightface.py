"""insightface loader: stand-in ONNX packs built at test time, routed by insightface's real model zoo.

The stand-ins have the exact input/output layout of the released files (SCRFD 9-output detector,
112x112 ArcFace recogniser, 192x192 2d106 and 1k3d68 landmark models, 96x96 gender/age), named like
the antelopev2 and buffalo_l files. Their weights are constructed, not trained: the detector fires on
bright 32x32 squares (so detection can be checked against known positions), the 3d68 model outputs
insightface's own mean shape (so the pose is known: frontal).
"""
from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch

insightface = pytest.importorskip("insightface")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from idportrait.face import align, detect, insightface_loader as L  # noqa: E402
from idportrait.face.types import BackendUnavailable, FaceDetection  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

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


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("models"))
    make_pack(root, "antelopev2")
    make_pack(root, "buffalo_l")
    return root


def squares_image(centres, size=640, side=32):
    img = np.zeros((size, size, 3), np.float32)
    for cx, cy in centres:
        img[cy - side // 2:cy + side // 2, cx - side // 2:cx + side // 2] = 1.0
    return torch.from_numpy(img)[None]


@pytest.mark.parametrize("name", ["antelopev2", "buffalo_l"])
def test_every_file_routes_to_its_task(models_root, name):
    pack = L.load_insightface(models_root, name, provider="CPU", det_size=640)
    # insightface's model zoo decided each task from shapes alone; every released file name must land
    # on the task it has in the real pack.
    assert pack.task_files == L.KNOWN_PACKS[name]
    assert type(pack.model("detection")).__name__ in ("SCRFD", "RetinaFace")
    assert type(pack.model("recognition")).__name__ == "ArcFaceONNX"
    assert pack.providers == ["CPUExecutionProvider"]
    assert tuple(pack.app.det_size) == (640, 640)


def test_detection_landmarks_pose_embedding_through_insightface(models_root):
    pack = L.load_insightface(models_root, "buffalo_l")
    centres = [(176, 208), (464, 400)]
    faces = detect.detect_faces(squares_image(centres), detect.InsightFaceDetector(pack))[0]
    assert len(faces) == 2
    got = sorted(f.center for f in faces)
    for (cx, cy), (gx, gy) in zip(sorted(centres), got):
        # anchor centres sit on the cell corner, so the box centre is within half a cell of the square
        assert abs(gx - cx) <= 16.5 and abs(gy - cy) <= 16.5
    for f in faces:
        assert f.source == "insightface" and f.score > 0.9
        assert f.width == pytest.approx(2 * BOX_HALF, abs=1e-3)
        assert f.landmarks.shape == (106, 2) and f.landmark_kind == "2d106"
        assert f.landmarks_3d.shape == (68, 3)
        # the 3d68 stand-in outputs the mean shape itself: insightface must read a frontal pose
        assert np.abs(np.asarray(f.pose)).max() < 1.0, f.pose
        assert f.embedding.shape == (512,) and np.linalg.norm(f.embedding) == pytest.approx(1.0, abs=1e-5)
        # key points decoded from the detector's kps outputs sit at the template layout inside the box
        rel = (f.kps - np.array(f.center)) / (2 * BOX_HALF) * 112 + 56
        np.testing.assert_allclose(rel, TEMPLATE, atol=0.05)
        assert f.extra["age"] == 35


def test_arcface_embeddings_match_insightface_own_pipeline(models_root):
    pack = L.load_insightface(models_root, "antelopev2")
    rng = np.random.RandomState(3)
    img = squares_image([])
    img[0, 200:440, 200:440] = torch.from_numpy(rng.rand(240, 240, 3).astype(np.float32))   # texture
    img[0, 320:352, 320:352] = 1.0                                   # one detector cell, fully white
    faces = detect.detect_faces(img, detect.InsightFaceDetector(pack))[0]
    assert len(faces) == 1
    aligned = align.align_faces(img, faces, 112, antialias=False)
    ours = L.arcface_embeddings(pack, aligned.crops)
    theirs = torch.from_numpy(faces[0].embedding)[None]   # insightface: cv2 norm_crop + same model
    assert ours.shape == (1, 512)
    assert torch.nn.functional.cosine_similarity(ours, theirs).item() > 0.98
    again = L.arcface_embeddings(pack, torch.cat([aligned.crops, aligned.crops]))
    assert torch.allclose(again[0], again[1])
    other = L.arcface_embeddings(pack, torch.flip(aligned.crops, dims=[1]))
    assert torch.nn.functional.cosine_similarity(ours, other).item() < 0.99


def test_missing_folder_names_folder_and_files(tmp_path):
    with pytest.raises(L.InsightFaceModelsMissing) as e:
        L.load_insightface(str(tmp_path), "antelopev2")
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "insightface", "models", "antelopev2") in msg
    for f in L.KNOWN_PACKS["antelopev2"].values():
        assert f in msg
    # never reached the network: the error is ours, raised before insightface's download path


def test_incomplete_pack_lists_missing_files(tmp_path):
    make_pack(str(tmp_path), "buffalo_l", skip=("w600k_r50.onnx", "genderage.onnx"))
    with pytest.raises(L.InsightFaceModelsMissing) as e:
        L.load_insightface(str(tmp_path), "buffalo_l")
    assert "genderage.onnx, w600k_r50.onnx" in str(e.value)
    # asking only for what is there loads fine
    pack = L.load_insightface(str(tmp_path), "buffalo_l", allowed_modules=["detection", "landmark_2d_106"])
    assert pack.tasks == ["detection", "landmark_2d_106"]


def test_empty_folder_is_an_error(tmp_path):
    os.makedirs(tmp_path / "insightface" / "models" / "buffalo_l")
    with pytest.raises(L.InsightFaceModelsMissing, match="contains no .onnx files"):
        L.load_insightface(str(tmp_path), "buffalo_l")


def test_nested_antelopev2_zip_layout_is_accepted(tmp_path, caplog):
    outer = tmp_path / "insightface" / "models" / "antelopev2"
    make_pack(str(tmp_path / "x"), "antelopev2")
    os.makedirs(outer)
    os.rename(tmp_path / "x" / "insightface" / "models" / "antelopev2", outer / "antelopev2")
    with caplog.at_level(logging.WARNING):
        pack = L.load_insightface(str(tmp_path), "antelopev2")
    assert pack.folder == str(outer / "antelopev2")
    assert "nested" in caplog.text


def test_unavailable_provider_falls_back_to_cpu(models_root, caplog):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA provider is available here")
    with caplog.at_level(logging.WARNING):
        assert L.resolve_providers("CUDA") == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in caplog.text
    assert L.resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_detector_without_key_points_is_rejected_cleanly(tmp_path):
    folder = tmp_path / "insightface" / "models" / "custom"
    os.makedirs(folder)
    build_genderage(str(folder / "only_attr.onnx"))
    with pytest.raises(RuntimeError, match="no face detector"):
        L.load_insightface(str(tmp_path), "custom")


def test_backend_unavailable_is_an_import_error():
    assert issubclass(BackendUnavailable, ImportError)
    f = FaceDetection(bbox=[0, 0, 10, 20], kps=np.zeros((5, 2)), score=0.5)
    assert f.area == 200 and f.center == (5.0, 10.0)
