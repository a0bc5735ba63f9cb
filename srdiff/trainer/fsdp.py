"""FSDP2 for the trainer (``parallel = "fsdp"``): the denoiser and its EMA sharded block by block with
``torch.distributed.fsdp.fully_shard``, and their checkpoints through ``torch.distributed.checkpoint`` (DCP).

Every rank holds 1/N of each block's parameters, gradients, AdamW moments and EMA; a block is gathered for
its forward and backward and freed after. The FAM processors are installed before sharding, so they run
inside the gathered blocks exactly as in the unsharded model (their learned projections are parameters of
the blocks and are sharded with them). On CUDA with bf16 the blocks compute in bf16 and reduce gradients in
float32 (:func:`mixed_precision`).

A checkpoint is a folder of shards (``checkpoints/last.shards-<step>/``: one ``.distcp`` file per rank and
DCP's ``.metadata``), written by every rank, then committed by rank 0 writing the small ``last.pt`` that
names it (everything else: config, step, RNG, the mFAM, the highlighter, ...): a kill at any moment leaves
the previous pair loadable. :func:`consolidate` reads one part of the shards into plain tensors without a
process group (``srdiff.load_trained`` and ``srdiff export`` do, for a ``save_pretrained`` folder).
"""

import contextlib
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

#: what a sharded checkpoint folder holds: the denoiser, its EMA, the optimiser
PARTS = ("model", "ema", "optimizer")


@contextlib.contextmanager
def no_sync(model: nn.Module):
    """Backward passes inside keep their gradients on this rank (the micro-batches before the last)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def mixed_precision(dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """Blocks computed in ``dtype`` (None: the parameters' own) with gradients reduced in float32."""
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard(model: nn.Module, blocks: list[nn.Module], policy: MixedPrecisionPolicy) -> nn.Module:
    """``fully_shard`` each of ``blocks`` (submodules of ``model``), then ``model`` itself (what no block holds).
    The root reshards after its forward too: a forward without a backward (sampling the EMA) leaves every
    parameter sharded, as the EMA update and checkpoints expect."""
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    return model


def scalar(value: torch.Tensor) -> float:
    """A 0-d tensor as a float: a DTensor (a sharded model's gradient norm) is completed first."""
    return float(value.full_tensor() if isinstance(value, DTensor) else value)


def _state(model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def save(folder: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, *, is_main: bool) -> None:
    """Every rank writes its shards of the model, the EMA and the optimiser state to ``folder`` (a collective;
    a folder of that name left by a killed save is replaced). Returns once DCP's metadata is written."""
    if is_main and folder.exists():
        shutil.rmtree(folder)
    dist.barrier()
    dcp.save(_state(model, ema, optimizer), checkpoint_id=folder)


def load(folder: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read ``folder``'s shards into the sharded ``model``, ``ema`` and ``optimizer`` (a collective)."""
    state = _state(model, ema, optimizer)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def remove_stale(checkpoint: Path, keep: Path) -> None:
    """Delete the shard folders of ``checkpoint`` (``last.pt``: ``last.shards-*``) other than ``keep``: the
    ones a committed checkpoint no longer names (rank 0, after the commit)."""
    for folder in checkpoint.parent.glob(f"{checkpoint.stem}.shards-*"):
        if folder != keep and folder.is_dir():
            shutil.rmtree(folder)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded ``model``'s whole state dict on rank 0, on the CPU ({} on the other ranks; a collective)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def consolidate(folder: str | Path, part: str, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``part`` (one of :data:`PARTS` but the optimiser) of the sharded checkpoint ``folder`` (as
    :func:`srdiff.trainer.checkpoint.load` checked and named it) as plain tensors shaped as ``template`` (an
    unsharded model's state dict, whose keys it fills), in a plain process."""
    if part not in PARTS[:2]:
        raise ValueError(f"part must be one of {PARTS[:2]}, got {part!r}")
    state = {part: template}
    dcp.load(state, checkpoint_id=Path(folder))
    return state[part]
