"""Inpainting both ways: the mask-conditioned task (2C+1 channels, seeded thick masks, hole loss, forward
amplification on the noised channels only, mFAM over the holes, export, load, resume) and RePaint at
strength 1 with an unconditional model (known pixels kept, an oracle denoiser fills the hole with the
truth), and ``srdiff inpaint``."""

import subprocess
import sys

import pytest
import torch
from srdiff_testing import tiny_config

import srdiff
from srdiff.diffusion.masks import box_mask, check_masks, random_masks
from srdiff.diffusion.repaint import repaint_images
from srdiff.diffusion.schedules import make_scheduler
from srdiff.trainer import SelfRefiningTrainer, TrainConfig
from srdiff.trainer.trained import load_trained

INPAINT = dict(task="inpaint", mask_kind="mixed")


def test_masks_are_seeded_thick_and_binary():
    a = random_masks(16, 16, seed=3, kind="mixed")
    torch.testing.assert_close(random_masks(16, 16, seed=3, kind="mixed"), a, rtol=0, atol=0)
    assert not torch.equal(random_masks(16, 16, seed=4, kind="mixed"), a)
    assert a.shape == (16, 1, 16, 16) and set(a.unique().tolist()) <= {0.0, 1.0}
    for kind in ("strokes", "boxes"):
        cover = random_masks(32, 16, seed=0, kind=kind).mean((1, 2, 3))
        assert (cover > 0).all() and cover.mean() < 0.7, kind
    box = box_mask(20, torch.Generator().manual_seed(0))
    rows, cols = box.any(1), box.any(0)
    assert rows.sum() >= 4 and cols.sum() >= 4  # sides of at least 20 % of the image
    with pytest.raises(ValueError, match="mask_kind must be one of"):
        random_masks(1, 8, seed=0, kind="blobs")
    with pytest.raises(ValueError, match=r"masks must be 8x8 like the images, got 16x16"):
        check_masks(torch.ones(1, 1, 16, 16), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="mask_kind must be one of"):
        TrainConfig(mask_kind="blobs")


def test_forward_amplification_never_touches_the_mask_channels(tmp_path):
    """With an mFAM and a large lam_f, the mask and masked-image channels the denoiser reads are the same
    as without; only the noised channels change."""
    trainer = SelfRefiningTrainer(tiny_config(tmp_path, **INPAINT, steps=2, ratio="1:1", mode="forward", lam_f=0.5))
    assert trainer.denoiser.config.in_channels == 3
    seen = []
    trainer.denoiser.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    indices, t = torch.arange(8), torch.full((8,), 50)
    trainer._micro_loss(1, 0, indices, t)
    trainer.refiner.mfam = torch.rand(8, 8)
    trainer._micro_loss(1, 0, indices, t)
    plain, amplified = seen
    batch = trainer.task.batch(indices, step=1, micro=0)
    torch.testing.assert_close(amplified[:, 1:], plain[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(plain[:, 1:2], batch.extras["mask"], rtol=0, atol=0)
    torch.testing.assert_close(plain[:, 2:], batch.extras["masked"], rtol=0, atol=0)
    assert (batch.extras["masked"][batch.extras["mask"].bool()] == 0).all()
    assert not torch.allclose(amplified[:, :1], plain[:, :1])


def test_hole_loss_is_the_mean_over_the_hole(tmp_path):
    trainer = SelfRefiningTrainer(tiny_config(tmp_path, **INPAINT, loss_region="hole", steps=1))
    task = trainer.task
    batch = task.batch(torch.arange(4), step=0, micro=0)
    t, ac = torch.full((4,), 30), trainer.alphas_cumprod
    pred = torch.randn(4, 1, 8, 8, requires_grad=True)
    loss = task.loss(pred, batch, t, ac, None, 0.0, seed=11)
    _, target = srdiff.amplified_add_noise(batch.x0, t, ac, seed=11)
    hole = batch.extras["mask"]
    torch.testing.assert_close(loss, ((pred - target) ** 2 * hole).sum() / hole.sum(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert (pred.grad[hole == 0] == 0).all() and (pred.grad[hole == 1] != 0).any()


def test_inpaint_task_end_to_end(tmp_path):
    """Train through refreshes (mFAM weighted by the holes), inpaint keeping the known pixels, export,
    load back, resume."""
    from diffusers import UNet2DModel

    cfg = tiny_config(tmp_path, **INPAINT, steps=4, ratio="1:1", cycle=2, checkpoint_every=2)
    trainer = SelfRefiningTrainer(cfg)
    images, weights = trainer._refresh_samples(4, seed=1, first_index=0)
    drawn, masks = trainer.task.draw(torch.arange(4), seed=1)
    torch.testing.assert_close(weights, masks[:, 0], rtol=0, atol=0)
    keep = masks == 0
    torch.testing.assert_close(images[keep], drawn[keep], rtol=0, atol=0)
    summary = trainer.train()
    assert trainer.mfam is not None and trainer.mfam.shape == (8, 8)

    trained = load_trained(summary["checkpoint"])
    with pytest.raises(ValueError, match="images= and masks= are needed"):
        trained.sample(2, seed=0, steps=2)
    filled = trained.sample(2, seed=0, steps=2, images=drawn[:2], masks=masks[:2])
    torch.testing.assert_close(filled[keep[:2]], drawn[:2][keep[:2]], rtol=0, atol=0)
    out = trained.export(tmp_path / "export")
    unet = UNet2DModel.from_pretrained(out / "unet")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 5).sample, trained.model(x, 5).sample, rtol=0, atol=0)
    resumed = SelfRefiningTrainer(cfg)
    assert resumed.resume() and resumed.step == 4 and resumed.mfam is not None
    from srdiff.cli import main

    assert main(["eval", "--ckpt", summary["checkpoint"], "--n", "4", "--steps", "2", "--features", "local",
                 "--out", str(tmp_path / "eval.json")]) == 0, "srdiff eval fills the run's own images"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_repaint_keeps_the_known_pixels_and_an_oracle_fills_the_hole(prediction_type):
    """With the exact prediction of a one-image data set (x_t = √ā x* + √(1-ā) ε), RePaint at strength 1
    (what ``srdiff inpaint`` runs with an unconditional model) must return x* in the hole."""
    cfg = TrainConfig(num_train_timesteps=100, image_size=8, prediction_type=prediction_type)
    scheduler = make_scheduler(cfg, "ddpm")
    ac = scheduler.alphas_cumprod
    truth = torch.rand(2, 1, 8, 8)
    target = truth * 2 - 1

    def oracle(rows, images, masks):
        def predict(x, t):
            a = ac[int(t)]
            eps = (x - a.sqrt() * target[rows]) / (1 - a).sqrt()
            return eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * target[rows]

        return predict

    masks = random_masks(2, 8, seed=0, kind="boxes")
    known = truth * (1 - masks)  # the hole's content is not given
    kwargs = dict(strength=1.0, steps=10, jump=2, resample=2, seed=0)
    out = repaint_images(known, masks, oracle, scheduler, **kwargs)
    torch.testing.assert_close(out[masks == 0], known[masks == 0], rtol=0, atol=0)
    torch.testing.assert_close(out, truth, rtol=0, atol=1e-5)
    again = repaint_images(known, masks, oracle, scheduler, **kwargs, batch_size=1)
    torch.testing.assert_close(again, out, rtol=0, atol=0)  # each image's noise is its own
    with pytest.raises(ValueError, match="jump must be an int >= 1"):
        repaint_images(known, masks, oracle, scheduler, **{**kwargs, "jump": 0})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "srdiff", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_srdiff_inpaint_both_routes(tmp_path):
    """``srdiff inpaint``: RePaint with an unconditional checkpoint, the task's sampler with an inpaint one."""
    uncond = SelfRefiningTrainer(tiny_config(tmp_path, "uncond", steps=1, mode="baseline")).train()
    conditioned = SelfRefiningTrainer(tiny_config(tmp_path, "inpaint", **INPAINT, steps=1, mode="baseline")).train()
    images = torch.rand(3, 1, 8, 8)
    masks = random_masks(3, 8, seed=2)
    torch.save(images, tmp_path / "images.pt")
    torch.save(masks, tmp_path / "masks.pt")
    torch.save(torch.ones(3, 1, 16, 16), tmp_path / "big.pt")
    for name, summary in (("repaint", uncond), ("task", conditioned)):
        out = tmp_path / f"{name}.pt"
        run = _cli("inpaint", "--ckpt", summary["checkpoint"], "--images", str(tmp_path / "images.pt"), "--masks",
                   str(tmp_path / "masks.pt"), "--out", str(tmp_path / f"{name}.png"), "--tensor-out", str(out),
                   "--steps", "4", "--jump-length", "2", "--resamplings", "2")
        assert run.returncode == 0, run.stdout + run.stderr
        filled = torch.load(out)
        keep = masks.expand_as(filled) == 0
        torch.testing.assert_close(filled[keep], images[keep], rtol=0, atol=1e-6)
    bad = _cli("inpaint", "--ckpt", uncond["checkpoint"], "--images", str(tmp_path / "images.pt"), "--masks",
               str(tmp_path / "big.pt"), "--out", str(tmp_path / "bad.png"))
    assert bad.returncode != 0 and "--masks must be 8x8" in bad.stderr, bad.stderr


def test_latent_inpainting_with_the_condition_unet(tmp_path):
    """VAE latents: 2 * 4 + 1 input channels, the mask on the latent grid, the masked image's latents."""
    import torch.nn.functional as F
    from test_task_text import tiny_vae

    cfg = tiny_config(tmp_path, **INPAINT, backbone="unet-cond", vae=tiny_vae(tmp_path / "vae"), mode="baseline",
                      loss_region="hole", steps=1)
    summary = SelfRefiningTrainer(cfg).train()
    trained = load_trained(summary["checkpoint"])
    assert trained.model.config.in_channels == 9
    images, masks = torch.rand(2, 1, 8, 8), random_masks(2, 8, seed=1)
    extras = trained.task.conditioning(images, masks)
    torch.testing.assert_close(extras["mask"], F.interpolate(masks, size=(4, 4), mode="nearest"), rtol=0, atol=0)
    latents = trained.vae.encode((images * 2 - 1) * (1 - masks)).latent_dist.mode() * trained.vae.config.scaling_factor
    torch.testing.assert_close(extras["masked"], latents, rtol=0, atol=0)
    filled = trained.sample(2, seed=0, steps=2, images=images, masks=masks)
    torch.testing.assert_close(filled[masks.bool() == 0], images[masks.bool() == 0], rtol=0, atol=0)
    assert (trained.export(tmp_path / "export") / "vae" / "config.json").is_file()
