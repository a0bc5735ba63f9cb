"""FAM-modulated linear attention (Sana's) in plain PyTorch: the naive oracle.

Sana's attention is kernelised with the feature map phi = ReLU: out_i = sum_j (phi(q_i) . phi(k_j)) v_j /
(sum_j phi(q_i) . phi(k_j) + eps). The modulation scales key j and value j by s_j = 1 + lam * fam_j
inside the feature map: phi(k_j) -> s_j phi(k_j) (equal to phi(s_j k_j), ReLU being positively
homogeneous and s_j > 0), v_j -> s_j v_j; the normaliser sums the scaled key features:

    out_i = sum_j s_j^2 (phi(q_i) . phi(k_j)) v_j / (sum_j s_j (phi(q_i) . phi(k_j)) + eps)
"""

import torch

from srdiff.reference.attention import fam_as_bhn

SANA_EPS = 1e-15  # diffusers' SanaLinearAttnProcessor2_0


def fam_linear_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fam: torch.Tensor | None = None,
    lam: float = 0.0,
    *,
    eps: float = SANA_EPS,
    upcast: bool = True,
) -> torch.Tensor:
    """The oracle: the explicit (Nq, Nk) kernel matrix A_ij = phi(q_i) . s_j phi(k_j), then
    out = A (s V) / (A 1 + eps). O(Nq * Nk) memory.

    q: (B, H, Nq, D); k: (B, H, Nk, D); v: (B, H, Nk, Dv); fam: None, (Nk,), (B, Nk) or (B, H, Nk) (B or H
    may be 1). Returns (B, H, Nq, Dv), float32 when ``upcast`` (default; float64 inputs stay float64),
    else the inputs' dtype throughout.
    """
    dtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    q, k, v = torch.relu(q.to(dtype)), torch.relu(k.to(dtype)), v.to(dtype)
    if fam is not None:
        s = (1.0 + lam * fam_as_bhn(fam).to(dtype))[..., None]
        k, v = k * s, v * s
    scores = q @ k.transpose(-2, -1)
    return (scores @ v) / (scores.sum(dim=-1, keepdim=True) + eps)
