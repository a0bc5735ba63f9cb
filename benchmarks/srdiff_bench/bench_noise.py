"""Noise amplification + ε-loss: srdiff (Triton on CUDA; srdiff._C's CPU kernels on the CPU) vs what a
diffusers user writes (torch.randn, ε + λM, DDPMScheduler.add_noise, F.mse_loss and its backward) vs
srdiff's eager reference (``backend="reference"``: the CPU path when the extension is not built).

Modes: "fwd" is the noising as the trainer calls it (srdiff writes x_t only; the diffusers path also
keeps ε_sr, its target); "fwd+bwd" is the noising, the loss and its gradient with respect to pred:
everything a training step does around the model.

Bytes that must move (N = B·C·H·W, e = the element size of x0 and pred; the (H, W) map adds
4·H·W): fwd 2·e·N (read x0, write x_t); fwd+bwd 7·e·N (the noising's 2·e·N; the loss forward reads
pred and x0; the backward reads them again and writes grad_pred). Every provider's GB/s is against
these bytes, so GB/s ratios are speed ratios.

Only the ``diffusers`` rows need diffusers (the GPU image has no wheel of it): the schedule is
DDPMScheduler's default (linear betas 1e-4 to 0.02 over T steps), built here, and that provider is
reported unavailable when the package is missing.
"""

import pytest
import torch
import torch.nn.functional as F

import srdiff
from srdiff_bench.common import DEVICE, measure, on_device, require_module
from srdiff.reference import amplified_add_noise_ref, amplified_noise_loss_ref

OP = "noise"
T, LAM, SEED = 1000, 0.01, 1234
SHAPES = [(64, 3, 64, 64), (16, 4, 64, 64), (256, 3, 32, 32)]  # pixels at 64 and 32 px, SD-like latents
DTYPES = on_device([torch.float32, torch.bfloat16], [torch.float32])
PROVIDERS = ["srdiff", "srdiff+checks", "reference", "diffusers"]
MODES = ["fwd", "fwd+bwd"]


def _alphas_cumprod() -> torch.Tensor:
    """DDPMScheduler's default schedule: linear betas from 1e-4 to 0.02 over T steps, float32."""
    return torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, T, dtype=torch.float32), dim=0).to(DEVICE)


def _inputs(shape, dtype):
    x0 = torch.rand(shape, device=DEVICE).mul(2).sub(1).to(dtype)
    t = torch.randint(0, T, (shape[0],), device=DEVICE)
    fam = torch.rand(shape[2:], device=DEVICE)
    pred = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    return x0, t, fam, pred


def _diffusers_scheduler(case: dict):
    diffusers = require_module("diffusers", **case)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(DEVICE)  # as diffusers caches it after one call
    return scheduler


def _srdiff(x0, t, ac, fam, pred, mode, check_values):
    kw = dict(seed=SEED, check_values=check_values)

    def step():
        srdiff.amplified_add_noise(x0, t, ac, fam=fam, lam=LAM, return_target=False, **kw)
        if mode == "fwd+bwd":
            loss = srdiff.amplified_noise_loss(pred, x0, t, ac, fam, LAM, **kw)
            torch.autograd.grad(loss, pred)

    return step


def _reference(x0, t, ac, fam, pred, mode):
    def step():
        amplified_add_noise_ref(x0, t, ac, fam=fam, lam=LAM, seed=SEED, return_target=False)
        if mode == "fwd+bwd":
            loss = amplified_noise_loss_ref(pred, x0, t, ac, fam, LAM, seed=SEED)
            torch.autograd.grad(loss, pred)

    return step


def _diffusers(scheduler, x0, t, fam, pred, mode):
    fam = fam.to(x0.dtype)

    def step():
        eps_sr = torch.randn_like(x0) + LAM * fam
        scheduler.add_noise(x0, eps_sr, t)
        if mode == "fwd+bwd":
            torch.autograd.grad(F.mse_loss(pred, eps_sr), pred)

    return step


@pytest.mark.benchmark(group=OP)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", on_device(SHAPES, SHAPES), ids=lambda s: "B{}-C{}-{}x{}".format(*s))
def test_noise(benchmark, provider, mode, dtype, shape):
    case = dict(op=OP, provider=provider, mode=mode, shape={"BCHW": list(shape)}, dtype=dtype)
    x0, t, fam, pred = _inputs(shape, dtype)
    ac = _alphas_cumprod()
    if provider == "srdiff":
        fn = _srdiff(x0, t, ac, fam, pred, mode, check_values=False)
    elif provider == "srdiff+checks":
        fn = _srdiff(x0, t, ac, fam, pred, mode, check_values=True)
    elif provider == "reference":
        fn = _reference(x0, t, ac, fam, pred, mode)
    else:
        scheduler = _diffusers_scheduler(case)
        torch.testing.assert_close(scheduler.alphas_cumprod, ac)  # one schedule for every provider
        fn = _diffusers(scheduler, x0, t, fam, pred, mode)
    n, e = x0.numel(), x0.element_size()
    bytes_moved = (2 if mode == "fwd" else 7) * e * n + 4 * fam.numel()
    measure(benchmark, fn, bytes_moved=bytes_moved, **case)
