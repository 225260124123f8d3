"""ComfyUI's differentiable code path, switched on only for the pack's own gradient passes.

Current ComfyUI (0.8+) computes FLUX RoPE with comfy-kitchen's fused op, which has no backward
("Trying to backward through comfy_kitchen.apply_rope.default but no autograd formula was registered").
It takes its plain-torch path only while ``comfy.model_management.in_training`` is set (0.14+; ComfyUI's
own training node sets it the same way). ComfyUI 0.3.75 has no such flag and is differentiable as is.

RB-Guidance's energy gradient and the trainer's forwards run inside ``comfy_training_mode()``; the flag
goes back to the value it had when the block ends, also when the block raises, so the sampler's own
(gradient-free) steps keep ComfyUI's fast kernels.
"""
from __future__ import annotations

import contextlib

import comfy.model_management as mm

FLAG = "in_training"


def has_training_flag() -> bool:
    """True on ComfyUI versions whose kernels switch on ``model_management.in_training``."""
    return hasattr(mm, FLAG)


@contextlib.contextmanager
def comfy_training_mode():
    """Set ComfyUI's training flag for the duration of the block (nothing on versions without it).

    Nested use is fine: each level restores what it found.
    """
    if not has_training_flag():
        yield
        return
    before = getattr(mm, FLAG)
    setattr(mm, FLAG, True)
    try:
        yield
    finally:
        setattr(mm, FLAG, before)
