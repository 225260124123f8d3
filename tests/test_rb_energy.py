"""RB-Guidance math (guidance/rb_energy.py) against the paper's equations and ComfyUI's own samplers."""
import math

import numpy as np
import pytest
import torch

import comfy.model_sampling as cms
from idportrait.guidance.rb_guidance import energy as rb

DT = torch.float64


def _np_eq6(cross, self_attn, gamma, alpha):
    """Eq. 6 evaluated directly in NumPy, one map at a time."""
    out = []
    for b in range(cross.shape[0]):
        x = cross[b].astype(np.float64)
        for _ in range(gamma):
            x = ((x - x.min()) / (x.max() - x.min())) ** alpha
        out.append(x if self_attn is None else (self_attn[b] @ x.reshape(-1)).reshape(x.shape))
    return np.stack(out)


def _softmax_rows(x):
    return torch.softmax(x, dim=-1)


# ---------------------------------------------------------------- Eq. 6 -------------------------

def test_refine_mask_matches_numpy_eq6():
    g = torch.Generator().manual_seed(0)
    cross = torch.rand(3, 8, 8, generator=g, dtype=DT) * 0.3 + 0.05  # softmax-like: min > 0
    got = rb.refine_mask(cross, gamma=3, alpha=2.0)
    want = _np_eq6(cross.numpy(), None, 3, 2.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-14)
    # later norms are identities: the result is norm(A)^(alpha^gamma)
    lo, hi = cross.amin((1, 2), keepdim=True), cross.amax((1, 2), keepdim=True)
    torch.testing.assert_close(got, ((cross - lo) / (hi - lo)) ** 8, rtol=0, atol=1e-14)
    # the other order (power first, then norm) differs when min > 0: the test tells them apart
    other = cross
    for _ in range(3):
        other = rb.minmax_normalize(other ** 2)
    assert (other - got).abs().max() > 1e-3
    # gamma and alpha really are used
    np.testing.assert_allclose(rb.refine_mask(cross, gamma=2, alpha=3.0).numpy(),
                               _np_eq6(cross.numpy(), None, 2, 3.0), atol=1e-14)


def test_refined_map_with_self_attention_matches_numpy_and_threshold():
    g = torch.Generator().manual_seed(1)
    cross = torch.rand(2, 6, 5, generator=g, dtype=DT)
    heads = _softmax_rows(torch.randn(2, 4, 30, 30, generator=g, dtype=DT) * 3)
    a_s = heads.mean(1)
    want = _np_eq6(cross.numpy(), a_s.numpy(), 3, 2.0)
    got = rb.refined_attention_map(cross, heads)  # heads are averaged
    np.testing.assert_allclose(got.numpy(), want, atol=1e-14)
    assert got.min() >= 0 and got.max() <= 1
    mask = rb.generated_face_mask(cross, heads, beta=0.5)
    np.testing.assert_array_equal(mask.numpy(), (want > 0.5).astype(np.float64))
    # without self-attention the mask is the thresholded refined cross-attention
    np.testing.assert_array_equal(rb.generated_face_mask(cross).numpy(),
                                  (_np_eq6(cross.numpy(), None, 3, 2.0) > 0.5).astype(np.float64))


def test_self_attention_grows_mask_along_structure():
    # 4x4 map, face = top-left 2x2 block. Cross-attention is weaker on one face pixel, so the
    # thresholded refined cross-attention misses it; self-attention, in which face pixels attend to
    # face pixels, brings it back, and keeps the background out.
    face = torch.zeros(4, 4, dtype=DT)
    face[:2, :2] = 1
    f = face.flatten()
    a_s = _softmax_rows(torch.where(f[:, None] == f[None, :], 4.0, 0.0).to(DT))[None]
    cross = torch.full((1, 4, 4), 0.1, dtype=DT)
    cross[0, :2, :2] = 0.9
    cross[0, 1, 1] = 0.6
    without = rb.generated_face_mask(cross)
    assert without.sum() == 3 and without[0, 1, 1] == 0
    assert torch.equal(rb.generated_face_mask(cross, a_s)[0], face)
    # one peak pixel alone holds under half of any pixel's attention: the literal rule gives an empty
    # mask, normalize=True (our opt-in safety net) still finds the face block
    peak = torch.full((1, 4, 4), 0.1, dtype=DT)
    peak[0, 0, 0] = 0.9
    assert rb.generated_face_mask(peak, a_s).sum() == 0
    assert torch.equal(rb.generated_face_mask(peak, a_s, normalize=True)[0], face)


def test_constant_map_gives_empty_mask_not_nan():
    m = rb.generated_face_mask(torch.full((1, 4, 4), 0.25))
    assert torch.equal(m, torch.zeros(1, 4, 4))


def test_resize_mask():
    m = torch.zeros(1, 4, 4)
    m[0, :2, :2] = 1
    m[0, 2, 2] = 1  # a quarter of the lower-right 2x2 cell
    small = rb.resize_mask(m, (2, 2))
    assert torch.equal(small, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    soft = rb.resize_mask(m, (2, 2), threshold=None)
    assert torch.allclose(soft, torch.tensor([[[1.0, 0.0], [0.0, 0.25]]]))
    big = rb.resize_mask(small, (8, 8))
    assert big[0, :4, :4].all() and big.sum() == 16
    assert rb.resize_mask(m.bool()[0], (4, 4)).dtype == torch.float32
    # two complementary masks stay disjoint at any size, even where each covers exactly half a cell
    left = torch.zeros(1, 6, 6)
    left[0, :, :3] = 1
    for size in ((2, 2), (4, 4), (5, 7), (16, 16)):
        a, b = rb.resize_mask(left, size), rb.resize_mask(1 - left, size)
        assert not (a.bool() & b.bool()).any(), size


# ---------------------------------------------------------------- Eq. 7-10 ----------------------

def _grid(vectors):
    """List of 4 C-vectors, row-major -> (1, C, 2, 2)."""
    return torch.tensor(vectors, dtype=DT).T.reshape(1, -1, 2, 2)


def test_hand_computed_s_hat_and_matches():
    gen = _grid([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    gen_mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])          # point 3 excluded
    ref = _grid([[1.0, 0.2], [-1.0, 0.1], [0.1, 0.12], [5.0, 5.0]])
    ref_mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])          # point 3 excluded

    def cos(a, b):
        return (a[0] * b[0] + a[1] * b[1]) / math.hypot(*a) / math.hypot(*b)

    # the defaults are Eq. 7 and Eq. 8 as written: Euclidean argmin, sum over the reference face points.
    # r0 = (1, .2) -> g0 (L2 0.2); r1 = (-1, .1) -> g1 (L2 1.35 vs g0 2.0, g2 2.19); r2 = (.1, .12) -> g1
    # (L2 0.886 vs g0 0.908, g2 1.26), though g2 has the best cosine; g3 lies outside M_gen
    m = rb.match_features(gen, ref, gen_mask, ref_mask)
    assert m.ref_idx[0].tolist() == [0, 1, 2] and m.gen_idx[0].tolist() == [0, 1, 1]
    want_e = (cos((1, .2), (1, 0)) + 1) / 2 + (cos((-1, .1), (0, 1)) + 1) / 2 + (cos((.1, .12), (0, 1)) + 1) / 2
    assert abs(m.s_hat.item() - want_e) < 1e-12
    assert m.valid.tolist() == [True]
    assert abs(rb.rb_energy(m.s_hat, p=8.5).item() - 8.5 / (1 + want_e)) < 1e-12     # Eq. 10
    # cosine matching (DIFT's own): r2 -> g2; r1 -> g1 (g3 would win but lies outside M_gen)
    mc = rb.match_features(gen, ref, gen_mask, ref_mask, match="cosine")
    assert mc.gen_idx[0].tolist() == [0, 1, 2]
    want_c = (cos((1, .2), (1, 0)) + 1) / 2 + (cos((-1, .1), (0, 1)) + 1) / 2 + (cos((.1, .12), (1, 1)) + 1) / 2
    assert abs(mc.s_hat.item() - want_c) < 1e-12
    # mean reduction: S_hat in [0, 1]
    mm = rb.match_features(gen, ref, gen_mask, ref_mask, match="cosine", reduction="mean")
    assert abs(mm.s_hat.item() - want_c / 3) < 1e-12
    me = rb.match_features(gen, ref, gen_mask, ref_mask, reduction="mean")
    assert abs(me.s_hat.item() - want_e / 3) < 1e-12
    with pytest.raises(rb.RBGuidanceError, match="match must be one of"):
        rb.match_features(gen, ref, gen_mask, ref_mask, match="l1")
    with pytest.raises(rb.RBGuidanceError, match="reduction must be one of"):
        rb.match_features(gen, ref, gen_mask, ref_mask, reduction="max")


def test_s_hat_gradient_is_exact_and_ignores_argmin():
    g = torch.Generator().manual_seed(2)
    gen = torch.randn(2, 5, 4, 4, generator=g, dtype=DT, requires_grad=True)
    ref = torch.randn(1, 5, 3, 3, generator=g, dtype=DT)
    gm = (torch.rand(2, 4, 4, generator=g) > 0.4).float()
    rm = (torch.rand(1, 3, 3, generator=g) > 0.3).float()
    torch.autograd.gradcheck(lambda x: rb.match_features(x, ref, gm, rm).s_hat, (gen,))
    # gradient flows only into matched generated points
    s = rb.match_features(gen, ref, gm, rm)
    (gr,) = torch.autograd.grad(s.s_hat.sum(), gen)
    for b in range(2):
        touched = torch.zeros(16, dtype=torch.bool)
        touched[s.gen_idx[b]] = True
        assert (gr[b].flatten(1)[:, ~touched] == 0).all()
        assert gr[b].flatten(1)[:, touched].abs().sum() > 0


def test_empty_mask_is_invalid_with_no_gradient():
    gen = torch.randn(2, 3, 4, 4, dtype=DT, requires_grad=True)
    gm = torch.ones(2, 4, 4)
    gm[1] = 0
    m = rb.match_features(gen, gen.detach(), gm, torch.ones(1, 4, 4))
    assert m.valid.tolist() == [True, False] and m.s_hat[1].item() == 0.0


# ---------------------------------------------------------------- gradient ----------------------

def _toy_feature_fn(seed=0, cin=4, cout=8):
    """A fixed random conv (+ tanh): differentiable, spatially local, at half the latent resolution."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, 3, 3, generator=g, dtype=DT) * 0.5
    return lambda z: torch.tanh(torch.nn.functional.conv2d(z, w, stride=2, padding=1))


def _box(h, w, r0, r1, c0, c1):
    m = torch.zeros(1, h, w, dtype=DT)
    m[0, r0:r1, c0:c1] = 1
    return m


def test_p_zero_gives_zero_gradient():
    f = _toy_feature_fn()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 16, 16, generator=g, dtype=DT)
    ident = rb.IdentityGuide(f(torch.randn(1, 4, 16, 16, generator=g, dtype=DT)), _box(16, 16, 4, 12, 4, 12), _box(16, 16, 2, 10, 2, 10))
    out = rb.rb_energy_grad(z, f, [ident], p=0.0)
    assert torch.equal(out.grad, torch.zeros_like(z))
    assert rb.rb_energy_grad(z, f, [ident], p=8.5).grad.abs().sum() > 0


def test_gradient_confined_to_generated_mask_and_matches_autograd():
    f = _toy_feature_fn()
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 4, 16, 16, generator=g, dtype=DT)
    ref = f(torch.randn(1, 4, 16, 16, generator=g, dtype=DT))
    gen_mask = _box(8, 8, 1, 5, 2, 6)   # given at attention (=feature) resolution, 8x8
    ident = rb.IdentityGuide(ref, _box(8, 8, 2, 6, 2, 6), gen_mask)
    out = rb.rb_energy_grad(z, f, [ident])
    latent = rb.resize_mask(gen_mask, (16, 16))[:, None].expand_as(z).bool()
    assert torch.equal(out.grad[~latent], torch.zeros_like(out.grad[~latent]))
    assert (out.grad[latent] != 0).float().mean() > 0.5
    # inside the mask it is the plain autograd gradient of sum_b E_b
    zz = z.clone().requires_grad_(True)
    feats = f(zz)
    s = rb.match_features(feats, ref, gen_mask.expand(2, 8, 8), rb.resize_mask(ident.ref_mask, (8, 8)))
    (full,) = torch.autograd.grad(rb.rb_energy(s.s_hat).sum(), zz)
    assert full[~latent].abs().sum() > 0            # the network leaks outside: masking is needed
    torch.testing.assert_close(out.grad[latent], full[latent], rtol=0, atol=0)
    torch.testing.assert_close(out.s_hat[0], s.s_hat.detach())
    torch.testing.assert_close(out.energy[0], 8.5 / (1 + s.s_hat.detach()))


def test_identical_reference_gives_max_similarity_and_vanishing_gradient():
    f = _toy_feature_fn(seed=5)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5), dtype=DT)
    mask = _box(8, 8, 2, 7, 1, 6)
    out = rb.rb_energy_grad(z, f, [rb.IdentityGuide(f(z), mask, mask)], match="cosine", reduction="mean")
    assert abs(out.s_hat.item() - 1.0) < 1e-12
    assert abs(out.energy.item() - 8.5 / 2) < 1e-11
    n = int(mask.sum())                                # sum (the default): S = N reference points at most
    out_sum = rb.rb_energy_grad(z, f, [rb.IdentityGuide(f(z), mask, mask)])
    assert abs(out_sum.s_hat.item() - n) < 1e-10 and abs(out_sum.energy.item() - 8.5 / (1 + n)) < 1e-11
    assert out.matches[0].gen_idx[0].tolist() == out.matches[0].ref_idx[0].tolist()
    assert out.grad.abs().max() < 1e-10
    # a slightly different reference gives a clearly non-zero gradient (the tolerance is meaningful)
    out2 = rb.rb_energy_grad(z, f, [rb.IdentityGuide(f(z + 0.3 * torch.randn_like(z)), mask, mask)])
    assert out2.grad.abs().max() > 1e-4


def test_two_identities_do_not_leak():
    f = _toy_feature_fn(seed=6)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(1, 4, 16, 16, generator=g, dtype=DT)
    ref1 = f(torch.randn(1, 4, 16, 16, generator=g, dtype=DT))
    ref2 = f(torch.randn(1, 4, 16, 16, generator=g, dtype=DT))
    ref_mask = _box(8, 8, 2, 6, 2, 6)
    m1, m2 = _box(8, 8, 1, 7, 0, 4), _box(8, 8, 1, 7, 4, 8)   # adjacent: receptive fields overlap
    region1 = rb.resize_mask(m1, (16, 16))[:, None].expand_as(z).bool()
    region2 = rb.resize_mask(m2, (16, 16))[:, None].expand_as(z).bool()
    outside = ~(region1 | region2)

    out = rb.rb_energy_grad(z, f, [rb.IdentityGuide(ref1, ref_mask, m1), rb.IdentityGuide(ref2, ref_mask, m2)])
    ref2b = f(torch.randn(1, 4, 16, 16, generator=g, dtype=DT))
    out_b = rb.rb_energy_grad(z, f, [rb.IdentityGuide(ref1, ref_mask, m1), rb.IdentityGuide(ref2b, ref_mask, m2)])
    assert torch.equal(out.grad[region1], out_b.grad[region1])        # bit-exact
    assert not torch.allclose(out.grad[region2], out_b.grad[region2])
    assert torch.equal(out.grad[outside], torch.zeros_like(out.grad[outside]))
    # region 1 equals identity 1 alone
    alone = rb.rb_energy_grad(z, f, [rb.IdentityGuide(ref1, ref_mask, m1)])
    assert torch.equal(out.grad[region1], alone.grad[region1])
    assert out.energy.shape == (2, 1)

    # the naive alternative (one backward of E1 + E2, masked by the union) does leak: the test can fail
    def naive(r2):
        zz = z.clone().requires_grad_(True)
        feats = f(zz)
        e = sum(rb.rb_energy(rb.match_features(feats, r, m, ref_mask).s_hat).sum() for r, m in ((ref1, m1), (r2, m2)))
        (gz,) = torch.autograd.grad(e, zz)
        return gz
    assert not torch.equal(naive(ref2)[region1], naive(ref2b)[region1])


def test_works_under_inference_mode():
    f = _toy_feature_fn(seed=7)
    with torch.inference_mode():
        z = torch.randn(1, 4, 16, 16, dtype=DT)
        ref = f(torch.randn(1, 4, 16, 16, dtype=DT))
        mask = _box(8, 8, 2, 6, 2, 6)
        out = rb.rb_energy_grad(z, f, [rb.IdentityGuide(ref, mask, mask)])
    assert out.grad.abs().sum() > 0 and not out.grad.requires_grad


def test_gradient_descent_decreases_energy():
    f = _toy_feature_fn(seed=8)
    g = torch.Generator().manual_seed(8)
    z = torch.randn(1, 4, 16, 16, generator=g, dtype=DT)
    ident = rb.IdentityGuide(f(torch.randn(1, 4, 16, 16, generator=g, dtype=DT)),
                             _box(8, 8, 2, 6, 2, 6), _box(8, 8, 1, 6, 1, 6))
    z0 = z.clone()
    energies = []
    for _ in range(30):
        out = rb.rb_energy_grad(z, f, [ident], match="cosine", reduction="mean")
        energies.append(out.energy.item())
        z = z - 2.0 * out.grad
    energies.append(rb.rb_energy_grad(z, f, [ident], match="cosine", reduction="mean").energy.item())
    assert all(b < a for a, b in zip(energies, energies[1:])), energies
    assert energies[-1] < energies[0] - 0.15, energies   # E lies in [p/2, p] = [4.25, 8.5]
    background = ~rb.resize_mask(ident.gen_mask, (16, 16))[:, None].expand_as(z).bool()
    assert torch.equal(z[background], z0[background])


# ---------------------------------------------------------------- parameterisations ------------

def _sampling(kind):
    base, pred = {"eps": (cms.ModelSamplingDiscrete, cms.EPS), "flow": (cms.ModelSamplingDiscreteFlow, cms.CONST)}[kind]
    return type("MS", (base, pred), {})()


def _energy_of(z):
    """Some smooth scalar function, standing in for E(z_t)."""
    return (torch.sin(z) * torch.linspace(-1, 1, z.numel(), dtype=z.dtype).reshape(z.shape)).sum() + (z ** 2).sum() * 0.1


def _sd_alphas_cumprod():
    """SD1.x/SDXL DDPM schedule ("scaled linear" betas), computed here independently of ComfyUI."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=DT) ** 2
    return torch.cumprod(1 - betas, dim=0)


def test_comfy_eps_input_is_the_papers_z_t():
    ms = _sampling("eps")
    abars = _sd_alphas_cumprod()
    g = torch.Generator().manual_seed(9)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=DT), torch.randn(2, 4, 8, 8, generator=g, dtype=DT)
    for t in (100, 400, 600, 900):
        abar = abars[t]
        sigma = ms.sigmas[t].to(DT)
        torch.testing.assert_close(sigma, ((1 - abar) / abar).sqrt(), rtol=1e-5, atol=0)
        x = ms.noise_scaling(sigma, eps, x0)
        z_paper = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        torch.testing.assert_close(ms.calculate_input(sigma, x), z_paper, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [150, 600])
def test_eps_guidance_to_denoised(t):
    ms = _sampling("eps")
    g = torch.Generator().manual_seed(10)
    x0, eps, grad = (torch.randn(2, 4, 8, 8, generator=g, dtype=DT) for _ in range(3))
    sigma = ms.sigmas[t].to(DT)
    abar = 1 / (1 + sigma ** 2)
    x = ms.noise_scaling(sigma, eps, x0)
    denoised = ms.calculate_denoised(sigma, eps, x)
    s = 0.7
    got = rb.eps_guidance_to_denoised(denoised, grad, sigma, s)
    # ComfyUI's own x0 for the modified noise prediction
    torch.testing.assert_close(got, ms.calculate_denoised(sigma, eps + s * grad, x), rtol=0, atol=1e-12)
    # the paper's DDIM x0 from z_t and the modified eps
    z = ms.calculate_input(sigma, x)
    torch.testing.assert_close(got, (z - (1 - abar).sqrt() * (eps + s * grad)) / abar.sqrt(), rtol=0, atol=1e-10)
    # samplers recover eps as (x - denoised) / sigma: exactly the modified eps
    torch.testing.assert_close((x - got) / sigma, eps + s * grad, rtol=0, atol=1e-10)
    # per-sample sigma (B,)
    sig_b = torch.stack([sigma, 2 * sigma])
    got_b = rb.eps_guidance_to_denoised(denoised, grad, sig_b, s)
    torch.testing.assert_close(got_b[1], denoised[1] - s * 2 * sigma * grad[1])


def test_eps_chain_rule_x_to_z():
    ms = _sampling("eps")
    sigma = ms.sigmas[500].to(DT)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11), dtype=DT, requires_grad=True)
    (gx,) = torch.autograd.grad(_energy_of(ms.calculate_input(sigma, x)), x)
    z = ms.calculate_input(sigma, x).detach().requires_grad_(True)
    (gz,) = torch.autograd.grad(_energy_of(z), z)
    torch.testing.assert_close(rb.eps_grad_x_to_z(gx, sigma), gz, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(gx, gz)


@pytest.mark.parametrize("sigma", [0.2, 0.55])
def test_flow_guidance_to_denoised(sigma):
    ms = _sampling("flow")
    sigma = torch.tensor(sigma, dtype=DT)
    g = torch.Generator().manual_seed(12)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=DT), torch.randn(2, 4, 8, 8, generator=g, dtype=DT)
    x = ms.noise_scaling(sigma, eps, x0)
    v = eps - x0
    denoised = ms.calculate_denoised(sigma, v, x)
    torch.testing.assert_close(denoised, x0)
    # gradient w.r.t. the flow x (the CONST network input) of an energy defined on the VP-equivalent z
    r = torch.sqrt((1 - sigma) ** 2 + sigma ** 2)
    xx = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(_energy_of(xx / r), xx)
    zz = (x / r).requires_grad_(True)
    (gz,) = torch.autograd.grad(_energy_of(zz), zz)
    torch.testing.assert_close(rb.flow_grad_x_to_z(gx, sigma), gz, rtol=1e-12, atol=1e-12)

    s = 1.3
    got = rb.flow_guidance_to_denoised(denoised, gx, sigma, s)
    # definition: eps' = eps + s*grad_z at the same x; x0' solves (1-sigma) x0' + sigma eps' = x
    eps_new = eps + s * gz
    x0_new = (x - sigma * eps_new) / (1 - sigma)
    torch.testing.assert_close(got, x0_new, rtol=0, atol=1e-10)
    torch.testing.assert_close(ms.noise_scaling(sigma, eps_new, got), x, rtol=0, atol=1e-10)
    # ComfyUI's denoised from the velocity the sampler would see
    v_new = eps_new - x0_new
    torch.testing.assert_close(ms.calculate_denoised(sigma, v_new, x), got, rtol=0, atol=1e-10)
    # the paper's VP formula at the SNR-equivalent state gives the same x0
    a, b = (1 - sigma) / r, sigma / r
    torch.testing.assert_close(got, (x / r - b * eps_new) / a, rtol=0, atol=1e-10)
    # equivalence with the EPS conversion at sigma_vp = sigma / (1 - sigma)
    torch.testing.assert_close(got, rb.eps_guidance_to_denoised(denoised, gz, sigma / (1 - sigma), s), rtol=0, atol=1e-12)


def test_pivotal_window():
    ms = _sampling("eps")
    assert rb.in_pivotal_window(ms.timestep(ms.sigmas[599]) / 1000)
    assert not rb.in_pivotal_window(ms.timestep(ms.sigmas[700]) / 1000)
    assert rb.in_pivotal_window(0.6) and not rb.in_pivotal_window(0.61)
