"""SWG's branch: the same model evaluated on overlapping crops of the latent, stitched back.

A ``BranchEffect`` with a ``runner()``: the engine takes the SWG entries out of the full-size batched call
(crops have another spatial size, so they cannot share its tensor) and ``CropWindows.run`` evaluates them as
one ``calc_cond_batch`` call whose rows are the crops of every window (window-major), then stitches the
predictions (``guiders/sliding_windows.py``). The crop rows run the unperturbed model: the branch map is not
passed on, so no other branch's perturbation reaches them. Conditioning with spatial inputs (inpainting or
reference latents, control images) cannot be cropped consistently here and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...guiders.plan import BranchEffect
from ...guiders.sliding_windows import crop, crop_windows, stitch
from ..runtime.rows import BRANCH_MAP_KEY

SPATIAL_CONDITIONS = ("c_concat", "concat_latent_image", "concat_mask", "noise_concat", "ref_latents", "control",
                      "guiding_latents", "keyframe_idxs", "denoise_mask", "vace_frames", "reference_latent")


class CropError(ValueError):
    pass


@dataclass(frozen=True)
class CropWindows(BranchEffect):
    """Evaluate the branch on ``per_side``² crops, each side ``fraction`` of the latent's, aligned to ``align``."""

    label: str
    fraction: float
    per_side: int
    align: int = 1

    def runner(self) -> CropWindows:
        return self

    def run(self, model, conds: list, x, sigma, model_options: dict) -> list:
        import comfy.samplers

        for entry in conds:
            for c in entry or ():
                spatial = [k for k in SPATIAL_CONDITIONS if k in c.get("model_conds", {}) or k in c]
                if spatial:
                    raise CropError(f"{self.label}: the conditioning carries spatial inputs ({', '.join(spatial)}) "
                                    f"that the crops cannot follow (inpainting/reference latents, control images). "
                                    f"Use PAG or SEG on this model instead.")
        windows = crop_windows(x.shape[-2], x.shape[-1], self.fraction, self.per_side, self.align)
        crops = crop(x, windows)
        options = dict(model_options)
        to = {k: v for k, v in options.get("transformer_options", {}).items() if k != BRANCH_MAP_KEY}
        options["transformer_options"] = to
        timestep = sigma.repeat(len(windows)) if sigma.ndim and sigma.shape[0] == x.shape[0] else sigma
        preds = comfy.samplers.calc_cond_batch(model, conds, crops, timestep, options)
        return [stitch(p, windows, x) for p in preds]
