"""Second-model terms on exact Gaussian-mixture denoisers (issue 8).

Unconditional priors: a "fine-tuned" model whose own unconditional prediction has collapsed onto its
class (the paper's observation) gives CFG almost no direction; taking the uncond from the base model
(the exact mixture's uncond) restores it, measurably. Autoguidance: guiding away from a weaker
(wider) version of the class denoiser concentrates the samples. Plus the plan rules: one uncond
source, β = 1 replaces the uncond entry (no extra call), 0 < β < 1 blends, windows cost nothing.
"""

import pytest
import torch

from guidance_kit.guiders.combine import combine, needs
from guidance_kit.guiders.methods.extra_guidance import ExtraGuidance
from guidance_kit.guiders.methods.icg import IndependentCondition
from guidance_kit.guiders.methods.uncond_model import UncondModel
from guidance_kit.guiders.plan import Branch, GuidancePlan, PlanError
from guidance_kit.guiders.schedules import Schedule, Window

from .gmm import GaussianMixture, euler_sample, karras_sigmas
from .helpers import PlanDenoiser, percent_convention, position_at, step_inputs

SHAPE = (2, 8, 8)
PRIOR = Branch("UnconditionalPrior", source="uncond", perturbation="base model")


@pytest.fixture(scope="module")
def mixtures():
    g = torch.Generator().manual_seed(7)
    directions = torch.randn((3,) + SHAPE, generator=g, dtype=torch.float64)
    directions = directions / directions.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    means = 1.1 * directions
    base = GaussianMixture(means, std=1.0)
    # the fine-tune's unconditional prediction: collapsed onto the class it was tuned on (label 0)
    degraded = GaussianMixture(means, std=1.0, weights=torch.tensor([0.96, 0.02, 0.02]))
    return base, degraded


class TwoModelDenoiser(PlanDenoiser):
    """PlanDenoiser whose uncond is the fine-tune's (degraded) one, with the second model's branches."""

    def __init__(self, *args, own_uncond=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.own_uncond = own_uncond

    def __call__(self, x, sigma, step=None):
        from guidance_kit.guiders.combine import StepInputs
        from guidance_kit.guiders.progress import step_position

        s = float(sigma.reshape(-1)[0])
        position = step_position(self.sigmas, s, percent_convention(self.parameterization))
        need = needs(self.plan, position, s, self.state)
        cond = self.gmm.denoise_cond(x, sigma, self.label, self.parameterization)
        self.calls["cond"] += 1
        uncond = None
        if need.uncond:
            if need.uncond_branch is not None:
                uncond = self.branch_fns[need.uncond_branch.name](x, sigma)
                self.calls["branches"] += 1
            else:
                uncond = self.own_uncond(x, sigma, self.parameterization)
                self.calls["uncond"] += 1
        branches = {}
        for b in need.branches:
            branches[b.name] = self.branch_fns[b.name](x, sigma)
            self.calls["branches"] += 1
        inp = StepInputs(x=x, sigma=sigma, cond_scale=self.cond_scale, position=position,
                         parameterization=self.parameterization, cond=cond, uncond=uncond, branches=branches)
        return combine(self.plan, inp, self.state)[0]


def run(plan, base, degraded, w, sigmas, n=1024, label=0, weak=None):
    noise = torch.randn((n,) + base.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fns = {"UnconditionalPrior": lambda x, s: base.denoise_uncond(x, s, "ve")}
    if weak is not None:
        fns["Autoguidance"] = lambda x, s: weak.denoise_cond(x, s, label, "ve")
    den = TwoModelDenoiser(plan, base, label, w, sigmas, "ve", branch_fns=fns, own_uncond=degraded.denoise_uncond)
    return euler_sample(den, noise, sigmas, "ve"), den


def adherence(gmm, samples, label=0):
    return (gmm.classify(samples) == label).double().mean().item()


def test_uncond_from_the_base_prior_beats_the_degraded_uncond(mixtures):
    base, degraded = mixtures
    sigmas = karras_sigmas(30)
    w = 4.0
    own, d_own = run(GuidancePlan(), base, degraded, w, sigmas)
    plan = GuidancePlan().with_method(UncondModel(PRIOR, label="Unconditional Prior"))
    prior, d_prior = run(plan, base, degraded, w, sigmas)
    exact_cfg, _ = run(GuidancePlan(), base, base, w, sigmas)
    acc_own, acc_prior, acc_exact = adherence(base, own), adherence(base, prior), adherence(base, exact_cfg)
    # the collapsed uncond ≈ cond: CFG barely acts; the base prior gives CFG its direction back
    assert acc_prior > acc_own + 0.1
    assert acc_prior == pytest.approx(acc_exact, abs=1e-9)  # β = 1 is exactly CFG with the base's uncond
    # β = 1 costs nothing extra: the uncond call moved to the prior model
    assert d_prior.calls["uncond"] == 0 and d_prior.calls["branches"] == len(sigmas) - 1
    assert d_own.calls["uncond"] == len(sigmas) - 1


def test_partial_scale_blends_the_two_unconds(mixtures):
    base, degraded = mixtures
    sigmas = karras_sigmas(20)
    accs = []
    for beta in (0.0, 0.5, 1.0):
        plan = GuidancePlan().with_method(UncondModel(PRIOR, scale=beta))
        samples, den = run(plan, base, degraded, 4.0, sigmas, n=512)
        accs.append(adherence(base, samples))
        if beta == 0.5:
            assert den.calls["uncond"] == den.calls["branches"] == len(sigmas) - 1
    assert accs[0] < accs[1] < accs[2]


def test_blend_formula_and_substitution():
    x = torch.randn(1, 4, 8, 8)
    cond, own, other = torch.randn(3, 1, 4, 8, 8).unbind(0)
    for beta in (0.25, 0.5):
        plan = GuidancePlan().with_method(UncondModel(PRIOR, scale=beta))
        inp = step_inputs(x, cond, own, cond_scale=3.0, branches={PRIOR.name: other})
        guided, uncond_out = combine(plan, inp, None)
        u = own + beta * (other - own)
        assert torch.allclose(uncond_out, u, atol=1e-6)
        assert torch.allclose(guided, u + 3.0 * (cond - u), atol=1e-5)
    plan = GuidancePlan().with_method(UncondModel(PRIOR))
    need = needs(plan, position_at(0.0, 10), 5.0)
    assert need.uncond and need.uncond_branch == PRIOR and PRIOR not in need.branches


def test_window_and_schedule_gate_the_second_model():
    plan = GuidancePlan().with_method(
        UncondModel(PRIOR, schedule=Schedule(window=Window(start=0.5, end=1.0)), label="UP"))
    early = needs(plan, position_at(1.0, 10), 5.0)
    late = needs(plan, position_at(8.0, 10), 0.5)
    assert early.uncond_branch is None and not early.branches  # the sampled model's own uncond
    assert late.uncond_branch == PRIOR
    assert ("UP", plan.get("uncond_model").schedule) in plan.windows()
    assert "UP" in plan.inactive_at_cfg_one(uncond_evaluated=False)


def test_one_uncond_source_only():
    icg = IndependentCondition(Branch("ICG", source="cond", perturbation="random"))
    plan = GuidancePlan().with_method(icg)
    with pytest.raises(PlanError, match="already comes from ICG"):
        plan.with_method(UncondModel(PRIOR, label="Diffusion-NPO"))
    plan = GuidancePlan().with_method(UncondModel(PRIOR, label="Diffusion-NPO"))
    with pytest.raises(PlanError, match="Diffusion-NPO"):
        plan.with_method(icg)
    with pytest.raises(PlanError, match="source"):
        GuidancePlan().with_method(UncondModel(Branch("x", source="cond")))
    with pytest.raises(PlanError, match="scale"):
        GuidancePlan().with_method(UncondModel(PRIOR, scale=-1.0))


def test_autoguidance_concentrates_on_the_class(mixtures):
    base, degraded = mixtures
    sigmas = karras_sigmas(30)
    weak = GaussianMixture(base.means, std=1.6)  # a "bad version" of the class model: too wide
    term = ExtraGuidance(Branch("Autoguidance", source="cond", perturbation="weak model"), scale=1.5,
                         label="Autoguidance")
    plain, _ = run(GuidancePlan(), base, degraded, 1.0, sigmas, weak=weak)
    guided, den = run(GuidancePlan().with_extra(term), base, degraded, 1.0, sigmas, weak=weak)
    dist = lambda s: (s - base.means[0]).flatten(1).norm(dim=1).mean().item()  # noqa: E731
    assert dist(guided) < dist(plain) - 0.1  # closer to the class centre (sharper), as the paper
    assert adherence(base, guided) > adherence(base, plain)
    assert den.calls["branches"] == len(sigmas) - 1  # one weak-model call per step


def test_an_uncond_from_another_model_is_reported_inactive_at_cfg_one():
    """At cfg 1 the uncond is not evaluated, so a second-model uncond changes nothing: the engine's cfg-1 warning
    must name it (Autoguidance, an extra term, acts at cfg 1 and is not named)."""
    plan = GuidancePlan().with_method(UncondModel(PRIOR, label="Unconditional Prior"))
    assert "Unconditional Prior" in plan.inactive_at_cfg_one(uncond_evaluated=False)
    weak = ExtraGuidance(Branch("Autoguidance", source="cond", perturbation="weak model"), scale=1.0,
                         label="Autoguidance")
    assert GuidancePlan().with_extra(weak).inactive_at_cfg_one(uncond_evaluated=False) == []
