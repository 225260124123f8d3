"""Omni-ID / IP-Adapter identity injection (guidance/ip_adapter.py) on real ComfyUI models."""
import pytest
import torch


import harness  # noqa: F401
from helpers import Recorder, TOKEN_DIM, diffusers_tiny_sd15_unet, identity_tokens, random_adapter, sample
from idportrait.guidance import ip_adapter as IP
from idportrait.guidance import patching as P
from idportrait.guidance.run_state import Trace
from idportrait.stand_ins import models as tm

@pytest.mark.parametrize("family", tm.FAMILIES)
def test_weight_zero_and_outside_window_are_bit_identical(family):
    m = tm.tiny_model(family, 0)
    ref = sample(m, family)
    a = random_adapter(m, family)
    zero = P.apply_injector(m, IP.IdentityInjector(a, identity_tokens(), family, weight=0.0))
    assert torch.equal(sample(zero, family), ref)
    # a window (a single point) that contains no step of the schedule: every step is outside it
    never = IP.IdentityInjector(a, identity_tokens(), family, weight=1.0, start_percent=0.37, end_percent=0.37)
    with Trace() as trace:
        assert torch.equal(sample(P.apply_injector(m, never), family), ref)
    assert trace.count("identity.kv") == 0   # never even computed its keys/values
    on = P.apply_injector(m, IP.IdentityInjector(a, identity_tokens(), family, weight=1.0))
    assert not torch.allclose(sample(on, family), ref)


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_kv_of_identity_computed_once_per_run(family):
    m = tm.tiny_model(family, 0)
    inj = IP.IdentityInjector(random_adapter(m, family), identity_tokens(), family)
    patched = P.apply_injector(m, inj)
    dm = m.model.diffusion_model
    sites = len(dm.double_blocks) + len(dm.single_blocks) if family == "flux" else len(P.unet_block_keys(dm))
    for run in range(2):   # a second run on the same MODEL computes them afresh: nothing is kept between runs
        with Trace() as trace:
            sample(patched, family, steps=4)
        computed = [e["site"] for e in trace.of("identity.kv")]
        assert sorted(map(str, computed)) == sorted(map(str, set(computed))) and len(computed) == sites   # once per site
        assert len(trace.runs) == 1 and trace.runs[0].cleared   # the run's state is dropped when sampling ends


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_kv_in_another_dtype_leaves_the_shared_adapter_untouched(family):
    """The loader caches one adapter for every run: keys/values for a bf16 model come from a cast copy."""
    m = tm.tiny_model(family, 0)
    adapter = random_adapter(m, family)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    inj = IP.IdentityInjector(adapter, identity_tokens(), family)
    dm = m.model.diffusion_model
    key = ("double", 0) if family == "flux" else P.unet_block_keys(dm)[0]
    kv = (lambda like: inj.flux_kv("double_0", like)) if family == "flux" else (lambda like: inj.sd_kv(key, like))
    k32, v32 = kv(torch.zeros(1, dtype=torch.float32))
    k16, v16 = kv(torch.zeros(1, dtype=torch.bfloat16))
    assert k16.dtype == v16.dtype == torch.bfloat16 and k32.dtype == torch.float32
    torch.testing.assert_close(k16.float(), k32, rtol=0.05, atol=0.05 * k32.abs().max().item())
    after = adapter.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


def test_flux_query_recomputation_matches_the_blocks_own_query():
    m = tm.tiny_model("flux", 0)
    dm = m.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    img, vec = torch.randn(2, 16, dm.hidden_size, generator=g), torch.randn(2, dm.hidden_size, generator=g)
    blk = dm.double_blocks[0]
    mod1, _ = blk.img_mod(vec)
    x = (1 + mod1.scale) * blk.img_norm1(img) + mod1.shift
    q, k, v = blk.img_attn.qkv(x).view(2, 16, 3, blk.num_heads, -1).permute(2, 0, 3, 1, 4)
    q_ref, _ = blk.img_attn.norm(q, k, v)
    assert torch.allclose(IP.flux_double_query(blk, img, vec), q_ref, atol=1e-6)
    sb = dm.single_blocks[0]
    mod, _ = sb.modulation(vec)
    qkv, _ = torch.split(sb.linear1((1 + mod.scale) * sb.pre_norm(img) + mod.shift), [3 * sb.hidden_size, sb.mlp_hidden_dim_first], -1)
    q, k, v = qkv.view(2, 16, 3, sb.num_heads, -1).permute(2, 0, 3, 1, 4)
    q_ref, _ = sb.norm(q, k, v)
    assert torch.allclose(IP.flux_single_query(sb, img, vec), q_ref, atol=1e-6)


def test_flux_queries_use_the_real_timestep_half_of_a_doubled_vec():
    """Current ComfyUI doubles vec's rows ([real; zero]) for references at timestep zero; the generated
    image's queries must come from the real half (0.3.75 never doubles: the plain path is unchanged)."""
    dm = tm.tiny_model("flux", 0).model.diffusion_model
    g = torch.Generator().manual_seed(1)
    img, vec = torch.randn(2, 16, dm.hidden_size, generator=g), torch.randn(2, dm.hidden_size, generator=g)
    doubled = torch.cat([vec, torch.randn(2, dm.hidden_size, generator=g)])
    for fn, blk in ((IP.flux_double_query, dm.double_blocks[0]), (IP.flux_single_query, dm.single_blocks[0])):
        assert torch.equal(fn(blk, img, doubled), fn(blk, img, vec))
        assert not torch.allclose(fn(blk, img, doubled[2:]), fn(blk, img, vec))


def test_single_block_text_length_prefers_what_comfy_or_the_double_blocks_say():
    assert P.single_block_txt_len({"img_slice": [7, 50]}, 50) == 7
    assert P.single_block_txt_len({P.TXT_LEN_KEY: 9, P.SHAPE_KEY: (1, 16, 8, 8)}, 50) == 9
    assert P.single_block_txt_len({P.SHAPE_KEY: (1, 16, 8, 8)}, 50) == 50 - 16   # 0.3.75 without double hooks


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_region_mask_confines_the_change_to_the_region(family):
    m = tm.tiny_model(family, 0)
    size = 16
    mask = torch.zeros(1, size * 8, size * 8)
    mask[:, :, : size * 4] = 1.0          # left half of the image
    key = ("double", 0) if family == "flux" else P.unet_block_keys(m.model.diffusion_model)[0]

    class Rec2(Recorder):
        def attn1(self, ctx, out, **kw):
            return out

        def attn2(self, ctx, out, **kw):
            if ctx.key == self.key:
                self.seen.append((ctx.base.clone(), out.clone(), ctx.grid()))
            return out

    rec = Rec2(key)
    inj = IP.IdentityInjector(random_adapter(m, family), identity_tokens(), family, weight=1.0, mask=mask)
    mm = P.apply_injector(P.apply_injector(m, inj), rec)
    sample(mm, family, steps=1, size=size)
    if family == "flux":
        base_rec = Recorder(key)
        sample(P.apply_injector(m, base_rec), family, steps=1, size=size)
        h, w = size // 2, size // 2
        delta = (rec.seen[0] - base_rec.seen[0]).abs().sum(-1).view(-1, h, w)
    else:
        base, out, (h, w) = rec.seen[0]
        delta = (out - base).abs().sum(-1).view(-1, h, w)
    assert torch.all(delta[:, :, w // 2:] == 0)
    assert torch.all(delta[:, :, : w // 2] > 0)


def test_public_ip_adapter_layout_converts_and_loads():
    m = tm.tiny_model("sd15", 0)
    dm = m.model.diffusion_model
    ours = random_adapter(m, "sd15").state_dict()
    order = IP.ip_adapter_order(P.unet_block_keys(dm))
    public = {f"image_proj.proj.{i}.{p}": ours[f"image_proj.{i}.{p}"] for i in (0, 2, 3) for p in ("weight", "bias")}
    for n, key in enumerate(order):
        for kv in ("to_k_ip", "to_v_ip"):
            public[f"ip_adapter.{2 * n + 1}.{kv}.weight"] = ours[f"attn2.{IP.sd_key_name(key)}.{kv}.weight"]
    conv = IP.convert_public_ip_adapter(public, dm)
    assert conv.keys() == ours.keys() and all(torch.equal(conv[k], ours[k]) for k in conv)
    assert [k[0] for k in order] == sorted([k[0] for k in order], key=["input", "output", "middle"].index)
    with pytest.raises(ValueError, match="another architecture"):
        IP.convert_public_ip_adapter({f"ip_adapter.{2 * len(order) + 1}.to_k_ip.weight": torch.zeros(1)}, dm)
    with pytest.raises(ValueError, match="not an IP-Adapter"):
        IP.convert_public_ip_adapter({"foo.weight": torch.zeros(1)}, dm)


def test_matches_diffusers_ip_adapter_processor_on_a_tiny_sd15_unet():
    """Differential test: same weights in diffusers' UNet2DConditionModel + IPAdapterAttnProcessor2_0."""
    m = tm.tiny_model("sd15", 0)
    dm = m.model.diffusion_model
    unet = diffusers_tiny_sd15_unet(m)
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterFullImageProjection

    adapter = random_adapter(m, "sd15", scale=1.0)
    asd = adapter.state_dict()
    proj = IPAdapterFullImageProjection(TOKEN_DIM, tm.TEXT_WIDTH)
    proj.load_state_dict({"ff.net.0.proj.weight": asd["image_proj.0.weight"], "ff.net.0.proj.bias": asd["image_proj.0.bias"],
                          "ff.net.2.weight": asd["image_proj.2.weight"], "ff.net.2.bias": asd["image_proj.2.bias"],
                          "norm.weight": asd["image_proj.3.weight"], "norm.bias": asd["image_proj.3.bias"]})
    weight, n_tok = 0.7, 8
    procs, order = {}, IP.ip_adapter_order(P.unet_block_keys(dm))
    ip_layers = iter(order)
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor2_0()
            continue
        key = next(ip_layers)
        hidden = unet.get_submodule(name[: -len(".processor")]).to_q.weight.shape[0]
        p = IPAdapterAttnProcessor2_0(hidden, tm.TEXT_WIDTH, num_tokens=(n_tok,), scale=weight)
        p.to_k_ip[0].weight.data.copy_(asd[f"attn2.{IP.sd_key_name(key)}.to_k_ip.weight"])
        p.to_v_ip[0].weight.data.copy_(asd[f"attn2.{IP.sd_key_name(key)}.to_v_ip.weight"])
        procs[name] = p
    unet.set_attn_processor(procs)

    g = torch.Generator().manual_seed(9)
    x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, tm.TEXT_WIDTH, generator=g), torch.tensor([500.0, 500.0])
    tokens = identity_tokens(n=n_tok)
    with torch.no_grad():
        ip_tokens = proj(tokens).repeat(2, 1, 1)
        want = unet(x, t, encoder_hidden_states=(ctx, [ip_tokens])).sample

        patched = P.apply_injector(m, IP.IdentityInjector(adapter, tokens, "sd15", weight=weight))
        to = patched.model_options["transformer_options"]
        import copy
        to = copy.copy(to)
        to.update({"cond_or_uncond": [0, 1], "sigmas": torch.tensor([1.0, 1.0])})
        got = dm(x, t, context=ctx, transformer_options=to)
        plain = dm(x, t, context=ctx, transformer_options={})
    effect = (want - plain).abs().max()
    assert effect > 1e-4                      # the identity does something, far above the tolerance below
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert (got - want).abs().max() < effect / 100


@pytest.mark.parametrize("kind", ["double", "single"])
def test_flux_block_adds_w_times_attention_of_image_queries_to_identity_tokens(kind):
    """At the first hooked FLUX block the patched output minus the plain one is exactly
    w · softmax(q kᵀ/√D) v on the image tokens (q: the block's own pre-RoPE image query, k/v: the
    adapter's projections of the identity tokens), and exactly 0 on the text tokens."""
    import math
    m = tm.tiny_model("flux", 0)
    dm = m.model.diffusion_model
    key = (kind, 0)
    block = (dm.double_blocks if kind == "double" else dm.single_blocks)[0]
    ad = random_adapter(m, "flux", scale=0.5)
    tokens, w = identity_tokens(), 0.7

    class Capture(P.Injector):
        kinds = ("double", "single")

        def __init__(self):
            super().__init__(blocks=[key])
            self.seen = None

        def double_block(self, ctx, args, call, **kw):
            before = {k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()}   # blocks add in place
            res = call(args)
            if self.seen is None:
                self.seen = {"args": before, "out": {k: v.clone() for k, v in res.items()}, "txt_len": ctx.txt_len}
            return res

        single_block = double_block

    plain_cap, patched_cap = Capture(), Capture()
    sample(P.apply_injector(m, plain_cap), "flux", steps=1)
    inj = IP.IdentityInjector(ad, tokens, "flux", weight=w, blocks=[key])
    sample(P.apply_injector(P.apply_injector(m, inj), patched_cap), "flux", steps=1)
    a, p0, p1 = patched_cap.seen["args"], plain_cap.seen["out"]["img"], patched_cap.seen["out"]["img"]
    assert torch.equal(a["img"], plain_cap.seen["args"]["img"])   # same inputs: nothing hooked before this block
    t = 0 if kind == "double" else patched_cap.seen["txt_len"]
    img_in = a["img"][:, t:]
    q = (IP.flux_double_query(block, img_in, a["vec"]) if kind == "double"
         else IP.flux_single_query(block, img_in, a["vec"]))             # (B, H, L, D)
    B, H, L, D = q.shape
    lin = ad.blocks[f"{kind}_0"]
    k = lin.to_k_ip(tokens).view(1, -1, H, D).transpose(1, 2)
    v = lin.to_v_ip(tokens).view(1, -1, H, D).transpose(1, 2)
    want = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1) @ v).transpose(1, 2).reshape(B, L, H * D)
    delta = p1 - p0
    torch.testing.assert_close(delta[:, t:], w * want, rtol=1e-4, atol=1e-5)
    assert want.abs().max() > 1e-2
    if kind == "single":
        assert torch.equal(delta[:, :t], torch.zeros_like(delta[:, :t]))   # text tokens untouched
    else:
        assert torch.equal(patched_cap.seen["out"]["txt"], plain_cap.seen["out"]["txt"])
