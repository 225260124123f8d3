"""Trainer end to end on tiny models: both Omni-ID stages, the adapter-only and Pivot ID trainers, resume,
gradient checkpointing, mixed precision, and the exported file in the real Omni-ID nodes."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import comfy.patcher_extension
import nodes as comfy_nodes

import harness  # noqa: F401
from idportrait.guidance.patching import apply_injector
from idportrait.guidance import omni_id as OM
from idportrait.nodes import omni_id as N
from idportrait.stand_ins import models as tm
from idportrait.omni_encoder.train import flow as FL
from idportrait.omni_encoder.train import synthetic as S
from idportrait.guidance.differentiable import GradPass
from idportrait.omni_encoder.train import trunk as TR
from idportrait.omni_encoder.train.data import collate_identities, load_records
from idportrait.omni_encoder.train.engine import build_loader, build_stage, train
from idportrait.omni_encoder.train.export import read_encoder_weights




@pytest.fixture(scope="module")
def ds2(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ds2"))
    S.make_identity_dataset(root, identities=2, images=8, size=64)
    return root


@pytest.fixture(scope="module")
def mtd_run(ds2, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mtd"))
    cfg = S.tiny_config("mtd", ds2, out, optim={"max_steps": 15}, data={"num_inputs": [1, 2]},
                        log={"image_every": 15, "probe": True})
    return cfg, train(cfg)


def _images(root, name, idx, size):
    from PIL import Image
    import numpy as np
    out = []
    for i in idx:
        im = Image.open(os.path.join(root, name, f"{i:03d}.png")).convert("RGB").resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(im, np.float32) / 255.0))
    return torch.stack(out)   # IMAGE (N, H, W, 3)


def _sample(model, family, seed=1):
    c = tm.tiny_conditioning(family)
    latent = {"samples": torch.zeros(1, tm.latent_channels(family), 8, 8)}
    return comfy_nodes.common_ksampler(model, seed, 2, 2.0, "euler", "normal", c, tm.tiny_conditioning(family, seed=7),
                                       latent)[0]["samples"]


def test_mtd_stage_overfits_and_writes_stage1_encoder(mtd_run):
    cfg, res = mtd_run
    probe = res["probe"]
    assert probe[15] < 0.75 * probe[0], probe                        # fixed-batch loss falls on the overfit subset
    enc_cfg, sd = read_encoder_weights(res["exported"]["encoder"])
    assert enc_cfg == cfg.encoder_config and "queries" in sd
    assert os.path.isfile(os.path.join(cfg.output_dir, "images", "step_0000015.png"))
    assert os.path.isfile(os.path.join(cfg.output_dir, "config.yaml"))


def test_flux_flow_stage_overfits_and_export_loads_and_samples_in_nodes(mtd_run, ds2, tmp_path):
    cfg = S.tiny_config("flow", ds2, str(tmp_path), family="flux", optim={"max_steps": 12, "lr": 1e-2},
                        data={"num_inputs": [1, 2]}, init={"encoder": mtd_run[1]["exported"]["encoder"]},
                        log={"probe": True})
    res = train(cfg)
    assert res["probe"][12] < 0.99 * res["probe"][0], res["probe"]
    path = res["exported"]["weights"]
    m = OM.load_omni_id_model(path)
    assert m.family == "flux" and m.meta.extra["trainer_stage"] == "flow"
    # the node's encode path gives the tokens the trainer computed (same CLIP preprocessing and tokens)
    cv = TR.tiny_clip_vision(0, S.TINY_TRUNK_SIZE)
    faces = _images(ds2, "person_00", [0, 3, 5], S.TINY_TRUNK_SIZE)
    ident = OM.encode_faces(m, cv, faces, crop=True)
    with torch.no_grad():
        mine = m.encoder.model(clip_tokens=TR.CLIPTrunk.from_comfy(cv)(faces.permute(0, 3, 1, 2))[None])
    torch.testing.assert_close(ident.tokens, mine, rtol=1e-5, atol=1e-5)
    # the training injection computes what the node's injection computes
    model = tm.tiny_model("flux", 0)
    node_model = N.OmniIDApply.execute(model, m, ident, 1.0, 0.0, 1.0, "cond+uncond").result[0]
    inj = FL.TrainableIdentityInjector(m.adapter.model, "flux")
    train_model = apply_injector(model, inj)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.7])
    conds = node_model.model.extra_conds(cross_attn=torch.randn(1, 5, tm.TEXT_WIDTH), pooled_output=torch.zeros(1, 64),
                                         guidance=1.0, noise=x, device="cpu")
    kw = {k: v.process_cond(batch_size=2, device="cpu", area=None).cond for k, v in conds.items()}
    outs = []
    for patched in (node_model, train_model):
        to = dict(patched.model_options["transformer_options"])
        to.update(wrappers=comfy.patcher_extension.copy_nested_dicts(patched.wrappers), sigmas=sigma, cond_or_uncond=[0])
        with torch.no_grad():
            inj.set_identity({k: (a.repeat(2, 1, 1), b.repeat(2, 1, 1)) for k, (a, b) in
                              FL.adapter_kv(m.adapter.model, "flux", ident.tokens).items()})
            outs.append(patched.model.apply_model(x, sigma, transformer_options=to, **kw))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    # and it samples in ComfyUI, differently with and without the identity
    with_id = _sample(node_model, "flux")
    without = _sample(N.OmniIDApply.execute(model, m, ident, 0.0, 0.0, 1.0, "cond").result[0], "flux")
    assert torch.isfinite(with_id).all() and not torch.allclose(with_id, without)


def test_sd15_flow_with_trainable_trunk_and_adapter_only_baselines(ds2, tmp_path):
    cfg = S.tiny_config("flow", ds2, str(tmp_path / "sd"), family="sd15", optim={"max_steps": 2},
                        trunk={"trainable": True})
    res = train(cfg)
    assert all(torch.isfinite(torch.tensor(v)) for v in res["losses"].values())
    m = OM.load_omni_id_model(res["exported"]["weights"])
    assert m.family == "sd15" and m.meta.extra["trunk_trained"] == "1"
    trunk_sd = load_file(res["exported"]["clip_vision"])
    cv = TR.tiny_clip_vision(0, S.TINY_TRUNK_SIZE)
    init = cv.model.state_dict()                                        # the trunk the run started from
    assert set(trunk_sd) == set(init)                                   # ComfyUI CLIP vision layout
    assert any(not torch.equal(trunk_sd[k], init[k].to(trunk_sd[k].dtype)) for k in trunk_sd)   # it was trained
    cv.load_sd(trunk_sd)
    ident = OM.encode_faces(m, cv, _images(ds2, "person_01", [1, 2], 64), crop=True)
    model = tm.tiny_model("sd15", 0)
    out = _sample(N.OmniIDApply.execute(model, m, ident, 1.0, 0.0, 1.0, "cond").result[0], "sd15")
    assert torch.isfinite(out).all()

    # adapter-only: frozen CLIP tokens (variable input counts: padded keys are masked) ...
    clip_enc = dict(S.TINY_ENCODER, encoder_type="clip")
    cfg = S.tiny_config("adapter", ds2, str(tmp_path / "clip"), family="sd15", encoder=clip_enc,
                        optim={"max_steps": 2}, data={"num_inputs": [1, 3]})
    res = train(cfg)
    m = OM.load_omni_id_model(res["exported"]["weights"])
    assert m.encoder_type == "clip" and os.path.basename(res["exported"]["weights"]) == "clip_sd15.safetensors"
    ident = OM.encode_faces(m, TR.tiny_clip_vision(0, S.TINY_TRUNK_SIZE), _images(ds2, "person_00", [0, 1], 64), crop=True)
    assert ident.tokens.shape == (1, 2 * 17, 64)
    N.OmniIDApply.execute(model, m, ident, 1.0, 0.0, 1.0, "cond")
    # ... and ArcFace (embeddings from a pluggable function; insightface in real runs)
    proj = torch.randn(3 * 8 * 8, 512, generator=torch.Generator().manual_seed(0))

    def arcface_fn(images):
        small = torch.nn.functional.interpolate(images, size=(8, 8), mode="area")
        return torch.nn.functional.normalize(small.flatten(1) @ proj.to(images.device), dim=-1)

    cfg = S.tiny_config("adapter", ds2, str(tmp_path / "arc"), family="flux",
                        encoder=dict(S.TINY_ENCODER, encoder_type="arcface"), optim={"max_steps": 2})
    res = train(cfg, arcface_fn=arcface_fn)
    m = OM.load_omni_id_model(res["exported"]["weights"])
    assert m.encoder_type == "arcface" and m.family == "flux"
    with pytest.raises(ValueError, match="ArcFace"):
        build_stage(cfg, torch.device("cpu"), None)


def test_resume_reproduces_the_next_step_loss_and_weights(tmp_path):
    root = str(tmp_path / "ds")
    S.make_identity_dataset(root, identities=6, images=8, size=56)
    sections = dict(optim={"max_steps": 3}, trunk={"trainable": True}, engine={"ema_decay": 0.9},
                    data={"num_inputs": [1, 2], "hflip": 0.5, "color_jitter": 0.1})
    full = train(S.tiny_config("mtd", root, str(tmp_path / "a"), **sections))
    cfg_b = S.tiny_config("mtd", root, str(tmp_path / "b"), **sections)
    first = train(cfg_b, stop_at_step=2)          # 3 batches per epoch: stops mid-epoch
    assert first["step"] == 2 and first["losses"] == {k: full["losses"][k] for k in (1, 2)}
    resumed = train(cfg_b, resume="latest")
    assert resumed["step"] == 3 and list(resumed["losses"]) == [3]
    assert resumed["losses"][3] == pytest.approx(full["losses"][3], rel=1e-6, abs=1e-7)
    a, b = load_file(full["exported"]["encoder"]), load_file(resumed["exported"]["encoder"])   # EMA weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_keeps_gradients_and_inference_tensors_are_fixed(ds2, tmp_path):
    grads = []
    for ckpt in (False, True):
        cfg = S.tiny_config("flow", ds2, str(tmp_path), family="flux", engine={"gradient_checkpointing": ckpt},
                            trunk={"trainable": True})
        torch.manual_seed(0)
        stage = build_stage(cfg, torch.device("cpu"))
        ds, _, _ = build_loader(cfg, load_records(cfg.data))
        batch = collate_identities([ds[(0, 0)], ds[(0, 1)]])
        torch.manual_seed(1)
        with torch.no_grad():   # non-zero identity projections, so every path carries gradient
            for p in stage.adapter.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        stage.module(batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in stage.module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("identity.trunk") for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6)
    # ComfyUI loads models inside inference_mode when a workflow runs: such weights cannot be backpropagated
    with torch.inference_mode():
        model = tm.tiny_model("sd15", 0)
    dm = model.model.diffusion_model
    assert TR.count_inference_tensors(dm) > 0
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    ctx = torch.randn(1, 3, tm.TEXT_WIDTH)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        dm(x, torch.full((1,), 500.0), context=ctx).sum().backward()
    assert TR.ensure_trainable_tensors(dm) > 0 and TR.count_inference_tensors(dm) == 0
    x.grad = None
    dm(x, torch.full((1,), 500.0), context=ctx).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bf16_accumulation_ema_checkpointing_and_pivot_smoke(ds2, tmp_path):
    cfg = S.tiny_config("flow", ds2, str(tmp_path / "bf16"), family="flux", optim={"max_steps": 2, "grad_accum": 2,
                        "batch_size": 1}, engine={"mixed_precision": "bf16", "ema_decay": 0.5,
                                                   "gradient_checkpointing": True}, log={"image_every": 1})
    res = train(cfg)
    assert len(res["losses"]) == 2 and all(v == v and abs(v) < 1e3 for v in res["losses"].values())
    ckpt = res["checkpoints"][-1]
    assert os.path.isfile(os.path.join(ckpt, "custom_checkpoint_2.pkl"))        # state, scheduler, EMA
    assert os.path.isfile(os.path.join(cfg.output_dir, "images", "step_0000001.png"))
    OM.load_omni_id_model(res["exported"]["weights"])
    # Pivot ID encoder (OmniPortrait Eq. 5) on the shared loop
    cfg = S.tiny_config("pivot", ds2, str(tmp_path / "pivot"), family="sd15", optim={"max_steps": 2},
                        base={"prompt": "photo of a person."}, trunk={"trainable": True})
    res = train(cfg)
    with safe_open(res["exported"]["pivot"], framework="pt") as f:
        assert f.metadata()["format"] == "pivot_id" and set(f.keys()) == {"proj.weight", "proj.bias"}
    assert all(torch.isfinite(torch.tensor(v)) for v in res["losses"].values())


def test_inplace_protection_gives_exact_gradients_through_a_comfyui_flux_block():
    """ComfyUI's FLUX blocks add residuals in place; inside GradPass (the trainer's and RB-Guidance's
    differentiable pass) autograd works and is exact (checked against central differences in float64),
    without it backward is refused."""
    dm = tm.tiny_model("flux", 0).model.diffusion_model.double()
    dm.requires_grad_(False)
    blk = dm.single_blocks[0]
    vec = torch.randn(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(x, protect=True):
        xx = x * 1.0
        if not protect:
            return (blk(xx, vec=vec, pe=None) ** 2).sum()
        with GradPass(weight_grads=True):
            return (blk(xx, vec=vec, pe=None) ** 2).sum()

    x = torch.randn(2, 12, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace"):
        f(x, protect=False).backward()
    x.grad = None
    f(x).backward()
    for idx in [(0, 3, 5), (1, 10, 20), (0, 0, 63)]:
        e = torch.zeros_like(x)
        e[idx] = 1e-6
        with torch.no_grad():
            fd = (f(x + e, False) - f(x - e, False)) / 2e-6
        assert float(x.grad[idx]) == pytest.approx(float(fd), rel=1e-5, abs=1e-7)


def test_ema_export_is_the_running_average_of_the_optimizer_steps(tmp_path):
    """decay 0.5 over two steps: exported = 0.25·w0 + 0.25·w1 + 0.5·w2 (w_k: the raw weights after step k)."""
    root = str(tmp_path / "ds")
    S.make_identity_dataset(root, identities=6, images=8, size=56)

    def weights(name, steps, lr=1e-3, use_ema=False):
        cfg = S.tiny_config("mtd", root, str(tmp_path / name), optim={"max_steps": steps, "lr": lr},
                            engine={"ema_decay": 0.5}, export={"use_ema": use_ema})
        return load_file(train(cfg)["exported"]["encoder"])
    w0, w1, w2 = weights("w0", 1, lr=0.0), weights("w1", 1), weights("w2", 2)
    ema = weights("ema", 2, use_ema=True)
    moved = [k for k in ema if not torch.equal(w0[k], w2[k])]
    assert moved   # training changed the weights, so the average is not trivially the start
    for k in ema:
        torch.testing.assert_close(ema[k], 0.25 * w0[k] + 0.25 * w1[k] + 0.5 * w2[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(ema[k], w2[k]) for k in moved)


# --- stage hand-over: stage 2 continues from the trunk stage 1 fine-tuned; the nodes check the trunk ----------

@pytest.fixture(scope="module")
def mtd_trunk_run(ds2, tmp_path_factory):
    """Stage 1 with the paper's trainable CLIP trunk (tiny stand-in)."""
    out = str(tmp_path_factory.mktemp("mtd_trunk"))
    cfg = S.tiny_config("mtd", ds2, out, optim={"max_steps": 3}, trunk={"trainable": True})
    return cfg, train(cfg)


def _flow_cfg(ds2, out, **init):
    return S.tiny_config("flow", ds2, out, family="sd15", optim={"max_steps": 1}, trunk={"trainable": True}, init=init)


def test_stage2_starts_from_the_trunk_stage1_trained(mtd_trunk_run, ds2, tmp_path):
    from idportrait.errors import TrainingError
    from idportrait.omni_encoder import trunk_identity as TI
    _, res = mtd_trunk_run
    enc_file, trunk_file = res["exported"]["encoder"], res["exported"]["clip_vision"]
    with safe_open(enc_file, framework="pt") as f:
        md = f.metadata()
    assert md["trunk_trained"] == "1" and md["trunk_file"] == os.path.basename(trunk_file) and md["trunk_fingerprint"]
    stage1 = load_file(trunk_file)
    stock = TR.tiny_clip_vision(0, S.TINY_TRUNK_SIZE).model.state_dict()
    assert any(not torch.equal(stage1[k], stock[k]) for k in stage1)            # stage 1 did change the trunk

    def trunk_of(**init):
        return TR.trunk_state_dict(build_stage(_flow_cfg(ds2, str(tmp_path / "f"), **init), torch.device("cpu")).trunk)
    # the documented stage-2 command names only the stage-1 encoder: its trunk comes with it
    got = trunk_of(encoder=enc_file)
    assert set(got) == set(stage1) and all(torch.equal(got[k], stage1[k]) for k in stage1)
    # 'stock' starts from trunk.path (here the stand-in) on purpose
    got = trunk_of(encoder=enc_file, trunk="stock")
    assert all(torch.equal(got[k], stock[k].float()) for k in stock)
    # an explicit file is used as given
    got = trunk_of(encoder=enc_file, trunk=trunk_file)
    assert all(torch.equal(got[k], stage1[k]) for k in stage1)
    # stage 1's trunk missing next to its encoder: refused, naming the flag
    lone = tmp_path / "lone"
    lone.mkdir()
    lone_enc = str(lone / "encoder_stage1.safetensors")
    with open(enc_file, "rb") as a, open(lone_enc, "wb") as b:
        b.write(a.read())
    with pytest.raises(TrainingError, match="init.trunk"):
        trunk_of(encoder=lone_enc)
    # a file of that name that is not the trained trunk: refused too (the fingerprint differs)
    from safetensors.torch import save_file
    save_file({k: v.float().contiguous() for k, v in stock.items()}, str(lone / TI.FINETUNED_FILE))
    with pytest.raises(TrainingError, match="fingerprint differs.*init.trunk"):
        trunk_of(encoder=lone_enc)


def test_nodes_warn_when_the_clip_vision_model_is_not_the_trained_trunk(mtd_trunk_run, ds2, tmp_path, caplog):
    import logging
    _, res = mtd_trunk_run
    out = train(_flow_cfg(ds2, str(tmp_path / "flow"), encoder=res["exported"]["encoder"]))
    m = OM.load_omni_id_model(out["exported"]["weights"])
    assert m.meta.extra["trunk_trained"] == "1" and m.meta.extra["trunk_file"] == "clip_vision_finetuned.safetensors"
    faces = _images(ds2, "person_00", [0, 1], S.TINY_TRUNK_SIZE)
    stock = TR.tiny_clip_vision(0, S.TINY_TRUNK_SIZE)
    with caplog.at_level(logging.WARNING):
        OM.encode_faces(m, stock, faces, crop=True)
    assert "fine-tuned CLIP trunk" in caplog.text and "clip_vision_finetuned.safetensors" in caplog.text
    # the exported trunk, loaded the way ComfyUI loads it (also in half precision): no warning
    for dtype in (torch.float32, torch.float16):
        cv = TR.tiny_clip_vision(0, S.TINY_TRUNK_SIZE)
        cv.load_sd({k: v.to(dtype) for k, v in load_file(out["exported"]["clip_vision"]).items()})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert OM.warn_if_other_trunk(m, cv) is None
            OM.encode_faces(m, cv, faces, crop=True)
        assert "trunk" not in caplog.text
    # the stage-1 trunk is not the stage-2 one either (stage 2 trained it further)
    stage1 = TR.tiny_clip_vision(0, S.TINY_TRUNK_SIZE)
    stage1.load_sd(load_file(res["exported"]["clip_vision"]))
    assert OM.warn_if_other_trunk(m, stage1) is not None


def test_default_config_writes_the_papers_values(tmp_path):
    """`default-config` (the documented first command): what the papers give, per stage."""
    from idportrait.omni_encoder.train import cli
    from idportrait.omni_encoder.train.config import TrainConfig
    want = {"mtd": (250_000, 1e-4, 448, True), "flow": (5_000, 1e-4, 512, True), "adapter": (5_000, 1e-4, 512, False),
            "pivot": (80_000, 2e-5, 512, True)}
    for stage, (steps, lr, res, trunk) in want.items():
        path = str(tmp_path / f"{stage}.yaml")
        assert cli.main(["default-config", "--stage", stage, "--out", path]) == 0
        cfg = TrainConfig.load(path)
        assert (cfg.optim.max_steps, cfg.optim.lr, cfg.target_resolution) == (steps, lr, res), stage
        assert cfg.trunk.trainable == trunk or stage == "adapter"   # the adapter stage freezes it itself
    assert (cfg.base.family, cfg.base.text_drop, cfg.base.id_drop) == ("sd15", 0.1, 0.1)
    assert cfg.optim.batch_size == 4 and TrainConfig.load(str(tmp_path / "mtd.yaml")).optim.batch_size == 4
    path = str(tmp_path / "pivot_sdxl.yaml")
    cli.main(["default-config", "--stage", "pivot", "--family", "sdxl", "--out", path])
    assert TrainConfig.load(path).optim.max_steps == 60_000
