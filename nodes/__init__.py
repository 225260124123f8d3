"""ComfyUI node classes (thin adapters over guidance/ and omni_encoder/).

Node ids and input names are part of every saved workflow: never rename or reorder them.
"""
from comfy_api.latest import ComfyExtension, io

from . import tiny_models


def all_nodes() -> list[type[io.ComfyNode]]:
    return [*tiny_models.NODES]


class IdentityPortraitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
