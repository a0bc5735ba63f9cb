"""srdiff.fam_to_tokens and srdiff.FAMProjection: srdiff's definition of M_emb."""

import pytest
import torch
import torch.nn.functional as F

import srdiff
from srdiff_testing import assert_close


def test_same_size_is_the_row_major_flattening():
    """Token t = row * w + col, the order diffusers flattens (B, C, H, W) feature maps in."""
    fam = torch.arange(12.0).view(3, 4)
    assert torch.equal(srdiff.fam_to_tokens(fam, (3, 4)), torch.arange(12.0))
    feature = fam[None, None]  # what an attention layer sees: (B, C, H, W) -> (B, H*W, C)
    assert torch.equal(feature.view(1, 1, 12).transpose(1, 2)[0, :, 0], srdiff.fam_to_tokens(fam, (3, 4)))


def test_bilinear_downsampling_uses_half_pixel_centres():
    """A 2x bilinear reduction with half-pixel centres (align_corners=False, no antialias) samples the
    centre between 2x2 pixels: the mean of each 2x2 block."""
    fam = torch.rand(2, 8, 6)
    blocks = fam.view(2, 4, 2, 3, 2).mean(dim=(2, 4))
    assert_close(srdiff.fam_to_tokens(fam, (4, 3)), blocks.flatten(1), dtype=torch.float32, reduce_dim=4)


def test_bilinear_matches_interpolate_at_odd_sizes():
    fam = torch.rand(3, 13, 7)
    want = F.interpolate(fam[:, None], size=(5, 9), mode="bilinear", align_corners=False)[:, 0].flatten(1)
    torch.testing.assert_close(srdiff.fam_to_tokens(fam, (5, 9)), want, rtol=0, atol=0)


def test_area_mode_averages_the_covered_pixels():
    fam = torch.rand(12, 12)
    want = fam.view(3, 4, 3, 4).mean(dim=(1, 3)).flatten()
    assert_close(srdiff.fam_to_tokens(fam, (3, 3), mode="area"), want, dtype=torch.float32, reduce_dim=16)


def test_extra_tokens_get_zero_and_come_first():
    fam = torch.rand(2, 4, 4) + 0.5
    tokens = srdiff.fam_to_tokens(fam, (2, 2), extra_tokens=3)
    assert tokens.shape == (2, 3 + 4)
    assert torch.equal(tokens[:, :3], torch.zeros(2, 3))
    assert torch.equal(tokens[:, 3:], srdiff.fam_to_tokens(fam, (2, 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_keeps_dtype_and_is_differentiable(dtype):
    fam = torch.rand(8, 8, dtype=dtype, requires_grad=True)
    tokens = srdiff.fam_to_tokens(fam, (4, 4))
    assert tokens.dtype == dtype and tokens.shape == (16,)
    tokens.float().sum().backward()
    # a 2x reduction: each token averages its 2x2 pixels with weight 1/4, so every pixel receives 1/4
    assert torch.equal(fam.grad, torch.full_like(fam, 0.25))


def _bad(case_id, error, match, **kwargs):
    return pytest.param(kwargs, error, match, id=case_id)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        _bad("rank", ValueError, r"fam must have 2 or 3 dims, got shape \(4,\)", fam=torch.rand(4)),
        _bad("int", TypeError, "fam must be a floating-point", fam=torch.ones(4, 4, dtype=torch.long)),
        _bad("grid", ValueError, r"grid must be two positive ints \(h, w\), got \(0, 4\)", grid=(0, 4)),
        _bad("grid-int", ValueError, r"grid must be two positive ints .* got 4", grid=4),
        _bad("mode", ValueError, r"mode must be one of \('bilinear', 'area'\), got 'nearest'",
             mode="nearest"),
        _bad("extra", ValueError, r"extra_tokens must be an int >= 0, got -1", extra_tokens=-1),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"fam": torch.rand(8, 8), "grid": (4, 4), **kwargs}
    with pytest.raises(error, match=match):
        srdiff.fam_to_tokens(args.pop("fam"), args.pop("grid"), **args)


class TestFAMProjection:
    def test_identity_at_initialisation(self):
        proj = srdiff.FAMProjection()
        for m in (torch.rand(16, 12), torch.rand(3, 16, 12)):
            assert torch.equal(proj(m), m)

    def test_channels_as_the_authors_code(self):
        convs = [m for m in srdiff.FAMProjection().modules() if isinstance(m, torch.nn.Conv2d)]
        assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 8), (8, 8), (8, 1)]

    @pytest.mark.parametrize("backend", ["reference", "triton"])
    def test_trains_through_the_attention_gradient(self, backend):
        """d(fam) from fam_attention reaches every projection parameter, and a step changes M_emb."""
        proj = srdiff.FAMProjection()
        mfam = torch.rand(8, 8)
        q, k, v = (torch.randn(2, 2, 16, 16) for _ in range(3))
        fam = srdiff.fam_to_tokens(proj(mfam), (4, 4))
        srdiff.fam_attention(q, k, v, fam, 0.5, backend=backend).square().sum().backward()
        grads = [p.grad for p in proj.parameters()]
        assert all(g is not None for g in grads)
        last = proj.net[-1]
        assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs() > 0
        torch.optim.SGD(proj.parameters(), lr=0.1).step()
        assert not torch.equal(proj(mfam), mfam)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match=r"hidden must be an int >= 1, got 0"):
            srdiff.FAMProjection(hidden=0)
        with pytest.raises(ValueError, match=r"m must have 2 or 3 dims, got shape \(1, 1, 4, 4\)"):
            srdiff.FAMProjection()(torch.rand(1, 1, 4, 4))
