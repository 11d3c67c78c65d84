"""TSG's time-embedding perturbation and ICG's per-step independent condition on real ComfyUI models
(tiny random weights): the TSG rows' embedding gets exactly s·t^α·n and nothing else changes, ICG
redraws its tokens and pooled vector every step from (seed, σ), and both give the same result in a run
split over two sampler calls and in a batch as in single runs."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import comfy.patcher_extension
import comfy.sample
import comfy.supported_models
import nodes as comfy_nodes
import pytest
import torch

from guidance_kit.guiders.attention_ops import seeded_generator
from guidance_kit.guiders.progress import sigma_key
from guidance_kit.nodes import perturbation as P
from guidance_kit.nodes.contributors import condition, time_input
from guidance_kit.nodes.runtime import engine
from tests.comfyui.harness import conditioning, counted, ksample, latent, out, rel_diff, tiny_model

CFG = 4.0
STEPS = 4
PAPER, LEGACY = P.TSG_PERTURB

# SDXL (ADM vector = pooled CLIP-G ‖ size embeddings) is not in the shared harness: ICG's pooled replacement
harness.CONFIGS.setdefault("sdxl", (comfy.supported_models.SDXL, dict(  # SDXL: 64 channels per head
    image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=64,
    use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential", use_temporal_attention=False,
    use_spatial_transformer=True, legacy=False, num_heads=2, num_head_channels=-1, use_temporal_resblock=False)))
harness.LATENT_SHAPES.setdefault("sdxl", (1, 4, 16, 16))
harness.CONTEXT.setdefault("sdxl", 64)

EMBEDDING_FAMILIES = ("sd15", "flux", "sd3", "wan21", "hunyuan_video", "qwen_image", "ltxv")


def prompt(family: str, seed: int, tokens: int = 6) -> list:
    c = conditioning(family, seed, tokens)
    if family == "sdxl":
        c[0][1]["pooled_output"] = torch.randn(1, 1280, generator=torch.Generator().manual_seed(seed + 100))
    return c


def tsg(model, scale=2.0, s=2.0, alpha=1.0, seed=0, perturb=PAPER, noise=0.1):
    return out(P.TSGNode.execute(model, scale, noise, seed, "constant", 0.0, 1.0, perturb=perturb, s=s, alpha=alpha))


def icg(model, seed=0):
    return out(P.ICGNode.execute(model, seed))


def sample(model, family, cfg=CFG, steps=STEPS, batch=1, start=None, last=None, noise=True, lat=None, seed=0):
    """The KSampler path (comfy.sample.sample); a KSamplerAdvanced-style part with start/last."""
    lat = latent(family, batch) if lat is None else lat
    noise_tensor = harness.noise_for(family, seed, batch) if noise else torch.zeros_like(lat)
    return comfy.sample.sample(model, noise_tensor, steps, cfg, "euler", "normal", prompt(family, 1),
                               prompt(family, 2), lat, disable_noise=not noise, start_step=start, last_step=last,
                               force_full_denoise=last is None, disable_pbar=True, seed=seed)


def split_sample(model, family, at=2):
    head = sample(model, family, start=0, last=at)
    return sample(model, family, start=at, noise=False, lat=head)


def batch_vs_singles(model, family, batch=4):
    """A batch (per-sample noise from batch_index, as KSampler) and the same samples run one by one."""
    def run(indices):
        lat = {"samples": latent(family, len(indices)), "batch_index": indices}
        return comfy_nodes.common_ksampler(model, 5, STEPS, CFG, "euler", "normal", prompt(family, 1),
                                           prompt(family, 2), lat)[0]["samples"]
    return run(list(range(batch))), torch.cat([run([i]) for i in range(batch)])


class Calls:
    """APPLY_MODEL spy (inside the pack's wrappers): σ, chunks, branch map and inputs of every forward."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        self.calls.append(dict(sigma=float(t.reshape(-1)[0]), chunks=list(transformer_options["cond_or_uncond"]),
                               branches=dict(transformer_options.get(engine.BRANCH_MAP_KEY) or {}),
                               context=c_crossattn.clone(), y=kwargs["y"].clone() if "y" in kwargs else None,
                               batch=x.shape[0]))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def spied(model):
    spy = Calls()
    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_spy", spy)
    return m, spy


def rows_of(call: dict, accept) -> list[int]:
    per = call["batch"] // len(call["chunks"])
    return [chunk * per + r for chunk, index in enumerate(call["chunks"])
            if accept(getattr(call["branches"].get(index), "perturbation", None)) for r in range(per)]


# --- TSG: the paper's time-embedding perturbation ----------------------------------------------------

@pytest.mark.parametrize("family", EMBEDDING_FAMILIES)
def test_tsg_adds_exactly_s_t_alpha_n_to_the_branch_rows_embedding_and_nothing_else(family):
    s, alpha, seed = 1.5, 0.5, 3
    model, calls = spied(tsg(tiny_model(family), s=s, alpha=alpha, seed=seed))
    site = time_input.site_of(model, "test")
    module = time_input._module_at(model.model.diffusion_model, site.path)
    seen = []

    def hook(mod, inputs, kwargs, output):
        original = type(mod).forward(mod, *inputs, **kwargs)
        emb, ref = (output[0], original[0]) if site.tuple_output else (output, original)
        seen.append(emb.float() - ref.float())

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        sample(model, family, steps=2, batch=2)
    finally:
        handle.remove()
    assert len(seen) == len(calls.calls) == 2
    sampling = model.get_model_object("model_sampling")
    for diff, call in zip(seen, calls.calls):
        per_row = diff.reshape(call["batch"], -1, diff.shape[-1])
        tsg_rows = rows_of(call, lambda p: isinstance(p, time_input.TimeEmbeddingNoise))
        assert len(tsg_rows) == 2  # the branch's chunk: both images of the batch
        t = time_input.diffusion_time(sampling, call["sigma"])
        n = torch.randn(diff.shape[-1], generator=seeded_generator(seed, sigma_key(call["sigma"]), diff.shape[-1]))
        expected = s * t ** alpha * n
        for row in range(call["batch"]):
            want = expected.expand_as(per_row[row]) if row in tsg_rows else torch.zeros_like(per_row[row])
            assert torch.allclose(per_row[row], want, atol=1e-4 * max(1.0, float(expected.abs().max()))), \
                f"{family}: row {row} of chunks {call['chunks']}"


def test_tsg_diffusion_time_is_sigma_on_flow_models_and_the_timestep_share_on_discrete_ones():
    flux = tiny_model("flux").get_model_object("model_sampling")
    assert time_input.diffusion_time(flux, 0.25) == 0.25
    sd15 = tiny_model("sd15").get_model_object("model_sampling")
    for timestep in (999.0, 500.0, 100.0):
        sigma = float(sd15.sigma(torch.tensor(timestep)))
        assert time_input.diffusion_time(sd15, sigma) == pytest.approx(timestep / 999.0, abs=2e-3)


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("perturb", [PAPER, LEGACY])
def test_tsg_split_run_equals_one_call(family, perturb):
    model = tsg(tiny_model(family), perturb=perturb)
    floor = rel_diff(split_sample(tiny_model(family), family), sample(tiny_model(family), family))
    assert rel_diff(split_sample(model, family), sample(model, family)) <= max(1e-5, 10 * floor)


@pytest.mark.parametrize("family", ["sd15", "wan21"])
@pytest.mark.parametrize("perturb", [PAPER, LEGACY])
def test_tsg_batch_of_four_equals_four_single_runs(family, perturb):
    batch, singles = batch_vs_singles(tsg(tiny_model(family), perturb=perturb), family)
    assert rel_diff(batch, singles) <= 1e-5


def test_tsg_noise_follows_the_seed_and_s_zero_is_the_conditional_model():
    family = "flux"
    base = tiny_model(family)
    a, b, c = (sample(tsg(base, seed=seed), family) for seed in (1, 1, 2))
    assert torch.equal(a, b) and rel_diff(a, c) > 1e-4
    assert rel_diff(sample(tsg(base, s=0.0), family, cfg=1.0), sample(base, family, cfg=1.0)) <= 1e-6


def test_tsg_paper_mode_refuses_chroma_and_names_the_time_input_shift():
    with pytest.raises(ValueError, match="(?s)Chroma.*time input shift"):
        tsg(tiny_model("chroma"))
    model, counter = counted(tsg(tiny_model("chroma"), perturb=LEGACY))
    plain = ksample(tiny_model("chroma"), "chroma", CFG, STEPS)
    assert rel_diff(ksample(model, "chroma", CFG, STEPS), plain) > 1e-3
    assert counter.batches == [3] * STEPS


def test_tsg_replaced_embedding_patch_is_an_error_not_a_silent_no_op():
    model = tsg(tiny_model("sd15"))
    model.add_object_patch("diffusion_model.time_embed.forward", model.model.diffusion_model.time_embed.forward)
    with pytest.raises(Exception, match="never perturbed"):
        sample(model, "sd15")


def test_tsg_rejects_an_unknown_perturb_value_at_validation():
    assert P.TSGNode.validate_inputs(perturb="both") != True  # noqa: E712


# --- ICG: an independent condition per step ----------------------------------------------------------

def icg_rows(call):
    return rows_of(call, lambda p: isinstance(p, condition.RandomCondition))


def cond_rows(call):
    per = call["batch"] // len(call["chunks"])
    return [chunk * per + r for chunk, index in enumerate(call["chunks"]) if index == 0 for r in range(per)]


@pytest.mark.parametrize("family", ["sd15", "flux", "wan21"])
def test_icg_draws_a_new_condition_every_step_with_the_prompts_statistics(family):
    model, calls = spied(icg(tiny_model(family), seed=4))
    sample(model, family)
    assert len(calls.calls) == STEPS
    text = prompt(family, 1)[0][0]
    contexts = []
    for call in calls.calls:
        (row,), (cond,) = icg_rows(call), cond_rows(call)
        assert torch.equal(call["context"][cond, :text.shape[1]], text[0])  # the prompt's rows keep the prompt
        contexts.append(call["context"][row, :text.shape[1]])
        n = torch.randn(text.shape[1:], generator=seeded_generator(4, sigma_key(call["sigma"]), 1, *text.shape[1:]))
        expected = text[0].mean(dim=0) + text[0].std(dim=0) * n  # the prompt's per-channel statistics, σ's draw
        assert torch.allclose(contexts[-1], expected, atol=1e-5)
    assert all(not torch.allclose(a, b) for i, a in enumerate(contexts) for b in contexts[i + 1:])


@pytest.mark.parametrize("family, width", [("sdxl", 1280), ("flux", None), ("sd3", None), ("hunyuan_video", None)])
def test_icg_replaces_the_pooled_text_vector_and_keeps_the_size_conditions(family, width):
    model, calls = spied(icg(tiny_model(family)))
    sample(model, family, steps=2)
    for call in calls.calls:
        (row,), (cond,) = icg_rows(call), cond_rows(call)
        y = call["y"]
        pooled = y.shape[1] if width is None else width
        assert not torch.allclose(y[row, :pooled], y[cond, :pooled])
        assert torch.equal(y[row, pooled:], y[cond, pooled:])  # SDXL's size/crop embeddings are not the prompt
        ref = y[cond, :pooled].float()
        assert float(y[row, :pooled].float().mean()) == pytest.approx(float(ref.mean()), abs=4 * float(ref.std()) /
                                                                      pooled ** 0.5)
    steps = [call["y"][icg_rows(call)[0]] for call in calls.calls]
    assert not torch.allclose(steps[0], steps[1])


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_icg_split_run_equals_one_call(family):
    model = icg(tiny_model(family))
    floor = rel_diff(split_sample(tiny_model(family), family), sample(tiny_model(family), family))
    assert rel_diff(split_sample(model, family), sample(model, family)) <= max(1e-5, 10 * floor)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_icg_batch_of_four_equals_four_single_runs(family):
    batch, singles = batch_vs_singles(icg(tiny_model(family)), family)
    assert rel_diff(batch, singles) <= 1e-5


def test_icg_with_the_null_condition_is_exactly_cfg(monkeypatch):
    """ICG's machinery with the 'independent' condition := the negative prompt reproduces CFG."""
    family = "sd15"
    negative = prompt(family, 2)
    monkeypatch.setattr(condition, "independent_embedding",
                        lambda reference, noise: negative[0][0].expand_as(reference))
    base = tiny_model(family)
    assert rel_diff(sample(icg(base), family), sample(base, family)) <= 1e-6


def test_icg_without_a_text_context_is_a_clear_error():
    cond = {"model_conds": {}}
    with pytest.raises(ValueError, match="ICG needs a text"):
        condition.RandomCondition("ICG").rewrite_cond(cond)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_icg_and_nag_stack_in_either_order(family):
    """NAG appends its negative's tokens to every row's context; ICG replaces only the prompt's tokens of its
    rows, whichever wrapper runs first."""
    from guidance_kit.nodes import nag as N

    def nag(model):
        return out(N.NAGNode.execute(model, conditioning(family, 7, 5), N.AUTO, N.AUTO, N.AUTO, 0.0, 1.0, 0.0))

    base = tiny_model(family)
    first = sample(nag(icg(base)), family)
    second = sample(icg(nag(base)), family)
    assert rel_diff(first, second) <= 1e-5
    assert rel_diff(first, sample(icg(base), family)) > 1e-3
