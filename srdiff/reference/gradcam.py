"""Grad-CAM reduction in plain PyTorch: the oracle for srdiff._C and its fallback."""

import torch
import torch.nn.functional as F

# pytorch-grad-cam's scale_cam_image divides by (1e-7 + max - min): a constant map becomes all zeros.
NORMALIZE_EPS = 1e-7
# What the finiteness check flags (csrc/gradcam.h NonFinite): a gradient channel mean, a weighted sum.
GRADIENT_MEAN, WEIGHTED_SUM = 1, 2


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
    check_finite: bool = False,
) -> torch.Tensor:
    """Grad-CAM maps from a layer's activations and the gradients of the target score.

    activations, gradients: (B, C, h, w). alpha[b, c] = mean over (h, w) of gradients;
    cam[b] = ReLU(sum_c alpha[b, c] * activations[b, c]); with ``normalize`` min-max scaled per image;
    with ``size=(H, W)`` resized bilinearly (half-pixel centres) and, if normalizing, scaled again,
    the sequence pytorch-grad-cam's ``GradCAM`` follows. Returns (B, h, w) or (B, H, W), float32 when
    ``upcast`` (the default), else in the input dtype.

    ``check_finite``: raise ``ValueError`` (:func:`raise_nonfinite`) where a channel mean of the gradients
    or a weighted sum over channels (before the ReLU, which would turn NaN into 0) is not finite, as the
    extension's kernels do on their own passes.
    """
    A, G = (activations.float(), gradients.float()) if upcast else (activations, gradients)
    alpha = G.mean(dim=(2, 3), keepdim=True)
    weighted = (alpha * A).sum(dim=1)
    if check_finite:
        flags = (0 if bool(torch.isfinite(alpha).all()) else GRADIENT_MEAN) | (
            0 if bool(torch.isfinite(weighted).all()) else WEIGHTED_SUM)
        if flags:
            raise_nonfinite(activations, gradients, flags)
    cam = weighted.clamp_min(0)
    if normalize:
        cam = minmax_normalize(cam)
    if size is not None:
        cam = F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        if normalize:
            cam = minmax_normalize(cam)
    return cam


def raise_nonfinite(activations: torch.Tensor, gradients: torch.Tensor, flags: int):
    """Say what made a Grad-CAM reduction non-finite (``flags``: :data:`GRADIENT_MEAN` | :data:`WEIGHTED_SUM`),
    with the messages of the extension (``csrc/gradcam.h`` ``raise_nonfinite``): non-finite gradients,
    non-finite activations, or finite values whose float32 sums overflow."""
    for name, t, source in (("gradients", gradients, "the classifier's score"), ("activations", activations,
                                                                                  "the layer's output")):
        nonfinite = ~torch.isfinite(t)
        count = int(nonfinite.sum())
        if count:
            image = int(nonfinite.flatten(1).any(1).int().argmax())
            raise ValueError(f"gradcam_reduce: {name} must be finite, found {count} non-finite value(s) of {t.numel()} "
                             f"(the first in image {image}): {source} diverged, a map made from it would point anywhere")
    if flags & GRADIENT_MEAN:
        raise ValueError("gradcam_reduce: gradients must be finite after averaging, but a float32 sum over (h, w) "
                         f"overflows (largest |gradient| {float(gradients.abs().max()):g}): scale the target score down")
    raise ValueError("gradcam_reduce: the gradient-weighted sum of activations over channels must be finite, but a "
                     f"float32 sum overflows (largest |activation| {float(activations.abs().max()):g}): scale the "
                     "target score or the layer's output down")
