"""Face tools nodes in a real ComfyUI (PromptExecutor), and the metrics CLI.

Real photos come from installed packages (scikit-image, matplotlib, insightface) and are copied into
ComfyUI's input folder at test time, then read by ComfyUI's own LoadImage. insightface paths use
stand-in ONNX packs (tests/face_fixtures.py) routed by insightface's real model zoo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import folder_paths

import face_fixtures as FX
import harness
from idportrait.face import align, detect, evaluate, landmarks, metrics
from idportrait.face import insightface_loader as L
from idportrait.face.types import uint8_to_image
from idportrait.nodes import face_tools as N
from idportrait.stand_ins import models as tm

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

INPUT = os.path.join(harness.BASE_DIR, "input")
IF_ROOT = os.path.join(harness.BASE_DIR, "models", "insightface")


def _needs_offline_detector():
    pytest.importorskip("onnxruntime")
    try:
        detect.default_detector()
    except ImportError as e:
        pytest.skip(f"offline detector unavailable: {e}")


def _needs_mediapipe():
    if not landmarks.mediapipe_available():
        pytest.skip("mediapipe 0.10.21 (legacy FaceMesh) not installed")


def _photo(name: str) -> tuple[str, np.ndarray, int]:
    """Copy a package photo into ComfyUI's input folder; returns (file name, pixels, face count)."""
    fn, count = FX.PHOTOS[name]
    try:
        arr = fn()
    except ImportError as e:
        pytest.skip(f"photo {name} unavailable: {e}")
    return FX.save_png(arr, os.path.join(INPUT, f"{name}.png")), arr, count


def out(ex, node_id: str, slot: int = 0):
    """A node's output value from the executor's cache (what the next node received)."""
    return harness.node_output(ex, node_id, slot)


def ui_text(ex, node_id: str) -> str:
    return "\n".join(ex.history_result["outputs"][node_id]["text"])


def detect_nodes(image_node: list, crop_size="224", face_index=0, order="largest", skip=False, analysis=None) -> dict:
    wf = {
        "fa": analysis or {"class_type": "IDP_FaceDetectorLoader",
                           "inputs": {"score_threshold": 0.8, "max_size": 1280, "provider": "CPU"}},
        "det": {"class_type": "IDP_FaceDetectAlign",
                "inputs": {"face_analysis": ["fa", 0], "image": image_node, "crop_size": crop_size, "padding": 0.0,
                           "order": order, "face_index": face_index, "min_face_size": 0,
                           "skip_images_without_face": skip}},
        "dbg": {"class_type": "PreviewImage", "inputs": {"images": ["det", 2]}},
    }
    return wf


# ------------------------------------------------------------------ detect, align, mask on real photos

@pytest.mark.parametrize("name,crop", [("astronaut", "112"), ("grace_hopper", "512"), ("t1", "224")])
def test_detect_align_and_mask_on_real_photos(name, crop):
    _needs_offline_detector()
    _needs_mediapipe()
    fname, arr, count = _photo(name)
    wf = detect_nodes(["img", 0], crop_size=crop, face_index=-1)
    wf["img"] = {"class_type": "LoadImage", "inputs": {"image": fname}}
    wf["mask"] = {"class_type": "IDP_FaceMask", "inputs": {"faces": ["det", 1], "shape": "landmark hull", "grow": 0.0,
                                                            "grow_unit": "pixels", "feather": 0.0,
                                                            "faces_to_use": "selected"}}
    wf["mimg"] = {"class_type": "MaskToImage", "inputs": {"mask": ["mask", 0]}}
    wf["prev"] = {"class_type": "PreviewImage", "inputs": {"images": ["mimg", 0]}}
    wf["crops"] = {"class_type": "PreviewImage", "inputs": {"images": ["det", 0]}}
    ex = harness.run_workflow(wf)

    assert f"{count} face(s) found, {count} selected" in ui_text(ex, "det")
    crops, faces, debug = out(ex, "det", 0), out(ex, "det", 1), out(ex, "det", 2)
    s = int(crop)
    assert tuple(crops.shape) == (count, s, s, 3)
    assert len(ex.history_result["outputs"]["crops"]["images"]) == count     # every crop reached PreviewImage
    assert debug.shape == (1,) + arr.shape
    # the crops are the aligned faces: the least-squares similarity onto the template of the requested
    # size, which puts each face's eyes at the template's eye positions
    tpl = align.arcface_template(s).expand_as(faces.aligned.kps)
    torch.testing.assert_close(faces.aligned.matrices, align.estimate_similarity(faces.aligned.kps, tpl))
    eyes = align.transform_points(faces.aligned.matrices, faces.aligned.kps)[:, :2]
    assert (eyes - tpl[:, :2]).norm(dim=-1).max() < 0.1 * s   # t1 has a 50-degree profile face
    torch.testing.assert_close(crops[0], align.align_faces(uint8_to_image(arr), faces.selected[0][:1], s).crops[0])

    # the mask covers each face and not the background
    mask = out(ex, "mask")
    assert tuple(mask.shape) == (1,) + arr.shape[:2]
    m = mask[0] > 0.5
    covered = torch.zeros_like(m)
    for f in faces.selected[0]:
        cx, cy = f.center
        k = f.kps
        # between the eyes and the mouth is inside the face outline in any landmark layout
        y0, y1 = int(k[:2, 1].mean()), int(k[3:, 1].mean())
        x0, x1 = int(k[[0, 3], 0].mean()), int(k[[1, 4], 0].mean())
        assert m[y0:y1, x0:x1].float().mean() > 0.95, f"face at {f.bbox} not covered"
        x1b, y1b, x2b, y2b = f.bbox
        w, h = x2b - x1b, y2b - y1b
        covered[max(0, int(y1b - 0.6 * h)):int(y2b + 0.3 * h), max(0, int(x1b - 0.3 * w)):int(x2b + 0.3 * w)] = True
    assert m[~covered].float().mean() < 0.001          # nothing far from a face
    assert 0.01 < m.float().mean() < 0.5


def test_selection_errors_and_skip():
    _needs_offline_detector()
    fname, arr, _ = _photo("t1")
    ex = harness.run_workflow({**detect_nodes(["img", 0], order="left-right", face_index=0),
                               "img": {"class_type": "LoadImage", "inputs": {"image": fname}}})
    faces = out(ex, "det", 1)
    assert len(faces.selected[0]) == 1 and len(faces.detected[0]) == 6
    assert faces.selected[0][0].center[0] == min(f.center[0] for f in faces.detected[0])   # the leftmost face

    # ArcFace needs an insightface pack: the offline detector says so instead of failing obscurely
    emb = {"emb": {"class_type": "IDP_FaceEmbedding", "inputs": {"face_analysis": ["fa", 0], "faces": ["det", 1],
                                                                 "combine": "mean"}},
           "show": {"class_type": "PreviewAny", "inputs": {"source": ["emb", 0]}}}
    with pytest.raises(harness.WorkflowError, match="need an insightface pack with a recognition model"):
        harness.run_workflow({**detect_nodes(["img", 0]), **emb,
                              "img": {"class_type": "LoadImage", "inputs": {"image": fname}}})

    with pytest.raises(harness.WorkflowError, match="no face selected in image 0: 6 detected"):
        harness.run_workflow({**detect_nodes(["img", 0], face_index=6),
                              "img": {"class_type": "LoadImage", "inputs": {"image": fname}}})

    ast, _, _ = _photo("astronaut")
    batch = {"img": {"class_type": "LoadImage", "inputs": {"image": ast}},
             "blank": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1,
                                                              "color": 0x808080}},
             "batch": {"class_type": "ImageBatch", "inputs": {"image1": ["img", 0], "image2": ["blank", 0]}}}
    with pytest.raises(harness.WorkflowError, match="no face found in image 1"):
        harness.run_workflow({**detect_nodes(["batch", 0]), **batch})
    ex = harness.run_workflow({**detect_nodes(["batch", 0], skip=True), **batch})
    assert out(ex, "det", 0).shape[0] == 1
    assert [len(r) for r in out(ex, "det", 1).selected] == [1, 0]
    assert "image 1: 0 face(s) found, 0 selected" in ui_text(ex, "det")


# ------------------------------------------------------------------ landmark image -> ControlNet

def _controlnet_workflow(hint: list) -> dict:
    return {
        "m": {"class_type": "IDP_TinyModels", "inputs": {"family": "sd15", "weights_seed": 0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["m", 1], "text": "portrait photo of a woman"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["m", 1], "text": "blurry"}},
        "cn": {"class_type": "IDP_TinyControlNet", "inputs": {"family": "sd15", "weights_seed": 0}},
        "apply": {"class_type": "ControlNetApplyAdvanced",
                  "inputs": {"positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cn", 0], "image": hint,
                             "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {"model": ["m", 0], "positive": ["apply", 0],
                                                    "negative": ["apply", 1], "latent_image": ["lat", 0], "seed": 3,
                                                    "steps": 2, "cfg": 4.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "face_cn/latent"}},
    }


_BLACK: dict = {}   # the same workflow with an all-black control image, sampled once


@pytest.mark.parametrize("style", ["landmarks", "5 keypoints (InstantID)"])
def test_landmark_image_drives_controlnet_apply(style):
    _needs_offline_detector()
    if style == "landmarks":
        _needs_mediapipe()
    fname, arr, _ = _photo("astronaut")
    wf = {**detect_nodes(["img", 0]), **_controlnet_workflow(["lmk", 0]),
          "img": {"class_type": "LoadImage", "inputs": {"image": fname}},
          "lmk": {"class_type": "IDP_FaceLandmarkImage",
                  "inputs": {"faces": ["det", 1], "style": style, "point_size": 0, "faces_to_use": "selected"}}}
    ex = harness.run_workflow(wf)
    hint = out(ex, "lmk")
    assert tuple(hint.shape) == (1,) + arr.shape
    face = out(ex, "det", 1).selected[0][0]
    x1, y1, x2, y2 = (int(v) for v in face.bbox)
    drawn = hint[0].sum(-1) > 0
    assert drawn[y1:y2, x1:x2].sum() > 50                       # points drawn on the face
    outside = drawn.clone()
    outside[max(0, y1 - 40):y2 + 40, max(0, x1 - 40):x2 + 40] = False
    assert not outside.any()                                   # and nowhere else
    if style == "landmarks":
        assert face.landmarks is None   # the detector's faces are untouched; the node computed its own
        assert torch.equal(hint[0, drawn][0], torch.ones(3))    # white dots (OpenPose face style)

    import safetensors.torch
    d = harness.output_file("face_cn")

    def latest():
        f = sorted(x for x in os.listdir(d) if x.startswith("latent"))[-1]
        return safetensors.torch.load_file(os.path.join(d, f))["latent_tensor"]

    with_hint = latest()
    if "black" not in _BLACK:
        black = {**_controlnet_workflow(["black", 0]),
                 "black": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1,
                                                                  "color": 0}}}
        harness.run_workflow(black)
        _BLACK["black"] = latest()
    assert with_hint.shape == (1, 4, 16, 16)
    assert not torch.equal(with_hint, _BLACK["black"])   # the ControlNet really saw the landmark image


# ------------------------------------------------------------------ insightface loader node

@pytest.fixture(scope="module")
def standin_packs():
    pytest.importorskip("insightface")
    pytest.importorskip("onnx")
    for name in ("antelopev2", "buffalo_l"):
        if not os.path.isdir(os.path.join(IF_ROOT, "models", name)):
            FX.make_pack(os.path.dirname(IF_ROOT), name)     # <models>/insightface/models/<name>/*.onnx
    if IF_ROOT not in folder_paths.get_folder_paths("insightface"):
        folder_paths.add_model_folder_path("insightface", IF_ROOT)
    return IF_ROOT


def _loader(pack):
    return {"class_type": "IDP_FaceInsightFaceLoader",
            "inputs": {"pack": pack, "provider": "CPU", "det_size": 640, "det_thresh": 0.5}}


@pytest.mark.parametrize("pack", ["antelopev2", "buffalo_l"])
def test_insightface_loader_node_routes_standin_files(standin_packs, pack):
    centres = [(176, 208), (464, 400)]
    img = np.zeros((640, 640, 3), np.uint8)
    for cx, cy in centres:
        img[cy - 16:cy + 16, cx - 16:cx + 16] = 255
    fname = FX.save_png(img, os.path.join(INPUT, "squares.png"))
    wf = {**detect_nodes(["img", 0], crop_size="112", face_index=-1, order="left-right", analysis=_loader(pack)),
          "img": {"class_type": "LoadImage", "inputs": {"image": fname}},
          "emb": {"class_type": "IDP_FaceEmbedding", "inputs": {"face_analysis": ["fa", 0], "faces": ["det", 1],
                                                                "combine": "per face"}},
          "pose": {"class_type": "IDP_FacePose", "inputs": {"faces": ["det", 1], "faces_to_use": "selected"}},
          "show": {"class_type": "PreviewAny", "inputs": {"source": ["pose", 0]}},
          "show_emb": {"class_type": "PreviewAny", "inputs": {"source": ["emb", 0]}}}
    ex = harness.run_workflow(wf)
    fa = out(ex, "fa")
    # insightface's model zoo routed every released file name to its task, through the node
    assert fa.backend == "insightface" and fa.pack.task_files == L.KNOWN_PACKS[pack]
    assert fa.pack.folder == os.path.join(IF_ROOT, "models", pack)
    text = ui_text(ex, "fa")
    for task, f in L.KNOWN_PACKS[pack].items():
        assert f"{task}: {f}" in text
    faces = out(ex, "det", 1)
    assert [round(f.center[0]) // 32 for f in faces.selected[0]] == [176 // 32, 464 // 32]
    assert out(ex, "det", 0).shape == (2, 112, 112, 3)
    emb = out(ex, "emb")
    assert emb.embeddings.shape == (2, 512) and emb.image_indices == [0, 0]
    torch.testing.assert_close(emb.embeddings.norm(dim=-1), torch.ones(2))
    # same as insightface's own embedding of the same faces (its cv2 norm_crop + the same model)
    ref = torch.from_numpy(np.stack([f.embedding for f in faces.selected[0]]))
    assert torch.nn.functional.cosine_similarity(emb.embeddings, ref).min() > 0.98
    poses = json.loads(out(ex, "pose", 0))
    assert len(poses) == 2 and all(abs(p[k]) < 1.0 for p in poses for k in ("yaw", "pitch", "roll"))


def test_missing_pack_error_reaches_the_workflow_result(tmp_path, monkeypatch):
    pytest.importorskip("insightface")
    folder = str(tmp_path / "insightface")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([folder], {".onnx"}))
    wf = {"fa": _loader("buffalo_l"),
          "det": {"class_type": "IDP_FaceDetectAlign",
                  "inputs": {"face_analysis": ["fa", 0], "image": ["e", 0], "crop_size": "112", "padding": 0.0,
                             "order": "largest", "face_index": 0, "min_face_size": 0,
                             "skip_images_without_face": True}},
          "e": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
          "p": {"class_type": "PreviewImage", "inputs": {"images": ["det", 2]}}}
    with pytest.raises(harness.WorkflowError) as e:
        harness.run_workflow(wf)
    msg = str(e.value)
    assert os.path.join(folder, "models", "buffalo_l") in msg
    for f in L.KNOWN_PACKS["buffalo_l"].values():
        assert f in msg
    assert "never downloaded" in msg
    # a half-copied pack names exactly the missing files
    FX.make_pack(str(tmp_path), "buffalo_l", skip=("w600k_r50.onnx",))
    with pytest.raises(harness.WorkflowError, match=r"incomplete: missing w600k_r50\.onnx"):
        harness.run_workflow(wf)


# ------------------------------------------------------------------ the pack without insightface

CHILD = r'''
import importlib.abc, json, os, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "insightface":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by test)", name=name)
        return None
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import harness, nodes as comfy_nodes
import face_fixtures as FX
from idportrait.nodes import all_nodes
res = {"ids": [n.GET_SCHEMA().node_id for n in all_nodes()]}
res["registered"] = [i for i in res["ids"] if i in comfy_nodes.NODE_CLASS_MAPPINGS]
FX.save_png(FX.astronaut(), os.path.join(harness.BASE_DIR, "input", "a.png"))
det = {"img": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
       "fa": {"class_type": "IDP_FaceDetectorLoader", "inputs": {"score_threshold": 0.8, "max_size": 1280, "provider": "CPU"}},
       "det": {"class_type": "IDP_FaceDetectAlign", "inputs": {"face_analysis": ["fa", 0], "image": ["img", 0],
               "crop_size": "224", "padding": 0.0, "order": "largest", "face_index": 0, "min_face_size": 0,
               "skip_images_without_face": False}},
       "mask": {"class_type": "IDP_FaceMask", "inputs": {"faces": ["det", 1], "shape": "box ellipse", "grow": 0.0,
                "grow_unit": "pixels", "feather": 2.0, "faces_to_use": "selected"}},
       "mi": {"class_type": "MaskToImage", "inputs": {"mask": ["mask", 0]}},
       "p": {"class_type": "PreviewImage", "inputs": {"images": ["mi", 0]}},
       "c": {"class_type": "PreviewImage", "inputs": {"images": ["det", 0]}}}
ex = harness.run_workflow(det)
res["det_text"] = ex.history_result["outputs"]["det"]["text"][0]
res["crops"] = len(ex.history_result["outputs"]["c"]["images"])
gen = {"m": {"class_type": "IDP_TinyModels", "inputs": {"family": "sd15", "weights_seed": 0}},
       "t": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["m", 1], "text": "a photo"}},
       "l": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
       "k": {"class_type": "KSampler", "inputs": {"model": ["m", 0], "positive": ["t", 0], "negative": ["t", 0],
             "latent_image": ["l", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
             "scheduler": "normal", "denoise": 1.0}},
       "s": {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": "noif/x"}}}
harness.run_workflow(gen)
res["latent_saved"] = bool(os.listdir(harness.output_file("noif")))
try:
    harness.run_workflow({"fa": {"class_type": "IDP_FaceInsightFaceLoader", "inputs": {"pack": "antelopev2",
                          "provider": "CPU", "det_size": 640, "det_thresh": 0.5}}, **{k: v for k, v in det.items() if k != "fa"}})
    res["loader"] = "no error"
except harness.WorkflowError as e:
    res["loader"] = str(e)
res["insightface_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] == "insightface")
print("RESULT" + json.dumps(res))
'''


def test_pack_loads_and_works_without_insightface():
    _needs_offline_detector()
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", CHILD, tests_dir], capture_output=True, text=True, timeout=500,
                       cwd=tests_dir)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    res = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])
    assert res["registered"] == res["ids"] and "IDP_FaceInsightFaceLoader" in res["ids"]
    assert {n.GET_SCHEMA().node_id for n in N.NODES} <= set(res["registered"])
    assert res["det_text"] == "image 0: 1 face(s) found, 1 selected" and res["crops"] == 1   # offline detector
    assert res["latent_saved"]
    assert "insightface is not available" in res["loader"] and "pip install insightface" in res["loader"]
    assert res["insightface_loaded"] == []


# ------------------------------------------------------------------ metrics node vs face/metrics.py

def _standin_images():
    """3 generated, 2 references, 1 target: textured 'faces' the stand-in pack detects, as LoadImage files."""
    files = {}
    for role, seeds in (("gen", (11, 12, 13)), ("ref", (21, 22)), ("tgt", (31,))):
        files[role] = [FX.save_png(FX.textured_face_image(s, centre=(336 - 32 * (s % 3), 336)),
                                   os.path.join(INPUT, f"m_{role}_{s}.png")) for s in seeds]
    return files


def _batch_nodes(prefix: str, names: list[str]) -> tuple[dict, list]:
    wf = {f"{prefix}{i}": {"class_type": "LoadImage", "inputs": {"image": n}} for i, n in enumerate(names)}
    last = [f"{prefix}0", 0]
    for i in range(1, len(names)):
        wf[f"{prefix}b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": last, "image2": [f"{prefix}{i}", 0]}}
        last = [f"{prefix}b{i}", 0]
    return wf, last


PROMPTS = ["A woman on the beach", "An oil painting of a woman", "A woman under the moonlight"]


@torch.no_grad()
def _expected_metrics(pack, files, clip_vision, clip) -> dict:
    """The protocol recomputed from face/ primitives: detector, alignment, ArcFace, metrics.py."""
    from PIL import Image

    def img(n):
        return uint8_to_image(np.asarray(Image.open(os.path.join(INPUT, n)).convert("RGB")))

    det = detect.InsightFaceDetector(pack)
    ims = {role: [img(n) for n in names] for role, names in files.items()}
    faces = {role: [detect.detect_faces(x, det)[0][0] for x in xs] for role, xs in ims.items()}

    def crops(role, size, padding=0.0):
        return torch.cat([align.align_faces(x, [f], size, padding=padding).crops
                          for x, f in zip(ims[role], faces[role])])

    e = {r: L.arcface_embeddings(pack, crops(r, 112)) for r in ims}
    ff = metrics.flashface_scores(e["gen"], e["tgt"][0], e["ref"])
    cv = lambda x: clip_vision.encode_image(x, crop=True)["image_embeds"].float()  # noqa: E731
    clip_i = metrics.cosine_matrix(cv(crops("gen", 224, evaluate.CLIP_FACE_PADDING)),
                                   cv(crops("ref", 224, evaluate.CLIP_FACE_PADDING))).mean(-1)
    txt = torch.cat([clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)[1].float() for p in PROMPTS])
    clip_t = metrics.clip_t(torch.cat([cv(x) for x in ims["gen"]]), txt)
    id_sim = metrics.cosine_matrix(e["gen"], e["ref"]).mean(-1)
    pose = metrics.pose_error(torch.tensor([f.pose for f in faces["gen"]]), torch.tensor(faces["tgt"][0].pose))
    return {"id_sim": id_sim, "sim_target": ff["sim_target"], "sim_ref": ff["sim_ref"], "paste": ff["paste"],
            "pose_error": pose, "clip_i": clip_i, "clip_t": clip_t,
            "zscore_id_clip": metrics.zscore_combination({"id_sim": id_sim, "clip_i": clip_i})}


def test_metrics_node_equals_face_metrics_functions(standin_packs):
    files = _standin_images()
    wf = {"fa": _loader("antelopev2"), "m": {"class_type": "IDP_TinyModels", "inputs": {"family": "sd15", "weights_seed": 0}},
          "cv": {"class_type": "IDP_TinyClipVision", "inputs": {"weights_seed": 0}}}
    for role, prefix in (("gen", "g"), ("ref", "r"), ("tgt", "t")):
        nodes, last = _batch_nodes(prefix, files[role])
        wf.update(nodes)
        wf[f"{prefix}_out"] = last
    wf["met"] = {"class_type": "IDP_FaceMetrics",
                 "inputs": {"face_analysis": ["fa", 0], "generated": wf.pop("g_out"), "references": wf.pop("r_out"),
                            "target": wf.pop("t_out"), "clip_vision": ["cv", 0], "clip": ["m", 1],
                            "prompts": "\n".join(PROMPTS), "missing_face": "exclude"}}
    ex = harness.run_workflow(wf)
    res = json.loads(out(ex, "met", 0))
    chart = out(ex, "met", 1)
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3
    assert "id_sim:" in ui_text(ex, "met")
    assert res["faces_found"] == {"generated": 3, "references": 2, "targets": 1} and res["notes"] == []
    assert res["metrics"] == list(evaluate.ALL_METRICS)

    fa = out(ex, "fa")
    exp = _expected_metrics(fa.pack, files, tm.tiny_clip_vision(0), tm.tiny_clip(0))
    for k, v in exp.items():
        got = torch.tensor([r[k] for r in res["per_image"]], dtype=torch.float64)
        torch.testing.assert_close(got, v.double(), atol=2e-5, rtol=1e-5, msg=f"{k}")
        assert res["mean"][k] == pytest.approx(float(v.double().mean()), abs=2e-5)
    # constructed sanity: Paste is Sim_Ref - Sim_Target, and the references are different 'people'
    assert all(abs(r["paste"] - (r["sim_ref"] - r["sim_target"])) < 1e-9 for r in res["per_image"])
    assert [r["prompt"] for r in res["per_image"]] == PROMPTS


def test_metrics_node_pose_error_on_real_photos_without_arcface():
    """Offline detector + mediapipe: a photo has pose error 0 against itself and a large one against its
    mirror; ID metrics are reported as skipped, not silently missing."""
    _needs_offline_detector()
    _needs_mediapipe()
    ast, arr, _ = _photo("astronaut")
    mir = FX.save_png(arr[:, ::-1], os.path.join(INPUT, "astronaut_mirror.png"))
    wf = {"fa": {"class_type": "IDP_FaceDetectorLoader",
                 "inputs": {"score_threshold": 0.8, "max_size": 1280, "provider": "CPU"}},
          "a": {"class_type": "LoadImage", "inputs": {"image": ast}},
          "b": {"class_type": "LoadImage", "inputs": {"image": mir}},
          "ab": {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["b", 0]}},
          "met": {"class_type": "IDP_FaceMetrics",
                  "inputs": {"face_analysis": ["fa", 0], "generated": ["ab", 0], "references": ["a", 0],
                             "target": ["a", 0], "prompts": "", "missing_face": "exclude"}}}
    ex = harness.run_workflow(wf)
    res = json.loads(out(ex, "met", 0))
    pe = [r["pose_error"] for r in res["per_image"]]
    assert pe[0] == pytest.approx(0.0, abs=1e-6)
    assert pe[1] > 5.0
    assert any("ID metrics skipped" in n for n in res["notes"]) and "id_sim" not in res["mean"]
    assert any("CLIP-I/CLIP-T skipped" in n for n in res["notes"])


# ------------------------------------------------------------------ CLI

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "face.cli", *args], capture_output=True, text=True, cwd=REPO,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def _tiny_hf_clip(path):
    """A tiny transformers CLIPModel + ComfyUI's own SD1 tokenizer files, saved like a downloaded CLIP."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      num_hidden_layers=2, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_hidden_layers=2, image_size=224, patch_size=14), projection_dim=16)
    CLIPModel(cfg).save_pretrained(path)
    tok_dir = os.path.join(harness.COMFY_DIR, "comfy", "sd1_tokenizer")
    CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt")).save_pretrained(path)
    return str(path)


def test_cli_help_and_builtin_prompts():
    assert "evaluate" in _cli("--help") and "--insightface-root" in _cli("evaluate", "--help")
    lines = _cli("prompts", "--subject", "man", "--numbered").splitlines()
    assert len(lines) == 30 and lines[0] == "000 A man posing like a tourist in front of the Eiffel Tower"
    assert lines[29] == "029 A pop art style portrait of a man"
    assert all(" man" in ln and "woman" not in ln for ln in lines)


def test_cli_runs_the_protocol_on_a_tiny_folder(standin_packs, tmp_path):
    pytest.importorskip("transformers")
    files = _standin_images()
    gen_a, gen_b, refs, tgt = (tmp_path / d for d in ("ours", "baseline", "refs", "target"))
    for d in (gen_a, gen_b, refs, tgt):
        d.mkdir()
    # numbered files pick their OmniPortrait prompt: 000, 007 and 029
    for n, name in zip(("000_s0.png", "007_s0.png", "029_s0.png"), files["gen"]):
        os.link(os.path.join(INPUT, name), gen_a / n)
    # a "copy-paste" baseline: it returns the reference photos and the target themselves
    for n, name in zip(("000_s0.png", "007_s0.png", "029_s0.png"), files["ref"] + files["tgt"]):
        os.link(os.path.join(INPUT, name), gen_b / n)
    for name in files["ref"]:
        os.link(os.path.join(INPUT, name), refs / name)
    os.link(os.path.join(INPUT, files["tgt"][0]), tgt / "target.png")
    clip_dir = _tiny_hf_clip(tmp_path / "clip")
    out_json = tmp_path / "res" / "metrics.json"
    stdout = _cli("evaluate", "--generated", str(gen_a), "--generated", str(gen_b), "--references", str(refs),
                  "--target", str(tgt / "target.png"), "--insightface-root", standin_packs, "--pack", "antelopev2",
                  "--clip", clip_dir, "--prompts", "omniportrait", "--subject", "woman", "--out", str(out_json))
    assert "wrote" in stdout
    res = json.loads(out_json.read_text())
    a = res["methods"]["ours"]["identities"]["refs"]
    b = res["methods"]["baseline"]["identities"]["refs"]
    assert [r["prompt"] for r in a["per_image"]] == [
        "A woman posing like a tourist in front of the Eiffel Tower", "A woman wearing a traditional kimono",
        "A pop art style portrait of a woman"]
    assert a["notes"] == [] and set(a["mean"]) == set(evaluate.ALL_METRICS)
    # ArcFace numbers equal the library computed on the same files (CLIP here is transformers, not ComfyUI)
    pack = L.load_insightface(standin_packs, "antelopev2")
    exp = _expected_metrics(pack, files, tm.tiny_clip_vision(0), tm.tiny_clip(0))
    for k in ("id_sim", "sim_target", "sim_ref", "paste", "pose_error"):
        torch.testing.assert_close(torch.tensor([r[k] for r in a["per_image"]], dtype=torch.float64),
                                   exp[k].double(), atol=2e-5, rtol=1e-5, msg=k)
    # the copy-paste baseline: its references score (nearly) 1 against themselves, so its ID similarity
    # beats ours; the target image it returns scores Sim_Target 1
    assert b["per_image"][2]["sim_target"] == pytest.approx(1.0, abs=1e-5)
    assert b["mean"]["sim_ref"] > a["mean"]["sim_ref"]
    # Infinite-ID Eq. 2 across the two methods, by hand: the z-scores of two different values are +1/-1
    ma, mb = res["methods"]["ours"]["mean"], res["methods"]["baseline"]["mean"]
    by_hand = {m: float(np.mean([np.sign(mine[k] - other[k]) for k in ("id_sim", "clip_i")]))
               for m, mine, other in (("ours", ma, mb), ("baseline", mb, ma))}
    assert res["zscore_id_clip"] == pytest.approx(by_hand, abs=1e-9)
    assert by_hand["baseline"] != 0
    plot = out_json.with_suffix(".png")
    from PIL import Image
    with Image.open(plot) as im:
        assert im.size[0] >= 768 and im.size[1] > 300


def test_every_face_node_documents_itself():
    for node in N.NODES:
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith("IDP_Face") and schema.description and schema.display_name.endswith("(IDP)")
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"


def test_detect_and_mask_nodes_show_previews():
    """The artist sees the detections and the mask on the nodes themselves (UI previews), not only as outputs."""
    import sys
    from PIL import Image
    from skimage import data
    sys.path.insert(0, os.path.join(harness.REPO, "scripts"))
    from demo import face_tools_workflow
    Image.fromarray(data.astronaut()).save(os.path.join(harness.BASE_DIR, "input", "preview_astronaut.png"))
    ex = harness.run_workflow(face_tools_workflow("preview_astronaut.png"))
    outs = ex.history_result["outputs"]
    assert outs["3"]["images"] and "1 face(s) found" in " ".join(outs["3"]["text"])   # detections drawn + summary
    assert outs["4"]["images"]                                                        # the mask preview
