"""FlowMo (Shaulov et al., arXiv 2506.01144): motion-coherence guidance for WAN video models.

The node adds a PREDICT_NOISE wrapper to a clone of the model. At each step inside the window the wrapper moves
the sampler's latent down the gradient of FlowMo's motion loss (``guiders/flowmo.py``) of the plain CFG
prediction, then lets the step's normal evaluation (every other Guidance Kit term included) run at the moved
latent. The latent is moved in place, as the authors' sampler loop replaces its ``latents``; the wrapper keeps
no state between calls.
"""

from __future__ import annotations

import math

import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..guiders.flowmo import flowmo_update
from .common import CATEGORY_ROOT, NODE_PREFIX, model_input, model_output, node_error
from .runtime.families import FAMILIES, diffusion_model_of, exact_spec

WRAPPER_KEY = "guidance_kit_flowmo"
LABEL = "FlowMo"


# the WAN classes of the family table whose forward is WAN 2.1/2.2's video denoiser (matched by exact class: a newer
# class deriving from WanModel, e.g. WanAnimate2Model or CausalWanModel, is not assumed to behave the same)
WAN_FAMILIES = ("WAN", "WAN VACE", "WAN camera", "WAN HuMo", "WAN animate")


def is_wan(model_patcher) -> bool:
    spec = exact_spec(FAMILIES, diffusion_model_of(model_patcher))
    return spec is not None and spec.name in WAN_FAMILIES


class FlowMoWrapper:
    """The PREDICT_NOISE wrapper: FlowMo's latent update, then the guider's own prediction."""

    def __init__(self, iterations: int, learning_rate: float, start_percent: float, end_percent: float):
        self.iterations = iterations
        self.learning_rate = learning_rate
        self.start_percent = start_percent
        self.end_percent = end_percent

    def active(self, model, sigma: float) -> bool:
        sampling = model.model_sampling
        start = float(sampling.percent_to_sigma(self.start_percent))
        end = float(sampling.percent_to_sigma(self.end_percent))
        return end < sigma <= start

    def __call__(self, executor, x, timestep, model_options, seed):
        guider = executor.class_obj
        if self.iterations > 0 and self.learning_rate > 0 and self.active(guider.inner_model, float(timestep.max())):
            if x.ndim != 5 or x.shape[2] < 3:
                raise node_error(f"{LABEL}: the latent has shape {tuple(x.shape)}; FlowMo measures motion over the "
                                 "frames of a video latent and needs at least 3 latent frames (9 video frames). "
                                 "Use a longer video or remove the node.")
            moved, _ = flowmo_update(x, self.cfg_x0(guider, timestep, model_options), self.iterations,
                                     self.learning_rate)
            with torch.inference_mode():
                x.copy_(moved)
        return executor(x, timestep, model_options, seed)

    @staticmethod
    def cfg_x0(guider, timestep, model_options):
        """The plain CFG prediction of x0 (the authors' guided prediction), without the pack's extra rows."""
        import comfy.samplers

        options = {k: v for k, v in model_options.items() if k != "sampler_calc_cond_batch_function"}
        positive, negative = guider.conds.get("positive"), guider.conds.get("negative")
        scale = float(getattr(guider, "cfg", 1.0))
        with_uncond = negative is not None and not math.isclose(scale, 1.0)

        def predict(x):
            conds = [positive, negative] if with_uncond else [positive]
            predictions = comfy.samplers.calc_cond_batch(guider.inner_model, conds, x, timestep, options)
            if not with_uncond:
                return predictions[0]
            cond, uncond = predictions
            return uncond + scale * (cond - uncond)

        return predict


class FlowMoNode(io.ComfyNode):
    LABEL = LABEL
    README_ROW = (
        "FlowMo (Shaulov et al., arXiv 2506.01144): in the first steps the latent moves down the gradient of the "
        "patch-wise temporal variance of the predicted video's frame differences (motion coherence)",
        "WAN 2.1/2.2 (video latents)",
        "+iterations × (forward + backward of the CFG pair) per guided step",
    )
    BATCH_COUPLED = (
        "not coupled in its math (the loss is per sample), but the authors' Adam update's first step is "
        "learning_rate·sign(gradient): a gradient element within float round-off of zero can take the other sign "
        "in a batched model call, so a batch differs from single runs by float noise amplified to ~1e-5 relative"
    )

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_PREFIX + "FlowMo",
            display_name="FlowMo · motion-coherence guidance (WAN video)",
            category=CATEGORY_ROOT + "/video",
            description=(
                "FlowMo (Shaulov et al., arXiv 2506.01144): training-free motion coherence for WAN video models. "
                "At each step inside the window, the latent is moved by Adam steps (fresh state each step) down "
                "the gradient of FlowMo's loss: the largest, over latent positions, temporal variance of the "
                "absolute differences between consecutive frames of the predicted clean video (plain CFG "
                "prediction), averaged over channels. The step then runs as usual at the moved latent. Needs a "
                "gradient through the model: each iteration costs a forward and a backward pass of the cond and "
                "uncond rows and holds the activations in memory. WAN only (images have no frames); acts at "
                "cfg 1 too."),
            inputs=[
                model_input(),
                io.Float.Input("learning_rate", default=0.005, min=0.0, max=0.1, step=0.001, round=0.0001,
                               tooltip="Adam learning rate of the latent update (the authors' 0.005). With a fresh "
                                       "Adam state the first iteration moves each latent value by about this "
                                       "much. 0 = off."),
                io.Int.Input("iterations", default=1, min=0, max=10,
                             tooltip="Gradient iterations per guided step (the step budget; the authors' "
                                     "generate.py default is 1). Each costs a forward and a backward pass of the "
                                     "cond/uncond pair on top of the step's own evaluation. 0 = off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the window (sampling progress, 0 = first step)."),
                io.Float.Input("end_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the window (sampling progress). 0.5 = the first 25 of 50 steps, "
                                       "the authors' generate.py default: coarse motion is decided early."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, learning_rate, iterations, start_percent, end_percent):
        if not is_wan(model):
            raise node_error(f"{LABEL}: this model is {type(diffusion_model_of(model)).__name__}; FlowMo measures "
                             "motion across the frames of a video latent and is served on WAN 2.1/2.2 only (images "
                             "have no frames). Use a WAN model or remove the node.")
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise node_error(f"{LABEL}: start_percent must not exceed end_percent (both in [0, 1]).")
        patched = model.clone()
        update = FlowMoWrapper(int(iterations), float(learning_rate), float(start_percent), float(end_percent))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, update)
        return io.NodeOutput(patched)


NODES = [FlowMoNode]
