"""pytest hooks for the benchmarks: machine and version records, and the list of unavailable cases,
written into the pytest-benchmark JSON so that the report can show both.

With ``SRDIFF_BENCH_JSONL`` set (gpu.sh sets it), the same records also go to that JSON-lines file as
they happen: one ``session`` line when a run starts (machine, versions, commit, chunk), one ``case``
line per finished case (its pytest-benchmark stats and extra_info), one ``unavailable`` line per
provider that cannot run (benchmarks/srdiff_bench/common.py). ``benchmarks/srdiff_bench/report.py`` reads either format.
"""

import datetime
import os
import platform
import subprocess
import sys

import pytest
import torch

from srdiff_bench.common import DEVICE, LIVE_JSONL, QUICK, UNAVAILABLE, append_line

if "TRITON_INTERPRET" in os.environ:
    raise RuntimeError("benchmarks time real kernels: unset TRITON_INTERPRET")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def machine_label() -> str:
    """Folder name under benchmarks/results/: SRDIFF_BENCH_MACHINE, else the GPU or CPU kind."""
    if os.environ.get("SRDIFF_BENCH_MACHINE"):
        return os.environ["SRDIFF_BENCH_MACHINE"]
    if DEVICE == "cuda":
        return torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def commit_id() -> str:
    """SRDIFF_COMMIT (gpu.sh reads it from the file its prepare step wrote: the GPU machine has no
    .git), else ``git rev-parse HEAD``, else "unknown"."""
    if os.environ.get("SRDIFF_COMMIT"):
        return os.environ["SRDIFF_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe_machine() -> dict:
    """Machine, versions and run kind, as stored with every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import numpy

    return {
        "label": machine_label(),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU: {_cpu_model()}",
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if DEVICE == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "driver": _nvidia_driver() if DEVICE == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "quick": QUICK,
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(describe_machine())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["unavailable"] = UNAVAILABLE


def pytest_sessionstart(session):
    if LIVE_JSONL:
        append_line({"type": "session", "chunk": os.environ.get("SRDIFF_BENCH_CHUNK", ""), "commit": commit_id(),
                     "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                     "machine_info": describe_machine(), "args": session.config.invocation_params.args})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """After a case's call phase: its stats and extra_info as one ``case`` line (nothing if it did not time)."""
    outcome = yield
    if not LIVE_JSONL or call.when != "call":
        return
    bench = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    if stats is None or not stats.rounds:
        return
    append_line({"type": "case", "chunk": os.environ.get("SRDIFF_BENCH_CHUNK", ""), "name": item.name,
                 "fullname": item.nodeid, "group": bench.group, "passed": outcome.get_result().passed,
                 "stats": stats.as_dict(), "extra_info": dict(bench.extra_info)})
