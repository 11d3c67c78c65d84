"""Helpers of the ComfyUI compatibility contract (test_compatibility_contract.py: ComfyUI's own internals;
test_compatibility_contract_families.py: each family's internals): a registry of named cases, signature checks,
and one recording KSampler run per family with hooks in every slot the pack uses."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import functools
import inspect

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension
import comfy.samplers
import torch

from guidance_kit.nodes.runtime import blocks as model_blocks
from guidance_kit.nodes.runtime import families, slots
from tests.comfyui.harness import ksample, tiny_model


def registry():
    """A module's contract: (its cases by internal name, the decorator that registers a check for one internal)."""
    contract: dict[str, object] = {}

    def internal(name: str):
        def register(fn):
            assert name not in contract, f"two contract cases named {name!r}"
            contract[name] = fn
            return fn
        return register

    return contract, internal


def params(fn) -> list[str]:
    fn = inspect.unwrap(fn)
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def positional(fn, *names: str) -> None:
    """The pack calls ``fn`` with these arguments in this order (positionally)."""
    got = params(fn)[:len(names)]
    assert got == list(names), f"{fn.__qualname__}: expected leading parameters {list(names)}, got {got}"


def keywords(fn, *names: str) -> None:
    """The pack passes these keyword arguments (a **kwargs parameter accepts any)."""
    sig = inspect.signature(inspect.unwrap(fn))
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    missing = [n for n in names if n not in sig.parameters]
    assert not missing, f"{fn.__qualname__}: no parameter(s) {missing}"


@functools.cache
def recorded(family: str) -> dict:
    """One KSampler run of the family's tiny model with recording hooks in every slot the pack uses."""
    seen: dict = {"calc": [], "pre": [], "post": [], "cfg": [], "apply": [], "dit": {}, "attn1": [], "override": 0,
                  "outer": []}
    model = tiny_model(family)

    def calc(args):
        seen["calc"].append(sorted(args))
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])

    def pre(args):
        seen["pre"].append(sorted(args))
        return args["conds_out"]

    def post(args):
        seen["post"].append(sorted(args))
        return args["denoised"]

    def cfg(args):
        seen["cfg"].append(sorted(args))
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    def apply(executor, x, t, *args, **kwargs):
        to = args[3] if len(args) > 3 else kwargs.get("transformer_options")
        seen["apply"].append({k: to.get(k) for k in ("cond_or_uncond", "sigmas", "sample_sigmas", "uuids")}
                             | {"keys": sorted(to)})
        return executor(x, t, *args, **kwargs)

    def outer(executor, *args, **kwargs):
        seen["outer"].append(True)
        return executor(*args, **kwargs)

    model.set_model_sampler_calc_cond_batch_function(calc)
    model.set_model_sampler_pre_cfg_function(pre)
    model.set_model_sampler_post_cfg_function(post)
    model.set_model_sampler_cfg_function(cfg)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "contract", apply)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "contract", outer)
    to = model.model_options.setdefault("transformer_options", {})

    def override(func, *args, **kwargs):
        seen["override"] += 1
        return func(*args, **kwargs)

    to[slots.OVERRIDE_KEY] = override
    net = model.model.diffusion_model
    if family == "sd15":
        def attn1(q, k, v, extra_options):
            seen["attn1"].append(sorted(extra_options))
            return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])
        for group, block, layer in model_blocks.unet_layers(net):
            model.set_model_attn1_replace(attn1, group, block, transformer_index=layer)
    else:
        spec = families.exact_spec(families.FAMILIES, net)
        for group, attr in spec.groups:
            for i in range(len(getattr(net, attr))):
                def block(args, extra, key=(f"{group}_block", i)):
                    out = extra["original_block"](args)
                    seen["dit"].setdefault(key, []).append((sorted(args), torch.is_tensor(args.get("img")),
                                                           sorted(out)))
                    return out
                model.set_model_patch_replace(block, "dit", f"{group}_block", i)
    ksample(model, family, 4.0, 2)
    return seen
