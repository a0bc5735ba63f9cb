"""Do the refinement's flaw maps point at flaws, or at the digit? Measured on the model an ablation refines,
before the hours of refinement runs are spent.

For each highlighter variant (:data:`VARIANTS`: the trainer's own and cheap changes to it) a highlighter is
trained as the trainer pre-trains one at the phase switch (the base model's samples vs as many real
training images), then scored on fresh samples it never saw:

- ``balanced_accuracy``: real held-out digits vs the fresh samples (0.5: chance, and empty maps);
- how much a FAM is the digit itself: ``mass_on_digit``, the share of the map's mass on the sample's own
  strokes (pixels above :data:`INK`), against ``digit_area``, the strokes' share of the pixels (a map
  spread evenly scores the area; ``digit_lift`` is the ratio), ``iou_digit``, the IoU of the map's hot
  half (>= 0.5) with the strokes, and ``corr_image``, the per-image Pearson correlation of map and image;
- how much a FAM is the same for every image: ``corr_mfam``, the per-image correlation with the mFAM (1:
  every map is the batch mean, a fixed prior rather than this image's flaws), and the mFAM's mean/max/std;
- whether it finds flaws at all: ``pointing`` on held-out real digits with one planted artifact
  (:mod:`srdiff.highlighter.planted`, kinds the highlighter was never trained on) against ``chance``,
  the box's share of the image.

``map_study.json`` holds the numbers, ``map_study.md`` the table drawn from them; ``map_study.png`` shows,
per variant, the first samples' FAMs and the mFAM. Nothing here changes a run: a variant is adopted by configuring it.
"""

import json
from pathlib import Path

import torch

from srdiff import viz
from srdiff.diffusion.seeding import HL_FIT, HL_SAMPLES, MFAM, key

INK = 0.5  # a pixel above this is a stroke (as srdiff.highlighter.planted)
SHOWN = 8  # samples per variant in the figure
STUDY = 7  # keys this study's draws apart from a run's

# name -> (FlawHighlighter keywords, fit keywords, samples factor, what it is)
VARIANTS = {
    "default": ({}, {}, 1, "the trainer's: small CNN, Grad-CAM at its last stage"),
    "stage2": ({"target_layers": ["features.stage2"]}, {}, 1, "Grad-CAM one stage earlier (twice as fine a map)"),
    "input32": ({"image_size": 32}, {}, 1, "images upsampled to 32 px for the highlighter (twice as fine a map)"),
    "strong": ({}, {"epochs": 30}, 4, "4x the samples, 30 epochs"),
}


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, P) x (N, P) -> (N,) correlation of each row pair (0 where a row is constant)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    denom = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return (a * b).sum(1) / denom


def digit_overlap(images: torch.Tensor, fams: torch.Tensor) -> dict:
    """How much the maps (N, H, W) are the images' own strokes (N, C, H, W); empty maps are left out of
    the ratios and counted in ``empty`` (every map empty: the ratios are None)."""
    ink = images.float().mean(1) > INK
    fams = fams.float()
    flat, strokes = fams.flatten(1), ink.flatten(1)
    empty = flat.amax(1) <= 0
    full = ~empty
    mass = (flat * strokes).sum(1)[full] / flat.sum(1)[full]
    area = strokes.float().mean(1)[full]
    hot = (flat >= 0.5)[full]
    iou = (hot & strokes[full]).sum(1) / (hot | strokes[full]).sum(1).clamp_min(1)
    mfam = fams.mean(0).flatten()
    summary = {"empty": empty.float().mean().item(),
               "mfam_mean": mfam.mean().item(), "mfam_max": mfam.max().item(), "mfam_std": mfam.std().item()}
    if not bool(full.any()):
        return {**summary, **dict.fromkeys(("mass_on_digit", "digit_area", "digit_lift", "iou_digit", "corr_image",
                                             "corr_mfam"))}
    return {
        **summary,
        "mass_on_digit": mass.mean().item(), "digit_area": area.mean().item(),
        "digit_lift": (mass / area.clamp_min(1e-12)).mean().item(), "iou_digit": iou.float().mean().item(),
        "corr_image": _pearson_rows(flat[full], images.float().mean(1).flatten(1)[full]).mean().item(),
        "corr_mfam": _pearson_rows(flat[full], mfam.expand_as(flat[full])).mean().item(),
    }


def planted_pointing(hl, real: torch.Tensor, seed: int) -> dict:
    """Pointing of ``hl``'s FAMs at one planted artifact per real image, per kind (never trained on)."""
    from srdiff.highlighter.planted import KINDS, localisation_metrics, plant

    out = {}
    for i, kind in enumerate(KINDS):
        fakes, boxes = plant(real, kind, generator=torch.Generator().manual_seed(key(STUDY, seed, i)))
        out[kind] = localisation_metrics(hl.fam(fakes).cpu(), boxes)
    return out


def run_map_study(checkpoint: str | Path, out: str | Path, *, variants=tuple(VARIANTS), n_eval: int = 256) -> dict:
    """Train every variant on the samples of the EMA model in ``checkpoint`` (a base checkpoint: the one the
    ablation refines) and score its maps; writes ``out/map_study.{json,png}`` and returns the JSON's content."""
    from srdiff.highlighter import FlawHighlighter
    from srdiff.highlighter.training import evaluate
    from srdiff.trainer.dataset import load_dataset
    from srdiff.trainer.trained import load_trained

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants must be among {tuple(VARIANTS)}, got {unknown}")
    trained = load_trained(checkpoint)
    c = trained.config
    data = load_dataset(c, torch.device("cpu"))

    def draw(n, seed):
        return trained.sample(n, seed=seed, steps=c.mfam_sampler_steps)

    def real_subset(images, n, seed):
        return images[torch.randint(0, len(images), (n,), generator=torch.Generator().manual_seed(seed))]

    fresh = draw(n_eval, key(STUDY, MFAM, c.seed))
    held_out = real_subset(data.holdout_images, n_eval, key(STUDY, c.seed))
    labels = torch.cat([torch.zeros(n_eval, dtype=torch.long), torch.ones(n_eval, dtype=torch.long)])
    most = max(VARIANTS[v][2] for v in variants) * c.highlighter_samples
    pool = draw(most, key(HL_SAMPLES, c.seed))  # the first highlighter_samples are the trainer's own draw
    result = {"checkpoint": str(checkpoint), "step": torch.load(checkpoint, weights_only=True)["step"],
              "config": {k: c.to_dict()[k] for k in ("data", "image_size", "highlighter_backbone", "highlighter_epochs",
                                                     "highlighter_samples", "mfam_sampler_steps", "seed")},
              "n_eval": n_eval, "ink_threshold": INK, "variants": {}}
    blank = torch.zeros(1, 3, *fresh.shape[-2:])
    rows = [torch.cat([fresh[:SHOWN].expand(-1, 3, -1, -1), blank]),
            torch.cat([(fresh[:SHOWN] > INK).float().expand(-1, 3, -1, -1), blank])]
    for name in variants:
        model_kwargs, fit_kwargs, factor, what = VARIANTS[name]
        fake = pool[: factor * c.highlighter_samples]
        fit_seed = key(HL_FIT, c.seed, 0)  # the trainer's pre-training draws (srdiff.Refiner._start)
        real = real_subset(data.train_images, len(fake), key(HL_FIT, fit_seed, 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key(HL_FIT, c.seed))
            hl = FlawHighlighter(**{"backbone": c.highlighter_backbone, "in_channels": c.channels,
                                    "image_size": c.image_size, **model_kwargs})
            torch.manual_seed(fit_seed)
            hl.fit(real, fake, seed=fit_seed, progress=False, **{"epochs": c.highlighter_epochs, **fit_kwargs})
        fams = hl.fam(fresh)
        accuracy = evaluate(hl, torch.cat([held_out, fresh]), labels)["balanced_accuracy"]
        pointing = planted_pointing(hl, held_out[:64], c.seed)
        result["variants"][name] = {"what": what, "model": model_kwargs, "fit": fit_kwargs,
                                    "train_samples": len(fake), "balanced_accuracy": accuracy,
                                    **digit_overlap(fresh, fams), "planted": pointing}
        rows.append(torch.cat([viz.overlay(fresh[:SHOWN], fams[:SHOWN]), viz.colormap(fams.mean(0))[None]]))
        print(f"[map study] {name}: balanced accuracy {accuracy:.3f}, empty maps {result['variants'][name]['empty']:.2f}",
              flush=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "map_study.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "map_study.md").write_text(markdown(result) + "\n")
    # row 1: samples; row 2: their strokes; then per variant the first samples' FAMs and, last, the mFAM
    viz.save_grid(torch.cat(rows), out / "map_study.png", nrow=SHOWN + 1, upscale=4)
    return result


FLAW_KINDS = ("blur", "warp", "noise", "intensity", "duplicate", "break")  # planted kinds but the control


def markdown(result: dict) -> str:
    """The stored study as a table, one row per variant."""
    lines = [f"Highlighters trained on samples of the step-{result['step']} model (as many per variant as the "
             f"column 'trained on' says) vs as many real training digits, scored on {result['n_eval']} fresh "
             f"samples (strokes: pixels above {result['ink_threshold']}); planted: pointing at one artifact in "
             "64 held-out real digits, never trained on (mean over blur, warp, noise, intensity, duplicate, break; "
             "chance = the box's share of the image).", "",
             "| variant | what | trained on | balanced accuracy | map mass on the strokes (their area) | IoU hot half / strokes | "
             "corr with the image | corr with the mFAM | mFAM mean / max | planted pointing (chance) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in result["variants"].items():
        pointing = sum(v["planted"][k]["pointing"] for k in FLAW_KINDS) / len(FLAW_KINDS)
        chance = sum(v["planted"][k]["chance"] for k in FLAW_KINDS) / len(FLAW_KINDS)
        if v["mass_on_digit"] is None:
            lines.append(f"| {name} | {v['what']} | {v['train_samples']} | {v['balanced_accuracy']:.3f} | every map "
                         f"empty | – | – | – | – | {pointing:.2f} ({chance:.2f}) |")
            continue
        lines.append(f"| {name} | {v['what']} | {v['train_samples']} | {v['balanced_accuracy']:.3f} | {v['mass_on_digit']:.3f} "
                     f"({v['digit_area']:.3f}) | {v['iou_digit']:.3f} | {v['corr_image']:+.2f} | {v['corr_mfam']:.2f} | "
                     f"{v['mfam_mean']:.2f} / {v['mfam_max']:.2f} | {pointing:.2f} ({chance:.2f}) |")
    return "\n".join(lines)
