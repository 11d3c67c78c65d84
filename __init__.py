"""Guidance Kit: training-free guidance methods for ComfyUI (CFG schedules, β-CFG, APG, TCFG,
CFG-Zero*, FDG, rescale, ...), composable in one batched guidance plan.

ComfyUI loads this package and calls ``comfy_entrypoint`` (V3 node API). The ComfyUI-side modules
are imported only then, so ``guiders/`` (pure torch) can be used and tested without ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import GuidanceKitExtension

    return GuidanceKitExtension()
