"""TSG in ComfyUI models: the time-step embedding (paper) or the time input (legacy) of the TSG rows perturbed.

Sadat, Kansy, Hilliges, Weber, "No Training, No Problem: Rethinking Classifier-Free Guidance for
Diffusion Models" (ICLR 2025, arXiv 2407.02687), time-step guidance: ``t̃_emb = t_emb + s·t^α·n`` with
``n ~ N(0, I)`` of the embedding's shape, and ``D = D(t̃_emb) + w·(D(t_emb) − D(t̃_emb))``. No official
code exists; the formula and s = 2, α = 1 are those the paper's reviews quote (see the TSG help page).

Where the embedding is: the module whose output is the model's learned time-step embedding, before
anything else (pooled text, guidance, class or size embeddings) is added to it (the family table's
``time_embedding`` sites): UNet
``time_embed``, Flux/HunyuanVideo ``time_in``, SD3/AuraFlow/Lumina2/HiDream/PixArt/HunyuanDiT/Mochi
``t_embedder``, WAN ``time_embedding``, Qwen-Image ``time_text_embed.timestep_embedder``, LTXV
``adaln_single.emb.timestep_embedder``, Cosmos ``t_embedder.1``. Its ``forward`` gets an object patch
(``TimeEmbeddingForward``): the module runs as always, then the rows of the TSG branch get
``+ s·t^α·n``; every other row of the forward (cond, uncond, other branches) is untouched, so the
branch runs in the same batched call. An APPLY_MODEL wrapper (``time_embedding_wrapper``) finds the
TSG rows (``Forward.branch_rows``), the diffusion time t ∈ [0, 1] of this forward's σ and the per-step
noise, and raises if the patched module never ran (another node replaced the patch).

``n`` is one vector of the embedding's width per step, drawn from (seed, σ) and shared by the TSG rows
(and by the tokens of a per-token time embedding): the same σ gives the same draw in a split run, and
a batch of 4 gives the same result as 4 runs of batch 1.

Chroma (and Chroma Radiance) have no such module: their approximator maps time, guidance and block
index straight to every block's modulation. Stable Cascade computes its time embedding without a
module. On those the node refuses the paper mode and names the time-input shift.

Legacy mode (``TimeShift``): an object patch of the model's ``process_timestep`` (``ProcessTimestep``) shifts
the time input of the TSG rows, so input scaling and the denoised formula keep the true σ; an APPLY_MODEL
wrapper tells it the rows of the forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...guiders.attention_ops import seeded_generator
from ...guiders.branch_inputs import perturbed_time_embedding, perturbed_timesteps, standard_normal, time_noise_size
from ...guiders.plan import BranchEffect
from ..runtime import install as installer
from ..runtime.families import (
    TABLE,
    TIME_INPUT,
    FamilyError,
    TimeEmbeddingSite,
    describe,
    diffusion_model_of,
    qualified_name,
    time_input_refusal,
)
from ..runtime.rows import Forward, current_options, published, sigma_progress, sigma_value
from ..runtime.slots import Guarded, ModulePatch, PerturbationNotApplied, mark_applied

WRAPPER_KEY = "guidance_kit_time_embedding"
TIME_WRAPPER_KEY = "guidance_kit_time"
TSG_KEY = "guidance_kit_tsg"  # transformer_options of a model call: its TsgForward
TIME_SHIFT_KEY = "guidance_kit_time_shift"  # transformer_options of a model call: the legacy mode's rows
OPERATOR = "time_embedding"

# the families' time-embedding modules, by the diffusion model's exact class (a newer subclass may build its
# time embedding differently, so it is refused with a message naming it)
SITES: dict[str, TimeEmbeddingSite] = {q: s.time_embedding for q, s in TABLE.items() if s.time_embedding is not None}
TIME_SHIFT_HINT = ("Set the TSG node's perturb to 'time input shift (legacy)' (it shifts the model's time input "
                   "instead, which works on every family), or use PAG, SEG or Skip-Layer Guidance")


def site_of(model_patcher, owner: str) -> TimeEmbeddingSite:
    """The family's time-embedding module, or a FamilyError naming the family and the alternatives."""
    net = diffusion_model_of(model_patcher)
    name = qualified_name(type(net))
    site = SITES.get(name)
    if site is None:
        spec = TABLE.get(name)
        if spec is not None and spec.time_embedding_refusal:
            raise FamilyError(f"{owner}: the paper's time-embedding perturbation does not apply to {spec.name}: "
                              f"{spec.time_embedding_refusal}. {TIME_SHIFT_HINT}.")
        raise FamilyError(f"{owner}: no time-embedding module is known for this model, {describe(net)} (class "
                          f"{name}). {TIME_SHIFT_HINT}.")
    if _module_at(net, site.path) is None:
        raise FamilyError(f"{owner}: this {site.family} model has no '{site.path}' module (another ComfyUI "
                          f"version builds it differently). {TIME_SHIFT_HINT}; "
                          f"please report it.")
    return site


def _module_at(net, path: str):
    module = net
    for part in path.split("."):  # Sequential children are attributes named "0", "1", ...
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass(frozen=True)
class TimeEmbeddingNoise(BranchEffect):
    """The TSG branch's perturbation (in ``Branch.perturbation``; frozen, no tensors): the time-step
    embedding of its rows gets ``+ s·t^α·n``."""

    method: str
    family: str
    seed: int = 0
    s: float = 2.0
    alpha: float = 1.0
    operator: str = OPERATOR


def diffusion_time(model_sampling, sigma: float) -> float:
    """The diffusion time t ∈ [0, 1] of σ (0 = data, 1 = pure noise), the paper's t.

    Flow models (rectified flow, ``x = (1 − t)·x₀ + t·ε``): t = σ, the time the network embeds. Other
    models: ``1 − percent(σ)``, ComfyUI's percent convention, which is the model's own timestep / 999
    on discrete eps/v models (SD1.5, SDXL) and log-σ linear on EDM models.
    """
    import comfy.model_sampling

    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return min(max(float(sigma), 0.0), 1.0)
    return 1.0 - sigma_progress(model_sampling, float(sigma))


@dataclass(eq=False)
class TsgForward:
    """TSG inside one model call (set by ``time_embedding_wrapper`` for the duration of the forward)."""

    groups: list  # (TimeEmbeddingNoise, rows)
    batch_size: int
    t: float
    key: int
    applied: int = 0
    noise: dict = field(default_factory=dict)

    def noise_for(self, p: TimeEmbeddingNoise, width: int) -> torch.Tensor:
        cache_key = (p, width)
        if cache_key not in self.noise:
            self.noise[cache_key] = standard_normal((width,), seeded_generator(p.seed, self.key, width))
        return self.noise[cache_key]

    def perturb(self, embedding: torch.Tensor) -> torch.Tensor | None:
        """The embedding with the TSG rows perturbed, or None when its rows are not this forward's."""
        if embedding.ndim < 2 or embedding.shape[0] % self.batch_size:
            return None
        per_row = embedding.reshape(self.batch_size, -1, embedding.shape[-1]).clone()
        for p, rows in self.groups:
            rows = rows.to(per_row.device)
            size = time_noise_size(self.t, p.s, p.alpha)
            per_row[rows] = perturbed_time_embedding(per_row[rows], self.noise_for(p, embedding.shape[-1]), size)
        self.applied += 1
        return per_row.reshape(embedding.shape)


class TimeEmbeddingNotApplied(PerturbationNotApplied):
    """The TSG rows were in the forward but the time-embedding module never ran through our patch."""


def time_embedding_wrapper(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: TSG rows, diffusion time and noise key of this forward for the embedding patch."""
    transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options")
    if not isinstance(transformer_options, dict):
        return executor(x, t, *args, **kwargs)
    forward = Forward(transformer_options, x.shape[0])
    groups = forward.of_type(TimeEmbeddingNoise)
    if not groups:
        return executor(x, t, *args, **kwargs)
    sigma = sigma_value(transformer_options.get("sigmas", t))
    state = TsgForward(groups, x.shape[0], diffusion_time(executor.class_obj.model_sampling, sigma), forward.noise_key)
    with published(transformer_options, {TSG_KEY: state}):
        result = executor(x, t, *args, **kwargs)
    if state.applied == 0:
        names = ", ".join(sorted({f"{p.method} ({p.family})" for p, _ in groups}))
        raise TimeEmbeddingNotApplied(
            f"{names}: the time embedding of the TSG branch was never perturbed in this step, so TSG would do "
            f"nothing. Another node replaced Guidance Kit's patch of the time-embedding module (or this ComfyUI "
            f"version no longer calls it). Put the TSG node after nodes that patch the same module, or set its "
            f"perturb to 'time input shift (legacy)'.")
    return result


class TimeEmbeddingForward(ModulePatch):
    """Object patch of the time-embedding module's ``forward``: the module's own forward (or the
    previous occupant), then the TSG rows of the current forward perturbed."""

    def __init__(self, module, site: TimeEmbeddingSite, previous=None):
        super().__init__(module, previous)
        self.site = site

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        state: TsgForward | None = current_options().get(TSG_KEY)
        if state is None:
            return out
        embedding = out[0] if self.site.tuple_output else out
        if not torch.is_tensor(embedding):
            return out
        perturbed = state.perturb(embedding)
        if perturbed is None:
            return out
        return (perturbed, *out[1:]) if self.site.tuple_output else perturbed


def install(model_patcher, site: TimeEmbeddingSite) -> None:
    """Patch a cloned ModelPatcher's time-embedding module and add the wrapper (idempotent)."""
    installer.module_patch(model_patcher, f"diffusion_model.{site.path}", TimeEmbeddingForward, site)
    installer.wrapper(model_patcher, WRAPPER_KEY, time_embedding_wrapper)


# ------------------------------------------------------------------------------------------------
# legacy mode: the time input of the TSG rows shifted
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TimeShift(BranchEffect, Guarded):
    """TSG's legacy branch effect: the model's time input shifted by ``shift`` × its range (``Branch.perturbation``;
    frozen, no tensors)."""

    method: str
    family: str = TIME_INPUT
    seed: int = 0
    shift: float = 0.0


def family_for_time_input(model_patcher, owner: str = "TSG") -> str:
    """Time-input perturbations need no block hooks: every ComfyUI model computes its time input through
    ``BaseModel.process_timestep``. LTX-2 (``LTXAVModel``) returns a (video, audio) pair of time inputs
    there, which the time shift cannot perturb: refused with the reason."""
    if not hasattr(model_patcher.model, "process_timestep"):
        raise FamilyError(f"{owner}: this ComfyUI version's model has no process_timestep; update ComfyUI.")
    refusal = time_input_refusal(model_patcher)
    if refusal is not None:
        raise FamilyError(f"{owner}: {describe(diffusion_model_of(model_patcher))} {refusal}, which the time-input "
                          f"shift does not perturb. Use the CFG-space methods (APG, TCFG, CFG-Zero*, FDG, CFG "
                          f"schedules) on it.")
    return TIME_INPUT


def time_shift_wrapper(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: tell ``ProcessTimestep`` which rows of this forward get a shifted time input."""
    transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
    forward = Forward(transformer_options or {}, x.shape[0])
    groups = forward.of_type(TimeShift)
    if not groups:
        return executor(x, t, *args, **kwargs)
    with published(forward.options, {TIME_SHIFT_KEY: (groups, forward.noise_key, executor.class_obj.model_sampling)}):
        return executor(x, t, *args, **kwargs)


class ProcessTimestep(ModulePatch):
    """Object patch of the model's ``process_timestep``: shift the time input of the TSG rows.

    ComfyUI's ``BaseModel._apply_model`` computes the model's time input as
    ``process_timestep(model_sampling.timestep(σ))`` just before the network call, so this changes
    the network's time conditioning only: input scaling and the denoised formula keep the true σ.
    """

    METHOD = "process_timestep"

    def __call__(self, timestep, **kwargs):
        t = self.original(timestep, **kwargs)
        options = current_options()
        context = options.get(TIME_SHIFT_KEY)
        if context is None or not torch.is_tensor(t) or t.ndim == 0:
            return t
        groups, step, sampling = context
        mark_applied(options, groups)
        low = float(sampling.timestep(torch.as_tensor(float(sampling.sigma_min))))
        high = float(sampling.timestep(torch.as_tensor(float(sampling.sigma_max))))
        t = t.clone()
        for p, rows in groups:
            rows = rows[rows < t.shape[0]]
            noise = torch.randn(1, generator=seeded_generator(p.seed, step)).expand(rows.numel())
            t[rows.to(t.device)] = perturbed_timesteps(t[rows.to(t.device)], noise, p.shift, low, high)
        return t


def install_time_shift(model_patcher) -> None:
    """The legacy mode's patch and wrapper on a cloned ModelPatcher (idempotent), after the guard that checks
    the shift reached the model."""
    installer.guard(model_patcher)
    installer.module_patch(model_patcher, "", ProcessTimestep)
    installer.wrapper(model_patcher, TIME_WRAPPER_KEY, time_shift_wrapper)
