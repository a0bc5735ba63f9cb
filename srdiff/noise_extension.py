"""The CPU kernels of ``srdiff._C`` behind :func:`srdiff.amplified_add_noise` and
:func:`srdiff.amplified_noise_loss` (``csrc/cpu/noise_cpu.cpp``; the ε stream in
``csrc/cpu/normal_stream.h``).

They compute what the Triton kernels compute, from the same ε: Philox-4x32-10 keyed by (seed,
element index) and the kernels' Box-Muller, so a seed gives the same noise on a CPU and a GPU (to
the last ulp of a logarithm, and the FMAs a GPU compiler forms). The noising is one pass; the loss
is one pass that also writes its gradient with respect to ``pred`` (a CPU draws ε far slower than it
streams memory, so the gradient is made while ε is at hand), and its backward, a C++ autograd
kernel (no Python on the backward path), is one multiply.

Arguments arrive validated by :mod:`srdiff.noise`; the ops check shapes and dtypes again, so a
direct ``torch.ops.srdiff`` call fails with the same kind of error.
"""

import torch

from srdiff import _extension


_AVAILABLE = _extension.HAS_EXT and hasattr(torch.ops.srdiff, "amplified_add_noise")


def available() -> bool:
    """Whether the loaded extension has the CPU noise kernels (a build older than them does not)."""
    return _AVAILABLE


def amplified_add_noise_cpu(x0, timesteps, alphas_cumprod, noise, fam, lam: float, seed: int, *,
                            recipe: tuple[str, str], prediction_type: str, return_target: bool):
    """(x_t, target or None) in x0's dtype; fam: None or (1 | B, H, W)."""
    out = torch.ops.srdiff.amplified_add_noise(
        x0, timesteps, alphas_cumprod, noise, fam, float(lam), seed, recipe[0], recipe[1], prediction_type,
        return_target,
    )
    return out[0], (out[1] if return_target else None)


def amplified_noise_loss_cpu(pred, x0, timesteps, alphas_cumprod, noise, fam, lam: float, seed: int, *,
                             recipe: tuple[str, str], prediction_type: str, reduction: str):
    """The float32 loss; differentiable with respect to ``pred`` only, by the op's C++ autograd
    kernel: its forward keeps d loss / d pred at grad_out = 1 (float32, pred's size) when pred
    requires grad, its backward multiplies by grad_out."""
    return torch.ops.srdiff.amplified_noise_loss(
        pred, x0, timesteps, alphas_cumprod, noise, fam, float(lam), seed, recipe[1], prediction_type, reduction
    )


if available():

    @torch.library.register_fake("srdiff::amplified_add_noise")
    def _amplified_add_noise_fake(x0, timesteps, alphas_cumprod, noise, fam, lam, seed, x_noise, target_noise,
                                  prediction_type, write_target):
        x_t = torch.empty_like(x0, memory_format=torch.contiguous_format)
        return [x_t, torch.empty_like(x_t)] if write_target else [x_t]

    def _loss_like(x0, reduction):
        return x0.new_empty(x0.shape if reduction == "none" else (), dtype=torch.float32)

    @torch.library.register_fake("srdiff::amplified_noise_loss")
    def _amplified_noise_loss_fake(pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed, target_noise,
                                   prediction_type, reduction):
        return _loss_like(x0, reduction)

    @torch.library.register_fake("srdiff::_amplified_noise_loss_forward")
    def _amplified_noise_loss_forward_fake(pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed, target_noise,
                                           prediction_type, reduction, with_grad):
        loss = _loss_like(x0, reduction)
        return [loss, x0.new_empty(x0.shape, dtype=torch.float32)] if with_grad else [loss]
