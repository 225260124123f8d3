"""Every file in example_workflows/ converts from the UI format and runs to completion with stand-in models.

The UI JSON is converted by our own code (scripts/workflow_tools.py, no browser): a renamed node, or a widget
added/removed/reordered, fails here. Loaders marked with a stand-in are swapped for the tiny models; loaders of
our own formats keep running their real loading code on tiny files written in the real format.
"""
import json
import os

import pytest


import harness
import stand_in_files
from helpers import EXAMPLES
from workflow_tools import WorkflowFormatError, ui_to_api



def prepare_files(ui):
    """Write the images and tiny weight files the stand-in run needs, named as the workflow names them."""
    stand_in_files.prepare_files(ui, harness.BASE_DIR)


def to_api(path):
    with open(path) as f:
        ui = json.load(f)
    return ui, harness.stand_in_api(ui)


def test_there_are_example_workflows():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_workflow_runs_with_stand_ins(path):
    ui, api = to_api(path)
    assert any(n["type"] == "Note" for n in ui["nodes"]), "every example explains what to download and where"
    assert any(t["class_type"].startswith("IDP_") for t in api.values())
    prepare_files(ui)
    ex = harness.run_workflow(api)
    saved = [o for o in ex.history_result["outputs"].values() if "images" in o]
    assert saved and all(o["images"] for o in saved)


def test_converter_rejects_reordered_or_renamed_widgets():
    with open(os.path.join(harness.REPO, "example_workflows", "flux_omni_id.json")) as f:
        ui = json.load(f)
    node = next(n for n in ui["nodes"] if n["type"] == "IDP_OmniIDApply")
    node["widgets_values"] = node["widgets_values"] + [0.5]          # an extra (unknown) widget value
    with pytest.raises(WorkflowFormatError, match="widget"):
        ui_to_api(ui, harness.node_defs)
    node["widgets_values"] = node["widgets_values"][:-1]
    node["widgets_values"][3] = "sideways"                           # apply_to is a fixed option list
    with pytest.raises(WorkflowFormatError, match="not an option"):
        ui_to_api(ui, harness.node_defs)
    node["type"] = "IDP_OmniIDApplyRenamed"
    with pytest.raises(WorkflowFormatError, match="not registered"):
        ui_to_api(ui, harness.node_defs)
