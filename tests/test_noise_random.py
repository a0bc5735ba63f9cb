"""The noise the kernels draw (Philox keyed by seed and element index; the Triton kernels and the
extension's CPU kernels draw the same stream): its statistics, its reproducibility, the loss
regenerating exactly the ε the noising used, and the two implementations agreeing.

Statistical bounds are 5 standard errors (or a KS p-value of 1e-3) at fixed seeds, so the tests are
deterministic on a given device and would fail by chance with probability < 1e-3 on another.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

import srdiff
from srdiff.kernels.noise import _box_muller
from srdiff.reference import amplified_add_noise_ref
from srdiff_testing import EXTENSION, assert_close, cpu_and_cuda, needs_ext

T = 1000
SHAPE = (4, 3, 97, 89)  # 103,596 draws, odd planes: the rows of 4 straddle image rows
ODD = (3, 3, 7, 5)


# (device, backend) of every kernel stream: the Triton kernels (interpreter on the CPU, compiled on
# CUDA) and srdiff._C's CPU kernels.
STREAMS = [
    ("cpu", "triton"),
    pytest.param("cpu", "extension", marks=EXTENSION.marks),
    pytest.param("cuda", "triton", marks=pytest.mark.needs_cuda),
]


def _schedule(device):
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), 0).to(device)


def _epsilon(shape, seed, device, dtype=torch.float32, backend="triton"):
    """The drawn ε itself: the plain target of ε-prediction."""
    x0 = torch.zeros(shape, device=device, dtype=dtype)
    t = torch.zeros(shape[0], dtype=torch.long, device=device)
    _, eps = srdiff.amplified_add_noise(x0, t, _schedule(device), seed=seed, recipe="adm", backend=backend)
    return eps


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


@pytest.mark.parametrize("device, backend", STREAMS)
def test_noise_statistics(device, backend):
    eps = _epsilon(SHAPE, 1234, device, backend=backend).cpu()
    flat = eps.flatten().double()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(n)
    assert abs(flat.std().item() - 1) < 5 / math.sqrt(2 * n)
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    bound = 5 / math.sqrt(n)
    for lag in (1, 2, 3, 4, 5):  # within and across the rows of 4 that share one Philox call
        assert abs(_corr(flat[:-lag], flat[lag:])) < bound, f"lag {lag}"
    assert abs(_corr(flat[:-1] ** 2, flat[1:] ** 2)) < bound, (
        "squares of neighbours (Box-Muller pairs share a radius)"
    )
    assert abs(_corr(eps[:, :, 1:], eps[:, :, :-1])) < bound, "vertical neighbours"
    assert abs(_corr(eps[:, 1:], eps[:, :-1])) < bound, "neighbouring channels"
    assert abs(_corr(eps[1:], eps[:-1])) < bound, "neighbouring samples"


@triton.jit
def _box_muller_probe(a_ptr, b_ptr, x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(a_ptr + offs).to(tl.uint32, bitcast=True)
    b = tl.load(b_ptr + offs).to(tl.uint32, bitcast=True)
    x, y = _box_muller(a, b)
    tl.store(x_ptr + offs, x)
    tl.store(y_ptr + offs, y)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_muller_transform(device):
    """The kernels' map from two 32-bit words to two normals, against its definition in float64:
    u = ((a >> 9) + 1/2)·2⁻²³, r = √(−2 ln u); angle = (b >> 30) + φ quarter turns, with
    φ = ((b >> 7 & 2²³−1) + 1/2)·2⁻²³ − 1/2."""
    n = 4096
    words = torch.randint(-(2**31), 2**31, (2, n), dtype=torch.int64)
    words[:, :4] = torch.tensor([[0, -1, 2**31 - 1, -(2**31)], [0, -1, 2**30, -(2**30)]])  # the extremes
    a, b = words.to(torch.int32).to(device)
    x, y = torch.empty(n, device=device), torch.empty(n, device=device)
    _box_muller_probe[(1,)](a, b, x, y, N=n)
    ua, ub = words % 2**32  # the unsigned words
    u = ((ua >> 9).double() + 0.5) * 2.0**-23
    phi = (((ub >> 7) & (2**23 - 1)).double() + 0.5) * 2.0**-23 - 0.5
    angle = (math.pi / 2) * ((ub >> 30).double() + phi)
    r = torch.sqrt(-2 * torch.log(u))
    assert_close(x, r * torch.cos(angle), dtype=torch.float32, name="x")
    assert_close(y, r * torch.sin(angle), dtype=torch.float32, name="y")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_box_muller_pairs(device):
    """Components (0, 1) and (2, 3) of each Philox row are Box-Muller pairs: their angle is uniform
    on the circle and their squared radius is χ² with 2 degrees of freedom."""
    B, C, H, W = SHAPE
    eps = _epsilon(SHAPE, 1234, device).cpu().double().reshape(B * C, H * W)
    rows = eps[:, : H * W // 4 * 4].reshape(-1, 4)
    x, y = torch.cat([rows[:, 0], rows[:, 2]]), torch.cat([rows[:, 1], rows[:, 3]])
    angle = (torch.atan2(y, x) / (2 * math.pi)) % 1
    assert stats.kstest(angle.numpy(), "uniform").pvalue > 1e-3
    assert stats.kstest((x**2 + y**2).numpy(), "chi2", args=(2,)).pvalue > 1e-3


@pytest.mark.parametrize("device, backend", STREAMS)
def test_seeds_are_independent(device, backend):
    eps = _epsilon(SHAPE, 1234, device, backend=backend)
    bound = 5 / math.sqrt(eps.numel())
    for other in (1235, 1234 + 2**32, 2**63 - 1):  # low word, high word, the largest seed
        assert abs(_corr(eps, _epsilon(SHAPE, other, device, backend=backend))) < bound, f"seed {other}"


@pytest.mark.parametrize("device, backend", STREAMS)
def test_noise_is_keyed_by_seed_and_element_index(device, backend):
    eps = _epsilon(ODD, 7, device, backend=backend)
    assert torch.equal(eps, _epsilon(ODD, 7, device, backend=backend)), "same seed, same noise"
    assert not torch.equal(eps, _epsilon(ODD, 8, device, backend=backend))
    first = _epsilon((1,) + ODD[1:], 7, device, backend=backend)
    assert torch.equal(first, eps[:1]), "a sample's noise does not depend on B"
    # float16, not bfloat16: the Triton 3.8 interpreter truncates float32 -> bfloat16 casts
    half = _epsilon(ODD, 7, device, torch.float16, backend)
    assert torch.equal(half, eps.half()), "drawn in float32 whatever x0's dtype"


def _rounding_bound(x0: torch.Tensor, lam: float) -> torch.Tensor:
    """How far the loss's regenerated target may sit from the noising's stored one when both hold
    the same ε: the two kernels compute it with the same operations, but the compiler may contract
    a different subset into FMAs, so each differs from the exact value by a few float32 ulps of
    its terms (|√ᾱ·ε_t|, |√(1 − ᾱ)·x0| with |ε| ≤ 5.77, so |ε_t| ≤ 5.77·(1 + λ) + λ). A different ε,
    or ε of another element, misses by O(1)."""
    eps_bound = 5.77 * (1 + lam) + lam
    return 4 * 2**-24 * (x0.abs() + eps_bound)


@pytest.mark.parametrize("device, backend", STREAMS + [("cpu", "reference")])
@pytest.mark.parametrize(
    "lam, recipe",
    [(0.0, "paper"), (0.3, "paper"), (0.3, "adm"), (0.3, "uvit"), (0.3, ("scale", "scale"))],
    ids=["plain", "paper", "adm", "uvit", "scale-scale"],
)
def test_loss_regenerates_the_noising_epsilon(lam, recipe, backend, device):
    """The trainer's two calls: with pred = the noising's target, the loss's own target (rebuilt
    from the seed) is the same to within rounding, element by element, and so is the gradient."""
    x0 = torch.rand(ODD, device=device)
    t, ac = torch.tensor([0, 500, T - 1], device=device), _schedule(device)
    fam = torch.rand(ODD[2:], device=device)
    _, target = srdiff.amplified_add_noise(x0, t, ac, fam=fam, lam=lam, seed=99, backend=backend, recipe=recipe)
    bound = _rounding_bound(x0, lam)
    pred = target.clone().requires_grad_()
    loss = srdiff.amplified_noise_loss(
        pred, x0, t, ac, fam, lam, seed=99, reduction="none", backend=backend, recipe=recipe
    )
    assert bool((loss.sqrt() <= bound).all()), f"max |pred - target| {loss.sqrt().max().item():.3g}"
    loss.sum().backward()
    assert bool((pred.grad.abs() <= 2 * bound).all())
    pred = torch.randn(ODD, device=device)
    loss = srdiff.amplified_noise_loss(pred, x0, t, ac, fam, lam, seed=99, reduction="none", backend=backend,
                                       recipe=recipe)
    assert bool(((loss.sqrt() - (pred - target).abs()).abs() <= bound).all())


@pytest.mark.parametrize("device, backend", STREAMS)
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_loss_regenerates_every_target(prediction_type, device, backend):
    x0, t, ac = (
        torch.rand(ODD, device=device),
        torch.tensor([0, 500, T - 1], device=device),
        _schedule(device),
    )
    fam = torch.rand(ODD[2:], device=device)
    _, target = srdiff.amplified_add_noise(
        x0, t, ac, fam=fam, lam=0.3, seed=5, prediction_type=prediction_type, backend=backend
    )
    loss = srdiff.amplified_noise_loss(
        target, x0, t, ac, fam, 0.3, seed=5, reduction="none", prediction_type=prediction_type,
        backend=backend,
    )
    assert bool((loss.sqrt() <= _rounding_bound(x0, 0.3)).all())


@pytest.mark.parametrize("device, backend", STREAMS)
def test_loss_is_bit_reproducible(device, backend):
    shape = (5, 3, 33, 31)
    x0, pred = torch.rand(shape, device=device), torch.randn(shape, device=device, requires_grad=True)
    t, ac, fam = (
        torch.randint(0, T, (5,), device=device),
        _schedule(device),
        torch.rand(shape[2:], device=device),
    )
    losses, grads = [], []
    for _ in range(2):
        loss = srdiff.amplified_noise_loss(pred, x0, t, ac, fam, 0.01, seed=3, backend=backend)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, pred)[0])
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", ["triton", EXTENSION, "reference"])
def test_seed_none_follows_the_global_rng(backend):
    x0, t, ac = torch.rand(ODD), torch.tensor([1, 2, 3]), _schedule("cpu")
    torch.manual_seed(11)
    first = srdiff.amplified_add_noise(x0, t, ac, backend=backend)[1]
    second = srdiff.amplified_add_noise(x0, t, ac, backend=backend)[1]
    torch.manual_seed(11)
    assert torch.equal(first, srdiff.amplified_add_noise(x0, t, ac, backend=backend)[1])
    assert not torch.equal(first, second)


def test_reference_draws_from_a_seeded_generator():
    """The documented reference stream: torch.randn with a torch.Generator seeded by ``seed``."""
    x0, t, ac = torch.rand(ODD), torch.tensor([1, 2, 3]), _schedule("cpu")
    _, eps = amplified_add_noise_ref(x0, t, ac, seed=42)
    assert torch.equal(eps, torch.randn(ODD, generator=torch.Generator().manual_seed(42)))


# The extension's CPU kernels against the Triton kernels' stream. Every step of the two is the same
# float32 operation in the same order except the logarithm of the Box-Muller radius (Cephes' polynomial
# in csrc/cpu/normal_stream.h, numpy's logf in the interpreter, libdevice on a GPU), each within
# 2 ulps of ln u: |Δ ln u| <= 4 ulps, so r = sqrt(-2 ln u) moves by at most 2 ulps relative, and the
# product r·cos (or r·sin) may round to a neighbour once more: |Δε| <= 4·2⁻²⁴·|ε| (+ the smallest
# normal float, for ε = 0). A wrong word, row or element misses by O(1).
@needs_ext
@pytest.mark.parametrize(
    "shape",
    [(3, 3, 7, 5), (1, 1, 1, 3), (2, 3, 67, 71), (1, 2, 129, 65)],
    ids=["odd", "fewer-than-a-row", "two-blocks-a-plane", "tiles-straddle-rows"],
)
@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1, 2**32 + 5, 2**63 - 1])
def test_extension_draws_the_triton_stream(shape, seed):
    eps = _epsilon(shape, seed, "cpu", backend="extension")
    expected = _epsilon(shape, seed, "cpu", backend="triton")
    bound = 4 * 2**-24 * expected.abs() + torch.finfo(torch.float32).tiny
    worst = ((eps - expected).abs() / bound).max().item()
    assert worst <= 1, f"|Δε| reaches {worst:.3g} of the bound"


@needs_ext
def test_portable_stream_equals_the_avx2_one(tmp_path):
    """SRDIFF_PORTABLE_NOISE=1 forces the portable Philox (one row at a time) instead of eight rows
    per AVX2 step: the same words, so the same normals bit for bit. (On a CPU without AVX2 both runs
    take the portable code.)"""
    shape, seed = (2, 3, 67, 71), 2**40 + 3
    out = tmp_path / "eps.pt"
    code = (
        "import sys, torch, srdiff\n"
        "x0 = torch.zeros(*eval(sys.argv[1])); t = torch.zeros(x0.shape[0], dtype=torch.long)\n"
        "ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)\n"
        "eps = srdiff.amplified_add_noise(x0, t, ac, seed=int(sys.argv[2]), recipe='adm',\n"
        "                                 backend='extension')[1]\n"
        "torch.save(eps, sys.argv[3])\n"
    )
    env = {**os.environ, "SRDIFF_PORTABLE_NOISE": "1"}
    subprocess.run([sys.executable, "-c", code, repr(shape), str(seed), str(out)], env=env, check=True)
    assert torch.equal(torch.load(out), _epsilon(shape, seed, "cpu", backend="extension"))


@needs_ext
def test_extension_results_do_not_depend_on_the_thread_count():
    """Fixed blocks of work and a fixed-order sum: 1 or 2 threads give the same bits."""
    shape = (4, 4, 48, 40)  # 16 planes: enough blocks to be split over threads
    x0, pred = torch.rand(shape), torch.randn(shape, requires_grad=True)
    t, ac, fam = torch.randint(0, T, (4,)), _schedule("cpu"), torch.rand(shape[2:])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x_t, _ = srdiff.amplified_add_noise(x0, t, ac, fam=fam, lam=0.01, seed=3, backend="extension")
            loss = srdiff.amplified_noise_loss(pred, x0, t, ac, fam, 0.01, seed=3, backend="extension")
            results.append((x_t, loss, torch.autograd.grad(loss, pred)[0]))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@needs_ext
@pytest.mark.needs_cuda
def test_gpu_and_cpu_draw_the_same_noise():
    """The same seed on a GPU (Triton, compiled) and a CPU (the extension). On top of the logarithms
    above, the GPU compiler contracts the sin/cos polynomials into FMAs: each of their values may
    move by a few ulps of 1, scaled by the radius r <= 5.77, so |Δε| <= 4·2⁻²⁴·(|ε| + 6)."""
    shape, seed = (2, 3, 67, 71), 2**40 + 3
    gpu = _epsilon(shape, seed, "cuda", backend="triton").cpu()
    cpu = _epsilon(shape, seed, "cpu", backend="extension")
    worst = ((gpu - cpu).abs() / (4 * 2**-24 * (cpu.abs() + 6))).max().item()
    assert worst <= 1, f"|Δε| reaches {worst:.3g} of the bound"
