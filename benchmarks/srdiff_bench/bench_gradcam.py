"""Grad-CAM reduction: srdiff._C (C++ on CPU, CUDA on GPU) vs the eager reference vs pytorch-grad-cam's
post-processing (its numpy weighting, ReLU, min-max scaling and OpenCV resize), same inputs; that
peer is reported unavailable where pytorch-grad-cam is not installed (the GPU image has no wheel).

Bytes that must move: read A and G once in their dtype, write the float32 maps."""

import numpy as np
import pytest
import torch

import srdiff
from srdiff_bench.common import DEVICE, measure, require_module, unavailable
from srdiff import _extension
from srdiff.reference import gradcam_reduce_ref

# (B, C, h, w) -> size, as in the issue: VGG at 224 px, a 64 px model, an early wide layer.
SHAPES = [
    pytest.param((8, 512, 14, 14), (224, 224), id="B8-C512-14x14-to224"),
    pytest.param((32, 512, 4, 4), (64, 64), id="B32-C512-4x4-to64"),
    pytest.param((64, 256, 32, 32), (128, 128), id="B64-C256-32x32-to128"),
]
DTYPES = [torch.float32, torch.float16] if DEVICE == "cuda" else [torch.float32]
PROVIDERS = ["srdiff", "reference", "pytorch-grad-cam"]


def _grad_cam_postprocess(acts: torch.Tensor, grads: torch.Tensor, size) -> np.ndarray:
    """What pytorch-grad-cam's GradCAM does after its hooks: device -> numpy, weights, cam, scale."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image

    a, g = acts.float().cpu().numpy(), grads.float().cpu().numpy()
    weights = GradCAM.get_cam_weights(None, None, None, None, a, g)
    cam = np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0)
    return scale_cam_image(scale_cam_image(cam, (size[1], size[0])))


@pytest.mark.benchmark(group="gradcam")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, size", SHAPES)
def test_gradcam_reduce(benchmark, provider, dtype, shape, size):
    case = dict(op="gradcam", provider=provider, mode="fwd", shape={"BChw": list(shape), "size": list(size)}, dtype=dtype)
    acts = torch.rand(shape, device=DEVICE).to(dtype)
    grads = torch.randn(shape, device=DEVICE).to(dtype)
    if provider == "srdiff":
        if not _extension.HAS_EXT:
            unavailable(reason=f"srdiff._C unavailable: {_extension.WHY_NOT}", **case)
        fn = lambda: srdiff.gradcam_reduce(acts, grads, size)  # noqa: E731  (default args: checks on)
    elif provider == "reference":
        fn = lambda: gradcam_reduce_ref(acts, grads, size)  # noqa: E731
    else:
        require_module("pytorch_grad_cam", **case)
        fn = lambda: _grad_cam_postprocess(acts, grads, size)  # noqa: E731
    bytes_moved = 2 * acts.numel() * acts.element_size() + shape[0] * size[0] * size[1] * 4
    measure(benchmark, fn, bytes_moved=bytes_moved, **case)
