"""Compare two training runs bit for bit: every metrics.jsonl record (per-step loss, lr, grad norm; each
refresh's mFAM statistics and fine-tune accuracy; timings and paths left out; fields that only run B
records, a newer version's, are listed, every field of A must be equal in B), every tensor of
checkpoints/base.pt and last.pt (weights, EMA, optimiser, mFAM, highlighter, RNG states) and every PNG.
Raises AssertionError naming the first difference.

    PYTHONPATH=benchmarks python -m srdiff_bench.compare_runs RUN_A RUN_B     (two --out-dir folders of `srdiff train`)

Used to show that a restructure changes no result (docs/architecture.md).
"""

import json
import sys
from pathlib import Path

import torch

RUN_SPECIFIC = {"seconds", "path"}  # timings and the run folder differ by construction
# The global NumPy RNG is never seeded by a run: its keys are the process's OS-entropy seed (its position
# is compared, and shows whether anything drew from it).
UNSEEDED = "/rng/numpy/keys"


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in RUN_SPECIFIC} for line in lines]


def tensors(obj, prefix: str = ""):
    """(path, tensor) for every tensor in a nested checkpoint dict/list."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def compare(a: Path, b: Path) -> None:
    ra, rb = records(a), records(b)
    added = sorted({k for x, y in zip(ra, rb) for k in y.keys() - x.keys()})
    shared = [{k: v for k, v in y.items() if k in x} for x, y in zip(ra, rb)]  # B may record more than A
    assert len(ra) == len(rb) and ra == shared, [(x, y) for x, y in zip(ra, shared) if x != y][:3] or (len(ra), len(rb))
    steps = sum("event" not in r for r in ra)
    refreshes = [r["mfam_mean"] for r in ra if r.get("event") == "refresh"]
    print(f"metrics.jsonl: {len(ra)} records identical ({steps} steps, {len(refreshes)} refreshes, mFAM means "
          f"{refreshes})" + (f"; fields only B records: {added}" if added else ""))
    for name in ("base.pt", "last.pt"):
        ca, cb = (torch.load(run / "checkpoints" / name, weights_only=False) for run in (a, b))
        ta, tb = dict(tensors(ca)), dict(tensors(cb))
        assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))
        differ = [k for k in ta if k != UNSEEDED and not torch.equal(ta[k], tb[k])]
        assert not differ, differ[:5]
        assert ca["rng"]["numpy"]["pos"] == cb["rng"]["numpy"]["pos"]
        print(f"checkpoints/{name}: {len(ta)} tensors identical")
    pngs = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    differ = [str(p) for p in pngs if (a / p).read_bytes() != (b / p).read_bytes()]
    assert not differ, differ
    print(f"{len(pngs)} PNGs byte-identical (samples, refresh samples, FAMs, mFAMs, loss plot)")


if __name__ == "__main__":
    compare(Path(sys.argv[1]), Path(sys.argv[2]))
