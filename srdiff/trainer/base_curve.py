"""The base-length curve: sample quality of the plain model (baseline mode, no refinement) at chosen steps,
to choose where an ablation's base phase ends (the paper refines a model that already generates).

One run trains plain DDPM to the last step; at each chosen step it writes a checkpoint
(``checkpoints/step<N>.pt``), draws the evaluation samples from the EMA model (the same sampling seed at
every step) and scores them (FID, KID, k-NN precision/recall on ``config.features``) against the held-out
images. ``base_curve.json`` is rewritten after every point, so a stopped curve resumes from its last
point; ``base_curve.png`` (metrics against steps) is drawn from the JSON alone and ``base_curve_samples.png``
shows the first 16 evaluation samples of every point, one row each.

Every random draw of training is keyed by (seed, step), and the learning rate is constant after warm-up,
so the state at step N is the state at step N of any run of the same config whatever its total length:
the curve's checkpoint at the chosen base length equals the ablation's base checkpoint bit for bit
(:func:`same_weights` checks it).
"""

import json
from pathlib import Path

import torch

from srdiff import viz
from srdiff.trainer.ablation_costs import Stopwatch
from srdiff.trainer.config import TrainConfig
from srdiff.diffusion.seeding import FINAL, key

ROW = 16  # samples per point in base_curve_samples.png


def run_base_curve(config: TrainConfig, points: list[int], out: str | Path) -> dict:
    """Train ``config`` in baseline mode to ``max(points)`` steps under ``config.out_dir`` and evaluate
    ``config.eval_samples`` EMA samples at every step of ``points``; writes ``out/base_curve.json`` (and the
    figures) after every point and returns its content. A curve stopped part way continues from its last
    point's checkpoint (or from scratch, to the same weights, when the run folder is gone)."""
    from srdiff.trainer.trainer import REFINE_FIELDS, SelfRefiningTrainer

    points = sorted(set(points))
    if not points or points[0] < 1:
        raise ValueError(f"points must be positive step counts, got {points}")
    if config.eval_samples < 2:
        raise ValueError(f"eval_samples must be >= 2 for the base curve, got {config.eval_samples}")
    # What the refinement phase reads is left at its defaults: the curve is the same for every refinement setting.
    plain = {k: v for k, v in config.to_dict().items() if k not in (*REFINE_FIELDS, "ratio")}
    config = TrainConfig.from_dict(plain).replace(mode="baseline", steps=points[-1], progress=False)
    out = Path(out)
    json_path = out / "base_curve.json"
    result = {"config": config.to_dict(), "torch_threads": torch.get_num_threads(), "points": []}
    if json_path.is_file():
        stored = json.loads(json_path.read_text())
        if stored["config"] != config.to_dict():
            raise ValueError(f"{json_path} holds a curve of another config: choose another out (nothing was overwritten)")
        if stored.setdefault("torch_threads", result["torch_threads"]) != result["torch_threads"]:
            raise ValueError(f"{json_path} was run with {stored['torch_threads']} torch thread(s), this process has "
                             f"{result['torch_threads']}: set OMP_NUM_THREADS={stored['torch_threads']} (the weights "
                             "are bit-identical only with the same thread count)")
        result = stored
    trainer = SelfRefiningTrainer(config)
    done = [p["step"] for p in result["points"]]
    if done:
        trainer.resume(str(Path(config.out_dir) / "checkpoints" / f"step{done[-1]}.pt"))
    out.mkdir(parents=True, exist_ok=True)
    rows_path = Path(config.out_dir) / "sample_rows.pt"  # beside the checkpoints: not a result
    rows = torch.load(rows_path, weights_only=True) if rows_path.is_file() else {}
    for target in (p for p in points if p not in done):
        with Stopwatch() as training:
            while trainer.step < target:
                trainer.train_step()
        trainer.save_checkpoint(f"step{target}.pt")
        with Stopwatch() as evaluation:
            scores = trainer.evaluate(config.eval_samples)
        rows[str(target)] = trainer.sample(ROW, seed=key(FINAL, config.seed, 1), steps=config.sample_steps,
                                           sampler=config.sampler)
        result["points"].append({
            "step": target, **{k: scores[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall",
                                                         "n_real", "n_fake")},
            "feature_net": scores["feature_net"]["network"], "training": training.record(),
            "evaluation": evaluation.record(),
        })
        torch.save(rows, rows_path)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out / "base_curve.png")
        (out / "base_curve.md").write_text(markdown(result) + "\n")
        shown = [rows[str(p["step"])] for p in result["points"] if str(p["step"]) in rows]
        viz.save_grid(torch.cat(shown), out / "base_curve_samples.png", nrow=ROW, upscale=2)
        print(f"[base curve] step {target}: FID {scores['fid']:.2f}, precision {scores['precision']:.3f}, "
              f"recall {scores['recall']:.3f}", flush=True)
    return result


def plot(result: dict, path: str | Path) -> None:
    """FID (left axis) and k-NN precision/recall (right axis) against training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = [p["step"] for p in result["points"]]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.plot(steps, [p["fid"] for p in result["points"]], "o-", color="tab:blue", label="FID")
    ax.set(xlabel="base steps (batch %d)" % result["config"]["batch_size"], ylabel="FID (Inception)"
           if result["config"]["features"] == "inception" else "FID (local features)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fids = [p["fid"] for p in result["points"]]
    nice = [m * 10**e for e in range(-1, 4) for m in (1, 1.5, 2, 3, 4, 6)]
    ax.set_yticks([v for v in nice if min(fids) / 1.2 <= v <= max(fids) * 1.2])
    right = ax.twinx()
    right.plot(steps, [p["precision"] for p in result["points"]], "s--", color="tab:green", label="precision")
    right.plot(steps, [p["recall"] for p in result["points"]], "^--", color="tab:orange", label="recall")
    right.set(ylabel="k-NN precision / recall (k = 3)", ylim=(0, 1))
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    n = result["points"][0]["n_fake"] if result["points"] else 0
    ax.set_title(f"plain model on {result['config']['data']} {result['config']['image_size']} px, {n} samples",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested dict, by its dotted path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for name, sub in tree.items() for k, v in _tensors(sub, f"{prefix}.{name}").items()}
    return {}


def same_weights(a: str | Path, b: str | Path) -> bool:
    """Whether two trainer checkpoints are at the same step with bit-identical model, EMA and optimiser tensors."""
    from srdiff.trainer import checkpoint

    sa, sb = checkpoint.load(a), checkpoint.load(b)
    ta, tb = (_tensors({part: s[part] for part in ("model", "ema", "optimizer")}) for s in (sa, sb))
    return sa["step"] == sb["step"] and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def markdown(result: dict) -> str:
    """The stored curve as a table: per step the metrics and the CPU and wall seconds it took."""
    c = result["config"]
    lines = [f"Plain model (baseline mode) on {c['data']} at {c['image_size']} px, batch {c['batch_size']}, seed "
             f"{c['seed']}; {result['points'][0]['n_fake']} EMA samples x {c['sample_steps']} DDIM steps (the same "
             f"sampling seed at every step) against {result['points'][0]['n_real']} held-out images, "
             f"{result['points'][0]['feature_net']}.", "",
             "| steps | FID | KID ×10³ | precision | recall | training since the last point: CPU s / wall s | "
             "evaluation: CPU s / wall s | load average |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in result["points"]:
        t, e = p["training"], p["evaluation"]
        lines.append(f"| {p['step']} | {p['fid']:.2f} | {1e3 * p['kid_mean']:.2f} | {p['precision']:.3f} | "
                     f"{p['recall']:.3f} | {t['cpu_s']:.0f} / {t['wall_s']:.0f} | {e['cpu_s']:.0f} / {e['wall_s']:.0f} | "
                     f"{min(t['load_min'], e['load_min']):.1f}–{max(t['load_max'], e['load_max']):.1f} |")
    return "\n".join(lines)
