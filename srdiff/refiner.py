"""Self-refinement in any training loop: the refinement cycle of self-refining diffusion (arXiv 2512.08774)
as one object, for diffusers' example scripts, 🤗 Accelerate, torchrun, FSDP or a loop of your own.

The method has three parts. Two are one call each in a training step (:func:`srdiff.amplified_add_noise`
/ :func:`srdiff.amplified_noise_loss` with the mFAM, and the model's forward inside
:func:`srdiff.fam_context` after :func:`srdiff.set_fam_attn_processor`); the third is the cycle that makes
the mFAM, which :class:`Refiner` is:

* a **base phase** of ``base_steps`` steps without a map;
* at the first refinement step, a flaw highlighter (a real-vs-generated classifier) is trained on fresh
  samples of the model (:class:`HighlighterRecipe`) or a given one is taken;
* every ``cycle`` refinement steps the mFAM is **refreshed**: ``mfam_samples`` fresh samples, the
  highlighter fine-tuned on them (``finetune_steps``), and the mean of their Grad-CAM flaw maps, one (H, W)
  map in [0, 1] for every training image until the next refresh.

Under ``torch.distributed`` every rank draws its share of the samples; the highlighter is fitted on rank 0
(real images vs all ranks' samples) and broadcast; the mFAM is the all-reduced mean, the same bytes on
every rank. Every draw is keyed by (``seed``, refresh, image index) (:mod:`srdiff.diffusion.seeding`), so
when the sampler keys image i by (seed, i) the map does not depend on how many ranks drew it.

An mFAM that is empty or constant switches the method off without a sound: refinement then trains the
base phase's loss. The refresh warns (the message is also the record's ``"warning"``), naming the refresh
and the highlighter's balanced accuracy on that refresh's samples; with ``require_fam=True`` it raises
:class:`EmptyMapError` instead.
"""

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from srdiff import viz
from srdiff._checks import check_int, check_tensor
from srdiff._collectives import all_gather_cat, all_reduce_sum, broadcast_module, rank_and_world
from srdiff.diffusion.seeding import HL_FIT, HL_SAMPLES, MFAM, key
from srdiff.highlighter.model import FlawHighlighter
from srdiff.highlighter.training import evaluate

__all__ = ["EMPTY_MAP_STD", "EmptyMapError", "HighlighterRecipe", "Refiner"]

#: an mFAM whose standard deviation over pixels is below this is constant: it modulates every pixel alike
EMPTY_MAP_STD = 1e-3

#: ``sampler(n, seed=, first_index=)`` -> images (n, C, H, W) in [0, 1], or (images, weights (n, H, W))
Sampler = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]]


class EmptyMapError(RuntimeError):
    """A refresh gave an empty or constant mFAM and the refiner was told to stop (``require_fam=True``);
    ``record`` is the refresh's record (its ``"warning"`` says what happened)."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


@dataclass(frozen=True)
class HighlighterRecipe:
    """A flaw highlighter to train at the first refresh: a :class:`srdiff.FlawHighlighter` of ``backbone``
    at the real images' size and channels, fitted for ``epochs`` on ``samples`` fresh samples against as
    many real images (:meth:`srdiff.FlawHighlighter.fit`: balanced batches, best balanced accuracy kept); its
    Grad-CAM layer is ``layer`` (a ``net.get_submodule`` path; None: the backbone's default, its last stage)."""

    backbone: str = "small"
    epochs: int = 10
    samples: int = 256
    layer: str | None = None

    def __post_init__(self):
        if not isinstance(self.backbone, str):
            raise TypeError(f"backbone must be a str naming a FlawHighlighter backbone, got {type(self.backbone).__name__}")
        if self.layer is not None and not isinstance(self.layer, str):
            raise TypeError(f"layer must be None or a str naming a highlighter layer, got {type(self.layer).__name__}")
        check_int("epochs", self.epochs, 1)
        check_int("samples", self.samples, 2)


class Refiner:
    """The refinement cycle: when to refresh the mFAM, the highlighter behind it, and the current map.

    Args:
        highlighter: a :class:`HighlighterRecipe` (trained at the first refresh), a
            :class:`srdiff.FlawHighlighter` (used as given and fine-tuned in place from the first refresh on)
            or the path of a saved one (:meth:`srdiff.FlawHighlighter.save`).
        real_images: (N, C, H, W) floating training images in [0, 1], N >= 2: the highlighter's "real"
            class. Samples must have the same (C, H, W).
        sampler: ``sampler(n, seed=seed, first_index=first)`` -> (n, C, H, W) images in [0, 1] of the model
            being trained (its EMA, usually), or ``(images, weights)`` with weights (n, H, W) >= 0 saying where
            each image's map counts (the mFAM is then their weighted mean per pixel). Image i of the call must
            be drawn from (seed, first + i) alone (:func:`srdiff.diffusion.seeding.image_generators` gives a
            diffusers pipeline one generator per image), so that ranks draw different images and N ranks draw
            the images one process would.
        base_steps: steps without a map; the first refresh runs before step ``base_steps`` (0-based).
        cycle: refinement steps between refreshes (the paper: 100), >= 1.
        mfam_samples: samples per refresh, over all ranks (a multiple of the world size).
        finetune_steps: highlighter fine-tune steps on each refresh's samples (not on the first refresh of a
            highlighter trained from a recipe, which has just seen fresh samples); 0 keeps it fixed.
        seed: keys every draw: samples, highlighter initialisation, fits, real subsets.
        require_fam: raise :class:`EmptyMapError` on an empty or constant map instead of warning.
        figures: a folder for ``cycle_NNN_{samples,fam,mfam}.png`` per refresh (rank 0), or None.
        group: the ``torch.distributed`` process group (None: the default group, if any).
        device: where the highlighter runs (default: the real images' device).

    Example (a diffusers loop; ``ema_unet`` the EMA model, ``ddim`` a DDIMScheduler)::

        def sample(n, seed, first_index):
            pipe = DDIMPipeline(unet=ema_unet, scheduler=ddim)
            generators = image_generators(seed, first_index, n)
            return torch.from_numpy(pipe(n, generator=generators, num_inference_steps=20,
                                         output_type="np").images).permute(0, 3, 1, 2)

        refiner = srdiff.Refiner(srdiff.HighlighterRecipe(), real_images, sample, base_steps=500, cycle=100)
        for step in range(1000):
            mfam = refiner.step(step)          # None in the base phase
            ...                                 # noise, loss and fam_context(mfam) as in the README
    """

    def __init__(self, highlighter: "HighlighterRecipe | FlawHighlighter | str | os.PathLike", real_images: torch.Tensor,
                 sampler: Sampler, *, base_steps: int, cycle: int, mfam_samples: int = 64, finetune_steps: int = 0,
                 seed: int = 0, require_fam: bool = False, figures: str | os.PathLike | None = None, group=None,
                 device: torch.device | str | None = None):
        self.path = None
        if isinstance(highlighter, (str, os.PathLike)):
            self.path = str(highlighter)
            highlighter = FlawHighlighter.load(highlighter, map_location=device or real_images.device)
        if not isinstance(highlighter, (HighlighterRecipe, FlawHighlighter)):
            raise TypeError(f"highlighter must be a HighlighterRecipe, a FlawHighlighter or the path of a saved one, "
                            f"got {type(highlighter).__name__}")
        check_tensor("real_images", real_images, ndim=4, floating=True)
        if len(real_images) < 2:
            raise ValueError(f"real_images must hold at least 2 images, got shape {tuple(real_images.shape)}")
        if not callable(sampler):
            raise TypeError(f"sampler must be callable as sampler(n, seed=, first_index=), got {type(sampler).__name__}")
        check_int("base_steps", base_steps, 0)
        check_int("cycle", cycle, 1)
        check_int("mfam_samples", mfam_samples, 1)
        check_int("finetune_steps", finetune_steps, 0)
        check_int("seed", seed, 0)
        if not isinstance(require_fam, bool):
            raise TypeError(f"require_fam must be a bool, got {require_fam!r}")
        self.recipe = highlighter if isinstance(highlighter, HighlighterRecipe) else None
        self.given = highlighter if isinstance(highlighter, FlawHighlighter) else None
        self.real_images = real_images
        self.sampler = sampler
        self.base_steps, self.cycle, self.mfam_samples = base_steps, cycle, mfam_samples
        self.finetune_steps, self.seed, self.require_fam = finetune_steps, seed, require_fam
        self.figures = None if figures is None else Path(figures)
        self.group = group
        self.device = torch.device(device) if device is not None else real_images.device
        #: the highlighter in use (None until the first refresh)
        self.highlighter: FlawHighlighter | None = None
        #: the current mFAM (H, W) in [0, 1] (None until the first refresh)
        self.mfam: torch.Tensor | None = None
        #: the record of the last refresh (None before the first)
        self.last_record: dict | None = None
        self._check_shares()

    # ------------------------------------------------------------------ the schedule
    def due(self, step: int) -> bool:
        """Whether a refresh runs before step ``step`` (0-based): every ``cycle`` steps from ``base_steps`` on,
        and at any refinement step while there is no map (a loop resumed without :meth:`load_state_dict`);
        never twice for one step."""
        if step < self.base_steps or (self.last_record is not None and self.last_record["step"] == step):
            return False
        return self.mfam is None or (step - self.base_steps) % self.cycle == 0

    def step(self, step: int) -> torch.Tensor | None:
        """The mFAM to train optimiser step ``step`` (0-based) with, refreshed first when :meth:`due`; None in
        the base phase. Call it on every rank at every step, or at every micro-batch (a step's later calls
        return its map): a refresh is a collective."""
        if self.due(step):
            self.refresh(step)
        return self.mfam if step >= self.base_steps else None

    # ------------------------------------------------------------------ a refresh
    def refresh(self, step: int) -> dict:
        """Draw samples on every rank, fine-tune the highlighter on them, set the new mFAM; returns the
        refresh's record (also :attr:`last_record`): ``step``, ``cycle``, the highlighter's start (first
        refresh), ``highlighter_balanced_accuracy`` (on these samples vs as many real images, before the
        fine-tune: 0.5 is chance), ``finetune_accuracy``, ``mfam_mean``, ``mfam_max``, ``mfam_std``,
        ``empty_fam_fraction`` (images whose FAM is all zero), ``seconds`` and, for an empty or constant map,
        ``warning``."""
        cycle_index = (step - self.base_steps) // self.cycle
        start = time.perf_counter()
        record = {"event": "refresh", "step": step, "cycle": cycle_index}
        first = self.highlighter is None
        if first:
            record.update(self._start())
        samples, weights = self._sharded(self.mfam_samples, key(MFAM, self.seed, cycle_index))
        fake = all_gather_cat(samples, self.group)
        record["highlighter_balanced_accuracy"] = self._balanced_accuracy(fake, key(HL_FIT, self.seed, cycle_index, 2))
        if self.finetune_steps > 0 and not (first and self.recipe is not None):
            history = self._fit(fake, key(HL_FIT, self.seed, cycle_index + 1), steps=self.finetune_steps)
            if history:
                record["finetune_accuracy"] = history[-1]["accuracy"]
        fams = self.highlighter.fam(samples)
        self.mfam = self._mean_map(fams, weights)
        empty = all_reduce_sum((fams.flatten(1).amax(1) == 0).sum().float(), self.group)
        record.update(seconds=time.perf_counter() - start, mfam_mean=float(self.mfam.mean()),
                      mfam_max=float(self.mfam.max()), mfam_std=float(self.mfam.std()),
                      empty_fam_fraction=float(empty) / self.mfam_samples)
        self.last_record = record
        self._check_map(record)
        if self.figures is not None and self._is_main:
            self._save_figures(cycle_index, samples, fams)
        return record

    def metrics(self, step: int) -> dict:
        """The numbers of the refresh that ran before step ``step``, named ``refresh/<field>``, for a tracker
        (``accelerator.log(refiner.metrics(step), step=...)``); empty when none ran then."""
        record = self.last_record
        if record is None or record["step"] != step:
            return {}
        return {f"refresh/{name}": value for name, value in record.items() if isinstance(value, (int, float))}

    def _check_map(self, record: dict) -> None:
        """An empty or constant map: a warning in ``record`` (and on rank 0), or :class:`EmptyMapError`."""
        if record["mfam_max"] > 0 and record["mfam_std"] >= EMPTY_MAP_STD:
            return
        what = ("empty (every pixel 0)" if record["mfam_max"] == 0 else
                f"constant (std {record['mfam_std']:.2g} < {EMPTY_MAP_STD:g})")
        message = (f"refresh {record['cycle']} (before step {record['step']}): the mFAM is {what}, so this cycle "
                   f"refines nothing; the highlighter's balanced accuracy on its samples is "
                   f"{record['highlighter_balanced_accuracy']:.3f} (0.5: chance). A highlighter with more samples, "
                   "epochs or fine-tune steps may see flaws; require_fam (--require-fam) stops the run instead")
        record["warning"] = message
        if self.require_fam:
            raise EmptyMapError(message, record)
        if self._is_main:
            warnings.warn(message, UserWarning, stacklevel=3)

    def _start(self) -> dict:
        """The highlighter of the first refresh: the given one, or one trained by the recipe."""
        if self.given is not None:
            self.highlighter = self.given.to(self.device)
            return {"highlighter": "loaded", "path": self.path} if self.path else {"highlighter": "given"}
        recipe = self.recipe
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key(HL_FIT, self.seed))
            layers = None if recipe.layer is None else [recipe.layer]
            self.highlighter = FlawHighlighter(backbone=recipe.backbone, in_channels=self.real_images.shape[1],
                                               image_size=self.real_images.shape[-1], target_layers=layers)
            self.highlighter.to(self.device)
        fake, _ = self._sharded(recipe.samples, key(HL_SAMPLES, self.seed))
        history = self._fit(all_gather_cat(fake, self.group), key(HL_FIT, self.seed, 0), epochs=recipe.epochs)
        best = max(history, key=lambda h: h["balanced_accuracy"]) if history else {}
        return {"highlighter": "trained", "epochs": len(history),
                "val_balanced_accuracy": best.get("balanced_accuracy"), "val_roc_auc": best.get("roc_auc")}

    # ------------------------------------------------------------------ samples, fits, maps
    @property
    def _is_main(self) -> bool:
        return rank_and_world(self.group)[0] == 0

    def _check_shares(self) -> None:
        world = rank_and_world(self.group)[1]
        counts = {"mfam_samples": self.mfam_samples, **({"recipe.samples": self.recipe.samples} if self.recipe else {})}
        for name, n in counts.items():
            if n % world:
                raise ValueError(f"{name} must be a multiple of the world size {world} (each rank draws an equal "
                                 f"share), got {n}")

    def _sharded(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's share of ``n`` samples: images ``rank * share ...`` of the refresh, checked."""
        self._check_shares()
        rank, world = rank_and_world(self.group)
        share = n // world
        drawn = self.sampler(share, seed=seed, first_index=rank * share)
        images, weights = drawn if isinstance(drawn, tuple) else (drawn, None)
        self._check_samples(images, weights, share)
        return images, weights

    def _check_samples(self, images, weights, n: int) -> None:
        check_tensor("the sampler's images", images, ndim=4, floating=True)
        expected = (n, *self.real_images.shape[1:])
        if tuple(images.shape) != expected:
            raise ValueError(f"the sampler returned images of shape {tuple(images.shape)} for n={n}; expected "
                             f"{expected} (n images of the real images' channels and size)")
        lo, hi = (float(v) for v in torch.aminmax(images.detach().float()))
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"the sampler returned images in [{lo:.4g}, {hi:.4g}]; expected values in [0, 1] (a model's "
                             "x0 in [-1, 1] becomes (x0 + 1) / 2, clamped)")
        if weights is not None:
            check_tensor("the sampler's weights", weights, ndim=3, floating=True)
            if tuple(weights.shape) != (n, *images.shape[-2:]):
                raise ValueError(f"the sampler returned weights of shape {tuple(weights.shape)}; expected "
                                 f"{(n, *images.shape[-2:])} (one (H, W) map per image)")
            if not bool(torch.isfinite(weights).all() and (weights >= 0).all()):
                raise ValueError("the sampler returned weights that are negative or not finite; expected >= 0")

    def _real_subset(self, n: int, seed: int) -> torch.Tensor:
        idx = torch.randint(0, len(self.real_images), (n,), generator=torch.Generator().manual_seed(seed))
        return self.real_images[idx]

    def _fit(self, fake: torch.Tensor, seed: int, **fit_kwargs) -> list[dict]:
        """Fit on rank 0 (real vs ``fake``, every rank's samples), then copy rank 0's weights everywhere."""
        history = []
        if self._is_main:
            real = self._real_subset(len(fake), key(HL_FIT, seed, 1)).to(self.device)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                history = self.highlighter.fit(real, fake, seed=seed, progress=False, **fit_kwargs)
        broadcast_module(self.highlighter, self.group)
        return history

    def _balanced_accuracy(self, fake: torch.Tensor, seed: int) -> float:
        """The highlighter's balanced accuracy on ``fake`` against as many real images: a highlighter at
        chance (0.5) gives empty maps."""
        real = self._real_subset(len(fake), seed).to(fake.device)
        labels = torch.cat([torch.zeros(len(real), dtype=torch.long), torch.ones(len(fake), dtype=torch.long)])
        return evaluate(self.highlighter, torch.cat([real, fake]), labels)["balanced_accuracy"]

    def _mean_map(self, fams: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The mFAM over all ranks: the plain mean, or with per-image weights the weighted mean per pixel
        (0 where no image has weight)."""
        if weights is None:
            total = all_reduce_sum(fams.sum(0), self.group)
            return (total / self.mfam_samples).detach()
        weights = weights.to(fams)
        total = all_reduce_sum((fams * weights).sum(0), self.group)
        mass = all_reduce_sum(weights.sum(0), self.group)
        return torch.where(mass > 0, total / mass.clamp_min(1e-12), torch.zeros_like(total)).detach()

    def _save_figures(self, cycle_index: int, samples: torch.Tensor, fams: torch.Tensor) -> None:
        viz.save_grid(samples[:64], self.figures / f"cycle_{cycle_index:03d}_samples.png", upscale=4)
        k = min(16, len(samples))
        viz.save_grid(viz.overlay(samples[:k], fams[:k]), self.figures / f"cycle_{cycle_index:03d}_fam.png", nrow=8,
                      upscale=4)
        viz.save_png(viz.colormap(self.mfam), self.figures / f"cycle_{cycle_index:03d}_mfam.png", upscale=8)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The current mFAM and highlighter (config and weights): what a resumed loop needs (tensors,
        numbers and strings only: ``torch.load(weights_only=True)`` reads it)."""
        hl = None
        if self.highlighter is not None:
            hl = {"config": self.highlighter.config, "state": self.highlighter.state_dict()}
        return {"mfam": self.mfam.cpu() if self.mfam is not None else None, "highlighter": hl}

    def load_state_dict(self, state: dict) -> None:
        self.mfam = state["mfam"].to(self.device) if state["mfam"] is not None else None
        self.highlighter = None
        if state["highlighter"] is not None:
            self.highlighter = FlawHighlighter.from_config(state["highlighter"]["config"]).to(self.device)
            self.highlighter.load_state_dict(state["highlighter"]["state"])
