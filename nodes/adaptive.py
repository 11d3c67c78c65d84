"""Adaptive Guidance / LinearAG: a model patch that stops evaluating guidance branches once they stop
mattering (``guiders/adaptive.py`` has the rule; the engine drops stopped branches from the batched
call, so a stopped branch costs no model pass)."""

from __future__ import annotations

from comfy_api.latest import io

from ..guiders.methods.adaptive_guidance import ADAPTIVE_SCOPES, AdaptiveGuidance
from ..guiders.plan import PlanError
from .common import CATEGORY_ROOT, NODE_PREFIX, add_method, model_input, model_output, validation_message

CATEGORY_EFFICIENCY = CATEGORY_ROOT + "/efficiency"


def build_adaptive(label: str, threshold: float, start_percent: float, scope: str, linear_ag: bool,
                   calibration_steps: int, refresh_every: int) -> AdaptiveGuidance:
    settings = AdaptiveGuidance(threshold=threshold, start_percent=start_percent, scope=scope, linear=linear_ag,
                                calibration_steps=calibration_steps, refresh_every=refresh_every, label=label)
    settings.validate()
    return settings


class AdaptiveGuidanceNode(io.ComfyNode):
    LABEL = "Adaptive Guidance"
    README_ROW = (  # the README methods table: method (paper), families, extra model calls per step
        'AG and LinearAG (Castillo et al., AAAI 2025): default LinearAG alone, the skipped unconds estimated by an '
        "affine regression fitted per sample on the run's own trajectory; the paper's switch (cos(ε_c, ε_other) ≥ "
        'γ̄ on noise predictions, per sample) is opt-in: it lost quality on every model measured',
        'all, every sampler',
        '**saves** calls: −22…−23% passes at CFG quality (digits model, exact eps and flow mixtures)',
    )
    # the default is LinearAG alone; the second report row is the paper's switch
    COMPARE = {"key": "adaptive", "exact": True,
               "aliases": {"ag": "adaptive", "linear_ag": "adaptive:linear_ag=true",
                           "ag_switch": "adaptive:threshold=0.99,linear_ag=false"},
               "report": ("adaptive", "adaptive:threshold=0.99,linear_ag=false")}
    STATE_ACROSS_SAMPLER_CALLS = ("its switches (which evaluations stopped) and LinearAG's regression restart at each "
                                  "sampler call: the second call of a split run evaluates the uncond again until its "
                                  "own check stops it")

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "AdaptiveGuidance",
            display_name="Adaptive Guidance · AG / LinearAG (fewer model calls)",
            category=CATEGORY_EFFICIENCY,
            description=(
                "Fewer model passes for CFG (Castillo et al., 'Adaptive Guidance', arXiv 2312.12487, AAAI 2025). "
                "Default: LinearAG alone: after 3 calibration steps every other unconditional pass is replaced by "
                "an affine estimate from the previous step, fitted by least squares on this run's own trajectory "
                "(−22…−23% passes at CFG quality, measured on the embedded digits model and the exact eps and flow "
                "mixtures). Optional, with threshold ≤ 1: the paper's switch: once the conditional and "
                "unconditional noise predictions ε point the same way (cosine ≥ threshold, after start_percent) a "
                "sample gets the conditional prediction for the rest of the run, and the pass stops when every "
                "sample of the batch has switched; saves more but lost quality on every real model measured (digits "
                "cfg 7: Fréchet distance +29%). The switch also stops extra branches (PAG, SEG, ...). Per sampler "
                "call: a run split over two samplers starts the calibration and the switches again. Each run logs "
                "the model passes made vs plain CFG."),
            inputs=[
                model_input(),
                io.Float.Input("threshold", default=AdaptiveGuidance.NO_SWITCH, min=-1.0, max=1.5, step=0.001,
                               tooltip="γ̄ of the paper's switch: a sample stops using a branch once "
                                       "cos(ε_cond, ε_branch) ≥ this, ε = the noise prediction (x − α·D)/σ (α = 1 − σ "
                                       "on flow models). Above 1 (default 1.01) the switch is off: LinearAG alone. "
                                       "0.99 (≈ the paper's) to 0.999 stop the uncond: more savings, lower quality "
                                       "on the models measured (ε cosines stay above 0.98 all run on real networks, "
                                       "so the switch acts at start_percent). −1 stops from the first step."),
                io.Float.Input("start_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="The switch only (threshold ≤ 1): the earliest progress (ComfyUI's percent "
                                       "of sigma) at which a branch may stop. At high noise both noise predictions "
                                       "are ≈ the input noise (on flow models exactly x at σ = 1), so their cosine is "
                                       "≈ 1 before guidance has shaped the image; the paper found guidance needed in "
                                       "the first half. Lower it for more savings, raise it for safety."),
                io.Combo.Input("scope", options=list(ADAPTIVE_SCOPES), default=ADAPTIVE_SCOPES[0],
                               tooltip="Which evaluations the switch may stop: the unconditional pass and every "
                                       "extra branch of other Guidance Kit terms (each with its own test), only the "
                                       "uncond, or only the extra branches (turn linear_ag off for this one)."),
                io.Boolean.Input("linear_ag", default=True,
                                 tooltip="LinearAG (default on): estimate the unconditional prediction instead of "
                                         "running it on refresh_every − 1 of every refresh_every steps after "
                                         "calibration (a per-sample affine regression on this run's trajectory, on "
                                         "ε for eps models and the velocity for flow models). Off: only the switch "
                                         "(threshold) saves passes."),
                io.Int.Input("calibration_steps", default=3, min=2, max=100,
                             tooltip="LinearAG: steps at the start that always run the true uncond to fit the "
                                     "regression. Ignored without linear_ag."),
                io.Int.Input("refresh_every", default=2, min=1, max=20,
                             tooltip="LinearAG: after calibration, run the true uncond on every N-th step and "
                                     "estimate it on the others (2 = every other step; 1 = never estimate). "
                                     "Ignored without linear_ag."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def validate_inputs(cls, threshold=AdaptiveGuidance.NO_SWITCH, start_percent=0.5, scope=ADAPTIVE_SCOPES[0],
                        linear_ag=True, calibration_steps=3, refresh_every=2, **kwargs):
        return validation_message(build_adaptive, cls.LABEL, threshold, start_percent, scope, linear_ag,
                                  calibration_steps, refresh_every)

    @classmethod
    def execute(cls, model, threshold, start_percent, scope, linear_ag, calibration_steps, refresh_every):
        try:
            settings = build_adaptive(cls.LABEL, threshold, start_percent, scope, linear_ag, calibration_steps,
                                      refresh_every)
        except PlanError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(add_method(model, settings))


NODES = [AdaptiveGuidanceNode]
