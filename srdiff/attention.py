"""FAM-modulated attention: the paper's reverse-process change K_sr = K (1 + lam M_emb),
V_sr = V (1 + lam M_emb), fused into flash attention.

Follow a call: :func:`fam_attention` checks its arguments and picks a path: on CUDA the Triton kernels
(``srdiff/kernels/fam_attention.py``: forward, backward with d(fam), registered as ``torch.library.triton_op``
so ``torch.compile(fullgraph=True)`` traces them), on CPU :func:`srdiff.reference.fam_attention_sdpa`
(K and V scaled once, then SDPA's O(N)-memory kernel). :class:`FAMAttention` is a self-attention
module around it.
"""

import math

import torch
from torch import nn

from srdiff._checks import check_finite, check_nonnegative, check_same_device, check_tensor, resolve_backend
from srdiff.reference.attention import fam_as_bhn, fam_attention_sdpa

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The Triton kernels' head dims (srdiff/kernels/fam_attention.py: MIN_HEAD_DIM, MAX_HEAD_DIM); the CPU path
# takes any. Kept here so that checking never imports triton.
TRITON_HEAD_DIMS = (16, 256)


def check_lam(lam) -> None:
    """lam must be a finite real number >= 0 (lam = inf or NaN would make every output non-finite)."""
    check_nonnegative("lam", lam)
    if not math.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}")


# Appended to shape errors whose shapes fit (B, N, H, D) tensors (diffusers' buffer before its
# transpose) passed where (B, H, N, D) is expected.
_LAYOUT_HINT = (
    "; if q, k and v are (B, N, H, D) tensors, pass them as (B, H, N, D), e.g. q.transpose(1, 2) "
    "(layout (B, N, H, D) is not accepted)"
)


def _check_args(q, k, v, fam, lam, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    B, H, Nq, D = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q must be one of {SUPPORTED_DTYPES}, got dtype {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must equal q dtype {q.dtype}")
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        swapped = k.shape[0] == B and k.shape[2] == Nq and k.shape[3] == D
        raise ValueError(
            f"k must have shape (B, H, Nk, D) = ({B}, {H}, Nk, {D}) like q, got {tuple(k.shape)}"
            + (_LAYOUT_HINT if swapped else "")
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if min(q.shape) == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k must be non-empty, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    check_same_device(q=q, k=k, v=v, fam=fam)
    check_lam(lam)
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be None or a positive finite number, got {scale!r}")
    if fam is None:
        return
    check_tensor("fam", fam, ndim=(1, 2, 3), floating=True)
    Nk = k.shape[2]
    allowed = {1: [(Nk,)], 2: [(B, Nk), (1, Nk)], 3: [(b, h, Nk) for b in (B, 1) for h in (H, 1)]}[fam.dim()]
    if tuple(fam.shape) not in allowed:
        # A fam with one value per token of dim 1 of k: k is a (B, N, H, D) tensor taken as (B, H, N, D).
        swapped = fam.shape[-1] == k.shape[1] != Nk
        raise ValueError(
            f"fam must have shape (Nk,), (B, Nk) or (B, H, Nk) = ({Nk},), ({B}, {Nk}) or ({B}, {H}, {Nk}) "
            f"(B or H may be 1), got {tuple(fam.shape)}" + (_LAYOUT_HINT if swapped else "")
        )


def _check_fam_values(fam: torch.Tensor, lam: float) -> None:
    """fam finite and every s = 1 + lam * fam > 0 (one device sync; skipped under torch.compile)."""
    if torch.compiler.is_compiling():
        return
    with torch.no_grad():
        ok = bool((torch.isfinite(fam) & (1.0 + lam * fam.float() > 0)).all())
    if not ok:
        check_finite("fam", fam)
        raise ValueError(
            f"1 + lam * fam must be > 0 for every key (a key scaled by s <= 0 flips or vanishes), "
            f"got lam={lam} and min(fam)={fam.min().item():.6g}"
        )


def _triton_supports(q: torch.Tensor) -> bool:
    return TRITON_HEAD_DIMS[0] <= q.shape[-1] <= TRITON_HEAD_DIMS[1]


def fam_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fam: torch.Tensor | None = None,
    lam: float = 0.0,
    *,
    scale: float | None = None,
    backend: str | None = None,
    check_fam: bool = True,
    deterministic: bool = True,
) -> torch.Tensor:
    """Scaled dot-product attention whose keys and values are modulated per key by a flaw map.

    ``out = softmax(scale * q (s*k)^T) (s*v)`` with ``s_j = 1 + lam * fam_j`` scaling key j's logits
    and value j (the paper's K_sr = K (1 + lam M_emb), V_sr = V (1 + lam M_emb); queries unchanged).

    Args:
        q: (B, H, Nq, D) queries; float32, float16 or bfloat16; any strides (e.g. the (B, N, H, D)
            buffers diffusers views as (B, H, N, D)).
        k, v: (B, H, Nk, D), same dtype and device as q. Self- (Nk = Nq) and cross-attention.
        fam: per-key modulation M_emb, broadcast over what it lacks: (Nk,), (B, Nk) or (B, H, Nk)
            (B or H may also be 1); any floating dtype. None means no modulation. Differentiable:
            the backward returns d(fam) (e.g. to train :class:`srdiff.FAMProjection`).
        lam: modulation strength, finite, lam >= 0 (the paper uses 0.025). Every 1 + lam * fam must
            be > 0.
        scale: softmax scale, default 1 / sqrt(D) as in SDPA.
        backend: None (Triton on CUDA when D is in [16, 256], else the SDPA path), ``"triton"`` (the
            fused kernels; on CPU tensors only under TRITON_INTERPRET=1) or ``"reference"``
            (:func:`srdiff.reference.fam_attention_sdpa`: K and V scaled once, then SDPA).
        check_fam: verify that fam is finite and 1 + lam * fam > 0 (one device sync; skipped under
            torch.compile). Callers that validated the map already (the processor) turn it off.
        deterministic: True (default): the Triton backward is bitwise reproducible (separate dK/dV
            and dQ passes, no atomics). False: dq is accumulated with float32 atomics in the dK/dV
            pass (5 GEMMs per tile pair instead of 7; dq's last bits vary between runs). The SDPA
            path is unaffected.

    Raises:
        TypeError / ValueError naming the argument and its value: ranks, shapes (with a hint when
        q, k, v look like (B, N, H, D)), dtypes, devices, a non-finite or negative lam, a bad scale,
        backend or head dim, a non-finite fam or a 1 + lam * fam <= 0.

    Returns:
        (B, H, Nq, D) in q's dtype. Accumulation is float32; float32 inputs use exact float32
        products (never TF32). fam=None or lam=0 gives exactly F.scaled_dot_product_attention on the
        reference path (and matches it to rounding on the Triton path).

    Memory is O(B H N D) on every path: no Nq x Nk matrix is ever formed. The Triton kernels apply
    s on the fly and never write s*K or s*V.

    Example::

        >>> q = k = v = torch.randn(2, 8, 256, 64)
        >>> fam = torch.rand(2, 256)                      # one map value per key token
        >>> srdiff.fam_attention(q, k, v, fam, lam=0.025).shape
        torch.Size([2, 8, 256, 64])
    """
    _check_args(q, k, v, fam, lam, scale)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if backend is None:
        path = "triton" if q.is_cuda and _triton_supports(q) else "reference"
    else:
        path = resolve_backend(backend, q.device)
        if path == "triton" and not _triton_supports(q):
            raise ValueError(
                f"backend='triton' supports head dims {TRITON_HEAD_DIMS[0]}..{TRITON_HEAD_DIMS[1]}, "
                f"got D={q.shape[-1]}"
            )
    if fam is not None and check_fam:
        _check_fam_values(fam, lam)
    lam = float(lam)
    if path == "reference":
        return fam_attention_sdpa(q, k, v, fam, lam, scale=scale)
    from srdiff.kernels.fam_attention import FAMAttentionFunction

    if fam is not None and lam == 0.0 and not fam.requires_grad:
        fam = None
    return FAMAttentionFunction.apply(q, k, v, None if fam is None else fam_as_bhn(fam), lam, scale, deterministic)


class FAMAttention(nn.Module):
    """Multi-head self-attention whose keys and values a flaw map can modulate. See :func:`fam_attention`.

    Args:
        dim: token width C.
        heads: number of heads H; ``dim_head`` (default dim // heads, then heads must divide dim) is D.
        lam: modulation strength (finite, >= 0) used when ``forward`` gets a fam.
        bias: biases on the q/k/v projections; the output projection always has one.
        backend: passed to :func:`fam_attention`.

    ``forward(x, fam=None)``: x (B, N, C); fam per token, (N,) or (B, N) (e.g. from
    :func:`srdiff.fam_to_tokens`). Returns (B, N, C). With fam=None it is plain multi-head attention.

    Example::

        >>> attn = srdiff.FAMAttention(128, heads=4)
        >>> x, fam = torch.randn(2, 64, 128), torch.rand(64)
        >>> attn(x, fam).shape
        torch.Size([2, 64, 128])
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, *, lam: float = 0.025,
                 bias: bool = False, backend: str | None = None):
        super().__init__()
        if heads < 1 or (dim_head is None and dim % heads != 0) or (dim_head is not None and dim_head < 1):
            raise ValueError(
                f"heads must divide dim into heads of >= 1 channel (or pass dim_head), got dim={dim}, "
                f"heads={heads}, dim_head={dim_head}"
            )
        dim_head = dim // heads if dim_head is None else dim_head
        check_lam(lam)
        self.heads, self.dim_head, self.lam, self.backend = heads, dim_head, lam, backend
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, fam: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("x", x, ndim=3)
        B, N, _ = x.shape
        q, k, v = (proj(x).view(B, N, self.heads, self.dim_head).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        out = fam_attention(q, k, v, fam, self.lam, backend=self.backend)
        return self.to_out(out.transpose(1, 2).reshape(B, N, self.heads * self.dim_head))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}, lam={self.lam}"
