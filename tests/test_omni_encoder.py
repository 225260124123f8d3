"""Omni-ID encoder, baselines, weight/identity files and identity mixing (plain torch, CPU).

Most tests use a narrow config (width 64): the properties tested do not depend on the width. The
paper-sized default config is run once for its output shape.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from idportrait.omni_encoder import baselines, mixing, weights
from idportrait.omni_encoder.encoder import IdentityEncoder, OmniIDConfig, OmniIDEncoder

SMALL = OmniIDConfig(token_dim=64, clip_dim=64, heads=4, tokens_per_image=257, arcface_rank=4)
T = SMALL.tokens_per_image


def small(encoder_type: str = "omni_id", **changes) -> OmniIDConfig:
    return dataclasses.replace(SMALL, encoder_type=encoder_type, **changes)


def make(encoder_type: str = "omni_id", seed: int = 0, **changes) -> IdentityEncoder:
    torch.manual_seed(seed)
    return baselines.build_encoder(small(encoder_type, **changes)).eval()


def clip_tokens(*shape, seed=1, dim=64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, T, dim, generator=g)


# --- encoder -----------------------------------------------------------------------------------------

def test_default_config_is_the_papers_and_gives_256x1280():
    cfg = OmniIDConfig()
    assert (cfg.num_queries, cfg.token_dim, cfg.num_cross_blocks, cfg.num_self_blocks, cfg.tokens_per_image) == (256, 1280, 2, 2, 257)
    torch.manual_seed(0)
    enc = OmniIDEncoder(cfg).eval()
    assert len(enc.transformer.cross_blocks) == 2 and len(enc.transformer.self_blocks) == 2
    with torch.no_grad():
        out = enc(clip_tokens(1, 2, dim=1280))
    assert out.shape == (1, 256, 1280)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("n_images", [1, 3, 8])
def test_fixed_size_output_for_any_number_of_images(n_images):
    enc = make()
    with torch.no_grad():
        out = enc(clip_tokens(2, n_images))
    assert out.shape == (2, 256, 64)
    assert torch.isfinite(out).all()
    # A single identity may be passed without the batch axis.
    with torch.no_grad():
        single = enc(clip_tokens(2, n_images)[1])
    torch.testing.assert_close(single, out[1:2], rtol=1e-5, atol=1e-5)


def test_invariant_to_image_order_but_not_to_image_content():
    enc = make()
    x = clip_tokens(2, 5)
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        ref = enc(x)
        permuted = enc(x[:, perm])
        changed = x.clone()
        changed[:, 2] = clip_tokens(2, 1, seed=7)[:, 0]
        other = enc(changed)
    torch.testing.assert_close(permuted, ref, rtol=1e-5, atol=1e-5)
    # The same tolerance must be able to tell a different image set apart.
    assert (other - ref).abs().max() > 1e-2


def test_padding_mask_gives_the_unpadded_result():
    enc = make()
    real = clip_tokens(1, 2)
    padded = torch.cat([real, 1e3 * clip_tokens(1, 2, seed=9)], dim=1)  # loud garbage in the padding
    mask = torch.tensor([[True, True, False, False]])
    with torch.no_grad():
        unpadded = enc(real)
        masked = enc(padded, mask=mask)
        unmasked = enc(padded)
    torch.testing.assert_close(masked, unpadded, rtol=1e-5, atol=1e-5)
    assert (unmasked - unpadded).abs().max() > 1e-2  # without the mask the padding does change the result

    # NaN in padding must not leak either.
    nan_padded = padded.clone()
    nan_padded[:, 2:] = float("nan")
    with torch.no_grad():
        torch.testing.assert_close(enc(nan_padded, mask=mask), unpadded, rtol=1e-5, atol=1e-5)


def test_batch_of_identities_with_different_image_counts():
    enc = make()
    a, b, c = clip_tokens(1, 2, seed=2)[0], clip_tokens(1, 4, seed=3)[0], clip_tokens(1, 1, seed=4)[0]
    with torch.no_grad():
        batched = enc([a, b, c])
        alone = torch.cat([enc(a), enc(b), enc(c)])
    assert batched.shape == (3, 256, 64)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_gradients_reach_queries_and_clip_tokens_but_not_padding():
    enc = make()
    enc.train()
    x = clip_tokens(2, 3).requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = enc(x, mask=mask)
    # A random projection: the sum of LayerNorm outputs would have a (near) zero gradient.
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * target).sum().backward()
    assert enc.queries.grad is not None and enc.queries.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad[0, :2].abs().sum() > 0 and x.grad[1].abs().sum() > 0
    assert torch.count_nonzero(x.grad[0, 2]) == 0  # the padded image has no influence
    for name, p in enc.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"


def test_invalid_inputs_are_rejected_with_a_fix():
    enc = make()
    with pytest.raises(ValueError, match="at least one True"):
        enc(clip_tokens(2, 2), mask=torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="mask has shape"):
        enc(clip_tokens(2, 2), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="257 tokens of width 64"):
        enc(torch.randn(1, 2, 16, 64))
    with pytest.raises(ValueError, match="needs CLIP image tokens"):
        enc(arcface=torch.randn(1, 512))


def test_config_round_trips_through_a_string_dict():
    cfg = small("arcface_clip", mlp_ratio=2.5, version="0.3-test")
    flat = cfg.to_dict()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in flat.items())
    assert OmniIDConfig.from_dict({**flat, "format": "omni_id", "unrelated": "x"}) == cfg
    with pytest.raises(ValueError, match="token_dim"):
        OmniIDConfig.from_dict({**flat, "token_dim": "wide"})
    with pytest.raises(ValueError, match="divisible"):
        OmniIDConfig(token_dim=64, heads=5)


# --- baselines ---------------------------------------------------------------------------------------

def test_clip_baseline_concatenates_all_tokens():
    enc = make("clip")
    assert isinstance(enc, baselines.CLIPTokensEncoder) and sum(p.numel() for p in enc.parameters()) == 0
    x = clip_tokens(2, 3)
    out = enc(clip_tokens=x)
    assert out.shape == (2, 3 * 257, 64) == (2, enc.num_output_tokens(3), enc.output_dim)
    assert torch.equal(out[:, 257:514], x[:, 1])
    tokens, token_mask = enc.encode(clip_tokens=[x[0, :1], x[1]])
    assert tokens.shape == (2, 3 * 257, 64)
    assert token_mask.shape == (2, 3 * 257) and token_mask[0].sum() == 257 and token_mask[1].all()
    assert torch.count_nonzero(tokens[0, 257:]) == 0


def test_arcface_baseline_shapes_and_averaging():
    enc = make("arcface")
    assert isinstance(enc, baselines.ArcFaceEncoder)
    emb = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = enc(arcface=emb)
        assert out.shape == (2, 256, 64)
        # Averaged after L2 normalisation: image order and embedding scale do not matter.
        same = enc(arcface=emb[:, [2, 0, 1]] * torch.tensor([3.0, 0.5, 7.0])[None, :, None])
        torch.testing.assert_close(same, out, rtol=1e-5, atol=1e-5)
        one_each = enc(arcface=emb[:, 0])  # (B, 512): one embedding per identity
        assert one_each.shape == (2, 256, 64)
        assert (one_each - out).abs().max() > 1e-3
        masked = enc(arcface=emb, mask=torch.tensor([[True, False, False], [True, True, True]]))
        torch.testing.assert_close(masked[0], one_each[0], rtol=1e-5, atol=1e-5)


def test_arcface_clip_baseline_shapes_invariance_and_padding():
    enc = make("arcface_clip")
    assert isinstance(enc, baselines.ArcFaceCLIPEncoder)
    emb = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(8))
    x = clip_tokens(2, 3)
    with torch.no_grad():
        out = enc(clip_tokens=x, arcface=emb)
        assert out.shape == (2, 256, 64)
        perm = [1, 2, 0]
        torch.testing.assert_close(enc(clip_tokens=x[:, perm], arcface=emb[:, perm]), out, rtol=1e-5, atol=1e-5)
        listed = enc(clip_tokens=[x[0, :2], x[1]], arcface=[emb[0, :2], emb[1]])
        alone = enc(clip_tokens=x[:1, :2], arcface=emb[:1, :2])
    torch.testing.assert_close(listed[0:1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(listed[1:2], out[1:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ArcFace embeddings"):
        enc(clip_tokens=x)


def test_build_encoder_covers_every_type_with_the_common_interface():
    for kind, cls in baselines.ENCODER_CLASSES.items():
        enc = make(kind)
        assert type(enc) is cls and isinstance(enc, IdentityEncoder) and enc.config.encoder_type == kind
        out, _ = enc.encode(clip_tokens=clip_tokens(1, 2), arcface=torch.randn(1, 2, 512))
        assert out.shape == (1, enc.num_output_tokens(2), enc.output_dim)
    # The config an encoder carries names what it is, even if built from another type's config.
    assert baselines.ArcFaceEncoder(small("omni_id")).config.encoder_type == "arcface"


# --- weight files ------------------------------------------------------------------------------------

def _proj_sd(width=64):
    g = torch.Generator().manual_seed(11)
    return {"double_blocks.0.to_k_ip.weight": torch.randn(96, width, generator=g),
            "double_blocks.0.to_v_ip.weight": torch.randn(96, width, generator=g)}


def _meta(enc, family="flux"):
    return weights.IdentityWeightsMeta(config=enc.config, base_family=family, injected_blocks=["double_blocks.0"],
                                       extra={"proj_dim": "96"})


@pytest.mark.parametrize("kind", ["omni_id", "clip", "arcface_clip"])
def test_weight_file_round_trip(tmp_path, kind):
    enc = make(kind, seed=3)
    path = tmp_path / f"{kind}.safetensors"
    weights.save_identity_weights(path, enc.state_dict(), _proj_sd(), _meta(enc))

    with safe_open(str(path), "pt") as f:
        keys, md = list(f.keys()), f.metadata()
    assert all(k.startswith(("encoder.", "proj.")) for k in keys)
    assert "proj.double_blocks.0.to_k_ip.weight" in keys
    assert md["format"] == "omni_id" and md["format_version"] == "1" and md["encoder_type"] == kind
    assert md["base_family"] == "flux" and json.loads(md["injected_blocks"]) == ["double_blocks.0"]
    assert md["num_queries"] == "256" and md["token_dim"] == "64" and md["proj_dim"] == "96"

    meta, enc_sd, proj_sd = weights.load_identity_weights(path)
    assert meta == _meta(enc)
    assert enc_sd.keys() == enc.state_dict().keys()
    assert all(torch.equal(enc_sd[k], v) for k, v in enc.state_dict().items())
    assert all(torch.equal(proj_sd[k], v) for k, v in _proj_sd().items())

    loaded, meta2, _ = weights.load_identity_encoder(path, model_family="flux")
    assert type(loaded) is type(enc) and meta2 == meta
    x, emb = clip_tokens(1, 2), torch.randn(1, 2, 512)
    with torch.no_grad():
        assert torch.equal(loaded(clip_tokens=x, arcface=emb), enc(clip_tokens=x, arcface=emb))


def test_flux_file_applied_to_sd_model_is_refused(tmp_path):
    enc = make()
    path = tmp_path / "flux.safetensors"
    weights.save_identity_weights(path, enc.state_dict(), _proj_sd(), _meta(enc, "flux"))
    meta, _, _ = weights.load_identity_weights(path)
    weights.check_base_family(meta, "flux")  # the right family passes
    with pytest.raises(ValueError, match="this file was trained for flux; use it with a FLUX model or load the sd15 file"):
        weights.check_base_family(meta, "sd15")
    with pytest.raises(ValueError, match="trained for flux; use it with a FLUX model or load the sdxl file"):
        weights.load_identity_encoder(path, model_family="sdxl")


def test_wrong_format_is_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"queries": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(ValueError, match="not an Omni-ID identity weight file .*save_identity_weights"):
        weights.load_identity_weights(plain)
    ident = tmp_path / "ident.safetensors"
    weights.save_identity(ident, torch.zeros(256, 64))
    with pytest.raises(ValueError, match="is an encoded identity, not identity weights; load it with the identity loader"):
        weights.load_identity_weights(ident)
    newer = tmp_path / "newer.safetensors"
    save_file({"encoder.x": torch.zeros(1)}, str(newer), metadata={**_meta(make()).to_metadata(), "format_version": "9"})
    with pytest.raises(ValueError, match="format_version 9.*update the node pack"):
        weights.load_identity_weights(newer)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        weights.load_identity_weights(junk)


def test_missing_keys_are_listed(tmp_path):
    enc = make()
    sd = {"encoder." + k: v for k, v in enc.state_dict().items()
          if not k.startswith("transformer.self_blocks.1.")}
    path = tmp_path / "missing.safetensors"
    save_file(sd, str(path), metadata=_meta(enc).to_metadata())  # bypasses the writer's own check
    with pytest.raises(ValueError, match=r"key\(s\) missing from the file, e\.g\. encoder\.transformer\.self_blocks\.1\.") as e:
        weights.load_identity_weights(path)
    assert "re-save it with save_identity_weights" in str(e.value)
    # The writer refuses to produce such a file in the first place.
    with pytest.raises(ValueError, match="missing"):
        weights.save_identity_weights(tmp_path / "x.safetensors", {k[8:]: v for k, v in sd.items()}, {}, _meta(enc))
    # The same helper checks projections once the injection code knows their shapes.
    proj = _proj_sd()
    expected = {**{k: v.shape for k, v in proj.items()}, "double_blocks.1.to_k_ip.weight": (96, 64)}
    with pytest.raises(ValueError, match=r"e\.g\. proj\.double_blocks\.1\.to_k_ip\.weight"):
        weights.check_state_dict(expected, proj, "projection", weights.PROJ_PREFIX)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    enc = make()
    wrong = make(num_queries=128)  # same keys, different query count
    path = tmp_path / "mismatch.safetensors"
    save_file({"encoder." + k: v for k, v in wrong.state_dict().items()}, str(path), metadata=_meta(enc).to_metadata())
    with pytest.raises(ValueError, match=r"shape mismatch for encoder\.queries: file has \(128, 64\), model expects \(256, 64\)"):
        weights.load_identity_weights(path)
    with pytest.raises(ValueError, match="shape mismatch for proj.a"):
        weights.check_state_dict({"a": (96, 64)}, {"a": torch.zeros(96, 32)}, "projection", weights.PROJ_PREFIX)


def test_stray_keys_are_refused(tmp_path):
    enc = make()
    path = tmp_path / "stray.safetensors"
    save_file({**{"encoder." + k: v for k, v in enc.state_dict().items()}, "ip_adapter.w": torch.zeros(1)},
              str(path), metadata=_meta(enc).to_metadata())
    with pytest.raises(ValueError, match="outside the encoder./proj. prefixes, e.g. ip_adapter.w"):
        weights.load_identity_weights(path)


# --- encoded identities ------------------------------------------------------------------------------

def test_encoded_identity_round_trip(tmp_path):
    tokens = torch.randn(3, 256, 64).to(torch.float16)
    path = tmp_path / "people.safetensors"
    weights.save_identity(path, tokens, {"num_source_images": [2, 5, 1], "encoder_type": "omni_id", "names": ["a", "b", "c"]})
    loaded, meta = weights.load_identity(path)
    assert loaded.dtype == torch.float16 and torch.equal(loaded, tokens)
    assert meta["num_identities"] == 3 and meta["num_tokens"] == 256 and meta["token_dim"] == 64
    assert meta["num_source_images"] == [2, 5, 1] and meta["encoder_type"] == "omni_id"
    assert json.loads(meta["names"]) == ["a", "b", "c"]

    one = tmp_path / "one.safetensors"
    weights.save_identity(one, tokens[0], {"num_source_images": 4})
    loaded_one, meta_one = weights.load_identity(one)
    assert loaded_one.shape == (1, 256, 64) and meta_one["num_source_images"] == [4]

    with pytest.raises(ValueError, match="one per identity"):
        weights.save_identity(tmp_path / "bad.safetensors", tokens, {"num_source_images": [1, 2]})
    enc = make()
    wfile = tmp_path / "w.safetensors"
    weights.save_identity_weights(wfile, enc.state_dict(), {}, _meta(enc))
    with pytest.raises(ValueError, match="holds identity encoder weights, not an encoded identity"):
        weights.load_identity(wfile)


# --- mixing ------------------------------------------------------------------------------------------

def _ids(n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(12)
    return [torch.randn(1, 256, 64, generator=g).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixing_weight_zero_or_one_is_bit_exact(dtype):
    a, b, c = _ids(dtype=dtype)
    a[0, 0, 0] = float("inf")  # a zero-weighted identity must not touch the result, not even through 0 * inf
    out = mixing.mix_identities([a, b], [0.0, 1.0])
    assert torch.equal(out, b) and out.dtype == dtype and out.data_ptr() != b.data_ptr()
    assert torch.equal(mixing.mix_identities([b, c], [1.0, 0.0]), b)
    assert torch.equal(mixing.mix_identities([a, b, c], [0.0, 0.0, 2.5]), c)  # normalised to 1


def test_mixing_normalises_weights():
    a, b, c = _ids()
    torch.testing.assert_close(mixing.mix_identities([a, b], [1, 1]), (a + b) / 2)
    torch.testing.assert_close(mixing.mix_identities([a, b, c], [1, 2, 1]), 0.25 * a + 0.5 * b + 0.25 * c)
    assert mixing.normalize_weights([3, 1]) == [0.75, 0.25]
    with pytest.raises(ValueError, match=">= 0"):
        mixing.mix_identities([a, b], [-0.5, 1.5])
    with pytest.raises(ValueError, match="at least one identity a weight > 0"):
        mixing.mix_identities([a, b], [0, 0])
    with pytest.raises(ValueError, match="use stack_identities"):
        mixing.mix_identities([a, torch.zeros(1, 514, 64)], [0.5, 0.5])


def test_stacking_concatenates_tokens():
    a, b, _ = _ids()
    clip_like = torch.randn(1, 2 * 257, 64)
    out = mixing.stack_identities([a, b, clip_like])
    assert out.shape == (1, 256 + 256 + 514, 64)
    assert torch.equal(out[:, :256], a) and torch.equal(out[:, 256:512], b) and torch.equal(out[:, 512:], clip_like)
    assert mixing.stack_identities([a[0], b[0]]).shape == (512, 64)
    with pytest.raises(ValueError, match="same token width"):
        mixing.stack_identities([a, torch.zeros(1, 256, 32)])
