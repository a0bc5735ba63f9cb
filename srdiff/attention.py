"""FAM-modulated attention: the paper's reverse-process change K_sr = K (1 + lam M_emb),
V_sr = V (1 + lam M_emb), as fused flash attention or as "scale K and V once, then SDPA".

Follow a call: :func:`fam_attention` checks its arguments (the shared checks of ``srdiff/_checks.py``)
and picks a path (:func:`attention_path`):
``"triton"``, the fused Triton kernels (``srdiff/kernels/fam_attention.py``: forward, backward with
d(fam), registered as ``torch.library.triton_op`` so ``torch.compile(fullgraph=True)`` traces them),
which never write s*K or s*V; or ``"sdpa"``, K and V scaled once (on CUDA by one fused Triton pass
each way, ``srdiff/kernels/fam_prescale.py``; elsewhere by :func:`srdiff.reference.fam_attention_sdpa`'s
PyTorch ops), then ``F.scaled_dot_product_attention`` (cuDNN first on Hopper). On CUDA a stored table
(``attention_dispatch.json``, generated from the GPU benchmarks) picks the faster per device, dtype,
head dim, sequence length and direction, the fused kernel wherever the scaled copies would not fit in
memory. :func:`fam_attention_masked` (the FAM processors' layers with an attention mask) scales K and V
once and calls SDPA with the mask. :class:`FAMAttention` is a self-attention module around
:func:`fam_attention`.
"""

import contextlib
import inspect
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from srdiff._checks import (
    SUPPORTED_DTYPES,
    check_dtype,
    check_finite,
    check_lam,
    check_same_device,
    check_same_dtype,
    check_tensor,
    resolve_backend,
)
from srdiff.reference.attention import fam_as_bhn, fam_attention_sdpa

# The fused kernels' head dims (srdiff/kernels/fam_attention.py: MIN_HEAD_DIM, MAX_HEAD_DIM); the SDPA
# paths take any. Kept here so that checking never imports triton.
TRITON_HEAD_DIMS = (16, 256)
BACKENDS = ("triton", "sdpa", "reference")
DISPATCH_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_dispatch.json")
# The "sdpa" path allocates s*K and s*V (kept for the backward when autograd needs them); it is taken
# only while they need at most half the device memory free, checked for copies above this size.
_MEMORY_CHECK_BYTES = 64 * 2**20


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
    check_dtype("q", q, SUPPORTED_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_same_dtype(name, t, "q", q)
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
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise TypeError(f"scale must be None or a positive finite number, got {type(scale).__name__}")
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
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


def _load_dispatch_table() -> dict:
    """The stored table (``attention_dispatch.json``): ``default`` (path per direction, and its basis)
    and ``measured`` entries (device capability, dtype, head dim D, sequence length N, direction, both
    paths' times and peak memory, the faster path), written by ``PYTHONPATH=benchmarks python -m srdiff_bench.dispatch_table``.
    Read once, at import (so that torch.compile traces the dispatch as plain Python on constants)."""
    with open(DISPATCH_TABLE) as f:
        return json.load(f)


DISPATCH = _load_dispatch_table()


def _capability(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)  # constant-folded by torch.compile
    return f"{props.major}.{props.minor}"


def choose_path(table: dict, capability: str, dtype: torch.dtype, D: int, N: int, direction: str,
                copies_fit: bool) -> str:
    """``"triton"`` or ``"sdpa"`` from the stored ``table``: the faster path of the measured entry
    nearest (in log2 of D and of N) to this call among those of the same capability, dtype and
    direction, else the table's default for the direction; ``"triton"`` whenever the "sdpa" path's
    scaled copies would not fit (``copies_fit`` False)."""
    dtype_name = str(dtype).replace("torch.", "")
    entries = [e for e in table["measured"]
               if (e["capability"], e["dtype"], e["mode"]) == (capability, dtype_name, direction)]
    if entries:
        path = min(entries, key=lambda e: abs(math.log2(e["D"] / D)) + abs(math.log2(e["N"] / N)))["faster"]
    else:
        path = table["default"][direction]
    return "triton" if path == "sdpa" and not copies_fit else path


def _scaled_copies_fit(k: torch.Tensor) -> bool:
    """Whether the "sdpa" path's s*K and s*V need at most half of the memory free on k's device (the
    driver's free memory plus what PyTorch's allocator holds unused). Skipped under torch.compile."""
    copies = 2 * k.numel() * k.element_size()
    if copies < _MEMORY_CHECK_BYTES or torch.compiler.is_compiling():
        return True
    free, _ = torch.cuda.mem_get_info(k.device)
    free += torch.cuda.memory_reserved(k.device) - torch.cuda.memory_allocated(k.device)
    return copies <= free // 2


def attention_path(q: torch.Tensor, k: torch.Tensor, modulated: bool, needs_grad: bool) -> str:
    """The path ``backend=None`` takes: ``"reference"`` off CUDA; on CUDA ``"sdpa"`` without a map or
    outside the fused kernels' head dims, else :func:`choose_path` for this device, dtype, head dim,
    key count and direction (``"fwd+bwd"`` when autograd will run the backward)."""
    if not q.is_cuda:
        return "reference"
    if not modulated or not _triton_supports(q):
        return "sdpa"
    return choose_path(DISPATCH, _capability(q.device), q.dtype, q.shape[-1], k.shape[2],
                       "fwd+bwd" if needs_grad else "fwd", _scaled_copies_fit(k))


# SDPA's backends in the order the "sdpa" path prefers them on Hopper (cuDNN first) with the rest
# still allowed, where torch's sdpa_kernel can set a priority; elsewhere and under torch.compile,
# torch's own order.
_SET_PRIORITY = "set_priority" in inspect.signature(torch.nn.attention.sdpa_kernel).parameters


def _sdpa_priority(q: torch.Tensor):
    if not (q.is_cuda and _SET_PRIORITY) or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if torch.cuda.get_device_properties(q.device).major != 9:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def _prescaled_sdpa(q, k, v, fam, lam: float, scale: float | None) -> torch.Tensor:
    """The "sdpa" path: K and V scaled once, then SDPA. On CUDA (and on CPU tensors under the Triton
    interpreter) the scaling is one fused Triton pass each way; elsewhere the reference's ops."""
    from srdiff.kernels.utils import triton_interpreting

    if fam is not None and (lam != 0.0 or fam.requires_grad):
        if not (q.is_cuda or triton_interpreting()):
            return fam_attention_sdpa(q, k, v, fam, lam, scale=scale)
        from srdiff.kernels.fam_prescale import FAMPrescaleFunction

        k, v = FAMPrescaleFunction.apply(k, v, fam_as_bhn(fam), lam)
    with _sdpa_priority(q):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


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
        backend: None (:func:`attention_path`: on CUDA the faster of the next two per the stored
            table, the fused kernels where memory is short; on CPU ``"reference"``), ``"triton"`` (the
            fused kernels, D in [16, 256]: no copy of K or V; on CPU tensors only under
            TRITON_INTERPRET=1), ``"sdpa"`` (K and V scaled once, on CUDA by one fused pass each way,
            then SDPA; any D) or ``"reference"`` (:func:`srdiff.reference.fam_attention_sdpa`: the same
            with PyTorch ops).
        check_fam: verify that fam is finite and 1 + lam * fam > 0 (one device sync; skipped under
            torch.compile). Callers that validated the map already (the processor) turn it off.
        deterministic: True (default): the fused backward is bitwise reproducible (separate dK/dV
            and dQ passes, no atomics). False: dq is accumulated with float32 atomics in the dK/dV
            pass (5 GEMMs per tile pair instead of 7; dq's last bits vary between runs). The SDPA
            paths are unaffected.

    Raises:
        TypeError naming the argument: a wrong argument type or dtype (docs/errors.md); ValueError
        naming the argument and its value: ranks, shapes (with a hint when q, k, v look like
        (B, N, H, D)), devices, a non-finite or negative lam, a bad scale, backend or head dim, a
        non-finite fam or a 1 + lam * fam <= 0.

    Returns:
        (B, H, Nq, D) in q's dtype. Accumulation is float32; float32 inputs use exact float32
        products (never TF32). fam=None or lam=0 gives exactly F.scaled_dot_product_attention on the
        reference path (and matches it to rounding on the Triton path).

    Memory is O(B H N D) on every path: no Nq x Nk matrix is ever formed. The fused kernels apply s
    on the fly and never write s*K or s*V; the SDPA paths allocate both (2 B H Nk D elements) and
    keep them until the backward when autograd needs one.

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
        modulated = fam is not None and (lam != 0 or fam.requires_grad)
        inputs = (q, k, v, fam)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
        path = attention_path(q, k, modulated, needs_grad)
    else:
        path = resolve_backend(backend, q.device, BACKENDS)
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
    if path == "sdpa":
        return _prescaled_sdpa(q, k, v, fam, lam, scale)
    from srdiff.kernels.fam_attention import FAMAttentionFunction

    if fam is not None and lam == 0.0 and not fam.requires_grad:
        fam = None
    return FAMAttentionFunction.apply(q, k, v, None if fam is None else fam_as_bhn(fam), lam, scale, deterministic)


def fam_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fam: torch.Tensor | None, lam: float,
                         attn_mask: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """:func:`fam_attention` with an SDPA ``attn_mask`` (bool, or additive float, broadcast to
    (B, H, Nq, Nk)): K and V scaled once, then ``F.scaled_dot_product_attention`` (the fused kernels take
    no mask). The FAM processors call it for masked layers; ``fam`` is not checked for values (the
    processors checked the map on entry to the context)."""
    _check_args(q, k, v, fam, lam, scale)
    return fam_attention_sdpa(q, k, v, fam, float(lam), scale=scale, attn_mask=attn_mask)


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
