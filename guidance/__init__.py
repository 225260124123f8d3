"""Everything that acts on the denoiser while sampling.

Modules here that import ComfyUI (``comfy.*``) do so at module level; plain-torch modules (math
only) must not, so that they can be used from the command line from the repository root.
"""
