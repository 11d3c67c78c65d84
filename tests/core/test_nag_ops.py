"""NAG's attention-space operator (``attention_ops.nag_combine``) against its definition:
Z̃ = s·Z⁺ − (s − 1)·Z⁻, r = ‖Z̃‖₁/‖Z⁺‖₁ per token, Ẑ = Z̃·min(r, τ)/r, Z = α·Ẑ + (1 − α)·Z⁺."""

import pytest
import torch

from guidance_kit.guiders.attention_ops import nag_combine


def features(shape=(2, 7, 16), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(2))


def reference(z_pos, z_neg, scale, tau, alpha):
    """The formula token by token, in float64."""
    p, n = z_pos.double(), z_neg.double()
    out = torch.empty_like(p)
    for index in torch.cartesian_prod(*(torch.arange(s) for s in p.shape[:-1])):
        idx = tuple(index.tolist())
        extrapolated = scale * p[idx] - (scale - 1) * n[idx]
        ratio = extrapolated.abs().sum() / p[idx].abs().sum()
        normalized = extrapolated * min(ratio, tau) / ratio
        out[idx] = alpha * normalized + (1 - alpha) * p[idx]
    return out


@pytest.mark.parametrize("scale, tau, alpha", [(5.0, 2.5, 0.25), (3.0, 2.5, 0.5), (9.0, 3.5, 0.12), (2.0, 10.0, 1.0)])
def test_matches_the_formula_token_by_token(scale, tau, alpha):
    z_pos, z_neg = features()
    out = nag_combine(z_pos, z_neg, scale, tau, alpha)
    assert torch.allclose(out.double(), reference(z_pos, z_neg, scale, tau, alpha), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_scale_one_is_the_identity(alpha):
    z_pos, z_neg = features()
    assert torch.allclose(nag_combine(z_pos, z_neg, 1.0, 2.5, alpha), z_pos, atol=1e-6, rtol=0)


def test_alpha_zero_is_the_identity_and_equal_features_are_a_fixed_point():
    z_pos, z_neg = features()
    assert torch.equal(nag_combine(z_pos, z_neg, 5.0, 2.5, 0.0), z_pos)
    assert torch.allclose(nag_combine(z_pos, z_pos.clone(), 5.0, 2.5, 0.25), z_pos, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 1.5, 2.5])
def test_the_tau_bound_holds_after_normalisation(tau):
    z_pos, z_neg = features(seed=1)
    normalized = nag_combine(z_pos, z_neg, 8.0, tau, 1.0)  # alpha 1: the normalised features themselves
    ratio = normalized.abs().sum(-1) / z_pos.abs().sum(-1)
    assert (ratio <= tau * (1 + 1e-5)).all()
    extrapolated = 8.0 * z_pos - 7.0 * z_neg
    clipped = extrapolated.abs().sum(-1) / z_pos.abs().sum(-1) > tau
    assert clipped.any() and torch.allclose(ratio[clipped], torch.full_like(ratio[clipped], tau), rtol=1e-5)
    # tokens under the bound keep the extrapolated features unchanged
    assert torch.allclose(normalized[~clipped], extrapolated[~clipped], atol=1e-5)


def test_the_bound_never_clips_a_direction_only_its_size():
    z_pos, z_neg = features(seed=2)
    normalized = nag_combine(z_pos, z_neg, 20.0, 1.0, 1.0)
    extrapolated = 20.0 * z_pos - 19.0 * z_neg
    cosine = torch.nn.functional.cosine_similarity(normalized, extrapolated, dim=-1)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-5)


def test_alpha_blends_linearly_between_the_prompt_and_the_normalised_features():
    z_pos, z_neg = features(seed=3)
    full = nag_combine(z_pos, z_neg, 4.0, 2.5, 1.0)
    for alpha in (0.125, 0.25, 0.5, 0.75):
        expected = alpha * full + (1 - alpha) * z_pos
        assert torch.allclose(nag_combine(z_pos, z_neg, 4.0, 2.5, alpha), expected, atol=1e-5)


def test_norms_run_over_each_token_separately():
    z_pos, z_neg = features(shape=(3, 5, 8), seed=4)
    whole = nag_combine(z_pos, z_neg, 6.0, 2.0, 0.5)
    for b in range(3):
        for t in range(5):
            alone = nag_combine(z_pos[b:b + 1, t:t + 1], z_neg[b:b + 1, t:t + 1], 6.0, 2.0, 0.5)
            assert torch.allclose(whole[b, t], alone[0, 0], atol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_inputs_keep_their_dtype_and_stay_close(dtype, tolerance):
    z_pos, z_neg = features(dtype=torch.float32, seed=5)
    out = nag_combine(z_pos.to(dtype), z_neg.to(dtype), 5.0, 2.5, 0.25)
    assert out.dtype == dtype
    expected = nag_combine(z_pos.to(dtype).float(), z_neg.to(dtype).float(), 5.0, 2.5, 0.25)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), expected, atol=tolerance, rtol=tolerance)


def test_half_precision_does_not_overflow_at_large_scales():
    z_pos, z_neg = features(seed=6)
    out = nag_combine((z_pos * 300).half(), (z_neg * 300).half(), 50.0, 2.5, 1.0)
    assert torch.isfinite(out).all()


def test_zero_positive_features_stay_finite():
    z_pos = torch.zeros(1, 3, 8)
    z_neg = torch.randn(1, 3, 8)
    out = nag_combine(z_pos, z_neg, 5.0, 2.5, 0.25)
    assert torch.isfinite(out).all()


def test_batches_are_independent():
    z_pos, z_neg = features(shape=(4, 6, 12), seed=7)
    whole = nag_combine(z_pos, z_neg, 5.0, 2.5, 0.25)
    for b in range(4):
        assert torch.allclose(whole[b], nag_combine(z_pos[b], z_neg[b], 5.0, 2.5, 0.25), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(tau=0.0), "tau must be a positive number"),
    (dict(tau=float("inf")), "tau must be a positive number"),
    (dict(alpha=1.5), r"alpha is a blend weight in \[0, 1\]"),
    (dict(alpha=-0.1), r"alpha is a blend weight in \[0, 1\]"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    z_pos, z_neg = features()
    settings = dict(scale=5.0, tau=2.5, alpha=0.25) | kwargs
    with pytest.raises(ValueError, match=f"^NAG: {message}"):
        nag_combine(z_pos, z_neg, **settings)


def test_mismatched_shapes_are_a_clear_error():
    z_pos, _ = features()
    with pytest.raises(ValueError, match="^NAG: Z⁺ .* same shape"):
        nag_combine(z_pos, z_pos[:, :3], 5.0, 2.5, 0.25)
