"""M_emb: from an image-space flaw map to one modulation value per attention token.

The paper writes K_sr = K (1 + lam M_emb) without defining M_emb. srdiff's definition, following the
authors' public code: the mFAM (H, W) or (B, H, W), values in [0, 1], optionally passed through a
small learned convolutional projection (:class:`FAMProjection`), is resized to the layer's token grid
(h, w) (bilinear by default, area averaging as an option), flattened row-major as diffusers flattens
feature maps (token t = row * w + col), and broadcast over heads and channels. Tokens that are not
grid cells (class or time tokens that DiT/U-ViT-style models put first) get 0, i.e. s = 1.
"""

import torch
import torch.nn.functional as F
from torch import nn

from srdiff._checks import check_choice, check_int, check_tensor

MODES = ("bilinear", "area")


def fam_to_tokens(
    fam: torch.Tensor, grid: tuple[int, int], *, mode: str = "bilinear", extra_tokens: int = 0
) -> torch.Tensor:
    """Bring an image-space map to a layer's token grid, one value per token.

    Args:
        fam: (H, W) or (B, H, W) map (an mFAM or the output of :class:`FAMProjection`), floating.
        grid: (h, w), the layer's token grid.
        mode: ``"bilinear"`` (half-pixel centres, ``align_corners=False``, no antialiasing: what the
            authors' code does) or ``"area"`` (each token the mean of the pixels it covers).
        extra_tokens: number of leading non-spatial tokens, which get 0.

    Returns:
        (extra_tokens + h*w,) for a 2-d fam, (B, extra_tokens + h*w) for a 3-d one; fam's dtype.
        Differentiable in fam. Resizing to the map's own size returns it unchanged.

    Example::

        >>> mfam = torch.rand(64, 64)
        >>> srdiff.fam_to_tokens(mfam, (16, 16)).shape
        torch.Size([256])
    """
    check_tensor("fam", fam, ndim=(2, 3), floating=True)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"grid must be two positive ints (h, w), got {grid!r}")
    check_choice("mode", mode, MODES)
    check_int("extra_tokens", extra_tokens, 0)
    batched = fam.dim() == 3
    maps = fam if batched else fam[None]
    if tuple(maps.shape[-2:]) != tuple(grid):
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        maps = F.interpolate(maps[:, None], size=tuple(grid), mode=mode, **kwargs)[:, 0]
    tokens = maps.flatten(1)
    if extra_tokens:
        tokens = F.pad(tokens, (extra_tokens, 0))
    return tokens if batched else tokens[0]


class FAMProjection(nn.Module):
    """The optional learned projection of the mFAM before it is resized to each layer's grid.

    Three 3x3 convolutions, 1 -> ``hidden`` -> ``hidden`` -> 1 channels with SiLU between them (the
    authors' code uses 1 -> 8 -> 8 -> 1), added to the map as a residual: ``M_emb = m + net(m)``. The
    last convolution starts at zero, so an untrained projection is the identity and training starts
    from the unprojected modulation. Its gradient arrives through d(fam) of :func:`srdiff.fam_attention`.

    ``forward(m)``: m (H, W) or (B, H, W) -> the same shape and dtype. Nothing bounds the output;
    :func:`srdiff.fam_attention` refuses maps for which some 1 + lam * M_emb <= 0.

    Example::

        >>> proj = srdiff.FAMProjection()
        >>> mfam = torch.rand(64, 64)
        >>> torch.equal(proj(mfam), mfam)               # identity at initialisation
        True
    """

    def __init__(self, hidden: int = 8):
        super().__init__()
        check_int("hidden", hidden, 1)
        self.net = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, 1, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        check_tensor("m", m, ndim=(2, 3), floating=True)
        maps = m if m.dim() == 3 else m[None]
        out = maps + self.net(maps[:, None])[:, 0].to(maps.dtype)
        return out if m.dim() == 3 else out[0]
