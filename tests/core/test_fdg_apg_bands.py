"""FDG and the sampler's cfg (absolute scales, or relative to cfg) and APG stacked on FDG (projection per band)."""

import pytest
import torch

from guidance_kit.guiders.combine import GuidanceState, combine
from guidance_kit.guiders.methods.apg import APG
from guidance_kit.guiders.methods.fdg import FDG, laplacian_pyramid, reconstruct
from guidance_kit.guiders.plan import GuidancePlan, PlanError

from .helpers import cfg_reference, random_triplet, step_inputs

SHAPE = (2, 4, 16, 16)


def run(plan, inp, state=None):
    return combine(plan, inp, state or GuidanceState())[0]


# --- FDG and cfg ----------------------------------------------------------------------------------
def test_absolute_scales_ignore_the_samplers_cfg_and_say_so():
    x, c, u = random_triplet(SHAPE)
    plan = GuidancePlan.of(FDG(scales=(10.0, 5.0)))
    assert torch.equal(run(plan, step_inputs(x, c, u, cond_scale=3.0)), run(plan, step_inputs(x, c, u, cond_scale=7.0)))
    [(key, message)] = plan.cfg_notes(7.0)
    assert key == "fdg-ignores-cfg" and "FDG" in message and "cfg (7)" in message and "relative to cfg" in message
    # no note where cfg is 1 (FDG at cfg 1 is a use) or equals the high band (chosen to compare with plain CFG)
    assert plan.cfg_notes(1.0) == [] and plan.cfg_notes(10.0) == []
    assert plan.needs_uncond_at_cfg_one and plan.inactive_at_cfg_one(True) == []


@pytest.mark.parametrize("cfg", [1.0, 3.0, 7.5])
def test_relative_scales_follow_cfg(cfg):
    x, c, u = random_triplet(SHAPE)
    relative = GuidancePlan.of(FDG(scales=(1.0, 0.5), relative=True))
    absolute = GuidancePlan.of(FDG(scales=(cfg, 1.0 + 0.5 * (cfg - 1.0))))
    got = run(relative, step_inputs(x, c, u, cond_scale=cfg))
    assert torch.allclose(got, run(absolute, step_inputs(x, c, u, cond_scale=99.0)), atol=1e-5)
    if cfg == 1.0:
        assert torch.allclose(got, c, atol=1e-5)  # cfg 1: no guidance in any band, as plain CFG
    assert relative.cfg_notes(cfg) == []


def test_relative_unit_scales_are_plain_cfg_and_cfg_one_is_reported():
    x, c, u = random_triplet(SHAPE)
    plan = GuidancePlan.of(FDG(scales=(1.0, 1.0, 1.0), relative=True))
    assert torch.allclose(run(plan, step_inputs(x, c, u, cond_scale=6.0)), cfg_reference(c, u, 6.0), atol=1e-4)
    assert not plan.needs_uncond_at_cfg_one  # ComfyUI may skip the uncond at cfg 1: nothing to guide
    assert any("FDG" in label for label in plan.inactive_at_cfg_one(False))


# --- APG on FDG bands -----------------------------------------------------------------------------
def reference_projection_per_band(c, u, weights, eta):
    """Per band: C_b + (w_b − 1)·(Δ⊥ + η·Δ∥), Δ projected on C_b in float64 (as diffusers' ``project``)."""
    levels = len(weights)
    out = []
    for c_b, g_b, w in zip(laplacian_pyramid(c, levels), laplacian_pyramid(c - u, levels), weights):
        unit = torch.nn.functional.normalize(c_b.double().flatten(1), dim=1).reshape(c_b.shape)
        parallel = (g_b.double() * unit).sum(dim=(1, 2, 3), keepdim=True) * unit
        out.append(c_b + (w - 1.0) * (g_b.double() - parallel + eta * parallel).float())
    return reconstruct(out)


@pytest.mark.parametrize("eta", [0.0, 0.4])
def test_default_is_projection_only_per_band(eta):
    x, c, u = random_triplet(SHAPE)
    plan = GuidancePlan.of(FDG(scales=(9.0, 4.0)), APG(eta=eta, norm_threshold=0.01, momentum=-0.5))
    state = GuidanceState()
    first = run(plan, step_inputs(x, c, u, step=2), state)
    assert torch.allclose(first, reference_projection_per_band(c, u, (9.0, 4.0), eta), atol=1e-4)
    # no momentum (the same inputs give the same output later in the run) and no clip (threshold 0.01 ignored)
    assert torch.equal(run(plan, step_inputs(x, c, u, step=3), state), first)
    assert state.momentum == {}


def test_projection_with_eta_one_is_plain_fdg():
    x, c, u = random_triplet(SHAPE)
    fdg = FDG(scales=(8.0, 3.0))
    both = run(GuidancePlan.of(fdg, APG(eta=1.0)), step_inputs(x, c, u))
    assert torch.allclose(both, run(GuidancePlan.of(fdg), step_inputs(x, c, u)), atol=1e-4)


def test_full_mode_keeps_momentum_and_clip_per_band():
    x, c, u = random_triplet(SHAPE)
    fdg, projected = FDG(scales=(9.0, 4.0)), reference_projection_per_band(c, u, (9.0, 4.0), 0.0)
    clipped = GuidancePlan.of(fdg, APG(eta=0.0, norm_threshold=0.5, momentum=0.0, fdg_mode="full"))
    assert not torch.allclose(run(clipped, step_inputs(x, c, u)), projected, atol=1e-3)  # the clip acts per band
    plan = GuidancePlan.of(fdg, APG(eta=0.0, norm_threshold=0.0, momentum=-0.5, fdg_mode="full"))
    state = GuidanceState()
    first = run(plan, step_inputs(x, c, u, step=2), state)
    assert set(state.momentum) == {"apg/0", "apg/1"} and torch.allclose(first, projected, atol=1e-4)
    assert not torch.allclose(run(plan, step_inputs(x, c, u, step=3), state), first, atol=1e-3)  # momentum


def test_without_fdg_the_band_mode_does_not_matter():
    x, c, u = random_triplet(SHAPE)
    results = [run(GuidancePlan.of(APG(fdg_mode=mode)), step_inputs(x, c, u)) for mode in ("projection", "full")]
    assert torch.equal(*results)
    with pytest.raises(PlanError, match="fdg_mode"):
        APG(fdg_mode="bands").validate()
