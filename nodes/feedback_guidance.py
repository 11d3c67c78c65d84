"""Model-patch nodes for the negative-prompt, feedback, condition-noise and sample-scoring methods: Perp-Neg,
Dynamic Negative Guidance, Feedback Guidance, CADS and CFG-Rejection. Each adds one method to the model's guidance
plan (``guiders/methods/``: ``perp_neg``, ``dng``, ``fbg``, ``cads``, ``cfg_rejection``), so they stack with every
other term and sample with the plain KSampler and the Guidance Guider.

Perp-Neg and DNG bring their own negative prompt (a CONDITIONING input): it joins the guider's conds for the
sampler call (``contributors/node_conditioning.py``), ComfyUI processes it like the sampler's negative, and its
prediction is one more entry of the same batched model call. CADS installs its condition-noise wrapper
(``contributors/condition_noise.py``).
"""

from __future__ import annotations

from comfy_api.latest import io

from ..guiders.methods.cads import CADS
from ..guiders.methods.cfg_rejection import REJECTION_MODES, CFGRejection
from ..guiders.methods.dng import DynamicNegativeGuidance
from ..guiders.methods.fbg import FBG_MODES, FeedbackGuidance
from ..guiders.methods.perp_neg import PerpNeg
from ..guiders.plan import Branch, PlanError
from ..guiders.schedules import ScheduleError
from .common import (
    CATEGORY_CFG,
    NODE_PREFIX,
    add_method,
    model_input,
    model_output,
    node_error,
    term_schedule,
    term_schedule_inputs,
    validation_message,
)
from .contributors import condition_noise, node_conditioning

SAMPLER_NEGATIVE = ("The sampler's negative stays the unconditional prediction U (connect an empty prompt there, as "
                    "core's PerpNegGuider's empty_conditioning).")


def _negative_input(name: str, what: str):
    return io.Conditioning.Input(
        name, tooltip=f"What to steer away from, encoded with the same text encoder as the prompt (e.g. "
                            f"'blurry, extra fingers'). {what} {SAMPLER_NEGATIVE}")


def _negative_branch(owner: str, key: str, field: str, negative) -> Branch:
    """The branch evaluated with the node's own negative prompt (input ``field``)."""
    try:
        node_conditioning.checked(owner, field, negative)
    except ValueError as e:
        raise node_error(str(e)) from None
    effect = node_conditioning.NodeConditioning(key, owner)
    return Branch(f"{owner} negative", source="uncond", perturbation=effect)


def _schedule(label: str, schedule: str, start_percent: float, end_percent: float):
    try:
        return term_schedule(label, schedule, start_percent, end_percent)
    except ScheduleError as e:
        raise node_error(str(e)) from None


class PerpNegNode(io.ComfyNode):
    LABEL = "Perp-Neg"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Perp-Neg (Armandpour et al., arXiv 2304.04968; core PerpNegGuider\'s formula, per sample): a negative '
        'prompt with only its component perpendicular to the positive direction, `D −= cfg·s·⊥(N − U, C − U)`, as a '
        'plan term: stacks with CFG-Zero*, APG, PAG (core\'s guider breaks CFG-Zero*); plain KSampler',
        'all',
        '+1 pass (the negative prompt, in the same batched call)',
    )
    COMPARE = {"key": "perp_neg", "aliases": {"perpneg": "perp_neg"}, "own_negative": True}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "PerpNeg",
            display_name="Perp-Neg · Perpendicular Negative Prompt",
            category=CATEGORY_CFG,
            description=(
                "Perp-Neg (Armandpour et al. 2023): a negative prompt that removes only what is perpendicular to the "
                "prompt's own direction, so it cannot cancel the prompt: D = U + cfg·(C − U) − cfg·neg_scale·⊥, "
                "⊥ = (N − U) minus its projection on (C − U), per sample (core's PerpNegGuider formula). As a plan "
                "term it stacks with CFG-Zero*, APG, PAG and the rest, with the plain KSampler. Connect an empty "
                "prompt as the sampler's negative and the prompt to avoid here; it is evaluated in the same batched "
                "model call (one more pass)."),
            inputs=[
                model_input(),
                _negative_input("perpneg_negative",
                                "Only its component perpendicular to the prompt's direction is removed."),
                io.Float.Input("neg_scale", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Strength s of the perpendicular negative, multiplied by the sampler's cfg as "
                                       "in core's PerpNegGuider (default 1, core's). 0 = off (no extra pass)."),
                *term_schedule_inputs(what="the negative prompt"),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def validate_inputs(cls, schedule="constant", start_percent=0.0, end_percent=1.0, **kwargs):
        return validation_message(term_schedule, cls.LABEL, schedule, start_percent, end_percent)

    @classmethod
    def execute(cls, model, perpneg_negative, neg_scale, schedule, start_percent, end_percent):
        branch = _negative_branch(cls.LABEL, "perp_neg", "perpneg_negative", perpneg_negative)
        method = PerpNeg(branch, float(neg_scale), _schedule(cls.LABEL, schedule, start_percent, end_percent),
                         cls.LABEL)
        patched = add_method(model, method)
        node_conditioning.install(patched, "perp_neg", perpneg_negative)
        return io.NodeOutput(patched)


class DNGNode(io.ComfyNode):
    LABEL = "DNG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Dynamic Negative Guidance (Koulischer et al., ICLR 2025; official code): a negative prompt weighted by '
        'the tracked posterior p of the negative per sample, `D −= λ·p/(1−p)·(N − U)`; acts only on samples '
        'heading towards the negative',
        'all',
        '+1 pass (the negative prompt, in the same batched call)',
    )
    COMPARE = {"key": "dng", "own_negative": True}
    STATE_ACROSS_SAMPLER_CALLS = ("the posterior of the negative is tracked over the steps of one sampler call and "
                                  "restarts at the prior in each call (a run split over two samplers starts the "
                                  "second part from the prior again)")

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "DNG",
            display_name="DNG · Dynamic Negative Guidance",
            category=CATEGORY_CFG,
            description=(
                "Dynamic Negative Guidance (Koulischer et al., ICLR 2025): a negative prompt whose weight follows "
                "the model's own estimate of the probability p that the sample is what the negative describes, "
                "updated after every step from how the sample moved (official Algorithm 1): λ_t = scale·p/(1 − p), "
                "D −= λ_t·(N − U). Samples far from the negative are left alone; those drifting towards it are "
                "pushed away. Connect an empty prompt as the sampler's negative and the prompt to avoid here; it is "
                "evaluated in the same batched model call (one more pass)."),
            inputs=[
                model_input(),
                _negative_input("dng_negative", "Its weight per sample follows the tracked posterior."),
                io.Float.Input("scale", default=5.0, min=0.0, max=100.0, step=0.1,
                               tooltip="λ: the negative's weight at p/(1 − p) = 1 (official example: 5). 0 = off."),
                io.Float.Input("prior", default=0.01, min=1e-6, max=0.99, step=0.001, round=1e-6,
                               tooltip="p₀: the posterior of the negative at the first step (official example: "
                                       "0.01). Higher = stronger from the start."),
                io.Float.Input("temperature", default=0.2, min=0.0, max=10.0, step=0.01,
                               tooltip="τ: how fast the posterior follows the sample's moves (official example: 0.2; "
                                       "1 = the exact Bayes update)."),
                io.Float.Input("offset", default=2e-4, min=-1.0, max=1.0, step=1e-5, round=1e-6,
                               tooltip="δ: a bias added to every posterior update (official example: 2e-4)."),
                io.Float.Input("p_max", default=0.8, min=1e-5, max=0.999, step=0.01,
                               tooltip="Upper clamp of the posterior (official example: 0.8): the weight is at most "
                                       "scale·p_max/(1 − p_max)."),
                *term_schedule_inputs(what="the negative prompt"),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def validate_inputs(cls, schedule="constant", start_percent=0.0, end_percent=1.0, **kwargs):
        return validation_message(term_schedule, cls.LABEL, schedule, start_percent, end_percent)

    @classmethod
    def execute(cls, model, dng_negative, scale, prior, temperature, offset, p_max, schedule, start_percent,
                end_percent):
        branch = _negative_branch(cls.LABEL, "dng", "dng_negative", dng_negative)
        method = DynamicNegativeGuidance(branch, float(scale), float(prior), float(temperature), float(offset),
                                         p_max=float(p_max), p_min=min(1e-6, float(prior)),
                                         schedule=_schedule(cls.LABEL, schedule, start_percent, end_percent),
                                         label=cls.LABEL)
        patched = add_method(model, method)
        node_conditioning.install(patched, "dng", dng_negative)
        return io.NodeOutput(patched)


class FBGNode(io.ComfyNode):
    LABEL = "FBG"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Feedback Guidance (Koulischer et al., NeurIPS 2025; official code): a per-sample CFG weight '
        '`λ = e^L/(e^L − (1−π))` from a log posterior L tracked over the steps; `fbg` replaces cfg, `hybrid` adds '
        'cfg − 1',
        'all',
        'none',
    )
    # the compare row: FBG alone with its largest weight at the column's scale (mode 'fbg' ignores the sampler's cfg)
    COMPARE = {"key": "fbg", "exact": True, "overrides": {"max_guidance": "{max(scale, 1.5)}"}}
    STATE_ACROSS_SAMPLER_CALLS = ("the log posterior is tracked over the steps of one sampler call and restarts at 0 "
                                  "in each call, and its offset and temperature are derived from that call's sigmas "
                                  "(a run split over two samplers differs)")

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "FBG",
            display_name="FBG · Feedback Guidance",
            category=CATEGORY_CFG,
            description=(
                "Feedback Guidance (Koulischer et al., NeurIPS 2025): the CFG weight regulates itself per sample. "
                "A log posterior L, updated after every step from whether the sample followed the conditional or the "
                "unconditional prediction, sets λ = e^L/(e^L − (1 − π)): samples that already fit the prompt get "
                "little guidance, those drifting away up to max_guidance. Mode 'fbg' replaces the sampler's cfg; "
                "'hybrid' adds cfg − 1 on top. No extra model call."),
            inputs=[
                model_input(),
                io.Combo.Input("mode", options=list(FBG_MODES), default=FBG_MODES[0],
                               tooltip="'fbg': the weight is λ alone (the sampler's cfg is ignored). 'hybrid': λ + "
                                       "(cfg − 1), the official Hybrid_CFG_FBG."),
                io.Float.Input("pi", default=0.95, min=0.01, max=0.999, step=0.01,
                               tooltip="π: how conditional the data is assumed to be (official default 0.95). Lower = "
                                       "stronger guidance from the start (λ starts at 1/π)."),
                io.Float.Input("t_0", default=0.5, min=0.0, max=0.99, step=0.01,
                               tooltip="t₀: fraction of the run after which the offset alone would bring λ to 3 "
                                       "(official 0.5); sets the offset δ."),
                io.Float.Input("t_1", default=0.4, min=0.0, max=0.99, step=0.01,
                               tooltip="t₁: where the temperature term balances the offset (official 0.4); sets τ."),
                io.Float.Input("max_guidance", default=10.0, min=1.01, max=100.0, step=0.1,
                               tooltip="λ_max: the largest weight (official default 10)."),
                io.Float.Input("temperature", default=0.0, min=0.0, max=1000.0, step=0.001, round=1e-6,
                               tooltip="τ by hand (> 0, with offset) instead of deriving τ and δ from t₀, t₁ and the "
                                       "sampler's sigmas. 0 = derived (official)."),
                io.Float.Input("offset", default=0.0, min=-10.0, max=10.0, step=0.001, round=1e-6,
                               tooltip="δ by hand (used only when temperature > 0; negative, e.g. -0.05)."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, mode, pi, t_0, t_1, max_guidance, temperature, offset):
        return io.NodeOutput(add_method(model, FeedbackGuidance(float(pi), float(t_0), float(t_1),
                                                                float(max_guidance), mode, float(temperature),
                                                                float(offset), cls.LABEL)))


class CADSNode(io.ComfyNode):
    LABEL = "CADS"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'Condition-Annealed Diffusion Sampler (Sadat et al., ICLR 2024): Gaussian noise on the text tokens early '
        'in the run, `√γ·y + s·√(1−γ)·n`, rescaled to the prompt\'s statistics, annealed to none; more diverse '
        'samples at high cfg; noise per step from (seed, σ)',
        'all with a text/token cross-attention conditioning',
        'none',
    )
    COMPARE = {"key": "cads"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "CADS",
            display_name="CADS · Condition-Annealed Sampling",
            category=CATEGORY_CFG,
            description=(
                "CADS (Sadat et al., ICLR 2024): more diverse samples at high cfg by adding Gaussian noise to the "
                "conditioning early in the run and annealing it away: y' = √γ·y + s·√(1 − γ)·n with γ = 0 before "
                "tau2 and 1 after tau1 (t = 1 at pure noise), rescaled to the prompt embedding's mean and std. The "
                "noise is drawn per step from the seed and sigma, so repeat runs are identical and a split run "
                "equals one call. No extra model call."),
            inputs=[
                model_input(),
                io.Float.Input("tau1", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="τ₁: no noise once t ≤ τ₁ (t = 1 − progress; paper 0.6)."),
                io.Float.Input("tau2", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="τ₂: pure noise while t ≥ τ₂ (paper 0.9); linear between τ₂ and τ₁."),
                io.Float.Input("noise_scale", default=0.25, min=0.0, max=5.0, step=0.01,
                               tooltip="s: the noise scale (paper 0.25; the reference recommends ≤ 0.3). Higher = "
                                       "more diverse, less faithful."),
                io.Float.Input("psi", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="ψ: mixing factor of the rescaled and the raw noised condition (paper 1). "
                                       "Lower = more diverse, more likely to diverge."),
                io.Boolean.Input("rescale", default=True,
                                 tooltip="Rescale the noised condition to the prompt's mean and std (paper: on)."),
                io.Boolean.Input("apply_to_uncond", default=True,
                                 tooltip="Also noise the uncond's (negative prompt's) tokens, as the reference A1111 "
                                         "implementation."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the condition noise (drawn per step from this seed and sigma). The "
                                     "same seed gives the same result; it is independent of the sampler's seed."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def validate_inputs(cls, tau1=0.6, tau2=0.9, **kwargs):
        if not tau1 < tau2:
            return (f"{cls.LABEL}: tau1 ({tau1}) must be below tau2 ({tau2}): the noise is annealed from t = tau2 "
                    f"to tau1")
        return True

    @classmethod
    def execute(cls, model, tau1, tau2, noise_scale, psi, rescale, apply_to_uncond, seed):
        try:
            settings = CADS(float(tau1), float(tau2), float(noise_scale), float(psi), bool(rescale),
                            bool(apply_to_uncond), int(seed), cls.LABEL)
            settings.validate()
        except PlanError as e:
            raise node_error(str(e)) from None
        patched = add_method(model, settings)
        condition_noise.install(patched, settings)
        return io.NodeOutput(patched)


class CFGRejectionNode(io.ComfyNode):
    LABEL = "CFG-Rejection"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'CFG-Rejection (Wang et al., arXiv 2505.23343): scores the samples of a batch by their accumulated '
        '`‖ε_c − ε_u‖²` over the first steps; logs the ranking, or lets the weakest follow the strongest '
        '(batch-coupled by design)',
        'all',
        'none',
    )
    COMPARE = {"key": "cfg_rejection",
               "not_in_report": "batch-coupled: a digits run holds the ten digits in one batch, whose samples the "
                                "ranking cannot compare (mode 'report' leaves the samples unchanged, 'replace' would "
                                "copy one digit over another); run it with compare.py on a batch of one prompt"}
    BATCH_COUPLED = ("it ranks the samples of a batch against each other by design (the weakest are named, or follow "
                     "the strongest in mode 'replace'), so a batch differs from single runs")
    STATE_ACROSS_SAMPLER_CALLS = ("the score is accumulated from the start of each sampler call, so the second part "
                                  "of a split run starts its score again (and decides at reject_at of its own steps)")

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "CFGRejection",
            display_name="CFG-Rejection · Early Sample Scoring",
            category=CATEGORY_CFG,
            description=(
                "CFG-Rejection (Wang, Tang, Chang, arXiv 2505.23343): the accumulated difference between the "
                "conditional and unconditional noise predictions over the first steps, Σ‖ε_c − ε_u‖², predicts which "
                "samples of a batch end in high-density (better) regions. At reject_at the node logs every sample's "
                "score and the weakest; in mode 'replace' the weakest then follow the strongest sample (they end as "
                "copies of it). Batch-coupled by design; no extra model call."),
            inputs=[
                model_input(),
                io.Combo.Input("mode", options=list(REJECTION_MODES), default=REJECTION_MODES[0],
                               tooltip="'report': log the per-sample scores and the weakest samples (the images are "
                                       "unchanged). 'replace': from reject_at on, the weakest samples follow the "
                                       "strongest one (the batch keeps its size; they end as copies of it)."),
                io.Float.Input("reject_at", default=0.2, min=0.01, max=0.99, step=0.01,
                               tooltip="Progress (ComfyUI's percent of sigma) up to which the score is accumulated and "
                                       "where the weakest are chosen (the pack's default 0.2: early, as the paper)."),
                io.Float.Input("reject_fraction", default=0.5, min=0.0, max=0.95, step=0.05,
                               tooltip="Fraction of the batch named weakest (rounded; at least one sample is kept)."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, mode, reject_at, reject_fraction):
        return io.NodeOutput(add_method(model, CFGRejection(float(reject_at), float(reject_fraction), mode,
                                                            cls.LABEL)))


NODES = [PerpNegNode, DNGNode, FBGNode, CADSNode, CFGRejectionNode]
