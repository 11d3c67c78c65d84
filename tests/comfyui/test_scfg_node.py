"""S-CFG on real ComfyUI models (tiny random weights): the region map changes the output vs plain CFG
inside one batched model call per step, the input model is untouched, it stacks with APG in a
Guidance Guider plan, unsupported families fail clearly, and the map node returns an image."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest
import torch

from guidance_kit.guiders.region_guidance import RegionMapStore
from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes import guider as gd
from guidance_kit.nodes import nag as N
from guidance_kit.nodes import scfg as S
from guidance_kit.nodes.contributors.regions import REGION_STORE_KEY
from guidance_kit.nodes.runtime import engine
from tests.comfyui.harness import conditioning, counted, custom_advanced, ksample, out, rel_diff, tiny_model

STEPS = 3
CFG = 5.0
# the tiny UNet's transformer layers sit at 1/1 and 1/2 of its 16×16 latent; the tiny DiTs' tokens at 1/2
DOWNSAMPLE = 2


def scfg(model, downsample=DOWNSAMPLE, order=4, reference=S.AUTO, rate_min=0.8, rate_max=3.0, max_weight=15.0,
         smoothing=True, dit_blocks=3, start=0.0, end=1.0, **optional):
    return out(S.SCFGNode.execute(model, downsample, order, reference, rate_min, rate_max, max_weight, smoothing,
                                  dit_blocks, start, end, **optional))


@pytest.mark.parametrize("family", ["sd15", "flux", "sd3", "chroma", "lumina2", "hunyuan_video", "wan21", "ltxv"])
def test_changes_the_output_in_one_call_per_step(family):
    base = tiny_model(family)
    plain = ksample(base, family, CFG, steps=STEPS)
    patched, counter = counted(scfg(base))
    guided = ksample(patched, family, CFG, steps=STEPS)
    assert torch.isfinite(guided).all()
    assert rel_diff(guided, plain) > 1e-3
    assert counter.calls == STEPS  # cond and uncond in one forward per step, maps read inside it
    assert all(b == 2 for b in counter.batches)
    store = patched.model_options[REGION_STORE_KEY]
    assert sorted(store.steps) == list(range(STEPS))


def test_input_model_is_not_mutated():
    base = tiny_model("sd15")
    before = (repr(sorted(base.model_options.keys())), repr(base.model_options.get("transformer_options")),
              dict(base.object_patches))
    patched = scfg(base)
    assert (repr(sorted(base.model_options.keys())), repr(base.model_options.get("transformer_options")),
            dict(base.object_patches)) == before
    assert engine.PLAN_KEY not in base.model_options
    assert "patches_replace" not in base.model_options.get("transformer_options", {})
    assert patched.model_options[engine.PLAN_KEY].get("scfg") is not None
    # the map store survives ModelPatcher clones (deep copies): later patches record into the same store
    assert patched.clone().model_options[REGION_STORE_KEY] is patched.model_options[REGION_STORE_KEY]


@pytest.mark.parametrize("family", ["sd15", "flux", "hunyuan_video"])
def test_rate_one_is_plain_cfg(family):
    """Clamping every factor to 1 must give back CFG exactly: the map path itself changes nothing."""
    base = tiny_model(family)
    plain = ksample(base, family, CFG, steps=STEPS)
    same = ksample(scfg(base, rate_min=1.0, rate_max=1.0), family, CFG, steps=STEPS)
    assert rel_diff(same, plain) < 1e-5


def test_window_outside_is_plain_cfg_and_reads_no_map():
    base = tiny_model("sd15")
    plain = ksample(base, "sd15", CFG, steps=4)
    patched = scfg(base, start=0.5, end=1.0)
    guided = ksample(patched, "sd15", CFG, steps=4)
    assert rel_diff(guided, plain) > 1e-4
    store = patched.model_options[REGION_STORE_KEY]
    assert sorted(store.steps) == [2, 3]  # p = i/3 ≥ 0.5


def test_stacks_with_apg_in_the_guidance_guider_in_any_order():
    family = "sd15"
    base = tiny_model(family)
    apg = (0.0, 15.0, -0.5)
    a = out(cm.APGNode.execute(scfg(base), *apg))
    b = scfg(out(cm.APGNode.execute(base, *apg)))
    results = []
    for model in (a, b):
        model, counter = counted(model)
        guider = out(gd.GuidanceGuiderNode.execute(model, conditioning(family, 1), conditioning(family, 2), CFG))
        results.append(custom_advanced(guider, family, steps=STEPS))
        assert counter.calls == STEPS
    assert torch.equal(results[0], results[1])  # node order carries no meaning
    apg_only = custom_advanced(out(gd.GuidanceGuiderNode.execute(out(cm.APGNode.execute(base, *apg)),
                                                                 conditioning(family, 1), conditioning(family, 2),
                                                                 CFG)), family, steps=STEPS)
    assert rel_diff(results[0], apg_only) > 1e-4


def test_batch_of_two():
    base = tiny_model("sd15")
    patched = scfg(base)
    both = ksample(patched, "sd15", CFG, steps=STEPS, batch=2)
    assert both.shape[0] == 2 and torch.isfinite(both).all()
    regions = patched.model_options[REGION_STORE_KEY].get(-1)
    assert regions.assignment.shape == (2, 8, 8) and regions.scale.shape == (2, 1, 16, 16)


def test_flux_single_blocks_are_read_too():
    """single_blocks reads the last single blocks' joint stream as well: other maps, still one call per step."""
    family = "flux"
    base = tiny_model(family)
    doubles_only = ksample(scfg(base, dit_blocks=1), family, CFG, steps=STEPS)
    patched, counter = counted(scfg(base, dit_blocks=1, single_blocks=2))
    with_singles = ksample(patched, family, CFG, steps=STEPS)
    assert torch.isfinite(with_singles).all() and counter.calls == STEPS
    assert rel_diff(with_singles, doubles_only) > 1e-4
    dit = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert {("single_block", 0), ("single_block", 1), ("double_block", 1)} <= set(dit)
    with pytest.raises(ValueError, match="has no single blocks"):
        scfg(tiny_model("sd3"), single_blocks=1)


def test_video_regions_are_per_frame():
    """HunyuanVideo (5-D latents): the maps are completed over all the video's tokens, then split per frame; each
    frame gets its own regions and scale map, and the factor multiplies the CFG weight frame by frame."""
    family = "hunyuan_video"
    patched = scfg(tiny_model(family))
    result = ksample(patched, family, CFG, steps=STEPS, batch=2)
    assert result.shape == (2, 16, 3, 8, 8) and torch.isfinite(result).all()
    regions = patched.model_options[REGION_STORE_KEY].get(-1)
    assert regions.assignment.shape == (2 * 3, 4, 4)  # (batch × frames) maps on the latent/2 grid
    assert regions.scale.shape == (2 * 3, 1, 8, 8)


@pytest.mark.parametrize("family", ["wan21", "ltxv"])
def test_cross_attention_video_families_read_per_frame_maps_and_stack_with_nag(family):
    """WAN and LTXV: the text map from the blocks' cross-attention modules, completed by the block's
    self-attention, one map per latent frame; with NAG the negative's tokens are left out of the map."""
    base = tiny_model(family)
    patched = scfg(base)
    ksample(patched, family, CFG, steps=STEPS)
    regions = patched.model_options[REGION_STORE_KEY].get(-1)
    frames = harness.LATENT_SHAPES[family][2]
    assert regions.assignment.shape[0] == frames and regions.tokens == 6  # the prompt's 6 tokens
    with_nag, counter = counted(scfg(N.NAGNode.execute(base, conditioning(family, 7, tokens=5), N.AUTO, N.AUTO,
                                                       N.AUTO, 0.0, 1.0, 0.0)[0]))
    result = ksample(with_nag, family, CFG, steps=STEPS)
    assert torch.isfinite(result).all() and counter.calls == STEPS
    assert with_nag.model_options[REGION_STORE_KEY].get(-1).tokens == 6  # not 6 + the NAG negative's 5


def test_unet_layers_limit_the_layers_read():
    family = "sd15"
    base = tiny_model(family)
    every = ksample(scfg(base), family, CFG, steps=STEPS)
    patched, counter = counted(scfg(base, unet_layers="middle all"))
    middle_only = ksample(patched, family, CFG, steps=STEPS)
    assert counter.calls == STEPS and rel_diff(middle_only, every) > 1e-4
    replaces = patched.model_options["transformer_options"]["patches_replace"]
    assert set(replaces["attn1"]) == set(replaces["attn2"]) == {("middle", 0, 0)}
    assert torch.equal(ksample(scfg(base, unet_layers="auto"), family, CFG, steps=STEPS), every)
    with pytest.raises(ValueError, match="^S-CFG: .*double"):
        scfg(base, unet_layers="double 3")


def test_unsupported_family_fails_at_the_node():
    with pytest.raises(ValueError, match="no cross-attention map hook we support: Qwen-Image"):
        scfg(tiny_model("qwen_image"))


def test_no_layer_at_the_resolution_fails_clearly_at_sampling():
    patched = scfg(tiny_model("sd15"), downsample=4)  # the tiny UNet's coarsest layers are at 1/2
    with pytest.raises(engine.GuidanceRuntimeError, match="no cross-attention map was recorded"):
        ksample(patched, "sd15", CFG, steps=2)


@pytest.mark.parametrize("show", ["regions", "scale"])
def test_map_node_shows_the_last_run(show):
    base = tiny_model("sd15")
    patched = scfg(base)
    with pytest.raises(ValueError, match="no S-CFG map recorded"):
        S.SCFGMapNode.execute(patched, {"samples": harness.latent("sd15")}, show, -1)
    samples = ksample(patched, "sd15", CFG, steps=STEPS)
    image = out(S.SCFGMapNode.execute(patched, {"samples": samples}, show, -1))
    assert image.shape == (1, 128, 128, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    first = out(S.SCFGMapNode.execute(patched, {"samples": samples}, show, 0))
    assert first.shape == image.shape
    with pytest.raises(ValueError, match="has no S-CFG node"):
        S.SCFGMapNode.execute(base, {"samples": samples}, show, -1)


def test_schema_and_help_pages():
    """The pack-loading checks (lead-owned test) for these two nodes, until they are registered there."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "web" / "docs"
    assert [n.GET_SCHEMA().node_id for n in S.NODES] == ["GuidanceKit_SCFG", "GuidanceKit_SCFGMap"]
    for node in S.NODES:
        schema = node.GET_SCHEMA()
        assert "·" in schema.display_name and schema.category == "sampling/guidance/attention"
        assert len(schema.description) > 80
        assert all(i.tooltip and len(i.tooltip) > 20 for i in schema.inputs)
        assert all(o.tooltip for o in schema.outputs)
        info = node.GET_NODE_INFO_V1()
        assert all("tooltip" in spec[1] for spec in info["input"]["required"].values())
        page = (docs / f"{schema.node_id}.md").read_text(encoding="utf-8")
        assert page.startswith("# ") and len(page) > 400
    assert S.SCFGNode.validate_inputs(reference="x") is not True
    assert S.SCFGNode.validate_inputs(rate_min=2.0, rate_max=1.0) is not True
    assert S.SCFGNode.validate_inputs() is True
    assert isinstance(RegionMapStore(), RegionMapStore)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_stacks_with_nag_in_the_same_call(family):
    """NAG appends its negative's tokens to the text: S-CFG must read the prompt's tokens only."""
    base = tiny_model(family)
    nagged = out(N.NAGNode.execute(base, conditioning(family, 7, tokens=5), N.AUTO, N.AUTO, N.AUTO, 0.0, 1.0, 0.0))
    model, counter = counted(scfg(nagged))
    guided = ksample(model, family, CFG, steps=STEPS)
    assert torch.isfinite(guided).all() and counter.calls == STEPS
    regions = model.model_options[REGION_STORE_KEY].get(-1)
    assert regions.tokens == 6  # the prompt's 6 tokens, not 6 + 5
    nag_only = ksample(nagged, family, CFG, steps=STEPS)
    assert rel_diff(guided, nag_only) > 1e-4


def test_single_token_conditioning_is_cfg_and_says_so_once(caplog):
    """The embedded digits model's one-token class context: one region, r = 1, exactly CFG, one warning."""
    import logging

    from guidance_kit.digits import sampling
    from guidance_kit.digits.model import cached_digits_model

    digits = cached_digits_model()
    caplog.set_level(logging.INFO, logger="guidance_kit")
    plain = sampling.sample(digits.patcher.clone(), digits, [3, 7], 0, CFG, steps=4)
    got = sampling.sample(scfg(digits.patcher.clone()), digits, [3, 7], 0, CFG, steps=4)
    assert rel_diff(got, plain) <= 1e-5
    warnings = [r for r in caplog.records if "single token" in r.getMessage()]
    assert len(warnings) == 1 and "exactly CFG" in warnings[0].getMessage()
