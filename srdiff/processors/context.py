"""The active mFAM and what one model forward derives from it.

Two slots, both per process:

* the context (:func:`fam_context`): the map, an optional explicit input grid, the ``strict`` flag;
* the forward record (pushed by the pre-forward hook that :func:`srdiff.set_fam_attn_processor`
  puts on the model, popped when the forward ends): the input's geometry
  (:class:`srdiff.processors.inputs.InputGeometry`: (H, W), frames, the patch grid, packed token
  positions), from which every layer's token placement follows, and the projected maps that forward computed (a shared
  :class:`srdiff.FAMProjection` runs once per forward, never once per context, so a second step
  inside one context sees the updated projection and builds a fresh graph).

A layer asks its context for everything the map needs (:meth:`FAMContext.placement`,
:meth:`FAMContext.layer_tokens`): where its image tokens lie (:mod:`srdiff.processors.placement`), M_emb
at those tokens, the count of what was modulated. Nothing here reads a tensor's values on the host
during a forward (no device sync), so compiled models trace it whole. Gradient checkpointing re-runs blocks during backward, possibly after the context has
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
from srdiff.fam_embedding import FAMProjection
from srdiff.processors.inputs import InputGeometry
from srdiff.processors.placement import Placement, image_tokens, token_grid


class FAMContext:
    """What :func:`fam_context` holds (the map, the explicit input grid, strictness, a modulation count)
    and what a layer derives from it in the current forward."""

    def __init__(self, mfam: torch.Tensor, grid: tuple[int, int] | None, strict: bool):
        self.mfam, self.grid, self.strict = mfam, grid, strict
        self.modulated = 0

    def geometry(self) -> InputGeometry | None:
        """The current forward's input geometry (:class:`srdiff.processors.inputs.InputGeometry`), with the
        explicit grid when one was given; None when neither is known."""
        recorded = None if _FORWARD is None else _FORWARD.geometry
        if self.grid is None:
            return recorded
        return (recorded or InputGeometry()).with_grid(self.grid)

    def input_hw(self) -> tuple[int, int] | None:
        """The model input's (H, W): the explicit grid, else what the current forward recorded, else None."""
        geometry = self.geometry()
        return None if geometry is None else geometry.hw

    def image_token_count(self, layer: str) -> int:
        """How many of a layer's tokens are image tokens, for layers whose sequence also holds text:
        the model's declared patch grid, or its packed positions. Raises when the model shows neither."""
        geometry = self.geometry()
        n = None if geometry is None else geometry.image_token_count()
        if n is None:
            raise ValueError(
                f"layer {layer!r}: its keys hold text and image tokens, but the model's image token count is "
                "unknown (no declared patch size, no img_ids); pass srdiff.fam_context(mfam, grid=(h, w)) with the "
                "token grid"
            )
        return n

    def placement(self, layer: str, n_image: int, batch_size: int,
                  grid: tuple[int, int] | None = None) -> Placement:
        """Where layer ``layer``'s ``n_image`` image tokens lie, for a call on ``batch_size`` samples: the
        model's declared patch grid when it has n_image cells, else the packed positions, else the grid
        among the input's downsamplings (:func:`srdiff.processors.placement.token_grid`); frames folded
        into the batch when the layer sees B * F samples of a video. Never guessed: raises when none fits.
        ``grid``: the layer's own (h, w), where its input shows it (a 4-d feature map)."""
        geometry = self.geometry()
        if geometry is None and grid is not None:
            return Placement(grid=grid)
        if geometry is None:
            raise ValueError(
                f"layer {layer!r}: cannot place its {n_image} tokens on the image: the model's input "
                "grid is unknown. Install with srdiff.set_fam_attn_processor(model, ...) (a hook records the "
                "input's (H, W)) or pass srdiff.fam_context(mfam, grid=(H, W))"
            )
        frames = geometry.frames or 1
        folded = frames if frames > 1 and geometry.batch is not None and batch_size == geometry.batch * frames else 1
        if grid is not None:
            return Placement(grid=grid, frames=folded)
        if geometry.patch_grid is not None and geometry.image_token_count() == n_image:
            return Placement(grid=geometry.patch_grid, frames=folded if len(geometry.patch_grid) == 2 else 1)
        if geometry.positions is not None and geometry.positions.shape[-2] == n_image:
            return Placement(positions=geometry.positions)
        grid = None if geometry.hw is None else token_grid(n_image, geometry.hw)
        if grid is None:
            where = "the input" if geometry.hw is None else f"the {geometry.hw[0]}x{geometry.hw[1]} input"
            raise ValueError(
                f"layer {layer!r}: its {n_image} image tokens form no grid of {where} (ceil(H/f) x ceil(W/f) "
                f"or H//f x W//f for an integer f; declared patch grid {geometry.patch_grid})"
            )
        return Placement(grid=grid, frames=folded)

    def m_emb(self, projection: FAMProjection | None, lam: float) -> torch.Tensor:
        """M_emb in image space: the mFAM, or ``projection(mFAM)`` computed once per forward (checked
        once: finite and 1 + lam * M_emb > 0; a per-frame map is projected frame by frame)."""
        if projection is None:
            return self.mfam
        record = _FORWARD
        if record is not None and id(projection) in record.projected:
            return record.projected[id(projection)]
        maps = self.mfam
        m_emb = projection(maps.flatten(0, 1)).view_as(maps) if maps.dim() == 4 else projection(maps)
        # Resizing keeps values within [min, max] of the map, so checking the image-space map once
        # covers every layer's tokens.
        check_finite("M_emb (FAMProjection output)", m_emb)
        if not torch.compiler.is_compiling() and lam > 0 and not 1.0 + lam * m_emb.min().item() > 0:
            raise ValueError(f"1 + lam * M_emb must be > 0: the FAMProjection output reaches "
                             f"{m_emb.min().item():.6g} with lam={lam}")
        if record is not None:
            record.projected[id(projection)] = m_emb
        return m_emb

    def layer_tokens(self, layer: str, projection: FAMProjection | None, lam: float, placement: Placement,
                     mode: str, batch_size: int, n_tokens: int, leading: int | torch.Tensor = 0) -> torch.Tensor:
        """The per-key map of layer ``layer`` over its ``n_tokens`` keys: ``leading`` zeros (time, class or
        text tokens in front: an int, or a (B,) tensor of per-sample text lengths), M_emb at the placement's
        image tokens, zeros for the rest (text after the image, padding); (N,) or (B, N). The layer
        counts as modulated (for ``strict`` and :func:`srdiff.fam_layers`)."""
        tokens = image_tokens(self.m_emb(projection, lam), placement, mode)
        if tokens.dim() == 2 and tokens.shape[0] not in (1, batch_size):
            raise ValueError(f"mfam holds {tokens.shape[0]} maps but the layer sees a batch of {batch_size}: "
                             "pass one (H, W) map or one per image (in a video model one per video, or one per "
                             "frame as (B, F, H, W))")
        if isinstance(leading, torch.Tensor):
            tokens = place_after(tokens, leading, n_tokens, batch_size)
        elif n_tokens != tokens.shape[-1]:
            tokens = F.pad(tokens, (leading, n_tokens - leading - tokens.shape[-1]))
        self.modulated += 1
        if _FORWARD is not None:
            _FORWARD.modulated.append(layer)
        return tokens


def place_after(tokens: torch.Tensor, leading: torch.Tensor, n_tokens: int, batch_size: int) -> torch.Tensor:
    """(B, n_tokens): sample b's image tokens (``tokens`` (n,) or (B|1, n)) right after its own
    ``leading[b]`` tokens, zeros elsewhere (a gather on the device: no host sync)."""
    n = tokens.shape[-1]
    index = torch.arange(n_tokens, device=tokens.device)[None] - leading.to(tokens.device)[:, None].long()
    inside = (index >= 0) & (index < n)
    rows = (tokens if tokens.dim() == 2 else tokens[None]).expand(batch_size, n)
    return torch.gather(rows, 1, index.clamp(0, n - 1)) * inside


class ForwardRecord:
    """One model forward: its input's geometry (None when unknown), the maps computed so far, the
    layers it modulated."""

    def __init__(self, geometry: InputGeometry | None, previous: "ForwardRecord | None"):
        self.geometry, self.previous = geometry, previous
        self.projected: dict[int, torch.Tensor] = {}
        self.modulated: list[str] = []

    def snapshot(self) -> "ForwardRecord":
        """A copy with the maps computed so far, for a checkpointed block's recomputation."""
        copy = ForwardRecord(self.geometry, None)
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
            must equal the batch the model sees); for video models also (B, F, H, W), one per frame
            (a 2-d or 3-d map is then the same for every frame). Values in [0, 1], image space, on the
            model's device. None switches the modulation off inside the block. Temporal attention
            layers of video models are never modulated (a spatial map says nothing about frames).
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
        check_tensor("mfam", mfam, ndim=(2, 3, 4), floating=True)
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


def push_forward(geometry: InputGeometry | None) -> ForwardRecord:
    global _FORWARD
    _FORWARD = ForwardRecord(geometry, _FORWARD)
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
    """Warn once per (map size, input size) whose aspect ratios differ (the map is resized anyway); not
    while torch.compile traces (a warning would break the graph: the eager run before it warns)."""
    H, W = mfam.shape[-2:]
    h, w = input_hw
    if H * w == W * h or torch.compiler.is_compiling():
        return
    key = (H, W, h, w)
    if key not in _ASPECT_WARNED:
        _ASPECT_WARNED.add(key)
        warnings.warn(f"mfam is {H}x{W} but the model's input is {h}x{w}: the map's aspect ratio differs "
                      f"from the input's; it is resized (stretched) to each layer's grid", stacklevel=3)
