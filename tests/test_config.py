"""TrainConfig: files, flags, and clear errors for unknown keys and bad values."""

import argparse

import pytest

from srdiff.trainer.config import TrainConfig, add_config_flags, config_from_args
from srdiff.trainer.resume import check_schedule, resumed_config


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_flags(parser)
    return parser.parse_args(argv)


def test_defaults_follow_the_paper():
    c = TrainConfig()
    assert (c.lam_f, c.lam_r, c.cycle, c.ratio, c.mode) == (0.01, 0.025, 100, "1:1", "combined")
    assert c.base_steps == c.steps // 2


@pytest.mark.parametrize("ratio, base", [("1:4", 200), ("1:1", 500), ("4:1", 800), ("1:0", 1000), ("0:1", 0)])
def test_ratio_sets_the_phase_switch(ratio, base):
    assert TrainConfig(steps=1000, ratio=ratio).base_steps == base


def test_toml_sections_and_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('seed = 3\n\n[refine]\nmode = "reverse"\nlam_r = 0.05\n\n[model]\nblock_out_channels = [16, 32]\n'
                    "attention_levels = [false, true]\nnorm_num_groups = 8\n")
    c = config_from_args(_parse(["--config", str(path), "--lam-r", "0.1", "--no-progress"]))
    assert (c.mode, c.lam_r, c.seed, c.progress) == ("reverse", 0.1, 3, False)
    assert c.block_out_channels == (16, 32) and c.attention_levels == (False, True)


def test_yaml_flat(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mode: forward\nlam_f: 0.02\nsteps: 10\n")
    c = TrainConfig.from_file(path, cycle=5)
    assert (c.mode, c.lam_f, c.steps, c.cycle) == ("forward", 0.02, 10, 5)


def test_every_field_is_a_flag():
    args = _parse(["--attention-levels", "true", "false", "false", "--adam-betas", "0.5", "0.9", "--compile",
                   "--vae", "some/dir", "--mode", "latent"])
    c = config_from_args(args)
    assert c.attention_levels == (True, False, False) and c.adam_betas == (0.5, 0.9) and c.compile
    assert c.vae == "some/dir"


@pytest.mark.parametrize(
    "data, match",
    [
        ({"lam_ff": 0.1}, r"unknown key 'lam_ff' in config \(did you mean 'lam_f'\?\)"),
        ({"model": {"lam_f": 0.1}}, r"key 'lam_f' in config \[model\] belongs in section \[refine\]"),
        ({"refine": {"lam_f": 0.1}, "lam_f": 0.2}, r"key 'lam_f' is given twice"),
        ({"lam_f": -0.1}, r"lam_f must be >= 0, got -0.1"),
        ({"lam_r": "big"}, r"lam_r must be of type float, got 'big'"),
        ({"steps": 1.5}, r"steps must be of type int, got 1.5"),
        ({"mode": "both"}, r"mode must be one of \('baseline', 'forward', 'reverse', 'combined', 'latent'\), got 'both'"),
        ({"ratio": "1-4"}, r"ratio must look like 'base:refine'.*got '1-4'"),
        ({"ratio": "0:0"}, r"ratio must look like 'base:refine'.*got '0:0'"),
        ({"cycle": 0}, r"cycle must be >= 1, got 0"),
        ({"lr": 0}, r"lr must be > 0, got 0.0"),
        ({"holdout": 1.0}, r"holdout must be in \(0, 1\), got 1.0"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\), got 1.0"),
        ({"attention_levels": [True]}, r"attention_levels needs one entry per level"),
        ({"norm_num_groups": 7}, r"norm_num_groups must divide every entry of block_out_channels"),
        ({"batch_size": 10, "grad_accum": 4}, r"batch_size must be a multiple of grad_accum=4, got 10"),
        ({"mode": "latent"}, r"vae must name a local AutoencoderKL directory in mode='latent', got None"),
        ({"mode": "forward", "vae": "x"}, r"mode 'forward' amplifies pixel noise.*latent models"),
        ({"precision": "fp16"}, r"precision must be one of \('auto', 'fp32', 'bf16'\), got 'fp16'"),
        ({"device": "tpu"}, r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        ({"adam_betas": [0.9]}, r"adam_betas must be two numbers in \[0, 1\)"),
        ({"compile": "yes"}, r"compile must be of type bool, got 'yes'"),
        ({"labels": "classes.txt"}, r"labels must be one of \('auto', 'folders', 'none'\) or a .csv / .jsonl file"),
        ({"guidance_scale": float("nan")}, r"guidance_scale must be a finite number >= 0 .*got nan"),
        ({"guidance_scale": -1.0}, r"guidance_scale must be a finite number >= 0 .*got -1.0"),
        ({"image_size": 15}, r"image_size 15 does not fit backbone 'unet': its 3 levels \(block_out_channels "
                             r"\(32, 64, 64\)\) halve the side 2 times, so the image side must be a multiple of 4; "
                             r"image_size 12 or 16 would"),
        ({"image_size": 18}, r"image_size 18 does not fit backbone 'unet'.* image_size 16 or 20 would"),
        ({"backbone": "dit", "image_size": 17}, r"image_size 17 does not fit backbone 'dit': it cuts the input into "
                                                r"patches of patch_size 2.*image_size 16 or 18 would"),
        ({"backbone": "uvit", "image_size": 18, "patch_size": 4}, r"backbone 'uvit'.* image_size 16 or 20 would"),
        ({"task": "text", "backbone": "sd3", "image_size": 9}, r"backbone 'sd3'.*multiple of 2; image_size 8 or 10"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None,
)
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(data)


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"config file '.*missing.toml' does not exist"):
        TrainConfig.from_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    with pytest.raises(ValueError, match=r"is not valid TOML"):
        TrainConfig.from_file(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"must hold a mapping, got list"):
        TrainConfig.from_file(listy)
    other = tmp_path / "run.ini"
    other.write_text("{}")
    with pytest.raises(ValueError, match=r"must end in .toml, .yaml, .yml or .json"):
        TrainConfig.from_file(other)
    broken = tmp_path / "config.json"
    broken.write_text('{"steps": 3,')
    with pytest.raises(ValueError, match=r"config.json' is not valid JSON"):
        TrainConfig.from_file(broken)
    ok = tmp_path / "ok.yaml"
    ok.write_text("steps: 3\n")
    with pytest.raises(ValueError, match=r"unknown key 'stpes' in overrides \(did you mean 'steps'\?\)"):
        TrainConfig.from_file(ok, stpes=3)


def test_a_runs_config_json_is_a_config_file(tmp_path):
    """--config accepts what a run stored: the same config back, flags over it."""
    import json

    ran = TrainConfig(mode="reverse", steps=40, attention_levels=(False, True, True), out_dir=str(tmp_path / "a"))
    (tmp_path / "config.json").write_text(json.dumps(ran.to_dict(), indent=2))
    assert config_from_args(_parse(["--config", str(tmp_path / "config.json")])) == ran
    assert config_from_args(_parse(["--config", str(tmp_path / "config.json"), "--seed", "4"])) == ran.replace(seed=4)


def test_resumed_config_grows_steps_keeping_the_base_phase():
    stored = TrainConfig(steps=100, ratio="1:1")
    grown, changes = resumed_config(stored, {"steps": 300})
    assert (grown.ratio, grown.base_steps) == ("50:250", 50)
    assert changes == ["steps: 100 -> 300", "ratio: '1:1' -> '50:250'"]
    assert resumed_config(stored, {"steps": 300, "ratio": "1:2"})[0].ratio == "1:2"  # given: kept, then checked
    all_base, _ = resumed_config(TrainConfig(steps=100, ratio="1:0"), {"steps": 300})
    assert (all_base.ratio, all_base.base_steps) == ("1:0", 300)  # no refinement phase: stays all base
    assert resumed_config(stored, {"seed": 3}) == (stored.replace(seed=3), ["seed: 0 -> 3"])


@pytest.mark.parametrize("saved, changed, step, match", [
    pytest.param({}, {"steps": 3000, "ratio": "1000:2000"}, 1500, None, id="grow-keeping-the-base"),
    pytest.param({}, {"steps": 3000}, 400, None, id="move-a-switch-still-ahead"),
    pytest.param({}, {"steps": 1500, "ratio": "1000:500"}, 1200, r"steps may grow but not shrink \(2000 -> 1500\)",
                 id="shrink"),
    pytest.param({"lr_schedule": "cosine"}, {"steps": 3000, "ratio": "1000:2000"}, 1500,
                 r"lr_schedule 'cosine' decays over steps \(2000\)", id="cosine"),
    pytest.param({}, {"steps": 3000}, 1200, r"the base phase would end at step 1500 instead of 1000 \(ratio '1:1' -> "
                 r"'1:1'\), but the run is at step 1200; growing steps keeps the base phase: ratio '1000:2000'",
                 id="switch-passed"),
    pytest.param({}, {"ratio": "1:3"}, 600, r"the base phase would end at step 500 instead of 1000", id="switch-behind"),
])
def test_the_schedule_of_a_resumed_run(saved, changed, step, match):
    saved = TrainConfig(steps=2000, ratio="1:1", **saved)
    config = saved.replace(**changed)
    if match is None:
        check_schedule(saved, config, step, "resume")
    else:
        with pytest.raises(ValueError, match="cannot resume: " + match):
            check_schedule(saved, config, step, "resume")


def test_bad_flag_value_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        _parse(["--mode", "both"])
    assert "invalid choice: 'both'" in capsys.readouterr().err


def test_round_trip_through_dict():
    c = TrainConfig(mode="reverse", attention_levels=(False, True, True), adam_betas=(0.5, 0.99))
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"unknown key 'lamf' in replace\(\)"):
        c.replace(lamf=1.0)


def test_cli_reports_config_errors_without_a_traceback(capsys, tmp_path):
    from srdiff.cli import main

    assert main(["train", "--lam-f", "-1", "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "srdiff train: error: lam_f must be >= 0, got -1.0"
    bad = tmp_path / "bad.toml"
    bad.write_text("[refine]\nlamda_f = 0.1\n")
    assert main(["demo", "--config", str(bad)]) == 2
    assert "unknown key 'lamda_f' in config file" in capsys.readouterr().err
