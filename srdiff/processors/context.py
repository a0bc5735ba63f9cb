"""The active mFAM and what one model forward derives from it.

Two slots, both per process:

* the context (:func:`fam_context`): the map, an optional explicit input grid, the ``strict`` flag;
* the forward record (pushed by the pre-forward hook that :func:`srdiff.set_fam_attn_processor`
  puts on the model, popped when the forward ends): the input's (H, W), from which every layer's
  token grid follows, and the projected maps that forward computed (a shared
  :class:`srdiff.FAMProjection` runs once per forward, never once per context, so a second step
  inside one context sees the updated projection and builds a fresh graph).

A layer asks its context for everything the map needs (:meth:`FAMContext.layer_grid`,
:meth:`FAMContext.layer_tokens`): the grid its tokens form, M_emb resized to it, the count of what was
modulated. Gradient checkpointing re-runs blocks during backward, possibly after the context has
exited: the installer wraps the model's checkpoint function in a :class:`ReplayingCheckpoint`, so
that the re-run sees the context and forward record of the original run, and the recomputation is
identical.
"""

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from srdiff._checks import check_finite, check_tensor
from srdiff.fam_embedding import FAMProjection, fam_to_tokens


class FAMContext:
    """What :func:`fam_context` holds (the map, the explicit input grid, strictness, a modulation count)
    and what a layer derives from it in the current forward."""

    def __init__(self, mfam: torch.Tensor, grid: tuple[int, int] | None, strict: bool):
        self.mfam, self.grid, self.strict = mfam, grid, strict
        self.modulated = 0

    def input_hw(self) -> tuple[int, int] | None:
        """The model input's (H, W): the explicit grid, else what the current forward recorded, else None."""
        return self.grid or (None if _FORWARD is None else _FORWARD.input_hw)

    def layer_grid(self, layer: str, n_spatial: int, leading_tokens: int = 0) -> tuple[int, int]:
        """The (h, w) grid of layer ``layer``'s ``n_spatial`` image tokens, from the model input's (H, W)."""
        input_hw = self.input_hw()
        if input_hw is None:
            raise ValueError(
                f"layer {layer!r}: cannot place its {n_spatial} tokens on the image: the model's input "
                "grid is unknown. Install with srdiff.set_fam_attn_processor(model, ...) (a hook records the "
                "input's (H, W)) or pass srdiff.fam_context(mfam, grid=(H, W))"
            )
        grid = token_grid(n_spatial, input_hw)
        if grid is None:
            raise ValueError(
                f"layer {layer!r}: its {n_spatial} image tokens form no grid of the {input_hw[0]}x"
                f"{input_hw[1]} input (ceil(H/f) x ceil(W/f) or H//f x W//f for an integer f); "
                f"leading_tokens={leading_tokens}"
            )
        return grid

    def m_emb(self, projection: FAMProjection | None, lam: float) -> torch.Tensor:
        """M_emb in image space: the mFAM, or ``projection(mFAM)`` computed once per forward (checked
        once: finite and 1 + lam * M_emb > 0)."""
        if projection is None:
            return self.mfam
        record = _FORWARD
        if record is not None and id(projection) in record.projected:
            return record.projected[id(projection)]
        m_emb = projection(self.mfam)
        # Resizing keeps values within [min, max] of the map, so checking the image-space map once
        # covers every layer's tokens.
        check_finite("M_emb (FAMProjection output)", m_emb)
        if not torch.compiler.is_compiling() and lam > 0 and not 1.0 + lam * m_emb.min().item() > 0:
            raise ValueError(f"1 + lam * M_emb must be > 0: the FAMProjection output reaches "
                             f"{m_emb.min().item():.6g} with lam={lam}")
        if record is not None:
            record.projected[id(projection)] = m_emb
        return m_emb

    def layer_tokens(self, layer: str, projection: FAMProjection | None, lam: float, grid: tuple[int, int],
                     mode: str, leading: int = 0, trailing: int = 0, batch_size: int | None = None) -> torch.Tensor:
        """The per-token map of layer ``layer``: M_emb resized to ``grid``, ``leading`` zeros before the
        grid tokens and ``trailing`` zeros after them (text tokens of joint attention), (N,) or (B, N);
        the layer counts as modulated (for ``strict`` and :func:`srdiff.fam_layers`)."""
        tokens = fam_to_tokens(self.m_emb(projection, lam), grid, mode=mode, extra_tokens=leading)
        if trailing:
            tokens = F.pad(tokens, (0, trailing))
        if batch_size is not None and tokens.dim() == 2 and tokens.shape[0] not in (1, batch_size):
            raise ValueError(f"mfam holds {tokens.shape[0]} maps but the layer sees a batch of {batch_size}: "
                             "pass one (H, W) map or one per image")
        self.modulated += 1
        if _FORWARD is not None:
            _FORWARD.modulated.append(layer)
        return tokens


class ForwardRecord:
    """One model forward: the input's (H, W) (None when unknown), the maps computed so far, the
    layers it modulated."""

    def __init__(self, input_hw: tuple[int, int] | None, previous: "ForwardRecord | None"):
        self.input_hw, self.previous = input_hw, previous
        self.projected: dict[int, torch.Tensor] = {}
        self.modulated: list[str] = []

    def snapshot(self) -> "ForwardRecord":
        """A copy with the maps computed so far, for a checkpointed block's recomputation."""
        copy = ForwardRecord(self.input_hw, None)
        copy.projected = dict(self.projected)
        return copy


_ACTIVE: FAMContext | None = None
_FORWARD: ForwardRecord | None = None
_ASPECT_WARNED: set[tuple] = set()


def _check_grid(grid) -> tuple[int, int] | None:
    if grid is None:
        return None
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"grid must be None or two positive ints (H, W), got {grid!r}")
    return tuple(grid)


@contextlib.contextmanager
def fam_context(mfam: torch.Tensor | None, *, grid: tuple[int, int] | None = None,
                strict: bool = False) -> Iterator[None]:
    """Make ``mfam`` the map every FAM layer uses until the block exits.

    Args:
        mfam: (H, W) (one map for the batch, as the authors use it) or (B, H, W) (one per image; B
            must equal the batch the model sees), values in [0, 1], image space, on the model's
            device. None switches the modulation off inside the block.
        grid: the (height, width) of the model's input (pixels or latent), for models whose input
            does not show it (token inputs) or processors set by hand; overrides what the model's
            pre-forward hook records. Each layer's token grid is this grid downsampled.
        strict: raise RuntimeError when a model forward inside the block modulated no layer, or
            when the block ends without any layer having been modulated.

    A map whose aspect ratio differs from the input's is resized to each layer's grid all the same,
    with a one-time warning. Checked once on entry (finite, in [0, 1]: one device sync). Contexts
    nest; leaving one restores the previous map. Not thread-safe across concurrent contexts.

    Example::

        >>> with srdiff.fam_context(torch.rand(64, 64)):
        ...     eps = unet(x_t, t).sample
    """
    global _ACTIVE
    grid = _check_grid(grid)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    if mfam is not None:
        check_tensor("mfam", mfam, ndim=(2, 3), floating=True)
        check_finite("mfam", mfam)
        if not torch.compiler.is_compiling():
            lo, hi = mfam.min().item(), mfam.max().item()
            if lo < 0 or hi > 1:
                raise ValueError(f"mfam values must lie in [0, 1], got min {lo:.6g} and max {hi:.6g}")
        if grid is not None:
            warn_on_aspect_mismatch(mfam, grid)
    previous = _ACTIVE
    context = None if mfam is None else FAMContext(mfam, grid, strict)
    _ACTIVE = context
    try:
        yield
    finally:
        _ACTIVE = previous
    if context is not None and strict and context.modulated == 0:
        raise RuntimeError("fam_context(strict=True): no attention layer was modulated inside the block "
                           "(is a FAM processor installed, and lam > 0?)")


def active_mfam() -> torch.Tensor | None:
    """The map of the innermost :func:`fam_context`, or None outside any (or in ``fam_context(None)``)."""
    return None if _ACTIVE is None else _ACTIVE.mfam


def active_context() -> FAMContext | None:
    return _ACTIVE


def current_forward() -> ForwardRecord | None:
    return _FORWARD


def push_forward(input_hw: tuple[int, int] | None) -> ForwardRecord:
    global _FORWARD
    _FORWARD = ForwardRecord(input_hw, _FORWARD)
    return _FORWARD


def pop_forward(record: ForwardRecord) -> None:
    """End ``record``; the layers it modulated count for the enclosing forward too (a model whose
    forward runs another that pushes its own record)."""
    global _FORWARD
    if _FORWARD is record:
        _FORWARD = record.previous
        if record.previous is not None:
            record.previous.modulated.extend(record.modulated)


@contextlib.contextmanager
def replay_state(context: FAMContext | None, record: ForwardRecord | None) -> Iterator[None]:
    """Run with a given context and forward record (a checkpointed block's recomputation)."""
    global _ACTIVE, _FORWARD
    saved = _ACTIVE, _FORWARD
    _ACTIVE, _FORWARD = context, record
    try:
        yield
    finally:
        _ACTIVE, _FORWARD = saved


class ReplayingCheckpoint:
    """Wraps a diffusers ``_gradient_checkpointing_func``: the block's recomputation during backward
    runs with the context and forward record of its original run, so it recomputes the same
    modulation inside the context, outside it, or inside another one."""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, block, *args, **kwargs):
        context, record = _ACTIVE, _FORWARD
        snapshot = None if record is None else record.snapshot()
        calls = 0

        def run(*block_args, **block_kwargs):
            nonlocal calls
            calls += 1
            if calls == 1:
                return block(*block_args, **block_kwargs)
            replay = None if snapshot is None else snapshot.snapshot()
            with replay_state(context, replay):
                return block(*block_args, **block_kwargs)

        return self.inner(run, *args, **kwargs)


def warn_on_aspect_mismatch(mfam: torch.Tensor, input_hw: tuple[int, int]) -> None:
    """Warn once per (map size, input size) whose aspect ratios differ (the map is resized anyway)."""
    H, W = mfam.shape[-2:]
    h, w = input_hw
    if H * w == W * h:
        return
    key = (H, W, h, w)
    if key not in _ASPECT_WARNED:
        _ASPECT_WARNED.add(key)
        warnings.warn(f"mfam is {H}x{W} but the model's input is {h}x{w}: the map's aspect ratio differs "
                      f"from the input's; it is resized (stretched) to each layer's grid", stacklevel=3)


def token_grid(n_tokens: int, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The grid of a layer with ``n_tokens`` spatial tokens in a model whose input is ``input_hw``:
    (ceil(H/f), ceil(W/f)) (strided convolutions) or (H//f, W//f) (patch embeddings) for the
    smallest integer factor f that gives n_tokens cells; None if no factor does."""
    H, W = input_hw
    for f in range(1, max(H, W) + 1):
        for grid in ((-(-H // f), -(-W // f)), (H // f, W // f)):
            if grid[0] * grid[1] == n_tokens:
                return grid
    return None
