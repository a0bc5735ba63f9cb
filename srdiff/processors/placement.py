"""Where one layer's image tokens lie on the image, and the map's value at each of them.

A layer's image tokens are one of three arrangements (a :class:`Placement`):

* a grid (h, w), row-major, one per batch element; in the spatial layers of video models the frames
  are folded into the batch (the layer's batch is B * F, frame-major within each video, as every
  diffusers video model folds them), and the map of each frame goes to its slice of the batch;
* a video grid (f, h, w), frame-major (the full spatio-temporal attention of Wan, Allegro, ...);
* packed tokens with explicit positions (Flux's ``img_ids``: (t, row, col) per token), where the grid
  extent lives in device memory: the map is sampled at each token's position on the device (bilinear,
  exactly the cell centres ``F.interpolate`` uses), so no grid size ever reaches the host. Tokens of
  another ``t`` than the first (conditioning images that Flux Kontext or Flux.2 edit append) get 0.

The map (M_emb) is (H, W) (one for every image and frame), (B, H, W) (one per image; in a video
model the same for every frame of that video) or (B, F, H, W) (one per frame). Everything here is
shape arithmetic or device ops: no host sync, so ``torch.compile(fullgraph=True)`` traces it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from srdiff.fam_embedding import fam_to_tokens


@dataclass(frozen=True)
class Placement:
    """The image tokens of one layer call: ``grid`` (h, w) or (f, h, w), or ``positions`` (Bp, n, 3)
    (t, row, col per token, floating); ``frames`` > 1: the layer's batch is B * frames (a spatial layer
    of a video model)."""

    grid: tuple[int, ...] | None = None
    positions: torch.Tensor | None = None
    frames: int = 1

    @property
    def n_tokens(self) -> int:
        if self.positions is not None:
            return self.positions.shape[-2]
        n = 1
        for g in self.grid:
            n *= g
        return n

    def describe(self) -> tuple[int, ...]:
        """The grid as ints (for :func:`srdiff.fam_layers`): ``grid``, or for positions the extent of the
        first image's rows and columns (read from the device: introspection only, never in a forward)."""
        if self.positions is None:
            return self.grid
        t, rows, cols = self.positions[0].unbind(-1)
        first = t == t.min()
        return int(rows[first].max()) + 1, int(cols[first].max()) + 1


def token_grid(n_tokens: int, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The grid of a layer with ``n_tokens`` spatial tokens in a model whose input is ``input_hw``:
    (ceil(H/f), ceil(W/f)) (strided convolutions) or (H//f, W//f) (patch embeddings) for the
    smallest integer factor f that gives n_tokens cells; None if no factor does."""
    H, W = input_hw
    for f in range(1, max(H, W) + 1):
        for grid in ((-(-H // f), -(-W // f)), (H // f, W // f)):
            if grid[0] * grid[1] == n_tokens:
                return grid
    return None


def _sample_at_positions(maps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """maps (Bm, H, W) at packed token positions (Bp, n, 3) -> (max(Bm, Bp), n): bilinear with the cell
    centres of ``F.interpolate(..., align_corners=False)`` on the grid the first image's ids span,
    border-clamped as it clamps; tokens of a later ``t`` (conditioning images) get 0."""
    positions = positions.to(maps.dtype)
    t, rows, cols = positions.unbind(-1)
    first = t == t.amin(dim=-1, keepdim=True)
    h = torch.where(first, rows, 0).amax(dim=-1, keepdim=True) + 1
    w = torch.where(first, cols, 0).amax(dim=-1, keepdim=True) + 1
    # normalised coordinates of the cell centres: x = 2 (col + 1/2) / w - 1 (grid_sample's convention)
    where = torch.stack((2 * (cols + 0.5) / w - 1, 2 * (rows + 0.5) / h - 1), dim=-1)[:, None]
    batch = max(maps.shape[0], where.shape[0])
    sampled = F.grid_sample(maps[:, None].expand(batch, -1, -1, -1), where.expand(batch, -1, -1, -1),
                            mode="bilinear", padding_mode="border", align_corners=False)[:, 0, 0]
    return sampled * first


def image_tokens(m_emb: torch.Tensor, placement: Placement, mode: str) -> torch.Tensor:
    """M_emb at the placement's image tokens: (n,) for one (H, W) map, else (B', n) with B' the
    batch the layer sees (B, or B * frames in a spatial layer of a video model)."""
    if placement.positions is not None:
        if mode != "bilinear":
            raise ValueError(f"mode={mode!r}: packed image tokens with positions (img_ids) are sampled bilinearly; "
                             "pass mode='bilinear', or the token grid as srdiff.fam_context(mfam, grid=(h, w))")
        if m_emb.dim() == 4:
            raise ValueError(f"a per-frame mfam {tuple(m_emb.shape)} needs a video model; this layer's image tokens "
                             "are packed image tokens")
        batched = m_emb.dim() == 3 or placement.positions.shape[0] > 1
        sampled = _sample_at_positions(m_emb if m_emb.dim() == 3 else m_emb[None], placement.positions)
        return sampled if batched else sampled[0]
    grid = placement.grid
    if len(grid) == 3:
        return _video_tokens(m_emb, grid, mode)
    if m_emb.dim() == 4:
        if placement.frames == 1:
            raise ValueError(f"a per-frame mfam {tuple(m_emb.shape)} (B, F, H, W) needs a video model; this layer "
                             "sees single images")
        if m_emb.shape[1] != placement.frames:
            raise ValueError(f"mfam holds {m_emb.shape[1]} frames per video but the model's input has "
                             f"{placement.frames}")
        return fam_to_tokens(m_emb.flatten(0, 1), grid, mode=mode)
    tokens = fam_to_tokens(m_emb, grid, mode=mode)
    if m_emb.dim() == 3 and placement.frames > 1:  # one map per video, the same for each of its frames
        tokens = tokens.repeat_interleave(placement.frames, dim=0)
    return tokens


def _video_tokens(m_emb: torch.Tensor, grid: tuple[int, int, int], mode: str) -> torch.Tensor:
    """Tokens of a (f, h, w) video grid, frame-major: a 2-d/3-d map on every frame; a per-frame map
    resized per frame, or in time too (``F.interpolate`` trilinear or area) when its frame count is
    not f (a temporal patch size > 1)."""
    f, h, w = grid
    if m_emb.dim() < 4:
        tokens = fam_to_tokens(m_emb, (h, w), mode=mode)
        return tokens.repeat(*([1] * (tokens.dim() - 1)), f)
    B, frames = m_emb.shape[:2]
    if frames == f:
        return fam_to_tokens(m_emb.flatten(0, 1), (h, w), mode=mode).reshape(B, f * h * w)
    resized = F.interpolate(m_emb[:, None], size=grid, mode="trilinear" if mode == "bilinear" else "area",
                            **({"align_corners": False} if mode == "bilinear" else {}))
    return resized.reshape(B, f * h * w)
