"""Tiny FlashFace checkpoints in the released naming (test helper shared by the FlashFace tests).

Every one of the 2142 released keys (from shared/reference/flashface/checkpoint_keys_shapes.txt), with
every width divided by 10 (context 768 -> ``context``), random values, and the aliases holding copies
of their ori_* twins as in the real file.
"""
import ast
import os

import torch

import idportrait.guidance.flashface_keys as fk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The released checkpoint's 2142 keys and shapes (names and shapes only, no weights), kept in the repository so
# that the FlashFace tests run in any clone.
KEYS_FILE = os.path.join(REPO, "tests", "data", "flashface", "checkpoint_keys_shapes.txt")
MODEL_CHANNELS = 32


def tiny_shape(shape, context=24):
    """Released shape -> tiny shape: channel widths / 10, context 768 -> ``context``; in/out channels and kernels kept."""
    def dim(i, d):
        if i >= 2 or d in (4, 5):
            return d
        return context if d == 768 else d // 10
    return tuple(dim(i, d) for i, d in enumerate(shape))


def tiny_state_dict(context=24, seed=0, std=0.05) -> dict:
    """The 2142-key state dict of a tiny FlashFace checkpoint."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    with open(KEYS_FILE, encoding="utf-8") as fh:
        for line in fh:
            key, shape = line.rstrip("\n").split("\t")
            sd[key] = torch.randn(tiny_shape(ast.literal_eval(shape), context), generator=g) * std
    for alias, canonical in fk.ALIASES.items():  # the real file stores identical copies under both names
        for key in [k for k in sd if k.startswith(canonical + ".")]:
            sd[alias + key[len(canonical):]] = sd[key].clone()
    assert len(sd) == 2142
    return sd
