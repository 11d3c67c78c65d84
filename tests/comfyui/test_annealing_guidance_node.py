"""Annealing Guidance through ComfyUI's samplers on the embedded digits model (the shipped policy), with ComfyUI's
CFG++ sampler, stacked with another term, split over two sampler calls; refusals on other models; a user policy
file from the models folder (the authors' checkpoint format)."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import logging

import pytest
import torch

from guidance_kit.guiders.methods.annealing_guidance import GuidanceScalePolicy
from guidance_kit.nodes.annealing_guidance import POLICY_FOLDER, AnnealingGuidanceNode, policy_choices
from guidance_kit.nodes.cfg_methods import APGNode

from .harness import out, tiny_model

STEPS = 8


def sample(comfy_nodes, loaded, model, digits, cfg=3.0, seed=0, start=0, end=STEPS, latent=None, sampler="euler"):
    if latent is None:
        latent = {"samples": torch.zeros(len(digits), 1, 8, 8)}
    advanced = comfy_nodes.KSamplerAdvanced()
    noise = "enable" if start == 0 else "disable"
    leftover = "enable" if end < STEPS else "disable"
    return advanced.sample(model, noise, seed, STEPS, cfg, sampler, "normal", loaded.conditioning(digits),
                           loaded.null_conditioning(len(digits)), latent, start, end, leftover)[0]


def annealed(model, guidance_lambda=0.5, **inputs):
    return out(AnnealingGuidanceNode.execute(model, guidance_lambda, **inputs))


def logged_scales(caplog) -> str:
    return next(r.getMessage() for r in caplog.records if "chosen scale w_t per step" in r.getMessage())


def test_acts_logs_the_scales_and_lambda_orders_the_strength(comfy_nodes, loaded, caplog):
    plain = sample(comfy_nodes, loaded, loaded.patcher, [1, 8])["samples"]
    with caplog.at_level(logging.INFO, logger="guidance_kit"):
        low = sample(comfy_nodes, loaded, annealed(loaded.patcher, 0.0), [1, 8])["samples"]
    report = logged_scales(caplog)
    assert report.count("σ ") == STEPS and "policy digits_guidance_policy.safetensors, λ 0" in report
    high = sample(comfy_nodes, loaded, annealed(loaded.patcher, 1.0), [1, 8])["samples"]
    assert float((low - plain).abs().max()) > 1e-2 and float((high - low).abs().max()) > 1e-2
    assert torch.equal(high, sample(comfy_nodes, loaded, annealed(loaded.patcher, 1.0), [1, 8])["samples"])
    # the sampler's cfg is replaced: the same result at cfg 1 and cfg 7
    at_one = sample(comfy_nodes, loaded, annealed(loaded.patcher, 1.0), [1, 8], cfg=1.0)["samples"]
    assert torch.allclose(at_one, high, atol=1e-5)


def test_pairs_with_the_cfg_pp_sampler(comfy_nodes, loaded, caplog):
    model = annealed(loaded.patcher, 0.6)
    with caplog.at_level(logging.INFO, logger="guidance_kit"):
        cfg_pp = sample(comfy_nodes, loaded, model, [4, 9], sampler="euler_cfg_pp")["samples"]
    assert logged_scales(caplog).count("σ ") == STEPS
    euler = sample(comfy_nodes, loaded, model, [4, 9])["samples"]
    assert torch.isfinite(cfg_pp).all() and float((cfg_pp - euler).abs().max()) > 1e-2  # re-noised with uncond


def test_split_run_equals_one_call(comfy_nodes, loaded):
    model = annealed(loaded.patcher, 0.7)
    whole = sample(comfy_nodes, loaded, model, [5], seed=2)["samples"]
    head = sample(comfy_nodes, loaded, model, [5], seed=2, end=3)
    tail = sample(comfy_nodes, loaded, model, [5], seed=2, start=3, latent=head)["samples"]
    assert torch.allclose(whole, tail, atol=1e-5)


def test_stacks_with_apg(comfy_nodes, loaded):
    apg = out(APGNode.execute(loaded.patcher, 0.0, 15.0, -0.5))
    apg_only = sample(comfy_nodes, loaded, apg, [2])["samples"]
    both = sample(comfy_nodes, loaded, annealed(apg, 0.5), [2])["samples"]
    alone = sample(comfy_nodes, loaded, annealed(loaded.patcher, 0.5), [2])["samples"]
    assert float((both - apg_only).abs().max()) > 1e-2 and float((both - alone).abs().max()) > 1e-2


@pytest.fixture
def policy_folder(tmp_path, monkeypatch):
    """A temporary models/guidance_policies; ComfyUI's file-list cache forgets it afterwards."""
    import folder_paths

    folder = tmp_path / POLICY_FOLDER
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, POLICY_FOLDER, ([str(folder)], {".safetensors", ".pt"}))
    folder_paths.filename_list_cache.pop(POLICY_FOLDER, None)
    yield folder
    folder_paths.filename_list_cache.pop(POLICY_FOLDER, None)


def test_other_models_need_a_policy_file_from_the_models_folder(policy_folder):
    import folder_paths

    with pytest.raises(ValueError, match="Annealing Guidance: the pack's policy is trained for the embedded digits"):
        annealed(tiny_model("sd15"), 0.5)
    folder = policy_folder
    torch.manual_seed(0)
    policy = GuidanceScalePolicy(hidden_size=8, n_layers=1)
    torch.save({"config": {"guidance_scale_model": {"hidden_size": 8, "n_layers": 1, "output_size": 1}},
                "guidance_scale_model": policy.state_dict()}, folder / "authors.pt")
    (folder / "broken.pt").write_bytes(b"\x80\x04not a checkpoint")
    folder_paths.filename_list_cache.pop(POLICY_FOLDER, None)
    assert {"authors.pt", "broken.pt"} <= set(policy_choices())
    model = annealed(tiny_model("sd15"), 0.5, policy="authors.pt")
    assert model.model_options["transformer_options"] is not None
    with pytest.raises(ValueError, match="Annealing Guidance: policy broken.pt refused: .*weights_only=True"):
        annealed(tiny_model("sd15"), 0.5, policy="broken.pt")
    with pytest.raises(ValueError, match="no policy file 'gone.pt'"):
        annealed(tiny_model("sd15"), 0.5, policy="gone.pt")


def test_the_training_script_is_reproducible(tmp_path):
    from safetensors.torch import load_file

    from guidance_kit.digits.train_guidance_policy import PolicyTrainConfig, train_policy
    from guidance_kit.guiders.methods.annealing_guidance import load_policy

    config = PolicyTrainConfig(steps=3, batch_size=8)
    first = train_policy(config, tmp_path / "a.safetensors", progress=False)
    second = train_policy(config, tmp_path / "b.safetensors", progress=False)
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_policy(first)(500.0, torch.tensor([3.0, 9.0]), 0.5).shape == (2,)
