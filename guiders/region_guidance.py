"""S-CFG (Semantic-aware CFG): per-region CFG scales from the model's own attention maps. Pure torch.

Shen, Song, Xue, Wang, Liu, "Rethinking the Spatial Inconsistency in Classifier-Free Diffusion
Guidance", CVPR 2024 (arXiv 2404.05384); official code SmilesDZgk/S-CFG (``sd/sd.py``,
``sd/utils.py:get_mask``). Verified against that code; our deviations are marked **[ours]**.

Per step, from the conditional forward's attention (read by ``nodes/contributors/regions.py``):

1. Cross-attention map of every text token t over the image patches, head-averaged:
   ``A_ℓ = mean_h softmax(Q_h K_textᵀ/√d)``  (N patches × T tokens), layers ℓ at 1/R of the latent
   resolution and coarser (official R = 4: the 16×16 and 8×8 layers of SD1.5 at 512 px).
2. Self-attention completion (the paper's SSGC step): ``Â_ℓ = ((S + (K−1)·S²)/K)·A_ℓ`` with S the
   head-averaged self-attention of the same layer, K = 4. (The paper writes the mean of S¹…S^K; the
   official code computes S and then adds S² K−1 times, which is the formula above — we follow the
   code.) **[ours]** S is never built: ``S·X = mean_h softmax(Q_h K_hᵀ/√d)·X`` is an attention call
   with X as the values, so memory stays O(N·T) instead of O(N²) (``propagate``).
3. Per layer: to the map grid (coarser layers bilinear-upsampled as official; finer ones — DiT token
   grids — area-pooled **[ours]**), 3×3 Gaussian smoothing (the official kernel, σ = 0.5, reflect
   padding), then per-token spatial normalisation ``Â_t / mean_x Â_t``; averaged over layers.
4. Region of a patch = argmax over tokens (all tokens compete, including [SOT] and padding, as
   official). Foreground = patches where the normalised "all tokens but the first" map beats the
   normalised first-token ([SOT]) map — computed from the **unconditional** forward in the official
   code (``fore_ca, _ = new_fore.chunk(2)`` takes the uncond half; both the SD and IF scripts).
5. With g = C − U and ‖g‖ its per-pixel norm over channels at latent resolution (regions
   nearest-upsampled):
       ``r_k = mean_{x∈fg} ‖g(x)‖ / mean_{x∈k} ‖g(x)‖``       (empty regions: r = 0, unused)
       ``r(x) = clamp(r_{k(x)}, 0.8, 3.0)``, ``r(x) ← min(r(x), 15/w)``, then 3×3 Gaussian smoothing
   and ``D = U + w·r(x)·(C − U)``. Every region's mean guidance norm is lifted (or lowered) to the
   foreground's. **[ours]** an empty foreground (official: reference 0, so every rate clamps to
   0.8) falls back to the mean over the whole image, so uniform attention gives r = 1, i.e. CFG.

Stage in the plan (``combine.py``): S-CFG multiplies the CFG weight, like β-CFG:
``W_l ← W_l·r(x)`` before APG/FDG act on the direction (``G = U + W·r·g``; with APG
``G = C + (W·r − 1)·APG(g)``). r is computed from g after the stage-1 uncond rewrites (TCFG,
CFG-Zero*). Official step range: every step (no window); ours has an optional window.

The ratio r is scale-free, so it is the same whether g is taken on ε, x0 or velocity predictions
(they differ by a per-step scalar): the rule is exact on ComfyUI's denoised predictions and on flow
models.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .tensor_ops import to_f32

EPS = 1e-8
# layers with N² at most this (N ≤ 512 tokens: one head's N×N block ≤ 1 MiB) use one explicit head at a
# time; larger ones go through scaled_dot_product_attention and never hold an N×N block
SMALL_SELF_ATTENTION = 512 * 512
REFERENCES = ("foreground (uncond)", "foreground (cond)", "whole image")


class RegionGuidanceError(ValueError):
    """Bad inputs to the S-CFG math (shapes, settings); the message names what is wrong."""


# ------------------------------------------------------------------------------------------------
# attention maps without N×N matrices
# ------------------------------------------------------------------------------------------------

def _check_bhld(name: str, t: torch.Tensor) -> None:
    if not torch.is_tensor(t) or t.ndim != 4:
        raise RegionGuidanceError(f"S-CFG: {name} must be [batch, heads, tokens, head_dim]; got "
                                  f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")


def cross_attention_map(q: torch.Tensor, k_text: torch.Tensor) -> torch.Tensor:
    """Head-averaged ``softmax(Q K_textᵀ/√d)`` over the text tokens: [B, N, T] float32.

    ``q`` [B, H, N, d] image queries, ``k_text`` [B, H, T, d] text keys. One head at a time, so the
    peak extra memory is one [B, N, T] block.
    """
    _check_bhld("q", q)
    _check_bhld("k_text", k_text)
    if q.shape[:2] != k_text.shape[:2] or q.shape[-1] != k_text.shape[-1]:
        raise RegionGuidanceError(f"S-CFG: query {tuple(q.shape)} and text keys {tuple(k_text.shape)} do not match")
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = None
    for h in range(q.shape[1]):
        p = torch.softmax(torch.matmul(to_f32(q[:, h]), to_f32(k_text[:, h]).transpose(-1, -2)) * scale, dim=-1)
        out = p if out is None else out.add_(p)
    return out / q.shape[1]


def self_attention_apply(q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``S·x`` with ``S = mean_h softmax(Q_h K_hᵀ/√d)`` (rows = queries), without building S.

    ``x`` [B, N, C] float32 → [B, N, C] float32. It is an attention call with ``x`` as the values,
    split into value slices as wide as the head dimension so fused kernels (flash / memory
    efficient) apply on GPUs; each slice costs what one head of the layer's own attention costs.
    """
    b, heads, n, d = q.shape
    if x.shape[:2] != (b, n):
        raise RegionGuidanceError(f"S-CFG: values {tuple(x.shape)} do not match the self-attention queries "
                                  f"{tuple(q.shape)}")
    if n * n <= SMALL_SELF_ATTENTION:
        # a small layer (SD1.5's 16×16 and 8×8): one head's N×N block costs less than the slicing
        return _explicit_apply(q, k, x)
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    k = k.to(dtype)
    q = q.to(dtype)
    outs = []
    width = d
    for start in range(0, x.shape[-1], width):
        part = x[..., start:start + width]
        c = part.shape[-1]
        if c < width:
            part = F.pad(part, (0, width - c))
        v = part.to(dtype)[:, None].expand(b, heads, n, width)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, width]
        outs.append(to_f32(y).mean(dim=1)[..., :c])
    return torch.cat(outs, dim=-1)


def _explicit_apply(q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = to_f32(x)
    for h in range(q.shape[1]):
        p = torch.softmax(torch.matmul(to_f32(q[:, h]), to_f32(k[:, h]).transpose(-1, -2)) * scale, dim=-1)
        out += torch.matmul(p, xf)
    return out / q.shape[1]


def propagate(q_self: torch.Tensor | None, k_self: torch.Tensor | None, maps: torch.Tensor, order: int
              ) -> torch.Tensor:
    """The official self-attention completion ``((S + (order−1)·S²)/order)·maps``; ``order`` 0 = none."""
    if order <= 0 or q_self is None:
        return maps
    _check_bhld("q_self", q_self)
    _check_bhld("k_self", k_self)
    once = self_attention_apply(q_self, k_self, maps)
    if order == 1:
        return once
    twice = self_attention_apply(q_self, k_self, once)
    return (once + (order - 1) * twice) / order


# ------------------------------------------------------------------------------------------------
# smoothing and the map grid
# ------------------------------------------------------------------------------------------------

def official_gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The official GaussianSmoothing kernel: ``exp(−((x − m)/(2σ))²)`` per axis (note 2σ, not √2σ),
    normalised to sum 1. [k, k] float32."""
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    k2 = g[:, None] * g[None, :]
    return k2 / k2.sum()


def smooth(maps: torch.Tensor) -> torch.Tensor:
    """3×3 official Gaussian smoothing of every channel of [B, C, H, W] with reflect padding (float32)."""
    b, c, h, w = maps.shape
    x = to_f32(maps).reshape(b * c, 1, h, w)
    mode = "reflect" if h > 1 and w > 1 else "replicate"
    x = F.pad(x, (1, 1, 1, 1), mode=mode)
    kernel = official_gaussian_kernel().to(x.device)[None, None]
    return F.conv2d(x, kernel).reshape(b, c, h, w)


def to_grid(maps: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """[B, N, C] token maps on ``grid`` (row-major) → [B, C, *target]: bilinear up, area down."""
    b, n, c = maps.shape
    if n != grid[0] * grid[1]:
        raise RegionGuidanceError(f"S-CFG: {n} image tokens do not form the {grid[0]}×{grid[1]} grid")
    x = maps.transpose(1, 2).reshape(b, c, grid[0], grid[1])
    if tuple(grid) == tuple(target):
        return x
    if grid[0] <= target[0] and grid[1] <= target[1]:
        return F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(x, target)


def map_grid(latent_hw: tuple[int, int], downsample: int) -> tuple[int, int]:
    """The grid the regions live on: the latent size divided by ``downsample`` (official 4)."""
    return (max(1, round(latent_hw[0] / downsample)), max(1, round(latent_hw[1] / downsample)))


def spatial_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Each channel of [B, C, H, W] divided by its spatial mean (the official "spatial normalisation")."""
    return maps / (maps.mean(dim=(2, 3), keepdim=True) + EPS)


def foreground_channels(maps: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] → [B, 2, ...]: the first token ([SOT]) and the sum of all other tokens."""
    if maps.shape[1] < 2:
        raise RegionGuidanceError("S-CFG: the foreground split needs at least 2 text tokens")
    return torch.stack([maps[:, 0], maps[:, 1:].sum(dim=1)], dim=1)


# ------------------------------------------------------------------------------------------------
# recording one step's maps
# ------------------------------------------------------------------------------------------------

@dataclass
class RegionMaps:
    """One step's regions on the map grid. ``scale`` is filled by ``region_scale_map`` (for display)."""

    assignment: torch.Tensor  # [B, h, w] long: the token (region) of each cell
    foreground: torch.Tensor | None  # [B, h, w] bool, None for the whole-image reference
    tokens: int
    layers: int
    scale: torch.Tensor | None = None  # [B, 1, H, W] float32 at latent resolution, once computed
    step_index: int = -1


@dataclass
class RegionRecorder:
    """Accumulates the per-layer maps of one model evaluation (possibly several forwards).

    ``reference``: one of ``REFERENCES``. Entry 0 is the conditional chunk, entry 1 the
    unconditional (ComfyUI's ``cond_or_uncond``). Chunks of the same entry (several prompts of one
    conditioning) are averaged.
    """

    latent_hw: tuple[int, int]
    downsample: int = 4
    order: int = 4
    reference: str = REFERENCES[0]
    step_index: int = -1
    _tokens: dict = field(default_factory=dict)  # entry 0: [sum of normalised maps, count]
    _fore: dict = field(default_factory=dict)  # entry: [sum of normalised 2-channel maps, count]
    layers: int = 0
    pending: dict = field(default_factory=dict)  # scratch for hooks: a layer's self-attention q, k

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise RegionGuidanceError(f"S-CFG: reference must be one of {', '.join(REFERENCES)}; "
                                      f"got {self.reference!r}")
        if self.downsample < 1:
            raise RegionGuidanceError(f"S-CFG: downsample must be ≥ 1 (got {self.downsample})")

    @property
    def target(self) -> tuple[int, int]:
        return map_grid(self.latent_hw, self.downsample)

    @property
    def foreground_entry(self) -> int | None:
        return {"foreground (uncond)": 1, "foreground (cond)": 0}.get(self.reference)

    def wants_entry(self, entry: int) -> bool:
        return entry == 0 or entry == self.foreground_entry

    def wants_layer(self, layer_hw: tuple[int, int]) -> bool:
        """UNet layers: at 1/downsample of the latent or coarser (official: r ∈ {R, 2R, …})."""
        return layer_hw[0] * self.downsample <= self.latent_hw[0] + 1e-6

    def _finish_layer(self, maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return smooth(to_grid(maps, grid, self.target))

    def add(self, entry: int, maps: torch.Tensor, grid: tuple[int, int]) -> None:
        """One layer's propagated cross-attention maps [B, N, T] of one chunk of ``entry``."""
        if not self.wants_entry(entry):
            return
        gridded = self._finish_layer(maps, grid)  # [B, T, h, w]
        if entry == 0:
            self._accumulate(self._tokens, spatial_normalize(gridded))
        if entry == self.foreground_entry:
            self._accumulate(self._fore, spatial_normalize(foreground_channels(gridded)))
        if entry == 0:
            self.layers += 1

    def add_foreground(self, entry: int, fore: torch.Tensor, grid: tuple[int, int]) -> None:
        """Like ``add`` for a chunk that only feeds the foreground, given as [B, N, 2] maps
        ([SOT], sum of the others: linear, so the propagation can run on these 2 channels only)."""
        if entry != self.foreground_entry:
            return
        self._accumulate(self._fore, spatial_normalize(self._finish_layer(fore, grid)))

    @staticmethod
    def _accumulate(store: dict, value: torch.Tensor) -> None:
        key = tuple(value.shape)
        if not store:
            store["sum"], store["count"] = value.clone(), 1
        elif tuple(store["sum"].shape) == key:
            store["sum"] += value
            store["count"] += 1
        # a chunk with another token count (a second prompt of another length) is left out

    def finish(self) -> RegionMaps | None:
        """The step's regions, or None when no layer was recorded."""
        if not self._tokens:
            return None
        tokens = self._tokens["sum"] / self._tokens["count"]
        assignment = tokens.argmax(dim=1)
        foreground = None
        if self.foreground_entry is not None and self._fore:
            fore = self._fore["sum"] / self._fore["count"]
            if fore.shape[0] == assignment.shape[0]:
                foreground = fore[:, 1] > fore[:, 0]
        elif self.foreground_entry is not None:
            foreground = torch.zeros_like(assignment, dtype=torch.bool)  # → whole-image fallback
        return RegionMaps(assignment, foreground, tokens.shape[1], self.layers, step_index=self.step_index)


def regions_from_maps(token_maps: torch.Tensor, fore_maps: torch.Tensor | None = None) -> RegionMaps:
    """Regions from already gridded, layer-averaged, normalised maps: [B, T, h, w] and [B, 2, h, w]
    (a convenience for tests and external callers; the recorder does the same)."""
    if token_maps.ndim != 4:
        raise RegionGuidanceError(f"S-CFG: token maps must be [B, T, h, w]; got {tuple(token_maps.shape)}")
    foreground = None
    if fore_maps is not None:
        if fore_maps.shape[0] != token_maps.shape[0] or fore_maps.shape[1] != 2 or \
                fore_maps.shape[2:] != token_maps.shape[2:]:
            raise RegionGuidanceError(f"S-CFG: foreground maps {tuple(fore_maps.shape)} do not match the token maps "
                                      f"{tuple(token_maps.shape)} (expected [B, 2, h, w])")
        foreground = fore_maps[:, 1] > fore_maps[:, 0]
    return RegionMaps(token_maps.argmax(dim=1), foreground, token_maps.shape[1], 1)


# ------------------------------------------------------------------------------------------------
# the scale rule
# ------------------------------------------------------------------------------------------------

def region_scale_map(diff: torch.Tensor, regions: RegionMaps, cfg: float, rate_min: float = 0.8,
                     rate_max: float = 3.0, max_weight: float = 15.0, smoothing: bool = True) -> torch.Tensor:
    """The per-pixel factor r(x) of the CFG weight, [B, 1, H, W] float32 (see the module docstring).

    ``diff`` = C − U, [B, C, H, W]; ``cfg`` the CFG weight w (for the ``max_weight/w`` cap;
    ``max_weight`` ≤ 0 disables the cap).
    """
    if diff.ndim != 4:
        raise RegionGuidanceError(f"S-CFG works on image latents [B, C, H, W]; got a {diff.ndim}-D prediction "
                                  f"{tuple(diff.shape)}")
    assignment = regions.assignment
    if assignment.ndim != 3 or assignment.shape[0] != diff.shape[0]:
        raise RegionGuidanceError(f"S-CFG: the region map {tuple(assignment.shape)} does not match the batch of the "
                                  f"prediction {tuple(diff.shape)}")
    if not (rate_min <= rate_max):
        raise RegionGuidanceError(f"S-CFG: rate_min ({rate_min}) must not exceed rate_max ({rate_max})")
    b, _, h, w = diff.shape
    norm = to_f32(diff).norm(dim=1)  # [B, H, W]
    device = norm.device
    ids = F.interpolate(assignment[:, None].float().to(device), size=(h, w), mode="nearest")[:, 0].long()
    count = regions.tokens if regions.tokens > 0 else int(ids.max()) + 1
    flat_ids = ids.reshape(b, -1)
    flat_norm = norm.reshape(b, -1)
    sums = torch.zeros(b, count, device=device).scatter_add_(1, flat_ids, flat_norm)
    counts = torch.zeros(b, count, device=device).scatter_add_(1, flat_ids, torch.ones_like(flat_norm))
    region_mean = sums / (counts + EPS)
    overall = flat_norm.mean(dim=1)
    reference = overall
    if regions.foreground is not None:
        fg = F.interpolate(regions.foreground[:, None].float().to(device), size=(h, w), mode="nearest")[:, 0]
        fg = fg.reshape(b, -1)
        fg_count = fg.sum(dim=1)
        fg_mean = (flat_norm * fg).sum(dim=1) / (fg_count + EPS)
        reference = torch.where(fg_count > 0, fg_mean, overall)
    rate = torch.where(counts > 0, reference[:, None] / (region_mean + EPS), torch.zeros_like(region_mean))
    rate_map = rate.gather(1, flat_ids).reshape(b, 1, h, w)
    rate_map = rate_map.clamp(min=rate_min, max=rate_max)
    if max_weight > 0 and cfg > 0:
        rate_map = rate_map.clamp(max=max_weight / cfg)
    if smoothing:
        rate_map = smooth(rate_map)
    return rate_map


def fit_to(rate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The factor on the spatial size of ``like`` (an FDG band may be smaller): area-averaged."""
    if rate.shape[-2:] == like.shape[-2:]:
        return rate
    if rate.ndim == 5:  # video [B, 1, T, H, W]: per frame
        b, c, t = rate.shape[:3]
        pooled = F.adaptive_avg_pool2d(rate.movedim(2, 1).reshape(b * t, c, *rate.shape[-2:]), like.shape[-2:])
        return pooled.reshape(b, t, c, *like.shape[-2:]).movedim(1, 2)
    return F.adaptive_avg_pool2d(rate, like.shape[-2:])


def scfg_combine(cond: torch.Tensor, uncond: torch.Tensor, regions: RegionMaps, cfg: float, **rule) -> torch.Tensor:
    """``D = U + w·r(x)·(C − U)`` on its own (the engine does this inside the plan's stage 2)."""
    diff = to_f32(cond) - to_f32(uncond)
    rate = region_scale_map(diff, regions, cfg, **rule)
    return (to_f32(uncond) + cfg * rate * diff).to(cond.dtype)


def region_colors(assignment: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, h, w] region ids → [B, h, w, 3] colours in [0, 1] (a fixed golden-ratio hue per token)."""
    ids = assignment.long()
    hue = (ids.float() * 0.618033988749895) % 1.0
    sat = torch.full_like(hue, 0.65)
    val = torch.where(ids == 0, torch.full_like(hue, 0.35), torch.full_like(hue, 0.95))
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    i = i.long() % 6
    r = torch.stack([val, q, p, p, t, val], -1).gather(-1, i[..., None])[..., 0]
    g = torch.stack([t, val, val, q, p, p], -1).gather(-1, i[..., None])[..., 0]
    bl = torch.stack([p, p, t, val, val, q], -1).gather(-1, i[..., None])[..., 0]
    return torch.stack([r, g, bl], dim=-1)


class RegionMapStore:
    """The maps of the last sampling run of an S-CFG-patched model, for display after sampling.

    Lives in the model's ``model_options``; ModelPatcher clones deep-copy those, so
    ``__deepcopy__`` returns the same store: every clone made from the patched model (by later
    nodes, by the sampler) records into the one store the map node reads. A new run replaces the
    previous run's maps.
    """

    def __init__(self):
        self.steps: dict[int, RegionMaps] = {}
        self._run = None  # weak reference to the run's state object

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def record(self, run: object, regions: RegionMaps) -> None:
        if self._run is None or self._run() is not run:
            self.steps = {}
            self._run = weakref.ref(run)
        self.steps[regions.step_index] = regions

    def get(self, step: int = -1) -> RegionMaps | None:
        """The maps of step ``step`` (0-based; −1 = the last recorded step)."""
        if not self.steps:
            return None
        if step < 0:
            return self.steps[max(self.steps)]
        return self.steps.get(step)
