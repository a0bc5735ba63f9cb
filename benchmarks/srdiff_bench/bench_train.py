"""Self-refining training cost: one optimiser step in the base phase vs the refinement phase (forward,
reverse, combined), against the plain diffusers step a user would otherwise write, and the mFAM
refresh (EMA samples + FAMs, optionally a highlighter fine-tune), amortised over the cycle.

The diffusers peer is the same UNet, batch, optimiser, clipping and EMA with diffusers' own
``AttnProcessor2_0``, ``DDPMScheduler.add_noise`` and ``F.mse_loss``: what differs from
``base-baseline`` (srdiff, lambda = 0) and ``refine-combined`` is exactly the attention processor and the
noising + loss, the parts srdiff replaces.

Targets (issue 7): refinement step <= 1.10x base step; refresh <= 10% of a cycle's time at the
default settings (cycle 100). The trainer's UNet is diffusers', so every case is reported
unavailable where diffusers is not installed (the GPU image has no wheel; gpu.sh --prepare carries
one). Models: the demo's 16 px UNet (1.2 M parameters, batch 64) on CPU, a
64 px UNet (attention at 16x16 and 8x8, as the authors place it) on GPU.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from srdiff_bench.common import DEVICE, QUICK, measure, on_device, require_module
from srdiff.trainer import SelfRefiningTrainer, TrainConfig

DEMO = dict(image_size=16, block_out_channels=(32, 64, 64), attention_levels=(False, True, True), batch_size=64)
GPU_64PX = dict(image_size=64, block_out_channels=(64, 128, 128, 256), attention_levels=(False, False, True, True),
                attention_head_dim=32, norm_num_groups=32, batch_size=64)
MODELS = on_device(gpu=[pytest.param(GPU_64PX, id="64px"), pytest.param(DEMO, id="16px-demo")],
                   cpu=[pytest.param(DEMO, id="16px-demo")])
PHASES = [("base", "baseline"), ("refine", "forward"), ("refine", "reverse"), ("refine", "combined")]
if QUICK:
    PHASES = [PHASES[0], PHASES[-1]]


def _trainer(model: dict, mode: str, tmp_path, **kw) -> SelfRefiningTrainer:
    cfg = TrainConfig(**model, mode=mode, steps=200, ratio="1:1", device=DEVICE, progress=False,
                      out_dir=str(tmp_path), **kw)
    return SelfRefiningTrainer(cfg)


def _shape(model: dict) -> dict:
    return {"B": model["batch_size"], "HW": model["image_size"], "channels": list(model["block_out_channels"])}


@pytest.mark.benchmark(group="train_step")
@pytest.mark.parametrize("phase, mode", PHASES, ids=[f"{p}-{m}" for p, m in PHASES])
@pytest.mark.parametrize("model", MODELS)
def test_train_step(benchmark, tmp_path, model, phase, mode):
    require_module("diffusers", op="train_step", provider=f"{phase}-{mode}", mode="fwd+bwd",
                   shape=_shape(model))
    trainer = _trainer(model, mode, tmp_path)
    size = model["image_size"]
    if phase == "refine":
        trainer.refiner.mfam = torch.rand(size, size, generator=torch.Generator().manual_seed(0)).to(trainer.device)
    step = trainer.config.base_steps if phase == "refine" else 0

    def one_step():
        trainer.step = step  # the same keyed batch every round
        trainer.train_step()

    measure(benchmark, one_step, op="train_step", provider=f"{phase}-{mode}", mode="fwd+bwd", shape=_shape(model),
            dtype=trainer.autocast_dtype or torch.float32, memory=DEVICE == "cuda")


@pytest.mark.benchmark(group="train_step")
@pytest.mark.parametrize("model", MODELS)
def test_train_step_diffusers(benchmark, tmp_path, model):
    require_module("diffusers", op="train_step", provider="diffusers", mode="fwd+bwd", shape=_shape(model))
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    trainer = _trainer(model, "baseline", tmp_path)
    c, unet = trainer.config, trainer.denoiser
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())
    scheduler = DDPMScheduler(num_train_timesteps=c.num_train_timesteps)
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(len(trainer.train_data), (c.batch_size,), generator=generator)
    x0 = trainer.train_data[indices].to(trainer.device)
    timesteps = torch.randint(c.num_train_timesteps, (c.batch_size,), generator=generator).to(trainer.device)
    autocast = (torch.autocast(trainer.device.type, dtype=trainer.autocast_dtype) if trainer.autocast_dtype
                else contextlib.nullcontext())

    def one_step():
        unet.train()
        trainer.optimizer.zero_grad(set_to_none=True)
        noise = torch.randn_like(x0)
        x_t = scheduler.add_noise(x0, noise, timesteps)
        with autocast:
            pred = unet(x_t, timesteps).sample
        F.mse_loss(pred.float(), noise).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), c.grad_clip)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.ema.update(unet)

    measure(benchmark, one_step, op="train_step", provider="diffusers", mode="fwd+bwd", shape=_shape(model),
            dtype=trainer.autocast_dtype or torch.float32, memory=DEVICE == "cuda")


@pytest.mark.benchmark(group="mfam_refresh")
@pytest.mark.parametrize("finetune_steps", [0, 10], ids=["no-finetune", "finetune10"])
@pytest.mark.parametrize("model", MODELS)
def test_mfam_refresh(benchmark, tmp_path, model, finetune_steps):
    """One refresh at the defaults (64 samples, 20 DDIM steps); ``amortised_ms_per_step`` = refresh / cycle."""
    from srdiff.highlighter import FlawHighlighter

    require_module("diffusers", op="mfam_refresh", provider=f"refresh-{finetune_steps}ft", mode="fwd",
                   shape=_shape(model))
    trainer = _trainer(model, "combined", tmp_path, highlighter_finetune_steps=finetune_steps)
    cfg = trainer.config
    trainer.refiner.highlighter = FlawHighlighter(backbone="small", in_channels=cfg.channels,
                                                     image_size=cfg.image_size).to(trainer.device)

    def refresh():
        trainer.step = cfg.base_steps + cfg.cycle  # a later cycle: fine-tunes when asked to
        trainer.refresh_mfam()

    measure(benchmark, refresh, op="mfam_refresh", provider=f"refresh-{finetune_steps}ft", mode="fwd",
            shape={**_shape(model), "samples": cfg.mfam_samples, "ddim_steps": cfg.mfam_sampler_steps},
            dtype=trainer.autocast_dtype or torch.float32, rounds=3 if DEVICE == "cpu" else 5, memory=False)
    benchmark.extra_info["cycle"] = cfg.cycle
    benchmark.extra_info["amortised_ms_per_step"] = benchmark.extra_info["median_ms"] / cfg.cycle
