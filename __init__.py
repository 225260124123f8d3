"""Identity Portrait: Omni-ID, FlashFace reference attention and OmniPortrait RB-Guidance for ComfyUI.

ComfyUI entry point (V3 node API). Exports ``comfy_entrypoint`` and ``WEB_DIRECTORY`` only: a module
that also exported NODE_CLASS_MAPPINGS would have its V3 nodes silently ignored by ComfyUI's loader.
"""
from .nodes import IdentityPortraitExtension

WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> IdentityPortraitExtension:
    return IdentityPortraitExtension()


__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
