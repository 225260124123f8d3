"""insightface loader: stand-in ONNX packs built at test time, routed by insightface's real model zoo.

The stand-ins have the exact input/output layout of the released files (SCRFD 9-output detector,
112x112 ArcFace recogniser, 192x192 2d106 and 1k3d68 landmark models, 96x96 gender/age), named like
the antelopev2 and buffalo_l files (builders in face_fixtures.py). Their weights are constructed, not
trained: the detector fires on bright 32x32 squares (so detection can be checked against known
positions), the 3d68 model outputs insightface's own mean shape (so the pose is known: frontal).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

insightface = pytest.importorskip("insightface")
onnx = pytest.importorskip("onnx")

from face_fixtures import (BOX_HALF, TEMPLATE, build_genderage, make_pack, squares_image)  # noqa: E402
from idportrait.face import align, detect, insightface_loader as L  # noqa: E402
from idportrait.face.types import BackendUnavailable, FaceDetection  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("models"))
    make_pack(root, "antelopev2")
    make_pack(root, "buffalo_l")
    return root


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
    with pytest.raises(L.InsightFaceModelsMissing, match="no face detector"):
        L.load_insightface(str(tmp_path), "custom")


def test_backend_unavailable_is_an_import_error():
    assert issubclass(BackendUnavailable, ImportError)
    f = FaceDetection(bbox=[0, 0, 10, 20], kps=np.zeros((5, 2)), score=0.5)
    assert f.area == 200 and f.center == (5.0, 10.0)
