"""Keyed randomness: every random draw of a run is seeded by (stream, seed, step, ...), never by a stateful
stream, so a resumed run repeats an uninterrupted one and N DDP ranks match one process accumulating N
micro-batches."""

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
