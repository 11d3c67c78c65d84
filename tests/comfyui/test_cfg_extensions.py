"""Issue 18 part A on real ComfyUI samplers and tiny models: Dynamic Thresholding, Skimmed CFG, power-law CFG,
ADG, Momentum Guidance and SMC-CFG stack with CFG-Zero*, APG and PAG in any node order, and the two methods
whose references are ComfyUI patches give what those patches give on the KSampler path."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest
import torch

from guidance_kit.nodes import cfg_extensions as ce
from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes import perturbation as pn
from guidance_kit.nodes.runtime.engine import plan_of
from tests.comfyui.harness import ksample, out, rel_diff, tiny_model
from tests.core.test_cfg_extensions import dynthres_reference, skimmed_reference

SAME = 1e-5
NODES = [ce.DynamicThresholdingNode, ce.SkimmedCFGNode, ce.PowerLawCFGNode, ce.ADGNode, ce.MomentumGuidanceNode,
         ce.SMCCFGNode]
# settings under which each acts at the test's cfg (the defaults of the two "damp above a scale" nodes are 7)
SETTINGS = {ce.DynamicThresholdingNode: {"mimic_scale": 2.0, "threshold_percentile": 0.98},
            ce.SkimmedCFGNode: {"skimming_cfg": 2.0}}
PARTNERS = [cm.CFGZeroStarNode, cm.APGNode, pn.PAGNode]
CFG = 6.0


def defaults(node) -> dict:
    return {i.id: i.default for i in node.GET_SCHEMA().inputs if getattr(i, "default", None) is not None}


def apply(model, node):
    return out(node.execute(model=model, **{**defaults(node), **SETTINGS.get(node, {})}))


def chain(model, *nodes):
    for node in nodes:
        model = apply(model, node)
    return model


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("node", NODES, ids=lambda n: n.LABEL)
def test_stacks_with_cfg_zero_star_apg_and_pag_in_any_order(node, family):
    base = tiny_model(family)
    alone = ksample(chain(base, node), family, CFG)
    partners = ksample(chain(base, *PARTNERS), family, CFG)
    stacked = ksample(chain(base, node, *PARTNERS), family, CFG)
    reversed_chain = ksample(chain(base, *reversed(PARTNERS), node), family, CFG)
    assert bool(torch.isfinite(stacked).all())
    assert torch.equal(stacked, reversed_chain)  # node order carries no meaning
    assert rel_diff(stacked, alone) > SAME and rel_diff(stacked, partners) > SAME  # every term still acts
    labels = plan_of(chain(base, node, *PARTNERS)).labels
    assert node.LABEL in labels and {"CFG-Zero*", "APG"} <= set(labels)


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("node", NODES, ids=lambda n: n.LABEL)
def test_a_batch_of_three_samples_and_repeats(node, family):
    model = chain(tiny_model(family), node)
    first = ksample(model, family, CFG, batch=3)
    assert first.shape[0] == 3 and bool(torch.isfinite(first).all())
    assert torch.equal(first, ksample(model, family, CFG, batch=3))  # nothing leaks from one run to the next


def test_skimmed_cfg_equals_the_reference_pre_cfg_patch_on_the_ksampler():
    """The reference node is a pre-CFG function editing cond and uncond; the pack's stage gives the same samples
    while leaving the conditional prediction alone."""
    base = tiny_model("sd15")

    def reference_patch(args):
        cond, uncond = args["conds_out"][0], args["conds_out"][1]
        x = args["input"]
        scale = args["cond_scale"]
        guided = skimmed_reference(x, cond, uncond, scale, 2.0)
        # hand ComfyUI's CFG a pair whose CFG is the reference's result: (guided, guided) with any scale
        return [guided, guided]

    reference = base.clone()
    reference.set_model_sampler_pre_cfg_function(reference_patch)
    ours = ksample(chain(base, ce.SkimmedCFGNode), "sd15", 9.0)
    assert rel_diff(ours, ksample(reference, "sd15", 9.0)) <= 1e-4
    assert rel_diff(ours, ksample(base, "sd15", 9.0)) > 1e-3


def test_dynamic_thresholding_equals_the_reference_cfg_function_on_the_ksampler():
    base = tiny_model("sd15")

    def reference_cfg(args):
        x = args["input"]
        cond, uncond = x - args["cond"], x - args["uncond"]
        return x - dynthres_reference(cond, uncond, args["cond_scale"], 2.0, 0.98, True)

    reference = base.clone()
    reference.set_model_sampler_cfg_function(reference_cfg)
    ours = ksample(chain(base, ce.DynamicThresholdingNode), "sd15", 9.0)
    assert rel_diff(ours, ksample(reference, "sd15", 9.0)) <= 1e-4
    assert rel_diff(ours, ksample(base, "sd15", 9.0)) > 1e-3


def test_momentum_guidance_acts_at_cfg_one_without_the_uncond_call():
    from tests.comfyui.harness import counted

    model, counter = counted(chain(tiny_model("flux"), ce.MomentumGuidanceNode))
    got = ksample(model, "flux", 1.0, steps=4)
    assert rel_diff(got, ksample(tiny_model("flux"), "flux", 1.0, steps=4)) > SAME
    assert counter.batches == [1] * 4  # one conditional evaluation per step


def test_dynamic_thresholding_refuses_an_unknown_mode_naming_itself():
    message = ce.DynamicThresholdingNode.validate_inputs(mode="clip")
    assert isinstance(message, str) and "Dynamic Thresholding" in message
    with pytest.raises(ValueError, match="Skimmed CFG"):
        out(ce.SkimmedCFGNode.execute(model=chain(tiny_model("sd15"), ce.SkimmedCFGNode), skimming_cfg=3.0,
                                      full_skim_negative=False, flipping_filter=True))
