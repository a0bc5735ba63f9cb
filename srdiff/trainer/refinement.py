"""The refinement cycle: a flaw highlighter trained on real vs generated images and the mFAM it gives,
refreshed every ``config.cycle`` refinement steps from fresh samples of the EMA model.

The cycle does not know how samples are made: it receives the task's refresh sampler
(``refresh_samples(n, seed=, first_index=) -> (images, weights or None)``) and draws its share on every
rank; the mFAM is the all-reduced mean of the per-image FAMs, the same (H, W) map on every rank.
"""

import time
from pathlib import Path

import torch
from torch import nn

from srdiff import viz
from srdiff.trainer import distributed
from srdiff.diffusion.seeding import HL_FIT, HL_SAMPLES, MFAM, key


class RefinementCycle:
    """Owns the highlighter and the current mFAM of a run.

    ``real_images``: (N, C, H, W) training images in [0, 1] (the highlighter's "real" class);
    ``out_dir``: where ``figures/cycle_NNN_{samples,fam,mfam}.png`` go (rank 0).
    """

    def __init__(self, config, device: torch.device, dist, real_images: torch.Tensor, out_dir: Path,
                 refresh_samples):
        self.config = config
        self.device = device
        self.dist = dist
        self.real_images = real_images
        self.out_dir = Path(out_dir)
        self.refresh_samples = refresh_samples
        self.highlighter: nn.Module | None = None
        self.mfam: torch.Tensor | None = None

    def due(self, step: int) -> bool:
        """Whether a refresh runs before optimiser step ``step`` (0-based)."""
        c = self.config
        return step >= c.base_steps and c.needs_mfam and (step - c.base_steps) % c.cycle == 0

    def _sharded(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's share of ``n`` samples (image i's noise depends on i only, not on the rank)."""
        share = n // self.dist.world_size
        return self.refresh_samples(share, seed=seed, first_index=self.dist.rank * share)

    def _real_subset(self, n: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, len(self.real_images), (n,), generator=gen)
        return self.real_images[idx]

    def _fit(self, fake_local: torch.Tensor, seed: int, **fit_kwargs) -> list[dict]:
        """Fit on rank 0 (real vs all ranks' samples), then copy rank 0's weights everywhere."""
        fake = distributed.all_gather_cat(fake_local, self.dist)
        history = []
        if self.dist.is_main:
            real = self._real_subset(len(fake), key(HL_FIT, seed, 1)).to(self.device)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                history = self.highlighter.fit(real, fake, seed=seed, progress=False, **fit_kwargs)
        distributed.broadcast_module(self.highlighter, self.dist)
        return history

    def _pretrain(self) -> dict:
        from srdiff.highlighter import FlawHighlighter

        c = self.config
        if c.highlighter is not None:
            self.highlighter = FlawHighlighter.load(c.highlighter, map_location=self.device)
            return {"highlighter": "loaded", "path": c.highlighter}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key(HL_FIT, c.seed))
            layers = None if c.highlighter_layer is None else [c.highlighter_layer]
            self.highlighter = FlawHighlighter(backbone=c.highlighter_backbone, in_channels=c.channels,
                                               image_size=c.image_size, target_layers=layers).to(self.device)
        fake, _ = self._sharded(c.highlighter_samples, key(HL_SAMPLES, c.seed))
        history = self._fit(fake, key(HL_FIT, c.seed, 0), epochs=c.highlighter_epochs)
        best = max(history, key=lambda h: h["balanced_accuracy"]) if history else {}
        return {"highlighter": "trained", "epochs": len(history),
                "val_balanced_accuracy": best.get("balanced_accuracy"), "val_roc_auc": best.get("roc_auc")}

    def refresh(self, step: int) -> dict:
        """Draw samples on all ranks, optionally fine-tune the highlighter on them, set the new mFAM;
        returns the refresh's metrics record."""
        c = self.config
        cycle_index = (step - c.base_steps) // c.cycle
        start = time.perf_counter()
        event = {"event": "refresh", "step": step, "cycle": cycle_index}
        if self.highlighter is None:
            event.update(self._pretrain())
        samples, weights = self._sharded(c.mfam_samples, key(MFAM, c.seed, cycle_index))
        event["highlighter_balanced_accuracy"] = self._balanced_accuracy(samples, key(HL_FIT, c.seed, cycle_index, 2))
        if c.highlighter_finetune_steps > 0 and (cycle_index > 0 or c.highlighter is not None):
            history = self._fit(samples, key(HL_FIT, c.seed, cycle_index + 1), steps=c.highlighter_finetune_steps)
            if history:
                event["finetune_accuracy"] = history[-1]["accuracy"]
        fams = self.highlighter.fam(samples)
        self.mfam = self._mean_map(fams, weights)
        empty = distributed.all_reduce_sum((fams.flatten(1).amax(1) == 0).sum().float(), self.dist)
        event.update(seconds=time.perf_counter() - start, mfam_mean=float(self.mfam.mean()),
                     mfam_max=float(self.mfam.max()), mfam_std=float(self.mfam.std()),
                     empty_fam_fraction=float(empty) / c.mfam_samples)
        if self.dist.is_main:
            self._save_figures(cycle_index, samples, fams)
        return event

    def _balanced_accuracy(self, fake_local: torch.Tensor, seed: int) -> float:
        """The highlighter's balanced accuracy on this refresh's samples (all ranks', before any fine-tune on
        them) against as many real training images: a highlighter at chance gives empty maps."""
        from srdiff.highlighter.training import evaluate

        fake = distributed.all_gather_cat(fake_local, self.dist)
        real = self._real_subset(len(fake), seed).to(fake.device)
        labels = torch.cat([torch.zeros(len(real), dtype=torch.long), torch.ones(len(fake), dtype=torch.long)])
        return evaluate(self.highlighter, torch.cat([real, fake]), labels)["balanced_accuracy"]

    def _mean_map(self, fams: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The mFAM over all ranks: the plain mean, or with per-image weights (B, H, W) the weighted
        mean per pixel (0 where no image has weight)."""
        if weights is None:
            total = distributed.all_reduce_sum(fams.sum(0), self.dist)
            return (total / self.config.mfam_samples).detach()
        weights = weights.to(fams)
        total = distributed.all_reduce_sum((fams * weights).sum(0), self.dist)
        mass = distributed.all_reduce_sum(weights.sum(0), self.dist)
        return torch.where(mass > 0, total / mass.clamp_min(1e-12), torch.zeros_like(total)).detach()

    def _save_figures(self, cycle_index: int, samples: torch.Tensor, fams: torch.Tensor) -> None:
        fig = self.out_dir / "figures"
        viz.save_grid(samples[:64], fig / f"cycle_{cycle_index:03d}_samples.png", upscale=4)
        k = min(16, len(samples))
        viz.save_grid(viz.overlay(samples[:k], fams[:k]), fig / f"cycle_{cycle_index:03d}_fam.png", nrow=8, upscale=4)
        viz.save_png(viz.colormap(self.mfam), fig / f"cycle_{cycle_index:03d}_mfam.png", upscale=8)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        hl = None
        if self.highlighter is not None:
            hl = {"config": self.highlighter.config, "state": self.highlighter.state_dict()}
        return {"mfam": self.mfam.cpu() if self.mfam is not None else None, "highlighter": hl}

    def load_state_dict(self, state: dict) -> None:
        self.mfam = state["mfam"].to(self.device) if state["mfam"] is not None else None
        self.highlighter = None
        if state["highlighter"] is not None:
            from srdiff.highlighter import FlawHighlighter

            self.highlighter = FlawHighlighter.from_config(state["highlighter"]["config"]).to(self.device)
            self.highlighter.load_state_dict(state["highlighter"]["state"])
