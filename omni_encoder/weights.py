"""File formats: identity weight files and encoded identities (safetensors).

Identity weight file
--------------------
One ``.safetensors`` file per base-model family (SD1.5, SDXL, FLUX). It holds the identity encoder and
the injection projections trained with it; the encoder's config lives in the file's metadata, so a
file is loadable without any side information.

Tensor keys::

    encoder.<name>   the encoder module's state_dict, e.g. for Omni-ID
                       encoder.queries                                   (256, 1280)
                       encoder.transformer.cross_blocks.0.attn.to_k.weight  (1280, 1280)
                       encoder.transformer.self_blocks.1.ff.2.weight     (1280, 5120)
                       encoder.transformer.norm_out.weight               (1280,)
                     (the CLIP baseline has no parameters, hence no encoder.* keys)
    proj.<name>      injection projections (the K/V layers that feed identity tokens into the base
                     model); named by the injection code of each base family. This module stores
                     and returns them verbatim and checks them only when given the expected shapes.

No other prefixes are allowed.

Metadata (safetensors ``__metadata__``, all values are strings)::

    format            "omni_id"
    format_version    "1"   (readers refuse newer versions)
    encoder_type      omni_id | clip | arcface | arcface_clip
    base_family       sd15 | sdxl | flux
    injected_blocks   JSON: the blocks the proj.* layers attach to (a list or an object)
    token_dim, clip_dim, arcface_dim, arcface_rank, num_queries, num_cross_blocks,
    num_self_blocks, heads, mlp_ratio, tokens_per_image
                      the encoder's OmniIDConfig (decimal strings)
    version           version of the encoder definition / of these weights
    <other keys>      kept verbatim (for example injection widths written by the injection code)

Encoded identity file
---------------------
The output of an encoder for one or more identities, saved for reuse without the source images.

Tensor keys::

    identity          (N_id, L, C): N_id identities of L tokens of width C (Omni-ID: L=256, C=1280)

Metadata::

    format            "omni_id_identity"
    format_version    "1"
    num_identities, num_tokens, token_dim   the tensor's shape (decimal strings)
    num_source_images JSON list, number of images each identity was encoded from
    encoder_type      the encoder that produced the tokens (when known)
    <other keys>      strings, kept verbatim (non-string values are stored as JSON)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .baselines import build_encoder
from .encoder import ENCODER_TYPES, IdentityEncoder, OmniIDConfig
from ..errors import OmniIDError

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "omni_id"
IDENTITY_FORMAT = "omni_id_identity"
FORMAT_VERSION = 1
IDENTITY_FORMAT_VERSION = 1
BASE_FAMILIES = ("sd15", "sdxl", "flux")
FAMILY_LABELS = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "FLUX"}
ENCODER_PREFIX = "encoder."
PROJ_PREFIX = "proj."
IDENTITY_KEY = "identity"

_CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(OmniIDConfig))
_WEIGHTS_RESERVED = _CONFIG_KEYS | {"format", "format_version", "base_family", "injected_blocks"}
_IDENTITY_RESERVED = frozenset({"format", "format_version", "num_identities", "num_tokens", "token_dim", "num_source_images"})

StateDict = Mapping[str, torch.Tensor]
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class IdentityWeightsMeta:
    """What an identity weight file says about itself (its metadata, parsed)."""

    config: OmniIDConfig
    base_family: str
    injected_blocks: Any = ()              # JSON-serialisable; defined by the injection code
    format_version: int = FORMAT_VERSION
    extra: Mapping[str, str] = field(default_factory=dict)  # unknown keys, kept verbatim

    def __post_init__(self):
        if self.base_family not in BASE_FAMILIES:
            raise OmniIDError(f"base_family {self.base_family!r} is not one of {', '.join(BASE_FAMILIES)}")
        clash = sorted(set(self.extra) & _WEIGHTS_RESERVED)
        if clash:
            raise OmniIDError(f"extra metadata keys {clash} are reserved by the file format; rename them")

    @property
    def encoder_type(self) -> str:
        return self.config.encoder_type

    def to_metadata(self) -> dict[str, str]:
        md = {str(k): str(v) for k, v in self.extra.items()}
        md.update(self.config.to_dict())
        md.update({
            "format": WEIGHTS_FORMAT,
            "format_version": str(self.format_version),
            "base_family": self.base_family,
            "injected_blocks": json.dumps(self.injected_blocks if not isinstance(self.injected_blocks, tuple)
                                          else list(self.injected_blocks)),
        })
        return md

    @classmethod
    def from_metadata(cls, metadata: Optional[Mapping[str, str]], source: str = "metadata") -> "IdentityWeightsMeta":
        check_weights_format(metadata, source)
        try:
            injected = json.loads(metadata.get("injected_blocks", "[]"))
        except json.JSONDecodeError:
            raise OmniIDError(f"{source}: injected_blocks is not valid JSON ({metadata['injected_blocks'][:60]!r}); "
                             "re-save the file with save_identity_weights") from None
        extra = {k: v for k, v in metadata.items() if k not in _WEIGHTS_RESERVED}
        return cls(config=OmniIDConfig.from_dict(metadata), base_family=metadata.get("base_family", ""),
                   injected_blocks=injected, format_version=int(metadata["format_version"]), extra=extra)


# ---------------------------------------------------------------------------------------------------
# Validation helpers: each raises ValueError with a message that says how to fix the problem.


def check_weights_format(metadata: Optional[Mapping[str, str]], source: str = "file") -> None:
    """The metadata must say format=omni_id with a format_version this code can read."""
    fmt = (metadata or {}).get("format")
    if fmt == IDENTITY_FORMAT:
        raise OmniIDError(f"{source} is an encoded identity, not identity weights; load it with the identity "
                         "loader (load_identity), and pick an Omni-ID weight file for the model loader")
    if fmt != WEIGHTS_FORMAT:
        raise OmniIDError(f"{source} is not an Omni-ID identity weight file (metadata format={fmt!r}, expected "
                         f"{WEIGHTS_FORMAT!r}); pick a file saved by this node pack (save_identity_weights)")
    _check_version(metadata, FORMAT_VERSION, source)
    if metadata.get("base_family") not in BASE_FAMILIES:
        raise OmniIDError(f"{source}: base_family={metadata.get('base_family')!r} is not one of "
                         f"{', '.join(BASE_FAMILIES)}; re-save the file with save_identity_weights")
    if metadata.get("encoder_type") not in ENCODER_TYPES:
        raise OmniIDError(f"{source}: encoder_type={metadata.get('encoder_type')!r} is not one of "
                         f"{', '.join(ENCODER_TYPES)}; re-save the file with save_identity_weights")


def _check_version(metadata: Mapping[str, str], supported: int, source: str) -> None:
    raw = metadata.get("format_version", "")
    try:
        version = int(raw)
    except ValueError:
        raise OmniIDError(f"{source}: format_version={raw!r} is not an integer; re-save the file") from None
    if version > supported:
        raise OmniIDError(f"{source} was written in format_version {version}, this node pack reads up to "
                         f"{supported}; update the node pack")


def check_base_family(meta: IdentityWeightsMeta, model_family: str) -> None:
    """The file must have been trained for the family of the model it is applied to."""
    if model_family not in BASE_FAMILIES:
        raise OmniIDError(f"unknown model family {model_family!r}; expected one of {', '.join(BASE_FAMILIES)}")
    if meta.base_family != model_family:
        raise OmniIDError(f"this file was trained for {meta.base_family}; use it with a "
                         f"{FAMILY_LABELS[meta.base_family]} model or load the {model_family} file")


def check_state_dict(expected: Mapping[str, Union[torch.Size, tuple, torch.Tensor]], actual: StateDict,
                     what: str = "encoder", prefix: str = ENCODER_PREFIX) -> None:
    """``actual`` must hold exactly the keys of ``expected`` with the same shapes.

    ``expected`` maps key -> shape (or a tensor, e.g. a module's state_dict). Keys are reported with
    ``prefix`` so that messages name the keys as they appear in the file.
    """
    exp = {k: tuple(v.shape if isinstance(v, torch.Tensor) else v) for k, v in expected.items()}
    missing = [k for k in exp if k not in actual]
    if missing:
        raise OmniIDError(
            f"{what} weights: {len(missing)} key(s) missing from the file, e.g. {_few(missing, prefix)}; the file is "
            f"incomplete or was saved for another encoder_type/config: re-save it with save_identity_weights "
            f"from a complete model")
    unexpected = [k for k in actual if k not in exp]
    if unexpected:
        raise OmniIDError(
            f"{what} weights: {len(unexpected)} unexpected key(s) in the file, e.g. {_few(unexpected, prefix)}; the "
            f"file holds a different layout than its metadata describes: re-save it with save_identity_weights")
    for k, shape in exp.items():
        got = tuple(actual[k].shape)
        if got != shape:
            raise OmniIDError(
                f"{what} weights: shape mismatch for {prefix}{k}: file has {got}, model expects {shape}; the file's "
                f"tensors do not match the config they are loaded with (token_dim, num_queries, ...): build the "
                f"model from the file's metadata (load_identity_encoder) or re-save the file")


def _few(keys: list, prefix: str, n: int = 3) -> str:
    shown = ", ".join(prefix + k for k in keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def require_finite(tensors: Mapping[str, torch.Tensor], source: str, error: type = OmniIDError) -> None:
    """Every floating tensor must be finite: a file holding NaN/inf loads silently and then samples NaN images."""
    for key, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise error(f"{source}: tensor {key!r} holds {n} NaN or infinite value(s); the file is damaged or comes "
                        "from a diverged training run: use another copy (or an earlier checkpoint)")


def expected_encoder_shapes(config: OmniIDConfig) -> dict[str, tuple]:
    """Key -> shape of the encoder ``config`` describes, without allocating its weights."""
    with torch.device("meta"):
        encoder = build_encoder(config)
    return {k: tuple(v.shape) for k, v in encoder.state_dict().items()}


# ---------------------------------------------------------------------------------------------------
# Identity weight files


def save_identity_weights(path: PathLike, encoder_sd: StateDict, proj_sd: StateDict,
                          meta: Union[IdentityWeightsMeta, Mapping[str, str]]) -> None:
    """Write encoder + injection projections + metadata to one safetensors file.

    ``encoder_sd`` must match ``meta.config`` exactly (checked, so a broken file is never written).
    """
    if not isinstance(meta, IdentityWeightsMeta):
        meta = IdentityWeightsMeta.from_metadata({"format": WEIGHTS_FORMAT, "format_version": str(FORMAT_VERSION),
                                                  **meta}, "meta")
    check_state_dict(expected_encoder_shapes(meta.config), encoder_sd, "encoder")
    tensors = {ENCODER_PREFIX + k: _plain(v) for k, v in encoder_sd.items()}
    tensors.update({PROJ_PREFIX + k: _plain(v) for k, v in proj_sd.items()})
    save_file(tensors, os.fspath(path), metadata=meta.to_metadata())
    log.info("saved identity weights %s (%s for %s: %d encoder, %d projection tensors)",
             path, meta.encoder_type, meta.base_family, len(encoder_sd), len(proj_sd))


def _plain(t: torch.Tensor) -> torch.Tensor:
    # safetensors needs contiguous CPU tensors; detach so Parameters are accepted.
    return t.detach().to("cpu").contiguous()


def read_metadata(path: PathLike, name: Optional[str] = None) -> dict[str, str]:
    """The safetensors metadata of ``path`` (empty if none); ValueError if it is not a safetensors file.

    ``name``: how messages call the file (e.g. the name a user chose; default: the path)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else e   # OSError's text repeats the path
        raise OmniIDError(f"{name or path} is not a readable safetensors file ({detail}); pick a .safetensors file "
                          "saved by this node pack") from None


def load_identity_weights(path: PathLike, device: Union[str, torch.device] = "cpu"
                          ) -> tuple[IdentityWeightsMeta, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read an identity weight file: (meta, encoder state_dict, projection state_dict), prefixes removed.

    The format, and the encoder tensors against the file's own config, are checked. The projections
    are returned as they are; check them with ``check_state_dict(expected, proj_sd, "projection",
    PROJ_PREFIX)`` once the injection code knows what it expects.
    """
    meta = IdentityWeightsMeta.from_metadata(read_metadata(path), str(path))
    encoder_sd, proj_sd, other = {}, {}, []
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        for key in f.keys():
            if key.startswith(ENCODER_PREFIX):
                encoder_sd[key[len(ENCODER_PREFIX):]] = f.get_tensor(key)
            elif key.startswith(PROJ_PREFIX):
                proj_sd[key[len(PROJ_PREFIX):]] = f.get_tensor(key)
            else:
                other.append(key)
    if other:
        raise OmniIDError(f"{path}: {len(other)} key(s) outside the encoder./proj. prefixes, e.g. {_few(other, '')}; "
                         "re-save the file with save_identity_weights")
    check_state_dict(expected_encoder_shapes(meta.config), encoder_sd, "encoder")
    require_finite({ENCODER_PREFIX + k: v for k, v in encoder_sd.items()}, str(path))
    require_finite({PROJ_PREFIX + k: v for k, v in proj_sd.items()}, str(path))
    log.info("loaded identity weights %s (%s for %s, version %s)", path, meta.encoder_type, meta.base_family,
             meta.config.version)
    return meta, encoder_sd, proj_sd


def load_identity_encoder(path: PathLike, model_family: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                          dtype: Optional[torch.dtype] = None
                          ) -> tuple[IdentityEncoder, IdentityWeightsMeta, dict[str, torch.Tensor]]:
    """Build the encoder a weight file describes and load its weights: (encoder in eval mode, meta, proj_sd).

    With ``model_family`` the file's base family is checked first (before any tensor is read).
    """
    if model_family is not None:
        check_base_family(IdentityWeightsMeta.from_metadata(read_metadata(path), str(path)), model_family)
    meta, encoder_sd, proj_sd = load_identity_weights(path, device)
    with torch.device("meta"):
        encoder = build_encoder(meta.config)
    # assign=True adopts the loaded tensors instead of copying into meta placeholders.
    encoder.load_state_dict(encoder_sd, strict=True, assign=True)
    encoder.to(device=device, dtype=dtype).eval()
    return encoder, meta, proj_sd


# ---------------------------------------------------------------------------------------------------
# Encoded identities


def save_identity(path: PathLike, tokens: torch.Tensor, meta: Optional[Mapping[str, Any]] = None) -> None:
    """Save encoded identities (N_id, L, C), or one identity (L, C), with metadata.

    ``meta["num_source_images"]`` may be an int (same for every identity) or one int per identity.
    Other values are stored as strings (non-strings as JSON).
    """
    if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point() or tokens.ndim not in (2, 3):
        raise OmniIDError(f"identity tokens must be a float tensor (N_id, L, C) or (L, C), got "
                         f"{getattr(tokens, 'shape', type(tokens))}")
    if tokens.ndim == 2:
        tokens = tokens.unsqueeze(0)
    n_id, n_tok, dim = tokens.shape
    meta = dict(meta or {})
    sources = meta.pop("num_source_images", None)
    if sources is None:
        sources = []
    elif isinstance(sources, int):
        sources = [sources] * n_id
    elif len(sources) != n_id or not all(isinstance(s, int) for s in sources):
        raise OmniIDError(f"num_source_images must be an int or {n_id} ints (one per identity), got {sources!r}")
    clash = sorted(set(meta) & _IDENTITY_RESERVED)
    if clash:
        raise OmniIDError(f"metadata keys {clash} are set by save_identity itself; remove them from meta")
    md = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    md.update({
        "format": IDENTITY_FORMAT,
        "format_version": str(IDENTITY_FORMAT_VERSION),
        "num_identities": str(n_id),
        "num_tokens": str(n_tok),
        "token_dim": str(dim),
        "num_source_images": json.dumps(list(sources)),
    })
    save_file({IDENTITY_KEY: _plain(tokens)}, os.fspath(path), metadata=md)
    log.info("saved %d encoded identit%s (%d x %d tokens) to %s", n_id, "y" if n_id == 1 else "ies", n_tok, dim, path)


def load_identity(path: PathLike, device: Union[str, torch.device] = "cpu", name: Optional[str] = None
                  ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read an encoded identity file: (tokens (N_id, L, C), metadata).

    In the metadata, num_identities / num_tokens / token_dim are ints and num_source_images a list of
    ints; every other value is the stored string. ``name``: how messages call the file (default: the path).
    """
    md = read_metadata(path, name)
    src = name or str(path)
    fmt = md.get("format")
    if fmt == WEIGHTS_FORMAT:
        raise OmniIDError(f"{src} holds identity encoder weights, not an encoded identity; load it with the "
                         "identity-weights loader and encode images with it")
    if fmt != IDENTITY_FORMAT:
        raise OmniIDError(f"{src} is not an encoded identity file (metadata format={fmt!r}, expected "
                         f"{IDENTITY_FORMAT!r}); pick a file saved by save_identity")
    _check_version(md, IDENTITY_FORMAT_VERSION, src)
    try:
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            if IDENTITY_KEY not in f.keys():
                raise OmniIDError(f"{src} has no {IDENTITY_KEY!r} tensor; re-save it with save_identity")
            tokens = f.get_tensor(IDENTITY_KEY)
    except SafetensorError as e:   # a header that reads, then data that does not (truncated copy)
        raise OmniIDError(f"{src} is damaged ({e}); save the identity again") from None
    meta: dict[str, Any] = dict(md)
    try:
        for k in ("num_identities", "num_tokens", "token_dim"):
            meta[k] = int(md[k])
        meta["num_source_images"] = [int(s) for s in json.loads(md.get("num_source_images", "[]"))]
    except (KeyError, ValueError, TypeError) as e:
        raise OmniIDError(f"{src}: malformed identity metadata ({e}); re-save it with save_identity") from None
    if tokens.ndim != 3 or tuple(tokens.shape) != (meta["num_identities"], meta["num_tokens"], meta["token_dim"]):
        raise OmniIDError(f"{src}: tensor shape {tuple(tokens.shape)} disagrees with its metadata "
                         f"({meta['num_identities']}, {meta['num_tokens']}, {meta['token_dim']}); re-save it with save_identity")
    if 0 in tokens.shape:
        raise OmniIDError(f"{src} holds no identity (tokens {tuple(tokens.shape)}); save an encoded identity again")
    if not tokens.is_floating_point():
        raise OmniIDError(f"{src}: identity tokens are {tokens.dtype}, not floats; save the identity again")
    require_finite({IDENTITY_KEY: tokens}, src)
    return tokens, meta
