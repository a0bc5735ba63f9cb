"""Small helpers shared by the kernel launchers: output allocation and the input guard."""

import functools
import os

import torch

# Tests switch this on (tests/conftest.py) so that every tensor a launcher allocates starts as NaN
# (integers: -1): a kernel that forgets to write part of its output then fails the comparison.
POISON_ALLOCATIONS = False


def new_empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for kernel outputs and workspaces; poisoned under test."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_ALLOCATIONS:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _unit_stride(x):
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.stride(-1) != 1:
        return x.contiguous()
    return x


def input_guard(fn):
    """Make tensor arguments unit-stride in the last dim and run under their CUDA device's context."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(_unit_stride(a) for a in args)
        kwargs = {k: _unit_stride(v) for k, v in kwargs.items()}
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if device is not None and device.type == "cuda":
            with torch.cuda.device(device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper
