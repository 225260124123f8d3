"""FlashFace key mapping against the real checkpoint layout and ComfyUI's own SD1.5 UNet.

The key list (all 2142 keys and shapes of the released flashface.ckpt) is shared reference data;
the UNets are built with ComfyUI's classes on the meta device, so no weights are needed.
"""
import ast
import subprocess
import sys

import pytest
import torch

import comfy.model_base
import comfy.model_detection
import comfy.ops
import comfy.supported_models
from comfy.ldm.modules.attention import CrossAttention

import idportrait.guidance.flashface_keys as fk

from flashface_tiny import KEYS_FILE, REPO  # noqa: E402  (the released key list, kept in tests/data)


def sd15_model_config(in_channels, model_channels=320, context_dim=768):
    """ComfyUI's SD15 model config with a full unet_config (the one model_detection builds for SD1.5)."""
    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "adm_in_channels": None, "in_channels": in_channels, "model_channels": model_channels,
           "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
           "transformer_depth_middle": 1, "transformer_depth_output": [1] * 9 + [0] * 3,
           "use_linear_in_transformer": False, "context_dim": context_dim,
           "use_temporal_attention": False, "use_temporal_resblock": False}
    assert comfy.supported_models.SD15.matches(cfg)  # ComfyUI itself calls this an SD1.5 UNet
    return comfy.supported_models.SD15(cfg)          # adds num_heads=8


def comfy_unet_shapes(in_channels):
    unet = comfy.model_base.BaseModel(sd15_model_config(in_channels), device="meta").diffusion_model
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def file_shapes():
    out = {}
    with open(KEYS_FILE, encoding="utf-8") as fh:
        for line in fh:
            key, shape = line.rstrip("\n").split("\t")
            out[key] = tuple(ast.literal_eval(shape))
    assert len(out) == 2142
    return out


def mapped(file_shapes, unet):
    """{comfy key: shape taken from the file} for one UNet; fails on a comfy key produced twice."""
    out = {}
    for key, shape in file_shapes.items():
        for u, ckey in fk.map_key(key):
            if u == unet:
                assert ckey not in out, f"{ckey} produced by two checkpoint keys"
                out[ckey] = shape
    return out


def test_every_checkpoint_key_is_used_or_dropped_with_a_reason(file_shapes):
    assert set(fk.layout()) == set(file_shapes)
    for key, shape in file_shapes.items():
        e = fk.entry(key)
        assert e.shape == shape, key
        assert bool(e.targets) != bool(e.drop_reason), key  # exactly one of: used, dropped with a reason
    dropped = [k for k in file_shapes if not fk.map_key(k)]
    assert len(dropped) == 248 + 51 + 429 + 46
    # Only aliases (whose kept twin has the same shape) and the never-run ref_middle are dropped.
    for k in dropped:
        part = k.split(".")[0]
        if part == "ref_middle":
            assert fk.drop_reason(k) == fk.REF_MIDDLE_REASON
        else:
            twin = f"ori_{k}"
            assert part in fk.ALIASES and fk.map_key(twin) and file_shapes[twin] == file_shapes[k], k
            assert fk.alias_of(twin) == k and twin in fk.drop_reason(k)


def test_main_mapping_is_comfy_sd15_unet_with_5_channels_plus_ref_attention(file_shapes):
    main = mapped(file_shapes, fk.MAIN)
    extra = {k: s for k, s in main.items() if fk.is_ref_attention_key(k)}
    core = {k: s for k, s in main.items() if k not in extra}
    assert core == comfy_unet_shapes(in_channels=5)  # keys AND shapes, 686 of them
    assert core["input_blocks.0.0.weight"] == (320, 5, 3, 3)
    # 50 extras: one CrossAttention-shaped group per reference-attention block, nothing elsewhere.
    groups = {}
    for k, s in extra.items():
        block, param = fk.split_ref_attention_key(k)
        groups.setdefault(block, {})[param] = s
    assert set(groups) == set(fk.REF_ATTENTION_BLOCKS) and len(extra) == 50
    for block, params in groups.items():
        ch = params["to_q.weight"][0]
        attn = CrossAttention(ch, heads=8, dim_head=ch // 8, device="meta", operations=comfy.ops.disable_weight_init)
        assert params == {k: tuple(v.shape) for k, v in attn.state_dict().items()}, block


def test_ref_mapping_is_comfy_sd15_unet_running_the_main_middle_block(file_shapes):
    ref = mapped(file_shapes, fk.REF)
    assert ref == comfy_unet_shapes(in_channels=4)
    sources = {ckey: key for key in file_shapes for u, ckey in fk.map_key(key) if u == fk.REF}
    for ckey, key in sources.items():
        expected = {"input_blocks": "ref_encoder.", "middle_block": "ori_middle.", "output_blocks": "ref_decoder.",
                    "time_embed": "time_embedding.", "out": "head."}[ckey.split(".")[0]]
        assert key.startswith(expected), (ckey, key)


def test_comfy_model_detection_recognises_both_converted_unets(file_shapes):
    for unet, channels in ((fk.MAIN, 5), (fk.REF, 4)):
        sd = {k: torch.empty(s, device="meta") for k, s in mapped(file_shapes, unet).items()
              if not fk.is_ref_attention_key(k)}
        config = comfy.model_detection.model_config_from_unet(sd, "")
        assert type(config) is comfy.supported_models.SD15, unet
        assert config.unet_config["in_channels"] == channels


@pytest.mark.parametrize("key", [
    "model.diffusion_model.input_blocks.0.0.weight",              # an ordinary SD checkpoint
    "ori_encoder.1.1.blocks.0.self_attn.self_attn_first.q.weight",  # the encoder has no reference attention
    "ref_decoder.3.1.blocks.0.self_attn.self_attn_first.q.weight",  # nor does the reference decoder
    "ori_encoder.12.0.layer1.0.weight",                           # no such block in SD1.5
    "ori_decoder.2.1.conv.weight",                                # ComfyUI name inside a FlashFace key
])
def test_unknown_keys_raise(key):
    with pytest.raises(fk.UnknownKeyError, match="not a FlashFace checkpoint key"):
        fk.map_key(key)


def test_module_is_pure():
    code = "import sys, guidance.flashface_keys; assert not {'torch', 'comfy'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_cli_prints_one_line_per_target(file_shapes):
    proc = subprocess.run([sys.executable, "-m", "guidance.flashface_keys", KEYS_FILE],
                          cwd=REPO, capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 736 + 686 + 774
    expected = []
    for key in file_shapes:  # file order, main before ref
        expected += [f"{key}\t{u}:{c}" for u, c in fk.map_key(key)] or [f"{key}\tDROP"]
    assert lines == expected
    for line in ("time_embedding.0.weight\tmain:time_embed.0.weight",
                 "time_embedding.0.weight\tref:time_embed.0.weight",
                 "ori_encoder.0.weight\tmain:input_blocks.0.0.weight",
                 "ref_encoder.3.weight\tref:input_blocks.3.0.op.weight",
                 "ori_middle.1.blocks.0.self_attn.q.weight\tmain:middle_block.1.transformer_blocks.0.attn1.to_q.weight",
                 "ori_middle.1.blocks.0.self_attn.q.weight\tref:middle_block.1.transformer_blocks.0.attn1.to_q.weight",
                 "ori_decoder.3.1.blocks.0.self_attn.self_attn_first.o.bias"
                 "\tmain:output_blocks.3.1.transformer_blocks.0.flashface_ref_attn.to_out.0.bias",
                 "ori_decoder.5.2.1.weight\tmain:output_blocks.5.2.conv.weight",
                 "ref_decoder.9.0.shortcut.weight\tref:output_blocks.9.0.skip_connection.weight",
                 "ori_decoder.0.0.embedding.1.bias\tmain:output_blocks.0.0.emb_layers.1.bias",
                 "head.2.weight\tref:out.2.weight",
                 "ref_middle.1.blocks.0.self_attn.q.weight\tDROP",
                 "encoder.0.weight\tDROP"):
        assert line in lines


def test_cli_skips_comments_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# a comment\n\nhead.0.weight\t(320,)\n  \nref_middle.0.layer1.0.bias\n")
    proc = subprocess.run([sys.executable, "-m", "guidance.flashface_keys", str(good)],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == ["head.0.weight\tmain:out.0.weight", "head.0.weight\tref:out.0.weight",
                                        "ref_middle.0.layer1.0.bias\tDROP"]
    bad = tmp_path / "bad.txt"
    bad.write_text("head.0.weight\t(320,)\nmodel.diffusion_model.out.0.weight\t(320,)\n")
    proc = subprocess.run([sys.executable, "-m", "guidance.flashface_keys", str(bad)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "model.diffusion_model.out.0.weight" in proc.stderr and "not FlashFace checkpoint keys" in proc.stderr
