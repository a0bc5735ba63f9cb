"""Masks: the one convention, its checker, random thick holes and mask files.

Convention everywhere in srdiff: a mask is (B, 1, H, W) float in [0, 1], 1 marks the hole (to be filled or
re-denoised), 0 the known pixels (kept bit for bit), values between a soft edge, as in diffusers'
inpainting pipelines. :func:`check_masks` is the one checker. Random holes, seeded: free-form strokes
(LaMa's "thick" irregular masks, Suvorov et al. 2022; RePaint's evaluation masks are of this kind) and boxes."""

from pathlib import Path

import torch

from srdiff._checks import check_tensor

MASK_KINDS = ("mixed", "strokes", "boxes")


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _segment_distance(grid: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(H, W) distance of each pixel centre in ``grid`` (H, W, 2) to the segment a-b."""
    ab = b - a
    t = ((grid - a) @ ab / ab.dot(ab).clamp_min(1e-12)).clamp(0, 1)
    return (grid - a - t[..., None] * ab).norm(dim=-1)


def stroke_mask(size: int, gen: torch.Generator) -> torch.Tensor:
    """(size, size): 1 to 4 polylines of 2 to 5 segments, each segment 10-40 % of the side long and
    8-20 % of the side thick (at least 1 px), starting anywhere."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    grid = torch.stack([xs, ys], -1)
    mask = torch.zeros(size, size)
    for _ in range(int(torch.randint(1, 5, (), generator=gen))):
        width = max(1.0, _uniform(gen, 0.08, 0.2) * size)
        point = torch.rand(2, generator=gen) * size
        for _ in range(int(torch.randint(2, 6, (), generator=gen))):
            angle = _uniform(gen, 0, 2 * torch.pi)
            length = _uniform(gen, 0.1, 0.4) * size
            end = (point + length * torch.tensor([torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))]))
            end = end.clamp(0, size)
            mask[_segment_distance(grid, point, end) <= width / 2] = 1.0
            point = end
    return mask


def box_mask(size: int, gen: torch.Generator) -> torch.Tensor:
    """(size, size): 1 or 2 axis-aligned boxes with sides of 20-50 % of the image side (at least 1 px)."""
    mask = torch.zeros(size, size)
    for _ in range(int(torch.randint(1, 3, (), generator=gen))):
        h, w = (max(1, round(_uniform(gen, 0.2, 0.5) * size)) for _ in range(2))
        top = int(torch.randint(0, size - h + 1, (), generator=gen))
        left = int(torch.randint(0, size - w + 1, (), generator=gen))
        mask[top:top + h, left:left + w] = 1.0
    return mask


def random_masks(n: int, size: int, *, seed: int, kind: str = "mixed") -> torch.Tensor:
    """(n, 1, size, size) float32 holes (1 = hole) drawn from ``seed``: ``kind`` 'strokes', 'boxes' or
    'mixed' (each image a stroke or a box mask with probability 1/2). Every mask has a hole."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {kind!r}")
    if size < 1 or n < 0:
        raise ValueError(f"n must be >= 0 and size >= 1, got n={n}, size={size}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        strokes = kind == "strokes" or (kind == "mixed" and bool(torch.rand((), generator=gen) < 0.5))
        out.append(stroke_mask(size, gen) if strokes else box_mask(size, gen))
    return torch.stack(out)[:, None] if out else torch.zeros(0, 1, size, size)


def check_masks(masks, images: torch.Tensor, name: str = "masks") -> torch.Tensor:
    """``masks`` as (B, 1, H, W) float32 in [0, 1] for ``images`` (B, C, H, W): given as (B, 1, H, W) or
    (B, H, W), one per image or one for all; bool (True = hole) or floating. Anything else raises
    (``TypeError``: not a tensor, another dtype; ``ValueError``: shape, count, values outside [0, 1]),
    naming ``name``."""
    check_tensor(name, masks, ndim=(3, 4))
    if masks.dtype != torch.bool and not masks.is_floating_point():
        raise TypeError(f"{name} must be bool or floating (1 = hole), got dtype {masks.dtype}")
    if masks.dim() == 3:
        masks = masks[:, None]
    if masks.shape[1] != 1:
        raise ValueError(f"{name} must be (B, 1, H, W) or (B, H, W), got shape {tuple(masks.shape)}")
    if masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"{name} must be {images.shape[-2]}x{images.shape[-1]} like the images, got "
                         f"{masks.shape[-2]}x{masks.shape[-1]}")
    if len(masks) not in (1, len(images)):
        raise ValueError(f"{name} must hold one mask or one per image ({len(images)}), got {len(masks)}")
    masks = masks.float()
    if masks.numel() and not (bool((masks >= 0).all()) and bool((masks <= 1).all())):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{masks.min().item()}, {masks.max().item()}]")
    return masks.expand(len(images), -1, -1, -1).contiguous()


def holes(masks: torch.Tensor) -> torch.Tensor:
    """Checked masks made binary: a pixel is a hole where its mask is > 0.5 (what a mask-conditioned
    model was trained on, and how ``srdiff inpaint`` reads anti-aliased mask images)."""
    return (masks > 0.5).float()


def read_masks(source: str, name: str = "--masks") -> torch.Tensor:
    """Masks as given, not resized: a tensor file (``torch.save`` of (N, 1, H, W) or (N, H, W)), one image
    file or a folder of them (greyscale, white = hole), as (N, 1, H, W) float in [0, 1]."""
    import numpy as np
    from PIL import Image

    from srdiff import data as srdata

    path = Path(source)
    if path.is_dir():
        files = srdata.image_files(path)
    elif path.is_file() and path.suffix.lower() in srdata.IMAGE_SUFFIXES:
        files = [path]
    elif path.is_file():
        masks = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(masks, torch.Tensor):
            raise ValueError(f"{name} {source!r} must hold one tensor, got a {type(masks).__name__}")
        return masks.float()
    else:
        raise ValueError(f"{name} must be a folder, an image file or a tensor file, got {source!r}")
    if not files:
        raise ValueError(f"{name} {source!r} holds no image")
    sizes = set()
    out = []
    for file in files:
        with Image.open(file) as img:
            out.append(torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0))
        sizes.add(tuple(out[-1].shape))
    if len(sizes) > 1:
        raise ValueError(f"{name} {source!r}: masks of different sizes {sorted(sizes)}")
    return torch.stack(out)[:, None]
