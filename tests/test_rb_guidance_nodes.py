"""RB-Guidance nodes in real ComfyUI workflows (API format, ComfyUI's own executor and nodes)."""
import os

import pytest
import safetensors.torch
import torch

import harness
from helpers import write_weights
from idportrait.guidance import rb_guidance as RG
from idportrait.nodes import rb_guidance as NRB
from idportrait.stand_ins import models as tm

IMG = 128




def _load(prefix):
    d = harness.output_file("rb")
    f = sorted(x for x in os.listdir(d) if x.startswith(prefix))[-1]
    return safetensors.torch.load_file(os.path.join(d, f))["latent_tensor"]


def _base(family, tag):
    empty = "EmptySD3LatentImage" if family == "flux" else "EmptyLatentImage"
    return {
        "1": {"class_type": "IDP_TinyModels", "inputs": {"family": family, "weights_seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a woman"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": empty, "inputs": {"width": IMG, "height": IMG, "batch_size": 1}},
        "8": {"class_type": "EmptyImage", "inputs": {"width": IMG, "height": IMG, "batch_size": 1, "color": 0x996655}},
        "9": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": IMG, "height": IMG}},
        "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 4,
                                                          "denoise": 1.0}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["11", 0], "guider": ["10", 0],
                                                                 "sampler": ["12", 0], "sigmas": ["13", 0],
                                                                 "latent_image": ["4", 0]}},
        "16": {"class_type": "SaveLatent", "inputs": {"samples": ["14", 0], "filename_prefix": f"rb/{tag}"}},
    }


def guided(family, tag, p=8.5, model=("1", 0), region="token", **extra):
    wf = _base(family, tag)
    inputs = {"model": list(model), "positive": ["2", 0], "negative": ["3", 0], "cfg": 4.0, "vae": ["1", 2], "p": p,
              "u": 0.6, "t0": 671, "feature_point": "auto", "reference": ["8", 0], "reference_mask": ["9", 0],
              "normalize_mask": True}
    if region == "token":
        inputs["token_index"] = 5          # "woman": BOS a photo of a woman
    elif region == "box":
        inputs["region_box"] = "0.2, 0.1, 0.8, 0.7"
    inputs.update(extra)
    wf["10"] = {"class_type": "IDP_RBGuidanceGuider", "inputs": inputs}
    wf["15"] = {"class_type": "IDP_RBGuidanceMaskPreview", "inputs": {"guider": ["10", 0], "samples": ["14", 0]}}
    wf["17"] = {"class_type": "MaskToImage", "inputs": {"mask": ["15", 0]}}
    wf["18"] = {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": f"rb/mask_{tag}"}}
    return wf


def plain(family, tag):
    wf = _base(family, tag)
    wf["10"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                       "cfg": 4.0}}
    return wf


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_guider_workflow_runs_end_to_end_and_p_zero_equals_cfg_guider(family):
    ex = harness.run_workflow(guided(family, f"{family}_g"))
    assert ex.history_result["outputs"]["18"]["images"]            # the M_gen preview was produced
    harness.run_workflow(guided(family, f"{family}_p0", p=0.0))
    harness.run_workflow(plain(family, f"{family}_plain"))
    g, p0, ref = _load(f"{family}_g"), _load(f"{family}_p0"), _load(f"{family}_plain")
    assert torch.equal(p0, ref)                  # p = 0: bit-identical to ComfyUI's own CFGGuider
    assert g.shape == ref.shape and not torch.equal(g, ref)


def test_guider_with_controlnet_conditioning():
    def with_cn(wf):
        wf["20"] = {"class_type": "IDP_TinyControlNet", "inputs": {"family": "sd15", "weights_seed": 0}}
        wf["21"] = {"class_type": "EmptyImage", "inputs": {"width": IMG, "height": IMG, "batch_size": 1,
                                                            "color": 0xFFFFFF}}
        wf["22"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["20", 0], "image": ["21", 0], "strength": 0.8,
            "start_percent": 0.0, "end_percent": 1.0}}
        wf["10"]["inputs"]["positive"], wf["10"]["inputs"]["negative"] = ["22", 0], ["22", 1]
        return wf
    harness.run_workflow(with_cn(guided("sd15", "cn_g", region="box")))
    harness.run_workflow(with_cn(guided("sd15", "cn_p0", p=0.0, region="box")))
    harness.run_workflow(with_cn(plain("sd15", "cn_plain")))
    harness.run_workflow(plain("sd15", "nocn_plain"))
    g, p0, ref, no_cn = (_load(t) for t in ("cn_g", "cn_p0", "cn_plain", "nocn_plain"))
    assert not torch.equal(ref, no_cn)           # the ControlNet is really in the conditioning
    assert torch.equal(p0, ref) and not torch.equal(g, ref)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_guider_combined_with_omni_id_uses_the_adapters_attention(family):
    name = write_weights(family, f"rb_{family}.safetensors")
    wf = guided(family, f"omni_{family}_g", model=("30", 0), region="adapter")
    wf.update({
        "31": {"class_type": "IDP_OmniIDLoader", "inputs": {"omni_id_file": name}},
        "32": {"class_type": "IDP_TinyClipVision", "inputs": {"weights_seed": 0}},
        "33": {"class_type": "IDP_OmniIDEncode", "inputs": {"omni_id_model": ["31", 0], "clip_vision": ["32", 0],
                                                            "faces": ["8", 0], "crop": "center"}},
        "30": {"class_type": "IDP_OmniIDApply", "inputs": {"model": ["1", 0], "omni_id_model": ["31", 0],
                                                           "identity": ["33", 0], "weight": 1.0, "start_at": 0.0,
                                                           "end_at": 1.0, "apply_to": "cond"}},
    })
    wf["13"]["inputs"]["model"] = ["30", 0]
    harness.run_workflow(wf)
    p0 = guided(family, f"omni_{family}_p0", model=("30", 0), region="adapter", p=0.0)
    p0.update({k: wf[k] for k in ("30", "31", "32", "33")})
    p0["13"]["inputs"]["model"] = ["30", 0]
    harness.run_workflow(p0)
    assert not torch.equal(_load(f"omni_{family}_g"), _load(f"omni_{family}_p0"))
    # M_gen came from the adapter's attention: the saved preview is neither empty nor full
    import numpy as np
    from PIL import Image
    d = harness.output_file("rb")
    f = sorted(x for x in os.listdir(d) if x.startswith(f"mask_omni_{family}_g"))[-1]
    mask = np.asarray(Image.open(os.path.join(d, f)).convert("L")) / 255.0
    assert 0.0 < mask.mean() < 1.0


def _ksampler_wf(tag, node, p=8.5):
    wf = _base("sd15", tag)
    for k in ("11", "12", "13", "14"):
        wf.pop(k)
    common = {"model": ["1", 0], "seed": 7, "steps": 5, "cfg": 4.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
              "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}
    if node == "KSampler":
        wf["14"] = {"class_type": "KSampler", "inputs": common}
    else:
        wf["14"] = {"class_type": "IDP_RBGuidanceSampler", "inputs": {
            **common, "vae": ["1", 2], "p": p, "u": 0.6, "t0": 671, "feature_point": "auto", "reference": ["8", 0],
            "reference_mask": ["9", 0], "more_identities": ["41", 0]}}
        # two people, each with its own region, chained through the identity node
        wf["40"] = {"class_type": "IDP_RBGuidanceIdentity", "inputs": {
            "reference": ["8", 0], "reference_mask": ["9", 0], "class_word": "woman", "clip": ["1", 1],
            "prompt": "a photo of a woman"}}
        wf["41"] = {"class_type": "IDP_RBGuidanceIdentity", "inputs": {
            "reference": ["8", 0], "reference_mask": ["9", 0], "region_box": "0.5, 0, 1, 1", "identities": ["40", 0]}}
        wf["14"]["inputs"]["region_box"] = "0, 0, 0.5, 1"
        wf["15"] = {"class_type": "MaskToImage", "inputs": {"mask": ["14", 1]}}
        wf["17"] = {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}}
    return wf


def test_ksampler_style_node_equals_ksampler_at_p_zero_and_guides_three_identities():
    harness.run_workflow(_ksampler_wf("ks_plain", "KSampler"))
    harness.run_workflow(_ksampler_wf("ks_p0", "IDP_RBGuidanceSampler", p=0.0))
    ex = harness.run_workflow(_ksampler_wf("ks_g", "IDP_RBGuidanceSampler"))
    assert torch.equal(_load("ks_p0"), _load("ks_plain"))
    assert not torch.equal(_load("ks_g"), _load("ks_plain"))
    assert ex.history_result["outputs"]["17"]["images"]


def test_identity_node_finds_the_class_word():
    out = NRB.RBGuidanceIdentity.execute(torch.rand(1, 64, 64, 3), reference_mask=torch.ones(1, 64, 64),
                                         class_word="woman", clip=tm.tiny_clip(0), prompt="portrait of a woman").result[0]
    assert len(out) == 1 and out[0].token_index == 4
    with pytest.raises(RG.RBGuidanceError, match="needs the clip"):
        NRB.RBGuidanceIdentity.execute(torch.rand(1, 64, 64, 3), class_word="woman")


def test_workflow_errors_are_clear():
    wf = guided("sd15", "err_face")
    del wf["10"]["inputs"]["reference_mask"]                          # gray image, detector finds no face
    pytest.importorskip("onnxruntime")
    with pytest.raises(harness.WorkflowError, match="no face found in reference image 1"):
        harness.run_workflow(wf)
    wf = guided("sd15", "err_mask")
    wf["9"]["inputs"]["value"] = 0.0                                  # an empty reference mask
    with pytest.raises(harness.WorkflowError, match="reference mask of image 1 is empty"):
        harness.run_workflow(wf)
    wf = guided("sd15", "err_region", region=None, region_mask=["9", 0])
    wf["9"]["inputs"]["value"] = 0.0
    wf["10"]["inputs"]["reference_mask"] = ["19", 0]
    wf["19"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": IMG, "height": IMG}}
    with pytest.raises(harness.WorkflowError, match="region mask is empty"):
        harness.run_workflow(wf)
    wf = guided("sd15", "err_vae")                                    # a FLUX VAE with an SD1.5 model
    wf["20"] = {"class_type": "IDP_TinyModels", "inputs": {"family": "flux", "weights_seed": 0}}
    wf["10"]["inputs"]["vae"] = ["20", 2]
    with pytest.raises(harness.WorkflowError, match="16-channel latents but this model uses 4.*VAE"):
        harness.run_workflow(wf)
    wf = guided("flux", "err_point", feature_point="up:1")            # a UNet point on FLUX
    with pytest.raises(harness.WorkflowError, match="does not exist on this FLUX model"):
        harness.run_workflow(wf)
    wf = guided("sd15", "err_point2", feature_point="single:3")       # a FLUX point on SD1.5
    with pytest.raises(harness.WorkflowError, match="does not exist on this sd15 UNet"):
        harness.run_workflow(wf)


# --- OmniPortrait's Pivot ID encoder at sampling time: e_mix in the prompt, M_gen from its cross-attention ----

def _pivot_file(name, seed, **meta):
    import stand_in_files
    d = stand_in_files.model_folder(harness.BASE_DIR, "pivot_id")
    stand_in_files.write_pivot_id(os.path.join(d, name), seed, metadata=meta)
    return name


def pivot_wf(tag, pivot_file, positive=("22", 0), **extra):
    """The guider with no region input: its identity's region comes from the positive conditioning's pivot token."""
    wf = guided("sd15", tag, region="none", **extra)
    wf["20"] = {"class_type": "IDP_PivotIDLoader", "inputs": {"pivot_file": pivot_file}}
    wf["21"] = {"class_type": "IDP_TinyClipVision", "inputs": {"weights_seed": 0}}
    wf["22"] = {"class_type": "IDP_PivotIDTextEncode", "inputs": {
        "clip": ["1", 1], "text": "a photo of a woman", "pivot_id": ["20", 0], "clip_vision": ["21", 0],
        "reference": ["8", 0], "class_word": "", "occurrence": 0}}
    wf["10"]["inputs"]["positive"] = list(positive)
    return wf


def test_pivot_id_workflow_takes_m_gen_from_the_cross_attention_of_e_mix():
    a, b = _pivot_file("pivot_a.safetensors", 1), _pivot_file("pivot_b.safetensors", 2)
    ex = harness.run_workflow(pivot_wf("pivot_a", a))
    mask_a, cond, index = harness.node_output(ex, "15"), harness.node_output(ex, "22"), harness.node_output(ex, "22", 1)
    ex_plain = harness.run_workflow(pivot_wf("pivot_plain", a, positive=("2", 0), token_index=5))
    plain, class_word = harness.node_output(ex_plain, "2"), harness.node_output(ex_plain, "15")
    assert index == 5                                         # BOS a photo of a woman
    # the conditioning: CLIPTextEncode's, with e_mix = W [e_ref; e_txt] + b at the class word (by hand)
    sd = safetensors.torch.load_file(os.path.join(harness.BASE_DIR, "models", "pivot_id", a))
    face = (torch.tensor([0x99, 0x66, 0x55]) / 255.0).expand(1, IMG, IMG, 3)     # the EmptyImage reference
    e_ref = tm.tiny_clip_vision(0).encode_image(face, crop=True)["image_embeds"]
    e_txt = plain[0][0][0, index]
    want = sd["proj.weight"] @ torch.cat([e_ref[0].float(), e_txt.float()]) + sd["proj.bias"]
    torch.testing.assert_close(cond[0][0][0, index], want, rtol=1e-5, atol=1e-5)
    others = [i for i in range(plain[0][0].shape[1]) if i != index]
    assert torch.equal(cond[0][0][0, others], plain[0][0][0, others])
    assert cond[0][1][RG.PIVOT_KEY] == [{"token_index": 5, "class_word": "woman", "text": "a photo of a woman"}]
    # M_gen is the cross-attention mask of that token: the same as naming token 5 explicitly on this conditioning,
    # not the mask of the plain class word, and other pivot weights move it
    assert mask_a.sum() > 0
    explicit = harness.node_output(harness.run_workflow(pivot_wf("pivot_tok", a, token_index=5)), "15")
    assert torch.equal(explicit, mask_a)
    assert not torch.equal(class_word, mask_a)
    mask_b = harness.node_output(harness.run_workflow(pivot_wf("pivot_b", b)), "15")
    assert mask_b.sum() > 0 and not torch.equal(mask_b, mask_a)


def test_pivot_id_node_warns_for_another_trunk_and_errors_clearly(caplog):
    import logging
    from idportrait.omni_encoder import trunk_identity as TI
    trained_on = TI.trunk_metadata(tm.tiny_clip_vision(0).model.state_dict(), trained=True)
    other = TI.trunk_metadata(tm.tiny_clip_vision(7).model.state_dict(), trained=True)
    pivot_ok = RG.load_pivot_model(os.path.join(harness.BASE_DIR, "models", "pivot_id",
                                                _pivot_file("pivot_ok.safetensors", 1, **trained_on)))
    pivot_other = RG.load_pivot_model(os.path.join(harness.BASE_DIR, "models", "pivot_id",
                                                   _pivot_file("pivot_other.safetensors", 1, **other)))
    clip, cv, face = tm.tiny_clip(0), tm.tiny_clip_vision(0), torch.rand(1, 64, 64, 3)
    for pv, warns in ((pivot_ok, False), (pivot_other, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            NRB.PivotIDTextEncode.execute(clip, "a photo of a woman", pv, cv, face)
        assert ("fine-tuned CLIP trunk" in caplog.text and "clip_vision_finetuned.safetensors" in caplog.text) == warns
    with pytest.raises(RG.RBGuidanceError, match="not found in the prompt"):
        NRB.PivotIDTextEncode.execute(clip, "a photo of a man", pivot_ok, cv, face)
    with pytest.raises(RG.RBGuidanceError, match="image embeddings of width 32.*CLIP vision model it was trained"):
        NRB.PivotIDTextEncode.execute(clip, "a photo of a woman", pivot_ok, tm.tiny_clip_vision(0, width=32), face)
    first = NRB.PivotIDTextEncode.execute(clip, "a woman and a woman", pivot_ok, cv, face).result[0]
    second = NRB.PivotIDTextEncode.execute(clip, "a woman and a woman", pivot_ok, cv, face, occurrence=1,
                                           conditioning=first).result
    assert RG.pivot_tokens(second[0]) == [2, 5] and second[1] == 5
    with pytest.raises(RG.RBGuidanceError, match="same text"):
        NRB.PivotIDTextEncode.execute(clip, "another woman", pivot_ok, cv, face, conditioning=first)
