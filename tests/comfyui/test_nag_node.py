"""NAG on real ComfyUI models (tiny random weights, the 8 harness families plus Cosmos Predict2): the
NAG negative changes the output inside one model call per step (cfg 1: one chunk), a NAG negative
equal to the prompt reproduces the model without NAG, only the prompt's rows are guided, the window
holds, it stacks with CFG-space and perturbation terms in one batched call, and it fails clearly where
it cannot act."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import comfy.patcher_extension
import comfy.supported_models
import pytest
import torch

from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes import guider as gd
from guidance_kit.nodes import nag as N
from guidance_kit.nodes import perturbation as P
from guidance_kit.nodes.contributors import nag as nag_contributor
from guidance_kit.nodes.runtime import blocks as model_blocks
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

STEPS = 3
CFG = 4.0
AUTO = N.AUTO

NAG_FAMILIES = ALL_FAMILIES + tuple(f for f in NEW_FAMILIES if f not in ("mochi", "hidream", "cosmos"))  # refused


def nag(model, negative, scale=AUTO, tau=AUTO, alpha=AUTO, start=0.0, end=1.0, sigma_end=0.0):
    return out(N.NAGNode.execute(model, negative, scale, tau, alpha, start, end, sigma_end))


def nag_negative(family, seed=7, tokens=5):
    return conditioning(family, seed, tokens=tokens)


class ContextSpy:
    """APPLY_MODEL wrapper inside NAG's: the context tokens and chunks each model call receives."""

    def __init__(self):
        self.tokens: list[int] = []
        self.chunks: list[list[int]] = []

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        self.tokens.append(int(c_crossattn.shape[1]))
        self.chunks.append(list(transformer_options.get("cond_or_uncond", [])))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def spied(model):
    spy = ContextSpy()
    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_context_spy", spy)
    return m, spy


class PredictionSpy:
    """Post-cfg function recording the conditional and unconditional predictions of each step."""

    def __init__(self):
        self.cond: list[torch.Tensor] = []
        self.uncond: list[torch.Tensor] = []

    def __call__(self, args):
        self.cond.append(args["cond_denoised"].clone())
        self.uncond.append(args["uncond_denoised"].clone())
        return args["denoised"]


def predictions(model):
    spy = PredictionSpy()
    m = model.clone()
    m.set_model_sampler_post_cfg_function(spy)
    return m, spy


# --- what NAG does, per family ---------------------------------------------------------------------

@pytest.mark.parametrize("family", NAG_FAMILIES)
def test_nag_changes_the_output_in_one_forward_of_one_chunk_per_step_at_cfg_one(family):
    base = tiny_model(family)
    plain = ksample(base, family, 1.0, STEPS)
    model, counter = counted(nag(base, nag_negative(family)))
    guided = ksample(model, family, 1.0, STEPS)
    assert torch.isfinite(guided).all()
    assert rel_diff(guided, plain) > 1e-3, f"NAG did nothing on {family}"
    assert counter.batches == [1] * STEPS  # no uncond, no second forward: only the extra attention


@pytest.mark.parametrize("family", NAG_FAMILIES)
@pytest.mark.parametrize("cfg", [1.0, CFG])
def test_a_nag_negative_equal_to_the_prompt_is_the_model_without_nag(family, cfg):
    """Z⁻ = Z⁺ in every attention, so NAG is the identity: the negative's tokens, processed by the
    model's own text layers next to the prompt's, reach the same features."""
    base = tiny_model(family)
    prompt = conditioning(family, 1)
    plain = ksample(base, family, cfg, STEPS, positive=prompt)
    same = ksample(nag(base, prompt), family, cfg, STEPS, positive=prompt)
    assert rel_diff(same, plain) <= 1e-5


@pytest.mark.parametrize("family", ["sd15", "flux", "sd3", "wan21", "hunyuan_video", "qwen_image", "ltxv", "lumina2"])
def test_only_the_prompts_rows_are_guided_with_cfg(family):
    base = tiny_model(family)
    plain_model, plain = predictions(base)
    ksample(plain_model, family, CFG, 1)
    guided_model, guided = predictions(nag(base, nag_negative(family)))
    ksample(guided_model, family, CFG, 1)
    assert rel_diff(guided.uncond[0], plain.uncond[0]) <= 1e-5  # the negative prompt's rows: no NAG
    assert rel_diff(guided.cond[0], plain.cond[0]) > 1e-3


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_the_window_decides_which_steps_carry_the_negative_tokens(family):
    base = tiny_model(family)
    model, spy = spied(nag(base, nag_negative(family, tokens=5), start=0.0, end=0.34))
    windowed = ksample(model, family, 1.0, 4)
    prompt_tokens = conditioning(family, 1)[0][0].shape[1]
    assert spy.tokens == [prompt_tokens + 5] * 2 + [prompt_tokens] * 2  # progress 0, ⅓ | ⅔, 1
    late, late_spy = spied(nag(base, nag_negative(family, tokens=5), start=0.5, end=1.0))
    ksample(late, family, 1.0, 4)
    assert late_spy.tokens == [prompt_tokens] * 2 + [prompt_tokens + 5] * 2
    assert rel_diff(windowed, ksample(base, family, 1.0, 4)) > 1e-4


def test_sigma_end_stops_nag_like_the_official_nag_sigma_end():
    family = "flux"
    base = tiny_model(family)
    sigmas = harness.sigmas_for(base, 4)
    model, spy = spied(nag(base, nag_negative(family), sigma_end=float(sigmas[1]) - 1e-4))
    ksample(model, family, 1.0, 4)
    prompt_tokens = conditioning(family, 1)[0][0].shape[1]
    assert spy.tokens == [prompt_tokens + 5] * 2 + [prompt_tokens] * 2


def test_a_window_no_step_reaches_is_an_error():
    model = nag(tiny_model("flux"), nag_negative("flux"), sigma_end=5.0)  # flow sigmas are ≤ 1
    with pytest.raises(ValueError, match="^NAG: no step of this run falls inside the window"):
        ksample(model, "flux", 1.0, 3)


def test_scale_one_is_exactly_the_model_and_adds_no_tokens():
    family = "flux"
    base = tiny_model(family)
    model, spy = spied(nag(base, nag_negative(family), scale=1.0))
    assert torch.equal(ksample(model, family, 1.0, STEPS), ksample(base, family, 1.0, STEPS))
    assert spy.tokens == [conditioning(family, 1)[0][0].shape[1]] * STEPS


@pytest.mark.parametrize("family", ["sd15", "flux", "wan21", "ltxv"])
def test_latent_batches_and_negatives_of_other_lengths_and_batches(family):
    base = tiny_model(family)
    long_negative = nag_negative(family, tokens=11)
    two = ksample(nag(base, long_negative), family, CFG, STEPS, batch=2)
    assert torch.isfinite(two).all()
    assert rel_diff(two, ksample(base, family, CFG, STEPS, batch=2)) > 1e-3
    # a batch-1 negative broadcasts: each latent gets the same result as when sampled alone
    one = ksample(nag(base, long_negative), family, CFG, STEPS, batch=1)
    assert rel_diff(two[:1], one) <= 1e-4
    # a negative with one encoding per latent
    per_latent = [[torch.cat([long_negative[0][0], nag_negative(family, 8, tokens=11)[0][0]]), long_negative[0][1]]]
    mixed = ksample(nag(base, per_latent), family, CFG, STEPS, batch=2)
    assert rel_diff(mixed[:1], two[:1]) <= 1e-4 and rel_diff(mixed[1:], two[1:]) > 1e-4


def padded(family, seed, tokens, valid):
    """A conditioning whose last tokens are padding (attention mask 0), as T5/LLM encoders give."""
    cond = conditioning(family, seed, tokens=tokens)
    mask = torch.zeros(1, tokens, dtype=torch.long)
    mask[:, :valid] = 1
    return [[cond[0][0], dict(cond[0][1], attention_mask=mask)]]


@pytest.mark.parametrize("family", ["hunyuan_video", "ltxv"])
def test_text_masks_are_extended_with_the_negatives_own(family):
    base = tiny_model(family)
    prompt = padded(family, 1, 8, 6)
    cfg = 1.0 if family == "hunyuan_video" else CFG  # ComfyUI's HunyuanVideo cannot batch text masks
    plain = ksample(base, family, cfg, STEPS, positive=prompt, negative=padded(family, 2, 8, 5))
    same = ksample(nag(base, prompt), family, cfg, STEPS, positive=prompt, negative=padded(family, 2, 8, 5))
    assert rel_diff(same, plain) <= 1e-5  # the negative's padding stays masked, the prompt's too
    guided = ksample(nag(base, padded(family, 7, 9, 4)), family, cfg, STEPS, positive=prompt,
                     negative=padded(family, 2, 8, 5))
    assert torch.isfinite(guided).all() and rel_diff(guided, plain) > 1e-3


def test_unet_contexts_repeated_to_a_common_length_keep_their_split():
    """ComfyUI repeats UNet contexts of different lengths to a common multiple inside one batch;
    the prompt's part of the context is then the repeated one, the negative's tokens follow it."""
    family = "sd15"
    base = tiny_model(family)
    prompt, uncond = conditioning(family, 1, tokens=6), conditioning(family, 2, tokens=9)
    plain = ksample(base, family, CFG, STEPS, positive=prompt, negative=uncond)
    model, spy = spied(nag(base, prompt))
    same = ksample(model, family, CFG, STEPS, positive=prompt, negative=uncond)
    assert spy.tokens == [18 + 6] * STEPS
    assert rel_diff(same, plain) <= 1e-5


@pytest.mark.parametrize("family", ["sd15", "flux", "ltxv"])
def test_result_survives_comfyui_splitting_the_batch(family, monkeypatch):
    base = tiny_model(family)
    model = nag(base, nag_negative(family))
    together = ksample(model, family, CFG, STEPS)
    monkeypatch.setattr(base.model, "memory_required", lambda *a, **k: float("inf"))
    split_model, counter = counted(model)
    split = ksample(split_model, family, CFG, STEPS)
    assert max(counter.batches) == 1 and counter.calls == 2 * STEPS
    assert rel_diff(split, together) <= 1e-5


# --- stacking --------------------------------------------------------------------------------------

def pag(m, layers="auto"):
    return out(P.PAGNode.execute(m, 2.0, layers, "constant", 0.0, 1.0))


def apg(m):
    return out(cm.APGNode.execute(m, 0.0, 15.0, -0.5))


@pytest.mark.parametrize("family", ["sd15", "flux", "wan21", "hunyuan_video", "qwen_image", "lumina2"])
def test_stacks_with_apg_and_pag_in_one_batched_call(family):
    base = tiny_model(family)
    without = apg(pag(base))
    stacked, counter = counted(nag(without, nag_negative(family)))
    result = ksample(stacked, family, CFG, STEPS)
    assert torch.isfinite(result).all()
    assert counter.batches == [3] * STEPS  # cond (with NAG), uncond, PAG branch: one forward
    assert rel_diff(result, ksample(without, family, CFG, STEPS)) > 1e-3
    # node order does not matter
    reordered = pag(apg(nag(base, nag_negative(family))))
    assert rel_diff(ksample(reordered, family, CFG, STEPS), result) <= 1e-5


@pytest.mark.parametrize("family", ["flux", "sd3", "hunyuan_video", "qwen_image", "wan21", "sd15", "lumina2"])
def test_nag_leaves_perturbation_branches_exact(family):
    """With a NAG negative equal to the prompt NAG is the identity, so PAG, skip-layer and TPG
    (token shuffling) must give exactly their results without NAG: the negative's tokens never
    leak into the branches' attention or blocks."""
    base = tiny_model(family)
    prompt = conditioning(family, 1)
    stack = pag(base)
    stack = out(P.SkipLayerNode.execute(stack, 1.5, "auto", "constant", 0.0, 1.0))
    if family != "sd3":
        stack = out(P.TPGNode.execute(stack, 1.5, "auto", 0, "constant", 0.0, 1.0))
    plain = ksample(stack, family, CFG, STEPS, positive=prompt)
    with_nag = ksample(nag(stack, prompt), family, CFG, STEPS, positive=prompt)
    assert rel_diff(with_nag, plain) <= 1e-5


@pytest.mark.parametrize("family", ["flux", "sd15"])
def test_the_guidance_guider_samples_nag_like_ksampler(family):
    model = apg(nag(tiny_model(family), nag_negative(family)))
    via_ksampler = ksample(model, family, CFG, STEPS)
    guider = out(gd.GuidanceGuiderNode.execute(model, conditioning(family, 1), conditioning(family, 2), CFG))
    assert rel_diff(custom_advanced(guider, family, STEPS), via_ksampler) <= 1e-5


def test_nag_chains_to_an_existing_cross_attention_patch():
    """An attn2 replace of another node (IP-Adapter style) keeps running and computes Z⁺ and Z⁻."""
    base = tiny_model("sd15")
    seen = []

    def previous(q, k, v, extra_options):  # numerically the plain attention
        seen.append((q.shape[0], k.shape[1]))
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra_options["n_heads"])

    patched = base.clone()
    for group, block, layer in model_blocks.unet_layers(patched.model.diffusion_model):
        patched.set_model_attn2_replace(previous, group, block, transformer_index=layer)
    chained = ksample(nag(patched, nag_negative("sd15")), "sd15", CFG, STEPS)
    assert rel_diff(chained, ksample(nag(base, nag_negative("sd15")), "sd15", CFG, STEPS)) <= 1e-5
    assert (2, 6) in seen and (1, 5) in seen  # Z⁺ on both rows over the prompt, Z⁻ on the prompt's row


def test_a_node_that_replaces_the_nag_patches_afterwards_is_an_error_not_a_silent_no_op():
    model = nag(tiny_model("sd15"), nag_negative("sd15"))
    overwritten = model.clone()

    def plain(q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra_options["n_heads"])

    for group, block, layer in model_blocks.unet_layers(overwritten.model.diffusion_model):
        overwritten.set_model_attn2_replace(plain, group, block, transformer_index=layer)
    with pytest.raises(nag_contributor.NagNotApplied, match=r"^NAG: the NAG attention never ran"):
        ksample(overwritten, "sd15", CFG, 2)


# --- node contract ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family, expected", [
    ("sd15", (5.0, 2.5, 0.38)), ("flux", (5.0, 2.5, 0.25)), ("sd3", (5.0, 2.5, 0.125)), ("wan21", (9.0, 2.5, 0.25)),
    ("hunyuan_video", (9.0, 2.5, 0.12)), ("chroma", (5.0, 2.5, 0.25)),
])
def test_auto_picks_the_official_family_defaults(family, expected):
    model = nag(tiny_model(family), nag_negative(family))
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    settings = model.get_wrappers(apply_model, nag_contributor.NAG_WRAPPER_KEY)[0].settings
    assert (settings.scale, settings.tau, settings.alpha) == expected
    explicit = nag(tiny_model(family), nag_negative(family), scale=2.0, tau=1.5, alpha=0.7)
    settings = explicit.get_wrappers(apply_model, nag_contributor.NAG_WRAPPER_KEY)[0].settings
    assert (settings.scale, settings.tau, settings.alpha) == (2.0, 1.5, 0.7)


def test_the_node_never_mutates_its_input_model():
    for family in ("sd15", "flux", "wan21", "hunyuan_video"):
        base = tiny_model(family)
        before = (repr(base.model_options), dict(base.object_patches), repr(base.wrappers))
        nag(base, nag_negative(family))
        assert (repr(base.model_options), dict(base.object_patches), repr(base.wrappers)) == before


def test_a_second_nag_node_is_an_error():
    model = nag(tiny_model("flux"), nag_negative("flux"))
    with pytest.raises(ValueError, match="^NAG: this model already has NAG"):
        nag(model, nag_negative("flux"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=0.5), "scale must be ≥ 1"), (dict(tau=0.5), "tau must be ≥ 1"), (dict(alpha=1.5), "alpha is a blend"),
    (dict(start_percent=0.8, end_percent=0.2), "the window is empty"),
])
def test_bad_inputs_are_rejected_at_validation(kwargs, message):
    assert N.NAGNode.validate_inputs(**kwargs).startswith(f"NAG: {message}")
    assert N.NAGNode.validate_inputs() is True


def test_a_combined_or_foreign_negative_is_a_clear_error():
    family = "sd15"
    combined = nag_negative(family) + nag_negative(family, 8)
    with pytest.raises(ValueError, match="^NAG: nag_negative has 2 conditioning entries"):
        nag(tiny_model(family), combined)
    foreign = [[torch.randn(1, 5, 32), {}]]  # another text encoder's width
    with pytest.raises(ValueError, match="^NAG: the NAG negative has 32 channels per token, the prompt 64"):
        ksample(nag(tiny_model(family), foreign), family, 1.0, 1)


@pytest.mark.parametrize("class_name, module, family", [
    ("HiDreamImageTransformer2DModel", "comfy.ldm.hidream.model", "HiDream"),
    ("GeneralDIT", "comfy.ldm.cosmos.model", "Cosmos"),
    ("MMDiT", "comfy.ldm.aura.mmdit", "AuraFlow"),
    ("WanModel_S2V", "comfy.ldm.wan.model", "WAN S2V"),
])
def test_unsupported_families_are_a_clear_error_naming_the_family_and_the_alternative(class_name, module, family):
    net_class = type(class_name, (torch.nn.Module,), {"__module__": module})

    class Fake:
        class model:  # noqa: N801
            diffusion_model = net_class()

    with pytest.raises(ValueError, match=rf"^NAG: NAG has no attention hook for {family}\. .*negative prompt with "
                                         rf"cfg > 1"):
        nag(Fake, nag_negative("sd15"))


# --- the NAG negative's own pooled vector (Flux, SD3, HunyuanVideo; nodes/nag_modulation.py) ---------------

def same_text_other_pooled(family, seed=11):
    """The prompt's tokens with another pooled vector: Z⁻ differs from Z⁺ only through the modulation."""
    negative = conditioning(family, 1)
    pooled = torch.randn(1, 32, generator=torch.Generator().manual_seed(seed))
    negative[0][1] = dict(negative[0][1], pooled_output=pooled)
    return negative


@pytest.mark.parametrize("family", ["flux", "sd3", "hunyuan_video"])
def test_the_negatives_text_is_modulated_with_its_own_pooled_vector(family, monkeypatch):
    base = tiny_model(family)
    plain = ksample(base, family, 1.0, STEPS)
    own = ksample(nag(base, same_text_other_pooled(family)), family, 1.0, STEPS)
    assert rel_diff(own, plain) > 1e-3  # only the pooled vector differs, and it acts
    monkeypatch.setattr(N.nag_modulation, "for_family", lambda spec, pooled, owner: None)  # the prompt's pooled
    assert rel_diff(ksample(nag(base, same_text_other_pooled(family)), family, 1.0, STEPS), plain) <= 1e-5


@pytest.mark.parametrize("family", ["chroma", "qwen_image", "sd15", "wan21"])
def test_families_without_pooled_modulation_ignore_the_negatives_pooled_vector(family):
    base = tiny_model(family)
    negative = conditioning(family, 1)
    negative[0][1] = dict(negative[0][1], pooled_output=torch.randn(1, 32))
    assert rel_diff(ksample(nag(base, negative), family, 1.0, STEPS), ksample(base, family, 1.0, STEPS)) <= 1e-5


def test_flux_negative_tokens_get_exactly_the_negatives_own_modulation_vector():
    """txt_mod of a double block and modulation of a single block: at the NAG negative's text positions of the
    prompt's rows, the modulation of vec⁻ = time + guidance + vector_in(pooled⁻) computed from the model's own
    embedders; every other token the prompt's modulation (cfg 1: one row, the prompt's)."""
    from comfy.ldm.flux.layers import timestep_embedding

    family = "flux"
    negative = nag_negative(family, tokens=5)
    model = nag(tiny_model(family), negative)
    net = model.model.diffusion_model
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, []).append((inputs[0].clone(), output[0]))
        return hook

    handles = [net.double_blocks[0].txt_mod.register_forward_hook(record("double")),
               net.single_blocks[0].modulation.register_forward_hook(record("single"))]
    try:
        ksample(model, family, 1.0, 1)
    finally:
        for h in handles:
            h.remove()
    (vec, double), = seen["double"]
    (_, single), = seen["single"]
    sigma = float(model.get_model_object("model_sampling").sigmas[-1])  # the first step: σ_max
    t = torch.tensor([sigma])
    own = net.time_in(timestep_embedding(t, 256)) + net.guidance_in(timestep_embedding(torch.tensor([3.5]), 256)) + \
        net.vector_in(negative[0][1]["pooled_output"])
    expected_double = type(net.double_blocks[0].txt_mod).forward(net.double_blocks[0].txt_mod, own)[0]
    expected_single = type(net.single_blocks[0].modulation).forward(net.single_blocks[0].modulation, own)[0]
    prompt_double = type(net.double_blocks[0].txt_mod).forward(net.double_blocks[0].txt_mod, vec)[0]
    text = double.shift.shape[1]
    assert vec.shape[0] == 1
    for name in ("shift", "scale", "gate"):
        got = getattr(double, name)
        assert torch.allclose(got[0, text - 5:], getattr(expected_double, name)[0, 0].expand(5, -1), atol=1e-5)
        assert torch.equal(got[0, :text - 5], getattr(prompt_double, name)[0, 0].expand(text - 5, -1))
        got_single = getattr(single, name)
        negative_positions = slice(text - 5, text)  # Flux single stream: [text, image]
        assert torch.allclose(got_single[0, negative_positions], getattr(expected_single, name)[0, 0].expand(5, -1),
                              atol=1e-5)
