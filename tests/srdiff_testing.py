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


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def launch_env(**extra) -> dict:
    """The environment of a child process that must import this checkout's srdiff whatever its working
    directory or script folder (not another installed one). Its thread count is this process's (CPU
    results are bit-identical only between runs with the same count); torchrun gives each rank one."""
    import os

    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def torchrun(ranks: int = 2) -> list[str]:
    """The command prefix that starts ``ranks`` processes on this machine (gloo on the CPU)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]


def run_on_ranks(source: str, config, folder, *, ranks: int = 2, timeout: float = 600) -> None:
    """Write the script ``source`` to ``folder/worker.py`` and run it on ``ranks`` gloo processes (torchrun)
    with ``config`` (a TrainConfig) as JSON in ``sys.argv[1]``; every rank must exit 0."""
    import json
    import subprocess
    from pathlib import Path

    worker = Path(folder) / "worker.py"
    worker.write_text(source)
    proc = subprocess.run([*torchrun(ranks), str(worker), json.dumps(config.to_dict())], capture_output=True,
                          text=True, timeout=timeout, env=launch_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def saved_highlighter(path, *, channels: int = 1, size: int = 8, seed: int = 0) -> str:
    """An untrained "small" FlawHighlighter saved at ``path``, initialised from ``seed`` (not from the
    session's global RNG, whose state depends on the tests run before): its maps are not blank, so a
    refresh gives a real mFAM (a trained one at chance may give an empty one, and so may some random
    initialisations: a full run once drew one whose every map was 0)."""
    import torch

    from srdiff.highlighter import FlawHighlighter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        FlawHighlighter(backbone="small", in_channels=channels, image_size=size).save(path)
    return str(path)


def srdiff_cli(*args, ranks: int = 1, **kw):
    """``python -m srdiff ARGS`` (under torchrun with ``ranks`` > 1) as a Popen with stdout and stderr
    together, text mode, unless ``kw`` redirects them."""
    import subprocess
    import sys

    launcher = torchrun(ranks) if ranks > 1 else [sys.executable]
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "env": launch_env(), **kw}
    return subprocess.Popen([*launcher, "-m", "srdiff", *args], **kw)


def kill_tree(proc) -> None:
    """SIGKILL ``proc`` and every process it started (torchrun's workers run in sessions of their own)."""
    import psutil

    parent = psutil.Process(proc.pid)
    for child in parent.children(recursive=True):
        child.kill()
    parent.kill()
    proc.wait()


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


def kill_and_resume(config, *, after_step: int, checkpoint_step: int, ranks: int = 1, timeout: float = 300) -> None:
    """Train ``config`` with ``srdiff train`` (under torchrun with ``ranks`` > 1), SIGKILL it (every rank)
    once step ``after_step`` is logged, check that ``checkpoints/last.pt`` is at ``checkpoint_step``, then
    ``srdiff train --resume`` it to the end. The output goes to ``<out_dir>.log``."""
    import json
    import subprocess
    import time
    from pathlib import Path

    out = Path(config.out_dir)
    with open(out.with_suffix(".log"), "w") as output:
        proc = srdiff_cli("train", *config_flags(config), ranks=ranks, stdout=output, stderr=subprocess.STDOUT)
        log, deadline = out / "metrics.jsonl", time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and any(json.loads(x).get("step", 0) >= after_step and "loss" in x
                                     for x in log.read_text().splitlines()):
                break
            time.sleep(0.02)
        ended = proc.poll() is not None
        kill_tree(proc)
    assert not ended, f"the run ended before it could be killed:\n{out.with_suffix('.log').read_text()[-3000:]}"
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == checkpoint_step, f"killed at step {saved['step']}, not {checkpoint_step}"
    resumed = srdiff_cli("train", *config_flags(config), "--resume", ranks=ranks)
    text, _ = resumed.communicate(timeout=timeout)
    assert resumed.returncode == 0, text[-3000:]


def assert_trained_like_one_process(weights: dict, mfam: torch.Tensor, single, initial: dict, run_dir,
                                    single_dir) -> None:
    """A run on N ranks (its final ``weights`` and ``mfam``, its ``metrics.jsonl`` in ``run_dir``) against
    ``single``, a trainer that accumulated the same global batch in N micro-batches from the same ``initial``
    weights (its log in ``single_dir``).

    Same samples, timesteps and noise per micro-batch; only the order of floating-point sums differs
    (all-reduce or reduce-scatter vs accumulation, batch 2 vs 4 in the refresh sampler), so agreement is to
    rounding, as amplified by training. The weights are compared through what training did to them, tensor
    by tensor and in norm: AdamW divides each gradient element by its own running RMS, so relative rounding
    errors of the gradient reach the update at full size. Measured (DDP and FSDP): every tensor within
    1.1e-4 of its update, except the attention key biases (up to 1.6e-2). Their gradient would be exactly
    zero without the FAM (a bias shared by all keys shifts every logit of a query equally); the
    (1 + lam*fam) scaling leaves a residue about lam times the size of the terms that cancel, so its
    relative rounding error is about 1/lam = 40 times larger. A rank that missed the gradient reduction
    (training on half the batch) would be off by order one everywhere.

    The last mFAM is drawn by those weights (agreeing to 1e-3 of their update) through a sampler whose batch
    differs: its budget is the weights' 1e-3, relative (measured: 3.9e-5 with the kernels' noise stream). A
    map refreshed from diverged weights, or not all-reduced, differs by order one. The per-step losses are
    compared with the float32 forward entry of the table above: they are computed from the same weights up
    to that rounding."""
    import json
    from pathlib import Path

    lam = single.config.lam_r
    for name, value in single.denoiser.state_dict().items():
        if not value.is_floating_point():
            continue
        bound = 1e-3 / lam if name.endswith("to_k.bias") else 1e-3
        update = float((value - initial[name]).norm())
        gap = float((weights[name] - value).norm())
        assert gap <= bound * update + 1e-7, f"{name}: |ranks - single| = {gap:.3g} > {bound:g} x |update| = {update:.3g}"
    torch.testing.assert_close(single.mfam, mfam, rtol=1e-3, atol=1e-3 * float(mfam.max()))

    def losses(run):
        lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
        return torch.tensor([json.loads(x)["loss"] for x in lines if '"loss"' in x])

    assert_close(losses(run_dir), losses(single_dir), dtype=torch.float32, name="losses")
