"""srdiff.fam_attention: the Triton kernels (under TRITON_INTERPRET=1 on CPU) and the SDPA path against
the naive oracle, forward and backward including d(fam); SDPA equivalence at lam = 0; bad input.

Tolerances come from tests/utils.py. reduce_dim is the longest reduction behind one element: D for
the forward output, Nk for dq, Nq for dk and dv, and for d(fam) Nq * D times the number of (batch,
head) pairs summed (ds_j = sum_i sum_d of products: k_j . (sum_i dx_ij q_i) in the kernel, autograd's
sum over (B, H, D) of s-scaled K/V gradients on the SDPA path). ``assert_no_worse_than_reference``
measures both the kernel and the same-dtype PyTorch reference against a float64 oracle, with the
float32 reordering floor of the same reduce_dim.

Under the interpreter bf16 ``tl.dot`` is emulated (the kernels widen bf16 tiles to float32 behind a
launcher flag) and fp32 -> bf16 casts truncate instead of rounding to nearest, so the bf16 cases here
see up to twice the rounding error a GPU run has; they pass the same table nonetheless.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import srdiff
import srdiff.kernels.fam_attention as kernels
from srdiff.reference import fam_attention_ref, fam_attention_sdpa
from srdiff_testing import DTYPES, assert_close, assert_no_worse_than_reference, strided

B, H = 2, 3
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FAM_SHAPES = {
    "none": None,
    "N": lambda batch, Nk: (Nk,),
    "BN": lambda batch, Nk: (batch, Nk),
    "BHN": lambda batch, Nk: (batch, H, Nk),
    "1HN": lambda batch, Nk: (1, H, Nk),
}


def _case(Nq, Nk, D, fam, lam, layout, dtype, marks=()):
    dt = DTYPE_IDS[dtype]
    return pytest.param(Nq, Nk, D, fam, lam, layout, dtype, marks=marks,
                        id=f"Nq{Nq}-Nk{Nk}-D{D}-fam{fam}-lam{lam}-{layout}-{dt}")


# A covering set, not the full cross product (the interpreter needs ~1 s per case): every dtype meets
# both shapes and both head dims; each fam shape, lam and layout appears with several dtypes.
KERNEL_CASES = [
    _case(17, 17, 64, "BHN", 0.5, "contiguous", torch.float32),
    _case(33, 20, 40, "N", 0.025, "bnhd", torch.float32),
    _case(17, 17, 40, "none", 0.0, "bnhd", torch.float32),
    _case(33, 20, 64, "1HN", 0.5, "strided", torch.float32),
    _case(17, 17, 40, "BN", 0.5, "bnhd", torch.float16),
    _case(33, 20, 64, "BHN", 0.025, "contiguous", torch.float16),
    _case(17, 17, 64, "N", 0.0, "contiguous", torch.float16),
    _case(33, 20, 40, "BHN", 0.5, "bnhd", torch.float16),
    _case(17, 17, 64, "N", 0.5, "bnhd", torch.bfloat16),
    _case(33, 20, 40, "BN", 0.025, "contiguous", torch.bfloat16),
    _case(17, 17, 40, "1HN", 0.025, "contiguous", torch.bfloat16),
    _case(33, 20, 64, "none", 0.0, "bnhd", torch.bfloat16),
]


@pytest.fixture(autouse=True)
def _one_config_per_kernel(monkeypatch):
    """No autotuning here (each config is a compile): the kernels run their smallest kept config
    (the interpreter its own); test_every_kept_config* pin each kept config in turn and
    test_triton_autotuned_cuda covers the tuned path."""
    monkeypatch.setenv("SRDIFF_AUTOTUNE", "0")


TUNED_KERNELS = {
    "fwd": kernels._fam_attention_fwd_kernel,
    "dkdv": kernels._fam_attention_bwd_dkdv_kernel,
    "dq": kernels._fam_attention_bwd_dq_kernel,
}


def _kept_config_cases(dtype, D, marks=(), distinct_blocks=False):
    """One case per kept config of each autotuned kernel for ``dtype`` at head dim ``D``; with
    ``distinct_blocks`` one per block shape (the interpreter ignores warps and stages)."""
    cases = {}
    for name, kernel in TUNED_KERNELS.items():
        for config in kernels.kept_configs(kernel, dtype, D):
            blocks = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
            key = (name, blocks) if distinct_blocks else (name, blocks, config.num_warps, config.num_stages,
                                                          config.maxnreg)
            case_id = f"{name}-{DTYPE_IDS[dtype]}-D{D}-{blocks}" + (
                "" if distinct_blocks else f"-w{config.num_warps}-s{config.num_stages}"
                + ("" if config.maxnreg is None else f"-r{config.maxnreg}"))
            cases.setdefault(key, pytest.param(name, config, dtype, D, marks=marks, id=case_id))
    return list(cases.values())


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, H, N, D) values in the requested memory layout."""
    if layout == "bnhd":  # what diffusers hands over: a (B, N, H, D) buffer viewed as (B, H, N, D)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":
        return strided(t)
    return t


def _inputs(Nq, Nk, D, fam_shape, layout, dtype, device="cpu", batch=B):
    q = _layout(torch.randn(batch, H, Nq, D, device=device).to(dtype), layout).requires_grad_()
    k = _layout(torch.randn(batch, H, Nk, D, device=device).to(dtype), layout).requires_grad_()
    v = _layout(torch.randn(batch, H, Nk, D, device=device).to(dtype), layout).requires_grad_()
    shape = FAM_SHAPES[fam_shape]
    fam = None if shape is None else torch.rand(shape(batch, Nk), device=device).requires_grad_()
    return q, k, v, fam


def _forward_backward(fn, q, k, v, fam, lam, do, dtype):
    """Output and gradients of ``fn`` run on detached copies of the inputs cast to ``dtype``."""
    ins = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (q, k, v, fam)]
    out = fn(*ins, lam)
    out.backward(do.to(out.dtype))
    return [out] + [None if t is None else t.grad for t in ins]


def _check_against_oracle(q, k, v, fam, lam, dtype, run, table=True):
    """``run(q, k, v, fam, lam)`` against the fp32 oracle (table; unless not ``table``) and the fp64 one
    (no worse than the same-dtype reference), forward and every gradient."""
    Nq, D, Nk = q.shape[2], q.shape[3], k.shape[2]
    out = run(q, k, v, fam, lam)
    do = torch.randn_like(out)
    out.backward(do)
    got = [out] + [None if t is None else t.grad for t in (q, k, v, fam)]
    want32 = _forward_backward(fam_attention_ref, q, k, v, fam, lam, do, torch.float32)
    def naive(*args):
        return fam_attention_ref(*args, upcast=False)

    truth = _forward_backward(naive, q, k, v, fam, lam, do, torch.float64)
    same = _forward_backward(naive, q, k, v, fam, lam, do, dtype)
    summed = 1 if fam is None else q.shape[0] * q.shape[1] * Nk // fam.numel()
    reduce_dims = {"out": D, "dq": Nk, "dk": Nq, "dv": Nq, "dfam": Nq * D * summed}
    for name, g, w32, w64, wsame in zip(reduce_dims, got, want32, truth, same):
        if g is None:
            assert fam is None and name == "dfam"
            continue
        pass_ = "fwd" if name == "out" else "bwd"
        assert g.dtype == (q.dtype if name != "dfam" else fam.dtype), name
        if table:
            assert_close(g, w32, dtype=dtype, pass_=pass_, reduce_dim=reduce_dims[name], name=name)
        assert_no_worse_than_reference(g, wsame, w64, dtype=dtype, pass_=pass_, reduce_dim=reduce_dims[name],
                                       name=name)


@pytest.mark.parametrize("Nq, Nk, D, fam_shape, lam, layout, dtype", KERNEL_CASES)
def test_triton_matches_oracle(Nq, Nk, D, fam_shape, lam, layout, dtype):
    q, k, v, fam = _inputs(Nq, Nk, D, fam_shape, layout, dtype)

    def run(q, k, v, fam, lam):
        return srdiff.fam_attention(q, k, v, fam, lam, backend="triton")

    _check_against_oracle(q, k, v, fam, lam, dtype, run)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("Nq, Nk, D, fam_shape, lam, layout, dtype", KERNEL_CASES)
def test_triton_matches_oracle_cuda(Nq, Nk, D, fam_shape, lam, layout, dtype):
    q, k, v, fam = _inputs(Nq, Nk, D, fam_shape, layout, dtype, device="cuda")
    _check_against_oracle(q, k, v, fam, lam, dtype, lambda *a: srdiff.fam_attention(*a, backend="triton"))


@pytest.mark.needs_cuda
@pytest.mark.parametrize(
    "Nq, Nk, D, dtype",
    [
        pytest.param(1000, 1000, 80, torch.float16, id="Nq1000-Nk1000-D80-fp16"),
        pytest.param(257, 77, 160, torch.bfloat16, id="Nq257-Nk77-D160-bf16"),
        pytest.param(4096, 4096, 128, torch.bfloat16, id="Nq4096-Nk4096-D128-bf16"),
        pytest.param(1000, 1000, 256, torch.float32, id="Nq1000-Nk1000-D256-fp32"),
        pytest.param(77, 257, 16, torch.float16, id="Nq77-Nk257-D16-fp16"),
        pytest.param(1000, 333, 256, torch.bfloat16, id="Nq1000-Nk333-D256-bf16"),
    ],
)
def test_triton_head_dims_cuda(Nq, Nk, D, dtype):
    q, k, v, fam = _inputs(Nq, Nk, D, "BN", "bnhd", dtype, device="cuda")
    _check_against_oracle(q, k, v, fam, 0.025, dtype, lambda *a: srdiff.fam_attention(*a, backend="triton"))


@pytest.mark.needs_cuda
def test_triton_autotuned_cuda(monkeypatch):
    """The default path users get: every fitting config compiled and timed, the fastest kept."""
    monkeypatch.delenv("SRDIFF_AUTOTUNE")
    q, k, v, fam = _inputs(1000, 1000, 64, "BN", "contiguous", torch.bfloat16, device="cuda")
    _check_against_oracle(q, k, v, fam, 0.025, torch.bfloat16,
                          lambda *a: srdiff.fam_attention(*a, backend="triton"))


def _run_pinned(name, config, dtype, D, Nq, Nk, device, batch=B):
    """A full forward and backward with ``config`` pinned on one kernel, against the oracle; the
    other kernels run their largest kept config (few programs: the interpreter runs them one by
    one). Nq and Nk exceed every block size, so full and ragged blocks both run."""
    q, k, v, fam = _inputs(Nq, Nk, D, "BHN", "bnhd", dtype, device=device, batch=batch)
    with contextlib.ExitStack() as pins:
        for other, kernel in TUNED_KERNELS.items():
            pins.enter_context(kernels.pinned_config(
                kernel, config if other == name else kernels.kept_configs(kernel, dtype, D)[0]))
        _check_against_oracle(q, k, v, fam, 0.5, dtype, lambda *a: srdiff.fam_attention(*a, backend="triton"))


@pytest.mark.parametrize("name, config, dtype, D", _kept_config_cases(torch.float16, 32, distinct_blocks=True))
def test_every_kept_config_matches_oracle(name, config, dtype, D):
    """Every candidate block shape of every autotuned kernel (all are kept for fp16 at D = 32) under
    the interpreter: tiling, ragged tails and masks, not what only a GPU compile sees."""
    _run_pinned(name, config, dtype, D, 130, 131, "cpu", batch=1)


@pytest.mark.needs_cuda
@pytest.mark.parametrize(
    "name, config, dtype, D",
    [case for dtype, D in [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float16, 128), (torch.float16, 80),
                           (torch.bfloat16, 40), (torch.bfloat16, 160), (torch.bfloat16, 256), (torch.float32, 128)]
     for case in _kept_config_cases(dtype, D)],
)
def test_every_kept_config_matches_oracle_cuda(name, config, dtype, D):
    """What the autotuner may pick on a GPU: each kept config, compiled and run, against the oracle."""
    _run_pinned(name, config, dtype, D, 1000, 777, "cuda")


def test_autotune_off_runs_one_config_without_benchmarking(monkeypatch):
    """SRDIFF_AUTOTUNE=0 launches the JIT function with the smallest kept config: the autotuner
    (which would time every kept config) is never entered."""
    monkeypatch.setattr(kernels, "triton_interpreting", lambda: False)
    ran = []
    for kernel in TUNED_KERNELS.values():
        monkeypatch.setattr(kernel, "run", lambda *a, **kw: pytest.fail("the autotuner ran"))
        fn_run = kernel.fn.run
        monkeypatch.setattr(kernel.fn, "run", lambda *a, _run=fn_run, **kw: ran.append(kw["BLOCK_M"]) or _run(*a, **kw))
    q, k, v, _ = _inputs(33, 20, 16, "none", "contiguous", torch.float16)  # no map: its FMA is GPU code
    srdiff.fam_attention(q, k, v, backend="triton").sum().backward()
    smallest = [kernels.kept_configs(kernel, torch.float16, 16, has_fam=False)[-1].kwargs["BLOCK_M"]
                for kernel in TUNED_KERNELS.values()]
    assert ran == smallest


def test_autotune_key_is_bucketed():
    """The tuned choice is keyed on the next powers of two of Nq and Nk (not the exact lengths)."""
    for kernel in TUNED_KERNELS.values():
        assert kernel.keys[:2] == ["Nq_bucket", "Nk_bucket"]
    assert kernels._sequence_buckets(1000, 1025) == (1024, 2048)


@pytest.mark.needs_cuda
def test_autotune_tunes_once_per_bucket_cuda(monkeypatch):
    monkeypatch.delenv("SRDIFF_AUTOTUNE")
    fwd = kernels._fam_attention_fwd_kernel
    for n in (1000, 1020, 1024):
        q, k, v, fam = _inputs(n, n, 64, "BN", "contiguous", torch.bfloat16, device="cuda")
        srdiff.fam_attention(q, k, v, fam, 0.5, backend="triton")
    keys = [key for key in fwd.cache if key[:2] == (1024, 1024) and key[2] == 64]
    assert len(keys) == 1, keys


def test_grid_folds_batch_and_heads_into_axis_0():
    """B * H beyond grid axis 1's 65,535 programs: the launch grid is one axis of up to 2^31 - 1."""
    assert kernels.fold_grid(4096, 128, 70_000) == (32 * 70_000,)
    assert kernels.fold_grid(1, 16, 65_537) == (65_537,)
    with pytest.raises(ValueError, match=r"B \* H \* cdiv\(N, 16\) must be <= 2147483647 programs, "
                       r"got 32768 \* cdiv\(1048576, 16\) = 2147483648"):
        kernels.fold_grid(16 * 2**16, 16, 2**15)


@pytest.mark.needs_cuda
def test_triton_beyond_65535_batch_heads_cuda():
    q, k, v = (torch.randn(65_537, 1, n, 16, device="cuda", dtype=torch.float16, requires_grad=True)
               for n in (3, 5, 5))
    fam = torch.rand(65_537, 5, device="cuda", requires_grad=True)
    out = srdiff.fam_attention(q, k, v, fam, 0.5, backend="triton")
    out.float().sum().backward()
    ref_ins = [t.detach().requires_grad_() for t in (q, k, v, fam)]
    ref = fam_attention_ref(*ref_ins, 0.5)
    ref.sum().backward()
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out, q.grad, k.grad, v.grad], [ref, *(t.grad for t in ref_ins)]):
        assert_close(got, want, dtype=torch.float16, pass_="fwd" if name == "out" else "bwd", reduce_dim=5, name=name)
    assert_close(fam.grad, ref_ins[3].grad, dtype=torch.float16, pass_="bwd", reduce_dim=3 * 16, name="dfam")


DQ_ATOMIC_CASES = [KERNEL_CASES[i] for i in (0, 3, 7, 9)]  # fp32, fp32 strided, fp16, bf16; ragged and aligned


@pytest.mark.parametrize("Nq, Nk, D, fam_shape, lam, layout, dtype", DQ_ATOMIC_CASES)
def test_triton_dq_atomic_matches_oracle(Nq, Nk, D, fam_shape, lam, layout, dtype):
    """deterministic=False: dq accumulated with float32 atomics in the dK/dV pass."""
    q, k, v, fam = _inputs(Nq, Nk, D, fam_shape, layout, dtype)

    def run(q, k, v, fam, lam):
        return srdiff.fam_attention(q, k, v, fam, lam, backend="triton", deterministic=False)

    _check_against_oracle(q, k, v, fam, lam, dtype, run)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("Nq, Nk, D, fam_shape, lam, layout, dtype", KERNEL_CASES)
def test_triton_dq_atomic_matches_oracle_cuda(Nq, Nk, D, fam_shape, lam, layout, dtype):
    q, k, v, fam = _inputs(Nq, Nk, D, fam_shape, layout, dtype, device="cuda")
    _check_against_oracle(q, k, v, fam, lam, dtype,
                          lambda *a: srdiff.fam_attention(*a, backend="triton", deterministic=False))


def _large_logit_inputs(dtype, logit, device="cpu"):
    """q, k, v and a [0, 1] map whose logits reach about +-``logit`` (scale 1 / sqrt(D))."""
    q, k, v, fam = _inputs(33, 41, 32, "BN", "bnhd", dtype, device=device)
    with torch.no_grad():
        q.mul_(logit / 4)  # |q.k| / sqrt(32) of unit normals stays within ~4
    return q, k, v, fam


# float16 up to G = log2(e) |logit| (s_max - s_min) ~ 13 <= its E = 15; bfloat16 to G ~ 100 (E = 0).
# (float32 takes the exact row max.)
LARGE_LOGIT_CASES = [pytest.param(torch.float16, 1.0, 9.0, id="fp16-lam1-logit9"),
                     pytest.param(torch.bfloat16, 2.0, 35.0, id="bf16-lam2-logit35")]


@pytest.mark.parametrize("dtype, lam, logit", LARGE_LOGIT_CASES)
def test_row_bound_keeps_large_logits_exact(dtype, lam, logit):
    """The forward's reference (an upper bound from the raw q.k row max and the map's range) sits
    up to G above the largest logit; within the range the module docstring derives, the result
    is as exact as the standard kernel's, forward and backward: no worse than the same-dtype
    reference against float64. (The table's absolute tolerances assume O(1) values; these inputs
    are scaled up, and so are their gradients.)"""
    q, k, v, fam = _large_logit_inputs(dtype, logit)
    _check_against_oracle(q, k, v, fam, lam, dtype, lambda *a: srdiff.fam_attention(*a, backend="triton"),
                          table=False)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype, lam, logit", LARGE_LOGIT_CASES)
def test_row_bound_keeps_large_logits_exact_cuda(dtype, lam, logit):
    q, k, v, fam = _large_logit_inputs(dtype, logit, device="cuda")
    _check_against_oracle(q, k, v, fam, lam, dtype, lambda *a: srdiff.fam_attention(*a, backend="triton"),
                          table=False)


# The "sdpa" path: K and V scaled by the fused prescale kernels (interpreted here), then SDPA.
SDPA_PATH_CASES = [KERNEL_CASES[i] for i in (1, 3, 4, 9, 11)]  # fp32 N, 1HN strided; fp16 BN; bf16 BN, none


@pytest.mark.parametrize("Nq, Nk, D, fam_shape, lam, layout, dtype", SDPA_PATH_CASES)
def test_sdpa_backend_matches_oracle(Nq, Nk, D, fam_shape, lam, layout, dtype):
    q, k, v, fam = _inputs(Nq, Nk, D, fam_shape, layout, dtype)
    _check_against_oracle(q, k, v, fam, lam, dtype, lambda *a: srdiff.fam_attention(*a, backend="sdpa"))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("Nq, Nk, D, fam_shape, lam, layout, dtype", KERNEL_CASES)
def test_sdpa_backend_matches_oracle_cuda(Nq, Nk, D, fam_shape, lam, layout, dtype):
    q, k, v, fam = _inputs(Nq, Nk, D, fam_shape, layout, dtype, device="cuda")
    _check_against_oracle(q, k, v, fam, lam, dtype, lambda *a: srdiff.fam_attention(*a, backend="sdpa"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_prescale_rounds_like_the_reference(dtype):
    """One rounding of the float32 product s * k, as the reference's ops (bfloat16 is left out: the
    interpreter truncates float32 -> bfloat16 casts); the output keeps the (B, N, H, D) layout."""
    from srdiff.kernels.fam_prescale import fam_prescale_fwd

    _, k, v, fam = _inputs(5, 37, 40, "BN", "bnhd", dtype)
    ks, vs = fam_prescale_fwd(k.detach(), v.detach(), fam.detach()[:, None], 0.5)
    s = (1 + 0.5 * fam.detach())[:, None, :, None]
    assert torch.equal(ks, torch.mul(k, s).to(dtype)) and torch.equal(vs, torch.mul(v, s).to(dtype))
    assert ks.transpose(1, 2).is_contiguous() and vs.transpose(1, 2).is_contiguous()


@pytest.mark.needs_cuda
def test_opcheck_prescale_cuda():
    from srdiff.kernels.fam_prescale import fam_prescale_bwd, fam_prescale_fwd

    _, k, v, fam = (t.detach() for t in _inputs(3, 65, 40, "BN", "bnhd", torch.float16, device="cuda"))
    torch.library.opcheck(fam_prescale_fwd, (k, v, fam[:, None], 0.5))
    dks, dvs = torch.randn_like(k), torch.randn_like(v)
    torch.library.opcheck(fam_prescale_bwd, (dks, dvs, k, v, fam[:, None], 0.5, True))


def test_dispatch_table_is_well_formed():
    """The stored table names a path per direction and, per measured case, both paths' times and the
    faster of them."""
    from srdiff.attention import DISPATCH

    assert {DISPATCH["default"][d] for d in ("fwd", "fwd+bwd")} <= {"triton", "sdpa"}
    for e in DISPATCH["measured"]:
        assert e["mode"] in ("fwd", "fwd+bwd") and e["D"] > 0 and e["N"] > 0, e
        assert e["faster"] == min(("triton", "sdpa"), key=lambda p: e[f"{p}_ms"]), e


def test_choose_path_nearest_measured_default_and_memory():
    from srdiff.attention import choose_path

    entry = {"capability": "9.0", "dtype": "bfloat16", "mode": "fwd"}
    table = {"default": {"fwd": "sdpa", "fwd+bwd": "triton"},
             "measured": [{**entry, "D": 128, "N": 1024, "faster": "triton"},
                          {**entry, "D": 128, "N": 16384, "faster": "sdpa"},
                          {**entry, "D": 64, "N": 16384, "faster": "triton"}]}

    def path(capability="9.0", dtype=torch.bfloat16, D=128, N=4096, direction="fwd", fits=True):
        return choose_path(table, capability, dtype, D, N, direction, fits)

    assert path(N=2048) == "triton" and path(N=8192) == "sdpa"  # the nearest N (log scale)
    assert path(D=40, N=16384) == "triton"  # the nearest D
    assert path(capability="8.0") == "sdpa" and path(dtype=torch.float16) == "sdpa"  # unmeasured: default
    assert path(direction="fwd+bwd") == "triton"
    assert path(N=8192, fits=False) == "triton"  # s*K and s*V would not fit


def test_default_path_on_cpu_and_without_a_map():
    from srdiff.attention import attention_path

    q = torch.randn(1, 2, 5, 16)
    assert attention_path(q, q, modulated=True, needs_grad=True) == "reference"


@pytest.mark.needs_cuda
@pytest.mark.parametrize("faster", ["triton", "sdpa"])
def test_default_backend_follows_the_table_cuda(monkeypatch, faster):
    from srdiff import attention

    q, k, v, fam = _inputs(65, 65, 64, "BN", "contiguous", torch.bfloat16, device="cuda")
    table = {"default": {"fwd": faster, "fwd+bwd": faster}, "measured": []}
    monkeypatch.setattr(attention, "DISPATCH", table)
    taken = []
    monkeypatch.setattr(attention, "_prescaled_sdpa",
                        lambda *a: taken.append("sdpa") or fam_attention_sdpa(*a[:5]))
    monkeypatch.setattr(kernels.FAMAttentionFunction, "apply", lambda *a: taken.append("triton") or a[0])
    srdiff.fam_attention(q, k, v, fam, 0.5)
    srdiff.fam_attention(q, k, v, None, 0.5)  # no map: plain SDPA whatever the table says
    assert taken == [faster, "sdpa"]


@pytest.mark.parametrize("D", [16, 80, 160, 256])
def test_triton_padded_head_dims(D):
    """Head dims at both ends of the range and the non-powers of two SD-style U-Nets use (padded to
    the next power of two inside the kernel)."""
    q, k, v, fam = _inputs(17, 9, D, "BHN", "contiguous", torch.float16)
    _check_against_oracle(q, k, v, fam, 0.5, torch.float16,
                          lambda *a: srdiff.fam_attention(*a, backend="triton"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("fam_shape", ["none", "N", "BN", "BHN", "1HN"])
@pytest.mark.parametrize("layout", ["contiguous", "bnhd"])
def test_sdpa_path_matches_oracle(fam_shape, layout, dtype):
    """The CPU path (K and V prescaled once, then SDPA)."""
    q, k, v, fam = _inputs(33, 20, 40, fam_shape, layout, dtype)
    _check_against_oracle(q, k, v, fam, 0.5, dtype, lambda *a: srdiff.fam_attention(*a, backend="reference"))


@pytest.mark.parametrize("fam_shape", ["N", "BHN"])
def test_masked_path_equals_attention_over_the_kept_keys(fam_shape):
    """fam_attention_masked (the processors' masked layers): keys a boolean mask drops do not count, so the
    result is the oracle over the kept keys alone; the arguments are checked as fam_attention's are."""
    from srdiff.attention import fam_attention_masked

    q, k, v, fam = _inputs(9, 13, 16, fam_shape, "contiguous", torch.float32)
    kept = 7
    mask = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2], dtype=torch.bool)
    mask[..., :kept] = True
    out = fam_attention_masked(q, k, v, fam, 0.5, mask)
    want = fam_attention_ref(q, k[:, :, :kept], v[:, :, :kept], fam[..., :kept], 0.5)
    assert_close(out, want, dtype=torch.float32, reduce_dim=kept, name="out")
    with pytest.raises(TypeError, match=r"k dtype torch.float16 must equal q dtype torch.float32"):
        fam_attention_masked(q, k.half(), v, fam, 0.5, mask)
    with pytest.raises(ValueError, match=r"lam must be finite, got inf"):
        fam_attention_masked(q, k, v, fam, float("inf"), mask)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_unmodulated_is_exactly_sdpa_on_cpu(backend, dtype):
    q, k, v, fam = _inputs(33, 20, 40, "BN", "bnhd", dtype)
    want = F.scaled_dot_product_attention(q, k, v)
    for f, lam in [(None, 0.5), (fam.detach(), 0.0), (fam, 0.0)]:
        got = srdiff.fam_attention(q, k, v, f, lam, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_triton_unmodulated_matches_sdpa(dtype):
    """lam = 0 runs the unmodulated kernels; fam still gets its (zero) gradient."""
    q, k, v, fam = _inputs(33, 20, 64, "BN", "bnhd", dtype)
    out = srdiff.fam_attention(q, k, v, fam, 0.0, backend="triton", scale=0.3)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.3)
    assert_close(out, want, dtype=dtype, reduce_dim=64)
    out.sum().backward()
    assert torch.equal(fam.grad, torch.zeros_like(fam))


def test_output_keeps_the_diffusers_layout():
    """A (B, N, H, D) buffer in gives a (B, N, H, D) buffer out: the caller's transpose back is free."""
    q, k, v, fam = _inputs(17, 17, 16, "N", "bnhd", torch.float16)
    out = srdiff.fam_attention(q, k, v, fam, 0.5, backend="triton")
    assert out.transpose(1, 2).is_contiguous()
    out = srdiff.fam_attention(q.contiguous(), k, v, fam, 0.5, backend="triton")
    assert out.is_contiguous()


def test_fam_scales_keys_and_values():
    """The semantics in one line: modulating with fam equals attending to s*K, s*V."""
    q, k, v, _ = _inputs(20, 20, 16, "none", "contiguous", torch.float64)
    fam = torch.rand(B, H, 20, dtype=torch.float64)
    s = 1 + 0.5 * fam[..., None]
    want = F.scaled_dot_product_attention(q, k * s, v * s)
    got = fam_attention_sdpa(q, k, v, fam, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    naive = fam_attention_ref(q, k, v, fam, 0.5, upcast=False)
    torch.testing.assert_close(naive, want, rtol=1e-12, atol=1e-12)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", [None, "triton", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_compile_fullgraph_cuda(dtype, backend):
    """The dispatch and both paths trace without graph breaks."""
    q, k, v, fam = _inputs(257, 130, 80, "BN", "bnhd", dtype, device="cuda")

    def step(q, k, v, fam):
        return srdiff.fam_attention(q, k, v, fam, 0.025, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(q, k, v, fam)
    out.float().square().sum().backward()
    got = [out, q.grad, k.grad, v.grad, fam.grad]
    for t in (q, k, v, fam):
        t.grad = None
    out = step(q, k, v, fam)
    out.float().square().sum().backward()
    want = [out, q.grad, k.grad, v.grad, fam.grad]
    # The fused forward is the same kernel on the same inputs with the same config: bit for bit (the
    # SDPA paths may meet another SDPA backend under torch.compile, which keeps torch's order). The
    # gradients start from the loss gradient 2 * out, which inductor computes with its own kernels
    # (and FMA contraction), so they are compared as the same math with the shared table.
    if backend == "triton":
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, msg="out")
    else:
        assert_close(got[0], want[0], dtype=dtype, reduce_dim=80, name="out")
    reduce_dims = {"dq": 130, "dk": 257, "dv": 257, "dfam": 257 * 80 * 3}
    for (name, reduce_dim), g, w in zip(reduce_dims.items(), got[1:], want[1:]):
        assert_close(g, w, dtype=dtype, pass_="bwd", reduce_dim=reduce_dim, name=name)


def test_compile_fullgraph_cpu_path():
    """The checks and the CPU path trace without graph breaks. (The Triton path cannot be traced on
    the CPU: under TRITON_INTERPRET=1 torch's wrap_triton hands back the bare interpreted kernel, so
    fake-tensor tracing would launch it; test_compile_fullgraph_cuda covers it.)"""
    q, k, v, fam = _inputs(33, 20, 40, "BN", "bnhd", torch.float32)

    def step(q, k, v, fam):
        return srdiff.fam_attention(q, k, v, fam, 0.5)

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, fam)
    out.sum().backward()
    got = [out, q.grad, k.grad, v.grad, fam.grad]
    for t in (q, k, v, fam):
        t.grad = None
    want = step(q, k, v, fam)
    want.sum().backward()
    for name, g, w in zip(["out", "dq", "dk", "dv", "dfam"], got, [want, q.grad, k.grad, v.grad, fam.grad]):
        assert_close(g, w, dtype=torch.float32, pass_="fwd" if name == "out" else "bwd", name=name)


# Run in a fresh interpreter without TRITON_INTERPRET (the test session has it on): compiles the
# kernels ahead of time for sm_90 with the ptxas triton ships, which needs no GPU, from the launchers'
# own arguments, so with the JIT's pointer-alignment and stride-divisibility specialisation.
_SM90_COMPILE = """
import torch
from srdiff_bench.compile_sm90 import captured_launches, compile_as_jit, load_widths
import srdiff.kernels.fam_attention as K

for dtype, head_dim, every_config in [(torch.bfloat16, 128, True), (torch.bfloat16, 40, False),
                                      (torch.float32, 64, False)]:
    for kernel, args, meta in captured_launches(dtype, head_dim):
        kept = K.kept_configs(kernel, dtype, head_dim)
        for config in kept if every_config else kept[:1]:
            compiled = compile_as_jit(kernel.fn, args, {**meta, **K.config_options(config)})
            case = (kernel.fn.__name__, dtype, head_dim, str(config))
            estimate, shared = K.shared_memory_estimate(kernel, config, dtype, head_dim), compiled.metadata.shared
            assert shared <= 227 * 1024, (case, shared)
            loads = load_widths(compiled.asm["ptx"])
            if dtype != torch.float32:  # float32 always runs the fallback: no estimate, no pipelining
                assert shared <= estimate, (case, shared, estimate)
                if config is kept[0]:  # the largest kept tiles: the estimate is Triton's allocation
                    assert estimate - 1024 <= shared, (case, shared, estimate)
                assert loads.get("cp.async 16B", 0) > 0 and "ld.global 2B" not in loads, (case, loads)
            print(case, shared, loads)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter checks the numerics, not what only a GPU compile sees (layouts, shared memory,
    load widths): compile for sm_90 as the JIT would every kept config at bf16 D = 128 (the largest
    tiles), the first kept config at D = 40 and the float32 exact-dot fallback. Each config's shared
    memory must be within the prune's estimate and Hopper's 227 KiB, and equal to the estimate (to
    within Triton's 1 KiB of barriers) for the largest kept tiles, where the budget binds; bf16
    tiles, D = 40 included, must load with 16-byte pipelined copies."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "benchmarks"), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                          timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.needs_cuda
def test_opcheck_cuda():
    from srdiff.kernels.fam_attention import fam_attention_bwd, fam_attention_fwd

    q, k, v, fam = (t.detach() for t in _inputs(65, 33, 40, "BN", "bnhd", torch.float16, device="cuda"))
    fam3 = fam[:, None]
    torch.library.opcheck(fam_attention_fwd, (q, k, v, fam3, 0.5, 0.2))
    o, lse2 = fam_attention_fwd(q, k, v, fam3, 0.5, 0.2)
    torch.library.opcheck(fam_attention_bwd, (torch.randn_like(o), q, k, v, fam3, o, lse2, 0.5, 0.2, True))


@pytest.mark.needs_cuda
def test_triton_is_deterministic_cuda():
    q, k, v, fam = _inputs(1000, 700, 64, "BN", "contiguous", torch.bfloat16, device="cuda")
    runs = []
    for _ in range(2):
        for t in (q, k, v, fam):
            t.grad = None
        out = srdiff.fam_attention(q, k, v, fam, 0.5, backend="triton")
        out.sum().backward()
        runs.append([out, q.grad, k.grad, v.grad, fam.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_capabilities_agree_with_the_kernels():
    """srdiff.attention restates the kernels' limits so that checking never imports triton."""
    from srdiff import attention
    from srdiff.kernels import fam_attention as kernels

    assert attention.TRITON_HEAD_DIMS == (kernels.MIN_HEAD_DIM, kernels.MAX_HEAD_DIM)
    assert attention.SUPPORTED_DTYPES == kernels.SUPPORTED_DTYPES


def test_default_backend_on_cpu_is_the_sdpa_path():
    q, k, v, fam = _inputs(33, 20, 8, "BN", "contiguous", torch.float32)  # D = 8: any D on this path
    torch.testing.assert_close(srdiff.fam_attention(q, k, v, fam, 0.5), fam_attention_sdpa(q, k, v, fam, 0.5),
                               rtol=0, atol=0)


def test_cpu_path_imports_no_triton():
    code = (
        "import sys, torch, srdiff\n"
        "q = torch.randn(1, 2, 9, 16)\n"
        "srdiff.fam_attention(q, q, q, torch.rand(9), 0.5)\n"
        "srdiff.FAMAttention(32, heads=2)(torch.randn(1, 9, 32), torch.rand(9))\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


class TestFAMAttentionModule:
    def test_matches_manual_heads(self):
        attn = srdiff.FAMAttention(48, heads=3, lam=0.5)
        x, fam = torch.randn(2, 20, 48), torch.rand(2, 20)
        q, k, v = (p(x).view(2, 20, 3, 16).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
        heads = fam_attention_ref(q, k, v, fam, 0.5)
        want = attn.to_out(heads.transpose(1, 2).reshape(2, 20, 48))
        assert_close(attn(x, fam), want, dtype=torch.float32, reduce_dim=48)

    def test_without_fam_is_plain_attention(self):
        attn = srdiff.FAMAttention(32, heads=2, dim_head=24)
        x = torch.randn(3, 7, 32)
        q, k, v = (p(x).view(3, 7, 2, 24).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
        want = attn.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 7, 48))
        torch.testing.assert_close(attn(x), want, rtol=0, atol=0)

    def test_triton_backend(self):
        attn = srdiff.FAMAttention(32, heads=2, backend="triton")
        x, fam = torch.randn(2, 17, 32), torch.rand(17, requires_grad=True)
        out = attn(x, fam)
        attn.backend = "reference"
        assert_close(out, attn(x, fam), dtype=torch.float32, reduce_dim=32)
        out.sum().backward()
        assert fam.grad is not None and attn.to_k.weight.grad is not None

    @pytest.mark.parametrize("kwargs, error, match", [
        pytest.param({"dim": 4, "heads": 8}, ValueError, r"heads must divide dim.*dim=4, heads=8", id="heads-wider"),
        pytest.param({"dim": 32, "heads": 3}, ValueError, r"heads must divide dim.*dim=32, heads=3", id="heads-ragged"),
        pytest.param({"dim": 32, "heads": 0}, ValueError, r"heads=0", id="heads-zero"),
        pytest.param({"dim": 32, "heads": 2, "dim_head": 0}, ValueError, r"dim_head=0", id="dim-head-zero"),
        pytest.param({"dim": 32, "lam": -1}, ValueError, r"lam must be >= 0, got -1", id="lam-negative"),
        pytest.param({"dim": 32, "lam": float("inf")}, ValueError, r"lam must be finite, got inf", id="lam-inf"),
        pytest.param({"dim": 32, "lam": float("nan")}, ValueError, r"lam must be finite, got nan", id="lam-nan"),
        pytest.param({"dim": 32, "lam": "1"}, TypeError, r"lam must be a real number, got str", id="lam-type"),
    ])
    def test_bad_arguments(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            srdiff.FAMAttention(**kwargs)

    @pytest.mark.parametrize("x, fam, error, match", [
        pytest.param(torch.randn(2, 32), None, ValueError, r"x must have 3 dims, got shape \(2, 32\)", id="x-rank"),
        pytest.param([1.0], None, TypeError, r"x must be a torch.Tensor, got list", id="x-type"),
        pytest.param(torch.randn(2, 7, 32), torch.rand(6), ValueError, r"fam must have shape .* got \(6,\)",
                     id="fam-tokens"),
        pytest.param(torch.randn(2, 7, 32), torch.full((7,), float("inf")), ValueError, r"fam must be finite",
                     id="fam-nonfinite"),
    ])
    def test_bad_forward_input(self, x, fam, error, match):
        with pytest.raises(error, match=match):
            srdiff.FAMAttention(32, heads=2)(x, fam)


def _bad(case_id, error, match, **overrides):
    args = {"q": torch.randn(2, 3, 9, 16), "k": torch.randn(2, 3, 5, 16), "v": torch.randn(2, 3, 5, 16),
            "fam": torch.rand(5), "lam": 0.5, **overrides}
    return pytest.param(args, error, match, id=case_id)


def _heads(D, Nq=9):
    return {"q": torch.randn(2, 3, Nq, D), "k": torch.randn(2, 3, 5, D), "v": torch.randn(2, 3, 5, D)}


@pytest.mark.parametrize(
    "args, error, match",
    [
        _bad("q-rank", ValueError, r"q must have 4 dims, got shape \(3, 9, 16\)", q=torch.randn(3, 9, 16)),
        _bad("q-type", TypeError, r"q must be a torch.Tensor, got list", q=[1.0]),
        _bad("k-head-dim", ValueError, r"k must have shape \(B, H, Nk, D\) = \(2, 3, Nk, 16\)",
             k=torch.randn(2, 3, 5, 8)),
        _bad("k-heads", ValueError, r"got \(2, 4, 5, 16\)", k=torch.randn(2, 4, 5, 16)),
        _bad("v-shape", ValueError, r"v must have the shape of k \(2, 3, 5, 16\), got \(2, 3, 6, 16\)",
             v=torch.randn(2, 3, 6, 16)),
        _bad("empty", ValueError, r"q and k must be non-empty", q=torch.randn(2, 3, 0, 16)),
        _bad("dtype-mismatch", TypeError, r"k dtype torch.float16 must equal q dtype torch.float32",
             k=torch.randn(2, 3, 5, 16).half()),
        _bad("dtype-unsupported", TypeError, r"q must be one of .*float64",
             q=torch.randn(2, 3, 9, 16, dtype=torch.float64)),
        _bad("fam-device", ValueError, r"fam is on meta but q is on cpu", fam=torch.rand(5, device="meta")),
        _bad("fam-shape", ValueError, r"fam must have shape \(Nk,\), \(B, Nk\) or \(B, H, Nk\) = "
             r"\(5,\), \(2, 5\) or \(2, 3, 5\) \(B or H may be 1\), got \(6,\)", fam=torch.rand(6)),
        _bad("fam-batch", ValueError, r"got \(3, 5\)", fam=torch.rand(3, 5)),
        _bad("fam-rank", ValueError, r"fam must have 1 or 2 or 3 dims", fam=torch.rand(1, 2, 3, 5)),
        _bad("fam-int", TypeError, r"fam must be a floating-point tensor",
             fam=torch.ones(5, dtype=torch.long)),
        _bad("fam-nan", ValueError, r"fam must be finite, found 1 non-finite",
             fam=torch.tensor([0.0, float("nan"), 0, 0, 0])),
        _bad("lam-negative", ValueError, r"lam must be >= 0, got -0.5", lam=-0.5),
        _bad("lam-type", TypeError, r"lam must be a real number, got str", lam="0.5"),
        _bad("lam-inf", ValueError, r"lam must be finite, got inf", lam=float("inf")),
        _bad("lam-nan", ValueError, r"lam must be finite, got nan", lam=float("nan")),
        _bad("layout-bnhd-self", ValueError, r"got \(9,\); if q, k and v are \(B, N, H, D\) tensors, pass them as "
             r"\(B, H, N, D\)", fam=torch.rand(9), q=torch.randn(2, 9, 3, 16), k=torch.randn(2, 9, 3, 16),
             v=torch.randn(2, 9, 3, 16)),
        _bad("layout-bnhd-cross", ValueError, r"k must have shape .* got \(2, 5, 3, 16\); if q, k and v are "
             r"\(B, N, H, D\)", q=torch.randn(2, 9, 3, 16), k=torch.randn(2, 5, 3, 16), v=torch.randn(2, 5, 3, 16)),
        _bad("deterministic", TypeError, r"deterministic must be a bool, got int", deterministic=1),
        _bad("scale-nonpositive", ValueError, r"1 \+ lam \* fam must be > 0 .* got lam=0.5 and min\(fam\)=-3",
             fam=torch.full((5,), -3.0)),
        _bad("scale", ValueError, r"scale must be None or a positive finite number, got -1.0", scale=-1.0),
        _bad("backend", ValueError, r"backend must be one of \('triton', 'sdpa', 'reference'\), got 'cuda'",
             backend="cuda"),
        _bad("head-dim-small", ValueError, r"backend='triton' supports head dims 16..256, got D=8",
             backend="triton", **_heads(8)),
        _bad("head-dim-large", ValueError, r"got D=264", backend="triton", **_heads(264, Nq=2)),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        srdiff.fam_attention(**args)



def _fuzzed_tensor(draw, shape, dtype):
    """A tensor of ``shape`` (sometimes with one dim changed, one dropped or one added) in ``dtype``,
    contiguous, (B, N, H, D)-strided or every-other-element strided."""
    shape = list(shape)
    mutation = draw(st.sampled_from(["none"] * 6 + ["resize", "drop", "add"]))
    if mutation == "resize":
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 5))
    elif mutation == "drop":
        del shape[draw(st.integers(0, len(shape) - 1))]
    elif mutation == "add":
        shape.insert(draw(st.integers(0, len(shape))), 2)
    t = torch.randn(shape).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "bnhd", "strided"]))
    if layout == "bnhd" and t.dim() == 4:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided" and t.dim() > 0 and t.dtype.is_floating_point:
        return strided(t)
    return t


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_input_raises_cleanly_or_matches_the_reference(data):
    """Malformed shapes, dtypes, strides and values: srdiff.fam_attention either refuses them with
    a ValueError/TypeError or returns what the oracle computes (the SDPA path; the kernels' checks
    are the same code)."""
    draw = data.draw
    b, h, nq, nk, d = (draw(st.integers(lo, hi)) for lo, hi in [(1, 2), (1, 3), (1, 6), (1, 6), (1, 9)])
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                  torch.int32]))
    q = _fuzzed_tensor(draw, (b, h, nq, d), dtype)
    k = _fuzzed_tensor(draw, (b, h, nk, d), dtype)
    v = _fuzzed_tensor(draw, (b, h, nk, d), draw(st.sampled_from([dtype] * 4 + [torch.float16])))
    fam_shape = draw(st.sampled_from([None, (nk,), (b, nk), (b, h, nk), (1, h, nk), (nk + 1,), (h, nk), (b, 1, 1, nk)]))
    fam = None
    if fam_shape is not None:
        values = draw(st.sampled_from(["map", "map", "map", "nan", "inf", "negative", "int"]))
        fam = {"map": torch.rand(fam_shape), "nan": torch.full(fam_shape, float("nan")),
               "inf": torch.full(fam_shape, float("inf")), "negative": torch.full(fam_shape, -50.0),
               "int": torch.ones(fam_shape, dtype=torch.int64)}[values]
    lam = draw(st.one_of(st.sampled_from([0.0, 0.025, 0.5, 2, -0.1, float("inf"), float("nan"), "0.5", True]),
                         st.floats(0, 2)))
    scale = draw(st.sampled_from([None, None, 0.3, 0.0, -1.0, float("inf")]))
    try:
        out = srdiff.fam_attention(q, k, v, fam, lam, scale=scale)
    except (ValueError, TypeError) as refused:
        event(f"refused: {type(refused).__name__}")
        return
    event("accepted")
    want = fam_attention_ref(q, k, v, fam, float(lam), scale=scale)
    assert_close(out, want, dtype=q.dtype, reduce_dim=d)
