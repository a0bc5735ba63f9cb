"""The flaw-repair study behind docs/repair.md: planted artifacts, then a trained model's own samples.

    OMP_NUM_THREADS=1 .venv/bin/PYTHONPATH=benchmarks python -m srdiff_bench.repair_study --ckpt runs/repair-demo/checkpoints/last.pt \
        --pipeline runs/repair-demo/pipeline --highlighter runs/repair-demo/highlighter.pt --out docs/repair-results.json

Part 1 (planted): digits at the model's size with one planted artifact per image (every kind of
srdiff.highlighter.planted), a highlighter trained on real vs planted training digits, repairs of
held-out fakes with the model trained on clean digits; per kind: share flagged before/after, error to
the clean original inside the box before/after (paired), the largest change outside the mask; SDEdit at
the same strength for comparison. Part 2 (generated): the model's samples, flagged share and FID
(local digit-classifier features, held-out digits) before and after repair, against SDEdit at the same
strength on the same images with the same noise and against re-sampling the flagged images from
scratch; FID confidence intervals from a paired bootstrap over images. Part 3: figures.
"""

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from srdiff import viz
from srdiff.data import digits, split
from srdiff.highlighter import FlawHighlighter
from srdiff.highlighter.planted import KINDS, box_masks, make_fakes, plant
from srdiff.repair import repair_flaws


def paired(before: torch.Tensor, after: torch.Tensor) -> dict:
    """Means and the mean paired difference with a normal 95% CI."""
    d = (after - before).double()
    half = 1.96 * float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"before": float(before.mean()), "after": float(after.mean()), "diff": float(d.mean()), "ci95": half}


def sdedit_flagged(images, flagged, model, **kwargs) -> torch.Tensor:
    """SDEdit (:func:`srdiff.repair.sdedit`: the RePaint loop with a mask of ones) on the flagged images
    only, with the noise each image gets in :func:`repair_flaws` (its seed follows its index)."""
    ones = flagged[:, None, None, None].float().expand(-1, 1, *images.shape[-2:])
    return repair_flaws(images, model, masks=ones, **kwargs)[0]


def box_error(images, clean, boxes) -> torch.Tensor:
    """Per image: mean |images - clean| over its box."""
    inside = box_masks(boxes, *images.shape[-2:])[:, None].float()
    return ((images - clean).abs() * inside).sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3))


def outside_box_change(images, before, boxes) -> torch.Tensor:
    outside = (~box_masks(boxes, *images.shape[-2:]))[:, None].float()
    return ((images - before).abs() * outside).sum(dim=(1, 2, 3)) / outside.sum(dim=(1, 2, 3))


def planted_study(model, scheduler, size, args) -> tuple[dict, dict]:
    all_images, labels = digits(size)
    train_idx, test_idx = split(torch.arange(len(all_images)), 0.2, seed=0)
    train, test = all_images[train_idx], all_images[test_idx][: args.planted_images]
    t0 = time.perf_counter()
    fakes, _ = make_fakes(train, KINDS, {}, 1, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    hl = FlawHighlighter(in_channels=1, image_size=32)
    history = hl.fit(train, fakes, epochs=args.highlighter_epochs, seed=0, progress=False)
    hl.eval()
    hl_seconds = time.perf_counter() - t0
    clean_flagged = float((hl.predict(test) >= 0.5).float().mean())
    out = {"highlighter": {"trained_on": f"{len(train)} real vs {len(fakes)} planted (each digit one kind)",
                           "epochs": args.highlighter_epochs, "val": history[-1], "seconds": hl_seconds,
                           "clean_test_flagged": clean_flagged},
           "kinds": {}}
    examples = {}
    for k, kind in enumerate(KINDS):
        planted, boxes = plant(test, kind, generator=torch.Generator().manual_seed(100 + k))
        flagged = hl.predict(planted) >= 0.5
        rec = {"n": len(test), "flagged_before": float(flagged.float().mean())}
        err_before = box_error(planted, test, boxes)
        for strength in args.strengths:
            kw = dict(scheduler=scheduler, strength=strength, steps=args.steps, seed=0, progress=False)
            repaired, masks, report = repair_flaws(planted, model, hl, dilate=args.dilate, feather=args.feather,
                                                   **kw)
            edited = sdedit_flagged(planted, flagged, model, **kw)
            outside_px = (masks == 0).expand_as(planted)
            covered = (box_masks(boxes, size, size) & (masks[:, 0] > 0)).flatten(1).sum(1) / \
                box_masks(boxes, size, size).flatten(1).sum(1)
            rec[f"strength_{strength}"] = {
                "repair": {
                    "flagged_after": float((hl.predict(repaired) >= 0.5).float().mean()),
                    "unflagged_share_of_flagged": float((hl.predict(repaired[flagged]) < 0.5).float().mean())
                    if bool(flagged.any()) else None,
                    "box_error": paired(err_before[flagged], box_error(repaired, test, boxes)[flagged]),
                    "outside_mask_max_abs_change": float((repaired - planted).abs()[outside_px].max()),
                    "outside_mask_bit_exact": bool(torch.equal(repaired[outside_px], planted[outside_px])),
                    "outside_box_change": float(outside_box_change(repaired, planted, boxes)[flagged].mean()),
                    "mask_area": float((masks[flagged] > 0).float().mean()),
                    "empty_mask_share_of_flagged": float((masks[flagged].flatten(1).amax(1) == 0).float().mean()),
                    "box_covered_by_mask": float(covered[flagged].mean()),
                },
                "sdedit": {
                    "flagged_after": float((hl.predict(edited) >= 0.5).float().mean()),
                    "unflagged_share_of_flagged": float((hl.predict(edited[flagged]) < 0.5).float().mean())
                    if bool(flagged.any()) else None,
                    "box_error": paired(err_before[flagged], box_error(edited, test, boxes)[flagged]),
                    "outside_box_change": float(outside_box_change(edited, planted, boxes)[flagged].mean()),
                },
            }
            if strength == args.figure_strength:
                examples[kind] = (test[:3], planted[:3], hl.fam(planted[:3]), masks[:3], repaired[:3], edited[:3])
        out["kinds"][kind] = rec
        print(kind, json.dumps(rec[f"strength_{args.figure_strength}"]["repair"]["box_error"]), flush=True)
    return out, examples


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def generated_study(pipe, size, args) -> tuple[dict, tuple]:
    from srdiff.trainer.metrics import train_feature_net

    all_images, labels = digits(size)
    train_idx, hold_idx = split(torch.arange(len(all_images)), 0.2, seed=0)
    net, info = train_feature_net(all_images[train_idx], labels[train_idx], all_images[hold_idx], labels[hold_idx],
                                  epochs=8, seed=0)
    feats = lambda x: torch.cat([net(c).double() for c in x.split(512)]).numpy()  # noqa: E731
    real = feats(all_images[hold_idx])
    t0 = time.perf_counter()
    samples = pipe.generate(args.samples, args.sample_steps, seed=0)
    fresh = pipe.generate(args.samples, args.sample_steps, seed=1)
    sample_seconds = time.perf_counter() - t0
    hl = pipe.highlighter
    flagged = hl.predict(samples) >= 0.5
    out = {"feature_net": info, "n": args.samples, "sample_steps": args.sample_steps, "real": len(real),
           "flagged_before": float(flagged.float().mean()), "sampling_seconds": sample_seconds, "strengths": {}}
    base = feats(samples)
    rng = np.random.default_rng(0)
    boots = [rng.integers(0, len(base), len(base)) for _ in range(args.bootstrap)]
    fid_before = fid_from_features(base, real)
    boot_before = np.array([fid_from_features(base[i], real) for i in boots])
    figure = None
    for strength in args.strengths:
        kw = dict(strength=strength, steps=args.steps, seed=0, progress=False)
        t0 = time.perf_counter()
        repaired = pipe(samples, dilate=args.dilate, feather=args.feather, **kw)
        repair_seconds = time.perf_counter() - t0
        edited = sdedit_flagged(samples, flagged, pipe.pipeline.unet, scheduler=pipe.pipeline.scheduler, **kw)
        rounds3 = pipe(samples, dilate=args.dilate, feather=args.feather, rounds=3, **kw)
        methods = [("repair", repaired.images), ("repair_rounds3", rounds3.images)]
        if args.variants:
            methods += [("repair_resample3_jump2", pipe(samples, dilate=args.dilate, feather=args.feather, resample=3,
                                                        jump=2, **kw).images),
                        ("repair_threshold0.2", pipe(samples, dilate=args.dilate, feather=args.feather, threshold=0.2,
                                                     **kw).images)]
        resampled = torch.where(flagged[:, None, None, None], fresh, samples)
        rec = {"repair_seconds": repair_seconds,
               "mask_area_of_flagged": float((repaired.masks[flagged] > 0).float().mean()),
               "empty_mask_share_of_flagged": float((repaired.masks[flagged].flatten(1).amax(1) == 0).float().mean())}
        for name, images in methods + [("sdedit", edited), ("resample", resampled)]:
            f = feats(images)
            fid = fid_from_features(f, real)
            diffs = np.array([fid_from_features(f[i], real) for i in boots]) - boot_before
            change = (images - samples).abs()
            rec[name] = {
                "fid": fid, "fid_minus_before": fid - fid_before,
                "fid_diff_ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
                "flagged_after": float((hl.predict(images) >= 0.5).float().mean()),
                "unflagged_share_of_flagged": float((hl.predict(images[flagged]) < 0.5).float().mean())
                if bool(flagged.any()) else None,
                "mean_abs_change": float(change.mean()),
                "pixels_changed": float((change > 0).float().mean()),
                "fid_gain_per_mean_abs_change": (fid_before - fid) / float(change.mean()) if change.mean() > 0 else None,
            }
        kept = (repaired.masks == 0).expand_as(samples)
        rec["repair"]["outside_mask_bit_exact"] = bool(torch.equal(repaired.images[kept], samples[kept]))
        out["strengths"][str(strength)] = rec
        print(strength, json.dumps({k: v["fid"] for k, v in rec.items() if isinstance(v, dict)}), flush=True)
        if strength == args.figure_strength:
            idx = flagged.nonzero()[:, 0][:10]
            figure = (samples[idx], hl.fam(samples[idx]), repaired.masks[idx], repaired.images[idx], edited[idx],
                      fresh[idx])
    out["fid_before"] = fid_before
    return out, figure


def rgb(x):
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def save_rows(rows: list[torch.Tensor], path: Path, upscale: int = 6) -> None:
    """Rows of (n, 3, H, W) pictures, one row each, into one PNG."""
    viz.save_grid(torch.cat(rows), path, nrow=len(rows[0]), upscale=upscale)


def markdown(result: dict) -> str:
    """The docs/repair.md tables from a stored result."""
    lines = []
    planted = result.get("planted") or {"kinds": {}}
    for strength in result["settings"]["strengths"] if planted["kinds"] else []:
        key = f"strength_{strength}"
        if not all(key in rec for rec in planted["kinds"].values()):
            continue
        lines += [f"\nPlanted, strength {strength} (flagged fakes only; box error: mean |x - clean| in the box, "
                  "paired difference with 95% CI):\n",
                  "| kind | flagged | repair: no longer flagged | box error before | repair: after (diff ± CI) "
                  "| outside mask: max change | SDEdit: no longer flagged | SDEdit: box error after (diff ± CI) "
                  "| SDEdit: mean change outside the box | repair: mean change outside the box | mask area | "
                  "box covered | empty masks |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for kind, rec in planted["kinds"].items():
            r, e = rec[key]["repair"], rec[key]["sdedit"]
            lines.append(
                f"| {kind} | {rec['flagged_before']:.3f} | **{r['unflagged_share_of_flagged']:.3f}** | "
                f"{r['box_error']['before']:.4f} | {r['box_error']['after']:.4f} ({r['box_error']['diff']:+.4f} ± "
                f"{r['box_error']['ci95']:.4f}) | {r['outside_mask_max_abs_change']:.1f} | "
                f"{e['unflagged_share_of_flagged']:.3f} | {e['box_error']['after']:.4f} ({e['box_error']['diff']:+.4f} "
                f"± {e['box_error']['ci95']:.4f}) | {e['outside_box_change']:.4f} | {r['outside_box_change']:.4f} | "
                f"{r['mask_area']:.3f} | {r['box_covered_by_mask']:.3f} | {r['empty_mask_share_of_flagged']:.3f} |")
    gen = result["generated"]
    lines += [f"\nGenerated samples ({gen['n']}, flagged {gen['flagged_before']:.3f}; FID before "
              f"{gen['fid_before']:.3f}; FID difference CI: paired bootstrap over images):\n",
              "| strength | method | FID | FID − before (95% CI) | flagged after | flagged ones no longer flagged "
              "| mean abs change | pixels changed | FID gained per unit mean abs change |",
              "|---|---|---|---|---|---|---|---|---|"]
    for strength, rec in gen["strengths"].items():
        for name, m in rec.items():
            if not isinstance(m, dict):
                continue
            gain = m["fid_gain_per_mean_abs_change"]
            lines.append(
                f"| {strength} | {name} | {m['fid']:.3f} | {m['fid_minus_before']:+.3f} ({m['fid_diff_ci95'][0]:+.3f}, "
                f"{m['fid_diff_ci95'][1]:+.3f}) | {m['flagged_after']:.3f} | {m['unflagged_share_of_flagged']:.3f} | "
                f"{m['mean_abs_change']:.4f} | {m['pixels_changed']:.4f} | "
                f"{'–' if gain is None else f'{gain:+.2f}'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt")
    p.add_argument("--pipeline", help="the same model's exported diffusers pipeline folder")
    p.add_argument("--highlighter", help="the trainer's highlighter (real vs this model's samples)")
    p.add_argument("--out", default="docs/repair-results.json")
    p.add_argument("--figures", default="docs/figures/repair")
    p.add_argument("--planted-images", type=int, default=200)
    p.add_argument("--highlighter-epochs", type=int, default=10)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--figure-strength", type=float, default=0.5)
    p.add_argument("--dilate", type=int, default=1)
    p.add_argument("--feather", type=int, default=1)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--skip-planted", action="store_true", help="run part 2 only")
    p.add_argument("--variants", action="store_true",
                   help="part 2 also with RePaint resampling (3, jump 2) and a lower mask threshold (0.2)")
    p.add_argument("--tables", metavar="JSON", help="print the markdown tables of a stored result and exit")
    args = p.parse_args()
    if args.tables:
        print(markdown(json.loads(Path(args.tables).read_text())))
        return
    if not (args.ckpt and args.pipeline and args.highlighter):
        p.error("--ckpt, --pipeline and --highlighter are needed (or --tables)")
    from diffusers import DDIMPipeline

    from srdiff.repair_pipeline import FlawRepairPipeline
    from srdiff.diffusion.schedules import make_scheduler
    from srdiff.trainer.trained import load_ema_unet

    start = time.perf_counter()
    unet, config, _ = load_ema_unet(args.ckpt, "cpu")
    size = config.image_size
    planted, examples = (None, {}) if args.skip_planted else planted_study(unet, make_scheduler(config, "ddim"), size,
                                                                           args)
    pipe = FlawRepairPipeline(DDIMPipeline.from_pretrained(args.pipeline), FlawHighlighter.load(args.highlighter).eval())
    pipe.pipeline.set_progress_bar_config(disable=True)
    generated, figure = generated_study(pipe, size, args)
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, (clean, fake, fam, mask, fixed, edited) in examples.items():
        rows += [rgb(clean), rgb(fake), viz.overlay(fake, fam), viz.overlay(fake, mask[:, 0]), rgb(fixed),
                 rgb(edited)]
    if rows:
        save_rows([torch.cat(rows[i::6]) for i in range(6)], figures / "planted.png")
    samples, fam, mask, fixed, edited, fresh = figure
    save_rows([rgb(samples), viz.overlay(samples, fam), viz.overlay(samples, mask[:, 0]), rgb(fixed),
               (rgb(fixed) - rgb(samples)).abs().clamp(0, 1) * 4, rgb(edited), rgb(fresh)], figures / "generated.png")
    result = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/PYTHONPATH=benchmarks python -m srdiff_bench.repair_study " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), no GPU",
        "model": {"ckpt": args.ckpt, "config": {k: config.to_dict()[k] for k in ("image_size", "mode", "steps", "seed")}},
        "settings": {"steps": args.steps, "strengths": args.strengths, "dilate": args.dilate, "feather": args.feather,
                     "threshold": 0.5, "threshold_mode": "relative", "flag_threshold": 0.5, "scheduler": "DDIM eta 0",
                     "seed": 0},
        "planted": planted, "generated": generated, "seconds": time.perf_counter() - start,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} and {figures}/ in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
