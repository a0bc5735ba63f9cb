"""The ablation driver on a tiny model: shared base phase, every mode and seed, the sweep, tables and plots."""

import json

import pytest

from srdiff.trainer import TrainConfig, checkpoint
from srdiff.trainer.ablation import run_ablation, scaled_cycles


def test_scaled_cycles():
    assert scaled_cycles(1000) == [50, 100, 500]
    assert scaled_cycles(200) == [10, 20, 100]
    assert scaled_cycles(5) == [1, 2]


@pytest.mark.slow
def test_tiny_ablation(tmp_path):
    cfg = TrainConfig(
        data="digits", image_size=8, block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=4,
        batch_size=8, lr=1e-3, warmup_steps=2, mfam_samples=4, mfam_sampler_steps=2, highlighter_samples=8,
        highlighter_epochs=1, sample_steps=2, progress=False, num_train_timesteps=100, steps=4, cycle=1,
        eval_samples=16, feature_epochs=1, out_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
    )
    result = run_ablation(cfg, seeds=[0, 1], modes=["baseline", "reverse"], out=tmp_path / "out", sweep=True)
    assert sorted((r["mode"], r["seed"]) for r in result["runs"]) == [("baseline", 0), ("baseline", 1),
                                                                      ("reverse", 0), ("reverse", 1)]
    # the reverse runs refined from the baseline runs' base checkpoints
    for seed in (0, 1):
        base = checkpoint.load(tmp_path / "runs" / f"seed{seed}" / "baseline" / "checkpoints" / "base.pt")
        records = (tmp_path / "runs" / f"seed{seed}" / "reverse" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in records if '"loss"' in r] == [3, 4]
        assert base["step"] == 2
    assert [(r["param"], r["value"]) for r in result["sweep"]] == [
        ("lambda", 0.01), ("lambda", 0.025), ("lambda", 0.05), ("lambda", 0.1), ("cycle", 1)]
    assert set(result["summary"]) == {"baseline", "reverse"}
    assert "| reverse |" in (tmp_path / "out" / "ablation.md").read_text()
    for name in ("ablation.json", "ablation.png", "sweep.png"):
        assert (tmp_path / "out" / name).is_file()
    # a second call reuses every finished run
    again = run_ablation(cfg, seeds=[0, 1], modes=["baseline", "reverse"], out=tmp_path / "out", sweep=False)
    assert again["summary"] == result["summary"]
    with pytest.raises(ValueError, match=r"seed0/baseline holds a finished run with a different config \(lr\)"):
        run_ablation(cfg.replace(lr=2e-3), seeds=[0], modes=["baseline"], out=tmp_path / "out", sweep=False)


def test_ablation_needs_evaluation_and_two_phases(tmp_path):
    with pytest.raises(ValueError, match=r"eval_samples must be >= 1 for the ablation, got 0"):
        run_ablation(TrainConfig(eval_samples=0), seeds=[0], modes=["baseline"], out=tmp_path)
    with pytest.raises(ValueError, match=r"ratio '1:0' leaves no base or no refinement steps out of 2000"):
        run_ablation(TrainConfig(eval_samples=8, ratio="1:0"), seeds=[0], modes=["baseline"], out=tmp_path)
