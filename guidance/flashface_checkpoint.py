"""Load FlashFace's released checkpoint as ComfyUI SD1.5 UNet state dicts; write/read a compact copy.

Inputs understood by :func:`load` (detected from the file's first bytes, not its name):

* the released ``flashface.ckpt`` (fp32 pickle, 10.6 GB): read with ``torch.load(weights_only=True,
  mmap=True)``, so nothing but tensors is ever unpickled and nothing is read until used;
* a safetensors copy of it with the same key names (read lazily, tensor by tensor);
* our converted file (:data:`FORMAT`), written by :func:`save_converted`.

The result is :class:`FlashFaceWeights` ``(main, ref, ref_attention)`` with ComfyUI UNetModel key
names (no ``model.diffusion_model.`` prefix; see :mod:`.flashface_keys`). ``main`` and ``ref``
share the tensors of the time embedding, the middle block and the output head (the same objects),
and the converted file stores them once (about 3.3 GB in fp16 instead of 10.6 GB).

Command: ``python -m guidance.flashface_checkpoint flashface.ckpt flashface_fp16.safetensors --dtype fp16``.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import sys
from typing import Mapping, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

try:
    from ..errors import FlashFaceCheckpointError
except ImportError:   # `python -m guidance.flashface_checkpoint` from the repository root: guidance/ is top-level there
    from errors import FlashFaceCheckpointError
from . import flashface_keys

log = logging.getLogger(__name__)

FORMAT = "idportrait.flashface-sd15"
FORMAT_VERSION = "1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SOURCE_HINT = ("Use the released flashface.ckpt (huggingface.co/shilongz/FlashFace-SD1.5) or a file made from it "
               "by `python -m guidance.flashface_checkpoint flashface.ckpt OUT.safetensors --dtype fp16`.")


class Geometry(NamedTuple):
    """UNet widths the shapes are checked against. SD1.5 is the only real one; tests use tiny ones."""
    model_channels: int = 320
    context_dim: int = 768


SD15 = Geometry()


class FlashFaceWeights(NamedTuple):
    main: dict[str, torch.Tensor]           # denoising UNet, 5-channel input_blocks.0.0
    ref: dict[str, torch.Tensor]            # reference UNet, 4-channel input_blocks.0.0
    ref_attention: dict[str, torch.Tensor]  # <block>.transformer_blocks.0.flashface_ref_attn.*


def expected_shapes(geometry: Geometry = SD15) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{"main"|"ref"|"ref_attention": {comfy key: shape}}``."""
    out: dict[str, dict[str, tuple[int, ...]]] = {flashface_keys.MAIN: {}, flashface_keys.REF: {}, "ref_attention": {}}
    for e in flashface_keys.layout(*geometry).values():
        for unet, key in e.targets:
            out["ref_attention" if flashface_keys.is_ref_attention_key(key) else unet][key] = e.shape
    return out


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


# --- reading ------------------------------------------------------------------------------------

class _SafetensorsFile(Mapping):
    """Read-only mapping over a safetensors file; a tensor is read only when asked for."""

    def __init__(self, path: str):
        self._file = safe_open(path, framework="pt", device="cpu")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)
        self.metadata = self._file.metadata() or {}

    def __contains__(self, key):  # Mapping's default would read the tensor
        return key in self._key_set

    def __getitem__(self, key):
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as fh:  # 8-byte little-endian header size, then the JSON header
        return fh.read(9)[8:9] == b"{"


DAMAGED = ("the file is damaged or incomplete (an interrupted download or copy?): download or convert it again. "
           + SOURCE_HINT)


def read_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    """The raw key -> tensor mapping of a pickle or safetensors file, without unpickling objects."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no FlashFace checkpoint at {path}. {SOURCE_HINT}")
    name = os.path.basename(path)
    if os.path.getsize(path) == 0:
        raise FlashFaceCheckpointError(f"{name} is empty (0 bytes); {DAMAGED}")
    if _is_safetensors(path):
        try:
            return _SafetensorsFile(path)
        except SafetensorError as e:
            raise FlashFaceCheckpointError(f"{name} is not a readable safetensors file ({e}); {DAMAGED}") from None
    try:
        try:
            sd = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            log.warning("%s is in torch's legacy format and cannot be memory-mapped; reading it whole", path)
            sd = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():   # not a class the safe unpickler refused: bytes that are no pickle
            raise FlashFaceCheckpointError(f"{name} is not a readable torch checkpoint (its bytes are not a "
                                           f"pickle of tensors); {DAMAGED}") from None
        raise FlashFaceCheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors ({e}). {SOURCE_HINT}") from e
    except (RuntimeError, EOFError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        # torch.load's errors for text, truncated zips and cut-off pickles are whatever the reader met first
        raise FlashFaceCheckpointError(f"{name} is not a readable torch checkpoint ({type(e).__name__}: "
                                       f"{str(e)[:120]}); {DAMAGED}") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FlashFaceCheckpointError(
            f"this is not a FlashFace checkpoint: {path} is not a flat dict of tensors. {SOURCE_HINT}")
    return sd


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    return sd.shape(key) if isinstance(sd, _SafetensorsFile) else tuple(sd[key].shape)


def _listing(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def convert(sd: Mapping[str, torch.Tensor], dtype=None, geometry: Geometry = SD15) -> FlashFaceWeights:
    """Rename a FlashFace state dict to ComfyUI keys after checking every key and shape.

    Deliberately dropped keys (see :mod:`.flashface_keys`) may be absent; an ``ori_*`` key may be
    stored under its alias instead. Anything unknown, missing or mis-shaped raises
    :class:`FlashFaceCheckpointError` listing all problems at once.
    """
    dtype = _dtype(dtype)
    table = flashface_keys.layout(*geometry)
    unknown = [k for k in sd if k not in table]
    if unknown:
        hint = (" (looks like an ordinary SD checkpoint: FlashFace needs its own main and reference UNets)"
                if any(k.startswith(flashface_keys.COMFY_PREFIX) for k in unknown) else "")
        raise FlashFaceCheckpointError(
            f"this is not a FlashFace checkpoint: unexpected keys {_listing(unknown)}{hint}. {SOURCE_HINT}")
    sources, missing, wrong = {}, [], []
    for key, e in table.items():
        if not e.targets:
            continue
        src = key if key in sd else flashface_keys.alias_of(key)
        if src is None or src not in sd:
            missing.append(key)
            continue
        sources[key] = src
        got = _shape(sd, src)
        if got != e.shape:
            wrong.append(f"{src} (ComfyUI {e.targets[0][1]}): expected {e.shape}, got {got}")
    if missing:
        raise FlashFaceCheckpointError(
            f"this is not a FlashFace checkpoint (or it is truncated): missing keys {_listing(missing)}. {SOURCE_HINT}")
    if wrong:
        raise FlashFaceCheckpointError(
            f"wrong shape for {len(wrong)} tensor(s): " + "; ".join(wrong[:5])
            + f". The file does not hold FlashFace's SD1.5 UNets. {SOURCE_HINT}")
    out = FlashFaceWeights({}, {}, {})
    for key, src in sources.items():
        t = _cast(sd[src], dtype)  # one tensor object even when both UNets use it
        for unet, ckey in table[key].targets:
            (out.ref_attention if flashface_keys.is_ref_attention_key(ckey) else getattr(out, unet))[ckey] = t
    log.info("FlashFace: %d main, %d reference, %d reference-attention tensors (%d shared main/ref)",
             len(out.main), len(out.ref), len(out.ref_attention), sum(out.ref[k] is out.main.get(k) for k in out.ref))
    return out


# --- our deduplicated file ----------------------------------------------------------------------

def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
                      and a.data_ptr() == b.data_ptr())


def save_converted(weights: FlashFaceWeights, path: str) -> None:
    """One safetensors file: ``main.*``, ``ref.*``, ``ref_attention.*``; a reference tensor that is
    the main model's own (time embedding, middle block, head) is stored once, under ``main.``."""
    shared = sorted(k for k, t in weights.ref.items() if k in weights.main and _same(t, weights.main[k]))
    set_shared = set(shared)
    tensors = {f"main.{k}": t for k, t in weights.main.items()}
    tensors.update({f"ref.{k}": t for k, t in weights.ref.items() if k not in set_shared})
    tensors.update({f"ref_attention.{k}": t for k, t in weights.ref_attention.items()})
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "ref_from_main": json.dumps(shared),
                "dtype": ",".join(sorted({str(t.dtype).replace("torch.", "") for d in weights for t in d.values()}))}
    tmp = f"{path}.tmp"  # never leave a half-written file under the final name
    try:
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("wrote %s: %d tensors (%d reference tensors shared with main)", path, len(tensors), len(shared))


def check(weights: FlashFaceWeights, geometry: Geometry = SD15) -> None:
    """Raise :class:`FlashFaceCheckpointError` unless every state dict has exactly the expected keys and shapes."""
    for name, expected in expected_shapes(geometry).items():
        got = getattr(weights, name)
        missing, extra = set(expected) - set(got), set(got) - set(expected)
        if missing or extra:
            raise FlashFaceCheckpointError(
                f"this is not a converted FlashFace file: {name} has missing keys [{_listing(missing)}] "
                f"and unexpected keys [{_listing(extra)}]. {SOURCE_HINT}")
        wrong = [f"{name}.{k}: expected {s}, got {tuple(got[k].shape)}" for k, s in expected.items()
                 if tuple(got[k].shape) != s]
        if wrong:
            raise FlashFaceCheckpointError(
                f"wrong shape for {len(wrong)} tensor(s): {'; '.join(wrong[:5])}. {SOURCE_HINT}")


def _load_converted(f: _SafetensorsFile, dtype, geometry: Geometry) -> FlashFaceWeights:
    version = f.metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise FlashFaceCheckpointError(
            f"converted FlashFace file has format_version {version!r}, this pack reads {FORMAT_VERSION!r}: "
            f"convert flashface.ckpt again with this version of the pack")
    out = FlashFaceWeights({}, {}, {})
    for name in f:
        field, _, key = name.partition(".")
        if field not in out._fields:
            raise FlashFaceCheckpointError(f"unexpected tensor {name!r} in converted FlashFace file. {SOURCE_HINT}")
        getattr(out, field)[key] = _cast(f[name], dtype)
    for key in json.loads(f.metadata.get("ref_from_main", "[]")):
        if key not in out.main:
            raise FlashFaceCheckpointError(
                f"converted FlashFace file is damaged: shared key {key!r} is missing. {SOURCE_HINT}")
        out.ref[key] = out.main[key]
    check(out, geometry)
    return out


# (key in a FlashFace file, key in our converted file): the width of the time embedding's input is the
# UNet's model_channels; the input width of a cross-attention key projection is the text context width.
_GEOMETRY_PROBES = (
    ("time_embedding.0.weight", "main.time_embed.0.weight"),
    ("ori_encoder.1.1.blocks.0.cross_attn.k.weight", "main.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"),
)


def infer_geometry(sd: Mapping[str, torch.Tensor]) -> Geometry:
    """The widths a FlashFace-layout state dict was made with; SD1.5's when the file does not tell.

    Files that are not FlashFace's fall back to SD1.5 so that :func:`convert` reports what is wrong.
    """
    found = []
    for names in _GEOMETRY_PROBES:
        cands = list(names) + [flashface_keys.alias_of(names[0]) or names[0]]
        key = next((k for k in cands if k in sd), None)
        if key is None:
            return SD15
        found.append(_shape(sd, key)[1])
    return Geometry(*found)


def load(path: str, dtype=None, geometry: Geometry | str = SD15) -> FlashFaceWeights:
    """Any of the three inputs (see the module docstring) -> :class:`FlashFaceWeights`.

    ``geometry="auto"`` reads the widths from the file (tiny test checkpoints); every key and shape
    is still checked against the released layout at those widths.
    """
    sd = read_state_dict(path)
    if geometry == "auto":
        geometry = infer_geometry(sd)
        if geometry != SD15:
            log.warning("%s has non-SD1.5 widths %s: a test checkpoint, not the released weights", path, geometry)
    try:
        if isinstance(sd, _SafetensorsFile) and sd.metadata.get("format") == FORMAT:
            out = _load_converted(sd, _dtype(dtype), geometry)
        else:
            out = convert(sd, dtype, geometry)
    except SafetensorError as e:   # a readable header over missing or cut-off data
        raise FlashFaceCheckpointError(f"{os.path.basename(path)}: a tensor cannot be read ({e}); {DAMAGED}") from None
    _check_finite(out, os.path.basename(path), dtype)
    return out


def _check_finite(weights: FlashFaceWeights, name: str, dtype) -> None:
    """NaN/inf weights load silently and sample an all-NaN latent: refuse them (after the dtype cast, which
    turns values beyond fp16's range into inf)."""
    seen = set()
    for field, sd in zip(weights._fields, weights):
        for key, t in sd.items():
            if id(t) in seen or not t.is_floating_point():
                continue
            seen.add(id(t))
            if not bool(torch.isfinite(t).all()):
                hint = (" (or values beyond fp16's range: load it with weight_dtype bf16 or fp32)"
                        if _dtype(dtype) == torch.float16 else "")
                raise FlashFaceCheckpointError(f"{name}: {field} tensor {key!r} holds NaN or infinite values{hint}; "
                                               f"{DAMAGED}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m guidance.flashface_checkpoint",
                                     description="Convert flashface.ckpt to one deduplicated safetensors file.")
    parser.add_argument("input", help="flashface.ckpt, a safetensors copy of it, or a converted file")
    parser.add_argument("output", help="OUT.safetensors")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: keep the stored dtype")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        save_converted(load(args.input, dtype=args.dtype), args.output)
    except (FlashFaceCheckpointError, FileNotFoundError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
