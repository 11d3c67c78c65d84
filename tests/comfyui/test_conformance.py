"""Conformance suite: every node of the pack, discovered from its registered schema, on tiny SD1.5, Flux,
SD3 and WAN models (WAN's latents are 5-D video latents), through ComfyUI's own samplers:

(a) it changes the output, or refuses with a message that names it (or logs that it had no effect);
(b) a repeated run is identical;
(c) a run split over two sampler calls equals one call, through KSamplerAdvanced (0–k, k–N) and through
    SamplerCustomAdvanced + SplitSigmas;
(d) a batch of 4 equals four runs of 1 (per-sample noise from ComfyUI's batch_index);
(e) fp16 and bf16 models give finite outputs;
(f) at cfg 1 it acts, or says that it has no effect there (never silently nothing);
(g) 5-D latents work (the WAN runs);
(h) stacked with another node, both still act;
(i) where its branches share the unperturbed prefix of the network (``nodes/runtime/prefix_fork.py``), the run
    equals the unshared run (fp32 and bf16).

Nodes are found from the extension's node list and classified by their schema: MODEL → MODEL patches,
SAMPLER nodes and GUIDER nodes; nodes of other kinds (the digits loader and decoder, the S-CFG map viewer) are
not guidance methods and are listed in ``test_every_node_is_classified``. A node opts out of a check only by
declaring why, on its own class: ``BATCH_COUPLED`` (a batch differs from single runs, and why) and
``STATE_ACROSS_SAMPLER_CALLS`` (what restarts at each sampler call); such nodes still run those checks, which
then state the difference instead of requiring equality. ``TYPICAL_CFG`` sets the scale a sampler node is
meant to run at (its cfg has another meaning). A new node joins every check without being listed here.
"""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import logging
from dataclasses import dataclass, field

import comfy.samplers
import folder_paths
import pytest
import torch
from comfy_api.latest import io
from comfy_extras import nodes_custom_sampler as custom

from guidance_kit.nodes import node_list
from guidance_kit.nodes.runtime import prefix_fork
from tests.comfyui.harness import FAMILIES, conditioning, latent, nodes, rel_diff, tiny_model

STEPS = 6
SPLIT_AT = 3
CFG = 4.0
SEED = 5
BATCH = 4
SAME = 1e-5  # relative difference that counts as equal (float32 round-off of a reordered computation)
KINDS = ("model patch", "sampler", "guider")


# ------------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------------

def io_type(port) -> str:
    return port.get_io_type() if hasattr(port, "get_io_type") else getattr(port, "io_type", "")


def kind_of(node) -> str | None:
    schema = node.GET_SCHEMA()
    outputs = [io_type(o) for o in schema.outputs]
    inputs = {i.id: io_type(i) for i in schema.inputs}
    if outputs == ["MODEL"] and inputs.get("model") == "MODEL":
        return "model patch"
    if outputs == ["SAMPLER"]:
        return "sampler"
    if outputs == ["GUIDER"]:
        return "guider"
    return None


NODES = [n for n in node_list() if kind_of(n) is not None]
CASES = [(n, f) for n in NODES for f in FAMILIES]
IDS = [f"{n.GET_SCHEMA().node_id.removeprefix('GuidanceKit_')}-{f}" for n, f in CASES]
PATCHES = [n for n in NODES if kind_of(n) == "model patch"]


def label_of(node) -> str:
    return getattr(node, "LABEL", None) or node.GET_SCHEMA().display_name.split(" · ")[0]


def test_every_node_is_classified():
    others = {n.GET_SCHEMA().node_id for n in node_list() if kind_of(n) is None}
    # not guidance methods: the embedded test model's loader and decoder, and the viewer of S-CFG's last maps
    assert others == {"GuidanceKit_DigitsModelLoader", "GuidanceKit_DigitsDecode", "GuidanceKit_SCFGMap"}
    assert {kind_of(n) for n in NODES} == set(KINDS)
    assert len(NODES) >= 24


# ------------------------------------------------------------------------------------------------
# building a node's output from its schema
# ------------------------------------------------------------------------------------------------

class Refused(Exception):
    """The node refused this model (at the node or when sampling) with a message."""


_LORAS: dict[str, str] = {}


def lora_for(family: str, folder) -> str:
    """A small LoRA file for the tiny model of ``family``: rank-2 deltas on its first attention Linear layers."""
    if family in _LORAS:
        return _LORAS[family]
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    tensors = {}
    state = tiny_model(family).model.state_dict()
    targets = [k[:-len(".weight")] for k, v in state.items()
               if k.startswith("diffusion_model.") and k.endswith(".weight") and v.ndim == 2 and "attn" in k][:4]
    assert targets, f"no attention Linear layer in the tiny {family} model"
    for target in targets:
        weight = state[target + ".weight"]
        tensors[target + ".lora_down.weight"] = torch.randn(2, weight.shape[1], generator=g) / weight.shape[1] ** 0.5
        tensors[target + ".lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=g) * 0.5
        tensors[target + ".alpha"] = torch.tensor(2.0)
    name = f"conformance_{family}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name))
    folder_paths.add_model_folder_path("loras", str(folder))
    _LORAS[family] = name
    return name


def node_inputs(node, family: str, model, loras_folder, dtype: torch.dtype = torch.float32) -> dict:
    """The node's inputs: widget defaults from its schema; other inputs from their type."""
    values = {}
    for port in node.GET_SCHEMA().inputs:
        kind = io_type(port)
        if port.id == "model" and kind == "MODEL":
            values["model"] = model
        elif kind == "MODEL":
            values[port.id] = tiny_model(family, seed=1, dtype=dtype)  # a second model of the family
        elif kind == "CONDITIONING":
            values[port.id] = conditioning(family, 3)
        elif port.id == "lora_name":
            values[port.id] = lora_for(family, loras_folder)
        elif getattr(port, "default", None) is not None:
            values[port.id] = port.default
        elif not getattr(port, "optional", False):
            raise AssertionError(f"{node.__name__}: no value for required input {port.id!r} ({kind})")
    return values


def overrides(node, name: str) -> bool:
    """Whether a V3 node defines ``name`` itself (ComfyUI calls validate_inputs only then)."""
    return getattr(node, name).__func__ is not getattr(io.ComfyNode, name).__func__


def execute(node, values: dict):
    """What ComfyUI does with a node at queue time: validate_inputs (if the node has one), then execute."""
    if overrides(node, "validate_inputs"):
        verdict = node.validate_inputs(**values)
        if verdict is not True:
            raise Refused(str(verdict))
    try:
        result = node.execute(**values)
    except (ValueError, RuntimeError) as e:
        raise Refused(str(e)) from e
    return getattr(result, "result", result)[0]


# ------------------------------------------------------------------------------------------------
# sampling through ComfyUI's own nodes
# ------------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What one run samples with: a model, a SAMPLER and how its GUIDER is made."""

    model: object
    sampler: object | None = None  # None: the KSampler path with euler
    guider_node: object | None = None  # a GUIDER node of the pack; None: ComfyUI's CFGGuider
    cfg: float = CFG
    extra: dict = field(default_factory=dict)

    def guider(self, cfg: float):
        positive, negative = conditioning_pair(self.family)
        if self.guider_node is not None:
            values = {"model": self.model, "positive": positive, "negative": negative, "cfg": cfg}
            return execute(self.guider_node, values)
        return custom.CFGGuider().get_guider(self.model, positive, negative, cfg)[0]

    @property
    def family(self) -> str:
        return self.extra["family"]


def conditioning_pair(family: str):
    return conditioning(family, 1), conditioning(family, 2)


def latent_dict(family: str, batch: int = 1, batch_index: list[int] | None = None) -> dict:
    out = {"samples": latent(family, batch)}
    if batch_index is not None:
        out["batch_index"] = batch_index
    return out


def euler():
    return comfy.samplers.sampler_object("euler")


def full_sigmas(setup: Setup) -> torch.Tensor:
    return custom.BasicScheduler().get_sigmas(setup.model, "normal", STEPS, 1.0)[0]


_BASE: dict = {}


def base_output(family: str, mode: str = "single", cfg: float = CFG, dtype: torch.dtype = torch.float32):
    """Plain CFG with euler on the family's tiny model (cached)."""
    key = (family, mode, cfg, dtype)
    if key not in _BASE:
        _BASE[key] = run(Setup(tiny_model(family, dtype=dtype), extra={"family": family}), mode=mode, cfg=cfg)
    return _BASE[key]


def run(setup: Setup, mode: str = "single", cfg: float | None = None, lat: dict | None = None) -> torch.Tensor:
    """Sample one latent. ``mode``: single | split_ksampler | split_custom."""
    cfg = setup.cfg if cfg is None else cfg
    lat = lat or latent_dict(setup.family)
    positive, negative = conditioning_pair(setup.family)
    try:
        if setup.sampler is None and setup.guider_node is None and mode != "split_custom":
            if mode == "single":
                return nodes.common_ksampler(setup.model, SEED, STEPS, cfg, "euler", "normal", positive, negative,
                                             lat)[0]["samples"]
            advanced = nodes.KSamplerAdvanced()
            head = advanced.sample(setup.model, "enable", SEED, STEPS, cfg, "euler", "normal", positive, negative,
                                   lat, 0, SPLIT_AT, "enable")[0]
            return advanced.sample(setup.model, "disable", SEED, STEPS, cfg, "euler", "normal", positive, negative,
                                   head, SPLIT_AT, STEPS, "disable")[0]["samples"]
        guider = setup.guider(cfg)
        sampler = setup.sampler or euler()
        sigmas = full_sigmas(setup)
        sample = custom.SamplerCustomAdvanced().sample
        if mode == "single":
            return sample(custom.Noise_RandomNoise(SEED), guider, sampler, sigmas, lat)[0]["samples"]
        high, low = custom.SplitSigmas().get_sigmas(sigmas, SPLIT_AT)
        head = sample(custom.Noise_RandomNoise(SEED), guider, sampler, high, lat)[0]
        return sample(custom.Noise_EmptyNoise(), guider, sampler, low, head)[0]["samples"]
    except Refused:
        raise
    except (ValueError, RuntimeError) as e:
        raise Refused(str(e)) from e


# ------------------------------------------------------------------------------------------------
# one (node, family) case, its runs cached across the checks
# ------------------------------------------------------------------------------------------------

class Case:
    def __init__(self, node, family: str, loras_folder, dtype: torch.dtype = torch.float32):
        self.node, self.family, self.kind = node, family, kind_of(node)
        self.label = label_of(node)
        self.loras_folder = loras_folder
        self.dtype = dtype
        self.cfg = float(getattr(node, "TYPICAL_CFG", CFG))
        self.refusal: str | None = None
        self.runs: dict = {}
        try:
            self.setup = self.make_setup(tiny_model(family, dtype=dtype))
        except Refused as e:
            self.refusal = str(e)

    def make_setup(self, model, over=None) -> Setup:
        """The setup sampling with this node; ``over``: another node's setup to build on (stacking)."""
        extra = {"family": self.family}
        if self.kind == "model patch":
            base = over.model if over is not None else model
            patched = execute(self.node, node_inputs(self.node, self.family, base, self.loras_folder, self.dtype))
            return Setup(patched, sampler=over.sampler if over else None, cfg=self.cfg, extra=extra)
        if self.kind == "sampler":
            sampler = execute(self.node, node_inputs(self.node, self.family, model, self.loras_folder, self.dtype))
            return Setup(over.model if over is not None else model, sampler=sampler, cfg=self.cfg, extra=extra)
        return Setup(over.model if over is not None else model, guider_node=self.node, cfg=self.cfg, extra=extra)

    def base(self) -> Setup:
        """What the node is compared with: the plain model with euler and ComfyUI's CFGGuider."""
        return Setup(tiny_model(self.family, dtype=self.dtype), extra={"family": self.family})

    def sample(self, name: str, setup_fn, **kwargs) -> torch.Tensor:
        if name not in self.runs:
            try:
                self.runs[name] = run(setup_fn(), **kwargs)
            except Refused as e:
                self.runs[name] = e
        result = self.runs[name]
        if isinstance(result, Refused):
            raise result
        return result


_CASES: dict = {}


@pytest.fixture(scope="module")
def loras_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("conformance_loras")


def case_for(node, family, loras_folder, dtype=torch.float32) -> Case:
    key = (node, family, dtype)
    if key not in _CASES:
        _CASES[key] = Case(node, family, loras_folder, dtype)
    return _CASES[key]


def assert_clear_refusal(case: Case, message: str) -> None:
    assert message and len(message) > 30, f"{case.label} on {case.family}: refusal without a useful message"
    assert case.label.lower() in message.lower(), f"the refusal does not name {case.label}: {message}"


def node_output(case: Case) -> torch.Tensor | None:
    """The node's single run, or None after checking that it refused clearly."""
    if case.refusal is not None:
        assert_clear_refusal(case, case.refusal)
        print(f"{case.label} refuses {case.family} at the node: {case.refusal}")
        return None
    try:
        return case.sample("node", lambda: case.setup)
    except Refused as e:
        assert_clear_refusal(case, str(e))
        print(f"{case.label} refuses {case.family} when sampling: {e}")
        return None


def said_no_effect(records, case: Case) -> bool:
    """The pack logged, for this run, a message that names the node (e.g. 'no effect at cfg 1', 'nothing
    switched off')."""
    return any(case.label.lower() in r.getMessage().lower() for r in records if r.name == "guidance_kit")


# ------------------------------------------------------------------------------------------------
# the checks
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("node,family", CASES, ids=IDS)
def test_a_acts_or_refuses_with_a_message(node, family, loras_folder, caplog):
    caplog.set_level(logging.INFO, logger="guidance_kit")
    case = case_for(node, family, loras_folder)
    got = node_output(case)
    if got is None:
        return
    assert bool(torch.isfinite(got).all())
    if case.kind == "guider":
        # a guider is not a method: with a model carrying a plan it must give what the KSampler gives
        partner = case_for(PATCHES[0], family, loras_folder)
        if partner.refusal is None:
            through_guider = run(Setup(partner.setup.model, guider_node=node, extra={"family": family}))
            assert rel_diff(through_guider, run(partner.setup)) <= SAME
        assert rel_diff(got, base_output(family, cfg=case.cfg)) <= SAME  # and plain CFG without one
        return
    base = base_output(family, cfg=case.cfg)
    if rel_diff(got, base) > SAME:
        return
    assert said_no_effect(caplog.records, case), (
        f"{case.label} changed nothing on {family} at cfg {case.cfg} and said nothing: a silent no-op")


@pytest.mark.parametrize("node,family", CASES, ids=IDS)
def test_b_a_repeated_run_is_identical(node, family, loras_folder):
    case = case_for(node, family, loras_folder)
    first = node_output(case)
    if first is None:
        return
    again = run(case.setup)
    assert torch.equal(first, again), f"{case.label} on {family}: two identical runs differ"


@pytest.mark.parametrize("mode", ["split_ksampler", "split_custom"])
@pytest.mark.parametrize("node,family", CASES, ids=IDS)
def test_c_a_split_run_equals_one_call(node, family, mode, loras_folder):
    case = case_for(node, family, loras_folder)
    whole = node_output(case)
    if whole is None:
        return
    if mode == "split_ksampler" and (case.setup.sampler is not None or case.setup.guider_node is not None):
        mode = "split_custom"  # KSamplerAdvanced takes ComfyUI's sampler names and CFGGuider only
    split = run(case.setup, mode=mode)
    assert bool(torch.isfinite(split).all())
    difference = rel_diff(split, whole)
    state = getattr(node, "STATE_ACROSS_SAMPLER_CALLS", None)
    if state:
        # declared: this state restarts at each sampler call, so a split run may differ; it still samples
        print(f"{case.label} on {family}, {mode}: split vs single {difference:.2e} ({state})")
        return
    # the same steps through two sampler calls: the same guidance at the same sigma
    floor = rel_diff(base_output(family, mode), base_output(family))  # plain CFG's own split difference
    assert difference <= max(SAME, 10 * floor), (
        f"{case.label} on {family}: a run split at step {SPLIT_AT} of {STEPS} ({mode}) differs from one call by "
        f"{difference:.2e} (plain CFG: {floor:.2e})")


@pytest.mark.parametrize("node,family", CASES, ids=IDS)
def test_d_a_batch_equals_single_runs(node, family, loras_folder):
    case = case_for(node, family, loras_folder)
    if node_output(case) is None:
        return
    batch = run(case.setup, lat=latent_dict(family, BATCH, list(range(BATCH))))
    singles = torch.cat([run(case.setup, lat=latent_dict(family, 1, [i])) for i in range(BATCH)])
    difference = rel_diff(batch, singles)
    coupled = getattr(node, "BATCH_COUPLED", None)
    if coupled:
        print(f"{case.label} on {family}: batch of {BATCH} vs single runs {difference:.2e} ({coupled})")
        return
    assert difference <= SAME, f"{case.label} on {family}: a batch of {BATCH} differs from single runs by " \
                               f"{difference:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("node,family", CASES, ids=IDS)
def test_e_half_precision_outputs_are_finite(node, family, dtype, loras_folder):
    assert tiny_model(family, dtype=dtype).model.get_dtype() == dtype  # the network really runs in half precision
    case = case_for(node, family, loras_folder, dtype=dtype)
    got = node_output(case)
    if got is None:
        return
    assert bool(torch.isfinite(got).all()), f"{case.label} on a {dtype} {family} model gave NaN/inf"


@pytest.mark.parametrize("node,family", CASES, ids=IDS)
def test_f_at_cfg_one_it_acts_or_says_it_does_not(node, family, loras_folder, caplog):
    caplog.set_level(logging.INFO, logger="guidance_kit")
    case = case_for(node, family, loras_folder)
    if node_output(case) is None:
        return
    caplog.clear()
    got = run(case.setup, cfg=1.0)
    assert bool(torch.isfinite(got).all())
    if case.kind == "guider":
        assert rel_diff(got, base_output(family, cfg=1.0)) <= SAME  # plain CFG at 1 = the conditional prediction
        return
    if rel_diff(got, base_output(family, cfg=1.0)) > SAME:
        return
    assert said_no_effect(caplog.records, case), (
        f"{case.label} has no effect at cfg 1 on {family} and does not say so")


@pytest.mark.parametrize("node,family", CASES, ids=IDS)
def test_h_stacked_with_another_node_both_act(node, family, loras_folder, caplog):
    caplog.set_level(logging.INFO, logger="guidance_kit")
    case = case_for(node, family, loras_folder)
    alone = node_output(case)
    if alone is None:
        return
    partner_node = next(p for p in PATCHES if p is not node)
    partner = case_for(partner_node, family, loras_folder)
    if partner.refusal is not None:
        return
    partner_alone = node_output(partner)
    try:
        both = run(case.make_setup(None, over=partner.setup))  # the partner's model, then this node
    except Refused as e:
        named = case if case.label.lower() in str(e).lower() else partner
        assert_clear_refusal(named, str(e))  # e.g. two methods that both replace the uncond
        return
    if case.kind == "guider":
        assert rel_diff(both, partner_alone) <= SAME  # the guider samples the partner's plan as the KSampler does
        return
    assert rel_diff(both, alone) > SAME, f"{partner.label} does nothing when stacked with {case.label} on {family}"
    if rel_diff(both, partner_alone) <= SAME:  # as in (a): no effect is allowed only when the pack says so
        assert said_no_effect(caplog.records, case), \
            f"{case.label} does nothing when stacked after {partner.label} on {family} and says nothing"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("node,family", CASES, ids=IDS)
def test_i_prefix_shared_equals_unshared(node, family, dtype, loras_folder):
    case = case_for(node, family, loras_folder, dtype=dtype)
    got = node_output(case)
    if got is None or not prefix_fork.installed(case.setup.model):
        return
    unshared = case.setup.model.clone()
    prefix_fork.set_enabled(unshared, False)
    whole = run(Setup(unshared, sampler=case.setup.sampler, guider_node=case.setup.guider_node, cfg=case.cfg,
                      extra=case.setup.extra))
    difference = rel_diff(got.float(), whole.float())
    assert difference <= SAME, f"{case.label} on {family} ({dtype}): prefix shared differs from unshared by " \
                               f"{difference:.2e}"


def test_every_node_declares_only_known_exceptions():
    """Declared exceptions are reasons, not flags: a node that opts out says why (shown in the help)."""
    for node in NODES:
        for name in ("BATCH_COUPLED", "STATE_ACROSS_SAMPLER_CALLS"):
            value = getattr(node, name, None)
            assert value is None or (isinstance(value, str) and len(value) > 30), f"{node.__name__}.{name}"
        assert isinstance(getattr(node, "TYPICAL_CFG", CFG), (int, float))
