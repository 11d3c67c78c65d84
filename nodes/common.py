"""Shared pieces of the node classes: ids, categories, input parsing and plan updates."""

from __future__ import annotations

import math

from comfy_api.latest import io

from ..guiders.plan import GuidancePlan, PlanError, PlanMethod
from ..guiders.schedules import SHAPES, Schedule, ScheduleError, Window, parse_step_values
from .runtime.engine import apply_plan, plan_of

NODE_PREFIX = "GuidanceKit_"
CATEGORY_ROOT = "sampling/guidance"
CATEGORY_CFG = CATEGORY_ROOT + "/cfg"

MODEL_TOOLTIP = ("The diffusion model to patch. It is cloned; the input model is left unchanged. "
                 "Chain several Guidance Kit nodes to stack methods in one guidance plan.")

SIGMA_NO_LIMIT = 1000.0
TERM_SCHEDULE_SHAPES = [s for s in SHAPES if s != "step_list"]  # the shapes an extra term's scale can take


def model_input():
    return io.Model.Input("model", tooltip=MODEL_TOOLTIP)


def model_output():
    return io.Model.Output(tooltip="The model with the method added to its guidance plan.")


def node_error(message: str) -> ValueError:
    """The error type ComfyUI shows on the node (message names the node and the fix)."""
    return ValueError(message)


def add_method(model, method: PlanMethod):
    """A clone of ``model`` whose plan also has ``method`` (any stage, an extra term included)."""
    try:
        plan: GuidancePlan = plan_of(model).with_method(method)
    except (PlanError, ScheduleError) as e:
        raise node_error(str(e)) from None
    return apply_plan(model, plan)


def term_schedule_inputs(start: float = 0.0, end: float = 1.0, what: str = "the degraded branch") -> list:
    """The schedule / start_percent / end_percent inputs of a term; outside its window ``what`` is not run."""
    return [
        io.Combo.Input("schedule", options=TERM_SCHEDULE_SHAPES, default="constant",
                       tooltip="Shape of this term's scale over the run (the CFG Schedule's shapes, mean 1 over "
                               "the run's progress): 'constant' = the same scale every step."),
        io.Float.Input("start_percent", default=start, min=0.0, max=1.0, step=0.01,
                       tooltip=f"The term acts from this progress (ComfyUI's percent of sigma, as core nodes' "
                               f"start_percent: 0 = pure noise; the same in a run split over several samplers). "
                               f"Outside its window {what} is not evaluated (no extra model cost)."),
        io.Float.Input("end_percent", default=end, min=0.0, max=1.0, step=0.01,
                       tooltip="The term acts until this progress (ComfyUI's percent of sigma; 1 = sigma 0)."),
    ]


def parse_float_list(text: str, label: str, field: str) -> tuple[float, ...]:
    values = []
    for part in text.replace(";", ",").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise node_error(f"{label}: '{part}' in {field} is not a number; write numbers separated by commas, "
                             f"e.g. '10, 5'") from None
        if not math.isfinite(v):
            raise node_error(f"{label}: {field} must be finite numbers (got {part})")
        values.append(v)
    return tuple(values)


def build_schedule(label: str, shape: str, power: float, step_values: str, start_percent: float,
                   end_percent: float, sigma_high: float, sigma_low: float) -> Schedule:
    """A validated Schedule from node widget values (``sigma_high`` ≥ 1000 means no upper limit)."""
    if shape not in SHAPES:
        raise node_error(f"{label}: unknown schedule '{shape}'; choose one of {', '.join(SHAPES)}")
    values = parse_step_values(step_values, label) if shape == "step_list" else ()
    window = Window(start=start_percent, end=end_percent, sigma_low=sigma_low,
                    sigma_high=math.inf if sigma_high >= SIGMA_NO_LIMIT else sigma_high)
    schedule = Schedule(shape=shape, power=power, step_values=values, window=window)
    try:
        schedule.validate(label)
    except ScheduleError as e:
        raise node_error(str(e)) from None
    return schedule


def term_schedule(label: str, shape: str, start_percent: float, end_percent: float, sigma_low: float = 0.0
                  ) -> Schedule:
    """A term's scale schedule (or a method's window): ``shape`` over [start_percent, end_percent] of progress."""
    return build_schedule(label, shape, 2.0, "", start_percent, end_percent, SIGMA_NO_LIMIT, sigma_low)


def validation_message(fn, *args) -> bool | str:
    """Run a builder for ``validate_inputs``: True when it succeeds, else its message."""
    try:
        fn(*args)
    except ValueError as e:
        return str(e)
    return True
