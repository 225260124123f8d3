"""One attention-patching layer and one sampler-side protocol for every technique of this pack.

Attention sites (public patch points only; no private forward is copied or overridden):

* UNet: ``patches_replace["attn1"|"attn2"][(block, id, transformer_index)]`` for every transformer
  block of the model. The hook computes the stock attention with ComfyUI's own ``optimized_attention``
  (or calls a replace that another pack installed there first), then lets each injector transform it.
* FLUX: ``patches_replace["dit"][("double_block"|"single_block", i)]``. Each injector wraps the call
  of the original block (``extra["original_block"]``), so it can change the inputs, the attention (via
  ``chain_attention_override``, for the duration of the block) or the outputs.
* UNet, only for injectors that ask for it: ``patches["attn1_patch"|"attn2_patch"]`` records the
  attention input (the normed hidden states, ``CallContext.x``) and ``patches["attn1_output_patch"|
  "attn2_output_patch"]`` runs the ``attn1_output``/``attn2_output`` hooks on the attention output
  after ``to_out``, before the residual (for modules with their own output projection).

Sampler side (all under one wrapper key, ``WRAPPER_KEY``, installed and replaced together):

* a ``SAMPLER_SAMPLE`` wrapper makes the run's ``RunState`` (guidance/run_state.py) when sampling starts,
  puts it in the run's transformer options, calls each injector's ``begin_run(state, guider)``, and
  clears it in ``finally``;
* a ``DIFFUSION_MODEL`` wrapper records the latent shape, the diffusion model and the sigma of each model
  call and gives every injector a once-per-call hook (``on_model_call``), e.g. for a reference pass;
* an injector declares the other wrappers it needs in ``sampler_wrappers()`` ((WrappersMP type, wrapper)
  pairs) and a pre-CFG step in ``pre_cfg(args)``; ``apply_injector`` installs them, in application order;
* the rows a technique adds to a model call are described with ``rows.with_layout`` (guidance/rows.py).

Stacking order (documented contract): injectors run in the order they were applied to the model.
For UNet attention, ``out = inj_n(... inj_2(inj_1(base)))``; for FLUX blocks, the first applied wraps
the original block most closely and the last applied is outermost. Applying a patch always clones the
ModelPatcher and replaces the layer object on the clone by a new one; layers are never mutated, so
the input model (and every earlier clone) keeps its options.

Each injector is active only between its start and end percent, converted to sigmas with the model's
own ``model_sampling``, and only on the rows it asks for (cond, uncond or both; guidance/rows.py).
"""
from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

import comfy.model_base
import comfy.patcher_extension
from comfy.ldm.modules.attention import optimized_attention

from ..errors import PatchingError
from .rows import APPLY_TO, COND, UNCOND, row_mask, stream_rows, token_mask  # noqa: F401  (COND/UNCOND: API)
from .run_state import RUN_KEY, RunState, run_state_of

log = logging.getLogger(__name__)

LAYER_KEY = "idportrait_layer"          # transformer_options key holding the current layer
WRAPPER_KEY = "idportrait"              # the key of every wrapper this pack installs on a ModelPatcher
SHAPE_KEY = "idportrait_latent_shape"   # transformer_options: latent shape of this model call
MODEL_KEY = "idportrait_diffusion_model"
TXT_LEN_KEY = "idportrait_txt_len"      # transformer_options: FLUX text tokens of this call (set by double blocks)
SIGMA_KEY = "idportrait_sigma"          # transformer_options: this call's sigma as a float (one device sync per call)
INPUT_KEY = "idportrait_{}_input"       # extra_options: the input of attn1/attn2 (after norm1/norm2)
OVERRIDE_KEY = "optimized_attention_override"
WrappersMP = comfy.patcher_extension.WrappersMP

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


def transformer_block(diffusion_model, key):
    """The BasicTransformerBlock of a UNet attention key (name, id, index)."""
    name, block_id, index = key
    block = diffusion_model.middle_block if name == "middle" else getattr(diffusion_model, f"{name}_blocks")[block_id]
    for layer in block:
        if getattr(layer, "transformer_blocks", None) is not None:
            return layer.transformer_blocks[index]
    raise KeyError(f"no transformer block at {key}")


def unet_attention_module(diffusion_model, key, kind: str):
    """The CrossAttention module (attn1/attn2) of a UNet block key, e.g. to project extra tokens."""
    return getattr(transformer_block(diffusion_model, key), kind)


def flux_token_grid(latent_shape) -> tuple[int, int]:
    """FLUX image-token grid of a latent (h, w): it patchifies 2x2, padding to even."""
    H, W = latent_shape[-2:]
    return (math.ceil(H / 2), math.ceil(W / 2))


def single_block_txt_len(transformer_options: dict, total: int) -> int:
    """Text tokens at the front of a FLUX single block's ``cat(txt, img)``.

    Current ComfyUI says it (``img_slice``); else the double blocks of this call recorded it; else (no double
    block hooked) it is derived from the latent size, which counts Kontext reference tokens as text.
    """
    sl = transformer_options.get("img_slice")
    if sl is not None:
        return int(sl[0])
    if transformer_options.get(TXT_LEN_KEY) is not None:
        return int(transformer_options[TXT_LEN_KEY])
    shape = transformer_options.get(SHAPE_KEY)
    if shape is None:
        return total
    h, w = flux_token_grid(shape)
    return total - h * w


def call_transformer_options(args: tuple, kwargs: dict) -> dict:
    """The transformer options of a diffusion-model call (a DIFFUSION_MODEL wrapper's arguments).

    Passed by keyword by ComfyUI's model_base; positionally at a position that differs between UNet and FLUX
    otherwise. A call without any gets an empty dict (nothing of ours is active there).
    """
    transformer_options = kwargs.get("transformer_options")
    if transformer_options is None:
        transformer_options = next((a for a in args[2:] if isinstance(a, dict) and "sigmas" in a), None)
    return {} if transformer_options is None else transformer_options


def options_transformer_options(model_options: Optional[dict]) -> dict:
    """``model_options["transformer_options"]`` or an empty dict (CALC_COND_BATCH / pre-CFG arguments)."""
    return (model_options or {}).get("transformer_options") or {}


def chain_attention_override(transformer_options: dict, fn: Callable) -> dict:
    """A shallow copy of ``transformer_options`` whose attention override runs ``fn`` on top of any other.

    ``fn(attend, *args, **kwargs)`` receives ``attend``, which computes the attention exactly as it
    would be computed without ``fn`` (ComfyUI's function, or through the override installed before),
    plus the arguments of ``optimized_attention`` (q, k, v, heads, mask=..., skip_reshape=..., ...).
    ``fn`` must accept and forward unknown keyword arguments.
    """
    prev = transformer_options.get(OVERRIDE_KEY)

    def override(func, *args, **kwargs):
        if prev is None:
            attend = func
        else:
            def attend(*a, **kw):
                return prev(func, *a, **kw)
        return fn(attend, *args, **kwargs)

    return {**transformer_options, OVERRIDE_KEY: override}


@dataclass
class CallContext:
    """What an injector sees at one hook call."""
    kind: str                        # attn1 | attn2 | attn1_output | attn2_output | double | single
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

    @property
    def run(self) -> RunState:
        """This sampling run's state (or this call's, outside a run)."""
        return run_state_of(self.transformer_options)

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
        """Row indices of stream ``name`` in this call (see ``rows.stream_rows``); None without a layout."""
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

    Attention hooks (all must accept and ignore unknown keyword arguments):
      attn1(ctx, out, **kw) / attn2(ctx, out, **kw) -> out     UNet self-/cross-attention output (B, L, inner)
      attn1_output(ctx, out, **kw) / attn2_output(...) -> out  UNet attention output after to_out (B, L, C);
                                                               ctx.x is the attention's input
      double_block(ctx, args, call, **kw) / single_block(...) -> dict   FLUX: call(args) runs the inner chain
      on_model_call(transformer_options, x, timestep, **kw)    once per diffusion-model call; kw has
                                                               call_args/call_kwargs: the diffusion
                                                               model's own arguments (x, t, context, ...)
    Per-run state: ``new_run_state()`` makes it (once per run, on first use); ``self.state(ctx)`` or
      ``run_state_of(transformer_options).of(self)`` reads it; ``begin_run(state, guider)`` sees the run start.
    Sampler side: ``sampler_wrappers()`` -> [(WrappersMP type, wrapper)]; ``pre_cfg(args)`` -> conds_out or
      None (ComfyUI's pre-CFG step, ``args`` as ComfyUI passes them).
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

    def __deepcopy__(self, memo):
        return self   # configuration only (per-run state lives in the RunState): shared by every clone

    def bind(self, model_sampling) -> None:
        """Convert the percent window to sigmas with the model's own schedule."""
        self.sigma_start = float(model_sampling.percent_to_sigma(self.start_percent))
        self.sigma_end = float(model_sampling.percent_to_sigma(self.end_percent))

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def wants(self, kind: str, key: tuple) -> bool:
        return kind in self.kinds and (self.blocks is None or key in self.blocks)

    # -- per run
    def new_run_state(self):
        return types.SimpleNamespace()

    def state(self, ctx: CallContext):
        return ctx.run.of(self)

    def begin_run(self, state: RunState, guider) -> None:
        pass

    # -- sampler side
    def sampler_wrappers(self) -> list:
        return []

    pre_cfg = None   # a method ``pre_cfg(self, args) -> conds_out | None`` where an injector needs one

    # -- device/memory protocol ComfyUI calls on patch objects
    def to(self, device_or_dtype):
        return self

    def models(self) -> list:
        return []

    def on_model_call(self, transformer_options: dict, x, timestep, **kwargs) -> None:
        pass


def _sigma_of(transformer_options: dict) -> float:
    cached = transformer_options.get(SIGMA_KEY)
    if cached is not None and cached[0] is transformer_options.get("sigmas"):
        return cached[1]
    s = transformer_options.get("sigmas")
    return float(s.flatten()[0]) if s is not None else math.inf


class PatchLayer:
    """The immutable set of injectors on one model clone."""

    def __init__(self, injectors: tuple = ()):
        self.injectors = tuple(injectors)

    def __deepcopy__(self, memo):
        return self   # immutable; 0.3.75 deep-copies model_options on clone, current shares: same behaviour

    def with_injector(self, injector: Injector) -> "PatchLayer":
        return PatchLayer(self.injectors + (injector,))

    def to(self, device_or_dtype):
        for inj in self.injectors:
            inj.to(device_or_dtype)
        return self

    def models(self) -> list:
        out = []
        for inj in self.injectors:
            out.extend(m for m in inj.models() if not any(m is o for o in out))
        return out

    def active_for(self, kind, key, transformer_options) -> tuple[list, float]:
        sigma = _sigma_of(transformer_options)
        return [inj for inj in self.injectors if inj.wants(kind, key) and inj.active(sigma)], sigma


class _Hook:
    """Base of the callables stored in patches_replace; holds the layer and a chained foreign patch."""

    def __init__(self, layer: PatchLayer, kind: str, key: tuple, prev: Optional[Callable], primary: bool):
        self.layer, self.kind, self.key, self.prev, self.primary = layer, kind, key, prev, primary

    def __deepcopy__(self, memo):
        return self

    def to(self, device_or_dtype):
        if self.primary:
            self.layer.to(device_or_dtype)
        if self.prev is not None and hasattr(self.prev, "to"):
            self.prev = self.prev.to(device_or_dtype)
        return self

    def models(self) -> list:
        # Exactly one hook reports the layer's models, so ComfyUI loads each once.
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
            ctx = CallContext(kind=self.kind, key=self.key, sigma=sigma, cond_or_uncond=cou,
                              transformer_options=extra_options,
                              rows=row_mask(extra_options, q.shape[0], inj.apply_to, q.device), base=base, q=q, k=k,
                              v=v, n_heads=extra_options["n_heads"], x=x)
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
            ctx = CallContext(kind=self.kind, key=key, sigma=sigma, cond_or_uncond=cou,
                              transformer_options=extra_options,
                              rows=row_mask(extra_options, n.shape[0], inj.apply_to, n.device), base=base,
                              n_heads=extra_options.get("n_heads", 0), x=x)
            new = getattr(inj, self.kind)(ctx, out)
            out = ctx.mix(new, out)
        return out


class _DitHook(_Hook):
    def __call__(self, args, extra, **kwargs):
        if self.prev is not None:
            prev = self.prev
            inner = lambda a: prev(a, extra)   # noqa: E731  (a pack that patched this block before us)
        else:
            inner = extra["original_block"]
        transformer_options = args.get("transformer_options") or {}
        if self.kind == "double":
            # the same dict reaches the single blocks of this call: they see cat(txt, img) and need the split
            transformer_options[TXT_LEN_KEY] = args["txt"].shape[1]
        injectors, sigma = self.layer.active_for(self.kind, self.key, transformer_options)
        if not injectors:
            return inner(args)
        cou = transformer_options.get("cond_or_uncond") or []
        batch = args["img"].shape[0]
        txt_len = (args["txt"].shape[1] if self.kind == "double"
                   else single_block_txt_len(transformer_options, args["img"].shape[1]))
        call = inner
        for inj in injectors:
            ctx = CallContext(kind=self.kind, key=self.key, sigma=sigma, cond_or_uncond=cou,
                              transformer_options=transformer_options,
                              rows=row_mask(transformer_options, batch, inj.apply_to, args["img"].device), txt_len=txt_len,
                              batch=batch)
            call = _bind_dit(inj, self.kind, ctx, call)
        return call(args)


def _bind_dit(inj, kind, ctx, call):
    fn = getattr(inj, f"{kind}_block")
    return lambda a: fn(ctx, a, call)


class _ModelCallWrapper:
    """DIFFUSION_MODEL wrapper: records shape/model/sigma for the hooks; once-per-call injector hook."""

    def __init__(self, layer: PatchLayer):
        self.layer = layer

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        x, timestep = args[0], args[1]
        transformer_options = call_transformer_options(args, kwargs)
        # calc_cond_batch builds a fresh transformer_options dict for every model call, so these
        # per-call entries cannot leak into the model's stored options.
        transformer_options[SHAPE_KEY] = tuple(x.shape)
        transformer_options[MODEL_KEY] = executor.class_obj
        transformer_options.pop(TXT_LEN_KEY, None)
        # every hook reads the sigma: one GPU→CPU sync per call, not one per block
        transformer_options[SIGMA_KEY] = (transformer_options.get("sigmas"), _sigma_of(transformer_options))
        run_state_of(transformer_options)   # outside a sampler run, this call gets a state of its own
        for inj in self.layer.injectors:
            inj.on_model_call(transformer_options, x, timestep, call_args=args, call_kwargs=kwargs)
        return executor(*args, **kwargs)


class _RunScope:
    """SAMPLER_SAMPLE wrapper: the run's RunState, from the start of sampling to its end (cleared in finally)."""

    def __init__(self, layer: PatchLayer):
        self.layer = layer

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        if len(args) < 3 or not isinstance(args[2], dict):
            log.warning("identity-portrait: unexpected sampler call (%d arguments); per-call state only", len(args))
            return executor(*args, **kwargs)
        guider, sigmas, extra_args = args[:3]
        state = RunState("run")
        mo = extra_args.get("model_options") or {}
        transformer_options = {**options_transformer_options(mo), RUN_KEY: state}
        extra_args = {**extra_args, "model_options": {**mo, "transformer_options": transformer_options}}
        try:
            for inj in self.layer.injectors:
                inj.begin_run(state, guider)
            return executor(guider, sigmas, extra_args, *args[3:], **kwargs)
        finally:
            state.clear()


class _PreCfgHook:
    """The pre-CFG function of the layer: each injector's ``pre_cfg`` in application order."""

    def __init__(self, layer: PatchLayer):
        self.layer = layer

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        out = args["conds_out"]
        for inj in self.layer.injectors:
            if inj.pre_cfg is not None:
                got = inj.pre_cfg({**args, "conds_out": out})
                if got is not None:
                    out = got
        return out


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
    layer = current_layer(m).with_injector(injector)
    transformer_options = m.model_options.setdefault("transformer_options", {})
    transformer_options[LAYER_KEY] = layer
    replace = transformer_options.setdefault("patches_replace", {})
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
        _install_unet_list_patches(transformer_options, layer)
    _install_sampler_side(m, layer)
    log.debug("applied %s to a %s model (%d injectors now)", injector.name, family, len(layer.injectors))
    return m


def _install_sampler_side(m, layer: PatchLayer) -> None:
    """Every wrapper of ours under WRAPPER_KEY, rebuilt for the whole layer; the layer's pre-CFG step."""
    for wrapper_type in _WRAPPER_TYPES:
        m.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    m.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, _RunScope(layer))
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _ModelCallWrapper(layer))
    for inj in layer.injectors:
        for wrapper_type, wrapper in inj.sampler_wrappers():
            m.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, wrapper)
    fns = [f for f in m.model_options.get("sampler_pre_cfg_function", []) if not isinstance(f, _PreCfgHook)]
    if any(inj.pre_cfg is not None for inj in layer.injectors):
        fns.append(_PreCfgHook(layer))
    if fns:
        m.model_options["sampler_pre_cfg_function"] = fns
    else:
        m.model_options.pop("sampler_pre_cfg_function", None)


_WRAPPER_TYPES = tuple(v for k, v in vars(WrappersMP).items() if k.isupper() and isinstance(v, str))


def _install_unet_list_patches(transformer_options: dict, layer: PatchLayer) -> None:
    """Input recorders and output hooks, only for the kinds some injector of the layer needs.

    Ours are replaced (never duplicated) on every apply; patches other packs put in the same lists
    keep their place, ours come last so they see the final input and output.
    """
    patches = transformer_options.setdefault("patches", {})
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
