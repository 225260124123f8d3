"""FlashFace reference attention and guidance (guidance/flashface.py) on real ComfyUI models.

The released layout runs on a tiny checkpoint with every released key (widths / 10, context 64 so the
tiny text conditioning fits); the training-free extension on the tiny SD1.5/SDXL/FLUX stand-ins.
"""
import logging
import math

import pytest
import torch

import comfy.controlnet
import comfy.samplers
import nodes

import harness  # noqa: F401
from idportrait.guidance import flashface as FF
from idportrait.guidance import patching as P
from idportrait.guidance.run_state import Trace
from idportrait.stand_ins import models as tm
from flashface_tiny import tiny_state_dict

SIZE = 16   # latent side (128 px)


@pytest.fixture(scope="module")
def ff_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("flashface") / "tiny_flashface.ckpt"
    sd = tiny_state_dict(context=tm.TEXT_WIDTH)
    for k in sd:   # stronger reference attention, so that its effect is far above float noise
        if "self_attn_first" in k:
            sd[k] = sd[k] * 10
    torch.save(sd, str(path))
    return FF.load_flashface(str(path))


def refs(seed=0, n=2, channels=4, side=8):
    g = torch.Generator().manual_seed(seed)
    return FF.FlashFaceReferences.single(torch.randn(n, channels, side, side, generator=g))


def cond(seed, tokens=77, family="sd15"):
    return tm.tiny_conditioning(family, seed, tokens=tokens)


def run(model, steps=2, cfg=7.5, pos=None, neg=None, batch=1, sampler="euler", scheduler="normal", family="sd15",
        seed=11, denoise=1.0):
    lat = torch.zeros(batch, tm.latent_channels(family), SIZE, SIZE)
    pos = pos if pos is not None else cond(1, family=family)
    neg = neg if neg is not None else cond(2, family=family)
    return nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, {"samples": lat},
                                 denoise=denoise)[0]["samples"]


def ref_unet(model):
    return model.get_additional_models_with_key(FF.REF_UNET_KEY)[0].model.diffusion_model


def attention(q, k, v, heads):
    """Plain softmax attention, written out (independent of ComfyUI's kernels): (B, L, H·D) layout."""
    b, lq, inner = q.shape
    d = inner // heads
    split = lambda t: t.reshape(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ split(v)).transpose(1, 2).reshape(b, lq, inner)


# --- training-free extension: λ = 0 is the unpatched model -------------------------------------

@pytest.mark.parametrize("family", tm.FAMILIES)
def test_training_free_lambda_zero_is_bit_identical(family):
    m = tm.tiny_model(family, 0)
    r = refs(3, channels=tm.latent_channels(family))
    base = run(m, steps=2, cfg=4.0, family=family)
    off = FF.Guidance(lambda_feat=0.0, lambda_ref=0.0, launch=1000, lambda_before=0.85, rescale=0.0)
    assert torch.equal(run(FF.apply_training_free(m, r, off), steps=2, cfg=4.0, family=family), base)
    off_all = FF.Guidance(lambda_feat=0.0, lambda_ref=0.0, launch=500, lambda_before=0.0, rescale=0.0)
    assert torch.equal(run(FF.apply_training_free(m, r, off_all, blocks="all"), steps=2, cfg=4.0, family=family), base)
    on = FF.Guidance(lambda_feat=0.9, lambda_ref=2.0, launch=1000, lambda_before=0.85, rescale=0.0)
    changed = run(FF.apply_training_free(m, r, on), steps=2, cfg=4.0, family=family)
    assert torch.isfinite(changed).all() and not torch.allclose(changed, base)


class Capture(P.Injector):
    """Records, at one block, what the FlashFace injector applied before it saw and produced."""

    def __init__(self, key, kind, inj=None):
        super().__init__(blocks=[key])
        self.kinds, self.inj, self.seen = (kind,), inj, []

    def _record(self, ctx, out):
        self.seen.append({"base": ctx.base.clone(), "out": out.clone(), "x": ctx.x, "q": ctx.q, "k": ctx.k, "v": ctx.v,
                          "sigma": ctx.transformer_options["sigmas"].clone(),
                          "heads": ctx.n_heads, "module": ctx.module(), "key": ctx.key,
                          "feats": [f.clone() for f in self.inj.features(ctx)] if self.inj else []})
        return out

    def attn1(self, ctx, out, **kw):
        return self._record(ctx, out)

    def attn1_output(self, ctx, out, **kw):
        return self._record(ctx, out)


def faces_encoded(trace) -> int:
    """Distinct faces run through the reference net, over every reference pass the trace saw."""
    return sum(e["faces"] for e in trace.of("flashface.reference_pass"))


def test_training_free_block_computes_the_blend_of_self_and_reference_attention():
    """(1−λ)·SA(y,y) + λ·Σ w_i SA(y,[y;refs_i]) with the block's own projections (identity mixing too)."""
    m = tm.tiny_model("sd15", 0)
    r = refs(1, n=2).mix(refs(2, n=3), 0.7)
    lam = 0.6   # launch −1: two-way phase at every step, λ_before in every row
    inj_model = FF.apply_training_free(m, r, FF.Guidance(lambda_feat=0.0, lambda_ref=0.0, launch=-1, lambda_before=lam,
                                                         rescale=0.0))
    inj = FF.injector_of(inj_model)
    key = ("output", 1, 0)
    cap = Capture(key, "attn1", inj)
    run(P.apply_injector(inj_model, cap), steps=1)
    s = cap.seen[0]
    mod = s["module"]
    mixed = 0
    for w, f in zip((0.3, 0.7), s["feats"]):
        flat = f.reshape(1, -1, f.shape[-1])
        kr, vr = mod.to_k(flat).expand(s["q"].shape[0], -1, -1), mod.to_v(flat).expand(s["q"].shape[0], -1, -1)
        mixed = mixed + w * attention(s["q"], torch.cat([s["k"], kr], 1), torch.cat([s["v"], vr], 1), s["heads"])
    expected = (1 - lam) * s["base"] + lam * mixed
    assert s["feats"][0].shape[0] == 2 and s["feats"][1].shape[0] == 3
    torch.testing.assert_close(s["out"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(s["out"], s["base"])

    # The reference features themselves: norm1(x) of this block when the plain model runs on the clean
    # reference latents at this step's timestep with the negative prompt, recorded here through ComfyUI's
    # own attn1_patch on an unpatched forward (independent of the injector's recorder). Both sets run as
    # one batch of 5, as the reference pass batches them: CPU kernels round differently for other batch
    # sizes, so only the same batch can be held to float32 noise.
    sigma = s["sigma"]
    t = m.get_model_object("model_sampling").timestep(sigma.flatten()[:1])
    neg_ctx = cond(2)[0][0]
    got = []

    def rec(n, context, value, extra_options):
        if (extra_options["block"][0], extra_options["block"][1], extra_options.get("block_index", 0)) == key:
            got.append(n.clone())
        return n, context, value
    x = m.model.latent_format.process_in(torch.cat([st.latents for st in r.sets]))
    n = x.shape[0]
    with torch.no_grad():
        m.model.diffusion_model(x, t.expand(n), context=neg_ctx.expand(n, -1, -1),
                                transformer_options={"patches": {"attn1_patch": [rec]}})
    torch.testing.assert_close(torch.cat(s["feats"]), got[0], rtol=1e-5, atol=1e-6)


class BlockIO(P.Injector):
    """Applied after the training-free injector on a FLUX single block: records its input and output."""
    kinds = ("single",)

    def __init__(self, key):
        super().__init__(blocks=[key])
        self.seen = []

    def single_block(self, ctx, args, call, **kw):
        before = args["img"].clone()   # FLUX blocks update their input in place
        out = call(args)
        self.seen.append((before, out["img"].clone(), ctx.txt_len))
        return out


def test_training_free_flux_changes_image_tokens_only():
    """FLUX: reference keys/values join the joint attention of the image queries; text tokens stay exact."""
    m = tm.tiny_model("flux", 0)
    r = refs(1, channels=16)
    got = {}
    for lam in (0.0, 0.9):
        io = BlockIO(("single", 0))
        p = FF.apply_training_free(m, r, FF.Guidance(0.0, 0.0, launch=-1, lambda_before=lam, rescale=0.0))
        run(P.apply_injector(p, io), steps=1, cfg=4.0, family="flux")
        got[lam] = io.seen[0]
    (in0, out0, txt), (in1, out1, _) = got[0.0], got[0.9]
    assert torch.equal(in0, in1)                                   # same block input (double blocks untouched)
    assert torch.equal(out0[:, :txt], out1[:, :txt])               # text tokens exactly unchanged
    assert (out0[:, txt:] - out1[:, txt:]).abs().max() > 0         # image tokens see the references


class AttnCapture(P.Injector):
    """Applied BEFORE the training-free injector on a FLUX block (so it sits inside it): its attention override
    wraps the training-free one and sees the joint q, k, v and the blended output."""
    kinds = ("single",)

    def __init__(self, key):
        super().__init__(blocks=[key])
        self.seen = []

    def single_block(self, ctx, args, call, **kw):
        to = dict(args.get("transformer_options") or {})
        outer = to.get(P.OVERRIDE_KEY)

        def cap(func, q, k, v, heads, *a, **kwa):
            out = outer(func, q, k, v, heads, *a, **kwa) if outer is not None else func(q, k, v, heads, *a, **kwa)
            if not self.seen:
                self.seen.append({"q": q.clone(), "k": k.clone(), "v": v.clone(), "out": out.clone(),
                                  "txt": ctx.txt_len, "heads": heads,
                                  "feats": [tuple(x.clone() for x in f) for f in self.inj.features(ctx)]})
            return out
        to[P.OVERRIDE_KEY] = cap
        return call({**args, "transformer_options": to})


def test_training_free_flux_blend_is_exact_on_image_queries():
    """Image queries: (1−λ)·A(q, k, v) + λ·A(q, [k; k_ref], [v; v_ref]); text queries: A(q, k, v) unchanged."""
    import math
    m = tm.tiny_model("flux", 0)
    r = refs(1, n=2, channels=16)
    lam = 0.7
    key = ("single", 0)
    cap = AttnCapture(key)
    p = FF.apply_training_free(P.apply_injector(m, cap), r, FF.Guidance(0.0, 0.0, launch=-1, lambda_before=lam,
                                                                         rescale=0.0))
    cap.inj = FF.injector_of(p)
    run(p, steps=1, cfg=4.0, family="flux")
    s = cap.seen[0]
    q, k, v, t = s["q"], s["k"], s["v"], s["txt"]
    kr, vr = s["feats"][0]                                           # (N, H, L, D) per reference face
    kr = kr.transpose(0, 1).reshape(kr.shape[1], -1, kr.shape[-1])[None]
    vr = vr.transpose(0, 1).reshape(vr.shape[1], -1, vr.shape[-1])[None]

    def attend(q_, k_, v_):   # (B, H, L, D) → (B, L, H·D), written out
        w = torch.softmax(q_ @ k_.transpose(-1, -2) / math.sqrt(q_.shape[-1]), dim=-1)
        return (w @ v_).transpose(1, 2).reshape(q_.shape[0], q_.shape[2], -1)
    b = q.shape[0]
    base = attend(q, k, v)
    ref = attend(q[:, :, t:], torch.cat([k, kr.expand(b, -1, -1, -1)], 2), torch.cat([v, vr.expand(b, -1, -1, -1)], 2))
    torch.testing.assert_close(s["out"][:, :t], base[:, :t], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s["out"][:, t:], (1 - lam) * base[:, t:] + lam * ref, rtol=1e-4, atol=1e-5)
    assert (ref - base[:, t:]).abs().max() > 1e-3


def test_flashface_block_adds_both_reference_attention_terms(ff_model):
    """x += λ·Σ w_i RA(y,[y;refs_i]) + (1−λ)·RA(y,y), RA = the separate flashface_ref_attn module; λ > 1 allowed."""
    r = refs(1, n=2).mix(refs(2, n=1), 0.25)
    lam = 1.3
    patched = FF.apply_flashface(ff_model, r, FF.Guidance(lambda_feat=0.0, lambda_ref=0.0, launch=-1, lambda_before=lam,
                                                          rescale=0.0))
    key = ("output", 4, 0)
    cap = Capture(key, "attn1_output", FF.injector_of(patched))
    run(P.apply_injector(patched, cap), steps=1)
    s = cap.seen[0]
    y = s["x"]
    ra = P.transformer_block(ff_model.model.diffusion_model, key).flashface_ref_attn
    b = y.shape[0]
    with torch.no_grad():
        with_refs = sum(w * ra(y, context=torch.cat([y, f.reshape(1, -1, f.shape[-1]).expand(b, -1, -1)], 1))
                        for w, f in zip((0.75, 0.25), s["feats"]))
        expected = s["base"] + lam * with_refs + (1 - lam) * ra(y)
    torch.testing.assert_close(s["out"], expected, rtol=1e-4, atol=1e-5)


def test_flashface_lambda_zero_still_adds_self_reference_attention(ff_model):
    """λ = 0 is not 'no layer': RA(y, y) is added (released code)."""
    patched = FF.apply_flashface(ff_model, refs(), FF.Guidance(lambda_feat=0.0, lambda_ref=0.0, launch=-1,
                                                               lambda_before=0.0, rescale=0.0))
    key = ("middle", 0, 0)
    cap = Capture(key, "attn1_output")
    with Trace() as trace:
        run(P.apply_injector(patched, cap), steps=1)
    s = cap.seen[0]
    ra = P.transformer_block(ff_model.model.diffusion_model, key).flashface_ref_attn
    with torch.no_grad():
        torch.testing.assert_close(s["out"], s["base"] + ra(s["x"]), rtol=1e-4, atol=1e-5)
    assert trace.count("flashface.reference_pass") == 0   # no λ ≠ 0 row: no reference pass at all


# --- three-way guidance ------------------------------------------------------------------------

@pytest.mark.parametrize("rescale", [0.0, 0.5])
def test_three_way_guidance_equals_the_hand_combination_of_three_model_calls(ff_model, rescale):
    r = refs(4)
    # with rescale, a strong reference guidance so that std(ε_y)/std(ε_out) is far from 1 on the tiny model
    g, c, lam, denoise = 7.5, (60.0 if rescale else 3.2), 1.2, 0.3
    pos, neg = cond(1), cond(2)
    # one Euler step to σ = 0 returns the model's denoised prediction itself; denoise 0.3 starts at a σ
    # where the prediction is not dominated by the noisy input
    m3 = FF.apply_flashface(ff_model, r, FF.Guidance(lam, c, launch=1000, lambda_before=0.85, rescale=rescale))
    seen = {}

    def post_cfg(args):   # after our three-way pre-CFG step: the step's input x and σ
        seen.update(x=args["input"].clone(), sigma=args["sigma"].clone())
        return args["denoised"]
    m3.set_model_sampler_post_cfg_function(post_cfg)
    three = run(m3, steps=1, cfg=g, pos=pos, neg=neg, denoise=denoise)

    def single(lambda_row, positive):   # cfg 1: ComfyUI runs only the cond row; launch −1: λ_before on it
        m = FF.apply_flashface(ff_model, r, FF.Guidance(0.0, 0.0, launch=-1, lambda_before=lambda_row, rescale=0.0))
        return run(m, steps=1, cfg=1.0, pos=positive, neg=neg, denoise=denoise)

    y_ref, y, u = single(lam, pos), single(0.0, pos), single(0.0, neg)
    expected = u + g * (y - u) + c * (y_ref - y)
    if rescale:   # the released rescale, on ε, with the numerator from the cond row WITHOUT references
        lf = ff_model.model.latent_format   # samples come out of KSampler in VAE space; x and ε are in model space
        x, s = seen["x"], seen["sigma"]
        eps_out, eps_y = (x - lf.process_in(expected)) / s, (x - lf.process_in(y)) / s
        ratio = eps_y.flatten(1).std(dim=1) / (eps_out.flatten(1).std(dim=1) + 1e-12)
        eps_out = eps_out * (rescale * ratio.view(-1, 1, 1, 1) + (1 - rescale))
        rescaled = lf.process_out(x - s * eps_out)
        assert (rescaled - expected).abs().max() > 0.1 * (c * (y_ref - y)).abs().max()   # rescale matters here
        expected = rescaled
    err = (three - expected).abs().max()
    c_term = (c * (y_ref - y)).abs().max()
    assert c_term > 1e-2 * expected.abs().max()          # the reference term is far from negligible
    assert err < 1e-3 * c_term, (err, c_term)             # and the combination holds to float accuracy


@pytest.mark.parametrize("rescale", [0.0, 0.5])
def test_lambda_ref_zero_after_launch_is_two_way_cfg_of_the_lambda_feat_rows(ff_model, rescale):
    """Released ``denoise`` with classifier = 0: its two-way branch with λ_feat in BOTH rows (references on)."""
    r = refs(4)
    g, lam, denoise = 7.5, 1.2, 0.3
    pos, neg = cond(1), cond(2)
    m = FF.apply_flashface(ff_model, r, FF.Guidance(lam, 0.0, launch=1000, lambda_before=0.85, rescale=rescale))
    seen = {}

    def post_cfg(args):
        seen.update(x=args["input"].clone(), sigma=args["sigma"].clone())
        return args["denoised"]
    m.set_model_sampler_post_cfg_function(post_cfg)
    got = run(m, steps=1, cfg=g, pos=pos, neg=neg, denoise=denoise)

    def single(lambda_row, positive):   # separate model calls: cfg 1 runs the cond row only, λ_before on it
        mm = FF.apply_flashface(ff_model, r, FF.Guidance(0.0, 0.0, launch=-1, lambda_before=lambda_row, rescale=0.0))
        return run(mm, steps=1, cfg=1.0, pos=positive, neg=neg, denoise=denoise)

    y, u = single(lam, pos), single(lam, neg)
    expected = u + g * (y - u)
    if rescale:
        lf = ff_model.model.latent_format
        x, s = seen["x"], seen["sigma"]
        eps_out, eps_y = (x - lf.process_in(expected)) / s, (x - lf.process_in(y)) / s
        ratio = eps_y.flatten(1).std(dim=1) / (eps_out.flatten(1).std(dim=1) + 1e-12)
        expected = lf.process_out(x - s * eps_out * (rescale * ratio.view(-1, 1, 1, 1) + (1 - rescale)))
    y0, u0 = single(0.0, pos), single(0.0, neg)
    without_refs = u0 + g * (y0 - u0)               # what dropping the references (our old reading) gives
    gap = (expected - without_refs).abs().max()
    assert gap > 1e-3 * expected.abs().max()        # the two readings differ far above float noise
    err = (got - expected).abs().max()
    assert err < 1e-2 * gap, (err, gap)


def test_reference_row_counts_as_cond_for_other_injectors():
    """The third chunk (label 2) carries ROLES_KEY = COND: an apply_to='cond' injector acts on it too."""
    class Rows(P.Injector):
        kinds = ("attn1",)

        def __init__(self):
            super().__init__(apply_to="cond", blocks=[("output", 1, 0)])
            self.seen = []

        def attn1(self, ctx, out, **kw):
            self.seen.append((list(ctx.cond_or_uncond), ctx.rows.tolist()))
            return out

    rows = Rows()
    m = FF.apply_training_free(tm.tiny_model("sd15", 0), refs(), FF.Guidance(launch=1000))
    run(P.apply_injector(m, rows), steps=1)
    labels, mask = rows.seen[0]
    assert sorted(labels) == [0, 1, 2]
    assert mask == [lab in (0, 2) for lab in labels]


def test_cfg_rescale_matches_the_released_formula():
    g = torch.Generator().manual_seed(0)
    x, y, final = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([3.0, 3.0])
    got = FF.rescale_cfg(final, y, x, sigma, 0.5)
    eps_y, eps_out = (x - y) / 3.0, (x - final) / 3.0      # ComfyUI denoised → ε
    ratio = (eps_y.flatten(1).std(dim=1) / (eps_out.flatten(1).std(dim=1) + 1e-12)).view(-1, 1, 1, 1)
    want = x - 3.0 * (eps_out * (0.5 * ratio + 0.5))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(FF.rescale_cfg(final, y, x, sigma, 0.0), final)


def test_three_way_step_rescales_against_the_cond_row_without_references():
    """The MODEL path's pre-CFG step itself: rows with very different spreads, so the numerator's row is visible."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    y, u, y_ref = (torch.randn(1, 4, 8, 8, generator=g) * s for s in (0.5, 2.0, 1.0))
    sigma = torch.tensor([2.0])
    guidance = FF.Guidance(1.2, 3.2, launch=1000, lambda_before=0.85, rescale=0.5)
    out = FF.as_cfg_pair(FF.three_way(y, u, y_ref, x, sigma, 7.5, guidance), u, 7.5)
    final = out[1] + 7.5 * (out[0] - out[1])            # what ComfyUI's CFG makes of the returned pair
    want = FF.rescale_cfg(u + 7.5 * (y - u) + 3.2 * (y_ref - y), y, x, sigma, 0.5)
    torch.testing.assert_close(final, want)
    wrong = FF.rescale_cfg(u + 7.5 * (y - u) + 3.2 * (y_ref - y), u, x, sigma, 0.5)
    assert (want - wrong).abs().max() > 0.1


def test_ddim_simple_reproduces_the_released_trailing_timesteps():
    ms = tm.tiny_model("sd15").get_model_object("model_sampling")
    for steps in (25, 50):
        sigmas = comfy.samplers.calculate_sigmas(ms, FF.RELEASED["scheduler"], steps)
        released = torch.arange(999, -1, -1000 / steps)          # discretization='trailing'
        assert torch.equal(ms.timestep(sigmas[:-1]).float(), released)
        assert [FF.timestep_1000(ms, float(s)) for s in sigmas[:2]] == [999.0, 999.0 - 1000 / steps]


# --- the reference pass ------------------------------------------------------------------------

def test_reference_pass_runs_once_per_step_whatever_the_batch(ff_model):
    r = refs(5, n=3)
    latents = r.sets[0].latents
    ms = ff_model.get_model_object("model_sampling")
    ref_calls, main_calls = [], []
    h1 = ref_unet(ff_model).register_forward_pre_hook(
        lambda mod, a, kw: ref_calls.append((a[0].clone(), a[1].clone(), kw["context"].clone())), with_kwargs=True)
    h2 = ff_model.model.diffusion_model.register_forward_pre_hook(lambda mod, a: main_calls.append(a[0].shape[0]))
    neg_split = cond(2, tokens=79)   # 77 vs 79 tokens cannot be batched: ComfyUI splits cond and uncond
    try:
        for batch, neg in ((1, cond(2)), (2, cond(2)), (1, neg_split)):
            ref_calls.clear(), main_calls.clear()
            m = FF.apply_flashface(ff_model, r, FF.Guidance(launch=500))
            with Trace() as trace:
                run(m, steps=3, cfg=7.5, batch=batch, neg=neg)
            assert len(ref_calls) == 3 and trace.count("flashface.reference_pass") == 3, (batch, len(ref_calls))
            assert len(main_calls) == (6 if neg is neg_split else 3)
            sig = comfy.samplers.calculate_sigmas(ms, "normal", 3)[:3]
            for (x, t, ctx), s in zip(ref_calls, sig):
                torch.testing.assert_close(x, ff_model.model.latent_format.process_in(latents))   # clean, no noise
                assert torch.equal(t, ms.timestep(s).float().expand(3))
                torch.testing.assert_close(ctx, neg[0][0].expand(3, -1, -1))                   # negative prompt
        assert sorted(set(main_calls)) == [1, 2]   # split batches: uncond alone, cond and reference rows together
    finally:
        h1.remove(), h2.remove()


def test_repeated_faces_are_encoded_once_and_give_the_same_image(ff_model, monkeypatch):
    """Padding one face to the released 4 (or sharing a face between identity sets) runs the reference
    net on the distinct faces only; the features are repeated, so the image is that of 4 real passes."""
    one = refs(7, n=1)
    two = refs(8, n=2)
    mixed = FF.FlashFaceReferences((FF.ReferenceSet(one.padded(4).sets[0].latents, 0.5),
                                    FF.ReferenceSet(torch.cat([two.sets[0].latents, one.sets[0].latents]), 0.5)))
    g = FF.Guidance(launch=1000)
    sizes = []
    h = ref_unet(ff_model).register_forward_pre_hook(lambda mod, a: sizes.append(a[0].shape[0]))
    try:
        for r, distinct in ((one.padded(4), 1), (mixed, 3)):
            sizes.clear()
            m = FF.apply_flashface(ff_model, r, g)
            with Trace() as trace:
                got = run(m, steps=2)
            assert sizes == [distinct, distinct] and faces_encoded(trace) == 2 * distinct
            with monkeypatch.context() as mp:   # every face through the reference net, as the released code does
                mp.setattr(FF.attention, "_unique_faces", lambda batch: (batch, None))
                sizes.clear()
                want = run(FF.apply_flashface(ff_model, r, g), steps=2)
                assert sizes == [sum(s.latents.shape[0] for s in r.sets)] * 2
            assert not torch.equal(want, run(FF.apply_flashface(ff_model, refs(9, n=4), g), steps=2))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    finally:
        h.remove()


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_training_free_repeated_faces_are_encoded_once(family, monkeypatch):
    """Same in the training-free mode, where FLUX records (k, v) pairs per face."""
    m = tm.tiny_model(family, 0)
    r = refs(4, n=1, channels=tm.latent_channels(family)).padded(3)
    g = FF.Guidance(lambda_feat=0.9, lambda_ref=2.0, launch=1000, lambda_before=0.85, rescale=0.0)
    patched = FF.apply_training_free(m, r, g, blocks="all")
    with Trace() as trace:
        got = run(patched, steps=2, cfg=4.0, family=family)
    assert faces_encoded(trace) == 2   # one face, two steps
    monkeypatch.setattr(FF.attention, "_unique_faces", lambda batch: (batch, None))
    every = FF.apply_training_free(m, r, g, blocks="all")
    with Trace() as trace:
        want = run(every, steps=2, cfg=4.0, family=family)
    assert faces_encoded(trace) == 6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_reference_pass_outside_a_sampler_uses_the_calls_own_context(ff_model):
    """A direct model call (no sampler run to read the negative prompt from) takes the uncond row's context."""
    import comfy.model_management as mm
    m = FF.apply_flashface(ff_model, refs(), FF.Guidance(launch=-1))
    mm.load_models_gpu([m])
    seen = []
    h = ref_unet(ff_model).register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["context"].clone()),
                                                     with_kwargs=True)
    ctx = torch.cat([cond(1)[0][0], cond(2)[0][0]])
    sigma = torch.tensor([2.0, 2.0])
    # what a sampler's prepare step puts in transformer_options, minus the run itself
    to = {**m.model_options["transformer_options"], "wrappers": m.wrappers, "sigmas": sigma, "cond_or_uncond": [0, 1]}
    try:
        with Trace() as trace:
            out = m.model.apply_model(torch.randn(2, 4, SIZE, SIZE), sigma, c_crossattn=ctx, transformer_options=to)
    finally:
        h.remove()
    assert torch.isfinite(out).all() and trace.count("flashface.reference_pass") == 1
    assert [r.scope for r in trace.runs] == ["call"] and "idportrait_run" not in m.model_options["transformer_options"]
    torch.testing.assert_close(seen[0], ctx[1:2].expand(2, -1, -1))


def test_reference_pass_falls_back_to_smaller_batches_when_memory_runs_out(ff_model, caplog):
    r = refs(6, n=4)
    g = FF.Guidance(launch=1000)
    want = run(FF.apply_flashface(ff_model, r, g), steps=2)

    def limited(mod, args):
        if args[0].shape[0] > 1:
            raise torch.OutOfMemoryError("test: pretend the reference batch does not fit")

    h = ref_unet(ff_model).register_forward_pre_hook(limited)
    try:
        with caplog.at_level(logging.WARNING):
            got = run(FF.apply_flashface(ff_model, r, g), steps=2)
        assert "out of memory" in caplog.text
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    finally:
        h.remove()

    def never(mod, args):
        raise torch.OutOfMemoryError("test: nothing fits")

    h = ref_unet(ff_model).register_forward_pre_hook(never)
    try:
        with pytest.raises(FF.FlashFaceMemoryError, match="one reference face at a time.*fewer or smaller references"):
            run(FF.apply_flashface(ff_model, r, g), steps=1)
    finally:
        h.remove()


# --- face position mask ------------------------------------------------------------------------

def test_face_mask_is_the_fifth_channel_of_the_first_conv(ff_model):
    seen = []
    conv = ff_model.model.diffusion_model.input_blocks[0][0]
    h = conv.register_forward_pre_hook(lambda mod, a: seen.append(a[0].clone()))
    # released construction at 128x128 px: box (32, 16, 64, 48) px, side max(64−32, 48−16) = 32 from (32, 16)
    want = torch.zeros(SIZE, SIZE)
    want[2:6, 4:8] = 1.0
    mask_img = torch.zeros(1, SIZE * 8, SIZE * 8)
    mask_img[:, 40:80, 16:60] = 1.0
    try:
        cases = [({"box": (0.25, 0.125, 0.5, 0.375)}, want), ({"box": (0, 0, 0, 0)}, torch.zeros(SIZE, SIZE)),
                 ({"mask": mask_img}, mask_img[0, ::8, ::8])]
        for kw, expected in cases:
            seen.clear()
            run(FF.apply_flashface(ff_model, refs(), FF.Guidance(launch=500), **kw), steps=2, batch=2)
            assert seen and all(x.shape[1] == 5 for x in seen)
            for x in seen:
                assert torch.equal(x[:, 4], expected.expand(x.shape[0], -1, -1)), kw
        # a concat tensor that the conditioning already carries (noise_concat) is kept
        seen.clear()
        own = torch.full((1, 1, SIZE, SIZE), 0.5)
        pos, neg = ([[c[0][0], {**c[0][1], "noise_concat": own}]] for c in (cond(1), cond(2)))
        run(FF.apply_flashface(ff_model, refs(), FF.Guidance(launch=500), box=(0.25, 0.125, 0.5, 0.375)), steps=1,
            pos=pos, neg=neg)
        assert all(torch.equal(x[:, 4], own[0, 0].expand(x.shape[0], -1, -1)) for x in seen)
    finally:
        h.remove()
    # the loader's MODEL alone (no apply) gets the all-zero mask: a plain KSampler works on it
    seen.clear()
    h = conv.register_forward_pre_hook(lambda mod, a: seen.append(a[0].clone()))
    try:
        out = run(ff_model, steps=1)
    finally:
        h.remove()
    assert torch.isfinite(out).all() and all(torch.equal(x[:, 4], torch.zeros_like(x[:, 4])) for x in seen)


# Every face box of the released demo and notebook (ali-vilab/FlashFace@fff0f078, demo_gradio.py and
# inference.ipynb), at the released 768 px, with its mask worked out by hand: pixels int(v·768), a square of side
# max(x2−x1, y2−y1) from (x1, y1), then the latent cells i with 8·i inside the square's rows (j: columns).
RELEASED_BOXES = [
    # box                    x1, y1, x2, y2 px      side                  latent rows, cols (inclusive)
    ((0.3, 0.1, 0.6, 0.4),   (230, 76, 460, 307),   231,   # max(230, 231): rows 76..306  cols 230..460
     (10, 38), (29, 57)),
    ((0.3, 0.2, 0.6, 0.5),   (230, 153, 460, 384),  231,   # max(230, 231): rows 153..383 cols 230..460
     (20, 47), (29, 57)),
    ((0.3, 0.2, 0.6, 0.6),   (230, 153, 460, 460),  307,   # max(230, 307): rows 153..459 cols 230..536
     (20, 57), (29, 67)),
    ((0.1, 0.1, 0.5, 0.5),   (76, 76, 384, 384),    308,   # max(308, 308): rows 76..383  cols 76..383
     (10, 47), (10, 47)),
]


@pytest.mark.parametrize("box,px,side,rows,cols", RELEASED_BOXES, ids=[str(b[0]) for b in RELEASED_BOXES])
def test_face_position_mask_of_every_released_box(box, px, side, rows, cols):
    m = FF.face_position_mask(box, (96, 96))
    want = torch.zeros(96, 96)
    want[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = 1
    assert torch.equal(m, want)
    assert int(m[:, cols[0]].sum()) == rows[1] - rows[0] + 1   # e.g. 29 cells = 231 px, not the old 384 px


def test_face_position_mask_no_box_and_errors():
    assert torch.equal(FF.face_position_mask((0.0, 0.0, 0.0, 0.0), (96, 96)), torch.zeros(96, 96))   # notebook
    assert torch.equal(FF.face_position_mask(None, (8, 8)), torch.zeros(8, 8))
    with pytest.raises(FF.FlashFaceError, match="0, 0, 0, 0 for no position constraint"):
        FF.face_position_mask((0.6, 0.2, 0.3, 0.5), (8, 8))


# --- identity mixing ---------------------------------------------------------------------------

def test_identity_mixing_weight_one_zero_equals_the_first_set_alone(ff_model):
    a, b = refs(7), refs(8, n=3)
    g = FF.Guidance(launch=1000)
    only_a = run(FF.apply_flashface(ff_model, a, g))
    only_b = run(FF.apply_flashface(ff_model, b, g))
    assert torch.equal(run(FF.apply_flashface(ff_model, a.mix(b, 0.0), g)), only_a)
    assert torch.equal(run(FF.apply_flashface(ff_model, a.mix(b, 1.0), g)), only_b)
    half = run(FF.apply_flashface(ff_model, a.mix(b, 0.5), g))
    assert not torch.allclose(half, only_a) and not torch.allclose(half, only_b)


# --- errors ------------------------------------------------------------------------------------

def test_clear_errors(ff_model):
    with pytest.raises(FF.FlashFaceError, match="not FlashFace's.*FlashFace Loader"):
        FF.apply_flashface(tm.tiny_model("sd15"), refs(), FF.Guidance())
    with pytest.raises(FF.FlashFaceError, match="FlashFace Apply"):
        FF.apply_training_free(ff_model, refs(), FF.Guidance())
    with pytest.raises(FF.FlashFaceError, match="no reference faces.*Encode References"):
        FF.FlashFaceReferences(())
    with pytest.raises(FF.FlashFaceError, match="empty"):
        FF.FlashFaceReferences.single(torch.zeros(0, 4, 8, 8))
    with pytest.raises(FF.FlashFaceError, match="16 latent channels.*this model's VAE"):
        FF.apply_flashface(ff_model, refs(channels=16), FF.Guidance())
    once = FF.apply_flashface(ff_model, refs(), FF.Guidance())
    with pytest.raises(FF.FlashFaceError, match="already has FlashFace.*Mix References"):
        FF.apply_flashface(once, refs(), FF.Guidance())
    with pytest.raises(FF.FlashFaceError, match="face box"):
        FF.apply_flashface(ff_model, refs(), FF.Guidance(), box=(0.5, 0.5, 0.2, 0.9))


# --- ControlNet chained with the released layout ------------------------------------------------

def test_flashface_three_way_with_a_controlnet(ff_model):
    """A ControlNet (ComfyUI's classes, built for the FlashFace UNet's shape) applied by ComfyUI's own node
    function: the three condition chunks are batched with their control and the result changes."""
    import comfy.cldm.cldm
    import comfy.model_management as mm
    import comfy.ops
    cfg = FF.sd15_unet_config(32, tm.TEXT_WIDTH, 4)
    cfg.pop("out_channels")
    cfg.update(hint_channels=3, num_heads=8, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    net = tm.randomize_(comfy.cldm.cldm.ControlNet(**cfg), 5, std=0.05)
    cn = comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device(), manual_cast_dtype=None)
    hint = torch.rand(1, SIZE * 8, SIZE * 8, 3, generator=torch.Generator().manual_seed(0))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(cond(1), cond(2), cn, hint, 0.9, 0.0, 1.0)
    m = FF.apply_flashface(ff_model, refs(), FF.Guidance(launch=1000))
    batches = []
    h = ff_model.model.diffusion_model.register_forward_pre_hook(
        lambda mod, a, kw: batches.append((a[0].shape[0], kw.get("control") is not None)), with_kwargs=True)
    try:
        with_cn = run(m, steps=2, pos=pos, neg=neg)
    finally:
        h.remove()
    assert batches == [(3, True), (3, True)]   # cond, uncond and reference rows in one call, with control
    assert torch.isfinite(with_cn).all() and not torch.allclose(with_cn, run(m, steps=2))
