"""Second-model guidance (nodes/model_guidance.py): Autoguidance, Unconditional Priors, Diffusion-NPO,
Personalization Guidance."""

from __future__ import annotations

from ..graph import MODEL, Node, Workflow
from .common import GUIDANCE_ID, NEG_SD, SD15, SDXL, checkpoint_workflow


def with_second_checkpoint(wf: Workflow, ckpt: str, title: str, input_name: str) -> Workflow:
    """A second Load Checkpoint (id 31, first column) feeding the Guidance Kit node's ``input_name``."""
    wf.nodes.insert(1, Node(31, "CheckpointLoaderSimple", 0, {"ckpt_name": ckpt}, title=title))
    wf.node(GUIDANCE_ID).links[input_name] = (31, MODEL)
    return wf


def wf_autoguidance_sd15() -> Workflow:
    wf = checkpoint_workflow(
        "autoguidance_sd15", "Autoguidance: a fine-tune guided away from a weaker model (its base)", "SD1.5", SD15,
        [("GuidanceKit_Autoguidance", {"scale": 1.0})],
        "a cozy cabin by a lake in autumn, morning fog, golden light, detailed", NEG_SD,
        ckpt="dreamshaper_8.safetensors", cfg=5.0)
    return with_second_checkpoint(wf, SD15["ckpt"], "Weak model", "weak_model")


def wf_unconditional_prior_sdxl() -> Workflow:
    wf = checkpoint_workflow(
        "unconditional_prior_sdxl", "Unconditional Priors: a fine-tune's uncond from SDXL base", "SDXL", SDXL,
        [("GuidanceKit_UnconditionalPrior", {"scale": 1.0})],
        "a knight in ornate silver armor in a misty forest, dramatic lighting, highly detailed", NEG_SD,
        ckpt="juggernautXL_v9.safetensors", cfg=6.0)
    return with_second_checkpoint(wf, SDXL["ckpt"], "Base model (uncond)", "uncond_model")


def wf_unconditional_prior_lora_sd15() -> Workflow:
    wf = checkpoint_workflow(
        "unconditional_prior_lora_sd15", "Unconditional Priors with a LoRA fine-tune: base uncond, no weight copy",
        "SD1.5", SD15, [("GuidanceKit_UnconditionalPrior", {"scale": 1.0})],
        "a paper-cut illustration of a fox in a snowy forest, layered paper, soft shadows", NEG_SD)
    wf.nodes.insert(1, Node(31, "LoraLoaderModelOnly", 0, {"lora_name": "papercut_style_sd15.safetensors"},
                            {"model": (4, MODEL)}))
    wf.node(GUIDANCE_ID).links.update(model=(31, MODEL), uncond_model=(4, MODEL))
    wf.node(3).links["model"] = (GUIDANCE_ID, MODEL)
    return wf


def wf_npo_sdxl() -> Workflow:
    return checkpoint_workflow(
        "npo_sdxl", "Diffusion-NPO: the NPO LoRA on the uncond branch only", "SDXL", SDXL,
        [("GuidanceKit_NPO", {"lora_name": "sdxl_npo_lora.safetensors", "lora_strength": 1.0, "scale": 1.0})],
        "a photo of a vintage camera on a wooden desk next to old letters, soft window light", NEG_SD,
        cfg=6.0)


def wf_personalization_guidance_sd15() -> Workflow:
    return checkpoint_workflow(
        "personalization_guidance_sd15", "Personalization Guidance: DreamBooth-LoRA subject, λ 0.5", "SD1.5", SD15,
        [("GuidanceKit_PersonalizationGuidance", {"lora_name": "dreambooth_sks_dog_sd15.safetensors",
                                                  "interpolation": 0.5})],
        "a photo of sks dog wearing a red scarf on a snowy mountain top", "")
