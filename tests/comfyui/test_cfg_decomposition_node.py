"""CFG Decomposition on the embedded digits model through ComfyUI's samplers: the class of each row read from
the conditioning, all weights 1 = CFG, batches, split runs, stacking, and the refusals."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import logging

import pytest
import torch

from guidance_kit.digits import model as digits_model
from guidance_kit.digits.linear_statistics import STATISTICS_FILE
from guidance_kit.guiders.methods.cfg_decomposition import LinearStatistics
from guidance_kit.nodes.cfg_methods import APGNode
from guidance_kit.nodes.runtime.engine import GuidanceRuntimeError
from guidance_kit.nodes.seed_papers import CFGDecompositionNode, classes_of_conditioning

from .harness import out, tiny_model

STEPS = 8


def sample(comfy_nodes, loaded, model, digits, cfg=4.0, seed=0, start=0, end=STEPS, latent=None):
    if latent is None:
        latent = {"samples": torch.zeros(len(digits), 1, 8, 8)}
    positive = loaded.conditioning(digits)
    negative = loaded.null_conditioning(len(digits))
    advanced = comfy_nodes.KSamplerAdvanced()
    noise = "enable" if start == 0 else "disable"
    leftover = "enable" if end < STEPS else "disable"
    return advanced.sample(model, noise, seed, STEPS, cfg, "euler", "normal", positive, negative, latent, start, end,
                           leftover)[0]


def decomposed(loaded, mean=1.0, positive=1.0, negative=1.0, model=None):
    return out(CFGDecompositionNode.execute(model or loaded.patcher, mean, positive, negative))


def test_shipped_statistics_are_the_digits_models(loaded):
    stats = LinearStatistics.load(STATISTICS_FILE)
    assert stats.class_means.shape == (digits_model.NUM_DIGITS, 64)
    assert torch.equal(stats.class_embedding.float(), loaded.class_embedding.float())
    assert bool((torch.linalg.eigvalsh(stats.class_covariances) > 0).all())


def test_all_weights_one_is_cfg_and_the_components_act(comfy_nodes, loaded, caplog):
    plain = sample(comfy_nodes, loaded, loaded.patcher, [3, 7])["samples"]
    with caplog.at_level(logging.INFO, logger="guidance_kit"):
        same = sample(comfy_nodes, loaded, decomposed(loaded), [3, 7])["samples"]
    assert torch.allclose(same, plain, atol=1e-4)
    assert any("CFG Decomposition: mean norm over" in r.getMessage() for r in caplog.records)
    for weights in ((1.0, 1.0, 0.0), (1.0, 2.0, 1.0), (0.0, 1.0, 1.0)):
        changed = sample(comfy_nodes, loaded, decomposed(loaded, *weights), [3, 7])["samples"]
        assert float((changed - plain).abs().max()) > 1e-2, weights


def test_rows_get_their_own_class_and_runs_repeat(comfy_nodes, loaded):
    model = decomposed(loaded, 0.5, 2.0, 0.0)
    batch = sample(comfy_nodes, loaded, model, [3, 7], seed=4)["samples"]
    assert torch.equal(batch, sample(comfy_nodes, loaded, model, [3, 7], seed=4)["samples"])
    # the same noise rows with the classes swapped: each row follows its own conditioning row
    swapped = sample(comfy_nodes, loaded, model, [7, 3], seed=4)["samples"]
    plain = sample(comfy_nodes, loaded, loaded.patcher, [3, 7], seed=4)["samples"]
    assert not torch.allclose(batch, swapped, atol=1e-3)
    assert float((batch - plain).abs().max()) > 1e-2


def test_split_run_equals_one_call(comfy_nodes, loaded):
    model = decomposed(loaded, 1.0, 1.5, 0.5)
    whole = sample(comfy_nodes, loaded, model, [5], seed=2)["samples"]
    head = sample(comfy_nodes, loaded, model, [5], seed=2, end=3)
    tail = sample(comfy_nodes, loaded, model, [5], seed=2, start=3, latent=head)["samples"]
    assert torch.allclose(whole, tail, atol=1e-5)


def test_stacks_with_apg_in_either_order(comfy_nodes, loaded):
    apg = out(APGNode.execute(loaded.patcher, 0.0, 15.0, -0.5))
    apg_only = sample(comfy_nodes, loaded, apg, [2])["samples"]
    first = sample(comfy_nodes, loaded, decomposed(loaded, 1.0, 1.0, 0.0, model=apg), [2])["samples"]
    second_model = out(APGNode.execute(decomposed(loaded, 1.0, 1.0, 0.0), 0.0, 15.0, -0.5))
    second = sample(comfy_nodes, loaded, second_model, [2])["samples"]
    assert torch.allclose(first, second, atol=1e-6)
    assert float((first - apg_only).abs().max()) > 1e-2


def test_other_models_and_conditionings_are_refused(comfy_nodes, loaded):
    with pytest.raises(ValueError, match="CFG Decomposition: it needs the Gaussian statistics"):
        CFGDecompositionNode.execute(tiny_model("sd15"), 1.0, 1.0, 0.0)
    table = loaded.class_embedding
    entry = {"cross_attn": loaded.conditioning([4, 9])[0][0]}
    assert classes_of_conditioning([entry], table, 5, "CFG Decomposition").tolist() == [4, 9, 4, 9, 4]
    with pytest.raises(GuidanceRuntimeError, match="null class"):
        classes_of_conditioning([{"cross_attn": loaded.null_conditioning()[0][0]}], table, 1, "CFG Decomposition")
    with pytest.raises(GuidanceRuntimeError, match="matches no class"):
        classes_of_conditioning([{"cross_attn": torch.randn(1, 1, 64)}], table, 1, "CFG Decomposition")
    with pytest.raises(GuidanceRuntimeError, match="several entries"):
        classes_of_conditioning([entry, entry], table, 1, "CFG Decomposition")
    # sampled with a conditioning that is not a class row: refused while sampling, naming the node
    model = decomposed(loaded, 1.0, 1.0, 0.0)
    foreign = [[torch.randn(1, 1, 64), {}]]
    with pytest.raises(Exception, match="CFG Decomposition: a row of the positive conditioning matches no class"):
        comfy_nodes.common_ksampler(model, 0, 2, 4.0, "euler", "normal", foreign, loaded.null_conditioning(),
                                    {"samples": torch.zeros(1, 1, 8, 8)})


def test_statistics_script_is_reproducible(tmp_path, capsys):
    from safetensors.torch import load_file

    from guidance_kit.digits import linear_statistics

    args = ["--per-class", "3", "--steps", "2"]
    assert linear_statistics.main(args + ["--out", str(tmp_path / "a.safetensors")]) == 0
    assert linear_statistics.main(args + ["--out", str(tmp_path / "b.safetensors")]) == 0
    assert "saved" in capsys.readouterr().out
    first, second = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    stats = LinearStatistics.load(tmp_path / "a.safetensors")
    assert stats.class_means.shape == (digits_model.NUM_DIGITS, 64) and stats.class_embedding is not None
    assert linear_statistics.main(["--per-class", "1"]) == 2
