"""What one unit of an ablation costs on the machine at hand: a base step, a refinement step (combined mode), an
mFAM refresh (the first, which pre-trains the highlighter, and a later one, which fine-tunes it), 1,000
evaluation samples and 1,000 Inception images, each timed in wall seconds **and** process CPU seconds
(user + sys of every thread), with the load average before and after.

On a shared machine wall time depends on the neighbours; CPU seconds do much less (they still rise a little
under contention: caches, memory bandwidth, OpenMP spinning). A wall figure is called idle only when the
1-minute load average stayed below :data:`IDLE_LOAD` while it was measured.
"""

import json
import os
import resource
import threading
import time
from pathlib import Path

import torch

from srdiff.trainer.config import TrainConfig

IDLE_LOAD = 0.5


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stopwatch:
    """Wall and CPU seconds of a ``with`` block, and the 1-minute load average sampled every ``every``
    seconds while it runs (a daemon thread; the first sample at entry, the last at exit).

    ``record(units)`` gives the seconds per unit and the load: ``{"wall_s", "cpu_s", "units", "load_mean",
    "load_min", "load_max", "idle"}``, ``idle`` when the load never reached :data:`IDLE_LOAD`."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self.loads: list[float] = []
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Stopwatch":
        self._stop = threading.Event()
        self.loads = [os.getloadavg()[0]]
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._cpu, self._wall = cpu_seconds(), time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.loads.append(os.getloadavg()[0])

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, cpu_seconds() - self._cpu
        self._stop.set()
        self._thread.join()
        self.loads.append(os.getloadavg()[0])

    def record(self, units: float = 1) -> dict:
        return {"wall_s": self.wall / units, "cpu_s": self.cpu / units, "units": units,
                "load_mean": sum(self.loads) / len(self.loads), "load_min": min(self.loads),
                "load_max": max(self.loads), "idle": max(self.loads) < IDLE_LOAD}


def timed(fn, units: float) -> dict:
    """Run ``fn()`` once under a :class:`Stopwatch`; its record per unit (``units`` of work were done)."""
    with Stopwatch(every=5.0) as watch:
        fn()
    return watch.record(units)


def measure_costs(config: TrainConfig, *, steps: int = 20, samples: int = 100, images: int = 100) -> dict:
    """Time the units of a run of ``config`` (its model, batch, refresh and evaluation settings):
    ``steps`` training steps per phase, ``samples`` evaluation samples (scaled to 1,000), ``images``
    Inception images (scaled to 1,000). Writes nothing; returns ``{"units": {...}, "machine": {...}}``."""
    from srdiff.inception import InceptionFeatures
    from srdiff.trainer.metrics import extract_features
    from srdiff.trainer.trainer import SelfRefiningTrainer

    if steps < 1 or samples < 2 or images < 1:
        raise ValueError(f"steps, samples and images must be positive (samples >= 2), got {steps}, {samples}, {images}")
    config = config.replace(mode="combined", progress=False, device="cpu")
    trainer = SelfRefiningTrainer(config)
    trainer.train_step()  # warm-up: first-call allocations and kernel selection
    units = {"base_step": timed(lambda: [trainer.train_step() for _ in range(steps)], steps)}
    trainer.step = config.base_steps
    units["first_refresh"] = timed(trainer.refresh_mfam, 1)  # pre-trains the highlighter
    trainer.step = config.base_steps + config.cycle
    units["refresh"] = timed(trainer.refresh_mfam, 1)
    trainer.step = config.base_steps + 1
    units["refine_step"] = timed(lambda: [trainer.train_step() for _ in range(steps)], steps)
    units["samples_1000"] = timed(lambda: trainer.sample(samples, seed=0, steps=config.sample_steps), samples / 1000)
    net = InceptionFeatures(config.inception_weights)
    pictures = trainer.train_images[:images]
    extract_features(net, pictures[:2])  # warm-up
    units["inception_1000"] = timed(lambda: extract_features(net, pictures), images / 1000)
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "nice": os.nice(0), "torch": torch.__version__}
    return {"config": {k: config.to_dict()[k] for k in ("data", "image_size", "block_out_channels", "batch_size",
                                                         "mfam_samples", "mfam_sampler_steps", "highlighter_epochs",
                                                         "highlighter_samples", "highlighter_finetune_steps",
                                                         "sample_steps")},
            "measured_steps": steps, "measured_samples": samples, "measured_images": images,
            "units": units, "machine": machine}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run_cost(costs: dict, *, base_steps: int, refine_steps: int, cycle: int, eval_samples: int,
             refine: bool = True, basis: str = "cpu_s") -> float:
    """Seconds (``basis`` "cpu_s" or "wall_s") of one run from the measured ``costs``: its training steps,
    refreshes and evaluation (samples plus their Inception features)."""
    u = {k: v[basis] for k, v in costs["units"].items()}
    seconds = base_steps * u["base_step"] + eval_samples / 1000 * (u["samples_1000"] + u["inception_1000"])
    if refine:
        refreshes = -(-refine_steps // cycle)
        seconds += refine_steps * u["refine_step"] + u["first_refresh"] + (refreshes - 1) * u["refresh"]
    else:
        seconds += refine_steps * u["base_step"]
    return seconds


def write(costs: dict, path: str | Path) -> Path:
    """``path`` (JSON) and its :func:`markdown` beside it (same name, ``.md``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(costs, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(costs) + "\n")
    return path


UNIT_NAMES = {"base_step": "base training step (batch {batch_size})",
              "refine_step": "refinement step, combined mode (batch {batch_size})",
              "first_refresh": "first refresh: {highlighter_samples} samples, the highlighter trained "
                               "({highlighter_epochs} epochs), {mfam_samples} samples and their FAMs",
              "refresh": "later refresh: {mfam_samples} samples x {mfam_sampler_steps} DDIM steps, "
                         "{highlighter_finetune_steps} fine-tune steps, FAMs",
              "samples_1000": "1,000 evaluation samples x {sample_steps} DDIM steps",
              "inception_1000": "1,000 Inception images (features)"}


def markdown(costs: dict) -> str:
    """The stored ``costs`` as a table per unit, then what a run and the modes x seeds table of its ``plan``
    (``{base_steps, refine_steps, cycle, eval_samples, seeds, refined_modes}``) cost from them."""
    c, m = costs["config"], costs["machine"]
    base_steps, refine_steps, cycle, eval_samples, seeds, refined_modes = (costs["plan"][k] for k in (
        "base_steps", "refine_steps", "cycle", "eval_samples", "seeds", "refined_modes"))
    lines = [f"Measured on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, {m['torch_threads']} thread(s), "
             f"nice {m['nice']}; {c['data']} at {c['image_size']} px, UNet {c['block_out_channels']}.", "",
             "| unit | CPU s | wall s | load average while measured | idle |", "| --- | --- | --- | --- | --- |"]
    for name, u in costs["units"].items():
        lines.append(f"| {UNIT_NAMES[name].format(**c)} | {u['cpu_s']:.3f} | {u['wall_s']:.3f} | "
                     f"{u['load_min']:.1f}–{u['load_max']:.1f} | {'yes' if u['idle'] else 'no'} |")
    plan = dict(refine_steps=refine_steps, cycle=cycle, eval_samples=eval_samples)
    refined = run_cost(costs, base_steps=0, **plan)
    plain = run_cost(costs, base_steps=0, refine=False, **plan)
    base = base_steps * costs["units"]["base_step"]["cpu_s"]
    table = base + seeds * plain + seeds * refined_modes * refined
    lines += ["", f"From these, in CPU seconds: the shared base phase ({base_steps} steps) {base:,.0f}; a refinement "
              f"run ({refine_steps} steps, a refresh every {cycle}, {eval_samples} samples evaluated) {refined:,.0f}; "
              f"a baseline run {plain:,.0f}; the modes x seeds table ({seeds} seeds, {refined_modes} refined modes) "
              f"{table:,.0f} = {table / 3600:.1f} CPU-hours, about as many wall hours with one thread on an idle "
              "machine."]
    return "\n".join(lines)
