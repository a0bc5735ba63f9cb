"""srdiff.gradcam_reduce: the C++/CUDA extension against its reference and against pytorch-grad-cam.

The maps are computed in float32 from the same inputs on every path, so the float32 row of the
tolerance table applies whatever the input dtype; the reduction behind one pixel is C*h*w long.
"""

import os
import subprocess
import sys

import pytest
import torch

import srdiff
from srdiff import _extension, noise_extension
from srdiff.reference import gradcam_reduce_ref
from srdiff_testing import DTYPES, assert_close, channels_last_like, cpu_and_cuda, needs_ext, strided

SHAPES = [
    pytest.param((2, 64, 8, 8), id="B2-C64-8x8"),
    pytest.param((3, 3, 7, 5), id="B3-C3-7x5"),
    pytest.param((1, 17, 1, 9), id="B1-C17-1x9"),
]
LAYOUTS = ["contiguous", "strided", "channels_last"]
SIZES = [pytest.param(None, id="nosize"), pytest.param((16, 13), id="up16x13"), pytest.param((3, 4), id="down3x4")]


def _inputs(shape, dtype, device, layout):
    acts = torch.rand(shape, device=device).to(dtype)  # post-ReLU activations are >= 0
    grads = torch.randn(shape, device=device).to(dtype)
    if layout == "strided":
        acts, grads = strided(acts), strided(grads)
    elif layout == "channels_last":
        acts, grads = channels_last_like(acts), channels_last_like(grads)
    return acts, grads


def _reduce_dim(shape):
    return shape[1] * shape[2] * shape[3]


def test_extension_is_built():
    """CI builds srdiff._C (with its CUDA backend): a build that silently fell back must fail here."""
    if os.environ.get("SRDIFF_REQUIRE_EXT") == "1":
        assert _extension.HAS_EXT, _extension.WHY_NOT
        assert noise_extension.available(), "srdiff._C was built without its CPU noise kernels"
    if os.environ.get("SRDIFF_REQUIRE_CUDA_BUILD") == "1":
        assert _extension.has_cuda_backend(), "srdiff._C was built without its CUDA backend"


@needs_ext
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_extension_matches_reference(device, dtype, shape, layout, size, normalize):
    acts, grads = _inputs(shape, dtype, device, layout)
    out = srdiff.gradcam_reduce(acts, grads, size, normalize, backend="extension")
    ref = gradcam_reduce_ref(acts, grads, size, normalize)
    assert out.dtype == torch.float32 and out.device == acts.device
    assert_close(out, ref, dtype=torch.float32, reduce_dim=_reduce_dim(shape))
    if normalize:
        assert out.min() >= 0 and out.max() <= 1


@needs_ext
@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu(dtype):
    acts, grads = _inputs((4, 96, 14, 14), dtype, "cpu", "contiguous")
    cpu = srdiff.gradcam_reduce(acts, grads, (224, 224))
    gpu = srdiff.gradcam_reduce(acts.cuda(), grads.cuda(), (224, 224))
    assert_close(gpu, cpu, dtype=torch.float32, reduce_dim=_reduce_dim(acts.shape))


@pytest.mark.parametrize("backend", [pytest.param("extension", marks=needs_ext), "reference"])
def test_constant_map_becomes_zeros(backend):
    acts = torch.ones(2, 4, 5, 5)
    grads = torch.ones(2, 4, 5, 5)
    out = srdiff.gradcam_reduce(acts, grads, (10, 10), backend=backend)
    assert torch.equal(out, torch.zeros(2, 10, 10))


@needs_ext
@pytest.mark.parametrize("size", [None, [9, 11]], ids=["nosize", "size"])
@pytest.mark.parametrize("check_finite", [True, False], ids=["checked", "unchecked"])
def test_opcheck(size, check_finite):
    import srdiff.gradcam  # noqa: F401  (registers the fake kernel; srdiff imports it lazily)

    acts, grads = _inputs((2, 5, 7, 5), torch.float32, "cpu", "contiguous")
    torch.library.opcheck(torch.ops.srdiff.gradcam_reduce.default, (acts, grads, size, True, check_finite))


@needs_ext
def test_torch_compile_fullgraph():
    acts, grads = _inputs((2, 8, 7, 5), torch.float32, "cpu", "contiguous")

    def fam(a, g):
        return srdiff.gradcam_reduce(a * 2, g, (14, 10))

    compiled = torch.compile(fam, fullgraph=True)
    assert_close(compiled(acts, grads), fam(acts, grads), dtype=torch.float32, reduce_dim=_reduce_dim(acts.shape))


@needs_ext
def test_backward_raises_clearly():
    acts = torch.rand(2, 3, 4, 4, requires_grad=True)
    out = srdiff.gradcam_reduce(acts, torch.randn(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="no backward"):
        out.sum().backward()


def _tiny_cnn():
    from torchvision.models import resnet18

    return resnet18(num_classes=2).eval()


def test_matches_pytorch_grad_cam():
    """Same model, layer and target (class 1) as pytorch-grad-cam's GradCAM: the same maps."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _tiny_cnn()
    images = torch.rand(3, 3, 64, 64)
    with GradCAM(model=model, target_layers=[model.layer3]) as cam:
        expected = torch.from_numpy(cam(input_tensor=images, targets=[ClassifierOutputTarget(1)] * 3))

    saved = {}
    handle_f = model.layer3.register_forward_hook(lambda m, i, o: saved.update(acts=o))
    handle_b = model.layer3.register_full_backward_hook(lambda m, gi, go: saved.update(grads=go[0]))
    try:
        model(images.requires_grad_())[:, 1].sum().backward()
    finally:
        handle_f.remove()
        handle_b.remove()
    acts, grads = saved["acts"].detach(), saved["grads"].detach()
    ours = srdiff.gradcam_reduce(acts, grads, size=(64, 64))
    # pytorch-grad-cam resizes with OpenCV (float32, its own rounding order): same table, fp32 row.
    assert_close(ours, expected, dtype=torch.float32, reduce_dim=_reduce_dim(acts.shape), name="vs pytorch-grad-cam")


BAD_INPUTS = [
    pytest.param(lambda: (torch.rand(3, 4, 4), torch.rand(3, 4, 4)), {}, ValueError, "activations must have 4", id="rank"),
    pytest.param(lambda: (torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 5)), {}, ValueError, "gradients must have the shape", id="shape"),
    pytest.param(lambda: (torch.ones(2, 3, 4, 4, dtype=torch.int32),) * 2, {}, TypeError, "activations must be one of", id="int-dtype"),
    pytest.param(lambda: (torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4).double()), {}, TypeError, "gradients dtype", id="mixed-dtype"),
    pytest.param(lambda: (torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4, device="meta")), {}, ValueError, "gradients is on meta", id="mixed-device"),
    pytest.param(lambda: (torch.rand(0, 3, 4, 4), torch.rand(0, 3, 4, 4)), {}, ValueError, "non-empty", id="empty-batch"),
    pytest.param(lambda: (torch.rand(2, 3, 4, 4), torch.full((2, 3, 4, 4), float("nan"))), {}, ValueError, "gradients must be finite", id="nan-grads"),
    pytest.param(lambda: (torch.rand(2, 3, 4, 4), torch.full((2, 3, 4, 4), float("nan"))), {"backend": "reference"}, ValueError, "gradients must be finite", id="nan-grads-reference"),
    pytest.param(lambda: (torch.full((2, 3, 4, 4), float("nan")), torch.rand(2, 3, 4, 4)), {}, ValueError, "activations must be finite", id="nan-acts"),
    pytest.param(lambda: (torch.full((2, 3, 4, 4), float("-inf")), torch.rand(2, 3, 4, 4)), {"backend": "reference"}, ValueError, "activations must be finite", id="-inf-acts-reference"),
    pytest.param(lambda: (torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)), {"size": (0, 4)}, ValueError, "size must be", id="bad-size"),
    pytest.param(lambda: (torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)), {"backend": "cuda"}, ValueError, "backend must be", id="bad-backend"),
    pytest.param(lambda: ([[1.0]], torch.rand(2, 3, 4, 4)), {}, TypeError, "activations must be a torch.Tensor", id="not-tensor"),
]


@pytest.mark.parametrize("make, kwargs, error, message", BAD_INPUTS)
def test_bad_input_is_refused(make, kwargs, error, message):
    with pytest.raises(error, match=message):
        srdiff.gradcam_reduce(*make(), **kwargs)


def _poisoned(dtype, value, image, tensor):
    """Inputs with one non-finite value in image ``image`` of ``tensor`` (0: activations, 1: gradients)."""
    inputs = _inputs((3, 5, 6, 7), dtype, "cpu", "contiguous")
    inputs[tensor][image, 2, 3, 4] = value
    return inputs


BACKENDS = [pytest.param("extension", marks=needs_ext), "reference"]
NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("tensor, name", [(0, "activations"), (1, "gradients")], ids=["acts", "grads"])
def test_nonfinite_inputs_are_flagged_in_the_pass(tensor, name, value, dtype, device, backend):
    """Every path tests the gradient channel means and the weighted sums (before the ReLU, which would
    turn NaN and -inf activations into 0) as it computes them: one bad value anywhere is found, counted
    and placed, with the same message; with the check off the op returns maps."""
    acts, grads = (t.to(device) for t in _poisoned(dtype, value, image=2, tensor=tensor))
    message = rf"{name} must be finite, found 1 non-finite value\(s\) of 630 \(the first in image 2\)"
    with pytest.raises(ValueError, match=message):
        srdiff.gradcam_reduce(acts, grads, (9, 9), backend=backend)
    out = srdiff.gradcam_reduce(acts, grads, (9, 9), check_finite=False, backend=backend)
    assert out.shape == (3, 9, 9)


@needs_ext
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_the_schema_default_checks(device):
    acts, grads = (t.to(device) for t in _poisoned(torch.float32, float("nan"), image=0, tensor=0))
    with pytest.raises(ValueError, match="activations must be finite"):
        torch.ops.srdiff.gradcam_reduce(acts, grads, None, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_overflowing_float32_sums_are_flagged(device, backend):
    """Finite float32 inputs whose sums overflow (a gradient channel's over (h, w), or the weighted sum
    over channels) give an inf: refused with their own messages (the values are finite)."""
    acts = torch.rand(2, 3, 4, 4, device=device)
    grads = torch.zeros(2, 3, 4, 4, device=device)
    grads[1, 0] = 3e38  # 16 * 3e38 > float32 max 3.4e38
    with pytest.raises(ValueError, match=r"a float32 sum over \(h, w\) overflows \(largest \|gradient\| 3e\+38"):
        srdiff.gradcam_reduce(acts, grads, backend=backend)
    acts[0, :2] = 3e38  # two channels of 3e38, each weighted by a gradient mean of 1
    with pytest.raises(ValueError, match=r"weighted sum of activations .* overflows \(largest \|activation\| 3e\+38"):
        srdiff.gradcam_reduce(acts, torch.ones_like(acts), backend=backend)


@needs_ext
@pytest.mark.needs_cuda
@pytest.mark.parametrize("size", [None, (300, 257)], ids=["nosize", "up300x257"])
def test_cuda_finish_spreads_over_blocks(size):
    """One image with many output tiles (the resize and normalise grids span (tiles, B)): equal to
    the CPU kernel, and bit-identical run to run (the per-image min/max atomics are order-free)."""
    acts, grads = _inputs((1, 24, 70, 70), torch.float32, "cpu", "contiguous")
    cpu = srdiff.gradcam_reduce(acts, grads, size)
    gpu = [srdiff.gradcam_reduce(acts.cuda(), grads.cuda(), size) for _ in range(2)]
    assert_close(gpu[0], cpu, dtype=torch.float32, reduce_dim=_reduce_dim(acts.shape))
    assert torch.equal(gpu[0], gpu[1])


@needs_ext
def test_cpp_guards_direct_op_calls():
    """Calling the operator directly, bypassing the Python checks, still gets a ValueError, no crash."""
    with pytest.raises(ValueError, match="gradients shape"):
        torch.ops.srdiff.gradcam_reduce(torch.rand(2, 3, 4, 4), torch.rand(1, 3, 4, 4), None, True)
    with pytest.raises(ValueError, match="non-empty"):
        torch.ops.srdiff.gradcam_reduce(torch.rand(2, 3, 0, 4), torch.rand(2, 3, 0, 4), None, True)
    with pytest.raises(ValueError, match="size must be"):
        torch.ops.srdiff.gradcam_reduce(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), [4], True)


def _import_srdiff_with(patch: str) -> subprocess.CompletedProcess:
    code = (
        "import warnings, torch\n"
        f"{patch}\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import srdiff\n"
        "    out = srdiff.gradcam_reduce(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), (8, 8))\n"
        "msgs = [str(w.message) for w in caught if 'srdiff._C' in str(w.message)]\n"
        "print(len(msgs)); print(msgs[0] if msgs else ''); print(srdiff.has_extension, tuple(out.shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SRDIFF_SKIP_EXT"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)


@pytest.mark.parametrize(
    "patch, why",
    [
        ("import sys; sys.modules['srdiff._C'] = None", "could not be loaded"),
        ("torch.__version__ = '0.0.1'", "built against torch"),
    ],
    ids=["missing", "stale"],
)
def test_missing_or_stale_extension_warns_once_and_falls_back(patch, why):
    if why == "built against torch" and not _extension.HAS_EXT:
        pytest.skip("needs a built extension to go stale")
    lines = _import_srdiff_with(patch).stdout.splitlines()
    assert lines[0] == "1", lines
    assert why in lines[1] and "pip install --no-build-isolation -e ." in lines[1] and "srdiff.reference" in lines[1]
    assert lines[2] == "False (2, 8, 8)"


def test_edited_sources_make_the_build_stale():
    build = {"torch": torch.__version__, "sources": "digest-of-older-sources"}
    assert "csrc/ changed" in _extension._stale_reason(build)
    assert "built against torch 0.1" in _extension._stale_reason({"torch": "0.1", "sources": "x"})
