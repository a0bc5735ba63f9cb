"""Keyed randomness, the one home of every seed rule in srdiff: each random draw is seeded by what it is
for (stream, seed, step, image, ...), never by a stateful stream, so a resumed run repeats an
uninterrupted one, N DDP ranks match one process accumulating N micro-batches, and an image's result
does not depend on how images are batched or on the device.

* :func:`key`: the training streams (data order, timesteps, noise, refreshes, condition draws, masks).
* :func:`image_seed` / :func:`initial_noise` / :func:`image_generators`: a sampled image's starting noise
  (and its batch's DDPM noise), also for a diffusers pipeline.
* :func:`repaint_generators`: one generator per image of a RePaint call, keyed by (seed, round, image).

The three derivations predate this module and each is frozen: changing one changes every stored result
drawn with it (the demo's samples and mFAMs use the first two, the repair study the third).
"""

import hashlib

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


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s starting noise: sampling does not depend on how images are batched
    or spread over ranks."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


def image_generators(seed: int, first_index: int, n: int) -> list[torch.Generator]:
    """One CPU generator per image ``first_index .. first_index + n - 1``, seeded ``image_seed(seed, i)``: a
    diffusers pipeline given them (``generator=[...]``) draws image i's starting noise from (seed, i) alone,
    as :func:`initial_noise` does."""
    return [torch.Generator().manual_seed(image_seed(seed, first_index + i)) for i in range(n)]


def initial_noise(shape, seed: int, first_index: int, device) -> torch.Tensor:
    """(n, C, H, W) standard normals, row i drawn from its own generator (``image_seed(seed, first_index + i)``)."""
    rows = [torch.randn(shape[1:], generator=g) for g in image_generators(seed, first_index, shape[0])]
    return torch.stack(rows).to(device)


def repaint_seed(seed: int, round_index: int, image_index: int) -> int:
    """The seed of image ``image_index``'s noise in round ``round_index`` of a RePaint call (flaw repair
    runs rounds; inpainting is round 0)."""
    digest = hashlib.blake2b(f"srdiff.repair/{seed}/{round_index}/{image_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def repaint_generators(seed: int, round_index: int, indices) -> list[torch.Generator]:
    """One CPU generator per image ``indices`` (positions in the caller's whole set, not in a batch)."""
    return [torch.Generator().manual_seed(repaint_seed(seed, round_index, int(i))) for i in indices]


def per_image_randn(generators: list[torch.Generator], shape, device) -> torch.Tensor:
    """(len(generators), *shape) standard normals, row i from ``generators[i]`` on the CPU: a draw that
    does not depend on batching or the device."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
