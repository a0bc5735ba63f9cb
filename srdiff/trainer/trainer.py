"""The self-refining trainer: a base phase of plain DDPM training, then a refinement phase in which a flaw
highlighter's mFAM, refreshed every ``cycle`` steps from fresh EMA samples, amplifies the forward noise
(``lam_f``) and/or modulates attention K/V (``lam_r``).

What differs between tasks (unconditional, class, text, inpainting: the denoiser, the batch, the
denoiser call, sampling, export) is the task's (``srdiff/trainer/task.py``); the highlighter and the mFAM
are the refinement cycle's (:class:`srdiff.Refiner`, which any training loop can use); this module keeps
the loop, the step, checkpoints and resume.

Every random draw of a step is keyed by (seed, step, global micro-batch index), never by a stateful
stream (``seeding.py``), so a resumed run repeats an uninterrupted one exactly on CPU, and a DDP run with
N ranks matches one process accumulating N micro-batches (same global batch).
"""

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from srdiff import viz
from srdiff._collectives import all_reduce_sum, barrier
from srdiff._device import resolve_device
from srdiff._io import follow_umask
from srdiff.diffusion.schedules import make_scheduler
from srdiff.diffusion.seeding import DATA, FINAL, NOISE, TIMESTEPS, key
from srdiff.noise import amplified_add_noise
from srdiff.processors.context import fam_context
from srdiff.processors.install import set_fam_attn_processor
from srdiff.refiner import EmptyMapError, HighlighterRecipe, Refiner
from srdiff.run_dir import OutDirError, RunLock, prepare_out_dir, set_aside_failed_start
from srdiff.trainer import checkpoint, distributed, fsdp
from srdiff.trainer.config import TrainConfig
from srdiff.trainer.dataset import load_dataset
from srdiff.trainer.ema import EMA
from srdiff.trainer.metrics import evaluate_generator
from srdiff.trainer.resume import SCHEDULE_FIELDS, check_schedule
from srdiff.trainer.run_log import RunLog
from srdiff.trainer.tasks import get_task

# Config fields a resumed run may change: they do not alter the trajectory (steps and ratio may too, by the
# rule of srdiff.trainer.resume.check_schedule).
RESUMABLE_CHANGES = ("out_dir", "progress", "checkpoint_every", "eval_samples", "sample_steps",
                     "sampler", "features", "feature_epochs", "inception_weights", "cache_dir", "device",
                     "require_fam")
# Fields a run started from another run's base checkpoint (``init_from``) may change: what only the
# refinement phase reads.
REFINE_FIELDS = ("mode", "cycle", "lam_f", "lam_r", "recipe", "mfam_samples",
                 "mfam_sampler_steps", "highlighter", "highlighter_backbone", "highlighter_layer",
                 "highlighter_epochs", "highlighter_samples", "highlighter_finetune_steps")

__all__ = ["EmptyMapError", "NonFiniteLossError", "OutDirError", "SelfRefiningTrainer"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; training stopped without writing a checkpoint."""


class SelfRefiningTrainer:
    """Dual-phase self-refining diffusion training of the denoiser of ``config.task`` (default: an
    unconditional diffusers ``UNet2DModel``).

    Base phase (``config.base_steps`` steps): plain DDPM epsilon-prediction. At the switch the EMA
    model's samples train a :class:`srdiff.FlawHighlighter` (real vs generated) unless one is given.
    Refinement phase: every ``config.cycle`` steps, ``config.mfam_samples`` DDIM samples of the EMA model
    (drawn on all ranks) give one mFAM (H, W) for the whole dataset until the next refresh, optionally
    after fine-tuning the highlighter on them; the loss uses :func:`srdiff.amplified_noise_loss` with
    ``lam_f`` and ``config.recipe`` (forward modes), and the denoiser's self-attention layers run the FAM
    processor of their family (:func:`srdiff.set_fam_attn_processor`) with ``lam_r`` inside
    :func:`srdiff.fam_context` (reverse modes).

    Writes under ``config.out_dir`` (rank 0 only): ``checkpoints/last.pt`` (every ``checkpoint_every``
    steps, at the phase switch and at the end; ``checkpoints/base.pt`` at the switch),
    ``metrics.jsonl`` (one record per step, plus refresh and checkpoint events), ``figures/loss.png``,
    ``figures/cycle_NNN_{samples,fam,mfam}.png``, ``highlighter.pt``, and at the end ``samples.png``,
    ``pipeline/`` (the task's diffusers pipeline) and ``eval.json`` when ``eval_samples > 0``.

    Example::

        cfg = srdiff.TrainConfig(steps=1000, ratio="1:1", cycle=100, out_dir="runs/digits")
        trainer = srdiff.SelfRefiningTrainer(cfg)
        summary = trainer.train()          # or train(resume=True) after an interruption
    """

    def __init__(self, config: TrainConfig):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.device = resolve_device(config.device)
        self.sharded = config.parallel == "fsdp"
        self.dist = distributed.init(self.device.type, need_group=self.sharded)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self._check_divisibility()
        if config.precision == "bf16" and self.device.type != "cuda":
            raise ValueError("precision 'bf16' needs a CUDA device (bf16 autocast is GPU only), got device "
                             f"{str(self.device)!r}")
        use_bf16 = self.device.type == "cuda" and config.precision in ("auto", "bf16")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.out_dir = Path(config.out_dir)

        self.data = load_dataset(config, self.device)
        self.train_images, self.holdout_images = self.data.train_images, self.data.holdout_images
        self.train_data, self.vae = self.data.train_data, self.data.vae
        self.task = get_task(config, self.device)
        self.task.setup(self.data)
        torch.manual_seed(config.seed)
        self.denoiser, self.fam_layers = self._build_denoiser()
        self.ema = EMA(self.denoiser, config.ema_decay)
        self.model = self._distribute()
        if config.compile:
            self.model = torch.compile(self.model)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=config.lr, betas=tuple(config.adam_betas),
                                           weight_decay=config.weight_decay, foreach=True)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.alphas_cumprod = make_scheduler(config).alphas_cumprod.to(self.device)
        self.refiner = Refiner(
            config.highlighter or HighlighterRecipe(config.highlighter_backbone, config.highlighter_epochs,
                                                    config.highlighter_samples, config.highlighter_layer),
            self.train_images, self._refresh_samples, base_steps=config.base_steps if config.needs_mfam else config.steps,
            cycle=config.cycle, mfam_samples=config.mfam_samples, finetune_steps=config.highlighter_finetune_steps,
            seed=config.seed, require_fam=config.require_fam, figures=self.out_dir / "figures", device=self.device)
        self.log = RunLog(self.out_dir)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._checkpoint_step: int | None = None

    @property
    def mfam(self) -> torch.Tensor | None:
        """The current mFAM (H, W) in [0, 1], or None before the first refresh."""
        return self.refiner.mfam

    def parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains: the denoiser's parameters (the learned mFAM projections included:
        the FAM processors register them in the denoiser)."""
        return list(self.denoiser.parameters())

    # ------------------------------------------------------------------ setup
    def _build_denoiser(self) -> tuple[nn.Module, list[str]]:
        """The task's denoiser on the device with, in the reverse modes, the FAM processors of its family
        (and the names of the layers they modulate)."""
        c = self.config
        model, layers = self.task.build_denoiser().to(self.device), []
        if c.refine_reverse:
            projection = None if c.fam_projection == "none" else c.fam_projection
            layers = set_fam_attn_processor(model, lam=c.lam_r, projection=projection)
            model.to(self.device)  # the learned projections the processors registered
        return model, layers

    def _distribute(self) -> nn.Module:
        """What the training step calls: the denoiser, wrapped in DDP across ranks, or (``parallel = "fsdp"``)
        sharded block by block with its EMA (:mod:`srdiff.trainer.fsdp`; the processors are already in)."""
        if self.sharded:
            blocks, policy = self.task.backbone.shard_units, fsdp.mixed_precision(self.autocast_dtype)
            fsdp.shard(self.ema.model, blocks(self.ema.model), policy)
            return fsdp.shard(self.denoiser, blocks(self.denoiser), policy)
        if not self.dist.enabled:
            return self.denoiser
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.denoiser, device_ids=ids)

    def _gradient_sync(self, sync: bool):
        """A context for one micro-batch's backward: gradients reduced across ranks (``sync``, the last
        micro-batch) or kept local until then."""
        if sync or not self.dist.enabled:
            return contextlib.nullcontext()
        return fsdp.no_sync(self.denoiser) if self.sharded else self.model.no_sync()

    def _check_divisibility(self) -> None:
        c, w = self.config, self.dist.world_size
        if c.batch_size % (w * c.grad_accum):
            raise ValueError(f"batch_size {c.batch_size} must be a multiple of world_size x grad_accum = "
                             f"{w} x {c.grad_accum}")

    def _lr_factor(self, step: int) -> float:
        c = self.config
        warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        if c.lr_schedule == "cosine" and step >= c.warmup_steps:
            progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return warm

    # ------------------------------------------------------------------ keyed randomness
    def phase(self, step: int) -> str:
        return "base" if step < self.config.base_steps else "refine"

    def _global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, timesteps) of the global batch of optimiser step ``step`` (0-based)."""
        c, n = self.config, len(self.train_data)
        positions = torch.arange(step * c.batch_size, (step + 1) * c.batch_size)
        epochs, offsets = positions // n, positions % n
        indices = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(key(DATA, c.seed, epoch)))
            sel = epochs == epoch
            indices[sel] = perm[offsets[sel]]
        gen = torch.Generator().manual_seed(key(TIMESTEPS, c.seed, step))
        timesteps = torch.randint(0, c.num_train_timesteps, (c.batch_size,), generator=gen)
        return indices, timesteps

    # ------------------------------------------------------------------ one optimiser step
    def _micro_loss(self, step: int, micro: int, indices: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        refine = self.phase(step) == "refine" and self.mfam is not None
        fam, lam = (self.mfam, c.lam_f) if refine and c.refine_forward else (None, 0.0)
        seed = key(NOISE, c.seed, step, micro)
        batch = self.task.batch(indices, step=step, micro=micro)
        # Timesteps come from randint(0, T), alphas_cumprod from the scheduler, the mFAM from Grad-CAM
        # (finite by construction): the value checks' device syncs would buy nothing in the hot loop.
        options = dict(recipe=c.recipe, prediction_type=c.prediction_type, check_values=False)
        x_t, _ = amplified_add_noise(batch.x0, t, self.alphas_cumprod, fam=fam, lam=lam, seed=seed,
                                            return_target=False, **options)
        context = fam_context(self.mfam if refine else None) if c.refine_reverse else contextlib.nullcontext()
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with context, autocast:
            pred = self.task.predict(self.model, x_t, t, batch)
        return self.task.loss(pred, batch, t, self.alphas_cumprod, fam, lam, seed=seed, **options)

    def train_step(self) -> dict:
        """One optimiser step over the global batch; returns its metrics record."""
        c, step = self.config, self.step
        indices, timesteps = self._global_batch(step)
        micro = c.batch_size // (self.dist.world_size * c.grad_accum)
        self.denoiser.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for k in range(c.grad_accum):
            j = self.dist.rank * c.grad_accum + k
            sl = slice(j * micro, (j + 1) * micro)
            sync = k == c.grad_accum - 1 or not self.dist.enabled
            with self._gradient_sync(sync):
                loss = self._micro_loss(step, j, indices[sl], timesteps[sl].to(self.device))
                (loss / c.grad_accum).backward()
            loss_sum += loss.detach()
        loss_sum = all_reduce_sum(loss_sum)
        loss_value = loss_sum.item() / (c.grad_accum * self.dist.world_size)
        if not math.isfinite(loss_value):
            where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"loss became {loss_value} at step {step + 1} ({self.phase(step)} phase); training stopped without "
                f"writing a checkpoint, {where}. Try a lower lr (now {c.lr}) or grad_clip (now {c.grad_clip})."
            )
        if c.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), c.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters() if p.grad is not None])
        grad_norm = fsdp.scalar(norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.update(self.denoiser)
        self.step += 1
        return {"step": self.step, "phase": self.phase(step), "loss": loss_value, "lr": lr, "grad_norm": grad_norm}

    # ------------------------------------------------------------------ sampling and the mFAM
    def sample(self, n: int, *, seed: int, steps: int, sampler: str = "ddim", first_index: int = 0,
               progress: bool = False, model: nn.Module | None = None, **task_kwargs) -> torch.Tensor:
        """``n`` images (n, C, H, W) in [0, 1] (decoded in latent mode) of ``model`` (default: the EMA; under
        FSDP every rank must call it, see :meth:`unsharded_ema`) through the task's sampler (``task_kwargs``:
        e.g. ``guidance_scale``, ``conditions``)."""
        return self.task.sample(self.ema.model if model is None else model, n, seed=seed, steps=steps,
                                sampler=sampler, first_index=first_index, autocast_dtype=self.autocast_dtype,
                                progress=progress, **task_kwargs)

    def unsharded_ema(self) -> nn.Module | None:
        """The EMA denoiser as one module: the EMA itself, or under FSDP a plain copy gathered from the shards
        (a collective: every rank calls it; rank 0 gets the copy, the others None)."""
        if not self.sharded:
            return self.ema.model
        state = fsdp.full_state_dict(self.ema.model)
        if not self.dist.is_main:
            return None
        with torch.random.fork_rng(devices=[]):
            model, _ = self._build_denoiser()
        model.load_state_dict(state)
        return model.eval().requires_grad_(False)

    def _refresh_samples(self, n: int, *, seed: int, first_index: int):
        return self.task.refresh_samples(self.ema.model, n, seed=seed, first_index=first_index,
                                         steps=self.config.mfam_sampler_steps, autocast_dtype=self.autocast_dtype)

    def refresh_mfam(self) -> dict:
        """Draw EMA samples on all ranks, fine-tune the highlighter on them, and set the new mFAM
        (:meth:`srdiff.Refiner.refresh`); returns the refresh's record. An empty or constant map under
        ``require_fam`` is logged, then raises :class:`srdiff.refiner.EmptyMapError`."""
        try:
            return self.refiner.refresh(self.step)
        except EmptyMapError as exc:
            self.log.write(exc.record)
            raise

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The checkpoint: everything a resumed run needs. Under FSDP the weights, the EMA's weights and the
        optimiser state are left out: they are the checkpoint's shards (:meth:`save_checkpoint`)."""
        ema = self.ema.state_dict()
        if self.sharded:
            del ema["model"]  # in the shards, with the denoiser's weights and the optimiser state
            weights = {"ema": ema}
        else:
            weights = {"model": self.denoiser.state_dict(), "ema": ema, "optimizer": self.optimizer.state_dict()}
        return {
            "config": self.config.to_dict(),
            "task": self.task.state_dict(),
            "step": self.step,
            "phase": self.phase(self.step),
            **weights,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            **self.refiner.state_dict(),
            "rng": checkpoint.rng_state(),
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: dict, *, restore_rng: bool = True) -> None:
        """Load a checkpoint (:func:`srdiff.trainer.checkpoint.load`); a sharded one's shards are read by every
        rank (a collective)."""
        if "sharded" in state:
            fsdp.load(Path(state["sharded"]), self.denoiser, self.ema.model, self.optimizer)
        else:
            self.denoiser.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step = int(state["step"])
        self.refiner.load_state_dict(state)
        if restore_rng:
            checkpoint.set_rng_state(state["rng"])

    def save_checkpoint(self, name: str = "last.pt") -> Path | None:
        """Rank 0 writes ``checkpoints/<name>`` atomically; other ranks wait for it. Under FSDP every rank first
        writes its shards to ``checkpoints/<stem>.shards-<step>/``, which ``<name>`` then names (the shards of
        the checkpoint it replaces are deleted after)."""
        path = self.out_dir / "checkpoints" / name
        state = self.state_dict() if self.dist.is_main else None
        if self.sharded:
            shards = path.with_name(f"{path.stem}.shards-{self.step:06d}")
            fsdp.save(shards, self.denoiser, self.ema.model, self.optimizer, is_main=self.dist.is_main)
            if state is not None:
                state["sharded"] = shards.name
        if self.dist.is_main:
            checkpoint.save_atomic(state, path)
            if self.sharded:
                fsdp.remove_stale(path, keep=shards)
        barrier()
        if name == "last.pt":
            self.last_checkpoint, self._checkpoint_step = path, self.step
        return path

    def _check_compatible(self, saved: dict, allowed: tuple[str, ...], what: str) -> None:
        ours, fields = self.config.to_dict(), TrainConfig.__dataclass_fields__
        # a field newer than the checkpoint had its default there
        diff = sorted(k for k in ours if k not in allowed and saved.get(k, fields[k].default) != ours[k])
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {ours[k]!r}" for k in diff)
            raise ValueError(f"cannot {what}: the config differs in {details}")

    def _check_world(self, state: dict, what: str, path) -> None:
        """A sharded (FSDP) checkpoint loads on the number of ranks that wrote it."""
        written = int(state["world_size"])
        if "sharded" in state and written != self.dist.world_size:
            raise ValueError(f"cannot {what}: its shards (parallel 'fsdp') were written by {written} ranks and "
                             f"this run has {self.dist.world_size}; run it on {written} (torchrun "
                             f"--nproc_per_node={written}), or take its EMA model out with "
                             f"`srdiff export --ckpt {path} --out DIR`")

    def resume(self, path: str | None = None) -> bool:
        """Load ``path`` (default ``checkpoints/last.pt``) if it exists; returns whether it did."""
        path = Path(path) if path else self.out_dir / "checkpoints" / "last.pt"
        if not path.is_file():
            return False
        state = checkpoint.load(path, map_location=self.device)
        what = f"resume from {path}"
        self._check_compatible(state["config"], RESUMABLE_CHANGES + SCHEDULE_FIELDS, what)
        check_schedule(TrainConfig.from_dict(state["config"], where=str(path)), self.config, int(state["step"]), what)
        self._check_world(state, what, path)
        self.load_state_dict(state)
        self.last_checkpoint, self._checkpoint_step = path, self.step
        return True

    def init_from(self, path: str) -> None:
        """Start from another run's base-phase checkpoint (same data split, model and base settings): the
        ablation trains one base phase and every mode and seed refines from it. The seed may differ (it
        keys the refinement phase's draws) as long as the train/held-out split is the same
        (``data_seed``), and the steps and ratio as long as the checkpoint's step is this run's ``base_steps`` (a
        base trained for N steps, e.g. a point of the base curve, starts any refinement that switches at N)."""
        state = checkpoint.load(path, map_location=self.device)
        what = f"start from {path}"
        base_settings = ("seed", "data_seed", "steps", "ratio")
        self._check_compatible(state["config"], RESUMABLE_CHANGES + REFINE_FIELDS + base_settings, what)
        saved_split = TrainConfig.from_dict(state["config"]).split_seed
        if saved_split != self.config.split_seed:
            raise ValueError(f"cannot {what}: its train/held-out split has seed {saved_split}, this run's "
                             f"{self.config.split_seed}; set data_seed = {saved_split}")
        self._check_world(state, what, path)
        if state["step"] != self.config.base_steps:
            raise ValueError(f"{path} is at step {state['step']}, not at the end of the base phase "
                             f"({self.config.base_steps})")
        self.load_state_dict({**state, "mfam": None, "highlighter": None})

    def evaluate(self, n: int, *, model: nn.Module | None = None) -> dict:
        """FID, KID and k-NN precision/recall of ``n`` samples of ``model`` (default: the EMA) against the
        held-out images."""
        c = self.config
        return evaluate_generator(
            c, lambda k: self.sample(k, seed=key(FINAL, c.seed, 1), steps=c.sample_steps, sampler=c.sampler,
                                     model=model),
            n, self.train_images, self.data.train_labels, self.holdout_images, self.data.holdout_labels,
        )

    # ------------------------------------------------------------------ the run
    def train(self, *, resume: bool = False, init_from: str | None = None) -> dict:
        """Run to ``config.steps`` (continuing from ``checkpoints/last.pt`` with ``resume``); returns a
        summary of what was written where. Raises :class:`NonFiniteLossError` if the loss blows up.
        Ctrl-C (KeyboardInterrupt) writes ``checkpoints/last.pt`` at the last finished step, then
        re-raises: ``train(resume=True)`` continues from there.

        A new run (no ``resume``) refuses an out dir that is not empty (:class:`OutDirError`): nothing of an
        earlier run is overwritten. ``srdiff train --overwrite`` moves such a run aside first; what a start
        that wrote no checkpoint left is moved aside by itself (:func:`srdiff.run_dir.set_aside_failed_start`).
        While it runs, rank 0 holds the out dir's :class:`srdiff.run_dir.RunLock`: a second run on the same
        folder is refused, naming this one's pid."""
        lock = RunLock(self.out_dir)
        if self.dist.is_main:
            lock.acquire()
        try:
            return self._train(resume=resume, init_from=init_from)
        finally:
            lock.release()

    def _train(self, *, resume: bool, init_from: str | None) -> dict:
        c = self.config
        if self.dist.is_main:
            prepare_out_dir(self.out_dir, resume=resume, overwrite=False)
            set_aside_failed_start(self.out_dir)
        barrier()  # rank 0 has checked the out dir before any rank reads it
        resumed = self.resume() if resume else False
        if init_from is not None and not resumed:
            self.init_from(init_from)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(c.to_dict(), indent=2) + "\n")
            self.log.open(resumed_at=self.step if (resumed or init_from) else None)
        try:
            self._loop()
        except KeyboardInterrupt:
            if self._checkpoint_step != self.step:
                self.save_checkpoint()
            self.log.write({"event": "interrupted", "step": self.step, "path": str(self.last_checkpoint)})
            raise
        finally:
            self.log.close()
        summary = self._finish()
        barrier()
        return summary

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        c = self.config
        bar = tqdm(total=c.steps, initial=self.step, disable=not (c.progress and self.dist.is_main),
                   desc="training", dynamic_ncols=True)
        start = time.perf_counter()
        with bar:
            while self.step < c.steps:
                if self.refiner.due(self.step):
                    self.log.write(self.refresh_mfam())
                record = self.train_step()
                record["seconds"] = time.perf_counter() - start
                self.log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", phase=record["phase"], refresh=False)
                bar.update(1)
                switch = self.step == c.base_steps
                if switch or self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    path = self.save_checkpoint()
                    if switch:
                        self.save_checkpoint("base.pt")
                    self.log.write({"event": "checkpoint", "step": self.step, "path": str(path)})
                    if self.dist.is_main:
                        self.plot_loss()

    def plot_loss(self) -> Path:
        """``figures/loss.png``: per-step loss (and its moving average) with the refreshes marked."""
        c = self.config
        return self.log.plot_loss(self.out_dir / "figures" / "loss.png", base_steps=c.base_steps, steps=c.steps,
                                  title=f"training loss ({c.mode})")

    def _finish(self) -> dict:
        c = self.config
        summary = {"out_dir": str(self.out_dir), "task": c.task, "steps": self.step, "mode": c.mode,
                   "checkpoint": str(self.out_dir / "checkpoints" / "last.pt"),
                   "metrics": str(self.log.path), "loss_plot": str(self.out_dir / "figures" / "loss.png")}
        ema = self.unsharded_ema()
        if not self.dist.is_main:
            return summary
        highlighter = self.refiner.highlighter
        if highlighter is not None:
            highlighter.save(self.out_dir / "highlighter.pt")
            summary["highlighter"] = str(self.out_dir / "highlighter.pt")
        if c.needs_mfam:
            summary["figures"] = str(self.out_dir / "figures")
        images = self.sample(64, seed=key(FINAL, c.seed), steps=c.sample_steps, sampler=c.sampler, model=ema)
        viz.save_grid(images, self.out_dir / "samples.png", nrow=8, upscale=4)
        summary["samples"] = str(self.out_dir / "samples.png")
        summary["pipeline"] = str(follow_umask(self.task.export(ema, self.out_dir / "pipeline")))
        if c.eval_samples > 0:
            result = self.evaluate(c.eval_samples, model=ema)
            (self.out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            summary["eval"] = str(self.out_dir / "eval.json")
            summary["fid"] = result["fid"]
        return summary
