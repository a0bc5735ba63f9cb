"""pytest hooks for the benchmarks: machine and version records, and the list of unavailable cases,
written into the pytest-benchmark JSON so that the report can show both."""

import os
import platform
import subprocess
import sys

import torch

from benchmarks.common import DEVICE, QUICK, UNAVAILABLE

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


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info.update(
        {
            "label": machine_label(),
            "device": torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU: {_cpu_model()}",
            "cpu_count": os.cpu_count(),
            "driver": _nvidia_driver() if DEVICE == "cuda" else None,
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
            "python": sys.version.split()[0],
            "quick": QUICK,
        }
    )


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["unavailable"] = UNAVAILABLE
