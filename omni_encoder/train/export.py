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

Every export names its trunk in the metadata (``omni_encoder.trunk_identity``: ``trunk_trained``, ``trunk_file``,
``trunk_fingerprint``); the nodes warn when the CLIP vision model they are given is not it.

Stage hand-over (``trunk_init``): stage 1 fine-tunes the trunk together with the encoder, so a stage-2 run that
starts from a stage-1 encoder (``init.encoder``) starts its trunk from the trunk written next to it, unless
``init.trunk`` names another file, or is ``stock`` to start from ``trunk.path`` deliberately.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..encoder import OmniIDConfig
from ..trunk_identity import FILE_KEY, FINETUNED_FILE, FINGERPRINT_KEY, TRAINED_KEY, fingerprint_matches
from ..weights import (ENCODER_PREFIX, IdentityWeightsMeta, WEIGHTS_FORMAT, check_state_dict, expected_encoder_shapes,
                       read_metadata, save_identity_weights)
from ...errors import TrainingError
from .trunk import trunk_state_dict

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


STOCK_TRUNK = "stock"   # init.trunk value: start from trunk.path (or the stand-in) even after a stage that trained it


def trunk_init(init) -> tuple[Optional[str], Optional[str]]:
    """The file the trunk starts from (None: ``trunk.path`` / the stand-in) and the fingerprint it must have.

    ``init``: the run's InitConfig. With ``init.encoder`` from a run that fine-tuned its trunk and no
    ``init.trunk``, that run's trunk (``trunk_file`` next to the encoder file) is the start; a missing file is an
    error naming the flag rather than a silent start from the stock trunk.
    """
    stage1 = read_metadata(init.encoder) if init.encoder else {}
    trained = stage1.get(TRAINED_KEY) == "1"
    fingerprint = stage1.get(FINGERPRINT_KEY) if trained else None
    if init.trunk == STOCK_TRUNK:
        if trained:
            log.warning("init.trunk=stock: the trunk starts from trunk.path, not from the trunk %s was trained with",
                        init.encoder)
        return None, None
    if init.trunk:
        return init.trunk, fingerprint
    if not trained:
        return None, None
    path = os.path.join(os.path.dirname(os.path.abspath(init.encoder)),
                        os.path.basename(stage1.get(FILE_KEY) or FINETUNED_FILE))
    if not os.path.isfile(path):
        raise TrainingError(f"{init.encoder} was trained together with a fine-tuned CLIP trunk, but {path} is not there: "
                            f"set init.trunk to that run's {FINETUNED_FILE} (or init.trunk={STOCK_TRUNK} to start "
                            "from trunk.path on purpose)")
    return path, fingerprint


def check_trunk_init(path: str, fingerprint: Optional[str], trunk, explicit: bool) -> None:
    """After loading ``path``: it must be the trunk the init encoder was trained with (when that is recorded)."""
    if not fingerprint:
        return
    if fingerprint_matches(fingerprint, trunk_state_dict(trunk)) is not False:
        return
    msg = f"the trunk {path} is not the one the init.encoder was trained with (its fingerprint differs)"
    if explicit:
        log.warning("%s; continuing as init.trunk asks", msg)
        return
    raise TrainingError(msg + f": set init.trunk to that run's {FINETUNED_FILE}")


__all__ = ["export_identity_weights", "export_stage1", "export_trunk", "read_encoder_weights", "load_encoder_init",
           "load_adapter_init", "load_trunk_init", "trunk_init", "check_trunk_init", "STOCK_TRUNK", "STAGE1_FORMAT"]
