"""What every FAM layer shares (diffusers processors and srdiff's own attention blocks): its
settings, the last grid it modulated, and the step from the active context to its per-token map; and
what every FAM processor shares: the diffusers processor it replaces."""

import importlib
import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch

from srdiff._checks import check_choice, check_int, check_lam
from srdiff.attention import fam_attention, fam_attention_masked
from srdiff.fam_embedding import MODES, FAMProjection
from srdiff.processors import context as fam_state
from srdiff.processors.placement import Placement


@dataclass(frozen=True)
class FAMLayerInfo:
    """One modulated layer as :func:`srdiff.fam_layers` reports it.

    ``grid`` is the token grid the layer modulated in the model's last forward ((h, w), or (f, h, w)
    for the full attention of a video model; None: it was not modulated then); ``projection`` is None,
    ``"per_layer"``, ``"shared"`` or ``"external"``; ``path`` is how the layer is modulated: ``"fused"``
    (a FAM processor calling :func:`srdiff.fam_attention`), ``"hook"`` (the family's own processor with
    K and V scaled by hooks on its projections) or ``"block"`` (srdiff's own attention blocks)."""

    name: str
    family: str
    lam: float
    projection: str | None
    leading_tokens: int
    grid: tuple[int, ...] | None
    path: str


class FAMLayer:
    """Settings and per-forward state of one layer that applies the active mFAM to its keys and values.

    Args:
        lam: modulation strength (the paper: 0.025).
        projection: the :class:`srdiff.FAMProjection` this layer applies to the mFAM (its own, a
            shared one, or None: the map itself).
        mode: how the map is resized to the layer's grid, ``"bilinear"`` or ``"area"``.
        backend: passed to :func:`srdiff.fam_attention`.
        leading_tokens: tokens before the grid that are not image cells (time, class): they get 0.
        name: the layer's name in its model (for messages and :func:`srdiff.fam_layers`).
    """

    family = "FAMAttention"
    path = "block"

    def __init__(self, lam: float = 0.025, *, projection: FAMProjection | None = None, mode: str = "bilinear",
                 backend: str | None = None, leading_tokens: int = 0, name: str = "<unnamed layer>"):
        check_lam(lam)
        check_choice("mode", mode, MODES)
        if projection is not None and not isinstance(projection, FAMProjection):
            raise TypeError(f"projection must be a FAMProjection or None, got {type(projection).__name__}")
        check_int("leading_tokens", leading_tokens, 0)
        self.lam, self.projection, self.mode, self.backend = float(lam), projection, mode, backend
        self.leading_tokens, self.fam_name = leading_tokens, name
        self.projection_kind: str | None = None if projection is None else "external"
        self.last_placement: Placement | None = None

    def info(self) -> FAMLayerInfo:
        grid = None if self.last_placement is None else self.last_placement.describe()
        return FAMLayerInfo(self.fam_name, self.family, self.lam, self.projection_kind, self.leading_tokens, grid,
                            self.path)

    def active(self) -> "fam_state.FAMContext | None":
        """The context to modulate with, or None (no context, no map, or lam = 0)."""
        context = fam_state.active_context()
        return None if context is None or self.lam == 0.0 else context

    def placement(self, context: "fam_state.FAMContext", n_image: int, batch_size: int,
                  grid: tuple[int, int] | None = None) -> Placement:
        """Where this layer's ``n_image`` image tokens lie (:meth:`FAMContext.placement`)."""
        return context.placement(self.fam_name, n_image, batch_size, grid)

    def token_fam(self, context: "fam_state.FAMContext", placement: Placement, batch_size: int,
                  n_tokens: int | None = None, leading: int | torch.Tensor | None = None) -> torch.Tensor:
        """This layer's per-key map over ``n_tokens`` keys (default: the leading tokens and the image):
        ``leading`` zeros (default ``leading_tokens``; a (B,) tensor: per-sample text lengths), M_emb at
        the placement's image tokens, zeros after them (text, padding)."""
        leading = self.leading_tokens if leading is None else leading
        if n_tokens is None:
            n_tokens = leading + placement.n_tokens
        fam = context.layer_tokens(self.fam_name, self.projection, self.lam, placement, self.mode, batch_size,
                                   n_tokens, leading)
        self.last_placement = placement
        return fam

    def text_and_image_fam(self, context: "fam_state.FAMContext", n_tokens: int, batch_size: int,
                           text_first: bool = True) -> torch.Tensor:
        """The per-key map of a layer whose ``n_tokens`` keys are text tokens and the model's image tokens
        (as many as its declared patch grid or packed positions say), the text first (after each
        sample's own text length where the model's input gives per-sample lengths) or last (with any
        padding)."""
        n_image = context.image_token_count(self.fam_name)
        if n_tokens < n_image:
            raise ValueError(f"layer {self.fam_name!r}: its {n_tokens} keys cannot hold the model's {n_image} image "
                             "tokens")
        placement = self.placement(context, n_image, batch_size)
        leading = 0
        if text_first and n_tokens > n_image:
            lengths = context.geometry().text_lengths
            leading = n_tokens - n_image if lengths is None else lengths
        return self.token_fam(context, placement, batch_size, n_tokens, leading)

    def image_fam(self, context: "fam_state.FAMContext", n_image: int, batch_size: int) -> torch.Tensor:
        """The per-key map of a layer whose keys are ``leading_tokens`` then ``n_image`` image tokens."""
        return self.token_fam(context, self.placement(context, n_image, batch_size), batch_size)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fam: torch.Tensor,
               attention_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """Modulated attention, (B, H, N, D) -> (B, H, N, D) (softmax scale ``scale``, default 1/sqrt(D)).
        With a mask: K/V prescaling + SDPA (the fused kernels take no mask). The map was checked on entry
        to the context (or after the projection), so the op does not check it again."""
        if attention_mask is not None:
            return fam_attention_masked(q, k, v, fam, self.lam, attention_mask, scale=scale)
        return fam_attention(q, k, v, fam, self.lam, scale=scale, backend=self.backend, check_fam=False)


class FAMProcessor(FAMLayer):
    """Base of the FAM versions of diffusers attention processors (one subclass per attention family):
    the "fused" path, the family's steps with its attention computed by :func:`srdiff.fam_attention`.

    ``original``: the processor it replaces, which runs every call the modulation leaves alone (no
    context, no map, ``lam == 0``, cross-attention), unchanged; default a fresh instance of the first
    class in :attr:`replaces`. Other arguments: see :class:`FAMLayer`.
    """

    #: qualified names of the diffusers processor classes this one replaces (the installer's table,
    #: :data:`srdiff.processors.table.FAM_PROCESSORS`, is built from them; the first is the default)
    replaces: ClassVar[tuple[str, ...]] = ()
    path = "fused"

    def __init__(self, lam: float = 0.025, *, original=None, **kwargs):
        super().__init__(lam, **kwargs)
        if original is None:
            module, _, name = self.replaces[0].rpartition(".")
            original = getattr(importlib.import_module(module), name)()
        self.original = original
        self.family = type(original).__name__
        parameters = inspect.signature(original.__call__).parameters.values()
        self._original_takes = (None if any(p.kind is p.VAR_KEYWORD for p in parameters)
                                else {p.name for p in parameters})

    def call_original(self, attn, hidden_states: torch.Tensor, **kwargs):
        """The replaced processor on this call, given the keyword arguments its signature takes (as
        diffusers' ``Attention.forward`` filters them)."""
        if self._original_takes is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self._original_takes}
        return self.original(attn, hidden_states, **kwargs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(lam={self.lam}, projection={self.projection_kind}, mode={self.mode!r}, "
                f"replaces={type(self.original).__name__})")


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D), a view."""
    B, N, C = x.shape
    return x.view(B, N, heads, C // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


def to_tokens(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None):
    """``AttnProcessor2_0``'s entry: ``attn.spatial_norm``, then a (B, C, H, W) input as (B, H*W, C)
    tokens. Returns (tokens, grid): grid is (H, W) for a 4-d input, else None."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim != 4:
        return hidden_states, None
    batch, channel, height, width = hidden_states.shape
    return hidden_states.view(batch, channel, height * width).transpose(1, 2), (height, width)


def from_tokens(attn, out: torch.Tensor, residual: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    """``AttnProcessor2_0``'s exit: (B, H*W, C) back to (B, C, H, W) where the input was 4-d, then the
    residual connection and ``rescale_output_factor``."""
    if grid is not None:
        out = out.transpose(-1, -2).reshape(out.shape[0], out.shape[-1], *grid)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor
