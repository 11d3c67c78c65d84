"""Annealing Guidance · a learned policy picks the CFG scale per sample and per step (stage 2, a weight factor).

Paper: Yehezkel, Dahary, Voynov, Cohen-Or, "Navigating with Annealing Guidance Scale in Diffusion Space", arXiv
2506.24108. A small MLP reads the timestep t, the norm of δ = ε_u − ε_c and the user's knob λ ∈ [0, 1] and returns
the scale of the step:

    w_t = w_scale · MLP([e(t / t_norm), e(‖δ‖ / δ_norm), e(λ)]) + w_bias,   e(v) = [v, cos(v), cos(2v), …]

and the step is CFG with that scale, ε̂ = ε_u + w_t·(ε_c − ε_u), re-noised with ε_u (CFG++; pair it with a CFG++
sampler). Trained with (1 − λ)·‖ε̂ − ε‖² + λ·‖δ_{t−1}‖²: larger λ weighs the agreement of the next step's
conditional and unconditional predictions (prompt adherence) over the noise-prediction error (sample quality), so
larger λ gives larger scales.

The policy layout follows the authors' ``ScalarMLP`` (``src/model/guidance_scale_model.py`` of
github.com/annealing-guidance/annealing-guidance; this is the pack's own implementation): a ``combined_head``
Sequential of Linear/ReLU layers whose state-dict keys are the authors'. Files: safetensors with those keys and the
policy's configuration as JSON in the metadata entry ``guidance_scale_model``, or the authors' checkpoint dict
(``{"config": {"guidance_scale_model": {...}}, "guidance_scale_model": state_dict}``) read with
``torch.load(weights_only=True)``.

Here predictions are x0 predictions at noise σ: ε_c − ε_u = (C − U)/σ (VE; flow models: (1 − σ)(C − U)/σ), and the
policy's t is the model's own timestep of σ (a table the node takes from the model's sampling object).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..plan import CfgOne, PlanError, WeightFactor
from ..tensor_ops import per_sample

if TYPE_CHECKING:
    from ..step import DirectionInputs, GuidanceState

STATE_KEY = "annealing_guidance"  # method_state: the chosen scales, one ChosenScales per evaluation
CONFIG_METADATA_KEY = "guidance_scale_model"
POLICY_DEFAULTS = dict(t_embed_dim=4, delta_embed_dim=4, lambda_embed_dim=4, t_embed_normalization=1e3,
                       delta_embed_normalization=5.0, w_bias=1.0, w_scale=1.0)
POLICY_KEYS = ("hidden_size", "output_size", "n_layers", *POLICY_DEFAULTS)


class PolicyFileError(ValueError):
    """A policy file that cannot be read safely or does not describe a policy."""


def embed_value(value: torch.Tensor, size: int) -> torch.Tensor:
    """[B] → [B, size]: the value itself, then cos(k·value) for k = 1 … size − 1."""
    k = torch.arange(1, size, device=value.device, dtype=value.dtype)
    return torch.cat([value.unsqueeze(-1), torch.cos(value.unsqueeze(-1) * k)], dim=-1)


class GuidanceScalePolicy(torch.nn.Module):
    """w = f(t, ‖δ‖, λ) for every sample of a batch (the authors' ScalarMLP layout, one output)."""

    def __init__(self, hidden_size: int, n_layers: int, output_size: int = 1, **options):
        super().__init__()
        unknown = set(options) - set(POLICY_DEFAULTS)
        if unknown:
            raise PolicyFileError(f"unknown policy settings {sorted(unknown)}")
        if output_size != 1:
            raise PolicyFileError(f"the policy has {output_size} outputs; only one-scale policies (output_size 1) "
                                  f"are supported")
        settings = {**POLICY_DEFAULTS, **options}
        self.config = {"hidden_size": int(hidden_size), "n_layers": int(n_layers), "output_size": 1, **settings}
        width = settings["t_embed_dim"] + settings["delta_embed_dim"] + settings["lambda_embed_dim"]
        layers = [torch.nn.Linear(width, hidden_size), torch.nn.ReLU()]
        for _ in range(int(n_layers)):
            layers += [torch.nn.Linear(hidden_size, hidden_size), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(hidden_size, 1))
        self.combined_head = torch.nn.Sequential(*layers)

    def features(self, timestep: torch.Tensor, delta_norm: torch.Tensor, guidance_lambda: torch.Tensor):
        c = self.config
        return torch.cat([embed_value(timestep / c["t_embed_normalization"], c["t_embed_dim"]),
                          embed_value(delta_norm / c["delta_embed_normalization"], c["delta_embed_dim"]),
                          embed_value(guidance_lambda, c["lambda_embed_dim"])], dim=-1)

    def forward(self, timestep, delta_norm: torch.Tensor, guidance_lambda) -> torch.Tensor:
        """``timestep``, ``guidance_lambda``: numbers or [B]; ``delta_norm`` [B] (‖ε_u − ε_c‖ per sample) → [B]."""
        delta_norm = torch.as_tensor(delta_norm, dtype=torch.float32).reshape(-1)
        batch = delta_norm.shape[0]
        weight = self.combined_head[0].weight
        delta_norm = delta_norm.to(weight.device, weight.dtype)
        timestep, guidance_lambda = (torch.as_tensor(v, dtype=weight.dtype, device=weight.device).reshape(-1)
                                     .expand(batch) for v in (timestep, guidance_lambda))
        head = self.combined_head(self.features(timestep, delta_norm, guidance_lambda)).squeeze(-1)
        return self.config["w_scale"] * head + self.config["w_bias"]


def policy_from_state(config: dict, state: dict[str, torch.Tensor]) -> GuidanceScalePolicy:
    """A policy from its configuration (the authors' ``guidance_scale_model`` entries) and state dict."""
    if not isinstance(config, dict) or "hidden_size" not in config or "n_layers" not in config:
        raise PolicyFileError("the policy configuration needs 'hidden_size' and 'n_layers'")
    settings = {k: v for k, v in config.items() if k in POLICY_KEYS}  # the authors' extra keys (scheduler, …)
    policy = GuidanceScalePolicy(**settings)
    head = {k: v for k, v in state.items() if k.startswith("combined_head.")}
    try:
        policy.load_state_dict(head, strict=True)
    except RuntimeError as e:
        raise PolicyFileError(f"the weights do not fit the configuration ({str(e).splitlines()[0]})") from None
    return policy.float().eval().requires_grad_(False)


def load_policy(path: str | Path) -> GuidanceScalePolicy:
    """A policy from a safetensors file (config JSON in the metadata) or the authors' ``.pt`` checkpoint, read
    with ``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise PolicyFileError(f"no policy file at {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001  (any parse failure is a refusal)
            raise PolicyFileError(f"{path.name} is not a readable safetensors file ({e})") from None
        if CONFIG_METADATA_KEY not in metadata:
            raise PolicyFileError(f"{path.name} has no '{CONFIG_METADATA_KEY}' configuration in its metadata; "
                                  f"convert the authors' checkpoint with 'python -m digits.train_guidance_policy "
                                  f"--convert <checkpoint.pt>'")
        try:
            config = json.loads(metadata[CONFIG_METADATA_KEY])
        except json.JSONDecodeError:
            raise PolicyFileError(f"{path.name}: the '{CONFIG_METADATA_KEY}' metadata is not JSON") from None
        return policy_from_state(config, state)
    if path.suffix not in (".pt", ".pth", ".ckpt"):
        raise PolicyFileError(f"{path.name}: policy files are .safetensors or the authors' .pt checkpoints")
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (weights_only refuses anything but tensors and plain containers)
        raise PolicyFileError(f"{path.name} cannot be loaded safely with torch.load(weights_only=True) "
                              f"({str(e).splitlines()[0][:200]}); convert it once to safetensors in a trusted "
                              f"environment (help page, 'Your own policy')") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("guidance_scale_model"), dict):
        raise PolicyFileError(f"{path.name} is not an annealing-guidance checkpoint (a dict with 'config' and "
                              f"'guidance_scale_model')")
    config = (checkpoint.get("config") or {}).get("guidance_scale_model")
    return policy_from_state(config, checkpoint["guidance_scale_model"])


def save_policy(path: str | Path, policy: GuidanceScalePolicy, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {k: str(v) for k, v in (metadata or {}).items()}
    entries[CONFIG_METADATA_KEY] = json.dumps(policy.config)
    save_file({k: v.detach().float().contiguous() for k, v in policy.state_dict().items()}, str(path), entries)
    return path


class SharedPolicy:
    """A loaded policy held by a plan; immutable in use, so plan copies share it."""

    def __init__(self, policy: GuidanceScalePolicy, name: str):
        self.policy, self.name = policy, name

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return f"SharedPolicy({self.name})"


def timestep_of_sigma(sigma: float, table: tuple[tuple[float, float], ...]) -> float:
    """The model's timestep at ``sigma``, interpolated in log σ in a (σ, t) table sorted by σ."""
    if len(table) == 1:
        return table[0][1]
    log_sigma = math.log(max(sigma, 1e-12))
    logs = [math.log(max(s, 1e-12)) for s, _ in table]
    if log_sigma <= logs[0]:
        return table[0][1]
    if log_sigma >= logs[-1]:
        return table[-1][1]
    for i in range(1, len(table)):
        if log_sigma <= logs[i]:
            share = (log_sigma - logs[i - 1]) / max(logs[i] - logs[i - 1], 1e-12)
            return table[i - 1][1] + share * (table[i][1] - table[i - 1][1])
    return table[-1][1]


def noise_difference_norm(cond: torch.Tensor, uncond: torch.Tensor, sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    """‖ε_u − ε_c‖ per sample from x0 predictions at noise σ ([B])."""
    sigma = per_sample(sigma, cond).clamp_min(1e-6)
    scale = (1.0 - sigma).clamp_min(0.0) / sigma if flow else 1.0 / sigma
    return ((cond.float() - uncond.float()) * scale).flatten(1).norm(dim=1)


@dataclass(frozen=True)
class AnnealingGuidance(WeightFactor):
    KEY = "annealing_guidance"
    ORDER = 6  # replaces the weight (after Online Feedback CFG's choice); β-CFG (10) and S-CFG (20) multiply it
    AT_CFG_ONE = CfgOne.NEEDS_UNCOND  # the policy's scale replaces the sampler's cfg, 1 included

    policy: SharedPolicy | None = None
    guidance_lambda: float = 0.5
    timesteps: tuple[tuple[float, float], ...] = field(default=((1.0, 1.0),))  # (σ, model timestep), by σ
    label: str = "Annealing Guidance"
    # called once after every run with ``plot_payload`` (the node sends it to its plot); tensor-free, compared by value
    publish: Callable[[dict], None] | None = None

    def validate(self) -> None:
        if not isinstance(self.policy, SharedPolicy):
            raise PlanError(f"{self.label}: no guidance-scale policy loaded")
        if not 0.0 <= self.guidance_lambda <= 1.0 or not math.isfinite(self.guidance_lambda):
            raise PlanError(f"{self.label}: λ must lie in [0, 1] (got {self.guidance_lambda})")
        if not self.timesteps or any(a[0] > b[0] for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise PlanError(f"{self.label}: the σ → timestep table must be sorted by σ")

    def scales(self, direction: DirectionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen scale w_t and ‖ε_u − ε_c‖ of every sample ([B] each, on the CPU)."""
        step = direction.step
        sigma = torch.as_tensor(step.sigma, dtype=torch.float32).reshape(-1)
        norms = noise_difference_norm(direction.cond, direction.uncond, sigma.to(direction.cond.device),
                                      step.parameterization == "flow").cpu()
        timestep = timestep_of_sigma(step.sigma_value, self.timesteps)
        with torch.no_grad():
            chosen = self.policy.policy(timestep, norms, self.guidance_lambda).float()
        if not torch.isfinite(chosen).all():
            raise PlanError(f"{self.label}: the policy {self.policy.name} returned a non-finite scale at σ "
                            f"{step.sigma_value:.4g}")
        return chosen, norms

    def scale_weights(self, weights: list, direction: DirectionInputs) -> list:
        if len(weights) > 1:
            raise PlanError(f"{self.label}: it chooses one CFG scale per sample and cannot follow a band split (FDG) "
                            f"in the same plan; remove one of the two nodes.")
        chosen, norms = self.scales(direction)
        log = direction.state.method_state.setdefault(STATE_KEY, [])
        position = direction.step.position
        log.append(ChosenScales(position.step, direction.step.sigma_value, position.progress,
                                tuple(chosen.tolist()), tuple(norms.tolist())))
        return [per_sample(chosen.to(direction.cond.device), direction.cond)]

    def run_report(self, state: GuidanceState) -> str:
        log = state.method_state.get(STATE_KEY)
        if not log:
            return ""
        steps = "; ".join(f"σ {e.sigma:.3g}: {e.mean:.3g} ({min(e.scales):.3g}–{max(e.scales):.3g})" for e in log)
        return (f". {self.label} (policy {self.policy.name}, λ {self.guidance_lambda:g}): chosen scale w_t per "
                f"step, mean (range) over the batch: {steps}")

    def run_finished(self, state: GuidanceState) -> None:
        """Hands the run's chosen scales to ``publish`` (the node's plot on the ComfyUI page), if one is set."""
        log = state.method_state.get(STATE_KEY)
        if log and self.publish is not None:
            self.publish(self.plot_payload(log))

    def plot_payload(self, log: list[ChosenScales]) -> dict:
        """The run's chosen scales per evaluation, in sampling order: progress, σ, the batch mean and min–max of
        w_t, the batch mean of ‖ε_u − ε_c‖ (plain numbers, JSON-ready)."""
        return {"policy": self.policy.name, "lambda": self.guidance_lambda,
                "steps": [{"progress": e.progress, "sigma": e.sigma, "step": e.step, "mean": e.mean,
                           "min": min(e.scales), "max": max(e.scales),
                           "delta_norm": sum(e.delta_norms) / len(e.delta_norms)} for e in log]}


@dataclass(frozen=True)
class ChosenScales:
    """What the policy chose at one evaluation: where (step of the call, σ, progress) and, per sample, w_t and
    ‖ε_u − ε_c‖."""

    step: float
    sigma: float
    progress: float
    scales: tuple[float, ...]
    delta_norms: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.scales) / len(self.scales)
