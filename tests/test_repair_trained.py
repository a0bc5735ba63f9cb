"""Flaw repair on every checkpoint the trainer makes: each task with each backbone it trains, in pixel and
latent mode, re-denoised through the task's own denoiser call (``TrainedModel.denoiser``) by ``srdiff repair
--ckpt``, ``srdiff.repair_flaws`` and ``FlawRepairPipeline``; the condition a model needs given with
``--class`` / ``--prompt`` (``class_labels`` / ``prompts``), refused naming the argument where it is missing
or cannot be taken; the pixels outside the mask kept bit for bit.

The checkpoints are one-step runs, made on first use and shared by the module's tests."""

import json

import pytest
import torch
from test_task_text import tiny_vae
from srdiff_testing import tiny_config

from srdiff import cli
from srdiff.diffusion.denoiser import Denoiser
from srdiff.highlighter import FlawHighlighter
from srdiff.repair import repair_flaws, sdedit
from srdiff.repair_pipeline import FlawRepairPipeline
from srdiff.trainer import SelfRefiningTrainer
from srdiff.trainer.task import Batch
from srdiff.trainer.trained import load_trained

TRANSFORMER = dict(hidden_size=16, depth=2, attention_head_dim=8)
# every task with every backbone the trainer trains it with (sd3 needs captions, text needs a caption reader)
TRAINED_BACKBONES = {"unconditional": ("unet", "unet-cond", "dit", "uvit"),
                     "class": ("unet", "unet-cond", "dit", "uvit"),
                     "text": ("unet-cond", "sd3"),
                     "inpaint": ("unet", "unet-cond", "dit", "uvit")}
CASES = [(task, backbone, mode) for task, backbones in TRAINED_BACKBONES.items() for backbone in backbones
         for mode in ("pixel", "latent")]
CONDITIONAL = [case for case in CASES if case[0] in ("class", "text") and case[2] == "pixel"]
# what each conditional task's images are conditioned on, as flags and as repair_flaws sees them
FLAGS = {"class": ["--class", "3", "7"], "text": ["--prompt", "a digit", "another digit"]}
CONDITIONS = {"class": ({"class_labels": [3, 7, 3]}, {"class_labels": [1, 1, 1]}),
              "text": ({"prompts": ["three", "seven", "three"]}, {"prompts": ["one", "one", "one"]})}
RUN_GUIDANCE = 2.0


def case_id(case) -> str:
    return "-".join(case)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint((task, backbone, mode))``: the path of that one-step run's ``checkpoints/last.pt``, the
    trainer's own checkpoint after one optimiser step (made once per module)."""
    root = tmp_path_factory.mktemp("runs")
    made = {}

    def make(case):
        if case not in made:
            task, backbone, mode = case
            changes = dict(task=task, backbone=backbone, mode="baseline", steps=1)
            if backbone in ("dit", "uvit", "sd3"):
                changes.update(TRANSFORMER)
            if task in ("class", "text"):
                changes.update(guidance_scale=RUN_GUIDANCE, condition_dropout=0.25)
            if mode == "latent":
                changes["vae"] = str(root / "vae") if (root / "vae").is_dir() else tiny_vae(root / "vae")
            trainer = SelfRefiningTrainer(tiny_config(root, case_id(case), **changes))
            trainer.train_step()
            made[case] = str(trainer.save_checkpoint())
        return made[case]

    return make


@pytest.fixture(scope="module")
def highlighter(tmp_path_factory):
    torch.manual_seed(0)
    hl = FlawHighlighter("small", in_channels=1, image_size=8, width=4, stages=2).eval()
    path = tmp_path_factory.mktemp("highlighter") / "hl.pt"
    hl.save(path)
    return path


def images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def box_masks(n: int = 3) -> torch.Tensor:
    m = torch.zeros(n, 1, 8, 8)
    m[:, :, 2:6, 1:5] = 1.0
    m[:, :, 6, 1:5] = 0.5  # a soft edge: re-denoised, but not a hole to an inpainting model
    return m


def _repair(model, **kwargs):
    return repair_flaws(images(), model, masks=box_masks(), strength=0.6, steps=4, progress=False, **kwargs)


# ---------------------------------------------------------------- srdiff repair --ckpt, every case
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_srdiff_repair_on_every_checkpoint(case, checkpoint, highlighter, tmp_path, capsys):
    """Exit 0 with the condition the model needs; the outside of the mask bit for bit the input's, the inside
    re-denoised. Without it: exit 2, one line naming the flag."""
    task = case[0]
    torch.save(images(), tmp_path / "images.pt")
    argv = ["repair", "--ckpt", checkpoint(case), "--highlighter", str(highlighter), "--images",
            str(tmp_path / "images.pt"), "--out", str(tmp_path / "out"), "--steps", "4", "--flag-threshold",
            "0", "--no-progress"]
    flags = FLAGS.get(task, [])
    if flags:
        assert cli.main(argv) == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"srdiff repair: error: {flags[0]} is needed") and "\n" not in err, err
    assert cli.main(argv + flags) == 0
    repaired, masks = torch.load(tmp_path / "out" / "repaired.pt"), torch.load(tmp_path / "out" / "masks.pt")
    outside = (masks == 0).expand_as(repaired)
    assert outside.any() and (~outside).any()  # neither side of the check is empty
    assert torch.equal(repaired[outside], images()[outside])
    assert not torch.equal(repaired[~outside], images()[~outside])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["summary"]["max_abs_change_outside_mask"] == 0.0
    assert report["settings"]["latent"] is (case[2] == "latent")


# ---------------------------------------------------------------- the task's own call, conditions, guidance
@pytest.mark.parametrize("case", CONDITIONAL, ids=case_id)
def test_conditions_and_the_runs_guidance_reach_the_model(case, checkpoint):
    """Other labels or prompts re-denoise otherwise; the default guidance is the run's, and a scale given
    replaces it; the predictions are the task's guided ones, image i with condition i."""
    trained = load_trained(checkpoint(case))
    these, others = CONDITIONS[case[0]]
    default = _repair(trained.denoiser(**these))[0]
    assert torch.equal(default, _repair(trained.denoiser(**these, guidance_scale=RUN_GUIDANCE))[0])
    assert not torch.equal(default, _repair(trained.denoiser(**these, guidance_scale=1.0))[0])
    assert not torch.equal(default, _repair(trained.denoiser(**others))[0])

    rows, x, t = torch.tensor([2, 0]), torch.randn(2, *trained.task.sample_shape), torch.tensor(40)
    predict = trained.denoiser(**these).predictor(rows, images()[rows], box_masks()[rows])
    condition = trained.conditions(**these).select(rows)
    expected = trained.task.guided_predict(trained.model, RUN_GUIDANCE)(x, t, condition)
    torch.testing.assert_close(predict(x, t), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["pixel", "latent"])
def test_an_inpainting_model_reads_the_known_pixels_and_the_holes(mode, checkpoint):
    """Its extra channels are the batch's images with their holes: the box, not the soft edge at 0.5 (a hole
    where the mask is > 0.5, binary as in training)."""
    trained = load_trained(checkpoint(("inpaint", "unet", mode)))
    rows, x, t = torch.tensor([1, 2]), torch.randn(2, *trained.task.sample_shape), torch.tensor(40)
    predict = trained.denoiser().predictor(rows, images()[rows], box_masks()[rows])
    box = torch.zeros(2, 1, 8, 8)
    box[:, :, 2:6, 1:5] = 1.0
    extras = trained.task.conditioning(images()[rows], box)
    expected = trained.task.predict(trained.model, x, t, Batch(x0=x, extras=extras))
    torch.testing.assert_close(predict(x, t), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["pixel", "latent"])
def test_the_plain_model_and_its_denoiser_agree_bit_for_bit(mode, checkpoint):
    """An unconditional UNet re-denoises the same through the task as called as a plain diffusers model (as
    ``srdiff repair --ckpt`` did before the seam), SDEdit too."""
    trained = load_trained(checkpoint(("unconditional", "unet", mode)))
    plain = dict(scheduler=trained.scheduler(), vae=trained.vae)
    assert torch.equal(_repair(trained.model, **plain)[0], _repair(trained.denoiser())[0])
    edited = sdedit(images(), trained.denoiser(sampler="ddpm"), steps=4, progress=False)
    plain = sdedit(images(), trained.model, scheduler=trained.scheduler("ddpm"), vae=trained.vae, steps=4,
                   progress=False)
    assert torch.equal(edited, plain)


# ---------------------------------------------------------------- what is refused
UNCONDITIONAL = ("unconditional", "unet", "pixel")
CLASS = ("class", "unet", "pixel")
TEXT = ("text", "sd3", "pixel")


@pytest.mark.parametrize("case, kwargs, error, match", [
    (("class", "dit", "pixel"), {}, ValueError,
     r"^class_labels is needed to re-denoise with it: checkpoint .* is task 'class' \(backbone 'dit'\), which "
     r"takes a class label per image"),
    (TEXT, {}, ValueError, r"^prompts is needed .* task 'text' \(backbone 'sd3'\)"),
    (("class", "uvit", "pixel"), dict(prompts=["a"] * 3), ValueError, r"^prompts needs a text-conditional checkpoint"),
    (("unconditional", "dit", "pixel"), dict(class_labels=[1] * 3), ValueError,
     r"^class_labels needs a class-conditional checkpoint; .* which takes no condition"),
    (("inpaint", "unet", "pixel"), dict(guidance_scale=2.0), ValueError,
     r"^guidance_scale needs a conditional checkpoint .* nothing to guide"),
    (CLASS, dict(class_labels=[1, 10, 2]), ValueError, r"class labels must be in \[0, 10\), got 10"),
    (CLASS, dict(class_labels=[[1], [2], [3]]), ValueError, r"one label per image, shape \(n,\)"),
    (CLASS, dict(class_labels=[1.5, 2.0, 3.0]), TypeError, "class labels must be integers"),
    (CLASS, dict(class_labels=[1, 2]), ValueError, "carries the conditions of 2 images"),
    (CLASS, dict(class_labels=[1] * 3, guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite"),
    (("text", "unet-cond", "pixel"), dict(prompts="a digit"), TypeError, "prompts must be a list of strings"),
], ids=lambda v: case_id(v) if isinstance(v, tuple) else None)
def test_a_missing_or_unwanted_condition_is_named(case, kwargs, error, match, checkpoint):
    trained = load_trained(checkpoint(case))
    with pytest.raises(error, match=match):
        _repair(trained.denoiser(**kwargs))


def test_a_denoiser_carries_what_a_plain_model_is_given(checkpoint):
    trained = load_trained(checkpoint(UNCONDITIONAL))
    with pytest.raises(TypeError, match=r"model is a trained srdiff model \(TrainedModel\): pass model.denoiser\("):
        _repair(trained)
    for name, value in (("vae", trained.vae or torch.nn.Identity()), ("class_labels", torch.tensor([1, 2, 3])),
                        ("model_kwargs", {})):
        with pytest.raises(ValueError, match=f"^{name} must not be given with a Denoiser"):
            _repair(trained.denoiser(), **{name: value})
    with pytest.raises(ValueError, match="scheduler is needed for a plain model"):
        _repair(trained.model)
    assert isinstance(trained.denoiser(), Denoiser) and trained.denoiser().count is None


def test_srdiff_repair_names_its_flags(checkpoint, highlighter, tmp_path, capsys):
    """Errors name the flags: the condition a checkpoint cannot take, a labels file of the wrong length, a
    --prompt beside a --pipeline."""
    from diffusers import DDPMPipeline

    torch.save(images(), tmp_path / "images.pt")
    torch.save(torch.tensor([1, 2]), tmp_path / "labels.pt")
    base = ["repair", "--highlighter", str(highlighter), "--images", str(tmp_path / "images.pt"), "--out",
            str(tmp_path / "out"), "--steps", "2", "--no-progress"]
    trained = load_trained(checkpoint(UNCONDITIONAL))
    DDPMPipeline(unet=trained.model, scheduler=trained.scheduler("ddpm")).save_pretrained(tmp_path / "pipe")
    for source, flags, message in [
        (UNCONDITIONAL, ["--class", "1"], "--class needs a class-conditional checkpoint"),
        (CLASS, ["--prompt", "a"], "--prompt needs a text-conditional checkpoint"),
        (UNCONDITIONAL, ["--guidance-scale", "3"], "--guidance-scale needs a conditional checkpoint"),
        (CLASS, ["--class-labels", str(tmp_path / "labels.pt")], "carries the conditions of 2 images"),
        (TEXT, ["--class", "1"], "--class needs a class-conditional checkpoint"),
        ("pipeline", ["--prompt", "a"], "--prompt needs --ckpt"),
    ]:
        where = ["--pipeline", str(tmp_path / "pipe")] if source == "pipeline" else ["--ckpt", checkpoint(source)]
        assert cli.main(base + where + flags) == cli.EXIT_USER_ERROR, (source, flags)
        err = capsys.readouterr().err.strip()
        assert err.startswith("srdiff repair: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- FlawRepairPipeline
@pytest.mark.parametrize("case", [("class", "dit", "pixel"), TEXT], ids=case_id)
def test_pipeline_generates_and_repairs_with_a_trained_model(case, checkpoint, highlighter):
    """The conditions given condition the samples and their repair alike; missing, they are refused before
    anything is sampled."""
    trained = load_trained(checkpoint(case))
    pipe = FlawRepairPipeline(trained, FlawHighlighter.load(highlighter))
    conditions = CONDITIONS[case[0]][0]
    out = pipe(batch_size=3, num_inference_steps=2, seed=1, steps=4, flag_threshold=0.0, progress=False,
               **conditions)
    assert torch.equal(out.originals, trained.sample(3, seed=1, steps=2, **conditions))
    outside = (out.masks == 0).expand_as(out.images)
    assert outside.any() and (~outside).any()
    assert torch.equal(out.images[outside], out.originals[outside])
    again = pipe(out.originals, seed=1, steps=4, flag_threshold=0.0, progress=False, **conditions)
    assert torch.equal(again.images, out.images)
    with pytest.raises(ValueError, match=r"(class_labels|prompts) is needed"):
        pipe(batch_size=3, num_inference_steps=2, progress=False)


def test_a_diffusers_pipeline_takes_no_prompts_or_guidance(checkpoint, highlighter):
    from diffusers import DDPMPipeline

    trained = load_trained(checkpoint(UNCONDITIONAL))
    pipe = FlawRepairPipeline(DDPMPipeline(unet=trained.model, scheduler=trained.scheduler("ddpm")),
                              FlawHighlighter.load(highlighter))
    for kwargs in (dict(prompts=["a"] * 3), dict(guidance_scale=2.0)):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} needs a trained srdiff model"):
            pipe(images(), **kwargs)
    with pytest.raises(ValueError, match="class_labels needs a trained srdiff model"):
        pipe.generate(3, 2, class_labels=[1, 2, 3])
