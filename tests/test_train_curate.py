"""Curation (appendix Fig. II) on synthetic "videos" with known identities and poses, and the evaluation command."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import harness  # noqa: F401
from idportrait.omni_encoder.train import curate as CU
from idportrait.omni_encoder.train import evaluate as EV
from idportrait.omni_encoder.train import synthetic as S
from idportrait.omni_encoder.train.config import DataConfig
from idportrait.omni_encoder.train.data import IdentityDataset, load_records

COLORS = {"A": (1.0, 0.3, 0.3), "B": (0.3, 1.0, 0.3), "C": (0.3, 0.3, 1.0)}
GRID_A = [(y, p, 0.0) for y in (-60, -20, 20, 60) for p in (-30, 30)]          # 8 pose groups
GRID_B = [(y, p, r) for y, p, r in zip((-50, -25, 0, 25, 50, -50, 0, 50), (-25, 25, -25, 25, -25, 0, 0, 0),
                                       (0, 0, 0, 0, 0, 20, -20, 20))]




def _write(folder, frames):
    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(os.path.join(folder, f"{i:04d}.png"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """clip_a: identity A, 16 sharp frames = 8 pose groups x 2 (1 degree apart) + 4 blurred frames (20 %).
    clip_b: identity B (8 poses + 2 blurred) cut with identity C (10 frames, all nearly frontal) and 2 empty frames.
    Returns the folders and the ground truth per (folder, frame): (identity, pose group or None if blurred)."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    truth = {}
    frames = []
    for g, pose in enumerate(GRID_A):
        for k in range(2):
            frames.append((S.synthetic_frame(COLORS["A"], np.array(pose) + k), ("A", g)))
    for k in range(4):
        frames.append((S.synthetic_frame(COLORS["A"], rng.uniform(-60, 60, 3), blur=2.5), ("A", None)))
    order = rng.permutation(len(frames))
    _write(str(root / "clip_a"), [frames[i][0] for i in order])
    truth["clip_a"] = {j: frames[i][1] for j, i in enumerate(order)}
    frames = [(S.synthetic_frame(COLORS["B"], pose), ("B", g)) for g, pose in enumerate(GRID_B)]
    frames += [(S.synthetic_frame(COLORS["B"], (10, 10, 0), blur=2.5), ("B", None)) for _ in range(2)]
    frames += [(S.synthetic_frame(None, (0, 0, 0), face=False), (None, None)) for _ in range(2)]
    frames += [(S.synthetic_frame(COLORS["C"], rng.uniform(-1, 1, 3)), ("C", 0)) for _ in range(10)]
    _write(str(root / "clips" / "clip_b"), [f for f, _ in frames])
    truth["clip_b"] = {j: t for j, (_, t) in enumerate(frames)}
    return root, truth


def _tools():
    return CU.FaceTools(embed=S.synthetic_embed, detect=S.synthetic_detect, pose=S.synthetic_pose)


def _meta(out, name):
    with open(os.path.join(out, name, "meta.json")) as f:
        return json.load(f)


def test_curation_splits_identities_drops_low_quality_and_picks_distinct_poses(sources, tmp_path):
    root, truth = sources
    cfg = CU.CurateConfig(resolution=64, padding=0.6, min_face=0)   # synthetic faces are 64 px, not the paper's 448
    out = str(tmp_path / "dataset")
    res = CU.curate([str(root)], out, cfg, tools=_tools(), workers=2, progress=False)
    assert res["sources"] == 2 and res["skipped"] == 0 and res["identities"] == 2
    names = sorted(n for n in os.listdir(out) if not n.startswith(".") and os.path.isdir(os.path.join(out, n)))
    assert len(names) == 2
    seen = {}
    for name in names:
        meta = _meta(out, name)
        src = os.path.basename(meta["source"])
        labels = [truth[src][im["frame"]] for im in meta["images"]]
        ident = {lab[0] for lab in labels}
        assert len(ident) == 1                                        # one person per identity folder
        groups = [lab[1] for lab in labels]
        assert None not in groups                                      # blurred (lowest-quality) faces dropped
        assert sorted(groups) == list(range(8))                        # 8 frames, one per distinct pose group
        poses = [im["pose"] for im in meta["images"]]
        assert all(CU.pose_distance(a, b) > 15 for i, a in enumerate(poses) for b in poses[i + 1:])
        assert len({im["cluster"] for im in meta["images"]}) == 8      # distinct pose clusters
        files = sorted(os.listdir(os.path.join(out, name)))
        assert len([f for f in files if f.endswith(".mask.png")]) == 8
        assert Image.open(os.path.join(out, name, "000.png")).size == (64, 64)
        seen[ident.pop()] = name
    assert set(seen) == {"A", "B"}                                    # C (one pose only) is rejected
    with open(os.path.join(out, ".done", CU.source_id(str(root / "clips" / "clip_b")) + ".json")) as f:
        done_b = json.load(f)
    assert len(done_b["rejected"]) == 1 and done_b["faces"] == 20      # 2 empty frames: no face
    # the result is a training set
    recs = load_records(DataConfig(root=out))
    assert sorted(r.name for r in recs) == names and all(len(r.images) == 8 and r.masks[0] for r in recs)
    item = IdentityDataset(recs, DataConfig(root=out), seed=0, target_size=64, input_size=32)[(0, 0)]
    assert item["targets"].shape == (8, 3, 64, 64)
    # resumable: a second run skips finished sources and leaves them untouched
    stamp = os.path.getmtime(os.path.join(out, seen["A"], "000.png"))
    again = CU.curate([str(root)], out, cfg, tools=_tools(), workers=1, progress=False)
    assert again["skipped"] == 2 and again["processed"] == [] and again["identities"] == 2
    assert os.path.getmtime(os.path.join(out, seen["A"], "000.png")) == stamp
    # one process gives the same selection as two
    out1 = str(tmp_path / "serial")
    CU.curate([str(root)], out1, cfg, tools=_tools(), workers=1, progress=False)
    for name in names:
        assert [im["frame"] for im in _meta(out1, name)["images"]] == [im["frame"] for im in _meta(out, name)["images"]]
    with pytest.raises(ValueError, match="embedding"):
        CU.curate([str(root)], str(tmp_path / "x"), cfg, tools=None, progress=False)


def test_evaluation_plan_and_scores(sources, tmp_path):
    root, _ = sources
    out = str(tmp_path / "dataset")
    CU.curate([str(root)], out, CU.CurateConfig(resolution=64, min_face=0), tools=_tools(), progress=False)
    names = sorted(r.name for r in load_records(DataConfig(root=out)))
    with open(tmp_path / "holdout.json", "w") as f:
        json.dump(names, f)
    plan = EV.make_plan(out, str(tmp_path / "holdout.json"), [1, 3, 5], seed=0)
    assert len(plan["items"]) == 2 * (7 + 5 + 3)
    for it in plan["items"]:
        assert it["target"] not in it["inputs"] and len(it["inputs"]) == it["n_inputs"]
    gen = tmp_path / "generated"
    other = {names[0]: names[1], names[1]: names[0]}
    for it in plan["items"]:
        dst = gen / it["out"]
        os.makedirs(dst.parent, exist_ok=True)
        if it["n_inputs"] == 1:      # "generated" = the target itself: perfect identity and pose
            Image.open(it["target"]).save(dst)
        elif it["n_inputs"] == 3:    # the other identity: the identity score must fall
            src = os.path.join(out, other[it["identity"]], os.path.basename(it["target"]))
            Image.open(src).save(dst)
    # n = 5: nothing generated -> all missing

    def first(fn):
        def run(rgb):
            faces = S.synthetic_detect(rgb)
            return fn(rgb, faces[0]) if faces else None
        return run

    res = EV.evaluate_generated(plan, str(gen), first(S.synthetic_embed), first(S.synthetic_pose),
                                out=str(tmp_path / "scores.json"))
    assert res["1"]["id_similarity"] == pytest.approx(1.0, abs=1e-6) and res["1"]["pose_error"] == pytest.approx(0.0)
    assert res["3"]["id_similarity"] < 0.5 and res["3"]["count"] == 10
    assert res["5"]["missing"] == 6 and res["5"]["id_similarity"] is None
    table = EV.format_table(res)
    assert "| 1 | 1.000 | 0.0 | 14 | 0 |" in table
    assert os.path.isfile(tmp_path / "scores.json")


def test_curation_defaults_are_the_papers(sources, tmp_path):
    """MFHQ keeps faces larger than 448 px (Omni-ID §3.4): the default, in the command and in the config."""
    from idportrait.omni_encoder.train import cli
    assert CU.CurateConfig().min_face == 448
    args = cli._parser().parse_args(["curate", "--input", "x", "--out", "y"])
    assert args.min_face == 448
    root, _ = sources
    res = CU.curate([str(root)], str(tmp_path / "ds"), CU.CurateConfig(resolution=64), tools=_tools(), progress=False)
    assert res["identities"] == 0          # every synthetic face (64 px) is below the paper's 448
