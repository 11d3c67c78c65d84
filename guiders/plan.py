"""The guidance plan: an ordered registry of the methods acting on a model. Pure data, no tensors.

Method nodes add methods to the plan carried by a MODEL (each node clones the model first); the engine
evaluates the whole plan at every model evaluation (``combine.py``). A method is one module under
``guiders/methods/``: its settings (a frozen dataclass deriving from the *roles* below), the functions
the combine calls for its role, and its declarations. The combine order is fixed by stage and, inside a
stage, by the method's ``ORDER``, never by node order (node order carries no meaning; only the extra
terms, which are additive, are summed in chain order):

0. **evaluations** (``EvaluationControl``): which model evaluations run at all (Adaptive Guidance).
1. **the unconditional prediction**: where it comes from (``UncondSource``: ICG, a second model; one of
   them at most) and its rewrites (``UncondRewrite``: the second-model blend, TCFG, CFG-Zero*'s α*),
   applied in ``ORDER`` because they do not commute.
2. **the CFG direction** g = C − U': the band split (``BandSplit``: FDG), the schedule of the weight's
   increment (``IncrementMultiplier``: ``W = 1 + (w − 1)·f``), weight factors (``WeightFactor``: β-CFG,
   S-CFG) and direction transforms (``DirectionTransform``: APG). The formula is in ``combine.py``.
3. **extra terms** (``ExtraTerm``): ``s_t·(C − B)`` for each term's own branch B; additive, in chain order.
4. **output corrections** (``Correction``: Rescale) and steps a method takes over (``StepOverride``:
   CFG-Zero*'s zero-init, ``D̂ = x`` without a model call).

A method declares, as class attributes and small methods of ``PlanMethod``: its ``KEY``, its stage (the
role's) and ``ORDER``, ``SINGLETON`` and ``EXCLUSIVE_GROUP`` (enforced by ``with_method``: a method already
in the plan, or a second one of a group, is a ``PlanError`` naming the node), what it does at cfg 1
(``cfg_one``, ``cfg_one_label``), its windows, its model-dependent resolution (``for_model``) and the
notes the engine logs (``cfg_notes``, ``model_notes``, ``step_notes``, ``run_report``). Every plan query
below iterates the registered methods; none names a method.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, ClassVar, TypeVar

from .progress import StepPosition
from .schedules import Schedule

if TYPE_CHECKING:
    import torch

    from .step import DirectionInputs, GuidanceState, Needs, StepInputs


class PlanError(ValueError):
    """A plan that cannot be built (duplicate method, bad settings); the message names the node."""


BRANCH_SOURCES = ("cond", "uncond")


class BranchEffect:
    """What a branch changes in the model (``Branch.perturbation``): implemented on the ComfyUI side by a method's
    contributor (``nodes/contributors``), frozen and tensor-free like the rest of the plan. The engine and the
    hooks use only this protocol; the defaults mean "nothing special".
    """

    def rows_key(self) -> Hashable:
        """The rows of branches whose effects have equal keys are gathered together (one group per key)."""
        return self

    def rewrite_cond(self, cond: dict) -> dict:
        """The branch's copy of a conditioning entry, before the batched call (e.g. checked or rewritten)."""
        return cond

    def runner(self) -> object | None:
        """None: the branch runs in the batched call. Else an object whose ``run(model, conds, x, sigma,
        model_options)`` evaluates the branch's entries instead (a second model)."""
        return None

    def conditioning_key(self) -> str | None:
        """None: the branch is evaluated with its source's conditioning. Else the key of a conditioning a node
        brought (Perp-Neg's and DNG's negative prompt), which the engine evaluates in the branch's entry instead."""
        return None


@dataclass(frozen=True)
class Branch:
    """An extra model evaluation a method needs, batched with cond and uncond.

    ``source`` names the conditioning it is evaluated with: "cond" (the positive prompt) or "uncond" (the
    negative/empty prompt). ``perturbation`` (a ``BranchEffect``) is applied by the engine's hooks to this
    branch's chunk only; it is opaque here (``None`` = the unperturbed model).
    """

    name: str
    source: str = "cond"
    perturbation: BranchEffect | None = None

    def __post_init__(self) -> None:
        if self.source not in BRANCH_SOURCES:
            raise PlanError(f"branch {self.name!r}: source must be one of {', '.join(BRANCH_SOURCES)} (the prompt's "
                            f"or the negative's conditioning); got {self.source!r}")


class Stage(IntEnum):
    """Where a method acts in one evaluation (see the module docstring)."""

    EVALUATIONS = 0
    UNCOND = 1
    DIRECTION = 2
    EXTRA = 3
    CORRECTION = 4


class CfgOne(Enum):
    """What a method does when the sampler's cfg is 1 (there is no CFG direction)."""

    ACTS = "acts without the uncond"  # extra terms, zero-init
    NEEDS_UNCOND = "acts and needs the uncond"  # ComfyUI must not skip the uncond call (disable_cfg1_optimization)
    REWRITES_UNCOND = "acts where the uncond is evaluated anyway"  # uncond rewrites: CFG++ samplers re-noise with U'
    INACTIVE = "no effect"


@dataclass(frozen=True)
class ExclusiveGroup:
    """Methods of which a plan holds one at most; ``conflict`` is the message, ``{other}`` the method present."""

    name: str
    conflict: str


UNCOND_SOURCE = ExclusiveGroup("uncond source", "the unconditional branch already comes from {other} (an earlier "
                                                "node in the chain); both replace it, so use one of the two.")
FREQUENCY_BANDS = ExclusiveGroup("frequency bands", "the guidance is already split into frequency bands by {other} "
                                                    "(an earlier node in the chain); use one band split.")

Note = tuple[str, str]  # (key, message): the engine logs each key once per sampler call


class PlanMethod:
    """A method of the plan. Subclasses are frozen dataclasses with a ``label`` field (the node's name in
    messages) that derive from one or more roles below; the defaults here declare "nothing special"."""

    KEY: ClassVar[str] = ""
    STAGE: ClassVar[Stage]
    ORDER: ClassVar[int] = 0  # inside the stage (and role): lower first
    SINGLETON: ClassVar[bool] = True  # one per plan; otherwise ``instance_key`` tells the instances apart
    EXCLUSIVE_GROUP: ClassVar[ExclusiveGroup | None] = None
    AT_CFG_ONE: ClassVar[CfgOne] = CfgOne.INACTIVE

    label: str

    def validate(self) -> None:
        """Raise PlanError (or ScheduleError) for settings that cannot act."""

    def instance_key(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} is not a singleton: it must say what tells two apart")

    def identity(self) -> tuple[str, str]:
        return (self.KEY, "" if self.SINGLETON else self.instance_key())

    def cfg_one(self, plan: GuidancePlan) -> CfgOne:
        """What this method does at cfg 1 in ``plan``."""
        return self.AT_CFG_ONE

    def cfg_one_label(self) -> str:
        """How the cfg-1 warning names this method."""
        return self.label

    def windows(self) -> tuple[tuple[str, Schedule], ...]:
        """(label, schedule) of every window a step of the run must reach (checked once per sampler call)."""
        return ()

    def for_model(self, parameterization: str) -> PlanMethod:
        """This method with its model-dependent defaults resolved for a "ve" or "flow" model."""
        return self

    def cfg_notes(self, cond_scale: float) -> list[Note]:
        """Messages about how the sampler's cfg is used (logged once per sampler call)."""
        return []

    def model_notes(self, parameterization: str) -> list[Note]:
        """Messages about the sampled model, for the resolved method (logged once per sampler call)."""
        return []

    def step_notes(self, state: GuidanceState, cond_scale: float) -> list[Note]:
        """Messages from what the method saw in the last evaluation (checked after every combine)."""
        return []

    def run_report(self, state: GuidanceState) -> str:
        """Text appended to the engine's per-run line (model passes), e.g. what Adaptive Guidance stopped."""
        return ""

    def run_finished(self, state: GuidanceState) -> None:
        """Called once after every sampling run with the run's state (Annealing Guidance hands its chosen scales to
        the node's plot); nothing by default."""


# ------------------------------------------------------------------------------------------------
# roles: what the combine calls, stage by stage
# ------------------------------------------------------------------------------------------------

class EvaluationControl(PlanMethod):
    """Stage 0: decides which evaluations run (Adaptive Guidance)."""

    STAGE = Stage.EVALUATIONS

    def limit_evaluations(self, uncond: bool, branches: tuple[Branch, ...],
                          state: GuidanceState) -> tuple[bool, bool, tuple[Branch, ...]]:
        """(uncond, estimate the uncond instead, branches) of this step, from the plan's own wish."""
        return uncond, False, branches

    def stops_branch(self, state: GuidanceState, name: str) -> bool:
        """Whether the branch ``name`` is no longer evaluated in this run (its term is done)."""
        return False

    def prepare_inputs(self, inp: StepInputs, state: GuidanceState) -> StepInputs:
        """The predictions the combine works on (e.g. rows of stopped samples replaced by the cond)."""
        return inp

    def after_evaluation(self, state: GuidanceState, need: Needs, position: StepPosition, x: torch.Tensor, sigma,
                         cond: torch.Tensor, uncond: torch.Tensor | None,
                         branches: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Bookkeeping once the predictions are in; returns an estimated uncond or None."""
        return None


class ConditionTransform(PlanMethod):
    """Stage 0: changes the conditioning the model is evaluated with (CADS). It acts inside the model call,
    through the method's contributor (``nodes/contributors``), which calls ``transform_condition``; the combine
    does not call it."""

    STAGE = Stage.EVALUATIONS
    AT_CFG_ONE = CfgOne.ACTS

    def transform_condition(self, embedding: torch.Tensor, progress: float, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UncondSource(PlanMethod):
    """Stage 1: the unconditional prediction comes from another evaluation (one source per plan)."""

    STAGE = Stage.UNCOND
    EXCLUSIVE_GROUP = UNCOND_SOURCE

    def uncond_source(self, position: StepPosition, sigma: float,
                      uncond: bool) -> tuple[Branch | None, tuple[Branch, ...]]:
        """(the branch the uncond entry is evaluated as, or None; branches to evaluate besides it) at this step;
        ``uncond``: whether the uncond is evaluated at all."""
        raise NotImplementedError

    def uncond_branches(self) -> tuple[Branch, ...]:
        """Every branch this source may use (they feed the uncond, they are not guidance terms)."""
        raise NotImplementedError


class UncondRewrite(PlanMethod):
    """Stage 1: rewrites the unconditional prediction U → U' before the CFG direction is formed."""

    STAGE = Stage.UNCOND

    def rewrite_uncond(self, inp: StepInputs, uncond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class BandSplit(PlanMethod):
    """Stage 2: the direction is guided per band, each with its own base weight (one split per plan)."""

    STAGE = Stage.DIRECTION
    EXCLUSIVE_GROUP = FREQUENCY_BANDS

    def band_weights(self, cond_scale: float) -> tuple[float, ...]:
        raise NotImplementedError

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def merge(self, bands: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class IncrementMultiplier(PlanMethod):
    """Stage 2: ``W = 1 + (w − 1)·f``; at f = 0 the step is conditional-only and the uncond call is skipped."""

    STAGE = Stage.DIRECTION

    def cfg_multiplier(self, position: StepPosition, sigma: float) -> float:
        raise NotImplementedError


class WeightFactor(PlanMethod):
    """Stage 2: multiplies every band's CFG weight (a number, a per-sample or a per-pixel tensor)."""

    STAGE = Stage.DIRECTION

    def scale_weights(self, weights: list, direction: DirectionInputs) -> list:
        raise NotImplementedError


class DirectionTransform(PlanMethod):
    """Stage 2: transforms a band's direction Δ → Δ'; the band is then ``C + (W − 1)·Δ'``."""

    STAGE = Stage.DIRECTION

    def transform_direction(self, direction: torch.Tensor, cond: torch.Tensor, band: int, banded: bool,
                            state: GuidanceState) -> torch.Tensor:
        """``band``: the band's index (0 without a band split); ``banded``: a BandSplit is in the plan."""
        raise NotImplementedError


class ExtraTerm(PlanMethod):
    """Stage 3: an additive term with its own branch evaluation. Not a singleton: one per branch."""

    STAGE = Stage.EXTRA
    SINGLETON = False
    AT_CFG_ONE = CfgOne.ACTS

    def branches_at(self, position: StepPosition, sigma: float) -> tuple[Branch, ...]:
        raise NotImplementedError

    def add_to(self, guided: torch.Tensor, inp: StepInputs, state: GuidanceState,
               plan: GuidancePlan) -> torch.Tensor:
        raise NotImplementedError


class ScheduledExtraTerm(ExtraTerm):
    """An extra term with one branch (``self.branch``), a strength and a :class:`Schedule` (``self.schedule``):
    the branch is evaluated only at the steps where the scheduled strength s_t is not 0."""

    def strength(self) -> float:
        """The term's scale before its schedule (the ``scale`` field unless a method names it otherwise)."""
        return self.scale

    def scale_at(self, position: StepPosition, sigma: float) -> float:
        strength = self.strength()
        if strength == 0:
            return 0.0
        return strength * self.schedule.multiplier(position.progress, sigma)

    def branches_at(self, position: StepPosition, sigma: float) -> tuple[Branch, ...]:
        return (self.branch,) if self.scale_at(position, sigma) != 0.0 else ()

    def windows(self) -> tuple[tuple[str, Schedule], ...]:
        return ((self.label, self.schedule),)


class Correction(PlanMethod):
    """Stage 4: corrects the guided prediction of the whole plan."""

    STAGE = Stage.CORRECTION

    def correct(self, guided: torch.Tensor, inp: StepInputs) -> torch.Tensor:
        raise NotImplementedError


class StepOverride(PlanMethod):
    """Stage 4: on its steps the sample is left where it is (``D̂ = x``) and no model call is made."""

    STAGE = Stage.CORRECTION

    def skips_step(self, position: StepPosition) -> bool:
        raise NotImplementedError


Role = TypeVar("Role", bound=PlanMethod)


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GuidancePlan:
    """The methods on a model, ordered by (stage, ORDER, KEY); extra terms (one KEY) in chain order."""

    methods: tuple[PlanMethod, ...] = ()

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def of(cls, *methods: PlanMethod) -> GuidancePlan:
        plan = cls()
        for method in methods:
            plan = plan.with_method(method)
        return plan

    def with_method(self, method: PlanMethod) -> GuidancePlan:
        """A copy with ``method`` registered; PlanError if it is already there or its group is taken."""
        if not isinstance(method, PlanMethod) or not method.KEY or not hasattr(method, "STAGE"):
            raise PlanError(f"{getattr(method, 'label', method)!r} is not a guidance plan method (a KEY and a role)")
        label = method.label
        if any(m.identity() == method.identity() for m in self.methods):
            raise PlanError(f"{label}: this model already has {label} in its guidance plan (from an earlier node "
                            f"in the chain). Chain each method once; to change its settings, edit that node.")
        group = method.EXCLUSIVE_GROUP
        taken = next((m for m in self.methods if group is not None and m.EXCLUSIVE_GROUP is group), None)
        if taken is not None:
            raise PlanError(f"{label}: " + group.conflict.format(other=taken.label))
        method.validate()
        # stage, ORDER, then KEY (so a plan does not depend on chain order); stable: extra terms keep chain order
        ordered = sorted(self.methods + (method,), key=lambda m: (m.STAGE, m.ORDER, m.KEY))
        return replace(self, methods=tuple(ordered))

    def with_extra(self, term: ExtraTerm) -> GuidancePlan:
        if not isinstance(term, ExtraTerm):
            raise PlanError(f"{getattr(term, 'label', term)!r} is not an extra guidance term")
        return self.with_method(term)

    # --- lookups --------------------------------------------------------------------------------
    def get(self, key: str) -> PlanMethod | None:
        """The (first) method registered under ``key``, or None."""
        return next((m for m in self.methods if m.KEY == key), None)

    def methods_of(self, role: type[Role]) -> tuple[Role, ...]:
        """The methods that play ``role``, in combine order."""
        return tuple(m for m in self.methods if isinstance(m, role))

    @property
    def extra(self) -> tuple[ExtraTerm, ...]:
        return self.methods_of(ExtraTerm)

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.methods]

    @property
    def is_empty(self) -> bool:
        return not self.methods

    @property
    def band_split(self) -> BandSplit | None:
        return next(iter(self.methods_of(BandSplit)), None)

    @property
    def uncond_branch_names(self) -> frozenset[str]:
        """Branches that feed the unconditional prediction (not guidance terms of their own)."""
        return frozenset(b.name for source in self.methods_of(UncondSource) for b in source.uncond_branches())

    # --- per step -------------------------------------------------------------------------------
    def cfg_multiplier(self, position: StepPosition, sigma: float) -> float:
        """f(p) of the CFG increment at this evaluation (1 without a schedule)."""
        multiplier = 1.0
        for method in self.methods_of(IncrementMultiplier):
            multiplier *= method.cfg_multiplier(position, sigma)
        return multiplier

    def skips_step(self, position: StepPosition) -> bool:
        """A step some method takes over: ``D̂ = x`` and no model call (CFG-Zero*'s zero-init)."""
        return any(m.skips_step(position) for m in self.methods_of(StepOverride))

    def branch_stopped(self, state: GuidanceState, name: str) -> bool:
        return any(m.stops_branch(state, name) for m in self.methods_of(EvaluationControl))

    # --- per run --------------------------------------------------------------------------------
    def for_model(self, parameterization: str) -> GuidancePlan:
        """This plan with every method's model-dependent defaults resolved for a model of ``parameterization``
        ("flow" or "ve"), e.g. CFG-Zero*'s automatic zero-init and how Adaptive Guidance reads ε from D."""
        resolved = tuple(m.for_model(parameterization) for m in self.methods)
        if all(a is b for a, b in zip(resolved, self.methods)):
            return self
        return replace(self, methods=resolved)

    @property
    def needs_uncond_at_cfg_one(self) -> bool:
        """Methods that act even at cfg 1 (so ComfyUI must not drop the uncond call there)."""
        return any(m.cfg_one(self) is CfgOne.NEEDS_UNCOND for m in self.methods)

    def inactive_at_cfg_one(self, uncond_evaluated: bool) -> list[str]:
        """Labels of methods that cannot act when the CFG scale is 1 (there is no CFG direction).

        Uncond rewrites (TCFG, CFG-Zero*'s α*) still act at cfg 1 when the uncond is evaluated anyway
        (CFG++ samplers re-noise with it). With a method that needs the uncond at cfg 1 (FDG's absolute
        scales, β-CFG) there is a direction, and every method acts.
        """
        if self.needs_uncond_at_cfg_one:
            return []
        labels = []
        for method in self.methods:
            at_one = method.cfg_one(self)
            if at_one is CfgOne.INACTIVE or (at_one is CfgOne.REWRITES_UNCOND and not uncond_evaluated):
                labels.append(method.cfg_one_label())
        return labels

    def windows(self) -> list[tuple[str, Schedule]]:
        return [window for m in self.methods for window in m.windows()]

    def cfg_notes(self, cond_scale: float) -> list[Note]:
        """(key, message) pairs to log once per sampler call about how the sampler's cfg is used."""
        return _notes(m.cfg_notes(cond_scale) for m in self.methods)

    def model_notes(self, parameterization: str) -> list[Note]:
        return _notes(m.model_notes(parameterization) for m in self.methods)

    def step_notes(self, state: GuidanceState, cond_scale: float) -> list[Note]:
        return _notes(m.step_notes(state, cond_scale) for m in self.methods)

    def run_reports(self, state: GuidanceState) -> list[str]:
        return [text for text in (m.run_report(state) for m in self.methods) if text]

    def run_finished(self, state: GuidanceState) -> None:
        for m in self.methods:
            m.run_finished(state)


def _notes(groups: Iterable[list[Note]]) -> list[Note]:
    return [note for group in groups for note in group]
