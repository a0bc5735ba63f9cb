"""Checkpoints that survive a kill at any moment: written to a temp file, fsynced, then renamed.

Everything in a checkpoint is a tensor, a number, a string or a container of those, so it loads
with ``torch.load(weights_only=True)``: no pickled code runs on load.
"""

import os
import random
from pathlib import Path

import numpy as np
import torch

from srdiff._io import save_atomic

__all__ = ["load", "rng_state", "save_atomic", "set_rng_state"]


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state() -> dict:
    """The global RNG states (torch CPU, CUDA, NumPy, Python) in weights_only-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "python": {"version": version, "internal": list(py_internal), "gauss": gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
