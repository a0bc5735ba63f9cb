"""The hook path: any attention family modulated without a FAM version of its processor.

The layer keeps the processor it has; forward hooks on the modules whose outputs are the keys and
values that enter attention (the key after ``norm_k`` where the family normalises keys, since a
normalisation would undo a scale applied before it) multiply each image token's key and value by
``1 + lam * m``, m the map at that token. Rotary embeddings applied after the hook commute with a
per-token scale, so the family's attention then computes exactly softmax(q (sK)^T) (sV) (or the
family's own attention of sK and sV: linear, sliced, identity). Where the keys and values are read
from, and which of a layer's tokens are image tokens, comes from the family's
:class:`srdiff.processors.families.TokenLayout`.
"""

import torch
from torch import nn

from srdiff.processors import context as fam_state
from srdiff.processors.base import FAMLayer
from srdiff.processors.families import HOOK_LAYOUTS, Source


def scale_tokens(out: torch.Tensor, fam: torch.Tensor, lam: float, source: Source, inner_dim: int) -> torch.Tensor:
    """``out`` with each token's channels (or the ``source.chunk``-th block of ``inner_dim`` channels)
    multiplied by s = 1 + lam * fam, computed in float32 and rounded once to out's dtype. ``fam`` is
    (N,) or (B|1, N), N on ``source.token_dim`` of ``out``."""
    s = 1.0 + lam * fam.float()
    shape = [1] * out.dim()
    shape[source.token_dim] = s.shape[-1]
    if s.dim() == 2:
        shape[0] = s.shape[0]
    s = s.view(shape)
    if source.chunk is None:
        return torch.mul(out, s).to(out.dtype)
    lo, hi = source.chunk * inner_dim, (source.chunk + 1) * inner_dim
    return torch.cat((out[..., :lo], torch.mul(out[..., lo:hi], s).to(out.dtype), out[..., hi:]), dim=-1)


class _ScaleHook:
    """The forward hook on one K or V source of a hook-path layer (an object, not a closure, so that
    ``copy.deepcopy`` of the model gives the copy's hooks the copy's layer)."""

    def __init__(self, layer: "FAMHookLayer", source: Source, inner_dim: int | None):
        self.layer, self.source, self.inner_dim = layer, source, inner_dim

    def __call__(self, module, inputs, out):
        layer = self.layer
        context = layer.active()
        if context is None:
            return None
        fam = layer.layout_fam(context, out.shape[self.source.token_dim], out.shape[0])
        return scale_tokens(out, fam, layer.lam, self.source, self.inner_dim)


class FAMHookLayer(FAMLayer):
    """A layer on the hook path: its processor runs unchanged, hooks scale its keys and values.

    Args:
        lam, projection, mode, leading_tokens, name: see :class:`srdiff.processors.base.FAMLayer`.
        processor_class: the qualified name of the processor it modulates, a key of
            :data:`srdiff.processors.families.HOOK_LAYOUTS` (its layout: where K and V come from, where the
            text is).
    """

    path = "hook"

    def __init__(self, lam: float = 0.025, *, processor_class: str, **kwargs):
        if processor_class not in HOOK_LAYOUTS:
            raise ValueError(f"processor_class must be one of the hook layouts' processors, got {processor_class!r}")
        super().__init__(lam, **kwargs)
        self.processor_class, self.layout = processor_class, HOOK_LAYOUTS[processor_class]
        self.family = processor_class.rsplit(".", 1)[-1]
        self.hooked: list[nn.Module] = []

    def attach(self, attn: nn.Module) -> None:
        """Hook the modules the layout names for ``attn`` (again, if they changed since: projections
        fused or wrapped by peft after the install)."""
        sources = self.layout.sources(attn)
        modules = [attn.get_submodule(src.module) for src in sources]
        if len(modules) == len(self.hooked) and all(a is b for a, b in zip(modules, self.hooked)):
            return
        self.detach()
        inner = getattr(attn, "inner_dim", None)
        for module, source in zip(modules, sources):
            module.register_forward_hook(_ScaleHook(self, source, inner))
        self.hooked = modules

    def detach(self) -> None:
        for module in self.hooked:
            for key in [k for k, h in module._forward_hooks.items() if isinstance(h, _ScaleHook) and h.layer is self]:
                del module._forward_hooks[key]
        self.hooked = []

    def layout_fam(self, context: "fam_state.FAMContext", n_tokens: int, batch_size: int) -> torch.Tensor:
        """The per-token map of a projection output with ``n_tokens`` tokens, as the layout places the
        image among them."""
        if self.layout.text == "none":
            return self.image_fam(context, n_tokens - self.leading_tokens, batch_size)
        return self.text_and_image_fam(context, n_tokens, batch_size, text_first=self.layout.text == "first")
