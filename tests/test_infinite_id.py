"""Infinite-ID's identity/text decoupling (guidance/infinite_id.py, nodes/infinite_id.py) on real ComfyUI models."""
import collections
import math
import os

import pytest
import torch

import nodes

import harness
from helpers import Recorder, identity_tokens, latest_latent, random_adapter, workflow, write_weights
from idportrait.guidance import infinite_id as I
from idportrait.guidance import patching as P
from idportrait.guidance import rows
from idportrait.guidance.run_state import Trace
from idportrait.nodes import infinite_id as NI
from idportrait.guidance import omni_id as OM
from idportrait.stand_ins import models as tm

BOTH = "text + identity streams"


def stream_calls(trace) -> collections.Counter:
    """Model calls of the two streams by kind: coupled / text / identity / identity_skipped (opt-in trace)."""
    return collections.Counter(e["kind"] for e in trace.of("infinite_id.call"))


def probes(trace) -> list:
    """(kind, block key, recorded tensors) of every mixed attention / merge the trace saw."""
    return [(name.split(".", 1)[1], data["key"], data) for name, data in trace.events
            if name in ("infinite_id.attn1", "infinite_id.attn2", "infinite_id.flux")]


def sample(model, family, pos=1, neg=2, steps=3, cfg=4.0, seed=11, size=16, batch=1, sampler="euler"):
    lat = torch.zeros(batch, tm.latent_channels(family), size, size)
    return nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", tm.tiny_conditioning(family, pos),
                                 tm.tiny_conditioning(family, neg), {"samples": lat})[0]["samples"]


# ---------------------------------------------------------------------------------------------------
# The math on constructed tensors


def test_adain_mean_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 12.0]])     # 3 tokens, 2 channels: means (3, 6)
    y = torch.tensor([[10.0, 0.0], [20.0, 2.0]])                 # 2 tokens: means (15, 1)
    want = torch.tensor([[13.0, -3.0], [15.0, -1.0], [17.0, 7.0]])   # x - (3, 6) + (15, 1)
    assert torch.equal(I.adain_mean(x, y), want)
    # batched (B, L, C) and per-head (B, H, L, d) layouts: means over tokens only, per row and channel
    xb = torch.stack([x, 2 * x])
    yb = torch.stack([torch.cat([y, y]), torch.zeros(4, 2)])
    assert torch.equal(I.adain_mean(xb, yb), torch.stack([want, 2 * x - torch.tensor([6.0, 12.0])]))
    x4 = x.T.reshape(1, 2, 3, 1)          # 2 heads of width 1, 3 tokens
    y4 = y.T.reshape(1, 2, 2, 1)
    assert torch.equal(I.adain_mean(x4, y4).reshape(2, 3).T, want)


def test_mixed_kv_and_weighted_mixed_attention_by_hand():
    g = torch.Generator().manual_seed(0)
    k_t, v_t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    k_id, v_id = torch.randn(2, 3, 8, generator=g) + 4.0, torch.randn(2, 3, 8, generator=g) - 2.0
    k, v = I.mixed_kv(k_t, v_t, k_id, v_id, adain=True)
    assert k.shape == v.shape == (2, 3 + 5, 8)                      # L_id + L_t
    assert torch.equal(k[:, 3:], k_t) and torch.equal(v[:, 3:], v_t)
    torch.testing.assert_close(k[:, :3].mean(1), k_t.mean(1))       # identity half carries the text means
    torch.testing.assert_close(v[:, :3].mean(1), v_t.mean(1))
    torch.testing.assert_close(k[:, :3] - k[:, :3].mean(1, keepdim=True), k_id - k_id.mean(1, keepdim=True))
    k0, _ = I.mixed_kv(k_t, v_t, k_id, v_id, adain=False)
    assert torch.equal(k0[:, :3], k_id)

    # weight w multiplies the attention mass on identity keys: softmax(qk/sqrt(d) + [log w, 0]) v, by hand
    q = torch.randn(2, 4, 8, generator=g)
    heads, w = 2, 0.3
    out = I.attend_sd(q, k, v, heads, {}, I.identity_bias(3, 8, w, k))
    qh, kh, vh = (t.view(2, -1, heads, 4).transpose(1, 2) for t in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) / 2.0
    p = logits.exp()
    p[..., :3] *= w
    want = ((p / p.sum(-1, keepdim=True)) @ vh).transpose(1, 2).reshape(2, 4, 8)
    torch.testing.assert_close(out, want)
    assert I.identity_bias(3, 8, 1.0, k) is None                    # w = 1: the paper's plain concatenation
    torch.testing.assert_close(I.attend_sd(q, k, v, heads, {}), I.attend_sd(q, k, v, heads, {}, torch.zeros(1, 1, 1, 8)))


def test_block_selection_parsing():
    keys = I.all_block_keys(tm.tiny_model("sd15"))
    assert I.parse_blocks("all", keys) is None and I.parse_blocks("none", keys) == set()
    out = I.parse_blocks("output", keys)
    assert out and all(k[0] == "output" for k in out)
    one = I.parse_blocks("middle, input_1", keys)
    assert one == {k for k in keys if k[0] == "middle" or (k[0] == "input" and k[1] == 1)}
    ranged = I.parse_blocks("output_0-3", keys)
    assert ranged == {k for k in keys if k[0] == "output" and k[1] <= 3}
    exact = keys[-1]
    assert I.parse_blocks(f"{exact[0]}_{exact[1]}_{exact[2]}", keys) == {exact}
    fkeys = I.all_block_keys(tm.tiny_model("flux"))
    assert I.parse_blocks("double, single_1", fkeys) == {("double", 0), ("double", 1), ("single", 1)}
    for bad in ("decoder", "input_99", "double_7"):
        with pytest.raises(ValueError, match="block"):
            I.parse_blocks(bad, fkeys if bad.startswith("double") else keys)


# ---------------------------------------------------------------------------------------------------
# Sampling on the tiny SD1.5 / SDXL / FLUX stand-ins


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_identity_part_removed_is_bit_identical_to_the_plain_text_stream(family):
    m = tm.tiny_model(family, 0)
    a = random_adapter(m, family)
    plain = sample(m, family)
    # weight 0 (mixed attention and merge): no identity stream is run at all
    off = I.apply_infinite_id(m, a, identity_tokens(), mix_weight=0.0, merge_weight=0.0)
    assert torch.equal(sample(off, family), plain)
    # a window that holds no step: the identity stream runs every step (kept in the output to prove it),
    # but the text stream never meets it, and comes out bit-identical
    outside = I.apply_infinite_id(m, a, identity_tokens(), start_percent=0.37, end_percent=0.37, output=BOTH)
    with Trace() as trace:
        got = sample(outside, family)
    calls = stream_calls(trace)
    assert got.shape[0] == 2 and calls["identity"] == 3 and calls["coupled"] == 0
    assert torch.equal(got[:1], plain)
    assert not torch.equal(got[1:], plain)             # the identity stream is a different image
    # and the identity part switched on changes the text stream (the test can fail)
    on = I.apply_infinite_id(m, a, identity_tokens(), merge_weight=0.0)
    with Trace() as trace:
        assert not torch.allclose(sample(on, family), plain)
    assert stream_calls(trace)["coupled"] == 3


def test_window_runs_streams_coupled_only_inside_and_drops_the_identity_stream_after():
    m = tm.tiny_model("sd15", 0)
    a = random_adapter(m, "sd15")
    p = I.apply_infinite_id(m, a, identity_tokens(), start_percent=0.3, end_percent=0.6)
    with Trace() as trace:
        sample(p, "sd15", steps=5)
    c = stream_calls(trace)
    assert c["coupled"] > 0 and c["text"] > 0 and c["identity"] > 0 and c["identity_skipped"] > 0
    assert c["coupled"] + c["text"] == 5 and c["identity"] + c["identity_skipped"] == c["text"]


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_identity_stream_ignores_the_prompt_and_depends_on_the_identity(family):
    m = tm.tiny_model(family, 0)
    a = random_adapter(m, family)
    p = I.apply_infinite_id(m, a, identity_tokens(), output=BOTH)
    one = sample(p, family, pos=1, neg=2, batch=2, steps=2)
    other = sample(p, family, pos=5, neg=6, batch=2, steps=2)
    assert one.shape[0] == 4                              # 2 text rows, then 2 identity rows
    assert torch.equal(one[2:], other[2:])                # the prompt does not reach the identity stream
    assert not torch.allclose(one[:2], other[:2])         # ... but does reach the text stream
    another_id = sample(I.apply_infinite_id(m, a, identity_tokens(seed=9), output=BOTH), family, batch=2, steps=2)
    assert not torch.allclose(another_id[2:], one[2:])   # the identity does reach it


class _Probe(P.Injector):
    """Stacked after Infinite-ID: sees its output (out) and the stock attention (ctx.base) per block call."""
    kinds = ("attn1", "attn2")

    def __init__(self):
        super().__init__()
        self.seen = []

    def attn1(self, ctx, out, **kw):
        self.seen.append((ctx.kind, ctx.key, rows.stream_layout(ctx.transformer_options), ctx.base.clone(), out.clone(),
                          tuple(ctx.cond_or_uncond), ctx.q.clone()))
        return out

    attn2 = attn1


def test_text_stream_meets_identity_only_through_mixed_attention_and_merge():
    m = tm.tiny_model("sd15", 0)
    a = random_adapter(m, "sd15")
    keys = P.unet_block_keys(m.model.diffusion_model)
    mixed = {k for k in keys if k[0] == "output"}
    w_id = 0.8
    inj_model = I.apply_infinite_id(m, a, identity_tokens(), identity_weight=w_id, merge_weight=0.0, blocks="output")
    probe = _Probe()
    sample(P.apply_injector(inj_model, probe), "sd15", steps=2)
    inj = I.injector_of(inj_model)
    coupled = [s for s in probe.seen if s[2] == (("text", 1), ("identity", 1))]
    assert len(coupled) == 2 * 2 * len(keys)              # every attn1/attn2 call of both steps
    n_mixed = 0
    for kind, key, _, base, out, cou, q in coupled:
        text = [c * 2 for c in range(len(cou))]           # per chunk: row 0 text, row 1 identity
        ident = [c * 2 + 1 for c in range(len(cou))]
        if kind == "attn2":
            # text rows: the stock text cross-attention, nothing added (merge off)
            assert torch.equal(out[text], base[text])
            # identity rows: no text at all; cond rows carry exactly w * Attn(Q, K_ip, V_ip), uncond rows nothing
            k_ip, v_ip = inj.identity.sd_kv(key, q)
            heads = P.unet_attention_module(m.model.diffusion_model, key, "attn2").heads
            for c, r in zip(cou, ident):
                if c == P.UNCOND:
                    assert torch.count_nonzero(out[r]) == 0
                else:
                    want = w_id * I.attend_sd(q[r:r + 1], k_ip, v_ip, heads, {})
                    torch.testing.assert_close(out[r:r + 1], want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out[ident], base[ident])   # identity stream's own self-attention
            if key in mixed:
                cond_text = [t for c, t in zip(cou, text) if c == P.COND]
                assert not torch.allclose(out[cond_text], base[cond_text])
                n_mixed += 1
            else:
                assert torch.equal(out[text], base[text])
    assert n_mixed == 2 * len(mixed)


def test_merge_is_the_adapters_image_attention_with_the_merge_weight():
    """Mixed attention off, merge w: the text stream is the identity adapter applied with weight w."""
    from idportrait.guidance import ip_adapter as IP
    m = tm.tiny_model("sd15", 0)
    a = random_adapter(m, "sd15")
    merged = sample(I.apply_infinite_id(m, a, identity_tokens(), mix_weight=0.0, merge_weight=0.6), "sd15")
    adapter = sample(P.apply_injector(m, IP.IdentityInjector(a, identity_tokens(), "unet", weight=0.6, apply_to="cond")), "sd15")
    torch.testing.assert_close(merged, adapter, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged, sample(m, "sd15"))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_mixed_attention_keys_values_length_and_adain_means(family):
    m = tm.tiny_model(family, 0)
    a = random_adapter(m, family)
    p = I.apply_infinite_id(m, a, identity_tokens(), adain="mixed attention", merge_weight=0.0)
    with Trace() as trace:
        sample(p, family, steps=1, size=16)
    seen = probes(trace)
    assert seen
    for kind, key, info in seen:
        k, v, n_id = info["k"], info["v"], info["n_id"]
        if family == "flux":   # (b, heads, L, d): identity image tokens, then all text-stream tokens
            assert n_id == 8 * 8 and k.shape[2] == n_id + info["k_t_img"].shape[2] + tm.tiny_conditioning("flux")[0][0].shape[1]
            torch.testing.assert_close(k[:, :, :n_id].mean(2), info["k_t_img"].mean(2), rtol=1e-4, atol=1e-5)
        else:                  # (b, L, C): L_id + L_t, both the block's token grid
            assert k.shape[1] == v.shape[1] == n_id + info["k_t"].shape[1] and n_id == info["k_t"].shape[1]
            torch.testing.assert_close(k[:, :n_id].mean(1), info["k_t"].mean(1), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v[:, :n_id].mean(1), info["v_t"].mean(1), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(k[:, :n_id], info["k_id"] - info["k_id"].mean(1, keepdim=True) +
                                       info["k_t"].mean(1, keepdim=True))
    assert {s[1] for s in seen} == set(I.all_block_keys(m))
    if family != "flux":   # both streams start from the same noise: equal in the first block, apart later
        assert any(not torch.allclose(i["k_id"].mean(1), i["k_t"].mean(1), atol=1e-3) for _, _, i in seen)


def test_interpolation_ends_reproduce_each_identity_and_stacking_doubles_tokens():
    m = tm.tiny_model("sd15", 0)
    name = write_weights("sd15")
    omni = OM.load_omni_id_model(os.path.join(harness.BASE_DIR, "models", "omni_id", name))
    g = torch.Generator().manual_seed(4)
    id_a = OM.Identity(torch.randn(1, 16, 32, generator=g), [1])
    id_b = OM.Identity(torch.randn(1, 16, 32, generator=g), [1])
    opts = dict(identity_weight=1.0, mixed_attention_weight=1.0, merge_weight=1.0, adain_mean="off", blocks="all",
                start_at=0.0, end_at=1.0, apply_to="cond", identity_stream_cfg=True, output=BOTH)

    def run(identity, **kw):
        patched = NI.InfiniteIDApply.execute(m, omni, identity, **{**opts, "identity_mixing": "interpolate",
                                                                   "identity_2_weight": 0.5, **kw}).result[0]
        return I.injector_of(patched), sample(patched, "sd15", steps=2)

    inj_a, lat_a = run(id_a)
    inj_b, lat_b = run(id_b)
    inj0, lat0 = run(id_a, identity_2=id_b, identity_2_weight=0.0)
    inj1, lat1 = run(id_a, identity_2=id_b, identity_2_weight=1.0)
    assert torch.equal(inj0.tokens, id_a.tokens) and torch.equal(lat0, lat_a)
    assert torch.equal(inj1.tokens, id_b.tokens) and torch.equal(lat1, lat_b)
    _, lat_half = run(id_a, identity_2=id_b, identity_2_weight=0.5)
    assert not torch.allclose(lat_half, lat_a) and not torch.allclose(lat_half, lat_b)

    def merge_keys(identity, **kw):
        patched = NI.InfiniteIDApply.execute(m, omni, identity, **{**opts, "identity_mixing": "stack",
                                                                   "identity_2_weight": 0.5, **kw}).result[0]
        with Trace() as trace:
            sample(patched, "sd15", steps=1)
        return I.injector_of(patched), [info["k"].shape for kind, _, info in probes(trace) if kind == "attn2"]

    inj_s, stacked = merge_keys(id_a, identity_2=id_b)
    _, alone = merge_keys(id_a)
    assert inj_s.tokens.shape == (1, 32, 32) and torch.equal(inj_s.tokens, torch.cat([id_a.tokens, id_b.tokens], 1))
    assert stacked and len(stacked) == len(alone)
    assert all(s[1] == 2 * o[1] == 2 * 16 for s, o in zip(stacked, alone))   # the merge attends to 2 x 16 tokens


def test_options_are_checked():
    m = tm.tiny_model("sd15", 0)
    a = random_adapter(m, "sd15")
    p = I.apply_infinite_id(m, a, identity_tokens())
    with pytest.raises(ValueError, match="already applied"):
        I.apply_infinite_id(p, a, identity_tokens())
    with pytest.raises(ValueError, match="start_percent"):
        I.apply_infinite_id(m, a, identity_tokens(), start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="unknown block"):
        I.apply_infinite_id(m, a, identity_tokens(), blocks="decoder")
    assert P.LAYER_KEY not in m.model_options.get("transformer_options", {})   # input model untouched
    assert NI.InfiniteIDApply.validate_inputs(start_at=0.7, end_at=0.2) is not True


# ---------------------------------------------------------------------------------------------------
# End-to-end workflows in real ComfyUI


def _infinite_workflow(family, omni_file, controlnet=False, **opts):
    wf = workflow(family, omni_file, controlnet=controlnet)
    wf["14"] = {"class_type": "IDP_InfiniteIDApply", "inputs": {
        "model": ["1", 0], "omni_id_model": ["10", 0], "identity": ["13", 0], "identity_weight": 1.0,
        "mixed_attention_weight": 1.0, "merge_weight": 1.0, "adain_mean": "off", "blocks": "all", "start_at": 0.0,
        "end_at": 1.0, "apply_to": "cond", "identity_stream_cfg": True, "output": "text stream",
        "identity_mixing": "interpolate", "identity_2_weight": 0.5, **opts}}
    if family == "sdxl":   # the paper's sampler settings (DDIM, CFG 5), few steps
        wf["5"]["inputs"].update(sampler_name="ddim", scheduler="ddim_uniform", cfg=5.0, steps=3)
    if family == "flux":
        wf["5"]["inputs"].update(sampler_name="dpmpp_2m", scheduler="simple", cfg=1.0)
    wf["6"]["inputs"]["filename_prefix"] = f"omni/iid_{family}"
    return wf


@pytest.mark.parametrize("family,controlnet", [("sd15", True), ("sdxl", False), ("flux", False)])
def test_infinite_id_workflow_runs_end_to_end(family, controlnet):
    name = write_weights(family)
    harness.run_workflow(_infinite_workflow(family, name, controlnet=controlnet))
    with_id = latest_latent(f"iid_{family}")
    harness.run_workflow(_infinite_workflow(family, name, controlnet=controlnet, mixed_attention_weight=0.0,
                                            merge_weight=0.0))
    without = latest_latent(f"iid_{family}")
    assert with_id.shape == without.shape and with_id.shape[0] == 1
    assert torch.isfinite(with_id).all() and not torch.equal(with_id, without)
    wf = _infinite_workflow(family, name, controlnet=controlnet, output=BOTH, adain_mean="mixed attention + merge",
                            blocks="output" if family != "flux" else "single", identity_2=["13", 0],
                            identity_mixing="stack")
    harness.run_workflow(wf)
    assert latest_latent(f"iid_{family}").shape[0] == 2


def test_node_schema_documents_paper_defaults():
    schema = NI.InfiniteIDApply.define_schema()
    assert schema.node_id.startswith("IDP_InfiniteID")
    assert all(x in schema.description for x in ("SDXL", "DDIM 30", "CFG 5"))
    assert all(getattr(i, "tooltip", None) for i in schema.inputs[3:])
    assert math.isclose(I.PAPER_DEFAULTS["cfg"], 5.0) and I.PAPER_DEFAULTS["steps"] == 30


def test_sd_mixed_attention_output_is_softmax_over_identity_and_text_keys_with_log_weight():
    """Text rows' self-attention output = softmax(q [k_id'; k_t]ᵀ/√d + [log w; 0]) [v_id'; v_t], written
    into the text rows (the identity rows keep their own attention)."""
    import math
    m = tm.tiny_model("sd15", 0)
    w = 0.6
    # a strong identity stream, so that its keys differ from the text stream's already at the first step
    p = I.apply_infinite_id(m, random_adapter(m, "sd15", scale=2.0), identity_tokens(), identity_weight=10.0, mix_weight=w,
                            adain="off", merge_weight=0.0)
    key = P.unet_block_keys(m.model.diffusion_model)[-1]   # a late block: the two streams differ there
    rec = Recorder(key)
    with Trace() as trace:
        sample(P.apply_injector(p, rec), "sd15", steps=1, size=16)
    seen = [(k, info) for _, k, info in probes(trace)]
    info = next(i for k, i in seen if k == key)
    q, k, v, heads, n_id = info["q_t"], info["k"], info["v"], info["heads"], info["n_id"]
    b, lq, inner = q.shape
    d = inner // heads
    split = lambda x: x.reshape(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    bias = torch.zeros(k.shape[1])
    bias[:n_id] = math.log(w)
    att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
    want = (att @ split(v)).transpose(1, 2).reshape(b, lq, inner)
    torch.testing.assert_close(info["mixed"], want, rtol=1e-4, atol=1e-5)
    base, out = rec.seen[0]
    t, i = info["text_rows"], info["identity_rows"]
    torch.testing.assert_close(out[t], want, rtol=1e-4, atol=1e-5)          # written into the text rows
    assert torch.equal(out[i], base[i])                                      # identity rows: own attention
    assert (want - base[t]).abs().max() > 1e-3                              # mixing changes the text rows
