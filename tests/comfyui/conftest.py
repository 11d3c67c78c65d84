"""ComfyUI tier: real ComfyUI, real samplers, tiny random-weight models from ComfyUI's own classes.

Every test module imports ``tests.comfyui.harness`` first, which skips the module with the reason
(shown in the summary) when no ComfyUI checkout is found (see tests/conftest.py).
"""
