"""Test harness: the embedded real ComfyUI of scripts/embedded_comfy.py (see there)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from embedded_comfy import *  # noqa: E402,F401,F403
from embedded_comfy import BASE_DIR, COMFY_DIR, PACK_NAME, REPO, pack, run_workflow, output_file  # noqa: E402,F401
