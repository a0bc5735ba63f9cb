"""Noise amplification and the epsilon-loss in plain PyTorch: the oracle for srdiff/kernels/noise.py, the
CPU path of :func:`srdiff.amplified_add_noise` / :func:`srdiff.amplified_noise_loss`, and the eager
baseline of the benchmarks.

A recipe says which noise builds x_t and which one the model learns, each ε amplified by the map M
in one of three ways: "plain" (ε), "add" (ε + λ·M) or "scale" (ε·(1 + λ·M)):

    recipe    x_t from      target from
    paper     ε + λ·M       ε + λ·M      (the paper's formula)
    adm       ε·(1 + λ·M)   ε            (the authors' Guided-Diffusion code)
    uvit      ε             ε + λ·M      (the authors' U-ViT code)

    x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε_x
    target = ε_t (epsilon) | √ᾱ_t·ε_t − √(1 − ᾱ_t)·x0 (v_prediction) | x0 (sample).

Without ``noise``, ε is drawn with a ``torch.Generator`` seeded by ``seed`` (the global RNG when seed
is None), in float32 on x0's device: a different stream from the Triton kernels' Philox noise.
"""

import torch
import torch.nn.functional as F

from srdiff._checks import RECIPES


def recipe_pair(recipe: str | tuple[str, str]) -> tuple[str, str]:
    """(x_t amplification, target amplification) of a recipe name, or of an explicit pair."""
    return RECIPES[recipe] if isinstance(recipe, str) else tuple(recipe)


def reference_noise(x0: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The ε the reference draws for ``x0`` and ``seed``: float32 N(0, 1) from a ``torch.Generator``
    seeded by ``seed`` (the global RNG when None), on x0's device."""
    generator = None if seed is None else torch.Generator(device=x0.device).manual_seed(seed)
    return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)


def _epsilon(x0: torch.Tensor, noise: torch.Tensor | None, seed: int | None, dtype: torch.dtype):
    return (reference_noise(x0, seed) if noise is None else noise).to(dtype)


def coefficients(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, dtype: torch.dtype):
    """(√ᾱ_t, √(1 − ᾱ_t)) as (B, 1, 1, 1), computed in alphas_cumprod's dtype, then cast to ``dtype``."""
    index = timesteps if timesteps.dtype in (torch.int32, torch.int64) else timesteps.long()
    abar = alphas_cumprod.index_select(0, index).view(-1, 1, 1, 1)
    return abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype)


def _as_batch_map(fam: torch.Tensor) -> torch.Tensor:
    """(H, W), (B | 1, H, W) or (B | 1, 1, H, W) -> a map that broadcasts against (B, C, H, W)."""
    return fam[:, None] if fam.dim() == 3 else fam


def amplify(eps: torch.Tensor, fam: torch.Tensor | None, lam: float, how: str, dtype: torch.dtype):
    """ε ("plain", or no map, or lam = 0), ε + λ·M ("add") or ε·(1 + λ·M) ("scale"), in ``dtype``."""
    if fam is None or lam == 0 or how == "plain":
        return eps
    m = lam * _as_batch_map(fam).to(dtype)
    return eps * (1 + m) if how == "scale" else eps + m


def target_from_noise(x0, eps_target, prediction_type: str, dtype, coefficients_=None,
                      timesteps=None, alphas_cumprod=None):
    """The regression target in ``dtype`` from the target's noise ε_t; √ᾱ_t and √(1 − ᾱ_t) are
    gathered (from timesteps and alphas_cumprod, unless given) only for v_prediction."""
    if prediction_type == "epsilon":
        return eps_target
    if prediction_type == "sample":
        return x0.to(dtype)
    sqrt_ab, sqrt_1m_ab = coefficients_ or coefficients(timesteps, alphas_cumprod, dtype)
    return torch.addcmul(sqrt_ab * eps_target, -sqrt_1m_ab, x0.to(dtype))  # v_prediction


def add_noise_from_epsilon(x0, timesteps, alphas_cumprod, eps, fam, lam, recipe, prediction_type: str,
                           return_target: bool, dtype: torch.dtype):
    """(x_t, target or None, ε_x) from a given ε in ``dtype``; x_t and target in x0's dtype."""
    how_x, how_target = recipe_pair(recipe)
    eps_x = amplify(eps, fam, lam, how_x, dtype)
    coefficients_ = coefficients(timesteps, alphas_cumprod, dtype)
    sqrt_ab, sqrt_1m_ab = coefficients_
    x_t = torch.addcmul(sqrt_ab * x0.to(dtype), sqrt_1m_ab, eps_x).to(x0.dtype)
    if not return_target:
        return x_t, None, eps_x
    eps_target = eps_x if how_target == how_x else amplify(eps, fam, lam, how_target, dtype)
    target = target_from_noise(x0, eps_target, prediction_type, dtype, coefficients_)
    return x_t, target.to(x0.dtype), eps_x


def noise_loss_from_target_noise(pred, x0, timesteps, alphas_cumprod, eps_target, prediction_type: str,
                                 reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """MSE of ``pred`` against the target built from its noise ε_t (unused for "sample"), in ``dtype``."""
    target = target_from_noise(x0, eps_target, prediction_type, dtype, None, timesteps, alphas_cumprod)
    return F.mse_loss(pred.to(dtype), target, reduction=reduction)


def amplified_add_noise_ref(
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None = None,
    fam: torch.Tensor | None = None,
    lam: float = 0.0,
    *,
    seed: int | None = None,
    recipe: str | tuple[str, str] = "paper",
    prediction_type: str = "epsilon",
    return_target: bool = True,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward-process noising with flaw-map amplification.

    x0: (B, C, H, W); timesteps: (B,) integer; alphas_cumprod: (T,); noise: None or (B, C, H, W);
    fam: None or a map broadcasting to (B, 1, H, W): (H, W), (B, H, W) or (B, 1, H, W); recipe: a
    name of :data:`srdiff._checks.RECIPES` or an (x_t, target) pair of :data:`srdiff._checks.AMPLIFICATIONS`. Computes in float32
    when ``upcast`` (else in x0's dtype) and returns (x_t, target) in x0's dtype, or (x_t, None)
    without ``return_target``. Differentiable by autograd.
    """
    dtype = torch.float32 if upcast else x0.dtype
    eps = _epsilon(x0, noise, seed, dtype)
    x_t, target, _ = add_noise_from_epsilon(
        x0, timesteps, alphas_cumprod, eps, fam, lam, recipe, prediction_type, return_target, dtype
    )
    return x_t, target


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
    recipe: str | tuple[str, str] = "paper",
    prediction_type: str = "epsilon",
    upcast: bool = True,
) -> torch.Tensor:
    """MSE of ``pred`` (B, C, H, W) against the target :func:`amplified_add_noise_ref` builds from the
    same arguments (the same seed regenerates the same ε). Float32 when ``upcast`` (else in pred's
    dtype): a 0-d tensor for ``reduction`` "mean"/"sum", (B, C, H, W) for "none". Differentiable by
    autograd.
    """
    dtype = torch.float32 if upcast else pred.dtype
    eps_target = None
    if prediction_type != "sample":  # the target holds no noise: nothing to draw
        eps_target = amplify(_epsilon(x0, noise, seed, dtype), fam, lam, recipe_pair(recipe)[1], dtype)
    return noise_loss_from_target_noise(pred, x0, timesteps, alphas_cumprod, eps_target, prediction_type,
                                        reduction, dtype)
