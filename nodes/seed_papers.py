"""Nodes for the seed papers that need more than a formula: CFG Decomposition (Li, Wang, Qu, arXiv 2505.19210) and
Online Feedback CFG (Papalampidi et al., arXiv 2509.16131).

CFG Decomposition needs the class of each row and the data's Gaussian statistics. The statistics ship for the
embedded digits model (``digits/linear_statistics.py``); the class of a row is read from the conditioning at
every step by a pre-cfg function placed before the engine's (``read_conditioning``), which matches the row's
one-token context against the model's class-embedding table and puts the classes into the run's state.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..digits.linear_statistics import STATISTICS_FILE
from ..digits.model import NULL_CLASS, DigitsLatentFormat
from ..guiders.methods.cfg_decomposition import CLASSES_KEY, CFGDecomposition
from ..guiders.methods.online_feedback_cfg import CONTEXT_KEY as FEEDBACK_CONTEXT_KEY
from ..guiders.methods.online_feedback_cfg import OnlineFeedbackCFG
from ..guiders.plan import PlanError
from .common import CATEGORY_CFG, NODE_PREFIX, add_method, model_input, model_output, node_error, parse_float_list
from .runtime.engine import GuidanceRuntimeError, get_plan, run_state

MATCH_TOLERANCE = 1e-4  # relative distance of a context row to its class-embedding row


def classes_of_conditioning(entries, class_embedding: torch.Tensor, batch: int, label: str) -> torch.Tensor:
    """The class of each of ``batch`` rows from ComfyUI's processed cond entries (rows repeat the context's
    batch, as ComfyUI's ``repeat_to_batch_size`` does)."""
    if not entries:
        raise GuidanceRuntimeError(f"{label}: this step has no positive conditioning to read the class from.")
    if len(entries) > 1 or any(k in entries[0] for k in ("area", "mask")):
        raise GuidanceRuntimeError(f"{label}: the positive conditioning has several entries (combined, area or "
                                   f"masked conditioning), so a row has no single class. Use one digit's "
                                   f"conditioning from the Digits Model Loader.")
    context = entries[0].get("cross_attn")
    if context is None or context.ndim != 3 or context.shape[1] != 1 or \
            context.shape[-1] != class_embedding.shape[-1]:
        raise GuidanceRuntimeError(f"{label}: the positive conditioning is not a digits class embedding (a one-token "
                                   f"context of {class_embedding.shape[-1]} values). Use the Digits Model Loader's "
                                   f"positive output.")
    rows = context[:, 0].double().cpu()
    table = class_embedding.double().cpu()
    distances = torch.cdist(rows, table)
    best, index = distances.min(dim=1)
    if bool((best > MATCH_TOLERANCE * table.norm(dim=1)[index]).any()):
        raise GuidanceRuntimeError(f"{label}: a row of the positive conditioning matches no class of the digits "
                                   f"model whose statistics ship with the pack (another model, or a mixed "
                                   f"conditioning). Use the Digits Model Loader's positive output.")
    if bool((index == NULL_CLASS).any()):
        raise GuidanceRuntimeError(f"{label}: the positive conditioning is the null class, which has no class "
                                   f"statistics; choose a digit 0–9.")
    repeats = -(-batch // index.numel())
    return index.repeat(repeats)[:batch]


def pooled_of_conditioning(entries, batch: int, label: str) -> torch.Tensor:
    """The prompt's pooled CLIP text embedding for each of ``batch`` rows (``pooled_output`` of the one entry)."""
    if not entries or len(entries) > 1:
        raise GuidanceRuntimeError(f"{label}: the CLIP evaluator needs one positive conditioning entry (not combined "
                                   f"or area conditioning) to read the prompt's CLIP embedding from.")
    pooled = entries[0].get("pooled_output")
    if pooled is None:
        raise GuidanceRuntimeError(f"{label}: the positive conditioning has no pooled CLIP text embedding "
                                   f"(pooled_output); encode the prompt with CLIP Text Encode of a CLIP model.")
    pooled = pooled.reshape(pooled.shape[0], -1).float().cpu()
    repeats = -(-batch // pooled.shape[0])
    return pooled.repeat(repeats, 1)[:batch]


def read_conditioning(args: dict) -> list:
    """Pre-cfg function (before the engine's): what this step's methods need from the positive conditioning (the
    class of each row, the prompt's CLIP embedding), into the run state."""
    model_options = args["model_options"]
    plan = get_plan(model_options)
    if plan is None:
        return args["conds_out"]
    state = run_state(model_options).guidance
    entries = (args.get("conds") or [None])[0]
    batch = args["input"].shape[0]
    decomposition = plan.get(CFGDecomposition.KEY)
    if decomposition is not None and not decomposition.classes:
        try:
            stats = decomposition.load_statistics(state)
        except PlanError as e:
            raise GuidanceRuntimeError(str(e)) from None
        if stats.class_embedding is None:
            raise GuidanceRuntimeError(f"{decomposition.label}: its statistics file has no class-embedding table, so "
                                       f"the class of a row cannot be read from the conditioning.")
        state.method_state[CLASSES_KEY] = classes_of_conditioning(entries, stats.class_embedding, batch,
                                                                  decomposition.label)
    feedback = plan.get(OnlineFeedbackCFG.KEY)
    if feedback is not None:
        needs = feedback.evaluator.needs()
        context = {}
        if "classes" in needs:
            table = getattr(feedback.evaluator, "class_table", None)
            if table is None:
                raise GuidanceRuntimeError(f"{feedback.label}: the {feedback.evaluator.name} evaluator needs the class "
                                           f"of each row but has no class-embedding table to read it with.")
            context["classes"] = classes_of_conditioning(entries, table, batch, feedback.label)
        if "text_embedding" in needs:
            context["text_embedding"] = pooled_of_conditioning(entries, batch, feedback.label)
        state.method_state[FEEDBACK_CONTEXT_KEY] = context
    return args["conds_out"]


def with_conditioning_reader(patched):
    """``patched`` (a clone) with the conditioning reader first among its pre-cfg functions."""
    functions = [f for f in patched.model_options.get("sampler_pre_cfg_function", []) if f is not read_conditioning]
    patched.model_options["sampler_pre_cfg_function"] = [read_conditioning] + functions
    return patched


def is_digits_model(model) -> bool:
    inner = getattr(model, "model", None)
    return isinstance(getattr(inner, "latent_format", None), DigitsLatentFormat)


class CFGDecompositionNode(io.ComfyNode):
    LABEL = "CFG Decomposition"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "the linear decomposition of CFG (Li, Wang, Qu, arXiv 2505.19210): mean shift, positive and negative "
        "contrastive principal components of D_c − D_u, each with its own weight (all 1 = CFG), the nonlinear rest "
        "kept; per-step component norms in the log",
        'the embedded digits model (needs per-class statistics; refused elsewhere)',
        'none',
    )
    COMPARE = {"key": "cfg_decomposition", "aliases": {"decomposition": "cfg_decomposition"},
               "report": ("cfg_decomposition:negative_cpc_scale=0", "cfg_decomposition:positive_cpc_scale=2",
                          "cfg_decomposition:positive_cpc_scale=2,mean_shift_scale=0.5")}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "CFGDecomposition",
            display_name="CFG Decomposition · mean shift and contrastive principal components",
            category=CATEGORY_CFG,
            description=(
                "The linear decomposition of CFG (Li, Wang, Qu, 'Towards Understanding the Mechanisms of "
                "Classifier-Free Guidance', arXiv 2505.19210). With Gaussian class statistics, the CFG direction "
                "D_c − D_u of the optimal linear denoisers splits exactly into a mean shift (towards the class "
                "mean), a positive contrastive-principal-component term (directions more spread in the class than "
                "in the data: class-specific features) and a negative one (generic features, suppressed). Each gets "
                "its own weight; the model's nonlinear rest keeps weight 1, so all weights 1 is exactly CFG. The "
                "norm of every component per step is logged after the run. Needs the class statistics of the "
                "model: they ship for the embedded digits model (estimated from its own samples); other models "
                "are refused."),
            inputs=[
                model_input(),
                io.Float.Input("mean_shift_scale", default=1.0, min=-2.0, max=10.0, step=0.05,
                               tooltip="Weight of the mean-shift term (relative to the sampler's cfg; 1 = as in CFG). "
                                       "It moves samples towards the class mean; mostly at high noise."),
                io.Float.Input("positive_cpc_scale", default=1.0, min=-2.0, max=10.0, step=0.05,
                               tooltip="Weight of the positive CPC term (1 = as in CFG): amplifies the directions in "
                                       "which the class varies more than the data (class-specific features)."),
                io.Float.Input("negative_cpc_scale", default=1.0, min=-2.0, max=10.0, step=0.05,
                               tooltip="Weight of the negative CPC term (1 = as in CFG): suppresses the directions in "
                                       "which the data varies more than the class (generic features)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The weights act from this progress (ComfyUI's percent of sigma, 0 = pure "
                                       "noise); outside their window the step is plain CFG (components still logged)."),
                io.Float.Input("end_percent", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="…until this progress. At low noise the linear terms are large and cancel each "
                                       "other (the linear model no longer describes the network), so re-weighting "
                                       "them late destroys the sample: keep this ≤ 0.5."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, mean_shift_scale, positive_cpc_scale, negative_cpc_scale, start_percent=0.0,
                end_percent=0.4):
        if not is_digits_model(model):
            raise node_error(f"{cls.LABEL}: it needs the Gaussian statistics (per-class means and covariances) of "
                             f"the model's data, which exist for the embedded digits model only (Digits Model "
                             f"Loader). For this model there are none, so the decomposition cannot be formed; use "
                             f"plain CFG or another guidance node.")
        if not STATISTICS_FILE.is_file():
            raise node_error(f"{cls.LABEL}: the digits statistics file is missing ({STATISTICS_FILE}); restore it "
                             f"with 'git checkout -- digits/weights' or run 'python -m digits.linear_statistics' in "
                             f"the pack folder.")
        method = CFGDecomposition(statistics=str(STATISTICS_FILE), mean_shift_scale=float(mean_shift_scale),
                                  positive_scale=float(positive_cpc_scale), negative_scale=float(negative_cpc_scale),
                                  label=cls.LABEL, start_percent=float(start_percent), end_percent=float(end_percent))
        return io.NodeOutput(with_conditioning_reader(add_method(model, method)))


FEEDBACK_EVALUATORS = ("auto", "digit classifier: adherence", "digit classifier: confidence", "CLIP vision + VAE")


class OnlineFeedbackCFGNode(io.ComfyNode):
    LABEL = "Online Feedback CFG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        "dynamic CFG via online feedback (Papalampidi et al., arXiv 2509.16131): per sample and step, the x0 of "
        "candidate scales from the same cond/uncond pair scored by an evaluator (the digit classifier, or a "
        "CLIP_VISION + VAE preview against the prompt's CLIP embedding), greedy choice within a budget of steps; "
        "chosen scales in the log",
        'the digits model (classifier); image models with a matching CLIP vision model and their VAE',
        'none (evaluator cost: a VAE decode and a CLIP vision pass per candidate at evaluated steps)',
    )
    COMPARE = {"key": "online_feedback_cfg", "aliases": {"feedback": "online_feedback_cfg"},
               "overrides": {"candidates": "1, {scale}, {2 * scale}"},
               "report": ("online_feedback_cfg", "online_feedback_cfg:tolerance=0.1")}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "OnlineFeedbackCFG",
            display_name="Online Feedback CFG · scale chosen per step by an evaluator",
            category=CATEGORY_CFG,
            description=(
                "Dynamic classifier-free guidance via online feedback (Papalampidi et al., arXiv 2509.16131). At an "
                "evaluated step, the x0 predictions of several candidate CFG scales are formed from the same cond and "
                "uncond predictions (no extra model call), an evaluator scores each, and each sample takes the "
                "smallest scale whose score is within the tolerance of the best; between evaluations it keeps that "
                "scale (before the first: the sampler's cfg). Evaluators: the embedded digit classifier (digits "
                "model: adherence to the requested digit, or confidence), or a CLIP vision model with the VAE "
                "(a decoded preview's similarity to the prompt's CLIP embedding). The chosen scales are logged after "
                "the run."),
            inputs=[
                model_input(),
                io.Combo.Input("evaluator", options=list(FEEDBACK_EVALUATORS), default="auto",
                               tooltip="What scores the candidates. 'auto': CLIP vision + VAE when both are "
                                       "connected, else the digit classifier's adherence on the digits model. The "
                                       "digit classifier needs the Digits Model Loader's model and conditioning."),
                io.String.Input("candidates", default="1, 2, 3, 5, 7.5",
                                tooltip="Candidate CFG scales, separated by commas (at least two). Each evaluated step "
                                        "costs one evaluator pass per candidate and sample, no model call."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Evaluations happen from this progress (ComfyUI's percent of sigma, 0 = pure "
                                       "noise)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="…until this progress; later steps keep the last chosen scale."),
                io.Int.Input("budget", default=0, min=0, max=1000,
                             tooltip="The most steps at which the evaluator runs in one sampler call (the cost "
                                     "budget; the evaluated steps are the first ones of the window); 0 = every step "
                                     "of the window. Set it for the CLIP evaluator (a decode and a CLIP pass per "
                                     "candidate and sample)."),
                io.Float.Input("tolerance", default=0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="A sample takes the smallest candidate scoring within this of the best (0 = "
                                       "the best-scoring one, the paper's greedy choice). Digit classifier scores "
                                       "are log-probabilities (nats); CLIP scores are cosine similarities (try "
                                       "0.005)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional: a CLIP vision model matching the text encoder of the prompt "
                                            "(SD1.5: ViT-L/14; SDXL: ViT-bigG/14), for the CLIP evaluator."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: the model's VAE, to decode the candidates' previews for the CLIP "
                                     "evaluator."),
                io.Int.Input("preview_size", default=32, min=4, max=256, optional=True,
                             tooltip="CLIP evaluator: candidates are area-downscaled to at most this many latent "
                                     "pixels per side before decoding (32 ≈ 256-pixel previews on /8 VAEs)."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def _evaluator(cls, model, evaluator, clip_vision, vae, preview_size):
        from ..digits.classifier import DigitClassifierError, load_classifier
        from ..digits.model import UNET_WEIGHTS, read_class_embedding
        from .contributors.feedback_evaluators import ClipVisionEvaluator, DigitClassifierEvaluator

        if evaluator not in FEEDBACK_EVALUATORS:
            raise node_error(f"{cls.LABEL}: evaluator must be one of {', '.join(FEEDBACK_EVALUATORS)}; got "
                             f"{evaluator!r}")
        if evaluator == "auto":
            evaluator = "CLIP vision + VAE" if clip_vision is not None and vae is not None else \
                "digit classifier: adherence"
        if evaluator == "CLIP vision + VAE":
            if clip_vision is None or vae is None:
                raise node_error(f"{cls.LABEL}: the CLIP evaluator needs both a CLIP_VISION model (Load CLIP Vision) "
                                 f"and the VAE connected.")
            return ClipVisionEvaluator(clip_vision, vae, model.model.latent_format, preview_size)
        if not is_digits_model(model):
            raise node_error(f"{cls.LABEL}: the digit classifier scores the embedded digits model only; for this "
                             f"model connect a CLIP vision model and the VAE (evaluator 'CLIP vision + VAE').")
        try:
            classifier = load_classifier()
        except DigitClassifierError as e:
            raise node_error(f"{cls.LABEL}: {e}") from None
        return DigitClassifierEvaluator(classifier, read_class_embedding(UNET_WEIGHTS),
                                        evaluator.removeprefix("digit classifier: "))

    @classmethod
    def execute(cls, model, evaluator, candidates, start_percent, end_percent, budget, tolerance, clip_vision=None,
                vae=None, preview_size=32):
        scales = parse_float_list(candidates, cls.LABEL, "candidates")
        method = OnlineFeedbackCFG(cls._evaluator(model, evaluator, clip_vision, vae, preview_size), scales,
                                   float(start_percent), float(end_percent), int(budget), float(tolerance), cls.LABEL)
        return io.NodeOutput(with_conditioning_reader(add_method(model, method)))


NODES = [CFGDecompositionNode, OnlineFeedbackCFGNode]
