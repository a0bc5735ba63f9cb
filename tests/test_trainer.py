"""SelfRefiningTrainer on tiny models (8x8 digits): phases and cycles, resume after SIGKILL, atomic
checkpoints, non-finite losses, latent mode, export to diffusers, the CLI."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from srdiff.trainer import NonFiniteLossError, SelfRefiningTrainer, TrainConfig
from srdiff.trainer import checkpoint
from srdiff_testing import config_flags as flags, kill_and_resume, run_losses as losses, srdiff_cli as cli, tiny_config

def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    return tiny_config(tmp_path, name, **kw)


def records(cfg) -> list[dict]:
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_phases_cycles_and_outputs(tmp_path):
    cfg = tiny(tmp_path, steps=7, ratio="3:4", cycle=2, checkpoint_every=5)
    summary = SelfRefiningTrainer(cfg).train()
    recs = records(cfg)
    phases = [r["phase"] for r in recs if "loss" in r]
    assert phases == ["base"] * 3 + ["refine"] * 4
    assert [r["step"] for r in recs if r.get("event") == "refresh"] == [3, 5]  # every `cycle` refine steps
    assert [r["step"] for r in recs if r.get("event") == "checkpoint"] == [3, 5, 7]  # switch, every 5, end
    first_refresh = next(r for r in recs if r.get("event") == "refresh")
    assert first_refresh["highlighter"] == "trained"
    base = checkpoint.load(os.path.join(cfg.out_dir, "checkpoints", "base.pt"))
    assert base["step"] == 3 and base["phase"] == "refine" and base["mfam"] is None
    last = checkpoint.load(summary["checkpoint"])
    assert last["step"] == 7 and last["mfam"].shape == (8, 8)
    assert 0.0 <= float(last["mfam"].min()) and float(last["mfam"].max()) <= 1.0
    assert last["highlighter"] is not None
    for name in ("cycle_000_samples.png", "cycle_001_fam.png", "cycle_001_mfam.png", "loss.png"):
        assert (tmp_path / "run" / "figures" / name).is_file(), name
    assert (tmp_path / "run" / "samples.png").is_file() and (tmp_path / "run" / "highlighter.pt").is_file()


@pytest.mark.slow
def test_modes_route_the_mfam(tmp_path, monkeypatch):
    """baseline never refreshes; forward passes the mFAM to the noise; reverse only to the attention."""
    from srdiff.trainer import trainer as loop

    seen = {"noise": [], "context": []}
    add_noise, context = loop.amplified_add_noise, loop.fam_context

    def spy_noise(*args, **kwargs):
        seen["noise"].append(kwargs["fam"] is not None and kwargs["lam"] > 0)
        return add_noise(*args, **kwargs)

    def spy_context(mfam):
        seen["context"].append(mfam is not None)
        return context(mfam)

    monkeypatch.setattr(loop, "amplified_add_noise", spy_noise)
    monkeypatch.setattr(loop, "fam_context", spy_context)
    for mode, noise, ctx in (("baseline", [False] * 4, []), ("forward", [False, False, True, True], []),
                             ("reverse", [False] * 4, [False, False, True, True])):
        seen["noise"].clear()
        seen["context"].clear()
        trainer = SelfRefiningTrainer(tiny(tmp_path, mode, mode=mode, steps=4, cycle=2, highlighter_finetune_steps=0))
        trainer.train()
        assert seen["noise"] == noise, mode
        assert seen["context"] == ctx, mode
        assert (trainer.mfam is None) == (mode == "baseline")


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    """A run SIGKILLed in the refinement phase and resumed ends with the same weights, EMA, mFAM and
    losses as an uninterrupted run."""
    from srdiff.highlighter import FlawHighlighter

    # a saved highlighter whose maps are not blank, so the mFAM really steers the refinement
    FlawHighlighter(backbone="small", in_channels=1, image_size=8).save(tmp_path / "hl.pt")
    ref_cfg = tiny(tmp_path, "uninterrupted", steps=12, cycle=3, checkpoint_every=4, highlighter=str(tmp_path / "hl.pt"))
    SelfRefiningTrainer(ref_cfg).train()
    cfg = ref_cfg.replace(out_dir=str(tmp_path / "killed"))
    kill_and_resume(cfg, after_step=10, checkpoint_step=8)
    assert losses(cfg) == losses(ref_cfg)
    a = checkpoint.load(tmp_path / "uninterrupted" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "killed" / "checkpoints" / "last.pt")
    for key in ("model", "optimizer"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    torch.testing.assert_close(b["ema"]["model"], a["ema"]["model"], rtol=0, atol=0)
    assert float(a["mfam"].max()) > 0
    torch.testing.assert_close(b["mfam"], a["mfam"], rtol=0, atol=0)
    torch.testing.assert_close(b["highlighter"]["state"], a["highlighter"]["state"], rtol=0, atol=0)


_KILL_DURING_SAVE = """
import os, signal, sys, torch
from srdiff.trainer import checkpoint
path = sys.argv[1]
checkpoint.save_atomic({"step": 1, "w": torch.ones(1000)}, path)
real_save = torch.save
def dying_save(obj, f, *a, **k):
    f.write(b"partial checkpoint bytes")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
checkpoint.save_atomic({"step": 2, "w": torch.zeros(1000)}, path)
"""


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(path)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert [p.name for p in path.parent.iterdir() if p.name != "last.pt"][0].endswith(".tmp")


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=oct)
def test_written_files_follow_the_umask(tmp_path, mask):
    """Checkpoints, highlighters and caches (save_atomic) and exported weights (safetensors writes 0600)
    get the mode open() gives a new file under the umask."""
    from diffusers import UNet2DModel

    from srdiff._io import follow_umask, save_atomic
    from srdiff.highlighter import FlawHighlighter

    previous = os.umask(mask)
    try:
        save_atomic({"step": 1}, tmp_path / "checkpoints" / "last.pt")
        FlawHighlighter("small", in_channels=1, image_size=8, width=4).save(tmp_path / "highlighter.pt")
        UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), norm_num_groups=4,
                    down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",)).save_pretrained(tmp_path / "unet")
        follow_umask(tmp_path / "unet")
    finally:
        os.umask(previous)
    written = [tmp_path / "checkpoints" / "last.pt", tmp_path / "highlighter.pt",
               tmp_path / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "unet" / "config.json"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(0o666 & ~mask) for p in written}


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from srdiff.trainer import task

    cfg = tiny(tmp_path, steps=6, ratio="1:0", checkpoint_every=2)
    loss_fn, calls = task.amplified_noise_loss, []

    def exploding(*args, **kwargs):
        calls.append(1)
        loss = loss_fn(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(task, "amplified_noise_loss", exploding)
    trainer = SelfRefiningTrainer(cfg)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 3 \(base phase\); training stopped "
                                                 r"without writing a checkpoint, the last good checkpoint is .*last.pt"):
        trainer.train()
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_start_that_wrote_no_checkpoint_is_set_aside_by_the_rerun(tmp_path, monkeypatch):
    """A start whose loss blew up before its first checkpoint left config.json and metrics.jsonl: the
    corrected rerun (with resume or without) moves them aside, with a warning, and trains there."""
    from srdiff.trainer import task

    cfg = tiny(tmp_path, steps=2, ratio="1:0", mode="baseline")
    loss_fn = task.amplified_noise_loss
    monkeypatch.setattr(task, "amplified_noise_loss", lambda *a, **k: loss_fn(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteLossError):
        SelfRefiningTrainer(cfg).train()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "metrics.jsonl", "srdiff.lock"]
    monkeypatch.setattr(task, "amplified_noise_loss", loss_fn)
    with pytest.warns(UserWarning, match=r"held a start that wrote no checkpoint \(config.json, metrics.jsonl\)"):
        SelfRefiningTrainer(cfg).train(resume=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert sorted(p.name for p in aside.iterdir()) == ["config.json", "metrics.jsonl"]
    assert [step for step, _ in losses(cfg)] == [1, 2]


def test_train_holds_the_out_dir_lock(tmp_path):
    from srdiff.run_dir import OutDirError, RunLock

    trainer = SelfRefiningTrainer(tiny(tmp_path, steps=1, ratio="1:0", mode="baseline"))
    with RunLock(tmp_path / "run"):
        with pytest.raises(OutDirError, match=rf"in use by another srdiff run \(pid {os.getpid()} on "):
            trainer.train()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["srdiff.lock"]


@pytest.mark.slow
def test_resume_takes_the_stored_config_and_steps_may_grow(tmp_path, capsys):
    """`srdiff train --resume --out-dir RUN --steps 4` needs no other flag: the stored config is the base,
    each change is printed, the base phase keeps its length, and the grown run is the run that was planned
    at 4 steps with that schedule, loss for loss. A change of trajectory is printed, then refused."""
    from srdiff.cli import main

    cfg = tiny(tmp_path, steps=2, ratio="1:1", mode="baseline")
    assert main(["train", *flags(cfg)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out-dir", cfg.out_dir, "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert f"resuming the run in {cfg.out_dir} with its stored config, changed by the flags given:" in out
    assert "\n  steps: 2 -> 4\n  ratio: '1:1' -> '1:3'\n" in out
    grown = TrainConfig.from_file(tmp_path / "run" / "config.json")
    assert grown == cfg.replace(steps=4, ratio="1:3")
    planned = cfg.replace(out_dir=str(tmp_path / "planned"), steps=4, ratio="1:3")
    SelfRefiningTrainer(planned).train()
    assert losses(grown) == losses(planned)
    assert main(["train", "--resume", "--out-dir", cfg.out_dir, "--lr", "0.005"]) == 2
    captured = capsys.readouterr()
    assert "\n  lr: 0.001 -> 0.005\n" in captured.out
    assert "cannot resume from" in captured.err and "the config differs in lr: 0.001 -> 0.005" in captured.err


def test_bad_setups_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"config must be a TrainConfig, got dict"):
        SelfRefiningTrainer({"steps": 3})
    with pytest.raises(ValueError, match=r"precision 'bf16' needs a CUDA device"):
        SelfRefiningTrainer(tiny(tmp_path, precision="bf16", device="cpu"))
    with pytest.raises(ValueError, match=r"batch_size 8 must be a multiple of world_size x grad_accum = 3 x 1"):
        _check_divisibility(tiny(tmp_path), world_size=3)
    trainer = SelfRefiningTrainer(tiny(tmp_path, steps=2, ratio="1:0"))
    trainer.train()
    other = SelfRefiningTrainer(tiny(tmp_path, steps=2, ratio="1:0", lr=5e-3))
    with pytest.raises(ValueError, match=r"cannot resume from .*last.pt: the config differs in lr: 0.001 -> 0.005"):
        other.train(resume=True)


def _check_divisibility(cfg, world_size):
    """The trainer's check for a world of ``world_size`` ranks, without starting one."""
    from srdiff.trainer.distributed import DistInfo

    trainer = SelfRefiningTrainer.__new__(SelfRefiningTrainer)
    trainer.config, trainer.dist = cfg, DistInfo(rank=0, world_size=world_size)
    trainer._check_divisibility()


def test_latent_mode_with_a_tiny_vae(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    cfg = tiny(tmp_path, mode="latent", vae=str(tmp_path / "vae"), image_size=16, block_out_channels=(8, 16),
               steps=4, cycle=2)
    trainer = SelfRefiningTrainer(cfg)
    assert trainer.train_data.shape[1:] == (4, 8, 8)  # latents: 4 channels at half the image size
    assert trainer.fam_layers  # reverse modulation installed
    summary = trainer.train()
    assert trainer.mfam.shape == (16, 16)  # the mFAM lives in image space
    images = trainer.sample(3, seed=0, steps=2)
    assert images.shape == (3, 1, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
    from diffusers import LDMPipeline

    pipe = LDMPipeline.from_pretrained(summary["pipeline"])
    torch.testing.assert_close(pipe.unet.state_dict(), trainer.ema.model.state_dict(), rtol=0, atol=0)


@pytest.mark.slow
def test_export_reloads_in_diffusers_and_cli_sample_eval(tmp_path):
    from diffusers import DDIMPipeline, DDPMPipeline

    from srdiff.cli import main

    cfg = tiny(tmp_path, mode="reverse", steps=4, cycle=2, feature_epochs=1, cache_dir=str(tmp_path / "cache"))
    trainer = SelfRefiningTrainer(cfg)
    summary = trainer.train()
    for cls in (DDPMPipeline, DDIMPipeline):
        pipe = cls.from_pretrained(summary["pipeline"])
        torch.testing.assert_close(pipe.unet.state_dict(), trainer.ema.model.state_dict(), rtol=0, atol=0)
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
        with torch.no_grad():
            torch.testing.assert_close(pipe.unet(x, t).sample, trainer.ema.model(x, t).sample, rtol=0, atol=0)
        images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
        assert images.shape == (2, 8, 8, 1)
    proc = cli("sample", "--ckpt", summary["checkpoint"], "--n", "4", "--steps", "2", "--out",
               str(tmp_path / "grid.png"), "--export", str(tmp_path / "exported"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "exported" / "model_index.json").is_file()
    assert main(["eval", "--ckpt", summary["checkpoint"], "--n", "16", "--steps", "2",
                 "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n_fake"] == 16 and result["n_real"] == 359 and result["feature_net"]["task"] == "classes"
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1


@pytest.mark.slow
def test_demo_command_prints_where_things_are(tmp_path, capsys):
    """`srdiff demo` with the shipped config, shrunk by flags to a tiny model."""
    from pathlib import Path

    from srdiff.cli import main

    config = Path(__file__).parent.parent / "configs" / "demo.toml"
    overrides = flags(tiny(tmp_path, "demo", steps=4, cycle=2, eval_samples=16, feature_epochs=1,
                           cache_dir=str(tmp_path / "cache")))
    assert main(["demo", "--config", str(config), *overrides]) == 0
    out = capsys.readouterr().out
    assert "2 base + 2 refinement steps" in out
    for line in ("samples (EMA, final)", "FAM overlays per cycle", "loss plot", "diffusers pipeline"):
        assert line in out
    assert "FID " in out and "held-out accuracy" in out
    assert (tmp_path / "demo" / "eval.json").is_file() and (tmp_path / "demo" / "figures" / "cycle_000_fam.png").is_file()
