"""Bad input gets an error that names the fix, at the node that can fix it (found by probing every node)."""
import os

import pytest
import safetensors.torch
import torch

import folder_paths

import harness
from idportrait.guidance import flashface as FF
from idportrait.guidance import ip_adapter as IP
from idportrait.nodes import face_tools as FT
from idportrait.nodes import flashface as FN
from idportrait.nodes import omni_id as N
from idportrait.stand_ins import models as tm
from idportrait.face.types import rgb_images


def test_rgb_images_converts_gray_and_alpha_and_rejects_empty():
    gray = torch.rand(2, 8, 8, 1)
    assert torch.equal(rgb_images(gray, "x"), gray.expand(2, 8, 8, 3))
    ga = torch.rand(1, 8, 8, 2)
    assert torch.equal(rgb_images(ga, "x"), ga[..., :1].expand(1, 8, 8, 3))
    rgba = torch.rand(1, 8, 8, 4)
    assert torch.equal(rgb_images(rgba, "x"), rgba[..., :3])
    with pytest.raises(ValueError, match="Node X: the image batch is empty; connect"):
        rgb_images(torch.zeros(0, 8, 8, 3), "Node X")


def _ipadapter_dir():
    d = os.path.join(harness.BASE_DIR, "models", "ipadapter")
    os.makedirs(d, exist_ok=True)
    folder_paths.add_model_folder_path("ipadapter", d)
    return d


@pytest.mark.parametrize("kind,keys,says", [
    ("basic", {"image_proj.proj.weight": (16, 8), "image_proj.norm.weight": (4,)},
     r"looks like an IP-Adapter \(the CLIP image embedding to 4 tokens\) file but its image projection does not load"),
    ("plus", {"image_proj.latents": (1, 4, 8), "image_proj.proj_in.weight": (8, 8)},
     r"looks like an IP-Adapter plus / plus-face .* file but its image projection does not load"),
    ("FaceID", {"image_proj.proj.0.weight": (16, 8), "image_proj.proj.2.weight": (16, 16),
                "image_proj.norm.weight": (4,)}, "FaceID-style projection of a 8-wide embedding"),
])
def test_ip_adapter_loader_names_the_kind_of_a_damaged_file(kind, keys, says):
    sd = {k: torch.zeros(s) for k, s in keys.items()}
    sd["ip_adapter.1.to_k_ip.weight"] = torch.zeros(8, 4)
    name = f"damaged_{kind}.safetensors"
    safetensors.torch.save_file(sd, os.path.join(_ipadapter_dir(), name))
    with pytest.raises(ValueError, match=says):
        N.IPAdapterFullFaceLoader.execute(name)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_identity_from_another_encoder_is_refused_when_applied(family):
    model = tm.tiny_model(family, 0)
    dm = model.model.diffusion_model
    if family == "flux":
        ad = IP.FluxIdentityAdapter(32, dm.hidden_size, len(dm.double_blocks), len(dm.single_blocks))
    else:
        ad = IP.SDIdentityAdapter(32, tm.TEXT_WIDTH, IP.SDIdentityAdapter.inner_dims_of(dm))
    with pytest.raises(ValueError, match="tokens of width 48 but these identity weights take width 32: encode"):
        IP.IdentityInjector(ad, torch.zeros(1, 8, 48), family)
    from idportrait.guidance import infinite_id as IID
    with pytest.raises(ValueError, match="tokens of width 48"):
        IID.InfiniteIDInjector(ad, torch.zeros(1, 8, 48), "flux" if family == "flux" else "unet")
    IP.IdentityInjector(ad, torch.zeros(1, 8, 32), family)   # the right width is accepted
    with pytest.raises(ValueError, match="holds 2 identities; Infinite-ID takes one"):
        IID.InfiniteIDInjector(ad, torch.zeros(2, 8, 32), "flux" if family == "flux" else "unet")


def test_face_detect_align_empty_batch_and_gray_images():
    fa = FT.FaceDetectorLoader.execute(0.5, 640, "CPU").result[0]
    with pytest.raises(ValueError, match="the image batch is empty.*skip_images_without_face"):
        FT.FaceDetectAlign.execute(fa, torch.zeros(0, 64, 64, 3), "112", 0.0, "largest", 0, 0, True)
    gray = torch.full((1, 64, 64, 1), 0.5)   # no face, but processed as RGB (skipped, not a shape error)
    out = FT.FaceDetectAlign.execute(fa, gray, "112", 0.0, "largest", 0, 0, True).result
    assert out[0].shape[0] == 0 or out[0].shape[-1] == 3


def test_flashface_one_mask_and_sd15_latents_only(tmp_path):
    from flashface_tiny import tiny_state_dict
    path = tmp_path / "tiny_flashface.ckpt"
    torch.save(tiny_state_dict(context=tm.TEXT_WIDTH), str(path))
    model = FF.load_flashface(str(path))
    refs = FF.FlashFaceReferences.single(torch.randn(1, 4, 8, 8))
    with pytest.raises(FF.FlashFaceError, match="2 masks; FlashFace takes one face position.*single mask"):
        FF.apply_flashface(model, refs, FF.Guidance(), mask=torch.ones(2, 64, 64))
    FF.apply_flashface(model, refs, FF.Guidance(), mask=torch.ones(1, 64, 64))
    pos = tm.tiny_conditioning("sd15", 1)
    with pytest.raises(FF.FlashFaceError, match="16 channels; FlashFace is an SD1.5 model"):
        FN.FlashFaceSampler.execute(model, pos, pos, refs, {"samples": torch.randn(1, 16, 8, 8)}, 0, 1, 7.5, 1.2, 3.2,
                                    750.0, 0.0, 0.0, 0.0, 0.0, 4)


def test_rb_guidance_warns_when_an_attention_region_was_always_empty(caplog):
    import logging
    from idportrait.guidance import rb_guidance as RG
    g = object.__new__(RG.RBGuider)   # only the bookkeeping of a finished run is needed
    g._sources = [("token", 5), None, ("adapter", 0)]
    g.trace = [RG.StepTrace(2.0, False), RG.StepTrace(1.0, True, mask_cells=[0, 12, 3]),
               RG.StepTrace(0.5, True, mask_cells=[0, 12, 0])]
    with caplog.at_level(logging.WARNING):
        g._warn_empty_regions()
    assert "identity 1 (from token 5) was empty at every guided step" in caplog.text
    assert "identity 2" not in caplog.text and "identity 3" not in caplog.text   # a box, and a region seen once


def test_metrics_missing_face_zero_scores_zero_when_no_generated_image_has_a_face():
    import numpy as np
    from idportrait.face import evaluate as E
    from idportrait.face.types import FaceDetection

    class BrightOnly:   # "finds" a centred face in bright images only
        def detect(self, rgb):
            if rgb.mean() < 128:
                return []
            h, w = rgb.shape[:2]
            kps = np.array([[0.35 * w, 0.4 * h], [0.65 * w, 0.4 * h], [0.5 * w, 0.55 * h], [0.4 * w, 0.7 * h],
                            [0.6 * w, 0.7 * h]], dtype=np.float32)
            return [FaceDetection(np.array([0.2 * w, 0.2 * h, 0.8 * w, 0.8 * h], dtype=np.float32), kps, 0.9)]

    emb = E.Embedders(detector=BrightOnly(), id_embed=lambda x: torch.nn.functional.normalize(torch.rand(x.shape[0], 8), dim=-1),
                      clip_image=lambda x: torch.rand(x.shape[0], 8))
    gen, refs = torch.zeros(2, 64, 64, 3), torch.ones(1, 64, 64, 3)
    zero = E.evaluate(gen, refs, emb, missing_face="zero")
    assert zero["mean"]["id_sim"] == 0.0 and zero["mean"]["clip_i"] == 0.0 and zero["mean"]["sim_ref"] == 0.0
    assert all(r["id_sim"] == 0.0 for r in zero["per_image"])
    assert any("no face found in any generated image" in n for n in zero["notes"])
    excluded = E.evaluate(gen, refs, emb, missing_face="exclude")
    assert "id_sim" not in excluded["mean"] and excluded["face_detection_rate"] == 0.0
