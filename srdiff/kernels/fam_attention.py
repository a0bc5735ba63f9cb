"""FAM-modulated flash attention: softmax(scale * q (s*k)^T) (s*v) with s_j = 1 + lam * fam_j per key.

Kernels (forward with its per-key records; backward preprocess, dK/dV/d(s) pass, dQ pass), then the
launchers registered as ``torch.library.triton_op`` (``srdiff::fam_attention_fwd`` /
``srdiff::fam_attention_bwd``, so that ``torch.compile(fullgraph=True)`` sees the kernels), then
:class:`FAMAttentionFunction`.

The modulation never materialises s*K or s*V. Since q.(s_j k_j) = s_j (q.k_j) and
sum_j P_ij (s_j v_j) = sum_j (P_ij s_j) v_j, s is applied to the columns of the logit tile and of the
probability tile before P.V: K and V tiles go from memory to the tensor cores untouched.

Layout: q (B, H, Nq, D), k/v (B, H, Nk, D) with any strides but a unit stride along D; fam a
(B|1, H|1, Nk) tensor expanded with zero strides. The head dim is padded to BLOCK_D, a power of two,
with masks. Logits live in the log2 domain (log2(e) folded into the scale, exp2 throughout); the
forward saves lse2 = log2(sum_j exp2(x_ij)), the row's logsumexp in base 2, float32 (B, H, Nq).

Forward, with c_j = log2(e) scale s_j and x_ij = c_j (q_i.k_j). A small kernel first writes, per key,
the record (c_j in float32, s_j - 1 in the dtype of the P.V operands) and, per (batch, head), the
range [c_lo, c_hi] of the c_j; every s_j > 0, so every c_j > 0. In the loop the row max is taken on
the raw q.k, without the scale: with m~ = max_j q_i.k_j over a key tile, every logit of the tile obeys

    c_j (q_i.k_j) <= U = max(c_lo m~, c_hi m~)    (c_j <= c_hi where q.k >= 0, c_j >= c_lo where < 0)
    max_j x_ij    >= L = min(c_lo m~, c_hi m~)    (at the key of m~),    so U - L = |m~| (c_hi - c_lo) = g.

The running reference is m_i = max over tiles of (U - E), E = MAX_EXP[dtype], and each exponent is one
FMA, exp2(c_j (q_i.k_j) - m_i), as without a map. Online softmax is exact for any reference (acc and
l_i are rescaled by exp2(m_old - m_new) <= 1, lse2 = m_i + log2(l_i)); what the reference decides is
range, and this one is safe:
  * no overflow, ever: every p <= 2^E (up to the last bit of the FMA's rounding), l_i <= Nk 2^E;
  * no precision lost while G = max over tiles of g <= E: the row's largest p is >= 2^(E - G) >= 1,
    as in the standard kernel (where it is exactly 1), so every p keeps its relative precision and
    l_i >= 1. Beyond, all p shrink by at most 2^(G - E): a pure exponent shift in float32, harmless
    in float32 and bfloat16 (float32's exponent range) until about G - E = 100, where the smallest
    weights begin to flush to zero, and all-zero rows (l_i = 0) only past G - E = 126.
    G <= log2(e) |scale q_i.k_j|_max (s_max - s_min): at lam = 0.025 and fam in [0, 1], G <= 0.036
    |logit|_max, so float16 is exact up to |logits| of 400, bfloat16 and float32 lose nothing up to
    2,800 (and rows fail only past 3,500);
  * E = 15 for float16 (whose P tile is normal only down to 2^-14, and whose largest p must stay below
    65,504): exact for G <= 15, the largest p still normal for G <= 29. E = 0 for bfloat16, whose P
    tile has float32's range. The exponents of the largest p are ~(G - E) instead of ~0, which costs
    |G - E| 2^-24 of relative error (1e-6 at 15), far below bfloat16's 2^-9 and float16's 2^-11;
  * float32 inputs, held to float32's own 2^-24, take the exact row max instead (the logits
    multiplied out, as the standard kernel): they run FMA dots on the fallback tiles anyway.
Then P is rounded to the MMA dtype and multiplied by s_j with one packed FMA per pair of columns,
p + p (s_j - 1), a single rounding (float32: one FFMA).

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

from srdiff._checks import SUPPORTED_DTYPES
from srdiff.kernels.utils import input_guard, new_empty, triton_interpreting

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
LOG2E = 1.4426950408889634  # 1 / ln(2)
# E of the forward's reference (module docstring): the largest exponent a p may reach, per input dtype
# (float32 takes the exact row max instead).
MAX_EXP = {torch.float16: 15.0, torch.bfloat16: 0.0, torch.float32: 0.0}

# Shared memory a config may use: Hopper's 227 KiB per block (the estimate below matches Triton's
# allocation to within its 1 KiB of barriers and scratch).
_SMEM_BUDGET = 227 * 1024
_SMEM_SCRATCH = 1024


def _configs(gpu: list[tuple]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) -> Configs, then the fallback (32 x 32
    tiles, four warps, one stage), which fits every head dim and dtype (float32 at D = 256 included).
    ``maxnreg`` caps ptxas's registers a thread (128: two CTAs of 8 warps per SM)."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, maxnreg=r)
            for m, n, w, s, r in (c if len(c) == 5 else (*c, None) for c in [*gpu, (32, 32, 4, 1)])]


# What the interpreter runs unless a test pins another config: 16 x 16 blocks make the test shapes
# (N = 17, 20, 33) span several blocks with ragged tails.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def _prune(resident: str, tiles_in: int, tiles_acc: int, register_tiles_in: int, key_bytes: int):
    """An ``early_config_prune`` keeping the configs whose register-resident tiles fit and whose
    pipelined tiles fit in shared memory, else the fallback. Each program keeps ``tiles_in`` input
    tiles of (``resident`` rows, BLOCK_D) (q in the forward; k, v in dK/dV; q, dO in dQ), of which
    ``register_tiles_in(BLOCK_D)`` in registers (the others are wgmma operands read from shared memory), and
    ``tiles_acc`` float32 accumulators in registers; it streams two tiles of the other block size
    per pipeline stage and ``key_bytes(has_fam)`` per streamed row (the forward's per-key records
    with a map, lse2 and delta in dK/dV, the map in dQ). Shared memory holds the input tiles once,
    num_stages buffers of each streamed tile and num_stages - 1 of each vector, plus 1 KiB: Triton
    3.8's allocation at sm_90 for the largest kept tiles (where the budget binds), an upper bound for
    small ones, whose buffers it shares (benchmarks/srdiff_bench/compile_sm90.py, with the JIT's specialisation).
    Budgets: 128 registers a thread for the resident tiles (half the cap of a config with
    ``maxnreg``: the rest holds the score tile) and Hopper's 227 KiB of shared memory. float32 inputs
    multiply exactly with FMAs, not tensor cores; beyond 32 x 32 tiles those dots spill heavily, so
    float32 always takes the fallback."""
    streamed = "BLOCK_N" if resident == "BLOCK_M" else "BLOCK_M"

    def smem(c: triton.Config, elsize: int, block_d: int, has_fam: bool) -> int:
        rows, rows_streamed = c.kwargs[resident], c.kwargs[streamed]
        tiles = elsize * block_d * (tiles_in * rows + 2 * c.num_stages * rows_streamed)
        return tiles + (c.num_stages - 1) * rows_streamed * key_bytes(has_fam) + _SMEM_SCRATCH

    def prune(configs, named_args, **kwargs):
        *candidates, fallback = configs
        args = {**named_args, **kwargs}
        block_d, elsize = args["BLOCK_D"], args["Q"].element_size()
        if elsize == 4:
            return [fallback]
        kept = []
        for c in candidates:
            tile_bytes = register_tiles_in(block_d) * elsize + tiles_acc * 4  # per element of a row
            registers = c.kwargs[resident] * block_d * tile_bytes / 4 / (32 * c.num_warps)
            budget = 128 if c.maxnreg is None else c.maxnreg // 2
            if registers <= budget and smem(c, elsize, block_d, args["HAS_FAM"]) <= _SMEM_BUDGET:
                kept.append(c)
        return kept or [fallback]

    prune.shared_memory = smem
    return prune


def _dkdv_register_tiles(block_d: int) -> int:
    """Input tiles the dK/dV pass holds in registers: none up to BLOCK_D = 128, where k and v stay
    wgmma operands in shared memory (so 128 keys fit at D = 128: 64x128 MMAs, no spill in the loop),
    both beyond, where the static check (benchmarks/srdiff_bench/sass_sm90.py) finds the loop spilling otherwise."""
    return 0 if block_d <= 128 else 2


# Hopper first, largest tiles first; the 8-warp 32/64-row configs serve head dims 160-256. Each
# kept candidate is a compile on first use. Forward: two stages (three cost the modulated loop
# register-pressure instructions: benchmarks/srdiff_bench/sass_sm90.py), 128 x 64 capped at 128 registers (two
# CTAs an SM, kept up to D = 64, where it does not spill).
_FWD_CONFIGS = _configs([(128, 128, 8, 2), (128, 64, 8, 2, 128), (64, 64, 4, 2), (64, 32, 8, 2)])
_BWD_DKDV_CONFIGS = _configs([(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (32, 64, 4, 3),
                              (32, 32, 8, 2)])
_BWD_DQ_CONFIGS = _configs([(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                            (32, 32, 8, 2)])
# Resident tiles: q (forward); k, v and the dk, dv accumulators (dK/dV); q, dO (dQ). Per streamed row:
# the forward's 8-byte key records with a map, dK/dV's lse2 and delta, dQ's map.
_FWD_PRUNE = _prune("BLOCK_M", tiles_in=1, tiles_acc=1, register_tiles_in=lambda block_d: 1,
                    key_bytes=lambda has_fam: 8 * has_fam)
_BWD_DKDV_PRUNE = _prune("BLOCK_N", tiles_in=2, tiles_acc=2, register_tiles_in=_dkdv_register_tiles,
                         key_bytes=lambda has_fam: 8)
_BWD_DQ_PRUNE = _prune("BLOCK_M", tiles_in=2, tiles_acc=1, register_tiles_in=lambda block_d: 2,
                       key_bytes=lambda has_fam: 4 * has_fam)


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
def _fam_key_scales_kernel(FAM, REC, C_RANGE, stride_fb, stride_fh, H_FAM, Nk, Nk_pad, lam, qk_scale,
                           P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The forward's per-key record, one program per (batch|1, head|1) row of fam: REC[j] = (bits of
    c_j = qk_scale * s_j in float32, bits of s_j - 1 in P_DTYPE, the dtype of the P.V operands);
    for 16-bit dtypes the word holds the pair (j & ~1, j | 1), low half first, which the packed FMA
    of the P tile takes as is. Keys Nk..Nk_pad-1 get s = 1. C_RANGE = (min_j c_j, max_j c_j)."""
    row = tl.program_id(0)
    fam_row = FAM + (row // H_FAM).to(tl.int64) * stride_fb + (row % H_FAM) * stride_fh
    rec_row = REC + row.to(tl.int64) * Nk_pad * 2
    c_lo = tl.full((BLOCK,), float("inf"), tl.float32)
    c_hi = tl.full((BLOCK,), float("-inf"), tl.float32)
    for n in range(0, Nk_pad, BLOCK):
        offs = n + tl.arange(0, BLOCK)
        key = offs < Nk
        fam = tl.load(fam_row + offs, mask=key, other=0.0).to(tl.float32)
        c = qk_scale * (1.0 + lam * fam)
        c_lo = tl.minimum(c_lo, tl.where(key, c, float("inf")))
        c_hi = tl.maximum(c_hi, tl.where(key, c, float("-inf")))
        delta = (lam * fam).to(P_DTYPE)
        if P_DTYPE == tl.float32:
            word = delta.to(tl.int32, bitcast=True)
        else:
            half_lo, half_hi = tl.split(delta.to(tl.uint16, bitcast=True).to(tl.int32).reshape(BLOCK // 2, 2))
            pair = half_lo | (half_hi << 16)
            word = tl.join(pair, pair).reshape(BLOCK)
        tl.store(rec_row + offs * 2, c.to(tl.int32, bitcast=True), mask=offs < Nk_pad)
        tl.store(rec_row + offs * 2 + 1, word, mask=offs < Nk_pad)
    tl.store(C_RANGE + row * 2, tl.min(c_lo, 0))
    tl.store(C_RANGE + row * 2 + 1, tl.max(c_hi, 0))


@triton.jit
def _scale_p(p, words, offs_n, PACKED_FMA: tl.constexpr):
    """p * s_j = p + p * (s_j - 1), rounded once to P's dtype; ``words`` as _fam_key_scales_kernel
    writes them. PACKED_FMA (GPUs): one fma.rn.{bf16,f16}x2 per pair of columns; else (the
    interpreter, which runs no inline assembly) the same single rounding from float32."""
    if p.dtype == tl.float32:
        scaled = p + p * words.to(tl.float32, bitcast=True)[None, :]
    elif PACKED_FMA:
        asm: tl.constexpr = ("fma.rn.bf16x2 $0, $1, $2, $1;" if p.dtype == tl.bfloat16
                             else "fma.rn.f16x2 $0, $1, $2, $1;")
        scaled = tl.inline_asm_elementwise(asm, "=r,r,r,r", [p, words[None, :]], dtype=p.dtype, is_pure=True,
                                           pack=2)
    else:
        half = tl.where(offs_n % 2 == 0, words, words >> 16) & 0xFFFF
        delta = half.to(tl.uint16).to(p.dtype, bitcast=True).to(tl.float32)
        scaled = (p.to(tl.float32) * (1.0 + delta[None, :])).to(p.dtype)
    return scaled


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, rec_base, start_n, end_n, Nk, qk_scale, c_lo, c_hi,
               stride_kn, stride_vn, offs_n0, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_FAM: tl.constexpr,
               MAX_EXP: tl.constexpr, EXACT_MAX: tl.constexpr, PACKED_FMA: tl.constexpr, MASK_N: tl.constexpr,
               DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks in [start_n, end_n); MASK_N for the ragged last block.

    x_ij = c_j (q_i.k_j) with c_j = qk_scale * s_j. The row max is taken on the raw q.k and turned
    into the reference m_i with the scales' range [c_lo, c_hi] (module docstring: why no p overflows
    or loses precision), so that each exponent is one FMA, as without a map."""
    for n in range(start_n, end_n, BLOCK_N):
        offs_n = tl.multiple_of(n, BLOCK_N) + offs_n0
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, Nk, offs_d,
                       HEAD_DIM, BLOCK_D, MASK_N)
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, Nk, offs_d,
                       HEAD_DIM, BLOCK_D, MASK_N)
        qk = _mma(q, tl.trans(k), None, DOT_UPCAST, DOT_PRECISION)
        if MASK_N:
            qk = tl.where((offs_n < Nk)[None, :], qk, float("-inf"))
        if HAS_FAM:
            c_bits, words = tl.split(tl.load(rec_base + offs_n[:, None] * 2 + tl.arange(0, 2)[None, :]))
            c = c_bits.to(tl.float32, bitcast=True)
        else:
            c = tl.full((BLOCK_N,), qk_scale, tl.float32)
        if HAS_FAM and EXACT_MAX:  # float32: the logits themselves, as the standard kernel
            qk = qk * c[None, :]
            c = tl.full((BLOCK_N,), 1.0, tl.float32)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
        elif HAS_FAM:
            qk_max = tl.max(qk, 1)
            m_new = tl.maximum(m_i, tl.maximum(qk_max * c_lo - MAX_EXP, qk_max * c_hi - MAX_EXP))
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * c[None, :] - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)
        if HAS_FAM:
            p = _scale_p(p, words, offs_n, PACKED_FMA)
        acc = _mma(p, v, acc * alpha[:, None], DOT_UPCAST, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["Nq_bucket", "Nk_bucket", "HEAD_DIM", "HAS_FAM", "DOT_UPCAST"],
                 prune_configs_by={"early_config_prune": _FWD_PRUNE})
@triton.jit(do_not_specialize=["Nq", "Nk", "Nq_bucket", "Nk_bucket"])
def _fam_attention_fwd_kernel(
    Q, K, V, REC, C_RANGE, O, LSE2,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_rb, stride_rh, stride_cb, stride_ch, stride_ob, stride_oh, stride_on,
    H, Nq, Nk, Nq_bucket, Nk_bucket, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, HAS_FAM: tl.constexpr,
    MAX_EXP: tl.constexpr, EXACT_MAX: tl.constexpr, PACKED_FMA: tl.constexpr, DOT_UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    rec_base = REC + b * stride_rb + h * stride_rh
    c_lo, c_hi = qk_scale, qk_scale
    if HAS_FAM:
        c_lo = tl.load(C_RANGE + b * stride_cb + h * stride_ch)
        c_hi = tl.load(C_RANGE + b * stride_cb + h * stride_ch + 1)

    q = _load_rows(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                   offs_m, Nq, offs_d, HEAD_DIM, BLOCK_D, True)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, rec_base, 0, n_full, Nk, qk_scale, c_lo,
                               c_hi, stride_kn, stride_vn, offs_n0, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
                               HAS_FAM, MAX_EXP, EXACT_MAX, PACKED_FMA, False, DOT_UPCAST, DOT_PRECISION)
    if n_full < Nk:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, rec_base, n_full, Nk, Nk, qk_scale, c_lo,
                                   c_hi, stride_kn, stride_vn, offs_n0, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N,
                                   HAS_FAM, MAX_EXP, EXACT_MAX, PACKED_FMA, True, DOT_UPCAST, DOT_PRECISION)

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
                 prune_configs_by={"early_config_prune": _BWD_DKDV_PRUNE})
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
                 prune_configs_by={"early_config_prune": _BWD_DQ_PRUNE})
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


def kept_configs(kernel, dtype: torch.dtype, head_dim: int, has_fam: bool = True) -> list[triton.Config]:
    """The configs of an autotuned kernel that its prune keeps for ``dtype`` at ``head_dim`` (with or
    without a map), largest first: what the autotuner times on a GPU (the last is what
    ``SRDIFF_AUTOTUNE=0`` runs)."""
    return kernel.early_config_prune(kernel.configs, {"Q": torch.empty(0, dtype=dtype)},
                                     BLOCK_D=_block_d(head_dim), HAS_FAM=has_fam)


def shared_memory_estimate(kernel, config: triton.Config, dtype: torch.dtype, head_dim: int,
                           has_fam: bool = True) -> int:
    """The bytes of shared memory the prune budgets for ``config`` of an autotuned ``kernel``."""
    return kernel.early_config_prune.shared_memory(config, dtype.itemsize, _block_d(head_dim), has_fam)


def config_options(config: triton.Config) -> dict:
    """The launch (and compile) keywords of ``config``: block sizes, warps, stages and, where set,
    the register cap."""
    options = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    return options


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
        config = kept_configs(kernel, dtype, meta["HEAD_DIM"], meta["HAS_FAM"])[-1]
    if config is None:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    else:
        torch.library.wrap_triton(kernel.fn)[grid](*args, **meta, **config_options(config))


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


# Keys per record block of the forward: the records are padded to a multiple of the largest BLOCK_N,
# so that no tile reads past them.
_REC_ALIGN = 128


def _key_scales(fam: torch.Tensor, lam: float, qk_scale: float, p_dtype: torch.dtype, B: int, H: int):
    """The forward's per-key records and scale range (:func:`_fam_key_scales_kernel`), seen as
    (B, H, ...) with zero strides on the dims fam broadcasts: records (B, H, Nk_pad, 2) int32, range
    (B, H, 2) float32."""
    Bf, Hf, Nk = fam.shape
    Nk_pad = triton.cdiv(Nk, _REC_ALIGN) * _REC_ALIGN
    rec = new_empty((Bf, Hf, Nk_pad, 2), dtype=torch.int32, device=fam.device)
    c_range = new_empty((Bf, Hf, 2), dtype=torch.float32, device=fam.device)
    torch.library.wrap_triton(_fam_key_scales_kernel)[(Bf * Hf,)](
        fam, rec, c_range, fam.stride(0), fam.stride(1), Hf, Nk, Nk_pad, lam, qk_scale,
        P_DTYPE=_TL_DTYPES[p_dtype], BLOCK=1024,
    )
    return rec.expand(B, H, Nk_pad, 2), c_range.expand(B, H, 2)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


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
    qk_scale = scale * LOG2E
    rec, c_range = (q, q) if not has_fam else _key_scales(fam, float(lam), qk_scale, q.dtype, B, H)
    o = _empty_like_layout(q)
    lse2 = new_empty((B, H, Nq), dtype=torch.float32, device=q.device)

    def grid(meta):
        return fold_grid(Nq, meta["BLOCK_M"], B * H)

    strides = [t.stride(i) if has_fam else 0 for t in (rec, c_range) for i in (0, 1)]
    _launch(_fam_attention_fwd_kernel, grid, (
        q, k, v, rec, c_range, o, lse2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *strides, o.stride(0), o.stride(1), o.stride(2),
        H, Nq, Nk, *_sequence_buckets(Nq, Nk), qk_scale,
    ), dict(HAS_FAM=has_fam, MAX_EXP=MAX_EXP[q.dtype], EXACT_MAX=q.dtype == torch.float32,
            PACKED_FMA=not triton_interpreting(),
            ROW_ALIGN=_row_alignment(q, k, v, o), **_kernel_flags(q)), q.dtype)
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
