"""Guidance math: pure torch (and kornia), no ComfyUI import.

Modules, one per family of operations:

- ``tensor_ops``      per-sample dot/norm/std in float32
- ``progress``        sampling progress from a sigma schedule
- ``schedules``       weight schedules, windows, the beta curve
- ``uncond_rewrites`` TCFG tangential damping, CFG-Zero* optimised scale
- ``projection``      APG momentum, norm clip, parallel/orthogonal projection
- ``frequency``       Laplacian pyramids for FDG (4-D and 5-D latents)
- ``normalization``   β-CFG adaptive factor, RescaleCFG std match
- ``plan``            the GuidancePlan data model and its combine stages
- ``combine``         evaluation of a plan on one step's predictions
- ``samplers``        CFG++ DPM++ 2M/3M SDE and PCG sampling loops (model given as callables)
"""
