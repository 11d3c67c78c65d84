"""The embedded digits model and the compare command in real ComfyUI: training, loader and decode nodes,
the grid on the embedded model, its errors, and the server mode against a ComfyUI started here."""

# isort: off
from tests.comfyui import harness  # noqa: F401  (first: ComfyUI on sys.path, or skip the module without it)
# isort: on
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from PIL import Image

from tests.conftest import COMFYUI_PATH, REPO

pytest.importorskip("sklearn", reason="scikit-learn provides the digits data set (pip install scikit-learn)")

from guidance_kit import compare  # noqa: E402
from guidance_kit.digits import model as digits_model  # noqa: E402
from guidance_kit.digits import train  # noqa: E402
from guidance_kit.digits.classifier import load_classifier  # noqa: E402
from guidance_kit.digits.metrics import classifier_margin  # noqa: E402
from guidance_kit.nodes.digits_nodes import DigitsDecode, DigitsModelLoader  # noqa: E402

from .harness import out  # noqa: E402


def run_compare(argv, capsys) -> tuple[int, str, str]:
    code = compare.main(argv + ["--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

def test_training_script_runs_a_few_steps_reproducibly(tmp_path, capsys):
    args = ["--steps", "3", "--batch-size", "16", "--no-progress"]
    assert train.main(args + ["--out", str(tmp_path / "a.safetensors")]) == 0
    assert "saved" in capsys.readouterr().out
    assert train.main(args + ["--out", str(tmp_path / "b.safetensors")]) == 0
    loaded = digits_model.load_digits_model(tmp_path / "a.safetensors", torch.device("cpu"), torch.device("cpu"))
    assert loaded.metadata["train_steps"] == "3"
    assert loaded.class_embedding.shape == (digits_model.NUM_DIGITS + 1, digits_model.CONTEXT_DIM)
    from safetensors.torch import load_file

    first, second = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    fresh = digits_model.build_base_model().diffusion_model.state_dict()
    assert any(not torch.equal(fresh[k], first[digits_model.UNET_PREFIX + k]) for k in fresh)
    with pytest.raises(SystemExit):
        train.main(["--steps", "lots"])


def test_missing_or_foreign_weights_are_clear_errors(tmp_path):
    with pytest.raises(digits_model.DigitsWeightsError, match="train"):
        digits_model.load_digits_model(tmp_path / "nothing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(digits_model.DigitsWeightsError, match="not a digits model"):
        digits_model.load_digits_model(tmp_path / "foreign.safetensors")


# ------------------------------------------------------------------------------------------------
# the nodes in ComfyUI's KSampler path
# ------------------------------------------------------------------------------------------------

def sample_with_ksampler(comfy_nodes, digit: int, cfg: float, batch: int = 8, seed: int = 0, model=None):
    loaded = DigitsModelLoader.execute(digit)
    loaded_model, positive, negative = out(loaded, 0), out(loaded, 1), out(loaded, 2)
    latent = comfy_nodes.EmptyLatentImage().generate(digits_model.EMPTY_LATENT_SIZE, digits_model.EMPTY_LATENT_SIZE,
                                                     batch)[0]
    return comfy_nodes.common_ksampler(model or loaded_model, seed, 20, cfg, "euler", "normal", positive, negative,
                                       latent)[0]


def test_loader_node_samples_the_requested_digit_through_ksampler(comfy_nodes):
    classifier = load_classifier()
    for digit in (0, 4, 7):
        samples = sample_with_ksampler(comfy_nodes, digit, cfg=4.0)["samples"]
        assert samples.shape == (8, 1, 8, 8)  # the 64×64 EmptyLatentImage became the model's 1×8×8 latent
        logits, _ = classifier.predict(samples.clamp(-1, 1))
        assert (logits.argmax(1) == digit).float().mean() >= 0.75, f"digit {digit}"


def test_guidance_strengthens_the_class_and_pack_nodes_act_on_the_model(comfy_nodes):
    from guidance_kit.nodes.perturbation import PAGNode

    classifier = load_classifier()

    def margin(samples, digit):
        logits, _ = classifier.predict(samples["samples"].clamp(-1, 1))
        return classifier_margin(logits, torch.full((logits.shape[0],), digit))

    unguided = sample_with_ksampler(comfy_nodes, 5, cfg=1.0, batch=16)
    guided = sample_with_ksampler(comfy_nodes, 5, cfg=5.0, batch=16)
    assert margin(guided, 5) > margin(unguided, 5) + 1.0
    model = out(DigitsModelLoader.execute(5), 0)
    pag = out(PAGNode.execute(model, scale=3.0, layers="auto", schedule="constant", start_percent=0.0,
                              end_percent=1.0))
    with_pag = sample_with_ksampler(comfy_nodes, 5, cfg=1.0, batch=16, model=pag)
    assert not torch.allclose(with_pag["samples"], unguided["samples"])


def test_decode_node_gives_a_viewable_image():
    latents = torch.linspace(-1.5, 1.5, 64).reshape(1, 1, 8, 8)
    image = out(DigitsDecode.execute({"samples": latents}, 4))
    assert image.shape == (1, 32, 32, 3)
    assert image.min() >= 0 and image.max() <= 1
    assert image[0, 0, 0, 0] == 1.0 and image[0, -1, -1, 0] == 0.0  # paper white, ink black, clipped
    with pytest.raises(ValueError, match="Empty Latent Image of 64"):
        DigitsDecode.execute({"samples": torch.zeros(1, 4, 8, 8)}, 4)


# ------------------------------------------------------------------------------------------------
# the compare command in this process
# ------------------------------------------------------------------------------------------------

def test_grid_on_the_embedded_model_at_tiny_size(tmp_path, capsys):
    target = tmp_path / "grid.png"
    code, text, _ = run_compare(["--rows", "cfg", "apg:momentum=0", "tcfg+pag:scale=2", "--scales", "1", "4",
                                 "--samples", "2", "--digits", "0-2", "--steps", "4", "--out", str(target),
                                 "--threads", "1"], capsys)
    assert code == 0
    picture = Image.open(target)
    assert picture.size[0] > 2 * 3 * 8 * 4 and picture.size[1] > 3 * 8 * 4
    lines = [line for line in text.splitlines() if line.startswith(("CFG ", "APG", "TCFG"))]
    assert len(lines) == 6, text
    cfg_one = next(line for line in lines if line.startswith("CFG ") and "cfg 1 " in line)
    apg_one = next(line for line in lines if line.startswith("APG") and "cfg 1 " in line)
    apg_four = next(line for line in lines if line.startswith("APG") and "cfg 4 " in line)
    assert cfg_one.split()[3:9] == apg_one.split()[3:9]  # at cfg 1 APG has no direction to act on
    assert apg_one.split()[3:9] != apg_four.split()[3:9]


def test_every_method_of_the_metrics_report_runs_on_the_embedded_model(tmp_path, capsys):
    from guidance_kit.comparison.methods import ALL_METHODS, parse_row

    code, text, err = run_compare(["--rows", *ALL_METHODS, "--scales", "1", "3", "--samples", "1", "--digits", "0-1",
                                   "--steps", "6", "--out", str(tmp_path / "all.png")], capsys)
    assert code == 0, err
    table = {}
    for row in map(parse_row, ALL_METHODS):
        for scale in ("1", "3"):
            line = next(line for line in text.splitlines() if line.startswith(row.label + " ")
                        and f"cfg {scale} " in line)
            table[(row.label, scale)] = line[len(row.label):].split()[2:8]
    assert table[("NAG", "1")] != table[("CFG", "1")]  # NAG acts at cfg 1 (the null class as its negative)
    assert table[("APG", "3")] != table[("CFG", "3")]
    # and every method acts on the embedded model (a row equal to plain CFG would be a silent no-op)
    from guidance_kit.comparison.runs import EmbeddedRunner

    runner = EmbeddedRunner(steps=6, samples_per_class=1, digits=(0, 1))
    plain = runner.samples(parse_row("cfg"), 3.0, 0)
    idle = [text for text in ALL_METHODS[1:]
            if (runner.samples(parse_row(text), 3.0, 0) - plain).abs().max() < 1e-3]
    assert not idle, f"these methods did not change the samples at cfg 3: {idle}"


def test_sampler_rows_and_the_row_cfg_setting(tmp_path, capsys):
    from guidance_kit.comparison.methods import parse_row
    from guidance_kit.comparison.runs import EmbeddedRunner

    runner = EmbeddedRunner(steps=4, samples_per_class=1, digits=(3, 8))
    plain_at_one = runner.samples(parse_row("cfg"), 1.0, 0)
    assert torch.equal(runner.samples(parse_row("apg:cfg=1"), 7.0, 0), plain_at_one)
    assert torch.equal(runner.samples(parse_row("pag:scale=0,cfg=1"), 5.0, 0), plain_at_one)
    # PCG with no corrector step is the conditional DDIM sampler: its γ (the cfg) does not matter
    assert torch.equal(runner.samples(parse_row("pcg:corrector_steps=0"), 1.0, 0),
                       runner.samples(parse_row("pcg:corrector_steps=0"), 4.0, 0))
    assert not torch.equal(runner.samples(parse_row("pcg"), 1.0, 0), runner.samples(parse_row("pcg"), 4.0, 0))
    cfgpp = runner.samples(parse_row("cfgpp_2m:eta=0"), 5.0, 0)
    assert cfgpp.shape == plain_at_one.shape and torch.isfinite(cfgpp).all()


def test_autoguidance_on_the_embedded_model_with_its_weak_version(tmp_path, capsys):
    from guidance_kit.comparison.methods import MethodSpecError, apply_row, parse_row
    from guidance_kit.comparison.runs import EmbeddedRunner

    cpu = torch.device("cpu")
    main = digits_model.load_digits_model(digits_model.UNET_WEIGHTS, cpu, cpu)
    weak = digits_model.load_digits_model(digits_model.WEAK_UNET_WEIGHTS, cpu, cpu)
    assert torch.equal(weak.class_embedding, main.class_embedding)  # both read the same CONDITIONING
    assert int(weak.metadata["train_steps"]) < int(main.metadata["train_steps"])
    # the training option that made it keeps the given class embedding frozen
    target = tmp_path / "weak.safetensors"
    assert train.main(["--steps", "2", "--batch-size", "8", "--no-progress", "--class-embedding",
                       str(digits_model.UNET_WEIGHTS), "--out", str(target)]) == 0
    capsys.readouterr()
    assert torch.equal(digits_model.load_digits_model(target, cpu, cpu).class_embedding, main.class_embedding)
    # the compare row: scale 0 is exactly CFG (the weak model is not run), scale 1 guides
    runner = EmbeddedRunner(steps=4, samples_per_class=1, digits=(3, 8))
    plain = runner.samples(parse_row("cfg"), 3.0, 0)
    assert torch.equal(runner.samples(parse_row("autoguidance:scale=0"), 3.0, 0), plain)
    assert not torch.equal(runner.samples(parse_row("autoguidance"), 3.0, 0), plain)
    # the loader node's weak weights, and no second model: a clear error
    weak_node = out(DigitsModelLoader.execute(3, "digits weak (for Autoguidance)"), 0)
    assert torch.equal(weak_node.model.diffusion_model.input_blocks[0][0].weight,
                       weak.patcher.model.diffusion_model.input_blocks[0][0].weight)
    with pytest.raises(MethodSpecError, match="needs a second model"):
        apply_row(main.patcher.clone(), parse_row("autoguidance"), 3.0)


def test_grid_columns_can_be_seeds(tmp_path, capsys):
    code, text, _ = run_compare(["--rows", "cfg", "--scales", "3", "--seeds", "0", "1", "--samples", "1",
                                 "--digits", "1", "--steps", "3", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0
    assert "seed 0" in text and "seed 1" in text
    cells = [line.split()[3:] for line in text.splitlines() if line.startswith("CFG ")]
    assert len(cells) == 2 and cells[0] != cells[1]  # another seed, other digits


@pytest.mark.parametrize("argv,message", [
    (["--rows", "cfg", "nope"], "unknown method 'nope'"),
    (["--rows", "apg:etta=1"], "APG has no input 'etta'"),
    (["--rows", "fdg:scales={scale"], "unbalanced"),
    (["--rows", "pcg+cfgpp"], "two samplers"),
    (["--rows", "apg:cfg=high"], "is not a number"),
    (["--rows", "slg:start_percent=0.5,end_percent=0.52"], "no step of this run falls inside"),
    (["--rows", "cfg", "--scales", "2", "3", "--seeds", "0", "1"], "give one --seeds"),
    (["--sampler", "no_such_sampler"], "not a ComfyUI sampler"),
    (["--set", "3.cfg=4"], "server mode"),
    (["--checkpoint", "missing_model.safetensors", "--prompt", "a fox"], "not found in ComfyUI's checkpoint"),
    (["--workflow", "digits.api.json"], "needs both --server URL and --workflow"),  # --server alone: the digits rows
])
def test_compare_errors_name_the_fix(argv, message, capsys, tmp_path):
    code, _, err = run_compare(argv + ["--out", str(tmp_path / "x.png"), "--steps", "2", "--samples", "1"], capsys)
    assert code == 2
    assert message in err


def test_invalid_workflow_and_unreachable_server(tmp_path, capsys):
    ui_like = tmp_path / "ui.json"
    ui_like.write_text(json.dumps({"nodes": [], "links": []}))
    code, _, err = run_compare(["--server", "http://127.0.0.1:9", "--workflow", str(ui_like)], capsys)
    assert code == 2 and "UI workflow" in err
    api = tmp_path / "api.json"
    api.write_text(json.dumps(digits_workflow()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    code, _, err = run_compare(["--server", f"http://127.0.0.1:{free_port}", "--workflow", str(api)], capsys)
    assert code == 3 and "cannot reach ComfyUI" in err


def test_missing_comfyui_is_a_clear_error(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("COMFYUI_PATH", None)
    result = subprocess.run([sys.executable, str(REPO / "compare.py"), "--comfyui", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    # a named path is never replaced by another checkout (e.g. the ComfyUI this pack sits in)
    assert "is not a ComfyUI checkout" in result.stderr and "COMFYUI_PATH" in result.stderr


def test_no_comfyui_anywhere_is_a_clear_error(tmp_path):
    from guidance_kit.digits import comfy_setup

    env = {"HOME": str(tmp_path)}
    try:
        saved = {k: os.environ.pop(k, None) for k in ("COMFYUI_PATH", "HOME")}
        os.environ.update(env)
        candidates = comfy_setup.comfyui_candidates()
        if any(comfy_setup.is_comfyui(path) for path, _ in candidates):
            pytest.skip("this pack sits inside a ComfyUI checkout: there is always one to find")
        with pytest.raises(comfy_setup.ComfyUINotFound, match="no ComfyUI checkout found"):
            comfy_setup.find_comfyui()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def test_compare_runs_as_a_script_from_a_folder_with_hyphens(tmp_path):
    clone = tmp_path / "comfyui-guidance-kit"
    clone.symlink_to(REPO, target_is_directory=True)
    env = dict(os.environ, COMFYUI_PATH=str(COMFYUI_PATH), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(clone / "compare.py"), "--rows", "cfg", "seg", "--scales", "3",
                             "--steps", "2", "--digits", "0-1", "--samples", "2", "--threads", "1", "--no-progress",
                             "--out", str(tmp_path / "grid.png")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "grid.png").is_file()
    assert "SEG" in result.stdout


# ------------------------------------------------------------------------------------------------
# the server mode against a real ComfyUI started here
# ------------------------------------------------------------------------------------------------

def digits_workflow(digit: int = 3) -> dict:
    return {
        "1": {"class_type": "GuidanceKit_DigitsModelLoader", "inputs": {"digit": digit}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "3": {"class_type": "GuidanceKit_APG", "inputs": {"model": ["1", 0], "eta": 0.0, "norm_threshold": 0.0,
                                                          "momentum": -0.5}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 0, "steps": 4, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["1", 1], "negative": ["1", 2],
                                                   "latent_image": ["2", 0], "denoise": 1.0}},
        "5": {"class_type": "GuidanceKit_DigitsDecode", "inputs": {"samples": ["4", 0], "scale": 4}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comfyui_server(tmp_path_factory):
    """ComfyUI's main.py on 127.0.0.1 with this pack in its custom_nodes; stopped afterwards."""
    from guidance_kit.nodes import node_list

    if "GuidanceKit_DigitsModelLoader" not in {node.GET_SCHEMA().node_id for node in node_list()}:
        pytest.skip("the digits nodes are not registered yet: add nodes.digits_nodes.NODES to nodes/__init__.py")
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-guidance-kit").symlink_to(REPO, target_is_directory=True)
    port = _free_port()
    log_path = base / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
             str(base), "--disable-auto-launch", "--disable-all-custom-nodes", "--whitelist-custom-nodes",
             "comfyui-guidance-kit"],
            cwd=str(COMFYUI_PATH), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI did not start (exit {process.returncode}): "
                            f"{log_path.read_text(errors='replace')[-1500:]}")
            try:
                with urllib.request.urlopen(url + "/system_stats", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer on {url} within 240 s: "
                                f"{log_path.read_text(errors='replace')[-1500:]}")
                time.sleep(1.0)
        yield url, base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        shutil.rmtree(base / "custom_nodes", ignore_errors=True)


def test_server_mode_against_a_started_comfyui(comfyui_server, tmp_path, capsys):
    url, _ = comfyui_server
    with urllib.request.urlopen(url + "/object_info/GuidanceKit_DigitsModelLoader", timeout=30) as response:
        registered = json.loads(response.read())
    assert "GuidanceKit_DigitsModelLoader" in registered, "the pack's digits nodes are not registered"
    workflow = tmp_path / "digits.api.json"
    workflow.write_text(json.dumps(digits_workflow()))
    target = tmp_path / "server_grid.png"
    code, text, err = run_compare(["--server", url, "--workflow", str(workflow), "--set", "1.digit=7",
                                   "--row-set", "label=CFG 3.eta=1 3.momentum=0", "--row-set", "label=APG",
                                   "--scales", "1", "5", "--timeout", "120", "--out", str(target)], capsys)
    assert code == 0, err
    assert Image.open(target).size[0] > 100
    lines = [line for line in text.splitlines() if line.startswith(("CFG", "APG"))]
    assert len(lines) == 4, text
    statistics = {tuple(line.split()[:3]): line.split()[3:6] for line in lines}
    assert statistics[("CFG", "cfg", "1")] == statistics[("APG", "cfg", "1")]  # cfg 1: APG changes nothing
    assert statistics[("CFG", "cfg", "5")] != statistics[("APG", "cfg", "5")]


def test_server_mode_reports_a_rejected_workflow(comfyui_server, tmp_path, capsys):
    url, _ = comfyui_server
    broken = digits_workflow()
    broken["4"]["inputs"]["sampler_name"] = "no_such_sampler"
    workflow = tmp_path / "broken.api.json"
    workflow.write_text(json.dumps(broken))
    code, _, err = run_compare(["--server", url, "--workflow", str(workflow), "--timeout", "120",
                                "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2
    assert "rejected the prompt" in err and "sampler_name" in err
