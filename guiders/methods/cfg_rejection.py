"""CFG-Rejection · early scoring of the samples of a batch by their Accumulated Score Difference (stage 0, an
evaluation control that reports the ranking and, optionally, lets the weakest samples follow the strongest).

Paper: Wang, Tang, Chang, "Diffusion Sampling Path Tells More: An Efficient Plug-and-Play Strategy for Sample
Filtering", arXiv 2505.23343 (2025). The pack read the abstract and the summaries of the method only (no code
was found): the Accumulated Score Difference of a sample over the first steps,

    ASD = Σ_steps ‖ε_c − ε_u‖²,   ε_c − ε_u = (U − C)/σ      (per sample, over all its values)

correlates with the sample landing in a high-density region of p(x0 | c); the paper keeps the samples with the
highest partial ASD and rejects the others early, before spending the rest of the steps on them (the exact
Gaussian mixture agrees: at cfg > 1 the final log-density rises with the early ASD, tests/core).

The pack's choices (labelled): the score is accumulated from the start of the sampler call until ``reject_at``
(progress, default 0.2); there the ``reject_fraction`` weakest samples of the batch are named in the log
("report"), and with "replace" they follow the strongest sample from then on (their inputs x, C, U and branch
predictions are the strongest's, so they end as copies of it): a ComfyUI batch keeps its size, so rejected rows
cannot be dropped to save compute. The ranking couples the samples of a batch by design.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..plan import EvaluationControl, Note, PlanError
from ..tensor_ops import per_sample, sample_dims, to_f32

if TYPE_CHECKING:
    from ..progress import StepPosition
    from ..step import GuidanceState, Needs, StepInputs

REJECTION_MODES = ("report", "replace")


def score_increment(cond: torch.Tensor, uncond: torch.Tensor, sigma) -> torch.Tensor:
    """‖ε_c − ε_u‖² = ‖C − U‖²/σ² per sample [B] (float32)."""
    difference = (to_f32(cond) - to_f32(uncond)) / per_sample(sigma, cond)
    return difference.square().sum(dim=sample_dims(cond))


def weakest(scores: torch.Tensor, fraction: float) -> list[int]:
    """Indices of the ``round(fraction·B)`` lowest scores (ties: the lower index first), never the whole batch."""
    count = min(int(round(fraction * scores.shape[0])), scores.shape[0] - 1)
    if count <= 0:
        return []
    order = sorted(range(scores.shape[0]), key=lambda i: (float(scores[i]), i))
    return sorted(order[:count])


@dataclass
class RejectionState:
    scores: torch.Tensor
    decided: bool = False
    rejected: tuple[int, ...] = ()
    strongest: int = 0
    reported: str = ""


@dataclass(frozen=True)
class CFGRejection(EvaluationControl):
    KEY = "cfg_rejection"

    reject_at: float = 0.2
    reject_fraction: float = 0.5
    mode: str = "report"
    label: str = "CFG-Rejection"

    def validate(self) -> None:
        if not 0.0 < self.reject_at < 1.0:
            raise PlanError(f"{self.label}: reject_at is a progress in (0, 1); got {self.reject_at}")
        if not 0.0 <= self.reject_fraction < 1.0:
            raise PlanError(f"{self.label}: reject_fraction must be in [0, 1); got {self.reject_fraction}")
        if self.mode not in REJECTION_MODES:
            raise PlanError(f"{self.label}: mode must be one of {', '.join(REJECTION_MODES)}; got {self.mode!r}")

    def _state(self, state: GuidanceState, batch: int, device) -> RejectionState:
        found = state.method_state.get(self.KEY)
        if isinstance(found, RejectionState) and found.scores.shape[0] == batch:
            return found
        created = RejectionState(torch.zeros(batch, dtype=torch.float32, device=device))
        state.method_state[self.KEY] = created
        return created

    def after_evaluation(self, state: GuidanceState, need: Needs, position: StepPosition, x: torch.Tensor, sigma,
                         cond: torch.Tensor, uncond: torch.Tensor | None,
                         branches: dict[str, torch.Tensor]) -> torch.Tensor | None:
        tracked = self._state(state, x.shape[0], x.device)
        if tracked.decided or uncond is None:
            return None
        if position.progress < self.reject_at:
            tracked.scores = tracked.scores + score_increment(cond, uncond, sigma)
            return None
        tracked.decided = True
        tracked.rejected = tuple(weakest(tracked.scores, self.reject_fraction))
        tracked.strongest = int(torch.argmax(tracked.scores))
        scores = ", ".join(f"{i}: {float(s):.4g}" for i, s in enumerate(tracked.scores))
        action = (f"they follow sample {tracked.strongest} from here on" if self.mode == "replace" and tracked.rejected
                  else "reported only")
        tracked.reported = (f"{self.label}: accumulated cond − uncond score difference per sample up to progress "
                            f"{self.reject_at:g} (batch index: ASD) {scores}; weakest: "
                            f"{list(tracked.rejected) or 'none (batch of 1 or reject_fraction 0)'}; {action}.")
        return None

    def prepare_inputs(self, inp: StepInputs, state: GuidanceState) -> StepInputs:
        tracked = state.method_state.get(self.KEY)
        if self.mode != "replace" or not isinstance(tracked, RejectionState) or not tracked.rejected:
            return inp
        if inp.x.shape[0] != tracked.scores.shape[0]:
            return inp
        rows = torch.tensor(tracked.rejected, dtype=torch.long, device=inp.x.device)

        def follow(t):
            if t is None:
                return None
            t = t.clone()
            t[rows] = t[tracked.strongest].clone()
            return t

        return replace(inp, x=follow(inp.x), cond=follow(inp.cond), uncond=follow(inp.uncond),
                       branches={k: follow(v) for k, v in inp.branches.items()})

    def step_notes(self, state: GuidanceState, cond_scale: float) -> list[Note]:
        tracked = state.method_state.get(self.KEY)
        if not isinstance(tracked, RejectionState) or not tracked.reported:
            return []
        return [("cfg-rejection-report", tracked.reported)]
