"""The plan as a registry: methods declared in their own modules plug into the combine by their role alone."""

from dataclasses import dataclass

import pytest
import torch

from guidance_kit.guiders.combine import GuidanceState, combine, needs
from guidance_kit.guiders.methods.apg import APG
from guidance_kit.guiders.methods.cfg_schedule import CFGSchedule
from guidance_kit.guiders.methods.cfg_zero_star import CFGZeroStar
from guidance_kit.guiders.methods.extra_guidance import ExtraGuidance
from guidance_kit.guiders.methods.fdg import FDG
from guidance_kit.guiders.methods.icg import IndependentCondition
from guidance_kit.guiders.methods.rescale import Rescale
from guidance_kit.guiders.methods.tcfg import TCFG
from guidance_kit.guiders.methods.uncond_model import UncondModel
from guidance_kit.guiders.plan import (
    BandSplit,
    Branch,
    CfgOne,
    DirectionTransform,
    GuidancePlan,
    PlanError,
    Stage,
    UncondRewrite,
    WeightFactor,
)

from .helpers import cfg_reference, position_at, random_triplet, step_inputs


# --- methods a new module could add, without touching the combine ---------------------------------
@dataclass(frozen=True)
class DoubleWeight(WeightFactor):
    KEY = "test_double_weight"
    label: str = "double weight"

    def scale_weights(self, weights, direction):
        return [2.0 * w for w in weights]


@dataclass(frozen=True)
class KeepDirection(DirectionTransform):
    KEY = "test_keep_direction"
    label: str = "keep direction"

    def transform_direction(self, direction, cond, band, banded, state):
        state.method_state[self.KEY] = state.method_state.get(self.KEY, 0) + 1
        return direction


@dataclass(frozen=True)
class UncondIsCond(UncondRewrite):
    KEY = "test_uncond_is_cond"
    AT_CFG_ONE = CfgOne.NEEDS_UNCOND
    label: str = "uncond is cond"

    def rewrite_uncond(self, inp, uncond):
        return inp.cond


@dataclass(frozen=True)
class WholeBand(BandSplit):
    KEY = "test_whole_band"
    label: str = "whole band"

    def band_weights(self, cond_scale):
        return (cond_scale,)

    def split(self, t):
        return [t]

    def merge(self, bands):
        return bands[0]


def test_a_new_weight_factor_plugs_in_by_its_role():
    x, c, u = random_triplet()
    got = combine(GuidancePlan.of(DoubleWeight()), step_inputs(x, c, u, cond_scale=3.0), GuidanceState())[0]
    assert torch.allclose(got, cfg_reference(c, u, 6.0), atol=1e-5)


def test_a_new_direction_transform_plugs_in_by_its_role():
    x, c, u = random_triplet()
    state = GuidanceState()
    got = combine(GuidancePlan.of(KeepDirection()), step_inputs(x, c, u, cond_scale=4.0), state)[0]
    assert torch.allclose(got, cfg_reference(c, u, 4.0), atol=1e-5)  # C + (w − 1)·g = U + w·g
    assert state.method_state[KeepDirection.KEY] == 1


def test_a_new_uncond_rewrite_plugs_in_and_declares_cfg_one():
    x, c, u = random_triplet()
    plan = GuidancePlan.of(UncondIsCond())
    guided, handed = combine(plan, step_inputs(x, c, u, cond_scale=7.0), GuidanceState())
    assert torch.allclose(guided, c) and torch.equal(handed, c)
    assert plan.needs_uncond_at_cfg_one and plan.inactive_at_cfg_one(False) == []


def test_methods_run_in_stage_order_whatever_the_chain_order():
    chain = [Rescale(), ExtraGuidance(Branch("b"), 1.0, label="term"), APG(), FDG(), CFGSchedule(), TCFG(),
             CFGZeroStar(True, 0), UncondModel(Branch("other", "uncond"), 0.5, label="prior")]
    plan = GuidancePlan.of(*chain)
    assert [m.STAGE for m in plan.methods] == sorted(m.STAGE for m in chain)
    assert plan.labels[:3] == ["prior", "TCFG", "CFG-Zero*"]  # stage 1 in ORDER: blend, TCFG, α*
    assert plan.labels[-2:] == ["term", "Rescale"] and plan.methods[-1].STAGE == Stage.CORRECTION
    assert GuidancePlan.of(*reversed(chain)) == plan


def test_singletons_groups_and_extra_terms():
    plan = GuidancePlan.of(FDG())
    with pytest.raises(PlanError, match="already split into frequency bands by FDG"):
        plan.with_method(WholeBand())
    two_terms = GuidancePlan.of(ExtraGuidance(Branch("a"), 1.0), ExtraGuidance(Branch("b"), 1.0))
    assert len(two_terms.extra) == 2 and two_terms.get("extra") is two_terms.extra[0]
    with pytest.raises(PlanError, match="already has"):
        two_terms.with_extra(ExtraGuidance(Branch("a"), 2.0))
    with pytest.raises(PlanError, match="not an extra guidance term"):
        GuidancePlan().with_extra(APG())
    with pytest.raises(PlanError, match="source"):
        Branch("x", source="an extra conditioning")


def test_uncond_sources_name_the_uncond_entry_and_their_branches():
    icg = IndependentCondition(Branch("ICG"))
    plan = GuidancePlan.of(icg, ExtraGuidance(Branch("pag"), 2.0))
    need = needs(plan, position_at(2.0, 10), 1.0)
    assert need.uncond_branch == icg.branch and need.branches == (Branch("pag"),)
    assert plan.uncond_branch_names == {"ICG"}
    prior = UncondModel(Branch("prior", "uncond"), 0.5)
    assert needs(GuidancePlan.of(prior), position_at(2.0, 10), 1.0).branches == (prior.branch,)


def test_the_plan_resolves_and_reports_from_its_methods():
    plan = GuidancePlan.of(CFGZeroStar(), FDG(scales=(5.0, 3.0)))
    eps = plan.for_model("ve")
    assert eps.get("cfg_zero_star").zero_init_steps == 0 and eps.model_notes("ve") == []
    assert plan.for_model("flow").get("cfg_zero_star").zero_init_steps == 1
    assert eps.for_model("ve") is eps  # nothing left to resolve
    explicit = GuidancePlan.of(CFGZeroStar(True, 2))
    [(key, note)] = explicit.model_notes("ve")
    assert key == "zero-init-eps" and "CFG-Zero*" in note and explicit.model_notes("flow") == []
    assert [key for key, _ in plan.cfg_notes(7.0)] == ["fdg-ignores-cfg"]
