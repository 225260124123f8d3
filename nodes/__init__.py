"""ComfyUI node classes (thin adapters over guidance/, omni_encoder/ and face/).

Node ids and input names are part of every saved workflow: never rename or reorder them.
Each module exposes ``NODES``; all are imported eagerly (see scripts/embedded_comfy.py for why).
"""
from comfy_api.latest import ComfyExtension, io

from . import face_tools, flashface, infinite_id, migrations, omni_id, rb_guidance, tiny_models
from .validation import guard

_MODULES = (tiny_models, omni_id, flashface, rb_guidance, infinite_id, face_tools)


def all_nodes() -> list[type[io.ComfyNode]]:
    """Every node of the pack, each with its schema checks installed (nodes/validation.py)."""
    return [guard(n) for mod in _MODULES for n in mod.NODES]


class IdentityPortraitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        migrations.register()   # here, not in on_load: 0.3.75 never calls on_load
        return all_nodes()
