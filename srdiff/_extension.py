"""Loading the C++/CUDA extension ``srdiff._C``, once, without touching the GPU.

``HAS_EXT`` says whether its operators serve calls. When the binary is missing, fails to load, was
built against another torch, or from sources that have changed since, srdiff warns once (naming the
rebuild command) and the pure-PyTorch references in :mod:`srdiff.reference` serve instead.
"""

import importlib
import os
import warnings

import torch

from srdiff._sources import sources_digest

REBUILD_COMMAND = "pip install --no-build-isolation -e .   (or: make install)"
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_build_info(info: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in info.split(";"))


def _stale_reason(build: dict[str, str]) -> str | None:
    if build.get("torch") != torch.__version__:
        return f"it was built against torch {build.get('torch')} but torch {torch.__version__} is installed"
    # Only a source checkout (editable install) has csrc/ beside the package to compare with.
    if os.path.isdir(os.path.join(_SOURCE_ROOT, "csrc")):
        current = sources_digest(_SOURCE_ROOT)
        if build.get("sources") != current:
            return f"csrc/ changed since it was built (built {build.get('sources')}, now {current})"
    return None


def _load() -> tuple[bool, str | None]:
    """(usable, why not). Only ImportError/OSError mean "missing"; anything else is a real bug."""
    if os.environ.get("SRDIFF_SKIP_EXT") == "1":
        return False, "SRDIFF_SKIP_EXT=1 is set"
    try:
        importlib.import_module("srdiff._C")
    except (ImportError, OSError) as exc:
        return False, f"it could not be loaded ({exc})"
    reason = _stale_reason(_parse_build_info(torch.ops.srdiff._build_info()))
    return reason is None, reason


HAS_EXT, WHY_NOT = _load()
if not HAS_EXT and os.environ.get("SRDIFF_SKIP_EXT") != "1":
    warnings.warn(
        f"srdiff._C is not used: {WHY_NOT}. The pure-PyTorch references in srdiff.reference serve "
        f"instead (slower). Rebuild with: {REBUILD_COMMAND}",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cuda_backend() -> bool:
    """Whether the loaded extension registered CUDA kernels (it does when built with nvcc)."""
    return HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key("srdiff::gradcam_reduce", "CUDA")
