"""ComfyUI tier: real ComfyUI, real samplers, tiny random-weight models from ComfyUI's own classes.

Every test module imports ``tests.comfyui.harness`` first, which skips the module with the reason
(shown in the summary) when no ComfyUI checkout is found (see tests/conftest.py).
"""

import pytest


@pytest.fixture(scope="module")
def loaded():  # test_pack_loading.py has a fixture of its own by this name (the pack loaded into ComfyUI)
    """The embedded digits model (UNet, class conditionings), loaded on the CPU once per test module."""
    import torch

    from guidance_kit.digits import model as digits_model

    cpu = torch.device("cpu")
    return digits_model.load_digits_model(digits_model.UNET_WEIGHTS, cpu, cpu)


@pytest.fixture(scope="module")
def comfy_nodes():
    """ComfyUI's ``nodes`` module (common_ksampler, the core node classes)."""
    import nodes

    return nodes
