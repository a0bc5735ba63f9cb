"""Images in, as float tensors (N, C, H, W) in [0, 1]: the bundled digits, folders of files, image files,
tensor files. Values are checked, never clamped (:func:`to_unit_range`). Image files are read at their bit
depth (16-bit grey as 0..65535, palettes through their colours), transparent pixels composited onto white,
and resized and centre-cropped to the training size, with one warning counting the images that were
composited, or cropped because their sizes differ or they are not square.

Nothing here downloads. The digits are scikit-learn's bundled 8x8 set (1,797 images), upscaled.
"""

import itertools
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from srdiff import datasets
from srdiff._checks import check_int
from srdiff._io import load_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Pillow's modes of single-channel images deeper than 8 bits (16-bit PNG greys); convert("L") clips them.
DEEP_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits as (1797, 1, size, size) images in [0, 1], and their labels.

    The 8x8 originals (values 0..16) are upscaled bilinearly, so strokes stay smooth at any size.
    """
    check_int("size", size, 8)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return images, torch.from_numpy(bunch.target).long()


def split(images: torch.Tensor, holdout: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible (train, held-out) split along the first dim: ``round(holdout * N)`` images (at least
    one) held out, at least one left to train on; fewer images than that raise ``ValueError``."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    n = len(images)
    if n - _n_holdout(n, holdout) < 1:
        need = next(m for m in itertools.count(2) if m - _n_holdout(m, holdout) >= 1)
        raise ValueError(f"{n} image(s) cannot be split into training and held-out images with holdout={holdout}: "
                         f"at least {need} are needed")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = _n_holdout(n, holdout)
    return images[order[n_hold:]], images[order[:n_hold]]


def _n_holdout(n: int, holdout: float) -> int:
    return max(1, int(round(holdout * n)))


def _decoded(img, channels: int):
    """``img`` as a PIL image to read ``channels`` from, and whether it had transparent pixels (then composited
    onto white): 8-bit ``L`` / ``RGB`` (palettes through their colours; Pillow reduces 16-bit colour to 8
    bits), or ``F`` in [0, 1] for 16-bit grey (``convert("L")`` would clip every value above 255 to white)."""
    from PIL import Image

    if img.mode in DEEP_GREY_MODES:
        arr = np.asarray(img, dtype=np.float32)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"mode {img.mode} values in [{arr.min():g}, {arr.max():g}] are not 16-bit grey levels")
        return Image.fromarray(arr / 65535.0), False
    composited = False
    if img.has_transparency_data:
        img = img.convert("RGBA")
        if img.getchannel("A").getextrema()[0] < 255:
            img, composited = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img), True
    return img.convert("L" if channels == 1 else "RGB"), composited


def _to_tensor(img, size: int, channels: int) -> tuple[torch.Tensor, bool]:
    """A PIL image decoded (:func:`_decoded`), resized (shorter side to ``size``) and centre-cropped to
    (channels, size, size), and whether it was composited onto white."""
    from PIL import Image

    img, composited = _decoded(img, channels)
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.array(img, dtype=np.float32)  # a copy: an "F" image's array would be read-only
    t = torch.from_numpy(arr if img.mode == "F" else arr / 255.0)
    if t.dim() == 3:
        return t.permute(2, 0, 1), composited
    return t.expand(channels, -1, -1).contiguous(), composited


def _warn_conversions(source, sizes: list[tuple[int, int]], composited: int, size: int) -> None:
    """One warning counting the images of ``source`` (their (W, H) ``sizes`` as read) that were composited
    onto white, one counting those whose crop to ``size`` x ``size`` is not a plain resize: a folder of mixed
    sizes, or non-square images (their edges are cut)."""
    n = len(sizes)
    if composited:
        warnings.warn(f"{source}: {composited} of {n} image(s) have transparent pixels: composited onto white",
                      UserWarning, stacklevel=3)
    counts = Counter(sizes)
    non_square = sum(c for (w, h), c in counts.items() if w != h)
    if len(counts) == 1 and not non_square:
        return
    crop = f"resized (shorter side to {size}) and centre-cropped to {size}x{size}"
    if n == 1:
        warnings.warn(f"{source} is {sizes[0][0]}x{sizes[0][1]}: {crop}, cutting its edges", UserWarning, stacklevel=3)
        return
    shown = ", ".join(f"{w}x{h} ({c})" for (w, h), c in counts.most_common(3))
    more = f" and {len(counts) - 3} more" if len(counts) > 3 else ""
    cut = f", cutting the edges of the {non_square} non-square one(s)" if non_square else ""
    warnings.warn(f"{source}: {n} images in {len(counts)} size(s) ({shown}{more}): each {crop}{cut}", UserWarning,
                  stacklevel=3)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder`` or below it, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"image folder {str(folder)!r} is not a directory")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_image_folder(folder: str | os.PathLike, size: int, channels: int = 3) -> tuple[torch.Tensor, list[Path]]:
    """Every readable PNG/JPEG under ``folder`` as (N, channels, size, size) in [0, 1], and the path
    of each image read, in the same order.

    Any size or mode is accepted (decoded, resized and centre-cropped as the module docstring says, with
    one warning counting the images composited onto white and one counting those cropped). Unreadable
    files are skipped with one warning each; a folder with no readable image raises ``ValueError``.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    out, paths, sizes, composited = [], [], [], 0
    for path in image_files(folder):
        try:
            with Image.open(path) as img:
                image, transparent = _to_tensor(img, size, channels)
                sizes.append(img.size)
            out.append(image)
            paths.append(path)
            composited += transparent
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            warnings.warn(f"skipping unreadable image {path}: {exc}", RuntimeWarning, stacklevel=2)
    if not out:
        raise ValueError(f"no readable image in {str(folder)!r}")
    _warn_conversions(f"image folder {str(folder)!r}", sizes, composited, size)
    return torch.stack(out), paths


def load_image_folder(folder: str | os.PathLike, size: int, channels: int = 3) -> torch.Tensor:
    """:func:`read_image_folder`'s images only."""
    return read_image_folder(folder, size, channels)[0]


def load_images(source: str | os.PathLike, size: int, channels: int) -> torch.Tensor:
    """:func:`read_images`'s images only: (N, channels, size, size) float32 in [0, 1]."""
    return read_images(source, size, channels)[0]


def load_labels(source: str | os.PathLike, size: int) -> torch.Tensor | None:
    """The class labels of a built-in set (``"digits"``, ``"mnist"``), in :func:`read_images`' order;
    None for every other source."""
    if str(source) == "digits":
        return digits(size)[1]
    if str(source) in datasets.NAMED:
        return datasets.load(str(source), size)[1]
    return None


def read_images(source: str | os.PathLike, size: int, channels: int) -> tuple[torch.Tensor, list[str]]:
    """``"digits"``, a folder of images, one image file, or a tensor file (``torch.save`` of one
    (N, C, H, W) tensor: see :func:`load_tensor_file`) as (N, channels, size, size) float32 in [0, 1],
    and a name per image for output files: a folder's images by their path below it (``a/b.png`` ->
    ``a__b``), an image file by its stem, the others by index (``0000``, ``0001``, ...).
    """
    from srdiff.viz import numbered_names

    path = Path(source)
    if str(source) == "digits":
        images = match_channels(digits(size)[0], channels)
    elif str(source) in datasets.NAMED:
        images = match_channels(datasets.load(str(source), size)[0], channels)
    elif path.is_dir():
        images, paths = read_image_folder(path, size, channels)
        return images, [str(p.relative_to(path).with_suffix("")).replace(os.sep, "__") for p in paths]
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return read_image_file(path, size, channels)[None], [path.stem]
    elif path.is_file():
        images = load_tensor_file(path, size, channels)
    else:
        raise ValueError(f"image source must be 'digits', a folder, an image file or a tensor file, got {str(source)!r}")
    return images, numbered_names(len(images), "")


def read_image_file(path: str | os.PathLike, size: int, channels: int = 3) -> torch.Tensor:
    """One PNG/JPEG/... as (channels, size, size) in [0, 1] (decoded, resized and centre-cropped as the module
    docstring says, with a warning where it was composited or cropped); an unreadable file raises
    ``ValueError``."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        with Image.open(path) as img:
            image, composited = _to_tensor(img, size, channels)
            _warn_conversions(f"image {str(path)!r}", [img.size], int(composited), size)
            return image
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from None


def load_tensor_file(path: str | os.PathLike, size: int, channels: int) -> torch.Tensor:
    """A ``torch.save`` of one (N, C, H, W) tensor with C in (1, 3) as (N, channels, size, size) float32 in
    [0, 1] (bilinear resize; grey <-> RGB). Values: see :func:`to_unit_range` (checked, never clamped).

    Loaded with ``weights_only=True``: nothing but tensors is unpickled. A file torch cannot read, anything
    but one 4-d tensor, or values out of range raise ``ValueError`` naming the file.
    """
    name = repr(str(path))
    images = load_file(path, "a tensor file (torch.save of one (N, C, H, W) tensor)")
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must hold one (N, C, H, W) tensor, got a {type(images).__name__}")
    shape = tuple(images.shape)
    if images.dim() != 4:
        hint = "; one image (C, H, W)? save x[None]" if images.dim() == 3 else ""
        raise ValueError(f"{name} must hold an (N, C, H, W) tensor, got shape {shape} ({images.dtype}){hint}")
    if shape[1] not in (1, 3):
        hint = "; channels-last (N, H, W, C)? save x.permute(0, 3, 1, 2)" if shape[-1] in (1, 3) else ""
        raise ValueError(f"{name} must hold an (N, C, H, W) tensor with C = 1 or 3, got shape {shape}{hint}")
    if shape[0] == 0:
        raise ValueError(f"{name} holds no images: shape {shape}")
    images = to_unit_range(images, name)
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return match_channels(images, channels)


def to_unit_range(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """``images`` as float32 in [0, 1], checked, never clamped: float in [0, 1] as is; uint8 (0..255) divided
    by 255 and float in [-1, 1] (with some value below 0) mapped by (x + 1) / 2, each with a warning saying
    so; anything else (other dtypes, non-finite values, other ranges) raises ``ValueError`` naming ``name``,
    the shape, the dtype and the range."""
    if images.dtype == torch.uint8:
        warnings.warn(f"{name}: uint8 values read as 0..255 and divided by 255", UserWarning, stacklevel=3)
        return images.float() / 255
    described = f"shape {tuple(images.shape)}, dtype {images.dtype}"
    if not images.is_floating_point():
        raise ValueError(f"{name} must be uint8 (0..255) or float in [0, 1] or [-1, 1], got {described}")
    images = images.float()
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} must be finite, got NaN or inf values ({described})")
    lo, hi = (float(v) for v in torch.aminmax(images))
    described += f", values in [{lo:g}, {hi:g}]"
    if lo >= 0.0 and hi <= 1.0:
        return images
    if lo >= -1.0 and hi <= 1.0:
        warnings.warn(f"{name}: values in [{lo:g}, {hi:g}] read as [-1, 1] and mapped to [0, 1] by (x + 1) / 2",
                      UserWarning, stacklevel=3)
        return (images + 1) / 2
    raise ValueError(f"{name} must be uint8 (0..255) or float in [0, 1] or [-1, 1], got {described}; "
                     "rescale it (nothing is clamped)")


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey <-> RGB: repeat a single channel, or average three into one."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if images.shape[1] == 3 and channels == 1:
        return images.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {images.shape[1]} channels to {channels}")
