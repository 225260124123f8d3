"""Pivot ID encoder (omni_encoder/pivot_id.py): e_mix, class-token replacement, Eq. 5 localisation loss."""
import pytest
import torch

from idportrait.omni_encoder import pivot_id as pid

DT = torch.float64


def _encoder(image_dim=12, text_dim=8, seed=0, identity_init=False):
    torch.manual_seed(seed)
    return pid.PivotIDEncoder(image_dim=image_dim, text_dim=text_dim, identity_init=identity_init).double()


def test_shapes_and_linear_form():
    enc = _encoder()
    e_ref, e_txt = torch.randn(3, 12, dtype=DT), torch.randn(3, 8, dtype=DT)
    e_mix = enc(e_ref, e_txt)
    assert e_mix.shape == (3, 8)
    # e_mix = W [e_ref ; e_txt] + b, with W split into its image and text columns
    w, b = enc.proj.weight, enc.proj.bias
    torch.testing.assert_close(e_mix, e_ref @ w[:, :12].T + e_txt @ w[:, 12:].T + b)
    assert enc(torch.randn(2, 4, 12, dtype=DT), torch.randn(2, 4, 8, dtype=DT)).shape == (2, 4, 8)
    default = pid.PivotIDEncoder()
    assert default.proj.in_features == 768 + 768 and default.proj.out_features == 768
    with pytest.raises(ValueError):
        enc(torch.randn(3, 11, dtype=DT), e_txt)


def test_identity_init_leaves_prompt_unchanged_and_trains():
    enc = _encoder(identity_init=True)
    e_ref, e_txt = torch.randn(2, 12, dtype=DT), torch.randn(2, 8, dtype=DT)
    assert torch.equal(enc(e_ref, e_txt), e_txt)
    # the image half still receives gradient, so training can move away from the identity
    enc(e_ref, e_txt).pow(2).sum().backward()
    assert enc.proj.weight.grad[:, :12].abs().sum() > 0


def test_replace_only_changes_chosen_index():
    g = torch.Generator().manual_seed(1)
    prompt = torch.randn(3, 7, 8, generator=g, dtype=DT)
    idx = torch.tensor([2, 0, 6])
    new = torch.randn(3, 8, generator=g, dtype=DT)
    out = pid.replace_token_embeddings(prompt, idx, new)
    assert out.shape == prompt.shape
    for b in range(3):
        assert torch.equal(out[b, idx[b]], new[b])
        keep = torch.ones(7, dtype=torch.bool)
        keep[idx[b]] = False
        assert torch.equal(out[b, keep], prompt[b, keep])
    assert not torch.equal(out, prompt)
    assert torch.equal(prompt, torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(1), dtype=DT))  # not in place
    # two identities per prompt
    idx2 = torch.tensor([[1, 4], [0, 3], [5, 2]])
    new2 = torch.randn(3, 2, 8, generator=g, dtype=DT)
    out2 = pid.replace_token_embeddings(prompt, idx2, new2)
    changed = (out2 != prompt).any(-1)
    expected = torch.zeros(3, 7, dtype=torch.bool)
    expected[torch.arange(3)[:, None], idx2] = True
    assert torch.equal(changed, expected)
    torch.testing.assert_close(pid.gather_token_embeddings(out2, idx2), new2, rtol=0, atol=0)
    with pytest.raises(ValueError):
        pid.replace_token_embeddings(prompt, torch.tensor([[1, 1], [0, 3], [5, 2]]), new2)
    with pytest.raises(IndexError):
        pid.replace_token_embeddings(prompt, torch.tensor([2, 0, 7]), new)


def test_inject_end_to_end_and_gradient_reaches_encoder():
    enc = _encoder(seed=2)
    prompt = torch.randn(2, 5, 8, dtype=DT)
    token_ids = torch.tensor([[49406, 320, 2308, 49407, 49407], [49406, 2308, 530, 49407, 49407]])
    idx = pid.find_token_indices(token_ids, 2308)
    assert idx.tolist() == [2, 1]
    e_ref = torch.randn(2, 12, dtype=DT)
    out, e_mix = enc.inject(prompt, idx, e_ref)
    torch.testing.assert_close(e_mix, enc(e_ref, prompt[torch.arange(2), idx]), rtol=0, atol=0)
    torch.testing.assert_close(out[torch.arange(2), idx], e_mix, rtol=0, atol=0)
    out.sum().backward()
    assert enc.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        pid.find_token_indices(token_ids, 1234)


def test_face_localization_loss_matches_hand_computation():
    attn = torch.tensor([[[0.2, 0.8], [0.6, 0.0]]], dtype=DT)
    mask = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=DT)
    # eta/(hw) * sum (A - M)^2 = 2e-3/4 * (0.04 + 0.04 + 0.16 + 0)
    want = 2e-3 / 4 * (0.2 ** 2 + 0.2 ** 2 + 0.4 ** 2)
    got = pid.face_localization_loss(attn, mask)
    assert abs(got.item() - want) < 1e-15
    # a perfect map costs nothing; eta scales linearly
    assert pid.face_localization_loss(mask, mask).item() == 0.0
    assert abs(pid.face_localization_loss(attn, mask, eta=1.0).item() - want / 2e-3) < 1e-12


def test_face_localization_loss_16x16_mask_resize_layers_and_grad():
    g = torch.Generator().manual_seed(3)
    attn = torch.rand(2, 3, 16, 16, generator=g, dtype=DT, requires_grad=True)  # 3 layers/heads
    face = torch.zeros(2, 64, 64, dtype=DT)
    face[0, 16:40, 20:44] = 1
    face[1, 0:30, 0:30] = 1
    loss = pid.face_localization_loss(attn, face)
    a = attn.detach().mean(1)
    m = face.reshape(2, 16, 4, 16, 4).mean((2, 4))     # area resize done by hand
    want = 2e-3 * ((a - m) ** 2).mean()
    assert abs(loss.item() - want.item()) < 1e-15
    assert 0 < m[1, 7, 7] < 1                           # the border cell stays soft (covered fraction)
    (ga,) = torch.autograd.grad(loss, attn)
    torch.testing.assert_close(ga, (2e-3 * 2 * (a - m) / (16 * 16) / 2 / 3)[:, None].expand(2, 3, 16, 16))


def test_pivot_weights_round_trip_through_safetensors(tmp_path):
    import safetensors.torch
    enc = pid.PivotIDEncoder(image_dim=12, text_dim=8, identity_init=False)
    path = str(tmp_path / "pivot.safetensors")
    pid.save_pivot_encoder(path, enc, {"base_family": "sd15"})
    loaded, meta = pid.load_pivot_encoder(path)
    assert (loaded.image_dim, loaded.text_dim) == (12, 8) and meta["base_family"] == "sd15"
    e_ref, e_txt = torch.randn(3, 12), torch.randn(3, 8)
    assert torch.equal(loaded(e_ref, e_txt), enc(e_ref, e_txt).detach())
    safetensors.torch.save_file({"weight": torch.zeros(8, 20)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not a Pivot ID encoder"):
        pid.load_pivot_encoder(str(tmp_path / "bad.safetensors"))
    safetensors.torch.save_file({"proj.weight": torch.zeros(8, 20), "proj.bias": torch.zeros(8)},
                                str(tmp_path / "meta.safetensors"), metadata={"image_dim": "11"})
    with pytest.raises(ValueError, match="image_dim=11"):
        pid.load_pivot_encoder(str(tmp_path / "meta.safetensors"))
