"""FlashFace nodes end to end in a real ComfyUI (PromptExecutor): a tiny checkpoint in the released naming
loaded by the loader node from models/flashface, references encoded by the VAE, Apply (MODEL for KSampler,
GUIDER for SamplerCustomAdvanced), the convenience sampler, and the training-free extension on SDXL/FLUX
and on SD1.5 chained with a ControlNet."""
import os
import uuid

import pytest
import safetensors.torch
import torch

import folder_paths

import harness
import idportrait.guidance.flashface_checkpoint as ffc
from idportrait.guidance import flashface as FF
from idportrait.nodes import flashface as N
from idportrait.stand_ins import models as tm
from flashface_tiny import tiny_state_dict

MODELS = os.path.join(harness.BASE_DIR, "models", "flashface")
os.makedirs(MODELS, exist_ok=True)
folder_paths.add_model_folder_path("flashface", MODELS)


@pytest.fixture(scope="module")
def files():
    """The tiny checkpoint as released (pickle) and as our converted fp16 safetensors, plus a wrong file."""
    ckpt = os.path.join(MODELS, "tiny_flashface.ckpt")
    torch.save(tiny_state_dict(context=tm.TEXT_WIDTH), ckpt)
    conv = os.path.join(MODELS, "tiny_flashface_fp16.safetensors")
    ffc.save_converted(ffc.load(ckpt, dtype="fp16", geometry="auto"), conv)
    wrong = os.path.join(MODELS, "some_sd15_model.safetensors")
    safetensors.torch.save_file({"model.diffusion_model.out.0.weight": torch.zeros(4)}, wrong)
    return {"ckpt": "tiny_flashface.ckpt", "converted": "tiny_flashface_fp16.safetensors",
            "wrong": "some_sd15_model.safetensors"}


def latent(ex, node):
    info = ex.history_result["outputs"][node]["latents"][0]
    path = os.path.join(folder_paths.get_output_directory(), info["subfolder"], info["filename"])
    return safetensors.torch.load_file(path)["latent_tensor"]


def base_graph(family="sd15", faces=2, crop="pre-cropped"):
    empty = "EmptySD3LatentImage" if family == "flux" else "EmptyLatentImage"
    return {
        "1": {"class_type": "IDP_TinyModels", "inputs": {"family": family, "weights_seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "photo of a young woman"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": empty, "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "12": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 112, "batch_size": faces,
                                                      "color": 0x996655}},
        "13": {"class_type": "IDP_FlashFaceEncodeReferences",
               "inputs": {"faces": ["12", 0], "vae": ["1", 2], "crop": crop, "size": 64, "pad_to": 4}},
    }


def save(wf, node, source):
    wf[node] = {"class_type": "SaveLatent", "inputs": {"samples": source, "filename_prefix": f"ff/{uuid.uuid4().hex}"}}


def ksampler(model, scheduler="simple", cfg=7.5, pos=("2", 0), neg=("3", 0)):
    return {"class_type": "KSampler", "inputs": {"model": model, "positive": list(pos), "negative": list(neg),
                                                 "latent_image": ["4", 0], "seed": 3, "steps": 2, "cfg": cfg,
                                                 "sampler_name": "ddim", "scheduler": scheduler, "denoise": 1.0}}


APPLY = {"lambda_feat": 1.2, "lambda_ref": 3.2, "cfg": 7.5, "launch": 750.0, "lambda_before": 0.85, "cfg_rescale": 0.5,
         "face_x1": 0.3, "face_y1": 0.1, "face_x2": 0.6, "face_y2": 0.4}


@pytest.mark.parametrize("which", ["ckpt", "converted"])
def test_released_layout_workflow_loader_apply_guider_and_sampler_node(files, which):
    wf = base_graph()
    wf["10"] = {"class_type": "IDP_FlashFaceLoader", "inputs": {"flashface_file": files[which], "weight_dtype": "fp32"}}
    wf["14"] = {"class_type": "IDP_FlashFaceApply", "inputs": {"model": ["10", 0], "references": ["13", 0],
                                                               "positive": ["2", 0], "negative": ["3", 0], **APPLY}}
    wf["5"] = ksampler(["14", 0])
    save(wf, "6", ["5", 0])
    # the GUIDER on SamplerCustomAdvanced, same noise, sampler and sigmas
    wf["20"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}}
    wf["21"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "ddim"}}
    wf["22"] = {"class_type": "BasicScheduler", "inputs": {"model": ["14", 0], "scheduler": "simple", "steps": 2,
                                                           "denoise": 1.0}}
    wf["23"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["20", 0], "guider": ["14", 1],
                                                                  "sampler": ["21", 0], "sigmas": ["22", 0],
                                                                  "latent_image": ["4", 0]}}
    save(wf, "24", ["23", 0])
    # the convenience node with the released defaults (references already padded to 4 by the encode node)
    wf["30"] = {"class_type": "IDP_FlashFaceSampler",
                "inputs": {"model": ["10", 0], "positive": ["2", 0], "negative": ["3", 0], "references": ["13", 0],
                           "latent_image": ["4", 0], "seed": 3, "steps": 2, "cfg": 7.5, "lambda_feat": 1.2,
                           "lambda_ref": 3.2, "launch": 750.0, "face_x1": 0.3, "face_y1": 0.1, "face_x2": 0.6,
                           "face_y2": 0.4, "num_references": 4}}
    save(wf, "31", ["30", 0])
    # plain model, no references: the loader's MODEL works with KSampler on its own
    wf["40"] = ksampler(["10", 0])
    save(wf, "41", ["40", 0])
    ex = harness.run_workflow(wf)
    a, b, c, plain = latent(ex, "6"), latent(ex, "24"), latent(ex, "31"), latent(ex, "41")
    assert a.shape == (1, 4, 16, 16) and torch.isfinite(a).all()
    # GUIDER == MODEL + KSampler. The guider forms u + g(y−u) + c(y_ref−y) directly; the MODEL path hands it to
    # ComfyUI's CFG as the pair (u + (final−u)/g, u), which rounds twice more: about (1 + 2g) float32 ulps of
    # |final| per step, so the two agree to rtol (1 + 2·7.5)·2⁻²⁴·steps ≈ 2e-6, not bit for bit.
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    torch.testing.assert_close(c, a)    # the sampler node == apply with the released defaults
    assert not torch.allclose(a, plain)


def test_loader_rejects_a_file_that_is_not_flashface(files):
    wf = {k: v for k, v in base_graph().items() if k in ("1", "2", "3", "4")}
    wf["10"] = {"class_type": "IDP_FlashFaceLoader", "inputs": {"flashface_file": files["wrong"],
                                                                "weight_dtype": "default"}}
    wf["5"] = ksampler(["10", 0])
    save(wf, "6", ["5", 0])
    with pytest.raises(harness.WorkflowError, match="not a FlashFace checkpoint.*ordinary SD checkpoint.*flashface.ckpt"):
        harness.run_workflow(wf)


def test_apply_rejects_a_model_that_is_not_flashface():
    wf = base_graph()
    wf["14"] = {"class_type": "IDP_FlashFaceApply", "inputs": {"model": ["1", 0], "references": ["13", 0],
                                                               "positive": ["2", 0], "negative": ["3", 0], **APPLY}}
    wf["5"] = ksampler(["14", 0])
    save(wf, "6", ["5", 0])
    with pytest.raises(harness.WorkflowError, match="not FlashFace's.*FlashFace Loader.*Training-free"):
        harness.run_workflow(wf)


@pytest.mark.parametrize("family,controlnet", [("sd15", True), ("sdxl", False), ("flux", False)])
def test_training_free_workflow(family, controlnet):
    wf = base_graph(family)
    cfg = 1.0 if family == "flux" else 5.0
    tf = {"lambda_feat": 0.85, "lambda_ref": 2.0, "cfg": cfg, "launch": 1000.0, "lambda_before": 0.85,
          "cfg_rescale": 0.0, "blocks": "decoder"}
    pos, neg = ("2", 0), ("3", 0)
    if controlnet:
        wf["20"] = {"class_type": "IDP_TinyControlNet", "inputs": {"family": family, "weights_seed": 0}}
        wf["21"] = {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1,
                                                           "color": 0xFFFFFF}}
        wf["22"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {"positive": ["2", 0], "negative": ["3", 0],
                                                                         "control_net": ["20", 0], "image": ["21", 0],
                                                                         "strength": 0.8, "start_percent": 0.0,
                                                                         "end_percent": 1.0}}
        pos, neg = ("22", 0), ("22", 1)
    wf["14"] = {"class_type": "IDP_FlashFaceTrainingFreeApply", "inputs": {
        "model": ["1", 0], "references": ["13", 0], "positive": list(pos), "negative": list(neg), **tf}}
    wf["5"] = ksampler(["14", 0], scheduler="normal", cfg=cfg, pos=pos, neg=neg)
    save(wf, "6", ["5", 0])
    wf["7"] = ksampler(["1", 0], scheduler="normal", cfg=cfg, pos=pos, neg=neg)
    save(wf, "8", ["7", 0])
    wf["15"] = {"class_type": "IDP_FlashFaceTrainingFreeApply", "inputs": {
        "model": ["1", 0], "references": ["13", 0], "positive": list(pos), "negative": list(neg),
        **{**tf, "lambda_feat": 0.0, "lambda_ref": 0.0}}}
    wf["9"] = ksampler(["15", 0], scheduler="normal", cfg=cfg, pos=pos, neg=neg)
    save(wf, "10", ["9", 0])
    ex = harness.run_workflow(wf)
    on, plain, off = latent(ex, "6"), latent(ex, "8"), latent(ex, "10")
    assert torch.isfinite(on).all() and not torch.allclose(on, plain)
    assert torch.equal(off, plain)   # through the nodes too: λ_feat = λ_ref = 0 leaves the model unchanged


def test_mix_node_weight_zero_is_the_first_person(files):
    vae = tm.tiny_vae("sd15")
    g = torch.Generator().manual_seed(0)
    a, _ = FF.encode_references(torch.rand(2, 80, 64, 3, generator=g), vae, "pre-cropped", 64, 0)
    b, _ = FF.encode_references(torch.rand(3, 64, 64, 3, generator=g), vae, "pre-cropped", 64, 4)
    mixed = N.FlashFaceMixReferences.execute(a, b, 0.25).result[0]
    assert [s.weight for s in mixed.sets] == [0.75, 0.25]
    assert [s.latents.shape[0] for s in mixed.sets] == [2, 4]            # b was padded 3 -> 4 by repetition
    assert torch.equal(b.sets[0].latents[3], b.sets[0].latents[0])
    assert a.sets[0].latents.shape[-2:] == (8, 8)                         # 64 px square -> 8x8 latents
    assert [s.weight for s in N.FlashFaceMixReferences.execute(a, b, 0.0).result[0].active_sets()] == [1.0]


def test_encode_errors_name_the_fix():
    vae = tm.tiny_vae("sd15")
    with pytest.raises(FF.FlashFaceError, match="empty.*connect one or more photos"):
        FF.encode_references(torch.zeros(0, 64, 64, 3), vae, "pre-cropped", 64, 4)
    # a photo with no face, through a real workflow: ComfyUI reports our message
    wf = base_graph(crop="detect", faces=1)
    wf["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["13", 1]}}
    with pytest.raises(harness.WorkflowError, match="no face found in reference image 1 of 1.*pre-cropped"):
        harness.run_workflow(wf)


def test_encode_detects_crops_and_levels_a_real_face():
    fx = pytest.importorskip("face_fixtures")
    try:
        photo = torch.from_numpy(fx.astronaut()).float()[None] / 255.0
    except ImportError as e:
        pytest.skip(f"sample photo unavailable: {e}")
    vae = tm.tiny_vae("sd15")
    refs, prepared = FF.encode_references(photo, vae, "detect", 224, 4)
    assert prepared.shape == (1, 224, 224, 3)
    assert refs.sets[0].latents.shape == (4, 4, 28, 28)   # released: 4 references, 224 px -> 28x28 latents
    # the crop is the face, not the whole 512 px photo: far less of the image than a plain resize keeps
    plain = FF.pad_to_square(photo, 224)
    assert (prepared - plain).abs().mean() > 0.05


def test_crop_and_level_puts_the_eyes_on_one_row():
    img = torch.zeros(100, 120, 3)
    left, right = (40.0, 40.0), (80.0, 60.0)              # right eye 20 px lower: a tilted face
    for x, y in (left, right):
        img[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3] = 1.0
    out = FF.crop_and_level(img, (10, 10, 110, 90), left, right)
    assert out.shape == (80, 100, 3)                     # the box, same size
    ys, xs = torch.nonzero(out[..., 0] > 0.5, as_tuple=True)
    blobs = [ys[xs < 50].float().mean(), ys[xs >= 50].float().mean()]
    assert abs(blobs[0] - blobs[1]) < 1.5, blobs           # levelled
    assert torch.equal(FF.crop_and_level(img, (10, 10, 110, 90), (40, 40), (80, 40)), img[10:90, 10:110])
