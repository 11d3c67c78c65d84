"""TSG in ComfyUI models: the time-step embedding of the TSG rows perturbed inside the batched forward.

Sadat, Kansy, Hilliges, Weber, "No Training, No Problem: Rethinking Classifier-Free Guidance for
Diffusion Models" (ICLR 2025, arXiv 2407.02687), time-step guidance: ``t̃_emb = t_emb + s·t^α·n`` with
``n ~ N(0, I)`` of the embedding's shape, and ``D = D(t̃_emb) + w·(D(t_emb) − D(t̃_emb))``. No official
code exists; the formula and s = 2, α = 1 are those the paper's reviews quote (see the TSG help page).

Where the embedding is: the module whose output is the model's learned time-step embedding, before
anything else (pooled text, guidance, class or size embeddings) is added to it (``SITES``): UNet
``time_embed``, Flux/HunyuanVideo ``time_in``, SD3/AuraFlow/Lumina2/HiDream/PixArt/HunyuanDiT/Mochi
``t_embedder``, WAN ``time_embedding``, Qwen-Image ``time_text_embed.timestep_embedder``, LTXV
``adaln_single.emb.timestep_embedder``, Cosmos ``t_embedder.1``. Its ``forward`` gets an object patch
(``TimeEmbeddingForward``): the module runs as always, then the rows of the TSG branch get
``+ s·t^α·n``; every other row of the forward (cond, uncond, other branches) is untouched, so the
branch runs in the same batched call. An APPLY_MODEL wrapper (``time_embedding_wrapper``) finds the
TSG rows (``hooks.branch_rows``), the diffusion time t ∈ [0, 1] of this forward's σ and the per-step
noise, and raises if the patched module never ran (another node replaced the patch).

``n`` is one vector of the embedding's width per step, drawn from (seed, σ) and shared by the TSG rows
(and by the tokens of a per-token time embedding): the same σ gives the same draw in a split run, and
a batch of 4 gives the same result as 4 runs of batch 1.

Chroma (and Chroma Radiance) have no such module: their approximator maps time, guidance and block
index straight to every block's modulation. Stable Cascade computes its time embedding without a
module. On those the node refuses the paper mode and names the time-input shift.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch

from ..guiders.attention_ops import seeded_generator
from ..guiders.branch_inputs import perturbed_time_embedding, standard_normal, time_noise_size
from . import hooks
from .engine import sigma_progress
from .families import describe, qualified_name

WRAPPER_KEY = "guidance_kit_time_embedding"
OPERATOR = "time_embedding"


@dataclass(frozen=True)
class TimeEmbeddingSite:
    """Where a family's time-step embedding is computed: ``path`` below ``diffusion_model``."""

    family: str
    path: str
    tuple_output: bool = False  # the module returns (embedding, other) (Cosmos: (emb, adaLN-LoRA))


def _ldm(path: str) -> str:
    return "comfy.ldm." + path


_WAN_TIME = TimeEmbeddingSite("WAN", "time_embedding")
# Matched by the diffusion model's exact class (module + name), as nodes/families.py: a newer subclass may
# build its time embedding differently, so it is refused with a message naming it.
SITES: dict[str, TimeEmbeddingSite] = {
    _ldm("modules.diffusionmodules.openaimodel.UNetModel"): TimeEmbeddingSite("UNet (SD1.5/SDXL)", "time_embed"),
    _ldm("flux.model.Flux"): TimeEmbeddingSite("Flux", "time_in"),
    _ldm("modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper"): TimeEmbeddingSite("SD3/SD3.5", "t_embedder"),
    _ldm("aura.mmdit.MMDiT"): TimeEmbeddingSite("AuraFlow", "t_embedder"),
    _ldm("wan.model.WanModel"): _WAN_TIME,
    _ldm("wan.model.VaceWanModel"): _WAN_TIME,
    _ldm("wan.model.CameraWanModel"): _WAN_TIME,
    _ldm("wan.model.HumoWanModel"): _WAN_TIME,
    _ldm("wan.model.WanModel_S2V"): _WAN_TIME,
    _ldm("wan.model_animate.AnimateWanModel"): _WAN_TIME,
    _ldm("hunyuan_video.model.HunyuanVideo"): TimeEmbeddingSite("HunyuanVideo", "time_in"),
    _ldm("qwen_image.model.QwenImageTransformer2DModel"): TimeEmbeddingSite("Qwen-Image",
                                                                             "time_text_embed.timestep_embedder"),
    _ldm("lightricks.model.LTXVModel"): TimeEmbeddingSite("LTXV", "adaln_single.emb.timestep_embedder"),
    _ldm("lumina.model.NextDiT"): TimeEmbeddingSite("Lumina2", "t_embedder"),
    _ldm("hidream.model.HiDreamImageTransformer2DModel"): TimeEmbeddingSite("HiDream", "t_embedder"),
    _ldm("pixart.pixartms.PixArtMS"): TimeEmbeddingSite("PixArt", "t_embedder"),
    _ldm("hydit.models.HunYuanDiT"): TimeEmbeddingSite("HunyuanDiT", "t_embedder"),
    _ldm("genmo.joint_model.asymm_models_joint.AsymmDiTJoint"): TimeEmbeddingSite("Mochi", "t_embedder"),
    _ldm("cosmos.predict2.MiniTrainDIT"): TimeEmbeddingSite("Cosmos Predict2", "t_embedder.1", tuple_output=True),
    _ldm("cosmos.model.GeneralDIT"): TimeEmbeddingSite("Cosmos", "t_embedder.1", tuple_output=True),
}
_CHROMA = "its distilled approximator maps time, guidance and block index straight to every block's modulation; " \
          "there is no time embedding of its own to perturb"
_CASCADE = "its time embedding is computed without a module (gen_r_embedding)"
NO_SITE = {
    _ldm("chroma.model.Chroma"): ("Chroma", _CHROMA),
    _ldm("chroma_radiance.model.ChromaRadiance"): ("Chroma Radiance", _CHROMA),
    _ldm("cascade.stage_c.StageC"): ("Stable Cascade", _CASCADE),
    _ldm("cascade.stage_b.StageB"): ("Stable Cascade", _CASCADE),
}
TIME_SHIFT_HINT = ("Set the TSG node's perturb to 'time input shift (legacy)' (it shifts the model's time input "
                   "instead, which works on every family), or use PAG, SEG or Skip-Layer Guidance")


def site_of(model_patcher, owner: str) -> TimeEmbeddingSite:
    """The family's time-embedding module, or a FamilyError naming the family and the alternatives."""
    net = hooks.diffusion_model_of(model_patcher)
    name = qualified_name(type(net))
    site = SITES.get(name)
    if site is None:
        refused = NO_SITE.get(name)
        if refused is not None:
            raise hooks.FamilyError(f"{owner}: the paper's time-embedding perturbation does not apply to {refused[0]}: "
                                    f"{refused[1]}. {TIME_SHIFT_HINT}.")
        raise hooks.FamilyError(f"{owner}: no time-embedding module is known for this model, {describe(net)} (class "
                                f"{name}). {TIME_SHIFT_HINT}.")
    if _module_at(net, site.path) is None:
        raise hooks.FamilyError(f"{owner}: this {site.family} model has no '{site.path}' module (another ComfyUI "
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
class TimeEmbeddingNoise:
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


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("guidance_kit_time_embedding", default=None)


class TimeEmbeddingNotApplied(hooks.PerturbationNotApplied):
    """The TSG rows were in the forward but the time-embedding module never ran through our patch."""


def time_embedding_wrapper(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: TSG rows, diffusion time and noise key of this forward for the embedding patch."""
    transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options")
    if not isinstance(transformer_options, dict):
        return executor(x, t, *args, **kwargs)
    groups = hooks.branch_rows(transformer_options, x.shape[0], lambda p: isinstance(p, TimeEmbeddingNoise))
    if not groups:
        return executor(x, t, *args, **kwargs)
    sigma = transformer_options.get("sigmas", t)
    sigma = float(torch.as_tensor(sigma).reshape(-1)[0])
    state = TsgForward(groups, x.shape[0], diffusion_time(executor.class_obj.model_sampling, sigma),
                       hooks.noise_key(transformer_options))
    token = _CURRENT.set(state)
    try:
        result = executor(x, t, *args, **kwargs)
    finally:
        _CURRENT.reset(token)
    if state.applied == 0:
        names = ", ".join(sorted({f"{p.method} ({p.family})" for p, _ in groups}))
        raise TimeEmbeddingNotApplied(
            f"{names}: the time embedding of the TSG branch was never perturbed in this step, so TSG would do "
            f"nothing. Another node replaced Guidance Kit's patch of the time-embedding module (or this ComfyUI "
            f"version no longer calls it). Put the TSG node after nodes that patch the same module, or set its "
            f"perturb to 'time input shift (legacy)'.")
    return result


class TimeEmbeddingForward:
    """Object patch of the time-embedding module's ``forward``: the module's own forward (or the
    previous occupant), then the TSG rows of the current forward perturbed."""

    def __init__(self, module, site: TimeEmbeddingSite, previous=None):
        self.module = module
        self.site = site
        self.previous = previous

    def __call__(self, *args, **kwargs):
        if self.previous is not None:
            out = self.previous(*args, **kwargs)
        else:
            out = type(self.module).forward(self.module, *args, **kwargs)
        state: TsgForward | None = _CURRENT.get()
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
    import comfy.patcher_extension

    net = hooks.diffusion_model_of(model_patcher)
    path = f"diffusion_model.{site.path}.forward"
    current = model_patcher.object_patches.get(path)
    if not isinstance(current, TimeEmbeddingForward):
        model_patcher.add_object_patch(path, TimeEmbeddingForward(_module_at(net, site.path), site, previous=current))
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    if not model_patcher.get_wrappers(apply_model, WRAPPER_KEY):
        model_patcher.add_wrapper_with_key(apply_model, WRAPPER_KEY, time_embedding_wrapper)
