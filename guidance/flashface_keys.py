"""FlashFace checkpoint keys -> ComfyUI SD1.5 UNet keys (pure: stdlib only, usable without ComfyUI).

``flashface.ckpt`` (HF ``shilongz/FlashFace-SD1.5``) is the flat state dict of FlashFace's
``RefStableUNet``: 2142 keys holding two SD1.5 UNets. We map them onto the state-dict names of
``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``, written WITHOUT the
``model.diffusion_model.`` prefix (:data:`COMFY_PREFIX`), e.g.
``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``.

* main UNet (the denoiser): ``ori_encoder`` (5-channel conv_in: latent + face-position mask),
  ``ori_middle``, ``ori_decoder``, ``time_embedding``, ``head``.
* reference UNet (reads the reference faces): ``ref_encoder`` (4-channel conv_in),
  the MAIN model's middle block (``ori_middle``, as the released code runs it), ``ref_decoder``,
  and the shared ``time_embedding`` and ``head``.
* extra reference-attention parameters (main UNet only): FlashFace's second self-attention
  ``...blocks.0.self_attn.self_attn_first.{q,k,v,o}`` in ``middle_block.1`` and
  ``output_blocks.3..11.1``. They are named beside the transformer block they belong to::

      <block>.transformer_blocks.0.flashface_ref_attn.{to_q,to_k,to_v}.weight
      <block>.transformer_blocks.0.flashface_ref_attn.to_out.0.{weight,bias}

  The inner names are those of ComfyUI's ``CrossAttention`` (q/k/v without bias), so one such
  group loads strictly into ``CrossAttention(query_dim=C, heads=8, dim_head=C // 8)``.

Dropped on purpose (see :data:`ALIAS_REASON`, :data:`REF_MIDDLE_REASON`): the aliases
``encoder.*``/``middle.*``/``decoder.*`` and ``ref_middle.*``. Any other key is an error.

Command: ``python -m guidance.flashface_keys KEYS_FILE`` prints ``key<TAB>main:<key>``,
``key<TAB>ref:<key>`` (both lines for a key both UNets use) or ``key<TAB>DROP`` per input key.
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Iterator, NamedTuple

try:
    from ..errors import FlashFaceCheckpointError
except ImportError:   # `python -m guidance.flashface_keys` from the repository root: guidance/ is top-level there
    from errors import FlashFaceCheckpointError

log = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."  # what ComfyUI puts before these names in a full checkpoint
MAIN, REF = "main", "ref"
REF_ATTN = "flashface_ref_attn"  # our module name for FlashFace's self_attn_first

# ComfyUI transformer_options["block"] ids of the blocks that carry reference attention.
REF_ATTENTION_BLOCKS = (("middle", 0),) + tuple(("output", i) for i in range(3, 12))

# RefStableUNet keeps self.encoder/middle/decoder and aliases them as self.ori_*; state_dict()
# saves both names. We keep the explicit ori_* names and drop the plain ones.
ALIASES = {"encoder": "ori_encoder", "middle": "ori_middle", "decoder": "ori_decoder"}
ALIAS_REASON = "duplicate of {canonical}: RefStableUNet saves its main encoder/middle/decoder under two names"
REF_MIDDLE_REASON = ("never executed: RefStableUNet.switch_mode() swaps only encoder and decoder, so the "
                     "reference pass runs ori_middle; ref_middle was never used or trained")

# SD1.5 topology (LDM numbering): channel multipliers per level, transformers on levels 0-2.
_MULT = (1, 2, 4, 4)
_ATTN_LEVELS = (0, 1, 2)
_SD15_CHANNELS, _SD15_CONTEXT = 320, 768


class UnknownKeyError(FlashFaceCheckpointError):
    """A key that is not part of FlashFace's RefStableUNet layout."""


class Entry(NamedTuple):
    shape: tuple[int, ...]                 # shape in the FlashFace checkpoint
    targets: tuple[tuple[str, str], ...]   # ((MAIN|REF, comfy key), ...); empty when dropped
    drop_reason: str | None = None


# --- one SD1.5 UNet, FlashFace names on the left, ComfyUI names in the middle -------------------

def _param(f, c, shape, bias=True):
    yield f"{f}.weight", f"{c}.weight", shape
    if bias:
        yield f"{f}.bias", f"{c}.bias", (shape[0],)


def _conv(f, c, cout, cin, k):
    return _param(f, c, (cout, cin, k, k))


def _norm(f, c, ch):
    return _param(f, c, (ch,))


def _resblock(f, c, cin, cout, temb):
    yield from _norm(f"{f}.layer1.0", f"{c}.in_layers.0", cin)
    yield from _conv(f"{f}.layer1.2", f"{c}.in_layers.2", cout, cin, 3)
    yield from _param(f"{f}.embedding.1", f"{c}.emb_layers.1", (cout, temb))
    yield from _norm(f"{f}.layer2.0", f"{c}.out_layers.0", cout)
    yield from _conv(f"{f}.layer2.3", f"{c}.out_layers.3", cout, cout, 3)
    if cin != cout:  # ComfyUI's ResBlock has a 1x1 skip conv only when the width changes
        yield from _conv(f"{f}.shortcut", f"{c}.skip_connection", cout, cin, 1)


def _attention(f, c, ch, kv_dim):
    for n in "qkv":
        yield from _param(f"{f}.{n}", f"{c}.to_{n}", (ch, ch if n == "q" else kv_dim), bias=False)
    yield from _param(f"{f}.o", f"{c}.to_out.0", (ch, ch))


def _transformer(f, c, ch, ctx, ref_attention):
    t, tc = f"{f}.blocks.0", f"{c}.transformer_blocks.0"
    yield from _norm(f"{f}.norm1", f"{c}.norm", ch)
    yield from _conv(f"{f}.conv1", f"{c}.proj_in", ch, ch, 1)
    for i in (1, 2, 3):
        yield from _norm(f"{t}.norm{i}", f"{tc}.norm{i}", ch)
    yield from _attention(f"{t}.self_attn", f"{tc}.attn1", ch, ch)
    if ref_attention:
        yield from _attention(f"{t}.self_attn.self_attn_first", f"{tc}.{REF_ATTN}", ch, ch)
    yield from _attention(f"{t}.cross_attn", f"{tc}.attn2", ch, ctx)
    yield from _param(f"{t}.ffn.0.proj", f"{tc}.ff.net.0.proj", (8 * ch, ch))  # GEGLU: 2 x 4C
    yield from _param(f"{t}.ffn.2", f"{tc}.ff.net.2", (ch, 4 * ch))
    yield from _conv(f"{f}.conv2", f"{c}.proj_out", ch, ch, 1)


def _sd15(mc: int, ctx: int, in_ch: int, ref_attention: bool) -> Iterator[tuple[str, str, tuple]]:
    """(FlashFace key with plain encoder/middle/decoder names, ComfyUI key, shape) of one UNet.

    Mirrors how LDM's UNetModel is built, so the channel widths of skips come out right.
    """
    temb = 4 * mc
    yield from _param("time_embedding.0", "time_embed.0", (temb, mc))
    yield from _param("time_embedding.2", "time_embed.2", (temb, temb))
    yield from _conv("encoder.0", "input_blocks.0.0", mc, in_ch, 3)
    skips, ch, i = [mc], mc, 1
    for level, mult in enumerate(_MULT):
        for _ in range(2):
            yield from _resblock(f"encoder.{i}.0", f"input_blocks.{i}.0", ch, mc * mult, temb)
            ch = mc * mult
            if level in _ATTN_LEVELS:  # the encoder never carries reference attention
                yield from _transformer(f"encoder.{i}.1", f"input_blocks.{i}.1", ch, ctx, False)
            skips.append(ch)
            i += 1
        if level < len(_MULT) - 1:  # FlashFace's downsampler is a bare stride-2 conv
            yield from _conv(f"encoder.{i}", f"input_blocks.{i}.0.op", ch, ch, 3)
            skips.append(ch)
            i += 1
    yield from _resblock("middle.0", "middle_block.0", ch, ch, temb)
    yield from _transformer("middle.1", "middle_block.1", ch, ctx, ref_attention)
    yield from _resblock("middle.2", "middle_block.2", ch, ch, temb)
    i = 0
    for level in reversed(range(len(_MULT))):
        for j in range(3):
            yield from _resblock(f"decoder.{i}.0", f"output_blocks.{i}.0", ch + skips.pop(), mc * _MULT[level], temb)
            ch, sub = mc * _MULT[level], 1
            if level in _ATTN_LEVELS:
                yield from _transformer(f"decoder.{i}.1", f"output_blocks.{i}.1", ch, ctx, ref_attention)
                sub = 2
            if level and j == 2:  # FlashFace: Sequential(Upsample, Conv) -> ComfyUI Upsample.conv
                yield from _conv(f"decoder.{i}.{sub}.1", f"output_blocks.{i}.{sub}.conv", ch, ch, 3)
            i += 1
    yield from _norm("head.0", "out.0", mc)
    yield from _conv("head.2", "out.2", 4, mc, 3)


# --- the full checkpoint layout ----------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def layout(model_channels: int = _SD15_CHANNELS, context_dim: int = _SD15_CONTEXT) -> dict[str, Entry]:
    """Every key of a FlashFace checkpoint -> :class:`Entry`. Defaults are SD1.5's widths.

    Other widths only serve tests with tiny checkpoints: the key names do not depend on them.
    """
    table: dict[str, Entry] = {}
    for f, c, shape in _sd15(model_channels, context_dim, 5, ref_attention=True):
        part, rest = f.split(".", 1)
        if part in ("time_embedding", "head"):  # one module, used by both passes
            table[f] = Entry(shape, ((MAIN, c), (REF, c)))
            continue
        canonical = f"{ALIASES[part]}.{rest}"
        shared = part == "middle" and not is_ref_attention_key(c)  # ref pass runs ori_middle, without SAF
        table[canonical] = Entry(shape, ((MAIN, c), (REF, c)) if shared else ((MAIN, c),))
        table[f] = Entry(shape, (), ALIAS_REASON.format(canonical=canonical))
    for f, c, shape in _sd15(model_channels, context_dim, 4, ref_attention=False):
        part = f.split(".", 1)[0]
        if part == "middle":
            table[f"ref_{f}"] = Entry(shape, (), REF_MIDDLE_REASON)
        elif part in ("encoder", "decoder"):
            table[f"ref_{f}"] = Entry(shape, ((REF, c),))
    return table


def entry(key: str) -> Entry:
    try:
        return layout()[key]
    except KeyError:
        raise UnknownKeyError(
            f"{key!r} is not a FlashFace checkpoint key (expected the RefStableUNet layout of flashface.ckpt: "
            "time_embedding, head, [ori_]encoder, [ori_]middle, [ori_]decoder, ref_encoder, ref_middle, "
            "ref_decoder)") from None


def map_key(key: str) -> tuple[tuple[str, str], ...]:
    """``((MAIN|REF, comfy key), ...)`` for a FlashFace key; ``()`` if deliberately dropped.

    Raises :class:`UnknownKeyError` for a key that is not in the FlashFace layout.
    """
    return entry(key).targets


def drop_reason(key: str) -> str | None:
    return entry(key).drop_reason


def alias_of(canonical_key: str) -> str | None:
    """The duplicate name of an ``ori_*`` key (a copy may store the tensor under only one name)."""
    part, _, rest = canonical_key.partition(".")
    for alias, canon in ALIASES.items():
        if part == canon:
            return f"{alias}.{rest}"
    return None


def is_ref_attention_key(comfy_key: str) -> bool:
    return f".{REF_ATTN}." in comfy_key


def split_ref_attention_key(comfy_key: str) -> tuple[tuple[str, int], str]:
    """``'output_blocks.3.1.transformer_blocks.0.flashface_ref_attn.to_q.weight'`` ->
    ``(('output', 3), 'to_q.weight')``: the ComfyUI block id and the CrossAttention parameter name."""
    head, sep, param = comfy_key.partition(f".transformer_blocks.0.{REF_ATTN}.")
    if not sep:
        raise UnknownKeyError(f"{comfy_key!r} is not a reference-attention key")
    if head == "middle_block.1":
        return ("middle", 0), param
    if head.startswith("output_blocks.") and head.endswith(".1"):
        return ("output", int(head.split(".")[1])), param
    raise UnknownKeyError(f"{comfy_key!r} is not a reference-attention key")


# --- command line -------------------------------------------------------------------------------

def read_keys(path: str) -> list[str]:
    """First field of every non-blank, non-comment line (checkpoint_keys_shapes.txt format)."""
    with open(path, encoding="utf-8") as fh:
        return [line.split()[0] for line in fh if line.strip() and not line.lstrip().startswith("#")]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m guidance.flashface_keys", description=__doc__.split("\n")[0])
    parser.add_argument("keys_file", help="file whose lines begin with a checkpoint key (key<TAB>shape)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keys = read_keys(args.keys_file)
    unknown = [k for k in keys if k not in layout()]
    if unknown:  # fail before printing anything: partial output would look complete
        log.error("%d key(s) are not FlashFace checkpoint keys, e.g. %s", len(unknown), unknown[:5])
        return 1
    out = []
    for k in keys:
        targets = map_key(k)
        out += [f"{k}\t{unet}:{c}\n" for unet, c in targets] or [f"{k}\tDROP\n"]
    sys.stdout.write("".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
