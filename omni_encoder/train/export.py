"""Trainer outputs: the weight file the Omni-ID nodes load, the stage-1 encoder file, the fine-tuned trunk.

* Stage 2 / adapter runs -> ``export/omni_id_<family>.safetensors``: ``omni_encoder.weights`` format
  (``encoder.*`` + ``proj.*`` + metadata), written with ``save_identity_weights`` and loaded by
  ``IDP_OmniIDLoader`` (``nodes.omni_id.load_omni_id_model``).
* Stage 1 (MTD) runs -> ``export/encoder_stage1.safetensors``: ``encoder.*`` only, metadata
  ``format=omni_id_stage1`` plus the encoder config. It has no projections, so the nodes cannot use it:
  it is the ``init.encoder`` of the stage-2 run.
* When the CLIP trunk was trained -> ``export/clip_vision_finetuned.safetensors`` in ComfyUI's CLIP vision
  key layout (``vision_model.*``): put it in models/clip_vision and use it with Load CLIP Vision in
  place of the original CLIP-H (the encoder was trained on its tokens).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..encoder import OmniIDConfig
from ..weights import (ENCODER_PREFIX, IdentityWeightsMeta, WEIGHTS_FORMAT, check_state_dict, expected_encoder_shapes,
                       read_metadata, save_identity_weights)
from ...errors import TrainingError

log = logging.getLogger(__name__)

STAGE1_FORMAT = "omni_id_stage1"


def _plain(sd: dict) -> dict:
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def export_identity_weights(path: str, encoder, adapter_proj: dict, family: str, injected_blocks="all",
                            extra: Optional[dict] = None) -> str:
    meta = IdentityWeightsMeta(config=encoder.config, base_family=family, injected_blocks=injected_blocks,
                               extra={str(k): str(v) for k, v in (extra or {}).items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_identity_weights(path, _plain(encoder.state_dict()), _plain(adapter_proj), meta)
    return path


def export_stage1(path: str, encoder, extra: Optional[dict] = None) -> str:
    md = {str(k): str(v) for k, v in (extra or {}).items()}
    md.update(encoder.config.to_dict())
    md["format"] = STAGE1_FORMAT
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({ENCODER_PREFIX + k: v for k, v in _plain(encoder.state_dict()).items()}, path, metadata=md)
    log.info("saved stage-1 encoder %s", path)
    return path


def export_trunk(path: str, trunk_sd: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(_plain(trunk_sd), path, metadata={"format": "clip_vision", "source": "idportrait omni_id trainer"})
    return path


def read_encoder_weights(path: str) -> tuple[OmniIDConfig, dict]:
    """(config, encoder state dict) from a stage-1 file or an Omni-ID weight file."""
    md = read_metadata(path)
    if md.get("format") not in (STAGE1_FORMAT, WEIGHTS_FORMAT):
        raise TrainingError(f"{path} is neither a stage-1 encoder file nor an Omni-ID weight file (format="
                         f"{md.get('format')!r})")
    cfg = OmniIDConfig.from_dict(md)
    sd = {}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            if k.startswith(ENCODER_PREFIX):
                sd[k[len(ENCODER_PREFIX):]] = f.get_tensor(k)
    return cfg, sd


def load_encoder_init(path: str, encoder) -> None:
    """Start ``encoder`` from a stage-1 or weight file; its config must match the run's."""
    cfg, sd = read_encoder_weights(path)
    mine = {k: v for k, v in encoder.config.to_dict().items() if k != "version"}
    theirs = {k: v for k, v in cfg.to_dict().items() if k != "version"}
    if mine != theirs:
        diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs.get(k)}
        raise TrainingError(f"{path} holds an encoder with another config (file vs run: {diff}); set the run's "
                         "encoder section to the file's")
    check_state_dict(expected_encoder_shapes(encoder.config), sd, "encoder")
    encoder.load_state_dict(sd, strict=True)
    log.info("encoder initialised from %s", path)


def load_adapter_init(path: str, adapter, family: str) -> None:
    from ..weights import load_identity_weights
    meta, _, proj = load_identity_weights(path)
    if meta.base_family != family:
        raise TrainingError(f"{path} was trained for {meta.base_family}, this run's base is {family}")
    if family == "flux":
        adapter.load_flat(proj, strict=True)
    else:
        adapter.load_state_dict(proj, strict=True)
    log.info("adapter initialised from %s", path)


def load_trunk_init(path: str, trunk) -> None:
    sd = load_file(path)
    inner = getattr(trunk, "vision", trunk)
    missing, unexpected = inner.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise TrainingError(f"{path} does not fit the trunk: missing {missing[:3]}, unexpected {unexpected[:3]}")


__all__ = ["export_identity_weights", "export_stage1", "export_trunk", "read_encoder_weights", "load_encoder_init",
           "load_adapter_init", "load_trunk_init", "STAGE1_FORMAT"]
