"""How many highlighter fine-tune steps per mFAM refresh? Measured on the demo config: the refinement phase of
``configs/demo.toml`` from one base checkpoint, once per ``highlighter_finetune_steps`` value; per refresh the
highlighter's balanced accuracy on that refresh's fresh samples before its fine-tune (how well the highlighter
trained at the switch still tells the current model's samples from real digits), the mFAM's Pearson
correlation with the previous refresh's and their mean absolute difference (how far the map moves), and the
refresh's seconds. ``docs/trainer.md`` renders the table from the stored JSON.

    export PYTHONPATH=benchmarks OMP_NUM_THREADS=1
    python -m srdiff_bench.finetune_default --make-base RUN     # RUN/checkpoints/base.pt: the base phase only
    python -m srdiff_bench.finetune_default --base RUN/checkpoints/base.pt --value 20 --refreshes 4 \
        --out benchmarks/results/finetune_default
    python -m srdiff_bench.finetune_default --report benchmarks/results/finetune_default
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

CONFIG = "configs/demo.toml"


def make_base(out: str) -> Path:
    """Train the demo config's base phase alone and write ``out/checkpoints/base.pt``, as a run would at the
    switch (the base phase is the same in every mode)."""
    from srdiff.trainer import SelfRefiningTrainer, TrainConfig

    config = TrainConfig.from_file(CONFIG, eval_samples=0, progress=False, out_dir=out)
    trainer = SelfRefiningTrainer(config)
    while trainer.step < config.base_steps:
        trainer.train_step()
    return trainer.save_checkpoint("base.pt")


def measure(base: str, value: int, refreshes: int) -> dict:
    """The first ``refreshes`` refreshes of the demo's refinement phase from ``base`` with ``value`` fine-tune
    steps; training stops at the last of them (the steps after it change nothing measured here)."""
    from srdiff.trainer import SelfRefiningTrainer, TrainConfig

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig.from_file(CONFIG, highlighter_finetune_steps=value, eval_samples=0, progress=False,
                                       out_dir=out)
        most = (config.steps - config.base_steps) // config.cycle
        if not 2 <= refreshes <= most:
            raise ValueError(f"refreshes must be in 2..{most} (the demo's refinement phase), got {refreshes}")
        trainer = SelfRefiningTrainer(config)
        trainer.init_from(base)
        last = config.base_steps + (refreshes - 1) * config.cycle
        records, maps, started = [], [], time.perf_counter()
        while True:
            if trainer.refiner.due(trainer.step):
                records.append(trainer.refresh_mfam())
                maps.append(trainer.mfam.detach().cpu().flatten())
                print(f"fine-tune {value}: refresh {len(records)}/{refreshes} at step {trainer.step}", flush=True)
            if trainer.step == last:
                break
            trainer.train_step()
    moves = [{"corr": float(torch.corrcoef(torch.stack([a, b]))[0, 1]), "mean_abs_change": float((b - a).abs().mean())}
             for a, b in zip(maps, maps[1:])]
    return {"highlighter_finetune_steps": value, "config": CONFIG, "base": base, "refreshes": records, "moves": moves,
            "refine_seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg()}


def report(folder: Path) -> str:
    """The markdown table of every ``ft*.json`` in ``folder``: per value, the refreshes after the first (the
    first is the same for every value: its highlighter has just been trained and is not fine-tuned)."""
    runs = sorted((json.loads(p.read_text()) for p in Path(folder).glob("ft*.json")),
                  key=lambda r: r["highlighter_finetune_steps"])
    if not runs:
        raise ValueError(f"no ft*.json in {str(folder)!r}")

    def cells(values, digits):
        return ", ".join(f"{v:.{digits}f}" for v in values)

    last = len(runs[0]["refreshes"]) - 1
    lines = [f"| fine-tune steps | highlighter balanced accuracy before the fine-tune (refreshes 1-{last}) | empty FAMs "
             "(share) | mFAM max | mFAM corr. with the previous | mean abs. change | seconds per refresh |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        later = run["refreshes"][1:]
        seconds = sum(r["seconds"] for r in later) / len(later)
        lines.append(" | ".join([
            f"| {run['highlighter_finetune_steps']}", cells([r["highlighter_balanced_accuracy"] for r in later], 2),
            cells([r["empty_fam_fraction"] for r in later], 2), cells([r["mfam_max"] for r in later], 2),
            cells([m["corr"] for m in run["moves"]], 3), cells([m["mean_abs_change"] for m in run["moves"]], 3),
            f"{seconds:.1f} |"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-base", help="train the base phase into this run folder, then stop")
    parser.add_argument("--base", help="the demo config's base checkpoint (checkpoints/base.pt of a run of it)")
    parser.add_argument("--value", type=int, help="highlighter_finetune_steps to measure")
    parser.add_argument("--refreshes", type=int, default=5, help="how many refreshes to measure (the demo makes 5)")
    parser.add_argument("--out", help="folder for ft<value>.json")
    parser.add_argument("--report", help="print the table of the JSON files in this folder")
    args = parser.parse_args()
    if args.report:
        print(report(Path(args.report)))
        return
    if args.make_base:
        print(make_base(args.make_base))
        return
    missing = [flag for flag, value in (("--base", args.base), ("--value", args.value), ("--out", args.out))
               if value is None]
    if missing:
        parser.error(f"a measurement needs {', '.join(missing)} (or give --report or --make-base)")
    target = Path(args.out) / f"ft{args.value}.json"
    if target.exists():
        parser.error(f"{target} exists: move it away to measure again")
    result = measure(args.base, args.value, args.refreshes)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
