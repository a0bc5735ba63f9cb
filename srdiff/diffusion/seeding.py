"""Keyed randomness: every random draw of a run is seeded by (stream, seed, step, ...), never by a stateful
stream, so a resumed run repeats an uninterrupted one and N DDP ranks match one process accumulating N
micro-batches."""

import torch

# Stream tags: each kind of random draw gets its own stream. Append new streams at the end: renumbering
# changes every run's draws.
DATA, TIMESTEPS, NOISE, MFAM, HL_FIT, HL_SAMPLES, FINAL, CONDITION_DROP, MASKS, CONDITION_SAMPLES = range(10)


def key(*parts: int) -> int:
    """A seed in [0, 2**31) from integers (splitmix-style mixing): one per (stream, seed, step, ...)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (h ^ (h >> 31)) & 0x7FFFFFFF


def keyed_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded with ``key(*parts)``."""
    return torch.Generator().manual_seed(key(*parts))


def per_image_choice(high: int, indices, seed: int) -> torch.Tensor:
    """(len(indices),) int64 in [0, high): image i's value is drawn from (CONDITION_SAMPLES, seed, i)
    alone, so a sampled image's condition does not depend on batching or ranks."""
    return torch.tensor([int(torch.randint(high, (), generator=keyed_generator(CONDITION_SAMPLES, seed, int(i))))
                         for i in indices], dtype=torch.long)


def drop_conditions(ids: torch.Tensor, null: int, p: float, *, seed: int, step: int, micro: int) -> torch.Tensor:
    """A copy of ``ids`` with each entry replaced by ``null`` with probability ``p`` (classifier-free
    guidance's condition dropout), keyed by (CONDITION_DROP, seed, step, micro)."""
    ids = ids.clone()
    if p > 0:
        ids[torch.rand(len(ids), generator=keyed_generator(CONDITION_DROP, seed, step, micro)) < p] = null
    return ids
