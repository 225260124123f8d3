"""FlashFace nodes end to end in a real ComfyUI (PromptExecutor): a tiny checkpoint in the released naming
loaded by the loader node from models/flashface, references encoded by the VAE, Apply (MODEL for KSampler,
GUIDER for SamplerCustomAdvanced), the convenience sampler, and the training-free extension on SDXL/FLUX
and on SD1.5 chained with a ControlNet."""
import math
import os
import uuid

import pytest
import safetensors.torch
import torch

import folder_paths
import nodes
import numpy as np

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


# --- reference preparation as released (ali-vilab/FlashFace@fff0f078: detect_face, crop_face, PadToSquare) ------

@pytest.mark.parametrize("left,right,want", [
    ((40, 40), (80, 60), math.degrees(math.atan(20 / 40))),     # right eye lower: turn counter-clockwise
    ((40, 60), (80, 40), -math.degrees(math.atan(20 / 40))),    # right eye higher: clockwise
    ((80, 40), (40, 60), math.degrees(math.atan(20 / 40))),     # eyes swapped: the release's law-of-cosines angle
    ((50, 40), (50, 80), 0.0),                                  # one above the other, right lower: no turn
    ((50, 80), (50, 40), -90.0),                                # ... right higher: a quarter turn
    ((40, 40), (80, 40), 0.0),                                  # level
])
def test_released_eye_angle_by_hand(left, right, want):
    assert FF.released_eye_angle(left, right) == pytest.approx(want, abs=1e-9)


def test_crop_rounds_the_box_pads_outside_black_and_turns_as_pil():
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    img = (torch.randint(0, 256, (100, 120, 3), generator=g).float() / 255)
    # bbox.round(): 10.5 -> 10 and 90.5 -> 90 (half to even), 9.6 -> 10, 110.4 -> 110; the box runs off the left
    out = FF.crop_and_level(img, (-5.4, 9.6, 110.4, 90.5), (40, 40), (80, 40))
    assert out.shape == (80, 115, 3)
    assert torch.equal(out[:, :5], torch.zeros(80, 5, 3))               # outside the photo: black
    assert torch.equal(out[:, 5:], img[10:90, 0:110])                   # level eyes: no turn, exact pixels
    turned = FF.crop_and_level(img, (10.5, 10, 110, 90), (40, 40), (80, 60))
    pil = Image.fromarray((img.numpy() * 255 + 0.5).astype("uint8")).crop((10, 10, 110, 90)).rotate(
        math.degrees(math.atan(0.5)))                                   # nearest, about the centre, black fill
    assert torch.equal(turned, torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255))
    with pytest.raises(FF.FlashFaceError, match="empty face box"):
        FF.crop_and_level(img, (10, 10, 10.2, 50), (0, 0), (1, 0))


class _CanvasDetector:
    """Records what it is given; returns faces at fixed places of the 640 px square."""

    def __init__(self, boxes):
        self.boxes, self.seen = boxes, []

    def detect(self, rgb):
        from idportrait.face.types import FaceDetection
        self.seen.append(rgb.copy())
        return [FaceDetection(bbox=np.array(b, np.float32), kps=np.array([[b[0] + 10, b[1] + 10]] * 5, np.float32),
                              score=0.9) for b in self.boxes]


def test_detection_runs_on_the_photo_padded_to_640_and_maps_back(caplog):
    import logging
    from PIL import Image
    photo = (torch.arange(100 * 200 * 3) % 251).reshape(1, 100, 200, 3).float() / 255   # 200 x 100: scale 3.2
    det = _CanvasDetector([(64, 224, 192, 352), (320, 192, 640, 480)])
    found = FF.detect_as_released(photo[0], det)
    canvas = det.seen[0]
    pil = Image.fromarray((photo[0].numpy() * 255 + 0.5).astype("uint8")).resize((640, 320), Image.BICUBIC)
    assert canvas.shape == (640, 640, 3) and np.array_equal(canvas[160:480], np.asarray(pil))
    assert not canvas[:160].any() and not canvas[480:].any()            # centred black padding (get_padding)
    # largest first; x / 3.2, (y - 160) / 3.2
    np.testing.assert_allclose(found[0].bbox, [100, 10, 200, 100], rtol=0, atol=1e-4)
    np.testing.assert_allclose(found[1].bbox, [20, 20, 60, 60], rtol=0, atol=1e-4)
    np.testing.assert_allclose(found[1].kps[0], [(64 + 10) / 3.2, (224 + 10 - 160) / 3.2], rtol=0, atol=1e-4)
    # two faces: the largest, with a warning (the release refuses the photo)
    with caplog.at_level(logging.WARNING):
        refs, prepared = FF.encode_references(photo, tm.tiny_vae("sd15"), "detect", 64, 0, detector=det)
    assert "2 faces in reference image 1; using the largest" in caplog.text
    want = FF.pad_to_square(FF.crop_and_level(photo[0], found[0].bbox, found[0].kps[0], found[0].kps[1])[None], 64)
    assert torch.equal(prepared, want)
    assert FF.DETECT_SIZE == 640 and FF.DETECT_SCORE == 0.6


def test_released_detector_settings_and_real_photo():
    fx = pytest.importorskip("face_fixtures")
    pytest.importorskip("onnxruntime")
    det = FF.references._released_detector()
    assert (det.score_threshold, det.max_size) == (0.6, 640)
    try:
        photo = torch.from_numpy(fx.grace_hopper().copy()).float()[None] / 255.0
    except ImportError as e:
        pytest.skip(f"sample photo unavailable: {e}")
    found = FF.detect_as_released(photo[0])
    assert len(found) == 1 and found[0].score > 0.6                     # one face, as the release requires
    x1, y1, x2, y2 = found[0].bbox
    assert 0 <= x1 < x2 <= photo.shape[2] and 0 <= y1 < y2 <= photo.shape[1]   # in the photo's own pixels


def test_text_encode_released_postfixes_are_off_by_default():
    clip = tm.tiny_clip(0)
    plain_pos, plain_neg = N.FlashFaceTextEncode.execute(clip, "a young woman", "").result
    want = nodes.CLIPTextEncode().encode(clip, "a young woman")[0]
    assert torch.equal(plain_pos[0][0], want[0][0])                     # off: CLIPTextEncode's conditioning
    pos, neg = N.FlashFaceTextEncode.execute(clip, "a young woman", "", True).result
    assert FF.with_released_postfixes("a young woman", "") == ("a young woman, " + FF.POSITIVE_POSTFIX,
                                                               FF.NEGATIVE_POSTFIX)
    assert FF.with_released_postfixes("a", "hat")[1] == "hat, " + FF.NEGATIVE_POSTFIX
    want_pos = nodes.CLIPTextEncode().encode(clip, "a young woman, " + FF.POSITIVE_POSTFIX)[0]
    assert torch.equal(pos[0][0], want_pos[0][0])
    # the release keeps 77 tokens: a long negative prompt is cut to its first chunk
    long_neg = ", ".join(["very blurry photo"] * 30)
    cut = N.FlashFaceTextEncode.execute(clip, "a", long_neg, True).result[1]
    full = N.FlashFaceTextEncode.execute(clip, "a", long_neg, False).result[1]
    assert cut[0][0].shape[1] == 77 and full[0][0].shape[1] > 77
