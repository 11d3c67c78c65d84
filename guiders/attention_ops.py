"""Attention and token operators for perturbation guidance (pure torch + kornia).

All attention tensors here use the layout [B, H, L, D] (batch, heads, tokens, head dim). A
*joint* attention call (Flux, SD3, Qwen-Image, HunyuanVideo, AuraFlow) mixes image and text tokens
in one sequence; ``image`` is then the slice of the sequence holding the image tokens and the rest
are text (or register) tokens. For a plain self-attention (UNet attn1, WAN, LTXV) the whole
sequence is image tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) v in [B, H, L, D]; a boolean mask is True where attention is allowed."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def identity_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image: slice | None = None,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """PAG's perturbed attention: the image-to-image attention map replaced by the identity.

    Plain self-attention (``image`` is None or covers the sequence): the output is V itself
    (Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance", 2024).
    Joint attention (diffusers ``PAGJointAttnProcessor2_0``): each image query attends to its own
    image key and to every text key (the image-image block of the map is the identity, the
    image→text part is kept); text queries keep their full attention. Computed without an L×L
    mask: an image query's logits are its own-key logit and its logits over the text keys.
    """
    length = q.shape[-2]
    img = image if image is not None else slice(0, length)
    start, stop = img.start or 0, img.stop if img.stop is not None else length
    if start == 0 and stop == length:
        return v.clone()
    if mask is not None:
        return attention(q, k, v, _with_identity_block(mask, start, stop, length, q))
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device)
    text = torch.cat([torch.arange(0, start), torch.arange(stop, length)]).to(q.device)
    out[:, :, text] = attention(q[:, :, text], k, v)
    q_i, k_i, v_i = q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop]
    scale = 1.0 / math.sqrt(q.shape[-1])
    own = (q_i.float() * k_i.float()).sum(-1, keepdim=True) * scale  # [B, H, Li, 1]
    to_text = torch.matmul(q_i.float(), k[:, :, text].float().transpose(-1, -2)) * scale  # [B, H, Li, Lt]
    weights = torch.softmax(torch.cat([own, to_text], dim=-1), dim=-1)
    mixed = weights[..., :1] * v_i.float() + torch.matmul(weights[..., 1:], v[:, :, text].float())
    out[:, :, start:stop] = mixed.to(v.dtype)
    return out


def _with_identity_block(mask: torch.Tensor, start: int, stop: int, length: int, q: torch.Tensor) -> torch.Tensor:
    """Combine an existing attention mask with PAG's identity image block (boolean, True = allowed)."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=q.device)
    allowed[start:stop, start:stop] = torch.eye(stop - start, dtype=torch.bool, device=q.device)
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


INFINITE_BLUR = 9999.0  # the official ``inf_blur_threshold``: σ strictly above it is the infinite blur


def is_infinite_blur(sigma: float) -> bool:
    """The official rule (``SEGCFGSelfAttnProcessor``: ``blur_sigma > inf_blur_threshold``, 9999)."""
    return sigma > INFINITE_BLUR


def gaussian_kernel_size(sigma: float) -> int:
    """SEG's kernel size ``ceil(6σ) + 1 − ceil(6σ) mod 2`` (odd, covering ±3σ), exactly as the official code.

    It is 1 (the identity: no blur) for 0 < σ ≤ 1/6 and 3 for 1/6 < σ ≤ 1/3 (a near-identity kernel:
    the neighbours' weight is exp(−1/(2σ²)) ≤ 0.011 there, not zero).
    """
    six = math.ceil(6.0 * sigma)
    return six + 1 - six % 2


def _clamp_kernel(size: int, extent: int) -> int:
    """The official clamp ``min(k, n − (n mod 2 − 1))`` (reflect padding k//2 must stay below n)."""
    return min(size, extent - (extent % 2 - 1))


def blur_grid_tokens(x: torch.Tensor, grid: tuple[int, ...], sigma: float) -> torch.Tensor:
    """Gaussian-blur tokens [B, H, L, D] laid out on a spatial grid (h, w) or (t, h, w), each frame on its own.

    Follows the official SEG code (Hong, SusungHong/SEG-SDXL ``pipeline_seg.py``: ``gaussian_blur_2d`` and
    ``SEGCFGSelfAttnProcessor``): kernel size ``ceil(6σ)+1−ceil(6σ) mod 2`` clamped to the grid
    (``min(k, n − (n mod 2 − 1))``, per axis here: the official code assumes a square grid), reflect
    padding, a normalised separable Gaussian. σ ≤ 0 returns the input (the official code would divide
    by zero); 0 < σ ≤ 1/6 gives a 1-wide kernel, the identity. σ > 9999 (the official threshold) is the
    infinite blur: every token becomes the mean token of its frame (official: ``query.mean`` over the
    image's height and width; on video each frame's own mean, as the finite blur is per frame).
    """
    if sigma <= 0:
        return x
    b, h, length, d = x.shape
    if math.prod(grid) != length:
        raise ValueError(f"a token grid {tuple(grid)} does not hold {length} tokens")
    frames, gh, gw = (1,) + tuple(grid) if len(grid) == 2 else tuple(grid)
    if is_infinite_blur(sigma):
        per_frame = x.reshape(b, h, frames, gh * gw, d)
        return per_frame.mean(dim=3, keepdim=True).expand_as(per_frame).reshape(b, h, length, d).contiguous()
    size = gaussian_kernel_size(sigma)
    kh, kw = _clamp_kernel(size, gh), _clamp_kernel(size, gw)
    if kh < 2 and kw < 2:
        return x
    from kornia.filters import gaussian_blur2d

    images = x.reshape(b, h, frames, gh, gw, d).permute(0, 1, 2, 5, 3, 4).reshape(b * h * frames, d, gh, gw)
    blurred = gaussian_blur2d(images.float(), (max(kh, 1), max(kw, 1)), (sigma, sigma),
                              border_type="reflect").to(x.dtype)
    return blurred.reshape(b, h, frames, d, gh, gw).permute(0, 1, 2, 4, 5, 3).reshape(b, h, length, d)


def smoothed_energy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...], sigma: float,
                              image: slice | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SEG's perturbed attention: the image queries blurred on their spatial grid, keys untouched.

    Hong, "Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy Curvature of
    Attention", NeurIPS 2024: blurring the queries blurs the attention energy; σ → 0 is the
    unperturbed attention, σ = ∞ makes every query of a frame the frame's mean query, so every query
    of the frame gets the same attention row (the map softmax(q̄·kᵀ/√d), constant across queries, not a
    uniform map over the keys). In joint attention only the image queries are blurred.
    """
    length = q.shape[-2]
    img = image if image is not None else slice(0, length)
    start, stop = img.start or 0, img.stop if img.stop is not None else length
    q = q.clone()
    q[:, :, start:stop] = blur_grid_tokens(q[:, :, start:stop], grid, sigma)
    return attention(q, k, v, mask)


def permutation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of n token positions (CPU, from ``generator``)."""
    return torch.randperm(n, generator=generator)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    return torch.argsort(perm)


def shuffle_tokens(x: torch.Tensor, perm: torch.Tensor, dim: int = 1, span: slice | None = None) -> torch.Tensor:
    """Reorder tokens along ``dim`` (only inside ``span`` when given); norm-preserving."""
    if span is None:
        return x.index_select(dim, perm.to(x.device))
    start = span.start or 0
    index = torch.arange(x.shape[dim], device=x.device)
    index[start:start + perm.numel()] = start + perm.to(x.device)
    return x.index_select(dim, index)


def drop_selection(candidates: int, ratio: float, generator: torch.Generator) -> list[int]:
    """S²-Guidance sub-network: ⌊ratio·candidates + ½⌋ distinct indices out of range(candidates)."""
    count = drop_count(candidates, ratio)
    if count <= 0:
        return []
    return sorted(torch.randperm(candidates, generator=generator)[:count].tolist())


def drop_count(candidates: int, ratio: float) -> int:
    """How many of ``candidates`` blocks a drop ratio drops (rounded half up)."""
    return int(math.floor(ratio * candidates + 0.5))


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, step, block ...), reproducible across runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


# ------------------------------------------------------------------------------------------------
# NAG: Normalized Attention Guidance
# ------------------------------------------------------------------------------------------------

NAG_EPS = 1e-6


def nag_combine(z_positive: torch.Tensor, z_negative: torch.Tensor, scale: float, tau: float, alpha: float,
                eps: float = NAG_EPS) -> torch.Tensor:
    """NAG's attention-space guidance of one attention output, per token.

    Chen, Bandyopadhyay, Zou, Song, "Normalized Attention Guidance: Universal Negative Guidance for
    Diffusion Models" (NeurIPS 2025, arXiv 2505.21179). ``Z⁺ = Attn(Q, K⁺, V⁺)`` is the attention
    output with the prompt's keys/values, ``Z⁻ = Attn(Q, K⁻, V⁻)`` the same queries against the NAG
    negative prompt's keys/values:

        Z̃ = s·Z⁺ − (s − 1)·Z⁻                      (= Z⁺ + (s − 1)(Z⁺ − Z⁻); extrapolation)
        r = ‖Z̃‖₁ / ‖Z⁺‖₁                          (L1 norms over the channels of each token)
        Ẑ = Z̃ · min(r, τ) / r                     (normalisation: ‖Ẑ‖₁ ≤ τ·‖Z⁺‖₁)
        Z = α·Ẑ + (1 − α)·Z⁺                       (refinement blend)

    The norms run over the last dimension, which must hold every channel of a token (all heads
    concatenated, as the official code's ``[batch, tokens, heads·dim]`` layout). Both norms are
    clamped to ``eps`` from below, as the official ComfyUI implementation does. ``s = 1`` or
    ``α = 0`` returns Z⁺. Computed in float32, returned in the input dtype.
    """
    if z_positive.shape != z_negative.shape:
        raise ValueError(f"NAG: Z⁺ {tuple(z_positive.shape)} and Z⁻ {tuple(z_negative.shape)} must have the same "
                         f"shape (same queries, one output per token)")
    if not math.isfinite(scale):
        raise ValueError(f"NAG: scale must be a finite number (got {scale})")
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"NAG: tau must be a positive number (got {tau}); the paper uses 2.5")
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"NAG: alpha is a blend weight in [0, 1] (got {alpha})")
    positive = z_positive.float()
    extrapolated = positive * scale - z_negative.float() * (scale - 1.0)
    norm_positive = positive.abs().sum(dim=-1, keepdim=True).clamp_min(eps)
    norm_extrapolated = extrapolated.abs().sum(dim=-1, keepdim=True).clamp_min(eps)
    ratio = norm_extrapolated / norm_positive
    normalized = extrapolated * (ratio.clamp_max(tau) / ratio)
    return (normalized * alpha + positive * (1.0 - alpha)).to(z_positive.dtype)
