"""Whether a second model can guide the sampled one (autoguidance, unconditional priors, an NPO checkpoint).

The branches themselves run in the engine (``engine.py``, "second models"): the second ModelPatcher is
attached to the sampled model's clone with ``set_additional_models`` and its branch entries are taken
out of the batched call and evaluated with ``calc_cond_batch`` on it. Both models return denoised
predictions through their own ``model_sampling``, so an eps model can guide a v model of the same
family; what must agree is the latent space, the noise convention (flow vs. variance-preserving) and
the conditioning shapes (``compatibility_problems``), checked at the node and at sampling start.
"""

from __future__ import annotations


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
