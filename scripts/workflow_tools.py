"""ComfyUI workflow formats without a browser: UI (drag-and-drop, schema 0.4) <-> API (what /prompt takes).

* ``ui_to_api`` follows the UI format's links and widget values the way the frontend's "Export (API)" does:
  widget values are positional, in the order of the node's widget inputs (required, then optional); an
  INT with ``control_after_generate`` and a combo with ``image_upload`` carry one extra value each.
  Note/MarkdownNote nodes are dropped, Reroute nodes are followed, muted nodes (mode 2) are dropped.
* ``build_ui`` writes a UI workflow from a compact graph description (used by scripts/build_examples.py)
  with a simple layered layout.
* ``swap_stand_ins`` replaces loader nodes that carry a ``properties.idportrait_stand_in`` entry by the
  tiny stand-in nodes (for CI), remapping output slots.

Node definitions come from ComfyUI's own registry (``nodes.NODE_CLASS_MAPPINGS[...].INPUT_TYPES()``), so a
renamed node or a removed, renamed or reordered widget makes conversion fail loudly.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class WorkflowFormatError(ValueError):
    pass


def _input_specs(node_defs: Callable[[str], dict], class_type: str) -> list[tuple[str, Any, dict]]:
    try:
        spec = node_defs(class_type)
    except KeyError:
        raise WorkflowFormatError(f"node type {class_type!r} is not registered (renamed or missing pack)") from None
    out = []
    for section in ("required", "optional"):
        for name, val in spec.get(section, {}).items():
            typ = val[0]
            opts = val[1] if len(val) > 1 and isinstance(val[1], dict) else {}
            out.append((name, typ, opts))
    return out


def is_widget(typ, opts) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


SEED_NAMES = {"seed", "noise_seed"}   # the frontend adds a "control after generate" widget to these INTs


def has_control(name, typ, opts) -> bool:
    return bool(opts.get("control_after_generate")) or (typ == "INT" and name in SEED_NAMES)


def widget_slots(name, typ, opts) -> int:
    """How many entries of widgets_values one widget input takes."""
    return 1 + has_control(name, typ, opts) + bool(opts.get("image_upload"))


def ui_to_api(ui: dict, node_defs: Callable[[str], dict]) -> dict:
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {l[0]: l for l in ui.get("links", [])}

    def source(link_id):
        lk = links[link_id]
        src = nodes[lk[1]]
        while src["type"] == "Reroute":           # follow reroutes to the real producer
            up = next(i for i in src.get("inputs", []) if i.get("link") is not None)
            lk = links[up["link"]]
            src = nodes[lk[1]]
        return [str(src["id"]), lk[2]]

    api = {}
    for nid, n in nodes.items():
        if n["type"] in VIRTUAL or n.get("mode", 0) == 2:
            continue
        if n.get("mode", 0) == 4:
            raise WorkflowFormatError(f"node {nid} ({n['type']}) is bypassed; bypass is not supported by this converter")
        values = list(n.get("widgets_values") or [])
        if isinstance(n.get("widgets_values"), dict):
            raise WorkflowFormatError(f"node {nid} ({n['type']}) stores widgets by name; expected a list")
        linked = {i["name"]: i["link"] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs, pos = {}, 0
        for name, typ, opts in _input_specs(node_defs, n["type"]):
            if is_widget(typ, opts):
                if pos >= len(values):
                    if name in linked:
                        inputs[name] = source(linked[name])
                        continue
                    raise WorkflowFormatError(f"node {nid} ({n['type']}): no value for widget {name!r} "
                                              f"(widgets_values has {len(values)} entries)")
                value = values[pos]
                pos += widget_slots(name, typ, opts)
                if name in linked:
                    inputs[name] = source(linked[name])
                else:
                    options = typ if isinstance(typ, list) else opts.get("options")
                    # file lists depend on what is installed; only fixed option lists are checked here
                    if options and value not in options and not (isinstance(value, str) and "." in value):
                        raise WorkflowFormatError(f"node {nid} ({n['type']}): {value!r} is not an option of {name!r}")
                    inputs[name] = value
            elif name in linked:
                inputs[name] = source(linked[name])
        if pos != len(values):
            raise WorkflowFormatError(f"node {nid} ({n['type']}): {len(values)} widget values but the node has "
                                      f"{pos} widget slots (a widget was added, removed or reordered)")
        api[str(nid)] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": n.get("title", n["type"])}}
    return api


def swap_stand_ins(api: dict, ui: dict) -> dict:
    """Replace nodes whose UI properties name a stand-in (``idportrait_stand_in``) and remap output slots."""
    api = copy.deepcopy(api)
    remap = {}
    for n in ui["nodes"]:
        st = (n.get("properties") or {}).get("idportrait_stand_in")
        if not st or str(n["id"]) not in api:
            continue
        if "inputs_override" in st:       # same node, smaller settings (latent size, steps) for CI
            api[str(n["id"])]["inputs"].update(st["inputs_override"])
            continue
        api[str(n["id"])] = {"class_type": st["class_type"], "inputs": dict(st.get("inputs", {})),
                             "_meta": {"title": f"stand-in for {n['type']}"}}
        remap[str(n["id"])] = st.get("outputs")
    for node in api.values():
        for k, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and v[0] in remap and remap[v[0]] is not None:
                node["inputs"][k] = [v[0], remap[v[0]][v[1]]]
    return api


def _outputs_of(cls) -> list[tuple[str, str]]:
    types = list(getattr(cls, "RETURN_TYPES", ()))
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return list(zip(names, types))


def build_ui(graph: dict, node_classes: Callable[[str], Any], node_defs: Callable[[str], dict]) -> dict:
    """graph: {key: {"type", "inputs": {name: value | ("key", slot)}, "title"?, "properties"?, "pos"?, "size"?}}."""
    ids = {k: i + 1 for i, k in enumerate(graph)}
    depth = {}

    def d(k):
        if k not in depth:
            ups = [v[0] for v in graph[k].get("inputs", {}).values() if isinstance(v, tuple)]
            depth[k] = 1 + max((d(u) for u in ups), default=-1)
        return depth[k]
    for k in graph:
        d(k)
    rows: dict = {}
    nodes, links = [], []
    out_links: dict = {}
    for order, (k, g) in enumerate(graph.items()):
        nid, typ = ids[k], g["type"]
        row = rows.setdefault(depth[k], 0)
        rows[depth[k]] += 1
        node = {"id": nid, "type": typ, "pos": list(g.get("pos", [40 + 380 * depth[k], 40 + 260 * row])),
                "size": list(g.get("size", [340, 200])), "flags": {}, "order": order, "mode": 0,
                "inputs": [], "outputs": [], "properties": {"Node name for S&R": typ, **g.get("properties", {})}}
        if g.get("title"):
            node["title"] = g["title"]
        if typ in ("Note", "MarkdownNote"):
            node["widgets_values"] = [g["text"]]
            node["size"] = list(g.get("size", [420, 260]))
            nodes.append(node)
            continue
        values = []
        for name, t, opts in _input_specs(node_defs, typ):
            v = g.get("inputs", {}).get(name)
            if isinstance(v, tuple):
                lid = len(links) + 1
                links.append([lid, ids[v[0]], v[1], nid, len(node["inputs"]), "*"])
                entry = {"name": name, "type": t if isinstance(t, str) else "COMBO", "link": lid}
                if is_widget(t, opts):
                    entry["widget"] = {"name": name}
                node["inputs"].append(entry)
                out_links.setdefault((ids[v[0]], v[1]), []).append(lid)
                if is_widget(t, opts):
                    values += [opts.get("default")] + [None] * (widget_slots(name, t, opts) - 1)
                continue
            if is_widget(t, opts):
                if v is None:
                    v = opts.get("default", t[0] if isinstance(t, list) and t else None)
                values.append(v)
                if has_control(name, t, opts):
                    values.append("fixed")
                if opts.get("image_upload"):
                    values.append("image")
            else:
                node["inputs"].append({"name": name, "type": t, "link": None})
        node["widgets_values"] = values
        node["_cls"] = node_classes(typ)
        nodes.append(node)
    for node in nodes:
        cls = node.pop("_cls", None)
        if cls is None:
            continue
        for slot, (name, typ) in enumerate(_outputs_of(cls)):
            node["outputs"].append({"name": name, "type": typ, "links": out_links.get((node["id"], slot), []),
                                    "slot_index": slot})
    types = {(n["id"], s): o["type"] for n in nodes for s, o in enumerate(n["outputs"])}
    for lk in links:
        lk[5] = types.get((lk[1], lk[2]), "*")
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}
