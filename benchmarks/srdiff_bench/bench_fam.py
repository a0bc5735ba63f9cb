"""Flaw activation maps end to end: srdiff's ``FlawHighlighter.fam`` vs pytorch-grad-cam's ``GradCAM``
on the same model, target layer and class (1, "fake"). Both run the network forward and backward
to the target layer; srdiff keeps everything on the device (autograd.grad to the target activations
only, the fused srdiff.gradcam_reduce), pytorch-grad-cam takes a full backward into every parameter
and post-processes in numpy and OpenCV.

Cases, as in the issue: batch 32 at 64 px (the default "small" CNN, its stage 3: 16x16 at 64 px) and
batch 8 at 224 px (VGG16, the ReLU after its last convolution: 14x14). ``fams_per_s`` is batch /
median time (pytorch-grad-cam is reported unavailable where it is not installed). ``srdiff`` is ``fam(mirror=False)``, the same maps as pytorch-grad-cam (like for like);
``srdiff-mirror`` is the default ``fam(images)``, which also maps each image's mirror image (twice the
network work, better localisation: docs/highlighter.md).
"""

import pytest
import torch

from srdiff_bench.common import DEVICE, QUICK, measure, require_module

OP = "fam"
CASES = [
    pytest.param("small", 32, 64, id="small-B32-64px"),
    pytest.param("vgg16", 8, 224, id="vgg16-B8-224px"),
]
PROVIDERS = ["srdiff", "srdiff-mirror", "pytorch-grad-cam"]


def _highlighter(backbone: str, size: int):
    from srdiff.highlighter import FlawHighlighter

    torch.manual_seed(0)
    return FlawHighlighter(backbone, in_channels=3, image_size=size).to(DEVICE).eval()


@pytest.mark.benchmark(group=OP)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backbone, batch, size", CASES[:1] if QUICK else CASES)
def test_fam(benchmark, provider, backbone, batch, size):
    hl = _highlighter(backbone, size)
    images = torch.rand(batch, 3, size, size, device=DEVICE)
    layer = hl.target_layers[0]
    case = dict(op=OP, provider=provider, mode="fwd+bwd", dtype=torch.float32,
                shape={"backbone": backbone, "layer": layer, "B": batch, "HW": [size, size]})
    if provider.startswith("srdiff"):
        mirror = provider == "srdiff-mirror"
        fn = lambda: hl.fam(images, mirror=mirror)  # noqa: E731
        measure(benchmark, fn, rounds=3 if DEVICE == "cpu" else None, **case)
    else:
        require_module("pytorch_grad_cam", **case)
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(1)] * batch
        with GradCAM(model=hl, target_layers=[hl.net.get_submodule(layer)]) as cam:
            fn = lambda: cam(input_tensor=images, targets=targets)  # noqa: E731
            measure(benchmark, fn, rounds=3 if DEVICE == "cpu" else None, **case)
    benchmark.extra_info["fams_per_s"] = batch / (benchmark.extra_info["median_ms"] / 1e3)
