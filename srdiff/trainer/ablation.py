"""The paper's ablation at CPU size: baseline / forward / reverse / combined x seeds at the same step budget,
plus the lambda and cycle sweep, with FID/KID mean +- std tables and plots.

The base phase is plain DDPM in every mode, so it is trained once per seed (the baseline run) and the
other modes start their refinement phase from that run's ``checkpoints/base.pt``: every mode then sees
the same base model and the same number of refinement steps. Finished runs (their ``eval.json``
exists) are reused, so an interrupted ablation picks up where it stopped.
"""

import json
import statistics
from pathlib import Path

from srdiff.trainer.config import TrainConfig

LAMBDAS = (0.01, 0.025, 0.05, 0.1)
PAPER_CYCLES = (50, 100, 500)
PAPER_REFINE_STEPS = 1000  # the cycle lengths above are scaled by refine_steps / this (see docs/trainer.md)
METRICS = ("fid", "kid_mean", "precision", "recall")


def _run(config: TrainConfig, init_from: Path | None = None) -> dict:
    """Train and evaluate one run, or reuse its ``eval.json`` if the same config finished before."""
    from srdiff.trainer.trainer import SelfRefiningTrainer

    out = Path(config.out_dir)
    eval_path = out / "eval.json"
    if eval_path.is_file():
        saved = json.loads((out / "config.json").read_text())
        if saved != config.to_dict():
            changed = sorted(k for k, v in config.to_dict().items() if saved.get(k) != v)
            raise ValueError(f"{out} holds a finished run with a different config ({', '.join(changed)}): "
                             "delete it or choose another out_dir")
        return json.loads(eval_path.read_text())
    SelfRefiningTrainer(config).train(init_from=str(init_from) if init_from else None)
    return json.loads(eval_path.read_text())


def scaled_cycles(refine_steps: int) -> list[int]:
    return sorted({max(1, round(c * refine_steps / PAPER_REFINE_STEPS)) for c in PAPER_CYCLES})


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_ablation(config: TrainConfig, *, seeds, modes, out, sweep: bool = True, lambdas=LAMBDAS,
                 cycles=None) -> dict:
    """Train and evaluate every (mode, seed), then the sweep; write ``ablation.json``, ``ablation.md``,
    ``ablation.png`` and ``sweep.png`` under ``out``; returns the JSON's content (plus ``table``).

    The sweep runs the combined mode on the first seed for each λ in ``lambdas`` (λ_f = λ_r = λ) and
    each cycle in ``cycles`` (default: the paper's 50/100/500 scaled to the refinement steps)."""
    if config.eval_samples < 1:
        raise ValueError(f"eval_samples must be >= 1 for the ablation, got {config.eval_samples}")
    if config.base_steps < 1 or config.base_steps >= config.steps:
        raise ValueError(f"ratio {config.ratio!r} leaves no base or no refinement steps out of {config.steps}")
    root, out = Path(config.out_dir), Path(out)
    runs = []
    for seed in seeds:
        base_dir = root / f"seed{seed}" / "baseline"
        base = config.replace(mode="baseline", seed=seed, out_dir=str(base_dir))
        runs.append({"mode": "baseline", "seed": seed, **_run(base)})
        for mode in modes:
            if mode != "baseline":
                cfg = config.replace(mode=mode, seed=seed, out_dir=str(root / f"seed{seed}" / mode))
                runs.append({"mode": mode, "seed": seed, **_run(cfg, base_dir / "checkpoints" / "base.pt")})
    runs = [r for r in runs if r["mode"] in modes]
    sweep_runs = []
    if sweep:
        seed = seeds[0]
        base_ckpt = root / f"seed{seed}" / "baseline" / "checkpoints" / "base.pt"
        for lam in lambdas:
            cfg = config.replace(mode="combined", seed=seed, lam_f=lam, lam_r=lam,
                                 out_dir=str(root / "sweep" / f"lam{lam}"))
            sweep_runs.append({"param": "lambda", "value": lam, **_run(cfg, base_ckpt)})
        for cycle in cycles or scaled_cycles(config.steps - config.base_steps):
            # the configured cycle is the combined run of this seed: reuse it
            name = f"seed{seed}/combined" if cycle == config.cycle else f"sweep/cycle{cycle}"
            cfg = config.replace(mode="combined", seed=seed, cycle=cycle, out_dir=str(root / name))
            sweep_runs.append({"param": "cycle", "value": cycle, **_run(cfg, base_ckpt)})
    summary = {}
    base_fid = {r["seed"]: r["fid"] for r in runs if r["mode"] == "baseline"}
    for mode in modes:
        rows = [r for r in runs if r["mode"] == mode]
        summary[mode] = {m: _mean_std([r[m] for r in rows]) for m in METRICS}
        if base_fid:
            # paired by seed: every mode refines the same base model, so this removes the seed spread
            summary[mode]["fid_delta"] = _mean_std([r["fid"] - base_fid[r["seed"]] for r in rows])
    result = {"config": config.to_dict(), "seeds": list(seeds), "modes": list(modes), "runs": runs,
              "summary": summary, "sweep": sweep_runs,
              "feature_net": runs[0]["feature_net"] if runs else None}
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summary, len(seeds))
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ablation.md").write_text(table + "\n")
    plot_ablation(summary, out / "ablation.png")
    if sweep_runs:
        plot_sweep(sweep_runs, out / "sweep.png", baseline_fid=base_fid.get(seeds[0]))
    return {**result, "table": table}


def markdown_table(summary: dict, n_seeds: int) -> str:
    lines = [f"| mode | FID (mean ± std, {n_seeds} seeds) | FID − baseline (same seed) | KID ×10³ | precision | recall |",
             "| --- | --- | --- | --- | --- | --- |"]
    for mode, s in summary.items():
        fid, kid, prec, rec = s["fid"], s["kid_mean"], s["precision"], s["recall"]
        delta = f"{s['fid_delta'][0]:+.3f} ± {s['fid_delta'][1]:.3f}" if "fid_delta" in s else "–"
        lines.append(f"| {mode} | {fid[0]:.3f} ± {fid[1]:.3f} | {delta} | {1e3 * kid[0]:.2f} ± {1e3 * kid[1]:.2f} | "
                     f"{prec[0]:.3f} ± {prec[1]:.3f} | {rec[0]:.3f} ± {rec[1]:.3f} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ablation(summary: dict, path: Path) -> None:
    plt = _pyplot()
    modes = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, metric, label, scale in ((axes[0], "fid", "FID (local features)", 1.0),
                                     (axes[1], "kid_mean", "KID ×10³", 1e3)):
        means = [scale * summary[m][metric][0] for m in modes]
        stds = [scale * summary[m][metric][1] for m in modes]
        ax.bar(modes, means, yerr=stds, capsize=4, color=["0.6", "tab:blue", "tab:orange", "tab:green"][: len(modes)])
        ax.set_ylabel(label)
        ax.set_title(f"{label}: lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(sweep_runs: list[dict], path: Path, baseline_fid: float | None = None) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, param, xlabel in ((axes[0], "lambda", "λ (λ_f = λ_r)"), (axes[1], "cycle", "cycle (refinement steps)")):
        rows = sorted((r for r in sweep_runs if r["param"] == param), key=lambda r: r["value"])
        ax.plot([r["value"] for r in rows], [r["fid"] for r in rows], "o-", label="combined")
        if baseline_fid is not None:
            ax.axhline(baseline_fid, color="0.5", ls="--", label="baseline (same seed)")
        ax.set(xlabel=xlabel, ylabel="FID (local features)", xscale="log")
        ax.set_xticks([r["value"] for r in rows], [str(r["value"]) for r in rows])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.suptitle("combined mode, one seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
