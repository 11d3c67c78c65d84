"""Online Feedback CFG · the guidance scale chosen per sample and per step by an evaluator (stage 2, a weight factor).

Paper: Papalampidi et al., "Dynamic Classifier-Free Diffusion Guidance via Online Feedback", arXiv 2509.16131. At
a step, the x0 predictions of K candidate scales are formed from the *same* cond/uncond pair (no extra model call):

    D_k = U + w_k·(C − U),   k = 1…K

an evaluator scores each D_k, and the scale of the best-scoring candidate is used for this step (a greedy choice).
The paper's evaluators (latent CLIP alignment, discriminators, reward models) are not released; the pack's are
pluggable (``CandidateEvaluator``): the embedded digit classifier (adherence log p(c | D_k), or confidence −entropy)
and a CLIP vision model with the VAE (similarity of a decoded preview to the prompt's CLIP embedding).

Pack choices (labelled on the help page): the choice is the *smallest* candidate whose score is within
``tolerance`` of the best (0 = the plain argmax; ties go to the smaller scale); a budget of evaluated steps inside
a progress window; between evaluations a sample keeps its last chosen scale, and before the first it uses the
sampler's cfg; the chosen scale replaces the CFG weight of the step (weight factors after it, β-CFG and S-CFG,
still multiply it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..plan import CfgOne, PlanError, WeightFactor
from ..tensor_ops import per_sample

if TYPE_CHECKING:
    from ..step import DirectionInputs, GuidanceState

STATE_KEY = "online_feedback_cfg"  # method_state: FeedbackRecord of the run
CONTEXT_KEY = "online_feedback_cfg/context"  # method_state: what the node's reader took from the conditioning


class CandidateEvaluator:
    """Scores candidate x0 predictions (higher is better). Implementations hold their models; they are immutable,
    so a plan copy shares them (``__deepcopy__`` returns the evaluator itself)."""

    name = "evaluator"

    def score(self, candidates: torch.Tensor, context: dict) -> torch.Tensor:
        """``candidates`` [K, B, ...] (x0 of K scales for B samples) → scores [K, B]. ``context``: ``classes``
        (LongTensor [B], when the conditioning names a class), ``text_embedding`` ([B, E], the prompt's pooled CLIP
        embedding, when present), ``sigma``."""
        raise NotImplementedError

    def needs(self) -> frozenset[str]:
        """The context keys it needs from the conditioning: "classes", "text_embedding"."""
        return frozenset()

    def __deepcopy__(self, memo):
        return self


@dataclass
class FeedbackRecord:
    """What the method keeps over one run: each sample's current scale, the evaluations made, the log."""

    chosen: torch.Tensor | None = None  # [B] float32
    evaluations: int = 0
    log: list = field(default_factory=list)  # (step index, sigma, chosen scales [B] as a list, seconds)


def choose(scores: torch.Tensor, candidates: tuple[float, ...], tolerance: float) -> torch.Tensor:
    """Per sample, the smallest candidate scale whose score is within ``tolerance`` of the best ([K, B] → [B])."""
    if not torch.isfinite(scores).all():
        scores = torch.nan_to_num(scores, nan=-torch.inf)
    best = scores.max(dim=0).values
    good = scores >= best - tolerance  # [K, B]
    order = sorted(range(len(candidates)), key=lambda k: candidates[k])
    values = torch.tensor(candidates, dtype=torch.float32)
    chosen = torch.full((scores.shape[1],), float("nan"))
    for k in reversed(order):  # the smallest good candidate wins
        chosen = torch.where(good[k].cpu(), values[k], chosen)
    return chosen


def candidate_predictions(cond: torch.Tensor, uncond: torch.Tensor, candidates: tuple[float, ...]) -> torch.Tensor:
    """[K, B, ...]: U + w_k·(C − U) for every candidate scale (float32)."""
    direction = cond.float() - uncond.float()
    return torch.stack([uncond.float() + w * direction for w in candidates])


@dataclass(frozen=True)
class OnlineFeedbackCFG(WeightFactor):
    KEY = "online_feedback_cfg"
    ORDER = 5  # first: its scale replaces the weight; β-CFG (10) and S-CFG (20) multiply the result
    AT_CFG_ONE = CfgOne.NEEDS_UNCOND  # the chosen scale replaces the sampler's cfg, 1 included

    evaluator: CandidateEvaluator | None = None
    candidates: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0, 7.5)
    start_percent: float = 0.0
    end_percent: float = 1.0
    budget: int = 0  # evaluated steps per sampler call; 0 = every step of the window
    tolerance: float = 0.0
    label: str = "Online Feedback CFG"

    def validate(self) -> None:
        if not isinstance(self.evaluator, CandidateEvaluator):
            raise PlanError(f"{self.label}: no evaluator to score the candidate scales")
        if len(self.candidates) < 2:
            raise PlanError(f"{self.label}: give at least two candidate scales to choose from (got {self.candidates})")
        if any(w < 0 for w in self.candidates):
            raise PlanError(f"{self.label}: candidate scales must be ≥ 0 (got {self.candidates})")
        if not 0.0 <= self.start_percent < self.end_percent <= 1.0:
            raise PlanError(f"{self.label}: the evaluation window needs 0 ≤ start_percent < end_percent ≤ 1 (got "
                            f"{self.start_percent}, {self.end_percent})")
        if self.budget < 0 or self.tolerance < 0:
            raise PlanError(f"{self.label}: budget and tolerance must be ≥ 0")

    def record(self, state: GuidanceState) -> FeedbackRecord:
        found = state.method_state.get(STATE_KEY)
        if found is None:
            found = state.method_state[STATE_KEY] = FeedbackRecord()
        return found

    def evaluates_at(self, progress: float, record: FeedbackRecord) -> bool:
        in_window = self.start_percent <= progress <= self.end_percent + 1e-9
        return in_window and (self.budget == 0 or record.evaluations < self.budget)

    def scale_weights(self, weights: list, direction: DirectionInputs) -> list:
        if len(weights) > 1:
            raise PlanError(f"{self.label}: it chooses one CFG scale per sample and cannot follow a band split (FDG) "
                            f"in the same plan; remove one of the two nodes.")
        import time

        step = direction.step
        record = self.record(direction.state)
        batch = direction.cond.shape[0]
        if record.chosen is not None and record.chosen.shape[0] != batch:
            record.chosen = None  # another batch in the same run (e.g. a second sampler pass)
        if self.evaluates_at(step.position.progress, record):
            context = dict(direction.state.method_state.get(CONTEXT_KEY, {}))
            missing = [k for k in self.evaluator.needs() if context.get(k) is None]
            if missing:
                raise PlanError(f"{self.label}: the {self.evaluator.name} evaluator needs {', '.join(missing)} from "
                                f"the positive conditioning, which this step did not provide.")
            context["sigma"] = step.sigma_value
            start = time.perf_counter()
            try:
                scores = self.evaluator.score(candidate_predictions(direction.cond, direction.uncond,
                                                                    self.candidates), context)
            except ValueError as e:
                raise PlanError(f"{self.label}: {e}") from None
            if tuple(scores.shape) != (len(self.candidates), batch):
                raise PlanError(f"{self.label}: the {self.evaluator.name} evaluator returned scores of shape "
                                f"{tuple(scores.shape)}, expected {(len(self.candidates), batch)}")
            record.chosen = choose(scores.float().cpu(), self.candidates, self.tolerance)
            record.evaluations += 1
            record.log.append((step.position.step, step.sigma_value, record.chosen.tolist(),
                               time.perf_counter() - start))
        if record.chosen is None:
            return weights
        return [per_sample(record.chosen.to(direction.cond.device), direction.cond)]

    def run_report(self, state: GuidanceState) -> str:
        record = state.method_state.get(STATE_KEY)
        if record is None or not record.log:
            return ""
        steps = "; ".join(f"σ {sigma:.3g}: {sum(chosen) / len(chosen):.2g} ({min(chosen):g}–{max(chosen):g})"
                          for _, sigma, chosen, _ in record.log)
        cost = sum(seconds for *_, seconds in record.log) / len(record.log)
        return (f". {self.label}: {len(record.log)} evaluated steps ({self.evaluator.name}, {cost * 1000:.1f} ms "
                f"each); chosen scale, mean (range) over the batch: {steps}")
