"""Second models (Autoguidance, Unconditional Priors, an NPO checkpoint): a branch evaluated on another ModelPatcher.

The second ModelPatcher is registered on the sampled model's clone with ``set_additional_models`` under
``guidance_kit_second_model/<branch>`` (``install``): ``prepare_sampling`` loads it with the sampled model (one
memory budget) and model management offloads it as usual. Nothing of it is kept in model_options (deep-copied
on every clone); the plan's Branch only names the key (``OtherModel``, a ``BranchEffect`` with a runner). In a
step the engine takes the entries whose branch is an ``OtherModel`` out of the sampled model's batched call and
hands them to ``OtherModel.run``, which evaluates them with ``calc_cond_batch`` on the second model (same x, σ
and conditioning; its own model_options, wrappers and callbacks, plus this run's ``sample_sigmas``; ``pre_run``
sets its ``current_patcher``, released after the run by this module's OUTER_SAMPLE wrapper).

Both models return denoised predictions through their own ``model_sampling``, so an eps model can guide a v
model of the same family; what must agree is the latent space, the noise convention (flow vs.
variance-preserving) and the conditioning shapes (``compatibility_problems``), checked at the node and at
sampling start.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...guiders.plan import BranchEffect
from ..runtime import install as installer

SECOND_MODEL_KEY_PREFIX = "guidance_kit_second_model/"
IN_RUN_KEY = "guidance_kit_second_models"  # model_options of a run: its SecondModelsInRun
WRAPPER_KEY = "guidance_kit_second_model"  # OUTER_SAMPLE wrapper: check at the start, release at the end


class SecondModelError(RuntimeError):
    """The second model cannot guide this one (message names the node and the fix)."""


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


# ------------------------------------------------------------------------------------------------
# the branch effect and its runner
# ------------------------------------------------------------------------------------------------

def second_model_key(branch_name: str) -> str:
    return SECOND_MODEL_KEY_PREFIX + branch_name


class SecondModelsInRun:
    """The second ModelPatchers a sampling run made ready, released at its end (an object, not a dict: ComfyUI
    copies the nested dicts of model_options for every sampler call)."""

    def __init__(self):
        self.patchers: dict = {}

    def ready(self, second) -> None:
        """``calc_cond_batch`` reads ``model.current_patcher``; ComfyUI sets it for the sampled model only."""
        if getattr(second.model, "current_patcher", None) is not second:
            second.pre_run()
        self.patchers[id(second)] = second

    def release(self) -> None:
        for second in self.patchers.values():
            if getattr(second.model, "current_patcher", None) is second:
                second.model.current_patcher = None
        self.patchers.clear()


@dataclass(frozen=True)
class OtherModel(BranchEffect):
    """A Branch effect: evaluate this branch on the additional model registered under ``key``."""

    label: str
    key: str

    def runner(self) -> OtherModel:
        return self  # entries of one second model run together

    def run(self, model, conds: list, x, sigma, model_options: dict) -> list:
        import comfy.samplers

        second = _attached_second_model(model, self.key, self.label)
        in_run = model_options.get(IN_RUN_KEY)
        (in_run if in_run is not None else SecondModelsInRun()).ready(second)
        return comfy.samplers.calc_cond_batch(second.model, conds, x, sigma, _second_model_options(second,
                                                                                                  model_options))


def _attached_second_model(model, key: str, label: str):
    patcher = getattr(model, "current_patcher", None)
    models = patcher.get_additional_models_with_key(key) if patcher is not None else []
    if not models:
        raise SecondModelError(
            f"{label}: the second model is not attached to the model being sampled (was the {label} node's output "
            f"connected to the sampler, and is the sampler a ComfyUI sampler / the Guidance Guider?).")
    return models[0]


def _second_model_options(second, model_options: dict) -> dict:
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


def check_second_models(main_patcher) -> None:
    """At sampling start: every registered second model still fits the sampled model."""
    if main_patcher is None:
        return
    for key, models in main_patcher.additional_models.items():
        if not key.startswith(SECOND_MODEL_KEY_PREFIX):
            continue
        for second in models:
            label = key[len(SECOND_MODEL_KEY_PREFIX):]
            if second.model is main_patcher.model:
                raise SecondModelError(
                    f"{label}: the second model shares its weights with the sampled model; it must come from its own "
                    f"checkpoint loader (LoRA-patched clones are handled by the node itself).")
            check_compatible(main_patcher, second, label, "second model")


def outer_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: the second models are checked at the start of a run and released at its end."""
    guider = executor.class_obj
    in_run = SecondModelsInRun()
    guider.model_options[IN_RUN_KEY] = in_run
    try:
        check_second_models(getattr(guider, "model_patcher", None))
        return executor(*args, **kwargs)
    finally:
        in_run.release()
        guider.model_options.pop(IN_RUN_KEY, None)


def install(model_patcher, effect: OtherModel, second) -> None:
    """Attach ``second`` to a cloned ModelPatcher under ``effect.key`` (idempotent wrapper)."""
    import comfy.patcher_extension

    model_patcher.set_additional_models(effect.key, [second])
    installer.wrapper(model_patcher, WRAPPER_KEY, outer_sample_wrapper, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE)
