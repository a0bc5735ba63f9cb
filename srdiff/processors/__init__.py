"""The diffusers side of the reverse-process modulation: FAM attention processors, one per attention
family, installed by a table, and the context that holds the active mFAM.

    names = srdiff.set_fam_attn_processor(unet, lam=0.025)    # once, after building the model
    with srdiff.fam_context(mfam):                           # around each training forward
        eps = unet(x_t, t).sample
    loss(eps).backward()                                     # outside the context: fine

Modules: :mod:`.context` (fam_context, the per-forward record, the per-layer map, checkpoint replay),
:mod:`.base` (what every FAM layer and processor shares), :mod:`.self_attention`, :mod:`.joint` and
:mod:`.flux` (the processors), :mod:`.table` (which replaces which), :mod:`.install`
(set/remove/introspect). See docs/processors.md.

Follow a call: a processor's ``__call__`` -> ``self.active()`` (the innermost :class:`.context.FAMContext`,
or None: the original processor runs) -> ``self.grid_of`` (``FAMContext.layer_grid``: the layer's token grid
from the input's (H, W)) -> ``self.token_fam`` (``FAMContext.layer_tokens``: M_emb once per forward, resized
to the grid, counted) -> ``self.attend`` -> :func:`srdiff.attention.fam_attention`.
"""

from srdiff.processors.base import FAMLayer, FAMLayerInfo
from srdiff.processors.context import active_mfam, fam_context
from srdiff.processors.flux import FAMFluxAttnProcessor
from srdiff.processors.install import (
    fam_layers,
    fam_parameters,
    remove_fam_attn_processor,
    set_fam_attn_processor,
)
from srdiff.processors.flux2 import FAMFlux2AttnProcessor, FAMFlux2ParallelSelfAttnProcessor
from srdiff.processors.hidream import FAMHiDreamAttnProcessor
from srdiff.processors.joint import FAMJointAttnProcessor
from srdiff.processors.lumina2 import FAMLumina2AttnProcessor
from srdiff.processors.pag import FAMPAGAttnProcessor
from srdiff.processors.qwenimage import FAMQwenDoubleStreamAttnProcessor
from srdiff.processors.sana import FAMSanaLinearAttnProcessor
from srdiff.processors.self_attention import FAMAttnProcessor
from srdiff.processors.table import FAM_PROCESSORS

__all__ = ["FAM_PROCESSORS", "FAMAttnProcessor", "FAMFlux2AttnProcessor", "FAMFlux2ParallelSelfAttnProcessor",
           "FAMFluxAttnProcessor", "FAMHiDreamAttnProcessor", "FAMJointAttnProcessor", "FAMLayer", "FAMLayerInfo",
           "FAMLumina2AttnProcessor", "FAMPAGAttnProcessor", "FAMQwenDoubleStreamAttnProcessor",
           "FAMSanaLinearAttnProcessor", "active_mfam", "fam_context", "fam_layers", "fam_parameters",
           "remove_fam_attn_processor", "set_fam_attn_processor"]
