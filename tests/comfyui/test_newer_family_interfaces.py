"""The interfaces of families only newer ComfyUI builds, where the test ComfyUI has a model with the same one.

HunyuanVideo 1.5 (newer ComfyUI) is ComfyUI's HunyuanVideo class without a pooled vector (``vector_in`` None) and
with ByT5 glyph tokens appended to the text; HunyuanImage 2.1 in ComfyUI 0.3.64 is that class built the same way.
Flux 2 also has no ``vector_in`` (its modulation is computed once for all blocks, and its double blocks have no
``txt_mod``): NAG's pooled modulation must then install nothing instead of failing on the missing modules.
Newer-only classes the table refuses (Kandinsky 5, Qwen-Image 2.1) are refused at the node by class name."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import pytest
import torch

from guidance_kit.nodes import nag as N
from guidance_kit.nodes import perturbation as P
from guidance_kit.nodes.contributors import nag_modulation
from guidance_kit.nodes.runtime import families
from tests.comfyui.harness import ksample, out, rel_diff, tiny_model
from tests.comfyui.test_perturbation_nodes import pag

FAMILY = "hunyuan_image21"
CFG = 4.0
STEPS = 2


def text(seed: int, glyphs: int = 0, pooled: bool = True) -> list:
    g = torch.Generator().manual_seed(seed)
    extra = {"guidance": 3.5}
    if pooled:
        extra["pooled_output"] = torch.randn(1, 32, generator=g)
    if glyphs:
        extra["conditioning_byt5small"] = torch.randn(1, glyphs, 1472, generator=g)
    return [[torch.randn(1, 6, 64, generator=g), extra]]


def nag(model, negative):
    return out(N.NAGNode.execute(model, negative, N.AUTO, N.AUTO, N.AUTO, 0.0, 1.0, 0.0))


def test_the_hunyuanvideo_row_serves_the_class_without_a_pooled_vector():
    model = tiny_model(FAMILY)
    assert model.model.diffusion_model.vector_in is None and model.model.diffusion_model.byt5_in is not None
    assert families.family_of(model, "PAG").name == "HunyuanVideo"
    plain = ksample(model, FAMILY, CFG, STEPS, positive=text(1, glyphs=3), negative=text(2))
    guided = ksample(pag(model), FAMILY, CFG, STEPS, positive=text(1, glyphs=3), negative=text(2))
    assert torch.isfinite(guided).all() and rel_diff(guided, plain) > 1e-3


def test_nag_installs_no_pooled_modulation_without_a_pooled_embedder():
    base = tiny_model(FAMILY)
    model = nag(base, text(7))  # a negative with a pooled vector, on a model whose modulation reads none
    assert not any(isinstance(p, nag_modulation.TokenModulation) for p in model.object_patches.values())
    guided = ksample(model, FAMILY, 1.0, STEPS, positive=text(1), negative=text(2))
    plain = ksample(base, FAMILY, 1.0, STEPS, positive=text(1), negative=text(2))
    assert torch.isfinite(guided).all() and rel_diff(guided, plain) > 1e-3


def test_nag_with_byt5_glyph_tokens_stops_with_the_reason():
    model = nag(tiny_model(FAMILY), text(7))
    with pytest.raises(families.FamilyError, match=r"^NAG: the ByT5 glyph tokens of HunyuanImage 2\.1 / HunyuanVideo "
                                                   r"1\.5 .*negative prompt with cfg > 1"):
        ksample(model, FAMILY, 1.0, STEPS, positive=text(1, glyphs=3), negative=text(2))


@pytest.mark.parametrize("name, module, family", [
    ("Kandinsky5", "comfy.ldm.kandinsky5.model", "Kandinsky 5"),
    ("QwenImage21Transformer2DModel", "comfy.ldm.qwen_image21.model", "Qwen-Image 2.1"),
])
def test_newer_only_refused_families_are_named_at_the_node(name, module, family):
    net_class = type(name, (torch.nn.Module,), {"__module__": module})

    class Fake:
        class model:  # noqa: N801
            diffusion_model = net_class()

    assert any(row[0] == family and row[2].startswith("refused at the node") for row in families.NEWER_ONLY)
    with pytest.raises(ValueError, match=rf"^PAG: this model family has no block hook we support: {family}\. .*"
                                         rf"CFG-space methods"):
        P.PAGNode.execute(Fake, 2.0, "auto", "constant", 0.0, 1.0)
    with pytest.raises(ValueError, match=rf"^NAG: NAG has no attention hook for {family}\. "):
        nag(Fake, text(7))
