"""The diffusers side of the reverse-process modulation: an attention processor that reads the current
mFAM from a context the trainer sets and runs :func:`srdiff.fam_attention` with it.

    names = srdiff.set_fam_attn_processor(unet, lam=0.025)    # once, after building the model
    with srdiff.fam_context(mfam):                           # around each training forward
        eps = unet(x_t, t).sample
    loss(eps).backward()                                     # outside the context: fine

The mFAM lives in a module-level slot, so it is per process: each DDP rank sets its own (the map is
usually the same everywhere: one mean FAM, refreshed every few hundred steps), and DataParallel's
worker threads see it too. Contexts nest; leaving one restores the previous map. The processors need
nothing from it at backward time: the token maps a forward used are saved by autograd.
"""

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from srdiff._checks import check_choice, check_finite, check_nonnegative, check_tensor
from srdiff.attention import fam_attention
from srdiff.fam_embedding import MODES, FAMProjection, fam_to_tokens
from srdiff.reference.attention import fam_attention_sdpa


class _FAMState:
    """The active mFAM plus the token maps derived from it during one forward (one per layer grid)."""

    def __init__(self, mfam: torch.Tensor):
        self.mfam = mfam
        self.tokens: dict[tuple, torch.Tensor] = {}
        self.projected: dict[int, torch.Tensor] = {}

    def token_map(self, grid: tuple[int, int], mode: str, projection: FAMProjection | None, lam: float):
        key = (grid, mode, id(projection))
        if key not in self.tokens:
            self.tokens[key] = fam_to_tokens(self._image_map(projection, lam), grid, mode=mode)
        return self.tokens[key]

    def _image_map(self, projection: FAMProjection | None, lam: float) -> torch.Tensor:
        if projection is None:
            return self.mfam
        if id(projection) not in self.projected:
            m_emb = projection(self.mfam)
            # Resizing keeps values within [min, max] of the map, so checking the image-space map
            # once covers every layer's tokens.
            check_finite("M_emb (FAMProjection output)", m_emb)
            if not torch.compiler.is_compiling() and lam > 0 and not 1.0 + lam * m_emb.min().item() > 0:
                raise ValueError(
                    f"1 + lam * M_emb must be > 0: the FAMProjection output reaches {m_emb.min().item():.6g} "
                    f"with lam={lam}"
                )
            self.projected[id(projection)] = m_emb
        return self.projected[id(projection)]


_ACTIVE: _FAMState | None = None


@contextlib.contextmanager
def fam_context(mfam: torch.Tensor | None) -> Iterator[None]:
    """Make ``mfam`` the map every :class:`FAMAttnProcessor` uses until the block exits.

    Args:
        mfam: (H, W) (one map for the whole batch, as the authors use it) or (B, H, W) (one per image;
            B must equal the batch the model sees), values in [0, 1], image space, on the model's
            device. None switches the modulation off inside the block.

    Checked once on entry (finite, in [0, 1]: one device sync). Not thread-safe across concurrent
    contexts with different maps in one process.

    Example::

        >>> with srdiff.fam_context(torch.rand(64, 64)):
        ...     eps = unet(x_t, t).sample
    """
    global _ACTIVE
    if mfam is not None:
        check_tensor("mfam", mfam, ndim=(2, 3), floating=True)
        check_finite("mfam", mfam)
        if not torch.compiler.is_compiling():
            lo, hi = mfam.min().item(), mfam.max().item()
            if lo < 0 or hi > 1:
                raise ValueError(f"mfam values must lie in [0, 1], got min {lo:.6g} and max {hi:.6g}")
    previous = _ACTIVE
    _ACTIVE = None if mfam is None else _FAMState(mfam)
    try:
        yield
    finally:
        _ACTIVE = previous


def _token_grid(n_tokens: int, height: int, width: int) -> tuple[int, int] | None:
    """The (h, w) grid with h * w = n_tokens and the map's aspect ratio h / w = height / width, if any."""
    h = round(math.sqrt(n_tokens * height / width))
    if h < 1 or n_tokens % h:
        return None
    w = n_tokens // h
    return (h, w) if h * width == w * height else None


class FAMAttnProcessor:
    """A diffusers attention processor that modulates keys and values with the current mFAM.

    In a :func:`fam_context` with a map, a self-attention layer whose tokens form a grid of the map's
    aspect ratio (4-d inputs: their (height, width); 3-d inputs: h * w = N with h / w = H / W) runs
    :func:`srdiff.fam_attention` with ``fam = fam_to_tokens(M_emb, (h, w))``, M_emb the mFAM or
    ``projection(mFAM)``. Everything else (no context, ``lam == 0``, cross-attention, no matching
    grid) is exactly diffusers' ``AttnProcessor2_0``. Cross-attention stays unmodulated: its keys are
    text tokens, which have no place in the image, so an image-space map defines no per-key scale.

    Args:
        lam: modulation strength (the paper: 0.025).
        projection: an optional :class:`srdiff.FAMProjection`, shared by the layers and applied once
            per forward. Its parameters are not registered in the model: optimise them yourself, e.g.
            ``torch.optim.AdamW([*unet.parameters(), *projection.parameters()])``, and save them next
            to the model's state dict.
        mode: how the map is resized to a layer's grid, ``"bilinear"`` or ``"area"``.
        backend: passed to :func:`srdiff.fam_attention`.

    With an ``attention_mask``, the modulated layer runs K/V prescaling + SDPA (the fused kernels
    take no mask). Under ``torch.autocast`` the kernels run in the autocast dtype.
    """

    def __init__(self, lam: float = 0.025, *, projection: FAMProjection | None = None, mode: str = "bilinear",
                 backend: str | None = None):
        check_nonnegative("lam", lam)
        check_choice("mode", mode, MODES)
        if projection is not None and not isinstance(projection, FAMProjection):
            raise TypeError(f"projection must be a FAMProjection or None, got {type(projection).__name__}")
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.lam, self.projection, self.mode, self.backend = float(lam), projection, mode, backend
        self._plain = AttnProcessor2_0()

    def __repr__(self) -> str:
        projection = self.projection is not None
        return f"FAMAttnProcessor(lam={self.lam}, projection={projection}, mode={self.mode!r})"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs):
        state = _ACTIVE
        if state is None or self.lam == 0.0 or encoder_hidden_states is not None:
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                               *args, **kwargs)

        # From here on AttnProcessor2_0's body, with the modulated attention in place of SDPA.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        grid = (height, width) if input_ndim == 4 else _token_grid(sequence_length, *state.mfam.shape[-2:])
        if grid is None:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        else:
            fam = state.token_map(grid, self.mode, self.projection, self.lam)
            if fam.dim() == 2 and fam.shape[0] not in (1, batch_size):
                raise ValueError(
                    f"mfam holds {fam.shape[0]} maps but the layer sees a batch of {batch_size}: "
                    "pass one (H, W) map or one per image"
                )
            if attention_mask is not None:
                hidden_states = fam_attention_sdpa(query, key, value, fam, self.lam, attn_mask=attention_mask)
            else:
                # The map was checked on entry to fam_context (or once after the projection).
                hidden_states = fam_attention(query, key, value, fam, self.lam, backend=self.backend,
                                              check_fam=False)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_fam_attn_processor(
    model: torch.nn.Module,
    lam: float = 0.025,
    *,
    layer_filter: Callable[[str, torch.nn.Module], bool] | None = None,
    projection: FAMProjection | None = None,
    mode: str = "bilinear",
    backend: str | None = None,
) -> list[str]:
    """Install one :class:`FAMAttnProcessor` on the self-attention layers of any diffusers model.

    Walks ``model.named_modules()`` for diffusers ``Attention`` modules (so it works on models without
    ``set_attn_processor``, e.g. ``UNet2DModel``), skips cross-attention layers (they keep their
    processor) and those ``layer_filter(name, module)`` rejects, and sets the processor on the rest.

    Args:
        model: a diffusers model (``UNet2DModel``, ``UNet2DConditionModel``, transformers, ...).
        lam, projection, mode, backend: see :class:`FAMAttnProcessor`.
        layer_filter: ``(name, module) -> bool``; default: every self-attention layer (the authors
            modulate every U-Net attention block).

    Returns:
        The names (as in ``named_modules``) of the layers that got the processor, in model order.

    Example::

        >>> unet = diffusers.UNet2DModel(sample_size=64, ...)
        >>> srdiff.set_fam_attn_processor(unet, lam=0.025)
        ['down_blocks.1.attentions.0', 'mid_block.attentions.0', ...]
    """
    from diffusers.models.attention_processor import Attention

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layer_filter is not None and not callable(layer_filter):
        raise TypeError(f"layer_filter must be callable or None, got {type(layer_filter).__name__}")
    processor = FAMAttnProcessor(lam, projection=projection, mode=mode, backend=backend)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, Attention) or module.is_cross_attention:
            continue
        if layer_filter is not None and not layer_filter(name, module):
            continue
        module.set_processor(processor)
        names.append(name)
    return names
