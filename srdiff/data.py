"""Images in, as float tensors (N, C, H, W) in [0, 1]: the bundled digits, folders of files, tensor files.

Nothing here downloads. The digits are scikit-learn's bundled 8x8 set (1,797 images), upscaled.
"""

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits as (1797, 1, size, size) images in [0, 1], and their labels.

    The 8x8 originals (values 0..16) are upscaled bilinearly, so strokes stay smooth at any size.
    """
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return images, torch.from_numpy(bunch.target).long()


def split(images: torch.Tensor, holdout: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible (train, held-out) split along the first dim."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(round(holdout * len(images))))
    return images[order[n_hold:]], images[order[:n_hold]]


def _to_tensor(img, size: int, channels: int) -> torch.Tensor:
    """A PIL image resized (shorter side to ``size``) and centre-cropped to (channels, size, size)."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    return t[None] if channels == 1 else t.permute(2, 0, 1)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder`` or below it, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"image folder {str(folder)!r} is not a directory")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_image_folder(folder: str | os.PathLike, size: int, channels: int = 3) -> tuple[torch.Tensor, list[Path]]:
    """Every readable PNG/JPEG under ``folder`` as (N, channels, size, size) in [0, 1], and the path
    of each image read, in the same order.

    Any size or mode is accepted (resized and centre-cropped). Unreadable files are skipped with one
    warning each; a folder with no readable image raises ``ValueError``.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    out, paths = [], []
    for path in image_files(folder):
        try:
            with Image.open(path) as img:
                out.append(_to_tensor(img, size, channels))
            paths.append(path)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            warnings.warn(f"skipping unreadable image {path}: {exc}", RuntimeWarning, stacklevel=2)
    if not out:
        raise ValueError(f"no readable image in {str(folder)!r}")
    return torch.stack(out), paths


def load_image_folder(folder: str | os.PathLike, size: int, channels: int = 3) -> torch.Tensor:
    """:func:`read_image_folder`'s images only."""
    return read_image_folder(folder, size, channels)[0]


def load_images(source: str | os.PathLike, size: int, channels: int) -> torch.Tensor:
    """``"digits"``, a folder of images, or a tensor file (``torch.save`` of (N, C, H, W) in [0, 1]).

    Everything comes back as (N, channels, size, size) float32 in [0, 1].
    """
    if str(source) == "digits":
        images = digits(size)[0]
    elif Path(source).is_dir():
        return load_image_folder(source, size, channels)
    elif Path(source).is_file():
        images = torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"{str(source)!r} must hold a (N, C, H, W) tensor, got {type(images).__name__}")
        images = images.float()
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"image source must be 'digits', a folder or a tensor file, got {str(source)!r}")
    return match_channels(images.clamp(0, 1), channels)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey <-> RGB: repeat a single channel, or average three into one."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if images.shape[1] == 3 and channels == 1:
        return images.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {images.shape[1]} channels to {channels}")
