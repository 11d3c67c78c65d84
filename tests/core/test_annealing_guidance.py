"""Annealing Guidance (Yehezkel et al., arXiv 2506.24108): the policy network (the authors' ScalarMLP layout), the
per-sample, per-step scale it hands the combine, the shipped digits policy's λ behaviour, and the policy files
(safetensors, the authors' checkpoint through torch.load(weights_only=True), refusals)."""

import copy
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from guidance_kit.guiders.combine import GuidanceState, combine
from guidance_kit.guiders.methods.annealing_guidance import (
    CONFIG_METADATA_KEY,
    STATE_KEY,
    AnnealingGuidance,
    GuidanceScalePolicy,
    PolicyFileError,
    SharedPolicy,
    load_policy,
    noise_difference_norm,
    save_policy,
    timestep_of_sigma,
)
from guidance_kit.guiders.methods.fdg import FDG
from guidance_kit.guiders.plan import GuidancePlan, PlanError

from .gmm import GaussianMixture, karras_sigmas
from .helpers import cfg_reference, sample_plan, step_inputs

DIGITS_POLICY = Path(__file__).resolve().parents[2] / "digits" / "weights" / "digits_guidance_policy.safetensors"
CONFIG = dict(hidden_size=8, n_layers=1, output_size=1, t_embed_dim=3, delta_embed_dim=4, lambda_embed_dim=2,
              t_embed_normalization=1e3, delta_embed_normalization=5.0, w_bias=1.5, w_scale=2.0)
TABLE = ((0.03, 0.0), (14.6, 999.0))


def random_policy(seed=0) -> GuidanceScalePolicy:
    torch.manual_seed(seed)
    return GuidanceScalePolicy(**CONFIG).eval()


def reference_scale(policy, t, delta_norm, lam):
    """The authors' forward written out: features [v, cos(v), cos(2v), …] per input, the head, w_scale, w_bias."""
    def embed(v, n):
        return [v] + [math.cos(v * k) for k in range(1, n)]

    h = torch.tensor(embed(t / 1e3, 3) + embed(delta_norm / 5.0, 4) + embed(lam, 2))
    layers = [m for m in policy.combined_head if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            h = layer(h)
            if i < len(layers) - 1:
                h = torch.relu(h)
    return float(2.0 * h[0] + 1.5)


def test_the_policy_is_the_authors_formula_per_sample():
    policy = random_policy()
    norms = torch.tensor([0.5, 3.0, 12.0])
    lams = torch.tensor([0.0, 0.5, 1.0])
    out = policy(torch.tensor([10.0, 500.0, 990.0]), norms, lams)
    assert out.shape == (3,)
    for i, (t, n, lam) in enumerate(zip((10.0, 500.0, 990.0), norms.tolist(), lams.tolist())):
        assert out[i].item() == pytest.approx(reference_scale(policy, t, n, lam), rel=1e-5, abs=1e-5)
    assert policy(250.0, norms, 0.3).shape == (3,)  # numbers broadcast over the batch
    assert set(policy.state_dict()) == {f"combined_head.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}


@pytest.mark.parametrize("parameterization", ["ve", "flow"])
def test_noise_difference_norm_from_x0_predictions(parameterization):
    g = torch.Generator().manual_seed(3)
    x, c, u = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([0.5, 2.0]) if parameterization == "ve" else torch.tensor([0.3, 0.8])
    s = sigma.view(-1, 1, 1, 1)
    if parameterization == "ve":
        eps_c, eps_u = (x - c) / s, (x - u) / s
    else:  # x = (1 − σ)·x0 + σ·ε
        eps_c, eps_u = (x - (1 - s) * c) / s, (x - (1 - s) * u) / s
    expected = (eps_u - eps_c).flatten(1).norm(dim=1)
    assert torch.allclose(noise_difference_norm(c, u, sigma, parameterization == "flow"), expected, rtol=1e-5)


def test_timestep_table_interpolates_in_log_sigma():
    assert timestep_of_sigma(0.01, TABLE) == 0.0 and timestep_of_sigma(100.0, TABLE) == 999.0
    middle = math.exp((math.log(0.03) + math.log(14.6)) / 2)
    assert timestep_of_sigma(middle, TABLE) == pytest.approx(499.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 16, 2, 4, 4)])
def test_the_step_is_cfg_at_the_policys_scale_per_sample(dtype, shape):
    policy = random_policy(1)
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    u = c + torch.randn(shape, generator=g) * torch.tensor([0.1, 1.0, 3.0]).view(-1, *[1] * (len(shape) - 1))
    x, c, u = x.to(dtype), c.to(dtype), u.to(dtype)
    method = AnnealingGuidance(SharedPolicy(policy, "random"), 0.7, TABLE)
    state = GuidanceState()
    out = combine(GuidancePlan.of(method), step_inputs(x, c, u, sigma=2.0, cond_scale=9.0), state)[0]
    norms = noise_difference_norm(c.float(), u.float(), torch.full((3,), 2.0), False)
    w = policy(timestep_of_sigma(2.0, TABLE), norms, 0.7)
    expected = torch.stack([cfg_reference(c[i].float(), u[i].float(), float(w[i])) for i in range(3)])
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(out.float(), expected, atol=tolerance, rtol=tolerance)
    logged = state.method_state[STATE_KEY]
    assert len(logged) == 1 and len(set(logged[0].scales)) == 3  # one scale per sample: the ones the step used
    assert torch.allclose(torch.tensor(logged[0].scales), w.float()) and torch.allclose(torch.tensor(
        logged[0].delta_norms), norms)
    assert "chosen scale w_t per step" in method.run_report(state)


def test_runs_on_the_mixture_and_logs_every_step():
    gmm = GaussianMixture(torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 1.5, std=0.4)
    sigmas = karras_sigmas(8)
    method = AnnealingGuidance(SharedPolicy(random_policy(2), "random"), 0.5, TABLE)
    out, den = sample_plan(GuidancePlan.of(method), gmm, 1, 1.0, sigmas, n=6)
    assert torch.isfinite(out).all()
    assert len(den.state.method_state[STATE_KEY]) == len(sigmas) - 1


def test_the_end_of_run_hook_publishes_the_logged_scales():
    gmm = GaussianMixture(torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 1.5, std=0.4)
    sigmas = karras_sigmas(6)
    published = []
    plan = GuidancePlan.of(AnnealingGuidance(SharedPolicy(random_policy(2), "random"), 0.4, TABLE,
                                             publish=published.append))
    _, den = sample_plan(plan, gmm, 1, 1.0, sigmas, n=4)
    plan.run_finished(den.state)
    (payload,) = published
    log = den.state.method_state[STATE_KEY]
    assert payload["policy"] == "random" and payload["lambda"] == 0.4 and len(payload["steps"]) == len(log) == 6
    for entry, logged in zip(payload["steps"], log):
        assert entry["mean"] == pytest.approx(sum(logged.scales) / 4) and entry["sigma"] == logged.sigma
        assert (entry["min"], entry["max"]) == (min(logged.scales), max(logged.scales))
        assert entry["delta_norm"] == pytest.approx(sum(logged.delta_norms) / 4)
    assert [e["sigma"] for e in payload["steps"]] == pytest.approx([float(s) for s in sigmas[:-1]])
    # a method without a publisher, or a run without scales, sends nothing
    GuidancePlan.of(AnnealingGuidance(SharedPolicy(random_policy(2), "random"), 0.4, TABLE)).run_finished(den.state)
    plan.run_finished(GuidanceState())
    assert len(published) == 1


def shipped_policy() -> GuidanceScalePolicy:
    if not DIGITS_POLICY.is_file():
        pytest.fail(f"the shipped digits policy is missing: {DIGITS_POLICY}")
    return load_policy(DIGITS_POLICY)


def test_the_shipped_digits_policy_gives_larger_scales_for_larger_lambda():
    """The paper's λ: 0 weighs the noise-prediction error only, 1 the agreement of the next step's predictions
    (adherence); the mean scale over a trajectory's (t, ‖δ‖) grows with λ, and stays in a sane range."""
    policy = shipped_policy()
    t = torch.linspace(20, 980, 25).repeat_interleave(8)
    norms = torch.linspace(0.5, 40.0, 8).repeat(25)
    means = [float(policy(t, norms, lam).mean()) for lam in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert 0.0 < means[0] and means[-1] < 20.0, means


def test_policy_files_round_trip_and_the_authors_checkpoint_loads(tmp_path):
    policy = random_policy(4)
    norms, t = torch.tensor([1.0, 7.0]), torch.tensor([100.0, 700.0])
    saved = load_policy(save_policy(tmp_path / "p.safetensors", policy))
    assert torch.allclose(saved(t, norms, 0.4), policy(t, norms, 0.4))
    # the authors' checkpoint: {"config": {..., "guidance_scale_model": {...}}, "guidance_scale_model": state}
    authors = {"config": {"seed": 0, "guidance_scale_model": {**CONFIG, "scheduler": None}},
               "guidance_scale_model": policy.state_dict()}
    torch.save(authors, tmp_path / "checkpoint.pt")
    loaded = load_policy(tmp_path / "checkpoint.pt")
    assert torch.allclose(loaded(t, norms, 0.4), policy(t, norms, 0.4))


class NotATensor:
    pass


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(PolicyFileError, match="no policy file"):
        load_policy(tmp_path / "missing.pt")
    with open(tmp_path / "pickled.pt", "wb") as f:
        pickle.dump({"config": {}, "guidance_scale_model": NotATensor()}, f)
    with pytest.raises(PolicyFileError, match=r"cannot be loaded safely with torch.load\(weights_only=True\)"):
        load_policy(tmp_path / "pickled.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(PolicyFileError, match="not an annealing-guidance checkpoint"):
        load_policy(tmp_path / "other.pt")
    save_file({"combined_head.0.weight": torch.zeros(2, 2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(PolicyFileError, match="convert the authors' checkpoint"):
        load_policy(tmp_path / "bare.safetensors")
    save_file({"combined_head.0.weight": torch.zeros(2, 2)}, str(tmp_path / "wrong.safetensors"),
              {CONFIG_METADATA_KEY: json.dumps(CONFIG)})
    with pytest.raises(PolicyFileError, match="do not fit the configuration"):
        load_policy(tmp_path / "wrong.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(PolicyFileError, match="not a readable safetensors file"):
        load_policy(tmp_path / "junk.safetensors")
    torch.save({"config": {"guidance_scale_model": {**CONFIG, "output_size": 3}},
                "guidance_scale_model": {}}, tmp_path / "multi.pt")
    with pytest.raises(PolicyFileError, match="only one-scale policies"):
        load_policy(tmp_path / "multi.pt")


def test_conversion_of_an_authors_checkpoint(tmp_path):
    from guidance_kit.digits.train_guidance_policy import convert_checkpoint

    policy = random_policy(5)
    torch.save({"config": {"guidance_scale_model": CONFIG}, "guidance_scale_model": policy.state_dict()},
               tmp_path / "checkpoint.pt")
    out = convert_checkpoint(tmp_path / "checkpoint.pt", tmp_path / "converted.safetensors")
    assert torch.allclose(load_policy(out)(300.0, torch.tensor([2.0]), 0.5), policy(300.0, torch.tensor([2.0]), 0.5))


def test_bad_settings_are_refused():
    shared = SharedPolicy(random_policy(), "random")
    with pytest.raises(PlanError, match=r"λ must lie in \[0, 1\]"):
        GuidancePlan.of(AnnealingGuidance(shared, 1.5, TABLE))
    with pytest.raises(PlanError, match="no guidance-scale policy"):
        GuidancePlan.of(AnnealingGuidance(None, 0.5, TABLE))
    with pytest.raises(PlanError, match="sorted by σ"):
        GuidancePlan.of(AnnealingGuidance(shared, 0.5, ((2.0, 1.0), (1.0, 0.0))))
    x, c, u = (torch.randn(1, 1, 8, 8) for _ in range(3))
    with pytest.raises(PlanError, match="cannot follow a band split"):
        combine(GuidancePlan.of(AnnealingGuidance(shared, 0.5, TABLE), FDG()), step_inputs(x, c, u), GuidanceState())


def test_plan_copies_share_the_policy_and_it_acts_at_cfg_one():
    shared = SharedPolicy(random_policy(), "random")
    plan = GuidancePlan.of(AnnealingGuidance(shared, 0.5, TABLE))
    assert copy.deepcopy(plan).methods[0].policy is shared
    assert plan.needs_uncond_at_cfg_one and plan.inactive_at_cfg_one(uncond_evaluated=True) == []
