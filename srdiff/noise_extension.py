"""The CPU kernels of ``srdiff._C`` behind :func:`srdiff.amplified_add_noise` and
:func:`srdiff.amplified_noise_loss` (``csrc/cpu/noise_cpu.cpp``; the ε stream in
``csrc/cpu/normal_stream.h``).

They compute what the Triton kernels compute, from the same ε: Philox-4x32-10 keyed by (seed,
element index) and the kernels' Box-Muller, so a seed gives the same noise on a CPU and a GPU (to
the last ulp of a logarithm, and the FMAs a GPU compiler forms). The noising is one pass; the loss
is one pass that also writes its gradient with respect to ``pred`` (a CPU draws ε far slower than it
streams memory, so the gradient is made while ε is at hand), and its backward is one multiply.

Arguments arrive validated by :mod:`srdiff.noise`; the ops check shapes and dtypes again, so a
direct ``torch.ops.srdiff`` call fails with the same kind of error.
"""

import torch

from srdiff import _extension


def available() -> bool:
    """Whether the loaded extension has the CPU noise kernels (a build older than them does not)."""
    return _extension.HAS_EXT and hasattr(torch.ops.srdiff, "amplified_add_noise")


def amplified_add_noise_cpu(x0, timesteps, alphas_cumprod, noise, fam, lam: float, seed: int, *,
                            recipe: tuple[str, str], prediction_type: str, return_target: bool):
    """(x_t, target or None) in x0's dtype; fam: None or (1 | B, H, W)."""
    out = torch.ops.srdiff.amplified_add_noise(
        x0, timesteps, alphas_cumprod, noise, fam, float(lam), seed, recipe[0], recipe[1], prediction_type,
        return_target,
    )
    return out[0], (out[1] if return_target else None)


class AmplifiedNoiseLossCPU(torch.autograd.Function):
    """The loss of the CPU kernel; differentiable with respect to ``pred`` only. The forward keeps
    d loss / d pred for grad_out = 1 (float32, the size of pred) when pred needs a gradient."""

    @staticmethod
    def forward(ctx, pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed, options):
        with_grad = ctx.needs_input_grad[0]
        out = torch.ops.srdiff.amplified_noise_loss(
            pred, x0, timesteps, alphas_cumprod, noise, fam, float(lam), seed, options["recipe"][1],
            options["prediction_type"], options["reduction"], with_grad,
        )
        if with_grad:
            ctx.save_for_backward(out[1])
            ctx.pred_dtype = pred.dtype
        return out[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (unit_grad,) = ctx.saved_tensors
        grad_pred = (unit_grad * grad_out).to(ctx.pred_dtype)
        return grad_pred, None, None, None, None, None, None, None, None


if available():

    @torch.library.register_fake("srdiff::amplified_add_noise")
    def _amplified_add_noise_fake(x0, timesteps, alphas_cumprod, noise, fam, lam, seed, x_noise, target_noise,
                                  prediction_type, write_target):
        x_t = torch.empty_like(x0, memory_format=torch.contiguous_format)
        return [x_t, torch.empty_like(x_t)] if write_target else [x_t]

    @torch.library.register_fake("srdiff::amplified_noise_loss")
    def _amplified_noise_loss_fake(pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed, target_noise,
                                   prediction_type, reduction, with_grad):
        f32 = dict(dtype=torch.float32, device=x0.device)
        loss = x0.new_empty(x0.shape, **f32) if reduction == "none" else x0.new_empty((), **f32)
        return [loss, x0.new_empty(x0.shape, **f32)] if with_grad else [loss]
