"""Noise amplification and the epsilon-loss in plain PyTorch: the oracle for kernels/noise.py, the
CPU path of :func:`srdiff.amplified_add_noise` / :func:`srdiff.amplified_noise_loss`, and the eager
baseline of the benchmarks.

    ε_sr = ε + λ·M (amplify="add")  or  ε·(1 + λ·M) (amplify="scale")
    x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε_sr
    target = ε_n (epsilon) | √ᾱ_t·ε_n − √(1 − ᾱ_t)·x0 (v_prediction) | x0 (sample),
    ε_n = ε_sr if amplified_target else ε.

Without ``noise``, ε is drawn with a ``torch.Generator`` seeded by ``seed`` (the global RNG when seed
is None), in float32 on x0's device: a different stream from the Triton kernels' Philox noise.
"""

import torch
import torch.nn.functional as F


def reference_noise(x0: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The ε the reference draws for ``x0`` and ``seed``: float32 N(0, 1) from a ``torch.Generator``
    seeded by ``seed`` (the global RNG when None), on x0's device."""
    generator = None if seed is None else torch.Generator(device=x0.device).manual_seed(seed)
    return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)


def _epsilon(x0: torch.Tensor, noise: torch.Tensor | None, seed: int | None, dtype: torch.dtype):
    return (reference_noise(x0, seed) if noise is None else noise).to(dtype)


def _coefficients(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, dtype: torch.dtype):
    """(√ᾱ_t, √(1 − ᾱ_t)) as (B, 1, 1, 1), computed in alphas_cumprod's dtype, then cast to ``dtype``."""
    abar = alphas_cumprod[timesteps.long()][:, None, None, None]
    return abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype)


def _as_batch_map(fam: torch.Tensor) -> torch.Tensor:
    """(H, W), (B | 1, H, W) or (B | 1, 1, H, W) -> a map that broadcasts against (B, C, H, W)."""
    return fam[:, None] if fam.dim() == 3 else fam


def _amplify(eps: torch.Tensor, fam: torch.Tensor | None, lam: float, amplify: str, dtype: torch.dtype):
    """ε_sr = ε + λ·M ("add") or ε·(1 + λ·M) ("scale"), in ``dtype``; ε itself when there is no map."""
    if fam is None or lam == 0:
        return eps
    m = lam * _as_batch_map(fam).to(dtype)
    return eps * (1 + m) if amplify == "scale" else eps + m


def _target(x0, timesteps, alphas_cumprod, eps, eps_sr, prediction_type: str, amplified_target: bool, dtype,
            coefficients=None):
    """The regression target in ``dtype``; √ᾱ_t and √(1 − ᾱ_t) are gathered only if it needs them."""
    eps_target = eps_sr if amplified_target else eps
    if prediction_type == "epsilon":
        return eps_target
    if prediction_type == "sample":
        return x0.to(dtype)
    sqrt_ab, sqrt_1m_ab = coefficients or _coefficients(timesteps, alphas_cumprod, dtype)
    return torch.addcmul(sqrt_ab * eps_target, -sqrt_1m_ab, x0.to(dtype))  # v_prediction


def amplified_add_noise_ref(
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None = None,
    fam: torch.Tensor | None = None,
    lam: float = 0.0,
    *,
    seed: int | None = None,
    amplify: str = "add",
    amplified_target: bool = True,
    prediction_type: str = "epsilon",
    return_target: bool = True,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward-process noising with flaw-map amplification.

    x0: (B, C, H, W); timesteps: (B,) integer; alphas_cumprod: (T,); noise: None or (B, C, H, W);
    fam: None or a map broadcasting to (B, 1, H, W): (H, W), (B, H, W) or (B, 1, H, W). Computes in
    float32 when ``upcast`` (else in x0's dtype) and returns (x_t, target) in x0's dtype, or
    (x_t, None) without ``return_target``. Differentiable by autograd.
    """
    dtype = torch.float32 if upcast else x0.dtype
    eps = _epsilon(x0, noise, seed, dtype)
    eps_sr = _amplify(eps, fam, lam, amplify, dtype)
    coefficients = _coefficients(timesteps, alphas_cumprod, dtype)
    sqrt_ab, sqrt_1m_ab = coefficients
    x_t = torch.addcmul(sqrt_ab * x0.to(dtype), sqrt_1m_ab, eps_sr).to(x0.dtype)
    if not return_target:
        return x_t, None
    target = _target(x0, timesteps, alphas_cumprod, eps, eps_sr, prediction_type, amplified_target, dtype,
                     coefficients)
    return x_t, target.to(x0.dtype)


def amplified_noise_loss_ref(
    pred: torch.Tensor,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    fam: torch.Tensor | None = None,
    lam: float = 0.0,
    *,
    seed: int | None = None,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
    amplify: str = "add",
    amplified_target: bool = True,
    prediction_type: str = "epsilon",
    upcast: bool = True,
) -> torch.Tensor:
    """MSE of ``pred`` (B, C, H, W) against the target :func:`amplified_add_noise_ref` builds from the
    same arguments (the same seed regenerates the same ε). Float32 when ``upcast`` (else in pred's
    dtype): a 0-d tensor for ``reduction`` "mean"/"sum", (B, C, H, W) for "none". Differentiable by
    autograd.
    """
    dtype = torch.float32 if upcast else pred.dtype
    if prediction_type == "sample":  # the target holds no noise: nothing to draw
        target = x0.to(dtype)
    else:
        eps = _epsilon(x0, noise, seed, dtype)
        eps_sr = _amplify(eps, fam, lam, amplify, dtype) if amplified_target else eps  # else unused
        target = _target(x0, timesteps, alphas_cumprod, eps, eps_sr, prediction_type, amplified_target, dtype)
    return F.mse_loss(pred.to(dtype), target, reduction=reduction)
