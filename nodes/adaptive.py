"""Adaptive Guidance / LinearAG: a model patch that stops evaluating guidance branches once they stop
mattering (``guiders/adaptive.py`` has the rule; the engine drops stopped branches from the batched
call, so a stopped branch costs no model pass)."""

from __future__ import annotations

from comfy_api.latest import io

from ..guiders.plan import ADAPTIVE_SCOPES, AdaptiveGuidance, PlanError
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

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "AdaptiveGuidance",
            display_name="Adaptive Guidance · AG / LinearAG (fewer model calls)",
            category=CATEGORY_EFFICIENCY,
            description=(
                "Adaptive Guidance (Castillo et al., arXiv 2312.12487, AAAI 2025): once the conditional and "
                "unconditional noise predictions point the same way (cosine similarity ≥ threshold) the "
                "unconditional pass is switched off for the rest of the run, so later steps cost one pass instead "
                "of two. The same test stops extra guidance branches (PAG, SEG, skip-layer, ...). LinearAG "
                "additionally replaces some unconditional passes before the switch with an affine estimate from "
                "the previous step, fitted by least squares on this run's own trajectory. Works with every "
                "sampler and with the Guidance Guider; each run logs the model passes made vs plain CFG."),
            inputs=[
                model_input(),
                io.Float.Input("threshold", default=0.99, min=-1.0, max=1.5, step=0.001,
                               tooltip="γ̄: a branch stops once cos(ε_cond, ε_branch) ≥ this. Higher = stops later "
                                       "(closer to CFG, fewer savings): 0.99 default, 0.995–0.999 for more "
                                       "caution. > 1 never stops (= CFG exactly); −1 stops from the first step."),
                io.Float.Input("start_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Earliest point of the run (fraction) at which a branch may stop. At high "
                                       "noise both predictions are ≈ the input noise, so their cosine is ≈ 1 before "
                                       "guidance has shaped the image; the paper's search found guidance needed in "
                                       "the first half. Lower it for more savings, raise it for safety."),
                io.Combo.Input("scope", options=list(ADAPTIVE_SCOPES), default=ADAPTIVE_SCOPES[0],
                               tooltip="Which evaluations may stop: the unconditional pass and every extra branch "
                                       "of other Guidance Kit terms (each with its own test), only the uncond, or "
                                       "only the extra branches."),
                io.Boolean.Input("linear_ag", default=False,
                                 tooltip="LinearAG: before the switch, estimate the unconditional prediction instead "
                                         "of running it on some steps (see refresh_every). Saves more calls; the "
                                         "estimate's error is logged in the benchmark, not zero."),
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
    def validate_inputs(cls, threshold=0.99, start_percent=0.5, scope=ADAPTIVE_SCOPES[0], linear_ag=False,
                        calibration_steps=3, refresh_every=2, **kwargs):
        return validation_message(build_adaptive, cls.LABEL, threshold, start_percent, scope, linear_ag,
                                  calibration_steps, refresh_every)

    @classmethod
    def execute(cls, model, threshold, start_percent, scope, linear_ag, calibration_steps, refresh_every):
        try:
            settings = build_adaptive(cls.LABEL, threshold, start_percent, scope, linear_ag, calibration_steps,
                                      refresh_every)
        except PlanError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(add_method(model, "adaptive", settings, cls.LABEL))


NODES = [AdaptiveGuidanceNode]
