"""The ComfyUI internals Guidance Kit relies on, each checked against the ComfyUI in use: ComfyUI's own (sampler
hooks, wrappers, patches, model loading); each family's internals are test_compatibility_contract_families.py.

One case per internal (the test id is the internal's name), so a ComfyUI update that renames a function,
changes a signature, an option key, a block's arguments or a wrapper type fails a named test instead of
breaking sampling somewhere. The list was built by grepping the pack (``nodes/``, ``digits/``,
``compare.py``, ``comparison/``) for every ComfyUI use; where a use depends on behaviour rather than a
name (option keys, block arguments, which attention call a hook sees), the case runs a tiny model of
ComfyUI's own classes and records what ComfyUI hands over.
"""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on

from pathlib import Path

import comfy.k_diffusion.sampling as k_sampling
import comfy.ldm.modules.attention as comfy_attention
import comfy.lora
import comfy.lora_convert
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import pytest
import torch

from guidance_kit.nodes.contributors import row_delta
from guidance_kit.nodes.runtime import blocks as model_blocks
from guidance_kit.nodes.runtime import slots
from tests.comfyui.contract import keywords, params, positional, recorded, registry
from tests.comfyui.harness import ALL_FAMILIES, conditioning, ksample, tiny_model

CONTRACT, internal = registry()


MP = comfy.model_patcher.ModelPatcher

# ------------------------------------------------------------------------------------------------
# functions and methods (names and signatures)
# ------------------------------------------------------------------------------------------------

internal("comfy.samplers.calc_cond_batch")(
    lambda: positional(comfy.samplers.calc_cond_batch, "model", "conds", "x_in", "timestep", "model_options"))
internal("comfy.samplers.sampling_function")(
    lambda: positional(comfy.samplers.sampling_function, "model", "x", "timestep", "uncond", "cond", "cond_scale",
                       "model_options", "seed"))
internal("comfy.samplers.KSAMPLER")(
    lambda: positional(comfy.samplers.KSAMPLER.__init__, "sampler_function", "extra_options"))
internal("comfy.samplers.calculate_sigmas")(
    lambda: positional(comfy.samplers.calculate_sigmas, "model_sampling", "scheduler_name", "steps"))


@internal("comfy.samplers.KSampler.SAMPLERS/SCHEDULERS")
def _():
    assert "euler" in comfy.samplers.KSampler.SAMPLERS and "normal" in comfy.samplers.KSampler.SCHEDULERS


@internal("comfy.samplers.CFGGuider")
def _():
    positional(comfy.samplers.CFGGuider.__init__, "model_patcher")
    positional(comfy.samplers.CFGGuider.predict_noise, "x", "timestep", "model_options", "seed")
    guider = comfy.samplers.CFGGuider(tiny_model("sd15"))
    for attr in ("model_patcher", "model_options", "set_conds", "set_cfg", "sample", "cfg"):
        assert hasattr(guider, attr), attr
    seen = []  # during sampling, the guider's inner_model is the BaseModel (model_patcher on it)
    model = tiny_model("sd15")
    model.set_model_sampler_pre_cfg_function(lambda args: seen.append(args["model"]) or args["conds_out"])
    ksample(model, "sd15", 4.0, 1)
    assert isinstance(seen[0], comfy.model_base.BaseModel)


@internal("KSAMPLER sampler function (model, x, sigmas, extra_args, callback, disable), model.inner_model")
def _():
    from tests.comfyui.harness import latent, noise_for, sigmas_for

    seen = []

    def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        guider = model.inner_model  # the guider; its inner_model (the BaseModel) exists while sampling
        seen.append((guider, getattr(guider, "inner_model", None), sorted(extra_args)))
        return x

    model = tiny_model("sd15")
    comfy.sample.sample_custom(model, noise_for("sd15"), 4.0, comfy.samplers.KSAMPLER(sampler_function),
                               sigmas_for(model, 2), conditioning("sd15", 1), conditioning("sd15", 2), latent("sd15"),
                               disable_pbar=True, seed=0)
    guider, inner, extra = seen[0]
    assert isinstance(guider, comfy.samplers.CFGGuider) and guider.model_patcher is not None
    assert isinstance(inner, comfy.model_base.BaseModel) and hasattr(guider, "cfg")
    assert "model_options" in extra and "seed" in extra


internal("ModelPatcher.set_model_sampler_calc_cond_batch_function")(
    lambda: positional(MP.set_model_sampler_calc_cond_batch_function, "sampler_calc_cond_batch_function"))
internal("ModelPatcher.set_model_sampler_pre_cfg_function")(
    lambda: positional(MP.set_model_sampler_pre_cfg_function, "pre_cfg_function", "disable_cfg1_optimization"))
internal("ModelPatcher.set_model_sampler_post_cfg_function")(
    lambda: positional(MP.set_model_sampler_post_cfg_function, "post_cfg_function", "disable_cfg1_optimization"))
internal("ModelPatcher.add_wrapper_with_key")(
    lambda: positional(MP.add_wrapper_with_key, "wrapper_type", "key", "wrapper"))
internal("ModelPatcher.get_wrappers")(lambda: positional(MP.get_wrappers, "wrapper_type", "key"))
internal("ModelPatcher.add_object_patch")(lambda: positional(MP.add_object_patch, "name", "obj"))
internal("ModelPatcher.get_model_object")(lambda: positional(MP.get_model_object, "name"))
internal("ModelPatcher.set_additional_models")(lambda: positional(MP.set_additional_models, "key", "models"))
internal("ModelPatcher.get_additional_models_with_key")(
    lambda: positional(MP.get_additional_models_with_key, "key"))
internal("ModelPatcher.set_model_attn1_replace")(
    lambda: positional(MP.set_model_attn1_replace, "patch", "block_name", "number", "transformer_index"))
internal("ModelPatcher.set_model_patch_replace")(
    lambda: positional(MP.set_model_patch_replace, "patch", "name", "block_name", "number", "transformer_index"))


@internal("ModelPatcher attributes (clone, pre_run, model_options, object_patches, patches, wrappers)")
def _():
    m = tiny_model("sd15")
    for attr in ("clone", "pre_run", "model_options", "object_patches", "patches", "wrappers", "model",
                 "load_device"):
        assert hasattr(m, attr), attr
    assert isinstance(m.model_options, dict) and isinstance(m.object_patches, dict)
    assert isinstance(m.patches, dict) and isinstance(m.wrappers, dict)


internal("comfy.model_patcher.set_model_options_post_cfg_function")(
    lambda: positional(comfy.model_patcher.set_model_options_post_cfg_function, "model_options", "post_cfg_function",
                       "disable_cfg1_optimization"))
internal("comfy.model_patcher.create_model_options_clone")(
    lambda: positional(comfy.model_patcher.create_model_options_clone, "orig_model_options"))
internal("comfy.patcher_extension.copy_nested_dicts")(
    lambda: positional(comfy.patcher_extension.copy_nested_dicts, "input_dict"))
internal("comfy.patcher_extension.merge_nested_dicts")(
    lambda: positional(comfy.patcher_extension.merge_nested_dicts, "dict1", "dict2"))


@internal("comfy.patcher_extension.WrappersMP (APPLY_MODEL, OUTER_SAMPLE)")
def _():
    assert comfy.patcher_extension.WrappersMP.APPLY_MODEL == "apply_model"
    assert comfy.patcher_extension.WrappersMP.OUTER_SAMPLE == "outer_sample"


@internal("comfy.ldm.modules.attention.optimized_attention")
def _():
    positional(comfy_attention.optimized_attention, "q", "k", "v", "heads") if params(
        comfy_attention.optimized_attention)[0] == "q" else positional(
        comfy_attention.optimized_attention, *params(comfy_attention.optimized_attention)[:4])
    assert len(params(comfy_attention.optimized_attention)) >= 4
    keywords(comfy_attention.optimized_attention, "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


@internal("transformer_options['optimized_attention_override'] (called as override(func, *args, **kwargs))")
def _():
    seen = []

    def override(func, *args, **kwargs):
        seen.append((func, len(args), sorted(kwargs)))
        return func(*args, **kwargs)

    q = torch.randn(1, 4, 8)
    out = comfy_attention.optimized_attention(q, q, q, 2, transformer_options={slots.OVERRIDE_KEY: override})
    assert out.shape == q.shape and seen and callable(seen[0][0]) and seen[0][1] == 4
    assert "transformer_options" in seen[0][2]


@internal("comfy.ldm.modules.attention.SpatialTransformer / BasicTransformerBlock")
def _():
    positional(comfy_attention.BasicTransformerBlock.forward, "x", "context", "transformer_options")
    positional(comfy_attention.SpatialTransformer.forward, "x", "context", "transformer_options")
    layers = model_blocks.unet_layers(tiny_model("sd15").model.diffusion_model)
    assert layers and all(hasattr(layer, "attn1") and hasattr(layer, "attn2") for layer in layers.values())


@internal("openaimodel.UNetModel (input_blocks, middle_block, output_blocks, Downsample)")
def _():
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel

    net = tiny_model("sd15").model.diffusion_model
    assert isinstance(net, UNetModel) and isinstance(Downsample, type)
    for attr in ("input_blocks", "middle_block", "output_blocks"):
        assert hasattr(net, attr), attr
    assert max(model_blocks.unet_input_levels(net).values()) >= 1


@internal("BaseModel.apply_model / process_timestep / model_sampling")
def _():
    positional(comfy.model_base.BaseModel.apply_model, "x", "t", "c_concat", "c_crossattn", "control",
               "transformer_options")
    positional(comfy.model_base.BaseModel.__init__, "model_config", "model_type", "device", "unet_model")
    assert comfy.model_base.ModelType.EPS is not None
    for family in ALL_FAMILIES:
        model = tiny_model(family).model
        t = model.process_timestep(torch.tensor([500.0]), x=torch.zeros(1))
        assert torch.is_tensor(t), family


@internal("model_sampling (percent_to_sigma, timestep, sigma, sigma_min, sigma_max, CONST)")
def _():
    for family in ("sd15", "flux", "sd3", "wan21"):
        ms = tiny_model(family).get_model_object("model_sampling")
        for attr in ("percent_to_sigma", "timestep", "sigma", "sigma_min", "sigma_max", "calculate_denoised"):
            assert hasattr(ms, attr), (family, attr)
        assert 0.0 <= float(ms.percent_to_sigma(1.0)) <= float(ms.percent_to_sigma(0.5))
        assert isinstance(ms, comfy.model_sampling.CONST) == (family != "sd15"), family


@internal("comfy.lora (load_lora, model_lora_keys_unet, calculate_weight), comfy.lora_convert.convert_lora")
def _():
    positional(comfy.lora.load_lora, "lora", "to_load", "log_missing")
    positional(comfy.lora.model_lora_keys_unet, "model", "key_map")
    positional(comfy.lora.calculate_weight, "patches", "weight", "key")
    positional(comfy.lora_convert.convert_lora, "sd")


@internal("LoRAAdapter.weights and ModelPatcher.patches entries")
def _():
    from comfy.weight_adapter.lora import LoRAAdapter

    model = tiny_model("sd15")
    target = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q"
    weight = comfy.utils.get_attr(model.model, target + ".weight")
    lora = {target + ".lora_down.weight": torch.zeros(2, weight.shape[1]),
            target + ".lora_up.weight": torch.zeros(weight.shape[0], 2), target + ".alpha": torch.tensor(2.0)}
    patched = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0]
    entry = patched.patches[target + ".weight"][-1]
    assert len(entry) == 5  # (strength_patch, patch, strength_model, offset, function)
    assert isinstance(entry[1], LoRAAdapter) and len(entry[1].weights) == 6  # up, down, alpha, mid, dora, reshape


@internal("comfy.k_diffusion.sampling (sigma_to_half_log_snr, offset_first_sigma_for_snr, BrownianTree, trange)")
def _():
    positional(k_sampling.sigma_to_half_log_snr, "sigma", "model_sampling")
    positional(k_sampling.offset_first_sigma_for_snr, "sigmas", "model_sampling")
    positional(k_sampling.BrownianTreeNoiseSampler.__init__, "x", "sigma_min", "sigma_max", "seed")
    keywords(k_sampling.BrownianTreeNoiseSampler.__init__, "cpu")
    assert callable(k_sampling.trange)


@internal("comfy.sample (sample, sample_custom, prepare_noise, fix_empty_latent_channels)")
def _():
    positional(comfy.sample.sample, "model", "noise", "steps", "cfg", "sampler_name", "scheduler", "positive",
               "negative", "latent_image")
    keywords(comfy.sample.sample, "disable_pbar", "seed")
    positional(comfy.sample.sample_custom, "model", "noise", "cfg", "sampler", "sigmas", "positive", "negative",
               "latent_image")
    positional(comfy.sample.prepare_noise, "latent_image", "seed")
    positional(comfy.sample.fix_empty_latent_channels, "model", "latent_image")


@internal("comfy.utils / model_management / sd helpers")
def _():
    positional(comfy.utils.get_attr, "obj", "attr")
    positional(comfy.utils.repeat_to_batch_size, "tensor", "batch_size")
    keywords(comfy.utils.load_torch_file, "safe_load")
    assert hasattr(comfy.utils, "PROGRESS_BAR_ENABLED")
    positional(comfy.model_management.load_models_gpu, "models")
    for fn in ("get_torch_device", "unet_offload_device"):
        assert callable(getattr(comfy.model_management, fn)), fn
    positional(comfy.sd.load_checkpoint_guess_config, "ckpt_path")
    positional(comfy.sd.load_lora_for_models, "model", "clip", "lora", "strength_model", "strength_clip")


@internal("comfy_api.latest.io (V3 node API)")
def _():
    from comfy_api.latest import ComfyExtension, io

    assert isinstance(ComfyExtension, type)
    for name in ("ComfyNode", "Schema", "NodeOutput", "Float", "Int", "Combo", "Boolean", "String", "Model",
                 "Conditioning", "Latent", "Image", "Sampler", "Guider"):
        assert hasattr(io, name), name


@internal("comfy.ops layer classes (nn.Linear / nn.Conv subclasses or MixedPrecisionOp)")
def _():
    import comfy.ops

    classes = row_delta.delta_layer_classes()
    for ops in (comfy.ops.disable_weight_init, comfy.ops.manual_cast):
        assert issubclass(ops.Linear, classes) and issubclass(ops.Conv2d, classes)


# ------------------------------------------------------------------------------------------------
# behaviour: what ComfyUI hands to the pack's hooks during sampling (one recording run per family)
# ------------------------------------------------------------------------------------------------

@internal("sampler_calc_cond_batch_function args")
def _():
    assert recorded("sd15")["calc"][0] == sorted(["conds", "input", "sigma", "model", "model_options"])


@internal("sampler_pre_cfg_function args")
def _():
    assert {"conds", "conds_out", "cond_scale", "timestep", "input", "sigma", "model", "model_options"} <= set(
        recorded("sd15")["pre"][0])


@internal("sampler_post_cfg_function args")
def _():
    assert {"denoised", "cond", "uncond", "cond_scale", "model", "uncond_denoised", "cond_denoised", "sigma",
            "model_options", "input"} <= set(recorded("sd15")["post"][0])


@internal("sampler_cfg_function args")
def _():
    assert {"cond", "uncond", "cond_scale", "timestep", "input", "sigma", "cond_denoised", "uncond_denoised",
            "model", "model_options"} <= set(recorded("sd15")["cfg"][0])


@internal("OUTER_SAMPLE wrapper")
def _():
    assert recorded("sd15")["outer"]


@internal("APPLY_MODEL wrapper args[3] = transformer_options with cond_or_uncond, sigmas, sample_sigmas, uuids")
def _():
    call = recorded("sd15")["apply"][0]
    assert call["cond_or_uncond"] == [0, 1] or sorted(call["cond_or_uncond"]) == [0, 1]
    assert torch.is_tensor(call["sigmas"]) and torch.is_tensor(call["sample_sigmas"]) and call["uuids"]
    assert "patches_replace" in call["keys"] and "wrappers" in call["keys"]


@internal("patches_replace['attn1'] extra_options (n_heads, activations_shape, original_shape, cond_or_uncond)")
def _():
    keys = set(recorded("sd15")["attn1"][0])
    assert {"n_heads", "dim_head", "attn_precision", "activations_shape", "original_shape", "cond_or_uncond",
            "sigmas"} <= keys, keys


@internal("object patches of '<module>.forward' become instance attributes on load")
def _():
    model = tiny_model("sd15")
    path = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q"
    module = comfy.utils.get_attr(model.model, path)
    marker = row_delta.DeltaForward(module, {}, path=path)
    model.add_object_patch(path + ".forward", marker)
    comfy.model_management.load_models_gpu([model])
    try:
        assert module.__dict__.get("forward") is marker
    finally:
        model.unpatch_model()
    assert module.forward is not marker


@internal("CONDITIONING for the tiny families (c_crossattn through extra_conds)")
def _():
    model = tiny_model("sd15")
    conds = model.model.extra_conds(cross_attn=conditioning("sd15", 1)[0][0])
    assert "c_crossattn" in conds


@internal("CFGGuider.conds: a key added by an OUTER_SAMPLE wrapper is processed like the prompts and readable while "
          "sampling (Perp-Neg's and DNG's negative prompt, contributors/node_conditioning.py)")
def _():
    import comfy.sampler_helpers

    seen = {}

    def outer(executor, *args, **kwargs):
        guider = executor.class_obj
        guider.conds["contract"] = comfy.sampler_helpers.convert_cond(conditioning("sd15", 3))
        seen["guider"] = guider
        return executor(*args, **kwargs)

    def calc(args):
        entry = seen["guider"].conds["contract"][0]
        seen["processed"] = "c_crossattn" in entry.get("model_conds", {})
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])

    model = tiny_model("sd15")
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "contract", outer)
    model.set_model_sampler_calc_cond_batch_function(calc)
    ksample(model, "sd15", 4.0, 1)
    assert seen.get("processed"), "the extra conds entry was not processed by ComfyUI's process_conds"


@internal("prefix sharing: forward_timestep_embed calls each unit module; ResBlock(x, emb); per-chunk 'uuids'")
def _():
    from comfy.ldm.modules.diffusionmodules import openaimodel

    positional(openaimodel.forward_timestep_embed, "ts", "x", "emb", "context", "transformer_options")
    positional(openaimodel.ResBlock.forward, "x", "emb")
    for name in ("Downsample", "Upsample", "VideoResBlock", "TimestepEmbedSequential"):
        assert hasattr(openaimodel, name), name
    seen = []

    def spy(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        seen.append((list(transformer_options["cond_or_uncond"]), len(transformer_options["uuids"])))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    model = tiny_model("sd15")
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "contract", spy)
    ksample(model, "sd15", 4.0, 1)
    assert seen and all(len(chunks) == uuids for chunks, uuids in seen), seen


@internal("PREDICT_NOISE wrapper: (executor, x, timestep, model_options, seed); executor.class_obj is the guider "
          "(conds, cfg, inner_model); an in-place edit of x reaches the sampler's step (FlowMo, nodes/flowmo.py)")
def _():
    seen = {}

    def wrapper(executor, x, timestep, model_options, seed):
        guider = executor.class_obj
        seen["guider"] = all(hasattr(guider, a) for a in ("conds", "cfg", "inner_model")) and "positive" in guider.conds
        if seen.setdefault("edits", 0) == 0:
            x.mul_(0.5)  # FlowMo moves the sampler's latent in place before the step's prediction
        seen["edits"] += 1
        return executor(x, timestep, model_options, seed)

    plain = ksample(tiny_model("sd15"), "sd15", 4.0, 2)
    model = tiny_model("sd15").clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "contract", wrapper)
    edited = ksample(model, "sd15", 4.0, 2)
    assert seen["guider"] and seen["edits"] == 2, seen
    assert not torch.equal(plain, edited), "an in-place edit of x in PREDICT_NOISE did not reach the sampler"


@internal("server.PromptServer (instance, routes, client_id, send_sync(event, data, sid)), routes before add_routes")
def _():
    # the Annealing Guidance plot (nodes/annealing_plot.py): its preview route and its run message; PromptServer cannot
    # be built in this process, so the source is read
    from tests.conftest import COMFYUI_PATH

    server = (Path(COMFYUI_PATH) / "server.py").read_text(encoding="utf-8")
    assert "def send_sync(self, event, data, sid=None):" in server
    assert "routes = web.RouteTableDef()" in server and "self.routes = routes" in server
    assert "self.client_id = None" in server and "PromptServer.instance = self" in server
    main = (Path(COMFYUI_PATH) / "main.py").read_text(encoding="utf-8")
    assert main.index("init_extra_nodes(") < main.index("prompt_server.add_routes()"), \
        "custom nodes must load (and add their routes) before the server adds its routes to the app"


@internal("comfy_api.latest io.Hidden.unique_id, a V3 node's cls.hidden")
def _():
    from comfy_api.latest import io

    from guidance_kit.nodes.annealing_guidance import AnnealingGuidanceNode

    assert io.Hidden.unique_id.value == "UNIQUE_ID"
    # ComfyUI's executor prepares a V3 node class per prompt with its hidden inputs (the node's id in the graph)
    assert AnnealingGuidanceNode.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "7"}).hidden.unique_id == "7"


@pytest.mark.parametrize("name", list(CONTRACT), ids=list(CONTRACT))
def test_internal(name):
    CONTRACT[name]()

