"""Trainer unit tests: few-to-many split, batch builder, MTD patch masking and the masked L1 (Eq. 4), config."""
import collections
import os

import pytest
import torch

import harness  # noqa: F401  (real ComfyUI + the pack as `idportrait`)
from idportrait.omni_encoder.train import config as C
from idportrait.omni_encoder.train import data as D
from idportrait.omni_encoder.train import mtd as M
from idportrait.omni_encoder.train import synthetic as S




@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ids"))
    S.make_identity_dataset(root, identities=3, images=8, size=56, masks="some")
    return root


def test_few_to_many_split_default_and_ablations():
    counts = collections.Counter()
    for seed in range(300):
        g = D.generator(seed)
        ins, tgts = D.few_to_many_split(8, [1, 3], 8, False, g)
        counts[len(ins)] += 1
        assert tgts == list(range(8))                      # all 8 targets, the inputs included
        assert set(ins) <= set(range(8)) and len(set(ins)) == len(ins)
        assert len(tgts) > len(ins)                        # |X^r| > |X^s|
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 60   # uniform over 1..3
    for num_inputs, num_targets, want_in in (([3, 3], 8, 3), ([3, 3], 5, 3), ([8, 8], 8, 8)):   # 3-8, 3-5, 8-8
        ins, tgts = D.few_to_many_split(8, num_inputs, num_targets, False, D.generator(1))
        assert len(ins) == want_in and len(tgts) == num_targets and len(set(tgts)) == num_targets
    ins, tgts = D.few_to_many_split(8, [3, 3], 5, True, D.generator(2))
    assert not set(ins) & set(tgts) and len(tgts) == 5
    with pytest.raises(ValueError):
        D.few_to_many_split(8, [1, 3], 9, False, D.generator(0))


def test_dataset_items_masks_and_determinism(dataset):
    cfg = C.DataConfig(root=dataset, hflip=0.5, color_jitter=0.1, scale_jitter=0.05)
    recs = D.load_records(cfg)
    assert [r.name for r in recs] == ["person_00", "person_01", "person_02"]
    assert recs[0].masks[0] is not None and recs[1].masks[0] is None   # "some": masks on even identities
    ds = D.IdentityDataset(recs, cfg, seed=3, target_size=56, input_size=28)
    a, b = ds[(0, 0)], ds[(0, 0)]
    assert torch.equal(a["inputs"], b["inputs"]) and a["seed"] == b["seed"]         # a sample is a function of its key
    assert a["seed"] != ds[(1, 0)]["seed"]
    assert 1 <= a["inputs"].shape[0] <= 3 and a["inputs"].shape[1:] == (3, 28, 28)
    assert a["targets"].shape == (8, 3, 56, 56) and a["target_masks"].shape == (8, 1, 56, 56)
    # mask files are used where present; elsewhere the ArcFace-template ellipse
    from PIL import Image
    import numpy as np
    file_mask = torch.from_numpy(np.asarray(Image.open(recs[0].masks[a["target_ids"][0]]), np.float32) / 255)
    assert torch.equal(a["target_masks"][0, 0], (file_mask > 0.5).float())
    c = ds[(0, 1)]
    assert torch.equal(c["target_masks"][0, 0], D.template_face_mask(56, cfg.crop_padding))
    # the sampler and collate: same order for every process, inputs padded with a mask
    sampler = D.EpochSampler(len(ds), seed=3)
    order0 = list(sampler)
    sampler.set_epoch(1)
    assert sorted(order0) == [(0, i) for i in range(3)] and [k[0] for k in sampler] == [1, 1, 1]
    batch = D.collate_identities([ds[k] for k in order0])
    n = [ds[k]["inputs"].shape[0] for k in order0]
    assert batch["inputs"].shape[:2] == (3, max(n)) and batch["input_mask"].sum(1).tolist() == n
    assert batch["targets"].shape == (3, 8, 3, 56, 56) and batch["seeds"].dtype == torch.int64


def test_patch_masking_ratio_and_corruption():
    g = D.generator(0)
    hidden = M.random_patch_mask((448 // 14) ** 2, 0.95, g)
    assert hidden.sum() == 973 and (~hidden).sum() == 51          # 95 % of 1024 patches of 14 x 14
    assert M.random_patch_mask(16, 0.95, g).sum() == 15            # at least one patch stays visible
    dec = M.MaskedTransformerDecoder(token_dim=8, image_size=56, patch=14, dim=16, heads=2, cross_blocks=6,
                                     self_blocks=2)
    assert len(dec.cross_blocks) == 6 and len(dec.self_blocks) == 2
    stage = M.MTDStage(torch.nn.Identity(), dec, mask_ratio=0.95)
    x = torch.rand(4, 3, 56, 56) * 2 - 1
    seeds = torch.tensor([5, 6])
    masked, hid, pix = stage.corrupt(x, seeds, 2)
    assert hid.shape == (4, 16) and (hid.sum(1) == 15).all()
    assert torch.equal(masked[pix.expand_as(x) > 0], torch.zeros_like(masked[pix.expand_as(x) > 0]))
    assert torch.equal(masked[pix.expand_as(x) == 0], x[pix.expand_as(x) == 0])   # visible pixels untouched
    assert float(pix.mean()) == pytest.approx(15 / 16)
    # masks depend only on the sample seed (reproducible across processes and resumes)
    assert torch.equal(stage.corrupt(x, seeds, 2)[1], hid)
    assert not torch.equal(stage.corrupt(x, torch.tensor([7, 6]), 2)[1][:2], hid[:2])
    # patchify round trip
    assert torch.equal(M.unpatchify(M.patchify(x, 14), 14, 56, 56), x)


def test_masked_l1_counts_only_the_face():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 8, 8)
    pred = torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 2:6, 2:6] = 1          # 16 pixels
    mask[1, :, :, :4] = 1             # 32 pixels
    loss, per = M.masked_l1(pred, target, mask)
    manual = [((pred[i] - target[i]).abs() * mask[i]).sum() / (mask[i].sum() * 3) for i in range(2)]
    assert torch.allclose(per, torch.stack(manual)) and torch.allclose(loss, torch.stack(manual).mean())
    changed = pred.clone()
    changed[mask.expand_as(pred) == 0] += 10.0      # anything outside M^r is free
    assert torch.allclose(M.masked_l1(changed, target, mask)[0], loss)
    inside = pred.clone()
    inside[0, 0, 3, 3] += 1.0
    assert M.masked_l1(inside, target, mask)[0] > loss
    empty = torch.zeros_like(mask)
    assert float(M.masked_l1(pred, target, empty)[0]) == 0.0
    # each target image weighs the same whatever its face area
    assert torch.allclose(M.masked_l1(target + 0.5, target, mask)[1], torch.tensor([0.5, 0.5]))


def test_config_round_trip_overrides_and_validation(tmp_path):
    cfg = S.tiny_config("mtd", "/data", str(tmp_path / "run"))
    path = str(tmp_path / "run.yaml")
    cfg.save(path)
    again = C.TrainConfig.load(path, ["optim.lr=5e-5", "data.num_inputs=[3,3]", "encoder.num_queries=8"])
    assert again.optim.lr == 5e-5 and again.data.num_inputs == [3, 3] and again.encoder_config.num_queries == 8
    assert again.target_resolution == 56 and C.TrainConfig(stage="flow").target_resolution == 512
    assert C.TrainConfig(stage="mtd").target_resolution == 448 and C.TrainConfig().mtd.mask_ratio == 0.95
    cfg.save(str(tmp_path / "run.json"))
    assert C.TrainConfig.load(str(tmp_path / "run.json")).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="unknown"):
        C.TrainConfig.load(path, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="num_inputs"):
        C.TrainConfig.from_dict({"data": {"num_inputs": [3, 1]}})
    with pytest.raises(ValueError, match="multiple of the patch"):
        C.TrainConfig.from_dict({"stage": "mtd", "data": {"resolution": 500}})
    assert os.path.isfile(path)
