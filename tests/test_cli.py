"""The ``srdiff`` command line: one-line errors with exit code 2 (``--debug`` for the traceback), Ctrl-C as
exit code 130, the out-dir policy (``--resume`` / ``--overwrite``, nothing deleted), runs that cannot start
write nothing, ``srdiff --help``, ``srdiff fam --scale`` with file and tensor input, ``srdiff sample``'s PNGs."""

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from srdiff import cli
from srdiff.cli import build_parser
from srdiff import run_dir
from srdiff.run_dir import OutDirError, prepare_out_dir

TINY_TRAIN = ["--data", "digits", "--image-size", "8", "--block-out-channels", "8", "16", "--attention-levels",
              "false", "true", "--norm-num-groups", "4", "--attention-head-dim", "8", "--batch-size", "8",
              "--steps", "2", "--no-progress"]


def _old_run(path: Path) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "last.pt").write_bytes(b"step 20")
    (path / "metrics.jsonl").write_text("24 lines\n")
    return path


def _tiny_config():
    from srdiff.trainer.config import config_from_args

    return config_from_args(build_parser().parse_args(["train", *TINY_TRAIN]))


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------- prepare_out_dir
def test_missing_or_empty_out_dir_is_returned_and_not_created(tmp_path):
    assert prepare_out_dir(tmp_path / "new", resume=False, overwrite=False) == tmp_path / "new"
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert prepare_out_dir(tmp_path / "empty", resume=False, overwrite=False) == tmp_path / "empty"


def test_non_empty_out_dir_is_refused_naming_both_flags(tmp_path):
    run = _old_run(tmp_path / "run")
    with pytest.raises(OutDirError, match="is not empty: pass --resume .* --overwrite to move it aside"):
        prepare_out_dir(run, resume=False, overwrite=False)
    assert (run / "metrics.jsonl").read_text() == "24 lines\n"


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tmp_path):
    run = _old_run(tmp_path / "run")
    with pytest.warns(UserWarning, match="moved the previous contents of .*run.* to .*run.old-"):
        assert prepare_out_dir(run, resume=False, overwrite=True) == run
    assert not run.exists()
    _old_run(run)
    with pytest.warns(UserWarning):
        prepare_out_dir(run, resume=False, overwrite=True)
    aside = sorted(p for p in tmp_path.iterdir() if p.name.startswith("run.old-"))
    assert len(aside) == 2  # a second move in the same second gets its own name
    for old in aside:
        assert (old / "checkpoints" / "last.pt").read_bytes() == b"step 20"


def test_overwrite_on_a_non_main_rank_only_checks(tmp_path, monkeypatch):
    run = _old_run(tmp_path / "run")
    monkeypatch.setenv("RANK", "1")
    assert prepare_out_dir(run, resume=False, overwrite=True) == run
    assert (run / "metrics.jsonl").is_file()


def test_resume_needs_a_checkpoint_in_a_non_empty_dir(tmp_path):
    run = _old_run(tmp_path / "run")
    assert prepare_out_dir(run, resume=True, overwrite=False) == run
    assert prepare_out_dir(tmp_path / "fresh", resume=True, overwrite=False) == tmp_path / "fresh"
    (run / "checkpoints" / "last.pt").unlink()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutDirError, match="nothing to resume in .*no checkpoints/last.pt and holds files no run wrote"):
        prepare_out_dir(run, resume=True, overwrite=False)
    with pytest.raises(OutDirError, match="is not empty"):
        prepare_out_dir(run, resume=False, overwrite=False)


def test_a_start_without_a_checkpoint_is_not_a_run(tmp_path):
    """What a start that failed before its first checkpoint wrote blocks nothing: a new start (with or without
    --resume) proceeds, and the trainer moves those files aside, deleting nothing; user files still block."""
    run = _old_run(tmp_path / "run")
    (run / "checkpoints" / "last.pt").unlink()
    (run / "checkpoints" / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # killed while saving
    (run / "config.json").write_text("{}")
    assert run_dir.is_failed_start(run)
    for resume in (False, True):
        assert prepare_out_dir(run, resume=resume, overwrite=False) == run
    with pytest.warns(UserWarning, match=r"held a start that wrote no checkpoint \(checkpoints, config.json, "
                                         r"metrics.jsonl\): moved it to .*run.old-"):
        aside = run_dir.set_aside_failed_start(run)
    assert list(run.iterdir()) == [] and (aside / "metrics.jsonl").read_text() == "24 lines\n"
    assert run_dir.set_aside_failed_start(run) is None
    (run / "metrics.jsonl").write_text("")
    (run / "data.png").write_bytes(b"")
    assert not run_dir.is_failed_start(run)


_HOLD_LOCK = """
import sys, time
from srdiff.run_dir import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_folder_is_refused_naming_the_holder(tmp_path, capsys):
    """The lock lives as long as its process: a second start on the folder (any flag) is refused naming the
    holder's pid; once the holder is SIGKILLed, nothing stale is left and the folder can be used at once."""
    import signal
    import subprocess
    import sys

    run = _old_run(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for flags in (["--resume"], ["--overwrite"], []):
            assert cli.main(["train", *TINY_TRAIN, "--out-dir", str(run), *flags]) == 2
            err = _err_line(capsys)
            assert f"is in use by another srdiff run (pid {holder.pid} on " in err, err
        assert run.is_dir() and (run / "metrics.jsonl").read_text() == "24 lines\n"
        with pytest.raises(OutDirError, match=f"pid {holder.pid} on"):
            run_dir.RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert run_dir.lock_holder(run) is None
    with run_dir.RunLock(run):
        assert run_dir.lock_holder(run) is None  # held by this process: not another run
    assert prepare_out_dir(run, resume=True, overwrite=False) == run


def test_bad_flag_combinations_and_a_file(tmp_path):
    with pytest.raises(OutDirError, match="pass one of them"):
        prepare_out_dir(tmp_path, resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutDirError, match="exists and is not a directory"):
        prepare_out_dir(tmp_path / "file", resume=False, overwrite=False)
    assert issubclass(OutDirError, ValueError)


# ---------------------------------------------------------------------- srdiff train / demo
def test_train_into_a_used_out_dir_is_refused_and_changes_nothing(tmp_path, capsys):
    run = _old_run(tmp_path / "run")
    assert cli.main(["train", *TINY_TRAIN, "--out-dir", str(run)]) == 2
    err = _err_line(capsys)
    assert err.startswith("srdiff train: error: out dir") and "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == "24 lines\n"
    assert cli.main(["demo", *TINY_TRAIN, "--out-dir", str(run)]) == 2
    assert "srdiff demo: error: out dir" in capsys.readouterr().err


class _FakeTrainer:
    """Stands in for SelfRefiningTrainer: records the out dir it found, then trains or is interrupted."""

    seen: list = []
    raises: BaseException | None = None

    def __init__(self, config):
        self.out = Path(config.out_dir)
        self.step, self.last_checkpoint = 7, self.out / "checkpoints" / "last.pt"
        self.dist = type("Dist", (), {"is_main": True})()

    def train(self, *, resume=False):
        _FakeTrainer.seen.append((self.out.exists(), resume))
        if _FakeTrainer.raises is not None:
            raise _FakeTrainer.raises
        return {"out_dir": str(self.out)}


@pytest.fixture
def fake_trainer(monkeypatch):
    from srdiff.trainer import trainer

    monkeypatch.setattr(trainer, "SelfRefiningTrainer", _FakeTrainer)
    _FakeTrainer.seen, _FakeTrainer.raises = [], None
    return _FakeTrainer


def test_train_overwrite_moves_the_run_aside_before_the_trainer_starts(tmp_path, fake_trainer):
    run = _old_run(tmp_path / "run")
    with pytest.warns(UserWarning, match="moved the previous contents"):
        assert cli.main(["train", *TINY_TRAIN, "--out-dir", str(run), "--overwrite"]) == 0
    assert fake_trainer.seen == [(False, False)]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert (aside / "metrics.jsonl").read_text() == "24 lines\n"
    (aside / "config.json").write_text(json.dumps(_tiny_config().to_dict()))
    assert cli.main(["train", "--out-dir", str(aside), "--resume"]) == 0
    assert fake_trainer.seen[-1] == (True, True)


def test_ctrl_c_in_train_is_one_line_and_exit_130(tmp_path, fake_trainer, capsys):
    fake_trainer.raises = KeyboardInterrupt()
    assert cli.main(["train", *TINY_TRAIN, "--out-dir", str(tmp_path / "run")]) == 130
    err = _err_line(capsys)
    assert err.startswith("srdiff train: interrupted; at step 7, checkpoint ") and err.endswith("--resume to continue")
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--debug", "train", *TINY_TRAIN, "--out-dir", str(tmp_path / "run")])


def test_a_diverged_run_is_exit_1_with_its_message(tmp_path, fake_trainer, capsys):
    from srdiff.trainer.trainer import NonFiniteLossError

    fake_trainer.raises = NonFiniteLossError("loss became nan at step 3")
    for command in ("train", "demo"):
        assert cli.main([command, *TINY_TRAIN, "--out-dir", str(tmp_path / command)]) == 1
        assert f"srdiff {command}: loss became nan at step 3" in capsys.readouterr().err


@pytest.mark.parametrize("images, match", [
    pytest.param(torch.rand(1, 1, 8, 8), r"1 image\(s\) cannot be split .* at least 2 are needed", id="one-image"),
    pytest.param(torch.full((4, 1, 8, 8), 255.0), r"shape \(4, 1, 8, 8\), dtype torch\.float32, values in \[255, 255\]",
                 id="0-255-float"),
    pytest.param(torch.rand(1, 8, 8), r"got shape \(1, 8, 8\)", id="3d"),
])
def test_a_run_that_cannot_start_writes_nothing(tmp_path, capsys, images, match):
    """Data errors come from the trainer's constructor (the data loads there), before train() writes."""
    torch.save(images, tmp_path / "images.pt")
    out = tmp_path / "run"
    args = ["train", *TINY_TRAIN, "--data", str(tmp_path / "images.pt"), "--channels", "1", "--out-dir", str(out)]
    assert cli.main(args) == 2
    err = _err_line(capsys)
    assert err.startswith("srdiff train: error: ") and str(tmp_path / "images.pt") in err
    assert re.search(match, err), err
    assert not out.exists()


def _saved(folder: Path, obj, name: str = "saved.pt", truncate: bool = False) -> str:
    path = folder / name
    torch.save(obj, path)
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(path)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal on a machine without CUDA")


@pytest.mark.parametrize("argv, match", [
    pytest.param(lambda d: ["sample", "--ckpt", _saved(d, {"w": torch.ones(1000)}, truncate=True)],
                 r"'.*saved.pt' is not a trainer checkpoint \(checkpoints/last.pt\): torch.load failed with "
                 r"RuntimeError: PytorchStreamReader", id="truncated-checkpoint"),
    pytest.param(lambda d: ["eval", "--ckpt", _saved(d, {"step": 3})],
                 r"is not a trainer checkpoint .*: it holds a dict without \['config', 'model', 'ema', 'optimizer'\]",
                 id="foreign-checkpoint"),
    pytest.param(lambda d: ["inpaint", "--ckpt", str(d / "gone.pt"), "--images", "digits", "--masks", "digits"],
                 r"'.*gone.pt' does not exist or is not a file \(expected a trainer checkpoint", id="missing-checkpoint"),
    pytest.param(lambda d: ["fam", "--highlighter", _saved(d, {"w": torch.ones(1000)}, truncate=True), "--images",
                            "digits", "--out", str(d / "fam")],
                 r"is not a FlawHighlighter checkpoint \(srdiff.FlawHighlighter/1\): torch.load failed", id="truncated-highlighter"),
    pytest.param(lambda d: ["sample", "--ckpt", "any.pt", "--device", "cuda"],
                 r"device 'cuda' requested but CUDA is not available on this machine", marks=NO_GPU, id="no-gpu-sample"),
    pytest.param(lambda d: ["train", *TINY_TRAIN, "--device", "cuda:1", "--out-dir", str(d / "run")],
                 r"device 'cuda:1' requested but CUDA is not available", marks=NO_GPU, id="no-gpu-train"),
    pytest.param(lambda d: ["fam", "--highlighter", "hl.pt", "--images", "digits", "--out", str(d / "fam"),
                            "--device", "gpu"], r"device 'gpu' is not a device name", id="bad-device-name"),
    pytest.param(lambda d: ["train", *TINY_TRAIN, "--image-size", "15", "--out-dir", str(d / "run")],
                 r"image_size 15 does not fit backbone 'unet'.*image_size 14 or 16 would", id="unet-15"),
    pytest.param(lambda d: ["demo", *TINY_TRAIN, "--backbone", "dit", "--image-size", "17", "--out-dir", str(d / "run")],
                 r"image_size 17 does not fit backbone 'dit'.*image_size 16 or 18 would", id="dit-17"),
])
def test_unusable_inputs_are_one_line_and_write_nothing(tmp_path, capsys, argv, match):
    """Unreadable checkpoints and highlighters, devices this machine lacks, image sizes the backbone cannot
    take: one line naming the file or value (never torch's traceback), exit 2, nothing written."""
    argv = argv(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert cli.main(argv) == 2
    err = _err_line(capsys)
    assert re.search(match, err), err
    assert sorted(tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------- errors, --debug, --help
def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    args = ["fam", "--highlighter", str(tmp_path / "missing.pt"), "--images", str(tmp_path), "--out", str(tmp_path)]
    assert cli.main(args) == 2
    assert _err_line(capsys).startswith("srdiff fam: error: ")
    with pytest.raises((ValueError, OSError)):
        cli.main([*args, "--debug"])
    with pytest.raises((ValueError, OSError)):
        cli.main(["--debug", *args])


def test_ctrl_c_anywhere_is_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_info", interrupted)
    assert cli.main(["info"]) == 130
    assert _err_line(capsys) == "srdiff info: interrupted"


def test_bugs_keep_their_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_info", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["info"])


def test_warnings_print_as_one_line_during_a_command(monkeypatch):
    seen = []

    def warn(args):
        seen.append(warnings.formatwarning("data converted", UserWarning, "file.py", 1))

    monkeypatch.setattr(cli, "_info", warn)
    before = warnings.formatwarning
    assert cli.main(["info"]) == 0
    assert seen == ["srdiff info: warning: data converted\n"]
    assert warnings.formatwarning is before


def test_help_lists_every_command_and_the_examples(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Each feature adds" not in out and "Self-refining diffusion" in out
    for command in ("info", "train", "sample", "eval", "ablate", "demo", "highlighter", "fam"):
        assert f"\n    {command} " in out or f"\n    {command}\n" in out, command
    assert "srdiff demo" in out and "srdiff train --config configs/demo.toml" in out and "--debug" in out


# ---------------------------------------------------------------------- srdiff fam
@pytest.fixture
def highlighter(tmp_path):
    from srdiff.highlighter import FlawHighlighter

    path = tmp_path / "hl.pt"
    FlawHighlighter("small", in_channels=1, image_size=8, width=4).save(path)
    return path


def _size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def test_fam_on_a_tensor_file_with_scale(tmp_path, highlighter):
    torch.save(torch.rand(3, 1, 8, 8), tmp_path / "samples.pt")
    out = tmp_path / "fam"
    args = ["fam", "--highlighter", str(highlighter), "--images", str(tmp_path / "samples.pt"), "--out", str(out)]
    assert cli.main([*args, "--scale", "3"]) == 0
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert _size(out / "overlays" / "0000.png") == (24, 24) and _size(out / "mfam.png") == (24, 24)
    sheet_w, _ = _size(out / "contact-sheet.png")
    assert sheet_w == 3 * (2 * 8 + 3 * 2)  # two columns of 8 px and three 2 px gaps, times 3
    assert torch.load(out / "mfam.pt", weights_only=True).shape == (8, 8)


@pytest.mark.filterwarnings("ignore:image '.*one.png' is 16x20:UserWarning")
def test_fam_on_one_image_file_and_refuses_to_overwrite(tmp_path, highlighter, capsys):
    Image.fromarray((torch.rand(20, 16) * 255).byte().numpy()).save(tmp_path / "one.png")
    out = tmp_path / "fam"
    args = ["fam", "--highlighter", str(highlighter), "--images", str(tmp_path / "one.png"), "--out", str(out)]
    with pytest.warns(UserWarning, match=r"one.png' is 16x20: resized \(shorter side to 8\) .* cutting its edges"):
        assert cli.main(args) == 0
    assert [p.name for p in (out / "overlays").iterdir()] == ["one.png"]
    before = (out / "contact-sheet.png").read_bytes()
    capsys.readouterr()
    assert cli.main([*args, "--scale", "2"]) == 2
    assert "would overwrite" in _err_line(capsys)
    assert (out / "contact-sheet.png").read_bytes() == before
    assert cli.main([*args, "--scale", "2", "--overwrite"]) == 0
    assert _size(out / "overlays" / "one.png") == (16, 16)
    assert cli.main([*args, "--scale", "0", "--overwrite"]) == 2
    assert "--scale must be >= 1, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------------- srdiff sample
class _FakeTask:
    """An unconditional task whose sampling costs nothing: the loaded model's checks are the real ones."""

    name, backbone_name, condition = "unconditional", "unet", None

    def sample(self, model, n, **kwargs):
        return torch.rand(n, 1, 8, 8)


@pytest.fixture
def fake_checkpoint(monkeypatch):
    from srdiff.trainer import TrainConfig, trained

    fake = trained.TrainedModel(model=None, config=TrainConfig(), task=_FakeTask(), vae=None, path="any.pt")
    monkeypatch.setattr(trained, "load_trained", lambda path, device: fake)


def test_sample_writes_a_grid_and_one_png_per_image(tmp_path, fake_checkpoint, capsys):
    grid = tmp_path / "grid.png"
    args = ["sample", "--ckpt", "any.pt", "--n", "5", "--steps", "1", "--out", str(grid)]
    assert cli.main(args) == 0
    assert grid.is_file()
    pngs = sorted((tmp_path / "grid").iterdir())
    assert [p.name for p in pngs] == [f"000{i}.png" for i in range(5)] and _size(pngs[0]) == (8, 8)
    before = pngs[0].read_bytes()
    capsys.readouterr()
    assert cli.main(args) == 2
    err = _err_line(capsys)
    assert "would overwrite" in err and "grid.png" in err and "(and 3 more)" in err and "--overwrite" in err
    assert pngs[0].read_bytes() == before
    assert cli.main([*args, "--overwrite"]) == 0
    assert cli.main([*args, "--png-dir", str(tmp_path / "each"), "--tensor-out", str(tmp_path / "s.pt"),
                     "--overwrite"]) == 0
    assert len(os.listdir(tmp_path / "each")) == 5
    assert torch.load(tmp_path / "s.pt", weights_only=True).shape == (5, 1, 8, 8)
    assert cli.main(["sample", "--ckpt", "any.pt", "--n", "2", "--out", str(tmp_path / "only.png"), "--no-pngs"]) == 0
    assert not (tmp_path / "only").exists()


def test_sample_refuses_bad_outputs_before_sampling(tmp_path, fake_checkpoint, capsys):
    assert cli.main(["sample", "--ckpt", "any.pt", "--out", str(tmp_path / "grid")]) == 2
    assert "--out must name a .png file" in _err_line(capsys)
    assert cli.main(["sample", "--ckpt", "any.pt", "--n", "0", "--out", str(tmp_path / "g.png")]) == 2
    assert "--n must be >= 1, got 0" in _err_line(capsys)
    assert cli.main(["sample", "--ckpt", "any.pt", "--upscale", "0", "--out", str(tmp_path / "g.png")]) == 2
    assert "--upscale must be >= 1, got 0" in _err_line(capsys)


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("scale", ["nan", "inf", "-1"])
def test_guidance_scale_must_be_finite_and_not_negative(command, scale, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--ckpt", "any.pt", "--guidance-scale", scale])
    assert info.value.code == 2
    assert "argument --guidance-scale: the scale must be a finite number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--guidance-scale", "3"], "--guidance-scale needs a conditional checkpoint"),
    (["--class", "3"], "--class needs a class-conditional checkpoint"),
    (["--prompt", "a seven"], "--prompt needs a text-conditional checkpoint"),
])
def test_conditions_need_a_checkpoint_that_takes_them(tmp_path, fake_checkpoint, capsys, flags, message):
    assert cli.main(["sample", "--ckpt", "any.pt", *flags, "--out", str(tmp_path / "g.png")]) == 2
    err = _err_line(capsys)
    assert message in err and "checkpoint any.pt is task 'unconditional' (backbone 'unet'), which takes no" in err
    assert not (tmp_path / "g.png").exists()


def test_refuse_existing_counts_what_it_does_not_list(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(5)]
    for p in paths:
        p.write_bytes(b"")
    with pytest.raises(OutDirError, match=r"would overwrite .*0\.png, .*1\.png, .*2\.png \(and 2 more\): pass --force"):
        run_dir.refuse_existing(paths, overwrite=False, flag="--force")
    run_dir.refuse_existing(paths, overwrite=True)


@pytest.mark.parametrize("command", [
    pytest.param(["highlighter", "train", "--real", "digits", "--fake", "planted:noise", "--out"], id="highlighter-train"),
    pytest.param(["eval", "--ckpt", "missing.pt", "--out"], id="eval"),
])
def test_other_commands_refuse_existing_outputs_before_working(tmp_path, capsys, command):
    out = tmp_path / "result"
    out.write_text("earlier result")
    assert cli.main([*command, str(out)]) == 2
    assert "would overwrite" in _err_line(capsys) and out.read_text() == "earlier result"
