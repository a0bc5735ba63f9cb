"""Forward-process noise amplification (ε_sr = ε + λ·M) and its ε-loss, fused.

Follow a call: :func:`amplified_add_noise` / :func:`amplified_noise_loss` check their arguments, then
run the Triton kernels of ``kernels/noise.py`` (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
or :mod:`srdiff.reference.noise` (CPU tensors, or ``backend="reference"``).

A training step passes the same ``seed`` to both calls: the noising writes x_t only, and the loss
regenerates the same ε in its forward and backward instead of storing ε or the target::

    x_t, _ = srdiff.amplified_add_noise(x0, t, alphas_cumprod, fam=M, lam=0.01, seed=s, return_target=False)
    loss = srdiff.amplified_noise_loss(unet(x_t, t).sample, x0, t, alphas_cumprod, M, 0.01, seed=s)
"""

import math

import torch

from srdiff._checks import check_choice, check_nonnegative, check_same_device, check_tensor, resolve_backend
from srdiff.reference.noise import amplified_add_noise_ref, amplified_noise_loss_ref, reference_noise

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_ALPHA_DTYPES = (torch.float32, torch.float64)
SUPPORTED_DEVICES = ("cpu", "cuda")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
AMPLIFY_MODES = ("add", "scale")
REDUCTIONS = ("mean", "sum", "none")
MAX_SEED = 2**63 - 1


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} must be one of {allowed}, got {t.dtype}")


def _batch_map(fam: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """fam as a (1 | B, H, W) view; it must broadcast to (B, 1, H, W)."""
    B, _, H, W = shape
    ok = fam.dim() in (2, 3, 4) and tuple(fam.shape[-2:]) == (H, W)
    if ok and fam.dim() >= 3:
        ok = fam.shape[0] in (1, B) and (fam.dim() == 3 or fam.shape[1] == 1)
    if not ok:
        raise ValueError(
            f"fam must broadcast to (B, 1, H, W) = {(B, 1, H, W)} as (H, W), (B, H, W) or (B, 1, H, W), "
            f"got shape {tuple(fam.shape)}"
        )
    return fam.reshape(-1, H, W)


def _check_seed(seed) -> None:
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")


def _check_values(timesteps, alphas_cumprod, fam) -> None:
    """Value checks on device data, read back with one sync (skipped while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return
    T = alphas_cumprod.numel()
    timesteps = timesteps.long()  # comparing uint8 with T >= 256 would wrap T
    checks = [
        ((timesteps >= 0) & (timesteps < T)).all(),
        ((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all(),
    ]
    if fam is not None:
        checks.append(torch.isfinite(fam).all())
    ok = torch.stack(checks).tolist()
    if not ok[0]:
        lo, hi = int(timesteps.min()), int(timesteps.max())
        raise ValueError(
            f"timesteps must lie in [0, {T - 1}] (len(alphas_cumprod) = {T}), got values in [{lo}, {hi}]"
        )
    if not ok[1]:
        lo, hi = alphas_cumprod.min().item(), alphas_cumprod.max().item()
        raise ValueError(f"alphas_cumprod must lie in (0, 1], got values in [{lo}, {hi}]")
    if len(ok) > 2 and not ok[2]:
        bad = int((~torch.isfinite(fam)).sum())
        raise ValueError(f"fam must be finite, found {bad} non-finite value(s) of {fam.numel()}")


def _check_args(
    x0,
    timesteps,
    alphas_cumprod,
    noise,
    fam,
    lam,
    seed,
    amplify,
    prediction_type,
    pred=None,
    reduction="mean",
) -> torch.Tensor | None:
    """Checks shared by both functions; returns the map as (1 | B, H, W), or None when it has no effect."""
    check_tensor("x0", x0, ndim=4)
    _check_dtype("x0", x0, SUPPORTED_DTYPES)
    if x0.numel() == 0:
        raise ValueError(f"x0 must be non-empty, got shape {tuple(x0.shape)}")
    if x0.device.type not in SUPPORTED_DEVICES:
        raise ValueError(f"x0 must be on one of {SUPPORTED_DEVICES}, got {x0.device}")
    B = x0.shape[0]
    if pred is not None:
        check_tensor("pred", pred)
        _check_dtype("pred", pred, SUPPORTED_DTYPES)
        if pred.shape != x0.shape:
            raise ValueError(f"pred must have the shape of x0 {tuple(x0.shape)}, got {tuple(pred.shape)}")
    check_tensor("timesteps", timesteps, ndim=1)
    if timesteps.dtype.is_floating_point or timesteps.dtype.is_complex or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer tensor, got dtype {timesteps.dtype}")
    if timesteps.shape[0] != B:
        raise ValueError(f"timesteps must have shape (B,) = ({B},), got {tuple(timesteps.shape)}")
    check_tensor("alphas_cumprod", alphas_cumprod, ndim=1)
    _check_dtype("alphas_cumprod", alphas_cumprod, SUPPORTED_ALPHA_DTYPES)
    if alphas_cumprod.numel() == 0:
        raise ValueError("alphas_cumprod must be non-empty, got shape (0,)")
    if noise is not None:
        check_tensor("noise", noise, floating=True)
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        if seed is not None:
            raise ValueError("pass either noise or seed, not both: with noise given, no ε is drawn")
    check_nonnegative("lam", lam)
    if not math.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}")
    _check_seed(seed)
    check_choice("amplify", amplify, AMPLIFY_MODES)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_choice("reduction", reduction, REDUCTIONS)
    if fam is not None:
        check_tensor("fam", fam, floating=True)
        fam = _batch_map(fam, x0.shape)
    check_same_device(
        x0=x0, pred=pred, timesteps=timesteps, alphas_cumprod=alphas_cumprod, noise=noise, fam=fam
    )
    return None if fam is None or lam == 0 else fam


def _check_no_grad(**tensors: torch.Tensor | None) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{name} requires grad, but the fused kernels differentiate only the loss with respect to pred: "
                f"detach {name}, or use backend='reference'"
            )


class _LastReferenceDraw:
    """The reference path's ε for one seed, kept from the noising call for the loss call.

    On a CPU, drawing ε costs about as much as the rest of noising + loss. A training step draws it
    twice with the same seed (noising, then the loss), so the noising call keeps its draw, one
    tensor keyed by (seed, shape, device), and the next loss call with that key takes it instead
    of drawing again: the same values the loss would have drawn, bit for bit, one draw saved.
    """

    key: tuple | None = None
    noise: torch.Tensor | None = None

    @classmethod
    def draw(cls, x0: torch.Tensor, seed: int) -> torch.Tensor:
        cls.key, cls.noise = (seed, tuple(x0.shape), x0.device), reference_noise(x0, seed)
        return cls.noise

    @classmethod
    def take(cls, x0: torch.Tensor, seed: int | None) -> torch.Tensor | None:
        if seed is None or cls.key != (seed, tuple(x0.shape), x0.device):
            return None
        noise, cls.key, cls.noise = cls.noise, None, None
        return noise


def _kernel_seed(seed: int | None) -> int:
    """seed, or a fresh one drawn from torch's global (CPU) generator: torch.manual_seed reproduces it."""
    return int(torch.randint(MAX_SEED, ())) if seed is None else seed


def amplified_add_noise(
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
    check_values: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise x0 to step t with the noise amplified where the flaw map is high, in one pass.

    ε_sr = ε + lam·fam (``amplify="add"``, the paper) or ε·(1 + lam·fam) (``"scale"``, the authors'
    ADM code); x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε_sr. The target is, with ε_n = ε_sr if
    ``amplified_target`` (the paper, the U-ViT code) else ε (the ADM code): ε_n for
    ``prediction_type="epsilon"``, √ᾱ_t·ε_n − √(1 − ᾱ_t)·x0 for ``"v_prediction"``, x0 for
    ``"sample"`` (diffusers' names). ``lam=0`` or ``fam=None`` is plain DDPM noising.

    Args:
        x0: (B, C, H, W) images or latents; float32, float16 or bfloat16, any strides (a
            non-contiguous x0 costs the kernels one copy). Computed in float32.
        timesteps: (B,) any integer dtype, in [0, T).
        alphas_cumprod: (T,) ᾱ in (0, 1], float32 or float64 (the square roots are taken in its
            dtype, then rounded to float32), e.g. ``DDPMScheduler().alphas_cumprod`` moved to x0's device.
        noise: optional (B, C, H, W) ε, any float dtype; without it ε ~ N(0, 1) is drawn from ``seed``.
        fam: the flaw map M, broadcasting to (B, 1, H, W): (H, W) (one mFAM for the batch, as in
            the trainer), (B, H, W) or (B, 1, H, W); any float dtype; finite.
        lam: λ ≥ 0.
        seed: int in [0, 2**63): the same seed gives the same ε on the same backend and device
            type. The Triton kernels draw ε with Philox keyed by (seed, element index); the
            reference with a ``torch.Generator`` seeded by ``seed``: the two streams differ.
            ``None``: the reference draws from the global RNG, the kernels from a fresh seed that
            the global CPU generator draws. Do not pass both ``noise`` and ``seed``.
        return_target: False returns (x_t, None) and writes only x_t (the training step's pass).
        check_values: check timesteps ∈ [0, T), alphas_cumprod ∈ (0, 1] and fam finite, at the
            cost of one device sync (skipped under torch.compile). With False, out-of-range
            timesteps are clamped by the kernels, and other bad values give undefined results.
        backend: None (Triton on CUDA, the reference on CPU), ``"triton"`` or ``"reference"``.

    Returns:
        (x_t, target), both (B, C, H, W) contiguous in x0's dtype; target is None without
        ``return_target``. The Triton path returns tensors without autograd history and refuses
        inputs that require grad; the reference path is differentiable.

    Example::

        >>> x0, t = torch.rand(8, 3, 32, 32), torch.randint(0, 1000, (8,))
        >>> ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        >>> x_t, eps_sr = srdiff.amplified_add_noise(x0, t, ac, fam=torch.rand(32, 32), lam=0.01, seed=0)
    """
    fam = _check_args(x0, timesteps, alphas_cumprod, noise, fam, lam, seed, amplify, prediction_type)
    if check_values:
        _check_values(timesteps, alphas_cumprod, fam)
    options = dict(amplify=amplify, amplified_target=amplified_target, prediction_type=prediction_type)
    if resolve_backend(backend, x0.device) == "reference":
        if noise is None and seed is not None:
            noise, seed = _LastReferenceDraw.draw(x0, seed), None
        return amplified_add_noise_ref(
            x0, timesteps, alphas_cumprod, noise, fam, lam, seed=seed, return_target=return_target, **options
        )
    from srdiff.kernels.noise import amplified_add_noise_fwd

    _check_no_grad(x0=x0, noise=noise, fam=fam)
    return amplified_add_noise_fwd(
        x0,
        timesteps,
        alphas_cumprod,
        noise,
        fam,
        lam,
        _kernel_seed(seed),
        return_target=return_target,
        **options,
    )


def amplified_noise_loss(
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
    check_values: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """MSE between ``pred`` and the target :func:`amplified_add_noise` builds from the same arguments,
    without ever storing ε or the target: forward and backward regenerate ε from ``seed``.

    Args:
        pred: (B, C, H, W) the denoiser's output; float32, float16 or bfloat16 (may differ from
            x0's dtype). The loss is differentiable with respect to pred, exactly:
            grad = 2·(pred − target)·grad_out (÷ B·C·H·W for "mean"), in pred's dtype.
        x0, timesteps, alphas_cumprod, fam, lam, noise, amplify, amplified_target,
        prediction_type, check_values, backend: as in :func:`amplified_add_noise`; pass the
            values the noising call got.
        seed: the seed the noising call got (required unless ``noise`` is given): the same seed on
            the same backend regenerates the same ε.
        reduction: "mean" (default), "sum" or "none".

    Returns:
        float32 (accumulated in float32): a 0-d tensor for "mean"/"sum", (B, C, H, W) for "none".
        The Triton path's "mean"/"sum" is a fixed-order two-stage reduction: bit-reproducible.

    Example::

        >>> x_t, _ = srdiff.amplified_add_noise(x0, t, ac, fam=M, lam=0.01, seed=7, return_target=False)
        >>> loss = srdiff.amplified_noise_loss(unet(x_t, t).sample, x0, t, ac, M, 0.01, seed=7)
        >>> loss.backward()
    """
    fam = _check_args(
        x0,
        timesteps,
        alphas_cumprod,
        noise,
        fam,
        lam,
        seed,
        amplify,
        prediction_type,
        pred=pred,
        reduction=reduction,
    )
    if seed is None and noise is None:
        raise ValueError(
            "amplified_noise_loss needs seed= (the seed amplified_add_noise got) or noise=: "
            "with neither, its ε would be unrelated to the one in x_t"
        )
    if check_values:
        _check_values(timesteps, alphas_cumprod, fam)
    options = dict(amplify=amplify, amplified_target=amplified_target, prediction_type=prediction_type)
    if resolve_backend(backend, x0.device) == "reference":
        kept = _LastReferenceDraw.take(x0, seed) if noise is None else None
        if kept is not None:
            noise, seed = kept, None
        return amplified_noise_loss_ref(
            pred,
            x0,
            timesteps,
            alphas_cumprod,
            fam,
            lam,
            seed=seed,
            noise=noise,
            reduction=reduction,
            **options,
        )
    from srdiff.kernels.noise import AmplifiedNoiseLossFunction

    _check_no_grad(x0=x0, noise=noise, fam=fam)
    return AmplifiedNoiseLossFunction.apply(
        pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed, dict(reduction=reduction, **options)
    )
