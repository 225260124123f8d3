"""A real ComfyUI server on 127.0.0.1 with this pack in its custom_nodes, driven over HTTP."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest
import safetensors.torch
import torch

import harness
from idportrait import nodes as pack_nodes

pytestmark = pytest.mark.server


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def _post(url, payload, timeout=10):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server():
    base = tempfile.mkdtemp(prefix="idp-server-")
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(harness.REPO, os.path.join(base, "custom_nodes", harness.PACK_NAME))
    port = _free_port()
    log_path = os.path.join(base, "server.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
         "--disable-api-nodes", "--disable-auto-launch", "--use-pytorch-cross-attention"],
        cwd=harness.COMFY_DIR, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if _get(url + "/system_stats", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("ComfyUI server did not start:\n" + open(log_path).read()[-4000:])
            time.sleep(0.5)
        yield {"url": url, "base": base, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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
        "1": {"class_type": "IDP_TinyModels", "inputs": {"family": "sd15", "seed": 5}},
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
    resp = _post(server["url"] + "/prompt", {"prompt": wf, "client_id": str(uuid.uuid4())})
    assert resp["node_errors"] == {}
    pid = resp["prompt_id"]
    deadline = time.time() + 120
    while True:
        hist = json.loads(_get(server["url"] + f"/history/{pid}")[1])
        if pid in hist and hist[pid]["status"].get("completed"):
            break
        assert time.time() < deadline, "workflow did not complete over HTTP"
        if pid in hist:
            assert hist[pid]["status"]["status_str"] != "error", hist[pid]["status"]
        time.sleep(0.3)
    assert hist[pid]["status"]["status_str"] == "success"
    http_file = hist[pid]["outputs"]["6"]["latents"][0] if "latents" in hist[pid]["outputs"].get("6", {}) else None
    out_dir = os.path.join(server["base"], "output", "latents")
    http_latent = _load_latent(os.path.join(out_dir, sorted(os.listdir(out_dir))[-1]))

    harness.run_workflow(_latent_workflow("inproc"))
    local_dir = harness.output_file("latents")
    local = [f for f in sorted(os.listdir(local_dir)) if f.startswith("inproc")]
    in_latent = _load_latent(os.path.join(local_dir, local[-1]))
    assert http_file is None or http_file["filename"].startswith("http")
    assert in_latent.shape == (1, 4, 16, 16)
    assert torch.equal(in_latent, http_latent)
