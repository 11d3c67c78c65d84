"""Negative prompts of their own: NAG, Normalized Attention Guidance (nodes/nag.py), at cfg 1 on a distilled model
and with CFG; Perp-Neg and Dynamic Negative Guidance (nodes/feedback_guidance.py), whose negative prompt is a
node input while the sampler's negative is the empty prompt."""

from __future__ import annotations

from ..graph import CLIP, COND, IMAGE, LATENT, MODEL, VAE, Node, Workflow
from .common import FLUX_DEV, GUIDANCE_ID, NEG_SD, PROMPT_COLORS, SD15, SDXL, SEED, checkpoint_workflow, note_node


def wf_nag_flux_schnell_cfg1() -> Workflow:
    wf = checkpoint_workflow(
        "nag_flux_schnell_cfg1", "NAG negative prompt at cfg 1 on Flux schnell (4 steps)", "Flux schnell",
        FLUX_DEV, [("GuidanceKit_NAG", {})], "a portrait of an AI researcher in a sunlit office, 50mm photo", "",
        ckpt="flux1-schnell-fp8.safetensors", steps=4)
    wf.nodes.insert(3, Node(32, "CLIPTextEncode", 1, {"text": "glasses"}, {"clip": (4, CLIP)}, title="NAG negative",
                            color=PROMPT_COLORS["negative"]))
    wf.node(GUIDANCE_ID).links["nag_negative"] = (32, COND)
    return wf


def wf_nag_sdxl_with_cfg() -> Workflow:
    wf = checkpoint_workflow(
        "nag_sdxl_with_cfg", "NAG + CFG on SDXL (NAG negative = the negative prompt)", "SDXL", SDXL,
        [("GuidanceKit_NAG", {"sigma_end": 4.0})],
        "a cat sitting on a windowsill, rainy city outside, cinematic light", NEG_SD, cfg=5.0)
    wf.node(GUIDANCE_ID).links["nag_negative"] = (7, COND)
    return wf


def wf_nag_zimage_turbo_cfg1() -> Workflow:
    """Z-Image-Turbo as ComfyUI's own template loads it (UNETLoader, Qwen3-4B CLIPLoader type lumina2, the Flux VAE,
    ModelSamplingAuraFlow shift 3, res_multistep / simple at cfg 1), 8 steps as the model card, NAG before the
    sampler; the sampler's negative prompt is empty (unused at cfg 1)."""
    name = "nag_zimage_turbo_cfg1"
    nodes = [
        Node(4, "UNETLoader", 0, {"unet_name": "z_image_turbo_bf16.safetensors", "weight_dtype": "default"}),
        Node(31, "CLIPLoader", 0, {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"}),
        Node(32, "VAELoader", 0, {"vae_name": "ae.safetensors"}),
        note_node(name),
        Node(6, "CLIPTextEncode", 1, {"text": "a portrait of a lighthouse keeper in a knitted sweater, stormy sea "
                                              "behind him, golden hour light, 85mm photo"},
             {"clip": (31, CLIP)}, title="Positive prompt", color=PROMPT_COLORS["positive"]),
        Node(33, "CLIPTextEncode", 1, {"text": "beard"}, {"clip": (31, CLIP)}, title="NAG negative",
             color=PROMPT_COLORS["negative"]),
        Node(7, "CLIPTextEncode", 1, {"text": ""}, {"clip": (31, CLIP)}, title="Negative prompt (unused at cfg 1)",
             color=PROMPT_COLORS["negative"]),
        Node(5, "EmptySD3LatentImage", 1, {"width": 1024, "height": 1024}),
        Node(30, "ModelSamplingAuraFlow", 2, {"shift": 3.0}, {"model": (4, MODEL)}),
        Node(GUIDANCE_ID, "GuidanceKit_NAG", 2, {"sigma_end": 0.75},
             {"model": (30, MODEL), "nag_negative": (33, COND)}),
        Node(3, "KSampler", 3, {"seed": SEED, "steps": 8, "cfg": 1.0, "sampler_name": "res_multistep",
                                "scheduler": "simple"},
             {"model": (GUIDANCE_ID, MODEL), "positive": (6, COND), "negative": (7, COND),
              "latent_image": (5, LATENT)}),
        Node(8, "VAEDecode", 4, links={"samples": (3, LATENT), "vae": (32, VAE)}),
        Node(9, "SaveImage", 5, {"filename_prefix": f"guidance_kit/{name}"}, {"images": (8, IMAGE)}),
    ]
    return Workflow(name, "NAG negative prompt at cfg 1 on Z-Image-Turbo (8 steps)", "Z-Image-Turbo", nodes)


def _own_negative(wf: Workflow, field: str, text: str) -> Workflow:
    """The guidance node's negative-prompt input ``field`` from its own CLIP Text Encode (the sampler's negative
    stays empty)."""
    wf.nodes.insert(3, Node(32, "CLIPTextEncode", 1, {"text": text}, {"clip": (4, CLIP)}, title="negative prompt",
                            color=PROMPT_COLORS["negative"]))
    wf.node(GUIDANCE_ID).links[field] = (32, COND)
    return wf


def wf_perp_neg_sd15() -> Workflow:
    return _own_negative(checkpoint_workflow(
        "perp_neg_sd15", "Perp-Neg: a negative prompt perpendicular to the prompt, stacked with CFG-Zero*", "SD1.5",
        SD15, [("GuidanceKit_PerpNeg", {"neg_scale": 1.0}), ("GuidanceKit_CFGZeroStar", {})],
        "a photo of a lion in the savanna, side view, golden hour", "", cfg=7.5), "perpneg_negative", "mane")


def wf_dng_sdxl() -> Workflow:
    return _own_negative(checkpoint_workflow(
        "dng_sdxl", "Dynamic Negative Guidance: the negative acts only on samples heading towards it", "SDXL", SDXL,
        [("GuidanceKit_DNG", {})], "a bowl of fruit on a wooden table, morning light", "", cfg=6.0),
        "dng_negative", "bananas")
