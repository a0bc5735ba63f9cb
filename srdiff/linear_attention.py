"""FAM-modulated linear attention: Sana's ReLU-kernel attention with keys and values scaled per key
inside the feature map (:func:`srdiff.reference.linear_attention.fam_linear_attention_ref` spells out
the definition).

Follow a call: :func:`fam_linear_attention` checks its arguments (the checks :func:`srdiff.fam_attention`
uses) and computes in float32, as diffusers' ``SanaLinearAttnProcessor2_0`` does, the O(N) form: the
(D, D) summary sum_j (s_j phi(k_j)) (s_j v_j)^T and the normaliser sum_j s_j phi(k_j), then one product
per query. The modulation is one multiply of the key features and one of the values by s, O(N D)
beside the attention's O(N D^2).
"""

import torch

from srdiff.attention import _check_args, _check_fam_values

SANA_EPS = 1e-15


def _per_key(fam: torch.Tensor) -> torch.Tensor:
    """(Nk,), (B, Nk) or (B, H, Nk) as (B|1, H|1, Nk)."""
    if fam.dim() == 3:
        return fam
    return fam[:, None] if fam.dim() == 2 else fam[None, None]


def fam_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fam: torch.Tensor | None = None,
    lam: float = 0.0,
    *,
    eps: float = SANA_EPS,
    check_fam: bool = True,
) -> torch.Tensor:
    """Linear attention with the ReLU feature map whose keys and values a flaw map modulates per key.

    ``out_i = sum_j s_j^2 (phi(q_i) . phi(k_j)) v_j / (sum_j s_j (phi(q_i) . phi(k_j)) + eps)`` with
    phi = ReLU and s_j = 1 + lam * fam_j: the keys' features and the values scaled by s (the paper's
    K (1 + lam M_emb), V (1 + lam M_emb), taken inside the feature map, where Sana's attention sees them).

    Args:
        q, k, v: (B, H, N, D) (k, v may have another length Nk), float32, float16 or bfloat16, one dtype.
        fam: None, (Nk,), (B, Nk) or (B, H, Nk) (B or H may be 1); differentiable.
        lam: modulation strength, finite, >= 0; every 1 + lam * fam must be > 0.
        eps: added to the normaliser (diffusers' Sana uses 1e-15).
        check_fam: verify fam is finite and 1 + lam * fam > 0 (one device sync; skipped under
            torch.compile). The FAM processors checked the map already and turn it off.

    Returns:
        (B, H, Nq, D) in q's dtype, computed in float32. fam=None or lam=0 gives Sana's linear attention.

    Example::

        >>> q = k = v = torch.randn(2, 4, 256, 32)
        >>> srdiff.fam_linear_attention(q, k, v, torch.rand(256), lam=0.025).shape
        torch.Size([2, 4, 256, 32])
    """
    _check_args(q, k, v, fam, lam, None)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if fam is not None and check_fam:
        _check_fam_values(fam, lam)
    q_feat, k_feat, values = torch.relu(q).float(), torch.relu(k).float(), v.float()
    if fam is not None and (lam != 0 or fam.requires_grad):
        s = 1.0 + float(lam) * _per_key(fam.float())[..., None]
        k_feat, values = k_feat * s, values * s
    summary = k_feat.transpose(-2, -1) @ values  # (B, H, D, D)
    normaliser = q_feat @ k_feat.sum(dim=-2)[..., None]  # (B, H, Nq, 1)
    return ((q_feat @ summary) / (normaliser + eps)).to(q.dtype)
