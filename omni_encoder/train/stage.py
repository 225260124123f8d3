"""What a training stage is made of (built by engine.build_stage, pivot.build_pivot_stage; run by engine.train)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn


@dataclass
class Stage:
    module: nn.Module            # trainable module: forward(batch) -> {"loss", ...}; reconstruct(batch) -> rows
    encoder: nn.Module
    trunk: Optional[nn.Module]
    adapter: Optional[nn.Module] = None
    family: str = ""
    notes: tuple = ()
    trunk_source: str = ""       # the CLIP vision file the trunk started from (named in the exports' metadata)
