"""An embedded real ComfyUI (installed by scripts/install_comfy.sh: 0.3.75, or the tree COMFY_SRC names), in-process.

Used by the tests and the demo.

Importing this module puts ComfyUI on sys.path, configures it for the CPU, loads ComfyUI's own nodes
and then this pack exactly the way ComfyUI loads a custom node (``nodes.load_custom_node`` on a
``custom_nodes/idportrait`` folder that links to the repository). The loaded package is also
reachable as ``idportrait`` (``import idportrait.guidance.patching``) so tests use the very module
objects the nodes use. Pack code imports its own modules eagerly and relatively, never lazily, so
no module of ours is loaded twice under two names.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # scripts/ is one level down
COMFY_ROOT = os.environ.get("COMFY_ROOT", os.path.expanduser("~/.cache/idportrait-comfy"))
COMFY_DIR = os.environ.get("COMFY_DIR") or os.path.join(COMFY_ROOT, "ComfyUI")   # COMFY_DIR: a tree without a venv
COMFY_PYTHON = os.path.join(COMFY_ROOT, "venv", "bin", "python")
PACK_NAME = "idportrait"

if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
    raise RuntimeError(f"No ComfyUI at {COMFY_DIR}: run scripts/install_comfy.sh first (or set COMFY_ROOT or COMFY_DIR)")

if COMFY_DIR not in sys.path:
    sys.path.insert(0, COMFY_DIR)

from comfy.cli_args import args  # noqa: E402

# The tests and the stand-ins run on the CPU; IDP_COMFY_DEVICE=auto lets ComfyUI pick a GPU (the demo, real weights).
args.cpu = os.environ.get("IDP_COMFY_DEVICE", "cpu") != "auto"
args.use_pytorch_cross_attention = True   # same flag is given to the HTTP server: same kernels, same latents
args.disable_api_nodes = True

import utils.extra_config  # noqa: E402,F401  (must precede "import nodes": nodes puts comfy/ first on sys.path)
import folder_paths  # noqa: E402

BASE_DIR = tempfile.mkdtemp(prefix="idp-comfy-base-")
for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
    os.makedirs(os.path.join(BASE_DIR, sub), exist_ok=True)
PACK_LINK = os.path.join(BASE_DIR, "custom_nodes", PACK_NAME)
os.symlink(REPO, PACK_LINK)
folder_paths.set_output_directory(os.path.join(BASE_DIR, "output"))
folder_paths.set_input_directory(os.path.join(BASE_DIR, "input"))
folder_paths.set_temp_directory(os.path.join(BASE_DIR, "temp"))

import nodes  # noqa: E402
import execution  # noqa: E402

asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
if not asyncio.run(nodes.load_custom_node(PACK_LINK)):
    raise RuntimeError("ComfyUI failed to load the pack; see the log above")

# ComfyUI registers the package under its folder path; alias it so tests can `import idportrait...`.
_loaded_as = PACK_LINK.replace(".", "_x_")
for _name in list(sys.modules):
    if _name == _loaded_as or _name.startswith(_loaded_as + "."):
        sys.modules[PACK_NAME + _name[len(_loaded_as):]] = sys.modules[_name]
pack = sys.modules[PACK_NAME]


class _StubServer:
    """What PromptExecutor needs of a server when no HTTP server runs."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.events = []
        self.times = []      # time.perf_counter() of each event (the demo times nodes with them)

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))
        self.times.append(time.perf_counter())

    def queue_updated(self):
        pass


class WorkflowError(AssertionError):
    errors: list = []     # ComfyUI's execution_error messages (dicts: node_id, node_type, exception_message, ...)


def node_defs(node_type: str) -> dict:
    """A node's INPUT_TYPES from ComfyUI's registry: what workflow_tools converts UI workflows against."""
    return nodes.NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()


def stand_in_api(ui: dict) -> dict:
    """A UI workflow as CI runs it: converted to the API format, its marked loaders swapped for the stand-ins."""
    from workflow_tools import swap_stand_ins, ui_to_api
    return swap_stand_ins(ui_to_api(ui, node_defs), ui)


def validate_workflow(prompt: dict, prompt_id: str = "validate") -> list:
    """ComfyUI's own validation of an API-format workflow; returns its output node ids, raises WorkflowError."""
    ok, err, good_outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not ok or node_errors:   # ComfyUI runs the valid outputs of a partly invalid graph: we don't
        raise WorkflowError(f"validation failed: {err} {node_errors}")
    return good_outputs


def run_workflow(prompt: dict, outputs=None, server=None, executor=None):
    """Validate and execute an API-format workflow with ComfyUI's own PromptExecutor.

    Returns the executor (``history_result["outputs"]``, ``status_messages``, ``caches``).
    Raises WorkflowError with ComfyUI's own message on a validation or execution error.
    ``server``: a _StubServer to receive ComfyUI's events (and their times) instead of a fresh one.
    ``executor``: a PromptExecutor to run in (its caches and server kept across runs) instead of a fresh one.
    """
    prompt_id = str(uuid.uuid4())
    good_outputs = validate_workflow(prompt, prompt_id)
    if executor is not None:
        ex, server = executor, executor.server
    else:
        server = server if server is not None else _StubServer()
        ex = execution.PromptExecutor(server, cache_type=False, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    ex.execute(prompt, prompt_id, {}, outputs if outputs is not None else good_outputs)
    ex.server_events = server.events
    if not ex.success:
        errs = [m for m in ex.status_messages if m[0] == "execution_error"]
        err = WorkflowError(f"execution failed: {errs}")
        err.errors = [m[1] for m in errs]
        raise err
    return ex


def node_output(ex, node_id: str, slot: int = 0):
    """A node's output value from the executor's cache (what the next node received).

    The cache's ``get`` is a coroutine on current ComfyUI (0.18+) and a plain call on 0.3.75.
    """
    entry = ex.caches.outputs.get(node_id)
    if inspect.isawaitable(entry):
        entry = asyncio.run(entry)
    if entry is None:
        raise KeyError(f"node {node_id} has no cached output")
    return entry.outputs[slot][0]


def output_file(subfolder_and_name: str) -> str:
    return os.path.join(folder_paths.get_output_directory(), subfolder_and_name)


logging.getLogger(__name__).info("ComfyUI %s loaded from %s; pack from %s", getattr(__import__("comfyui_version"), "__version__", "?"), COMFY_DIR, REPO)
