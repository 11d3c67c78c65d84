"""The SAMPLER nodes (CFG++ DPM++ 2M/3M SDE, PCG) on tiny real models through SamplerCustomAdvanced:
they equal core's SDE samplers when there is no guidance difference, count their model passes, are seeded,
and every Guidance Kit plan term works with them and with core's *_cfg_pp samplers."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import comfy.samplers
import pytest
import torch
from comfy_extras.nodes_custom_sampler import Guider_Basic, Guider_DualCFG, Noise_RandomNoise, SamplerCustomAdvanced

from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes import perturbation as P
from guidance_kit.nodes import samplers as S
from guidance_kit.nodes.guider import GuidanceGuiderNode
from tests.comfyui.harness import (
    FAMILIES,
    cfg_guider,
    conditioning,
    counted,
    latent,
    noise_for,
    out,
    rel_diff,
    sigmas_for,
    tiny_model,
)
from tests.conftest import REPO

STEPS = 6
LAMBDA = 0.8  # CFG++'s cfg
GAMMA = 3.0  # PCG's cfg


def sample(guider, family: str, sampler, steps: int = STEPS, seed: int = 0) -> torch.Tensor:
    sigmas = sigmas_for(guider.model_patcher, steps)
    result, _ = SamplerCustomAdvanced().sample(Noise_RandomNoise(seed), guider, sampler, sigmas,
                                               {"samples": latent(family)})
    return result["samples"]


def guider_with(model, positive, negative, cfg: float):
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def ours_2m(solver_type="midpoint", eta=1.0, s_noise=1.0, noise_device="cpu"):
    return out(S.SamplerDPMPP2MSDECFGPP.execute(solver_type, eta, s_noise, noise_device))


def ours_3m(eta=1.0, s_noise=1.0, noise_device="cpu"):
    return out(S.SamplerDPMPP3MSDECFGPP.execute(eta, s_noise, noise_device))


def pcg(corrector_steps=1, step_scale=0.5):
    return out(S.SamplerPCG.execute(corrector_steps, step_scale))


# (our sampler, the core sampler it must equal without a guidance difference)
CORE_TWINS = {
    "2m_midpoint_cpu": (lambda: ours_2m(), lambda: comfy.samplers.ksampler("dpmpp_2m_sde")),
    "2m_heun_gpu": (lambda: ours_2m("heun", noise_device="gpu"),
                    lambda: comfy.samplers.ksampler("dpmpp_2m_sde_gpu", {"solver_type": "heun"})),
    "2m_eta_snoise": (lambda: ours_2m(eta=0.6, s_noise=1.1),
                      lambda: comfy.samplers.ksampler("dpmpp_2m_sde", {"eta": 0.6, "s_noise": 1.1})),
    "3m_cpu": (lambda: ours_3m(), lambda: comfy.samplers.ksampler("dpmpp_3m_sde")),
    "3m_gpu": (lambda: ours_3m(noise_device="gpu"), lambda: comfy.samplers.ksampler("dpmpp_3m_sde_gpu")),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CORE_TWINS))
def test_cfg_pp_sde_samplers_equal_core_without_a_guidance_difference(family, case):
    ours, core = CORE_TWINS[case]
    model, counter = counted(tiny_model(family))
    same = conditioning(family, 1)
    guider = guider_with(model, same, same, LAMBDA)  # cond == uncond: D_λ = U
    got = sample(guider, family, ours())
    assert counter.batches == [2] * STEPS  # cond and uncond in one call, also at λ < 1
    assert torch.isfinite(got).all()
    assert rel_diff(got, sample(guider, family, core())) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["2m", "3m"])
def test_cfg_pp_sde_samplers_are_seeded_and_guide(family, name):
    make = ours_2m if name == "2m" else ours_3m
    model = tiny_model(family)
    guided = sample(cfg_guider(model, family, LAMBDA), family, make())
    assert torch.isfinite(guided).all()
    assert torch.equal(guided, sample(cfg_guider(model, family, LAMBDA), family, make()))
    assert rel_diff(sample(cfg_guider(model, family, LAMBDA), family, make(), seed=1), guided) > 1e-3
    unguided = sample(cfg_guider(model, family, 0.0), family, make())
    assert rel_diff(guided, unguided) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["2m", "3m"])
def test_one_deterministic_step_is_core_euler_cfg_pp_with_the_flow_alpha(family, name):
    """x' = α'·D_λ + (σ'/σ)·(x − α·U), α = 1 − σ on flow models, through ComfyUI's own λ(σ) helpers."""
    model = tiny_model(family)
    guider = cfg_guider(model, family, LAMBDA)
    sigmas = sigmas_for(model, STEPS)[1:3]  # one step that starts below σ = 1 (no first-sigma offset)
    ours = ours_2m(eta=0.0) if name == "2m" else ours_3m(eta=0.0)
    x = noise_for(family, 0)

    def run(sampler):
        return guider.sample(x, latent(family), sampler, sigmas, disable_pbar=True, seed=0)

    assert rel_diff(run(ours), run(comfy.samplers.sampler_object("euler_cfg_pp"))) <= 1e-5


def test_2m_sde_cfg_pp_at_eta_zero_is_core_dpmpp_2m_cfg_pp_on_sd15():
    """Our history convention (D_λ − U_prev) is core's: the deterministic 2M-SDE is core's 2M CFG++."""
    guider = cfg_guider(tiny_model("sd15"), "sd15", LAMBDA)
    ours = sample(guider, "sd15", ours_2m(eta=0.0))
    core = sample(guider, "sd15", comfy.samplers.ksampler("dpmpp_2m_cfg_pp"))
    assert rel_diff(ours, core) <= 1e-5


# ------------------------------------------------------------------------------------------------
# PCG
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_pcg_makes_one_cond_pass_then_two_per_corrector_step(family):
    model, counter = counted(tiny_model(family))
    steps, k = 4, 2
    got = sample(cfg_guider(model, family, GAMMA), family, pcg(k), steps=steps)
    assert torch.isfinite(got).all()
    assert counter.batches == ([1] + [2] * k) * (steps - 1) + [1]  # no corrector after the final denoise


@pytest.mark.parametrize("family", FAMILIES)
def test_pcg_without_corrector_is_the_conditional_euler_sampler(family):
    base = tiny_model(family)
    got = sample(cfg_guider(base, family, GAMMA), family, pcg(0))
    conditional_euler = sample(cfg_guider(base, family, 1.0), family, comfy.samplers.sampler_object("euler"))
    assert rel_diff(got, conditional_euler) <= 1e-5
    guider = out(GuidanceGuiderNode.execute(base, conditioning(family, 1), conditioning(family, 2), GAMMA))
    assert rel_diff(sample(guider, family, pcg(0)), conditional_euler) <= 1e-5


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_pcg_is_seeded_and_its_langevin_noise_follows_the_seed(family):
    model = tiny_model(family)
    first = sample(cfg_guider(model, family, GAMMA), family, pcg(1))
    assert torch.equal(first, sample(cfg_guider(model, family, GAMMA), family, pcg(1)))
    assert rel_diff(first, sample(cfg_guider(model, family, 1.0), family, pcg(1))) > 1e-3  # γ acts
    # the same initial noise, another run seed: only the Langevin stream changes
    guider = cfg_guider(model, family, GAMMA)
    sigmas = sigmas_for(model, STEPS)
    runs = [guider.sample(noise_for(family, 0), latent(family), pcg(1), sigmas, disable_pbar=True, seed=seed)
            for seed in (0, 5)]
    assert rel_diff(runs[0], runs[1]) > 1e-4


def test_pcg_at_gamma_one_skips_the_uncond_in_the_corrector():
    model, counter = counted(tiny_model("sd15"))
    sample(cfg_guider(model, "sd15", 1.0), "sd15", pcg(1), steps=3)
    assert counter.batches == [1, 1, 1, 1, 1]


# ------------------------------------------------------------------------------------------------
# plans with CFG++ samplers (core's and ours) and with PCG
# ------------------------------------------------------------------------------------------------

SAMPLERS = {
    "core_euler_cfg_pp": (lambda: comfy.samplers.sampler_object("euler_cfg_pp"), LAMBDA),
    "core_dpmpp_2m_cfg_pp": (lambda: comfy.samplers.sampler_object("dpmpp_2m_cfg_pp"), LAMBDA),
    "dpmpp_2m_sde_cfg_pp": (ours_2m, LAMBDA),
    "dpmpp_3m_sde_cfg_pp": (ours_3m, LAMBDA),
    "pcg": (lambda: pcg(1), GAMMA),
}


def apg(m, eta=0.0, norm_threshold=15.0, momentum=-0.5):
    return out(cm.APGNode.execute(m, eta=eta, norm_threshold=norm_threshold, momentum=momentum))


def pag(m, scale=3.0):
    return out(P.PAGNode.execute(m, scale, "auto", "constant", 0.0, 1.0))


def tcfg(m):
    return out(cm.TCFGNode.execute(m))


def expected_batches(sampler: str, per_step: int, steps: int = STEPS) -> list[int]:
    """Every evaluation is one batched call; PCG's cond-only predictor ignores the plan (1 pass)."""
    if sampler == "pcg":
        return [1, per_step] * (steps - 1) + [1]
    return [per_step] * steps


@pytest.fixture(scope="module")
def unpatched():
    results = {}
    for family in ("sd15", "flux"):
        for name, (make, cfg) in SAMPLERS.items():
            results[family, name] = sample(cfg_guider(tiny_model(family), family, cfg), family, make())
    return results


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("method,per_step", [("apg", 2), ("tcfg", 2), ("pag", 3)])
def test_plan_terms_act_in_one_batched_call_with_guidance_samplers(family, sampler, method, per_step, unpatched):
    make, cfg = SAMPLERS[sampler]
    patch = {"apg": apg, "tcfg": tcfg, "pag": pag}[method]
    model, counter = counted(patch(tiny_model(family)))
    got = sample(cfg_guider(model, family, cfg), family, make())
    assert torch.isfinite(got).all()
    assert rel_diff(got, unpatched[family, sampler]) > 1e-3, "the method had no effect"
    assert counter.batches == expected_batches(sampler, per_step)


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_neutral_plan_settings_equal_the_unpatched_sampler(family, sampler, unpatched):
    make, cfg = SAMPLERS[sampler]
    reference = unpatched[family, sampler]
    as_cfg = apg(tiny_model(family), eta=1.0, norm_threshold=0.0, momentum=0.0)  # APG reduced to CFG
    assert rel_diff(sample(cfg_guider(as_cfg, family, cfg), family, make()), reference) <= 1e-5
    model, counter = counted(pag(tiny_model(family), scale=0.0))
    assert rel_diff(sample(cfg_guider(model, family, cfg), family, make()), reference) <= 1e-6
    assert counter.batches == expected_batches(sampler, 2)  # scale 0: no PAG branch evaluated


# ------------------------------------------------------------------------------------------------
# errors and node definitions
# ------------------------------------------------------------------------------------------------

def test_cfg_pp_without_a_negative_is_a_clear_error():
    guider = Guider_Basic(tiny_model("sd15"))
    guider.set_conds(conditioning("sd15", 1))
    guider.set_cfg(LAMBDA)
    with pytest.raises(S.GuidanceSamplerError, match="negative"):
        sample(guider, "sd15", ours_2m(), steps=2)


def test_pcg_with_a_two_scale_guider_is_a_clear_error():
    guider = Guider_DualCFG(tiny_model("sd15"))
    guider.set_conds(conditioning("sd15", 1), conditioning("sd15", 3), conditioning("sd15", 2))
    guider.set_cfg(3.0, 2.0)
    with pytest.raises(S.GuidanceSamplerError, match="one cfg scale"):
        sample(guider, "sd15", pcg(), steps=2)


@pytest.mark.parametrize("call,match", [
    (lambda: S.SamplerDPMPP2MSDECFGPP.execute("euler", 1.0, 1.0, "cpu"), "solver_type"),
    (lambda: S.SamplerDPMPP2MSDECFGPP.execute("midpoint", -1.0, 1.0, "cpu"), "eta"),
    (lambda: S.SamplerDPMPP3MSDECFGPP.execute(1.0, 1.0, "tpu"), "noise_device"),
    (lambda: S.SamplerPCG.execute(-1, 0.5), "corrector_steps"),
    (lambda: S.SamplerPCG.execute(1, 0.0), "step_scale"),
])
def test_bad_node_settings_are_clear_errors(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "CFG++" in str(info.value) or "PCG" in str(info.value)


@pytest.mark.parametrize("node", S.NODES, ids=lambda n: n.__name__)
def test_sampler_nodes_are_well_formed_with_help_pages(node):
    schema = node.GET_SCHEMA()
    assert schema.node_id.startswith("GuidanceKit_Sampler")
    assert schema.category == "sampling/guidance/samplers"
    assert "·" in schema.display_name and len(schema.description) > 80
    for inp in schema.inputs:
        assert inp.tooltip and len(inp.tooltip) > 20, f"{schema.node_id}.{inp.id}"
    assert all(o.tooltip for o in schema.outputs)
    if "CFGPP" in schema.node_id:
        assert any("λ in [0, 1]" in inp.tooltip for inp in schema.inputs)
    info = node.GET_NODE_INFO_V1()
    assert info["output"] == ["SAMPLER"]
    page = REPO / "web" / "docs" / f"{schema.node_id}.md"
    assert page.is_file(), f"missing {page.relative_to(REPO)}"
    assert page.read_text(encoding="utf-8").startswith("# ")


# ------------------------------------------------------------------------------------------------
# the model's noise scale (ComfyUI upstream 8e53f001: SDE samplers multiply s_noise by it)
# ------------------------------------------------------------------------------------------------

def with_noise_scale(model, scale: float):
    """A clone whose model_sampling carries ``noise_scale`` (an object patch on a copy, as the ModelNoiseScale
    node of current ComfyUI would set it; ComfyUI 0.3.64's model_sampling has no such attribute)."""
    import copy

    patched = model.clone()
    sampling = copy.copy(patched.get_model_object("model_sampling"))
    sampling.noise_scale = scale
    patched.add_object_patch("model_sampling", sampling)
    return patched


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("make", [lambda s: ours_2m(s_noise=s), lambda s: ours_3m(s_noise=s)], ids=["2m", "3m"])
def test_cfg_pp_sde_noise_follows_the_models_noise_scale(family, make):
    base = tiny_model(family)
    scaled = sample(cfg_guider(with_noise_scale(base, 2.0), family, LAMBDA), family, make(1.0))
    assert rel_diff(scaled, sample(cfg_guider(base, family, LAMBDA), family, make(2.0))) <= 1e-6
    assert rel_diff(scaled, sample(cfg_guider(base, family, LAMBDA), family, make(1.0))) > 1e-3


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_pcg_corrector_noise_follows_the_models_noise_scale(family, monkeypatch):
    base = tiny_model(family)
    scaled = sample(cfg_guider(with_noise_scale(base, 2.0), family, GAMMA), family, pcg(1))
    assert rel_diff(scaled, sample(cfg_guider(base, family, GAMMA), family, pcg(1))) > 1e-3
    stream = S.langevin_noise_stream
    monkeypatch.setattr(S, "langevin_noise_stream", lambda seed: (lambda like, n=stream(seed): 2.0 * n(like)))
    assert rel_diff(scaled, sample(cfg_guider(base, family, GAMMA), family, pcg(1))) <= 1e-6
