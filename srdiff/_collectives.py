"""The collectives srdiff runs across the ranks of a ``torch.distributed`` process group, however it was
started (torchrun, 🤗 Accelerate, FSDP): each takes the group (None: the default group) and is a no-op
in a plain process, where no group exists."""

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group=None) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size); (0, 1) without a process group."""
    if not initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """``t`` summed over the ranks, in place (the same bytes on every rank)."""
    if rank_and_world(group)[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_gather_cat(t: torch.Tensor, group=None) -> torch.Tensor:
    """Equally shaped tensors of every rank concatenated along dim 0, in rank order."""
    world = rank_and_world(group)[1]
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def broadcast_module(module: torch.nn.Module, group=None) -> None:
    """Overwrite every rank's parameters and buffers with those of the group's rank 0."""
    if rank_and_world(group)[1] == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, group=group, group_src=0)


def barrier(group=None) -> None:
    if rank_and_world(group)[1] > 1:
        dist.barrier(group=group)
