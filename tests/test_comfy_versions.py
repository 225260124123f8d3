"""The ComfyUI this suite runs on is one the pack declares (pyproject's requires-comfyui), and the harness
reads ComfyUI's internals the way this version exposes them."""
import os
import tomllib

from packaging.specifiers import SpecifierSet
from packaging.version import Version

import harness


def test_running_comfyui_is_inside_the_declared_range():
    with open(os.path.join(harness.REPO, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["tool"]["comfy"]["requires-comfyui"]
    import comfyui_version
    assert Version(comfyui_version.__version__) in SpecifierSet(declared), (
        f"ComfyUI {comfyui_version.__version__} is tested but pyproject.toml declares {declared}: widen the range")


def test_node_output_reads_the_execution_cache_on_this_version():
    wf = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 4, "batch_size": 2, "color": 0}},
          "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    ex = harness.run_workflow(wf)
    assert tuple(harness.node_output(ex, "1").shape) == (2, 4, 8, 3)
