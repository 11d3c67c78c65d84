"""The Annealing Guidance node's plot (web/js/annealing_plot.js): the server side.

* Before a run: ``GET /guidance_kit/annealing_preview?policy=<name>&lambda=<λ>[&delta=a,b,c][&points=n]`` evaluates
  the selected policy over sampling progress p for λ and a few levels of ‖ε_u − ε_c‖ (``preview_payload``). The
  policy's t is the discrete SD-type timestep of p, t = 999·(1 − p) (``percent = 1 − t/999`` on eps/v models,
  ``guiders/progress.py``); a flow model's run maps p to its own timesteps. Bad parameters, an unknown policy or a
  refused file answer HTTP 400 with ``{"error": message}``, which the widget shows in place of the curves.
* After a run: ``PlotSender`` (the method's ``publish``) sends the w_t the plan chose, per evaluation (batch mean
  and min–max, against progress), to the page that queued the prompt: ``PromptServer.instance.send_sync(EVENT,
  {"node": unique id, ...})``. The values come from the run's own state (``GuidanceState.method_state``), nothing
  is kept between runs or per forward. Without ComfyUI's server (tests, compare.py) nothing is sent.

The routes are registered only where ComfyUI's PromptServer exists (``register_routes``, from the extension's
``on_load``).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass

import torch

log = logging.getLogger("guidance_kit")

EVENT = "guidance_kit.annealing_plot"  # the websocket message of a run's chosen scales
PREVIEW_ROUTE = "/guidance_kit/annealing_preview"
PREVIEW_POINTS = 41  # progress points of a preview curve
MAX_POINTS = 201
MAX_LEVELS = 6
DELTA_LEVELS = (0.025, 0.25, 1.0)  # default ‖ε_u − ε_c‖ levels, × the policy's δ normalisation
TIMESTEP_MAX = 999.0  # t = 999·(1 − p): SD-type discrete timesteps (what the shipped and the authors' policies read)
REGISTERED_FLAG = "_guidance_kit_annealing_routes"  # set on the PromptServer instance: routes added once


class PreviewError(ValueError):
    """A preview request that cannot be answered (the message is shown on the node)."""


def _number(name: str, text: str | None) -> float:
    if text is None or str(text).strip() == "":
        raise PreviewError(f"Annealing Guidance plot: the parameter '{name}' is missing")
    try:
        value = float(text)
    except ValueError:
        raise PreviewError(f"Annealing Guidance plot: '{name}' must be a number (got {text!r})") from None
    if not math.isfinite(value):
        raise PreviewError(f"Annealing Guidance plot: '{name}' must be finite (got {text!r})")
    return value


def delta_levels(text: str | None, normalization: float) -> list[float]:
    """The ‖ε_u − ε_c‖ levels of the curves: ``text`` (comma-separated positive numbers) or the defaults."""
    if text is None or not str(text).strip():
        return [round(normalization * k, 6) for k in DELTA_LEVELS]
    levels = [_number("delta", part) for part in str(text).split(",")]
    if not 1 <= len(levels) <= MAX_LEVELS or any(v < 0 for v in levels):
        raise PreviewError(f"Annealing Guidance plot: 'delta' takes 1 to {MAX_LEVELS} non-negative numbers "
                           f"(got {text!r})")
    return levels


def preview_payload(policy: str | None, guidance_lambda: str | None, delta: str | None = None,
                    points: str | None = None) -> dict:
    """w_t of the node's policy over progress at λ for each ‖ε_u − ε_c‖ level (JSON-ready). PreviewError on a bad
    parameter or a policy that cannot be loaded."""
    from ..guiders.methods.annealing_guidance import PolicyFileError, load_policy
    from .annealing_guidance import policy_path

    lam = _number("lambda", guidance_lambda)
    if not 0.0 <= lam <= 1.0:
        raise PreviewError(f"Annealing Guidance plot: λ must lie in [0, 1] (got {lam:g})")
    n = PREVIEW_POINTS if points in (None, "") else int(_number("points", points))
    if not 2 <= n <= MAX_POINTS:
        raise PreviewError(f"Annealing Guidance plot: 'points' must lie in [2, {MAX_POINTS}] (got {n})")
    if not policy:
        raise PreviewError("Annealing Guidance plot: the parameter 'policy' is missing")
    try:
        path = policy_path(policy)
        network = load_policy(path)
    except PolicyFileError as e:
        raise PreviewError(f"Annealing Guidance: policy {policy} refused: {e}") from None
    except ValueError as e:  # the node's own message (unknown file, missing digits policy)
        raise PreviewError(str(e)) from None
    levels = delta_levels(delta, float(network.config["delta_embed_normalization"]))
    progress = [i / (n - 1) for i in range(n)]
    timesteps = [TIMESTEP_MAX * (1.0 - p) for p in progress]
    curves = []
    with torch.no_grad():
        for level in levels:
            w = network(torch.tensor(timesteps), torch.full((n,), float(level)), lam).tolist()
            if not all(math.isfinite(v) for v in w):
                raise PreviewError(f"Annealing Guidance plot: the policy {policy} returns a non-finite scale at "
                                   f"‖δ‖ {level:g}")
            curves.append({"delta_norm": level, "label": f"‖δ‖ {level:g}", "w": w})
    return {"policy": policy, "lambda": lam, "progress": progress, "timestep": timesteps, "levels": curves,
            "timestep_note": "t = 999·(1 − p), SD-type discrete timesteps"}


async def preview_handler(request):
    """GET PREVIEW_ROUTE: ``preview_payload`` as JSON, or HTTP 400 ``{"error": message}``."""
    from aiohttp import web

    q = request.rel_url.query
    try:
        payload = preview_payload(q.get("policy"), q.get("lambda"), q.get("delta"), q.get("points"))
    except PreviewError as e:
        return web.json_response({"error": str(e)}, status=400)
    return web.json_response(payload)


def prompt_server():
    """ComfyUI's running PromptServer, or None (no server module loaded: tests, compare.py)."""
    module = sys.modules.get("server")
    return getattr(getattr(module, "PromptServer", None), "instance", None)


def register_routes(server=None) -> bool:
    """Add the preview route to ``server`` (default: ComfyUI's PromptServer) once; False where there is none."""
    server = server if server is not None else prompt_server()
    routes = getattr(server, "routes", None)
    if routes is None:
        return False
    if getattr(server, REGISTERED_FLAG, False):
        return True
    routes.get(PREVIEW_ROUTE)(preview_handler)
    setattr(server, REGISTERED_FLAG, True)
    return True


@dataclass(frozen=True)
class PlotSender:
    """The method's ``publish``: sends a run's chosen scales to the node ``node_id`` on the page that queued the
    prompt. Tensor-free and compared by value (it lives in the plan, which ModelPatcher.clone deep-copies)."""

    node_id: str

    def __call__(self, payload: dict) -> bool:
        server = prompt_server()
        if server is None or getattr(server, "client_id", None) is None:
            return False  # no page to show it (as ComfyUI's own progress messages)
        server.send_sync(EVENT, {"node": self.node_id, **payload}, server.client_id)
        return True
