"""The attention-patching layer (guidance/patching.py) on real ComfyUI SD1.5/SDXL/FLUX-shaped models."""
import copy

import pytest
import torch

import nodes

import harness  # noqa: F401
from helpers import PassThrough, Recorder, sample
from idportrait.guidance import patching as P
from idportrait.stand_ins import models as tm

FAMILIES = tm.FAMILIES


class Counter(PassThrough):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def attn1(self, ctx, out, **kw):
        self.calls.append((ctx.kind, ctx.key, ctx.sigma, tuple(ctx.cond_or_uncond)))
        assert ctx.grid()[0] * ctx.grid()[1] == ctx.q.shape[1]   # token grid matches the block's tokens
        return out

    attn2 = attn1

    def double_block(self, ctx, args, call, **kw):
        self.calls.append((ctx.kind, ctx.key, ctx.sigma, tuple(ctx.cond_or_uncond)))
        h, w = ctx.grid()
        n_img = args["img"].shape[1] if ctx.kind == "double" else args["img"].shape[1] - ctx.txt_len
        assert h * w == n_img
        return call(args)

    single_block = double_block


class Affine(P.Injector):
    """out -> a*out + b on every hook (order-sensitive when stacked)."""
    kinds = ("attn1", "attn2", "double", "single")

    def __init__(self, a, b, **kw):
        super().__init__(**kw)
        self.a, self.b = a, b

    def attn1(self, ctx, out, **kw):
        return self.a * out + self.b

    attn2 = attn1

    def double_block(self, ctx, args, call, **kw):
        res = call(args)
        return {**res, "img": self.a * res["img"] + self.b}

    single_block = double_block


def _expected_keys(model, family):
    dm = model.model.diffusion_model
    if family == "flux":
        return {("double", i) for i in range(len(dm.double_blocks))} | {("single", i) for i in range(len(dm.single_blocks))}
    return set(P.unet_block_keys(dm))


@pytest.mark.parametrize("family", FAMILIES)
def test_pass_through_on_every_block_is_bit_identical(family):
    m = tm.tiny_model(family, 0)
    ref = sample(m, family)
    patched = P.apply_injector(m, PassThrough())
    out = sample(patched, family)
    assert torch.equal(ref, out)
    # and a patch that changes something is visible (the hooks really are on the path)
    assert not torch.equal(ref, sample(P.apply_injector(m, Affine(1.5, 0.0)), family))


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_count_and_window(family):
    m = tm.tiny_model(family, 0)
    before = copy.deepcopy(m.model_options)
    ref = sample(m, family)
    everywhere = Counter()
    sample(P.apply_injector(m, everywhere), family, steps=4)
    keys = _expected_keys(m, family)
    per_step = len(keys) * (1 if family == "flux" else 2)   # UNet: attn1 + attn2 per transformer block
    assert len(everywhere.calls) == 4 * per_step
    seen = {c[1] if family != "flux" else (c[0], c[1][1]) for c in everywhere.calls}
    assert seen == {k if family != "flux" else k for k in keys}
    assert all(c[3] in ((1, 0), (0, 1)) for c in everywhere.calls)   # cond and uncond batched, labelled

    windowed = Counter(start_percent=0.3, end_percent=0.7)
    patched = P.apply_injector(m, windowed)
    sample(patched, family, steps=4)
    sigmas = sorted({c[2] for c in windowed.calls})
    all_sigmas = sorted({c[2] for c in everywhere.calls})
    assert 0 < len(sigmas) < len(all_sigmas)
    assert all(windowed.sigma_end <= s <= windowed.sigma_start for s in sigmas)
    assert all(not (windowed.sigma_end <= s <= windowed.sigma_start) for s in set(all_sigmas) - set(sigmas))
    assert len(windowed.calls) == len(sigmas) * per_step

    # the input ModelPatcher is untouched and samples exactly as before
    assert P.LAYER_KEY not in m.model_options.get("transformer_options", {})
    assert m.model_options.keys() == before.keys()
    assert m.model_options["transformer_options"].keys() == before["transformer_options"].keys()
    assert not m.get_all_wrappers(P.comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL)
    assert torch.equal(sample(m, family), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_patches_compose_in_declared_order(family):
    m = tm.tiny_model(family, 0)
    key = ("double", 0) if family == "flux" else P.unet_block_keys(m.model.diffusion_model)[0]

    def run(first, second):
        base_rec, rec = Recorder(key), Recorder(key)
        mm = P.apply_injector(m, base_rec)
        mm = P.apply_injector(P.apply_injector(mm, first), second)
        mm = P.apply_injector(mm, rec)
        sample(mm, family, steps=1)
        return base_rec.seen[0], rec.seen[0]

    base, ab = run(Affine(2.0, 0.0), Affine(1.0, 1.0))
    base2, ba = run(Affine(1.0, 1.0), Affine(2.0, 0.0))
    if family == "flux":
        # FLUX: outputs of the same block with the same inputs (first call of the first step)
        assert torch.allclose(ab, 2 * base + 1) and torch.allclose(ba, 2 * base2 + 2)
    else:
        assert torch.allclose(ab[1], 2 * ab[0] + 1) and torch.allclose(ba[1], 2 * ba[0] + 2)
    assert not torch.allclose(ab if family == "flux" else ab[1], ba if family == "flux" else ba[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_to_cond_only_leaves_uncond_rows_exact(family):
    m = tm.tiny_model(family, 0)
    key = ("double", 0) if family == "flux" else P.unet_block_keys(m.model.diffusion_model)[0]

    class Rows(Affine):
        def double_block(self, ctx, args, call, **kw):
            res = call(args)
            return {**res, "img": ctx.mix(self.a * res["img"] + self.b, res["img"])}
        single_block = double_block

    base_rec, rec = Recorder(key), Recorder(key)
    mm = P.apply_injector(P.apply_injector(P.apply_injector(m, base_rec), Rows(3.0, 1.0, apply_to="cond")), rec)
    sample(mm, family, steps=1)
    got, want_base = (rec.seen[0], base_rec.seen[0]) if family == "flux" else (rec.seen[0][1], rec.seen[0][0])
    # cond_or_uncond is [1, 0] or [0, 1]; find which half is cond from the counter
    c = Counter()
    sample(P.apply_injector(m, c), family, steps=1)
    order = c.calls[0][3]
    half = got.shape[0] // 2
    cond_rows = slice(0, half) if order[0] == 0 else slice(half, None)
    uncond_rows = slice(half, None) if order[0] == 0 else slice(0, half)
    assert torch.equal(got[uncond_rows], want_base[uncond_rows])
    assert torch.allclose(got[cond_rows], 3 * want_base[cond_rows] + 1)


def test_foreign_replace_patch_is_chained_not_dropped():
    m = tm.tiny_model("sd15", 0)
    key = P.unet_block_keys(m.model.diffusion_model)[0]
    calls = []

    def foreign(q, k, v, extra_options):
        calls.append(1)
        return P.optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    other = m.clone()
    other.set_model_attn1_replace(foreign, key[0], key[1], key[2])
    ref = sample(other, "sd15", steps=2)
    n_ref = len(calls)
    out = sample(P.apply_injector(other, PassThrough()), "sd15", steps=2)
    assert n_ref > 0 and len(calls) == 2 * n_ref
    assert torch.equal(out, ref)


def test_token_mask_resizes_to_block_grid():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0           # left half
    tmask = P.token_mask(mask, (8, 8), batch=2)
    assert tmask.shape == (1, 64, 1)
    grid = tmask.view(8, 8)
    assert torch.equal(grid[:, :4], torch.ones(8, 4)) and torch.equal(grid[:, 4:], torch.zeros(8, 4))
    pair = torch.stack([mask[0], 1 - mask[0]])
    two = P.token_mask(pair, (4, 4), batch=4, chunks=2)   # 2 latents x (cond, uncond): mask i for latent i
    assert two.shape == (4, 16, 1) and torch.equal(two[0], two[2]) and not torch.equal(two[0], two[1])
    # one mask per latent image, or one for all: anything else names the fix instead of cycling the masks
    for batch, chunks in ((6, 2), (2, 2)):
        with pytest.raises(ValueError, match="2 masks for .* latent image.*one mask, or one per latent image"):
            P.token_mask(pair, (4, 4), batch=batch, chunks=chunks)


def test_model_family_and_wrong_model_error():
    assert P.model_family(tm.tiny_model("sd15")) == "sd15"
    assert P.model_family(tm.tiny_model("sdxl")) == "sdxl"
    assert P.model_family(tm.tiny_model("flux")) == "flux"
    with pytest.raises(ValueError, match="start_percent"):
        PassThrough(start_percent=0.8, end_percent=0.2)


def test_flux_single_blocks_split_text_from_image_with_kontext_reference_tokens():
    """Kontext appends reference-image tokens after the image: single blocks must still find the text
    length the double blocks saw (the latent size alone would count the references as text)."""
    seen = []

    class TxtLen(PassThrough):
        def double_block(self, ctx, args, call, **kw):
            seen.append((ctx.kind, ctx.txt_len, args["txt"].shape[1] if ctx.kind == "double" else None))
            return call(args)

        single_block = double_block

    m = P.apply_injector(tm.tiny_model("flux", 0), TxtLen(blocks=[("double", 0), ("single", 1)]))
    pos, neg = tm.tiny_conditioning("flux", 1), tm.tiny_conditioning("flux", 2)
    ref = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    pos = [[c, {**d, "reference_latents": [ref]}] for c, d in pos]
    neg = [[c, {**d, "reference_latents": [ref]}] for c, d in neg]
    lat = torch.zeros(1, 16, 16, 16)
    nodes.common_ksampler(m, 0, 1, 4.0, "euler", "normal", pos, neg, {"samples": lat})
    txt = pos[0][0].shape[1]
    assert [s[0] for s in seen[:2]] == ["double", "single"]
    assert all(s[1] == txt for s in seen), seen
