"""The planted-artifact benchmark: the artifacts, the localisation metrics, and a reduced-size run
that must localise (the full-size numbers come from ``srdiff highlighter eval-planted``)."""

import json

import pytest
import torch

from srdiff import cli
from srdiff.highlighter import planted


# Reduced size: 500 training digits, one planted copy each, 8 epochs, batch 32, the default recipe
# and FAM (mirror-averaged), 200 held-out digits. Measured on the 2-core CPU, two threads (as in CI),
# split and training seed s = 0 / 1 / 2 / 3 (this test is s = 0; docs/highlighter-reduced-seeds.jsonl):
# pointing blur 0.875 / 0.83 / 0.925 / 0.835, warp >= 0.945, noise 1, intensity 0.89 / 0.935 / 0.925 /
# 0.985, duplicate >= 0.98, break 1, checkerboard >= 0.985; accuracy >= 0.908 (blur), >= 0.983 for the
# rest. Without the mirror average the same runs give intensity 0.54 at s = 0 and checkerboard 0.16
# at s = 3: one orientation's map can sit beside the flaw. The full run (docs/highlighter.md) reaches more.
REDUCED = dict(train_images=500, test_images=200, copies=1, epochs=8, batch_size=32)
# (pointing, accuracy) floors: the earlier five-kind test's 0.85 and 0.95 for every kind but blur, the
# faintest. Blur's outcome moves with the CPU as much as with the seed: training is deterministic on one
# machine, but the conv kernels round differently per vendor and code path, and 8 epochs of AdamW
# (the best epoch is always the last: still improving) carry that into the result. Measured (blur, this
# test's sizes, two threads): Xeon (AVX-512) s = 0..3: accuracy 0.925 / 0.918 / 0.957 / 0.908, pointing
# 0.875 / 0.83 / 0.925 / 0.835; AMD EPYC (AVX2) s = 0..2: accuracy 0.8875 / 0.915 / 0.9375, pointing
# 0.83 / 0.86 / 0.87 (s = 0 is this test; at the same seed the Xeon's accuracy is 0.003-0.0375 higher,
# its pointing -0.03 to +0.055). Over the 7 runs accuracy 0.921 +- 0.022, pointing 0.861 +- 0.034
# (mean +- sd); the floors sit 3 sd below the mean and under every run: accuracy 0.85, pointing 0.75.
# What they protect: a classifier that detects the flaw (chance 0.5) and maps that point into its box
# (chance 0.098, the box's share of the image); a broken Grad-CAM (wrong layer, sign or orientation)
# points at about chance, as the clean twins' maps do (<= 0.015 here). The measurement runs with the
# scalar code paths (ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=SSE41) did not finish on the
# shared CPU.
FLOORS = {kind: (0.85, 0.95) for kind in planted.KINDS} | {"blur": (0.75, 0.85)}


@pytest.fixture(scope="module")
def digits32():
    return planted.digit_split(32, holdout=0.2, seed=0)[1][:64]


@pytest.mark.parametrize("kind", planted.KINDS)
def test_plant_changes_only_the_box(kind, digits32):
    fakes, boxes = planted.plant(digits32, kind, generator=torch.Generator().manual_seed(0))
    assert fakes.shape == digits32.shape and boxes.shape == (len(digits32), 4) and boxes.dtype == torch.long
    assert fakes.min() >= 0 and fakes.max() <= 1
    sides = boxes[:, 2:] - boxes[:, :2]
    assert bool((sides >= planted.BOX_SIDE[0]).all() and (sides <= planted.BOX_SIDE[1]).all())
    assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 32).all())
    inside = planted.box_masks(boxes, 32, 32)[:, None]
    assert torch.equal(fakes[~inside], digits32[~inside])
    change = ((fakes - digits32).abs() * inside).sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3))
    assert bool((change >= planted.MIN_CHANGE).all())


@pytest.mark.parametrize("kind", planted.KINDS)
def test_plant_is_reproducible_and_severity_is_monotone(kind, digits32):
    a = planted.plant(digits32, kind, generator=torch.Generator().manual_seed(3))
    b = planted.plant(digits32, kind, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    base = planted.DEFAULT_SEVERITY[kind]
    changes = [(planted.plant(digits32, kind, s, generator=torch.Generator().manual_seed(3))[0] - digits32).abs().mean()
               for s in (0.5 * base, base)]
    assert changes[0] < changes[1]


def test_plant_scales_with_the_image_size():
    images = planted.digit_split(64, holdout=0.2, seed=0)[1][:8]
    fakes, boxes = planted.plant(images, "warp", generator=torch.Generator().manual_seed(0))
    sides = boxes[:, 2:] - boxes[:, :2]
    assert bool((sides >= 2 * planted.BOX_SIDE[0]).all() and (sides <= 2 * planted.BOX_SIDE[1]).all())


@pytest.mark.parametrize(
    "args, error, message",
    [
        pytest.param(("sparkle",), ValueError, "kind must be one of .* got 'sparkle'", id="kind"),
        pytest.param(("blur", 0.0), ValueError, "severity must be > 0, got 0.0", id="severity"),
        pytest.param(("blur", -1), ValueError, "severity must be > 0, got -1.0", id="negative"),
    ],
)
def test_plant_bad_arguments(args, error, message, digits32):
    with pytest.raises(error, match=message):
        planted.plant(digits32, *args)


def test_plant_refuses_blank_images():
    with pytest.raises(ValueError, match="admit no blur edit"):
        planted.plant(torch.zeros(2, 1, 32, 32), "blur", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"images must be a float \(N, C, H, W\) tensor"):
        planted.plant(torch.zeros(32, 32), "noise")


def test_localisation_metrics_on_known_maps():
    boxes = torch.tensor([[2, 3, 6, 9], [0, 0, 4, 4]])
    maps = torch.zeros(2, 10, 12)
    maps[0, 2:6, 3:9] = 1.0  # exactly the box: pointing hit, IoU 1
    maps[1, 8, 10] = 1.0  # one hot pixel outside the box: miss, IoU 0
    m = planted.localisation_metrics(maps, boxes)
    assert m["pointing"] == 0.5 and m["iou"] == pytest.approx(0.5)
    assert m["chance"] == pytest.approx((24 / 120 + 16 / 120) / 2)
    half = torch.zeros(1, 10, 12)
    half[0, 2:6, 3:6] = 0.9  # half of the box: IoU 1/2
    assert planted.localisation_metrics(half, boxes[:1])["iou"] == pytest.approx(0.5)


def test_argmax_spread():
    maps = torch.zeros(4, 5, 5)
    maps[0, 1, 1] = maps[1, 1, 1] = maps[2, 3, 4] = 1.0  # map 3 is empty
    s = planted.argmax_spread(maps)
    assert s["empty"] == 0.25 and s["distinct"] == 2 and s["top_share"] == pytest.approx(2 / 3)


def test_cli_eval_planted_writes_results_and_grids(tmp_path):
    """The full-run command at a toy size: its outputs, not its numbers."""
    out = tmp_path / "planted"
    assert cli.main(["highlighter", "eval-planted", "--kinds", "checkerboard", "noise", "--train-images", "64",
                     "--test-images", "32",                     "--copies", "1", "--epochs", "1", "--batch-size", "16", "--image-size", "16", "--width", "4",
                     "--severity", "noise=0.2", "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_kind"]) == {"checkerboard", "noise"}
    assert results["config"]["severity"]["noise"] == 0.2 and results["config"]["train_images"] == 64
    assert results["config"]["test_images"] == 32
    row = results["per_kind"]["noise"]["noise"]
    assert set(row) >= {"accuracy", "roc_auc", "pointing", "iou", "chance", "twin_pointing"}
    assert set(results["cross"]["noise"]) == set(planted.KINDS)
    assert (out / "overlay-grid.png").is_file() and (out / "overlay-noise-noise.png").is_file()


def test_cli_eval_planted_refuses_unknown_kinds(capsys):
    assert cli.main(["highlighter", "eval-planted", "--kinds", "sparkle"]) == 2
    assert "srdiff highlighter eval-planted: error: --kinds takes" in capsys.readouterr().err
    assert cli.main(["highlighter", "eval-planted", "--kinds", "noise", "--severity", "noise:0.1"]) == 2
    assert "error: --severity takes KIND=VALUE" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("kind", planted.KINDS)
def test_default_highlighter_localises_planted_artifacts(kind):
    """Trained on real digits vs their planted versions, the default highlighter's FAMs point into the
    artifact box on held-out fakes, and the FAMs of the clean twins do not (no fixed hot spot)."""
    train, test = planted.digit_split(32, holdout=0.2, seed=0)
    train, test = train[: REDUCED["train_images"]], test[: REDUCED["test_images"]]
    hl, history = planted.train_highlighter(
        train, (kind,), severity={}, copies=REDUCED["copies"], model={}, seed=0,
        fit={"epochs": REDUCED["epochs"], "batch_size": REDUCED["batch_size"], "progress": False},
    )
    real_fams = hl.fam(test)
    metrics, _ = planted.evaluate(hl, test, kind, severity=None, seed=1, real_fams=real_fams)
    spread = planted.argmax_spread(real_fams)
    assert (1 - spread["empty"]) * spread["top_share"] < 0.5, spread  # clean images: no common hot spot
    min_pointing, min_accuracy = FLOORS[kind]
    assert metrics["accuracy"] >= min_accuracy, metrics
    assert metrics["pointing"] >= min_pointing, metrics
    assert metrics["iou"] > 2 * metrics["chance"], metrics
    assert metrics["twin_pointing"] < 0.3, metrics
