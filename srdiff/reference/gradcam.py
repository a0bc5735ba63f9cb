"""Grad-CAM reduction in plain PyTorch: the oracle for srdiff._C and its fallback."""

import torch
import torch.nn.functional as F

# pytorch-grad-cam's scale_cam_image divides by (1e-7 + max - min): a constant map becomes all zeros.
NORMALIZE_EPS = 1e-7


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max scaling of (B, H, W) to [0, 1], exactly as pytorch-grad-cam does it."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    shifted = maps - lo
    return shifted / (NORMALIZE_EPS + shifted.flatten(1).max(dim=1).values[:, None, None])


def gradcam_reduce_ref(
    activations: torch.Tensor,
    gradients: torch.Tensor,
    size: tuple[int, int] | None = None,
    normalize: bool = True,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """Grad-CAM maps from a layer's activations and the gradients of the target score.

    activations, gradients: (B, C, h, w). alpha[b, c] = mean over (h, w) of gradients;
    cam[b] = ReLU(sum_c alpha[b, c] * activations[b, c]); with ``normalize`` min-max scaled per image;
    with ``size=(H, W)`` resized bilinearly (half-pixel centres) and, if normalizing, scaled again,
    the sequence pytorch-grad-cam's ``GradCAM`` follows. Returns (B, h, w) or (B, H, W), float32 when
    ``upcast`` (the default), else in the input dtype.
    """
    A, G = (activations.float(), gradients.float()) if upcast else (activations, gradients)
    alpha = G.mean(dim=(2, 3), keepdim=True)
    cam = (alpha * A).sum(dim=1).clamp_min(0)
    if normalize:
        cam = minmax_normalize(cam)
    if size is not None:
        cam = F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        if normalize:
            cam = minmax_normalize(cam)
    return cam
