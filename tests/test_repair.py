"""Flaw repair (srdiff.repair) and the RePaint it runs (srdiff.diffusion): masks, the strength schedule,
composition, latent path, pipeline, CLI."""

import json

import pytest
import torch

from srdiff import repair
from srdiff.diffusion import repaint, schedules
from srdiff.highlighter import FlawHighlighter


def tiny_unet(channels: int = 1, size: int = 8, **extra):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, **extra).eval()


def scheduler(kind: str = "ddim"):
    from diffusers import DDIMScheduler, DDPMScheduler

    return (DDIMScheduler if kind == "ddim" else DDPMScheduler)(num_train_timesteps=100)


def images(n: int = 3, channels: int = 1, size: int = 8, seed: int = 0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def box_mask(n: int = 3, size: int = 8):
    m = torch.zeros(n, 1, size, size)
    m[:, :, 2:5, 3:7] = 1.0
    m[:, :, 1, 3:7] = 0.5  # a soft edge
    return m


def elementwise_denoiser(x, t):
    """Mixes nothing across images, so its results cannot depend on how images are batched."""
    return 0.1 * x + 0.001 * t.float()


# ---------------------------------------------------------------- masks
def test_flaw_masks_threshold_dilate_feather():
    fam = torch.zeros(2, 9, 9)
    fam[:, 4, 4] = 1.0
    fam[:, 0, 0] = 0.4
    fam[1] *= 0.5  # same shape, half the scale
    relative = repair.flaw_masks(fam, threshold=0.5, dilate=0, feather=0)
    assert relative.shape == (2, 1, 9, 9) and relative.sum(dim=(1, 2, 3)).tolist() == [1.0, 1.0]
    absolute = repair.flaw_masks(fam, threshold=0.6, threshold_mode="absolute", dilate=0, feather=0)
    assert absolute.sum(dim=(1, 2, 3)).tolist() == [1.0, 0.0]
    grown = repair.flaw_masks(fam[:1], threshold=0.5, dilate=1, feather=0)[0, 0]
    assert grown[3:6, 3:6].eq(1).all() and grown.sum() == 9
    soft = repair.flaw_masks(fam[:1], threshold=0.5, dilate=1, feather=1)[0, 0]
    assert soft[3:6, 3:6].eq(1).all()
    ring = soft[1:8, 1:8].clone()
    ring[2:5, 2:5] = 0.5
    assert ((ring > 0) & (ring < 1)).all()  # falls off over 2 * feather px
    assert soft.sum() - soft[1:8, 1:8].sum() == 0  # and is exactly 0 beyond
    assert repair.flaw_masks(torch.zeros(1, 4, 4), threshold=0.0).eq(0).all()  # an empty map flags nothing


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(threshold=1.5), ValueError, "threshold"), (dict(threshold="0.5"), TypeError, "threshold"),
    (dict(threshold_mode="top"), ValueError, "threshold_mode"),
    (dict(dilate=-1), ValueError, "dilate"), (dict(feather=0.5), TypeError, "feather"),
])
def test_flaw_masks_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        repair.flaw_masks(torch.zeros(1, 4, 4), **kwargs)


# ---------------------------------------------------------------- schedule
def test_strength_timesteps():
    s = scheduler("ddim")
    full = schedules.strength_timesteps(s, 1.0, 20)
    assert full.tolist() == list(range(95, -1, -5))
    half = schedules.strength_timesteps(s, 0.5, 20)
    assert half.tolist() == full[10:].tolist()
    assert schedules.strength_timesteps(s, 0.01, 20).tolist() == [0]  # at least one step
    assert schedules.run_steps(20, 0.33) == 6
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="strength"):
            schedules.strength_timesteps(s, bad, 20)
    with pytest.raises(TypeError, match="strength"):
        schedules.strength_timesteps(s, True, 20)


def test_jump_schedule():
    assert repaint.jump_schedule(4, 1, 1) == [1, 1, 1, 1]
    assert repaint.jump_schedule(4, 2, 2) == [1, 1, -2, 1, 1, 1, 1]
    moves = repaint.jump_schedule(10, 2, 3)
    assert sum(moves) == 10 and moves.count(-2) == 8  # r - 1 jumps back at steps 2, 4, 6, 8
    with pytest.raises(ValueError, match="jump"):
        repaint.jump_schedule(4, 0, 2)


# ---------------------------------------------------------------- composition
@pytest.mark.parametrize("kind, resample", [("ddim", 1), ("ddpm", 1), ("ddim", 2)])
def test_outside_mask_is_exact(kind, resample):
    x, m = images(), box_mask()
    out, masks, report = repair.repair_flaws(x, tiny_unet(), masks=m, scheduler=scheduler(kind), strength=0.6,
                                             steps=10, resample=resample, jump=2, progress=False)
    outside = m == 0
    assert torch.equal(out[outside], x[outside])
    assert not torch.equal(out[~outside], x[~outside])
    assert torch.equal(x, images())  # the input is not written
    assert torch.equal(masks, m)
    assert report["summary"]["max_abs_change_outside_mask"] == 0.0
    assert report["summary"]["repaired"] == 3


def test_compose_is_exact_where_mask_is_zero():
    known, model_state = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mask = torch.tensor([0.0, 0.3, 1.0, 0.0]).view(1, 1, 2, 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    out = repaint.compose(model_state, known, mask.expand(2, 1, 4, 4))
    zero = (mask == 0).expand(2, 3, 4, 4)
    assert torch.equal(out[zero], known[zero])
    one = (mask == 1).expand(2, 3, 4, 4)
    assert torch.equal(out[one], model_state[one])


def test_zero_mask_returns_the_input():
    x = images()
    out, masks, report = repair.repair_flaws(x, tiny_unet(), masks=torch.zeros(3, 1, 8, 8), scheduler=scheduler(),
                                             progress=False)
    assert torch.equal(out, x) and masks.eq(0).all()
    assert report["summary"]["repaired"] == 0 and report["summary"]["mean_abs_change"] == 0.0


def test_seed_determinism_and_batching():
    x, m = images(4), box_mask(4)
    kwargs = dict(masks=m, scheduler=scheduler("ddpm"), strength=0.5, steps=10, progress=False)
    a, _, _ = repair.repair_flaws(x, tiny_unet(), seed=3, **kwargs)
    b, _, _ = repair.repair_flaws(x, tiny_unet(), seed=3, **kwargs)
    c, _, _ = repair.repair_flaws(x, tiny_unet(), seed=4, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    whole, _, _ = repair.repair_flaws(x, elementwise_denoiser, seed=3, batch_size=4, **kwargs)
    pairs, _, _ = repair.repair_flaws(x, elementwise_denoiser, seed=3, batch_size=1, **kwargs)
    assert torch.equal(whole, pairs)  # each image's noise is its own: batching changes nothing


def test_scheduler_of_the_caller_is_left_alone():
    s = scheduler()
    s.set_timesteps(7)
    before = s.timesteps.clone()
    repair.repair_flaws(images(), tiny_unet(), masks=box_mask(), scheduler=s, steps=10, progress=False)
    assert torch.equal(s.timesteps, before)


def test_sdedit_changes_everything_with_the_same_noise():
    x = images()
    s = scheduler()
    edited = repair.sdedit(x, tiny_unet(), scheduler=s, strength=0.5, steps=10, seed=1, progress=False)
    ones, _, _ = repair.repair_flaws(x, tiny_unet(), masks=torch.ones(3, 1, 8, 8), scheduler=s, strength=0.5, steps=10,
                                     seed=1, progress=False)
    assert torch.equal(edited, ones)
    assert (edited != x).float().mean() > 0.9


def test_class_labels_reach_the_model():
    unet = tiny_unet(num_class_embeds=10)
    x, m = images(), box_mask()
    kwargs = dict(masks=m, scheduler=scheduler(), steps=10, progress=False)
    a, _, _ = repair.repair_flaws(x, unet, class_labels=torch.tensor([1, 2, 3]), **kwargs)
    b, _, _ = repair.repair_flaws(x, unet, class_labels=torch.tensor([4, 5, 6]), **kwargs)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="class_labels"):
        repair.repair_flaws(x, unet, class_labels=torch.tensor([1, 2]), **kwargs)


# ---------------------------------------------------------------- latent models
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16).eval()


def test_latent_path_composes_on_the_latent_grid_and_pastes_pixels():
    vae = tiny_vae()
    x = images(2, size=16)
    m = torch.zeros(2, 1, 16, 16)
    m[:, :, 4:9, 6:12] = 1.0
    out, masks, report = repair.repair_flaws(x, tiny_unet(channels=2, size=8), masks=m, vae=vae,
                                             scheduler=scheduler(), strength=0.7, steps=10, progress=False)
    outside = m == 0
    assert torch.equal(out[outside], x[outside])
    assert not torch.equal(out[~outside], x[~outside])
    assert report["settings"]["latent"] is True
    grid = repaint.model_mask(m, (8, 8))
    assert grid.shape == (2, 1, 8, 8) and grid[0, 0, 2:5, 3:6].eq(1).all() and grid.sum() == 2 * 9


# ---------------------------------------------------------------- the highlighter loop
def tiny_highlighter(channels: int = 1):
    torch.manual_seed(0)
    return FlawHighlighter("small", in_channels=channels, image_size=8, width=4, stages=2).eval()


def test_rounds_repeat_while_flagged():
    x = images(2)
    hl = tiny_highlighter()
    out, masks, report = repair.repair_flaws(x, tiny_unet(), hl, scheduler=scheduler(), steps=10, rounds=3,
                                             flag_threshold=0.0, dilate=0, feather=0, progress=False)
    assert [r["rounds"] for r in report["images"]] == [3, 3]  # flagged at every threshold: all rounds run
    outside = masks == 0
    assert outside.any() and (~outside).any()
    assert torch.equal(out[outside], x[outside])
    assert report["summary"]["flagged_before"] == 1.0
    never, _, report = repair.repair_flaws(x, tiny_unet(), hl, scheduler=scheduler(), steps=10, rounds=3,
                                           flag_threshold=1.0, progress=False)
    assert torch.equal(never, x) and report["summary"]["repaired"] == 0  # nothing flagged, nothing touched


@pytest.mark.parametrize("kwargs, match", [
    (dict(strength=0.0), "strength"), (dict(strength=1.5), "strength"),
    (dict(masks=torch.zeros(3, 1, 8, 7)), "masks must be 8x8"), (dict(masks=torch.zeros(2, 1, 8, 8)), "one per image"),
    (dict(masks=torch.zeros(3, 2, 8, 8)), r"masks must be \(B, 1, H, W\)"),
    (dict(highlighter=tiny_highlighter(3)), "3-channel"), (dict(rounds=0), "rounds"),
    (dict(masks=torch.zeros(3, 1, 8, 8), rounds=2), "rounds"), (dict(masks=torch.full((3, 1, 8, 8), 2.0)), r"\[0, 1\]"),
    (dict(images=images() * 2), "images must lie"), (dict(resample=0), "resample"),
    (dict(highlighter=None), "highlighter is needed"),
])
def test_bad_input_is_named(kwargs, match):
    args = dict(images=images(), highlighter=tiny_highlighter(), scheduler=scheduler(), progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        repair.repair_flaws(args.pop("images"), tiny_unet(), args.pop("highlighter"), **args)


def test_scheduler_type_is_checked():
    with pytest.raises(TypeError, match="scheduler"):
        repair.repair_flaws(images(), tiny_unet(), masks=box_mask(), scheduler=object(), progress=False)


# ---------------------------------------------------------------- pipeline and CLI
def test_pipeline_generates_and_repairs():
    from diffusers import DDPMPipeline

    from srdiff.repair_pipeline import FlawRepairPipeline

    pipe = FlawRepairPipeline(DDPMPipeline(unet=tiny_unet(), scheduler=scheduler("ddpm")), tiny_highlighter())
    out = pipe(batch_size=2, num_inference_steps=4, seed=0, steps=10, flag_threshold=0.0, progress=False)
    assert out.images.shape == out.originals.shape == (2, 1, 8, 8)
    outside = out.masks == 0
    assert outside.any() and (~outside).any()  # neither side of the check is empty
    assert torch.equal(out.images[outside], out.originals[outside])
    again = pipe(out.originals, steps=10, flag_threshold=0.0, progress=False)
    assert torch.equal(again.images, out.images)


def test_pipeline_on_a_latent_diffusion_pipeline():
    from diffusers import LDMPipeline

    from srdiff.repair_pipeline import FlawRepairPipeline

    pipe = FlawRepairPipeline(LDMPipeline(vqvae=tiny_vae(), unet=tiny_unet(channels=2), scheduler=scheduler()),
                              tiny_highlighter())
    out = pipe(batch_size=2, num_inference_steps=3, seed=0, steps=10, flag_threshold=0.0, progress=False)
    assert out.images.shape == (2, 1, 16, 16) and out.report["settings"]["latent"] is True
    outside = out.masks == 0
    assert outside.any() and (~outside).any()  # neither side of the check is empty
    assert torch.equal(out.images[outside], out.originals[outside])


def _source(kind: str, tmp_path):
    """(--ckpt or --pipeline argv, image size) for a tiny model of ``kind``."""
    if kind == "pipeline":
        from diffusers import DDPMPipeline

        DDPMPipeline(unet=tiny_unet(), scheduler=scheduler("ddpm")).save_pretrained(tmp_path / "pipe")
        return ["--pipeline", str(tmp_path / "pipe")], 8
    from srdiff.trainer import SelfRefiningTrainer
    from srdiff_testing import tiny_config

    extra = dict(attention_levels=(False, False), image_size=8)
    if kind == "latent":
        tiny_vae().save_pretrained(tmp_path / "vae")
        extra = dict(mode="latent", vae=str(tmp_path / "vae"), image_size=16)
    config = tiny_config(tmp_path, **{"mode": "baseline", "steps": 2, "checkpoint_every": 2, **extra})
    SelfRefiningTrainer(config).train()
    return ["--ckpt", str(tmp_path / "run" / "checkpoints" / "last.pt")], config.image_size


@pytest.mark.parametrize("kind", ["pixel", "pipeline", pytest.param("latent", marks=pytest.mark.slow)])
def test_cli_end_to_end(tmp_path, kind):
    from srdiff import cli

    source, size = _source(kind, tmp_path)
    hl_path = tmp_path / "hl.pt"
    tiny_highlighter().save(hl_path)
    torch.save(images(3, size=size), tmp_path / "images.pt")
    out = tmp_path / "repair"
    argv = ["repair", *source, "--highlighter", str(hl_path), "--images", str(tmp_path / "images.pt"),
            "--out", str(out), "--steps", "4", "--flag-threshold", "0", "--no-progress"]
    assert cli.main(argv) == 0
    for name in ("before.png", "after.png", "masks.png", "contact-sheet.png", "report.json", "repaired.pt",
                 "masks.pt"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["images"] == 3 and report["summary"]["max_abs_change_outside_mask"] == 0.0
    assert report["settings"]["latent"] is (kind == "latent")
    repaired, masks = torch.load(out / "repaired.pt"), torch.load(out / "masks.pt")
    outside = masks == 0
    assert outside.any()
    assert torch.equal(repaired[outside], images(3, size=size)[outside])
    assert not torch.equal(repaired, images(3, size=size))
    assert cli.main(argv) == cli.EXIT_USER_ERROR  # refuses to overwrite
    assert cli.main(argv + ["--overwrite"]) == 0
