"""The public identity adapters behind Apply Omni-ID (guidance/adapters/, guidance/ip_adapter.py, guidance/omni_id.py).

Every supported layout: a tiny file with the public key names loads (told by its keys, whatever its name), and
the attention it adds is pinned to that adapter's formula computed independently: by hand from the file's raw
tensors (below, written from the released formulations) and, for the SD1.5 layouts diffusers supports, by
diffusers' own IP-Adapter projections and attention processors on the same weights.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import comfy.utils

import harness
import stand_in_files
from helpers import diffusers_tiny_sd15_unet, sample
from idportrait.face.sets import FaceEmbedding
from idportrait.guidance import ip_adapter as IP
from idportrait.guidance import omni_id as OM
from idportrait.guidance import patching as P
from idportrait.guidance.adapters import public as PUB
from idportrait.guidance.adapters import vocabulary as V
from idportrait.guidance.run_state import Trace
from idportrait.nodes import omni_id as N
from idportrait.stand_ins import models as tm

IPA_DIR = stand_in_files.model_folder(harness.BASE_DIR, "ipadapter")
NEG = OM.NEGATIVE_ON_UNCOND


def write(kind, family="sd15", name=None, **kw):
    """A tiny public file under a name that says nothing about its kind (the loader reads keys, not names)."""
    name = name or f"adapter_{kind}_{family}_{kw.get('clip_width', 64)}.safetensors"
    stand_in_files.write_public_adapter(os.path.join(IPA_DIR, name), kind, family, **kw)
    return name


def raw(name):
    return PUB.flatten(comfy.utils.load_torch_file(os.path.join(IPA_DIR, name), safe_load=True))


def faces(n=2, seed=0, size=64):
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


def arcface(n=2, seed=1):
    return F.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- the released formulations, by hand, from the file's raw tensors -------------------------------------

def lin(x, p, name):
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def ln(x, p, name):
    w = p[f"{name}.weight"]
    return F.layer_norm(x, (w.shape[0],), w, p[f"{name}.bias"], eps=1e-5)


def hand_attention(q, k, v, heads):
    """softmax(q kᵀ / √d) v per head, (B, L, heads·d) in and out."""
    b, lq, c = q.shape
    d = c // heads
    split = lambda t: t.reshape(b, t.shape[1], heads, d).transpose(1, 2)   # noqa: E731
    w = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return (w @ split(v)).transpose(1, 2).reshape(b, lq, c)


def hand_perceiver(p, pre, latents, x):
    """Perceiver resampler: latents attend to [proj_in(x); latents], residual FF; proj_out, norm_out."""
    x = lin(x, p, pre + "proj_in")
    i = 0
    while f"{pre}layers.{i}.0.to_q.weight" in p:
        a, f = f"{pre}layers.{i}.0.", f"{pre}layers.{i}.1."
        xn, lt = ln(x, p, a + "norm1"), ln(latents, p, a + "norm2")
        q = lt @ p[a + "to_q.weight"].T
        k, v = (torch.cat([xn, lt], 1) @ p[a + "to_kv.weight"].T).chunk(2, -1)
        latents = latents + hand_attention(q, k, v, q.shape[-1] // 64) @ p[a + "to_out.weight"].T
        h = F.layer_norm(latents, (latents.shape[-1],), p[f + "0.weight"], p[f + "0.bias"], eps=1e-5)
        latents = latents + F.gelu(h @ p[f + "1.weight"].T) @ p[f + "3.weight"].T
        i += 1
    assert i == 4
    return ln(lin(latents, p, pre + "proj_out"), p, pre + "norm_out")


def hand_tokens(kind, p, feats, shortcut=True, scale=1.0):
    """Image-prompt tokens (N, T, ctx) of per-image features, as the released projections compute them."""
    if kind in ("basic", "xlabs"):
        e = feats["clip_embeds"]
        return ln(lin(e, p, "proj").view(e.shape[0], -1, p["norm.weight"].shape[0]), p, "norm")
    if kind == "full-face":
        return ln(lin(F.gelu(lin(feats["clip_tokens"], p, "proj.0")), p, "proj.2"), p, "proj.3")
    if kind == "plus":
        x = feats["clip_tokens"]
        return hand_perceiver(p, "", p["latents"].expand(x.shape[0], -1, -1), x)
    a = feats["arcface"]
    x = ln(lin(F.gelu(lin(a, p, "proj.0")), p, "proj.2").view(a.shape[0], -1, p["norm.weight"].shape[0]), p, "norm")
    if kind == "faceid":
        return x
    out = hand_perceiver(p, "perceiver_resampler.", x, feats["clip_tokens"])
    return x + scale * out if shortcut else out


def clip_of(cv, images):
    outs = [cv.encode_image(images[i:i + 1], crop=True) for i in range(images.shape[0])]
    return {"clip_tokens": torch.cat([o["penultimate_hidden_states"] for o in outs]).float(),
            "clip_embeds": torch.cat([o["image_embeds"] for o in outs]).float()}


def clip_of_zeros(cv):
    """CLIP of an all-zero pixel tensor: ComfyUI's CLIP vision model called on zeros (no preprocessing)."""
    with torch.no_grad():
        out = cv.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)
    return {"clip_tokens": out[1].float(), "clip_embeds": out[2].float()}


def sdxl_two_res_blocks(seed=0):
    """A tiny SDXL with two res blocks per level (so the deepest down level has a second attention module, where
    InstantStyle's composition acts), built with ComfyUI's own SDXL classes."""
    import comfy.model_patcher
    cfg = tm.model_config("sdxl")
    cfg.unet_config.update(num_res_blocks=[2, 2], transformer_depth=[1, 1, 1, 1], transformer_depth_output=[1] * 6)
    model = cfg.get_model({}, "")
    tm.randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def layer_number(dm, key):
    """IP-Adapter's processor number of a cross-attention layer: diffusers' order is down, up, then mid."""
    rank = {"input": 0, "output": 1, "middle": 2}
    order = sorted(P.unet_block_keys(dm), key=lambda k: (rank[k[0]], k[1], k[2]))
    return 2 * order.index(key) + 1


class SiteRecorder(P.Injector):
    """Applied after the identity: sees the stock attention (ctx.base) and the output with the identity."""
    kinds = ("attn2",)

    def __init__(self, keys):
        super().__init__(blocks=keys)
        self.seen = {}

    def attn2(self, ctx, out, **kw):
        self.seen.setdefault(ctx.key, {"q": ctx.q.clone(), "base": ctx.base.clone(), "out": out.clone(),
                                       "cou": list(ctx.cond_or_uncond), "heads": ctx.n_heads})
        return out


# --- models and identities through the nodes -----------------------------------------------------------

def load(name):
    return N.IPAdapterFullFaceLoader.execute(name).result[0]


def encode(m, cv, kind, images, **kw):
    if kind in ("faceid", "faceid-plus"):
        return N.OmniIDEncodeArcFace.execute(m, FaceEmbedding(arcface(images.shape[0]), list(range(images.shape[0]))),
                                             cv, images, **kw).result[0]
    return N.OmniIDEncode.execute(m, cv, images, "center", **kw).result[0]


def apply(model, m, ident, weight=0.8, apply_to=None, **kw):
    apply_to = apply_to or N.OmniIDApply.INPUT_TYPES()["required"]["apply_to"][1]["default"]
    return N.OmniIDApply.execute(model, m, ident, weight, 0.0, 1.0, apply_to, **kw).result[0]


def features(kind, cv, images):
    feats = clip_of(cv, images)
    if kind in ("faceid", "faceid-plus"):
        feats["arcface"] = arcface(images.shape[0])
    return feats


def negative_features(kind, cv):
    """The original's "no image" per layout."""
    z = clip_of_zeros(cv)
    if kind == "basic":
        return {"clip_embeds": torch.zeros(1, cv.model.visual_projection.weight.shape[0])}
    if kind == "faceid":
        return {"arcface": torch.zeros(1, 512)}
    if kind == "faceid-plus":
        return {"arcface": torch.zeros(1, 512), "clip_tokens": z["clip_tokens"]}
    return z


SD_CASES = [("full-face", "sd15", 64), ("plus", "sd15", 64), ("plus", "sdxl", 64), ("plus", "sdxl", 96),
            ("basic", "sd15", 64), ("basic", "sdxl", 96), ("faceid", "sd15", 64), ("faceid", "sdxl", 64),
            ("faceid-plus", "sd15", 64), ("faceid-plus", "sdxl", 64)]


# ==========================================================================================================
# Loading: by keys, never by name; what is refused says what it is


@pytest.mark.parametrize("kind,family,width", SD_CASES + [("xlabs", "flux", 64)])
def test_every_public_layout_is_told_by_its_keys(kind, family, width):
    misleading = f"ip-adapter-full-face_sd15_{kind}_{family}_{width}.safetensors"   # the name lies; the keys do not
    name = write(kind, family, misleading, clip_width=width)
    m = load(name)
    assert m.public.kind == kind and m.public.family == ("flux" if family == "flux" else "unet")
    assert m.public.feature_width == (512 if kind == "faceid" else width)
    model = tm.tiny_model(family, 0)
    adapter = m.adapter_for(model).model
    IP.check_adapter_fits(adapter, family, model.model.diffusion_model)
    assert m.adapter_for(model) is m.adapter_for(tm.tiny_model(family, 1))   # converted once per architecture


def test_bin_files_in_the_nested_layout_load_like_safetensors():
    """.bin IP-Adapter files ({"image_proj": …, "ip_adapter": …}, read with torch.load(weights_only=True))."""
    st = load(write("faceid", "sd15", "faceid_flat.safetensors", lora=True))
    b = load(write("faceid", "sd15", "faceid_nested.bin", lora=True))
    assert b.public.kind == st.public.kind == "faceid" and b.public.lora   # FaceID's LoRA keys are read, not applied
    assert "faceid_nested.bin" in N.folder_paths.get_filename_list("ipadapter")
    e = FaceEmbedding(arcface(2), [0, 1])
    a1 = N.OmniIDEncodeArcFace.execute(st, e).result[0]
    a2 = N.OmniIDEncodeArcFace.execute(b, e).result[0]
    assert torch.equal(a1.tokens, a2.tokens)


def _save(name, sd):
    import safetensors.torch
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(IPA_DIR, name))
    return name


@pytest.mark.parametrize("what,says", [
    ("instantx", "InstantX FLUX.1-dev IP-Adapter: its image encoder is SigLIP so400m's pooled output"),
    ("instantid", "InstantID's adapter"),
    ("pos_emb", "positional embeddings or mean-pooled latents"),
    ("sd3", "a variant this pack does not know"),
    ("pulid", "PuLID weights"),
    ("lora", "a LoRA"),
    ("clip_vision", "a CLIP vision model"),
    ("checkpoint", "a diffusion model / checkpoint"),
])
def test_unsupported_files_are_refused_with_what_they_are(what, says):
    z = lambda *s: torch.zeros(*s)   # noqa: E731
    sd = {
        "instantx": {"image_proj.proj.0.weight": z(16, 8), "image_proj.proj.2.weight": z(4096 * 2, 16),
                     "image_proj.norm.weight": z(4096), "image_proj.norm.bias": z(4096),
                     "ip_adapter.0.to_k_ip.weight": z(3072, 4096), "ip_adapter.0.to_v_ip.weight": z(3072, 4096)},
        "instantid": {"image_proj.latents": z(1, 16, 64), "image_proj.proj_in.weight": z(64, 512),
                      "ip_adapter.1.to_k_ip.weight": z(8, 64), "ip_adapter.1.to_v_ip.weight": z(8, 64)},
        "pos_emb": {**{k: v for k, v in stand_in_files.public_adapter_state_dict("plus").items()},
                    "image_proj.pos_emb.weight": z(257, 64)},
        "sd3": {**stand_in_files.public_adapter_state_dict("basic"), "image_proj.time_embedding.linear_1.weight": z(4, 4)},
        "pulid": {"pulid_encoder.id_embedding_mapping.0.weight": z(4, 4), "pulid_ca.0.to_q.weight": z(4, 4)},
        "lora": {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": z(4, 4)},
        "clip_vision": {"vision_model.embeddings.class_embedding": z(4)},
        "checkpoint": {"model.diffusion_model.input_blocks.0.0.weight": z(4, 4)},
    }[what]
    name = _save(f"unsupported_{what}.safetensors", sd)
    with pytest.raises(ValueError, match=says) as e:
        load(name)
    assert name in str(e.value)


def test_a_file_for_another_architecture_names_the_tensor_and_both_shapes():
    """Issue 21: same layer count, other widths: the message names the file's tensor and the shapes that differ."""
    sd = stand_in_files.public_adapter_state_dict("plus", "sd15")
    bad = sd["ip_adapter.1.to_k_ip.weight"]
    sd["ip_adapter.1.to_k_ip.weight"] = torch.zeros(bad.shape[0] * 2, bad.shape[1])
    m = load(_save("plus_wrong_widths.safetensors", sd))
    with pytest.raises(ValueError) as e:
        m.adapter_for(tm.tiny_model("sd15", 0))
    msg = str(e.value)
    assert "ip_adapter.1.to_k_ip.weight has shape" in msg and f"({bad.shape[0] * 2}, {bad.shape[1]})" in msg
    assert f"needs ({bad.shape[0]}, {bad.shape[1]})" in msg
    # a file for a UNet with another number of cross-attention layers: both counts are named
    deeper = sdxl_two_res_blocks()
    n = len(P.unet_block_keys(deeper.model.diffusion_model))
    with pytest.raises(ValueError, match=rf"made for a UNet with 7 cross-attention layers; this model has {n}"):
        load(write("plus", "sdxl")).adapter_for(deeper)
    # a FLUX adapter on a UNet and the other way round
    with pytest.raises(ValueError, match="for FLUX; this MODEL is sd15"):
        load(write("xlabs", "flux")).adapter_for(tm.tiny_model("sd15", 0))
    with pytest.raises(ValueError, match="SD1.5/SDXL UNet; this MODEL is flux"):
        load(write("plus", "sd15")).adapter_for(tm.tiny_model("flux", 0))


def test_omni_id_file_with_mis_shaped_projections_names_the_tensor_and_shapes():
    """Issue 21 item 5: not 'made for a UNet with 7 layers does not match this model (7 layers)'."""
    from helpers import MODELS, write_weights
    from idportrait.omni_encoder import weights as W
    name = write_weights("sd15", "omni_wrong_width.safetensors")
    enc, meta, proj = W.load_identity_encoder(os.path.join(MODELS, name))
    key = next(k for k in proj if k.endswith("to_v_ip.weight"))
    for k in (key, key.replace("to_v_ip", "to_k_ip")):   # one layer of another width: a file for another UNet
        proj[k] = torch.zeros(proj[k].shape[0] + 8, proj[k].shape[1])
    W.save_identity_weights(os.path.join(MODELS, name), enc.state_dict(), proj, meta)
    m = OM.load_omni_id_model(os.path.join(MODELS, name))
    with pytest.raises(ValueError) as e:
        m.adapter_for(tm.tiny_model("sd15", 0))
    msg = str(e.value)
    key = key.replace("to_v_ip", "to_k_ip")   # the first of the two the check meets
    assert f"proj.{key} has shape ({proj[key].shape[0]}, {proj[key].shape[1]})" in msg
    assert f"needs ({proj[key].shape[0] - 8}, {proj[key].shape[1]})" in msg and "(7 layers)" not in msg


# ==========================================================================================================
# The attention each layout adds, pinned to its formula


def _sd_sites(dm):
    keys = P.unet_block_keys(dm)
    return [next(k for k in keys if k[0] == "input"), next(k for k in keys if k[0] == "middle"),
            [k for k in keys if k[0] == "output"][-1]]


def _assert_rows(seen, want_by_role, w):
    """Per row of the recorded call: out − base == w · want[role] (cond 0 / uncond 1; None: exactly 0)."""
    cou = seen["cou"]
    per = seen["q"].shape[0] // len(cou)
    delta = seen["out"] - seen["base"]
    for c, role in enumerate(cou):
        rows = slice(c * per, (c + 1) * per)
        want = want_by_role[role]
        if want is None:
            assert torch.equal(delta[rows], torch.zeros_like(delta[rows]))
            continue
        got = w * hand_attention(seen["q"][rows], *want, seen["heads"])
        scale = got.abs().max().item()
        assert scale > 1e-3   # the identity really adds something, far above the tolerance
        torch.testing.assert_close(delta[rows], got, rtol=1e-4, atol=1e-5 * max(1.0, scale))


def _kv(p_file, dm, key, tokens):
    n = layer_number(dm, key)
    return tokens @ p_file[f"ip_adapter.{n}.to_k_ip.weight"].T, tokens @ p_file[f"ip_adapter.{n}.to_v_ip.weight"].T


@pytest.mark.parametrize("kind,family,width", SD_CASES, ids=[f"{k}-{f}-{w}" for k, f, w in SD_CASES])
def test_sd_layout_adds_the_attention_of_its_formula_by_hand(kind, family, width):
    """cond rows: w·Attn(q, K_ip, V_ip) of the image-prompt tokens (projection by hand from the file's tensors,
    every image's tokens side by side); uncond rows (the default apply_to): the same of the original's "no image"."""
    name = write(kind, family, clip_width=width)
    cv = tm.tiny_clip_vision(0, width=width)
    m, images = load(name), faces(2)
    ident = encode(m, cv, kind, images)
    model = tm.tiny_model(family, 0)
    dm = model.model.diffusion_model
    sites = _sd_sites(dm)
    rec = SiteRecorder(sites)
    w = 0.8
    sample(P.apply_injector(apply(model, m, ident, w), rec), family, steps=1)
    p = raw(name)
    proj = {k[len("image_proj."):]: v for k, v in p.items() if k.startswith("image_proj.")}
    feats = features(kind, cv, images)
    cond = hand_tokens(kind, proj, feats).reshape(1, -1, tm.TEXT_WIDTH)
    uncond = hand_tokens(kind, proj, negative_features(kind, cv)).reshape(1, -1, tm.TEXT_WIDTH)
    if kind == "full-face":   # the CLIP baseline keeps the CLIP tokens and projects them in the adapter
        assert torch.equal(ident.tokens, feats["clip_tokens"].reshape(1, -1, width))
    else:
        torch.testing.assert_close(ident.tokens, cond, rtol=1e-4, atol=1e-5)
    for key in sites:
        _assert_rows(rec.seen[key], {0: _kv(p, dm, key, cond), 1: _kv(p, dm, key, uncond)}, w)


def test_ip_adapter_baseline_default_uncond_rows_attend_to_clip_of_a_zero_pixel_tensor():
    """Issue 15 item 7: with the IP-Adapter baseline's default the uncond rows get w·Attn(q, K_ip0, V_ip0) added to
    the text attention, K_ip0/V_ip0 from CLIP of an all-zero pixel tensor, projected and attended by hand."""
    name = stand_in_files.write_ip_adapter_full_face(os.path.join(IPA_DIR, "full_face_baseline.safetensors"))
    cv, m = tm.tiny_clip_vision(0), load("full_face_baseline.safetensors")
    ident = N.OmniIDEncode.execute(m, cv, faces(1), "center").result[0]
    assert ident.negative.startswith("zero pixel tensor")
    model = tm.tiny_model("sd15", 0)
    dm = model.model.diffusion_model
    key = [k for k in P.unet_block_keys(dm) if k[0] == "output"][0]
    rec = SiteRecorder([key])
    sample(P.apply_injector(apply(model, m, ident, 1.0), rec), "sd15", steps=1)
    p = raw(os.path.basename(name))
    z = cv.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)[1].float()   # CLIP(zero pixels)
    h = F.gelu(z @ p["image_proj.proj.0.weight"].T + p["image_proj.proj.0.bias"])
    c0 = F.layer_norm(h @ p["image_proj.proj.2.weight"].T + p["image_proj.proj.2.bias"], (tm.TEXT_WIDTH,),
                      p["image_proj.proj.3.weight"], p["image_proj.proj.3.bias"])
    seen = rec.seen[key]
    u = seen["cou"].index(1)
    per = seen["q"].shape[0] // len(seen["cou"])
    rows = slice(u * per, (u + 1) * per)
    k0, v0 = _kv(p, dm, key, c0)
    q = seen["q"][rows]
    d = q.shape[-1] // seen["heads"]
    qh = q.view(per, -1, seen["heads"], d).transpose(1, 2)
    kh, vh = (t.view(1, -1, seen["heads"], d).transpose(1, 2) for t in (k0, v0))
    want = seen["base"][rows] + 1.0 * ((qh @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ vh).transpose(1, 2) \
        .reshape(per, -1, q.shape[-1])
    torch.testing.assert_close(seen["out"][rows], want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen["out"][rows], seen["base"][rows])


DIFFUSERS_CASES = [("full-face", True), ("plus", True), ("basic", True), ("faceid", True), ("faceid-plus", True),
                   ("faceid-plus", False)]


@pytest.mark.parametrize("kind,shortcut", DIFFUSERS_CASES, ids=[f"{k}-{'v2' if s else 'v1'}" for k, s in DIFFUSERS_CASES])
def test_sd15_layout_matches_diffusers_ip_adapter(kind, shortcut):
    """Differential: diffusers converts the same public state dict itself (its image projection and its
    IPAdapterAttnProcessor2_0 numbering) and runs its UNet with the same UNet weights."""
    model = tm.tiny_model("sd15", 0)
    unet = diffusers_tiny_sd15_unet(model)
    name = write(kind, "sd15")
    p = raw(name)
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in p.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in p.items() if k.startswith("ip_adapter.")}}
    proj = unet._convert_ip_adapter_image_proj_to_diffusers(nested["image_proj"], low_cpu_mem_usage=False).eval()
    procs = unet._convert_ip_adapter_attn_to_diffusers([nested], low_cpu_mem_usage=False)
    w = 2.0
    for pr in procs.values():
        if hasattr(pr, "scale"):
            pr.scale = [w]
    unet.set_attn_processor(procs)
    cv, m, images = tm.tiny_clip_vision(0), load(name), faces(2)
    ident = encode(m, cv, kind, images, **({"faceid_plus": "v2 (shortcut)" if shortcut else "v1"}
                                           if kind == "faceid-plus" else {}))
    feats = features(kind, cv, images)
    with torch.no_grad():
        if kind in ("faceid", "faceid-plus"):
            if kind == "faceid-plus":
                proj.clip_embeds, proj.shortcut = feats["clip_tokens"][:, None], shortcut
            tokens = proj(feats["arcface"])
        elif kind == "basic":
            tokens = proj(feats["clip_embeds"])
        else:
            tokens = proj(feats["clip_tokens"])
        ip_tokens = tokens.reshape(1, -1, tm.TEXT_WIDTH).repeat(2, 1, 1)   # both images side by side, both rows
        g = torch.Generator().manual_seed(9)
        x, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, tm.TEXT_WIDTH, generator=g), \
            torch.tensor([500.0, 500.0])
        want = unet(x, t, encoder_hidden_states=(ctx, [ip_tokens])).sample
        patched = apply(model, m, ident, w, apply_to="cond+uncond")
        to = dict(patched.model_options["transformer_options"])
        to.update({"cond_or_uncond": [0, 1], "sigmas": torch.tensor([1.0, 1.0])})
        dm = model.model.diffusion_model
        got = dm(x, t, context=ctx, transformer_options=to)
        plain = dm(x, t, context=ctx, transformer_options={})
    effect, err = (want - plain).abs().max(), (got - want).abs().max()
    assert effect > 1e-5 and err < effect / 100   # the identity does something, far above the disagreement
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_xlabs_flux_adapter_adds_its_attention_after_every_double_block_by_hand():
    """x-flux's IPDoubleStreamBlockProcessor: img ← img + w·SDPA(q, K, V) after the whole double block, q the block's
    image query after QK-norm and before RoPE, K/V = Linear(LN(reshape(Linear(CLIP-L embedding)))) with bias; no
    single block is touched. Uncond rows (default apply_to) attend to x-flux's negative, CLIP of a black image."""
    name = write("xlabs", "flux")
    cv, m, images = tm.tiny_clip_vision(0), load(name), faces(2)
    ident = encode(m, cv, "xlabs", images)
    assert ident.negative.startswith("black image")
    model = tm.tiny_model("flux", 0)
    dm = model.model.diffusion_model
    w = 0.8

    class Capture(P.Injector):
        kinds = ("double",)

        def __init__(self):
            super().__init__()
            self.seen = {}

        def double_block(self, ctx, args, call, **kw):
            before = {k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()}   # blocks add in place
            res = call(args)
            self.seen.setdefault(ctx.key[1], {"args": before, "img": res["img"].clone(), "cou": list(ctx.cond_or_uncond)})
            return res

    plain_cap, cap = Capture(), Capture()
    sample(P.apply_injector(model, plain_cap), "flux", steps=1)
    with Trace() as trace:
        sample(P.apply_injector(apply(model, m, ident, w), cap), "flux", steps=1)
    assert {e["site"][0] for e in trace.of("identity.attend")} == {"double"}   # never a single block
    p = raw(name)
    proj = {k[len("ip_adapter_proj_model."):]: v for k, v in p.items() if k.startswith("ip_adapter_proj_model.")}
    cond = hand_tokens("xlabs", proj, clip_of(cv, images)).reshape(1, -1, proj["norm.weight"].shape[0])
    black = clip_of(cv, torch.zeros(1, 224, 224, 3))
    uncond = hand_tokens("xlabs", proj, black)
    block = dm.double_blocks[0]
    a = cap.seen[0]["args"]
    assert torch.equal(a["img"], plain_cap.seen[0]["args"]["img"])   # nothing changed before the first block
    q = IP.flux_double_query(block, a["img"], a["vec"])
    B, H, L, D = q.shape
    delta = cap.seen[0]["img"] - plain_cap.seen[0]["img"]
    for r, role in enumerate(cap.seen[0]["cou"]):
        c = cond if role == 0 else uncond
        pre = "double_blocks.0.processor.ip_adapter_double_stream_"
        k = (c @ p[pre + "k_proj.weight"].T + p[pre + "k_proj.bias"]).view(1, -1, H, D).transpose(1, 2)
        v = (c @ p[pre + "v_proj.weight"].T + p[pre + "v_proj.bias"]).view(1, -1, H, D).transpose(1, 2)
        want = ((q[r:r + 1] @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ v).transpose(1, 2).reshape(1, L, H * D)
        assert want.abs().max() > 1e-2
        torch.testing.assert_close(delta[r:r + 1], w * want, rtol=1e-4, atol=1e-5)


# ==========================================================================================================
# The IP-Adapter vocabulary, pinned by hand


def _deltas(model, m, ident, family, keys, **kw):
    rec = SiteRecorder(keys)
    sample(P.apply_injector(apply(model, m, ident, 0.8, apply_to="cond+uncond", **kw), rec), family, steps=1)
    return {k: rec.seen[k]["out"] - rec.seen[k]["base"] for k in keys}


def test_weight_type_factors_by_hand_and_in_the_model():
    model = tm.tiny_model("sd15", 0)
    dm = model.model.diffusion_model
    sites = P.unet_block_keys(dm)
    modules = list(dict.fromkeys(k[:2] for k in sites))
    n = len(modules)
    i = lambda k: modules.index(k[:2])   # noqa: E731
    by_hand = {
        "linear": lambda k: 1.0,
        "ease in": lambda k: 0.05 + 0.95 * (1 - i(k) / n),
        "ease out": lambda k: 0.05 + 0.95 * i(k) / n,
        "ease in-out": lambda k: 0.05 + 0.95 * (1 - abs(i(k) - n / 2) / (n / 2)),
        "reverse in-out": lambda k: 0.05 + 0.95 * abs(i(k) - n / 2) / (n / 2),
        "weak input": lambda k: 0.2 if k[0] == "input" else 1.0,
        "weak middle": lambda k: 0.2 if k[0] == "middle" else 1.0,
        "weak output": lambda k: 0.2 if k[0] == "output" else 1.0,
        "strong middle": lambda k: 1.0 if k[0] == "middle" else 0.2,
    }
    for wt, f in by_hand.items():
        got = V.site_weights(wt, 0.8, "sd15", sites)
        assert got.keys() == set(sites)
        for k in sites:
            assert got[k] == pytest.approx(0.8 * f(k), abs=1e-12), (wt, k)
    # in the model: at every site, factor · w · Attn(q, K_ip, V_ip) of that site's own query
    name = write("plus", "sd15")
    m = load(name)
    ident = encode(m, tm.tiny_clip_vision(0), "plus", faces(2))
    for wt in ("ease in", "weak output"):
        rec = SiteRecorder(sites)
        sample(P.apply_injector(apply(model, m, ident, 0.8, apply_to="cond+uncond", weight_type=wt), rec), "sd15",
               steps=1)
        for k in sites:
            seen = rec.seen[k]
            kk, vv = _kv(raw(name), dm, k, ident.tokens)
            B = seen["q"].shape[0]
            want = 0.8 * by_hand[wt](k) * hand_attention(seen["q"], kk.expand(B, -1, -1), vv.expand(B, -1, -1),
                                                         seen["heads"])
            torch.testing.assert_close(seen["out"] - seen["base"], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="names UNet parts"):
        V.site_weights("weak input", 1.0, "flux", [("double", 0)])


def test_style_and_composition_transfer_act_only_in_instantstyles_modules():
    """InstantStyle (SDXL): style in up_blocks.0.attentions.1, layout in down_blocks.2.attentions.1."""
    real = tm.FULL_SIZE["sdxl"]().unet_config
    assert V._instantstyle_module("style transfer", real) == ("output", 1)
    assert V._instantstyle_module("composition", real) == ("input", 8)   # SDXL's input_blocks.8
    model = sdxl_two_res_blocks()
    keys = P.unet_block_keys(model.model.diffusion_model)
    sd = stand_in_files.public_adapter_state_dict("plus", "sdxl")
    # a file for this deeper tiny SDXL: one ip_adapter layer per cross-attention layer, in the public numbering
    dims = IP.SDIdentityAdapter.inner_dims_of(model.model.diffusion_model)
    layers = {f"ip_adapter.{2 * n + 1}.{kv}.weight": torch.randn(dims[k], tm.TEXT_WIDTH) * 0.2
              for n, k in enumerate(IP.ip_adapter_order(list(dims))) for kv in ("to_k_ip", "to_v_ip")}
    m = load(_save("plus_deeper_sdxl.safetensors", {**{k: v for k, v in sd.items() if k.startswith("image_proj.")},
                                                     **layers}))
    ident = encode(m, tm.tiny_clip_vision(0), "plus", faces(2))
    for wt, target in (("style transfer", ("output", 1)), ("composition", ("input", 5))):
        d = _deltas(model, m, ident, "sdxl", keys, weight_type=wt)
        for k in keys:
            if k[:2] == target:
                assert d[k].abs().max() > 1e-3
            else:
                assert torch.equal(d[k], torch.zeros_like(d[k])), (wt, k)
    with pytest.raises(ValueError, match="defined for SDXL"):
        apply(tm.tiny_model("sd15", 0), load(write("plus", "sd15")), encode(load(write("plus", "sd15")),
              tm.tiny_clip_vision(0), "plus", faces(1)), weight_type="style transfer")


def _combined_by_hand(x, mode):
    if mode == "add":
        return x.sum(0, keepdim=True)
    if mode == "average":
        return x.mean(0, keepdim=True)
    if mode == "subtract":
        return x[:1] - x[1:].mean(0, keepdim=True)
    norms = x.norm(dim=-1, keepdim=True)                       # per token, over channels
    return (x / norms * norms.mean(0, keepdim=True)).mean(0, keepdim=True)


@pytest.mark.parametrize("mode", ["add", "subtract", "average", "norm average"])
def test_combine_embeds_combines_the_per_image_features_before_the_projection(mode):
    cv, images = tm.tiny_clip_vision(0), faces(3, seed=4)
    feats = clip_of(cv, images)
    for kind in ("plus", "basic"):
        name = write(kind, "sd15")
        p = {k[len("image_proj."):]: v for k, v in raw(name).items() if k.startswith("image_proj.")}
        ident = encode(load(name), cv, kind, images, combine_embeds=mode)
        key = "clip_tokens" if kind == "plus" else "clip_embeds"
        want = hand_tokens(kind, p, {key: _combined_by_hand(feats[key], mode)})
        torch.testing.assert_close(ident.tokens, want, rtol=1e-4, atol=1e-5)
        assert ident.num_source_images == [3]
    concat = encode(load(write("plus", "sd15")), cv, "plus", images)   # the default: every image's tokens
    assert concat.tokens.shape[1] == 3 * 4
    # FaceID: the ArcFace embeddings are combined
    name = write("faceid", "sd15")
    p = {k[len("image_proj."):]: v for k, v in raw(name).items() if k.startswith("image_proj.")}
    e = arcface(3)
    ident = N.OmniIDEncodeArcFace.execute(load(name), FaceEmbedding(e, [0, 1, 2]), combine_embeds=mode).result[0]
    torch.testing.assert_close(ident.tokens, hand_tokens("faceid", p, {"arcface": _combined_by_hand(e, mode)}),
                               rtol=1e-4, atol=1e-5)


def test_embeds_scaling_k_plus_v_scales_keys_and_values_by_hand():
    name = write("basic", "sd15")
    cv, images = tm.tiny_clip_vision(0), faces(1)
    m = load(name)
    ident = encode(m, cv, "basic", images)
    model = tm.tiny_model("sd15", 0)
    dm = model.model.diffusion_model
    key = _sd_sites(dm)[2]
    w = 2.0
    rec = SiteRecorder([key])
    sample(P.apply_injector(apply(model, m, ident, w, apply_to="cond+uncond", embeds_scaling="K+V"), rec), "sd15", steps=1)
    seen = rec.seen[key]
    B = seen["q"].shape[0]
    k, v = (t.expand(B, -1, -1) for t in _kv(raw(name), dm, key, ident.tokens))
    want = hand_attention(seen["q"], w * k, w * v, seen["heads"])
    torch.testing.assert_close(seen["out"] - seen["base"], want, rtol=1e-4, atol=1e-5)
    v_only = w * hand_attention(seen["q"], k, v, seen["heads"])
    assert (want - v_only).abs().max() > 1e-2   # K+V really is another formula than V only


# ==========================================================================================================
# Rows: apply_to, negatives, and nothing computed for rows that discard it


class OldIdentityInjector(IP.IdentityInjector):
    """The injector's row handling before this change, kept as the reference the defaults must equal bit for bit:
    the identity attention of every row, then the rows apply_to does not select zeroed or mixed away."""

    def attn2(self, ctx, out, **kw):
        from comfy.ldm.modules.attention import optimized_attention
        k_ip, v_ip = self.sd_kv(ctx.key, ctx.q, ctx.run)
        B = ctx.q.shape[0]
        ip = optimized_attention(ctx.q, IP._rows_batch(k_ip, B), IP._rows_batch(v_ip, B), ctx.n_heads,
                                 attn_precision=ctx.transformer_options.get("attn_precision"),
                                 transformer_options=ctx.transformer_options)
        if self.mask is not None:
            ip = ip * ctx.token_mask(self.mask.to(ip.device), ip.shape[0]).to(ip.dtype)
        return out + self.weight * ip

    def _old_ip(self, ctx, q, heads):
        k_ip, v_ip = self.flux_kv(f"{ctx.kind}_{ctx.key[1]}", q, ctx.run)
        B, H, L, D = q.shape
        k = IP._rows_batch(k_ip, B).view(B, -1, H, D).transpose(1, 2)
        v = IP._rows_batch(v_ip, B).view(B, -1, H, D).transpose(1, 2)
        ip = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, H * D)
        if ctx.rows is not None:
            ip = ip * ctx.rows.view(-1, 1, 1).to(ip.dtype)
        if self.mask is not None:
            ip = ip * ctx.token_mask(self.mask.to(ip.device), ip.shape[0]).to(ip.dtype)
        return self.weight * ip

    def double_block(self, ctx, args, call, **kw):
        block = ctx.module()
        ip = self._old_ip(ctx, IP.flux_double_query(block, args["img"], args["vec"]), block.num_heads)
        res = call(args)
        return {**res, "img": res["img"] + ip}

    def single_block(self, ctx, args, call, **kw):
        block = ctx.module()
        ip = self._old_ip(ctx, IP.flux_single_query(block, args["img"][:, ctx.txt_len:], args["vec"]), block.num_heads)
        res = call(args)
        img = res["img"]
        return {**res, "img": torch.cat([img[:, :ctx.txt_len], img[:, ctx.txt_len:] + ip], dim=1)}


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_default_settings_are_bit_identical_to_the_injector_before(family):
    """Saved workflows (apply_to cond or cond+uncond, no weight_type/combine_embeds/embeds_scaling) sample exactly
    what they sampled before; the new default apply_to with Omni-ID weights is 'cond' exactly."""
    from helpers import MODELS, write_weights
    m = OM.load_omni_id_model(os.path.join(MODELS, write_weights(family, f"bitexact_{family}.safetensors")))
    cv = tm.tiny_clip_vision(0)
    ident = N.OmniIDEncode.execute(m, cv, faces(2), "center").result[0]
    model = tm.tiny_model(family, 0)
    mask = torch.zeros(1, 128, 128)
    mask[:, :, :64] = 1.0
    for apply_to, rows, msk in (("cond", "cond", None), ("cond+uncond", "both", None), ("cond", "cond", mask),
                                (NEG, "cond", None)):
        new = N.OmniIDApply.execute(model, m, ident, 0.8, 0.0, 1.0, apply_to, msk).result[0]
        old = P.apply_injector(model, OldIdentityInjector(m.adapter_for(model), ident.tokens, family, weight=0.8,
                                                          mask=msk, apply_to=rows))
        assert torch.equal(sample(new, family, size=16), sample(old, family, size=16)), apply_to
    # the IP-Adapter baseline on its old settings, too
    fm = load(os.path.basename(stand_in_files.write_ip_adapter_full_face(os.path.join(IPA_DIR, "ff_bitexact.safetensors"))))
    if family != "flux":
        fi = N.OmniIDEncode.execute(fm, cv, faces(2), "center").result[0]
        new = N.OmniIDApply.execute(model, fm, fi, 0.8, 0.0, 1.0, "cond").result[0]
        old = P.apply_injector(model, OldIdentityInjector(fm.adapter_for(model), fi.tokens, family, weight=0.8,
                                                          apply_to="cond"))
        assert torch.equal(sample(new, family), sample(old, family))


def test_rows_that_discard_the_identity_do_not_compute_it():
    m = load(write("plus", "sd15"))
    ident = encode(m, tm.tiny_clip_vision(0), "plus", faces(1))
    model = tm.tiny_model("sd15", 0)
    n_sites = len(P.unet_block_keys(model.model.diffusion_model))
    for apply_to, want in (("cond", {"cond"}), ("uncond", {"cond"}), ("cond+uncond", {"cond"}), (NEG, {"cond", "uncond"})):
        with Trace() as t:
            sample(apply(model, m, ident, apply_to=apply_to), "sd15", steps=1)
        events = t.of("identity.attend")
        assert {e["which"] for e in events} == want   # which token set ("uncond" = the negative)
        rows = sum(e["rows"] for e in events)
        batch = events[0]["batch"]
        # one cond and one uncond row per call: 'cond'/'uncond' attend on half the rows, the others on all
        assert rows == n_sites * (batch if apply_to in ("cond+uncond", NEG) else batch // 2), apply_to
    # apply_to uncond: the cond rows are exactly the plain model's; the uncond rows attend to the identity
    key = _sd_sites(model.model.diffusion_model)[0]
    rec = SiteRecorder([key])
    sample(P.apply_injector(apply(model, m, ident, 0.8, apply_to="uncond"), rec), "sd15", steps=1)
    k, v = _kv(raw(write("plus", "sd15")), model.model.diffusion_model, key, ident.tokens)
    _assert_rows(rec.seen[key], {0: None, 1: (k, v)}, 0.8)


def test_negative_image_is_what_the_uncond_rows_attend_to():
    cv, images, neg = tm.tiny_clip_vision(0), faces(2), faces(1, seed=9)
    name = write("plus", "sd15")
    m = load(name)
    ident = N.OmniIDEncode.execute(m, cv, images, "center", negative_image=neg).result[0]
    assert ident.negative == "negative image"
    p = {k[len("image_proj."):]: v for k, v in raw(name).items() if k.startswith("image_proj.")}
    torch.testing.assert_close(ident.uncond_tokens, hand_tokens("plus", p, clip_of(cv, neg)), rtol=1e-4, atol=1e-5)
    model = tm.tiny_model("sd15", 0)
    dm = model.model.diffusion_model
    key = _sd_sites(dm)[1]
    rec = SiteRecorder([key])
    sample(P.apply_injector(apply(model, m, ident, 0.8), rec), "sd15", steps=1)
    _assert_rows(rec.seen[key], {0: _kv(raw(name), dm, key, ident.tokens), 1: _kv(raw(name), dm, key,
                                                                                  ident.uncond_tokens)}, 0.8)


def test_omni_id_weights_leave_the_uncond_rows_alone_unless_a_negative_image_is_given():
    from helpers import MODELS, write_weights
    m = OM.load_omni_id_model(os.path.join(MODELS, write_weights("sd15", "neg_omni.safetensors")))
    cv = tm.tiny_clip_vision(0)
    model = tm.tiny_model("sd15", 0)
    key = _sd_sites(model.model.diffusion_model)[0]
    plain_neg = N.OmniIDEncode.execute(m, cv, faces(2), "center").result[0]
    assert plain_neg.uncond_tokens is None
    rec = SiteRecorder([key])
    sample(P.apply_injector(apply(model, m, plain_neg), rec), "sd15", steps=1)
    seen = rec.seen[key]
    u = seen["cou"].index(1)
    assert torch.equal(seen["out"][u], seen["base"][u])
    with_neg = N.OmniIDEncode.execute(m, cv, faces(2), "center", negative_image=faces(1, seed=5)).result[0]
    want = OM.run_encoder(m.encoder, clip_tokens=clip_of(cv, faces(1, seed=5))["clip_tokens"][None])
    torch.testing.assert_close(with_neg.uncond_tokens, want, rtol=1e-5, atol=1e-6)
    rec = SiteRecorder([key])
    sample(P.apply_injector(apply(model, m, with_neg), rec), "sd15", steps=1)
    seen = rec.seen[key]
    assert not torch.equal(seen["out"][u], seen["base"][u])


def test_an_identity_without_its_negative_is_refused_with_the_fix():
    m = load(write("plus", "sd15"))
    ident = encode(m, tm.tiny_clip_vision(0), "plus", faces(1))
    loaded = OM.Identity(ident.tokens, [1], ident.encoder_type)   # what Load Identity gives (no negative stored)
    with pytest.raises(ValueError, match="has no negative for the uncond rows.*choose apply_to 'cond'"):
        apply(tm.tiny_model("sd15", 0), m, loaded)
    apply(tm.tiny_model("sd15", 0), m, loaded, apply_to="cond")


# ==========================================================================================================
# Everything built on Apply: regions, two identities, the window; Infinite-ID; RB-Guidance's M_gen


def _left_right(size=128):
    left = torch.zeros(1, size, size)
    left[:, :, : size // 2] = 1.0
    return left, 1.0 - left


@pytest.mark.parametrize("kind,family", [("plus", "sd15"), ("faceid", "sd15"), ("basic", "sdxl"), ("full-face", "sd15")])
def test_two_identities_in_two_regions_each_add_their_own_attention(kind, family):
    name = write(kind, family)
    cv, m = tm.tiny_clip_vision(0), load(name)
    a = encode(m, cv, kind, faces(2, seed=1))
    b = encode(m, cv, kind, faces(1, seed=2))
    left, right = _left_right()
    model = tm.tiny_model(family, 0)
    dm = model.model.diffusion_model
    key = _sd_sites(dm)[0]
    two = apply(apply(model, m, a, 0.8, apply_to="cond+uncond", attn_mask=left), m, b, 0.6, apply_to="cond+uncond",
                attn_mask=right)
    rec = SiteRecorder([key])
    sample(P.apply_injector(two, rec), family, steps=1)
    seen = rec.seen[key]
    p = raw(name)
    h, w = 16, 16   # the first input block of a 16x16 latent
    B = seen["q"].shape[0]
    delta = (seen["out"] - seen["base"]).view(B, h, w, -1)
    for ident, weight, cols in ((a, 0.8, slice(0, w // 2)), (b, 0.6, slice(w // 2, w))):
        tok = ident.tokens if kind != "full-face" else hand_tokens("full-face", {k[11:]: v for k, v in p.items()
                                                                             if k.startswith("image_proj.")},
                                                                     {"clip_tokens": ident.tokens})
        k, v = (t.expand(B, -1, -1) for t in _kv(p, dm, key, tok))
        want = (weight * hand_attention(seen["q"], k, v, seen["heads"])).view(B, h, w, -1)
        torch.testing.assert_close(delta[:, :, cols], want[:, :, cols], rtol=1e-4, atol=1e-5)
    # the window: outside it nothing is computed; weight 0 is the plain model exactly
    with Trace() as t:
        sample(N.OmniIDApply.execute(model, m, a, 0.8, 0.5, 1.0, NEG).result[0], family, steps=4)
    with Trace() as t_all:
        sample(N.OmniIDApply.execute(model, m, a, 0.8, 0.0, 1.0, NEG).result[0], family, steps=4)
    assert 0 < t.count("identity.attend") < t_all.count("identity.attend")
    assert torch.equal(sample(N.OmniIDApply.execute(model, m, a, 0.0, 0.0, 1.0, NEG).result[0], family),
                       sample(model, family))


def _infinite(model, m, ident):
    from idportrait.nodes.infinite_id import InfiniteIDApply
    spec = InfiniteIDApply.INPUT_TYPES()
    kw = {k: v[1]["default"] for part in ("required", "optional") for k, v in spec.get(part, {}).items()
          if isinstance(v[1], dict) and "default" in v[1]}
    kw.update(model=model, omni_id_model=m, identity=ident)
    return InfiniteIDApply.execute(**kw).result[0]


@pytest.mark.parametrize("kind,family", [("plus", "sdxl"), ("faceid-plus", "sd15"), ("xlabs", "flux")])
def test_infinite_id_streams_take_the_public_adapters(kind, family):
    name = write(kind, family)
    cv, m = tm.tiny_clip_vision(0), load(name)
    ident = encode(m, cv, kind, faces(2))
    model = tm.tiny_model(family, 0)
    with Trace() as t:
        out = sample(_infinite(model, m, ident), family)
    assert t.count("infinite_id.call") and t.count("identity.kv")   # both streams ran; the adapter was read
    if family == "flux":   # XLabs: the adapter has no single blocks, and none was asked for
        assert {str(e["site"]).split("_")[0] for e in t.of("identity.kv")} == {"double"}
    assert not torch.equal(out, sample(model, family))


def test_rb_guidance_reads_m_gen_from_a_public_adapters_attention():
    """The recorded adapter map is the joint softmax mass on the identity keys, K_ip from the public file."""
    from idportrait.guidance import rb_guidance as RG
    name = write("plus", "sd15")
    m = load(name)
    ident = encode(m, tm.tiny_clip_vision(0), "plus", faces(1))
    model = tm.tiny_model("sd15", 0)
    inj = OM.identity_injector(m, model, ident, 1.0)
    with_id = P.apply_injector(model, inj)
    dm = model.model.diffusion_model
    key = [k for k in P.unet_block_keys(dm) if k[0] == "input"][-1]
    g = torch.Generator().manual_seed(0)
    heads, d = 2, 32
    q, k = torch.randn(1, 64, heads * d, generator=g), torch.randn(1, 77, heads * d, generator=g)
    to = dict(with_id.model_options["transformer_options"])
    to["activations_shape"] = [1, heads * d, 8, 8]
    rec = RG.capture._AttnRecord((8, 8), [("adapter", 0)])
    to[RG.CAPTURE_KEY] = RG.capture._Capture(RG.FeaturePoint("sd15", "mid", 0), 1, None, rec)
    ctx = P.CallContext(kind="attn2", key=key, sigma=1.0, cond_or_uncond=[0], transformer_options=to, q=q, k=k, v=k,
                        n_heads=heads)
    RG.RBInjector().attn2(ctx, torch.zeros(1, 64, heads * d))
    k_ip, _ = _kv(raw(name), dm, key, ident.tokens)
    split = lambda t: t.view(1, -1, heads, d).transpose(1, 2)   # noqa: E731
    lt = split(q) @ split(k).transpose(-1, -2) / d ** 0.5
    li = split(q) @ split(k_ip).transpose(-1, -2) / d ** 0.5
    joint = torch.cat([lt, li], -1).softmax(-1)
    torch.testing.assert_close(rec.cross[0][0], joint[..., 77:].sum(-1).mean(1), rtol=1e-4, atol=1e-6)


def _rb_workflow(family, adapter_file, kind, tag, p=8.5):
    empty = "EmptySD3LatentImage" if family == "flux" else "EmptyLatentImage"
    wf = {
        "1": {"class_type": "IDP_TinyModels", "inputs": {"family": family, "weights_seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a woman"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": empty, "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "8": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0x996655}},
        "9": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 128, "height": 128}},
        "31": {"class_type": "IDP_IPAdapterFullFaceLoader", "inputs": {"ipadapter_file": adapter_file}},
        "32": {"class_type": "IDP_TinyClipVision", "inputs": {"weights_seed": 0}},
        "33": {"class_type": "IDP_OmniIDEncode", "inputs": {"omni_id_model": ["31", 0], "clip_vision": ["32", 0],
                                                            "faces": ["8", 0], "crop": "center"}},
        "30": {"class_type": "IDP_OmniIDApply", "inputs": {"model": ["1", 0], "omni_id_model": ["31", 0],
                                                           "identity": ["33", 0], "weight": 1.0, "start_at": 0.0,
                                                           "end_at": 1.0, "apply_to": NEG}},
        "10": {"class_type": "IDP_RBGuidanceGuider", "inputs": {
            "model": ["30", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 4.0, "vae": ["1", 2], "p": p,
            "u": 0.6, "t0": 671, "feature_point": "auto", "reference": ["8", 0], "reference_mask": ["9", 0],
            "normalize_mask": True}},
        "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "BasicScheduler", "inputs": {"model": ["30", 0], "scheduler": "simple", "steps": 4,
                                                          "denoise": 1.0}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["11", 0], "guider": ["10", 0],
                                                                 "sampler": ["12", 0], "sigmas": ["13", 0],
                                                                 "latent_image": ["4", 0]}},
        "15": {"class_type": "IDP_RBGuidanceMaskPreview", "inputs": {"guider": ["10", 0], "samples": ["14", 0]}},
        "16": {"class_type": "SaveLatent", "inputs": {"samples": ["14", 0], "filename_prefix": f"pub/{tag}"}},
        "17": {"class_type": "MaskToImage", "inputs": {"mask": ["15", 0]}},
        "18": {"class_type": "PreviewImage", "inputs": {"images": ["17", 0]}},
    }
    return wf


@pytest.mark.parametrize("kind,family", [("plus", "sdxl"), ("xlabs", "flux")])
def test_rb_guidance_workflow_with_a_public_adapter_guides_inside_its_attention_region(kind, family):
    name = write(kind, family)
    ex = harness.run_workflow(_rb_workflow(family, name, kind, f"rb_{kind}"))
    mgen = harness.node_output(ex, "15")
    assert 0.0 < float(mgen.mean()) < 1.0   # M_gen from the adapter's attention: neither empty nor everything
    ex0 = harness.run_workflow(_rb_workflow(family, name, kind, f"rb0_{kind}", p=0.0))
    assert not torch.equal(harness.node_output(ex, "14")["samples"], harness.node_output(ex0, "14")["samples"])


# ==========================================================================================================
# Saved workflows: new inputs absent = the old results


def test_saved_api_prompt_without_the_new_inputs_gives_the_same_latent_as_the_new_defaults():
    from helpers import latest_latent, workflow, write_weights
    name = write_weights("sd15", "legacy_prompt.safetensors")
    old = workflow("sd15", name, mask=True)
    assert "weight_type" not in old["14"]["inputs"] and "combine_embeds" not in old["13"]["inputs"]
    harness.run_workflow(old)
    a = latest_latent("sd15")
    new = workflow("sd15", name, mask=True)
    new["14"]["inputs"].update(weight_type="linear", embeds_scaling="V only")
    new["13"]["inputs"].update(combine_embeds="concat")
    harness.run_workflow(new)
    assert torch.equal(a, latest_latent("sd15"))


def test_saved_ui_workflow_from_before_the_new_widgets_converts_and_runs():
    import json
    import nodes
    from idportrait.nodes import migrations as M
    from workflow_tools import WorkflowFormatError, swap_stand_ins, ui_to_api
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy",
                           "sdxl_omni_id_ui_v0.2.0.json")) as f:
        old = json.load(f)
    defs = lambda t: nodes.NODE_CLASS_MAPPINGS[t].INPUT_TYPES()   # noqa: E731
    with pytest.raises(WorkflowFormatError, match="widget"):
        ui_to_api(old, defs)   # the saved file really lacks the new widgets...
    ui = M.migrate_ui_workflow(old)
    api = ui_to_api(ui, defs)   # ...and the migration gives them the defaults the frontend shows
    apply_node = next(n for n in api.values() if n["class_type"] == "IDP_OmniIDApply")
    assert apply_node["inputs"]["apply_to"] == "cond"   # the saved value, not the new default
    assert apply_node["inputs"]["weight_type"] == "linear" and apply_node["inputs"]["embeds_scaling"] == "V only"
    stand_in_files.prepare_files(ui, harness.BASE_DIR)
    ex = harness.run_workflow(swap_stand_ins(api, ui))
    assert any("images" in o for o in ex.history_result["outputs"].values())
