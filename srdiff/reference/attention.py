"""FAM-modulated attention in plain PyTorch: the naive oracle and the O(N)-memory SDPA path.

Both compute softmax(scale * q (s*k)^T) (s*v) with s_j = 1 + lam * fam_j scaling key j and value j.
``fam_attention_ref`` spells it out (explicit N x N softmax; the tests' oracle);
``fam_attention_sdpa`` scales K and V once and calls ``F.scaled_dot_product_attention`` (the CPU path of
:func:`srdiff.fam_attention` and the "unfused" benchmark peer).
"""

import math

import torch
import torch.nn.functional as F


def fam_as_bhn(fam: torch.Tensor) -> torch.Tensor:
    """fam of shape (Nk,), (B, Nk) or (B, H, Nk) as a (B|1, H|1, Nk) view (differentiable)."""
    if fam.dim() == 1:
        return fam[None, None]
    if fam.dim() == 2:
        return fam[:, None]
    return fam


def _key_scale(fam: torch.Tensor, lam: float) -> torch.Tensor:
    """(B|1, H|1, Nk, 1) s = 1 + lam * fam, in float32 (float64 for a float64 fam)."""
    fam = fam_as_bhn(fam)
    return (1.0 + lam * fam.to(torch.promote_types(fam.dtype, torch.float32)))[..., None]


def fam_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fam: torch.Tensor | None = None,
    lam: float = 0.0,
    *,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """The oracle: explicit scores, softmax and weighted sum, O(Nq * Nk) memory.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); fam: None, (Nk,), (B, Nk) or (B, H, Nk) (B or H may be 1).
    Returns (B, H, Nq, D): float32 computed in float32 when ``upcast`` (the default); otherwise in the
    inputs' dtype throughout (the "same-precision PyTorch" baseline: s*K and s*V rounded to that dtype).
    """
    dtype = torch.float32 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if fam is not None:
        s = (1.0 + lam * fam_as_bhn(fam).to(dtype))[..., None]
        k, v = k * s, v * s
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * (q @ k.transpose(-2, -1))
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = scores.exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights @ v


def fam_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fam: torch.Tensor | None = None,
    lam: float = 0.0,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """K and V scaled once (s in float32, the products rounded to the inputs' dtype), then SDPA.

    Shapes as :func:`fam_attention_ref`; returns the inputs' dtype. Memory: two (B, H, Nk, D) copies
    plus whatever the SDPA backend needs (on CPU its flash kernel: O(N)). With ``fam=None``, or
    ``lam == 0`` and a fam that needs no gradient, this is exactly ``F.scaled_dot_product_attention``;
    ``attn_mask`` is passed to it unchanged.
    """
    if fam is not None and (lam != 0.0 or fam.requires_grad):
        s = _key_scale(fam, lam)
        k, v = torch.mul(k, s).to(k.dtype), torch.mul(v, s).to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
