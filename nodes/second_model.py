"""Branches evaluated on a second model (autoguidance, unconditional priors, an NPO checkpoint).

The second ModelPatcher is registered on the sampled model's clone with ``set_additional_models``
under ``guidance_kit_second_model/<branch>``: ComfyUI's ``prepare_sampling`` loads it together with
the sampled model (``load_models_gpu([model] + model.get_nested_additional_models())``, one memory
budget) and its usual model management offloads it like any other model. Nothing of it is kept in
``model_options`` (they are deep-copied on every clone); the plan's Branch only names the key.

In a step the engine builds one list of entries (cond, uncond, branches). ``run_batch`` takes the
entries whose branch is an ``OtherModel`` out of the sampled model's batched call and evaluates
them with ``comfy.samplers.calc_cond_batch`` on the second model, in the same step, with the same
x, σ and conditioning, and the second model's own model_options (its own patches and wrappers).
Both models return denoised predictions through their own ``model_sampling``, so an eps model can
guide a v model of the same family; what must agree is the latent space, the noise convention
(flow vs. variance-preserving) and the conditioning shapes (``compatibility_problems``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEY_PREFIX = "guidance_kit_second_model/"


class SecondModelError(RuntimeError):
    """The second model cannot guide this one (message names the node and the fix)."""


@dataclass(frozen=True)
class OtherModel:
    """A Branch perturbation: evaluate this branch on the additional model registered under ``key``."""

    label: str
    key: str


def model_key(branch_name: str) -> str:
    return KEY_PREFIX + branch_name


# the conditioning/latent interface of a diffusion model (unet_config keys); the rest may differ
# (depth, width, heads: autoguidance uses a smaller model of the same family)
INTERFACE_KEYS = ("in_channels", "out_channels", "in_dim", "out_dim", "context_dim", "adm_in_channels",
                  "context_in_dim", "vec_in_dim", "text_dim", "joint_attention_dim", "pooled_projection_dim",
                  "caption_channels", "cross_attention_dim", "image_model", "model_type", "num_classes")


def _interface(patcher) -> dict:
    import comfy.model_sampling

    m = patcher.model
    config = getattr(m, "model_config", None)
    unet = dict(getattr(config, "unet_config", None) or {})
    out = {
        "model class": f"{type(m).__module__}.{type(m).__name__}",
        "latent format": type(getattr(m, "latent_format", None)).__name__,
        "noise convention": "flow" if isinstance(getattr(m, "model_sampling", None), comfy.model_sampling.CONST)
        else "variance-preserving (eps/v)",
    }
    for k in INTERFACE_KEYS:
        if k in unet:
            out[k] = unet[k]
    return out


def family_name(patcher) -> str:
    config = getattr(patcher.model, "model_config", None)
    return type(config).__name__ if config is not None else type(patcher.model).__name__


def compatibility_problems(main, second) -> list[str]:
    a, b = _interface(main), _interface(second)
    problems = []
    for k in a:
        if k in b and a[k] != b[k]:
            problems.append(f"{k}: {a[k]} vs {b[k]}")
    return problems


def check_compatible(main, second, label: str, what: str) -> None:
    problems = compatibility_problems(main, second)
    if problems:
        raise SecondModelError(
            f"{label}: the {what} ({family_name(second)}) is not of the sampled model's family ({family_name(main)}): "
            f"{'; '.join(problems)}. Both models must share the latent space, noise convention and conditioning "
            f"(e.g. an SD1.5 fine-tune with the SD1.5 base, a Flux fine-tune with Flux dev).")


def check_at_start(main_patcher) -> None:
    """At sampling start: every registered second model still fits the sampled model."""
    if main_patcher is None:
        return
    for key, models in main_patcher.additional_models.items():
        if not key.startswith(KEY_PREFIX):
            continue
        for second in models:
            label = key[len(KEY_PREFIX):]
            if second.model is main_patcher.model:
                raise SecondModelError(
                    f"{label}: the second model shares its weights with the sampled model; it must come from its own "
                    f"checkpoint loader (LoRA-patched clones are handled by the node itself).")
            check_compatible(main_patcher, second, label, "second model")


def _find(model, key: str, label: str):
    patcher = getattr(model, "current_patcher", None)
    models = patcher.get_additional_models_with_key(key) if patcher is not None else []
    if not models:
        raise SecondModelError(
            f"{label}: the second model is not attached to the model being sampled (was the {label} node's output "
            f"connected to the sampler, and is the sampler a ComfyUI sampler / the Guidance Guider?).")
    return models[0]


def _options_for(second, model_options: dict) -> dict:
    """The second model's own model_options for a calc_cond_batch call, with this run's sigmas."""
    import comfy.model_patcher
    import comfy.patcher_extension

    mo = comfy.model_patcher.create_model_options_clone(second.model_options)
    to = mo.setdefault("transformer_options", {})
    to["wrappers"] = comfy.patcher_extension.copy_nested_dicts(second.wrappers)
    to["callbacks"] = comfy.patcher_extension.copy_nested_dicts(second.callbacks)
    sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sigmas is not None:
        to["sample_sigmas"] = sigmas
    return mo


def _ready(second, used: dict) -> None:
    """``calc_cond_batch`` reads ``model.current_patcher``; ComfyUI sets it for the sampled model only."""
    if getattr(second.model, "current_patcher", None) is not second:
        second.pre_run()
    used[id(second)] = second


def run_batch(run_main, batch: list, branch_map: dict, model, x, sigma, model_options: dict, used: dict) -> list:
    """Evaluate ``batch``: OtherModel entries on their models, everything else through ``run_main``."""
    import comfy.samplers

    main_batch = list(batch)
    groups: dict[str, list[int]] = {}
    labels: dict[str, str] = {}
    for index, branch in branch_map.items():
        p = getattr(branch, "perturbation", None)
        if isinstance(p, OtherModel) and index < len(batch) and batch[index] is not None:
            groups.setdefault(p.key, []).append(index)
            labels[p.key] = p.label
            main_batch[index] = None
    if not groups:
        return list(run_main(batch))
    if any(c is not None for c in main_batch):
        out = list(run_main(main_batch))
    else:
        out = [torch.zeros_like(x) for _ in batch]
    for key, indices in groups.items():
        second = _find(model, key, labels[key])
        _ready(second, used)
        preds = comfy.samplers.calc_cond_batch(second.model, [batch[i] for i in indices], x, sigma,
                                               _options_for(second, model_options))
        for i, pred in zip(indices, preds):
            out[i] = pred
    return out


def finish_run(used: dict) -> None:
    for second in used.values():
        if getattr(second.model, "current_patcher", None) is second:
            second.model.current_patcher = None
    used.clear()
