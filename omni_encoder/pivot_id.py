"""OmniPortrait Pivot ID encoder (Sec. 3.2) and its face-localisation loss (Eq. 5), in plain torch.

The encoder ties the identity of a reference face to one class word of the prompt ("woman", "man"):

    e_mix = Linear([e_ref ; e_txt])

``e_ref``: the OpenCLIP ViT-L/14 image embedding of the cropped reference face (computed elsewhere
and passed in as a tensor), ``e_txt``: the text encoder's output embedding at the class-word
position. ``e_mix`` then replaces that embedding in the prompt embedding (B, T, C) given to the
denoiser's cross-attention. Only this layer (and the image encoder) is trained; the denoiser stays
frozen. No released weights exist (see shared notes), so this module is the architecture only.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from ..errors import RBGuidanceError

log = logging.getLogger(__name__)

ETA = 2e-3          # Eq. 5 weight of L_loc
LOC_SIZE = (16, 16)  # the paper applies L_loc on the 16x16 cross-attention map
OPENCLIP_VITL14_DIM = 768  # projected image embedding width of OpenCLIP ViT-L/14


class PivotIDEncoder(nn.Module):
    """The feature-alignment layer of the Pivot ID encoder: ``e_mix = W [e_ref ; e_txt] + b``.

    ``image_dim``: width of e_ref (768 for OpenCLIP ViT-L/14's projected embedding).
    ``text_dim``: width of the prompt embedding (768 for SD1.5, 2048 for SDXL's concatenated encoders).
    ``identity_init=True`` (our choice; the paper gives no initialisation) starts the layer as
    ``e_mix = e_txt``: an untrained encoder leaves the prompt unchanged, and training starts from the
    base model's own behaviour instead of from a random token.
    """

    def __init__(self, image_dim: int = OPENCLIP_VITL14_DIM, text_dim: int = 768, identity_init: bool = True):
        super().__init__()
        self.image_dim = image_dim
        self.text_dim = text_dim
        self.proj = nn.Linear(image_dim + text_dim, text_dim)
        if identity_init:
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.weight[:, image_dim:].copy_(torch.eye(text_dim))
                self.proj.bias.zero_()

    def forward(self, e_ref: torch.Tensor, e_txt: torch.Tensor) -> torch.Tensor:
        """(..., image_dim), (..., text_dim) with equal leading dims -> e_mix (..., text_dim)."""
        if e_ref.shape[-1] != self.image_dim or e_txt.shape[-1] != self.text_dim:
            raise RBGuidanceError(f"expected widths {self.image_dim}/{self.text_dim}, got {e_ref.shape[-1]}/{e_txt.shape[-1]}")
        if e_ref.shape[:-1] != e_txt.shape[:-1]:
            raise RBGuidanceError(f"leading dims differ: e_ref {tuple(e_ref.shape)} vs e_txt {tuple(e_txt.shape)}")
        x = torch.cat([e_ref.to(self.proj.weight.dtype), e_txt.to(self.proj.weight.dtype)], dim=-1)
        return self.proj(x)

    def inject(self, prompt_embeds: torch.Tensor, token_indices: torch.Tensor, e_ref: torch.Tensor):
        """Replace the class-token embeddings of ``prompt_embeds`` by e_mix.

        ``prompt_embeds``: (B, T, C); ``token_indices``: (B,) or (B, K) positions of the class words;
        ``e_ref``: (B, D) or (B, K, D), one reference embedding per class word (K identities).
        Returns ``(new_prompt_embeds, e_mix)``.
        """
        e_txt = gather_token_embeddings(prompt_embeds, token_indices)
        e_mix = self(e_ref, e_txt).to(prompt_embeds.dtype)
        return replace_token_embeddings(prompt_embeds, token_indices, e_mix), e_mix


def _index_grid(prompt_embeds: torch.Tensor, token_indices: torch.Tensor):
    if prompt_embeds.dim() != 3:
        raise RBGuidanceError(f"prompt_embeds must be (B, T, C); got {tuple(prompt_embeds.shape)}")
    b, t, _ = prompt_embeds.shape
    idx = torch.as_tensor(token_indices, device=prompt_embeds.device).long()
    if idx.dim() == 1:
        idx = idx[:, None]
    if idx.dim() != 2 or idx.shape[0] != b:
        raise RBGuidanceError(f"token_indices must be (B,) or (B, K) with B={b}; got {tuple(idx.shape)}")
    if bool(((idx < 0) | (idx >= t)).any()):
        raise IndexError(f"token index out of range [0, {t})")
    # a position replaced twice would silently keep only one of the two e_mix
    if idx.shape[1] > 1 and bool((idx.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise RBGuidanceError("duplicate token index within one prompt")
    rows = torch.arange(b, device=idx.device)[:, None].expand_as(idx)
    return rows, idx


def gather_token_embeddings(prompt_embeds: torch.Tensor, token_indices: torch.Tensor) -> torch.Tensor:
    """The embeddings at ``token_indices``: (B,) -> (B, C); (B, K) -> (B, K, C)."""
    rows, idx = _index_grid(prompt_embeds, token_indices)
    out = prompt_embeds[rows, idx]
    return out[:, 0] if torch.as_tensor(token_indices).dim() == 1 else out


def replace_token_embeddings(prompt_embeds: torch.Tensor, token_indices: torch.Tensor,
                             new_embeds: torch.Tensor) -> torch.Tensor:
    """Out-of-place: a copy of ``prompt_embeds`` (B, T, C) whose rows ``token_indices`` ((B,) or (B, K))
    are ``new_embeds`` ((B, C) or (B, K, C)); every other entry is unchanged bit for bit.
    Differentiable w.r.t. ``new_embeds`` (and the untouched part of ``prompt_embeds``)."""
    rows, idx = _index_grid(prompt_embeds, token_indices)
    new = new_embeds if new_embeds.dim() == 3 else new_embeds[:, None]
    if new.shape != (*idx.shape, prompt_embeds.shape[-1]):
        raise RBGuidanceError(f"new_embeds {tuple(new_embeds.shape)} does not fit indices {tuple(idx.shape)} x C={prompt_embeds.shape[-1]}")
    return prompt_embeds.index_put((rows, idx), new.to(prompt_embeds.dtype))


def find_token_indices(token_ids: torch.Tensor, class_token_id: int) -> torch.Tensor:
    """First position of ``class_token_id`` in each row of ``token_ids`` (B, T) -> (B,) LongTensor.

    Raises ValueError when a prompt lacks the class word (e_mix would have nowhere to go).
    """
    hits = torch.as_tensor(token_ids) == class_token_id
    if not bool(hits.any(dim=1).all()):
        raise RBGuidanceError(f"class token id {class_token_id} missing from prompt(s) {torch.nonzero(~hits.any(dim=1)).flatten().tolist()}")
    return hits.long().argmax(dim=1)


def face_localization_loss(attn_map: torch.Tensor, face_mask: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """Eq. 5's second term: ``eta/(h*w) * sum_ij (A_t(m)[i, j] - M[i, j])^2``, averaged over the batch.

    ``attn_map``: (B, h, w) or (B, L, h, w) cross-attention probabilities of the e_mix token (softmax
    over text tokens, so already in [0, 1]); with L maps (heads and/or layers of the 16x16 resolution)
    they are averaged into the single map A_t(m) first. The paper uses h = w = 16.
    ``face_mask``: (B, H, W) face-parsing mask in [0, 1] at any resolution; it is area-resized to
    (h, w) and kept soft (a border cell gets its covered fraction rather than a hard 0/1).
    Returns a scalar; add it to the diffusion loss (L = L_diff + this).

    Reading: Eq. 5 squares A_t(m) - M, i.e. a mean squared error over the h*w pixels (not a sum, not
    BCE). "Resized segmentation mask" does not say how; area resizing is our choice.
    """
    a = attn_map
    if a.dim() == 4:
        a = a.mean(dim=1)
    if a.dim() != 3:
        raise RBGuidanceError(f"attn_map must be (B, h, w) or (B, L, h, w); got {tuple(attn_map.shape)}")
    if tuple(a.shape[-2:]) != LOC_SIZE:
        log.debug("face_localization_loss on a %s map; the paper uses 16x16", tuple(a.shape[-2:]))
    m = face_mask[None] if face_mask.dim() == 2 else face_mask
    m = m.to(a.dtype)
    if tuple(m.shape[-2:]) != tuple(a.shape[-2:]):
        mode = "area" if m.shape[-2] >= a.shape[-2] and m.shape[-1] >= a.shape[-1] else "bilinear"
        kwargs = {} if mode == "area" else {"align_corners": False}
        m = F.interpolate(m[:, None], size=a.shape[-2:], mode=mode, **kwargs)[:, 0]
    h, w = a.shape[-2:]
    per_item = ((a - m) ** 2).sum(dim=(-2, -1)) / (h * w)
    return eta * per_item.mean()


PIVOT_FORMAT = "pivot_id"
PIVOT_FORMAT_VERSION = 1


def save_pivot_encoder(path: str, encoder: PivotIDEncoder, metadata: dict | None = None) -> None:
    """Write the alignment layer as safetensors: ``proj.weight`` (T, I+T), ``proj.bias`` (T) plus metadata
    (format, version, image_dim, text_dim, and any extra string entries, e.g. base_family)."""
    from safetensors.torch import save_file
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"format": PIVOT_FORMAT, "format_version": str(PIVOT_FORMAT_VERSION),
                 "image_dim": str(encoder.image_dim), "text_dim": str(encoder.text_dim)})
    save_file({k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}, path, metadata=meta)


def load_pivot_encoder(path: str, device=None, dtype=None) -> tuple[PivotIDEncoder, dict]:
    """Read a file written by ``save_pivot_encoder`` (or any safetensors file with ``proj.weight``/``proj.bias``).

    The widths come from the weight shape (text_dim rows, image_dim + text_dim columns), checked against the
    metadata when present. Returns (encoder in eval mode, metadata).
    """
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        keys = set(f.keys())
        if not {"proj.weight", "proj.bias"} <= keys:
            raise RBGuidanceError(f"{path}: not a Pivot ID encoder file (needs proj.weight and proj.bias; has {sorted(keys)[:6]})")
        sd = {k: f.get_tensor(k) for k in ("proj.weight", "proj.bias")}
    if meta.get("format", PIVOT_FORMAT) != PIVOT_FORMAT:
        raise RBGuidanceError(f"{path}: format {meta.get('format')!r}, expected {PIVOT_FORMAT!r}")
    if int(meta.get("format_version", PIVOT_FORMAT_VERSION)) > PIVOT_FORMAT_VERSION:
        raise RBGuidanceError(f"{path}: format version {meta['format_version']} is newer than this reader ({PIVOT_FORMAT_VERSION})")
    w = sd["proj.weight"]
    text_dim, total = w.shape
    image_dim = total - text_dim
    if image_dim <= 0 or sd["proj.bias"].shape != (text_dim,):
        raise RBGuidanceError(f"{path}: proj.weight {tuple(w.shape)} / proj.bias {tuple(sd['proj.bias'].shape)} do not form "
                         "a (text, image + text) alignment layer")
    for name, val in (("image_dim", image_dim), ("text_dim", text_dim)):
        if name in meta and int(meta[name]) != val:
            raise RBGuidanceError(f"{path}: metadata {name}={meta[name]} but the weights have {val}")
    enc = PivotIDEncoder(image_dim=image_dim, text_dim=text_dim, identity_init=False)
    enc.load_state_dict(sd)
    return enc.to(device=device, dtype=dtype).eval(), meta


__all__ = ["ETA", "LOC_SIZE", "OPENCLIP_VITL14_DIM", "PivotIDEncoder", "gather_token_embeddings",
           "replace_token_embeddings", "find_token_indices", "face_localization_loss", "save_pivot_encoder",
           "load_pivot_encoder"]
