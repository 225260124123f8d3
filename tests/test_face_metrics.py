"""Metric maths against hand computations (FlashFace Sec. 4.3, Omni-ID Sec. 4.1, Infinite-ID supp.)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from idportrait.face import metrics as M


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_cosine_basics():
    rng = np.random.RandomState(0)
    e = rng.randn(4, 512)
    assert torch.allclose(M.cosine_similarity(e, e), torch.ones(4, dtype=torch.float64))
    assert M.cosine_similarity(e[0], 3.5 * e[0]).item() == pytest.approx(1.0)      # scale invariant
    assert M.cosine_similarity([1, 0], [0, 2]).item() == pytest.approx(0.0)
    assert M.cosine_similarity([1, 0], [-1, 0]).item() == pytest.approx(-1.0)
    assert M.id_similarity(unit(0), unit(60)).item() == pytest.approx(0.5)
    mat = M.cosine_matrix(e, e[:2])
    assert mat.shape == (4, 2) and torch.allclose(mat.diagonal(), torch.ones(2, dtype=torch.float64))


def test_flashface_scores_constructed():
    gen = [unit(0), unit(90)]
    target = [unit(60), unit(90)]
    refs = [unit(30), unit(90), unit(180)]
    s = M.flashface_scores(gen, target, refs)
    # sample 0: Sim_Target = cos 60 = 0.5, Sim_Ref = max(cos30, cos90, cos180) = cos30
    # sample 1: generated equals the target and one reference exactly
    exp_t = torch.tensor([0.5, 1.0], dtype=torch.float64)
    exp_r = torch.tensor([math.cos(math.radians(30)), 1.0], dtype=torch.float64)
    assert torch.allclose(s["sim_target"], exp_t)
    assert torch.allclose(s["sim_ref"], exp_r)
    assert torch.allclose(s["paste"], s["sim_ref"] - s["sim_target"])
    assert s["paste"][0].item() == pytest.approx(math.cos(math.radians(30)) - 0.5)
    assert s["paste_mean"].item() == pytest.approx(s["paste"].mean().item())
    # per-sample references [N,R,D] and a shared target [D]
    per = M.flashface_scores(gen, unit(60), [[unit(30), unit(100)], [unit(0), unit(45)]])
    assert torch.allclose(per["sim_target"], torch.tensor([0.5, math.cos(math.radians(30))], dtype=torch.float64))
    assert torch.allclose(per["sim_ref"], torch.tensor([math.cos(math.radians(30)), math.cos(math.radians(45))],
                                                       dtype=torch.float64))


def test_pose_error():
    p = [12.0, -7.5, 3.0]
    assert M.pose_error(p, p).item() == 0
    a, b = [10.0, -5.0, 3.0], [-20.0, 5.0, 0.0]
    assert M.pose_error(a, b).item() == pytest.approx(30 + 10 + 3)
    assert M.pose_error(a, b).item() == M.pose_error(b, a).item()
    assert M.pose_error([179.0, 0, 0], [-179.0, 0, 0]).item() == pytest.approx(2.0)     # wrap-around
    batch = M.pose_error(np.array([a, p]), np.array([b, p]))
    assert batch.tolist() == pytest.approx([43.0, 0.0])
    with pytest.raises(ValueError):
        M.pose_error([1, 2], [1, 2])


def test_clip_metrics():
    img = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    txt = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert M.clip_t(img, txt).tolist() == pytest.approx([1 / math.sqrt(2), 0.0])
    assert M.clip_i(img, img).tolist() == pytest.approx([1.0, 1.0])


def test_zscore_combination_matches_hand_computation():
    facenet = [0.6, 0.7, 0.8]
    clip_i = [0.90, 0.80, 0.85]
    # by hand, population std: facenet mean .7, std sqrt(((.1)^2*2)/3) = .0816497
    z1 = [-0.1 / 0.0816497, 0.0, 0.1 / 0.0816497]
    # clip-i mean .85, std sqrt((.05^2*2)/3) = .0408248
    z2 = [0.05 / 0.0408248, -0.05 / 0.0408248, 0.0]
    expected = [(a + b) / 2 for a, b in zip(z1, z2)]
    got = M.zscore_combination({"FaceNet": facenet, "CLIP-I": clip_i})
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert got.tolist() == pytest.approx([0.0, -0.6123724, 0.6123724], abs=1e-5)
    # sample std (ddof=1) rescales every z by sqrt((n-1)/n)
    got1 = M.zscore_combination({"FaceNet": facenet, "CLIP-I": clip_i}, ddof=1)
    assert got1.tolist() == pytest.approx([v * math.sqrt(2 / 3) for v in expected], abs=1e-5)
    # lower-is-better metrics count negatively
    lb = M.zscore_combination({"FaceNet": facenet, "pose_err": [3.0, 2.0, 1.0]}, lower_is_better=["pose_err"])
    assert lb.tolist() == pytest.approx([-1.2247449, 0.0, 1.2247449], abs=1e-5)
    assert M.zscore([5, 5, 5]).tolist() == [0, 0, 0]          # constant metric: no NaN
    with pytest.raises(ValueError):
        M.zscore_combination({"a": [1, 2], "b": [1, 2, 3]})


@pytest.mark.parametrize("backend", ["pil", "matplotlib"])
def test_bar_chart(backend):
    if backend == "matplotlib":
        pytest.importorskip("matplotlib")
    img = M.bar_chart({"ours": {"ID": 0.62, "CLIP-T": 0.31}, "base": {"ID": 0.41, "CLIP-T": -0.05}},
                      title="metrics", width=640, height=360, backend=backend)
    assert img.shape == (1, 360, 640, 3) and 0 <= img.min() and img.max() <= 1
    px = (img[0] * 255).round().int()
    for colour in M._PALETTE[:2]:      # both series were drawn as bars
        hit = (px == torch.tensor(colour)).all(-1).sum().item()
        assert hit > 500, (backend, colour, hit)
    flat = M.bar_chart({"a": 1.0, "b": 2.0}, backend=backend)
    assert flat.shape[0] == 1
