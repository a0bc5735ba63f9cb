"""srdiff.amplified_add_noise / amplified_noise_loss: the kernels (Triton; the extension's CPU
kernels) against the reference, with an explicit ε so every path sees the same noise (the in-kernel
noise is tested in test_noise_random.py).

The kernels compute in float32 from the (already rounded) inputs and round each output once to its
dtype, so the forward rows of the table apply for the noising outputs; the loss accumulates in
float32 (the float32 row, over a reduction of B*C*H*W terms) and its gradient is rounded once to
pred's dtype (the backward row of that dtype).
"""

import pytest
import torch
import torch.nn.functional as F

import srdiff
from srdiff.reference import amplified_add_noise_ref, amplified_noise_loss_ref
from srdiff_testing import DTYPES, EXTENSION, assert_close, channels_last_like, needs_ext, strided

T = 1000
LAM = 0.5  # far above the paper's 0.01, so that a misplaced map value shows in every dtype
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
ODD = (3, 3, 7, 5)
SHAPES = [
    pytest.param((2, 4, 16, 16), id="B2-C4-16x16"),
    pytest.param(ODD, id="B3-C3-7x5"),
    pytest.param((1, 2, 67, 71), id="B1-C2-67x71"),  # H*W > the kernels' largest BLOCK: two programs a plane
]
FAM_SHAPES = ["none", "HW", "1HW", "BHW", "B1HW"]
LAYOUTS = ["contiguous", "strided", "channels_last"]
# The three named recipes and the two (x_t, target) pairs only the deprecated keywords spell.
RECIPES = ["paper", "adm", "uvit", ("add", "plain"), ("scale", "scale")]
RECIPE_IDS = ["paper", "adm", "uvit", "add-plain", "scale-scale"]
# The two kernel backends for CPU tensors: Triton (in its interpreter here) and srdiff._C's CPU kernels.
KERNELS = ["triton", EXTENSION]


def _alphas_cumprod(dtype=torch.float32, device="cpu"):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(device=device, dtype=dtype)


def _timesteps(B, device="cpu", dtype=torch.int64):
    t = torch.randint(0, T, (B,))
    t[0], t[-1] = 0, T - 1  # both ends of the schedule
    return t.to(device=device, dtype=dtype)


def _fam(kind, B, H, W, device="cpu"):
    shape = {"none": None, "HW": (H, W), "1HW": (1, H, W), "BHW": (B, H, W), "B1HW": (B, 1, H, W)}[kind]
    return None if shape is None else torch.rand(shape, device=device)


def _layout(t, layout):
    return {"contiguous": t, "strided": strided(t), "channels_last": channels_last_like(t)}[layout]


def _inputs(shape, dtype, device="cpu", fam="HW", layout="contiguous"):
    B, C, H, W = shape
    x0 = _layout(torch.rand(shape, device=device).mul(2).sub(1).to(dtype), layout)
    noise = torch.randn(shape, device=device).to(dtype)
    return x0, _timesteps(B, device), _alphas_cumprod(device=device), noise, _fam(fam, B, H, W, device)


def _check_noising(x0, t, ac, noise, fam, dtype, kernel=None, **options):
    x_t, target = srdiff.amplified_add_noise(x0, t, ac, noise, fam, LAM, backend=kernel, **options)
    ref_x_t, ref_target = amplified_add_noise_ref(x0.float(), t, ac, noise.float(), fam, LAM, **options)
    assert x_t.dtype == dtype and target.dtype == dtype and x_t.is_contiguous()
    assert_close(x_t, ref_x_t, dtype=dtype, name="x_t")
    assert_close(target, ref_target, dtype=dtype, name="target")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("recipe", RECIPES, ids=RECIPE_IDS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_noising_matches_reference(prediction_type, recipe, dtype, kernel):
    x0, t, ac, noise, fam = _inputs(ODD, dtype)
    _check_noising(x0, t, ac, noise, fam, dtype, recipe=recipe, prediction_type=prediction_type,
                   kernel=kernel)


def _recipe_by_hand(x0, t, ac, noise, fam, recipe, prediction_type):
    """The recipes of docs/noise.md written out in float64, independent of srdiff.reference."""
    abar = ac.double()[t.long()][:, None, None, None]
    a, b = abar.sqrt(), (1 - abar).sqrt()
    x0, eps, m = x0.double(), noise.double(), LAM * fam.double()
    eps_x, eps_t = {"paper": (eps + m, eps + m), "adm": (eps * (1 + m), eps), "uvit": (eps, eps + m)}[recipe]
    target = {"epsilon": eps_t, "v_prediction": a * eps_t - b * x0, "sample": x0}[prediction_type]
    return a * x0 + b * eps_x, target


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("recipe", ["paper", "adm", "uvit"])
def test_recipes_match_float64_formulas(recipe, prediction_type, backend):
    """paper: x_t and target from ε + λM; adm: x_t from ε(1 + λM), target ε; uvit: x_t from ε,
    target ε + λM. Kernel and reference against the formulas in float64 (float32 row of the table:
    each output is rounded once from float32 arithmetic on exact inputs)."""
    x0, t, ac, noise, fam = _inputs(ODD, torch.float32)
    ac = _alphas_cumprod(torch.float64)
    x_t, target = srdiff.amplified_add_noise(
        x0, t, ac, noise, fam, LAM, recipe=recipe, prediction_type=prediction_type, backend=backend
    )
    exp_x_t, exp_target = _recipe_by_hand(x0, t, ac, noise, fam[None, None], recipe, prediction_type)
    assert_close(x_t, exp_x_t, dtype=torch.float32, name="x_t")
    assert_close(target, exp_target, dtype=torch.float32, name="target")
    pred = torch.randn(ODD, dtype=torch.float64)
    loss = srdiff.amplified_noise_loss(
        pred.float(), x0, t, ac, fam, LAM, noise=noise, recipe=recipe, prediction_type=prediction_type,
        backend=backend,
    )
    assert_close(loss, ((pred - exp_target) ** 2).mean(), dtype=torch.float32, reduce_dim=x0.numel(), name="loss")


@pytest.mark.parametrize(
    "amplify, amplified_target, recipe",
    [("add", True, "paper"), ("scale", False, "adm"), ("add", False, ("add", "plain")),
     ("scale", True, ("scale", "scale")), (None, False, ("add", "plain")), ("scale", None, ("scale", "scale"))],
)
def test_deprecated_keywords_map_to_recipes(amplify, amplified_target, recipe):
    x0, t, ac, noise, fam = _inputs(ODD, torch.float32)
    legacy = dict(amplify=amplify, amplified_target=amplified_target)
    with pytest.warns(DeprecationWarning, match=f"use recipe={recipe!r}".replace("(", r"\(").replace(")", r"\)")):
        old = srdiff.amplified_add_noise(x0, t, ac, noise, fam, LAM, **legacy)
    new = srdiff.amplified_add_noise(x0, t, ac, noise, fam, LAM, recipe=recipe)
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
    pred = torch.randn(ODD)
    with pytest.warns(DeprecationWarning):
        old_loss = srdiff.amplified_noise_loss(pred, x0, t, ac, fam, LAM, noise=noise, **legacy)
    assert torch.equal(old_loss, srdiff.amplified_noise_loss(pred, x0, t, ac, fam, LAM, noise=noise, recipe=recipe))


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
@pytest.mark.parametrize("fam_shape", [(4, 3), (1, 12, 10), (3, 1, 7, 5), (3, 20, 2)], ids=str)
def test_resize_brings_any_map_to_the_image_size(fam_shape, backend):
    """resize=True: the map is resized bilinearly (half-pixel centres) to (H, W) before use, in
    the noising and in the loss; the same map of the right size passes through unchanged."""
    x0, t, ac, noise, _ = _inputs(ODD, torch.float32)
    fam = torch.rand(fam_shape)
    as_image = F.interpolate(fam.reshape(-1, 1, *fam_shape[-2:]), size=ODD[2:], mode="bilinear", align_corners=False)
    kwargs = dict(recipe="paper", prediction_type="v_prediction", backend=backend)
    x_t, target = srdiff.amplified_add_noise(x0, t, ac, noise, fam, LAM, resize=True, **kwargs)
    exp_x_t, exp_target = srdiff.amplified_add_noise(x0, t, ac, noise, as_image, LAM, **kwargs)
    assert_close(x_t, exp_x_t, dtype=torch.float32, name="x_t")
    assert_close(target, exp_target, dtype=torch.float32, name="target")
    loss = srdiff.amplified_noise_loss(target, x0, t, ac, fam, LAM, noise=noise, resize=True, **kwargs)
    # pred = the stored target: only the rounding of the target (a few float32 ulps) may remain; a
    # map resized otherwise (or not at all) leaves differences of order LAM.
    assert loss.item() <= (4 * 2**-24 * target.abs().max().item()) ** 2


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fam", FAM_SHAPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_noising_maps_and_layouts(shape, fam, layout, dtype, kernel):
    x0, t, ac, noise, fam = _inputs(shape, dtype, fam=fam, layout=layout)
    _check_noising(x0, t, ac, noise, fam, dtype, prediction_type="v_prediction", kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("alphas_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("t_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8], ids=str)
def test_schedule_dtypes(t_dtype, alphas_dtype, kernel):
    x0, _, _, noise, fam = _inputs(ODD, torch.float32)
    t = torch.tensor([0, 17, 255], dtype=t_dtype)
    ac = _alphas_cumprod(alphas_dtype)
    x_t, target = srdiff.amplified_add_noise(
        x0, t, ac, noise, fam, LAM, prediction_type="v_prediction", backend=kernel
    )
    ref_x_t, ref_target = amplified_add_noise_ref(x0, t, ac, noise, fam, LAM, prediction_type="v_prediction")
    assert_close(x_t, ref_x_t, dtype=torch.float32, name="x_t")
    assert_close(target, ref_target, dtype=torch.float32, name="target")


@pytest.mark.parametrize("kernel", KERNELS)
def test_noise_in_another_dtype(kernel):
    x0, t, ac, noise, fam = _inputs(ODD, torch.float32)
    half_noise = noise.half()
    x_t, target = srdiff.amplified_add_noise(x0, t, ac, half_noise, fam, LAM, backend=kernel)
    ref_x_t, ref_target = amplified_add_noise_ref(x0, t, ac, half_noise.float(), fam, LAM)
    assert_close(x_t, ref_x_t, dtype=torch.float32, name="x_t")
    assert_close(target, ref_target, dtype=torch.float32, name="target")


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_without_target_writes_only_x_t(backend):
    x0, t, ac, noise, fam = _inputs(ODD, torch.float32)
    x_t, target = srdiff.amplified_add_noise(x0, t, ac, noise, fam, LAM, return_target=False, backend=backend)
    assert target is None
    assert torch.equal(x_t, srdiff.amplified_add_noise(x0, t, ac, noise, fam, LAM, backend=backend)[0])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fam_kind", ["none", "zero-lam"])
def test_no_amplification_is_plain_ddpm(fam_kind, kernel):
    """lam=0 or fam=None: x_t and the target of diffusers' DDPMScheduler (the base phase)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=T)
    x0, t, _, noise, fam = _inputs(ODD, torch.float32)
    ac = scheduler.alphas_cumprod
    fam, lam = (None, LAM) if fam_kind == "none" else (fam, 0.0)
    for prediction_type in ("epsilon", "v_prediction"):
        x_t, target = srdiff.amplified_add_noise(
            x0, t, ac, noise, fam, lam, prediction_type=prediction_type, backend=kernel
        )
        assert_close(x_t, scheduler.add_noise(x0, noise, t), dtype=torch.float32, name="x_t")
        expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        assert_close(target, expected, dtype=torch.float32, name=prediction_type)


def _check_loss(pred, x0, t, ac, noise, fam, reduction, kernel=None, **options):
    loss = srdiff.amplified_noise_loss(
        pred, x0, t, ac, fam, LAM, noise=noise, reduction=reduction, backend=kernel, **options
    )
    pred_ref = pred.detach().clone().requires_grad_()
    ref = amplified_noise_loss_ref(pred_ref, x0, t, ac, fam, LAM, noise=noise, reduction=reduction, **options)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_close(
        loss, ref, dtype=torch.float32, reduce_dim=1 if reduction == "none" else x0.numel(), name="loss"
    )
    grad_out = torch.rand_like(ref)
    (grad,) = torch.autograd.grad(loss, pred, grad_out)
    (grad_ref,) = torch.autograd.grad(ref, pred_ref, grad_out)
    assert grad.dtype == pred.dtype
    assert_close(grad, grad_ref, dtype=pred.dtype, pass_="bwd", name="grad_pred")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_matches_reference(reduction, prediction_type, dtype, kernel):
    x0, t, ac, noise, fam = _inputs(ODD, dtype, fam="B1HW")
    pred = torch.randn(ODD).to(dtype).requires_grad_()
    _check_loss(pred, x0, t, ac, noise, fam, reduction, recipe=("scale", "scale"), prediction_type=prediction_type,
                kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("recipe", ["paper", "adm", "uvit"])
def test_loss_recipes_match_reference(recipe, kernel):
    x0, t, ac, noise, fam = _inputs(ODD, torch.float32, fam="BHW")
    pred = torch.randn(ODD).requires_grad_()
    _check_loss(pred, x0, t, ac, noise, fam, "sum", recipe=recipe, prediction_type="v_prediction",
                kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_layouts(shape, layout, kernel):
    x0, t, ac, noise, fam = _inputs(shape, torch.float16, layout=layout)
    pred = _layout(torch.randn(shape), layout).requires_grad_()
    _check_loss(pred, x0, t, ac, noise, fam, "mean", recipe="adm", prediction_type="v_prediction",
                kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_loss_pred_dtype_differs_from_x0(kernel):
    x0, t, ac, noise, fam = _inputs(ODD, torch.float32)
    pred = torch.randn(ODD, dtype=torch.bfloat16, requires_grad=True)
    _check_loss(pred, x0, t, ac, noise, fam, "mean", kernel=kernel)


@needs_ext
def test_cpu_default_is_the_extension():
    x0, t, ac, _, fam = _inputs(ODD, torch.float32)
    out = srdiff.amplified_add_noise(x0, t, ac, fam=fam, lam=LAM, seed=3)
    ext = srdiff.amplified_add_noise(x0, t, ac, fam=fam, lam=LAM, seed=3, backend="extension")
    assert torch.equal(out[0], ext[0]) and torch.equal(out[1], ext[1])


def test_cpu_default_without_the_extension_is_the_reference(monkeypatch):
    monkeypatch.setattr(srdiff.noise.noise_extension, "available", lambda: False)
    x0, t, ac, _, fam = _inputs(ODD, torch.float32)
    out = srdiff.amplified_add_noise(x0, t, ac, fam=fam, lam=LAM, seed=3)
    ref = amplified_add_noise_ref(x0, t, ac, fam=fam, lam=LAM, seed=3)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    with pytest.raises(RuntimeError, match="backend='extension'"):
        srdiff.amplified_add_noise(x0, t, ac, fam=fam, lam=LAM, seed=3, backend="extension")


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_refuses_inputs_that_require_grad(kernel):
    x0, t, ac, noise, fam = _inputs(ODD, torch.float32)
    with pytest.raises(ValueError, match="x0 requires grad"):
        srdiff.amplified_add_noise(x0.requires_grad_(), t, ac, noise, fam, LAM, backend=kernel)
    x_t, _ = srdiff.amplified_add_noise(x0, t, ac, noise, fam, LAM, backend="reference")
    assert x_t.requires_grad  # the reference stays differentiable


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 3, 64, 64), (256, 3, 32, 32), (2, 3, 129, 257)], ids=str)
def test_cuda_matches_reference(shape, dtype):
    x0, t, ac, noise, fam = _inputs(shape, dtype, device="cuda")
    _check_noising(x0, t, ac, noise, fam, dtype, prediction_type="v_prediction")
    pred = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
    _check_loss(pred, x0, t, ac, noise, fam, "mean")


@pytest.mark.needs_cuda
@pytest.mark.slow
def test_cuda_int64_offsets():
    """More than 2**31 elements: the last sample, far past int32 offsets, is still right."""
    shape = (513, 4, 1024, 1024)  # 2.15e9 elements, 4.3 GB each in bfloat16
    x0 = torch.rand(shape, device="cuda", dtype=torch.bfloat16)
    noise = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    t = _timesteps(shape[0], "cuda")
    ac, fam = _alphas_cumprod(device="cuda"), torch.rand(shape[2:], device="cuda")
    x_t, _ = srdiff.amplified_add_noise(x0, t, ac, noise, fam, LAM, return_target=False, check_values=False)
    ref, _ = amplified_add_noise_ref(
        x0[-1:].float(), t[-1:], ac, noise[-1:].float(), fam, LAM, return_target=False
    )
    assert_close(x_t[-1:], ref, dtype=torch.bfloat16, name="last sample")


def _bad(**changes):
    x0, t, ac, noise, fam = _inputs(ODD, torch.float32)
    kwargs = dict(x0=x0, timesteps=t, alphas_cumprod=ac, fam=fam, lam=LAM, seed=1)
    kwargs.update(changes)
    return kwargs


BAD_INPUTS = [
    pytest.param(
        dict(x0=torch.rand(3, 7, 5)), ValueError, r"x0 must have 4 dims, got shape \(3, 7, 5\)", id="x0-rank"
    ),
    pytest.param(
        dict(x0=torch.rand(3, 3, 7, 5).double()),
        TypeError,
        "x0 must be one of .* got torch.float64",
        id="x0-dtype",
    ),
    pytest.param(
        dict(x0=torch.rand(0, 3, 7, 5), timesteps=torch.zeros(0, dtype=torch.long)),
        ValueError,
        "x0 must be non-empty",
        id="x0-empty",
    ),
    pytest.param(
        dict(timesteps=torch.tensor([0.0, 1.0, 2.0])),
        TypeError,
        "timesteps must be an integer tensor, got dtype torch.float32",
        id="t-float",
    ),
    pytest.param(
        dict(timesteps=torch.tensor([0, 1])),
        ValueError,
        r"timesteps must have shape \(B,\) = \(3,\), got \(2,\)",
        id="t-shape",
    ),
    pytest.param(
        dict(timesteps=torch.tensor([0, 1, T])),
        ValueError,
        r"timesteps must lie in \[0, 999\] .* got values in \[0, 1000\]",
        id="t-high",
    ),
    pytest.param(
        dict(timesteps=torch.tensor([-1, 1, 2])),
        ValueError,
        r"timesteps must lie in \[0, 999\]",
        id="t-negative",
    ),
    pytest.param(
        dict(alphas_cumprod=torch.linspace(0, 1, T)),
        ValueError,
        r"alphas_cumprod must lie in \(0, 1\], got values in \[0.0, 1.0\]",
        id="ac-zero",
    ),
    pytest.param(
        dict(alphas_cumprod=torch.full((T,), 1.5)),
        ValueError,
        r"alphas_cumprod must lie in \(0, 1\]",
        id="ac-above-one",
    ),
    pytest.param(
        dict(alphas_cumprod=torch.rand(T).half()),
        TypeError,
        "alphas_cumprod must be one of .* got torch.float16",
        id="ac-dtype",
    ),
    pytest.param(
        dict(alphas_cumprod=torch.rand(10, 10)), ValueError, "alphas_cumprod must have 1 dims", id="ac-rank"
    ),
    pytest.param(
        dict(fam=torch.rand(7, 6)),
        ValueError,
        r"fam must broadcast to \(B, 1, H, W\) = \(3, 1, 7, 5\) .* pass resize=True .* got shape \(7, 6\)",
        id="fam-hw",
    ),
    pytest.param(
        dict(fam=torch.rand(2, 9, 9), resize=True),
        ValueError,
        r"fam must broadcast .* with resize=True, got shape \(2, 9, 9\)",
        id="fam-batch-resize",
    ),
    pytest.param(dict(fam=torch.rand(0, 5), resize=True), ValueError, "fam must be non-empty", id="fam-empty"),
    pytest.param(dict(resize=1), TypeError, "resize must be a bool, got int", id="resize-int"),
    pytest.param(
        dict(fam=torch.rand(7, 5, device="meta")), ValueError, "fam is on meta but x0 is on cpu", id="fam-device"
    ),
    pytest.param(
        dict(fam=torch.rand(2, 7, 5)),
        ValueError,
        r"fam must broadcast .* got shape \(2, 7, 5\)",
        id="fam-batch",
    ),
    pytest.param(
        dict(fam=torch.rand(3, 3, 7, 5)),
        ValueError,
        r"fam must broadcast .* got shape \(3, 3, 7, 5\)",
        id="fam-channels",
    ),
    pytest.param(
        dict(fam=torch.full((7, 5), float("inf"))),
        ValueError,
        "fam must be finite, found 35 non-finite",
        id="fam-inf",
    ),
    pytest.param(
        dict(fam=torch.ones(7, 5, dtype=torch.long)),
        TypeError,
        "fam must be a floating-point tensor",
        id="fam-int",
    ),
    pytest.param(dict(lam=-0.1), ValueError, "lam must be >= 0, got -0.1", id="lam-negative"),
    pytest.param(dict(lam=float("inf")), ValueError, "lam must be finite, got inf", id="lam-inf"),
    pytest.param(dict(lam=float("nan")), ValueError, "lam must be finite, got nan", id="lam-nan"),
    pytest.param(dict(lam=True), TypeError, "lam must be a real number, got bool", id="lam-bool"),
    pytest.param(dict(lam=torch.tensor(0.1)), TypeError, "lam must be a real number", id="lam-tensor"),
    pytest.param(
        dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*63 - 1\], got -1", id="seed-negative"
    ),
    pytest.param(dict(seed=1.5), TypeError, "seed must be an int or None, got float", id="seed-float"),
    pytest.param(
        dict(noise=torch.randn(3, 3, 7, 5)),
        ValueError,
        "pass either noise or seed, not both",
        id="noise-and-seed",
    ),
    pytest.param(
        dict(noise=torch.randn(3, 3, 5, 7), seed=None),
        ValueError,
        "noise must have the shape of x0",
        id="noise-shape",
    ),
    pytest.param(
        dict(amplify="mul"), ValueError, r"amplify must be one of \('add', 'scale'\), got 'mul'", id="amplify"
    ),
    pytest.param(
        dict(recipe="ddpm"), ValueError, r"recipe must be one of \('paper', 'adm', 'uvit'\), got 'ddpm'", id="recipe"
    ),
    pytest.param(
        dict(recipe=("add", "mul")),
        ValueError,
        r"recipe must be one of .* or an \(x_t, target\) pair of \('plain', 'add', 'scale'\), got \('add', 'mul'\)",
        id="recipe-pair",
    ),
    pytest.param(
        dict(recipe="adm", amplify="scale"), ValueError, "pass recipe= or the deprecated amplify=", id="recipe-and-amplify"
    ),
    pytest.param(
        dict(prediction_type="x0"),
        ValueError,
        "prediction_type must be one of .* got 'x0'",
        id="prediction-type",
    ),
    pytest.param(
        dict(timesteps=torch.tensor([0, 1, 2], device="meta")),
        ValueError,
        "timesteps is on meta but x0 is on cpu",
        id="device",
    ),
    pytest.param(dict(backend="cuda"), ValueError, "backend must be one of", id="backend"),
]


@pytest.mark.parametrize("changes, error, message", BAD_INPUTS)
def test_noising_refuses_bad_input(changes, error, message):
    with pytest.raises(error, match=message):
        srdiff.amplified_add_noise(**_bad(**changes))


@pytest.mark.parametrize("changes, error, message", BAD_INPUTS)
def test_loss_refuses_bad_input(changes, error, message):
    kwargs = _bad(**changes)
    with pytest.raises(error, match=message):
        srdiff.amplified_noise_loss(torch.randn(kwargs["x0"].shape), **kwargs)


LOSS_BAD_INPUTS = [
    pytest.param(
        dict(pred=torch.randn(3, 3, 7, 4)),
        ValueError,
        r"pred must have the shape of x0 \(3, 3, 7, 5\)",
        id="pred-shape",
    ),
    pytest.param(
        dict(pred=torch.randn(3, 3, 7, 5).double()), TypeError, "pred must be one of", id="pred-dtype"
    ),
    pytest.param(dict(reduction="max"), ValueError, "reduction must be one of .* got 'max'", id="reduction"),
    pytest.param(dict(seed=None), ValueError, "amplified_noise_loss needs seed=", id="no-seed"),
]


@pytest.mark.parametrize("changes, error, message", LOSS_BAD_INPUTS)
def test_loss_refuses_bad_loss_input(changes, error, message):
    kwargs = _bad(pred=torch.randn(ODD))
    kwargs.update(changes)
    with pytest.raises(error, match=message):
        srdiff.amplified_noise_loss(**kwargs)


@pytest.mark.parametrize(
    "device, kernel",
    [("cpu", "triton"), pytest.param("cpu", "extension", marks=EXTENSION.marks),
     pytest.param("cuda", "triton", marks=pytest.mark.needs_cuda)],
)
def test_unchecked_values_stay_in_bounds(device, kernel):
    """check_values=False skips the sync; an out-of-range timestep is clamped, never read out of bounds."""
    x0, _, ac, noise, fam = _inputs(ODD, torch.float32, device=device)
    t = torch.tensor([-5, 3, T + 7], device=device)
    x_t, _ = srdiff.amplified_add_noise(x0, t, ac, noise, fam, LAM, check_values=False, backend=kernel)
    ref, _ = amplified_add_noise_ref(x0, t.clamp(0, T - 1), ac, noise, fam, LAM)
    assert_close(x_t, ref, dtype=torch.float32, name="x_t")


@pytest.mark.parametrize("recipe", ["paper", "adm", "uvit"])
def test_reference_loss_takes_the_noising_draw_bit_exactly(recipe, monkeypatch):
    """On the reference path the loss reuses what its noising call drew for the same seed (ε_x for
    "paper", ε otherwise: one tensor kept); the values are exactly those a fresh draw gives, and
    the kept tensor serves once."""
    import srdiff.noise as noise_module

    x0, t, ac, _, fam = _inputs(ODD, torch.float32)
    draws = []
    draw = noise_module.reference_noise
    monkeypatch.setattr(noise_module, "reference_noise", lambda x, seed: draws.append(seed) or draw(x, seed))
    kw = dict(recipe=recipe, backend="reference")
    _, target = srdiff.amplified_add_noise(x0, t, ac, fam=fam, lam=LAM, seed=11, **kw)
    assert noise_module._LastReferenceDraw.how == ("add" if recipe == "paper" else "plain")
    kept = srdiff.amplified_noise_loss(target + 1, x0, t, ac, fam, LAM, seed=11, **kw)
    fresh = srdiff.amplified_noise_loss(target + 1, x0, t, ac, fam, LAM, seed=11, **kw)
    assert draws == [11]
    assert kept.item() == pytest.approx(1.0, abs=1e-6) and torch.equal(kept, fresh)
    assert noise_module._LastReferenceDraw.key is None


@pytest.mark.parametrize("change", ["recipe", "lam", "map-edited-in-place", "another-map"])
def test_reference_loss_does_not_take_a_draw_that_does_not_fit(change):
    """A loss call whose recipe, λ or map differs from the noising's gets the target of its own
    arguments (as a fresh draw from the seed gives it), never the kept ε_x."""
    x0, t, ac, _, fam = _inputs(ODD, torch.float32)
    pred = torch.randn(ODD)
    srdiff.amplified_add_noise(x0, t, ac, fam=fam, lam=LAM, seed=11, recipe="paper", backend="reference")
    loss_kw = dict(seed=11, recipe="paper", backend="reference")
    lam, loss_fam = LAM, fam
    if change == "recipe":
        loss_kw["recipe"] = ("add", "scale")
    elif change == "lam":
        lam = 2 * LAM
    elif change == "map-edited-in-place":
        fam.mul_(0.5)
    else:
        loss_fam = fam * 0.5
    loss = srdiff.amplified_noise_loss(pred, x0, t, ac, loss_fam, lam, **loss_kw)
    expected = amplified_noise_loss_ref(pred, x0, t, ac, loss_fam, lam, seed=11, recipe=loss_kw["recipe"])
    assert torch.equal(loss, expected)


@needs_ext
def test_extension_under_torch_compile():
    """The CPU kernels have fake implementations: a compiled training step around them traces in one
    graph (fullgraph) and gives the eager results."""

    def step(x0, t, ac, fam, pred):
        x_t, _ = srdiff.amplified_add_noise(x0, t, ac, fam=fam, lam=LAM, seed=5, return_target=False,
                                            check_values=False, backend="extension")
        loss = srdiff.amplified_noise_loss(pred, x0, t, ac, fam, LAM, seed=5, check_values=False,
                                           backend="extension")
        return x_t, loss

    x0, t, ac, _, fam = _inputs(ODD, torch.float32)
    pred = torch.randn(ODD, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (x_t, loss), (x_t_eager, loss_eager) = compiled(x0, t, ac, fam, pred), step(x0, t, ac, fam, pred)
    assert torch.equal(x_t, x_t_eager) and torch.equal(loss, loss_eager)
    assert torch.equal(torch.autograd.grad(loss, pred)[0], torch.autograd.grad(loss_eager, pred)[0])


@needs_ext
@pytest.mark.parametrize("with_noise", [False, True], ids=["stream", "explicit-noise"])
def test_extension_opcheck(with_noise):
    """Schemas, fake implementations, dispatch and the loss's autograd kernel of the CPU ops
    (torch.library.opcheck)."""
    x0, t, ac, noise, fam = _inputs(ODD, torch.float32)
    noise = noise if with_noise else None
    pred = torch.randn(ODD, requires_grad=True)
    torch.library.opcheck(
        torch.ops.srdiff.amplified_add_noise.default,
        (x0, t, ac, noise, fam[None], LAM, 3, "add", "add", "epsilon", True),
    )
    for reduction in ("mean", "none"):
        common = (x0, t, ac, noise, fam[None], LAM, 3, "add", "v_prediction", reduction)
        torch.library.opcheck(torch.ops.srdiff.amplified_noise_loss.default, (pred, *common))
        torch.library.opcheck(torch.ops.srdiff._amplified_noise_loss_forward.default, (pred.detach(), *common, True))


@needs_ext
def test_extension_loss_keeps_no_gradient_without_autograd():
    """Under no_grad, or for a pred that needs no gradient, the loss is the same and its backward
    state is not built (nothing to differentiate)."""
    x0, t, ac, _, fam = _inputs(ODD, torch.float32)
    pred = torch.randn(ODD, requires_grad=True)
    kw = dict(seed=4, backend="extension")
    with_grad = srdiff.amplified_noise_loss(pred, x0, t, ac, fam, LAM, **kw)
    with torch.no_grad():
        no_grad = srdiff.amplified_noise_loss(pred, x0, t, ac, fam, LAM, **kw)
    detached = srdiff.amplified_noise_loss(pred.detach(), x0, t, ac, fam, LAM, **kw)
    assert with_grad.requires_grad and not no_grad.requires_grad and not detached.requires_grad
    assert torch.equal(with_grad.detach(), no_grad) and torch.equal(no_grad, detached)
