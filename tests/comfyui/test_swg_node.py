"""SWG on real ComfyUI models (tiny random weights): the crop rows of every window run as one extra model call
per step and equal separate forwards of each crop stitched independently; one full-size window is plain CFG;
spatial conditioning is refused."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import comfy.samplers
import pytest
import torch

from guidance_kit.nodes import spatial_methods as S
from guidance_kit.nodes.contributors import sliding_window
from guidance_kit.nodes.runtime.rows import BRANCH_MAP_KEY
from tests.comfyui.harness import counted, ksample, out, rel_diff, tiny_model

CFG = 4.0
STEPS = 3


def swg(model, scale=1.0, fraction=0.75, per_side=2):
    return out(S.SWGNode.execute(model, scale, fraction, per_side, "constant", 0.0, 1.0))


def crops_one_by_one(self, model, conds, x, sigma, model_options):
    """Reference: each window's crop in its own calc_cond_batch call, stitched by plain loops."""
    options = dict(model_options)
    options["transformer_options"] = {k: v for k, v in options["transformer_options"].items() if k != BRANCH_MAP_KEY}
    h, w = x.shape[-2:]
    ch = max(self.align, int(h * self.fraction) // self.align * self.align)
    cw = max(self.align, int(w * self.fraction) // self.align * self.align)
    total = [torch.zeros_like(x) for _ in conds]
    count = torch.zeros(h, w)
    for y in sorted({0, h - ch}) if self.per_side == 2 else [0]:
        for z in sorted({0, w - cw}) if self.per_side == 2 else [0]:
            preds = comfy.samplers.calc_cond_batch(model, conds, x[..., y:y + ch, z:z + cw], sigma, options)
            for t, p in zip(total, preds):
                t[..., y:y + ch, z:z + cw] += p
            count[y:y + ch, z:z + cw] += 1
    return [t / count for t in total]


@pytest.mark.parametrize("family", ["sd15", "flux", "sd3", "wan21"])
def test_crop_rows_in_one_call_equal_separate_crop_forwards(family, monkeypatch):
    base = tiny_model(family)
    model, counter = counted(swg(base))
    batched = ksample(model, family, CFG, STEPS)
    assert counter.batches == [2, 4] * STEPS  # cond + uncond, then the four crops as rows of one call
    assert rel_diff(batched, ksample(base, family, CFG, STEPS)) > 1e-3
    monkeypatch.setattr(sliding_window.CropWindows, "run", crops_one_by_one)
    apart, apart_counter = counted(swg(base))
    separate = ksample(apart, family, CFG, STEPS)
    assert apart_counter.batches == [2, 1, 1, 1, 1] * STEPS
    assert rel_diff(batched, separate) <= 1e-4


def test_one_full_window_is_plain_cfg_and_acts_at_cfg_one():
    base = tiny_model("sd15")
    assert rel_diff(ksample(swg(base, fraction=1.0, per_side=1), "sd15", CFG, STEPS),
                    ksample(base, "sd15", CFG, STEPS)) < 1e-5
    assert rel_diff(ksample(swg(base, scale=2.0), "sd15", 1.0, STEPS), ksample(base, "sd15", 1.0, STEPS)) > 1e-3


def test_spatial_conditioning_is_refused():
    effect = sliding_window.CropWindows("SWG", 0.75, 2, 2)
    conds = [[{"model_conds": {"c_concat": object()}}]]
    with pytest.raises(sliding_window.CropError, match="SWG: the conditioning carries spatial inputs"):
        effect.run(None, conds, torch.zeros(1, 4, 8, 8), torch.ones(1), {})
