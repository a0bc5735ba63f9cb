"""Forward-process noise amplification (the paper's, the ADM code's and the U-ViT code's recipes) and
its ε-loss, fused.

Follow a call: :func:`amplified_add_noise` / :func:`amplified_noise_loss` check their arguments (the shared
checks and recipes of ``srdiff/_checks.py``), then
run the Triton kernels of ``srdiff/kernels/noise.py`` (CUDA tensors; CPU tensors under TRITON_INTERPRET=1),
the CPU kernels of ``srdiff._C`` (:mod:`srdiff.noise_extension`: CPU tensors when the extension is
built; the same ε stream as the Triton kernels) or :mod:`srdiff.reference.noise` (CPU tensors
without the extension, or ``backend="reference"``).

A training step passes the same ``seed`` to both calls: the noising writes x_t only, and the loss
regenerates the same ε in its forward and backward instead of storing ε or the target::

    x_t, _ = srdiff.amplified_add_noise(x0, t, alphas_cumprod, fam=M, lam=0.01, seed=s, return_target=False)
    loss = srdiff.amplified_noise_loss(unet(x_t, t).sample, x0, t, alphas_cumprod, M, 0.01, seed=s)
"""

import math
import warnings
import weakref

import torch
import torch.nn.functional as F

from srdiff import _extension, noise_extension
from srdiff._checks import (
    AMPLIFICATIONS,
    PREDICTION_TYPES,
    RECIPES,
    SUPPORTED_ALPHA_DTYPES,
    SUPPORTED_DTYPES,
    check_choice,
    check_dtype,
    check_lam,
    check_same_device,
    check_tensor,
    resolve_backend,
)
from srdiff.reference.noise import (
    add_noise_from_epsilon,
    amplified_add_noise_ref,
    amplified_noise_loss_ref,
    amplify as amplify_noise,
    noise_loss_from_target_noise,
    reference_noise,
)

SUPPORTED_DEVICES = ("cpu", "cuda")
AMPLIFY_MODES = ("add", "scale")  # the deprecated amplify= keyword
REDUCTIONS = ("mean", "sum", "none")
MAX_SEED = 2**63 - 1
DEFAULT_RECIPE = "paper"
BACKENDS = ("triton", "extension", "reference")


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    """None: the Triton kernels on CUDA; on the CPU the extension's kernels when built, else the
    reference (srdiff warned once at import why the extension is not used)."""
    if backend is None and device.type == "cpu":
        return "extension" if noise_extension.available() else "reference"
    if backend == "extension":
        if device.type != "cpu":
            raise ValueError(
                "backend='extension' runs CPU tensors only (CUDA tensors take the Triton kernels), "
                f"got x0 on {device}"
            )
        if not noise_extension.available():
            why = _extension.WHY_NOT or "it was built before them"
            raise RuntimeError(f"backend='extension' but srdiff._C has no noise kernels: {why}")
        return backend
    return resolve_backend(backend, device, BACKENDS)


def _batch_map(fam: torch.Tensor, shape: torch.Size, resize: bool) -> torch.Tensor:
    """fam as a (1 | B, H, W) tensor that broadcasts to (B, 1, H, W); with ``resize`` a map of any
    (h, w) is first resized bilinearly (half-pixel centres) to (H, W), in float32."""
    B, _, H, W = shape
    ok = fam.dim() in (2, 3, 4) and (resize or tuple(fam.shape[-2:]) == (H, W))
    if ok and fam.dim() >= 3:
        ok = fam.shape[0] in (1, B) and (fam.dim() == 3 or fam.shape[1] == 1)
    if not ok:
        layouts = "(h, w), (B, h, w) or (B, 1, h, w) with resize=True" if resize else (
            "(H, W), (B, H, W) or (B, 1, H, W); pass resize=True to resize a map of another size to (H, W)"
        )
        raise ValueError(f"fam must broadcast to (B, 1, H, W) = {(B, 1, H, W)} as {layouts}, got shape {tuple(fam.shape)}")
    h, w = fam.shape[-2:]
    if h == 0 or w == 0:
        raise ValueError(f"fam must be non-empty, got shape {tuple(fam.shape)}")
    if fam.dim() != 3:
        fam = fam.reshape(-1, h, w)
    if (h, w) != (H, W):
        fam = F.interpolate(fam[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    return fam


def _check_seed(seed) -> None:
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")


def _resolve_recipe(recipe, amplify_, amplified_target) -> tuple[str, str]:
    """The (x_t, target) amplification pair of ``recipe``, or of the deprecated keywords."""
    if amplify_ is None and amplified_target is None:
        recipe = DEFAULT_RECIPE if recipe is None else recipe
        if isinstance(recipe, str):
            check_choice("recipe", recipe, RECIPES)
            return RECIPES[recipe]
        if not (isinstance(recipe, tuple) and len(recipe) == 2 and all(r in AMPLIFICATIONS for r in recipe)):
            raise ValueError(
                f"recipe must be one of {tuple(RECIPES)} or an (x_t, target) pair of {AMPLIFICATIONS}, got {recipe!r}"
            )
        return recipe
    if recipe is not None:
        raise ValueError(
            f"pass recipe= or the deprecated amplify=/amplified_target=, not both (got recipe={recipe!r}, "
            f"amplify={amplify_!r}, amplified_target={amplified_target!r})"
        )
    amplify_ = "add" if amplify_ is None else amplify_
    check_choice("amplify", amplify_, AMPLIFY_MODES)
    if not isinstance(amplified_target, (bool, type(None))):
        raise TypeError(f"amplified_target must be a bool, got {type(amplified_target).__name__}")
    pair = (amplify_, amplify_ if amplified_target in (None, True) else "plain")
    name = next((n for n, p in RECIPES.items() if p == pair), None)
    warnings.warn(
        f"amplify= and amplified_target= are deprecated: use recipe={name or pair!r}"
        + ("" if name else " (this combination has no name: the paper's codes use 'paper', 'adm', 'uvit')"),
        DeprecationWarning,
        stacklevel=3,
    )
    return pair


def _check_values(timesteps, alphas_cumprod, fam) -> None:
    """Value checks on device data: three min/max reductions read back with one sync (skipped while
    torch.compile traces)."""
    if torch.compiler.is_compiling():
        return
    T = alphas_cumprod.numel()
    ranges = [*torch.aminmax(timesteps), *torch.aminmax(alphas_cumprod)]
    if fam is not None:
        ranges += torch.aminmax(fam)  # NaN propagates to both, inf to one
    t_lo, t_hi, a_lo, a_hi, *fam_range = torch.stack([r.double() for r in ranges]).tolist()
    if not (t_lo >= 0 and t_hi < T):
        raise ValueError(
            f"timesteps must lie in [0, {T - 1}] (len(alphas_cumprod) = {T}), got values in [{int(t_lo)}, {int(t_hi)}]"
        )
    if not (a_lo > 0 and a_hi <= 1):
        raise ValueError(f"alphas_cumprod must lie in (0, 1], got values in [{a_lo}, {a_hi}]")
    if fam_range and not all(math.isfinite(v) for v in fam_range):
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
    prediction_type,
    resize,
    pred=None,
    reduction="mean",
) -> torch.Tensor | None:
    """Checks shared by both functions; returns the map as (1 | B, H, W) (None without one)."""
    check_tensor("x0", x0, ndim=4)
    check_dtype("x0", x0, SUPPORTED_DTYPES)
    if x0.numel() == 0:
        raise ValueError(f"x0 must be non-empty, got shape {tuple(x0.shape)}")
    if x0.device.type not in SUPPORTED_DEVICES:
        raise ValueError(f"x0 must be on one of {SUPPORTED_DEVICES}, got {x0.device}")
    B = x0.shape[0]
    if pred is not None:
        check_tensor("pred", pred)
        check_dtype("pred", pred, SUPPORTED_DTYPES)
        if pred.shape != x0.shape:
            raise ValueError(f"pred must have the shape of x0 {tuple(x0.shape)}, got {tuple(pred.shape)}")
    check_tensor("timesteps", timesteps, ndim=1)
    if timesteps.dtype.is_floating_point or timesteps.dtype.is_complex or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer tensor, got dtype {timesteps.dtype}")
    if timesteps.shape[0] != B:
        raise ValueError(f"timesteps must have shape (B,) = ({B},), got {tuple(timesteps.shape)}")
    check_tensor("alphas_cumprod", alphas_cumprod, ndim=1)
    check_dtype("alphas_cumprod", alphas_cumprod, SUPPORTED_ALPHA_DTYPES)
    if alphas_cumprod.numel() == 0:
        raise ValueError("alphas_cumprod must be non-empty, got shape (0,)")
    if noise is not None:
        check_tensor("noise", noise, floating=True)
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        if seed is not None:
            raise ValueError("pass either noise or seed, not both: with noise given, no ε is drawn")
    check_lam(lam)
    _check_seed(seed)
    if prediction_type not in PREDICTION_TYPES:
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if reduction not in REDUCTIONS:
        check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(resize, bool):
        raise TypeError(f"resize must be a bool, got {type(resize).__name__}")
    if fam is not None:
        check_tensor("fam", fam, floating=True)
        check_same_device(x0=x0, fam=fam)
        fam = _batch_map(fam, x0.shape, resize)
    check_same_device(x0=x0, pred=pred, timesteps=timesteps, alphas_cumprod=alphas_cumprod, noise=noise)
    return fam


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
    """The one tensor of the reference path's noising that its loss call needs, kept between them.

    On a CPU, drawing ε and amplifying it cost about as much as the rest of noising + loss. A
    training step needs them twice with the same seed (noising, then the loss), so the noising call
    keeps, keyed by (seed, shape, device), either ε_x (when the recipe's target uses the very noise
    x_t was built from, as "paper" does; tagged with λ, the amplification, and the user's map
    object by identity and version counter, so an in-place edit or a new map invalidates it) or
    the plain ε (every other recipe: the loss amplifies it as its target needs). Only one tensor is
    kept, so the step holds no more memory than the plain diffusers code. The next loss call with
    that key takes it instead of drawing again, once: the same values, bit for bit; a loss whose
    recipe the kept tensor cannot serve draws afresh.
    """

    key: tuple | None = None
    noise: torch.Tensor | None = None
    how: str = "plain"  # how the kept noise was amplified
    source: tuple | None = None  # (lam, weakref to the user's map, its _version, resize) when amplified

    @classmethod
    def keep(cls, x0, seed: int, eps, eps_x, recipe: tuple[str, str], lam: float, user_fam, fam, resize: bool):
        how_x, how_target = recipe
        cls.key = (seed, tuple(x0.shape), x0.device)
        serves_target = how_x == how_target != "plain" and fam is not None
        if serves_target and not (torch.is_grad_enabled() and user_fam.requires_grad):
            cls.noise, cls.how = eps_x, how_x
            cls.source = (lam, weakref.ref(user_fam), user_fam._version, resize)
        else:
            cls.noise, cls.how, cls.source = eps, "plain", None

    @classmethod
    def take(cls, x0, seed: int | None, how_target: str, lam: float, user_fam, fam, resize: bool):
        """ε_t for the loss from the kept tensor (once), or None when nothing kept serves."""
        if seed is None or cls.key != (seed, tuple(x0.shape), x0.device):
            return None
        noise, how, source = cls.noise, cls.how, cls.source
        cls.key, cls.noise, cls.how, cls.source = None, None, "plain", None
        if how == "plain":
            return amplify_noise(noise, fam, lam, how_target, torch.float32)
        k_lam, k_ref, k_version, k_resize = source
        if how == how_target and (k_lam, k_resize) == (lam, resize) and k_ref() is user_fam \
                and user_fam._version == k_version:
            return noise
        return None


def _kernel_seed(seed: int | None, noise: torch.Tensor | None) -> int:
    """seed, or a fresh one drawn from torch's global (CPU) generator (torch.manual_seed reproduces
    it); unused (0, no draw) when an explicit noise is given."""
    if seed is not None:
        return seed
    return 0 if noise is not None else int(torch.randint(MAX_SEED, ()))


def amplified_add_noise(
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None = None,
    fam: torch.Tensor | None = None,
    lam: float = 0.0,
    *,
    seed: int | None = None,
    recipe: str | tuple[str, str] | None = None,
    prediction_type: str = "epsilon",
    return_target: bool = True,
    resize: bool = False,
    check_values: bool = True,
    backend: str | None = None,
    amplify: str | None = None,
    amplified_target: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise x0 to step t with the noise amplified where the flaw map is high, in one pass.

    x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε_x; the target is ε_t for ``prediction_type="epsilon"``,
    √ᾱ_t·ε_t − √(1 − ᾱ_t)·x0 for ``"v_prediction"``, x0 for ``"sample"`` (diffusers' names), where
    the recipe says which noise is which:

    ========== ================ ============== =====================================
    recipe     ε_x (in x_t)     ε_t (target)   from
    ========== ================ ============== =====================================
    "paper"    ε + λ·M          ε + λ·M        the paper's formula (default)
    "adm"      ε·(1 + λ·M)      ε              the authors' Guided-Diffusion code
    "uvit"     ε                ε + λ·M        the authors' U-ViT code
    ========== ================ ============== =====================================

    ``lam=0`` or ``fam=None`` is plain DDPM noising whatever the recipe.

    Args:
        x0: (B, C, H, W) images or latents; float32, float16 or bfloat16, any strides (a
            non-contiguous x0 costs the kernels one copy). Computed in float32.
        timesteps: (B,) any integer dtype, in [0, T).
        alphas_cumprod: (T,) ᾱ in (0, 1], float32 or float64 (the square roots are taken in its
            dtype, then rounded to float32), e.g. ``DDPMScheduler().alphas_cumprod`` moved to x0's device.
        noise: optional (B, C, H, W) ε, any float dtype; without it ε ~ N(0, 1) is drawn from ``seed``.
        fam: the flaw map M, broadcasting to (B, 1, H, W): (H, W) (one mFAM for the batch, as in
            the trainer), (B, H, W) or (B, 1, H, W); any float dtype; finite.
        lam: λ ≥ 0, finite.
        seed: int in [0, 2**63): the same seed gives the same ε on the same backend. The Triton
            kernels (CUDA) and the extension's CPU kernels draw the same ε, Philox keyed by (seed,
            element index), to the last ulp of a logarithm; the reference draws from a
            ``torch.Generator`` seeded by ``seed``: another stream. ``None``: the reference draws
            from the global RNG, the kernels from a fresh seed that the global CPU generator
            draws. Do not pass both ``noise`` and ``seed``.
        recipe: ``"paper"`` (default), ``"adm"`` or ``"uvit"`` (table above), or an explicit
            (ε_x, ε_t) pair of ``"plain"`` (ε), ``"add"`` (ε + λ·M), ``"scale"`` (ε·(1 + λ·M)).
        return_target: False returns (x_t, None) and writes only x_t (the training step's pass).
        resize: accept a map of any size (h, w) and resize it bilinearly (half-pixel centres,
            ``F.interpolate(align_corners=False)``) to (H, W), e.g. an image-space mFAM on latents.
            Without it a map whose (h, w) differs from x0's is refused.
        check_values: check timesteps ∈ [0, T), alphas_cumprod ∈ (0, 1] and fam finite: three
            min/max reductions read back with one device sync (skipped under torch.compile). With
            False, out-of-range timesteps are clamped by the kernels, and other bad values give
            undefined results.
        backend: None (Triton on CUDA; on CPU the extension's kernels when built, else the
            reference), ``"triton"``, ``"extension"`` (CPU tensors) or ``"reference"``.
        amplify, amplified_target: deprecated (a ``DeprecationWarning``): ``amplify="add"`` with
            ``amplified_target=True`` is ``recipe="paper"``, ``"scale"`` with False is ``"adm"``;
            the two other combinations are the pairs ``("add", "plain")`` and ``("scale", "scale")``.

    Returns:
        (x_t, target), both (B, C, H, W) contiguous in x0's dtype; target is None without
        ``return_target``. The kernels (Triton, extension) return tensors without autograd history
        and refuse inputs that require grad; the reference path is differentiable.

    Example::

        >>> x0, t = torch.rand(8, 3, 32, 32), torch.randint(0, 1000, (8,))
        >>> ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        >>> x_t, eps_t = srdiff.amplified_add_noise(x0, t, ac, fam=torch.rand(32, 32), lam=0.01, seed=0)
    """
    pair = _resolve_recipe(recipe, amplify, amplified_target)
    user_fam = fam
    fam = _check_args(x0, timesteps, alphas_cumprod, noise, fam, lam, seed, prediction_type, resize)
    if check_values:
        _check_values(timesteps, alphas_cumprod, fam)
    fam = None if lam == 0 else fam  # checked, but without effect
    path = _resolve_backend(backend, x0.device)
    if path == "reference":
        if noise is not None or seed is None:
            return amplified_add_noise_ref(
                x0, timesteps, alphas_cumprod, noise, fam, lam, seed=seed, recipe=pair,
                prediction_type=prediction_type, return_target=return_target,
            )
        eps = reference_noise(x0, seed)
        x_t, target, eps_x = add_noise_from_epsilon(
            x0, timesteps, alphas_cumprod, eps, fam, lam, pair, prediction_type, return_target, torch.float32
        )
        _LastReferenceDraw.keep(x0, seed, eps, eps_x, pair, lam, user_fam, fam, resize)
        return x_t, target
    _check_no_grad(x0=x0, noise=noise, fam=fam)
    kwargs = dict(recipe=pair, prediction_type=prediction_type, return_target=return_target)
    seed = _kernel_seed(seed, noise)
    if path == "extension":
        return noise_extension.amplified_add_noise_cpu(x0, timesteps, alphas_cumprod, noise, fam, lam, seed, **kwargs)
    from srdiff.kernels.noise import amplified_add_noise_fwd

    return amplified_add_noise_fwd(x0, timesteps, alphas_cumprod, noise, fam, lam, seed, **kwargs)
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
    recipe: str | tuple[str, str] | None = None,
    prediction_type: str = "epsilon",
    resize: bool = False,
    check_values: bool = True,
    backend: str | None = None,
    amplify: str | None = None,
    amplified_target: bool | None = None,
) -> torch.Tensor:
    """MSE between ``pred`` and the target :func:`amplified_add_noise` builds from the same arguments,
    without ever storing ε or the target: the Triton kernels regenerate ε from ``seed`` in the
    forward and again in the backward; the CPU kernel regenerates it once, in the forward, which also
    writes the gradient (float32, pred's size) that the backward scales by grad_out.

    Args:
        pred: (B, C, H, W) the denoiser's output; float32, float16 or bfloat16 (may differ from
            x0's dtype). The loss is differentiable with respect to pred, exactly:
            grad = 2·(pred − target)·grad_out (÷ B·C·H·W for "mean"), in pred's dtype.
        x0, timesteps, alphas_cumprod, fam, lam, noise, recipe, prediction_type, resize,
        check_values, backend, amplify, amplified_target: as in :func:`amplified_add_noise`; pass
            the values the noising call got.
        seed: the seed the noising call got (required unless ``noise`` is given): the same seed on
            the same backend regenerates the same ε.
        reduction: "mean" (default), "sum" or "none".

    Returns:
        float32 (accumulated in float32; by the CPU kernel in float64): a 0-d tensor for
        "mean"/"sum", (B, C, H, W) for "none".
        The kernels' "mean"/"sum" are fixed-order two-stage reductions: bit-reproducible (the CPU
        kernel's for any thread count).

    Example::

        >>> x_t, _ = srdiff.amplified_add_noise(x0, t, ac, fam=M, lam=0.01, seed=7, return_target=False)
        >>> loss = srdiff.amplified_noise_loss(unet(x_t, t).sample, x0, t, ac, M, 0.01, seed=7)
        >>> loss.backward()
    """
    pair = _resolve_recipe(recipe, amplify, amplified_target)
    user_fam = fam
    fam = _check_args(
        x0, timesteps, alphas_cumprod, noise, fam, lam, seed, prediction_type, resize, pred=pred, reduction=reduction
    )
    if seed is None and noise is None:
        raise ValueError(
            "amplified_noise_loss needs seed= (the seed amplified_add_noise got) or noise=: "
            "with neither, its ε would be unrelated to the one in x_t"
        )
    if check_values:
        _check_values(timesteps, alphas_cumprod, fam)
    fam = None if lam == 0 else fam  # checked, but without effect
    path = _resolve_backend(backend, x0.device)
    if path == "reference":
        eps_target = None if noise is not None else _LastReferenceDraw.take(
            x0, seed, pair[1], lam, user_fam, fam, resize
        )
        if eps_target is None:
            return amplified_noise_loss_ref(
                pred, x0, timesteps, alphas_cumprod, fam, lam, seed=seed, noise=noise, reduction=reduction,
                recipe=pair, prediction_type=prediction_type,
            )
        return noise_loss_from_target_noise(
            pred, x0, timesteps, alphas_cumprod, eps_target, prediction_type, reduction, torch.float32
        )
    _check_no_grad(x0=x0, noise=noise, fam=fam)
    options = dict(reduction=reduction, recipe=pair, prediction_type=prediction_type)
    seed = _kernel_seed(seed, noise)  # seed is given unless noise is
    if path == "extension":
        return noise_extension.amplified_noise_loss_cpu(pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed,
                                                        **options)
    from srdiff.kernels.noise import AmplifiedNoiseLossFunction

    return AmplifiedNoiseLossFunction.apply(pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed, options)
