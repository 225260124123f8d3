"""Which CLIP vision weights an identity encoder was trained on, recorded in its weight file and checked at use.

The trainer fine-tunes the CLIP trunk (Omni-ID: all CLIP-H layers; the Pivot ID encoder: its CLIP when
``trunk.trainable``). The encoder then only works on the tokens of *that* trunk, and the nodes take the CLIP vision
model from a separate loader: a stock CLIP-H there silently gives other tokens. So every export names the trunk it
was trained with (``trunk_file``: the file the run wrote, or the one it started from) and carries a fingerprint of
its weights (``trunk_fingerprint``): a few values at fixed positions of tensors that training changes. A loaded
CLIP vision model matches when every sampled value agrees up to half-precision rounding (ComfyUI may load the same
file in fp16 or bf16); a fine-tuned trunk differs from the stock one at nearly every position.

Plain torch and JSON, no ComfyUI: the trainer writes these entries, the nodes check them.
"""
from __future__ import annotations

import json
import logging
import zlib
from typing import Mapping, Optional

import torch

log = logging.getLogger(__name__)

TRAINED_KEY = "trunk_trained"           # "1" when the trunk was fine-tuned by the run
FILE_KEY = "trunk_file"                 # the CLIP vision file to load with these weights
FINGERPRINT_KEY = "trunk_fingerprint"   # JSON, see trunk_fingerprint
FINETUNED_FILE = "clip_vision_finetuned.safetensors"   # what the trainer writes into export/ when it trained the trunk

SAMPLES = 24
# relative agreement required of each sampled value: bf16 keeps 8 significant bits (half an ulp = 2^-9)
REL_TOL = 2.0 ** -8
ABS_TOL = 1e-6


def _picked_keys(state_dict: Mapping[str, torch.Tensor]) -> list:
    """Tensors every trunk the trainer trains changes: the patch embedding, the first and the penultimate layer
    (the last layer, final norm and projection may be frozen: the encoder reads the penultimate tokens)."""
    layers = sorted({int(k.split(".")[3]) for k in state_dict if k.startswith("vision_model.encoder.layers.")})
    keys = ["vision_model.embeddings.patch_embedding.weight"]
    if layers:
        keys.append(f"vision_model.encoder.layers.{layers[0]}.self_attn.q_proj.weight")
        keys.append(f"vision_model.encoder.layers.{layers[max(0, len(layers) - 2)]}.mlp.fc1.weight")
    return [k for k in keys if k in state_dict]


def _positions(key: str, numel: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randint(0, numel, (min(n, numel),), generator=g)


def _values(t: torch.Tensor, idx: torch.Tensor) -> list:
    return [float(v) for v in t.detach().flatten()[idx.to(t.device)].float().cpu()]


def trunk_fingerprint(state_dict: Mapping[str, torch.Tensor], samples: int = SAMPLES) -> str:
    """JSON fingerprint of a CLIP vision state dict (ComfyUI key layout, ``vision_model.*``)."""
    tensors = {}
    for k in _picked_keys(state_dict):
        t = state_dict[k]
        idx = _positions(k, t.numel(), samples)
        tensors[k] = {"numel": int(t.numel()), "val": _values(t, idx)}
    return json.dumps({"version": 1, "samples": samples, "tensors": tensors}, separators=(",", ":"))


def fingerprint_matches(fingerprint: str, state_dict: Mapping[str, torch.Tensor]) -> Optional[bool]:
    """True / False, or None when the fingerprint cannot be read (then nothing can be said)."""
    try:
        fp = json.loads(fingerprint)
        tensors, samples = fp["tensors"], int(fp["samples"])
    except (ValueError, KeyError, TypeError):
        return None
    if not tensors:
        return None
    for k, rec in tensors.items():
        t = state_dict.get(k)
        if t is None or t.numel() != int(rec["numel"]):
            return False
        got = torch.tensor(_values(t, _positions(k, t.numel(), samples)), dtype=torch.float64)
        want = torch.tensor(rec["val"], dtype=torch.float64)
        if got.shape != want.shape or bool(((got - want).abs() > REL_TOL * torch.maximum(got.abs(), want.abs())
                                            + ABS_TOL).any()):
            return False
    return True


def trunk_metadata(state_dict: Optional[Mapping[str, torch.Tensor]], trained: bool, file_name: str = "") -> dict:
    """The metadata entries an export carries about its trunk."""
    if state_dict is None:
        return {}
    out = {TRAINED_KEY: str(int(bool(trained))), FINGERPRINT_KEY: trunk_fingerprint(state_dict)}
    name = FINETUNED_FILE if trained else file_name
    if name:
        out[FILE_KEY] = name
    return out


def trunk_mismatch(metadata: Mapping[str, str], state_dict: Mapping[str, torch.Tensor], weights: str = "these weights",
                   node: str = "Load CLIP Vision") -> Optional[str]:
    """A warning when the CLIP vision weights ``state_dict`` are not the trunk ``metadata`` names; else None."""
    md = metadata or {}
    trained = str(md.get(TRAINED_KEY, "0")) == "1"
    name = md.get(FILE_KEY) or (FINETUNED_FILE if trained else "")
    fp = md.get(FINGERPRINT_KEY)
    if not fp:
        if trained:   # written before fingerprints existed: the file is all we can point to
            return (f"{weights} were trained with a fine-tuned CLIP trunk ({name} in the training run's export "
                    f"folder); make sure {node} loads that file, not the original CLIP model")
        return None
    try:
        ok = fingerprint_matches(fp, state_dict)
    except RuntimeError as e:   # weights not readable where they are (e.g. not materialised): cannot tell
        log.debug("trunk fingerprint not checked: %s", e)
        return None
    if ok is not False:
        return None
    if trained:
        return (f"{weights} were trained with a fine-tuned CLIP trunk, and the CLIP vision model connected is not it: "
                f"load {name} (from the training run's export folder, put into models/clip_vision) with {node} "
                "instead of the original CLIP model, or the identity will be encoded from other features")
    return (f"{weights} were trained on another CLIP vision model than the one connected"
            + (f" ({name})" if name else "") + f": load that one with {node}")


__all__ = ["TRAINED_KEY", "FILE_KEY", "FINGERPRINT_KEY", "FINETUNED_FILE", "trunk_fingerprint",
           "fingerprint_matches", "trunk_metadata", "trunk_mismatch"]
