"""Pictures for people: image grids, FAM heatmap overlays, contact sheets. Inputs are [0, 1] tensors."""

import math
import os

import numpy as np
import torch

from srdiff._checks import check_int

# Matplotlib's "jet" as five anchors; enough for a heatmap and no matplotlib import.
_JET = torch.tensor(
    [[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]]
)


def colormap(values: torch.Tensor) -> torch.Tensor:
    """(..., H, W) in [0, 1] -> (..., 3, H, W) jet colours."""
    v = values.detach().float().cpu().clamp(0, 1) * (len(_JET) - 1)
    lo = v.floor().long().clamp(max=len(_JET) - 2)
    frac = (v - lo)[..., None]
    rgb = _JET[lo] * (1 - frac) + _JET[lo + 1] * frac
    return rgb.movedim(-1, -3)


def overlay(images: torch.Tensor, fams: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Heatmaps of ``fams`` (B, H, W) over ``images`` (B, C, H, W); returns (B, 3, H, W) in [0, 1]."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if fams.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"fams spatial size {tuple(fams.shape[-2:])} != images {tuple(images.shape[-2:])}")
    return ((1 - alpha) * images + alpha * colormap(fams)).clamp(0, 1)


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one uint8 (rows, cols, 3) picture, ``nrow`` images per row."""
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    canvas = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_png(picture: np.ndarray | torch.Tensor, path: str | os.PathLike, upscale: int = 1) -> None:
    """Write a uint8 (H, W, 3) array, or a (C, H, W) tensor in [0, 1], as PNG (nearest upscaling)."""
    from PIL import Image

    check_int("upscale", upscale, 1)
    if isinstance(picture, torch.Tensor):
        picture = grid(picture[None], nrow=1, pad=0)
    img = Image.fromarray(picture)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, upscale: int = 1) -> None:
    """:func:`grid` of ``images`` (N, C, H, W) in [0, 1] written as PNG, each pixel ``upscale`` x ``upscale``."""
    save_png(grid(images, nrow), path, upscale)


def numbered_names(n: int, suffix: str) -> list[str]:
    """``0000<suffix>``, ``0001<suffix>``, ...: ``n`` file names that sort in order (at least 4 digits)."""
    width = max(4, len(str(n - 1)))
    return [f"{i:0{width}d}{suffix}" for i in range(n)]
