"""Saved copies of workflows from before an input rename keep loading (nodes/migrations.py)."""
import asyncio
import json
import os
import uuid

import pytest

import execution
import nodes

import harness
from helpers import run_over_http
from idportrait.nodes import migrations as M
from workflow_tools import WorkflowFormatError, ui_to_api

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy")


def load(name):
    with open(os.path.join(LEGACY, name)) as f:
        return json.load(f)


def node_defs(t):
    return nodes.NODE_CLASS_MAPPINGS[t].INPUT_TYPES()


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
        ui_to_api(old, node_defs)
    api = ui_to_api(M.migrate_ui_workflow(old), node_defs)
    tiny = next(n for n in api.values() if n["class_type"] == "IDP_TinyModels")
    assert tiny["inputs"] == {"family": "sd15", "weights_seed": 5}
    ex = harness.run_workflow(api)
    assert any("images" in o for o in ex.history_result["outputs"].values())


@pytest.mark.server
def test_old_api_prompt_runs_over_http(server):
    resp, entry, _ = run_over_http(server["url"], load("tiny_sd15_api_v0.1.0.json"))
    assert resp["node_errors"] == {}
    assert entry["status"]["status_str"] == "success", entry["status"]
