"""Checkpoints that survive a kill at any moment: written to a temp file, fsynced, then renamed.

Everything in a checkpoint is a tensor, a number, a string or a container of those, so it loads
with ``torch.load(weights_only=True)``: no pickled code runs on load.
"""

import os
import random
from pathlib import Path

import numpy as np
import torch

from srdiff._io import load_file, save_atomic

__all__ = ["load", "rng_state", "save_atomic", "set_rng_state"]


# What every trainer checkpoint holds (SelfRefiningTrainer.state_dict); a sharded one (parallel "fsdp") names
# its folder of shards instead of holding the weights and the optimiser state.
KEYS = ("config", "step", "model", "ema", "optimizer")
SHARDED_KEYS = ("config", "step", "ema", "sharded")


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """A trainer checkpoint; a missing, unreadable (truncated, another kind of file) or foreign one raises
    ``ValueError`` naming it (:func:`srdiff._io.load_file`). A sharded checkpoint's ``"sharded"`` comes back
    as the path of its folder of shards (:mod:`srdiff.trainer.fsdp`), which must exist."""
    state = load_file(path, "a trainer checkpoint (checkpoints/last.pt)", map_location)
    keys = SHARDED_KEYS if isinstance(state, dict) and "sharded" in state else KEYS
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        held = f"a dict without {missing}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ValueError(f"{str(Path(path))!r} is not a trainer checkpoint (checkpoints/last.pt): it holds {held}")
    if "sharded" in state:
        shards = Path(path).parent / state["sharded"]
        if not (shards / ".metadata").is_file():
            raise ValueError(f"{str(Path(path))!r} names its shards {str(shards)!r}, which hold no complete sharded "
                             "checkpoint (no DCP .metadata): they were moved or deleted")
        state["sharded"] = str(shards)
    return state


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
