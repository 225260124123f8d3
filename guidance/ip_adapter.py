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
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
from comfy.ldm.modules.attention import optimized_attention

from ..errors import OmniIDError
from ..face.types import mask_batch
from .patching import CallContext, Injector, unet_attention_module, unet_block_keys
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
    """

    def __init__(self, token_dim: int, context_dim: int, inner_dims: dict, operations=nn, dtype=None, device=None):
        super().__init__()
        ops, kw = operations, {"dtype": dtype, "device": device}
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
                 mask: Optional[torch.Tensor] = None, **kw):
        """``adapter``: a ModelPatcher around the adapter module (loaded weights, see ``adapter_patcher``) or
        the module itself (the trainer's, or a test's)."""
        super().__init__(**kw)
        if tokens.ndim == 2:
            tokens = tokens[None]
        self.patcher = adapter if isinstance(adapter, comfy.model_patcher.ModelPatcher) else None
        self.adapter = adapter.model if self.patcher is not None else adapter
        check_tokens_fit(self.adapter, tokens)
        mask = None if mask is None else mask_batch(mask, "the identity's region mask (attn_mask)", OmniIDError)
        self.tokens, self.family, self.weight, self.mask = tokens, family, float(weight), mask
        self.kinds = ("double", "single") if family == "flux" else ("attn2",)

    def models(self) -> list:
        return [self.patcher] if self.patcher is not None else []

    def to(self, device_or_dtype):
        # ComfyUI moves the patched model's patches with it; the adapter itself is moved by its own ModelPatcher
        if isinstance(device_or_dtype, torch.device):
            self.tokens = self.tokens.to(device_or_dtype)
            if self.mask is not None:
                self.mask = self.mask.to(device_or_dtype)
        return self

    def new_run_state(self):
        return {}   # keys/values of the identity: (site, device, dtype) -> (k, v)

    # -- keys/values of ℓ, once per run and (site, device, dtype); public: Infinite-ID and RB-Guidance reuse them.
    # ``run``: the RunState to cache them in (None: computed and not kept, e.g. outside a model call).
    def sd_kv(self, key, like: torch.Tensor, run: Optional[RunState] = None):
        kv = run.of(self) if run is not None else {}
        ck = (key, like.device, like.dtype)
        if ck not in kv:
            with torch.no_grad():
                pk = ("image_proj", like.device, like.dtype)
                if pk not in kv:
                    kv[pk] = _on(self.adapter.image_proj, like)(self.tokens.to(like.device, like.dtype))
                c_ip = kv[pk]
                layer = _on(self.adapter.attn2[sd_key_name(key)], like)
                kv[ck] = (layer.to_k_ip(c_ip), layer.to_v_ip(c_ip))
            record("identity.kv", injector=self, site=key, dtype=like.dtype)
        return kv[ck]

    def flux_kv(self, name, like: torch.Tensor, run: Optional[RunState] = None):
        kv = run.of(self) if run is not None else {}
        ck = (name, like.device, like.dtype)
        if ck not in kv:
            with torch.no_grad():
                blk = _on(self.adapter.blocks[name], like)
                tok = self.tokens.to(like.device, like.dtype)
                kv[ck] = (blk.to_k_ip(tok), blk.to_v_ip(tok))
            record("identity.kv", injector=self, site=name, dtype=like.dtype)
        return kv[ck]

    def _masked(self, ctx: CallContext, ip: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return ip
        return ip * ctx.token_mask(self.mask.to(ip.device), ip.shape[0]).to(ip.dtype)

    # -- SD1.5 / SDXL
    def attn2(self, ctx: CallContext, out, **kwargs):
        if self.weight == 0.0:
            return out
        k_ip, v_ip = self.sd_kv(ctx.key, ctx.q, ctx.run)
        B = ctx.q.shape[0]
        ip = optimized_attention(ctx.q, _rows_batch(k_ip, B), _rows_batch(v_ip, B), ctx.n_heads,
                                 attn_precision=ctx.transformer_options.get("attn_precision"),
                                 transformer_options=ctx.transformer_options)
        return out + self.weight * self._masked(ctx, ip)

    # -- FLUX
    def double_block(self, ctx: CallContext, args, call, **kwargs):
        if self.weight == 0.0:
            return call(args)
        block = ctx.module()
        ip = self._flux_ip(ctx, flux_double_query(block, args["img"], args["vec"]), block.num_heads)
        res = call(args)
        return {**res, "img": res["img"] + ip}

    def single_block(self, ctx: CallContext, args, call, **kwargs):
        if self.weight == 0.0:
            return call(args)
        block = ctx.module()
        ip = self._flux_ip(ctx, flux_single_query(block, args["img"][:, ctx.txt_len:], args["vec"]), block.num_heads)
        res = call(args)
        img = res["img"]   # text tokens first: only the image tokens receive the identity
        return {**res, "img": torch.cat([img[:, :ctx.txt_len], img[:, ctx.txt_len:] + ip], dim=1)}

    def _flux_ip(self, ctx: CallContext, q: torch.Tensor, heads: int) -> torch.Tensor:
        """q: (B, H, L, D) pre-RoPE query of the image tokens → (B, L, H*D) weighted, masked IP output."""
        k_ip, v_ip = self.flux_kv(f"{ctx.kind}_{ctx.key[1]}", q, ctx.run)
        B, H, L, D = q.shape
        k = _rows_batch(k_ip, B).view(B, -1, H, D).transpose(1, 2)
        v = _rows_batch(v_ip, B).view(B, -1, H, D).transpose(1, 2)
        ip = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, H * D)
        if ctx.rows is not None:   # rows this injector does not act on get exactly nothing added
            ip = ip * ctx.rows.view(-1, 1, 1).to(ip.dtype)
        return self.weight * self._masked(ctx, ip)


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


def flux_double_query(block, img: torch.Tensor, vec) -> torch.Tensor:
    """Image-token query of a DoubleStreamBlock after QK-norm, before RoPE: (B, heads, L, head_dim)."""
    vec = _real_timestep(vec, img.shape[0])
    img_mod1 = block.img_mod(vec)[0] if block.modulation else vec[0][0]   # Chroma-style: precomputed mods
    x = _modulated(block.img_norm1, img, img_mod1)
    hidden = block.hidden_size
    q = _linear_rows(block.img_attn.qkv, x, slice(0, hidden))
    q = q.view(q.shape[0], q.shape[1], block.num_heads, -1).transpose(1, 2)
    return block.img_attn.norm.query_norm(q).to(img.dtype)


def flux_single_query(block, img_tokens: torch.Tensor, vec) -> torch.Tensor:
    """Query of the image tokens in a SingleStreamBlock after QK-norm, before RoPE."""
    vec = _real_timestep(vec, img_tokens.shape[0])
    mod = block.modulation(vec)[0] if block.modulation is not None else vec
    x = _modulated(block.pre_norm, img_tokens, mod)
    q = _linear_rows(block.linear1, x, slice(0, block.hidden_size))
    q = q.view(q.shape[0], q.shape[1], block.num_heads, -1).transpose(1, 2)
    return block.norm.query_norm(q).to(img_tokens.dtype)


# ---------------------------------------------------------------------------------------------------
# Building an adapter from stored weights, and checking it against the model it is applied to


def adapter_from_state_dict(family: str, sd: dict, operations=comfy.ops.manual_cast) -> nn.Module:
    """Rebuild the adapter module from its ``proj.*`` weights (prefix already removed), in the file's dtype on
    ComfyUI's offload device, from ``operations`` (ComfyUI's cast layers by default; ``torch.nn`` to train)."""
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
            token_dim, context_dim = sd["image_proj.0.weight"].shape[1], sd["image_proj.2.weight"].shape[0]
            inner = {}
            for k, t in sd.items():
                m = re.fullmatch(r"attn2\.(input|middle|output)_(\d+)_(\d+)\.to_k_ip\.weight", k)
                if m:
                    inner[(m.group(1), int(m.group(2)), int(m.group(3)))] = t.shape[0]
            a = SDIdentityAdapter(token_dim, context_dim, inner, **kw)
            a.load_state_dict(sd, strict=True)
    except KeyError as e:
        raise OmniIDError(f"the identity weights are incomplete: missing {e}; the file is damaged or not an "
                         f"identity-adapter file for {family}") from None
    except RuntimeError as e:   # load_state_dict's own report of missing/unexpected keys and shapes
        raise OmniIDError(f"the identity weights do not form a {family} adapter: {str(e)[:400]}") from None
    return a.eval()


def adapter_patcher(adapter: nn.Module) -> comfy.model_patcher.ModelPatcher:
    """The adapter as a model ComfyUI manages (loaded with the patched model, offloaded when memory is needed),
    as core's model-patch loader wraps its patch modules."""
    make = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return make(adapter, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def adapter_token_width(adapter: nn.Module) -> Optional[int]:
    """Width of the identity tokens an adapter takes (None if it is not one of ours)."""
    if isinstance(adapter, SDIdentityAdapter):
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


def check_adapter_fits(adapter: nn.Module, family: str, diffusion_model) -> None:
    """Raise a ValueError naming the mismatch when an adapter was made for another architecture."""
    if family == "flux":
        if not isinstance(adapter, FluxIdentityAdapter):
            raise OmniIDError("these identity weights are for a UNet (SD1.5/SDXL) model, not FLUX: load the flux file")
        want = {f"double_{i}" for i in range(len(diffusion_model.double_blocks))} | \
               {f"single_{i}" for i in range(len(diffusion_model.single_blocks))}
        hidden = adapter.blocks[next(iter(adapter.blocks))].to_k_ip.weight.shape[0]
        if set(adapter.blocks) != want or hidden != diffusion_model.hidden_size:
            raise OmniIDError(f"identity weights for a FLUX model with {len(adapter.blocks)} blocks of width {hidden} do not "
                             f"match this FLUX model ({len(want)} blocks of width {diffusion_model.hidden_size})")
        return
    if not isinstance(adapter, SDIdentityAdapter):
        raise OmniIDError("these identity weights are for a FLUX model, not a UNet (SD1.5/SDXL): load the sd15/sdxl file")
    dims = SDIdentityAdapter.inner_dims_of(diffusion_model)
    have = {k: adapter.attn2[sd_key_name(k)].to_k_ip.weight.shape[0] for k in dims if sd_key_name(k) in adapter.attn2}
    if have != dims or len(adapter.attn2) != len(dims):
        raise OmniIDError(f"identity weights made for a UNet with {len(adapter.attn2)} cross-attention layers do not match "
                         f"this model ({len(dims)} layers): they are for another architecture (SD1.5 vs SDXL)")
    ctx_dim = unet_attention_module(diffusion_model, next(iter(dims)), "attn2").to_k.weight.shape[1]
    if adapter.image_proj[2].weight.shape[0] != ctx_dim:
        raise OmniIDError(f"identity weights project to a text context of width {adapter.image_proj[2].weight.shape[0]}, "
                         f"this model's is {ctx_dim}")
