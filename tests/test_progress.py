"""Our sampler nodes move the UI's progress bar: a real server's websocket carries their progress messages.

Current ComfyUI throttles ProgressBar messages (the first and the final always go out), so the test asks for
the final one of each sampler, not for a count per step.
"""
import os

import pytest

import stand_in_files
from helpers import run_over_http

pytestmark = pytest.mark.server
STEPS = 3


def _text(clip_node, text):
    return {"class_type": "CLIPTextEncode", "inputs": {"clip": [clip_node, 1], "text": text}}


def _sampler_progress(events, node_id):
    return [e["data"] for e in events if e["type"] == "progress" and str(e["data"].get("node")) == node_id]


def _assert_bar_completes(entry, events, node_id):
    assert entry["status"]["status_str"] == "success", entry["status"]
    bar = _sampler_progress(events, node_id)
    assert bar, f"no progress message from node {node_id}"
    assert bar[-1]["max"] == STEPS and bar[-1]["value"] == STEPS, bar


def test_flashface_sampler_reports_progress(server):
    folder = os.path.join(server["base"], "models", "flashface")
    os.makedirs(folder, exist_ok=True)
    stand_in_files.write_flashface(os.path.join(folder, "progress_flashface.ckpt"))
    wf = {
        "1": {"class_type": "IDP_TinyModels", "inputs": {"family": "sd15", "weights_seed": 0}},
        "2": _text("1", "a photo of a woman"), "3": _text("1", "blurry"),
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "10": {"class_type": "IDP_FlashFaceLoader", "inputs": {"flashface_file": "progress_flashface.ckpt",
                                                               "weight_dtype": "fp32"}},
        "11": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x886644}},
        "12": {"class_type": "IDP_FlashFaceEncodeReferences", "inputs": {"faces": ["11", 0], "vae": ["1", 2],
                                                                         "crop": "pre-cropped", "size": 64, "pad_to": 2}},
        "13": {"class_type": "IDP_FlashFaceSampler", "inputs": {
            "model": ["10", 0], "positive": ["2", 0], "negative": ["3", 0], "references": ["12", 0],
            "latent_image": ["4", 0], "seed": 1, "steps": STEPS, "cfg": 7.5, "lambda_feat": 1.2, "lambda_ref": 3.2,
            "launch": 750.0, "face_x1": 0.3, "face_y1": 0.1, "face_x2": 0.6, "face_y2": 0.4, "num_references": 2}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "progress/flashface"}},
    }
    _, entry, events = run_over_http(server["url"], wf)
    _assert_bar_completes(entry, events, "13")


def test_rb_guidance_sampler_reports_progress(server):
    wf = {
        "1": {"class_type": "IDP_TinyModels", "inputs": {"family": "sd15", "weights_seed": 0}},
        "2": _text("1", "a photo of a woman"), "3": _text("1", "blurry"),
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "11": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0x886644}},
        "12": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 128, "height": 128}},
        "13": {"class_type": "IDP_RBGuidanceSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0, "vae": ["1", 2],
            "p": 8.5, "u": 1.0, "t0": 671, "feature_point": "auto", "reference": ["11", 0],
            "reference_mask": ["12", 0], "region_box": "0.2,0.2,0.8,0.8"}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "progress/rb"}},
    }
    _, entry, events = run_over_http(server["url"], wf)
    _assert_bar_completes(entry, events, "13")
