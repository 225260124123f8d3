"""Graph surgery for the demo on API-format prompts converted from example_workflows/ (scripts/workflow_tools.py).

* ``plain_graph``: the same graph without the pack's identity nodes, the baseline the demo times side by side:
  Apply Omni-ID / Apply Infinite-ID bypassed (their MODEL input wired through); the FlashFace and RB-Guidance
  samplers become a KSampler with the same settings (FlashFace's on the SD1.5 checkpoint's own model, with
  ``ddim`` + ``simple``, the released sampler); the training-free and RB-Guidance guiders become a CFGGuider with
  the same cfg; metric, identity-saving and mask-preview nodes are dropped.
* ``bypass``: a node's outputs wired to some of its inputs (e.g. a ControlNet apply with no ControlNet file).
* helpers to find the sampler and its steps, the positive prompt and the image inputs.

Needs the embedded ComfyUI (node classes come from ComfyUI's registry).
"""
from __future__ import annotations

import copy
from typing import Iterable, Optional

SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced", "IDP_FlashFaceSampler",
            "IDP_RBGuidanceSampler")
# Nodes of the pack that change what the sampler computes (the demo's "pack nodes" in the timing comparison).
IDENTITY_NODES = ("IDP_OmniIDApply", "IDP_InfiniteIDApply", "IDP_FlashFaceTrainingFreeApply", "IDP_FlashFaceApply",
                  "IDP_FlashFaceSampler", "IDP_RBGuidanceGuider", "IDP_RBGuidanceSampler")
DROPPED_IN_PLAIN = ("IDP_FaceMetrics", "IDP_IdentitySave", "IDP_RBGuidanceMaskPreview")
KSAMPLER_INPUTS = ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                   "latent_image", "denoise")


def _cls(class_type: str):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[class_type]


def n_outputs(class_type: str) -> int:
    return len(getattr(_cls(class_type), "RETURN_TYPES", ()) or ())


def is_output_node(class_type: str) -> bool:
    return getattr(_cls(class_type), "OUTPUT_NODE", False) is True


def is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def rewire(api: dict, source: tuple, target: list) -> None:
    """Every input fed by output ``source`` = (node id, slot) is fed by ``target`` instead."""
    for node in api.values():
        for k, v in node["inputs"].items():
            if is_link(v) and (v[0], v[1]) == (source[0], source[1]):
                node["inputs"][k] = list(target)


def bypass(api: dict, nid: str, slot_to_input: dict) -> None:
    """Remove node ``nid``, feeding the consumers of each output slot with the node's own input of that type."""
    node = api.pop(nid)
    for slot, name in slot_to_input.items():
        rewire(api, (nid, slot), node["inputs"][name])


def prune(api: dict) -> dict:
    """Drop nodes fed by a missing node or output slot, then everything no output node needs."""
    changed = True
    while changed:
        changed = False
        for nid in list(api):
            for v in api[nid]["inputs"].values():
                if is_link(v) and (v[0] not in api or v[1] >= n_outputs(api[v[0]]["class_type"])):
                    del api[nid]
                    changed = True
                    break
    keep, todo = set(), [k for k, n in api.items() if is_output_node(n["class_type"])]
    while todo:
        k = todo.pop()
        if k in keep:
            continue
        keep.add(k)
        todo += [v[0] for v in api[k]["inputs"].values() if is_link(v)]
    for k in list(api):
        if k not in keep:
            del api[k]
    return api


def upstream(api: dict, link, through: Iterable[str] = ("conditioning", "positive")) -> Optional[str]:
    """The CLIPTextEncode a conditioning link comes from, following FluxGuidance / ControlNet apply nodes."""
    seen = set()
    while is_link(link) and link[0] in api and link[0] not in seen:
        seen.add(link[0])
        node = api[link[0]]
        if node["class_type"] == "CLIPTextEncode":
            return link[0]
        if node["class_type"] == "ControlNetApplyAdvanced":      # outputs (positive, negative)
            link = node["inputs"]["positive" if link[1] == 0 else "negative"]
        else:
            link = next((node["inputs"][k] for k in through if is_link(node["inputs"].get(k))), None)
    return None


def prompt_nodes(api: dict, which: str = "positive") -> list[str]:
    """The CLIPTextEncode nodes that give some sampler or guider its ``which`` conditioning."""
    out = []
    for node in api.values():
        src = upstream(api, node["inputs"].get(which)) if which in node["inputs"] else None
        if src and src not in out:
            out.append(src)
    return out


def sampler_id(api: dict) -> str:
    ids = [k for k, n in api.items() if n["class_type"] in SAMPLERS]
    if len(ids) != 1:
        raise ValueError(f"expected one sampler node, found {[api[k]['class_type'] for k in ids]}")
    return ids[0]


def steps_node(api: dict) -> str:
    """The node holding the step count: the sampler, or the scheduler feeding SamplerCustomAdvanced its sigmas."""
    sid = sampler_id(api)
    if "steps" in api[sid]["inputs"]:
        return sid
    sig = api[sid]["inputs"].get("sigmas")
    if is_link(sig) and "steps" in api[sig[0]]["inputs"]:
        return sig[0]
    raise ValueError(f"cannot find the step count of {api[sid]['class_type']}")


def get_steps(api: dict) -> int:
    return int(api[steps_node(api)]["inputs"]["steps"])


def set_steps(api: dict, steps: int) -> None:
    api[steps_node(api)]["inputs"]["steps"] = int(steps)


def latent_size(api: dict) -> Optional[tuple[int, int]]:
    for n in api.values():
        if n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            return int(n["inputs"]["width"]), int(n["inputs"]["height"])
    return None


def set_images(api: dict, names: dict) -> None:
    """LoadImage inputs renamed: ``names`` maps the example's file name (face.png, ...) to the demo's."""
    for n in api.values():
        if n["class_type"] == "LoadImage" and n["inputs"].get("image") in names:
            n["inputs"]["image"] = names[n["inputs"]["image"]]


def set_prompt(api: dict, text: str) -> None:
    for nid in prompt_nodes(api, "positive"):
        api[nid]["inputs"]["text"] = text
    for n in api.values():
        if n["class_type"] == "IDP_FaceMetrics":
            n["inputs"]["prompts"] = text


def identity_nodes(api: dict) -> list[str]:
    return sorted({n["class_type"] for n in api.values() if n["class_type"] in IDENTITY_NODES})


def _ksampler(inputs: dict, **override) -> dict:
    return {"class_type": "KSampler", "inputs": {**{k: inputs[k] for k in KSAMPLER_INPUTS if k in inputs}, **override},
            "_meta": {"title": "KSampler (plain baseline)"}}


def _cfg_guider(inputs: dict) -> dict:
    return {"class_type": "CFGGuider", "inputs": {k: inputs[k] for k in ("model", "positive", "negative", "cfg")},
            "_meta": {"title": "CFGGuider (plain baseline)"}}


def _checkpoint_model(api: dict, positive) -> list:
    """MODEL of the checkpoint whose CLIP encodes ``positive`` (the FlashFace graph's SD1.5 checkpoint)."""
    te = upstream(api, positive)
    if te is None or not is_link(api[te]["inputs"].get("clip")):
        raise ValueError("cannot find the checkpoint of the FlashFace graph's text encoder")
    return [api[te]["inputs"]["clip"][0], 0]


def plain_graph(api: dict) -> dict:
    """The graph without the pack's identity nodes (see the module docstring); same seeds, steps, sizes, prompts."""
    g = copy.deepcopy(api)
    for nid in list(g):
        if nid not in g:
            continue
        ct, inp = g[nid]["class_type"], g[nid]["inputs"]
        if ct in ("IDP_OmniIDApply", "IDP_InfiniteIDApply"):
            bypass(g, nid, {0: "model"})
        elif ct == "IDP_FlashFaceTrainingFreeApply":   # outputs MODEL, GUIDER
            rewire(g, (nid, 0), inp["model"])
            g[nid] = _cfg_guider(inp)
            rewire(g, (nid, 1), [nid, 0])
        elif ct == "IDP_RBGuidanceGuider":
            g[nid] = _cfg_guider(inp)
        elif ct == "IDP_RBGuidanceSampler":             # same inputs as KSampler (bit-identical to it at p = 0)
            g[nid] = _ksampler(inp)
        elif ct == "IDP_FlashFaceSampler":              # released sampler: DDIM trailing = ddim + simple
            g[nid] = _ksampler(inp, model=_checkpoint_model(g, inp["positive"]), sampler_name="ddim",
                               scheduler="simple", denoise=1.0)
        elif ct in DROPPED_IN_PLAIN:
            del g[nid]
    prune(g)
    left = identity_nodes(g)
    if left:
        raise ValueError(f"the plain graph still holds identity nodes {left}")
    return g


def saved_images(ex, api: dict, kinds=("output",)) -> list[tuple[str, dict]]:
    """(node id, image record) of every image the run saved (``output``) or previewed (``temp``)."""
    out = []
    for nid, o in ex.history_result["outputs"].items():
        for img in o.get("images", []):
            if img.get("type", "output") in kinds:
                out.append((nid, img))
    return out
