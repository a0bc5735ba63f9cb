"""Self-refining training cost: one optimiser step in the base phase vs the refinement phase (forward,
reverse, combined), and the mFAM refresh (EMA samples + FAMs, optionally a highlighter fine-tune),
amortised over the cycle.

Targets (issue 7): refinement step <= 1.10x base step; refresh <= 10% of a cycle's time at the
default settings (cycle 100). Models: the demo's 16 px UNet (1.2 M parameters, batch 64) on CPU, a
64 px UNet (attention at 16x16 and 8x8, as the authors place it) on GPU.
"""

import pytest
import torch

from benchmarks.common import DEVICE, QUICK, measure, on_device
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
    trainer = _trainer(model, mode, tmp_path)
    size = model["image_size"]
    if phase == "refine":
        trainer.mfam = torch.rand(size, size, generator=torch.Generator().manual_seed(0)).to(trainer.device)
    step = trainer.config.base_steps if phase == "refine" else 0

    def one_step():
        trainer.step = step  # the same keyed batch every round
        trainer.train_step()

    measure(benchmark, one_step, op="train_step", provider=f"{phase}-{mode}", mode="fwd+bwd", shape=_shape(model),
            dtype=trainer.autocast_dtype or torch.float32, memory=False)


@pytest.mark.benchmark(group="mfam_refresh")
@pytest.mark.parametrize("finetune_steps", [0, 10], ids=["no-finetune", "finetune10"])
@pytest.mark.parametrize("model", MODELS)
def test_mfam_refresh(benchmark, tmp_path, model, finetune_steps):
    """One refresh at the defaults (64 samples, 20 DDIM steps); ``amortised_ms_per_step`` = refresh / cycle."""
    from srdiff.highlighter import FlawHighlighter

    trainer = _trainer(model, "combined", tmp_path, highlighter_finetune_steps=finetune_steps)
    cfg = trainer.config
    trainer.highlighter = FlawHighlighter(backbone="small", in_channels=cfg.channels,
                                          image_size=cfg.image_size).to(trainer.device)

    def refresh():
        trainer.step = cfg.base_steps + cfg.cycle  # a later cycle: fine-tunes when asked to
        trainer.refresh_mfam()

    measure(benchmark, refresh, op="mfam_refresh", provider=f"refresh-{finetune_steps}ft", mode="fwd",
            shape={**_shape(model), "samples": cfg.mfam_samples, "ddim_steps": cfg.mfam_sampler_steps},
            dtype=trainer.autocast_dtype or torch.float32, rounds=3 if DEVICE == "cpu" else 5, memory=False)
    benchmark.extra_info["cycle"] = cfg.cycle
    benchmark.extra_info["amortised_ms_per_step"] = benchmark.extra_info["median_ms"] / cfg.cycle
