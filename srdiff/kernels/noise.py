"""Fused noise amplification and ε-loss for self-refining diffusion (arXiv 2512.08774): one pass in, one out.

    x_t    = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε_x
    target = ε_t | √ᾱ_t·ε_t − √(1 − ᾱ_t)·x0 | x0     for epsilon | v_prediction | sample,
    ε_x, ε_t ∈ {ε, ε + λ·M, ε·(1 + λ·M)}              as the recipe says (X_NOISE, TARGET_NOISE):
    paper (add, add), adm (scale, plain), uvit (plain, add); see srdiff.reference.noise.

Layout: x0 is (B, C, H, W) contiguous; a program handles BLOCK elements of one (b, c) plane, viewed
as [BLOCK // 4, 4] so that one Philox call (tl.randint4x: four 32-bit words) yields the four normals
of a row, by two Box-Muller transforms (:func:`_box_muller`). The grid is
(B*C planes, cdiv(H*W, BLOCK)): the sample index and its coefficients √ᾱ, √(1 − ᾱ) are per-program
scalars gathered from alphas_cumprod[timesteps[b]], and the map M (one (H, W) plane per sample, or
one shared by the batch) is indexed by the in-plane offset, so nothing is divided per element and no
broadcast copy of M is made.

Noise: ε at in-plane offset hw of plane p is normal hw % 4 made from randint4x(seed, p·⌈HW/4⌉ + hw // 4),
a function of (seed, element index) only, independent of BLOCK, dtype and kernel: the noising kernel
and both loss kernels regenerate the identical ε, and the loss never stores ε or the target.

The loss forward is a deterministic two-stage reduction (per-program partial sums into a buffer,
then one program sums them in a fixed order), so it is bit-reproducible run to run.
"""

import torch
import triton
import triton.language as tl

from srdiff._checks import AMPLIFICATIONS, PREDICTION_TYPES, SUPPORTED_ALPHA_DTYPES, SUPPORTED_DTYPES
from srdiff.kernels.utils import input_guard, new_empty

MAX_BLOCK = 4096
MIN_BLOCK = 64
MAX_GRID_DIM1 = 65535
PARTIALS_BLOCK = 1024


@triton.jit
def _plane_block(C, HW, BLOCK: tl.constexpr):
    """This program's plane p = b*C + c, sample b, rows of 4 (in-plane group index), in-plane and
    global offsets, and the tail mask."""
    plane = tl.program_id(0).to(tl.int64)
    b = plane // C
    rows = tl.program_id(1) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    hw = rows[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = hw < HW
    return plane, b, rows, hw, plane * HW + hw, mask


@triton.jit
def _coefficients(t_ptr, ac_ptr, b, T):
    """(√ᾱ_t, √(1 − ᾱ_t)) of sample b, computed in alphas_cumprod's dtype and rounded to fp32."""
    t = tl.load(t_ptr + b).to(tl.int64)
    t = tl.minimum(tl.maximum(t, 0), T - 1)  # memory safety only: the API range-checks timesteps
    abar = tl.load(ac_ptr + t)
    if abar.dtype == tl.float64:  # float64 sqrt is correctly rounded; tl.sqrt_rn takes float32 only
        sqrt_ab, sqrt_1m_ab = tl.sqrt(abar), tl.sqrt(1.0 - abar)
    else:
        sqrt_ab, sqrt_1m_ab = tl.sqrt_rn(abar), tl.sqrt_rn(1.0 - abar)
    return sqrt_ab.to(tl.float32), sqrt_1m_ab.to(tl.float32)


@triton.jit
def _box_muller(a, b):
    """Two independent N(0, 1) draws from two random 32-bit words (uint32).

    Radius from a: u = (its top 23 bits + 1/2)·2⁻²³, exact in float32 and inside (0, 1), so
    |z| ≤ √(−2 ln 2⁻²⁴) = 5.77. Angle from b without a general sin/cos (tl.sin/tl.cos carry a
    large-argument slow path through local memory): its top two bits pick the quadrant, its next 23
    a phase φ ∈ (−π/4, π/4), where Taylor polynomials to φ⁹ / φ¹⁰ are exact to < 2e-9.
    """
    u = ((a >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2⁻²³
    r = tl.sqrt(-2.0 * tl.log(u))
    quarter_turns = (((b >> 7) & 0x7FFFFF).to(tl.float32) + 0.5) * 1.1920928955078125e-07 - 0.5
    phi = quarter_turns * 1.5707963267948966  # π/2
    p2 = phi * phi
    sin = phi + phi * p2 * (-1.6666666666666666e-01 + p2 * (8.333333333333333e-03 + p2 * (
        -1.984126984126984e-04 + p2 * 2.7557319223985893e-06)))
    cos = 1.0 + p2 * (-0.5 + p2 * (4.1666666666666664e-02 + p2 * (-1.3888888888888889e-03 + p2 * (
        2.48015873015873e-05 - p2 * 2.755731922398589e-07))))
    odd = ((b >> 30) & 1) == 1  # rotate (cos, sin) by a quarter turn ...
    x = tl.where(odd, -sin, cos)
    y = tl.where(odd, cos, sin)
    half = (b >> 31) == 1  # ... and by a half turn
    return r * tl.where(half, -x, x), r * tl.where(half, -y, y)


@triton.jit
def _epsilon(noise_ptr, offs, mask, seed, plane, rows, HW, HAS_NOISE: tl.constexpr):
    if HAS_NOISE:
        eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        i0, i1, i2, i3 = tl.randint4x(seed, plane * ((HW + 3) // 4) + rows)
        n0, n1 = _box_muller(i0, i1)
        n2, n3 = _box_muller(i2, i3)
        col = tl.arange(0, 4)[None, :]
        eps = tl.where(col == 0, n0[:, None], n1[:, None])
        eps = tl.where(col == 2, n2[:, None], eps)
        eps = tl.where(col == 3, n3[:, None], eps)
    return eps


@triton.jit
def _lam_map(fam_ptr, b, fam_stride_b, hw, mask, lam, HAS_FAM: tl.constexpr):
    """λ·M at this block's pixels (0 without a map)."""
    if HAS_FAM:
        m = lam * tl.load(fam_ptr + b * fam_stride_b + hw, mask=mask, other=0.0).to(tl.float32)
    else:
        m = 0.0
    return m


@triton.jit
def _amplify(eps, m, HAS_FAM: tl.constexpr, HOW: tl.constexpr):
    """ε (HOW 0, or no map), ε + λ·M (1) or ε·(1 + λ·M) (2), m = λ·M."""
    out = eps
    if HAS_FAM:
        if HOW == 1:
            out = eps + m
        elif HOW == 2:
            out = eps * (1.0 + m)
    return out


@triton.jit
def _target(x0, eps_target, sqrt_ab, sqrt_1m_ab, PREDICTION: tl.constexpr):
    if PREDICTION == 0:
        target = eps_target
    elif PREDICTION == 1:
        target = sqrt_ab * eps_target - sqrt_1m_ab * x0
    else:
        target = x0
    return target


@triton.jit
def _regenerate_target(
    x0, noise_ptr, fam_ptr, t_ptr, ac_ptr, seed, lam, fam_stride_b, T, plane, b, rows, hw, offs, HW, mask,
    HAS_NOISE: tl.constexpr, HAS_FAM: tl.constexpr, TARGET_NOISE: tl.constexpr, PREDICTION: tl.constexpr,
):
    """The target of the loss, rebuilt from (seed, element index) exactly as the noising kernel had it."""
    sqrt_ab, sqrt_1m_ab = _coefficients(t_ptr, ac_ptr, b, T)
    if PREDICTION == 2:
        target = x0
    else:
        eps = _epsilon(noise_ptr, offs, mask, seed, plane, rows, HW, HAS_NOISE)
        m = _lam_map(fam_ptr, b, fam_stride_b, hw, mask, lam, HAS_FAM)
        eps_t = _amplify(eps, m, HAS_FAM, TARGET_NOISE)
        target = _target(x0, eps_t, sqrt_ab, sqrt_1m_ab, PREDICTION)
    return target


@triton.jit(do_not_specialize=["seed"])
def _amplified_add_noise_fwd_kernel(
    x0_ptr, noise_ptr, fam_ptr, t_ptr, ac_ptr, xt_ptr, target_ptr,
    seed, lam, C, HW, fam_stride_b, T,
    HAS_NOISE: tl.constexpr, HAS_FAM: tl.constexpr, X_NOISE: tl.constexpr, TARGET_NOISE: tl.constexpr,
    PREDICTION: tl.constexpr, WRITE_TARGET: tl.constexpr, BLOCK: tl.constexpr,
):
    plane, b, rows, hw, offs, mask = _plane_block(C, HW, BLOCK)
    sqrt_ab, sqrt_1m_ab = _coefficients(t_ptr, ac_ptr, b, T)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = _epsilon(noise_ptr, offs, mask, seed, plane, rows, HW, HAS_NOISE)
    m = _lam_map(fam_ptr, b, fam_stride_b, hw, mask, lam, HAS_FAM)
    eps_x = _amplify(eps, m, HAS_FAM, X_NOISE)
    x_t = sqrt_ab * x0 + sqrt_1m_ab * eps_x
    tl.store(xt_ptr + offs, x_t.to(xt_ptr.dtype.element_ty), mask=mask)
    if WRITE_TARGET:
        eps_t = _amplify(eps, m, HAS_FAM, TARGET_NOISE)
        target = _target(x0, eps_t, sqrt_ab, sqrt_1m_ab, PREDICTION)
        tl.store(target_ptr + offs, target.to(target_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _amplified_noise_loss_fwd_kernel(
    pred_ptr, x0_ptr, noise_ptr, fam_ptr, t_ptr, ac_ptr, out_ptr,
    seed, lam, C, HW, fam_stride_b, T,
    HAS_NOISE: tl.constexpr, HAS_FAM: tl.constexpr, TARGET_NOISE: tl.constexpr, PREDICTION: tl.constexpr,
    ELEMENTWISE: tl.constexpr, BLOCK: tl.constexpr,
):
    """ELEMENTWISE: out[i] = (pred - target)²; else out[program] = its partial sum (stage 1)."""
    plane, b, rows, hw, offs, mask = _plane_block(C, HW, BLOCK)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pred = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    target = _regenerate_target(
        x0, noise_ptr, fam_ptr, t_ptr, ac_ptr, seed, lam, fam_stride_b, T, plane, b, rows, hw, offs, HW, mask,
        HAS_NOISE, HAS_FAM, TARGET_NOISE, PREDICTION,
    )
    diff = pred - target
    sq = tl.where(mask, diff * diff, 0.0)
    if ELEMENTWISE:
        tl.store(out_ptr + offs, sq, mask=mask)
    else:
        tl.store(out_ptr + plane * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(sq, axis=1), axis=0))


@triton.jit
def _sum_partials_kernel(partials_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    """Stage 2: one program adds the partials in a fixed order (bit-reproducible) and scales."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


@triton.jit(do_not_specialize=["seed"])
def _amplified_noise_loss_bwd_kernel(
    grad_out_ptr, pred_ptr, x0_ptr, noise_ptr, fam_ptr, t_ptr, ac_ptr, grad_pred_ptr,
    seed, lam, coef, C, HW, fam_stride_b, T,
    HAS_NOISE: tl.constexpr, HAS_FAM: tl.constexpr, TARGET_NOISE: tl.constexpr, PREDICTION: tl.constexpr,
    ELEMENTWISE: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_pred = coef·(pred − target)·grad_out, coef = 2/n (mean) or 2 (sum, none)."""
    plane, b, rows, hw, offs, mask = _plane_block(C, HW, BLOCK)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pred = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    target = _regenerate_target(
        x0, noise_ptr, fam_ptr, t_ptr, ac_ptr, seed, lam, fam_stride_b, T, plane, b, rows, hw, offs, HW, mask,
        HAS_NOISE, HAS_FAM, TARGET_NOISE, PREDICTION,
    )
    if ELEMENTWISE:
        g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(grad_out_ptr).to(tl.float32)
    grad = (coef * g) * (pred - target)
    tl.store(grad_pred_ptr + offs, grad.to(grad_pred_ptr.dtype.element_ty), mask=mask)


def _launch_config(x0: torch.Tensor) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK, num_warps) for a (B, C, H, W) tensor: one row of programs per plane."""
    B, C, H, W = x0.shape
    HW = H * W
    BLOCK = min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(HW)))
    grid = (B * C, triton.cdiv(HW, BLOCK))
    if grid[1] > MAX_GRID_DIM1:
        raise ValueError(f"x0 planes of H*W = {HW} elements exceed the kernels' limit of {MAX_GRID_DIM1 * MAX_BLOCK}")
    num_warps = 8 if BLOCK >= 4096 else 4 if BLOCK >= 1024 else 2
    return grid, BLOCK, num_warps


def _operands(x0, timesteps, noise, fam, recipe, prediction_type, *, reads_map: bool):
    """Contiguous kernel operands (x0 stands in for an absent noise or map: a pointer never read),
    the map's batch stride (0: one map for the batch) and the constexpr flags. ``recipe`` is the
    (x_t, target) amplification pair; a map the launch does not read (``reads_map`` False) is dropped."""
    how_x, how_target = recipe
    fam = fam if reads_map else None
    flags = dict(
        HAS_NOISE=noise is not None,
        HAS_FAM=fam is not None,
        X_NOISE=AMPLIFICATIONS.index(how_x),
        TARGET_NOISE=AMPLIFICATIONS.index(how_target),
        PREDICTION=PREDICTION_TYPES.index(prediction_type),
    )
    x0 = x0.contiguous()
    if timesteps.dtype not in (torch.int32, torch.int64):
        timesteps = timesteps.to(torch.int64)
    noise = x0 if noise is None else noise.contiguous()
    fam_stride_b = 0
    if fam is None:
        fam = x0
    else:
        fam = fam.contiguous()
        fam_stride_b = 0 if fam.shape[0] == 1 else fam.shape[1] * fam.shape[2]
    return x0, timesteps.contiguous(), noise, fam, fam_stride_b, flags


@input_guard
def amplified_add_noise_fwd(
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None,
    fam: torch.Tensor | None,
    lam: float,
    seed: int,
    *,
    recipe: tuple[str, str] = ("add", "add"),
    prediction_type: str = "epsilon",
    return_target: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the noising kernel on validated arguments (see :func:`srdiff.amplified_add_noise`).

    x0: (B, C, H, W); timesteps: (B,) integer; alphas_cumprod: (T,) fp32/fp64; noise: None or
    (B, C, H, W); fam: None (no amplification) or (1 | B, H, W); seed: used when noise is None;
    recipe: the (x_t, target) amplification pair, each of :data:`AMPLIFICATIONS`.
    Returns (x_t, target) in x0's dtype, or (x_t, None) without ``return_target``.

    Bytes that must move, N = B*C*H*W, s(·) the element size:
    N·(2·s(x0) [read x0, write x_t] + s(x0) [write target, with return_target] + s(noise) [when
    given]) + numel(fam)·s(fam) + B·(s(timesteps) + s(alphas_cumprod)).
    """
    reads_map = recipe[0] != "plain" or (return_target and recipe[1] != "plain")
    x0, timesteps, noise, fam, fam_stride_b, flags = _operands(
        x0, timesteps, noise, fam, recipe, prediction_type, reads_map=reads_map
    )
    grid, BLOCK, num_warps = _launch_config(x0)
    B, C, H, W = x0.shape
    x_t = new_empty(x0.shape, dtype=x0.dtype, device=x0.device)
    target = new_empty(x0.shape, dtype=x0.dtype, device=x0.device) if return_target else None
    _amplified_add_noise_fwd_kernel[grid](
        x0, noise, fam, timesteps, alphas_cumprod, x_t, x_t if target is None else target,
        seed, float(lam), C, H * W, fam_stride_b, alphas_cumprod.numel(),
        **flags,
        WRITE_TARGET=return_target, BLOCK=BLOCK, num_warps=num_warps,
    )
    return x_t, target


@input_guard
def amplified_noise_loss_fwd(
    pred: torch.Tensor,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None,
    fam: torch.Tensor | None,
    lam: float,
    seed: int,
    *,
    recipe: tuple[str, str] = ("add", "add"),
    prediction_type: str = "epsilon",
    reduction: str = "mean",
) -> torch.Tensor:
    """The MSE of pred against the regenerated target (see :func:`srdiff.amplified_noise_loss`).

    pred, x0: (B, C, H, W) contiguous. Returns a float32 0-d tensor ("mean", "sum") or the
    (B, C, H, W) float32 squared errors ("none").

    Bytes that must move, N = B*C*H*W: N·(s(pred) + s(x0) [+ s(noise) when given] [+ 4, the
    float32 output of "none"]) + numel(fam)·s(fam); the partial sums (one float32 per program,
    written and read once) are ≤ 2·4·N/64.
    """
    x0, timesteps, noise, fam, fam_stride_b, flags = _operands(
        x0, timesteps, noise, fam, recipe, prediction_type, reads_map=recipe[1] != "plain"
    )
    grid, BLOCK, num_warps = _launch_config(x0)
    B, C, H, W = x0.shape
    elementwise = reduction == "none"
    out = new_empty(x0.shape if elementwise else (grid[0] * grid[1],), dtype=torch.float32, device=x0.device)
    _amplified_noise_loss_fwd_kernel[grid](
        pred, x0, noise, fam, timesteps, alphas_cumprod, out,
        seed, float(lam), C, H * W, fam_stride_b, alphas_cumprod.numel(),
        **flags,
        ELEMENTWISE=elementwise, BLOCK=BLOCK, num_warps=num_warps,
    )
    if elementwise:
        return out
    loss = new_empty((), dtype=torch.float32, device=x0.device)
    scale = 1.0 / x0.numel() if reduction == "mean" else 1.0
    _sum_partials_kernel[(1,)](out, loss, out.numel(), scale, BLOCK=PARTIALS_BLOCK, num_warps=4)
    return loss


@input_guard
def amplified_noise_loss_bwd(
    grad_out: torch.Tensor,
    pred: torch.Tensor,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None,
    fam: torch.Tensor | None,
    lam: float,
    seed: int,
    *,
    recipe: tuple[str, str] = ("add", "add"),
    prediction_type: str = "epsilon",
    reduction: str = "mean",
) -> torch.Tensor:
    """grad_pred = 2·(pred − target)·grad_out (÷ N for "mean"), in pred's dtype, in one pass.

    grad_out: 0-d ("mean", "sum") or (B, C, H, W) ("none"), float32.

    Bytes that must move, N = B*C*H*W: N·(2·s(pred) [read pred, write grad_pred] + s(x0)
    [+ s(noise) when given] [+ 4, the grad_out of "none"]) + numel(fam)·s(fam).
    """
    x0, timesteps, noise, fam, fam_stride_b, flags = _operands(
        x0, timesteps, noise, fam, recipe, prediction_type, reads_map=recipe[1] != "plain"
    )
    grid, BLOCK, num_warps = _launch_config(x0)
    B, C, H, W = x0.shape
    elementwise = reduction == "none"
    grad_out = grad_out.contiguous() if elementwise else grad_out.reshape(())
    coef = 2.0 / x0.numel() if reduction == "mean" else 2.0
    grad_pred = new_empty(pred.shape, dtype=pred.dtype, device=pred.device)
    _amplified_noise_loss_bwd_kernel[grid](
        grad_out, pred.contiguous(), x0, noise, fam, timesteps, alphas_cumprod, grad_pred,
        seed, float(lam), coef, C, H * W, fam_stride_b, alphas_cumprod.numel(),
        **flags,
        ELEMENTWISE=elementwise, BLOCK=BLOCK, num_warps=num_warps,
    )
    return grad_pred


class AmplifiedNoiseLossFunction(torch.autograd.Function):
    """The fused loss; differentiable with respect to ``pred`` only (x0, fam and noise are data)."""

    @staticmethod
    def forward(ctx, pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed, options):
        pred, x0 = pred.contiguous(), x0.contiguous()
        loss = amplified_noise_loss_fwd(pred, x0, timesteps, alphas_cumprod, noise, fam, lam, seed, **options)
        ctx.save_for_backward(pred, x0, timesteps, alphas_cumprod, noise, fam)
        ctx.lam, ctx.seed, ctx.options = lam, seed, options
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        pred, x0, timesteps, alphas_cumprod, noise, fam = ctx.saved_tensors
        grad_pred = amplified_noise_loss_bwd(
            grad_out, pred, x0, timesteps, alphas_cumprod, noise, fam, ctx.lam, ctx.seed, **ctx.options
        )
        return grad_pred, None, None, None, None, None, None, None, None
