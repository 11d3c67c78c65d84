"""The guidance plan: which methods act on a model, with their settings. Pure data, no tensors.

Method nodes add terms to the plan carried by a MODEL (each node clones the model first); the
engine evaluates the whole plan at one point per model evaluation (``combine.py``). The combine
order is fixed by *stage*, not by node order, because node order carries no meaning here:

1. **uncond rewrites** — TCFG (tangential damping), then CFG-Zero*'s optimised scale α*.
   Order-sensitive between the two; fixed as listed.
2. **the CFG direction** g = C − U' and its transforms — FDG bands (per-level weights), the CFG
   weight schedule, β-CFG's adaptive factor, APG's momentum/clip/projection (with FDG: its projection per band).
   At most one of each; they commute as documented in ``combine.py``.
3. **extra guidance terms**, each ``s_t·(C − B)`` for its own branch B. Additive, so their order
   does not matter.
4. **output corrections** — RescaleCFG (std match to the cond), then CFG-Zero*'s zero-init
   (which overrides everything on its steps).

A node that adds a method already in the plan raises ``PlanError``: the second setting would
silently replace the first otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .progress import StepPosition
from .schedules import Schedule, Window


class PlanError(ValueError):
    """A plan that cannot be built (duplicate method, bad settings); the message names the node."""


@dataclass(frozen=True)
class Branch:
    """An extra model evaluation a term needs, batched with cond and uncond.

    ``source`` names the conditioning it is evaluated with: "cond" (the positive prompt),
    "uncond", or the name of an extra conditioning given to the Guidance Guider.
    ``perturbation`` is applied by the engine's hooks to this branch's chunk only; it is opaque
    here (``None`` = the unperturbed model).
    """

    name: str
    source: str = "cond"
    perturbation: object | None = None


@dataclass(frozen=True)
class BetaCFG:
    """β-CFG: weight × β(τ; a, b)·(σ/‖C − U‖)^γ, times (N/N_ref)^(γ/2) in the resolution-independent
    ``normalization="rms"`` (default); ``"l2"`` is the paper's (see ``normalization.beta_cfg_factor``)."""

    a: float = 2.0
    b: float = 2.0
    gamma: float = 1.0
    normalize_peak: bool = False
    label: str = "β-CFG"
    normalization: str = "rms"
    reference_elements: int = 4 * 128 * 128

    def validate(self) -> None:
        if self.a < 1 or self.b < 1:
            raise PlanError(f"{self.label}: a and b must be ≥ 1 (the beta density is infinite at the ends "
                            f"otherwise); got a={self.a}, b={self.b}")
        if not (0 <= self.gamma <= 2):
            raise PlanError(f"{self.label}: gamma must be in [0, 2] (got {self.gamma}); the paper uses 1")
        if self.normalization not in ("rms", "l2"):
            raise PlanError(f"{self.label}: normalization must be 'rms' (per-element, resolution-independent) or "
                            f"'l2' (the paper's); got {self.normalization!r}")
        if self.reference_elements < 1:
            raise PlanError(f"{self.label}: reference_elements must be ≥ 1 (got {self.reference_elements})")


APG_FDG_MODES = ("projection", "full")


@dataclass(frozen=True)
class APG:
    """Adaptive Projected Guidance settings (see ``projection.apg_direction``).

    ``fdg_mode``: what APG does per band when FDG is in the plan. "projection" (default): only the
    parallel/orthogonal split with η, as diffusers' FrequencyDecoupledGuidance ``parallel_weights`` (no
    momentum, no norm clip: neither paper applies them per band). "full": the whole APG rule (momentum
    buffer and absolute norm clip) on each band (the pack's earlier behaviour). Without FDG it is ignored.
    """

    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5
    label: str = "APG"
    fdg_mode: str = "projection"

    def validate(self) -> None:
        if self.fdg_mode not in APG_FDG_MODES:
            raise PlanError(f"{self.label}: fdg_mode must be one of {', '.join(APG_FDG_MODES)}; got {self.fdg_mode!r}")
        if self.norm_threshold < 0:
            raise PlanError(f"{self.label}: norm_threshold must be ≥ 0 (0 disables the clip); "
                            f"got {self.norm_threshold}")
        if not (-1.0 < self.momentum < 1.0):
            raise PlanError(f"{self.label}: momentum must be in (−1, 1) for the running sum to stay bounded; "
                            f"the paper uses −0.5 (got {self.momentum})")


@dataclass(frozen=True)
class FDG:
    """Frequency-decoupled guidance: one CFG weight per Laplacian level, high → low frequency.

    ``relative`` False (the paper's and diffusers' rule): the scales are the band weights and the sampler's
    cfg is not used. True: band weight ``1 + (cfg − 1)·scale``, so the sampler's cfg sets the strength and
    the scales its split over the bands ("1, 0.5" at cfg 10: 10 and 5.5; cfg 1: no guidance).
    """

    scales: tuple[float, ...] = (10.0, 5.0)
    label: str = "FDG"
    relative: bool = False

    def weights(self, cond_scale: float) -> tuple[float, ...]:
        """The CFG weight of each band at the sampler's cfg ``cond_scale``."""
        if self.relative:
            return tuple(1.0 + (cond_scale - 1.0) * s for s in self.scales)
        return self.scales

    def ignored_cfg_note(self, cond_scale: float) -> str | None:
        """A message when the sampler's cfg has no effect on FDG's bands (absolute scales, cfg not 1 and not the
        highest band's scale, i.e. not a value chosen to compare with plain CFG); None otherwise."""
        if self.relative or math.isclose(cond_scale, 1.0) or math.isclose(cond_scale, self.scales[0]):
            return None
        scales = ", ".join(f"{s:g}" for s in self.scales)
        return (f"{self.label}: the sampler's cfg ({cond_scale:g}) does not change the guidance: FDG's scales "
                f"'{scales}' are the CFG weights of its bands and replace cfg (paper/diffusers rule). To make cfg act, "
                f"set the FDG node's scale_mode to 'relative to cfg' (band weight = 1 + (cfg − 1)·scale).")

    def validate(self) -> None:
        if len(self.scales) < 2:
            raise PlanError(f"{self.label}: give one scale per frequency level, high → low, at least two "
                            f"(e.g. '10, 5'); got {list(self.scales)}")
        if len(self.scales) > 6:
            raise PlanError(f"{self.label}: at most 6 levels (latents are small); got {len(self.scales)}")
        if not all(math.isfinite(s) for s in self.scales):
            raise PlanError(f"{self.label}: scales must be finite numbers")


@dataclass(frozen=True)
class TCFG:
    label: str = "TCFG"

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class CFGZeroStar:
    """CFG-Zero*: optimised uncond scale α* and/or zero-init of the first ``zero_init_steps`` steps.

    ``zero_init_steps`` counts zeroed steps of a sampler call that starts from pure noise: 0 = off, 1 = the
    first step (the official code's ``zero_steps=0``), 2 = the first two (official ``zero_steps=1``, its Wan
    T2V setting). ``None`` = automatic: ``AUTO_FLOW_STEPS`` on flow models, off on eps/v models, where
    the official code never runs and a zeroed first step leaves its noise in the image (resolved by
    ``GuidancePlan.for_model``).
    """

    AUTO_FLOW_STEPS = 1

    optimized_scale: bool = True
    zero_init_steps: int | None = None
    label: str = "CFG-Zero*"

    def validate(self) -> None:
        if self.zero_init_steps is not None and self.zero_init_steps < 0:
            raise PlanError(f"{self.label}: zero_init_steps must be ≥ 0, or automatic (got {self.zero_init_steps})")
        if not self.optimized_scale and self.zero_init_steps == 0:
            raise PlanError(f"{self.label}: both the optimised scale and zero-init are off, so the node would do "
                            f"nothing; enable one of them or remove the node")


@dataclass(frozen=True)
class Rescale:
    """RescaleCFG-style std match to the cond prediction, in v space (velocity on flow models)."""

    multiplier: float = 0.7
    label: str = "Rescale"

    def validate(self) -> None:
        if not (0.0 <= self.multiplier <= 1.0):
            raise PlanError(f"{self.label}: multiplier is a blend in [0, 1] (got {self.multiplier})")


@dataclass(frozen=True)
class ExtraGuidance:
    """Stage-3 term: ``D̂ += s_t·(C − B)`` where B is the prediction of ``branch``."""

    branch: Branch
    scale: float
    schedule: Schedule = field(default_factory=Schedule)
    label: str = "extra guidance"

    def validate(self) -> None:
        if not math.isfinite(self.scale):
            raise PlanError(f"{self.label}: scale must be a finite number")
        self.schedule.validate(self.label)

    def scale_at(self, position: StepPosition, sigma: float) -> float:
        if self.scale == 0:
            return 0.0
        return self.scale * self.schedule.multiplier(position.progress, sigma)


@dataclass(frozen=True)
class IndependentCondition:
    """Stage-1 uncond source (ICG): the unconditional branch is evaluated under ``branch`` instead.

    ``branch.perturbation`` rewrites the conditioning (see ``nodes/hooks.py``); the CFG formula and
    every later stage are unchanged, so ICG stacks with APG, TCFG, schedules and extra terms.
    """

    branch: Branch
    label: str = "ICG"

    def validate(self) -> None:
        if self.branch.source != "cond":
            raise PlanError(f"{self.label}: the independent condition is derived from the prompt's conditioning")


@dataclass(frozen=True)
class UncondModel:
    """Stage-1 uncond source from another model (unconditional priors, Diffusion-NPO, personalization
    guidance): ``U' = U + β_t·(U_other − U)`` with ``β_t = scale·f(p)`` inside the window, 0 outside.

    ``branch`` is evaluated with the uncond's conditioning on the other model (``branch.perturbation``
    says which: a second checkpoint, or LoRA rows on the same weights; opaque here). At β_t = 1 (the
    papers' setting) the other model's prediction *is* the uncond and the sampled model's own uncond
    is not evaluated; at β_t = 0 only the sampled model's uncond runs; in between both run.
    """

    branch: Branch
    scale: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    label: str = "second-model uncond"

    def validate(self) -> None:
        if not (math.isfinite(self.scale) and 0.0 <= self.scale <= 2.0):
            raise PlanError(f"{self.label}: scale is the share of the other model's uncond in [0, 2] (1 = replace the "
                            f"uncond, as the paper; 0 = off); got {self.scale}")
        if self.branch.source != "uncond":
            raise PlanError(f"{self.label}: the other model is evaluated with the negative/empty prompt (source "
                            f"'uncond'); got {self.branch.source!r}")
        self.schedule.validate(self.label)

    def weight_at(self, position: StepPosition, sigma: float) -> float:
        if self.scale == 0:
            return 0.0
        return self.scale * self.schedule.multiplier(position.progress, sigma)


ADAPTIVE_SCOPES = ("uncond and branches", "uncond only", "branches only")


@dataclass(frozen=True)
class AdaptiveGuidance:
    """Adaptive Guidance / LinearAG settings (see ``adaptive.py``): which evaluations stop, and when.

    ``threshold`` γ̄: an evaluation stops for the rest of the run (per sample) once cos(ε_c, ε_other) ≥ γ̄
    at a progress ≥ ``start_percent`` (γ̄ > 1 never stops; γ̄ = −1 stops from the first step, whatever
    ``start_percent``). The guard exists because at high noise ε_c and ε_u are both ≈ the input noise, so
    their cosine is ≈ 1 before guidance has done its work (measured on the exact mixture: 0.9999 at
    σ = 14.6; on flow models ε = x exactly at σ = 1), and the switch is one-way. ``linear`` adds
    LinearAG's estimated uncond on ``refresh_every − 1`` of every ``refresh_every`` evaluations
    after ``calibration_steps`` evaluated ones.

    Defaults (the node's): LinearAG alone, the switch off (``NO_SWITCH``): on the embedded digits model
    (a real ε network, cfg 7) the switch from 50–80% of the run lost quality against CFG (Fréchet distance
    +26…33%, diversity −9…−18%), from 90% it cost +5% and saved no more than LinearAG alone, which kept CFG's
    quality at −22% passes (``benchmarks/adaptive_cost.py --digits``).
    """

    NO_SWITCH = 1.01

    threshold: float = NO_SWITCH
    scope: str = "uncond and branches"
    start_percent: float = 0.5
    linear: bool = True
    calibration_steps: int = 3
    refresh_every: int = 2
    label: str = "Adaptive Guidance"
    parameterization: str | None = None  # "ve" / "flow": how ε is read from D (resolved by GuidancePlan.for_model)

    def validate(self) -> None:
        if not (-1.0 <= self.threshold <= 1.5):
            raise PlanError(f"{self.label}: threshold is a cosine similarity in [−1, 1] (above 1 never switches); "
                            f"got {self.threshold}. The paper's range is about 0.98–0.999")
        if not (0.0 <= self.start_percent <= 1.0):
            raise PlanError(f"{self.label}: start_percent is a fraction of the run in [0, 1]; got {self.start_percent}")
        if self.scope not in ADAPTIVE_SCOPES:
            raise PlanError(f"{self.label}: scope must be one of {', '.join(ADAPTIVE_SCOPES)}; got {self.scope!r}")
        if self.linear:
            if not self.watches_uncond:
                raise PlanError(f"{self.label}: LinearAG estimates the unconditional prediction, so the scope must "
                                f"include the uncond (got {self.scope!r}); turn linear_ag off to stop only the "
                                f"extra branches")
            if self.calibration_steps < 2:
                raise PlanError(f"{self.label}: LinearAG needs at least 2 calibration steps (it regresses on the "
                                f"previous step); got {self.calibration_steps}")
            if self.refresh_every < 1:
                raise PlanError(f"{self.label}: refresh_every must be ≥ 1 (1 = never estimate); "
                                f"got {self.refresh_every}")

    @property
    def watches_uncond(self) -> bool:
        return self.scope != "branches only"

    @property
    def watches_branches(self) -> bool:
        return self.scope != "uncond only"

    @property
    def starts_switched(self) -> bool:
        return self.threshold <= -1.0


@dataclass(frozen=True)
class SCFG:
    """S-CFG (semantic-aware CFG) settings: the CFG weight becomes a per-region map ``W·r(x)``
    built from the model's attention maps each step (``region_guidance.py``; maps read by the
    engine's hooks). Outside ``window`` the step is plain CFG and no map is read."""

    downsample: int = 4
    order: int = 4
    reference: str = "foreground (uncond)"
    rate_min: float = 0.8
    rate_max: float = 3.0
    max_weight: float = 15.0
    smoothing: bool = True
    dit_blocks: int = 3
    window: Window = field(default_factory=Window)
    label: str = "S-CFG"

    def validate(self) -> None:
        from .region_guidance import REFERENCES

        if self.downsample < 1:
            raise PlanError(f"{self.label}: downsample must be ≥ 1 (official 4); got {self.downsample}")
        if not (0 <= self.order <= 8):
            raise PlanError(f"{self.label}: self_attention_order must be in [0, 8] (official 4); got {self.order}")
        if self.reference not in REFERENCES:
            raise PlanError(f"{self.label}: reference must be one of {', '.join(REFERENCES)}; got {self.reference!r}")
        if not (0 < self.rate_min <= self.rate_max):
            raise PlanError(f"{self.label}: need 0 < rate_min ≤ rate_max (official 0.8 and 3.0); got "
                            f"{self.rate_min} and {self.rate_max}")
        if self.max_weight < 0 or self.dit_blocks < 1:
            raise PlanError(f"{self.label}: max_weight must be ≥ 0 and dit_blocks ≥ 1")
        try:
            self.window.validate(self.label)
        except ValueError as e:
            raise PlanError(str(e)) from None

    def active(self, progress: float, sigma: float) -> bool:
        return self.window.contains(progress, sigma)


SINGLETON_SLOTS = ("cfg_schedule", "tcfg", "cfg_zero_star", "apg", "fdg", "beta_cfg", "rescale", "icg", "adaptive",
                   "scfg", "uncond_model")
# the uncond sources: each replaces what the unconditional branch is evaluated with, so only one may act
UNCOND_SOURCE_SLOTS = ("icg", "uncond_model")


@dataclass(frozen=True)
class GuidancePlan:
    cfg_schedule: Schedule | None = None
    cfg_schedule_label: str = "CFG Schedule"
    tcfg: TCFG | None = None
    cfg_zero_star: CFGZeroStar | None = None
    apg: APG | None = None
    fdg: FDG | None = None
    beta_cfg: BetaCFG | None = None
    rescale: Rescale | None = None
    icg: IndependentCondition | None = None
    adaptive: AdaptiveGuidance | None = None
    scfg: SCFG | None = None
    uncond_model: UncondModel | None = None
    extra: tuple[ExtraGuidance, ...] = ()

    # --- building -------------------------------------------------------------------------------
    def with_method(self, slot: str, value, label: str) -> GuidancePlan:
        """A copy with ``slot`` set; raises PlanError if the slot is taken (one of each method)."""
        if slot not in SINGLETON_SLOTS:
            raise PlanError(f"{label}: unknown plan slot {slot!r}")
        if getattr(self, slot) is not None:
            raise PlanError(f"{label}: this model already has {label} in its guidance plan (from an earlier node "
                            f"in the chain). Chain each method once; to change its settings, edit that node.")
        if slot in UNCOND_SOURCE_SLOTS:
            for other in UNCOND_SOURCE_SLOTS:
                taken = getattr(self, other)
                if other != slot and taken is not None:
                    raise PlanError(f"{label}: the unconditional branch already comes from {taken.label} (an earlier "
                                    f"node in the chain); both replace it, so use one of the two.")
        if slot == "cfg_schedule":
            value.validate(label)
            return replace(self, cfg_schedule=value, cfg_schedule_label=label)
        value.validate()
        return replace(self, **{slot: value})

    def with_extra(self, term: ExtraGuidance) -> GuidancePlan:
        term.validate()
        if any(t.branch.name == term.branch.name for t in self.extra):
            raise PlanError(f"{term.label}: this model already has {term.label} in its guidance plan (from an earlier "
                            f"node in the chain). Chain each method once; to change its settings, edit that node.")
        return replace(self, extra=self.extra + (term,))

    # --- queries --------------------------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        return all(getattr(self, s) is None for s in SINGLETON_SLOTS) and not self.extra

    @property
    def needs_uncond_at_cfg_one(self) -> bool:
        """Methods that act even at cfg 1 (so ComfyUI must not drop the uncond call there)."""
        return (self.fdg is not None and not self.fdg.relative) or self.beta_cfg is not None

    def cfg_notes(self, cond_scale: float) -> list[tuple[str, str]]:
        """(key, message) pairs to log once per sampler call about how the sampler's cfg is used."""
        notes = []
        if self.fdg is not None:
            note = self.fdg.ignored_cfg_note(cond_scale)
            if note is not None:
                notes.append(("fdg-ignores-cfg", note))
        return notes

    def cfg_multiplier(self, position: StepPosition, sigma: float) -> float:
        """f(p) of the CFG increment at this evaluation (1 without a schedule)."""
        if self.cfg_schedule is None:
            return 1.0
        return self.cfg_schedule.multiplier(position.progress, sigma)

    def is_zero_init_step(self, position: StepPosition) -> bool:
        """CFG-Zero*'s zero-init: the first steps of a sampler call that starts from pure noise (never a second
        pass, a refiner or img2img). An unresolved 'auto' setting (see ``for_model``) zero-inits nothing."""
        z = self.cfg_zero_star
        return (z is not None and position.from_noise and z.zero_init_steps is not None
                and position.step_index < z.zero_init_steps)

    def for_model(self, parameterization: str) -> GuidancePlan:
        """This plan with its model-dependent defaults resolved for a model of ``parameterization``
        ("flow" or "ve"): CFG-Zero*'s automatic zero-init (the first step on flow models, off on eps/v) and how
        Adaptive Guidance reads the noise prediction ε from a denoised one."""
        plan = self
        z = plan.cfg_zero_star
        if z is not None and z.zero_init_steps is None:
            steps = CFGZeroStar.AUTO_FLOW_STEPS if parameterization == "flow" else 0
            plan = replace(plan, cfg_zero_star=replace(z, zero_init_steps=steps))
        ag = plan.adaptive
        if ag is not None and ag.parameterization != parameterization:
            plan = replace(plan, adaptive=replace(ag, parameterization=parameterization))  # ε from D per model
        return plan

    def inactive_at_cfg_one(self, uncond_evaluated: bool) -> list[str]:
        """Labels of methods that cannot act when the CFG scale is 1 (there is no CFG direction).

        Uncond rewrites (TCFG, CFG-Zero*'s α*) still act at cfg 1 when the uncond is evaluated
        anyway (CFG++ samplers re-noise with it).
        """
        if self.needs_uncond_at_cfg_one:
            return []
        labels = []
        if self.fdg is not None:
            labels.append(self.fdg.label + " (scales relative to cfg)")
        if self.icg is not None:
            labels.append(self.icg.label)
        if self.cfg_schedule is not None:
            labels.append(self.cfg_schedule_label)
        if self.apg is not None:
            labels.append(self.apg.label)
        if self.scfg is not None:
            labels.append(self.scfg.label)
        if self.uncond_model is not None:
            labels.append(self.uncond_model.label)
        if not uncond_evaluated:
            if self.tcfg is not None:
                labels.append(self.tcfg.label)
            if self.cfg_zero_star is not None and self.cfg_zero_star.optimized_scale:
                labels.append(self.cfg_zero_star.label + (" (optimised scale; zero-init still acts)"
                                                          if self.cfg_zero_star.zero_init_steps else ""))
        if self.rescale is not None and not self.extra:
            labels.append(self.rescale.label)
        if self.adaptive is not None and not (self.extra and self.adaptive.watches_branches):
            labels.append(self.adaptive.label)
        return labels

    def windows(self) -> list[tuple[str, Schedule]]:
        out = []
        if self.cfg_schedule is not None:
            out.append((self.cfg_schedule_label, self.cfg_schedule))
        out.extend((t.label, t.schedule) for t in self.extra)
        if self.scfg is not None:
            out.append((self.scfg.label, Schedule(window=self.scfg.window)))
        if self.uncond_model is not None:
            out.append((self.uncond_model.label, self.uncond_model.schedule))
        return out
