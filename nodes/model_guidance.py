"""Guidance from a second model: Autoguidance, Unconditional Priors, Diffusion-NPO, Personalization Guidance.

Two ways to get a second model's prediction in the same step, chosen by the node:

* **A different checkpoint** (its own loader): the second ModelPatcher is attached to the clone
  with ``set_additional_models`` (ComfyUI loads and offloads it with the sampled model) and its
  branch runs through ``calc_cond_batch`` on it (``contributors/second_model.py``). Family, latent and
  conditioning shapes are checked at the node and again at sampling start.
* **The same weights with other patches** (a LoRA file on the node, or a second MODEL that is a
  LoRA-patched clone of the sampled one, e.g. through LoraLoader): the patch difference is applied
  to the branch's rows only, inside the one batched forward, from the LoRA factors
  (``contributors/weight_delta.py`` builds the deltas, ``contributors/row_delta.py`` applies them). No
  weight is copied; the personalization λ is a strength on that delta.

Terms: Autoguidance adds ``s_t·(C − C_weak)`` (an extra term, like PAG); the others replace the
unconditional prediction, ``U' = U + β_t·(U_other − U)`` (β = 1: the papers' replacement).
"""

from __future__ import annotations

from comfy_api.latest import io

from ..guiders.methods.extra_guidance import ExtraGuidance
from ..guiders.methods.uncond_model import UncondModel
from ..guiders.plan import Branch
from .common import (
    CATEGORY_ROOT,
    NODE_PREFIX,
    add_method,
    model_input,
    model_output,
    node_error,
    term_schedule,
    term_schedule_inputs,
)
from .contributors import row_delta, second_model, weight_delta

CATEGORY_MODEL = CATEGORY_ROOT + "/second model"


def _uncond_scale_input():
    return io.Float.Input("scale", default=1.0, min=0.0, max=2.0, step=0.05, round=0.01,
                          tooltip="Share β of the other model's unconditional prediction: U' = U + β·(U_other − U). "
                                  "1 = replace the uncond (the paper; one uncond call, on the other model). "
                                  "Between 0 and 1 both unconds run and are blended. 0 = off.")


def _lora_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


def _load_lora_file(label: str, lora_name: str) -> dict:
    import comfy.utils
    import folder_paths

    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise node_error(f"{label}: the LoRA '{lora_name}' is not in the loras folder; put the file into "
                         f"models/loras and refresh.")
    return comfy.utils.load_torch_file(path, safe_load=True)


def _second_source(label: str, model, second, what: str):
    """How the branch reaches ``second``: ('delta', patches) for a clone of the same weights,
    ('model', None) for a separately loaded model (checked for the family)."""
    if second.model is model.model:
        try:
            patches = weight_delta.patch_difference(model, second, label)
        except weight_delta.DeltaError as e:
            raise node_error(str(e)) from None
        if not patches:
            raise node_error(f"{label}: the {what} is the sampled model itself (same weights and patches), so the term "
                             f"would change nothing. Connect a different checkpoint, or the model before/after a LoRA.")
        return "delta", patches
    try:
        second_model.check_compatible(model, second, label, what)
    except second_model.SecondModelError as e:
        raise node_error(str(e)) from None
    return "model", None


def add_second_model_term(model, second, label: str, branch_name: str, kind: str, scale: float, schedule: str,
                          start_percent: float, end_percent: float, what: str):
    """Clone ``model`` with a term whose branch runs on ``second`` (kind 'extra' or 'uncond')."""
    built = term_schedule(label, schedule, start_percent, end_percent)
    source, patches = _second_source(label, model, second, what)
    if source == "delta":
        delta_id = weight_delta.new_delta_id(label)
        perturbation = row_delta.RowDelta(label, delta_id, 1.0)
    else:
        perturbation = second_model.OtherModel(label, second_model.second_model_key(branch_name))
    branch = Branch(branch_name, source="cond" if kind == "extra" else "uncond", perturbation=perturbation)
    if kind == "extra":
        term = ExtraGuidance(branch, scale=float(scale), schedule=built, label=label)
        patched = add_method(model, term)
    else:
        term = UncondModel(branch, scale=float(scale), schedule=built, label=label)
        patched = add_method(model, term)
    if source == "delta":
        try:
            entries = weight_delta.entries_from_patches(model, patches, label)
        except weight_delta.DeltaError as e:
            raise node_error(str(e)) from None
        row_delta.install_delta(patched, perturbation.delta_id, entries)
    else:
        second_model.install(patched, perturbation, second)
    return patched


def add_lora_uncond_term(model, label: str, branch_name: str, lora_sd: dict, main_strength: float,
                         branch_strength: float, scale: float, schedule: str, start_percent: float,
                         end_percent: float):
    """Clone ``model`` (+ the LoRA at ``main_strength`` on all rows, as LoraLoader) whose uncond rows get
    the LoRA at ``branch_strength`` more (a delta on the same weights)."""
    built = term_schedule(label, schedule, start_percent, end_percent)
    try:
        loaded = weight_delta.lora_patches(model, lora_sd, label)
        patches = weight_delta.as_patch_list(loaded, 1.0)
        entries = weight_delta.entries_from_patches(model, patches, label)
    except weight_delta.DeltaError as e:
        raise node_error(str(e)) from None
    delta = row_delta.RowDelta(label, weight_delta.new_delta_id(label), float(branch_strength), len(entries))
    term = UncondModel(Branch(branch_name, source="uncond", perturbation=delta), scale=float(scale), schedule=built,
                       label=label)
    patched = add_method(model, term)
    if main_strength != 0.0:
        patched.add_patches(loaded, float(main_strength))
    row_delta.install_delta(patched, delta.delta_id, entries)
    return patched


# ------------------------------------------------------------------------------------------------
# nodes
# ------------------------------------------------------------------------------------------------

class AutoguidanceNode(io.ComfyNode):
    LABEL = "Autoguidance"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Guiding a Diffusion Model with a Bad Version of Itself (Karras et al., NeurIPS 2024): `+ s·(C − C_weak)` '
        'from a weaker model of the same family (a second checkpoint, or a LoRA-patched clone on the same '
        'weights); on the embedded digits model with its weak version: clipped pixels 3.5% → 1.3% at cfg 3 (9.7% → '
        '2.8% at cfg 5), same adherence, FD within the seed spread',
        'all; both models of one family (checked)',
        '+1 branch on the weak model (a LoRA clone: +1 batched branch, no weight copy)',
    )
    # the weak model is the runner's: on the embedded model, the same UNet trained 1/12 as long
    COMPARE = {"key": "autoguidance", "aliases": {"ag_weak": "autoguidance", "autoguide": "autoguidance"}}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "Autoguidance",
            display_name="Autoguidance · guide away from a weaker model",
            category=CATEGORY_MODEL,
            description=(
                "Autoguidance (Karras et al., NeurIPS 2024, 'Guiding a Diffusion Model with a Bad Version of Itself'): "
                "the conditional prediction of a weaker model of the same family (smaller, less trained, or a "
                "degraded fine-tune) is evaluated in the same step and the result is pushed away from it: D = CFG + "
                "scale·(cond − cond_weak). With cfg 1 this is the paper's D = cond_weak + (1 + scale)·(cond − "
                "cond_weak). The weak model is loaded and offloaded by ComfyUI with the sampled one; a LoRA-patched "
                "clone of the sampled model (e.g. from LoraLoader) runs on the same weights with no copy."),
            inputs=[
                model_input(),
                io.Model.Input("weak_model", tooltip="The weaker model of the same family (its own checkpoint loader, "
                                                     "or the sampled model with/without a LoRA). Checked for the "
                                                     "family at this node and at sampling start."),
                io.Float.Input("scale", default=1.0, min=0.0, max=20.0, step=0.05, round=0.01,
                               tooltip="Strength s of the term; the paper's guidance weight w is 1 + s at cfg 1 "
                                       "(its best values w ≈ 2–3). 0 = off (no extra model cost)."),
                *term_schedule_inputs(what="the weak model"),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, weak_model, scale, schedule, start_percent, end_percent):
        return io.NodeOutput(add_second_model_term(model, weak_model, cls.LABEL, "Autoguidance", "extra", scale,
                                                   schedule, start_percent, end_percent, "weak model"))


class UnconditionalPriorNode(io.ComfyNode):
    LABEL = "Unconditional Prior"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "Unconditional Priors Matter! (Phunyaphibarn et al., 2025): CFG's uncond taken from the base model of a "
        "fine-tune, `U' = U + β·(U_base − U)`; also a full Diffusion-NPO checkpoint",
        'all; both models of one family (checked)',
        'none at β = 1 (the uncond call moves to the other model); LoRA fine-tune + its base: same weights, no copy',
    )

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "UnconditionalPrior",
            display_name="Unconditional Priors · uncond from another model",
            category=CATEGORY_MODEL,
            description=(
                "Unconditional Priors Matter (Phunyaphibarn et al., 2025): a fine-tuned model's own unconditional "
                "prediction is poor, so CFG takes the unconditional (negative/empty prompt) prediction from its base "
                "model or another model of the same family: D = U_base + cfg·(C − U_base). Also runs Diffusion-NPO "
                "with a full NPO checkpoint (the negative branch from the NPO model). With scale 1 it costs no extra "
                "call: the uncond call moves to the other model. A LoRA fine-tune and its base (LoraLoader before "
                "and after) share one set of weights, with no copy."),
            inputs=[
                model_input(),
                io.Model.Input("uncond_model", tooltip="The model whose unconditional prediction CFG uses: the base "
                                                       "model of the fine-tune (or an NPO checkpoint). Same family; "
                                                       "checked at this node and at sampling start."),
                _uncond_scale_input(),
                *term_schedule_inputs(what="the other model's uncond"),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, uncond_model, scale, schedule, start_percent, end_percent):
        return io.NodeOutput(add_second_model_term(model, uncond_model, cls.LABEL, "UnconditionalPrior", "uncond",
                                                   scale, schedule, start_percent, end_percent, "uncond model"))


class NPONode(io.ComfyNode):
    LABEL = "Diffusion-NPO"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Negative Preference Optimization (Wang et al., ICLR 2025): the NPO LoRA acts on the uncond rows only, '
        'inside the batched call',
        'all with a LoRA for it',
        'none (LoRA factors on the uncond rows)',
    )

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "NPO",
            display_name="Diffusion-NPO · negative-preference LoRA on the uncond",
            category=CATEGORY_MODEL,
            description=(
                "Diffusion-NPO (Wang et al., ICLR 2025, 'Negative Preference Optimization for Better Preference "
                "Aligned Generation'): the unconditional/negative branch of CFG is predicted by the model with an "
                "NPO LoRA (trained on reversed preferences) while the conditional branch uses the model as it is: "
                "D = U_NPO + cfg·(C − U_NPO). The LoRA acts on the uncond's rows only, inside the same batched "
                "call, from its low-rank factors: no weight copy, no extra call. For an NPO full checkpoint use "
                "the Unconditional Priors node."),
            inputs=[
                model_input(),
                io.Combo.Input("lora_name", options=_lora_names(),
                               tooltip="The NPO LoRA (models/loras) for this model family."),
                io.Float.Input("lora_strength", default=1.0, min=-4.0, max=4.0, step=0.05, round=0.01,
                               tooltip="Strength of the NPO LoRA on the uncond branch (1 = as trained)."),
                _uncond_scale_input(),
                *term_schedule_inputs(what="the NPO uncond"),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, lora_name, lora_strength, scale, schedule, start_percent, end_percent):
        lora = _load_lora_file(cls.LABEL, lora_name)
        return io.NodeOutput(add_lora_uncond_term(model, cls.LABEL, "NPO", lora, 0.0, lora_strength, scale, schedule,
                                                  start_percent, end_percent))


class PersonalizationGuidanceNode(io.ComfyNode):
    LABEL = "Personalization Guidance"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Steering Guidance for Personalized T2I (Park et al., ICCV 2025): the uncond is the null prediction of '
        'θ_pre + λ·(θ_ft − θ_pre), λ as a LoRA strength on the uncond rows (no weight copy)',
        'all with LoRAs',
        'none',
    )

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "PersonalizationGuidance",
            display_name="Personalization Guidance · weight-interpolated weak model (LoRA)",
            category=CATEGORY_MODEL,
            description=(
                "Personalization guidance (Park et al., ICCV 2025, 'Steering Guidance for Personalized Text-to-Image "
                "Diffusion Models'): the model is sampled with the personalization LoRA (θ_ft), and CFG's "
                "unconditional branch is the null-prompt prediction of θ_λ = θ_pre + λ·(θ_ft − θ_pre): D = U_λ + "
                "cfg·(C_ft − U_λ). λ trades subject fidelity (λ → 0: the pretrained prior) against text alignment "
                "(λ = 1: plain CFG of the fine-tune). θ_λ is a patch strength on the same weights (the LoRA's "
                "low-rank factors on the uncond rows only): no weight copy, no extra call. Connect an empty negative "
                "prompt (the null text)."),
            inputs=[
                io.Model.Input("model", tooltip="The pretrained (base) model, without the personalization LoRA: this "
                                                "node applies it (like LoraLoaderModelOnly). The input is cloned."),
                io.Combo.Input("lora_name", options=_lora_names(),
                               tooltip="The personalization LoRA (DreamBooth-LoRA etc.) in models/loras."),
                io.Float.Input("lora_strength", default=1.0, min=-4.0, max=4.0, step=0.05, round=0.01,
                               tooltip="Strength of the LoRA in the sampled model (the fine-tuned θ_ft), as on "
                                       "LoraLoader."),
                io.Float.Input("interpolation", default=0.5, min=0.0, max=1.0, step=0.05, round=0.01,
                               tooltip="λ of the weak model θ_pre + λ·(θ_ft − θ_pre): 0 = the pretrained model's "
                                       "null prediction, 1 = the fine-tune's own (plain CFG). Our default 0.5; the "
                                       "paper sweeps it as the fidelity/editability control."),
                _uncond_scale_input(),
                *term_schedule_inputs(what="the interpolated uncond"),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, lora_name, lora_strength, interpolation, scale, schedule, start_percent, end_percent):
        if not (0.0 <= interpolation <= 1.0):
            raise node_error(f"{cls.LABEL}: interpolation λ must be in [0, 1] (got {interpolation})")
        lora = _load_lora_file(cls.LABEL, lora_name)
        s = float(lora_strength)
        return io.NodeOutput(add_lora_uncond_term(model, cls.LABEL, "Personalization", lora, s,
                                                  (float(interpolation) - 1.0) * s, scale, schedule, start_percent,
                                                  end_percent))


NODES = [AutoguidanceNode, UnconditionalPriorNode, NPONode, PersonalizationGuidanceNode]
