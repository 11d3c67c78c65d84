"""TSG's time-embedding perturbation and ICG's independent draws (guiders/branch_inputs.py): the exact
formulas, dtypes, and independence of the batch (one draw shared by the rows)."""

import pytest
import torch

from guidance_kit.guiders.branch_inputs import (
    independent_embedding,
    independent_vector,
    perturbed_time_embedding,
    standard_normal,
    time_noise_size,
)


def test_time_noise_size_is_s_t_to_the_alpha_on_the_clamped_diffusion_time():
    assert time_noise_size(0.5, 2.0, 1.0) == 1.0
    assert time_noise_size(0.25, 3.0, 0.5) == pytest.approx(1.5)
    assert time_noise_size(0.0, 2.0, 1.0) == 0.0  # no perturbation at the data end
    assert time_noise_size(0.0, 2.0, 0.0) == 2.0  # α = 0: the same size at every step
    assert time_noise_size(1.7, 2.0, 1.0) == 2.0  # t clamped to [0, 1]
    with pytest.raises(ValueError, match="alpha"):
        time_noise_size(0.5, 2.0, -1.0)


@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 8), (6, 8)])
def test_perturbed_time_embedding_adds_the_shared_noise_to_every_row_and_token(shape):
    emb = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    noise = standard_normal((8,), torch.Generator().manual_seed(1))
    out = perturbed_time_embedding(emb, noise, 0.75)
    assert torch.allclose(out - emb, (0.75 * noise).expand_as(emb), atol=1e-6)
    assert perturbed_time_embedding(emb, noise, 0.0) is emb
    half = perturbed_time_embedding(emb.half(), noise, 0.75)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), out, atol=1e-2)
    with pytest.raises(ValueError, match="TSG"):
        perturbed_time_embedding(emb, torch.zeros(7), 1.0)


def test_independent_draws_of_a_batch_equal_the_draws_of_its_rows():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 6, 16, generator=g) * 2 + 1
    pooled = torch.randn(4, 32, generator=g) * 3 - 1
    noise_t, noise_p = torch.randn(6, 16, generator=g), torch.randn(32, generator=g)
    together_t, together_p = independent_embedding(tokens, noise_t), independent_vector(pooled, noise_p)
    for row in range(4):
        assert torch.allclose(together_t[row:row + 1], independent_embedding(tokens[row:row + 1], noise_t))
        assert torch.allclose(together_p[row:row + 1], independent_vector(pooled[row:row + 1], noise_p))


def test_independent_vector_has_the_pooled_vectors_mean_and_std_and_nothing_else_of_it():
    g = torch.Generator().manual_seed(3)
    pooled = torch.randn(1, 2048, generator=g) * 4 + 2
    noise = torch.randn(2048, generator=g)
    out = independent_vector(pooled, noise)
    assert float(out.mean()) == pytest.approx(float(pooled.mean()), abs=0.3)
    assert float(out.std()) == pytest.approx(float(pooled.std()), rel=0.1)
    assert abs(float(torch.corrcoef(torch.stack([out[0], pooled[0]]))[0, 1])) < 0.1
    permuted = pooled[:, torch.randperm(2048, generator=g)]
    assert torch.allclose(independent_vector(permuted, noise), out, atol=1e-4)
    with pytest.raises(ValueError, match="ICG"):
        independent_vector(torch.zeros(2, 3, 4), noise)
