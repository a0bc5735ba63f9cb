"""The paper's ablation and sweeps at a chosen size: modes x seeds, recipes x seeds, and one sweep per axis
(lam_f, lam_r, base:refine ratio, cycle), with paired statistics.

The base phase is plain DDPM in every mode, so it is trained once per seed (the baseline run) and the
other modes, recipes, lambdas and cycles start their refinement phase from that run's
``checkpoints/base.pt``: they all see the same base model and differ only in the refinement phase.
A ratio run changes where the base phase ends, so it trains from scratch (its base phase repeats the
baseline's trajectory up to its own switch: every random draw is keyed by seed and step).

Every run lives in ``config.out_dir/seed<S>/<name>`` and is reused once its ``eval.json`` exists (a
run stopped part way resumes from its ``checkpoints/last.pt``), so an interrupted ablation picks up
where it stopped. ``ablation.json`` stores every run's evaluation; the tables (``ablation.md``) and
plots are generated from it (:func:`report`, ``srdiff ablate --report FILE``).

Statistics (:func:`paired_summary`): per mode the mean +- std over seeds, the FID difference to the
baseline of the same seed, its mean with a 95 % percentile bootstrap interval over seeds (10,000
resamples, seeded) and how many seeds improved (difference < 0).
"""

import argparse
import json
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from srdiff.trainer.ablation_costs import Stopwatch
from srdiff.trainer.config import TrainConfig

MODES = ("baseline", "forward", "reverse", "combined")
RECIPES = ("paper", "adm", "uvit")
LAMBDAS = (0.01, 0.025, 0.05, 0.1)
RATIOS = ("1:4", "1:1", "4:1")
PAPER_CYCLES = (50, 100, 500)
PAPER_REFINE_STEPS = 1000  # the paper's cycles are scaled by refine_steps / this (see docs/trainer.md)
SWEEP_AXES = ("lam_f", "lam_r", "ratio", "cycle")
METRICS = ("fid", "kid_mean", "precision", "recall")
BOOTSTRAP_RESAMPLES = 10_000
KEPT = ("config.json", "eval.json", "metrics.jsonl", "cost.json", "samples.png")  # per run, beside ablation.json
MIN_MAP_STD = 1e-3  # an mFAM whose std over pixels is below this is constant: the run's refinement had no map


def scaled_cycles(refine_steps: int) -> list[int]:
    """The paper's cycles (50, 100, 500 of 1000 refinement steps) scaled to ``refine_steps``."""
    return sorted({max(1, round(c * refine_steps / PAPER_REFINE_STEPS)) for c in PAPER_CYCLES})


def default_sweeps(config: TrainConfig) -> dict[str, list]:
    """The paper's values per axis (cycles scaled to this config's refinement steps)."""
    return {"lam_f": list(LAMBDAS), "lam_r": list(LAMBDAS), "ratio": list(RATIOS),
            "cycle": scaled_cycles(config.steps - config.base_steps)}


@dataclass(frozen=True)
class Run:
    """One training run of the plan: its config, the base checkpoint it refines from (None: from
    scratch), and what it stands for (``kind`` "mode" | "recipe" | "sweep", with its axis and value)."""

    config: TrainConfig
    init_from: Path | None
    kind: str
    axis: str
    value: object

    @property
    def name(self) -> str:
        return str(Path(self.config.out_dir).relative_to(Path(self.config.out_dir).parents[1]))


def _run_dir(root: Path, seed: int, mode: str, changes: dict) -> Path:
    suffix = "".join(f"-{k}{str(v).replace(':', 'to')}" for k, v in sorted(changes.items()))
    return root / f"seed{seed}" / f"{mode}{suffix}"


def plan(config: TrainConfig, *, seeds, modes, recipes=(), sweeps=None, sweep_seeds=None,
         base_seed: int | None = None, base_checkpoint: str | Path | None = None) -> list[Run]:
    """Every run the ablation needs, baselines first; runs that coincide (e.g. the combined run and the
    sweep point at the configured value) appear once per (kind, axis, value, seed) but share a directory.

    seeds: the seeds of the mode and recipe tables; modes: a subset of :data:`MODES` (the baseline is
    always trained, as the base of the others); recipes: combined-mode runs per recipe; sweeps:
    ``{axis: values}`` for axes of :data:`SWEEP_AXES` (combined mode) on ``sweep_seeds`` (default: the
    first seed).

    base_seed: None, one base phase per seed (each seed's baseline trains it, the seed's other runs refine
    from it); a seed, **one shared base**: that seed's baseline trains it (first in the plan) and every other
    run of every seed, baselines included, refines from it, on its train/held-out split (``data_seed``), so
    the seeds vary the refinement phase only.

    base_checkpoint: the shared base as a file instead (needs ``base_seed``, the seed that trained it, for
    its split), e.g. the base curve's ``step<base_steps>.pt``: every run refines from it, seed ``base_seed``'s
    baseline too (the draws are keyed by seed and step, so that run continues as it would from scratch)."""
    _check_plan(config, seeds, modes, recipes, sweeps or {})
    root = Path(config.out_dir)
    if base_checkpoint is not None and base_seed is None:
        raise ValueError(f"base_checkpoint {str(base_checkpoint)!r} needs base_seed: the seed that trained it "
                         "(its train/held-out split)")
    if base_seed is not None:
        config = config.replace(data_seed=base_seed)
    defaults = config.to_dict()

    def run(seed, mode, kind, axis, value, **changes):
        changes = {k: v for k, v in changes.items() if defaults[k] != v}
        owner = seed if base_seed is None else base_seed
        base = _run_dir(root, owner, "baseline", {}) / "checkpoints" / "base.pt"
        cfg = config.replace(mode=mode, seed=seed, out_dir=str(_run_dir(root, seed, mode, changes)), **changes)
        from_scratch = (mode == "baseline" and seed == owner) or "ratio" in changes
        if base_checkpoint is not None:
            base, from_scratch = Path(base_checkpoint), "ratio" in changes
        return Run(cfg, None if from_scratch else base, kind, axis, value)

    runs = []
    if base_seed is not None and base_seed not in seeds:
        runs.append(run(base_seed, "baseline", "mode", "mode", "baseline"))
    for seed in sorted(seeds, key=lambda s: s != base_seed):
        runs.append(run(seed, "baseline", "mode", "mode", "baseline"))
        runs += [run(seed, m, "mode", "mode", m) for m in modes if m != "baseline"]
        runs += [run(seed, "combined", "recipe", "recipe", r, recipe=r) for r in recipes]
    for seed in sweep_seeds if sweep_seeds is not None else list(seeds)[:1]:
        if seed not in seeds and seed != base_seed:
            runs.append(run(seed, "baseline", "mode", "mode", "baseline"))
        for axis, values in (sweeps or {}).items():
            runs += [run(seed, "combined", "sweep", axis, v, **{axis: v}) for v in values]
    return runs


def _check_plan(config: TrainConfig, seeds, modes, recipes, sweeps: dict) -> None:
    if config.eval_samples < 1:
        raise ValueError(f"eval_samples must be >= 1 for the ablation, got {config.eval_samples}")
    if config.base_steps < 1 or config.base_steps >= config.steps:
        raise ValueError(f"ratio {config.ratio!r} leaves no base or no refinement steps out of {config.steps}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    for name, values, allowed in (("modes", modes, MODES), ("recipes", recipes, RECIPES),
                                  ("sweep axes", list(sweeps), SWEEP_AXES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name} must be among {allowed}, got {bad}")
    for ratio in sweeps.get("ratio", []):
        base = config.replace(ratio=ratio).base_steps
        if base < 1 or base >= config.steps:
            raise ValueError(f"sweep ratio {ratio!r} leaves no base or no refinement steps out of {config.steps}")


def _check_config(folder: Path, run: Run) -> None:
    if (folder / "config.json").is_file():
        saved = json.loads((folder / "config.json").read_text())
        if saved != run.config.to_dict():
            changed = sorted(k for k, v in run.config.to_dict().items() if saved.get(k) != v)
            raise ValueError(f"{folder} holds a run with a different config ({', '.join(changed)}): "
                             "delete it or choose another out_dir")


def keep(run_dir: Path, store: Path) -> None:
    """Copy a finished run's small results (:data:`KEPT`, the mFAM of every refresh and the FAM overlays of the
    first and last) from ``run_dir`` to ``store``: what is committed, and what a later ablation reuses."""
    files = [run_dir / name for name in KEPT if (run_dir / name).is_file()]
    cycles = sorted((run_dir / "figures").glob("cycle_*_fam.png"))
    files += sorted((run_dir / "figures").glob("cycle_*_mfam.png")) + cycles[:1] + cycles[1:][-1:]
    for path in files:
        target = store / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def train_base(run: Run) -> Path:
    """Train the base phase of ``run`` (a from-scratch baseline) again, to ``checkpoints/base.pt`` in its
    folder: every draw is keyed by (seed, step), so the weights are the first training's bit for bit."""
    from srdiff.trainer.trainer import SelfRefiningTrainer

    trainer = SelfRefiningTrainer(run.config)
    print(f"[ablation] training the base phase of {run.name} again ({run.config.base_steps} steps)", flush=True)
    while trainer.step < run.config.base_steps:
        trainer.train_step()
    return trainer.save_checkpoint("base.pt")


def execute(run: Run, store: Path | None = None) -> dict:
    """Train and evaluate one run, or reuse the ``eval.json`` the same config left in ``store`` or in its run
    folder; a run stopped part way continues from its last checkpoint. A finished run's small results are
    copied to ``store`` (:func:`keep`), with ``cost.json``: the training's wall and CPU seconds and load."""
    from srdiff.trainer.trainer import SelfRefiningTrainer

    out = Path(run.config.out_dir)
    for folder in (out, store) if store is not None else (out,):
        _check_config(folder, run)
    if store is not None and (store / "eval.json").is_file():
        return json.loads((store / "eval.json").read_text())
    if not (out / "eval.json").is_file():
        resumed = (out / "checkpoints" / "last.pt").is_file()
        with Stopwatch(every=30.0) as watch:
            SelfRefiningTrainer(run.config).train(resume=True, init_from=str(run.init_from) if run.init_from else None)
        cost = {"training_and_evaluation": watch.record(), "resumed": resumed}
        (out / "cost.json").write_text(json.dumps(cost, indent=2) + "\n")
    if store is not None:
        keep(out, store)
    return json.loads((out / "eval.json").read_text())


def map_quality(metrics_path: str | Path) -> dict:
    """Per refresh of a run's ``metrics.jsonl``: the highlighter's balanced accuracy and the mFAM's mean, max
    and std; ``map_ok`` is False when some refresh gave an empty (max 0) or constant (std <
    :data:`MIN_MAP_STD`) mFAM, None for a run without refreshes (the baseline)."""
    fields = ("step", "highlighter_balanced_accuracy", "mfam_mean", "mfam_max", "mfam_std", "empty_fam_fraction")
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if '"refresh"' in line]
    refreshes = [{k: r.get(k) for k in fields} for r in records if r.get("event") == "refresh"]
    ok = None
    if refreshes:
        ok = all(r["mfam_max"] > 0 and (r["mfam_std"] is None or r["mfam_std"] >= MIN_MAP_STD) for r in refreshes)
    return {"refreshes": refreshes, "map_ok": ok}


def _record(run: Run, result: dict, folder: Path) -> dict:
    cost = json.loads((folder / "cost.json").read_text()) if (folder / "cost.json").is_file() else None
    return {"kind": run.kind, "axis": run.axis, "value": run.value, "seed": run.config.seed,
            "mode": run.config.mode, "dir": run.name, **{k: result[k] for k in (*METRICS, "kid_std", "n_real", "n_fake")},
            "feature_net": result["feature_net"], "sampling_seconds": result.get("sampling_seconds"), "cost": cost,
            "from_base": run.init_from is not None,
            **map_quality(folder / "metrics.jsonl")}


def run_ablation(config: TrainConfig, *, seeds, modes=MODES, out, recipes=(), sweeps=None, sweep_seeds=None,
                 base_seed: int | None = None, base_checkpoint: str | Path | None = None,
                 command: str | None = None) -> dict:
    """Train and evaluate the :func:`plan`, store ``out/ablation.json`` (rewritten after every run, so a
    partial result is always on disk), every finished run's small results under ``out/runs/<seed>/<name>``
    (:func:`keep`: reused by a later call, so a committed ``out`` resumes where it stopped) and the report
    generated from it; returns the JSON's content. A base checkpoint missing when a run needs it (its
    baseline was reused from ``out``) is trained again, to the same weights (:func:`train_base`).

    ``out`` may already hold the results of this same config (they are extended); results of another
    config raise ``ValueError`` rather than being overwritten."""
    runs = plan(config, seeds=seeds, modes=modes, recipes=recipes, sweeps=sweeps, sweep_seeds=sweep_seeds,
                base_seed=base_seed, base_checkpoint=base_checkpoint)
    if base_checkpoint is not None and not Path(base_checkpoint).is_file():
        raise ValueError(f"base_checkpoint {str(base_checkpoint)!r} does not exist (the base curve writes "
                         f"step<N>.pt: srdiff ablate --base-curve {config.base_steps})")
    out = Path(out)
    json_path = out / "ablation.json"
    threads = torch.get_num_threads()
    if json_path.is_file():
        stored = json.loads(json_path.read_text())
        if stored.get("config") != config.to_dict():
            raise ValueError(f"{json_path} holds results of a different config: choose another --out "
                             "(nothing was overwritten)")
        if stored.get("torch_threads", threads) != threads:
            raise ValueError(f"{json_path} was run with {stored['torch_threads']} torch thread(s), this process has "
                             f"{threads}: set OMP_NUM_THREADS={stored['torch_threads']} (CPU results, the shared base "
                             "included, are bit-identical only with the same thread count)")
    result = {"config": config.to_dict(), "command": command, "torch_threads": threads, "seeds": list(seeds),
              "modes": list(modes),
              "recipes": list(recipes), "sweeps": {k: list(v) for k, v in (sweeps or {}).items()},
              "sweep_seeds": list(sweep_seeds if sweep_seeds is not None else list(seeds)[:1]),
              "base_seed": base_seed, "base_checkpoint": None if base_checkpoint is None else str(base_checkpoint),
              "runs": [], "seconds": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    bases = {Path(r.config.out_dir) / "checkpoints" / "base.pt": r for r in runs if r.init_from is None}
    start = time.perf_counter()
    done: dict[str, dict] = {}
    for i, run in enumerate(runs, 1):
        key, store = run.config.out_dir, out / "runs" / run.name
        t0 = time.perf_counter()
        reused = key in done or (store / "eval.json").is_file() or (Path(key) / "eval.json").is_file()
        if not reused and run.init_from is not None and not run.init_from.is_file():
            train_base(bases[run.init_from])
        if key not in done:
            done[key] = execute(run, store)
        print(f"[ablation {i}/{len(runs)}] {run.name}: FID {done[key]['fid']:.3f} "
              f"({'reused' if reused else f'{time.perf_counter() - t0:.0f} s'})", flush=True)
        result["runs"].append(_record(run, done[key], store))
        result["seconds"] = time.perf_counter() - start
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    report(json_path)
    return result


# ---------------------------------------------------------------------------------------------- statistics
def bootstrap_mean_interval(values: list[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement, seeded).
    One value gives the degenerate interval (v, v)."""
    if not values:
        raise ValueError("bootstrap needs at least one value")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    lo = means[int((1 - level) / 2 * (resamples - 1))]
    hi = means[int(round((1 + level) / 2 * (resamples - 1)))]
    return lo, hi


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def detectable_effect(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest mean paired difference a two-sided paired t-test at ``alpha`` detects with ``power``,
    given the paired differences' standard deviation ``sd`` over ``n`` seeds: (t_{1-alpha/2} + t_{power}) sd / sqrt(n),
    t with n - 1 degrees of freedom. ``nan`` below two seeds."""
    from scipy.stats import t

    if n < 2:
        return float("nan")
    return float((t.ppf(1 - alpha / 2, n - 1) + t.ppf(power, n - 1)) * sd / n**0.5)


def verdict(summary: dict) -> str:
    """One plain sentence on a paired FID difference: its 95 % interval below 0 helps, above 0 hurts. Fewer
    than two paired seeds have no interval (one value's bootstrap is that value), so no verdict."""
    if summary["paired"] < 2:
        return (f"no verdict from {summary['paired']} paired seed (an interval needs at least two; "
                "the difference of one seed is not evidence)")
    lo, hi = summary["delta_ci"]
    if hi < 0:
        return "helps (lower FID on the paired seeds, interval below 0)"
    if lo > 0:
        return "hurts (higher FID on the paired seeds, interval above 0)"
    return (f"no effect distinguishable at this scale (the design detects a mean |ΔFID| of "
            f"{summary['detectable']:.2f} or more with 80 % power)")


def _maps(rows: list[dict]) -> dict:
    """The refreshes' highlighter balanced accuracy and mFAM mean/max, each (min, max) over runs and refreshes."""
    refreshes = [f for r in rows for f in r.get("refreshes") or []]
    if not refreshes:
        return {}

    def span(field):
        values = [f[field] for f in refreshes if f.get(field) is not None]
        return (min(values), max(values)) if values else None

    return {"refreshes": len(refreshes), **{field: span(field) for field in (
        "highlighter_balanced_accuracy", "mfam_mean", "mfam_max", "mfam_std", "empty_fam_fraction")}}


def _cost(rows: list[dict]) -> dict:
    """Mean wall and CPU seconds of the runs that refined a base checkpoint in one go (a resumed run's cost is
    partial, a run from scratch also trained the base phase)."""
    costs = [r["cost"]["training_and_evaluation"] for r in rows
             if r.get("cost") and r.get("from_base") and not r["cost"].get("resumed")]
    if not costs:
        return {}
    return {"runs_timed": len(costs), "wall_s": statistics.fmean(c["wall_s"] for c in costs),
            "cpu_s": statistics.fmean(c["cpu_s"] for c in costs),
            "load": (min(c["load_min"] for c in costs), max(c["load_max"] for c in costs))}


def paired_summary(rows: list[dict], baseline_fid: dict[int, float]) -> dict:
    """Mean +- std of each metric over ``rows`` (one per seed) and the paired FID differences to
    ``baseline_fid[seed]``: per seed, their mean, 95 % bootstrap interval, how many are < 0, their std,
    the smallest effect they could detect (:func:`detectable_effect`) and the :func:`verdict`. Runs whose
    map was empty or constant (``map_ok`` False) failed: they are listed in ``failed`` and left out."""
    failed = sorted(r["seed"] for r in rows if r.get("map_ok") is False)
    rows = [r for r in rows if r.get("map_ok") is not False]
    deltas = {r["seed"]: r["fid"] - baseline_fid[r["seed"]] for r in rows if r["seed"] in baseline_fid}
    summary = {m: _mean_std([r[m] for r in rows]) for m in METRICS} if rows else {}
    summary.update(n=len(rows), failed=failed, maps=_maps(rows), cost=_cost(rows))
    if deltas:
        values = [deltas[s] for s in sorted(deltas)]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.update(delta_per_seed={str(s): deltas[s] for s in sorted(deltas)}, delta_mean=statistics.fmean(values),
                       delta_ci=bootstrap_mean_interval(values), improved=sum(v < 0 for v in values),
                       paired=len(values), delta_sd=sd, detectable=detectable_effect(sd, len(values)))
        summary["verdict"] = verdict(summary)
    return summary


def complete_seeds(result: dict) -> list[int]:
    """The seeds whose every mode finished (a stopped ablation's tables use only these)."""
    done = {(r["value"], r["seed"]) for r in result["runs"] if r["kind"] == "mode"}
    return [s for s in result["seeds"] if all((m, s) in done for m in ("baseline", *result["modes"]))]


def summarise(result: dict) -> dict:
    """``{"modes": {mode: summary}, "recipes": {recipe: summary}, "sweeps": {axis: [{value, fid, ...}]}}``
    from a stored ``ablation.json``."""
    runs = result["runs"]
    baseline = {r["seed"]: r["fid"] for r in runs if r["kind"] == "mode" and r["value"] == "baseline"}
    table_seeds = set(complete_seeds(result))
    modes = {m: paired_summary([r for r in runs if r["kind"] == "mode" and r["value"] == m and r["seed"] in table_seeds],
                               baseline)
             for m in result["modes"] if table_seeds}
    recipes = {x: paired_summary([r for r in runs if r["kind"] == "recipe" and r["value"] == x], baseline)
               for x in result["recipes"] if any(r["kind"] == "recipe" and r["value"] == x for r in runs)}
    sweeps = {}
    for axis, values in result["sweeps"].items():
        points = []
        for v in values:
            rows = [r for r in runs if r["kind"] == "sweep" and r["axis"] == axis and r["value"] == v]
            if rows:
                points.append({"value": v, **paired_summary(rows, baseline)})
        sweeps[axis] = points
    return {"modes": modes, "recipes": recipes, "sweeps": sweeps}


# ---------------------------------------------------------------------------------------------- report
def _features_line(result: dict) -> str:
    from srdiff.trainer.metrics import describe_features

    first = result["runs"][0]
    nets = {r["feature_net"].get("identity"): r["feature_net"] for r in result["runs"]}
    if len(nets) == 1 or first["feature_net"].get("features") == "inception":
        kind = describe_features(first["feature_net"])
    else:
        accuracies = sorted(n["accuracy"] for n in nets.values())
        kind = (f"local features ({len(nets)} locally trained classifiers, one per seed's training split, "
                f"held-out accuracy {accuracies[0]:.3f}–{accuracies[-1]:.3f})")
    return f"FID/KID/precision/recall on {kind}, {first['n_fake']} samples vs {first['n_real']} held-out images"


def _delta_cells(s: dict, name: str) -> str:
    if "delta_mean" not in s or name == "baseline":
        return "– | – | –"
    lo, hi = s["delta_ci"]
    interval = f"[{lo:+.3f}, {hi:+.3f}]" if s["paired"] > 1 else "– (one seed)"
    return f"{s['delta_mean']:+.3f} | {interval} | {s['improved']}/{s['paired']}"


def _row(name: str, s: dict) -> str:
    if not s["n"]:
        return f"| {name} | every run failed (empty or constant map) | – | – | – | – | – | – |"
    fid, kid, prec, rec = s["fid"], s["kid_mean"], s["precision"], s["recall"]
    return (f"| {name} | {fid[0]:.3f} ± {fid[1]:.3f} | {_delta_cells(s, name)} | {1e3 * kid[0]:.2f} ± {1e3 * kid[1]:.2f} | "
            f"{prec[0]:.3f} ± {prec[1]:.3f} | {rec[0]:.3f} ± {rec[1]:.3f} |")


def markdown(result: dict) -> str:
    """The report's markdown: the mode table, per-seed differences, the recipe table and one table per
    sweep axis, each saying which features and how many seeds it used."""
    summary = summarise(result)
    c = result["config"]
    header = ("| {what} | FID (mean ± std) | ΔFID vs baseline (paired mean) | 95 % bootstrap CI | seeds improved | "
              "KID ×10³ | precision | recall |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [f"{c['data']} at {c['image_size']} px, {c['steps'] - _base_steps(c)} refinement steps after "
             f"{_base_steps(c)} base steps (ratio {c['ratio']}), cycle {c['cycle']}, λ_f = {c['lam_f']}, "
             f"λ_r = {c['lam_r']}, recipe {c.get('recipe', 'paper')}; {_features_line(result)}."]
    if result.get("command"):
        lines.append(f"Command: `{result['command']}` ({result['seconds'] / 60:.0f} min wall for what was run)")
    seeds = complete_seeds(result)
    if summary["modes"] and seeds:
        n = len(seeds)
        missing = [s for s in result["seeds"] if s not in seeds]
        lines += ["", f"Modes ({n} seed{'s' * (n > 1)}: {', '.join(map(str, seeds))}"
                  + (f"; not finished: seed {', '.join(map(str, missing))}" if missing else "") + "):", "",
                  header.format(what="mode")]
        lines += [_row(m, s) for m, s in summary["modes"].items()]
        lines += ["", "FID − baseline per seed:", "", "| mode | " + " | ".join(f"seed {x}" for x in seeds) + " |",
                  "| --- |" + " --- |" * len(seeds)]
        for m, s in summary["modes"].items():
            if m != "baseline" and "delta_per_seed" in s:
                lines.append(f"| {m} | " + " | ".join(f"{s['delta_per_seed'].get(str(x), float('nan')):+.3f}"
                                                      for x in seeds) + " |")
        lines += ["", "What it shows (paired by seed; 95 % percentile bootstrap over seeds, which under-covers at "
                  "five seeds; smallest detectable effect from the paired spread, two-sided paired t-test, "
                  "α = 0.05, power 0.8):", ""]
        lines += [_verdict_line(m, s) for m, s in summary["modes"].items() if m != "baseline"]
        lines += _maps_table(summary["modes"]) + _cost_lines(summary["modes"])
    if summary["recipes"]:
        recipe_seeds = sorted({r["seed"] for r in result["runs"] if r["kind"] == "recipe"})
        lines += ["", f"Recipes (combined mode from the same base checkpoints; seeds {', '.join(map(str, recipe_seeds))}; "
                  "a recipe missing a seed has fewer rows, see the column 'seeds improved'):", "",
                  header.format(what="recipe")]
        lines += [_row(x, s) for x, s in summary["recipes"].items()]
    for axis, points in summary["sweeps"].items():
        if points:
            seeds = result["sweep_seeds"]
            lines += ["", f"Sweep of {axis} (combined mode, seed{'s' * (len(seeds) > 1)} "
                      f"{', '.join(map(str, seeds))}; other settings as above):", "", header.format(what=axis)]
            lines += [_row(str(p["value"]), p) for p in points]
    return "\n".join(lines)


def _verdict_line(name: str, s: dict) -> str:
    if "verdict" not in s:
        return f"- **{name}**: no paired run finished" + (f" (failed: seed {', '.join(map(str, s['failed']))})"
                                                        if s["failed"] else "") + "."
    lo, hi = s["delta_ci"]
    failed = f"; failed (empty or constant map), left out: seed {', '.join(map(str, s['failed']))}" if s["failed"] else ""
    if s["paired"] < 2:
        return f"- **{name}**: ΔFID {s['delta_mean']:+.3f} on the one paired seed{failed}: {s['verdict']}."
    return (f"- **{name}**: ΔFID {s['delta_mean']:+.3f} [{lo:+.3f}, {hi:+.3f}], {s['improved']}/{s['paired']} seeds "
            f"improved, paired sd {s['delta_sd']:.3f}{failed}: {s['verdict']}.")


def _span(pair, digits: int = 3) -> str:
    return "–" if not pair else f"{pair[0]:.{digits}f}–{pair[1]:.{digits}f}"


def _maps_table(summaries: dict) -> list[str]:
    rows = [(m, s["maps"]) for m, s in summaries.items() if s.get("maps")]
    if not rows:
        return []
    lines = ["", "Maps (min–max over every refresh of every seed; a run with an empty or constant mFAM counts as "
             "failed):", "", "| mode | refreshes | highlighter balanced accuracy | mFAM mean | mFAM max | mFAM std | "
             "empty FAMs | failed runs |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, maps in rows:
        failed = ", ".join(f"seed {x}" for x in summaries[m]["failed"]) or "none"
        lines.append(f"| {m} | {maps['refreshes']} | {_span(maps['highlighter_balanced_accuracy'])} | "
                     f"{_span(maps['mfam_mean'])} | {_span(maps['mfam_max'])} | {_span(maps['mfam_std'])} | "
                     f"{_span(maps['empty_fam_fraction'], 2)} | {failed} |")
    return lines


def _cost_lines(summaries: dict) -> list[str]:
    rows = [(m, s["cost"]) for m, s in summaries.items() if s.get("cost")]
    if not rows:
        return []
    lines = ["", "Cost per run (training from the base checkpoint, refreshes and the evaluation; mean over the runs "
             "timed; the 1-minute load average seen while they ran):", ""]
    lines += [f"- {m}: {c['wall_s'] / 60:.1f} min wall, {c['cpu_s'] / 60:.1f} min CPU ({c['runs_timed']} runs, "
              f"load {c['load'][0]:.1f}–{c['load'][1]:.1f})" for m, c in rows]
    return lines


def _base_steps(config: dict) -> int:
    return TrainConfig.from_dict(config).base_steps


def report(json_path: str | Path) -> str:
    """Write ``ablation.md``, ``ablation.png`` and one ``sweep_<axis>.png`` per swept axis next to the stored
    ``ablation.json``, generated from it alone; returns the markdown. The other stored results regenerate
    their own: ``costs.json`` -> ``costs.md``, ``base_curve.json`` -> ``base_curve.{md,png}``,
    ``map_study.json`` -> ``map_study.md``."""
    json_path = Path(json_path)
    result = json.loads(json_path.read_text())
    if json_path.name in ("costs.json", "base_curve.json", "map_study.json"):
        return _other_report(json_path, result)
    out = json_path.parent
    text = markdown(result)
    (out / "ablation.md").write_text(text + "\n")
    summary = summarise(result)
    label = "FID (Inception)" if result["runs"][0]["feature_net"].get("features") == "inception" else "FID (local features)"
    if summary["modes"] or summary["recipes"]:
        plot_deltas(summary, out / "ablation.png", label)
    for axis, points in summary["sweeps"].items():
        if points:
            plot_sweep(axis, points, result, out / f"sweep_{axis}.png", label)
    return text


def write_into(doc: str | Path, json_path: str | Path, text: str) -> None:
    """Replace what lies between ``<!-- ABLATION:<name>:BEGIN -->`` and ``<!-- ABLATION:<name>:END -->`` in
    ``doc`` (the README, docs/trainer.md) with ``text``, the report of ``json_path`` (<name>: its file stem,
    e.g. ``ablation``, ``base_curve``); a doc without those markers raises rather than being left stale."""
    doc, name = Path(doc), Path(json_path).stem
    begin, end = f"<!-- ABLATION:{name}:BEGIN -->", f"<!-- ABLATION:{name}:END -->"
    content = doc.read_text()
    if content.count(begin) != 1 or content.count(end) != 1 or content.index(begin) > content.index(end):
        raise ValueError(f"{doc} has no single {begin} ... {end} section to write the report of {json_path} into")
    head, rest = content.split(begin)
    doc.write_text(f"{head}{begin}\n_Generated by `srdiff ablate --report {json_path}` from the stored JSON; do not "
                   f"edit by hand._\n\n{text}\n{end}{rest.split(end, 1)[1]}")


def _other_report(json_path: Path, result: dict) -> str:
    from srdiff.trainer import ablation_costs, base_curve, map_study

    module = {"costs.json": ablation_costs, "base_curve.json": base_curve, "map_study.json": map_study}[json_path.name]
    text = module.markdown(result)
    json_path.with_suffix(".md").write_text(text + "\n")
    if module is base_curve:
        base_curve.plot(result, json_path.with_suffix(".png"))
    return text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_deltas(summary: dict, path: Path, label: str) -> None:
    """Per mode and recipe: the per-seed FID differences to the baseline, their mean and 95 % interval."""
    plt = _pyplot()
    groups = [(f"{m}", s) for m, s in summary["modes"].items() if m != "baseline" and "delta_mean" in s]
    groups += [(f"recipe {x}", s) for x, s in summary["recipes"].items() if "delta_mean" in s]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(groups) + 1), 3.4))
    for i, (name, s) in enumerate(groups):
        ax.scatter([i] * len(s["delta_per_seed"]), list(s["delta_per_seed"].values()), color="0.6", s=12, zorder=2)
        lo, hi = s["delta_ci"]
        ax.errorbar([i], [s["delta_mean"]], yerr=[[s["delta_mean"] - lo], [hi - s["delta_mean"]]], fmt="o",
                    color="tab:blue", capsize=5, zorder=3)
    ax.axhline(0, color="0.3", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], rotation=20)
    ax.set_ylabel(f"Δ{label} vs baseline")
    ax.set_title("paired by seed (grey), mean and 95 % bootstrap CI: below 0 is better", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(axis: str, points: list[dict], result: dict, path: Path, label: str) -> None:
    """FID per value of one axis (mean over the sweep seeds, each seed's point in grey) and the baseline;
    values whose every run failed (empty or constant map) are left out."""
    plt = _pyplot()
    runs = [r for r in result["runs"] if r.get("map_ok") is not False]
    points = [p for p in points if p["n"]]
    base = [r["fid"] for r in runs if r["kind"] == "mode" and r["value"] == "baseline" and r["seed"] in result["sweep_seeds"]]
    xs = list(range(len(points)))
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for x, p in zip(xs, points):
        rows = [r["fid"] for r in runs if r["kind"] == "sweep" and r["axis"] == axis and r["value"] == p["value"]]
        ax.scatter([x] * len(rows), rows, color="0.6", s=12)
    ax.plot(xs, [p["fid"][0] for p in points], "o-", color="tab:green", label="combined")
    if base:
        ax.axhline(statistics.fmean(base), color="0.5", ls="--", label="baseline (same seeds)")
    ax.set_xticks(xs, [str(p["value"]) for p in points])
    ax.set(xlabel=axis, ylabel=label, title=f"sweep of {axis}, {len(result['sweep_seeds'])} seed(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- command line
# What the ablation runs, beside the TrainConfig: a flag, else the config file's [ablation] table, else this.
PLAN_DEFAULTS = {"seeds": [0, 1, 2, 3, 4], "modes": list(MODES), "recipes": list(RECIPES), "sweep_seeds": None,
                 "sweep_lam_f": list(LAMBDAS), "sweep_lam_r": list(LAMBDAS), "sweep_ratio": list(RATIOS),
                 "sweep_cycle": None, "base_seed": None, "base_checkpoint": None, "base_curve": [], "out": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``srdiff ablate`` flags (the TrainConfig flags are added by the caller). Every plan flag left out
    takes the config file's ``[ablation]`` value (same names, ``_`` for ``-``), else :data:`PLAN_DEFAULTS`."""
    p.add_argument("--config", help="TOML or YAML config: the shared settings of every run, and an optional "
                                    "[ablation] table with the plan (seeds, modes, recipes, sweep_* , out)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of the mode and recipe tables (default 0 1 2 3 4)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="modes (default: all four)")
    p.add_argument("--recipes", nargs="*", choices=RECIPES,
                   help="combined-mode runs per recipe on every seed (default: all three; none: --recipes alone)")
    p.add_argument("--sweep-seeds", type=int, nargs="+", help="seeds of the sweeps (default: the first seed)")
    p.add_argument("--sweep-lam-f", type=float, nargs="*", help="lam_f values (default 0.01 0.025 0.05 0.1; none: skip)")
    p.add_argument("--sweep-lam-r", type=float, nargs="*", help="lam_r values (default 0.01 0.025 0.05 0.1; none: skip)")
    p.add_argument("--sweep-ratio", nargs="*", help="base:refine ratios (default 1:4 1:1 4:1; none: skip)")
    p.add_argument("--sweep-cycle", type=int, nargs="*",
                   help="cycle values (default: the paper's 50/100/500 scaled to the refinement steps; none: skip)")
    p.add_argument("--no-sweeps", action="store_true", help="skip every sweep")
    p.add_argument("--base-seed", type=int, help="one base phase shared by every seed, trained by this seed's "
                                                 "baseline (default: one base phase per seed)")
    p.add_argument("--base-checkpoint", metavar="CKPT",
                   help="the shared base as a checkpoint at the end of the base phase (with --base-seed, the seed that "
                        "trained it), e.g. the base curve's step<N>.pt: every run refines from it")
    p.add_argument("--out", help="where ablation.json, ablation.md and the PNGs go "
                                 "(default: docs/figures/ablation/<config file name>)")
    p.add_argument("--report", metavar="JSON", help="only regenerate the tables and plots from a stored ablation.json "
                                                    "(or costs.json, base_curve.json, map_study.json)")
    p.add_argument("--into", nargs="+", metavar="DOC",
                   help="with --report: also write the report into these markdown files, between their "
                        "<!-- ABLATION:<json stem>:BEGIN/END --> markers (e.g. README.md docs/trainer.md)")
    p.add_argument("--costs", action="store_true",
                   help="instead of the ablation: time its units (steps, refreshes, samples, Inception images; wall "
                        "and CPU seconds, load) on this machine -> OUT/costs.json")
    p.add_argument("--base-curve", type=int, nargs="*", metavar="STEP",
                   help="instead of the ablation: the plain model's FID/KID/precision/recall at these steps "
                        "(none given: the [ablation] table's base_curve) -> OUT/base_curve.{json,png}, "
                        "OUT/base_curve_samples.png; runs under OUT_DIR/base_curve")
    p.add_argument("--map-study", metavar="CKPT",
                   help="instead of the ablation: how much the flaw maps of highlighter variants trained on the samples "
                        "of this (base) checkpoint are the digit itself -> OUT/map_study.{json,png}")


def _read_file(path: str) -> dict:
    if path.lower().endswith(".toml"):
        import tomllib

        return tomllib.loads(Path(path).read_text())
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


def resolve(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    """The TrainConfig (file and flags) and the plan (flags, the file's ``[ablation]`` table, defaults)."""
    import dataclasses

    table, config = {}, None
    if args.config:
        if not Path(args.config).is_file():
            raise ValueError(f"config file {args.config!r} does not exist")
        data = _read_file(args.config)
        table = data.pop("ablation", {}) if isinstance(data, dict) else {}
        unknown = sorted(set(table) - set(PLAN_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in [ablation] of {args.config!r}; known: {sorted(PLAN_DEFAULTS)}")
        config = TrainConfig.from_dict(data, where=f"config file {args.config!r}")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    config = config.replace(**overrides) if config is not None else TrainConfig(**overrides)
    given = {k: getattr(args, k) for k in PLAN_DEFAULTS if getattr(args, k) is not None}
    if given.get("base_curve") == []:  # --base-curve alone: the table's steps
        del given["base_curve"]
    settings = {k: given[k] if k in given else table.get(k, default) for k, default in PLAN_DEFAULTS.items()}
    if settings["sweep_cycle"] is None:
        settings["sweep_cycle"] = default_sweeps(config)["cycle"]
    if settings["out"] is None:
        settings["out"] = str(Path("docs/figures/ablation") / (Path(args.config).stem if args.config else "ablation"))
    return config, settings


def command(args: argparse.Namespace) -> str:
    """Run ``srdiff ablate`` (or ``--report``); returns the markdown report."""
    import shlex
    import sys

    if args.into and not args.report:
        raise ValueError(f"--into {' '.join(args.into)} needs --report JSON (the report to write into them)")
    if args.report:
        text = report(args.report)
        for doc in args.into or ():
            write_into(doc, args.report, text)
        return text
    config, s = resolve(args)
    if args.costs:
        from srdiff.trainer import ablation_costs

        costs = ablation_costs.measure_costs(config.replace(out_dir=str(Path(config.out_dir) / "costs")))
        costs["plan"] = {"base_steps": config.base_steps, "refine_steps": config.steps - config.base_steps,
                         "cycle": config.cycle, "eval_samples": config.eval_samples, "seeds": len(s["seeds"]),
                         "refined_modes": len([m for m in s["modes"] if m != "baseline"])}
        path = ablation_costs.write(costs, Path(s["out"]) / "costs.json")
        return f"{path}:\n" + json.dumps(costs["units"], indent=2)
    if args.map_study:
        from srdiff.trainer.map_study import run_map_study

        study = run_map_study(args.map_study, s["out"])
        return json.dumps({name: {k: v for k, v in r.items() if k != "planted"} for name, r in study["variants"].items()},
                          indent=2)
    if args.base_curve is not None:
        from srdiff.trainer.base_curve import run_base_curve

        points = s["base_curve"]
        if not points:
            raise ValueError("--base-curve needs steps: give them or set base_curve in the [ablation] table")
        curve = run_base_curve(config.replace(out_dir=str(Path(config.out_dir) / "base_curve")), points, s["out"])
        return "\n".join(f"step {p['step']}: FID {p['fid']:.2f}, precision {p['precision']:.3f}, "
                         f"recall {p['recall']:.3f}" for p in curve["points"])
    sweeps = {} if args.no_sweeps else {axis: s[f"sweep_{axis}"] for axis in SWEEP_AXES if s[f"sweep_{axis}"]}
    run_ablation(config, seeds=s["seeds"], modes=s["modes"], out=s["out"], recipes=s["recipes"], sweeps=sweeps,
                 sweep_seeds=s["sweep_seeds"], base_seed=s["base_seed"], base_checkpoint=s["base_checkpoint"],
                 command=shlex.join(["srdiff", *sys.argv[1:]]))
    return (Path(s["out"]) / "ablation.md").read_text()
