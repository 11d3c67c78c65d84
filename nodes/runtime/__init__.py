"""The ComfyUI adapters, with nothing method-specific: the engine (``engine``), the rows of a forward and the
run's steps (``rows``), the family table (``families``) and block addresses (``blocks``), the hook slots as
multiplexers of contributors (``slots``, attention-call layouts in ``attention_layout``) and their
idempotent installation (``install``)."""
