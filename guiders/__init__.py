"""Guidance math and the guidance plan: pure torch (and kornia), no ComfyUI import.

- ``plan``            the GuidancePlan: an ordered registry of methods, the roles they play, the queries
- ``step``            one evaluation's inputs (StepInputs), its needs, the run-scoped GuidanceState
- ``combine``         runs a plan's roles stage by stage on one evaluation's predictions
- ``methods/``        one module per method: settings, stage functions, declarations, formula, paper
- ``tensor_ops``      per-sample dot/norm/std in float32
- ``progress``        sampling progress from a sigma schedule
- ``schedules``       weight schedules, windows, the beta curve
- ``adaptive``        Adaptive Guidance's criterion, per-sample switches and LinearAG's regression
- ``region_guidance`` S-CFG's attention maps, regions and region scales
- ``attention_ops``, ``branch_inputs``, ``layers``   the perturbation operators and layer selections
- ``samplers``        CFG++ DPM++ 2M/3M SDE and PCG sampling loops (model given as callables)
"""
