"""What a model's input says about where its image tokens lie: the batch, the input's (H, W), its
frames, the model's patch-token grid, the positions of packed tokens. Read from shapes, ints the
caller passes (``img_shapes``) and device tensors (``img_ids``), never from tensor values on the host,
so the model hook that reads it traces under ``torch.compile(fullgraph=True)``.

How a model shows them is declared per model class in :data:`srdiff.processors.families.MODEL_INPUTS`
(an :class:`InputSpec`); the default covers (B, C, H, W) images, (B, C, F, H, W) videos and packed
tokens with ``img_ids``.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

_INPUT_NAMES = ("sample", "hidden_states", "x")


@dataclass(frozen=True)
class InputGeometry:
    """One forward's input, as the layers need it.

    ``batch``: B. ``hw``: the input's (H, W) (pixels or latent), each layer's grid is found from it
    (:func:`srdiff.processors.placement.token_grid`). ``frames``: F of a video input (spatial layers
    see a batch of B * F). ``patch_grid``: the grid of the model's image tokens when the model
    declares its patch size, (h, w) or (f, h, w); it also says how many of a layer's tokens are the
    image's (text tokens beside them get 0). ``positions``: packed image tokens' (t, row, col), (Bp, n, 3)
    on the device (Flux's ``img_ids``). ``text_lengths``: (B,) valid text tokens in front of the image
    in each sample, where they differ per sample (Lumina 2's padded prompts)."""

    batch: int | None = None
    hw: tuple[int, int] | None = None
    frames: int | None = None
    patch_grid: tuple[int, ...] | None = None
    positions: torch.Tensor | None = None
    text_lengths: torch.Tensor | None = None

    def with_grid(self, grid: tuple[int, int]) -> "InputGeometry":
        """This geometry with the input's (H, W) given explicitly (``fam_context(grid=...)``): packed
        positions are dropped (the grid replaces them) and, for a model without a declared patch grid,
        the explicit grid is the token grid."""
        return replace(self, hw=grid, positions=None, patch_grid=self.patch_grid or grid)

    def image_token_count(self) -> int | None:
        """How many image tokens a layer's sequence holds (from the declared patch grid or the packed
        positions), or None when neither is known."""
        if self.patch_grid is not None:
            n = 1
            for g in self.patch_grid:
                n *= g
            return n
        if self.positions is not None:
            return self.positions.shape[-2]
        return None


def config_patch(model: nn.Module) -> tuple[int, ...] | None:
    """The patch size in ``model.config``: ``patch_size`` (an int, or a (pt, ph, pw) tuple) and, for
    video models that keep it apart, ``patch_size_t``; None for models without one (U-Nets)."""
    config = getattr(model, "config", None)
    p = getattr(config, "patch_size", None)
    if p is None:
        return None
    if isinstance(p, (tuple, list)):
        return tuple(int(x) for x in p)
    pt = getattr(config, "patch_size_t", None)
    return (int(p), int(p)) if pt is None else (int(pt), int(p), int(p))


@dataclass(frozen=True)
class InputSpec:
    """How a model class shows its input geometry.

    ``frames_dim``: the frame axis of a 5-d input (2: (B, C, F, H, W); 1: (B, F, C, H, W)).
    ``patch``: ``model -> (ph, pw) or (pt, ph, pw) or None``, the patch size that turns the input into
    the image-token grid (default :func:`config_patch`). ``read``: a reader for inputs the default does
    not understand, ``(model, args, kwargs) -> InputGeometry``.
    ``text_lengths``: ``kwargs -> (B,) tensor or None``, per-sample text lengths in front of the image."""

    frames_dim: int = 2
    patch: Callable[[nn.Module], tuple[int, ...] | None] = config_patch
    read: Callable[[nn.Module, tuple, dict], InputGeometry] | None = None
    text_lengths: Callable[[dict], torch.Tensor | None] | None = None


def _patch_grid(hw, frames, patch) -> tuple[int, ...] | None:
    if patch is None or hw is None:
        return None
    (H, W), (ph, pw) = hw, patch[-2:]
    grid = (H // ph, W // pw)
    if frames is None:
        return grid
    pt = patch[0] if len(patch) == 3 else 1
    return (frames // pt, *grid)


def read_input(model: nn.Module, spec: InputSpec, args: tuple, kwargs: dict) -> InputGeometry:
    """The geometry of one forward's input: ``spec.read`` if the model declares a reader; otherwise the
    first positional argument or ``sample``/``hidden_states``/``x`` (a 4-d image, a 5-d video laid out as
    ``spec.frames_dim`` says) and ``img_ids`` (packed tokens: (N, 3) or (B, N, C), columns t, row, col
    first)."""
    if spec.read is not None:
        geometry = spec.read(model, args, kwargs)
    else:
        sample = args[0] if args else next((kwargs[n] for n in _INPUT_NAMES if n in kwargs), None)
        batch = hw = frames = positions = None
        if isinstance(sample, torch.Tensor) and sample.dim() in (4, 5):
            batch, hw = sample.shape[0], tuple(sample.shape[-2:])
            frames = sample.shape[spec.frames_dim] if sample.dim() == 5 else None
        elif isinstance(sample, torch.Tensor) and sample.dim() == 3:
            batch = sample.shape[0]
        img_ids = kwargs.get("img_ids")
        if isinstance(img_ids, torch.Tensor) and img_ids.dim() in (2, 3) and img_ids.shape[-1] >= 3:
            positions = (img_ids if img_ids.dim() == 3 else img_ids[None])[..., :3]
        geometry = InputGeometry(batch=batch, hw=hw, frames=frames,
                                 patch_grid=_patch_grid(hw, frames, spec.patch(model)), positions=positions)
    if spec.text_lengths is not None:
        geometry = replace(geometry, text_lengths=spec.text_lengths(kwargs))
    return geometry


def read_packed_shapes(model: nn.Module, args: tuple, kwargs: dict) -> InputGeometry:
    """QwenImage-style packed tokens with ``img_shapes``: per sample a list of (frames, h, w) token grids,
    the generated image's first (edit models append reference images after it)."""
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    shapes = kwargs.get("img_shapes")
    if not shapes:
        return InputGeometry(batch=None if hidden_states is None else hidden_states.shape[0])
    first = shapes[0][0] if isinstance(shapes[0], list) else shapes[0]
    frames, h, w = (int(x) for x in first)
    grid = (h, w) if frames == 1 else (frames, h, w)
    return InputGeometry(batch=hidden_states.shape[0], hw=(h, w), patch_grid=grid)


def read_token_list(model: nn.Module, args: tuple, kwargs: dict) -> InputGeometry:
    """Z-Image-style inputs: ``x`` a list of (C, F, H, W) latents (one per sample, all of one size)
    and the patch sizes as arguments (``patch_size``, ``f_patch_size``; defaults 2 and 1)."""
    x = args[0] if args else kwargs.get("x")
    if not isinstance(x, (list, tuple)) or not x or any(t.shape != x[0].shape for t in x):
        raise ValueError("srdiff reads the image grid from x, a list of (C, F, H, W) latents of one size; got "
                         f"{[tuple(t.shape) for t in x] if isinstance(x, (list, tuple)) else type(x).__name__}")
    _, frames, H, W = x[0].shape
    p, pf = kwargs.get("patch_size", 2), kwargs.get("f_patch_size", 1)
    grid = (H // p, W // p) if frames == 1 else (frames // pf, H // p, W // p)
    return InputGeometry(batch=len(x), hw=(H, W), patch_grid=grid)


def read_ltx(model: nn.Module, args: tuple, kwargs: dict) -> InputGeometry:
    """LTX-style packed video tokens with ``num_frames``, ``height``, ``width`` (the latent token grid)."""
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    f, h, w = (kwargs.get(k) for k in ("num_frames", "height", "width"))
    if not all(isinstance(v, int) for v in (f, h, w)):
        return InputGeometry(batch=hidden_states.shape[0])
    return InputGeometry(batch=hidden_states.shape[0], hw=(h, w), frames=f, patch_grid=(f, h, w))
