"""Nodes for the seed papers that need more than a formula: CFG Decomposition (Li, Wang, Qu, arXiv 2505.19210).

CFG Decomposition needs the class of each row and the data's Gaussian statistics. The statistics ship for the
embedded digits model (``digits/linear_statistics.py``); the class of a row is read from the conditioning at
every step by a pre-cfg function placed before the engine's (``read_row_classes``), which matches the row's
one-token context against the model's class-embedding table and puts the classes into the run's state.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..digits.linear_statistics import STATISTICS_FILE
from ..digits.model import NULL_CLASS, DigitsLatentFormat
from ..guiders.methods.cfg_decomposition import CLASSES_KEY, CFGDecomposition
from ..guiders.plan import PlanError
from .common import CATEGORY_CFG, NODE_PREFIX, add_method, model_input, model_output, node_error
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


def read_row_classes(args: dict) -> list:
    """Pre-cfg function (before the engine's): the class of each row for CFG Decomposition, into the run state."""
    model_options = args["model_options"]
    plan = get_plan(model_options)
    method = plan.get(CFGDecomposition.KEY) if plan is not None else None
    if method is not None and not method.classes:
        state = run_state(model_options).guidance
        try:
            stats = method.load_statistics(state)
        except PlanError as e:
            raise GuidanceRuntimeError(str(e)) from None
        if stats.class_embedding is None:
            raise GuidanceRuntimeError(f"{method.label}: its statistics file has no class-embedding table, so the "
                                       f"class of a row cannot be read from the conditioning.")
        conds = args.get("conds") or [None]
        state.method_state[CLASSES_KEY] = classes_of_conditioning(conds[0], stats.class_embedding,
                                                                  args["input"].shape[0], method.label)
    return args["conds_out"]


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
               "report": ("cfg_decomposition:negative_cpc_scale=0",
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
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, model, mean_shift_scale, positive_cpc_scale, negative_cpc_scale):
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
                                  label=cls.LABEL)
        patched = add_method(model, method)
        functions = [f for f in patched.model_options.get("sampler_pre_cfg_function", []) if f is not read_row_classes]
        patched.model_options["sampler_pre_cfg_function"] = [read_row_classes] + functions
        return io.NodeOutput(patched)


NODES = [CFGDecompositionNode]
