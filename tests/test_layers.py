"""The pack's layers hold: no module imports a layer above its own (read from the source, not at run time).

Layers, lowest first: errors | face, omni_encoder (the encoder and its formats), stand_ins | guidance |
omni_encoder/train | nodes. ComfyUI's node adapters (nodes/) sit on top; the trainer never imports them.
"""
import ast
import os

import pytest

import harness

# package (path prefix inside the pack) -> the pack packages it may import
ALLOWED = {
    "errors": set(),
    "face": {"errors"},
    "omni_encoder": {"errors"},                      # the encoder, weight formats, mixing (not omni_encoder/train)
    "stand_ins": {"errors"},
    "guidance": {"errors", "face", "omni_encoder"},
    "omni_encoder/train": {"errors", "face", "omni_encoder", "guidance", "stand_ins"},
    "nodes": {"errors", "face", "omni_encoder", "guidance", "stand_ins"},
}
PACK_PACKAGES = ("errors", "face", "omni_encoder/train", "omni_encoder", "stand_ins", "guidance", "nodes")


def _layer_of(rel_path: str) -> str:
    """'omni_encoder/train/flow.py' -> 'omni_encoder/train'; 'errors.py' -> 'errors'."""
    p = rel_path[:-3] if rel_path.endswith(".py") else rel_path
    return next(pkg for pkg in PACK_PACKAGES if p == pkg or p.startswith(pkg + "/"))


def _pack_imports(rel_path: str, tree: ast.AST) -> set:
    """The pack modules a file imports (relative imports resolved against its own package)."""
    package = os.path.dirname(rel_path).split("/") if os.path.dirname(rel_path) else []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else list(package)
            target = base + (node.module.split(".") if node.module else [])
            names = [target + [a.name] for a in node.names] if not node.module else [target]
            out.update("/".join(t) for t in names)
    return out


def _sources():
    for folder in ("face", "omni_encoder", "stand_ins", "guidance", "nodes"):
        for dirpath, _, files in os.walk(os.path.join(harness.REPO, folder)):
            for f in files:
                if f.endswith(".py"):
                    full = os.path.join(dirpath, f)
                    yield os.path.relpath(full, harness.REPO).replace(os.sep, "/")
    yield "errors.py"


@pytest.mark.parametrize("rel_path", sorted(_sources()))
def test_no_module_imports_a_higher_layer(rel_path):
    with open(os.path.join(harness.REPO, rel_path)) as f:
        tree = ast.parse(f.read(), rel_path)
    own = _layer_of(rel_path)
    bad = []
    for target in _pack_imports(rel_path, tree):
        try:
            layer = _layer_of(target)
        except StopIteration:
            continue   # a name inside the pack root's __init__ (none today) or outside the layered packages
        if layer != own and layer not in ALLOWED[own]:
            bad.append(target)
    assert not bad, f"{rel_path} ({own}) imports {sorted(bad)}, which layer {own!r} may not use"


def test_the_layer_check_sees_relative_imports():
    """The checker itself: a trainer module importing nodes/ is caught (so the test above can fail)."""
    tree = ast.parse("from ...nodes import tiny_models\nfrom ..weights import x\n")
    found = _pack_imports("omni_encoder/train/flow.py", tree)
    assert found == {"nodes", "omni_encoder/weights"}
    assert _layer_of("nodes") not in ALLOWED["omni_encoder/train"]
