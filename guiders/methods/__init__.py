"""The plan's methods, one module each: its settings (a frozen dataclass deriving from a role in
``guiders/plan.py``), the functions the combine calls for that role, its declarations, its formula and
its paper. A node imports the class and adds an instance to the plan; nothing else lists the methods.

Stage 0, evaluations:     ``adaptive_guidance`` (AG / LinearAG), ``cfg_rejection`` (evaluation controls);
                          ``cads`` (condition transform, applied inside the model call)
Stage 1, the uncond:      ``icg``, ``uncond_model`` (sources); ``tcfg``, ``cfg_zero_star``, ``skimmed_cfg``
                          (rewrites)
Stage 2, CFG direction:   ``fdg`` (band split), ``cfg_schedule`` (increment), ``fbg``, ``beta_cfg``,
                          ``power_law_cfg``, ``scfg``, ``skimmed_cfg``, ``online_feedback_cfg``,
                          ``annealing_guidance`` (weight factors), ``apg``, ``adg``, ``smc_cfg``
                          (direction transforms; the last two read the final weight: ``weighted_transform``)
Stage 3, extra terms:     ``extra_guidance`` (perturbation guidance, Autoguidance), ``perp_neg``, ``dng`` (a
                          negative prompt of their own; ``posterior`` is FBG's and DNG's shared kernel),
                          ``momentum_guidance`` (no branch: it extrapolates the guided velocity, after the additive
                          terms)
Stage 4, corrections:     ``dynamic_thresholding``, ``rescale``; ``cfg_zero_star``'s zero-init takes whole steps
                          over
"""
