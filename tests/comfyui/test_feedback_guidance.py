"""Perp-Neg, DNG, FBG and CADS on real ComfyUI models (tiny random weights): Perp-Neg gives core's PerpNegGuider
result through the plain KSampler path and stacks with CFG-Zero* (core's breaks), the negative prompt rides in
the one batched call, DNG and FBG act per sample, CADS is deterministic per seed."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest
import torch
from comfy_extras import nodes_perpneg

from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes import feedback_guidance as F
from guidance_kit.nodes import guider as gd
from guidance_kit.nodes import perturbation as P
from tests.comfyui.harness import (
    conditioning,
    counted,
    custom_advanced,
    ksample,
    out,
    rel_diff,
    tiny_model,
)

STEPS = 4
CFG = 5.0
FAMILIES = ("sd15", "flux")


def perp_neg(model, negative, neg_scale=1.0):
    return out(F.PerpNegNode.execute(model, negative, neg_scale, "constant", 0.0, 1.0))


def dng(model, negative, scale=5.0, prior=0.2):
    return out(F.DNGNode.execute(model, negative, scale, prior, 1.0, 0.0, 0.9, "constant", 0.0, 1.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_perp_neg_equals_core_perp_neg_guider(family):
    positive, empty, negative = conditioning(family, 1), conditioning(family, 2), conditioning(family, 3)
    core_guider = nodes_perpneg.Guider_PerpNeg(tiny_model(family))
    core_guider.set_conds(positive, negative, empty)
    core_guider.set_cfg(CFG, 0.7)
    core = custom_advanced(core_guider, family, steps=STEPS)
    ours = ksample(perp_neg(tiny_model(family), negative, 0.7), family, CFG, steps=STEPS, positive=positive,
                   negative=empty)
    plain = ksample(tiny_model(family), family, CFG, steps=STEPS, positive=positive, negative=empty)
    assert rel_diff(ours, plain) > 1e-3  # the negative acts
    assert rel_diff(ours, core) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_the_negative_rides_in_the_one_batched_call(family):
    negative = conditioning(family, 3)
    for make in (perp_neg, dng):
        model, counter = counted(make(tiny_model(family), negative))
        ksample(model, family, CFG, steps=STEPS)
        assert counter.calls == STEPS  # one forward per step
        assert set(counter.batches) == {3}  # cond, uncond and the negative prompt


def test_perp_neg_stacks_with_cfg_zero_star_apg_and_pag():
    family = "flux"
    negative = conditioning(family, 3)
    base = tiny_model(family)
    partners = {
        "CFG-Zero*": lambda m: out(cm.CFGZeroStarNode.execute(m, True, 0)),
        "APG": lambda m: out(cm.APGNode.execute(m, *[i.default for i in cm.APGNode.GET_SCHEMA().inputs[1:]])),
        "PAG": lambda m: out(P.PAGNode.execute(m, *[i.default for i in P.PAGNode.GET_SCHEMA().inputs[1:]])),
    }
    perp_alone = ksample(perp_neg(base, negative), family, CFG, steps=STEPS)
    for name, add in partners.items():
        partner = ksample(add(base), family, CFG, steps=STEPS)
        both = ksample(perp_neg(add(base), negative), family, CFG, steps=STEPS)
        reversed_chain = ksample(add(perp_neg(base, negative)), family, CFG, steps=STEPS)
        assert rel_diff(both, partner) > 1e-3 and rel_diff(both, perp_alone) > 1e-3, name
        assert rel_diff(both, reversed_chain) < 1e-5, name  # node order carries no meaning


def test_dng_and_fbg_act_per_sample_and_say_what_they_ignore(caplog):
    family = "sd15"
    negative = conditioning(family, 3)
    plain = ksample(tiny_model(family), family, CFG, steps=STEPS, batch=2)
    guided = ksample(dng(tiny_model(family), negative), family, CFG, steps=STEPS, batch=2)
    assert rel_diff(guided, plain) > 1e-4
    fbg = out(F.FBGNode.execute(tiny_model(family), "fbg", 0.5, 0.5, 0.4, 10.0, 0.0, 0.0))
    with caplog.at_level("WARNING", logger="guidance_kit"):
        first = ksample(fbg, family, CFG, steps=STEPS, batch=2)
        other_cfg = ksample(fbg, family, 9.0, steps=STEPS, batch=2)
    assert rel_diff(first, other_cfg) < 1e-5  # 'fbg' mode sets its own weight: the sampler's cfg does not act
    assert any("FBG" in r.getMessage() and "cfg" in r.getMessage() for r in caplog.records)
    hybrid = out(F.FBGNode.execute(tiny_model(family), "hybrid", 0.5, 0.5, 0.4, 20.0, 0.0, 0.0))
    assert rel_diff(ksample(hybrid, family, 9.0, steps=STEPS), ksample(hybrid, family, CFG, steps=STEPS)) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_cads_is_deterministic_per_seed(family):
    def cads(noise_scale, seed):
        return out(F.CADSNode.execute(tiny_model(family), 0.6, 0.9, noise_scale, 1.0, True, True, seed))

    plain = ksample(tiny_model(family), family, CFG, steps=STEPS)
    first = ksample(cads(0.25, 0), family, CFG, steps=STEPS)
    assert torch.equal(first, ksample(cads(0.25, 0), family, CFG, steps=STEPS))
    assert rel_diff(first, plain) > 1e-4
    assert rel_diff(ksample(cads(0.25, 1), family, CFG, steps=STEPS), first) > 1e-4  # another seed, other noise


def test_bad_inputs_are_refused_with_the_node_name():
    model = tiny_model("sd15")
    with pytest.raises(ValueError, match="Perp-Neg"):
        F.PerpNegNode.execute(model, "not a conditioning", 1.0, "constant", 0.0, 1.0)
    assert "CADS" in F.CADSNode.validate_inputs(tau1=0.9, tau2=0.6)
    with pytest.raises(ValueError, match="Perp-Neg"):
        perp_neg(perp_neg(model, conditioning("sd15", 3)), conditioning("sd15", 3))


def test_cfg_rejection_reports_the_batch_and_replace_copies_the_strongest(caplog):
    family = "sd15"
    plain = ksample(tiny_model(family), family, CFG, steps=STEPS, batch=4)
    with caplog.at_level("WARNING", logger="guidance_kit"):
        reported = ksample(out(F.CFGRejectionNode.execute(tiny_model(family), "report", 0.3, 0.5)), family, CFG,
                           steps=STEPS, batch=4)
    assert rel_diff(reported, plain) < 1e-5  # report only
    lines = [r.getMessage() for r in caplog.records if "CFG-Rejection" in r.getMessage()]
    assert lines and "0:" in lines[0] and "3:" in lines[0] and "weakest" in lines[0]
    replaced = ksample(out(F.CFGRejectionNode.execute(tiny_model(family), "replace", 0.3, 0.5)), family, CFG,
                       steps=STEPS, batch=4)
    same = [[torch.allclose(replaced[i], replaced[j], atol=1e-4) for j in range(4)] for i in range(4)]
    assert sum(sum(row) for row in same) == 4 + 2 * 3  # the two weakest and the strongest are one image
    kept = [i for i in range(4) if sum(same[i]) == 1]
    assert len(kept) == 1 and torch.allclose(replaced[kept], plain[kept], atol=1e-4)


def test_perp_neg_through_the_guidance_guider_equals_the_ksampler():
    family = "sd15"
    positive, empty, negative = conditioning(family, 1), conditioning(family, 2), conditioning(family, 3)
    model = perp_neg(tiny_model(family), negative)
    through_guider = custom_advanced(out(gd.GuidanceGuiderNode.execute(model, positive, empty, CFG)), family,
                                     steps=STEPS)
    assert rel_diff(through_guider, ksample(model, family, CFG, steps=STEPS, positive=positive, negative=empty)) < 1e-5


def test_compare_rows_give_perp_neg_and_dng_a_confusable_digit_as_their_own_negative():
    from guidance_kit.comparison.methods import parse_row
    from guidance_kit.comparison.remote_digits import row_prompt
    from guidance_kit.comparison.runs import CONFUSED_WITH

    for text, node_type, field in (("perp_neg", "GuidanceKit_PerpNeg", "perpneg_negative"),
                                   ("dng", "GuidanceKit_DNG", "dng_negative")):
        prompt, _ = row_prompt(parse_row(text), 3.0, 0, 4, "euler", "normal", 1, (3, 8))
        samplers = [n for n in prompt.values() if n["class_type"] == "KSampler"]
        assert len(samplers) == 2
        for sampler, digit in zip(samplers, (3, 8)):
            method = prompt[sampler["inputs"]["model"][0]]
            assert method["class_type"] == node_type
            negative = prompt[method["inputs"][field][0]]
            assert negative["inputs"]["digit"] == CONFUSED_WITH[digit] and method["inputs"][field][1] == 1
            assert prompt[sampler["inputs"]["negative"][0]]["inputs"]["digit"] == 3  # the sampler keeps the null class
    plain, _ = row_prompt(parse_row("apg"), 3.0, 0, 4, "euler", "normal", 1, (3, 8))
    assert sum(n["class_type"] == "GuidanceKit_APG" for n in plain.values()) == 1  # other rows: one shared chain
