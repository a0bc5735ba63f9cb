"""K and V scaled by s_j = 1 + lam * fam_j in one pass each way: the first half of the "prescale, then
SDPA" path of srdiff.fam_attention on CUDA.

Forward: ks_j = s_j k_j and vs_j = s_j v_j, s in float32 and each product rounded once to the inputs'
dtype (as :func:`srdiff.reference.fam_attention_sdpa`, which takes two or three PyTorch kernels per
tensor and a float32 temporary). Backward, from dks and dvs (the SDPA backward's gradients):
    dk_j = s_j dks_j        dv_j = s_j dvs_j        ds_j = sum_d (dks_jd k_jd + dvs_jd v_jd)
in float32, dk and dv rounded once; d(fam) = lam * ds summed over the dims fam was broadcast along.

Layout: k, v (B, H, N, D) with any strides but a unit stride along D (diffusers' (B, N, H, D) buffers
seen as (B, H, N, D) included; the outputs keep that layout); fam (B|1, H|1, N). One program scales a
(BLOCK_N, BLOCK_D) tile of k and of v.
"""

import torch
import triton
import triton.language as tl

from srdiff.kernels.fam_attention import _empty_like_layout, _head_dim_mask, _program_tile, fold_grid
from srdiff.kernels.utils import input_guard, new_empty

BLOCK_N = 32  # rows a program scales: 32 x 128 tiles of k and v, 16 KiB of bf16 in and out


@triton.jit
def _tile(base, offs_n, N, offs_d, stride_b, stride_h, stride_n, b, h, HEAD_DIM: tl.constexpr):
    """Pointers and mask of a (rows, BLOCK_D) tile of a (B, H, N, D) tensor."""
    ptrs = base + b * stride_b + h * stride_h + offs_n[:, None] * stride_n + offs_d[None, :]
    return ptrs, (offs_n < N)[:, None] & _head_dim_mask(offs_d, HEAD_DIM)[None, :]


@triton.jit
def _scale_tile(SRC, DST, s, offs_n, N, offs_d, b, h, stride_sb, stride_sh, stride_sn, stride_db, stride_dh,
                stride_dn, HEAD_DIM: tl.constexpr):
    """DST = s * SRC on this program's tile, the product in float32 rounded once to DST's dtype;
    returns SRC's tile in float32."""
    src_ptrs, mask = _tile(SRC, offs_n, N, offs_d, stride_sb, stride_sh, stride_sn, b, h, HEAD_DIM)
    dst_ptrs, _ = _tile(DST, offs_n, N, offs_d, stride_db, stride_dh, stride_dn, b, h, HEAD_DIM)
    x = tl.load(src_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptrs, (x * s[:, None]).to(DST.dtype.element_ty), mask=mask)
    return x


@triton.jit
def _key_scales(FAM, offs_n, N, b, h, stride_fb, stride_fh, lam):
    fam = tl.load(FAM + b * stride_fb + h * stride_fh + offs_n, mask=offs_n < N, other=0.0)
    return 1.0 + lam * fam.to(tl.float32)


@triton.jit
def _fam_prescale_fwd_kernel(
    K, V, FAM, KS, VS,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_fb, stride_fh,
    stride_ksb, stride_ksh, stride_ksn, stride_vsb, stride_vsh, stride_vsn,
    H, N, lam,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n, pid_bh = _program_tile(N, BLOCK_N)
    b, h = pid_bh // H, pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    s = _key_scales(FAM, offs_n, N, b, h, stride_fb, stride_fh, lam)
    _scale_tile(K, KS, s, offs_n, N, offs_d, b, h, stride_kb, stride_kh, stride_kn, stride_ksb, stride_ksh,
                stride_ksn, HEAD_DIM)
    _scale_tile(V, VS, s, offs_n, N, offs_d, b, h, stride_vb, stride_vh, stride_vn, stride_vsb, stride_vsh,
                stride_vsn, HEAD_DIM)


@triton.jit
def _fam_prescale_bwd_kernel(
    K, V, FAM, DKS, DVS, DK, DV, DS,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_fb, stride_fh,
    stride_dksb, stride_dksh, stride_dksn, stride_dvsb, stride_dvsh, stride_dvsn,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    H, N, lam,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, FAM_GRAD: tl.constexpr,
):
    pid_n, pid_bh = _program_tile(N, BLOCK_N)
    b, h = pid_bh // H, pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    s = _key_scales(FAM, offs_n, N, b, h, stride_fb, stride_fh, lam)
    dks = _scale_tile(DKS, DK, s, offs_n, N, offs_d, b, h, stride_dksb, stride_dksh, stride_dksn,
                      stride_dkb, stride_dkh, stride_dkn, HEAD_DIM)
    dvs = _scale_tile(DVS, DV, s, offs_n, N, offs_d, b, h, stride_dvsb, stride_dvsh, stride_dvsn,
                      stride_dvb, stride_dvh, stride_dvn, HEAD_DIM)
    if FAM_GRAD:
        k_ptrs, mask = _tile(K, offs_n, N, offs_d, stride_kb, stride_kh, stride_kn, b, h, HEAD_DIM)
        v_ptrs, _ = _tile(V, offs_n, N, offs_d, stride_vb, stride_vh, stride_vn, b, h, HEAD_DIM)
        k = tl.load(k_ptrs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DS + pid_bh * N + offs_n, tl.sum(dks * k + dvs * v, 1), mask=offs_n < N)


def _grid(N: int, B: int, H: int) -> tuple[int]:
    return fold_grid(N, BLOCK_N, B * H)


def _fam_bhn(fam: torch.Tensor, B: int, H: int, N: int) -> tuple[torch.Tensor, int, int]:
    fam = fam.expand(B, H, N)
    return fam, fam.stride(0), fam.stride(1)


@torch.library.triton_op("srdiff::fam_prescale_fwd", mutates_args=())
@input_guard
def fam_prescale_fwd(k: torch.Tensor, v: torch.Tensor, fam: torch.Tensor,
                     lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s * k, s * v) in k's dtype and layout; fam (B|1, H|1, N)."""
    B, H, N, D = k.shape
    fam, stride_fb, stride_fh = _fam_bhn(fam, B, H, N)
    ks, vs = _empty_like_layout(k), _empty_like_layout(v)
    torch.library.wrap_triton(_fam_prescale_fwd_kernel)[_grid(N, B, H)](
        k, v, fam, ks, vs, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        stride_fb, stride_fh, ks.stride(0), ks.stride(1), ks.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2),
        H, N, float(lam), HEAD_DIM=D, BLOCK_D=max(triton.next_power_of_2(D), 16), BLOCK_N=BLOCK_N,
    )
    return ks, vs


@torch.library.triton_op("srdiff::fam_prescale_bwd", mutates_args=())
@input_guard
def fam_prescale_bwd(
    dks: torch.Tensor, dvs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fam: torch.Tensor, lam: float,
    fam_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dk, dv (k's dtype and layout) and ds = dL/ds (B, H, N) float32 per (batch, head), or an empty
    tensor unless ``fam_grad``."""
    B, H, N, D = k.shape
    fam, stride_fb, stride_fh = _fam_bhn(fam, B, H, N)
    dk, dv = _empty_like_layout(k), _empty_like_layout(v)
    ds = new_empty((B, H, N) if fam_grad else (0,), dtype=torch.float32, device=k.device)
    torch.library.wrap_triton(_fam_prescale_bwd_kernel)[_grid(N, B, H)](
        k, v, fam, dks, dvs, dk, dv, ds if fam_grad else dk,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), stride_fb, stride_fh,
        dks.stride(0), dks.stride(1), dks.stride(2), dvs.stride(0), dvs.stride(1), dvs.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, N, float(lam), HEAD_DIM=D, BLOCK_D=max(triton.next_power_of_2(D), 16), BLOCK_N=BLOCK_N,
        FAM_GRAD=fam_grad,
    )
    return dk, dv, ds


class FAMPrescaleFunction(torch.autograd.Function):
    """(s * k, s * v) with autograd; fam (B|1, H|1, N), its gradient lam * ds summed down to its shape.
    Saves k, v and fam (the caller's tensors), never the scaled copies."""

    @staticmethod
    def forward(ctx, k, v, fam, lam: float):
        ks, vs = fam_prescale_fwd(k, v, fam, lam)
        ctx.save_for_backward(k, v, fam)
        ctx.lam = lam
        return ks, vs

    @staticmethod
    def backward(ctx, dks, dvs):
        k, v, fam = ctx.saved_tensors
        fam_grad = ctx.needs_input_grad[2]
        dk, dv, ds = fam_prescale_bwd(dks, dvs, k, v, fam, ctx.lam, fam_grad)
        dfam = (ctx.lam * ds).sum_to_size(fam.shape).to(fam.dtype) if fam_grad else None
        return dk, dv, dfam, None
