"""Train the pack's annealing-guidance policy for the embedded digits model, or convert an authors' checkpoint.

    python -m digits.train_guidance_policy          # in the pack folder: the shipped policy (~2–4 min, 1 CPU thread)
    python -m digits.train_guidance_policy --steps 20 --out /tmp/policy.safetensors    # a quick run
    python -m digits.train_guidance_policy --convert checkpoint.pt --out models/guidance_policies/sdxl.safetensors

The objective of Yehezkel et al. (arXiv 2506.24108), adapted to the digits model: a training image x0 of class c is
noised to z_t = x0 + σ_t·ε at a step of the 20-step "normal" schedule; the policy gives w from (t, ‖ε_u − ε_c‖, λ)
with λ ~ U[0, 1] per sample; ε̂ = ε_u + w·(ε_c − ε_u); the CFG++ (DDIM) step z_{t−1} = (z_t − σ_t·ε̂) + σ_{t−1}·ε_u;
the loss is (1 − λ)·mean(ε̂ − ε)² + r·λ·mean(δ_{t−1})², δ_{t−1} = ε_u − ε_c at z_{t−1}, with r the ratio of the two
terms' running means (the authors' EMA normalisation). The digits UNet is frozen; the gradient reaches the policy
through ε̂ and through the model's predictions at z_{t−1}. Fixed seed, one CPU thread: the same command gives the
same file.

``--convert`` reads an authors' checkpoint (``{"config": {"guidance_scale_model": {...}}, "guidance_scale_model":
state_dict}``) and writes the pack's safetensors policy file. It first tries ``torch.load(weights_only=True)``;
``--trust-pickle`` allows a full unpickle for a file that needs it: run that once, only on a file you trust.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .comfy_setup import ComfyUINotFound, import_comfyui, import_pack

POLICY_WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits_guidance_policy.safetensors"
POLICY_CONFIG = dict(hidden_size=32, n_layers=1, output_size=1, t_embed_dim=4, delta_embed_dim=4, lambda_embed_dim=4,
                     t_embed_normalization=1e3, delta_embed_normalization=20.0, w_bias=1.0, w_scale=1.0)


@dataclass(frozen=True)
class PolicyTrainConfig:
    steps: int = 200
    batch_size: int = 32
    learning_rate: float = 3e-3
    schedule_steps: int = 20
    seed: int = 0


def train_policy(config: PolicyTrainConfig, out: str | Path, progress: bool = True) -> Path:
    """Train the policy against the shipped digits model and save it (ComfyUI must be importable)."""
    import comfy.samplers

    import_pack()
    from guidance_kit.digits import model as digits_model
    from guidance_kit.digits.data import load_split
    from guidance_kit.guiders.methods.annealing_guidance import GuidanceScalePolicy, save_policy

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    split = load_split()
    images, labels = split.train_images, split.train_labels
    cpu = torch.device("cpu")
    loaded = digits_model.load_digits_model(digits_model.UNET_WEIGHTS, cpu, cpu)
    model = loaded.patcher.model
    model.requires_grad_(False)
    sampling = model.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", config.schedule_steps).float()
    table = loaded.class_embedding.float()
    null = table[digits_model.NULL_CLASS].expand(config.batch_size, -1).unsqueeze(1)

    def predictions(z: torch.Tensor, sigma: torch.Tensor, classes: torch.Tensor):
        context = torch.cat([table[classes].unsqueeze(1), null])
        denoised = model.apply_model(torch.cat([z, z]), torch.cat([sigma, sigma]), c_crossattn=context)
        cond, uncond = denoised.chunk(2)
        s = sigma.view(-1, 1, 1, 1)
        return (z - cond) / s, (z - uncond) / s

    policy = GuidanceScalePolicy(**POLICY_CONFIG)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.learning_rate)
    running = [None, None]
    start = time.perf_counter()
    for step in range(config.steps):
        index = torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)
        x0, classes = images[index], labels[index]
        at = torch.randint(0, config.schedule_steps - 1, (config.batch_size,), generator=generator)
        sigma, sigma_next = sigmas[at], sigmas[at + 1]
        guidance_lambda = torch.rand(config.batch_size, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        z = x0 + sigma.view(-1, 1, 1, 1) * noise
        with torch.no_grad():
            eps_cond, eps_uncond = predictions(z, sigma, classes)
        delta_norm = (eps_uncond - eps_cond).flatten(1).norm(dim=1)
        w = policy(sampling.timestep(sigma), delta_norm, guidance_lambda).view(-1, 1, 1, 1)
        guided = eps_uncond + w * (eps_cond - eps_uncond)
        z_next = (z - sigma.view(-1, 1, 1, 1) * guided) + sigma_next.view(-1, 1, 1, 1) * eps_uncond
        next_cond, next_uncond = predictions(z_next, sigma_next.clamp_min(1e-3), classes)
        eps_loss = ((1 - guidance_lambda) * (guided - noise).pow(2).flatten(1).mean(1)).mean()
        delta_loss = (guidance_lambda * (next_uncond - next_cond).pow(2).flatten(1).mean(1)).mean()
        running[0] = eps_loss.item() if running[0] is None else 0.99 * running[0] + 0.01 * eps_loss.item()
        running[1] = delta_loss.item() if running[1] is None else 0.99 * running[1] + 0.01 * delta_loss.item()
        ratio = min(running[0] / max(running[1], 1e-8), 1e4)
        loss = eps_loss + ratio * delta_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress and (step % 50 == 0 or step == config.steps - 1):
            print(f"step {step}: ε loss {running[0]:.4f}, δ loss {running[1]:.4f}, "
                  f"w mean {float(w.detach().mean()):.2f}", flush=True)
    seconds = time.perf_counter() - start
    metadata = {f"train_{k}": v for k, v in asdict(config).items()}
    metadata.update(train_seconds=f"{seconds:.0f}", train_threads=torch.get_num_threads(),
                    torch_version=torch.__version__, model=digits_model.UNET_WEIGHTS.name,
                    format="Guidance Kit annealing-guidance policy (authors' ScalarMLP layout)")
    return save_policy(out, policy.eval(), metadata)


def convert_checkpoint(checkpoint: str | Path, out: str | Path, trust_pickle: bool = False) -> Path:
    """The authors' ``.pt`` checkpoint → the pack's safetensors policy file."""
    import_pack()
    from guidance_kit.guiders.methods.annealing_guidance import (
        PolicyFileError,
        load_policy,
        policy_from_state,
        save_policy,
    )

    if not trust_pickle:
        policy = load_policy(checkpoint)
    else:
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "guidance_scale_model" not in state:
            raise PolicyFileError(f"{checkpoint} is not an annealing-guidance checkpoint")
        config = dict(state.get("config") or {}).get("guidance_scale_model")
        policy = policy_from_state(dict(config or {}), {k: torch.as_tensor(v) for k, v in
                                                        state["guidance_scale_model"].items()})
    return save_policy(out, policy, {"converted_from": Path(checkpoint).name})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = PolicyTrainConfig()
    parser.add_argument("--out", default=str(POLICY_WEIGHTS))
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--convert", default="", help="an authors' checkpoint (.pt) to convert to safetensors")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="--convert: allow a full unpickle (only for a file you trust)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.convert:
        print(convert_checkpoint(args.convert, args.out, args.trust_pickle))
        return 0
    try:
        import_comfyui(cpu=True)
    except ComfyUINotFound as e:
        print(e, file=sys.stderr)
        return 2
    path = train_policy(PolicyTrainConfig(steps=args.steps, seed=args.seed), args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
