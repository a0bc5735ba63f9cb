"""Shared test helpers: the one tolerance table, comparisons that explain their failures, and
parametrization helpers (devices, odd and strided shapes).

Tolerances: what to expect when a kernel's output in ``dtype`` is compared with the float32
reference computed from the same (already rounded) inputs.
  * rtol: the output is rounded to ``dtype`` once (half an ulp: u = 2^-24, 2^-11, 2^-8 for
    fp32/fp16/bf16) and the kernel rounds a few intermediates (e.g. attention probabilities cast to
    the input dtype before the P.V product), so forward rtol = 4u rounded up (fp32: a few ulps of
    summation-order difference). Backward passes chain two or three such roundings through
    dS = P * (dP - delta), so their entries are ~4x the forward ones.
  * atol covers values near zero, where relative error means nothing: a sum of n rounded terms
    carries a random-walk error ~ sqrt(n) u |term|, so atol is a per-term figure scaled by
    sqrt(reduce_dim) (the length of the longest reduction behind one output element: D for the
    attention forward, N for its backward, C*h*w for Grad-CAM).
  * The flash-attention rule (:func:`assert_no_worse_than_reference`) compares the kernel's error
    with the same-dtype PyTorch error, both against a float64 oracle. In float32 both errors are
    summation-order noise, and a kernel that sums in another order (blocked, online softmax) can
    carry a few times the naive reference's, so the rule gets a floor: the rounding error of a
    float32 sum of n terms, Higham & Mary's probabilistic bound lambda sqrt(n) u sum|x_i| (SIAM J.
    Sci. Comput. 41(5), 2019; it holds with probability >= 1 - 2n exp(-lambda^2 (1-u)^2 / 2), so
    lambda = REORDERING_LAMBDA = 6 keeps that >= 0.999 for sums of up to 10^4 terms), with
    sum|x_i| replaced by max|y| (exact for same-sign terms, an underestimate where they cancel, so
    the floor is stricter than the bound), u = 2^-24 for every input dtype (every path accumulates
    in float32) and n = reduce_dim. Measured on the attention SDPA path (its fp32 cases, 20 seeds,
    AVX2 and default ATen kernels): the largest share of the floor a case needed was 0.75.
These numbers are never changed per test. A kernel that cannot meet them has a bug or an
unstated precision trade-off; fix the kernel or document the trade-off here, for every test.
"""

import math
from dataclasses import dataclass

import pytest
import torch

from srdiff import _extension, noise_extension


@dataclass(frozen=True)
class Tolerance:
    atol: float  # per unit of reduction; multiplied by sqrt(reduce_dim)
    rtol: float


TOLERANCES: dict[str, dict[torch.dtype, Tolerance]] = {
    "fwd": {
        torch.float32: Tolerance(atol=1e-6, rtol=1e-5),
        torch.float16: Tolerance(atol=5e-4, rtol=2e-3),
        torch.bfloat16: Tolerance(atol=4e-3, rtol=1.6e-2),
    },
    "bwd": {
        torch.float32: Tolerance(atol=4e-6, rtol=4e-5),
        torch.float16: Tolerance(atol=2e-3, rtol=8e-3),
        torch.bfloat16: Tolerance(atol=1.6e-2, rtol=6.4e-2),
    },
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# float32 unit roundoff (every kernel and reference accumulates in float32, whatever its inputs) and
# the probabilistic bound's lambda for the reordering floor (see the module docstring).
FLOAT32_EPS = 2.0**-24
REORDERING_LAMBDA = 6.0


def tolerance(dtype: torch.dtype, *, pass_: str = "fwd", reduce_dim: int = 1) -> tuple[float, float]:
    """(atol, rtol) for outputs computed from ``dtype`` inputs, after a reduction of ``reduce_dim``."""
    tol = TOLERANCES[pass_][dtype]
    return tol.atol * math.sqrt(max(reduce_dim, 1)), tol.rtol


def _describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> str:
    diff = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    bad = ~(diff <= allowed)  # NaN counts as bad
    rel = diff / expected.abs().clamp_min(1e-12)
    idx = bad.nonzero()[:5].tolist()
    firsts = ", ".join(f"{tuple(i)}: {actual[tuple(i)].item():.6g} vs {expected[tuple(i)].item():.6g}" for i in idx)
    return (
        f"{int(bad.sum())} of {bad.numel()} elements differ beyond atol={atol:.3g} + rtol={rtol:.3g}*|expected|; "
        f"max abs err {diff.nan_to_num(float('inf')).max().item():.3g}, max rel err "
        f"{rel.nan_to_num(float('inf')).max().item():.3g}; first: {firsts}"
    )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype,
    pass_: str = "fwd",
    reduce_dim: int = 1,
    name: str = "output",
) -> None:
    """Compare in float32 on the CPU with the shared table; NaN anywhere fails."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = tolerance(dtype, pass_=pass_, reduce_dim=reduce_dim)
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    if not bool(torch.isfinite(a).all()) or not bool(((a - e).abs() <= atol + rtol * e.abs()).all()):
        pytest.fail(f"{name} ({dtype}, {pass_}): {_describe_mismatch(a, e, atol, rtol)}", pytrace=False)


def reordering_floor(expected: torch.Tensor, reduce_dim: int) -> float:
    """lambda * u * sqrt(reduce_dim) * max|expected|: what a float32 sum of ``reduce_dim`` terms may
    differ by when summed in another order (see the module docstring)."""
    scale = expected.detach().abs().max().item()
    return REORDERING_LAMBDA * FLOAT32_EPS * math.sqrt(max(reduce_dim, 1)) * scale


def assert_no_worse_than_reference(
    actual: torch.Tensor,
    ref_same_dtype: torch.Tensor,
    truth: torch.Tensor,
    *,
    dtype: torch.dtype,
    pass_: str = "fwd",
    reduce_dim: int = 1,
    factor: float = 2.0,
    name: str = "output",
) -> None:
    """flash-attention's rule: max|kernel - truth| <= factor * max|ref_in_dtype - truth| plus the
    float32 reordering floor of a ``reduce_dim``-long reduction (``truth``: best a float64 oracle).
    ``dtype`` and ``pass_`` name the case in the message."""
    truth = truth.detach().double().cpu()
    err = (actual.detach().double().cpu() - truth).abs().max().item()
    base = (ref_same_dtype.detach().double().cpu() - truth).abs().max().item()
    floor = reordering_floor(truth, reduce_dim)
    assert err <= factor * base + floor, (
        f"{name} ({dtype}, {pass_}): kernel error {err:.3g} > {factor} x same-dtype PyTorch error {base:.3g} "
        f"+ float32 reordering floor {floor:.3g} (reduce_dim={reduce_dim})"
    )


needs_ext = pytest.mark.skipif(not _extension.HAS_EXT, reason=f"srdiff._C unavailable: {_extension.WHY_NOT}")
# The CPU kernels of srdiff._C as a backend= parameter (skipped, with the reason, when not built).
EXTENSION = pytest.param(
    "extension",
    marks=pytest.mark.skipif(not noise_extension.available(), reason=f"srdiff._C unavailable: {_extension.WHY_NOT}"),
)


def cpu_and_cuda():
    """Device parametrization: CUDA cases carry ``needs_cuda`` and skip without a GPU."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout (every other element of a wider buffer)."""
    wide = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    with torch.no_grad():
        view.copy_(t)
    return view.requires_grad_(t.requires_grad)


def channels_last_like(t: torch.Tensor) -> torch.Tensor:
    """The same values as a 4-d ``t`` with channels-last strides (what NHWC convolutions hand back)."""
    return t.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------- tiny trainer runs
# A denoiser small enough that a training step on 8x8 digits takes milliseconds on 2 cores.
TINY_TRAIN = dict(
    data="digits", image_size=8, block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4,
    attention_head_dim=8, batch_size=8, lr=1e-3, warmup_steps=2, mfam_samples=4, mfam_sampler_steps=2,
    highlighter_samples=8, highlighter_epochs=1, highlighter_finetune_steps=1, sample_steps=2, progress=False,
    num_train_timesteps=100, features="local",  # Inception costs ~1 s per image on CPU: see tests/test_metrics.py
)


def tiny_config(tmp_path, name: str = "run", **changes):
    """A :class:`srdiff.TrainConfig` of :data:`TINY_TRAIN` writing under ``tmp_path / name``."""
    from srdiff.trainer import TrainConfig

    return TrainConfig(**{**TINY_TRAIN, "out_dir": str(tmp_path / name), **changes})


def run_losses(config) -> list[tuple[int, float]]:
    """(step, loss) of every step record in a run's ``metrics.jsonl``."""
    import json
    import os

    with open(os.path.join(config.out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, filter(str.strip, f)) if "loss" in r]


def srdiff_cli(*args, **kw):
    """``python -m srdiff ARGS`` as a Popen with stdout and stderr together, text mode."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "srdiff", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def config_flags(config) -> list[str]:
    """The ``srdiff train`` flags that rebuild ``config``."""
    out = []
    for key, value in config.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            out += [flag, *(str(v).lower() if isinstance(v, bool) else str(v) for v in value)]
        elif value is not None:
            out += [flag, str(value)]
    return out


def kill_and_resume(config, *, after_step: int, checkpoint_step: int, timeout: float = 300) -> None:
    """Train ``config`` with ``srdiff train``, SIGKILL it once step ``after_step`` is logged, check that
    ``checkpoints/last.pt`` is at ``checkpoint_step``, then ``srdiff train --resume`` it to the end."""
    import json
    import signal
    import time
    from pathlib import Path

    proc = srdiff_cli("train", *config_flags(config))
    log, deadline = Path(config.out_dir) / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(x).get("step", 0) >= after_step and "loss" in x
                                 for x in log.read_text().splitlines()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(Path(config.out_dir) / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == checkpoint_step, f"killed at step {saved['step']}, not {checkpoint_step}"
    resumed = srdiff_cli("train", *config_flags(config), "--resume")
    out, _ = resumed.communicate(timeout=timeout)
    assert resumed.returncode == 0, out
