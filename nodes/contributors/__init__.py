"""The methods' parts in the runtime's slots, one module each: block/attention perturbations
(``block_perturbation``), time input (``time_input``: TSG), condition (``condition``: ICG), NAG (``nag``,
``nag_modulation``), S-CFG's readers (``regions``), weight deltas (``row_delta``, built by ``weight_delta``)
and second models (``second_model``). Each defines its branch effect (a ``guiders.plan.BranchEffect``), its
``Contributor`` or wrapper, and an ``install`` for the node."""
