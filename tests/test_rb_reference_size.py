"""RB-Guidance references of any size (a phone photo) cost what a working-size reference costs, the reference pass
honours Cancel and reports progress, and a non-finite guidance gradient stops sampling with a clear error.

Measured figures (time, memory per reference size) are in bench/rb_reference_bench.py; these tests check
properties that do not depend on the machine: what size the VAE sees, and how many draws run after Cancel."""
import math
import uuid

import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import execution

import harness
from embedded_comfy import _StubServer   # scripts/ (on sys.path through harness)
from idportrait.errors import RBGuidanceError
from idportrait.guidance import rb_guidance as RG
from idportrait.guidance.rb_guidance import regions
from idportrait.guidance.run_state import Trace
from idportrait.stand_ins import models as tm

SIZE = 16   # latent side of the generation


def _models(family="sd15"):
    with torch.inference_mode():
        return tm.tiny_model(family, 0), tm.tiny_vae(family)


def _photo(side, face, seed=0):
    """A (1, side, side, 3) photo and the (1, side, side) mask of its face: a square of ``face`` px at 40 %, 30 %."""
    img = torch.rand(1, side, side, 3, generator=torch.Generator().manual_seed(seed))
    y0, x0 = int(0.3 * side), int(0.4 * side)
    mask = torch.zeros(1, side, side)
    mask[:, y0:y0 + face, x0:x0 + face] = 1.0
    img[:, y0:y0 + face, x0:x0 + face] = torch.tensor([0.9, 0.6, 0.5])   # the "face" has its own colour
    return img, mask


def _encoded(model, vae, img, mask):
    ident = RG.RBIdentity(img, reference_mask=mask, region_box=(0.25, 0.25, 0.75, 0.75))
    g = RG.RBGuider(model, [ident], vae, RG.RBSettings(p=8.5))
    with Trace() as t:
        g.prepare_references()
    (lat, m), = g._refs
    return t.of("rb.reference_encoded")[0]["shape"], lat, m


def test_the_vae_sees_a_bounded_size_whatever_the_photos_size():
    model, vae = _models()
    assert regions.reference_size("sd15") == 512
    small_shape, _, _ = _encoded(model, vae, *_photo(512, 128))      # at the working size: used as it is
    assert small_shape == (1, 512, 512, 3)
    for side in (2048,):
        shape, lat, m = _encoded(model, vae, *_photo(side, side // 4))   # a face a quarter of the photo's side
        assert shape == (1, 512, 512, 3) == small_shape                   # same VAE input as the 512 px reference
        assert lat.shape[-2:] == (64, 64)
        # cropped around the face (twice its box), not the whole photo shrunk: the face is half the crop's side
        frac = float((m > 0.5).float().mean())
        assert abs(frac - 0.25) < 0.02, frac


def test_a_phone_photo_without_a_mask_is_searched_cropped_and_masked_at_the_working_size():
    """No reference mask: the face is found on a copy at the working size, cropped from the photo itself, and its
    mask drawn at the crop's resolution (the same face as in the 512 px photo)."""
    import numpy as np
    from PIL import Image
    import stand_in_files
    model, vae = _models()
    photo = Image.fromarray(stand_in_files.face_photo())

    def prepared(side):
        img = torch.from_numpy(np.asarray(photo.resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0)[None]
        g = RG.RBGuider(model, [RG.RBIdentity(img, region_box=(0.25, 0.25, 0.75, 0.75))], vae, RG.RBSettings(p=8.5))
        with Trace() as t:
            g.prepare_references()
        return t.of("rb.reference_encoded")[0]["shape"], g._refs[0][1]
    shape_512, _ = prepared(512)
    for side in (1024, 3000):
        shape, m = prepared(side)
        assert shape[1] <= 512 and shape[2] <= 512 and shape_512 == (1, 512, 512, 3)
        frac = float(m.float().mean())   # the face box's ellipse in a crop twice the box: about pi/16 of it
        assert 0.12 < frac < 0.28, frac


def test_the_crop_keeps_the_face_and_a_small_face_is_not_upscaled():
    img, mask = _photo(2048, 200)
    out, m = regions.fit_reference(img, mask, 512)
    # 2 x 200 px = 400 px crop, rounded down to a multiple of 64: 384, never stretched to 512
    assert out.shape == (1, 384, 384, 3) and m.shape == (1, 384, 384)
    face = out[0][m[0] > 0.5]
    torch.testing.assert_close(face.mean(0), torch.tensor([0.9, 0.6, 0.5]), atol=0.03, rtol=0)
    # a reference no larger than the working size is not touched at all
    small, small_mask = _photo(256, 64)
    same, same_mask = regions.fit_reference(small, small_mask, 512)
    assert same is small and same_mask is small_mask


def _workflow(ensemble, steps=4):
    return {
        "1": {"class_type": "IDP_TinyModels", "inputs": {"family": "sd15", "weights_seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a woman"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE * 8, "height": SIZE * 8, "batch_size": 1}},
        "8": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0x996655}},
        "9": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 128, "height": 128}},
        "10": {"class_type": "IDP_RBGuidanceSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0, "vae": ["1", 2],
            "p": 8.5, "u": 0.6, "t0": 671, "feature_point": "auto", "reference": ["8", 0], "reference_mask": ["9", 0],
            "region_box": "0.2, 0.2, 0.8, 0.8", "ensemble": ensemble}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "rb_interrupt/x"}},
    }


def test_cancel_during_the_reference_pass_stops_it_and_progress_is_reported():
    """ComfyUI's executor, a client that presses Cancel when the reference pass first reports progress: the
    pass stops after the draw it was running, and the prompt ends as interrupted (not an error)."""
    ensemble, seen = 16, []

    def client(value, total, preview, node_id=None, **kw):   # what the server's progress hook sees
        seen.append((value, total))
        if total == ensemble:
            comfy.model_management.interrupt_current_processing(True)

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(client)
    try:
        prompt, pid = _workflow(ensemble), str(uuid.uuid4())
        harness.validate_workflow(prompt, pid)
        ex = execution.PromptExecutor(_StubServer(), cache_type=False,
                                      cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        with Trace() as t:
            ex.execute(prompt, pid, {}, ["11"])
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        comfy.model_management.interrupt_current_processing(False)
    assert (1, ensemble) in seen                       # the reference pass reports its draws
    assert t.count("rb.reference_draw") == 1           # ... and stopped at the next one
    assert [m[0] for m in ex.status_messages if m[0] == "execution_interrupted"]
    assert not [m for m in ex.status_messages if m[0] == "execution_error"]


def test_without_cancel_every_draw_runs_once_per_run():
    ex = None
    with Trace() as t:
        ex = harness.run_workflow(_workflow(3))
    assert ex.success and t.count("rb.reference_draw") == 3


def test_a_non_finite_guidance_gradient_stops_sampling_with_a_clear_error():
    """A truncated pass whose features go NaN (here: an attention patch poisons only that pass) must not write NaN
    into the latent."""
    model, vae = _models()
    poisoned = model.clone()

    def nan_in_guided_pass(n, extra_options):
        cap = extra_options.get(RG.CAPTURE_KEY)
        return n * float("nan") if cap is not None and cap.z is not None else n
    poisoned.set_model_attn1_output_patch(nan_in_guided_pass)
    ident = RG.RBIdentity(_photo(128, 64)[0], reference_mask=torch.ones(1, 128, 128), region_box=(0.2, 0.2, 0.8, 0.8))
    g = RG.RBGuider(poisoned, [ident], vae, RG.RBSettings(p=8.5, u=0.6))
    g.set_conds(tm.tiny_conditioning("sd15", 1), tm.tiny_conditioning("sd15", 2))
    g.set_cfg(4.0)
    lat = torch.zeros(1, 4, SIZE, SIZE)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4)
    with pytest.raises(RBGuidanceError, match="guidance gradient at sigma .* is NaN or infinite.*Lower p"):
        with torch.inference_mode():
            g.sample(comfy.sample.prepare_noise(lat, 0), lat, comfy.samplers.sampler_object("euler"), sigmas,
                     seed=0, disable_pbar=True)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_strength_is_refused_by_the_settings(bad):
    with pytest.raises(RBGuidanceError, match="p must be a finite number"):
        RG.RBSettings(p=bad).validate()
