"""Attention-space methods: PLADIS (the model's own cross-attention, no branch) and ERG (a weak branch from
self-attention at a higher temperature, batched like PAG)."""

from __future__ import annotations

import importlib.util

from comfy_api.latest import io

from ..guiders.sparse_attention import SPARSE_FUNCTIONS
from .common import CATEGORY_ROOT, NODE_PREFIX, model_input, model_output, node_error
from .contributors import pladis
from .perturbation import Defaults, LayeredMethodNode, _layers_input, _scale_input, _term_inputs
from .runtime.families import FamilyError, describe, diffusion_model_of, nag_family_of

PLADIS_FAMILIES = "SD1.5/SDXL, WAN, LTXV and Cosmos Predict2"

CATEGORY_ATTENTION = CATEGORY_ROOT + "/attention"


class PLADISNode(io.ComfyNode):
    LABEL = "PLADIS"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "PLADIS (Kim & Sim, ICCV 2025): every text cross-attention extrapolated from softmax toward sparse "
        "attention (α-entmax / sparsemax), `O₁ + λ·(O_α − O₁)`; works at cfg 1 (distilled models) and with CFG",
        'SD1.5/SDXL, WAN, LTXV, Cosmos Predict2',
        'none (a second, sparse attention map in each cross-attention)',
    )
    COMPARE = {"key": "pladis",
               "not_in_report": "the digits model's cross-attention reads a one-token context, over which every "
                                "attention map (softmax or sparse) is 1: PLADIS is exactly the identity there; "
                                "compare it with compare.py on a text-conditioned checkpoint"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "PLADIS",
            display_name="PLADIS · Sparse Cross-Attention Extrapolation",
            category=CATEGORY_ATTENTION,
            description=(
                "PLADIS (Kim & Sim, ICCV 2025): in every text cross-attention the softmax attention output O₁ is "
                "extrapolated toward the output O_α of a sparse attention map (α-entmax with α = 1.5, or "
                "sparsemax) of the same queries and keys: O = O₁ + scale·(O_α − O₁). No extra branch and no "
                "extra model call; it acts on every row (cond and uncond), so it works at cfg 1 on distilled "
                "models (SDXL Lightning/DMD2/Turbo) and stacks with CFG and the other Guidance Kit methods. "
                "Works on SD1.5/SDXL, WAN, LTXV and Cosmos Predict2; joint-attention DiTs (Flux, SD3) have no "
                "separate cross-attention and are refused."),
            inputs=[
                model_input(),
                io.Float.Input(
                    "scale", default=2.0, min=0.0, max=10.0, step=0.1, round=0.01,
                    tooltip="Extrapolation λ from the dense (softmax) toward the sparse attention output: 0 = off "
                            "(the model unchanged), 1 = the sparse attention itself, > 1 extrapolates. The paper's "
                            "default 2.0 (SD1.5/SDXL, with or without CFG and on distilled models); lower it "
                            "(1.0–1.5) on video models, whose text attention is already peaked."),
                io.Combo.Input(
                    "sparse_function", options=list(SPARSE_FUNCTIONS), default="entmax1.5",
                    tooltip="The sparse attention map: 'entmax1.5' (α-entmax, α = 1.5: the paper's default) or "
                            "'sparsemax' (α = 2: sparser, a stronger effect at the same scale)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with PLADIS installed (the input model is unchanged).")],
        )

    @classmethod
    def execute(cls, model, scale, sparse_function):
        if sparse_function not in SPARSE_FUNCTIONS:
            raise node_error(f"{cls.LABEL}: sparse_function must be one of {SPARSE_FUNCTIONS}, not "
                             f"{sparse_function!r}.")
        try:
            spec = nag_family_of(model, cls.LABEL)
        except FamilyError:
            raise node_error(f"{cls.LABEL}: no text cross-attention hook for this model "
                             f"({describe(diffusion_model_of(model))}). PLADIS works on {PLADIS_FAMILIES}; on "
                             f"other families use NAG or a perturbation guidance (PAG, SEG).") from None
        patched = model.clone()
        if scale == 0.0:
            return io.NodeOutput(patched)
        if importlib.util.find_spec("entmax") is None:
            raise node_error(f"{cls.LABEL}: the sparse attention comes from the 'entmax' package, which is not "
                             f"installed in ComfyUI's Python. Install the pack's requirements (pip install -r "
                             f"requirements.txt in the pack's folder, or ComfyUI-Manager's 'install missing "
                             f"dependencies').")
        try:
            pladis.install(patched, spec, cls.LABEL, float(scale), sparse_function)
        except FamilyError as e:
            raise node_error(str(e)) from None
        return io.NodeOutput(patched)


class ERGNode(LayeredMethodNode):
    LABEL = "ERG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "Entropy Rectifying Guidance (Ifriqi et al., NeurIPS 2025): the weak branch's self-attention at a higher "
        "temperature (softmax(QKᵀ/(τ√d)), higher entropy); no negative prompt needed, works at cfg 1",
        'block families¹',
        '+1 batched branch',
    )
    COMPARE = {"key": "erg"}
    DEFAULTS = Defaults(scale=2.0)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "ERG",
            display_name="ERG · Entropy Rectifying Guidance",
            category=CATEGORY_ATTENTION,
            description=(
                "Entropy Rectifying Guidance (Ifriqi et al., NeurIPS 2025): an extra conditional branch whose "
                "self-attention in the chosen layers runs at a higher temperature τ (softmax(QKᵀ/(τ·√d)): a "
                "flatter, higher-entropy attention map, a weaker prediction), and the result is pushed away from "
                "it: D = CFG + scale·(cond − cond_ERG); at cfg 1 that is ERG's own rule with guidance 1 + scale, "
                "without a negative prompt. The branch runs in the same batched model call as cond and uncond. "
                "Stacks with APG and the other terms. Works on SD1.5/SDXL and Flux, Chroma, SD3, AuraFlow, WAN, "
                "HunyuanVideo, Qwen-Image, LTXV."),
            inputs=[
                model_input(),
                _scale_input(cls.DEFAULTS, "Strength of the ERG term (ERG's guidance w = 1 + scale at cfg 1). 2 = "
                                           "the pack's default with CFG 4–7 on SD1.5/SDXL; 1–2 on DiTs. 0 = off "
                                           "(no extra model cost)."),
                io.Float.Input("temperature", default=2.0, min=1.0, max=1000.0, step=0.1, round=0.01,
                               tooltip="Attention temperature τ of the weak branch: the logits are divided by τ. "
                                       "1 = no change (no guidance); 2 = the pack's default; larger = flatter "
                                       "attention, a weaker branch and a stronger effect (τ → ∞: every query "
                                       "gets the mean value)."),
                _layers_input("ERG default: the UNet middle block, the middle double block on DiTs (the pack's "
                              "choice, as PAG/SEG)."),
                *_term_inputs(cls.DEFAULTS),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, scale, temperature, layers, schedule, start_percent, end_percent):
        if temperature < 1.0:
            raise node_error(f"{cls.LABEL}: temperature must be at least 1 (a flatter attention map is the weak "
                             f"branch), not {temperature}.")
        return cls.add_term(model, "tempered_attention", layers, scale, schedule, start_percent, end_percent,
                            temperature=float(temperature))


NODES = [PLADISNode, ERGNode]
