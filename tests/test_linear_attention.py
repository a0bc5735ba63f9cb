"""srdiff.fam_linear_attention (Sana's ReLU linear attention, keys and values scaled inside the feature
map) against the naive oracle, forward and backward including d(fam); lam = 0 is Sana's own
computation; bad input.

reduce_dim is the longest reduction behind one element: the summary sum over Nk then the product over
D for the output (Nk * D), and for d(fam) the same times the (batch, head) pairs a fam entry serves.
"""

import pytest
import torch
import torch.nn.functional as F

import srdiff
from srdiff.reference import fam_linear_attention_ref
from srdiff_testing import DTYPES, assert_close, assert_no_worse_than_reference, strided

B, H = 2, 3
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _inputs(Nq, Nk, D, fam_shape, layout, dtype):
    q, k, v = (torch.randn(B, H, n, D).to(dtype) for n in (Nq, Nk, Nk))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif layout == "strided":
        q, k, v = (strided(t) for t in (q, k, v))
    fam = None if fam_shape is None else torch.rand({"N": (Nk,), "BN": (B, Nk), "BHN": (B, H, Nk)}[fam_shape])
    return [t.requires_grad_() for t in (q, k, v)] + [None if fam is None else fam.requires_grad_()]


def _run(fn, inputs, dtype, lam, do):
    ins = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*ins, lam)
    out.backward(do.to(out.dtype))
    return [out] + [None if t is None else t.grad for t in ins]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("Nq, Nk, D, fam_shape, lam, layout", [
    pytest.param(16, 16, 8, "BHN", 0.5, "contiguous", id="aligned-BHN"),
    pytest.param(17, 23, 12, "N", 0.025, "bnhd", id="odd-N-bnhd"),
    pytest.param(9, 9, 6, "BN", 0.5, "strided", id="odd-BN-strided"),
    pytest.param(9, 12, 8, None, 0.0, "contiguous", id="no-map"),
])
def test_matches_oracle(Nq, Nk, D, fam_shape, lam, layout, dtype):
    inputs = _inputs(Nq, Nk, D, fam_shape, layout, dtype)
    out = srdiff.fam_linear_attention(*inputs, lam)
    do = torch.randn_like(out)
    out.backward(do)
    got = [out] + [None if t is None else t.grad for t in inputs]
    want = _run(fam_linear_attention_ref, inputs, torch.float32, lam, do)
    truth = _run(fam_linear_attention_ref, inputs, torch.float64, lam, do)
    same = _run(lambda *a: fam_linear_attention_ref(*a, upcast=False), inputs, dtype, lam, do)
    fam = inputs[3]
    served = 1 if fam is None else B * H * Nk // fam.numel()
    reduce_dims = {"out": Nk * D, "dq": Nk * D, "dk": Nq * D, "dv": Nq, "dfam": Nq * D * served}
    for name, g, w, t, s in zip(reduce_dims, got, want, truth, same):
        if g is None:
            assert fam is None and name == "dfam"
            continue
        pass_ = "fwd" if name == "out" else "bwd"
        assert_close(g, w, dtype=dtype, pass_=pass_, reduce_dim=reduce_dims[name], name=name)
        assert_no_worse_than_reference(g, s, t, dtype=dtype, pass_=pass_, reduce_dim=reduce_dims[name], name=name)


def test_unmodulated_is_sanas_computation():
    """fam=None and lam=0 give diffusers' SanaLinearAttnProcessor2_0 arithmetic (value padded with a row
    of ones, (V K^T) Q, the last row the normaliser) to float32 rounding."""
    q, k, v = (torch.randn(B, H, 20, 8) for _ in range(3))
    vp = F.pad(v.transpose(2, 3), (0, 0, 0, 1), value=1.0)  # (B, H, D + 1, N)
    sana = (vp @ torch.relu(k)) @ torch.relu(q).transpose(2, 3)
    sana = (sana[:, :, :-1] / (sana[:, :, -1:] + 1e-15)).transpose(2, 3)
    for fam, lam in ((None, 0.0), (torch.rand(20), 0.0)):
        assert_close(srdiff.fam_linear_attention(q, k, v, fam, lam), sana, dtype=torch.float32, reduce_dim=20 * 8)


def test_scales_key_features_and_values():
    """A key j with fam_j = 1 at lam = 1 counts as two copies of itself in the numerator's weights (s^2 = 4)
    and the normaliser's (s = 2) would not: the oracle's definition, spelled out for one query."""
    q, k, v = torch.rand(1, 1, 1, 4), torch.rand(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    fam = torch.tensor([1.0, 0.0, 0.0])
    a = (q @ k.transpose(-2, -1))[0, 0, 0]
    want = (4 * a[0] * v[0, 0, 0] + a[1] * v[0, 0, 1] + a[2] * v[0, 0, 2]) / (2 * a[0] + a[1] + a[2] + 1e-15)
    assert_close(srdiff.fam_linear_attention(q, k, v, fam, 1.0)[0, 0, 0], want, dtype=torch.float32, reduce_dim=12)


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.rand(5), 0.5), ValueError,
     r"fam must have shape \(Nk,\), \(B, Nk\) or \(B, H, Nk\) = \(4,\)"),
    ((torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.full((4,), -3.0), 0.5),
     ValueError, r"1 \+ lam \* fam must be > 0"),
    ((torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), None, float("nan")), ValueError,
     r"lam must be finite, got nan"),
    ((torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8).double(), torch.randn(2, 2, 4, 8), None, 0.0), TypeError,
     r"k dtype torch.float64 must equal q dtype torch.float32"),
    ((torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8), None, 0.0), ValueError,
     r"q must have 4 dims, got shape \(2, 4, 8\)"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        srdiff.fam_linear_attention(*args)
    with pytest.raises(ValueError, match=r"eps must be a number >= 0, got -1"):
        srdiff.fam_linear_attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)), eps=-1)
