"""PLADIS: every text cross-attention extrapolated from its dense (softmax) output toward a sparse one.

Not a plan term and no branch: the node clones the MODEL and installs this contributor, which acts on every
row of every forward (cond, uncond and any perturbation branch, as the paper's attention processor). The
model's own attention (``inner``: the previous occupant, other contributors, ComfyUI's kernel) gives the
dense output; the sparse one is ``guiders/sparse_attention.py``. Where: UNet ``attn2`` replaces; on
WAN/LTXV/Cosmos Predict2 an object patch of each text cross-attention module marks its attention calls,
which the attention dispatcher hands to this contributor. Joint-attention DiTs (Flux, SD3, ...) have no
separate cross-attention and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...guiders.sparse_attention import pladis_extrapolate, sparse_attention
from ..runtime import install as installer
from ..runtime.attention_layout import from_bhld, heads_of, mask_of, to_bhld
from ..runtime.blocks import unet_layers
from ..runtime.families import FamilyError, FamilySpec, diffusion_model_of
from ..runtime.slots import Contributor, ModulePatch

PLADIS_CROSS_KEY = "guidance_kit_pladis_cross"  # transformer_options inside a marked cross-attention module
PLADIS_INSTALLED_KEY = "guidance_kit_pladis"  # model_options: the node that installed PLADIS on this model


@dataclass(frozen=True)
class PladisAttention(Contributor):
    """``O₁ + scale·(O_sparse − O₁)`` in the cross-attentions it is registered on (innermost contributor: NAG's
    views of a call each get PLADIS)."""

    ORDER: ClassVar[int] = 40
    NAME: ClassVar[str] = "pladis"

    scale: float
    function: str

    def __deepcopy__(self, memo):
        return self

    def unet_cross_attention(self, call, inner):
        dense = inner(call)
        heads = call.options["n_heads"]
        q, k, v = (to_bhld(t, heads, False) for t in (call.q, call.k, call.v))
        return pladis_extrapolate(dense, from_bhld(sparse_attention(q, k, v, self.function), False), self.scale)

    def attention(self, call, inner):
        if not call.options.get(PLADIS_CROSS_KEY):
            return inner(call)
        dense = inner(call)
        skip_reshape = call.kwargs.get("skip_reshape", False)
        heads = heads_of(call.args, call.kwargs)
        q, k, v = (to_bhld(t, heads, skip_reshape) for t in call.args[:3])
        mask = mask_of(call.args, call.kwargs)
        if mask is not None and mask.ndim == 2:
            mask = mask[None, None]
        elif mask is not None and mask.ndim == 3:
            mask = mask[:, None]
        sparse = sparse_attention(q, k, v, self.function, mask)
        return pladis_extrapolate(dense, from_bhld(sparse, call.kwargs.get("skip_output_reshape", False)),
                                  self.scale)


class CrossAttentionMarker(ModulePatch):
    """Object patch of a text cross-attention module's ``forward`` (WAN, LTXV, Cosmos Predict2): its attention
    calls carry ``PLADIS_CROSS_KEY``; the module's own forward runs unchanged."""

    def __call__(self, *args, **kwargs):
        to = kwargs.get("transformer_options")
        if isinstance(to, dict):
            kwargs["transformer_options"] = {**to, PLADIS_CROSS_KEY: True}
        return self.original(*args, **kwargs)


def install(model_patcher, spec: FamilySpec, owner: str, scale: float, function: str) -> None:
    """Install PLADIS on a cloned ModelPatcher (every text cross-attention of ``spec``'s family)."""
    if model_patcher.model_options.get(PLADIS_INSTALLED_KEY):
        raise FamilyError(f"{owner}: this model already has PLADIS (from an earlier node in the chain). Use one "
                          f"PLADIS node; to change its settings, edit that node.")
    contributor = PladisAttention(float(scale), function)
    net = diffusion_model_of(model_patcher)
    if spec.nag == "attn2":
        keys = list(unet_layers(net))
        if not keys:
            raise FamilyError(f"{owner}: this UNet has no transformer layers with cross-attention.")
        installer.unet_attention(model_patcher, "attn2", keys, contributor)
    elif spec.nag == "cross":
        names = [name for name, _m in net.named_modules() if name.rsplit(".", 1)[-1] == spec.cross_attention]
        if not names:
            raise FamilyError(f"{owner}: no '{spec.cross_attention}' modules in this {spec.name} model; this ComfyUI "
                              f"version builds it differently. Please report it.")
        for name in names:
            installer.module_patch(model_patcher, f"diffusion_model.{name}", CrossAttentionMarker)
        installer.attention(model_patcher, contributor)
    else:
        raise FamilyError(f"{owner}: {spec.name} has no separate text cross-attention (its text and image tokens "
                          f"share one joint attention), so PLADIS's sparse cross-attention does not apply. PLADIS "
                          f"works on SD1.5/SDXL, WAN, LTXV and Cosmos Predict2; on {spec.name} use NAG or a "
                          f"perturbation guidance (PAG, SEG) instead.")
    model_patcher.model_options[PLADIS_INSTALLED_KEY] = owner
