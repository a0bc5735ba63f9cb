"""FAM-modulated flash attention: softmax(scale * q (s*k)^T) (s*v) with s_j = 1 + lam * fam_j per key.

Kernels (forward; backward preprocess, dK/dV/d(s) pass, dQ pass), then the launchers registered as
``torch.library.triton_op`` (``srdiff::fam_attention_fwd`` / ``srdiff::fam_attention_bwd``, so that
``torch.compile(fullgraph=True)`` sees the kernels), then :class:`FAMAttentionFunction`.

The modulation never materialises s*K or s*V. Since q.(s_j k_j) = s_j (q.k_j) and
sum_j P_ij (s_j v_j) = sum_j (P_ij s_j) v_j, s is applied to the columns of the logit tile (folded
into the softmax scale) and of the probability tile before P.V: K and V tiles go from memory to the
tensor cores untouched, and s costs one multiply per score element.

Layout: q (B, H, Nq, D), k/v (B, H, Nk, D) with any strides but a unit stride along D; fam a
(B|1, H|1, Nk) tensor expanded with zero strides. The head dim is padded to BLOCK_D, a power of two,
with masks. Logits live in the log2 domain (log2(e) folded into the scale, exp2 throughout); the
forward saves lse2 = log2(sum_j exp2(z_ij)), the row's logsumexp in base 2, float32 (B, H, Nq).

Backward, with x_ij = scale * s_j * (q_i.k_j), P = softmax_j(x), O_i = sum_j P_ij s_j v_j:
    dP_ij = s_j (dO_i.v_j)                    delta_i = sum_j P_ij dP_ij = dO_i.O_i
    dx_ij = P_ij (dP_ij - delta_i)
    dv_j  = s_j sum_i P_ij dO_i               dk_j = scale s_j sum_i dx_ij q_i
    dq_i  = scale sum_j (dx_ij s_j) k_j
    ds_j  = sum_i [dx_ij scale (q_i.k_j) + P_ij (dO_i.v_j)]
          = k_j . (scale sum_i dx_ij q_i) + v_j . (sum_i P_ij dO_i)
    d(fam_j) = lam * ds_j, summed over the dims fam was broadcast along (B and/or H).
The dK/dV pass already holds both sums of ds_j in its accumulators, so d(s) costs two length-D dot
products per key in its epilogue.
"""

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from srdiff.kernels.utils import input_guard, new_empty, triton_interpreting

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
LOG2E = 1.4426950408889634  # 1 / ln(2)

# Shared memory a config may use: Hopper's 227 KiB per block (the estimate below matches Triton's
# allocation to within its 1 KiB of barriers and scratch).
_SMEM_BUDGET = 227 * 1024
_SMEM_SCRATCH = 1024


def _configs(gpu: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> Configs, then the fallback (32 x 32 tiles, four
    warps, one stage), which fits every head dim and dtype (float32 at D = 256 included)."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in [*gpu, (32, 32, 4, 1)]]


# What the interpreter runs unless a test pins another config: 16 x 16 blocks make the test shapes
# (N = 17, 20, 33) span several blocks with ragged tails.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def _prune(resident: str, tiles_in: int, tiles_acc: int):
    """An ``early_config_prune`` keeping the configs whose register-resident tiles fit and whose
    pipelined tiles fit in shared memory, else the fallback. Each program keeps ``tiles_in`` input
    tiles and ``tiles_acc`` float32 accumulators of (``resident`` rows, BLOCK_D) in registers (q and
    acc in the forward; k, v, dk, dv in dK/dV; q, dO, dq in dQ) and streams two tiles of the other
    block size per pipeline stage. Shared memory holds the input tiles once and num_stages buffers
    of each streamed tile, plus 1 KiB: Triton 3.8's allocation at sm_90 for the largest kept tiles
    (where the budget binds), an upper bound for small ones, whose buffers it shares
    (benchmarks/compile_sm90.py, with the JIT's specialisation). Budgets: 128 registers a
    thread for the resident tiles and Hopper's 227 KiB of shared memory. float32 inputs multiply exactly with FMAs, not tensor
    cores; beyond 32 x 32 tiles those dots spill heavily, so float32 always takes the fallback."""
    streamed = "BLOCK_N" if resident == "BLOCK_M" else "BLOCK_M"

    def smem(c: triton.Config, elsize: int, block_d: int) -> int:
        rows, rows_streamed = c.kwargs[resident], c.kwargs[streamed]
        return elsize * block_d * (tiles_in * rows + 2 * c.num_stages * rows_streamed) + _SMEM_SCRATCH

    def prune(configs, named_args, **kwargs):
        *candidates, fallback = configs
        args = {**named_args, **kwargs}
        block_d, elsize = args["BLOCK_D"], args["Q"].element_size()
        if elsize == 4:
            return [fallback]
        kept = []
        for c in candidates:
            registers = c.kwargs[resident] * block_d * (tiles_in * elsize + tiles_acc * 4) / 4 / (32 * c.num_warps)
            if registers <= 128 and smem(c, elsize, block_d) <= _SMEM_BUDGET:
                kept.append(c)
        return kept or [fallback]

    prune.shared_memory = smem
    return prune


# Hopper first, largest tiles first; the 8-warp 32/64-row configs serve head dims 160-256. Each
# kept candidate is a compile on first use.
_FWD_CONFIGS = _configs([(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                         (64, 32, 8, 2)])
_BWD_DKDV_CONFIGS = _configs([(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (32, 64, 4, 3),
                              (32, 32, 8, 2)])
_BWD_DQ_CONFIGS = _configs([(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                            (32, 32, 8, 2)])


@triton.jit
def _program_tile(n, BLOCK: tl.constexpr):
    """This program's (tile along the sequence, batch * head) on the folded 1-D grid (see
    :func:`fold_grid`): consecutive programs take consecutive tiles of one head."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(n, BLOCK)
    return pid % tiles, (pid // tiles).to(tl.int64)


@triton.jit
def _aligned_strides(stride_b, stride_h, stride_n, ROW_ALIGN: tl.constexpr):
    """The launcher guarantees that these strides are multiples of ROW_ALIGN elements (see
    :func:`_row_alignment`); written as (s // ROW_ALIGN) * ROW_ALIGN (the same value) Triton can prove
    each row 16-byte aligned and copy it 16 bytes at a time at head dims like 40 and 72, whose
    strides the JIT cannot specialise on (it only marks multiples of 16)."""
    return ((stride_b // ROW_ALIGN) * ROW_ALIGN, (stride_h // ROW_ALIGN) * ROW_ALIGN,
            (stride_n // ROW_ALIGN) * ROW_ALIGN)


@triton.jit
def _mma(a, b, acc, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """tl.dot with float32 accumulation. DOT_UPCAST is set by the launcher only under the Triton
    interpreter, whose bf16 tl.dot is wrong: the bf16 tiles (already rounded exactly as on the GPU)
    are widened to float32, which multiplies them exactly, so the same kernel source is tested."""
    if DOT_UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _head_dim_mask(offs_d, HEAD_DIM: tl.constexpr):
    """(BLOCK_D,) padded head-dim columns masked off, in 1-d (broadcast by the caller)."""
    return offs_d < HEAD_DIM


@triton.jit
def _load_rows(ptrs, offs_row, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile; masked rows and padded head-dim columns read as 0."""
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=offs_row[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs_row[:, None] < n_rows) & _head_dim_mask(offs_d, HEAD_DIM)[None, :], other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=_head_dim_mask(offs_d, HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _load_vec(ptrs, offs, n, MASK: tl.constexpr, other: tl.constexpr):
    if MASK:
        vec = tl.load(ptrs, mask=offs < n, other=other)
    else:
        vec = tl.load(ptrs)
    return vec


@triton.jit
def _key_scale(fam_ptrs, offs_n, Nk, lam, HAS_FAM: tl.constexpr, MASK: tl.constexpr):
    """s_j = 1 + lam * fam_j in float32 (1 for padded keys)."""
    if HAS_FAM:
        s = 1.0 + lam * _load_vec(fam_ptrs, offs_n, Nk, MASK, 0.0).to(tl.float32)
    else:
        s = tl.full(offs_n.shape, 1.0, tl.float32)
    return s


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, fam_base, start_n, end_n, Nk, lam, qk_scale,
               stride_kn, stride_vn, offs_n0, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_FAM: tl.constexpr,
               MASK_N: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks in [start_n, end_n); MASK_N for the ragged last block."""
    for n in range(start_n, end_n, BLOCK_N):
        offs_n = n + offs_n0
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, Nk, offs_d,
                       HEAD_DIM, BLOCK_D, MASK_N)
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, Nk, offs_d,
                       HEAD_DIM, BLOCK_D, MASK_N)
        s = _key_scale(fam_base + offs_n, offs_n, Nk, lam, HAS_FAM, MASK_N)
        z = _mma(q, tl.trans(k), None, DOT_UPCAST, DOT_PRECISION) * (qk_scale * s)[None, :]
        if MASK_N:
            z = tl.where((offs_n < Nk)[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_FAM:
            p = p * s[None, :]
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_UPCAST, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["Nq_bucket", "Nk_bucket", "HEAD_DIM", "HAS_FAM", "DOT_UPCAST"],
                 prune_configs_by={"early_config_prune": _prune("BLOCK_M", tiles_in=1, tiles_acc=1)})
@triton.jit(do_not_specialize=["Nq", "Nk", "Nq_bucket", "Nk_bucket"])
def _fam_attention_fwd_kernel(
    Q, K, V, FAM, O, LSE2,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_fb, stride_fh, stride_ob, stride_oh, stride_on,
    H, Nq, Nk, Nq_bucket, Nk_bucket, lam, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, HAS_FAM: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_bh = _program_tile(Nq, BLOCK_M)
    stride_qb, stride_qh, stride_qn = _aligned_strides(stride_qb, stride_qh, stride_qn, ROW_ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned_strides(stride_kb, stride_kh, stride_kn, ROW_ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned_strides(stride_vb, stride_vh, stride_vn, ROW_ALIGN)
    stride_ob, stride_oh, stride_on = _aligned_strides(stride_ob, stride_oh, stride_on, ROW_ALIGN)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    fam_base = FAM + b * stride_fb + h * stride_fh

    q = _load_rows(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                   offs_m, Nq, offs_d, HEAD_DIM, BLOCK_D, True)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, fam_base, 0, n_full, Nk, lam, qk_scale,
                               stride_kn, stride_vn, offs_n0, offs_d,
                               HEAD_DIM, BLOCK_D, BLOCK_N, HAS_FAM, False, DOT_UPCAST, DOT_PRECISION)
    if n_full < Nk:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, fam_base, n_full, Nk, Nk, lam,
                                   qk_scale, stride_kn, stride_vn, offs_n0, offs_d,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, HAS_FAM, True, DOT_UPCAST, DOT_PRECISION)

    o = acc / l_i[:, None]
    row_ok = offs_m < Nq
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & _head_dim_mask(offs_d, HEAD_DIM)[None, :])
    tl.store(LSE2 + pid_bh * Nq + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["Nq"])
def _fam_attention_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    H, Nq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = rowsum(dO_i * O_i) in float32."""
    pid_m, pid_bh = _program_tile(Nq, BLOCK_M)
    stride_ob, stride_oh, stride_on = _aligned_strides(stride_ob, stride_oh, stride_on, ROW_ALIGN)
    stride_dob, stride_doh, stride_don = _aligned_strides(stride_dob, stride_doh, stride_don, ROW_ALIGN)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                   offs_m, Nq, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                    offs_m, Nq, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * Nq + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def _bwd_dkdv_inner(dk_acc, dv_acc, k, v, s, q_base, do_base, lse2_base, delta_base, dq_base, start_m, end_m, Nq,
                    scale, qk_scale, stride_qn, stride_don, stride_dqn, offs_m0, offs_d,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK_M: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate sum_i dx_ij q_i and sum_i P_ij dO_i over query blocks, in transposed (key-major)
    tiles. Padded query rows load q = dO = 0 and lse2 = delta = 0, so they contribute exactly 0.
    DQ_ATOMIC: also add this key block's share of dq_i = scale sum_j (dx_ij s_j) k_j to the float32
    dq accumulator (a fifth GEMM and an atomic add instead of the dQ pass's three GEMMs)."""
    for m in range(start_m, end_m, BLOCK_M):
        offs_m = m + offs_m0
        q = _load_rows(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, Nq, offs_d,
                       HEAD_DIM, BLOCK_D, MASK_M)
        do = _load_rows(do_base + offs_m[:, None] * stride_don + offs_d[None, :], offs_m, Nq, offs_d,
                        HEAD_DIM, BLOCK_D, MASK_M)
        lse2 = _load_vec(lse2_base + offs_m, offs_m, Nq, MASK_M, 0.0)
        delta = _load_vec(delta_base + offs_m, offs_m, Nq, MASK_M, 0.0)
        zT = _mma(k, tl.trans(q), None, DOT_UPCAST, DOT_PRECISION) * (qk_scale * s)[:, None]
        pT = tl.math.exp2(zT - lse2[None, :])
        dv_acc = _mma(pT.to(do.dtype), do, dv_acc, DOT_UPCAST, DOT_PRECISION)
        dpT = _mma(v, tl.trans(do), None, DOT_UPCAST, DOT_PRECISION) * s[:, None]
        dxT = pT * (dpT - delta[None, :])
        dk_acc = _mma(dxT.to(q.dtype), q, dk_acc, DOT_UPCAST, DOT_PRECISION)
        if DQ_ATOMIC:
            dq = _mma(tl.trans((dxT * s[:, None]).to(k.dtype)), k, None, DOT_UPCAST, DOT_PRECISION)
            tl.atomic_add(dq_base + offs_m[:, None] * stride_dqn + offs_d[None, :], dq * scale,
                          mask=(offs_m[:, None] < Nq) & _head_dim_mask(offs_d, HEAD_DIM)[None, :], sem="relaxed")
    return dk_acc, dv_acc


@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=["Nq_bucket", "Nk_bucket", "HEAD_DIM", "HAS_FAM", "FAM_GRAD", "DQ_ATOMIC", "DOT_UPCAST"],
                 prune_configs_by={"early_config_prune": _prune("BLOCK_N", tiles_in=2, tiles_acc=2)})
@triton.jit(do_not_specialize=["Nq", "Nk", "Nq_bucket", "Nk_bucket"])
def _fam_attention_bwd_dkdv_kernel(
    Q, K, V, FAM, DO, LSE2, DELTA, DK, DV, DS, DQ_ACC,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_fb, stride_fh, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_dqb, stride_dqh, stride_dqn,
    H, Nq, Nk, Nq_bucket, Nk_bucket, lam, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, HAS_FAM: tl.constexpr, FAM_GRAD: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n, pid_bh = _program_tile(Nk, BLOCK_N)
    stride_qb, stride_qh, stride_qn = _aligned_strides(stride_qb, stride_qh, stride_qn, ROW_ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned_strides(stride_kb, stride_kh, stride_kn, ROW_ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned_strides(stride_vb, stride_vh, stride_vn, ROW_ALIGN)
    stride_dob, stride_doh, stride_don = _aligned_strides(stride_dob, stride_doh, stride_don, ROW_ALIGN)
    stride_dkb, stride_dkh, stride_dkn = _aligned_strides(stride_dkb, stride_dkh, stride_dkn, ROW_ALIGN)
    stride_dvb, stride_dvh, stride_dvn = _aligned_strides(stride_dvb, stride_dvh, stride_dvn, ROW_ALIGN)
    b, h = pid_bh // H, pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_rows(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                   offs_n, Nk, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                   offs_n, Nk, offs_d, HEAD_DIM, BLOCK_D, True)
    s = _key_scale(FAM + b * stride_fb + h * stride_fh + offs_n, offs_n, Nk, lam, HAS_FAM, True)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse2_base = LSE2 + pid_bh * Nq
    delta_base = DELTA + pid_bh * Nq
    dq_base = DQ_ACC + b * stride_dqb + h * stride_dqh
    dk_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    m_full = (Nq // BLOCK_M) * BLOCK_M
    dk_acc, dv_acc = _bwd_dkdv_inner(dk_acc, dv_acc, k, v, s, q_base, do_base, lse2_base, delta_base, dq_base,
                                     0, m_full, Nq, scale, qk_scale, stride_qn, stride_don, stride_dqn, offs_m0,
                                     offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, False, DQ_ATOMIC, DOT_UPCAST, DOT_PRECISION)
    if m_full < Nq:
        dk_acc, dv_acc = _bwd_dkdv_inner(dk_acc, dv_acc, k, v, s, q_base, do_base, lse2_base, delta_base, dq_base,
                                         m_full, Nq, Nq, scale, qk_scale, stride_qn, stride_don, stride_dqn, offs_m0,
                                         offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, True, DQ_ATOMIC, DOT_UPCAST,
                                         DOT_PRECISION)

    # One accumulator at a time: its d(s) term, then its store, so that it dies before the next.
    key_ok = offs_n < Nk
    tile_ok = key_ok[:, None] & _head_dim_mask(offs_d, HEAD_DIM)[None, :]
    if FAM_GRAD:
        ds = scale * tl.sum(k.to(tl.float32) * dk_acc, 1)
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             (dk_acc * (scale * s)[:, None]).to(DK.dtype.element_ty), mask=tile_ok)
    if FAM_GRAD:
        ds += tl.sum(v.to(tl.float32) * dv_acc, 1)
        tl.store(DS + pid_bh * Nk + offs_n, ds, mask=key_ok)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             (dv_acc * s[:, None]).to(DV.dtype.element_ty), mask=tile_ok)


@triton.jit
def _bwd_dq_inner(dq_acc, q, do, lse2, delta, k_base, v_base, fam_base, start_n, end_n, Nk, lam, qk_scale,
                  stride_kn, stride_vn, offs_n0, offs_d,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_FAM: tl.constexpr,
                  MASK_N: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate sum_j (dx_ij s_j) k_j over key blocks. Padded keys load k = v = 0: their dx may be
    nonzero but multiplies k = 0."""
    for n in range(start_n, end_n, BLOCK_N):
        offs_n = n + offs_n0
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, Nk, offs_d,
                       HEAD_DIM, BLOCK_D, MASK_N)
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, Nk, offs_d,
                       HEAD_DIM, BLOCK_D, MASK_N)
        s = _key_scale(fam_base + offs_n, offs_n, Nk, lam, HAS_FAM, MASK_N)
        z = _mma(q, tl.trans(k), None, DOT_UPCAST, DOT_PRECISION) * (qk_scale * s)[None, :]
        p = tl.math.exp2(z - lse2[:, None])
        dp = _mma(do, tl.trans(v), None, DOT_UPCAST, DOT_PRECISION)
        if HAS_FAM:
            dx_s = p * (dp * s[None, :] - delta[:, None]) * s[None, :]
        else:
            dx_s = p * (dp - delta[:, None])
        dq_acc = _mma(dx_s.to(k.dtype), k, dq_acc, DOT_UPCAST, DOT_PRECISION)
    return dq_acc


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=["Nq_bucket", "Nk_bucket", "HEAD_DIM", "HAS_FAM", "DOT_UPCAST"],
                 prune_configs_by={"early_config_prune": _prune("BLOCK_M", tiles_in=2, tiles_acc=1)})
@triton.jit(do_not_specialize=["Nq", "Nk", "Nq_bucket", "Nk_bucket"])
def _fam_attention_bwd_dq_kernel(
    Q, K, V, FAM, DO, LSE2, DELTA, DQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_fb, stride_fh, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
    H, Nq, Nk, Nq_bucket, Nk_bucket, lam, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, HAS_FAM: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_bh = _program_tile(Nq, BLOCK_M)
    stride_qb, stride_qh, stride_qn = _aligned_strides(stride_qb, stride_qh, stride_qn, ROW_ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned_strides(stride_kb, stride_kh, stride_kn, ROW_ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned_strides(stride_vb, stride_vh, stride_vn, ROW_ALIGN)
    stride_dob, stride_doh, stride_don = _aligned_strides(stride_dob, stride_doh, stride_don, ROW_ALIGN)
    stride_dqb, stride_dqh, stride_dqn = _aligned_strides(stride_dqb, stride_dqh, stride_dqn, ROW_ALIGN)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_rows(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                   offs_m, Nq, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                    offs_m, Nq, offs_d, HEAD_DIM, BLOCK_D, True)
    lse2 = _load_vec(LSE2 + pid_bh * Nq + offs_m, offs_m, Nq, True, 0.0)
    delta = _load_vec(DELTA + pid_bh * Nq + offs_m, offs_m, Nq, True, 0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    fam_base = FAM + b * stride_fb + h * stride_fh
    dq_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    dq_acc = _bwd_dq_inner(dq_acc, q, do, lse2, delta, k_base, v_base, fam_base, 0, n_full, Nk, lam, qk_scale,
                           stride_kn, stride_vn, offs_n0, offs_d,
                           HEAD_DIM, BLOCK_D, BLOCK_N, HAS_FAM, False, DOT_UPCAST, DOT_PRECISION)
    if n_full < Nk:
        dq_acc = _bwd_dq_inner(dq_acc, q, do, lse2, delta, k_base, v_base, fam_base, n_full, Nk, Nk, lam,
                               qk_scale, stride_kn, stride_vn, offs_n0, offs_d,
                               HEAD_DIM, BLOCK_D, BLOCK_N, HAS_FAM, True, DOT_UPCAST, DOT_PRECISION)
    dq = dq_acc * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Nq) & _head_dim_mask(offs_d, HEAD_DIM)[None, :])


def _empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """A (B, H, N, D) output in x's memory layout when x is a (B, N, H, D) buffer seen as (B, H, N, D)
    (the view diffusers hands over), so that the caller's transpose back is free; else contiguous."""
    B, H, N, D = x.shape
    if x.transpose(1, 2).is_contiguous() and not x.is_contiguous():
        return new_empty((B, N, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)
    return new_empty((B, H, N, D), dtype=x.dtype, device=x.device)


# CUDA's limit on grid axis 0 (axes 1 and 2 stop at 65,535, which B * H alone can pass).
MAX_GRID_X = 2**31 - 1


def fold_grid(n: int, block: int, bh: int) -> tuple[int]:
    """The 1-D launch grid of ``cdiv(n, block)`` tiles for each of ``bh`` (batch, head) pairs, folded
    into axis 0 (:func:`_program_tile` unfolds it), so B * H is not bound by axis 1's 65,535."""
    programs = triton.cdiv(n, block) * bh
    if programs > MAX_GRID_X:
        raise ValueError(
            f"B * H * cdiv(N, {block}) must be <= {MAX_GRID_X} programs, got {bh} * cdiv({n}, {block}) = {programs}"
        )
    return (programs,)


def _block_d(head_dim: int) -> int:
    return max(triton.next_power_of_2(head_dim), 16)


def kept_configs(kernel, dtype: torch.dtype, head_dim: int) -> list[triton.Config]:
    """The configs of an autotuned kernel that its prune keeps for ``dtype`` at ``head_dim``, largest
    first: what the autotuner times on a GPU (the last is what ``SRDIFF_AUTOTUNE=0`` runs)."""
    return kernel.early_config_prune(kernel.configs, {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=_block_d(head_dim))


def shared_memory_estimate(kernel, config: triton.Config, dtype: torch.dtype, head_dim: int) -> int:
    """The bytes of shared memory the prune budgets for ``config`` of an autotuned ``kernel``."""
    return kernel.early_config_prune.shared_memory(config, dtype.itemsize, _block_d(head_dim))


_PINNED: dict = {}


@contextlib.contextmanager
def pinned_config(kernel, config: triton.Config):
    """Inside the block, launches of the autotuned ``kernel`` run ``config`` (no tuning): how the
    tests compare every kept config with the reference."""
    previous = _PINNED.get(kernel)
    _PINNED[kernel] = config
    try:
        yield
    finally:
        if previous is None:
            del _PINNED[kernel]
        else:
            _PINNED[kernel] = previous


def _launch(kernel, grid, args: tuple, meta: dict, dtype: torch.dtype) -> None:
    """Launch an autotuned kernel. The autotuner picks among the kept configs (keyed on the next
    powers of two of Nq and Nk, so a new sequence length in the same bucket does not re-tune),
    unless one config is fixed: a pinned one, the interpreter's, or with ``SRDIFF_AUTOTUNE=0`` the
    smallest kept one. A fixed config launches the JIT function itself: nothing is benchmarked."""
    config = _PINNED.get(kernel)
    if config is None and triton_interpreting():
        config = INTERPRETER_CONFIG
    if config is None and os.environ.get("SRDIFF_AUTOTUNE") == "0":
        config = kept_configs(kernel, dtype, meta["HEAD_DIM"])[-1]
    if config is None:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    else:
        torch.library.wrap_triton(kernel.fn)[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                                   num_stages=config.num_stages)


def _row_alignment(*tensors: torch.Tensor) -> int:
    """The largest power of two, up to 16 bytes' worth of elements, dividing every batch, head and
    row stride of ``tensors`` (dims of size 1 aside: their index is always 0)."""
    align = 16 // tensors[0].element_size()
    for t in tensors:
        for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
            while size > 1 and stride % align:
                align //= 2
    return align


def _sequence_buckets(Nq: int, Nk: int) -> tuple[int, int]:
    return triton.next_power_of_2(Nq), triton.next_power_of_2(Nk)


def _kernel_flags(q: torch.Tensor) -> dict:
    head_dim = q.shape[-1]
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": _block_d(head_dim),
        # Only the interpreter needs the upcast (its bf16 tl.dot is broken); GPUs run bf16 MMAs.
        "DOT_UPCAST": triton_interpreting() and q.dtype == torch.bfloat16,
        # float32 inputs get exact float32 products, never TF32.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _fam_strides(fam: torch.Tensor | None, B: int, H: int, Nk: int, like: torch.Tensor):
    """fam (B|1, H|1, Nk) seen as (B, H, Nk) with zero strides on broadcast dims; a dummy when absent."""
    if fam is None:
        return like, 0, 0
    fam = fam.expand(B, H, Nk)
    return fam, fam.stride(0), fam.stride(1)


@torch.library.triton_op("srdiff::fam_attention_fwd", mutates_args=())
@input_guard
def fam_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fam: torch.Tensor | None, lam: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: returns o (B, H, Nq, D) in q's dtype and lse2 (B, H, Nq) float32.

    fam is None or (B|1, H|1, Nk); with lam == 0 the modulation is skipped entirely."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    has_fam = fam is not None and lam != 0.0
    fam_t, stride_fb, stride_fh = _fam_strides(fam if has_fam else None, B, H, Nk, q)
    o = _empty_like_layout(q)
    lse2 = new_empty((B, H, Nq), dtype=torch.float32, device=q.device)

    def grid(meta):
        return fold_grid(Nq, meta["BLOCK_M"], B * H)

    _launch(_fam_attention_fwd_kernel, grid, (
        q, k, v, fam_t, o, lse2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), stride_fb, stride_fh, o.stride(0), o.stride(1), o.stride(2),
        H, Nq, Nk, *_sequence_buckets(Nq, Nk), float(lam), scale * LOG2E,
    ), dict(HAS_FAM=has_fam, ROW_ALIGN=_row_alignment(q, k, v, o), **_kernel_flags(q)), q.dtype)
    return o, lse2


@torch.library.triton_op("srdiff::fam_attention_bwd", mutates_args=())
@input_guard
def fam_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fam: torch.Tensor | None,
    o: torch.Tensor, lse2: torch.Tensor, lam: float, scale: float, fam_grad: bool, dq_atomic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: returns dq, dk, dv (the inputs' shapes and dtypes) and ds = dL/ds
    (B, H, Nk) float32 per (batch, head), or an empty tensor unless ``fam_grad``.

    ``dq_atomic=False``: the deterministic backward, a dK/dV pass and a dQ pass (7 GEMMs per tile
    pair). ``True``: one pass, the dK/dV kernel also adding dq into a float32 accumulator with
    atomics (5 GEMMs; the order of the float32 additions, hence dq's last bits, varies run to run)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    has_fam = fam is not None and lam != 0.0
    fam_grad = fam_grad and has_fam
    fam_t, stride_fb, stride_fh = _fam_strides(fam if has_fam else None, B, H, Nk, q)
    flags = _kernel_flags(q)
    dq, dk, dv = _empty_like_layout(q), _empty_like_layout(k), _empty_like_layout(v)
    delta = new_empty((B, H, Nq), dtype=torch.float32, device=q.device)
    ds = new_empty((B, H, Nk) if fam_grad else (0,), dtype=torch.float32, device=q.device)

    block_m = min(128, 8192 // flags["BLOCK_D"])  # two (BLOCK_M, BLOCK_D) tiles, ~64 registers a thread
    torch.library.wrap_triton(_fam_attention_bwd_preprocess_kernel)[fold_grid(Nq, block_m, B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, Nq, HEAD_DIM=flags["HEAD_DIM"], BLOCK_D=flags["BLOCK_D"], ROW_ALIGN=_row_alignment(o, do), BLOCK_M=block_m,
    )
    buckets = _sequence_buckets(Nq, Nk)
    # dq_atomic: the dK/dV pass adds dq in float32 (zeroed: atomics accumulate into it); else a dummy.
    dq_acc = torch.zeros((B, H, Nq, D), dtype=torch.float32, device=q.device) if dq_atomic else delta[..., None]

    def grid_dkdv(meta):
        return fold_grid(Nk, meta["BLOCK_N"], B * H)

    _launch(_fam_attention_bwd_dkdv_kernel, grid_dkdv, (
        q, k, v, fam_t, do, lse2, delta, dk, dv, ds if fam_grad else lse2, dq_acc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), stride_fb, stride_fh, do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2),
        H, Nq, Nk, *buckets, float(lam), scale, scale * LOG2E,
    ), dict(HAS_FAM=has_fam, FAM_GRAD=fam_grad, DQ_ATOMIC=dq_atomic, ROW_ALIGN=_row_alignment(q, k, v, do, dk, dv),
            **flags), q.dtype)
    if dq_atomic:
        dq.copy_(dq_acc)
        return dq, dk, dv, ds

    def grid_dq(meta):
        return fold_grid(Nq, meta["BLOCK_M"], B * H)

    _launch(_fam_attention_bwd_dq_kernel, grid_dq, (
        q, k, v, fam_t, do, lse2, delta, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), stride_fb, stride_fh, do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, Nq, Nk, *buckets, float(lam), scale, scale * LOG2E,
    ), dict(HAS_FAM=has_fam, ROW_ALIGN=_row_alignment(q, k, v, do, dq), **flags), q.dtype)
    return dq, dk, dv, ds


class FAMAttentionFunction(torch.autograd.Function):
    """Autograd for the fused kernels. Inputs as :func:`fam_attention_fwd`; q, k, v checked by the
    caller (:func:`srdiff.fam_attention`). d(fam) is lam * ds summed down to fam's (B|1, H|1, Nk).
    ``deterministic=False`` takes the dq-by-atomics backward (see :func:`fam_attention_bwd`)."""

    @staticmethod
    def forward(ctx, q, k, v, fam, lam: float, scale: float | None, deterministic: bool = True):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        o, lse2 = fam_attention_fwd(q, k, v, fam, lam, scale)
        ctx.save_for_backward(q, k, v, fam, o, lse2)
        ctx.lam, ctx.scale, ctx.deterministic = lam, scale, deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, fam, o, lse2 = ctx.saved_tensors
        fam_grad = ctx.needs_input_grad[3]
        dq, dk, dv, ds = fam_attention_bwd(do, q, k, v, fam, o, lse2, ctx.lam, ctx.scale, fam_grad,
                                           not ctx.deterministic)
        dfam = None
        if fam_grad:
            if ctx.lam == 0.0:
                dfam = torch.zeros_like(fam)
            else:
                dfam = (ctx.lam * ds).sum_to_size(fam.shape).to(fam.dtype)
        return dq, dk, dv, dfam, None, None, None
