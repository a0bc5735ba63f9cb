"""DDP plumbing: ``torchrun --nproc_per_node=N -m srdiff train ...`` sets RANK/WORLD_SIZE, and the trainer
joins the group (gloo on CPU, nccl on GPU). A plain process is rank 0 of a world of 1. The collectives the
trainer and the refiner run are :mod:`srdiff._collectives`."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from srdiff._collectives import initialized


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_kind: str, *, need_group: bool = False) -> DistInfo:
    """Join the process group torchrun describes (if any, and none is joined yet); returns this process's
    rank info. ``need_group`` (FSDP) joins one for a single torchrun rank too, and refuses a process
    torchrun did not start."""
    if initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if need_group and "RANK" not in os.environ:
        raise ValueError("parallel 'fsdp' shards the denoiser over the ranks of a torchrun launch, and this process "
                         "was not started by one (no RANK in its environment): run `torchrun --nproc_per_node=N -m "
                         "srdiff train ... --parallel fsdp`, or use parallel 'ddp'")
    if world == 1 and not need_group:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend)
    return info


def shutdown() -> None:
    if initialized():
        dist.destroy_process_group()

