"""Bringing images to the highlighter's input size (shared by the model and its training)."""

import torch
import torch.nn.functional as F


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): bilinear with half-pixel centres, antialiased when it
    shrinks; the input itself when it already has that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=images.shape[-1] > size or images.shape[-2] > size)
