"""Annealing Guidance node (Yehezkel, Dahary, Voynov, Cohen-Or, arXiv 2506.24108): a learned policy picks the CFG
scale per sample and per step from (t, ‖ε_c − ε_u‖, λ).

The pack ships a policy trained for the embedded digits model (``digits/train_guidance_policy.py``); for other
models the user puts a policy file in ``ComfyUI/models/guidance_policies`` (never downloaded): the pack's
safetensors format, or the authors' ``.pt`` checkpoint read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import os

import torch
from comfy_api.latest import io

from ..guiders.methods.annealing_guidance import AnnealingGuidance, PolicyFileError, SharedPolicy, load_policy
from .annealing_plot import PlotSender
from .common import CATEGORY_CFG, NODE_PREFIX, add_method, model_input, model_output, node_error
from .seed_papers import is_digits_model

POLICY_FOLDER = "guidance_policies"
PACK_POLICY = "digits (shipped with the pack)"
POLICY_EXTENSIONS = {".safetensors", ".pt", ".pth"}
TIMESTEP_TABLE_SIZE = 128


def register_policy_folder() -> None:
    """ComfyUI/models/guidance_policies as a models folder (extra_model_paths.yaml may add more)."""
    import folder_paths

    if POLICY_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[POLICY_FOLDER] = (
            [os.path.join(folder_paths.models_dir, POLICY_FOLDER)], set(POLICY_EXTENSIONS))


def policy_choices() -> list[str]:
    import folder_paths

    register_policy_folder()
    return [PACK_POLICY, *folder_paths.get_filename_list(POLICY_FOLDER)]


def policy_path(policy: str):
    """The file of a ``policy`` choice (the pack's digits policy, or a file in models/guidance_policies); a ValueError
    naming the node and the fix where there is none."""
    label = AnnealingGuidanceNode.LABEL
    if policy == PACK_POLICY:
        from ..digits.train_guidance_policy import POLICY_WEIGHTS

        if not POLICY_WEIGHTS.is_file():
            raise node_error(f"{label}: the digits policy file is missing ({POLICY_WEIGHTS}); restore it with 'git "
                             f"checkout -- digits/weights' or run 'python -m digits.train_guidance_policy' in the "
                             f"pack folder.")
        return POLICY_WEIGHTS
    import folder_paths

    register_policy_folder()
    found = folder_paths.get_full_path(POLICY_FOLDER, policy)
    if found is None:
        raise node_error(f"{label}: no policy file {policy!r} in ComfyUI/models/{POLICY_FOLDER}.")
    return found


def timestep_table(model) -> tuple[tuple[float, float], ...]:
    """(σ, the model's timestep of σ) over the model's σ range, sorted by σ."""
    sampling = model.get_model_object("model_sampling")
    low, high = float(sampling.sigma_min), float(sampling.sigma_max)
    if not (low > 0 and high > low and math.isfinite(high)):
        low, high = max(low, 1e-4), max(high, 1.0)
    sigmas = torch.exp(torch.linspace(math.log(low), math.log(high), TIMESTEP_TABLE_SIZE))
    timesteps = sampling.timestep(sigmas).float()
    return tuple((float(s), float(t)) for s, t in zip(sigmas, timesteps))


class AnnealingGuidanceNode(io.ComfyNode):
    LABEL = "Annealing Guidance"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "annealing guidance scheduler (Yehezkel, Dahary, Voynov, Cohen-Or, arXiv 2506.24108): a learned policy "
        "w_t = f(t, ‖ε_c − ε_u‖, λ) picks the CFG scale per sample and step (the paper samples with CFG++); chosen "
        "scales in the log",
        "the digits model (policy shipped); any model with a user policy file in models/guidance_policies",
        "none",
    )
    COMPARE = {"key": "annealing_guidance", "aliases": {"annealing": "annealing_guidance"},
               "report": ("annealing_guidance:guidance_lambda=0.2", "annealing_guidance:guidance_lambda=0.5",
                          "annealing_guidance:guidance_lambda=0.8")}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "AnnealingGuidance",
            display_name="Annealing Guidance · learned CFG scale per step",
            category=CATEGORY_CFG,
            description=(
                "Annealing guidance scheduler (Yehezkel, Dahary, Voynov, Cohen-Or, 'Navigating with Annealing "
                "Guidance Scale in Diffusion Space', arXiv 2506.24108). A small learned network picks the CFG scale "
                "of every step and sample from the timestep, the norm of the difference between the conditional and "
                "unconditional noise predictions, and λ; the scale replaces the sampler's cfg. The paper samples "
                "with CFG++ re-noising: to follow it, use a CFG++ sampler (Guidance Kit's CFG++ sampler node, or "
                "ComfyUI's *_cfg_pp samplers). The pack's policy is trained for the embedded digits model; for "
                "other models put a policy file (the authors' checkpoint, or the pack's safetensors format) in "
                "models/guidance_policies. The node plots the policy's scale over sampling progress for λ, and "
                "after a run the scales it chose; they are also logged."),
            inputs=[
                model_input(),
                io.Float.Input("guidance_lambda", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="λ, the policy's one knob: 0 favours sample quality (small scales, the "
                                       "noise-prediction objective), 1 favours prompt adherence (larger scales, the "
                                       "agreement of the next step's conditional and unconditional predictions)."),
                io.Combo.Input("policy", options=policy_choices(), default=PACK_POLICY,
                               tooltip="The guidance-scale network: the pack's digits policy, or a file from "
                                       "ComfyUI/models/guidance_policies (.safetensors in the pack's format, or the "
                                       "authors' .pt checkpoint, read with torch.load(weights_only=True); nothing "
                                       "is downloaded)."),
            ],
            outputs=[model_output()],
            hidden=[io.Hidden.unique_id],  # the node's plot: the run's chosen scales go to this node
        )

    @classmethod
    def _policy(cls, model, policy: str) -> SharedPolicy:
        if policy == PACK_POLICY and not is_digits_model(model):
            raise node_error(f"{cls.LABEL}: the pack's policy is trained for the embedded digits model only. "
                             f"For this model put a policy trained for it (e.g. the authors' SDXL checkpoint) "
                             f"in ComfyUI/models/{POLICY_FOLDER} and choose it under 'policy'.")
        path = policy_path(policy)
        try:
            return SharedPolicy(load_policy(path), os.path.basename(str(path)))
        except PolicyFileError as e:
            raise node_error(f"{cls.LABEL}: policy {os.path.basename(str(path))} refused: {e}") from None

    @classmethod
    def execute(cls, model, guidance_lambda, policy=PACK_POLICY):
        if not 0.0 <= float(guidance_lambda) <= 1.0:
            raise node_error(f"{cls.LABEL}: guidance_lambda must lie in [0, 1] (got {guidance_lambda}).")
        node_id = getattr(cls.hidden, "unique_id", None)  # None when called outside a prompt (tests, compare.py)
        method = AnnealingGuidance(cls._policy(model, policy), float(guidance_lambda), timestep_table(model),
                                   cls.LABEL, publish=PlotSender(str(node_id)) if node_id is not None else None)
        return io.NodeOutput(add_method(model, method))


NODES = [AnnealingGuidanceNode]
