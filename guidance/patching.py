"""One attention-patching layer for every injector of this pack (SD1.5/SDXL UNets and FLUX DiT).

How it hooks into ComfyUI (public patch points only; no private forward is copied or overridden):

* UNet: ``patches_replace["attn1"|"attn2"][(block, id, transformer_index)]`` for every transformer
  block of the model. The hook computes the stock attention with ComfyUI's own ``optimized_attention``
  (or calls a replace that another pack installed there first), then lets each injector transform it.
* FLUX: ``patches_replace["dit"][("double_block"|"single_block", i)]``. Each injector wraps the call
  of the original block (``extra["original_block"]``), so it can change the inputs, the attention (via
  ``optimized_attention_override`` for the duration of the block) or the outputs.
* UNet, only for injectors that ask for it: ``patches["attn1_patch"|"attn2_patch"]`` records the
  attention input (the normed hidden states, ``CallContext.x``) and ``patches["attn1_output_patch"|
  "attn2_output_patch"]`` runs the ``attn1_output``/``attn2_output`` hooks on the attention output
  after ``to_out``, before the residual (for modules with their own output projection).
* One ``DIFFUSION_MODEL`` wrapper per patched model records the latent shape and the diffusion model
  in the transformer options of that call (for token grids and block access) and gives every injector
  a once-per-model-call hook (``on_model_call``), e.g. for a reference pass.

Stacking order (documented contract): injectors run in the order they were applied to the model.
For UNet attention, ``out = inj_n(... inj_2(inj_1(base)))``; for FLUX blocks, the first applied wraps
the original block most closely and the last applied is outermost. Applying a patch always clones the
ModelPatcher and replaces the layer object on the clone by a new one; layers are never mutated, so
the input model (and every earlier clone) keeps its options.

Each injector is active only between its start and end percent, converted to sigmas with the model's
own ``model_sampling``, and only on the rows it asks for (cond, uncond or both), read from
``cond_or_uncond`` (ComfyUI: 0 = cond, 1 = uncond). A caller that batches extra condition chunks
(labels 2, 3, ...) names their role in ``transformer_options[ROLES_KEY]`` ({label: COND|UNCOND}).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

import comfy.model_base
import comfy.patcher_extension
from comfy.ldm.modules.attention import optimized_attention
from ..errors import PatchingError

log = logging.getLogger(__name__)

LAYER_KEY = "idportrait_layer"          # transformer_options key holding the current layer
WRAPPER_KEY = "idportrait"              # wrapper key on the ModelPatcher
SHAPE_KEY = "idportrait_latent_shape"   # transformer_options key set for each model call
MODEL_KEY = "idportrait_diffusion_model"
TXT_LEN_KEY = "idportrait_txt_len"      # transformer_options: FLUX text tokens of this call (set by double blocks)
SIGMA_KEY = "idportrait_sigma"          # transformer_options: this call's sigma as a float (one device sync per call)
STREAMS_KEY = "idportrait_streams"     # transformer_options key: per-chunk row layout of named streams
ROLES_KEY = "idportrait_cond_roles"     # transformer_options: {chunk label: COND|UNCOND} for labels >= 2
INPUT_KEY = "idportrait_{}_input"       # extra_options: the input of attn1/attn2 (after norm1/norm2)

COND, UNCOND = 0, 1
APPLY_TO = ("both", "cond", "uncond")

SD_KINDS = ("attn1", "attn2")
SD_OUTPUT_KINDS = ("attn1_output", "attn2_output")
DIT_KINDS = ("double", "single")


def model_family(model) -> str:
    """'flux', 'sdxl', 'sd15' or 'unet' (another UNet model) for a ModelPatcher or BaseModel."""
    base = getattr(model, "model", model)
    if isinstance(base, comfy.model_base.Flux):
        return "flux"
    if isinstance(base, comfy.model_base.SDXL):
        return "sdxl"
    if isinstance(base, comfy.model_base.BaseModel) and hasattr(base.diffusion_model, "input_blocks"):
        ctx = getattr(base.model_config, "unet_config", {}).get("context_dim")
        return "sd15" if type(base) is comfy.model_base.BaseModel and ctx in (768, 64) else "unet"
    return "other"


def unet_block_keys(diffusion_model) -> list[tuple[str, int, int]]:
    """Every (block_name, block_id, transformer_index) key ComfyUI uses for attention patches."""
    keys = []
    groups = [("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
              ("output", diffusion_model.output_blocks)]
    for name, blocks in groups:
        for block_id, block in enumerate(blocks):
            for layer in block:
                tb = getattr(layer, "transformer_blocks", None)
                if tb is not None:
                    keys.extend((name, block_id, i) for i in range(len(tb)))
    return keys


def unet_attention_module(diffusion_model, key, kind: str):
    """The CrossAttention module (attn1/attn2) of a UNet block key, e.g. to project extra tokens."""
    name, block_id, index = key
    block = diffusion_model.middle_block if name == "middle" else getattr(diffusion_model, f"{name}_blocks")[block_id]
    for layer in block:
        if getattr(layer, "transformer_blocks", None) is not None:
            return getattr(layer.transformer_blocks[index], kind)
    raise KeyError(f"no transformer block at {key}")


def row_mask(cond_or_uncond: Optional[list], batch: int, apply_to: str, device=None,
             roles: Optional[dict] = None) -> Optional[torch.Tensor]:
    """Bool (batch,) of the rows an injector acts on; None means every row.

    ``roles`` maps extra chunk labels (>= 2) to COND or UNCOND; unmapped labels match neither.
    """
    if apply_to == "both" or not cond_or_uncond:
        return None
    want = COND if apply_to == "cond" else UNCOND
    roles = roles or {}
    chunk = batch // len(cond_or_uncond)
    rows = torch.tensor([roles.get(c, c) == want for c in cond_or_uncond for _ in range(chunk)], device=device)
    return rows


def token_mask(mask: torch.Tensor, grid_hw: tuple[int, int], batch: int, chunks: int = 1) -> torch.Tensor:
    """Resize a region mask (M,H,W) or (H,W) to a token grid: (batch or 1, h*w, 1), values in [0,1].

    Area interpolation keeps the mass of soft masks. ``batch`` rows are ``chunks`` cond/uncond chunks of
    the latent batch; M must be 1 or the latent batch (one mask per image, repeated over the chunks).
    """
    if mask.ndim == 2:
        mask = mask[None]
    h, w = grid_hw
    m = F.interpolate(mask[:, None].float(), size=(h, w), mode="area" if mask.shape[-1] >= w else "bilinear")
    m = m.reshape(m.shape[0], h * w, 1).clamp(0, 1)
    per = batch // chunks if chunks > 0 and batch % chunks == 0 else batch
    if m.shape[0] != 1:
        if m.shape[0] != per:
            raise PatchingError(f"{m.shape[0]} masks for {per} latent image(s): connect one mask, or one per latent image")
        m = m.repeat(batch // per, 1, 1)
    return m


def stream_layout(transformer_options: dict) -> Optional[tuple]:
    """The ``((name, rows), ...)`` layout every chunk of this call follows, or None."""
    lay = (transformer_options or {}).get(STREAMS_KEY)
    return tuple((str(n), int(r)) for n, r in lay) if lay else None


def stream_rows(transformer_options: dict, batch: int, name: str, apply_to: str = "both",
                device=None) -> Optional[torch.Tensor]:
    """Row indices (long, chunk-major) of stream ``name`` in the chunks ``apply_to`` selects.

    None when the call has no stream layout or the batch does not follow it (then nobody should
    treat any row as belonging to a stream); an empty tensor when the stream has no rows here.
    """
    lay = stream_layout(transformer_options)
    if lay is None:
        return None
    size = sum(r for _, r in lay)
    if size <= 0 or batch % size:
        return None
    cou = (transformer_options or {}).get("cond_or_uncond") or []
    chunks = batch // size
    if cou and len(cou) != chunks:
        return None
    offset, count = 0, 0
    for n, r in lay:
        if n == name:
            count = r
            break
        offset += r
    want = None if apply_to == "both" else (COND if apply_to == "cond" else UNCOND)
    roles = (transformer_options or {}).get("idportrait_cond_roles") or {}   # labels >= 2 (see ROLES_KEY)
    rows = [c * size + offset + i for c in range(chunks) for i in range(count)
            if want is None or not cou or roles.get(cou[c], cou[c]) == want]
    return torch.tensor(rows, dtype=torch.long, device=device)


def stream_pairs(transformer_options: dict, batch: int, a: str, b: str, apply_to: str = "both", device=None):
    """(rows of stream a, the rows of stream b at the same position of the same chunk), or None.

    Needs both streams present with the same number of rows per chunk.
    """
    lay = stream_layout(transformer_options)
    ra = stream_rows(transformer_options, batch, a, apply_to, device)
    if ra is None:
        return None
    counts = dict(lay)
    if counts.get(a, 0) == 0 or counts.get(a) != counts.get(b):
        return None
    names = [n for n, _ in lay]
    off = lambda n: sum(r for m, r in lay[:names.index(n)])   # noqa: E731
    return ra, ra + (off(b) - off(a))


def chain_attention_override(transformer_options: dict, fn: Callable) -> dict:
    """A shallow copy of ``transformer_options`` whose attention override runs ``fn`` on top of any other.

    ``fn(attend, *args, **kwargs)`` receives ``attend``, which computes the attention exactly as it
    would be computed without ``fn`` (ComfyUI's function, or through the override installed before),
    plus the arguments of ``optimized_attention`` (q, k, v, heads, mask=..., skip_reshape=..., ...).
    ``fn`` must accept and forward unknown keyword arguments.
    """
    prev = transformer_options.get("optimized_attention_override")

    def override(func, *args, **kwargs):
        if prev is None:
            attend = func
        else:
            def attend(*a, **kw):
                return prev(func, *a, **kw)
        return fn(attend, *args, **kwargs)

    return {**transformer_options, "optimized_attention_override": override}


@dataclass
class CallContext:
    """What an injector sees at one hook call."""
    kind: str                        # attn1 | attn2 | double | single
    key: tuple                       # UNet (name, id, index) or FLUX (kind, index)
    sigma: float
    cond_or_uncond: list
    transformer_options: dict
    rows: Optional[torch.Tensor] = None   # bool (B,) rows this injector acts on; None = all
    base: Optional[torch.Tensor] = None   # UNet: the stock attention output of this block
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    n_heads: int = 0
    txt_len: int = 0                 # FLUX: number of text tokens (single blocks: txt comes first)
    batch: int = 0                   # rows of this call's batch
    x: Optional[torch.Tensor] = None  # UNet: the attention's input (norm1/norm2 output), when recorded

    @property
    def latent_shape(self):
        return self.transformer_options.get(SHAPE_KEY)

    @property
    def diffusion_model(self):
        return self.transformer_options.get(MODEL_KEY)

    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) of this block."""
        if self.kind in SD_KINDS + SD_OUTPUT_KINDS:
            return tuple(self.transformer_options["activations_shape"][-2:])
        return flux_token_grid(self.latent_shape)

    def token_mask(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        return token_mask(mask, self.grid(), batch, len(self.cond_or_uncond or []) or 1)

    def module(self):
        """UNet: the CrossAttention module of this hook; FLUX: the Double/SingleStreamBlock."""
        dm = self.diffusion_model
        if self.kind in SD_KINDS + SD_OUTPUT_KINDS:
            return unet_attention_module(dm, self.key, self.kind[:5])
        return (dm.double_blocks if self.kind == "double" else dm.single_blocks)[self.key[1]]

    def stream_rows(self, name: str, apply_to: str = "both") -> Optional[torch.Tensor]:
        """Row indices of stream ``name`` in this call (see ``stream_rows``); None without a layout."""
        batch = self.batch
        if not batch:
            shape = self.q.shape if self.q is not None else self.transformer_options.get(SHAPE_KEY, (0,))
            batch = shape[0]
        device = next((t.device for t in (self.q, self.x, self.base) if t is not None), None)
        return stream_rows(self.transformer_options, batch, name, apply_to, device=device)

    def mix(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """new on this injector's rows, old elsewhere (exactly)."""
        if self.rows is None:
            return new
        return torch.where(self.rows.view(-1, *([1] * (new.ndim - 1))), new, old)


class Injector:
    """Base class of everything this pack injects. Override only the hooks you need.

    Hooks (all must accept and ignore unknown keyword arguments):
      attn1(ctx, out, **kw) / attn2(ctx, out, **kw) -> out     UNet self-/cross-attention output (B, L, inner)
      attn1_output(ctx, out, **kw) / attn2_output(...) -> out  UNet attention output after to_out (B, L, C);
                                                               ctx.x is the attention's input
      double_block(ctx, args, call, **kw) / single_block(...) -> dict   FLUX: call(args) runs the inner chain
      on_model_call(transformer_options, x, timestep, **kw)    once per diffusion-model call; kw has
                                                               call_args/call_kwargs: the diffusion
                                                               model's own arguments (x, t, context, ...)
    """
    name = "injector"
    kinds: tuple = ()   # which hook kinds this injector implements
    needs_input = False  # UNet: record the attention input (ctx.x) for attn1/attn2 hooks too

    def __init__(self, start_percent: float = 0.0, end_percent: float = 1.0, apply_to: str = "both",
                 blocks: Optional[Iterable] = None):
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise PatchingError(f"need 0 <= start_percent ({start_percent}) <= end_percent ({end_percent}) <= 1")
        if apply_to not in APPLY_TO:
            raise PatchingError(f"apply_to must be one of {APPLY_TO}, got {apply_to!r}")
        self.start_percent, self.end_percent, self.apply_to = start_percent, end_percent, apply_to
        self.blocks = None if blocks is None else {tuple(b) for b in blocks}
        self.sigma_start, self.sigma_end = math.inf, 0.0

    def bind(self, model_sampling) -> None:
        """Convert the percent window to sigmas with the model's own schedule."""
        self.sigma_start = float(model_sampling.percent_to_sigma(self.start_percent))
        self.sigma_end = float(model_sampling.percent_to_sigma(self.end_percent))

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def wants(self, kind: str, key: tuple) -> bool:
        return kind in self.kinds and (self.blocks is None or key in self.blocks)

    # device/memory protocol ComfyUI calls on patch objects
    def to(self, device):
        return self

    def models(self) -> list:
        return []

    def on_model_call(self, transformer_options: dict, x, timestep, **kwargs) -> None:
        pass


def _sigma_of(to: dict) -> float:
    cached = to.get(SIGMA_KEY)
    if cached is not None and cached[0] is to.get("sigmas"):
        return cached[1]
    s = to.get("sigmas")
    return float(s.flatten()[0]) if s is not None else math.inf


class PatchLayer:
    """The immutable set of injectors on one model clone."""

    def __init__(self, injectors: tuple = ()):
        self.injectors = tuple(injectors)
        self._device = None

    def __deepcopy__(self, memo):
        return self   # immutable; 0.3.75 deep-copies model_options on clone, current shares: same behaviour

    def with_injector(self, injector: Injector) -> "PatchLayer":
        return PatchLayer(self.injectors + (injector,))

    def to(self, device):
        if device != self._device:
            for inj in self.injectors:
                inj.to(device)
            self._device = device
        return self

    def models(self) -> list:
        out = []
        for inj in self.injectors:
            out.extend(inj.models())
        return out

    def active_for(self, kind, key, to) -> list:
        sigma = _sigma_of(to)
        return [inj for inj in self.injectors if inj.wants(kind, key) and inj.active(sigma)], sigma


class _Hook:
    """Base of the callables stored in patches_replace; holds the layer and a chained foreign patch."""

    def __init__(self, layer: PatchLayer, kind: str, key: tuple, prev: Optional[Callable], primary: bool):
        self.layer, self.kind, self.key, self.prev, self.primary = layer, kind, key, prev, primary

    def __deepcopy__(self, memo):
        return self

    def to(self, device):
        self.layer.to(device)
        if self.prev is not None and hasattr(self.prev, "to"):
            self.prev = self.prev.to(device)
        return self

    def models(self) -> list:
        # Exactly one hook reports the layer's models so ComfyUI loads each once.
        out = self.layer.models() if self.primary else []
        if self.prev is not None and hasattr(self.prev, "models"):
            out += self.prev.models()
        return out


class _UnetAttnHook(_Hook):
    def __call__(self, q, k, v, extra_options, **kwargs):
        if self.prev is not None:
            base = self.prev(q, k, v, extra_options)
        else:
            base = optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                                       transformer_options=extra_options)
        injectors, sigma = self.layer.active_for(self.kind, self.key, extra_options)
        if not injectors:
            return base
        out = base
        cou = extra_options.get("cond_or_uncond") or []
        x = extra_options.get(INPUT_KEY.format(self.kind))
        for inj in injectors:
            rows = row_mask(cou, q.shape[0], inj.apply_to, q.device, extra_options.get(ROLES_KEY))
            ctx = CallContext(kind=self.kind, key=self.key, sigma=sigma, cond_or_uncond=cou,
                              transformer_options=extra_options, rows=rows, base=base, q=q, k=k, v=v,
                              n_heads=extra_options["n_heads"], x=x)
            new = getattr(inj, self.kind)(ctx, out)
            out = ctx.mix(new, out)
        return out


def _unet_key(extra_options) -> Optional[tuple]:
    block = extra_options.get("block")
    return None if block is None else (block[0], block[1], extra_options.get("block_index", 0))


class _UnetInputHook:
    """``attn1_patch``/``attn2_patch``: records the attention input for this block call, unchanged.

    ComfyUI builds one ``extra_options`` dict per transformer block call and hands the same dict to
    the input patch, the replace patch and the output patch, so the record lives exactly that long.
    """

    def __init__(self, kind: str):
        self.kind, self.slot = kind, INPUT_KEY.format(kind)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, *args, **kwargs):
        if "extra_options" in kwargs:   # newer ComfyUI also calls attn1_patch from FLUX blocks: not ours
            return {"q": args[0], "k": args[1], "v": args[2], "pe": kwargs.get("pe"),
                    "attn_mask": kwargs.get("attn_mask")}
        n, context, value, extra_options = args[:4]
        extra_options[self.slot] = n
        return n, context, value


class _UnetOutputHook(_Hook):
    """``attn1_output_patch``/``attn2_output_patch``: the attention output after ``to_out``."""

    def __call__(self, n, extra_options, **kwargs):
        key = _unet_key(extra_options)
        if key is None:
            return n
        injectors, sigma = self.layer.active_for(self.kind, key, extra_options)
        if not injectors:
            return n
        cou = extra_options.get("cond_or_uncond") or []
        x = extra_options.get(INPUT_KEY.format(self.kind[:5]))
        base, out = n, n
        for inj in injectors:
            rows = row_mask(cou, n.shape[0], inj.apply_to, n.device, extra_options.get(ROLES_KEY))
            ctx = CallContext(kind=self.kind, key=key, sigma=sigma, cond_or_uncond=cou,
                              transformer_options=extra_options, rows=rows, base=base,
                              n_heads=extra_options.get("n_heads", 0), x=x)
            new = getattr(inj, self.kind)(ctx, out)
            out = ctx.mix(new, out)
        return out


def flux_token_grid(latent_shape) -> tuple[int, int]:
    """FLUX image-token grid of a latent (h, w): it patchifies 2x2, padding to even."""
    H, W = latent_shape[-2:]
    return (math.ceil(H / 2), math.ceil(W / 2))


def single_block_txt_len(to: dict, total: int) -> int:
    """Text tokens at the front of a FLUX single block's ``cat(txt, img)``.

    Current ComfyUI says it (``img_slice``); else the double blocks of this call recorded it; else (no double
    block hooked) it is derived from the latent size, which counts Kontext reference tokens as text.
    """
    sl = to.get("img_slice")
    if sl is not None:
        return int(sl[0])
    if to.get(TXT_LEN_KEY) is not None:
        return int(to[TXT_LEN_KEY])
    shape = to.get(SHAPE_KEY)
    if shape is None:
        return total
    h, w = flux_token_grid(shape)
    return total - h * w


class _DitHook(_Hook):
    def __call__(self, args, extra, **kwargs):
        if self.prev is not None:
            prev = self.prev
            inner = lambda a: prev(a, extra)   # noqa: E731  (a pack that patched this block before us)
        else:
            inner = extra["original_block"]
        to = args.get("transformer_options") or {}
        if self.kind == "double":
            # the same dict reaches the single blocks of this call: they see cat(txt, img) and need the split
            to[TXT_LEN_KEY] = args["txt"].shape[1]
        injectors, sigma = self.layer.active_for(self.kind, self.key, to)
        if not injectors:
            return inner(args)
        cou = to.get("cond_or_uncond") or []
        batch = args["img"].shape[0]
        txt_len = args["txt"].shape[1] if self.kind == "double" else single_block_txt_len(to, args["img"].shape[1])
        call = inner
        for inj in injectors:
            ctx = CallContext(kind=self.kind, key=self.key, sigma=sigma, cond_or_uncond=cou, transformer_options=to,
                              rows=row_mask(cou, batch, inj.apply_to, args["img"].device, to.get(ROLES_KEY)),
                              txt_len=txt_len)
            call = _bind_dit(inj, self.kind, ctx, call)
        return call(args)


def _bind_dit(inj, kind, ctx, call):
    fn = getattr(inj, f"{kind}_block")
    return lambda a: fn(ctx, a, call)


class _ModelCallWrapper:
    """DIFFUSION_MODEL wrapper: records shape/model for the hooks; once-per-call injector hook."""

    def __init__(self, layer: PatchLayer):
        self.layer = layer

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        x, timestep = args[0], args[1]
        to = kwargs.get("transformer_options")
        if to is None:   # passed positionally, at a position that differs between UNet and FLUX
            to = next((a for a in args[2:] if isinstance(a, dict) and "sigmas" in a), {})
        # calc_cond_batch builds a fresh transformer_options dict for every model call, so these
        # per-call entries cannot leak into the model's stored options.
        to[SHAPE_KEY] = tuple(x.shape)
        to[MODEL_KEY] = executor.class_obj
        to.pop(TXT_LEN_KEY, None)
        to[SIGMA_KEY] = (to.get("sigmas"), _sigma_of(to))   # every hook reads it: one GPU→CPU sync, not one per block
        for inj in self.layer.injectors:
            inj.on_model_call(to, x, timestep, call_args=args, call_kwargs=kwargs)
        return executor(*args, **kwargs)


def current_layer(model) -> PatchLayer:
    return model.model_options.get("transformer_options", {}).get(LAYER_KEY) or PatchLayer()


def apply_injector(model, injector: Injector):
    """Clone ``model`` (a ModelPatcher) and add ``injector`` on top of this pack's existing patches."""
    m = model.clone()
    family = model_family(m)
    if family == "other":
        raise PatchingError("this node patches SD1.5/SDXL UNet or FLUX models; the connected MODEL is neither "
                         f"({type(m.model).__name__})")
    injector.bind(m.get_model_object("model_sampling"))
    old = current_layer(m)
    layer = old.with_injector(injector)
    to = m.model_options.setdefault("transformer_options", {})
    to[LAYER_KEY] = layer
    replace = to.setdefault("patches_replace", {})
    dm = m.model.diffusion_model
    primary = True
    if family == "flux":
        for kind, blocks in (("double", dm.double_blocks), ("single", dm.single_blocks)):
            slot = replace.setdefault("dit", {})
            for i in range(len(blocks)):
                key = (f"{kind}_block", i)
                prev = _foreign(slot.get(key))
                slot[key] = _DitHook(layer, kind, (kind, i), prev, primary)
                primary = False
    else:
        for kind in SD_KINDS:
            slot = replace.setdefault(kind, {})
            for key in unet_block_keys(dm):
                prev = _foreign(slot.get(key, slot.get(key[:2])))
                slot[key] = _UnetAttnHook(layer, kind, key, prev, primary)
                primary = False
        _install_unet_list_patches(to, layer)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _ModelCallWrapper(layer))
    log.debug("applied %s to a %s model (%d injectors now)", injector.name, family, len(layer.injectors))
    return m


def _install_unet_list_patches(to: dict, layer: PatchLayer) -> None:
    """Input recorders and output hooks, only for the kinds some injector of the layer needs.

    Ours are replaced (never duplicated) on every apply; patches other packs put in the same lists
    keep their place, ours come last so they see the final input and output.
    """
    patches = to.setdefault("patches", {})
    for kind in SD_KINDS:
        out_kind = f"{kind}_output"
        wants_out = any(out_kind in inj.kinds for inj in layer.injectors)
        wants_in = wants_out or any(inj.needs_input and kind in inj.kinds for inj in layer.injectors)
        for name, wanted, make in ((f"{kind}_patch", wants_in, lambda k=kind: _UnetInputHook(k)),
                                   (f"{kind}_output_patch", wants_out,
                                    lambda k=out_kind: _UnetOutputHook(layer, k, None, None, False))):
            kept = [p for p in patches.get(name, []) if not isinstance(p, (_Hook, _UnetInputHook))]
            if wanted:
                kept.append(make())
            if kept:
                patches[name] = kept
            else:
                patches.pop(name, None)


def _foreign(patch):
    """A replace patch someone else installed (kept and called); ours are replaced, not chained."""
    if patch is None or isinstance(patch, _Hook):
        return patch.prev if isinstance(patch, _Hook) else None
    return patch
