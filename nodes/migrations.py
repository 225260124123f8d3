"""Keeping shared workflows loading when one of our node inputs is renamed.

Saved workflows reference inputs by name (API format, and the sockets of the UI format) and widgets by
position (UI format). When an input must change, add it to ``RENAMED_INPUTS`` (node id → {old: new}) and to the
README's migration table; keep a saved copy of an old workflow under tests/data/legacy/ with a test.

* API format (``POST /prompt``, and what the frontend sends after loading an old UI workflow): an on-prompt
  handler registered with ComfyUI's server renames old input keys before validation.
* UI format: ``migrate_ui_workflow`` renames old socket names and drops widget values that a renamed INT
  ``seed`` widget carried for the frontend's "control after generate" companion (see ``DROPPED_COMPANIONS``).

When an input is *added* with a default that would change what a saved workflow does, add it to
``ADDED_INPUTS`` with the value the node used before: workflows saved without it keep their meaning.

* API format: an export of the UI (which always carries every widget) is recognised by the node's ``marker``
  input; it gets the old values. A hand-written prompt without the marker gets the new defaults.
* UI format: ``widgets_values`` of exactly the old length get the old values appended (the new inputs are
  optional and last, so the old values keep their positions); the web extension does the same in the browser.

Inputs added with defaults that give the old results need no API migration (a prompt without them runs
unchanged); UI workflows store widget values by position, and the frontend fills widgets added after the saved
ones with their defaults, which ``migrate_ui_workflow`` does for our converter too (``ADDED_WIDGETS``).

Migrations so far:
* 0.1.0 → 0.2.0: the stand-in nodes' ``seed`` became ``weights_seed``: the frontend attaches a "control after
  generate: randomize" widget to any INT named ``seed``, which re-rolled the stand-in weights on every run.
* 0.2.0 → 0.3.0: Apply Omni-ID gained ``weight_type`` and ``embeds_scaling``, Omni-ID Encode ``combine_embeds``,
  Identity Encode from ArcFace ``combine_embeds``, ``faceid_plus`` and ``shortcut_scale`` (all after the old widgets).
* 0.2.0 → 0.3.0: RB-Guidance's ``match`` and ``reduction`` (default euclidean / sum, the paper's Eq. 7-8); workflows
  saved before them ran cosine / mean, under which the same ``p`` pulls about 30 times harder, and keep that.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

RENAMED_INPUTS: dict[str, dict[str, str]] = {
    "IDP_TinyModels": {"seed": "weights_seed"},
    "IDP_TinyClipVision": {"seed": "weights_seed"},
    "IDP_TinyControlNet": {"seed": "weights_seed"},
}
# renamed widgets whose old name made the frontend store one extra value right after them
DROPPED_COMPANIONS: dict[str, dict[str, int]] = {
    "IDP_TinyModels": {"seed": 1},        # widgets_values: family, seed, <control>
    "IDP_TinyClipVision": {"seed": 0},    # widgets_values: seed, <control>
    "IDP_TinyControlNet": {"seed": 1},
}

# widgets added after the saved ones: node id -> (number of widget values before, the added widgets' defaults)
ADDED_WIDGETS: dict[str, tuple[int, list]] = {
    "IDP_OmniIDApply": (4, ["linear", "V only"]),                       # weight, start_at, end_at, apply_to
    "IDP_OmniIDEncode": (1, ["concat"]),                                # crop
    "IDP_OmniIDEncodeArcFace": (0, ["concat", "v2 (shortcut)", 1.0]),
}


@dataclass(frozen=True)
class AddedInputs:
    """Inputs added after ``since`` and what workflows saved before them got (see the module doc)."""
    since: str
    old_widgets: int        # len(widgets_values) of a UI workflow saved before the inputs existed
    marker: str             # an input every UI export of that version carries (tells an export from a hand-written prompt)
    values: dict            # input name -> the value the node used before the input existed
    note: str = ""


_RB_OLD = {"match": "cosine", "reduction": "mean"}
_RB_NOTE = ("set match = euclidean and reduction = sum for the paper's Eq. 7-8 (then p = 8.5 is the paper's "
            "strength; under cosine / mean the same p pulls much harder)")
ADDED_INPUTS: dict[str, AddedInputs] = {
    "IDP_RBGuidanceGuider": AddedInputs("0.2.0", 11, "normalize_mask", _RB_OLD, _RB_NOTE),
    "IDP_RBGuidanceSampler": AddedInputs("0.2.0", 16, "normalize_mask", _RB_OLD, _RB_NOTE),
}


def _added_note(nid, node_type, added: AddedInputs) -> None:
    vals = ", ".join(f"{k} = {v}" for k, v in added.values.items())
    log.info("workflow node %s (%s) was saved with version %s, before %s existed: keeping what it did then (%s); %s",
             nid, node_type, added.since, " and ".join(added.values), vals, added.note)


def migrate_api_prompt(prompt: dict) -> dict:
    """Rename old input keys of our nodes in an API-format prompt and give inputs added since it was saved their
    old values (returns a new dict; input unchanged)."""
    out = prompt
    for nid, node in prompt.items():
        node_type = node.get("class_type") if isinstance(node, dict) else None
        renames = RENAMED_INPUTS.get(node_type)
        added = ADDED_INPUTS.get(node_type)
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        rename = bool(renames) and any(k in inputs for k in renames)
        fill = added is not None and added.marker in inputs and not any(k in inputs for k in added.values)
        if not (rename or fill):
            continue
        if out is prompt:
            out = copy.deepcopy(prompt)
        inputs = out[nid]["inputs"]
        for old, new in (renames or {}).items():
            if old in inputs and new not in inputs:
                inputs[new] = inputs.pop(old)
                log.info("workflow node %s (%s): input %r is now %r", nid, node_type, old, new)
        if fill:
            inputs.update(added.values)
            _added_note(nid, node_type, added)
    return out


def migrate_ui_workflow(ui: dict) -> dict:
    """Rename old socket names and drop stale companion widget values of our nodes in a UI-format workflow."""
    ui = copy.deepcopy(ui)
    for node in ui.get("nodes", []):
        t = node.get("type")
        for inp in node.get("inputs") or []:
            new = RENAMED_INPUTS.get(t, {}).get(inp.get("name"))
            if new:
                inp["name"] = new
                if inp.get("widget"):
                    inp["widget"]["name"] = new
        values = node.get("widgets_values")
        for old, pos in DROPPED_COMPANIONS.get(t, {}).items():
            if isinstance(values, list) and len(values) > pos + 1 and isinstance(values[pos + 1], str):
                del values[pos + 1]   # the old "control after generate" value ("fixed", "randomize", ...)
        added = ADDED_INPUTS.get(t)
        if added is not None and isinstance(values, list) and len(values) == added.old_widgets:
            values.extend(added.values.values())
            _added_note(node.get("id"), t, added)
        before, defaults = ADDED_WIDGETS.get(t, (None, []))
        if isinstance(values, list) and len(values) == before:
            values.extend(defaults)      # what the frontend shows for widgets the saved file did not have
        elif values is None and before == 0:
            node["widgets_values"] = list(defaults)
    return ui


def on_prompt(json_data: dict) -> dict:
    """ComfyUI on-prompt handler: migrate the prompt of every POST /prompt before validation."""
    if isinstance(json_data, dict) and isinstance(json_data.get("prompt"), dict):
        json_data = {**json_data, "prompt": migrate_api_prompt(json_data["prompt"])}
    return json_data


def register() -> bool:
    """Install the on-prompt handler when a ComfyUI server exists (not in-process runs)."""
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):
        return False
    if on_prompt not in getattr(server, "on_prompt_handlers", []):
        server.add_on_prompt_handler(on_prompt)
    return True
