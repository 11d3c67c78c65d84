"""Perturbation guidance nodes on real ComfyUI models (tiny random weights, 8 families): each method
changes the output, runs its degraded branch inside the one batched model call per step, equals a
separate-forward evaluation, survives ComfyUI splitting the batch, and fails clearly where it cannot act."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import comfy.samplers
import pytest
import torch

from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes import guider as gd
from guidance_kit.nodes import perturbation as P
from guidance_kit.nodes.runtime import blocks as model_blocks
from guidance_kit.nodes.runtime import families, slots
from tests.comfyui.harness import (
    ALL_FAMILIES,
    NEW_FAMILIES,
    conditioning,
    counted,
    custom_advanced,
    ksample,
    out,
    rel_diff,
    tiny_model,
)

CFG = 4.0
STEPS = 4


def pag(m, scale=2.0, layers="auto", start=0.0, end=1.0):
    return out(P.PAGNode.execute(m, scale, layers, "constant", start, end))


def seg(m, scale=2.0, layers="auto", sigma=10000.0):
    return out(P.SEGNode.execute(m, scale, sigma, layers, "constant", 0.0, 1.0))


def tpg(m, scale=2.0, layers="auto", seed=0):
    return out(P.TPGNode.execute(m, scale, layers, seed, "constant", 0.0, 1.0))


def slg(m, scale=2.0, layers="auto", start=0.0, end=1.0):
    return out(P.SkipLayerNode.execute(m, scale, layers, "constant", start, end))


def s2g(m, scale=0.5, drop_ratio=0.6, layers="auto", seed=0):
    return out(P.S2GuidanceNode.execute(m, scale, drop_ratio, layers, seed, "constant", 0.0, 1.0))


BLOCK_METHODS = {"PAG": pag, "SEG": seg, "TPG": tpg, "SLG": slg, "S2G": s2g}


def check_every_block_method_in_one_batched_call(family, cfg, steps, cfg_zero_star=True, rows_apart=True):
    """Every block method stacked with APG (and CFG-Zero*) on ``family``: one batched call per step, a batch of two
    latents × (cond, uncond, 5 branches); the stack acts; with ``rows_apart`` the first latent equals its run alone."""
    base = tiny_model(family)
    model = base
    for method in BLOCK_METHODS.values():
        model = method(model)
    model = out(cm.APGNode.execute(model, 0.0, 15.0, -0.5))
    if cfg_zero_star:
        model = out(cm.CFGZeroStarNode.execute(model, True, 0))
    model, counter = counted(model)
    both = ksample(model, family, cfg, steps, batch=2, seed=3)
    assert torch.isfinite(both).all()
    assert counter.calls == steps and counter.batches == [2 * 7] * steps
    assert rel_diff(both, ksample(base, family, cfg, steps, batch=2, seed=3)) > 1e-3
    if rows_apart:
        assert rel_diff(both[:1], ksample(model, family, cfg, steps, batch=1, seed=3)) <= 1e-4


def tsg(m, scale=2.0, s=2.0, seed=0, perturb=P.TSG_PERTURB[0], noise=0.2):
    if perturb == P.TSG_PERTURB[0] and type(m.model.diffusion_model).__name__.startswith("Chroma"):
        perturb = P.TSG_PERTURB[1]  # Chroma has no time embedding of its own (tests/comfyui/test_tsg_icg.py)
    return out(P.TSGNode.execute(m, scale, noise, seed, "constant", 0.0, 1.0, perturb=perturb, s=s, alpha=1.0))


def icg(m, seed=0):
    return out(P.ICGNode.execute(m, seed))


BRANCH_METHODS = {"PAG": pag, "SEG": seg, "TPG": tpg, "SLG": slg, "S2G": s2g, "TSG": tsg}
METHODS = {**BRANCH_METHODS, "ICG": icg}
NO_ROPE = ("sd3",)


def cases():
    for family in ALL_FAMILIES + NEW_FAMILIES:
        for name in METHODS:
            if name == "TPG" and family in NO_ROPE:
                continue
            yield family, name


@pytest.mark.parametrize("family, method", list(cases()))
def test_method_changes_the_output_with_one_batched_call_per_step(family, method):
    base = tiny_model(family)
    plain = ksample(base, family, CFG, STEPS)
    model, counter = counted(METHODS[method](base))
    guided = ksample(model, family, CFG, STEPS)
    assert torch.isfinite(guided).all()
    assert rel_diff(guided, plain) > 1e-3, f"{method} did nothing on {family}"
    assert counter.calls == STEPS
    chunks = 2 if method == "ICG" else 3  # ICG replaces the uncond chunk; the others add one
    assert counter.batches == [chunks] * STEPS


def separate_forward(model):
    """Displace our calc-cond-batch slot: the engine then evaluates branches in separate forwards."""
    m = model.clone()
    m.set_model_sampler_calc_cond_batch_function(
        lambda args: comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                                    args["model_options"]))
    return m


@pytest.mark.parametrize("family", ["sd15", "flux", "wan21", "hunyuan_video", "qwen_image", "lumina2", "mochi",
                                    "cosmos_predict2", "hidream", "cosmos"])
@pytest.mark.parametrize("method", list(METHODS))
def test_batched_branch_equals_a_separate_forward(family, method):
    if method == "TPG" and family in NO_ROPE:
        pytest.skip("TPG does not apply to SD3")
    model = METHODS[method](tiny_model(family))
    batched, counter = counted(model)
    together = ksample(batched, family, CFG, STEPS)
    apart, apart_counter = counted(separate_forward(model))
    separate = ksample(apart, family, CFG, STEPS)
    assert counter.calls == STEPS and apart_counter.calls == 2 * STEPS
    assert rel_diff(together, separate) <= 1e-4


@pytest.mark.parametrize("family", ["sd15", "flux", "ltxv", "lumina2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_result_survives_comfyui_splitting_the_batch(family, method, monkeypatch):
    base = tiny_model(family)
    model = METHODS[method](base)
    together = ksample(model, family, CFG, STEPS)
    monkeypatch.setattr(base.model, "memory_required", lambda *a, **k: float("inf"))
    split_model, counter = counted(model)
    split = ksample(split_model, family, CFG, STEPS)
    assert counter.calls > STEPS and max(counter.batches) == 1  # one row per forward
    assert rel_diff(split, together) <= 1e-5


@pytest.mark.parametrize("family, first, second", [("sd15", pag, seg), ("flux", pag, slg), ("wan21", tpg, tsg)])
def test_two_perturbation_terms_run_in_one_call_with_four_chunks(family, first, second):
    model, counter = counted(second(first(tiny_model(family))))
    ksample(model, family, CFG, STEPS)
    assert counter.batches == [4] * STEPS


@pytest.mark.parametrize("method", list(BRANCH_METHODS))
def test_scale_zero_is_exactly_cfg_and_costs_nothing(method):
    base = tiny_model("sd15")
    model, counter = counted(BRANCH_METHODS[method](base, scale=0.0))
    assert torch.equal(ksample(model, "sd15", CFG, STEPS), ksample(base, "sd15", CFG, STEPS))
    assert counter.batches == [2] * STEPS


def test_window_limits_the_branch_to_its_steps():
    model, counter = counted(slg(tiny_model("sd3"), start=0.0, end=0.34))
    ksample(model, "sd3", CFG, 4)
    assert counter.batches == [3, 3, 2, 2]


def test_pag_with_apg_and_schedule_through_the_guider_equals_ksampler():
    family = "flux"
    model = pag(out(cm.APGNode.execute(tiny_model(family), 0.0, 15.0, -0.5)))
    via_ksampler = ksample(model, family, CFG, STEPS)
    guider = out(gd.GuidanceGuiderNode.execute(model, conditioning(family, 1), conditioning(family, 2), CFG))
    via_guider = custom_advanced(guider, family, STEPS)
    assert rel_diff(via_guider, via_ksampler) <= 1e-5


def test_s2_guidance_is_reproducible_under_its_seed():
    base = tiny_model("flux")
    a = ksample(s2g(base, seed=1, drop_ratio=0.3), "flux", CFG, STEPS)
    b = ksample(s2g(base, seed=1, drop_ratio=0.3), "flux", CFG, STEPS)
    c = ksample(s2g(base, seed=2, drop_ratio=0.3), "flux", CFG, STEPS)
    assert torch.equal(a, b)
    assert rel_diff(a, c) > 1e-4


def test_s2_guidance_never_drops_the_first_block_and_rejects_empty_choices():
    model = s2g(tiny_model("flux"), drop_ratio=0.3)
    term = model.model_options["guidance_kit_plan"].extra[0]
    assert ("double", 0) not in term.branch.perturbation.blocks
    with pytest.raises(ValueError, match="first block"):
        s2g(tiny_model("flux"), layers="double 0")
    with pytest.raises(ValueError, match="rounds to 0 blocks"):
        s2g(tiny_model("flux"), drop_ratio=0.01)


def test_tsg_guides_unconditional_generation_at_cfg_one():
    family = "sd15"
    base = tiny_model(family)
    empty = conditioning(family, 9)
    plain = ksample(base, family, 1.0, STEPS, positive=empty, negative=empty)
    model, counter = counted(tsg(base))
    guided = ksample(model, family, 1.0, STEPS, positive=empty, negative=empty)
    assert rel_diff(guided, plain) > 1e-3
    assert counter.batches == [2] * STEPS  # cond + the time-perturbed branch, no uncond


@pytest.mark.parametrize("perturb", P.TSG_PERTURB)
def test_tsg_with_zero_noise_equals_the_conditional_model(perturb):
    family = "flux"
    base = tiny_model(family)
    model = tsg(base, s=0.0, noise=0.0, perturb=perturb)
    assert rel_diff(ksample(model, family, 1.0, STEPS), ksample(base, family, 1.0, STEPS)) <= 1e-6


def test_icg_ignores_the_negative_prompt_and_stacks_with_apg():
    family = "flux"
    model = out(cm.APGNode.execute(icg(tiny_model(family)), 0.0, 15.0, -0.5))
    a = ksample(model, family, CFG, STEPS, negative=conditioning(family, 2))
    b = ksample(model, family, CFG, STEPS, negative=conditioning(family, 3))
    assert torch.equal(a, b)


def test_tpg_on_a_family_without_rotary_positions_is_a_clear_error():
    with pytest.raises(ValueError, match=r"TPG: SD3/SD3.5 .* Use PAG, SEG or Skip-Layer Guidance"):
        tpg(tiny_model("sd3"))


def test_unsupported_family_is_a_clear_error_naming_the_node_and_alternatives():
    class PixArtMS(torch.nn.Module):
        pass

    PixArtMS.__module__, PixArtMS.__qualname__ = "comfy.ldm.pixart.pixartms", "PixArtMS"

    class Fake:
        class model:  # noqa: N801
            diffusion_model = PixArtMS()

    with pytest.raises(families.FamilyError, match=r"^PAG: .*PixArt\. Why: its blocks receive no transformer_options"
                                                   r".* CFG-space methods"):
        families.family_of(Fake, "PAG")


@pytest.mark.parametrize("family, layers, message", [
    ("sd15", "double 3", "do not exist on UNet"),
    ("flux", "double 99", "out of range"),
    ("sd15", "input 0", "no transformer layers"),
])
def test_bad_layer_selection_fails_at_the_node_with_valid_blocks(family, layers, message):
    with pytest.raises(ValueError, match=message) as info:
        pag(tiny_model(family), layers=layers)
    assert str(info.value).startswith("PAG:")
    assert P.PAGNode.validate_inputs(layers="triple 3").startswith("PAG: unknown block group")


def test_nodes_never_mutate_their_input_model():
    base = tiny_model("sd15")
    before = (dict(base.model_options), dict(base.object_patches),
              repr(base.model_options.get("transformer_options")))
    for fn in METHODS.values():
        fn(base)
    assert (dict(base.model_options), dict(base.object_patches),
            repr(base.model_options.get("transformer_options"))) == before


def test_hooks_chain_to_an_existing_attention_patch():
    base = tiny_model("sd15")
    seen = []

    def previous(q, k, v, extra_options):  # an attn1 patch of another node, numerically the plain attention
        seen.append(q.shape[0])
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra_options["n_heads"])

    patched = base.clone()
    for group, block, layer in model_blocks.unet_layers(patched.model.diffusion_model):
        patched.set_model_attn1_replace(previous, group, block, transformer_index=layer)
    chained = ksample(pag(patched), "sd15", CFG, 2)
    assert rel_diff(chained, ksample(pag(base), "sd15", CFG, 2)) <= 1e-5  # PAG still acts, same result
    assert 2 in seen  # the previous patch still runs, on the cond/uncond rows PAG leaves alone


def test_pag_on_the_unet_middle_block_equals_comfyui_core_pag():
    """Core PAG (middle block, separate forward) is our PAG with layers 'middle all' on a UNet."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    base = tiny_model("sd15")
    core = ksample(out(PerturbedAttentionGuidance.execute(base, 3.0)), "sd15", CFG, STEPS)
    ours, counter = counted(pag(base, scale=3.0, layers="middle all"))
    assert rel_diff(ksample(ours, "sd15", CFG, STEPS), core) <= 1e-5
    assert counter.batches == [3] * STEPS  # core needs a second forward per step for the same result


@pytest.mark.parametrize("family, layers", [("flux", ("0", "0")), ("sd3", ("1", ""))])
def test_skip_layer_equals_comfyui_core_on_dits(family, layers):
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    base = tiny_model(family)
    core_model = out(SkipLayerGuidanceDiT.execute(base, 2.5, 0.0, 1.0, double_layers=layers[0],
                                                  single_layers=layers[1]))
    selection = f"double {layers[0]}" + (f", single {layers[1]}" if layers[1] else "")
    ours = slg(base, scale=2.5, layers=selection)
    assert rel_diff(ksample(ours, family, CFG, STEPS), ksample(core_model, family, CFG, STEPS)) <= 1e-5


@pytest.mark.parametrize("family", ["sd15", "flux", "wan21", "lumina2"])
def test_perturbation_terms_stack_with_cfg_space_terms_and_core_nodes(family):
    from comfy_extras.nodes_model_advanced import RescaleCFG

    base = tiny_model(family)
    ours = slg(pag(out(cm.TCFGNode.execute(out(cm.APGNode.execute(base, 0.0, 15.0, -0.5))))), layers="auto")
    stacked, counter = counted(out(RescaleCFG().patch(ours, 0.7)))
    result = ksample(stacked, family, CFG, STEPS)
    without_core = ksample(ours, family, CFG, STEPS)
    assert torch.isfinite(result).all()
    assert counter.batches == [4] * STEPS  # cond, uncond, PAG and skip-layer branches in one forward
    assert rel_diff(result, without_core) > 1e-4  # the core node still acts on top of the plan



def test_stacked_terms_on_the_same_layers_each_act():
    """One Euler step returns D̂, so the terms' contributions must add up exactly."""
    family, steps = "sd15", 1
    base = tiny_model(family)
    cfg_only = ksample(base, family, CFG, steps)
    with_pag = ksample(pag(base, layers="middle all"), family, CFG, steps)
    with_slg = ksample(slg(base, layers="middle all"), family, CFG, steps)
    both = ksample(slg(pag(base, layers="middle all"), layers="middle all"), family, CFG, steps)
    expected = with_pag + with_slg - cfg_only
    assert rel_diff(both, expected) <= 1e-5


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_a_node_that_replaces_our_patch_afterwards_is_an_error_not_a_silent_no_op(family):
    model = pag(tiny_model(family))
    overwritten = model.clone()
    if family == "sd15":
        def plain(q, k, v, extra_options):
            from comfy.ldm.modules.attention import optimized_attention
            return optimized_attention(q, k, v, extra_options["n_heads"])
        for group, block, layer in model_blocks.unet_layers(overwritten.model.diffusion_model):
            overwritten.set_model_attn1_replace(plain, group, block, transformer_index=layer)
    else:
        def passthrough(args, extra):
            return extra["original_block"](args)
        dit = overwritten.model_options["transformer_options"]["patches_replace"]["dit"]
        for key in list(dit):
            overwritten.set_model_patch_replace(passthrough, "dit", key[0], key[1])
    with pytest.raises(slots.PerturbationNotApplied, match=r"^PAG \(.*never reached the model"):
        ksample(overwritten, family, CFG, 2)
