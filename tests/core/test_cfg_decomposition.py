"""CFG Decomposition (Li, Wang, Qu, arXiv 2505.19210) against the closed forms of linear (Gaussian) denoisers and
on the exact Gaussian mixture."""

import pytest
import torch

from guidance_kit.guiders.combine import GuidanceState, combine
from guidance_kit.guiders.methods.cfg_decomposition import (
    CLASSES_KEY,
    NORMS_KEY,
    CFGDecomposition,
    LinearStatistics,
    StatisticsError,
    decompose,
    linear_denoiser,
    reweighted_direction,
)
from guidance_kit.guiders.methods.fdg import FDG
from guidance_kit.guiders.plan import GuidancePlan, PlanError

from .gmm import GaussianMixture, karras_sigmas
from .helpers import cfg_reference, sample_plan, step_inputs

D = 12
K = 3


def random_statistics(seed: int = 0, dims: int = D, classes: int = K) -> LinearStatistics:
    g = torch.Generator().manual_seed(seed)

    def spd():
        a = torch.randn(dims, dims, generator=g, dtype=torch.float64)
        return a @ a.T / dims + 0.05 * torch.eye(dims, dtype=torch.float64)

    means = torch.randn(classes, dims, generator=g, dtype=torch.float64)
    return LinearStatistics(means, torch.stack([spd() for _ in range(classes)]), means.mean(0), spd())


def gain_by_solve(cov: torch.Tensor, sigma: float) -> torch.Tensor:
    """W = Σ(Σ + σ²I)⁻¹ by a linear solve (independent of the eigendecomposition the method uses)."""
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    return torch.linalg.solve(cov + sigma ** 2 * eye, cov).T


def mixture_statistics(gmm: GaussianMixture) -> LinearStatistics:
    """The exact per-class Gaussians of the mixture and the mixture's own mean and covariance."""
    means = gmm.means.flatten(1)
    dims = means.shape[1]
    eye = torch.eye(dims, dtype=torch.float64)
    mean = (gmm.weights[:, None] * means).sum(0)
    spread = means - mean
    cov = gmm.std ** 2 * eye + (gmm.weights[:, None, None] * spread[:, :, None] * spread[:, None, :]).sum(0)
    return LinearStatistics(means, (gmm.std ** 2 * eye).expand(means.shape[0], -1, -1).clone(), mean, cov)


@pytest.fixture
def stats_file(tmp_path):
    def write(stats: LinearStatistics) -> str:
        return str(stats.save(tmp_path / "stats.safetensors"))
    return write


@pytest.mark.parametrize("sigma", [0.05, 0.7, 3.0, 14.6])
def test_components_sum_exactly_to_the_linear_cfg_direction(sigma):
    stats = random_statistics()
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (1 + sigma)
    labels = torch.tensor([0, 2, 1, 2, 0])
    mean_shift, positive, negative = decompose(x, sigma, labels, stats)
    eye = torch.eye(D, dtype=torch.float64)
    gain_u = gain_by_solve(stats.uncond_covariance, sigma)
    for i, c in enumerate(labels.tolist()):
        gain_c = gain_by_solve(stats.class_covariances[c], sigma)
        d_c = linear_denoiser(x[i:i + 1], stats.class_means[c], stats.class_covariances[c], sigma)[0]
        d_u = linear_denoiser(x[i:i + 1], stats.uncond_mean, stats.uncond_covariance, sigma)[0]
        assert torch.allclose(d_c, stats.class_means[c] + gain_c @ (x[i] - stats.class_means[c]), atol=1e-10)
        assert torch.allclose(mean_shift[i] + positive[i] + negative[i], d_c - d_u, atol=1e-10)
        expected_shift = (eye - gain_c) @ stats.class_means[c] - (eye - gain_u) @ stats.uncond_mean
        assert torch.allclose(mean_shift[i], expected_shift, atol=1e-10)
        assert torch.allclose(positive[i] + negative[i], (gain_c - gain_u) @ x[i], atol=1e-10)
        # the two CPC terms live in orthogonal eigenspaces: P·x ⟂ N·x, and x·P·x ≥ 0 ≥ x·N·x
        assert abs(float(positive[i] @ negative[i])) < 1e-10
        assert float(x[i] @ positive[i]) >= -1e-12 and float(x[i] @ negative[i]) <= 1e-12


def test_high_noise_mean_shift_is_the_class_mean_minus_the_data_mean():
    stats = random_statistics()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1e4
    mean_shift, positive, negative = decompose(x, 1e4, torch.tensor([0, 1, 2]), stats)
    assert torch.allclose(mean_shift, stats.class_means - stats.uncond_mean, atol=1e-6)
    assert float((positive + negative).abs().max()) < 1e-2  # W → 0 as σ → ∞ (‖x‖ ~ σ)


def test_isotropic_classes_have_no_positive_cpc():
    """Every class as spread as the within-class noise and the data wider: W_c − W_u ≤ 0, no class-specific axes."""
    gmm = GaussianMixture(torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(3)) * 2, std=0.5)
    stats = mixture_statistics(gmm)
    x = torch.randn(8, 1, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, positive, negative = decompose(x, 1.0, torch.arange(8) % 4, stats)
    assert float(positive.abs().max()) < 1e-10 and float(negative.abs().max()) > 1e-3


@pytest.mark.parametrize("w", [1.0, 3.0, 7.5])
def test_all_scales_one_is_exactly_cfg_on_the_mixture(stats_file, w):
    """On the exact mixture (its unconditional denoiser is not linear) the nonlinear rest keeps CFG exact."""
    gmm = GaussianMixture(torch.randn(K, 1, 2, 2, generator=torch.Generator().manual_seed(5)) * 1.5, std=0.4)
    path = stats_file(mixture_statistics(gmm))
    labels = torch.tensor([0, 1, 2, 1])
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2
    sigma = 1.3
    cond = torch.cat([gmm.denoise_cond(x[i:i + 1], sigma, int(c)) for i, c in enumerate(labels)]).float()
    uncond = gmm.denoise_uncond(x, sigma).float()
    plan = GuidancePlan.of(CFGDecomposition(statistics=path, classes=tuple(labels.tolist())))
    state = GuidanceState()
    out = combine(plan, step_inputs(x.float(), cond, uncond, sigma=sigma, cond_scale=w), state)[0]
    assert torch.allclose(out, cfg_reference(cond, uncond, w), atol=1e-5)
    record = state.method_state[NORMS_KEY][-1]
    assert record["sigma"] == pytest.approx(sigma) and record["residual"] > 0  # the mixture is not linear


def test_scales_on_linear_denoisers_give_the_closed_form(stats_file):
    """Gaussian class data with a Gaussian unconditional: the rest is 0 and D̂ = U + w·(s_m·m + s₊·P·x + s₋·N·x)."""
    stats = random_statistics(seed=7)
    path = stats_file(stats)
    sigma, w, scales = 0.8, 4.0, (0.5, 2.0, 0.0)
    labels = (2, 0)
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    cond = torch.stack([linear_denoiser(x[i:i + 1], stats.class_means[c], stats.class_covariances[c], sigma)[0]
                        for i, c in enumerate(labels)])
    uncond = linear_denoiser(x, stats.uncond_mean, stats.uncond_covariance, sigma)
    mean_shift, positive, negative = decompose(x, sigma, torch.tensor(labels), stats)
    _, parts = reweighted_direction(cond - uncond, x, sigma, torch.tensor(labels), stats, scales)
    assert float(parts["residual"].abs().max()) < 1e-10
    method = CFGDecomposition(statistics=path, mean_shift_scale=scales[0], positive_scale=scales[1],
                              negative_scale=scales[2], classes=labels)
    shape = (2, 1, 3, 4)
    inp = step_inputs(x.reshape(shape).double(), cond.reshape(shape), uncond.reshape(shape), sigma=sigma,
                      cond_scale=w)
    out = combine(GuidancePlan.of(method), inp, GuidanceState())[0].double().reshape(2, D)
    expected = uncond + w * (scales[0] * mean_shift + scales[1] * positive + scales[2] * negative)
    assert torch.allclose(out, expected, atol=1e-5)


def test_sampling_the_mixture_at_scales_one_equals_cfg_and_removing_negative_cpc_changes_it(stats_file):
    gmm = GaussianMixture(torch.randn(K, 1, 2, 2, generator=torch.Generator().manual_seed(9)) * 1.5, std=0.4)
    path = stats_file(mixture_statistics(gmm))
    sigmas = karras_sigmas(12)
    label, n = 1, 16
    cfg, _ = sample_plan(GuidancePlan(), gmm, label, 4.0, sigmas, n=n)
    same, _ = sample_plan(GuidancePlan.of(CFGDecomposition(statistics=path, classes=(label,))), gmm, label, 4.0,
                          sigmas, n=n)
    no_negative, den = sample_plan(GuidancePlan.of(CFGDecomposition(statistics=path, classes=(label,),
                                                                    negative_scale=0.0)), gmm, label, 4.0, sigmas, n=n)
    assert torch.allclose(same, cfg, atol=1e-4)
    assert float((no_negative - cfg).abs().max()) > 1e-2
    assert len(den.state.method_state[NORMS_KEY]) == len(sigmas) - 1  # one record per evaluation


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_five_d_latents(stats_file, dtype):
    stats = random_statistics(seed=10)
    path = stats_file(stats)
    g = torch.Generator().manual_seed(11)
    shape = (3, 1, 3, 2, 2)  # a 5-D latent with D values per sample
    x, c, u = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    method = CFGDecomposition(statistics=path, negative_scale=0.0, classes=(0, 1, 2))
    out = combine(GuidancePlan.of(method), step_inputs(x, c, u, cond_scale=3.0), GuidanceState())[0]
    assert out.dtype == dtype and out.shape == shape and bool(torch.isfinite(out.float()).all())
    same = combine(GuidancePlan.of(CFGDecomposition(statistics=path, classes=(0, 1, 2))),
                   step_inputs(x, c, u, cond_scale=3.0), GuidanceState())[0]
    reference = cfg_reference(c.float(), u.float(), 3.0)  # in float32: the combine works in float32
    assert torch.allclose(same.float(), reference, atol=1e-5, rtol=1e-2 if dtype != torch.float32 else 1e-5)


def test_classes_from_the_run_state(stats_file):
    stats = random_statistics(seed=12)
    path = stats_file(stats)
    x, c, u = (torch.randn(2, 1, 3, 4, generator=torch.Generator().manual_seed(s)) for s in (13, 14, 15))
    plan = GuidancePlan.of(CFGDecomposition(statistics=path, negative_scale=0.0))
    state = GuidanceState()
    with pytest.raises(PlanError, match="CFG Decomposition: the class of each row is unknown"):
        combine(plan, step_inputs(x, c, u), state)
    state.method_state[CLASSES_KEY] = torch.tensor([2, 0])
    from_state = combine(plan, step_inputs(x, c, u), state)[0]
    explicit = combine(GuidancePlan.of(CFGDecomposition(statistics=path, negative_scale=0.0, classes=(2, 0))),
                       step_inputs(x, c, u), GuidanceState())[0]
    assert torch.equal(from_state, explicit)


def test_bad_inputs_are_refused_with_reasons(stats_file, tmp_path):
    stats = random_statistics(seed=16)
    path = stats_file(stats)
    x, c, u = (torch.randn(2, 4, 8, 8) for _ in range(3))  # 256 values per sample, the statistics have 12
    with pytest.raises(PlanError, match="statistics describe samples of 12 values"):
        combine(GuidancePlan.of(CFGDecomposition(statistics=path, classes=(0,))), step_inputs(x, c, u),
                GuidanceState())
    x, c, u = (torch.randn(1, 1, 3, 4) for _ in range(3))
    with pytest.raises(PlanError, match="class labels must be 0…2"):
        combine(GuidancePlan.of(CFGDecomposition(statistics=path, classes=(5,))), step_inputs(x, c, u),
                GuidanceState())
    with pytest.raises(PlanError, match="no linear statistics file"):
        combine(GuidancePlan.of(CFGDecomposition(statistics=str(tmp_path / "missing.safetensors"), classes=(0,))),
                step_inputs(x, c, u), GuidanceState())
    with pytest.raises(PlanError, match="cannot follow a band split"):
        combine(GuidancePlan.of(CFGDecomposition(statistics=path, classes=(0,)), FDG()),
                step_inputs(*(torch.randn(1, 1, 8, 8) for _ in range(3))), GuidanceState())
    with pytest.raises(PlanError, match="no statistics file"):
        GuidancePlan.of(CFGDecomposition())


def test_statistics_round_trip_and_estimate(tmp_path):
    g = torch.Generator().manual_seed(17)
    samples = torch.randn(300, 1, 2, 2, generator=g, dtype=torch.float64)
    labels = torch.arange(300) % 3
    samples += labels.reshape(-1, 1, 1, 1).double()
    stats = LinearStatistics.from_samples(samples, labels, samples, shrinkage=0.0)
    assert torch.allclose(stats.class_means[1], samples[labels == 1].flatten(1).mean(0))
    assert torch.allclose(stats.class_covariances[2], torch.cov(samples[labels == 2].flatten(1).T))
    loaded = LinearStatistics.load(stats.save(tmp_path / "s.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(stats.tensors().values(), loaded.tensors().values()))
    with pytest.raises(StatisticsError, match="every class present"):
        LinearStatistics.from_samples(samples, labels + 1, samples)


def test_outside_its_window_the_step_is_cfg_and_still_measured(stats_file):
    stats = random_statistics(seed=18)
    path = stats_file(stats)
    x, c, u = (torch.randn(2, 1, 3, 4, generator=torch.Generator().manual_seed(s)) for s in (19, 20, 21))
    method = CFGDecomposition(statistics=path, negative_scale=0.0, positive_scale=3.0, classes=(1, 2),
                              start_percent=0.0, end_percent=0.4)
    state = GuidanceState()
    late = combine(GuidancePlan.of(method), step_inputs(x, c, u, step=8, n_steps=10, cond_scale=5.0), state)[0]
    assert torch.equal(late, cfg_reference(c, u, 5.0))
    assert len(state.method_state[NORMS_KEY]) == 1
    early = combine(GuidancePlan.of(method), step_inputs(x, c, u, step=1, n_steps=10, cond_scale=5.0),
                    GuidanceState())[0]
    assert not torch.allclose(early, cfg_reference(c, u, 5.0), atol=1e-3)
    with pytest.raises(PlanError, match="re-weighting window"):
        GuidancePlan.of(CFGDecomposition(statistics=path, start_percent=0.6, end_percent=0.2))
