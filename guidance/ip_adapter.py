"""Decoupled (IP-Adapter style) identity attention for SD1.5/SDXL UNets and FLUX, via guidance/patching.

SD1.5/SDXL (IP-Adapter layout, so the public IP-Adapter "full face" SD1.5 file loads unchanged):
  tokens ℓ (T, D) --image_proj (Linear D→D, GELU, Linear D→ctx, LayerNorm)--> c_ip (T, ctx)
  per cross-attention layer:  out = Attn(Q, K_text, V_text) + w · Attn(Q, to_k_ip(c_ip), to_v_ip(c_ip))

FLUX (every double and single block; XLabs-style placement):
  per block:  K_ip = to_k_ip(ℓ), V_ip = to_v_ip(ℓ)   (Linear D→hidden, reshaped to heads × head_dim)
  Q = the block's image-token query after QK-norm and before RoPE, recomputed from the block's own
  modulation, norm and the q rows of its qkv projection (only the q rows: a third of a qkv matmul);
  img ← img + w · Attn(Q, K_ip, V_ip) after the block, on image tokens only (txt tokens untouched).

Key layout of the injection weights (prefix ``proj.`` inside an Omni-ID weight file):
  SD:    image_proj.{0,2}.{weight,bias}, image_proj.3.{weight,bias} (LayerNorm),
         attn2.{input|middle|output}_{block_id}_{transformer_index}.to_{k,v}_ip.weight
  FLUX:  double_{i}.to_{k,v}_ip.{weight,bias}, single_{i}.to_{k,v}_ip.{weight,bias}
Public adapter files (IP-Adapter basic / plus / full-face / FaceID / FaceID-Plus, XLabs FLUX) are told by their keys and
converted in guidance/adapters/public.py; every kind but full-face projects its image-prompt tokens when the faces
are encoded (guidance/omni_id.py), so its adapter here is the K/V layers only (``image_proj`` is the identity).
XLabs' FLUX adapter acts in the double blocks only, with the same placement (query before RoPE, added after the
block: x-flux's ``IPDoubleStreamBlockProcessor``).

Rows: the identity acts on the rows ``apply_to`` selects, computed on those rows only. With ``uncond_tokens`` (a
negative: the original IP-Adapter's "no image" or a negative image) cond rows attend to the identity and uncond
rows to the negative. ``site_weights`` (weight_type) and ``embeds_scaling`` follow guidance/adapters/vocabulary.py.

Weights: loaded adapters are built from ComfyUI's ``manual_cast`` layers and handed to the injector wrapped in a
``ModelPatcher`` (``adapter_patcher``), which the injector reports in ``models()``: ComfyUI loads the adapter
with the patched model and offloads it under memory pressure; each layer casts its weights to the compute
device and dtype when it runs, so the adapter is never copied or cast in place. Keys and values of ℓ are
computed once per sampling run (per site, device and dtype) and dropped when the run ends (RunState).
"""
from __future__ import annotations

import copy
import logging
import re
import types
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
from comfy.ldm.modules.attention import optimized_attention

from ..errors import OmniIDError, PatchingError
from .adapters.vocabulary import EMBEDS_SCALING
from ..face.types import mask_batch
from .patching import CallContext, Injector, unet_attention_module, unet_block_keys
from .rows import row_mask
from .run_state import RunState, record

log = logging.getLogger(__name__)


def sd_key_name(key) -> str:
    return f"{key[0]}_{key[1]}_{key[2]}"


def ip_adapter_order(block_keys) -> list:
    """Cross-attention layers in diffusers' processor order (down, up, mid) = IP-Adapter's numbering."""
    rank = {"input": 0, "output": 1, "middle": 2}
    return sorted(block_keys, key=lambda k: (rank[k[0]], k[1], k[2]))


def _on(module: torch.nn.Module, like: torch.Tensor) -> torch.nn.Module:
    """``module`` itself when it can run on ``like`` as it is: ComfyUI cast layers cast per call; a plain
    torch module (the trainer's) already on ``like``'s device and dtype. Else a temporary moved copy."""
    p = next(module.parameters(), None)
    casting = all(getattr(m, "comfy_cast_weights", False) for m in module.modules()
                  if isinstance(m, (nn.Linear, nn.LayerNorm)))
    if p is None or casting or (p.device == like.device and p.dtype == like.dtype):
        return module
    return copy.deepcopy(module).to(device=like.device, dtype=like.dtype)


class SDIdentityAdapter(nn.Module):
    """image_proj + per-cross-attention to_k_ip/to_v_ip for one UNet architecture.

    ``operations``: ``torch.nn`` (trainable, initialised) or ``comfy.ops.manual_cast`` (loaded weights, cast per call).
    ``projected``: the identity's tokens are already image-prompt tokens of width ``context_dim`` (public adapters
    whose projection ran at encode time): no ``image_proj`` weights.
    """

    def __init__(self, token_dim: int, context_dim: int, inner_dims: dict, operations=nn, dtype=None, device=None,
                 projected: bool = False):
        super().__init__()
        ops, kw = operations, {"dtype": dtype, "device": device}
        self.projected = projected
        if projected:
            self.image_proj = nn.Identity()
        else:
            self.image_proj = nn.Sequential(ops.Linear(token_dim, token_dim, **kw), nn.GELU(),
                                            ops.Linear(token_dim, context_dim, **kw), ops.LayerNorm(context_dim, **kw))
        self.attn2 = nn.ModuleDict({
            sd_key_name(k): nn.ModuleDict({"to_k_ip": ops.Linear(context_dim, d, bias=False, **kw),
                                           "to_v_ip": ops.Linear(context_dim, d, bias=False, **kw)})
            for k, d in inner_dims.items()})

    @staticmethod
    def inner_dims_of(diffusion_model) -> dict:
        """{block key: attn2 inner width} read off a ComfyUI UNet."""
        return {k: unet_attention_module(diffusion_model, k, "attn2").to_k.weight.shape[0]
                for k in unet_block_keys(diffusion_model)}


class FluxIdentityAdapter(nn.Module):
    def __init__(self, token_dim: int, hidden: int, n_double: int, n_single: int, operations=nn, dtype=None,
                 device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        mk = lambda: nn.ModuleDict({"to_k_ip": operations.Linear(token_dim, hidden, **kw),  # noqa: E731
                                    "to_v_ip": operations.Linear(token_dim, hidden, **kw)})
        self.blocks = nn.ModuleDict({**{f"double_{i}": mk() for i in range(n_double)},
                                     **{f"single_{i}": mk() for i in range(n_single)}})

    def state_dict_flat(self) -> dict:
        return {k.replace("blocks.", "", 1): v for k, v in self.state_dict().items()}

    def load_flat(self, sd: dict, strict: bool = True):
        return self.load_state_dict({"blocks." + k: v for k, v in sd.items()}, strict=strict)


def convert_public_ip_adapter(sd: dict, diffusion_model) -> dict:
    """IP-Adapter file layout (``image_proj.proj.*``, ``ip_adapter.{2k+1}.to_{k,v}_ip.weight``) → ours.

    The k-th cross-attention layer in diffusers' order (down blocks, up blocks, mid block) carries
    processor number 2k+1 (even numbers are the self-attention processors, which have no weights).
    """
    order = ip_adapter_order(unet_block_keys(diffusion_model))
    out = {}
    for name, t in sd.items():
        m = re.fullmatch(r"image_proj\.proj\.(\d+)\.(weight|bias)", name)
        if m:
            out[f"image_proj.{m.group(1)}.{m.group(2)}"] = t
            continue
        if re.fullmatch(r"ip_adapter\.\d+\.to_(q|k|v|out)_lora\.(up|down)\.weight", name):
            continue   # FaceID's UNet LoRA: not part of the adapter (guidance/adapters/public.py)
        m = re.fullmatch(r"ip_adapter\.(\d+)\.(to_[kv]_ip)\.weight", name)
        if m:
            n = int(m.group(1))
            if n % 2 != 1 or (n - 1) // 2 >= len(order):
                raise OmniIDError(f"IP-Adapter key {name} does not fit this UNet ({len(order)} cross-attention layers): "
                                 "the file is for another architecture (SD1.5 vs SDXL)")
            out[f"attn2.{sd_key_name(order[(n - 1) // 2])}.{m.group(2)}.weight"] = t
            continue
        raise OmniIDError(f"unexpected key {name!r}: not an IP-Adapter (image_proj/ip_adapter) state dict")
    return out


def _rows_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Identity tokens (N, T, C) to the model batch: N == 1 broadcasts, else repeated over cond/uncond chunks."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise OmniIDError(f"{t.shape[0]} identities cannot be spread over a batch of {batch}")
    return t.repeat(batch // t.shape[0], 1, 1)


class IdentityInjector(Injector):
    """Adds w · Attn(Q, K_ip, V_ip) of an identity's tokens to a model's attention (see module doc)."""
    name = "identity"

    def __init__(self, adapter, tokens: torch.Tensor, family: str, weight: float = 1.0,
                 mask: Optional[torch.Tensor] = None, uncond_tokens: Optional[torch.Tensor] = None,
                 site_weights: Optional[dict] = None, embeds_scaling: str = "V only", **kw):
        """``adapter``: a ModelPatcher around the adapter module (loaded weights, see ``adapter_patcher``) or
        the module itself (the trainer's, or a test's). ``uncond_tokens``: what the uncond rows attend to
        (``apply_to`` must then be "both": cond rows get ``tokens``). ``site_weights``: {site key: weight}
        (weight_type; sites not listed get ``weight``)."""
        super().__init__(**kw)
        if tokens.ndim == 2:
            tokens = tokens[None]
        if uncond_tokens is not None and uncond_tokens.ndim == 2:
            uncond_tokens = uncond_tokens[None]
        self.patcher = adapter if isinstance(adapter, comfy.model_patcher.ModelPatcher) else None
        self.adapter = adapter.model if self.patcher is not None else adapter
        check_tokens_fit(self.adapter, tokens)
        mask = None if mask is None else mask_batch(mask, "the identity's region mask (attn_mask)", OmniIDError)
        if uncond_tokens is not None:
            check_tokens_fit(self.adapter, uncond_tokens)
            if self.apply_to != "both":
                raise PatchingError("negative tokens are for the uncond rows while the identity acts on the cond rows: "
                                    f"apply_to must be 'both' (got {self.apply_to!r})")
        if embeds_scaling not in EMBEDS_SCALING:
            raise OmniIDError(f"embeds_scaling must be one of {EMBEDS_SCALING}, got {embeds_scaling!r}")
        self.tokens, self.family, self.weight, self.mask = tokens, family, float(weight), mask
        self.uncond_tokens, self.embeds_scaling = uncond_tokens, embeds_scaling
        self.site_weights = None if site_weights is None else {tuple(k): float(v) for k, v in site_weights.items()}
        self.kinds = ("double", "single") if family == "flux" else ("attn2",)

    def models(self) -> list:
        return [self.patcher] if self.patcher is not None else []

    def to(self, device_or_dtype):
        # ComfyUI moves the patched model's patches with it; the adapter itself is moved by its own ModelPatcher
        if isinstance(device_or_dtype, torch.device):
            self.tokens = self.tokens.to(device_or_dtype)
            if self.uncond_tokens is not None:
                self.uncond_tokens = self.uncond_tokens.to(device_or_dtype)
            if self.mask is not None:
                self.mask = self.mask.to(device_or_dtype)
        return self

    def new_run_state(self):
        return {}   # keys/values of the identity: (tokens, site, device, dtype) -> (k, v)

    # -- where and how strongly
    def has_site(self, kind: str, key) -> bool:
        """Does the adapter have layers at this site (XLabs' FLUX adapter: double blocks only)?"""
        blocks = getattr(self.adapter, "blocks", None)
        if self.family == "flux" and blocks is not None:
            return f"{key[0]}_{key[1]}" in blocks
        attn2 = getattr(self.adapter, "attn2", None)
        return attn2 is None or sd_key_name(key) in attn2

    def wants(self, kind: str, key: tuple) -> bool:
        if self.site_weights is not None and self.site_weights.get(tuple(key), self.weight) == 0.0:
            return False   # weight_type turns this site off (style/composition): not even hooked, nor mapped
        return super().wants(kind, key) and self.has_site(kind, key)

    def site_weight(self, key) -> float:
        return self.weight if self.site_weights is None else self.site_weights.get(tuple(key), self.weight)

    def _tokens(self, which: str) -> torch.Tensor:
        return self.tokens if which == "cond" else self.uncond_tokens

    def _row_groups(self, ctx: CallContext, batch: int, device) -> list:
        """[(row indices, or None for every row, "cond" | "uncond" tokens)] this injector computes in this call."""
        if self.uncond_tokens is None:
            return [(None if ctx.rows is None else ctx.rows.nonzero().flatten(), "cond")]
        cond = row_mask(ctx.transformer_options, batch, "cond", device)
        if cond is None:   # a call without cond/uncond labels: every row is a cond row
            return [(None, "cond")]
        uncond = row_mask(ctx.transformer_options, batch, "uncond", device)
        return [(cond.nonzero().flatten(), "cond"), (uncond.nonzero().flatten(), "uncond")]

    # -- keys/values of ℓ, once per run and (tokens, site, device, dtype); public: Infinite-ID and RB-Guidance reuse
    # them. ``run``: the RunState to cache them in (None: computed and not kept, e.g. outside a model call).
    def sd_kv(self, key, like: torch.Tensor, run: Optional[RunState] = None, which: str = "cond"):
        kv = run.of(self) if run is not None else {}
        ck = (which, key, like.device, like.dtype)
        if ck not in kv:
            with torch.no_grad():
                pk = (which, "image_proj", like.device, like.dtype)
                if pk not in kv:
                    kv[pk] = _on(self.adapter.image_proj, like)(self._tokens(which).to(like.device, like.dtype))
                c_ip = kv[pk]
                layer = _on(self.adapter.attn2[sd_key_name(key)], like)
                kv[ck] = (layer.to_k_ip(c_ip), layer.to_v_ip(c_ip))
            record("identity.kv", injector=self, site=key, dtype=like.dtype, which=which)
        return kv[ck]

    def flux_kv(self, name, like: torch.Tensor, run: Optional[RunState] = None, which: str = "cond"):
        kv = run.of(self) if run is not None else {}
        ck = (which, name, like.device, like.dtype)
        if ck not in kv:
            with torch.no_grad():
                blk = _on(self.adapter.blocks[name], like)
                tok = self._tokens(which).to(like.device, like.dtype)
                kv[ck] = (blk.to_k_ip(tok), blk.to_v_ip(tok))
            record("identity.kv", injector=self, site=name, dtype=like.dtype, which=which)
        return kv[ck]

    def _kv(self, which: str, site, like, run):
        # the trainer's subclass overrides sd_kv/flux_kv with the 3-argument form (it has no negative)
        fn = self.flux_kv if self.family == "flux" else self.sd_kv
        return fn(site, like, run) if which == "cond" else fn(site, like, run, which)

    def _masked(self, ctx: CallContext, ip: torch.Tensor, rows: Optional[torch.Tensor] = None,
                batch: Optional[int] = None) -> torch.Tensor:
        if self.mask is None:
            return ip
        m = ctx.token_mask(self.mask.to(ip.device), ip.shape[0] if batch is None else batch)
        if rows is not None and m.shape[0] > 1:
            m = m[rows]
        return ip * m.to(ip.dtype)

    # -- SD1.5 / SDXL
    def attn2(self, ctx: CallContext, out, **kwargs):
        w = self.site_weight(ctx.key)
        if w == 0.0:
            return out
        B = ctx.q.shape[0]
        adds = []
        for rows, which in self._row_groups(ctx, B, ctx.q.device):
            if rows is not None and rows.numel() == 0:
                continue   # rows that would discard the attention do not compute it
            k_ip, v_ip = self._kv(which, ctx.key, ctx.q, ctx.run)
            q, k, v = ctx.q, _rows_batch(k_ip, B), _rows_batch(v_ip, B)
            if rows is not None:
                q, k, v = q[rows], k[rows], v[rows]
            if self.embeds_scaling == "K+V":
                k, v = k * w, v * w
            ip = optimized_attention(q, k, v, ctx.n_heads, attn_precision=ctx.transformer_options.get("attn_precision"),
                                     transformer_options=ctx.transformer_options)
            record("identity.attend", injector=self, site=ctx.key, which=which, rows=q.shape[0], batch=B)
            ip = self._masked(ctx, ip, rows, B)
            adds.append((rows, w * ip if self.embeds_scaling == "V only" else ip))
        return _add_rows(out, adds)

    # -- FLUX
    def double_block(self, ctx: CallContext, args, call, **kwargs):
        w = self.site_weight(ctx.key)
        if w == 0.0:
            return call(args)
        adds = self._flux_adds(ctx, ctx.module(), args["img"], args["vec"], flux_double_query, w)
        res = call(args)
        return {**res, "img": _add_rows(res["img"], adds)}

    def single_block(self, ctx: CallContext, args, call, **kwargs):
        w = self.site_weight(ctx.key)
        if w == 0.0:
            return call(args)
        t = ctx.txt_len
        adds = self._flux_adds(ctx, ctx.module(), args["img"][:, t:], args["vec"], flux_single_query, w)
        res = call(args)
        img = res["img"]   # text tokens first: only the image tokens receive the identity
        return {**res, "img": torch.cat([img[:, :t], _add_rows(img[:, t:], adds)], dim=1)}

    def _flux_adds(self, ctx: CallContext, block, img_tokens, vec, query, w) -> list:
        """[(rows or None, weighted masked identity attention of those rows)], queried before the block runs
        (FLUX blocks update their input in place)."""
        B = img_tokens.shape[0]
        adds = []
        for rows, which in self._row_groups(ctx, B, img_tokens.device):
            if rows is None:
                if which == "cond" and w == self.weight:
                    adds.append((None, self._flux_ip(ctx, query(block, img_tokens, vec), block.num_heads)))
                else:
                    adds.append((None, self._flux_rows(ctx, query(block, img_tokens, vec), None, which, w, B)))
                continue
            if rows.numel() == 0:
                continue
            adds.append((rows, self._flux_rows(ctx, query(block, img_tokens, vec, rows), rows, which, w, B)))
        return adds

    def _flux_ip(self, ctx: CallContext, q: torch.Tensor, heads: int) -> torch.Tensor:
        """q: (B, H, L, D) pre-RoPE query of every image token → (B, L, H*D) weighted, masked IP output."""
        return self._flux_rows(ctx, q, None, "cond", self.weight, q.shape[0])

    def _flux_rows(self, ctx, q, rows, which, w, batch) -> torch.Tensor:
        k_ip, v_ip = self._kv(which, f"{ctx.kind}_{ctx.key[1]}", q, ctx.run)
        n, H, L, D = q.shape
        k, v = _rows_batch(k_ip, batch), _rows_batch(v_ip, batch)
        if rows is not None:
            k, v = k[rows], v[rows]
        k, v = k.view(n, -1, H, D).transpose(1, 2), v.view(n, -1, H, D).transpose(1, 2)
        if self.embeds_scaling == "K+V":
            k, v = k * w, v * w
        ip = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, L, H * D)
        record("identity.attend", injector=self, site=ctx.key, which=which, rows=n, batch=batch)
        if rows is None and ctx.rows is not None:   # rows this injector does not act on get exactly nothing added
            ip = ip * ctx.rows.view(-1, 1, 1).to(ip.dtype)
        ip = self._masked(ctx, ip, rows, batch)
        return w * ip if self.embeds_scaling == "V only" else ip


def _add_rows(img: torch.Tensor, adds: list) -> torch.Tensor:
    """``img`` plus each (rows or None = every row, values) of ``adds`` (``img`` itself is never changed)."""
    out = img
    for rows, ip in adds:
        if rows is None:
            out = out + ip
        else:
            if out is img:
                out = img.clone()
            out[rows] = out[rows] + ip
    return out


def _linear_rows(linear, x: torch.Tensor, rows: slice) -> torch.Tensor:
    """``linear(x)[..., rows]`` without computing the other rows (weights cast like ComfyUI's ops)."""
    w, b = comfy.ops.cast_bias_weight(linear, x)
    return F.linear(x, w[rows], None if b is None else b[rows])


def _modulated(norm, x, mod):
    shift, scale = mod.shift, mod.scale
    if shift.ndim == 3 and shift.shape[1] > 1:   # current ComfyUI, timestep-zero references: (B, 2, C), real first
        shift, scale = shift[:, :1], scale[:, :1]
    return torch.addcmul(shift, norm(x), 1 + scale)


def _real_timestep(vec, batch: int):
    """Current ComfyUI runs Kontext/Flux2 references at timestep zero by doubling ``vec``'s rows
    ([real; zero]); the generated image's tokens use the real half. 0.3.75 never does this."""
    if torch.is_tensor(vec) and vec.shape[0] == 2 * batch:
        return vec[:batch]
    return vec


def _mod_rows(mod, rows, batch: int):
    """The rows of a block's modulation, computed for the whole batch (a matmul of one row does not round like a
    row of a batch's matmul: the queries of some rows must equal those of the whole batch bit for bit)."""
    if rows is None or not torch.is_tensor(mod.shift) or mod.shift.shape[0] != batch:
        return mod
    return types.SimpleNamespace(shift=mod.shift[rows], scale=mod.scale[rows])


def flux_double_query(block, img: torch.Tensor, vec, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Image-token query of a DoubleStreamBlock after QK-norm, before RoPE: (B, heads, L, head_dim) (of ``rows``)."""
    vec = _real_timestep(vec, img.shape[0])
    img_mod1 = block.img_mod(vec)[0] if block.modulation else vec[0][0]   # Chroma-style: precomputed mods
    if rows is not None:
        img_mod1, img = _mod_rows(img_mod1, rows, img.shape[0]), img[rows]
    x = _modulated(block.img_norm1, img, img_mod1)
    hidden = block.hidden_size
    q = _linear_rows(block.img_attn.qkv, x, slice(0, hidden))
    q = q.view(q.shape[0], q.shape[1], block.num_heads, -1).transpose(1, 2)
    return block.img_attn.norm.query_norm(q).to(img.dtype)


def flux_single_query(block, img_tokens: torch.Tensor, vec, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Query of the image tokens in a SingleStreamBlock after QK-norm, before RoPE (of ``rows``)."""
    vec = _real_timestep(vec, img_tokens.shape[0])
    mod = block.modulation(vec)[0] if block.modulation is not None else vec
    if rows is not None:
        mod, img_tokens = _mod_rows(mod, rows, img_tokens.shape[0]), img_tokens[rows]
    x = _modulated(block.pre_norm, img_tokens, mod)
    q = _linear_rows(block.linear1, x, slice(0, block.hidden_size))
    q = q.view(q.shape[0], q.shape[1], block.num_heads, -1).transpose(1, 2)
    return block.norm.query_norm(q).to(img_tokens.dtype)


# ---------------------------------------------------------------------------------------------------
# Building an adapter from stored weights, and checking it against the model it is applied to


def adapter_from_state_dict(family: str, sd: dict, operations=comfy.ops.manual_cast,
                            file_keys: Optional[dict] = None) -> nn.Module:
    """Rebuild the adapter module from its ``proj.*`` weights (prefix already removed), in the file's dtype on
    ComfyUI's offload device, from ``operations`` (ComfyUI's cast layers by default; ``torch.nn`` to train).
    SD weights without ``image_proj.*`` are a projected adapter (K/V layers only). ``file_keys``: {our key: the
    file's key}, so a mismatch later names the file's tensor."""
    kw = {"operations": operations, "dtype": next(iter(sd.values())).dtype if sd else None,
          "device": mm.unet_offload_device()}
    try:
        if family == "flux":
            names = {k.split(".")[0] for k in sd}
            n_double = len({n for n in names if n.startswith("double_")})
            n_single = len({n for n in names if n.startswith("single_")})
            w = sd["double_0.to_k_ip.weight"] if n_double else sd["single_0.to_k_ip.weight"]
            a = FluxIdentityAdapter(w.shape[1], w.shape[0], n_double, n_single, **kw)
            a.load_flat(sd, strict=True)
        else:
            inner = {}
            for k, t in sd.items():
                m = re.fullmatch(r"attn2\.(input|middle|output)_(\d+)_(\d+)\.to_k_ip\.weight", k)
                if m:
                    inner[(m.group(1), int(m.group(2)), int(m.group(3)))] = t.shape[0]
            if "image_proj.0.weight" in sd:
                a = SDIdentityAdapter(sd["image_proj.0.weight"].shape[1], sd["image_proj.2.weight"].shape[0], inner, **kw)
            else:
                width = sd[next(k for k in sd if k.endswith("to_k_ip.weight"))].shape[1]
                a = SDIdentityAdapter(width, width, inner, projected=True, **kw)
            a.load_state_dict(sd, strict=True)
    except (KeyError, StopIteration) as e:
        raise OmniIDError(f"the identity weights are incomplete: missing {e}; the file is damaged or not an "
                         f"identity-adapter file for {family}") from None
    except RuntimeError as e:   # load_state_dict's own report of missing/unexpected keys and shapes
        raise OmniIDError(f"the identity weights do not form a {family} adapter: {str(e)[:400]}") from None
    a.file_keys = dict(file_keys or {})
    return a.eval()


def adapter_patcher(adapter: nn.Module) -> comfy.model_patcher.ModelPatcher:
    """The adapter as a model ComfyUI manages (loaded with the patched model, offloaded when memory is needed),
    as core's model-patch loader wraps its patch modules."""
    make = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return make(adapter, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def adapter_token_width(adapter: nn.Module) -> Optional[int]:
    """Width of the identity tokens an adapter takes (None if it is not one of ours)."""
    if isinstance(adapter, SDIdentityAdapter):
        if getattr(adapter, "projected", False):
            return next(iter(adapter.attn2.values())).to_k_ip.weight.shape[1]
        return adapter.image_proj[0].weight.shape[1]
    if isinstance(adapter, FluxIdentityAdapter):
        return next(iter(adapter.blocks.values())).to_k_ip.weight.shape[1]
    return None


def check_tokens_fit(adapter: nn.Module, tokens: torch.Tensor) -> None:
    """Tokens from another encoder would only fail deep inside the sampler: say so when the model is patched."""
    want = adapter_token_width(adapter)
    if want is not None and tokens.shape[-1] != want:
        raise OmniIDError(f"this identity has tokens of width {tokens.shape[-1]} but these identity weights take width "
                         f"{want}: encode the faces with the same Omni-ID / IP-Adapter model you apply")


def adapter_sites(adapter: nn.Module, family: str, diffusion_model) -> list:
    """The sites an adapter acts on, in the model's forward order (UNet keys; FLUX ("double"|"single", i))."""
    if family == "flux":
        return [(kind, i) for kind, blocks in (("double", diffusion_model.double_blocks),
                                               ("single", diffusion_model.single_blocks))
                for i in range(len(blocks)) if f"{kind}_{i}" in adapter.blocks]
    return [k for k in unet_block_keys(diffusion_model) if sd_key_name(k) in adapter.attn2]


def _shape_error(names: dict, ours: str, got: tuple, want: tuple, where: str) -> OmniIDError:
    return OmniIDError(f"the identity weights' {names.get(ours, ours)} has shape {got} but {where} needs {want}: the "
                       "weights are for another architecture (SD1.5 vs SDXL, another FLUX) or another model family")


def check_adapter_fits(adapter, family: str, diffusion_model, file_keys: Optional[dict] = None) -> None:
    """Raise an OmniIDError naming the tensor and the shapes when an adapter (a module, or its state dict before
    it is built) was made for another architecture."""
    dm = diffusion_model
    if isinstance(adapter, dict):
        shapes = {k: tuple(v.shape) for k, v in adapter.items()}
        is_flux = any(k.startswith(("double_", "single_")) for k in shapes)
    else:
        shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        if isinstance(adapter, FluxIdentityAdapter):
            shapes = {k.replace("blocks.", "", 1): v for k, v in shapes.items()}
        is_flux = isinstance(adapter, FluxIdentityAdapter)
        file_keys = getattr(adapter, "file_keys", None) if file_keys is None else file_keys
    names = file_keys or {}
    if family == "flux":
        if not is_flux:
            raise OmniIDError("these identity weights are for a UNet (SD1.5/SDXL) model, not FLUX: load the flux file")
        n_double, n_single = len(dm.double_blocks), len(dm.single_blocks)
        blocks = {k.split(".")[0] for k in shapes}
        want_d = {f"double_{i}" for i in range(n_double)}
        want_s = {f"single_{i}" for i in range(n_single)}
        # every double block; the single blocks all or none (XLabs' adapter acts in the double blocks only)
        if not (want_d <= blocks) or blocks - want_d not in (set(), want_s):
            have_d = sum(1 for b in blocks if b.startswith("double_"))
            raise OmniIDError(f"identity weights for a FLUX model with {have_d} double and {len(blocks) - have_d} single "
                              f"blocks do not match this FLUX model ({n_double} double and {n_single} single blocks)")
        for b in sorted(blocks):
            for kv in ("to_k_ip", "to_v_ip"):
                got = shapes[f"{b}.{kv}.weight"]
                if got[0] != dm.hidden_size:
                    raise _shape_error(names, f"{b}.{kv}.weight", got, (dm.hidden_size, got[1]),
                                       f"this FLUX model (width {dm.hidden_size}) at {b.replace('_', ' block ')}")
        return
    if is_flux:
        raise OmniIDError("these identity weights are for a FLUX model, not a UNet (SD1.5/SDXL): load the sd15/sdxl file")
    dims = SDIdentityAdapter.inner_dims_of(dm)
    layers = {k.split(".")[1] for k in shapes if k.startswith("attn2.")}
    if layers != {sd_key_name(k) for k in dims}:
        raise OmniIDError(f"identity weights made for a UNet with {len(layers)} cross-attention layers do not match "
                          f"this model's {len(dims)} (SD1.5 has 16, SDXL 70): they are for another architecture")
    for key, inner in dims.items():
        attn = unet_attention_module(dm, key, "attn2")
        want = (inner, attn.to_k.weight.shape[1])
        for kv in ("to_k_ip", "to_v_ip"):
            ours = f"attn2.{sd_key_name(key)}.{kv}.weight"
            if shapes[ours] != want:
                raise _shape_error(names, ours, shapes[ours], want,
                                   f"this model's cross-attention in {key[0]} block {key[1]} (transformer {key[2]}, "
                                   f"its to_k is {tuple(attn.to_k.weight.shape)})")
    if "image_proj.2.weight" in shapes:
        ctx_dim = unet_attention_module(dm, next(iter(dims)), "attn2").to_k.weight.shape[1]
        got = shapes["image_proj.2.weight"]
        if got[0] != ctx_dim:
            raise _shape_error(names, "image_proj.2.weight", got, (ctx_dim, got[1]),
                               f"this model's text context (width {ctx_dim})")
