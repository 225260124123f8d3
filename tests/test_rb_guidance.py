"""RB-Guidance inside real ComfyUI sampling (guidance/rb_guidance.py) on the tiny SD1.5/SDXL/FLUX models.

Models and VAEs are built under torch.inference_mode(), as every ComfyUI node builds them, so their
weights are inference tensors exactly as in a real workflow.
"""
import pytest
import torch

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
from comfy_extras.nodes_model_advanced import ModelSamplingSD3

import harness  # noqa: F401
from helpers import identity_tokens, random_adapter
from idportrait.guidance import ip_adapter as IP
from idportrait.guidance import patching as P
from idportrait.guidance.rb_guidance import energy as rb
from idportrait.guidance import rb_guidance as RG
from idportrait.guidance.differentiable import comfy_training_mode
from idportrait.stand_ins import models as tm

SIZE = 16            # latent side; images are 8x


IMG = SIZE * 8


def _models(family, seed=0):
    with torch.inference_mode():
        return tm.tiny_model(family, seed), tm.tiny_vae(family)


def _image(seed, n=1, size=IMG):
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


def _box(x0, y0, x1, y1, size=IMG):
    m = torch.zeros(1, size, size)
    m[:, y0:y1, x0:x1] = 1.0
    return m


REF_MASK = _box(16, 16, 112, 112)
LEFT, RIGHT = _box(0, 0, IMG // 2, IMG), _box(IMG // 2, 0, IMG, IMG)


def _sigmas(model, family, steps):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"),
                                           "simple" if family == "flux" else "normal", steps)


def _run(guider, model, family, steps=4, seed=0, sampler="euler", cfg=4.0):
    guider.set_conds(tm.tiny_conditioning(family, 1), tm.tiny_conditioning(family, 2))
    guider.set_cfg(cfg)
    lat = torch.zeros(1, tm.latent_channels(family), SIZE, SIZE)
    noise = comfy.sample.prepare_noise(lat, seed)
    with torch.inference_mode():   # ComfyUI samples inside inference mode
        return guider.sample(noise, lat, comfy.samplers.sampler_object(sampler), _sigmas(model, family, steps),
                             seed=seed, disable_pbar=True)


def _rb(model, vae, identities, apply=True, **settings):
    return RG.RBGuider(model, identities, vae, RG.RBSettings(**settings), apply_guidance=apply)


def _ident(ref_seed=5, **kw):
    kw.setdefault("reference_mask", REF_MASK)
    return RG.RBIdentity(_image(ref_seed), **kw)


# --------------------------------------------------------------------------------------------------
# inference tensors, in-place ops, truncation
# --------------------------------------------------------------------------------------------------

def _full_forward(model, family, x, t):
    dm = model.model.diffusion_model
    ctx = tm.tiny_conditioning(family, 1)[0][0]
    kw = {}
    if family == "flux":
        kw = {"y": torch.zeros(1, tm.TEXT_WIDTH, dtype=x.dtype), "guidance": torch.tensor([3.5], dtype=x.dtype)}
    elif family == "sdxl":
        kw = {"y": torch.zeros(1, tm.TEXT_WIDTH + tm.SDXL_ADM_EXTRA, dtype=x.dtype)}
    return dm(x, t, context=ctx.to(x.dtype), transformer_options={}, **kw)


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_autograd_through_inference_weights_and_in_place_blocks(family):
    """What ComfyUI gives us: inference-tensor weights, and blocks that update tensors in place.

    Plain autograd fails on both; inside GradPass the gradient is right (central differences in float64)
    and the model is left exactly as it was.
    """
    with torch.inference_mode():
        model = tm.tiny_model(family, 0)
    dm = model.model.diffusion_model
    assert all(p.is_inference() for p in dm.parameters())
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tm.latent_channels(family), 8, 8, generator=g)
    t = torch.tensor([0.5 if family == "flux" else 500.0])
    with torch.no_grad():
        w = torch.randn(_full_forward(model, family, x, t).shape, generator=g)
    with torch.inference_mode(False), torch.enable_grad():
        z = x.clone().requires_grad_(True)
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            _full_forward(model, family, z, t)
        with RG.GradPass():
            out = _full_forward(model, family, z, t)
        (grad,) = torch.autograd.grad((out * w).sum(), z)
    assert all(p.is_inference() for p in dm.parameters())
    assert all(torch.equal(before[k], v) for k, v in dm.state_dict().items())
    # central differences of the same function in float64 (a normal-tensor copy of the model)
    with torch.inference_mode(False):
        m64 = tm.tiny_model(family, 0)
    m64.model.diffusion_model.double()
    d = torch.randn(x.shape, generator=g, dtype=torch.float64)
    eps = 1e-4
    # (comfy_training_mode: current ComfyUI's fused FLUX RoPE has no float64 kernel; its torch path is the same math)
    with torch.no_grad(), comfy_training_mode():
        f = lambda v: (_full_forward(m64, family, v, t.double()) * w.double()).sum()   # noqa: E731
        fd = (f(x.double() + eps * d) - f(x.double() - eps * d)) / (2 * eps)
    torch.testing.assert_close((grad.double() * d).sum(), fd, rtol=2e-3, atol=1e-5)


def test_feature_points_resolve_to_dift_layers_and_fail_clearly():
    def meta_model(cfg):
        cfg.set_inference_dtype(torch.float16, None)
        with torch.device("meta"):   # full-size architectures without allocating weights
            m = cfg.get_model({}, "")
        return comfy.model_patcher.ModelPatcher(m, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    sd15, sdxl = meta_model(tm.FULL_SIZE["sd15"]()), meta_model(tm.FULL_SIZE["sdxl"]())   # the real architectures
    # DIFT up_ft_index=1 on SD1.5 = output of output_blocks.5 = input of output_blocks.6; SDXL's 1/16 point = .2
    assert RG.resolve_feature_point(sd15) == RG.FeaturePoint("sd15", "up:1", output_index=6)
    assert RG.resolve_feature_point(sdxl) == RG.FeaturePoint("sdxl", "up:0", output_index=3)
    assert RG.resolve_feature_point(sd15, "up:0").output_index == 3
    assert RG.mask_grid(sd15, (64, 64)) == (16, 16) and RG.mask_grid(sdxl, (128, 128)) == (32, 32)   # the paper's 16x16
    tiny = tm.tiny_model("sd15")
    assert RG.resolve_feature_point(tiny) == RG.FeaturePoint("sd15", "mid", output_index=0)   # latent/2 = middle
    assert RG.resolve_feature_point(tiny, "UP:0").output_index == 2
    assert RG.resolve_feature_point(tm.tiny_model("flux")).block == ("double", 1)
    assert RG.resolve_feature_point(tm.tiny_model("flux"), "single:1").block == ("single", 1)
    for model, spec, words in [(tiny, "double:0", "FLUX points"), (sd15, "up:3", "no upsampler"),
                               (tm.tiny_model("flux"), "up:1", "UNet points"), (tm.tiny_model("flux"), "single:2", "single:1")]:
        with pytest.raises(RG.FeaturePointError, match=words):
            RG.resolve_feature_point(model, spec)


@pytest.mark.parametrize("family,point", [("sd15", "mid"), ("sd15", "up:0"), ("sdxl", "auto"), ("flux", "double:0"),
                                          ("flux", "single:0")])
def test_truncated_forward_stops_at_the_feature_point_with_the_full_forwards_features(family, point):
    model, vae = _models(family)
    seen = []

    class Watch(P.Injector):
        """Notes every block that runs, and whether it ran inside one of the guider's own passes."""
        kinds = ("attn1", "double", "single")

        def attn1(self, ctx, out, **kw):
            seen.append((ctx.key, RG.CAPTURE_KEY in ctx.transformer_options))
            return out

        def double_block(self, ctx, args, call, **kw):
            seen.append(((ctx.kind, ctx.key[1]), RG.CAPTURE_KEY in (args.get("transformer_options") or {})))
            return call(args)
        single_block = double_block

    watched = P.apply_injector(model, Watch())
    guider = _rb(watched, vae, [_ident(region_mask=LEFT)], p=8.5, u=0.9, feature_point=point)
    fp = guider.point
    _run(guider, watched, family, steps=3)
    ours = {k for k, in_pass in seen if in_pass}
    theirs = {k for k, in_pass in seen if not in_pass}
    if fp.is_flux:
        order = [("double", i) for i in range(len(model.model.diffusion_model.double_blocks))] + \
                [("single", i) for i in range(len(model.model.diffusion_model.single_blocks))]
        cut = order.index(fp.block)
        assert ours == set(order[:cut + 1]) and theirs == set(order)
    else:
        assert all(k[0] != "output" or k[1] < fp.output_index for k in ours)
        assert ours and any(k[0] == "output" and k[1] >= fp.output_index for k in theirs)

    # the captured tensor is the very tensor a full forward computes at that point
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tm.latent_channels(family), SIZE, SIZE, generator=g)
    t = torch.tensor([0.5 if family == "flux" else 300.0])
    ctx = tm.tiny_conditioning(family, 1)[0][0]
    dm = model.model.diffusion_model
    full, cap = {}, RG.capture._Capture(fp, 1)
    with torch.no_grad():
        if fp.is_flux:
            class Keep(P.Injector):
                kinds = ("double", "single")

                def double_block(self, ctx_, args, call, **kw):
                    res = call(args)
                    if (ctx_.kind, ctx_.key[1]) == fp.block:
                        full["f"] = (res["img"] if ctx_.kind == "double" else res["img"][:, ctx_.txt_len:]).clone()
                    return res
                single_block = double_block

            def options(m, **extra):
                to = {**m.model_options["transformer_options"], "cond_or_uncond": [0], "sigmas": t, **extra}
                to[P.SHAPE_KEY], to[P.MODEL_KEY] = tuple(x.shape), dm   # what the layer's model wrapper records
                return to
            kw = {"y": torch.zeros(1, tm.TEXT_WIDTH), "guidance": torch.tensor([3.5])}
            dm(x, t, context=ctx, transformer_options=options(P.apply_injector(model, Keep())), **kw)
            with pytest.raises(RG._FeatureReady):
                dm(x, t, context=ctx, transformer_options=options(P.apply_injector(model, RG.RBInjector()),
                                                                  **{RG.CAPTURE_KEY: cap}), **kw)
            assert torch.equal(cap.features, full["f"].transpose(1, 2).reshape(1, -1, SIZE // 2, SIZE // 2))
        else:
            def keep(hh, hsp, to):
                if to["block"] == ("output", fp.output_index):
                    full["f"] = hh.clone()
                return hh, hsp
            kw = {"y": torch.zeros(1, tm.TEXT_WIDTH + tm.SDXL_ADM_EXTRA)} if family == "sdxl" else {}
            dm(x, t, context=ctx, transformer_options={"patches": {"output_block_patch": [keep]}}, **kw)
            with pytest.raises(RG._FeatureReady):
                dm(x, t, context=ctx, transformer_options={
                    "patches": {"output_block_patch": [RG.capture._StopAtOutputBlock(fp.output_index)]}, RG.CAPTURE_KEY: cap}, **kw)
            assert torch.equal(cap.features, full["f"])


# --------------------------------------------------------------------------------------------------
# acceptance: bit-identity, energy decrease, multi-identity, errors
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", tm.FAMILIES)
def test_p_zero_or_no_step_in_window_is_bit_identical_to_the_plain_sampler(family):
    model, vae = _models(family)
    plain = _run(comfy.samplers.CFGGuider(model), model, family)
    ident = [_ident(region_mask=LEFT)]
    p0 = _rb(model, vae, ident, p=0.0, u=1.0)
    assert torch.equal(_run(p0, model, family), plain)
    assert p0.trace and not any(s.guided for s in p0.trace)
    never = _rb(model, vae, ident, p=8.5, u=0.0)    # every step has t > uT
    assert torch.equal(_run(never, model, family), plain)
    assert not any(s.guided for s in never.trace)
    # and the window really is where guidance happens: u = 0.6 guides the late steps only, and changes the result
    late = _rb(model, vae, ident, p=8.5, u=0.6)
    out = _run(late, model, family)
    flags = [s.guided for s in late.trace]
    assert flags[0] is False and flags[-1] is True and flags == sorted(flags)
    window = RG.guided_sigma_window(model, 0.6)
    assert all((s.sigma <= window * (1 + 1e-6)) == s.guided for s in late.trace)
    assert not torch.equal(out, plain)


def _energies(model, vae, family, apply, scale=1.0, steps=8, sampler="euler"):
    g = _rb(model, vae, [_ident(region_mask=_box(24, 8, 120, 104))], p=8.5, u=0.6, scale=scale, apply=apply)
    _run(g, model, family, steps=steps, sampler=sampler)
    return torch.tensor([s.energy[0, 0].item() for s in g.trace if s.guided])


@pytest.mark.parametrize("case", ["sd15-eps", "sd15-flow", "flux-flow"])
def test_guidance_decreases_energy_over_the_guided_steps(case):
    family, param = case.split("-")
    model, vae = _models(family)
    if family == "sd15" and param == "flow":
        model = ModelSamplingSD3().patch(model, 3.0)[0]   # same UNet, CONST (flow) parameterisation
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.CONST) == (param == "flow")
    free = _energies(model, vae, family, apply=False)
    guided = _energies(model, vae, family, apply=True)
    assert len(free) >= 3 and guided[0] == free[0]      # same start: the first guided step sees the same z_t
    assert torch.all(guided[1:] < free[1:]), (guided - free).tolist()
    # the sign matters: following +grad E instead raises the energy (so this test can fail)
    wrong = _energies(model, vae, family, apply=True, scale=-1.0)
    assert torch.all(wrong[1:] > free[1:]), (wrong - free).tolist()


@pytest.mark.parametrize("old", [False, True])
def test_comfy_training_flag_is_on_only_in_the_gradient_pass_and_restored_after_success_and_error(monkeypatch, old):
    """Current ComfyUI takes its differentiable FLUX kernels only while model_management.in_training is set.

    The guider sets it for its own gradient forward only (the sampler's plain steps keep the fused kernels)
    and puts back the value it found, also when the guided step raises. 0.3.75 has no such flag: there
    the same contract is checked on a flag the test adds (the pack must never create it itself).
    """
    import comfy.model_management as mm
    native = hasattr(mm, "in_training")
    if not native:
        run_plain = _models("flux")
        assert not hasattr(mm, "in_training")       # a guided run on 0.3.75 does not invent the flag
        _run(_rb(*run_plain, [_ident(region_mask=LEFT)], p=8.5, u=1.0), run_plain[0], "flux", steps=2)
        assert not hasattr(mm, "in_training")
    monkeypatch.setattr(mm, "in_training", old, raising=False)
    model, vae = _models("flux")
    seen, fail = [], []

    def double_0(args, extra):        # a foreign block patch: the pack chains it, it runs in every forward
        seen.append((torch.is_grad_enabled(), mm.in_training))
        if fail and torch.is_grad_enabled():
            raise RuntimeError("boom in the gradient pass")
        return extra["original_block"](args)

    m = model.clone()
    m.set_model_patch_replace(double_0, "dit", "double_block", 0)
    _run(_rb(m, vae, [_ident(region_mask=LEFT)], p=8.5, u=1.0), m, "flux", steps=3)
    grad_calls = [flag for grad, flag in seen if grad]
    plain_calls = [flag for grad, flag in seen if not grad]
    assert len(grad_calls) == 3 and grad_calls == [True] * 3          # one gradient forward per guided step
    assert plain_calls and plain_calls == [old] * len(plain_calls)     # reference pass and plain CFG as found
    assert mm.in_training is old

    seen.clear()
    fail.append(True)
    with pytest.raises(RuntimeError, match="boom in the gradient pass"):
        _run(_rb(m, vae, [_ident(region_mask=LEFT)], p=8.5, u=1.0), m, "flux", steps=3)
    assert [flag for grad, flag in seen if grad] == [True]
    assert mm.in_training is old


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_two_identities_each_region_depends_only_on_its_own_reference(family):
    model, vae = _models(family)
    ms = model.get_model_object("model_sampling")
    sig = _sigmas(model, family, 4)
    # u so that exactly the last step is guided: the output then differs from plain CFG only by that step
    u = next(v / 100 for v in range(1, 100) if float(ms.percent_to_sigma(1 - v / 100)) >= float(sig[-2]))

    def run(ref_b_seed):
        ids = [RG.RBIdentity(_image(5), reference_mask=REF_MASK, region_mask=LEFT),
               RG.RBIdentity(_image(ref_b_seed), reference_mask=REF_MASK, region_mask=RIGHT)]
        # mean: a pull strong enough on these tiny faces to move the sampled output above float rounding
        g = _rb(model, vae, ids, p=8.5, u=u, match="cosine", reduction="mean")
        g.record_grads = True
        out = _run(g, model, family)
        steps = [s for s in g.trace if s.guided]
        assert len(steps) == 1
        return out, steps[0].grad

    out1, g1 = run(6)
    out2, g2 = run(7)        # only identity B's reference changes
    half = SIZE // 2
    assert torch.equal(g1[..., :half], g2[..., :half]) and torch.equal(out1[..., :half], out2[..., :half])
    assert not torch.equal(g1[..., half:], g2[..., half:]) and not torch.equal(out1[..., half:], out2[..., half:])
    assert (g1[..., :half] != 0).any() and (g1[..., half:] != 0).any()
    # background gradient masking: with one identity in a box, the gradient is exactly zero outside it
    g = _rb(model, vae, [RG.RBIdentity(_image(5), reference_mask=REF_MASK, region_mask=_box(32, 32, 96, 96))], p=8.5, u=u)
    g.record_grads = True
    _run(g, model, family)
    grad = [s for s in g.trace if s.guided][0].grad
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[4:12, 4:12] = True
    assert torch.all(grad[..., ~inside] == 0) and (grad[..., inside] != 0).any()


def _eq7_to_10_by_hand(z, feats, ref_feat, gen_cells, ref_cells, p):
    """Eq. 7-10 written out point by point (float64, explicit sums): for every reference face point its nearest
    generated face point by Euclidean distance (Eq. 7), S = Σ (cos + 1) / 2 over the reference points (Eq. 8,
    the matches lie in M_gen: Eq. 9), E = p / (1 + S) (Eq. 10) and dE/dz_t."""
    gen, ref = feats[0].double(), ref_feat[0].double()
    s, matches, cos_matches = 0.0, [], []
    for (ri, rj) in ref_cells:
        r = ref[:, ri, rj]
        dist = [torch.sqrt(((r - gen[:, gi, gj]) ** 2).sum()).item() for gi, gj in gen_cells]
        best = min(range(len(dist)), key=lambda k: (dist[k], k))
        gv = gen[:, gen_cells[best][0], gen_cells[best][1]]
        cos = (r * gv).sum() / torch.sqrt((r * r).sum()) / torch.sqrt((gv * gv).sum())
        s = s + (cos + 1) / 2
        matches.append(gen_cells[best])
        cosines = [((r * gen[:, gi, gj]).sum() / r.norm() / gen[:, gi, gj].norm()).item() for gi, gj in gen_cells]
        cos_matches.append(gen_cells[max(range(len(cosines)), key=lambda k: (cosines[k], -k))])
    e = p / (1 + s)
    (grad,) = torch.autograd.grad(e, z, retain_graph=True)
    return s, e, grad, matches, cos_matches


def test_guided_step_with_sum_and_euclidean_is_eq_7_to_10_by_hand(monkeypatch):
    """The defaults are Eq. 7-8 as written: on the features the guider recorded at its first guided step,
    S, E, the matches and the background-masked gradient equal the equations computed by hand."""
    model, vae = _models("sd15")
    seen = {}
    real = rb.rb_energy_grad_from_features

    def spy(z, feats, guides, **kw):
        out = None
        if not seen:   # the hand computation first: the guider's own backward frees the graph
            g = guides[0]
            seen["hand"] = _eq7_to_10_by_hand(z, feats, g.ref_feat, GEN_CELLS, REF_CELLS, kw["p"])
            seen["kw"] = kw
            out = real(z, feats, guides, **kw)
            seen["out"] = out
        return out if out is not None else real(z, feats, guides, **kw)
    monkeypatch.setattr(RG.guider.energy, "rb_energy_grad_from_features", spy)
    # SD1.5 'auto' = up:1, at 1/16 of the 128 px image: an 8x8 grid. Region box 32..96 px = cells 2..5,
    # reference mask 16..112 px = cells 1..6 (exactly, so no resizing judgement enters the hand computation)
    GEN_CELLS = [(i, j) for i in range(2, 6) for j in range(2, 6)]
    REF_CELLS = [(i, j) for i in range(1, 7) for j in range(1, 7)]
    g = _rb(model, vae, [_ident(region_mask=_box(32, 32, 96, 96))], p=8.5, u=0.6)
    assert (g.settings.match, g.settings.reduction) == ("euclidean", "sum")
    g.record_grads = True
    _run(g, model, "sd15", steps=4)
    step = next(s for s in g.trace if s.guided)
    s_hand, e_hand, grad_hand, matches, cos_matches = seen["hand"]
    assert seen["kw"]["match"] == "euclidean" and seen["kw"]["reduction"] == "sum"
    assert s_hand.item() > 0.5 * len(REF_CELLS)                                 # a sum over 36 points, not a mean
    torch.testing.assert_close(step.s_hat[0, 0].double(), s_hand.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(step.energy[0, 0].double(), e_hand.detach(), rtol=1e-5, atol=0)
    got = [divmod(int(i), 8) for i in seen["out"].matches[0].gen_idx[0]]
    assert got == matches
    assert matches != cos_matches          # the features here tell Eq. 7 from DIFT's cosine matching
    # Eq. 9 as the background gradient mask: dE/dz_t inside the region (latent cells 4..11), zero outside
    latent = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    latent[4:12, 4:12] = True
    want = grad_hand.float() * latent
    assert torch.all(step.grad[..., ~latent] == 0)
    torch.testing.assert_close(step.grad, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_reference_pass_once_per_run_and_guided_pass_once_per_guided_step():
    model, vae = _models("sd15")
    calls = []

    def count(executor, *args, **kwargs):
        calls.append(args[0].shape[0])
        return executor(*args, **kwargs)
    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "count", count)
    ids = [_ident(region_mask=LEFT), RG.RBIdentity(_image(6, n=2), reference_mask=REF_MASK, region_mask=RIGHT)]
    g = _rb(counted, vae, ids, p=8.5, u=0.6, ensemble=3)
    _run(g, counted, "sd15", steps=6)
    guided = sum(s.guided for s in g.trace)
    # one batched CFG call per step, one truncated call per guided step, one reference call per identity and
    # noise draw (its images in one batch: memory stays bounded and Cancel is seen between draws)
    assert len(calls) == 6 + guided + 2 * 3
    assert sorted(calls).count(2) == 6 + 3   # the CFG calls (cond + uncond) and identity 2's draws (2 images)
    g.trace.clear()
    calls.clear()
    _run(g, counted, "sd15", steps=6)        # a second run recomputes (the model may have changed device)
    assert len(calls) == 6 + guided + 2 * 3


def test_reference_pass_runs_at_t0_on_the_noised_clean_reference_latents():
    """The reference pass: the reference's latent noised to DDPM step t0 (x = z + σ_t0·ε, ε from ref_seed + k,
    one draw per ensemble member), at timestep t0 exactly, with the positive prompt."""
    model, vae = _models("sd15")
    calls = []

    def spy(executor, *args, **kwargs):
        calls.append((args[0].clone(), args[1].clone()))
        return executor(*args, **kwargs)
    spied = model.clone()
    spied.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "spy", spy)
    ident = RG.RBIdentity(_image(7, n=2), reference_mask=REF_MASK, region_mask=LEFT)
    g = _rb(spied, vae, [ident], p=8.5, u=0.6, t0=671, ensemble=2, ref_seed=3)
    _run(g, spied, "sd15", steps=4)
    ms = model.get_model_object("model_sampling")
    ref_calls = [(x, t) for x, t in calls if torch.equal(t, torch.full((2,), 671.0))]   # one per draw, 2 images each
    assert len(ref_calls) == 2
    x_ref = torch.cat([x for x, _ in ref_calls])
    sigma = ms.sigma(torch.tensor(671.0))
    with torch.no_grad():
        z = model.model.process_latent_in(vae.encode(ident.reference[..., :3]).float())
    eps = torch.randn((2,) + tuple(z.shape), generator=torch.Generator().manual_seed(3)).reshape(-1, *z.shape[1:])
    want = ms.calculate_input(sigma, z.repeat(2, 1, 1, 1) + sigma * eps)
    torch.testing.assert_close(x_ref, want, rtol=1e-4, atol=1e-5)


def test_attention_mask_from_class_token_and_from_identity_adapter():
    model, vae = _models("sd15")
    g = _rb(model, vae, [_ident(token_index=3)], p=8.5, u=0.6, normalize_mask=True)
    _run(g, model, "sd15")
    steps = [s for s in g.trace if s.guided]
    grid = RG.mask_grid(model, (SIZE, SIZE))
    assert grid == (8, 8) and all(0 < s.mask_cells[0] < 64 for s in steps)
    assert g.last_gen_masks[0].shape == (1, 8, 8)
    preview = g.gen_mask_preview((IMG, IMG))
    assert preview.shape == (1, IMG, IMG) and 0 < preview.mean() < 1
    # a token beyond the prompt is a clear error
    bad = _rb(model, vae, [_ident(token_index=200)], p=8.5, u=0.6)
    with pytest.raises(RG.RBGuidanceError, match="outside the prompt's 77 tokens"):
        _run(bad, model, "sd15")
    # no region at all, and no identity adapter on the model
    with pytest.raises(RG.RBGuidanceError, match="has no region"):
        _rb(model, vae, [_ident()], p=8.5).prepare_references()
    # with an Omni-ID/IP-Adapter identity injector on the model, M_gen comes from its attention
    for family in ("sd15", "flux"):
        model, vae = _models(family)
        with_id = P.apply_injector(model, IP.IdentityInjector(random_adapter(model, family), identity_tokens(), family, weight=1.0))
        g = _rb(with_id, vae, [_ident()], p=8.5, u=0.6, normalize_mask=True)
        plain_id = _run(comfy.samplers.CFGGuider(with_id), with_id, family)
        out = _run(g, with_id, family)
        steps = [s for s in g.trace if s.guided]
        assert steps and all(s.mask_cells[0] > 0 for s in steps)
        assert not torch.equal(out, plain_id)


def test_two_token_identities_get_eq6_masks_made_disjoint_by_argmax(monkeypatch):
    """M_gen of attention-derived identities: Eq. 6 (refine the mean cross-attention map, propagate it by
    the recorded self-attention, threshold at beta) from the maps the guider recorded, and a pixel claimed
    by both identities goes to the stronger one."""
    model, vae = _models("sd15")
    seen = []
    orig = RG.RBGuider._gen_masks

    def spy(self, record, b, latent_hw):
        out = orig(self, record, b, latent_hw)
        seen.append((record, [m.clone() for m in out]))
        return out
    monkeypatch.setattr(RG.RBGuider, "_gen_masks", spy)
    g = _rb(model, vae, [_ident(token_index=3), _ident(ref_seed=6, token_index=5)], p=8.5, u=0.6,
            normalize_mask=True)
    _run(g, model, "sd15")
    assert seen
    s = g.settings
    overlapped = False
    for record, got in seen:
        h, w = record.grid
        a_hats = []
        for k in range(2):
            cross = torch.stack(record.cross[k]).mean(0).reshape(1, h, w)
            a = rb.propagate_by_self_attention(rb.refine_mask(cross, gamma=s.gamma, alpha=s.alpha), record.qk)
            a_hats.append(rb.minmax_normalize(a))
        above = [a > s.beta for a in a_hats]
        overlapped |= bool((above[0] & above[1]).any())
        winner = torch.stack(a_hats).argmax(0)
        for k in range(2):
            assert torch.equal(got[k], (above[k] & (winner == k)).float())
        assert not bool(((got[0] > 0) & (got[1] > 0)).any())
    assert overlapped   # the argmax really had pixels to settle


def test_adapter_attention_share_is_the_joint_softmax_mass():
    """The recorded adapter map equals a direct evaluation: softmax over [text; identity] keys, mass on identity."""
    model, _ = _models("sd15")
    inj = IP.IdentityInjector(random_adapter(model, "sd15"), identity_tokens(), "sd15", weight=1.0)
    with_id = P.apply_injector(model, inj)
    key = [k for k in P.unet_block_keys(model.model.diffusion_model) if k[0] == "input"][-1]
    g = torch.Generator().manual_seed(0)
    n, d = 2, 32
    q, k = torch.randn(1, 64, n * d, generator=g), torch.randn(1, 77, n * d, generator=g)
    to = dict(with_id.model_options["transformer_options"])
    to["activations_shape"] = [1, n * d, 8, 8]
    rec = RG.capture._AttnRecord((8, 8), [("adapter", 0), ("token", 5)])
    to[RG.CAPTURE_KEY] = RG.capture._Capture(RG.FeaturePoint("sd15", "mid", 0), 1, None, rec)
    ctx = P.CallContext(kind="attn2", key=key, sigma=1.0, cond_or_uncond=[0], transformer_options=to, q=q, k=k,
                        v=k, n_heads=n)
    RG.RBInjector().attn2(ctx, torch.zeros(1, 64, n * d))
    k_ip, _ = inj.sd_kv(key, q)
    qh = q.view(1, 64, n, d).transpose(1, 2)
    lt = qh @ k.view(1, 77, n, d).transpose(1, 2).transpose(-1, -2) / d ** 0.5
    li = qh @ k_ip.view(1, -1, n, d).transpose(1, 2).transpose(-1, -2) / d ** 0.5
    joint = torch.cat([lt, li], -1).softmax(-1)
    torch.testing.assert_close(rec.cross[0][0], joint[..., 77:].sum(-1).mean(1))
    torch.testing.assert_close(rec.cross[1][0], lt.softmax(-1)[..., 5].mean(1))


def test_self_attention_propagation_equals_the_explicit_matrix_product():
    g = torch.Generator().manual_seed(0)
    b, heads, h, w, d = 2, 3, 5, 6, 8
    cross = torch.rand(b, h, w, generator=g)
    qk = [(torch.randn(b, heads, h * w, d, generator=g), torch.randn(b, heads, h * w, d, generator=g)) for _ in range(2)]
    refined = rb.refine_mask(cross)
    a_s = torch.stack([(q @ k.transpose(-1, -2) / d ** 0.5).softmax(-1).mean(1) for q, k in qk]).mean(0)
    want = rb.refined_attention_map(cross, a_s)
    torch.testing.assert_close(rb.propagate_by_self_attention(refined, qk), want, rtol=1e-5, atol=1e-6)


def test_clear_errors_no_face_empty_masks_small_region():
    model, vae = _models("sd15")
    gray = torch.full((1, IMG, IMG, 3), 0.5)
    pytest.importorskip("onnxruntime")
    with pytest.raises(RG.RBGuidanceError, match="no face found in reference image 1"):
        _rb(model, vae, [RG.RBIdentity(gray, region_mask=LEFT)], p=8.5).prepare_references()
    with pytest.raises(RG.RBGuidanceError, match="reference mask of image 1 is empty"):
        _rb(model, vae, [RG.RBIdentity(gray, reference_mask=torch.zeros(1, IMG, IMG), region_mask=LEFT)]).prepare_references()
    with pytest.raises(RG.RBGuidanceError, match="region mask is empty"):
        _rb(model, vae, [_ident(region_mask=torch.zeros(1, IMG, IMG))]).prepare_references()
    with pytest.raises(RG.RBGuidanceError, match="covers no cell"):
        _run(_rb(model, vae, [_ident(region_mask=_box(0, 0, 4, 4))], p=8.5, u=0.6), model, "sd15")
    with pytest.raises(RG.RBGuidanceError, match="too small for the 8x8 feature grid"):
        _run(_rb(model, vae, [_ident(reference_mask=_box(0, 0, 4, 4), region_mask=LEFT)], p=8.5, u=0.6), model, "sd15")
    with pytest.raises(RG.FeaturePointError, match="does not exist"):
        _rb(model, vae, [_ident(region_mask=LEFT)], feature_point="single:0")
    with pytest.raises(RG.RBGuidanceError, match="box"):
        RG.parse_box("0.5, 0.2, 0.1, 0.9")


def test_reference_mask_from_detected_face():
    pytest.importorskip("onnxruntime")
    data = pytest.importorskip("skimage.data")
    photo = torch.from_numpy(data.astronaut()).float()[None] / 255.0      # 512x512, one face
    try:
        masks = RG.detect_reference_masks(photo, "auto")
    except RG.RBGuidanceError as e:
        pytest.skip(f"face detector unavailable: {e}")
    box = RG.detect_reference_masks(photo, "box")
    assert masks.shape == (1, 512, 512) and 0.005 < masks.mean() < 0.3
    ys, xs = torch.nonzero(box[0] > 0.5, as_tuple=True)
    assert 100 < xs.float().mean() < 300 and 50 < ys.float().mean() < 250     # the astronaut's face, upper left
    assert (masks[0] * box[0]).sum() > 0.8 * masks[0].sum()


def test_class_word_token_index_with_the_real_tokenizer():
    clip = tm.tiny_clip(0)
    assert RG.find_token_index(clip, "a photo of a woman, smiling", "woman") == 5   # BOS, a, photo, of, a, woman
    assert RG.find_token_index(clip, "a man and a woman and a man", "man", occurrence=1) == 8
    with pytest.raises(RG.RBGuidanceError, match="not found"):
        RG.find_token_index(clip, "a photo of a cat", "woman")
