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
from helpers import sample
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


def _diffusers_unet(model):
    diffusers = pytest.importorskip("diffusers")
    dm = model.model.diffusion_model
    unet = diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=tm.TEXT_WIDTH,
        attention_head_dim=8, norm_num_groups=32).eval()
    ldm = dm.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    missing, unexpected = unet.load_state_dict({k: ldm[v] for k, v in mapping.items() if v in ldm}, strict=False)
    assert not missing and not unexpected
    return unet


DIFFUSERS_CASES = [("full-face", True), ("plus", True), ("basic", True), ("faceid", True), ("faceid-plus", True),
                   ("faceid-plus", False)]


@pytest.mark.parametrize("kind,shortcut", DIFFUSERS_CASES, ids=[f"{k}-{'v2' if s else 'v1'}" for k, s in DIFFUSERS_CASES])
def test_sd15_layout_matches_diffusers_ip_adapter(kind, shortcut):
    """Differential: diffusers converts the same public state dict itself (its image projection and its
    IPAdapterAttnProcessor2_0 numbering) and runs its UNet with the same UNet weights."""
    model = tm.tiny_model("sd15", 0)
    unet = _diffusers_unet(model)
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
