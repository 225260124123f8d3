"""The released demo's prompts (``ali-vilab/FlashFace@fff0f078``, ``demo_gradio.py`` ``generate``): fixed postfixes
appended to the user's prompts, and a text encoder that keeps 77 tokens (``CLIPTokenizer(length=77)`` truncates).

Off by default in the node: ComfyUI users write their own prompts, and the postfixes change every image.
"""
from __future__ import annotations

POSITIVE_POSTFIX = "best quality, masterpiece,ultra-detailed, UHD 4K, photographic"
NEGATIVE_POSTFIX = ("blurry, ugly, tiling, poorly drawn hands, poorly drawn feet, poorly drawn face, out of frame, "
                    "extra limbs, disfigured, deformed, body out of frame, bad anatomy, watermark, signature, cut off, "
                    "low contrast, underexposed, overexposed, bad art, beginner, amateur, distorted face")


def with_released_postfixes(positive: str, negative: str) -> tuple[str, str]:
    """The demo's rule: ``positive + ', ' + POSITIVE_POSTFIX``; ``negative + ', ' + NEGATIVE_POSTFIX``, or the
    negative postfix alone when the negative prompt is empty."""
    pos = f"{positive}, {POSITIVE_POSTFIX}"
    neg = f"{negative}, {NEGATIVE_POSTFIX}" if negative else NEGATIVE_POSTFIX
    return pos, neg


def encode(clip, text: str, first_chunk_only: bool) -> list:
    """CONDITIONING of ``text`` as CLIPTextEncode makes it; ``first_chunk_only`` keeps the first 77-token chunk,
    as the released tokenizer truncates (ComfyUI breaks chunks at word boundaries, so a word that would straddle
    token 75 is dropped whole where the release cuts inside it)."""
    tokens = clip.tokenize(text)
    if first_chunk_only:
        tokens = {k: v[:1] if isinstance(v, list) else v for k, v in tokens.items()}
    return clip.encode_from_tokens_scheduled(tokens)
