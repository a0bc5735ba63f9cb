"""The benchmark harness every ``bench_*.py`` uses.

One call, :func:`measure`, times a case with pytest-benchmark and records what a reader needs to
trust the number: op, provider, mode, shape, dtype, device, derived TFLOP/s or GB/s from an explicit
FLOP/byte count, peak memory, and on CUDA the ``triton.testing.do_bench`` median/p20/p80. Machine and
versions go into the JSON's ``machine_info`` (see conftest.py). A provider that cannot run (missing
package, unsupported shape, needs a GPU) calls :func:`unavailable`, which records why, so the report
shows the reason instead of a hole.

Timing on CUDA ends every call with ``torch.cuda.synchronize()``; the warm-up rounds absorb Triton
JIT compilation and autotuning.

With ``SRDIFF_BENCH_JSONL=<path>`` every finished case and every unavailable provider is also appended
to that file as one JSON line the moment it is known (conftest.py writes the cases), so a run killed
by its timeout keeps what it finished (pytest-benchmark writes its JSON only at the end of a run).
"""

import json
import os
import time
from collections.abc import Callable

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("SRDIFF_BENCH_QUICK") == "1"  # gpu.sh --cpu rehearsal and smoke runs

# Providers that cannot run in this session, with the reason: written into the JSON by conftest.py.
UNAVAILABLE: list[dict] = []

MODES = ("fwd", "bwd", "fwd+bwd")
LIVE_JSONL = os.environ.get("SRDIFF_BENCH_JSONL")


def append_line(record: dict, path: str | None = LIVE_JSONL) -> None:
    """Append ``record`` as one JSON line to ``path`` (no-op without one), flushed to disk at once."""
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def on_device(gpu: list, cpu: list) -> list:
    """Pick the parameter list for the machine at hand (quick runs keep the first entry)."""
    chosen = gpu if DEVICE == "cuda" else cpu
    return chosen[:1] if QUICK else chosen


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Memory ``fn`` needs on top of what was allocated before it: CUDA peak allocated, or on the CPU
    the rise of the process's peak resident set (Linux ``VmHWM``, reset through ``clear_refs``)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def _cpu_rounds(run: Callable[[], None], prepare: Callable[[], object], budget_s: float = 1.0) -> int:
    """Rounds for about ``budget_s`` of timed calls, 5 to 50: a CPU median of 5 calls of a
    millisecond op moved by 20 % between runs; slow cases keep 5."""
    prepare()
    run()  # first calls pay one-time costs (allocator growth, lazy initialisation)
    prepare()
    start = time.perf_counter()
    run()
    return max(5, min(50, int(budget_s / max(time.perf_counter() - start, 1e-6))))


def measure(
    benchmark,
    fn: Callable[[], object],
    *,
    op: str,
    provider: str,
    mode: str,
    shape: dict,
    dtype: torch.dtype | None,
    device: str = DEVICE,
    flops: float | None = None,
    bytes_moved: float | None = None,
    setup: Callable[[], object] | None = None,
    rounds: int | None = None,
    warmup_rounds: int = 2,
    memory: bool = True,
) -> None:
    """Time ``fn`` (after ``setup``, untimed, if given) and record everything about the case.

    flops / bytes_moved: the work one call must do (an explicit formula in the caller), from which
    TFLOP/s or GB/s are derived with the median time.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    state = {}

    def prepare():
        if setup is not None:
            state["args"] = setup()
        return (), {}

    def run():
        fn(*([state["args"]] if setup is not None else []))
        _sync(device)

    if rounds is None:
        rounds = 3 if QUICK else (20 if device == "cuda" else _cpu_rounds(run, prepare))
    benchmark.group = op
    benchmark.pedantic(run, setup=prepare, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    median_s = benchmark.stats.stats.median

    info = {**_case(op, provider, mode, shape, dtype, device), "median_ms": median_s * 1e3}
    if flops is not None:
        info["flops"] = flops
        info["tflops"] = flops / median_s / 1e12
    if bytes_moved is not None:
        info["bytes"] = bytes_moved
        info["gbps"] = bytes_moved / median_s / 1e9
    if device == "cuda" and setup is None:
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        info["do_bench_ms"] = {"p50": p50, "p20": p20, "p80": p80}
    if memory:
        prepare()
        info["peak_memory_mb"] = peak_memory_mb(run, device)
    benchmark.extra_info.update(info)


def _case(op: str, provider: str, mode: str | None, shape: dict | None, dtype: torch.dtype | None,
          device: str) -> dict:
    """What names one benchmark case in the stored JSON (a measured one and an unavailable one alike)."""
    return {"op": op, "provider": provider, "mode": mode, "shape": shape,
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else None, "device": device}


def unavailable(*, op: str, provider: str, reason: str, mode: str | None = None, shape: dict | None = None,
                dtype: torch.dtype | None = None) -> None:
    """Record that ``provider`` cannot run this case and why, then skip the test."""
    entry = {**_case(op, provider, mode, shape, dtype, DEVICE), "reason": reason}
    UNAVAILABLE.append(entry)
    append_line({"type": "unavailable", "chunk": os.environ.get("SRDIFF_BENCH_CHUNK", ""), **entry})
    pytest.skip(f"{provider}: {reason}")


def require_module(name: str, *, op: str, provider: str, **case):
    """Import and return the peer package ``name``, or record the provider unavailable (and skip)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        unavailable(op=op, provider=provider, reason=f"{name} is not installed ({err})", **case)


def require_cuda(*, op: str, provider: str, **case) -> None:
    """Providers that exist only on the GPU (the Triton kernels, the CUDA extension) call this first."""
    if DEVICE != "cuda":
        unavailable(op=op, provider=provider, reason="needs a CUDA GPU", **case)
