"""Model-patch nodes for perturbation guidance: PAG, SEG, TPG, skip-layer (SLG/STG), S²-Guidance, TSG, ICG.

Each layered node (PAG, SEG, TPG, skip-layer, S²-Guidance) clones the MODEL, resolves its layer selection
(``auto``: the family default of ``runtime.families.auto_layers``, whose sources each node's help page in
``web/docs`` cites) against the model's blocks (errors name the node, the family and the valid blocks), adds
one term to the guidance plan, ``D̂ += s_t·(C − C̃)`` with ``C̃`` the conditional prediction of the degraded
network, and installs its contributor (``contributors/block_perturbation.py``). The degraded branch runs in
the same batched model call as cond and uncond. TSG's branch perturbs the time embedding instead (its legacy
mode the time input: ``contributors/time_input.py``); ICG replaces the unconditional branch by the prediction
under an independent condition (``contributors/condition.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from comfy_api.latest import io

from ..guiders.attention_ops import drop_count
from ..guiders.layers import LayerError, parse_layers, resolve
from ..guiders.methods.extra_guidance import ExtraGuidance
from ..guiders.methods.icg import IndependentCondition
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
from .contributors import block_perturbation, condition, time_input
from .contributors.block_perturbation import Perturbation
from .runtime.blocks import block_layout, first_block
from .runtime.families import FamilyError, auto_layers, check_blocks, diffusion_model_of, family_of

CATEGORY_PERTURB = CATEGORY_ROOT + "/perturbation"
INFINITE_BLUR = 10000.0

LAYERS_TOOLTIP = (
    "Where the perturbation acts. 'auto' = the recommended blocks for this model family (see the help page). "
    "UNet (SD1.5/SDXL): 'middle 0', 'input 7-8', 'output 0-2', transformer layers inside a block with N.T "
    "('input 8.2-5'). DiTs use ComfyUI's block numbers: 'double 7-9, single 0-37' (Flux, Chroma, HunyuanVideo, "
    "AuraFlow), 'double 12' or 'blocks 12' (SD3, WAN, Qwen-Image, LTXV: all their blocks are 'double'). "
    "Ranges are inclusive; 'all' selects a whole group.")


# ------------------------------------------------------------------------------------------------
# shared node plumbing
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Defaults:
    scale: float
    start: float = 0.0
    end: float = 1.0


def _term_inputs(defaults: Defaults) -> list:
    return term_schedule_inputs(defaults.start, defaults.end)


def _scale_input(defaults: Defaults, tooltip: str):
    return io.Float.Input("scale", default=defaults.scale, min=0.0, max=100.0, step=0.05, round=0.01,
                          tooltip=tooltip)


def _layers_input(example: str):
    return io.String.Input("layers", default="auto", multiline=False, tooltip=LAYERS_TOOLTIP + " " + example)



def _family(model, label: str):
    try:
        spec = family_of(model, label)
        check_blocks(diffusion_model_of(model), spec, label)
    except FamilyError as e:
        raise node_error(str(e)) from None
    return spec, block_layout(model, spec)


def _blocks(label: str, method: str, layers: str, spec, layout) -> tuple[tuple, ...]:
    try:
        selection = parse_layers(layers, label)
        if selection.auto:
            selection = parse_layers(auto_layers(method, spec, layout), label)
        blocks = resolve(selection, layout, label)
    except LayerError as e:
        raise node_error(str(e)) from None
    if not blocks:
        raise node_error(f"{label}: the layer selection '{layers}' selects no blocks on {spec.name}")
    return blocks


def _layers_syntax(layers: str, label: str) -> bool | str:
    try:
        parse_layers(layers, label)
    except LayerError as e:
        return str(e)
    return True


def add_branch_term(model, label: str, effect, scale: float, schedule: str, start_percent: float,
                    end_percent: float, source: str = "cond"):
    """A clone of ``model`` whose plan adds ``s_t·(C − C̃)`` for a branch (named ``label``) with ``effect``."""
    built = term_schedule(label, schedule, start_percent, end_percent)
    term = ExtraGuidance(Branch(label, source=source, perturbation=effect), scale=scale, schedule=built, label=label)
    return add_method(model, term)


def add_perturbation_term(model, label: str, perturbation: Perturbation, spec, scale: float, schedule: str,
                          start_percent: float, end_percent: float):
    """Clone, add the perturbation's term to the plan and install its contributor."""
    patched = add_branch_term(model, label, perturbation, scale, schedule, start_percent, end_percent)
    block_perturbation.install(patched, spec, block_layout(patched, spec), perturbation)
    return patched


def _seed_input():
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                        tooltip="Seed of the random choices (permutations, dropped blocks, noise). The same seed "
                                "gives the same result; it is independent of the sampler's noise seed.")


# ------------------------------------------------------------------------------------------------
# nodes
# ------------------------------------------------------------------------------------------------

class LayeredMethodNode(io.ComfyNode):
    """Shared parts of the nodes whose degraded branch acts on selected blocks."""

    LABEL = ""

    @classmethod
    def validate_inputs(cls, layers="auto", **kwargs):
        return _layers_syntax(layers, cls.LABEL)

    @classmethod
    def add_term(cls, model, operator: str, layers: str, scale: float, schedule: str, start_percent: float,
                 end_percent: float, **fields):
        spec, layout = _family(model, cls.LABEL)
        cls.check_family(spec)
        p = Perturbation(cls.LABEL, operator, spec.name, _blocks(cls.LABEL, cls.LABEL, layers, spec, layout), **fields)
        return io.NodeOutput(add_perturbation_term(model, cls.LABEL, p, spec, scale, schedule, start_percent,
                                                   end_percent))

    @classmethod
    def check_family(cls, spec) -> None:
        pass


class PAGNode(LayeredMethodNode):
    LABEL = "PAG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Perturbed-Attention Guidance (Ahn et al., ECCV 2024): self-attention map → identity in an extra branch',
        'block families¹',
        '+1 batched branch',
    )
    COMPARE = {"key": "pag"}
    DEFAULTS = Defaults(scale=3.0)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "PAG",
            display_name="PAG · Perturbed-Attention Guidance",
            category=CATEGORY_PERTURB,
            description=(
                "Perturbed-Attention Guidance (Ahn et al., ECCV 2024): the self-attention map of the chosen layers "
                "is replaced by the identity (each token keeps its own value) in an extra conditional branch, and "
                "the result is pushed away from it: D = CFG + scale·(cond − cond_PAG). Improves structure and "
                "detail, also with cfg 1. On joint-attention DiTs (Flux, SD3, Qwen-Image, HunyuanVideo) image "
                "tokens attend to themselves and to the text (diffusers' joint PAG). The branch runs in the same "
                "batched model call as cond and uncond. Works on SD1.5/SDXL and Flux, Chroma, SD3, AuraFlow, WAN, "
                "HunyuanVideo, Qwen-Image, LTXV, Lumina2/Z-Image, Mochi, Cosmos Predict2."),
            inputs=[
                model_input(),
                _scale_input(cls.DEFAULTS, "Strength of the PAG term. Paper/diffusers: 3 with CFG 4–7 on SD1.5/SDXL; "
                                           "start lower (1–2) on DiTs. 0 = off (no extra model cost)."),
                _layers_input("PAG default: the UNet middle block (all its transformer layers); LTXV 'blocks 19' "
                              "(2B) / 'blocks 28' (13B), LTX-Video's own STG, which is PAG's operator; the middle "
                              "double block on other DiTs."),
                *_term_inputs(cls.DEFAULTS),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, scale, layers, schedule, start_percent, end_percent):
        return cls.add_term(model, "identity_attention", layers, scale, schedule, start_percent, end_percent)


class SEGNode(LayeredMethodNode):
    LABEL = "SEG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Smoothed Energy Guidance (Hong, NeurIPS 2024): self-attention queries blurred on the token grid (∞ blur: '
        "every query of a frame becomes the frame's mean query; the official kernel, σ ≤ 1/6 = no blur)",
        'block families¹',
        '+1 batched branch',
    )
    COMPARE = {"key": "seg"}
    DEFAULTS = Defaults(scale=3.0)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "SEG",
            display_name="SEG · Smoothed Energy Guidance",
            category=CATEGORY_PERTURB,
            description=(
                "Smoothed Energy Guidance (Hong, NeurIPS 2024): in an extra conditional branch the self-attention "
                "queries of the chosen layers are blurred with a Gaussian over the image-token grid (smoothing the "
                "attention energy); D = CFG + scale·(cond − cond_SEG). blur_sigma above 9999 is the infinite blur "
                "(every query of a frame becomes the frame's mean query, so all share one attention row), the "
                "official default. Same kernel, padding and thresholds as the official code."),
            inputs=[
                model_input(),
                _scale_input(cls.DEFAULTS, "Strength of the SEG term. Official default 3 (SDXL, with CFG). 0 = off."),
                io.Float.Input("blur_sigma", default=INFINITE_BLUR, min=0.0, max=INFINITE_BLUR, step=0.5,
                               tooltip="Std of the Gaussian blur of the queries, in tokens. Above 9999 = "
                                       "infinite (each frame's queries replaced by their mean: one shared "
                                       "attention row; official default, strongest). 10 = the paper's milder "
                                       "setting. ≤ 1/6 = no blur (official kernel of width 1)."),
                _layers_input("SEG default: the UNet middle block, the middle double block on DiTs."),
                *_term_inputs(cls.DEFAULTS),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma, layers, schedule, start_percent, end_percent):
        return cls.add_term(model, "smoothed_attention", layers, scale, schedule, start_percent, end_percent,
                            sigma=float(blur_sigma))


class TPGNode(LayeredMethodNode):
    LABEL = "TPG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Token Perturbation Guidance (Rajabi et al., arXiv 2506.10036): image tokens of the chosen blocks shuffled '
        'in an extra branch (SDXL: the official `input 7.2-9, input 8`)',
        'block families¹ except SD3/3.5 and AuraFlow (no rotary positions: an error that says so)',
        '+1 batched branch',
    )
    COMPARE = {"key": "tpg"}
    DEFAULTS = Defaults(scale=3.0)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "TPG",
            display_name="TPG · Token Perturbation Guidance",
            category=CATEGORY_PERTURB,
            description=(
                "Token Perturbation Guidance (Rajabi et al., TaatiTeam/Token-Perturbation-Guidance): in an extra "
                "conditional branch the image tokens entering the chosen transformer layers are randomly permuted "
                "(norm-preserving), D = CFG + scale·(cond − cond_TPG); a fresh seeded permutation every step. "
                "UNet: tokens shuffled before the layer, as the official pipeline. DiTs with rotary positions "
                "(Flux, Chroma, WAN, HunyuanVideo, Qwen-Image, LTXV): shuffled before the block and restored after "
                "it. SD3 and AuraFlow add positions once at the input, so a shuffled-and-restored block is "
                "unchanged there: use PAG, SEG or skip-layer guidance on them."),
            inputs=[
                model_input(),
                _scale_input(cls.DEFAULTS, "Strength of the TPG term. Official 3 (SDXL; its README uses it at cfg 1, "
                                           "instead of CFG); with CFG start at 1.5. 0 = off."),
                _layers_input("TPG default: SDXL 'input 7.2-9, input 8' (the official down-path layers d6–d23); "
                              "other UNets (fewer layers, where that rule selects nothing): the input blocks at "
                              "the lowest resolution with attention (the pack's choice, e.g. SD1.5 'input 7, "
                              "input 8'); the middle double block on DiTs."),
                _seed_input(),
                *_term_inputs(cls.DEFAULTS),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def check_family(cls, spec) -> None:
        if not spec.is_unet and not spec.rope:
            raise node_error(f"{cls.LABEL}: {spec.name} adds positions once at its input (no rotary positions in "
                             f"its blocks), so shuffling tokens around a block and restoring them changes nothing. "
                             f"Use PAG, SEG or Skip-Layer Guidance on {spec.name}.")

    @classmethod
    def execute(cls, model, scale, layers, seed, schedule, start_percent, end_percent):
        return cls.add_term(model, "token_shuffle", layers, scale, schedule, start_percent, end_percent,
                            seed=int(seed))


class SkipLayerNode(LayeredMethodNode):
    LABEL = "SLG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'SLG (Stability AI, SD3.5) / STG (Hyung et al., CVPR 2025): chosen blocks skipped in an extra branch — '
        "also on UNets, where core's nodes do nothing",
        'block families¹',
        '+1 batched branch',
    )
    COMPARE = {"key": "skip_layer", "label": "Skip-Layer", "aliases": {"slg": "skip_layer", "skiplayer": "skip_layer"}}
    DEFAULTS = Defaults(scale=2.8, start=0.01, end=0.2)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "SkipLayer",
            display_name="Skip-Layer Guidance · SLG / STG (UNet and DiT)",
            category=CATEGORY_PERTURB,
            description=(
                "Skip-layer guidance (Stability AI, SD3.5) / spatiotemporal skip guidance (STG, Hyung et al. 2024): "
                "in an extra conditional branch the chosen blocks are skipped (each returns its input; LTX-Video's "
                "'transformer_block' STG mode; its default mode replaces the self-attention by V, which is the PAG "
                "node); D = CFG + "
                "scale·(cond − cond_skip). Works on UNets too (ComfyUI core's skip-layer nodes silently do nothing "
                "there): the chosen transformer layers are skipped. Pair with the Rescale node (0.7, STG's "
                "rescale) at high scales."),
            inputs=[
                model_input(),
                _scale_input(cls.DEFAULTS, "Strength of the skip-layer term. SD3.5 Medium: 2.8 (diffusers; Stability "
                                           "uses 2.5–3) in 1–20% of the run; STG on LTXV/WAN: 1–2 over the whole "
                                           "run. 0 = off."),
                _layers_input("SLG default: SD3/SD3.5 'double 7-9' (official), WAN 'blocks 9', LTXV 'blocks 19' "
                              "(the block of LTX's STG; LTX's default STG mode is PAG's operator, see help), Flux, "
                              "Chroma, HunyuanVideo and AuraFlow 'double 7-9, single 7-9' (ComfyUI core's "
                              "default), other DiTs 'double 7-9' (the middle block on small models), UNet "
                              "'middle all'."),
                *_term_inputs(cls.DEFAULTS),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, scale, layers, schedule, start_percent, end_percent):
        return cls.add_term(model, "skip", layers, scale, schedule, start_percent, end_percent)


class S2GuidanceNode(LayeredMethodNode):
    LABEL = "S²-Guidance"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Stochastic Self Guidance (Chen et al., arXiv 2508.12880): a random ratio of blocks dropped every step, '
        'never the first block',
        'block families¹',
        '+1 batched branch',
    )
    COMPARE = {"key": "s2_guidance", "aliases": {"s2": "s2_guidance"}}
    DEFAULTS = Defaults(scale=0.25, start=0.1, end=0.9)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "S2Guidance",
            display_name="S²-Guidance · Stochastic Self Guidance (block dropping)",
            category=CATEGORY_PERTURB,
            description=(
                "S²-Guidance (Chen et al., 2025, 'Stochastic Self Guidance for Training-Free Enhancement of "
                "Diffusion Models'): every step a random sub-network is formed by dropping drop_ratio of the "
                "candidate blocks (never the first block of the model), its conditional prediction is made in the "
                "same batched call, and D = CFG + scale·(cond − cond_sub). The dropped blocks are resampled every "
                "step from the seed: the same seed gives the same image."),
            inputs=[
                model_input(),
                _scale_input(cls.DEFAULTS, "Weight ω of the self-guidance term. Paper: 0.25 (with CFG). 0 = off."),
                io.Float.Input("drop_ratio", default=0.1, min=0.0, max=0.9, step=0.01,
                               tooltip="Fraction of the candidate blocks dropped each step (rounded). Paper: ~10%. "
                                       "0 = nothing dropped (the term vanishes)."),
                _layers_input("S²-Guidance: the candidate blocks to drop from; default all transformer blocks "
                              "(layers on UNets). The model's first block is never dropped."),
                _seed_input(),
                *_term_inputs(cls.DEFAULTS),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, scale, drop_ratio, layers, seed, schedule, start_percent, end_percent):
        spec, layout = _family(model, cls.LABEL)
        blocks = _blocks(cls.LABEL, cls.LABEL, layers, spec, layout)
        first = first_block(spec, layout)
        candidates = tuple(b for b in blocks if b != first)
        if not candidates:
            raise node_error(f"{cls.LABEL}: the selection '{layers}' holds only the model's first block, which "
                             f"S²-Guidance never drops; select more blocks (e.g. 'auto').")
        if drop_count(len(candidates), drop_ratio) == 0 and drop_ratio > 0:
            raise node_error(f"{cls.LABEL}: drop_ratio {drop_ratio} of {len(candidates)} candidate blocks rounds to "
                             f"0 blocks, so nothing would be dropped; raise drop_ratio to at least "
                             f"{math.ceil(50 / len(candidates)) / 100:.2f} or select more blocks.")
        p = Perturbation(cls.LABEL, "drop", spec.name, candidates, drop_ratio=float(drop_ratio), seed=int(seed))
        return io.NodeOutput(add_perturbation_term(model, cls.LABEL, p, spec, scale, schedule, start_percent,
                                                   end_percent))


TSG_PERTURB = ("time embedding (paper)", "time input shift (legacy)")


class TSGNode(io.ComfyNode):
    LABEL = "TSG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "Time-step Guidance (Sadat et al., ICLR 2025): Gaussian noise s·t^α on the model's time-step embedding in "
        "an extra branch (the paper's form; redrawn every step, the same for every sample); option: the legacy "
        'time-input shift; guides unconditional generation too',
        'all with a time-embedding module (Chroma, Stable Cascade: legacy mode)',
        '+1 batched branch',
    )
    COMPARE = {"key": "tsg"}
    DEFAULTS = Defaults(scale=1.5)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "TSG",
            display_name="TSG · Time-step Guidance",
            category=CATEGORY_PERTURB,
            description=(
                "Time-step guidance (Sadat et al., ICLR 2025, 'No Training, No Problem'): an extra conditional "
                "branch runs with a perturbed time-step embedding, D = CFG + scale·(cond − cond_t̃) (at cfg 1: "
                "cond + scale·(cond − cond_t̃)), so it also improves unconditional generation (empty prompt, cfg "
                "1). Paper mode: the model's time embedding gets Gaussian noise of std s·t^α (t = diffusion time "
                "in [0, 1]) in the branch only, redrawn every step. Legacy mode: the model's scalar time input is "
                "shifted instead (the branch denoises at another noise level; works on every family)."),
            inputs=[
                model_input(),
                _scale_input(cls.DEFAULTS, "Strength of the TSG term (the paper's w_TSG − 1). Start at 1–2; lower it "
                                           "with high cfg. 0 = off (no extra model cost)."),
                io.Float.Input("time_noise", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Legacy mode: std of the time-input shift as a fraction of the model's time "
                                       "range (clamped to the range). Ignored by the paper mode."),
                _seed_input(),
                *_term_inputs(cls.DEFAULTS),
                # added after the first release: last and optional, so saved workflows keep loading
                io.Combo.Input("perturb", options=list(TSG_PERTURB), default=TSG_PERTURB[0], optional=True,
                               tooltip="What the branch perturbs. 'time embedding (paper)': the time-step embedding "
                                       "vector gets + s·t^α·n (UNets, Flux, SD3, AuraFlow, WAN, HunyuanVideo, "
                                       "Qwen-Image, LTXV, Lumina2, HiDream, PixArt, HunyuanDiT, Mochi, Cosmos; not "
                                       "Chroma or Stable Cascade). 'time input shift (legacy)': the scalar time input "
                                       "is shifted by time_noise × its range (every family; a different signal)."),
                io.Float.Input("s", default=2.0, min=0.0, max=50.0, step=0.05, round=0.01, optional=True,
                               tooltip="Paper mode: noise scale s of the embedding perturbation s·t^α·n (paper: 2). "
                                       "0 = no perturbation (the term vanishes). Ignored by the legacy mode."),
                io.Float.Input("alpha", default=1.0, min=0.0, max=8.0, step=0.05, round=0.01, optional=True,
                               tooltip="Paper mode: exponent α of the diffusion time t ∈ [0, 1] in s·t^α (paper: 1; "
                                       "0 = the same noise at every step, larger = weaker late in the run). Ignored "
                                       "by the legacy mode."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def validate_inputs(cls, perturb=TSG_PERTURB[0], **kwargs):
        if perturb not in TSG_PERTURB:
            return f"{cls.LABEL}: perturb must be one of {', '.join(TSG_PERTURB)} (got {perturb!r})"
        return True

    @classmethod
    def execute(cls, model, scale, time_noise, seed, schedule, start_percent, end_percent, perturb=TSG_PERTURB[0],
                s=2.0, alpha=1.0):
        if perturb == TSG_PERTURB[1]:
            family = time_input.family_for_time_input(model)
            shift = time_input.TimeShift(cls.LABEL, family, seed=int(seed), shift=float(time_noise))
            patched = add_branch_term(model, cls.LABEL, shift, scale, schedule, start_percent, end_percent)
            time_input.install_time_shift(patched)
            return io.NodeOutput(patched)
        try:
            site = time_input.site_of(model, cls.LABEL)
        except FamilyError as e:
            raise node_error(str(e)) from None
        p = time_input.TimeEmbeddingNoise(cls.LABEL, site.family, seed=int(seed), s=float(s), alpha=float(alpha))
        patched = add_branch_term(model, cls.LABEL, p, scale, schedule, start_percent, end_percent)
        time_input.install(patched, site)
        return io.NodeOutput(patched)


class ICGNode(io.ComfyNode):
    LABEL = "ICG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Independent Condition Guidance (Sadat et al., ICLR 2025): the uncond evaluated under random '
        'prompt-independent tokens **and pooled vector**, redrawn every step (negative prompt ignored)',
        'all with a text/token cross-attention conditioning',
        'none (replaces the uncond)',
    )
    COMPARE = {"key": "icg"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "ICG",
            display_name="ICG · Independent Condition Guidance",
            category=CATEGORY_PERTURB,
            description=(
                "Independent Condition Guidance (Sadat et al., ICLR 2025, 'No Training, No Problem'): the "
                "unconditional branch of CFG is evaluated under a condition independent of the prompt instead of "
                "the negative/empty prompt: D = C_ind + cfg·(C − C_ind). For models trained without a null "
                "condition, or to replace the empty prompt's prediction. The independent condition is random "
                "text tokens with the prompt embedding's per-channel statistics plus, on SDXL, Flux, SD3, "
                "HunyuanVideo and HiDream, a random pooled text vector with the prompt's statistics; redrawn every "
                "step (the paper's algorithm) from the seed and the noise level. The negative prompt connected to "
                "the sampler is not used. Uses the sampler's cfg; no extra model call (it replaces the "
                "unconditional one)."),
            inputs=[
                model_input(),
                _seed_input(),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, seed):
        effect = condition.RandomCondition(cls.LABEL, int(seed))
        term = IndependentCondition(Branch("ICG", source="cond", perturbation=effect), label=cls.LABEL)
        patched = add_method(model, term)
        condition.install(patched)
        return io.NodeOutput(patched)


NODES = [PAGNode, SEGNode, TPGNode, SkipLayerNode, S2GuidanceNode, TSGNode, ICGNode]
