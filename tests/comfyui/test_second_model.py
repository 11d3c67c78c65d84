"""Guidance from a second model on real ComfyUI models (issue 8): Autoguidance, Unconditional Priors,
Diffusion-NPO (LoRA) and Personalization Guidance, on two tiny models of the same family (SD1.5 UNet,
Flux) and a tiny LoRA file written here.

The central cross-check: a branch computed as LoRA rows on the shared weights (no copy) equals the
same branch computed on a separately loaded model whose weights have the LoRA merged in, so the
no-copy path is exactly the weight interpolation / NPO model it stands for.
"""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.sd
import folder_paths
import pytest
import torch
from safetensors.torch import save_file

from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes import model_guidance as MG
from guidance_kit.nodes import perturbation as P
from guidance_kit.nodes.contributors import row_delta, second_model
from tests.comfyui.harness import CONFIGS, counted, init_random_, ksample, out, rel_diff, tiny_model

CFG = 4.0
STEPS = 4
FAMILIES = ("sd15", "flux")
SMALLER = {"sd15": dict(channel_mult=[1, 1]), "flux": dict(depth=1, depth_single_blocks=1)}


def separate_model(family: str, seed: int = 0, **overrides) -> comfy.model_patcher.ModelPatcher:
    """A separately built tiny model (own weights in memory, like a second checkpoint loader).
    seed 0 gives the same values as harness.tiny_model(family)."""
    cls, unet_config = CONFIGS[family]
    config = cls({**unet_config, **overrides})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_random_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


LORA_TARGETS = {
    "sd15": ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
             "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k",
             "diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
             "diffusion_model.input_blocks.1.1.proj_in",        # 1×1 conv
             "diffusion_model.input_blocks.1.0.in_layers.2",    # 3×3 conv (LoCon)
             "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_v",
             "diffusion_model.output_blocks.1.1.transformer_blocks.0.attn1.to_out.0"],
    "flux": ["diffusion_model.double_blocks.0.img_attn.proj",
             "diffusion_model.double_blocks.1.img_mlp.0",
             "diffusion_model.single_blocks.0.linear2",
             "transformer.transformer_blocks.1.attn.to_k",       # diffusers key → a slice of the fused qkv
             "diffusion_model.final_layer.linear"],
}


def write_lora(tmp_path, family: str, name: str, seed: int, rank: int = 2, magnitude: float = 0.5) -> str:
    """A tiny LoRA file in the standard up/down/alpha format (kohya 3×3 down for convs)."""
    model = tiny_model(family)
    sd = model.model.state_dict()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for target in LORA_TARGETS[family]:
        if target.startswith("transformer."):
            weight = sd["diffusion_model.double_blocks.1.img_attn.qkv.weight"]
            out_features, in_features = weight.shape[0] // 3, weight.shape[1]
            tensors[target + ".lora_A.weight"] = torch.randn(rank, in_features, generator=g) / in_features ** 0.5
            tensors[target + ".lora_B.weight"] = torch.randn(out_features, rank, generator=g) * magnitude
            continue
        weight = sd[target + ".weight"]
        if weight.ndim == 4:
            down = torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=g) / weight[0].numel() ** 0.5
            up = torch.randn(weight.shape[0], rank, 1, 1, generator=g) * magnitude
        else:
            down = torch.randn(rank, weight.shape[1], generator=g) / weight.shape[1] ** 0.5
            up = torch.randn(weight.shape[0], rank, generator=g) * magnitude
        tensors[target + ".lora_down.weight"] = down
        tensors[target + ".lora_up.weight"] = up
        tensors[target + ".alpha"] = torch.tensor(float(rank) * 0.75)
    folder = tmp_path / "loras"
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / name))
    folder_paths.add_model_folder_path("loras", str(folder))
    return name


def lora_sd(name: str) -> dict:
    import comfy.utils

    return comfy.utils.load_torch_file(folder_paths.get_full_path("loras", name), safe_load=True)


def with_lora(model, name: str, strength: float):
    """LoraLoaderModelOnly's path."""
    return comfy.sd.load_lora_for_models(model, None, lora_sd(name), strength, 0)[0]


def uncond_prior(model, second, scale=1.0, start=0.0, end=1.0):
    return out(MG.UnconditionalPriorNode.execute(model, second, scale, "constant", start, end))


def autoguidance(model, weak, scale=1.0):
    return out(MG.AutoguidanceNode.execute(model, weak, scale, "constant", 0.0, 1.0))


# ------------------------------------------------------------------------------------------------
# a second checkpoint
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_uncond_prior_runs_the_uncond_on_the_second_model(family):
    main, main_counter = counted(tiny_model(family))
    prior, prior_counter = counted(separate_model(family, seed=3))
    plain = ksample(main, family, CFG, STEPS)
    main_counter.batches.clear()
    guided = ksample(uncond_prior(main, prior), family, CFG, STEPS)
    assert torch.isfinite(guided).all() and rel_diff(guided, plain) > 1e-3
    # β = 1: the sampled model runs the cond only, the prior the uncond, once per step each
    assert main_counter.batches == [1] * STEPS and prior_counter.batches == [1] * STEPS
    # the same weights loaded twice: exactly plain CFG
    same = ksample(uncond_prior(main, separate_model(family, seed=0)), family, CFG, STEPS)
    assert rel_diff(same, plain) < 1e-5
    # β = 0.5: both unconds run (blend); outside the window the sampled model's own uncond
    main_counter.batches.clear()
    prior_counter.batches.clear()
    ksample(uncond_prior(main, prior, scale=0.5), family, CFG, STEPS)
    assert main_counter.batches == [2] * STEPS and prior_counter.batches == [1] * STEPS
    prior_counter.batches.clear()
    ksample(uncond_prior(main, prior, start=0.5), family, CFG, STEPS)
    assert prior_counter.calls == STEPS // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_autoguidance_with_a_smaller_model_of_the_family(family):
    main, main_counter = counted(tiny_model(family))
    weak, weak_counter = counted(separate_model(family, seed=5, **SMALLER[family]))
    plain = ksample(main, family, CFG, STEPS)
    main_counter.batches.clear()
    guided = ksample(autoguidance(main, weak, 1.5), family, CFG, STEPS)
    assert torch.isfinite(guided).all() and rel_diff(guided, plain) > 1e-3
    assert main_counter.batches == [2] * STEPS and weak_counter.batches == [1] * STEPS
    assert rel_diff(ksample(autoguidance(main, weak, 0.0), family, CFG, STEPS), plain) == 0.0


def test_stacks_with_cfg_space_and_perturbation_terms():
    family = "sd15"
    main, main_counter = counted(tiny_model(family))
    weak, weak_counter = counted(separate_model(family, seed=5, **SMALLER[family]))
    prior = separate_model(family, seed=3)
    base = out(P.PAGNode.execute(main, 2.0, "auto", "constant", 0.0, 1.0))
    base = out(cm.APGNode.execute(out(cm.TCFGNode.execute(base)), 0.0, 15.0, -0.5))
    m = autoguidance(uncond_prior(base, prior), weak, 1.0)
    guided = ksample(m, family, CFG, STEPS)
    assert torch.isfinite(guided).all()
    # main: cond + PAG branch in one call; prior: uncond; weak: cond
    assert main_counter.batches[-STEPS:] == [2] * STEPS and weak_counter.batches == [1] * STEPS
    # each second-model term still acts inside the stack
    assert rel_diff(guided, ksample(uncond_prior(base, prior), family, CFG, STEPS)) > 1e-3
    assert rel_diff(guided, ksample(autoguidance(base, weak, 1.0), family, CFG, STEPS)) > 1e-3
    with pytest.raises(ValueError, match="already comes from Unconditional Prior"):
        P.ICGNode.execute(m, 0)


def test_the_second_model_is_loaded_by_model_management():
    family = "sd15"
    seen = []

    def probe(executor, x, *args, **kwargs):
        seen.append([lm.model for lm in comfy.model_management.current_loaded_models])
        return executor(x, *args, **kwargs)

    prior = separate_model(family, seed=3)
    p = prior.clone()
    p.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "probe", probe)
    m = uncond_prior(tiny_model(family), p)
    ksample(m, family, CFG, 2)
    assert seen and all(any(lm is not None and lm.model is prior.model for lm in loaded) for loaded in seen)
    assert prior.model.current_patcher is None  # released after the run


def test_family_and_shape_mismatch_are_clear_errors():
    with pytest.raises(ValueError, match="Unconditional Prior: the uncond model .* not of the sampled model's family"):
        uncond_prior(tiny_model("sd15"), tiny_model("flux"))
    with pytest.raises(ValueError, match="context_dim: 64 vs 32"):
        autoguidance(tiny_model("sd15"), separate_model("sd15", context_dim=32))
    # a mismatch reaching the sampler (attached by other means) fails at sampling start
    m = uncond_prior(tiny_model("sd15"), separate_model("sd15", seed=3))
    m.set_additional_models(second_model.second_model_key("UnconditionalPrior"), [tiny_model("flux")])
    with pytest.raises(second_model.SecondModelError, match="not of the sampled model's family"):
        ksample(m, "sd15", CFG, 2)


# ------------------------------------------------------------------------------------------------
# the same weights: LoRA rows (no copy), checked against separately merged models
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_lora_clone_as_uncond_prior_equals_a_separate_base_model(family, tmp_path):
    name = write_lora(tmp_path, family, f"ft_{family}.safetensors", seed=11)
    base = tiny_model(family)
    fine_tuned, counter = counted(with_lora(base, name, 1.0))
    shared = ksample(uncond_prior(fine_tuned, base), family, CFG, STEPS)  # LoraLoader before/after: one model
    assert counter.batches == [2] * STEPS  # cond and the base-weight uncond rows in one forward
    separate = ksample(uncond_prior(with_lora(base, name, 1.0), separate_model(family, 0)), family, CFG, STEPS)
    plain = ksample(with_lora(base, name, 1.0), family, CFG, STEPS)
    assert rel_diff(shared, plain) > 1e-3
    assert rel_diff(shared, separate) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lam", [0.0, 0.4])
def test_personalization_lambda_equals_the_interpolated_model(family, lam, tmp_path):
    name = write_lora(tmp_path, family, f"person_{family}.safetensors", seed=12)
    base = tiny_model(family)
    s = 0.8
    node = out(MG.PersonalizationGuidanceNode.execute(base, name, s, lam, 1.0, "constant", 0.0, 1.0))
    node, counter = counted(node)
    guided = ksample(node, family, CFG, STEPS)
    assert counter.batches == [2] * STEPS
    # reference: θ_ft sampled, uncond from a separately loaded θ_λ = θ_pre + λ·s·ΔW (merged weights)
    reference = ksample(uncond_prior(with_lora(base, name, s), with_lora(separate_model(family, 0), name, lam * s)),
                        family, CFG, STEPS)
    assert rel_diff(guided, reference) < 1e-4
    # λ = 1: the fine-tune's own uncond, i.e. plain CFG of θ_ft
    one = out(MG.PersonalizationGuidanceNode.execute(base, name, s, 1.0, 1.0, "constant", 0.0, 1.0))
    assert rel_diff(ksample(one, family, CFG, STEPS), ksample(with_lora(base, name, s), family, CFG, STEPS)) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_npo_lora_equals_a_separate_npo_model(family, tmp_path):
    name = write_lora(tmp_path, family, f"npo_{family}.safetensors", seed=13)
    base = tiny_model(family)
    node, counter = counted(out(MG.NPONode.execute(base, name, 0.7, 1.0, "constant", 0.0, 1.0)))
    guided = ksample(node, family, CFG, STEPS)
    assert counter.batches == [2] * STEPS
    reference = ksample(uncond_prior(base, with_lora(separate_model(family, 0), name, 0.7)), family, CFG, STEPS)
    assert rel_diff(guided, ksample(base, family, CFG, STEPS)) > 1e-3
    assert rel_diff(guided, reference) < 1e-4


def _storage_bytes(tensors) -> tuple[int, int]:
    seen, total = set(), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return len(seen), total


def test_personalization_keeps_one_copy_of_the_weights(tmp_path):
    """Memory: the forward that evaluates θ_ft and θ_λ sees exactly the parameters of the plain LoRA model
    (one set); the only addition is the LoRA factors. Measured on unique tensor storages."""
    family = "sd15"
    name = write_lora(tmp_path, family, "mem.safetensors", seed=14)
    base = tiny_model(family)
    measured = {}

    def probe(tag):
        def wrapper(executor, x, *args, **kwargs):
            model = executor.class_obj
            params = list(model.state_dict().values())
            patcher = model.current_patcher
            backups = [b.weight for b in patcher.backup.values()] + [b[0] for b in patcher.hook_backup.values()]
            measured[tag] = (_storage_bytes(params), _storage_bytes(params + backups))
            return executor(x, *args, **kwargs)
        return wrapper

    plain = with_lora(base, name, 1.0)
    plain.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "mem", probe("plain"))
    ksample(plain, family, CFG, 2)
    node = out(MG.PersonalizationGuidanceNode.execute(base, name, 1.0, 0.3, 1.0, "constant", 0.0, 1.0))
    node.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "mem", probe("node"))
    ksample(node, family, CFG, 2)
    assert measured["node"] == measured["plain"]  # same parameters, same backups: nothing duplicated
    lora_bytes = sum(t.numel() * t.element_size() for t in lora_sd(name).values())
    extra = row_delta.delta_bytes(node)
    assert 0 < extra <= lora_bytes
    print(f"\nmemory: model parameters {measured['node'][0][1]} B in {measured['node'][0][0]} storages for both "
          f"branches; extra for θ_λ: {extra} B of LoRA factors (file {lora_bytes} B)")


def test_a_lora_delta_that_never_reaches_the_model_is_an_error(tmp_path):
    """Another node replacing the patched layers' forward after ours would make NPO plain CFG at full cost:
    the APPLY_MODEL guard turns that into an error instead of a silent no-op."""
    family = "sd15"
    name = write_lora(tmp_path, family, "npo_bypass.safetensors", seed=18)
    node = out(MG.NPONode.execute(tiny_model(family), name, 1.0, 1.0, "constant", 0.0, 1.0))
    paths = [k for k, v in node.object_patches.items() if isinstance(v, row_delta.DeltaForward)]
    assert paths
    bypassed = node.clone()
    for path in paths:  # a later node's own forward patch on the same layers
        bypassed.add_object_patch(path, bypassed.object_patches[path].module.__class__.forward.__get__(
            bypassed.object_patches[path].module))
    with pytest.raises(row_delta.DeltaNotApplied, match="none of its patched layers was reached"):
        ksample(bypassed, family, CFG, 2)
    assert torch.isfinite(ksample(node, family, CFG, 2)).all()


def test_unsupported_patches_are_refused(tmp_path):
    family = "sd15"
    name = write_lora(tmp_path, family, "dora.safetensors", seed=15)
    sd = lora_sd(name)
    key = LORA_TARGETS[family][0]
    sd[key + ".dora_scale"] = torch.ones(sd[key + ".lora_up.weight"].shape[0], 1)
    save_file(sd, str(tmp_path / "loras" / "dora.safetensors"))
    with pytest.raises(ValueError, match="DoRA"):
        MG.NPONode.execute(tiny_model(family), "dora.safetensors", 1.0, 1.0, "constant", 0.0, 1.0)
    other = write_lora(tmp_path, "flux", "flux_only.safetensors", seed=16)
    with pytest.raises(ValueError, match="no keys for this model"):
        MG.NPONode.execute(tiny_model(family), other, 1.0, 1.0, "constant", 0.0, 1.0)
    base = tiny_model(family)
    with pytest.raises(ValueError, match="is the sampled model itself"):
        uncond_prior(base, base.clone())


def test_node_schemas():
    for node in MG.NODES:
        schema = node.define_schema()
        assert schema.node_id.startswith("GuidanceKit_") and "·" in schema.display_name
        assert schema.category.startswith("sampling/guidance/")
        assert len(schema.description) > 80
        for i in schema.inputs:
            assert i.tooltip and len(i.tooltip) > 20, (schema.node_id, i.id)
        assert all(o.tooltip for o in schema.outputs)
        assert node.GET_NODE_INFO_V1()["name"] == schema.node_id
        from pathlib import Path

        page = Path(__file__).resolve().parents[2] / "web" / "docs" / f"{schema.node_id}.md"
        assert page.is_file() and len(page.read_text(encoding="utf-8")) > 400


def test_guidance_guider_and_a_foreign_calc_slot_give_the_same_result(tmp_path):
    """SamplerCustomAdvanced with the Guidance Guider, and a pack occupying the calc-cond-batch slot before
    or after ours: the second-model branch still runs on the second model, with the same numbers."""
    from guidance_kit.nodes import guider as gd
    from tests.comfyui.harness import conditioning, custom_advanced

    family = "sd15"
    name = write_lora(tmp_path, family, "guider.safetensors", seed=17)
    base = tiny_model(family)
    m = autoguidance(uncond_prior(base, separate_model(family, seed=3)), with_lora(base, name, 1.0), 1.0)
    reference = ksample(m, family, CFG, STEPS)
    g = out(gd.GuidanceGuiderNode.execute(m, conditioning(family, 1), conditioning(family, 2), CFG))
    assert rel_diff(custom_advanced(g, family, STEPS), reference) < 1e-5

    def foreign(args):  # another pack's calc-cond-batch function, installed after ours
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])

    taken = m.clone()
    taken.set_model_sampler_calc_cond_batch_function(foreign)
    assert rel_diff(ksample(taken, family, CFG, STEPS), reference) < 1e-5
