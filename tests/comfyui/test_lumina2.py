"""Lumina2 / NextDiT (Lumina Image 2.0, Z-Image, Z-Image-Turbo) beyond the shared per-family node tests
(test_perturbation_nodes, test_nag_node, test_scfg_node run it with the other families): batches of two latents,
fp16/bf16, stacks with CFG-space terms and with NAG at cfg 1 (Z-Image-Turbo's setting), the layer patches'
own pieces (rotary shift, Z-Image's per-caption padding, the caption refiner per caption), the family
defaults, and the clear errors."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import comfy.sample
import pytest
import torch
from comfy.ldm.flux.layers import EmbedND

from guidance_kit.nodes import cfg_methods as cm
from guidance_kit.nodes import nag as N
from guidance_kit.nodes.runtime import blocks as model_blocks
from guidance_kit.nodes.runtime import families, lumina, rows
from tests.comfyui.harness import conditioning, counted, ksample, latent, out, rel_diff, tiny_model
from tests.comfyui.test_perturbation_nodes import pag, s2g, seg, slg, tpg

FAMILY = "lumina2"
CFG = 4.0
STEPS = 3
BLOCK_METHODS = {"PAG": pag, "SEG": seg, "TPG": tpg, "SLG": slg, "S2G": s2g}


def nag(model, negative=None, scale=N.AUTO):
    negative = negative if negative is not None else conditioning(FAMILY, 7, tokens=5)
    return out(N.NAGNode.execute(model, negative, scale, N.AUTO, N.AUTO, 0.0, 1.0, 0.0))


def with_every_method(model):
    for method in BLOCK_METHODS.values():
        model = method(model)
    return nag(model)


def test_the_family_row_and_its_defaults():
    model = tiny_model(FAMILY)
    spec = families.family_of(model, "PAG")
    assert spec.name == "Lumina2" and spec.block_hook == "layers" and spec.joint and spec.scfg
    layout = model_blocks.block_layout(model, spec)
    assert layout.dit_blocks == {"single": 4}
    assert families.auto_layers("PAG", spec, layout) == "single 2"
    assert families.auto_layers("S²-Guidance", spec, layout) == "single all"
    assert families.nag_defaults(model, spec) == families.NAG_LUMINA2
    assert (families.NAG_LUMINA2.scale, families.NAG_LUMINA2.tau, families.NAG_LUMINA2.alpha) == (2.0, 2.5, 0.25)


def test_every_method_and_nag_in_one_batched_call_per_step_with_a_batch_of_two():
    base = tiny_model(FAMILY)
    model, counter = counted(with_every_method(base))
    both = ksample(model, FAMILY, CFG, STEPS, batch=2, seed=3)
    assert torch.isfinite(both).all()
    assert counter.calls == STEPS and counter.batches == [2 * 7] * STEPS  # 2 latents × (cond, uncond, 5 branches)
    assert rel_diff(both, ksample(base, FAMILY, CFG, STEPS, batch=2, seed=3)) > 1e-3
    # each latent of the batch is guided as if alone (noise from ComfyUI's batch_index)
    full_noise = comfy.sample.prepare_noise(latent(FAMILY, 2), 3)
    first = comfy.sample.sample(model, full_noise[:1], STEPS, CFG, "euler", "normal", conditioning(FAMILY, 1),
                                conditioning(FAMILY, 2), latent(FAMILY, 1), disable_pbar=True, seed=3)
    assert rel_diff(both[:1], first) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models_give_finite_outputs(dtype):
    base = tiny_model(FAMILY, dtype=dtype)
    assert base.model.get_dtype() == dtype
    for method in BLOCK_METHODS.values():
        assert torch.isfinite(ksample(method(base), FAMILY, CFG, STEPS)).all()
    assert torch.isfinite(ksample(nag(base), FAMILY, 1.0, STEPS)).all()


def test_nag_stacks_with_cfg_zero_star_apg_and_pag_and_with_pag_at_cfg_one():
    """Lumina 2.0 with CFG: NAG, CFG-Zero*, APG and PAG in one batched call per step. Z-Image-Turbo's setting
    (cfg 1): NAG as the negative prompt with a perturbation term on top, still one call per step."""
    base = tiny_model(FAMILY)
    with_nag = nag(base)
    stacked, counter = counted(pag(out(cm.APGNode.execute(out(cm.CFGZeroStarNode.execute(with_nag, True, 0)),
                                                          0.0, 15.0, -0.5))))
    result = ksample(stacked, FAMILY, CFG, STEPS)
    assert torch.isfinite(result).all()
    assert counter.batches == [3] * STEPS  # the prompt (with NAG), the uncond and the PAG branch
    assert rel_diff(result, ksample(with_nag, FAMILY, CFG, STEPS)) > 1e-3
    at_cfg_one, counter = counted(pag(with_nag))
    result = ksample(at_cfg_one, FAMILY, 1.0, STEPS)
    assert counter.batches == [2] * STEPS  # no uncond at cfg 1
    assert rel_diff(result, ksample(with_nag, FAMILY, 1.0, STEPS)) > 1e-3  # PAG acts on top of NAG


def test_the_rotary_shift_equals_the_tables_of_the_shifted_positions():
    """shift_positions moves every token after ``start`` back by ``shift`` on the sequence axis only; padding at
    position 0 keeps the identity."""
    embed = EmbedND(dim=32, theta=10000.0, axes_dim=[8, 12, 12])
    caption, start, shift = 9, 5, 4
    ids = torch.zeros(1, caption + 6 + 2, 3)
    ids[0, :caption, 0] = torch.arange(caption) + 1.0
    ids[0, caption:caption + 6, 0] = caption + 1.0
    ids[0, caption:caption + 6, 1] = torch.tensor([0.0, 0, 1, 1, 2, 2])
    ids[0, caption:caption + 6, 2] = torch.tensor([0.0, 1, 0, 1, 0, 1])  # the last two tokens: padding at 0
    expected_ids = ids.clone()
    expected_ids[0, start:caption + 6, 0] -= shift
    table = embed(ids).movedim(1, 2)
    shifted = lumina.shift_positions(table, start, shift)
    assert torch.allclose(shifted, embed(expected_ids).movedim(1, 2), atol=1e-5)
    assert torch.equal(shifted[:, :start], table[:, :start]) and torch.equal(shifted[:, -2:], table[:, -2:])


class _ZImageLike(torch.nn.Module):
    """The parts of newer ComfyUI's Z-Image NextDiT that CaptionPadding reads."""

    def __init__(self):
        super().__init__()
        self.pad_tokens_multiple = 4
        self.cap_pad_token = torch.nn.Parameter(torch.full((1, 3), 9.0))
        self.cap_embedder = torch.nn.Identity()


class _Nag:
    def __init__(self, positive, negative):
        self.positive_tokens, self.negative_tokens = positive, negative
        self.context_tokens = positive + negative
        self.layouts = {}


def test_z_image_captions_are_padded_per_caption_under_nag():
    net = _ZImageLike()
    patch = lumina.CaptionPadding(net.cap_embedder, net)
    feats = torch.arange(5 * 3, dtype=torch.float32).reshape(1, 5, 3)  # 3 prompt tokens, 2 negative tokens
    assert torch.equal(patch(feats), feats)  # outside a NAG forward: unchanged
    nag_forward = _Nag(3, 2)
    with rows.published({}, {lumina.NAG_KEY: nag_forward}):
        padded = patch(feats)
        assert torch.equal(patch(feats), feats)  # once per forward (reference captions are not the prompt's)
    assert torch.equal(padded[:, :3], feats[:, :3]) and torch.equal(padded[:, 4:], feats[:, 3:])
    assert torch.equal(padded[0, 3], torch.full((3,), 9.0))  # the prompt's own pad token before the negative's
    assert (nag_forward.positive_tokens, nag_forward.negative_tokens) == (4, 4)  # the model pads the negative to 4


def test_the_nag_key_is_the_contributors():
    from guidance_kit.nodes.contributors import nag as nag_contributor

    assert lumina.NAG_KEY == nag_contributor.NAG_KEY


def test_captions_with_different_padding_per_row_are_a_clear_error():
    spec = families.exact_spec(families.FAMILIES, tiny_model(FAMILY).model.diffusion_model)
    x = torch.zeros(2, 6 + 4, 8)
    mask = torch.zeros(2, 10)
    mask[1, 5] = -1e4
    with pytest.raises(families.FamilyError, match="different padding lengths"):
        lumina.caption_length(spec, x, mask, 4, None)
    assert lumina.caption_length(spec, x, torch.zeros(2, 10), 4, None) == 6
    assert lumina.caption_length(spec, torch.zeros(1, 6 + 32, 8), None, 30, 32) == 6  # Z-Image's image padding


def test_nodes_leave_the_input_model_untouched():
    base = tiny_model(FAMILY)
    before = dict(base.object_patches)
    with_every_method(base)
    assert dict(base.object_patches) == before
    assert ksample(base, FAMILY, CFG, 1).shape == latent(FAMILY).shape


class _NewerLayer(torch.nn.Module):
    """A main layer with newer ComfyUI's signature (timestep_zero_index; block_index set in transformer_options)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, x_mask, freqs_cis, adaln_input=None, timestep_zero_index=None, transformer_options=None):
        self.calls.append((timestep_zero_index, (transformer_options or {}).get("block_index")))
        return x * 2


def test_the_layer_patch_passes_newer_comfyuis_arguments_through():
    from guidance_kit.nodes.contributors.block_perturbation import CONTRIBUTOR

    spec = families.exact_spec(families.FAMILIES, tiny_model(FAMILY).model.diffusion_model)
    layer = _NewerLayer()
    patch = lumina.LayerForward(layer, spec, ("single", 0), None).with_contributor(CONTRIBUTOR)
    x = torch.ones(2, 6 + 4, 3)
    options = {"block_index": 0, "block_type": "double"}
    assert torch.equal(patch(x, None, torch.zeros(1), None, timestep_zero_index=None, transformer_options=options),
                       x * 2)  # no branch in this forward: the layer runs as it is
    assert layer.calls == [(None, 0)]
    # a forward whose second chunk is a skip-layer branch on this layer: the block path, the same arguments
    from guidance_kit.guiders.plan import Branch
    from guidance_kit.nodes.contributors.block_perturbation import Perturbation
    from guidance_kit.nodes.runtime.rows import BRANCH_MAP_KEY
    from guidance_kit.nodes.runtime.slots import LATENT_SHAPE_KEY

    skip = Perturbation("SLG", "skip", "Lumina2", blocks=(("single", 0),))
    options = {"block_index": 0, "cond_or_uncond": [0, 2], BRANCH_MAP_KEY: {2: Branch("slg", "cond", skip)},
               LATENT_SHAPE_KEY: (2, 16, 4, 4)}
    out = patch(x, None, torch.zeros(1), None, timestep_zero_index=None, transformer_options=options)
    assert torch.equal(out[0], x[0] * 2) and torch.equal(out[1], x[1])  # the branch row keeps its input
    assert layer.calls[-1] == (None, 0)
