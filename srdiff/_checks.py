"""The constants and argument checks every op and public function shares.

One exception per kind of mistake (docs/errors.md), each message naming the argument and its value:

* ``TypeError``: the argument is of the wrong kind: not a tensor, not a number, not a bool, a tensor of
  a dtype the op does not take (integer where floating is needed, float64 where the kernels take
  fp32/fp16/bf16, two tensors whose dtypes must match and do not).
* ``ValueError``: the kind is right, the value is not: a shape, rank, size, range, choice, device,
  non-finite number or tensor.
* ``RuntimeError``: the input is fine but this install cannot run it (a forced backend that is not
  built), or a gradient is asked of an op that has none.
"""

import math
import os
from collections.abc import Iterable

import torch

BACKENDS = ("triton", "reference")
# What the ops compute in (accumulating in float32): the kernels', the extension's and the references'.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The noise ops' alphas_cumprod.
SUPPORTED_ALPHA_DTYPES = (torch.float32, torch.float64)
# A denoiser's target; the noise kernels' PREDICTION constexpr indexes this tuple.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# How a noise recipe treats ε on each side (x_t, target); the noise kernels' X_NOISE and TARGET_NOISE
# constexprs index this tuple. The named recipes: the paper's, the authors' ADM code's, their U-ViT code's.
AMPLIFICATIONS = ("plain", "add", "scale")
RECIPES = {"paper": ("add", "add"), "adm": ("scale", "plain"), "uvit": ("plain", "add")}


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_tensor(name: str, t, *, ndim: int | Iterable[int] | None = None, floating: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...] = SUPPORTED_DTYPES) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} must be one of {allowed}, got {t.dtype}")


def check_same_dtype(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.dtype != like.dtype:
        raise TypeError(f"{name} dtype {t.dtype} must equal {like_name} dtype {like.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN/inf. Costs one device sync; skipped while torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name} must be finite, found {bad} non-finite value(s) of {t.numel()}")


def check_nonnegative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_guidance_scale(value, name: str = "guidance_scale") -> float:
    """Classifier-free guidance ``s`` of ``eps_u + s (eps_c - eps_u)`` as a float: finite and >= 0 (0: the
    unconditional prediction, 1: the conditional one alone, > 1: guided). A negative ``s`` steers away
    from the condition, NaN or inf makes every image NaN: both raise ``ValueError`` naming ``name``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (0: unconditional, 1: conditional alone, > 1: "
                         f"guided), got {value}")
    return float(value)
def check_lam(value, name: str = "lam") -> None:
    """A modulation or amplification weight (lam, lam_r, lam_f): a finite real number >= 0 (inf or NaN
    would make every output non-finite)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    check_nonnegative(name, value)


def check_int(name: str, value, low: int) -> None:
    """An int (not a bool) >= ``low``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str | None, device: torch.device, choices: tuple[str, ...] = BACKENDS) -> str:
    """The path a call takes: ``backend`` if forced, else the first choice on CUDA, the last on CPU.

    Forcing ``"triton"`` on CPU tensors works only under the Triton interpreter (TRITON_INTERPRET=1,
    set before triton is first imported).
    """
    if backend is None:
        return choices[0] if device.type == "cuda" else choices[-1]
    check_choice("backend", backend, choices)
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' on {device.type} tensors needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before triton is imported"
        )
    return backend
