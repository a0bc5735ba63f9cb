"""Grad-CAM reduction: from a layer's activations and gradients to one normalised map per image.

Follow a call: :func:`gradcam_reduce` checks its arguments (the shared checks of ``srdiff/_checks.py``),
then runs ``torch.ops.srdiff.gradcam_reduce``
(``csrc/ops.cpp`` schema; ``csrc/cpu/gradcam_cpu.cpp``, ``csrc/cuda/gradcam_cuda.cu`` kernels) or,
when the extension is unavailable, :func:`srdiff.reference.gradcam_reduce_ref`.

``minmax_normalize`` is the per-map scaling the op applies (pytorch-grad-cam's), for maps combined
after it (the highlighter's mirrored and multi-layer means); it is the reference's function, which
the kernels reproduce.
"""

from collections.abc import Sequence

import torch

from srdiff import _extension
from srdiff._checks import (
    SUPPORTED_DTYPES,
    check_choice,
    check_dtype,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from srdiff.reference.gradcam import gradcam_reduce_ref, minmax_normalize

BACKENDS = ("extension", "reference")


def _check_args(activations, gradients, size) -> None:
    """Metadata-only checks, shared by the eager path and the fake (meta) kernel."""
    check_tensor("activations", activations, ndim=4)
    check_tensor("gradients", gradients)
    if gradients.shape != activations.shape:
        raise ValueError(
            f"gradients must have the shape of activations {tuple(activations.shape)}, got {tuple(gradients.shape)}"
        )
    check_dtype("activations", activations, SUPPORTED_DTYPES)
    check_same_dtype("gradients", gradients, "activations", activations)
    check_same_device(activations=activations, gradients=gradients)
    if activations.numel() == 0:
        raise ValueError(f"activations must be non-empty, got shape {tuple(activations.shape)}")
    if size is not None and not (
        isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)
    ):
        raise ValueError(f"size must be None or two positive ints (H, W), got {size!r}")


def gradcam_reduce(
    activations: torch.Tensor,
    gradients: torch.Tensor,
    size: tuple[int, int] | None = None,
    normalize: bool = True,
    *,
    check_finite: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Reduce Grad-CAM activations and gradients to one map per image.

    Args:
        activations: (B, C, h, w) feature map of the target layer; float32, float16 or bfloat16,
            any strides, on CPU or CUDA. Accumulation is in float32.
        gradients: (B, C, h, w), the gradient of the target score (e.g. the "fake" logit) with
            respect to ``activations``; same dtype and device.
        size: optional (H, W): resize the maps bilinearly with half-pixel centres
            (``F.interpolate(align_corners=False)``, OpenCV ``INTER_LINEAR``).
        normalize: scale each map to [0, 1] by (x - min) / (1e-7 + max - min); a constant map becomes
            zeros, never NaN. With ``size`` the resized map is scaled once more, exactly the sequence
            of pytorch-grad-cam's ``GradCAM``, whose maps this reproduces.
        check_finite: raise ``ValueError`` if ``gradients`` or ``activations`` hold NaN or inf, or
            finite values whose float32 sums (a gradient channel's over (h, w), the weighted sum over
            channels) overflow. A non-finite input means the classifier or the layer diverged: a map
            made from it would point anywhere (the ReLU would even turn NaN into a clean 0), so srdiff
            refuses it rather than guess. Each backend tests the channel means and the weighted sums
            (before the ReLU) on the passes that compute them, reading no input twice; on CUDA one
            device sync reads the flags back, also under ``torch.compile``. Only a failure pays for
            a scan that names the culprit.
        backend: ``None`` (the extension when built, else the reference), ``"extension"`` or
            ``"reference"`` (:func:`srdiff.reference.gradcam_reduce_ref`).

    Returns:
        (B, h, w), or (B, H, W) with ``size``: float32, on the inputs' device.

    FAMs are constants to the diffusion model, so the op has no backward: asking for a gradient
    through it raises ``RuntimeError``.

    Example::

        >>> acts, grads = torch.rand(4, 64, 8, 8), torch.randn(4, 64, 8, 8)
        >>> srdiff.gradcam_reduce(acts, grads, size=(32, 32)).shape
        torch.Size([4, 32, 32])
    """
    _check_args(activations, gradients, size)
    if backend is not None:
        check_choice("backend", backend, BACKENDS)
    if backend == "extension" and not _extension.HAS_EXT:
        raise RuntimeError(f"backend='extension' but srdiff._C is unavailable: {_extension.WHY_NOT}")
    use_reference = backend == "reference" or not _extension.HAS_EXT
    if activations.is_cuda and not _extension.has_cuda_backend():
        use_reference = True
    if use_reference:
        return gradcam_reduce_ref(activations, gradients, size, normalize, check_finite=check_finite)
    size = None if size is None else list(size)
    return _gradcam_reduce_op(activations, gradients, size, normalize, check_finite)


if _extension.HAS_EXT:
    _gradcam_reduce_op = torch.ops.srdiff.gradcam_reduce.default

    @torch.library.register_fake("srdiff::gradcam_reduce")
    def _gradcam_reduce_fake(activations, gradients, size=None, normalize=True, check_finite=True):
        _check_args(activations, gradients, None if size is None else tuple(size))
        H, W = activations.shape[2:] if size is None else size
        return activations.new_empty((activations.shape[0], H, W), dtype=torch.float32)

    def _gradcam_reduce_backward(ctx, grad_output):
        raise RuntimeError(
            "srdiff.gradcam_reduce has no backward: flaw activation maps are constants to the model "
            "they guide. Detach its inputs, or compute the map under torch.no_grad()."
        )

    torch.library.register_autograd(
        "srdiff::gradcam_reduce", _gradcam_reduce_backward, setup_context=lambda ctx, inputs, output: None
    )
