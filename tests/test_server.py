"""A real ComfyUI server on 127.0.0.1 with this pack in its custom_nodes, driven over HTTP."""
import json
import os

import pytest
import safetensors.torch
import torch

import harness
from helpers import http_get as _get, run_over_http
from idportrait import nodes as pack_nodes

pytestmark = pytest.mark.server


def test_object_info_lists_every_node_with_inputs(server):
    _, body = _get(server["url"] + "/object_info", timeout=30)
    info = json.loads(body)
    for cls in pack_nodes.all_nodes():
        schema = cls.GET_SCHEMA()
        assert schema.node_id in info, f"{schema.node_id} missing from /object_info"
        entry = info[schema.node_id]
        declared = {i.id for i in schema.inputs}
        listed = set(entry["input"].get("required", {})) | set(entry["input"].get("optional", {}))
        assert declared == listed
        assert entry["description"]
    failed = [ln for ln in open(server["log"]) if "IMPORT FAILED" in ln and harness.PACK_NAME in ln]
    assert not failed, failed


def test_web_extension_is_served(server):
    status, body = _get(server["url"] + f"/extensions/{harness.PACK_NAME}/js/idportrait.js")
    assert status == 200 and b"registerExtension" in body
    status, body = _get(server["url"] + "/extensions")
    assert f"/extensions/{harness.PACK_NAME}/js/idportrait.js" in json.loads(body)


def _latent_workflow(prefix):
    return {
        "1": {"class_type": "IDP_TinyModels", "inputs": {"family": "sd15", "weights_seed": 5}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "portrait photo of a woman"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "lowres"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 42, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }


def _load_latent(path):
    return safetensors.torch.load_file(path)["latent_tensor"]


def test_http_and_in_process_runs_give_the_same_latent(server):
    wf = _latent_workflow("http")
    resp, entry, _ = run_over_http(server["url"], wf)
    assert resp["node_errors"] == {}
    assert entry["status"]["status_str"] == "success", entry["status"]
    http_file = entry["outputs"]["6"]["latents"][0] if "latents" in entry["outputs"].get("6", {}) else None
    out_dir = os.path.join(server["base"], "output", "latents")
    http_latent = _load_latent(os.path.join(out_dir, sorted(os.listdir(out_dir))[-1]))

    harness.run_workflow(_latent_workflow("inproc"))
    local_dir = harness.output_file("latents")
    local = [f for f in sorted(os.listdir(local_dir)) if f.startswith("inproc")]
    in_latent = _load_latent(os.path.join(local_dir, local[-1]))
    assert http_file is None or http_file["filename"].startswith("http")
    assert in_latent.shape == (1, 4, 16, 16)
    assert torch.equal(in_latent, http_latent)
