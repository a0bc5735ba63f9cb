"""The ablation driver: the plan (shared base phase, recipes, one sweep per axis), paired statistics with
bootstrap intervals, a tiny end-to-end run whose finished runs are reused, and reports generated from JSON."""

import json

import pytest

from srdiff.trainer import TrainConfig, checkpoint
from srdiff.trainer.ablation import (bootstrap_mean_interval, markdown, paired_summary, plan, report, run_ablation,
                                     scaled_cycles)
from srdiff_testing import TINY_TRAIN

TINY = {**TINY_TRAIN, "steps": 4, "cycle": 1, "highlighter_finetune_steps": 0, "eval_samples": 16, "feature_epochs": 1}


def test_scaled_cycles():
    assert scaled_cycles(1000) == [50, 100, 500]
    assert scaled_cycles(200) == [10, 20, 100]
    assert scaled_cycles(5) == [1, 2]


def test_plan_shares_base_checkpoints_and_reuses_coinciding_runs(tmp_path):
    cfg = TrainConfig(**TINY, out_dir=str(tmp_path))
    runs = plan(cfg, seeds=[0, 1], modes=["baseline", "combined"], recipes=["paper", "uvit"],
                sweeps={"lam_f": [0.01, 0.1], "ratio": ["1:3"]})
    dirs = [(r.kind, r.value, r.name, r.init_from and r.init_from.relative_to(tmp_path).as_posix()) for r in runs]
    base0, base1 = "seed0/baseline/checkpoints/base.pt", "seed1/baseline/checkpoints/base.pt"
    assert dirs == [
        ("mode", "baseline", "seed0/baseline", None), ("mode", "combined", "seed0/combined", base0),
        ("recipe", "paper", "seed0/combined", base0),  # the configured recipe is the combined run itself
        ("recipe", "uvit", "seed0/combined-recipeuvit", base0),
        ("mode", "baseline", "seed1/baseline", None), ("mode", "combined", "seed1/combined", base1),
        ("recipe", "paper", "seed1/combined", base1), ("recipe", "uvit", "seed1/combined-recipeuvit", base1),
        ("sweep", 0.01, "seed0/combined", base0),  # lam_f = 0.01 is the configured value
        ("sweep", 0.1, "seed0/combined-lam_f0.1", base0),
        ("sweep", "1:3", "seed0/combined-ratio1to3", None),  # another switch step: trained from scratch
    ]
    assert runs[-1].config.base_steps == 1 and runs[-2].config.lam_f == 0.1 and runs[3].config.recipe == "uvit"


@pytest.mark.parametrize("bad, message", [
    (dict(modes=["sideways"]), r"modes must be among .*, got \['sideways'\]"),
    (dict(recipes=["ddim"]), r"recipes must be among \('paper', 'adm', 'uvit'\), got \['ddim'\]"),
    (dict(sweeps={"lr": [1.0]}), r"sweep axes must be among .*, got \['lr'\]"),
    (dict(sweeps={"ratio": ["1:0"]}), r"sweep ratio '1:0' leaves no base or no refinement steps out of 4"),
    (dict(seeds=[0, 0]), r"seeds must be distinct and at least one, got \[0, 0\]"),
])
def test_plan_rejects_bad_axes(tmp_path, bad, message):
    kwargs = {"seeds": [0], "modes": ["baseline"], **bad}
    with pytest.raises(ValueError, match=message):
        plan(TrainConfig(**TINY, out_dir=str(tmp_path)), **kwargs)


def test_ablation_needs_evaluation_and_two_phases(tmp_path):
    with pytest.raises(ValueError, match=r"eval_samples must be >= 1 for the ablation, got 0"):
        run_ablation(TrainConfig(eval_samples=0), seeds=[0], modes=["baseline"], out=tmp_path)
    with pytest.raises(ValueError, match=r"ratio '1:0' leaves no base or no refinement steps out of 2000"):
        run_ablation(TrainConfig(eval_samples=8, ratio="1:0"), seeds=[0], modes=["baseline"], out=tmp_path)


def test_bootstrap_interval():
    assert bootstrap_mean_interval([0.3]) == (0.3, 0.3)
    lo, hi = bootstrap_mean_interval([-1.0, -2.0, -3.0, -4.0, -5.0])
    # the mean of a resample lies between the smallest and largest value; 95 % of them well inside
    assert -5.0 <= lo < -3.0 < hi <= -1.0 and bootstrap_mean_interval([-1.0, -2.0, -3.0, -4.0, -5.0]) == (lo, hi)
    with pytest.raises(ValueError, match="bootstrap needs at least one value"):
        bootstrap_mean_interval([])


def test_paired_summary_pairs_by_seed():
    rows = [{"seed": s, "fid": f, "kid_mean": 0.0, "precision": 0.5, "recall": 0.5} for s, f in ((0, 9.0), (1, 4.5), (2, 7.0))]
    s = paired_summary(rows, {0: 10.0, 1: 5.0, 2: 6.0})
    assert s["delta_per_seed"] == {"0": -1.0, "1": -0.5, "2": 1.0} and s["improved"] == 2 and s["paired"] == 3
    assert s["delta_mean"] == pytest.approx(-1 / 6) and s["fid"][0] == pytest.approx(41 / 6)
    assert s["delta_ci"][0] <= s["delta_mean"] <= s["delta_ci"][1]


@pytest.mark.slow
def test_tiny_ablation_end_to_end(tmp_path):
    cfg = TrainConfig(**TINY, out_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = run_ablation(cfg, seeds=[0, 1], modes=["baseline", "reverse"], out=out, recipes=["adm"],
                          sweeps={"lam_r": [0.05], "ratio": ["3:1"]}, command="srdiff ablate (test)")
    assert [(r["kind"], r["value"], r["seed"]) for r in result["runs"]] == [
        ("mode", "baseline", 0), ("mode", "reverse", 0), ("recipe", "adm", 0),
        ("mode", "baseline", 1), ("mode", "reverse", 1), ("recipe", "adm", 1),
        ("sweep", 0.05, 0), ("sweep", "3:1", 0)]
    # the reverse and recipe runs refined from the baseline runs' base checkpoints (steps 3, 4 after base step 2)
    for seed in (0, 1):
        assert checkpoint.load(tmp_path / "runs" / f"seed{seed}" / "baseline" / "checkpoints" / "base.pt")["step"] == 2
        for name in ("reverse", "combined-recipeadm"):
            records = (tmp_path / "runs" / f"seed{seed}" / name / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(r)["step"] for r in records if '"loss"' in r] == [3, 4]
    ratio_records = (tmp_path / "runs" / "seed0" / "combined-ratio3to1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in ratio_records if '"loss"' in r] == [1, 2, 3, 4]
    stored = json.loads((out / "ablation.json").read_text())
    assert stored["runs"] == result["runs"] and stored["runs"][0]["feature_net"]["features"] == "local"
    text = (out / "ablation.md").read_text()
    assert "| reverse |" in text and "| adm |" in text and "Sweep of lam_r" in text and "Sweep of ratio" in text
    assert "local features" in text and "2 seeds: 0, 1" in text and "srdiff ablate (test)" in text
    for name in ("ablation.png", "sweep_lam_r.png", "sweep_ratio.png"):
        assert (out / name).is_file()
    # the tables come from the stored JSON alone
    (out / "ablation.md").unlink()
    assert report(out / "ablation.json") == text.rstrip("\n") == markdown(stored)
    # a second call reuses every finished run (nothing is retrained: the logs stay as they are)
    log = (tmp_path / "runs" / "seed1" / "reverse" / "metrics.jsonl").read_text()
    again = run_ablation(cfg, seeds=[0, 1], modes=["baseline", "reverse"], out=out, recipes=["adm"],
                         sweeps={"lam_r": [0.05], "ratio": ["3:1"]})
    assert [r["fid"] for r in again["runs"]] == [r["fid"] for r in result["runs"]]
    assert (tmp_path / "runs" / "seed1" / "reverse" / "metrics.jsonl").read_text() == log
    with pytest.raises(ValueError, match=r"seed0/baseline holds a run with a different config \(lr\)"):
        run_ablation(cfg.replace(lr=2e-3), seeds=[0], modes=["baseline"], out=tmp_path / "other")
    with pytest.raises(ValueError, match=r"ablation.json holds results of a different config: choose another --out"):
        run_ablation(cfg.replace(out_dir=str(tmp_path / "runs2")), seeds=[0], modes=["baseline"], out=out)


def _ablate_args(argv):
    import argparse

    from srdiff.trainer import ablation
    from srdiff.trainer.config import add_config_flags

    parser = argparse.ArgumentParser()
    ablation.add_arguments(parser)
    add_config_flags(parser)
    return parser.parse_args(argv)


def test_plan_from_flags_over_the_files_ablation_table_over_defaults(tmp_path):
    from srdiff.trainer.ablation import resolve

    path = tmp_path / "abl.toml"
    path.write_text('[refine]\nsteps = 400\n\n[ablation]\nseeds = [3, 4]\nrecipes = []\nsweep_lam_r = [0.05]\n')
    config, plan_ = resolve(_ablate_args(["--config", str(path), "--seeds", "7", "--lr", "0.001"]))
    assert config.steps == 400 and config.lr == 0.001
    assert plan_["seeds"] == [7] and plan_["recipes"] == [] and plan_["sweep_lam_r"] == [0.05]
    assert plan_["modes"] == ["baseline", "forward", "reverse", "combined"] and plan_["sweep_ratio"] == ["1:4", "1:1", "4:1"]
    assert plan_["sweep_cycle"] == [10, 20, 100] and plan_["out"] == "docs/figures/ablation/abl"  # 200 refinement steps
    path.write_text("[ablation]\nseed = [1]\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['seed'\] in \[ablation\]"):
        resolve(_ablate_args(["--config", str(path)]))


def test_plan_with_one_shared_base(tmp_path):
    cfg = TrainConfig(**TINY, out_dir=str(tmp_path))
    runs = plan(cfg, seeds=[1, 0, 2], modes=["baseline", "forward"], base_seed=0,
                sweeps={"ratio": ["1:3"], "lam_f": [0.1]}, sweep_seeds=[2])
    base = "seed0/baseline/checkpoints/base.pt"
    dirs = [(r.name, r.init_from and r.init_from.relative_to(tmp_path).as_posix()) for r in runs]
    assert dirs == [
        ("seed0/baseline", None), ("seed0/forward", base),  # the base seed first: it trains the shared base
        ("seed1/baseline", base), ("seed1/forward", base),  # other seeds' baselines refine it too
        ("seed2/baseline", base), ("seed2/forward", base),
        ("seed2/combined-ratio1to3", None), ("seed2/combined-lam_f0.1", base),
    ]
    assert {r.config.data_seed for r in runs} == {0} and [r.config.seed for r in runs][:3] == [0, 0, 1]
    # a base seed outside the table seeds still trains the base, first
    runs = plan(cfg, seeds=[1], modes=["baseline"], base_seed=5)
    assert [(r.name, r.init_from is None) for r in runs] == [("seed5/baseline", True), ("seed1/baseline", False)]


def test_map_quality_flags_empty_and_constant_maps(tmp_path):
    from srdiff.trainer.ablation import map_quality

    def log(*refreshes):
        path = tmp_path / "metrics.jsonl"
        lines = [{"step": 1, "phase": "base", "loss": 1.0}]
        lines += [{"event": "refresh", "step": 2 + i, "highlighter_balanced_accuracy": 0.9, "mfam_mean": mean,
                   "mfam_max": top, "mfam_std": std, "empty_fam_fraction": 0.0} for i, (mean, top, std) in enumerate(refreshes)]
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        return map_quality(path)

    good = log((0.3, 1.0, 0.2), (0.25, 0.9, 0.1))
    assert good["map_ok"] is True and [r["step"] for r in good["refreshes"]] == [2, 3]
    assert log((0.3, 1.0, 0.2), (0.0, 0.0, 0.0))["map_ok"] is False  # a refresh with an empty map
    assert log((0.5, 0.5, 0.0))["map_ok"] is False  # constant
    assert log() == {"refreshes": [], "map_ok": None}  # the baseline refreshes nothing


def test_detectable_effect_and_verdicts():
    from srdiff.trainer.ablation import detectable_effect, verdict

    # (t_{0.975, 4} + t_{0.8, 4}) / sqrt(5) = (2.7764 + 0.9410) / 2.2361
    assert detectable_effect(1.0, 5) == pytest.approx(1.6625, abs=1e-3)
    assert detectable_effect(2.0, 5) == pytest.approx(2 * detectable_effect(1.0, 5))
    assert detectable_effect(1.0, 1) != detectable_effect(1.0, 1)  # nan
    assert verdict({"delta_ci": (-2.0, -0.5), "detectable": 1.0, "paired": 5}).startswith("helps")
    assert verdict({"delta_ci": (0.1, 0.5), "detectable": 1.0, "paired": 5}).startswith("hurts")
    assert verdict({"delta_ci": (-0.1, 0.5), "detectable": 1.25, "paired": 5}) == (
        "no effect distinguishable at this scale (the design detects a mean |ΔFID| of 1.25 or more with 80 % power)")
    # one seed: its bootstrap "interval" is the value itself, below 0 or not; no verdict either way
    assert verdict({"delta_ci": (-0.07, -0.07), "detectable": float("nan"), "paired": 1}).startswith("no verdict")


def test_paired_summary_leaves_failed_maps_out():
    rows = [{"seed": s, "fid": f, "kid_mean": 0.0, "precision": 0.5, "recall": 0.5, "map_ok": ok}
            for s, f, ok in ((0, 9.0, True), (1, 4.0, False), (2, 5.0, True))]
    s = paired_summary(rows, {0: 10.0, 1: 5.0, 2: 6.0})
    assert s["failed"] == [1] and s["delta_per_seed"] == {"0": -1.0, "2": -1.0} and s["n"] == 2
    assert s["verdict"].startswith("helps")


@pytest.mark.slow
def test_shared_base_ablation_resumes_from_its_stored_results(tmp_path):
    import shutil

    from srdiff.trainer.base_curve import same_weights

    cfg = TrainConfig(**{**TINY, "cycle": 2}, out_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "out"
    kwargs = dict(seeds=[0, 1], modes=["baseline", "combined"], out=out, base_seed=0)
    result = run_ablation(cfg, **kwargs)
    base = tmp_path / "runs" / "seed0" / "baseline" / "checkpoints" / "base.pt"
    for name in ("baseline", "combined"):  # seed 1 refines seed 0's base: only the refinement steps are logged
        records = [json.loads(x) for x in (tmp_path / "runs" / "seed1" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [3, 4]
    combined = [r for r in result["runs"] if r["mode"] == "combined"]
    assert all(r["map_ok"] is not None and len(r["refreshes"]) == 1 for r in combined)
    refresh = combined[1]["refreshes"][0]
    assert 0 <= refresh["highlighter_balanced_accuracy"] <= 1 and 0 <= refresh["empty_fam_fraction"] <= 1
    assert refresh["mfam_std"] >= 0 and refresh["mfam_max"] >= refresh["mfam_mean"]
    stored = out / "runs" / "seed1" / "combined"
    assert {"config.json", "eval.json", "metrics.jsonl", "cost.json", "samples.png"} <= {p.name for p in stored.iterdir()}
    assert sorted(p.name for p in (stored / "figures").iterdir()) == ["cycle_000_fam.png", "cycle_000_mfam.png"]
    cost = json.loads((stored / "cost.json").read_text())["training_and_evaluation"]
    assert cost["cpu_s"] > 0 and cost["wall_s"] > 0
    # the run folders gone (a fresh clone holds only what was committed): every run is reused from `out`
    shutil.copyfile(base, tmp_path / "base_first.pt")
    shutil.rmtree(tmp_path / "runs")
    again = run_ablation(cfg, **kwargs)
    assert again["runs"] == result["runs"] and not (tmp_path / "runs").exists()
    # a run missing from `out` needs the base again: it is retrained to the same weights
    shutil.rmtree(stored)
    third = run_ablation(cfg, **kwargs)
    assert same_weights(base, tmp_path / "base_first.pt")
    assert [r["fid"] for r in third["runs"]] == [r["fid"] for r in result["runs"]]


@pytest.mark.slow
def test_plan_from_a_given_base_checkpoint(tmp_path):
    cfg = TrainConfig(**TINY, out_dir=str(tmp_path))
    base = tmp_path / "curve" / "step2.pt"
    runs = plan(cfg, seeds=[0, 1], modes=["baseline", "combined"], base_seed=0, base_checkpoint=base,
                sweeps={"ratio": ["1:3"]}, sweep_seeds=[1])
    assert [(r.name, r.init_from) for r in runs] == [
        ("seed0/baseline", base), ("seed0/combined", base), ("seed1/baseline", base), ("seed1/combined", base),
        ("seed1/combined-ratio1to3", None)]  # a ratio run has its own base phase: from scratch
    with pytest.raises(ValueError, match=r"base_checkpoint '.*step2.pt' needs base_seed"):
        plan(cfg, seeds=[0], modes=["baseline"], base_checkpoint=base)
    with pytest.raises(ValueError, match=r"base_checkpoint '.*step2.pt' does not exist .*--base-curve 2"):
        run_ablation(cfg, seeds=[0], modes=["baseline"], out=tmp_path / "out", base_seed=0, base_checkpoint=base)


def test_a_base_curve_point_continues_as_the_run_from_scratch(tmp_path):
    """The base seed's baseline refining a base-curve checkpoint (saved with the default ratio) ends at the
    weights of the same run trained from scratch, bit for bit: the shared base can be the curve's point."""
    from srdiff.trainer import SelfRefiningTrainer
    from srdiff.trainer.base_curve import run_base_curve, same_weights

    cfg = TrainConfig(**{**TINY, "eval_samples": 16}, out_dir=str(tmp_path / "curve"), cache_dir=str(tmp_path / "c"))
    run_base_curve(cfg, [2], tmp_path / "out")
    run = cfg.replace(mode="baseline", steps=6, ratio="1:2", eval_samples=0)  # base_steps 2, as the point
    SelfRefiningTrainer(run.replace(out_dir=str(tmp_path / "scratch"))).train()
    SelfRefiningTrainer(run.replace(out_dir=str(tmp_path / "refined"))).train(
        init_from=str(tmp_path / "curve" / "checkpoints" / "step2.pt"))
    assert same_weights(tmp_path / "scratch" / "checkpoints" / "last.pt",
                        tmp_path / "refined" / "checkpoints" / "last.pt")


def test_init_from_another_seed_needs_the_same_split(tmp_path):
    from srdiff.trainer import SelfRefiningTrainer

    cfg = TrainConfig(**{**TINY, "eval_samples": 0, "mode": "baseline"}, out_dir=str(tmp_path / "base"))
    SelfRefiningTrainer(cfg).train()
    base = tmp_path / "base" / "checkpoints" / "base.pt"
    other = cfg.replace(seed=1, mode="combined", out_dir=str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"its train/held-out split has seed 0, this run's 1; set data_seed = 0"):
        SelfRefiningTrainer(other).train(init_from=str(base))
    SelfRefiningTrainer(other.replace(data_seed=0)).train(init_from=str(base))


@pytest.mark.slow
def test_highlighter_layer_sets_the_grad_cam_layer(tmp_path):
    from srdiff.highlighter import FlawHighlighter
    from srdiff.trainer import SelfRefiningTrainer

    cfg = TrainConfig(**{**TINY, "eval_samples": 0, "highlighter_layer": "features.stage2"}, out_dir=str(tmp_path))
    SelfRefiningTrainer(cfg).train()
    assert FlawHighlighter.load(tmp_path / "highlighter.pt").target_layers == ["features.stage2"]
    refresh = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"refresh"' in x]
    assert len(refresh) == 2 and all(0 <= r["highlighter_balanced_accuracy"] <= 1 for r in refresh)


def test_costs_table_and_run_costs_from_stored_units():
    from srdiff.trainer.ablation_costs import markdown, run_cost

    unit = {"units": 1, "load_mean": 0.2, "load_min": 0.1, "load_max": 0.3, "idle": True}
    costs = {"units": {name: {**unit, "cpu_s": cpu, "wall_s": cpu / 2} for name, cpu in (
                 ("base_step", 0.5), ("first_refresh", 20.0), ("refresh", 4.0), ("refine_step", 0.6),
                 ("samples_1000", 80.0), ("inception_1000", 300.0))},
             "config": {"data": "mnist", "image_size": 16, "block_out_channels": [32, 64, 64], "batch_size": 64,
                        "mfam_samples": 64, "mfam_sampler_steps": 20, "highlighter_epochs": 10,
                        "highlighter_samples": 256, "highlighter_finetune_steps": 20, "sample_steps": 30},
             "machine": {"cpu": "test CPU", "cores": 2, "torch_threads": 1, "nice": 5, "torch": "x"},
             "plan": {"base_steps": 3000, "refine_steps": 1000, "cycle": 100, "eval_samples": 1000, "seeds": 5,
                      "refined_modes": 3}}
    plan = dict(refine_steps=1000, cycle=100, eval_samples=1000)
    # 1000 refinement steps, the first refresh and 9 later ones, 1,000 samples and their Inception features
    assert run_cost(costs, base_steps=0, **plan) == pytest.approx(600 + 20 + 9 * 4 + 80 + 300)
    assert run_cost(costs, base_steps=0, refine=False, **plan) == pytest.approx(500 + 80 + 300)
    assert run_cost(costs, base_steps=0, basis="wall_s", **plan) == pytest.approx((600 + 20 + 36 + 380) / 2)
    text = markdown(costs)
    assert "| base training step (batch 64) | 0.500 | 0.250 | 0.1–0.3 | yes |" in text
    assert "the shared base phase (3000 steps) 1,500; a refinement run" in text
    assert f"{(1500 + 5 * 880 + 15 * 1036) / 3600:.1f} CPU-hours" in text


@pytest.mark.slow
def test_base_curve_resumes_and_matches_a_longer_run_bit_for_bit(tmp_path):
    from srdiff.trainer import SelfRefiningTrainer
    from srdiff.trainer.base_curve import run_base_curve, same_weights

    cfg = TrainConfig(**{**TINY, "eval_samples": 16}, out_dir=str(tmp_path / "curve"), cache_dir=str(tmp_path / "c"))
    out = tmp_path / "out"
    first = run_base_curve(cfg.replace(mode="combined", lam_f=0.5), [2], out)  # refinement settings do not matter
    assert [p["step"] for p in first["points"]] == [2] and first["config"]["mode"] == "baseline"
    curve = run_base_curve(cfg, [2, 3], out / "longer")
    again = run_base_curve(cfg, [2, 3], out / "longer")  # every point done: nothing is trained
    assert again == curve and curve["points"][0]["fid"] == first["points"][0]["fid"]
    for name in ("base_curve.json", "base_curve.md", "base_curve.png", "base_curve_samples.png"):
        assert (out / "longer" / name).is_file()
    assert "| 3 |" in (out / "longer" / "base_curve.md").read_text()
    # the curve's step-2 checkpoint is a 4-step run's base checkpoint (ratio 1:1), bit for bit
    SelfRefiningTrainer(cfg.replace(mode="baseline", eval_samples=0, out_dir=str(tmp_path / "run"))).train()
    assert same_weights(tmp_path / "curve" / "checkpoints" / "step2.pt", tmp_path / "run" / "checkpoints" / "base.pt")
    assert not same_weights(tmp_path / "curve" / "checkpoints" / "step3.pt",
                            tmp_path / "run" / "checkpoints" / "base.pt")
    with pytest.raises(ValueError, match="holds a curve of another config"):
        run_base_curve(cfg.replace(lr=1e-2), [2, 3], out / "longer")


@pytest.mark.slow
def test_map_study_scores_every_variant(tmp_path):
    from srdiff.trainer import SelfRefiningTrainer
    from srdiff.trainer.map_study import digit_overlap, run_map_study

    SelfRefiningTrainer(TrainConfig(**{**TINY, "eval_samples": 0, "mode": "baseline"}, out_dir=str(tmp_path))).train()
    study = run_map_study(tmp_path / "checkpoints" / "base.pt", tmp_path / "out", variants=("default", "stage2"),
                          n_eval=16)
    assert list(study["variants"]) == ["default", "stage2"] and study["step"] == 2
    for v in study["variants"].values():
        assert 0 <= v["balanced_accuracy"] <= 1 and set(v["planted"]) >= {"blur"}
        assert v["empty"] == 1.0 and v["mass_on_digit"] is None or 0 <= v["mass_on_digit"] <= 1  # tiny: maybe all empty
    assert (tmp_path / "out" / "map_study.png").is_file() and "| stage2 |" in (tmp_path / "out" / "map_study.md").read_text()
    with pytest.raises(ValueError, match=r"variants must be among .*, got \['finest'\]"):
        run_map_study(tmp_path / "checkpoints" / "base.pt", tmp_path / "out", variants=("finest",))


def test_digit_overlap_of_maps_that_are_the_strokes_or_not():
    import torch

    from srdiff.trainer.map_study import digit_overlap

    images = torch.zeros(4, 1, 8, 8)
    images[:, :, 2:6, 3:5] = 1.0  # an 8-pixel stroke, 1/8 of the image
    on = digit_overlap(images, images[:, 0])
    assert on["mass_on_digit"] == 1.0 and on["iou_digit"] == 1.0 and on["digit_area"] == 0.125
    assert on["digit_lift"] == 8.0 and on["corr_image"] == pytest.approx(1.0) and on["empty"] == 0.0
    off = digit_overlap(images, 1 - images[:, 0])
    assert off["mass_on_digit"] == 0.0 and off["corr_image"] == pytest.approx(-1.0)
    empty = torch.zeros(4, 8, 8)
    assert digit_overlap(images, empty)["mass_on_digit"] is None and digit_overlap(images, empty)["empty"] == 1.0
    empty[0] = images[0, 0]
    assert digit_overlap(images, empty)["empty"] == 0.75  # the ratios count the non-empty map only
    assert digit_overlap(images, empty)["mass_on_digit"] == 1.0


@pytest.mark.slow
def test_measure_costs_times_every_unit(tmp_path):
    from srdiff.trainer.ablation_costs import measure_costs

    costs = measure_costs(TrainConfig(**TINY, out_dir=str(tmp_path)), steps=1, samples=2, images=1)
    assert list(costs["units"]) == ["base_step", "first_refresh", "refresh", "refine_step", "samples_1000",
                                    "inception_1000"]
    for unit in costs["units"].values():
        assert unit["wall_s"] > 0 and unit["cpu_s"] > 0 and unit["load_min"] <= unit["load_mean"] <= unit["load_max"]
    assert costs["units"]["samples_1000"]["units"] == 0.002 and costs["machine"]["cores"] >= 1
    with pytest.raises(ValueError, match="steps, samples and images must be positive"):
        measure_costs(TrainConfig(**TINY, out_dir=str(tmp_path)), steps=0)


def test_report_written_into_docs_between_its_markers(tmp_path):
    from srdiff.trainer.ablation import write_into

    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- ABLATION:ablation:BEGIN -->\nold table\n<!-- ABLATION:ablation:END -->\nafter\n")
    write_into(doc, "docs/x/ablation.json", "| new | table |")
    text = doc.read_text()
    assert text.startswith("intro\n<!-- ABLATION:ablation:BEGIN -->\n_Generated by `srdiff ablate --report docs/x/")
    assert "| new | table |\n<!-- ABLATION:ablation:END -->\nafter\n" in text and "old table" not in text
    write_into(doc, "docs/x/ablation.json", "| newer |")  # again: replaced, not appended
    assert doc.read_text().count("ABLATION:ablation:BEGIN") == 1 and "| new | table |" not in doc.read_text()
    with pytest.raises(ValueError, match=r"has no single <!-- ABLATION:base_curve:BEGIN -->"):
        write_into(doc, "docs/x/base_curve.json", "curve")
