"""Per-step cost of the perturbation methods vs plain CFG: before (every branch row computes the whole network),
with the prefix shared (the branch forks at its first perturbed block, ``nodes/runtime/prefix_fork.py``), the
physical limit of that sharing, and ComfyUI core's own nodes (CPU).

    python benchmarks/perturbation_cost.py [--steps 12] [--repeats 5] [--families sd15,flux,sd3,wan21,...]
                                           [--digits 300] [--full-size sdxl] [--skip-tiny] [--keep-freed-memory]

Needs a ComfyUI checkout (COMFYUI_PATH or ~/ComfyUI). For every method: CPU ms per step (this process's user +
system time, the least of interleaved runs: robust to other processes on a shared machine) and its ratio to plain
CFG in the same run, before (``×CFG``) and with the prefix shared (``shared``); the
physical limit ``1 + Σ_branches (FLOP share of the network from the branch's first perturbed block on) × ½``
(``limit``; FLOPs per unit counted with ``torch.utils.flop_counter.FlopCounterMode`` on the plain model's own
forward); model forwards and batch rows per step; whether the output differs from plain CFG. The digits table adds
plain CFG on 1.5× the batch (the rows of one extra branch): its ×CFG is 1.5 by FLOPs, and what it measures above
that is what this machine charges per row for the larger batch (caches, page faults of fresh large activations),
which the FLOP limit does not see (``--keep-freed-memory``: glibc keeps freed memory in the process, so large
activations no longer fault their pages in on every call, as with a GPU's caching allocator). Our branches run
inside the cond/uncond forward; core PAG and core SkipLayerGuidanceDiT run a second forward (and do nothing on
families they do not support, at full extra cost).
On tiny CPU models the time mostly measures per-call overhead; the digits model at batch 300 (``--digits 300``)
and a random-weight full-size SDXL UNet (``--full-size sdxl``, bf16, one step at a small latent) are
compute-bound, where the rows are what costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.set_num_threads(1)

# isort: off
import tests.conftest  # noqa: E402,F401  (registers the package as guidance_kit, finds ComfyUI)
from tests.comfyui.harness import counted, init_random_, ksample, out, rel_diff, tiny_model  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
from guidance_kit.guiders.progress import sigma_key  # noqa: E402
from guidance_kit.nodes import perturbation as P  # noqa: E402
from guidance_kit.nodes import attention_methods as A  # noqa: E402
from guidance_kit.nodes import spatial_methods as S  # noqa: E402
from guidance_kit.nodes.contributors.block_perturbation import Perturbation  # noqa: E402
from guidance_kit.nodes.runtime import prefix_fork  # noqa: E402
from guidance_kit.nodes import sag as SAG  # noqa: E402
from guidance_kit.nodes.runtime.blocks import block_layout  # noqa: E402
from guidance_kit.nodes.runtime.engine import plan_of  # noqa: E402
from guidance_kit.nodes.runtime.families import family_of  # noqa: E402
from comfy_extras.nodes_pag import PerturbedAttentionGuidance  # noqa: E402
from comfy_extras.nodes_sag import SelfAttentionGuidance  # noqa: E402
from comfy_extras.nodes_slg import SkipLayerGuidanceDiT  # noqa: E402
# isort: on

CFG = 5.0
WHOLE_RUN = dict(schedule="constant", start_percent=0.0, end_percent=1.0)

METHODS = {
    "PAG": lambda m: out(P.PAGNode.execute(m, 3.0, "auto", **WHOLE_RUN)),
    "SEG (σ=10)": lambda m: out(P.SEGNode.execute(m, 3.0, 10.0, "auto", **WHOLE_RUN)),
    "TPG": lambda m: out(P.TPGNode.execute(m, 3.0, "auto", 0, **WHOLE_RUN)),
    "Skip-layer": lambda m: out(P.SkipLayerNode.execute(m, 2.8, "auto", **WHOLE_RUN)),
    "S²-Guidance": lambda m: out(P.S2GuidanceNode.execute(m, 0.25, 0.6, "auto", 0, **WHOLE_RUN)),
    "PAG + Skip-layer": lambda m: out(P.SkipLayerNode.execute(out(P.PAGNode.execute(m, 3.0, "auto", **WHOLE_RUN)),
                                                              2.8, "auto", **WHOLE_RUN)),
}


def core_slg_layers(model) -> tuple[str, str]:
    """The same blocks as our skip-layer 'auto' selection, in core's double/single syntax."""
    spec = family_of(model, "bench")
    layout = block_layout(model, spec)
    blocks = P._blocks("bench", "SLG", "auto", spec, layout)
    double = ", ".join(str(i) for g, i in blocks if g == "double")
    single = ", ".join(str(i) for g, i in blocks if g == "single")
    return double, single


def tiny_cases(family: str) -> dict:
    out_cases = dict(METHODS)
    out_cases.update({
        "TSG": lambda m: out(P.TSGNode.execute(m, 1.5, 0.1, 0, **WHOLE_RUN)),
        "ICG": lambda m: out(P.ICGNode.execute(m, 0)),
        "core PAG": lambda m: out(PerturbedAttentionGuidance.execute(m, 3.0)),
    })
    if family == "sd3":
        del out_cases["TPG"]
    if family != "sd15":
        double, single = core_slg_layers(tiny_model(family))
        out_cases["core SkipLayerGuidanceDiT"] = lambda m: out(SkipLayerGuidanceDiT.execute(
            m, 2.8, 0.0, 1.0, double_layers=double, single_layers=single))
    else:
        out_cases["core SkipLayerGuidanceDiT"] = lambda m: out(SkipLayerGuidanceDiT.execute(
            m, 2.8, 0.0, 1.0, double_layers="0", single_layers=""))
    if family in ("sd15", "wan21", "ltxv"):  # PLADIS: text cross-attention families (no extra branch)
        out_cases["PLADIS"] = lambda m: out(A.PLADISNode.execute(m, 2.0, "entmax1.5"))
    out_cases["ERG"] = lambda m: out(A.ERGNode.execute(m, 2.0, 2.0, "auto", **WHOLE_RUN))
    out_cases["SWG"] = lambda m: out(S.SWGNode.execute(m, 1.0, 0.75, 2, **WHOLE_RUN))
    if family in ("sd15", "flux", "sd3"):  # SAG: middle-block (image) self-attention map; the degraded uncond is a
        out_cases["SAG"] = lambda m: out(SAG.SAGNode.execute(m, 0.5, 2.0, **WHOLE_RUN))  # second, dependent call
    if family == "sd15":  # core's node crashes on Flux and SD3 (ComfyUI 0.3.64)
        out_cases["core SAG"] = lambda m: out(SelfAttentionGuidance.execute(m, 0.5, 2.0))
    return out_cases


# ------------------------------------------------------------------------------------------------
# the physical limit: FLOPs per unit
# ------------------------------------------------------------------------------------------------

def unit_modules(model, units: prefix_fork.ForkLayout, spec) -> list:
    if spec.is_unet:
        return [comfy.utils.get_attr(model.model, path) for path in units.paths]
    attrs = dict(spec.groups)
    net = model.model.diffusion_model
    return [getattr(net, attrs[group])[index] for group, index in units.units]


def unit_flops(model, sample) -> tuple[list[float], float]:
    """FLOPs of each unit and of the whole forward in one plain-CFG sampling step (``sample(model)``)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = family_of(model, "bench")
    units = prefix_fork.fork_layout(model, spec, block_layout(model, spec))
    per_unit = [0.0] * len(units.units)
    counter = FlopCounterMode(display=False)
    starts: dict[int, int] = {}
    hooks = []
    for i, module in enumerate(unit_modules(model, units, spec)):
        hooks.append(module.register_forward_pre_hook(
            lambda m, a, i=i: starts.__setitem__(i, counter.get_total_flops())))
        hooks.append(module.register_forward_hook(
            lambda m, a, o, i=i: per_unit.__setitem__(i, per_unit[i] + counter.get_total_flops() - starts[i])))
    try:
        with counter:
            sample(model)
    finally:
        for hook in hooks:
            hook.remove()
    return per_unit, float(counter.get_total_flops())


def perturbations_of(model) -> list[Perturbation]:
    plan = plan_of(model)
    branches = [getattr(m, "branch", None) for m in plan.methods]
    return [b.perturbation for b in branches if b is not None and isinstance(b.perturbation, Perturbation)]


def physical_limit(model, flops: tuple[list[float], float], sigmas: list[float]) -> float | None:
    """1 + Σ_branches (share of the forward's FLOPs from the branch's first perturbed unit on) × ½, averaged over
    the run's steps (S²-Guidance's dropped blocks change per step)."""
    effects = perturbations_of(model)
    if not effects:
        return None
    per_unit, total = flops
    spec = family_of(model, "bench")
    index = prefix_fork.fork_layout(model, spec, block_layout(model, spec)).index
    limit = 1.0
    for p in effects:
        shares = []
        for sigma in sigmas:
            at = min(index[k] for k in p.perturbed_blocks(sigma_key(sigma)) if k in index)
            shares.append(1.0 - sum(per_unit[:at]) / total)
        limit += 0.5 * statistics.mean(shares)
    return limit


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def unshared(model):
    m = model.clone()
    prefix_fork.set_enabled(m, False)
    return m


def measure(base_model, sample, cases: dict, steps: int, repeats: int, sigmas: list[float],
            references: dict | None = None) -> list[tuple]:
    """Rows (name, ms/step before, ×CFG before, ×CFG shared, limit, forwards, rows, changes); ``sample(model)``
    runs ``steps`` steps. ``references``: name → another sampling of the plain model (plain CFG on a larger batch),
    timed in the same interleaved runs."""
    plain = sample(base_model.clone())
    flops = unit_flops(base_model.clone(), lambda m: sample_one_step(sample, m))
    models, info = {"CFG (plain)": base_model.clone()}, {}
    for name, build in {"CFG (plain)": lambda m: m, **cases}.items():
        try:
            model = build(base_model.clone())
        except ValueError as e:  # refused at the node (e.g. TSG's paper mode on Chroma)
            print(f"{name}: refused ({str(e)[:100]})")
            continue
        counted_model, counter = counted(model)
        result = sample(counted_model)  # warm-up, and the output for the 'changes' column
        info[name] = (counter.calls / steps, sum(counter.batches) / steps, rel_diff(result.float(), plain.float()),
                      physical_limit(model, flops, sigmas) if prefix_fork.installed(model) else None)
        models[name] = model if name != "CFG (plain)" else models[name]
        if prefix_fork.installed(model):
            models[name + " [before]"] = unshared(model)
    samplers = {name: (model, sample) for name, model in models.items()}
    for name, reference in (references or {}).items():
        counted_model, counter = counted(base_model.clone())
        result = reference(counted_model)
        info[name] = (counter.calls / steps, sum(counter.batches) / steps, rel_diff(result.float(), plain.float())
                      if result.shape == plain.shape else float("nan"), None)
        samplers[name] = (base_model.clone(), reference)
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(repeats):
        for name, (model, run) in samplers.items():
            start = time.process_time()
            run(model)
            times[name].append((time.process_time() - start) / steps)
    median = {name: min(t) for name, t in times.items()}  # the least disturbed run (the CPU is shared)
    base = median["CFG (plain)"]
    rows = [("CFG (plain)", base, 1.0, None, None, *info.pop("CFG (plain)")[:3])]
    for name, (forwards, batch_rows, changes, limit) in info.items():
        before = median.get(name + " [before]", median[name])
        shared = median[name] / base if name + " [before]" in median else None
        rows.append((name, before, before / base, shared, limit, forwards, batch_rows, changes))
    return rows



def sample_one_step(sample, model):
    return sample(model, steps=1)


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"## {title}")
    print(f"{'method':28s} {'ms/step':>9s} {'×CFG':>6s} {'shared':>7s} {'limit':>6s} {'fwd':>5s} {'rows':>5s} "
          f"{'changes':>8s}")
    for name, seconds, before, shared, limit, forwards, batch_rows, changes in rows:
        shared_text = f"{shared:7.2f}" if shared is not None else f"{'—':>7s}"
        limit_text = f"{limit:6.2f}" if limit is not None else f"{'—':>6s}"
        changes_text = f"{changes:8.3f}" if changes == changes else f"{'—':>8s}"  # NaN: another batch
        print(f"{name:28s} {seconds * 1e3:9.2f} {before:6.2f} {shared_text} {limit_text} {forwards:5.2f} "
              f"{batch_rows:5.2f} {changes_text}")
    print(flush=True)


def sigmas_of(model, steps: int) -> list[float]:
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    return [float(s) for s in sigmas[:-1]]


# ------------------------------------------------------------------------------------------------
# the models
# ------------------------------------------------------------------------------------------------

def run_tiny(family: str, steps: int, repeats: int) -> None:
    def sample(model, steps=steps):
        return ksample(model, family, CFG, steps)

    base = tiny_model(family)
    print_table(f"{family} (tiny random-weight model, {steps} euler steps)",
                measure(base, sample, tiny_cases(family), steps, repeats, sigmas_of(base, steps)))


def run_digits(batch: int, steps: int, repeats: int, methods: list[str] | None = None) -> None:
    from guidance_kit.digits import sampling
    from guidance_kit.digits.model import cached_digits_model

    digits = cached_digits_model()
    classes = [i % 10 for i in range(batch)]

    def sample(model, steps=steps, classes=classes):
        return sampling.sample(model, digits, classes, 0, CFG, steps)

    # plain CFG on the rows of one extra branch (×1.5 the batch): what this machine charges for those rows, against
    # the 1.5 that their FLOPs say (larger activations can cost more per row: caches, page faults)
    wider = [i % 10 for i in range(batch * 3 // 2)]
    references = {f"CFG (plain), batch {len(wider)}": lambda model: sample(model, classes=wider)}
    print_table(f"digits model (8×8 UNet, eps), batch {batch}, {steps} euler steps",
                measure(digits.patcher, sample, {m: METHODS[m] for m in methods or METHODS}, steps, repeats,
                        sigmas_of(digits.patcher, steps), references))


SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
    num_heads=-1, num_head_channels=64, use_spatial_transformer=True, legacy=False, use_temporal_attention=False,
    use_temporal_resblock=False, num_classes="sequential",
)
FLUX_DEV = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
    mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
    qkv_bias=True, guidance_embed=True,
)
FULL_SIZE = {"sdxl": (comfy.supported_models.SDXL, SDXL_UNET, "sd15"),
             "flux": (comfy.supported_models.Flux, FLUX_DEV, "flux")}  # (config, unet config, tiny family)


def full_size_model(name: str, device: str):
    """A full-size model of real block counts and widths in bf16: random weights, or on the meta device (no memory:
    FLOP counts only)."""
    cls, unet_config, _ = FULL_SIZE[name]
    config = cls(dict(unet_config))
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model({}, device=torch.device(device))
    if device != "meta":
        init_random_(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device(device))


def direct_forward(name: str, model, latent: int) -> None:
    """One forward of the diffusion model on one row (the FLOP counts' forward; any device)."""
    import comfy.model_management

    net = model.model.diffusion_model
    device, dtype = next(net.parameters()).device, torch.bfloat16
    zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
    free = comfy.model_management.get_free_memory
    comfy.model_management.get_free_memory = lambda *a, **k: (1 << 40, 1 << 40)  # the meta device has no memory stats
    try:
        if name == "sdxl":
            net(zeros(1, 4, latent, latent), torch.zeros(1, device=device), zeros(1, 77, 2048), y=zeros(1, 2816))
        else:
            net(zeros(1, 16, latent, latent), torch.zeros(1, device=device), zeros(1, 256, 4096), y=zeros(1, 768),
                guidance=torch.full((1,), 3.5, device=device))
    finally:
        comfy.model_management.get_free_memory = free


def full_size_limits(name: str, latent: int, steps: int) -> None:
    """The physical limit of each method on a full-size model (meta device: FLOPs only, no timing)."""
    model = full_size_model(name, "meta")
    flops = unit_flops(model, lambda m: direct_forward(name, m, latent))
    sigmas = sigmas_of(tiny_model(FULL_SIZE[name][2]), steps)  # the family's schedule (S²'s dropped blocks per σ)
    print(f"## {name} full size (real block counts and widths), {latent}×{latent} latent: physical limits "
          f"({flops[1] / 1e12:.2f} TFLOP per row and forward)")
    for method, build in METHODS.items():
        try:
            patched = build(model.clone())
        except ValueError as e:
            print(f"{method:28s} refused: {str(e)[:80]}")
            continue
        effects = perturbations_of(patched)
        blocks = "; ".join(", ".join(" ".join(map(str, k)) for k in p.blocks[:4]) + (" …" if len(p.blocks) > 4 else "")
                           for p in effects)
        print(f"{method:28s} limit {physical_limit(patched, flops, sigmas):5.3f}   ({blocks})")
    print(flush=True)


def run_full_size_sdxl(latent: int, repeats: int) -> None:
    """A random-weight SDXL UNet (real block counts and widths), bf16, one step at a ``latent``² latent."""
    base = full_size_model("sdxl", "cpu")
    g = torch.Generator().manual_seed(0)
    pooled = {"pooled_output": torch.randn(1, 1280, generator=g), "width": 8 * latent, "height": 8 * latent}
    positive = [[torch.randn(1, 77, 2048, generator=g), dict(pooled)]]
    negative = [[torch.randn(1, 77, 2048, generator=g), dict(pooled)]]

    def sample(m, steps=1):
        import comfy.sample

        noise = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
        return comfy.sample.sample(m, noise, steps, CFG, "euler", "normal", positive, negative,
                                   torch.zeros(1, 4, latent, latent), disable_pbar=True, seed=0)

    cases = {name: METHODS[name] for name in ("PAG", "Skip-layer")}
    print_table(f"SDXL UNet, full size, random weights, bf16, {latent}×{latent} latent, 1 euler step",
                measure(base, sample, cases, 1, repeats, sigmas_of(base, 1)))


# glibc's malloc settings for --keep-freed-memory: every allocation from the heap, which is never given back to the
# OS (by default an activation above the mmap threshold is a fresh mapping whose pages fault in on every call)
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "8589934592"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", default="sd15,flux,sd3,wan21,hunyuan_video,qwen_image,ltxv,lumina2,mochi,"
                                              "cosmos_predict2,hidream,cosmos")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--digits", type=int, default=0, help="batch of the digits-model table (0: none)")
    parser.add_argument("--digits-steps", type=int, default=4)
    parser.add_argument("--digits-methods", default="", help="comma-separated METHODS names (default: all)")
    parser.add_argument("--limits", default="", help="full-size models whose physical limits to print (meta "
                                                       "device, no memory): sdxl,flux")
    parser.add_argument("--limits-latent", type=int, default=128, help="latent side for --limits (128: 1024 px)")
    parser.add_argument("--full-size", default="", help="'sdxl': time a random-weight full-size SDXL UNet, one step")
    parser.add_argument("--full-size-latent", type=int, default=32)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory in the process (no page faults on every large activation, "
                             "as a GPU's caching allocator); restarts the process with its malloc settings")
    args = parser.parse_args()
    if args.keep_freed_memory and KEEP_FREED_MEMORY.items() - os.environ.items():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})
    allocator = "glibc keeps freed memory (" + " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items()) + ")" \
        if not KEEP_FREED_MEMORY.items() - os.environ.items() else "default allocator"
    print(f"torch {torch.__version__}, 1 thread, CPU, {allocator}, cfg {CFG}, CPU time (user + system) per step, "
          f"least of {args.repeats} interleaved runs. ms/step "
          f"and ×CFG: before (the branch computes the whole network); shared: ×CFG with the prefix shared; limit: "
          f"1 + Σ (FLOP share from the first perturbed block on) × ½; fwd = model forwards per step, rows = batch "
          f"rows per step (plain CFG: 1 / 2), changes = max relative difference of the final latent from plain CFG "
          f"(0 = the node did nothing)\n")
    if not args.skip_tiny:
        for family in args.families.split(","):
            run_tiny(family, args.steps, args.repeats)
    if args.digits:
        run_digits(args.digits, args.digits_steps, args.repeats,
                   [m for m in args.digits_methods.split(",") if m] or None)
    for name in filter(None, args.limits.split(",")):
        full_size_limits(name, args.limits_latent, args.digits_steps)
    if args.full_size == "sdxl":
        run_full_size_sdxl(args.full_size_latent, args.repeats)


if __name__ == "__main__":
    main()
