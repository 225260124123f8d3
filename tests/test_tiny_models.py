"""The tiny-model kit: real ComfyUI classes, sampling end to end through ComfyUI's own nodes."""
import torch
import pytest

import harness
from idportrait.stand_ins import models as tm


def _workflow(family, seed=0, steps=2, size=64):
    empty = ("EmptySD3LatentImage" if family == "flux" else "EmptyLatentImage")
    return {
        "1": {"class_type": "IDP_TinyModels", "inputs": {"family": family, "weights_seed": seed}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "photo of a woman"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": empty, "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 3, "steps": steps, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"tiny_{family}"}},
    }


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_tiny_workflow_runs_end_to_end(family):
    ex = harness.run_workflow(_workflow(family))
    images = ex.history_result["outputs"]["7"]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith(f"tiny_{family}")


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_tiny_models_are_seeded_and_family_shaped(family):
    import comfy.model_base as mb
    a, b, c = tm.tiny_model(family, 0), tm.tiny_model(family, 0), tm.tiny_model(family, 1)
    expected = {"sd15": mb.BaseModel, "sdxl": mb.SDXL, "flux": mb.Flux}[family]
    assert isinstance(a.model, expected)
    sa, sb, sc = (m.model.diffusion_model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_clip_encodes_prompts_with_real_tokenizer():
    clip = tm.tiny_clip(0)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a man"), return_pooled=True)
    cond2, _ = clip.encode_from_tokens(clip.tokenize("a photo of a woman"), return_pooled=True)
    assert cond.shape == (1, 77, tm.TEXT_WIDTH) and pooled.shape == (1, tm.TEXT_WIDTH)
    assert not torch.equal(cond, cond2)
