"""Weight-delta branches (NPO, Personalization, LoRA-clone Autoguidance / Unconditional Priors): a patched
layer whose weight ComfyUI uses without calling its forward is an error naming that layer (never a silent
partial delta), layer classes not known to compute through their forward are refused at the node, and the
per-forward row state is per call: two threads running forwards of one patched model at the same time get
exactly the sequential results."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import threading

import comfy.model_management
import comfy.patcher_extension
import comfy.utils
import folder_paths
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from guidance_kit.nodes import model_guidance as MG
from guidance_kit.nodes import perturbation as P
from guidance_kit.nodes.contributors import row_delta, weight_delta
from guidance_kit.nodes.runtime.engine import BRANCH_MAP_KEY
from tests.comfyui.harness import conditioning, ksample, out, rel_diff, tiny_model

CFG = 4.0
LAYER = "diffusion_model.input_blocks.1.1.transformer_blocks.0"
TARGETS = [f"{LAYER}.attn1.to_q", f"{LAYER}.ff.net.0.proj", f"{LAYER}.ff.net.2",
           "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v"]


def write_lora(tmp_path, name: str, seed: int = 3) -> str:
    sd = tiny_model("sd15").model.state_dict()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for target in TARGETS:
        weight = sd[target + ".weight"]
        tensors[target + ".lora_down.weight"] = torch.randn(2, weight.shape[1], generator=g) / weight.shape[1] ** 0.5
        tensors[target + ".lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=g) * 0.5
        tensors[target + ".alpha"] = torch.tensor(2.0)
    folder = tmp_path / "loras"
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / name))
    folder_paths.add_model_folder_path("loras", str(folder))
    return name


def npo(model, name: str):
    return out(MG.NPONode.execute(model, name, 1.0, 1.0, "constant", 0.0, 1.0))


def fused_feed_forward(ff):
    """The feed-forward as newer ComfyUI's fused path computes it (``comfy.ops.linear_input_act``): the output
    layer's weight is used directly, its forward is never called."""
    def forward(x):
        hidden = ff.net[0](x)  # GEGLU: its projection still runs through its (patched) forward
        return F.linear(hidden, ff.net[2].weight, ff.net[2].bias)
    return forward


def test_a_patched_layer_used_without_its_forward_is_an_error_naming_it(tmp_path):
    name = write_lora(tmp_path, "partial.safetensors")
    node = npo(tiny_model("sd15"), name)
    assert torch.isfinite(ksample(node, "sd15", CFG, 2)).all()  # every patched layer reached: fine
    bypassed = node.clone()
    ff = comfy.utils.get_attr(bypassed.model, f"{LAYER}.ff")
    bypassed.add_object_patch(f"{LAYER}.ff.forward", fused_feed_forward(ff))
    missed = r"^Diffusion-NPO: 1 of the 4 layers its LoRA/weight delta patches were not reached .*"
    layer = r"input_blocks\.1\.1\.transformer_blocks\.0\.ff\.net\.2\)"
    with pytest.raises(row_delta.DeltaNotApplied, match=missed + layer) as info:
        ksample(bypassed, "sd15", CFG, 2)
    assert "fp16_accumulation" in str(info.value) and "second checkpoint" in str(info.value)


def test_personalization_reports_the_missed_layer_too(tmp_path):
    name = write_lora(tmp_path, "person.safetensors", seed=4)
    node = out(MG.PersonalizationGuidanceNode.execute(tiny_model("sd15"), name, 1.0, 0.3, 1.0, "constant", 0.0, 1.0))
    bypassed = node.clone()
    ff = comfy.utils.get_attr(bypassed.model, f"{LAYER}.ff")
    bypassed.add_object_patch(f"{LAYER}.ff.forward", fused_feed_forward(ff))
    with pytest.raises(row_delta.DeltaNotApplied, match=r"^Personalization.*ff\.net\.2"):
        ksample(bypassed, "sd15", CFG, 2)


class QuantizedLinear(torch.nn.Module):
    """A layer of another pack that keeps a weight but is not a Linear."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4, 4))


@pytest.mark.parametrize("module, message", [
    (QuantizedLinear(), r"^NPO: the patch of k targets a QuantizedLinear layer \(.*\), a layer class Guidance Kit "
                        r"does not know to compute its output through its forward"),
    (torch.nn.LayerNorm(4), r"^NPO: the patch of k targets a LayerNorm layer .*normalisation layer"),
])
def test_layers_not_known_to_compute_through_forward_are_refused(module, message):
    with pytest.raises(weight_delta.DeltaError, match=message):
        weight_delta.check_layer("NPO", "k", module)


def test_comfyui_layer_classes_are_accepted():
    import comfy.ops

    for ops in (comfy.ops.disable_weight_init, comfy.ops.manual_cast):
        weight_delta.check_layer("NPO", "k", ops.Linear(4, 4))
        weight_delta.check_layer("NPO", "k", ops.Conv2d(4, 4, 3))


def test_a_norm_layer_patch_is_refused_at_the_node():
    model = tiny_model("sd15")
    key = "diffusion_model.input_blocks.1.1.norm.weight"
    diff = ("diff", (torch.zeros_like(comfy.utils.get_attr(model.model, key)),))
    with pytest.raises(weight_delta.DeltaError, match=r"GroupNorm layer .*normalisation layer"):
        weight_delta.entries_from_patches(model, [(key, 1.0, diff, None)], "NPO")


# ------------------------------------------------------------------------------------------------
# two threads, one patched model
# ------------------------------------------------------------------------------------------------

class Rendezvous:
    """Object patch of an early layer: holds each forward until the other thread's forward arrives, so both
    forwards have published their rows before either reaches a patched layer."""

    def __init__(self, module):
        self.module = module
        self.barrier: threading.Barrier | None = None

    def __call__(self, *args, **kwargs):
        if self.barrier is not None:
            self.barrier.wait(timeout=30)
        return type(self.module).forward(self.module, *args, **kwargs)


def _forward(model, x, sigma, context, chunks: list[int], branch_map: dict) -> torch.Tensor:
    """One diffusion-model call as ComfyUI's ``_calc_cond_batch`` makes it (transformer_options with the
    model's wrappers and patches, ``cond_or_uncond``, ``sigmas``)."""
    to = comfy.patcher_extension.copy_nested_dicts(model.model_options["transformer_options"])
    comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), model.wrappers, copy_dict1=False)
    to.update({"cond_or_uncond": list(chunks), "sigmas": sigma, BRANCH_MAP_KEY: branch_map})
    batch_sigma = sigma.expand(x.shape[0])
    with torch.no_grad():
        return model.model.apply_model(x, batch_sigma, c_crossattn=context, transformer_options=to)


def test_two_threads_running_forwards_of_one_patched_model_match_sequential_runs(tmp_path):
    name = write_lora(tmp_path, "threads.safetensors", seed=5)
    model = out(P.PAGNode.execute(npo(tiny_model("sd15"), name), 2.0, "auto", "constant", 0.0, 1.0))
    plan = model.model_options["guidance_kit_plan"]
    branch_map = {1: plan.get("uncond_model").branch, 2: plan.extra[0].branch}  # uncond rows: NPO delta; 2: PAG
    rendezvous = Rendezvous(comfy.utils.get_attr(model.model, "diffusion_model.time_embed.0"))
    model.add_object_patch("diffusion_model.time_embed.0.forward", rendezvous)
    comfy.model_management.load_models_gpu([model])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=g)
    context = torch.cat([conditioning("sd15", 1)[0][0], conditioning("sd15", 2)[0][0], conditioning("sd15", 1)[0][0]])
    sigma = torch.tensor([2.0])
    calls = {  # different chunk layouts: reading the other thread's rows would perturb the wrong rows
        "a": (x, context, [0, 1, 2]),
        "b": (x[1:2], context[1:2], [1]),
    }
    sequential = {k: _forward(model, xx, sigma, cc, chunks, branch_map) for k, (xx, cc, chunks) in calls.items()}
    assert rel_diff(sequential["b"], sequential["a"][1:2]) <= 1e-5  # row-independent model: same uncond row
    plain = _forward(model, x, sigma, context, [0, 0, 0], {})
    assert rel_diff(sequential["a"][1:3], plain[1:3]) > 1e-3  # the NPO and PAG rows differ from the plain model

    results: dict = {}
    errors: list = []
    rendezvous.barrier = threading.Barrier(2)

    def run(key):
        try:
            xx, cc, chunks = calls[key]
            results[key] = _forward(model, xx, sigma, cc, chunks, branch_map)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            rendezvous.barrier.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in calls]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        rendezvous.barrier = None
    assert not errors, errors
    for key in calls:
        assert torch.equal(results[key], sequential[key]), key
