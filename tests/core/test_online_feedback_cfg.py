"""Online Feedback CFG (Papalampidi et al., arXiv 2509.16131): candidates from one cond/uncond pair, the greedy choice,
the budget and window, and the weight it hands the combine (exact mixture denoisers and random tensors)."""

import copy

import pytest
import torch

from guidance_kit.guiders.combine import GuidanceState, combine
from guidance_kit.guiders.methods.fdg import FDG
from guidance_kit.guiders.methods.online_feedback_cfg import (
    CONTEXT_KEY,
    STATE_KEY,
    CandidateEvaluator,
    OnlineFeedbackCFG,
    candidate_predictions,
    choose,
)
from guidance_kit.guiders.plan import GuidancePlan, PlanError

from .gmm import GaussianMixture, karras_sigmas
from .helpers import cfg_reference, sample_plan, step_inputs


class TargetEvaluator(CandidateEvaluator):
    """Scores −‖x0 − target‖² (the closest candidate to a known target wins); records what it saw."""

    name = "target"

    def __init__(self, target: torch.Tensor, needs=()):
        self.target, self._needs, self.calls = target, frozenset(needs), []

    def needs(self):
        return self._needs

    def score(self, candidates, context):
        self.calls.append((candidates.shape, dict(context)))
        return -(candidates.double() - self.target.double()).flatten(2).square().sum(-1)


def test_choose_is_the_smallest_candidate_within_the_tolerance():
    scores = torch.tensor([[0.0, 5.0, 1.0], [1.0, 4.9, 1.0], [2.0, 0.0, 1.0]])  # [K = 3, B = 3]
    candidates = (1.0, 3.0, 5.0)
    assert choose(scores, candidates, 0.0).tolist() == [5.0, 1.0, 1.0]  # ties go to the smaller scale
    assert choose(scores, candidates, 0.2).tolist() == [5.0, 1.0, 1.0]
    assert choose(scores, candidates, 1.0).tolist() == [3.0, 1.0, 1.0]
    assert choose(scores[[2, 0, 1]], (5.0, 1.0, 3.0), 0.0).tolist() == [5.0, 1.0, 1.0]  # order of the list is free
    assert choose(torch.tensor([[float("nan")], [0.0]]), (1.0, 2.0), 0.0).tolist() == [2.0]


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 16, 3, 8, 8)])
def test_candidates_are_cfg_of_the_same_pair(shape):
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    cands = candidate_predictions(c, u, (1.0, 4.0))
    assert cands.shape == (2,) + shape
    assert torch.allclose(cands[0], c, atol=1e-6) and torch.allclose(cands[1], cfg_reference(c, u, 4.0), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_chosen_scale_is_cfg_at_that_scale_per_sample(dtype):
    g = torch.Generator().manual_seed(1)
    x, c, u = (torch.randn(3, 4, 8, 8, generator=g).to(dtype) for _ in range(3))
    # the target of sample i is CFG at scale (1, 3, 5)[i]: the evaluator must pick exactly that
    target = torch.stack([cfg_reference(c[i].float(), u[i].float(), w) for i, w in enumerate((1.0, 3.0, 5.0))])
    evaluator = TargetEvaluator(target)
    method = OnlineFeedbackCFG(evaluator, (1.0, 3.0, 5.0, 7.0))
    state = GuidanceState()
    out = combine(GuidancePlan.of(method), step_inputs(x, c, u, cond_scale=9.0), state)[0]
    assert out.dtype == dtype
    assert torch.allclose(out.float(), target, atol=1e-5, rtol=1e-2 if dtype != torch.float32 else 1e-5)
    assert state.method_state[STATE_KEY].chosen.tolist() == [1.0, 3.0, 5.0]
    assert evaluator.calls[0][0] == (4, 3, 4, 8, 8)  # K × B candidates in one call


def test_budget_window_and_the_kept_scale_on_the_mixture():
    gmm = GaussianMixture(torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 1.5, std=0.4)
    sigmas = karras_sigmas(10)
    evaluator = TargetEvaluator(torch.zeros(1, 1, 4, 4))
    method = OnlineFeedbackCFG(evaluator, (1.0, 2.0, 4.0), start_percent=0.0, end_percent=1.0, budget=3)
    _, den = sample_plan(GuidancePlan.of(method), gmm, 1, 4.0, sigmas, n=4)
    record = den.state.method_state[STATE_KEY]
    assert record.evaluations == 3 and len(evaluator.calls) == 3 and len(record.log) == 3
    assert [entry[0] for entry in record.log] == [0.0, 1.0, 2.0]  # the first steps of the window
    # before the window nothing is evaluated and the sampler's cfg is used: the first steps are CFG's
    late = OnlineFeedbackCFG(TargetEvaluator(torch.zeros(1, 1, 4, 4)), (1.0, 2.0), start_percent=0.5,
                             end_percent=1.0, budget=2)
    plain, _ = sample_plan(GuidancePlan(), gmm, 1, 4.0, sigmas[:4], n=4)
    head, _ = sample_plan(GuidancePlan.of(late), gmm, 1, 4.0, sigmas[:4], n=4)
    _, den = sample_plan(GuidancePlan.of(late), gmm, 1, 4.0, sigmas, n=4)
    assert torch.equal(head, plain)
    first = den.state.method_state[STATE_KEY].log[0][0]
    assert first >= 3 and den.state.method_state[STATE_KEY].evaluations == 2


def test_the_evaluator_gets_the_conditioning_context_and_missing_context_is_an_error():
    x, c, u = (torch.randn(2, 1, 8, 8) for _ in range(3))
    evaluator = TargetEvaluator(torch.zeros(1, 1, 8, 8), needs={"classes"})
    plan = GuidancePlan.of(OnlineFeedbackCFG(evaluator, (1.0, 2.0)))
    with pytest.raises(PlanError, match="Online Feedback CFG: the target evaluator needs classes"):
        combine(plan, step_inputs(x, c, u), GuidanceState())
    state = GuidanceState()
    state.method_state[CONTEXT_KEY] = {"classes": torch.tensor([4, 7])}
    combine(plan, step_inputs(x, c, u, sigma=2.5), state)
    assert evaluator.calls[-1][1]["classes"].tolist() == [4, 7] and evaluator.calls[-1][1]["sigma"] == 2.5


def test_bad_settings_and_bad_evaluators_are_refused():
    evaluator = TargetEvaluator(torch.zeros(1))
    with pytest.raises(PlanError, match="at least two candidate"):
        GuidancePlan.of(OnlineFeedbackCFG(evaluator, (3.0,)))
    with pytest.raises(PlanError, match="no evaluator"):
        GuidancePlan.of(OnlineFeedbackCFG(None))
    with pytest.raises(PlanError, match="evaluation window"):
        GuidancePlan.of(OnlineFeedbackCFG(evaluator, start_percent=0.8, end_percent=0.2))
    x, c, u = (torch.randn(1, 1, 8, 8) for _ in range(3))
    with pytest.raises(PlanError, match="cannot follow a band split"):
        combine(GuidancePlan.of(OnlineFeedbackCFG(evaluator), FDG()), step_inputs(x, c, u), GuidanceState())

    class WrongShape(CandidateEvaluator):
        name = "wrong"

        def score(self, candidates, context):
            return torch.zeros(1)

    with pytest.raises(PlanError, match="returned scores of shape"):
        combine(GuidancePlan.of(OnlineFeedbackCFG(WrongShape())), step_inputs(x, c, u), GuidanceState())


def test_plan_copies_share_the_evaluator():
    evaluator = TargetEvaluator(torch.zeros(1))
    plan = GuidancePlan.of(OnlineFeedbackCFG(evaluator))
    assert copy.deepcopy(plan).methods[0].evaluator is evaluator


def test_it_acts_at_cfg_one():
    plan = GuidancePlan.of(OnlineFeedbackCFG(TargetEvaluator(torch.zeros(1))))
    assert plan.needs_uncond_at_cfg_one and plan.inactive_at_cfg_one(uncond_evaluated=True) == []
