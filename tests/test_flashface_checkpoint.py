"""FlashFace checkpoint loader/converter on a tiny checkpoint with the released naming scheme.

The tiny checkpoint has every one of the 2142 released keys, with every width divided by 10 (context
768 -> 24), random values, and the aliases holding copies of their ori_* twins as in the real file.
Converted state dicts must load strictly into tiny UNets built with ComfyUI's own classes.
"""
import fractions
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import comfy.model_base
import comfy.ops
import comfy.supported_models
from comfy.ldm.modules.attention import CrossAttention

import idportrait.guidance.flashface_checkpoint as ffc
import idportrait.guidance.flashface_keys as fk
from flashface_tiny import tiny_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ffc.Geometry(model_channels=32, context_dim=24)
N_MAIN, N_REF, N_SHARED = 686, 686, 4 + 46 + 4  # shared: time embedding, middle block (no SAF), head


def tiny_unet(in_channels):
    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "adm_in_channels": None, "in_channels": in_channels, "model_channels": TINY.model_channels,
           "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
           "transformer_depth_middle": 1, "transformer_depth_output": [1] * 9 + [0] * 3,
           "use_linear_in_transformer": False, "context_dim": TINY.context_dim,
           "use_temporal_attention": False, "use_temporal_resblock": False}
    return comfy.model_base.BaseModel(comfy.supported_models.SD15(cfg), device="cpu").diffusion_model


@pytest.fixture(scope="module")
def tiny_sd():
    return tiny_state_dict(context=TINY.context_dim)


@pytest.fixture(scope="module")
def tiny_files(tiny_sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("flashface")
    ckpt, st = str(d / "flashface_tiny.ckpt"), str(d / "flashface_tiny_copy.safetensors")
    torch.save(dict(tiny_sd), ckpt)
    save_file(tiny_sd, st)
    return ckpt, st


def assert_same_values(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k


def test_tiny_checkpoint_has_the_released_layout(tiny_sd):
    table = fk.layout(*TINY)
    assert {k: tuple(v.shape) for k, v in tiny_sd.items()} == {k: e.shape for k, e in table.items()}


def test_pickle_and_safetensors_copy_convert_to_the_right_tensors(tiny_sd, tiny_files):
    w = ffc.load(tiny_files[0], geometry=TINY)
    assert (len(w.main), len(w.ref), len(w.ref_attention)) == (N_MAIN, N_REF, 50)
    # values come from the right FlashFace module
    assert torch.equal(w.main["input_blocks.0.0.weight"], tiny_sd["ori_encoder.0.weight"])
    assert torch.equal(w.ref["input_blocks.0.0.weight"], tiny_sd["ref_encoder.0.weight"])
    assert torch.equal(w.ref["output_blocks.11.1.transformer_blocks.0.attn1.to_q.weight"],
                      tiny_sd["ref_decoder.11.1.blocks.0.self_attn.q.weight"])
    assert torch.equal(w.ref["middle_block.1.transformer_blocks.0.attn1.to_q.weight"],
                      tiny_sd["ori_middle.1.blocks.0.self_attn.q.weight"])  # not ref_middle
    assert not torch.equal(tiny_sd["ori_middle.1.blocks.0.self_attn.q.weight"],
                           tiny_sd["ref_middle.1.blocks.0.self_attn.q.weight"])
    assert torch.equal(w.ref_attention["middle_block.1.transformer_blocks.0.flashface_ref_attn.to_out.0.bias"],
                      tiny_sd["ori_middle.1.blocks.0.self_attn.self_attn_first.o.bias"])
    # every used tensor equals its source, and shared modules are one tensor object in both UNets
    for key, e in fk.layout(*TINY).items():
        for unet, ckey in e.targets:
            got = w.ref_attention[ckey] if fk.is_ref_attention_key(ckey) else getattr(w, unet)[ckey]
            assert torch.equal(got, tiny_sd[key]), key
    shared = [k for k in w.ref if w.ref[k] is w.main.get(k)]
    assert len(shared) == N_SHARED and all(k.split(".")[0] in ("time_embed", "middle_block", "out") for k in shared)

    copy = ffc.load(tiny_files[1], geometry=TINY)
    for a, b in zip(w, copy):
        assert_same_values(a, b)


def test_converted_weights_load_strictly_into_tiny_comfy_unets(tiny_files):
    w = ffc.load(tiny_files[0], geometry=TINY)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 3, TINY.context_dim)
    for sd, channels in ((w.main, 5), (w.ref, 4)):
        unet = tiny_unet(channels)
        unet.load_state_dict(sd, strict=True)
        xin = torch.cat([x, torch.ones(1, 1, 8, 8)], 1) if channels == 5 else x
        with torch.no_grad():
            out = unet(xin, t, context=ctx)
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    for block in fk.REF_ATTENTION_BLOCKS:
        group = {fk.split_ref_attention_key(k)[1]: v for k, v in w.ref_attention.items()
                 if fk.split_ref_attention_key(k)[0] == block}
        ch = group["to_q.weight"].shape[0]
        attn = CrossAttention(ch, heads=8, dim_head=ch // 8, operations=comfy.ops.disable_weight_init)
        attn.load_state_dict(group, strict=True)


@pytest.mark.parametrize("dtype", [None, "fp16", "bf16"])
def test_dedup_safetensors_round_trip(tiny_files, tmp_path, dtype):
    w = ffc.load(tiny_files[0], dtype=dtype, geometry=TINY)
    want = {None: torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert {t.dtype for d in w for t in d.values()} == {want}
    out = str(tmp_path / "flashface_converted.safetensors")
    ffc.save_converted(w, out)
    with safe_open(out, "pt") as f:
        names, meta = list(f.keys()), f.metadata()
    assert meta["format"] == ffc.FORMAT and meta["format_version"] == ffc.FORMAT_VERSION
    assert len(json.loads(meta["ref_from_main"])) == N_SHARED
    assert len(names) == N_MAIN + (N_REF - N_SHARED) + 50  # shared tensors stored once
    assert not any(n.startswith("ref.") and n[4:] in json.loads(meta["ref_from_main"]) for n in names)

    back = ffc.load(out, geometry=TINY)  # detected as our format from its metadata
    for a, b in zip(w, back):
        assert_same_values(a, b)
        assert {t.dtype for t in b.values()} == {want}
    assert sum(back.ref[k] is back.main.get(k) for k in back.ref) == N_SHARED
    tiny_unet(5).load_state_dict(back.main, strict=True)
    tiny_unet(4).load_state_dict(back.ref, strict=True)
    if dtype is None:  # dtype conversion on reading a converted file
        half = ffc.load(out, dtype="fp16", geometry=TINY)
        assert {t.dtype for d in half for t in d.values()} == {torch.float16}


def test_aliases_stand_in_for_missing_ori_keys(tiny_sd, tmp_path):
    # A copy that kept only the plain names (and dropped ref_middle) is still complete.
    pruned = {k: v for k, v in tiny_sd.items() if not k.startswith(("ori_", "ref_middle."))}
    w = ffc.convert(pruned, geometry=TINY)
    full = ffc.convert(tiny_sd, geometry=TINY)
    for a, b in zip(w, full):
        assert_same_values(a, b)


def test_not_a_flashface_checkpoint_errors_name_the_problem_and_the_fix(tiny_sd, tmp_path):
    gone = ("ori_encoder.1.0.layer1.0.weight", "encoder.1.0.layer1.0.weight")  # the key and its alias
    missing = {k: v for k, v in tiny_sd.items() if k not in gone}
    with pytest.raises(ffc.FlashFaceCheckpointError,
                       match=r"not a FlashFace checkpoint.*missing keys ori_encoder\.1\.0\.layer1\.0\.weight.*flashface\.ckpt"):
        ffc.convert(missing, geometry=TINY)

    unknown = {**tiny_sd, "model.diffusion_model.out.0.weight": torch.zeros(1)}
    with pytest.raises(ffc.FlashFaceCheckpointError,
                       match=r"unexpected keys model\.diffusion_model\.out\.0\.weight.*ordinary SD checkpoint"):
        ffc.convert(unknown, geometry=TINY)

    # tiny tensors checked against the real SD1.5 widths
    with pytest.raises(ffc.FlashFaceCheckpointError,
                       match=r"wrong shape for \d+ tensor.*time_embedding\.0\.weight \(ComfyUI time_embed\.0\.weight\): "
                             r"expected \(1280, 320\), got \(128, 32\)"):
        ffc.convert(tiny_sd)

    not_tensors = tmp_path / "objects.ckpt"
    torch.save({"a": torch.zeros(1), "b": fractions.Fraction(1, 3)}, str(not_tensors))
    with pytest.raises(ffc.FlashFaceCheckpointError, match="refusing to load"):
        ffc.load(str(not_tensors))

    nested = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, str(nested))
    with pytest.raises(ffc.FlashFaceCheckpointError, match="not a flat dict of tensors"):
        ffc.load(str(nested))

    with pytest.raises(FileNotFoundError, match="huggingface.co/shilongz/FlashFace-SD1.5"):
        ffc.load(str(tmp_path / "absent.ckpt"))


def test_converted_file_is_checked_on_reading(tiny_files, tmp_path):
    w = ffc.load(tiny_files[0], geometry=TINY)
    path = str(tmp_path / "c.safetensors")
    ffc.save_converted(w, path)
    with pytest.raises(ffc.FlashFaceCheckpointError, match="wrong shape"):
        ffc.load(path)  # a tiny file read as SD1.5

    broken = ffc.FlashFaceWeights({k: v for k, v in w.main.items() if k != "out.2.bias"}, w.ref, w.ref_attention)
    ffc.save_converted(broken, path)
    with pytest.raises(ffc.FlashFaceCheckpointError, match=r"main has missing keys \[out\.2\.bias\]"):
        ffc.load(path, geometry=TINY)

    with safe_open(tiny_files[1], "pt") as f:
        first = {k: f.get_tensor(k) for k in list(f.keys())[:2]}
    save_file(first, path, metadata={"format": ffc.FORMAT, "format_version": "999"})
    with pytest.raises(ffc.FlashFaceCheckpointError, match="format_version '999'.*convert flashface.ckpt again"):
        ffc.load(path, geometry=TINY)


def test_cli_reports_errors_without_writing(tiny_files, tmp_path):
    out = tmp_path / "out.safetensors"
    cmd = [sys.executable, "-m", "guidance.flashface_checkpoint", tiny_files[0], str(out), "--dtype", "fp16"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "wrong shape for" in proc.stderr and "flashface.ckpt" in proc.stderr  # tiny file is not SD1.5-sized
    assert not out.exists() and not (tmp_path / "out.safetensors.tmp").exists()


def test_cli_converts_in_process(tiny_files, tmp_path, monkeypatch):
    # The command checks SD1.5 widths; point its default geometry at the tiny one to run it end to end.
    monkeypatch.setattr(ffc.load, "__defaults__", (None, TINY))
    out = str(tmp_path / "out.safetensors")
    assert ffc.main([tiny_files[1], out, "--dtype", "bf16"]) == 0
    back = ffc.load(out)
    ref = ffc.load(tiny_files[0], dtype="bf16")
    for a, b in zip(back, ref):
        assert_same_values(a, b)
        assert {t.dtype for t in a.values()} == {torch.bfloat16}


def test_geometry_auto_reads_the_widths_from_the_file(tiny_files, tmp_path):
    auto = ffc.load(tiny_files[0], geometry="auto")
    for a, b in zip(auto, ffc.load(tiny_files[0], geometry=TINY)):
        assert_same_values(a, b)
    out = str(tmp_path / "c.safetensors")
    ffc.save_converted(auto, out)
    assert ffc.infer_geometry(ffc.read_state_dict(out)) == TINY            # our converted format
    assert ffc.infer_geometry({"a": torch.zeros(1)}) == ffc.SD15            # not FlashFace: SD1.5, then convert() says why
