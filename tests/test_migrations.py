"""Saved copies of workflows from before an input rename keep loading (nodes/migrations.py)."""
import asyncio
import json
import os
import uuid

import pytest
import torch

import execution

import harness
from helpers import run_over_http
from idportrait.nodes import migrations as M
from workflow_tools import WorkflowFormatError, ui_to_api

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy")


def load(name):
    with open(os.path.join(LEGACY, name)) as f:
        return json.load(f)




def test_old_api_prompt_fails_unmigrated_and_runs_migrated():
    old = load("tiny_sd15_api_v0.1.0.json")
    ok, err, _, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), old, None))
    assert not ok and "weights_seed" in json.dumps(node_errors)   # the rename really breaks the old file...
    new = M.migrate_api_prompt(old)
    assert new["1"]["inputs"] == {"family": "sd15", "weights_seed": 5} and old["1"]["inputs"]["seed"] == 5
    harness.run_workflow(new)                                        # ...and the migration repairs it


def test_old_ui_workflow_fails_unmigrated_and_converts_migrated():
    old = load("tiny_sd15_ui_v0.1.0.json")
    with pytest.raises(WorkflowFormatError, match="widget"):
        ui_to_api(old, harness.node_defs)
    api = ui_to_api(M.migrate_ui_workflow(old), harness.node_defs)
    tiny = next(n for n in api.values() if n["class_type"] == "IDP_TinyModels")
    assert tiny["inputs"] == {"family": "sd15", "weights_seed": 5}
    ex = harness.run_workflow(api)
    assert any("images" in o for o in ex.history_result["outputs"].values())


@pytest.mark.server
def test_old_api_prompt_runs_over_http(server):
    resp, entry, _ = run_over_http(server["url"], load("tiny_sd15_api_v0.1.0.json"))
    assert resp["node_errors"] == {}
    assert entry["status"]["status_str"] == "success", entry["status"]


# --- inputs added with a new default: RB-Guidance's match / reduction (paper's Eq. 7-8) -------------------

def _rb_nodes(api):
    return {k: v for k, v in api.items() if v["class_type"] in M.ADDED_INPUTS}


def _rb_outputs(ex, api):
    """The sampled latents of the RB-Guidance sampler node and of the guider's SamplerCustomAdvanced."""
    ids = [k for k, v in api.items() if v["class_type"] in ("IDP_RBGuidanceSampler", "SamplerCustomAdvanced")]
    return [harness.node_output(ex, k)["samples"] for k in sorted(ids)]


def test_rb_guidance_saved_before_match_and_reduction_keeps_cosine_and_mean():
    old = load("rb_guidance_api_v0.2.0.json")
    assert len(_rb_nodes(old)) == 2 and all("match" not in n["inputs"] for n in _rb_nodes(old).values())
    new = M.migrate_api_prompt(old)
    for k, n in _rb_nodes(new).items():
        assert (n["inputs"]["match"], n["inputs"]["reduction"]) == ("cosine", "mean")
        assert "match" not in old[k]["inputs"]                              # the caller's prompt is not modified
    # a hand-written prompt (no export: it lacks the normalize_mask widget) gets the paper's defaults, and a
    # prompt that sets either input is left alone
    hand = json.loads(json.dumps(old))
    for n in _rb_nodes(hand).values():
        n["inputs"].pop("normalize_mask")
    assert M.migrate_api_prompt(hand) is hand
    given = json.loads(json.dumps(old))
    for n in _rb_nodes(given).values():
        n["inputs"]["reduction"] = "sum"
    assert M.migrate_api_prompt(given) is given
    # the migration is what keeps an old workflow's result: unmigrated, it now runs Eq. 7-8 as written
    kept = _rb_outputs(harness.run_workflow(new), new)
    paper = _rb_outputs(harness.run_workflow(old), old)
    assert all(not torch.allclose(a, b) for a, b in zip(kept, paper))


def test_rb_guidance_ui_workflow_saved_before_match_and_reduction():
    old = load("rb_guidance_ui_v0.2.0.json")
    with pytest.raises(WorkflowFormatError, match="no value for widget 'match'"):
        ui_to_api(old, harness.node_defs)
    api = ui_to_api(M.migrate_ui_workflow(old), harness.node_defs)
    want = M.migrate_api_prompt(load("rb_guidance_api_v0.2.0.json"))
    assert {k: v["inputs"] for k, v in _rb_nodes(api).items()} == {k: v["inputs"] for k, v in _rb_nodes(want).items()}
    # a workflow saved with the inputs (13 / 18 widget values) is not touched
    again = M.migrate_ui_workflow(M.migrate_ui_workflow(old))
    assert again == M.migrate_ui_workflow(old)


@pytest.mark.server
def test_rb_guidance_old_api_prompt_is_migrated_over_http(server):
    resp, entry, _ = run_over_http(server["url"], load("rb_guidance_api_v0.2.0.json"))
    assert resp["node_errors"] == {}
    assert entry["status"]["status_str"] == "success", entry["status"]
    ran = entry["prompt"][2]
    assert all((n["inputs"]["match"], n["inputs"]["reduction"]) == ("cosine", "mean") for n in _rb_nodes(ran).values())
