"""OmniPortrait Reference-Based Guidance (RB-Guidance), Sec. 3.3 of the paper: the math, in plain torch.

Pipeline for one denoising step with t <= u*T (Eq. 11):

1. ``generated_face_mask``: M_gen from the cross-attention map of the pivot token e_mix, refined by
   Eq. 6 and a self-attention map, thresholded at beta.
2. ``match_features``: every reference face point is matched to its nearest generated face point in
   DIFT feature space (Eq. 7) and the matched pairs are scored (Eq. 8).
3. ``rb_energy``: E = p / (1 + S_hat) (Eq. 10).
4. ``rb_energy_grad``: grad of E w.r.t. the network input, masked to M_gen at latent resolution
   (background gradient masking, Eq. 9), one identity at a time.
5. ``eps_guidance_to_denoised`` / ``flow_guidance_to_denoised``: the paper adds the gradient to the
   CFG'd noise prediction; ComfyUI samplers consume ``denoised`` (x0), so these return the x0 that
   corresponds to that modified noise prediction.

Readings of the paper that are not literal are marked "Reading:" in the docstrings below.
No ComfyUI import here: the guider that calls these lives elsewhere.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from ...errors import RBGuidanceError

log = logging.getLogger(__name__)

# Paper defaults (Sec. 3.3).
GAMMA = 3
ALPHA = 2.0
BETA = 0.5
P_STRENGTH = 8.5
U_START = 0.6
# Eq. 7 matches by Euclidean distance and Eq. 8 sums over the reference face points: the equations as written are
# the defaults; cosine matching (DIFT's own) and the mean (p independent of the face size) are options.
MATCHES = ("euclidean", "cosine")
REDUCTIONS = ("sum", "mean")

_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# Regional mask extraction (Eq. 6)
# --------------------------------------------------------------------------------------------------

def minmax_normalize(x: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Min-max normalise each map over its last two dims to [0, 1].

    A constant map has no structure to normalise; it maps to all zeros (no region), not to NaN.
    """
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(eps)


def refine_mask(attn_map: torch.Tensor, gamma: int = GAMMA, alpha: float = ALPHA) -> torch.Tensor:
    """The iterated part of Eq. 6: ``norm(norm(...norm(A)^alpha...)^alpha)^alpha`` (gamma times).

    ``attn_map``: (..., H, W) cross-attention map(s) of the pivot token, e.g. (B, H, W).
    Returns a map of the same shape in [0, 1].

    Reading: the nesting in Eq. 6 puts ``norm`` innermost, so each round is "min-max normalise, then
    raise to alpha" (x <- norm(x)^alpha), and the last operation is the power. After the first round
    the map already spans exactly [0, 1] and powers keep 0 and 1 fixed, so the later norms are
    identities and the result equals ``norm(A)^(alpha^gamma)`` (= norm(A)^8 with the paper's values).
    The loop is kept anyway so that the code reads like the equation.
    """
    if gamma < 0:
        raise RBGuidanceError(f"gamma must be >= 0, got {gamma}")
    x = attn_map
    for _ in range(gamma):
        x = minmax_normalize(x).pow(alpha)
    return x


def _self_attn_matrix(self_attn: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, N) or (B, heads, N, N) probabilities -> (B, N, N), heads averaged."""
    if self_attn.dim() == 4:
        self_attn = self_attn.mean(dim=1)
    if self_attn.dim() != 3 or self_attn.shape[-1] != n or self_attn.shape[-2] != n:
        raise RBGuidanceError(f"self_attn must be (B, {n}, {n}) or (B, heads, {n}, {n}); got {tuple(self_attn.shape)}")
    return self_attn


def refined_attention_map(cross_attn: torch.Tensor, self_attn: torch.Tensor | None = None,
                          gamma: int = GAMMA, alpha: float = ALPHA) -> torch.Tensor:
    """Eq. 6: ``A_hat = A_s(m) . refine_mask(A_c(m))``. Returns (B, H, W) in [0, 1].

    ``cross_attn``: (B, H, W) cross-attention probabilities of the pivot token m (softmax over text
    tokens, averaged over heads/layers of one resolution and taken from the conditional branch).
    ``self_attn``: (B, N, N) or (B, heads, N, N) self-attention probabilities at the same resolution,
    N = H*W, row i = query pixel i (each row sums to 1), column j = key pixel j, flattened row-major
    like ``cross_attn.flatten(-2)``. ``None`` skips the self-attention factor (A_hat = refined map).

    Reading of "A_s(m) . R" (R = the refined cross-attention map): a matrix-vector product,
    ``A_hat[i] = sum_j A_s[i, j] * R[j]``: the self-attention of pixel i aggregated with R as weights,
    i.e. the R-weighted share of pixel i's attention that lands on the face. Self-attention groups
    pixels of the same structure, so this propagates the (sharpened, possibly too small) cross-attention
    region along image structure, which is what the paper wants from "a self-attention map rich in
    structural information". Because rows sum to 1 and R is in [0, 1], A_hat is in [0, 1] without a
    further normalisation, so the threshold beta = 0.5 reads "more than half of this pixel's attention
    goes to the face". An element-wise product with some per-token self-attention map could only
    shrink R and adds no structure, so we do not read it that way.
    """
    if cross_attn.dim() != 3:
        raise RBGuidanceError(f"cross_attn must be (B, H, W); got {tuple(cross_attn.shape)}")
    refined = refine_mask(cross_attn, gamma=gamma, alpha=alpha)
    if self_attn is None:
        return refined
    b, h, w = refined.shape
    a_s = _self_attn_matrix(self_attn, h * w).to(refined.dtype)
    # matmul broadcasts a self-attention batch of 1 over B maps.
    return torch.matmul(a_s, refined.reshape(b, h * w, 1)).reshape(b, h, w)


def propagate_by_self_attention(refined: torch.Tensor, qk: Sequence[tuple[torch.Tensor, torch.Tensor]],
                                scale: float | None = None) -> torch.Tensor:
    """``A_s · R`` of Eq. 6 computed from the self-attention queries/keys, never forming the N x N map.

    ``refined``: (B, H, W) refined cross-attention map R. ``qk``: one (q, k) pair per self-attention
    layer, each (B, heads, N, d) with N = H*W in row-major order (the pre-softmax projections the
    layer used, RoPE already applied where the model applies it). ``A_s`` is the softmax(q k^T * scale)
    probability map averaged over heads and layers, exactly what ``refined_attention_map`` expects as
    ``self_attn``; here each layer's product is one attention call with R as a 1-wide value, so a
    4096-token FLUX map costs no 4096^2 tensor. ``scale`` defaults to 1/sqrt(d).
    Returns (B, H, W), equal to ``refined_attention_map(cross, mean_softmax)`` when R = refine(cross).
    """
    if refined.dim() != 3:
        raise RBGuidanceError(f"refined must be (B, H, W); got {tuple(refined.shape)}")
    if not qk:
        raise RBGuidanceError("need at least one (q, k) pair")
    b, h, w = refined.shape
    acc = None
    for q, k in qk:
        if q.dim() != 4 or q.shape[2] != h * w or k.shape[:3] != q.shape[:3]:
            raise RBGuidanceError(f"q/k must be (B, heads, {h * w}, d); got {tuple(q.shape)} / {tuple(k.shape)}")
        # float32: the map is thresholded at beta, and half-precision softmax sums drift by ~1e-3.
        qf, kf = q.float(), k.float()
        v = refined.reshape(refined.shape[0], 1, h * w, 1).to(qf).expand(q.shape[0], q.shape[1], h * w, 1)
        # value width 8, not 1: CUDA's memory-efficient kernel needs it, else SDPA forms the N x N map
        out = F.scaled_dot_product_attention(qf, kf, F.pad(v, (0, 7)), scale=scale)   # (B, heads, N, 8)
        out = out[..., 0].mean(dim=1)
        acc = out if acc is None else acc + out
    return (acc / len(qk)).reshape(-1, h, w)


def generated_face_mask(cross_attn: torch.Tensor, self_attn: torch.Tensor | None = None, beta: float = BETA,
                        gamma: int = GAMMA, alpha: float = ALPHA, normalize: bool = False) -> torch.Tensor:
    """M_gen (Sec. 3.3): ``refined_attention_map(...) > beta`` as a float {0, 1} mask (B, H, W).

    ``normalize=True`` min-max normalises A_hat before the threshold (not in the paper: a safety net
    for diffuse self-attention where no pixel would pass beta; the mask is then never empty).
    """
    a_hat = refined_attention_map(cross_attn, self_attn, gamma=gamma, alpha=alpha)
    if normalize:
        a_hat = minmax_normalize(a_hat)
    return (a_hat > beta).to(cross_attn.dtype)


def resize_mask(mask: torch.Tensor, size: Sequence[int], threshold: float | None = 0.5) -> torch.Tensor:
    """Resize (B, H, W) or (H, W) masks to ``size`` = (h, w).

    Shrinking averages the covered area, growing copies the nearest cell ("nearest-exact"); then
    ``> threshold`` makes the mask binary again (a cell more than half covered is in). Strictly
    greater, and nearest when growing, so that two disjoint masks stay disjoint at any resolution:
    the multi-identity no-leak guarantee depends on it. ``threshold=None`` returns the soft map.
    Output is float (the input's float dtype, float32 for bool/int input).
    """
    size = (int(size[0]), int(size[1]))
    squeeze = mask.dim() == 2
    m = mask[None] if squeeze else mask
    if m.dim() != 3:
        raise RBGuidanceError(f"mask must be (B, H, W) or (H, W); got {tuple(mask.shape)}")
    if not m.is_floating_point():
        m = m.float()
    if tuple(m.shape[-2:]) != size:
        shrinking = size[0] <= m.shape[-2] and size[1] <= m.shape[-1]
        m = F.interpolate(m[:, None], size=size, mode="area" if shrinking else "nearest-exact")[:, 0]
    if threshold is not None:
        m = (m > threshold).to(m.dtype)
    return m[0] if squeeze else m


# --------------------------------------------------------------------------------------------------
# Diffusion feature correspondence (Eq. 7-9) and energy (Eq. 10)
# --------------------------------------------------------------------------------------------------

@dataclass
class FeatureMatch:
    """Result of ``match_features`` for a batch.

    ``ref_idx[b]`` / ``gen_idx[b]``: 1-D LongTensors of flat (row-major) spatial indices; pair k is
    reference point ``ref_idx[b][k]`` matched to generated point ``gen_idx[b][k]``.
    ``s_hat``: (B,) similarity, differentiable w.r.t. the generated features; 0 where ``valid`` is False
    (an empty mask on either side: nothing to match, and no gradient).
    """
    ref_idx: list[torch.Tensor]
    gen_idx: list[torch.Tensor]
    s_hat: torch.Tensor
    valid: torch.Tensor


def _batch_item(t: torch.Tensor, b: int) -> torch.Tensor:
    return t[0] if t.shape[0] == 1 else t[b]


def match_features(gen_feat: torch.Tensor, ref_feat: torch.Tensor, gen_mask: torch.Tensor, ref_mask: torch.Tensor,
                   match: str = "euclidean", reduction: str = "sum") -> FeatureMatch:
    """Eq. 7-9: nearest generated point (inside M_gen) for each reference point (inside M_ref), and S_hat.

    ``gen_feat``: (B, C, h, w); ``ref_feat``: (B or 1, C, h_r, w_r) (its size may differ from gen);
    ``gen_mask``: (B or 1, h, w) and ``ref_mask``: (B or 1, h_r, w_r), already at feature resolution
    (see ``resize_mask``); a point is inside when its mask value is > 0.5.

    Matching (Eq. 7) runs without gradient: the argmin selects points, it is not differentiated.
    ``match="euclidean"`` (default) is Eq. 7 as written: the generated point at the smallest L2 distance
    of the raw features. ``match="cosine"`` takes the point of highest cosine similarity (DIFT's own
    matching, and the choice that maximises each term of Eq. 8). Ties go to the lowest flat index.

    Reading: Eq. 7 prints the argmin over ``p in M^ref``; the surrounding text says the matches lie
    in M^gen, so the search runs over M^gen.

    Similarity (Eq. 8): ``(cos(D_gen[p_gen], D_ref[p_ref]) + 1) / 2`` per pair, then
    ``reduction="sum"`` (default, Eq. 8 as written: S_hat in [0, N_ref], so the strength of p in Eq. 10
    depends on the number of reference face points) or ``"mean"`` (S_hat in [0, 1], p independent of
    the face size). Eq. 9's ``(.) ⊙ M^gen`` is already satisfied by the matches lying in M_gen; its
    purpose, keeping the background out of the update, is done by the latent gradient mask in
    ``rb_energy_grad``.
    """
    if match not in MATCHES:
        raise RBGuidanceError(f"match must be one of {MATCHES}; got {match!r}")
    if reduction not in REDUCTIONS:
        raise RBGuidanceError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if gen_feat.dim() != 4 or ref_feat.dim() != 4:
        raise RBGuidanceError("gen_feat and ref_feat must be (B, C, h, w)")
    if gen_feat.shape[1] != ref_feat.shape[1]:
        raise RBGuidanceError(f"channel mismatch: gen {gen_feat.shape[1]} vs ref {ref_feat.shape[1]}")
    if tuple(gen_mask.shape[-2:]) != tuple(gen_feat.shape[-2:]) or tuple(ref_mask.shape[-2:]) != tuple(ref_feat.shape[-2:]):
        raise RBGuidanceError("masks must be at feature resolution; use resize_mask first "
                         f"(gen {tuple(gen_mask.shape)} vs {tuple(gen_feat.shape)}, ref {tuple(ref_mask.shape)} vs {tuple(ref_feat.shape)})")

    # float32 at least: fp16 cosines of 1280-channel features are too coarse for a similarity score.
    work_dtype = torch.promote_types(gen_feat.dtype, torch.float32)
    gen_flat = gen_feat.to(work_dtype).flatten(2)   # (B, C, h*w)
    ref_flat = ref_feat.to(work_dtype).flatten(2)   # (B|1, C, h_r*w_r)
    gm = gen_mask.flatten(1) > 0.5
    rm = ref_mask.flatten(1) > 0.5

    ref_idx, gen_idx, scores, valid = [], [], [], []
    for b in range(gen_feat.shape[0]):
        r_pts = torch.nonzero(_batch_item(rm, b), as_tuple=False).flatten()
        g_pool = torch.nonzero(_batch_item(gm, b), as_tuple=False).flatten()
        if r_pts.numel() == 0 or g_pool.numel() == 0:
            log.debug("RB-Guidance: empty %s mask in batch item %d; no guidance for it",
                      "reference" if r_pts.numel() == 0 else "generated", b)
            ref_idx.append(r_pts)
            gen_idx.append(g_pool[:0])
            scores.append(gen_flat.new_zeros(()))
            valid.append(False)
            continue
        ref_vec = _batch_item(ref_flat, b)[:, r_pts].T    # (N_r, C)
        gen_all = gen_flat[b]                              # (C, h*w), keeps the graph
        with torch.no_grad():
            cand = gen_all.detach()[:, g_pool].T           # (N_g, C)
            if match == "cosine":
                sim = F.normalize(ref_vec.detach(), dim=1) @ F.normalize(cand, dim=1).T
                best = sim.argmax(dim=1)
            else:
                best = torch.cdist(ref_vec.detach()[None], cand[None])[0].argmin(dim=1)
            matched = g_pool[best]
        gen_vec = gen_all[:, matched].T                    # (N_r, C), differentiable gather
        per_pair = (F.cosine_similarity(gen_vec, ref_vec, dim=1, eps=1e-8) + 1.0) / 2.0
        scores.append(per_pair.mean() if reduction == "mean" else per_pair.sum())
        ref_idx.append(r_pts)
        gen_idx.append(matched)
        valid.append(True)
    return FeatureMatch(ref_idx=ref_idx, gen_idx=gen_idx, s_hat=torch.stack(scores),
                        valid=torch.tensor(valid, dtype=torch.bool, device=gen_feat.device))


def rb_energy(s_hat: torch.Tensor, p: float = P_STRENGTH) -> torch.Tensor:
    """Eq. 10: ``E = p / (1 + S_hat)``; element-wise, differentiable. Lower E = more similar."""
    return p / (1.0 + s_hat)


@dataclass
class IdentityGuide:
    """One identity for RB-Guidance.

    ``ref_feat``: (1 or B, C, h_r, w_r) DIFT features of the reference image noised to t0 (671).
    ``ref_mask``: (1 or B, H, W) reference face mask (face parser), any resolution.
    ``gen_mask``: (1 or B, H, W) M_gen of this identity, any resolution (attention resolution is fine).
    Masks are resized internally: to feature resolution for matching, to latent resolution for the
    gradient mask.
    """
    ref_feat: torch.Tensor
    ref_mask: torch.Tensor
    gen_mask: torch.Tensor


@dataclass
class RBGradient:
    """Output of ``rb_energy_grad``. ``grad`` has z_t's shape; per-identity tensors are (K, B)."""
    grad: torch.Tensor
    energy: torch.Tensor
    s_hat: torch.Tensor
    valid: torch.Tensor
    matches: list[FeatureMatch] = field(default_factory=list)


def _expand_batch(mask: torch.Tensor, b: int) -> torch.Tensor:
    if mask.dim() == 2:
        mask = mask[None]
    if mask.shape[0] not in (1, b):
        raise RBGuidanceError(f"mask batch {mask.shape[0]} does not match latent batch {b}")
    return mask.expand(b, *mask.shape[1:])


def rb_energy_grad(z_t: torch.Tensor, feature_fn: Callable[[torch.Tensor], torch.Tensor],
                   identities: Sequence[IdentityGuide], p: float = P_STRENGTH, match: str = "euclidean",
                   reduction: str = "sum") -> RBGradient:
    """Background-masked gradient of the RB energy w.r.t. ``z_t``, summed over identities.

    ``z_t``: (B, C, H, W), the tensor ``feature_fn`` takes (see the conversion functions for which
    tensor that should be in ComfyUI). ``feature_fn(z) -> (B, C_f, h, w)``: the generated DIFT
    features; it must be differentiable and act on each batch item independently (a UNet does).

    For identity k: ``g_k = d/dz sum_b E_k[b]`` with ``E_k = p / (1 + S_hat_k)``, then
    ``grad = sum_k g_k * M_gen_k`` with M_gen_k resized to (H, W), so the result is exactly zero
    outside the union of the generated face masks and, inside identity k's mask (when masks do not
    overlap), depends only on identity k's reference. Each identity gets its own backward pass
    (one shared forward): a single backward of sum_k E_k would mix every reference into every region
    through the network's receptive field, which is the leakage the paper's multi-identity mode avoids.

    Safe to call under ``torch.inference_mode()`` (ComfyUI runs nodes in it): the work happens in
    ``inference_mode(False)`` + ``enable_grad()`` on clones of ``z_t`` and the reference tensors.
    ``feature_fn``'s own weights must not be inference tensors (autograd cannot save them).
    The returned tensors are detached.
    """
    if z_t.dim() != 4:
        raise RBGuidanceError(f"z_t must be (B, C, H, W); got {tuple(z_t.shape)}")
    with torch.inference_mode(False), torch.enable_grad():
        # clone() outside inference mode turns an inference tensor into a normal one autograd can use.
        z = z_t.detach().clone().requires_grad_(True)
        feats = feature_fn(z)
        return rb_energy_grad_from_features(z, feats, identities, p=p, match=match, reduction=reduction)


def rb_energy_grad_from_features(z: torch.Tensor, feats: torch.Tensor, identities: Sequence[IdentityGuide],
                                 p: float = P_STRENGTH, match: str = "euclidean",
                                 reduction: str = "sum") -> RBGradient:
    """The second half of ``rb_energy_grad``, for callers that run the forward themselves.

    ``z``: the (B, C, H, W) leaf that requires grad; ``feats``: (B, C_f, h, w) computed from it with the
    graph kept. Call inside ``torch.inference_mode(False)`` + ``torch.enable_grad()``. Used when the
    generated masks are only known after the forward (M_gen from that very forward's attention).
    """
    if z.dim() != 4 or not z.requires_grad:
        raise RBGuidanceError("z must be a (B, C, H, W) tensor that requires grad")
    bsz, _, height, width = z.shape
    if feats.dim() != 4 or feats.shape[0] != bsz:
        raise RBGuidanceError(f"feature_fn must return (B={bsz}, C, h, w); got {tuple(feats.shape)}")
    energies, s_hats, valids, matches = [], [], [], []
    grad = torch.zeros_like(z)
    for k, ident in enumerate(identities):
        ref_feat = ident.ref_feat.detach().clone()
        if ref_feat.dim() == 3:
            ref_feat = ref_feat[None]
        gen_mask = _expand_batch(ident.gen_mask.detach().clone(), bsz)
        ref_mask = ident.ref_mask.detach().clone()
        ref_mask = ref_mask[None] if ref_mask.dim() == 2 else ref_mask
        found = match_features(feats, ref_feat, resize_mask(gen_mask, feats.shape[-2:]),
                               resize_mask(ref_mask, ref_feat.shape[-2:]), match=match, reduction=reduction)
        energy = rb_energy(found.s_hat, p)
        if bool(found.valid.any()):
            (g_k,) = torch.autograd.grad(energy[found.valid].sum(), z,
                                         retain_graph=k < len(identities) - 1, allow_unused=True)
            if g_k is not None:
                latent_mask = resize_mask(gen_mask, (height, width)).to(grad.dtype)
                grad = grad + g_k * latent_mask[:, None]
        energies.append(energy.detach())
        s_hats.append(found.s_hat.detach())
        valids.append(found.valid)
        matches.append(found)
    empty = z.new_zeros((0, bsz), dtype=torch.float32)
    return RBGradient(grad=grad.detach(),
                      energy=torch.stack(energies) if energies else empty,
                      s_hat=torch.stack(s_hats) if s_hats else empty,
                      valid=torch.stack(valids) if valids else empty.bool(),
                      matches=matches)


def in_pivotal_window(t_fraction: float | torch.Tensor, u: float = U_START) -> bool | torch.Tensor:
    """Eq. 11's switch: guidance is on when ``t <= t_hat = u*T``, i.e. ``t/T <= u`` (late 60% of steps).

    ``t_fraction`` = t/T in [0, 1] (1 = pure noise). In ComfyUI: discrete EPS models
    ``model_sampling.timestep(sigma) / 1000``; flow models (CONST) ``sigma`` itself.
    """
    return t_fraction <= u


# --------------------------------------------------------------------------------------------------
# Parameterisation: the paper's epsilon-space step expressed as ComfyUI's ``denoised``
# --------------------------------------------------------------------------------------------------

def _as_batch_scalar(sigma: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.dim() == 0 or s.numel() == 1:
        return s.reshape(())
    return s.reshape(s.shape[:1] + (1,) * (like.dim() - 1))


def eps_grad_x_to_z(grad_x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """EPS models: gradient w.r.t. ComfyUI's x -> gradient w.r.t. the paper's z_t.

    ComfyUI keeps the unscaled latent ``x = x0 + sigma*eps`` and feeds the network
    ``z = x / sqrt(sigma^2 + 1)``; with ``sigma^2 = (1 - abar)/abar`` this is exactly the paper's
    ``z_t = sqrt(abar)*x0 + sqrt(1-abar)*eps``. Chain rule: ``dE/dx = dE/dz / sqrt(sigma^2 + 1)``, so
    ``grad_z = sqrt(sigma^2 + 1) * grad_x``. Needed when ``feature_fn`` was given x (e.g. through
    ``model.apply_model``, which scales inside); not needed when it was given the network input.
    """
    s = _as_batch_scalar(sigma, grad_x)
    return grad_x * torch.sqrt(s * s + 1.0)


def eps_guidance_to_denoised(denoised: torch.Tensor, grad: torch.Tensor, sigma: float | torch.Tensor,
                             scale: float = 1.0) -> torch.Tensor:
    """EPS models: Eq. 11's ``eps_hat <- eps_hat + scale * grad_{z_t} E`` as a new ``denoised``.

    ``grad`` is w.r.t. the paper's z_t, which is ComfyUI's network input ``x / sqrt(sigma^2 + 1)``
    (convert a gradient w.r.t. x with ``eps_grad_x_to_z``). Eq. 11 adds the gradient with coefficient
    1 (the strength lives in p of Eq. 10), so ``scale=1`` is the paper.

    ComfyUI: ``denoised = x - sigma * eps``. Replacing eps by ``eps + scale*grad`` at the same x:

        denoised' = x - sigma * (eps + scale*grad) = denoised - scale * sigma * grad

    Every ComfyUI sampler reads only (x, denoised), and the eps it implies, ``(x - denoised')/sigma``,
    is exactly ``eps + scale*grad``; so this is the paper's step for any sampler. With DDIM it matches
    ``x0_hat = (z_t - sqrt(1-abar) * eps_hat) / sqrt(abar)``. The sign moves x0 along -grad E: E falls,
    similarity rises.
    """
    return denoised - scale * _as_batch_scalar(sigma, denoised) * grad


def flow_grad_x_to_z(grad_x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Flow (CONST) models: gradient w.r.t. ComfyUI's x -> w.r.t. the SNR-equivalent VP latent z.

    ``x = (1-sigma)*x0 + sigma*eps``; the VP latent with the same signal-to-noise ratio is
    ``z = a*x0 + b*eps`` with ``a = (1-sigma)/r``, ``b = sigma/r``, ``r = sqrt((1-sigma)^2 + sigma^2)``
    (so a^2 + b^2 = 1), i.e. ``z = x / r``. Chain rule: ``grad_z = r * grad_x``.
    """
    s = _as_batch_scalar(sigma, grad_x)
    return grad_x * torch.sqrt((1.0 - s) ** 2 + s * s)


def flow_guidance_to_denoised(denoised: torch.Tensor, grad: torch.Tensor, sigma: float | torch.Tensor,
                              scale: float = 1.0, min_one_minus_sigma: float = 1e-4) -> torch.Tensor:
    """Flow (CONST) models: the paper's eps-space step as a new ``denoised``.

    ``grad`` is w.r.t. ComfyUI's x, which for CONST is also the network input. ComfyUI:
    ``x = (1-sigma)*x0 + sigma*eps``, velocity ``v = eps - x0``, ``denoised = x - sigma*v``.

    The paper's rule is stated for a VP latent; we apply it to the SNR-equivalent VP latent
    ``z = x / r`` (``flow_grad_x_to_z``): ``eps' = eps + scale * r * grad``. Holding x fixed,
    ``(1-sigma)*x0' + sigma*eps' = x`` gives

        denoised' = denoised - scale * sigma * r / (1 - sigma) * grad,   r = sqrt((1-sigma)^2 + sigma^2)

    and the implied velocity ``(x - denoised')/sigma = v + scale * r * grad / (1 - sigma)``.
    Equivalence: this equals ``eps_guidance_to_denoised(denoised, flow_grad_x_to_z(grad, sigma),
    sigma / (1 - sigma), scale)``: the EPS formula with the VP-equivalent sigma, b/a = sigma/(1-sigma).
    ``1 - sigma`` is clamped at ``min_one_minus_sigma``: at sigma = 1 x carries no x0 (guidance is
    off there anyway, t/T > u).
    """
    s = _as_batch_scalar(sigma, denoised)
    r = torch.sqrt((1.0 - s) ** 2 + s * s)
    return denoised - scale * s * r / (1.0 - s).clamp_min(min_one_minus_sigma) * grad


__all__ = [
    "GAMMA", "ALPHA", "BETA", "P_STRENGTH", "U_START", "MATCHES", "REDUCTIONS",
    "minmax_normalize", "refine_mask", "refined_attention_map", "propagate_by_self_attention",
    "generated_face_mask", "resize_mask", "FeatureMatch", "match_features", "rb_energy", "IdentityGuide",
    "RBGradient", "rb_energy_grad", "rb_energy_grad_from_features",
    "in_pivotal_window", "eps_grad_x_to_z", "eps_guidance_to_denoised", "flow_grad_x_to_z",
    "flow_guidance_to_denoised",
]
